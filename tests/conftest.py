"""Shared fixtures: an in-process, single-rank gloo world with Megatron's parallel_state, and
Megatron's global variables from its own parser for the tests of the logging wrappers."""

import argparse
import importlib.util
import os
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_channel import uninstall_channel_logging
from megatron_testing import init_parallel, init_single_process_group

# The Megatron-Bridge tests run in the environment scripts/test.sh makes for Bridge (bridge_env).
BRIDGE_TESTS = ["test_bridge.py", "test_bridge_units.py"]
collect_ignore = [] if importlib.util.find_spec("megatron.bridge") else BRIDGE_TESTS


@pytest.fixture(scope="session")
def megatron_cpu():
    """World of one gloo rank with parallel_state at TP=PP=CP=1."""
    if not dist.is_initialized():
        init_single_process_group()
    init_parallel()
    yield
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny blend (copy, count, noise indexed datasets) and SFT jsonl files, for the launches."""
    from pretrain_runs import ROOT

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_tiny_data

    out = tmp_path_factory.mktemp("tiny_data")
    make_tiny_data.make_tiny_data(str(out), documents=120, sft_lines=60)
    return str(out)


@pytest.fixture
def clean_install():
    uninstall_channel_logging()
    yield
    uninstall_channel_logging()


WRAPPED = ("train_step", "training_log", "evaluate", "evaluate_and_print_results")


class WandbRecorder:
    """Stands in for the wandb run object Megatron keeps as its W&B writer (wandb is not installed)."""

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log(self, values, step=None):
        self.logged.append((dict(values), step))


def megatron_args(tmp_path, *extra):
    from megatron.training.arguments import add_megatron_arguments, validate_args

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "10", "--lr", "1e-3", "--log-interval", "2", "--tensorboard-log-interval", "1",
        "--tensorboard-dir", str(tmp_path / "tb"), *extra,
    ])
    args.rank, args.world_size = 0, 1
    validate_args(args)
    args.padded_vocab_size = 64  # set by the tokenizer build, which this test skips
    return args


@pytest.fixture
def megatron_globals(megatron_cpu, tmp_path, monkeypatch, clean_install):
    """Megatron's global args (``--log-interval 2 --tensorboard-dir``), TensorBoard writer and a W&B recorder."""
    from megatron.training import global_vars

    if global_vars._GLOBAL_ARGS is not None:
        global_vars.unset_global_variables()
    args = megatron_args(tmp_path)
    global_vars.set_global_variables(args, build_tokenizer=False)
    wandb = WandbRecorder()
    monkeypatch.setattr(global_vars, "_GLOBAL_WANDB_WRITER", wandb)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    yield args, wandb
    writer = global_vars.get_tensorboard_writer()
    if writer is not None:
        writer.close()
    global_vars.unset_global_variables()
