"""The static order: which built-in backend `auto` tries first where no measured table speaks.

A measured routing table (`fp8dispatch tune`, or the one shipped for this GPU) matches (N, K)
exactly, so every other shape, every GPU of an architecture never measured, and
`FP8DISPATCH_TUNING=off` route by this order. Per op and recipe (matmul) or granularity
(quantize, dequantize), the backends by one rule: the highest geometric mean of fastest/backend
over the newest measured grid, backends measured at fewer than half of its points last. Newest:
the NVIDIA H200 table (fp8dispatch/tuned/h200.json, 2026-12-03); `python
benchmarks/static_order.py fp8dispatch/tuned/h200.json` prints the order and the figures below.

A backend that cannot run a problem is skipped (its `why_not`), so the order only needs to rank
the backends that compete there. Backends not listed (the reference, anything registered by a
user) come after the listed ones, by their own `Backend.priority`.
"""

from __future__ import annotations

# (op, recipe or granularity; None for every one) -> backend names, first tried first.
ORDER: dict[tuple[str, str | None], tuple[str, ...]] = {
    # triton 0.916x mean (worst 0.67x), torch 0.910x (0.50x), fbgemm 0.728x; torchao measured at 21 of
    # 53 points (M 16-512): 0.872x there, the fastest at 7
    ("matmul", "block"): ("triton", "torch", "fbgemm", "torchao"),
    # fbgemm 0.940x (worst 0.66x), torch 0.838x (0.49x), triton 0.835x (0.53x)
    ("matmul", "row"): ("fbgemm", "torch", "triton"),
    # torch 0.996x (worst 0.95x), triton 0.819x, fbgemm 0.665x
    ("matmul", "tensor"): ("torch", "triton", "fbgemm"),
    ("matmul", "mixed"): ("fbgemm",),  # 128x128 activations: the only library kernel for it
    # The only quantizer that follows the contract bit for bit on a GPU (docs/backends.md).
    ("quantize", None): ("triton",),
    # The grouped grid (16 points per recipe, docs/results/h200/grouped.md). Block: triton (its
    # Hopper kernel) the fastest at all 16; fbgemm 0.41-0.89x under graph replay; torch takes no
    # 1x128 blocks.
    ("grouped_linear", "block"): ("triton", "fbgemm"),
    # fbgemm 0.921x mean (worst 0.78x), torch 0.901x (0.75x), triton 0.704x (0.50x)
    ("grouped_linear", "row"): ("fbgemm", "torch", "triton"),
    # Not in the grid; on the H100 fbgemm and torchao were bit-identical, fbgemm 3x faster on blocks.
    ("dequantize", None): ("fbgemm", "torchao", "triton"),
}
# The priority of the first listed backend, each next one STEP lower: the scale a user's own
# backend is given on (`Backend.priority`; the reference has 0).
TOP, STEP = 100, 10


def priority(backend: str, op: str, detail: str | None) -> int | None:
    """The static priority of a listed backend for this op and recipe/granularity, else None."""
    names = ORDER.get((op, detail)) or ORDER.get((op, None), ())
    return TOP - STEP * names.index(backend) if backend in names else None


def best_place(backend: str) -> int:
    """A backend's best place in any order (len(ORDER) if unlisted): how listings sort backends."""
    return min((names.index(backend) for names in ORDER.values() if backend in names), default=len(ORDER))
