"""Channel logging: exact token-weighted intervals, no NaN, through Megatron's real logging code.

* Pure accounting (``ChannelAccountant``): windows where a channel is absent in some or all
  iterations give no loss value (never NaN); interval losses equal ``sum / tokens`` computed
  with ``fractions.Fraction`` from the iteration table; cumulative tokens and shares; a
  hypothesis property over random tables.
* Internals check: passes on the installed megatron-core; a function object with another
  signature, one that no longer looks a name up as a global, and another version each
  fail with a message naming what changed.
* ``install_channel_logging``: idempotent, reconfigurable, undone by uninstall.
* The real ``megatron.training.training.training_log`` through the installed wrapper, with
  real global vars from Megatron's own parser (``--log-interval 2 --tensorboard-dir ...``):
  the printed iteration line carries the channel fields after ``lm loss`` and no ``nan``; the
  TensorBoard event files (read back with EventAccumulator) and W&B hold the exact values.
  CPU shims, both for CUDA-only calls in code paths unrelated to channels:
  ``torch.cuda.current_device`` returns ``"cpu"`` (``reduce_max_stat_across_model_parallel_group``
  builds its one-element tensor there), and the interval timer gets its elapsed time through
  ``Timer.set_elapsed`` (``Timer.start`` calls ``torch.cuda.synchronize``). Stock training_log
  also allocates ``torch.tensor(..., device='cuda')`` for every key of ``loss_dict`` and resets
  each ``total_loss_dict`` key to one at every log line, so the loop passes ``loss_dict={}``
  (channel keys never reach it anyway) and shows ``lm loss`` only on the first iteration,
  which Megatron logs without resetting.
* The train_step wrapper over two real gloo ranks (DP=2): the real ``channel_loss_func`` on
  synthetic per-token losses, a real tiny GPTModel as ``model`` (its pg_collection gives the
  group), and, standing in for train_step so that a rerun of the iteration can be forced, a
  function with the real signature that runs forward_backward twice and reduces ``lm loss``
  as stock does (the real train_step runs in test_pretrain_e2e.py).
  Checked: stock code sees no channel key; the handed totals equal a float64 reference over
  both ranks' data; one all-reduce for all channels; the rerun is not double counted.
* The real ``evaluate_and_print_results`` over the evaluate wrapper (a stand-in for
  ``evaluate`` with its signature feeds hand-made microbatches with an empty channel; the
  real ``evaluate`` runs in test_pretrain_e2e.py):
  ``loss_math validation`` written by Megatron's own code, exact; an empty channel absent
  from TensorBoard, shown with 0 tokens on the console, null in the jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from fractions import Fraction
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megatron.training.training as training
from megatron.training import global_vars
from megatron.training.arguments import add_megatron_arguments, validate_args

from megatron_channel import ChannelConfig, channel_loss_func
from megatron_channel.channel_logging import (
    ChannelAccountant,
    ChannelLogger,
    ChannelMetricsError,
    capturing_loss_func,
    MegatronInternalsError,
    check_global_lookups,
    check_megatron_internals,
    check_megatron_version,
    check_signature,
    console_fields,
    insert_into_iteration_line,
    install_channel_logging,
    installed_channel_logger,
    split_channel_metrics,
    train_record,
    train_scalars,
    uninstall_channel_logging,
    wrap_evaluate,
    wrap_evaluate_and_print_results,
    wrap_train_step,
)
from megatron_channel.testing import init_parallel, run_distributed, summing_like_a_gpu, tiny_gpt

CONFIG = ChannelConfig(["math", "code", "chat"])
NAMES = CONFIG.channels

# One row per iteration: per channel (loss sum, tokens), then all loss tokens ("lm loss"),
# and whether Megatron skipped the iteration. Sums are multiples of 1/4: exact in float32.
ITERATIONS = [
    dict(rows=[(10.0, 4), (3.0, 2), (0.0, 0)], lm=(15.0, 8), skipped=False),
    dict(rows=[(2.0, 2), (0.0, 0), (2.25, 1)], lm=(4.25, 3), skipped=False),
    dict(rows=[(100.0, 1), (100.0, 1), (100.0, 1)], lm=(300.0, 3), skipped=True),
    dict(rows=[(6.0, 2), (0.0, 0), (0.0, 0)], lm=(6.0, 2), skipped=False),
]


def totals_of(it) -> torch.Tensor:
    return torch.tensor([*it["rows"], it["lm"]], dtype=torch.float64)


def reference(iterations):
    """Exact (Fraction) window values from the table: loss and share per channel, None when empty."""
    kept = [it for it in iterations if not it["skipped"]]
    total = sum(Fraction(it["lm"][1]) for it in kept)
    out = {}
    for i, name in enumerate(NAMES):
        s = sum(Fraction(it["rows"][i][0]) for it in kept)
        n = sum(Fraction(it["rows"][i][1]) for it in kept)
        out[name] = dict(loss=s / n if n else None, tokens=n, share=n / total if total else None)
    return out


def no_nan(text: str) -> bool:
    """No printed value is NaN or inf (Megatron's own "number of nan iterations" label is fine)."""
    return re.search(r":\s*[-+]?(nan|inf)", text, re.IGNORECASE) is None


# ----------------------------------------------------------------------------- pure accounting


@pytest.mark.timeout(30)
def test_interval_means_are_exact_and_token_weighted():
    accountant = ChannelAccountant(CONFIG)
    for it in ITERATIONS[:2]:
        accountant.add_iteration(totals_of(it))
    report = accountant.console_report()
    want = reference(ITERATIONS[:2])
    for i, name in enumerate(NAMES):
        assert report.window.loss(i) == want[name]["loss"]  # Fractions of dyadic values: exact
        assert report.window.tokens[i] == want[name]["tokens"]
        assert report.window.share(i) == pytest.approx(float(want[name]["share"]), rel=1e-15)
    # Token weighting matters: the unweighted mean of per-iteration math losses is 1.75.
    assert report.window.loss(0) == 2.0
    assert report.window.iterations == 2


@pytest.mark.timeout(30)
def test_absent_channel_never_yields_nan():
    accountant = ChannelAccountant(CONFIG)
    accountant.add_iteration(totals_of(ITERATIONS[3]))  # code and chat have no tokens
    report = accountant.console_report()
    assert report.window.loss(1) is None and report.window.loss(2) is None
    fields = console_fields(report, CONFIG)
    assert no_nan(fields)
    assert " loss_math: 3.000000E+00 |" in fields and " tokens_code: 0 |" in fields
    assert "loss_code:" not in fields and "loss_chat:" not in fields
    scalars = train_scalars(report, CONFIG)
    assert all(math.isfinite(v) for v in scalars.values())
    assert "loss_code" not in scalars and scalars["tokens_code"] == 0.0
    record = json.dumps(train_record(report, 4), allow_nan=False)
    assert json.loads(record)["channels"]["code"]["loss"] is None


@pytest.mark.timeout(30)
def test_cumulative_tokens_shares_and_independent_windows():
    accountant = ChannelAccountant(CONFIG)
    for it in ITERATIONS:
        if not it["skipped"]:
            accountant.add_iteration(totals_of(it))
        if it is ITERATIONS[1]:
            tb_after_two = accountant.tensorboard_report()
    console = accountant.console_report()
    tb = accountant.tensorboard_report()
    want_all = reference(ITERATIONS)
    assert tb_after_two.window.iterations == 2 and tb.window.iterations == 1
    assert console.window.iterations == 3  # the console window was not reset by the TB one
    assert tb.window.loss(0) == 3.0 and tb.window.share(0) == 1.0
    for i, name in enumerate(NAMES):
        assert tb.cumulative.tokens[i] == want_all[name]["tokens"] == console.window.tokens[i]
        assert tb.cumulative.share(i) == pytest.approx(float(want_all[name]["share"]), rel=1e-15)
    assert tb.cumulative.total_tokens == 13.0
    scalars = train_scalars(tb, CONFIG)
    assert scalars["tokens_math cumulative"] == 8.0 and scalars["token share chat cumulative"] == 1 / 13
    assert scalars["loss tokens"] == 2.0 and scalars["loss tokens cumulative"] == 13.0
    assert accountant.console_report() is None  # an empty window reports nothing


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), min_size=3, max_size=3),
                min_size=1, max_size=8))
