"""The triton backend's two grouped kernels side by side, on DeepSeek-V3's experts (block recipe).

For each point of `fp8dispatch bench`'s grouped grid: the portable kernel (`grouped.py`), the
Hopper one (`hopper_grouped.py`) and, where installed, FBGEMM's grouped GEMM, each timed under
CUDA-graph replay with the L2 flushed, with its error against the reference. Then the figures
issue-style targets need that the grid does not give: the copy bandwidth measured in the same run
(the masked decode bar), and eager wall time at 32 experts × 128 rows of `grouped_linear` against
the per-expert `fp8dispatch.linear` loop and bf16 grouped (what a user calling from Python pays).

    python benchmarks/grouped_kernels.py [--out grouped-kernels.json] [--runs 30] [--quick] [--only eager|grid]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fp8dispatch
from fp8dispatch import bench_grouped, registry
from fp8dispatch.backends.triton import grouped
from fp8dispatch.bench import Point, Shape
from fp8dispatch.numerics import relative_error
from fp8dispatch.timing import time_cuda, time_graph

BF16 = torch.bfloat16


def kernels(ops) -> dict:
    """name -> call, for one point's operands."""
    args = (ops.xq, ops.wq, ops.offsets, ops.masked_m, BF16, None)
    found = {"portable": lambda: grouped.grouped_linear(*args, kernel="portable")}
    if grouped._hopper_module() is not None and grouped._hopper_module().why_not(ops.xq, ops.wq, BF16, None) is None:
        found["hopper"] = lambda: grouped.grouped_linear(*args, kernel="hopper")
    fbgemm = registry.get_backend("fbgemm")
    if not registry.reasons(fbgemm, _problem(ops)):
        found["fbgemm"] = lambda: fbgemm.grouped_linear(*args)
    return found


def _problem(ops):
    from fp8dispatch.grouped_api import plan_problem

    return plan_problem(ops.xq, ops.wq, ops.offsets, ops.masked_m, None, None, BF16, "auto")


def grid(runs: int, quick: bool) -> list[dict]:
    rows = []
    points = bench_grouped.points(Point, Shape, ("block",))
    for point in points[:3] if quick else points:
        ops = bench_grouped.GroupedOperands(point, torch.device("cuda"))
        flops, weight_bytes = ops.work
        for name, fn in kernels(ops).items():
            try:
                error = relative_error(fn(), ops.product)
                t = time_graph(fn, runs=runs)
            except Exception as e:  # noqa: BLE001 - one failing kernel must not end the run
                rows.append(dict(point=point.variant, m=point.shape.m, n=point.shape.n, k=point.shape.k, kernel=name,
                                 failed=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                print(rows[-1], flush=True)
                continue
            row = dict(point=point.variant, m=point.shape.m, n=point.shape.n, k=point.shape.k, kernel=name,
                       us=t.median_s * 1e6, tflops=flops / t.median_s / 1e12, error=error,
                       gbps=weight_bytes / t.median_s / 1e9 if weight_bytes else None)
            rows.append(row)
            print(f"{point.variant:<28} {point.shape.m:>6}x{point.shape.n}x{point.shape.k} {name:<9} "
                  f"{row['us']:9.1f} us {row['tflops']:7.1f} TFLOPS"
                  + (f" {row['gbps']:6.0f} GB/s" if row["gbps"] else "") + f"  err {error:.1e}", flush=True)
        del ops
        torch.cuda.empty_cache()
    return rows


def copy_bandwidth(runs: int) -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written), the bar for bandwidth-bound kernels."""
    src = torch.empty(2**30, dtype=BF16, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), runs=runs)
    return 2 * src.numel() * src.element_size() / t.median_s / 1e9


def eager(runs: int) -> dict:
    """Wall time per call, eagerly (host time included), at 32 experts × 128 rows of each (N, K)."""
    out = {}
    for n, k in bench_grouped.EXPERT_NK:
        point = Point("grouped", "block:contiguous:g32:uniform", Shape(32 * 128, n, k))
        ops = bench_grouped.GroupedOperands(point, torch.device("cuda"))
        calls = {"grouped_linear (auto)": lambda: fp8dispatch.grouped_linear(ops.xq, ops.wq, ops.offsets),
                 bench_grouped.LOOP: bench_grouped._linear_loop(ops),
                 bench_grouped.BF16_GROUPED: bench_grouped._bf16_grouped(ops)[1]}
        figures = {name: time_cuda(fn, runs=runs, flush_l2=False).median_s * 1e6 for name, fn in calls.items()}
        out[f"{n}x{k}"] = figures
        print(f"eager 32 x 128 rows, N x K = {n}x{k}: " + ", ".join(f"{a} {b:.1f} us" for a, b in figures.items()),
              flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the first three points only")
    parser.add_argument("--only", choices=("eager", "grid"), default=None, help="one part only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    result = dict(device=torch.cuda.get_device_name(), command="python " + " ".join(sys.argv))
    result["copy_gbps"] = copy_bandwidth(args.runs)
    print(f"copy bandwidth: {result['copy_gbps']:.0f} GB/s", flush=True)
    if args.only != "grid":
        result["eager_us"] = eager(args.runs)
    if args.only != "eager":
        result["grid"] = grid(args.runs, args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
