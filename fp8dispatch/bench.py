"""The measuring core of `bench` and `tune`: shape sets, one timed and checked row per backend.

A point is an op on a shape: `matmul` (the GEMM alone on FP8 operands), `quantize` (a bf16
activation [M, K] by one granularity) or `linear` (quantize the activation, then the GEMM against
an FP8 weight: what a model pays per layer). Every backend that can run the point gets a row with
the median and spread of its time, its throughput, its speed against a bf16 baseline measured in
the same run (torch.matmul for GEMMs, a copy for quantize), and its error against the reference
backend, so a fast but wrong backend is reported as wrong, never as fast. `auto` gets a row too.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

import fp8dispatch
from fp8dispatch import bench_grouped, planning, registry, tuning
from fp8dispatch.blocks import GRANULARITIES, RECIPES, block_for, recipe_blocks, scale_shape
from fp8dispatch.errors import Fp8DispatchError, Fp8ValueError
from fp8dispatch.grid import CPU_QUICK_NK, DEEPSEEK_M, DEEPSEEK_NK, OPS, QUICK_NK, SQUARES
from fp8dispatch.numerics import ERROR_BOUND, relative_error
from fp8dispatch.problem import matmul_problem_of, quantize_problem
from fp8dispatch.tensor import Fp8Tensor
from fp8dispatch.timing import Timing, capture, time_cuda, time_host_per_call

E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16


@dataclass(frozen=True, order=True)
class Shape:
    m: int
    n: int
    k: int

    @property
    def label(self) -> str:
        """MxNxK; a quantize point (an activation [M, K], n = 0) is MxK."""
        return f"{self.m}x{self.n}x{self.k}" if self.n else f"{self.m}x{self.k}"


# --- shape sets ---------------------------------------------------------------------------------


def parse_shapes(spec: str, ms: Iterable[int] = DEEPSEEK_M) -> list[Shape]:
    """Shapes from a spec: `deepseek`, `squares`, `MxNxK`, `NxK` (× every M), `@file` of those.

    Items are separated by commas or whitespace; `#` starts a comment in a file.
    """
    ms = tuple(ms)
    shapes: list[Shape] = []
    for item in spec.replace(",", " ").split():
        if item.startswith("@"):
            path = Path(item[1:])
            if not path.is_file():
                raise Fp8ValueError(f"shapes: expected a readable file after '@', got {item!r}")
            text = " ".join(line.split("#")[0] for line in path.read_text().splitlines())
            shapes += parse_shapes(text, ms)
        elif item == "deepseek":
            shapes += [Shape(m, n, k) for n, k in DEEPSEEK_NK for m in ms]
        elif item == "quick":
            shapes += [Shape(m, n, k) for n, k in QUICK_NK for m in ms]
        elif item == "cpu-quick":
            shapes += [Shape(m, n, k) for n, k in CPU_QUICK_NK for m in ms]
        elif item == "squares":
            shapes += [Shape(s, s, s) for s in SQUARES]
        else:
            dims = item.lower().split("x")
            if len(dims) not in (2, 3) or not all(d.isdigit() and int(d) > 0 for d in dims):
                raise Fp8ValueError(f"shapes: expected deepseek, squares, MxNxK, NxK or @file, got {item!r}")
            if len(dims) == 3:
                shapes.append(Shape(*map(int, dims)))
            else:
                shapes += [Shape(m, int(dims[0]), int(dims[1])) for m in ms]
    return list(dict.fromkeys(shapes))


@dataclass(frozen=True)
class Point:
    """One op on one shape: `variant` is the recipe (matmul, linear) or granularity (quantize)."""

    op: str
    variant: str
    shape: Shape


def points(shapes: list[Shape], ops=OPS, recipes=RECIPES, granularities=GRANULARITIES) -> list[Point]:
    """The grid; quantize is measured once per activation [M, K], whatever the N."""
    out = []
    for op in ops:
        if op == "quantize":
            acts = dict.fromkeys(Shape(s.m, 0, s.k) for s in shapes)
            out += [Point(op, g, s) for s in acts for g in granularities]
        elif op in ("matmul", "linear"):
            out += [Point(op, r, s) for s in shapes for r in recipes]
        elif op == "grouped":  # DeepSeek-V3's experts; with the CPU's quick shapes, a small stand-in
            small = bool(shapes) and all((s.n, s.k) in CPU_QUICK_NK for s in shapes)
            out += bench_grouped.points(Point, Shape, recipes, **(bench_grouped.SMALL if small else {}))
        else:
            raise Fp8ValueError(f"ops: expected some of {', '.join(OPS)}, got {op!r}")
    return out


# --- errors and timing --------------------------------------------------------------------------


def time_host(fn: Callable[[], object], *, warmup: int = 2, runs: int = 10) -> Timing:
    """Wall-clock timing for CPU tensors: only good for checking the plumbing, not for routing."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), deciles[0], deciles[-1], runs)


