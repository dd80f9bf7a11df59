#!/usr/bin/env bash
# Times what a new user does: a fresh clone, then `make run` (venv, install, stubs, local stack,
# quickstart pipeline). Pip's download cache is left as it is; pass --no-cache to empty a private one.
# Usage: bench/fresh_make_run.sh [--no-cache]   (prints the wall time and the candidates table)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/tailor-fresh-XXXX)
if [ "${1:-}" = "--no-cache" ]; then export PIP_CACHE_DIR="$work/pip-cache"; fi
git clone -q "$repo" "$work/tailor"
cd "$work/tailor"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; python $(python3 -V 2>&1)"
start=$(date +%s)
make run 2>&1 | tee "$work/make-run.log"
echo "make run on a fresh clone: $(( $(date +%s) - start )) s (log: $work/make-run.log)"
