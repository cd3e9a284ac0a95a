"""``install``: idempotent, reconfigurable, undone by uninstall; refuses a changed Megatron."""

from __future__ import annotations

import pytest

import megatron.training.training as training

from logging_tables import CONFIG
from megatron_channel import ChannelConfig, MegatronInternalsError, install_channel_logging, uninstall_channel_logging
from megatron_channel.channel_logging.install import installed_channel_logging

WRAPPED = ("train_step", "training_log", "evaluate", "evaluate_and_print_results")


def wrapped_functions() -> dict:
    return {n: getattr(training, n) for n in WRAPPED}


@pytest.mark.timeout(30)
def test_install_twice_is_idempotent(clean_install):
    originals = wrapped_functions()
    install_channel_logging(CONFIG)
    first = wrapped_functions()
    state = installed_channel_logging()
    install_channel_logging(CONFIG)
    for n in WRAPPED:
        assert getattr(training, n) is first[n] is not originals[n]
        assert first[n].__wrapped__ is originals[n]
    assert installed_channel_logging() is state


@pytest.mark.timeout(30)
def test_another_config_replaces_the_installation_wrapping_the_originals_once(clean_install, tmp_path):
    originals = wrapped_functions()
    install_channel_logging(CONFIG)
    install_channel_logging(ChannelConfig(["a"]), jsonl_path=str(tmp_path / "x.jsonl"))
    for n in WRAPPED:
        assert getattr(training, n).__wrapped__ is originals[n]


@pytest.mark.timeout(30)
def test_uninstall_restores_the_originals(clean_install, tmp_path):
    originals = wrapped_functions()
    install_channel_logging(CONFIG)
    install_channel_logging(ChannelConfig(["a"]), jsonl_path=str(tmp_path / "x.jsonl"))
    uninstall_channel_logging()
    for n in WRAPPED:
        assert getattr(training, n) is originals[n]


@pytest.mark.timeout(30)
def test_install_refuses_what_is_not_a_channel_config(clean_install):
    with pytest.raises(TypeError, match="ChannelConfig"):
        install_channel_logging(["math"])


@pytest.mark.timeout(30)
def test_install_refuses_a_directory_as_jsonl_path(clean_install, tmp_path):
    with pytest.raises(ValueError, match="jsonl_path=.*is a directory"):
        install_channel_logging(CONFIG, jsonl_path=str(tmp_path))


@pytest.mark.timeout(30)
def test_install_refuses_a_changed_training_module_and_leaves_it_alone(clean_install, monkeypatch):
    def train_step(forward_step_func, data_iterator, model, optimizer, new_option=None):
        return None

    monkeypatch.setattr(training, "train_step", train_step)
    before = wrapped_functions()
    with pytest.raises(MegatronInternalsError,
                       match=r"train_step has no parameter \['forward_backward_func'\].*0\.17 to 0\.19"):
        install_channel_logging(CONFIG)
    assert wrapped_functions() == before
    assert installed_channel_logging() is None
