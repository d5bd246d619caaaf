"""The contract's numerics in one place: how far a matmul may stray, how that is measured, the
inputs that find the hard cases, and the poison that shows an output element nobody wrote.

Conformance, `fp8dispatch bench`, the demo, the benchmarks and the tests all read these; none
keeps a copy.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# DESIGN.md's matmul bound on `relative_error` against the fp32 product of the dequantized inputs.
ERROR_BOUND = 1e-3


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """DeepGEMM's `calc_diff`, 1 - 2Σxy/Σ(x²+y²), in float64: 0 for identical tensors, scale-free.

    A NaN or ±inf in either tensor gives inf (the measure is meaningless there, and inf fails every
    bound); two all-zero tensors give 0. Callers that expect non-finite values at known positions
    compare those positions first, as conformance does.
    """
    x, y = out.double(), ref.double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.inf
    denominator = (x * x + y * y).sum()
    return abs(float(1 - 2 * (x * y).sum() / denominator)) if denominator > 0 else 0.0


# Values a quantizer gets wrong first: zero, ±e4m3fn max, e5m2 max, above every max, near fp32 max,
# fp8 subnormals and their midpoint, NaN, ±inf, fp32 denormals, small values, exact ties.
SPECIAL_VALUES = (0.0, 448.0, -448.0, 57344.0, 1e6, -3e38, 2.0**-9, 2.0**-10, 1.5 * 2.0**-9,
                  float("nan"), float("inf"), float("-inf"), 1e-40, 17.0, 18.0, 0.3)


def special_values(rows: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Random values over 8 decades with `SPECIAL_VALUES` planted and an all-zero corner
    (whole zero groups, so a zero block's scale of 1 is exercised); the same on every device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 4, cols)
    specials = torch.tensor(SPECIAL_VALUES)
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[: min(flat.numel() // 3, 3 * specials.numel())]
    flat[picks] = specials.repeat(3)[: picks.numel()]
    x[: max(1, rows // 3), : min(cols, 64)] = 0.0
    return x.to(dtype).to(device)


def fill_freed_memory(nbytes: list[int], byte: int, device: torch.device) -> None:
    """Fill freed memory of these sizes with `byte`: on CUDA the caching allocator hands it back for
    the next outputs of those sizes, so an element a kernel never writes keeps the poison."""
    junk = [torch.full((max(n, 1),), byte, dtype=torch.uint8, device=device) for n in nbytes]
    del junk


# torch's uninitialised constructors, as the dispatcher sees them.
_UNINITIALISED = (
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
)


class _Poisoning(TorchDispatchMode):
    """Fills every uninitialised tensor with `byte` as the dispatcher creates it. A dispatch mode,
    not a patched `torch.empty`: torch.compile traces the torch functions a backend calls, and a
    patched one would be traced too (and fail), while the mode sees eager ops only and never
    changes what is compiled."""

    def __init__(self, byte: int):
        super().__init__()
        self.byte = byte

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _UNINITIALISED and isinstance(out, torch.Tensor) and out.numel():
            out.untyped_storage().fill_(self.byte)
        return out


@contextmanager
def poisoned_allocations(byte: int):
    """Within the block, torch's uninitialised tensor constructors fill their memory with `byte`.

    This also covers the CPU and buffers a backend allocates before its output. 0xFF is NaN in
    fp32, bf16, fp16, e4m3fn and e5m2; 0x00 is a plausible value, so two runs, one with each, also
    disagree on an unwritten element.
    """
    with _Poisoning(byte):
        yield
