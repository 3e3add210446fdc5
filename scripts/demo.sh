#!/usr/bin/env bash
# Sets everything up (.venv with CPU torch) and runs `medsynth demo`.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --modality mr --out my_demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEDSYNTH_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/medsynth" demo "$@"
