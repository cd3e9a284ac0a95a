#!/usr/bin/env bash
# The main job (creates .venv with Python 3.12 and installs the package on first use).
#   without a GPU: a tiny GPT trained on the CPU over 2 gloo ranks on a 3-channel blend
#   with a GPU:    the same blend through Megatron's pretrain() (configs/tiny_gpt_blend.sh)
# Extra arguments go to the CPU demo, or to pretrain_gpt_channel.py on a GPU.
source "$(dirname "$0")/_env.sh"
export PYTHONWARNINGS=ignore
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    python scripts/make_tiny_data.py --out runs/tiny_data
    RUN_DIR="$ROOT/runs/tiny_gpt_blend" NPROC="${NPROC:-1}" ./configs/tiny_gpt_blend.sh "$@"
    python scripts/plot_channels.py runs/tiny_gpt_blend/tensorboard/channels.jsonl -o runs/tiny_gpt_blend/channels.png
else
    exec python scripts/demo_cpu.py "$@"
fi
