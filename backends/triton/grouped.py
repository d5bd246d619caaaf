"""Grouped FP8 matmul for mixture-of-experts: every expert's rows times its weight, in one launch.

The math. For each expert g with rows `x_g` (a slice of x) and weight `w[g]` `[N, K]`:

    out[rows of g] = x_g @ w[g].T

with the scales of the recipe applied exactly as in `matmul.py`: the block recipe steps K by
BLOCK_K, which divides the scale group (128), so each step sees one x scale per row and one w scale
per 128 output columns, and promotes the step's fp32 partial product by their product:

    acc += dot(x_tile, w_tile) * (sx[row, kg] * sw[g, n // 128, kg])        (block recipe)
    acc  = dot(x_tile, w_tile, acc);  out = acc * sx[row] * sw[g, n]          (row recipe)

The memory layout. x is row-major `[rows, K]`: the contiguous layout's `[M, K]` (expert g owns rows
`offsets[g] .. offsets[g+1]`), or the masked layout's `[G, max_m, K]` viewed as `[G * max_m, K]`
(expert g owns the slots `g * max_m ..`, of which the first `masked_m[g]` are valid). w is
`[G, N, K]` with K contiguous, so a `[BLOCK_K, BLOCK_N]` tile of `w[g].T` is read along K like
x's tiles: both operands reach the tensor cores K-major. Scales are read through their strides:
x's `[rows, ceil(K/g)]`, w's `[G, ceil(N/bn), ceil(K/bk)]`.

The schedule. A work item is one `(expert, row tile, column tile)`. Expert g has
`cdiv(rows_g, BLOCK_M) * cdiv(N, BLOCK_N)` of them (masked: `rows_g = max_m`, the tiles past
`masked_m[g]` only store zeros). The launch is persistent: NUM_PROGRAMS programs (about one per
SM) walk the global list of work items with a stride of NUM_PROGRAMS, expert by expert, reading
the per-expert row counts from `bounds` on the device. So one launch serves every expert, empty
experts cost nothing, and the host never reads a row count: nothing here synchronizes, and a
CUDA graph can capture it.

Rows of a tile past the expert's end are read as the expert's first row (in bounds, finite) and
zeroed before the store; columns past N wrap (`% N`) on load and are masked on store; a K tail is
masked. This is the portable kernel (sm89+, the interpreter). On Hopper the block recipe with
enough rows per expert goes to `hopper_grouped.py`, the same schedule in `hopper.py`'s
warp-specialized form.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import triton
import triton.language as tl

from fp8dispatch.blocks import cdiv
from fp8dispatch.problem import device_capability

from .interpreter import active as interpreting
from .launch import build_failed
from .tiles import next_pow2, sm_count


@triton.jit
def _grouped_kernel(
    x_ptr, w_ptr, out_ptr, sx_ptr, sw_ptr, bias_ptr, bounds_ptr,
    G, ROWS,  # ROWS: masked, the rows per expert slot (max_m); contiguous, all rows (M)
    N, K,
    stride_xm, stride_xk, stride_wg, stride_wn, stride_wk, stride_om, stride_on,
    stride_sxm, stride_sxk, stride_swg, stride_swn, stride_swk, stride_bg,
    w_rows_per_scale,  # bn of w's bn×bk blocks; 1 for the row recipe
    MASKED: tl.constexpr,  # bounds holds masked_m [G]; else offsets [G + 1]
    SCALE_K: tl.constexpr,  # the K width of a scale group; 0 for the row recipe
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # the persistent grid: work items are dealt out with this stride
):
    tiles_n = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    first = tile * 0  # the index of expert g's first work item (an int32 tensor, as the loop carries it)
    end = tile * 0  # contiguous: where the last expert's rows ended
    # Expert g's weight, scales and bias, advanced once per expert: pointer arithmetic is 64-bit,
    # where g * stride_wg in 32 bits would overflow past 2**31 bytes of weights (256 experts do).
    w_g, sw_g, bias_g = w_ptr, sw_ptr, bias_ptr
    for g in range(G):
        if MASKED:
            start = g * ROWS
            valid = tl.minimum(tl.maximum(tl.load(bounds_ptr + g).to(tl.int32), 0), ROWS)
            rows_g = ROWS
        else:  # grouped.safe_offsets's rule, as the host never checks offsets on a GPU: each expert
            # within [the last one's end, ROWS], the first from 0, the last to ROWS
            start = tl.minimum(tl.maximum(tl.load(bounds_ptr + g).to(tl.int32), end), ROWS) * (g > 0)
            stop = tl.minimum(tl.maximum(tl.load(bounds_ptr + g + 1).to(tl.int32), start), ROWS)
            stop = tl.where(g == G - 1, ROWS, stop)
            valid = stop - start
            rows_g = valid
            end = stop
        items = tl.cdiv(rows_g, BLOCK_M) * tiles_n
        while tile < first + items:
            local = tile - first
            tile_m = local // tiles_n
            tile_n = local % tiles_n
            offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the expert
            row_ok = offs_m < valid
            rows = start + tl.where(row_ok, offs_m, 0)
            offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rn = offs_n % N
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            w_ptrs = w_g + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn
            sx_ptrs = sx_ptr + rows * stride_sxm
            sw_ptrs = sw_g + (rn // w_rows_per_scale) * stride_swn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # A masked tile past masked_m[g] runs no K step and stores zeros (a bound, not a branch
            # around the loop, so the compiler still pipelines the loads).
            k_steps = tl.where(tile_m * BLOCK_M < valid, tl.cdiv(K, BLOCK_K), 0)
            for k in range(0, k_steps):
                if EVEN_K:
                    a = tl.load(x_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    k_left = K - k * BLOCK_K
                    a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                    b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
                if SCALE_K > 0:
                    group = (k * BLOCK_K) // SCALE_K
                    sa = tl.load(sx_ptrs + group * stride_sxk)
                    sb = tl.load(sw_ptrs + group * stride_swk)
                    acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
                else:
                    acc = tl.dot(a, b, acc)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
            if SCALE_K == 0:
                acc = acc * (tl.load(sx_ptrs)[:, None] * tl.load(sw_ptrs)[None, :])
            if HAS_BIAS:
                acc += tl.load(bias_g + rn).to(tl.float32)[None, :]
            acc = tl.where(row_ok[:, None], acc, 0.0)
            out_rows = start + offs_m
            mask = (offs_m < rows_g)[:, None] & (offs_n < N)[None, :]
            out_ptrs = out_ptr + out_rows[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tile += NUM_PROGRAMS
        first += items
        w_g += stride_wg
        sw_g += stride_swg
        bias_g += stride_bg


# GPU tiles: 128 output columns (one w scale block) by 64 or 128 rows, K steps of one scale group.
# Untuned: the H200 run chooses (docs/triton.md). The interpreter pays per program and per
# operation, so CPU runs use few programs over wide tiles.
# 128×128 tiles keep two fp32 tiles live (the dot's and the running sum): 8 warps, as the matmul's
# Hopper configurations; 64-row tiles 4.
GPU_STAGES = 3
INTERPRETER_PROGRAMS = 4


def _tiles(problem_rows: int, groups: int, masked: bool, k_group: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): BLOCK_M from the rows an expert typically has."""
    per_expert = rows_per_expert(problem_rows, groups, masked)
    block_k = min(128, k_group) if k_group else 128
    if interpreting():
        return max(16, min(64, next_pow2(per_expert))), 64, block_k
    return (128 if per_expert >= 256 else max(16, min(64, next_pow2(per_expert)))), 128, block_k


