"""Channel-loss settings from Megatron's command line, a channel YAML, or Megatron's --yaml-cfg.

The settings are declared once, in ``SETTINGS``: each ``Setting`` gives its YAML key (the
flag's argparse ``dest``), its flag, its default, its help and the README's flags-table row
(``flags_table_row``; ``tests/test_settings.py`` checks the README against it). They are:
the channel names (``channels``), the loss and accuracy key names (``channel_loss_prefix`` or
``channel_loss_name``, ``channel_accuracy_name``), token accuracy
(``channel_token_accuracy``), where a sample's channel comes from (``channel_field``,
``channels_from_blend``) and what a sample without one gets (``untracked_channels``).

Where they may be given (every setting in ONE place: giving one setting both as a flag and in
a YAML, or in two YAML places, is a ``ValueError`` naming both, because a silent precedence
rule between sources hides typos):

* command-line flags, added to Megatron's parser by ``add_channel_args`` (use it as, or
  inside, ``extra_args_provider``); the defaults are ``None`` so that "given" is visible. A
  flag given twice keeps the last value, as Megatron's flags do (a launch script's flags
  followed by the user's own);
* ``--channel-config FILE.yaml``: a mapping with the YAML keys above, nothing else;
* under Megatron's ``--yaml-cfg`` (which replaces argparse, so our flags are never parsed):
  the same keys at the top level of that YAML, and/or in a ``channel_loss:`` section, and
  ``channel_config: FILE.yaml`` at the top level. Megatron's ``validate_yaml`` does not
  check for unknown keys, so both forms pass through it; we reject unknown keys in the
  section and in the file, and top-level keys that start with ``channel`` but are not ours.

``--channels-from-blend`` takes the blend of ``--data-path`` / ``--data-args-path``, or
else the training blend of ``--train-data-path`` / ``--per-split-data-args-path``, split
by Megatron's ``get_blend_and_blend_per_split``. Without NAMEs a component is named after
its path (``data.channel_ids.blend_component_name``); with NAMEs, NAME i belongs to component i. With
``--channels`` too, every blend name must be one of the channels (several components may
share one); without it the channels are the distinct blend names in order. Blends of
other splits map through ``ChannelSettings.blend_channel_ids`` by the same rules.

``channel_settings_from_args(args)`` resolves and checks everything; call it right after
Megatron parses its arguments so every mistake stops the run at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace
from typing import Any

import yaml

from .config import DEFAULT_ACCURACY_NAME, DEFAULT_PREFIX, ChannelConfig
from .data.channel_ids import (
    OTHER_CHANNEL,
    UNTRACKED_POLICIES,
    FromBlend,
    UntrackedChannelError,  # noqa: F401  (importable from here as before)
    blend_channel_ids,
    blend_component_name,
    blend_name_channel_id,
    check_untracked_policy,
    sample_channel_id,
)
from .names import flag_of
from .step.layout import DEFAULT_MAX_SEQUENCES_PER_ROW, MAX_SEQUENCES_FLAG, check_packed_args


@dataclasses.dataclass(frozen=True)
class Setting:
    """One channel setting, declared once: its flag, its YAML key and its default come from here.

    Attributes:
        key: the YAML key, which is also the flag's argparse ``dest`` (``--`` + key with dashes).
        default: the value when the setting is given nowhere (None: no default).
        help: the flag's help text; the README's flags table says the same.
        argparse: more ``add_argument`` keywords (``nargs``, ``metavar``, ``choices``, ``action``).
    """

    key: str
    default: Any
    help: str
    argparse: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("channels", None, "ordered channel names; a channel's id is its position",
            dict(nargs="+", metavar="NAME")),
    Setting("channel_loss_prefix", DEFAULT_PREFIX, "metric key prefix: channel `math` logs as `loss_math`",
            dict(metavar="P")),
    Setting("channel_loss_name", None, "the loss key as a template instead of the prefix, e.g. `{channel}_loss`, "
            "so a run logs under the names its dashboards already have (give this or the prefix)",
            dict(metavar="TEMPLATE")),
    Setting("channel_token_accuracy", False, "also log each channel's token accuracy (the share of its loss tokens "
            "whose label is an argmax of the logits; ties count, as in Megatron's vocab-parallel rule) and the "
            "all-token `token acc`", dict(action="store_const", const=True)),
    Setting("channel_accuracy_name", DEFAULT_ACCURACY_NAME, "the accuracy key template, e.g. `{channel}_token_acc`",
            dict(metavar="TEMPLATE")),
    Setting("channel_field", "channel", "sample field (jsonl key) holding a sample's channel name",
            dict(metavar="F")),
    Setting("channels_from_blend", None, "one channel per `--data-path` (or `--train-data-path`) blend component: "
            "named after its path (`/data/math_text_document` -> `math_text_document`, `chat.jsonl` -> `chat`), or "
            "NAME i for component i. With `--channels` too, every blend name must be one of them, so several "
            "components can share a channel", dict(nargs="*", metavar="NAME")),
    Setting("untracked_channels", "error", "a sample with no channel or an unknown name: `error` stops at data "
            "build time naming the file and line, `other` counts it in an extra last channel `other` (in the key "
            "set from the start), `ignore` counts it in `lm loss` only", dict(choices=UNTRACKED_POLICIES)),
)


def flags_table_row(setting: Setting) -> str:
    """The README's row of ``setting``: ``| flag | default | meaning |``, from its declaration."""
    options = setting.argparse
    if "choices" in options:
        usage = f"{setting.flag} {{{','.join(options['choices'])}}}"
    elif options.get("nargs") == "+":
        usage = f"{setting.flag} {options['metavar']} [{options['metavar']} ...]"
    elif options.get("nargs") == "*":
        usage = f"{setting.flag} [{options['metavar']} ...]"
    elif "metavar" in options:
        usage = f"{setting.flag} {options['metavar']}"
    else:
        usage = setting.flag
    default = "off" if setting.default is False or (setting.default is None and options.get("nargs") == "*") else (
        "" if setting.default is None else f"`{setting.default}`")
    return f"| `{usage}` |{f' {default} ' if default else ' '}| {setting.help} |"


