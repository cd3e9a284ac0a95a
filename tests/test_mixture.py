"""The channel mixture without a launch: the scheduled blend against Megatron's own
``BlendedDataset`` and data loader, the policies on synthetic curves, the start-up checks."""

from __future__ import annotations

import argparse
import math
import threading

import numpy as np
import pytest
import torch

from megatron_channel.data.scheduled_blend import MixtureSchedule, ScheduledBlendedDataset, greedy_counts
from megatron_channel.mixture.controller import MixtureController
from megatron_channel.mixture.policies import learning_progress, target_loss, with_floor
from megatron_channel.mixture.settings import MixtureSettings

pytestmark = pytest.mark.timeout(120)


class Component:
    """A stand-in component of a known length whose samples name themselves."""

    def __init__(self, index: int, length: int = 100_000):
        self.index, self.length, self.index_split = index, length, "train"

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {"sample": (self.index, i)}


@pytest.fixture(scope="module")
def megatron_blend(data_dir):
    """Megatron's own BlendedDataset over the tiny indexed datasets (copy, count, noise)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=64)
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=32, split="100,0,0", tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=f"{data_dir}/cache",
        blend=get_blend_from_list(["0.25", f"{data_dir}/copy", "0.35", f"{data_dir}/count", "0.4", f"{data_dir}/noise"]))
    train, _, _ = BlendedMegatronDatasetBuilder(cls=GPTDataset, sizes=[500, 0, 0], is_built_on_rank=lambda: True,
                                                config=config).build()
    return train


def test_one_row_is_megatron_blended_dataset_bitwise(megatron_blend):
    schedule = MixtureSchedule(megatron_blend.weights, capacity=2, horizon=megatron_blend.size)
    scheduled = ScheduledBlendedDataset(megatron_blend.datasets, schedule, megatron_blend.size)
    for idx in range(megatron_blend.size):
        assert scheduled.locate(idx) == (int(megatron_blend.dataset_index[idx]),
                                         int(megatron_blend.dataset_sample_index[idx])), idx
    for idx in (0, 7, 499):
        ours, stock = scheduled[idx], megatron_blend[idx]
        assert ours.keys() == stock.keys() and all(torch.equal(torch.as_tensor(ours[k]), torch.as_tensor(stock[k]))
                                                   for k in ours)


def test_rows_take_each_component_in_order_with_the_row_weights():
    schedule = MixtureSchedule([0.25, 0.35, 0.4], capacity=4)
    schedule.publish_through(400)
    schedule.append(400, [0.8, 0.1, 0.1])
    schedule.publish_through(1000)
    schedule.append(1000, [0.1, 0.1, 0.8])
    schedule.publish_through(2000)
    dataset = ScheduledBlendedDataset([Component(i) for i in range(3)], schedule, 2000)
    taken: dict[int, list[int]] = {0: [], 1: [], 2: []}
    per_row = np.zeros((3, 3))
    for idx in range(2000):
        component, sample = dataset.locate(idx)
        taken[component].append(sample)
        per_row[0 if idx < 400 else 1 if idx < 1000 else 2, component] += 1
    assert all(samples == list(range(len(samples))) for samples in taken.values())  # in order, none twice
    for row, (length, weights) in enumerate([(400, [0.25, 0.35, 0.4]), (600, [0.8, 0.1, 0.1]),
                                             (1000, [0.1, 0.1, 0.8])]):
        assert np.all(np.abs(per_row[row] - length * np.array(weights)) <= 1), (row, per_row[row])


def test_a_row_cannot_change_decided_samples():
    schedule = MixtureSchedule([0.5, 0.5], capacity=4)
    schedule.publish_through(100)
    with pytest.raises(ValueError, match=r"row from sample 50 would change samples already decided"):
        schedule.append(50, [0.9, 0.1])


def test_a_component_asked_for_more_than_it_holds_wraps_around():
    schedule = MixtureSchedule([0.5, 0.5], capacity=2, horizon=40)
    dataset = ScheduledBlendedDataset([Component(0, length=10), Component(1)], schedule, 100)
    assert [dataset.locate(i) for i in range(40) if dataset.locate(i)[0] == 0][10] == (0, 0)
    assert schedule.passed_end([10, 100]) == []
    schedule.append(40, [0.5, 0.5])
    assert schedule.passed_end([10, 100]) == [0]  # the owner learns it when the next row starts


def test_the_training_process_never_waits_for_the_horizon():
    schedule = MixtureSchedule([0.5, 0.5], capacity=2, horizon=8)
    dataset = ScheduledBlendedDataset([Component(0), Component(1)], schedule, 100)
    with pytest.raises(RuntimeError, match=r"sample 8 is past the mixture horizon 8"):
        dataset.locate(8)


def test_long_rows_are_stored_compactly_and_read_like_megatron():
    from megatron_channel.data.scheduled_blend import GreedyPrefix, greedy_indices

    weights = np.array([0.2, 0.3, 0.5])
    component, sample = greedy_indices(weights, 20_000)
    prefix = GreedyPrefix(weights, 20_000)
    assert prefix.component.dtype == np.int8
    for position in (0, 1, 4095, 4096, 4097, 12_345, 19_999):
        assert prefix.at(position) == (component[position], sample[position])


def loader_stream(dataset, num_workers: int, schedule: MixtureSchedule, *, gbs: int, iterations: int,
                  lag: int, rows: dict[int, list[float]]) -> list:
    """Megatron's sampler and data loader over ``dataset``; the main thread plays the training loop:
    after iteration t it appends the row decided then (from sample (t + lag) gbs) and raises the horizon."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    sampler = MegatronPretrainingSampler(total_samples=len(dataset), consumed_samples=0, micro_batch_size=gbs,
                                         data_parallel_rank=0, data_parallel_size=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=num_workers > 0,
                                         collate_fn=lambda batch: [s["sample"] for s in batch])
    stream, iterator = [], iter(loader)
    for t in range(1, iterations + 1):
        stream.append(next(iterator))
        if t in rows:
            schedule.append((t + lag) * gbs, rows[t])
        schedule.publish_through((t + lag) * gbs)
    return stream


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_loader_workers_see_the_same_samples_as_the_pure_mapping(num_workers):
    gbs, lag, rows = 8, 2, {3: [0.7, 0.2, 0.1], 6: [0.1, 0.1, 0.8]}
    schedule = MixtureSchedule([1 / 3, 1 / 3, 1 / 3], capacity=4, horizon=lag * gbs)
    dataset = ScheduledBlendedDataset([Component(i) for i in range(3)], schedule, 12 * gbs)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(
        loader_stream(dataset, num_workers, schedule, gbs=gbs, iterations=12, lag=lag, rows=rows)))
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the loader waited forever on the horizon"
    reference = MixtureSchedule([1 / 3, 1 / 3, 1 / 3], capacity=4)
    for t, weights in rows.items():
        reference.publish_through((t + lag) * gbs)
        reference.append((t + lag) * gbs, weights)
    reference.publish_through(12 * gbs)
    pure = ScheduledBlendedDataset([Component(i) for i in range(3)], reference, 12 * gbs)
    assert [s for batch in result[0] for s in batch] == [pure[i]["sample"] for i in range(12 * gbs)]