def test_property_any_table_gives_exact_values_and_no_nan(table):
    iterations = [
        dict(rows=[(s / 8 if n else 0.0, n) for s, n in rows],
             lm=(sum(s for s, n in rows if n) / 8, sum(n for _, n in rows)), skipped=False)
        for rows in table
    ]
    accountant = ChannelAccountant(CONFIG)
    for it in iterations:
        accountant.add_iteration(totals_of(it))
    report = accountant.console_report()
    want = reference(iterations)
    for i, name in enumerate(NAMES):
        got = report.window.loss(i)
        assert (got is None) == (want[name]["loss"] is None)
        if got is not None:
            assert got == pytest.approx(float(want[name]["loss"]), rel=1e-14)
    assert all(math.isfinite(v) for v in train_scalars(report, CONFIG).values())
    assert no_nan(console_fields(report, CONFIG))
    json.dumps(train_record(report, 1), allow_nan=False)


@pytest.mark.timeout(30)
def test_insert_into_iteration_line():
    line = " [t] iteration        2/      10 | lr: 1.0E-03 | lm loss: 2.000000E+00 | loss scale: 1.0 | grad norm: 1.5 |"
    assert insert_into_iteration_line(line, " X: 1 |") == (
        " [t] iteration        2/      10 | lr: 1.0E-03 | lm loss: 2.000000E+00 | X: 1 | loss scale: 1.0 | grad norm: 1.5 |"
    )
    no_lm = " [t] iteration 2/ 10 | a: 1 | loss scale: 1.0 |"
    assert insert_into_iteration_line(no_lm, " X: 1 |") == " [t] iteration 2/ 10 | a: 1 | X: 1 | loss scale: 1.0 |"
    assert insert_into_iteration_line(" iteration 2 | a: 1 |", " X: 1 |") == " iteration 2 | a: 1 | X: 1 |"