def grouped_linear(x, w, offsets, masked_m, out_dtype, bias=None, kernel: str | None = None):
    """x: Fp8Tensor `[M, K]` or `[G, max_m, K]` (scale over the 2-D view); w: GroupedFp8Tensor.
    `kernel` "hopper" or "portable" forces one (benchmarks compare them); None chooses."""
    if kernel != "portable" and (kernel == "hopper" or _hopper_takes(x, w, offsets, out_dtype, bias)):
        try:
            return _hopper_module().grouped_linear(x, w, offsets, masked_m, out_dtype, bias)
        except Exception as e:  # noqa: BLE001 - re-raised unless this Triton cannot build the kernel
            if kernel == "hopper" or not build_failed(e):
                raise
            _hopper_unavailable.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            logging.getLogger("fp8dispatch").warning(
                "triton: the Hopper grouped kernel failed to compile on this Triton (%s); the portable kernel "
                "serves instead", _hopper_unavailable[0])
    groups, n, k = w.data.shape
    masked = offsets is None
    xd = x.data.reshape(-1, k)
    rows = x.data.shape[1] if masked else xd.shape[0]
    out = torch.empty((*x.data.shape[:-1], n), dtype=out_dtype, device=xd.device)
    out2d = out.view(-1, n)
    block_k_scale = x.block[1] if x.block[1] < k else 0
    block_m, block_n, block_k = _tiles(rows, groups, masked, block_k_scale)
    tiles_n = cdiv(n, block_n)
    bound = groups * cdiv(rows, block_m) * tiles_n if masked else (cdiv(rows, block_m) + groups) * tiles_n
    programs = max(1, min(bound, INTERPRETER_PROGRAMS if interpreting() else sm_count(xd.device)))
    sw = w.scale
    bounds = masked_m if masked else offsets
    bias_arg = bias.contiguous() if bias is not None else out2d
    _grouped_kernel[(programs,)](
        xd, w.data, out2d, x.scale, sw, bias_arg, bounds,
        groups, rows, n, k,
        xd.stride(0), xd.stride(1), w.data.stride(0), w.data.stride(1), w.data.stride(2),
        out2d.stride(0), out2d.stride(1),
        x.scale.stride(0), x.scale.stride(1), sw.stride(0), sw.stride(1), sw.stride(2),
        n if bias is not None else 0,
        w.block[0],
        MASKED=masked, SCALE_K=block_k_scale, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_PROGRAMS=programs,
        **({} if interpreting() else dict(num_warps=8 if block_m == 128 else 4, num_stages=GPU_STAGES)),
    )
    return out


