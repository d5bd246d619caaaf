"""Block-recipe GEMM on the H100: three ways to overlap the scale promotion with the tensor cores.

The portable kernel (`backends/triton/matmul.py`) waits for each K step's wgmma before promoting
its fp32 partial: compiled for sm90, its loop holds one `wgmma.wait_group 0` per step. So does a
two-dots-per-iteration unroll (Triton puts a wait 0 right after each dot whose accumulator is
not carried), and `tl.range(..., warp_specialize=True)` changes nothing on Hopper (Triton 3.6 and
3.7: the PTX is identical). Compared here, on the same operands:

- `ahead` (below): a Gluon kernel issuing the MMAs by hand one step ahead of the promotion (wait
  1, not 0). Correct, but ptxas serializes it: `ptxas -v` reports C7514 "wgmma.mma_async
  instructions are serialized due to non wgmma instructions reading accumulator registers of a
  wgmma between start and end of the pipeline stage", and the SASS has a `WARPGROUP.DEPBAR.LE
  gsb0, 0x0` after every HGMMA, even with the loop unrolled by two so each partial keeps its
  registers. 0.78–1.05× the portable kernel (docs/results/h100/block-gemm-ahead.json).
- `ws`: the backend's Hopper kernel (`backends/triton/hopper.py`), warp-specialized like
  DeepGEMM: a TMA producer warp and two consumer warpgroups that each wait 0, which ptxas
  accepts, and overlap each other; persistent, with a TMA-store epilogue.
- `portable`: the backend's own kernel with its tuned configuration (`config="tuned"`).

Each Gluon kernel is checked first (1 − 2Σxy/Σ(x²+y²) < 1e-3 against the fp32 product of the
dequantized operands, tails in M and N, a bias, two calls bitwise equal), then everything is timed
with FBGEMM's `f8f8bf16_groupwise` and bf16 `torch.matmul` in the same run (CUDA-graph replays,
L2 flushed):

    python benchmarks/block_gemm_variants.py --out docs/results/h100/block-gemm-hopper.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fp8dispatch.backends.triton import hopper, kernels
from fp8dispatch.backends.triton.hopper import grouped_tile
from fp8dispatch.backends.triton import matmul as portable
from fp8dispatch.numerics import ERROR_BOUND, relative_error
from fp8dispatch.tensor import Fp8Tensor
from fp8dispatch.timing import time_graph

E4M3 = torch.float8_e4m3fn
SHAPES = [(4096, n, k) for n, k in ((2112, 7168), (7168, 2048), (24576, 1536), (7168, 16384), (4096, 7168),
                                   (32768, 512))] + [(8192, 8192, 8192), (128, 7168, 2048), (512, 7168, 2048),
                                                     (512, 24576, 1536)]
CHECKS = [(100, 2112, 7168), (4097, 1000, 1536), (65, 7168, 2048), (4096, 2112, 7168)]


# --- `ahead`: the one-step-ahead Gluon kernel (an experiment, serialized by ptxas) ----------
#
# The block recipe on Hopper in Gluon: the scale promotion overlapped with the next tensor-core MMA.
#
# The portable kernel (`matmul.py`) computes, per 128-wide K step,
#
#     acc += dot(a_tile, b_tile) * (sa[m, k] * sb[k, n])
#
# and Triton must wait for each step's wgmma before that fp32 multiply-add, so the tensor cores
# idle while the CUDA cores promote. Here the MMAs are issued by hand, asynchronously, one step
# ahead of the promotion:
#
#     issue MMA k            (into a fresh partial, from shared-memory stage k % STAGES)
#     wait until only MMA k is in flight, so partial k-1 is ready and its stage is free
#     refill that stage by TMA with step k-1+STAGES
#     acc += partial[k-1] * (sa[:, k-1] * sb[k-1, n-tile])
#
# so MMA k runs on the tensor cores while partial k-1 is promoted. Memory layout: a [M, K] and the
# weight [N, K] are both K-contiguous (the only FP8 wgmma layout); TMA copies 128×128 byte tiles
# into a ring of STAGES shared-memory stages, each stage with an mbarrier that counts its bytes.
# TMA fills rows beyond M or N with zeros, so tails need no masks until the store. Three fp32
# tiles live in registers (acc and two partials): 192 of 255 registers a thread at 128×128 and
# 8 warps.
#
# Scales: a's `[M, K/128]` (one per row and K step) and b's `[K/128, N/128]` (one per tile and K
# step, since BLOCK_N = 128 = the b block's width).

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
STAGES = 4  # 4 × (16 KB of a + 16 KB of b) = 128 KB of the 228 KB of shared memory
NUM_WARPS = 8  # two warpgroups, 64 rows each: wgmma's M side is 64 rows per warpgroup


@gluon.jit
def _issue(a_smem, b_smem, ready, k, into, STAGES: gl.constexpr):
    """Start step k's MMA into the registers of `into` (use_acc=False: their values are ignored)."""
    stage = k % STAGES
    mbarrier.wait(ready.index(stage), phase=(k // STAGES) & 1)
    return warpgroup_mma(a_smem.index(stage), b_smem.index(stage).permute((1, 0)), into, use_acc=False,
                         is_async=True)


@gluon.jit
def _retire(acc, partial, k, steps, a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n, sa_ptrs, sb_ptrs,
            stride_sak, stride_sbk, STAGES: gl.constexpr, STEP_BYTES: gl.constexpr,
            IN_FLIGHT: gl.constexpr):  # MMAs allowed to stay in flight: the next step's, or none at the end
    """Wait for step k's partial, refill its stage with step k + STAGES, and promote it into acc."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    scale = gl.load(sa_ptrs + k * stride_sak) * gl.load(sb_ptrs + k * stride_sbk)
    partial = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(partial, ))
    refill = k + STAGES
    if refill < steps:
        stage = k % STAGES
        mbarrier.expect(ready.index(stage), STEP_BYTES)
        tma.async_copy_global_to_shared(a_desc, [off_m, refill * BK], ready.index(stage), a_smem.index(stage))
        tma.async_copy_global_to_shared(b_desc, [off_n, refill * BK], ready.index(stage), b_smem.index(stage))
    return acc + partial * gl.expand_dims(scale, 1), partial


@gluon.jit
def _block_scaled_mm_kernel(
    a_desc, b_desc,  # TMA descriptors of a [M, K] and the weight [N, K], blocks [128, 128]
    c_ptr, sa_ptr, sb_ptr, bias_ptr,
    M, N, K,
    stride_cm, stride_sam, stride_sak, stride_sbk, stride_sbn,
    HAS_BIAS: gl.constexpr,
    GROUP_M: gl.constexpr,  # programs walk GROUP_M row tiles per column tile, so b tiles stay in L2
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    STEP_BYTES: gl.constexpr = (BM + BN) * BK  # one byte per FP8 element

    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BN)
    pid_m, pid_n = grouped_tile(pid, tiles_m, tiles_n, GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN

    # wgmma m64nNk32 per warpgroup; the warpgroups split the tile's rows.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 256 // a_desc.dtype.primitive_bitwidth])
    rows_layout: gl.constexpr = gl.SliceLayout(1, mma)
    cols_layout: gl.constexpr = gl.SliceLayout(0, mma)

    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)

    steps = gl.cdiv(K, BK)
    for s in gl.static_range(STAGES):  # prologue: fill the ring
        if s < steps:
            mbarrier.expect(ready.index(s), STEP_BYTES)
            tma.async_copy_global_to_shared(a_desc, [off_m, s * BK], ready.index(s), a_smem.index(s))
            tma.async_copy_global_to_shared(b_desc, [off_n, s * BK], ready.index(s), b_smem.index(s))

    rows = off_m + gl.arange(0, BM, layout=rows_layout)
    sa_ptrs = sa_ptr + gl.minimum(rows, M - 1) * stride_sam  # rows past M read row M-1's scale; not stored
    sb_ptrs = sb_ptr + pid_n * stride_sbn

    # Two partial buffers, x and y, alternate: unrolling the loop by two keeps each in fixed
    # registers, so nothing but a wgmma writes them while one is in flight (a register copy
    # between them makes ptxas serialize every wgmma: a `WARPGROUP.DEPBAR 0` after each in SASS).
    acc = gl.zeros((BM, BN), gl.float32, layout=mma)
    x = gl.zeros((BM, BN), gl.float32, layout=mma)
    y = _issue(a_smem, b_smem, ready, 0, x, STAGES)
    for k in range(1, steps - 1, 2):
        x = _issue(a_smem, b_smem, ready, k, x, STAGES)
        acc, y = _retire(acc, y, k - 1, steps, a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n,
                         sa_ptrs, sb_ptrs, stride_sak, stride_sbk, STAGES, STEP_BYTES, 1)
        y = _issue(a_smem, b_smem, ready, k + 1, y, STAGES)
        acc, x = _retire(acc, x, k, steps, a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n,
                         sa_ptrs, sb_ptrs, stride_sak, stride_sbk, STAGES, STEP_BYTES, 1)
    if steps % 2 == 0:  # one step left after the pairs
        last = _issue(a_smem, b_smem, ready, steps - 1, x, STAGES)
        acc, done = _retire(acc, y, steps - 2, steps, a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n,
                            sa_ptrs, sb_ptrs, stride_sak, stride_sbk, STAGES, STEP_BYTES, 1)
        acc, done = _retire(acc, last, steps - 1, steps, a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n,
                            sa_ptrs, sb_ptrs, stride_sak, stride_sbk, STAGES, STEP_BYTES, 0)
    else:
        acc, done = _retire(acc, y, steps - 1, steps, a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n,
                            sa_ptrs, sb_ptrs, stride_sak, stride_sbk, STAGES, STEP_BYTES, 0)

    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    cols = off_n + gl.arange(0, BN, layout=cols_layout)
    if HAS_BIAS:
        acc += gl.expand_dims(gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32), 0)
    mask = gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0)
    c_ptrs = c_ptr + gl.expand_dims(rows, 1) * stride_cm + gl.expand_dims(cols, 0)
    gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_LAYOUT = None


def _operand_layout():
    global _LAYOUT
    if _LAYOUT is None:
        _LAYOUT = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
    return _LAYOUT


def block_scaled_mm(a_data, b_weight, sa, sb, out_dtype, bias=None, group_m=8, stages=STAGES):
    """c [M, N] = (a_data [M, K] · sa [M, K/128]) @ (b_weight [N, K] · sb [K/128, N/128]).T"""
    m, k = a_data.shape
    n = b_weight.shape[0]
    layout = _operand_layout()
    a_desc = TensorDescriptor(a_data, [m, k], [a_data.stride(0), 1], [BLOCK_M, BLOCK_K], layout)
    b_desc = TensorDescriptor(b_weight, [n, k], [b_weight.stride(0), 1], [BLOCK_N, BLOCK_K], layout)
    c = torch.empty((m, n), dtype=out_dtype, device=a_data.device)
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _block_scaled_mm_kernel[grid](
        a_desc, b_desc, c, sa, sb, bias if bias is not None else sa,
        m, n, k, c.stride(0), sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1),
        HAS_BIAS=bias is not None, GROUP_M=group_m, STAGES=stages, num_warps=NUM_WARPS,
    )
    return c


# --- the run ------------------------------------------------------------------------------


def operands(m, n, k, seed=0):
    torch.manual_seed(seed)
    be = kernels()
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    qa = Fp8Tensor(*be.quantize(a, (1, 128), E4M3), (1, 128))
    qw = Fp8Tensor(*be.quantize(w, (128, 128), E4M3), (128, 128))
    return qa, qw


def _ws(a_data, b_weight, sa, sb, out_dtype, bias=None, stages=hopper.STAGES):
    """The backend's Hopper kernel (`backends/triton/hopper.py`) on the same raw arguments."""
    a = Fp8Tensor._trusted(a_data, sa, (1, 128))
    b = Fp8Tensor._trusted(b_weight.t(), sb, (128, 128))
    return hopper.matmul(a, b, out_dtype, bias, stages=stages)


KERNELS = {"ahead": block_scaled_mm, "ws": _ws}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--stages", default="3,4")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="which Gluon kernels: " + ", ".join(KERNELS))
    args = parser.parse_args(argv)
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm)

        fbgemm = torch.ops.fbgemm
    except Exception as e:  # noqa: BLE001
        print(f"fbgemm unavailable: {e}")
        fbgemm = None
    stages = [int(s) for s in args.stages.split(",")]
    kernels_run = {name: KERNELS[name] for name in args.kernels.split(",")}
    report = {"checks": [], "timings": [], "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failed = 0
    for m, n, k in CHECKS:
        qa, qw = operands(m, n, k, seed=m + n)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        expected = qa.dequantize(torch.float32) @ qw.dequantize(torch.float32).t() + bias.float()
        for name, fn in kernels_run.items():
            for s in stages:
                got = fn(qa.data, qw.data, qa.scale, qw.scale.t(), torch.bfloat16, bias, stages=s)
                again = fn(qa.data, qw.data, qa.scale, qw.scale.t(), torch.bfloat16, bias, stages=s)
                diff = relative_error(got.float(), expected)
                ok = diff < ERROR_BOUND and torch.equal(got, again) and not got.isnan().any()
                failed += not ok
                report["checks"].append({"kernel": name, "m": m, "n": n, "k": k, "stages": s, "diff": diff, "ok": ok})
                print(f"check {name} {m}x{n}x{k} stages={s}: diff {diff:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    for m, n, k in SHAPES:
        qa, qw = operands(m, n, k)
        b = qw.t()
        a16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        fns = {"portable": lambda: portable.matmul(qa, b, torch.bfloat16, config="tuned"), "bf16": lambda: a16 @ w16.t()}
        for name, fn in kernels_run.items():
            for s in stages:
                fns[f"{name}_s{s}"] = (lambda fn=fn, s=s: fn(qa.data, qw.data, qa.scale, b.scale, torch.bfloat16,
                                                             stages=s))
        if fbgemm is not None:
            xs, ws = qa.scale.t().contiguous(), qw.scale.t().contiguous()
            fns["fbgemm_groupwise"] = lambda: fbgemm.f8f8bf16_groupwise(qa.data, qw.data, xs, ws)
        row = {"m": m, "n": n, "k": k}
        for name, fn in fns.items():
            try:
                row[name] = 2 * m * n * k / time_graph(fn).median_s / 1e12
            except Exception as e:  # noqa: BLE001
                print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        for name in kernels_run:
            best = max((v for key, v in row.items() if key.startswith(name + "_s")), default=None)
            if best and row.get("fbgemm_groupwise"):
                row[f"{name}_vs_fbgemm"] = best / row["fbgemm_groupwise"]
            if best and row.get("portable"):
                row[f"{name}_vs_portable"] = best / row["portable"]
        report["timings"].append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
