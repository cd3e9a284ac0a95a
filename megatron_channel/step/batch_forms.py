"""The batch forms ``forward_step`` accepts, rewritten into the one form the rest of the step reads.

Real pipelines build batches in several forms; each becomes the canonical one (the fields of
``layout.DTYPES``, shapes of ``BatchLayout.shapes``) on tensor-parallel rank 0, before any
check or collective:

* Names: ``input_ids`` is ``tokens`` (Hugging Face collators, Megatron-Bridge);
  ``cu_seqlens_q`` / ``cu_seqlens_q_padded`` are ``cu_seqlens`` / ``cu_seqlens_padded``
  (Megatron-Bridge's packed rows). Giving both names of one field is an error.
* One row of 1-D tensors ``[s]`` (the forward_step Megatron-Bridge users port from) is the
  batch ``[1, s]``; its ``channels`` may be 0-d.
* No ``position_ids``: ``arange(s)`` per row, or restarting at 0 at every packed sequence
  (at the ``cu_seqlens_padded`` boundaries when given, where the sequences are laid out).
* ``attention_mask`` absent or None: causal attention, no mask. A bool mask of any shape that
  broadcasts to ``[b, 1, s, s]`` (``[1, 1, s, s]`` from Megatron's
  ``get_ltor_masks_and_position_ids``) is kept as it is; GPTModel broadcasts it.
* Padding of ``cu_seqlens``: trailing entries equal to the row length (Megatron's SFTDataset)
  or repeating the last boundary (Megatron-Bridge) are zero-length sequences already;
  Megatron-Bridge's legacy trailing ``-1`` entries (with ``cu_seqlens_argmin``, the index of
  the first -1) become the last boundary.
* ``max_seqlen``: a host int, or a 0-d / per-row CPU tensor (SFTDataset collated), gives the
  bound on sequence lengths passed to attention (checked against the boundaries); a GPU
  tensor is not read, and under tensor parallelism the row length is used on every rank.
  ``cu_seqlens_kv*`` / ``max_seqlen_kv`` are dropped: self-attention uses the q boundaries.

Every rewrite is a shape operation or runs on the tensors' own device; values are read on
the host only for CPU tensors and with ``validate``, so a batch already on a GPU costs no
host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import ChannelBatchError, is_integer_tensor, value_on_cpu
from .layout import BOUNDARY_KEYS, SEQUENCE_KEYS

ALIASES = {"input_ids": "tokens", "cu_seqlens_q": "cu_seqlens", "cu_seqlens_q_padded": "cu_seqlens_padded"}
LEGACY_ARGMIN_KEY = "cu_seqlens_argmin"
DROPPED_KEYS = ("cu_seqlens_kv", "cu_seqlens_kv_padded", "max_seqlen_kv", LEGACY_ARGMIN_KEY)
MAX_SEQLEN_KEYS = ("max_seqlen", "max_seqlen_q")


def canonical_batch(raw, validate: bool = True) -> tuple[dict, int | None]:
    """``raw`` in the canonical form, and the host ``max_seqlen`` it gave (None when none or on a GPU).

    Args:
        raw: what the data iterator yielded: a dict of tensors in any form above.
        validate: check the legacy ``-1`` padding on CPU tensors (``forward_step``'s ``validate``).
    """
    if not isinstance(raw, dict):
        raise ChannelBatchError(f"the data iterator must yield dicts of tensors, got {type(raw).__name__}")
    batch = with_canonical_names(raw)
    if batch.get("attention_mask", 0) is None:
        del batch["attention_mask"]
    if is_single_row(batch):
        batch = as_one_row(batch)
    given_name = {name: alias for alias, name in ALIASES.items() if alias in raw}
    for key in BOUNDARY_KEYS:
        if isinstance(batch.get(key), Tensor):
            batch[key] = fill_legacy_padding(batch[key], batch.get(LEGACY_ARGMIN_KEY), given_name.get(key, key),
                                             validate)
    max_seqlen = None
    for key in MAX_SEQLEN_KEYS:
        if key in batch:
            max_seqlen = host_max_seqlen(batch.pop(key), key, validate)
    for key in DROPPED_KEYS:
        batch.pop(key, None)
    if batch.get("position_ids") is None and isinstance(batch.get("tokens", batch.get("labels")), Tensor):
        batch["position_ids"] = default_position_ids(batch)
    return batch, max_seqlen


def with_canonical_names(raw: dict) -> dict:
    """``input_ids`` -> ``tokens``, ``cu_seqlens_q(_padded)`` -> ``cu_seqlens(_padded)``."""
    batch = dict(raw)
    for alias, name in ALIASES.items():
        if alias not in batch:
            continue
        if batch.get(name) is not None:
            raise ChannelBatchError(
                f"batch carries both '{name}' and '{alias}', two names of one field; give only one of them"
            )
        batch[name] = batch.pop(alias)
    return batch


def is_single_row(batch: dict) -> bool:
    first = batch.get("tokens", batch.get("labels"))
    return isinstance(first, Tensor) and first.dim() == 1


def as_one_row(batch: dict) -> dict:
    """1-D ``[s]`` sequence fields -> ``[1, s]``; ``channels`` -> one row's worth."""
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        value = out.get(key)
        if isinstance(value, Tensor):
            if value.dim() != 1:
                raise ChannelBatchError(
                    f"batch field '{key}' has shape {list(value.shape)} but 'tokens' is one row [s]; "
                    "give every sequence field as [s] (one row) or all as [b, s]"
                )
            out[key] = value.unsqueeze(0)
    channels = out.get("channels")
    if isinstance(channels, Tensor) and channels.dim() <= 1:
        # One id for the row (0-d or [1]), or one per packed sequence ([N]).
        out["channels"] = channels.reshape(1, -1) if "cu_seqlens" in out else channels.reshape(1)
    return out


def fill_legacy_padding(cu_seqlens: Tensor, argmin, name: str, validate: bool = True) -> Tensor:
    """Trailing ``-1`` entries (Megatron-Bridge's legacy padding) -> the row's last boundary.

    With ``validate``, CPU entries are checked (and ``argmin``, ``cu_seqlens_argmin``: per row
    the index of the first -1, against them) and a list without -1 is returned as it is.
    Otherwise nothing is read: the replacement is a ``cummax``, a no-op on a list without -1.
    """
    if not is_integer_tensor(cu_seqlens) or cu_seqlens.numel() == 0:
        return cu_seqlens  # the checks name the dtype
    if validate and value_on_cpu(cu_seqlens) and not check_legacy_padding(cu_seqlens, argmin, name):
        return cu_seqlens
    last_boundary = torch.cummax(cu_seqlens, dim=-1).values
    return torch.where(cu_seqlens == -1, last_boundary, cu_seqlens)


def check_legacy_padding(cu_seqlens: Tensor, argmin, name: str) -> bool:
    """-1 entries only as a trailing run, starting where ``cu_seqlens_argmin`` says; whether any.

    ``cu_seqlens_argmin`` is ``argmin`` of the list: the first -1, or 0 for a row without one.
    """
    rows = cu_seqlens.reshape(-1, cu_seqlens.shape[-1])
    length = rows.shape[1]
    is_pad = rows == -1
    first_pad = torch.where(is_pad.any(1), is_pad.int().argmax(1), length).tolist()
    for r, start in enumerate(first_pad):
        if not bool(is_pad[r, start:].all()):
            where = f"{name}[{r}]" if cu_seqlens.dim() == 2 else name
            raise ChannelBatchError(
                f"{where} = {rows[r].tolist()} has -1 entries followed by boundaries; -1 (Megatron-Bridge's "
                "legacy padding) may only fill the end of the list"
            )
    padded = any(start < length for start in first_pad)
    if not (isinstance(argmin, Tensor) and value_on_cpu(argmin)):
        return padded
    if argmin.numel() != rows.shape[0]:
        raise ChannelBatchError(
            f"{LEGACY_ARGMIN_KEY} has shape {list(argmin.shape)} but {name} has {rows.shape[0]} row(s); "
            "give one index per row"
        )
    got = argmin.reshape(-1).tolist()
    if any(start < length and index != start for index, start in zip(got, first_pad)):
        raise ChannelBatchError(
            f"{LEGACY_ARGMIN_KEY} = {got} but the first -1 of each row of {name} is at "
            f"{[s if s < length else None for s in first_pad]}; it must index the first padding entry"
        )
    return padded


def host_max_seqlen(value, name: str, validate: bool = True) -> int | None:
    """``max_seqlen`` as a host int: an int, or a CPU tensor (0-d, or one value per row: the max).

    A tensor is read only with ``validate`` and on the CPU; else None (the row length bounds it).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise ChannelBatchError(f"batch field '{name}' = {value!r}; give an int or an integer tensor")
    if isinstance(value, int):
        return value
    if not is_integer_tensor(value) or value.dim() > 1:
        raise ChannelBatchError(
            f"batch field '{name}' has dtype {value.dtype} and shape {list(value.shape)}; give an int, a 0-d "
            "integer tensor or one value per row"
        )
    if not (validate and value_on_cpu(value)) or value.numel() == 0:
        return None  # reading a GPU value would make the host wait; the row length bounds it
    return int(value.max())


def default_position_ids(batch: dict) -> Tensor:
    """``[b, s]`` positions: ``arange(s)`` per row, restarting at every packed sequence."""
    first = batch.get("tokens", batch.get("labels"))
    rows, length = first.shape[0], first.shape[-1]
    positions = torch.arange(length, device=first.device).expand(rows, length)
    boundaries = batch.get("cu_seqlens_padded", batch.get("cu_seqlens"))
    if not isinstance(boundaries, Tensor):
        return positions.contiguous()
    cu = boundaries.reshape(rows, -1).to(device=first.device, dtype=torch.long)
    # The sequence a token is in: the last boundary at or before it (zero-length ones skipped).
    sequence = (torch.searchsorted(cu, positions.contiguous(), right=True) - 1).clamp(0, cu.shape[1] - 1)
    return positions - cu.gather(1, sequence)
