"""On a GPU, the loss path and forward_step never make the host wait for the device.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronizing CUDA call into an
error. Skipped without CUDA; the CPU guarantee is tests/test_hot_path.py.

The forward-step tests run a real GPTModel on the GPU in a world of one NCCL rank
(``megatron_cuda``), with none of the CPU stand-ins of ``megatron_channel.cpu`` or the gloo
fixture ``megatron_cpu``: a CPU global buffer would meet CUDA tensors in the local attention,
and a gloo all-reduce of CUDA tensors (the cross entropy's) synchronizes the stream.
"""

import sys

import pytest
import torch
import torch.distributed as dist

from megatron.core import utils as core_utils
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel import BatchLayout, ChannelConfig, channel_loss_func, make_forward_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = ChannelConfig([f"c{i}" for i in range(16)])

# Megatron's own GlobalMemoryBuffer.get_tensor as imported, before any CPU test's
# init_parallel replaces it (pytest imports every test module before running a test).
_GPU_GET_TENSOR = core_utils.GlobalMemoryBuffer.get_tensor
if getattr(_GPU_GET_TENSOR, "_on_cpu", False):
    _GPU_GET_TENSOR = None


class SyncIsAnError:
    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def megatron_cuda():
    """A world of one NCCL rank on the current GPU with Megatron's parallel_state at TP=PP=CP=1
    and its CUDA RNG tracker. A gloo world left by the CPU tests (``megatron_cpu`` is
    session-scoped) is put aside and rebuilt at the end, CPU buffers included."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_channel.cpu import cuda_on_cpu_installed
    from megatron_testing import init_parallel, init_single_process_group

    if cuda_on_cpu_installed():
        pytest.skip("the CPU stand-ins for CUDA are installed in this process; run this module on its own")
    if _GPU_GET_TENSOR is None:
        pytest.skip("GlobalMemoryBuffer.get_tensor was already patched to the CPU at import; run this module on its own")
    had_cpu_world = dist.is_initialized()
    if had_cpu_world:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    cpu_get_tensor = core_utils.GlobalMemoryBuffer.get_tensor
    core_utils.GlobalMemoryBuffer.get_tensor = _GPU_GET_TENSOR
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        # Port 0: the store binds a free port itself, so there is none to race for.
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1
        )
        tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
        torch.manual_seed(1234)
        yield device
    finally:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        core_utils.GlobalMemoryBuffer.get_tensor = cpu_get_tensor
        if had_cpu_world:
            init_single_process_group()
            init_parallel()  # puts the CPU buffers and the CPU-capable RNG tracker back


def device_block_causal_mask(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[1, 1, t, t]`` bool mask (True = masked) equal to causal THD attention over
    ``cu_seqlens``, built on ``cu_seqlens``' device with no host read. Tokens after the last
    boundary form one more sequence; zero-length sequences change nothing."""
    pos = torch.arange(tokens, device=cu_seqlens.device)
    seq_id = torch.searchsorted(cu_seqlens.long(), pos, right=True)
    same = seq_id[:, None] == seq_id[None, :]
    causal = pos[None, :] <= pos[:, None]
    return ~(same & causal)[None, None]


