"""Start-up of the launch: the dataset-helper compile, the Apex-only defaults, ``--cpu`` flags."""

import os
import subprocess
import sys
from argparse import Namespace

import pytest

from megatron_channel.launch import startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_built_dataset_helpers_are_not_compiled_but_a_source_checkout_still_is(monkeypatch):
    from megatron.core.datasets import utils as dataset_utils

    compiled = []
    monkeypatch.setattr(dataset_utils, "compile_helpers", lambda: compiled.append("make"))
    startup.skip_built_dataset_helpers()
    startup.skip_built_dataset_helpers()  # idempotent: wraps once
    dataset_utils.compile_helpers()
    assert compiled == []  # the wheel's helpers_cpp imports

    real_import = startup.importlib.import_module
    monkeypatch.setattr(startup.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name.endswith("helpers_cpp")
                        else real_import(name))
    dataset_utils.compile_helpers()
    assert compiled == ["make"]


def test_apex_only_defaults_are_turned_off_without_apex(monkeypatch, capsys):
    args = Namespace(no_persist_layer_norm=False, gradient_accumulation_fusion=True, rank=0)
    monkeypatch.setattr(startup, "has_module", lambda name: False)
    assert startup.apply_defaults_without_apex(args) == ["--no-persist-layer-norm", "--no-gradient-accumulation-fusion"]
    assert args.no_persist_layer_norm and not args.gradient_accumulation_fusion
    assert "NVIDIA Apex not found" in capsys.readouterr().out

    args = Namespace(no_persist_layer_norm=False, gradient_accumulation_fusion=True, rank=0)
    monkeypatch.setattr(startup, "has_module", lambda name: True)
    assert startup.apply_defaults_without_apex(args) == []
    assert not args.no_persist_layer_norm and args.gradient_accumulation_fusion


def test_cpu_flag_puts_the_cpu_flags_first_so_the_users_win():
    argv, cpu = startup.cpu_argv(["--num-workers", "1", "--cpu"])
    assert cpu and argv[: len(startup.CPU_DEFAULT_FLAGS)] == list(startup.CPU_DEFAULT_FLAGS)
    assert argv[-2:] == ["--num-workers", "1"] and "--cpu" not in argv
    assert startup.cpu_argv(["--lr", "1"]) == (["--lr", "1"], False)


def cpu_args(**overrides):
    args = dict(distributed_backend="gloo", transformer_impl="local", position_embedding_type="learned_absolute",
                apply_rope_fusion=False, bf16=False, fp16=False, sft=False, context_parallel_size=1, spec=None, rank=0)
    return Namespace(**{**args, **overrides})


@pytest.mark.parametrize("overrides, flag", [
    (dict(distributed_backend="nccl"), "--distributed-backend nccl"),
    (dict(transformer_impl="transformer_engine"), "--transformer-impl transformer_engine"),
    (dict(position_embedding_type="rope", apply_rope_fusion=True), "--no-rope-fusion"),
    (dict(bf16=True), "--bf16"),
    (dict(sft=True, spec=["my.module", "spec"]), "--spec megatron_channel.cpu gpt_layer_spec"),
])
def test_cpu_refuses_what_cannot_run_on_a_cpu_naming_the_flag(overrides, flag):
    with pytest.raises(startup.LaunchError, match=flag):
        startup.check_cpu_args(cpu_args(**overrides))


@pytest.mark.parametrize("overrides", [dict(sft=True), dict(context_parallel_size=2)])
def test_cpu_picks_the_cpu_attention_for_packed_rows_and_context_parallelism(overrides):
    args = cpu_args(**overrides)
    startup.check_cpu_args(args)
    assert tuple(args.spec) == startup.CPU_ATTENTION_SPEC
    plain = cpu_args()
    startup.check_cpu_args(plain)
    assert plain.spec is None  # Megatron's own local attention where it works


@pytest.mark.timeout(120)
def test_without_a_gpu_and_without_cpu_the_launch_stops_naming_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pretrain_gpt_channel.py"),
                           "--num-layers", "2"], capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "no CUDA GPU found" in proc.stderr and "add --cpu" in proc.stderr
