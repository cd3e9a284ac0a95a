"""Which channel a sample counts in: its channel name, or the blend component it came from.

A sample names its channel in a field (``--channel-field``), or its channel is that of its
blend component (``--channels-from-blend``). A sample without a channel, or with a name that
is not a channel, follows the untracked policy (``--untracked-channels``):

* ``error``: ``UntrackedChannelError`` at data build time, naming the file and line;
* ``other``: it counts in an extra last channel ``other``;
* ``ignore``: id -1, so it counts in ``lm loss`` only.
"""

from __future__ import annotations

import posixpath
from typing import Any, Literal, Sequence

from ..config import ChannelConfig
from ..names import flag_of

UNTRACKED_POLICIES = ("error", "other", "ignore")
OTHER_CHANNEL = "other"
# Suffixes of whole-file datasets (jsonl for SFT, Megatron's .bin/.idx pair). Only these are
# stripped: an indexed-dataset prefix such as "web.v2_text_document" keeps its dots.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".bin", ".idx")

FromBlend = None | Literal[True] | tuple[str, ...]
"""``None``: samples name their channel in a field; ``True``: one channel per blend component,
named after its path; else the channel name of each component, in blend order."""


class UntrackedChannelError(ValueError):
    """A sample without a channel, or with an unknown one, under ``--untracked-channels error``."""


def check_untracked_policy(policy: Any, source: str) -> None:
    """``ValueError`` naming ``source`` unless ``policy`` is one of ``UNTRACKED_POLICIES``."""
    if policy not in UNTRACKED_POLICIES:
        raise ValueError(f"{source} = {policy!r}; choose one of {list(UNTRACKED_POLICIES)}")


def sample_channel_id(config: ChannelConfig, name: Any, *, untracked: str, field: str, where: str = "") -> int:
    """Channel id of a sample whose field ``field`` holds ``name`` (``None`` or ``""``: it has none).

    A missing or unknown name follows ``untracked``; ``where`` (e.g. ``"/d/chat.jsonl line 7"``)
    starts the error messages.
    """
    at = f"{where}: " if where else ""
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{at}sample field {field!r} = {name!r}; a channel name must be a string")
    if name and name in config.channels:
        return config.channel_id(name)
    if untracked == "other":
        return config.channel_id(OTHER_CHANNEL)
    if untracked == "ignore":
        return -1
    if name:
        problem, fix = f"has unknown channel {name!r}", f"add it to {flag_of('channels')}"
    else:
        problem, fix = f"has no channel (field {field!r} missing or empty)", "give it one"
    raise UntrackedChannelError(
        f"{at}sample {problem}; known channels: {list(config.channels)}. Either {fix}, or set "
        f"{flag_of('untracked_channels')} to 'other' (count it as channel {OTHER_CHANNEL!r}) or "
        "'ignore' (count it in lm loss only)"
    )


def blend_component_name(path: str) -> str:
    """Channel name of a blend component: its basename, without a data-file suffix.

    ``/data/math_text_document`` -> ``math_text_document``; ``/d/chat.jsonl`` -> ``chat``.
    """
    base = posixpath.basename(str(path).rstrip("/"))
    for suffix in DATA_FILE_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    if not base:
        raise ValueError(
            f"blend component {path!r} has no file name to name its channel after; "
            f"give names with {flag_of('channels_from_blend')}"
        )
    return base


def blend_names(from_blend: FromBlend, component_paths: Sequence[str], *, field: str) -> list[str]:
    """The channel name of every blend component (``[len(component_paths)]``), in blend order."""
    paths = [str(p) for p in component_paths]
    if from_blend is None:
        raise ValueError(
            f"{flag_of('channels_from_blend')} is not set, so blend components have no channels; "
            f"samples carry their channel in field {field!r}"
        )
    if from_blend is True:
        return [blend_component_name(p) for p in paths]
    if len(from_blend) != len(paths):
        raise ValueError(
            f"{flag_of('channels_from_blend')} names {len(from_blend)} components "
            f"{list(from_blend)}, but the blend has {len(paths)}: {paths}; give one name per component"
        )
    return list(from_blend)


def blend_name_channel_id(config: ChannelConfig, name: str, what: str) -> int:
    """Channel id of blend name ``name``; ``ValueError`` starting with ``what`` if it is no channel."""
    if name not in config.channels:
        raise ValueError(
            f"{what}, which is not in {flag_of('channels')} {list(config.channels)}; add it "
            f"there, or name the blend components with {flag_of('channels_from_blend')} NAME ..."
        )
    return config.channel_id(name)


def blend_channel_ids(config: ChannelConfig, from_blend: FromBlend, component_paths: Sequence[str], *,
                      field: str) -> list[int]:
    """Channel id of every blend component, in blend order (``[len(component_paths)]``).

    Component i is named ``from_blend[i]`` when names were given, else after its path; the
    name must be a channel of ``config`` (``other`` included when that policy is on).
    """
    names = blend_names(from_blend, component_paths, field=field)
    return [blend_name_channel_id(config, n, f"blend component {i} ({str(p)!r}) is named {n!r}")
            for i, (n, p) in enumerate(zip(names, component_paths))]
