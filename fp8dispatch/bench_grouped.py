"""Grouped points of `fp8dispatch bench`: DeepSeek-V3's routed experts through `grouped_linear`.

A point is `Point("grouped", "<recipe>:<layout>:g<G>:<counts>", Shape(rows, N, K))`: contiguous,
`rows` tokens over G experts (`uniform`, or `skewed` as a router sends them); masked, `rows` is
max_m and each expert holds `uniform` max_m or `skewed` 0..max_m valid rows. Each backend's row
times the grouped GEMM on FP8 operands (x already in 1×128 groups or rows, as the matmul op), and
two baselines are measured in the same run: bf16 grouped (`torch._grouped_mm` where this torch
runs it, else a bf16 loop over experts) and the per-expert loop through `fp8dispatch.linear`, the
thing a grouped GEMM replaces. Rows give TFLOPS on the rows computed and, for masked points,
GB/s on the FP8 weight bytes read (decode is bandwidth-bound).
"""

from __future__ import annotations

import torch

import fp8dispatch
from fp8dispatch import registry, tuning
from fp8dispatch.errors import Fp8DispatchError, Fp8ValueError
from fp8dispatch.grouped import GROUPED_RECIPES, quantize_grouped, skewed_counts
from fp8dispatch.grouped_api import plan_problem
from fp8dispatch.numerics import relative_error
from fp8dispatch.tensor import Fp8Tensor

BF16 = torch.bfloat16
# DeepSeek-V3's expert projections (N, K): gate and up fused, down.
EXPERT_NK = ((4096, 7168), (7168, 2048))
# (layout, G, rows, counts): contiguous rows are all tokens, masked rows are max_m per expert.
GRID = (
    ("contiguous", 8, 8 * 4096, "uniform"),  # DeepGEMM's contiguous figure: 8 × 4096
    ("contiguous", 8, 8 * 512, "skewed"),
    ("contiguous", 32, 32 * 128, "uniform"),  # the ≥ 5× the fd.linear loop target
    ("contiguous", 32, 32 * 1024, "skewed"),
    ("contiguous", 256, 256 * 32, "skewed"),  # 1024 tokens × 8 routed experts, 1 to thousands each
    ("masked", 256, 64, "uniform"),  # decode: the bandwidth target
    ("masked", 256, 64, "skewed"),
    ("masked", 32, 64, "skewed"),
)
# `fp8dispatch bench --quick` on a CPU checks the plumbing: a grid that finishes in seconds.
SMALL = dict(nk=((256, 512),), grid=(("contiguous", 4, 64, "skewed"), ("masked", 4, 8, "skewed")))
LOOP, BF16_GROUPED = "fd.linear loop", "bf16 grouped"


def points(point, shape, recipes=("block",), nk=EXPERT_NK, grid=GRID) -> list:
    """The grid as `point(op, variant, shape(rows, n, k))`s (bench's Point and Shape)."""
    return [point("grouped", f"{recipe}:{layout}:g{g}:{counts}", shape(rows, n, k))
            for recipe in recipes if recipe in GROUPED_RECIPES for n, k in nk for layout, g, rows, counts in grid]


def parse(variant: str) -> tuple[str, str, int, str]:
    try:
        recipe, layout, g, counts = variant.split(":")
        groups = int(g.removeprefix("g"))
    except ValueError:
        raise Fp8ValueError(f"variant: expected recipe:layout:g<G>:counts, got {variant!r}") from None
    if recipe not in GROUPED_RECIPES or layout not in ("contiguous", "masked") or counts not in ("uniform", "skewed"):
        raise Fp8ValueError(f"variant: expected (block|row):(contiguous|masked):g<G>:(uniform|skewed), got {variant!r}")
    return recipe, layout, groups, counts


