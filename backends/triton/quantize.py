"""Quantize kernels: 1×g groups and rows in one pass or two sweeps, b×b blocks one program each, tensorwise in two.

Every kernel reads `x` [R, C] (any strides; fp32, fp16 or bf16) once per element, computes each
block's scale with the helpers of `scaling.py`, and writes contiguous FP8 data plus an fp32 scale
per block, `[ceil(R/br), ceil(C/bc)]`. A user scale replaces the amax step.

Three shapes of work:
- groups (br == 1, bc = g, rows are the g = C case): a program owns BLOCK_R rows × GROUPS groups,
  viewed as a [BLOCK_R, GROUPS, G_P2] tile (G_P2 = next power of two ≥ g, masked), so the amax is a
  reduction over the last axis and each element is loaded once;
- wide groups (1×g with g > MAX_GROUP, or g ≥ SWEEP_MIN_GROUP and not a power of two, rows
  included): a program owns BLOCK_R rows of one group and sweeps it CHUNK columns at a time,
  amax then cast (the second sweep hits L1/L2), so a 7168-wide row is 7 unpadded chunks;
- blocks (br > 1): one program per block, a single load when the block fits a tile, else an
  amax sweep then a cast sweep over chunks (the second hits L2);
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
from fp8dispatch.errors import Fp8ValueError
from fp8dispatch.formats import fp8_format

from .launch import Direct, Launcher, listening, raw_stream
from .scaling import finite_abs, saturating_cast, scale_from_amax
from .interpreter import active as interpreting
from .tiles import TILE, next_pow2, num_warps_for, sm_count, wide_groups_plan

# A group wider than this (elements) is swept by `_wide_groups_kernel`: 16384 fp32 values are 32
# registers per thread at 16 warps, the most one pass can hold without spilling.
MAX_GROUP = 16384
# Groups (rows) at least this wide that are not a power of two are swept by `_wide_groups_kernel`
# instead of padded to a power-of-two tile; see `swept`.
SWEEP_MIN_GROUP = 1024
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
def _load_chunk(x_rows, c0, c_end, row_ok, stride_xc, CHUNK: tl.constexpr, EVEN: tl.constexpr,
                EVICT: tl.constexpr):
    """One sweep step of `_wide_groups_kernel`: the [BLOCK_R, CHUNK] tile at column c0, in fp32."""
    cols = c0 + tl.arange(0, CHUNK)
    if EVEN:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols < c_end)[None, :]
    x = tl.load(x_rows + cols[None, :] * stride_xc, mask=mask, other=0.0, eviction_policy=EVICT)
    return x.to(tl.float32), cols, mask


@triton.jit
def _wide_groups_kernel(
    x_ptr, q_ptr, s_ptr,
    R, C,
    stride_xr, stride_xc,
    stride_sr, stride_sc,  # of the scale tensor, [R, n_groups]; a user scale may be a view
    scale_ub,
    GROUP: tl.constexpr,  # g, the block width (a row: g = C), any integer
    BLOCK_R: tl.constexpr,  # rows per program, each with its own scale
    CHUNK: tl.constexpr,  # columns per step of a sweep (a power of two)
    EVEN: tl.constexpr,  # every chunk lies inside its group and inside C: no column mask
    AMAX_EVICT: tl.constexpr, CAST_EVICT: tl.constexpr,  # cache hints of the two sweeps ("" = none)
    UNROLL: tl.constexpr,  # steps per loop trip; None: the compiler's (it unrolls a constant trip count)
    FP8_MAX: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_UB: tl.constexpr, POW2: tl.constexpr,
):
    # A program owns BLOCK_R rows of one group, [c_start, c_end), and sweeps it CHUNK columns at a
    # time, twice: a running elementwise max of |x| over [BLOCK_R, CHUNK] reduced to one amax per
    # row, then the cast. The second sweep's reads hit L1/L2 (BLOCK_R * g * 2 bytes per program for
    # bf16, far below the L2), so HBM sees each element once. Unlike `_groups_kernel`, no lane is
    # padded: g = 7168 is 7 chunks of 1024, not an 8192-lane tile with 12.5 % of it masked.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_start = tl.program_id(1) * GROUP
    c_end = tl.minimum(c_start + GROUP, C)
    if EVEN:
        c_end = c_start + GROUP  # a constant trip count
    row_ok = rows < R
    x_rows = x_ptr + rows[:, None] * stride_xr
    q_rows = q_ptr + rows[:, None] * C
    s_ptrs = s_ptr + rows * stride_sr + tl.program_id(1) * stride_sc
    if HAS_SCALE:
        scale = tl.load(s_ptrs, mask=row_ok, other=1.0)
    else:
        amax = tl.zeros([BLOCK_R, CHUNK], tl.float32)
        for c0 in tl.range(c_start, c_end, CHUNK, loop_unroll_factor=UNROLL):
            x, cols, mask = _load_chunk(x_rows, c0, c_end, row_ok, stride_xc, CHUNK, EVEN, AMAX_EVICT)
            amax = tl.maximum(amax, finite_abs(x))
        scale = scale_from_amax(tl.max(amax, axis=1), scale_ub, FP8_MAX, HAS_UB, POW2)
        tl.store(s_ptrs, scale, mask=row_ok)
    for c0 in tl.range(c_start, c_end, CHUNK, loop_unroll_factor=UNROLL):
        x, cols, mask = _load_chunk(x_rows, c0, c_end, row_ok, stride_xc, CHUNK, EVEN, CAST_EVICT)
        q = saturating_cast(x, scale[:, None], FP8_MAX, q_ptr.dtype.element_ty)
        tl.store(q_rows + cols[None, :], q, mask=mask)


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
        # A scalar `if`, not `mask & (tile < n_tiles)`: a scalar predicate splatted into a block
        # mask reaches Triton 3.9's interpreter as an int32 mask, which its load rejects.
        if tile < n_tiles:
            rows, cols, mask = _tile_offsets(tile, R, C, n_tile_cols, TR, TC)
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
        if tile >= 0:  # a scalar `if` for the reason given in _tensor_amax_kernel
            rows, cols, mask = _tile_offsets(tile, R, C, n_tile_cols, TR, TC)
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
            q = saturating_cast(x.to(tl.float32), scale, FP8_MAX, q_ptr.dtype.element_ty)
            tl.store(q_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)


_groups = Launcher(_groups_kernel, tensors=3)
_wide_groups = Launcher(_wide_groups_kernel, tensors=3)
_blocks = Launcher(_blocks_kernel, tensors=3)
_tensor_amax = Launcher(_tensor_amax_kernel, tensors=2)
_tensor_cast = Launcher(_tensor_cast_kernel, tensors=4)


def quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """The backend's quantize: (data [R, C] contiguous, scale [ceil(R/br), ceil(C/bc)] fp32)."""
    rows, cols = x.shape
    br, bc = block
    if br == 1 and swept(min(bc, cols)):
        return _quantize_wide_groups(x, bc, dtype, scale, scale_ub, pow2_scale)
    if br == 1:
        return _quantize_groups(x, min(bc, cols), dtype, scale, scale_ub, pow2_scale)
    if br >= rows and bc >= cols:
        data, scales = quantize_tensorwise(x, dtype, scale, scale_ub, pow2_scale)
        return data, scales[:1].view(1, 1)
    return _quantize_blocks(x, block, dtype, scale, scale_ub, pow2_scale)


