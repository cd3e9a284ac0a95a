"""CPU demo: a small real Megatron-Core GPTModel trained on a 3-channel blend over 2 gloo ranks.

The data goes through the same path as a real run: three indexed datasets (.bin/.idx,
written with Megatron's IndexedDatasetBuilder) blended by Megatron's
BlendedMegatronDatasetBuilder from the flags ``--data-path 0.25 copy 0.35 count 0.4 noise
--channels-from-blend``, tagged with channels, read by Megatron's data sampler, and fed to
``make_forward_step``. The channels differ clearly in difficulty:

  copy   documents repeat a short random motif: learnable once the model copies from context
  count  tokens count up from a random start: learnable from the previous token alone
  noise  uniform random tokens: cannot be learned, stays at ln(vocab size)

Megatron's ``pretrain()`` needs CUDA, so this loop does its job on the CPU: two
data-parallel ranks, gradient all-reduce, per-channel logging with the same accounting and
names ``install_channel_logging`` gives a real run (console line, TensorBoard, jsonl), then
a PNG of the curves.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from make_tiny_data import CHANNELS, VOCAB, make_tiny_data

SEQ = 64
WEIGHTS = ("0.25", "0.35", "0.4")


def megatron_args(data_dir: str, micro_batch_size: int):
    """Megatron's own argument namespace, from Megatron's parser plus the channel flags."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_channel.arguments import add_channel_args

    parser = add_channel_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    blend = [x for w, c in zip(WEIGHTS, CHANNELS) for x in (w, os.path.join(data_dir, c))]
    args = parser.parse_args([
        "--data-path", *blend, "--channels-from-blend",
        "--seq-length", str(SEQ), "--micro-batch-size", str(micro_batch_size),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        "--split", "95,5,0", "--data-cache-path", os.path.join(data_dir, "cache"),
    ])
    args.rank, args.world_size = dist.get_rank(), dist.get_world_size()  # as Megatron's parse_args sets them
    return args


def loader(dataset, micro_batch_size: int, rank: int, world_size: int):
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    sampler = MegatronPretrainingSampler(len(dataset), 0, micro_batch_size, rank, world_size)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0))


def iteration_totals(forward_step, data, model, config, microbatches: int, train: bool):
    """Run microbatches; return this iteration's global ``[K + 1, 2]`` totals and token count."""
    from megatron_channel.channel_logging import reduce_captured, split_channel_metrics

    captured, tokens = [], torch.zeros((), dtype=torch.int64)
    for _ in range(microbatches):
        output, loss_func = forward_step(data, model)
        loss, num_tokens, metrics = loss_func(output)
        if train:
            loss.backward()
        tokens += num_tokens
        captured.append(split_channel_metrics(metrics, config)[0])
    return reduce_captured(captured, group=dist.group.WORLD), tokens


