#!/usr/bin/env bash
# The GPU check of issue 12 in one command (see bench/gpu_check.py's docstring; extra flags pass through):
#   bash bench/gpu_check.sh                 # on a GPU machine: < 10 min on one H200, writes $OUT/gpu_check.json
#   bash bench/gpu_check.sh --device cpu --items 24 --holdout 8    # dry run on the CPU
# Needs the project installed (`pip install -e .`) and torch with CUDA; checks both first and stops, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