def require_device(name: str | None) -> torch.device:
    """The device to measure on; no GPU is a clear error unless the CPU is asked for by name."""
    if name is None or name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Fp8DispatchError(
                "bench and tune measure GPU kernels: torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}). Run on a machine "
                "with an NVIDIA GPU, or pass --device cpu to check the plumbing with the reference.")
        return torch.device(name or "cuda")
    return torch.device(name)


# --- operands -----------------------------------------------------------------------------------


class Operands:
    """Random inputs and their reference results for one shape, made once and shared by rows."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.shape, self.device = shape, device
        self.x = torch.randn(shape.m, shape.k, device=device, dtype=BF16, generator=gen)
        self.w = (torch.randn(max(shape.n, 1), shape.k, device=device, dtype=BF16, generator=gen)
                  / shape.k**0.5)
        self._cache: dict = {}

    def reference(self):
        return registry.get_backend("reference")

    def quantized(self, recipe: str) -> tuple[Fp8Tensor, Fp8Tensor]:
        """(a [M, K], b = wq.t() [K, N]) quantized by the reference, the recipe's blocks."""
        if ("q", recipe) not in self._cache:
            a_block, b_block = recipe_blocks(recipe, self.shape.m, self.shape.k, self.shape.n)
            w_block = b_block[::-1]  # the weight is stored [N, K]
            ref = self.reference()
            a = Fp8Tensor(*ref.quantize(self.x, a_block, E4M3), a_block)
            w = Fp8Tensor(*ref.quantize(self.w, w_block, E4M3), w_block)
            self._cache[("q", recipe)] = (a, w.t())
        return self._cache[("q", recipe)]

    def product(self, recipe: str) -> torch.Tensor:
        """The reference's fp32 product of the quantized operands."""
        if ("p", recipe) not in self._cache:
            a, b = self.quantized(recipe)
            self._cache[("p", recipe)] = self.reference().matmul(a, b, torch.float32)
        return self._cache[("p", recipe)]

    def dequantized(self, granularity: str) -> torch.Tensor:
        if ("d", granularity) not in self._cache:
            block = block_for(granularity, self.shape.m, self.shape.k)
            data, scale = self.reference().quantize(self.x, block, E4M3)
            self._cache[("d", granularity)] = Fp8Tensor(data, scale, block).dequantize(torch.float32)
        return self._cache[("d", granularity)]


# --- one point ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    device: torch.device
    warmup: int = 5
    runs: int = 50
    auto: bool = True
    baselines: bool = True
    graphs: bool = True

    def time(self, fn: Callable[[], object]) -> tuple[Timing, str]:
        """(timing, how): on a GPU the warmed-up call replayed from a CUDA graph when it captures.

        A graph replay costs the host ~10 µs, less than the L2 flush before it, so the GPU never
        waits for Python and small kernels are timed as kernels; without a graph, a call whose
        host side takes longer than the flush (Triton launches, `auto`) would be timed partly as
        host time. Dispatch overhead is measured apart (benchmarks/dispatch_overhead.py).
        """
        if self.device.type != "cuda":
            return time_host(fn, warmup=min(self.warmup, 2), runs=min(self.runs, 10)), "host"
        for _ in range(self.warmup):  # autotuners and lazy compilation finish before any capture
            fn()
        how = "eager"
        if self.graphs:
            try:
                replay = capture(fn)
            except Exception as e:  # noqa: BLE001 - a backend that cannot be captured is timed eagerly
                how = f"eager (capture failed: {type(e).__name__})"
            else:
                return time_cuda(replay, warmup=2, runs=self.runs), "graph"
        return time_cuda(fn, warmup=1, runs=self.runs), how


def row_id(row: dict) -> tuple:
    """What makes a row unique in a result file (for resuming and merging)."""
    return row["op"], row["variant"], row["m"], row["n"], row["k"], row["backend"]


def measure(point: Point, backends: list[str], settings: Settings, operands: Operands | None = None) -> list[dict]:
    """Rows for one point: each named backend (or the reasons it cannot run), auto, the baseline."""
    if point.op == "grouped":
        return bench_grouped.measure(point, backends, settings, _timed_row, _row)
    operands = operands or Operands(point.shape, settings.device)
    make = {"matmul": _matmul_cases, "quantize": _quantize_cases, "linear": _linear_cases}[point.op]
    cases, baseline = make(point, operands, settings.device)
    rows = []
    base_time = None
    if settings.baselines:
        label, fn, work = baseline
        base_time = _timed_row(point, label, fn, None, work, settings, None)
        if base_time["status"] == "ok":
            base_time.update(status="baseline", error=None)
        rows.append(base_time)
    for name in backends:
        case = cases.get(name)
        if case is None:
            continue
        if isinstance(case, str):
            rows.append(_row(point, name, status="unsupported", note=case))
            continue
        fn, check, work, key, chosen = case
        rows.append(_timed_row(point, name, fn, check, work, settings, base_time, key, chosen))
    if settings.auto and "auto" in cases:
        fn, check, work, key, chosen = cases["auto"]
        rows.append(_timed_row(point, "auto", fn, check, work, settings, base_time, key, chosen))
    return rows


