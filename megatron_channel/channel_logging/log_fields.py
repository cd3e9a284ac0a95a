"""What channel logging adds to Megatron's console lines and hands to its TensorBoard / W&B writers.

Windows (``windows.ChannelReport``): the console fields cover the log interval; the
scalars cover the iterations since the previous TensorBoard point (one iteration with the
default ``--tensorboard-log-interval 1``). A channel without tokens in a window has no loss
value there (shown with its token count, 0), so nothing shown or written is NaN or inf.
Names: ``megatron_channel.names``.
"""

from __future__ import annotations

from ..config import ChannelConfig
from ..megatron_internals.loop import ITERATION_LINE_MARK, LOSS_SCALE_FIELD, VALIDATION_LINE_MARK
from ..names import ALL_TOKENS_NAME, CUMULATIVE, LM_LOSS_KEY, TOKEN_ACC_KEY, share_name, tokens_name, validation_name
from .windows import ChannelReport, ChannelStats



def is_iteration_line(message) -> bool:
    """Whether ``message`` is ``training_log``'s `` [date] iteration N/ M | ...`` line."""
    return isinstance(message, str) and ITERATION_LINE_MARK in message and "|" in message


def is_validation_line(message) -> bool:
    """Whether ``message`` is ``evaluate_and_print_results``' `` validation loss at ... |`` line."""
    return isinstance(message, str) and VALIDATION_LINE_MARK in message


def accuracy_keys(config: ChannelConfig) -> list[str | None]:
    """Each channel's accuracy key, or None per channel when token accuracy is off."""
    return config.accuracy_keys() or [None] * config.num_channels


def console_fields(report: ChannelReport, config: ChannelConfig) -> str:
    """`` loss_math: 2.345678E+00 | tokens_math: 1234 | token share math: 0.2500 |`` per channel.

    With token accuracy: `` token acc: 0.4567 |`` first, and `` token_acc_math: 0.4321 |``
    after each channel's loss.
    """
    stats = report.window
    parts = []
    if stats.token_acc() is not None:
        parts.append(f" {TOKEN_ACC_KEY}: {stats.token_acc():.4f} |")
    for i, (name, key, acc_key) in enumerate(zip(config.channels, config.metric_keys(), accuracy_keys(config))):
        loss = stats.loss(i)
        if loss is not None:
            parts.append(f" {key}: {loss:.6E} |")
        if stats.accuracy(i) is not None:
            parts.append(f" {acc_key}: {stats.accuracy(i):.4f} |")
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
    anchor = line.find(LOSS_SCALE_FIELD)
    if anchor >= 0:
        return line[:anchor] + fields + line[anchor:]
    return line + fields


def validation_console_fields(stats: ChannelStats, config: ChannelConfig) -> str:
    """``tokens_math: 12 | ... | loss tokens: 100 | `` in the validation line's style (Megatron
    prints the losses), with token accuracy ``token_acc_math value: 0.4321 | ...`` first."""
    parts = []
    for i, acc_key in enumerate(accuracy_keys(config)):
        if stats.accuracy(i) is not None:
            parts.append(f"{acc_key} value: {stats.accuracy(i):.4f} | ")
    if stats.token_acc() is not None:
        parts.append(f"{TOKEN_ACC_KEY} value: {stats.token_acc():.4f} | ")
    parts += [f"{tokens_name(name)}: {stats.tokens[i]:.0f} | " for i, name in enumerate(config.channels)]
    parts.append(f"{ALL_TOKENS_NAME}: {stats.total_tokens:.0f} | ")
    return "".join(parts)


def train_scalars(report: ChannelReport, config: ChannelConfig) -> dict[str, float]:
    """TensorBoard / W&B scalars of one log point, all finite."""
    window, cumulative = report.window, report.cumulative
    out: dict[str, float] = {}
    if window.token_acc() is not None:
        out[TOKEN_ACC_KEY] = window.token_acc()
    for i, (name, key, acc_key) in enumerate(zip(config.channels, config.metric_keys(), accuracy_keys(config))):
        loss = window.loss(i)
        if loss is not None:
            out[key] = loss
        if window.accuracy(i) is not None:
            out[acc_key] = window.accuracy(i)
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
    """Validation tokens, shares and accuracies; the losses go through Megatron's own code."""
    out: dict[str, float] = {}
    if stats.token_acc() is not None:
        out[validation_name(TOKEN_ACC_KEY, suffix)] = stats.token_acc()
    for i, (name, acc_key) in enumerate(zip(config.channels, accuracy_keys(config))):
        if stats.accuracy(i) is not None:
            out[validation_name(acc_key, suffix)] = stats.accuracy(i)
        out[validation_name(tokens_name(name), suffix)] = stats.tokens[i]
        share = stats.share(i)
        if share is not None:
            out[validation_name(share_name(name), suffix)] = share
    out[validation_name(ALL_TOKENS_NAME, suffix)] = stats.total_tokens
    return out
