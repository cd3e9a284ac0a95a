"""``install``: idempotent, reconfigurable, undone by uninstall; refuses a changed Megatron."""

from __future__ import annotations

import pytest

import megatron.training.training as training

from logging_tables import CONFIG
from megatron_channel import ChannelConfig, MegatronInternalsError, install_channel_logging, uninstall_channel_logging
from megatron_channel.channel_logging.install import installed_channel_logging

WRAPPED = ("train_step", "training_log", "evaluate", "evaluate_and_print_results")


@pytest.mark.timeout(30)
def test_install_is_idempotent_and_uninstall_restores(clean_install, tmp_path):
    originals = {n: getattr(training, n) for n in WRAPPED}
    install_channel_logging(CONFIG)
    first = {n: getattr(training, n) for n in WRAPPED}
    state = installed_channel_logging()
    install_channel_logging(CONFIG)
    for n in WRAPPED:
        assert getattr(training, n) is first[n] is not originals[n]
        assert first[n].__wrapped__ is originals[n]
    assert installed_channel_logging() is state
    # Another config replaces the installation, still wrapping the originals once.
    install_channel_logging(ChannelConfig(["a"]), jsonl_path=str(tmp_path / "x.jsonl"))
    for n in WRAPPED:
        assert getattr(training, n).__wrapped__ is originals[n]
    uninstall_channel_logging()
    for n in WRAPPED:
        assert getattr(training, n) is originals[n]
    with pytest.raises(TypeError, match="ChannelConfig"):
        install_channel_logging(["math"])
    with pytest.raises(ValueError, match="jsonl_path=.*is a directory"):
        install_channel_logging(CONFIG, jsonl_path=str(tmp_path))


@pytest.mark.timeout(30)
def test_install_refuses_a_changed_training_module_and_leaves_it_alone(clean_install, monkeypatch):
    def train_step(forward_step_func, data_iterator, model, optimizer, new_option=None):
        return None

    monkeypatch.setattr(training, "train_step", train_step)
    before = {n: getattr(training, n) for n in WRAPPED}
    with pytest.raises(MegatronInternalsError,
                       match=r"train_step has no parameter \['forward_backward_func'\].*0\.17 to 0\.19"):
        install_channel_logging(CONFIG)
    assert {n: getattr(training, n) for n in WRAPPED} == before
    assert installed_channel_logging() is None
