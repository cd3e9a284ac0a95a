"""Pure tensor math: packed-sequence boundaries, context-parallel cuts, per-channel sums.

Every function here takes tensors and returns tensors of shapes that depend only on
input shapes, never on values, so none of them makes the host wait for the GPU.
"""

from __future__ import annotations

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
        ``[N + 1]`` int64 local boundaries.
    """
    cu = cu_seqlens.long()
    return cu if cp_size == 1 else torch.div(cu, cp_size, rounding_mode="floor")


def segment_sums(values: Tensor, boundaries: Tensor) -> Tensor:
    """Sum of ``values`` over each segment ``[boundaries[i], boundaries[i+1])``.

    One float64 prefix sum and a gather at the ``N + 1`` boundaries: cost is one pass
    over the tokens whatever the number of segments, and float64 keeps the difference of
    two large prefix sums exact to ~1e-12 relative.

    Args:
        values: ``[T]`` floating values (masked per-token losses, or the mask itself).
        boundaries: ``[N + 1]`` int64, non-decreasing, within ``[0, T]``; zero-length
            segments (repeated entries) are allowed.

    Returns:
        ``[N]`` float64 segment sums.
    """
    if values.numel() == 0:
        return torch.zeros(boundaries.numel() - 1, dtype=torch.float64, device=values.device)
    prefix = values.cumsum(0, dtype=torch.float64)
    # prefix[b - 1] is the sum of values[:b]; b == 0 has no entry, its sum is 0.
    upto = prefix[(boundaries - 1).clamp(min=0)].masked_fill(boundaries == 0, 0.0)
    return upto[1:] - upto[:-1]


def channel_totals(segment_stats: Tensor, segment_channels: Tensor, num_channels: int) -> Tensor:
    """Add each segment's ``[loss_sum, token_count]`` into its channel.

    Args:
        segment_stats: ``[N, 2]`` float64, one ``[loss_sum, token_count]`` per segment.
        segment_channels: ``[N]`` integer channel id per segment; ``-1`` = untracked.
        num_channels: K.

    Returns:
        ``[K, 2]`` float32 ``[loss_sum, token_count]`` per channel (zeros when absent).
    """
    ids = segment_channels.long()
    # Untracked segments go to an extra bin K that is dropped, so no data-dependent
    # filtering (a host sync) is needed.
    ids = torch.where(ids < 0, num_channels, ids)
    bins = segment_stats.new_zeros(num_channels + 1, 2).index_add_(0, ids, segment_stats)
    return bins[:num_channels].float()


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
