"""A converted transformer block, tensor-parallel over the GPUs torchrun starts, against one GPU.

Every rank builds the same bf16 block (attention + SwiGLU MLP, DeepSeek-V3's hidden size by
default) and converts it to FP8 (128×128 blocks). Rank 0 first runs the whole converted block on
its own GPU: the reference output and the one-GPU time. Then every rank shards the block with
`parallelize` (q, k, v, gate, up column-parallel; o, down row-parallel: two all-reduces per block)
and runs it. The script records, per world size: the relative error of the tensor-parallel output
against the one-GPU output (target: below the conformance bound, 1e-3), the median forward time
at M tokens and the speedup over one GPU (target at 4 GPUs: at least 3.2x), and the weight bytes
each rank holds against the one-GPU layer's (target: 1/world, scales included).

    torchrun --standalone --nproc-per-node 4 scripts/verify_tp_gpu.py --out docs/results/h200/tensor-parallel-4.json
    torchrun --standalone --nproc-per-node 2 scripts/verify_tp_gpu.py --device cpu --dim 256 --ffn 512 \
        --heads 4 --tokens 64 --out /tmp/tp.json          # a smoke test with gloo on the CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from verify_nn_gpu import Block  # the block the one-GPU check converts (this script's folder is on sys.path)

PLAN = {"q": "colwise", "k": "colwise", "v": "colwise", "o": "rowwise",
        "gate": "colwise", "up": "colwise", "down": "rowwise"}


def median_s(fn, device, warmup: int = 3, iters: int = 10) -> float:
    times = []
    for i in range(warmup + iters):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON report path, written by rank 0")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dim", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=18432)
    p.add_argument("--heads", type=int, default=56)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()

    from fp8dispatch.nn import convert, linear_weight_bytes
    from fp8dispatch.nn.parallel import parallelize
    from fp8dispatch.numerics import ERROR_BOUND, relative_error

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    block = Block(args.dim, args.ffn, args.heads).to(device, torch.bfloat16)
    convert(block, "block", backend=args.backend)
    x = torch.randn(1, args.tokens, args.dim, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    row = {"world": world, "tokens": args.tokens, "dim": args.dim, "ffn": args.ffn, "heads": args.heads,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                  "NVSHMEM_DISABLE_NVLS")}}
    with torch.inference_mode():
        single = block(x) if rank == 0 else None
        sharded = copy.deepcopy(block)
        full_bytes = linear_weight_bytes(block)
        if rank == 0:  # time one GPU alone while the others wait
            times = []
            for i in range(13):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                block(x)
                if cuda:
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            row["one_gpu_ms"] = statistics.median(times) * 1e3
        del block
        dist.barrier()
        parallelize(sharded, PLAN, reduce_dtype=None)
        out = sharded(x)
        row["tp_ms"] = median_s(lambda: sharded(x), device) * 1e3
        row["weight_bytes_per_rank"] = linear_weight_bytes(sharded)
        row["weight_bytes_one_gpu"] = full_bytes
        sizes = [None] * world
        dist.all_gather_object(sizes, row["weight_bytes_per_rank"])
        if rank == 0:
            row["error_vs_one_gpu"] = relative_error(out, single)
            row["speedup"] = row["one_gpu_ms"] / row["tp_ms"]
            row["weight_fraction"] = max(sizes) / full_bytes
            row["checks"] = {
                "error below 1e-3": row["error_vs_one_gpu"] < ERROR_BOUND,
                "weights at most 1/world (+ scales)": max(sizes) <= full_bytes / world * 1.01,
                "speedup >= 0.8 * world": row["speedup"] >= 0.8 * world,
            }
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(row, f, indent=1)
            print(json.dumps(row, indent=1), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