SETTING_KEYS = tuple(setting.key for setting in SETTINGS)
DEFAULTS = {setting.key: setting.default for setting in SETTINGS if setting.default is not None}
# The ChannelConfig field each setting fills, so that its errors name the flag.
CONFIG_FIELD_KEYS = {"channels": "channels", "prefix": "channel_loss_prefix", "loss_name": "channel_loss_name",
                     "token_accuracy": "channel_token_accuracy", "accuracy_name": "channel_accuracy_name"}
CONFIG_FILE_KEY = "channel_config"
YAML_SECTION = "channel_loss"
COMMAND_LINE = "command line"
# Megatron's own arguments whose names hold "channel"; every other such YAML key is a typo of ours.
MEGATRON_CHANNEL_KEYS = ("kv_channels", "num_channels")


@dataclasses.dataclass(frozen=True)
class ChannelSettings:
    """Resolved channel settings: a ``ChannelConfig`` (what is logged, under which names; it
    checks those fields and names the flags in its errors) and where samples get their channel.

    Attributes:
        names: the user's channel names, ids 0..len-1 (``other`` is not among them).
        prefix: metric key prefix (``loss_name`` says it as a template; give one of the two).
        loss_name: template of the loss keys, e.g. ``"{channel}_loss"``; None: ``prefix + "{channel}"``.
        token_accuracy: also log per-channel and all-token accuracy.
        accuracy_name: template of the accuracy keys.
        field: the sample field that holds a sample's channel name.
        from_blend: ``None`` (channels come from ``field``), ``True`` (one channel per blend
            component, named after its path) or the component names in blend order.
        untracked: ``error``, ``other`` (an extra last channel ``other``) or ``ignore`` (id -1).
        sources: where each setting was given, by YAML key (e.g. ``{"channels": "channels: in
            --channel-config c.yaml"}``), for error messages; a key not in it is named by its
            flag and YAML key.
    """

    names: tuple[str, ...]
    prefix: str = DEFAULTS["channel_loss_prefix"]
    loss_name: str | None = None
    token_accuracy: bool = False
    accuracy_name: str = DEFAULTS["channel_accuracy_name"]
    field: str = DEFAULTS["channel_field"]
    from_blend: FromBlend = None
    untracked: str = DEFAULTS["untracked_channels"]
    sources: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _config: ChannelConfig = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_untracked_policy(self.untracked, self._source("untracked_channels"))
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"{self._source('channel_field')} = {self.field!r}; give a non-empty field name")
        extra = ()
        if self.untracked == "other":
            if isinstance(self.names, (list, tuple)) and OTHER_CHANNEL in self.names:
                raise ValueError(
                    f"channel {OTHER_CHANNEL!r} in {flag_of('channels')} clashes with the channel that "
                    f"{flag_of('untracked_channels')} other adds; rename it, or use untracked 'error' or 'ignore'"
                )
            extra = (OTHER_CHANNEL,)
        names = (*self.names, *extra) if isinstance(self.names, (list, tuple)) else self.names
        config = ChannelConfig(names, prefix=self.prefix, token_accuracy=self.token_accuracy,
                               loss_name=self.loss_name, accuracy_name=self.accuracy_name,
                               labels={field: self._source(key) for field, key in CONFIG_FIELD_KEYS.items()})
        object.__setattr__(self, "names", config.channels[:len(config.channels) - len(extra)])
        object.__setattr__(self, "_config", config)
        if self.from_blend is not None and self.from_blend is not True:
            from_blend = _check_names(self.from_blend, self._source("channels_from_blend"), unique=False)
            object.__setattr__(self, "from_blend", from_blend)
            for name in from_blend:
                blend_name_channel_id(config, name, f"blend name {name!r}")

    def _source(self, key: str) -> str:
        return self.sources.get(key, flag_of(key))

    def channel_config(self) -> ChannelConfig:
        """The ``ChannelConfig``: ``names``, then ``other`` when ``untracked == 'other'``."""
        return self._config

    def channel_id(self, name: str | None, where: str = "") -> int:
        """Id of a sample's channel name; ``None`` or ``""`` means the sample has none.

        A missing or unknown name follows the untracked policy: ``error`` raises
        ``UntrackedChannelError``, ``other`` returns the id of ``other``, ``ignore`` returns -1.
        ``where`` (e.g. ``"/d/chat.jsonl line 7"``) is put in front of error messages.
        """
        return sample_channel_id(self._config, name, untracked=self.untracked, field=self.field, where=where)

    def blend_channel_ids(self, component_paths: list[str]) -> list[int]:
        """Channel id of every blend component, in blend order (``[len(component_paths)]``).

        Component i is named ``from_blend[i]`` when names were given, else after its path;
        the name must be a channel (``other`` included when that policy is on).
        """
        return blend_channel_ids(self._config, self.from_blend, component_paths, field=self.field)