@pytest.mark.timeout(30)
def test_split_channel_metrics_rejects_mismatched_configs():
    metrics = {"lm loss": torch.tensor([3.0, 2.0]), **{k: torch.tensor([1.0, 1.0]) for k in CONFIG.metric_keys()}}
    rows, rest = split_channel_metrics(metrics, CONFIG)
    assert rows.shape == (4, 2) and list(rest) == ["lm loss"]
    with pytest.raises(ChannelMetricsError, match=r"lack \['loss_chat'\].*make_forward_step\(config\)"):
        split_channel_metrics({k: v for k, v in metrics.items() if k != "loss_chat"}, CONFIG)
    with pytest.raises(ChannelMetricsError, match=r"lack \['loss_math', 'loss_code', 'loss_chat'\]"):
        split_channel_metrics({"lm loss": torch.tensor([3.0, 2.0])}, CONFIG)
    with pytest.raises(ChannelMetricsError, match=r"\['loss_web'\] that the logging config does not name"):
        split_channel_metrics({**metrics, "loss_web": torch.tensor([1.0, 1.0])}, CONFIG)


@pytest.mark.timeout(30)
def test_capture_adds_no_host_sync_or_collective_to_loss_func():
    """The captured loss_func only stacks tensors: no value read, no collective, per microbatch
    (CPU tensors summed the way GPU tensors are, since numpy reads CPU values by design)."""
    losses, mask, channels = torch.rand(2, 6), torch.ones(2, 6), torch.tensor([0, 2])
    captured = []
    loss_func = capturing_loss_func(
        partial(channel_loss_func, loss_mask=mask, channels=channels, config=CONFIG, validate=False), CONFIG, captured
    )
    forbidden = [(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")]
    forbidden += [(torch.distributed, n) for n in ("all_reduce", "all_gather", "broadcast", "barrier")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in forbidden]

    def fail(*args, **kwargs):
        raise AssertionError("host sync or collective in the loss path")

    try:
        for owner, name, _ in saved:
            setattr(owner, name, fail)
        with summing_like_a_gpu():
            loss, num_tokens, metrics = loss_func(losses)
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    assert list(metrics) == ["lm loss"] and len(captured) == 1 and captured[0].shape == (4, 2)
    assert captured[0][3].tolist() == [float(loss), 12.0]


# ----------------------------------------------------------------------------- internals check


@pytest.mark.timeout(30)
def test_internals_check_passes_on_installed_megatron():
    check_megatron_internals()


@pytest.mark.timeout(30)
def test_internals_check_names_what_changed():
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                     skipped_iter, grad_norm, params_norm, num_zeros_in_grad, max_attention_logit,
                     pg_collection=None, is_first_iteration=False, seqlen_squared_sum_in_batch=None,
                     total_real_tokens_in_batch=None, new_option=None):
        pass

    from megatron_channel.channel_logging import EXPECTED_SIGNATURES

    check_signature(training.training_log, EXPECTED_SIGNATURES["training_log"], "training_log")
    with pytest.raises(MegatronInternalsError, match=r"training_log changed.*added \['new_option'\].*0\.19\.x"):
        check_signature(training_log, EXPECTED_SIGNATURES["training_log"], "training_log")

    def train(*args):
        from megatron.training.training import train_step  # a local import bypasses the module global

        return train_step(*args)

    with pytest.raises(MegatronInternalsError, match=r"train no longer looks up \['train_step', 'training_log'\]"):
        check_global_lookups(train, ["train_step", "training_log"], "train")
    with pytest.raises(MegatronInternalsError, match=r"megatron-core is 0\.20\.0.*0\.19\.x"):
        check_megatron_version((0, 20, 0))


# ----------------------------------------------------------------------------- install


@pytest.fixture
def clean_install():
    uninstall_channel_logging()
    yield
    uninstall_channel_logging()


WRAPPED = ("train_step", "training_log", "evaluate", "evaluate_and_print_results")


@pytest.mark.timeout(30)
def test_install_is_idempotent_and_uninstall_restores(clean_install, tmp_path):
    originals = {n: getattr(training, n) for n in WRAPPED}
    install_channel_logging(CONFIG)
    first = {n: getattr(training, n) for n in WRAPPED}
    logger = installed_channel_logger()
    install_channel_logging(CONFIG)
    for n in WRAPPED:
        assert getattr(training, n) is first[n] is not originals[n]
        assert first[n]._channel_logging_original is originals[n]
    assert installed_channel_logger() is logger
    # Another config replaces the installation, still wrapping the originals once.
    install_channel_logging(ChannelConfig(["a"]), jsonl_path=str(tmp_path / "x.jsonl"))
    for n in WRAPPED:
        assert getattr(training, n)._channel_logging_original is originals[n]
    uninstall_channel_logging()
    for n in WRAPPED:
        assert getattr(training, n) is originals[n]
    with pytest.raises(TypeError, match="ChannelConfig"):
        install_channel_logging(["math"])
    with pytest.raises(ValueError, match="jsonl_path=.*is a directory"):
        install_channel_logging(CONFIG, jsonl_path=str(tmp_path))


@pytest.mark.timeout(30)
def test_install_refuses_a_changed_training_module_and_leaves_it_alone(clean_install, monkeypatch):
    def train_step(forward_step_func, data_iterator, model, optimizer, new_option=None):
        return None

    monkeypatch.setattr(training, "train_step", train_step)
    before = {n: getattr(training, n) for n in WRAPPED}
    with pytest.raises(MegatronInternalsError, match=r"train_step changed.*added \['new_option'\].*0\.19\.x"):
        install_channel_logging(CONFIG)
    assert {n: getattr(training, n) for n in WRAPPED} == before
    assert installed_channel_logger() is None


# ----------------------------------------------------------------------------- real training_log


class WandbRecorder:
    """Stands in for the wandb run object Megatron keeps as its W&B writer (wandb is not installed)."""

    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log(self, values, step=None):
        self.logged.append((dict(values), step))


def megatron_args(tmp_path, *extra):
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


def read_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(60)
def test_real_training_log_prints_and_writes_exact_channel_values(megatron_globals, tmp_path, capsys):
    args, wandb = megatron_globals
    jsonl = tmp_path / "run" / "channels.jsonl"
    install_channel_logging(CONFIG, jsonl_path=str(jsonl))
    logger = installed_channel_logger()
    timers = global_vars.get_timers()
    total_loss_dict = {"lm loss": torch.tensor([2.0])}

    lines = {}
    for iteration, it in enumerate(ITERATIONS, start=1):
        if iteration == 2:
            del total_loss_dict["lm loss"]  # see the module docstring: stock resets it on CUDA
        logger.pending_train_totals = totals_of(it)  # what the train_step wrapper hands over
        args.consumed_train_samples = 4 * iteration
        timers("interval-time", log_level=0).set_elapsed(0.5)
        training.training_log(
            {}, total_loss_dict, 1e-3, iteration, 1.0, False, int(it["skipped"]), 1.5, None, None, None,
            is_first_iteration=(iteration == 1),
        )
        out = capsys.readouterr().out
        lines[iteration] = [line for line in out.splitlines() if " iteration " in line]
    global_vars.get_tensorboard_writer().flush()

    # Console: iteration 1 (first, not reset), 2 (window 1..2), 4 (window 3..4, 3 skipped).
    assert [len(lines[i]) for i in (1, 2, 3, 4)] == [1, 1, 0, 1]
    first, second, fourth = lines[1][0], lines[2][0], lines[4][0]
    for line in (first, second, fourth):
        assert no_nan(line), line
    assert " lm loss: 2.000000E+00 | loss_math: 2.500000E+00 | tokens_math: 4 | token share math: 0.5000 |" in first
    assert " loss_code: 1.500000E+00 | tokens_code: 2 | token share code: 0.2500 |" in first
    assert " tokens_chat: 0 | token share chat: 0.0000 |" in first and "loss_chat" not in first
    want = reference(ITERATIONS[:2])
    for name, key in zip(NAMES, CONFIG.metric_keys()):
        assert f" {key}: {float(want[name]['loss']):.6E} |" in second
        assert f" tokens_{name}: {want[name]['tokens']} |" in second
    assert " loss_math: 3.000000E+00 | tokens_math: 2 | token share math: 1.0000 |" in fourth
    assert "loss_code:" not in fourth and " tokens_code: 0 |" in fourth
    assert fourth.index("loss_math") < fourth.index(" loss scale:")

    # TensorBoard: one point per non-empty iteration window (interval 1), nothing at the skipped one.
    scalars = read_scalars(tmp_path / "tb")
    assert "learning-rate" in scalars  # the real training_log wrote through the same writer
    assert scalars["loss_math"] == pytest.approx({1: 2.5, 2: 1.0, 4: 3.0}, rel=1e-7)
    assert scalars["loss_code"] == pytest.approx({1: 1.5}, rel=1e-7)
    assert scalars["loss_chat"] == pytest.approx({2: 2.25}, rel=1e-7)
    assert scalars["tokens_code"] == {1: 2.0, 2: 0.0, 4: 0.0}
    assert scalars["tokens_math cumulative"] == {1: 4.0, 2: 6.0, 4: 8.0}
    assert scalars["token share chat"] == pytest.approx({1: 0.0, 2: 1 / 3, 4: 0.0}, rel=1e-7)
    assert scalars["token share math cumulative"] == pytest.approx({1: 0.5, 2: 6 / 11, 4: 8 / 13}, rel=1e-7)
    assert scalars["loss_math vs samples"] == pytest.approx({4: 2.5, 8: 1.0, 16: 3.0}, rel=1e-7)
    assert all(math.isfinite(v) for series in scalars.values() for v in series.values())

    # W&B: the same names and values at the same steps.
    ours = {}
    for values, step in wandb.logged:
        for name, value in values.items():
            if name in scalars and name != "learning-rate":
                ours.setdefault(name, {})[step] = value
    assert ours["loss_math"] == {1: 2.5, 2: 1.0, 4: 3.0}
    assert ours["token share math cumulative"] == {1: 0.5, 2: 6 / 11, 4: 8 / 13}

    # jsonl: one record per console line.
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 4]
    assert records[1]["channels"]["math"] == dict(
        loss=2.0, tokens=6.0, tokens_cumulative=6.0, share=6 / 11, share_cumulative=6 / 11
    )
    assert records[2]["channels"]["code"]["loss"] is None and records[2]["channels"]["code"]["tokens"] == 0.0
    assert records[2]["loss_tokens_cumulative"] == 13.0


