"""A core attention for the CPU that takes packed rows and context parallelism.

Megatron's local ``DotProductAttention`` asserts ``packed_seq_params is None`` and refuses
``context_parallel_size > 1`` ("only supported by TEDotProductAttention"), and Transformer
Engine runs on GPUs only. ``CpuCoreAttention`` is plain float32 softmax attention that does
both, so ``--cpu`` can train ``--sft`` and ``--context-parallel-size 2`` runs. It is selected
with Megatron's own flag ``--spec megatron_channel.cpu gpt_layer_spec`` (``--cpu`` sets it
when needed).

Which key a query sees is decided from global positions, the same on every rank:

* unpacked rows under CP hold chunks ``r`` and ``2 cp - 1 - r`` of the row (Megatron's
  zigzag cut); packed THD rows hold, for every sequence ``i`` of padded length ``L_i``, the
  halves ``r`` and ``2 cp - 1 - r`` of it (Transformer Engine's layout), stored from local
  position ``cu_p[i] / cp``;
* a query attends to keys of its own packed sequence at global positions ``<=`` its own.

Under CP the keys and values of all CP ranks are all-gathered (the backward sums their
gradients back to the rank that holds them).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from ..segment_math import thd_partition_index


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward: sum the gradient, keep this rank's part."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), 0)[dist.get_rank(ctx.group)], None


def global_positions(cu_seqlens: Tensor, local_length: int, cp_rank: int, cp_size: int) -> tuple[Tensor, Tensor]:
    """Packed-sequence index and global position of each local token of ``cp_rank``.

    Args:
        cu_seqlens: ``[n + 1]`` global (padded) boundaries ending at ``local_length * cp_size``;
            an unpacked row is the one sequence ``[0, s]``. Repeated entries are empty sequences.
    Returns:
        ``([local_length], [local_length])`` int64.
    """
    cu = cu_seqlens.to(torch.int64).reshape(-1).cpu()
    position = thd_partition_index(cu, local_length * cp_size, cp_size, cp_rank)
    return torch.searchsorted(cu, position, right=True) - 1, position


class CpuCoreAttention(MegatronModule):
    """Drop-in for Megatron's ``DotProductAttention`` (same constructor), on the CPU.

    ``forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None)``: ``query`` ``[sq, b, np, hn]``, ``key`` / ``value``
    ``[sk, b, ng, hn]`` (THD: ``[t, np, hn]`` / ``[t, ng, hn]``); returns ``[sq, b, np * hn]``
    (THD: ``[t, np * hn]``). ``attention_mask`` (``[b | 1, 1, sq, sk]`` bool, True = masked)
    is honoured for unpacked rows without CP; otherwise the mask is causal within each
    packed sequence.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise ValueError("CpuCoreAttention supports vanilla softmax without window attention only")
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is None else attention_dropout)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if attention_bias is not None:
            raise ValueError("CpuCoreAttention takes no attention_bias")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, n, hn] -> [t, 1, n, hn]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        allowed = self._allowed(query.size(0), cp_rank, cp_size, packed_seq_params if thd else None, attention_mask)
        if cp_size > 1:
            key, value = _GatherSequence.apply(key, self.cp_group), _GatherSequence.apply(value, self.cp_group)
        repeat = query.size(2) // key.size(2)  # grouped-query attention
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3).float() for x in (query, key, value))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.dropout.p > 0 and self.training:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.dropout(probs)
        context = torch.matmul(probs, v).to(query.dtype)  # [b, n, sq, hn]
        context = context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)
        return context.squeeze(1) if thd else context

    def _allowed(self, local_length, cp_rank, cp_size, packed_seq_params, attention_mask) -> Tensor:
        """Bool ``[b | 1, 1, sq, sk]``: which keys each query may see."""
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        elif cp_size == 1 and attention_mask is not None:
            return ~attention_mask.bool()
        else:
            cu = torch.tensor([0, local_length * cp_size])
        per_rank = [global_positions(cu, local_length, r, cp_size) for r in range(cp_size)]
        q_seq, q_pos = per_rank[cp_rank]
        k_seq = torch.cat([seq for seq, _ in per_rank])
        k_pos = torch.cat([pos for _, pos in per_rank])
        allowed = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        return allowed[None, None]


def gpt_layer_spec(config, vp_stage=None):
    """Megatron's local GPT layer spec with ``CpuCoreAttention`` as the core attention.

    Called by Megatron's GPT builder for ``--spec megatron_channel.cpu gpt_layer_spec`` with
    its ``GPTModelConfig`` (or, in a script, with a ``TransformerConfig``).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    transformer = getattr(config, "transformer", config)
    spec = copy.deepcopy(get_gpt_layer_local_spec(
        transformer.num_moe_experts,
        transformer.moe_grouped_gemm,
        transformer.qk_layernorm,
        normalization=transformer.normalization,
    ))
    spec.submodules.self_attention.submodules.core_attention = CpuCoreAttention
    return spec
