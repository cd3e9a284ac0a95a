"""Every name a channel value is shown or written under (console, TensorBoard, W&B, jsonl tags).

The channel keys come from ``ChannelConfig``'s templates (``metric_keys``, ``accuracy_keys``),
which are checked never to start with ``tokens_`` nor to hold whitespace; every other name
holds a space or the ``tokens_`` prefix, so nothing collides, nor with Megatron's own names
(``lm loss``, ``lm loss validation``):

* ``loss_math``: the channel's token-weighted loss over the window; with
  ``... vs samples`` beside it on TensorBoard, as Megatron does for ``lm loss``. The key is
  ``ChannelConfig.loss_name`` (``--channel-loss-name``, default ``loss_{channel}``).
* ``token_acc_math`` / ``token acc`` (with token accuracy on): the share of the channel's /
  all loss tokens whose label is an argmax of the logits; ``ChannelConfig.accuracy_name``
  (``--channel-accuracy-name``, default ``token_acc_{channel}``).
* ``tokens_math`` / ``tokens_math cumulative``: its loss tokens in the window / since start.
* ``token share math`` / ``token share math cumulative``: ``tokens_math / loss tokens``.
* ``loss tokens`` / ``loss tokens cumulative``: all loss tokens, untracked included.
* ``<name> validation<suffix>``: the validation value of any of the above, ``<suffix>`` being
  Megatron's (``-name`` or ``-i`` with several validation sets, else empty).
"""

LM_LOSS_KEY = "lm loss"  # Megatron's metric key of the all-token loss
TOKEN_ACC_KEY = "token acc"  # the all-token accuracy, beside it (with token accuracy on)
TOKENS_PREFIX = "tokens_"
ALL_TOKENS_NAME = "loss tokens"
CUMULATIVE = " cumulative"
VALIDATION = " validation"
VS_SAMPLES = " vs samples"


def tokens_name(channel: str) -> str:
    return f"{TOKENS_PREFIX}{channel}"


def share_name(channel: str) -> str:
    return f"token share {channel}"


def validation_name(name: str, set_suffix: str = "") -> str:
    """``loss_math`` -> ``loss_math validation`` (``set_suffix`` e.g. ``-chat`` for one of several sets)."""
    return f"{name}{VALIDATION}{set_suffix}"


def flag_of(key: str) -> str:
    """``'channel_field'`` -> ``"--channel-field (YAML: channel_field)"``: a setting as errors name it."""
    return f"--{key.replace('_', '-')} (YAML: {key})"
