#!/usr/bin/env python
"""What per-channel accounting costs per microbatch, measured side by side in one run.

Variants, each on the same per-token losses of one packed (THD) microbatch:
  stock      Megatron's pretrain_gpt loss_func (no channels)
  ours       channel_loss_func (validate=False: the checks run where the batch is built)
  ours+acc   ours with token accuracy (ChannelConfig(token_accuracy=True)): the masked losses,
             the masked correct-token flags and the mask summed per sequence and per channel in
             one pass, plus the all-token count. The flags come as make_forward_step hands them
             over, already multiplied by the loss mask where the model made them
  2-pass     a reference, kept in this script only: ours+acc as it was before, the per-channel
             sums run twice (losses with the mask, then flags with the mask) by today's functions
  loop       per-sequence Python loop: slice each sequence, mask, sum, add to its channel
             (what peers did before vectorizing, ms-swift's method before mid-2026)
  ms-swift   ms-swift's current method, written from its description: per-token channel ids,
             one index_add_ of the masked losses and one of the mask into per-channel bins,
             then on every microbatch an all_gather_object of the key lists and an all_reduce
             of the values (over a 1-rank gloo group here: the collectives' fixed cost only)
  prefix     on the CPU only: ours through the torch path GPU tensors take (prefix scans),
             to show why CPU tensors are summed with numpy instead

The accuracy's other half runs in the model's loss step (``output_processor``): one read of
the logits for the max and the label's logit. Timed against Megatron's cross entropy over
the same logits (T tokens x V vocabulary), and, over two gloo ranks, its one extra TP
all-reduce (MAX of [2, T] float32) against the three that the cross entropy makes itself.

Grid: tokens per microbatch T, sequences, channels K. Each packed microbatch comes as
training hands it to the loss: a fixed-length list of C sequence slots (C = micro_batch_size x
256, ``--max-packed-sequences-per-row``'s default, for rows of 4096 tokens: C = T / 16; more,
shorter rows where 256 per row would not hold the sequences), the real sequences first, then
zero-length slots with channel -1, as ``compact_sequences`` lays them out. At K=16 also the
exact list (C = the sequences, no empty slot) that a caller of channel_loss_func may pass.
CPU always (1 thread, timed with perf_counter); CUDA when available (CUDA events). Median of
many runs after warm-up. On CUDA also the extra peak memory of ours over stock, in bytes per
token.

Also a small GPT training step (a 64-token, 4-row microbatch of the tiny blend, forward +
backward + loss) with stock loss, stock loss again (the noise floor) and ours, in shuffled
order, each step against the stock step of its round, repeated in several fresh processes,
to put the accounting cost in proportion.

    python scripts/bench_channel_loss.py                 # full grid, writes docs/performance.md
    python scripts/bench_channel_loss.py --quick         # a small grid, prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # megatron_testing: real models on a CPU over gloo


def loop_loss_func(loss_mask, output_tensor, cu_seqlens, channels, config):
    """The per-sequence loop: host-side boundaries, one slice and sum per sequence."""
    from megatron_channel.step.loss import stock_loss_func

    loss, num_tokens, metrics = stock_loss_func(loss_mask, output_tensor)
    losses, mask = output_tensor.view(-1).float(), loss_mask.view(-1).float()
    sums = {key: torch.zeros(2, device=losses.device) for key in config.metric_keys()}
    bounds, ids = cu_seqlens.tolist(), channels.tolist()
    keys = config.metric_keys()
    for i in range(len(bounds) - 1):
        if ids[i] < 0:
            continue
        a, b = bounds[i], bounds[i + 1]
        piece = mask[a:b]
        sums[keys[ids[i]]] += torch.stack([(losses[a:b] * piece).sum(), piece.sum()])
    metrics.update(sums)
    return loss, num_tokens, metrics


def swift_loss_func(loss_mask, output_tensor, cu_seqlens, channels, config):
    """ms-swift's per-channel loss as it describes it: per-token channel ids, one ``index_add_``
    per microbatch, then the key agreement (all_gather_object of the key lists) and an
    all_reduce of the values on every microbatch."""
    from megatron_channel.step.loss import stock_loss_func

    loss, num_tokens, metrics = stock_loss_func(loss_mask, output_tensor)
    losses, mask = output_tensor.view(-1).float(), loss_mask.view(-1).float()
    k = config.num_channels
    token_channel = torch.repeat_interleave(channels.long() % (k + 1), cu_seqlens.diff().long())
    sums = torch.zeros(k + 1, 2, device=losses.device)
    sums.index_add_(0, token_channel, torch.stack([losses * mask, mask], 1))
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, config.metric_keys())
    dist.all_reduce(sums)
    metrics.update(zip(config.metric_keys(), sums[:k].unbind(0)))
    return loss, num_tokens, metrics


def two_pass_loss_func(loss_mask, output_tensor, cu_seqlens, channels, config, correct):
    """ours+acc before the one-pass sums (a reference for the table, not used in training): the
    stock terms, then the per-channel sums of the masked losses with the mask, then the same
    sums again over the masked correct-token flags with the mask, by today's functions."""
    from megatron_channel.names import TOKEN_ACC_KEY
    from megatron_channel.segment_math import sequence_channel_totals
    from megatron_channel.step.loss import stock_loss_terms

    mask = loss_mask.view(-1).float()
    masked_losses = output_tensor.view(-1).float() * mask
    loss, num_tokens, metrics = stock_loss_terms(masked_losses, mask)
    ids = channels.reshape(-1)

    def per_channel(values):
        return sequence_channel_totals((values, mask), cu_seqlens, ids, config.num_channels)

    totals = per_channel(masked_losses.detach())
    masked_correct = correct.detach().reshape(-1).float() * mask
    metrics[TOKEN_ACC_KEY] = torch.stack([masked_correct.sum(), mask.sum()])
    accuracy = per_channel(masked_correct)
    for key, acc_key, total, right in zip(config.metric_keys(), config.accuracy_keys(), totals, accuracy):
        metrics[key], metrics[acc_key] = total, right
    return loss, num_tokens, metrics


