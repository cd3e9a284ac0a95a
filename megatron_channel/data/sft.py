"""Packed SFT rows with per-sequence channel ids, in Megatron's SFT format.

Input: jsonl lines ``{"messages": [{"role": ..., "content": ...}, ...], "channel": "math"}``
(Megatron's SFT format plus a channel field, its name configurable). A line may hold
several conversations, each starting with a system message; a conversation's first
message may carry the channel field too, and then it wins over the line's.

Each line becomes one row packed the way Megatron's ``SFTDataset`` packs it (checked
against it in tests/test_sft.py): every conversation padded to a multiple of ``2 * cp``
under context parallelism, the row cut or padded to ``pack_length``, ``cu_seqlens`` padded
to ``pack_length + 1`` entries equal to ``pack_length``. The row also carries ``channels``
``[pack_length]`` int64: entry ``i`` is the channel of sequence ``i`` of ``cu_seqlens``,
``-1`` on padding slots, and ``INHERIT_CHANNEL`` for sequences whose line names no channel,
which ``ChannelTaggedDataset`` replaces by the channel of the line's blend component.

Channel names become ids when the dataset is built (``channel_id(name)``), so an unknown
name under an "error" policy stops the run before training, naming the file and line.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from .tagged import INHERIT_CHANNEL, ChannelIdFn, check_channel_value

IGNORE_INDEX = -100  # target value of prompt tokens (Megatron's SFT convention)
NO_NAME = -1  # name code of a conversation whose line names no channel


# --------------------------------------------------------------------------- conversations


def split_conversations(messages: Sequence[Mapping]) -> list[list[Mapping]]:
    """Cut a line's messages into conversations: each system message starts a new one.

    Messages before the first system message form a conversation of their own.
    """
    starts = [i for i, message in enumerate(messages) if i == 0 or message["role"] == "system"]
    ends = starts[1:] + [len(messages)]
    return [list(messages[a:b]) for a, b in zip(starts, ends)]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --------------------------------------------------------------------------- packing


def pack_conversations(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], channels: Sequence[int],
                       pack_length: int, pad: int, cp_size: int = 1) -> dict[str, torch.Tensor]:
    """One packed THD row from tokenized conversations, Megatron's SFT layout plus ``channels``.

    Args:
        encoded: per conversation, ``(tokens, targets)`` of equal length; targets are
            ``IGNORE_INDEX`` where no loss is taken.
        channels: channel id per conversation.
        pack_length: tokens per row (``--seq-length``).
        pad: the pad token id (tokens and targets of padding; masked out of the loss).
        cp_size: context-parallel size; each conversation is padded to a multiple of ``2 * cp``.

    Returns:
        ``tokens``, ``labels``, ``position_ids`` ``[P]`` int64, ``loss_mask`` ``[P]`` float32,
        ``cu_seqlens`` ``[P + 1]`` int32 (trailing entries equal to ``P``), ``max_seqlen``
        0-d int32 and ``channels`` ``[P]`` int64 (sequence ``i``'s channel, ``-1`` beyond the
        last sequence), with ``P = pack_length``.
    """
    granularity = 2 * cp_size if cp_size > 1 else 1
    padded = [round_up(len(tokens), granularity) for tokens, _ in encoded]
    ends = np.cumsum(padded, dtype=np.int64)
    # Conversations are taken in order up to the first that reaches one token past the row
    # (the extra token becomes the last label); later ones are dropped.
    reaching = np.nonzero(ends >= pack_length + 1)[0]
    kept = int(reaching[0]) + 1 if reaching.size else len(encoded)
    if kept > pack_length:
        raise ValueError(
            f"{kept} conversations fit in a row of {pack_length} tokens, more than cu_seqlens' "
            f"{pack_length} sequence slots; raise --seq-length or merge tiny conversations"
        )

    stream_tokens = np.full(pack_length + 1, pad, dtype=np.int64)
    stream_targets = np.full(pack_length + 1, pad, dtype=np.int64)
    positions: list[int] = []
    offset = 0
    for (tokens, targets), width in zip(encoded[:kept], padded[:kept]):
        room = max(0, min(len(tokens), pack_length - offset))
        stream_tokens[offset:offset + room] = np.asarray(tokens, dtype=np.int64)[:room]
        stream_targets[offset:offset + room] = np.asarray(targets, dtype=np.int64)[:room]
        # Positions restart per conversation and run on through its padding.
        positions.extend(range(width))
        offset += width
    if not positions:
        raise ValueError("the row has no tokens: every conversation tokenized to nothing")
    # Padding after the last conversation continues its positions.
    positions.extend(range(positions[-1] + 1, positions[-1] + 1 + max(0, pack_length + 1 - len(positions))))

    boundaries = [0] + ends[: kept - 1].tolist() + [pack_length]
    cu = torch.full((pack_length + 1,), pack_length, dtype=torch.int32)
    cu[: len(boundaries)] = torch.tensor(boundaries, dtype=torch.int32)
    lengths = np.diff(boundaries)

    labels = torch.from_numpy(stream_targets[1:].copy())
    row_channels = torch.full((pack_length,), -1, dtype=torch.int64)
    row_channels[:kept] = torch.tensor(list(channels[:kept]), dtype=torch.int64)
    return {
        "tokens": torch.from_numpy(stream_tokens[:pack_length].copy()),
        "labels": labels,
        "loss_mask": ((labels != pad) & (labels != IGNORE_INDEX)).to(torch.float32),
        "position_ids": torch.tensor(positions[:pack_length], dtype=torch.int64),
        "cu_seqlens": cu,
        "max_seqlen": torch.tensor(int(lengths.max()), dtype=torch.int32),
        "channels": row_channels,
    }


# --------------------------------------------------------------------------- jsonl lines


class SFTJsonlDataset:
    """The lines of one SFT jsonl file, checked once and read back on demand.

    Building parses every line once (to check it and read its channel names) and keeps only
    byte offsets and name codes, so memory does not grow with the text. ``dataset[i]`` is
    line ``i``'s ``messages`` list, what Megatron's ``SFTDataset`` expects of its low-level
    dataset. Blank lines are skipped; a channel field that is absent or ``null`` names none.

    Args:
        path: the jsonl file.
        channel_field: the key naming a line's (or a conversation's first message's) channel.
    """

    def __init__(self, path: str, channel_field: str = "channel"):
        if not channel_field:
            raise ValueError("channel_field is empty: give the jsonl key that names a line's channel")
        self.path = path
        self.channel_field = channel_field
        self.channel_names: list[str] = []  # name code -> name
        self.first_line_of_name: list[int] = []
        starts, ends, line_numbers, conversation_starts, name_codes = [], [], [], [0], []
        codes: dict[str, int] = {}
        with open(path, "rb") as handle:
            offset = 0
            for line_number, raw in enumerate(handle, start=1):
                begin, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = f"{path}:{line_number}"
                for name in self.parse_line_channels(raw, where):
                    if name is None:
                        name_codes.append(NO_NAME)
                        continue
                    if name not in codes:
                        codes[name] = len(self.channel_names)
                        self.channel_names.append(name)
                        self.first_line_of_name.append(line_number)
                    name_codes.append(codes[name])
                starts.append(begin)
                ends.append(offset)
                line_numbers.append(line_number)
                conversation_starts.append(len(name_codes))
        self.line_starts = np.asarray(starts, dtype=np.int64)
        self.line_ends = np.asarray(ends, dtype=np.int64)
        self.line_numbers = np.asarray(line_numbers, dtype=np.int64)
        self.conversation_starts = np.asarray(conversation_starts, dtype=np.int64)
        self.conversation_name_codes = np.asarray(name_codes, dtype=np.int32)

    def parse_line_channels(self, raw: bytes, where: str) -> list[str | None]:
        """Check one line; return the channel name of each of its conversations (None: unnamed)."""
        try:
            record = json.loads(raw)
        except ValueError as err:  # bad JSON or bad UTF-8
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a line must be a JSON object with a 'messages' list")
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        line_name = self.channel_name(record, where)
        names = []
        first_messages = {id(conversation[0]) for conversation in split_conversations(messages)}
        for i, message in enumerate(messages):
            if id(message) in first_messages:
                own = self.channel_name(message, f"{where}: messages[{i}]")
                names.append(own if own is not None else line_name)
            elif self.channel_field in message:
                raise ValueError(
                    f"{where}: messages[{i}] has '{self.channel_field}' but does not start a "
                    "conversation; name the channel on the line or on the conversation's first "
                    "(system) message"
                )
        return names

    def channel_name(self, record: Mapping[str, Any], where: str) -> str | None:
        if record.get(self.channel_field) is None:
            return None
        name = record[self.channel_field]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: '{self.channel_field}' must be a non-empty string, got {name!r}")
        return name

    def __len__(self) -> int:
        return len(self.line_starts)

    def __getitem__(self, idx: int) -> list[dict]:
        """Line ``idx``'s ``messages``."""
        start, end = int(self.line_starts[idx]), int(self.line_ends[idx])
        # Opened per read: nothing to share between forked loader workers or to pickle.
        with open(self.path, "rb") as handle:
            handle.seek(start)
            return json.loads(handle.read(end - start))["messages"]


