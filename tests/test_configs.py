"""The runnable configs in configs/ train for real: each one is launched as a user would,
with ``--cpu`` on 2 gloo ranks through Megatron's ``pretrain()``, for a few iterations, and
its channel keys and token counts are checked in the jsonl it writes."""

import os
import subprocess
import sys

import pytest

from megatron_channel.channel_logging.jsonl_schema import Record, read_jsonl
from pretrain_runs import close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--cpu", "--train-iters", "4", "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "1"]


pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_data")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_data.py"), "--out", str(out),
                    "--documents", "60", "--sft-lines", "30"], check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_sft_tokenizer.py"), "--out",
                    str(out / "sft_tokenizer")], check=True, capture_output=True)
    return out


def launch(config: str, tiny_data, tmp_path, *extra_flags) -> list[Record]:
    env = {**os.environ, "DATA_DIR": str(tiny_data), "RUN_DIR": str(tmp_path), "NPROC": "2",
           "TOKENIZER_MODEL": str(tiny_data / "sft_tokenizer"), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "LAUNCHER": f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2"}
    proc = subprocess.run([os.path.join(ROOT, "configs", config), *SHORT, *extra_flags], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return read_jsonl(str(tmp_path / "tensorboard" / "channels.jsonl"))


def check_records(records, channels):
    train = [r for r in records if r.kind == "train"]
    assert [r.iteration for r in train] == [1, 2, 4]
    assert any(r.kind == "validation" for r in records)
    for record in records:
        assert list(record.channels) == channels
        tokens = sum(c.tokens for c in record.channels.values())
        assert tokens == record.loss_tokens > 0  # every loss token is in a channel
        mix = sum(c.tokens * c.loss for c in record.channels.values() if c.tokens) / tokens
        assert close(mix, record.lm_loss_token_weighted)


@pytest.mark.timeout(450)
def test_tiny_gpt_blend_config(tiny_data, tmp_path):
    check_records(launch("tiny_gpt_blend.sh", tiny_data, tmp_path), ["copy", "count", "noise"])


@pytest.mark.timeout(450)
def test_tiny_hybrid_blend_config(tiny_data, tmp_path):
    """The same blend as a HybridModel (--hybrid-layer-pattern "*-*-"), with token accuracy."""
    records = launch("tiny_hybrid_blend.sh", tiny_data, tmp_path, "--channel-token-accuracy")
    check_records(records, ["copy", "count", "noise"])
    assert all(r.token_acc is not None for r in records)


@pytest.mark.timeout(450)
def test_sft_channels_config(tiny_data, tmp_path):
    """Packed SFT rows from jsonl, tokenized by Megatron's SFTTokenizer, channels from configs/channels.yaml."""
    records = launch("sft_channels.sh", tiny_data, tmp_path)
    check_records(records, ["math", "code", "chat", "other"])
    # unlabeled.jsonl lines name no channel: they count as `other`.
    assert sum(r.channels["other"].tokens for r in records if r.kind == "train") > 0


@pytest.mark.timeout(450)
def test_blend_config_with_inter_document_masking(tiny_data, tmp_path):
    """GPT rows with --dataloader-inter-document-masking are packed: one channel per document."""
    records = launch("tiny_gpt_blend.sh", tiny_data, tmp_path, "--dataloader-inter-document-masking")
    check_records(records, ["copy", "count", "noise"])
