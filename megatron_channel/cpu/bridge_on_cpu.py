"""Megatron-Bridge on a CPU (``--cpu`` of ``scripts/pretrain_bridge_channel.py`` and the Bridge tests).

Bridge 0.6 does not import without Transformer Engine (``peft/lora_layers.py`` imports
``transformer_engine.pytorch`` unconditionally and evaluates ``te.ops`` annotations), and TE
needs CUDA. ``install_bridge_on_cpu`` therefore puts an import stand-in for ``transformer_engine``
into ``sys.modules``: a package whose every attribute is a class that refuses to be made. It is
installed after ``megatron.core`` is imported, so megatron-core's own ``HAVE_TE`` stays False
and no model uses TE; only Bridge's import-time references see it. It also installs the
``--cpu`` stand-ins for CUDA (``cuda_on_cpu``) and skips the dataset-helper build, which Bridge's
``initialize`` would otherwise try.

Nothing here runs on a GPU machine: a user with TE installed never calls it. The other CPU-only
workaround, the forced pure-Python ``nvidia-resiliency-ext`` 0.6.0 wheel (its published wheel is
tagged for glibc 2.39 and newer), lives in ``scripts/_env.sh: bridge_env``.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

STAND_IN = "transformer_engine"
logger = logging.getLogger("megatron_channel")


class _NoTransformerEngine:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("transformer_engine is an import stand-in on this CPU run (megatron_channel.cpu."
                           "bridge_on_cpu); use a model spec without Transformer Engine")


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    module.__version__ = "0.0.0+cpu-stand-in"
    module.__megatron_channel_stand_in__ = True
    made: dict[str, object] = {}

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in made:
            if attr in ("pytorch", "ops", "common", "recipe"):
                made[attr] = sys.modules[f"{name}.{attr}"] = _stand_in_module(f"{name}.{attr}")
            else:
                made[attr] = type(attr, (_NoTransformerEngine,), {})
        return made[attr]

    module.__getattr__ = __getattr__
    return module


def install_bridge_on_cpu() -> None:
    """Ready this process to import and run Megatron-Bridge on the CPU (call before importing Bridge)."""
    from . import install_cuda_on_cpu
    from ..launch.startup import skip_built_dataset_helpers

    install_cuda_on_cpu()
    import megatron.core  # noqa: F401  (its HAVE_TE checks run before the stand-in exists)

    if STAND_IN not in sys.modules:
        try:
            import transformer_engine  # noqa: F401  (a real install is used as it is)
        except ImportError:
            sys.modules[STAND_IN] = _stand_in_module(STAND_IN)
            sys.modules[f"{STAND_IN}.pytorch"] = sys.modules[STAND_IN].pytorch
            logger.info("megatron_channel: installed an import stand-in for %s (Bridge on the CPU)", STAND_IN)
    skip_built_dataset_helpers()  # before Bridge's initialize binds compile_helpers by name


def uninstall_bridge_on_cpu() -> None:
    """Remove the import stand-in (the CUDA stand-ins: ``uninstall_cuda_on_cpu``)."""
    for name in [n for n in sys.modules if n == STAND_IN or n.startswith(STAND_IN + ".")]:
        if getattr(sys.modules[name], "__megatron_channel_stand_in__", False):
            del sys.modules[name]