class PackedAsDeviceBlockMask(torch.nn.Module):
    """A GPTModel on the GPU with Megatron's local attention, which refuses ``packed_seq_params``:
    a packed call runs as the equivalent block-diagonal causal mask, built on the GPU from the
    ``cu_seqlens_q`` that forward_step handed over (recorded in ``seen``)."""

    def __init__(self, gpt):
        super().__init__()
        self.module = gpt  # get_attr_wrapped_model unwraps through .module
        self.seen: list[PackedSeqParams | None] = []

    def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None, **kwargs):
        self.seen.append(packed_seq_params)
        if packed_seq_params is not None:
            attention_mask = device_block_causal_mask(packed_seq_params.cu_seqlens_q, tokens.shape[1])
        return self.module(tokens, position_ids, attention_mask, **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cp_size", [1, 2])
def test_packed_channel_loss_func_does_not_sync(cp_size):
    cu = torch.tensor([0, 64, 64, 4096, 8192, 8192], dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    losses = torch.rand(1, 8192 // cp_size, device="cuda", requires_grad=True)
    mask = (torch.rand(1, 8192 // cp_size, device="cuda") > 0.3).float()
    channels = torch.tensor([3, 0, 15, -1, 7], device="cuda")
    with SyncIsAnError():
        loss, num_tokens, metrics = channel_loss_func(losses, loss_mask=mask, channels=channels, config=CONFIG,
                                                      packed_seq_params=psp, cp_size=cp_size)
        loss.backward()
    assert list(metrics)[1:] == CONFIG.metric_keys()


@pytest.mark.timeout(120)
def test_unpacked_channel_loss_func_does_not_sync():
    losses = torch.rand(4, 1024, device="cuda")
    channels = torch.tensor([0, 5, -1, 5], device="cuda")
    with SyncIsAnError():
        _, _, metrics = channel_loss_func(losses, loss_mask=torch.ones_like(losses), config=CONFIG, channels=channels)
    assert len(metrics) == 17
    # The one-hot product on the GPU gives what the same rows give on the CPU.
    _, _, on_cpu = channel_loss_func(losses.cpu(), loss_mask=torch.ones(4, 1024), config=CONFIG, channels=channels.cpu())
    for key, value in on_cpu.items():
        torch.testing.assert_close(metrics[key].cpu(), value, rtol=1e-6, atol=1e-4, msg=key)


S = 64  # tokens per row
PACKED_ROWS = torch.tensor([[0, 20, 50, S], [0, 30, S, S]], dtype=torch.int32)  # real boundaries per row
PER_ROW = 4  # --max-packed-sequences-per-row of the packed case: capacity 2 * 4 = 8, not 2 * S = 128


def sft_rows() -> dict:
    """Two packed rows in Megatron's SFTDataset form: ``cu_seqlens`` of ``S + 1`` entries per row
    padded with ``S``, one channel per sequence (``-1`` past the last), ``max_seqlen`` per row."""
    rows = PACKED_ROWS.shape[0]
    cu = torch.full((rows, S + 1), S, dtype=torch.int32)
    cu[:, : PACKED_ROWS.shape[1]] = PACKED_ROWS
    channels = torch.full((rows, S), -1, dtype=torch.int64)
    channels[0, :3] = torch.tensor([1, 2, 3])
    channels[1, :2] = torch.tensor([4, 2])
    return dict(cu_seqlens=cu, channels=channels, max_seqlen=PACKED_ROWS.diff().amax(1).to(torch.int32))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_forward_step_and_loss_do_not_sync(megatron_cuda, monkeypatch, packed):
    from megatron_testing import tiny_gpt

    training = sys.modules.get("megatron.training.training")
    if training is not None:  # forward_step feeds its packed-length statistics: keep them as they were
        for name in ("_seqlen_stats_in_iteration", "_seqlen_stats_active"):
            if hasattr(training, name):
                monkeypatch.setattr(training, name, getattr(training, name))

    rows = 2
    model = PackedAsDeviceBlockMask(tiny_gpt(vocab_size=64, seq_length=S).to(megatron_cuda))
    tokens = torch.randint(0, 64, (rows, S))
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(rows, S),
                 position_ids=torch.arange(S).expand(rows, S).contiguous())
    if packed:
        batch.update(sft_rows())
        layout = BatchLayout(rows, S, packed=True, max_sequences_per_row=PER_ROW)
    else:
        batch["channels"] = torch.tensor([0, 7])
        batch["attention_mask"] = torch.triu(torch.ones(S, S, dtype=torch.bool), 1).expand(rows, 1, S, S)
        layout = BatchLayout(rows, S, attention_mask=True)
    batch = {k: v.contiguous().pin_memory() for k, v in batch.items()}  # as Megatron's loader pins
    forward_step = make_forward_step(CONFIG, layout)
    output, loss_func = forward_step(iter([batch]), model)  # warm-up: lazy CUDA initialisation may sync once
    loss_func(output)
    model.seen.clear()
    with SyncIsAnError():
        output, loss_func = forward_step(iter([batch]), model)
        loss, num_tokens, metrics = loss_func(output)
    assert len(metrics) == 17
    assert output.is_cuda and loss.is_cuda
    (psp,) = model.seen
    per_token = output.detach().reshape(-1).double().cpu()
    if packed:
        # The model got the compacted list: the 5 real sequences of both rows, then empty ones
        # up to the layout's capacity; not one entry per padding entry (2 * S + 1 in all).
        capacity = layout.sequence_capacity
        assert psp is not None and psp.qkv_format == "thd"
        for cu in (psp.cu_seqlens_q, psp.cu_seqlens_kv):
            assert cu.is_cuda and cu.dtype == torch.int32
            assert cu.numel() == capacity + 1, f"{cu.numel()} boundaries, expected capacity + 1 = {capacity + 1}"
        assert psp.cu_seqlens_q.cpu().tolist() == [0, 20, 50, S, S + 30, 2 * S] + [2 * S] * (capacity - 5)
        assert psp.max_seqlen_q == 34  # the rows' own bound at TP = 1
        spans = {1: [(0, 20)], 2: [(20, 50), (S + 30, 2 * S)], 3: [(50, S)], 4: [(S, S + 30)]}
    else:
        assert psp is None
        spans = {0: [(0, S)], 7: [(S, 2 * S)]}
    # Each channel's [loss sum, token count] is the sum over its sequences' tokens.
    for channel, key in enumerate(CONFIG.metric_keys()):
        ranges = spans.get(channel, [])
        want = torch.tensor([sum(float(per_token[a:b].sum()) for a, b in ranges), float(sum(b - a for a, b in ranges))],
                            dtype=torch.float64)
        torch.testing.assert_close(metrics[key].double().cpu(), want, rtol=1e-5, atol=1e-5, msg=key)
