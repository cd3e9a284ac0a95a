#!/usr/bin/env python
"""Transformer Engine's THD kernels on the three sequence lists a packed microbatch can give them.

Megatron's SFT rows pad each row's ``cu_seqlens`` to ``s + 1`` entries. Merging the rows with
every padding entry kept (``merge_packed_rows``, what the package used to hand to attention)
gives ``N = mbs * s`` sequences, nearly all empty, and TE launches work per sequence (fused THD
RoPE a ``max_s x N`` grid; the context-parallel helpers stage ``cu_seqlens`` in 48 KiB of shared
memory; FlashAttention's varlen backward allocates 128 rows per sequence). ``compact_sequences``
hands over ``mbs * max_sequences_per_row`` sequences, the real ones first. For mbs 1 and 2 rows
of ``--seq-length`` tokens, 3 conversations a row, forward + backward in bf16 with ``cu_seqlens``

  (i)   the real sequences only: the reference;
  (ii)  ``compact_sequences`` at the default bound (256 a row): must match (i);
  (iii) the old list, all padding kept (N = mbs*s): reported, never fails the script;

through (a) ``transformer_engine.pytorch.DotProductAttention(qkv_format="thd",
attn_mask_type="padding_causal")`` and (b) TE's fused RoPE ``apply_rotary_pos_emb(t, freqs,
tensor_format="thd", fused=True, cu_seqlens=...)`` at ``max_s = --seq-length``. Per case: PASS or
FAIL (an exception is a FAIL with its first line), the largest difference from (i) over output
and input gradients, the median of ``--repeats`` timed calls (CUDA events, after warm-up), the
extra peak memory of one call. Exit status 1 when a (i) or (ii) case fails. Without CUDA or TE
the GPU cases are SKIP (exit 0); the lists are built and checked on the CPU either way.

    python scripts/check_packed_attention_gpu.py [--seq-length 4096 --heads 16 --head-dim 128]
    NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python scripts/check_packed_attention_gpu.py  # TE logs its backend
"""

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

from megatron_channel.segment_math import compact_sequences, merge_packed_rows  # noqa: E402
from megatron_channel.step.layout import DEFAULT_MAX_SEQUENCES_PER_ROW  # noqa: E402

CONVERSATIONS_PER_ROW = 3
ROWS = (1, 2)
LISTS = ("real", "compact", "old")


@dataclasses.dataclass
class Row:
    case: str
    result: str
    diff: str = ""
    ms: str = ""
    mib: str = ""
    note: str = ""
    old: bool = False


def packed_rows(rows: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """``[rows, s + 1]`` int32 ``cu_seqlens`` in Megatron's SFT form: 3 conversations of random
    length filling each row, then padding entries equal to ``s``."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.full((rows, seq_length + 1), seq_length, dtype=torch.int32)
    for r in range(rows):
        cuts = torch.randperm(seq_length - 1, generator=gen)[: CONVERSATIONS_PER_ROW - 1] + 1
        cu[r, 1:CONVERSATIONS_PER_ROW] = cuts.sort().values
    cu[:, 0] = 0
    return cu


def sequence_lists(rows: int, seq_length: int, per_row: int) -> dict[str, torch.Tensor]:
    """The three ``cu_seqlens`` lists (CPU, int32) of one microbatch, checked against each other."""
    cu_rows = packed_rows(rows, seq_length)
    ends = cu_rows[:, 1:CONVERSATIONS_PER_ROW + 1] + seq_length * torch.arange(rows, dtype=torch.int32)[:, None]
    real = torch.cat([cu_rows.new_zeros(1), ends.reshape(-1)])  # built here, not by the package
    old = merge_packed_rows(cu_rows, seq_length)
    capacity = rows * per_row
    compact, _, _ = compact_sequences(cu_rows, seq_length, capacity)
    n = rows * CONVERSATIONS_PER_ROW
    assert real.numel() == n + 1 and real[0] == 0 and real[-1] == rows * seq_length, real
    assert old.numel() == rows * seq_length + 1, old.numel()
    assert compact.numel() == capacity + 1, compact.numel()
    assert torch.equal(compact[: n + 1], real), (compact[: n + 1], real)
    assert bool((compact[n + 1:] == real[-1]).all()), "compact list: the trailing sequences must be empty"
    for name, cu in (("compact", compact), ("old", old)):
        lengths = cu.diff()
        assert torch.equal(lengths[lengths > 0], real.diff()), f"{name}: its non-empty sequences are not the real ones"
    return {"real": real, "compact": compact, "old": old}


def label(kind: str, rows: int, which: str, cu: torch.Tensor) -> str:
    n = cu.numel() - 1
    name = {"real": f"(i) real, N = {n}", "compact": f"(ii) compact, N = {n}", "old": f"(iii) old, N = mbs*s = {n}"}
    return f"{kind} mbs {rows}: {name[which]}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def measure(run, repeats: int):
    """``run()``'s result, median milliseconds of ``repeats`` calls, extra peak MiB of one call."""
    run(), run()  # warm-up: backend selection, cuDNN plans, lazy allocations
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return result, statistics.median(start.elapsed_time(end) for start, end in events), peak


def compare(result, reference) -> tuple[float, bool]:
    """Largest absolute difference over the tensors, and whether all are within bf16 tolerance."""
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(result, reference))
    close = all(torch.allclose(a.float(), b.float(), rtol=1.6e-2, atol=1e-2) for a, b in zip(result, reference))
    return diff, close


