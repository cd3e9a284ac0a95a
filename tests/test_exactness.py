"""Exactness of the per-channel metrics against an independent float64 reference.

Every per-token loss comes from the real Megatron-Core ``GPTModel`` (``tiny_gpt``, on the
CPU over a single-process gloo group). The reference recomputes the losses in float64 with
``torch.nn.functional.cross_entropy`` over the same model's logits and groups them per
channel with plain Python loops over rows / sequences / tokens; nothing from
``megatron_channel.segment_math`` is used for the reference.

Checked, over a few hundred seeded random cases:

1. unpacked rows through ``make_forward_step`` (ids -1, empty channels, rows without loss tokens);
2. packed (THD) rows through ``channel_loss_func``: random ``cu_seqlens`` with trailing
   entries equal to the total, zero-length sequences in the middle, tokens after the last
   entry, sequences without loss tokens, ``channels`` longer than the number of sequences,
   ``cu_seqlens_q`` only or ``cu_seqlens_q_padded`` set (and different from ``cu_seqlens_q``);
3. context parallelism 1, 2, 4: the global row is cut per rank with our own implementation of
   Transformer Engine's THD rule (also compared with ``thd_partition_index``); each rank's
   metrics match a per-rank reference and their sum matches the global reference;
4. a packed row through ``make_forward_step`` and the real model (block-causal mask) gives the
   same per-channel numbers as running each sequence alone;
5. packed rows with token accuracy (losses, correct-token flags and mask summed in one pass),
   also in the fixed-length sequence list training hands the loss: the loss metrics bitwise as
   without accuracy, the accuracy pairs exact counts by hand.

Packed cases alternate between the two summing paths of ``megatron_channel.segment_math``
(numpy for CPU tensors, the torch ops GPU tensors take), so both are checked on the model.

Always: ``loss`` / ``num_tokens`` / ``"lm loss"`` are bitwise Megatron's stock values, the
metric keys are ``["lm loss"] + config.metric_keys()`` in order, absent channels are exactly
``[0, 0]``, counts are exact, sums agree with the float64 reference to rtol=1e-5, atol=1e-4,
and channels + untracked add up to ``lm loss``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel import ChannelConfig, channel_loss_func, make_forward_step
from megatron_channel.segment_math import summing_like_a_gpu, thd_partition_index
from megatron_channel.step.layout import DEFAULT_MAX_SEQUENCES_PER_ROW
from megatron_testing import (
    PackedAsBlockMask,
    block_causal_mask,
    init_parallel,
    init_single_process_group,
    tiny_gpt,
)

VOCAB = 64
MAX_SEQ = 96  # learned absolute positions: every row (packed or not) must fit
RTOL, ATOL = 1e-5, 1e-4

UNPACKED_CASES = 100
PACKED_CASES = 100
CP_CASES_PER_SIZE = 40
MODEL_PACKED_CASES = 20


# --------------------------------------------------------------------------- model fixture


@pytest.fixture(scope="module")
def gpt():
    """The real tiny GPTModel over a single-process gloo group, weights re-drawn larger.

    Megatron's default init (std 0.02) makes every token's loss ~log(VOCAB); larger weights
    spread the per-token losses (~2.5..7) so a token counted in the wrong channel shows.
    """
    created = False
    if not dist.is_initialized():
        init_single_process_group()
        created = True
    assert dist.get_world_size() == 1, "these tests run in one process"
    init_parallel(seed=1234)
    model = tiny_gpt(vocab_size=VOCAB, seq_length=MAX_SEQ)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    yield model
    if created:  # else leave the TP=PP=CP=1 state for whoever set up the group
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture
def gpu_summing_on_odd_seeds(seed):
    """Odd seeds sum CPU tensors with the torch ops GPU tensors take instead of numpy."""
    if seed % 2:
        with summing_like_a_gpu():
            yield
    else:
        yield


# --------------------------------------------------------------------------- reference helpers


def causal_mask(b: int, s: int) -> torch.Tensor:
    return torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None].expand(b, 1, s, s)


def positions_restarting(cu: list[int], total: int) -> torch.Tensor:
    """``[1, total]`` position ids from 0 in every sequence (tokens after the last entry: one more)."""
    pos = list(range(total))
    starts = [c for c in cu if c < total]
    for t in range(total):
        pos[t] = t - max(c for c in starts if c <= t)
    return torch.tensor(pos)[None]


def float64_ce(model, tokens, position_ids, attention_mask, labels) -> torch.Tensor:
    """Reference per-token loss: float64 cross entropy over the real model's logits."""
    with torch.no_grad():
        logits = model(tokens, position_ids, attention_mask)
    b, s = tokens.shape
    assert logits.shape == (b, s, VOCAB)
    return F.cross_entropy(logits.double().reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(b, s)


def model_losses(model, tokens, position_ids, attention_mask, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, position_ids, attention_mask, labels=labels)


class Reference:
    """Per-channel and untracked ``[sum, count]`` accumulated in float64 / int, by hand."""

    def __init__(self, num_channels: int):
        self.sums = [0.0] * num_channels
        self.counts = [0] * num_channels
        self.untracked_sum = 0.0
        self.untracked_count = 0

    def add(self, channel: int, loss: float, mask: float) -> None:
        if mask == 0:
            return
        assert mask == 1, "tests use 0/1 loss masks"
        if channel == -1:
            self.untracked_sum += loss
            self.untracked_count += 1
        else:
            self.sums[channel] += loss
            self.counts[channel] += 1

    def merge(self, other: "Reference") -> None:
        for k in range(len(self.sums)):
            self.sums[k] += other.sums[k]
            self.counts[k] += other.counts[k]
        self.untracked_sum += other.untracked_sum
        self.untracked_count += other.untracked_count


def reference_rows(ce: torch.Tensor, loss_mask: torch.Tensor, channels: list[int], num_channels: int) -> Reference:
    """Unpacked: row ``r`` belongs to ``channels[r]``."""
    ref = Reference(num_channels)
    for r, channel in enumerate(channels):
        for t in range(ce.shape[1]):
            ref.add(channel, float(ce[r, t]), float(loss_mask[r, t]))
    return ref


def sequence_of(position: int, cu: list[int]) -> int | None:
    """Index of the sequence of ``cu`` holding global ``position``; None after the last entry."""
    for i in range(len(cu) - 1):
        if cu[i] <= position < cu[i + 1]:
            return i
    return None


def reference_packed(ce_row, mask_row, cu: list[int], channels: list[int], num_channels: int,
                     positions: list[int] | None = None) -> Reference:
    """Packed: token at global position ``p`` belongs to the channel of its sequence in ``cu``.

    ``ce_row`` / ``mask_row`` are this rank's tokens; ``positions[j]`` is the global position
    of local token ``j`` (identity without context parallelism).
    """
    ref = Reference(num_channels)
    for j in range(len(ce_row)):
        seq = sequence_of(j if positions is None else positions[j], cu)
        ref.add(-1 if seq is None else channels[seq], float(ce_row[j]), float(mask_row[j]))
    return ref


def te_partition(cu: list[int], cp: int, rank: int) -> list[int]:
    """Global positions CP ``rank`` holds, in local order (Transformer Engine's THD rule)."""
    index = []
    for i in range(len(cu) - 1):
        h = (cu[i + 1] - cu[i]) // (2 * cp)
        index += range(cu[i] + rank * h, cu[i] + rank * h + h)
        index += range(cu[i] + (2 * cp - 1 - rank) * h, cu[i] + (2 * cp - 1 - rank) * h + h)
    return index


# --------------------------------------------------------------------------- checks


def check_stock(loss, num_tokens, metrics, output_tensor, loss_mask, where: str) -> None:
    """``loss``, ``num_tokens`` and ``"lm loss"`` are bitwise Megatron's stock loss_func."""
    stock_loss = torch.sum(output_tensor.view(-1).float() * loss_mask.view(-1).float())
    stock_num = loss_mask.view(-1).float().sum().to(torch.int)
    assert loss.dtype == torch.float32 and torch.equal(loss, stock_loss), (
        f"{where}: loss {loss!r} != stock {stock_loss!r}")
    assert num_tokens.dtype == torch.int32 and torch.equal(num_tokens, stock_num), (
        f"{where}: num_tokens {num_tokens!r} != stock {stock_num!r}")
    stock_lm = torch.cat([stock_loss.view(1), stock_num.view(1)])
    assert torch.equal(metrics["lm loss"], stock_lm), f"{where}: lm loss {metrics['lm loss']} != {stock_lm}"


def check_channels(metrics, ref: Reference, config: ChannelConfig, where: str) -> None:
    """Keys in order, exact counts, exact zeros when absent, sums within tolerance, conservation."""
    assert list(metrics) == ["lm loss"] + config.metric_keys(), f"{where}: keys {list(metrics)}"
    channel_sum, channel_count = 0.0, 0
    for k, key in enumerate(config.metric_keys()):
        value = metrics[key]
        assert value.dtype == torch.float32 and tuple(value.shape) == (2,), f"{where}: {key} is {value!r}"
        got_sum, got_count = float(value[0]), float(value[1])
        channel_sum += got_sum
        channel_count += got_count
        if ref.counts[k] == 0:
            assert torch.equal(value, torch.zeros(2)), f"{where}: absent channel {key} = {value.tolist()}, not [0, 0]"
            continue
        assert got_count == ref.counts[k], f"{where}: {key} count {got_count} != reference {ref.counts[k]}"
        assert abs(got_sum - ref.sums[k]) <= ATOL + RTOL * abs(ref.sums[k]), (
            f"{where}: {key} sum {got_sum} != reference {ref.sums[k]}")
    lm_sum, lm_count = float(metrics["lm loss"][0]), float(metrics["lm loss"][1])
    assert channel_count + ref.untracked_count == lm_count, (
        f"{where}: channel counts {channel_count} + untracked {ref.untracked_count} != lm loss count {lm_count}")
    total = channel_sum + ref.untracked_sum
    assert abs(total - lm_sum) <= ATOL + RTOL * abs(lm_sum), (
        f"{where}: channel sums {channel_sum} + untracked {ref.untracked_sum} != lm loss sum {lm_sum}")


def check_against_float64(output_tensor, ce, where: str) -> None:
    """The model's own float32 losses agree with the float64 reference token by token."""
    diff = (output_tensor.double().view(-1) - ce.view(-1)).abs().max().item() if ce.numel() else 0.0
    assert diff < 1e-4, f"{where}: model loss differs from float64 cross entropy by {diff}"


# --------------------------------------------------------------------------- random cases


def random_config(rng: random.Random) -> ChannelConfig:
    k = rng.randint(1, 5)
    return ChannelConfig(tuple(f"src{i}" for i in rng.sample(range(10), k)), prefix=rng.choice(["loss_", "l", "val-"]))


def random_mask(rng: random.Random, gen: torch.Generator, n: int) -> list[float]:
    """0/1 loss mask for ``n`` tokens: none, all, or random."""
    mode = rng.choice(["none", "all", "random", "random"])
    if mode == "none":
        return [0.0] * n
    if mode == "all":
        return [1.0] * n
    return (torch.rand(n, generator=gen) < rng.uniform(0.2, 0.9)).float().tolist()


def random_cu(rng: random.Random, total: int, allow_short_end: bool) -> list[int]:
    """Cumulative boundaries in [0, total]: zero-length sequences, trailing entries at the end."""
    end = total if not allow_short_end or rng.random() < 0.7 else rng.randint(0, total)
    n = rng.randint(1, 6)
    cu = [0] + sorted(rng.randint(0, end) for _ in range(n - 1)) + [end]
    if len(cu) > 2 and rng.random() < 0.4:  # force a zero-length sequence in the middle
        i = rng.randint(1, len(cu) - 2)
        cu.insert(i, cu[i])
    return cu + [end] * rng.randint(0, 3)


def unpad(rng: random.Random, cu_padded: list[int]) -> list[int]:
    """``cu_seqlens_q`` whose sequence lengths are at most the padded ones."""
    cu = [0]
    for i in range(len(cu_padded) - 1):
        cu.append(cu[-1] + rng.randint(0, cu_padded[i + 1] - cu_padded[i]))
    return cu


def as_cu_tensor(rng: random.Random, cu: list[int]) -> torch.Tensor:
    t = torch.tensor(cu, dtype=torch.int32)
    return t[None] if rng.random() < 0.3 else t


# --------------------------------------------------------------------------- 1a: unpacked rows


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(UNPACKED_CASES))
def test_unpacked_rows_through_forward_step(gpt, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    config = random_config(rng)
    k = config.num_channels
    b, s = rng.randint(1, 6), rng.choice([1, 5, 8, 16, 33, 64, MAX_SEQ])
    tokens = torch.randint(0, VOCAB, (b, s), generator=gen)
    labels = torch.randint(0, VOCAB, (b, s), generator=gen)
    loss_mask = torch.tensor([random_mask(rng, gen, s) for _ in range(b)])
    channels = [rng.randint(-1, k - 1) for _ in range(b)]
    position_ids = torch.arange(s).expand(b, s).contiguous()
    attention_mask = causal_mask(b, s).contiguous()
    batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                 attention_mask=attention_mask,
                 channels=torch.tensor(channels, dtype=rng.choice([torch.int64, torch.int32])))

    forward_step = make_forward_step(config)
    with torch.no_grad():
        output, loss_func = forward_step(iter([batch]), gpt)
    loss, num_tokens, metrics = loss_func(output)

    where = f"seed {seed} (b={b}, s={s}, channels={channels}, K={k})"
    ce = float64_ce(gpt, tokens, position_ids, attention_mask, labels)
    assert output.shape == (b, s), f"{where}: output shape {tuple(output.shape)}"
    check_against_float64(output, ce, where)
    check_stock(loss, num_tokens, metrics, output, loss_mask, where)
    check_channels(metrics, reference_rows(ce, loss_mask, channels, k), config, where)


