#!/usr/bin/env python
"""Plot per-channel loss curves, token accuracy and token shares of a run.

    python scripts/plot_channels.py RUN_DIR_OR_JSONL -o out.png [--loss-name loss_{channel}]

Input: the ``jsonl_path`` written by ``install_channel_logging`` (its records are defined in
``megatron_channel/channel_logging/jsonl_schema.py``: ``kind`` ``"train"`` and
``"validation"`` records), or a TensorBoard directory (the run's ``--tensorboard-dir``, or a
directory above it) holding the scalars that logging writes: the loss keys (``--loss-name``,
the run's ``--channel-loss-name``), ``<key> validation<suffix>``, ``token share <name>`` and,
with token accuracy, the accuracy keys (``--accuracy-name``).

Output: one PNG, top panel the loss of every channel over iterations (train solid,
validation dashed in the same colour, ``lm loss`` thin grey for reference), bottom panel every
channel's share of the loss tokens; with token accuracy, a middle panel of every channel's
accuracy (train solid, validation dashed). With ``--channel-mixture`` (or its advice), the share
panel also draws each channel's sampling weight as a dashed step line from the iteration it
applies to (dotted: advised, not applied). Iterations logged twice (a run resumed from an earlier
checkpoint) keep the later value.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field

from megatron_channel.channel_logging.jsonl_schema import MixtureRecord, TrainRecord, read_jsonl
from megatron_channel.names import LM_LOSS_KEY, TOKEN_ACC_KEY, share_name, validation_name

Series = list[tuple[int, float]]


@dataclass
class ChannelSeries:
    """Curves of one run, each a list of ``(iteration, value)`` sorted by iteration.

    Attributes:
        channels: channel names (config order from a jsonl, sorted from TensorBoard).
        train_loss: per channel, the token-weighted training loss.
        validation_loss: per ``(channel, set suffix)`` (suffix ``""`` for a single validation
            set), the validation loss.
        share: per channel, its share of all loss tokens.
        train_accuracy / validation_accuracy: per channel (and set), its token accuracy.
        reference_accuracy: the all-token accuracy (``token acc``), when the input has it.
        reference_loss: the all-token loss (``lm loss``), when the input has it.
        weights: per channel, the mixture's sampling weight from each decision's first iteration.
        weights_applied: whether the mixture changed sampling (False: advice only).
    """

    channels: list[str]
    train_loss: dict[str, Series] = field(default_factory=dict)
    validation_loss: dict[tuple[str, str], Series] = field(default_factory=dict)
    share: dict[str, Series] = field(default_factory=dict)
    reference_loss: Series = field(default_factory=list)
    train_accuracy: dict[str, Series] = field(default_factory=dict)
    validation_accuracy: dict[tuple[str, str], Series] = field(default_factory=dict)
    reference_accuracy: Series = field(default_factory=list)
    weights: dict[str, Series] = field(default_factory=dict)
    weights_applied: bool = True


def _sorted(points: dict[int, float]) -> Series:
    return sorted(points.items())


def parse_jsonl(path: str) -> ChannelSeries:
    """Series from ``install_channel_logging``'s jsonl (test-split validation records are skipped)."""
    channels: list[str] = []
    series: dict[str, dict] = {name: {} for name in (
        "train_loss", "validation_loss", "share", "train_accuracy", "validation_accuracy")}
    reference: dict[str, dict[int, float]] = {"loss": {}, "accuracy": {}}
    weights: dict[str, dict[int, float]] = {}
    applied = True

    def add(kind: str, key, iteration: int, value: float | None) -> None:
        if value is not None:
            series[kind].setdefault(key, {})[iteration] = value

    for record in read_jsonl(path):
        for name in record.channels:
            if name not in channels:
                channels.append(name)
        if isinstance(record, TrainRecord):
            for name, values in record.channels.items():
                add("train_loss", name, record.iteration, values.loss)
                add("share", name, record.iteration, values.share)
                add("train_accuracy", name, record.iteration, values.accuracy)
            if record.lm_loss_token_weighted is not None:
                reference["loss"][record.iteration] = record.lm_loss_token_weighted
            if record.token_acc is not None:
                reference["accuracy"][record.iteration] = record.token_acc
        elif isinstance(record, MixtureRecord):
            applied = record.applied
            for name, values in record.channels.items():
                weights.setdefault(name, {})[record.first_iteration] = values.weight
        elif record.split == "validation":
            for name, values in record.channels.items():
                add("validation_loss", (name, record.set), record.iteration, values.loss)
                add("validation_accuracy", (name, record.set), record.iteration, values.accuracy)
    return ChannelSeries(
        channels=channels,
        **{kind: {k: _sorted(v) for k, v in per_key.items()} for kind, per_key in series.items()},
        reference_loss=_sorted(reference["loss"]),
        reference_accuracy=_sorted(reference["accuracy"]),
        weights={name: _sorted(points) for name, points in weights.items()},
        weights_applied=applied,
    )


def _event_dir(path: str) -> str:
    """``path`` if it holds event files, else the first directory below it that does."""
    for root, dirs, files in os.walk(path):
        dirs.sort()
        if any(f.startswith("events.out.tfevents") for f in files):
            return root
    raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under {path}")


