"""``jsonl_schema``: the one definition of the channel jsonl, written and read back.

Records built from a real window round-trip through the file exactly; a NaN cannot be
written; lines that are not records are refused naming the file and line; the plotter and
the end-to-end tests read the file through ``read_jsonl``.
"""

from __future__ import annotations

import json

import pytest

from logging_tables import CONFIG, ITERATIONS, totals_of
from megatron_channel.channel_logging.jsonl_schema import (
    TrainChannel,
    TrainRecord,
    ValidationRecord,
    append_jsonl,
    from_json,
    read_jsonl,
    to_json,
    train_record,
    validation_record,
)
from megatron_channel.channel_logging.windows import ChannelAccountant


def written_records(tmp_path):
    accountant = ChannelAccountant(CONFIG)
    path = str(tmp_path / "run" / "channels.jsonl")
    records = []
    for iteration, it in enumerate(ITERATIONS, start=1):
        accountant.add_iteration(totals_of(it))
        records.append(train_record(accountant.console_report(), iteration, consumed_samples=4 * iteration))
    records.append(validation_record(accountant.tensorboard_report().window, 4, split="test",
                                     set_suffix="-chat", consumed_samples=16))
    for record in records:
        append_jsonl(path, record)
    return path, records


@pytest.mark.timeout(30)
def test_records_round_trip_exactly_through_the_file(tmp_path):
    path, records = written_records(tmp_path)
    assert read_jsonl(path) == records
    first = json.loads(open(path).readline())
    assert list(first) == ["kind", "iteration", "consumed_samples", "iterations_in_window", "lm_loss_token_weighted",
                           "loss_tokens", "loss_tokens_cumulative", "channels"]
    assert first["channels"]["chat"] == dict(loss=None, tokens=0.0, share=0.0, tokens_cumulative=0.0,
                                             share_cumulative=0.0)
    last = json.loads(open(path).read().splitlines()[-1])
    assert (last["kind"], last["split"], last["set"]) == ("validation", "test", "-chat")
    assert set(last["channels"]["math"]) == {"loss", "tokens", "share"}
    assert isinstance(read_jsonl(path)[-1], ValidationRecord)


@pytest.mark.timeout(30)
def test_a_nan_cannot_be_written_and_a_foreign_line_is_named(tmp_path):
    nan = TrainRecord(iteration=1, consumed_samples=None, iterations_in_window=1, lm_loss_token_weighted=float("nan"),
                      loss_tokens=1.0, loss_tokens_cumulative=1.0,
                      channels={"math": TrainChannel(loss=None, tokens=0.0, share=0.0, tokens_cumulative=0.0,
                                                     share_cumulative=0.0)})
    path = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        append_jsonl(str(path), nan)
    path.write_text(json.dumps({"kind": "train", "iteration": 3}) + "\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: not a channel logging record"):
        read_jsonl(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: not JSON"):
        read_jsonl(str(path))
    with pytest.raises(ValueError, match="here: not a channel logging record"):
        from_json({**to_json(nan), "kind": "eval"}, "here")
