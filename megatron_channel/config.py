"""Channel configuration: which data sources get their own loss curve."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .channel_logging.names import TOKENS_PREFIX

# Metric keys travel through TensorBoard and W&B tag paths, so whitespace and
# "/" (a tag separator) would split one curve into several.
_BAD_KEY_CHARS = re.compile(r"[\s/]")


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


@dataclass(frozen=True)
class ChannelConfig:
    """Ordered channel names; a channel's id is its position (0..K-1).

    Attributes:
        channels: channel names, e.g. ``("math", "code", "chat")``.
        prefix: metric key prefix; the key of channel ``name`` is ``prefix + name``.
    """

    channels: tuple[str, ...]
    prefix: str = "loss_"
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _keys: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.channels, str):
            raise ValueError(
                f"channels must be a list of names, not the string {self.channels!r}; "
                f"write channels=[{self.channels!r}]"
            )
        names = tuple(self.channels)
        if not names:
            raise ValueError("channels is empty: give at least one channel name")
        check_prefix(self.prefix)
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name:
                raise ValueError(f"channels[{i}] = {name!r}: a channel name must be a non-empty string")
            if _BAD_KEY_CHARS.search(self.prefix + name):
                raise ValueError(
                    f"channels[{i}] = {name!r}: metric key {self.prefix + name!r} contains "
                    "whitespace or '/'; use letters, digits, '_', '-' or '.'"
                )
            if name in seen:
                raise ValueError(
                    f"channels[{i}] = {name!r} duplicates channels[{seen[name]}]; names must be unique"
                )
            seen[name] = i
        object.__setattr__(self, "channels", names)
        object.__setattr__(self, "_ids", seen)
        # Built once: the loss function reads the keys on every microbatch.
        object.__setattr__(self, "_keys", tuple(self.prefix + name for name in names))

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
        """``[prefix + name, ...]`` in channel order."""
        return list(self._keys)
