"""``megatron_internals``: the release table, the install-time checks of Megatron's loop, and the
one patch helper (checked, marked with ``__wrapped__``, logged, undone)."""

from __future__ import annotations

import logging
import types
import warnings

import pytest

import megatron.training.training as training

from megatron_channel import MegatronInternalsError, UntestedMegatronWarning
from megatron_channel.megatron_internals import RELEASES, apply_patch, applied_patches, original_of, release_for
from megatron_channel.megatron_internals.loop import (
    WRAPPED_PARAMETERS,
    check_global_lookups,
    check_megatron_internals,
    check_parameters,
)
from megatron_channel.megatron_internals.releases import installed_version, is_tested


@pytest.mark.timeout(30)
def test_the_installed_release_passes_its_checks():
    """A tested release without a warning; a newer one (a Megatron-LM checkout of main) with one."""
    assert [r.line for r in RELEASES] == [(0, 17), (0, 18), (0, 19)]
    if is_tested(installed_version()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UntestedMegatronWarning)
            release = check_megatron_internals()
        assert release.line == installed_version()[:2]
    else:
        with pytest.warns(UntestedMegatronWarning, match="newer than the releases"):
            assert check_megatron_internals() is RELEASES[-1]


@pytest.mark.timeout(30)
def test_release_rows_older_newer_and_unknown():
    assert release_for((0, 17, 1)).line == (0, 17) and not release_for((0, 17, 1)).output_processor
    assert release_for((0, 18, 2)).config_container and not release_for((0, 18, 2)).model_provider_optional
    assert release_for((0, 20, 0)) is RELEASES[-1]  # newer: runs as the newest row once checked
    with pytest.raises(MegatronInternalsError, match=r"0\.16\.1 is older than 0\.17.*megatron-core>=0\.17"):
        release_for((0, 16, 1))


@pytest.mark.timeout(30)
def test_a_newer_release_whose_loop_passes_warns_once_naming_the_tested_range():
    with pytest.warns(UntestedMegatronWarning, match=r"0\.20\.0 is newer.*\(0\.17 to 0\.19\).*runs as 0\.19"):
        assert check_megatron_internals(version=(0, 20, 0)) is RELEASES[-1]


@pytest.mark.timeout(30)
def test_the_checks_name_what_changed():
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                     grad_norm, params_norm, new_option=None):
        pass

    check_parameters(training.training_log, WRAPPED_PARAMETERS["training_log"], "training_log")
    with pytest.raises(MegatronInternalsError,
                       match=r"training_log has no parameter \['skipped_iter', 'is_first_iteration'\]"):
        check_parameters(training_log, WRAPPED_PARAMETERS["training_log"], "training_log")

    def train(*args):
        from megatron.training.training import train_step  # a local import bypasses the module global

        return train_step(*args)

    with pytest.raises(MegatronInternalsError, match=r"train no longer looks up \['train_step', 'training_log'\]"):
        check_global_lookups(train, ["train_step", "training_log"], "train")
    # A newer release whose loop changed fails, naming the change, before any warning.
    module = types.SimpleNamespace(**{n: getattr(training, n) for n in dir(training) if not n.startswith("__")})
    module.training_log = training_log
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntestedMegatronWarning)
        with pytest.raises(MegatronInternalsError, match="training_log has no parameter"):
            check_megatron_internals(module, version=(0, 20, 0))


def patchable_owner() -> types.SimpleNamespace:
    """A module-like object with a function ``f`` and a plain value, for ``apply_patch``."""
    return types.SimpleNamespace(__name__="lib", f=lambda x: x + 1, value=3)


@pytest.mark.timeout(30)
def test_apply_patch_wraps_marks_registers_and_logs(caplog):
    owner = patchable_owner()
    original = owner.f
    with caplog.at_level(logging.INFO, logger="megatron_channel"):
        patch = apply_patch(owner, {"f": lambda x: original(x) * 10}, reason="a test")
    try:
        assert owner.f(1) == 20 and owner.f.__wrapped__ is original and original_of(owner.f) is original
        assert patch in applied_patches()
        assert [r.getMessage() for r in caplog.records] == ["megatron_channel: patched lib.f (a test)"]
    finally:
        patch.undo()


@pytest.mark.timeout(30)
def test_stacked_patches_undo_only_in_reverse_order_and_log_the_restore(caplog):
    """A second patch over the first: original_of goes through both, back to the library's own."""
    owner = patchable_owner()
    original = owner.f
    patch = apply_patch(owner, {"f": lambda x: original(x) * 10}, reason="a test")
    second = apply_patch(owner, {"f": lambda x: 0}, reason="another")
    assert original_of(owner.f) is original
    with pytest.raises(RuntimeError, match=r"lib\.\['f'\] were replaced again.*a test"):
        patch.undo()  # the later patch would be lost
    second.undo()
    with caplog.at_level(logging.INFO, logger="megatron_channel"):
        patch.undo()
    assert owner.f is original and patch not in applied_patches()
    assert caplog.records[-1].getMessage() == "megatron_channel: restored lib.f (a test)"


