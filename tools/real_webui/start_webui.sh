#!/bin/bash
# Start the real WebUI (CPU, fp32, offline HF cache, API on) in the background, on 127.0.0.1 only;
# log in $ROOT/webui.log, pid in $ROOT/webui.pid; stop it with stop_webui.sh. Waits until the
# API answers (WAIT=0: don't) and prints how long the start took. See docs/REAL_WEBUI.md.
#   ROOT        /work/realwebui (webui/ work tree, venv/, hf/ cache)
#   PORT        7861
#   CKPT        random-sd15.safetensors (or random-sdxl.safetensors), in models/Stable-diffusion
#   MEM_CAP_GB  unset; else a hard cap on the process's address space (prlimit --as): past it
#               allocations fail in this process only (a 500 from the API, or a failed start)
#               instead of the kernel's OOM killer picking a process on the shared machine
#   OOM_SCORE_ADJ 1000: the OOM killer's first choice is this process, not another job's
# Extra arguments go to launch.py.
ROOT=${ROOT:-/work/realwebui}
PORT=${PORT:-7861}
CKPT=${CKPT:-random-sd15.safetensors}
cd "$ROOT/webui" || exit 1
if [ -s "$ROOT/webui.pid" ] && kill -0 "$(cat "$ROOT/webui.pid")" 2>/dev/null; then
  echo "already running: pid $(cat "$ROOT/webui.pid") (stop_webui.sh first)"; exit 1
fi
# No --listen / --server-name: the WebUI then leaves the host to gradio, which binds
# GRADIO_SERVER_NAME (--server-name would also mark the WebUI "non-local" and change its behaviour).
export GRADIO_SERVER_NAME=127.0.0.1 PYTHONUNBUFFERED=1 HF_HOME="$ROOT/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
CAP=()
if [ -n "$MEM_CAP_GB" ]; then CAP=(prlimit --as=$((MEM_CAP_GB * 1024 * 1024 * 1024)) --); fi
START=$(date +%s)
nohup "${CAP[@]}" "$ROOT/venv/bin/python" launch.py --skip-install --skip-prepare-environment \
  --skip-python-version-check --skip-torch-cuda-test --skip-version-check --no-download-sd-model \
  --use-cpu all --no-half --api --port "$PORT" --ckpt "models/Stable-diffusion/$CKPT" "$@" \
  > "$ROOT/webui.log" 2>&1 &
PID=$!
echo $PID > "$ROOT/webui.pid"
# if the machine runs out of memory anyway, the kernel's OOM killer takes this process first
echo "${OOM_SCORE_ADJ:-1000}" > "/proc/$PID/oom_score_adj"
echo "pid $PID, log $ROOT/webui.log, http://127.0.0.1:$PORT${MEM_CAP_GB:+, address space capped at ${MEM_CAP_GB} GiB}"
[ "${WAIT:-1}" = 0 ] && exit 0
# the page and API answer first; the checkpoint loads in a thread after that ("Model loaded in")
until curl -sf "http://127.0.0.1:$PORT/internal/ping" > /dev/null && grep -q "^Model loaded in" "$ROOT/webui.log"; do
  if ! kill -0 $PID 2>/dev/null; then echo "the WebUI exited during start: tail $ROOT/webui.log"; exit 1; fi
  sleep 2
done
echo "ready after $(($(date +%s) - START)) s ($(grep "^Startup time" "$ROOT/webui.log" | cut -c1-20)," \
  "$(grep "^Model loaded in" "$ROOT/webui.log" | cut -d'(' -f1)); listening on:" \
  "$(ss -ltnH "( sport = :$PORT )" | awk '{print $4}' | sort -u | tr '\n' ' ')"