# --------------------------------------------------------------------------- 1b: packed rows


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(PACKED_CASES))
def test_packed_rows_channel_loss_func(gpt, seed, gpu_summing_on_odd_seeds):
    rng, gen = random.Random(1000 + seed), torch.Generator().manual_seed(1000 + seed)
    config = random_config(rng)
    k = config.num_channels
    total = rng.randint(1, MAX_SEQ)
    cu = random_cu(rng, total, allow_short_end=True)
    n = len(cu) - 1
    use_padded = rng.random() < 0.4
    cu_q = unpad(rng, cu) if use_padded else cu
    channels = [rng.randint(-1, k - 1) for _ in range(n + rng.randint(0, 3))]

    # Loss mask per sequence (and for the untracked tail); padding tokens often masked.
    mask = []
    for i in range(n):
        mask += random_mask(rng, gen, cu[i + 1] - cu[i])
        if use_padded and rng.random() < 0.5:
            real = cu_q[i + 1] - cu_q[i]
            mask[cu[i] + real: cu[i + 1]] = [0.0] * (cu[i + 1] - cu[i] - real)
    mask += random_mask(rng, gen, total - cu[-1])
    loss_mask = torch.tensor(mask)[None]

    tokens = torch.randint(0, VOCAB, (1, total), generator=gen)
    labels = torch.randint(0, VOCAB, (1, total), generator=gen)
    position_ids = positions_restarting(cu, total)
    attention_mask = block_causal_mask(torch.tensor(cu), total)
    output = model_losses(gpt, tokens, position_ids, attention_mask, labels)
    ce = float64_ce(gpt, tokens, position_ids, attention_mask, labels)

    cu_t, cu_q_t = as_cu_tensor(rng, cu), as_cu_tensor(rng, cu_q)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_q_t if use_padded else cu_t,
        cu_seqlens_kv=cu_q_t if use_padded else cu_t,
        cu_seqlens_q_padded=cu_t if use_padded else None,
        cu_seqlens_kv_padded=cu_t if use_padded else None,
        max_seqlen_q=total,
        max_seqlen_kv=total,
    )
    channels_t = torch.tensor(channels)
    if rng.random() < 0.3:
        channels_t = channels_t[None]
    loss, num_tokens, metrics = channel_loss_func(
        output, loss_mask=loss_mask, channels=channels_t, config=config, packed_seq_params=params,
        cp_size=rng.choice([1, None]), validate=rng.choice([None, True, False]),
    )

    where = f"seed {seed} (total={total}, cu={cu}, cu_q={cu_q if use_padded else None}, channels={channels})"
    check_against_float64(output, ce, where)
    check_stock(loss, num_tokens, metrics, output, loss_mask, where)
    check_channels(metrics, reference_packed(ce[0], mask, cu, channels, k), config, where)


