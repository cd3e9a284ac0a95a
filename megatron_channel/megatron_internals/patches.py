"""Every replacement this package makes in another library goes through ``apply_patch``.

One helper, so that each patch is
* checked: each target attribute must exist and be callable (a wrapper replaces a function),
  else ``MegatronInternalsError`` names it before anything is changed;
* marked: a callable replacement gets ``__wrapped__`` = the original (Liger-Kernel's and
  ``functools.wraps``' convention); ``original_of`` reads it back through our own
  replacements only, so Megatron's decorated functions keep their own ``__wrapped__``;
* logged: one line on the ``megatron_channel`` logger when installed and when undone;
* undoable: ``Patch.undo()`` puts the originals back, ``undo_all_patches()`` everything.

A patch groups the attributes replaced for one reason (``--cpu`` replaces some forty of
``torch.cuda``'s), so one reason is one log line and one undo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .releases import MegatronInternalsError

logger = logging.getLogger("megatron_channel")

# An attribute that did not exist before its patch (``wrap=False`` only): undo deletes it.
ABSENT = object()


@dataclass(eq=False)
class Patch:
    """Attributes of one object replaced for one reason.

    Attributes:
        owner: the module or class whose attributes were replaced.
        reason: why, in a few words (logged).
        originals: attribute name -> its value before (``ABSENT`` when it had none).
        replacements: attribute name -> what was put there.
        applied: False once undone.
    """

    owner: object
    reason: str
    originals: dict[str, object]
    replacements: dict[str, object]
    applied: bool = True

    @property
    def target(self) -> str:
        names = list(self.replacements)
        if len(names) > 6:
            names = [*names[:5], f"... {len(names)} attributes"]
        return f"{owner_name(self.owner)}.{names[0] if len(names) == 1 else '{' + ', '.join(names) + '}'}"

    def undo(self) -> None:
        """Put the originals back. Refuses when someone replaced our replacement since: theirs
        would be lost without a word."""
        if not self.applied:
            return
        moved = [n for n, r in self.replacements.items() if getattr(self.owner, n, ABSENT) is not r]
        if moved:
            raise RuntimeError(
                f"{owner_name(self.owner)}.{moved} were replaced again after megatron_channel patched them "
                f"({self.reason}); undo those replacements first"
            )
        for name, original in self.originals.items():
            _restore(self.owner, name, original)
        self.applied = False
        _APPLIED.remove(self)
        logger.info("megatron_channel: restored %s (%s)", self.target, self.reason)


_APPLIED: list[Patch] = []


def _restore(owner, name: str, original) -> None:
    if original is ABSENT:
        delattr(owner, name)
    else:
        setattr(owner, name, original)


def owner_name(owner) -> str:
    return getattr(owner, "__name__", None) or type(owner).__name__


def apply_patch(owner, replacements: Mapping[str, object], *, reason: str, wrap: bool = True) -> Patch:
    """Replace attributes of ``owner``; returns the ``Patch`` that undoes it.

    Args:
        owner: a module or class.
        replacements: attribute name -> replacement.
        reason: why; logged with the patch.
        wrap: every target must exist and be callable. False: plain values may be replaced and
            missing attributes added (undo deletes those).
    """
    current = {name: getattr(owner, name, ABSENT) for name in replacements}
    if wrap:
        bad = {n: ("missing" if o is ABSENT else "not callable") for n, o in current.items()
               if o is ABSENT or not callable(o)}
        if bad:
            where = owner_name(owner)
            hint = (" This release is not one megatron_channel knows; see megatron_channel.megatron_internals.releases"
                    if where.startswith("megatron") else "")
            raise MegatronInternalsError(
                f"cannot patch {where}: {', '.join(f'{n} is {why}' for n, why in bad.items())} ({reason}).{hint}"
            )
    # What undo puts back: a class's own attribute as stored (a staticmethod stays one), or ABSENT
    # where the class inherits it (undo deletes ours, and the inherited one shows again).
    originals = {name: vars(owner).get(name, ABSENT) if isinstance(owner, type) else current[name]
                 for name in replacements}
    replaced = []
    try:
        for name, new in replacements.items():
            if callable(new) and current[name] is not ABSENT:
                try:
                    new.__wrapped__ = current[name]
                except (AttributeError, TypeError):  # slotted objects: the registry still knows
                    pass
            setattr(owner, name, new)
            replaced.append(name)
    except BaseException:
        for name in reversed(replaced):
            _restore(owner, name, originals[name])
        raise
    patch = Patch(owner, reason, originals, dict(replacements))
    _APPLIED.append(patch)
    logger.info("megatron_channel: patched %s (%s)", patch.target, reason)
    return patch


def log_patches_to_stderr() -> None:
    """Show the patch lines (INFO) on standard error, on global rank 0 only (``RANK`` unset or 0);
    the other ranks make the same patches and stay quiet."""
    if any(getattr(h, "_megatron_channel", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler() if os.environ.get("RANK", "0") == "0" else logging.NullHandler()
    handler.setFormatter(logging.Formatter("> %(message)s"))
    handler._megatron_channel = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Megatron configures the root logger too: one line, not two


def applied_patches() -> list[Patch]:
    """The patches in force, oldest first."""
    return list(_APPLIED)


def find_patch(owner, name: str) -> Patch | None:
    """The patch in force that replaced ``owner.name`` (its replacement still there), if any."""
    for patch in _APPLIED:
        replacement = patch.replacements.get(name, ABSENT) if patch.owner is owner else ABSENT
        if replacement is not ABSENT and getattr(owner, name, ABSENT) is replacement:
            return patch
    return None


def undo_all_patches() -> None:
    """Undo every patch in force, newest first."""
    for patch in reversed(list(_APPLIED)):
        patch.undo()


def original_of(func: Callable) -> Callable:
    """The library's own function behind our replacements of it (``func`` itself when none)."""
    ours = {id(r): r.__wrapped__ for p in _APPLIED for r in p.replacements.values() if hasattr(r, "__wrapped__")}
    seen = set()
    while id(func) in ours and id(func) not in seen:
        seen.add(id(func))
        func = ours[id(func)]
    return func
