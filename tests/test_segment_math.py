"""Both summing paths of ``megatron_channel.segment_math`` against a float64 reference by hand.

CPU tensors are summed with numpy (``sequence_stats_reduceat``, numpy ``bincount``); GPU
tensors with torch (``sequence_stats_prefix``, ``index_add_``). Both run here on CPU tensors,
the torch path inside ``summing_like_a_gpu``, over randomized boundaries with the awkward
cases: zero-length sequences in the middle, trailing entries equal to the token count, a
sequence ending on the last token or one before it, tokens after the last entry, int32 and
int64 boundaries, untracked (-1) and absent channels, and no tokens at all.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_channel import segment_math
from megatron_channel.segment_math import (
    channel_totals,
    row_channel_totals,
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

        stats = sequence_stats(masked, mask_t, bounds_t)
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
        host, prefix = sequence_stats_reduceat(masked, mask, bounds), sequence_stats_prefix(masked, mask, bounds)
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
        totals = row_channel_totals(masked, mask_t, rows, ids, k)
        assert_channel_totals(totals, want, f"case {case}: rows={rows} length={length} k={k} channels={channels}")


def test_row_channel_totals_refuse_a_channel_list_of_another_length():
    """Two ids for four rows must fail, not sum the rows in pairs."""
    with pytest.raises(RuntimeError):
        row_channel_totals(torch.ones(8), torch.ones(8), 4, torch.tensor([0, 1]), 2)
