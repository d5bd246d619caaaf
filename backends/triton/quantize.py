"""Quantize kernels: 1×g groups and rows in one pass, b×b blocks one program each, tensorwise in two.

Every kernel reads `x` [R, C] (any strides; fp32, fp16 or bf16) once per element, computes each
block's scale with the helpers of `scaling.py`, and writes contiguous FP8 data plus an fp32 scale
per block, `[ceil(R/br), ceil(C/bc)]`. A user scale replaces the amax step.

Three shapes of work:
- groups (br == 1, bc = g, rows are the g = C case): a program owns BLOCK_R rows × GROUPS groups,
  viewed as a [BLOCK_R, GROUPS, G_P2] tile (G_P2 = next power of two ≥ g, masked), so the amax is a
  reduction over the last axis and each element is loaded once;
- blocks (br > 1, or groups too wide for one tile): one program per block, a single load when the
  block fits a tile, else an amax sweep then a cast sweep over chunks (the second hits L2);
- tensor: launch 1 writes one partial amax per program of a persistent grid; launch 2 reduces the
  partials in every program (a few KB from L2), computes the scale, casts, and program 0 stores
  the scale and its reciprocal. Launch 2 walks the tiles in reverse so the tiles launch 1 touched
  last are still in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8dispatch.blocks import cdiv, scale_shape
from fp8dispatch.formats import fp8_format

from .launch import Launcher
from .scaling import finite_abs, saturating_cast, scale_from_amax
from .tiles import TILE, next_pow2, num_warps_for, sm_count

# A group wider than this (elements) is quantized by the chunked block kernel: 16384 fp32 values
# are 32 registers per thread at 16 warps, the most one pass can hold without spilling.
MAX_GROUP = 16384
# The tensorwise grid: enough programs to fill the GPU a few times over, and few enough partial
# amaxes that every program of launch 2 can reduce them all (4 KB).
PARTIALS_PER_SM = 4
MAX_PARTIALS = 1024


@triton.jit
def _groups_kernel(
    x_ptr, q_ptr, s_ptr,
    R, C,
    stride_xr, stride_xc,
    stride_sr, stride_sc,  # of the scale tensor, [R, n_groups]; a user scale may be a view
    n_groups,
    scale_ub,  # cap on amax, read only when HAS_UB
    GROUP: tl.constexpr,  # g, the block width
    G_P2: tl.constexpr,  # next power of two ≥ g: the tile's last axis, masked beyond g
    GROUPS: tl.constexpr,  # groups per program along the columns
    BLOCK_R: tl.constexpr,  # rows per program
    FP8_MAX: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_UB: tl.constexpr, POW2: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    inner = tl.arange(0, G_P2)
    cols = groups[:, None] * GROUP + inner[None, :]  # [GROUPS, G_P2]
    col_ok = (inner[None, :] < GROUP) & (cols < C)
    mask = (rows < R)[:, None, None] & col_ok[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xr + cols[None, :, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)

    s_mask = (rows < R)[:, None] & (groups < n_groups)[None, :]
    s_ptrs = s_ptr + rows[:, None] * stride_sr + groups[None, :] * stride_sc
    if HAS_SCALE:
        scale = tl.load(s_ptrs, mask=s_mask, other=1.0)
    else:
        scale = scale_from_amax(tl.max(finite_abs(x), axis=2), scale_ub, FP8_MAX, HAS_UB, POW2)
        tl.store(s_ptrs, scale, mask=s_mask)
    q = saturating_cast(x, scale[:, :, None], FP8_MAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None, None] * C + cols[None, :, :], q, mask=mask)


@triton.jit
def _blocks_kernel(
    x_ptr, q_ptr, s_ptr,
    R, C,
    stride_xr, stride_xc,
    stride_sr, stride_sc,
    scale_ub,
    BR: tl.constexpr, BC: tl.constexpr,  # the block
    CHUNK_R: tl.constexpr, CHUNK_C: tl.constexpr,  # the tile swept over it (powers of two)
    FP8_MAX: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_UB: tl.constexpr, POW2: tl.constexpr,
):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    r_end = tl.minimum((pid_r + 1) * BR, R)
    c_end = tl.minimum((pid_c + 1) * BC, C)
    s_ptrs = s_ptr + pid_r * stride_sr + pid_c * stride_sc
    one_pass: tl.constexpr = CHUNK_R >= BR and CHUNK_C >= BC
    if one_pass:
        rows = pid_r * BR + tl.arange(0, CHUNK_R)
        cols = pid_c * BC + tl.arange(0, CHUNK_C)
        mask = (rows < r_end)[:, None] & (cols < c_end)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_SCALE:
            scale = tl.load(s_ptrs)
        else:
            scale = scale_from_amax(tl.max(tl.max(finite_abs(x), axis=1), axis=0), scale_ub,
                                    FP8_MAX, HAS_UB, POW2)
            tl.store(s_ptrs, scale)
        q = saturating_cast(x, scale, FP8_MAX, q_ptr.dtype.element_ty)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)
    else:
        if HAS_SCALE:
            scale = tl.load(s_ptrs)
        else:
            amax = tl.zeros([CHUNK_R, CHUNK_C], tl.float32)
            for r0 in range(0, BR, CHUNK_R):
                for c0 in range(0, BC, CHUNK_C):
                    rows = pid_r * BR + r0 + tl.arange(0, CHUNK_R)
                    cols = pid_c * BC + c0 + tl.arange(0, CHUNK_C)
                    mask = (rows < r_end)[:, None] & (cols < c_end)[None, :]
                    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask,
                                other=0.0)
                    amax = tl.maximum(amax, finite_abs(x.to(tl.float32)))
            scale = scale_from_amax(tl.max(tl.max(amax, axis=1), axis=0), scale_ub, FP8_MAX, HAS_UB, POW2)
            tl.store(s_ptrs, scale)
        for r0 in range(0, BR, CHUNK_R):
            for c0 in range(0, BC, CHUNK_C):
                rows = pid_r * BR + r0 + tl.arange(0, CHUNK_R)
                cols = pid_c * BC + c0 + tl.arange(0, CHUNK_C)
                mask = (rows < r_end)[:, None] & (cols < c_end)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
                q = saturating_cast(x.to(tl.float32), scale, FP8_MAX, q_ptr.dtype.element_ty)
                tl.store(q_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)


@triton.jit
def _tile_offsets(tile, R, C, n_tile_cols, TR: tl.constexpr, TC: tl.constexpr):
    rows = (tile // n_tile_cols) * TR + tl.arange(0, TR)
    cols = (tile % n_tile_cols) * TC + tl.arange(0, TC)
    return rows, cols, (rows < R)[:, None] & (cols < C)[None, :]


@triton.jit
def _tensor_amax_kernel(
    x_ptr, partial_ptr,  # partial_ptr: one fp32 amax per program
    R, C, stride_xr, stride_xc,
    n_tile_cols, n_tiles,
    iters,  # tiles per program: program p takes tiles p, p + P, p + 2P, ...
    TR: tl.constexpr, TC: tl.constexpr,
):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    amax = tl.zeros([TR, TC], tl.float32)
    for i in range(iters):
        tile = pid + i * programs
        rows, cols, mask = _tile_offsets(tile, R, C, n_tile_cols, TR, TC)
        mask = mask & (tile < n_tiles)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        amax = tl.maximum(amax, finite_abs(x.to(tl.float32)))
    tl.store(partial_ptr + pid, tl.max(tl.max(amax, axis=1), axis=0))


@triton.jit
def _tensor_cast_kernel(
    x_ptr, q_ptr, partial_ptr,
    s_ptr,  # [2]: the scale, then its reciprocal (a user scale is read from s_ptr[0])
    R, C, stride_xr, stride_xc,
    n_tile_cols, n_tiles, n_partials, iters,
    scale_ub,
    TR: tl.constexpr, TC: tl.constexpr,
    PARTIALS_P2: tl.constexpr,  # next power of two ≥ n_partials
    FP8_MAX: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_UB: tl.constexpr, POW2: tl.constexpr,
):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    if HAS_SCALE:
        scale = tl.load(s_ptr)
    else:
        offs = tl.arange(0, PARTIALS_P2)
        partials = tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
        scale = scale_from_amax(tl.max(partials, axis=0), scale_ub, FP8_MAX, HAS_UB, POW2)
    if pid == 0:
        tl.store(s_ptr, scale)
        tl.store(s_ptr + 1, tl.math.div_rn(tl.full([], 1.0, tl.float32), scale))
    for i in range(iters):
        tile = n_tiles - 1 - (pid + i * programs)
        rows, cols, mask = _tile_offsets(tile, R, C, n_tile_cols, TR, TC)
        mask = mask & (tile >= 0)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        q = saturating_cast(x.to(tl.float32), scale, FP8_MAX, q_ptr.dtype.element_ty)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)


_groups = Launcher(_groups_kernel, tensors=3)
_blocks = Launcher(_blocks_kernel, tensors=3)
_tensor_amax = Launcher(_tensor_amax_kernel, tensors=2)
_tensor_cast = Launcher(_tensor_cast_kernel, tensors=4)


def quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """The backend's quantize: (data [R, C] contiguous, scale [ceil(R/br), ceil(C/bc)] fp32)."""
    rows, cols = x.shape
    br, bc = block
    if br == 1 and next_pow2(bc) <= MAX_GROUP:
        return _quantize_groups(x, bc, dtype, scale, scale_ub, pow2_scale)
    if br >= rows and bc >= cols:
        data, scales = quantize_tensorwise(x, dtype, scale, scale_ub, pow2_scale)
        return data, scales[:1].view(1, 1)
    return _quantize_blocks(x, block, dtype, scale, scale_ub, pow2_scale)


