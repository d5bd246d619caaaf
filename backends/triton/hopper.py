"""The block recipe on Hopper: a persistent, warp-specialized Gluon kernel (sm90 only).

The portable kernel (`matmul.py`) must wait for each K step's wgmma before promoting its fp32
partial (`acc += dot(a, b) * sa * sb`), so the tensor cores idle while the CUDA cores promote,
and ptxas serializes any attempt to promote one step while the next MMA runs (measured:
benchmarks/block_gemm_variants.py, docs/triton.md). This kernel gets the overlap the way
DeepGEMM's and CUTLASS's FP8 block-scaled kernels do, by giving the work to separate warps:

- a producer warp issues every TMA load: per K step, the 128×128 weight tile and the tile's
  two 64-row halves of `a`, into a ring of STAGES shared-memory stages; each stage has a `ready`
  mbarrier (counting its bytes) and an `empty` one (both consumers release it);
- two consumer warpgroups, one partition each, own the top and bottom 64 rows of the 128×128
  output tile: wait for a stage, one wgmma (m64n128, K=128), wait for it, release the stage,
  `acc += partial * sa[row, k] * sb[k, tile]`. Being separate partitions, no barrier spans both,
  so they drift apart and one's promotion overlaps the other's MMA;
- persistent: one program per SM walks the tiles (GROUP_M row tiles per column tile, so weight
  tiles stay in L2), and the producer fills the ring with the next tile's steps while the
  consumers finish the last one. Each consumer writes its 64×128 tile to shared memory and lets
  a TMA store take it out while it starts the next tile; TMA clips the store at M and N, and zero
  fills loads past them, so tails need no masks.

Layout: a [M, K] and the weight [N, K] K-contiguous (FP8 wgmma reads both operands K-major), 16-byte
aligned rows; scales `sa [M, K/128]` (1×128 groups) and `sb [K/128, N/128]` (128×128 blocks), any
strides. Registers: 12 warps (8 consumers, a producer warpgroup), `maxnreg=168` keeps the CTA in
64K registers, and setmaxnreg moves the producer's to the consumers (232 each).
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import cache

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .launch import ENABLED, bind as bind_launch, listening, raw_stream
from .tiles import sm_count

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128  # BLOCK_K = the scale group; BLOCK_N = the weight block's width
HALF = BLOCK_M // 2  # rows per consumer warpgroup: wgmma's M side
# 4 stages × 32 KB of operands + two 64×128 output tiles (≤ 64 KB) fit the 227 KB of shared memory;
# 4 and 5 stages measured within 1 % of each other on the H100 (docs/results/h100/block-gemm-hopper.json).
STAGES = 4
GROUP_M = 8
CONSUMER_WARPS = gl.constexpr(4)
CONSUMER_REGS = 232
PRODUCER_REGS = 24  # the fewest setmaxnreg allows: the producer holds a few scalars

# Triton 3.9 renamed the TMA copies (its old names only raise); the arguments are the same.
tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)
_OCP_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_GL_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5, torch.bfloat16: gl.bfloat16,
              torch.float16: gl.float16, torch.float32: gl.float32}


@gluon.jit
def grouped_tile(tile, tiles_m, tiles_n, GROUP_M: gl.constexpr):
    """tiles.grouped_tile for Gluon kernels: GROUP_M row tiles per column tile, so b stays in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@gluon.jit
def load_step(a_desc, b_desc, a_top, a_bottom, b_smem, ready, empty, i, off_m, off_n, off_k):
    """Ring position i: wait for its stage to be empty, then TMA a's two 64-row halves at (off_m,
    off_k) and b's tile at (off_n, off_k) into it, its `ready` barrier counting the bytes."""
    STAGES: gl.constexpr = b_smem.type.shape[0]
    HALF: gl.constexpr = a_desc.block_type.shape[0]
    STEP_BYTES: gl.constexpr = (2 * HALF + b_desc.block_type.shape[0]) * a_desc.block_type.shape[1]
    stage = i % STAGES
    # mbarriers start with phase 1 complete: the first pass over the ring finds every stage empty.
    mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(stage), STEP_BYTES)
    tma_load(a_desc, [off_m, off_k], ready.index(stage), a_top.index(stage))
    tma_load(a_desc, [off_m + HALF, off_k], ready.index(stage), a_bottom.index(stage))
    tma_load(b_desc, [off_n, off_k], ready.index(stage), b_smem.index(stage))


