"""Decode-size `linear(x, w)` in one kernel: the 1×128 activation quantize inside the block GEMM.

A block-recipe `fd.linear(x, wq)` at decode sizes is two kernels and two allocations (the group
quantize of x, then the GEMM), and per call that host work, not the GPU, is what an eager model
pays. This study asks whether one plain-Triton kernel can do both without losing GPU time: each K
step is one scale group (BLOCK_K = 128), so a program quantizes the slice of x it is about to
multiply with the backend's own scale helpers (`backends/triton/scaling.py`, the contract's bits):

    for each K step k:                                   x [M, K] bf16, w [N, K] FP8
        xs[m] = scale_from_amax(max |x[m, k:k+128]|)
        xq    = saturating_cast(x[m, k:k+128] / xs[m])
        acc  += dot(xq, w[n, k:k+128].T) * (xs[m] * sw[k // 128, n // 128])

Every candidate configuration is timed under CUDA-graph replay beside the two steps the backend
runs today (`fd.quantize(x, "group")` then `fd.matmul`, both on triton) and bf16 `F.linear`, on
DeepSeek-V3's projections at M = 1 and 16; the best configuration is checked against the two
steps first (1 − 2Σxy/Σ(x²+y²) < 1e-5: the same FP8 values, only the summation order differs).

    python benchmarks/decode_one_kernel.py --out docs/results/h200/decode-one-kernel.json

The answer on the H200 (docs/results/h200/model.md): no. The quantize sits between the loads and
the dot on every K step, so the loop does not overlap the next step's weight loads with it, and
each step costs a memory round trip: 1.6–8.9× the two kernels' GPU time, even only at M = 16 with
K ≤ 1536. Doing this well needs the warp-specialized structure of `backends/triton/hopper.py` (a
producer warp streaming the weight by TMA while the consumers quantize), not a plain Triton loop.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fp8dispatch as fd
from fp8dispatch.backends.triton.scaling import finite_abs, saturating_cast, scale_from_amax
from fp8dispatch.grid import DEEPSEEK_NK
from fp8dispatch.numerics import relative_error
from fp8dispatch.timing import time_graph

FP8_MAX = tl.constexpr(448.0)  # e4m3fn
CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_stages=stages, num_warps=4)
           for bm in (16, 64) for bn in (32, 64, 128) for stages in (3, 5)]


@triton.jit
def _quantizing_mm_kernel(
    x_ptr, w_ptr, c_ptr, sw_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_cm, stride_swn,  # x [M, K], w [N, K] and c [M, N] row-major; sw [N/128, K/128]
    BLOCK_M: tl.constexpr,  # tokens per tile, padded (16; 64 lets Hopper's wgmma take xq from registers)
    BLOCK_N: tl.constexpr,  # output features per tile; divides 128, so one weight scale per tile and step
    BLOCK_K: tl.constexpr,  # 128: one activation group and one weight block per K step
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # w.T: [BLOCK_K, BLOCK_N]
    sw_ptr += (pid_n * BLOCK_N // 128) * stride_swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K // BLOCK_K):  # the study's shapes have K % 128 == 0 and N % BLOCK_N == 0
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
        xs = scale_from_amax(tl.max(finite_abs(x), axis=1), 0.0, FP8_MAX, False, False)
        xq = saturating_cast(x, xs[:, None], FP8_MAX, tl.float8e4nv)
        acc += tl.dot(xq, w) * (xs * tl.load(sw_ptr + k))[:, None]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None])


def one_kernel(x, wq, config):
    m, k = x.shape
    n = wq.data.shape[0]
    c = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    meta = dict(config)
    grid = (n // meta["BLOCK_N"], triton.cdiv(m, meta["BLOCK_M"]))
    _quantizing_mm_kernel[grid](x, wq.data, c, wq.scale, m, n, k, x.stride(0), wq.data.stride(0), c.stride(0),
                                wq.scale.stride(0), BLOCK_K=128, **meta)
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'N×K':>12} {'M':>3} | GPU µs: {'one kernel (best config)':>26} {'two steps':>9} {'bf16':>6}")
    for n, k in DEEPSEEK_NK:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        wq = fd.quantize(w, "block")
        for m in map(int, args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            two = fd.matmul(fd.quantize(x, "group", backend="triton"), wq.t(), backend="triton")
            timed = {}
            for config in CONFIGS:
                if n % config["BLOCK_N"]:
                    continue
                try:
                    got = one_kernel(x, wq, config)
                except triton.runtime.errors.OutOfResources:
                    continue
                assert relative_error(got, two) < 1e-5, (n, k, m, config)
                timed[str(config)] = 1e6 * time_graph(lambda: one_kernel(x, wq, config), runs=30).median_s
            best = min(timed, key=timed.get)
            row = dict(n=n, k=k, m=m, one_kernel_us=timed[best], best=best, configs=timed,
                       two_steps_us=1e6 * time_graph(lambda: fd.matmul(fd.quantize(x, "group", backend="triton"),
                                                                        wq.t(), backend="triton"), runs=30).median_s,
                       bf16_us=1e6 * time_graph(lambda: F.linear(x, w), runs=30).median_s)
            rows.append(row)
            print(f"{n:>6}×{k:<5} {m:>3} | {row['one_kernel_us']:34.1f} {row['two_steps_us']:9.1f} "
                  f"{row['bf16_us']:6.1f}   {best}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), command="python benchmarks/decode_one_kernel.py "
                           f"--m {args.m}", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
