"""``MixtureController``: the per-channel signal over time and the weights a policy decides from it.

Loop-independent: it takes the exact global channel totals the logging already reduces (train:
per iteration; validation: per evaluation) and returns weights at each decision. Its state is a
plain dict (``state_dict``), saved beside each checkpoint so a resumed run decides the same.
"""

from __future__ import annotations

import numpy as np

from .policies import LEARNING_PROGRESS, SCHEDULE, TARGET_LOSS, learning_progress, target_loss
from .settings import MixtureSettings


class MixtureController:
    """Signals in, weights out (channel order).

    Args:
        settings: the mixture settings.
        initial_weights: ``[K]`` the blend's weights per channel.
    """

    def __init__(self, settings: MixtureSettings, initial_weights):
        self.settings = settings
        self.weights = np.asarray(initial_weights, dtype=np.float64) / np.sum(initial_weights)
        k = self.weights.size
        self.tokens_seen = np.zeros(k)  # cumulative train tokens per channel
        self.window = np.zeros((k, 2))  # train [loss sum, tokens] since the last decision
        self.validation: list[float | None] | None = None  # the newest validation losses, unused yet
        self.history: list[list[tuple[float, float]]] = [[] for _ in range(k)]

    def add_train_totals(self, totals) -> None:
        """One iteration's global ``[K + 1 (+ K + 1), 2]`` totals (channel rows first)."""
        rows = np.asarray(totals, dtype=np.float64)[: self.weights.size]
        self.window += rows
        self.tokens_seen += rows[:, 1]

    def add_validation(self, losses: list[float | None]) -> None:
        """One evaluation's per-channel losses (None where a channel had no tokens)."""
        self.validation = list(losses)

    def signal(self) -> list[float | None]:
        """The loss per channel this decision uses (None: no value this interval)."""
        if self.settings.signal == "validation":
            return list(self.validation) if self.validation is not None else [None] * self.weights.size
        return [s / t if t > 0 else None for s, t in self.window]

    def decide(self) -> tuple[np.ndarray, dict] | None:
        """The new weights and what they came from (``{"loss": [K], "score": [K]}``, the score being
        the policy's: loss decrease per token, or excess over the target); None when the signal has
        nothing new."""
        settings, losses = self.settings, self.signal()
        self.window[:] = 0
        if settings.signal == "validation":
            self.validation = None
        if all(loss is None for loss in losses):
            return None
        if settings.policy == LEARNING_PROGRESS:
            for history, tokens, loss in zip(self.history, self.tokens_seen, losses):
                if loss is not None:
                    history.append((float(tokens), float(loss)))
                    del history[: -settings.history]
            weights, progress = learning_progress(self.history, self.weights, min_share=settings.min_share,
                                                  step=settings.step)
            if not progress.any():  # no channel has two points yet, or none learns: keep the weights
                return None
            detail = {"loss": losses, "score": progress.tolist()}  # loss decrease per token
        elif settings.policy == TARGET_LOSS:
            weights, excess = target_loss(losses, settings.targets, self.weights, eta=settings.eta,
                                          min_share=settings.min_share)
            detail = {"loss": losses, "score": excess.tolist()}  # excess over the target
        else:
            raise ValueError(f"{SCHEDULE} has no feedback; its rows are given up front")
        self.weights = weights
        return weights, detail

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "tokens_seen": self.tokens_seen.tolist(),
                "window": self.window.tolist(), "validation": self.validation,
                "history": [[list(p) for p in h] for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.tokens_seen = np.asarray(state["tokens_seen"], dtype=np.float64)
        self.window = np.asarray(state["window"], dtype=np.float64).reshape(-1, 2)
        self.validation = state["validation"]
        self.history = [[tuple(p) for p in h] for h in state["history"]]
