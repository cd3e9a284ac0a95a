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
  whole run. While the original runs, the module's ``print_rank_last`` (replaced by
  ``wrap_print_rank_last`` for as long as the logging is installed) inserts the channel
  fields into the iteration line after ``lm loss``; TensorBoard and
  W&B get the values through Megatron's own writers. Like Megatron's, the first iteration's
  console line does not reset the interval, so the next line covers it again.
* ``evaluate`` wrapper: same capture; one all-reduce per evaluation; puts the exact channel
  losses (channels with tokens only) into the returned ``total_loss_dict``, so stock
  ``evaluate_and_print_results`` prints them and writes ``loss_math validation`` exactly as
  it does ``lm loss validation``. Channel values are token-weighted even with ``--sft``
  (where stock ``lm loss`` averages per-microbatch means).
* ``evaluate_and_print_results`` wrapper: appends validation token counts to the printed
  line, writes them to TensorBoard / W&B and writes the jsonl records (last rank only).

If Megatron's console lines are worded differently from 0.17 to 0.19's (a newer release), the
fields cannot be placed: ``training_log`` warns after ``UNRECOGNISED_LINE_INTERVALS`` log
intervals without a recognised iteration line, and ``evaluate_and_print_results`` after an
evaluation without a recognised validation line (``ChannelLoggingWarning``, once each).

Names and formats of what they write: ``megatron_channel.names``, ``log_fields``, ``jsonl_schema``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import ChannelConfig
from .jsonl_schema import Record, append_jsonl, train_record, validation_record
from .log_fields import (
    console_fields,
    insert_into_iteration_line,
    is_iteration_line,
    is_validation_line,
    train_scalars,
    validation_console_fields,
    validation_scalars,
)
from ..megatron_internals.loop import TEST_SET_PREFIX_END, TRAIN_STEP_RESULT_LENGTH, megatron_args, support_hint
from ..megatron_internals.releases import MegatronInternalsError
from .metric_capture import ChannelMetricsError, all_reduce_totals, capturing_forward_step, dp_cp_group
from ..names import VS_SAMPLES
from .windows import ChannelAccountant, ChannelReport, ChannelStats


UNRECOGNISED_LINE_INTERVALS = 2


class ChannelLoggingWarning(UserWarning):
    """The channel fields could not be placed in Megatron's console output."""


@dataclass
class ChannelLoggingState:
    """What the four wrappers share.

    Attributes:
        config: the channels.
        jsonl_path: where the last rank appends the records, or None.
        accountant: the console, TensorBoard and whole-run windows.
        pending_train_totals: the totals table (``windows``) of the iteration train_step just ran,
            for training_log.
        pending_evals: one ``ChannelStats`` per evaluate call, for evaluate_and_print_results.
        print_edit: while a wrapped function runs, what ``wrap_print_rank_last`` applies to
            each message before printing it; None otherwise.
        mixture: the channel mixture (``mixture.runtime.MixtureRuntime``), told of every
            iteration's totals and every evaluation; None without one.
        iteration_line_seen: a Megatron iteration line was recognised at least once.
        intervals_without_line: log intervals that ended with no recognised iteration line.
        warned: the warnings already given (each at most once).
    """

    config: ChannelConfig
    jsonl_path: str | None = None
    accountant: ChannelAccountant = field(init=False)
    pending_train_totals: Tensor | None = None
    pending_evals: list[ChannelStats] = field(default_factory=list)
    print_edit: Callable[[object], object] | None = None
    mixture: object | None = None
    iteration_line_seen: bool = False
    intervals_without_line: int = 0
    warned: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.accountant = ChannelAccountant(self.config)

    def write_record(self, record: Record) -> None:
        if self.jsonl_path is not None and is_last_rank():
            append_jsonl(self.jsonl_path, record)

    def warn_once(self, what: str, message: str) -> None:
        if what not in self.warned and is_last_rank():
            self.warned.add(what)
            warnings.warn(message, ChannelLoggingWarning, stacklevel=3)


def is_last_rank() -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == dist.get_world_size() - 1


