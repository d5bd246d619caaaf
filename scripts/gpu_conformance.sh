#!/usr/bin/env bash
# The full-size conformance report of this machine's GPU, one backend at a time (each under its
# own time limit, so one slow library cannot hold up the rest), merged into one report:
# docs/results/<gpu>/conformance.md and .json (or FOLDER). A report already there is extended.
# Usage, from the repository root after `pip install -e ".[fbgemm,torchao,test]"`:
#   bash scripts/gpu_conformance.sh [--out FOLDER] BACKEND:SECONDS [BACKEND:SECONDS ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=docs/results/$(bash scripts/gpu_name.sh)
if [ "${1:-}" = --out ]; then out=$2; shift 2; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for spec in "$@"; do
    backend=${spec%%:*}; seconds=${spec##*:}
    echo "== $backend (at most ${seconds}s)"
    merge=$([ -f "$out/conformance.json" ] && echo --merge)
    timeout "$seconds" fp8dispatch conformance --full --backend "$backend" --report "$out/conformance.md" $merge 2>&1 \
        | grep -v '^\s*$' | tail -25
done
