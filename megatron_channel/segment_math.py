"""Pure tensor math: packed-sequence boundaries, context-parallel cuts, per-channel sums.

Every function here takes tensors and returns tensors of shapes that depend only on
input shapes, never on values. On a GPU none of them reads a value on the host, so none
makes the host wait for the GPU; on CPU tensors ``sequence_stats`` and ``channel_totals``
sum with numpy (``sums_with_numpy``), where reading values makes nothing wait.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

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
    """Whether ``sequence_stats``, ``channel_totals`` and ``sequence_channel_totals`` sum ``tensor`` with numpy.

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


def sequence_stats(values: Tensor | Sequence[Tensor], boundaries: Tensor, count_rows: int = 1) -> Tensor:
    """Each packed sequence's sum of every value row, for ``[boundaries[i], boundaries[i+1])``.

    One pass over the tokens whatever the number of sequences and rows, every row read once:
    ``sequence_stats_reduceat`` where ``sums_with_numpy``, else ``sequence_stats_prefix``. All
    rows are cut at the same boundaries, so one loss-mask row serves as the token count of the
    losses and of the correct-token flags alike.

    Args:
        values: ``V`` rows of ``T`` float32 per-token values, a ``[V, T]`` tensor or ``V`` tensors of
            ``T`` elements (summed where they lie, not stacked), e.g. ``(masked losses, masked
            correct-token flags, loss mask)``: sums first, then ``count_rows`` counts.
        boundaries: ``[N + 1]`` int32 or int64, non-decreasing, within ``[0, T]``, starting at
            0; zero-length sequences (repeated entries) and tokens after the last entry are
            allowed.
        count_rows: how many trailing rows are token counts (the loss mask); on the torch path
            they are scanned in float32, the sums in float64 (``sequence_stats_prefix``).

    Returns:
        ``[V, N]`` float64 on the tokens' device: row ``v`` holds each sequence's sum of row ``v``.
    """
    if sums_with_numpy(values if isinstance(values, Tensor) else values[0]):
        return sequence_stats_reduceat(values, boundaries)
    return sequence_stats_prefix(values, boundaries, count_rows)


def sequence_stats_prefix(values: Tensor | Sequence[Tensor], boundaries: Tensor, count_rows: int = 1) -> Tensor:
    """``sequence_stats`` by prefix sums and one gather at the ``N + 1`` boundaries (any device).

    Reads no value on the host. Each row is scanned into its own prefix and gathered at the
    boundaries, the prefix freed before the next row's is built; one difference for all
    rows. The sum rows' prefix is float64, so the difference of two large prefix sums stays
    exact to ~1e-12 relative; the count rows' prefix is float32, exact while the microbatch
    has fewer than 2^24 tokens of 0/1 mask. A row's sums do not depend on the rows beside it.
    Extra memory: one prefix at a time, 8 bytes per token (a sum row's).
    """
    rows = values.unbind(0) if isinstance(values, Tensor) else values
    tokens = rows[0].numel()
    first_count = len(rows) - count_rows
    at_boundaries = []
    for i, row in enumerate(rows):
        if i < first_count:
            prefix = row.new_empty(tokens + 1, dtype=torch.float64)
            prefix[0] = 0
            # Cast into the prefix buffer and scan in place: cumsum(dtype=float64) would allocate
            # a second float64 copy of the tokens.
            prefix[1:].copy_(row).cumsum_(0)
        else:
            prefix = row.new_empty(tokens + 1, dtype=torch.float32)
            prefix[0] = 0
            torch.cumsum(row, 0, out=prefix[1:])
        at_boundaries.append(prefix.index_select(0, boundaries))
        del prefix  # before the next row's is allocated
    gathered = torch.stack(at_boundaries)  # float64 with a sum row among them (type promotion)
    if gathered.dtype != torch.float64:
        gathered = gathered.double()
    return gathered.diff(dim=1)


