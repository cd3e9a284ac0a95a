"""On a GPU, the loss path and forward_step never make the host wait for the device.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronizing CUDA call into an
error. Skipped without CUDA; the CPU guarantee is tests/test_hot_path.py.
"""

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel import ChannelConfig, channel_loss_func, make_forward_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = ChannelConfig([f"c{i}" for i in range(16)])


class SyncIsAnError:
    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_forward_step_and_loss_do_not_sync(megatron_cpu, packed):
    from megatron_channel.testing import block_causal_mask, tiny_gpt

    s, rows = 64, 1 if packed else 2
    model = tiny_gpt(vocab_size=64, seq_length=s).cuda()
    tokens = torch.randint(0, 64, (rows, s))
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(rows, s),
                 position_ids=torch.arange(s).expand(rows, s).contiguous())
    if packed:
        batch["cu_seqlens"] = torch.tensor([[0, 20, 20, 50, s, s]], dtype=torch.int32)
        batch["channels"] = torch.tensor([[1, 2, 3, 4, -1]])
        batch["attention_mask"] = block_causal_mask(batch["cu_seqlens"], s)
    else:
        batch["channels"] = torch.tensor([0, 7])
        batch["attention_mask"] = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).expand(rows, 1, s, s)
    batch = {k: v.contiguous().pin_memory() for k, v in batch.items()}  # as Megatron's loader pins
    forward_step = make_forward_step(CONFIG, pass_packed_seq_params=False)
    forward_step(iter([batch]), model)  # warm-up: lazy CUDA initialisation may sync once
    with SyncIsAnError():
        output, loss_func = forward_step(iter([batch]), model)
        loss, num_tokens, metrics = loss_func(output)
    assert len(metrics) == 17
