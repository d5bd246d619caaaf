#!/usr/bin/env bash
# One GPU session's checks of the whole library, outputs under $OUT, named after the GPU (<gpu> is
# its short name: h100, h200):
#   info.txt, demo.txt               `fp8dispatch info` and `fp8dispatch demo` (issue 2)
#   <gpu>.md, <gpu>.json             the conformance report, every available backend (issue 5)
#   nn-<gpu>.md, nn-<gpu>.md.json    a converted transformer block compiled per backend (issue 7)
# Usage on the device machine, from the repository root, with the wheels carried in .whl/:
#   bash scripts/h100_check.sh [conformance seconds] [nn seconds]
set -uo pipefail
: "${OUT:=out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
conformance_s=${1:-240}
nn_s=${2:-200}
gpu=$(python3 -c "from fp8dispatch.devices import current_gpu_slug; print(current_gpu_slug())")

fp8dispatch info 2>&1 | tee "$OUT/info.txt"
fp8dispatch demo 2>&1 | tee "$OUT/demo.txt"
timeout "$conformance_s" fp8dispatch conformance --quick --report "$OUT/$gpu.md" 2>&1 | tail -40
timeout $((nn_s + 30)) python3 scripts/verify_nn_gpu.py "$OUT/nn-$gpu.md" --recipes "${NN_RECIPES:-block}" --budget "$nn_s" --per-backend-timeout 90 2>&1 | tail -40
