#!/usr/bin/env bash
# The tiny blend of configs/tiny_gpt_blend.sh as a HybridModel (Megatron's pretrain_hybrid.py,
# which replaces the deprecated GPTModel): --hybrid-layer-pattern "*-*-" is two GPT blocks,
# attention (*) then MLP (-). Mamba (M) layers run on GPUs only; --cpu takes * and - only.
#
#   python scripts/make_tiny_data.py --out runs/tiny_data      # once
#   NPROC=2 configs/tiny_hybrid_blend.sh [more Megatron flags]  # NPROC GPUs of this node
#   NPROC=2 configs/tiny_hybrid_blend.sh --cpu                  # 2 gloo ranks on the CPU
#   HYBRID_LAYER_PATTERN="M-*-" NPROC=8 configs/tiny_hybrid_blend.sh   # another pattern
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HYBRID_LAYER_PATTERN="${HYBRID_LAYER_PATTERN:-*-*-}"
export RUN_DIR="${RUN_DIR:-$ROOT/runs/tiny_hybrid_blend}"
exec "$ROOT/configs/tiny_gpt_blend.sh" "$@"
