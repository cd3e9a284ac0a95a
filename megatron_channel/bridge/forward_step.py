"""``ChannelForwardStep``: Bridge's own forward step, with per-channel rows computed beside its loss."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..channel_logging.metric_capture import split_channel_metrics
from ..config import ChannelConfig
from ..data.tagged import blend_component_paths, component_channel_ids
from ..settings import ChannelSettings
from ..step.checks import ChannelBatchError, check_channel_ids
from ..step.loss import channel_loss_func
from ..step.token_accuracy import CorrectTokens, correct_tokens_from_output_layer
from .internals import check_bridge_internals, loss_mask_of

SPLITS = ("train", "validation", "test")  # BlendedMegatronDatasetConfig.blend_per_split order


def blend_tables(settings: ChannelSettings, dataset_config) -> dict[str, Tensor | None]:
    """Per split, the channel id of each blend component (``[components]`` int64; indexed by the
    ``dataset_id`` of Megatron's ``BlendedDataset`` samples), or None where the split has no blend
    or the channels do not come from it. Errors name the component and the flag."""
    if settings.from_blend is None:
        return dict.fromkeys(SPLITS)
    ids = component_channel_ids(blend_component_paths(dataset_config), settings.blend_channel_ids)
    if all(split_ids is None for split_ids in ids):
        raise ValueError(
            "channels_from_blend is set, but Bridge's dataset config has no blend (cfg.dataset.blend or "
            "blend_per_split, made from data_path): give data_path, or name channels in a 'channels' batch field"
        )
    return {split: None if split_ids is None else torch.tensor(split_ids, dtype=torch.long)
            for split, split_ids in zip(SPLITS, ids)}


class _RecordingIterator:
    """The data iterator, keeping the last raw batch (before Bridge drops the keys it does not know)."""

    def __init__(self, inner):
        self.inner, self.batch = inner, None

    def __iter__(self):
        return self

    def __next__(self):
        self.batch = next(self.inner)
        return self.batch


class ChannelForwardStep:
    """A Bridge forward step (``gpt_step.forward_step`` unless ``inner`` is given) that also reports
    per-channel loss, without changing anything Bridge computes.

    Per microbatch on the last pipeline stage, the loss function Bridge returns is wrapped: it runs
    Bridge's loss (its NaN and spike checks included) and returns exactly its result, and beside it
    ``channel_loss_func`` turns the same per-token losses and loss mask into one ``[sum, count]``
    row per channel (then ``lm loss``; with token accuracy, the accuracy rows), appended to
    ``captured`` on the device, for ``ChannelCallback``. No host sync, no collective.

    A sample's channel comes from its raw batch, before Bridge drops unknown keys: a ``channels``
    field (``[b]`` per row, or per packed sequence), else the ``dataset_id`` of a blend through
    ``settings.from_blend`` (``--channels-from-blend``), else, for a split built from one dataset,
    that dataset's channel.

    Args:
        settings: the channel settings (``channel_settings_for_bridge`` or ``ChannelSettings(...)``).
        inner: the Bridge forward step to observe; its loss function must be Bridge's
            ``masked_next_token_loss`` partial (others are refused by name).
    """

    def __init__(self, settings: ChannelSettings, inner=None):
        if not isinstance(settings, ChannelSettings):
            raise TypeError(f"ChannelForwardStep takes ChannelSettings, got {type(settings).__name__}")
        check_bridge_internals()
        if inner is None:
            from megatron.bridge.training.gpt_step import forward_step as inner
        self.settings = settings
        self.config: ChannelConfig = settings.channel_config()
        self.inner = inner
        self.captured: list[Tensor] = []
        self.split: str | None = None  # set by ChannelCallback; else train / validation from the model
        self.tables: dict[str, Tensor | None] | None = None

    def take_captured(self) -> list[Tensor]:
        rows, self.captured = self.captured, []
        return rows

    def prepare(self, cfg) -> None:
        """Map blend components to channels for every split (errors before any collective)."""
        if self.tables is None:
            self.tables = blend_tables(self.settings, cfg.dataset)

    def channels_of(self, batch: dict, split: str) -> Tensor:
        """``[b]`` (or per packed sequence) channel ids of a raw batch, on the CPU when it is."""
        channels = batch.get("channels")
        if channels is not None:
            if isinstance(channels, Tensor) and channels.device.type == "cpu":
                check_channel_ids(channels, self.config.num_channels)  # where the data is: no device sync
            return channels
        table = (self.tables or {}).get(split)
        dataset_id = batch.get("dataset_id")
        if dataset_id is not None:
            if table is None:
                raise ChannelBatchError(
                    f"the {split} batch comes from a blend ('dataset_id') but the channels do not: set "
                    "channels_from_blend (--channels-from-blend), or give samples a 'channels' field"
                )
            return table[dataset_id.long()]
        if table is not None and table.numel() == 1:  # a one-dataset split: no BlendedDataset, no dataset_id
            rows = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
            return table.expand(rows)
        raise ChannelBatchError(
            f"the {split} batch has neither 'channels' nor 'dataset_id' (keys: {sorted(batch)}); give samples "
            "a 'channels' field, or train on a blend with channels_from_blend (--channels-from-blend)"
        )

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        if self.tables is None:
            self.prepare(state.cfg)
        recording = None if data_iterator is None else _RecordingIterator(data_iterator)
        inputs: dict = {}
        correct = CorrectTokens() if self.config.token_accuracy and _has_output_layer(model) else None

        def keep_model_inputs(module, args, kwargs):
            # Bridge hands the model its labels and packed-sequence metadata as keywords.
            inputs["packed_seq_params"] = kwargs.get("packed_seq_params")
            if correct is not None:
                correct.labels = kwargs.get("labels")

        hook = model.register_forward_pre_hook(keep_model_inputs, with_kwargs=True)
        flags = contextlib.nullcontext() if correct is None else correct_tokens_from_output_layer(model, correct)
        try:
            with flags:
                output, loss_func = self.inner(state, recording, model, return_schedule_plan)
        finally:
            hook.remove()
        loss_mask = loss_mask_of(loss_func)
        if loss_mask is None or recording is None or recording.batch is None:
            return output, loss_func  # not the last pipeline stage: Bridge never calls this loss
        split = self.split or ("train" if model.training else "validation")
        channels = self.channels_of(recording.batch, split).to(loss_mask.device, non_blocking=True)
        packed_seq_params = inputs.get("packed_seq_params")
        config, captured = self.config, self.captured

        def loss_func_with_channels(output_tensor, *args, **kwargs):
            result = loss_func(output_tensor, *args, **kwargs)
            _, _, metrics = channel_loss_func(output_tensor, loss_mask=loss_mask, channels=channels, config=config,
                                              packed_seq_params=packed_seq_params, validate=False,
                                              correct_tokens=correct)
            captured.append(split_channel_metrics(metrics, config)[0])
            return result

        return output, loss_func_with_channels


def _has_output_layer(model) -> bool:
    """Whether this pipeline stage computes the logits (only the last one has an output layer)."""
    from megatron.core.utils import get_attr_wrapped_model

    try:
        return get_attr_wrapped_model(model, "output_layer", allow_none=True) is not None
    except RuntimeError:
        return False
