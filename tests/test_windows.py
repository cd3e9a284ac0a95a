"""``windows``: exact token-weighted windows over iterations, never 0 / 0.

Interval losses equal ``sum / tokens`` computed with ``fractions.Fraction`` from the
iteration table; windows where a channel is absent give no loss value; the console, the
TensorBoard and the whole-run windows are independent; a hypothesis property over random tables.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logging_tables import CONFIG, ITERATIONS, NAMES, no_nan, reference, totals_of
from megatron_channel.channel_logging.jsonl_schema import to_json, train_record
from megatron_channel.channel_logging.log_fields import console_fields, train_scalars
from megatron_channel.channel_logging.windows import ChannelAccountant, TotalsWindow


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


def reports_over_the_table():
    """The accountant fed every kept iteration of ``ITERATIONS``, the TensorBoard report taken
    after iteration 2, then the console and the TensorBoard reports at the end, in that order."""
    accountant = ChannelAccountant(CONFIG)
    for it in ITERATIONS:
        if not it["skipped"]:
            accountant.add_iteration(totals_of(it))
        if it is ITERATIONS[1]:
            tb_after_two = accountant.tensorboard_report()
    console = accountant.console_report()
    tb = accountant.tensorboard_report()
    return accountant, tb_after_two, console, tb


@pytest.mark.timeout(30)
def test_console_and_tensorboard_windows_are_independent():
    _, tb_after_two, console, tb = reports_over_the_table()
    assert tb_after_two.window.iterations == 2 and tb.window.iterations == 1
    assert console.window.iterations == 3  # the console window was not reset by the TB one
    assert tb.window.loss(0) == 3.0 and tb.window.share(0) == 1.0


@pytest.mark.timeout(30)
def test_cumulative_tokens_and_shares_cover_the_whole_run():
    _, _, console, tb = reports_over_the_table()
    want_all = reference(ITERATIONS)
    for i, name in enumerate(NAMES):
        assert tb.cumulative.tokens[i] == want_all[name]["tokens"] == console.window.tokens[i]
        assert tb.cumulative.share(i) == pytest.approx(float(want_all[name]["share"]), rel=1e-15)
    assert tb.cumulative.total_tokens == 13.0


@pytest.mark.timeout(30)
def test_tensorboard_scalars_carry_the_cumulative_tokens_and_shares():
    _, _, _, tb = reports_over_the_table()
    scalars = train_scalars(tb, CONFIG)
    assert scalars["tokens_math cumulative"] == 8.0 and scalars["token share chat cumulative"] == 1 / 13
    assert scalars["loss tokens"] == 2.0 and scalars["loss tokens cumulative"] == 13.0


@pytest.mark.timeout(30)
def test_an_empty_console_window_reports_nothing():
    accountant, _, _, _ = reports_over_the_table()
    assert accountant.console_report() is None


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
    json.dumps(to_json(train_record(report, 1)), allow_nan=False)


@pytest.mark.timeout(30)
def test_totals_window_refuses_a_table_of_another_shape_and_empties_on_take():
    window = TotalsWindow(NAMES)
    with pytest.raises(ValueError, match=r"totals must be \[4, 2\], got \[3, 2\]"):
        window.add(totals_of(ITERATIONS[0])[:3])
    window.add(totals_of(ITERATIONS[0]))
    assert window.take(reset=False).iterations == 1
    assert window.take().total_tokens == 8.0
    assert window.take() is None
