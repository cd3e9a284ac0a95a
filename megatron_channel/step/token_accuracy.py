"""Which loss tokens the model predicted: the label is an argmax of the logits (ties count).

Read from the logits inside the model's loss step, before the cross entropy (which works in
place on them), by one of two routes that run the same ops on the same logits:

* ``GPTModel`` with an ``output_processor`` parameter (megatron-core 0.18 on):
  ``output_processor_with_correct_tokens`` runs GPTModel's stock postprocess (output layer,
  logit scaling, ``compute_language_model_loss``, whichever cross-entropy fusion is
  configured) and reads the logits before the cross entropy. The combined 1F1B schedule
  plan's post-process node calls the same hook.
* Any other model (``HybridModel``, 0.17's ``GPTModel``): ``correct_tokens_from_output_layer``,
  a forward hook on the model's ``output_layer`` for the length of the model call, reads the
  logits the layer returns (before any logit scaling, which is positive and keeps the argmax).
  With multi-token prediction the layer runs once per depth and then for the main head,
  last: the last call's flags are kept.

Either way, per token:

* this rank's vocabulary shard: its max logit and, where the label falls in the shard, the
  label's logit (no autograd history, no copy of the logits);
* under tensor parallelism, ONE all-reduce (MAX) of those two ``[s, b]`` float32 rows over
  the TP group: the global max, and the label's logit from the rank that holds it;
* correct = label's logit == global max: Megatron's vocab-parallel rule, where a target whose
  logit minus the max is 0 is an argmax, ties included;
* times the loss mask, in the same op that makes the flags float.

Loss and gradients stay bitwise the stock ones. No value is read on the host. The flags land
in the ``CorrectTokens`` of the microbatch, where ``channel_loss_func`` reads them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron.core.utils import get_attr_wrapped_model

from ..megatron_internals.releases import installed_release


@dataclass
class CorrectTokens:
    """One microbatch's correct-token flags, written by the model's loss step.

    Attributes:
        loss_mask: ``[b, s]`` float32, set before the forward pass: the flags are made as
            ``correct x loss_mask`` (the product takes the place of the bool-to-float cast, so
            it costs the model nothing and the loss function one pass less). None: plain flags.
        labels: ``[b, s]`` token ids of the microbatch, for the output-layer hook (the
            ``output_processor`` route gets them from the model).
        flags: ``[b, s]`` float32, 1.0 where the label is an argmax of the logits (the layout of
            the per-token losses the model returns), times ``loss_mask`` when that is set; None
            until the forward pass ran.
    """

    loss_mask: Tensor | None = None
    labels: Tensor | None = None
    flags: Tensor | None = None


def target_is_argmax(logits: Tensor, labels: Tensor, tp_group=None, vocab_is_sharded: bool = True,
                     loss_mask: Tensor | None = None) -> Tensor:
    """``[b, s]`` float32 flags: 1.0 where ``labels`` is an argmax of ``logits`` (ties count).

    Args:
        logits: ``[s, b, V / tp]``, this TP rank's vocabulary shard (rank r holds ids
            ``[r * V / tp, (r + 1) * V / tp)``, Megatron's ``VocabUtility`` rule).
        labels: ``[b, s]`` token ids; ids outside ``[0, V)`` are never correct.
        tp_group: the tensor-parallel group; None or one rank: no collective.
        vocab_is_sharded: False when the logits already hold the whole vocabulary.
        loss_mask: ``[b, s]`` float32: return ``flags x loss_mask`` instead, in the same one op.
    """
    with torch.no_grad():
        tp_size = torch.distributed.get_world_size(tp_group) if vocab_is_sharded and tp_group is not None else 1
        shard = logits.shape[-1]
        start = torch.distributed.get_rank(tp_group) * shard if tp_size > 1 else 0
        target = labels.transpose(0, 1)  # [s, b]
        in_shard = (target >= start) & (target < start + shard)
        local_target = (target - start).clamp(0, shard - 1)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_shard, target_logit, float("-inf"))
        shard_max = torch.amax(logits, dim=-1)
        if tp_size > 1:
            both = torch.stack([shard_max, target_logit]).float()
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            shard_max, target_logit = both.unbind(0)
        correct = (target_logit == shard_max).transpose(0, 1)
        if loss_mask is None:
            return correct.float()
        return torch.mul(correct, loss_mask.view(correct.shape))


def output_processor_with_correct_tokens(*, hidden_states, output_layer, output_weight, labels, context,
                                         compute_language_model_loss, scale_logits, runtime_gather_output=None,
                                         **_):
    """GPTModel's ``output_processor``: its stock logits and loss, plus ``context.flags``.

    Returns what GPTModel returns without a hook: per-token losses ``[b, s]`` with labels,
    logits ``[b, s, V / tp]`` without.
    """
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
    logits = scale_logits(logits)
    if labels is None:
        return logits.transpose(0, 1).contiguous()
    context.flags = flags_of_layer_output(output_layer, logits, labels, runtime_gather_output, context.loss_mask)
    return compute_language_model_loss(labels, logits)


def flags_of_layer_output(output_layer, logits: Tensor, labels: Tensor, runtime_gather_output,
                          loss_mask: Tensor | None) -> Tensor:
    """``target_is_argmax`` of the logits ``output_layer`` returned (``[s, b, V / tp]``): over its
    TP group, unless the call gathered the vocabulary (``runtime_gather_output``, when given,
    overrides the layer's own ``gather_output``, as in the layer)."""
    gathered = getattr(output_layer, "gather_output", False) if runtime_gather_output is None else runtime_gather_output
    return target_is_argmax(logits, labels, getattr(output_layer, "tp_group", None),
                            vocab_is_sharded=not bool(gathered), loss_mask=loss_mask)


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> tuple[str, ...]:
    return tuple(inspect.signature(model_class.forward).parameters)


def takes_output_processor(model) -> bool:
    """Whether the (possibly wrapped) model's forward takes ``output_processor`` (GPTModel, 0.18 on)."""
    if not installed_release().output_processor:
        return False
    inner = get_attr_wrapped_model(model, "output_layer", return_model_obj=True)
    return "output_processor" in _forward_parameters(type(inner))


@contextlib.contextmanager
def correct_tokens_from_output_layer(model, context: CorrectTokens):
    """While the block runs, every call of the model's ``output_layer`` writes ``context.flags``
    from the logits it returns (``[s, b, V / tp]``), before the cross entropy sees them.

    The flags of the last call are kept: with multi-token prediction, GPTModel and HybridModel
    call the layer once per depth and then, last, for the main head.
    """
    layer = get_attr_wrapped_model(model, "output_layer")

    def record_flags(module, args, kwargs, output):
        logits = output[0] if isinstance(output, tuple) else output
        context.flags = flags_of_layer_output(module, logits, context.labels, kwargs.get("runtime_gather_output"),
                                              context.loss_mask)

    handle = layer.register_forward_hook(record_flags, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
