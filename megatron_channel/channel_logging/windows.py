"""Exact per-channel token-weighted accounting over windows of training iterations.

Pure bookkeeping, independent of Megatron's loop: one iteration's global totals are a
``[K + 1, 2]`` table (rows: channels in config order, then ``"lm loss"``; columns: summed
per-token loss, loss tokens). With token accuracy on, ``K + 1`` more rows follow in the same
order: (correct tokens, loss tokens) per channel, then ``"token acc"``. A window sums the
tables of its iterations in float64; its loss for a channel is ``sum of its losses / sum of
its tokens``, its accuracy ``correct / tokens``: exact, token-weighted over the iterations
where the channel had tokens, never 0 / 0 (a channel without tokens in a window has no loss
or accuracy value at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ChannelConfig


@dataclass(frozen=True)
class ChannelStats:
    """Python-number totals of one window.

    Attributes:
        names: channel names, config order.
        loss_sums: per channel, the sum of per-token losses over the window.
        tokens: per channel, the number of loss tokens over the window.
        total_tokens: all loss tokens over the window (``lm loss``'s count, untracked included).
        total_loss_sum: all losses over the window (``lm loss``'s sum).
        iterations: iterations added to the window.
        correct: per channel, the loss tokens whose label was an argmax (None: accuracy off).
        total_correct: all such tokens (``token acc``'s count; None: accuracy off).
    """

    names: tuple[str, ...]
    loss_sums: tuple[float, ...]
    tokens: tuple[float, ...]
    total_tokens: float
    total_loss_sum: float
    iterations: int = 0
    correct: tuple[float, ...] | None = None
    total_correct: float | None = None

    @classmethod
    def from_totals(cls, names: Sequence[str], totals: Tensor | Sequence[Sequence[float]], iterations: int = 0):
        """From a totals table: ``[K + 1, 2]``, or ``[2 (K + 1), 2]`` with the accuracy rows."""
        rows = totals.tolist() if isinstance(totals, Tensor) else [list(r) for r in totals]
        k = len(names)
        if len(rows) not in (k + 1, 2 * (k + 1)) or any(len(r) != 2 for r in rows):
            raise ValueError(
                f"totals must be [{k + 1}, 2] (channels then lm loss) or [{2 * (k + 1)}, 2] (then the accuracy "
                f"rows), got {len(rows)} rows"
            )
        accuracy = rows[k + 1 :]
        return cls(
            names=tuple(names),
            loss_sums=tuple(float(r[0]) for r in rows[:k]),
            tokens=tuple(float(r[1]) for r in rows[:k]),
            total_tokens=float(rows[k][1]),
            total_loss_sum=float(rows[k][0]),
            iterations=iterations,
            correct=tuple(float(r[0]) for r in accuracy[:k]) if accuracy else None,
            total_correct=float(accuracy[k][0]) if accuracy else None,
        )

    def accuracy(self, i: int) -> float | None:
        """Channel ``i``'s share of loss tokens predicted right; None when no tokens or accuracy off."""
        return self.correct[i] / self.tokens[i] if self.correct is not None and self.tokens[i] > 0 else None

    def token_acc(self) -> float | None:
        """All loss tokens' accuracy; None when there were none or accuracy is off."""
        ok = self.total_correct is not None and self.total_tokens > 0
        return self.total_correct / self.total_tokens if ok else None

    def loss(self, i: int) -> float | None:
        """Token-weighted mean loss of channel ``i``; None when it had no tokens."""
        return self.loss_sums[i] / self.tokens[i] if self.tokens[i] > 0 else None

    def share(self, i: int) -> float | None:
        """Channel ``i``'s fraction of all loss tokens; None when there were none."""
        return self.tokens[i] / self.total_tokens if self.total_tokens > 0 else None

    def lm_loss(self) -> float | None:
        """Token-weighted mean of all loss tokens; None when there were none."""
        return self.total_loss_sum / self.total_tokens if self.total_tokens > 0 else None


class TotalsWindow:
    """Sum of per-iteration ``[K + 1, 2]`` totals over a window of iterations.

    The sum stays a float64 tensor on the totals' device, so adding an iteration never
    makes the host wait for the GPU; only ``take`` reads it.
    """

    def __init__(self, names: Sequence[str], token_accuracy: bool = False):
        self.names = tuple(names)
        self.rows = (len(self.names) + 1) * (2 if token_accuracy else 1)
        self._sum: Tensor | None = None
        self.iterations = 0

    def add(self, totals: Tensor) -> None:
        totals = totals.detach().to(torch.float64)
        if totals.shape != (self.rows, 2):
            raise ValueError(f"totals must be [{self.rows}, 2], got {list(totals.shape)}")
        self._sum = totals.clone() if self._sum is None else self._sum + totals
        self.iterations += 1

    def take(self, reset: bool = True) -> ChannelStats | None:
        """The window's stats (None if no iteration was added); empties it when ``reset``."""
        if self.iterations == 0:
            return None
        stats = ChannelStats.from_totals(self.names, self._sum.cpu(), self.iterations)
        if reset:
            self._sum, self.iterations = None, 0
        return stats


@dataclass(frozen=True)
class ChannelReport:
    """What one log point shows: the window since the previous point and the run so far."""

    window: ChannelStats
    cumulative: ChannelStats


class ChannelAccountant:
    """Per-channel accounting of a training run, independent of Megatron's loop.

    Feed it the global totals of every non-skipped iteration with ``add_iteration``; read the
    console interval with ``console_report`` and the TensorBoard interval with
    ``tensorboard_report``. The two windows are independent; the cumulative one never resets.
    """

    def __init__(self, config: ChannelConfig):
        self.config = config
        names, accuracy = config.channels, config.token_accuracy
        self._console = TotalsWindow(names, accuracy)
        self._tensorboard = TotalsWindow(names, accuracy)
        self._cumulative = TotalsWindow(names, accuracy)

    def add_iteration(self, totals: Tensor) -> None:
        """``totals``: the global table of one iteration (module docstring)."""
        for window in (self._console, self._tensorboard, self._cumulative):
            window.add(totals)

    def _report(self, window: TotalsWindow, reset: bool) -> ChannelReport | None:
        stats = window.take(reset)
        if stats is None:
            return None
        return ChannelReport(window=stats, cumulative=self._cumulative.take(reset=False))

    def console_report(self, reset: bool = True) -> ChannelReport | None:
        return self._report(self._console, reset)

    def tensorboard_report(self, reset: bool = True) -> ChannelReport | None:
        return self._report(self._tensorboard, reset)
