"""Data-boundary checks for channel batches, run on CPU tensors before training uses them.

These read tensor values on the host, so they belong where the batch is built (the data
loader side of ``forward_step``), never on GPU tensors in the loss path.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChannelBatchError(ValueError):
    """A batch whose ``channels`` or ``cu_seqlens`` cannot be accounted exactly."""


def check_channel_ids(channels: Tensor, num_channels: int) -> None:
    """``channels`` must be an integer tensor of ids in ``[-1, num_channels)``."""
    if not isinstance(channels, Tensor):
        raise ChannelBatchError(
            f"channels must be a torch integer tensor, got {type(channels).__name__}; "
            "build it with torch.tensor(ids, dtype=torch.long)"
        )
    if channels.dtype == torch.bool or channels.is_floating_point() or channels.is_complex():
        raise ChannelBatchError(
            f"channels must be an integer tensor, got dtype {channels.dtype}; "
            "build it with torch.tensor(ids, dtype=torch.long)"
        )
    if channels.numel() == 0:
        return
    low, high = int(channels.min()), int(channels.max())
    if low < -1 or high >= num_channels:
        bad = low if low < -1 else high
        raise ChannelBatchError(
            f"channels holds id {bad}, but {num_channels} channels are configured: valid ids are "
            f"0..{num_channels - 1}, and -1 for untracked samples"
        )


def check_cu_seqlens(cu_seqlens: Tensor, row_length: int, *, cp_size: int = 1, exact_end: bool = False,
                     name: str = "cu_seqlens") -> None:
    """Each row of ``cu_seqlens`` (``[L]`` or ``[R, L]``) must describe sequences inside its row.

    Rows start at 0, never decrease, and end at most at ``row_length`` (exactly there when
    ``exact_end``). Under context parallelism every boundary is a multiple of ``2 * cp_size``
    and rows end exactly at ``row_length``, as Transformer Engine's THD partitioning needs.
    """
    if cu_seqlens.dtype == torch.bool or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise ChannelBatchError(f"{name} must be an integer tensor (torch.int32), got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() not in (1, 2) or cu_seqlens.shape[-1] < 2:
        raise ChannelBatchError(
            f"{name} must have shape [N + 1] or [rows, N + 1] with N >= 1, got {list(cu_seqlens.shape)}"
        )
    rows = cu_seqlens.reshape(-1, cu_seqlens.shape[-1]).long()
    for r, row in enumerate(rows):
        where = f"{name}[{r}]" if cu_seqlens.dim() == 2 else name
        if row[0] != 0:
            raise ChannelBatchError(f"{where} starts at {int(row[0])}; it must start at 0")
        steps = row[1:] - row[:-1]
        if (steps < 0).any():
            i = int((steps < 0).nonzero()[0])
            raise ChannelBatchError(
                f"{where} decreases at entry {i + 1} ({int(row[i])} -> {int(row[i + 1])}); "
                "cumulative sequence lengths must never decrease"
            )
        end = int(row[-1])
        if end > row_length:
            raise ChannelBatchError(
                f"{where} runs to {end}, past the row's {row_length} tokens; "
                "its last entry must be at most the token count"
            )
        if (exact_end or cp_size > 1) and end != row_length:
            raise ChannelBatchError(
                f"{where} ends at {end} but the row has {row_length} tokens; pad {name} with trailing "
                f"entries equal to {row_length} (Megatron's SFT convention)"
            )
        if cp_size > 1 and (row % (2 * cp_size) != 0).any():
            i = int((row % (2 * cp_size) != 0).nonzero()[0])
            raise ChannelBatchError(
                f"{where}[{i}] = {int(row[i])} is not a multiple of 2 * context_parallel_size = {2 * cp_size}; "
                "pad every packed sequence to a multiple of 2 * cp (Megatron's SFT dataset does)"
            )


def check_packed_channels(channels: Tensor, cu_seqlens: Tensor) -> None:
    """Every sequence of ``cu_seqlens`` needs a channel entry (extra entries are padding slots).

    ``cu_seqlens`` ``[N + 1]`` takes ``channels`` with at least N entries; ``[R, L]`` takes
    ``channels`` ``[R, >= L - 1]``.
    """
    needed = cu_seqlens.shape[-1] - 1
    if cu_seqlens.dim() == 2:
        rows = cu_seqlens.shape[0]
        if channels.dim() != 2 or channels.shape[0] != rows or channels.shape[1] < needed:
            raise ChannelBatchError(
                f"channels has shape {list(channels.shape)} but cu_seqlens {list(cu_seqlens.shape)} "
                f"describes {rows} rows of {needed} sequences; give channels shape [{rows}, >= {needed}], "
                "one id per sequence, -1 for padding slots"
            )
    elif channels.numel() < needed:
        raise ChannelBatchError(
            f"channels has {channels.numel()} entries but cu_seqlens describes {needed} sequences; "
            "give one id per sequence (use -1 for padding slots)"
        )


def check_row_channels(channels: Tensor, rows: int) -> None:
    """Unpacked rows take one channel id per row: ``channels`` ``[rows]``."""
    if channels.dim() != 1 or channels.shape[0] != rows:
        raise ChannelBatchError(
            f"channels has shape {list(channels.shape)} but the batch has {rows} rows; "
            f"give channels shape [{rows}], one id per row"
        )
