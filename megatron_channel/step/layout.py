"""The batch contract: which fields a microbatch has, their dtypes and shapes, and where this rank sits.

``BatchLayout`` fixes the shapes for the whole run, so tensor-parallel ranks other than 0
can allocate the broadcast batch without asking; ``Topology`` is this rank's place in
Megatron's parallel layout for one model chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core import parallel_state

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
BOUNDARY_KEYS = ("cu_seqlens", "cu_seqlens_padded")

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


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (without growing ``target``)."""
    try:
        return torch.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except RuntimeError:
        return False


def rows_are_packed(args) -> bool:
    """Whether Megatron's ``args`` put several documents in a row, attended through ``cu_seqlens``.

    ``--sft`` and ``--dataloader-inter-document-masking`` both do (THD rows, no dense mask).
    """
    return bool(getattr(args, "sft", False) or getattr(args, "dataloader_inter_document_masking", False))


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
        attention_mask: the batch carries a bool ``attention_mask``: ``True`` for
            ``[b, 1, s, s]`` (``--create-attention-mask-in-dataloader``), or its exact shape, any
            that broadcasts to ``[b, 1, s, s]`` (``(1, 1, s, s)`` from Megatron's
            ``get_ltor_masks_and_position_ids``). ``False``: no mask (causal attention).
    """

    micro_batch_size: int
    seq_length: int
    packed: bool = False
    cu_seqlens_length: int | None = None
    cu_seqlens_padded: bool = False
    attention_mask: bool | tuple[int, ...] = False

    def __post_init__(self):
        if not isinstance(self.attention_mask, bool):
            shape = tuple(self.attention_mask)
            full = (self.micro_batch_size, 1, self.seq_length, self.seq_length)
            if not broadcasts_to(shape, full):
                raise ValueError(
                    f"BatchLayout(attention_mask={shape}) does not broadcast to [b, 1, s, s] = {list(full)}; "
                    "give True for [b, 1, s, s], the shape of the mask the data carries, or False for none"
                )
            object.__setattr__(self, "attention_mask", shape)

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
        packed = rows_are_packed(args)
        eval_rows = getattr(args, "eval_micro_batch_size", None)
        return cls(
            micro_batch_size=args.micro_batch_size if training or not eval_rows else eval_rows,
            seq_length=args.seq_length,
            packed=packed,
            attention_mask=bool(getattr(args, "create_attention_mask_in_dataloader", False)) and not packed,
        )

    @classmethod
    def of_batch(cls, raw: dict) -> "BatchLayout":
        """The layout a run without tensor parallelism reads off the batch itself."""
        from .checks import ChannelBatchError

        tokens = raw.get("tokens", raw.get("labels"))
        if tokens is None:
            raise ChannelBatchError("batch has neither 'tokens' nor 'labels'")
        if tokens.dim() != 2:
            raise ChannelBatchError(
                f"batch field '{'tokens' if 'tokens' in raw else 'labels'}' has shape {list(tokens.shape)}; "
                "give [b, s] rows, or one row as [s]"
            )
        cu = raw.get("cu_seqlens")
        mask = raw.get("attention_mask")
        mask_shape = tuple(mask.shape) if hasattr(mask, "shape") else False
        return cls(
            micro_batch_size=tokens.shape[0],
            seq_length=tokens.shape[1],
            packed=cu is not None,
            cu_seqlens_length=None if cu is None else cu.shape[-1],
            cu_seqlens_padded=raw.get("cu_seqlens_padded") is not None,
            attention_mask=mask_shape if mask_shape and broadcasts_to(mask_shape, (
                tokens.shape[0], 1, tokens.shape[1], tokens.shape[1])) else bool(mask_shape),
        )

    @property
    def sequences_per_row(self) -> int:
        return (self.cu_seqlens_length or self.seq_length + 1) - 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every field's shape as TP receivers allocate it."""
        b, s = self.micro_batch_size, self.seq_length
        shapes = {key: (b, s) for key in SEQUENCE_KEYS}
        if self.attention_mask is True:
            shapes["attention_mask"] = (b, 1, s, s)
        elif self.attention_mask:
            shapes["attention_mask"] = self.attention_mask
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

    def needed_keys(self, layout: BatchLayout) -> list[str]:
        """Keys this pipeline stage needs: inputs on the first, loss inputs on the last."""
        keys = []
        if self.first_stage:
            keys += ["tokens", "position_ids"]
        if self.last_stage:
            keys += ["labels", "loss_mask", "channels"]
        if layout.attention_mask and (self.first_stage or self.last_stage):
            keys.append("attention_mask")
        if layout.packed:
            keys.append("cu_seqlens")
            if layout.cu_seqlens_padded:
                keys.append("cu_seqlens_padded")
        return keys
