"""Packed rows reach attention as a short list of real sequences, at GPU-scale row lengths.

Megatron's SFT rows pad ``cu_seqlens`` to ``s + 1`` entries. Kept as zero-length sequences,
those entries handed attention ``micro_batch_size * s`` sequences per microbatch (8192 at
s = 4096, mbs = 2), which Transformer Engine's THD kernels and FlashAttention's varlen
backward cannot take at scale. ``forward_step`` now merges the rows into one list of
``micro_batch_size * max_sequences_per_row`` sequences, the real ones first:

* ``compact_sequences`` against a by-hand merge over random rows (zero-length sequences
  anywhere, padded spans, channels, exactly full);
* a batch in Megatron's SFTDataset form at s = 4096, mbs = 2, three conversations per row,
  through the real ``make_forward_step`` and a real GPTModel whose core attention takes THD
  input (``megatron_channel.cpu``): attention receives the bound, not 8192 sequences, and the
  per-channel numbers match a float64 cross entropy of every conversation run alone;
* the same at TP = 2 over two gloo ranks, and a microbatch over the bound: a clear error on
  TP rank 0 before its broadcast, and no hang on the other rank;
* every packed form ``forward_step`` accepts (Megatron-Bridge's ``cu_seqlens_q(_padded)``,
  its legacy ``-1`` padding, one row of 1-D tensors, SFTDataset's, our SFT packer's) hands
  attention the same compacted list;
* with CUDA graphs attention gets the row length as ``max_seqlen``; training microbatches feed
  Megatron's throughput count; without host validation an overfull microbatch still stops.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_channel import BatchLayout, ChannelBatchError, ChannelConfig, make_forward_step
from megatron_channel.segment_math import compact_sequences
from megatron_channel.step.layout import DEFAULT_MAX_SEQUENCES_PER_ROW, MAX_SEQUENCES_FLAG
from megatron_testing import init_parallel, run_distributed

VOCAB = 64
SEQ = 4096
ROWS = 2
CONFIG = ChannelConfig(["math", "code", "chat", "web"])  # "web" never appears: an empty channel
# Per row: (length, channel) of its three conversations; the last one runs to the row's end,
# as SFTDataset's does. Row 1's second conversation has no loss token at all.
CONVERSATIONS = [[(1500, 0), (1204, -1), (1392, 2)], [(700, 1), (2000, 0), (1396, 1)]]


# --------------------------------------------------------------------------- the pure function


def merged_by_hand(cu_rows: list[list[int]], row_length: int, capacity: int, padded_rows=None, channel_rows=None):
    """The merged list written out: every row's non-empty sequences in order, offset by the
    row, then the last end repeated up to ``capacity`` sequences (channels -1)."""
    layout_rows = padded_rows or cu_rows
    cu, padded, channels = [0], [0], []
    for r, layout in enumerate(layout_rows):
        for i in range(len(layout) - 1):
            if layout[i + 1] > layout[i]:
                cu.append(r * row_length + cu_rows[r][i + 1])
                padded.append(r * row_length + layout[i + 1])
                channels.append(channel_rows[r][i] if channel_rows else None)
    fill = capacity + 1 - len(cu)
    return cu + [cu[-1]] * fill, padded + [padded[-1]] * fill, channels + [-1] * fill


def random_row(rng: random.Random, length: int, entries: int, with_padding: bool):
    """One row's (cu_seqlens, cu_seqlens_padded): zero-length sequences anywhere, ending at ``length``."""
    cuts = sorted(rng.randint(0, length) for _ in range(entries - 2))
    padded = [0, *cuts, length]
    if not with_padding:
        return padded, None
    real = [0]
    for a, b in zip(padded, padded[1:]):
        real.append(real[-1] + (b - a) - (rng.randint(0, b - a) if b > a and rng.random() < 0.5 else 0))
    real[-1] = length  # merged rows end at the row's end
    return real, padded


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(40))
def test_compact_sequences_against_a_merge_by_hand(seed):
    rng = random.Random(seed)
    rows, length, entries = rng.randint(1, 4), rng.choice([8, 16, 40]), rng.randint(2, 9)
    with_padding = seed % 2 == 1
    cu_rows, padded_rows = zip(*(random_row(rng, length, entries, with_padding) for _ in range(rows)))
    padded_rows = list(padded_rows) if with_padding else None
    channel_rows = [[rng.randint(-1, 3) for _ in range(entries - 1 + rng.randint(0, 2))] for _ in range(rows)]
    real = sum(b > a for row in (padded_rows or cu_rows) for a, b in zip(row, row[1:]))
    capacity = real + rng.randint(0, 3)  # exactly full on some seeds
    want_cu, want_padded, want_channels = merged_by_hand(list(cu_rows), length, capacity, padded_rows, channel_rows)

    cu, padded, channels = compact_sequences(
        torch.tensor(cu_rows, dtype=torch.int32), length, capacity,
        cu_seqlens_padded=torch.tensor(padded_rows, dtype=torch.int32) if with_padding else None,
        channels=torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in channel_rows], batch_first=True,
                                                 padding_value=-1),
    )
    assert cu.dtype == torch.int32 and cu.tolist() == want_cu
    assert (padded is None) == (not with_padding)
    if with_padding:
        assert padded.tolist() == want_padded
    assert channels.tolist() == want_channels


