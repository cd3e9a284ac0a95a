"""Per-channel (per data source) loss curves for Megatron-Core training."""

from .arguments import ChannelSettings, UntrackedChannelError, add_channel_args, channel_settings_from_args
from .batch import BatchLayout
from .channel_logging import install_channel_logging, uninstall_channel_logging
from .config import ChannelConfig
from .datasets import ChannelTaggedDataset, tag_datasets
from .forward_step import make_forward_step
from .loss import channel_loss_func
from .reduce import reduce_channel_metrics
from .sft import sft_dataset_class
from .validate import ChannelBatchError

__all__ = [
    "BatchLayout",
    "ChannelBatchError",
    "ChannelConfig",
    "ChannelSettings",
    "ChannelTaggedDataset",
    "UntrackedChannelError",
    "add_channel_args",
    "channel_loss_func",
    "channel_settings_from_args",
    "install_channel_logging",
    "make_forward_step",
    "reduce_channel_metrics",
    "sft_dataset_class",
    "tag_datasets",
    "uninstall_channel_logging",
]
