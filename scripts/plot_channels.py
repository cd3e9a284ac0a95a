#!/usr/bin/env python
"""Plot per-channel loss curves and token shares of a run.

    python scripts/plot_channels.py RUN_DIR_OR_JSONL -o out.png [--prefix loss_]

Input: the ``jsonl_path`` written by ``install_channel_logging`` (its records are defined in
``megatron_channel/channel_logging/jsonl_schema.py``: ``kind`` ``"train"`` and
``"validation"`` records), or a TensorBoard directory (the run's ``--tensorboard-dir``, or a
directory above it) holding the scalars that logging writes: ``<prefix><name>``,
``<prefix><name> validation<suffix>`` and ``token share <name>``.

Output: one PNG, top panel the loss of every channel over iterations (train solid,
validation dashed in the same colour, ``lm loss`` thin grey for reference), bottom panel every
channel's share of the loss tokens. Iterations logged twice (a run resumed from an earlier
checkpoint) keep the later value.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field

from megatron_channel.channel_logging.jsonl_schema import TrainRecord, read_jsonl
from megatron_channel.channel_logging.names import LM_LOSS_KEY, share_name, validation_name

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
        reference_loss: the all-token loss (``lm loss``), when the input has it.
    """

    channels: list[str]
    train_loss: dict[str, Series] = field(default_factory=dict)
    validation_loss: dict[tuple[str, str], Series] = field(default_factory=dict)
    share: dict[str, Series] = field(default_factory=dict)
    reference_loss: Series = field(default_factory=list)


def _sorted(points: dict[int, float]) -> Series:
    return sorted(points.items())


def parse_jsonl(path: str) -> ChannelSeries:
    """Series from ``install_channel_logging``'s jsonl (test-split validation records are skipped)."""
    channels: list[str] = []
    train: dict[str, dict[int, float]] = {}
    validation: dict[tuple[str, str], dict[int, float]] = {}
    share: dict[str, dict[int, float]] = {}
    reference: dict[int, float] = {}
    for record in read_jsonl(path):
        for name in record.channels:
            if name not in channels:
                channels.append(name)
        if isinstance(record, TrainRecord):
            for name, values in record.channels.items():
                if values.loss is not None:
                    train.setdefault(name, {})[record.iteration] = values.loss
                if values.share is not None:
                    share.setdefault(name, {})[record.iteration] = values.share
            if record.lm_loss_token_weighted is not None:
                reference[record.iteration] = record.lm_loss_token_weighted
        elif record.split == "validation":
            for name, values in record.channels.items():
                if values.loss is not None:
                    validation.setdefault((name, record.set), {})[record.iteration] = values.loss
    return ChannelSeries(
        channels=channels,
        train_loss={k: _sorted(v) for k, v in train.items()},
        validation_loss={k: _sorted(v) for k, v in validation.items()},
        share={k: _sorted(v) for k, v in share.items()},
        reference_loss=_sorted(reference),
    )


def _event_dir(path: str) -> str:
    """``path`` if it holds event files, else the first directory below it that does."""
    for root, dirs, files in os.walk(path):
        dirs.sort()
        if any(f.startswith("events.out.tfevents") for f in files):
            return root
    raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under {path}")


def parse_tensorboard(path: str, prefix: str = "loss_") -> ChannelSeries:
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
        if prefix + name in tags:
            series.train_loss[name] = points(prefix + name)
        validation_tag = re.compile(re.escape(validation_name(prefix + name)) + r"(-\S+)?")
        for tag in sorted(tags):
            if m := validation_tag.fullmatch(tag):
                series.validation_loss[(name, m.group(1) or "")] = points(tag)
    if LM_LOSS_KEY in tags:
        series.reference_loss = points(LM_LOSS_KEY)
    return series


def load_series(path: str, prefix: str = "loss_") -> ChannelSeries:
    """A jsonl file or a TensorBoard directory."""
    if os.path.isdir(path):
        return parse_tensorboard(path, prefix)
    if os.path.isfile(path):
        return parse_jsonl(path)
    raise FileNotFoundError(f"{path} is neither a jsonl file nor a TensorBoard directory")


def plot(series: ChannelSeries, out_path: str, title: str | None = None) -> None:
    """Write the two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (series.train_loss or series.validation_loss or series.share):
        raise ValueError("nothing to plot: no channel had a loss or a token share")
    fig, (loss_ax, share_ax) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if series.reference_loss:
        xs, ys = zip(*series.reference_loss)
        loss_ax.plot(xs, ys, color="0.6", linewidth=1, label="lm loss (all tokens)")
    for i, name in enumerate(series.channels):
        color = colors[i % len(colors)]
        if series.train_loss.get(name):
            xs, ys = zip(*series.train_loss[name])
            loss_ax.plot(xs, ys, color=color, linewidth=1.6, label=f"{name} train")
        for (channel, suffix), points in sorted(series.validation_loss.items()):
            if channel == name and points:
                xs, ys = zip(*points)
                loss_ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3,
                             label=f"{name} validation{suffix}")
        if series.share.get(name):
            xs, ys = zip(*series.share[name])
            share_ax.plot(xs, ys, color=color, linewidth=1.4, label=name)
    loss_ax.set_ylabel("loss per token")
    loss_ax.set_title(title or "per-channel loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(loc="upper right", fontsize=8, ncol=2)
    share_ax.set_ylabel("share of loss tokens")
    share_ax.set_xlabel("iteration")
    share_ax.set_ylim(0, 1)
    share_ax.grid(True, alpha=0.3)
    share_ax.legend(loc="upper right", fontsize=8, ncol=min(4, max(1, len(series.channels))))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the channel logging jsonl, or a TensorBoard directory")
    parser.add_argument("-o", "--output", default="channels.png", help="PNG to write (default channels.png)")
    parser.add_argument("--prefix", default="loss_", help="ChannelConfig.prefix of the run (default loss_)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        series = load_series(args.source, args.prefix)
        plot(series, args.output, args.title or f"per-channel loss: {args.source}")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