# --------------------------------------------------------------------------- SFTDataset rows at s = 4096


def sft_batch(seed: int = 0) -> tuple[dict, list[tuple[int, int, int, int]]]:
    """Two rows in Megatron SFTDataset's form (``cu_seqlens`` ``[2, s + 1]`` padded with ``s``,
    ``max_seqlen`` collated per row) plus ``channels`` ``[2, s]``; and the conversations as
    ``(row, start, end, channel)``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    loss_mask = (torch.rand(ROWS, SEQ, generator=gen) > 0.3).float()
    cu = torch.full((ROWS, SEQ + 1), SEQ, dtype=torch.int32)
    channels = torch.full((ROWS, SEQ), -1, dtype=torch.int64)
    positions = torch.empty(ROWS, SEQ, dtype=torch.int64)
    spans = []
    for r, conversations in enumerate(CONVERSATIONS):
        start = 0
        for i, (length, channel) in enumerate(conversations):
            cu[r, i] = start
            channels[r, i] = channel
            positions[r, start:start + length] = torch.arange(length)
            spans.append((r, start, start + length, channel))
            start += length
        assert start == SEQ
    loss_mask[1, 700:2700] = 0  # row 1, conversation 2: no loss token
    longest = torch.tensor([max(n for n, _ in row) for row in CONVERSATIONS], dtype=torch.int32)
    batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions, cu_seqlens=cu,
                 max_seqlen=longest, channels=channels)
    return batch, spans


def thd_gpt(tp: int = 1):
    """A real GPTModel (one layer, two heads) whose core attention takes THD rows on the CPU."""
    from megatron.core.models.gpt import GPTModel

    from megatron_channel.cpu import gpt_layer_spec
    from megatron_testing import tiny_gpt_config

    config = tiny_gpt_config(tp=tp, hidden=16, layers=1, heads=2)
    gpt = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(config), vocab_size=VOCAB,
                   max_sequence_length=SEQ, position_embedding_type="learned_absolute", parallel_output=True).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights spread per-token losses, so a misplaced token shows
        for param in gpt.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return gpt


def record_packed_seq_params(model) -> list:
    """What the model is called with: every call's ``packed_seq_params``."""
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("packed_seq_params")),
                                    with_kwargs=True)
    return seen


def float64_reference(gpt, batch: dict, spans, tp_group=None) -> dict[str, list[float]]:
    """Per channel ``[loss sum, loss tokens]``: each conversation run alone (positions from 0,
    causal), float64 cross entropy over its logits (gathered over TP), grouped by hand."""
    out = {key: [0.0, 0.0] for key in CONFIG.metric_keys()}
    for row, start, end, channel in spans:
        with torch.no_grad():
            logits = gpt(batch["tokens"][row:row + 1, start:end], torch.arange(end - start)[None], None)
        if tp_group is not None:
            parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(tp_group))]
            torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group)
            logits = torch.cat(parts, -1)
        logits = logits.double()[0]
        target = batch["labels"][row, start:end].clamp(min=0)  # prompt tokens (-100) carry no loss
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None]).squeeze(-1)
        mask = batch["loss_mask"][row, start:end].double()
        if channel >= 0:
            key = CONFIG.metric_keys()[channel]
            out[key][0] += float((ce * mask).sum())
            out[key][1] += float(mask.sum())
    return out


