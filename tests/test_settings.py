"""Channel flags and YAML, parsed by Megatron's real argument parser and YAML loader."""

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml
from megatron.core.datasets.utils import get_blend_from_list
from megatron.training.arguments import add_megatron_arguments
from megatron.training.yaml_arguments import load_yaml, validate_yaml

from megatron_channel.config import ChannelConfig
from megatron_channel.data.channel_ids import (
    UntrackedChannelError,
    blend_channel_ids,
    blend_component_name,
    sample_channel_id,
)
from megatron_channel.settings import ChannelSettings, add_channel_args, channel_settings_from_args

pytestmark = pytest.mark.timeout(60)

BLEND = ["--data-path", "0.3", "/x/math", "0.7", "/x/code"]
EXAMPLE_YAML = Path(__file__).resolve().parents[1] / "configs" / "channels.yaml"


@pytest.fixture(scope="module")
def parser():
    return add_channel_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def settings_of(parser, *argv):
    return channel_settings_from_args(parser.parse_args(list(argv)))


def write_yaml(tmp_path, data, name="channels.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------- command line


@pytest.mark.timeout(30)
def test_flags_parse_into_megatron_namespace_with_unset_defaults(parser):
    args = parser.parse_args(["--channels", "math", "code"])
    assert args.channels == ["math", "code"]
    # None defaults make "given" visible, so a flag and a YAML key can be told apart.
    for dest in ("channel_loss_prefix", "channel_field", "channels_from_blend", "untracked_channels",
                 "channel_config"):
        assert getattr(args, dest) is None
    settings = channel_settings_from_args(args)
    assert settings == ChannelSettings(names=("math", "code"), prefix="loss_", field="channel",
                                       from_blend=None, untracked="error")
    assert settings.channel_config() == ChannelConfig(["math", "code"])


@pytest.mark.timeout(30)
def test_as_megatron_extra_args_provider(monkeypatch):
    from megatron.training.arguments import parse_args

    monkeypatch.setattr("sys.argv", ["train.py", *BLEND, "--channels-from-blend", "--untracked-channels", "other"])
    s = channel_settings_from_args(parse_args(extra_args_provider=add_channel_args))
    assert s.channel_config().channels == ("math", "code", "other")


@pytest.mark.timeout(30)
def test_prefix_field_and_policy_flags(parser):
    s = settings_of(parser, "--channels", "a", "b", "--channel-loss-prefix", "ch",
                    "--channel-field", "source", "--untracked-channels", "ignore")
    assert (s.prefix, s.field, s.untracked) == ("ch", "source", "ignore")
    assert s.channel_config().metric_keys() == ["cha", "chb"]


@pytest.mark.timeout(30)
def test_token_accuracy_and_name_template_flags(parser, tmp_path):
    s = settings_of(parser, "--channels", "math", "code", "--channel-token-accuracy",
                    "--channel-loss-name", "{channel}_loss", "--channel-accuracy-name", "{channel}_token_acc")
    config = s.channel_config()
    assert config.token_accuracy and config.metric_keys() == ["math_loss", "code_loss"]
    assert config.accuracy_keys() == ["math_token_acc", "code_token_acc"]
    assert not settings_of(parser, "--channels", "math").channel_config().token_accuracy
    # The same from a channel YAML.
    path = write_yaml(tmp_path, {"channels": ["math"], "channel_token_accuracy": True,
                                 "channel_loss_name": "{channel}_loss"})
    config = settings_of(parser, "--channel-config", path).channel_config()
    assert config.token_accuracy and config.metric_keys() == ["math_loss"]
    assert config.accuracy_keys() == ["token_acc_math"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "argv, match",
    [
        (["--channel-loss-prefix", "ch_", "--channel-loss-name", "{channel}_loss"],
         r"--channel-loss-prefix .* and --channel-loss-name .* both name the loss keys"),
        (["--channel-loss-name", "loss"], r"^--channel-loss-name = 'loss' must hold"),
        (["--channel-token-accuracy", "--channel-accuracy-name", "loss_{channel}"],
         r"'loss_math' names both the loss of 'math' and the accuracy of 'math'.*--channel-accuracy-name"),
        (["--channel-token-accuracy", "--channel-accuracy-name", "acc/{channel}"],
         r"--channel-accuracy-name .* contains whitespace or '/'"),
    ],
)
def test_names_are_checked_at_start_up(parser, argv, match):
    with pytest.raises(ValueError, match=match):
        settings_of(parser, "--channels", "math", *argv)


@pytest.mark.timeout(30)
def test_token_accuracy_yaml_value_must_be_a_bool(parser, tmp_path):
    path = write_yaml(tmp_path, {"channels": ["math"], "channel_token_accuracy": "yes"})
    with pytest.raises(ValueError, match=r"channel_token_accuracy: in --channel-config .*channels.yaml = 'yes'; give true or false"):
        settings_of(parser, "--channel-config", path)


@pytest.mark.timeout(30)
def test_a_flag_given_twice_keeps_the_last_value_as_megatrons_do(parser):
    """A launch script's flags followed by the user's own: the user's win."""
    settings = settings_of(parser, "--channels", "math", "--untracked-channels", "error", "--channels", "code", "web",
                           "--untracked-channels", "other", "--channel-token-accuracy", "--channel-token-accuracy")
    assert settings.names == ("code", "web") and settings.untracked == "other" and settings.token_accuracy


@pytest.mark.timeout(30)
def test_bad_untracked_choice_is_an_argparse_error(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["--channels", "math", "--untracked-channels", "drop"])
    assert "--untracked-channels" in capsys.readouterr().err


# ---------------------------------------------------------------- blends


@pytest.mark.timeout(30)
def test_channels_from_blend_named_after_paths(parser):
    args = parser.parse_args([*BLEND, "--channels-from-blend"])
    s = channel_settings_from_args(args)
    # Independent reference for the components: Megatron's own split of the flat list.
    prefixes, weights = get_blend_from_list(args.data_path)
    assert prefixes == ["/x/math", "/x/code"] and weights == [0.3, 0.7]
    assert s.names == ("math", "code") and s.from_blend is True
    assert s.blend_channel_ids(prefixes) == [0, 1]


@pytest.mark.timeout(30)
def test_unweighted_blend_with_repeated_names_shares_a_channel(parser):
    s = settings_of(parser, "--data-path", "/a/math", "/b/code", "/c/math", "--channels-from-blend")
    assert s.names == ("math", "code")
    assert s.blend_channel_ids(["/a/math", "/b/code", "/c/math"]) == [0, 1, 0]


@pytest.mark.timeout(30)
def test_channels_from_blend_with_names(parser):
    s = settings_of(parser, *BLEND, "--channels-from-blend", "algebra", "python")
    assert s.names == ("algebra", "python") and s.from_blend == ("algebra", "python")
    assert s.blend_channel_ids(["/x/math", "/x/code"]) == [0, 1]


@pytest.mark.timeout(30)
def test_channels_with_blend_names_map_into_the_channel_list(parser):
    s = settings_of(parser, "--data-path", "/a/math", "/b/code", "/c/math",
                    "--channels", "code", "math", "chat", "--channels-from-blend")
    assert s.names == ("code", "math", "chat")
    assert s.blend_channel_ids(["/a/math", "/b/code", "/c/math"]) == [1, 0, 1]
    s = settings_of(parser, *BLEND, "--channels", "code", "math", "--channels-from-blend", "math", "math")
    assert s.blend_channel_ids(["/x/math", "/x/code"]) == [1, 1]


@pytest.mark.timeout(30)
def test_blend_name_other_maps_to_the_other_channel(parser):
    s = settings_of(parser, *BLEND, "--channels", "math", "--channels-from-blend", "math", "other",
                    "--untracked-channels", "other")
    assert s.channel_config().channels == ("math", "other")
    assert s.blend_channel_ids(["/x/math", "/x/code"]) == [0, 1]


@pytest.mark.timeout(30)
def test_per_split_train_data_path_defines_channels(parser):
    s = settings_of(parser, "--train-data-path", "/x/math_text_document", "/x/code_text_document",
                    "--valid-data-path", "/v/code_text_document", "--channels-from-blend")
    assert s.names == ("math_text_document", "code_text_document")
    assert s.blend_channel_ids(["/v/code_text_document"]) == [1]
    with pytest.raises(ValueError, match=r"'/v/chat_text_document'.*not in --channels"):
        s.blend_channel_ids(["/v/chat_text_document"])


@pytest.mark.timeout(30)
def test_data_args_path_file_is_a_blend(parser, tmp_path):
    blend_file = tmp_path / "blend.txt"
    blend_file.write_text("0.5 /d/chat.jsonl\n0.5 /d/math.jsonl\n")
    s = settings_of(parser, "--data-args-path", str(blend_file), "--channels-from-blend")
    assert s.names == ("chat", "math")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path, name", [
    ("/data/math_text_document", "math_text_document"),
    ("/d/chat.jsonl", "chat"),
    ("/d/web.v2_text_document", "web.v2_text_document"),
    ("rel/code.bin", "code"),
    ("/d/sft/", "sft"),
])
def test_blend_component_name(path, name):
    assert blend_component_name(path) == name


