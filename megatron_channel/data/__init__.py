"""The data side: datasets whose samples carry ``channels``, built where Megatron builds its own.

``tagged``: ``ChannelTaggedDataset`` maps the blend component of Megatron's
``BlendedDataset`` samples to channel ids. ``sft``: packed SFT rows from jsonl, one channel
per conversation.
"""
