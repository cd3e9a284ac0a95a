"""``wrappers``: the four wrappers around Megatron's training loop, against Megatron's real code.

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
* A Megatron whose console lines are worded otherwise: a ``ChannelLoggingWarning`` after
  the first log intervals without a recognised iteration line, and after an evaluation
  without a recognised validation line; none when the lines are recognised.
"""

from __future__ import annotations

import json
import math
import warnings
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import megatron.training.training as training
from megatron.training import global_vars

from logging_tables import CONFIG, ITERATIONS, NAMES, no_nan, reference, totals_of
from megatron_channel import (
    ChannelLoggingWarning,
    ChannelMetricsError,
    MegatronInternalsError,
    channel_loss_func,
    install_channel_logging,
)
from megatron_channel.channel_logging.install import installed_channel_logging
from megatron_channel.channel_logging.wrappers import (
    ChannelLoggingState,
    wrap_evaluate,
    wrap_evaluate_and_print_results,
    wrap_print_rank_last,
    wrap_train_step,
    wrap_training_log,
)
from megatron_testing import init_parallel, run_distributed, tiny_gpt


def call_training_log(total_loss_dict, iteration, skipped_iter=0):
    """Megatron's ``training_log`` as ``train()`` calls it, by keyword."""
    return training.training_log(
        loss_dict={}, total_loss_dict=total_loss_dict, learning_rate=1e-3, iteration=iteration, loss_scale=1.0,
        report_memory_flag=False, skipped_iter=skipped_iter, grad_norm=1.5, params_norm=None,
        num_zeros_in_grad=None, max_attention_logit=None, is_first_iteration=(iteration == 1),
    )


def read_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def run_training_log(megatron_globals, tmp_path, capsys):
    """Megatron's real ``training_log``, installed logging, over ``ITERATIONS``: the console lines
    by iteration, the TensorBoard scalars, what W&B got, and the jsonl records."""
    args, wandb = megatron_globals
    jsonl = tmp_path / "run" / "channels.jsonl"
    install_channel_logging(CONFIG, jsonl_path=str(jsonl))
    state = installed_channel_logging()
    timers = global_vars.get_timers()
    total_loss_dict = {"lm loss": torch.tensor([2.0])}
    lines = {}
    for iteration, it in enumerate(ITERATIONS, start=1):
        if iteration == 2:
            del total_loss_dict["lm loss"]  # see the module docstring: stock resets it on CUDA
        state.pending_train_totals = totals_of(it)  # what the train_step wrapper hands over
        args.consumed_train_samples = 4 * iteration
        timers("interval-time", log_level=0).set_elapsed(0.5)
        call_training_log(total_loss_dict, iteration, skipped_iter=int(it["skipped"]))
        out = capsys.readouterr().out
        lines[iteration] = [line for line in out.splitlines() if " iteration " in line]
    global_vars.get_tensorboard_writer().flush()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return lines, read_scalars(tmp_path / "tb"), wandb.logged, records


@pytest.mark.timeout(60)
def test_training_log_console_line_holds_each_window_exactly(megatron_globals, tmp_path, capsys):
    """Iteration 1 (first, not reset), 2 (window 1..2), 4 (window 3..4, 3 skipped); no NaN; the
    fields right after lm loss; a channel without tokens shows its count, not a loss."""
    lines, _, _, _ = run_training_log(megatron_globals, tmp_path, capsys)
    assert [len(lines[i]) for i in (1, 2, 3, 4)] == [1, 1, 0, 1]
    first, second, fourth = lines[1][0], lines[2][0], lines[4][0]
    assert all(no_nan(line) for line in (first, second, fourth))
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


@pytest.mark.timeout(60)
def test_training_log_tensorboard_gets_one_point_per_non_empty_window(megatron_globals, tmp_path, capsys):
    """Interval 1: a point per iteration a channel had tokens, none at the skipped one; counts,
    shares, cumulative and vs-samples series; nothing NaN."""
    _, scalars, _, _ = run_training_log(megatron_globals, tmp_path, capsys)
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


@pytest.mark.timeout(60)
def test_training_log_wandb_gets_the_tensorboard_names_and_values(megatron_globals, tmp_path, capsys):
    _, scalars, logged, _ = run_training_log(megatron_globals, tmp_path, capsys)
    ours = {}
    for values, step in logged:
        for name, value in values.items():
            if name in scalars and name != "learning-rate":
                ours.setdefault(name, {})[step] = value
    assert ours["loss_math"] == {1: 2.5, 2: 1.0, 4: 3.0}
    assert ours["token share math cumulative"] == {1: 0.5, 2: 6 / 11, 4: 8 / 13}


