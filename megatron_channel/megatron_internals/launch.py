"""How a launch script meets ``megatron.training`` in each release: parsing the arguments,
the model's config or provider, and the ``pretrain()`` call.

=========  ===============================  ===========================  ==========================
release    arguments                        model                        ``pretrain(...)``
=========  ===============================  ===========================  ==========================
0.17       ``parse_args``; validated inside GPT: our provider (no hybrid)  ``(provider, model_provider,
           ``pretrain()``, which is handed                               model_type, forward_step)``
           the launch's namespace
0.18       ``parse_and_validate_args``      our provider (GPT, hybrid)   ``(container, provider,
                                                                         model_provider, ...)``
0.19, on   ``parse_and_validate_args``      the container's model config ``(container, provider,
                                            (Megatron's builders)        model_type, forward_step)``
=========  ===============================  ===========================  ==========================

The columns come from ``releases.MegatronRelease``; the providers from ``launch.models``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from .patches import apply_patch
from .releases import MegatronInternalsError, MegatronRelease


def parse_megatron_args(release: MegatronRelease, extra_args_provider: Callable):
    """Megatron's arguments plus ``extra_args_provider``'s, from ``sys.argv``.

    From 0.18 parsed and validated (and set as Megatron's global arguments), as Megatron-LM's
    launch scripts do. 0.17 validates inside ``pretrain()``: parsed only here, and
    ``hand_args_to_pretrain`` gives ``pretrain()`` this very namespace.
    """
    from megatron.training import arguments

    if release.config_container:
        return arguments.parse_and_validate_args(extra_args_provider=extra_args_provider)
    return arguments.parse_args(extra_args_provider=extra_args_provider)


def hand_args_to_pretrain(args):
    """0.17: make ``initialize_megatron`` (inside ``pretrain()``) take ``args`` instead of parsing
    ``sys.argv`` again, so what the launch set on them (``--cpu``'s choices) reaches training.
    Returns the ``Patch``; undo it once ``pretrain()`` returned."""
    from megatron.training import initialize

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return args

    return apply_patch(initialize, {"parse_args": parse_args},
                       reason="megatron-core 0.17: pretrain() validates the launch's parsed arguments")


def model_config(release: MegatronRelease, args, hybrid: bool):
    """The container's model config where Megatron builds the model itself (0.19 on), else None."""
    if not release.model_provider_optional:
        return None
    from megatron.training import argument_utils

    if hybrid:
        return argument_utils.hybrid_config_from_args(args) if release.hybrid_model else None
    return argument_utils.gpt_config_from_args(args) if release.gpt_config_builder else None


def run_pretrain(release: MegatronRelease, args, datasets_provider, forward_step, model_provider: Callable | None,
                 model_cfg=None) -> None:
    """``megatron.training.pretrain`` in this release's calling convention.

    Args:
        model_provider: ``(pre_process, post_process, vp_stage=None, config=None, pg_collection=None)
            -> model``; needed where ``release.model_provider_optional`` is False.
        model_cfg: ``model_config(...)``, for a release that builds the model from it.
    """
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    if model_provider is None and not release.model_provider_optional:
        raise MegatronInternalsError(f"megatron-core {release.name}'s pretrain() needs a model_provider")
    common = dict(train_valid_test_dataset_provider=datasets_provider, model_type=ModelType.encoder_or_decoder,
                  forward_step_func=forward_step)
    if model_provider is not None:
        common["model_provider"] = model_provider
    if not release.config_container:
        patch = hand_args_to_pretrain(args)
        try:
            pretrain(**common)
        except BaseException:
            with contextlib.suppress(RuntimeError):  # keep pretrain()'s own error in view
                patch.undo()
            raise
        patch.undo()
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    pretrain(pretrain_cfg_container_from_args(args, model_cfg), **common)
