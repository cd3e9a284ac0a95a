"""Per-channel loss for Megatron-Bridge's training loop (``megatron.bridge.training.pretrain`` /
``finetune``), through Bridge's public forward-step and callback interfaces.

Two lines in a Bridge script::

    forward_step = ChannelForwardStep(settings)          # Bridge's gpt_step.forward_step, observed
    pretrain(cfg, forward_step, callbacks=[ChannelCallback(forward_step)])

``ChannelForwardStep`` runs Bridge's own forward step unchanged and, beside Bridge's loss,
computes one ``[sum, count]`` row per channel (``channel_loss_func``) from the same per-token
losses; Bridge's metrics stay exactly ``{"lm loss": ...}``, so ``lm loss`` and the gradients are
stock. ``ChannelCallback`` reduces those rows once per iteration and per evaluation and writes
them through Bridge's own loggers, the console line and the channel jsonl.

Importing this module imports Megatron-Bridge; nothing else in ``megatron_channel`` does.
"""

from .callback import ChannelCallback
from .forward_step import ChannelForwardStep
from .internals import BridgeInternalsError, check_bridge_internals
from .settings import channel_settings_for_bridge

__all__ = ["BridgeInternalsError", "ChannelCallback", "ChannelForwardStep", "channel_settings_for_bridge",
           "check_bridge_internals"]
