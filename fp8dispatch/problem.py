"""Frozen, hashable descriptions of a call: what a backend's `why_not` decides on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from fp8dispatch.blocks import Block, granularity_of, scale_shape


@cache
def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for any other device. Read once per device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def _dtype(d: torch.dtype | None) -> str:
    return "none" if d is None else str(d).removeprefix("torch.")


@dataclass(frozen=True)
class QuantizeProblem:
    device: torch.device
    capability: tuple[int, int] | None
    in_dtype: torch.dtype
    shape: tuple[int, int]  # the [rows, cols] view; leading dims are flattened into rows
    contiguous: bool
    block: Block
    fp8_dtype: torch.dtype
    user_scale: bool
    scale_ub: bool
    pow2_scale: bool
    op = "quantize"

    @property
    def granularity(self) -> str:
        return granularity_of(self.block, self.shape)

    def describe(self) -> str:
        extras = [n for n, on in (("user scale", self.user_scale), ("scale_ub", self.scale_ub),
                                  ("pow2 scales", self.pow2_scale)) if on]
        return (f"quantize(x: {_dtype(self.in_dtype)}{list(self.shape)} on {self.device}, "
                f"{self.granularity} blocks {self.block} -> {_dtype(self.fp8_dtype)}"
                + "".join(f", {e}" for e in extras) + ")")


@dataclass(frozen=True)
class DequantizeProblem:
    device: torch.device
    capability: tuple[int, int] | None
    fp8_dtype: torch.dtype
    shape: tuple[int, int]
    contiguous: bool
    block: Block
    out_dtype: torch.dtype
    op = "dequantize"

    @property
    def granularity(self) -> str:
        return granularity_of(self.block, self.shape)

    def describe(self) -> str:
        return (f"dequantize(t: {_dtype(self.fp8_dtype)}{list(self.shape)} on {self.device}, "
                f"{self.granularity} blocks {self.block} -> {_dtype(self.out_dtype)})")


@dataclass(frozen=True)
class MatmulProblem:
    """`a [M, K] @ b [K, N]`, both FP8; b is usually a transposed [N, K] weight (column-major)."""

    device: torch.device
    capability: tuple[int, int] | None
    recipe: str  # "block", "row", "tensor" or "mixed" (blocks that match no named recipe)
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    m: int
    n: int
    k: int
    a_block: Block
    b_block: Block
    a_row_major: bool  # a.data is contiguous [M, K]
    b_col_major: bool  # b.data.t() is contiguous: K is the fast dimension of both operands
    out_dtype: torch.dtype
    bias_dtype: torch.dtype | None
    op = "matmul"

    def describe(self) -> str:
        bias = f", bias {_dtype(self.bias_dtype)}" if self.bias_dtype is not None else ""
        return (f"matmul(a: {_dtype(self.a_dtype)}[{self.m}, {self.k}] blocks {self.a_block}, "
                f"b: {_dtype(self.b_dtype)}[{self.k}, {self.n}] blocks {self.b_block}"
                f"{'' if self.b_col_major else ' row-major'}, recipe {self.recipe} on {self.device} "
                f"-> {_dtype(self.out_dtype)}{bias})")


Problem = QuantizeProblem | DequantizeProblem | MatmulProblem

E4M3, BF16 = torch.float8_e4m3fn, torch.bfloat16
_FROM_DEVICE = object()  # the capability of the device itself (pass one to describe another GPU)


def quantize_problem(device: torch.device, shape: tuple[int, int], block: Block, *, in_dtype=BF16,
                     fp8_dtype=E4M3, contiguous=True, user_scale=False, scale_ub=False, pow2_scale=False,
                     capability=_FROM_DEVICE) -> QuantizeProblem:
    """The problem of quantizing a [rows, cols] view; the defaults are the common bf16 → e4m3fn call."""
    capability = device_capability(device) if capability is _FROM_DEVICE else capability
    return QuantizeProblem(device, capability, in_dtype, tuple(shape), contiguous, block, fp8_dtype,
                           user_scale, scale_ub, pow2_scale)


def dequantize_problem(device: torch.device, shape: tuple[int, int], block: Block, *, fp8_dtype=E4M3,
                       out_dtype=BF16, contiguous=True, capability=_FROM_DEVICE) -> DequantizeProblem:
    capability = device_capability(device) if capability is _FROM_DEVICE else capability
    return DequantizeProblem(device, capability, fp8_dtype, tuple(shape), contiguous, block, out_dtype)


def matmul_problem(device: torch.device, m: int, n: int, k: int, a_block: Block, b_block: Block, *,
                   a_dtype=E4M3, b_dtype=E4M3, out_dtype=BF16, bias_dtype=None, a_row_major=True,
                   b_col_major=True, capability=_FROM_DEVICE) -> MatmulProblem:
    """`a [M, K] @ b [K, N]` with these blocks; the recipe is named from them (`recipe_of`)."""
    capability = device_capability(device) if capability is _FROM_DEVICE else capability
    return MatmulProblem(device, capability, recipe_of(a_block, b_block, m, k, n), a_dtype, b_dtype, m, n, k,
                         a_block, b_block, a_row_major, b_col_major, out_dtype, bias_dtype)


def matmul_problem_of(a, b, out_dtype=BF16, bias=None) -> MatmulProblem:
    """The problem `matmul(a, b)` poses for two Fp8Tensors (b usually a transposed weight)."""
    (m, k), n = a.data.shape, b.data.shape[1]
    return matmul_problem(a.data.device, m, n, k, a.block, b.block, a_dtype=a.data.dtype, b_dtype=b.data.dtype,
                          out_dtype=out_dtype, bias_dtype=None if bias is None else bias.dtype,
                          a_row_major=a.data.is_contiguous(), b_col_major=b.data.t().is_contiguous())


def recipe_of(a_block: Block, b_block: Block, m: int, k: int, n: int) -> str:
    """Name the recipe of two operands by their scale shapes.

    tensor: one scale each. row: no scale varies along K (per-row a, per-column b, or either
    side tensorwise). block: a in 1×g groups and b blocked by g along K (DeepSeek when g = 128).
    Anything else is "mixed", which only backends that check the blocks themselves may take.
    """
    sa = scale_shape((m, k), a_block)
    sb = scale_shape((k, n), b_block)
    if sa == (1, 1) and sb == (1, 1):
        return "tensor"
    if sa[1] == 1 and sb[0] == 1:
        return "row"
    if a_block[0] == 1 and a_block[1] < k and b_block[0] == a_block[1]:
        return "block"
    return "mixed"