def swept(group: int) -> bool:
    """Whether a 1×g group (a row: g = C) goes to the two-sweep kernel rather than the one-pass tile:
    when it is too wide for one tile, or wide and not a power of two, where the tile would pad it
    (7168 -> 8192 lanes: 12.5 % masked, and one row per program)."""
    return group > MAX_GROUP or (group >= SWEEP_MIN_GROUP and group & (group - 1) != 0)


def _outputs(x, block, dtype, scale):
    data = torch.empty(x.shape, dtype=dtype, device=x.device)
    if scale is None:
        scale = torch.empty(scale_shape(tuple(x.shape), block), dtype=torch.float32, device=x.device)
    return data, scale


def _flags(fmt, scale, scale_ub, pow2_scale) -> dict:
    return dict(FP8_MAX=fmt.max_value, HAS_SCALE=scale is not None, HAS_UB=scale_ub is not None,
                POW2=pow2_scale)


def _pow2(name: str, value: int | None) -> None:
    if value is not None and (value < 1 or value & (value - 1)):
        raise Fp8ValueError(f"{name}: expected a power of two ≥ 1, got {value}")


def _quantize_groups(x, group, dtype, scale, scale_ub, pow2_scale, tile=None, groups=None, num_warps=None):
    """1×g groups in one pass. `tile` (elements per program), `groups` (per program, a power of
    two) and `num_warps` default to today's choice; the benchmark's sweep passes others."""
    _pow2("groups", groups)
    rows, cols = x.shape
    data, s = _outputs(x, (1, group), dtype, scale)
    n_groups = cdiv(cols, group)
    g_p2 = next_pow2(group)
    tile = tile or TILE()
    if groups is None:
        groups = min(next_pow2(n_groups), max(1, 1024 // g_p2), max(1, tile // g_p2))
    block_r = min(next_pow2(rows), max(1, tile // (groups * g_p2)))
    grid = (cdiv(rows, block_r), cdiv(n_groups, groups))
    _groups(
        grid,
        (x, data, s, rows, cols, x.stride(0), x.stride(1), s.stride(0), s.stride(1), n_groups, scale_ub or 0.0),
        dict(GROUP=group, G_P2=g_p2, GROUPS=groups, BLOCK_R=block_r, **_flags(fp8_format(dtype), scale, scale_ub,
                                                                             pow2_scale)),
        dict(num_warps=num_warps or num_warps_for(block_r * groups * g_p2)),
    )
    return data, s


def _quantize_wide_groups(x, group, dtype, scale, scale_ub, pow2_scale, block_r=None, chunk=None, num_warps=None,
                          evict=None, unroll=None):
    """1×g groups (rows when g ≥ C) swept twice by `_wide_groups_kernel`. Each knob left None takes
    `tiles.wide_groups_plan`'s value: `block_r` rows per program and `chunk` columns per step
    (powers of two), `num_warps`, `evict` (hint the amax sweep's lines to stay in cache, the cast
    sweep's to go) and `unroll` (steps per loop trip; 0: the compiler's choice)."""
    rows, cols = x.shape
    g = min(group, cols)
    plan = wide_groups_plan(rows, g)
    given = dict(block_r=block_r, chunk=chunk, num_warps=num_warps, evict=evict, unroll=unroll)
    plan.update((k, v) for k, v in given.items() if v is not None)
    block_r, chunk, evict = plan["block_r"], plan["chunk"], plan["evict"]
    _pow2("block_r", block_r)
    _pow2("chunk", chunk)
    data, s = _outputs(x, (1, group), dtype, scale)
    even = g % chunk == 0 and cols % g == 0
    _wide_groups(
        (cdiv(rows, block_r), cdiv(cols, g)),
        (x, data, s, rows, cols, x.stride(0), x.stride(1), s.stride(0), s.stride(1), scale_ub or 0.0),
        dict(GROUP=g, BLOCK_R=block_r, CHUNK=chunk, EVEN=even, AMAX_EVICT="evict_last" if evict else "",
             CAST_EVICT="evict_first" if evict else "", UNROLL=plan["unroll"] or None,
             **_flags(fp8_format(dtype), scale, scale_ub, pow2_scale)),
        dict(num_warps=plan["num_warps"]),
    )
    return data, s


def _quantize_blocks(x, block, dtype, scale, scale_ub, pow2_scale, tile=None, num_warps=None):
    """One program per block; `tile` (elements per sweep step) and `num_warps` default to today's."""
    rows, cols = x.shape
    br, bc = min(block[0], rows), min(block[1], cols)
    data, s = _outputs(x, block, dtype, scale)
    tile = tile or TILE()
    chunk_c = min(next_pow2(bc), tile)
    chunk_r = min(next_pow2(br), max(1, tile // chunk_c))
    _blocks(
        (cdiv(rows, br), cdiv(cols, bc)),
        (x, data, s, rows, cols, x.stride(0), x.stride(1), s.stride(0), s.stride(1), scale_ub or 0.0),
        dict(BR=br, BC=bc, CHUNK_R=chunk_r, CHUNK_C=chunk_c, **_flags(fp8_format(dtype), scale, scale_ub, pow2_scale)),
        dict(num_warps=num_warps or num_warps_for(chunk_r * chunk_c)),
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


# --- plans ------------------------------------------------------------------------------------


def kernel_for(problem) -> tuple[Launcher | None, str]:
    """The kernel `quantize` runs for a problem, and its name for `explain`."""
    rows, cols = problem.shape
    br, bc = problem.block
    if br == 1 and swept(min(bc, cols)):
        return _wide_groups, "two-sweep 1×g groups kernel"
    if br == 1:
        return _groups, "one-pass groups kernel"
    if br >= rows and bc >= cols:
        return None, "tensorwise kernels (amax, then cast: two launches)"
    return _blocks, "b×b blocks kernel"


def plan(problem):
    """A runner for every call of `problem` whose shape, strides, dtypes and options the caller's
    key fixes: the first call launches through Triton and keeps the compiled kernel, later calls
    allocate the outputs and launch it directly (one kernel, no Triton binder)."""
    launcher, kernel = kernel_for(problem)
    traced = None if interpreting() else quantize  # under torch.compile: graph nodes Inductor launches
    if launcher is None or problem.user_scale or problem.device.type != "cuda":
        def run(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
            return quantize(x, block, dtype, scale, scale_ub, pow2_scale)
        run.kernel, run.traced = kernel, traced
        return run
    bound = None

    def run(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
        nonlocal bound
        if bound:
            try:
                out = bound(x, scale_ub)
            except TypeError:  # this Triton's launcher takes its arguments otherwise: never again
                bound = False
            else:
                if out is not None:
                    return out
        out = quantize(x, block, dtype, scale, scale_ub, pow2_scale)
        if bound is None:
            bound = _bind(launcher, x, out)
        return out

    run.kernel, run.traced = kernel, traced
    if not problem.scale_ub:  # once bound, the kernel on raw pointers (its direct launch passes no scale_ub)
        run.direct = lambda: bound.direct if bound else None
    return run


def _bind(launcher: Launcher, x, out):
    """`(x, scale_ub) -> (data, scale)` launching the kernel `launcher` last compiled for x, or
    None (unaligned first input, launch hooks set). Returns None on a call whose x is unaligned
    or while a launch hook listens (Triton's own path then serves)."""
    found = launcher.bound(x)
    if found is None:
        return None
    (g0, g1, g2), launch, function, packed, args, tail = found
    ints = args[3:-1]  # every kernel here takes (x, q, s, ints..., scale_ub, constexprs...)
    data_shape, data_dtype, scale_shape_ = tuple(out[0].shape), out[0].dtype, tuple(out[1].shape)
    device, index = x.device, x.device.index
    f32, stream = torch.float32, raw_stream

    def run(x, scale_ub):
        px = x.data_ptr()
        if px & 15 or listening():
            return None
        data = torch.empty(data_shape, dtype=data_dtype, device=device)
        s = torch.empty(scale_shape_, dtype=f32, device=device)
        launch(g0, g1, g2, stream(index), function, packed, None, None, None, px, data.data_ptr(), s.data_ptr(),
               *ints, scale_ub or 0.0, *tail)
        return data, s

    def launch_into(px, pdata, pscale):  # x's groups into memory the caller owns (16-byte aligned)
        launch(g0, g1, g2, stream(index), function, packed, None, None, None, px, pdata, pscale, *ints, 0.0, *tail)

    run.direct = Direct(launch_into, (out[0].nbytes, out[1].nbytes))
    return run
