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
        (["math", "code", "math"], r"channels names 'math' twice \(entries 0 and 2\)"),
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


def test_name_templates_give_the_keys_dashboards_already_have():
    config = ChannelConfig(["math", "code"], token_accuracy=True, loss_name="{channel}_loss",
                           accuracy_name="{channel}_token_acc")
    assert config.metric_keys() == ["math_loss", "code_loss"]
    assert config.accuracy_keys() == ["math_token_acc", "code_token_acc"]
    assert ChannelConfig(["math"], token_accuracy=True).accuracy_keys() == ["token_acc_math"]
    assert ChannelConfig(["math"]).accuracy_keys() == []  # accuracy off: no keys
    assert ChannelConfig(["math"], loss_name="loss_{channel}") == ChannelConfig(["math"])
    assert config.looks_like_channel_key("web_loss") and config.looks_like_channel_key("web_token_acc")
    assert not config.looks_like_channel_key("lm loss")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_name="loss"), r"loss_name = 'loss' must hold \{channel\} exactly once"),
        (dict(loss_name="{channel}_{channel}"), r"exactly once"),
        (dict(loss_name="{channel}_{split}"), r"exactly once and no other field"),
        (dict(loss_name="{channel"), r"not a valid name template"),
        (dict(loss_name="{channel}"), r"bare channel"),
        (dict(loss_name="tokens_{channel}"), r"clash with the token logs"),
        (dict(loss_name="loss/{channel}"), r"whitespace or '/'"),
        (dict(loss_name="loss {channel}"), r"whitespace or '/'"),
        (dict(prefix="ch_", loss_name="{channel}_loss"), r"prefix = 'ch_' and loss_name = .* both name the loss keys"),
        (dict(token_accuracy=True, accuracy_name="loss_{channel}"),
         r"metric key 'loss_math' names both the loss of 'math' and the accuracy of 'math'"),
        (dict(token_accuracy=True, accuracy_name="{channel}_acc", loss_name="x_{channel}", channels=["a_acc", "x_a"]),
         r"unique|names both"),
    ],
)
def test_names_that_clash_or_cannot_be_tags_are_refused(kwargs, match):
    channels = kwargs.pop("channels", ["math", "code"])
    with pytest.raises(ValueError, match=match):
        ChannelConfig(channels, **kwargs)


def test_channel_keys_cannot_take_megatron_or_accuracy_names():
    with pytest.raises(ValueError, match=r"'token acc'|whitespace"):
        ChannelConfig(["acc"], token_accuracy=True, accuracy_name="token {channel}")