@pytest.mark.timeout(60)
def test_training_log_writes_one_jsonl_record_per_console_line(megatron_globals, tmp_path, capsys):
    _, _, _, records = run_training_log(megatron_globals, tmp_path, capsys)
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

    state = ChannelLoggingState(CONFIG)
    wrapped = wrap_train_step(train_step_stand_in, state)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        result = wrapped(forward_step_func=forward_step, data_iterator=batches, model=[model], optimizer=None,
                         opt_param_scheduler=None, config=None, forward_backward_func=sequential_forward_backward,
                         iteration=0)
    finally:
        dist.all_reduce = all_reduce
    return dict(keys=list(result[0]), lm_loss=float(result[0]["lm loss"]), calls=calls,
                totals=state.pending_train_totals.tolist(), dtype=str(state.pending_train_totals.dtype))


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

    wrapped = wrap_train_step(train_step_stand_in, ChannelLoggingState(CONFIG))
    batches = [microbatch(0, i) for i in range(MICROBATCHES)]
    with pytest.raises(ChannelMetricsError, match="lack.*make_forward_step"):
        wrapped(forward_step_func=stock_forward_step, data_iterator=batches, model=[None], optimizer=None,
                opt_param_scheduler=None, config=None, forward_backward_func=sequential_forward_backward)


@pytest.mark.timeout(60)
def test_train_step_wrapper_refuses_full_iteration_cuda_graphs(megatron_globals):
    args, _ = megatron_globals
    args.cuda_graph_impl = "full_iteration"
    wrapped = wrap_train_step(train_step_stand_in, ChannelLoggingState(CONFIG))
    with pytest.raises(MegatronInternalsError, match="--cuda-graph-impl full_iteration"):
        wrapped(forward_step_func=lambda *_: pytest.fail("no microbatch may run"), data_iterator=[], model=[None],
                optimizer=None, opt_param_scheduler=None, config=None, forward_backward_func=sequential_forward_backward)


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


def run_evaluate_and_print_results(megatron_globals, tmp_path, capsys, monkeypatch):
    """Megatron's real ``evaluate_and_print_results`` over the wrapped stand-in evaluate, at
    iteration 10: the validation console line, the TensorBoard scalars, the jsonl records, and
    float64 (sum, count) per channel then all tokens over the microbatches, by hand."""
    args, _ = megatron_globals
    args.eval_iters = 2
    jsonl = tmp_path / "eval.jsonl"
    state = ChannelLoggingState(CONFIG, str(jsonl))
    monkeypatch.setattr(training, "evaluate", wrap_evaluate(evaluate_stand_in, state))
    monkeypatch.setattr(training, "print_rank_last", wrap_print_rank_last(training.print_rank_last, state))
    evaluate_and_print = wrap_evaluate_and_print_results(training.evaluate_and_print_results, state, training)
    batches = [microbatch(0, i) for i in range(MICROBATCHES)] * 2  # rank 0's plan: math and code only

    def forward_step(data_iterator, model):
        losses, mask, channels = next(data_iterator)
        return losses, partial(channel_loss_func, loss_mask=mask, channels=channels, config=CONFIG)

    evaluate_and_print(prefix="iteration 10", forward_step_func=forward_step, data_iterator=iter(batches),
                       model=[None], iteration=10, process_non_loss_data_func=None, config=None,
                       write_to_tensorboard=True)
    global_vars.get_tensorboard_writer().flush()
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if " loss at iteration 10" in l)

    sums = [[0.0, 0.0] for _ in range(len(NAMES) + 1)]
    for losses, mask, channels in batches:
        for row in range(ROWS):
            c = int(channels[row])
            for target in ([c] if c >= 0 else []) + [len(NAMES)]:
                sums[target][0] += float((losses[row].double() * mask[row].double()).sum())
                sums[target][1] += float(mask[row].sum())
    records = [json.loads(l) for l in jsonl.read_text().splitlines()]
    return line, read_scalars(tmp_path / "tb"), records, sums


@pytest.mark.timeout(60)
def test_real_evaluate_and_print_results_console_line_shows_exact_validation_losses(
        megatron_globals, tmp_path, capsys, monkeypatch):
    """An empty channel shows its 0 tokens, not a loss; no NaN."""
    line, _, _, sums = run_evaluate_and_print_results(megatron_globals, tmp_path, capsys, monkeypatch)
    assert no_nan(line), line
    math_loss = sums[0][0] / sums[0][1]
    printed = float(line.split("loss_math value: ")[1].split(" |")[0])
    assert printed == pytest.approx(math_loss, rel=1e-6)  # float32 per-microbatch sums, as Megatron's
    assert "loss_code value" not in line and "loss_chat value" not in line
    assert f"tokens_math: {sums[0][1]:.0f} | tokens_code: 0 | tokens_chat: 0 | loss tokens: {sums[3][1]:.0f} | " in line


