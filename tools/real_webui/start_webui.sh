#!/bin/bash
# Start the real WebUI (CPU, offline HF cache, API on) in the background; log in $ROOT/webui.log.
# ROOT defaults to /work/realwebui (webui/ work tree, venv/, hf/ cache: see docs/REAL_WEBUI.md).
ROOT=${ROOT:-/work/realwebui}
PORT=${PORT:-7861}
cd "$ROOT/webui" || exit 1
export PYTHONUNBUFFERED=1 HF_HOME="$ROOT/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nohup "$ROOT/venv/bin/python" launch.py --skip-install --skip-prepare-environment --skip-python-version-check \
  --skip-torch-cuda-test --use-cpu all --no-half --api --port "$PORT" --skip-version-check \
  --ckpt models/Stable-diffusion/random-sd15.safetensors "$@" > "$ROOT/webui.log" 2>&1 &
echo $! > "$ROOT/webui.pid"
echo "pid $(cat "$ROOT/webui.pid"), log $ROOT/webui.log"
