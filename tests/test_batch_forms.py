"""The batch forms real pipelines produce, through ``make_forward_step`` and the real GPTModel.

Unpacked rows: ``attention_mask`` ``[b, 1, s, s]``, ``[1, 1, s, s]`` (Megatron's
``get_ltor_masks_and_position_ids``), a mask with extra masked positions, None and absent
(causal); HF / Megatron-Bridge keys (``input_ids``, no ``position_ids``, ``attention_mask=None``)
and one row of 1-D tensors. Each form's per-token losses equal GPTModel's called with the same
mask, and its per-channel metrics equal a float64 cross-entropy reference over the model's
logits, grouped by hand. Packed rows in Megatron-Bridge's keys and padding (repeating the last
boundary), its legacy ``-1`` / ``cu_seqlens_argmin`` form, and Megatron SFTDataset's form
(padded with ``s``, ``max_seqlen`` a collated 0-d tensor) give bitwise the metrics of the
canonical form, which match the reference. Over two gloo ranks at TP=2, the forms give the
same numbers on both ranks and match a reference from the TP-gathered logits. Each refusal
names the field, what was seen and the fix.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from megatron_channel import BatchLayout, ChannelBatchError, ChannelConfig, make_forward_step
from megatron_channel.step.batch_forms import canonical_batch, default_position_ids
from megatron_testing import PackedAsBlockMask, block_causal_mask, init_parallel, run_distributed, tiny_gpt

VOCAB, S, ROWS = 64, 16, 3
CONFIG = ChannelConfig(["math", "code", "chat"])


@pytest.fixture(scope="module")
def model(megatron_cpu):
    init_parallel(seed=1234)
    gpt = tiny_gpt(vocab_size=VOCAB, seq_length=64).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights spread per-token losses, so a misplaced token shows
        for param in gpt.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    return PackedAsBlockMask(gpt)


def run(model, batch, layout=None):
    """forward_step then its loss_func: (per-token losses, metrics)."""
    with torch.no_grad():
        output, loss_func = make_forward_step(CONFIG, layout)(iter([batch]), model)
    return output, loss_func(output)[2]


def causal(s: int = S) -> torch.Tensor:
    return torch.triu(torch.ones(s, s, dtype=torch.bool), 1)


def reference(model, tokens, position_ids, mask, labels, loss_mask, segments) -> dict[str, list[float]]:
    """float64 cross entropy over the model's full logits, grouped by hand.

    ``segments``: ``(row, start, end, channel)``; tokens in no segment are untracked.
    """
    with torch.no_grad():
        logits = model.direct(tokens, position_ids, mask).double()  # [b, s, V]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(labels.shape)
    out = {key: [0.0, 0.0] for key in CONFIG.metric_keys()}
    for row, start, end, channel in segments:
        if channel < 0:
            continue
        for t in range(start, end):
            m = float(loss_mask[row, t])
            out[CONFIG.metric_keys()[channel]][0] += float(ce[row, t]) * m
            out[CONFIG.metric_keys()[channel]][1] += m
    return out


def assert_matches(metrics, want, where=""):
    for key, (total, count) in want.items():
        got_total, got_count = metrics[key].tolist()
        assert got_count == count, (where, key)
        assert got_total == pytest.approx(total, rel=1e-5, abs=1e-4), (where, key)


def unpacked_data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (ROWS, S), generator=gen)
    labels = torch.randint(0, VOCAB, (ROWS, S), generator=gen)
    loss_mask = (torch.rand(ROWS, S, generator=gen) > 0.25).float()
    channels = torch.tensor(random.Random(seed).choices([0, 1, 2, -1], k=ROWS))
    return tokens, labels, loss_mask, channels


# ----------------------------------------------------------------------------- unpacked rows


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_unpacked_mask_forms_equal_the_model_called_with_the_same_mask(model, seed):
    tokens, labels, loss_mask, channels = unpacked_data(seed)
    positions = torch.arange(S).expand(ROWS, S)
    segments = [(r, 0, S, int(channels[r])) for r in range(ROWS)]
    extra = causal() | (torch.rand(S, S, generator=torch.Generator().manual_seed(seed)) > 0.7)
    extra.fill_diagonal_(False)  # every query keeps itself
    base = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions, channels=channels)
    forms = {
        "[b, 1, s, s]": (dict(base, attention_mask=causal().expand(ROWS, 1, S, S).clone()), causal()[None, None]),
        "[1, 1, s, s]": (dict(base, attention_mask=causal()[None, None]), causal()[None, None]),
        "[1, 1, s, s] with masked positions": (dict(base, attention_mask=extra[None, None]), extra[None, None]),
        "None": (dict(base, attention_mask=None), None),
        "absent": (dict(base), None),
        "input_ids, no position_ids, attention_mask=None": (
            dict(input_ids=tokens, labels=labels, loss_mask=loss_mask, channels=channels, attention_mask=None), None),
    }
    for name, (batch, mask) in forms.items():
        output, metrics = run(model, batch)
        with torch.no_grad():
            direct = model.direct(tokens, positions, mask, labels=labels)
        assert torch.equal(output, direct), name  # GPTModel with the same mask, bit for bit
        assert_matches(metrics, reference(model, tokens, positions, mask, labels, loss_mask, segments), name)
    # The extra masked positions are used, not replaced by a causal mask.
    _, with_extra = run(model, forms["[1, 1, s, s] with masked positions"][0])
    _, plain = run(model, forms["[1, 1, s, s]"][0])
    assert any(not torch.equal(with_extra[k], plain[k]) for k in CONFIG.metric_keys() if plain[k][1] > 0)


@pytest.mark.timeout(60)
def test_one_row_of_1d_tensors_is_the_batch_of_that_row(model):
    tokens, labels, loss_mask, channels = unpacked_data(7)
    for r in range(ROWS):
        row_out, row_metrics = run(model, dict(input_ids=tokens[r], labels=labels[r], loss_mask=loss_mask[r],
                                              channels=channels[r]))  # 0-d channel, no position_ids
        out, metrics = run(model, dict(tokens=tokens[r : r + 1], labels=labels[r : r + 1],
                                       loss_mask=loss_mask[r : r + 1], position_ids=torch.arange(S)[None],
                                       channels=channels[r : r + 1]))
        assert torch.equal(row_out, out)
        assert all(torch.equal(row_metrics[k], metrics[k]) for k in metrics)


# ----------------------------------------------------------------------------- packed rows


def packed_forms(seed: int):
    """One packed row of S tokens in every accepted form, and the canonical one.

    Odd seeds pad every sequence to a multiple of 4 (``cu_seqlens_padded``, as for context
    parallelism): the real boundaries are then cumulative real lengths, ending before S, and
    the padding tokens carry no loss. Returns ``(canonical, forms, segments)``.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    padded_spans = seed % 2 == 1
    lengths = [4, 4, 8] if padded_spans else [3, 5, 8]
    rng.shuffle(lengths)
    if rng.random() < 0.5:
        lengths.insert(1, 0)  # a zero-length sequence in the middle
    layout = [0]
    for n in lengths:
        layout.append(layout[-1] + n)  # where the sequences sit in the row: ends at S
    real_lengths = [max(0, n - rng.randint(0, 2)) if padded_spans and n else n for n in lengths]
    real = [0]
    for n in real_lengths:
        real.append(real[-1] + n)
    pads = 2
    tokens = torch.randint(0, VOCAB, (1, S), generator=gen)
    labels = torch.randint(0, VOCAB, (1, S), generator=gen)
    loss_mask = (torch.rand(1, S, generator=gen) > 0.2).float()
    for start, n, n_real in zip(layout, lengths, real_lengths):
        loss_mask[0, start + n_real : start + n] = 0  # a sequence's padding
    ids = rng.choices([0, 1, 2, -1], k=len(lengths))
    channels = torch.tensor([ids + [-1] * pads])
    positions = torch.tensor([[t - max(c for c in layout if c <= t) for t in range(S)]])

    def repeating(bounds):
        return torch.tensor([bounds + [bounds[-1]] * pads], dtype=torch.int32)

    def legacy(bounds):
        return torch.tensor([bounds + [-1] * pads], dtype=torch.int32)

    longest = max(lengths)
    canonical = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions,
                     cu_seqlens=repeating(real), channels=channels)
    bridge = dict(input_ids=tokens, labels=labels, loss_mask=loss_mask, cu_seqlens_q=repeating(real),
                  cu_seqlens_kv=repeating(real), max_seqlen=longest, attention_mask=None, channels=channels)
    old = dict(input_ids=tokens, labels=labels, loss_mask=loss_mask, cu_seqlens_q=legacy(real),
               cu_seqlens_argmin=torch.tensor([[len(real)]]), channels=channels)
    if padded_spans:
        canonical["cu_seqlens_padded"] = repeating(layout)
        bridge["cu_seqlens_q_padded"] = repeating(layout)
        old["cu_seqlens_q_padded"] = legacy(layout)
    forms = {
        "Megatron-Bridge": bridge,
        "Megatron-Bridge legacy -1": old,
        "Megatron-Bridge, one row of 1-D tensors": {k: (v[0] if k in ("input_ids", "labels", "loss_mask", "channels",
                                                                        "cu_seqlens_q", "cu_seqlens_q_padded") else v)
                                                    for k, v in bridge.items()},
    }
    if not padded_spans:  # SFTDataset's rows: trailing entries equal to S, max_seqlen collated per row
        forms["Megatron SFTDataset"] = dict(canonical, max_seqlen=torch.tensor([longest]))
    segments = [(0, a, b, c) for a, b, c in zip(layout, layout[1:], ids)]
    return canonical, forms, segments


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(8))
def test_packed_forms_give_exactly_the_canonical_numbers(model, seed):
    canonical, forms, segments = packed_forms(seed)
    output, want = run(model, canonical)
    mask = block_causal_mask(canonical.get("cu_seqlens_padded", canonical["cu_seqlens"])[0], S)
    assert_matches(want, reference(model, canonical["tokens"], canonical["position_ids"], mask,
                                   canonical["labels"], canonical["loss_mask"], segments), "canonical")
    for name, batch in forms.items():
        got_output, got = run(model, batch)
        assert torch.equal(got_output, output), name
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.timeout(30)
def test_position_ids_restart_at_every_packed_sequence():
    cu = torch.tensor([[0, 3, 3, 7, 16, 16], [0, 8, 10, 12, 12, 12]], dtype=torch.int32)
    batch = dict(tokens=torch.zeros(2, 16, dtype=torch.long), cu_seqlens=cu)
    got = default_position_ids(batch)
    for r in range(2):
        bounds = cu[r].tolist()
        assert got[r].tolist() == [t - max(c for c in bounds if c <= t) for t in range(16)]
    padded = dict(batch, cu_seqlens_padded=torch.tensor([[0, 4, 4, 8, 16, 16], [0, 8, 12, 16, 16, 16]]))
    assert default_position_ids(padded)[1].tolist() == [*range(8), *range(4), *range(4)]  # at the padded spans
    assert default_position_ids(dict(tokens=torch.zeros(2, 5))).tolist() == [list(range(5))] * 2