def sequence_stats_reduceat(values: Tensor | Sequence[Tensor], boundaries: Tensor) -> Tensor:
    """``sequence_stats`` of CPU tensors by numpy's ``add.reduceat``; reads the values.

    Each sequence of each row is summed in float32 by numpy's pairwise summation (relative
    error ~1e-7, like stock ``lm loss``, itself a float32 sum); counts are exact below 2^24
    tokens per sequence. The tokens are not copied: a ``[V, T]`` tensor is cut in one call, a
    sequence of rows one call per row (the same sums, bit for bit). Only the sequences that
    start before the end of the tokens are cut: the zero-length ones after them (a fixed-length
    sequence list's empty slots, ``compact_sequences``) cost nothing here.
    """
    sums, nonempty = _leading_sequence_sums(values, boundaries)
    stats = np.zeros((sums.shape[0], boundaries.numel() - 1), dtype=np.float64)
    np.copyto(stats[:, : sums.shape[1]], sums, where=nonempty)  # not a product: 0 * inf is no 0
    return torch.from_numpy(stats)


def _leading_sequence_sums(values: Tensor | Sequence[Tensor], boundaries: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``sequence_stats_reduceat`` of the first ``n`` sequences, those that start before the end of
    the tokens (every later one is empty): ``[V, n]`` sums in the rows' dtype, right where ``[n]`` bool
    ``nonempty`` holds and arbitrary where it does not (the caller zeroes or drops those)."""
    stacked = isinstance(values, Tensor)
    rows = values.numpy() if stacked else [row.numpy() for row in values]
    bounds = boundaries.numpy()
    # reduceat cuts at indices below T only and sums from the last one to the end of the tokens:
    # cut at the boundaries below T, which start the first n sequences, the last of which ends
    # at T unless tokens follow the last boundary (then that final piece is no sequence's, and
    # is dropped). A repeated index gives x[i], not 0: hence ``nonempty``.
    starts = bounds[: bounds.searchsorted(rows[0].shape[0])]
    n = min(starts.shape[0], bounds.shape[0] - 1)
    # Written in place, in the rows' own dtype: float32 pieces, as a float32 sum makes them.
    sums = np.empty((len(rows), starts.shape[0]), dtype=rows[0].dtype)
    if n:
        if stacked:
            np.add.reduceat(rows, starts, axis=1, out=sums)
        else:
            for total, row in zip(sums, rows):
                np.add.reduceat(row, starts, out=total)
    return sums[:, :n], bounds[:n] < bounds[1 : n + 1]


@functools.lru_cache(maxsize=None)
def _channel_column(num_channels: int, device: torch.device) -> Tensor:
    """``[K, 1]`` int64 ``0..K-1``, kept so the row path does not build it every microbatch."""
    return torch.arange(num_channels, device=device).view(-1, 1)


def _pick_columns(totals: Tensor, columns: Sequence[int] | None) -> Tensor:
    """``totals[:, columns]`` (repeats allowed) without an index tensor, which a GPU would
    have to receive from the host."""
    return totals if columns is None else torch.stack([totals.select(1, c) for c in columns], 1)


def row_channel_totals(values: Tensor | Sequence[Tensor], rows: int, channels: Tensor, num_channels: int,
                       columns: Sequence[int] | None = None) -> Tensor:
    """Per-channel totals of every value row over unpacked rows, one channel id per row.

    A one-hot ``[K, R]`` matrix times the ``[R, V]`` row sums: a handful of ops whatever the
    device and the number of value rows, so the CPU pays little dispatch and a GPU reads no
    value on the host. Untracked rows (-1) match no channel. Sums are float64, so the product
    is exact to float64 rounding and no TF32 matmul setting can touch it.

    Args:
        values: ``V`` value rows of ``R * s`` float32 (no autograd history), a ``[V, R * s]``
            tensor or ``V`` tensors, e.g. ``(masked losses, loss mask)``.
        rows: R.
        channels: ``[R]`` integer channel id per row; ``-1`` = untracked (another length makes
            the product fail, never regroup the rows).
        num_channels: K.
        columns: the value rows to return, in this order, repeats allowed (default all).

    Returns:
        ``[K, V]`` (``[K, len(columns)]``) float32 per-channel totals (zeros when absent), on the
        tokens' device: ``[loss_sum, token_count]`` for ``(masked losses, loss mask)``.
    """
    if isinstance(values, Tensor):
        flat, count = values, values.shape[0]
    else:
        flat, count = torch.cat(list(values)), len(values)
    row_sums = flat.reshape(count, rows, -1).sum(2, dtype=torch.float64)  # [V, R]
    one_hot = (_channel_column(num_channels, channels.device) == channels).to(torch.float64)  # [K, R]
    return _pick_columns(torch.mm(one_hot, row_sums.t()), columns).float()


def channel_totals(segment_stats: Tensor, segment_channels: Tensor, num_channels: int,
                   columns: Sequence[int] | None = None) -> Tensor:
    """Add each segment's sums (every value row) into its channel.

    Args:
        segment_stats: ``[V, N]`` float64 or float32, e.g. ``[loss_sum, token_count]`` per segment
            (``sequence_stats``).
        segment_channels: ``[N]`` integer channel id per segment; ``-1`` = untracked.
        num_channels: K.
        columns: the rows of ``segment_stats`` to return, in this order, repeats allowed
            (default all): ``(0, 2, 1, 2)`` of ``[loss, correct, count]`` gives per channel the two
            pairs ``[loss_sum, token_count, correct, token_count]``.

    Returns:
        ``[K, V]`` (``[K, len(columns)]``) float32 per-channel totals (zeros when absent), on the
        segments' device.
    """
    if sums_with_numpy(segment_stats):
        return _bincount_totals(segment_stats.numpy(), segment_channels.numpy(), num_channels, columns)
    # -1 (untracked) lands in an extra bin K that is dropped, so no data-dependent filtering (a
    # host sync) is needed; valid ids 0..K-1 are unchanged.
    bins = num_channels + 1
    ids = segment_channels.long().remainder(bins)
    totals = segment_stats.new_zeros(bins, segment_stats.shape[0]).index_add_(0, ids, segment_stats.t())
    return _pick_columns(totals[:num_channels], columns).float()


def _bincount_totals(stats: np.ndarray, channels: np.ndarray, num_channels: int, columns: Sequence[int] | None,
                     counted: np.ndarray | None = None) -> Tensor:
    """``channel_totals`` of numpy stats, one float64 ``bincount`` per row; segments where the
    bool ``counted`` is False count in no channel."""
    # -1 (untracked) lands in an extra bin 0 that is dropped: ids + 1 is cheaper than a modulo,
    # and bincount wants intp.
    ids = np.add(channels, 1, dtype=np.intp)
    if counted is not None:
        ids *= counted
    sums = [np.bincount(ids, row, num_channels + 1) for row in stats]
    picked = range(len(sums)) if columns is None else columns
    totals = np.empty((num_channels + 1, len(picked)), dtype=np.float32)
    for j, row in enumerate(picked):
        totals[:, j] = sums[row]
    return torch.from_numpy(totals[1:])


def sequence_channel_totals(values: Tensor | Sequence[Tensor], boundaries: Tensor, segment_channels: Tensor,
                            num_channels: int, columns: Sequence[int] | None = None, count_rows: int = 1) -> Tensor:
    """``channel_totals(sequence_stats(values, boundaries, count_rows), segment_channels, ...)``.

    The same numbers in one call: where ``sums_with_numpy``, only the sequences that start
    before the end of the tokens are summed and binned, so the empty slots after them cost nothing
    (a bincount adds the slots of one bin one after another, each waiting for the last).

    Args:
        values, boundaries, count_rows: as ``sequence_stats``.
        segment_channels: integer channel id per sequence, ``-1`` = untracked: ``N`` or more
            entries, those past ``N`` ignored (a flattened ``channels`` as the batch holds it).
        num_channels, columns: as ``channel_totals``.

    Returns:
        ``[K, V]`` (``[K, len(columns)]``) float32 per-channel totals, on the tokens' device.
    """
    if sums_with_numpy(values if isinstance(values, Tensor) else values[0]):
        sums, nonempty = _leading_sequence_sums(values, boundaries)
        return _bincount_totals(sums, segment_channels.numpy()[: sums.shape[1]], num_channels, columns, nonempty)
    stats = sequence_stats_prefix(values, boundaries, count_rows)
    return channel_totals(stats, segment_channels[: stats.shape[1]], num_channels, columns)


def merge_packed_rows(cu_seqlens: Tensor, row_length: int) -> Tensor:
    """Concatenate per-row cumulative lengths into one sequence list over all rows.

    A THD micro-batch of R rows of ``row_length`` tokens is fed to the model as one
    ``[1, R * row_length]`` stream; sequence ``j * (L - 1) + i`` of the result is sequence
    ``i`` of row ``j`` (padding entries stay as zero-length sequences; ``compact_sequences``
    removes them).

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


def sequence_slots(lengths: Tensor, capacity: int) -> Tensor:
    """Where each sequence goes when the empty ones are squeezed out of a list of ``capacity``.

    Args:
        lengths: ``[M]`` integer sequence lengths (the padded ones where sequences are padded).
        capacity: C, the length of the compacted list.

    Returns:
        ``[M]`` int64: non-empty sequence ``i`` goes to slot ``k`` (it is the k-th non-empty
        one, ``k < C``); every other sequence to its own slot ``C + i``, past the list, so the
        indices are unique (a scatter stays deterministic). Non-empty sequences past the
        capacity are dropped this way: ``compact_sequences``' callers check the count first.
    """
    keep = lengths > 0
    slot = torch.cumsum(keep, 0) - 1
    unused = capacity + torch.arange(lengths.numel(), device=lengths.device)
    return torch.where(keep & (slot < capacity), slot, unused)


def compact_boundaries(boundaries: Tensor, slots: Tensor, capacity: int) -> Tensor:
    """``[M + 1]`` non-decreasing boundaries -> ``[C + 1]`` with only the slotted sequences.

    Sequence ``i`` ends at ``boundaries[i + 1]``; the compacted list puts that end at
    ``slots[i] + 1``. Slots no sequence took repeat the last end before them: zero-length
    sequences, all at the end of the list.
    """
    ends = boundaries.new_zeros(capacity + slots.numel()).scatter_(0, slots, boundaries[1:])
    ends = torch.cummax(ends[:capacity], dim=0).values
    return torch.cat([boundaries[:1], ends])


def compact_sequences(cu_seqlens: Tensor, row_length: int, capacity: int, cu_seqlens_padded: Tensor | None = None,
                      channels: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Merge packed rows into one THD sequence list of fixed length with no empty sequences but at its end.

    Rows of a microbatch reach attention as one ``[1, R * row_length]`` stream. Padding
    entries of ``cu_seqlens`` (Megatron's SFT rows pad it to ``row_length + 1`` entries) would
    be zero-length sequences, thousands per microbatch, which attention kernels launch work
    for; here the non-empty sequences come first, in order, and only ``capacity - n`` empty
    ones follow, so the list's length is fixed (tensor-parallel ranks allocate it) and small.
    A sequence is empty when its padded length is 0 (``cu_seqlens_padded`` where given).

    Args:
        cu_seqlens: ``[R, L]`` integer cumulative lengths per row, each row starting at 0 (and
            ending at ``row_length`` when ``R > 1``).
        row_length: tokens per row.
        capacity: C, sequences in the result; at least the number of non-empty sequences
            (checked by the caller; the excess would be dropped).
        cu_seqlens_padded: ``[R, L]`` padded boundaries, or None.
        channels: ``[R, >= L - 1]`` channel id per sequence, or None.

    Returns:
        ``cu_seqlens`` ``[C + 1]``, ``cu_seqlens_padded`` ``[C + 1]`` (or None) in the input
        dtypes, and ``channels`` ``[C]`` (-1 on empty slots, or None). Shapes depend only on
        the input shapes and ``capacity``; nothing is read on the host.
    """
    merged = merge_packed_rows(cu_seqlens, row_length)
    merged_padded = None if cu_seqlens_padded is None else merge_packed_rows(cu_seqlens_padded, row_length)
    layout = merged if merged_padded is None else merged_padded
    slots = sequence_slots(layout.diff(), capacity)
    compact = compact_boundaries(merged, slots, capacity)
    compact_padded = None if merged_padded is None else compact_boundaries(merged_padded, slots, capacity)
    compact_channels = None
    if channels is not None:
        per_sequence = channels[:, : cu_seqlens.shape[1] - 1].reshape(-1)
        compact_channels = per_sequence.new_full((capacity + slots.numel(),), -1).scatter_(0, slots, per_sequence)
        compact_channels = compact_channels[:capacity]
    return compact, compact_padded, compact_channels


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
