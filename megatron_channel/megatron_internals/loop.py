"""Everything the package assumes about ``megatron.training``'s loop, and its install-time check.

The channel logging wraps four functions of ``megatron.training.training`` and, while
installed, its ``print_rank_last``; the launch script calls ``pretrain()``; the forward step
feeds Megatron's packed-sequence statistics. What each of those relies on is listed here,
and ``check_megatron_internals`` checks it before anything is patched:

* the wrapped functions exist and have the parameters the wrappers read (they bind by name,
  so parameters a release adds do not matter);
* the callers look the wrapped names up as module globals at call time, so replacing the
  module attribute reaches them;
* the release is a row of ``releases.RELEASES``, or newer (one warning naming the tested
  range), never older.

Console wording and the shape of ``train_step``'s result are checked where they are read
(``channel_logging.wrappers``), with the constants below.
"""

from __future__ import annotations

import dis
import sys
import warnings
from collections.abc import Callable, Sequence

from .patches import original_of
from .releases import (
    RELEASES,
    TESTED_RANGE,
    MegatronInternalsError,
    MegatronRelease,
    UntestedMegatronWarning,
    installed_release,
    installed_version,
    is_tested,
    release_for,
)

TRAINING_MODULE = "megatron.training.training"

# The functions wrapped, and the parameters each wrapper reads by name.
WRAPPED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "train_step": ("forward_step_func", "model", "forward_backward_func"),
    "training_log": ("iteration", "skipped_iter", "is_first_iteration"),
    "evaluate": ("forward_step_func", "model"),
    "evaluate_and_print_results": ("prefix", "iteration", "write_to_tensorboard"),
}

# Names each function must look up as a module global at call time, so replacing the
# module attribute reaches it (a local import or a bound default would bypass the wrapper).
GLOBAL_LOOKUPS: dict[str, tuple[str, ...]] = {
    "pretrain": ("train", "evaluate_and_print_results"),
    "train": ("train_step", "training_log", "evaluate_and_print_results"),
    "training_log": ("print_rank_last", "get_args", "get_tensorboard_writer", "get_wandb_writer"),
    "evaluate_and_print_results": ("evaluate", "print_rank_last", "get_tensorboard_writer", "get_wandb_writer"),
}

# train_step returns (loss_dict, skipped_iter, should_checkpoint, should_exit, exit_code,
# grad_norm, num_zeros_in_grad, max_attention_logit): 0.17 to 0.19.
TRAIN_STEP_RESULT_LENGTH = 8

# Console wording (0.17 to 0.19): training_log's " iteration N/ M | ... lm loss: x | ... loss
# scale: ..." line, and evaluate_and_print_results' " validation loss at <prefix> | <key>
# value: x | <key> PPL: x | " line, whose prefix ends in "test set" for the test split.
ITERATION_LINE_MARK = " iteration "
VALIDATION_LINE_MARK = " loss at "
LOSS_SCALE_FIELD = " loss scale:"
TEST_SET_PREFIX_END = "test set"

# Megatron's parsed arguments are read through ``megatron_args()``: the logging reads
# ``log_interval``, ``tensorboard_log_interval`` (every release has them) and, with defaults
# where a release lacks them, ``consumed_train_samples``, ``multiple_validation_sets``,
# ``validation_set_names`` (0.18 on) and ``cuda_graph_impl``; the forward step reads the batch
# shape flags (``step.layout.BatchLayout.from_megatron_args``).


def training_module():
    import megatron.training.training as module

    return module


def check_parameters(func: Callable, needed: Sequence[str], name: str) -> None:
    """Raise ``MegatronInternalsError`` unless ``func`` has every parameter in ``needed``."""
    import inspect

    found = tuple(inspect.signature(func).parameters)
    missing = [p for p in needed if p not in found]
    if missing:
        raise MegatronInternalsError(
            f"{TRAINING_MODULE}.{name} has no parameter {missing} (it has {list(found)}), which megatron_channel's "
            f"wrapper reads. {support_hint()}"
        )


def check_global_lookups(func: Callable, names: Sequence[str], name: str) -> None:
    """Raise ``MegatronInternalsError`` unless ``func``'s own code loads each of ``names`` as a global."""
    loaded = {i.argval for i in dis.get_instructions(func) if i.opname == "LOAD_GLOBAL"}
    missing = [n for n in names if n not in loaded]
    if missing:
        raise MegatronInternalsError(
            f"{TRAINING_MODULE}.{name} no longer looks up {missing} as module globals, so replacing them would "
            f"not reach it. {support_hint()}"
        )


def support_hint() -> str:
    return (f"megatron_channel supports megatron-core {TESTED_RANGE} (pip install "
            f"'megatron-core>={RELEASES[0].name}'); a newer release runs once these checks pass")


def check_megatron_internals(module=None, version: tuple[int, ...] | None = None) -> MegatronRelease:
    """Everything the wrappers rely on, checked before they are installed; returns the release row.

    A release newer than the tested ones gets one ``UntestedMegatronWarning`` once its loop passed.
    """
    version = installed_version() if version is None else tuple(version)
    release = release_for(version)
    if module is None:
        module = training_module()
    needed = set(WRAPPED_PARAMETERS) | set(GLOBAL_LOOKUPS) | {"print_rank_last", "get_args"}
    for name in sorted(needed):
        if not callable(getattr(module, name, None)):
            raise MegatronInternalsError(f"{TRAINING_MODULE} has no function {name!r}. {support_hint()}")
    for name, params in WRAPPED_PARAMETERS.items():
        check_parameters(original_of(getattr(module, name)), params, name)
    for name, globals_needed in GLOBAL_LOOKUPS.items():
        check_global_lookups(original_of(getattr(module, name)), globals_needed, name)
    if not is_tested(version):
        warnings.warn(
            f"megatron-core {'.'.join(map(str, version))} is newer than the releases megatron_channel was tested "
            f"with ({TESTED_RANGE}); its training loop passed the install-time checks, so it runs as "
            f"{release.name}", UntestedMegatronWarning, stacklevel=2,
        )
    return release


def seqlen_stats_recorder() -> Callable | None:
    """Megatron's ``update_seqlen_stats_from_cu_seqlens`` (0.18 on) when its training loop is
    loaded, else None: outside ``megatron.training`` nothing has imported it, and importing it
    takes seconds."""
    module = sys.modules.get(TRAINING_MODULE)
    if module is None or not installed_release().seqlen_stats:
        return None
    return getattr(module, "update_seqlen_stats_from_cu_seqlens", None)


def megatron_args():
    """Megatron's parsed arguments when its loop set them, else None (never imports the loop)."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return None
    try:
        return global_vars.get_args()
    except AssertionError:  # not set: outside pretrain()
        return None
