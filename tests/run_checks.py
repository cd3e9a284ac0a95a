"""Checks of a ``pretrain_runs.Run`` that every end-to-end launch must pass, whatever the model
(GPTModel, HybridModel) and the megatron-core release: numbers, not only that the run ended."""

from __future__ import annotations

import math

import pytest

from pretrain_runs import CHANNELS, GLOBAL_BATCH, SEQ, close

ITERATION_TOKENS = GLOBAL_BATCH * SEQ  # every blend token is a loss token


def check_train_logs(run, iteration_tokens: int | None = ITERATION_TOKENS, megatron_lm_loss: bool = True):
    """The checks every run must pass. ``iteration_tokens``: loss tokens of every iteration,
    when fixed (then Megatron's own interval ``lm loss`` is token-weighted too)."""
    records = run.train_records()
    assert records, run.stdout[-3000:]
    lines = run.iteration_lines()
    assert sorted(lines) == [r.iteration for r in records]
    for record in records:
        channels = record.channels
        tokens = sum(c.tokens for c in channels.values())
        assert tokens == record.loss_tokens > 0  # every token is tracked
        mix = sum(c.tokens * c.loss for c in channels.values() if c.tokens) / tokens
        assert close(mix, record.lm_loss_token_weighted), record
        if iteration_tokens is not None:
            assert record.loss_tokens == iteration_tokens * record.iterations_in_window
        line = lines[record.iteration]
        if megatron_lm_loss:
            assert close(float(line["lm loss"]), mix), (line["lm loss"], mix)
        for name, channel in channels.items():
            assert float(line[f"tokens_{name}"]) == channel.tokens
            if channel.tokens:
                assert close(float(line[f"loss_{name}"]), channel.loss, 1e-6)
            else:
                assert f"loss_{name}" not in line
    check_tensorboard_matches(run, records)


def check_tensorboard_matches(run, records):
    """TensorBoard's per-iteration points, summed over a console window, give that window's numbers."""
    scalars = run.scalars
    assert "lm loss" in scalars
    for record in records:
        window = range(record.iteration - record.iterations_in_window + 1, record.iteration + 1)
        assert sum(scalars["loss tokens"][i] for i in window) == record.loss_tokens
        for name, channel in record.channels.items():
            tokens = [scalars[f"tokens_{name}"][i] for i in window]
            assert sum(tokens) == channel.tokens
            if channel.tokens:
                weighted = sum(t * scalars[f"loss_{name}"][i] for t, i in zip(tokens, window) if t)
                assert close(weighted / sum(tokens), channel.loss), (name, record.iteration)


def check_validation(run, sets=("",)):
    """Per-channel validation of every evaluated set: present, finite, and the same in the
    console, the jsonl and TensorBoard (in evaluation order: the final evaluation after
    training repeats the last iteration's step)."""
    records = [r for r in run.validation_records() if r.split == "validation"]
    assert records
    assert {r.set for r in records} == set(sets)
    lines = [fields for head, fields in run.validation_lines() if "test set" not in head]
    assert len(lines) == len(records), [h for h, _ in run.validation_lines()]
    for record, line in zip(records, lines):
        present = {name: c for name, c in record.channels.items() if c.tokens}
        assert present, record
        assert sum(c.tokens for c in record.channels.values()) == record.loss_tokens
        for name, channel in present.items():
            assert math.isfinite(channel.loss)
            assert close(float(line[f"loss_{name} value"]), channel.loss, 1e-6)
            assert float(line[f"tokens_{name}"]) == channel.tokens
    for suffix in sets:
        for name in records[0].channels:
            logged = [(r.iteration, r.channels[name].loss) for r in records
                      if r.set == suffix and r.channels[name].tokens]
            points = run.events.get(f"loss_{name} validation{suffix}", [])
            assert [step for step, _ in points] == [it for it, _ in logged]
            assert all(close(value, loss) for (_, value), (_, loss) in zip(points, logged))