ROW_TOKENS = 4096  # --seq-length of the benchmark's packed rows
SEQUENCES_PER_ROW = 256  # --max-packed-sequences-per-row's default


def fixed_slots(tokens: int, sequences: int) -> int:
    """C, the sequence slots training hands the loss: micro_batch_size x 256 for rows of 4096
    tokens, or as many (shorter) rows as 256 sequences per row need."""
    rows = max(tokens // ROW_TOKENS, -(-sequences // SEQUENCES_PER_ROW), 1)
    return rows * SEQUENCES_PER_ROW


def make_case(tokens: int, sequences: int, num_channels: int, device: torch.device, seed: int = 0,
              slots: int | None = None):
    """One packed microbatch: ``sequences`` random-length sequences over ``tokens`` tokens, in a
    list of ``slots`` (default: exactly the sequences) with zero-length slots of channel -1 after."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_channel import ChannelConfig

    slots = sequences if slots is None else slots
    if slots < sequences:
        raise ValueError(f"{sequences} sequences do not fit in {slots} slots")
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=gen)[: sequences - 1].sort().values + 1
    cu = torch.cat([torch.tensor([0]), cuts, torch.full((slots - sequences + 1,), tokens)]).to(torch.int32)
    channels = torch.randint(-1, num_channels, (sequences,), generator=gen)
    channels = torch.cat([channels, torch.full((slots - sequences,), -1)])
    output = torch.rand(1, tokens, generator=gen) * 8
    mask = (torch.rand(1, tokens, generator=gen) > 0.3).float()
    config = ChannelConfig([f"c{i}" for i in range(num_channels)])
    cu, channels, output, mask = (t.to(device) for t in (cu, channels, output, mask))
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    return output, mask, cu, channels, config, packed


def timer(device: torch.device):
    """median_us(fn, runs): median wall time of fn in microseconds after warm-up."""
    if device.type == "cuda":
        def median_us(fn, runs):
            for _ in range(10):
                fn()
            times = []
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1000)
            return statistics.median(times)
    else:
        def median_us(fn, runs):
            for _ in range(max(2, runs // 10)):
                fn()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e6)
            return statistics.median(times)
    return median_us


def extra_peak_bytes_per_token(ours, stock, tokens: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    peaks = []
    for fn in (stock, ours):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    return (peaks[1] - peaks[0]) / tokens


def bench_grid(device: torch.device, grid, runs: int) -> list[dict]:
    from megatron_channel import channel_loss_func
    from megatron_channel.step.loss import stock_loss_func
    from megatron_channel.step.token_accuracy import CorrectTokens

    median_us = timer(device)
    rows = []
    for tokens, sequences, num_channels, slots in grid:
        output, mask, cu, channels, config, packed = make_case(tokens, sequences, num_channels, device, slots=slots)
        accuracy_config = dataclasses.replace(config, token_accuracy=True)
        correct = (torch.rand(output.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float().to(device)
        # As make_forward_step hands them over: multiplied by the loss mask where the model made them.
        correct_tokens = CorrectTokens(loss_mask=mask, flags=correct * mask)

        def stock():
            return stock_loss_func(mask, output)

        def ours():
            return channel_loss_func(output, loss_mask=mask, channels=channels, config=config,
                                     packed_seq_params=packed, cp_size=1, validate=False)

        def ours_accuracy():
            return channel_loss_func(output, loss_mask=mask, channels=channels, config=accuracy_config,
                                     packed_seq_params=packed, cp_size=1, validate=False, correct_tokens=correct_tokens)

        def two_pass():
            return two_pass_loss_func(mask, output, cu, channels, accuracy_config, correct)

        def loop():
            return loop_loss_func(mask, output, cu, channels, config)

        def swift():
            return swift_loss_func(mask, output, cu, channels, config)

        def prefix_path():
            from megatron_channel.segment_math import summing_like_a_gpu

            with summing_like_a_gpu():
                return ours()

        loop_runs = max(3, runs // max(1, sequences // 16))
        row = dict(device=device.type, tokens=tokens, sequences=sequences, slots=slots, channels=num_channels,
                   stock=median_us(stock, runs), ours=median_us(ours, runs),
                   ours_accuracy=median_us(ours_accuracy, runs), two_pass=median_us(two_pass, runs),
                   loop=median_us(loop, loop_runs),
                   swift=median_us(swift, runs),
                   prefix=median_us(prefix_path, runs) if device.type == "cpu" else None,
                   extra_bytes=extra_peak_bytes_per_token(ours, stock, tokens) if device.type == "cuda" else None)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


DEMO_STEP_SEQ = 64  # tokens per row of the timed microbatch


def demo_step_times(rounds: int) -> dict:
    """Forward + backward + loss of the CPU demo's model and microbatch: stock, stock again and
    ours, in a shuffled order every round. Each step is compared with the stock step of its own
    round (median of the per-round ratios), so drift of the machine over the run cancels, and
    stock again vs stock shows the noise floor. The loss_func call is also timed inside each step,
    where its code is as cold as in training, and alone, in a warm loop."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_tiny_data import VOCAB

    from megatron_channel import ChannelConfig, channel_loss_func
    from megatron_channel.step.loss import stock_loss_func
    from megatron_testing import init_parallel, tiny_gpt

    init_parallel(tp=1)
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=VOCAB, seq_length=DEMO_STEP_SEQ, hidden=64, layers=2, heads=4)
    config = ChannelConfig(["copy", "count", "noise"])
    rows = 4
    tokens = torch.randint(0, VOCAB - 1, (rows, DEMO_STEP_SEQ))
    positions = torch.arange(DEMO_STEP_SEQ).expand(rows, DEMO_STEP_SEQ)
    causal = torch.triu(torch.ones(DEMO_STEP_SEQ, DEMO_STEP_SEQ, dtype=torch.bool), 1).expand(rows, 1, DEMO_STEP_SEQ, DEMO_STEP_SEQ)
    labels = tokens.roll(-1, 1)
    mask = torch.ones(rows, DEMO_STEP_SEQ)
    channels = torch.tensor([0, 1, 2, 2])

    def ours(output):
        return channel_loss_func(output, loss_mask=mask, channels=channels, config=config, validate=False)

    def stock(output):
        return stock_loss_func(mask, output)

    arms = {"stock": stock, "stock again": stock, "ours": ours}
    step = {name: [] for name in arms}
    in_step = {name: [] for name in arms}
    order = list(arms)
    shuffle = random.Random(0).shuffle
    for i in range(rounds + 10):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            output = model(tokens, positions, causal, labels=labels)
            loss_start = time.perf_counter()
            loss, num_tokens, metrics = arms[name](output)
            loss_end = time.perf_counter()
            (loss / num_tokens).backward()
            model.zero_grad(set_to_none=True)
            del output, loss, num_tokens, metrics  # freed here, not in the next arm's step
            if i >= 10:
                step[name].append(time.perf_counter() - start)
                in_step[name].append(loss_end - loss_start)

    def paired(name):
        return statistics.median(a / b for a, b in zip(step[name], step["stock"])) - 1

    output = model(tokens, positions, causal, labels=labels)
    median_us = timer(torch.device("cpu"))
    step_us = statistics.median(step["stock"]) * 1e6
    return dict(step_stock=step_us, added=paired("ours"), noise=paired("stock again"),
                loss_in_step_stock=statistics.median(in_step["stock"]) * 1e6,
                loss_in_step_ours=statistics.median(in_step["ours"]) * 1e6,
                loss_stock=median_us(lambda: stock(output), 2000), loss_ours=median_us(lambda: ours(output), 2000),
                tokens=rows * DEMO_STEP_SEQ, rounds=rounds)


