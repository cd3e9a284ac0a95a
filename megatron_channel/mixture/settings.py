"""The mixture flags and their checks at start-up (every mistake names the flag)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml

from ..names import flag_of
from .policies import FEEDBACK_POLICIES, POLICIES, SCHEDULE

SIGNALS = ("train", "validation")
# Defaults measured by scripts/bench_mixture.py (docs/mixture.md): a floor of 0.15 kept the gain
# on the unlearnable-heavy blend and halved the damage to the starved channels against 0.05; the
# validation signal was the one that did not hurt the balanced demo blend.
DEFAULT_MIN_SHARE = 0.15
DEFAULT_SIGNAL = "validation"


def default_min_share(num_channels: int) -> float:
    """``DEFAULT_MIN_SHARE``, or half a uniform share when that is smaller (many channels)."""
    return min(DEFAULT_MIN_SHARE, 0.5 / num_channels)


@dataclasses.dataclass(frozen=True)
class MixtureSettings:
    """What ``--channel-mixture`` / ``--channel-mixture-advice`` ask for.

    Attributes:
        policy: ``learning-progress``, ``target-loss`` or ``schedule``.
        apply: True: the blend's sampling weights follow the policy; False (advice): the
            weights are computed and logged, and sampling is the stock blend's.
        interval: iterations between two decisions of a feedback policy.
        min_share: every channel's weight is at least this.
        signal: ``train`` (each channel's training loss over the interval) or ``validation``
            (its latest validation loss).
        targets: per channel, the target loss of ``target-loss`` (None: no target).
        schedule: ``schedule``'s rows, ``(from_iteration, weights per channel)``, in order.
        lag: iterations between a decision and the first batch it changes (fixed, so batches
            never depend on how far the data loader reads ahead).
        step: how far each decision moves the weights toward the policy's proposal (learning-progress).
        eta: the multiplicative step of ``target-loss``.
        history: how many recent points per channel the learning-progress slope is fitted to.
    """

    policy: str
    apply: bool
    interval: int = 20
    min_share: float = DEFAULT_MIN_SHARE
    signal: str = DEFAULT_SIGNAL
    targets: tuple[float | None, ...] = ()
    schedule: tuple[tuple[int, tuple[float, ...]], ...] = ()
    lag: int = 2
    step: float = 0.5
    eta: float = 1.0
    history: int = 4


def add_mixture_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="channel mixture")
    group.add_argument("--channel-mixture", choices=POLICIES, default=None,
                       help="the blend's sampling weights follow this policy during training")
    group.add_argument("--channel-mixture-advice", choices=FEEDBACK_POLICIES, default=None,
                       help="compute and log the weights this policy would use; sampling stays the blend's")
    group.add_argument("--channel-mixture-interval", type=int, default=20, metavar="N",
                       help="iterations between two decisions (default 20)")
    group.add_argument("--channel-mixture-min-share", type=float, default=None, metavar="F",
                       help=f"every channel's weight is at least F (default {DEFAULT_MIN_SHARE}, or half a uniform "
                            "share with more channels)")
    group.add_argument("--channel-mixture-signal", choices=SIGNALS, default=DEFAULT_SIGNAL,
                       help="decide from each channel's latest validation loss (default; needs --eval-iters > 0) "
                            "or its training loss over the interval")
    group.add_argument("--channel-target-loss", nargs="+", default=None, metavar="NAME=LOSS",
                       help="target-loss: the loss each named channel should reach")
    group.add_argument("--channel-mixture-schedule", default=None, metavar="FILE.yaml",
                       help="schedule: rows of {from_iteration: N, weights: {channel: w, ...}}")
    return parser


def mixture_settings_from_args(args, channel_names: tuple[str, ...]) -> MixtureSettings | None:
    """The checked mixture settings, or None when no mixture flag is given."""
    applied, advice = getattr(args, "channel_mixture", None), getattr(args, "channel_mixture_advice", None)
    if applied is None and advice is None:
        for flag in ("channel_target_loss", "channel_mixture_schedule"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --channel-mixture (or --channel-mixture-advice)")
        return None
    if applied is not None and advice is not None:
        raise ValueError("--channel-mixture and --channel-mixture-advice both given; give one")
    policy = applied or advice
    interval = args.channel_mixture_interval
    if interval < 1:
        raise ValueError(f"--channel-mixture-interval {interval}: give a positive number of iterations")
    k = len(channel_names)
    min_share = default_min_share(k) if args.channel_mixture_min_share is None else args.channel_mixture_min_share
    if not 0 <= min_share or min_share * k > 1:
        raise ValueError(f"--channel-mixture-min-share {min_share} x {k} channels = {min_share * k:g} > 1: "
                         f"give at most {1 / k:g}")
    targets: tuple[float | None, ...] = ()
    if policy == "target-loss":
        targets = parse_targets(args.channel_target_loss, channel_names)
    elif args.channel_target_loss is not None:
        raise ValueError(f"--channel-target-loss is for --channel-mixture target-loss, not {policy}")
    schedule: tuple = ()
    if policy == SCHEDULE:
        if args.channel_mixture_schedule is None:
            raise ValueError("--channel-mixture schedule needs --channel-mixture-schedule FILE.yaml")
        schedule = load_schedule(args.channel_mixture_schedule, channel_names)
    elif args.channel_mixture_schedule is not None:
        raise ValueError(f"--channel-mixture-schedule is for --channel-mixture schedule, not {policy}")
    if policy != SCHEDULE and args.channel_mixture_signal == "validation" and not (
            getattr(args, "eval_iters", 0) and getattr(args, "eval_interval", None)):
        raise ValueError("--channel-mixture-signal validation (the default) needs validation: give --eval-interval "
                         "and --eval-iters > 0, or decide from training losses with --channel-mixture-signal train")
    return MixtureSettings(policy=policy, apply=applied is not None, interval=interval, min_share=min_share,
                           signal=args.channel_mixture_signal, targets=targets, schedule=schedule)


def parse_targets(values, channel_names) -> tuple[float | None, ...]:
    if not values:
        raise ValueError("--channel-mixture target-loss needs --channel-target-loss NAME=LOSS ...")
    targets: dict[str, float] = {}
    for value in values:
        name, sep, loss = value.partition("=")
        if not sep:
            raise ValueError(f"--channel-target-loss {value!r}: write NAME=LOSS, e.g. math=1.2")
        if name not in channel_names:
            raise ValueError(f"--channel-target-loss {value!r}: {name!r} is not a channel; channels: "
                             f"{list(channel_names)}")
        try:
            targets[name] = float(loss)
        except ValueError:
            raise ValueError(f"--channel-target-loss {value!r}: {loss!r} is not a number") from None
    return tuple(targets.get(name) for name in channel_names)


def load_schedule(path: str, channel_names) -> tuple[tuple[int, tuple[float, ...]], ...]:
    where = f"--channel-mixture-schedule {path}"
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{where} cannot be read: {e}") from e
    rows: Any = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: give a list of rows, each {{from_iteration: N, weights: {{channel: w}}}}")
    out, last = [], -1
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {"from_iteration", "weights"}:
            raise ValueError(f"{where}: row {i} must have exactly from_iteration and weights, got {row!r}")
        start, weights = row["from_iteration"], row["weights"]
        if not isinstance(start, int) or start <= last:
            raise ValueError(f"{where}: row {i} from_iteration {start!r} must be an integer above the previous row's")
        if not isinstance(weights, dict) or set(weights) != set(channel_names):
            raise ValueError(f"{where}: row {i} must give a weight for each channel {list(channel_names)}, "
                             f"got {list(weights) if isinstance(weights, dict) else weights!r}")
        values = tuple(float(weights[name]) for name in channel_names)
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"{where}: row {i} weights {dict(weights)} sum to {sum(values):g}; they must be "
                             "non-negative and sum to 1")
        out.append((start, values))
        last = start
    return tuple(out)


def check_blend_for_mixture(args, settings, component_paths: list[str] | None) -> list[int]:
    """The channel of each blend component, one component per channel; ``ValueError`` naming the flags."""
    flag = "--channel-mixture" if getattr(args, "channel_mixture", None) else "--channel-mixture-advice"
    if settings.from_blend is None or component_paths is None:
        raise ValueError(f"{flag} steers the blend's components, so it needs a blend whose components are "
                         f"channels: give --data-path W1 P1 W2 P2 ... and {flag_of('channels_from_blend')}")
    if len(component_paths) < 2:
        raise ValueError(f"{flag}: the blend has a single component ({component_paths[0]}); there is nothing to mix")
    ids = settings.blend_channel_ids(component_paths)
    if sorted(ids) != list(range(len(settings.names))):
        raise ValueError(f"{flag} needs one blend component per channel; the blend's components map to channels "
                         f"{ids} of {list(settings.names)}: give each component its own channel name")
    for flag_name, bad, why in (("dataloader_type", lambda v: v not in (None, "single"), "single"),
                                ("rampup_batch_size", lambda v: v is not None, "not set"),
                                ("phase_transition_iterations", lambda v: bool(v), "not set")):
        if bad(getattr(args, flag_name, None)):
            raise ValueError(f"{flag} keys the weights to the global sample index: --{flag_name.replace('_', '-')} "
                             f"must be {why}")
    return ids
