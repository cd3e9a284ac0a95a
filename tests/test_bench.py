"""The benchmark script runs, and its loop reference agrees with channel_loss_func.

No timing is asserted here: speed targets live in scripts/bench_channel_loss.py.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_channel_loss as bench  # noqa: E402

from megatron_channel import channel_loss_func  # noqa: E402


CASES = [(512, 1, 2), (2048, 64, 16), (4096, 1024, 64)]


@pytest.mark.parametrize("fixed_list", [False, True], ids=["exact list", "fixed-length list"])
@pytest.mark.parametrize("tokens, sequences, channels", CASES)
def test_loop_reference_matches_ours(tokens, sequences, channels, fixed_list):
    slots = bench.fixed_slots(tokens, sequences) if fixed_list else None
    output, mask, cu, ids, config, packed = bench.make_case(tokens, sequences, channels, torch.device("cpu"),
                                                            slots=slots)
    _, _, loop = bench.loop_loss_func(mask, output, cu, ids, config)
    _, _, ours = channel_loss_func(output, loss_mask=mask, channels=ids, config=config, packed_seq_params=packed)
    assert list(loop) == list(ours)
    for key in ours:
        torch.testing.assert_close(loop[key], ours[key], rtol=1e-5, atol=1e-3)


def test_the_fixed_length_list_is_what_training_hands_the_loss():
    """C = micro_batch_size x 256 slots for rows of 4096 tokens, more rows where the sequences
    need them; the real sequences first, then zero-length slots of channel -1."""
    assert bench.fixed_slots(32768, 256) == 2048 and bench.fixed_slots(8192, 4096) == 4096
    assert bench.fixed_slots(131072, 1) == 8192 and bench.fixed_slots(1024, 1) == 256
    _, _, cu, ids, _, packed = bench.make_case(4096, 10, 4, torch.device("cpu"), slots=256)
    assert cu.shape == (257,) and ids.shape == (256,) and packed.cu_seqlens_q is cu
    assert (cu.diff()[:10] > 0).all() and (cu[11:] == 4096).all() and (ids[10:] == -1).all()
    with pytest.raises(ValueError, match="do not fit"):
        bench.make_case(4096, 300, 4, torch.device("cpu"), slots=256)


@pytest.mark.parametrize("summing", ["host", "torch"])
@pytest.mark.parametrize("fixed_list", [False, True], ids=["exact list", "fixed-length list"])
@pytest.mark.parametrize("tokens, sequences, channels", CASES)
def test_the_two_pass_reference_reports_what_ours_reports(tokens, sequences, channels, fixed_list, summing):
    """The table's 2-pass column times the same numbers, bit for bit, summed the way they were
    before the one-pass sums."""
    import dataclasses

    from megatron_channel.segment_math import summing_like_a_gpu

    slots = bench.fixed_slots(tokens, sequences) if fixed_list else None
    output, mask, cu, ids, config, packed = bench.make_case(tokens, sequences, channels, torch.device("cpu"),
                                                            slots=slots)
    config = dataclasses.replace(config, token_accuracy=True)
    correct = (torch.rand(output.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with summing_like_a_gpu() if summing == "torch" else contextlib.nullcontext():
        two = bench.two_pass_loss_func(mask, output, cu, ids, config, correct)
        one = channel_loss_func(output, loss_mask=mask, channels=ids, config=config, packed_seq_params=packed,
                                cp_size=1, validate=False, correct_tokens=correct)
    assert list(two[2]) == list(one[2])
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[1])
    for key in one[2]:
        assert one[2][key].dtype == torch.float32 and torch.equal(two[2][key], one[2][key]), key


@pytest.mark.timeout(120)
def test_quick_benchmark_prints_its_table():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_channel_loss.py"), "--quick",
                           "--no-demo-step"], capture_output=True, text=True, timeout=110,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| device | T | seqs | slots | K |" in proc.stdout
    assert proc.stdout.count("| cpu | 8k |") == 4
    assert proc.stdout.count("| cpu | 8k | 256 | 512 |") == 2  # the fixed-length list: 2 rows x 256 slots
    assert "CPU loop/ours >= 10x" in proc.stdout
    assert "CPU token accuracy in loss_func" in proc.stdout and "the two-pass sums" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the whole GPU half")
def test_the_gpu_half_is_one_command_that_says_it_needs_a_gpu():
    proc = subprocess.run([os.path.join(ROOT, "scripts", "bench_gpu.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bench_gpu.sh needs a CUDA GPU" in proc.stderr
