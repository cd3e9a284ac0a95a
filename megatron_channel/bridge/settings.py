"""Channel settings of a Bridge run: the channel flags or YAML, resolved against Bridge's dataset config."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

from ..settings import SETTING_KEYS, ChannelSettings, channel_settings_from_args, load_channel_yaml


def channel_settings_for_bridge(cfg, settings: Mapping[str, Any] | str | Any = None, **keys) -> ChannelSettings:
    """``ChannelSettings`` for a Bridge ``ConfigContainer``, checked as the Megatron-LM launch checks them.

    Args:
        cfg: Bridge's ``ConfigContainer``; with ``channels_from_blend`` the blend is read from
            ``cfg.dataset`` (``data_path``, else ``blend`` / ``blend_per_split``).
        settings: the channel YAML keys (``channels``, ``channels_from_blend``, ...) as a
            mapping, the path of a channel YAML file, or an argparse namespace from
            ``add_channel_args`` (flags given twice: the last wins).
        keys: more YAML keys; a key given both here and in ``settings`` is an error.
    """
    if isinstance(settings, str):
        settings = load_channel_yaml(settings, "channel YAML")
    if settings is not None and not isinstance(settings, Mapping):
        given = vars(settings)
        settings = {k: given[k] for k in SETTING_KEYS if given.get(k) is not None}
        if given.get("channel_config") is not None:
            settings["channel_config"] = given["channel_config"]
    merged = dict(settings or {})
    twice = sorted(set(merged) & set(keys))
    if twice:
        raise ValueError(f"channel settings {twice} are given twice (in settings and as keywords); give each once")
    merged.update(keys)
    paths = _blend_paths(cfg.dataset)
    args = SimpleNamespace(**merged, yaml_cfg=None, data_path=paths, train_data_path=None, valid_data_path=None,
                           test_data_path=None, data_args_path=None, per_split_data_args_path=None,
                           sft=False, dataloader_inter_document_masking=False)
    return channel_settings_from_args(args)


def _blend_paths(dataset_config) -> list[str] | None:
    """``--data-path``-style list of the training blend (weights first), or None."""
    data_path = getattr(dataset_config, "data_path", None)
    if data_path:
        return [str(p) for p in data_path]
    blend = getattr(dataset_config, "blend", None)
    if blend is None:
        per_split = getattr(dataset_config, "blend_per_split", None)
        blend = per_split[0] if per_split else None
    if blend is None:
        return None
    paths, weights = blend
    if weights is None:
        return [str(p) for p in paths]
    return [str(x) for pair in zip(weights, paths) for x in pair]
