#!/usr/bin/env bash
# The tiny GPT of configs/tiny_gpt_blend.sh, trained through Megatron-Bridge's pretrain() on the
# same 3-channel blend (copy, count, noise). ./scripts/demo_bridge.sh runs it.
#
#   python scripts/make_tiny_data.py --out runs/tiny_data          # once
#   NPROC=2 configs/tiny_bridge_blend.sh [--cpu] [Bridge overrides, e.g. model.tensor_model_parallel_size=2]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-$ROOT/runs/tiny_data}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/tiny_bridge_blend}"

DATA_ARGS=(--data-path 0.25 "$DATA_DIR/copy" 0.35 "$DATA_DIR/count" 0.4 "$DATA_DIR/noise")
CHANNEL_ARGS=(--channels-from-blend)
OVERRIDES=(
    train.train_iters=300 train.micro_batch_size=4 train.global_batch_size=16
    validation.eval_interval=50 validation.eval_iters=4
    logger.log_interval=10 "logger.tensorboard_dir=$RUN_DIR/tensorboard"
    "dataset.path_to_cache=$DATA_DIR/cache"
)

# shellcheck disable=SC2086  # LAUNCHER is a command line
${LAUNCHER:-torchrun --nproc-per-node ${NPROC:-1}} "$ROOT/scripts/pretrain_bridge_channel.py" \
    "${DATA_ARGS[@]}" "${CHANNEL_ARGS[@]}" "${OVERRIDES[@]}" "$@"
