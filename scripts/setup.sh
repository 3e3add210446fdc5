#!/usr/bin/env bash
# Creates .venv and installs medsynth (CPU torch, no torchvision). Idempotent.
# Usage: bash scripts/setup.sh            # package only
#        bash scripts/setup.sh --test     # package + test extra
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MEDSYNTH_VENV:-.venv}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU torch build first: an unbounded torch requirement would otherwise pull CUDA wheels.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing the CPU build of torch"
  $PIP install --quiet "torch==2.13.0"
fi
echo "[setup] installing medsynth$extras"
$PIP install --quiet -c constraints.txt -e ".$extras"
if "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  echo "[setup] torchvision is installed; it breaks transformers beside CPU torch here. Remove it: $PIP uninstall torchvision" >&2
  exit 1
fi
echo "[setup] done: $VENV/bin/medsynth"