@gluon.jit
def scaled_tile(zero, a_half, b_smem, ready, empty, i, steps, sa_ptrs, stride_sak, sb_ptrs, stride_sbk):
    """One consumer's 64×128 fp32 tile over `steps` ring positions from i: per step one wgmma,
    waited for, its stage released, its partial promoted by sa[row, k] · sb[k]. `zero`: a zero
    tile in the wgmma's layout. Returns (tile, i)."""
    STAGES: gl.constexpr = b_smem.type.shape[0]
    acc = zero
    for k in range(steps):
        stage = i % STAGES
        scale = gl.load(sa_ptrs + k * stride_sak) * gl.load(sb_ptrs + k * stride_sbk)
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        partial = warpgroup_mma(a_half.index(stage), b_smem.index(stage).permute((1, 0)), zero, use_acc=False,
                                is_async=True)
        partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial, ))
        mbarrier.arrive(empty.index(stage), count=1)
        acc += partial * gl.expand_dims(scale, 1)
        i += 1
    return acc, i


@gluon.jit
def store_tile(c_desc, c_smem, acc, off_m, off_n):
    """A finished tile out through shared memory and a TMA store (clipped at c's edges), left in
    flight while the warpgroup goes on."""
    tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
    c_smem.store(acc.to(c_desc.dtype))
    fence_async_shared()
    tma_store(c_desc, [off_m, off_n], c_smem)


@gluon.jit
def _producer(a_desc, b_desc, a_top, a_bottom, b_smem, ready, empty, M, N, K, GROUP_M: gl.constexpr):
    HALF: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    tiles_m = gl.cdiv(M, 2 * HALF)
    tiles_n = gl.cdiv(N, BN)
    steps = gl.cdiv(K, BK)
    i = 0  # steps issued over every tile so far: the position in the ring
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        for k in range(steps):
            load_step(a_desc, b_desc, a_top, a_bottom, b_smem, ready, empty, i, pid_m * 2 * HALF, pid_n * BN, k * BK)
            i += 1


@gluon.jit
def _consumer(a_half, b_smem, ready, empty, c_desc, c_smem, sa_ptr, sb_ptr, bias_ptr, M, N, K,
              half,  # 0: the tile's top 64 rows, 1: the bottom ones
              stride_sam, stride_sak, stride_sbk, stride_sbn, has_bias, GROUP_M: gl.constexpr):
    BM: gl.constexpr = a_half.type.shape[1]
    BN: gl.constexpr = b_smem.type.shape[1]
    BK: gl.constexpr = b_smem.type.shape[2]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                  instr_shape=[16, BN, 256 // a_half.dtype.primitive_bitwidth])
    tiles_m = gl.cdiv(M, 2 * BM)
    tiles_n = gl.cdiv(N, BN)
    steps = gl.cdiv(K, BK)
    zero = gl.zeros((BM, BN), gl.float32, layout=mma)
    i = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        rows = pid_m * 2 * BM + half * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        sa_ptrs = sa_ptr + gl.minimum(rows, M - 1) * stride_sam  # rows past M are never stored
        acc, i = scaled_tile(zero, a_half, b_smem, ready, empty, i, steps, sa_ptrs, stride_sak,
                             sb_ptr + pid_n * stride_sbn, stride_sbk)
        if has_bias != 0:
            acc += gl.expand_dims(gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32), 0)
        store_tile(c_desc, c_smem, acc, pid_m * 2 * BM + half * BM, pid_n * BN)
    tma.store_wait(pendings=0)