def wrap_train_step(original: Callable, state: ChannelLoggingState) -> Callable:
    """``train_step`` that hands the iteration's exact global channel totals to ``state``."""
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
            bound.arguments["forward_step_func"], state.config, captured
        )
        bound.arguments["forward_backward_func"] = forward_backward_restarting_capture
        state.pending_train_totals = None
        result = original(*bound.args, **bound.kwargs)
        if not (isinstance(result, tuple) and len(result) == TRAIN_STEP_RESULT_LENGTH
                and isinstance(result[0], dict)):
            raise MegatronInternalsError(
                f"megatron.training.training.train_step returned {type(result).__name__} "
                f"of length {len(result) if isinstance(result, tuple) else '?'}; expected its "
                f"{TRAIN_STEP_RESULT_LENGTH}-tuple starting with the loss dict. {support_hint()}"
            )
        if result[0]:  # last pipeline stage, with losses: every dp x cp peer is here too
            if not captured:
                raise ChannelMetricsError(
                    "train_step reported losses but no loss_func call was seen: the forward step "
                    "must return make_forward_step's loss_func, called by Megatron in Python"
                )
            state.pending_train_totals = all_reduce_totals(captured, dp_cp_group(bound.arguments["model"]))
        return result

    return train_step


def _refuse_full_iteration_graphs() -> None:
    args = megatron_args()
    if args is not None and getattr(args, "cuda_graph_impl", None) == "full_iteration":
        raise MegatronInternalsError(
            "--cuda-graph-impl full_iteration replays the whole iteration without calling loss_func in "
            "Python, so per-channel logging cannot see any metrics; use another --cuda-graph-impl or "
            "do not call install_channel_logging"
        )


def wrap_print_rank_last(original: Callable, state: ChannelLoggingState) -> Callable:
    """``print_rank_last`` that prints ``state.print_edit(message)`` while a wrapper sets one."""

    @functools.wraps(original)
    def print_rank_last(message):
        edit = state.print_edit
        return original(message if edit is None else edit(message))

    return print_rank_last


@contextlib.contextmanager
def editing_prints(state: ChannelLoggingState, edit: Callable[[object], object]):
    """While the block runs, ``wrap_print_rank_last`` prints ``edit(message)``."""
    previous, state.print_edit = state.print_edit, edit
    try:
        yield
    finally:
        state.print_edit = previous


def wrap_training_log(original: Callable, state: ChannelLoggingState, module) -> Callable:
    """``training_log`` that also logs the channels (``module``: where its ``get_args`` and writers live)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def training_log(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        iteration = bound.arguments["iteration"]
        is_first = bool(bound.arguments["is_first_iteration"])
        totals, state.pending_train_totals = state.pending_train_totals, None
        if bound.arguments["skipped_iter"]:
            totals = None
        if totals is not None:
            state.accountant.add_iteration(totals)

        margs = module.get_args()
        console: list[ChannelReport] = []

        line_seen = [False]

        def with_channels(message):
            if not line_seen[0] and is_iteration_line(message):
                line_seen[0] = True
                # Taken when the line is printed, so the interval resets exactly when Megatron's does.
                report = state.accountant.console_report(reset=not is_first)
                if report is not None:
                    console.append(report)
                    message = insert_into_iteration_line(message, console_fields(report, state.config))
            return message

        with editing_prints(state, with_channels):
            result = original(*bound.args, **bound.kwargs)
        check_iteration_line_seen(state, line_seen[0], iteration % margs.log_interval == 0)

        if console:
            state.write_record(train_record(console[0], iteration, getattr(margs, "consumed_train_samples", None)))
        if iteration % margs.tensorboard_log_interval == 0:
            report = state.accountant.tensorboard_report()
            if report is not None:
                write_scalars(module.get_tensorboard_writer(), module.get_wandb_writer(),
                              train_scalars(report, state.config), iteration, samples=margs.consumed_train_samples,
                              vs_samples_keys=set(state.config.metric_keys()))
        if state.mixture is not None:
            state.mixture.after_iteration(iteration, totals, margs)
        return result

    return training_log


def check_iteration_line_seen(state: ChannelLoggingState, seen: bool, interval_ended: bool) -> None:
    """Warn once when the first log intervals printed no iteration line this logging recognises."""
    if seen:
        state.iteration_line_seen = True
    elif interval_ended and not state.iteration_line_seen:
        state.intervals_without_line += 1
        if state.intervals_without_line >= UNRECOGNISED_LINE_INTERVALS:
            state.warn_once(
                "iteration line",
                f"no Megatron iteration line (' iteration N/ M | ...') was recognised in the first "
                f"{state.intervals_without_line} log intervals, so the console shows no channel fields; "
                "TensorBoard, W&B and the jsonl still get them. megatron_channel reads megatron-core "
                "0.17 to 0.19's console format: install one of those, or read the channels from TensorBoard or the jsonl",
            )


def write_scalars(writer, wandb_writer, scalars: dict[str, float], step: int, *, samples: int | None = None,
                  vs_samples_keys=()) -> None:
    """``scalars`` at ``step`` to a TensorBoard writer and a W&B run (either may be None); the names
    in ``vs_samples_keys`` also as ``<name> vs samples`` at ``samples``, as Megatron logs ``lm loss``."""
    if writer:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
            if samples is not None and name in vs_samples_keys:
                writer.add_scalar(name + VS_SAMPLES, value, samples)
    if wandb_writer and scalars:
        wandb_writer.log(dict(scalars), step)


def wrap_evaluate(original: Callable, state: ChannelLoggingState) -> Callable:
    """``evaluate`` whose ``total_loss_dict`` holds exact channel losses (channels with tokens only)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        captured: list[Tensor] = []
        bound.arguments["forward_step_func"] = capturing_forward_step(
            bound.arguments["forward_step_func"], state.config, captured
        )
        result = original(*bound.args, **bound.kwargs)
        total_loss_dict, _, timelimit = result
        if timelimit or total_loss_dict is None or not captured:
            return result
        totals = all_reduce_totals(captured, dp_cp_group(bound.arguments["model"]))
        stats = ChannelStats.from_totals(state.config.channels, totals.cpu())
        for i, key in enumerate(state.config.metric_keys()):
            loss = stats.loss(i)
            if loss is not None:
                total_loss_dict[key] = torch.tensor(loss, dtype=torch.float64)
        state.pending_evals.append(stats)
        if state.mixture is not None:
            state.mixture.after_evaluation([stats.loss(i) for i in range(len(state.config.channels))])
        return result

    return evaluate