def assert_matches(metrics: dict, want: dict, where: str) -> None:
    for key, (total, count) in want.items():
        got_sum, got_count = metrics[key].tolist()
        assert got_count == count, f"{where}: {key} counts {got_count} loss tokens, by hand {count}"
        assert abs(got_sum - total) <= 1e-5 * max(abs(total), 1.0), f"{where}: {key} sum {got_sum}, float64 {total}"
    assert metrics["loss_web"].tolist() == [0.0, 0.0]


def check_stream(params, bound: int, where: str) -> None:
    """Attention got the six real conversations, then zero-length sequences up to the bound."""
    want = [0]
    for r, row in enumerate(CONVERSATIONS):
        for length, _ in row:
            want.append(want[-1] + length)
    want += [ROWS * SEQ] * (ROWS * bound + 1 - len(want))
    assert params.qkv_format == "thd", where
    assert params.cu_seqlens_q.numel() == ROWS * bound + 1 < ROWS * SEQ, f"{where}: {params.cu_seqlens_q.numel()}"
    assert params.cu_seqlens_q.tolist() == want, where
    assert params.max_seqlen_q == max(n for row in CONVERSATIONS for n, _ in row), where
    assert params.tokens_per_sample == SEQ, where


@pytest.mark.timeout(180)
def test_sft_rows_at_4096_hand_attention_the_bound_not_8192_sequences(megatron_cpu):
    init_parallel(seed=1234)
    gpt = thd_gpt()
    seen = record_packed_seq_params(gpt)
    batch, spans = sft_batch()
    with torch.no_grad():
        output, loss_func = make_forward_step(CONFIG)(iter([batch]), gpt)
    loss, num_tokens, metrics = loss_func(output)
    check_stream(seen[0], DEFAULT_MAX_SEQUENCES_PER_ROW, "TP=1")
    assert num_tokens == int(batch["loss_mask"].sum())
    want = float64_reference(gpt, batch, spans)
    assert_matches(metrics, want, "TP=1")
    tracked = sum(total for total, _ in want.values())
    untracked = float64_reference(gpt, batch, [(r, a, b, 0) for r, a, b, c in spans if c < 0])["loss_math"][0]
    assert abs(float(loss) - tracked - untracked) <= 1e-5 * float(loss), "lm loss is not every conversation's sum"


def _tp_worker(rank, world_size, bound):
    from megatron.core import parallel_state

    init_parallel(tp=2, seed=1234)
    gpt = thd_gpt(tp=2)
    seen = record_packed_seq_params(gpt)
    batch, spans = sft_batch()
    layout = BatchLayout(ROWS, SEQ, packed=True, max_sequences_per_row=bound)
    # Only TP rank 0 reads the batch; the other rank's iterator would fail if read.
    data = iter([batch]) if rank == 0 else iter([])
    try:
        with torch.no_grad():
            output, loss_func = make_forward_step(CONFIG, layout)(data, gpt)
    except ChannelBatchError as error:
        return dict(error=("ChannelBatchError", str(error)))
    except RuntimeError as error:  # the peer left the broadcast: the job ends instead of hanging
        return dict(error=("RuntimeError", str(error).splitlines()[0]))
    _, _, metrics = loss_func(output)
    want = float64_reference(gpt, batch, spans, parallel_state.get_tensor_model_parallel_group())
    params = seen[0]
    return dict(metrics={k: v.tolist() for k, v in metrics.items()}, want=want,
                cu=params.cu_seqlens_q.tolist(), max_seqlen=params.max_seqlen_q,
                tokens_per_sample=params.tokens_per_sample)