@gluon.jit
def shared_memory(a_desc, b_desc, c_desc, STAGES: gl.constexpr):
    """The warp-specialized kernels' shared memory: a ring of STAGES K steps (a's top and bottom
    64-row halves, b's tile), one output tile per consumer, and each stage's `ready` mbarrier
    (the producer's TMA bytes) and `empty` one (released by both consumers)."""
    HALF: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_top = gl.allocate_shared_memory(a_desc.dtype, [STAGES, HALF, BK], a_desc.layout)
    a_bottom = gl.allocate_shared_memory(a_desc.dtype, [STAGES, HALF, BK], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    c_top = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    c_bottom = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release a stage
    return a_top, a_bottom, b_smem, c_top, c_bottom, ready, empty


@gluon.jit
def _block_scaled_mm_kernel(
    a_desc, b_desc, c_desc,  # TMA descriptors: a [M, K] in 64×128 boxes, the weight [N, K] and c [M, N]
    sa_ptr, sb_ptr, bias_ptr,
    M, N, K,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    has_bias,  # a runtime flag: Triton 3.6 failed to lower this kernel with a constexpr False here
    GROUP_M: gl.constexpr, STAGES: gl.constexpr,
    LIST_API: gl.constexpr,  # gl.warp_specialize takes a list of (function, args) (newer Triton)
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    a_top, a_bottom, b_smem, c_top, c_bottom, ready, empty = shared_memory(a_desc, b_desc, c_desc, STAGES)
    top = (a_top, b_smem, ready, empty, c_desc, c_top, sa_ptr, sb_ptr, bias_ptr, M, N, K, 0,
           stride_sam, stride_sak, stride_sbk, stride_sbn, has_bias, GROUP_M)
    bottom = (a_bottom, b_smem, ready, empty, c_desc, c_bottom, sa_ptr, sb_ptr, bias_ptr, M, N, K, 1,
              stride_sam, stride_sak, stride_sbk, stride_sbn, has_bias, GROUP_M)
    producer = (a_desc, b_desc, a_top, a_bottom, b_smem, ready, empty, M, N, K, GROUP_M)
    if LIST_API:
        gl.warp_specialize([(_consumer, top), (_consumer, bottom), (_producer, producer)], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize(top, _consumer, (bottom, producer), [_consumer, _producer], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])


@cache
def _layout(dtype: torch.dtype, rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPES[dtype])


@cache
def _list_api() -> bool:
    return "functions_and_args" in inspect.signature(gl.warp_specialize).parameters


@cache
def _no_bias(device: torch.device) -> torch.Tensor:
    # A pointer of its own for the unused bias argument (not one of the kernel's other tensors).
    return torch.zeros(16, dtype=torch.float32, device=device)


def why_not(a, b, out_dtype, bias) -> str | None:
    """Why this kernel cannot take the call (the portable kernel then does), or None."""
    da, db = a.data, b.data
    if a.block[1] != BLOCK_K or b.block != (BLOCK_K, BLOCK_N) or a.block[0] != 1:
        return f"blocks {a.block} · {b.block}: the kernel is the 1×128 · 128×128 recipe"
    if da.dtype not in _OCP_FP8 or db.dtype not in _OCP_FP8:
        return f"operands {da.dtype} · {db.dtype}: wgmma takes OCP FP8"
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"out_dtype {out_dtype}"
    if da.stride(1) != 1 or db.stride(0) != 1:
        return "TMA needs a row-major a and the transpose of a row-major [N, K] weight"
    if (da.stride(0) % 16 or db.stride(1) % 16 or (db.shape[1] * out_dtype.itemsize) % 16 or da.data_ptr() % 16
            or db.data_ptr() % 16):
        return "TMA needs 16-byte aligned rows (K % 16 == 0, N · out bytes % 16 == 0) and bases"
    if bias is not None and bias.stride(0) != 1:
        return "bias must be contiguous"
    return None


def matmul(a, b, out_dtype, bias=None, stages: int = STAGES):
    """c [M, N] = (a.data · sa) @ (b.data · sb) + bias, with b = w.t() of a [N, K] weight."""
    da, weight = a.data, b.data.t()
    m, k = da.shape
    n = weight.shape[0]
    sa, sb = a.scale, b.scale
    c = torch.empty((m, n), dtype=out_dtype, device=da.device)
    ints = (m, n, k, sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), int(bias is not None))
    bias = bias if bias is not None else _no_bias(da.device)
    # Triton specializes on the integers (= 1, % 16) and on 16-byte pointer alignment: a key with
    # the integers' values and every alignment is never coarser than its own.
    key = (da.device.index, ints, da.dtype, weight.dtype, out_dtype, bias.dtype, stages,
           sa.data_ptr() % 16 == 0, sb.data_ptr() % 16 == 0, bias.data_ptr() % 16 == 0)
    compiled = _compiled.get(key) if ENABLED else None
    descriptor = _descriptor if compiled is not None else TensorDescriptor
    a_desc = descriptor(da, [m, k], [da.stride(0), 1], [HALF, BLOCK_K], _layout(da.dtype, HALF, BLOCK_K))
    b_desc = descriptor(weight, [n, k], [weight.stride(0), 1], [BLOCK_N, BLOCK_K], _layout(weight.dtype, BLOCK_N,
                                                                                          BLOCK_K))
    c_desc = descriptor(c, [m, n], [c.stride(0), 1], [HALF, BLOCK_N], _layout(out_dtype, HALF, BLOCK_N))
    grid = (min(triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N), sm_count(da.device)), 1, 1)
    args = (a_desc, b_desc, c_desc, sa, sb, bias, *ints)
    if compiled is None:
        constexprs = dict(GROUP_M=GROUP_M, STAGES=stages, LIST_API=_list_api(), CONSUMER_REGS=CONSUMER_REGS,
                          PRODUCER_REGS=PRODUCER_REGS)
        compiled = _compiled[key] = (_block_scaled_mm_kernel[grid](*args, **constexprs, num_warps=4, maxnreg=168),
                                     tuple(constexprs.values()))
    else:  # the compiled kernel directly: Triton's binder costs tens of µs a call (launch.py)
        kernel, tail = compiled
        kernel[grid](*args, *tail, stream=raw_stream(da.device.index))
    last[:] = [id(da), grid, compiled, ints]
    return c


