#!/usr/bin/env bash
# Drift check, never part of CI's verdict: install the newest versions requirements-dev.in allows
# into a scratch venv, list what differs from the pinned requirements-dev.txt, run the suite.
# Exit code: the suite's. With --lock, a passing run also rewrites requirements-dev.txt from
# that venv (review the diff, then commit it).
#   bash tools/check_latest.sh [--lock] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
lock=0
if [ "${1:-}" = "--lock" ]; then lock=1; shift; fi
scratch=$(mktemp -d)
venv="${CHARADAPTER_LATEST_VENV:-$scratch/venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r requirements-dev.in
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt

# the lock's form: exact pins, no local version labels, the --no-deps packages left out
"$venv/bin/python" - requirements-nodeps.txt requirements-dev.txt "$scratch/frozen" <<'PY'
import re, subprocess, sys
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
locked = {l.split("==")[0]: l.strip().split("==")[1] for l in open(lock_file) if "==" in l and not l.startswith("#")}
print("== newest allowed versions against requirements-dev.txt:")
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
    { sed -n '/^#/p' requirements-dev.txt; cat "$scratch/frozen"; } > requirements-dev.txt.new
    mv requirements-dev.txt.new requirements-dev.txt
    echo "== requirements-dev.txt rewritten: review with git diff"
fi
exit "$status"
