"""Test support: run ``scripts/pretrain_gpt_channel.py --cpu`` under torchrun and read what it logged.

A ``Run`` holds the three outputs a user reads: the console lines (Megatron's iteration and
validation lines with the channel fields), the jsonl records, and the TensorBoard scalars.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

from megatron_channel.channel_logging.jsonl_schema import Record, TrainRecord, ValidationRecord, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "pretrain_gpt_channel.py")
BRIDGE_SCRIPT = os.path.join(ROOT, "scripts", "pretrain_bridge_channel.py")
CHANNELS = ("copy", "count", "noise")
SEQ = 64
GLOBAL_BATCH = 8


def model_flags() -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--position-embedding-type", "learned_absolute", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--micro-batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH),
        "--lr", "3e-3", "--lr-decay-style", "constant", "--clip-grad", "1.0",
        "--log-interval", "5", "--eval-interval", "10", "--eval-iters", "2",
    ]


def blend(data_dir: str) -> list[str]:
    return ["0.25", f"{data_dir}/copy", "0.35", f"{data_dir}/count", "0.4", f"{data_dir}/noise"]


def blend_flags(data_dir: str, data: list[str] | None = None, channels: list[str] | None = None,
                tokenizer: list[str] | None = None) -> list[str]:
    """The 3-channel blend, one channel per component; ``data``, ``channels`` and
    ``tokenizer`` replace the data-path, channel and tokenizer flags."""
    data = data or ["--data-path", *blend(data_dir), "--split", "90,10,0"]
    tokenizer = tokenizer or ["--tokenizer-type", "NullTokenizer", "--vocab-size", "64"]
    return [*data, "--data-cache-path", f"{data_dir}/cache", *tokenizer, *(channels or ["--channels-from-blend"])]


def sft_launch_flags(data_dir: str) -> dict[str, list[str]]:
    """``data`` and ``tokenizer`` flags (``blend_flags``' keywords) of packed SFT rows from the
    tiny jsonl files, tokenized by Megatron's SFTTokenizer over the tiny tokenizer."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_sft_tokenizer

    tokenizer = make_sft_tokenizer.write_sft_tokenizer(os.path.join(data_dir, "sft_tokenizer"))
    return dict(
        data=["--sft", "--data-path", "0.8", f"{data_dir}/sft/mixed.jsonl", "0.2", f"{data_dir}/sft/unlabeled.jsonl",
              "--split", "90,10,0", "--seq-length", "128", "--max-position-embeddings", "128"],
        tokenizer=["--tokenizer-type", "SFTTokenizer", "--tokenizer-model", tokenizer],
    )


@dataclass
class Run:
    stdout: str
    records: list[Record]
    events: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stderr: str = ""

    @property
    def output(self) -> str:
        """Standard output and standard error (Megatron logs some lines, and the patch lines, there)."""
        return self.stdout + self.stderr

    @property
    def scalars(self) -> dict[str, dict[int, float]]:
        """TensorBoard value by step (the last one where a step was written twice)."""
        return {tag: dict(points) for tag, points in self.events.items()}

    def train_records(self) -> list[TrainRecord]:
        return [r for r in self.records if isinstance(r, TrainRecord)]

    def validation_records(self) -> list[ValidationRecord]:
        return [r for r in self.records if isinstance(r, ValidationRecord)]

    def iteration_lines(self) -> dict[int, dict[str, str]]:
        """Megatron's iteration lines by iteration: field name -> value text."""
        lines = {}
        for line in self.stdout.splitlines():
            if " iteration " in line and "| consumed samples:" in line:
                fields = parse_fields(line)
                iteration = int(line.split(" iteration ", 1)[1].split("/", 1)[0])
                lines[iteration] = fields
        return lines

    def validation_lines(self) -> list[tuple[str, dict[str, str]]]:
        """(head, fields) of each ``validation loss at ...`` line, in order."""
        out = []
        for line in self.stdout.splitlines():
            if " loss at iteration " in line and "|" in line:
                head, _, rest = line.partition("|")
                out.append((head.strip(), parse_fields(rest)))
        return out


def parse_fields(line: str) -> dict[str, str]:
    fields = {}
    for part in line.split("|"):
        name, sep, value = part.rpartition(": ")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def read_events(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar point, in the order written: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(tensorboard_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        events = EventAccumulator(os.path.join(tensorboard_dir, name), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                scalars.setdefault(tag, []).append((event.step, event.value))
    return scalars


def run_pretrain(run_dir: str, flags: list[str], nproc: int = 2, timeout: float = 400) -> Run:
    """One torchrun launch of the channel launch script with ``--cpu``; raises with its output if it fails."""
    tensorboard_dir = os.path.join(run_dir, "tensorboard")
    return _launch([SCRIPT, "--cpu", *flags, "--tensorboard-dir", tensorboard_dir], tensorboard_dir, nproc, timeout)


def run_bridge(run_dir: str, flags: list[str], nproc: int = 2, timeout: float = 400) -> Run:
    """One torchrun launch of ``scripts/pretrain_bridge_channel.py --cpu`` (Megatron-Bridge's
    ``pretrain()``); ``flags``: its flags and Bridge's ``key=value`` overrides."""
    tensorboard_dir = os.path.join(run_dir, "tensorboard")
    return _launch([BRIDGE_SCRIPT, "--cpu", *flags, f"logger.tensorboard_dir={tensorboard_dir}"], tensorboard_dir,
                   nproc, timeout)


def _launch(script_and_flags: list[str], tensorboard_dir: str, nproc: int, timeout: float) -> Run:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--standalone",  # a free rendezvous port of its own
        *script_and_flags,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"pretrain run failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    jsonl = os.path.join(tensorboard_dir, "channels.jsonl")
    records = read_jsonl(jsonl) if os.path.exists(jsonl) else []
    events = read_events(tensorboard_dir) if os.path.isdir(tensorboard_dir) else {}
    return Run(proc.stdout, records, events, proc.stderr)


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
