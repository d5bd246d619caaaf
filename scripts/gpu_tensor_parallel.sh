#!/usr/bin/env bash
# A converted transformer block tensor-parallel over 2 and 4 GPUs of this machine, against one GPU,
# filed under docs/results/<gpu>/ (or the folder given):
#   tensor-parallel-2.json, -4.json   error vs one GPU (< 1e-3), forward ms at M=4096 and the speedup
#                                     (target at 4 GPUs: >= 3.2x), weight bytes per GPU (target 1/world)
#   tensor-parallel.txt               the runs' output
# NVLink multicast stays off (NCCL NVLS, symmetric-memory multicast, NVSHMEM NVLS): the layers use
# plain all-reduce and all-gather only. A world size larger than the GPU count is skipped and said so.
# Usage, from the repository root after `pip install -e ".[fbgemm,torchao,test]"`:
#   bash scripts/gpu_tensor_parallel.sh [folder] [seconds per run]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/$(bash scripts/gpu_name.sh)}
seconds=${2:-900}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
: > "$out/tensor-parallel.txt"
for world in 2 4; do
    if (( gpus < world )); then
        echo "skipped $world GPUs: this machine has $gpus" | tee -a "$out/tensor-parallel.txt"
        continue
    fi
    timeout "$seconds" torchrun --standalone --nproc-per-node "$world" scripts/verify_tp_gpu.py \
        --out "$out/tensor-parallel-$world.json" 2>&1 | tee -a "$out/tensor-parallel.txt"
done
