"""Channel metrics taken out of ``loss_func`` per microbatch, and their one all-reduce per iteration.

``capturing_forward_step`` wraps a Megatron ``forward_step_func`` so that every ``loss_func``
it returns hands back Megatron's ``(loss, num_tokens, metrics)`` with the channel keys taken
OUT of ``metrics`` and kept, per microbatch, as one ``[K + 1, 2]`` tensor (rows: channels in
config order, then ``"lm loss"``; columns: summed per-token loss, loss tokens; with token
accuracy ``K + 1`` more rows of correct and loss tokens, ``captured_keys``), still on the
GPU. So stock code never sees a channel key: no NaN, and none of its K per-key all-reduces.
This adds one small ``torch.stack`` per microbatch and no host sync or collective.
``all_reduce_totals`` then sums an iteration's rows and does ONE float64 all-reduce over the
data-parallel x context-parallel group (``dp_cp_group``), giving the exact global totals.
``reduce_channel_metrics`` does the same for metric dicts collected by the user's own loop.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..config import ChannelConfig
from ..names import LM_LOSS_KEY, TOKEN_ACC_KEY


class ChannelMetricsError(KeyError):
    """A ``loss_func``'s metrics do not match the ``ChannelConfig`` given to the logging."""

    def __str__(self):  # KeyError would print the message with quotes
        return str(self.args[0])


def captured_keys(config: ChannelConfig) -> list[str]:
    """The rows of the captured table: channel losses, ``lm loss``, then with token accuracy the
    channel accuracies and ``token acc`` (the layout ``windows`` reads)."""
    keys = config.metric_keys() + [LM_LOSS_KEY]
    if config.token_accuracy:
        keys += config.accuracy_keys() + [TOKEN_ACC_KEY]
    return keys


def split_channel_metrics(metrics: Mapping[str, Tensor], config: ChannelConfig) -> tuple[Tensor, dict]:
    """Take the channel keys (and ``token acc``) out of one microbatch's ``metrics``.

    Returns:
        ``[K + 1, 2]`` (sum, count) rows in ``captured_keys`` order, ``[2 (K + 1), 2]`` with
        token accuracy (float32, on the metrics' device); and ``metrics`` without those keys
        (``lm loss`` stays: Megatron's own loop reduces and logs it).
    """
    keys = captured_keys(config)
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise ChannelMetricsError(
            f"loss_func metrics lack {missing} (has {list(metrics)}): install_channel_logging(config) "
            "needs the forward_step of make_forward_step(config) with the same ChannelConfig"
        )
    unknown = [k for k in metrics if k not in keys and (config.looks_like_channel_key(k) or k == TOKEN_ACC_KEY)]
    if unknown:
        raise ChannelMetricsError(
            f"loss_func metrics have channel keys {unknown} that the logging config does not name "
            f"(it names {keys}): pass the same ChannelConfig to make_forward_step and install_channel_logging"
        )
    rows = torch.stack([metrics[k].view(-1) for k in keys]).detach().float()
    taken = set(keys) - {LM_LOSS_KEY}
    rest = {k: v for k, v in metrics.items() if k not in taken}
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


def dp_cp_group(model=None):
    """The group ``train_step`` reduces ``lm loss`` over: data-parallel x context-parallel.

    The model's ``pg_collection`` when it has one (``model``: Megatron's list of model
    chunks), else ``parallel_state``'s, else None (the default group).
    """
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


def all_reduce_totals(rows: Sequence[Tensor], group=None) -> Tensor:
    """Sum per-microbatch ``[n, 2]`` (sum, count) rows and all-reduce once, in float64, over ``group``.

    No reduction when ``torch.distributed`` is not initialized. Returns ``[n, 2]`` float64.
    """
    totals = torch.stack([r.detach().to(torch.float64) for r in rows]).sum(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals, group=group)
    return totals


def reduce_channel_metrics(metric_dicts: Sequence[Mapping[str, Tensor]], group=None) -> dict[str, float]:
    """Global ``sum / count`` per key over microbatches and data-parallel x CP ranks.

    Like Megatron's ``train_step`` on the last pipeline stage: sum each key's ``[sum, count]``
    over this rank's microbatches, all-reduce over ``group``, divide. Unlike it, a key whose
    global count is 0 is left out instead of becoming NaN. Sums run in float64 and all keys
    travel in one all-reduce. Every rank must pass the same keys in the same order, which
    ``channel_loss_func`` guarantees.

    Args:
        metric_dicts: one ``metrics`` dict per microbatch, values ``[2]`` tensors.
        group: process group to reduce over; default ``dp_cp_group()``.

    Returns:
        ``{key: mean loss per token}`` for keys with tokens somewhere.
    """
    if not metric_dicts:
        return {}
    keys = list(metric_dicts[0])
    for i, d in enumerate(metric_dicts):
        if list(d) != keys:
            raise KeyError(f"microbatch {i} reports keys {list(d)}, microbatch 0 reports {keys}")
    rows = [torch.stack([d[k].detach().view(-1).to(torch.float64) for k in keys]) for d in metric_dicts]
    totals = all_reduce_totals(rows, dp_cp_group() if group is None else group)
    sums, counts = totals.cpu().unbind(1)
    return {k: s / c for k, s, c in zip(keys, sums.tolist(), counts.tolist()) if c > 0}
