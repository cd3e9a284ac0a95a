"""End to end: a MoE GPT on packed SFT rows, micro-batch 2, trains bitwise as with Megatron's stock forward step.

With packed rows the package's forward step merges the micro-batch into one THD stream
``[1, 2 * s]`` whose ``cu_seqlens`` has a fixed length (the real sequences, then zero-length
ones). Megatron's MoE layers would route that stream as ONE sequence, so the router's
sequence-level aux loss (``seq_aux_loss``) would mix the two rows, unless
``PackedSeqParams.tokens_per_sample`` is set (stock pretrain_gpt sets ``--seq-length``), which
makes each MoE layer view the stream as ``[s, 2, h]``.

Three launches through Megatron's ``pretrain()`` with ``--cpu`` on 2 gloo ranks (DP 2), same
flags, data, attention spec (``--spec megatron_channel.cpu gpt_layer_spec``, picked by ``--cpu``
for packed rows) and seed:

* ours: ``scripts/pretrain_gpt_channel.py`` (the package's forward step, channel logging on);
* stock: ``tests/stock_forward_step.py``, the same launch with a forward step of Megatron's
  stock packed-row semantics written independently of the package (see its docstring);
* stock without ``tokens_per_sample``: the stock step routing the merged stream as one
  sequence, to show that the comparison sees the routing difference.

MoE on the CPU needs ``--disable-bias-linear``: with expert biases, Megatron's expert MLP adds
the bias in place to the output of ``_ReduceFromModelParallelRegion`` (returned as-is at TP 1),
which autograd refuses ("Output 0 of _ReduceFromModelParallelRegion is a view and is being
modified inplace").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pretrain_runs import ROOT, Run, blend_flags, model_flags, read_events, run_pretrain
from test_pretrain_e2e import sft_flags  # noqa: F401  (a module fixture: the packed SFT flags; data_dir is conftest's)

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

STOCK_SCRIPT = os.path.join(ROOT, "tests", "stock_forward_step.py")
ITERATIONS = 12
MOE = [
    "--num-experts", "4", "--moe-router-topk", "2",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2",
    "--moe-token-dispatcher-type", "alltoall", "--disable-bias-linear",
]
# Per-iteration console lines, two evaluations and the final one, a checkpoint of the last step.
SCHEDULE = ["--train-iters", str(ITERATIONS), "--log-interval", "1", "--eval-interval", "6", "--eval-iters", "2",
            "--save-interval", str(ITERATIONS), "--ckpt-format", "torch"]
AUX_LOSS = "seq_load_balancing_loss"


def run_stock(run_dir: str, flags: list[str], nproc: int = 2, timeout: float = 400) -> Run:
    """``run_pretrain`` for ``tests/stock_forward_step.py`` (same torchrun launch, same outputs)."""
    tensorboard_dir = os.path.join(run_dir, "tensorboard")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               STOCK_SCRIPT, "--cpu", *flags, "--tensorboard-dir", tensorboard_dir]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"stock run failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return Run(proc.stdout, [], read_events(tensorboard_dir))


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, data_dir, sft_flags):  # noqa: F811
    """name -> (Run, path of the last checkpoint), each launched once."""
    root = tmp_path_factory.mktemp("moe_runs")
    cache = {}

    def get(name: str):
        if name in cache:
            return cache[name]
        run_dir = str(root / name)
        checkpoint = os.path.join(run_dir, "checkpoint")
        channels = ["--channel-config", os.path.join(ROOT, "configs", "channels.yaml")]
        flags = [
            *model_flags(),
            *blend_flags(data_dir, sft_flags["data"], channels, sft_flags["tokenizer"]),
            *MOE, *SCHEDULE, "--save", checkpoint,
        ]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("HF_HUB_OFFLINE", "1")  # the tokenizer is a local directory
            if name == "ours":
                run = run_pretrain(run_dir, flags)
            elif name == "stock":
                run = run_stock(run_dir, flags)
            else:
                assert name == "stock_without_tokens_per_sample"
                run = run_stock(run_dir, [*flags, "--stock-without-tokens-per-sample"])
        cache[name] = run, os.path.join(checkpoint, f"iter_{ITERATIONS:07d}", "mp_rank_00", "model_optim_rng.pt")
        return cache[name]

    return get


def model_state(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def check_is_packed_moe(run: Run, state: dict[str, torch.Tensor]):
    assert "using --spec megatron_channel.cpu gpt_layer_spec" in run.stdout  # packed rows, CPU attention
    assert sorted(run.iteration_lines()) == list(range(1, ITERATIONS + 1))
    assert [step for step, _ in run.events[AUX_LOSS]] == list(range(1, ITERATIONS + 1))
    assert all(value > 0 for _, value in run.events[AUX_LOSS])  # the router's aux loss is computed
    for layer in (0, 1):
        assert state[f"decoder.layers.{layer}.mlp.router.weight"].shape == (4, 64)
        assert f"decoder.layers.{layer}.mlp.experts.local_experts.3.linear_fc1.weight" in state


def test_moe_on_packed_rows_trains_bitwise_as_stock(moe_runs):
    ours, ours_checkpoint = moe_runs("ours")
    stock, stock_checkpoint = moe_runs("stock")
    ours_state, stock_state = model_state(ours_checkpoint), model_state(stock_checkpoint)
    check_is_packed_moe(ours, ours_state)
    check_is_packed_moe(stock, stock_state)
    assert "loss_chat" in ours.iteration_lines()[1] and "loss_chat" not in stock.iteration_lines()[1]

    # Console: lm loss (7 digits), the aux loss, grad norm (3 decimals), every iteration.
    ours_lines, stock_lines = ours.iteration_lines(), stock.iteration_lines()
    for iteration in range(1, ITERATIONS + 1):
        for key in ("lm loss", AUX_LOSS, "grad norm"):
            assert ours_lines[iteration][key] == stock_lines[iteration][key], (iteration, key)
    assert [f["lm loss value"] for _, f in ours.validation_lines()] == [
        f["lm loss value"] for _, f in stock.validation_lines()]
    assert len(ours.validation_lines()) == 3  # iterations 6 and 12, and the final evaluation

    # TensorBoard (float32, every iteration): the same values bit for bit.
    for tag in ("lm loss", "grad-norm", AUX_LOSS, "lm loss validation"):
        assert ours.events[tag] == stock.events[tag], tag
    assert len(ours.events["lm loss validation"]) == 3

    # And the model after the last step: every parameter bitwise equal.
    assert sorted(ours_state) == sorted(stock_state)
    for key, value in ours_state.items():
        assert torch.equal(value, stock_state[key]), key


def test_routing_the_merged_rows_as_one_sequence_is_detected(moe_runs):
    """The stock step without tokens_per_sample: same data and first forward, other routing loss.

    Without ``tokens_per_sample`` the MoE layers see one sequence of 2 * s tokens, so the
    sequence-level aux loss (and its gradient) differs from the first iteration on; the
    cross-entropy of that first forward does not (routing picks experts per token).
    """
    stock, stock_checkpoint = moe_runs("stock")
    merged, merged_checkpoint = moe_runs("stock_without_tokens_per_sample")
    merged_state = model_state(merged_checkpoint)
    check_is_packed_moe(merged, merged_state)
    aux, merged_aux = dict(stock.events[AUX_LOSS]), dict(merged.events[AUX_LOSS])
    loss, merged_loss = dict(stock.events["lm loss"]), dict(merged.events["lm loss"])
    grad, merged_grad = dict(stock.events["grad-norm"]), dict(merged.events["grad-norm"])
    assert loss[1] == merged_loss[1]
    assert aux[1] != merged_aux[1]
    assert grad[1] != merged_grad[1]
    assert all(loss[i] != merged_loss[i] for i in range(2, ITERATIONS + 1))
    assert stock.events["lm loss validation"] != merged.events["lm loss validation"]
    stock_state = model_state(stock_checkpoint)
    assert not all(torch.equal(value, merged_state[key]) for key, value in stock_state.items())
