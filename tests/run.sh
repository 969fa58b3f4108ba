#!/usr/bin/env bash
# The one test command (README): CPU only, offline, one thread per test process.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
exec python -m pytest -q "$@"
