"""The conformance cases: every op's shapes, formats, blocks, options and special values, as data.

A `Case` is a frozen description; `build(case, device)` turns it into the call's inputs,
deterministically (its seed comes from its id), so a case id alone reproduces a failure.
`--quick` sizes stay at or below 256 rows and columns: the `triton` backend runs in the Triton
interpreter on CPU at about 2 ms per program instance (research/cpu-ci.md).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache

import torch

import fp8dispatch
from fp8dispatch.blocks import block_for, blockwise_amax, scale_shape
from fp8dispatch.formats import fp8_format
from fp8dispatch.scaling import scale_from_amax

from . import grouped

OPS = ("quantize", "dequantize", "matmul", "grouped_linear")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3FNUZ, E5M2FNUZ = torch.float8_e4m3fnuz, torch.float8_e5m2fnuz
FP8_DTYPES = (E4M3, E5M2, E4M3FNUZ, E5M2FNUZ)
HIGH = (torch.bfloat16, torch.float32, torch.float16)
GRANULARITIES = ("tensor", "row", "group", "block")
MATMUL_RECIPES = ("block", "row", "tensor")

# Value patterns, each a question the contract answers (see `_values`).
PATTERNS = ("randn", "zero_blocks", "ties", "saturate", "subnormals", "huge_range", "nonfinite", "representable",
            "zero_beside_max", "tiny_amax")
# Matmul values whose products and partial sums are exact in fp32, checked bit for bit: "sparse"
# (most blocks zero) and "cancel" (+P, s, -P across K blocks: a ~14-bit accumulator loses s).
EXACT_MATMUL = ("representable", "sparse", "cancel")


@dataclass(frozen=True)
class Case:
    """One call to check. Fields an op does not use keep their defaults.

    quantize: x of `shape` and `in_dtype` by `granularity` blocks into `fp8`, scales by `scale_mode`
    ("auto", "pow2", "ub" for scale_ub, "user" for a given scale). dequantize: an Fp8Tensor of
    `shape` in `fp8` by `granularity` blocks, to `out_dtype`. matmul: a `shape` [..., M, K] @ b
    [K, n], operands quantized by the reference with `granularity` as the recipe, b in `b_fp8`.
    """

    op: str
    shape: tuple[int, ...]
    granularity: str
    fp8: torch.dtype = E4M3
    in_dtype: torch.dtype = torch.bfloat16
    out_dtype: torch.dtype = torch.bfloat16
    values: str = "randn"
    scale_mode: str = "auto"
    block_size: int | tuple[int, int] = 128
    # "transposed": x (quantize), t (dequantize) or b (matmul) is a transposed view; "sliced" (matmul):
    # a and the weight under b are row slices of bigger quantized tensors, their scale pointers misaligned;
    # "high_precision_a" (matmul): the call gets a unquantized and quantizes it itself
    layout: str = "contiguous"
    n: int = 0
    b_fp8: torch.dtype | None = None
    bias: torch.dtype | None = None

    @property
    def id(self) -> str:
        dims = "x".join(map(str, self.shape)) + (f"x{self.n}" if self.op == "matmul" else "")
        parts = [self.op, self.granularity]
        if self.block_size != 128:
            size = self.block_size
            parts.append("bs" + ("x".join(map(str, size)) if isinstance(size, tuple) else str(size)))
        parts.append(_short(self.fp8) + (f"_{_short(self.b_fp8)}" if self.b_fp8 not in (None, self.fp8) else ""))
        if self.op != "dequantize":
            parts.append(_short(self.in_dtype))
        if self.op != "quantize":
            parts.append("to_" + _short(self.out_dtype))
        parts.append(dims)
        parts.append(self.values)
        if self.scale_mode != "auto":
            parts.append(self.scale_mode)
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.bias is not None:
            parts.append("bias_" + _short(self.bias))
        return "-".join(parts)

    @property
    def recipe(self) -> str:
        """The column of the report's matrix: the granularity, or the matmul recipe."""
        return self.granularity

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def exact(self) -> bool:
        """A matmul whose every product and partial sum is exact in fp32: must match bit for bit."""
        return self.op == "matmul" and self.values in EXACT_MATMUL

    def describe(self) -> str:
        fields = {"op": self.op, "shape": list(self.shape), "granularity": self.granularity,
                  "fp8": _short(self.fp8), "values": self.values}
        if self.op == "matmul":
            fields.update(n=self.n, b_fp8=_short(self.b_fp8 or self.fp8), in_dtype=_short(self.in_dtype),
                          out_dtype=_short(self.out_dtype), bias=self.bias and _short(self.bias))
        elif self.op == "quantize":
            fields.update(in_dtype=_short(self.in_dtype), scale_mode=self.scale_mode)
        else:
            fields.update(out_dtype=_short(self.out_dtype))
        fields.update(block_size=self.block_size, layout=self.layout)
        return ", ".join(f"{k}={v}" for k, v in fields.items())


