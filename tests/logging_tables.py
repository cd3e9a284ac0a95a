"""The shared table of the channel-logging tests: four iterations of per-channel totals.

One row per iteration: per channel (loss sum, tokens), then all loss tokens ("lm loss"),
and whether Megatron skipped the iteration. Sums are multiples of 1/4: exact in float32.
``reference`` gives the exact (``Fraction``) window values by hand.
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch

from megatron_channel import ChannelConfig

CONFIG = ChannelConfig(["math", "code", "chat"])
NAMES = CONFIG.channels

# One row per iteration: per channel (loss sum, tokens), then all loss tokens ("lm loss"),
# and whether Megatron skipped the iteration. Sums are multiples of 1/4: exact in float32.
ITERATIONS = [
    dict(rows=[(10.0, 4), (3.0, 2), (0.0, 0)], lm=(15.0, 8), skipped=False),
    dict(rows=[(2.0, 2), (0.0, 0), (2.25, 1)], lm=(4.25, 3), skipped=False),
    dict(rows=[(100.0, 1), (100.0, 1), (100.0, 1)], lm=(300.0, 3), skipped=True),
    dict(rows=[(6.0, 2), (0.0, 0), (0.0, 0)], lm=(6.0, 2), skipped=False),
]


def totals_of(it) -> torch.Tensor:
    return torch.tensor([*it["rows"], it["lm"]], dtype=torch.float64)


def reference(iterations):
    """Exact (Fraction) window values from the table: loss and share per channel, None when empty."""
    kept = [it for it in iterations if not it["skipped"]]
    total = sum(Fraction(it["lm"][1]) for it in kept)
    out = {}
    for i, name in enumerate(NAMES):
        s = sum(Fraction(it["rows"][i][0]) for it in kept)
        n = sum(Fraction(it["rows"][i][1]) for it in kept)
        out[name] = dict(loss=s / n if n else None, tokens=n, share=n / total if total else None)
    return out


def no_nan(text: str) -> bool:
    """No printed value is NaN or inf (Megatron's own "number of nan iterations" label is fine)."""
    return re.search(r":\s*[-+]?(nan|inf)", text, re.IGNORECASE) is None
