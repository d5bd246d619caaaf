"""The matmul plan's runner: `matmul`'s choice for a problem (kernel, configuration, grid, launch
arguments), bound after its first call and launched directly from then on.

The first call of a plan runs `matmul.matmul`, which chooses, tunes and compiles; `_bind` then
keeps the compiled kernels' own launchers, and each later call allocates the output and passes raw
pointers and the current stream straight to them. The portable kernel's bound runner also offers
`direct()`: its launches on memory the caller owns, which a linear's plan uses to give the
activation quantize and the GEMM one allocation (fp8dispatch/direct.py).
"""

from __future__ import annotations

import torch

from fp8dispatch.direct import aligned

from .interpreter import active as interpreting
from .launch import Direct, listening, raw_stream
from . import matmul as portable
from .matmul import SMALL_M, _Plan, _sum_launcher, matmul


def kernel_for(problem) -> str:
    """Which kernel `matmul` runs for a problem, for `explain` (an unaligned call may still take
    the portable kernel instead of the Hopper one)."""
    if _hopper_serves(problem):
        return "hopper.py: warp-specialized Gluon block-scaled kernel (sm90, M > %d)" % SMALL_M
    if problem.m <= SMALL_M:
        return "matmul.py: portable scaled-mm kernel, operands swapped (M ≤ %d)" % SMALL_M
    return "matmul.py: portable scaled-mm kernel"


def _hopper_serves(p) -> bool:
    """`_hopper_kernel` decided from the problem alone (pointer alignment aside)."""
    if (interpreting() or p.m <= SMALL_M or portable._hopper_unavailable or p.capability != (9, 0)
            or portable._hopper_module() is None):
        return False
    return (p.a_block == (1, 128) and p.b_block == (128, 128) and p.a_row_major and p.b_col_major
            and p.a_dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and p.b_dtype in (torch.float8_e4m3fn,
                                                                                      torch.float8_e5m2)
            and p.k % 16 == 0 and (p.n * p.out_dtype.itemsize) % 16 == 0)


def plan(problem):
    """A runner for every call of `problem` whose shapes, strides, dtypes and bias the caller's key
    fixes: the first call chooses, tunes and compiles as `matmul` does; later calls allocate the
    output and launch the same compiled kernel directly."""
    kernel = kernel_for(problem)
    # Under torch.compile the portable kernel is a graph node (Inductor launches it); the Gluon
    # kernel and the interpreter are not traceable, so their calls stay opaque (fp8dispatch/ops.py).
    traced = None if interpreting() or _hopper_serves(problem) else matmul
    if problem.device.type != "cuda":
        def run(a, b, out_dtype, bias=None):
            return matmul(a, b, out_dtype, bias)
        run.kernel, run.traced = kernel, traced
        return run
    bound = None

    def run(a, b, out_dtype, bias=None):
        nonlocal bound
        if bound:
            try:
                out = bound(a, b, bias)
            except TypeError:  # this Triton's launcher takes its arguments otherwise: never again
                bound = False
            else:
                if out is not None:
                    return out
        out = matmul(a, b, out_dtype, bias)
        if bound is None:
            bound = _bind(a, b, out, bias)
        return out

    run.kernel, run.traced = kernel, traced
    if traced is not None:  # the portable kernel: once bound, its launches on raw pointers
        run.direct = lambda: getattr(bound, "direct", None) if bound else None
    return run


def _bind(a, b, c, bias):
    """`(a, b, bias) -> c` launching the kernels `matmul` just ran for these operands, or None."""
    da, db, sa, sb = a.data, b.data, a.scale, b.scale
    key = (da.shape, db.shape, da.stride(), db.stride(), sa.stride(), sb.stride(), a.block, b.block,
           da.dtype, db.dtype, c.dtype, bias is None, da.device)
    chosen = portable._plans.get(key)
    if chosen is None:
        return None
    if not isinstance(chosen, _Plan):
        return portable._hopper_module().bind(a, b, c, bias)
    found = chosen.launcher.bound(da)
    split = chosen.split
    summed = _sum_launcher.bound(c) if split > 1 else None
    if found is None or (split > 1 and summed is None):
        return None
    (g0, g1, g2), launch, function, packed, args, tail = found
    ints, has_bias = args[6:], bias is not None
    shape, out_dtype, device, index = tuple(c.shape), c.dtype, da.device, da.device.index
    stream = raw_stream
    out_bytes = c.nbytes
    sizes = (out_bytes,) if split == 1 else (out_bytes, split * c.numel() * 4)
    if split > 1:
        (s0, s1, s2), sum_launch, sum_function, sum_packed, sum_args, sum_tail = summed
        sum_ints = sum_args[3:]

    def launch_into(pa, pb, psa, psb, pbias, pout, pparts=0):  # a bias pointer only where the plan has a bias
        if split == 1:
            launch(g0, g1, g2, stream(index), function, packed, None, None, None, pa, pb, pout, psa, psb,
                   pbias if has_bias else psa, *ints, *tail)
            return
        s = stream(index)
        launch(g0, g1, g2, s, function, packed, None, None, None, pa, pb, pparts, psa, psb, psa, *ints, *tail)
        sum_launch(s0, s1, s2, s, sum_function, sum_packed, None, None, None, pout, pparts,
                   pbias if has_bias else pparts, *sum_ints, *sum_tail)

    at_parts = aligned(out_bytes)  # a split's partial sums, behind the output in the same allocation
    elements = -(-(at_parts + sizes[-1]) // out_dtype.itemsize)

    def run(a, b, bias):
        pa, pb, psa, psb = a.data.data_ptr(), b.data.data_ptr(), a.scale.data_ptr(), b.scale.data_ptr()
        pbias = bias.data_ptr() if has_bias else psa
        if (pa | pb | psa | psb | pbias) & 15 or listening():
            return None
        if split == 1:
            out = torch.empty(shape, dtype=out_dtype, device=device)
            launch(g0, g1, g2, stream(index), function, packed, None, None, None, pa, pb, out.data_ptr(), psa, psb,
                   pbias, *ints, *tail)
            return out
        out = torch.empty(elements, dtype=out_dtype, device=device)
        base = out.data_ptr()
        launch_into(pa, pb, psa, psb, pbias, base, base + at_parts)
        return out.resize_(shape)

    run.direct = Direct(launch_into, sizes)
    return run
