"""One allocation for the two launches of `linear(x, w)`.

A linear on a high-precision x runs two kernels: the activation quantize writes x's FP8 data and
its scales, the GEMM reads them and writes the output. Allocated apart, that is three
`torch.empty` calls, about 8 µs of host time each on an H200's host (as much as the two launches
together, docs/results/h200/host-layers.md), where `F.linear` makes one.

When both steps' runners can launch on raw pointers (their `direct()`: the triton backend's bound
kernels, at decode sizes), the runner here makes one allocation laid out as

    [ output (M×N) | x's FP8 data (M×K) | x's scales (M×K/g fp32) | the GEMM's scratch, if any ]

each part 16-byte aligned, launches both kernels into it and `resize_`s the tensor down to the
output's shape. The output is then an ordinary tensor, not a view (autograd and in-place ops treat
it as any other), whose storage keeps M·K·(1 + 4/g) bytes more until it is freed: about 15 KB a
token at K = 7168, so this is only offered where M is small (the GEMM runner decides; the triton
backend's swapped kernel, M ≤ 64).
"""

from __future__ import annotations

from typing import Callable

import torch

_ALIGN = 256  # the caching allocator's own granularity; more than the kernels' 16 bytes


def aligned(n: int) -> int:
    """`n` bytes rounded up to where the next part of a shared allocation starts."""
    return -(-n // _ALIGN) * _ALIGN


def linear_runner(quantize_step, mm, out_shape: tuple, out_dtype: torch.dtype, fallback: Callable) -> Callable:
    """`(x, w, bias) -> out`: `fallback` (the two steps, each allocating) until both steps are bound
    to their kernels, then one allocation and two direct launches while those launches can serve
    (aligned pointers, no launch hook listening)."""
    bound = None

    def linear(x, w, bias):
        nonlocal bound
        if bound:
            out = bound(x, w, bias)
            if out is not None:
                return out
        out = fallback(x, w, bias)
        if bound is None:
            bound = _bind(quantize_step, mm, out_shape, out_dtype, out.device) or False
        return out

    return linear


def _bind(quantize_step, mm, out_shape, out_dtype, device) -> Callable | None:
    quantize = getattr(quantize_step, "direct", None)
    gemm = getattr(mm, "direct", None)
    quantize, gemm = quantize and quantize(), gemm and gemm()
    if quantize is None or gemm is None:
        return None
    data_bytes, scale_bytes = quantize.sizes
    out_bytes, *scratch = gemm.sizes
    at_data = aligned(out_bytes)
    at_scale = at_data + aligned(data_bytes)
    at_scratch = at_scale + aligned(scale_bytes)
    total = at_scratch + (scratch[0] if scratch else 0)
    elements = -(-total // out_dtype.itemsize)
    quantize_into, gemm_into, listening = quantize.launch, gemm.launch, quantize.listening
    extra = (at_scratch,) if scratch else ()

    def run(x, w, bias):
        px, pw, pws = x.data_ptr(), w.data.data_ptr(), w.scale.data_ptr()
        pbias = bias.data_ptr() if bias is not None else 0
        if (px | pw | pws | pbias) & 15 or listening():
            return None
        out = torch.empty(elements, dtype=out_dtype, device=device)
        base = out.data_ptr()
        quantize_into(px, base + at_data, base + at_scale)
        gemm_into(base + at_data, pw, base + at_scale, pws, pbias, base, *(base + e for e in extra))
        return out.resize_(out_shape)

    return run
