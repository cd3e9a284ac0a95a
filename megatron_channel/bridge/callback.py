"""``ChannelCallback``: Bridge callbacks that reduce, log and record the rows ``ChannelForwardStep`` captured.

* ``on_train_step_end`` (after ``train_step``, before Bridge's ``training_log``): keeps the
  iteration's last ``get_num_microbatches()`` rows (a rerun of the iteration counts once, as
  stock ``lm loss``), does ONE float64 all-reduce over data-parallel x context-parallel, and adds
  the totals of every non-skipped iteration to the console, TensorBoard and whole-run windows
  (``ChannelAccountant``). At Bridge's log interval the channel fields go into Bridge's own
  iteration line and a ``TrainRecord`` into the jsonl; at its TensorBoard interval the scalars
  go to Bridge's TensorBoard and W&B loggers (losses also ``... vs samples``, as ``lm loss``).
* ``on_eval_end`` / ``on_test_end``: one all-reduce; the exact losses of the channels that had
  tokens go into Bridge's ``total_loss_dict``, so Bridge prints them and writes
  ``loss_<name> validation`` to TensorBoard, W&B, MLflow and Comet like ``lm loss``; token
  counts, shares and accuracies are added to its validation line, TensorBoard and W&B; a
  ``ValidationRecord`` goes into the jsonl. Bridge writes test results under the
  ``validation`` tags too; the jsonl keeps ``split: "test"``.

The console fields reach Bridge's lines through one patch (``megatron_internals.patches``) of
the module-global ``print_rank_last`` that ``training_log`` and ``evaluate_and_print_results``
call; every number is computed before that, and without the patch only the console misses them.
"""

from __future__ import annotations

import importlib
import os

import torch
from megatron.bridge.training.callbacks import Callback
from megatron.core.num_microbatches_calculator import get_num_microbatches

from ..channel_logging.jsonl_schema import train_record, validation_record
from ..channel_logging.log_fields import (
    console_fields,
    insert_into_iteration_line,
    is_iteration_line,
    is_validation_line,
    train_scalars,
    validation_console_fields,
    validation_scalars,
)
from ..channel_logging.metric_capture import ChannelMetricsError, all_reduce_totals, dp_cp_group
from ..channel_logging.windows import ChannelStats
from ..channel_logging.wrappers import (
    ChannelLoggingState,
    check_iteration_line_seen,
    wrap_print_rank_last,
    write_scalars,
)
from ..megatron_internals.patches import Patch, apply_patch, find_patch
from ..megatron_internals.releases import MegatronInternalsError
from .forward_step import ChannelForwardStep
from .internals import PRINTING_MODULES

JSONL_NAME = "channels.jsonl"
_DEFAULT = object()


