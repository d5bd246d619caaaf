#!/usr/bin/env bash
# The full-size conformance report on a GPU, one backend at a time (each under its own time
# limit, so one slow library cannot starve the rest of a 10-minute device command), merged into
# one report named after the GPU: $OUT/<gpu>.md and $OUT/<gpu>.json (<gpu>: h100, h200, ...).
# A report already in docs/conformance/ is the starting point, so several commands can each add
# backends.
# Usage on the device machine, from the repository root, with the wheels carried in .whl/:
#   bash scripts/h100_conformance.sh BACKEND:SECONDS [BACKEND:SECONDS ...]
set -uo pipefail
: "${OUT:=out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
gpu=$(python3 -c "from fp8dispatch.devices import current_gpu_slug; print(current_gpu_slug())")
if [ -n "${START_FROM:-}" ]; then cp "$START_FROM.md" "$OUT/$gpu.md"; cp "$START_FROM.json" "$OUT/$gpu.json"; fi
for spec in "$@"; do
    backend=${spec%%:*}; seconds=${spec##*:}
    echo "== $backend (at most ${seconds}s)"
    merge=$([ -f "$OUT/$gpu.json" ] && echo --merge)
    timeout "$seconds" fp8dispatch conformance --full --backend "$backend" --report "$OUT/$gpu.md" $merge 2>&1 \
        | grep -v '^\s*$' | tail -25
done
