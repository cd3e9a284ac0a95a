"""From the data iterator to the tensors one rank's model chunk needs.

Order: read on tensor-parallel rank 0 and check values there on the CPU, merge packed rows
into one THD sequence list of the layout's fixed length (real sequences first), move to the
model's device, broadcast to the TP group (``channels`` included, which Megatron's own
broadcast drops), cut for context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams

from ..megatron_internals.core_api import batch_on_this_cp_rank
from ..megatron_internals.core_api import packed_seq_params as packed_seq_params_of_release
from ..segment_math import compact_sequences, thd_partition_index
from .batch_forms import canonical_batch
from .checks import ChannelBatchError, check_batch, check_max_seqlen, value_on_cpu
from .layout import DTYPES, MAX_SEQUENCES_FLAG, SEQUENCE_KEYS, BatchLayout, Topology


@dataclass
class ModelInputs:
    """What one forward pass and its loss need, already cut for this rank.

    Sequence tensors are ``[b, s_local]`` unpacked or ``[1, b * s / cp]`` packed;
    ``channels`` is ``[b]`` unpacked or ``[layout.sequence_capacity]`` packed. Fields this
    pipeline stage does not need are None.
    """

    tokens: Tensor | None = None
    position_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    labels: Tensor | None = None
    loss_mask: Tensor | None = None
    channels: Tensor | None = None
    packed_seq_params: PackedSeqParams | None = None


def get_model_inputs(data_iterator, num_channels: int, layout: BatchLayout | None, topo: Topology,
                     device: torch.device, validate: bool = True, fixed_max_seqlen: bool = False,
                     sequence_index: bool = False) -> ModelInputs:
    """Read, check, broadcast, merge and cut one microbatch for this rank's model chunk.

    Args:
        data_iterator: yields dicts of CPU tensors (the batch contract of ``make_forward_step``).
        num_channels: K, for the id check.
        layout: fixed shapes; None reads them off the batch (no tensor parallelism).
        topo: this rank's place (``Topology.current``).
        device: the model's device.
        validate: check values on TP rank 0 while they are on the CPU.
        fixed_max_seqlen: packed rows: give attention the row length as ``max_seqlen`` even
            where the batch gives its own (CUDA graphs replay only the captured value).
        sequence_index: packed rows: also give ``PackedSeqParams.seq_idx``, the packed sequence
            of every token, which Mamba layers need to keep sequences apart.
    """
    if not stage_reads_batch(layout, topo, data_iterator):
        return ModelInputs()
    batch, max_seqlen = None, None
    if topo.is_tp_src:
        batch, layout, max_seqlen = read_batch(data_iterator, num_channels, layout, topo, device, validate)
    if topo.tp_size > 1:
        batch = broadcast_batch(batch, topo.needed_keys(layout), layout, topo, device)
    if topo.tp_size > 1 or fixed_max_seqlen:
        # TP receivers cannot know the batch's own bound without another collective, and CUDA
        # graphs replay the captured one: all use the row length.
        max_seqlen = None
    if layout.packed:
        return packed_inputs(batch, layout, topo, max_seqlen, sequence_index)
    if topo.cp_size > 1:
        batch.update(batch_on_this_cp_rank({k: v for k, v in batch.items() if k != "channels"}, topo.cp_group))
    return ModelInputs(**batch)


def stage_reads_batch(layout: BatchLayout | None, topo: Topology, data_iterator) -> bool:
    """First and last pipeline stages read the batch; a middle one only for packed rows' ``cu_seqlens``."""
    if topo.first_stage or topo.last_stage:
        return True
    # The data iterator of a middle stage exists when the datasets are built there.
    return layout.packed if layout is not None else data_iterator is not None


def read_batch(data_iterator, num_channels: int, layout: BatchLayout | None, topo: Topology,
               device: torch.device, validate: bool) -> tuple[dict[str, Tensor], BatchLayout, int | None]:
    """On TP rank 0: the next raw microbatch, checked on the CPU, in the contract's dtypes on
    ``device``; its layout; and the host ``max_seqlen`` it gave, at most the row length (or None)."""
    if data_iterator is None:
        middle = not (topo.first_stage or topo.last_stage)
        raise ChannelBatchError(
            "this pipeline stage has no data iterator but needs the batch"
            + (" (packed rows: every stage needs cu_seqlens)" if middle else "")
            + "; build the datasets on tensor-parallel rank 0 of this stage too"
        )
    raw, max_seqlen = canonical_batch(next(data_iterator), validate)
    if layout is None:
        layout = BatchLayout.of_batch(raw)
    keys = topo.needed_keys(layout)
    if validate:
        check_batch(raw, keys, layout, num_channels, topo.cp_size)
        if max_seqlen is not None and layout.packed:
            check_max_seqlen(max_seqlen, raw.get("cu_seqlens_padded", raw["cu_seqlens"]), layout)
    fields = {key: raw[key] for key in keys}
    if layout.packed:
        fields.update(merged_sequences(fields, layout, validated=validate))
    batch = {key: to_contract(key, value, device) for key, value in fields.items()}
    return batch, layout, None if max_seqlen is None else min(max_seqlen, layout.seq_length)


