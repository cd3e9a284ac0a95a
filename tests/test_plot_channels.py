"""scripts/plot_channels.py on a synthetic run written with the logging's own record and scalar builders.

A 24-iteration run of 3 channels ("chat" absent in every third iteration, "code" absent from
validation) goes through ``ChannelAccountant``; its jsonl records (``train_record`` /
``validation_record``) and TensorBoard scalars (``train_scalars`` plus Megatron-style
``<key> validation`` tags, written with torch's SummaryWriter) are the inputs. Checked: the
parsed series equal what was written (exactly for jsonl, to float32 for TensorBoard), a
resumed run's repeated iterations keep the later value, the CLI writes a real PNG and says
where, and bad inputs fail with a message.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_channel import ChannelConfig
from megatron_channel.channel_logging.jsonl_schema import (
    TrainChannel,
    TrainRecord,
    append_jsonl,
    to_json,
    train_record,
    validation_record,
)
from megatron_channel.channel_logging.log_fields import train_scalars, validation_scalars
from megatron_channel.channel_logging.windows import ChannelAccountant, ChannelStats

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot_channels.py"
CONFIG = ChannelConfig(["math", "code", "chat"])
ITERATIONS, LOG_INTERVAL, EVAL_INTERVAL = 24, 2, 8


def load_script():
    spec = importlib.util.spec_from_file_location("plot_channels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_channels"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


plot_channels = load_script()


def iteration_totals(it: int) -> torch.Tensor:
    """[K + 1, 2] totals of iteration ``it``: losses fall over time, chat absent every third."""
    tokens = [100.0 + 10 * (it % 3), 50.0, 0.0 if it % 3 == 0 else 30.0]
    losses = [4.0 - 0.05 * it, 3.0 - 0.03 * it, 5.0 - 0.08 * it]
    rows = [[loss * n, n] for loss, n in zip(losses, tokens)]
    rows.append([sum(r[0] for r in rows) + 20.0, sum(tokens) + 10.0])  # 10 untracked tokens
    return torch.tensor(rows, dtype=torch.float64)


def validation_stats(it: int) -> ChannelStats:
    rows = [[2.0 * 80 + it / 10, 80.0], [0.0, 0.0], [3.5 * 20, 20.0], [2.0 * 80 + it / 10 + 70.0, 100.0]]
    return ChannelStats.from_totals(CONFIG.channels, rows)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """Writes the jsonl and the TensorBoard dir; returns them with the expected series."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("run")
    jsonl, tb_dir = root / "channels.jsonl", root / "tensorboard"
    writer = SummaryWriter(log_dir=str(tb_dir))
    accountant = ChannelAccountant(CONFIG)
    want_jsonl = {"train": {}, "share": {}, "validation": {}, "reference": {}}
    want_tb = {"train": {}, "share": {}, "validation": {}}
    with open(jsonl, "w") as f:
        for it in range(1, ITERATIONS + 1):
            accountant.add_iteration(iteration_totals(it))
            tb = accountant.tensorboard_report()
            for name, value in train_scalars(tb, CONFIG).items():
                writer.add_scalar(name, value, it)
            writer.add_scalar("lm loss", tb.window.lm_loss(), it)
            for i, name in enumerate(CONFIG.channels):
                if tb.window.loss(i) is not None:
                    want_tb["train"].setdefault(name, []).append((it, tb.window.loss(i)))
                want_tb["share"].setdefault(name, []).append((it, tb.window.share(i)))
            if it % LOG_INTERVAL == 0:
                report = accountant.console_report()
                f.write(json.dumps(to_json(train_record(report, it))) + "\n")
                want_jsonl["reference"][it] = report.window.lm_loss()
                for i, name in enumerate(CONFIG.channels):
                    if report.window.loss(i) is not None:
                        want_jsonl["train"].setdefault(name, []).append((it, report.window.loss(i)))
                    want_jsonl["share"].setdefault(name, []).append((it, report.window.share(i)))
            if it % EVAL_INTERVAL == 0:
                stats = validation_stats(it)
                f.write(json.dumps(to_json(validation_record(stats, it))) + "\n")
                f.write(json.dumps(to_json(validation_record(stats, it, split="test"))) + "\n")  # not plotted
                for i, (name, key) in enumerate(zip(CONFIG.channels, CONFIG.metric_keys())):
                    if stats.loss(i) is not None:
                        writer.add_scalar(f"{key} validation", stats.loss(i), it)  # as Megatron names it
                        writer.add_scalar(f"{key} validation vs samples", stats.loss(i), it * 8)
                        for want in (want_jsonl, want_tb):
                            want["validation"].setdefault((name, ""), []).append((it, stats.loss(i)))
    writer.close()
    return jsonl, tb_dir, want_jsonl, want_tb


