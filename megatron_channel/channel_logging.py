"""Per-channel losses and token counts in Megatron's console line, TensorBoard, W&B and a jsonl.

Call ``install_channel_logging(config)`` in the launch script before ``pretrain()``. It
replaces four functions of ``megatron.training.training`` (the module globals that
``train()`` and ``pretrain()`` look up at call time) with thin wrappers around the
originals, after checking that the installed megatron-core is the 0.19 line whose internals
these wrappers were written against. ``uninstall_channel_logging()`` puts the originals back.

Why: stock ``train_step`` turns a channel key whose global token count is 0 into NaN
(0 / 0) for that iteration; ``training_log`` averages per-iteration values over the log
interval without token weights and hides the key for the whole interval after one NaN;
TensorBoard and W&B get the raw per-iteration value, NaN included; ``evaluate`` divides
``sum / count`` at the end (NaN when a channel never had validation tokens).

Mechanism: inside ``forward_step`` / ``loss_func`` it adds one small ``torch.stack`` per
microbatch and no host sync or collective; per iteration, one float64 all-reduce of
``K + 1`` pairs; the window sums stay on the device until a log point reads them.
The parts, one module each:

* ``capture``: takes the channel keys out of ``loss_func``'s metrics; one all-reduce per
  iteration.
* ``accounting``: exact token-weighted windows (console interval, TensorBoard interval,
  whole run).
* ``log_format``: the names, console fields, TensorBoard / W&B scalars and jsonl records.
* ``training_wrappers``: the four wrappers.
* ``megatron_check``: the installed-megatron-core checks run at install time.

This module installs and uninstalls the wrappers and re-exports the public names of the
others.

Not supported (refused with an error naming it): ``--cuda-graph-impl full_iteration``
(replayed graphs never call ``loss_func`` in Python, so nothing could be captured).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .accounting import LM_LOSS_KEY, ChannelAccountant, ChannelReport, ChannelStats, TotalsWindow
from .capture import (
    ChannelMetricsError,
    capturing_forward_step,
    capturing_loss_func,
    dp_cp_group,
    reduce_captured,
    split_channel_metrics,
)
from .config import ChannelConfig
from .log_format import (
    ALL_TOKENS_NAME,
    CUMULATIVE,
    append_jsonl,
    console_fields,
    insert_into_iteration_line,
    is_iteration_line,
    share_name,
    tokens_name,
    train_record,
    train_scalars,
    validation_console_fields,
    validation_record,
    validation_scalars,
)
from .megatron_check import (
    EXPECTED_GLOBAL_LOOKUPS,
    EXPECTED_SIGNATURES,
    SUPPORTED_MEGATRON,
    MegatronInternalsError,
    check_global_lookups,
    check_megatron_internals,
    check_megatron_version,
    check_signature,
    unwrapped,
)
from .training_wrappers import (
    ChannelLogger,
    validation_suffixes,
    wrap_evaluate,
    wrap_evaluate_and_print_results,
    wrap_train_step,
    wrap_training_log,
)

__all__ = [
    "ALL_TOKENS_NAME",
    "CUMULATIVE",
    "EXPECTED_GLOBAL_LOOKUPS",
    "EXPECTED_SIGNATURES",
    "LM_LOSS_KEY",
    "SUPPORTED_MEGATRON",
    "ChannelAccountant",
    "ChannelLogger",
    "ChannelMetricsError",
    "ChannelReport",
    "ChannelStats",
    "MegatronInternalsError",
    "TotalsWindow",
    "append_jsonl",
    "capturing_forward_step",
    "capturing_loss_func",
    "check_global_lookups",
    "check_megatron_internals",
    "check_megatron_version",
    "check_signature",
    "console_fields",
    "dp_cp_group",
    "insert_into_iteration_line",
    "install_channel_logging",
    "installed_channel_logger",
    "is_iteration_line",
    "reduce_captured",
    "share_name",
    "split_channel_metrics",
    "tokens_name",
    "train_record",
    "train_scalars",
    "uninstall_channel_logging",
    "validation_console_fields",
    "validation_record",
    "validation_scalars",
    "validation_suffixes",
    "wrap_evaluate",
    "wrap_evaluate_and_print_results",
    "wrap_train_step",
    "wrap_training_log",
]


@dataclass
class _Installation:
    logger: ChannelLogger
    module: object
    originals: dict[str, Callable]
    wrappers: dict[str, Callable]


_INSTALLED: _Installation | None = None


def install_channel_logging(config: ChannelConfig, *, jsonl_path: str | None = None) -> None:
    """Log per-channel losses and token counts from Megatron's training loop.

    Call once in the launch script before ``pretrain()``. Checks the installed megatron-core
    first (``MegatronInternalsError`` naming what changed). Installing again with the same
    arguments does nothing; with other arguments it replaces the previous installation (and
    its counters). Never wraps twice.

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
        if _INSTALLED.logger.config == config and _INSTALLED.logger.jsonl_path == jsonl_path:
            return
        uninstall_channel_logging()

    import megatron.training.training as module

    check_megatron_internals(module)
    originals = {name: unwrapped(getattr(module, name)) for name in EXPECTED_SIGNATURES}
    logger = ChannelLogger(config, jsonl_path)
    wrappers = {
        "train_step": wrap_train_step(originals["train_step"], logger),
        "training_log": wrap_training_log(originals["training_log"], logger, module),
        "evaluate": wrap_evaluate(originals["evaluate"], logger),
        "evaluate_and_print_results": wrap_evaluate_and_print_results(
            originals["evaluate_and_print_results"], logger, module
        ),
    }
    for name, wrapper in wrappers.items():
        setattr(module, name, wrapper)
    _INSTALLED = _Installation(logger, module, originals, wrappers)


def uninstall_channel_logging() -> None:
    """Put Megatron's original functions back (no-op when not installed)."""
    global _INSTALLED
    if _INSTALLED is None:
        return
    replaced = [n for n, w in _INSTALLED.wrappers.items() if getattr(_INSTALLED.module, n) is not w]
    if replaced:
        raise RuntimeError(
            f"megatron.training.training.{replaced} were replaced after install_channel_logging, "
            "which would be lost; undo those replacements first"
        )
    for name, original in _INSTALLED.originals.items():
        setattr(_INSTALLED.module, name, original)
    _INSTALLED = None


def installed_channel_logger() -> ChannelLogger | None:
    """The active logger (its accountant and pending totals), or None."""
    return _INSTALLED.logger if _INSTALLED is not None else None
