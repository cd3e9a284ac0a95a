"""The loss path never asks the host for a tensor value and never adds a collective.

On a GPU each of those would stall the CPU until the GPU catches up. Here, on CPU tensors,
every host-read entry point of ``torch.Tensor`` and every collective of ``torch.distributed``
is replaced by a function that fails for the duration of the call, with ``validate=False``
(the data-boundary checks are done where the batch is built, not in this path).

CPU tensors are summed with numpy, which reads their values (no wait on a CPU); the
``gpu_summing`` fixture turns that off so the path checked here is the one GPU tensors take.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel import ChannelConfig, channel_loss_func
from megatron_channel.segment_math import summing_like_a_gpu

HOST_READS = ["item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "nonzero", "__len__"]
COLLECTIVES = ["all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
               "reduce_scatter", "all_to_all", "barrier", "send", "recv", "gather", "scatter"]


class HostSync(AssertionError):
    pass


@pytest.fixture
def gpu_summing():
    """Sum CPU tensors the way GPU tensors are summed (torch ops only)."""
    with summing_like_a_gpu():
        yield


@contextlib.contextmanager
def forbid_host_sync():
    saved = []

    def forbid(owner, name):
        def fail(*args, **kwargs):
            raise HostSync(f"{name} called in the hot path")

        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, fail)

    for name in HOST_READS:
        forbid(torch.Tensor, name)
    for name in COLLECTIVES:
        forbid(dist, name)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def test_the_guard_catches_what_it_forbids():
    t = torch.ones(2)
    with forbid_host_sync():
        for bad in (lambda: t.sum().item(), lambda: t.tolist(), lambda: int(t[0]), lambda: bool(t[0]),
                    lambda: float(t[0]), lambda: dist.all_reduce(t)):
            with pytest.raises(HostSync):
                bad()


@pytest.mark.parametrize("cp_size", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_packed_loss_path_has_no_host_sync(gpu_summing, cp_size, padded):
    config = ChannelConfig([f"c{i}" for i in range(16)])
    cu = torch.tensor([0, 8, 8, 40, 64, 64], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          cu_seqlens_q_padded=cu if padded else None)
    losses = torch.rand(1, 64 // cp_size, requires_grad=True)
    mask = (torch.rand(1, 64 // cp_size) > 0.3).float()
    channels = torch.tensor([3, 0, 15, -1, 7, 2])
    with forbid_host_sync():
        loss, num_tokens, metrics = channel_loss_func(losses, loss_mask=mask, channels=channels, config=config,
                                                      packed_seq_params=psp, cp_size=cp_size, validate=False)
    assert len(metrics) == 17


def test_unpacked_loss_path_has_no_host_sync(gpu_summing):
    config = ChannelConfig(["a", "b", "c"])
    losses = torch.rand(4, 32, requires_grad=True)
    with forbid_host_sync():
        _, _, metrics = channel_loss_func(losses, loss_mask=torch.ones(4, 32), channels=torch.tensor([0, 2, -1, 2]),
                                          config=config, validate=False)
    assert list(metrics) == ["lm loss", "loss_a", "loss_b", "loss_c"]


@pytest.mark.parametrize("cp_size", [1, 2])
def test_forward_step_batch_path_has_no_host_sync(cp_size):
    """Merging packed rows into one THD stream and the THD context-parallel cut (validate=False:
    the value checks belong to the data side)."""
    from megatron_channel.step.layout import Topology
    from megatron_channel.step.model_inputs import get_model_inputs

    rows, s = 2, 16
    tokens = torch.arange(rows * s).view(rows, s)
    batch = dict(tokens=tokens, labels=tokens, loss_mask=torch.ones(rows, s), position_ids=tokens % s,
                 cu_seqlens=torch.tensor([[0, 4, 16, 16], [0, 8, 12, 16]], dtype=torch.int32),
                 channels=torch.tensor([[0, 1, -1], [1, 1, 0]]))
    topo = Topology(cp_size=cp_size, cp_rank=cp_size - 1)
    with forbid_host_sync():
        inputs = get_model_inputs(iter([batch]), 2, None, topo, torch.device("cpu"),
                                  validate=False)
    assert inputs.tokens.shape == (1, rows * s // cp_size)
    # The non-empty sequences of both rows, then zero-length ones up to 2 rows x 256 (the default bound).
    assert inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 16, 24, 28, 32] + [32] * 507


@pytest.mark.parametrize("packed", [False, True])
def test_the_other_batch_forms_add_no_host_sync(packed):
    """Megatron-Bridge / HF forms: ``input_ids``, no ``position_ids`` (built, restarting per packed
    sequence), ``cu_seqlens_q`` with legacy -1 padding and ``cu_seqlens_argmin``, a ``max_seqlen``
    tensor, a ``[1, 1, s, s]`` mask, one row of 1-D tensors: rewritten without reading a value."""
    from megatron_channel.step.layout import Topology
    from megatron_channel.step.model_inputs import get_model_inputs

    s = 16
    tokens = torch.arange(s)
    if packed:
        batch = dict(input_ids=tokens, labels=tokens, loss_mask=torch.ones(s),
                     cu_seqlens_q=torch.tensor([0, 4, 12, 16, -1, -1], dtype=torch.int32),
                     cu_seqlens_argmin=torch.tensor([4]), max_seqlen=torch.tensor(8),
                     channels=torch.tensor([0, 1, 1, -1, -1]))
    else:
        batch = dict(input_ids=tokens[None].expand(2, s), labels=tokens[None].expand(2, s),
                     loss_mask=torch.ones(2, s), attention_mask=torch.ones(1, 1, s, s, dtype=torch.bool).triu(1),
                     channels=torch.tensor([0, 1]))
    with forbid_host_sync():
        inputs = get_model_inputs(iter([batch]), 2, None, Topology(), torch.device("cpu"), validate=False)
    if packed:
        assert inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 12, 16] + [16] * 253
        assert inputs.position_ids.tolist() == [[*range(4), *range(8), *range(4)]]
        assert inputs.packed_seq_params.max_seqlen_q == s  # a tensor max_seqlen is not read here
    else:
        assert inputs.attention_mask.shape == (1, 1, s, s) and inputs.position_ids.tolist() == [list(range(s))] * 2


def test_the_host_summing_path_is_what_the_guard_would_catch():
    """Without ``gpu_summing`` CPU tensors go through numpy: the guard sees it, so the tests
    above really check the torch path."""
    config = ChannelConfig(["a", "b"])
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    with forbid_host_sync(), pytest.raises(HostSync):
        channel_loss_func(torch.rand(1, 8), loss_mask=torch.ones(1, 8), channels=torch.tensor([0, 1]),
                          config=config, packed_seq_params=psp, cp_size=1, validate=False)


@pytest.mark.parametrize("packed", [False, True])
def test_token_accuracy_adds_no_host_sync(gpu_summing, packed):
    """The correct-token flags (the model's loss step, TP = 1) and their per-channel sums."""
    from megatron_channel.step.token_accuracy import target_is_argmax

    config = ChannelConfig(["a", "b", "c"], token_accuracy=True)
    logits, labels = torch.randn(16, 2, 50), torch.randint(0, 50, (2, 16))
    cu = torch.tensor([0, 5, 16, 16, 21, 32], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu) if packed else None
    channels = torch.tensor([0, 2, -1, 1, 1]) if packed else torch.tensor([0, 2])
    with forbid_host_sync():
        flags = target_is_argmax(logits, labels)
        shape = (1, 32) if packed else (2, 16)
        _, _, metrics = channel_loss_func(torch.rand(shape), loss_mask=torch.ones(shape), channels=channels,
                                          config=config, packed_seq_params=psp, cp_size=1, validate=False,
                                          correct_tokens=flags.reshape(shape))
    assert metrics["token acc"].tolist() == [float(flags.sum()), 32.0]


@pytest.mark.parametrize("cp_size", [1, 2])
def test_token_accuracy_on_the_fixed_length_sequence_list_adds_no_host_sync(gpu_summing, cp_size):
    """What training hands the loss: ``compact_sequences``' list of C slots, the real sequences
    first, then zero-length ones (boundaries repeating the total, channel -1)."""
    config = ChannelConfig([f"c{i}" for i in range(16)], token_accuracy=True)
    cu = torch.tensor([0, 8, 40, 64, 64, 64, 64, 64, 64], dtype=torch.int32)
    channels = torch.tensor([3, 15, 0, -1, -1, -1, -1, -1])
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    shape = (1, 64 // cp_size)
    with forbid_host_sync():
        _, _, metrics = channel_loss_func(torch.rand(shape), loss_mask=torch.ones(shape), channels=channels,
                                          config=config, packed_seq_params=psp, cp_size=cp_size, validate=False,
                                          correct_tokens=torch.ones(shape))
    assert len(metrics) == 2 + 2 * 16
    assert metrics["token_acc_c3"].tolist() == [8 / cp_size] * 2 and metrics["token_acc_c1"].tolist() == [0, 0]
