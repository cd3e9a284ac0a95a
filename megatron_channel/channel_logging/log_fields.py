"""What channel logging adds to Megatron's console lines and hands to its TensorBoard / W&B writers.

Windows (``windows.ChannelReport``): the console fields cover the log interval; the
scalars cover the iterations since the previous TensorBoard point (one iteration with the
default ``--tensorboard-log-interval 1``). A channel without tokens in a window has no loss
value there (shown with its token count, 0), so nothing shown or written is NaN or inf.
Names: ``names``.
"""

from __future__ import annotations

from ..config import ChannelConfig
from .names import ALL_TOKENS_NAME, CUMULATIVE, LM_LOSS_KEY, share_name, tokens_name, validation_name
from .windows import ChannelReport, ChannelStats

# How Megatron 0.19 words the lines the fields go into; ``wrappers`` warns when none is seen.
ITERATION_LINE_MARK = " iteration "
VALIDATION_LINE_MARK = " loss at "


def is_iteration_line(message) -> bool:
    """Whether ``message`` is ``training_log``'s `` [date] iteration N/ M | ...`` line."""
    return isinstance(message, str) and ITERATION_LINE_MARK in message and "|" in message


def is_validation_line(message) -> bool:
    """Whether ``message`` is ``evaluate_and_print_results``' `` validation loss at ... |`` line."""
    return isinstance(message, str) and VALIDATION_LINE_MARK in message


def console_fields(report: ChannelReport, config: ChannelConfig) -> str:
    """`` loss_math: 2.345678E+00 | tokens_math: 1234 | token share math: 0.2500 |`` per channel."""
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


def validation_console_fields(stats: ChannelStats, config: ChannelConfig) -> str:
    """``tokens_math: 12 | ... | loss tokens: 100 | `` in the validation line's style."""
    parts = [f"{tokens_name(name)}: {stats.tokens[i]:.0f} | " for i, name in enumerate(config.channels)]
    parts.append(f"{ALL_TOKENS_NAME}: {stats.total_tokens:.0f} | ")
    return "".join(parts)


def train_scalars(report: ChannelReport, config: ChannelConfig) -> dict[str, float]:
    """TensorBoard / W&B scalars of one log point, all finite."""
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
        out[validation_name(tokens_name(name), suffix)] = stats.tokens[i]
        share = stats.share(i)
        if share is not None:
            out[validation_name(share_name(name), suffix)] = share
    out[validation_name(ALL_TOKENS_NAME, suffix)] = stats.total_tokens
    return out