@pytest.mark.timeout(60)
def test_jsonl_series_equal_what_was_written(synthetic_run):
    jsonl, _, want, _ = synthetic_run
    series = plot_channels.load_series(str(jsonl))
    assert series.channels == ["math", "code", "chat"]
    assert series.train_loss == want["train"]
    assert series.share == want["share"]
    assert series.validation_loss == want["validation"]
    assert ("code", "") not in series.validation_loss  # no validation tokens: no point, no NaN
    assert series.reference_loss == sorted(want["reference"].items())
    # chat is absent every third iteration, yet every 2-iteration window holds some chat tokens
    assert [it for it, _ in series.train_loss["chat"]] == list(range(2, ITERATIONS + 1, 2))


@pytest.mark.timeout(60)
def test_tensorboard_series_equal_what_was_written(synthetic_run):
    _, tb_dir, _, want = synthetic_run
    series = plot_channels.load_series(str(tb_dir.parent))  # finds the event dir below the run dir
    assert series.channels == sorted(["math", "code", "chat"])
    for name in CONFIG.channels:
        assert_points_close(series.train_loss[name], want["train"][name])
        assert_points_close(series.share[name], want["share"][name])
    # chat's per-iteration TensorBoard points skip the iterations without chat tokens
    assert [it for it, _ in series.train_loss["chat"]] == [it for it in range(1, ITERATIONS + 1) if it % 3]
    assert set(series.validation_loss) == {("math", ""), ("chat", "")}  # "vs samples" tags are not curves
    for key, points in want["validation"].items():
        assert_points_close(series.validation_loss[key], points)
    assert len(series.reference_loss) == ITERATIONS


@pytest.mark.timeout(60)
def test_resumed_run_keeps_the_later_value(tmp_path):
    path = tmp_path / "resumed.jsonl"
    for it, value in [(2, 3.0), (4, 2.5), (6, 2.0), (4, 9.0), (6, 8.0), (8, 7.0)]:  # resumed from 2
        append_jsonl(str(path), TrainRecord(
            iteration=it, consumed_samples=None, iterations_in_window=2, lm_loss_token_weighted=value,
            loss_tokens=1.0, loss_tokens_cumulative=1.0,
            channels={"math": TrainChannel(loss=value, tokens=1.0, share=1.0, tokens_cumulative=1.0,
                                           share_cumulative=1.0)},
        ))
    assert plot_channels.load_series(str(path)).train_loss["math"] == [(2, 3.0), (4, 9.0), (6, 8.0), (8, 7.0)]