def check_token_accuracy(run, loss_key: str = "loss_{name}", accuracy_key: str = "token_acc_{name}"):
    """--channel-token-accuracy: the accuracies are shares in [0, 1] that mix, token-weighted, to
    `token acc`; console, jsonl and TensorBoard agree, in training and validation. ``loss_key`` /
    ``accuracy_key``: the key templates of the run."""
    lines = run.iteration_lines()
    scalars = run.scalars
    for record in run.train_records():
        assert record.token_acc is not None and 0.0 <= record.token_acc <= 1.0
        tracked = {name: c for name, c in record.channels.items() if c.tokens}
        assert sum(c.tokens * c.accuracy for c in tracked.values()) / record.loss_tokens == pytest.approx(
            record.token_acc, rel=1e-9)
        line = lines[record.iteration]
        assert abs(float(line["token acc"]) - record.token_acc) <= 5e-5
        for name, channel in record.channels.items():
            if not channel.tokens:
                assert channel.accuracy is None and accuracy_key.format(name=name) not in line
                continue
            assert 0.0 <= channel.accuracy <= 1.0
            assert abs(float(line[accuracy_key.format(name=name)]) - channel.accuracy) <= 5e-5
            assert close(float(line[loss_key.format(name=name)]), channel.loss, 1e-6)
            assert loss_key == "loss_{name}" or f"loss_{name}" not in line  # renamed, not both
            window = range(record.iteration - record.iterations_in_window + 1, record.iteration + 1)
            tokens = [scalars[f"tokens_{name}"][i] for i in window]
            correct = sum(t * scalars[accuracy_key.format(name=name)][i] for t, i in zip(tokens, window) if t)
            assert correct / sum(tokens) == pytest.approx(channel.accuracy, rel=1e-6)
    validation = [r for r in run.validation_records() if r.split == "validation"]
    assert validation and all(r.token_acc is not None for r in validation)
    for name in CHANNELS:
        logged = [(r.iteration, r.channels[name].accuracy) for r in validation if r.channels[name].tokens]
        points = run.events[accuracy_key.format(name=name) + " validation"]
        assert [step for step, _ in points] == [it for it, _ in logged]
        assert all(abs(value - acc) < 1e-6 for (_, value), (_, acc) in zip(points, logged))
    assert "token acc validation" in run.events
    lines = [fields for head, fields in run.validation_lines() if "test set" not in head]
    assert len(lines) == len(validation)
    for record, fields in zip(validation, lines):
        assert abs(float(fields["token acc value"]) - record.token_acc) <= 5e-5
        for name, channel in record.channels.items():
            if channel.tokens:
                assert abs(float(fields[accuracy_key.format(name=name) + " value"]) - channel.accuracy) <= 5e-5
                assert close(float(fields[loss_key.format(name=name) + " value"]), channel.loss, 1e-6)


def check_packed_sft_channels(run, token_accuracy: bool = True):
    """Packed SFT from the tiny jsonl files (channels from ``configs/channels.yaml``): every
    channel had tokens, unlabeled.jsonl's lines counting as ``other``; with token accuracy, the
    channel accuracies mix, token-weighted, to ``token acc``."""
    assert {name for r in run.train_records() for name, c in r.channels.items() if c.tokens} == {
        "math", "code", "chat", "other"}
    for record in run.train_records() + run.validation_records():
        assert (record.token_acc is not None) == token_accuracy
        if token_accuracy:
            tracked = [c for c in record.channels.values() if c.tokens]
            assert sum(c.tokens * c.accuracy for c in tracked) / record.loss_tokens == pytest.approx(
                record.token_acc, rel=1e-9)


def check_bitwise_lm_loss(ours, stock):
    """``ours`` logs the same ``lm loss`` and grad norm as ``stock``, to the last printed digit, in
    every iteration line, TensorBoard point and validation line; ``stock`` logs no channel."""
    assert stock.records == []
    ours_lines, stock_lines = ours.iteration_lines(), stock.iteration_lines()
    assert sorted(ours_lines) == sorted(stock_lines)
    for iteration in ours_lines:
        for key in ("lm loss", "grad norm"):
            assert ours_lines[iteration][key] == stock_lines[iteration][key], (iteration, key)
        assert "loss_copy" not in stock_lines[iteration]
    assert ours.scalars["lm loss"] == stock.scalars["lm loss"]
    assert [f["lm loss value"] for _, f in ours.validation_lines()] == [
        f["lm loss value"] for _, f in stock.validation_lines()]