@pytest.mark.timeout(30)
def test_blend_channel_ids_without_from_blend_is_an_error():
    with pytest.raises(ValueError, match=r"--channels-from-blend .* is not set.*field 'channel'"):
        ChannelSettings(names=("math",)).blend_channel_ids(["/x/math"])


# ---------------------------------------------------------------- untracked policies


@pytest.mark.timeout(30)
def test_untracked_error():
    s = ChannelSettings(names=("math", "code"))
    assert [s.channel_id("math"), s.channel_id("code")] == [0, 1]
    with pytest.raises(UntrackedChannelError, match=r"^/d/a.jsonl line 7: .*unknown channel 'chat'.*"
                                                    r"\['math', 'code'\].*--untracked-channels"):
        s.channel_id("chat", where="/d/a.jsonl line 7")
    for missing in (None, ""):
        with pytest.raises(UntrackedChannelError, match=r"no channel \(field 'channel'.*--untracked-channels"):
            s.channel_id(missing)
    with pytest.raises(ValueError, match=r"field 'channel' = 3; a channel name must be a string"):
        s.channel_id(3)


@pytest.mark.timeout(30)
def test_untracked_other_appends_other_last():
    s = ChannelSettings(names=("math", "code"), untracked="other")
    assert s.names == ("math", "code")
    assert s.channel_config().channels == ("math", "code", "other")
    assert s.channel_config().metric_keys() == ["loss_math", "loss_code", "loss_other"]
    assert [s.channel_id(n) for n in ("math", "code", "chat", None, "", "other")] == [0, 1, 2, 2, 2, 2]