# --------------------------------------------------------------------------- Megatron dataset


class ChannelSFTDataset(MegatronDataset):
    """Megatron's SFT rows with ``channels``; build it with ``BlendedMegatronDatasetBuilder``.

    Use a class from ``sft_dataset_class(channel_id, channel_field)``: the builder only passes
    paths and the ``GPTDatasetConfig``, so the channel settings ride on the class. Sample
    ``idx`` packs line ``indices[idx % len(indices)]`` (Megatron's SFT order: no shuffle).

    Config: ``sequence_length`` is the pack length, ``context_parallel_size`` the CP size,
    ``tokenizer`` needs ``tokenize_conversation`` and ``pad``; ``reset_position_ids``,
    ``reset_attention_mask`` and ``create_attention_mask`` must be False (as Megatron's).

    Attributes:
        unlabeled_conversations: conversations of this split whose line names no channel
            (they take their blend component's; see ``ChannelTaggedDataset``).
        first_unlabeled_line: the file line number of the first of them, or None.
    """

    channel_field: str = "channel"
    channel_id: ChannelIdFn | None = None

    def __init__(self, dataset: SFTJsonlDataset, dataset_path: str | None, indices: np.ndarray,
                 num_samples: int | None, index_split: Split, config) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        check_sft_config(config)
        if indices is None:
            raise ValueError(
                "SFT datasets need the split's line indices, which --dataloader-fast-cache-load "
                "(GPTDatasetConfig.fast_cache_load) skips; turn it off for SFT"
            )
        self.pack_length = config.sequence_length
        self.cp_size = config.context_parallel_size or 1
        if self.num_samples and len(self.indices) == 0:
            raise ValueError(
                f"{dataset_path}: the {index_split.name} split holds no lines but {num_samples} "
                "samples are requested; change --split or give this split its own data"
            )
        code_to_channel = self.resolve_names(dataset)
        self.conversation_channels = code_to_channel[dataset.conversation_name_codes + 1]
        lines = np.asarray(self.indices, dtype=np.int64)
        unlabeled = self.unlabeled_per_line(dataset)[lines]
        self.unlabeled_conversations = int(unlabeled.sum())
        first = np.nonzero(unlabeled)[0]
        self.first_unlabeled_line = int(dataset.line_numbers[lines[first[0]]]) if first.size else None

    def resolve_names(self, dataset: SFTJsonlDataset) -> np.ndarray:
        """``[1 + names]`` int64: index 0 (unnamed) -> ``INHERIT_CHANNEL``, then each name's id."""
        table = [INHERIT_CHANNEL]
        resolve = type(self).channel_id
        for name, line in zip(dataset.channel_names, dataset.first_line_of_name):
            where = f"{dataset.path}:{line}: {dataset.channel_field}={name!r}"
            if resolve is None:
                raise ValueError(
                    f"{where}: lines name channels but no channel_id was given; build the dataset "
                    "class with sft_dataset_class(channel_id=...)"
                )
            try:
                value = resolve(name)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
            table.append(check_channel_value(value, f"channel_id({name!r}) ({where})"))
        return np.asarray(table, dtype=np.int64)

    @staticmethod
    def unlabeled_per_line(dataset: SFTJsonlDataset) -> np.ndarray:
        """Conversations without a name, per line."""
        unnamed = np.concatenate([[0], np.cumsum(dataset.conversation_name_codes == NO_NAME)])
        return unnamed[dataset.conversation_starts[1:]] - unnamed[dataset.conversation_starts[:-1]]

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: SFTJsonlDataset) -> int:
        return len(low_level_dataset)

    @classmethod
    def build_low_level_dataset(cls, dataset_path: str, config) -> SFTJsonlDataset:
        return SFTJsonlDataset(dataset_path, cls.channel_field)

    def __len__(self) -> int:
        return self.num_samples if self.num_samples is not None else len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """One packed row (see ``pack_conversations``), channels per sequence."""
        line = int(self.indices[idx % len(self.indices)])
        conversations = split_conversations(self.dataset[line])
        first = int(self.dataset.conversation_starts[line])
        channels = self.conversation_channels[first:first + len(conversations)]
        if len(channels) != len(conversations):
            raise RuntimeError(f"{self.where(line)}: the file changed since the dataset was built")
        tokenizer = self.config.tokenizer
        encoded = [self.encode(tokenizer, conversation, line) for conversation in conversations]
        try:
            return pack_conversations(encoded, channels.tolist(), self.pack_length, tokenizer.pad, self.cp_size)
        except ValueError as err:
            raise ValueError(f"{self.where(line)}: {err}") from err

    def encode(self, tokenizer, conversation: list, line: int) -> tuple[list[int], list[int]]:
        try:
            tokens, targets = tokenizer.tokenize_conversation(conversation, return_target=True,
                                                              add_generation_prompt=False)
        except ValueError as err:
            raise ValueError(f"{self.where(line)}: {err}") from err
        tokens, targets = np.asarray(tokens).tolist(), np.asarray(targets).tolist()
        if len(tokens) != len(targets):
            raise ValueError(f"{self.where(line)}: the tokenizer gave {len(tokens)} tokens but {len(targets)} targets")
        return tokens, targets

    def where(self, line: int) -> str:
        return f"{self.dataset.path}:{int(self.dataset.line_numbers[line])}"

    def __reduce__(self):
        # Classes from sft_dataset_class are not importable by name; the settings they carry
        # are used at build time only, so a copy in a loader worker can be the base class.
        return (_restore_sft_dataset, (self.__dict__,))


