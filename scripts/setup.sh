#!/usr/bin/env bash
# Create .venv and install fedmed into it. Usage: scripts/setup.sh [dev]
# torch goes in first: installing the project before torch would pull a multi-GB CUDA build
# on a CPU machine. Sites with GPUs install their CUDA torch first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FEDMED_TORCH_SPEC:-torch==2.13.0}
extra=${1:-}

if [ ! -x .venv/bin/python ]; then
    echo "fedmed setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "fedmed setup: installing $TORCH_SPEC"
    pip install "$TORCH_SPEC"
fi
echo "fedmed setup: installing fedmed${extra:+[$extra]}"
pip install -e ".${extra:+[$extra]}"