@pytest.mark.timeout(30)
def test_channel_ids_need_only_a_channel_config():
    config = ChannelConfig(["math", "code"])
    assert sample_channel_id(config, "code", untracked="error", field="source") == 1
    assert sample_channel_id(config, "web", untracked="ignore", field="source") == -1
    with pytest.raises(UntrackedChannelError, match=r"no channel \(field 'source' missing or empty\)"):
        sample_channel_id(config, None, untracked="error", field="source")
    assert blend_channel_ids(config, True, ["/x/code.jsonl", "/x/math"], field="source") == [1, 0]
    assert blend_channel_ids(config, ("math", "math"), ["/x/a", "/x/b"], field="source") == [0, 0]


@pytest.mark.timeout(30)
def test_untracked_ignore_maps_to_minus_one():
    s = ChannelSettings(names=("math", "code"), untracked="ignore")
    assert s.channel_config().channels == ("math", "code")
    assert [s.channel_id(n) for n in ("code", "chat", None, "other")] == [1, -1, -1, -1]


@pytest.mark.timeout(30)
def test_settings_dataclass_checks():
    with pytest.raises(ValueError, match=r"'other' in --channels .* clashes .*--untracked-channels"):
        ChannelSettings(names=("math", "other"), untracked="other")
    with pytest.raises(ValueError, match=r"--untracked-channels .* = 'drop'; choose one of"):
        ChannelSettings(names=("math",), untracked="drop")
    with pytest.raises(ValueError, match=r"--channels .* = 'math'; give a list"):
        ChannelSettings(names="math")
    assert ChannelSettings(names=["a"], from_blend=["a", "a"]).from_blend == ("a", "a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ChannelSettings(names=("a",)).names = ("b",)


# ---------------------------------------------------------------- start-up errors


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, match", [
    ([], r"no channels: give --channels .*--channels-from-blend"),
    (["--channels-from-blend"], r"--channels-from-blend .*needs a blend: give --data-path"),
    (["--mock-data", "--channels-from-blend", "a"], r"needs a blend"),
    (["--data-path", "--channels-from-blend"], r"needs a blend"),
    (["--valid-data-path", "/v/math", "--channels-from-blend"], r"needs a blend"),
    ([*BLEND, "--channels-from-blend", "a", "b", "c"],
     r"--channels-from-blend .*names 3 components .*the blend has 2: \['/x/math', '/x/code'\]"),
    ([*BLEND, "--channels", "math", "--channels-from-blend"],
     r"blend component 1 \('/x/code'\) is named 'code', which is not in --channels .*\['math'\]"),
    ([*BLEND, "--channels", "math", "--channels-from-blend", "math", "chat"],
     r"blend name 'chat', which is not in --channels"),
    (["--channels", "math", "code", "math"], r"--channels names 'math' twice"),
    (["--channels", "math", "chat room"], r"whitespace or '/'"),
    (["--channels", "math", "other", "--untracked-channels", "other"], r"'other' .*clashes"),
    (["--data-path", "/x/other", "--channels-from-blend", "--untracked-channels", "other"], r"'other' .*clashes"),
    (["--channels", "math", "--channel-loss-prefix", ""], r"^--channel-loss-prefix = ''"),
    (["--channels", "math", "--channel-loss-prefix", "tokens_"], r"--channel-loss-prefix .*clash with the token logs"),
    (["--channels", "math", "--channel-loss-prefix", "loss/"], r"--channel-loss-prefix .*'loss/' contains whitespace"),
])
def test_invalid_command_lines_stop_at_startup(parser, argv, match):
    with pytest.raises(ValueError, match=match):
        settings_of(parser, *argv)


