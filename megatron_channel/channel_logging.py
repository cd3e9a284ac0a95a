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

* ``train_step`` wrapper: wraps the ``forward_step_func`` it receives so that every
  ``loss_func`` it returns hands back Megatron's ``(loss, num_tokens, metrics)`` with the
  channel keys taken OUT of ``metrics`` and kept, per microbatch, as one ``[K + 1, 2]`` tensor
  (rows: channels in config order, then ``"lm loss"``; columns: summed per-token loss, loss
  tokens), still on the GPU. So stock code never sees a channel key: no NaN, and none of its
  K per-key all-reduces. It also wraps the ``forward_backward_func`` it receives only to clear
  the capture at the start of every forward-backward pass: when the rerun state machine
  repeats an iteration, only the last attempt counts, as for stock ``lm loss``. After the
  original returns with losses (last pipeline stage), ONE float64 all-reduce of the summed
  ``[K + 1, 2]`` tensor over the data-parallel x context-parallel group gives the exact
  global totals of the iteration, handed to the ``training_log`` wrapper. Taking the keys
  out at ``loss_func`` (rather than out of train_step's returned dict) spares the K stock
  all-reduces and lets ``evaluate``, which builds its own ``forward_backward_func``, use the
  same capture.
* ``training_log`` wrapper: adds the totals of every non-skipped iteration (skipped
  iterations are left out, as Megatron leaves them out of ``lm loss``) to three float64
  windows: the console interval, the TensorBoard interval and the whole run. A window's
  loss for a channel is ``sum of its losses / sum of its tokens``: exact, token-weighted over
  the iterations where the channel had tokens, never 0 / 0 (a channel without tokens in a
  window has no loss value at all). While the original runs, the module-level
  ``print_rank_last`` is swapped for one that inserts the channel fields into the iteration
  line after ``lm loss``; TensorBoard and W&B get the values through Megatron's own writers.
* ``evaluate`` wrapper: same capture; one all-reduce per evaluation; puts the exact channel
  losses (channels with tokens only) into the returned ``total_loss_dict``, so stock
  ``evaluate_and_print_results`` prints them and writes ``loss_math validation`` exactly as
  it does ``lm loss validation``. Channel values are token-weighted even with ``--sft``
  (where stock ``lm loss`` averages per-microbatch means).
* ``evaluate_and_print_results`` wrapper: appends validation token counts to the printed
  line, writes them to TensorBoard / W&B and writes the jsonl records.

Names (``loss_math`` is ``config.prefix + name``; every other name contains a space or a
``tokens_`` prefix, and channel names never contain whitespace, so nothing collides):

* ``loss_math``: token-weighted loss of channel ``math`` over the window (console: the log
  interval; TensorBoard / W&B: the iterations since the previous point, i.e. one iteration
  with the default ``--tensorboard-log-interval 1``). Absent when the channel had no tokens
  there. TensorBoard also gets ``loss_math vs samples``, as Megatron does for ``lm loss``.
* ``tokens_math``: the channel's loss tokens (``loss_mask`` sum) in the window.
* ``tokens_math cumulative``: its loss tokens since logging started in this process (not
  restored from a checkpoint when a run resumes).
* ``token share math`` / ``token share math cumulative``: ``tokens_math / loss tokens``,
  in the window / cumulative.
* ``loss tokens`` / ``loss tokens cumulative``: all loss tokens (``lm loss``'s count,
  untracked tokens included).
* ``loss_math validation<suffix>``: validation loss, written by Megatron's own code (with
  ``... vs samples`` and the PPL it prints); ``<suffix>`` is Megatron's (``-name`` or ``-i``
  with several validation sets, else empty).
* ``tokens_math validation<suffix>``, ``token share math validation<suffix>``,
  ``loss tokens validation<suffix>``: validation token counts and shares.

The console line shows ``loss_math``, ``tokens_math`` and ``token share math`` per channel.
With ``jsonl_path``, the last rank appends one JSON object per console log line (kind
``"train"``) and per evaluated set (kind ``"validation"``, ``split`` ``"validation"`` or
``"test"``); see ``train_record`` / ``validation_record``. The file is appended to, never
truncated, so a resumed run continues it. No value written anywhere is NaN or inf. Like
Megatron's, the first iteration's console line does not reset the interval, so the next line
covers it again.

