"""The static order: which built-in backend `auto` tries first where no measured table speaks.

A measured routing table (`fp8dispatch tune`, or the one shipped for this GPU) matches (N, K)
exactly, so every other shape, every GPU of an architecture never measured, and
`FP8DISPATCH_TUNING=off` route by this order. Per op and recipe (matmul) or granularity
(quantize, dequantize), the backends fastest first by one rule: the smallest worst-case slowdown
against the fastest backend over the newest measured grid. `python benchmarks/static_order.py
fp8dispatch/tuned/<gpu>.json` prints the order a table implies; docs/routing.md has the figures.

A backend that cannot run a problem is skipped (its `why_not`), so the order only needs to rank
the backends that compete there. Backends not listed (the reference, anything registered by a
user) come after the listed ones, by their own `Backend.priority`.
"""

from __future__ import annotations

# (op, recipe or granularity; None for every one) -> backend names, first tried first.
ORDER: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("matmul", "block"): ("triton", "torch", "fbgemm", "torchao"),
    ("matmul", "row"): ("fbgemm", "torch", "triton"),
    ("matmul", "tensor"): ("torch", "fbgemm", "triton"),
    ("matmul", "mixed"): ("fbgemm",),
    # The only quantizer that follows the contract bit for bit on a GPU (docs/backends.md).
    ("quantize", None): ("triton",),
    # fbgemm and torchao are bit-identical to the reference; fbgemm 3x faster on blocks.
    ("dequantize", None): ("fbgemm", "torchao", "triton"),
}
# The priority of the first listed backend; each next one is STEP lower (the reference has 0).
# user is likely to give a backend of their own (the reference has 0), so the order holds.
TOP, STEP = 100, 10


def priority(backend: str, op: str, detail: str | None) -> int | None:
    """The static priority of a listed backend for this op and recipe/granularity, else None."""
    names = ORDER.get((op, detail)) or ORDER.get((op, None), ())
    return TOP - STEP * names.index(backend) if backend in names else None
