"""What a launch through Megatron's ``pretrain()`` needs before training starts.

Two faults of the megatron-core wheels (0.17 to 0.19) stop any launch, GPU or not, and are fixed here:

* ``initialize_megatron`` runs ``make`` in ``megatron/core/datasets`` on rank 0 to build the
  dataset helpers. The wheel ships them built (``helpers_cpp*.so``) but no Makefile, so
  ``make`` fails and rank 0 calls ``sys.exit(1)``. ``skip_built_dataset_helpers`` skips the
  compile when ``helpers_cpp`` imports.
* Megatron's defaults ``persist_layer_norm`` and ``gradient_accumulation_fusion`` need NVIDIA
  Apex. ``apply_defaults_without_apex`` turns them off, with a note, when Apex is missing.

``--cpu`` (``cpu_argv``) adds the flags a CPU run over gloo needs and installs
``megatron_channel.cpu``; without it and without a GPU the launch stops naming ``--cpu``.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ..megatron_internals.patches import apply_patch, find_patch
from ..step.layout import rows_are_packed
from .models import is_hybrid

CPU_FLAG = "--cpu"
# Megatron flags a CPU run needs; given first, so the user's own later values win where
# they may (check_cpu_args refuses the ones that cannot work on a CPU). The Apex-only
# defaults are turned off by apply_defaults_without_apex, as on any machine without Apex.
CPU_DEFAULT_FLAGS = (
    "--distributed-backend", "gloo",
    "--transformer-impl", "local",
    "--num-workers", "0",  # no loader processes to compete with the ranks for the cores
)
CPU_ATTENTION_SPEC = ("megatron_channel.cpu", "gpt_layer_spec")
# HybridModel on the CPU: Megatron's local attention (*) and MLP (-) layers, pipeline stages (|);
# Mamba (M), GDN (G), MoE (E), latent attention (D, +) and MTP depths (/) need CUDA kernels or
# Transformer Engine specs.
CPU_HYBRID_SPEC = ("megatron_channel.cpu.hybrid_spec", "hybrid_stack_spec")
CPU_HYBRID_SYMBOLS = frozenset("*-|")


class LaunchError(RuntimeError):
    """The launch cannot start on this machine with these flags."""


def skip_built_dataset_helpers() -> None:
    """Make Megatron's dataset-helper compile a no-op when the built helpers import (idempotent)."""
    from megatron.core.datasets import utils as dataset_utils

    if find_patch(dataset_utils, "compile_helpers") is not None:
        return
    original = dataset_utils.compile_helpers

    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original()  # a source checkout: build them as Megatron does
        print("> dataset index helpers already built (megatron.core.datasets.helpers_cpp), not compiling", flush=True)

    # initialize_megatron imports compile_helpers from this module when it calls it.
    apply_patch(dataset_utils, {"compile_helpers": compile_helpers},
                reason="the wheel ships the dataset helpers built but no Makefile to build them")


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apply_defaults_without_apex(args) -> list[str]:
    """Turn off the Apex-only defaults when Apex is missing; returns the flags applied."""
    applied = []
    if not args.no_persist_layer_norm and not has_module("apex"):
        # Without Apex the local spec's norm is torch's LayerNorm, which asserts this off.
        args.no_persist_layer_norm = True
        applied.append("--no-persist-layer-norm")
    if args.gradient_accumulation_fusion and not has_module("fused_weight_gradient_mlp_cuda"):
        # Megatron's ColumnParallelLinear (the output layer on every spec) raises without it.
        args.gradient_accumulation_fusion = False
        applied.append("--no-gradient-accumulation-fusion")
    if applied and getattr(args, "rank", 0) == 0:
        print(f"> NVIDIA Apex not found: training as with {' '.join(applied)}", flush=True)
    return applied


def cpu_argv(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--cpu`` and, if it was there, with the CPU flags in front."""
    if CPU_FLAG not in argv:
        return list(argv), False
    rest = [a for a in argv if a != CPU_FLAG]
    return [*CPU_DEFAULT_FLAGS, *rest], True


def require_cuda_or_cpu(cpu: bool) -> None:
    if not cpu and not torch.cuda.is_available():
        raise LaunchError(
            "no CUDA GPU found: Megatron's pretrain() trains on GPUs. To train on this machine's "
            "CPU over gloo (a dry run of the same flags), add --cpu"
        )


def needs_cpu_attention(args) -> bool:
    """Megatron's local attention refuses packed rows (``cu_seqlens``) and CP > 1."""
    return rows_are_packed(args) or args.context_parallel_size > 1


def check_cpu_args(args) -> None:
    """Refuse, naming the flag, what cannot run on the CPU; pick the CPU attention when needed."""
    if args.distributed_backend != "gloo":
        raise LaunchError(f"--cpu trains over gloo; drop --distributed-backend {args.distributed_backend}")
    if args.transformer_impl != "local":
        raise LaunchError(
            f"--cpu needs Megatron's local layers (Transformer Engine runs on GPUs only); "
            f"drop --transformer-impl {args.transformer_impl}"
        )
    if args.position_embedding_type in ("rope", "yarn", "mrope") and args.apply_rope_fusion:
        raise LaunchError("--cpu cannot run the fused RoPE kernel; add --no-rope-fusion")
    for flag, on in (("--bf16", args.bf16), ("--fp16", args.fp16)):
        if on:
            raise LaunchError(f"--cpu trains in float32 over gloo; drop {flag}")
    if is_hybrid(args):
        check_cpu_hybrid_args(args)
    elif needs_cpu_attention(args):
        if args.spec is None:
            args.spec = list(CPU_ATTENTION_SPEC)
            if args.rank == 0:
                print(f"> --cpu: packed rows or context parallelism, using --spec {' '.join(CPU_ATTENTION_SPEC)}",
                      flush=True)
        elif tuple(args.spec) != CPU_ATTENTION_SPEC:
            raise LaunchError(
                "--cpu with packed rows (--sft) or --context-parallel-size > 1 needs the CPU attention: "
                f"use --spec {' '.join(CPU_ATTENTION_SPEC)} (or drop --spec)"
            )


def check_cpu_hybrid_args(args) -> None:
    """``--cpu`` with ``--hybrid-layer-pattern``: attention and MLP layers only, with the CPU spec."""
    pattern = args.hybrid_layer_pattern
    other = sorted(set(pattern) - CPU_HYBRID_SYMBOLS)
    if other:
        raise LaunchError(
            f"--cpu builds a HybridModel of attention (*) and MLP (-) layers only; --hybrid-layer-pattern "
            f"{pattern!r} also has {other}, whose layers (Mamba M, GDN G, MoE E, latent attention D/+, "
            "multi-token prediction after /) need CUDA kernels or Transformer Engine specs: train that pattern on GPUs"
        )
    if args.spec is None:
        args.spec = list(CPU_HYBRID_SPEC)
        if args.rank == 0:
            print(f"> --cpu: HybridModel, using --spec {' '.join(CPU_HYBRID_SPEC)}", flush=True)
    elif tuple(args.spec) != CPU_HYBRID_SPEC:
        raise LaunchError(
            f"--cpu with --hybrid-layer-pattern needs the CPU hybrid stack: use --spec {' '.join(CPU_HYBRID_SPEC)} "
            "(or drop --spec)"
        )