def _check_names(names: Any, source: str, *, unique: bool = True) -> tuple[str, ...]:
    """A non-empty list of non-empty strings, without repeats when ``unique``."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{source} = {names!r}; give a list of names, e.g. [math, code]")
    if not names:
        raise ValueError(f"{source} is empty; give at least one name")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}[{i}] = {name!r}; names must be non-empty strings (quote it in YAML)")
        if unique and name in names[:i]:
            raise ValueError(f"{source} names {name!r} twice; give each channel once")
    return tuple(names)


def add_channel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "channel loss" argument group to Megatron's parser; returns the parser."""
    group = parser.add_argument_group(title="channel loss")
    for setting in SETTINGS:
        # Default None, so that "given" shows (a flag and a YAML key for one setting is an error).
        group.add_argument(setting.flag, default=None, help=setting.help, **setting.argparse)
    group.add_argument(f"--{MAX_SEQUENCES_FLAG}", type=int, default=DEFAULT_MAX_SEQUENCES_PER_ROW,
                       help="Packed rows (--sft, --dataloader-inter-document-masking): attention gets "
                            "micro_batch_size times this many sequences per microbatch, the real ones first "
                            f"(default {DEFAULT_MAX_SEQUENCES_PER_ROW}); a microbatch with more is an error.")
    group.add_argument("--channel-config", metavar="FILE.yaml", default=None,
                       help=f"YAML mapping with keys {list(SETTING_KEYS)}; a setting may not be given "
                            "both there and as a flag.")
    return parser


def channel_settings_from_args(args: argparse.Namespace | SimpleNamespace) -> ChannelSettings:
    """Resolve and check the channel settings of Megatron's parsed ``args``.

    ``args`` is argparse's namespace (flags from ``add_channel_args``) or the namespace of
    Megatron's ``load_yaml`` / ``validate_yaml`` under ``--yaml-cfg``. Raises ``ValueError``
    naming the flag or YAML key for every invalid setting.
    """
    check_packed_args(args)
    raw, labels = _merge_sources(_sources(args))
    channels = raw.get("channels")  # checked by ChannelConfig, through ChannelSettings
    from_blend = _from_blend(raw.get("channels_from_blend"), labels.get("channels_from_blend"))
    untracked = raw.get("untracked_channels", DEFAULTS["untracked_channels"])
    check_untracked_policy(untracked, labels.get("untracked_channels", flag_of("untracked_channels")))
    blend = training_blend(args) if from_blend is not None else None
    blend = None if blend is None else blend[0]
    if from_blend is not None and blend is None:
        raise ValueError(
            f"{flag_of('channels_from_blend')} needs a blend: give --data-path (or --train-data-path) "
            "with one path per channel, or drop it and list the channels with --channels"
        )
    if channels is None and from_blend is None:
        raise ValueError(
            f"no channels: give {flag_of('channels')} NAME ..., or {flag_of('channels_from_blend')} "
            "to take them from the --data-path blend"
        )
    if channels is None:
        # A count mismatch of explicit names is caught by blend_channel_ids below.
        blend_names = [blend_component_name(p) for p in blend] if from_blend is True else from_blend
        channels = tuple(dict.fromkeys(blend_names))
    settings = ChannelSettings(
        names=channels,
        prefix=raw.get("channel_loss_prefix", DEFAULTS["channel_loss_prefix"]),
        loss_name=raw.get("channel_loss_name"),
        token_accuracy=raw.get("channel_token_accuracy", DEFAULTS["channel_token_accuracy"]),
        accuracy_name=raw.get("channel_accuracy_name", DEFAULTS["channel_accuracy_name"]),
        field=raw.get("channel_field", DEFAULTS["channel_field"]),
        from_blend=from_blend,
        untracked=untracked,
        sources=labels,
    )
    if blend is not None:
        settings.blend_channel_ids(blend)
    return settings


