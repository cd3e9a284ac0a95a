"""A short run of the CPU demo: data through the real blend path, logs, TensorBoard, PNG."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_short_demo_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "demo_cpu.py"), "--out", str(out),
         "--train-iters", "6", "--log-interval", "3", "--eval-interval", "3", "--eval-iters", "1"],
        capture_output=True, text=True, timeout=220, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    iteration_lines = [line for line in lines if line.startswith(" iteration")]
    assert len(iteration_lines) == 2
    for line in iteration_lines:
        for key in ("lm loss:", "loss_copy:", "loss_count:", "loss_noise:", "tokens_copy:", "token share noise:"):
            assert key in line, line
    assert sum(line.startswith(" validation loss at iteration") for line in lines) == 2
    assert "nan" not in proc.stdout.lower() and "inf " not in proc.stdout.lower()

    records = [json.loads(line) for line in (out / "channels.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "validation", "train", "validation"]
    assert (out / "channels.png").stat().st_size > 10_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    assert str(out / "channels.png") in proc.stdout