@pytest.mark.timeout(60)
def test_real_evaluate_and_print_results_writes_validation_scalars_to_tensorboard(
        megatron_globals, tmp_path, capsys, monkeypatch):
    """``loss_math validation`` written by Megatron's own code, exact; an empty channel has no loss."""
    _, scalars, _, sums = run_evaluate_and_print_results(megatron_globals, tmp_path, capsys, monkeypatch)
    math_loss = sums[0][0] / sums[0][1]
    assert scalars["loss_math validation"][10] == pytest.approx(math_loss, rel=1e-6)
    assert "loss_code validation" not in scalars and "loss_chat validation" not in scalars
    assert scalars["tokens_chat validation"] == {10: 0.0}
    assert scalars["token share math validation"][10] == pytest.approx(sums[0][1] / sums[3][1], rel=1e-6)


@pytest.mark.timeout(60)
def test_real_evaluate_and_print_results_writes_one_validation_jsonl_record(
        megatron_globals, tmp_path, capsys, monkeypatch):
    """An empty channel's loss is null."""
    _, _, records, sums = run_evaluate_and_print_results(megatron_globals, tmp_path, capsys, monkeypatch)
    (record,) = records
    assert record["kind"] == "validation" and record["split"] == "validation" and record["iteration"] == 10
    assert record["channels"]["math"]["loss"] == pytest.approx(sums[0][0] / sums[0][1], rel=1e-6)
    assert record["channels"]["chat"] == dict(loss=None, tokens=0.0, share=0.0)


# ----------------------------------------------------------------------------- a reworded Megatron

MEGATRON_LINE = " [2026-12-03 10:00:00] iteration {iteration:8d}/      10 | lm loss: 1.000000E+00 | loss scale: 1.0 |"
REWORDED_LINE = " [2026-12-03 10:00:00] step {iteration}/10 | lm loss: 1.000000E+00 | loss scale: 1.0 |"


def training_module_printing(train_line: str, validation_line: str, state: ChannelLoggingState):
    """What the wrappers use of ``megatron.training.training``, with stand-ins for ``training_log``
    and ``evaluate_and_print_results`` that print ``train_line`` / ``validation_line`` as 0.19 prints its own
    (every ``--log-interval 2`` iterations and at the first; once per evaluation)."""
    printed: list[str] = []
    margs = SimpleNamespace(log_interval=2, tensorboard_log_interval=1000, consumed_train_samples=0)
    # print_rank_last as install_channel_logging leaves it: wrapped for the state's edits.
    module = SimpleNamespace(print_rank_last=wrap_print_rank_last(printed.append, state), get_args=lambda: margs,
                             get_tensorboard_writer=lambda: None, get_wandb_writer=lambda: None)

    def training_log(loss_dict, iteration, skipped_iter=0, is_first_iteration=False):
        if iteration % margs.log_interval == 0 or is_first_iteration:
            module.print_rank_last(train_line.format(iteration=iteration))

    def evaluate_and_print_results(prefix, iteration, write_to_tensorboard=True):
        state.pending_evals.append(state.accountant.console_report(reset=False).window)  # as evaluate hands it
        module.print_rank_last(validation_line.format(iteration=iteration))

    return module, training_log, evaluate_and_print_results, printed


def channel_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ChannelLoggingWarning)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reworded", [False, True])
def test_a_reworded_iteration_line_warns_once_after_the_first_log_intervals(reworded):
    state = ChannelLoggingState(CONFIG)
    module, original, _, printed = training_module_printing(REWORDED_LINE if reworded else MEGATRON_LINE, "", state)
    training_log = wrap_training_log(original, state, module)
    warned_at = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for iteration in range(1, 11):
            state.pending_train_totals = totals_of(ITERATIONS[0])
            training_log({}, iteration, is_first_iteration=iteration == 1)
            if channel_warnings(caught) and not warned_at:
                warned_at.append(iteration)
    if reworded:
        (message,) = channel_warnings(caught)  # once, not at every interval after
        assert warned_at == [4]  # the second log interval (iterations 2 and 4)
        assert "no Megatron iteration line" in message and "0.17 to 0.19" in message and "jsonl" in message
        assert not any("loss_math" in line for line in printed)
    else:
        assert channel_warnings(caught) == []
        assert len(printed) == 6 and all(" loss_math: " in line for line in printed)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reworded", [False, True])
