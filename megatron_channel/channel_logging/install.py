"""``install_channel_logging``: put the wrappers of ``wrappers`` into ``megatron.training.training``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ChannelConfig
from ..megatron_internals.loop import WRAPPED_PARAMETERS, check_megatron_internals, training_module
from ..megatron_internals.patches import Patch, apply_patch, original_of
from ..megatron_internals.releases import installed_version, is_tested
from .wrappers import (
    ChannelLoggingState,
    wrap_evaluate,
    wrap_evaluate_and_print_results,
    wrap_print_rank_last,
    wrap_train_step,
    wrap_training_log,
)


@dataclass
class _Installation:
    state: ChannelLoggingState
    patch: Patch


_INSTALLED: _Installation | None = None


def install_channel_logging(config: ChannelConfig, *, jsonl_path: str | None = None) -> None:
    """Log per-channel losses and token counts from Megatron's training loop.

    Call once in the launch script before ``pretrain()``. Checks the installed megatron-core
    first (``MegatronInternalsError`` naming what changed; see ``megatron_internals``).
    Installing again with the same arguments does nothing; with other arguments it replaces
    the previous installation (and its counters). Never wraps twice.

    Args:
        config: the same ``ChannelConfig`` given to ``make_forward_step``.
        jsonl_path: if set, the last rank appends one JSON object per console log line and
            per evaluated set to this file (created with its parent directories).
    """
    global _INSTALLED
    if not isinstance(config, ChannelConfig):
        raise TypeError(f"config must be a ChannelConfig, got {type(config).__name__}")
    if jsonl_path is not None:
        jsonl_path = os.fspath(jsonl_path)
        if os.path.isdir(jsonl_path):
            raise ValueError(f"jsonl_path={jsonl_path!r} is a directory; give a file path, e.g. {jsonl_path}/channels.jsonl")
    if _INSTALLED is not None:
        if (_INSTALLED.patch.applied and _INSTALLED.state.config == config
                and _INSTALLED.state.jsonl_path == jsonl_path):
            return
        uninstall_channel_logging()

    module = training_module()
    release = check_megatron_internals(module)
    originals = {name: original_of(getattr(module, name)) for name in (*WRAPPED_PARAMETERS, "print_rank_last")}
    state = ChannelLoggingState(config, jsonl_path)
    wrappers = {
        "train_step": wrap_train_step(originals["train_step"], state),
        "training_log": wrap_training_log(originals["training_log"], state, module),
        "evaluate": wrap_evaluate(originals["evaluate"], state),
        "evaluate_and_print_results": wrap_evaluate_and_print_results(
            originals["evaluate_and_print_results"], state, module
        ),
        "print_rank_last": wrap_print_rank_last(originals["print_rank_last"], state),
    }
    version = installed_version()
    loop = release.name if is_tested(version) else f"{'.'.join(map(str, version))}, run as {release.name}"
    patch = apply_patch(module, wrappers, reason=f"per-channel logging, megatron-core {loop} loop")
    _INSTALLED = _Installation(state, patch)


def uninstall_channel_logging() -> None:
    """Put Megatron's original functions back (no-op when not installed)."""
    global _INSTALLED
    if _INSTALLED is None:
        return
    _INSTALLED.patch.undo()  # no-op when undone already (undo_all_patches)
    _INSTALLED = None


def installed_channel_logging() -> ChannelLoggingState | None:
    """The installed logging's state (its windows and pending totals), or None."""
    return _INSTALLED.state if _INSTALLED is not None and _INSTALLED.patch.applied else None
