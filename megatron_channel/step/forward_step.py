"""``make_forward_step``: a drop-in Megatron ``forward_step`` that reports per-channel loss."""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from megatron.core.utils import get_attr_wrapped_model

from ..config import ChannelConfig
from ..megatron_internals.loop import seqlen_stats_recorder
from .layout import BatchLayout, Topology
from .loss import channel_loss_func
from .model_inputs import get_model_inputs
from .token_accuracy import (
    CorrectTokens,
    correct_tokens_from_output_layer,
    output_processor_with_correct_tokens,
    takes_output_processor,
)


def model_device(model) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def uses_cuda_graphs(model) -> bool:
    """Whether the model's layers replay CUDA graphs (``--cuda-graph-impl``), which hold the
    captured non-tensor arguments, ``PackedSeqParams.max_seqlen`` included, fixed."""
    model_config = get_attr_wrapped_model(model, "config", allow_none=True)
    return getattr(model_config, "cuda_graph_impl", "none") not in (None, "none") or bool(
        getattr(model_config, "enable_cuda_graph", False))


def has_mamba_layers(model) -> bool:
    """Whether the model is a HybridModel with Mamba (``M``) layers, whose scan needs each packed
    token's sequence (``PackedSeqParams.seq_idx``); Megatron's own batch code leaves it unset
    unless ``total_tokens`` is given."""
    try:
        decoder_owner = get_attr_wrapped_model(model, "decoder", return_model_obj=True)
    except RuntimeError:  # a model of the user's own, without Megatron's decoder
        return False
    return "M" in (getattr(decoder_owner, "hybrid_layer_pattern", None) or "")


def record_packed_sequence_lengths(cu_seqlens) -> None:
    """Feed a packed microbatch's real boundaries to Megatron's throughput count, as stock
    pretrain_gpt does (``update_seqlen_stats_from_cu_seqlens``, on the device, no host sync);
    the zero-length sequences at the end add nothing. Only inside megatron.training's loop
    (0.18 on)."""
    update = seqlen_stats_recorder()
    if update is not None:
        update(cu_seqlens)


def make_forward_step(
    config: ChannelConfig,
    layout: BatchLayout | None = None,
    *,
    validate: bool = True,
    pass_packed_seq_params: bool = True,
):
    """Build ``forward_step(data_iterator, model)`` for ``megatron.training.pretrain``.

    The data iterator yields dicts with ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` (all ``[b, s]``), optionally a bool ``attention_mask`` broadcasting to
    ``[b, 1, s, s]``, ``cu_seqlens`` / ``cu_seqlens_padded`` ``[b, L]`` for packed rows, and
    ``channels``: ``[b]`` (one id per row) or ``[b, >= L - 1]`` (one id per packed sequence),
    -1 = untracked. The forms of Megatron's helpers, HF collators and Megatron-Bridge
    (``input_ids``, no ``position_ids``, 1-D rows, ``cu_seqlens_q``, -1 padding) are
    rewritten into this one first (``batch_forms``).

    Args:
        config: channel names and metric prefix.
        layout: fixed batch shapes. Needed with tensor parallelism, where TP ranks other
            than 0 receive the batch; default there is ``BatchLayout.from_megatron_args()``.
            Without TP the batch's own shapes are used.
        validate: check channel ids and ``cu_seqlens`` on TP rank 0 while the batch is
            still on the CPU (no GPU sync). Checks are skipped for tensors already on a GPU.
        pass_packed_seq_params: hand the model ``packed_seq_params`` (default). False: for an
            attention that takes the batch's block-diagonal ``attention_mask`` instead of THD
            metadata (Megatron's local attention on a CPU).

    With ``config.token_accuracy`` the last pipeline stage computes the correct-token flags in
    the model's own loss step (``token_accuracy``): through GPTModel's ``output_processor``
    (0.18 on; also for ``build_schedule_plan``, the combined 1F1B schedule), else through a
    hook on the model's output layer for the length of the call (HybridModel, 0.17).

    Packed rows reach attention as one THD stream of ``layout.sequence_capacity`` sequences
    (``--max-packed-sequences-per-row`` per row), with ``tokens_per_sample`` for MoE routing,
    and, in training, their lengths feed Megatron's throughput (TFLOP/s) count.

    Returns:
        ``forward_step(data_iterator, model, checkpoint_activations_microbatch=None, *,
        return_schedule_plan=False)`` returning
        ``(output_tensor, loss_func)`` with ``loss_func`` a partial of ``channel_loss_func``.
    """

    def forward_step(data_iterator, model, checkpoint_activations_microbatch=None, *, return_schedule_plan=False):
        # Megatron's schedule passes checkpoint_activations_microbatch positionally with
        # --num-microbatches-with-partial-activation-checkpoints; GPTModel takes no such input.
        topo = Topology.current(get_attr_wrapped_model(model, "vp_stage", allow_none=True))
        batch_layout = layout
        if batch_layout is None and topo.tp_size > 1:
            # Evaluation feeds --eval-micro-batch-size rows, and Megatron puts the model in eval mode.
            batch_layout = BatchLayout.from_megatron_args(training=model.training)
        inputs = get_model_inputs(data_iterator, config.num_channels, batch_layout, topo, model_device(model), validate,
                                  fixed_max_seqlen=uses_cuda_graphs(model), sequence_index=has_mamba_layers(model))
        if inputs.packed_seq_params is not None and model.training:
            record_packed_sequence_lengths(inputs.packed_seq_params.cu_seqlens_q)
        args = (inputs.tokens, inputs.position_ids, inputs.attention_mask)
        # loss_mask as stock pretrain_gpt passes it: multi-token prediction masks its loss with it.
        kwargs = dict(labels=inputs.labels, loss_mask=inputs.loss_mask)
        if pass_packed_seq_params:
            kwargs["packed_seq_params"] = inputs.packed_seq_params
        correct_tokens = None
        reading_logits = contextlib.nullcontext()
        if config.token_accuracy and topo.last_stage:
            correct_tokens = CorrectTokens(loss_mask=inputs.loss_mask, labels=inputs.labels)
            if takes_output_processor(model):
                kwargs.update(output_processor=output_processor_with_correct_tokens,
                              output_processor_context=correct_tokens)
            elif return_schedule_plan:
                raise ValueError(
                    "--channel-token-accuracy with the combined 1F1B schedule plan needs GPTModel's "
                    "output_processor (megatron-core 0.18 on): drop one of the two"
                )
            else:
                reading_logits = correct_tokens_from_output_layer(model, correct_tokens)
        if return_schedule_plan:
            # The combined 1F1B plan's post-process node calls the same output_processor.
            output = get_attr_wrapped_model(model, "build_schedule_plan")(*args, **kwargs)
        else:
            with reading_logits:
                output = model(*args, **kwargs)
        loss_func = partial(
            channel_loss_func,
            loss_mask=inputs.loss_mask,
            channels=inputs.channels,
            config=config,
            packed_seq_params=inputs.packed_seq_params,
            cp_size=topo.cp_size,
            validate=False,
            correct_tokens=correct_tokens,
        )
        return output, loss_func

    return forward_step