def load_channel_yaml(path: str, source: str = "--channel-config") -> dict[str, Any]:
    """The settings mapping of a channel YAML file; unknown keys are an error."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{source} {path!r} cannot be read: {e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{source} {path!r} is not valid YAML: {e}") from e
    return _check_mapping(data, f"{source} {path}")


def _check_mapping(data: Any, where: str) -> dict[str, Any]:
    if isinstance(data, SimpleNamespace):
        data = vars(data)
    if not isinstance(data, dict):
        raise ValueError(
            f"{where} must be a mapping of settings ({list(SETTING_KEYS)}), got {type(data).__name__}"
        )
    unknown = [k for k in data if k not in SETTING_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {list(SETTING_KEYS)}")
    return {k: v for k, v in data.items() if v is not None}


def _sources(args: Any) -> list[tuple[str, dict[str, Any]]]:
    """(where, settings) for every place the settings can come from; no precedence among them."""
    yaml_cfg = getattr(args, "yaml_cfg", None)
    top = {k: getattr(args, k) for k in SETTING_KEYS if getattr(args, k, None) is not None}
    if yaml_cfg is None:
        if top.get("channels_from_blend") == []:  # the bare flag: name channels after the paths
            top["channels_from_blend"] = True
        sources = [(COMMAND_LINE, top)]
    else:
        known = set(SETTING_KEYS) | {CONFIG_FILE_KEY, YAML_SECTION}
        # A near-miss of ours (untracked_channel, channel_prefix) would be silently ignored.
        stray = [k for k in vars(args) if "channel" in k and k not in known and k not in MEGATRON_CHANNEL_KEYS]
        if stray:
            raise ValueError(
                f"--yaml-cfg {yaml_cfg}: unknown top-level key(s) {stray}; channel-loss keys are {sorted(known)}"
            )
        sources = [(f"the top level of --yaml-cfg {yaml_cfg}", top)]
        section = getattr(args, YAML_SECTION, None)
        if section is not None:
            where = f"section {YAML_SECTION}: of --yaml-cfg {yaml_cfg}"
            sources.append((where, _check_mapping(section, where)))
    config_path = getattr(args, CONFIG_FILE_KEY, None)
    if config_path is not None:
        sources.append((f"--channel-config {config_path}", load_channel_yaml(str(config_path))))
    return sources


def _merge_sources(sources: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """One dict of settings, and for each given key a label naming where it came from."""
    merged: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for where, settings in sources:
        for key, value in settings.items():
            label = f"--{key.replace('_', '-')}" if where == COMMAND_LINE else f"{key}: in {where}"
            if key in labels:
                raise ValueError(
                    f"{key} is given twice, as {labels[key]} and as {label}; give each setting in one place"
                )
            merged[key], labels[key] = value, label
    return merged, labels


def _from_blend(value: Any, label: str | None) -> FromBlend:
    """YAML's ``true``/``false`` or a list of names (the command line's bare flag is ``True``)."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    if value == []:
        raise ValueError(f"{label} is an empty list; write true to name channels after the blend paths")
    return _check_names(value, label, unique=False)


def training_blend(args: Any) -> tuple[list[str], list[float] | None] | None:
    """``(component paths, weights or None)`` of the global blend, else of the training split's blend."""
    # Imported here: megatron.training takes seconds to import and only blends need it.
    from megatron.training.utils import get_blend_and_blend_per_split

    view = SimpleNamespace()
    for key in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        value = getattr(args, key, None)
        if isinstance(value, str):  # YAML may give "0.3 /x/math 0.7 /x/code"
            value = value.split()
        setattr(view, key, [str(v) for v in value] if value else None)  # a bare --data-path gives []
    view.data_args_path = getattr(args, "data_args_path", None)
    view.per_split_data_args_path = getattr(args, "per_split_data_args_path", None)
    blend, blend_per_split = get_blend_and_blend_per_split(view)
    if blend is None and blend_per_split is not None:
        blend = blend_per_split[0]
    return None if blend is None else (list(blend[0]), None if blend[1] is None else list(blend[1]))
