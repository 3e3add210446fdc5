#!/usr/bin/env bash
# Sets everything up (.venv with CPU torch + test extra) and runs the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k dicom`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# dciodvfy (Debian dicom3tools) validates exported DICOM; its test skips, saying so, without it.
if ! command -v dciodvfy >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing dicom3tools (dciodvfy)"
  (apt-get update -qq && apt-get install -y -qq dicom3tools >/dev/null) \
    || echo "[test] could not install dicom3tools; the dciodvfy test will be skipped"
fi
VENV="${MEDSYNTH_VENV:-.venv}"
# Two threads match the CI machine; tests are sized for it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q --timeout=600 "$@"
