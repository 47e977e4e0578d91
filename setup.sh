#!/usr/bin/env bash
# Set-up for m2f: installs into the active Python environment.
# torch goes first, pinned, only when absent: a loose requirement asked first would pull the
# newest CUDA build (several GB); an existing torch (a user's CUDA build) is left alone.
# Everything else is installed at the versions in constraints.txt, the set the test suite ran on:
# without them pip's resolver can spend tens of minutes backtracking between boto3 and aiobotocore
# (each pins botocore) and then give up. M2F_CONSTRAINTS=none resolves freely instead.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install "torch==2.13.0"
fi
CONSTRAINTS=${M2F_CONSTRAINTS:-constraints.txt}
if [ "$CONSTRAINTS" = "none" ]; then
    "$PY" -m pip install -e ".[dev]"
else
    "$PY" -m pip install -e ".[dev]" -c "$CONSTRAINTS"
fi
