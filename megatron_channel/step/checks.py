"""Checks of a channel batch, run on CPU tensors before any collective can hang on it.

These read tensor values on the host, so they run where the batch is built (tensor-parallel
rank 0 of ``forward_step``, before the batch moves to the GPU), never on GPU tensors in the
loss path. ``check_batch`` is the whole check of one raw microbatch; the others check one
field each and are also what ``channel_loss_func(validate=True)`` runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import BOUNDARY_KEYS, MAX_SEQUENCES_FLAG, BatchLayout, broadcasts_to


class ChannelBatchError(ValueError):
    """A batch whose ``channels`` or ``cu_seqlens`` cannot be accounted exactly."""


def is_integer_tensor(t: Tensor) -> bool:
    """Whether ``t`` holds integers (bool, floating and complex dtypes do not count)."""
    return not (t.dtype == torch.bool or t.is_floating_point() or t.is_complex())


def check_channel_ids(channels: Tensor, num_channels: int) -> None:
    """``channels`` must be an integer tensor of ids in ``[-1, num_channels)``."""
    if not isinstance(channels, Tensor):
        raise ChannelBatchError(
            f"channels must be a torch integer tensor, got {type(channels).__name__}; "
            "build it with torch.tensor(ids, dtype=torch.long)"
        )
    if not is_integer_tensor(channels):
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
    if not is_integer_tensor(cu_seqlens):
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


def value_on_cpu(t) -> bool:
    """Whether ``t``'s values can be read without waiting for a GPU."""
    return isinstance(t, Tensor) and t.device.type == "cpu"


def check_batch(raw, keys: list[str], layout: BatchLayout, num_channels: int, cp_size: int) -> None:
    """Everything ``forward_step`` needs of one raw microbatch: fields, values, shapes.

    Args:
        raw: what the data iterator yielded.
        keys: the fields this pipeline stage reads (``Topology.needed_keys``).
        layout: the run's batch shapes.
        num_channels: K; ids must be in ``[-1, K)``.
        cp_size: context-parallel size (packed boundaries must split into ``2 * cp`` chunks).
    """
    check_fields(raw, keys, layout)
    check_values(raw, keys, layout, num_channels, cp_size)
    check_shapes(raw, keys, layout)


def check_fields(raw, keys: list[str], layout: BatchLayout) -> None:
    """A tensor for every key, packed exactly when the layout says so (``raw``: the canonical dict)."""
    if "channels" not in raw and "channels" in keys:
        raise ChannelBatchError(
            "batch has no 'channels' field: give one integer channel id per row (unpacked) or per "
            "sequence of cu_seqlens (packed), -1 for untracked"
        )
    if layout.packed != (raw.get("cu_seqlens") is not None):
        raise ChannelBatchError(
            f"batch {'has' if raw.get('cu_seqlens') is not None else 'lacks'} 'cu_seqlens' but the "
            f"layout says packed={layout.packed}; set BatchLayout(packed=...) (or --sft) to match the data"
        )
    for key in keys:
        if not isinstance(raw.get(key), Tensor):
            raise ChannelBatchError(f"batch field '{key}' is missing or not a tensor")
    if "attention_mask" in raw and not layout.attention_mask:
        raise ChannelBatchError(
            "batch carries 'attention_mask' but the layout has none, so it would be dropped; give "
            "BatchLayout(attention_mask=True or its shape) (--create-attention-mask-in-dataloader), or leave "
            "the mask out of the batch for causal attention"
        )
    rows = layout.micro_batch_size
    for key in ("channels", *BOUNDARY_KEYS):
        if layout.packed and key in keys and raw[key].numel() % rows:
            raise ChannelBatchError(
                f"batch field '{key}' has shape {list(raw[key].shape)}, which does not split into "
                f"{rows} rows (micro_batch_size); give it shape [{rows}, ...]"
            )


def check_attention_mask(mask: Tensor, layout: BatchLayout) -> None:
    """Megatron's mask: bool (True = masked), broadcasting to ``[b, 1, s, s]``."""
    b, s = layout.micro_batch_size, layout.seq_length
    if mask.dtype != torch.bool:
        raise ChannelBatchError(
            f"batch field 'attention_mask' has dtype {mask.dtype}; Megatron's mask is bool with True = masked "
            "(get_ltor_masks_and_position_ids). A Hugging Face padding mask (1 = attend) is not one: leave it "
            "out for causal attention, or pass ~mask.bool()[:, None, None, :]"
        )
    if not broadcasts_to(tuple(mask.shape), (b, 1, s, s)):
        raise ChannelBatchError(
            f"batch field 'attention_mask' has shape {list(mask.shape)}, which does not broadcast to "
            f"[b, 1, s, s] = {[b, 1, s, s]}; give [b, 1, s, s], [1, 1, s, s], or no mask (causal)"
        )


