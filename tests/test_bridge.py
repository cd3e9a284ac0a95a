"""End to end through Megatron-Bridge's own ``pretrain()``: ``scripts/pretrain_bridge_channel.py
--cpu`` under torchrun, 2 gloo ranks, the tiny GPT on the 3-channel blend.

Runs in the Megatron-Bridge environment that ``scripts/test.sh`` makes (``bridge_env``); the
main environment has no Bridge and does not collect this file. Each test checks numbers as the
Megatron-LM ones do: the channels mix to ``lm loss``, channel tokens sum to the loss tokens, and
the console, the jsonl and TensorBoard agree.
"""

from __future__ import annotations

import re

import pytest

from pretrain_runs import CHANNELS, GLOBAL_BATCH, SEQ, blend, close, run_bridge
from run_checks import (
    check_bitwise_lm_loss,
    check_packed_sft_channels,
    check_token_accuracy,
    check_train_logs,
    check_validation,
)

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e, pytest.mark.bridge]


def bridge_overrides(data_dir: str) -> list[str]:
    """The recipe of the Megatron-LM end-to-end runs, as Bridge overrides."""
    return [
        "model.hidden_size=64", "model.ffn_hidden_size=256", f"model.seq_length={SEQ}", f"dataset.seq_length={SEQ}",
        "train.micro_batch_size=2", f"train.global_batch_size={GLOBAL_BATCH}", "train.train_iters=20",
        "validation.eval_interval=10", "validation.eval_iters=2", "logger.log_interval=5",
        "dataset.split='90,10,0'", f"dataset.path_to_cache={data_dir}/cache",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Each configuration is launched once, on first use, and shared by the tests."""
    cache = {}
    root = tmp_path_factory.mktemp("bridge_runs")

    def get(name: str, *flags: str, channels: tuple[str, ...] = ("--channels-from-blend",)):
        if name not in cache:
            cache[name] = run_bridge(str(root / name), [
                "--data-path", *blend(data_dir), *channels, *bridge_overrides(data_dir), *flags])
        return cache[name]

    return get


def check_no_nan(run):
    assert not re.search(r"[:=]\s*-?nan\b", run.stdout, re.IGNORECASE)


def test_data_parallel_with_token_accuracy(runs):
    run = runs("dp2", "--channel-token-accuracy")
    check_train_logs(run)
    check_validation(run)
    check_token_accuracy(run)
    assert [r.iteration for r in run.train_records()] == [5, 10, 15, 20]
    check_no_nan(run)


def test_observer_leaves_lm_loss_and_grad_norm_bitwise_stock(runs):
    ours, stock = runs("dp2", "--channel-token-accuracy"), runs("dp2_stock", "--stock")
    check_bitwise_lm_loss(ours, stock)
    assert sorted(stock.iteration_lines()) == [5, 10, 15, 20]


def test_tensor_parallel_with_a_channel_that_never_has_tokens(runs):
    run = runs("tp2", "model.tensor_model_parallel_size=2",
               channels=("--channels", *CHANNELS, "math", "--channels-from-blend", *CHANNELS))
    check_train_logs(run)
    check_validation(run)
    # `math` is listed but no sample is math: 0 tokens everywhere, no loss value, no NaN.
    assert all(r.channels["math"].loss is None and r.channels["math"].tokens == 0.0 for r in run.records)
    assert "loss_math" not in run.events and "loss_math validation" not in run.events
    assert all(value == 0.0 for _, value in run.events["tokens_math"])
    check_no_nan(run)


def test_pipeline_parallel_logs_the_last_stage(runs):
    run = runs("pp2", "model.pipeline_model_parallel_size=2")
    check_train_logs(run)
    check_validation(run)
    iterations = [r.iteration for r in run.train_records()]
    assert iterations == sorted(set(iterations))  # written by one rank only


def test_context_parallel(runs):
    run = runs("cp2", "model.context_parallel_size=2")
    check_train_logs(run)
    check_validation(run)


def test_resume_continues_the_curves(runs, tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    saving = (f"checkpoint.save={checkpoint}", "checkpoint.save_interval=10")
    first = runs("resume", *saving, "train.exit_interval=10")
    assert max(r.iteration for r in first.train_records()) == 10
    resumed = runs("resume_2", *saving, f"checkpoint.load={checkpoint}")
    check_train_logs(resumed)
    # The resumed process picks up at iteration 11: nothing before it, nothing twice ...
    after = resumed.train_records()
    assert [r.iteration for r in after] == [15, 20]
    assert sum(r.iterations_in_window for r in after) == 10
    # ... and it is the curve an uninterrupted run draws.
    straight = {r.iteration: r for r in runs("dp2", "--channel-token-accuracy").train_records()}
    for record in after:
        reference = straight[record.iteration]
        for name, channel in record.channels.items():
            assert channel.tokens == reference.channels[name].tokens
            assert close(channel.loss, reference.channels[name].loss, 1e-4), (record.iteration, name)


def test_packed_sft_from_jsonl_with_token_accuracy(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pretrain_runs import ROOT, sft_launch_flags

    sft = sft_launch_flags(data_dir)
    data = sft["data"][sft["data"].index("--data-path"):sft["data"].index("--split")]
    tokenizer = sft["tokenizer"][sft["tokenizer"].index("--tokenizer-model") + 1]
    run = run_bridge(str(tmp_path / "sft"), [
        "--sft", *data, "--tokenizer-model", tokenizer, "--channel-token-accuracy",
        "--channel-config", f"{ROOT}/configs/channels.yaml",
        "train.train_iters=20", f"train.global_batch_size={GLOBAL_BATCH}", "validation.eval_interval=10",
        "validation.eval_iters=2", "logger.log_interval=5", "dataset.split='90,10,0'",
    ])
    # Packed rows carry a varying number of loss tokens (answers only), all in a channel;
    # unlabeled.jsonl's lines count as `other`.
    check_train_logs(run, iteration_tokens=None, megatron_lm_loss=False)
    check_validation(run)
    check_packed_sft_channels(run)
    check_no_nan(run)


def test_tiny_bridge_blend_config(tmp_path, data_dir):
    """configs/tiny_bridge_blend.sh, launched as a user would, with --cpu and short overrides."""
    import os
    import subprocess
    import sys

    from megatron_channel.channel_logging.jsonl_schema import read_jsonl
    from pretrain_runs import ROOT

    env = {**os.environ, "DATA_DIR": data_dir, "RUN_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore",
           "LAUNCHER": f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2"}
    proc = subprocess.run([os.path.join(ROOT, "configs", "tiny_bridge_blend.sh"), "--cpu", "train.train_iters=4",
                           "logger.log_interval=2", "validation.eval_interval=4", "validation.eval_iters=1"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = read_jsonl(str(tmp_path / "tensorboard" / "channels.jsonl"))
    assert [r.iteration for r in records if r.kind == "train"] == [2, 4]
    assert any(r.kind == "validation" for r in records)
    for record in records:
        assert list(record.channels) == list(CHANNELS)
        tokens = sum(c.tokens for c in record.channels.values())
        assert tokens == record.loss_tokens > 0
        assert close(sum(c.tokens * c.loss for c in record.channels.values() if c.tokens) / tokens,
                     record.lm_loss_token_weighted)
