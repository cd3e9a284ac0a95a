"""``megatron.core`` calls whose signatures moved between releases, each behind one function
that reads the release table (``releases``)."""

from __future__ import annotations

from typing import Any

from .releases import installed_release


def packed_seq_params(**fields: Any):
    """Megatron's ``PackedSeqParams(**fields)``; ``tokens_per_sample`` is dropped where the release's
    has no such field (before 0.19: MoE then routes the merged stream as one sequence, as stock
    training of that release does)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if not installed_release().packed_tokens_per_sample:
        fields.pop("tokens_per_sample", None)
    return PackedSeqParams(**fields)


def batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """``megatron.core.utils.get_batch_on_this_cp_rank``: Megatron's zigzag cut of unpacked rows
    for this context-parallel rank (``is_hybrid_cp`` off, from 0.18 where it exists)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if installed_release().cp_batch_hybrid_flag:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)
