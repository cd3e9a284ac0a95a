"""A core attention for the CPU that takes packed rows and context parallelism.

Megatron's local ``DotProductAttention`` asserts ``packed_seq_params is None`` and refuses
CP > 1 ("Context parallelism is only supported by TEDotProductAttention"); Transformer
Engine, which does both, cannot be installed on a CPU machine. ``CpuCoreAttention`` takes
its place in the local GPT layer spec (``--spec megatron_channel.cpu gpt_layer_spec``):
plain float32 ``softmax(Q K^T * scale + mask) V``, no fused kernel, no CUDA call.

Every token gets a global position and a sequence id; query ``q`` sees key ``k`` iff both
are in the same sequence and ``pos[k] <= pos[q]``. Unpacked rows are one sequence each;
packed (THD) rows are cut by ``cu_seqlens`` (``cu_seqlens_*_padded`` when given, trailing
repeated entries allowed; tokens after the last boundary form one more sequence). Under
CP each rank holds the zigzag layout of the batch cut (unpacked: chunks ``r`` and
``2cp-1-r`` of ``2cp``; THD: the same per sequence, as Transformer Engine's
``thd_get_partitioned_indices``), so the positions of every rank's tokens are known
without communication; only K and V are all-gathered over the CP group.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class _GatherOverCP(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradient, keeps this rank's slice.

    Every rank's attention reads every rank's keys, so a key's gradient is the sum of the
    gradients all ranks computed for it: an all-reduce (gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), tensor.size(0)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.length:(ctx.rank + 1) * ctx.length], None


def zigzag_positions(cu_seqlens: Tensor, local_tokens: int, cp_size: int, cp_rank: int) -> tuple[Tensor, Tensor]:
    """Global position and sequence id of each of one CP rank's tokens, in local order.

    Sequence ``i`` spans ``[cu[i], cu[i+1])`` globally (length a multiple of ``2 * cp`` when
    ``cp > 1``) and ``[cu[i] / cp, cu[i+1] / cp)`` locally: chunk ``r`` then chunk
    ``2cp-1-r`` of its ``2cp`` chunks of ``h = L_i / (2 cp)``. At ``cp == 1`` this is the
    identity.

    Args:
        cu_seqlens: ``[N + 1]`` integer global boundaries, starting at 0; zero-length
            sequences allowed. Tokens past ``cu[-1]`` form one more sequence.
        local_tokens: tokens on this rank, ``T / cp``.
        cp_size, cp_rank: the CP group's size and this rank in it.

    Returns:
        ``([local_tokens], [local_tokens])`` int64 global positions and sequence ids.
    """
    total = torch.tensor([local_tokens * cp_size], device=cu_seqlens.device)
    cu = torch.cat([cu_seqlens.long().reshape(-1), total])
    local_cu = torch.div(cu, cp_size, rounding_mode="floor")
    local = torch.arange(local_tokens, device=cu.device)
    # right=True: the last sequence starting at or before the token, so empty ones are skipped.
    seq = (torch.searchsorted(local_cu, local, right=True) - 1).clamp(max=cu.numel() - 2)
    offset = local - local_cu[seq]
    if cp_size == 1:
        return cu[seq] + offset, seq
    half = torch.div(cu[seq + 1] - cu[seq], 2 * cp_size, rounding_mode="floor")
    chunk = torch.where(offset < half, cp_rank, 2 * cp_size - 1 - cp_rank)
    return cu[seq] + chunk * half + offset % half.clamp(min=1), seq


class CpuCoreAttention(torch.nn.Module):
    """Drop-in for ``DotProductAttention`` with packed (THD) rows and context parallelism.

    Constructor arguments are ``DotProductAttention``'s; ``attention_type`` and
    ``cp_comm_type`` are accepted and ignored (K/V are always all-gathered).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__()
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise NotImplementedError("CpuCoreAttention: only vanilla softmax without a sliding window")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        # Query-key layer scaling divides the scores by layer_number and multiplies them back
        # inside the fp16 softmax; in float32 the two cancel, so only the plain scale is used.
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is None else attention_dropout)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None:
            cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_group = cp_group
        self.cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
        self.cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attention of this rank's queries over all ranks' keys.

        Args:
            query: ``[sq, b, np, hn]``, or ``[t, np, hn]`` for THD (SelfAttention squeezes the
                dummy batch dim of packed rows before calling).
            key, value: ``[sk, b, ng, hn]`` / ``[sk, b, ng, hv]`` (``[t, ng, h*]`` for THD);
                ``ng`` query groups are repeated up to ``np`` heads.
            attention_mask: None, or bool ``[b or 1, 1, sq, S]`` (True = masked) over the
                global key order ``S = sk * cp`` (Megatron's CP batch cut keeps all columns),
                used instead of the causal rule as ``DotProductAttention`` does.
            packed_seq_params: THD boundaries when ``qkv_format == "thd"``.

        Returns:
            ``[sq, b, np * hv]``, or ``[t, np * hv]`` for THD.
        """
        if attention_bias is not None:
            raise NotImplementedError("CpuCoreAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, n, h] -> [t, 1, n, h]: one row of many sequences
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b, heads, _ = query.shape
        sk, groups, key_dim = key.size(0), key.size(2), key.size(3)

        if self.cp_size > 1:  # one collective for K and V together
            kv = _GatherOverCP.apply(torch.cat([key, value], dim=-1), self.cp_group)
            key, value = kv[..., :key_dim], kv[..., key_dim:]

        allowed = self._allowed(sq, sk, packed_seq_params if thd else None, mask_type, attention_mask is None)
        q_pos, k_pos = self._positions(sq, sk, packed_seq_params if thd else None, want_seq=False)
        masked = ~allowed  # [sq, S]
        if attention_mask is not None:
            given = attention_mask
            if given.size(-2) != sq:  # an uncut [.., S, S] mask: pick this rank's rows
                given = given.index_select(-2, q_pos)
            if self.cp_size > 1:  # columns are in global order, keys in gathered order
                given = given.index_select(-1, k_pos)
            masked = masked | given.bool()

        if heads != groups:
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q = query.float().permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.float().permute(1, 2, 3, 0)  # [b, np, hn, S]
        v = value.float().permute(1, 2, 0, 3)  # [b, np, S, hv]
        scores = torch.matmul(q, k) * self.softmax_scale
        # A finite fill (like Megatron's -10000) keeps a fully masked row finite, not NaN.
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        if self.training and self.dropout.p > 0:
            if self.config.sequence_parallel:
                probs = self.dropout(probs)
            else:  # TP ranks hold different heads: draw from the model-parallel RNG
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    probs = self.dropout(probs)
        context = torch.matmul(probs, v).to(query.dtype)  # [b, np, sq, hv]
        context = context.permute(2, 0, 1, 3).reshape(sq, b, -1)
        return context.squeeze(1) if thd else context

    def _positions(self, sq, sk, packed_seq_params, want_seq=True):
        """Global positions (and sequence ids) of this rank's queries and of the gathered keys."""
        device = None
        if packed_seq_params is None:
            cu_q = cu_k = torch.zeros(1, dtype=torch.long)
        else:
            p = packed_seq_params
            cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
            cu_k = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
            cu_k = cu_q if cu_k is None else cu_k
            device = cu_q.device
        q_pos, q_seq = zigzag_positions(cu_q, sq, self.cp_size, self.cp_rank)
        keys = [zigzag_positions(cu_k, sk, self.cp_size, r) for r in range(self.cp_size)]
        k_pos, k_seq = torch.cat([k[0] for k in keys]), torch.cat([k[1] for k in keys])
        del device
        if want_seq:
            return q_pos, q_seq, k_pos, k_seq
        return q_pos, k_pos

    def _allowed(self, sq, sk, packed_seq_params, mask_type, causal_from_type):
        """``[sq, S]`` bool: query may see key (same sequence, and not in its future if causal)."""
        q_pos, q_seq, k_pos, k_seq = self._positions(sq, sk, packed_seq_params)
        allowed = q_seq[:, None] == k_seq[None, :]
        if causal_from_type and mask_type in _CAUSAL:
            allowed &= k_pos[None, :] <= q_pos[:, None]
        return allowed


def gpt_layer_spec(config, vp_stage: Optional[int] = None):
    """Megatron's local GPT layer spec with ``CpuCoreAttention`` as the core attention.

    Args:
        config: the ``GPTModelConfig`` Megatron's model builder passes (a dataclass holding a
            ``TransformerConfig`` as ``.transformer``), or a ``TransformerConfig``.
        vp_stage: accepted for the builder's signature check; the local spec ignores it.

    Returns:
        The ``ModuleSpec`` of one ``TransformerLayer``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    transformer = getattr(config, "transformer", config)
    # The arguments Megatron's own _te_or_local_layer_spec passes for --transformer-impl local,
    # so the model is the one --spec local would build, but for its core attention.
    spec = get_gpt_layer_local_spec(
        num_experts=transformer.num_moe_experts,
        moe_grouped_gemm=transformer.moe_grouped_gemm,
        qk_layernorm=transformer.qk_layernorm,
        multi_latent_attention=transformer.multi_latent_attention,
        normalization=transformer.normalization,
        use_kitchen=transformer.use_kitchen,
        use_kitchen_attention=transformer.use_kitchen_attention,
        kitchen_attention_backend=transformer.kitchen_attention_backend,
    )
    spec.submodules.self_attention.submodules.core_attention = CpuCoreAttention
    return spec
