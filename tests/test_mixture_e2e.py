"""The channel mixture end to end: ``scripts/pretrain_gpt_channel.py --cpu`` under torchrun,
Megatron's own ``pretrain()``, data loader and checkpoints, the tiny GPT on the 3-channel blend.

A batch is observed through what the run logs of it: per iteration, each channel's token count
(TensorBoard) and Megatron's ``lm loss`` and grad norm (console). Equal streams of those, bitwise,
mean equal batches.
"""

from __future__ import annotations

import pytest

from megatron_channel.channel_logging.jsonl_schema import MixtureRecord
from pretrain_runs import CHANNELS, GLOBAL_BATCH, SEQ, blend_flags, model_flags, run_pretrain, sft_launch_flags
from run_checks import check_train_logs

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]

ITERATIONS = 30
# The mechanism's tests decide from training losses: a decision every 5 iterations.
MIXTURE = ["--channel-mixture", "learning-progress", "--channel-mixture-interval", "5", "--channel-mixture-signal",
           "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    cache = {}
    root = tmp_path_factory.mktemp("mixture_runs")

    def get(name: str, *flags: str):
        if name not in cache:
            cache[name] = run_pretrain(str(root / name), [
                *model_flags(), *blend_flags(data_dir), "--train-iters", str(ITERATIONS), *flags])
        return cache[name]

    return get


def mixture_records(run) -> list[MixtureRecord]:
    return [r for r in run.records if isinstance(r, MixtureRecord)]


def batch_stream(run, first: int = 1) -> list:
    """Per iteration from ``first``: every channel's tokens, and Megatron's lm loss and grad norm text."""
    tokens = [[run.scalars[f"tokens_{name}"][i] for name in CHANNELS] for i in range(first, ITERATIONS + 1)]
    lines = {i: (line["lm loss"], line["grad norm"]) for i, line in run.iteration_lines().items() if i >= first}
    return [tokens, lines]


def check_shares_follow_weights(run, records):
    """Each applied row's realised sample shares are its weights, to Megatron's greedy rounding."""
    starts = [r.first_iteration for r in records] + [ITERATIONS + 1]
    for record, end in zip(records, starts[1:]):
        iterations = range(record.first_iteration, min(end, ITERATIONS + 1))
        if not iterations:
            continue
        samples = len(iterations) * GLOBAL_BATCH
        for name, channel in record.channels.items():
            taken = sum(run.scalars[f"tokens_{name}"][i] for i in iterations) / SEQ
            assert abs(taken - channel.weight * samples) <= 1.0, (record.iteration, name, taken, channel.weight)


def test_learning_progress_steers_the_blend_and_every_number_still_adds_up(runs):
    run = runs("lp", *MIXTURE)
    check_train_logs(run)
    records = mixture_records(run)
    assert [r.iteration for r in records] == [10, 15, 20, 25, 30]  # the first interval has one point per channel
    assert all(r.applied and r.first_iteration == r.iteration + 3 for r in records)
    assert all(abs(sum(c.weight for c in r.channels.values()) - 1) < 1e-12 for r in records)
    assert all(min(c.weight for c in r.channels.values()) >= 0.15 - 1e-12 for r in records)  # the default floor
    assert run.stdout.count("same rows on all 2 ranks") == len(records) + 1  # + the check at start-up
    check_shares_follow_weights(run, records)
    points = run.events["mixture weight count"]
    assert [step for step, _ in points] == [r.iteration for r in records]


def test_the_same_seed_gives_the_same_batches_and_weights(runs):
    first, second = runs("lp", *MIXTURE), runs("lp_again", *MIXTURE)
    assert batch_stream(first) == batch_stream(second)
    assert mixture_records(first) == mixture_records(second)


def test_data_loader_workers_do_not_change_the_batches(runs):
    serial, workers = runs("lp", *MIXTURE), runs("lp_workers", *MIXTURE, "--num-workers", "2")
    assert batch_stream(serial) == batch_stream(workers)
    assert mixture_records(serial) == mixture_records(workers)


def test_pipeline_parallel_first_stage_reads_the_last_stage_weights(runs):
    run = runs("lp_pp2", *MIXTURE, "--pipeline-model-parallel-size", "2")
    records = mixture_records(run)
    assert records and run.stdout.count("same rows on all 2 ranks") == len(records) + 1
    check_shares_follow_weights(run, records)  # the first stage's data follows the last stage's decisions


def test_resume_continues_the_schedule(runs, tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    saving = ("--save", checkpoint, "--save-interval", "15")
    first = runs("lp_resume", *MIXTURE, *saving, "--exit-interval", "15")
    resumed = runs("lp_resume_2", *MIXTURE, *saving, "--load", checkpoint)
    straight = mixture_records(runs("lp", *MIXTURE))
    assert mixture_records(first) == [r for r in straight if r.iteration <= 15]
    after = mixture_records(resumed)
    assert after == [r for r in straight if r.iteration > 15]  # bitwise: the same decisions from the same data
    (tokens, lines), (straight_tokens, straight_lines) = (batch_stream(resumed, first=16),
                                                          batch_stream(runs("lp", *MIXTURE), first=16))
    assert tokens == straight_tokens
    assert {i: lines[i] for i in straight_lines} == straight_lines  # the resumed process also logs iteration 16
    check_shares_follow_weights(resumed, [r for r in straight if r.iteration <= 15][-1:] + after)


def test_resume_at_tensor_parallel_reloads_the_schedule_on_every_rank(runs, tmp_path):
    """At TP = 2 the deciding (last) rank holds no dataset; it must read the saved schedule too."""
    checkpoint = str(tmp_path / "checkpoint")
    saving = ("--save", checkpoint, "--save-interval", "15", "--tensor-model-parallel-size", "2")
    runs("tp2_resume", *MIXTURE, *saving, "--exit-interval", "15")
    resumed = runs("tp2_resume_2", *MIXTURE, *saving, "--load", checkpoint)
    records = mixture_records(resumed)
    assert [r.iteration for r in records] == [20, 25, 30]
    assert resumed.stdout.count("same rows on all 2 ranks") == len(records) + 1  # + the check at start-up
    check_shares_follow_weights(resumed, records)


def test_advice_leaves_training_bitwise_stock(runs):
    advised, plain = runs("lp_advice", "--channel-mixture-advice", "learning-progress",
                          "--channel-mixture-interval", "5", "--channel-mixture-signal", "train"), runs("plain")
    assert batch_stream(advised) == batch_stream(plain)
    records = mixture_records(advised)
    assert records and not any(r.applied for r in records)
    assert "advice, not applied" in advised.stdout


def test_the_default_validation_signal_decides_after_each_new_validation(runs):
    run = runs("lp_validation", "--channel-mixture", "learning-progress", "--channel-mixture-interval", "5")
    # Validation runs after iterations 10, 20, 30 (--eval-interval 10): the decisions after it need two
    # points per channel, so the first comes after the second validation.
    records = mixture_records(run)
    assert [r.iteration for r in records] == [25] and records[0].signal == "validation"
    check_shares_follow_weights(run, records)


def test_a_schedule_from_yaml_is_followed(runs, tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text("rows:\n"
                    "- {from_iteration: 0, weights: {copy: 0.6, count: 0.2, noise: 0.2}}\n"
                    "- {from_iteration: 10, weights: {copy: 0.1, count: 0.3, noise: 0.6}}\n")
    run = runs("schedule", "--channel-mixture", "schedule", "--channel-mixture-schedule", str(path))
    check_train_logs(run)
    records = mixture_records(run)
    assert [(r.first_iteration, r.channels["copy"].weight) for r in records] == [(1, 0.6), (11, 0.1)]
    check_shares_follow_weights(run, records)


def test_packed_sft_files_one_per_channel_are_steered(runs, data_dir, tmp_path, monkeypatch):
    """Packed SFT rows from several jsonl files, one channel per file: the mixture steers them too."""
    import json

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_channel: dict[str, list[str]] = {}
    for line in open(f"{data_dir}/sft/mixed.jsonl"):
        by_channel.setdefault(json.loads(line)["channel"], []).append(line)
    paths = []
    for name, lines in sorted(by_channel.items()):
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
        paths += ["1", str(tmp_path / f"{name}.jsonl")]
    sft = sft_launch_flags(data_dir)
    data = ["--sft", "--data-path", *paths, "--split", "90,10,0", "--seq-length", "128",
            "--max-position-embeddings", "128"]
    run = run_pretrain(str(tmp_path / "run"), [
        *model_flags(), *data, "--data-cache-path", f"{data_dir}/cache", *sft["tokenizer"], "--channels-from-blend",
        "--train-iters", "20", *MIXTURE])
    check_train_logs(run, iteration_tokens=None, megatron_lm_loss=False)
    records = mixture_records(run)
    assert records and all(r.applied for r in records) and set(records[0].channels) == set(by_channel)
    assert run.stdout.count("same rows on all 2 ranks") == len(records) + 1