@pytest.mark.timeout(300)
def test_sft_rows_at_4096_under_tensor_parallelism_over_two_gloo_ranks():
    ranks = run_distributed(_tp_worker, 2, 8, timeout=280)
    assert ranks[0]["cu"] == ranks[1]["cu"] and ranks[0]["metrics"] == ranks[1]["metrics"]
    for rank, result in enumerate(ranks):
        where = f"TP=2 rank {rank}"
        assert len(result["cu"]) == ROWS * 8 + 1, where
        assert result["max_seqlen"] == SEQ, where  # receivers cannot know the batch's own bound
        assert result["tokens_per_sample"] == SEQ, where
        assert_matches({k: torch.tensor(v) for k, v in result["metrics"].items()}, result["want"], where)


@pytest.mark.timeout(120)
def test_a_microbatch_over_the_bound_stops_tp_rank_0_before_its_broadcast():
    rank0, rank1 = run_distributed(_tp_worker, 2, 2, timeout=100)  # 6 conversations > 2 rows x 2
    kind, message = rank0["error"]
    assert kind == "ChannelBatchError"
    assert f"--{MAX_SEQUENCES_FLAG} 2" in message and "packs 6 sequences (per row: [3, 3])" in message
    assert "raise --" + MAX_SEQUENCES_FLAG in message
    assert rank1["error"][0] == "RuntimeError"  # its broadcast fails when rank 0 leaves: no hang


# --------------------------------------------------------------------------- every packed form


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(6))
def test_every_packed_form_hands_attention_the_compacted_list(megatron_cpu, seed):
    from test_batch_forms import S, packed_forms, run

    from megatron_testing import PackedAsBlockMask, tiny_gpt

    init_parallel(seed=1234)
    model = PackedAsBlockMask(tiny_gpt(vocab_size=VOCAB, seq_length=64).eval())
    seen = record_packed_seq_params(model)
    canonical, forms, _ = packed_forms(seed)
    bound = 3  # every form's row has three non-empty sequences
    padded = "cu_seqlens_padded" in canonical
    layout = BatchLayout(1, S, packed=True, max_sequences_per_row=bound, cu_seqlens_padded=padded)
    cu_rows = canonical["cu_seqlens"].tolist()
    padded_rows = canonical["cu_seqlens_padded"].tolist() if padded else None
    want_cu, want_padded, _ = merged_by_hand(cu_rows, S, bound, padded_rows)
    _, want = run(model, canonical, layout)
    for name, batch in {"canonical": canonical, **forms}.items():
        seen.clear()
        _, got = run(model, batch, layout)
        params = seen[0]
        assert params.cu_seqlens_q.tolist() == want_cu, f"seed {seed} {name}"
        if padded:
            assert params.cu_seqlens_q_padded.tolist() == want_padded, f"seed {seed} {name}"
        assert all(torch.equal(got[k], want[k]) for k in want), f"seed {seed} {name}"


# --------------------------------------------------------------------------- what else attention and Megatron get


@pytest.mark.timeout(180)
def test_cuda_graphs_get_the_row_length_as_max_seqlen(megatron_cpu):
    """Megatron's local CUDA graphs replay the captured ``max_seqlen``; a per-batch value would
    fail the replay check, so with ``cuda_graph_impl`` set every microbatch gets ``s``."""
    init_parallel(seed=1234)
    gpt = thd_gpt()
    seen = record_packed_seq_params(gpt)
    batch, _ = sft_batch()
    forward_step = make_forward_step(CONFIG)
    with torch.no_grad():
        forward_step(iter([batch]), gpt)
        gpt.config.cuda_graph_impl = "local"  # what --cuda-graph-impl local sets on the model's config
        forward_step(iter([batch]), gpt)
    assert [params.max_seqlen_q for params in seen] == [2000, SEQ]


@pytest.mark.timeout(180)
def test_training_microbatches_feed_megatrons_throughput_count(megatron_cpu):
    """As stock pretrain_gpt, the real sequence lengths go to Megatron's TFLOP/s count (sum of
    lengths and of squared lengths); evaluation's do not, and the empty slots add nothing."""
    from megatron.training import training

    init_parallel(seed=1234)
    gpt = thd_gpt()
    batch, _ = sft_batch()
    lengths = [n for row in CONVERSATIONS for n, _ in row]
    training.consume_seqlen_stats_in_iteration()  # start from nothing
    with torch.no_grad():
        make_forward_step(CONFIG)(iter([batch]), gpt)  # eval mode
        assert training.consume_seqlen_stats_in_iteration() == (None, None)
        gpt.train()
        make_forward_step(CONFIG)(iter([batch, batch]), gpt)
        make_forward_step(CONFIG)(iter([batch]), gpt)
    assert training.consume_seqlen_stats_in_iteration() == (2 * sum(lengths), 2 * sum(n * n for n in lengths))


