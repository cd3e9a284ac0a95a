"""Everything ``megatron_channel.bridge`` assumes of Megatron-Bridge, in one place, checked when
the forward step is made (``check_bridge_internals``).

Bridge 0.6's loop, as the adapter uses it:

* ``pretrain(cfg, forward_step_func, callbacks=...)`` hands ``GlobalState`` to a forward step
  whose first parameter is named ``state``, and fires the callback events of ``EVENTS`` on every
  rank, with a ``CallbackContext`` holding ``CONTEXT_FIELDS``.
* ``on_train_step_end`` fires after ``train_step`` and before ``train_state.step += 1`` and
  ``training_log``: the iteration ``training_log`` prints is ``step + 1``. ``loss_dict`` is empty
  except on the last pipeline stage.
* ``gpt_step.forward_step(state, data_iterator, model, return_schedule_plan)`` reads the batch
  with ``next(data_iterator)`` on every rank (no tensor-parallel broadcast) and returns
  ``partial(losses.masked_next_token_loss, loss_mask, ...)``, whose first argument is this
  microbatch's loss mask (None off the last stage); every batch key it does not know (``channels``,
  ``dataset_id``) is dropped before the model sees the batch.
* ``training_log`` and ``evaluate_and_print_results`` print through the module-global
  ``print_rank_last`` of ``PRINTING_MODULES``, with Megatron-LM's console wording.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

from ..megatron_internals.releases import MegatronInternalsError, UntestedMegatronWarning

TESTED_BRIDGE_RELEASES = ("0.6",)
EVENTS = ("on_train_start", "on_train_step_start", "on_train_step_end", "on_eval_start", "on_eval_end",
          "on_test_start", "on_test_end")
CONTEXT_FIELDS = ("state", "model", "loss_dict", "skipped_iter", "total_loss_dict")
FORWARD_STEP_PARAMETERS = ("state", "data_iterator", "model", "return_schedule_plan")
LOSS_FUNCTION = ("megatron.bridge.training.losses", "masked_next_token_loss")
LOSS_PARAMETERS = ("loss_mask", "output_tensor")
PRINTING_MODULES = ("megatron.bridge.training.utils.train_utils", "megatron.bridge.training.eval")
STATE_ATTRIBUTES = ("cfg", "train_state", "tensorboard_logger", "wandb_logger")


class BridgeInternalsError(MegatronInternalsError):
    """The installed Megatron-Bridge is not shaped as ``megatron_channel.bridge`` needs."""


def bridge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-bridge")
    except PackageNotFoundError:
        import megatron.bridge

        return getattr(megatron.bridge, "__version__", "unknown")


def _changed(what: str) -> BridgeInternalsError:
    return BridgeInternalsError(
        f"megatron-bridge {bridge_version()}: {what}. megatron_channel.bridge was written against Bridge "
        f"{', '.join(v + '.x' for v in TESTED_BRIDGE_RELEASES)}; install one of those, or report the change"
    )


@functools.lru_cache(maxsize=None)
def check_bridge_internals() -> None:
    """``BridgeInternalsError`` naming the Bridge version and what changed, unless every assumption
    above holds; ``UntestedMegatronWarning`` (once) for a release outside ``TESTED_BRIDGE_RELEASES``."""
    try:
        callbacks = importlib.import_module("megatron.bridge.training.callbacks")
        gpt_step = importlib.import_module("megatron.bridge.training.gpt_step")
        state_module = importlib.import_module("megatron.bridge.training.state")
        losses = importlib.import_module(LOSS_FUNCTION[0])
    except ImportError as e:
        raise BridgeInternalsError(f"megatron_channel.bridge needs Megatron-Bridge's training modules: {e}") from e
    missing_events = [e for e in EVENTS if e not in getattr(callbacks, "VALID_EVENTS", ())]
    if missing_events:
        raise _changed(f"the callback events {missing_events} are gone from training.callbacks.VALID_EVENTS")
    fields = getattr(callbacks.CallbackContext, "__dataclass_fields__", {})
    missing_fields = [f for f in CONTEXT_FIELDS if f not in fields]
    if missing_fields:
        raise _changed(f"training.callbacks.CallbackContext has no {missing_fields}")
    parameters = tuple(inspect.signature(gpt_step.forward_step).parameters)
    if parameters != FORWARD_STEP_PARAMETERS:
        raise _changed(f"training.gpt_step.forward_step takes {parameters}, not {FORWARD_STEP_PARAMETERS}")
    loss = getattr(losses, LOSS_FUNCTION[1], None)
    if loss is None or tuple(inspect.signature(loss).parameters)[:2] != LOSS_PARAMETERS:
        raise _changed(f"{'.'.join(LOSS_FUNCTION)} is missing or does not start with {LOSS_PARAMETERS}")
    missing_state = [a for a in STATE_ATTRIBUTES if not hasattr(state_module.GlobalState, a)]
    if missing_state:
        raise _changed(f"training.state.GlobalState has no {missing_state}")
    for name in PRINTING_MODULES:
        if not callable(getattr(importlib.import_module(name), "print_rank_last", None)):
            raise _changed(f"{name} no longer prints through a module-global print_rank_last")
    if not bridge_version().startswith(tuple(v + "." for v in TESTED_BRIDGE_RELEASES)):
        warnings.warn(
            f"megatron-bridge {bridge_version()} passes megatron_channel's checks but was not tested; "
            f"tested: {', '.join(v + '.x' for v in TESTED_BRIDGE_RELEASES)}",
            UntestedMegatronWarning, stacklevel=2,
        )


def loss_mask_of(loss_func) -> object:
    """The loss mask Bridge's ``loss_func`` holds (``partial(masked_next_token_loss, loss_mask, ...)``).

    Any other loss function is refused by name: the channel rows are computed beside Bridge's
    loss from the same per-token losses and mask, which only this loss function is known to use.
    """
    target = getattr(importlib.import_module(LOSS_FUNCTION[0]), LOSS_FUNCTION[1])
    if isinstance(loss_func, functools.partial) and loss_func.func is target and loss_func.args:
        return loss_func.args[0]
    name = getattr(getattr(loss_func, "func", loss_func), "__qualname__", type(loss_func).__name__)
    raise BridgeInternalsError(
        f"ChannelForwardStep got the loss function {name!r} from its inner forward step; it knows "
        f"Bridge's {'.'.join(LOSS_FUNCTION)} (gpt_step.forward_step's). Use gpt_step.forward_step, or "
        "compute the channel rows in your own step with megatron_channel.channel_loss_func"
    )
