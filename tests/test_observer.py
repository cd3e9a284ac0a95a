"""Observer-only: tracking channels never changes training.

Two copies of the same real GPTModel train side by side for a few optimizer steps, one with
Megatron's stock GPT loss_func, one through make_forward_step; loss, num_tokens and every
parameter gradient must be bitwise equal at every step.
"""

import pytest
import torch

from megatron_channel import ChannelConfig, make_forward_step
from megatron_testing import block_causal_mask, tiny_gpt

S, VOCAB = 24, 48
CONFIG = ChannelConfig(["math", "code", "chat"])


def stock_loss_func(loss_mask, output_tensor):
    """Megatron-LM pretrain_gpt.py's loss_func (without its NaN/spike checks)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def make_batch(gen, packed):
    rows = 1 if packed else 3
    tokens = torch.randint(0, VOCAB, (rows, S), generator=gen)
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1),
                 loss_mask=(torch.rand(rows, S, generator=gen) > 0.25).float())
    if packed:
        cu = torch.tensor([[0, 7, 7, 15, S, S]], dtype=torch.int32)
        batch["cu_seqlens"] = cu
        batch["position_ids"] = torch.cat([torch.arange(n) for n in (7, 8, S - 15)])[None]
        batch["attention_mask"] = block_causal_mask(cu, S)
        batch["channels"] = torch.tensor([[2, 0, 1, -1, 1]])
    else:
        batch["position_ids"] = torch.arange(S).expand(rows, S)
        batch["attention_mask"] = torch.triu(torch.ones(S, S, dtype=torch.bool), 1).expand(rows, 1, S, S)
        batch["channels"] = torch.tensor([1, -1, 0])
    return batch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_channel_tracking_is_bitwise_invisible_to_training(megatron_cpu, packed):
    torch.manual_seed(7)
    stock_model = tiny_gpt(vocab_size=VOCAB, seq_length=S)
    channel_model = tiny_gpt(vocab_size=VOCAB, seq_length=S)
    channel_model.load_state_dict(stock_model.state_dict())
    stock_opt = torch.optim.Adam(stock_model.parameters(), lr=1e-2)
    channel_opt = torch.optim.Adam(channel_model.parameters(), lr=1e-2)
    forward_step = make_forward_step(CONFIG, pass_packed_seq_params=False)
    gen = torch.Generator().manual_seed(3)

    for step in range(4):
        batch = make_batch(gen, packed)
        stock_out = stock_model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        stock_loss, stock_tokens, _ = stock_loss_func(batch["loss_mask"], stock_out)
        output, loss_func = forward_step(iter([batch]), channel_model)
        loss, num_tokens, metrics = loss_func(output)

        assert torch.equal(loss, stock_loss), f"step {step}: loss {loss} != stock {stock_loss}"
        assert loss.dtype == stock_loss.dtype and num_tokens.dtype == stock_tokens.dtype
        assert torch.equal(num_tokens, stock_tokens), f"step {step}: num_tokens differ"
        assert list(metrics) == ["lm loss"] + CONFIG.metric_keys()

        for opt in (stock_opt, channel_opt):
            opt.zero_grad(set_to_none=True)
        (stock_loss / stock_tokens).backward()
        (loss / num_tokens).backward()
        for (name, p_stock), (_, p_chan) in zip(stock_model.named_parameters(), channel_model.named_parameters()):
            assert torch.equal(p_stock.grad, p_chan.grad), f"step {step}: gradient of {name} differs"
        stock_opt.step()
        channel_opt.step()

    for (name, p_stock), (_, p_chan) in zip(stock_model.named_parameters(), channel_model.named_parameters()):
        assert torch.equal(p_stock, p_chan), f"parameter {name} diverged"


@pytest.mark.timeout(60)
def test_forward_step_takes_the_schedules_extra_arguments(megatron_cpu):
    """Megatron's schedule may pass checkpoint_activations_microbatch positionally; it must not
    be taken for return_schedule_plan."""
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=VOCAB, seq_length=S)
    forward_step = make_forward_step(CONFIG)
    gen = torch.Generator().manual_seed(0)
    for extra in ((), (None,), (True,), (False,)):
        output, loss_func = forward_step(iter([make_batch(gen, packed=False)]), model, *extra)
        assert isinstance(output, torch.Tensor) and output.shape == (3, S)
        assert list(loss_func(output)[2]) == ["lm loss"] + CONFIG.metric_keys()


class SchedulePlanRecorder(torch.nn.Module):
    """A model chunk with ``build_schedule_plan``, as Megatron's combined 1F1B schedule calls it."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.plan_calls = []

    def build_schedule_plan(self, *args, **kwargs):
        self.plan_calls.append((args, kwargs))
        return "plan"

    def forward(self, *args, **kwargs):
        raise AssertionError("return_schedule_plan=True must build a schedule plan, not run forward")


@pytest.mark.timeout(60)
def test_return_schedule_plan_builds_the_plan_with_the_model_inputs(megatron_cpu):
    torch.manual_seed(0)
    model = SchedulePlanRecorder(tiny_gpt(vocab_size=VOCAB, seq_length=S))
    batch = make_batch(torch.Generator().manual_seed(0), packed=False)
    output, loss_func = make_forward_step(CONFIG)(iter([batch]), model, None, return_schedule_plan=True)
    assert output == "plan" and len(model.plan_calls) == 1
    (tokens, position_ids, attention_mask), kwargs = model.plan_calls[0]
    assert torch.equal(tokens, batch["tokens"]) and torch.equal(position_ids, batch["position_ids"])
    assert torch.equal(kwargs["labels"], batch["labels"]) and torch.equal(kwargs["loss_mask"], batch["loss_mask"])
    assert kwargs["packed_seq_params"] is None
    assert loss_func.keywords["channels"].tolist() == batch["channels"].tolist()
