"""Grouped (mixture-of-experts) FP8 weights: `GroupedFp8Tensor`, its quantizer, and the problem.

A grouped weight is G experts' `[N, K]` matrices stacked as `[G, N, K]`, each expert blocked on
its own: scales are `[G, ceil(N / bn), ceil(K / bk)]`, so no block straddles two experts, whatever
N is. The recipes are matmul's, per expert: `block` (128×128 weight blocks, activations in 1×128
groups; DeepSeek-V3), `row` (per output channel, activations per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8dispatch.blocks import Block, cdiv, expand_scale
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import HIGH_PRECISION
from fp8dispatch.tensor import DataView, Fp8Tensor

GROUPED_RECIPES = ("block", "row")
LAYOUTS = ("contiguous", "masked")


@dataclass(frozen=True, eq=False)
class GroupedFp8Tensor(DataView):
    """`w[g] ≈ data[g].float() * scale[g]`, the scale broadcast by `block` over each expert's [N, K].

    `data` FP8 `[G, N, K]`, `scale` fp32 `[G, ceil(N / block[0]), ceil(K / block[1])]`. Unpacks like
    a tuple: `data, scale, block = w`.
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: Block

    def __post_init__(self):
        self._check_parts()
        data, scale, block = self.data, self.scale, self.block
        if data.dim() != 3:
            raise Fp8ValueError(f"data: expected a 3-d [G, N, K] tensor, got shape {tuple(data.shape)}")
        expected = grouped_scale_shape(tuple(data.shape), block)
        if tuple(scale.shape) != expected:
            raise Fp8ValueError(f"scale: expected shape {expected} for data {tuple(data.shape)} in per-expert "
                                f"blocks {block}, got {tuple(scale.shape)}")

    def __iter__(self):
        return iter((self.data, self.scale, self.block))

    def expert(self, g: int) -> Fp8Tensor:
        """Expert g's weight `[N, K]` as an Fp8Tensor (views, no copy)."""
        return Fp8Tensor(self.data[g], self.scale[g], self.block)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """`data * scale` per expert in fp32, then cast to `dtype`: `[G, N, K]`."""
        g, n, k = self.data.shape
        out = torch.empty((g, n, k), dtype=dtype, device=self.device)
        for i in range(g):
            out[i] = (self.data[i].float() * expand_scale(self.scale[i], self.block, (n, k))).to(dtype)
        return out

    def __repr__(self) -> str:
        return (f"GroupedFp8Tensor(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, block={self.block}, "
                f"scale={tuple(self.scale.shape)}, device={self.data.device})")


def grouped_scale_shape(shape: tuple[int, int, int], block: Block) -> tuple[int, int, int]:
    g, n, k = shape
    return (g, cdiv(n, block[0]), cdiv(k, block[1]))


def grouped_block(recipe: str, n: int, k: int, block_size: int = 128) -> Block:
    """The per-expert weight block of a recipe: 128×128 for `block`, one row for `row`."""
    if recipe == "block":
        return (block_size, block_size)
    if recipe == "row":
        return (1, max(k, 1))
    raise Fp8ValueError(f"recipe: expected one of {', '.join(GROUPED_RECIPES)}, got {recipe!r}")


def recipe_of_grouped(block: Block, k: int) -> str:
    """`row` when no scale varies along K and each output channel has its own; else `block`."""
    if block[1] >= k and block[0] == 1:
        return "row"
    return "block"


