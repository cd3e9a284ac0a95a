"""Channel configuration: which data sources get their own loss curve, and the names they log under."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .names import LM_LOSS_KEY, TOKEN_ACC_KEY, TOKENS_PREFIX

# Metric keys travel through TensorBoard and W&B tag paths, so whitespace and "/" (a tag
# separator) would split one curve into several; control characters break the event files.
_BAD_KEY_CHARS = re.compile(r"[\s/\x00-\x1f\x7f]")
TEMPLATE_FIELD = "channel"  # the one replacement field of a name template: {channel}
DEFAULT_PREFIX = "loss_"
DEFAULT_ACCURACY_NAME = "token_acc_{channel}"


def check_prefix(prefix, what: str = "prefix") -> None:
    """``ValueError`` naming ``what`` (e.g. the flag it came from) unless ``prefix`` can start keys."""
    if not isinstance(prefix, str):
        raise ValueError(f"{what} = {prefix!r}; give a string such as 'loss_'")
    if not prefix or prefix.startswith(TOKENS_PREFIX):
        raise ValueError(
            f"{what} = {prefix!r} would make channel keys that are bare names or clash with the token "
            f"logs ({TOKENS_PREFIX}<name>); use a non-empty prefix such as 'loss_'"
        )
    if _BAD_KEY_CHARS.search(prefix):
        raise ValueError(f"{what} = {prefix!r} contains whitespace or '/'; use letters, digits, '_', '-' or '.'")


def check_name_template(template, what: str) -> tuple[str, str]:
    """``(before, after)`` of a name template such as ``'{channel}_loss'``; ``ValueError`` naming ``what``.

    The template holds ``{channel}`` exactly once and no other replacement field, is not the
    bare ``{channel}`` (a key equal to the channel name), and cannot make a key that starts
    with the token logs' ``tokens_`` or holds whitespace or '/'.
    """
    if not isinstance(template, str):
        raise ValueError(f"{what} = {template!r}; give a string such as '{{channel}}_loss'")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"{what} = {template!r} is not a valid name template ({e}); write e.g. '{{channel}}_loss'")
    if fields != [TEMPLATE_FIELD]:
        raise ValueError(
            f"{what} = {template!r} must hold {{channel}} exactly once and no other field; write e.g. '{{channel}}_loss'"
        )
    before, after = template.split("{" + TEMPLATE_FIELD + "}")
    if not before and not after:
        raise ValueError(f"{what} = {template!r} would name the curve after the bare channel; add a prefix or suffix")
    if before.startswith(TOKENS_PREFIX):
        raise ValueError(f"{what} = {template!r} would clash with the token logs ({TOKENS_PREFIX}<name>)")
    if _BAD_KEY_CHARS.search(before + after):
        raise ValueError(f"{what} = {template!r} contains whitespace or '/'; use letters, digits, '_', '-' or '.'")
    return before, after


@dataclass(frozen=True)
class ChannelConfig:
    """Ordered channel names (a channel's id is its position, 0..K-1) and what they log under.

    Attributes:
        channels: channel names, e.g. ``("math", "code", "chat")``.
        prefix: loss key prefix; the loss key of channel ``name`` is ``prefix + name``
            (``loss_name`` says the same as a template; give one of the two).
        token_accuracy: also count, per channel and over all tokens, the loss tokens whose
            label is an argmax of the logits (``token_acc_<name>``, ``token acc``).
        loss_name: template of the loss keys, e.g. ``"{channel}_loss"``; default
            ``prefix + "{channel}"``.
        accuracy_name: template of the accuracy keys (default ``"token_acc_{channel}"``).
        labels: how error messages name each field above, e.g. ``{"prefix":
            "--channel-loss-prefix (YAML: channel_loss_prefix)"}``; a field not in it (or all,
            when None) is named as itself. ``ChannelSettings`` passes its flags here, so a bad flag is named as given.
    """

    channels: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    token_accuracy: bool = False
    loss_name: str | None = None
    accuracy_name: str = DEFAULT_ACCURACY_NAME
    labels: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _keys: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _accuracy_keys: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _patterns: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        def label(name: str) -> str:
            return (self.labels or {}).get(name, name)

        if isinstance(self.channels, str) or not isinstance(self.channels, Iterable):
            raise ValueError(
                f"{label('channels')} = {self.channels!r}; give a list of names, e.g. ['math', 'code']"
            )
        names = tuple(self.channels)
        if not names:
            raise ValueError(f"{label('channels')} is empty: give at least one channel name")
        check_prefix(self.prefix, label("prefix"))
        if self.loss_name is not None and self.prefix != DEFAULT_PREFIX:
            raise ValueError(
                f"{label('prefix')} = {self.prefix!r} and {label('loss_name')} = {self.loss_name!r} both name "
                f"the loss keys; give one ({label('loss_name')} = {self.prefix + '{channel}'!r} is that prefix)"
            )
        if not isinstance(self.token_accuracy, bool):
            raise ValueError(f"{label('token_accuracy')} = {self.token_accuracy!r}; give true or false")
        loss_name = self.prefix + "{channel}" if self.loss_name is None else self.loss_name
        templates = {"loss_name": check_name_template(
            loss_name, label("prefix" if self.loss_name is None else "loss_name"))}
        if self.token_accuracy:
            templates["accuracy_name"] = check_name_template(self.accuracy_name, label("accuracy_name"))
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            entry = f"{label('channels')}[{i}] = {name!r}"
            if not isinstance(name, str) or not name:
                raise ValueError(f"{entry}: a channel name must be a non-empty string")
            if _BAD_KEY_CHARS.search(name):
                raise ValueError(
                    f"{entry}: metric key {loss_name.format(channel=name)!r} contains "
                    "whitespace or '/'; use letters, digits, '_', '-' or '.'"
                )
            if name in seen:
                raise ValueError(
                    f"{label('channels')} names {name!r} twice (entries {seen[name]} and {i}); give each channel once"
                )
            seen[name] = i
        object.__setattr__(self, "channels", names)
        object.__setattr__(self, "loss_name", loss_name)
        object.__setattr__(self, "_ids", seen)
        # Built once: the loss function reads the keys on every microbatch.
        keys = tuple(loss_name.format(channel=n) for n in names)
        accuracy_keys = tuple(self.accuracy_name.format(channel=n) for n in names) if self.token_accuracy else ()
        owners: dict[str, str] = {LM_LOSS_KEY: "Megatron's lm loss", TOKEN_ACC_KEY: "the all-token accuracy"}
        for key, owner in [*((k, f"the loss of {n!r}") for k, n in zip(keys, names)),
                           *((k, f"the accuracy of {n!r}") for k, n in zip(accuracy_keys, names))]:
            if key in owners:
                raise ValueError(
                    f"metric key {key!r} names both {owners[key]} and {owner}; choose {label('loss_name')} / "
                    f"{label('accuracy_name')} templates that tell them apart"
                )
            owners[key] = owner
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_accuracy_keys", accuracy_keys)
        object.__setattr__(self, "_patterns", tuple(
            re.compile(re.escape(before) + r"\S+" + re.escape(after)) for before, after in templates.values()))

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def channel_id(self, name: str) -> int:
        """Id of channel ``name``; ``KeyError`` naming the known channels if absent."""
        try:
            return self._ids[name]
        except KeyError:
            raise KeyError(f"unknown channel {name!r}; known channels: {list(self.channels)}") from None

    def metric_keys(self) -> list[str]:
        """The loss keys, ``loss_name`` per channel, in channel order."""
        return list(self._keys)

    def accuracy_keys(self) -> list[str]:
        """The accuracy keys, ``accuracy_name`` per channel, in channel order (empty when off)."""
        return list(self._accuracy_keys)

    def looks_like_channel_key(self, key: str) -> bool:
        """Whether ``key`` has the shape of a loss or accuracy key of some channel."""
        return any(p.fullmatch(key) for p in self._patterns)
