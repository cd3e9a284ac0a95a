#!/usr/bin/env python
"""Static blend weights against the channel-mixture policies, at the same seeds and token budget.

Each run trains configs/tiny_gpt_blend.sh's GPT through Megatron's pretrain() (--cpu without a
GPU) for --iters iterations on a blend of the demo's channels: `count` (learnable), `copy`
(learnable only by copying from context) and `noise` (uniform random tokens, unlearnable: its
floor is ln 63 = 4.14). It reads the final validation loss of each channel from the channel jsonl.
Two blends: the demo's (0.25 / 0.35 / 0.4) and one where the unlearnable channel holds most of the
weight (0.1 / 0.1 / 0.8). Policies: static (the blend as given), learning-progress (train and
validation signal) and target-loss. Every arm runs at each of --seeds (model init and data order).

The table gives, per blend and arm, the final validation loss of each channel and the mean over
the learnable channels (copy, count), as mean +- standard deviation over seeds, and each arm's
difference from static on that mean with its standard error (paired by seed). "gain" means the
mean learnable loss is lower than static's by more than twice that standard error.

    python scripts/bench_mixture.py                        # writes docs/mixture.md's results
    python scripts/bench_mixture.py --iters 100 --seeds 1 2 --no-write-doc
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "configs", "tiny_gpt_blend.sh")
DOC = os.path.join(ROOT, "docs", "mixture.md")
BEGIN, END = "<!-- bench_mixture: begin -->", "<!-- bench_mixture: end -->"
CHANNELS = ("copy", "count", "noise")
LEARNABLE = ("copy", "count")
BLENDS = {"demo blend (0.25 / 0.35 / 0.4)": (0.25, 0.35, 0.4),
          "unlearnable-heavy blend (0.1 / 0.1 / 0.8)": (0.1, 0.1, 0.8)}
LP = ["--channel-mixture", "learning-progress"]
ARMS = {
    "static": [],
    "learning-progress (defaults: validation signal, min-share 0.15)": LP,
    "learning-progress (train signal, min-share 0.05)": [*LP, "--channel-mixture-signal", "train",
                                                         "--channel-mixture-min-share", "0.05"],
    "learning-progress (validation signal, min-share 0.05)": [*LP, "--channel-mixture-signal", "validation",
                                                              "--channel-mixture-min-share", "0.05"],
    "target-loss (train signal, min-share 0.05)": [
        "--channel-mixture", "target-loss", "--channel-target-loss", "copy=1.0", "count=0.1",
        f"noise={math.log(63):.4f}", "--channel-mixture-signal", "train", "--channel-mixture-min-share", "0.05"],
}
# How the defaults were chosen: learning-progress with the train signal and min-share 0.05 on the
# unlearnable-heavy blend, one setting changed at a time (the signal is compared in ARMS).
SWEEP_BLEND = "unlearnable-heavy blend (0.1 / 0.1 / 0.8)"
SWEEP_BASE = "learning-progress (train signal, min-share 0.05)"
SWEEP = {
    "... interval 10": [*ARMS[SWEEP_BASE], "--channel-mixture-interval", "10"],
    "... interval 40": [*ARMS[SWEEP_BASE], "--channel-mixture-interval", "40"],
    "... min-share 0.02": [*ARMS[SWEEP_BASE], "--channel-mixture-min-share", "0.02"],
    "... min-share 0.15": [*ARMS[SWEEP_BASE], "--channel-mixture-min-share", "0.15"],
}


def run(opts, data_dir: str, weights, arm: str, seed: int) -> dict[str, float]:
    """One run; the final validation loss of each channel."""
    from megatron_channel.channel_logging.jsonl_schema import ValidationRecord, read_jsonl

    slug = re.sub(r"\W+", "_", arm).strip("_")
    run_dir = os.path.join(opts.run_dir, f"{slug}_{'-'.join(map(str, weights))}_{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    blend = [x for w, name in zip(weights, CHANNELS) for x in (str(w), f"{data_dir}/{name}")]
    flags_of_arm = {**ARMS, **SWEEP}[arm]
    mixture = ["--channel-mixture-interval", str(opts.interval), *flags_of_arm] if flags_of_arm else []
    flags = ["--train-iters", str(opts.iters), "--seed", str(seed), "--eval-interval", str(opts.interval),
             "--eval-iters", str(opts.eval_iters), "--log-interval", str(opts.interval), *mixture,
             "--data-path", *blend, *(["--cpu"] if opts.cpu else [])]
    env = {**os.environ, "DATA_DIR": data_dir, "RUN_DIR": run_dir, "NPROC": str(opts.nproc), "PYTHONWARNINGS": "ignore",
           "LAUNCHER": f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node {opts.nproc}"}
    proc = subprocess.run([CONFIG, *flags], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} {weights} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [r for r in read_jsonl(os.path.join(run_dir, "tensorboard", "channels.jsonl"))
               if isinstance(r, ValidationRecord) and r.split == "validation"]
    final = records[-1]
    return {name: final.channels[name].loss for name in CHANNELS}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(results, seeds, blends=BLENDS, arms=ARMS) -> str:
    lines = []
    for blend in blends:
        lines += [f"### {blend}", "",
                  "| arm | copy | count | noise | mean learnable | vs static (paired) | verdict |",
                  "|---|---|---|---|---|---|---|"]
        static = [statistics.mean(results[blend]["static"][s][c] for c in LEARNABLE) for s in seeds]
        for arm in arms:
            per_seed = results[blend][arm]
            learnable = [statistics.mean(per_seed[s][c] for c in LEARNABLE) for s in seeds]
            cells = [mean_sd([per_seed[s][c] for s in seeds]) for c in CHANNELS]
            if arm == "static":
                diff, verdict = "", "baseline"
            else:
                deltas = [a - b for a, b in zip(learnable, static)]
                err = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else float("nan")
                d = statistics.mean(deltas)
                diff = f"{d:+.3f} +- {err:.3f}"
                verdict = ("gain" if d < -2 * err else "loss" if d > 2 * err else "no difference beyond seed noise")
            lines.append(f"| {arm} | {' | '.join(cells)} | {mean_sd(learnable)} | {diff} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--interval", type=int, default=20, help="mixture, log and evaluation interval")
    parser.add_argument("--eval-iters", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", default=None)
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "bench_mixture"))
    parser.add_argument("--no-write-doc", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="skip the table of the defaults")
    opts = parser.parse_args()
    import torch

    if opts.cpu is None:
        opts.cpu = not torch.cuda.is_available()
    data_dir = os.path.join(opts.run_dir, "tiny_data")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_data.py"), "--out", data_dir],
                   check=True, capture_output=True)
    results: dict = {}
    started = datetime.datetime.now()
    for blend, weights in BLENDS.items():
        for arm in ARMS:
            for seed in opts.seeds:
                losses = run(opts, data_dir, weights, arm, seed)
                results.setdefault(blend, {}).setdefault(arm, {})[seed] = losses
                print(f"{blend} | {arm} | seed {seed} | " + " | ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                      flush=True)
    if not opts.no_sweep:
        for arm in SWEEP:
            for seed in opts.seeds:
                losses = run(opts, data_dir, BLENDS[SWEEP_BLEND], arm, seed)
                results[SWEEP_BLEND][arm] = {**results[SWEEP_BLEND].get(arm, {}), seed: losses}
                print(f"{SWEEP_BLEND} | {arm} | seed {seed} | "
                      + " | ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    minutes = (datetime.datetime.now() - started).total_seconds() / 60
    body = table(results, opts.seeds)
    if not opts.no_sweep:
        body += (f"\n### Choosing the defaults: `{SWEEP_BASE}` on the {SWEEP_BLEND}, one setting changed\n\n"
                 + table(results, opts.seeds, blends={SWEEP_BLEND: None},
                         arms={"static": [], SWEEP_BASE: [], **SWEEP}).split("\n", 2)[2])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (
        ", --cpu" if opts.cpu else f", {torch.cuda.get_device_name()}")
    section = (f"{BEGIN}\n`python scripts/bench_mixture.py --iters {opts.iters} --interval {opts.interval} "
               f"--eval-iters {opts.eval_iters} --seeds {' '.join(map(str, opts.seeds))}` on {machine}, "
               f"{opts.nproc} ranks, {datetime.date.today()} ({minutes:.0f} minutes). Final validation loss per "
               f"channel, mean +- sd over {len(opts.seeds)} seeds; the same token budget "
               f"({opts.iters} iterations x 16 x 128 tokens) in every arm.\n\n{body}{END}")
    print(section)
    if not opts.no_write_doc:
        text = open(DOC).read() if os.path.exists(DOC) else ""
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text += "\n" + section + "\n"
        with open(DOC, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
