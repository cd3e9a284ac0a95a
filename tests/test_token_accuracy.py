"""Per-channel token accuracy against an independent float64 argmax reference.

* ``target_is_argmax`` on random logits with many ties (values on a coarse grid), labels
  inside and outside the vocabulary, at TP=1 and with the vocabulary split over two gloo
  ranks (one all-reduce, the same flags on both ranks).
* Through ``make_forward_step`` and the real tiny GPTModel, unpacked and packed rows: every
  ``token_acc_<channel>`` and ``token acc`` equals ``[correct, loss tokens]`` counted by hand
  from the model's float64 logits, where a token is correct when its label's logit equals
  the row's max (output-layer rows duplicated so that ties happen). Loss, per-token losses and
  every gradient are bitwise those of the same step without token accuracy.
* TP=2 over gloo through ``make_forward_step``: the reference from the TP-gathered logits,
  equal on both ranks, and exactly one all-reduce more per microbatch than without accuracy.
* Context parallelism: per-rank flags of a THD row cut by Transformer Engine's rule sum over
  the CP ranks to the global counts.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel import BatchLayout, ChannelConfig, channel_loss_func, make_forward_step
from megatron_channel.segment_math import thd_partition_index
from megatron_channel.step.token_accuracy import target_is_argmax
from megatron_testing import (
    PackedAsBlockMask,
    block_causal_mask,
    init_parallel,
    random_packed_row,
    run_distributed,
    tiny_gpt,
)

VOCAB, S = 64, 16
CONFIG = ChannelConfig(["math", "code", "chat"], token_accuracy=True)
PLAIN = ChannelConfig(["math", "code", "chat"])


def reference_flags(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[b, s]``: 1 where labels[b, s]'s logit equals the max over the vocabulary (float64, by hand)."""
    full = logits.double()  # [b, s, V]
    out = torch.zeros(labels.shape)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            out[b, t] = float(0 <= label < full.shape[-1] and full[b, t, label] == full[b, t].max())
    return out


def tied_logits(gen, b, s, v=VOCAB):
    return torch.randint(-4, 4, (b, s, v), generator=gen).float() / 2  # 16 values: ties everywhere


@pytest.mark.timeout(60)
def test_target_is_argmax_counts_ties_as_correct():
    gen = torch.Generator().manual_seed(0)
    for case in range(20):
        logits = tied_logits(gen, 3, 7)
        labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
        argmax = logits.argmax(-1)
        labels[0] = argmax[0]  # surely correct
        labels[1, :2] = torch.tensor([-100, VOCAB])  # outside the vocabulary: never correct
        is_max = logits[2] == logits[2].max(-1, keepdim=True).values
        labels[2] = VOCAB - 1 - is_max.flip(-1).int().argmax(-1)  # the LAST maximal logit: a tie when several
        got = target_is_argmax(logits.transpose(0, 1), labels)
        want = reference_flags(logits, labels)
        assert torch.equal(got, want), case
        assert got[0].all() and got[2].all() and not got[1, :2].any()
        assert (labels[2] != argmax[2]).any()  # ties, not argmax itself, were counted


@pytest.mark.timeout(60)
def test_target_is_argmax_with_the_loss_mask_makes_the_masked_flags_in_one_op():
    """The flags ``make_forward_step`` hands the loss: ``correct x loss_mask``, bit for bit,
    float32, for one row and for several."""
    gen = torch.Generator().manual_seed(2)
    for b, s in ((1, 11), (3, 7)):
        logits = tied_logits(gen, b, s)
        labels = torch.randint(0, VOCAB, (b, s), generator=gen)
        mask = (torch.rand(b, s, generator=gen) > 0.4).float()
        got = target_is_argmax(logits.transpose(0, 1), labels, loss_mask=mask)
        assert got.dtype == torch.float32 and got.shape == (b, s)
        assert torch.equal(got, reference_flags(logits, labels) * mask)


def _sharded_worker(rank, world_size):
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(1)
    logits = tied_logits(gen, 2, 9)
    labels = torch.randint(0, VOCAB, (2, 9), generator=gen)
    shard = logits[..., rank * VOCAB // 2 : (rank + 1) * VOCAB // 2].transpose(0, 1).contiguous()
    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tuple(tensor.shape), str(kwargs.get("op"))))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        got = target_is_argmax(shard, labels, dist.group.WORLD)
    finally:
        dist.all_reduce = all_reduce
    return dict(got=got.tolist(), want=reference_flags(logits, labels).tolist(), calls=calls)