# ---------------------------------------------------------------- --channel-config


@pytest.mark.timeout(30)
def test_channel_config_file(parser, tmp_path):
    path = write_yaml(tmp_path, {"channels": ["math", "code"], "channel_loss_prefix": "ch_",
                                 "channel_field": "source", "untracked_channels": "ignore"})
    s = settings_of(parser, "--channel-config", path)
    assert s == ChannelSettings(names=("math", "code"), prefix="ch_", field="source", untracked="ignore")


@pytest.mark.timeout(30)
def test_channel_config_file_combines_with_other_flags(parser, tmp_path):
    path = write_yaml(tmp_path, {"channels_from_blend": True, "untracked_channels": "other"})
    s = settings_of(parser, *BLEND, "--channel-config", path, "--channels", "code", "math")
    assert s.from_blend is True and s.channel_config().channels == ("code", "math", "other")
    assert s.blend_channel_ids(["/x/math", "/x/code"]) == [1, 0]
    path = write_yaml(tmp_path, {"channels_from_blend": ["m", "c"]}, "names.yaml")
    assert settings_of(parser, *BLEND, "--channel-config", path).names == ("m", "c")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content, extra_argv, match", [
    ({"channels": ["math"], "prefix": "x"}, [],
     r"unknown key\(s\) \['prefix'\]; known keys: \['channels', 'channel_loss_prefix'"),
    ({"channels": ["math"], "untracked_channels": "drop"}, [],
     r"untracked_channels: in --channel-config .* = 'drop'; choose one of \['error', 'other', 'ignore'\]"),
    ("- math\n- code\n", [], r"--channel-config .* must be a mapping .*got list"),
    ("", [], r"must be a mapping .*got NoneType"),
    ("channels: [math\n", [], r"is not valid YAML"),
    ({"channels": "math"}, [], r"channels: in --channel-config .* = 'math'; give a list"),
    ({"channels": ["math", "math"]}, [], r"channels: in --channel-config .* names 'math' twice"),
    ({"channels": ["math", True]}, [], r"channels: in .*\[1\] = True: a channel name must be a non-empty string"),
    ({"channels_from_blend": []}, BLEND, r"channels_from_blend: in .* empty list; write true"),
    ({"channels": ["math"]}, ["--channels", "code"],
     r"channels is given twice, as --channels and as channels: in --channel-config .*; "
     r"give each setting in one place"),
    ({"channels": ["a b"]}, [], r"whitespace or '/'"),
])
def test_invalid_channel_config_files(parser, tmp_path, content, extra_argv, match):
    path = write_yaml(tmp_path, content)
    with pytest.raises(ValueError, match=match):
        settings_of(parser, "--channel-config", path, *extra_argv)


