#!/usr/bin/env python
"""Write the tiny datasets the demo and the configs/ runs train on (no downloads).

  DIR/copy, DIR/count, DIR/noise    Megatron indexed datasets (.bin/.idx), one per channel:
                                    copy repeats a short random motif, count counts up
                                    modulo the vocabulary, noise is uniform random tokens
  DIR/sft/mixed.jsonl               SFT conversations whose lines name their channel
                                    ("math", "code", "chat") in a "channel" field
  DIR/sft/unlabeled.jsonl           SFT conversations without a channel field (they take
                                    their blend component's channel, or the untracked policy)

Token ids of the indexed datasets are below VOCAB - 1; VOCAB - 1 is the end-of-document id
of Megatron's NullTokenizer with --vocab-size VOCAB.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

VOCAB = 64
EOD = VOCAB - 1
CHANNELS = ("copy", "count", "noise")


def write_documents(path_prefix: str, channel: str, count: int, seed: int) -> None:
    """One indexed dataset of ``count`` documents of one channel's kind."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(path_prefix + ".bin", dtype=np.int32)
    for _ in range(count):
        length = int(rng.integers(48, 160))
        if channel == "copy":
            doc = np.resize(rng.integers(0, EOD, int(rng.integers(3, 9))), length)
        elif channel == "count":
            doc = (np.arange(length) + rng.integers(0, EOD)) % EOD
        else:
            doc = rng.integers(0, EOD, length)
        builder.add_document(torch.from_numpy(doc.astype(np.int32)), [length])
    builder.finalize(path_prefix + ".idx")


def conversation(rng: np.random.Generator, channel: str | None) -> list[dict]:
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    question, answer = {
        "math": (f"what is {a} plus {b}?", f"{a + b}"),
        "code": (f"write {a} in hex", f"{a:#x}"),
        "chat": ("how are you?", "fine, thanks" if a % 2 else "very well"),
        None: ("say hi", "hi"),
    }[channel]
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def write_sft(directory: str, lines: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "mixed.jsonl"), "w") as f:
        for _ in range(lines):
            channel = ("math", "code", "chat")[int(rng.integers(0, 3))]
            messages = [m for _ in range(int(rng.integers(1, 4))) for m in conversation(rng, channel)]
            f.write(json.dumps({"messages": messages, "channel": channel}) + "\n")
    with open(os.path.join(directory, "unlabeled.jsonl"), "w") as f:
        for _ in range(lines):
            f.write(json.dumps({"messages": conversation(rng, None)}) + "\n")


def make_tiny_data(out: str, documents: int = 400, sft_lines: int = 200) -> None:
    os.makedirs(out, exist_ok=True)
    for seed, channel in enumerate(CHANNELS):
        write_documents(os.path.join(out, channel), channel, documents, seed)
    write_sft(os.path.join(out, "sft"), sft_lines, seed=len(CHANNELS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny_data")
    parser.add_argument("--documents", type=int, default=400, help="documents per indexed dataset")
    parser.add_argument("--sft-lines", type=int, default=200, help="lines per SFT jsonl file")
    opts = parser.parse_args(argv)
    make_tiny_data(opts.out, opts.documents, opts.sft_lines)
    print(f"wrote tiny datasets to {os.path.abspath(opts.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
