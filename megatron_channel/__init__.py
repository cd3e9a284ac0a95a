"""Per-channel (per data source) loss curves for Megatron-Core training."""

from .batch import BatchLayout
from .config import ChannelConfig
from .forward_step import make_forward_step
from .loss import channel_loss_func
from .reduce import reduce_channel_metrics
from .validate import ChannelBatchError

__all__ = [
    "BatchLayout",
    "ChannelBatchError",
    "ChannelConfig",
    "channel_loss_func",
    "make_forward_step",
    "reduce_channel_metrics",
]
