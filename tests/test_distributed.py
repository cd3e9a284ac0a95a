"""Per-channel loss metrics across real gloo process groups (Megatron-Core parallel_state).

Each test spawns one process group and runs whole "iterations" in it: several
microbatches per rank through ``make_forward_step`` on a real tiny ``GPTModel``, then
``reduce_channel_metrics`` as Megatron's ``train_step`` would. Layouts covered:

* DP=2 (world 2, tp=1), TP=2 (world 2, tp=2) and DP=2 x TP=2 (world 4).
* Data-parallel ranks whose batches hold disjoint channel sets; a microbatch whose
  loss_mask is all 0; a channel present only in that microbatch (zero tokens globally)
  and a channel that never appears: both must be left out of the reduced result (not NaN).
* A data-parallel rank (DP=3) with no loss token in the whole iteration.
* Packed rows (``cu_seqlens``, zero-length padding sequences, extra ``channels``
  columns) under TP=2.

Checked:

* Every rank and every microbatch reports the same metric keys in the same order:
  ``"lm loss"`` then ``prefix + name`` in channel order.
* Each microbatch's ``[sum, count]`` per channel, and the reduced ``sum / count``,
  match an independent reference: float64 cross entropy from the model's logits
  (all-gathered over the TP group), grouped by channel with plain Python loops over the
  global batch (all ranks' microbatches). rtol 1e-5, atol 1e-4; token counts exact.
* TP ranks hold bitwise identical metrics for every microbatch, and the channels they
  receive are TP rank 0's: ranks other than TP rank 0 are handed an iterator of
  garbage batches (or ``None``) that must never be read.
* A bad batch on TP rank 0 raises ``ChannelBatchError`` there before any broadcast,
  so the TP group's next collective still lines up.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_channel import BatchLayout, ChannelBatchError, ChannelConfig, make_forward_step, reduce_channel_metrics
from megatron_testing import PackedAsBlockMask, block_causal_mask, run_distributed

VOCAB = 64
SEQ = 16
MICRO_BATCH = 2

# "muted" only ever appears in rows whose loss_mask is all 0; "absent" never appears.
CONFIG = ChannelConfig(("math", "code", "chat", "muted", "absent"), prefix="loss_")
MUTED = CONFIG.channel_id("muted")
EXPECTED_KEYS = ["lm loss"] + CONFIG.metric_keys()
LEFT_OUT = {"loss_muted", "loss_absent"}

RTOL, ATOL = 1e-5, 1e-4

# Unpacked microbatches per data-parallel rank: (row channel ids, whole microbatch masked out).
# With two DP ranks the channel sets are disjoint: {math, code} vs {chat, muted}.
UNPACKED_PLANS = {
    1: [[([0, 2], False), ([MUTED, -1], True), ([1, -1], False)]],
    2: [
        [([0, 1], False), ([1, -1], False), ([0, 0], False)],
        [([2, 2], False), ([MUTED, -1], True), ([2, -1], False)],
    ],
    # DP rank 2 has no loss token at all in the iteration.
    3: [
        [([0, 1], False), ([1, -1], False), ([0, 0], False)],
        [([2, 2], False), ([MUTED, -1], True), ([2, -1], False)],
        [([1, 2], True), ([0, -1], True), ([MUTED, MUTED], True)],
    ],
}

# Packed microbatches per DP rank: per row, cu_seqlens (5 entries: up to 4 sequences,
# padded with SEQ) and channel ids with one extra column past the 4 sequence slots.
# Extra columns and zero-length padding sequences must not count. Attention gets at most
# 3 sequences per row (the most any row has).
PACKED_LAYOUT = BatchLayout(MICRO_BATCH, SEQ, packed=True, max_sequences_per_row=3, attention_mask=True)
PACKED_PLANS = {
    1: [[
        ([[0, 5, 9, 16, 16], [0, 16, 16, 16, 16]], [[0, 1, -1, 2, 2], [2, 0, 0, 0, 1]]),
        ([[0, 3, 8, 12, 16], [0, 7, 16, 16, 16]], [[1, 1, 0, -1, 0], [MUTED, 2, 0, 1, 1]]),
    ]],
    2: [
        [([[0, 5, 9, 16, 16], [0, 16, 16, 16, 16]], [[0, 1, -1, 0, 2], [1, 0, 0, 0, 1]])],
        [([[0, 3, 8, 12, 16], [0, 7, 16, 16, 16]], [[2, 2, 2, -1, 0], [MUTED, 2, 1, 1, 1]])],
    ],
    3: [
        [([[0, 5, 9, 16, 16], [0, 16, 16, 16, 16]], [[0, 1, -1, 0, 2], [1, 0, 0, 0, 1]])],
        [([[0, 3, 8, 12, 16], [0, 7, 16, 16, 16]], [[2, 2, 2, -1, 0], [MUTED, 2, 1, 1, 1]])],
        [([[0, 16, 16, 16, 16], [0, 8, 16, 16, 16]], [[MUTED, 0, 0, 0, 0], [MUTED, MUTED, 1, 1, 1]])],
    ],
}
# Packed sequences of channel MUTED get a zero loss_mask (see packed_microbatch).


# --------------------------------------------------------------------------- batches


def causal_mask(rows: int, seq: int) -> torch.Tensor:
    """``[rows, 1, s, s]`` bool, True = masked, built on the CPU (Megatron's would be CUDA)."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).expand(rows, 1, seq, seq).clone()


def unpacked_microbatch(gen: torch.Generator, channels: list[int], masked_out: bool) -> dict:
    rows = len(channels)
    loss_mask = (torch.rand(rows, SEQ, generator=gen) < 0.75).float()
    if masked_out:
        loss_mask.zero_()
    return {
        "tokens": torch.randint(VOCAB, (rows, SEQ), generator=gen),
        "labels": torch.randint(VOCAB, (rows, SEQ), generator=gen),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(rows, SEQ).clone(),
        "attention_mask": causal_mask(rows, SEQ),
        "channels": torch.tensor(channels, dtype=torch.long),
    }


def packed_microbatch(gen: torch.Generator, cu_rows: list[list[int]], channel_rows: list[list[int]]) -> dict:
    rows = len(cu_rows)
    cu = torch.tensor(cu_rows, dtype=torch.int32)
    channels = torch.tensor(channel_rows, dtype=torch.long)
    loss_mask = (torch.rand(rows, SEQ, generator=gen) < 0.75).float()
    position_ids = torch.zeros(rows, SEQ, dtype=torch.long)
    for r in range(rows):
        for i in range(cu.shape[1] - 1):
            start, end = int(cu[r, i]), int(cu[r, i + 1])
            position_ids[r, start:end] = torch.arange(end - start)
            if int(channels[r, i]) == MUTED:
                loss_mask[r, start:end] = 0.0
    return {
        "tokens": torch.randint(VOCAB, (rows, SEQ), generator=gen),
        "labels": torch.randint(VOCAB, (rows, SEQ), generator=gen),
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "attention_mask": torch.cat([block_causal_mask(cu[r], SEQ) for r in range(rows)]),
        "cu_seqlens": cu,
        "channels": channels,
    }


def make_batches(dp_size: int, seed: int = 0) -> dict[str, list[list[dict]]]:
    """``{"unpacked": [dp_rank][microbatch], "packed": [dp_rank][microbatch]}``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "unpacked": [[unpacked_microbatch(gen, ch, off) for ch, off in plan] for plan in UNPACKED_PLANS[dp_size]],
        "packed": [[packed_microbatch(gen, cu, ch) for cu, ch in plan] for plan in PACKED_PLANS[dp_size]],
    }


def garbage_like(batch: dict) -> dict:
    """Same shapes, different values: channels all 0, other tokens. Must never be read."""
    out = {k: v.clone() for k, v in batch.items()}
    out["tokens"] = (out["tokens"] + 1) % VOCAB
    out["labels"] = (out["labels"] + 7) % VOCAB
    out["channels"] = torch.zeros_like(out["channels"])
    return out


class CountingIterator:
    """An iterator that counts how often it is read."""

    def __init__(self, items):
        self.items = list(items)
        self.reads = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.reads >= len(self.items):
            raise StopIteration
        self.reads += 1
        return self.items[self.reads - 1]


# --------------------------------------------------------------------------- model


def build_model(tp: int) -> PackedAsBlockMask:
    from megatron_testing import tiny_gpt

    # init_parallel seeded torch identically on every rank, so TP shards are consistent.
    return PackedAsBlockMask(tiny_gpt(vocab_size=VOCAB, seq_length=SEQ, tp=tp)).eval()


def reference_token_ce(model: PackedAsBlockMask, batch: dict, packed: bool) -> list[list[float]]:
    """float64 cross entropy per token from the full (TP-gathered) logits, row by row."""
    from megatron.core import parallel_state

    rows = batch["tokens"].shape[0]
    out = []
    for r in range(rows):
        mask = (block_causal_mask(batch["cu_seqlens"][r], SEQ) if packed else batch["attention_mask"][r : r + 1])
        logits = model.module(batch["tokens"][r : r + 1], batch["position_ids"][r : r + 1], mask)  # [1, s, v/tp]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        assert logits.shape[-1] == VOCAB, f"gathered logits have {logits.shape[-1]} entries, expected {VOCAB}"
        full = logits[0].double()
        labels = batch["labels"][r]
        ce = torch.logsumexp(full, dim=-1) - full.gather(-1, labels[:, None]).squeeze(-1)
        out.append(ce.tolist())
    return out


# --------------------------------------------------------------------------- worker


def _iteration_worker(rank, world_size, tp, batches):
    """One unpacked and one packed iteration; returns what the parent checks."""
    from megatron.core import parallel_state

    from megatron_testing import init_parallel

    init_parallel(tp=tp)
    dp_rank = parallel_state.get_data_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    model = build_model(tp)
    layouts = {
        "unpacked": BatchLayout(MICRO_BATCH, SEQ, attention_mask=True) if tp > 1 else None,
        "packed": PACKED_LAYOUT,
    }
    result = {"dp_rank": dp_rank, "tp_rank": tp_rank}
    with torch.no_grad():
        for kind, layout in layouts.items():
            mine = batches[kind][dp_rank]
            if tp_rank == 0:
                iterator = CountingIterator(mine)
            elif kind == "unpacked":
                iterator = CountingIterator([garbage_like(b) for b in mine])  # must stay unread
            else:
                iterator = None  # must not be touched at all
            forward_step = make_forward_step(CONFIG, layout=layout)
            metric_dicts, channels_seen, losses = [], [], []
            for _ in mine:
                output, loss_func = forward_step(iterator, model)
                loss, num_tokens, metrics = loss_func(output)
                metric_dicts.append(metrics)
                channels_seen.append(loss_func.keywords["channels"].tolist())
                losses.append((float(loss), int(num_tokens)))
            result[kind] = {
                "reads": None if iterator is None else iterator.reads,
                "keys": [list(m) for m in metric_dicts],
                "metrics": [{k: v.tolist() for k, v in m.items()} for m in metric_dicts],
                "channels_seen": channels_seen,
                "losses": losses,
                "reduced": reduce_channel_metrics(metric_dicts),
                "reference_ce": [reference_token_ce(model, b, kind == "packed") for b in mine],
            }
    return result


# --------------------------------------------------------------------------- reference


def segments(batch: dict, packed: bool):
    """``(row, start, end, channel)`` for every row (unpacked) or packed sequence."""
    rows = batch["tokens"].shape[0]
    for r in range(rows):
        if not packed:
            yield r, 0, SEQ, int(batch["channels"][r])
            continue
        cu = batch["cu_seqlens"][r].tolist()
        for i in range(len(cu) - 1):  # channel columns past len(cu) - 1 are padding slots
            yield r, cu[i], cu[i + 1], int(batch["channels"][r, i])


def reference_totals(batch: dict, ce: list[list[float]], packed: bool) -> dict[str, list[float]]:
    """``{key: [masked loss sum, masked token count]}`` for one microbatch, by hand."""
    totals = {key: [0.0, 0.0] for key in EXPECTED_KEYS}
    for r, start, end, channel in segments(batch, packed):
        for t in range(start, end):
            m = float(batch["loss_mask"][r, t])
            totals["lm loss"][0] += ce[r][t] * m
            totals["lm loss"][1] += m
            if channel >= 0:
                key = CONFIG.metric_keys()[channel]
                totals[key][0] += ce[r][t] * m
                totals[key][1] += m
    return totals


def reference_means(per_microbatch_totals: list[dict]) -> dict[str, float]:
    sums = {key: [0.0, 0.0] for key in EXPECTED_KEYS}
    for totals in per_microbatch_totals:
        for key, (s, c) in totals.items():
            sums[key][0] += s
            sums[key][1] += c
    return {key: s / c for key, (s, c) in sums.items() if c > 0}


# --------------------------------------------------------------------------- checks


def compacted_channels(batch: dict) -> list[int]:
    """The channels attention's sequence list carries: those of the non-empty sequences, row by
    row, then -1 up to the layout's capacity."""
    kept = [channel
            for cu, channels in zip(batch["cu_seqlens"].tolist(), batch["channels"].tolist())
            for start, end, channel in zip(cu, cu[1:], channels) if end > start]
    return kept + [-1] * (PACKED_LAYOUT.sequence_capacity - len(kept))


def check_iteration(results: list[dict], batches: dict, kind: str) -> None:
    packed = kind == "packed"
    per_rank = {(r["dp_rank"], r["tp_rank"]): r[kind] for r in results}
    dp_size = len(batches[kind])
    tp_size = len(results) // dp_size

    # Same keys, same order, on every rank and microbatch.
    for (dp, tp), res in per_rank.items():
        for i, keys in enumerate(res["keys"]):
            assert keys == EXPECTED_KEYS, f"{kind}: dp {dp} tp {tp} microbatch {i} reports keys {keys}"

    # Only TP rank 0 reads data; it reads exactly one batch per microbatch.
    for (dp, tp), res in per_rank.items():
        if tp == 0:
            expected_reads = len(batches[kind][dp])
        else:  # garbage iterator for unpacked, None for packed
            expected_reads = 0 if kind == "unpacked" else None
        assert res["reads"] == expected_reads, f"{kind}: dp {dp} tp {tp} read the iterator {res['reads']} times"

    # TP ranks: bitwise identical metrics, and the channels TP rank 0 read.
    for dp in range(dp_size):
        src = per_rank[(dp, 0)]
        for tp in range(1, tp_size):
            other = per_rank[(dp, tp)]
            assert other["metrics"] == src["metrics"], f"{kind}: dp {dp} tp {tp} metrics differ from tp 0"
            assert other["losses"] == src["losses"], f"{kind}: dp {dp} tp {tp} loss differs from tp 0"
            assert other["channels_seen"] == src["channels_seen"], (
                f"{kind}: dp {dp} tp {tp} got channels {other['channels_seen']}, tp 0 has {src['channels_seen']}"
            )
        for i, batch in enumerate(batches[kind][dp]):
            expected = compacted_channels(batch) if packed else batch["channels"].tolist()
            assert src["channels_seen"][i] == expected, f"{kind}: dp {dp} microbatch {i} channels mangled"

    # Per-microbatch [sum, count] against the by-hand reference.
    all_totals = []
    for dp in range(dp_size):
        src = per_rank[(dp, 0)]
        for i, batch in enumerate(batches[kind][dp]):
            totals = reference_totals(batch, src["reference_ce"][i], packed)
            all_totals.append(totals)
            for key in EXPECTED_KEYS:
                got_sum, got_count = src["metrics"][i][key]
                ref_sum, ref_count = totals[key]
                assert got_count == ref_count, f"{kind}: dp {dp} mb {i} {key} count {got_count} != {ref_count}"
                assert math.isclose(got_sum, ref_sum, rel_tol=RTOL, abs_tol=ATOL), (
                    f"{kind}: dp {dp} mb {i} {key} sum {got_sum} != reference {ref_sum}"
                )
            assert src["losses"][i] == (src["metrics"][i]["lm loss"][0], int(src["metrics"][i]["lm loss"][1])), (
                f"{kind}: dp {dp} mb {i}: loss/num_tokens disagree with the 'lm loss' metric"
            )

    # Reduced means: one global reference over every rank's microbatches.
    expected = reference_means(all_totals)
    assert not LEFT_OUT & expected.keys(), "test data should leave 'muted' and 'absent' without tokens"
    assert len(expected) >= 3, f"test data should cover several channels, got {sorted(expected)}"
    for (dp, tp), res in per_rank.items():
        reduced = res["reduced"]
        assert list(reduced) == [k for k in EXPECTED_KEYS if k in expected], (
            f"{kind}: dp {dp} tp {tp} reduced keys {list(reduced)}, expected {sorted(expected)} "
            f"(keys without tokens anywhere must be left out)"
        )
        for key, value in reduced.items():
            assert not math.isnan(value), f"{kind}: dp {dp} tp {tp} {key} is NaN"
            assert math.isclose(value, expected[key], rel_tol=RTOL, abs_tol=ATOL), (
                f"{kind}: dp {dp} tp {tp} {key} = {value}, reference {expected[key]}"
            )
        assert reduced == per_rank[(0, 0)]["reduced"], f"{kind}: dp {dp} tp {tp} reduced differently from rank 0"


def run_and_check(world_size: int, tp: int, timeout: float) -> None:
    batches = make_batches(world_size // tp)
    results = run_distributed(_iteration_worker, world_size, tp, batches, timeout=timeout)
    coords = sorted((r["dp_rank"], r["tp_rank"]) for r in results)
    assert coords == [(d, t) for d in range(world_size // tp) for t in range(tp)], f"unexpected layout {coords}"
    for kind in ("unpacked", "packed"):
        check_iteration(results, batches, kind)


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(90)
def test_data_parallel_2():
    """DP=2: disjoint channel sets per rank, a masked-out microbatch, channels without tokens."""
    run_and_check(world_size=2, tp=1, timeout=75)


@pytest.mark.timeout(90)
def test_data_parallel_3_with_a_rank_without_loss_tokens():
    """DP=3: rank 2 has no loss token in any microbatch; it still reports every key and
    reduces to the same values as the others."""
    batches = make_batches(3)
    assert all(float(b["loss_mask"].sum()) == 0 for kind in batches for b in batches[kind][2])
    run_and_check(world_size=3, tp=1, timeout=75)


@pytest.mark.timeout(90)
def test_tensor_parallel_2():
    """TP=2: only TP rank 0 reads; rank 1 gets garbage (unpacked) or None (packed)."""
    run_and_check(world_size=2, tp=2, timeout=75)


@pytest.mark.timeout(120)
def test_data_x_tensor_parallel_4():
    """DP=2 x TP=2 on four processes."""
    run_and_check(world_size=4, tp=2, timeout=100)


def _bad_batch_worker(rank, world_size, cases):
    """TP rank 0 feeds each bad batch and must raise before broadcasting; rank 1 skips
    forward_step. A sentinel broadcast after each case shows no stray broadcast happened."""
    from megatron.core import parallel_state

    from megatron_testing import init_parallel

    init_parallel(tp=2)
    model = build_model(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    errors = []
    for i, (batch, layout) in enumerate(cases):
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            forward_step = make_forward_step(CONFIG, layout=layout)
            try:
                forward_step(iter([batch]), model)
            except ChannelBatchError as e:
                errors.append(str(e))
            else:
                errors.append(None)
        sentinel = torch.tensor([1000 + i]) if rank == src else torch.tensor([-1])
        torch.distributed.broadcast(sentinel, src, group=group)
        assert int(sentinel) == 1000 + i, f"case {i}: rank {rank} received {int(sentinel)} instead of the sentinel"
    return errors


@pytest.mark.timeout(60)
def test_bad_batch_on_tp_rank_0_raises_before_broadcast():
    gen = torch.Generator().manual_seed(1)
    out_of_range = unpacked_microbatch(gen, [0, CONFIG.num_channels], False)
    wrong_rows = unpacked_microbatch(gen, [0, 1], False)
    wrong_rows["channels"] = torch.tensor([0, 1, 2])
    decreasing = packed_microbatch(gen, [[0, 5, 9, 16, 16], [0, 16, 16, 16, 16]], [[0, 1, 2, 0, 0], [1, 0, 0, 0, 0]])
    decreasing["cu_seqlens"] = torch.tensor([[0, 9, 5, 16, 16], [0, 16, 16, 16, 16]], dtype=torch.int32)
    unpacked_layout = BatchLayout(MICRO_BATCH, SEQ, attention_mask=True)
    cases = [(out_of_range, unpacked_layout), (wrong_rows, unpacked_layout), (decreasing, PACKED_LAYOUT)]
    expected = [f"channels holds id {CONFIG.num_channels}", "has shape [3]", "decreases"]

    errors, rank1_errors = run_distributed(_bad_batch_worker, 2, cases, timeout=45)
    assert rank1_errors == [], f"TP rank 1 should not have called forward_step, got {rank1_errors}"
    for i, (message, needle) in enumerate(zip(errors, expected)):
        assert message is not None, f"case {i}: no ChannelBatchError raised on TP rank 0"
        assert needle in message, f"case {i}: error {message!r} does not mention {needle!r}"