def _restore_sft_dataset(state: dict) -> ChannelSFTDataset:
    dataset = ChannelSFTDataset.__new__(ChannelSFTDataset)
    dataset.__dict__.update(state)
    return dataset


def check_sft_config(config) -> None:
    """The ``GPTDatasetConfig`` settings SFT rows cannot honour, as Megatron's SFT dataset."""
    for flag in ("reset_position_ids", "reset_attention_mask", "create_attention_mask"):
        if getattr(config, flag, False):
            raise ValueError(
                f"GPTDatasetConfig.{flag} is True, but packed SFT rows set positions per conversation "
                f"and attend through cu_seqlens; set {flag}=False"
            )
    cp = config.context_parallel_size or 1
    if cp > 1 and config.sequence_length % (2 * cp):
        raise ValueError(
            f"sequence_length {config.sequence_length} is not a multiple of 2 * context_parallel_size "
            f"= {2 * cp}; packed rows under context parallelism need it"
        )
    for attribute in ("tokenize_conversation", "pad"):
        if not hasattr(config.tokenizer, attribute):
            raise ValueError(
                f"the tokenizer ({type(config.tokenizer).__name__}) has no '{attribute}'; SFT rows need "
                "Megatron's SFTTokenizer interface (tokenize_conversation, pad)"
            )


def sft_dataset_class(channel_id: ChannelIdFn, channel_field: str = "channel") -> type[ChannelSFTDataset]:
    """A ``ChannelSFTDataset`` class for ``BlendedMegatronDatasetBuilder``.

    Args:
        channel_id: channel name -> id; applies the untracked policy to unknown names
            (returns an "other" id or -1, or raises ``ValueError``). Called once per distinct
            name when a dataset is built.
        channel_field: the jsonl key naming a line's channel.
    """
    if not channel_field:
        raise ValueError("channel_field is empty: give the jsonl key that names a line's channel")
    return type("ChannelSFTDataset", (ChannelSFTDataset,),
                {"channel_id": staticmethod(channel_id), "channel_field": channel_field})