def check_values(raw: dict, keys: list[str], layout: BatchLayout, num_channels: int, cp_size: int) -> None:
    """Channel ids and ``cu_seqlens`` values, where they are still on the CPU."""
    rows = layout.micro_batch_size
    if "channels" in keys and value_on_cpu(raw["channels"]):
        check_channel_ids(raw["channels"], num_channels)
        if layout.packed:
            check_packed_channels(raw["channels"].reshape(rows, -1), raw["cu_seqlens"].reshape(rows, -1))
        else:
            check_row_channels(raw["channels"], rows)
    has_padded = "cu_seqlens_padded" in keys
    for key in BOUNDARY_KEYS:
        if key in keys and value_on_cpu(raw[key]):
            # With cu_seqlens_padded, the CP partition follows it; the real boundaries need only
            # end at the row's end when rows are merged (micro_batch_size > 1).
            strict = key == "cu_seqlens_padded" or not has_padded
            check_cu_seqlens(raw[key].reshape(rows, -1), layout.seq_length, cp_size=cp_size if strict else 1,
                             exact_end=strict or rows > 1, name=key)
    if layout.packed:
        boundaries = raw["cu_seqlens_padded" if has_padded else "cu_seqlens"]
        if value_on_cpu(boundaries):
            check_sequence_count(boundaries, layout)
    if not layout.packed and cp_size > 1 and layout.seq_length % (2 * cp_size):
        raise ChannelBatchError(
            f"seq_length {layout.seq_length} is not a multiple of 2 * context_parallel_size = {2 * cp_size}"
        )
    mask = raw.get("attention_mask")
    if not layout.packed and cp_size > 1 and "attention_mask" in keys and mask.shape[-2] != layout.seq_length:
        raise ChannelBatchError(
            f"batch field 'attention_mask' has shape {list(mask.shape)}; context parallelism cuts the mask's "
            f"query dimension (-2), so it must be the full {layout.seq_length}: give [b or 1, 1, s, s]"
        )


def check_shapes(raw: dict, keys: list[str], layout: BatchLayout) -> None:
    """Every field in the shape ``layout`` implies: tensor-parallel receivers allocate from it.

    Sequence fields are exactly ``[b, s]``; packed rows' ``cu_seqlens`` (and
    ``cu_seqlens_padded``, the same shape) are ``[b, L]`` for any ``L`` and ``channels``
    ``[b, >= L - 1]``, since they reach the receivers merged into the layout's fixed length.
    """
    shapes = layout.shapes()
    if "attention_mask" in keys:
        keys = [k for k in keys if k != "attention_mask"] + ["attention_mask"]
    rows = layout.micro_batch_size
    entries = raw["cu_seqlens"].numel() // rows if layout.packed else 0
    for key in keys:
        value = raw[key]
        if key == "attention_mask":
            check_attention_mask(value, layout)
        if key == "channels" and layout.packed:
            ok, wanted = value.numel() // rows >= entries - 1, f"[{rows}, >= {entries - 1}]"
        elif key in BOUNDARY_KEYS:
            ok, wanted = value.numel() == rows * entries, f"[{rows}, {entries}] like cu_seqlens"
        else:
            ok, wanted = tuple(value.shape) == shapes[key], str(list(shapes[key]))
        if not ok:
            fix = ("; under tensor parallelism give the mask's shape as BatchLayout(attention_mask=shape)"
                   if key == "attention_mask" else "")
            raise ChannelBatchError(
                f"batch field '{key}' has shape {list(value.shape)}, expected {wanted} "
                f"(from micro_batch_size and seq_length of the BatchLayout){fix}"
            )


def check_sequence_count(boundaries: Tensor, layout: BatchLayout) -> None:
    """A packed microbatch may hold at most ``layout.sequence_capacity`` non-empty sequences.

    Args:
        boundaries: ``[b, L]`` CPU boundaries, the padded ones where the batch has them.
    """
    lengths = boundaries.reshape(layout.micro_batch_size, -1).long().diff(dim=1)
    per_row = (lengths > 0).sum(1).tolist()
    if sum(per_row) > layout.sequence_capacity:
        raise ChannelBatchError(
            f"the microbatch packs {sum(per_row)} sequences (per row: {per_row}), more than micro_batch_size "
            f"{layout.micro_batch_size} x --{MAX_SEQUENCES_FLAG} {layout.max_sequences_per_row} = "
            f"{layout.sequence_capacity}, the sequences attention is handed; raise --{MAX_SEQUENCES_FLAG} "
            "(BatchLayout(max_sequences_per_row=...)) or pack fewer, longer sequences per row"
        )


def check_max_seqlen(max_seqlen: int, cu_seqlens: Tensor, layout: BatchLayout) -> None:
    """A ``max_seqlen`` the batch gives must bound every packed sequence (checked on the CPU)."""
    if not value_on_cpu(cu_seqlens):
        return
    longest = int(cu_seqlens.reshape(layout.micro_batch_size, -1).long().diff(dim=1).max())
    if max_seqlen < longest or max_seqlen < 1:
        raise ChannelBatchError(
            f"batch field 'max_seqlen' = {max_seqlen}, but the longest packed sequence has {longest} tokens; "
            "give the longest sequence's length, or leave max_seqlen out (the row length bounds it)"
        )
