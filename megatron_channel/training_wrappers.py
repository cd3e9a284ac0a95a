"""Wrappers around four functions of ``megatron.training.training`` that log the channels.

* ``train_step`` wrapper: wraps the ``forward_step_func`` it receives with
  ``capturing_forward_step``, so the channel keys never reach stock code. It also wraps the
  ``forward_backward_func`` it receives only to clear the capture at the start of every
  forward-backward pass: when the rerun state machine repeats an iteration, only the last
  attempt counts, as for stock ``lm loss``. After the original returns with losses (last
  pipeline stage), ONE float64 all-reduce of the summed ``[K + 1, 2]`` tensor over the
  data-parallel x context-parallel group gives the exact global totals of the iteration,
  handed to the ``training_log`` wrapper. Taking the keys out at ``loss_func`` (rather than
  out of train_step's returned dict) spares the K stock all-reduces and lets ``evaluate``,
  which builds its own ``forward_backward_func``, use the same capture.
* ``training_log`` wrapper: adds the totals of every non-skipped iteration (skipped
  iterations are left out, as Megatron leaves them out of ``lm loss``) to three float64
  windows of a ``ChannelAccountant``: the console interval, the TensorBoard interval and the
  whole run. While the original runs, the module-level ``print_rank_last`` is swapped for one
  that inserts the channel fields into the iteration line after ``lm loss``; TensorBoard and
  W&B get the values through Megatron's own writers. Like Megatron's, the first iteration's
  console line does not reset the interval, so the next line covers it again.
* ``evaluate`` wrapper: same capture; one all-reduce per evaluation; puts the exact channel
  losses (channels with tokens only) into the returned ``total_loss_dict``, so stock
  ``evaluate_and_print_results`` prints them and writes ``loss_math validation`` exactly as
  it does ``lm loss validation``. Channel values are token-weighted even with ``--sft``
  (where stock ``lm loss`` averages per-microbatch means).
* ``evaluate_and_print_results`` wrapper: appends validation token counts to the printed
  line, writes them to TensorBoard / W&B and writes the jsonl records (last rank only).

Names and formats of what they write: ``log_format``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .accounting import ChannelAccountant, ChannelReport, ChannelStats
from .capture import ChannelMetricsError, capturing_forward_step, dp_cp_group, reduce_captured
from .config import ChannelConfig
from .log_format import (
    append_jsonl,
    console_fields,
    insert_into_iteration_line,
    is_iteration_line,
    train_record,
    train_scalars,
    validation_console_fields,
    validation_record,
    validation_scalars,
)
from .megatron_check import SUPPORT_HINT, MegatronInternalsError, mark_wrapper


@dataclass
class ChannelLogger:
    """State shared by the wrappers: the accountant, the iteration handed from train_step to
    training_log, and the evaluations handed from evaluate to evaluate_and_print_results."""

    config: ChannelConfig
    jsonl_path: str | None = None
    accountant: ChannelAccountant = field(init=False)
    pending_train_totals: Tensor | None = None
    pending_evals: list[ChannelStats] = field(default_factory=list)

    def __post_init__(self):
        self.accountant = ChannelAccountant(self.config)

    def write_record(self, record: dict) -> None:
        if self.jsonl_path is not None and _is_last_rank():
            append_jsonl(self.jsonl_path, record)


def _is_last_rank() -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == dist.get_world_size() - 1


def wrap_train_step(original: Callable, logger: ChannelLogger) -> Callable:
    """``train_step`` that hands the iteration's exact global channel totals to ``logger``."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def train_step(*args, **kwargs):
        _refuse_full_iteration_graphs()
        bound = signature.bind(*args, **kwargs)
        captured: list[Tensor] = []
        forward_backward_func = bound.arguments["forward_backward_func"]

        def forward_backward_restarting_capture(*fb_args, **fb_kwargs):
            captured.clear()  # a rerun of the iteration replaces the previous attempt
            return forward_backward_func(*fb_args, **fb_kwargs)

        bound.arguments["forward_step_func"] = capturing_forward_step(
            bound.arguments["forward_step_func"], logger.config, captured
        )
        bound.arguments["forward_backward_func"] = forward_backward_restarting_capture
        logger.pending_train_totals = None
        result = original(*bound.args, **bound.kwargs)
        if not (isinstance(result, tuple) and len(result) == 8 and isinstance(result[0], dict)):
            raise MegatronInternalsError(
                f"megatron.training.training.train_step returned {type(result).__name__} "
                f"of length {len(result) if isinstance(result, tuple) else '?'}; expected its 8-tuple "
                f"starting with the loss dict. {SUPPORT_HINT}"
            )
        if result[0]:  # last pipeline stage, with losses: every dp x cp peer is here too
            if not captured:
                raise ChannelMetricsError(
                    "train_step reported losses but no loss_func call was seen: the forward step "
                    "must return make_forward_step's loss_func, called by Megatron in Python"
                )
            logger.pending_train_totals = reduce_captured(captured, dp_cp_group(bound.arguments["model"]))
        return result

    return mark_wrapper(train_step, original)


def _refuse_full_iteration_graphs() -> None:
    from megatron.training.global_vars import get_args

    try:
        args = get_args()
    except AssertionError:  # args not set: called outside pretrain(), nothing to check
        return
    if getattr(args, "cuda_graph_impl", None) == "full_iteration":
        raise MegatronInternalsError(
            "--cuda-graph-impl full_iteration replays the whole iteration without calling loss_func in "
            "Python, so per-channel logging cannot see any metrics; use another --cuda-graph-impl or "
            "do not call install_channel_logging"
        )


