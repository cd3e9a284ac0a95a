#!/usr/bin/env bash
# Packed SFT (--sft) where every jsonl line names its channel in a "channel" field, and lines
# of a second, unlabeled file count as `other`. Channel settings from
# configs/channels.yaml (math, code, chat; anything else counts as `other`).
# On GPUs it needs Transformer Engine (packed rows attend through THD: pip install -e .[gpu]); with
# --cpu it runs on the CPU. The chat tokenizer is Megatron's SFTTokenizer over a Hugging Face
# tokenizer directory (scripts/make_sft_tokenizer.py writes a tiny byte-level one):
#
#   python scripts/make_tiny_data.py --out runs/tiny_data      # once
#   TOKENIZER_MODEL=/path/to/hf/tokenizer NPROC=2 configs/sft_channels.sh
#   python scripts/make_sft_tokenizer.py --out runs/sft_tokenizer
#   TOKENIZER_MODEL=runs/sft_tokenizer NPROC=2 configs/sft_channels.sh --cpu
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-$ROOT/runs/tiny_data}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/sft_channels}"

MODEL_ARGS=(
    --num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 256
    --max-position-embeddings 256 --position-embedding-type learned_absolute
    --attention-dropout 0 --hidden-dropout 0
)
TRAIN_ARGS=(
    --micro-batch-size 1 --global-batch-size 8 --train-iters 200
    --lr 1e-3 --lr-decay-style constant --clip-grad 1.0
)
DATA_ARGS=(
    --sft --data-path 0.8 "$DATA_DIR/sft/mixed.jsonl" 0.2 "$DATA_DIR/sft/unlabeled.jsonl"
    --split 95,5,0 --data-cache-path "$DATA_DIR/cache"
    --tokenizer-type SFTTokenizer --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a Hugging Face tokenizer}"
)
CHANNEL_ARGS=(--channel-config "$ROOT/configs/channels.yaml")
LOG_ARGS=(
    --log-interval 10 --eval-interval 50 --eval-iters 4
    --tensorboard-dir "$RUN_DIR/tensorboard"
)

# shellcheck disable=SC2086  # LAUNCHER is a command line
${LAUNCHER:-torchrun --nproc-per-node ${NPROC:-1}} "$ROOT/scripts/pretrain_gpt_channel.py" \
    "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CHANNEL_ARGS[@]}" "${LOG_ARGS[@]}" "$@"
