"""From the data iterator to the tensors one rank's model chunk needs.

Order: read on tensor-parallel rank 0 and check values there on the CPU, move to the
model's device, broadcast to the TP group (``channels`` included, which Megatron's own
broadcast drops), merge packed rows into one THD stream, cut for context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_batch_on_this_cp_rank

from .config import ChannelConfig
from .segments import merge_packed_rows, thd_partition_index
from .validate import ChannelBatchError, check_channel_ids, check_cu_seqlens, check_packed_channels, check_row_channels

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")

DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
    "attention_mask": torch.bool,
    "cu_seqlens": torch.int32,
    "cu_seqlens_padded": torch.int32,
    "channels": torch.int64,
}


@dataclass(frozen=True)
class BatchLayout:
    """Batch shapes fixed for the whole run, so TP ranks can receive without asking.

    Attributes:
        micro_batch_size: rows per microbatch (``--micro-batch-size``).
        seq_length: tokens per row (``--seq-length``).
        packed: rows hold several sequences described by ``cu_seqlens`` (THD; ``--sft`` or
            ``--dataloader-inter-document-masking``).
        cu_seqlens_length: ``cu_seqlens`` entries per row; default ``seq_length + 1``, the
            fixed length Megatron's SFT dataset pads to.
        cu_seqlens_padded: the batch also carries ``cu_seqlens_padded``.
        attention_mask: the batch carries ``attention_mask`` ``[b, 1, s, s]``
            (``--create-attention-mask-in-dataloader``).
    """

    micro_batch_size: int
    seq_length: int
    packed: bool = False
    cu_seqlens_length: int | None = None
    cu_seqlens_padded: bool = False
    attention_mask: bool = False

    @classmethod
    def from_megatron_args(cls, args=None, training: bool = True) -> "BatchLayout":
        """The layout Megatron's arguments imply; ``training=False``: evaluation's micro batch."""
        if args is None:
            from megatron.training import global_vars

            args = global_vars._GLOBAL_ARGS
            if args is None:
                raise ValueError(
                    "tensor-parallel ranks need the batch shapes: pass make_forward_step(config, "
                    "layout=BatchLayout(micro_batch_size=..., seq_length=..., packed=...)) or run "
                    "inside megatron.training.pretrain, whose --micro-batch-size/--seq-length/--sft give them"
                )
        # Both put several documents in a row with cu_seqlens (THD), attended without a dense mask.
        packed = bool(getattr(args, "sft", False) or getattr(args, "dataloader_inter_document_masking", False))
        eval_rows = getattr(args, "eval_micro_batch_size", None)
        return cls(
            micro_batch_size=args.micro_batch_size if training or not eval_rows else eval_rows,
            seq_length=args.seq_length,
            packed=packed,
            attention_mask=bool(getattr(args, "create_attention_mask_in_dataloader", False)) and not packed,
        )

    @property
    def sequences_per_row(self) -> int:
        return (self.cu_seqlens_length or self.seq_length + 1) - 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        b, s = self.micro_batch_size, self.seq_length
        shapes = {key: (b, s) for key in SEQUENCE_KEYS}
        if self.attention_mask:
            shapes["attention_mask"] = (b, 1, s, s)
        if self.packed:
            shapes["cu_seqlens"] = (b, self.sequences_per_row + 1)
            if self.cu_seqlens_padded:
                shapes["cu_seqlens_padded"] = (b, self.sequences_per_row + 1)
            shapes["channels"] = (b, self.sequences_per_row)
        else:
            shapes["channels"] = (b,)
        return shapes


@dataclass(frozen=True)
class Topology:
    """This rank's place in Megatron's parallel layout, for one model chunk."""

    tp_size: int = 1
    tp_src_rank: int = 0
    tp_group: object = None
    is_tp_src: bool = True
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: object = None
    first_stage: bool = True
    last_stage: bool = True

    @classmethod
    def current(cls, vp_stage: int | None = None) -> "Topology":
        if not parallel_state.model_parallel_is_initialized():
            return cls()
        ignore_virtual = vp_stage is None
        return cls(
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            tp_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            is_tp_src=parallel_state.get_tensor_model_parallel_rank() == 0,
            cp_size=parallel_state.get_context_parallel_world_size(),
            cp_rank=parallel_state.get_context_parallel_rank(),
            cp_group=parallel_state.get_context_parallel_group(),
            first_stage=parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
        )


def needed_keys(layout: BatchLayout, topo: Topology) -> list[str]:
    """Keys this pipeline stage needs: inputs on the first, loss inputs on the last."""
    keys = []
    if topo.first_stage:
        keys += ["tokens", "position_ids"]
    if topo.last_stage:
        keys += ["labels", "loss_mask", "channels"]
    if layout.attention_mask and (topo.first_stage or topo.last_stage):
        keys.append("attention_mask")
    if layout.packed:
        keys.append("cu_seqlens")
        if layout.cu_seqlens_padded:
            keys.append("cu_seqlens_padded")
    return keys


def layout_of(raw: dict, layout: BatchLayout | None) -> BatchLayout:
    """The layout given, or the one a tensor-parallel-free run reads off the batch itself."""
    if layout is not None:
        return layout
    tokens = raw.get("tokens", raw.get("labels"))
    if tokens is None:
        raise ChannelBatchError("batch has neither 'tokens' nor 'labels'")
    cu = raw.get("cu_seqlens")
    return BatchLayout(
        micro_batch_size=tokens.shape[0],
        seq_length=tokens.shape[1],
        packed=cu is not None,
        cu_seqlens_length=None if cu is None else cu.shape[-1],
        cu_seqlens_padded=raw.get("cu_seqlens_padded") is not None,
        attention_mask=raw.get("attention_mask") is not None,
    )


def check_raw_batch(raw: dict, keys: list[str], layout: BatchLayout, config: ChannelConfig, cp_size: int) -> None:
    """Shape and value checks on the CPU batch, before any collective can hang on it."""
    if not isinstance(raw, dict):
        raise ChannelBatchError(f"the data iterator must yield dicts of tensors, got {type(raw).__name__}")
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
    rows = layout.micro_batch_size
    for key in ("channels", "cu_seqlens", "cu_seqlens_padded"):
        if layout.packed and key in keys and raw[key].numel() % rows:
            raise ChannelBatchError(
                f"batch field '{key}' has shape {list(raw[key].shape)}, which does not split into "
                f"{rows} rows (micro_batch_size); give it shape [{rows}, ...]"
            )
    if "channels" in keys and value_on_cpu(raw["channels"]):
        check_channel_ids(raw["channels"], config.num_channels)
        if layout.packed:
            check_packed_channels(raw["channels"].reshape(rows, -1), raw["cu_seqlens"].reshape(rows, -1))
        else:
            check_row_channels(raw["channels"], rows)
    has_padded = "cu_seqlens_padded" in keys
    for key in ("cu_seqlens", "cu_seqlens_padded"):
        if key in keys and value_on_cpu(raw[key]):
            # With cu_seqlens_padded, the CP partition follows it; the real boundaries need only
            # end at the row's end when rows are merged (micro_batch_size > 1).
            strict = key == "cu_seqlens_padded" or not has_padded
            check_cu_seqlens(raw[key].reshape(rows, -1), layout.seq_length, cp_size=cp_size if strict else 1,
                             exact_end=strict or rows > 1, name=key)
    if not layout.packed and cp_size > 1 and layout.seq_length % (2 * cp_size):
        raise ChannelBatchError(
            f"seq_length {layout.seq_length} is not a multiple of 2 * context_parallel_size = {2 * cp_size}"
        )

    # Tensor-parallel receivers allocate from the layout, so every shape must match it exactly.
    shapes = layout.shapes()
    for key in keys:
        value, expected = raw[key], shapes[key]
        if key == "channels" and layout.packed:
            ok = value.numel() % expected[0] == 0 and value.numel() // expected[0] >= expected[1]
            wanted = f"[{expected[0]}, >= {expected[1]}]"
        elif key in ("cu_seqlens", "cu_seqlens_padded"):
            ok, wanted = value.numel() == expected[0] * expected[1], str(list(expected))
        else:
            ok, wanted = tuple(value.shape) == expected, str(list(expected))
        if not ok:
            raise ChannelBatchError(
                f"batch field '{key}' has shape {list(value.shape)}, expected {wanted} "
                "(from micro_batch_size, seq_length and cu_seqlens_length of the BatchLayout)"
            )


def value_on_cpu(t) -> bool:
    return isinstance(t, Tensor) and t.device.type == "cpu"


def _normalize(key: str, value: Tensor, layout: BatchLayout, device: torch.device) -> Tensor:
    if key == "channels" and layout.packed:
        value = value.reshape(layout.micro_batch_size, -1)[:, : layout.sequences_per_row]
    elif key in ("cu_seqlens", "cu_seqlens_padded"):
        value = value.reshape(layout.micro_batch_size, -1)
    return value.to(device=device, dtype=DTYPES[key], non_blocking=True).contiguous()


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


@dataclass
class ModelInputs:
    """What one forward pass and its loss need, already cut for this rank.

    Sequence tensors are ``[b, s_local]`` unpacked or ``[1, b * s / cp]`` packed;
    ``channels`` is ``[b]`` unpacked or ``[b * sequences_per_row]`` packed.
    """

    tokens: Tensor | None
    position_ids: Tensor | None
    attention_mask: Tensor | None
    labels: Tensor | None
    loss_mask: Tensor | None
    channels: Tensor | None
    packed_seq_params: PackedSeqParams | None


def get_model_inputs(data_iterator, config: ChannelConfig, layout: BatchLayout | None, topo: Topology,
                     device: torch.device, validate: bool = True) -> ModelInputs:
    """Read, check, broadcast, merge and cut one microbatch for this rank's model chunk."""
    batch = None
    reads = topo.first_stage or topo.last_stage
    if not reads:
        # A middle pipeline stage needs only packed rows' THD metadata; its data iterator
        # exists when the datasets are built there (launch.is_dataset_built_on_rank).
        reads = layout.packed if layout is not None else data_iterator is not None
    if reads:
        if topo.is_tp_src:
            if data_iterator is None:
                raise ChannelBatchError(
                    "this pipeline stage has no data iterator but needs the batch"
                    + ("" if topo.first_stage or topo.last_stage else " (packed rows: every stage needs cu_seqlens)")
                    + "; build the datasets on tensor-parallel rank 0 of this stage too"
                )
            raw = next(data_iterator)
            layout = layout_of(raw, layout)
            keys = needed_keys(layout, topo)
            if validate:
                check_raw_batch(raw, keys, layout, config, topo.cp_size)
            batch = {key: _normalize(key, raw[key], layout, device) for key in keys}
        else:
            keys = needed_keys(layout, topo)
        if topo.tp_size > 1:
            batch = broadcast_batch(batch, keys, layout, topo, device)
    if batch is None:
        return ModelInputs(None, None, None, None, None, None, None)

    packed_seq_params = None
    if layout.packed:
        batch = _merge_rows(batch, layout)
        cu = batch.pop("cu_seqlens")
        cu_padded = batch.pop("cu_seqlens_padded", None)
        if topo.cp_size > 1:
            index = thd_partition_index(cu if cu_padded is None else cu_padded,
                                        layout.micro_batch_size * layout.seq_length, topo.cp_size, topo.cp_rank)
            for key in SEQUENCE_KEYS:
                if key in batch:
                    batch[key] = batch[key].index_select(1, index)
        # The row length bounds every sequence; reading the true maximum would cost a host sync.
        packed_seq_params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_padded,
            cu_seqlens_kv_padded=cu_padded,
            max_seqlen_q=layout.seq_length,
            max_seqlen_kv=layout.seq_length,
        )
    elif topo.cp_size > 1:
        cut = get_batch_on_this_cp_rank(
            {k: v for k, v in batch.items() if k != "channels"}, is_hybrid_cp=False, cp_group=topo.cp_group
        )
        batch.update(cut)
    return ModelInputs(
        tokens=batch.get("tokens"),
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        labels=batch.get("labels"),
        loss_mask=batch.get("loss_mask"),
        channels=batch.get("channels"),
        packed_seq_params=packed_seq_params,
    )


def _merge_rows(batch: dict[str, Tensor], layout: BatchLayout) -> dict[str, Tensor]:
    """``[b, s]`` THD rows -> one ``[1, b * s]`` stream with one ``cu_seqlens`` list."""
    merged = {}
    for key, value in batch.items():
        if key in SEQUENCE_KEYS:
            merged[key] = value.reshape(1, -1)
        elif key in ("cu_seqlens", "cu_seqlens_padded"):
            merged[key] = merge_packed_rows(value, layout.seq_length)
        elif key == "channels":
            merged[key] = value.reshape(-1)
        else:
            merged[key] = value
    return merged
