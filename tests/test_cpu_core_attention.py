"""The CPU core attention (``--spec megatron_channel.cpu gpt_layer_spec``) against Megatron's own.

A real ``GPTModel`` built with our layer spec must give the per-token losses and gradients of
the same model with Megatron's local ``DotProductAttention``: for causal rows, for a packed
THD row (against the block-diagonal mask Megatron's attention takes), and under context
parallelism over 2 gloo ranks (against the uncut row at CP=1), for rows and packed rows.
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel.cpu import gpt_layer_spec
from megatron_channel.segment_math import thd_partition_index
from megatron_testing import block_causal_mask, init_parallel, run_distributed, tiny_gpt_config

VOCAB, SEQ = 64, 32
# Packed row: a zero-length sequence, lengths that are multiples of 2 * cp = 4, and
# trailing padding entries repeating the end, as Megatron's SFT dataset pads them.
CU = [0, 8, 8, 20, 32, 32, 32]


def build(spec: str, cp: int = 1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = tiny_gpt_config(cp=cp)
    torch.manual_seed(0)  # the same weights whatever the spec and CP size
    layer_spec = gpt_layer_spec(config) if spec == "cpu" else get_gpt_layer_local_spec()
    return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="learned_absolute", parallel_output=True)


def batch(rows: int = 2, packed: bool = False):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    if packed:
        cu = torch.tensor(CU)
        seq = torch.searchsorted(cu, torch.arange(SEQ), right=True) - 1
        positions = (torch.arange(SEQ) - cu[seq])[None].expand(rows, SEQ)
    else:
        positions = torch.arange(SEQ)[None].expand(rows, SEQ)
    return tokens, labels, positions.contiguous()


def thd_params(cu: torch.Tensor) -> PackedSeqParams:
    cu = cu.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=SEQ, max_seqlen_kv=SEQ)


def losses_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    losses = model(*args, **kwargs)
    losses.sum().backward()
    return losses.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(ours, theirs):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("give_mask", [True, False], ids=["mask", "no-mask"])
def test_causal_rows_match_megatrons_local_attention(megatron_cpu, give_mask):
    tokens, labels, positions = batch()
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    ours = losses_and_grads(build("cpu"), tokens, positions, causal if give_mask else None, labels=labels)
    theirs = losses_and_grads(build("local"), tokens, positions, causal, labels=labels)
    assert_same(ours, theirs)


def test_packed_row_matches_the_block_diagonal_mask(megatron_cpu):
    tokens, labels, positions = batch(rows=1, packed=True)
    cu = torch.tensor(CU)
    ours = losses_and_grads(build("cpu"), tokens, positions, None, labels=labels, packed_seq_params=thd_params(cu))
    theirs = losses_and_grads(build("local"), tokens, positions, block_causal_mask(cu, SEQ), labels=labels)
    assert_same(ours, theirs)


def _context_parallel_worker(rank, world_size, packed):
    import torch.distributed as dist

    from megatron.core.utils import get_batch_on_this_cp_rank

    init_parallel(cp=world_size)
    tokens, labels, positions = batch(rows=1 if packed else 2, packed=packed)
    model = build("cpu", cp=world_size)
    if packed:
        index = thd_partition_index(torch.tensor(CU), SEQ, world_size, rank)
        local = dict(tokens=tokens[:, index], labels=labels[:, index], position_ids=positions[:, index])
        kwargs = dict(packed_seq_params=thd_params(torch.tensor(CU)))
    else:
        local = get_batch_on_this_cp_rank(dict(tokens=tokens, labels=labels, position_ids=positions,
                                                index=torch.arange(SEQ)[None]), is_hybrid_cp=False)
        index = local["index"][0]
        kwargs = {}
    losses, grads = losses_and_grads(model, local["tokens"], local["position_ids"], None, labels=local["labels"],
                                     **kwargs)
    for grad in grads.values():  # what Megatron's DDP does over the data x context parallel group
        dist.all_reduce(grad)
    # numpy: pickled by value (a tensor would be shared through a file the worker removes)
    return dict(index=index.numpy(), losses=losses.numpy(), grads={k: v.numpy() for k, v in grads.items()})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_context_parallel_2_matches_the_uncut_row(megatron_cpu, packed):
    tokens, labels, positions = batch(rows=1 if packed else 2, packed=packed)
    kwargs = dict(packed_seq_params=thd_params(torch.tensor(CU))) if packed else {}
    want_losses, want_grads = losses_and_grads(build("cpu"), tokens, positions, None, labels=labels, **kwargs)
    # ... which is Megatron's own attention on the uncut row (the tests above).
    results = run_distributed(_context_parallel_worker, 2, packed)
    covered = sorted(i for r in results for i in r["index"].tolist())
    assert covered == list(range(SEQ))  # the ranks hold every token once
    for r in results:
        index = torch.from_numpy(r["index"])
        torch.testing.assert_close(torch.from_numpy(r["losses"]), want_losses[:, index], rtol=1e-5, atol=1e-5)
        for name, grad in r["grads"].items():
            torch.testing.assert_close(torch.from_numpy(grad), want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