# --------------------------------------------------------------------------- 1b': packed rows, token accuracy

ACCURACY_CASES = 40


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(ACCURACY_CASES))
def test_packed_rows_with_token_accuracy(gpt, seed, gpu_summing_on_odd_seeds):
    """The losses, the correct-token flags and the mask summed in one pass: every loss metric
    bitwise what the loss reports without accuracy, every accuracy pair the exact count by hand,
    keys in order, float32 [2]. Half the cases hand the fixed-length list training hands the
    loss: the sequences, then zero-length slots of channel -1."""
    rng, gen = random.Random(5000 + seed), torch.Generator().manual_seed(5000 + seed)
    plain = random_config(rng)
    config = ChannelConfig(plain.channels, prefix=plain.prefix, token_accuracy=True)
    k = config.num_channels
    total = rng.randint(1, MAX_SEQ)
    cu = random_cu(rng, total, allow_short_end=True)
    n = len(cu) - 1
    channels = [rng.randint(-1, k - 1) for _ in range(n)]
    if seed % 4 >= 2:  # the fixed-length list
        empty = rng.randint(1, 24)
        cu, channels = cu + [cu[-1]] * empty, channels + [-1] * empty
    mask = []
    for i in range(n):
        mask += random_mask(rng, gen, cu[i + 1] - cu[i])
    mask += random_mask(rng, gen, total - cu[n])
    loss_mask = torch.tensor(mask)[None]
    tokens = torch.randint(0, VOCAB, (1, total), generator=gen)
    labels = torch.randint(0, VOCAB, (1, total), generator=gen)
    output = model_losses(gpt, tokens, positions_restarting(cu, total), block_causal_mask(torch.tensor(cu), total),
                          labels)
    flags = (torch.rand(1, total, generator=gen) < rng.uniform(0, 1)).float()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=as_cu_tensor(rng, cu), cu_seqlens_kv=None)

    where = f"seed {seed} (total={total}, cu={cu}, channels={channels})"
    _, _, without = channel_loss_func(output, loss_mask=loss_mask, channels=torch.tensor(channels), config=plain,
                                      packed_seq_params=params, cp_size=1)
    loss, num_tokens, metrics = channel_loss_func(output, loss_mask=loss_mask, channels=torch.tensor(channels),
                                                  config=config, packed_seq_params=params, cp_size=1,
                                                  correct_tokens=flags)
    check_stock(loss, num_tokens, metrics, output, loss_mask, where)
    assert list(metrics) == ["lm loss", "token acc", *[key for pair in zip(config.metric_keys(), config.accuracy_keys())
                                                      for key in pair]], where
    for key, value in without.items():
        assert torch.equal(metrics[key], value), f"{where}: {key} {metrics[key]} != {value} without accuracy"
    correct = [0] * k
    counted = [0] * k
    for j in range(total):
        seq = sequence_of(j, cu)
        if seq is not None and channels[seq] >= 0 and mask[j]:
            counted[channels[seq]] += 1
            correct[channels[seq]] += int(flags[0, j])
    for c, key in enumerate(config.accuracy_keys()):
        value = metrics[key]
        assert value.dtype == torch.float32 and value.shape == (2,), f"{where}: {key} is {value!r}"
        assert value.tolist() == [correct[c], counted[c]], f"{where}: {key} {value.tolist()}"
    everything = [sum(int(f) for f, m in zip(flags[0].tolist(), mask) if m), sum(mask)]
    assert metrics["token acc"].tolist() == everything, where


