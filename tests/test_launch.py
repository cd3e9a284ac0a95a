"""The launch script's wiring: what ``pretrain()`` is handed.

``megatron_channel.launch.pretrain_gpt.main`` parses real Megatron + channel arguments (Megatron's
``parse_and_validate_args``, with ``--cpu``), installs the channel logging and hands
``pretrain`` the config container, our datasets provider and our forward_step. Here
``pretrain`` is replaced by a recorder so that what it receives can be inspected and used
piece by piece: the provider builds the blend from real ``.bin/.idx`` files, and one of its
batches goes through the forward_step and a real GPTModel. The real ``pretrain()`` runs in
test_pretrain_e2e.py. Each case runs in a fresh process (Megatron's global args and the
``--cpu`` layer are process state).
"""

import os
import sys

import pytest
import torch

from megatron_testing import run_distributed

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def write_blend(data_dir):
    sys.path.insert(0, SCRIPTS)
    import make_tiny_data

    for seed, channel in enumerate(make_tiny_data.CHANNELS):
        make_tiny_data.write_documents(os.path.join(data_dir, channel), channel, count=40, seed=seed)
    return make_tiny_data


def megatron_argv(data_dir, *channel_flags):
    return [
        "--cpu", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
        "--transformer-impl", "local", "--position-embedding-type", "learned_absolute",
        "--data-path", "0.2", f"{data_dir}/copy", "0.3", f"{data_dir}/count", "0.5", f"{data_dir}/noise",
        "--split", "90,10,0", "--data-cache-path", f"{data_dir}/cache", *channel_flags,
    ]


def pretrain_arguments(args, kwargs):
    """(config container, datasets provider, model type, forward_step) of a 0.19 ``pretrain()`` call."""
    import inspect

    from megatron.training.training import pretrain

    bound = inspect.signature(pretrain).bind(*args, **kwargs).arguments
    return (bound["cfg_container"], bound["train_valid_test_dataset_provider"], bound["model_type"],
            bound["forward_step_func"])


def _launch_worker(rank, world_size, data_dir):
    import megatron.training

    from megatron_channel.launch import pretrain_gpt as launch
    from megatron_channel import uninstall_channel_logging
    from megatron_channel.channel_logging.install import installed_channel_logging
    from megatron_testing import init_parallel, tiny_gpt

    demo = write_blend(data_dir)
    recorded = []
    megatron.training.pretrain = lambda *args, **kwargs: recorded.append(pretrain_arguments(args, kwargs))
    launch.finish_run = lambda: None  # the group is used after main() returns
    launch.main(megatron_argv(data_dir, "--channels-from-blend", "easy", "easy", "hard",
                              "--tensorboard-dir", f"{data_dir}/tb"))
    container, provider, model_type, forward_step = recorded[0]
    logger = installed_channel_logging()
    assert logger is not None and logger.config.metric_keys() == ["loss_easy", "loss_hard"]
    assert logger.jsonl_path == f"{data_dir}/tb/channels.jsonl"

    init_parallel(tp=1)
    train, valid, test = provider([40, 8, 0])
    assert test is None
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))
    model = tiny_gpt(vocab_size=64, seq_length=32)
    output, loss_func = forward_step(iter([batch]), model)
    loss, num_tokens, metrics = loss_func(output)

    # Independent check: a row's channel from its token values (copy/count are 'easy').
    expected = [demo.CHANNELS.index(demo_guess(row)) for row in batch["tokens"]]
    uninstall_channel_logging()
    return dict(
        channels=batch["channels"].tolist(), expected_components=expected,
        keys=list(metrics), counts={k: float(v[1]) for k, v in metrics.items()},
        model_config=type(container.model).__name__, model_type=str(model_type),
        valid_len=len(valid),
    )


def demo_guess(row):
    """copy rows repeat a motif, count rows step by +1 mod 63, noise rows do neither."""
    row = [int(t) for t in row if int(t) != 63]
    steps = sum((b - a) % 63 == 1 for a, b in zip(row, row[1:]))
    if steps >= 0.8 * (len(row) - 1):
        return "count"
    for period in range(3, 9):
        if all(row[i] == row[i + period] for i in range(len(row) - period)):
            return "copy"
    return "noise"


@pytest.mark.timeout(120)
def test_main_wires_args_logging_provider_and_forward_step(tmp_path):
    result = run_distributed(_launch_worker, 1, str(tmp_path), timeout=100)[0]
    assert result["model_config"] == "GPTModelConfig"
    assert "encoder_or_decoder" in result["model_type"]
    assert result["valid_len"] > 0
    component_channel = {0: 0, 1: 0, 2: 1}  # copy, count -> easy; noise -> hard
    assert result["channels"] == [component_channel[c] for c in result["expected_components"]]
    assert result["keys"] == ["lm loss", "loss_easy", "loss_hard"]
    assert result["counts"]["loss_easy"] + result["counts"]["loss_hard"] == result["counts"]["lm loss"]


def _bad_flags_worker(rank, world_size, data_dir, flags):
    import megatron.training

    from megatron_channel.launch import pretrain_gpt as launch

    write_blend(data_dir)
    megatron.training.pretrain = lambda *args, **kwargs: pytest.fail("pretrain must not start")
    launch.finish_run = lambda: None  # the group is used after main() returns
    try:
        launch.main(megatron_argv(data_dir, *flags))
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags, match",
    [
        ((), "no channels"),
        (("--channels-from-blend", "a", "b"), "but the blend has 3"),
        (("--channels", "math", "--channels-from-blend", "copy", "count", "noise"), "which is not in --channels"),
        (("--channels", "copy", "count", "noise"), "carry no channel field, so with --untracked-channels error"),
    ],
)
def test_bad_channel_flags_stop_before_pretrain(tmp_path, flags, match):
    message = run_distributed(_bad_flags_worker, 1, str(tmp_path), flags, timeout=100)[0]
    assert message is not None and match in message, message


def _stock_worker(rank, world_size, data_dir):
    import megatron.training

    from megatron_channel.launch import pretrain_gpt as launch
    from megatron_channel.channel_logging.install import installed_channel_logging
    from megatron_testing import init_parallel, tiny_gpt

    write_blend(data_dir)
    recorded = []
    megatron.training.pretrain = lambda *args, **kwargs: recorded.append(pretrain_arguments(args, kwargs))
    launch.finish_run = lambda: None  # the group is used after main() returns
    launch.main(megatron_argv(data_dir, "--channels-from-blend", "--disable-channel-loss"))
    _, provider, _, forward_step = recorded[0]
    init_parallel(tp=1)
    batch = next(iter(torch.utils.data.DataLoader(provider([8, 4, 0])[0], batch_size=2)))
    output, loss_func = forward_step(iter([batch]), tiny_gpt(vocab_size=64, seq_length=32))
    loss, num_tokens, metrics = loss_func(output)
    expected = torch.sum(output.view(-1).float() * batch["loss_mask"].view(-1).float())
    return dict(keys=list(metrics), logging=installed_channel_logging() is not None,
                equal=bool(torch.equal(loss, expected)), tokens=int(num_tokens))


@pytest.mark.timeout(120)
def test_disable_channel_loss_gives_the_stock_loss_for_ab_timing(tmp_path):
    result = run_distributed(_stock_worker, 1, str(tmp_path), timeout=100)[0]
    assert result == dict(keys=["lm loss"], logging=False, equal=True, tokens=64)