class ChannelCallback(Callback):
    """Logs the channels of ``forward_step`` (the ``ChannelForwardStep`` given to ``pretrain``).

    Args:
        forward_step: the forward step whose captured rows this callback reduces.
        jsonl_path: where the last rank appends the records; default ``channels.jsonl`` in
            ``cfg.logger.tensorboard_dir`` (none without one); None: no jsonl.
    """

    def __init__(self, forward_step: ChannelForwardStep, *, jsonl_path: str | None = _DEFAULT):
        if not isinstance(forward_step, ChannelForwardStep):
            raise TypeError(f"ChannelCallback takes the ChannelForwardStep given to pretrain(), got "
                            f"{type(forward_step).__name__}")
        self.step = forward_step
        self.config = forward_step.config
        self.logging = ChannelLoggingState(self.config, None if jsonl_path is _DEFAULT else jsonl_path)
        self._jsonl_default = jsonl_path is _DEFAULT
        self._patches: list[Patch] = []
        self._awaiting_line: list[bool] = []  # [seen] of the iteration line an edit waits for

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, context) -> None:
        self._start(context)

    def _start(self, context) -> None:
        cfg = context.state.cfg
        if getattr(cfg.model, "cuda_graph_impl", None) == "full_iteration":
            raise MegatronInternalsError(
                "cuda_graph_impl='full_iteration' replays the whole iteration without calling the loss "
                "function in Python, so the channel rows are never computed; use another cuda_graph_impl"
            )
        self.step.prepare(cfg)
        if self._jsonl_default:
            self._jsonl_default = False
            directory = cfg.logger.tensorboard_dir
            self.logging.jsonl_path = os.path.join(directory, JSONL_NAME) if directory else None
        if not self._patches:
            for name in PRINTING_MODULES:
                module = importlib.import_module(name)
                previous = find_patch(module, "print_rank_last")
                if previous is not None:  # another ChannelCallback of this process
                    previous.undo()
                self._patches.append(apply_patch(
                    module, {"print_rank_last": wrap_print_rank_last(module.print_rank_last, self.logging)},
                    reason="megatron_channel: channel fields in Bridge's console lines"))

    def close(self) -> None:
        """Undo the console patch (the logging of numbers needs none)."""
        for patch in self._patches:
            patch.undo()
        self._patches.clear()

    # ------------------------------------------------------------------ training
    def on_train_step_start(self, context) -> None:
        self.step.split = "train"
        self.step.take_captured()

    def on_train_step_end(self, context) -> None:
        rows = self.step.take_captured()
        self._check_last_line()
        if not context.loss_dict:  # not the last pipeline stage (or Bridge is exiting)
            return
        if not rows:
            raise ChannelMetricsError(
                "Bridge reported losses but ChannelForwardStep saw no loss_func call: pass the same "
                "ChannelForwardStep to pretrain() and to ChannelCallback"
            )
        # The rerun state machine may run the iteration again: the last attempt's rows count.
        totals = all_reduce_totals(rows[-get_num_microbatches():], dp_cp_group(context.model))
        accountant = self.logging.accountant
        if not context.skipped_iter:
            accountant.add_iteration(totals)
        state = context.state
        iteration = state.train_state.step + 1  # the number training_log is about to print
        consumed = state.train_state.consumed_train_samples + _samples_per_iteration(state.cfg)
        logger_config = state.cfg.logger
        if iteration % logger_config.log_interval == 0:
            report = accountant.console_report()
            if report is not None:
                fields = console_fields(report, self.config)
                self._awaiting_line = self._edit_next_line(
                    is_iteration_line, lambda line: insert_into_iteration_line(line, fields))
                self.logging.write_record(train_record(report, iteration, consumed))
        if iteration % logger_config.tensorboard_log_interval == 0:
            report = accountant.tensorboard_report()
            if report is not None:
                write_scalars(state.tensorboard_logger, state.wandb_logger, train_scalars(report, self.config),
                              iteration, samples=consumed, vs_samples_keys=set(self.config.metric_keys()))

    # ------------------------------------------------------------------ evaluation
    def on_eval_start(self, context) -> None:
        self.step.split = "validation"
        self.step.take_captured()

    def on_test_start(self, context) -> None:
        self.step.split = "test"
        self.step.take_captured()

    def on_eval_end(self, context) -> None:
        self._evaluated(context, "validation")

    def on_test_end(self, context) -> None:
        self._evaluated(context, "test")

    def _evaluated(self, context, split: str) -> None:
        rows = self.step.take_captured()
        self.step.split = None
        if self.step.tables is None:  # an evaluation-only run: on_train_start never fired
            self._start(context)
        if not context.total_loss_dict:  # not the last pipeline stage, or a time limit
            return
        if not rows:
            raise ChannelMetricsError(
                f"Bridge reported {split} losses but ChannelForwardStep saw no loss_func call: pass the same "
                "ChannelForwardStep to pretrain() and to ChannelCallback"
            )
        totals = all_reduce_totals(rows, dp_cp_group(context.model))
        stats = ChannelStats.from_totals(self.config.channels, totals.cpu())
        for i, key in enumerate(self.config.metric_keys()):
            loss = stats.loss(i)
            if loss is not None:  # a channel without tokens is left out, never 0/0
                context.total_loss_dict[key] = torch.tensor(loss, dtype=torch.float64)
        fields = validation_console_fields(stats, self.config)
        self._edit_next_line(is_validation_line, lambda line: line + fields)
        state = context.state
        write_scalars(state.tensorboard_logger, state.wandb_logger, validation_scalars(stats, self.config),
                      state.train_state.step)
        self.logging.write_record(validation_record(stats, state.train_state.step, split=split,
                                                    consumed_samples=state.train_state.consumed_train_samples))

    # ------------------------------------------------------------------ output
    def _edit_next_line(self, is_line, edit) -> list[bool]:
        """Apply ``edit`` to the next console line ``is_line`` accepts, then stop editing; returns
        ``[seen]``, which turns True when that line was printed."""
        seen = [False]

        def edit_once(message):
            if not seen[0] and is_line(message):
                seen[0] = True
                self.logging.print_edit = None
                return edit(message)
            return message

        self.logging.print_edit = edit_once
        return seen

    def _check_last_line(self) -> None:
        """Warn (once, after two log intervals) when Bridge's iteration lines are not recognised."""
        if self._awaiting_line:
            check_iteration_line_seen(self.logging, self._awaiting_line[0], True)
        self._awaiting_line = []
        self.logging.print_edit = None


def _samples_per_iteration(cfg) -> int:
    """What Bridge adds to ``consumed_train_samples`` after this iteration: dp x mbs x microbatches."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size() * cfg.train.micro_batch_size * get_num_microbatches()
