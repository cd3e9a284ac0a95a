"""Packed SFT rows with channels: equal to Megatron's ``SFTDataset``, channels aligned.

1. Equivalence: over a few thousand rows from seeded random jsonl (several conversations
   per line, system-only and empty-content conversations, lines that start without a
   system message, tool turns, conversations that tokenize to nothing, truncation), for
   pack lengths 8..96 and CP 1/2/4, every field of our row (tokens, labels, loss_mask,
   position_ids, cu_seqlens, max_seqlen: values, dtypes, shapes) equals Megatron's real
   ``SFTDataset.__getitem__`` over the same lines; where Megatron's crashes, ours raises a
   ValueError naming the line.
2. Alignment: ``channels[i]`` is the channel of conversation ``i`` (from the generator's
   own record, not our parser), sequence ``i``'s tokens are conversation ``i``'s, and
   slots after the last kept conversation are -1.
3. Policies: unknown names and unnamed lines go through ``channel_id`` (error / other /
   ignore lambdas), errors at build time naming file, line and field; a conversation's
   field beats its line's, a line's beats its blend component's.
4. A blend of two jsonl files through the real ``BlendedMegatronDatasetBuilder`` (train and
   validation splits), tagged by component; DataLoader shapes; pickling.
5. Rows through ``make_forward_step`` + ``channel_loss_func`` on the real tiny GPTModel
   (block-causal mask): per-channel token counts equal a hand count from the raw
   tokenization, and per-channel loss sums equal a hand sum of the model's losses.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.utils import Split
from megatron.training.datasets.sft_dataset import SFTDataset

from megatron_channel import ChannelConfig, make_forward_step
from megatron_channel.data.tagged import INHERIT_CHANNEL, ChannelTaggedDataset, blend_component_paths, tag_datasets
from megatron_channel.data.sft import SFTJsonlDataset, sft_dataset_class
from megatron_testing import block_causal_mask, tiny_gpt
from megatron_channel.data.sft import IGNORE_INDEX
from megatron_testing.byte_tokenizer import VOCAB_SIZE, ByteChatTokenizer

NAMES = {"math": 0, "code": 1, "chat": 2}
OTHER = 3
UNKNOWN = "zzz"
DROP = "drop"  # a system message with this content makes EmptyingTokenizer return no tokens


# --------------------------------------------------------------------------- policies


def policy_error(name):
    if name in NAMES:
        return NAMES[name]
    raise ValueError(f"untracked channel {name!r} (policy: error)")


def policy_other(name):
    return NAMES.get(name, OTHER) if name is not None else OTHER


def policy_ignore(name):
    return NAMES.get(name, -1) if name is not None else -1


# --------------------------------------------------------------------------- data


class EmptyingTokenizer(ByteChatTokenizer):
    """Tokenizes a conversation whose system message says ``DROP`` to zero tokens."""

    def tokenize_conversation(self, conversation, return_target, add_generation_prompt):
        if conversation and conversation[0]["role"] == "system" and conversation[0]["content"] == DROP:
            empty = np.zeros(0, dtype=np.int64)
            return (empty, empty.copy()) if return_target else empty
        return super().tokenize_conversation(conversation, return_target, add_generation_prompt)


@dataclass
class Line:
    """What the generator wrote: conversations and the channel name each should get."""

    record: dict
    conversations: list[list[dict]]
    names: list[str | None]  # effective name per conversation (own, else the line's), None = unnamed


def random_text(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(low, high)))


def random_conversation(rng: random.Random, first: bool, long: bool) -> list[dict]:
    top = 14 if long else 5
    messages = []
    if not (first and rng.random() < 0.1):  # some lines start without a system message
        messages.append({"role": "system", "content": DROP if rng.random() < 0.05 else random_text(rng, 0, 3)})
    for _ in range(rng.choice([0, 1, 1, 2, 3])):  # 0 turns: a system-only conversation
        messages.append({"role": "user", "content": random_text(rng, 0, top)})
        if rng.random() < 0.15:
            messages.append({"role": "tool", "content": random_text(rng, 0, 3)})
            messages.append({"role": "user", "content": random_text(rng, 0, 2)})
        messages.append({"role": "assistant", "content": random_text(rng, 1, top)})
    if not messages:
        messages.append({"role": "user", "content": random_text(rng, 1, 3)})
    return messages


def random_line(rng: random.Random, field: str = "channel", line_name_rate: float = 0.6,
                conversation_name_rate: float = 0.2) -> Line:
    choices = list(NAMES) + [UNKNOWN]
    line_name = rng.choice(choices) if rng.random() < line_name_rate else None
    conversations, names = [], []
    long = rng.random() < 0.3
    for c in range(rng.choice([1, 1, 2, 3, 4, 6])):
        conversation = random_conversation(rng, first=c == 0, long=long)
        own = None
        if conversation[0]["role"] == "system" and rng.random() < conversation_name_rate:
            own = rng.choice(choices)
            conversation[0][field] = own
        conversations.append(conversation)
        names.append(own if own is not None else line_name)
    record = {"messages": [m for conversation in conversations for m in conversation]}
    if line_name is not None:
        record[field] = line_name
    return Line(record, conversations, names)


def write_jsonl(path, lines: list[Line]) -> str:
    with open(path, "w") as handle:
        for line in lines:
            handle.write(json.dumps(line.record) + "\n")
    return str(path)


def sft_config(pack_length: int, cp: int = 1, tokenizer=None, **kwargs) -> GPTDatasetConfig:
    settings = dict(
        random_seed=1234, sequence_length=pack_length, tokenizer=tokenizer or ByteChatTokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, context_parallel_size=cp,
    )
    return GPTDatasetConfig(**{**settings, **kwargs})


def build_direct(cls, low_level, path, config):
    """A dataset over every line of ``low_level``, as the builder makes one split."""
    indices = np.arange(len(low_level), dtype=np.int32)
    return cls(dataset=low_level, dataset_path=path, indices=indices, num_samples=len(low_level),
               index_split=Split.train, config=config)


# --------------------------------------------------------------------------- reference


def kept_spans(lengths: list[int], pack_length: int, cp: int) -> list[tuple[int, int]]:
    """``(start, span)`` of every conversation kept in the row, from lengths alone."""
    granularity = 2 * cp if cp > 1 else 1
    spans, start = [], 0
    for n in lengths:
        width = -(-n // granularity) * granularity
        spans.append((start, width))
        start += width
        if start >= pack_length + 1:
            break
    last_start = spans[-1][0]
    spans[-1] = (last_start, pack_length - last_start)  # the last absorbs padding or is cut
    return spans


def expected_channel(name: str | None, resolve, fallback: int) -> int:
    return fallback if name is None else resolve(name)


def check_alignment(row: dict, line: Line, tokenizer, pack_length: int, cp: int, resolve, fallback: int, where: str):
    encoded = [tokenizer.tokenize_conversation(c, return_target=True, add_generation_prompt=False)
               for c in line.conversations]
    spans = kept_spans([len(t) for t, _ in encoded], pack_length, cp)
    cu = row["cu_seqlens"].tolist()
    channels = row["channels"]
    assert channels.dtype == torch.int64 and channels.shape == (pack_length,), where
    assert cu[: len(spans) + 1] == [s for s, _ in spans] + [pack_length], f"{where}: cu {cu}, spans {spans}"
    for i, (start, span) in enumerate(spans):
        want = expected_channel(line.names[i], resolve, fallback)
        assert int(channels[i]) == want, f"{where}: sequence {i} has channel {int(channels[i])}, wants {want}"
        tokens = encoded[i][0]
        visible = min(len(tokens), span, pack_length - start)
        assert row["tokens"][start:start + visible].tolist() == tokens[:visible].tolist(), f"{where}: sequence {i}"
    assert (channels[len(spans):] == -1).all(), f"{where}: padding slots {channels[len(spans):].tolist()}"


def hand_loss_tokens(line: Line, tokenizer, pack_length: int, cp: int) -> list[int]:
    """Loss tokens of each kept conversation, counted from its targets.

    Position ``t`` of sequence ``k`` predicts the conversation's token ``t + 1``; the last
    position of a conversation predicts the next one's role token (ignored) or a pad, and a
    cut conversation loses its tokens past the row and its last visible target.
    """
    encoded = [tokenizer.tokenize_conversation(c, return_target=True, add_generation_prompt=False)
               for c in line.conversations]
    spans = kept_spans([len(t) for t, _ in encoded], pack_length, cp)
    return [int((encoded[k][1][1:min(len(encoded[k][1]), span)] != IGNORE_INDEX).sum())
            for k, (_, span) in enumerate(spans)]


def check_equal_rows(row: dict, expected: dict, where: str) -> None:
    """Every field of Megatron's row, bitwise, with its dtype and shape; ours adds ``channels``."""
    assert set(row) == set(expected) | {"channels"}, where
    for key, want in expected.items():
        got = row[key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{where}: {key} {got.dtype}{tuple(got.shape)}"
        assert torch.equal(got, want), f"{where}: {key}\n ours     {got.tolist()}\n megatron {want.tolist()}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def random_file(tmp_path_factory):
    rng = random.Random(7)
    lines = [random_line(rng) for _ in range(160)]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "random.jsonl", lines), lines


