"""Shared fixtures: an in-process, single-rank gloo world with Megatron's parallel_state."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_channel.testing import free_port, init_parallel

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def megatron_cpu():
    """World of one gloo rank with parallel_state at TP=PP=CP=1."""
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    init_parallel()
    yield
    torch.manual_seed(0)