# ----------------------------------------------------------------------------- train_step wrapper

MICROBATCHES = 3
ROWS, SEQ = 2, 5
# Row channels per (rank, microbatch): "chat" only on rank 1, "code" nowhere but a masked row.
PLAN = {
    0: [[0, -1], [0, 1], [-1, -1]],
    1: [[2, 0], [2, 2], [0, -1]],
}


def microbatch(rank, index):
    gen = torch.Generator().manual_seed(100 * rank + index)
    losses = torch.rand(ROWS, SEQ, generator=gen, dtype=torch.float32) * 4
    mask = (torch.rand(ROWS, SEQ, generator=gen) > 0.3).float()
    channels = torch.tensor(PLAN[rank][index])
    mask[channels == 1] = 0.0  # "code" rows are fully masked: zero tokens globally
    return losses, mask, channels


def reference_totals() -> list[list[float]]:
    """Float64 (sum, count) per channel then all tokens, over both ranks, with plain loops."""
    out = [[0.0, 0.0] for _ in range(len(NAMES) + 1)]
    for rank in PLAN:
        for index in range(MICROBATCHES):
            losses, mask, channels = microbatch(rank, index)
            for row in range(ROWS):
                for pos in range(SEQ):
                    m = float(mask[row, pos])
                    value = float(losses[row, pos]) * m
                    c = int(channels[row])
                    for target in ([c] if c >= 0 else []) + [len(NAMES)]:
                        out[target][0] += value
                        out[target][1] += m
    return out


