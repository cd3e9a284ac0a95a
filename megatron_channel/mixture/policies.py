"""Mixture policies: pure functions from per-channel signals to blend weights (numpy, float64).

* ``learning_progress``: each channel weighted by how fast its loss falls per token it gets:
  the slope of a least-squares line through its recent ``(tokens seen, loss)`` points
  (ADO's "predicted loss decrease per token", without the power-law fit). A channel that learns
  nothing (noise) has slope ~0 and sinks to the floor, whatever its loss level.
* ``target_loss``: DoReMi's multiplicative-weights step on the excess over a target loss,
  ``w <- w * exp(eta * max(L - target, 0))`` (Sheared-LLaMA's dynamic batch loading): channels
  above their target get more, channels at or below it keep their share relative to others.
* ``with_floor`` then gives every channel at least ``min_share``; ``smooth`` moves only part
  of the way from the current weights to the policy's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEARNING_PROGRESS = "learning-progress"
TARGET_LOSS = "target-loss"
SCHEDULE = "schedule"
POLICIES = (LEARNING_PROGRESS, TARGET_LOSS, SCHEDULE)
FEEDBACK_POLICIES = (LEARNING_PROGRESS, TARGET_LOSS)


def with_floor(weights: np.ndarray, min_share: float) -> np.ndarray:
    """``min_share + (1 - K min_share) * weights / sum``: every channel keeps at least ``min_share``."""
    weights = np.asarray(weights, dtype=np.float64)
    k = weights.size
    if min_share * k > 1:
        raise ValueError(f"min_share {min_share} x {k} channels > 1")
    total = weights.sum()
    shares = weights / total if total > 0 else np.full(k, 1.0 / k)
    return min_share + (1.0 - k * min_share) * shares


def smooth(current: np.ndarray, proposed: np.ndarray, step: float) -> np.ndarray:
    """``(1 - step) * current + step * proposed``, renormalised."""
    mixed = (1.0 - step) * np.asarray(current, dtype=np.float64) + step * np.asarray(proposed, dtype=np.float64)
    return mixed / mixed.sum()


def loss_slope_per_token(tokens: Sequence[float], losses: Sequence[float]) -> float:
    """Least-squares slope of loss against cumulative tokens (``d loss / d token``); 0 with < 2 points."""
    x, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return 0.0
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def learning_progress(histories: Sequence[Sequence[tuple[float, float]]], current: np.ndarray, *,
                      min_share: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights from each channel's recent ``(cumulative tokens, loss)`` points.

    Returns ``(weights, progress)``: ``progress[i] = max(-slope_i, 0)``, the loss decrease per
    token; the weights move ``step`` of the way from ``current`` to ``progress`` normalised (the
    current weights where no channel progresses), then get the floor.
    """
    progress = np.array([max(-loss_slope_per_token([t for t, _ in h], [l for _, l in h]), 0.0)
                         for h in histories])
    proposed = progress / progress.sum() if progress.sum() > 0 else np.asarray(current, dtype=np.float64)
    return with_floor(smooth(current, proposed, step), min_share), progress


def target_loss(losses: Sequence[float | None], targets: Sequence[float | None], current: np.ndarray, *,
                eta: float, min_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights after one multiplicative step on ``max(loss - target, 0)``.

    Returns ``(weights, excess)``; a channel without a target or without a loss this interval
    has excess 0.
    """
    excess = np.array([max(l - t, 0.0) if l is not None and t is not None else 0.0
                       for l, t in zip(losses, targets)])
    logits = np.log(np.maximum(np.asarray(current, dtype=np.float64), 1e-12)) + eta * excess
    proposed = np.exp(logits - logits.max())
    return with_floor(proposed / proposed.sum(), min_share), excess
