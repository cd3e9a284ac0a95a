"""Each supported megatron-core release, in its own environment: ``scripts/test.sh`` makes
``.venv-megatron/<version>``, a virtual environment with that megatron-core (and its
``test_requirements``) layered over the main one, whose other packages it shares.

``scripts/test.sh`` runs this file once per release with ``MEGATRON_RELEASE=<version>`` and that
environment's python; in the main environment (no ``MEGATRON_RELEASE``) it checks the installed one.
Every run is the launch script under torchrun through the release's own ``pretrain()``
with ``--cpu``: DP = 2, channels from the blend, validation, token accuracy; with HybridModel
too where the release has it (0.18 on).
"""

from __future__ import annotations

import os
import re

import pytest

from megatron_channel.megatron_internals import release_for
from megatron_channel.megatron_internals.releases import installed_version
from pretrain_runs import ROOT, blend_flags, model_flags, run_pretrain, sft_launch_flags
from run_checks import check_packed_sft_channels, check_token_accuracy, check_train_logs, check_validation

pytestmark = [pytest.mark.timeout(900), pytest.mark.release, pytest.mark.e2e]

RELEASE = release_for()


def test_the_environment_is_the_release_asked_for():
    asked = os.environ.get("MEGATRON_RELEASE")
    installed = ".".join(map(str, installed_version()))
    if asked:
        assert installed == asked, f"MEGATRON_RELEASE={asked} but megatron-core {installed} is imported"
        import megatron.core

        assert os.path.realpath(megatron.core.__file__).startswith(os.path.realpath(os.path.join(ROOT, ".venv-megatron")))


def launch(tmp_path, data_dir, *flags, sft: bool = False):
    data = sft_launch_flags(data_dir) if sft else {}
    channels = ["--channel-config", os.path.join(ROOT, "configs", "channels.yaml")] if sft else None
    all_flags = [*model_flags(), *blend_flags(data_dir, channels=channels, **data), "--train-iters", "10",
                 "--channel-token-accuracy", *flags]
    return run_pretrain(str(tmp_path / "run"), all_flags, nproc=2)


def test_gpt_data_parallel_with_validation_and_token_accuracy(tmp_path, data_dir):
    run = launch(tmp_path, data_dir)
    assert re.search(rf"per-channel logging, megatron-core ({re.escape(RELEASE.name)}|[0-9.]+, run as "
                     rf"{re.escape(RELEASE.name)}) loop", run.output)
    check_train_logs(run)
    check_validation(run)
    check_token_accuracy(run)


def test_gpt_context_parallel_with_token_accuracy(tmp_path, data_dir):
    """Unpacked rows cut by Megatron's zigzag for CP = 2 (its signature moved at 0.18)."""
    run = launch(tmp_path, data_dir, "--context-parallel-size", "2")
    check_train_logs(run)
    check_validation(run)
    check_token_accuracy(run)


def test_packed_sft_context_parallel_with_token_accuracy(tmp_path, data_dir, monkeypatch):
    """Megatron's SFT dataset packs conversations into rows; CP = 2 cuts each sequence (the
    release's PackedSeqParams)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = launch(tmp_path, data_dir, "--context-parallel-size", "2", sft=True)
    check_train_logs(run, iteration_tokens=None, megatron_lm_loss=False)
    check_validation(run)
    check_packed_sft_channels(run)


def test_hybrid_model_data_parallel_with_token_accuracy(tmp_path, data_dir):
    if not RELEASE.hybrid_model:
        with pytest.raises(AssertionError, match=r"--hybrid-layer-pattern builds a HybridModel, which megatron-core "
                                                 rf"{RELEASE.name} does not have"):
            launch(tmp_path, data_dir, "--hybrid-layer-pattern", "*-*-")
        return
    run = launch(tmp_path, data_dir, "--hybrid-layer-pattern", "*-*-")
    assert "HybridModel: pp_rank=0/1" in run.output
    check_train_logs(run)
    check_validation(run)
    check_token_accuracy(run)