def sequential_forward_backward(*, forward_step_func, data_iterator, model, num_microbatches, **_):
    """What a schedule does with forward_step_func on the last stage, on the CPU."""
    store = []
    for _ in range(num_microbatches):
        output, loss_func = forward_step_func(data_iterator, model)
        _, _, metrics = loss_func(output)
        store.append(metrics)
    return store


def train_step_stand_in(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                        forward_backward_func, iteration=None, pg_collection=None, p2p_communicator=None):
    """train_step's signature; runs forward_backward twice (a rerun) and reduces like stock."""
    for _attempt in range(2):
        losses = forward_backward_func(forward_step_func=forward_step_func, data_iterator=iter(data_iterator),
                                       model=model, num_microbatches=MICROBATCHES)
    reduced = {}
    for key in losses[0]:
        val = torch.vstack([x[key].view(-1) for x in losses]).sum(0)
        torch.distributed.all_reduce(val)
        reduced[key] = val[0] / val[1]
    return reduced, 0, False, False, 0, 1.0, None, None


def _train_step_worker(rank, world_size):
    import torch.distributed as dist

    init_parallel()
    model = tiny_gpt()
    batches = [microbatch(rank, i) for i in range(MICROBATCHES)]

    def forward_step(data_iterator, model):
        losses, mask, channels = next(data_iterator)
        return losses, partial(channel_loss_func, loss_mask=mask, channels=channels, config=CONFIG)

    logger = ChannelLogger(CONFIG)
    wrapped = wrap_train_step(train_step_stand_in, logger)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        result = wrapped(forward_step, batches, [model], None, None, None, sequential_forward_backward, iteration=0)
    finally:
        dist.all_reduce = all_reduce
    return dict(keys=list(result[0]), lm_loss=float(result[0]["lm loss"]), calls=calls,
                totals=logger.pending_train_totals.tolist(), dtype=str(logger.pending_train_totals.dtype))