# The latest launch, for `bind`: id of a's data, grid, (kernel, constexprs), ints. No tensor: one kept
# alive from a CUDA-graph capture would break the capture's memory pool.
last: list = []


def bind(a, b, c, bias):
    """`(a, b, bias) -> c` for later calls of the shapes `matmul` just ran: the compiled kernel
    launched directly, the weight's descriptor kept while the weight's address is the same."""
    if not last or last[0] != id(a.data):
        return None
    _, (g0, g1, g2), (kernel, tail), ints = last
    no_bias = _no_bias(c.device)
    handles = bind_launch(kernel)
    if handles is None:
        return None
    launch, function, packed = handles
    m, n, k = ints[:3]
    out_dtype, device, index = c.dtype, c.device, c.device.index
    has_bias = bias is not None
    a_layout, b_layout, c_layout = (_layout(a.data.dtype, HALF, BLOCK_K), _layout(b.data.dtype, BLOCK_N, BLOCK_K),
                                    _layout(out_dtype, HALF, BLOCK_N))
    # The weight's address last seen, and its descriptor: a descriptor holds only the address, shape
    # and strides, and the plan's key fixed the last two, so any view of the same memory reuses it
    # (a compiled graph hands over a fresh view object on every call).
    weights = [None, None]
    stream = raw_stream

    def run(a, b, bias):
        da, sa, sb = a.data, a.scale, b.scale
        bias = bias if has_bias else no_bias
        at = b.data.data_ptr()
        pointers = da.data_ptr() | at | sa.data_ptr() | sb.data_ptr() | bias.data_ptr()
        if pointers & 15 or listening():
            return None
        if weights[0] != at:
            weight = b.data.t()
            weights[:] = [at, _descriptor(weight, [n, k], [weight.stride(0), 1], [BLOCK_N, BLOCK_K], b_layout)]
        out = torch.empty((m, n), dtype=out_dtype, device=device)
        launch(g0, g1, g2, stream(index), function, packed, None, None, None,
               _descriptor(da, [m, k], [da.stride(0), 1], [HALF, BLOCK_K], a_layout), weights[1],
               _descriptor(out, [m, n], [out.stride(0), 1], [HALF, BLOCK_N], c_layout), sa, sb, bias, *ints, *tail)
        return out

    return run


_compiled: dict[tuple, tuple] = {}
# Fields with defaults (padding, ...) as this Triton's TensorDescriptor has them.
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}


def _descriptor(base, shape, strides, block_shape, layout) -> TensorDescriptor:
    """A TensorDescriptor without `__post_init__`'s checks (~10 µs), for a call whose first
    instance of the same key passed them: only the base pointer can differ, and `why_not` checks
    its alignment."""
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESCRIPTOR_DEFAULTS, base=base, shape=shape, strides=strides, block_shape=block_shape,
                      layout=layout)
    return d