@pytest.mark.timeout(120)
def test_target_is_argmax_over_a_vocabulary_split_on_two_gloo_ranks():
    results = run_distributed(_sharded_worker, 2)
    assert results[0]["got"] == results[1]["got"] == results[0]["want"]
    assert [len(r["calls"]) for r in results] == [1, 1]
    assert results[0]["calls"][0][0] == (2, 9, 2)  # [max, label logit] x [s, b]: one small all-reduce


# ----------------------------------------------------------------------------- the real model


def build_model(tp: int = 1, seed: int = 1234) -> PackedAsBlockMask:
    init_parallel(tp=tp, seed=seed)
    gpt = tiny_gpt(vocab_size=VOCAB, seq_length=64, tp=tp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gpt.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
        weight = gpt.output_layer.weight  # [V / tp, h]: rows 2k and 2k + 1 give equal logits
        weight[1::2] = weight[0::2]
    return PackedAsBlockMask(gpt)


def causal(s=S):
    return torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]


def unpacked_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows = 3
    return dict(tokens=torch.randint(0, VOCAB, (rows, S), generator=gen),
                labels=torch.randint(0, VOCAB, (rows, S), generator=gen),
                loss_mask=(torch.rand(rows, S, generator=gen) > 0.2).float(),
                position_ids=torch.arange(S).expand(rows, S), attention_mask=causal(),
                channels=torch.tensor(random.Random(seed).choices([0, 1, 2, -1], k=rows)))


def packed_batch(seed: int):
    return random_packed_row(seed, S, VOCAB, masked_share=0.2)


def segments_of(batch):
    """(row, start, end, channel) of every tracked piece of the batch."""
    if "cu_seqlens" in batch:
        cu, ids = batch["cu_seqlens"][0].tolist(), batch["channels"][0].tolist()
        return [(0, a, b, c) for a, b, c in zip(cu, cu[1:], ids)]
    return [(r, 0, S, int(c)) for r, c in enumerate(batch["channels"])]


def reference_accuracy(flags, batch, config=CONFIG) -> dict[str, list[float]]:
    mask = batch["loss_mask"]
    out = {key: [0.0, 0.0] for key in config.accuracy_keys()}
    for row, start, end, channel in segments_of(batch):
        if channel >= 0:
            key = config.accuracy_keys()[channel]
            out[key][0] += float((flags[row, start:end] * mask[row, start:end]).sum())
            out[key][1] += float(mask[row, start:end].sum())
    out["token acc"] = [float((flags * mask).sum()), float(mask.sum())]
    return out


def full_logits(model, batch, tp_group=None):
    mask = block_causal_mask(batch["cu_seqlens"][0], S) if "cu_seqlens" in batch else batch["attention_mask"]
    with torch.no_grad():
        logits = model.module(batch["tokens"], batch["position_ids"], mask)  # [b, s, V / tp]
    if tp_group is not None:
        parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(tp_group))]
        torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group)
        logits = torch.cat(parts, -1)
    return logits


def step(model, config, batch):
    """forward_step, loss_func and backward: (loss, per-token losses, metrics, grads)."""
    model.zero_grad(set_to_none=True)
    output, loss_func = make_forward_step(config, BatchLayout.of_batch(batch))(iter([batch]), model)
    loss, _, metrics = loss_func(output)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), output.detach(), metrics, grads


@pytest.fixture(scope="module")
def model(megatron_cpu):
    return build_model()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_accuracy_through_forward_step_matches_float64_and_leaves_training_bitwise(model, seed, packed):
    batch = packed_batch(seed) if packed else unpacked_batch(seed)
    flags = reference_flags(full_logits(model, batch), batch["labels"])
    loss, output, metrics, grads = step(model, CONFIG, batch)
    want = reference_accuracy(flags, batch)
    for key, value in want.items():
        assert metrics[key].tolist() == value, key  # counts of 0/1 flags: exact
    # Bitwise the step without accuracy: loss, per-token losses, channel losses, gradients.
    plain_loss, plain_output, plain_metrics, plain_grads = step(model, PLAIN, batch)
    assert torch.equal(loss, plain_loss) and torch.equal(output, plain_output)
    assert all(torch.equal(metrics[k], plain_metrics[k]) for k in plain_metrics)
    assert len(grads) == len(plain_grads) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert list(metrics) == ["lm loss", "token acc", *[k for pair in zip(CONFIG.metric_keys(), CONFIG.accuracy_keys())
                                                      for k in pair]]


