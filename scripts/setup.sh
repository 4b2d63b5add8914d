#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv, a CPU build of torch when no torch is
# installed (pip install torch==2.13.0 takes the local CPU wheel; a plain `torch` would pull a multi-GB CUDA
# build), then this project with the extras given as arguments (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing CPU torch 2.13.0"
  pip install -q "torch==2.13.0"
fi
stamp=".venv/.installed-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the project with extras [$EXTRAS]"
  pip install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
