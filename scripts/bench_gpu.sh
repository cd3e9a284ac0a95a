#!/usr/bin/env bash
# The GPU half of the performance checks, one command on a machine with CUDA:
#   1. tests/test_no_sync_cuda.py: forward_step and the loss under set_sync_debug_mode("error");
#   2. scripts/bench_channel_loss.py: the per-microbatch grid with its cuda rows, CUDA events and
#      extra peak memory, rewriting docs/performance.md with the GPU verdicts;
#   3. scripts/bench_pretrain.py: a tiny GPT through Megatron's pretrain() with and without
#      channel tracking, iteration time ratio (extra arguments go to it).
# Megatron's local layer spec is used throughout, so Transformer Engine is not needed.
source "$(dirname "$0")/_env.sh"
export PYTHONWARNINGS=ignore
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench_gpu.sh needs a CUDA GPU; the CPU half is python scripts/bench_channel_loss.py")'
python -m pytest -q -p no:cacheprovider tests/test_no_sync_cuda.py
python scripts/bench_channel_loss.py
python scripts/bench_pretrain.py "$@"