@pytest.mark.timeout(60)
def test_ties_happen_in_the_model_and_count(model):
    batch = unpacked_batch(99)
    logits = full_logits(model, batch)
    batch["labels"] = logits.argmax(-1) ^ 1  # the tied twin of every argmax (rows 2k, 2k + 1 are equal)
    flags = reference_flags(logits, batch["labels"])
    assert flags.all()
    _, _, metrics, _ = step(model, CONFIG, batch)
    assert metrics["token acc"].tolist() == [float(batch["loss_mask"].sum())] * 2


@pytest.mark.timeout(60)
def test_context_parallel_ranks_sum_to_the_global_counts():
    gen = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 8, 8, 24, 32], dtype=torch.int32)  # multiples of 2 * cp
    channels = torch.tensor([0, 2, 1, -1])
    losses, mask = torch.rand(1, 32, generator=gen), (torch.rand(1, 32, generator=gen) > 0.3).float()
    flags = (torch.rand(1, 32, generator=gen) > 0.5).float()
    batch = dict(loss_mask=mask, cu_seqlens=cu[None], channels=channels[None])
    want = reference_accuracy(flags, batch)
    for cp in (2, 4):
        total = {k: torch.zeros(2) for k in want}
        for rank in range(cp):
            index = thd_partition_index(cu, 32, cp, rank)
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
            _, _, metrics = channel_loss_func(losses[:, index], loss_mask=mask[:, index], channels=channels,
                                              config=CONFIG, packed_seq_params=psp, cp_size=cp,
                                              correct_tokens=flags[:, index])
            for k in total:
                total[k] += metrics[k]
        assert {k: v.tolist() for k, v in total.items()} == want, cp


@pytest.mark.timeout(60)
@pytest.mark.parametrize("summing", ["host", "torch"])
@pytest.mark.parametrize("tail", [0, 5], ids=["ends at T", "tokens after the last boundary"])
def test_one_pass_on_the_fixed_length_sequence_list_matches_float64_by_hand(summing, tail):
    """Packed as training hands it (``compact_sequences``): real sequences first, some without a
    loss token, then zero-length slots of channel -1; channel "code" never appears. Loss and
    accuracy summed in one pass: every accuracy pair exact, every loss pair as without accuracy
    (bit for bit) and as a float64 sum by hand."""
    from megatron_channel.segment_math import summing_like_a_gpu

    config = ChannelConfig(["math", "code", "chat", "other"], token_accuracy=True)
    plain = ChannelConfig(["math", "code", "chat", "other"])
    gen = torch.Generator().manual_seed(4 + tail)
    real = [0, 7, 7, 19, 30, 41, 64]  # a zero-length sequence among the real ones too
    ids = [0, 2, -1, 3, 0, 2]
    slots = 16
    total = real[-1] + tail
    cu = torch.tensor(real + [real[-1]] * (slots - len(real) + 1), dtype=torch.int32)
    channels = torch.tensor(ids + [-1] * (slots - len(ids)))
    mask = (torch.rand(1, total, generator=gen) > 0.3).float()
    mask[0, 19:30] = 0  # a sequence without loss tokens
    losses = torch.rand(1, total, generator=gen) * 8
    flags = (torch.rand(1, total, generator=gen) > 0.4).float()
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    with summing_like_a_gpu() if summing == "torch" else contextlib.nullcontext():
        _, _, metrics = channel_loss_func(losses, loss_mask=mask, channels=channels, config=config,
                                          packed_seq_params=psp, cp_size=1, validate=False, correct_tokens=flags)
        _, _, plain_metrics = channel_loss_func(losses, loss_mask=mask, channels=channels, config=plain,
                                                packed_seq_params=psp, cp_size=1, validate=False)
    assert list(metrics) == ["lm loss", "token acc", *[k for pair in zip(config.metric_keys(), config.accuracy_keys())
                                                      for k in pair]]
    assert all(v.dtype == torch.float32 and v.shape == (2,) for v in metrics.values())
    want = {key: [0.0, 0.0] for key in config.metric_keys() + config.accuracy_keys()}
    for a, b, channel in zip(real, real[1:], ids):
        if channel >= 0:
            for t in range(a, b):
                m = float(mask[0, t])
                want[config.metric_keys()[channel]][0] += float(losses[0, t]) * m
                want[config.accuracy_keys()[channel]][0] += float(flags[0, t]) * m
                want[config.metric_keys()[channel]][1] += m
                want[config.accuracy_keys()[channel]][1] += m
    for key in config.accuracy_keys():
        assert metrics[key].tolist() == want[key], key  # counts: exact
    assert metrics["token_acc_code"].tolist() == [0.0, 0.0]
    assert metrics["token acc"].tolist() == [float((flags * mask).sum()), float(mask.sum())]
    for key in config.metric_keys():
        assert torch.equal(metrics[key], plain_metrics[key]), key
        assert metrics[key][1].item() == want[key][1], key
        assert abs(metrics[key][0].item() - want[key][0]) <= 1e-5 * abs(want[key][0]) + 1e-5, key