def test_learning_progress_starves_the_channel_that_learns_nothing():
    tokens = np.arange(1, 6) * 1000.0
    histories = [[(t, 2.0 - 1e-4 * t) for t in tokens],  # learns
                 [(t, 4.3 + 0.01 * (-1) ** i) for i, t in enumerate(tokens)],  # noise: flat, highest loss
                 [(t, 1.0 - 2e-5 * t) for t in tokens]]  # learns slowly
    weights, progress = learning_progress(histories, np.array([1 / 3] * 3), min_share=0.05, step=1.0)
    assert progress[1] == 0.0 and weights[1] == pytest.approx(0.05)
    assert weights[0] > weights[2] > weights[1] and weights.sum() == pytest.approx(1.0)


def test_target_loss_moves_weight_to_channels_above_their_target():
    current = np.array([0.25, 0.35, 0.4])
    weights, excess = target_loss([3.0, 0.5, 4.3], [1.0, 1.0, math.log(63)], current, eta=1.0, min_share=0.05)
    assert excess.tolist() == pytest.approx([2.0, 0.0, 4.3 - math.log(63)])
    assert weights[0] > current[0] and weights.sum() == pytest.approx(1.0) and weights.min() >= 0.05


def test_the_floor_keeps_every_channel():
    assert with_floor(np.array([1.0, 0.0, 0.0]), 0.1).tolist() == pytest.approx([0.8, 0.1, 0.1])