def assert_points_close(got, want, rel=1e-6):
    """Same iterations; values equal to float32 precision (TensorBoard stores float32)."""
    assert [it for it, _ in got] == [it for it, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("source", ["jsonl", "tensorboard"])
def test_cli_writes_a_png_and_says_where(synthetic_run, tmp_path, source):
    jsonl, tb_dir, _, _ = synthetic_run
    out = tmp_path / "plots" / f"{source}.png"
    result = run_cli(jsonl if source == "jsonl" else tb_dir, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.mark.timeout(60)
def test_bad_inputs_fail_with_a_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        plot_channels.load_series(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a channel logging record"):
        plot_channels.load_series(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a jsonl file nor a TensorBoard directory"):
        plot_channels.load_series(str(tmp_path / "missing"))


@pytest.mark.timeout(90)
def test_accuracy_series_and_their_panel(tmp_path):
    """A run with token accuracy and renamed keys: both inputs give the accuracy that was written,
    and the PNG gets the accuracy panel (a taller figure)."""
    from torch.utils.tensorboard import SummaryWriter

    config = ChannelConfig(["math", "code"], token_accuracy=True, loss_name="{channel}_loss",
                           accuracy_name="{channel}_token_acc")
    accountant = ChannelAccountant(config)
    jsonl, tb_dir = tmp_path / "channels.jsonl", tmp_path / "tb"
    writer = SummaryWriter(log_dir=str(tb_dir))
    want_train, want_validation = {"math": [], "code": []}, {"math": []}
    for it in range(1, 9):
        tokens = [40.0 + it, 0.0 if it % 4 == 0 else 20.0]
        correct = [0.05 * it * tokens[0], 0.5 * tokens[1]]
        rows = [[2.0 * tokens[0], tokens[0]], [3.0 * tokens[1], tokens[1]], [2.0 * tokens[0] + 3.0 * tokens[1], sum(tokens)],
                [correct[0], tokens[0]], [correct[1], tokens[1]], [sum(correct), sum(tokens)]]
        accountant.add_iteration(torch.tensor(rows, dtype=torch.float64))
        report = accountant.console_report()
        append_jsonl(str(jsonl), train_record(report, it))
        for name, value in train_scalars(report, config).items():
            writer.add_scalar(name, value, it)
        for i, name in enumerate(config.channels):
            if report.window.accuracy(i) is not None:
                want_train[name].append((it, report.window.accuracy(i)))
        if it % 4 == 0:
            stats = ChannelStats.from_totals(config.channels, rows)
            append_jsonl(str(jsonl), validation_record(stats, it))
            for name, value in validation_scalars(stats, config).items():
                writer.add_scalar(name, value, it)
            want_validation["math"].append((it, stats.accuracy(0)))
    writer.close()
    for source in (jsonl, tb_dir):
        series = plot_channels.load_series(str(source), "{channel}_loss", "{channel}_token_acc")
        for name in config.channels:
            assert_points_close(series.train_accuracy[name], want_train[name])
        assert_points_close(series.validation_accuracy[("math", "")], want_validation["math"])
        assert series.reference_accuracy and series.train_loss["math"]
    plain, with_accuracy = tmp_path / "plain.png", tmp_path / "accuracy.png"
    assert run_cli(jsonl, "-o", with_accuracy).returncode == 0
    series = plot_channels.load_series(str(jsonl))
    series.train_accuracy, series.validation_accuracy = {}, {}
    plot_channels.plot(series, str(plain))
    height = lambda png: int.from_bytes(png.read_bytes()[20:24], "big")  # the PNG header's height
    assert height(with_accuracy) > height(plain)


@pytest.mark.timeout(90)
def test_mixture_weights_are_drawn_on_the_share_panel(synthetic_run, tmp_path):
    from megatron_channel.channel_logging.jsonl_schema import MixtureChannel, MixtureRecord

    jsonl, _, _, _ = synthetic_run
    path = tmp_path / "mixture.jsonl"
    path.write_text(Path(jsonl).read_text())
    names = plot_channels.load_series(jsonl).channels
    for iteration, weight in [(2, 0.7), (4, 0.2)]:
        append_jsonl(str(path), MixtureRecord(
            iteration=iteration, first_iteration=iteration + 3, first_sample=(iteration + 2) * 8,
            policy="learning-progress", signal="train", applied=True,
            channels={name: MixtureChannel(weight=weight if i == 0 else (1 - weight) / (len(names) - 1),
                                           loss=1.0, score=None) for i, name in enumerate(names)}))
    series = plot_channels.load_series(str(path))
    assert series.weights[names[0]] == [(5, 0.7), (7, 0.2)] and series.weights_applied
    out = tmp_path / "mixture.png"
    assert run_cli(path, "-o", out).returncode == 0 and out.read_bytes()[:4] == b"\x89PNG"
