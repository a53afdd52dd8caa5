#!/usr/bin/env bash
# The two README commands: `bash scripts/run.sh demo` (main job) and `bash scripts/run.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh
case "${1:-}" in
  demo) shift; exec .venv/bin/diffdpo demo --config recipes/configs/soundworld_demo.yaml "$@" ;;
  test) shift; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args...]" >&2; exit 2 ;;
esac
