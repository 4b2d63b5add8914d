#!/usr/bin/env bash
# The test suite (see README): set up, lint, then pytest. Never reaches a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,train,eval,convert
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
python -m pytest -q "$@"
