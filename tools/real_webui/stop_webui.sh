#!/bin/bash
# Stop the WebUI that start_webui.sh started (by its pid file only): SIGTERM, then SIGKILL after 30 s.
ROOT=${ROOT:-/work/realwebui}
PID=$(cat "$ROOT/webui.pid" 2>/dev/null)
if [ -z "$PID" ] || ! kill -0 "$PID" 2>/dev/null; then echo "not running"; rm -f "$ROOT/webui.pid"; exit 0; fi
CMD=$(tr '\0' ' ' < "/proc/$PID/cmdline" 2>/dev/null)
if [ -z "$CMD" ]; then echo "not running (pid $PID just ended)"; rm -f "$ROOT/webui.pid"; exit 0; fi
case "$CMD" in *launch.py*) ;; *) echo "pid $PID is not the WebUI ($CMD): left alone"; exit 1 ;; esac
kill "$PID"
for _ in $(seq 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$PID" 2>/dev/null; then kill -9 "$PID"; echo "killed $PID"; else echo "stopped $PID"; fi
rm -f "$ROOT/webui.pid"