@contextlib.contextmanager
def printing_through(module, edit: Callable[[object], object]):
    """While the block runs, ``module.print_rank_last`` prints ``edit(message)`` instead."""
    print_original = module.print_rank_last
    module.print_rank_last = lambda message: print_original(edit(message))
    try:
        yield
    finally:
        module.print_rank_last = print_original


def wrap_training_log(original: Callable, logger: ChannelLogger, module) -> Callable:
    """``training_log`` that also logs the channels (``module``: where ``print_rank_last`` lives)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def training_log(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        iteration = bound.arguments["iteration"]
        is_first = bool(bound.arguments["is_first_iteration"])
        totals, logger.pending_train_totals = logger.pending_train_totals, None
        if totals is not None and not bound.arguments["skipped_iter"]:
            logger.accountant.add_iteration(totals)

        margs = module.get_args()
        console: list[ChannelReport] = []

        def with_channels(message):
            if not console and is_iteration_line(message):
                # Taken when the line is printed, so the interval resets exactly when Megatron's does.
                report = logger.accountant.console_report(reset=not is_first)
                if report is not None:
                    console.append(report)
                    message = insert_into_iteration_line(message, console_fields(report, logger.config))
            return message

        with printing_through(module, with_channels):
            result = original(*bound.args, **bound.kwargs)

        if console:
            logger.write_record(train_record(console[0], iteration, getattr(margs, "consumed_train_samples", None)))
        if iteration % margs.tensorboard_log_interval == 0:
            report = logger.accountant.tensorboard_report()
            if report is not None:
                _write_scalars(module, train_scalars(report, logger.config), iteration, margs, vs_samples=True,
                               loss_keys=set(logger.config.metric_keys()))
        return result

    return mark_wrapper(training_log, original)


def _write_scalars(module, scalars: dict[str, float], iteration: int, margs, *, vs_samples=False, loss_keys=()):
    writer = module.get_tensorboard_writer()
    wandb_writer = module.get_wandb_writer()
    if writer:
        for name, value in scalars.items():
            writer.add_scalar(name, value, iteration)
            if vs_samples and name in loss_keys:
                writer.add_scalar(name + " vs samples", value, margs.consumed_train_samples)
    if wandb_writer and scalars:
        wandb_writer.log(dict(scalars), iteration)


def wrap_evaluate(original: Callable, logger: ChannelLogger) -> Callable:
    """``evaluate`` whose ``total_loss_dict`` holds exact channel losses (channels with tokens only)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        captured: list[Tensor] = []
        bound.arguments["forward_step_func"] = capturing_forward_step(
            bound.arguments["forward_step_func"], logger.config, captured
        )
        result = original(*bound.args, **bound.kwargs)
        total_loss_dict, _, timelimit = result
        if timelimit or total_loss_dict is None or not captured:
            return result
        totals = reduce_captured(captured, dp_cp_group(bound.arguments["model"]))
        stats = ChannelStats.from_totals(logger.config.channels, totals.cpu())
        for i, key in enumerate(logger.config.metric_keys()):
            loss = stats.loss(i)
            if loss is not None:
                total_loss_dict[key] = torch.tensor(loss, dtype=torch.float64)
        logger.pending_evals.append(stats)
        return result

    return mark_wrapper(evaluate, original)


def validation_suffixes(margs, count: int) -> list[str]:
    """Megatron's ``validation<suffix>`` suffix of each evaluated set, in order."""
    if not getattr(margs, "multiple_validation_sets", False):
        return [""] * count
    names = getattr(margs, "validation_set_names", None)
    return [f"-{names[i]}" if names else f"-{i}" for i in range(count)]


def wrap_evaluate_and_print_results(original: Callable, logger: ChannelLogger, module) -> Callable:
    """``evaluate_and_print_results`` that also shows, writes and records validation tokens."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate_and_print_results(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        logger.pending_evals.clear()
        printed = [0]

        def with_tokens(message):
            # The i-th " validation... loss at ..." line belongs to the i-th evaluate call.
            if isinstance(message, str) and " loss at " in message and printed[0] < len(logger.pending_evals):
                message += validation_console_fields(logger.pending_evals[printed[0]], logger.config)
                printed[0] += 1
            return message

        with printing_through(module, with_tokens):
            result = original(*bound.args, **bound.kwargs)

        evals, logger.pending_evals = list(logger.pending_evals), []
        margs = module.get_args()
        iteration = bound.arguments["iteration"]
        split = "test" if str(bound.arguments["prefix"]).endswith("test set") else "validation"
        for stats, suffix in zip(evals, validation_suffixes(margs, len(evals))):
            if bound.arguments["write_to_tensorboard"]:
                _write_scalars(module, validation_scalars(stats, logger.config, suffix), iteration, margs)
            logger.write_record(validation_record(
                stats, iteration, split=split, set_suffix=suffix,
                consumed_samples=getattr(margs, "consumed_train_samples", None),
            ))
        writer = module.get_tensorboard_writer()
        if writer and bound.arguments["write_to_tensorboard"]:
            # pretrain() flushes only when train() ends; the final evaluation comes after that,
            # and its points (Megatron's and ours) would be lost when the process exits.
            writer.flush()
        return result

    return mark_wrapper(evaluate_and_print_results, original)