@pytest.mark.timeout(120)
def test_train_step_wrapper_reduces_exactly_once_over_real_gloo_ranks():
    results = run_distributed(_train_step_worker, 2)
    want = reference_totals()
    assert want[1] == [0.0, 0.0] and want[2][1] > 0  # code empty globally, chat only on rank 1
    for rank, res in enumerate(results):
        assert res["keys"] == ["lm loss"], f"rank {rank}: stock code saw {res['keys']}"
        assert res["dtype"] == "torch.float64"
        assert res["calls"] == [(2,), (4, 2)], f"rank {rank}: all-reduces {res['calls']}"
        for got_row, want_row in zip(res["totals"], want):
            assert got_row[1] == want_row[1]
            assert got_row[0] == pytest.approx(want_row[0], rel=1e-6, abs=1e-6)
        assert res["lm_loss"] == pytest.approx(want[3][0] / want[3][1], rel=1e-6)
    assert results[0]["totals"] == results[1]["totals"]


@pytest.mark.timeout(30)
def test_train_step_wrapper_refuses_a_forward_step_without_channel_metrics(megatron_cpu):
    def stock_forward_step(data_iterator, model):
        losses, mask, _ = next(data_iterator)

        def loss_func(output):
            loss = (output * mask).sum()
            return loss, mask.sum().int(), {"lm loss": torch.stack([loss, mask.sum()])}

        return losses, loss_func

    wrapped = wrap_train_step(train_step_stand_in, ChannelLogger(CONFIG))
    batches = [microbatch(0, i) for i in range(MICROBATCHES)]
    with pytest.raises(ChannelMetricsError, match="lack.*make_forward_step"):
        wrapped(stock_forward_step, batches, [None], None, None, None, sequential_forward_backward)


