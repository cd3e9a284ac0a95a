"""The runnable configs in configs/: their flags parse with the real launch code, their data
builds with the real providers, and a batch goes through the channel loss (on the CPU, via
tests/dry_run_launcher.py standing in for torchrun; pretrain() itself needs a GPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_data")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_data.py"), "--out", str(out),
                    "--documents", "60", "--sft-lines", "30"], check=True, capture_output=True)
    return out


def dry_run(config: str, tiny_data, tmp_path, *extra_flags) -> dict:
    env = {**os.environ, "DATA_DIR": str(tiny_data), "RUN_DIR": str(tmp_path), "TOKENIZER_MODEL": "unused",
           "LAUNCHER": f"{sys.executable} {os.path.join(ROOT, 'tests', 'dry_run_launcher.py')}",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([os.path.join(ROOT, "configs", config), *extra_flags], env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_tiny_gpt_blend_config(tiny_data, tmp_path):
    seen = dry_run("tiny_gpt_blend.sh", tiny_data, tmp_path)
    assert seen["metric_keys"] == ["lm loss", "loss_copy", "loss_count", "loss_noise"]
    assert not seen["packed"] and seen["channels_field_shape"] == [4]
    assert seen["valid_samples"] > 0
    assert sum(seen["counts"][k] for k in ("loss_copy", "loss_count", "loss_noise")) == seen["counts"]["lm loss"]
    assert seen["tensorboard_dir"] == str(tmp_path / "tensorboard")


@pytest.mark.timeout(240)
def test_sft_channels_config(tiny_data, tmp_path):
    seen = dry_run("sft_channels.sh", tiny_data, tmp_path)
    assert seen["metric_keys"] == ["lm loss", "loss_math", "loss_code", "loss_chat", "loss_other"]
    assert seen["packed"] and seen["channels_field_shape"][0] == 1
    channel_tokens = sum(seen["counts"][k] for k in ("loss_math", "loss_code", "loss_chat", "loss_other"))
    assert channel_tokens == seen["counts"]["lm loss"] > 0


@pytest.mark.timeout(240)
def test_blend_config_with_inter_document_masking(tiny_data, tmp_path):
    """GPT rows with --dataloader-inter-document-masking are packed: one channel per document."""
    seen = dry_run("tiny_gpt_blend.sh", tiny_data, tmp_path, "--dataloader-inter-document-masking",
                   "--micro-batch-size", "1")  # the CPU stand-in for THD attention takes one row
    assert seen["packed"] and seen["channels_field_shape"] == [1, 128]
    channel_tokens = sum(seen["counts"][k] for k in ("loss_copy", "loss_count", "loss_noise"))
    assert channel_tokens == seen["counts"]["lm loss"] > 0