DEMO_TAG = "demo-step: "  # marks the result line of a --demo-step-only process


def demo_step_in_processes(processes: int, rounds: int) -> dict:
    """``demo_step_times`` in fresh processes one after another, each figure the median over them.

    A process's memory layout alone can move a small model's step by about 1%, whatever the
    number of rounds, so the comparison is repeated in new processes rather than only longer.
    """
    results = []
    for _ in range(processes):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--demo-step-only", "--rounds", str(rounds)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(DEMO_TAG)), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"demo step process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len(DEMO_TAG):]))
    merged = {key: statistics.median(r[key] for r in results) for key in results[0]}
    merged.update(tokens=results[0]["tokens"], rounds=results[0]["rounds"], processes=processes,
                  added_each=[r["added"] for r in results])
    return merged



HEADER = ("| device | T | seqs | slots | K | stock us | ours us | ours+acc us | 2-pass us | loop us | ms-swift us "
          "| prefix path us | ours/stock | acc/ours | 2-pass/ours | loop/ours | ms-swift/ours | extra peak B/token |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    extra = "n/a (CPU)" if r["extra_bytes"] is None else f"{r['extra_bytes']:.1f}"
    prefix = "= ours" if r["prefix"] is None else f"{r['prefix']:.1f}"
    slots = "exact" if r["slots"] is None else r["slots"]
    return (f"| {r['device']} | {r['tokens'] // 1024}k | {r['sequences']} | {slots} | {r['channels']} | "
            f"{r['stock']:.1f} | {r['ours']:.1f} | {r['ours_accuracy']:.1f} | {r['two_pass']:.1f} | {r['loop']:.1f} | "
            f"{r['swift']:.1f} | {prefix} | {r['ours'] / r['stock']:.2f} | {r['ours_accuracy'] / r['ours']:.2f} | "
            f"{r['two_pass'] / r['ours']:.2f} | {r['loop'] / r['ours']:.1f} | {r['swift'] / r['ours']:.1f} | {extra} |")


LOGITS_GRID = [(2048, 32768), (8192, 8192), (1024, 131072)]  # tokens x vocabulary (float32 logits, <= 512 MB)
LOGITS_HEADER = ("| device | T | V | Megatron cross entropy us | correct-token flags us | flags/CE |\n"
                 "|---|---|---|---|---|---|")


def bench_accuracy_in_loss_step(device: torch.device, grid, runs: int) -> list[dict]:
    """The model-side half of token accuracy against Megatron's own cross entropy (TP = 1)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_channel.step.token_accuracy import target_is_argmax

    median_us = timer(device)
    rows = []
    for tokens, vocab in grid:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(tokens, 1, vocab, generator=gen).to(device)  # [s, b, V]
        labels = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
        scratch = torch.empty_like(logits)

        def copy():
            scratch.copy_(logits)  # the cross entropy works in place: give it a fresh copy each run

        def cross_entropy():
            copy()
            return vocab_parallel_cross_entropy(scratch, labels.t(), tp_group=dist.group.WORLD)  # 1 rank

        copy_us = median_us(copy, runs)
        row = dict(device=device.type, tokens=tokens, vocab=vocab, ce=median_us(cross_entropy, runs) - copy_us,
                   flags=median_us(lambda: target_is_argmax(logits, labels), runs))
        rows.append(row)
        print(format_logits_row(row), flush=True)
    return rows


def format_logits_row(r: dict) -> str:
    return (f"| {r['device']} | {r['tokens'] // 1024}k | {r['vocab'] // 1024}k | {r['ce']:.0f} | {r['flags']:.0f} | "
            f"{r['flags'] / r['ce']:.2f} |")


COLLECTIVE_HEADER = ("| T | extra all-reduce (MAX, [2, T] float32) us | the cross entropy's 3 all-reduces ([T] each) us "
                     "| extra/CE's |\n|---|---|---|---|")


def _all_reduce_worker(rank, world_size, tokens_list, runs):
    torch.set_num_threads(1)
    out = []
    for tokens in tokens_list:
        pair, single = torch.rand(2, tokens), torch.rand(tokens)

        def ours():
            dist.all_reduce(pair, op=dist.ReduceOp.MAX)

        def megatrons():
            dist.all_reduce(single, op=dist.ReduceOp.MAX)
            dist.all_reduce(single)
            dist.all_reduce(single)

        times = {}
        for name, fn in (("ours", ours), ("ce", megatrons)):
            for _ in range(10):
                fn()
            samples = []
            for _ in range(runs):
                dist.barrier()
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e6)
            times[name] = statistics.median(samples)
        out.append(dict(tokens=tokens, **times))
    return out


def bench_tp_all_reduce(tokens_list, runs: int) -> list[dict]:
    """The one extra TP collective of token accuracy, over 2 gloo processes on this machine."""
    from megatron_testing import run_distributed

    rows = run_distributed(_all_reduce_worker, 2, tokens_list, runs, timeout=600)[0]
    for r in rows:
        print(format_collective_row(r), flush=True)
    return rows


def format_collective_row(r: dict) -> str:
    return f"| {r['tokens'] // 1024}k | {r['ours']:.0f} | {r['ce']:.0f} | {r['ours'] / r['ce']:.2f} |"


def slots_text(r: dict) -> str:
    return "exact list" if r["slots"] is None else f"{r['slots']} slots"


def targets(rows: list[dict], demo: dict | None) -> list[str]:
    """Each target of the performance issue, with the measured figure and PASS/FAIL."""
    lines = []

    def find(device, tokens, sequences, channels, fixed=True):
        """The row of that grid point, in the fixed-length list (training's) or the exact list."""
        return next((r for r in rows if (r["device"], r["tokens"], r["sequences"], r["channels"])
                     == (device, tokens, sequences, channels) and (r["slots"] is not None) == fixed), None)

    gpu = find("cuda", 131072, 256, 16)
    if gpu is None:
        lines.append("- GPU targets (T=128k, 256 sequences, K=16): not measured, no CUDA device in this run.")
    else:
        one, many = find("cuda", 131072, 1, 16), find("cuda", 131072, 4096, 16)
        checks = [
            ("ours <= 2x stock", gpu["ours"] / gpu["stock"], gpu["ours"] <= 2 * gpu["stock"]),
            ("ours <= 50 us", gpu["ours"], gpu["ours"] <= 50),
            ("loop/ours >= 20x", gpu["loop"] / gpu["ours"], gpu["loop"] >= 20 * gpu["ours"]),
            ("extra peak <= 16 B/token", gpu["extra_bytes"], gpu["extra_bytes"] <= 16),
        ]
        if one and many:
            checks.append(("4096 seqs <= 1.5x 1 seq", many["ours"] / one["ours"], many["ours"] <= 1.5 * one["ours"]))
        lines += [f"- GPU {name} ({gpu['slots']} slots): {value:.2f} -> {'PASS' if ok else 'FAIL'}"
                  for name, value, ok in checks]
    cpu_many = [r for r in rows if r["device"] == "cpu" and r["sequences"] >= 256]
    if cpu_many:
        worst = min(cpu_many, key=lambda r: r["loop"] / r["ours"])
        ok = worst["loop"] >= 10 * worst["ours"]
        lines.append(f"- CPU loop/ours >= 10x at >= 256 sequences: worst {worst['loop'] / worst['ours']:.1f}x "
                     f"(T={worst['tokens'] // 1024}k, {worst['sequences']} seqs, {slots_text(worst)}, "
                     f"K={worst['channels']}) -> {'PASS' if ok else 'FAIL'}")
    for device in sorted({r["device"] for r in rows}):
        for fixed in (True, False):
            row = find(device, 32768, 256, 16, fixed)
            if row is not None:
                ratio, before = row["ours_accuracy"] / row["ours"], row["two_pass"] / row["ours"]
                lines.append(f"- {device.upper()} ours+acc <= 1.4x ours at T=32k, 256 seqs, K=16, "
                             f"{slots_text(row)}: {ratio:.2f}x -> {'PASS' if ratio <= 1.4 else 'FAIL'} "
                             f"(the two-pass sums: {before:.2f}x)")
        mine = [r for r in rows if r["device"] == device]
        acc = statistics.median(r["ours_accuracy"] / r["ours"] for r in mine)
        two_pass = statistics.median(r["two_pass"] / r["ours"] for r in mine)
        swift = statistics.median(r["swift"] / r["ours"] for r in mine)
        worst = max(mine, key=lambda r: r["ours_accuracy"] / r["ours"])
        lines.append(f"- {device.upper()} token accuracy in loss_func: {acc:.2f}x the loss alone (median over the grid; "
                     f"worst {worst['ours_accuracy'] / worst['ours']:.2f}x at T={worst['tokens'] // 1024}k, "
                     f"{worst['sequences']} seqs, {slots_text(worst)}, K={worst['channels']}; the two-pass "
                     f"sums: {two_pass:.2f}x); ms-swift's method: {swift:.1f}x ours (median over the grid; measured, "
                     "no target)")
    if demo:
        added, noise = demo["added"], demo["noise"]
        in_step = (demo["loss_in_step_ours"] - demo["loss_in_step_stock"]) / demo["step_stock"]
        isolated = (demo["loss_ours"] - demo["loss_stock"]) / demo["step_stock"]
        spread = ""
        if demo.get("processes", 1) > 1:
            each = ", ".join(f"{100 * a:+.2f}%" for a in demo["added_each"])
            spread = f", median of {demo['processes']} fresh processes: {each}"
        lines.append(f"- CPU accounting cost in the demo's training step (forward + backward + loss, "
                     f"{demo['tokens']} tokens, {demo['step_stock'] / 1000:.2f} ms): {100 * added:+.2f}% -> "
                     f"{'PASS' if added <= 0.01 else 'FAIL'} (target <= 1%; median of per-round ratios over "
                     f"{demo['rounds']} shuffled rounds{spread}; stock again vs stock: {100 * noise:+.2f}%). The loss_func "
                     f"timed inside the step: {demo['loss_in_step_ours']:.1f} us vs stock "
                     f"{demo['loss_in_step_stock']:.1f} us, {100 * in_step:+.2f}% of the step; alone, warm: "
                     f"{demo['loss_ours']:.1f} us vs stock {demo['loss_stock']:.1f} us, {100 * isolated:+.2f}%")
    return lines


def megatron_version() -> str:
    """The installed megatron-core release (its ``__version__`` appends the git hash of the
    repository the process runs in, which is ours, not Megatron's)."""
    from megatron.core import package_info

    return f"{package_info.MAJOR}.{package_info.MINOR}.{package_info.PATCH}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU {cpu}, {os.cpu_count()} cores (benchmark on 1 thread)"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


ACCURACY_NOTE = """With `--channel-token-accuracy` the model's loss step (`GPTModel.forward(output_processor=...)`,
`megatron_channel/step/token_accuracy.py`) reads the logits once more before Megatron's cross
entropy, which works on them in place: the max over this rank's vocabulary shard and the
label's logit, per token, with no copy of the logits and no autograd history. Megatron's
cross entropy is timed on a fresh copy of the logits each run (the copy's own time
subtracted). At TP > 1 the flags need one all-reduce (MAX) of a `[2, T]` float32 tensor over
the TP group, on top of the cross entropy's own three (`[T]` each): timed below. The loss
side (`ours+acc` above) sums the masked flags in the same pass as the masked losses and the
mask (`2-pass`: a second pass over the flags and the mask, as before)."""

PER_MICROBATCH_NOTE = """Each packed microbatch reaches the loss as training hands it: after
`segment_math.compact_sequences`, one list of C sequence slots (`slots`), C = micro_batch_size x
256 (`--max-packed-sequences-per-row`'s default), the real sequences first and zero-length
slots of channel -1 after them. Here a row holds 4096 tokens, so C = T / 16, or more and
shorter rows where 256 per row would not hold the sequences (C = the sequences at 8k and 32k
tokens with 4096 sequences). `exact` rows hand the same sequences with no empty slot, as a
caller of `channel_loss_func` with its own `cu_seqlens` may. `ours+acc` sums the masked losses,
the masked correct-token flags and the mask in one pass (per sequence, then per channel);
`2-pass` is a reference kept in the benchmark only, the same numbers summed as before: the
losses with the mask, then the flags with the mask."""


def notes(demo: dict | None, rows: list[dict]) -> str:
    """The closing notes; every figure in them comes from this run."""
    accuracy = ""
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        for k in sorted({r["channels"] for r in mine}):
            ratio = statistics.median(r["ours_accuracy"] / r["ours"] for r in mine if r["channels"] == k)
            before = statistics.median(r["two_pass"] / r["ours"] for r in mine if r["channels"] == k)
            accuracy += f" {device.upper()}, K={k}: {ratio:.2f}x ours (two passes: {before:.2f}x)."
    accuracy = "\n".join(textwrap.wrap("Measured here, the median over T and sequences:" + accuracy, width=92,
                                        initial_indent="  ", subsequent_indent="  "))
    text = """## Notes

- GPU half: `./scripts/bench_gpu.sh` on a machine with CUDA runs, in under 5 minutes and
  through failures, the no-sync tests (`tests/test_no_sync_cuda.py`), Transformer Engine's THD
  attention and fused RoPE on the compacted sequence list against the stripped one
  (`scripts/check_packed_attention_gpu.py`), this benchmark's small grid with its `cuda` rows
  (`--quick`: CUDA events and the extra peak memory, printed only) and a short
  `scripts/bench_pretrain.py` (the tiny blend config through Megatron's `pretrain()` with and
  without channel tracking), then a pass/fail table. The GPU targets above (T=128k) are judged
  by the full grid: `BENCH_GPU_FULL=1 ./scripts/bench_gpu.sh`, which rewrites this file.
- Packed rows (`segment_math.sequence_channel_totals`): the value rows (masked losses and
  mask; with token accuracy also the masked correct-token flags) summed per sequence and per
  channel in one pass, every row read once and the mask's sums serving as the token count of
  the losses and of the flags. CUDA tensors: one prefix scan per row (float64 for the losses
  and the flags, float32 for the mask), each gathered at the `N + 1` sequence boundaries and
  freed before the next is built, one difference for all rows and one `index_add_` of `N`
  rows into `K + 1` bins; no value read on the host, no collective. Extra memory by
  construction: one `[T + 1]` float64 prefix at a time, 8 bytes per token (the CUDA rows
  measure it). CPU tensors: numpy's `add.reduceat` (one vectorized pass per row, no copy of
  the tokens) over the sequences that start before the last token, and one `bincount` per
  row over those, so the empty slots of the fixed-length list cost nothing; on a CPU torch's
  scan is a serial loop of about 1 ns per token and every torch op costs microseconds of
  dispatch, which is the `prefix path` column.
- Unpacked rows (the demo's layout), every device alike: the row sums of the value rows in
  float64 (one concatenation, one reduction), a `[K, R]` one-hot from comparing the row ids
  with `0..K-1`, one float64 matrix product: six ops with or without token accuracy, none
  reading a value on the host, and float64 so that no TF32 setting rounds the sums.
- Both packed paths do work independent of the number of sequences except the `N`-sized
  steps; the loop pays a slice-and-sum per sequence (several microseconds each on a CPU),
  which is why it wins only at one or a few sequences.
- Token accuracy on the loss side costs three passes over the tokens (the flags times the
  mask, their all-token sum for `token acc`, their per-sequence sums) beside the loss's five
  (losses times mask, their sum, the mask's sum, the per-sequence sums of the losses and of
  the mask), and K more `[2]` metric tensors (a fraction of a microsecond each on a CPU,
  hence the growth with K); the mask is no longer summed twice nor the sums grouped twice.
""" + accuracy + "\n"
    if demo:
        text += "\n".join(textwrap.wrap(
            f"- The demo's step is a tiny model (hidden 64, 2 layers, {demo['tokens']} tokens), so its step is "
            f"itself small-op dispatch. Inside the step the loss_func took {demo['loss_in_step_ours']:.0f} us with "
            f"channels and {demo['loss_in_step_stock']:.0f} us stock, against {demo['loss_ours']:.0f} us and "
            f"{demo['loss_stock']:.0f} us alone in a warm loop: after the forward its code and data are no longer "
            "in the CPU's caches. The whole-step figure of one process moves by a few tenths of a percent from "
            "one process to the next (memory layout), hence the median over fresh processes. Against a larger "
            "model's step the same fixed cost is proportionally smaller; on a GPU these ops are asynchronous "
            "launches.", width=92, subsequent_indent="  ")) + "\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid, fewer runs, no file written")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per variant (loop: fewer)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    parser.add_argument("--rounds", type=int, default=800, help="shuffled rounds of the demo training step")
    parser.add_argument("--demo-processes", type=int, default=5,
                        help="fresh processes the demo training-step comparison runs in (median over them)")
    parser.add_argument("--no-demo-step", action="store_true", help="skip the demo training-step comparison")
    parser.add_argument("--demo-step-only", action="store_true", help=argparse.SUPPRESS)  # one process of it
    opts = parser.parse_args(argv)

    from megatron_testing import init_single_process_group

    torch.set_num_threads(1)
    init_single_process_group()
    if opts.demo_step_only:
        print(DEMO_TAG + json.dumps(demo_step_times(opts.rounds)), flush=True)
        dist.destroy_process_group()
        return 0

    if opts.quick:
        grid = [(8192, s, k, fixed_slots(8192, s)) for s in (1, 256) for k in (2, 16)]
        runs = 30
    else:
        # Every grid point in the fixed-length list training hands the loss; at K=16 also in the
        # exact list, to show what the empty slots cost.
        grid = [(t * 1024, s, k, slots) for t in (8, 32, 128) for s in (1, 16, 256, 4096) for k in (2, 16, 64)
                for slots in ((fixed_slots(t * 1024, s), None) if k == 16 else (fixed_slots(t * 1024, s),))]
        runs = opts.runs
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(HEADER)
    rows = [row for device in devices for row in bench_grid(device, grid, runs)]
    logits_grid = [(1024, 8192)] if opts.quick else LOGITS_GRID
    print("\n" + LOGITS_HEADER)
    logits_rows = [row for device in devices for row in bench_accuracy_in_loss_step(device, logits_grid,
                                                                                    5 if opts.quick else 30)]
    print("\n" + COLLECTIVE_HEADER)
    collective_rows = bench_tp_all_reduce([8192] if opts.quick else [8192, 32768, 131072], 20 if opts.quick else 200)
    if opts.no_demo_step:
        demo = None
    elif opts.quick:
        demo = demo_step_times(20)
    else:
        demo = demo_step_in_processes(opts.demo_processes, opts.rounds)
    verdict = targets(rows, demo)
    print("\n".join(verdict))

    if not opts.quick:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        # scripts/bench_pretrain.py owns the "## End to end" sections of the same file: keep them.
        previous = open(opts.out).read() if os.path.exists(opts.out) else ""
        start = previous.find("\n## End to end")
        end_to_end = previous[start:] if start >= 0 else ""
        with open(opts.out, "w") as f:
            f.write(
                "# Per-channel accounting: what it costs\n\n"
                "Written by `python scripts/bench_channel_loss.py` (edit the script, not this file).\n\n"
                f"- date: {stamp}\n- machine: {machine()}\n"
                f"- torch {torch.__version__}, megatron-core {megatron_version()}, Python {platform.python_version()}\n"
                f"- median of {runs} runs per variant after warm-up (loop: fewer at many sequences); one packed "
                "microbatch per call; every row of this file from this one run, nothing else running; `ms-swift` "
                "is its current method from its description (per-token ids, index_add_, then an all_gather_object "
                "of the key lists and an all_reduce every microbatch, over a 1-rank gloo group)\n"
                + ("- the section \"End to end\" at the end is `scripts/bench_pretrain.py --write-doc`'s own run, "
                   "kept as it was: its date and machine are given there\n" if end_to_end else "")
                + "\n## Targets\n\n" + "\n".join(verdict) + "\n\n## Per microbatch\n\n" + PER_MICROBATCH_NOTE + "\n\n"
                + HEADER + "\n"
                + "\n".join(format_row(r) for r in rows)
                + "\n\n## Token accuracy in the model's loss step\n\n" + ACCURACY_NOTE + "\n\n" + LOGITS_HEADER + "\n"
                + "\n".join(format_logits_row(r) for r in logits_rows)
                + "\n\nIts one extra tensor-parallel collective, over 2 gloo processes on this machine "
                "(median of 200, after a barrier):\n\n" + COLLECTIVE_HEADER + "\n"
                + "\n".join(format_collective_row(r) for r in collective_rows) + "\n\n" + notes(demo, rows) + end_to_end
            )
        print(f"wrote {opts.out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