Not supported (refused with an error naming it): ``--cuda-graph-impl full_iteration``
(replayed graphs never call ``loss_func`` in Python, so nothing could be captured).
"""

from __future__ import annotations

import dis
import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import ChannelConfig

LM_LOSS_KEY = "lm loss"
SUPPORTED_MEGATRON = (0, 19)


# ----------------------------------------------------------------------------- names


def tokens_name(channel: str) -> str:
    return f"tokens_{channel}"


def share_name(channel: str) -> str:
    return f"token share {channel}"


ALL_TOKENS_NAME = "loss tokens"
CUMULATIVE = " cumulative"


# ----------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class ChannelStats:
    """Python-number totals of one window.

    Attributes:
        names: channel names, config order.
        loss_sums: per channel, the sum of per-token losses over the window.
        tokens: per channel, the number of loss tokens over the window.
        total_tokens: all loss tokens over the window (``lm loss``'s count, untracked included).
        total_loss_sum: all losses over the window (``lm loss``'s sum).
        iterations: iterations added to the window.
    """

    names: tuple[str, ...]
    loss_sums: tuple[float, ...]
    tokens: tuple[float, ...]
    total_tokens: float
    total_loss_sum: float
    iterations: int = 0

    @classmethod
    def from_totals(cls, names: Sequence[str], totals: Tensor | Sequence[Sequence[float]], iterations: int = 0):
        """From a ``[K + 1, 2]`` totals table: rows channels then ``lm loss``, columns (sum, count)."""
        rows = totals.tolist() if isinstance(totals, Tensor) else [list(r) for r in totals]
        if len(rows) != len(names) + 1 or any(len(r) != 2 for r in rows):
            raise ValueError(f"totals must be [{len(names) + 1}, 2] (channels then lm loss), got {len(rows)} rows")
        return cls(
            names=tuple(names),
            loss_sums=tuple(float(r[0]) for r in rows[:-1]),
            tokens=tuple(float(r[1]) for r in rows[:-1]),
            total_tokens=float(rows[-1][1]),
            total_loss_sum=float(rows[-1][0]),
            iterations=iterations,
        )

    def loss(self, i: int) -> float | None:
        """Token-weighted mean loss of channel ``i``; None when it had no tokens."""
        return self.loss_sums[i] / self.tokens[i] if self.tokens[i] > 0 else None

    def share(self, i: int) -> float | None:
        """Channel ``i``'s fraction of all loss tokens; None when there were none."""
        return self.tokens[i] / self.total_tokens if self.total_tokens > 0 else None

    def lm_loss(self) -> float | None:
        """Token-weighted mean of all loss tokens; None when there were none."""
        return self.total_loss_sum / self.total_tokens if self.total_tokens > 0 else None


class TotalsWindow:
    """Sum of per-iteration ``[K + 1, 2]`` totals over a window of iterations.

    The sum stays a float64 tensor on the totals' device, so adding an iteration never
    makes the host wait for the GPU; only ``take`` reads it.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._sum: Tensor | None = None
        self.iterations = 0

    def add(self, totals: Tensor) -> None:
        totals = totals.detach().to(torch.float64)
        if totals.shape != (len(self.names) + 1, 2):
            raise ValueError(f"totals must be [{len(self.names) + 1}, 2], got {list(totals.shape)}")
        self._sum = totals.clone() if self._sum is None else self._sum + totals
        self.iterations += 1

    def take(self, reset: bool = True) -> ChannelStats | None:
        """The window's stats (None if no iteration was added); empties it when ``reset``."""
        if self.iterations == 0:
            return None
        stats = ChannelStats.from_totals(self.names, self._sum.cpu(), self.iterations)
        if reset:
            self._sum, self.iterations = None, 0
        return stats


@dataclass(frozen=True)
class ChannelReport:
    """What one log point shows: the window since the previous point and the run so far."""

    window: ChannelStats
    cumulative: ChannelStats


class ChannelAccountant:
    """Per-channel accounting of a training run, independent of Megatron's loop.

    Feed it the global totals of every non-skipped iteration with ``add_iteration``; read the
    console interval with ``console_report`` and the TensorBoard interval with
    ``tensorboard_report``. The two windows are independent; the cumulative one never resets.
    """

    def __init__(self, config: ChannelConfig):
        self.config = config
        names = config.channels
        self._console = TotalsWindow(names)
        self._tensorboard = TotalsWindow(names)
        self._cumulative = TotalsWindow(names)

    def add_iteration(self, totals: Tensor) -> None:
        """``totals``: ``[K + 1, 2]`` global (sum, count) of one iteration, channels then lm loss."""
        for window in (self._console, self._tensorboard, self._cumulative):
            window.add(totals)

    def _report(self, window: TotalsWindow, reset: bool) -> ChannelReport | None:
        stats = window.take(reset)
        if stats is None:
            return None
        return ChannelReport(window=stats, cumulative=self._cumulative.take(reset=False))

    def console_report(self, reset: bool = True) -> ChannelReport | None:
        return self._report(self._console, reset)

    def tensorboard_report(self, reset: bool = True) -> ChannelReport | None:
        return self._report(self._tensorboard, reset)


# ----------------------------------------------------------------------------- formatting


def console_fields(report: ChannelReport, config: ChannelConfig) -> str:
    """`` loss_math: 2.345678E+00 | tokens_math: 1234 | token share math: 0.2500 |`` per channel.

    A channel without tokens in the interval shows its token count (0) and no loss.
    """
    stats = report.window
    parts = []
    for i, (name, key) in enumerate(zip(config.channels, config.metric_keys())):
        loss = stats.loss(i)
        if loss is not None:
            parts.append(f" {key}: {loss:.6E} |")
        parts.append(f" {tokens_name(name)}: {stats.tokens[i]:.0f} |")
        share = stats.share(i)
        if share is not None:
            parts.append(f" {share_name(name)}: {share:.4f} |")
    return "".join(parts)


def insert_into_iteration_line(line: str, fields: str) -> str:
    """Put ``fields`` right after the line's `` lm loss: ... |`` field, else before
    `` loss scale:``, else at the end."""
    anchor = line.find(f" {LM_LOSS_KEY}: ")
    if anchor >= 0:
        end = line.find("|", anchor)
        if end >= 0:
            return line[: end + 1] + fields + line[end + 1 :]
    anchor = line.find(" loss scale:")
    if anchor >= 0:
        return line[:anchor] + fields + line[anchor:]
    return line + fields


def is_iteration_line(message) -> bool:
    """Whether ``message`` is ``training_log``'s `` [date] iteration N/ M | ...`` line."""
    return isinstance(message, str) and " iteration " in message and "|" in message


def train_scalars(report: ChannelReport, config: ChannelConfig) -> dict[str, float]:
    """TensorBoard / W&B scalars of one log point (names in the module docstring), all finite."""
    window, cumulative = report.window, report.cumulative
    out: dict[str, float] = {}
    for i, (name, key) in enumerate(zip(config.channels, config.metric_keys())):
        loss = window.loss(i)
        if loss is not None:
            out[key] = loss
        out[tokens_name(name)] = window.tokens[i]
        out[tokens_name(name) + CUMULATIVE] = cumulative.tokens[i]
        for stats, suffix in ((window, ""), (cumulative, CUMULATIVE)):
            share = stats.share(i)
            if share is not None:
                out[share_name(name) + suffix] = share
    out[ALL_TOKENS_NAME] = window.total_tokens
    out[ALL_TOKENS_NAME + CUMULATIVE] = cumulative.total_tokens
    return out


def validation_scalars(stats: ChannelStats, config: ChannelConfig, suffix: str = "") -> dict[str, float]:
    """Validation tokens and shares; the losses go through Megatron's own code."""
    out: dict[str, float] = {}
    for i, name in enumerate(config.channels):
        out[f"{tokens_name(name)} validation{suffix}"] = stats.tokens[i]
        share = stats.share(i)
        if share is not None:
            out[f"{share_name(name)} validation{suffix}"] = share
    out[f"{ALL_TOKENS_NAME} validation{suffix}"] = stats.total_tokens
    return out


def validation_console_fields(stats: ChannelStats, config: ChannelConfig) -> str:
    """``tokens_math: 12 | ... | loss tokens: 100 | `` in the validation line's style."""
    parts = [f"{tokens_name(name)}: {stats.tokens[i]:.0f} | " for i, name in enumerate(config.channels)]
    parts.append(f"{ALL_TOKENS_NAME}: {stats.total_tokens:.0f} | ")
    return "".join(parts)


def train_record(report: ChannelReport, iteration: int, consumed_samples: int | None = None) -> dict:
    """jsonl object of one console log point (``loss`` / ``share`` are null, never NaN, when empty)."""
    window, cumulative = report.window, report.cumulative
    return {
        "kind": "train",
        "iteration": int(iteration),
        "consumed_samples": consumed_samples,
        "iterations_in_window": window.iterations,
        "lm_loss_token_weighted": window.lm_loss(),
        "loss_tokens": window.total_tokens,
        "loss_tokens_cumulative": cumulative.total_tokens,
        "channels": {
            name: {
                "loss": window.loss(i),
                "tokens": window.tokens[i],
                "tokens_cumulative": cumulative.tokens[i],
                "share": window.share(i),
                "share_cumulative": cumulative.share(i),
            }
            for i, name in enumerate(window.names)
        },
    }


def validation_record(
    stats: ChannelStats, iteration: int, *, split: str = "validation", set_suffix: str = "",
    consumed_samples: int | None = None,
) -> dict:
    """jsonl object of one evaluated set."""
    return {
        "kind": "validation",
        "split": split,
        "set": set_suffix,
        "iteration": int(iteration),
        "consumed_samples": consumed_samples,
        "lm_loss_token_weighted": stats.lm_loss(),
        "loss_tokens": stats.total_tokens,
        "channels": {
            name: {"loss": stats.loss(i), "tokens": stats.tokens[i], "share": stats.share(i)}
            for i, name in enumerate(stats.names)
        },
    }


def append_jsonl(path: str, record: dict) -> None:
    """Append one line; ``allow_nan=False`` turns a NaN that slipped through into an error."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- capture


class ChannelMetricsError(KeyError):
    """A ``loss_func``'s metrics do not match the ``ChannelConfig`` given to the logger."""

    def __str__(self):  # KeyError would print the message with quotes
        return str(self.args[0])


def split_channel_metrics(metrics: Mapping[str, Tensor], config: ChannelConfig) -> tuple[Tensor, dict]:
    """Take the channel keys out of one microbatch's ``metrics``.

    Returns:
        ``[K + 1, 2]`` (sum, count) rows: the channels in config order, then ``lm loss``
        (float32, on the metrics' device); and ``metrics`` without the channel keys.
    """
    keys = config.metric_keys()
    missing = [k for k in keys + [LM_LOSS_KEY] if k not in metrics]
    if missing:
        raise ChannelMetricsError(
            f"loss_func metrics lack {missing} (has {list(metrics)}): install_channel_logging(config) "
            "needs the forward_step of make_forward_step(config) with the same ChannelConfig"
        )
    unknown = [k for k in metrics if k.startswith(config.prefix) and k not in keys]
    if unknown:
        raise ChannelMetricsError(
            f"loss_func metrics have channel keys {unknown} that the logging config does not name "
            f"(it names {keys}): pass the same ChannelConfig to make_forward_step and install_channel_logging"
        )
    rows = torch.stack([metrics[k].detach().view(-1).float() for k in keys + [LM_LOSS_KEY]])
    channel_keys = set(keys)
    rest = {k: v for k, v in metrics.items() if k not in channel_keys}
    return rows, rest


def capturing_loss_func(loss_func, config: ChannelConfig, captured: list[Tensor]):
    """``loss_func`` returning its metrics without channel keys; appends the rows to ``captured``."""
    if loss_func is None:
        return None

    @functools.wraps(loss_func)
    def loss_func_capturing(output_tensor, *args, **kwargs):
        outputs = loss_func(output_tensor, *args, **kwargs)
        if kwargs.get("non_loss_data"):
            return outputs
        rows, rest = split_channel_metrics(outputs[-1], config)
        captured.append(rows)
        return (*outputs[:-1], rest)

    return loss_func_capturing


def capturing_forward_step(forward_step_func, config: ChannelConfig, captured: list[Tensor]):
    """``forward_step_func`` whose ``loss_func`` captures channel rows (signature kept via __wrapped__)."""

    @functools.wraps(forward_step_func)
    def forward_step_capturing(*args, **kwargs):
        output_tensor, loss_func = forward_step_func(*args, **kwargs)
        return output_tensor, capturing_loss_func(loss_func, config, captured)

    return forward_step_capturing


def reduce_captured(captured: Sequence[Tensor], group=None) -> Tensor:
    """Sum the microbatch rows and all-reduce once (float64) over ``group``: ``[K + 1, 2]``."""
    totals = torch.stack(list(captured)).to(torch.float64).sum(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals, group=group)
    return totals


def dp_cp_group(model):
    """The group train_step reduces ``lm loss`` over: the model's pg_collection, else parallel_state's."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    pg_collection = None
    if model:
        try:
            pg_collection = get_attr_wrapped_model(model[0], "pg_collection")
        except RuntimeError:  # a model without pg_collection anywhere in its wrappers
            pg_collection = None
    if pg_collection is not None:
        group = getattr(pg_collection, "dp_cp_gtp_remat", None) or getattr(pg_collection, "dp_cp", None)
        if group is not None:
            return group
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


# ----------------------------------------------------------------------------- internals check


class MegatronInternalsError(RuntimeError):
    """The installed Megatron differs from the one this logging was written against."""


_FIX = (
    "megatron_channel's channel logging supports megatron-core {v[0]}.{v[1]}.x; install that "
    "(pip install 'megatron-core>={v[0]}.{v[1]},<{v[0]}.{n}') or do not call install_channel_logging"
).format(v=SUPPORTED_MEGATRON, n=SUPPORTED_MEGATRON[1] + 1)

# Parameter names, in order, of the functions wrapped; the wrappers bind by these names.
EXPECTED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "train_step": (
        "forward_step_func", "data_iterator", "model", "optimizer", "opt_param_scheduler", "config",
        "forward_backward_func", "iteration", "pg_collection", "p2p_communicator",
    ),
    "training_log": (
        "loss_dict", "total_loss_dict", "learning_rate", "iteration", "loss_scale", "report_memory_flag",
        "skipped_iter", "grad_norm", "params_norm", "num_zeros_in_grad", "max_attention_logit",
        "pg_collection", "is_first_iteration", "seqlen_squared_sum_in_batch", "total_real_tokens_in_batch",
    ),
    "evaluate": (
        "forward_step_func", "data_iterator", "model", "process_non_loss_data_func", "config", "verbose",
        "non_loss_data_func", "eval_iters", "pg_collection", "p2p_communicator",
    ),
    "evaluate_and_print_results": (
        "prefix", "forward_step_func", "data_iterator", "model", "iteration", "process_non_loss_data_func",
        "config", "verbose", "write_to_tensorboard", "non_loss_data_func", "pg_collection", "p2p_communicator",
    ),
}

# Names each function must look up as a module global at call time, so replacing the
# module attribute reaches it (a local import or a bound default would bypass the wrapper).
EXPECTED_GLOBAL_LOOKUPS: dict[str, tuple[str, ...]] = {
    "pretrain": ("train", "evaluate_and_print_results"),
    "train": ("train_step", "training_log", "evaluate_and_print_results"),
    "training_log": ("print_rank_last", "get_args", "get_tensorboard_writer", "get_wandb_writer"),
    "evaluate_and_print_results": ("evaluate", "print_rank_last", "get_tensorboard_writer", "get_wandb_writer"),
}


def check_signature(func: Callable, expected: Sequence[str], name: str) -> None:
    """Raise ``MegatronInternalsError`` unless ``func``'s parameter names are ``expected``, in order."""
    found = tuple(inspect.signature(func).parameters)
    if found != tuple(expected):
        added = [p for p in found if p not in expected]
        removed = [p for p in expected if p not in found]
        raise MegatronInternalsError(
            f"megatron.training.training.{name} changed: expected parameters {list(expected)}, found "
            f"{list(found)} (added {added}, removed {removed}, or reordered). {_FIX}"
        )


def check_global_lookups(func: Callable, names: Sequence[str], name: str) -> None:
    """Raise ``MegatronInternalsError`` unless ``func``'s own code loads each of ``names`` as a global."""
    loaded = {i.argval for i in dis.get_instructions(func) if i.opname == "LOAD_GLOBAL"}
    missing = [n for n in names if n not in loaded]
    if missing:
        raise MegatronInternalsError(
            f"megatron.training.training.{name} no longer looks up {missing} as module globals, so "
            f"replacing them would not reach it. {_FIX}"
        )


def check_megatron_version(version: tuple[int, ...] | None = None) -> None:
    if version is None:
        from megatron.core import package_info

        version = (package_info.MAJOR, package_info.MINOR, package_info.PATCH)
    if tuple(version[:2]) != SUPPORTED_MEGATRON:
        raise MegatronInternalsError(f"installed megatron-core is {'.'.join(map(str, version))}. {_FIX}")


def check_megatron_internals(module=None) -> None:
    """Everything the wrappers rely on, checked at install time (``module``: training module)."""
    check_megatron_version()
    if module is None:
        import megatron.training.training as module
    for name in set(EXPECTED_SIGNATURES) | set(EXPECTED_GLOBAL_LOOKUPS) | {"print_rank_last", "get_args"}:
        if not callable(getattr(module, name, None)):
            raise MegatronInternalsError(f"megatron.training.training has no function {name!r}. {_FIX}")
    for name, params in EXPECTED_SIGNATURES.items():
        check_signature(_unwrapped(getattr(module, name)), params, name)
    for name, globals_needed in EXPECTED_GLOBAL_LOOKUPS.items():
        check_global_lookups(_unwrapped(getattr(module, name)), globals_needed, name)


def _unwrapped(func):
    return getattr(func, "_channel_logging_original", func)


# ----------------------------------------------------------------------------- the logger


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


def _mark(wrapper, original):
    wrapper._channel_logging_original = original
    return wrapper


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
                f"starting with the loss dict. {_FIX}"
            )
        if result[0]:  # last pipeline stage, with losses: every dp x cp peer is here too
            if not captured:
                raise ChannelMetricsError(
                    "train_step reported losses but no loss_func call was seen: the forward step "
                    "must return make_forward_step's loss_func, called by Megatron in Python"
                )
            logger.pending_train_totals = reduce_captured(captured, dp_cp_group(bound.arguments["model"]))
        return result

    return _mark(train_step, original)


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
        print_original = module.print_rank_last

        def print_with_channels(message):
            if not console and is_iteration_line(message):
                # Taken when the line is printed, so the interval resets exactly when Megatron's does.
                report = logger.accountant.console_report(reset=not is_first)
                if report is not None:
                    console.append(report)
                    message = insert_into_iteration_line(message, console_fields(report, logger.config))
            return print_original(message)

        module.print_rank_last = print_with_channels
        try:
            result = original(*bound.args, **bound.kwargs)
        finally:
            module.print_rank_last = print_original

        if console:
            logger.write_record(train_record(console[0], iteration, getattr(margs, "consumed_train_samples", None)))
        if iteration % margs.tensorboard_log_interval == 0:
            report = logger.accountant.tensorboard_report()
            if report is not None:
                _write_scalars(module, train_scalars(report, logger.config), iteration, margs, vs_samples=True,
                               loss_keys=set(logger.config.metric_keys()))
        return result

    return _mark(training_log, original)


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

    return _mark(evaluate, original)


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
        print_original = module.print_rank_last

        def print_with_tokens(message):
            # The i-th " validation... loss at ..." line belongs to the i-th evaluate call.
            if isinstance(message, str) and " loss at " in message and printed[0] < len(logger.pending_evals):
                message += validation_console_fields(logger.pending_evals[printed[0]], logger.config)
                printed[0] += 1
            return print_original(message)

        module.print_rank_last = print_with_tokens
        try:
            result = original(*bound.args, **bound.kwargs)
        finally:
            module.print_rank_last = print_original

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
        return result

    return _mark(evaluate_and_print_results, original)


# ----------------------------------------------------------------------------- install


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
    originals = {name: _unwrapped(getattr(module, name)) for name in EXPECTED_SIGNATURES}
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
