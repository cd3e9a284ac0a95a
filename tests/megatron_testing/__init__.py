"""Test support: real Megatron-Core models on a CPU over gloo, in the test's own processes.

Unit tests build ``GPTModel`` and ``parallel_state`` directly (the end-to-end tests run the
launch script with ``--cpu`` instead). Megatron's model code runs on a CPU except for three
CUDA assumptions, handled as follows:

1. ``GlobalMemoryBuffer.get_tensor`` allocates on the GPU: ``init_parallel`` calls
   ``megatron_channel.cpu.cuda_on_cpu.allocate_global_buffers_on_cpu`` (the one module of
   CUDA stand-ins).
2. The CUDA RNG tracker forks CUDA generator state: ``init_parallel`` installs Megatron's
   own CPU-capable inference tracker instead.
3. RoPE and the fused kernels call CUDA: ``tiny_gpt`` uses learned absolute positions and
   the local (non-Transformer-Engine) layer spec.

The local attention asserts ``packed_seq_params is None``; ``block_causal_mask`` builds the
equivalent block-diagonal causal mask so a packed row can run on a CPU, and
``PackedAsBlockMask`` wraps a model to do so for every packed call.
Nothing else of Megatron is replaced.

``byte_tokenizer`` is a file-free chat tokenizer for Megatron's SFT dataset. This lives with
the tests, not in the package; ``scripts/bench_channel_loss.py`` puts ``tests/`` on its path.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import traceback

import torch
import torch.distributed as dist

from megatron_channel.cpu.cuda_on_cpu import allocate_global_buffers_on_cpu


def init_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> None:
    """Megatron's ``parallel_state`` over the already-initialized gloo default group."""
    from megatron.core import parallel_state, tensor_parallel

    allocate_global_buffers_on_cpu()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)


def tiny_gpt_config(tp: int = 1, pp: int = 1, cp: int = 1, hidden: int = 32, layers: int = 2, heads: int = 4):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def tiny_gpt(vocab_size: int = 64, seq_length: int = 32, **config_kwargs):
    """A small real ``GPTModel`` that runs on the CPU (local spec, learned positions)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = tiny_gpt_config(**config_kwargs)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        position_embedding_type="learned_absolute",
        parallel_output=True,
    )


def tiny_hybrid(vocab_size: int = 64, seq_length: int = 32, pattern: str = "*-*-", **config_kwargs):
    """A small real ``HybridModel`` (megatron-core 0.18 on) that runs on the CPU: attention and MLP
    layers of ``pattern`` from ``megatron_channel.cpu.hybrid_spec`` (packed rows and CP too)."""
    import dataclasses

    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_channel.cpu.hybrid_spec import hybrid_stack_spec

    config = dataclasses.replace(tiny_gpt_config(**config_kwargs), num_layers=len(pattern), is_hybrid_model=True)
    return HybridModel(
        config=config,
        hybrid_stack_spec=hybrid_stack_spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        hybrid_layer_pattern=pattern,
        position_embedding_type="learned_absolute",
        parallel_output=True,
    )


def block_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[1, 1, s, s]`` bool mask (True = masked) equal to THD attention over ``cu_seqlens``.

    Token ``q`` sees token ``k`` iff both are in the same sequence and ``k <= q``. Tokens
    after the last boundary form one more sequence.
    """
    pos = torch.arange(seq_length)
    seq_id = torch.searchsorted(cu_seqlens.long().reshape(-1), pos, right=True)
    same = seq_id[:, None] == seq_id[None, :]
    causal = pos[None, :] <= pos[:, None]
    return ~(same & causal)[None, None]


class PackedAsBlockMask(torch.nn.Module):
    """A GPTModel whose packed (THD) calls run on Megatron's local attention, which refuses
    ``packed_seq_params``: those become the equivalent ``block_causal_mask`` of their
    ``cu_seqlens_q_padded`` (else ``cu_seqlens_q``). Every other argument, the output
    processor included, passes through. Calls run under ``CudaDevicesOnCpu``: without a mask
    the local attention builds its causal mask on ``device="cuda"``. ``seen_packed_seq_params``
    records what each call was given.
    """

    def __init__(self, gpt):
        super().__init__()
        self.module = gpt  # get_attr_wrapped_model unwraps through .module
        self.seen_packed_seq_params = []

    def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None, **kwargs):
        self.seen_packed_seq_params.append(packed_seq_params)
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            attention_mask = block_causal_mask(cu, tokens.shape[1])
        return self.direct(tokens, position_ids, attention_mask, **kwargs)

    def direct(self, *args, **kwargs):
        """GPTModel itself, called with these arguments."""
        from megatron_channel.cpu.cuda_on_cpu import CudaDevicesOnCpu

        with CudaDevicesOnCpu():
            return self.module(*args, **kwargs)


def init_single_process_group() -> None:
    """A one-rank gloo world, rendezvous through a fresh file (no TCP port to race for)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    store_dir = tempfile.mkdtemp(prefix="gloo-")
    atexit.register(shutil.rmtree, store_dir, True)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, 'store')}", rank=0, world_size=1)


def _worker(rank, world_size, store, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # reported to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return results by rank.

    Raises ``RuntimeError`` with the failing rank's traceback, or ``TimeoutError`` (after
    killing every process) if the ranks do not all finish in ``timeout`` seconds.
    """
    import queue as queue_module
    import time

    ctx = torch.multiprocessing.get_context("spawn")
    results_queue = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="gloo-")  # rendezvous file: no TCP port to race for
    store = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store, fn, args, results_queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish in {timeout}s")
            try:
                rank, status, payload = results_queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [results[r] for r in range(world_size)]


def random_packed_row(seed: int, seq_length: int, vocab_size: int, masked_share: float) -> dict:
    """One packed row of 4 sequences (random cuts, then a zero-length padding slot): random tokens
    and labels, about ``masked_share`` of the tokens out of the loss, a channel in {0, 1, 2, -1}
    per sequence. ``[1, seq_length]`` fields, ``cu_seqlens`` ``[1, 6]`` int32."""
    import random

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(rng.sample(range(1, seq_length), 3))
    cu = [0, *cuts, seq_length, seq_length]
    positions = [t - max(c for c in cu if c <= t) for t in range(seq_length)]
    return dict(tokens=torch.randint(0, vocab_size, (1, seq_length), generator=gen),
                labels=torch.randint(0, vocab_size, (1, seq_length), generator=gen),
                loss_mask=(torch.rand(1, seq_length, generator=gen) > masked_share).float(),
                position_ids=torch.tensor([positions]), cu_seqlens=torch.tensor([cu], dtype=torch.int32),
                channels=torch.tensor([rng.choices([0, 1, 2, -1], k=len(cu) - 1)]))