@pytest.mark.timeout(60)
def test_without_validation_an_overfull_microbatch_still_stops():
    """``validate=False`` (values not read on the host, as for a batch already on a GPU): the
    merge asserts on the device that no sequence was dropped, with the flag in its message."""
    from megatron_channel.step.layout import Topology
    from megatron_channel.step.model_inputs import get_model_inputs

    batch, _ = sft_batch()
    layout = BatchLayout(ROWS, SEQ, packed=True, max_sequences_per_row=2)
    with pytest.raises(RuntimeError, match="raise the flag"):
        get_model_inputs(iter([batch]), CONFIG.num_channels, layout, Topology(), torch.device("cpu"), validate=False)
    layout = BatchLayout(ROWS, SEQ, packed=True, max_sequences_per_row=3)  # exactly full
    inputs = get_model_inputs(iter([batch]), CONFIG.num_channels, layout, Topology(), torch.device("cpu"),
                              validate=False)
    assert inputs.packed_seq_params.cu_seqlens_q.numel() == 7


@pytest.mark.timeout(120)
def test_rows_of_our_sft_packer_hand_attention_the_compacted_list(megatron_cpu):
    """Rows as ``data/sft.pack_conversations`` builds them (the ``--sft`` jsonl datasets'): the
    list attention gets holds each conversation once, and the numbers match float64."""
    from megatron_channel.data.sft import IGNORE_INDEX, pack_conversations

    init_parallel(seed=1234)
    gpt = thd_gpt()
    seen = record_packed_seq_params(gpt)
    rng = random.Random(5)
    pad, length = 0, 96
    rows, spans = [], []
    for r, lengths in enumerate([[30, 20, 40], [50, 60]]):  # row 1's second conversation is cut at the row end
        encoded = []
        for n in lengths:
            tokens = [rng.randrange(1, VOCAB) for _ in range(n)]
            targets = [IGNORE_INDEX if i < n // 3 else rng.randrange(1, VOCAB) for i in range(n)]
            encoded.append((tokens, targets))
        row = pack_conversations(encoded, [r, 2 - r, 1][: len(lengths)], length, pad)
        rows.append(row)
        cu = row["cu_seqlens"].tolist()
        spans += [(r, a, b, int(row["channels"][i])) for i, (a, b) in enumerate(zip(cu, cu[1:])) if b > a]
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        output, loss_func = make_forward_step(CONFIG)(iter([batch]), gpt)
    _, _, metrics = loss_func(output)
    want_cu = [0] + [r * length + b for r, _, b, _ in spans]
    want_cu += [want_cu[-1]] * (ROWS * DEFAULT_MAX_SEQUENCES_PER_ROW + 1 - len(want_cu))
    assert seen[0].cu_seqlens_q.tolist() == want_cu
    assert_matches(metrics, float64_reference(gpt, batch, spans), "our SFT packer")


@pytest.mark.timeout(60)
def test_sequence_index_for_mamba_layers_is_megatrons_without_a_host_read():
    """``seq_idx`` (Mamba layers keep packed sequences apart with it) equals what Megatron's own
    ``PackedSeqParams(total_tokens=...)`` computes, over random boundaries with zero-length
    sequences and tokens after the last boundary; ours has a fixed shape (no host sync)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_channel.step.model_inputs import sequence_index_of_tokens

    for trial in range(200):
        rng = random.Random(trial)
        total = rng.randint(1, 60)
        cu = [0, *sorted(rng.choices(range(total + 1), k=rng.randint(0, 8)))]
        if rng.random() < 0.5:
            cu.append(total)
        cu = torch.tensor(cu, dtype=torch.int32)
        want = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, total_tokens=total).seq_idx
        assert torch.equal(sequence_index_of_tokens(cu, total), want), cu
