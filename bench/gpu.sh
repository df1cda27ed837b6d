#!/usr/bin/env bash
# One command on one CUDA GPU: the GPU tests, the entmax accuracy script and the benchmarks within a time budget
# (default 8 minutes), writing bench/results/<gpu>-<date>.{json,md,log} as it goes. See bench/README.md.
#   bash bench/gpu.sh [--budget SECONDS] [--out DIR] [--only tests,accuracy,bench] [--wheels DIR] [--dry-run]
# PYTHON picks the interpreter (default python3: the one with a CUDA build of torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_run.py "$@"
