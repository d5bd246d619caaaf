#!/usr/bin/env bash
# The full-size conformance report of this machine's GPU: every backend named is checked side by side
# (each in its own process, under its own time limit, so one slow library cannot hold up the rest),
# then the reports are merged into one: docs/results/<gpu>/conformance.md and .json (or FOLDER). A
# report already there is extended (a backend checked again replaces its old results).
# Usage, from the repository root after `pip install -e ".[fbgemm,torchao,test]"`:
#   bash scripts/gpu_conformance.sh [--out FOLDER] BACKEND:SECONDS [BACKEND:SECONDS ...]
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --out ]; then out=$2; shift 2; else out=docs/results/$(bash scripts/gpu_name.sh); fi
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for spec in "$@"; do
    backend=${spec%%:*}; seconds=${spec##*:}
    echo "== $backend (at most ${seconds}s)"
    timeout "$seconds" fp8dispatch conformance --full --backend "$backend" --report "$parts/$backend.md" \
        > "$parts/$backend.log" 2>&1 &
done
wait
reports=()
[ -f "$out/conformance.json" ] && reports+=("$out/conformance.json")
for spec in "$@"; do
    backend=${spec%%:*}
    grep -E "checks \(|^FAILED|unavailable here" "$parts/$backend.log" | sed "s/^/$backend: /"
    [ -f "$parts/$backend.json" ] && reports+=("$parts/$backend.json")
done
[ ${#reports[@]} -gt 0 ] && fp8dispatch conformance --from "${reports[@]}" --report "$out/conformance.md" | tail -1
