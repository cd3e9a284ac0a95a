#!/usr/bin/env bash
# Run the test suite (creates .venv with Python 3.12 and installs the package on first use).
source "$(dirname "$0")/_env.sh"
exec python -m pytest tests "$@"
