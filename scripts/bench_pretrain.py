#!/usr/bin/env python
"""End-to-end cost of channel tracking: time per iteration of Megatron's real pretrain() loop,
with channels versus --disable-channel-loss (same data and batch path, Megatron's stock loss_func
and logging).

Each round launches one fresh torchrun run of every arm, in a random order: stock, channels and
(unless --no-stock-again) stock again, the noise floor. A run trains configs/tiny_gpt_blend.sh for
--iters iterations with --log-interval 10 and no evaluation; the script reads Megatron's "elapsed
time per iteration (ms)" from the console iteration lines after --warmup iterations and takes the
run's median. A round's ratio is channels/stock; the verdict is on the median of the round ratios
(the median over fresh processes). Target: <= 1.01 on the CPU, <= 1.005 on a GPU.

Runs on the CPU over gloo (--cpu of the launch script) unless CUDA is available; --cpu forces
the CPU. The data comes from scripts/make_tiny_data.py (written under --run-dir).

    python scripts/bench_pretrain.py                      # CPU, or GPU when CUDA is available
    python scripts/bench_pretrain.py --cpu --rounds 5 --iters 120 --warmup 20 --write-doc
    python scripts/bench_pretrain.py [options] -- [more Megatron flags]

--write-doc writes (or replaces) the section "## End to end: Megatron's pretrain() on the CPU"
(or "... on the GPU") of docs/performance.md and leaves the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata  # megatron.core.__version__ appends the git hash of the repo it sits in
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_gpt_blend.sh")
DOC = os.path.join(ROOT, "docs", "performance.md")
ELAPSED = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
LOG_INTERVAL = 10


def parse_elapsed(stdout: str, warmup: int) -> list[float]:
    """Megatron's "elapsed time per iteration (ms)" of the iteration lines after iteration `warmup`."""
    return [float(m.group(2)) for m in ELAPSED.finditer(stdout) if int(m.group(1)) > warmup]


def run(arm: str, opts, data_dir: str, log_path: str) -> float:
    """One fresh torchrun run of the config; the median ms/iteration after the warm-up."""
    flags = ["--train-iters", str(opts.iters), "--log-interval", str(LOG_INTERVAL),
             "--eval-iters", "0", "--eval-interval", str(100 * opts.iters),
             "--split", "100,0,0",  # with a validation split, Megatron 0.19 fails on --eval-iters 0
             *(["--cpu"] if opts.cpu else []), *(["--disable-channel-loss"] if arm != "channels" else []),
             *opts.extra]
    run_dir = os.path.join(opts.run_dir, arm.replace(" ", "_"))
    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node {opts.nproc}"
    env = {**os.environ, "DATA_DIR": data_dir, "RUN_DIR": run_dir, "LAUNCHER": launcher,
           "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen([CONFIG, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600 + 10 * opts.iters)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
        out, _ = proc.communicate()
        proc.returncode = "timeout"
    with open(log_path, "w") as f:
        f.write(out)
    times = parse_elapsed(out, opts.warmup)
    if proc.returncode != 0 or not times:
        tail = "\n".join(out.splitlines()[-60:])
        why = f"exit status {proc.returncode}" if proc.returncode != 0 else \
            f"no iteration line after iteration {opts.warmup} (--iters {opts.iters}, --warmup {opts.warmup}?)"
        sys.exit(f"bench_pretrain: the {arm} run failed ({why}); full output in {log_path}; its tail:\n{tail}")
    return statistics.median(times)


def machine(cpu: bool) -> str:
    if not cpu:
        import torch

        return f"GPU {torch.cuda.get_device_name()}"
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {len(os.sched_getaffinity(0))} cores"


def report(opts, arms: list[str], rounds: list[dict]) -> tuple[str, str]:
    """The section title and its markdown body: setup, per-round table, verdict."""
    import torch

    where = "CPU" if opts.cpu else "GPU"
    target = 1.01 if opts.cpu else 1.005
    ratio = lambda r, arm: r[arm] / r["stock"]  # noqa: E731
    median = statistics.median(ratio(r, "channels") for r in rounds)
    noise = statistics.median(ratio(r, "stock again") for r in rounds) if "stock again" in arms else None
    noise_spread = spread([ratio(r, "stock again") for r in rounds]) if noise is not None else 0.0
    verdict = judge(median, target, noise_spread)
    backend = f"{opts.nproc} gloo ranks" if opts.cpu else f"{opts.nproc} GPU(s), nccl"
    lines = [
        f"Written by `python scripts/bench_pretrain.py --write-doc` (edit the script, not this section).",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine(opts.cpu)}",
        f"- torch {torch.__version__}, megatron-core {importlib.metadata.version('megatron-core')}, "
        f"Python {platform.python_version()}",
        f"- config: `configs/tiny_gpt_blend.sh{' --cpu' if opts.cpu else ''}` (2 layers, hidden 128, "
        f"seq 128, micro batch 4, global batch 16), {backend}, {opts.iters} iterations, --log-interval "
        f"{LOG_INTERVAL}, no evaluation{', extra flags: `' + ' '.join(opts.extra) + '`' if opts.extra else ''}",
        f"- per run: median of Megatron's `elapsed time per iteration (ms)` over the logged intervals "
        f"after iteration {opts.warmup}; per round: one fresh torchrun run of each arm, in a random order; "
        f"stock is `--disable-channel-loss`",
        "",
        "| round | order | " + " | ".join(f"{arm} ms/iter" for arm in arms) + " | "
        + " | ".join(f"{arm}/stock" for arm in arms if arm != "stock") + " |",
        "|---" * (2 + 2 * len(arms) - 1) + "|",
    ]
    for i, r in enumerate(rounds, 1):
        lines.append(f"| {i} | {', '.join(r['order'])} | " + " | ".join(f"{r[arm]:.1f}" for arm in arms) + " | "
                     + " | ".join(f"{ratio(r, arm):.4f}" for arm in arms if arm != "stock") + " |")
    lines += ["", f"- channels/stock, median of {len(rounds)} round(s): {median:.4f} ({median - 1:+.2%}) -> "
              f"**{verdict}** (target <= {target})"]
    if noise is not None:
        lines.append(f"- noise floor, stock again/stock, median of {len(rounds)} round(s): {noise:.4f} ({noise - 1:+.2%}); "
                     f"half the rounds lie within {noise_spread:.2%} of it (half the interquartile range)")
    return f"## End to end: Megatron's pretrain() on the {where}", "\n".join(lines) + "\n"