@pytest.mark.timeout(60)
@pytest.mark.parametrize("summing", ["host", "torch"])
def test_flags_masked_where_the_model_made_them_give_the_same_metrics(summing):
    """``CorrectTokens(loss_mask=...)``, as make_forward_step passes it, holds ``flags x mask``;
    the loss function then skips its own product and reports bitwise the same numbers. Flags
    masked by another mask are refused by name."""
    from megatron_channel.segment_math import summing_like_a_gpu
    from megatron_channel.step.token_accuracy import CorrectTokens

    gen = torch.Generator().manual_seed(9)
    config = ChannelConfig(["math", "code", "chat"], token_accuracy=True)
    cu = torch.tensor([0, 5, 5, 12, 30, 30, 30], dtype=torch.int32)
    channels = torch.tensor([0, 2, -1, 1, -1, -1])
    losses = torch.rand(1, 30, generator=gen) * 8
    mask = (torch.rand(1, 30, generator=gen) > 0.3).float()
    flags = (torch.rand(1, 30, generator=gen) > 0.5).float()
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)

    def metrics_of(correct_tokens, loss_mask=mask):
        return channel_loss_func(losses, loss_mask=loss_mask, channels=channels, config=config, packed_seq_params=psp,
                                 cp_size=1, validate=False, correct_tokens=correct_tokens)[2]

    with summing_like_a_gpu() if summing == "torch" else contextlib.nullcontext():
        plain = metrics_of(flags)
        masked = metrics_of(CorrectTokens(loss_mask=mask, flags=flags * mask))
        unmasked_context = metrics_of(CorrectTokens(flags=flags))
    assert list(masked) == list(plain) == list(unmasked_context)
    for key in plain:
        assert torch.equal(masked[key], plain[key]) and torch.equal(unmasked_context[key], plain[key]), key
    with pytest.raises(ValueError, match="masked by another loss_mask.*same tensor"):
        metrics_of(CorrectTokens(loss_mask=mask.clone(), flags=flags * mask))


@pytest.mark.timeout(30)
def test_accuracy_without_flags_is_named():
    with pytest.raises(ValueError, match=r"token_accuracy=True\) needs the correct-token flags.*make_forward_step"):
        channel_loss_func(torch.rand(2, 4), loss_mask=torch.ones(2, 4), channels=torch.tensor([0, 1]), config=CONFIG)


def _tp_worker(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    model = build_model(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, batch in (("unpacked", unpacked_batch(5)), ("packed", packed_batch(5))):
        flags = reference_flags(full_logits(model, batch, group), batch["labels"])
        calls = {}
        all_reduce = dist.all_reduce
        for config in (CONFIG, PLAIN):
            count = [0]

            def counting(tensor, *args, **kwargs):
                count[0] += 1
                return all_reduce(tensor, *args, **kwargs)

            dist.all_reduce = counting
            try:
                loss, output, metrics, _ = step(model, config, batch)
            finally:
                dist.all_reduce = all_reduce
            calls[config.token_accuracy] = count[0]
            if config.token_accuracy:
                got = {k: v.tolist() for k, v in metrics.items()}
                first = (loss, output)
        out[name] = dict(got=got, want=reference_accuracy(flags, batch), calls=calls,
                         bitwise=torch.equal(first[0], loss) and torch.equal(first[1], output))
    return out


@pytest.mark.timeout(240)
def test_accuracy_under_tensor_parallelism_over_two_gloo_ranks():
    results = run_distributed(_tp_worker, 2, timeout=200)
    assert results[0] == results[1]  # TP ranks hold identical values
    for name, result in results[0].items():
        for key, value in result["want"].items():
            assert result["got"][key] == value, (name, key)
        assert result["calls"][True] == result["calls"][False] + 1, (name, result["calls"])  # one extra
        assert result["bitwise"], name
