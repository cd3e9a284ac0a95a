"""``megatron_channel.bridge`` without a launch: its checks of Bridge, the blend tables, the
settings. Runs in the Megatron-Bridge environment (``scripts/test.sh``)."""

from __future__ import annotations

import functools

import pytest
import torch

pytestmark = [pytest.mark.timeout(120), pytest.mark.bridge]


@pytest.fixture(scope="module")
def bridge():
    from megatron_channel.cpu.bridge_on_cpu import install_bridge_on_cpu

    install_bridge_on_cpu()
    import megatron_channel.bridge as bridge

    return bridge


def test_installed_bridge_passes_the_checks(bridge):
    bridge.check_bridge_internals.cache_clear()
    bridge.check_bridge_internals()


def test_a_missing_callback_event_names_the_bridge_version(bridge, monkeypatch):
    from megatron.bridge.training import callbacks

    monkeypatch.setattr(callbacks, "VALID_EVENTS", callbacks.VALID_EVENTS - {"on_eval_end"})
    bridge.check_bridge_internals.cache_clear()
    with pytest.raises(bridge.BridgeInternalsError, match=r"megatron-bridge 0\.6\.\d+: the callback events "
                                                          r"\['on_eval_end'\] are gone"):
        bridge.check_bridge_internals()
    bridge.check_bridge_internals.cache_clear()


def test_an_unknown_loss_function_is_refused_by_name(bridge):
    from megatron_channel.bridge.internals import loss_mask_of

    def my_kd_loss(loss_mask, output_tensor):
        return output_tensor

    with pytest.raises(bridge.BridgeInternalsError, match=r"'test_an_unknown_loss_function_is_refused_by_name"
                                                          r".<locals>.my_kd_loss'.*masked_next_token_loss"):
        loss_mask_of(functools.partial(my_kd_loss, torch.ones(2)))
    from megatron.bridge.training.losses import masked_next_token_loss

    mask = torch.ones(2, 3)
    assert loss_mask_of(functools.partial(masked_next_token_loss, mask, check_for_nan_in_loss=False)) is mask


def dataset_config(**blends):
    from types import SimpleNamespace

    return SimpleNamespace(blend=blends.get("blend"), blend_per_split=blends.get("per_split"))


def test_blend_tables_map_each_split_by_its_own_blend(bridge):
    from megatron_channel import ChannelSettings
    from megatron_channel.bridge.forward_step import blend_tables

    settings = ChannelSettings(names=("math", "code", "chat"), from_blend=True)
    tables = blend_tables(settings, dataset_config(per_split=[
        (["/d/code", "/d/math", "/d/chat"], None), (["/v/chat"], None), None]))
    assert tables["train"].tolist() == [1, 0, 2]
    assert tables["validation"].tolist() == [2]
    assert tables["test"] is None
    with pytest.raises(ValueError, match=r"blend component 0 \('/v/web'\) is named 'web', which is not in --channels"):
        blend_tables(settings, dataset_config(blend=(["/v/web"], None)))


def test_a_batch_gets_its_channels_from_the_field_or_the_blend(bridge):
    from megatron_channel import ChannelBatchError, ChannelSettings

    step = bridge.ChannelForwardStep(ChannelSettings(names=("math", "code"), from_blend=("code", "math")))
    step.tables = {"train": torch.tensor([1, 0]), "validation": torch.tensor([0]), "test": None}
    assert step.channels_of({"dataset_id": torch.tensor([0, 1, 1])}, "train").tolist() == [1, 0, 0]
    assert step.channels_of({"tokens": torch.zeros(3, 8)}, "validation").tolist() == [0, 0, 0]
    assert step.channels_of({"channels": torch.tensor([1, -1])}, "test").tolist() == [1, -1]
    with pytest.raises(ChannelBatchError, match=r"channels holds id 2"):
        step.channels_of({"channels": torch.tensor([2])}, "train")
    with pytest.raises(ChannelBatchError, match=r"the test batch has neither 'channels' nor 'dataset_id'"):
        step.channels_of({"tokens": torch.zeros(3, 8)}, "test")


