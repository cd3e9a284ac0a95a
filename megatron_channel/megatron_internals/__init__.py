"""The one home of what megatron_channel assumes about Megatron, and of every patch it makes.

* ``releases``: the megatron-core releases supported, and what differs between them, as a table.
* ``loop``: what the package relies on in ``megatron.training`` (the functions it wraps,
  their parameters, console wording, ``train_step``'s result), checked at install time.
* ``launch``: the launch's per-release calls (argument parsing, model config, ``pretrain()``).
* ``core_api``: ``megatron.core`` calls whose signatures moved between releases.
* ``patches``: the one helper every replacement of another library's attribute goes through:
  it checks the target, marks the replacement (``__wrapped__``), logs one line and can undo it.

Supporting a new release means editing this subpackage only.
"""

from .loop import check_megatron_internals
from .patches import Patch, applied_patches, apply_patch, original_of, undo_all_patches
from .releases import RELEASES, MegatronInternalsError, MegatronRelease, UntestedMegatronWarning, release_for

__all__ = [
    "MegatronInternalsError",
    "MegatronRelease",
    "Patch",
    "RELEASES",
    "UntestedMegatronWarning",
    "applied_patches",
    "apply_patch",
    "check_megatron_internals",
    "original_of",
    "release_for",
    "undo_all_patches",
]
