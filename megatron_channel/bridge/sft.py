"""Packed SFT rows with channels for Bridge's loop: ``ChannelSFTDatasetConfig``, a dataset provider.

Bridge's own SFT packing keeps no per-conversation source, so the rows come from this package's
jsonl SFT dataset (``data/sft.py``: one channel per conversation, named in a jsonl field or by the
line's blend component), built by Megatron's ``BlendedMegatronDatasetBuilder`` and handed to
Bridge in Bridge's packed form: ``cu_seqlens_q`` (the real boundaries) and ``max_seqlen_q`` per
row, with ``channels`` per sequence. Bridge reads packed rows one per microbatch
(``train.micro_batch_size=1``); its packed path under context parallelism needs Transformer Engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
from torch.utils.data import Dataset

from ..data.sft import sft_dataset_class
from ..data.tagged import blend_component_paths, component_channel_ids, tag_datasets
from ..settings import ChannelSettings

SFT_TOKENIZER_LIBRARY = "sft"


def bridge_packed_row(row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed row of ``data/sft.py`` (``cu_seqlens`` padded with the row length) in Bridge's form.

    Returns ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ``[P]``, ``cu_seqlens_q``
    ``[N + 1]`` int32 (the row's N sequences), ``max_seqlen_q`` 0-d int32 and ``channels`` ``[N]``.
    """
    length = row["tokens"].numel()
    cu = row["cu_seqlens"]
    sequences = int((cu < length).sum())  # 0 and every inner boundary; the row end follows
    return {
        "tokens": row["tokens"], "labels": row["labels"], "loss_mask": row["loss_mask"],
        "position_ids": row["position_ids"], "cu_seqlens_q": cu[: sequences + 1].clone(),
        "max_seqlen_q": row["max_seqlen"], "channels": row["channels"][:sequences].clone(),
    }


class BridgePackedRows(Dataset):
    """A dataset of ``data/sft.py`` rows, read in Bridge's packed form (``bridge_packed_row``)."""

    def __init__(self, rows: Dataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return bridge_packed_row(self.rows[idx])


@dataclass(kw_only=True)
class ChannelSFTDatasetConfig(DatasetProvider):
    """Packed SFT rows from jsonl files, with one channel per conversation, for Bridge's ``cfg.dataset``.

    Attributes:
        data_path: the blend, as Megatron's ``--data-path`` (``[weight, path, ...]`` or paths).
        seq_length: tokens per packed row (the model's ``seq_length``).
        tokenizer_model: the Hugging Face tokenizer directory of Megatron's ``SFTTokenizer``.
        prompt_format: ``SFTTokenizer``'s prompt format.
        split: train / validation / test shares of each file's lines, as Megatron's ``--split``.
        random_seed: the blend's sampling seed.
        path_to_cache: where Megatron caches the blend indices (None: no cache).
        channel_settings: the channel settings (``channel_settings_for_bridge``); set before
            ``pretrain()`` (not a YAML field).
    """

    data_path: list[str]
    seq_length: int
    tokenizer_model: str
    prompt_format: str = "nemotron-h-aligned"
    split: str = "90,10,0"
    random_seed: int = 1234
    path_to_cache: str | None = None
    dataloader_type: str | None = "single"
    channel_settings: Any = field(default=None, repr=False)

    def build_datasets(self, context: DatasetBuildContext) -> tuple[Any, Any, Any]:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.datasets.utils import get_blend_from_list
        from megatron.core.tokenizers import MegatronTokenizer

        settings = self.channel_settings
        if not isinstance(settings, ChannelSettings):
            raise ValueError("ChannelSFTDatasetConfig.channel_settings is not set: give it the ChannelSettings of "
                             "the run (channel_settings_for_bridge) before pretrain()")
        tokenizer = MegatronTokenizer.from_pretrained(
            tokenizer_path=self.tokenizer_model, metadata_path={"library": SFT_TOKENIZER_LIBRARY},
            prompt_format=self.prompt_format)
        cp_size = context.pg_collection.cp.size() if context.pg_collection is not None else 1
        config = GPTDatasetConfig(
            random_seed=self.random_seed, sequence_length=self.seq_length,
            blend=get_blend_from_list([str(p) for p in self.data_path]), split=self.split, tokenizer=tokenizer,
            path_to_cache=self.path_to_cache, reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False, context_parallel_size=cp_size)
        datasets = BlendedMegatronDatasetBuilder(
            sft_dataset_class(settings.channel_id, channel_field=settings.field),
            [context.train_samples, context.valid_samples, context.test_samples],
            lambda: True,  # Bridge reads data on every rank
            config,
        ).build()
        component_ids = component_channel_ids(blend_component_paths(config),
                                              settings.blend_channel_ids if settings.from_blend else None)
        tagged = tag_datasets(datasets, component_ids, channel_id=settings.channel_id)
        return tuple(None if d is None else BridgePackedRows(d) for d in tagged)
