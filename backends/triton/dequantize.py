"""Dequantize kernel: `data * scale` in fp32, broadcast by blocks, cast to bf16/fp16/fp32.

One program per [BLOCK_R, BLOCK_C] tile of data [R, C]; element (r, c) takes the scale of block
(r // br, c // bc). The scale gathers hit L1 (one scale covers a whole block of the tile), so the
kernel moves 1 byte in and 2 or 4 bytes out per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8dispatch.blocks import cdiv

from .launch import Launcher
from .tiles import TILE, next_pow2, num_warps_for



@triton.jit
def _dequantize_kernel(
    q_ptr, s_ptr, out_ptr,
    R, C,
    stride_qr, stride_qc,
    stride_sr, stride_sc,
    br, bc,  # the block; a tensorwise scale has br >= R and bc >= C, so every index is 0
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qr + cols[None, :] * stride_qc, mask=mask, other=0.0)
    s_ptrs = s_ptr + (rows // br)[:, None] * stride_sr + (cols // bc)[None, :] * stride_sc
    scale = tl.load(s_ptrs, mask=mask, other=1.0)
    out = q.to(tl.float32) * scale
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


_dequantize = Launcher(_dequantize_kernel, tensors=3)


def dequantize(data, scale, block, out_dtype):
    rows, cols = data.shape
    out = torch.empty((rows, cols), dtype=out_dtype, device=data.device)
    tile = TILE()
    block_c = min(next_pow2(cols), 1024)
    block_r = min(next_pow2(rows), max(1, tile // block_c))
    _dequantize(
        (cdiv(rows, block_r), cdiv(cols, block_c)),
        (data, scale, out, rows, cols, data.stride(0), data.stride(1), scale.stride(0), scale.stride(1),
         block[0], block[1]),
        dict(BLOCK_R=block_r, BLOCK_C=block_c),
        dict(num_warps=num_warps_for(block_r * block_c)),
    )
    return out