def test_controller_state_round_trips():
    settings = MixtureSettings(policy="learning-progress", apply=True, signal="train")
    controller = MixtureController(settings, [0.25, 0.35, 0.4])
    for i in range(3):
        controller.add_train_totals([[10.0 - i, 4], [6.0, 4], [17.0, 4], [33.0, 12]])
        controller.decide()
    copy = MixtureController(settings, [0.25, 0.35, 0.4])
    copy.load_state_dict(controller.state_dict())
    assert copy.state_dict() == controller.state_dict()
    controller.add_train_totals([[6.0, 4], [6.0, 4], [17.0, 4], [29.0, 12]])
    copy.add_train_totals([[6.0, 4], [6.0, 4], [17.0, 4], [29.0, 12]])
    assert np.array_equal(controller.decide()[0], copy.decide()[0])


BLEND = ["--data-path", "0.3", "/x/math", "0.7", "/x/code", "--channels-from-blend"]


@pytest.fixture(scope="module")
def parser():
    from megatron.training.arguments import add_megatron_arguments

    from megatron_channel.launch.pretrain_gpt import add_launch_args

    return add_launch_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def mixture_of(parser, *argv):
    from megatron_channel.launch.pretrain_gpt import mixture_runtime
    from megatron_channel.settings import channel_settings_from_args

    args = parser.parse_args(["--global-batch-size", "8", "--eval-interval", "10", "--eval-iters", "2", *argv])
    return mixture_runtime(args, channel_settings_from_args(args))


@pytest.mark.parametrize("argv, match", [
    ([*BLEND, "--channel-mixture", "target-loss", "--channel-target-loss", "web=1.0"],
     r"--channel-target-loss 'web=1.0': 'web' is not a channel; channels: \['math', 'code'\]"),
    ([*BLEND, "--channel-mixture", "learning-progress", "--channel-mixture-min-share", "0.6"],
     r"--channel-mixture-min-share 0.6 x 2 channels = 1.2 > 1"),
    (["--data-path", "/x/math", "--channels-from-blend", "--channel-mixture", "learning-progress"],
     r"--channel-mixture: the blend has a single component \(/x/math\); there is nothing to mix"),
    (["--channels", "math", "code", "--channel-mixture", "learning-progress"],
     r"--channel-mixture steers the blend's components, so it needs a blend whose components are channels"),
    ([*BLEND, "--channel-mixture", "target-loss"], r"needs --channel-target-loss NAME=LOSS"),
    ([*BLEND, "--channel-mixture", "schedule"], r"needs --channel-mixture-schedule FILE.yaml"),
    ([*BLEND, "--channel-mixture", "learning-progress", "--channel-mixture-advice", "learning-progress"],
     r"both given; give one"),
    ([*BLEND, "--channel-mixture", "learning-progress", "--dataloader-type", "cyclic"],
     r"--dataloader-type must be single"),
    ([*BLEND, "--channel-mixture", "learning-progress", "--eval-iters", "0"],
     r"--channel-mixture-signal validation \(the default\) needs validation"),
    (["--data-path", "/x/math", "/x/code", "--channels-from-blend", "--channel-mixture", "learning-progress"],
     r"give them in --data-path \(W1 P1 W2 P2 ...\)"),
])
def test_bad_mixture_flags_stop_at_start_up(parser, argv, match):
    with pytest.raises(ValueError, match=match):
        mixture_of(parser, *argv)


def test_a_schedule_row_that_does_not_sum_to_one_is_refused(parser, tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text("rows:\n- {from_iteration: 0, weights: {math: 0.5, code: 0.5}}\n"
                    "- {from_iteration: 100, weights: {math: 0.5, code: 0.6}}\n")
    with pytest.raises(ValueError, match=r"schedule.yaml: row 1 weights .* sum to 1.1; they must be non-negative "
                                         r"and sum to 1"):
        mixture_of(parser, *BLEND, "--channel-mixture", "schedule", "--channel-mixture-schedule", str(path))


def test_two_components_of_one_channel_cannot_be_steered(parser):
    with pytest.raises(ValueError, match=r"needs one blend component per channel"):
        mixture_of(parser, "--data-path", "0.5", "/x/a", "0.5", "/y/a", "--channels-from-blend",
                   "--channel-mixture", "learning-progress")


def test_the_default_floor_is_measured_and_fits_many_channels(parser):
    from megatron_channel.mixture.settings import default_min_share

    assert default_min_share(3) == 0.15 and default_min_share(10) == 0.05
    assert mixture_of(parser, *BLEND, "--channel-mixture", "learning-progress").settings.min_share == 0.15