def _outputs(x, block, dtype, scale):
    data = torch.empty(x.shape, dtype=dtype, device=x.device)
    if scale is None:
        scale = torch.empty(scale_shape(tuple(x.shape), block), dtype=torch.float32, device=x.device)
    return data, scale


def _flags(fmt, scale, scale_ub, pow2_scale) -> dict:
    return dict(FP8_MAX=fmt.max_value, HAS_SCALE=scale is not None, HAS_UB=scale_ub is not None,
                POW2=pow2_scale)


def _quantize_groups(x, group, dtype, scale, scale_ub, pow2_scale):
    rows, cols = x.shape
    data, s = _outputs(x, (1, group), dtype, scale)
    n_groups = cdiv(cols, group)
    g_p2 = next_pow2(group)
    tile = TILE()
    groups = min(next_pow2(n_groups), max(1, 1024 // g_p2), max(1, tile // g_p2))
    block_r = min(next_pow2(rows), max(1, tile // (groups * g_p2)))
    grid = (cdiv(rows, block_r), cdiv(n_groups, groups))
    _groups(
        grid,
        (x, data, s, rows, cols, x.stride(0), x.stride(1), s.stride(0), s.stride(1), n_groups, scale_ub or 0.0),
        dict(GROUP=group, G_P2=g_p2, GROUPS=groups, BLOCK_R=block_r, **_flags(fp8_format(dtype), scale, scale_ub,
                                                                             pow2_scale)),
        dict(num_warps=num_warps_for(block_r * groups * g_p2)),
    )
    return data, s


def _quantize_blocks(x, block, dtype, scale, scale_ub, pow2_scale):
    rows, cols = x.shape
    br, bc = min(block[0], rows), min(block[1], cols)
    data, s = _outputs(x, block, dtype, scale)
    tile = TILE()
    chunk_c = min(next_pow2(bc), tile)
    chunk_r = min(next_pow2(br), max(1, tile // chunk_c))
    _blocks(
        (cdiv(rows, br), cdiv(cols, bc)),
        (x, data, s, rows, cols, x.stride(0), x.stride(1), s.stride(0), s.stride(1), scale_ub or 0.0),
        dict(BR=br, BC=bc, CHUNK_R=chunk_r, CHUNK_C=chunk_c, **_flags(fp8_format(dtype), scale, scale_ub, pow2_scale)),
        dict(num_warps=num_warps_for(chunk_r * chunk_c)),
    )
    return data, s


def quantize_tensorwise(x, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """Tensorwise in two launches: (data, [scale, 1/scale] fp32 [2]) — callers pick either."""
    rows, cols = x.shape
    data = torch.empty(x.shape, dtype=dtype, device=x.device)
    scales = torch.empty(2, dtype=torch.float32, device=x.device)
    if scale is not None:
        scales[:1].copy_(scale.reshape(1))  # the cast kernel reads the scale from scales[0]
    tile = TILE()
    tc = min(next_pow2(cols), 1024)
    tr = min(next_pow2(rows), max(1, tile // tc))
    n_tile_cols = cdiv(cols, tc)
    n_tiles = cdiv(rows, tr) * n_tile_cols
    programs = min(n_tiles, MAX_PARTIALS, PARTIALS_PER_SM * sm_count(x.device))
    iters = cdiv(n_tiles, programs)
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    common = (rows, cols, x.stride(0), x.stride(1), n_tile_cols, n_tiles)
    warps = num_warps_for(tr * tc)
    if scale is None:
        _tensor_amax((programs,), (x, partials, *common, iters), dict(TR=tr, TC=tc), dict(num_warps=warps))
    _tensor_cast(
        (programs,),
        (x, data, partials, scales, *common, programs, iters, scale_ub or 0.0),
        dict(TR=tr, TC=tc, PARTIALS_P2=next_pow2(programs),
             **_flags(fp8_format(dtype), scale, scale_ub, pow2_scale)),
        dict(num_warps=warps),
    )
    return data, scales
