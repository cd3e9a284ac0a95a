#!/usr/bin/env bash
# The Megatron-Bridge demo: the tiny GPT of demo.sh trained through Megatron-Bridge's pretrain() on
# the 3-channel blend (configs/tiny_bridge_blend.sh), then the PNG of its channel curves.
#   with a GPU and Megatron-Bridge installed (e.g. NVIDIA's NeMo container): NPROC GPUs (default 1)
#   otherwise: --cpu, 2 gloo ranks, in .venv-bridge (made on first use: see scripts/_env.sh bridge_env)
# Extra arguments go to pretrain_bridge_channel.py (channel flags, Bridge key=value overrides).
source "$(dirname "$0")/_env.sh"
export PYTHONWARNINGS=ignore
RUN_DIR="$ROOT/runs/tiny_bridge_blend"
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' &&
   python -c 'import megatron.bridge' >/dev/null 2>&1; then
    BRIDGE_PYTHON="$(command -v python)"; NPROC="${NPROC:-1}"; DEVICE_FLAGS=()
else
    BRIDGE_PYTHON="$(bridge_env)"; NPROC="${NPROC:-2}"; DEVICE_FLAGS=(--cpu)
    echo "training on the CPU over $NPROC gloo ranks (--cpu), in $(dirname "$(dirname "$BRIDGE_PYTHON")")"
fi
python scripts/make_tiny_data.py --out runs/tiny_data
rm -rf "$RUN_DIR"  # a fresh run: its jsonl and TensorBoard events start empty
mkdir -p "$RUN_DIR"
RUN_DIR="$RUN_DIR" LAUNCHER="$BRIDGE_PYTHON -m torch.distributed.run --nproc-per-node $NPROC" \
    ./configs/tiny_bridge_blend.sh "${DEVICE_FLAGS[@]}" --channel-token-accuracy "$@" 2>&1 | tee "$RUN_DIR.log"
python scripts/plot_channels.py "$RUN_DIR/tensorboard/channels.jsonl" -o "$RUN_DIR/channels.png" \
    --title "tiny GPT on a 3-channel blend through Megatron-Bridge's pretrain() (${DEVICE_FLAGS[*]:-GPU}, $NPROC ranks)"
echo "console log:        $RUN_DIR.log"
echo "TensorBoard events: $RUN_DIR/tensorboard  (tensorboard --logdir $RUN_DIR/tensorboard)"
echo "jsonl log:          $RUN_DIR/tensorboard/channels.jsonl"
echo "curves:             $RUN_DIR/channels.png"
