"""CPU demo: a small real Megatron-Core GPTModel trained over 2 gloo ranks (data parallel),
printing per-channel losses the way Megatron prints ``lm loss``.

Three synthetic channels of clearly different difficulty:
  copy   - the row repeats a short random motif (easy once induction is learned)
  count  - tokens count up from a random start modulo the vocabulary (easy)
  noise  - uniform random tokens (cannot be learned: stays near ln(vocab))
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist

from megatron_channel import ChannelConfig, make_forward_step, reduce_channel_metrics
from megatron_channel.testing import init_parallel, run_distributed, tiny_gpt

VOCAB, SEQ = 64, 32
CONFIG = ChannelConfig(["copy", "count", "noise"])


def make_row(channel: int, gen: torch.Generator) -> torch.Tensor:
    if channel == 0:
        motif = torch.randint(0, VOCAB, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen)
        return motif.repeat(SEQ // motif.numel() + 2)[: SEQ + 1]
    if channel == 1:
        start = int(torch.randint(0, VOCAB, (1,), generator=gen))
        return (torch.arange(SEQ + 1) + start) % VOCAB
    return torch.randint(0, VOCAB, (SEQ + 1,), generator=gen)


def make_batch(rows: int, gen: torch.Generator) -> dict:
    channels = torch.randint(0, CONFIG.num_channels, (rows,), generator=gen)
    data = torch.stack([make_row(int(c), gen) for c in channels])
    return dict(
        tokens=data[:, :-1], labels=data[:, 1:], loss_mask=torch.ones(rows, SEQ),
        position_ids=torch.arange(SEQ).expand(rows, SEQ),
        attention_mask=torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).expand(rows, 1, SEQ, SEQ),
        channels=channels,
    )


def train(rank: int, world_size: int, steps: int, microbatches: int, log_interval: int) -> None:
    init_parallel(tp=1)
    torch.manual_seed(0)  # identical initial weights on every data-parallel rank
    model = tiny_gpt(vocab_size=VOCAB, seq_length=SEQ, hidden=64, layers=2, heads=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    forward_step = make_forward_step(CONFIG)
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        metrics, total_tokens = [], torch.zeros((), dtype=torch.int)
        for _ in range(microbatches):
            output, loss_func = forward_step(iter([make_batch(4, gen)]), model)
            loss, num_tokens, mb_metrics = loss_func(output)
            loss.backward()
            total_tokens += num_tokens
            metrics.append(mb_metrics)
        # Per-token mean over the global batch, as Megatron does with calculate_per_token_loss.
        dist.all_reduce(total_tokens)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= total_tokens
        optimizer.step()
        reduced = reduce_channel_metrics(metrics)
        if rank == 0 and step % log_interval == 0:
            fields = " | ".join(f"{k}: {v:.4E}" for k, v in reduced.items())
            print(f" iteration {step:6d}/{steps:6d} | {fields} |", flush=True)
    if rank == 0:
        print(f"(noise cannot be learned: its floor is ln({VOCAB}) = {math.log(VOCAB):.4f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-iters", type=int, default=60)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--log-interval", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"training a {CONFIG.num_channels}-channel tiny GPT on the CPU, 2 data-parallel gloo ranks")
    run_distributed(train, 2, args.train_iters, args.num_microbatches, args.log_interval, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
