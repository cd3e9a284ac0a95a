"""A tiny deterministic chat tokenizer with the interface Megatron's SFT dataset calls.

Megatron 0.19 tokenizes SFT conversations with ``SFTTokenizer`` (a Hugging Face tokenizer
plus a chat template, wrapped by ``MegatronTokenizerText``), which needs a downloaded
model. ``ByteChatTokenizer`` offers the same calls without any file: tests and the CPU
demo use it with both Megatron's ``SFTDataset`` and ``megatron_channel.data.sft``.

Encoding of one message: ``[<role>] + utf-8 bytes of content + [<end>]``. Targets follow
``SFTTokenizer``'s masking: system/user/tool turns are ``IGNORE_INDEX`` entirely; in an
assistant turn only the role token (the assistant prefix) is ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np

from megatron_channel.data.sft import IGNORE_INDEX

NUM_BYTES = 256
PAD_ID = 256
EOD_ID = 257
END_OF_TURN_ID = 258
ROLE_IDS = {"system": 259, "user": 260, "assistant": 261, "tool": 262}
VOCAB_SIZE = 263


class ByteChatTokenizer:
    """Byte-level tokenizer with ``tokenize_conversation`` (Megatron ``SFTTokenizer`` calls).

    Token ids: 0..255 bytes, 256 pad, 257 eod, 258 end of turn, 259..262 the role tokens of
    system, user, assistant, tool. ``vocab_size`` is 263.
    """

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def pad(self) -> int:
        return PAD_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eod(self) -> int:
        return EOD_ID

    @property
    def eos(self) -> int:
        return EOD_ID

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What Megatron's dataset classes hash into their cache names."""
        return OrderedDict({"class": f"{type(self).__module__}.{type(self).__qualname__}", "vocab_size": VOCAB_SIZE})

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < NUM_BYTES).decode("utf-8", errors="replace")

    def encode_message(self, message: Mapping) -> tuple[list[int], list[int]]:
        """Tokens and targets of one ``{"role", "content"}`` message."""
        role = str(message["role"]).lower()
        if role not in ROLE_IDS:
            raise ValueError(f"message role {message['role']!r} is not one of {sorted(ROLE_IDS)}")
        content = message["content"]
        if role == "assistant" and len(content) == 0:
            # SFTTokenizer refuses these too: an empty answer teaches nothing but the end token.
            raise ValueError("empty assistant turn: an assistant message needs non-empty content")
        tokens = [ROLE_IDS[role]] + self.tokenize(content) + [END_OF_TURN_ID]
        if role == "assistant":
            targets = [IGNORE_INDEX] + tokens[1:]
        else:
            targets = [IGNORE_INDEX] * len(tokens)
        return tokens, targets

    def tokenize_conversation(self, conversation: Sequence[Mapping], return_target: bool,
                              add_generation_prompt: bool):
        """Token ids ``[n]`` (and targets ``[n]`` when ``return_target``) as int64 numpy arrays.

        Args:
            conversation: messages ``{"role": ..., "content": ...}``; extra keys are ignored.
            return_target: also return targets, ``IGNORE_INDEX`` on prompt tokens.
            add_generation_prompt: append the assistant role token (for inference).
        """
        tokens: list[int] = []
        targets: list[int] = []
        for message in conversation:
            message_tokens, message_targets = self.encode_message(message)
            tokens += message_tokens
            targets += message_targets
        if add_generation_prompt:
            tokens.append(ROLE_IDS["assistant"])
            targets.append(IGNORE_INDEX)
        tokens_array = np.asarray(tokens, dtype=np.int64)
        if not return_target:
            return tokens_array
        return tokens_array, np.asarray(targets, dtype=np.int64)
