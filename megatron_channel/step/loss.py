"""The loss function: Megatron's stock ``(loss, num_tokens, metrics)`` plus one entry per channel."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams

from ..names import LM_LOSS_KEY, TOKEN_ACC_KEY
from ..config import ChannelConfig
from ..segment_math import local_boundaries, row_channel_totals, sequence_channel_totals
from .checks import check_channel_ids, check_cu_seqlens, check_packed_channels, check_row_channels
from .token_accuracy import CorrectTokens


def packed_boundaries(packed_seq_params: PackedSeqParams) -> Tensor:
    """``[N + 1]`` global sequence boundaries of a THD batch: the padded ones when set."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params has neither cu_seqlens_q_padded nor cu_seqlens_q")
    if cu.dim() == 2 and cu.shape[0] == 1:
        cu = cu[0]
    return cu


def stock_loss_terms(masked_losses: Tensor, mask: Tensor,
                     mask_sum: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Megatron-LM pretrain_gpt's ``(loss, num_tokens, {"lm loss": [sum, count]})`` from ``[T]`` terms.

    ``mask_sum``: ``mask.sum()`` where the caller needs it too (the same op, run once).
    """
    loss = torch.sum(masked_losses)
    num_tokens = (mask.sum() if mask_sum is None else mask_sum).clone().detach().to(torch.int)
    return loss, num_tokens, {LM_LOSS_KEY: torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def stock_loss_func(loss_mask: Tensor, output_tensor: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Megatron-LM pretrain_gpt.py's loss_func (without its NaN/spike checks): no channels."""
    mask = loss_mask.view(-1).float()
    return stock_loss_terms(output_tensor.view(-1).float() * mask, mask)


def default_cp_size() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_context_parallel_world_size()
    return 1


def channel_loss_func(
    output_tensor: Tensor,
    *,
    loss_mask: Tensor,
    channels: Tensor,
    config: ChannelConfig,
    packed_seq_params: PackedSeqParams | None = None,
    cp_size: int | None = None,
    validate: bool | None = None,
    correct_tokens: CorrectTokens | Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Megatron's stock GPT loss, with a ``[loss_sum, token_count]`` metric per channel.

    Args:
        output_tensor: per-token losses from ``GPTModel(..., labels=labels)``: ``[b, s]``,
            or ``[1, T_local]`` for packed (THD) rows.
        loss_mask: same number of elements as ``output_tensor``.
        channels: integer channel ids, ``-1`` = untracked. Unpacked: ``[b]``, one per row.
            Packed: one per sequence of ``cu_seqlens`` in order (``>= N`` entries; extra ones
            are padding slots and ignored).
        config: the channel names and metric prefix.
        packed_seq_params: THD metadata; boundaries come from ``cu_seqlens_q_padded`` when
            set, else ``cu_seqlens_q`` (global, before any context-parallel cut).
        cp_size: context-parallel size; defaults to ``parallel_state``'s.
        validate: check ``channels`` and ``cu_seqlens`` values on the host. Default: unless
            ``channels`` is on a GPU. Checks read values, so never turn them on for
            GPU tensors in a training loop; validate where the batch is built instead.
        correct_tokens: with ``config.token_accuracy``, the correct-token flags of these tokens
            (``[b, s]`` / ``[1, T_local]``, 1.0 where the label is an argmax of the logits), or the
            ``CorrectTokens`` the model's loss step filled (``make_forward_step`` passes it, made
            with this ``loss_mask``, so its flags come already masked).

    Returns:
        ``loss`` (float32 scalar) and ``num_tokens`` (int32 scalar), bitwise Megatron's stock
        values, and ``metrics``: ``"lm loss"`` -> ``[sum, count]`` as stock, then for every
        channel in config order ``prefix + name`` -> float32 ``[2]`` ``[sum, count]`` on this
        rank (``[0, 0]`` when absent). The key set never changes, so every microbatch on every
        rank reports the same keys in the same order. With ``config.token_accuracy``, also
        ``"token acc"`` -> ``[correct tokens, loss tokens]`` after ``"lm loss"``, and beside each
        channel's loss key its accuracy key -> ``[correct tokens, loss tokens]``.
    """
    if validate is None:
        validate = not (isinstance(channels, Tensor) and channels.device.type != "cpu")
    if validate:
        check_channel_ids(channels, config.num_channels)
        if loss_mask.numel() != output_tensor.numel():
            raise ValueError(
                f"loss_mask has {loss_mask.numel()} elements but output_tensor has "
                f"{output_tensor.numel()}; they must cover the same tokens"
            )

    # Exactly Megatron's stock loss_func, so tracking channels cannot change training.
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    masked_losses = losses * mask
    if not config.token_accuracy:
        loss, num_tokens, metrics = stock_loss_terms(masked_losses, mask)
        values, columns, keys = (masked_losses.detach(), mask), None, config.metric_keys()
    else:
        masked_correct = masked_correct_flags(correct_tokens, loss_mask, mask, validate)
        mask_sum = mask.sum()
        loss, num_tokens, metrics = stock_loss_terms(masked_losses, mask, mask_sum)
        metrics[TOKEN_ACC_KEY] = torch.stack([masked_correct.sum(), mask_sum])
        # One pass over the three rows: the mask's sums are both pairs' token counts.
        values, columns, keys = (masked_losses.detach(), masked_correct, mask), ACCURACY_COLUMNS, metric_order(config)

    if packed_seq_params is None:
        rows = output_tensor.shape[0]
        if validate:
            check_row_channels(channels, rows)
        totals = row_channel_totals(values, rows, channels, config.num_channels, columns)
    else:
        cp = default_cp_size() if cp_size is None else cp_size
        cu = packed_boundaries(packed_seq_params)
        if validate:
            check_cu_seqlens(cu, losses.numel() * cp, cp_size=cp)
            check_packed_channels(channels, cu)
        totals = sequence_channel_totals(values, local_boundaries(cu, cp), channels.reshape(-1), config.num_channels,
                                         columns)
    # [K, 2] (loss) or [K, 4] (loss, accuracy): one [sum, count] view per key, in key order.
    metrics.update(zip(keys, (totals if columns is None else totals.view(-1, 2)).unbind(0)))
    return loss, num_tokens, metrics


# Per channel [loss_sum, token_count, correct_tokens, token_count] of the rows
# (masked losses, masked correct flags, loss mask).
ACCURACY_COLUMNS = (0, 2, 1, 2)


@functools.lru_cache(maxsize=64)
def metric_order(config: ChannelConfig) -> tuple[str, ...]:
    """Each channel's loss key, then its accuracy key, in channel order: the rows of
    ``channel_totals(..., columns=ACCURACY_COLUMNS).view(-1, 2)``."""
    return tuple(key for pair in zip(config.metric_keys(), config.accuracy_keys()) for key in pair)


def masked_correct_flags(correct_tokens: CorrectTokens | Tensor | None, loss_mask: Tensor, mask: Tensor,
                         validate: bool) -> Tensor:
    """``[T]`` float32 correct-token flags times ``mask`` (``loss_mask`` flattened, float32).

    ``correct_tokens``: a ``[b, s]`` tensor of flags, or the ``CorrectTokens`` the model's loss
    step filled. One made with this very ``loss_mask`` (``make_forward_step``'s) holds the
    product already: the model multiplied where it made the flags.
    """
    is_context = isinstance(correct_tokens, CorrectTokens)
    flags = correct_tokens.flags if is_context else correct_tokens
    if flags is None:
        raise ValueError(
            "ChannelConfig(token_accuracy=True) needs the correct-token flags: use make_forward_step(config), "
            "whose model call computes them, or pass correct_tokens= to channel_loss_func"
        )
    premasked = is_context and correct_tokens.loss_mask is not None
    if premasked and correct_tokens.loss_mask is not loss_mask:
        raise ValueError(
            "correct_tokens (CorrectTokens) holds flags masked by another loss_mask than the one passed to "
            "channel_loss_func: give both the same tensor, or make the CorrectTokens without loss_mask"
        )
    if validate and flags.numel() != mask.numel():
        raise ValueError(f"correct_tokens has {flags.numel()} elements but loss_mask has {mask.numel()}")
    flags = flags.detach().reshape(-1)
    if flags.dtype != torch.float32:
        flags = flags.float()
    return flags if premasked else flags * mask