def closures(forward, inputs: list, grad):
    """``make(cu)``: a closure that runs ``forward(cu)`` and its backward, and returns the output
    and the gradients of ``inputs``."""
    def make(cu):
        def run():
            for x in inputs:
                x.grad = None
            out = forward(cu)
            out.backward(grad.view_as(out))  # TE attention returns [t, h * d] for thd
            return [out.detach()] + [x.grad for x in inputs]
        return run
    return make


def bf16_tokens(gen, rows: int, opts, requires_grad: bool):
    x = torch.randn(rows * opts.seq_length, opts.heads, opts.head_dim, generator=gen, device="cuda",
                    dtype=torch.bfloat16)
    return x.requires_grad_(requires_grad)


def attention_factory(te, rows: int, opts):
    """(a): TE's THD attention, causal within each sequence, ``max_seqlen`` the row length."""
    attn = te.DotProductAttention(opts.heads, opts.head_dim, attention_dropout=0.0, qkv_format="thd",
                                  attn_mask_type="padding_causal")
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, grad = (bf16_tokens(gen, rows, opts, i < 3) for i in range(4))
    s = opts.seq_length
    return closures(lambda cu: attn(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s, max_seqlen_kv=s),
                    [q, k, v], grad)


def rope_factory(apply_rope, rows: int, opts):
    """(b): TE's fused RoPE over THD tokens, positions restarting at every sequence, ``max_s`` rows."""
    d, s = opts.head_dim, opts.seq_length
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, device="cuda", dtype=torch.float32), inv_freq)
    freqs = torch.cat([angles, angles], dim=-1).view(s, 1, 1, d)  # [max_s, 1, 1, d] float32
    gen = torch.Generator(device="cuda").manual_seed(2)
    t, grad = (bf16_tokens(gen, rows, opts, i == 0) for i in range(2))
    return closures(lambda cu: apply_rope(t, freqs, tensor_format="thd", fused=True, cu_seqlens=cu), [t], grad)


def find_rope():
    """TE's ``apply_rotary_pos_emb`` (in ``attention.rope`` from TE 2.3, ``attention`` before) and
    where it was found, or None and why not."""
    reasons = []
    for module in ("transformer_engine.pytorch.attention.rope", "transformer_engine.pytorch.attention"):
        try:
            fn = getattr(importlib.import_module(module), "apply_rotary_pos_emb")
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
            reasons.append(f"{module}: {first_line(exc)}")
            continue
        missing = {"tensor_format", "fused", "cu_seqlens"} - set(inspect.signature(fn).parameters)
        if missing:
            reasons.append(f"{module}.apply_rotary_pos_emb takes no {sorted(missing)}")
            continue
        return fn, module
    return None, "; ".join(reasons)


def run_kind(kind: str, factory, lists_by_rows, opts, table: list[Row]) -> None:
    """Cases (i) and (ii) of ``kind`` for every mbs, then the old lists' cases, so that a kernel
    failure there (possibly a lost CUDA context) cannot hide the others."""
    references, makers = {}, {}
    for rows, lists in lists_by_rows.items():
        try:
            makers[rows] = factory(rows)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            table += [Row(label(kind, rows, w, lists[w]), "FAIL", note=first_line(exc), old=w == "old") for w in LISTS]
            continue
        references[rows] = run_case(kind, rows, "real", makers[rows], lists, None, opts, table)
        run_case(kind, rows, "compact", makers[rows], lists, references[rows], opts, table)
    for rows, make in makers.items():
        run_case(kind, rows, "old", make, lists_by_rows[rows], references[rows], opts, table)


