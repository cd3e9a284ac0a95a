#!/usr/bin/env bash
# The main job (creates .venv with Python 3.12 and installs the package on first use):
# a tiny GPT trained through Megatron's pretrain() on a 3-channel blend (configs/tiny_gpt_blend.sh),
# then the PNG of its channel curves.
#   with a GPU:    NPROC GPUs (default 1)
#   without a GPU: --cpu, 2 gloo ranks on the CPU (data parallel)
# Extra arguments go to pretrain_gpt_channel.py (Megatron and channel flags).
source "$(dirname "$0")/_env.sh"
export PYTHONWARNINGS=ignore
RUN_DIR="$ROOT/runs/tiny_gpt_blend"
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    NPROC="${NPROC:-1}"; DEVICE_FLAGS=()
else
    NPROC="${NPROC:-2}"; DEVICE_FLAGS=(--cpu)
    echo "no GPU: training on the CPU over $NPROC gloo ranks (--cpu)"
fi
python scripts/make_tiny_data.py --out runs/tiny_data
rm -rf "$RUN_DIR"  # a fresh run: its jsonl and TensorBoard events start empty
# --channel-token-accuracy: each channel's token accuracy beside its loss (the PNG's middle panel).
RUN_DIR="$RUN_DIR" NPROC="$NPROC" ./configs/tiny_gpt_blend.sh "${DEVICE_FLAGS[@]}" --channel-token-accuracy "$@" \
    2>&1 | tee "$RUN_DIR.log"
python scripts/plot_channels.py "$RUN_DIR/tensorboard/channels.jsonl" -o "$RUN_DIR/channels.png" \
    --title "tiny GPT on a 3-channel blend through Megatron's pretrain() (${DEVICE_FLAGS[*]:-GPU}, $NPROC ranks)"
echo "console log:        $RUN_DIR.log"
echo "TensorBoard events: $RUN_DIR/tensorboard  (tensorboard --logdir $RUN_DIR/tensorboard)"
echo "jsonl log:          $RUN_DIR/tensorboard/channels.jsonl"
echo "curves:             $RUN_DIR/channels.png"
