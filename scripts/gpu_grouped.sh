#!/usr/bin/env bash
# grouped_linear (mixture of experts) on this machine's GPU, filed under docs/results/<gpu>/ (or the
# folder given):
#   grouped-conformance.md, .json   the grouped conformance at full size, every available backend
#   grouped-gpu.txt                 Fp8Experts on the GPU: CUDA-graph capture, torch.compile, loop parity
#   grouped-kernels.json            the triton backend's Hopper and portable grouped kernels and FBGEMM's,
#                                   eager calls against the per-expert loop and bf16, the copy bandwidth
#   grouped-bench.json, .csv        the grouped grid of `fp8dispatch bench` (every backend, auto, bf16
#                                   grouped, the fd.linear loop), plots/grouped.png
# Usage, from the repository root after `pip install -e ".[fbgemm,torchao,test]"`:
#   bash scripts/gpu_grouped.sh [folder] [conformance seconds] [bench seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/$(bash scripts/gpu_name.sh)}
conformance_s=${2:-600}
bench_s=${3:-400}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

timeout "$conformance_s" fp8dispatch conformance --op grouped_linear --full \
    --report "$out/grouped-conformance.md" 2>&1 | tail -30
timeout 300 python3 scripts/verify_moe_gpu.py 2>&1 | tee "$out/grouped-gpu.txt"
timeout 300 python3 benchmarks/grouped_kernels.py --out "$out/grouped-kernels.json" 2>&1 | tail -60
timeout "$bench_s" fp8dispatch bench --ops grouped --recipes block,row --runs 10 --out "$out/grouped-bench" \
    --plots "$out/plots" 2>&1 | tail -60
