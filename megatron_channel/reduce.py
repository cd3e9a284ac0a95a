"""Reduce per-microbatch metrics the way Megatron's ``train_step`` does, minus the NaNs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def default_reduce_group():
    """Megatron's data-parallel x context-parallel group, or None (the default group)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


def reduce_channel_metrics(metric_dicts: Sequence[Mapping[str, Tensor]], group=None) -> dict[str, float]:
    """Global ``sum / count`` per key over microbatches and data-parallel x CP ranks.

    Like Megatron's ``train_step`` on the last pipeline stage: sum each key's ``[sum, count]``
    over this rank's microbatches, all-reduce over ``group``, divide. Unlike it, a key whose
    global count is 0 is left out instead of becoming NaN. Sums run in float64 and all keys
    travel in one all-reduce. Every rank must pass the same keys in the same order, which
    ``channel_loss_func`` guarantees.

    Args:
        metric_dicts: one ``metrics`` dict per microbatch, values ``[2]`` tensors.
        group: process group to reduce over; default Megatron's DP x CP group when
            ``parallel_state`` is initialized, else the default group; no reduction when
            ``torch.distributed`` is not initialized.

    Returns:
        ``{key: mean loss per token}`` for keys with tokens somewhere.
    """
    if not metric_dicts:
        return {}
    keys = list(metric_dicts[0])
    for i, d in enumerate(metric_dicts):
        if list(d) != keys:
            raise KeyError(f"microbatch {i} reports keys {list(d)}, microbatch 0 reports {keys}")
    totals = torch.stack(
        [torch.stack([d[k].detach().view(-1).to(torch.float64) for k in keys]) for d in metric_dicts]
    ).sum(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals, group=default_reduce_group() if group is None else group)
    sums, counts = totals.cpu().unbind(1)
    return {k: s / c for k, s, c in zip(keys, sums.tolist(), counts.tolist()) if c > 0}