# --------------------------------------------------------------------------- 1c: context parallelism


def random_cp_cu(rng: random.Random, cp: int) -> list[int]:
    """Sequence lengths multiples of 2 * cp (zero-length ones too), total <= MAX_SEQ, > 0."""
    unit = 2 * cp
    budget = MAX_SEQ // unit
    units = []
    for _ in range(rng.randint(1, 5)):
        units.append(min(rng.randint(0, 4), budget - sum(units)))
    if sum(units) == 0:
        units[rng.randrange(len(units))] = 1
    cu = [0]
    for u in units:
        cu.append(cu[-1] + u * unit)
    return cu + [cu[-1]] * rng.randint(0, 3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("seed", range(CP_CASES_PER_SIZE))
def test_context_parallel_ranks_sum_to_global(gpt, cp, seed, gpu_summing_on_odd_seeds):
    rng, gen = random.Random(2000 + 100 * cp + seed), torch.Generator().manual_seed(2000 + 100 * cp + seed)
    config = random_config(rng)
    k = config.num_channels
    cu = random_cp_cu(rng, cp)
    total, n = cu[-1], len(cu) - 1
    use_padded = rng.random() < 0.4
    cu_q = unpad(rng, cu) if use_padded else cu
    channels = [rng.randint(-1, k - 1) for _ in range(n + rng.randint(0, 3))]
    mask = []
    for i in range(n):
        mask += random_mask(rng, gen, cu[i + 1] - cu[i])
        if use_padded:  # padding tokens carry no loss
            real = cu_q[i + 1] - cu_q[i]
            mask[cu[i] + real: cu[i + 1]] = [0.0] * (cu[i + 1] - cu[i] - real)
    global_mask = torch.tensor(mask)[None]

    tokens = torch.randint(0, VOCAB, (1, total), generator=gen)
    labels = torch.randint(0, VOCAB, (1, total), generator=gen)
    position_ids = positions_restarting(cu, total)
    attention_mask = block_causal_mask(torch.tensor(cu), total)
    global_losses = model_losses(gpt, tokens, position_ids, attention_mask, labels)
    ce = float64_ce(gpt, tokens, position_ids, attention_mask, labels)
    check_against_float64(global_losses, ce, f"cp={cp} seed {seed}")

    cu_t = torch.tensor(cu, dtype=torch.int32)
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_q_t if use_padded else cu_t,
        cu_seqlens_kv=cu_q_t if use_padded else cu_t,
        cu_seqlens_q_padded=cu_t if use_padded else None,
        cu_seqlens_kv_padded=cu_t if use_padded else None,
        max_seqlen_q=total,
        max_seqlen_kv=total,
    )

    summed = {key: torch.zeros(2, dtype=torch.float64) for key in ["lm loss"] + config.metric_keys()}
    held = []
    for rank in range(cp):
        where = f"cp={cp} rank {rank} seed {seed} (cu={cu}, cu_q={cu_q if use_padded else None}, channels={channels})"
        index = te_partition(cu, cp, rank)
        assert len(index) == total // cp, f"{where}: own partition has {len(index)} tokens"
        lib_index = thd_partition_index(cu_t, total, cp, rank)
        assert lib_index.tolist() == index, f"{where}: thd_partition_index {lib_index.tolist()} != {index}"
        held += index

        local_losses = global_losses[:, index]
        local_mask = global_mask[:, index]
        loss, num_tokens, metrics = channel_loss_func(
            local_losses, loss_mask=local_mask, channels=torch.tensor(channels), config=config,
            packed_seq_params=params, cp_size=cp,
        )
        check_stock(loss, num_tokens, metrics, local_losses, local_mask, where)
        local_ref = reference_packed(ce[0, index], local_mask[0].tolist(), cu, channels, k, positions=index)
        check_channels(metrics, local_ref, config, where)
        for key, value in metrics.items():
            summed[key] += value.double()

    assert sorted(held) == list(range(total)), f"cp={cp} seed {seed}: ranks do not hold every token exactly once"
    where = f"cp={cp} seed {seed}, summed over ranks (cu={cu}, channels={channels})"
    global_ref = reference_packed(ce[0], mask, cu, channels, k)
    for key in ["lm loss"] + config.metric_keys():
        summed[key] = summed[key].float()  # check_channels expects float32 [sum, count]
    check_channels(summed, global_ref, config, where)
    stock_sum = torch.sum(global_losses.view(-1).double() * global_mask.view(-1).double()).item()
    assert abs(summed["lm loss"][0].item() - stock_sum) <= ATOL + RTOL * abs(stock_sum), f"{where}: lm loss sum"
    assert summed["lm loss"][1].item() == sum(mask), f"{where}: lm loss count"


