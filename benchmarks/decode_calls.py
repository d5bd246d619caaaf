"""Decode-size products (M = 1, N×K = 7168×2048) through the public `fd.matmul`, per recipe, on the
triton backend and on `auto`: host time per eager call and GPU time per call under CUDA-graph
replay. It uses only the public API, so the same file times an older checkout too:

    python benchmarks/decode_calls.py after
    PYTHONPATH=/path/to/old/checkout python benchmarks/decode_calls.py before

Host time = 3000 back-to-back calls without synchronization (the host is the bottleneck at this
size); "wall" adds the wait for the GPU at the end. Graph = 20 calls captured once, replayed 50 times.
"""

import sys
import time

import torch

import fp8dispatch as fd

RECIPES = (("row", "row", "row"), ("tensor", "tensor", "tensor"), ("block", "group", "block"))


def graph_us(f, calls: int = 20, replays: int = 50) -> float:
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                f()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def main(tag: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(7168, 2048, device="cuda", dtype=torch.bfloat16)
    for recipe, x_granularity, w_granularity in RECIPES:
        xq, wq = fd.quantize(x, x_granularity), fd.quantize(w, w_granularity)
        for backend in ("triton", "auto"):
            def f():
                return fd.matmul(xq, wq.t(), backend=backend)

            try:
                for _ in range(50):
                    f()
            except Exception as e:  # noqa: BLE001 - an older checkout may not serve every recipe
                print(f"{tag} {recipe} {backend}: {type(e).__name__}: {str(e)[:80]}")
                continue
            torch.cuda.synchronize()
            n = 3000
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            print(f"{tag} M=1 {recipe:6s} {backend:6s}: host {1e6 * (t1 - t0) / n:6.1f} us/call "
                  f"(wall {1e6 * (t2 - t0) / n:6.1f}), graph {graph_us(f):6.2f} us/call")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
