"""The reference backend: the contract in plain torch and fp32, on any device. The ground truth."""

from __future__ import annotations

import torch

from fp8dispatch.blocks import blockwise_amax, expand_scale
from fp8dispatch.formats import fp8_format
from fp8dispatch.grouped import safe_offsets
from fp8dispatch.registry import Backend
from fp8dispatch.scaling import saturating_cast, scale_from_amax
from fp8dispatch.tensor import Fp8Tensor


def quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    fmt = fp8_format(dtype)
    x = x.float()
    if scale is None:
        scale = scale_from_amax(blockwise_amax(x, block), fmt, scale_ub, pow2_scale)
    data = saturating_cast(x / expand_scale(scale, block, tuple(x.shape)), fmt)
    return data, scale


def dequantize(data, scale, block, out_dtype):
    return (data.float() * expand_scale(scale, block, tuple(data.shape))).to(out_dtype)


def matmul(a, b, out_dtype, bias=None):
    """The fp32 product of the dequantized operands; equal to applying the scales per K block."""
    out = dequantize(*a, torch.float32) @ dequantize(*b, torch.float32)
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def grouped_linear(x, w, offsets, masked_m, out_dtype, bias=None):
    """Expert by expert, each the reference matmul of its rows; rows past masked_m stay zero."""
    groups, n, _ = w.data.shape
    if offsets is not None:
        bounds = safe_offsets(offsets, x.data.shape[0]).tolist()
        out = torch.empty((x.data.shape[0], n), dtype=out_dtype, device=x.data.device)
        spans = [(out, bounds[g], bounds[g + 1]) for g in range(groups)]
        rows_of = [(x.data, x.scale)] * groups
    else:
        max_m = x.data.shape[1]
        out = torch.zeros((groups, max_m, n), dtype=out_dtype, device=x.data.device)
        counts = masked_m.clamp(0, max_m).tolist()
        spans = [(out[g], 0, counts[g]) for g in range(groups)]
        scale = x.scale.view(groups, max_m, -1)
        rows_of = [(x.data[g], scale[g]) for g in range(groups)]
    for g, ((target, start, stop), (data, scale)) in enumerate(zip(spans, rows_of)):
        if stop > start:
            rows = Fp8Tensor(data[start:stop], scale[start:stop], x.block)
            target[start:stop] = matmul(rows, w.expert(g).t(), out_dtype, None if bias is None else bias[g])
    return out


def why_not(op, problem, found=None):
    return []  # every op, format, block and device torch can hold


BACKEND = Backend(
    name="reference",
    probe=lambda: None,
    why_not=why_not,
    quantize=quantize,
    dequantize=dequantize,
    matmul=matmul,
    grouped_linear=grouped_linear,
    priority=0,
    # Under torch.compile its quantize and dequantize compile to the same bits; its matmul would not
    # (Inductor folds the bias add into addmm, which sums in another order), so it stays opaque.
    traceable=frozenset({"quantize", "dequantize"}),
    version=lambda: torch.__version__,
    description="pure torch, fp32 math; the ground truth every backend is held to",
)