class GroupedOperands:
    """x (bf16 and FP8), w (bf16 and FP8), offsets or masked_m, and the reference product for a point."""

    def __init__(self, point, device: torch.device, seed: int = 0):
        recipe, layout, groups, counts = parse(point.variant)
        s = point.shape
        gen = torch.Generator().manual_seed(seed)
        self.masked = layout == "masked"
        if self.masked:
            valid = [s.m] * groups if counts == "uniform" else \
                torch.randint(0, s.m + 1, (groups,), generator=gen).tolist()
            rows = groups * s.m
        else:
            valid = [s.m // groups] * groups if counts == "uniform" else list(skewed_counts(groups, s.m, seed))
            valid[-1] += s.m - sum(valid)
            rows = s.m
        self.valid, self.groups = valid, groups
        dgen = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(rows, s.k, device=device, dtype=BF16, generator=dgen)
        self.w = torch.randn(groups, s.n, s.k, device=device, dtype=BF16, generator=dgen) / s.k**0.5
        ref = "reference"
        q = fp8dispatch.quantize(self.x, "group" if recipe == "block" else "row", backend=ref)
        self.wq = quantize_grouped(self.w, recipe, backend=ref)
        if self.masked:
            self.x = self.x.view(groups, s.m, s.k)
            self.xq = Fp8Tensor(q.data.view(groups, s.m, s.k), q.scale, q.block)
            self.offsets, self.masked_m = None, torch.tensor(valid, dtype=torch.int32, device=device)
        else:
            self.xq = q
            bounds = [0, *torch.tensor(valid).cumsum(0).tolist()]
            self.offsets, self.masked_m = torch.tensor(bounds, device=device), None
        self.bounds = [(g * s.m, g * s.m + v) for g, v in enumerate(valid)] if self.masked else \
            list(zip(bounds[:-1], bounds[1:]))
        self.product = registry.get_backend(ref).grouped_linear(self.xq, self.wq, self.offsets, self.masked_m,
                                                                 torch.float32)
        computed = sum(valid)
        weight_bytes = sum(1 for v in valid if v) * s.n * s.k  # experts with rows read their weight once
        self.work = (2 * computed * s.n * s.k, weight_bytes if self.masked else None)


def measure(point, backends: list[str], settings, timed_row, unsupported_row) -> list[dict]:
    """Rows for one grouped point: the two baselines, each backend (or its reasons), auto. bench
    passes its row makers, so rows have one format."""
    ops = GroupedOperands(point, settings.device)
    problem = plan_problem(ops.xq, ops.wq, ops.offsets, ops.masked_m, None, None, BF16, "auto")
    key = tuning.key_of(problem)  # what `fp8dispatch tune` ranks the backend rows by
    check = lambda out: relative_error(out, ops.product)  # noqa: E731
    rows, base, loop_s = [], None, None
    if settings.baselines:
        how, fn = _bf16_grouped(ops)
        base = timed_row(point, BF16_GROUPED, fn, None, ops.work, settings, None)
        base["note"] = how
        loop = timed_row(point, LOOP, _linear_loop(ops), check, ops.work, settings, base)
        for row in (base, loop):
            if row["status"] == "ok":
                row["status"] = "baseline"
        rows += [base, loop]
        loop_s = loop.get("median_s")
    for name in backends:
        backend = registry.get_backend(name)
        why = registry.reasons(backend, problem)
        if why:
            rows.append(unsupported_row(point, name, status="unsupported", note="; ".join(why)))
            continue
        run = backend.grouped_linear
        fn = lambda run=run: run(ops.xq, ops.wq, ops.offsets, ops.masked_m, BF16, None)  # noqa: E731
        rows.append(_with_loop(timed_row(point, name, fn, check, ops.work, settings, base, key), settings, loop_s))
    if settings.auto:
        try:
            chosen = registry.choose(problem).name
        except Fp8DispatchError as e:
            chosen = f"none ({type(e).__name__})"
        fn = lambda: fp8dispatch.grouped_linear(ops.xq, ops.wq, ops.offsets, masked_m=ops.masked_m)  # noqa: E731
        rows.append(_with_loop(timed_row(point, "auto", fn, check, ops.work, settings, base, key, chosen),
                               settings, loop_s))
    return rows


def _with_loop(row: dict, settings, loop_s) -> dict:
    if settings.baselines and loop_s and row.get("median_s"):
        row["vs_loop"] = loop_s / row["median_s"]
    return row


def _linear_loop(ops: GroupedOperands):
    """One `fp8dispatch.linear` per expert with rows, on slices made beforehand; masked padding stays zero."""
    n = ops.wq.shape[1]
    xq = Fp8Tensor(ops.xq.data.reshape(-1, ops.xq.shape[-1]), ops.xq.scale, ops.xq.block)
    work = [(g, a, b, Fp8Tensor(xq.data[a:b], xq.scale[a:b], xq.block), ops.wq.expert(g))
            for g, (a, b) in enumerate(ops.bounds) if b > a]

    def loop():
        out = torch.zeros(xq.data.shape[0], n, dtype=BF16, device=xq.data.device)
        for g, a, b, rows, w in work:
            out[a:b] = fp8dispatch.linear(rows, w, out_dtype=BF16)
        return out.view(ops.groups, -1, n) if ops.masked else out
    return loop


def _bf16_grouped(ops: GroupedOperands):
    """`torch._grouped_mm` on bf16 where it runs here, else the bf16 loop over experts."""
    x, wt = ops.x, ops.w.transpose(-2, -1)
    if ops.masked:
        def grouped():
            return torch._grouped_mm(x, wt, out_dtype=BF16)
    else:
        ends = ops.offsets[1:].to(torch.int32)

        def grouped():
            return torch._grouped_mm(x, wt, offs=ends, out_dtype=BF16)
    try:
        grouped()
        return "torch._grouped_mm", grouped
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    x2d, n = x.reshape(-1, x.shape[-1]), ops.w.shape[1]
    work = [(g, a, b) for g, (a, b) in enumerate(ops.bounds) if b > a]

    def loop():
        out = torch.zeros(x2d.shape[0], n, dtype=BF16, device=x.device)
        for g, a, b in work:
            out[a:b] = x2d[a:b] @ ops.w[g].t()
        return out
    return "a bf16 loop over experts (torch._grouped_mm does not run here)", loop