def train(rank: int, world_size: int, opts: argparse.Namespace) -> None:
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_channel import make_forward_step
    from megatron_channel.arguments import channel_settings_from_args
    from megatron_channel.channel_logging import (
        ChannelAccountant, ChannelStats, append_jsonl, console_fields, train_record, train_scalars,
        validation_console_fields, validation_record, validation_scalars,
    )
    from megatron_channel.launch import build_datasets
    from megatron_channel.testing import init_parallel, tiny_gpt

    logging.getLogger("megatron").setLevel(logging.ERROR)  # dataset-index chatter, deprecation notes
    init_parallel(tp=1)
    data_dir = os.path.join(opts.out, "data")
    args = megatron_args(data_dir, opts.micro_batch_size)
    settings = channel_settings_from_args(args)
    config = settings.channel_config()
    global_batch = opts.micro_batch_size * opts.num_microbatches * world_size
    evals = opts.train_iters // opts.eval_interval + 1
    train_ds, valid_ds, _ = build_datasets(
        args, settings, build_tokenizer(args),
        [opts.train_iters * global_batch, evals * opts.eval_iters * global_batch, 0],
    )
    train_data = loader(train_ds, opts.micro_batch_size, rank, world_size)

    torch.manual_seed(0)  # identical initial weights on both data-parallel ranks
    model = tiny_gpt(vocab_size=VOCAB, seq_length=SEQ, hidden=64, layers=2, heads=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    forward_step = make_forward_step(config)
    accountant = ChannelAccountant(config)
    writer = None
    jsonl = os.path.join(opts.out, "channels.jsonl")
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(opts.out, "tensorboard"))
        if os.path.exists(jsonl):
            os.remove(jsonl)

    def evaluate(iteration: int) -> None:
        model.eval()
        valid_data = loader(valid_ds, opts.micro_batch_size, rank, world_size)
        with torch.no_grad():
            totals = sum(iteration_totals(forward_step, valid_data, model, config, opts.num_microbatches, False)[0]
                         for _ in range(opts.eval_iters))
        model.train()
        stats = ChannelStats.from_totals(config.channels, totals, opts.eval_iters)
        if rank == 0:
            lm = stats.lm_loss()
            losses = "".join(f" {key} value: {stats.loss(i):.4E} |" for i, key in enumerate(config.metric_keys())
                             if stats.loss(i) is not None)
            print(f" validation loss at iteration {iteration} | lm loss value: {lm:.4E} |{losses}"
                  f"{validation_console_fields(stats, config)}", flush=True)
            for key, value in {"lm loss validation": lm, **validation_scalars(stats, config)}.items():
                writer.add_scalar(key, value, iteration)
            append_jsonl(jsonl, validation_record(stats, iteration))

    start = time.time()
    for iteration in range(1, opts.train_iters + 1):
        optimizer.zero_grad(set_to_none=True)
        totals, tokens = iteration_totals(forward_step, train_data, model, config, opts.num_microbatches, True)
        # Per-token mean over the global batch (Megatron's --calculate-per-token-loss).
        dist.all_reduce(tokens)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= tokens
        optimizer.step()
        accountant.add_iteration(totals)
        if rank == 0:
            scalars = train_scalars(accountant.tensorboard_report(), config)
            for key, value in {"lm loss": float(totals[-1, 0] / totals[-1, 1]), **scalars}.items():
                writer.add_scalar(key, value, iteration)
        if iteration % opts.log_interval == 0:
            report = accountant.console_report()
            if rank == 0:
                elapsed = (time.time() - start) * 1000 / opts.log_interval
                start = time.time()
                print(f" iteration {iteration:6d}/{opts.train_iters:6d} | elapsed time per iteration (ms): "
                      f"{elapsed:.1f} | lm loss: {report.window.lm_loss():.4E} |{console_fields(report, config)}",
                      flush=True)
                append_jsonl(jsonl, train_record(report, iteration))
        if iteration % opts.eval_interval == 0 or iteration == opts.train_iters:
            evaluate(iteration)
    if rank == 0:
        writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run directory (data, TensorBoard, jsonl, PNG)")
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    opts = parser.parse_args(argv)
    opts.out = os.path.abspath(opts.out)
    make_tiny_data(os.path.join(opts.out, "data"))

    from megatron_channel.testing import run_distributed

    print(f"training a tiny GPT on the CPU over 2 data-parallel gloo ranks, channels {', '.join(CHANNELS)}")
    print(f"(noise cannot be learned: its floor is ln({VOCAB - 1}) = {math.log(VOCAB - 1):.3f})", flush=True)
    run_distributed(train, 2, opts, timeout=900)

    import plot_channels

    png = os.path.join(opts.out, "channels.png")
    plot_channels.main([os.path.join(opts.out, "channels.jsonl"), "-o", png,
                        "--title", "CPU demo: tiny GPT on a 3-channel blend, 2 data-parallel ranks"])
    print(f"TensorBoard events: {os.path.join(opts.out, 'tensorboard')}  (tensorboard --logdir {opts.out})")
    print(f"jsonl log:          {os.path.join(opts.out, 'channels.jsonl')}")
    print(f"curves:             {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
