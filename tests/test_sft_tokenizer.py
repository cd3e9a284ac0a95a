"""The tiny Hugging Face tokenizer of scripts/make_sft_tokenizer.py through Megatron's SFTTokenizer.

1. The directory loads offline with ``transformers.AutoTokenizer`` (a fresh process with
   ``HF_HUB_OFFLINE=1`` and every proxy pointed at a closed port), is the same every time it
   is written, and has fewer than 400 ids.
2. Built the way ``pretrain()`` builds it (Megatron's argument parser, then
   ``build_tokenizer(args)``) with ``--tokenizer-type SFTTokenizer --tokenizer-model DIR
   --sft-tokenizer-prompt-format FMT``: a system/user/assistant conversation trains on the
   assistant's answer only, for both masking formats (nemotron-h-aligned, nemotron-nano-v2).
3. Rows of the repository's packed SFT dataset over scripts/make_tiny_data.py's jsonl, with
   this tokenizer: every field equals Megatron's ``SFTDataset`` row, every conversation of a
   row has loss tokens (exactly its answer), and ``channels`` names each line's channel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.utils import Split
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.training.arguments import add_megatron_arguments
from megatron.training.datasets.sft_dataset import SFTDataset

from megatron_channel.data.sft import IGNORE_INDEX, SFTJsonlDataset, sft_dataset_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import make_sft_tokenizer  # noqa: E402
from make_tiny_data import write_sft  # noqa: E402

CONVERSATION = [{"role": "system", "content": "You are a calculator."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
# What each masking format renders, and the part of it that is trained.
RENDERED = {
    "nemotron-h-aligned": ("<SPECIAL_10>System\nYou are a calculator.\n<SPECIAL_11>User\n2+2?\n"
                           "<SPECIAL_11>Assistant\n4\n", "4\n"),
    "nemotron-nano-v2": ("<SPECIAL_10>System\nYou are a calculator.\n<SPECIAL_11>User\n2+2?\n"
                         "<SPECIAL_11>Assistant\n4\n<SPECIAL_12>\n", "4\n<SPECIAL_12>\n"),
}
CHANNELS = {"math": 0, "code": 1, "chat": 2}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_sft_tokenizer.write_sft_tokenizer(str(tmp_path_factory.mktemp("sft_tokenizer")))


def megatron_tokenizer(directory: str, prompt_format: str):
    """The tokenizer ``pretrain()`` builds from these flags (global_vars._build_tokenizer)."""
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(["--sft", "--tokenizer-type", "SFTTokenizer", "--tokenizer-model", directory,
                              "--sft-tokenizer-prompt-format", prompt_format])
    args.rank = 0  # validate_args sets it in a real run; build_tokenizer logs the vocab padding on rank 0
    tokenizer = build_tokenizer(args)
    return tokenizer, args


def hf(tokenizer):
    """The transformers tokenizer inside Megatron's wrapper (for decoding in assertions)."""
    return tokenizer._tokenizer._tokenizer


# --------------------------------------------------------------------------- 1: the directory


