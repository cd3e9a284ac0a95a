"""Bad input fails early with an error that names the field and the fix.

Covers the loss function's host-side checks (CPU tensors) and the forward_step's checks on
the batch read from the data iterator, which run before any broadcast could hang.
"""

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_channel import BatchLayout, ChannelBatchError, ChannelConfig, channel_loss_func, make_forward_step
from megatron_testing import block_causal_mask, tiny_gpt

CONFIG = ChannelConfig(["math", "code", "chat"])
S = 16


def packed(cu):
    cu = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)


def loss_call(channels, *, rows=2, cu=None, cp_size=1, tokens=None):
    tokens = tokens or (S if cu is not None else rows * S)
    shape = (1, tokens) if cu is not None else (rows, S)
    return channel_loss_func(
        torch.rand(shape), loss_mask=torch.ones(shape), channels=channels, config=CONFIG,
        packed_seq_params=None if cu is None else packed(cu), cp_size=cp_size,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=torch.tensor([0, 3])), r"channels holds id 3.*0\.\.2, and -1"),
        (dict(channels=torch.tensor([0, -2])), r"channels holds id -2"),
        (dict(channels=torch.tensor([0.0, 1.0])), r"channels must be an integer tensor, got dtype torch.float32"),
        (dict(channels=torch.tensor([True, False])), r"channels must be an integer tensor"),
        (dict(channels=[0, 1]), r"channels must be a torch integer tensor, got list"),
        (dict(channels=torch.tensor([0, 1, 2])), r"channels has shape \[3\] but the batch has 2 rows"),
        (dict(channels=torch.tensor([0, 1, 2]), cu=[0, 4, 9, 16, 16]), r"channels has 3 entries but cu_seqlens describes 4"),
        (dict(channels=torch.tensor([0, 1, 2]), cu=[0, 9, 4, 16]), r"cu_seqlens decreases at entry 2 \(9 -> 4\)"),
        (dict(channels=torch.tensor([0, 1, 2]), cu=[0, 4, 9, 17]), r"cu_seqlens runs to 17, past the row's 16 tokens"),
        (dict(channels=torch.tensor([0, 1, 2]), cu=[2, 4, 9, 16]), r"cu_seqlens starts at 2"),
        (dict(channels=torch.tensor([0, 1]), cu=torch.tensor([0.0, 4.0, 16.0])), r"cu_seqlens must be an integer tensor"),
        (dict(channels=torch.tensor([0, 1]), cu=[0, 6, 16], cp_size=2, tokens=8), r"cu_seqlens\[1\] = 6 is not a multiple of 2 \* context_parallel_size = 4"),
        (dict(channels=torch.tensor([0, 1]), cu=[0, 8, 12], cp_size=2, tokens=8), r"cu_seqlens ends at 12 but the row has 16 tokens"),
    ],
)
def test_loss_func_rejects_bad_input(kwargs, match):
    cu = kwargs.pop("cu", None)
    if isinstance(cu, torch.Tensor):
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu)
        with pytest.raises(ChannelBatchError, match=match):
            channel_loss_func(torch.rand(1, S), loss_mask=torch.ones(1, S), config=CONFIG, packed_seq_params=psp, cp_size=1, **kwargs)
        return
    with pytest.raises(ChannelBatchError, match=match):
        loss_call(cu=cu, **kwargs)


def test_loss_mask_size_mismatch_is_named():
    with pytest.raises(ValueError, match="loss_mask has 8 elements but output_tensor has 32"):
        channel_loss_func(torch.rand(2, S), loss_mask=torch.ones(1, 8), channels=torch.tensor([0, 1]), config=CONFIG)


def test_packed_seq_params_without_boundaries_is_named():
    with pytest.raises(ValueError, match="neither cu_seqlens_q_padded nor cu_seqlens_q"):
        channel_loss_func(torch.rand(1, S), loss_mask=torch.ones(1, S), channels=torch.tensor([0]), config=CONFIG,
                          packed_seq_params=PackedSeqParams(qkv_format="thd"), cp_size=1)


# forward_step: the batch as the data iterator yields it -------------------------------------------

@pytest.fixture(scope="module")
def model(megatron_cpu):
    return tiny_gpt(vocab_size=32, seq_length=S)


