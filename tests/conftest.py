"""Shared fixtures: an in-process, single-rank gloo world with Megatron's parallel_state."""

import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_channel.testing import init_parallel, init_single_process_group

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def megatron_cpu():
    """World of one gloo rank with parallel_state at TP=PP=CP=1."""
    if not dist.is_initialized():
        init_single_process_group()
    init_parallel()
    yield
    torch.manual_seed(0)
