#!/usr/bin/env bash
# Sets everything up (.venv with CPU torch + test extra) and runs the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k dicom`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
VENV="${MEDSYNTH_VENV:-.venv}"
# Two threads match the CI machine; tests are sized for it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q --timeout=600 "$@"
