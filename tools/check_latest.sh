#!/usr/bin/env bash
# Drift check, never part of CI's verdict: install the newest versions an environment's .in file
# allows into a scratch venv, list what differs from its lock, run the suite. Exit code: the
# suite's. With --lock, a passing run also rewrites the lock from that venv (review the diff,
# then commit it). --webui: the WebUI's own environment (Python 3.10, requirements-webui.*)
# instead of the main one (Python 3.11, requirements-dev.*); see tools/test_envs.sh.
#   bash tools/check_latest.sh [--webui] [--lock] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/test_envs.sh
. tools/test_envs.sh
lock=0 name=main
while [ $# -gt 0 ]; do
    case "$1" in
        --lock) lock=1 ;;
        --webui) name=webui ;;
        *) break ;;
    esac
    shift
done
test_env "$name"
[ -n "$env_python" ] || { echo "no Python for the $name environment" >&2; exit 2; }
scratch=$(mktemp -d)
venv="${CHARADAPTER_LATEST_VENV:-$scratch/venv}"
"$env_python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$env_in"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$env_nodeps"

# the lock's form: exact pins, no local version labels, the --no-deps packages left out
"$venv/bin/python" - "$env_nodeps" "$env_lock" "$scratch/frozen" <<'PY'
import os, re, subprocess, sys
nodeps_file, lock_file, out_file = sys.argv[1:]
def name(line):
    return re.split(r"[=<>!~ ]", line.strip())[0].lower().replace("_", "-")
nodeps = {name(l) for l in open(nodeps_file) if l.strip() and not l.startswith("#")}
freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                        capture_output=True, text=True, check=True).stdout.split()
pins = {}
for line in freeze:
    package, _, version = line.partition("==")
    if version and name(package) not in nodeps | {"pip"}:
        pins[package] = version.split("+")[0]
lines = open(lock_file).readlines() if os.path.exists(lock_file) else []
locked = {l.split("==")[0]: l.strip().split("==")[1] for l in lines if "==" in l and not l.startswith("#")}
print(f"== newest allowed versions against {lock_file}:")
for package in sorted(set(pins) | set(locked), key=str.lower):
    old, new = locked.get(package, "-"), pins.get(package, "-")
    if old != new:
        print(f"  {package}: {old} -> {new}")
with open(out_file, "w") as f:
    f.write("\n".join(f"{p}=={v}" for p, v in sorted(pins.items(), key=lambda kv: kv[0].lower())) + "\n")
PY
echo "== the suite on them:"
status=0
PATH="$venv/bin:$PATH" bash tests/run.sh "$@" || status=$?
if [ "$status" -eq 0 ] && [ "$lock" -eq 1 ]; then
    { sed -n '/^#/p' "$env_lock"; cat "$scratch/frozen"; } > "$env_lock.new"
    mv "$env_lock.new" "$env_lock"
    echo "== $env_lock rewritten: review with git diff"
fi
exit "$status"