# Rows per expert from which the Hopper kernel serves. Measured on the H200 (docs/triton.md), it is
# the faster of the two at every point of the grouped grid, down to 32 rows per expert (256
# experts, skewed) and masked decode with max_m = 64; fewer rows were not measured.
HOPPER_MIN_ROWS = 32
# Why the Hopper grouped kernel cannot be built here, once a compile has failed (never tried again).
_hopper_unavailable: list[str] = []


def rows_per_expert(rows: int, groups: int, masked: bool) -> int:
    """The rows an expert holds (masked: max_m) or has on average (contiguous: M / G)."""
    return rows if masked else rows // max(groups, 1)


def kernel_for(problem) -> str:
    """Which of the two kernels `grouped_linear` runs for a problem, for `explain` (pointer
    alignment aside: an unaligned call takes the portable kernel)."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if (not interpreting() and problem.capability == (9, 0) and not _hopper_unavailable
            and _hopper_module() is not None and problem.x_block == (1, 128) and problem.w_block == (128, 128)
            and problem.x_dtype in fp8 and problem.w_dtype in fp8 and problem.k % 16 == 0
            and (problem.n * problem.out_dtype.itemsize) % 16 == 0
            and rows_per_expert(problem.m, problem.groups, problem.layout == "masked") >= HOPPER_MIN_ROWS):
        return f"hopper_grouped.py: warp-specialized Gluon grouped kernel (sm90, ≥ {HOPPER_MIN_ROWS} rows per expert)"
    return "grouped.py: portable persistent grouped kernel"


def plan(problem):
    """The backend's grouped_linear, carrying `kernel_for(problem)` for `explain`."""
    def run(x, w, offsets, masked_m, out_dtype, bias=None):
        return grouped_linear(x, w, offsets, masked_m, out_dtype, bias)
    run.kernel = kernel_for(problem)
    return run


def _hopper_takes(x, w, offsets, out_dtype, bias) -> bool:
    masked = offsets is None
    rows = x.data.shape[1 if masked else 0]  # masked x [G, max_m, K], contiguous [M, K]
    if (interpreting() or rows_per_expert(rows, w.data.shape[0], masked) < HOPPER_MIN_ROWS or _hopper_unavailable
            or device_capability(x.data.device) != (9, 0)):
        return False
    hopper = _hopper_module()
    return hopper is not None and hopper.why_not(x, w, out_dtype, bias) is None


@cache
def _hopper_module():
    """`hopper_grouped.py`, or None where this Triton has no Gluon warp specialization for Hopper."""
    try:
        from . import hopper_grouped
    except (ImportError, AttributeError):
        return None
    return hopper_grouped
