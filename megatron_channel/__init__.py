"""Per-channel (per data source) loss curves for Megatron-Core training.

The public API is what this module exports; the subpackages are where it lives:

* ``config`` / ``settings``: the channels (``ChannelConfig``) and how flags and YAML give them.
* ``segment_math``: pure tensor math (packed-sequence sums, context-parallel cuts).
* ``step``: the forward step: batch contract, checks, model inputs, ``loss_func``.
* ``data``: datasets whose samples carry ``channels`` (blends, packed SFT jsonl).
* ``channel_logging``: the wrappers around Megatron's training loop that log the channels.
* ``launch``: ``scripts/pretrain_gpt_channel.py``, Megatron's pretrain_gpt with channels.
* ``cpu``: what ``--cpu`` installs to run the same ``pretrain()`` on a CPU over gloo.
* ``megatron_internals``: the one home of what the package assumes about Megatron (the
  supported releases as a table, the loop's internals) and of every patch it makes.

``docs/architecture.md`` follows one batch through them.
"""

from .channel_logging.install import install_channel_logging, uninstall_channel_logging
from .channel_logging.metric_capture import ChannelMetricsError, reduce_channel_metrics
from .channel_logging.wrappers import ChannelLoggingWarning
from .config import ChannelConfig
from .data.channel_ids import UntrackedChannelError
from .data.sft import sft_dataset_class
from .data.tagged import ChannelTaggedDataset, tag_datasets
from .megatron_internals.releases import MegatronInternalsError, UntestedMegatronWarning
from .settings import ChannelSettings, add_channel_args, channel_settings_from_args
from .step.checks import ChannelBatchError
from .step.forward_step import make_forward_step
from .step.layout import BatchLayout
from .step.loss import channel_loss_func


__all__ = [
    "BatchLayout",
    "ChannelBatchError",
    "ChannelConfig",
    "ChannelLoggingWarning",
    "ChannelMetricsError",
    "ChannelSettings",
    "ChannelTaggedDataset",
    "MegatronInternalsError",
    "UntestedMegatronWarning",
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
