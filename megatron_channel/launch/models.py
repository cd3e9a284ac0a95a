"""The model a launch trains: ``GPTModel``, or ``HybridModel`` with ``--hybrid-layer-pattern``.

Megatron-LM's ``pretrain_gpt.py`` / ``pretrain_hybrid.py`` build them with builders that live
at its repository root (0.17, 0.18) or in the wheel (0.19 on, from the config container). For
the releases without them these providers build the same models from Megatron's arguments:
Megatron's own layer specs (``--spec``, else Transformer Engine or local, MoE block specs
with ``--num-experts``) and constructors.
"""

from __future__ import annotations


class ModelFlagsError(ValueError):
    """A model flag the launch cannot honour with the installed megatron-core; names the flag."""


def is_hybrid(args) -> bool:
    """``--hybrid-layer-pattern`` given: a ``HybridModel`` (Megatron's ``pretrain_hybrid.py``)."""
    return bool(getattr(args, "hybrid_layer_pattern", None))


def spec_from_flag(args, config, vp_stage=None):
    """``--spec MODULE NAME``: a ``ModuleSpec`` object, or a function of ``(config, vp_stage)``
    returning one (0.19's GPT builder calls such functions; earlier builders did not)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    try:
        spec = import_module(args.spec)
    except (KeyError, AttributeError):
        spec = None
    if spec is None:
        raise ModelFlagsError(f"--spec {' '.join(args.spec)}: no such module, or no such name in it")
    if callable(spec) and not isinstance(spec, ModuleSpec):
        spec = spec(config, vp_stage=vp_stage)
    return spec


def _transformer_config(args):
    from megatron.training.arguments import core_transformer_config_from_args

    if getattr(args, "yaml_cfg", None) is not None:
        from megatron.training.yaml_arguments import core_transformer_config_from_yaml

        return core_transformer_config_from_yaml(args, "language_model")
    return core_transformer_config_from_args(args)


def gpt_layer_spec(args, config, vp_stage=None):
    """The layer (or block) spec Megatron-LM's ``gpt_builder`` picks for these arguments."""
    from megatron.core.models.gpt import gpt_layer_specs

    if args.spec is not None:
        return spec_from_flag(args, config, vp_stage)
    use_te = args.transformer_impl == "transformer_engine"
    if args.num_experts:
        return gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                                          normalization=args.normalization, vp_stage=vp_stage)
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, args.multi_latent_attention)
    return gpt_layer_specs.get_gpt_layer_local_spec(args.num_experts, args.moe_grouped_gemm, args.qk_layernorm,
                                                    args.multi_latent_attention, normalization=args.normalization)


def language_model_kwargs(args, config, pre_process, post_process, vp_stage, pg_collection) -> dict:
    """What ``GPTModel`` and ``HybridModel`` take alike, from Megatron's arguments."""
    return dict(
        config=config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def gpt_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron's ``model_provider`` for a ``GPTModel`` (0.17, 0.18)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args

    args = get_args()
    if getattr(args, "mtp_num_layers", None):
        raise ModelFlagsError("--mtp-num-layers needs megatron-core 0.19 or later with this launch script; drop it")
    config = _transformer_config(args) if config is None else config
    return GPTModel(transformer_layer_spec=gpt_layer_spec(args, config, vp_stage), rope_scaling=args.use_rope_scaling,
                    **language_model_kwargs(args, config, pre_process, post_process, vp_stage, pg_collection))


def hybrid_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron's ``model_provider`` for a ``HybridModel`` (0.18; 0.19 builds it from the container)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.training import get_args

    args = get_args()
    config = _transformer_config(args) if config is None else config
    if args.spec is not None:
        spec = spec_from_flag(args, config, vp_stage)
    else:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as spec
    return HybridModel(hybrid_stack_spec=spec, hybrid_layer_pattern=args.hybrid_layer_pattern,
                       **language_model_kwargs(args, config, pre_process, post_process, vp_stage, pg_collection))


def model_provider(args, release):
    """The ``model_provider`` to hand ``pretrain()``: None where the release builds the model from
    the config container (0.19 on)."""
    if release.model_provider_optional:
        return None
    if is_hybrid(args):
        if not release.hybrid_model:
            raise ModelFlagsError(
                f"--hybrid-layer-pattern builds a HybridModel, which megatron-core {release.name} does not have "
                "(it came in 0.18); upgrade megatron-core or train a GPT model without the flag"
            )
        return hybrid_model_provider
    return gpt_model_provider
