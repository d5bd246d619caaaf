"""Conformance cases for `grouped_linear`: expert layouts, row counts, recipes and formats, as data.

Each case is one call: x quantized by the reference (or passed in high precision, so the op
quantizes it), w `[G, N, K]` quantized per expert by the reference, and `offsets` or `masked_m`.
The checks are matmul's (the fp32 product of the dequantized operands, bit for bit on exactly
representable values) plus the masked layout's own: rows past `masked_m[g]` are exactly zero, even
where x's padding rows hold NaN.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

import fp8dispatch
from fp8dispatch.grouped import QUANTIZE_CHUNK_ELEMENTS, GroupedFp8Tensor, skewed_counts

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _short(dtype) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.").removeprefix("float8_")


@dataclass(frozen=True)
class GroupedCase:
    """`counts`: rows per expert (contiguous) or `masked_m` (masked, each expert `max_m` slots)."""

    recipe: str
    layout: str
    counts: tuple[int, ...]
    n: int
    k: int
    max_m: int = 0
    fp8: torch.dtype = E4M3
    w_fp8: torch.dtype = E4M3
    in_dtype: torch.dtype = torch.bfloat16
    out_dtype: torch.dtype = torch.bfloat16
    bias: torch.dtype | None = None
    values: str = "randn"  # or "representable": every product and sum exact in fp32
    x_given: str = "fp8"  # "high": x passed in high precision, quantized by the op
    op = "grouped_linear"

    @property
    def granularity(self) -> str:
        return self.recipe

    @property
    def id(self) -> str:
        g = len(self.counts)
        rows = sum(self.counts) if self.layout == "contiguous" else self.max_m
        parts = ["grouped_linear", self.recipe, self.layout, f"{_short(self.fp8)}_{_short(self.w_fp8)}",
                 "to_" + _short(self.out_dtype), f"g{g}", f"m{rows}n{self.n}k{self.k}",
                 "c" + format(zlib.crc32(repr(self.counts).encode()), "08x"), self.values]
        if self.x_given != "fp8":
            parts.append(f"x_{self.x_given}_{_short(self.in_dtype)}")
        if self.bias is not None:
            parts.append("bias_" + _short(self.bias))
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def exact(self) -> bool:
        return self.values == "representable"

    def describe(self) -> str:
        counts = self.counts if len(self.counts) <= 8 else f"{len(self.counts)} experts, {sum(self.counts)} rows"
        return (f"op=grouped_linear, recipe={self.recipe}, layout={self.layout}, counts={counts}, "
                f"max_m={self.max_m}, n={self.n}, k={self.k}, x={_short(self.fp8)}, w={_short(self.w_fp8)}, "
                f"x_given={self.x_given}, in_dtype={_short(self.in_dtype)}, out_dtype={_short(self.out_dtype)}, "
                f"bias={_short(self.bias)}, values={self.values}")


def cases(quick: bool = True) -> list:
    out = []
    for j, recipe in enumerate(("block", "row")):
        high = (torch.bfloat16, torch.float32, torch.float16)[j]
        # Tails in M (per expert), N and K; an empty expert between full ones.
        out.append(GroupedCase(recipe, "contiguous", (5, 0, 17, 1), n=200, k=300, bias=torch.float32))
        out.append(GroupedCase(recipe, "contiguous", (33,), n=136, k=256, out_dtype=torch.float32))
        out.append(GroupedCase(recipe, "contiguous", (0, 0, 9, 0), n=64, k=128))
        out.append(GroupedCase(recipe, "contiguous", (0, 0, 0), n=64, k=128))
        # 256 experts with skewed counts (tiny N and K: the interpreter walks every expert).
        out.append(GroupedCase(recipe, "contiguous", skewed_counts(256, 300, seed=j), n=48, k=160))
        # Masked (decode): empty, full and partial experts; x's padding rows hold NaN.
        out.append(GroupedCase(recipe, "masked", (0, 8, 3, 1), n=200, k=300, max_m=8, bias=torch.bfloat16))
        out.append(GroupedCase(recipe, "masked", (0, 0, 0), n=64, k=128, max_m=4))
        out.append(GroupedCase(recipe, "masked", (16, 16), n=72, k=256, max_m=16, out_dtype=torch.float16))
        # Formats: e5m2 activations with e4m3 weights, and e5m2 on both sides.
        out.append(GroupedCase(recipe, "contiguous", (7, 0, 12), n=64, k=256, fp8=E5M2))
        out.append(GroupedCase(recipe, "masked", (3, 5), n=64, k=256, max_m=8, fp8=E5M2, w_fp8=E5M2))
        # Exact: every product and partial sum is exact in fp32, so the result is the reference's bits.
        out.append(GroupedCase(recipe, "contiguous", (0, 11, 64, 3), n=136, k=384, values="representable",
                               out_dtype=torch.float32, bias=torch.bfloat16))
        out.append(GroupedCase(recipe, "masked", (2, 0, 7), n=136, k=384, max_m=8, values="representable",
                               out_dtype=torch.float32))
        # High-precision x, quantized inside by the recipe.
        out.append(GroupedCase(recipe, "contiguous", (4, 9, 0, 2), n=96, k=320, x_given="high", in_dtype=high))
        out.append(GroupedCase(recipe, "masked", (1, 6), n=96, k=320, max_m=6, x_given="high", in_dtype=high))
        if not quick:  # DeepSeek-V3's experts: gate/up fused 4096×7168, down 7168×2048
            for n, k in ((4096, 7168), (7168, 2048)):
                out.append(GroupedCase(recipe, "contiguous", (4096,) * 8, n=n, k=k))
                out.append(GroupedCase(recipe, "contiguous", skewed_counts(32, 4096, seed=1), n=n, k=k))
                out.append(GroupedCase(recipe, "masked", skewed_counts(256, 256 * 32, seed=2), n=n, k=k, max_m=64))
    return out


# --- inputs ---------------------------------------------------------------------------------


def build(case: GroupedCase, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    groups, n, k = len(case.counts), case.n, case.k
    masked = case.layout == "masked"
    rows = groups * case.max_m if masked else sum(case.counts)
    masked_m = list(min(c, case.max_m) for c in case.counts) if masked else None
    pow2 = case.exact
    x = _small_integers((rows, k), gen) if pow2 else torch.randn(rows, k, generator=gen)
    if masked:  # padding rows: NaN, which must reach no valid row and no output
        pad = (torch.arange(case.max_m)[None, :] >= torch.tensor(masked_m)[:, None]).reshape(-1)
        x[pad] = float("nan")
    x = x.to(case.in_dtype).to(device)
    if case.x_given == "high":
        xa = x.view(groups, case.max_m, k) if masked else x
    else:
        q = fp8dispatch.quantize(x, "group" if case.recipe == "block" else "row", dtype=case.fp8, pow2_scale=pow2,
                                 backend="reference")
        xa = fp8dispatch.Fp8Tensor(q.data.view(groups, case.max_m, k) if masked else q.data, q.scale, q.block)
    wq = _weights(case, device)
    offsets = masked_t = None
    if masked:
        masked_t = torch.tensor(masked_m, dtype=torch.int32, device=device)
    else:
        offsets = torch.tensor([0, *torch.tensor(case.counts).cumsum(0).tolist()], dtype=torch.int64, device=device)
    bias = None
    if case.bias is not None:
        bias = (torch.randint(-8, 9, (groups, n), generator=gen) if pow2 else torch.randn(groups, n, generator=gen))
        bias = bias.to(case.bias).to(device)
    return {"x": xa, "w": wq, "offsets": offsets, "masked_m": masked_t, "bias": bias}


def _weights(case: GroupedCase, device: torch.device) -> GroupedFp8Tensor:
    """The case's `[G, N, K]` weights, drawn on the device expert by expert and quantized a few
    experts at a time: DeepSeek-V3's 256 experts of 4096×7168 are 7.5 G numbers, and only their FP8
    stack (7.5 GB) is ever whole, so several backends' checks can share one GPU. Deterministic per
    device."""
    groups, n, k = len(case.counts), case.n, case.k
    gen = torch.Generator(device).manual_seed(case.seed + 1)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // (n * k))
    data = scale = None
    for first in range(0, groups, step):
        count = min(step, groups - first)
        w = torch.empty((count, n, k), dtype=case.in_dtype, device=device)
        for g in range(count):
            w[g] = (_small_integers((n, k), gen, device) if case.exact
                    else torch.randn(n, k, generator=gen, device=device) / k**0.5)
        q = fp8dispatch.quantize_grouped(w, case.recipe, dtype=case.w_fp8, pow2_scale=case.exact, backend="reference")
        if data is None:
            data = torch.empty((groups, n, k), dtype=q.data.dtype, device=device)
            scale = torch.empty((groups, *q.scale.shape[1:]), dtype=q.scale.dtype, device=device)
        data[first:first + count], scale[first:first + count] = q.data, q.scale
    return GroupedFp8Tensor(data, scale, q.block)


def _small_integers(shape, gen, device="cpu") -> torch.Tensor:
    """Integers in [-2, 2] with the first of each 128-wide K run at 2 (so block amaxes are 2 and
    pow2 scales make the FP8 codes exact); products ≤ 4, sums over K ≤ 384 exact in fp32 and fp16."""
    x = torch.randint(-2, 3, shape, generator=gen, device=device).float()
    x[..., ::128] = 2.0
    return x


# --- the call, the problem, the expected answer, the comparison ------------------------------


def call(case: GroupedCase, inputs: dict, backend: str):
    return fp8dispatch.grouped_linear(inputs["x"], inputs["w"], inputs["offsets"], masked_m=inputs["masked_m"],
                                      bias=inputs["bias"], out_dtype=case.out_dtype, backend=backend)


def problem_of(case: GroupedCase, inputs: dict):
    from fp8dispatch.grouped_api import plan_problem

    return plan_problem(inputs["x"], inputs["w"], inputs["offsets"], inputs["masked_m"], inputs["bias"], None,
                        case.out_dtype, "reference")


def product(case: GroupedCase, inputs: dict) -> torch.Tensor:
    """The fp32 product of the dequantized operands per expert, plus bias; rows past masked_m zero."""
    x, w, bias = inputs["x"], inputs["w"], inputs["bias"]
    if isinstance(x, torch.Tensor):
        x = fp8dispatch.quantize(x.reshape(-1, case.k), "group" if case.recipe == "block" else "row",
                                 backend="reference")
    xs = x.dequantize(torch.float32).reshape(-1, case.k)
    groups = len(case.counts)
    if case.layout == "masked":
        out = torch.zeros(groups, case.max_m, case.n, device=xs.device)
        spans = [(g * case.max_m, g * case.max_m + min(c, case.max_m)) for g, c in enumerate(case.counts)]
        targets = [out[g] for g in range(groups)]
        local = True
    else:
        out = torch.zeros(xs.shape[0], case.n, device=xs.device)
        bounds = [0, *torch.tensor(case.counts).cumsum(0).tolist()]
        spans = list(zip(bounds[:-1], bounds[1:]))
        targets = [out] * groups
        local = False
    for g, ((a, b), target) in enumerate(zip(spans, targets)):
        rows = xs[a:b] @ w.expert(g).dequantize(torch.float32).T  # one expert in fp32 at a time
        if bias is not None:
            rows = rows + bias[g].float()
        if local:
            target[: b - a] = rows
        else:
            target[a:b] = rows
    return out


def padding_not_zero(case: GroupedCase, got: torch.Tensor) -> list[str]:
    """The masked layout's promise: rows past masked_m[g] are exactly zero."""
    if case.layout != "masked":
        return []
    for g, count in enumerate(case.counts):
        tail = got[g, min(count, case.max_m):]
        bad = tail != 0
        if bool(bad.any()):
            at = tuple(int(i) for i in bad.nonzero()[0].tolist())
            return [f"expert {g}: {int(bad.sum())} elements past masked_m[{g}] = {count} are not zero "
                    f"(first at row {count + at[0]}, column {at[1]}: {tail[at].item()!r})"]
    return []


__all__ = ["GroupedCase", "build", "call", "cases", "padding_not_zero", "problem_of", "product"]
