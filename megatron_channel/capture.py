"""Capture of the channel metrics inside ``loss_func`` and their one all-reduce per iteration.

``capturing_forward_step`` wraps a Megatron ``forward_step_func`` so that every ``loss_func``
it returns hands back Megatron's ``(loss, num_tokens, metrics)`` with the channel keys taken
OUT of ``metrics`` and kept, per microbatch, as one ``[K + 1, 2]`` tensor (rows: channels in
config order, then ``"lm loss"``; columns: summed per-token loss, loss tokens), still on the
GPU. So stock code never sees a channel key: no NaN, and none of its K per-key all-reduces.
This adds one small ``torch.stack`` per microbatch and no host sync or collective.
``reduce_captured`` then sums an iteration's rows and does ONE float64 all-reduce over the
data-parallel x context-parallel group (``dp_cp_group``), giving the exact global totals.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .accounting import LM_LOSS_KEY
from .config import ChannelConfig


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
    unknown = [k for k in metrics if k.startswith(config.prefix) and k not in keys and k != LM_LOSS_KEY]
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
