"""CUDA on the CPU: what lets Megatron's unchanged ``pretrain()`` train over gloo without a GPU.

Megatron's training loop (``pretrain``, ``train_step``, the schedules, DDP, the optimizer,
the RNG tracker, timers) reaches CUDA only through torch-level calls: ``device="cuda"``
arguments, ``torch.cuda.current_device()``, streams, events, RNG state and memory
statistics. ``install_cuda_on_cpu()`` answers each of those on the CPU, for one process
that owns one "device", so that no Megatron function has to be replaced. Each stand-in
below says which Megatron code needs it.

Installed by ``scripts/pretrain_gpt_channel.py --cpu`` (and the tests that run it), never
on a machine that trains on GPUs. Every replacement goes through
``megatron_internals.patches.apply_patch`` (marked, logged, undone by ``uninstall_cuda_on_cpu``).
Pair it with Megatron's own flags
``--distributed-backend gloo --transformer-impl local`` (``--cpu`` sets them, and the launch
turns off the Apex-only defaults) and, for packed rows or CP, ``megatron_channel.cpu.core_attention``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

from ..megatron_internals.patches import Patch, apply_patch, find_patch

_CPU = torch.device("cpu")


def is_cuda_device(device) -> bool:
    """``'cuda'``, ``'cuda:N'``, a CUDA ``torch.device`` or a bare int (a CUDA index)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


# Tensor methods whose first positional argument after self may be a device.
_POSITIONAL_DEVICE = {torch.Tensor.to, torch.Tensor.new_tensor}
# Pinning and CUDA copies have nothing to do on a CPU: return the tensor itself.
_RETURN_SELF = {torch.Tensor.cuda, torch.Tensor.pin_memory}


class CudaDevicesOnCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument of a torch call to the CPU.

    Megatron allocates on ``torch.cuda.current_device()`` or ``"cuda"`` throughout
    (DDP grad buffers, ``GlobalMemoryBuffer``, the schedules' loss tensors, the TP batch
    broadcast), and calls ``Tensor.cuda()``, ``pin_memory()`` and ``record_stream()``.
    ``Tensor.type()`` names a CPU float tensor ``torch.cuda.FloatTensor``, because
    ``clip_grads`` asserts that string.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RETURN_SELF:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if kwargs:
            device = kwargs.get("device")
            if device is not None and is_cuda_device(device):
                kwargs = {**kwargs, "device": _CPU}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        if func in _POSITIONAL_DEVICE and len(args) > 1 and is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        result = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and result.startswith("torch."):
            return result if result.startswith("torch.cuda.") else "torch.cuda." + result[len("torch."):]
        return result


