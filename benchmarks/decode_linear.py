"""Decode-size `fd.linear(x, wq)` (block recipe) on DeepSeek-V3's projections: the triton backend's
one kernel that quantizes x inside the GEMM (`backends/triton/decode.py`) against the two steps it
replaces (`fd.quantize(x, "group")`, then `fd.matmul`, both on triton), and bf16 `F.linear`.

Per (N, K) and M: GPU time per call under CUDA-graph replay (L2 flushed between replays) and host
time per eager call (3000 back-to-back calls, no synchronization). One process, one GPU:

    python benchmarks/decode_linear.py [--m 1,16] [--out decode-linear.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import fp8dispatch as fd
from fp8dispatch.grid import DEEPSEEK_NK
from fp8dispatch.timing import time_graph


def host_us(f, calls: int = 3000) -> float:
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        f()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16", help="token counts (at most 16: the fused kernel's range)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'N×K':>12} {'M':>3} | {'GPU µs: one kernel':>18} {'two steps':>9} {'bf16':>6} | "
          f"{'host µs: one kernel':>19} {'two steps':>9} {'bf16':>6}")
    for n, k in DEEPSEEK_NK:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        wq = fd.quantize(w, "block")
        wt = wq.t()
        for m in map(int, args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            plan = fd.plan_linear(x, wq, backend="triton")

            def fused():
                return fd.linear(x, wq, backend="triton")

            def two_steps():
                return fd.matmul(fd.quantize(x, "group", backend="triton"), wt, backend="triton")

            def bf16():
                return F.linear(x, w)

            row = dict(n=n, k=k, m=m, fused=plan.fused is not None)
            for name, f in (("one kernel", fused), ("two steps", two_steps), ("bf16", bf16)):
                row[name] = dict(gpu_us=1e6 * time_graph(f, runs=30).median_s, host_us=host_us(f))
            rows.append(row)
            print(f"{n:>6}×{k:<5} {m:>3} | {row['one kernel']['gpu_us']:18.1f} {row['two steps']['gpu_us']:9.1f} "
                  f"{row['bf16']['gpu_us']:6.1f} | {row['one kernel']['host_us']:19.1f} "
                  f"{row['two steps']['host_us']:9.1f} {row['bf16']['host_us']:6.1f}"
                  + ("" if row["fused"] else "   (not fused)"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), command="python benchmarks/decode_linear.py "
                           f"--m {args.m}", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
