#!/usr/bin/env bash
# The whole library on this machine's GPU, filed under docs/results/<gpu>/ (or the folder given):
#   info.txt, demo.txt            `fp8dispatch info` and `fp8dispatch demo`
#   conformance-quick.md, .json   the conformance report at quick sizes, every available backend
#                                 (scripts/gpu_conformance.sh writes the full-size conformance.md)
#   nn.md, nn.json                a converted transformer block compiled under each backend
# Usage, from the repository root after `pip install -e ".[fbgemm,torchao,test]"`:
#   bash scripts/gpu_check.sh [folder] [conformance seconds] [nn seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/$(bash scripts/gpu_name.sh)}
conformance_s=${2:-240}
nn_s=${3:-200}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

fp8dispatch info 2>&1 | tee "$out/info.txt"
fp8dispatch demo 2>&1 | tee "$out/demo.txt"
timeout "$conformance_s" fp8dispatch conformance --quick --report "$out/conformance-quick.md" 2>&1 | tail -40
timeout $((nn_s + 30)) python3 scripts/verify_nn_gpu.py "$out/nn.md" --recipes "${NN_RECIPES:-block}" \
    --budget "$nn_s" --per-backend-timeout 90 2>&1 | tail -40
