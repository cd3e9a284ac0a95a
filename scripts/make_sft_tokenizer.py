#!/usr/bin/env python
"""Write a tiny Hugging Face tokenizer directory for Megatron's SFTTokenizer (no downloads).

  python scripts/make_sft_tokenizer.py --out runs/sft_tokenizer

Megatron's packed SFT (``--sft``) tokenizes conversations with
``--tokenizer-type SFTTokenizer --tokenizer-model DIR``, which loads DIR with
``transformers.AutoTokenizer`` and renders each conversation with the chat template of
``--sft-tokenizer-prompt-format``. This writes such a DIR without any model download:

* a byte-level BPE with no merges: every UTF-8 byte is one token (256 ids), so any text
  encodes, and a conversation's tokens are the concatenation of its turns' tokens (what
  SFTTokenizer's per-turn masking asserts);
* the special tokens the Nemotron prompt formats name: ``<SPECIAL_10>`` (system header),
  ``<SPECIAL_11>`` (user/assistant header), ``<SPECIAL_12>`` (end of an assistant turn in
  nemotron-nano-v2), ``<SPECIAL_233>`` (pad of nemotron-h-aligned), ``<unk>`` (pad of
  nemotron-nano-v2 and identity) and ``</s>`` (eos, Megatron's ``eod``);
* ``Assistant`` as one added token, so nemotron-nano-v2's assistant prefix
  ``<SPECIAL_11>`` ``Assistant`` ``\\n`` is the 3 tokens it masks;
* a chat template of its own, used by the "default" prompt format.

Formats whose loss mask trains the assistant turns only: ``nemotron-h-aligned`` (Megatron's
default for ``--sft-tokenizer-prompt-format``) and ``nemotron-nano-v2``. The ``default`` and
``identity`` formats load too, but SFTTokenizer then trains on every token, prompt included.

Vocabulary: ``VOCAB_SIZE`` = 263 ids (``len(tokenizer)``); Megatron pads it to a multiple of
``--make-vocab-size-divisible-by`` x TP (384 with the default 128).
"""

from __future__ import annotations

import argparse
import os

UNK = "<unk>"
EOS = "</s>"
SYSTEM_HEADER = "<SPECIAL_10>"
TURN_HEADER = "<SPECIAL_11>"
END_OF_ANSWER = "<SPECIAL_12>"
PAD = "<SPECIAL_233>"
ASSISTANT_WORD = "Assistant"  # an ordinary (non-special) added token: one id, like a real vocabulary's

SPECIAL_TOKENS = (UNK, EOS, SYSTEM_HEADER, TURN_HEADER, END_OF_ANSWER, PAD)
NUM_BYTES = 256
VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS) + 1  # + ASSISTANT_WORD

# The "default" prompt format renders with the tokenizer's own template. Ours lays turns out
# like nemotron-h-aligned (headers, then the content and a newline) and can add the
# generation prompt; "default" still takes loss on every token (SFTTokenizer's rule).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '" + SYSTEM_HEADER + "System\\n' + m['content'] | trim + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '" + TURN_HEADER + "User\\n' + m['content'] | trim + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '" + TURN_HEADER + "Assistant\\n' + m['content'] | trim + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + TURN_HEADER + "Assistant\\n' }}{% endif %}"
)


def build_backend():
    """The ``tokenizers.Tokenizer``: ids 0..5 special, 6 ``Assistant``, 7..262 the bytes 0..255."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # The ByteLevel pre-tokenizer writes each byte as a printable symbol; order the symbols
    # by the byte they stand for, so a byte's id is ``first + its value``.
    byte_of = _byte_level_symbols()
    if set(byte_of) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("this tokenizers version maps bytes to other symbols than GPT-2's")
    first = len(SPECIAL_TOKENS) + 1
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab[ASSISTANT_WORD] = len(SPECIAL_TOKENS)
    vocab.update({symbol: first + value for value, symbol in enumerate(byte_of)})

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    # No regex split and no prefix space: the text is only mapped byte -> symbol, so the
    # encoding of a concatenation is the concatenation of the encodings.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(ASSISTANT_WORD, special=False, normalized=False)])
    return backend


def _byte_level_symbols() -> list[str]:
    """Symbol standing for byte ``b`` at index ``b`` (GPT-2's printable byte mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    symbols = {}
    extra = 0
    for value in range(NUM_BYTES):
        if value in printable:
            symbols[value] = chr(value)
        else:
            symbols[value] = chr(NUM_BYTES + extra)
            extra += 1
    return [symbols[value] for value in range(NUM_BYTES)]


def build_tokenizer():
    """The ``transformers`` fast tokenizer around ``build_backend()``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        unk_token=UNK,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM_HEADER, TURN_HEADER, END_OF_ANSWER],
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, expected {VOCAB_SIZE}")
    return tokenizer


def write_sft_tokenizer(directory: str) -> str:
    """Write the tokenizer to ``directory`` (created if needed); return its absolute path.

    The directory loads offline with ``transformers.AutoTokenizer.from_pretrained`` and so
    with ``--tokenizer-type SFTTokenizer --tokenizer-model DIR``. Same files every call.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    build_tokenizer().save_pretrained(directory)
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sft_tokenizer", help="directory to write the tokenizer files to")
    opts = parser.parse_args(argv)
    path = write_sft_tokenizer(opts.out)
    print(f"wrote a {VOCAB_SIZE}-id SFT tokenizer to {path}")
    print(f"use: --tokenizer-type SFTTokenizer --tokenizer-model {path} "
          "--sft-tokenizer-prompt-format nemotron-h-aligned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