def _short(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.").removeprefix("float8_")


# --- the case lists -------------------------------------------------------------------------

# Tails in every dimension, M = 1, a single element, leading batch dims, one full tile.
QUICK_SHAPES = ((1, 1), (1, 200), (7, 130), (2, 5, 96), (130, 257), (256, 256))
# Big enough for two 128-row blocks with tails, small enough for the interpreter.
QUICK_SPECIAL_SHAPE = (136, 260)
FULL_SHAPES = QUICK_SHAPES + ((1, 7168), (4096, 7168), (8192, 2048), (4097, 7000), (4, 512, 1536))
FULL_SPECIAL_SHAPE = (1040, 2100)

QUICK_MATMUL = ((1, 256, 96), (3, 200, 136), (64, 384, 256), (130, 256, 200), (256, 256, 256))
# DeepSeek-V3 projections (N, K) at decode and prefill M, and tails in M, N and K.
FULL_MATMUL = QUICK_MATMUL + ((1, 7168, 2112), (64, 7168, 4096), (128, 2048, 7168), (4096, 7168, 2112),
                              (4096, 1536, 24576), (8192, 2048, 7168), (4095, 7000, 2100), (8192, 8192, 8192))


def cases(op: str, quick: bool = True) -> list[Case]:
    """Every case of `op`, in a fixed order, ids unique."""
    made = {"quantize": _quantize_cases, "dequantize": _dequantize_cases, "matmul": _matmul_cases,
            "grouped_linear": grouped.cases}[op](quick)
    seen: dict[str, Case] = {}
    for case in made:
        seen.setdefault(case.id, case)
    return list(seen.values())


def all_cases(quick: bool = True, ops: tuple[str, ...] = OPS) -> list[Case]:
    return [case for op in ops for case in cases(op, quick)]


def by_id(case_id: str) -> Case:
    """The case with this id (quick or full), for reproducing a failure."""
    for quick in (True, False):
        for case in all_cases(quick):
            if case.id == case_id:
                return case
    raise fp8dispatch.Fp8ValueError(f"case_id: no conformance case is named {case_id!r}")


def _rotate(seq, i):
    return seq[i % len(seq)]


def _grid(shapes):
    """shape × granularity, with formats and high-precision dtypes rotating so that every format
    meets every dtype somewhere (the full product would multiply the run time by 12 for little)."""
    i = 0
    for shape in shapes:
        for gran in GRANULARITIES:
            yield shape, gran, _rotate(FP8_DTYPES, i), _rotate(HIGH, i // 4 + i)
            i += 1


def _quantize_cases(quick: bool) -> list[Case]:
    out = []
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    special = QUICK_SPECIAL_SHAPE if quick else FULL_SPECIAL_SHAPE
    for shape, gran, f, d in _grid(shapes):
        out.append(Case("quantize", shape, gran, fp8=f, in_dtype=d))
    # Special values: every pattern × granularity; the two OCP formats alternate (both in full size).
    i = 0
    for values in PATTERNS[1:]:
        for gran in GRANULARITIES:
            fmts = (_rotate((E4M3, E5M2), i),) if quick else (E4M3, E5M2)
            mode = {"saturate": "ub", "representable": "pow2"}.get(values, "auto")
            in_dtype = torch.float32 if values == "tiny_amax" else _rotate(HIGH, i)  # 1e-28 is 0 in fp16
            for f in fmts:
                out.append(Case("quantize", special, gran, fp8=f, in_dtype=in_dtype, values=values, scale_mode=mode))
            i += 1
    # Saturation with a given scale, ties under a given scale, and the scale options on plain data.
    for gran in GRANULARITIES:
        out.append(Case("quantize", special, gran, values="saturate", scale_mode="user"))
        out.append(Case("quantize", special, gran, fp8=E5M2, in_dtype=torch.float32, values="ties", scale_mode="user"))
        for j, mode in enumerate(("user", "ub", "pow2")):
            out.append(Case("quantize", (3, 65, 200), gran, in_dtype=_rotate(HIGH, j), scale_mode=mode))
    # A transposed (non-contiguous) input, and block sizes other than 128.
    for gran in ("row", "group", "block", "tensor"):
        out.append(Case("quantize", special, gran, layout="transposed"))
    out.append(Case("quantize", special, "group", block_size=64))
    out.append(Case("quantize", special, "block", block_size=(64, 32), in_dtype=torch.float32))
    return out


def _dequantize_cases(quick: bool) -> list[Case]:
    out = []
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    for shape, gran, f, d in _grid(shapes):
        # "codes": every FP8 bit pattern (NaN, ±0, subnormals, ±max, inf in e5m2) under random scales.
        out.append(Case("dequantize", shape, gran, fp8=f, out_dtype=d, values="codes"))
    for j, gran in enumerate(GRANULARITIES):
        out.append(Case("dequantize", QUICK_SPECIAL_SHAPE, gran, out_dtype=_rotate(HIGH, j), values="randn"))
        out.append(Case("dequantize", QUICK_SPECIAL_SHAPE, gran, fp8=_rotate(FP8_DTYPES, j),
                        out_dtype=_rotate(HIGH, j + 1), values="codes", layout="transposed"))
    out.append(Case("dequantize", QUICK_SPECIAL_SHAPE, "group", values="codes", block_size=64))
    return out


def _matmul_cases(quick: bool) -> list[Case]:
    out = []
    shapes = QUICK_MATMUL if quick else FULL_MATMUL
    i = 0
    for m, k, n in shapes:
        for recipe in MATMUL_RECIPES:
            out.append(Case("matmul", (m, k), recipe, n=n, in_dtype=_rotate(HIGH, i),
                            out_dtype=_rotate(HIGH, i + 1), bias=_rotate((None, torch.bfloat16, None, torch.float32), i)))
            i += 1
    for j, recipe in enumerate(MATMUL_RECIPES):
        # Exactly representable operands with power-of-two scales: the product is exact in fp32.
        out.append(Case("matmul", (64, 384), recipe, n=136, values="representable", out_dtype=_rotate(HIGH, j),
                        bias=torch.bfloat16))
        out.append(Case("matmul", (2, 3, 200), recipe, n=72, values="representable", out_dtype=torch.float32))
        # All-zero blocks (scale 1), a huge range, leading batch dims with tails.
        out.append(Case("matmul", (130, 256), recipe, n=200, values="zero_blocks", in_dtype=torch.float32))
        out.append(Case("matmul", (64, 256), recipe, n=128, values="huge_range", in_dtype=torch.float32))
        out.append(Case("matmul", (2, 33, 256), recipe, n=96, out_dtype=torch.float32))
        # Other formats: e5m2 activations with e4m3 weights, and both fnuz.
        out.append(Case("matmul", (64, 256), recipe, n=128, fp8=E5M2, b_fp8=E4M3))
        out.append(Case("matmul", (64, 256), recipe, n=128, fp8=E4M3FNUZ, b_fp8=E4M3FNUZ))
        # b quantized as a [K, N] row-major matrix rather than the transpose of a [N, K] weight.
        out.append(Case("matmul", (64, 256), recipe, n=128, layout="row_major_b"))
    # A high-precision a, quantized inside the call by the planner's quantize step: a single token,
    # a few with tails and a bias, and batch dims.
    for j, recipe in enumerate(MATMUL_RECIPES):
        out.append(Case("matmul", (1, 384), recipe, n=136, layout="high_precision_a"))
        out.append(Case("matmul", (13, 300), recipe, n=200, layout="high_precision_a", in_dtype=torch.float16,
                        out_dtype=_rotate(HIGH, j), bias=torch.bfloat16))
        out.append(Case("matmul", (2, 8, 384), recipe, n=256, layout="high_precision_a", in_dtype=torch.float32))
    # Blocks that name no recipe: 1×128 groups against per-column b.
    out.append(Case("matmul", (64, 256), "mixed", n=128))
    # Per-block extremes: zero blocks beside ±max ones, amax 1e-28, a 4× block at the tail corner
    # (a scale read from the wrong block shows), sparse exact operands (a dropped block is gross).
    for j, recipe in enumerate(MATMUL_RECIPES):
        out.append(Case("matmul", (64, 256), recipe, n=128, values="zero_beside_max", out_dtype=torch.float32))
        out.append(Case("matmul", (64, 256), recipe, n=128, values="tiny_amax", in_dtype=torch.float32))
        out.append(Case("matmul", (72, 200), recipe, n=136, values="corner", out_dtype=_rotate(HIGH, j)))
        out.append(Case("matmul", (64, 384), recipe, n=136, values="sparse", out_dtype=torch.float32))
    # fp32 accumulation across K blocks, which the block recipe requires (no fast accumulation).
    out.append(Case("matmul", (16, 384), "block", n=72, values="cancel", out_dtype=torch.float32))
    out.append(Case("matmul", (3, 5, 384), "block", n=136, values="cancel", out_dtype=torch.bfloat16))
    # Operands sliced out of bigger quantized tensors (one expert's rows of a batch, one part of a
    # fused weight): data pointers stay 16-byte aligned, scale pointers are 4 to 12 bytes past it.
    # K = 128 is a single K block (libraries run the block recipe as rowwise there), K = 384 three.
    for recipe in MATMUL_RECIPES + ("mixed",):
        out.append(Case("matmul", (64, 128), recipe, n=136, layout="sliced"))
        out.append(Case("matmul", (33, 384), recipe, n=144, layout="sliced", out_dtype=torch.float32))
        if not quick:  # the shape that found it: 1031 rows of a 7168-wide activation, N = 4096
            out.append(Case("matmul", (1031, 7168), recipe, n=4096, layout="sliced"))
    if not quick:
        # Tails of DeepSeek-like sizes: N = 576 (4.5 blocks), K = 3884 (30 blocks and 44).
        out.append(Case("matmul", (4, 3884), "block", n=576, out_dtype=torch.float32))
        out.append(Case("matmul", (1000, 3884), "block", n=576))
        out.append(Case("matmul", (64, 3884), "block", n=576, values="cancel", out_dtype=torch.float32))
        for recipe in MATMUL_RECIPES:
            out.append(Case("matmul", (1040, 2100), recipe, n=1000, values="corner"))
    return out


# --- building the inputs --------------------------------------------------------------------


def build(case: Case, device: torch.device | str) -> dict:
    """The call's arguments for `case` on `device`: quantize {x, scale, scale_ub}; dequantize {t};
    matmul {a, b, bias}. Random draws happen on the CPU from the case's seed, so every device sees
    the same numbers."""
    device = torch.device(device)
    if case.op == "grouped_linear":
        return grouped.build(case, device)
    gen = torch.Generator().manual_seed(case.seed)
    if case.op == "quantize":
        return _quantize_inputs(case, gen, device)
    if case.op == "dequantize":
        return _dequantize_inputs(case, gen, device)
    return _matmul_inputs(case, gen, device)


def _rows_cols(shape) -> tuple[int, int]:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, shape[-1]


def _quantize_inputs(case, gen, device) -> dict:
    fmt = fp8_format(case.fp8)
    rows, cols = _rows_cols(case.shape)
    stored = (cols, rows) if case.layout == "transposed" else (rows, cols)
    # Blocks are taken on the tensor the API sees, so patterns are laid out on that view.
    block = block_for(case.granularity, rows, cols, case.block_size)
    x = _values(case.values, rows, cols, block, fmt, case.in_dtype, gen)
    if case.layout == "transposed":
        x = x.t().contiguous().t()  # the same values, column-major storage
        assert x.shape == (rows, cols) and tuple(x.t().shape) == stored
    x = x.reshape(case.shape).to(device)
    scale = scale_ub = None
    if case.scale_mode == "user":
        scale = _user_scale(case, x.reshape(rows, cols), block, fmt, gen).to(device)
    elif case.scale_mode == "ub":
        # Cap amax at the fp8 max: blocks with a larger amax get scale 1 and their values saturate.
        scale_ub = fmt.max_value if case.values == "saturate" else _median_amax(x.reshape(rows, cols), block)
    return {"x": x, "scale": scale, "scale_ub": scale_ub, "pow2_scale": case.scale_mode == "pow2"}


def _user_scale(case, x2d, block, fmt, gen) -> torch.Tensor:
    auto = scale_from_amax(blockwise_amax(x2d.float().cpu(), block), fmt)
    if case.values == "ties":
        # The block's own scale, 2^j exactly: x / scale lands on the midpoints.
        return auto
    if case.values == "saturate":
        # Half the block's own (2^(j+1) -> 2^j): ±max stays ±max, everything above it saturates.
        return auto / 2
    return auto * (1 + 3 * torch.rand(auto.shape, generator=gen))  # not powers of two: a true division


def _median_amax(x2d, block) -> float:
    amax = blockwise_amax(x2d.float().cpu(), block).flatten()
    return float(amax.median().clamp(min=1e-3))


@cache
def fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of an FP8 format, ascending, in fp32."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values) & (values >= 0)]
    return torch.unique(values)


def _block_first(rows, cols, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Block index per element (for per-block exponents), and the first element of each block."""
    br, bc = block
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    index = (r // br) * 7 + (c // bc)
    first = (r % br == 0) & (c % bc == 0)
    return index, first


def _values(pattern: str, rows: int, cols: int, block, fmt, in_dtype, gen) -> torch.Tensor:
    """A [rows, cols] tensor of `in_dtype` that asks one question of the quantizer."""
    shape = (rows, cols)
    index, first = _block_first(rows, cols, block)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    # Per-block power-of-two exponents kept within fp16's range (e5m2's max is 57344).
    exp2 = torch.exp2(-torch.remainder(index, 4).float())
    if pattern == "randn":
        mag = torch.exp(torch.empty(rows, 1).uniform_(-4, 4, generator=gen))
        x = torch.randn(shape, generator=gen) * mag
    elif pattern == "zero_blocks":
        x = torch.randn(shape, generator=gen) * 3
        bi = index  # zero the first block, the last (a tail block) and every third in between
        x = torch.where((bi == bi.min()) | (bi == bi.max()) | (bi % 3 == 1), 0.0, x)
    elif pattern == "ties":
        # Exact midpoints between adjacent FP8 values; each block's first element is ±max·2^j, so
        # the automatic scale is exactly 2^j and x / scale lands on the midpoints.
        grid = fp8_grid(fmt.dtype)
        mids = (grid[:-1] + grid[1:]) / 2
        pick = torch.randint(len(mids), shape, generator=gen)
        x = torch.where(first, fmt.max_value, mids[pick]) * sign * exp2
    elif pattern == "saturate":
        # ±max, the next value up in the input dtype, 2×max, and plain values, under scale 2^j.
        up = fmt.max_value * (1 + torch.finfo(in_dtype).eps)
        choices = torch.tensor([fmt.max_value, up, 2 * fmt.max_value, 1.0, fmt.max_value / 2])
        x = choices[torch.randint(len(choices), shape, generator=gen)] * sign
        x = torch.where(first, 2 * fmt.max_value, x) * exp2
    elif pattern == "subnormals":
        # Values that land in the FP8 subnormal range once divided by the exact scale 2^j.
        x = torch.rand(shape, generator=gen) * fmt.min_normal * sign
        x = torch.where(first, fmt.max_value, x) * exp2
    elif pattern == "huge_range":
        # Magnitudes across the input dtype's whole range inside every block (fp32 denormals too).
        info = torch.finfo(in_dtype)
        lo, hi = (-45.0 if in_dtype == torch.float32 else float(torch.log10(torch.tensor(info.tiny))) - 2), \
            float(torch.log10(torch.tensor(info.max))) - 0.5
        x = torch.pow(10.0, torch.empty(shape).uniform_(lo, hi, generator=gen)) * sign
    elif pattern == "nonfinite":
        # NaN and ±inf in some blocks; one block wholly non-finite (its amax over finite values is 0).
        x = torch.randn(shape, generator=gen) * 5
        roll = torch.rand(shape, generator=gen)
        x = torch.where(roll < 0.03, float("nan"), torch.where(roll < 0.06, float("inf") * sign, x))
        whole = (index == index.max()) & (index.max() > index.min())
        x = torch.where(whole, torch.where(roll < 0.5, float("nan"), float("inf") * sign), x)
    elif pattern == "zero_beside_max":
        # Every other block all zero (scale 1); the rest reach exactly ±max (scale 1, codes = x).
        x = (torch.randn(shape, generator=gen) * fmt.max_value / 4).clamp(-fmt.max_value, fmt.max_value)
        x = torch.where(first, fmt.max_value * sign, x)
        x = torch.where(index % 2 == 0, 0.0, x)
    elif pattern == "tiny_amax":
        # Blocks of amax about 1e-28 (normal in fp32, far below any FP8 value) beside ordinary ones.
        x = torch.randn(shape, generator=gen)
        x = torch.where(index % 2 == 0, x * 2.5e-29, x)
    elif pattern == "representable":
        # FP8 values times a per-block power of two: pow2 scales reproduce them exactly.
        grid = fp8_grid(fmt.dtype)
        x = grid[torch.randint(len(grid), shape, generator=gen)] * sign * exp2
    else:
        raise ValueError(f"pattern: unknown value pattern {pattern!r}")
    return x.to(in_dtype)


def _dequantize_inputs(case, gen, device) -> dict:
    rows, cols = _rows_cols(case.shape)
    stored = (cols, rows) if case.layout == "transposed" else (rows, cols)
    block = block_for(case.granularity, *stored, case.block_size)
    if case.values == "codes":
        codes = torch.randint(256, (rows * cols,), generator=gen)
        codes[: min(256, codes.numel())] = torch.randperm(256, generator=gen)[: codes.numel()]
        data = codes.to(torch.uint8).view(case.fp8).reshape(stored)
        # Log-uniform scales over 2^±20: overflows of the output dtype are part of the question.
        scale = torch.exp2(torch.empty(scale_shape(stored, block)).uniform_(-20, 20, generator=gen))
        t = fp8dispatch.Fp8Tensor(data.to(device), scale.to(device), block)
    else:
        x = _values(case.values, *stored, block, fp8_format(case.fp8), torch.float32, gen).to(device)
        t = fp8dispatch.quantize(x, case.granularity, dtype=case.fp8, block_size=case.block_size,
                                 backend="reference")
    if case.layout == "transposed":
        t = t.t()
    elif len(case.shape) > 2:
        t = fp8dispatch.Fp8Tensor(t.data.reshape(case.shape), t.scale, t.block)
    return {"t": t}


def _matmul_inputs(case, gen, device) -> dict:
    m, k = _rows_cols(case.shape)
    n = case.n
    b_fp8 = case.b_fp8 or case.fp8
    a_gran, b_gran = {"block": ("group", "block"), "row": ("row", "row"), "tensor": ("tensor", "tensor"),
                      "mixed": ("group", "row")}[case.granularity]
    a_block = block_for(a_gran, m, k)
    w_block = block_for(b_gran, n, k)
    if case.values in ("representable", "sparse"):
        a = _small_integers(m, k, a_block, gen)
        w = _small_integers(n, k, w_block, gen)
        if case.values == "sparse":  # one block in three of a and one in two of w kept
            a = torch.where(_block_first(m, k, a_block)[0] % 3 == 0, a, 0.0)
            w = torch.where(_block_first(n, k, w_block)[0] % 2 == 0, w, 0.0)
    elif case.values == "cancel":
        a, w = _cancelling(m, k, n, gen)
    else:
        pattern = case.values if case.values in ("zero_blocks", "zero_beside_max", "tiny_amax") else "randn"
        a = _values(pattern, m, k, a_block, fp8_format(case.fp8), case.in_dtype, gen)
        if case.values == "huge_range":
            # 40 decades inside each block of a: the product stays finite in fp32 and bf16.
            sign = torch.where(torch.rand(m, k, generator=gen) < 0.5, -1.0, 1.0)
            a = torch.pow(10.0, torch.empty(m, k).uniform_(-20, 20, generator=gen)) * sign
        # The weight keeps a modest range: a huge range on both sides is one question, not two.
        w = _values("randn", n, k, w_block, fp8_format(b_fp8), case.in_dtype, gen) / k**0.5
        if case.values == "corner":  # the last block of each operand, where tails meet, 4× the rest
            a = a.clone()
            a[(m - 1) // 128 * 128:, (k - 1) // 128 * 128:] *= 4
            w[(n - 1) // 128 * 128:, (k - 1) // 128 * 128:] *= 4
    a, w = a.to(case.in_dtype).to(device), w.to(case.in_dtype).to(device)
    pow2 = case.values in EXACT_MATMUL
    aq = fp8dispatch.quantize(a, a_gran, dtype=case.fp8, pow2_scale=pow2, backend="reference")
    aq = fp8dispatch.Fp8Tensor(aq.data.reshape(case.shape), aq.scale, aq.block)
    if case.layout == "row_major_b":
        # b [K, N] row-major, blocked to match: (128, 128), per-column (K, 1), or one tensor block.
        b_gran_t = {"block": "block", "row": "col", "tensor": "tensor", "mixed": "col"}[case.granularity]
        if b_gran_t == "col":
            wq = fp8dispatch.quantize(w.t().contiguous(), "block", dtype=b_fp8, block_size=(k, 1),
                                      pow2_scale=pow2, backend="reference")
        else:
            wq = fp8dispatch.quantize(w.t().contiguous(), b_gran_t, dtype=b_fp8, pow2_scale=pow2, backend="reference")
        b = wq
    else:
        b = fp8dispatch.quantize(w, b_gran, dtype=b_fp8, pow2_scale=pow2, backend="reference").t()
    if case.layout == "sliced":
        # a: rows 3.. of a bigger tensor; the weight: rows 5.. (row or tensor scales) or one
        # 128-row block on (block scales), the slice starting at a block as a fused weight's parts do.
        wq = b.t()
        aq, b = _sliced(aq, 3), _sliced(wq, 5 if wq.block[0] == 1 or wq.scale.shape[0] == 1 else wq.block[0]).t()
    bias = None
    if case.bias is not None:
        bias = torch.randint(-8, 9, (n,), generator=gen).to(case.bias) if pow2 else \
            torch.randn(n, generator=gen).to(case.bias)
        bias = bias.to(device)
    if case.layout == "high_precision_a":  # the call gets a itself; aq stays for the product
        return {"a": aq, "a_high": a.reshape(case.shape), "b": b, "bias": bias}
    return {"a": aq, "b": b, "bias": bias}


def _sliced(t: fp8dispatch.Fp8Tensor, before: int) -> fp8dispatch.Fp8Tensor:
    """`t` as rows [before, before + rows) of a bigger 2-D FP8 tensor (zero codes, unit scales
    around it), so its data and scale pointers are offset. A single scale row (tensorwise) becomes
    the second element of a bigger scale tensor; block rows must start at a block."""
    rows, cols = t.shape2d
    whole = t.scale.shape[0] == 1
    assert whole or before % t.block[0] == 0, "a block-scaled slice must start at a block"
    scale_before, (scale_rows, scale_cols) = (1 if whole else before // t.block[0]), t.scale.shape
    data = torch.cat([t.data.new_zeros(before, cols), t.data, t.data.new_zeros(2, cols)])
    scale = torch.cat([t.scale.new_ones(scale_before, scale_cols), t.scale, t.scale.new_ones(1, scale_cols)])
    return fp8dispatch.Fp8Tensor(data[before:before + rows], scale[scale_before:scale_before + scale_rows], t.block)


def _cancelling(m, k, n, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """a [m, k] and w [n, k] whose product sums, per row, +P, a small s and -P over K blocks 0, 1, 2:
    a is +2^14, integers in [-2, 2], -2^14 (repeating); w is 1 or 2, block 2 a copy of block 0.
    P ≤ 2^22: fp32 gets P + s and then s exactly, ~14 significant bits round P + s to a multiple of
    2^9 and return 0. Values are exact in e4m3 under pow2 scales and each block's own sum is exact
    even in 14 bits: only accumulation across K blocks is tested."""
    kblock = torch.arange(k) // 128 % 3
    small = torch.randint(-2, 3, (m, k), generator=gen).float()
    small[:, ::128] = 2.0
    a = torch.where(kblock == 0, 2.0**14, torch.where(kblock == 2, -(2.0**14), small))
    w = torch.randint(1, 3, (n, k), generator=gen).float()
    for start in range(256, k, 384):  # block 2 of each triple repeats block 0
        width = min(128, k - start)
        w[:, start:start + width] = w[:, start - 256:start - 256 + width]
    return a, w


def _small_integers(rows, cols, block, gen) -> torch.Tensor:
    """Integers in [-2, 2] (the block's first element ±2) times a per-block 2^j, j in -2..1.

    With pow2 scales the FP8 codes are these values exactly; every product is k·2^i with |k| ≤ 4
    and i in -4..2, so sums over K ≤ 512 stay below 2^24 units of 2^-4: exact in fp32, in any
    order, and within fp16's range.
    """
    index, first = _block_first(rows, cols, block)
    x = torch.randint(-2, 3, (rows, cols), generator=gen).float()
    x = torch.where(first, 2.0, x)
    return x * torch.exp2(torch.remainder(index, 4).float() - 2)


__all__ = ["Case", "OPS", "PATTERNS", "all_cases", "build", "by_id", "cases", "fp8_grid"]