def run_case(kind, rows, which, make, lists, reference, opts, table: list[Row]):
    """One row of the table, compared with ``reference``; returns the result of case (i)."""
    row = Row(label(kind, rows, which, lists[which]), "FAIL", old=which == "old")
    table.append(row)
    try:
        result, ms, mib = measure(make(lists[which].cuda()), opts.repeats)
        row.ms, row.mib = f"{ms:.3f}", f"{mib:.1f}"
        if which == "real":
            row.result, row.diff = "PASS", "ref"
            return result
        if reference is None:
            row.note = "no reference: case (i) failed"
        else:
            diff, close = compare(result, reference)
            row.result, row.diff = "PASS" if close else "FAIL", f"{diff:.3g}"
            row.note = "" if close else "differs from (i) beyond bf16 tolerance"
    except Exception as exc:  # noqa: BLE001 - one failing case must not stop the others
        row.note = first_line(exc)
        with contextlib.suppress(Exception):  # a lost CUDA context shows in the next rows
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return None


def skip(table: list[Row], lists_by_rows, kinds, why: str) -> None:
    print(f"{why}: SKIP {' and '.join(kinds)}")
    table += [Row(label(kind, rows, w, lists[w]), "SKIP", note=why[:72], old=w == "old")
              for kind in kinds for rows, lists in lists_by_rows.items() for w in LISTS]


def finish(table: list[Row]) -> int:
    """Print the table; the exit status: 1 when a case other than an old list's failed."""
    cells = [("case", "result", "max diff", "median ms", "peak MiB", "note")]
    cells += [(r.case, r.result, r.diff, r.ms, r.mib, r.note) for r in table]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    for c in cells:
        print("  ".join(c[i].ljust(widths[i]) for i in range(5)) + ("  " + c[5] if c[5] else ""))
    failed = [r for r in table if r.result == "FAIL" and not r.old]
    if failed:
        print(f"FAILED: {len(failed)} case(s) other than the old lists'")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096, help="tokens per row, and max_s of RoPE")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--max-sequences-per-row", type=int, default=DEFAULT_MAX_SEQUENCES_PER_ROW,
                        help="the bound of list (ii)")
    opts = parser.parse_args(argv)

    lists_by_rows = {rows: sequence_lists(rows, opts.seq_length, opts.max_sequences_per_row) for rows in ROWS}
    print(f"cu_seqlens lists built and checked on the CPU for mbs {ROWS}: (ii) holds exactly the real sequences of (i)")
    table: list[Row] = []
    if not torch.cuda.is_available():
        skip(table, lists_by_rows, ("attention", "rope"), "no CUDA device")
        return finish(table)
    for rows, lists in lists_by_rows.items():  # compact_sequences on the GPU gives the CPU's list
        on_gpu = compact_sequences(packed_rows(rows, opts.seq_length).cuda(), opts.seq_length,
                                   rows * opts.max_sequences_per_row)[0]
        ok = torch.equal(on_gpu.cpu(), lists["compact"])
        table.append(Row(f"compact_sequences on the GPU, mbs {rows}", "PASS" if ok else "FAIL",
                         note="" if ok else "differs from the CPU list"))
    try:
        te = importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (missing libraries)
        skip(table, lists_by_rows, ("attention", "rope"), f"transformer_engine not importable ({first_line(exc)})")
        return finish(table)
    te_version = getattr(importlib.import_module("transformer_engine"), "__version__", "?")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, Transformer Engine {te_version}, "
          f"t = mbs x {opts.seq_length}, {opts.heads} heads x {opts.head_dim}, bf16, median of {opts.repeats}")
    run_kind("attention", lambda rows: attention_factory(te, rows, opts), lists_by_rows, opts, table)
    apply_rope, where = find_rope()
    if apply_rope is None:
        skip(table, lists_by_rows, ("rope",), f"no fused RoPE: {where}")
    else:
        print(f"RoPE: {where}.apply_rotary_pos_emb")
        run_kind("rope", lambda rows: rope_factory(apply_rope, rows, opts), lists_by_rows, opts, table)
    return finish(table)


if __name__ == "__main__":
    sys.exit(main())