def quantize_grouped(w: torch.Tensor, recipe: str = "block", *, dtype: torch.dtype = torch.float8_e4m3fn,
                     block_size: int = 128, pow2_scale: bool = False, backend: str = "auto") -> GroupedFp8Tensor:
    """Quantize a `[G, N, K]` stack of expert weights, each expert blocked on its own.

    `fp8dispatch.quantize` calls over `[G' * N', K]` views of a few experts at a time, N padded with
    zero rows to a multiple of the block's rows when it is not one (zeros raise no block's amax), so
    every scale follows the quantizer's rules exactly as a per-expert `quantize(w[g], ...)` would.
    """
    from fp8dispatch.api import quantize  # api imports this module

    if not isinstance(w, torch.Tensor):
        raise Fp8TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in HIGH_PRECISION:
        raise Fp8TypeError(f"w: expected float32, float16 or bfloat16, got {w.dtype}")
    if w.dim() != 3:
        raise Fp8ValueError(f"w: expected a 3-d [G, N, K] tensor, got shape {tuple(w.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise Fp8ValueError(f"block_size: expected a positive int, got {block_size!r}")
    g, n, k = w.shape
    block = grouped_block(recipe, n, k, block_size)
    rows = cdiv(n, block[0]) * block[0]
    if g * rows * k == 0:
        data = torch.empty((g, n, k), dtype=dtype, device=w.device)
        return GroupedFp8Tensor(data, torch.ones(grouped_scale_shape((g, n, k), block), device=w.device), block)
    data = torch.empty((g, n, k), dtype=dtype, device=w.device)
    scale = torch.empty(grouped_scale_shape((g, n, k), block), dtype=torch.float32, device=w.device)
    # A few experts per quantize call, so a backend's fp32 working copies stay small (256 of
    # DeepSeek-V3's 4096×7168 experts would take 28 GiB in one call); blocks never span experts.
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // (rows * k))
    for first in range(0, g, step):
        part = w[first:first + step]
        padded = part if rows == n else torch.nn.functional.pad(part, (0, 0, 0, rows - n))
        q = quantize(padded.reshape(-1, k), "block", dtype=dtype, block_size=block, pow2_scale=pow2_scale,
                     backend=backend)
        data[first:first + step] = q.data.view(-1, rows, k)[:, :n]
        scale[first:first + step] = q.scale.view(grouped_scale_shape((part.shape[0], rows, k), block))
    return GroupedFp8Tensor(data, scale, block)


# Elements of w per quantize call in `quantize_grouped` (1 GiB of fp32 working copy).
QUANTIZE_CHUNK_ELEMENTS = 1 << 28


def skewed_counts(groups: int, total: int, seed: int = 0) -> tuple[int, ...]:
    """Row counts of a routed batch summing to `total`: a few hot experts, a long tail of 0, 1 and
    small counts (weights drawn uniform, raised to the 6th power). Deterministic per seed."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(groups, generator=gen) ** 6
    counts = (weights / weights.sum() * total).floor().long()
    counts[int(torch.randint(0, groups, (1,), generator=gen))] += total - int(counts.sum())
    return tuple(int(c) for c in counts)


def safe_offsets(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """Contiguous-layout offsets made valid on their device, never read on the host: clamped into
    [0, rows], never decreasing, first 0 and last `rows`. Valid offsets keep their values; invalid
    ones (not checked on a GPU, docs/decisions.md) give every backend the same in-bounds experts
    (the Triton kernels clamp the same way inside)."""
    safe = offsets.clamp(0, rows).cummax(0).values
    # fill_ on views, not `safe[0] = 0`: item assignment copies a CPU scalar in, which a CUDA-graph
    # capture refuses (measured: the fbgemm backend's contiguous capture failed that way).
    safe[0].fill_(0)
    safe[-1].fill_(rows)
    return safe


@dataclass(frozen=True)
class GroupedLinearProblem:
    """`out[rows of g] = x[rows of g] @ w[g].T` for G experts; per-expert row counts are values, not part of it."""

    device: torch.device
    capability: tuple[int, int] | None
    layout: str  # "contiguous": x [M, K] sorted by expert; "masked": x [G, max_m, K]
    recipe: str  # "block" or "row"
    x_dtype: torch.dtype
    w_dtype: torch.dtype
    groups: int
    m: int  # contiguous: all rows M; masked: max_m, the rows per expert
    n: int
    k: int
    x_block: Block
    w_block: Block
    offsets_dtype: torch.dtype  # of offsets (contiguous) or masked_m (masked)
    x_row_major: bool
    w_contiguous: bool
    out_dtype: torch.dtype
    bias_dtype: torch.dtype | None
    op = "grouped_linear"

    def describe(self) -> str:
        def name(d):
            return "none" if d is None else str(d).removeprefix("torch.")
        rows = f"[{self.m}, {self.k}]" if self.layout == "contiguous" else f"[{self.groups}, {self.m}, {self.k}]"
        bias = f", bias {name(self.bias_dtype)}" if self.bias_dtype is not None else ""
        return (f"grouped_linear({self.layout}: x {name(self.x_dtype)}{rows} blocks {self.x_block}, "
                f"w {name(self.w_dtype)}[{self.groups}, {self.n}, {self.k}] blocks {self.w_block}, "
                f"recipe {self.recipe} on {self.device} -> {name(self.out_dtype)}{bias})")
