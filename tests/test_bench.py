"""The benchmark script runs, and its loop reference agrees with channel_loss_func.

No timing is asserted here: speed targets live in scripts/bench_channel_loss.py.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_channel_loss as bench  # noqa: E402

from megatron_channel import channel_loss_func  # noqa: E402


@pytest.mark.parametrize("tokens, sequences, channels", [(512, 1, 2), (2048, 64, 16), (4096, 1024, 64)])
def test_loop_reference_matches_ours(tokens, sequences, channels):
    output, mask, cu, ids, config, packed = bench.make_case(tokens, sequences, channels, torch.device("cpu"))
    _, _, loop = bench.loop_loss_func(mask, output, cu, ids, config)
    _, _, ours = channel_loss_func(output, loss_mask=mask, channels=ids, config=config, packed_seq_params=packed)
    assert list(loop) == list(ours)
    for key in ours:
        torch.testing.assert_close(loop[key], ours[key], rtol=1e-5, atol=1e-3)


@pytest.mark.timeout(120)
def test_quick_benchmark_prints_its_table():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_channel_loss.py"), "--quick",
                           "--no-demo-step"], capture_output=True, text=True, timeout=110,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| device | T | seqs | K |" in proc.stdout
    assert proc.stdout.count("| cpu | 8k |") == 4
    assert "CPU loop/ours >= 10x" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the whole GPU half")
def test_the_gpu_half_is_one_command_that_says_it_needs_a_gpu():
    proc = subprocess.run([os.path.join(ROOT, "scripts", "bench_gpu.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bench_gpu.sh needs a CUDA GPU" in proc.stderr