@pytest.mark.timeout(60)
def test_directory_loads_offline_and_is_deterministic(tokenizer_dir, tmp_path):
    again = make_sft_tokenizer.write_sft_tokenizer(str(tmp_path / "again"))
    for name in sorted(os.listdir(tokenizer_dir)):
        with open(os.path.join(tokenizer_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name

    probe = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "text = 'h\\u00e9llo <SPECIAL_11>Assistant\\n\\t~'\n"
        "ids = t.encode(text, add_special_tokens=False)\n"
        "print(json.dumps([len(t), t.pad_token_id, t.eos_token_id, t.unk_token_id, t.bos_token_id,\n"
        "                  t.convert_tokens_to_ids(['<SPECIAL_233>', '<SPECIAL_10>', '<SPECIAL_11>', '<SPECIAL_12>',\n"
        "                                           '<unk>', 'Assistant']),\n"
        "                  ids, t.decode(ids) == text]))\n"
    )
    dead = "http://127.0.0.1:9"  # any attempt to reach the hub fails at once
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTPS_PROXY": dead,
           "HTTP_PROXY": dead, "https_proxy": dead, "http_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    out = subprocess.run([sys.executable, "-c", probe, tokenizer_dir], env=env, capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stderr[-3000:]
    size, pad, eos, unk, bos, specials, ids, round_trip = json.loads(out.stdout.strip().splitlines()[-1])
    assert size == make_sft_tokenizer.VOCAB_SIZE == 263 < 400
    assert (pad, eos, unk, bos) == (5, 1, 0, None)
    assert specials == [5, 2, 3, 4, 0, 6]
    # One id per UTF-8 byte (7 + byte value), the headers and "Assistant" one id each.
    assert ids == [7 + ord("h"), 7 + 0xC3, 7 + 0xA9, 7 + ord("l"), 7 + ord("l"), 7 + ord("o"), 7 + ord(" "),
                   3, 6, 7 + ord("\n"), 7 + ord("\t"), 7 + ord("~")]
    assert round_trip


# --------------------------------------------------------------------------- 2: Megatron's SFTTokenizer


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prompt_format", sorted(RENDERED))
def test_megatron_sft_tokenizer_trains_the_answer_only(tokenizer_dir, prompt_format):
    tokenizer, args = megatron_tokenizer(tokenizer_dir, prompt_format)
    assert tokenizer.vocab_size == 263 and args.padded_vocab_size == 384  # 128 * TP 1
    assert tokenizer.eod == 1  # </s>
    assert tokenizer.pad == {"nemotron-h-aligned": 5, "nemotron-nano-v2": 0}[prompt_format]

    tokens, targets = tokenizer.tokenize_conversation(CONVERSATION, return_target=True, add_generation_prompt=False)
    text, trained = RENDERED[prompt_format]
    assert hf(tokenizer).decode(tokens.tolist()) == text
    assert tokens.shape == targets.shape
    kept = targets != IGNORE_INDEX
    assert (targets[kept] == tokens[kept]).all()
    # The prompt (system, user, assistant header) is masked, then every token is trained.
    first = int(np.argmax(kept))
    assert kept[first:].all() and not kept[:first].any()
    assert hf(tokenizer).decode(tokens[kept].tolist()) == trained
    assert hf(tokenizer).decode(tokens[:first].tolist()).endswith("<SPECIAL_11>Assistant\n")
    assert tokenizer.pad not in tokens.tolist()  # the pad never stands for a real token


@pytest.mark.timeout(60)
def test_default_and_identity_formats_train_the_prompt_too(tokenizer_dir):
    """Megatron's SFTTokenizer masks nothing under these formats; hence nemotron-h-aligned."""
    for prompt_format in ("default", "identity"):
        tokenizer, _ = megatron_tokenizer(tokenizer_dir, prompt_format)
        tokens, targets = tokenizer.tokenize_conversation(CONVERSATION, return_target=True, add_generation_prompt=False)
        assert len(tokens) > 3 and (targets == tokens).all(), prompt_format


# --------------------------------------------------------------------------- 3: packed rows


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prompt_format,cp", [("nemotron-h-aligned", 1), ("nemotron-h-aligned", 2),
                                              ("nemotron-nano-v2", 1)])
def test_packed_rows_with_the_real_tokenizer(tokenizer_dir, tmp_path, prompt_format, cp):
    tokenizer, _ = megatron_tokenizer(tokenizer_dir, prompt_format)
    write_sft(str(tmp_path), lines=12, seed=3)
    path = str(tmp_path / "mixed.jsonl")
    records = [json.loads(line) for line in open(path)]
    pack_length = 256
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=pack_length, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, context_parallel_size=cp,
    )
    low_level = SFTJsonlDataset(path)
    indices = np.arange(len(low_level), dtype=np.int32)
    split = dict(dataset=low_level, dataset_path=path, indices=indices, num_samples=len(low_level),
                 index_split=Split.train, config=config)  # SFTDataset's parameters, as the builder passes them
    ours = sft_dataset_class(CHANNELS.__getitem__)(**split)
    megatron = SFTDataset(**split)
    suffix = "\n<SPECIAL_12>\n" if prompt_format == "nemotron-nano-v2" else "\n"

    multi = 0
    for idx, record in enumerate(records):
        row, expected = ours[idx], megatron[idx]
        for key, want in expected.items():
            assert torch.equal(row[key], want), f"line {idx + 1}: {key}"
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        cu = row["cu_seqlens"].tolist()
        sequences = next(i for i in range(1, len(cu)) if cu[i] == pack_length)
        assert sequences == len(answers), f"line {idx + 1}: all conversations fit in {pack_length} tokens"
        multi += sequences > 1
        assert row["channels"][:sequences].tolist() == [CHANNELS[record["channel"]]] * sequences
        assert (row["channels"][sequences:] == -1).all()
        assert row["tokens"].dtype == row["labels"].dtype == torch.int64 and row["loss_mask"].dtype == torch.float32
        for k, answer in enumerate(answers):
            span = slice(cu[k], cu[k + 1])
            mask = row["loss_mask"][span].bool()
            assert mask.any(), f"line {idx + 1}: conversation {k} has no loss tokens"
            assert hf(tokenizer).decode(row["labels"][span][mask].tolist()) == answer + suffix
            # Positions restart at every conversation.
            assert row["position_ids"][cu[k]] == 0
        assert int(row["loss_mask"].sum()) == sum(len(a.encode()) + len(hf(tokenizer).encode(suffix, add_special_tokens=False)) for a in answers)
    assert multi > 0  # some rows pack several conversations
