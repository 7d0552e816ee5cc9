#!/usr/bin/env bash
# Create .venv and install TerraHash with the given extras (idempotent; safe to re-run).
# Usage: bash cluster/setup.sh [EXTRAS]    (default all: everything the tests need; the main job asks for main)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch and torchvision are pinned as a pair: the PyPI torchvision only imports beside its own torch.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[${1:-all}]"
python -c "import torch, timm, transformers; print(f'terrahash environment ready: torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}')"