@pytest.mark.timeout(30)
def test_max_seqlen_forms():
    base = dict(tokens=torch.zeros(1, 4, dtype=torch.long))
    assert canonical_batch(dict(base, max_seqlen=3))[1] == 3
    assert canonical_batch(dict(base, max_seqlen=torch.tensor(3)))[1] == 3
    assert canonical_batch(dict(base, max_seqlen=torch.tensor([2, 3])))[1] == 3  # collated per row
    assert canonical_batch(dict(base, max_seqlen=torch.tensor(3, device="meta")))[1] is None  # never read
    assert canonical_batch(dict(base, max_seqlen=torch.tensor(3)), validate=False)[1] is None
    with pytest.raises(ChannelBatchError, match=r"'max_seqlen' has dtype torch.float32.*give an int"):
        canonical_batch(dict(base, max_seqlen=torch.tensor(3.0)))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "edit, layout, match",
    [
        (lambda b: dict(b, input_ids=b["tokens"]), None,
         r"both 'tokens' and 'input_ids', two names of one field; give only one"),
        (lambda b: dict(b, cu_seqlens=b["cu_seqlens_q"]), None, r"both 'cu_seqlens' and 'cu_seqlens_q'"),
        (lambda b: dict(b, tokens=b["tokens"][0]), None,
         r"'labels' has shape \[1, 16\] but 'tokens' is one row \[s\]"),
        (lambda b: dict(b, cu_seqlens_q=torch.tensor([[0, 5, -1, 16]], dtype=torch.int32)), None,
         r"-1 entries followed by boundaries; -1 .* may only fill the end"),
        (lambda b: dict(b, cu_seqlens_q=torch.tensor([[0, 5, 16, -1]], dtype=torch.int32),
                        cu_seqlens_argmin=torch.tensor([[2]])), None,
         r"cu_seqlens_argmin = \[2\] but the first -1 of each row of cu_seqlens_q is at \[3\]"),
        (lambda b: dict(b, max_seqlen=4), None,
         r"'max_seqlen' = 4, but the longest packed sequence has 11 tokens"),
    ],
    ids=["tokens-and-input_ids", "cu_seqlens-twice", "1d-and-2d", "minus-one-inside", "argmin", "max_seqlen"],
)
def test_packed_refusals_name_the_field_and_the_fix(model, edit, layout, match):
    batch = dict(tokens=torch.zeros(1, S, dtype=torch.long), labels=torch.zeros(1, S, dtype=torch.long),
                 loss_mask=torch.ones(1, S), cu_seqlens_q=torch.tensor([[0, 5, 16, 16]], dtype=torch.int32),
                 channels=torch.tensor([[0, 1, -1]]))
    with pytest.raises(ChannelBatchError, match=match):
        run(model, edit(batch), layout)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "mask, layout, match",
    [
        (torch.ones(ROWS, S, dtype=torch.long), None,
         r"'attention_mask' has dtype torch.int64; Megatron's mask is bool with True = masked.*Hugging Face"),
        (torch.zeros(2, 1, S, S, dtype=torch.bool), None,
         r"'attention_mask' has shape \[2, 1, 16, 16\], which does not broadcast to \[b, 1, s, s\] = \[3, 1, 16, 16\]"),
        (torch.zeros(1, 1, S, S, dtype=torch.bool), BatchLayout(ROWS, S),
         r"carries 'attention_mask' but the layout has none, so it would be dropped"),
        (torch.zeros(1, 1, S, S, dtype=torch.bool), BatchLayout(ROWS, S, attention_mask=True),
         r"'attention_mask' has shape \[1, 1, 16, 16\], expected \[3, 1, 16, 16\].*BatchLayout\(attention_mask=shape\)"),
    ],
    ids=["hf-padding-mask", "not-broadcasting", "mask-not-in-layout", "tp-shape"],
)
def test_mask_refusals_name_the_field_and_the_fix(model, mask, layout, match):
    tokens, labels, loss_mask, channels = unpacked_data(0)
    batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, channels=channels, attention_mask=mask)
    with pytest.raises(ChannelBatchError, match=match):
        run(model, batch, layout)


