"""The channel jsonl: one JSON object per console log line and per evaluated set.

The one definition of the file's records, used by the logging (writing), by
``scripts/plot_channels.py`` and by the tests (reading). A train record (``kind``
``"train"``) covers the console log interval that ends at ``iteration``; a validation record
(``kind`` ``"validation"``, ``split`` ``"validation"`` or ``"test"``, ``set`` Megatron's
set suffix) covers one evaluation. Per channel: ``loss`` (null when it had no tokens, never
NaN), ``tokens`` and ``share`` of all loss tokens, and on train records the cumulative
``tokens_cumulative`` / ``share_cumulative`` since logging started in the process. With
token accuracy on, each channel also has ``accuracy`` and the record ``token_acc`` (absent,
not null, where undefined or off). A mixture record (``kind`` ``"mixture"``) is one decision of
``--channel-mixture`` / ``--channel-mixture-advice``: per channel its weight and the signal it
came from. The file is appended to, never truncated, so a resumed run continues it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

TRAIN_KIND = "train"
VALIDATION_KIND = "validation"
MIXTURE_KIND = "mixture"


@dataclass(frozen=True)
class ValidationChannel:
    """One channel of one evaluation (or of one train window, with ``TrainChannel``'s extra fields)."""

    loss: float | None
    tokens: float
    share: float | None
    accuracy: float | None = None  # with token accuracy on (else absent from the file)


@dataclass(frozen=True, kw_only=True)
class TrainChannel(ValidationChannel):
    tokens_cumulative: float
    share_cumulative: float | None


@dataclass(frozen=True)
class TrainRecord:
    """One console log point: the interval ending at ``iteration``."""

    kind: ClassVar[str] = TRAIN_KIND
    iteration: int
    consumed_samples: int | None
    iterations_in_window: int
    lm_loss_token_weighted: float | None
    loss_tokens: float
    loss_tokens_cumulative: float
    channels: dict[str, TrainChannel]
    token_acc: float | None = None  # with token accuracy on (else absent from the file)


@dataclass(frozen=True)
class ValidationRecord:
    """One evaluated set at ``iteration``; ``set`` is ``""`` or Megatron's ``-name`` / ``-i``."""

    kind: ClassVar[str] = VALIDATION_KIND
    split: str
    set: str
    iteration: int
    consumed_samples: int | None
    lm_loss_token_weighted: float | None
    loss_tokens: float
    channels: dict[str, ValidationChannel]
    token_acc: float | None = None


@dataclass(frozen=True)
class MixtureChannel:
    """One channel of one mixture decision."""

    weight: float  # its sampling weight from ``first_sample`` on
    loss: float | None  # the signal's loss (None: no tokens this interval)
    score: float | None  # learning-progress: loss decrease per token; target-loss: excess over the target


@dataclass(frozen=True)
class MixtureRecord:
    """One mixture decision (``--channel-mixture`` / ``--channel-mixture-advice``), made after ``iteration``.

    ``applied``: the blend samples with these weights from global sample ``first_sample`` (the
    first batch of ``first_iteration``) on; False under advice (logged only).
    """

    kind: ClassVar[str] = MIXTURE_KIND
    iteration: int
    first_iteration: int
    first_sample: int
    policy: str
    signal: str
    applied: bool
    channels: dict[str, MixtureChannel]


Record = TrainRecord | ValidationRecord | MixtureRecord
_CHANNEL_TYPE = {TRAIN_KIND: TrainChannel, VALIDATION_KIND: ValidationChannel, MIXTURE_KIND: MixtureChannel}
_RECORD_TYPE = {TRAIN_KIND: TrainRecord, VALIDATION_KIND: ValidationRecord, MIXTURE_KIND: MixtureRecord}


def train_record(report, iteration: int, consumed_samples: int | None = None) -> TrainRecord:
    """The record of one console log point (``report``: a ``windows.ChannelReport``)."""
    window, cumulative = report.window, report.cumulative
    return TrainRecord(
        iteration=int(iteration),
        consumed_samples=consumed_samples,
        iterations_in_window=window.iterations,
        lm_loss_token_weighted=window.lm_loss(),
        loss_tokens=window.total_tokens,
        loss_tokens_cumulative=cumulative.total_tokens,
        channels={
            name: TrainChannel(loss=window.loss(i), tokens=window.tokens[i], share=window.share(i),
                               accuracy=window.accuracy(i), tokens_cumulative=cumulative.tokens[i],
                               share_cumulative=cumulative.share(i))
            for i, name in enumerate(window.names)
        },
        token_acc=window.token_acc(),
    )


def validation_record(stats, iteration: int, *, split: str = "validation", set_suffix: str = "",
                      consumed_samples: int | None = None) -> ValidationRecord:
    """The record of one evaluated set (``stats``: a ``windows.ChannelStats``)."""
    return ValidationRecord(
        split=split,
        set=set_suffix,
        iteration=int(iteration),
        consumed_samples=consumed_samples,
        lm_loss_token_weighted=stats.lm_loss(),
        loss_tokens=stats.total_tokens,
        channels={name: ValidationChannel(loss=stats.loss(i), tokens=stats.tokens[i], share=stats.share(i),
                                          accuracy=stats.accuracy(i))
                  for i, name in enumerate(stats.names)},
        token_acc=stats.token_acc(),
    )


# Fields a record has only with token accuracy on: left out of the file when None.
OPTIONAL_FIELDS = ("accuracy", "token_acc")


def _without_unset(values: dict) -> dict:
    return {k: v for k, v in values.items() if not (k in OPTIONAL_FIELDS and v is None)}


def to_json(record: Record) -> dict[str, Any]:
    """The JSON object of ``record``: ``kind`` first, then the fields in definition order."""
    obj = {"kind": record.kind, **_without_unset(dataclasses.asdict(record))}
    obj["channels"] = {name: _without_unset(values) for name, values in obj["channels"].items()}
    return obj


def from_json(obj: Any, where: str = "record") -> Record:
    """The record a JSON object holds; ``ValueError`` naming ``where`` when it is not one."""
    try:
        kind = obj["kind"]
        record_type, channel_type = _RECORD_TYPE[kind], _CHANNEL_TYPE[kind]
        fields = {f.name: obj[f.name] for f in dataclasses.fields(record_type) if f.name not in OPTIONAL_FIELDS}
        fields.update({k: obj[k] for k in OPTIONAL_FIELDS if k in obj})
        fields["channels"] = {name: channel_type(**values) for name, values in obj["channels"].items()}
        fields["iteration"] = int(fields["iteration"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: not a channel logging record ({type(e).__name__}: {e})") from None
    return record_type(**fields)


def append_jsonl(path: str, record: Record) -> None:
    """Append one line; ``allow_nan=False`` turns a NaN that slipped through into an error."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(to_json(record), allow_nan=False) + "\n")


def read_jsonl(path: str) -> list[Record]:
    """Every record of the file, in order (blank lines skipped)."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
            records.append(from_json(obj, f"{path}:{line_no}"))
    return records
