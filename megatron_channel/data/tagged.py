"""Channel ids for the datasets Megatron's ``BlendedMegatronDatasetBuilder`` returns.

A blend ``--data-path 0.3 math_prefix 0.7 code_prefix`` becomes a ``BlendedDataset`` whose
samples carry ``dataset_id``, the index of their blend component. ``ChannelTaggedDataset``
maps that index to a channel id and adds ``channels`` to every sample, so only integers
reach the training loop:

- unpacked samples (GPT rows): ``channels`` is a 0-d int64 tensor; collated, ``[b]``;
- packed samples (``cu_seqlens`` ``[L]``): ``channels`` ``[L - 1]``, one id per sequence,
  ``-1`` on padding slots; collated, ``[b, L - 1]``;
- samples that already carry ``channels`` (``megatron_channel.data.sft`` rows): entries equal to
  ``INHERIT_CHANNEL`` (sequences whose jsonl line names no channel) take the component's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset

# A per-sequence placeholder: "this sequence has no channel of its own; use its component's".
# Below -1, so it can never pass the batch checks if it leaks past ChannelTaggedDataset.
INHERIT_CHANNEL = -2

ChannelIdFn = Callable[[str | None], int]
SPLIT_NAMES = ("train", "valid", "test")


def check_channel_value(value, where: str) -> int:
    """``value`` as a channel id (an int >= -1), or ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"{where} is {value!r}; a channel id must be an int >= 0, or -1 for untracked")
    return value


def components_of(dataset) -> list | None:
    """The component datasets of ``dataset`` in blend order; ``None`` when unknown."""
    if isinstance(dataset, BlendedDataset):
        return list(dataset.datasets)
    if isinstance(dataset, MegatronDataset):
        return [dataset]
    return None


def resolve_component_channels(components: list | None, component_channel_ids: Sequence[int | None],
                               channel_id: ChannelIdFn | None) -> list[int | None]:
    """Channel id per component; ``None`` entries go through ``channel_id(None)`` when needed.

    A component needs a channel when any of its samples may lack one: always, unless it says
    how many of its sequences lack their own (``unlabeled_conversations``, as
    ``megatron_channel.data.sft`` datasets do) and that is 0. Entries no sample needs stay ``None``.
    """
    resolved: list[int | None] = []
    for j, value in enumerate(component_channel_ids):
        if value is not None:
            resolved.append(check_channel_value(value, f"component_channel_ids[{j}]"))
            continue
        component = components[j] if components is not None else None
        unlabeled = getattr(component, "unlabeled_conversations", None)
        if unlabeled == 0:
            resolved.append(None)
            continue
        where = describe_component(component, j)
        if channel_id is None:
            raise ValueError(
                f"blend component {where} has no channel (component_channel_ids[{j}] is None) and "
                "samples that name none; pass channel_id= to apply the untracked policy, or give "
                "the component a channel"
            )
        try:
            value = channel_id(None)
        except ValueError as err:
            raise ValueError(f"blend component {where} has no channel and samples that name none: {err}") from err
        resolved.append(check_channel_value(value, f"channel_id(None) for blend component {where}"))
    return resolved


def describe_component(component, index: int) -> str:
    """``index``, with the component's path and first unnamed line when it has them."""
    path = getattr(component, "dataset_path", None)
    first = getattr(component, "first_unlabeled_line", None)
    text = f"{index}" if path is None else f"{index} ({path})"
    return text if first is None else f"{text} (first unnamed line: {first})"


class ChannelTaggedDataset(Dataset):
    """A dataset whose samples gain ``channels``: the channel of their blend component.

    Attributes of the wrapped dataset (``split``, ``index_split``, ``datasets``, ...) are
    reachable through the wrapper, so Megatron's data loader treats it as the original.

    Args:
        dataset: a ``BlendedDataset`` (samples carry ``dataset_id``), a single
            ``MegatronDataset`` (one component), or any map-style dataset of dict samples
            (with ``dataset_id`` when it has several components).
        component_channel_ids: channel id of each blend component, in blend order (the order
            of the prefixes); ``-1`` = untracked; ``None`` = the component has no channel, so
            samples that need one get ``channel_id(None)`` (the untracked policy).
        channel_id: the untracked policy for ``None`` entries: returns an id, ``-1``, or
            raises ``ValueError``. Called here, at construction, never per sample.
    """

    def __init__(self, dataset, component_channel_ids: Sequence[int | None],
                 channel_id: ChannelIdFn | None = None):
        ids = list(component_channel_ids)
        if not ids:
            raise ValueError("component_channel_ids is empty: give one channel id per blend component")
        components = components_of(dataset)
        if components is not None and len(components) != len(ids):
            raise ValueError(
                f"the dataset has {len(components)} blend component(s) but {len(ids)} component "
                f"channel id(s) were given ({ids}); give one per component, in blend order"
            )
        self.dataset = dataset
        self.component_channels = resolve_component_channels(components, ids, channel_id)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # Only called for names the wrapper lacks; "dataset" itself is absent while unpickling.
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def component_of(self, sample: dict, idx) -> int:
        """Blend component of ``sample``: its ``dataset_id``, or 0 for a one-component dataset."""
        if "dataset_id" not in sample:
            if len(self.component_channels) == 1:
                return 0
            raise ValueError(
                f"sample {idx} has no 'dataset_id' but {len(self.component_channels)} component "
                "channel ids were given; a blend of several components must tag its samples "
                "(Megatron's BlendedDataset does)"
            )
        component = int(sample["dataset_id"])
        if not 0 <= component < len(self.component_channels):
            raise ValueError(
                f"sample {idx} has dataset_id {component} but only {len(self.component_channels)} "
                "component channel ids were given"
            )
        return component

    def __getitem__(self, idx) -> dict:
        """The sample plus ``channels``: 0-d int64 (rows), or ``[L - 1]`` int64 (packed rows)."""
        sample = self.dataset[idx]
        if not isinstance(sample, dict):
            raise TypeError(f"sample {idx} is a {type(sample).__name__}; ChannelTaggedDataset needs dict samples")
        channel = self.component_channels[self.component_of(sample, idx)]
        tagged = dict(sample)
        if "channels" in sample:
            tagged["channels"] = inherit_component_channel(sample["channels"], channel, idx)
        elif "cu_seqlens" in sample:
            tagged["channels"] = packed_row_channels(sample["cu_seqlens"], channel)
        else:
            tagged["channels"] = torch.tensor(channel, dtype=torch.int64)
        return tagged


