"""Check the fbgemm, torchao and torch backends against the reference, then time them for routing.

    python benchmarks/library_routing.py [--check] [--time] [--json PATH]

--check: quantize bit for bit (values and scales) and dequantize exactly against the reference,
matmul within 1 - 2Σxy/Σ(x²+y²) < 1e-3 of the reference's fp32 product, over tails, M from 1 to
8192 and special values; a case a backend declines must raise Unsupported. --time: median times
(fp8dispatch.timing.time_cuda, L2 flushed) of every available backend per op × recipe on a few
shapes, the evidence for the static priorities in docs/routing.md. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

import fp8dispatch
from fp8dispatch import Unsupported, registry
from fp8dispatch.timing import time_cuda

LIBRARIES = ("fbgemm", "torchao", "torch")
E4M3 = torch.float8_e4m3fn
MATMUL_TOL = 1e-3


def error(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2Σxy/Σ(x²+y²): 0 for equal tensors, scale-free, and NaN-poisoned on purpose."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


# --- inputs ---------------------------------------------------------------------------------


def special(name: str, rows: int, cols: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(rows * 7919 + cols)
    x = torch.randn(rows, cols, device="cuda", generator=g)
    if name == "randn":
        x *= torch.logspace(-3, 3, rows, device="cuda")[:, None]
    elif name == "zero":  # a zero row, a zero 128×128 block, a zero group
        x[0] = 0
        x[: min(128, rows), : min(128, cols)] = 0
        x[-1, -min(128, cols):] = 0
    elif name == "tiny":  # amax below 2^-9: FBGEMM's scale floor applies
        x[0] *= 1e-5
    elif name == "max_ties":  # ±448 sets scale 1; k+0.5 steps between e4m3 codes are ties
        x = torch.round(x * 8) / 8 + 0.0625
        x[:, 0] = 448.0
        x[:, 1] = -448.0
    elif name == "huge_range":
        x[:, ::7] *= 1e4
        x[:, 1::7] *= 1e-6
    elif name == "nonfinite":
        x[0, 3] = float("nan")
        x[min(1, rows - 1), 5] = float("inf")
        x[-1, -2] = float("-inf")
    return x.to(dtype)


def quantize_cases():
    shapes = [(256, 512), (100, 640), (3, 4096), (1024, 7168)]
    for granularity in ("tensor", "row", "group", "block"):
        for shape in shapes:
            for values in ("randn", "zero", "tiny", "max_ties", "huge_range", "nonfinite"):
                yield dict(granularity=granularity, shape=shape, values=values, dtype=torch.bfloat16, kw={})
        yield dict(granularity=granularity, shape=(256, 512), values="randn", dtype=torch.bfloat16,
                   kw={"scale_ub": 1.0})
        yield dict(granularity=granularity, shape=(256, 512), values="randn", dtype=torch.float32, kw={})
        yield dict(granularity=granularity, shape=(256, 512), values="randn", dtype=torch.bfloat16,
                   kw={"dtype": torch.float8_e5m2})
        yield dict(granularity=granularity, shape=(100, 200), values="randn", dtype=torch.bfloat16, kw={})


def matmul_cases():
    for recipe in ("block", "row", "tensor", "mixed"):
        for n, k in ((256, 512), (208, 640), (256, 400), (2112, 7168)):
            for m in (1, 2, 17, 100, 1024, 8192):
                yield dict(recipe=recipe, m=m, n=n, k=k, out_dtype=torch.bfloat16, bias=False)
        for out_dtype in (torch.float32, torch.float16):
            yield dict(recipe=recipe, m=100, n=256, k=512, out_dtype=out_dtype, bias=False)
        yield dict(recipe=recipe, m=100, n=256, k=512, out_dtype=torch.bfloat16, bias=True)
        yield dict(recipe=recipe, m=100, n=200, k=512, out_dtype=torch.bfloat16, bias=False)
        yield dict(recipe=recipe, m=100, n=256, k=512, out_dtype=torch.bfloat16, bias=False,
                   a_dtype=torch.float8_e5m2)


BLOCKS = {"block": ("group", "block"), "row": ("row", "row"), "tensor": ("tensor", "tensor"),
          "mixed": ("block", "block")}


def operands(case):
    g = torch.Generator(device="cuda").manual_seed(case["m"] + 31 * case["n"] + 7 * case["k"])
    x = torch.randn(case["m"], case["k"], device="cuda", generator=g)
    w = torch.randn(case["n"], case["k"], device="cuda", generator=g) * 0.05
    ga, gw = BLOCKS[case["recipe"]]
    a = fp8dispatch.quantize(x, ga, dtype=case.get("a_dtype", E4M3), backend="reference")
    b = fp8dispatch.quantize(w, gw, backend="reference").t()
    bias = torch.randn(case["n"], device="cuda", dtype=torch.bfloat16) if case["bias"] else None
    return a, b, bias


# --- check ----------------------------------------------------------------------------------


@contextlib.contextmanager
def one_autotune_config():
    """Correctness needs no tuning: Triton autotuners try only their first config meanwhile."""
    from triton.runtime import autotuner

    original = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, *a, **k: original(self, *a, **k)[:1]
    try:
        yield
    finally:
        autotuner.Autotuner.prune_configs = original


def run_case(fn):
    try:
        out = fn()
        torch.cuda.synchronize()
        return "ok", out
    except Unsupported as e:
        return "unsupported", str(e).splitlines()[-1].strip(" -")
    except Exception as e:  # noqa: BLE001 - a crash is a finding, reported with its type
        return "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check(backends: list[str]) -> list[dict]:
    results = []
    for case in quantize_cases():
        x = special(case["values"], *case["shape"], dtype=case["dtype"])
        ref = fp8dispatch.quantize(x, case["granularity"], backend="reference", **case["kw"])
        for name in backends:
            status, out = run_case(lambda: fp8dispatch.quantize(x, case["granularity"], backend=name, **case["kw"]))
            row = dict(op="quantize", backend=name, granularity=case["granularity"], shape=case["shape"],
                       values=case["values"], in_dtype=str(case["dtype"]), kw=str(case["kw"]), status=status)
            if status == "ok":
                data_diff = int((out.data.view(torch.uint8) != ref.data.view(torch.uint8)).sum())
                scale_diff = int((out.scale.view(torch.int32) != ref.scale.view(torch.int32)).sum())
                row.update(data_diff=data_diff, scale_diff=scale_diff,
                           status="pass" if data_diff == scale_diff == 0 else "FAIL")
            elif status != "ok":
                row["detail"] = out
            if status != "unsupported" or "does not implement" not in str(out):
                results.append(row)
            # dequantize the reference's result through the backend: exact or declined
            status, out = run_case(lambda: fp8dispatch.dequantize(ref, torch.bfloat16, backend=name))
            if status == "unsupported" and "does not implement" in str(out):
                continue
            row = dict(op="dequantize", backend=name, granularity=case["granularity"], shape=case["shape"],
                       values=case["values"], status=status)
            if status == "ok":
                expected = fp8dispatch.dequantize(ref, torch.bfloat16, backend="reference")
                same = torch.equal(out.view(torch.int16), expected.view(torch.int16))
                row["status"] = "pass" if same else "FAIL"
            else:
                row["detail"] = out
            results.append(row)
    for case in matmul_cases():
        a, b, bias = operands(case)
        expected = fp8dispatch.matmul(a, b, out_dtype=torch.float32, bias=bias, backend="reference")
        for name in backends:
            status, out = run_case(lambda: fp8dispatch.matmul(a, b, out_dtype=case["out_dtype"], bias=bias,
                                                              backend=name))
            if status == "unsupported" and "does not implement" in str(out):
                continue
            row = dict(op="matmul", backend=name, recipe=case["recipe"], m=case["m"], n=case["n"], k=case["k"],
                       out_dtype=str(case["out_dtype"]), bias=case["bias"], a_dtype=str(case.get("a_dtype", E4M3)),
                       status=status)
            if status == "ok":
                row["error"] = error(out.float(), expected)
                row["status"] = "pass" if row["error"] < MATMUL_TOL else "FAIL"
            else:
                row["detail"] = out
            results.append(row)
    return results


def summarize(results: list[dict]) -> None:
    groups: dict[tuple, dict] = {}
    for r in results:
        key = (r["backend"], r["op"], r.get("granularity") or r.get("recipe"))
        g = groups.setdefault(key, {"pass": 0, "FAIL": 0, "unsupported": 0, "ERROR": 0, "worst": 0.0, "fails": []})
        g[r["status"]] += 1
        g["worst"] = max(g["worst"], r.get("error", 0.0))
        if r["status"] in ("FAIL", "ERROR"):
            g["fails"].append(r)
    print("\n## Correctness against the reference\n")
    print("| backend | op | granularity / recipe | pass | FAIL | unsupported | ERROR | worst matmul error |")
    print("|---|---|---|---|---|---|---|---|")
    for (backend, op, detail), g in sorted(groups.items()):
        print(f"| {backend} | {op} | {detail} | {g['pass']} | {g['FAIL']} | {g['unsupported']} | {g['ERROR']} | "
              f"{g['worst']:.2e} |")
    print("\nFailures and errors (every one):")
    for g in groups.values():
        for r in g["fails"]:
            print("  ", {k: v for k, v in r.items() if k != "status"}, r["status"])
    print("\nDeclined (one example reason per backend × op × granularity/recipe):")
    seen = set()
    for r in results:
        key = (r["backend"], r["op"], r.get("granularity") or r.get("recipe"))
        if r["status"] == "unsupported" and key not in seen:
            seen.add(key)
            print(f"   {key}: {r['detail']}")


# --- discovery: torch blockwise limits the research left open --------------------------------


def discover() -> list[dict]:
    """Which M and K does cuBLASLt's 1×128 · 128×128 accept? (raw torch._scaled_mm, unpadded)."""
    import torch.nn.functional as F

    rows = []
    for m, n, k in [(1, 256, 512), (2, 256, 512), (4, 256, 512), (8, 256, 512), (12, 256, 512), (15, 256, 512),
                    (16, 256, 512), (17, 256, 512), (24, 256, 512), (100, 256, 512), (200, 256, 512),
                    (100, 256, 400), (17, 256, 1024)]:
        a = fp8dispatch.quantize(torch.randn(m, k, device="cuda"), "group", backend="reference")
        w = fp8dispatch.quantize(torch.randn(n, k, device="cuda"), "block", backend="reference")
        expected = fp8dispatch.matmul(a, w.t(), out_dtype=torch.float32, backend="reference")
        kb = w.scale.shape[1]

        def raw():
            if kb % 4 == 0:
                return torch._scaled_mm(a.data, w.data.t(), a.scale.t().contiguous().t(),
                                        w.scale.contiguous().t(), out_dtype=torch.bfloat16)
            padded = w.scale.new_zeros(w.scale.shape[0], -(-kb // 4) * 4)
            padded[:, :kb] = w.scale
            return F.scaled_mm(a.data, w.data.t(), a.scale.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                               padded.t(), F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)

        status, out = run_case(raw)
        rows.append(dict(m=m, n=n, k=k, status=status,
                         error=error(out.float(), expected) if status == "ok" else None,
                         detail=None if status == "ok" else out))
    print("\n## Raw torch 1×128 · 128×128 (no padding of M) on this GPU\n")
    for r in rows:
        err = "" if r["error"] is None else f"error {r['error']:.1e}"
        print(f"  M={r['m']:<4} N={r['n']} K={r['k']}: {r['status']} {err}{r['detail'] or ''}")
    return rows


# --- time -----------------------------------------------------------------------------------

MATMUL_SHAPES = [(16, 7168, 2048), (4096, 7168, 2048), (8192, 8192, 8192)]
QUANT_SHAPE = (4096, 7168)



def timings() -> list[dict]:
    rows = []
    names = [n for n in LIBRARIES if registry.probe_result(n) is None]
    for m, n, k in MATMUL_SHAPES:
        for recipe in ("block", "row", "tensor", "mixed"):
            a, b, _ = operands(dict(recipe=recipe, m=m, n=n, k=k, bias=False))
            for name in names:
                status, _ = run_case(lambda: fp8dispatch.matmul(a, b, backend=name))
                if status != "ok":
                    continue
                fn = registry.get_backend(name).matmul
                fn(a, b, torch.bfloat16, None)  # first call: Triton autotuning, outside the timing
                t = time_cuda(lambda: fn(a, b, torch.bfloat16, None))
                rows.append(dict(op="matmul", recipe=recipe, backend=name, m=m, n=n, k=k, median_s=t.median_s,
                                 spread=t.spread, tflops=2 * m * n * k / t.median_s / 1e12))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        t = time_cuda(lambda: x @ w)
        rows.append(dict(op="matmul", recipe="bf16 torch.matmul", backend="-", m=m, n=n, k=k, median_s=t.median_s,
                         spread=t.spread, tflops=2 * m * n * k / t.median_s / 1e12))
    rows_, cols = QUANT_SHAPE
    x = torch.randn(rows_, cols, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: x.clone())
    rows.append(dict(op="copy", recipe="bf16 clone", backend="-", m=rows_, n=cols, k=0, median_s=t.median_s,
                     spread=t.spread, gbps=4 * x.numel() / t.median_s / 1e9))
    for granularity in ("tensor", "row", "group", "block"):
        ref = fp8dispatch.quantize(x, granularity, backend="reference")
        for name in names + ["reference"]:
            status, _ = run_case(lambda: fp8dispatch.quantize(x, granularity, backend=name))
            if status == "ok":
                fn = registry.get_backend(name).quantize
                t = time_cuda(lambda: fn(x, ref.block, E4M3, None, None, False))
                rows.append(dict(op="quantize", recipe=granularity, backend=name, m=rows_, n=cols, k=0,
                                 median_s=t.median_s, spread=t.spread, gbps=3 * x.numel() / t.median_s / 1e9))
            status, _ = run_case(lambda: fp8dispatch.dequantize(ref, backend=name))
            if status == "ok":
                fn = registry.get_backend(name).dequantize
                t = time_cuda(lambda: fn(ref.data, ref.scale, ref.block, torch.bfloat16))
                rows.append(dict(op="dequantize", recipe=granularity, backend=name, m=rows_, n=cols, k=0,
                                 median_s=t.median_s, spread=t.spread, gbps=3 * x.numel() / t.median_s / 1e9))
    return rows


def print_timings(rows: list[dict]) -> None:
    print("\n## Times on this GPU (median of 50 L2-flushed runs)\n")
    print("| op | recipe / granularity | M×N×K (or rows×cols) | backend | median µs | spread | TFLOPS or GB/s | rank |")
    print("|---|---|---|---|---|---|---|---|")
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["op"], r["recipe"], r["m"], r["n"], r["k"]), []).append(r)
    for key, group in keyed.items():
        group.sort(key=lambda r: r["median_s"])
        for rank, r in enumerate(group, 1):
            shape = f"{r['m']}×{r['n']}×{r['k']}" if r["k"] else f"{r['m']}×{r['n']}"
            rate = f"{r['tflops']:.0f} TFLOPS" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
            print(f"| {r['op']} | {r['recipe']} | {shape} | {r['backend']} | {r['median_s'] * 1e6:.1f} | "
                  f"{r['spread']:.2f} | {rate} | {rank} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness sweep against the reference")
    parser.add_argument("--time", action="store_true", help="time every available backend")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("library_routing: needs a CUDA GPU; on this machine every library backend reports why it "
              "cannot serve (fp8dispatch info)", file=sys.stderr)
        return 2
    if not (args.check or args.time):
        args.check = args.time = True
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "probes": {n: registry.probe_result(n) for n in LIBRARIES},
                 "versions": {n: registry.get_backend(n).version() for n in LIBRARIES}}
    print("probes:", out["probes"])
    backends = [n for n in LIBRARIES if out["probes"][n] is None]
    start = time.time()
    if args.check:
        out["discovery"] = discover()
        with one_autotune_config():
            out["check"] = check(backends)
        summarize(out["check"])
        print(f"\n(check took {time.time() - start:.0f} s)")
    if args.time:
        start = time.time()
        out["timings"] = timings()
        print_timings(out["timings"])
        print(f"\n(timing took {time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if any(r["status"] in ("FAIL", "ERROR") for r in out.get("check", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