def merged_sequences(fields: dict[str, Tensor], layout: BatchLayout, validated: bool) -> dict[str, Tensor]:
    """Packed rows' ``cu_seqlens`` (``_padded``) and ``channels`` as one list of
    ``layout.sequence_capacity`` sequences over the microbatch (``compact_sequences``).

    ``validated``: ``check_batch`` ran, so ``check_sequence_count`` counted boundaries on the CPU.
    """
    rows = layout.micro_batch_size
    padded = fields.get("cu_seqlens_padded")
    channels = fields.get("channels")
    cu, cu_padded, channels = compact_sequences(
        fields["cu_seqlens"].reshape(rows, -1), layout.seq_length, layout.sequence_capacity,
        cu_seqlens_padded=None if padded is None else padded.reshape(rows, -1),
        channels=None if channels is None else channels.reshape(rows, -1),
    )
    given = (fields["cu_seqlens"] if padded is None else padded).reshape(rows, -1)  # what check_values counts
    if not (validated and value_on_cpu(given)):
        # Were sequences past the capacity dropped, the list would end short of the last row's
        # end: stop then, without reading a value on the host (a device assert on a GPU).
        compacted = cu if cu_padded is None else cu_padded
        torch._assert_async(compacted[-1] == given[-1, -1] + (rows - 1) * layout.seq_length,
                            f"a packed microbatch holds more sequences than micro_batch_size "
                            f"{rows} x --{MAX_SEQUENCES_FLAG} {layout.max_sequences_per_row}; raise the flag")
    merged = {"cu_seqlens": cu, "cu_seqlens_padded": cu_padded, "channels": channels}
    return {key: value for key, value in merged.items() if key in fields}


def to_contract(key: str, value: Tensor, device: torch.device) -> Tensor:
    """``value`` in the contract's dtype (``DTYPES[key]``), contiguous, on ``device``.

    A host tensor bound for a GPU is pinned first (Megatron's loader pins its batches;
    fields built here are not), so the copy is asynchronous instead of staged by the host.
    """
    value = value.to(dtype=DTYPES[key]).contiguous()
    if value.device != device and value.device.type == "cpu" and device.type == "cuda" and not value.is_pinned():
        value = value.pin_memory()
    return value.to(device=device, non_blocking=True)


def broadcast_batch(batch: dict | None, keys: list[str], layout: BatchLayout, topo: Topology,
                    device: torch.device) -> dict[str, Tensor]:
    """Send ``keys`` from TP rank 0 to its TP group; receivers allocate from ``layout``."""
    shapes = layout.shapes()
    out = {}
    for key in keys:
        if topo.is_tp_src:
            tensor = batch[key]
        else:
            tensor = torch.empty(shapes[key], dtype=DTYPES[key], device=device)
        torch.distributed.broadcast(tensor, topo.tp_src_rank, group=topo.tp_group)
        out[key] = tensor
    return out


def packed_inputs(batch: dict[str, Tensor], layout: BatchLayout, topo: Topology,
                  max_seqlen: int | None = None, sequence_index: bool = False) -> ModelInputs:
    """``[b, s]`` THD rows -> one ``[1, b * s]`` stream (cut for CP) and its ``PackedSeqParams``.

    ``batch``'s ``cu_seqlens`` (``_padded``) are already merged over the microbatch (``[C + 1]``).
    ``sequence_index``: set ``seq_idx`` (Mamba layers; ``sequence_index_of_tokens``).
    """
    rows = {key: value.reshape(1, -1) for key, value in batch.items() if key in SEQUENCE_KEYS}
    cu = batch["cu_seqlens"]
    cu_padded = batch.get("cu_seqlens_padded")
    if topo.cp_size > 1:
        index = thd_partition_index(cu if cu_padded is None else cu_padded,
                                    layout.micro_batch_size * layout.seq_length, topo.cp_size, topo.cp_rank)
        rows = {key: value.index_select(1, index) for key, value in rows.items()}
    # Without a host max_seqlen from the batch, the row length bounds every sequence;
    # reading the true maximum off the boundaries would cost a host sync.
    max_seqlen = layout.seq_length if max_seqlen is None else max_seqlen
    packed_seq_params = packed_seq_params_of_release(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
        # MoE layers route each row on its own (seq_aux_loss) by viewing the stream as
        # [tokens_per_sample, rows]; a row holds s / cp tokens of the local stream.
        tokens_per_sample=layout.seq_length // topo.cp_size,
    )
    if sequence_index:
        packed_seq_params.seq_idx = sequence_index_of_tokens(cu if cu_padded is None else cu_padded,
                                                             layout.micro_batch_size * layout.seq_length)
    channels = batch.get("channels")
    return ModelInputs(**rows, attention_mask=batch.get("attention_mask"),
                       channels=None if channels is None else channels.reshape(-1),
                       packed_seq_params=packed_seq_params)


def sequence_index_of_tokens(boundaries: Tensor, total_tokens: int) -> Tensor:
    """``[1, total_tokens]`` int32: the packed sequence of every token of the (global) stream.

    What Megatron's ``PackedSeqParams(total_tokens=...)`` computes into ``seq_idx`` for Mamba
    layers, whose scan otherwise runs across sequence boundaries: zero-length sequences take
    no token, tokens after the last boundary form one more sequence. Here with a fixed output
    shape, so nothing is read on the host (Megatron's ``repeat_interleave`` would sync).

    Args:
        boundaries: ``[N + 1]`` global (padded) boundaries.
        total_tokens: tokens of the stream, ``micro_batch_size * seq_length``.
    """
    positions = torch.arange(total_tokens, device=boundaries.device, dtype=boundaries.dtype)
    return torch.searchsorted(boundaries[1:].contiguous(), positions, right=True).to(torch.int32).unsqueeze(0)
