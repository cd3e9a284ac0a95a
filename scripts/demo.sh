#!/usr/bin/env bash
# Run the demo (creates .venv with Python 3.12 and installs the package on first use).
source "$(dirname "$0")/_env.sh"
export PYTHONWARNINGS=ignore
exec python scripts/demo_cpu.py "$@"