def test_settings_come_from_the_channel_flags_and_bridge_blend(bridge):
    from types import SimpleNamespace

    cfg = SimpleNamespace(dataset=SimpleNamespace(data_path=["0.3", "/d/math_text_document", "0.7", "/d/code.jsonl"]))
    settings = bridge.channel_settings_for_bridge(cfg, {"channels_from_blend": True}, untracked_channels="other")
    assert settings.names == ("math_text_document", "code")
    assert settings.channel_config().channels == ("math_text_document", "code", "other")
    with pytest.raises(ValueError, match=r"\['untracked_channels'\] are given twice"):
        bridge.channel_settings_for_bridge(cfg, {"untracked_channels": "other"}, untracked_channels="ignore")
    with pytest.raises(ValueError, match=r"no channels: give --channels"):
        bridge.channel_settings_for_bridge(cfg, {})


class Recorder:
    """Bridge's TensorBoard writer and W&B run, as the callback uses them."""

    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.logged: list[tuple[dict, int]] = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def log(self, values, step=None):
        self.logged.append((dict(values), step))


@pytest.fixture
def two_microbatches(megatron_cpu):
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    init_num_microbatches_calculator(0, None, 2, 1, 1)
    yield
    destroy_num_microbatches_calculator()


def test_the_callback_writes_token_weighted_windows_to_bridge_loggers(bridge, two_microbatches, tmp_path):
    from types import SimpleNamespace

    from megatron.bridge.training.callbacks import CallbackContext

    from megatron_channel import ChannelSettings
    from megatron_channel.channel_logging.jsonl_schema import read_jsonl

    step = bridge.ChannelForwardStep(ChannelSettings(names=("math", "code")))
    callback = bridge.ChannelCallback(step, jsonl_path=str(tmp_path / "channels.jsonl"))
    writer, wandb = Recorder(), Recorder()
    logger = SimpleNamespace(log_interval=2, tensorboard_log_interval=1, tensorboard_dir=None)
    state = SimpleNamespace(
        cfg=SimpleNamespace(logger=logger, model=SimpleNamespace(), dataset=SimpleNamespace(),
                            train=SimpleNamespace(micro_batch_size=1)),
        train_state=SimpleNamespace(step=0, consumed_train_samples=0), tensorboard_logger=writer, wandb_logger=wandb)
    context = CallbackContext(state=state, model=[])
    try:
        callback.on_train_start(context)
        # Two iterations of two microbatches: rows are (math, code, lm loss) x (loss sum, tokens).
        iterations = [
            [torch.tensor([[2.0, 1.0], [0.0, 0.0], [2.0, 1.0]]), torch.tensor([[3.0, 2.0], [1.0, 1.0], [4.0, 3.0]])],
            [torch.tensor([[0.0, 0.0], [6.0, 2.0], [6.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])],
        ]
        for i, rows in enumerate(iterations):
            callback.on_train_step_start(context)
            step.captured.extend(rows)
            context.loss_dict, context.skipped_iter = {"lm loss": torch.tensor(1.0)}, False
            callback.on_train_step_end(context)
            state.train_state.step += 1
            state.train_state.consumed_train_samples += 2
    finally:
        callback.close()
    # TensorBoard and W&B: every iteration (tensorboard_log_interval 1), token-weighted.
    first = {name: value for name, value, it in writer.scalars if it == 1}
    assert first["loss_math"] == pytest.approx(5.0 / 3) and first["loss_code"] == 1.0
    assert ("loss_math vs samples", pytest.approx(5.0 / 3), 2) in writer.scalars
    assert [step for _, step in wandb.logged] == [1, 2]
    assert wandb.logged[1][0]["loss_code"] == 3.0 and wandb.logged[1][0]["tokens_math cumulative"] == 4.0
    # The jsonl: one record at the console interval, over both iterations.
    (record,) = read_jsonl(str(tmp_path / "channels.jsonl"))
    assert record.iteration == 2 and record.iterations_in_window == 2 and record.consumed_samples == 4
    assert record.channels["math"].loss == pytest.approx(6.0 / 4) and record.channels["code"].loss == pytest.approx(7.0 / 3)
    assert record.lm_loss_token_weighted == pytest.approx(13.0 / 7)
