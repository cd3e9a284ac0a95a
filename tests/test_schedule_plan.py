"""Token accuracy with the combined 1F1B schedule plan (``--overlap-moe-expert-parallel-comm``).

Megatron's schedule asks ``forward_step(..., return_schedule_plan=True)`` for a plan instead
of the model's output; the plan's post-process node calls ``GPTModel._postprocess`` with the
``output_processor`` handed to ``build_schedule_plan``. The plan runs here on the CPU (the
``--cpu`` layer's CUDA stand-ins, in a process of its own) and its correct-token counts match
an argmax reference over the logits the same plan computes without labels.
"""

import pytest
import torch

from megatron_testing import run_distributed

VOCAB, S = 8, 16


def _plan_worker(rank, world_size):
    from megatron_channel.cpu import install_cuda_on_cpu

    install_cuda_on_cpu()
    from megatron.core.models.common.model_chunk_schedule_plan import TransformerModelChunkSchedulePlan as Plan

    from megatron_channel import ChannelConfig, make_forward_step
    from megatron_testing import init_parallel, tiny_gpt

    init_parallel()
    gpt = tiny_gpt(vocab_size=VOCAB, seq_length=S).eval()  # a small vocabulary: some argmaxes are right
    gen = torch.Generator().manual_seed(0)
    batch = dict(tokens=torch.randint(0, VOCAB, (2, S), generator=gen),
                 labels=torch.randint(0, VOCAB, (2, S), generator=gen),
                 loss_mask=(torch.rand(2, S, generator=gen) > 0.25).float(),
                 position_ids=torch.arange(S).expand(2, S), channels=torch.tensor([1, 0]))
    config = ChannelConfig(["a", "b"], token_accuracy=True)
    with torch.no_grad():
        plan, loss_func = make_forward_step(config)(iter([batch]), gpt, return_schedule_plan=True)
        losses = Plan.run(plan, None)
        logits = Plan.run(gpt.build_schedule_plan(batch["tokens"], batch["position_ids"], None), None)
    _, _, metrics = loss_func(losses)
    logits = logits.double()
    correct = (logits.gather(-1, batch["labels"][..., None]).squeeze(-1) == logits.amax(-1)).double()
    correct = correct * batch["loss_mask"]
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, batch["labels"][..., None]).squeeze(-1)
    return dict(metrics={k: v.tolist() for k, v in metrics.items()},
                want_acc=[correct[1].sum().item(), correct[0].sum().item()], want_all=correct.sum().item(),
                want_loss=[(ce * batch["loss_mask"])[1].sum().item(), (ce * batch["loss_mask"])[0].sum().item()],
                counts=[batch["loss_mask"][1].sum().item(), batch["loss_mask"][0].sum().item()])


@pytest.mark.timeout(120)
def test_token_accuracy_runs_in_the_combined_1f1b_schedule_plan():
    result = run_distributed(_plan_worker, 1, timeout=100)[0]
    metrics = result["metrics"]
    assert result["want_all"] > 0  # the check can see a correct token
    assert metrics["token acc"] == [result["want_all"], sum(result["counts"])]
    for i, name in enumerate(("a", "b")):
        assert metrics[f"token_acc_{name}"] == [result["want_acc"][i], result["counts"][i]]
        assert abs(metrics[f"loss_{name}"][0] - result["want_loss"][i]) <= 1e-5 * result["want_loss"][i]
