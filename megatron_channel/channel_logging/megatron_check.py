"""Checks that the installed megatron-core is the one the channel-logging wrappers were written against.

The wrappers replace functions of ``megatron.training.training`` and bind their arguments
by name, so install time checks the megatron-core version (the 0.19 line), the parameter
names of every wrapped function, and that the callers still look the replaced names up as
module globals at call time. Anything else raises ``MegatronInternalsError`` naming what
changed and how to fix it. Wrappers carry their original (``mark_wrapper``) so the checks
and a reinstall see Megatron's own function through an installed wrapper (``unwrapped``).
"""

from __future__ import annotations

import dis
import inspect
from collections.abc import Callable, Sequence

SUPPORTED_MEGATRON = (0, 19)


class MegatronInternalsError(RuntimeError):
    """The installed Megatron differs from the one this logging was written against."""


# Ends every MegatronInternalsError message: what to install instead.
SUPPORT_HINT = (
    "megatron_channel's channel logging supports megatron-core {v[0]}.{v[1]}.x; install that "
    "(pip install 'megatron-core>={v[0]}.{v[1]},<{v[0]}.{n}') or do not call install_channel_logging"
).format(v=SUPPORTED_MEGATRON, n=SUPPORTED_MEGATRON[1] + 1)


# Parameter names, in order, of the functions wrapped; the wrappers bind by these names.
EXPECTED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "train_step": (
        "forward_step_func", "data_iterator", "model", "optimizer", "opt_param_scheduler", "config",
        "forward_backward_func", "iteration", "pg_collection", "p2p_communicator",
    ),
    "training_log": (
        "loss_dict", "total_loss_dict", "learning_rate", "iteration", "loss_scale", "report_memory_flag",
        "skipped_iter", "grad_norm", "params_norm", "num_zeros_in_grad", "max_attention_logit",
        "pg_collection", "is_first_iteration", "seqlen_squared_sum_in_batch", "total_real_tokens_in_batch",
    ),
    "evaluate": (
        "forward_step_func", "data_iterator", "model", "process_non_loss_data_func", "config", "verbose",
        "non_loss_data_func", "eval_iters", "pg_collection", "p2p_communicator",
    ),
    "evaluate_and_print_results": (
        "prefix", "forward_step_func", "data_iterator", "model", "iteration", "process_non_loss_data_func",
        "config", "verbose", "write_to_tensorboard", "non_loss_data_func", "pg_collection", "p2p_communicator",
    ),
}


# Names each function must look up as a module global at call time, so replacing the
# module attribute reaches it (a local import or a bound default would bypass the wrapper).
EXPECTED_GLOBAL_LOOKUPS: dict[str, tuple[str, ...]] = {
    "pretrain": ("train", "evaluate_and_print_results"),
    "train": ("train_step", "training_log", "evaluate_and_print_results"),
    "training_log": ("print_rank_last", "get_args", "get_tensorboard_writer", "get_wandb_writer"),
    "evaluate_and_print_results": ("evaluate", "print_rank_last", "get_tensorboard_writer", "get_wandb_writer"),
}


def check_signature(func: Callable, expected: Sequence[str], name: str) -> None:
    """Raise ``MegatronInternalsError`` unless ``func``'s parameter names are ``expected``, in order."""
    found = tuple(inspect.signature(func).parameters)
    if found != tuple(expected):
        added = [p for p in found if p not in expected]
        removed = [p for p in expected if p not in found]
        raise MegatronInternalsError(
            f"megatron.training.training.{name} changed: expected parameters {list(expected)}, found "
            f"{list(found)} (added {added}, removed {removed}, or reordered). {SUPPORT_HINT}"
        )


def check_global_lookups(func: Callable, names: Sequence[str], name: str) -> None:
    """Raise ``MegatronInternalsError`` unless ``func``'s own code loads each of ``names`` as a global."""
    loaded = {i.argval for i in dis.get_instructions(func) if i.opname == "LOAD_GLOBAL"}
    missing = [n for n in names if n not in loaded]
    if missing:
        raise MegatronInternalsError(
            f"megatron.training.training.{name} no longer looks up {missing} as module globals, so "
            f"replacing them would not reach it. {SUPPORT_HINT}"
        )


def check_megatron_version(version: tuple[int, ...] | None = None) -> None:
    if version is None:
        from megatron.core import package_info

        version = (package_info.MAJOR, package_info.MINOR, package_info.PATCH)
    if tuple(version[:2]) != SUPPORTED_MEGATRON:
        raise MegatronInternalsError(f"installed megatron-core is {'.'.join(map(str, version))}. {SUPPORT_HINT}")


def check_megatron_internals(module=None) -> None:
    """Everything the wrappers rely on, checked at install time (``module``: training module)."""
    check_megatron_version()
    if module is None:
        import megatron.training.training as module
    for name in set(EXPECTED_SIGNATURES) | set(EXPECTED_GLOBAL_LOOKUPS) | {"print_rank_last", "get_args"}:
        if not callable(getattr(module, name, None)):
            raise MegatronInternalsError(f"megatron.training.training has no function {name!r}. {SUPPORT_HINT}")
    for name, params in EXPECTED_SIGNATURES.items():
        check_signature(unwrapped(getattr(module, name)), params, name)
    for name, globals_needed in EXPECTED_GLOBAL_LOOKUPS.items():
        check_global_lookups(unwrapped(getattr(module, name)), globals_needed, name)


def mark_wrapper(wrapper, original):
    """Tie ``wrapper`` to the ``original`` it wraps (read back by ``unwrapped``); returns ``wrapper``."""
    wrapper._channel_logging_original = original
    return wrapper


def unwrapped(func):
    """The original behind a ``mark_wrapper`` wrapper; ``func`` itself when it is not one."""
    return getattr(func, "_channel_logging_original", func)
