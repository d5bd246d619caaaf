"""Grouped block-scaled matmul on Hopper: `hopper.py`'s warp-specialized kernel over experts (sm90 only).

The math and the roles are `hopper.py`'s. For expert g, `out[rows of g] = x_g @ w[g].T` with the
block recipe's scales: a producer warp issues the TMA loads of each K step (two 64-row halves of x
and a 128×128 tile of w[g]) into a ring of shared-memory stages; two consumer warpgroups each own
64 rows of the 128×128 output tile, run one wgmma per step and promote its fp32 partial,

    acc += partial * (sx[row, k] * sw[g, n // 128, k])

while the other warpgroup's MMA runs, so the tensor cores do not wait for the promotion.

The schedule is `grouped.py`'s. A work item is one (expert, row tile, column tile), dealt out to
the persistent programs with a stride of the grid. Every partition walks the experts in the same
order, reading their row counts from `bounds` on the device, so the producer and both consumers
agree on the sequence of items (and on how many K steps each has: none for a masked tile past
`masked_m[g]`, which stores zeros) without talking to each other, and the host never reads a count.

The memory layout. x is the 2-D `[rows, K]` view (contiguous: expert g owns rows `offsets[g] ..
offsets[g+1]`; masked: slots `g * max_m ..`, the first `masked_m[g]` of them valid), read through
one TMA descriptor: a row tile that runs past its expert reads the next expert's rows (zeros past
the tensor's end), which are never stored. w is read as `[G * N, K]` the same way: a column tile
past N reads the next expert's weights, masked on store. A 64-row output half whose rows all
belong to the expert leaves by a TMA store (clipped at N); one where the expert ends is stored
from registers with a row mask, since a TMA box clips only at the tensor's edge and would
overwrite the next expert's first rows.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fp8dispatch.blocks import cdiv

from .hopper import (_OCP_FP8, BLOCK_K, BLOCK_M, BLOCK_N, CONSUMER_REGS, CONSUMER_WARPS, GROUP_M, HALF, _layout,
                     _list_api, _no_bias, grouped_tile, load_step, scaled_tile, shared_memory, store_tile)
from .tiles import sm_count

# Per output element size: stages of 32 KB of operands beside two 64×128 output tiles (32 KB in
# 16 bits, 64 KB in fp32) within the 227 KB of shared memory.
STAGES = {2: 5, 4: 4}
# The producer walks the experts too: a few scalars more than hopper.py's producer, whose 24
# registers are setmaxnreg's floor. 2 × 128 × 232 + 128 × 40 registers still fit the SM's 64K.
PRODUCER_REGS = 40


@gluon.jit
def _expert(bounds_ptr, g, G, ROWS, end, MASKED: gl.constexpr):
    """(first row, valid rows, rows held) of expert g. Masked: slot g of ROWS rows, of which
    masked_m[g] (clamped to 0..ROWS) are valid. Contiguous: rows offsets[g] .. offsets[g+1], clamped
    into [end, ROWS] (end: where expert g - 1 ended), the first starting at 0 and the last ending at
    ROWS (grouped.safe_offsets's rule), so whatever offsets hold (on a GPU the host never reads
    them) every row stays in bounds and none is written twice."""
    if MASKED:
        start = g * ROWS
        valid = gl.minimum(gl.maximum(gl.load(bounds_ptr + g).to(gl.int32), 0), ROWS)
        held = valid * 0 + ROWS
    else:
        start = gl.minimum(gl.maximum(gl.load(bounds_ptr + g).to(gl.int32), end), ROWS) * (g > 0).to(gl.int32)
        stop = gl.minimum(gl.maximum(gl.load(bounds_ptr + g + 1).to(gl.int32), start), ROWS)
        stop = stop + (ROWS - stop) * (g == G - 1).to(gl.int32)
        valid = stop - start
        held = valid
    return start, valid, held


@gluon.jit
def _producer(x_desc, w_desc, x_top, x_bottom, w_smem, ready, empty, bounds_ptr, G, ROWS, N, K,
              MASKED: gl.constexpr, GROUP_M: gl.constexpr):
    HALF: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    tiles_n = gl.cdiv(N, BN)
    steps = gl.cdiv(K, BK)
    tile = gl.program_id(0)
    first = tile * 0  # the index of expert g's first work item
    end = tile * 0  # where the last expert's rows ended
    i = tile * 0  # steps issued so far: the position in the ring
    for g in range(G):
        start, valid, held = _expert(bounds_ptr, g, G, ROWS, end, MASKED)
        end = start + valid
        tiles_m = gl.cdiv(held, 2 * HALF)
        items = tiles_m * tiles_n
        while tile < first + items:
            pid_m, pid_n = grouped_tile(tile - first, tiles_m, tiles_n, GROUP_M)
            k_steps = steps * (pid_m * 2 * HALF < valid).to(gl.int32)  # as the consumers count them
            for k in range(k_steps):
                load_step(x_desc, w_desc, x_top, x_bottom, w_smem, ready, empty, i, start + pid_m * 2 * HALF,
                          g * N + pid_n * BN, k * BK)
                i += 1
            tile += gl.num_programs(0)
        first += items


@gluon.jit
def _consumer(x_half, w_smem, ready, empty, c_desc, c_smem, out_ptr, sx_ptr, sw_ptr, bias_ptr, bounds_ptr, G, ROWS,
              N, K,
              half,  # 0: the tile's top 64 rows, 1: the bottom ones
              stride_om, stride_sxm, stride_sxk, stride_swg, stride_swn, stride_swk, stride_bg, has_bias,
              MASKED: gl.constexpr, GROUP_M: gl.constexpr):
    BM: gl.constexpr = x_half.type.shape[1]
    BN: gl.constexpr = w_smem.type.shape[1]
    BK: gl.constexpr = w_smem.type.shape[2]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                  instr_shape=[16, BN, 256 // x_half.dtype.primitive_bitwidth])
    tiles_n = gl.cdiv(N, BN)
    steps = gl.cdiv(K, BK)
    zero = gl.zeros((BM, BN), gl.float32, layout=mma)
    tile = gl.program_id(0)
    first = tile * 0
    end = tile * 0
    i = tile * 0
    # Expert g's weight scales and bias, advanced once per expert (64-bit pointer arithmetic).
    sw_g, bias_g = sw_ptr, bias_ptr
    for g in range(G):
        start, valid, held = _expert(bounds_ptr, g, G, ROWS, end, MASKED)
        end = start + valid
        tiles_m = gl.cdiv(held, 2 * BM)
        items = tiles_m * tiles_n
        while tile < first + items:
            pid_m, pid_n = grouped_tile(tile - first, tiles_m, tiles_n, GROUP_M)
            local = pid_m * 2 * BM + half * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))  # rows in g
            cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            # Rows past the expert's valid ones read its last valid row's scale (never stored).
            sx_ptrs = sx_ptr + (start + gl.minimum(local, gl.maximum(valid - 1, 0))) * stride_sxm
            k_steps = steps * (pid_m * 2 * BM < valid).to(gl.int32)
            acc, i = scaled_tile(zero, x_half, w_smem, ready, empty, i, k_steps, sx_ptrs, stride_sxk,
                                 sw_g + pid_n * stride_swn, stride_swk)
            if has_bias != 0:
                acc += gl.expand_dims(gl.load(bias_g + cols, mask=cols < N, other=0.0).to(gl.float32), 0)
            first_row = pid_m * 2 * BM + half * BM
            if first_row + BM <= valid:
                store_tile(c_desc, c_smem, acc, start + first_row, pid_n * BN)  # every row the expert's
            else:  # the expert ends in this tile: rows past it belong to the next expert, or are padding
                acc = gl.where(gl.expand_dims(local < valid, 1), acc, 0.0)  # masked: rows past masked_m[g] are 0
                out_ptrs = out_ptr + gl.expand_dims(start + local, 1) * stride_om + gl.expand_dims(cols, 0)
                mask = gl.expand_dims(local < held, 1) & gl.expand_dims(cols < N, 0)
                gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tile += gl.num_programs(0)
        first += items
        sw_g += stride_swg
        bias_g += stride_bg
    tma.store_wait(pendings=0)


@gluon.jit
def _grouped_block_kernel(
    x_desc, w_desc, c_desc,  # TMA: x [rows, K] in 64×128 boxes, w [G * N, K] in 128×128, out [rows, N] in 64×128
    out_ptr, sx_ptr, sw_ptr, bias_ptr,
    bounds_ptr,  # masked: masked_m [G]; contiguous: offsets [G + 1]
    G, ROWS,  # ROWS: masked, the rows of each expert's slot (max_m); contiguous, all rows (M)
    N, K,
    stride_om, stride_sxm, stride_sxk, stride_swg, stride_swn, stride_swk, stride_bg,
    has_bias,  # a runtime flag, as in hopper.py (Triton 3.6 failed to lower a constexpr False there)
    MASKED: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
    LIST_API: gl.constexpr,  # gl.warp_specialize takes a list of (function, args) (newer Triton)
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    x_top, x_bottom, w_smem, c_top, c_bottom, ready, empty = shared_memory(x_desc, w_desc, c_desc, STAGES)
    top = (x_top, w_smem, ready, empty, c_desc, c_top, out_ptr, sx_ptr, sw_ptr, bias_ptr, bounds_ptr, G, ROWS, N,
           K, 0, stride_om, stride_sxm, stride_sxk, stride_swg, stride_swn, stride_swk, stride_bg, has_bias, MASKED,
           GROUP_M)
    bottom = (x_bottom, w_smem, ready, empty, c_desc, c_bottom, out_ptr, sx_ptr, sw_ptr, bias_ptr, bounds_ptr, G, ROWS,
              N, K, 1, stride_om, stride_sxm, stride_sxk, stride_swg, stride_swn, stride_swk, stride_bg, has_bias,
              MASKED, GROUP_M)
    producer = (x_desc, w_desc, x_top, x_bottom, w_smem, ready, empty, bounds_ptr, G, ROWS, N, K, MASKED, GROUP_M)
    if LIST_API:
        gl.warp_specialize([(_consumer, top), (_consumer, bottom), (_producer, producer)], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize(top, _consumer, (bottom, producer), [_consumer, _producer], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])


def why_not(x, w, out_dtype, bias) -> str | None:
    """Why this kernel cannot take the call (grouped.py's portable kernel then does), or None."""
    xd, wd = x.data, w.data
    if x.block != (1, BLOCK_K) or w.block != (BLOCK_N, BLOCK_K):
        return f"blocks {x.block} · {w.block}: the kernel is the 1×128 · 128×128 recipe"
    if xd.dtype not in _OCP_FP8 or wd.dtype not in _OCP_FP8:
        return f"operands {xd.dtype} · {wd.dtype}: wgmma takes OCP FP8"
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"out_dtype {out_dtype}"
    if xd.stride(-1) != 1 or not wd.is_contiguous():
        return "TMA needs a row-major x and a contiguous [G, N, K] w"
    if (wd.shape[-1] % 16 or xd.stride(-2) % 16 or (wd.shape[1] * out_dtype.itemsize) % 16 or xd.data_ptr() % 16
            or wd.data_ptr() % 16):
        return "TMA needs 16-byte aligned rows (K % 16 == 0, N · out bytes % 16 == 0) and bases"
    if bias is not None and bias.stride(-1) != 1:
        return "bias must be contiguous"
    return None


def grouped_linear(x, w, offsets, masked_m, out_dtype, bias=None, stages: int | None = None):
    """out [M, N] (contiguous) or [G, max_m, N] (masked) of the block recipe; x: Fp8Tensor
    `[M, K]` or `[G, max_m, K]` (scale over the 2-D view), w: GroupedFp8Tensor, bias [G, N] or None."""
    groups, n, k = w.data.shape
    masked = offsets is None
    xd = x.data.reshape(-1, k)
    rows = x.data.shape[1] if masked else xd.shape[0]
    device = xd.device
    out = torch.empty((*x.data.shape[:-1], n), dtype=out_dtype, device=device)
    out2d = out.view(-1, n)
    weights = w.data.view(groups * n, k)
    x_desc = TensorDescriptor(xd, list(xd.shape), [xd.stride(0), 1], [HALF, BLOCK_K], _layout(xd.dtype, HALF, BLOCK_K))
    w_desc = TensorDescriptor(weights, [groups * n, k], [k, 1], [BLOCK_N, BLOCK_K],
                              _layout(weights.dtype, BLOCK_N, BLOCK_K))
    c_desc = TensorDescriptor(out2d, list(out2d.shape), [n, 1], [HALF, BLOCK_N], _layout(out_dtype, HALF, BLOCK_N))
    tiles_n = cdiv(n, BLOCK_N)
    items = groups * cdiv(rows, BLOCK_M) * tiles_n if masked else (cdiv(rows, BLOCK_M) + groups) * tiles_n
    sx, sw = x.scale, w.scale
    bias_arg = bias.contiguous() if bias is not None else _no_bias(device)
    _grouped_block_kernel[(max(1, min(items, sm_count(device))), )](
        x_desc, w_desc, c_desc, out2d, sx, sw, bias_arg, masked_m if masked else offsets,
        groups, rows, n, k,
        out2d.stride(0), sx.stride(0), sx.stride(1), sw.stride(0), sw.stride(1), sw.stride(2),
        n if bias is not None else 0, int(bias is not None),
        MASKED=masked, GROUP_M=GROUP_M, STAGES=stages or STAGES[out_dtype.itemsize], LIST_API=_list_api(),
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=168,
    )
    return out
