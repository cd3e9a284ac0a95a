"""ChannelConfig: names, ids, metric keys, and the errors for names that cannot be keys."""

import dataclasses

import pytest

from megatron_channel import ChannelConfig


def test_ids_follow_order_and_keys_take_prefix():
    config = ChannelConfig(["math", "code", "chat"])
    assert config.num_channels == 3
    assert [config.channel_id(n) for n in ("math", "code", "chat")] == [0, 1, 2]
    assert config.metric_keys() == ["loss_math", "loss_code", "loss_chat"]
    assert ChannelConfig(("a",), prefix="ch_").metric_keys() == ["ch_a"]


def test_frozen_and_hashable_by_value():
    config = ChannelConfig(["a", "b"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.prefix = "x"
    assert config == ChannelConfig(("a", "b"))


def test_unknown_name_lists_known_channels():
    with pytest.raises(KeyError, match=r"'web'.*\['math', 'code'\]"):
        ChannelConfig(["math", "code"]).channel_id("web")


@pytest.mark.parametrize(
    "channels, match",
    [
        ([], "channels is empty"),
        ("math", "list of names"),
        (["math", ""], r"channels\[1\] = ''"),
        (["math", 3], r"channels\[1\] = 3"),
        (["math", "code", "math"], r"channels\[2\] = 'math' duplicates channels\[0\]"),
        (["math", "my code"], r"channels\[1\] = 'my code'.*whitespace or '/'"),
        (["a/b"], r"channels\[0\] = 'a/b'"),
        (["tab\t"], r"channels\[0\]"),
    ],
)
def test_bad_names_are_rejected_with_the_entry(channels, match):
    with pytest.raises(ValueError, match=match):
        ChannelConfig(channels)


def test_prefix_that_cannot_be_a_key_is_rejected():
    with pytest.raises(ValueError, match="whitespace or '/'"):
        ChannelConfig(["math"], prefix="loss/")


@pytest.mark.parametrize("prefix", ["", "tokens_", "tokens_x"])
def test_prefix_that_would_clash_with_other_logs_is_rejected(prefix):
    with pytest.raises(ValueError, match="bare names or clash with the token logs"):
        ChannelConfig(["math"], prefix=prefix)
