#!/usr/bin/env python
"""End-to-end cost on a GPU: iteration time through Megatron's pretrain() with and without
channel tracking, side by side (needs CUDA; the data comes from scripts/make_tiny_data.py).

Runs configs/tiny_gpt_blend.sh ROUNDS times in each mode, alternating, with --log-interval 1,
reads Megatron's "elapsed time per iteration (ms)" of every iteration after the warm-up, and
prints the median of each mode and their ratio (target: at most 1.005).

    python scripts/bench_pretrain.py [--iters 200] [--warmup 30] [--rounds 2] [-- extra Megatron flags]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELAPSED = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def run(mode: str, iters: int, data_dir: str, run_dir: str, extra: list[str]) -> dict[int, float]:
    flags = ["--train-iters", str(iters), "--log-interval", "1", "--eval-interval", str(10 * iters),
             "--eval-iters", "0", *extra]
    if mode == "stock":
        flags.append("--disable-channel-loss")
    env = {**os.environ, "DATA_DIR": data_dir, "RUN_DIR": os.path.join(run_dir, mode)}
    proc = subprocess.run([os.path.join(ROOT, "configs", "tiny_gpt_blend.sh"), *flags], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return {int(m.group(1)): float(m.group(2)) for m in ELAPSED.finditer(proc.stdout)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "runs", "tiny_data"))
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "bench_pretrain"))
    parser.add_argument("extra", nargs="*", help="more Megatron flags (after --)")
    opts = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_pretrain needs a CUDA GPU (Megatron's pretrain() is CUDA-only)")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_data.py"), "--out", opts.data_dir],
                   check=True)
    times = {"stock": [], "channels": []}
    for _ in range(opts.rounds):
        for mode in ("stock", "channels"):
            per_iter = run(mode, opts.iters, opts.data_dir, opts.run_dir, opts.extra)
            times[mode] += [t for i, t in per_iter.items() if i > opts.warmup]
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    ratio = medians["channels"] / medians["stock"]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for mode, ts in times.items():
        print(f"{mode:9s} median {medians[mode]:.3f} ms/iteration over {len(ts)} iterations")
    print(f"channels/stock = {ratio:.4f} -> {'PASS' if ratio <= 1.005 else 'FAIL'} (target <= 1.005)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
