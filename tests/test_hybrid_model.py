"""``HybridModel`` (attention and MLP layers) through the real ``make_forward_step``: per-channel
loss and token accuracy, read by the output-layer hook (HybridModel has no
``output_processor``), exact against float64 over the model's own logits; loss and gradients
bitwise those of the stock loss; at TP = 2 over gloo too. The same hook on a GPTModel gives
bitwise the flags of its ``output_processor`` route (what megatron-core 0.17 takes)."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_channel import BatchLayout, ChannelConfig, make_forward_step
from megatron_channel.step.loss import stock_loss_func
from megatron_testing import init_parallel, random_packed_row, run_distributed, tiny_hybrid

pytest.importorskip("megatron.core.models.hybrid.hybrid_model", reason="HybridModel: megatron-core 0.18 on")

VOCAB, S = 32, 24
CONFIG = ChannelConfig(["math", "code", "chat"], token_accuracy=True)
PLAIN = ChannelConfig(["math", "code", "chat"])


def build_hybrid(tp: int = 1, seed: int = 7, pattern: str = "*-*-"):
    init_parallel(tp=tp, seed=seed)
    model = tiny_hybrid(vocab_size=VOCAB, seq_length=S, pattern=pattern, tp=tp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        weight = model.output_layer.weight  # rows 2k and 2k + 1 equal: ties in every row of logits
        weight[1::2] = weight[0::2]
    return model


def batch_of(seed: int, packed: bool):
    if packed:
        return random_packed_row(seed, S, VOCAB, masked_share=0.25)
    gen = torch.Generator().manual_seed(seed)
    rows = 3
    return dict(tokens=torch.randint(0, VOCAB, (rows, S), generator=gen),
                labels=torch.randint(0, VOCAB, (rows, S), generator=gen),
                loss_mask=(torch.rand(rows, S, generator=gen) > 0.25).float(),
                position_ids=torch.arange(S).expand(rows, S),
                attention_mask=torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None],
                channels=torch.tensor(random.Random(seed).choices([0, 1, 2, -1], k=rows)))


def pieces(batch):
    """(row, start, end, channel) of every sequence of the batch."""
    if "cu_seqlens" in batch:
        cu, ids = batch["cu_seqlens"][0].tolist(), batch["channels"][0].tolist()
        return [(0, a, b, c) for a, b, c in zip(cu, cu[1:], ids)]
    return [(r, 0, S, int(c)) for r, c in enumerate(batch["channels"])]


def full_logits(model, batch, tp_group=None):
    """``[b, s, V]`` logits of the model's own forward (no labels), every sequence run alone."""
    out = torch.zeros(*batch["tokens"].shape, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        for row, start, end, _ in pieces(batch):
            if end == start:
                continue
            tokens = batch["tokens"][row:row + 1, start:end]
            positions = torch.arange(end - start)[None]
            mask = torch.triu(torch.ones(end - start, end - start, dtype=torch.bool), 1)[None, None]
            logits = model(tokens, positions, mask)  # [1, L, V / tp]
            if tp_group is not None:
                parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(tp_group))]
                torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group)
                logits = torch.cat(parts, -1)
            out[row, start:end] = logits[0].double()
    return out


def reference(model, batch, tp_group=None):
    """float64 by hand: per channel [loss sum, tokens] from the cross entropy of the model's
    logits, [correct, tokens] from their argmax (ties count), and the all-token accuracy."""
    logits = full_logits(model, batch, tp_group)
    labels, mask = batch["labels"], batch["loss_mask"].double()
    token_loss = torch.logsumexp(logits, -1) - logits.gather(-1, labels[..., None])[..., 0]
    correct = (logits.gather(-1, labels[..., None])[..., 0] == logits.max(-1).values).double()
    want = {key: [0.0, 0.0] for key in CONFIG.metric_keys() + CONFIG.accuracy_keys()}
    for row, start, end, channel in pieces(batch):
        if channel < 0:
            continue
        m = mask[row, start:end]
        want[CONFIG.metric_keys()[channel]][0] += float((token_loss[row, start:end] * m).sum())
        want[CONFIG.accuracy_keys()[channel]][0] += float((correct[row, start:end] * m).sum())
        for key in (CONFIG.metric_keys()[channel], CONFIG.accuracy_keys()[channel]):
            want[key][1] += float(m.sum())
    want["token acc"] = [float((correct * mask).sum()), float(mask.sum())]
    return want


def step(model, config, batch, stock: bool = False):
    """forward_step, loss_func (ours, or Megatron's stock one) and backward."""
    model.zero_grad(set_to_none=True)
    output, loss_func = make_forward_step(config, BatchLayout.of_batch(batch))(iter([batch]), model)
    if stock:
        loss, _, metrics = stock_loss_func(loss_func.keywords["loss_mask"], output)
    else:
        loss, _, metrics = loss_func(output)
    loss.backward()
    return loss.detach(), {k: v.tolist() for k, v in metrics.items()}, [p.grad.clone() for p in model.parameters()]


def check(model, batch, tp_group=None):
    want = reference(model, batch, tp_group)
    loss, got, grads = step(model, CONFIG, batch)
    stock_loss, _, stock_grads = step(model, PLAIN, batch, stock=True)
    assert torch.equal(loss, stock_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, stock_grads))
    for key in CONFIG.accuracy_keys() + ["token acc"]:
        assert got[key] == want[key], key  # counts of 0/1 flags: exact
    for key in CONFIG.metric_keys():
        assert got[key][1] == want[key][1], key
        assert got[key][0] == pytest.approx(want[key][0], rel=1e-5, abs=1e-5), key
    return want


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_hybrid_model_channels_and_accuracy_exact_and_training_bitwise(megatron_cpu, packed):
    model = build_hybrid()
    ties = 0
    for seed in range(4):
        want = check(model, batch_of(seed, packed))
        ties += want["token acc"][0]
    assert ties > 0  # some labels are (tied) argmaxes


def _tp_worker(rank, world_size):
    from megatron.core import parallel_state

    model = build_hybrid(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    for packed in (False, True):
        for seed in range(2):
            check(model, batch_of(seed + 10, packed), group)
    return "ok"


@pytest.mark.timeout(240)
def test_hybrid_model_under_tensor_parallelism_over_two_gloo_ranks():
    assert run_distributed(_tp_worker, 2, timeout=200) == ["ok", "ok"]


@pytest.mark.timeout(120)
def test_output_layer_hook_on_gpt_gives_the_output_processor_flags(megatron_cpu, monkeypatch):
    """The route megatron-core 0.17 takes (no output_processor): bitwise the same metrics, loss
    and gradients as the output_processor route on the same GPTModel."""
    from megatron_channel.step import forward_step as forward_step_module
    from megatron_testing import PackedAsBlockMask, tiny_gpt

    init_parallel(seed=3)
    model = PackedAsBlockMask(tiny_gpt(vocab_size=VOCAB, seq_length=S))
    for packed in (False, True):
        batch = batch_of(5, packed)
        via_processor = step(model, CONFIG, batch)
        monkeypatch.setattr(forward_step_module, "takes_output_processor", lambda model: False)
        via_hook = step(model, CONFIG, batch)
        monkeypatch.undo()
        assert torch.equal(via_processor[0], via_hook[0]) and via_processor[1] == via_hook[1]
        assert all(torch.equal(a, b) for a, b in zip(via_processor[2], via_hook[2]))