@pytest.mark.timeout(30)
def test_a_layout_mask_shape_that_cannot_broadcast_is_refused():
    with pytest.raises(ValueError, match=r"BatchLayout\(attention_mask=\(2, 1, 16, 16\)\) does not broadcast"):
        BatchLayout(3, S, attention_mask=(2, 1, S, S))


# ----------------------------------------------------------------------------- TP=2 over gloo


def _tp_worker(rank, world_size):
    from megatron.core import parallel_state

    init_parallel(tp=2, seed=1234)
    model = PackedAsBlockMask(tiny_gpt(vocab_size=VOCAB, seq_length=64, tp=2).eval())
    group = parallel_state.get_tensor_model_parallel_group()

    def gathered_reference(tokens, positions, mask, labels, loss_mask, segments):
        with torch.no_grad():
            logits = model.direct(tokens, positions, mask)
        parts = [torch.empty_like(logits) for _ in range(2)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        full = torch.cat(parts, -1).double()
        ce = (torch.logsumexp(full, -1) - full.gather(-1, labels[..., None]).squeeze(-1))
        out = {key: [0.0, 0.0] for key in CONFIG.metric_keys()}
        for row, start, end, channel in segments:
            for t in range(start, end):
                if channel >= 0:
                    out[CONFIG.metric_keys()[channel]][0] += float(ce[row, t]) * float(loss_mask[row, t])
                    out[CONFIG.metric_keys()[channel]][1] += float(loss_mask[row, t])
        return out

    results = {}
    tokens, labels, loss_mask, channels = unpacked_data(3)
    positions = torch.arange(S).expand(ROWS, S)
    segments = [(r, 0, S, int(channels[r])) for r in range(ROWS)]
    unpacked = {
        "[1, 1, s, s]": (dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions,
                              channels=channels, attention_mask=causal()[None, None]),
                         BatchLayout(ROWS, S, attention_mask=(1, 1, S, S)), causal()[None, None]),
        "input_ids, no mask": (dict(input_ids=tokens, labels=labels, loss_mask=loss_mask, channels=channels,
                                    attention_mask=None), BatchLayout(ROWS, S), None),
    }
    for name, (batch, layout, mask) in unpacked.items():
        # Receivers get garbage: only TP rank 0 reads the batch.
        sent = batch if rank == 0 else {k: torch.full_like(v, 7) if isinstance(v, torch.Tensor) else v
                                         for k, v in batch.items()}
        output, metrics = run(model, sent, layout)
        with torch.no_grad():
            direct = model.direct(tokens, positions, mask, labels=labels)
        results[name] = dict(same_losses=torch.equal(output, direct),
                             metrics={k: v.tolist() for k, v in metrics.items()},
                             want=gathered_reference(tokens, positions, mask, labels, loss_mask, segments))
    canonical, forms, segments = packed_forms(5)
    layout = BatchLayout(1, S, packed=True, cu_seqlens_padded="cu_seqlens_padded" in canonical)
    mask = block_causal_mask(canonical.get("cu_seqlens_padded", canonical["cu_seqlens"])[0], S)
    want = gathered_reference(canonical["tokens"], canonical["position_ids"], mask, canonical["labels"],
                              canonical["loss_mask"], segments)
    for name, batch in {"canonical": canonical, **forms}.items():
        _, metrics = run(model, batch if rank == 0 else {}, layout)
        results[name] = dict(same_losses=True, metrics={k: v.tolist() for k, v in metrics.items()}, want=want)
    return results