@pytest.mark.timeout(30)
def test_missing_channel_config_file(parser, tmp_path):
    with pytest.raises(ValueError, match=r"--channel-config .*nope.yaml' cannot be read"):
        settings_of(parser, "--channel-config", str(tmp_path / "nope.yaml"))


@pytest.mark.timeout(30)
def test_example_config_loads(parser):
    s = settings_of(parser, "--channel-config", str(EXAMPLE_YAML))
    assert s == ChannelSettings(names=("math", "code", "chat"), untracked="other")
    assert s.channel_config().metric_keys() == ["loss_math", "loss_code", "loss_chat", "loss_other"]
    assert s.channel_id("web") == 3


# ---------------------------------------------------------------- Megatron --yaml-cfg


@pytest.mark.timeout(30)
def test_yaml_cfg_top_level_keys(tmp_path):
    path = write_yaml(tmp_path, {"data_path": "0.3 /x/math 0.7 /x/code", "micro_batch_size": 2,
                                 "channels_from_blend": True, "untracked_channels": "ignore"})
    s = channel_settings_from_args(load_yaml(path))
    assert s.names == ("math", "code") and s.untracked == "ignore"


@pytest.mark.timeout(30)
def test_yaml_cfg_section_and_top_level_channel_config(tmp_path):
    channel_file = write_yaml(tmp_path, {"channel_field": "source"}, "channel.yaml")
    path = write_yaml(tmp_path, {"data_path": [0.3, "/x/math", 0.7, "/x/code"],
                                 "channel_config": channel_file,
                                 "channel_loss": {"channels": ["code", "math"], "channels_from_blend": True}},
                      "megatron.yaml")
    s = channel_settings_from_args(load_yaml(path))
    assert (s.names, s.field) == (("code", "math"), "source")
    assert s.blend_channel_ids(["/x/math", "/x/code"]) == [1, 0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content, match", [
    ({"channels": ["a"], "channel_loss": {"channels": ["b"]}},
     r"channels is given twice, as channels: in the top level of --yaml-cfg .* and as channels: in "
     r"section channel_loss:"),
    ({"channel_loss": {"channels": ["a"], "prefix": "x"}},
     r"section channel_loss: of --yaml-cfg .*unknown key\(s\) \['prefix'\]; known keys"),
    ({"channel_loss": ["a", "b"]}, r"section channel_loss: .* must be a mapping .*got list"),
    ({"channels": ["a"], "channel_prefix": "x"}, r"unknown top-level key\(s\) \['channel_prefix'\]"),
    ({"channels": ["a"], "untracked_channel": "other"}, r"unknown top-level key\(s\) \['untracked_channel'\]"),
    ({"channel_loss": {"channels": ["a"], "untracked_channels": "skip"}},
     r"untracked_channels: in section channel_loss: .* = 'skip'"),
    ({"micro_batch_size": 2}, r"no channels"),
])
def test_invalid_yaml_cfg(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        channel_settings_from_args(load_yaml(write_yaml(tmp_path, content)))


def _minimal_megatron_yaml() -> dict:
    """The keys Megatron 0.19's validate_yaml reads, for a 1-rank GPT; nothing channel-related."""
    return dict(
        model_parallel=dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                            context_parallel_size=1, expert_model_parallel_size=1, tp_comm_overlap=False,
                            sequence_parallel=False, fp16=False, bf16=True),
        language_model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=None,
                            kv_channels=None, activation_func="gelu", fp32_residual_connection=False,
                            moe_grouped_gemm=False, distribute_saved_activations=False,
                            recompute_granularity=None, num_moe_experts=None),
        account_for_embedding_in_pipeline_split=False, micro_batch_size=2, global_batch_size=None,
        step_batch_size_schedule=None, num_layers_per_virtual_pipeline_stage=None,
        overlap_param_gather=False, accumulate_allreduce_grads_in_fp32=False, dataloader_type=None,
        train_iters=10, train_samples=None, lr_decay_samples=None, lr_warmup_samples=0,
        lr_warmup_fraction=None, lr_warmup_iters=0, encoder_num_layers=None, seq_length=32,
        encoder_seq_length=None, max_position_embeddings=32, decoder_seq_length=None, lr=1e-3,
        min_lr=0.0, save=None, fp16_lm_cross_entropy=False, weight_decay_incr_style="constant",
        start_weight_decay=None, end_weight_decay=None, weight_decay=0.0,
    )


