"""``log_fields``: the console fields and TensorBoard / W&B scalars, finite for empty channels."""

from __future__ import annotations

import math

import pytest

from logging_tables import CONFIG, ITERATIONS, no_nan, totals_of
from megatron_channel.channel_logging.jsonl_schema import train_record
from megatron_channel.channel_logging.log_fields import (
    console_fields,
    insert_into_iteration_line,
    is_iteration_line,
    is_validation_line,
    train_scalars,
)
from megatron_channel.channel_logging.windows import ChannelAccountant


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
    assert train_record(report, 4).channels["code"].loss is None


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
def test_line_recognition_follows_megatron_019_wording():
    assert is_iteration_line(" [2026-12-03 10:00:00] iteration        2/      10 | consumed samples: 8 |")
    assert not is_iteration_line(" [2026-12-03 10:00:00] step 2/10 | consumed samples: 8 |")
    assert not is_iteration_line(" iteration 2 without fields")
    assert not is_iteration_line(None)
    assert is_validation_line(" validation loss at iteration 10 | lm loss value: 2.0E+00 |")
    assert not is_validation_line(" validation at step 10 | lm loss value: 2.0E+00 |")