def _row(point: Point, backend: str, **fields) -> dict:
    s = point.shape
    return {"op": point.op, "variant": point.variant, "m": s.m, "n": s.n, "k": s.k, "backend": backend, **fields}


def _timed_row(point, name, fn, check, work, settings, base_row, key=None, chosen=None) -> dict:
    flops, nbytes = work
    try:
        out = fn()
        error = check(out) if check is not None else 0.0
        timing, how = settings.time(fn)
    except Exception as e:  # noqa: BLE001 - one failing backend must not end the run
        return _row(point, name, status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    ok = error < ERROR_BOUND  # the matmul bound, for every op (quantize: on dequantized values)
    row = _row(point, name, status="ok" if ok else "wrong", ok=ok, median_s=timing.median_s,
               p10_s=timing.p10_s, p90_s=timing.p90_s, runs=timing.runs, spread=timing.spread, timing=how,
               error=error,
               tflops=flops / timing.median_s / 1e12 if flops else None,
               gbps=nbytes / timing.median_s / 1e9 if nbytes else None)
    if settings.device.type == "cuda":
        row["host_s"] = time_host_per_call(fn)
    if key is not None:
        row["key"] = list(key)
    if chosen is not None:
        row["chosen"] = chosen
    if base_row is not None and base_row.get("median_s"):
        row["baseline"] = base_row["backend"]
        row["speedup"] = base_row["median_s"] / timing.median_s
    if not ok:
        row["note"] = f"error {error:.3g} >= {ERROR_BOUND:g}: not a valid result"
    return row


def _reasons(problem) -> dict[str, str | None]:
    """Per backend: None if it can run `problem`, else its reasons joined."""
    out = {}
    for backend in registry.all_backends():
        why = registry.reasons(backend, problem)
        out[backend.name] = "; ".join(why) if why else None
    return out


def _matmul_cases(point, ops: Operands, device):
    s = point.shape
    a, b = ops.quantized(point.variant)
    ref = ops.product(point.variant)
    problem = matmul_problem_of(a, b)
    key = tuning.key_of(problem)
    check = lambda out: relative_error(out, ref)  # noqa: E731
    work = (2 * s.m * s.n * s.k, None)
    cases: dict = {}
    for name, why in _reasons(problem).items():
        if why:
            cases[name] = why
            continue
        run = planning.plan_matmul(a, b, backend=name).run  # what a call pays: the bound runner
        cases[name] = ((lambda run=run: run(a, b, None)), check, work, key, None)
    chosen = _chosen(problem)
    cases["auto"] = ((lambda: fp8dispatch.matmul(a, b)), check, work, key, chosen)
    x, wt = ops.x, ops.w.t()
    baseline = ("bf16 matmul", lambda: torch.matmul(x, wt), work)
    return cases, baseline


def _quantize_cases(point, ops: Operands, device):
    s = point.shape
    block = block_for(point.variant, s.m, s.k)
    problem = quantize_problem(device, (s.m, s.k), block)
    key = tuning.key_of(problem)
    ref = ops.dequantized(point.variant)
    x = ops.x
    check = lambda out: relative_error(Fp8Tensor(out[0], out[1], block).dequantize(torch.float32), ref)  # noqa: E731
    work = (None, s.m * s.k * 3 + 4 * math.prod(scale_shape((s.m, s.k), block)))  # bf16 in, fp8 + fp32 scales out
    cases: dict = {}
    for name, why in _reasons(problem).items():
        fn = registry.get_backend(name).quantize
        cases[name] = why if why else ((lambda fn=fn: fn(x, block, E4M3, None, None, False)), check, work, key, None)
    chosen = _chosen(problem)
    cases["auto"] = ((lambda: tuple(fp8dispatch.quantize(x, point.variant))[:2]), check, work, key, chosen)
    copy = torch.empty_like(x)
    baseline = ("bf16 copy", lambda: copy.copy_(x), (None, s.m * s.k * 4))
    return cases, baseline


def _linear_cases(point, ops: Operands, device):
    """Quantize the bf16 activation then multiply by the FP8 weight, one backend for both."""
    s = point.shape
    a_block, _ = recipe_blocks(point.variant, s.m, s.k, s.n)
    a, b = ops.quantized(point.variant)
    ref = ops.product(point.variant)
    x = ops.x
    mm_problem = matmul_problem_of(a, b)
    q_problem = quantize_problem(device, (s.m, s.k), a_block)
    check = lambda out: relative_error(out, ref)  # noqa: E731
    work = (2 * s.m * s.n * s.k, None)
    cases: dict = {}
    q_why, mm_why = _reasons(q_problem), _reasons(mm_problem)
    for backend in registry.all_backends():
        why = [w for w in (q_why[backend.name], mm_why[backend.name]) if w]
        if why:
            cases[backend.name] = "; ".join(why)
            continue

        def run(backend=backend):
            data, scale = backend.quantize(x, a_block, E4M3, None, None, False)
            return backend.matmul(Fp8Tensor._trusted(data, scale, a_block), b, BF16, None)

        cases[backend.name] = (run, check, work, None, None)
    chosen = f"quantize {_chosen(q_problem)}, matmul {_chosen(mm_problem)}"
    w_fp8 = b.t()
    cases["auto"] = ((lambda: fp8dispatch.linear(x, w_fp8, out_dtype=BF16)), check, work, None, chosen)
    wt = ops.w.t()
    baseline = ("bf16 matmul", lambda: torch.matmul(x, wt), work)
    return cases, baseline


def _chosen(problem) -> str:
    try:
        return registry.choose(problem).name
    except Fp8DispatchError as e:
        return f"none ({type(e).__name__})"


# --- whole runs -----------------------------------------------------------------------------


def available_backends(names: Iterable[str] | None = None) -> list[str]:
    """Backends whose probe passes (restricted to `names`); unknown names raise UnknownBackend."""
    wanted = [registry.get_backend(n).name for n in names] if names else registry.backend_names()
    return [n for n in wanted if registry.probe_result(n) is None]


def run(grid: list[Point], backends: list[str], settings: Settings, *, done: set | None = None,
        on_row: Callable[[dict], None] | None = None,
        progress: Callable[[int, int, Point], None] | None = None) -> list[dict]:
    """Measure every point; `done` holds row ids to skip (a resumed run)."""
    done = done or set()
    rows: list[dict] = []
    cache: dict[Shape, Operands] = {}
    for i, point in enumerate(grid):
        if progress:
            progress(i, len(grid), point)
        base = _baseline_name(point.op)
        todo = [n for n in backends if row_id(_row(point, n)) not in done]
        want_auto = settings.auto and row_id(_row(point, "auto")) not in done
        want_base = settings.baselines and row_id(_row(point, base)) not in done
        if not todo and not want_auto and not want_base:
            continue
        full = Shape(point.shape.m, point.shape.n, point.shape.k)
        if full not in cache:
            cache.clear()  # one shape's operands at a time: the large ones take GBs
            cache[full] = Operands(full, settings.device) if point.op != "grouped" else None
        step = Settings(settings.device, settings.warmup, settings.runs, want_auto, want_base, settings.graphs)
        for row in measure(point, todo, step, cache[full]):
            rows.append(row)
            if on_row:
                on_row(row)
    if progress:
        progress(len(grid), len(grid), None)
    return rows


def _baseline_name(op: str) -> str:
    return {"quantize": "bf16 copy", "grouped": bench_grouped.BF16_GROUPED}.get(op, "bf16 matmul")


# --- result files -----------------------------------------------------------------------------

RESULTS_FORMAT = "fp8dispatch-bench"


def save_results(path: Path, env: dict, rows: list[dict], command: str = "") -> None:
    """Write rows and the environment they were measured in, atomically (a run may be resumed)."""
    import json
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": RESULTS_FORMAT, "environment": env, "command": command, "rows": rows}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def save_table(path: Path, table: dict) -> None:
    """Merge a routing table (`tuning.build_table`) into the document at `path`: entries of other
    shapes and GPUs stay; a file that cannot be read is replaced, and says so."""
    try:
        document = tuning.read(path) if Path(path).is_file() else None
    except (OSError, tuning.InvalidTable) as e:
        print(f"replacing unreadable table {path}: {e}", file=sys.stderr)
        document = None
    tuning.write(path, tuning.merge(document, table))


def load_results(paths: Iterable[Path]) -> tuple[dict | None, list[dict]]:
    """Merge result files of one environment; a later file's row replaces an earlier one's."""
    import json

    env, merged = None, {}
    for path in paths:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise Fp8ValueError(f"results: cannot read {path}: {e}") from None
        if not isinstance(document, dict) or document.get("format") != RESULTS_FORMAT:
            raise Fp8ValueError(f"results: {path} is not an fp8dispatch bench result file")
        if env is not None and document["environment"] != env:
            raise Fp8ValueError(f"results: {path} was measured in another environment "
                                f"({document['environment']}) than the files before it ({env})")
        env = document["environment"]
        for row in document["rows"]:
            merged[row_id(row)] = row
    return env, list(merged.values())