class _Stream:
    """A CUDA stream that does nothing: work on the CPU is already in order."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def synchronize(self):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def query(self):
        return True

    def is_capturing(self):
        return False

    @staticmethod
    def priority_range():
        return (0, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """A CUDA event timed by the wall clock (Megatron's timers read ``elapsed_time``)."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event) -> float:
        return (end_event._time - self._time) * 1000.0


def _returning(value):
    """A new function object per stub: dynamo and some checks reject one object under two names."""

    def stub(*args, **kwargs):
        return value

    return stub


_DEVICE_PROPERTIES = SimpleNamespace(
    name="CPU (megatron_channel cuda_on_cpu)", major=8, minor=0, total_memory=0,
    multi_processor_count=1, is_integrated=False, uuid="cpu",
)


def _cuda_stand_ins() -> dict:
    """``torch.cuda`` attributes for one device per process, each for a reason in Megatron."""
    _default_stream = _Stream()
    cpu_generator = torch.default_generator

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    # Not torch.manual_seed: it seeds every CUDA device too, i.e. calls these again.
    def manual_seed(seed):
        cpu_generator.manual_seed(int(seed))

    def manual_seed_all(seed):
        cpu_generator.manual_seed(int(seed))

    return {
        # initialize_megatron asserts CUDA; _initialize_distributed skips model-parallel
        # init and seeding when device_count() == 0, and calls set_device(local_rank).
        "is_available": _returning(True),
        "device_count": _returning(1),
        "current_device": _returning(0),
        "set_device": _returning(None),
        "device": lambda *args, **kwargs: contextlib.nullcontext(),
        "get_device_properties": _returning(_DEVICE_PROPERTIES),
        "get_device_capability": _returning((8, 0)),
        "get_device_name": _returning(_DEVICE_PROPERTIES.name),
        "is_bf16_supported": _returning(True),
        # Timers, DDP, the schedules and checkpointing synchronize and free caches.
        "synchronize": _returning(None),
        "empty_cache": _returning(None),
        "ipc_collect": _returning(None),
        # Streams and events: the schedules, DDP's bucket communication, Megatron's timers.
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda *args, **kwargs: _default_stream,
        "default_stream": lambda *args, **kwargs: _default_stream,
        "set_stream": _returning(None),
        "stream": lambda *args, **kwargs: contextlib.nullcontext(),
        "is_current_stream_capturing": _returning(False),
        # training_log / report_memory read memory statistics.
        "memory_allocated": _returning(0),
        "max_memory_allocated": _returning(0),
        "memory_reserved": _returning(0),
        "max_memory_reserved": _returning(0),
        "memory_stats": lambda *args, **kwargs: {},
        "reset_peak_memory_stats": _returning(None),
        "mem_get_info": _returning((0, 0)),
        # The CUDA RNG is the CPU default generator, so the TP RNG tracker's forks really
        # change what initialisation draws and TP shards get distinct weights.
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed_all,
        "default_generators": (cpu_generator,),
        # torch.cuda._lazy_call runs its callable at once when CUDA counts as initialized
        # (Megatron's _set_cuda_rng_state goes through it).
        "is_initialized": _returning(True),
        "_lazy_init": _returning(None),
    }


def _thread_run_in_mode(original_run):
    # Torch function modes are per thread: Megatron's async workers and a data loader's
    # pin-memory thread must see CUDA devices rewritten too.
    def run(self):
        with CudaDevicesOnCpu():
            original_run(self)

    return run


def allocate_global_buffers_on_cpu() -> None:
    """Make ``GlobalMemoryBuffer.get_tensor`` allocate on the CPU (idempotent).

    For tests that build Megatron models in their own process without ``install_cuda_on_cpu``:
    the buffer (sequence/tensor-parallel all-gathers) allocates on ``torch.cuda.current_device()``.
    ``install_cuda_on_cpu`` needs no such patch (its device rewriting covers the allocation).
    """
    import operator
    from functools import reduce

    from megatron.core import utils as core_utils

    if find_patch(core_utils.GlobalMemoryBuffer, "get_tensor") is not None:
        return

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required:
            buf = self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype)
        return buf[:required].view(*tensor_shape)

    apply_patch(core_utils.GlobalMemoryBuffer, {"get_tensor": get_tensor},
                reason="tests without --cpu: Megatron's global buffer allocates on the CPU")


_MODE: CudaDevicesOnCpu | None = None
_PATCHES: list[Patch] = []


def install_cuda_on_cpu() -> None:
    """Answer CUDA calls on the CPU for the rest of this process (idempotent; ``uninstall_cuda_on_cpu``
    undoes it)."""
    global _MODE
    if cuda_on_cpu_installed():
        return
    uninstall_cuda_on_cpu()  # what is left of an installation whose patches were undone elsewhere
    # Megatron's jit_fuser warm-up traces through CUDA streams under torch.compile.
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    # Megatron asserts this for TP and CP (it orders GPU kernel launches); a CPU has none.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import torch._dynamo

    reason = "--cpu: CUDA calls answered on the CPU"
    stand_ins = _cuda_stand_ins()
    patches = [
        (torch._dynamo.config, {"disable": True}, False),
        (torch.cuda, stand_ins, False),
        # torch.cuda.random holds the same functions under a second name.
        (torch.cuda.random, {n: stand_ins[n] for n in ("get_rng_state", "set_rng_state", "manual_seed",
                                                       "manual_seed_all")}, False),
        (torch.cuda.nvtx, {"range_push": _returning(None), "range_pop": _returning(None),
                           "range": lambda *args, **kwargs: contextlib.nullcontext()}, True),
        # Adam's graph-capture health check asks the accelerator runtime for its stream.
        (torch.accelerator, {"current_accelerator": _returning(None)}, True),
        (torch.nn.Module, {"cuda": lambda self, device=None: self}, True),
        (threading.Thread, {"run": _thread_run_in_mode(threading.Thread.run)}, True),
    ]
    try:
        for owner, replacements, wrap in patches:
            _PATCHES.append(apply_patch(owner, replacements, reason=reason, wrap=wrap))
    except BaseException:
        uninstall_cuda_on_cpu()
        raise
    # Every tensor-parallel fork of the (shared) generator changes the CPU state, which the
    # RNG tracker reports as a warning each time; it is expected here.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    _MODE = CudaDevicesOnCpu()
    _MODE.__enter__()


def uninstall_cuda_on_cpu() -> None:
    """Undo ``install_cuda_on_cpu`` (no-op when not installed)."""
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    while _PATCHES:
        _PATCHES.pop().undo()


def cuda_on_cpu_installed() -> bool:
    return _MODE is not None and all(patch.applied for patch in _PATCHES)
