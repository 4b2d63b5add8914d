#!/usr/bin/env bash
# The main job on an embedded default (see README): set up, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,train
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m training.demo "$@"
