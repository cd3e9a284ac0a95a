"""Old module paths of this package, importable for one more release with a ``DeprecationWarning``.

The names the package exports are unchanged; only where they live moved when the package
was split by concern. ``import megatron_channel.batch`` (say) still works, warns once, and
gives the module the name now lives in.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

PACKAGE = __name__.rsplit(".", 1)[0]

# old module (relative to the package) -> the module its names live in now
MOVED = {
    "accounting": "channel_logging.windows",
    "arguments": "settings",
    "batch": "step.model_inputs",
    "capture": "channel_logging.metric_capture",
    "channel_logging.megatron_check": "megatron_internals.loop",
    "datasets": "data.tagged",
    "forward_step": "step.forward_step",
    "log_format": "channel_logging.log_fields",
    "loss": "step.loss",
    "megatron_check": "megatron_internals.loop",
    "reduce": "channel_logging.metric_capture",
    "segments": "segment_math",
    "sft": "data.sft",
    "startup": "launch.startup",
    "tokenizer": "testing.byte_tokenizer",
    "training_wrappers": "channel_logging.wrappers",
    "validate": "step.checks",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``megatron_channel.<old>`` and loads it as the module that replaced it."""

    def find_spec(self, fullname, path=None, target=None):
        prefix = PACKAGE + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{PACKAGE}.{MOVED[spec.name[len(PACKAGE) + 1:]]}"
        warnings.warn(f"{spec.name} moved to {new}; import from megatron_channel (the public API) or from {new}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the replacement is already executed


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def moved_names(package: str, modules: tuple[str, ...], renamed: dict[str, str] | None = None):
    """A module ``__getattr__`` for a package whose old module of the same name re-exported
    the names of ``modules``: each old name still resolves, with a ``DeprecationWarning``.

    ``renamed`` maps old names to their new names.
    """
    renamed = renamed or {}

    def __getattr__(name: str):
        new_name = renamed.get(name, name)
        if not name.startswith("__"):
            for module_name in modules:
                module = importlib.import_module(f"{package}.{module_name}")
                if hasattr(module, new_name):
                    warnings.warn(f"{package}.{name} moved to {package}.{module_name}.{new_name}; import it from "
                                  "megatron_channel (the public API) or from there", DeprecationWarning, stacklevel=2)
                    return getattr(module, new_name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
