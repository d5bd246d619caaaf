"""The reference backend: the contract in plain torch and fp32, on any device. The ground truth."""

from __future__ import annotations

import torch

from fp8dispatch.blocks import blockwise_amax, expand_scale
from fp8dispatch.formats import fp8_format
from fp8dispatch.registry import Backend
from fp8dispatch.scaling import saturating_cast, scale_from_amax


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


def why_not(op, problem, found=None):
    return []  # every op, format, block and device torch can hold


BACKEND = Backend(
    name="reference",
    probe=lambda: None,
    why_not=why_not,
    quantize=quantize,
    dequantize=dequantize,
    matmul=matmul,
    priority=0,
    # Under torch.compile its quantize and dequantize compile to the same bits; its matmul would not
    # (Inductor folds the bias add into addmm, which sums in another order), so it stays opaque.
    traceable=frozenset({"quantize", "dequantize"}),
    version=lambda: torch.__version__,
    description="pure torch, fp32 math; the ground truth every backend is held to",
)
