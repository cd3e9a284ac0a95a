"""What channel logging shows and writes: console fields, TensorBoard / W&B scalars, jsonl records.

Names (``loss_math`` is ``config.prefix + name``; every other name contains a space or a
``tokens_`` prefix, and channel names never contain whitespace, so nothing collides):

* ``loss_math``: token-weighted loss of channel ``math`` over the window (console: the log
  interval; TensorBoard / W&B: the iterations since the previous point, i.e. one iteration
  with the default ``--tensorboard-log-interval 1``). Absent when the channel had no tokens
  there. TensorBoard also gets ``loss_math vs samples``, as Megatron does for ``lm loss``.
* ``tokens_math``: the channel's loss tokens (``loss_mask`` sum) in the window.
* ``tokens_math cumulative``: its loss tokens since logging started in this process (not
  restored from a checkpoint when a run resumes).
* ``token share math`` / ``token share math cumulative``: ``tokens_math / loss tokens``,
  in the window / cumulative.
* ``loss tokens`` / ``loss tokens cumulative``: all loss tokens (``lm loss``'s count,
  untracked tokens included).
* ``loss_math validation<suffix>``: validation loss, written by Megatron's own code (with
  ``... vs samples`` and the PPL it prints); ``<suffix>`` is Megatron's (``-name`` or ``-i``
  with several validation sets, else empty).
* ``tokens_math validation<suffix>``, ``token share math validation<suffix>``,
  ``loss tokens validation<suffix>``: validation token counts and shares.

The console line shows ``loss_math``, ``tokens_math`` and ``token share math`` per channel.
The jsonl holds one JSON object per console log line (kind ``"train"``) and per evaluated set
(kind ``"validation"``, ``split`` ``"validation"`` or ``"test"``); see ``train_record`` /
``validation_record``. The file is appended to, never truncated, so a resumed run continues
it. No value written anywhere is NaN or inf.
"""

from __future__ import annotations

import json
import os

from .accounting import LM_LOSS_KEY, ChannelReport, ChannelStats
from .config import ChannelConfig


def tokens_name(channel: str) -> str:
    return f"tokens_{channel}"


def share_name(channel: str) -> str:
    return f"token share {channel}"


ALL_TOKENS_NAME = "loss tokens"
CUMULATIVE = " cumulative"


def console_fields(report: ChannelReport, config: ChannelConfig) -> str:
    """`` loss_math: 2.345678E+00 | tokens_math: 1234 | token share math: 0.2500 |`` per channel.

    A channel without tokens in the interval shows its token count (0) and no loss.
    """
    stats = report.window
    parts = []
    for i, (name, key) in enumerate(zip(config.channels, config.metric_keys())):
        loss = stats.loss(i)
        if loss is not None:
            parts.append(f" {key}: {loss:.6E} |")
        parts.append(f" {tokens_name(name)}: {stats.tokens[i]:.0f} |")
        share = stats.share(i)
        if share is not None:
            parts.append(f" {share_name(name)}: {share:.4f} |")
    return "".join(parts)


def insert_into_iteration_line(line: str, fields: str) -> str:
    """Put ``fields`` right after the line's `` lm loss: ... |`` field, else before
    `` loss scale:``, else at the end."""
    anchor = line.find(f" {LM_LOSS_KEY}: ")
    if anchor >= 0:
        end = line.find("|", anchor)
        if end >= 0:
            return line[: end + 1] + fields + line[end + 1 :]
    anchor = line.find(" loss scale:")
    if anchor >= 0:
        return line[:anchor] + fields + line[anchor:]
    return line + fields


def is_iteration_line(message) -> bool:
    """Whether ``message`` is ``training_log``'s `` [date] iteration N/ M | ...`` line."""
    return isinstance(message, str) and " iteration " in message and "|" in message


def train_scalars(report: ChannelReport, config: ChannelConfig) -> dict[str, float]:
    """TensorBoard / W&B scalars of one log point (names in the module docstring), all finite."""
    window, cumulative = report.window, report.cumulative
    out: dict[str, float] = {}
    for i, (name, key) in enumerate(zip(config.channels, config.metric_keys())):
        loss = window.loss(i)
        if loss is not None:
            out[key] = loss
        out[tokens_name(name)] = window.tokens[i]
        out[tokens_name(name) + CUMULATIVE] = cumulative.tokens[i]
        for stats, suffix in ((window, ""), (cumulative, CUMULATIVE)):
            share = stats.share(i)
            if share is not None:
                out[share_name(name) + suffix] = share
    out[ALL_TOKENS_NAME] = window.total_tokens
    out[ALL_TOKENS_NAME + CUMULATIVE] = cumulative.total_tokens
    return out


def validation_scalars(stats: ChannelStats, config: ChannelConfig, suffix: str = "") -> dict[str, float]:
    """Validation tokens and shares; the losses go through Megatron's own code."""
    out: dict[str, float] = {}
    for i, name in enumerate(config.channels):
        out[f"{tokens_name(name)} validation{suffix}"] = stats.tokens[i]
        share = stats.share(i)
        if share is not None:
            out[f"{share_name(name)} validation{suffix}"] = share
    out[f"{ALL_TOKENS_NAME} validation{suffix}"] = stats.total_tokens
    return out


def validation_console_fields(stats: ChannelStats, config: ChannelConfig) -> str:
    """``tokens_math: 12 | ... | loss tokens: 100 | `` in the validation line's style."""
    parts = [f"{tokens_name(name)}: {stats.tokens[i]:.0f} | " for i, name in enumerate(config.channels)]
    parts.append(f"{ALL_TOKENS_NAME}: {stats.total_tokens:.0f} | ")
    return "".join(parts)


def train_record(report: ChannelReport, iteration: int, consumed_samples: int | None = None) -> dict:
    """jsonl object of one console log point (``loss`` / ``share`` are null, never NaN, when empty)."""
    window, cumulative = report.window, report.cumulative
    return {
        "kind": "train",
        "iteration": int(iteration),
        "consumed_samples": consumed_samples,
        "iterations_in_window": window.iterations,
        "lm_loss_token_weighted": window.lm_loss(),
        "loss_tokens": window.total_tokens,
        "loss_tokens_cumulative": cumulative.total_tokens,
        "channels": {
            name: {
                "loss": window.loss(i),
                "tokens": window.tokens[i],
                "tokens_cumulative": cumulative.tokens[i],
                "share": window.share(i),
                "share_cumulative": cumulative.share(i),
            }
            for i, name in enumerate(window.names)
        },
    }


def validation_record(
    stats: ChannelStats, iteration: int, *, split: str = "validation", set_suffix: str = "",
    consumed_samples: int | None = None,
) -> dict:
    """jsonl object of one evaluated set."""
    return {
        "kind": "validation",
        "split": split,
        "set": set_suffix,
        "iteration": int(iteration),
        "consumed_samples": consumed_samples,
        "lm_loss_token_weighted": stats.lm_loss(),
        "loss_tokens": stats.total_tokens,
        "channels": {
            name: {"loss": stats.loss(i), "tokens": stats.tokens[i], "share": stats.share(i)}
            for i, name in enumerate(stats.names)
        },
    }


def append_jsonl(path: str, record: dict) -> None:
    """Append one line; ``allow_nan=False`` turns a NaN that slipped through into an error."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
