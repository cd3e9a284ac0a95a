"""Pure tensor math: packed-sequence boundaries, context-parallel cuts, per-channel sums.

Every function here takes tensors and returns tensors of shapes that depend only on
input shapes, never on values. On a GPU none of them reads a value on the host, so none
makes the host wait for the GPU; on CPU tensors ``sequence_stats`` and ``channel_totals``
sum with numpy (``sums_with_numpy``), where reading values makes nothing wait.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import Tensor


def local_boundaries(cu_seqlens: Tensor, cp_size: int) -> Tensor:
    """Where each packed sequence starts and ends on one context-parallel rank.

    Transformer Engine's THD partitioning gives every CP rank ``L_i / cp`` tokens of
    sequence ``i`` (``L_i`` is a multiple of ``2 * cp``), stored contiguously, so
    sequence ``i`` sits at local positions ``[cu[i] / cp, cu[i+1] / cp)`` on every rank.

    Args:
        cu_seqlens: ``[N + 1]`` integer cumulative (padded) sequence lengths, global.
        cp_size: context-parallel world size.

    Returns:
        ``[N + 1]`` local boundaries, in ``cu_seqlens``' integer dtype (index_select takes int32
        and int64, so no cast is spent on them).
    """
    return cu_seqlens if cp_size == 1 else torch.div(cu_seqlens, cp_size, rounding_mode="floor")


# Set only by ``summing_like_a_gpu``: whether CPU tensors are summed with numpy.
_numpy_sums_on_cpu = True


def sums_with_numpy(tensor: Tensor) -> bool:
    """Whether ``sequence_stats`` and ``channel_totals`` sum ``tensor`` with numpy.

    True for CPU tensors: there a scan is a serial loop of about 1 ns per token and every
    torch op costs microseconds of dispatch, while numpy sums segments in one vectorized,
    cheap call, and reading CPU values makes nothing wait. Elsewhere (GPU) the torch
    versions run: no value is read on the host.
    """
    return _numpy_sums_on_cpu and tensor.is_cpu


@contextlib.contextmanager
def summing_like_a_gpu():
    """While the block runs, CPU tensors take the torch path GPU tensors take, so CPU tests
    and benchmarks check and time it."""
    global _numpy_sums_on_cpu
    previous, _numpy_sums_on_cpu = _numpy_sums_on_cpu, False
    try:
        yield
    finally:
        _numpy_sums_on_cpu = previous


def sequence_stats(masked_losses: Tensor, loss_mask: Tensor, boundaries: Tensor) -> Tensor:
    """``[loss_sum, token_count]`` of each packed sequence ``[boundaries[i], boundaries[i+1])``.

    One pass over the tokens whatever the number of sequences: ``sequence_stats_reduceat``
    where ``sums_with_numpy``, else ``sequence_stats_prefix``.

    Args:
        masked_losses: ``[T]`` float32 per-token loss times loss mask.
        loss_mask: ``[T]`` float32.
        boundaries: ``[N + 1]`` int32 or int64, non-decreasing, within ``[0, T]``, starting at
            0; zero-length sequences (repeated entries) and tokens after the last entry are
            allowed.

    Returns:
        ``[2, N]`` float64 on the tokens' device: row 0 loss sums, row 1 token counts.
    """
    if sums_with_numpy(masked_losses):
        return sequence_stats_reduceat(masked_losses, loss_mask, boundaries)
    return sequence_stats_prefix(masked_losses, loss_mask, boundaries)


def sequence_stats_prefix(masked_losses: Tensor, loss_mask: Tensor, boundaries: Tensor) -> Tensor:
    """``sequence_stats`` by prefix sums and one gather at the ``N + 1`` boundaries (any device).

    Reads no value on the host. The loss prefix is float64, so the difference of two large
    prefix sums stays exact to ~1e-12 relative; the count prefix is float32, exact while the
    microbatch has fewer than 2^24 tokens of 0/1 mask. Extra memory: 12 bytes per token (the
    two prefixes).
    """
    tokens = masked_losses.numel()
    loss_prefix = masked_losses.new_empty(tokens + 1, dtype=torch.float64)
    loss_prefix[0] = 0
    # Cast into the prefix buffer and scan in place: cumsum(dtype=float64) would allocate a
    # second float64 copy of the tokens.
    loss_prefix[1:].copy_(masked_losses).cumsum_(0)
    count_prefix = loss_mask.new_empty(tokens + 1, dtype=torch.float32)
    count_prefix[0] = 0
    torch.cumsum(loss_mask, 0, out=count_prefix[1:])
    at_boundaries = torch.stack([loss_prefix.index_select(0, boundaries), count_prefix.index_select(0, boundaries)])
    return at_boundaries.diff(dim=1)


def sequence_stats_reduceat(masked_losses: Tensor, loss_mask: Tensor, boundaries: Tensor) -> Tensor:
    """``sequence_stats`` of CPU tensors by numpy's ``add.reduceat``; reads the values.

    Each sequence is summed in float32 by numpy's pairwise summation (relative error ~1e-7,
    like stock ``lm loss``, itself a float32 sum); counts are exact below 2^24 tokens per
    sequence. The tokens are not copied.
    """
    tokens = masked_losses.numel()
    stats = np.zeros((2, boundaries.numel()), dtype=np.float64)
    if tokens == 0:
        return torch.from_numpy(stats[:, 1:])
    losses, mask, bounds = masked_losses.numpy(), loss_mask.numpy(), boundaries.numpy()
    # reduceat takes indices below T only, sums from the last index to the end, and gives
    # x[i] instead of 0 for a repeated index: so clip the boundaries to T - 1, zero the
    # sequences that became empty, and give the last token back to the sequence that ends at T.
    clipped = np.minimum(bounds, tokens - 1)
    stats[0] = np.add.reduceat(losses, clipped)
    stats[1] = np.add.reduceat(mask, clipped)
    stats = stats[:, :-1]
    stats *= clipped[:-1] < clipped[1:]
    last = int(np.searchsorted(bounds, tokens)) - 1  # the last sequence starting before T
    if 0 <= last < stats.shape[1]:
        stats[:, last] += (losses[-1], mask[-1])
    return torch.from_numpy(stats)


@functools.lru_cache(maxsize=None)
def _channel_column(num_channels: int, device: torch.device) -> Tensor:
    """``[K, 1]`` int64 ``0..K-1``, kept so the row path does not build it every microbatch."""
    return torch.arange(num_channels, device=device).view(-1, 1)


def row_channel_totals(masked_losses: Tensor, loss_mask: Tensor, rows: int, channels: Tensor, num_channels: int) -> Tensor:
    """Per-channel ``[loss_sum, token_count]`` of unpacked rows, one channel id per row.

    A one-hot ``[K, R]`` matrix times the ``[R, 2]`` row sums: a handful of ops whatever the
    device, so the CPU pays little dispatch and a GPU reads no value on the host. Untracked
    rows (-1) match no channel. Sums are float64, so the product is exact to float64 rounding
    and no TF32 matmul setting can touch it.

    Args:
        masked_losses, loss_mask: ``[R * s]`` float32 (no autograd history).
        rows: R.
        channels: ``[R]`` integer channel id per row; ``-1`` = untracked (another length makes
            the product fail, never regroup the rows).
        num_channels: K.

    Returns:
        ``[K, 2]`` float32 ``[loss_sum, token_count]`` per channel (zeros when absent), on the
        tokens' device.
    """
    row_sums = torch.cat([masked_losses, loss_mask]).view(2, rows, -1).sum(2, dtype=torch.float64)  # [2, R]
    one_hot = (_channel_column(num_channels, channels.device) == channels).to(torch.float64)  # [K, R]
    return torch.mm(one_hot, row_sums.t()).float()


def channel_totals(segment_stats: Tensor, segment_channels: Tensor, num_channels: int) -> Tensor:
    """Add each segment's ``[loss_sum, token_count]`` into its channel.

    Args:
        segment_stats: ``[2, N]`` float64 or float32, ``[loss_sum, token_count]`` per segment.
        segment_channels: ``[N]`` integer channel id per segment; ``-1`` = untracked.
        num_channels: K.

    Returns:
        ``[K, 2]`` float32 ``[loss_sum, token_count]`` per channel (zeros when absent), on the
        segments' device.
    """
    # -1 (untracked) lands in an extra bin K that is dropped, so no data-dependent
    # filtering (a host sync) is needed; valid ids 0..K-1 are unchanged.
    bins = num_channels + 1
    if sums_with_numpy(segment_stats):
        stats, ids = segment_stats.numpy(), segment_channels.numpy() % bins
        totals = np.empty((bins, 2), dtype=np.float32)
        totals[:, 0] = np.bincount(ids, stats[0], bins)
        totals[:, 1] = np.bincount(ids, stats[1], bins)
        return torch.from_numpy(totals[:num_channels])
    ids = segment_channels.long().remainder(bins)
    totals = segment_stats.new_zeros(bins, 2).index_add_(0, ids, segment_stats.t())
    return totals[:num_channels].float()


def merge_packed_rows(cu_seqlens: Tensor, row_length: int) -> Tensor:
    """Concatenate per-row cumulative lengths into one sequence list over all rows.

    A THD micro-batch of R rows of ``row_length`` tokens is fed to the model as one
    ``[1, R * row_length]`` stream. Each row's trailing padding entries (equal to
    ``row_length``) stay in place as zero-length sequences, so the result's shape is fixed
    and sequence ``j * (L - 1) + i`` is sequence ``i`` of row ``j``.

    Args:
        cu_seqlens: ``[R, L]`` integer; every row starts at 0 and ends at ``row_length``.
        row_length: tokens per row.

    Returns:
        ``[R * (L - 1) + 1]`` tensor of the input dtype.
    """
    rows = cu_seqlens.shape[0]
    offsets = torch.arange(rows, device=cu_seqlens.device, dtype=cu_seqlens.dtype) * row_length
    shifted = cu_seqlens + offsets[:, None]
    return torch.cat([shifted[0, :1], shifted[:, 1:].reshape(-1)])


def thd_partition_index(cu_seqlens_padded: Tensor, total_tokens: int, cp_size: int, cp_rank: int) -> Tensor:
    """Global token positions a CP rank holds for a packed (THD) row, in local order.

    The same rule as Transformer Engine's ``thd_get_partitioned_indices``: sequence
    ``i`` of padded length ``L_i`` is cut into ``2 * cp`` chunks of ``h = L_i / (2 cp)``;
    rank ``r`` keeps chunk ``r`` then chunk ``2 cp - 1 - r``.

    Args:
        cu_seqlens_padded: ``[N + 1]`` integer, each length a multiple of ``2 * cp``,
            ending at ``total_tokens``.
        total_tokens: tokens in the row before the cut.
        cp_size, cp_rank: context-parallel world size and this rank.

    Returns:
        ``[total_tokens // cp_size]`` int64 indices into the uncut row.
    """
    cu = cu_seqlens_padded.long()
    local_cu = torch.div(cu, cp_size, rounding_mode="floor")
    pos = torch.arange(total_tokens // cp_size, device=cu.device)
    # Last sequence starting at or before pos: skips zero-length sequences.
    seq = (torch.searchsorted(local_cu, pos, right=True) - 1).clamp(max=cu.numel() - 2)
    offset = pos - local_cu[seq]
    half_chunk = torch.div(cu[seq + 1] - cu[seq], 2 * cp_size, rounding_mode="floor")
    in_first_chunk = offset < half_chunk
    chunk_start = torch.where(in_first_chunk, cp_rank * half_chunk, (2 * cp_size - 2 - cp_rank) * half_chunk)
    return cu[seq] + chunk_start + offset