# --------------------------------------------------------------------------- 1 + 2


@pytest.mark.timeout(60)
def test_rows_equal_megatron_sft_dataset_and_channels_align(random_file):
    path, lines = random_file
    tokenizer = EmptyingTokenizer()
    low_level = SFTJsonlDataset(path)
    assert len(low_level) == len(lines)
    cls = sft_dataset_class(policy_other)
    stats = dict(rows=0, megatron_raised=0, truncated=0, multi=0, cp_padded=0, zero_length=0)
    for pack_length, cps in [(8, (1, 2, 4)), (16, (1, 2, 4)), (24, (1, 2)), (48, (1, 2, 4)), (96, (1, 4))]:
        for cp in cps:
            config = sft_config(pack_length, cp, tokenizer)
            megatron = build_direct(SFTDataset, low_level, path, config)
            ours = build_direct(cls, low_level, path, config)
            assert len(ours) == len(megatron) == len(lines)
            for idx, line in enumerate(lines):
                where = f"P={pack_length} cp={cp} line {idx + 1}"
                try:
                    expected = megatron[idx]
                except (IndexError, AssertionError, RuntimeError):
                    # Megatron crashes on a row without tokens; ours must say why.
                    with pytest.raises(ValueError, match=rf"random.jsonl:{idx + 1}: "):
                        ours[idx]
                    stats["megatron_raised"] += 1
                    continue
                row = ours[idx]
                check_equal_rows(row, expected, where)
                check_alignment(row, line, tokenizer, pack_length, cp, policy_other, INHERIT_CHANNEL, where)
                cu = row["cu_seqlens"].tolist()
                sequences = next(i for i in range(1, len(cu)) if cu[i] == pack_length)
                lengths = np.diff(cu[: sequences + 1])
                stats["rows"] += 1
                stats["multi"] += sequences > 1
                stats["truncated"] += len(line.conversations) > (row["channels"] != -1).sum().item()
                stats["cp_padded"] += cp > 1 and bool((row["labels"] == tokenizer.pad).sum() > 1)
                stats["zero_length"] += bool((lengths == 0).any())
    # The random data must reach every case it is meant to.
    assert stats["rows"] > 1500 and stats["megatron_raised"] > 0, stats
    assert min(stats["truncated"], stats["multi"], stats["cp_padded"], stats["zero_length"]) > 20, stats