def unpacked_batch(rows=2):
    tokens = torch.randint(0, 32, (rows, S))
    return dict(
        tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(rows, S),
        position_ids=torch.arange(S).expand(rows, S),
        attention_mask=torch.triu(torch.ones(S, S, dtype=torch.bool), 1).expand(rows, 1, S, S),
        channels=torch.tensor([0, 1][:rows]),
    )


def packed_batch(cu, channels):
    batch = unpacked_batch(rows=1)
    batch["cu_seqlens"] = torch.tensor([cu], dtype=torch.int32)
    batch["attention_mask"] = block_causal_mask(batch["cu_seqlens"], S)
    batch["channels"] = torch.tensor([channels])
    return batch


def edit(batch, **changes):
    batch = dict(batch)
    for key, value in changes.items():
        if value is None:
            batch.pop(key)
        else:
            batch[key] = value
    return batch


@pytest.mark.parametrize(
    "make_batch, match",
    [
        (lambda: edit(unpacked_batch(), channels=None), r"batch has no 'channels' field"),
        (lambda: edit(unpacked_batch(), channels=torch.tensor([0, 5])), r"channels holds id 5"),
        (lambda: edit(unpacked_batch(), channels=torch.tensor([0.0, 1.0])), r"channels must be an integer tensor"),
        (lambda: edit(unpacked_batch(), channels=torch.tensor([0, 1, 2])), r"channels has shape \[3\] but the batch has 2 rows"),
        (lambda: edit(unpacked_batch(), labels=None), r"batch field 'labels' is missing"),
        (lambda: packed_batch([0, 5, 3, 16], [0, 1, 2]), r"cu_seqlens\[0\] decreases at entry 2 \(5 -> 3\)"),
        (lambda: packed_batch([0, 5, 9, 20], [0, 1, 2]), r"cu_seqlens\[0\] runs to 20, past the row's 16 tokens"),
        (lambda: packed_batch([0, 5, 9, 12], [0, 1, 2]), r"cu_seqlens\[0\] ends at 12 but the row has 16 tokens"),
        (lambda: packed_batch([0, 5, 9, 16, 16], [0, 1]), r"channels has shape \[1, 2\].*describes 1 rows of 4 sequences"),
        (lambda: edit(packed_batch([0, 5, 16], [0, 1]), channels=None), r"batch has no 'channels' field"),
    ],
)
def test_forward_step_rejects_bad_batches_before_the_model(model, make_batch, match):
    forward_step = make_forward_step(CONFIG)
    with pytest.raises(ChannelBatchError, match=match):
        forward_step(iter([make_batch()]), model)


def test_layout_mismatch_names_the_layout(model):
    forward_step = make_forward_step(CONFIG, BatchLayout(micro_batch_size=2, seq_length=S, attention_mask=True))
    with pytest.raises(ChannelBatchError, match=r"'cu_seqlens' but the layout says packed=False"):
        forward_step(iter([packed_batch([0, 5, 16], [0, 1])]), model)
    with pytest.raises(ChannelBatchError, match=r"batch field 'tokens' has shape \[3, 16\], expected \[2, 16\]"):
        forward_step(iter([unpacked_batch(rows=3) | {"channels": torch.tensor([0, 1])}]), model)


def test_non_dict_batch_is_named(model):
    with pytest.raises(ChannelBatchError, match="must yield dicts of tensors, got tuple"):
        make_forward_step(CONFIG, BatchLayout(2, S))(iter([(1, 2)]), model)


def test_packed_fields_that_do_not_split_into_rows_are_named(model):
    batch = packed_batch([0, 5, 16], [0, 1])
    two_rows = {k: (v.expand(2, *v.shape[1:]) if k != "channels" else torch.tensor([0, 1, 0])) for k, v in batch.items()}
    two_rows["attention_mask"] = batch["attention_mask"].expand(2, 1, S, S)
    forward_step = make_forward_step(CONFIG, BatchLayout(2, S, packed=True, attention_mask=True))
    with pytest.raises(ChannelBatchError, match=r"batch field 'channels' has shape \[3\], which does not split into 2 rows"):
        forward_step(iter([two_rows]), model)
