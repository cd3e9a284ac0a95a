"""Both summing paths of ``megatron_channel.segment_math`` against a float64 reference by hand.

CPU tensors are summed with numpy (``sequence_stats_reduceat``, numpy ``bincount``); GPU
tensors with torch (``sequence_stats_prefix``, ``index_add_``). Both run here on CPU tensors,
the torch path inside ``summing_like_a_gpu``, over randomized boundaries with the awkward
cases: zero-length sequences in the middle, trailing entries equal to the token count, a
sequence ending on the last token or one before it, tokens after the last entry, int32 and
int64 boundaries, untracked (-1) and absent channels, and no tokens at all.

Several value rows summed in one pass (``[V, T]`` stacked or ``V`` separate rows; the loss
path's ``(masked losses, masked correct flags, loss mask)``) are checked the same way, plus
sequences without loss tokens and the fixed-length sequence list training hands the loss
(real sequences first, then zero-length slots with channel -1), and bit for bit against
summing each row alone, the way the loss summed the flags in a second pass before.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_channel import segment_math
from megatron_channel.segment_math import (
    channel_totals,
    row_channel_totals,
    sequence_channel_totals,
    sequence_stats,
    sequence_stats_prefix,
    sequence_stats_reduceat,
    summing_like_a_gpu,
)

CASES = 2000


@pytest.fixture(params=["host", "torch"])
def summing(request):
    """``host``: numpy on CPU tensors, as in CPU runs; ``torch``: the path GPU tensors take."""
    if request.param == "host":
        yield request.param
    else:
        with summing_like_a_gpu():
            yield request.param


def random_boundaries(rng: random.Random, tokens: int) -> list[int]:
    end = tokens if rng.random() < 0.7 else rng.randint(0, tokens)
    inner = sorted(rng.randint(0, end) for _ in range(rng.randint(0, 8)))
    if tokens and rng.random() < 0.2:  # a sequence of the last token alone, or ending one before it
        inner.append(max(0, end - rng.choice([1, 2])))
        inner.sort()
    return [0] + inner + [end] * rng.randint(1, 4)


def reference(losses: list[float], mask: list[float], bounds: list[int], channels: list[int], k: int):
    """Per sequence and per channel ``[sum, count]`` in float64, one token at a time."""
    per_sequence = [[0.0, 0.0] for _ in range(len(bounds) - 1)]
    per_channel = [[0.0, 0.0] for _ in range(k)]
    for i in range(len(bounds) - 1):
        for t in range(bounds[i], bounds[i + 1]):
            per_sequence[i][0] += losses[t] * mask[t]
            per_sequence[i][1] += mask[t]
        if channels[i] >= 0:
            per_channel[channels[i]][0] += per_sequence[i][0]
            per_channel[channels[i]][1] += per_sequence[i][1]
    return torch.tensor(per_sequence, dtype=torch.float64).t(), torch.tensor(per_channel, dtype=torch.float64)


def assert_channel_totals(totals, want, where: str) -> None:
    """``totals`` is float32 ``[K, 2]``, close to the float64 reference, counts exact, absent ``[0, 0]``."""
    assert totals.dtype == torch.float32 and totals.shape == want.shape, where
    torch.testing.assert_close(totals.double(), want, rtol=1e-6, atol=1e-4, msg=where)
    assert torch.equal(totals[:, 1].double(), want[:, 1]), f"{where}: channel counts"
    absent = want[:, 1] == 0
    assert torch.equal(totals[absent], torch.zeros(int(absent.sum()), 2)), f"{where}: absent channel not [0, 0]"


@pytest.mark.parametrize("block", range(4))
def test_sequence_stats_and_channel_totals_match_the_reference(summing, block):
    rng = random.Random(block)
    for case in range(CASES // 4):
        tokens = rng.choice([0, 1, 2, 3, rng.randint(4, 40), rng.randint(41, 300)])
        bounds = random_boundaries(rng, tokens)
        k = rng.randint(1, 6)
        channels = [rng.randint(-1, k - 1) for _ in range(len(bounds) - 1)]
        losses = [rng.uniform(0, 10) for _ in range(tokens)]
        mask = [float(rng.random() < 0.7) for _ in range(tokens)]
        want_seq, want_channel = reference(losses, mask, bounds, channels, k)

        mask_t = torch.tensor(mask, dtype=torch.float32)
        masked = torch.tensor(losses, dtype=torch.float32) * mask_t
        bounds_t = torch.tensor(bounds, dtype=rng.choice([torch.int32, torch.int64]))
        where = f"{summing} case {block}/{case}: T={tokens} bounds={bounds} channels={channels}"

        stats = sequence_stats((masked, mask_t), bounds_t)
        assert stats.dtype == torch.float64 and stats.shape == (2, len(bounds) - 1), where
        torch.testing.assert_close(stats, want_seq, rtol=1e-6, atol=1e-5, msg=where)
        assert torch.equal(stats[1], want_seq[1]), f"{where}: counts {stats[1].tolist()}"

        totals = channel_totals(stats, torch.tensor(channels, dtype=rng.choice([torch.int32, torch.int64])), k)
        assert_channel_totals(totals, want_channel, where)


def test_both_paths_agree_on_large_microbatches():
    """Long sequences, where float32 summation order matters: the paths agree to ~1e-7."""
    gen = torch.Generator().manual_seed(0)
    for tokens, sequences in ((8192, 1), (32768, 256), (131072, 4096)):
        cuts = torch.randperm(tokens - 1, generator=gen)[: sequences - 1].sort().values + 1
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens, tokens])]).to(torch.int32)
        mask = (torch.rand(tokens, generator=gen) > 0.3).float()
        masked = torch.rand(tokens, generator=gen) * 8 * mask
        host, prefix = sequence_stats_reduceat((masked, mask), bounds), sequence_stats_prefix((masked, mask), bounds)
        torch.testing.assert_close(host, prefix, rtol=1e-6, atol=1e-4)
        assert torch.equal(host[1], prefix[1])


def test_summing_like_a_gpu_switches_cpu_tensors_to_the_torch_path_and_back():
    cpu = torch.zeros(1)
    assert segment_math.sums_with_numpy(cpu)
    with pytest.raises(RuntimeError, match="inside"):
        with summing_like_a_gpu():
            assert not segment_math.sums_with_numpy(cpu)
            raise RuntimeError("inside")
    assert segment_math.sums_with_numpy(cpu)  # restored even when the block raised
    assert not segment_math.sums_with_numpy(torch.zeros(1, device="meta"))


def test_row_channel_totals_match_the_reference():
    """Unpacked rows: each row is one sequence of the reference, its channel the row's id."""
    rng = random.Random(7)
    for case in range(CASES // 4):
        rows, length, k = rng.randint(1, 9), rng.choice([1, 2, 5, rng.randint(6, 70)]), rng.randint(1, 6)
        tokens = rows * length
        channels = [rng.choice([-1, *range(k)]) for _ in range(rows)]
        losses = [rng.uniform(0, 10) for _ in range(tokens)]
        mask = [float(rng.random() < rng.choice([0.0, 0.5, 1.0])) for _ in range(tokens)]
        _, want = reference(losses, mask, list(range(0, tokens + 1, length)), channels, k)
        mask_t = torch.tensor(mask, dtype=torch.float32)
        masked = torch.tensor(losses, dtype=torch.float32) * mask_t
        ids = torch.tensor(channels, dtype=rng.choice([torch.int32, torch.int64]))
        totals = row_channel_totals((masked, mask_t), rows, ids, k)
        assert_channel_totals(totals, want, f"case {case}: rows={rows} length={length} k={k} channels={channels}")


def test_row_channel_totals_refuse_a_channel_list_of_another_length():
    """Two ids for four rows must fail, not sum the rows in pairs."""
    with pytest.raises(RuntimeError):
        row_channel_totals((torch.ones(8), torch.ones(8)), 4, torch.tensor([0, 1]), 2)


# --------------------------------------------------------------------------- several rows at once


def reference_rows(rows: list[list[float]], bounds: list[int], channels: list[int], k: int):
    """Per sequence ``[V, N]`` and per channel ``[K, V]`` sums of every row, float64, token by token."""
    per_sequence = [[0.0] * (len(bounds) - 1) for _ in rows]
    per_channel = [[0.0] * len(rows) for _ in range(k)]
    for v, row in enumerate(rows):
        for i in range(len(bounds) - 1):
            for t in range(bounds[i], bounds[i + 1]):
                per_sequence[v][i] += row[t]
            if channels[i] >= 0:
                per_channel[channels[i]][v] += per_sequence[v][i]
    return torch.tensor(per_sequence, dtype=torch.float64), torch.tensor(per_channel, dtype=torch.float64)


def loss_rows_case(rng: random.Random, fixed_list: bool):
    """Masked losses, masked correct flags and the mask (float64 lists, as float32 holds them),
    boundaries and channels; some sequences have no loss tokens at all. ``fixed_list``: the
    sequences are followed by empty slots up to a fixed capacity, with channel -1."""
    tokens = rng.choice([0, 1, 2, 3, rng.randint(4, 40), rng.randint(41, 300)])
    bounds = random_boundaries(rng, tokens)
    k = rng.randint(1, 6)
    channels = [rng.randint(-1, k - 1) for _ in range(len(bounds) - 1)]
    if fixed_list:
        empty = rng.randint(0, 40)
        bounds += [bounds[-1]] * empty
        channels += [-1] * empty
    mask = []
    for i in range(len(bounds) - 1):  # each sequence: no loss tokens, all, or some
        share = rng.choice([0.0, 1.0, 0.6])
        mask += [float(rng.random() < share) for _ in range(bounds[i + 1] - bounds[i])]
    mask += [float(rng.random() < 0.6) for _ in range(tokens - len(mask))]  # tokens after the last entry
    losses = torch.tensor([rng.uniform(0, 10) for _ in range(tokens)], dtype=torch.float32).double().tolist()
    correct = [float(rng.random() < 0.5) for _ in range(tokens)]
    rows = [[a * m for a, m in zip(losses, mask)], [c * m for c, m in zip(correct, mask)], mask]
    return rows, bounds, channels, k


def as_values(rng: random.Random, rows: list[list[float]]):
    """The rows as the summing functions take them: one ``[V, T]`` tensor or a tuple of ``[T]``."""
    tensor = torch.tensor(rows, dtype=torch.float32).view(len(rows), -1)
    return (tensor, "stacked") if rng.random() < 0.5 else (tuple(tensor.clone().unbind(0)), "rows")


@pytest.mark.parametrize("fixed_list", [False, True], ids=["exact list", "fixed-length list"])
@pytest.mark.parametrize("block", range(2))
def test_several_rows_in_one_pass_match_the_reference(summing, block, fixed_list):
    rng = random.Random(100 + block + 10 * fixed_list)
    for case in range(CASES // 4):
        rows, bounds, channels, k = loss_rows_case(rng, fixed_list)
        want_seq, want_channel = reference_rows(rows, bounds, channels, k)
        values, form = as_values(rng, rows)
        bounds_t = torch.tensor(bounds, dtype=rng.choice([torch.int32, torch.int64]))
        where = f"{summing} {form} case {block}/{case}: T={len(rows[2])} bounds={bounds} channels={channels}"

        stats = sequence_stats(values, bounds_t)
        assert stats.dtype == torch.float64 and stats.shape == (3, len(bounds) - 1), where
        torch.testing.assert_close(stats, want_seq, rtol=1e-6, atol=1e-5, msg=where)
        assert torch.equal(stats[1:], want_seq[1:]), f"{where}: correct tokens and counts {stats[1:].tolist()}"

        ids = torch.tensor(channels, dtype=rng.choice([torch.int32, torch.int64]))
        totals = channel_totals(stats, ids, k)
        assert totals.dtype == torch.float32 and totals.shape == (k, 3), where
        torch.testing.assert_close(totals.double(), want_channel, rtol=1e-6, atol=1e-4, msg=where)
        assert torch.equal(totals[:, 1:].double(), want_channel[:, 1:]), f"{where}: channel counts"
        absent = want_channel[:, 2] == 0
        assert torch.equal(totals[absent], torch.zeros(int(absent.sum()), 3)), f"{where}: absent channel not zeros"

        # The loss path's layout: per channel [loss_sum, token_count, correct, token_count].
        pairs = channel_totals(stats, ids, k, columns=(0, 2, 1, 2))
        assert pairs.shape == (k, 4) and torch.equal(pairs, totals[:, [0, 2, 1, 2]]), where


@pytest.mark.parametrize("fixed_list", [False, True], ids=["exact list", "fixed-length list"])
def test_one_pass_is_bitwise_each_row_summed_alone(summing, fixed_list):
    """(losses, correct, mask) in one pass == (losses, mask) and (correct, mask) in two: the
    numbers the loss reported when it summed the flags in a second pass."""
    rng = random.Random(5 + fixed_list)
    for case in range(CASES // 4):
        rows, bounds, channels, k = loss_rows_case(rng, fixed_list)
        losses, correct, mask = torch.tensor(rows, dtype=torch.float32).view(3, -1).unbind(0)
        bounds_t, ids = torch.tensor(bounds), torch.tensor(channels)
        where = f"{summing} case {case}: bounds={bounds} channels={channels}"
        one = sequence_stats((losses, correct, mask), bounds_t)
        loss_pass, flag_pass = sequence_stats((losses, mask), bounds_t), sequence_stats((correct, mask), bounds_t)
        assert torch.equal(one, torch.stack([loss_pass[0], flag_pass[0], loss_pass[1]])), where
        assert torch.equal(loss_pass[1], flag_pass[1]), where
        pairs = channel_totals(one, ids, k, columns=(0, 2, 1, 2))
        two = torch.cat([channel_totals(loss_pass, ids, k), channel_totals(flag_pass, ids, k)], 1)
        assert torch.equal(pairs, two), where


def test_stacked_rows_and_separate_rows_sum_the_same(summing):
    gen = torch.Generator().manual_seed(3)
    for tokens, sequences, empty in ((1, 1, 0), (300, 7, 3), (8192, 64, 200), (32768, 256, 1792)):
        cuts = torch.randperm(max(tokens - 1, 1), generator=gen)[: sequences - 1].sort().values + 1
        bounds = torch.cat([torch.tensor([0]), cuts, torch.full((empty + 1,), tokens)]).clamp(max=tokens)
        mask = (torch.rand(tokens, generator=gen) > 0.3).float()
        stacked = torch.stack([torch.rand(tokens, generator=gen) * 8 * mask, (torch.rand(tokens) > 0.5) * mask, mask])
        rows = tuple(row.clone() for row in stacked)
        assert torch.equal(sequence_stats(stacked, bounds), sequence_stats(rows, bounds)), (tokens, sequences)


def test_count_rows_picks_the_float32_rows_of_the_torch_path():
    """On the torch path the trailing ``count_rows`` rows take a float32 prefix: 0/1 counts stay exact."""
    rng = random.Random(11)
    for case in range(200):
        rows, bounds, channels, k = loss_rows_case(rng, fixed_list=True)
        want, _ = reference_rows(rows, bounds, channels, k)
        values = torch.tensor(rows, dtype=torch.float32).view(3, -1)
        for count_rows in (0, 1, 2, 3):
            stats = sequence_stats_prefix(values, torch.tensor(bounds), count_rows)
            assert stats.dtype == torch.float64 and stats.shape == want.shape, (case, count_rows)
            # The losses as a count (float32 prefix) lose digits to the scan: why they are a sum row.
            tolerance = dict(rtol=1e-4, atol=1e-3) if count_rows == 3 else dict(rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(stats[0], want[0], **tolerance)
            assert torch.equal(stats[1:], want[1:]), (case, count_rows)


def test_a_small_case_by_hand(summing):
    """10 tokens: sequences [0, 3), [3, 3) (empty), [3, 7) (no loss token), then two empty slots;
    tokens 7..9 follow the last entry and belong to no sequence. Channel 3 never appears."""
    mask = torch.tensor([1, 1, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.float32)
    losses = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128, 256, 512], dtype=torch.float32) * mask
    correct = torch.tensor([1, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float32) * mask
    bounds = torch.tensor([0, 3, 3, 7, 7, 7], dtype=torch.int32)
    channels = torch.tensor([1, 0, 2, -1, -1])
    stats = sequence_stats((losses, correct, mask), bounds)
    assert stats.tolist() == [[3, 0, 0, 0, 0], [1, 0, 0, 0, 0], [2, 0, 0, 0, 0]]
    totals = channel_totals(stats, channels, 4, columns=(0, 2, 1, 2))
    assert totals.tolist() == [[0, 0, 0, 0], [3, 2, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]
    rows = row_channel_totals((losses, correct, mask), 2, torch.tensor([1, -1]), 4, columns=(0, 2, 1, 2))
    assert rows.tolist() == [[0, 0, 0, 0], [3, 2, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_row_channel_totals_of_several_rows_match_the_reference():
    rng = random.Random(9)
    for case in range(CASES // 4):
        rows, length, k = rng.randint(1, 9), rng.choice([1, 2, 5, rng.randint(6, 70)]), rng.randint(1, 6)
        tokens = rows * length
        channels = [rng.choice([-1, *range(k)]) for _ in range(rows)]
        mask = [float(rng.random() < rng.choice([0.0, 0.5, 1.0])) for _ in range(tokens)]
        losses = torch.tensor([rng.uniform(0, 10) for _ in range(tokens)], dtype=torch.float32).double().tolist()
        correct = [float(rng.random() < 0.5) for _ in range(tokens)]
        value_rows = [[a * m for a, m in zip(losses, mask)], [c * m for c, m in zip(correct, mask)], mask]
        _, want = reference_rows(value_rows, list(range(0, tokens + 1, length)), channels, k)
        values, form = as_values(rng, value_rows)
        ids = torch.tensor(channels, dtype=rng.choice([torch.int32, torch.int64]))
        where = f"{form} case {case}: rows={rows} length={length} k={k} channels={channels}"
        totals = row_channel_totals(values, rows, ids, k)
        assert totals.dtype == torch.float32 and totals.shape == (k, 3), where
        torch.testing.assert_close(totals.double(), want, rtol=1e-6, atol=1e-4, msg=where)
        assert torch.equal(totals[:, 1:].double(), want[:, 1:]), f"{where}: counts"
        pairs = row_channel_totals(values, rows, ids, k, columns=(0, 2, 1, 2))
        assert torch.equal(pairs, totals[:, [0, 2, 1, 2]]), where
        alone = row_channel_totals(values[0::2], rows, ids, k)
        assert torch.equal(alone, totals[:, 0::2]), f"{where}: (losses, mask) alone"


@pytest.mark.parametrize("fixed_list", [False, True], ids=["exact list", "fixed-length list"])
def test_sequence_channel_totals_is_channel_totals_of_sequence_stats(summing, fixed_list):
    """The one call the loss makes: bit for bit the two steps, with ``channels`` as long as the
    batch holds it (entries past the sequences ignored)."""
    rng = random.Random(21 + fixed_list)
    for case in range(CASES // 4):
        rows, bounds, channels, k = loss_rows_case(rng, fixed_list)
        values, form = as_values(rng, rows)
        bounds_t = torch.tensor(bounds, dtype=rng.choice([torch.int32, torch.int64]))
        ids = torch.tensor(channels + [rng.randint(-1, k - 1) for _ in range(rng.randint(0, 3))])
        columns = rng.choice([None, (0, 2, 1, 2)])
        where = f"{summing} {form} case {case}: bounds={bounds} channels={ids.tolist()} columns={columns}"
        fused = sequence_channel_totals(values, bounds_t, ids, k, columns)
        steps = channel_totals(sequence_stats(values, bounds_t), ids[: len(bounds) - 1], k, columns)
        assert fused.dtype == torch.float32 and torch.equal(fused, steps), where
        _, want = reference_rows(rows, bounds, channels, k)
        if columns is not None:
            want = want[:, list(columns)]
        torch.testing.assert_close(fused.double(), want, rtol=1e-6, atol=1e-4, msg=where)


def test_an_empty_sequence_takes_nothing_from_the_token_at_its_boundary():
    """numpy's reduceat gives a repeated index the token there, not 0: even an infinite loss at
    that token must not reach the empty sequence's channel (no 0 * inf either). (The torch path's
    prefix differences turn every sequence after an infinite loss into inf - inf: not checked.)"""
    losses = torch.tensor([1.0, 2.0, 4.0, float("inf"), 8.0])
    mask = torch.ones(5)
    bounds, channels = torch.tensor([0, 3, 3, 5, 5]), torch.tensor([2, 0, 1, 0])
    stats = sequence_stats((losses, mask), bounds)
    assert stats[:, 1].tolist() == [0.0, 0.0] and stats[:, 3].tolist() == [0.0, 0.0]
    for totals in (channel_totals(stats, channels, 3), sequence_channel_totals((losses, mask), bounds, channels, 3)):
        assert totals.tolist() == [[0.0, 0.0], [float("inf"), 2.0], [7.0, 3.0]]
