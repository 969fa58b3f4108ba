#!/bin/bash
# Stop the WebUI that start_webui.sh started (by its pid file only): SIGTERM, then SIGKILL after 30 s.
ROOT=${ROOT:-/work/realwebui}
PID=$(cat "$ROOT/webui.pid" 2>/dev/null)
if [ -z "$PID" ] || ! kill -0 "$PID" 2>/dev/null; then echo "not running"; rm -f "$ROOT/webui.pid"; exit 0; fi
if ! tr '\0' ' ' < "/proc/$PID/cmdline" | grep -q "launch.py"; then echo "pid $PID is not the WebUI: left alone"; exit 1; fi
kill "$PID"
for _ in $(seq 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$PID" 2>/dev/null; then kill -9 "$PID"; echo "killed $PID"; else echo "stopped $PID"; fi
rm -f "$ROOT/webui.pid"