@pytest.mark.timeout(30)
def test_conversation_field_beats_line_field(tmp_path):
    record = {"channel": "code", "messages": [
        {"role": "system", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
        {"role": "system", "content": "d", "channel": "math"}, {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"},
        {"role": "system", "content": "g"}, {"role": "assistant", "content": "h"},
    ]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n")
    dataset = build_direct(sft_dataset_class(policy_error), SFTJsonlDataset(str(path)), str(path), sft_config(64))
    assert dataset[0]["channels"][:4].tolist() == [1, 0, 1, -1]
    assert dataset.unlabeled_conversations == 0 and dataset.first_unlabeled_line is None


# --------------------------------------------------------------------------- 3: policies


def small_file(tmp_path, name: str, records: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def conversation(text: str, **fields) -> list[dict]:
    return [{"role": "system", "content": "s", **fields}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": text}]


@pytest.mark.timeout(30)
def test_untracked_names_follow_the_policy(tmp_path):
    path = small_file(tmp_path, "names.jsonl", [
        {"messages": conversation("a"), "channel": "math"},
        {"messages": conversation("b"), "channel": UNKNOWN},
        {"messages": conversation("c") + conversation("d", channel=UNKNOWN), "channel": "chat"},
    ])
    low_level = SFTJsonlDataset(path)
    with pytest.raises(ValueError, match=r"names.jsonl:2: channel='zzz': untracked channel 'zzz'"):
        build_direct(sft_dataset_class(policy_error), low_level, path, sft_config(32))
    other = build_direct(sft_dataset_class(policy_other), low_level, path, sft_config(32))
    ignore = build_direct(sft_dataset_class(policy_ignore), low_level, path, sft_config(32))
    assert [other[i]["channels"][:2].tolist() for i in range(3)] == [[0, -1], [OTHER, -1], [2, OTHER]]
    assert [ignore[i]["channels"][:2].tolist() for i in range(3)] == [[0, -1], [-1, -1], [2, -1]]

    # The field name is configurable; the default key is then ordinary data.
    path = small_file(tmp_path, "source.jsonl", [{"messages": conversation("a"), "source": "code", "channel": 5}])
    dataset = build_direct(sft_dataset_class(policy_error, channel_field="source"),
                           SFTJsonlDataset(path, channel_field="source"), path, sft_config(32))
    assert dataset[0]["channels"][0] == 1


@pytest.mark.timeout(30)
def test_unnamed_lines_take_component_channel_or_policy(tmp_path):
    path = small_file(tmp_path, "mixed.jsonl", [
        {"messages": conversation("a"), "channel": "math"},
        {"messages": conversation("b")},
        {"messages": conversation("c", channel="code") + conversation("d")},
    ])
    dataset = build_direct(sft_dataset_class(policy_error), SFTJsonlDataset(path), path, sft_config(32))
    assert dataset.unlabeled_conversations == 2 and dataset.first_unlabeled_line == 2
    assert dataset[1]["channels"][:2].tolist() == [INHERIT_CHANNEL, -1]

    # The line's own field wins; unnamed sequences take the component's channel.
    tagged = ChannelTaggedDataset(dataset, [2])
    assert [tagged[i]["channels"][:3].tolist() for i in range(3)] == [[0, -1, -1], [2, -1, -1], [1, 2, -1]]
    # No component channel: channel_id(None) decides, once, at construction.
    with pytest.raises(ValueError, match=r"mixed.jsonl\) \(first unnamed line: 2\) has no channel.*policy: error"):
        ChannelTaggedDataset(dataset, [None], channel_id=policy_error)
    assert ChannelTaggedDataset(dataset, [None], channel_id=policy_other)[1]["channels"][0] == OTHER
    assert ChannelTaggedDataset(dataset, [None], channel_id=policy_ignore)[2]["channels"][:2].tolist() == [1, -1]

    # A file whose lines all name a channel never asks for one.
    named = small_file(tmp_path, "named.jsonl", [{"messages": conversation("a"), "channel": "chat"}])
    calls = []
    dataset = build_direct(sft_dataset_class(policy_error), SFTJsonlDataset(named), named, sft_config(32))
    tagged = ChannelTaggedDataset(dataset, [None], channel_id=lambda name: calls.append(name) or policy_error(name))
    assert tagged[0]["channels"][0] == 2 and calls == []


@pytest.mark.timeout(30)
def test_bad_input_is_an_error_at_build_time(tmp_path):
    def bad(records_or_text, match, field="channel"):
        path = tmp_path / "bad.jsonl"
        path.write_text(records_or_text if isinstance(records_or_text, str)
                        else "".join(json.dumps(r) + "\n" for r in records_or_text))
        with pytest.raises(ValueError, match=match):
            SFTJsonlDataset(str(path), channel_field=field)

    good = {"messages": conversation("a")}
    bad(json.dumps(good) + "\n{not json\n", r"bad.jsonl:2: not valid JSON")
    bad([good, {"text": "x"}], r"bad.jsonl:2: 'messages' must be a non-empty list")
    bad([{"messages": []}], r"bad.jsonl:1: 'messages' must be a non-empty list")
    bad([{"messages": [{"role": "user"}]}],
        r"bad.jsonl:1: messages\[0\] must be an object with string 'role' and 'content'")
    bad([{**good, "channel": 3}], r"bad.jsonl:1: 'channel' must be a non-empty string, got 3")
    bad([{**good, "channel": ""}], r"'channel' must be a non-empty string")
    bad([{"messages": conversation("a")[:2] + [{"role": "assistant", "content": "x", "channel": "math"}]}],
        r"bad.jsonl:1: messages\[2\] has 'channel' but does not start a conversation")
    bad([good], r"channel_field is empty", field="")

    path = small_file(tmp_path, "ok.jsonl", [good])
    low_level = SFTJsonlDataset(path)
    for flag in ("create_attention_mask", "reset_position_ids", "reset_attention_mask"):
        with pytest.raises(ValueError, match=rf"GPTDatasetConfig.{flag} is True"):
            build_direct(sft_dataset_class(policy_error), low_level, path, sft_config(16, **{flag: True}))
    with pytest.raises(ValueError, match=r"sequence_length 12 is not a multiple of 2 \* context_parallel_size = 8"):
        build_direct(sft_dataset_class(policy_error), low_level, path, sft_config(12, cp=4))
    named = small_file(tmp_path, "n.jsonl", [{**good, "channel": "x"}])
    with pytest.raises(ValueError, match=r"n.jsonl:1: channel='x': lines name channels but no channel_id"):
        build_direct(sft_dataset_class(None), SFTJsonlDataset(named), named, sft_config(16))
    # A message the tokenizer refuses names its line.
    empty_answer = small_file(tmp_path, "empty.jsonl", [good, {"messages": conversation("")}])
    dataset = build_direct(sft_dataset_class(policy_error), SFTJsonlDataset(empty_answer), empty_answer, sft_config(16))
    with pytest.raises(ValueError, match=r"empty.jsonl:2: empty assistant turn"):
        dataset[1]


# --------------------------------------------------------------------------- 4: blend


@pytest.fixture(scope="module")
def sft_blend(tmp_path_factory):
    """Two jsonl components: A with some lines named, B with none."""
    root = tmp_path_factory.mktemp("blend")
    rng = random.Random(11)
    lines_a = [random_line(rng, line_name_rate=0.5, conversation_name_rate=0.2) for _ in range(40)]
    lines_b = [random_line(rng, line_name_rate=0.0, conversation_name_rate=0.0) for _ in range(40)]
    paths = [write_jsonl(root / "a.jsonl", lines_a), write_jsonl(root / "b.jsonl", lines_b)]
    return root, paths, {paths[0]: lines_a, paths[1]: lines_b}


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.timeout(60)
def test_blend_of_jsonl_files_train_and_valid(sft_blend):
    root, paths, lines_of = sft_blend
    pack_length, cp = 48, 2
    component_ids = {paths[0]: 1, paths[1]: 2}
    config = sft_config(pack_length, cp, blend=(paths, [0.5, 0.5]), split="75,25,0", path_to_cache=str(root / "cache"))
    cls = sft_dataset_class(policy_other)
    datasets = BlendedMegatronDatasetBuilder(cls=cls, sizes=[40, 12, 0], is_built_on_rank=lambda: True,
                                             config=config).build()
    ids = [None if p is None else [component_ids[x] for x in p] for p in blend_component_paths(config)]
    train, valid, test = tag_datasets(datasets, ids, channel_id=policy_other)
    assert test is None and train.split == Split.train and valid.split == Split.valid

    tokenizer = ByteChatTokenizer()
    seen = set()
    for name, tagged in (("train", train), ("valid", valid)):
        blended = tagged.dataset
        assert isinstance(blended, BlendedDataset)
        for idx in range(len(tagged)):
            row = tagged[idx]
            component = blended.datasets[int(blended.dataset_index[idx])]
            sample = int(blended.dataset_sample_index[idx])
            line = int(component.indices[sample % len(component.indices)])
            path = component.dataset_path
            check_alignment(row, lines_of[path][line], tokenizer, pack_length, cp, policy_other,
                            component_ids[path], f"{name}[{idx}] = {path}:{line + 1}")
            seen.update(row["channels"].tolist())
    assert {0, 1, 2, OTHER, -1} <= seen, seen  # named, both fallbacks, unknown names, padding

    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["channels"].shape == (4, pack_length) and batch["channels"].dtype == torch.int64
    assert batch["cu_seqlens"].shape == (4, pack_length + 1) and batch["max_seqlen"].shape == (4,)

    # Spawned loader workers receive the datasets pickled (the built class is not importable).
    copy = pickle.loads(pickle.dumps(train))
    for idx in range(6):
        assert all(torch.equal(copy[idx][k], train[idx][k]) for k in train[idx] if k != "dataset_id")


# --------------------------------------------------------------------------- 5: model


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.timeout(60)
def test_rows_through_forward_step_count_tokens_per_channel(tmp_path):
    pack_length, cp = 48, 2  # rows padded for CP=2 also run at CP=1: their counts must hold
    rng = random.Random(3)
    lines = [random_line(rng) for _ in range(12)]
    path = write_jsonl(tmp_path / "model.jsonl", lines)
    tokenizer = ByteChatTokenizer()
    config = ChannelConfig(["math", "code", "chat", "other"])
    dataset = build_direct(sft_dataset_class(policy_other), SFTJsonlDataset(path), path, sft_config(pack_length, cp))
    tagged = ChannelTaggedDataset(dataset, [None], channel_id=policy_ignore)  # unnamed lines: untracked

    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=VOCAB_SIZE, seq_length=pack_length)
    model.eval()
    forward_step = make_forward_step(config, pass_packed_seq_params=False)
    for idx, batch in enumerate(DataLoader(tagged, batch_size=1)):
        line = lines[idx]
        batch["attention_mask"] = block_causal_mask(batch["cu_seqlens"][0], pack_length)
        with torch.no_grad():
            output, loss_func = forward_step(iter([batch]), model)
        _, num_tokens, metrics = loss_func(output)

        counts = hand_loss_tokens(line, tokenizer, pack_length, cp)
        cu = batch["cu_seqlens"][0].tolist()
        want_count = [0] * config.num_channels
        want_sum = [0.0] * config.num_channels
        for k, count in enumerate(counts):
            channel = expected_channel(line.names[k], policy_other, -1)
            assert int(batch["channels"][0, k]) == channel
            if channel >= 0:
                want_count[channel] += count
                for t in range(cu[k], cu[k + 1]):
                    want_sum[channel] += float(output[0, t]) * float(batch["loss_mask"][0, t])
        assert int(num_tokens) == int(batch["loss_mask"].sum()) == sum(counts), f"line {idx + 1}"
        for c, key in enumerate(config.metric_keys()):
            got_sum, got_count = metrics[key].tolist()
            assert got_count == want_count[c], f"line {idx + 1} {key}: count {got_count}, hand count {want_count[c]}"
            assert got_sum == pytest.approx(want_sum[c], rel=1e-5, abs=1e-4), f"line {idx + 1} {key}"
