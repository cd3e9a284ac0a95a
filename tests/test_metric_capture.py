"""``metric_capture``: channel keys taken out of ``loss_func``'s metrics, with no host sync."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from logging_tables import CONFIG
from megatron_channel import ChannelMetricsError, channel_loss_func
from megatron_channel.channel_logging.metric_capture import capturing_loss_func, split_channel_metrics
from megatron_channel.segment_math import summing_like_a_gpu


@pytest.mark.timeout(30)
def test_split_channel_metrics_rejects_mismatched_configs():
    metrics = {"lm loss": torch.tensor([3.0, 2.0]), **{k: torch.tensor([1.0, 1.0]) for k in CONFIG.metric_keys()}}
    rows, rest = split_channel_metrics(metrics, CONFIG)
    assert rows.shape == (4, 2) and list(rest) == ["lm loss"]
    with pytest.raises(ChannelMetricsError, match=r"lack \['loss_chat'\].*make_forward_step\(config\)"):
        split_channel_metrics({k: v for k, v in metrics.items() if k != "loss_chat"}, CONFIG)
    with pytest.raises(ChannelMetricsError, match=r"lack \['loss_math', 'loss_code', 'loss_chat'\]"):
        split_channel_metrics({"lm loss": torch.tensor([3.0, 2.0])}, CONFIG)
    with pytest.raises(ChannelMetricsError, match=r"\['loss_web'\] that the logging config does not name"):
        split_channel_metrics({**metrics, "loss_web": torch.tensor([1.0, 1.0])}, CONFIG)


@pytest.mark.timeout(30)
def test_capture_adds_no_host_sync_or_collective_to_loss_func():
    """The captured loss_func only stacks tensors: no value read, no collective, per microbatch
    (CPU tensors summed the way GPU tensors are, since numpy reads CPU values by design)."""
    losses, mask, channels = torch.rand(2, 6), torch.ones(2, 6), torch.tensor([0, 2])
    captured = []
    loss_func = capturing_loss_func(
        partial(channel_loss_func, loss_mask=mask, channels=channels, config=CONFIG, validate=False), CONFIG, captured
    )
    forbidden = [(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")]
    forbidden += [(torch.distributed, n) for n in ("all_reduce", "all_gather", "broadcast", "barrier")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in forbidden]

    def fail(*args, **kwargs):
        raise AssertionError("host sync or collective in the loss path")

    try:
        for owner, name, _ in saved:
            setattr(owner, name, fail)
        with summing_like_a_gpu():
            loss, num_tokens, metrics = loss_func(losses)
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    assert list(metrics) == ["lm loss"] and len(captured) == 1 and captured[0].shape == (4, 2)
    assert captured[0][3].tolist() == [float(loss), 12.0]