def parse_tensorboard(path: str, loss_name: str = "loss_{channel}",
                      accuracy_name: str = "token_acc_{channel}") -> ChannelSeries:
    """Series from the TensorBoard scalars that ``install_channel_logging`` writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(_event_dir(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])

    def points(tag: str) -> Series:
        return _sorted({int(e.step): float(e.value) for e in accumulator.Scalars(tag)})

    share_tag = re.compile(re.escape(share_name("")) + r"(\S+)")
    channels = sorted({m.group(1) for t in tags if (m := share_tag.fullmatch(t))})
    if not channels:
        raise ValueError(
            f"no '{share_name('<channel>')}' scalars in {path}: was install_channel_logging active in this run?"
        )
    series = ChannelSeries(channels=channels)
    for name in channels:
        series.share[name] = points(share_name(name))
        for template, train, validation in ((loss_name, series.train_loss, series.validation_loss),
                                            (accuracy_name, series.train_accuracy, series.validation_accuracy)):
            key = template.format(channel=name)
            if key in tags:
                train[name] = points(key)
            validation_tag = re.compile(re.escape(validation_name(key)) + r"(-\S+)?")
            for tag in sorted(tags):
                if m := validation_tag.fullmatch(tag):
                    validation[(name, m.group(1) or "")] = points(tag)
    if LM_LOSS_KEY in tags:
        series.reference_loss = points(LM_LOSS_KEY)
    if TOKEN_ACC_KEY in tags:
        series.reference_accuracy = points(TOKEN_ACC_KEY)
    return series


def load_series(path: str, loss_name: str = "loss_{channel}",
                accuracy_name: str = "token_acc_{channel}") -> ChannelSeries:
    """A jsonl file or a TensorBoard directory (where the key templates name the tags)."""
    if os.path.isdir(path):
        return parse_tensorboard(path, loss_name, accuracy_name)
    if os.path.isfile(path):
        return parse_jsonl(path)
    raise FileNotFoundError(f"{path} is neither a jsonl file nor a TensorBoard directory")


def _draw(ax, points: Series, **style) -> None:
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, **style)


def plot(series: ChannelSeries, out_path: str, title: str | None = None) -> None:
    """Write the PNG: loss, then accuracy (when the run logged it), then token shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (series.train_loss or series.validation_loss or series.share):
        raise ValueError("nothing to plot: no channel had a loss or a token share")
    accuracy = bool(series.train_accuracy or series.validation_accuracy)
    ratios = [3, 2, 2] if accuracy else [3, 2]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(10, 7.5 + 2.5 * accuracy), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    loss_ax, share_ax = axes[0], axes[-1]
    acc_ax = axes[1] if accuracy else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    _draw(loss_ax, series.reference_loss, color="0.6", linewidth=1, label="lm loss (all tokens)")
    if acc_ax is not None:
        _draw(acc_ax, series.reference_accuracy, color="0.6", linewidth=1, label="token acc (all tokens)")
    panels = [(loss_ax, series.train_loss, series.validation_loss)]
    if acc_ax is not None:
        panels.append((acc_ax, series.train_accuracy, series.validation_accuracy))
    for i, name in enumerate(series.channels):
        color = colors[i % len(colors)]
        for ax, train, validation in panels:
            _draw(ax, train.get(name), color=color, linewidth=1.6, label=f"{name} train")
            for (channel, suffix), points in sorted(validation.items()):
                if channel == name:
                    _draw(ax, points, color=color, linestyle="--", marker="o", markersize=3,
                          label=f"{name} validation{suffix}")
        _draw(share_ax, series.share.get(name), color=color, linewidth=1.4, label=name)
        _draw(share_ax, series.weights.get(name), color=color, linewidth=1.2, drawstyle="steps-post",
              linestyle="--" if series.weights_applied else ":",
              label=f"{name} weight" + ("" if series.weights_applied else " (advised)"))
    loss_ax.set_ylabel("loss per token")
    loss_ax.set_title(title or "per-channel loss")
    if acc_ax is not None:
        acc_ax.set_ylabel("token accuracy")
        acc_ax.set_ylim(0, 1)
    share_ax.set_ylabel("share of loss tokens")
    share_ax.set_xlabel("iteration")
    share_ax.set_ylim(0, 1)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    for ax in axes[:-1]:
        ax.legend(loc="upper right", fontsize=8, ncol=2)
    share_ax.legend(loc="upper right", fontsize=8, ncol=min(4, max(1, len(series.channels))))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the channel logging jsonl, or a TensorBoard directory")
    parser.add_argument("-o", "--output", default="channels.png", help="PNG to write (default channels.png)")
    parser.add_argument("--loss-name", default=None,
                        help="the run's --channel-loss-name, for TensorBoard input (default loss_{channel})")
    parser.add_argument("--prefix", default=None, help="the run's --channel-loss-prefix (instead of --loss-name)")
    parser.add_argument("--accuracy-name", default="token_acc_{channel}",
                        help="the run's --channel-accuracy-name, for TensorBoard input (default token_acc_{channel})")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        if args.loss_name and args.prefix:
            raise ValueError("give --loss-name or --prefix, not both")
        loss_name = args.loss_name or (args.prefix or "loss_") + "{channel}"
        series = load_series(args.source, loss_name, args.accuracy_name)
        plot(series, args.output, args.title or f"per-channel loss: {args.source}")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