def spread(ratios: list[float]) -> float:
    """Half the interquartile range: how far two fresh processes of the same arm typically differ."""
    if len(ratios) < 4:
        return max(ratios) - min(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (q3 - q1) / 2


def judge(median: float, target: float, noise_spread: float) -> str:
    """PASS / FAIL only when the noise floor resolves the target's margin."""
    if noise_spread > target - 1:
        return (f"NOT RESOLVED: processes of the same arm differ by about {noise_spread:.1%}, more than the "
                f"{target - 1:.1%} margin; {'no cost seen' if median <= target else 'cost above target'} within that noise")
    return "PASS" if median <= target else "FAIL"


def write_doc(title: str, body: str) -> None:
    """Replace the section `title` of docs/performance.md (up to the next "## "), or append it."""
    text = open(DOC).read() if os.path.exists(DOC) else ""
    section = f"{title}\n\n{body}"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section if text else section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    with open(DOC, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=120, help="training iterations per run")
    parser.add_argument("--warmup", type=int, default=20, help="drop the logged intervals up to this iteration")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per run (default 2; on a GPU at most the GPUs)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    parser.add_argument("--no-stock-again", dest="stock_again", action="store_false",
                        help="skip the third arm (stock again, the noise floor)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the per-round arm order")
    parser.add_argument("--write-doc", action="store_true", help=f"write the section into {os.path.relpath(DOC, ROOT)}")
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "bench_pretrain"))
    parser.add_argument("extra", nargs="*", help="more Megatron flags (after --)")
    opts = parser.parse_args(argv)
    if opts.iters < opts.warmup + LOG_INTERVAL:
        parser.error(f"--iters must be at least --warmup + {LOG_INTERVAL} (one logged interval after the warm-up)")
    import torch

    opts.cpu = opts.cpu or not torch.cuda.is_available()
    if opts.nproc is None:
        opts.nproc = 2 if opts.cpu else min(2, torch.cuda.device_count())
    os.makedirs(opts.run_dir, exist_ok=True)
    data_dir = os.path.join(opts.run_dir, "data")
    data = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_data.py"), "--out", data_dir],
                          capture_output=True, text=True)
    if data.returncode != 0:
        sys.exit(f"bench_pretrain: scripts/make_tiny_data.py failed:\n{data.stdout[-3000:]}\n{data.stderr[-3000:]}")
    arms = ["stock", "channels"] + (["stock again"] if opts.stock_again else [])
    rng = random.Random(opts.seed)
    rounds = []
    for i in range(1, opts.rounds + 1):
        order = rng.sample(arms, len(arms))
        r = {"order": order}
        for arm in order:
            r[arm] = run(arm, opts, data_dir, os.path.join(opts.run_dir, f"round{i}-{arm.replace(' ', '_')}.log"))
            print(f"round {i}/{opts.rounds}: {arm:11s} {r[arm]:.1f} ms/iteration", flush=True)
        rounds.append(r)
    title, body = report(opts, arms, rounds)
    print(f"\n{title}\n\n{body}")
    if opts.write_doc:
        write_doc(title, body)
        print(f"wrote the section to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
