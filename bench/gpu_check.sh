#!/usr/bin/env bash
# Every GPU check in one call (for a lent CUDA machine): GPU tests, extraction, training and decoding
# benchmarks. Reports go to $OUT (the device tool's output folder) or the current directory:
#   bash bench/gpu_check.sh [--quick] [--out_dir DIR]
# Without a CUDA device it says so in one line and exits 1. CI does not run it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