def test_a_reworded_validation_line_warns_once(reworded):
    state = ChannelLoggingState(CONFIG)
    state.accountant.add_iteration(totals_of(ITERATIONS[0]))
    line = " validation at step {iteration} | lm loss value: 1.0E+00 | " if reworded else \
        " validation loss at iteration {iteration} | lm loss value: 1.0E+00 | "
    module, _, original, printed = training_module_printing(MEGATRON_LINE, line, state)
    evaluate_and_print = wrap_evaluate_and_print_results(original, state, module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for iteration in (10, 20):
            evaluate_and_print("iteration", iteration)
    if reworded:
        (message,) = channel_warnings(caught)
        assert "no Megatron validation line" in message
        assert not any("tokens_math" in line for line in printed)
    else:
        assert channel_warnings(caught) == []
        assert all(line.endswith(" | tokens_math: 4 | tokens_code: 2 | tokens_chat: 0 | loss tokens: 8 | ") for line in printed), printed


def run_training_log_with_token_accuracy(megatron_globals, tmp_path, capsys):
    """Megatron's real ``training_log`` with token accuracy installed, over iterations 1 and 2
    (chat empty in 1, code in 2): the last console line (iterations 1..2), the TensorBoard
    scalars, what W&B got and the last jsonl record."""
    from megatron_channel import ChannelConfig

    args, wandb = megatron_globals
    config = ChannelConfig(list(NAMES), token_accuracy=True)
    jsonl = tmp_path / "acc.jsonl"
    install_channel_logging(config, jsonl_path=str(jsonl))
    state = installed_channel_logging()
    timers = global_vars.get_timers()
    correct = {1: [3.0, 1.0, 0.0], 2: [1.0, 0.0, 1.0]}  # per iteration, per channel (chat empty in 1, code in 2)
    for iteration in (1, 2):
        it = ITERATIONS[iteration - 1]
        rows = [[correct[iteration][i], it["rows"][i][1]] for i in range(3)]
        rows.append([sum(correct[iteration]), it["lm"][1]])
        state.pending_train_totals = torch.cat([totals_of(it), torch.tensor(rows, dtype=torch.float64)])
        args.consumed_train_samples = 4 * iteration
        timers("interval-time", log_level=0).set_elapsed(0.5)
        call_training_log({}, iteration)
    global_vars.get_tensorboard_writer().flush()
    line = [l for l in capsys.readouterr().out.splitlines() if " iteration " in l][-1]  # iterations 1..2
    last = json.loads(jsonl.read_text().splitlines()[-1])
    return line, read_scalars(tmp_path / "tb"), wandb.logged, last


@pytest.mark.timeout(60)
def test_real_training_log_console_line_shows_token_accuracy(megatron_globals, tmp_path, capsys):
    """`token acc` and `token_acc_<name>`, token-weighted over the interval, after lm loss's fields."""
    line, _, _, _ = run_training_log_with_token_accuracy(megatron_globals, tmp_path, capsys)
    # math: (3 + 1) / (4 + 2); code: 1 / 2; chat: 1 / 1; all: 6 / 11.
    assert " token acc: 0.5455 |" in line and " token_acc_math: 0.6667 |" in line
    assert " token_acc_code: 0.5000 |" in line and " token_acc_chat: 1.0000 |" in line
    assert line.index(" token acc:") < line.index(" loss_math:") < line.index("token_acc_math") < line.index(" loss scale:")


@pytest.mark.timeout(60)
def test_real_training_log_writes_token_accuracy_to_tensorboard(megatron_globals, tmp_path, capsys):
    """A point per iteration; none where a channel had no tokens."""
    _, scalars, _, _ = run_training_log_with_token_accuracy(megatron_globals, tmp_path, capsys)
    assert scalars["token_acc_math"] == pytest.approx({1: 0.75, 2: 0.5})
    assert scalars["token_acc_chat"] == pytest.approx({2: 1.0})  # no point where chat had no tokens
    assert scalars["token acc"] == pytest.approx({1: 0.5, 2: 2 / 3})


@pytest.mark.timeout(60)
def test_real_training_log_gives_wandb_the_token_accuracy(megatron_globals, tmp_path, capsys):
    _, _, logged, _ = run_training_log_with_token_accuracy(megatron_globals, tmp_path, capsys)
    ours = {name: {step: v[name] for v, step in logged if name in v} for name in ("token_acc_math", "token acc")}
    assert ours == {"token_acc_math": {1: 0.75, 2: 0.5}, "token acc": {1: 0.5, 2: 2 / 3}}


@pytest.mark.timeout(60)
def test_real_training_log_writes_token_accuracy_to_the_jsonl(megatron_globals, tmp_path, capsys):
    """Token-weighted over the interval (iterations 1..2)."""
    _, _, _, last = run_training_log_with_token_accuracy(megatron_globals, tmp_path, capsys)
    assert last["token_acc"] == pytest.approx(6 / 11) and last["channels"]["math"]["accuracy"] == pytest.approx(4 / 6)
