"""The batch contract: which fields a microbatch has, their dtypes and shapes, and where this rank sits.

``BatchLayout`` fixes the shapes for the whole run, so tensor-parallel ranks other than 0
can allocate the broadcast batch without asking; ``Topology`` is this rank's place in
Megatron's parallel layout for one model chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core import parallel_state

from ..megatron_internals.loop import megatron_args

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


# A bound, not a guess at the data: 256 sequences per row keeps attention's per-sequence
# work small (Transformer Engine's THD context-parallel kernels stage all of cu_seqlens in
# 48 KiB of shared memory, FlashAttention's varlen backward allocates 128 rows per sequence)
# while leaving room for short documents: 256 per 4096-token row is 16 tokens each.
DEFAULT_MAX_SEQUENCES_PER_ROW = 256
MAX_SEQUENCES_FLAG = "max-packed-sequences-per-row"


def max_sequences_per_row(args) -> int:
    """``--max-packed-sequences-per-row`` of Megatron's ``args`` (a YAML may leave it out)."""
    value = getattr(args, MAX_SEQUENCES_FLAG.replace("-", "_"), None)
    return DEFAULT_MAX_SEQUENCES_PER_ROW if value is None else value


def max_sequences_per_row_of_megatron() -> int:
    """The bound of the running Megatron job's arguments, or the default outside one."""
    args = megatron_args()
    return DEFAULT_MAX_SEQUENCES_PER_ROW if args is None else max_sequences_per_row(args)


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


def check_packed_args(args) -> None:
    """Refuse, at start-up, the Megatron flag combinations packed rows cannot train with.

    Raises ``ValueError`` naming the flags and the way out.
    """
    bound = max_sequences_per_row(args)
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise ValueError(f"--{MAX_SEQUENCES_FLAG} {bound!r}: give a positive number of sequences per row")
    if not rows_are_packed(args):
        return
    packing = "--sft" if getattr(args, "sft", False) else "--dataloader-inter-document-masking"
    pipeline = getattr(args, "pipeline_model_parallel_size", 1) or 1
    rows = max(getattr(args, "micro_batch_size", 1) or 1, getattr(args, "eval_micro_batch_size", None) or 1)
    if pipeline > 1 and rows > 1:
        # Pipeline stages exchange [s / cp, micro_batch_size, h] tensors, but packed rows run as
        # one [micro_batch_size * s / cp, 1, h] stream: the next stage would read them as
        # micro_batch_size rows and attention refuses them (stock Megatron fails the same way).
        raise ValueError(
            f"{packing} with --pipeline-model-parallel-size {pipeline} needs --micro-batch-size 1 (and "
            f"--eval-micro-batch-size 1), got {rows}: pipeline stages exchange [s, micro_batch_size, h] "
            "tensors while packed rows run as one stream; raise --seq-length instead to pack more per microbatch"
        )
    context = getattr(args, "context_parallel_size", 1) or 1
    if packing != "--sft" and context > 1:
        # GPT documents end anywhere, but a context-parallel cut of a packed stream splits every
        # sequence into 2 * cp equal chunks; only SFT rows pad each sequence to a multiple of 2 * cp.
        raise ValueError(
            f"--dataloader-inter-document-masking with --context-parallel-size {context}: document "
            f"boundaries are not multiples of 2 * context_parallel_size = {2 * context}, which the "
            "context-parallel cut of packed rows needs; drop --dataloader-inter-document-masking "
            "(causal attention over whole rows) or train without context parallelism"
        )


@dataclass(frozen=True)
class BatchLayout:
    """Batch shapes fixed for the whole run, so TP ranks can receive without asking.

    Attributes:
        micro_batch_size: rows per microbatch (``--micro-batch-size``).
        seq_length: tokens per row (``--seq-length``).
        packed: rows hold several sequences described by ``cu_seqlens`` (THD; ``--sft`` or
            ``--dataloader-inter-document-masking``).
        max_sequences_per_row: packed rows: attention gets one THD stream of
            ``micro_batch_size * max_sequences_per_row`` sequences per microbatch, the real
            ones first and zero-length ones after them (``--max-packed-sequences-per-row``).
            A microbatch with more real sequences is an error naming the flag.
        cu_seqlens_padded: the batch also carries ``cu_seqlens_padded``.
        attention_mask: the batch carries a bool ``attention_mask``: ``True`` for
            ``[b, 1, s, s]`` (``--create-attention-mask-in-dataloader``), or its exact shape, any
            that broadcasts to ``[b, 1, s, s]`` (``(1, 1, s, s)`` from Megatron's
            ``get_ltor_masks_and_position_ids``). ``False``: no mask (causal attention).
    """

    micro_batch_size: int
    seq_length: int
    packed: bool = False
    max_sequences_per_row: int = DEFAULT_MAX_SEQUENCES_PER_ROW
    cu_seqlens_padded: bool = False
    attention_mask: bool | tuple[int, ...] = False

    def __post_init__(self):
        if isinstance(self.max_sequences_per_row, bool) or not isinstance(self.max_sequences_per_row, int) \
                or self.max_sequences_per_row < 1:
            raise ValueError(
                f"BatchLayout(max_sequences_per_row={self.max_sequences_per_row!r}) (--{MAX_SEQUENCES_FLAG}) "
                "must be a positive int"
            )
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
            args = megatron_args()
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
            max_sequences_per_row=max_sequences_per_row(args),
            attention_mask=bool(getattr(args, "create_attention_mask_in_dataloader", False)) and not packed,
        )

    @classmethod
    def of_batch(cls, raw: dict) -> "BatchLayout":
        """The layout a run without tensor parallelism reads off the batch itself.

        ``max_sequences_per_row`` is no property of one batch: it is Megatron's
        ``--max-packed-sequences-per-row`` when Megatron's arguments are parsed, else the default.
        """
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
            max_sequences_per_row=max_sequences_per_row_of_megatron(),
            cu_seqlens_padded=raw.get("cu_seqlens_padded") is not None,
            attention_mask=mask_shape if mask_shape and broadcasts_to(mask_shape, (
                tokens.shape[0], 1, tokens.shape[1], tokens.shape[1])) else bool(mask_shape),
        )

    @property
    def sequence_capacity(self) -> int:
        """Sequences in a packed microbatch's THD stream: ``micro_batch_size * max_sequences_per_row``."""
        return self.micro_batch_size * self.max_sequences_per_row

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every field's shape as TP receivers allocate it: packed rows' ``cu_seqlens`` and
        ``channels`` already merged over the microbatch (``segment_math.compact_sequences``)."""
        b, s = self.micro_batch_size, self.seq_length
        shapes = {key: (b, s) for key in SEQUENCE_KEYS}
        if self.attention_mask is True:
            shapes["attention_mask"] = (b, 1, s, s)
        elif self.attention_mask:
            shapes["attention_mask"] = self.attention_mask
        if self.packed:
            shapes["cu_seqlens"] = (self.sequence_capacity + 1,)
            if self.cu_seqlens_padded:
                shapes["cu_seqlens_padded"] = (self.sequence_capacity + 1,)
            shapes["channels"] = (self.sequence_capacity,)
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
