#!/usr/bin/env bash
# A tiny GPT trained through Megatron's pretrain() on a 3-channel blend (copy, count, noise),
# one channel per --data-path component. ./scripts/demo.sh runs it (with --cpu when there is no GPU).
#
#   python scripts/make_tiny_data.py --out runs/tiny_data      # once
#   NPROC=2 configs/tiny_gpt_blend.sh [more Megatron flags]     # NPROC GPUs of this node
#   NPROC=2 configs/tiny_gpt_blend.sh --cpu                     # 2 gloo ranks on the CPU
#
# Multi-node: the same flags; set LAUNCHER, e.g.
#   LAUNCHER="torchrun --nnodes 2 --node-rank \$RANK --nproc-per-node 8 --rdzv-endpoint host:29500"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-$ROOT/runs/tiny_data}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/tiny_gpt_blend}"

# HYBRID_LAYER_PATTERN (configs/tiny_hybrid_blend.sh sets it): a HybridModel of that pattern instead.
if [ -n "${HYBRID_LAYER_PATTERN:-}" ]; then LAYERS=(--hybrid-layer-pattern "$HYBRID_LAYER_PATTERN"); else LAYERS=(--num-layers 2); fi
MODEL_ARGS=(
    "${LAYERS[@]}" --hidden-size 128 --num-attention-heads 4 --seq-length 128
    --max-position-embeddings 128 --position-embedding-type learned_absolute
    --transformer-impl local --attention-dropout 0 --hidden-dropout 0
)
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size 16 --train-iters 300
    --lr 3e-3 --lr-decay-style constant --clip-grad 1.0
)
DATA_ARGS=(
    --data-path 0.25 "$DATA_DIR/copy" 0.35 "$DATA_DIR/count" 0.4 "$DATA_DIR/noise"
    --split 95,5,0 --data-cache-path "$DATA_DIR/cache"
    --tokenizer-type NullTokenizer --vocab-size 64
)
CHANNEL_ARGS=(--channels-from-blend)
LOG_ARGS=(
    --log-interval 10 --eval-interval 50 --eval-iters 4
    --tensorboard-dir "$RUN_DIR/tensorboard"
)

# shellcheck disable=SC2086  # LAUNCHER is a command line
${LAUNCHER:-torchrun --nproc-per-node ${NPROC:-1}} "$ROOT/scripts/pretrain_gpt_channel.py" \
    "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CHANNEL_ARGS[@]}" "${LOG_ARGS[@]}" "$@"