@pytest.mark.timeout(30)
def test_channel_keys_survive_megatron_validate_yaml(tmp_path):
    # validate_yaml never rejects unknown keys; both forms reach us after it.
    content = _minimal_megatron_yaml() | {
        "data_path": "0.3 /x/math 0.7 /x/code",
        "untracked_channels": "other",
        "channel_loss": {"channels_from_blend": True, "channel_loss_prefix": "ch_"},
    }
    args = load_yaml(write_yaml(tmp_path, content))
    args.rank, args.world_size = 0, 1  # as Megatron's parse_args sets them after load_yaml
    args = validate_yaml(args, {})
    s = channel_settings_from_args(args)
    assert s.channel_config().metric_keys() == ["ch_math", "ch_code", "ch_other"]


# ---------------------------------------------------------------- packed rows


@pytest.mark.timeout(30)
def test_max_packed_sequences_per_row_flag_sets_the_layout(parser):
    from megatron_channel.step.layout import DEFAULT_MAX_SEQUENCES_PER_ROW, BatchLayout

    base = ["--channels", "math", "--seq-length", "4096", "--micro-batch-size", "2", "--sft"]
    assert parser.parse_args(base).max_packed_sequences_per_row == DEFAULT_MAX_SEQUENCES_PER_ROW
    args = parser.parse_args([*base, "--max-packed-sequences-per-row", "64", "--max-packed-sequences-per-row", "32"])
    settings_of(parser, *base, "--max-packed-sequences-per-row", "32")
    layout = BatchLayout.from_megatron_args(args)
    assert layout.max_sequences_per_row == 32  # Megatron's habit: the last one wins
    assert layout.sequence_capacity == 64 and layout.shapes()["cu_seqlens"] == (65,)
    with pytest.raises(ValueError, match=r"--max-packed-sequences-per-row 0: give a positive number"):
        settings_of(parser, *base, "--max-packed-sequences-per-row", "0")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, match", [
    (["--sft", "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"],
     r"--sft with --pipeline-model-parallel-size 2 needs --micro-batch-size 1 \(and --eval-micro-batch-size 1\), got 2"),
    (["--dataloader-inter-document-masking", "--pipeline-model-parallel-size", "4", "--micro-batch-size", "1",
      "--eval-micro-batch-size", "4"],
     r"--dataloader-inter-document-masking with --pipeline-model-parallel-size 4 needs --micro-batch-size 1"),
    (["--dataloader-inter-document-masking", "--context-parallel-size", "2"],
     r"--dataloader-inter-document-masking with --context-parallel-size 2: document boundaries are not "
     r"multiples of 2 \* context_parallel_size = 4.*drop --dataloader-inter-document-masking"),
])
def test_packed_rows_refuse_what_they_cannot_train_with_at_start_up(parser, argv, match):
    with pytest.raises(ValueError, match=match):
        settings_of(parser, "--channels", "math", *argv)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [
    ["--sft", "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"],
    ["--sft", "--context-parallel-size", "2", "--micro-batch-size", "4"],
    ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "4", "--context-parallel-size", "2"],
])
def test_packed_rows_accept_what_they_can_train_with(parser, argv):
    settings_of(parser, "--channels", "math", *argv)


@pytest.mark.timeout(30)
def test_each_setting_is_declared_once_for_its_flag_yaml_key_default_and_readme_row(parser):
    """``SETTINGS`` gives the flags the parser has, the YAML keys a channel file takes, the
    defaults the resolved settings get, and the README's flags-table rows, word for word."""
    import os

    from megatron_channel.settings import DEFAULTS, SETTING_KEYS, SETTINGS, flags_table_row

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    flags = {option for action in parser._actions for option in action.option_strings}
    for setting in SETTINGS:
        assert setting.flag in flags and setting.key in SETTING_KEYS
        assert flags_table_row(setting) in readme.splitlines(), f"README's row of {setting.flag} is not its declaration's"
    resolved = settings_of(parser, "--channels", "math")
    assert (resolved.prefix, resolved.accuracy_name, resolved.field, resolved.untracked, resolved.token_accuracy) == (
        DEFAULTS["channel_loss_prefix"], DEFAULTS["channel_accuracy_name"], DEFAULTS["channel_field"],
        DEFAULTS["untracked_channels"], DEFAULTS["channel_token_accuracy"])