def validation_suffixes(margs, count: int) -> list[str]:
    """Megatron's ``validation<suffix>`` suffix of each evaluated set, in order."""
    if not getattr(margs, "multiple_validation_sets", False):
        return [""] * count
    names = getattr(margs, "validation_set_names", None)
    return [f"-{names[i]}" if names else f"-{i}" for i in range(count)]


def wrap_evaluate_and_print_results(original: Callable, state: ChannelLoggingState, module) -> Callable:
    """``evaluate_and_print_results`` that also shows, writes and records validation tokens."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate_and_print_results(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        state.pending_evals.clear()
        printed = [0]

        def with_tokens(message):
            # The i-th " validation... loss at ..." line belongs to the i-th evaluate call.
            if is_validation_line(message) and printed[0] < len(state.pending_evals):
                message += validation_console_fields(state.pending_evals[printed[0]], state.config)
                printed[0] += 1
            return message

        with editing_prints(state, with_tokens):
            result = original(*bound.args, **bound.kwargs)

        evals, state.pending_evals = list(state.pending_evals), []
        if evals and printed[0] == 0:
            state.warn_once(
                "validation line",
                "no Megatron validation line (' validation loss at ... |') was recognised, so the console "
                "shows no channel token counts for this evaluation; the losses, TensorBoard, W&B and the "
                "jsonl are unaffected. megatron_channel reads megatron-core 0.17 to 0.19's console format",
            )
        margs = module.get_args()
        iteration = bound.arguments["iteration"]
        split = "test" if str(bound.arguments["prefix"]).endswith(TEST_SET_PREFIX_END) else "validation"
        for stats, suffix in zip(evals, validation_suffixes(margs, len(evals))):
            if bound.arguments["write_to_tensorboard"]:
                write_scalars(module.get_tensorboard_writer(), module.get_wandb_writer(),
                              validation_scalars(stats, state.config, suffix), iteration)
            state.write_record(validation_record(
                stats, iteration, split=split, set_suffix=suffix,
                consumed_samples=getattr(margs, "consumed_train_samples", None),
            ))
        writer = module.get_tensorboard_writer()
        if writer and bound.arguments["write_to_tensorboard"]:
            # pretrain() flushes only when train() ends; the final evaluation comes after that,
            # and its points (Megatron's and ours) would be lost when the process exits.
            writer.flush()
        return result

    return evaluate_and_print_results
