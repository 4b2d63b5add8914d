#!/usr/bin/env bash
# The main job on an embedded default (see README): set up, then pretrain a small LLaMA on the embedded
# Shakespeare corpus (tokenizer training, data preparation, training, export, samples), then plot the curves.
# Extra arguments override the config, e.g. bash scripts/run.sh --max_steps 100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,train
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
python -m training.pretrain --config training/configs/shakespeare.yaml "$@"
out=$(python - "$@" <<'PY'
import sys
args = sys.argv[1:]
print(args[args.index("--output_dir") + 1] if "--output_dir" in args else "runs/shakespeare")
PY
)
python -m training.plot "$out"
echo "done: $out (metrics.jsonl, loss.png, lr.png, hf/ Hub folder, checkpoints/)"