# --------------------------------------------------------------------------- 2: packed row vs each sequence alone


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(MODEL_PACKED_CASES))
def test_packed_row_matches_sequences_alone(gpt, seed, gpu_summing_on_odd_seeds):
    rng, gen = random.Random(3000 + seed), torch.Generator().manual_seed(3000 + seed)
    config = random_config(rng)
    k = config.num_channels
    s = rng.choice([16, 32, 48, 64, MAX_SEQ])
    cu = random_cu(rng, s, allow_short_end=False)  # ends exactly at s, as Megatron's SFT rows do
    n = len(cu) - 1
    channels = [rng.randint(-1, k - 1) for _ in range(n + rng.randint(0, 2))]
    mask = []
    for i in range(n):
        mask += random_mask(rng, gen, cu[i + 1] - cu[i])
    tokens = torch.randint(0, VOCAB, (1, s), generator=gen)
    labels = torch.randint(0, VOCAB, (1, s), generator=gen)
    batch = dict(
        tokens=tokens,
        labels=labels,
        loss_mask=torch.tensor(mask)[None],
        position_ids=positions_restarting(cu, s),
        attention_mask=block_causal_mask(torch.tensor(cu), s),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32)[None],
        channels=torch.tensor(channels)[None],
    )

    model = PackedAsBlockMask(gpt)
    with torch.no_grad():
        output, loss_func = make_forward_step(config)(iter([batch]), model)
    loss, num_tokens, metrics = loss_func(output)

    where = f"seed {seed} (s={s}, cu={cu}, channels={channels})"
    params = model.seen_packed_seq_params[0]
    assert params is not None and params.qkv_format == "thd", f"{where}: model got {params}"
    # Attention gets the non-empty sequences, then zero-length ones up to the default bound.
    kept = [0] + [b for a, b in zip(cu, cu[1:]) if b > a]
    want_cu = kept + [kept[-1]] * (DEFAULT_MAX_SEQUENCES_PER_ROW + 1 - len(kept))
    assert params.cu_seqlens_q.tolist() == want_cu, f"{where}: model got cu_seqlens_q {params.cu_seqlens_q.tolist()}"
    check_stock(loss, num_tokens, metrics, output, batch["loss_mask"], where)

    # Reference: every sequence alone, positions from 0, plain causal mask.
    ref = Reference(k)
    for i in range(n):
        a, b = cu[i], cu[i + 1]
        if a == b:
            continue
        ce = float64_ce(gpt, tokens[:, a:b], torch.arange(b - a)[None], causal_mask(1, b - a), labels[:, a:b])
        check_against_float64(output[0, a:b], ce, f"{where}: sequence {i} packed vs alone")
        for t in range(b - a):
            ref.add(channels[i], float(ce[0, t]), mask[a + t])
    check_channels(metrics, ref, config, where)