@pytest.mark.timeout(60)
def test_train_step_wrapper_refuses_full_iteration_cuda_graphs(megatron_globals):
    args, _ = megatron_globals
    args.cuda_graph_impl = "full_iteration"
    wrapped = wrap_train_step(train_step_stand_in, ChannelLogger(CONFIG))
    with pytest.raises(MegatronInternalsError, match="--cuda-graph-impl full_iteration"):
        wrapped(lambda *_: pytest.fail("no microbatch may run"), [], [None], None, None, None,
                sequential_forward_backward)


# ----------------------------------------------------------------------------- evaluation


def evaluate_stand_in(forward_step_func, data_iterator, model, process_non_loss_data_func, config, verbose=False,
                      non_loss_data_func=None, eval_iters=None, pg_collection=None, p2p_communicator=None):
    """Megatron evaluate's signature and loss accumulation over hand-made microbatches."""
    total = {}
    for _ in range(eval_iters or 2):
        for metrics in sequential_forward_backward(forward_step_func=forward_step_func, data_iterator=data_iterator,
                                                   model=model, num_microbatches=MICROBATCHES):
            for key, value in metrics.items():
                total[key] = total.get(key, torch.zeros(2)) + value.view(-1).float()
    return {k: v[0] / v[1] for k, v in total.items()}, None, False


@pytest.mark.timeout(60)
def test_real_evaluate_and_print_results_shows_exact_validation_losses(megatron_globals, tmp_path, capsys,
                                                                         monkeypatch):
    args, _ = megatron_globals
    args.eval_iters = 2
    jsonl = tmp_path / "eval.jsonl"
    logger = ChannelLogger(CONFIG, str(jsonl))
    monkeypatch.setattr(training, "evaluate", wrap_evaluate(evaluate_stand_in, logger))
    evaluate_and_print = wrap_evaluate_and_print_results(training.evaluate_and_print_results, logger, training)
    batches = [microbatch(0, i) for i in range(MICROBATCHES)] * 2  # rank 0's plan: math and code only

    def forward_step(data_iterator, model):
        losses, mask, channels = next(data_iterator)
        return losses, partial(channel_loss_func, loss_mask=mask, channels=channels, config=CONFIG)

    evaluate_and_print("iteration 10", forward_step, iter(batches), [None], 10, None, None,
                       write_to_tensorboard=True)
    global_vars.get_tensorboard_writer().flush()
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if " loss at iteration 10" in l)
    assert no_nan(line), line

    sums = [[0.0, 0.0] for _ in range(len(NAMES) + 1)]
    for losses, mask, channels in batches:
        for row in range(ROWS):
            c = int(channels[row])
            for target in ([c] if c >= 0 else []) + [len(NAMES)]:
                sums[target][0] += float((losses[row].double() * mask[row].double()).sum())
                sums[target][1] += float(mask[row].sum())
    math_loss = sums[0][0] / sums[0][1]
    printed = float(line.split("loss_math value: ")[1].split(" |")[0])
    assert printed == pytest.approx(math_loss, rel=1e-6)  # float32 per-microbatch sums, as Megatron's
    assert "loss_code value" not in line and "loss_chat value" not in line
    assert f"tokens_math: {sums[0][1]:.0f} | tokens_code: 0 | tokens_chat: 0 | loss tokens: {sums[3][1]:.0f} | " in line

    scalars = read_scalars(tmp_path / "tb")
    assert scalars["loss_math validation"][10] == pytest.approx(math_loss, rel=1e-6)
    assert "loss_code validation" not in scalars and "loss_chat validation" not in scalars
    assert scalars["tokens_chat validation"] == {10: 0.0}
    assert scalars["token share math validation"][10] == pytest.approx(sums[0][1] / sums[3][1], rel=1e-6)

    (record,) = [json.loads(l) for l in jsonl.read_text().splitlines()]
    assert record["kind"] == "validation" and record["split"] == "validation" and record["iteration"] == 10
    assert record["channels"]["math"]["loss"] == pytest.approx(math_loss, rel=1e-6)
    assert record["channels"]["chat"] == dict(loss=None, tokens=0.0, share=0.0)
