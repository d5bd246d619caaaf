"""The decode GEMM with and without split-K, beside bf16: what `SPLIT_K` buys at each DeepSeek-V3 shape.

For each (N, K) of DeepSeek-V3's attention projections and dense MLP at M = 1 and 16, on a GPU:
the triton backend's own choice (tuned on the first call, splits included: `matmul.py`), the best
configuration without a split (every swapped candidate timed), and `F.linear` in bf16, all under
CUDA-graph replay (`triton.testing.do_bench_cudagraph`), so the figures are GPU time alone.

    python benchmarks/decode_split.py decode-split.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
import triton

import fp8dispatch as fd
from fp8dispatch.backends.triton import matmul as mm

BF16 = torch.bfloat16
SHAPES = [(2112, 7168), (576, 7168), (1536, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
          (7168, 2048), (18432, 7168), (7168, 18432)]


def main(out: str) -> None:
    bench = triton.testing.do_bench_cudagraph
    rows = []
    for m in (1, 16):
        for n, k in SHAPES:
            wb, xb = torch.randn(n, k, device="cuda", dtype=BF16), torch.randn(m, k, device="cuda", dtype=BF16)
            w, x = fd.quantize(wb, "block", backend="triton"), fd.quantize(xb, "group", backend="triton")
            mm.matmul(x, w.t(), BF16)  # tunes, splits included
            plan = list(mm._plans.values())[-1]
            chosen = {key: plan.constexprs[key] for key in ("BLOCK_N", "BLOCK_M", "SPLIT_K")} | plan.options
            tuned = bench(lambda: mm.matmul(x, w.t(), BF16), rep=50) * 1e3
            whole = [c for c in mm._candidates(m, n, k, True, 128, xb.device) if c["SPLIT_K"] == 1]
            unsplit = min(bench(lambda: mm.matmul(x, w.t(), BF16, config=c), rep=30) for c in whole) * 1e3
            bf16 = bench(lambda: F.linear(xb, wb), rep=50) * 1e3
            rows.append(dict(m=m, n=n, k=k, chosen=chosen, tuned_us=tuned, best_unsplit_us=unsplit, bf16_us=bf16))
            print(f"M={m:3d} {n:6d}x{k:6d} chosen {chosen} tuned {tuned:6.1f} unsplit {unsplit:6.1f} "
                  f"bf16 {bf16:6.1f} µs: split gain {unsplit / tuned:4.2f}x, vs bf16 {bf16 / tuned:4.2f}x", flush=True)
    with open(out, "w") as f:
        json.dump(dict(command=f"python benchmarks/decode_split.py {out}", torch=torch.__version__,
                       triton=triton.__version__, gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "decode-split.json")