@pytest.mark.timeout(30)
def test_apply_patch_checks_the_target_before_anything_changes():
    owner = patchable_owner()
    original = owner.f
    with pytest.raises(MegatronInternalsError, match=r"cannot patch lib: g is missing, value is not callable"):
        apply_patch(owner, {"f": lambda x: x, "g": lambda: 0, "value": lambda: 0}, reason="bad")
    assert owner.f is original and not hasattr(owner, "g")


@pytest.mark.timeout(30)
def test_unwrapped_patch_sets_values_and_undo_deletes_what_did_not_exist():
    """Plain values and new attributes (wrap=False)."""
    owner = patchable_owner()
    plain = apply_patch(owner, {"value": 4, "added": 1}, reason="values", wrap=False)
    assert (owner.value, owner.added) == (4, 1)
    plain.undo()
    assert owner.value == 3 and not hasattr(owner, "added")


@pytest.mark.timeout(60)
def test_every_patch_of_a_cpu_launch_goes_through_the_helper_and_is_undone():
    """``--cpu``'s stand-ins, the dataset-helper skip and the logging wrappers: each one a logged,
    marked patch, and all of them undone leave the libraries as they were."""
    import threading

    import torch
    from megatron.core.datasets import utils as dataset_utils

    from megatron_channel import ChannelConfig, install_channel_logging, uninstall_channel_logging
    from megatron_channel.cpu import install_cuda_on_cpu, uninstall_cuda_on_cpu
    from megatron_channel.launch.startup import skip_built_dataset_helpers

    before = dict(cuda=torch.cuda.is_available, run=threading.Thread.run, module_cuda=torch.nn.Module.cuda,
                  helpers=dataset_utils.compile_helpers, print=training.print_rank_last)
    count = len(applied_patches())
    install_cuda_on_cpu()
    try:
        skip_built_dataset_helpers()
        install_channel_logging(ChannelConfig(["a"]))
        assert torch.cuda.is_available() and threading.Thread.run.__wrapped__ is before["run"]
        assert dataset_utils.compile_helpers.__wrapped__ is before["helpers"]
        assert training.print_rank_last.__wrapped__ is before["print"]
        assert len(applied_patches()) > count + 3
        uninstall_channel_logging()
        for patch in reversed(applied_patches()[count:]):
            if patch.owner is dataset_utils:
                patch.undo()
    finally:
        uninstall_cuda_on_cpu()
    assert len(applied_patches()) == count
    assert dict(cuda=torch.cuda.is_available, run=threading.Thread.run, module_cuda=torch.nn.Module.cuda,
                helpers=dataset_utils.compile_helpers, print=training.print_rank_last) == before
    assert not torch.cuda.is_available()


@pytest.mark.timeout(30)
def test_patches_of_classes_put_back_what_the_class_itself_held():
    """A staticmethod stays one, an inherited method is inherited again, and a replacement that
    fails halfway leaves nothing behind."""

    class Base:
        def greet(self):
            return "base"

    class Child(Base):
        @staticmethod
        def tool():
            return "tool"

    patch = apply_patch(Child, {"greet": lambda self: "ours", "tool": lambda: "ours"}, reason="classes")
    assert Child().greet() == "ours" and Child.tool() == "ours"
    patch.undo()
    assert "greet" not in vars(Child) and Child().greet() == "base"
    assert isinstance(vars(Child)["tool"], staticmethod) and Child.tool() == "tool"

    class Refusing(types.ModuleType):
        def __setattr__(self, name, value):
            if name == "b":
                raise AttributeError("read-only")
            super().__setattr__(name, value)

    owner = Refusing("lib")
    owner.a = original_a = lambda: "a"
    with pytest.raises(AttributeError):
        apply_patch(owner, {"a": lambda: "ours", "b": lambda: "ours"}, reason="half", wrap=False)
    assert owner.a is original_a and not hasattr(owner, "b")


@pytest.mark.timeout(30)
def test_installers_notice_patches_undone_elsewhere(clean_install):
    """After its patch was undone elsewhere (``Patch.undo``, ``undo_all_patches``) the logging
    counts as not installed, and installing again patches again instead of returning early."""
    from megatron_channel import ChannelConfig, install_channel_logging
    from megatron_channel.channel_logging.install import installed_channel_logging
    from megatron_channel.megatron_internals.patches import find_patch

    config = ChannelConfig(["a"])
    original = training.train_step
    install_channel_logging(config)
    find_patch(training, "train_step").undo()
    assert training.train_step is original and installed_channel_logging() is None
    install_channel_logging(config)
    assert training.train_step is not original and training.train_step.__wrapped__ is original
