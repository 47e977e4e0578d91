#!/usr/bin/env bash
# Set-up for m2f: installs into the active Python environment.
# torch goes first, pinned, only when absent: a loose requirement asked first would pull the
# newest CUDA build (several GB); an existing torch (a user's CUDA build) is left alone.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev]"