def inherit_component_channel(channels: torch.Tensor, channel: int | None, idx) -> torch.Tensor:
    """Per-sequence ``channels`` with ``INHERIT_CHANNEL`` entries set to the component's."""
    inherit = channels == INHERIT_CHANNEL
    if not bool(inherit.any()):
        return channels
    if channel is None:
        raise ValueError(
            f"sample {idx} has sequences without a channel, but its component's channel was "
            "never resolved; its dataset reported unlabeled_conversations == 0"
        )
    return channels.masked_fill(inherit, channel)


def packed_row_channels(cu_seqlens: torch.Tensor, channel: int | None) -> torch.Tensor:
    """``[L - 1]`` ids for a packed row of one component: ``channel`` per sequence, -1 on padding slots.

    Padding slots are the trailing zero-length entries Megatron adds to reach a fixed ``L``.
    """
    if channel is None:
        raise ValueError("a packed row's component has no resolved channel")
    cu = cu_seqlens.reshape(-1).long()
    lengths = cu[1:] - cu[:-1]
    # Sequences up to the last non-empty one are real; later zero-length ones are padding.
    nonempty = torch.nonzero(lengths > 0)
    real = int(nonempty[-1]) + 1 if nonempty.numel() else 0
    out = torch.full((cu.numel() - 1,), -1, dtype=torch.int64)
    out[:real] = channel
    return out


def blend_component_paths(config: BlendedMegatronDatasetConfig) -> list[list[str] | None]:
    """Blend component paths of the train, valid and test splits, in blend order.

    ``config.blend`` (``--data-path``) gives every split the same components;
    ``config.blend_per_split`` (``--train-data-path`` ...) gives each its own. ``None`` for a
    split without a blend (and for every split of a mock dataset).
    """
    if config.blend is not None:
        return [list(config.blend[0]) for _ in SPLIT_NAMES]
    if config.blend_per_split is not None:
        return [None if blend is None else list(blend[0]) for blend in config.blend_per_split]
    return [None for _ in SPLIT_NAMES]


def component_channel_ids(paths_per_split: Sequence[Sequence[str] | None],
                          blend_channel_ids: Callable[[list[str]], list[int]] | None = None) -> list:
    """Per split (``blend_component_paths``), the channel id of each blend component for
    ``tag_datasets``: ``blend_channel_ids(paths)`` when the channels come from the blend, else
    ``None`` for each component (SFT lines name their own channel; other samples get the untracked
    policy); ``None`` for a split without a blend."""
    return [None if paths is None else (blend_channel_ids(list(paths)) if blend_channel_ids else [None] * len(paths))
            for paths in paths_per_split]


def tag_datasets(datasets: Sequence, component_channel_ids: Sequence[Sequence[int | None] | None],
                 channel_id: ChannelIdFn | None = None) -> list:
    """Wrap the ``[train, valid, test]`` datasets a ``BlendedMegatronDatasetBuilder`` returns.

    Args:
        datasets: per split, a dataset, ``None`` (not built on this rank, or no such split),
            or a list of datasets, one per component (``multiple_validation_sets``).
        component_channel_ids: per split, the channel id of each blend component of that
            split (see ``blend_component_paths``); ``None`` for a split without datasets.
        channel_id: the untracked policy for ``None`` component ids (see ``ChannelTaggedDataset``).

    Returns:
        ``[train, valid, test]`` with every dataset wrapped in ``ChannelTaggedDataset``.
    """
    if len(datasets) != len(component_channel_ids):
        raise ValueError(
            f"got {len(datasets)} datasets but {len(component_channel_ids)} component id lists; "
            "give one list per split (train, valid, test)"
        )
    tagged = []
    for i, (dataset, ids) in enumerate(zip(datasets, component_channel_ids)):
        name = SPLIT_NAMES[i] if i < len(SPLIT_NAMES) else str(i)
        if dataset is None:
            tagged.append(None)
        elif ids is None:
            raise ValueError(f"the {name} split has a dataset but no component channel ids")
        elif isinstance(dataset, list):
            # One dataset per component, evaluated separately (--multiple-validation-sets).
            if len(dataset) != len(ids):
                raise ValueError(
                    f"the {name} split has {len(dataset)} datasets (one per component) but "
                    f"{len(ids)} component channel ids"
                )
            tagged.append([None if d is None else ChannelTaggedDataset(d, [c], channel_id)
                           for d, c in zip(dataset, ids)])
        else:
            tagged.append(ChannelTaggedDataset(dataset, ids, channel_id))
    return tagged
