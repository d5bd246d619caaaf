"""What a routing table entry is keyed by: a problem's (op, variant, N, K, M) and M's bucket.

The variant holds every field of a problem that can change which backend is fastest, except the
sizes (N and K match exactly, M by bucket) and the device (a table belongs to one environment).
"""

from __future__ import annotations

import math

from fp8dispatch.blocks import cdiv, granularity_of


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the shape bucket a routing decision covers."""
    return 1 << max(m - 1, 0).bit_length()


def _dtype(d) -> str:
    return "none" if d is None else str(d).removeprefix("torch.")


def _dims(block, rows: int, cols: int) -> str:
    """A block relative to its tensor: '*' where it spans the whole dimension (row, tensor)."""
    return "x".join("*" if b >= size else str(b) for b, size in zip(block, (rows, cols)))


def key_of(problem) -> tuple[str, str, int, int, int] | None:
    """(op, variant, N, K, M) of a problem; variant holds every field but the device and sizes.

    None for problems no table can describe (non-contiguous inputs, layouts bench never times).
    """
    op = problem.op
    if op == "matmul":
        p = problem
        if not (p.a_row_major and p.b_col_major):
            return None
        variant = (f"{p.recipe}:a{_dims(p.a_block, p.m, p.k)}:b{_dims(p.b_block, p.k, p.n)}:"
                   + _gemm_types(p.a_dtype, p.b_dtype, p.out_dtype, p.bias_dtype))
        return op, variant, p.n, p.k, p.m
    if op in ("quantize", "dequantize") and problem.contiguous:
        rows, cols = problem.shape
        gran = granularity_of(problem.block, problem.shape)
        if op == "quantize":
            flags = "".join(f"+{n}" for n, on in (("user_scale", problem.user_scale),
                                                  ("scale_ub", problem.scale_ub),
                                                  ("pow2", problem.pow2_scale)) if on)
            types = f"{_dtype(problem.in_dtype)}->{_dtype(problem.fp8_dtype)}{flags}"
        else:
            types = f"{_dtype(problem.fp8_dtype)}->{_dtype(problem.out_dtype)}"
        return op, f"{gran}:{_dims(problem.block, rows, cols)}:{types}", 0, cols, rows
    if op == "grouped_linear":
        return _grouped_key(problem)
    return None


def _grouped_key(p) -> tuple[str, str, int, int, int] | None:
    """A grouped problem's key: M is the rows per expert, G is not in it (docs/decisions.md).

    Masked, max_m; contiguous, the mean ceil(M / G), since the per-expert counts live on the device
    and routing never reads them. x's blocks are one row by contract (no block straddles two
    experts), so they are named against K alone: an expert of one row shares its longer peers' entries.
    """
    if not (p.x_row_major and p.w_contiguous):
        return None
    rows = p.m if p.layout == "masked" else cdiv(p.m, max(p.groups, 1))
    variant = (f"{p.recipe}:{p.layout}:x{_dims(p.x_block, math.inf, p.k)}:w{_dims(p.w_block, p.n, p.k)}:"
               + _gemm_types(p.x_dtype, p.w_dtype, p.out_dtype, p.bias_dtype))
    return p.op, variant, p.n, p.k, rows


def _gemm_types(a, b, out, bias) -> str:
    return f"{_dtype(a)}x{_dtype(b)}->{_dtype(out)}" + (f"+bias{_dtype(bias)}" if bias is not None else "")