@pytest.mark.timeout(240)
def test_forms_under_tensor_parallelism_over_two_gloo_ranks():
    ranks = run_distributed(_tp_worker, 2, timeout=200)
    assert ranks[0] == ranks[1]  # TP ranks hold identical values
    results = ranks[0]
    assert {"Megatron-Bridge", "Megatron-Bridge legacy -1"} <= set(results)
    for name, result in results.items():
        assert result["same_losses"], name
        assert_matches({k: torch.tensor(v) for k, v in result["metrics"].items()}, result["want"], name)
    packed = [n for n in results if n not in ("[1, 1, s, s]", "input_ids, no mask")]
    assert all(results[n]["metrics"] == results["canonical"]["metrics"] for n in packed)


@pytest.mark.timeout(30)
def test_context_parallelism_needs_the_full_query_dimension_of_the_mask():
    from megatron_channel.step.checks import check_batch

    tokens, labels, loss_mask, channels = unpacked_data(0)
    batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=torch.arange(S).expand(ROWS, S),
                 channels=channels, attention_mask=torch.zeros(ROWS, 1, 1, S, dtype=torch.bool))
    layout = BatchLayout.of_batch(batch)
    keys = ["tokens", "position_ids", "labels", "loss_mask", "channels", "attention_mask"]
    check_batch(batch, keys, layout, CONFIG.num_channels, cp_size=1)  # a padding-style mask is fine without CP
    with pytest.raises(ChannelBatchError, match=r"context parallelism cuts the mask's query dimension"):
        check_batch(batch, keys, layout, CONFIG.num_channels, cp_size=2)
