"""A blended dataset whose component weights follow a schedule keyed by the global sample index.

Megatron's ``MegatronPretrainingSampler`` hands the dataset global positions: sample ``idx`` is
the ``idx``-th sample the run consumes. ``ScheduledBlendedDataset`` maps ``idx`` through a
schedule of rows ``(start_sample, weights[K], offsets[K])``: within row ``r`` (``idx`` in
``[start_r, start_{r+1})``), position ``m = idx - start_r`` goes to the component Megatron's
greedy ``build_blending_indices`` picks for the row's weights at ``m``, and to that component's
sample ``offsets_r[c] + (its count before m)``. The offsets carry every component's count over
from earlier rows, so a component's samples are taken in order, none twice (until it wraps
around, see below). The mapping is a pure function of ``idx`` and the rows: with one row it is
stock ``BlendedDataset``'s, bitwise.

The rows live in shared memory (``MixtureSchedule``), made before the data loader starts its
workers, which read the same table. A row decided after iteration ``t`` starts at a sample the
run reaches ``lag`` iterations later; the owner raises the horizon (``publish_through``) as
iterations end, and a worker asked for a sample at or past the horizon waits for it. So every
sample depends only on its index and the rows, never on ``--num-workers``, prefetching or timing.

A component asked for more samples than it holds (its weight went up) wraps around to its
first sample (``MixtureSchedule.passed_end`` tells the owner, which says so).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import Dataset

POLL_SECONDS = 0.001
CHECKPOINT_EVERY = 4096  # positions between two stored count vectors of a row's greedy blend


class MixtureSchedule:
    """The rows, in shared memory, and the horizon below which samples are final.

    Attributes (tensors in shared memory, written by the owning process only):
        starts: ``[R]`` int64, first sample of each row.
        weights: ``[R, K]`` float64.
        offsets: ``[R, K]`` int64, each component's samples consumed before the row.
        num_rows: ``[1]`` int64.
        horizon: ``[1]`` int64; samples below it are decided.
    """

    def __init__(self, weights, capacity: int, horizon: int = 0):
        weights = normalized(weights)
        self.num_components = len(weights)
        self.starts = torch.zeros(capacity, dtype=torch.int64).share_memory_()
        self.weights = torch.zeros(capacity, self.num_components, dtype=torch.float64).share_memory_()
        self.offsets = torch.zeros(capacity, self.num_components, dtype=torch.int64).share_memory_()
        self.num_rows = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.horizon = torch.tensor([horizon], dtype=torch.int64).share_memory_()
        self.weights[0] = torch.from_numpy(weights)
        self.num_rows[0] = 1

    def append(self, start: int, weights) -> None:
        """A new row from ``start`` on (at or past the horizon and the last row's start)."""
        n = int(self.num_rows[0])
        if n >= self.starts.numel():
            raise RuntimeError(f"the mixture schedule holds {n} rows, its capacity; raise it")
        last = int(self.starts[n - 1])
        if start < max(last, int(self.horizon[0])):
            raise ValueError(f"a row from sample {start} would change samples already decided "
                             f"(horizon {int(self.horizon[0])}, last row from {last})")
        counts = greedy_counts(self.weights[n - 1].numpy(), start - last)
        self.starts[n] = start
        self.weights[n] = torch.from_numpy(normalized(weights))
        self.offsets[n] = self.offsets[n - 1] + torch.from_numpy(counts)
        self.num_rows[0] = n + 1  # written last: a reader sees a row only once it is whole

    def publish_through(self, sample: int) -> None:
        """Samples below ``sample`` are final (never lowers the horizon)."""
        if sample > int(self.horizon[0]):
            self.horizon[0] = sample

    def passed_end(self, lengths) -> list[int]:
        """Components whose next sample (the last row's offset) is past their ``lengths``."""
        n = int(self.num_rows[0])
        return [c for c, (offset, length) in enumerate(zip(self.offsets[n - 1].tolist(), lengths)) if offset >= length]


def normalized(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0 or not np.all(np.isfinite(weights)) or np.any(weights < 0) \
            or weights.sum() <= 0:
        raise ValueError(f"blend weights {weights.tolist()} must be non-negative, finite and not all zero")
    return weights / weights.sum()


def greedy_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend (``helpers.build_blending_indices``) of ``size`` positions:
    ``(component [size] int16, its sample count before the position [size] int64)``."""
    from megatron.core.datasets import helpers

    component = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    if size:
        helpers.build_blending_indices(component, sample, np.asarray(weights, dtype=np.float64), len(weights),
                                       size, False)
    return component, sample


class GreedyPrefix:
    """The first ``size`` positions of a row's greedy blend, compactly: the component of each
    position (int8/int16) and every component's count at each ``CHECKPOINT_EVERY``-th position,
    about 1 byte a position instead of Megatron's 10."""

    def __init__(self, weights: np.ndarray, size: int):
        component, sample = greedy_indices(weights, size)
        self.size = size
        self.component = component.astype(np.int8 if len(weights) < 128 else np.int16)
        starts = np.arange(0, size, CHECKPOINT_EVERY)
        self.counts = np.zeros((len(starts), len(weights)), dtype=np.int64)
        for k, start in enumerate(starts[1:], 1):  # each component's count before position `start`
            self.counts[k] = self.counts[k - 1] + np.bincount(component[starts[k - 1]:start], minlength=len(weights))
        del sample

    def at(self, position: int) -> tuple[int, int]:
        """``(component, its count before position)``."""
        component = int(self.component[position])
        block = position // CHECKPOINT_EVERY
        start = block * CHECKPOINT_EVERY
        before = int(np.count_nonzero(self.component[start:position] == component))
        return component, int(self.counts[block, component]) + before


def greedy_counts(weights: np.ndarray, size: int) -> np.ndarray:
    """``[K]`` how many of ``size`` greedy positions each component gets."""
    component, _ = greedy_indices(weights, size)
    return np.bincount(component, minlength=len(weights)).astype(np.int64)


class ScheduledBlendedDataset(Dataset):
    """``BlendedDataset``'s samples (``{"dataset_id": c, **component sample}``) under a schedule.

    Args:
        datasets: the blend's components (a ``BlendedDataset``'s ``datasets``), in blend order.
        schedule: the rows; row 0 holds the blend's own weights.
        size: the number of samples (the stock blend's ``size``).
    """

    def __init__(self, datasets, schedule: MixtureSchedule, size: int):
        if len(datasets) != schedule.num_components:
            raise ValueError(f"{len(datasets)} components but {schedule.num_components} weights")
        self.datasets = list(datasets)
        self.schedule = schedule
        self.size = int(size)
        self.split = self.datasets[0].index_split
        self._greedy: dict[int, GreedyPrefix] = {}  # the rows read last, each prefix grown by doubling

    def __len__(self) -> int:
        return self.size

    def locate(self, idx: int) -> tuple[int, int]:
        """``(component, its sample)`` of global sample ``idx`` (a worker waits for the horizon)."""
        schedule = self.schedule
        if idx >= int(schedule.horizon[0]):
            if torch.utils.data.get_worker_info() is None:  # the training process itself: it would wait forever
                raise RuntimeError(
                    f"sample {idx} is past the mixture horizon {int(schedule.horizon[0])}: the training process "
                    "read further ahead than the mixture lag allows (a bug: please report it)")
            parent = os.getppid()
            while idx >= int(schedule.horizon[0]):
                if os.getppid() != parent:
                    raise RuntimeError("the training process exited while this data loader worker waited for "
                                       "the mixture schedule")
                time.sleep(POLL_SECONDS)
        n = int(schedule.num_rows[0])
        row = int(np.searchsorted(schedule.starts[:n].numpy(), idx, side="right")) - 1
        component, count = self._greedy_at(row, idx - int(schedule.starts[row]))
        sample = int(schedule.offsets[row, component]) + count
        return component, sample % len(self.datasets[component])  # past its end: from its first sample again

    def _greedy_at(self, row: int, position: int) -> tuple[int, int]:
        prefix = self._greedy.get(row)
        if prefix is None or position >= prefix.size:
            size = max(CHECKPOINT_EVERY, 2 * position + 1, 2 * prefix.size if prefix else 0)
            self._greedy = {r: g for r, g in self._greedy.items() if r >= row - 1}  # rows are read in order
            prefix = self._greedy[row] = GreedyPrefix(self.schedule.weights[row].numpy(), size)
        return prefix.at(position)

    def __getitem__(self, idx: int) -> dict:
        component, sample = self.locate(int(idx))
        return {"dataset_id": component, **self.datasets[component][sample]}
