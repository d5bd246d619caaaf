"""The triton backend on a GPU: bit-exactness against the reference, then speed against its peers.

    python benchmarks/triton_kernels.py --out docs/results/h100          # correctness + benchmark
    python benchmarks/triton_kernels.py --only correctness               # or: bench, sweep

Peers run in the same process where installed: FBGEMM (`f8f8bf16_groupwise`,
`quantize_fp8_per_tensor`, `quantize_fp8_per_row`), `torch._scaled_mm`, bf16 `torch.matmul`, and a
bf16 copy for the bandwidth ceiling. Every figure is a median of `fp8dispatch.timing.time_cuda`
(L2 flushed between runs). Writes triton-kernels.json and triton-kernels.md under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback

import torch

from fp8dispatch.backends import reference
from fp8dispatch.backends.triton import kernels
from fp8dispatch.backends.triton import matmul as mm
from fp8dispatch.backends.triton.quantize import quantize_tensorwise
from fp8dispatch.blocks import block_for
from fp8dispatch.numerics import ERROR_BOUND, relative_error, special_values
from fp8dispatch.tensor import Fp8Tensor
from fp8dispatch.timing import time_cuda, time_graph

E4M3 = torch.float8_e4m3fn
DEVICE = "cuda"
DEEPSEEK = [(2112, 7168), (7168, 2048), (24576, 1536), (7168, 16384), (4096, 7168), (32768, 512)]
SMALL_M = [1, 16, 64, 128, 512]
QUANTIZE_SHAPES = [(1, 128), (7, 300), (513, 4096), (4096, 7168)]
MATMUL_SHAPES = [(m, n, k) for m in (1, 7, 64, 100, 513, 4096, 8192) for n, k in ((2112, 7168), (1000, 1000))]
GRANULARITIES = ("tensor", "row", "group", "block")


# --- correctness ----------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def check_quantize(log: list) -> None:
    backend = kernels()
    shapes = QUANTIZE_SHAPES
    cases = 0
    failures = []
    # Every option with bf16 -> e4m3fn; the other input and output dtypes with computed scales
    # (each combination compiles its own kernels, about a second each).
    combos = [(torch.bfloat16, E4M3, ({}, {"pow2_scale": True}, {"scale_ub": 1200.0}, {"user": True})),
              (torch.float32, E4M3, ({},)), (torch.float16, torch.float8_e5m2, ({}, {"pow2_scale": True})),
              (torch.float32, torch.float8_e5m2, ({},))]
    for rows, cols in shapes:
        for in_dtype, fp8, options in combos:
            x = special_values(rows, cols, in_dtype, seed=rows * 7919 + cols, device=DEVICE)
            if True:
                for gran in GRANULARITIES:
                    block = block_for(gran, rows, cols, 128)
                    for kw in options:
                        kw = dict(kw)
                        if kw.pop("user", False):
                            kw["scale"] = reference.quantize(x, block, fp8)[1] * 0.75  # forces saturation
                        backend.quantize(x, block, fp8, **kw)  # the first call compiles; the second
                        got = backend.quantize(x, block, fp8, **kw)  # takes the cached launcher
                        want = reference.quantize(x, block, fp8, **kw)
                        cases += 1
                        same = all(torch.equal(_bits(g), _bits(w)) for g, w in zip(got, want))
                        deq = backend.dequantize(got[0], got[1], block, torch.bfloat16)
                        deq_ref = reference.dequantize(want[0], want[1], block, torch.bfloat16)
                        same_deq = torch.equal(deq.view(torch.int16), deq_ref.view(torch.int16))
                        if not (same and same_deq):
                            bad = int((_bits(got[0]) != _bits(want[0])).sum())
                            failures.append(f"{rows}x{cols} {in_dtype} {fp8} {gran} {sorted(kw)}: "
                                            f"{bad} codes differ, dequantize equal: {same_deq}")
    log.append({"check": "quantize+dequantize bit-exact vs reference (CUDA)", "cases": cases,
                "failures": failures})
    print(f"quantize/dequantize: {cases - len(failures)}/{cases} bit-identical", flush=True)
    for f in failures[:20]:
        print("  FAIL", f, flush=True)


def _operands(m, n, k, recipe, group=128):
    a = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    backend = kernels()
    a_block = {"block": (1, group), "row": (1, k), "tensor": (m, k)}[recipe]
    w_block = {"block": (group, group), "row": (1, k), "tensor": (n, k)}[recipe]
    qa = Fp8Tensor(*backend.quantize(a, a_block, E4M3), a_block)
    qw = Fp8Tensor(*backend.quantize(w, w_block, E4M3), w_block)
    return qa, qw


def check_matmul(log: list) -> None:
    shapes = MATMUL_SHAPES
    results, worst = [], 0.0
    for m, n, k in shapes:
        for recipe in ("block", "row", "tensor"):
            qa, qw = _operands(m, n, k, recipe)
            for out_dtype, with_bias in ((torch.bfloat16, False), (torch.float16, True), (torch.float32, False)):
                if (out_dtype != torch.bfloat16) and m not in (7, 513):
                    continue
                bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if with_bias else None
                first = kernels().matmul(qa, qw.t(), out_dtype, bias)  # tunes, compiles
                out = kernels().matmul(qa, qw.t(), out_dtype, bias)  # the cached launcher
                if not torch.equal(first, out):
                    out = torch.full_like(out, float("nan"))  # not deterministic: fail the case
                ref = qa.dequantize(torch.float32) @ qw.dequantize(torch.float32).t()
                if bias is not None:
                    ref += bias.float()
                diff = relative_error(out.float(), ref)
                worst = max(worst, diff)
                results.append({"m": m, "n": n, "k": k, "recipe": recipe, "out": str(out_dtype),
                                "bias": with_bias, "diff": diff, "ok": diff < ERROR_BOUND})
    bad = [r for r in results if not r["ok"]]
    log.append({"check": "matmul 1 - 2Σxy/Σ(x²+y²) < 1e-3 vs fp32 product of dequantized inputs",
                "cases": len(results), "worst": worst, "failures": bad})
    print(f"matmul: {len(results) - len(bad)}/{len(results)} under 1e-3, worst {worst:.2e}", flush=True)
    for r in bad[:20]:
        print("  FAIL", r, flush=True)


def check_launches(log: list) -> None:
    """Kernel launches per tensorwise quantize, counted by the profiler."""
    x = torch.randn(4096, 7168, device=DEVICE, dtype=torch.bfloat16)
    quantize_tensorwise(x, E4M3)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        quantize_tensorwise(x, E4M3)
        torch.cuda.synchronize()
    kernels_run = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    log.append({"check": "tensorwise quantize launches", "kernels": kernels_run, "ok": len(kernels_run) <= 2})
    print(f"tensorwise launches: {len(kernels_run)} {kernels_run}", flush=True)


# --- peers ----------------------------------------------------------------------------------


def fbgemm_ops():
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)

        return torch.ops.fbgemm
    except Exception as e:  # not installed, or a build for another torch
        print(f"fbgemm unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def tflops(m, n, k, seconds):
    return 2 * m * n * k / seconds / 1e12


def _time(fn):
    try:
        fn()
        return time_cuda(fn).median_s
    except Exception as e:
        print(f"    failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def _time_graph(fn):
    """GPU time alone: `fn` captured once in a CUDA graph, its replays timed (no Python launch cost)."""
    try:
        return time_graph(fn).median_s
    except Exception as e:
        print(f"    graph failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def _host_us(fn, calls=200):
    """Python + launch time per call on the host (the GPU keeps up, so this is the enqueue cost)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host * 1e6


# --- benchmark ------------------------------------------------------------------------------


def bench_quantize(rows_out: list, fbgemm) -> None:
    backend = kernels()
    for rows, cols in ((8192, 8192), (4096, 7168)):
        x = torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        copy = _time(lambda: y.copy_(x))
        copy_bw = 4 * x.numel() / copy / 1e12
        row = {"shape": f"{rows}x{cols}", "bf16_copy_TBps": copy_bw}
        for gran in GRANULARITIES:
            block = block_for(gran, rows, cols, 128)
            fn = lambda: backend.quantize(x, block, E4M3)  # noqa: E731
            t, tg = _time(fn), _time_graph(fn)
            row[f"triton_{gran}_us"] = t * 1e6
            row[f"triton_{gran}_TBps"] = 3 * x.numel() / t / 1e12  # 2 bytes in + 1 out per element
            row[f"triton_{gran}_vs_copy"] = row[f"triton_{gran}_TBps"] / copy_bw
            row[f"triton_{gran}_graph_TBps"] = 3 * x.numel() / tg / 1e12 if tg else None
            row[f"triton_{gran}_graph_vs_copy"] = row[f"triton_{gran}_graph_TBps"] / copy_bw if tg else None
            row[f"triton_{gran}_host_us"] = _host_us(fn)
        if fbgemm is not None:
            for name, op in (("fbgemm_per_tensor", "quantize_fp8_per_tensor"), ("fbgemm_per_row", "quantize_fp8_per_row")):
                t = _time(lambda: getattr(fbgemm, op)(x))
                tg = _time_graph(lambda: getattr(fbgemm, op)(x))
                if t:
                    row[f"{name}_us"] = t * 1e6
                    row[f"{name}_TBps"] = 3 * x.numel() / t / 1e12
                if tg:
                    row[f"{name}_graph_TBps"] = 3 * x.numel() / tg / 1e12
            if row.get("fbgemm_per_tensor_us"):
                row["triton_tensor_vs_fbgemm"] = row["fbgemm_per_tensor_us"] / row["triton_tensor_us"]
            if row.get("fbgemm_per_tensor_graph_TBps") and row.get("triton_tensor_graph_TBps"):
                row["triton_tensor_graph_vs_fbgemm"] = row["triton_tensor_graph_TBps"] / row["fbgemm_per_tensor_graph_TBps"]
            if row.get("fbgemm_per_row_us"):
                row["triton_row_vs_fbgemm"] = row["fbgemm_per_row_us"] / row["triton_row_us"]
        rows_out.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def bench_block_matmul(rows_out: list, fbgemm, shapes) -> None:
    backend = kernels()
    for m, n, k in shapes:
        qa, qw = _operands(m, n, k, "block")
        b = qw.t()
        row = {"m": m, "n": n, "k": k}
        t = _time(lambda: backend.matmul(qa, b, torch.bfloat16))
        row["triton_TFLOPS"] = tflops(m, n, k, t) if t else None
        a16 = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        w16 = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
        t16 = _time(lambda: a16 @ w16.t())
        row["bf16_TFLOPS"] = tflops(m, n, k, t16) if t16 else None
        if fbgemm is not None:
            xs, ws = qa.scale.t().contiguous(), qw.scale.t().contiguous()
            tf = _time(lambda: fbgemm.f8f8bf16_groupwise(qa.data, qw.data, xs, ws))
            row["fbgemm_groupwise_TFLOPS"] = tflops(m, n, k, tf) if tf else None
        # End to end: bf16 activation quantized per call, weight pre-quantized, bf16 out.
        te = _time(lambda: backend.matmul(Fp8Tensor._trusted(*backend.quantize(a16, (1, 128), E4M3), (1, 128)),
                                           b, torch.bfloat16))
        row["triton_e2e_TFLOPS"] = tflops(m, n, k, te) if te else None
        for key in ("fbgemm_groupwise_TFLOPS", "bf16_TFLOPS"):
            if row.get(key) and row.get("triton_TFLOPS"):
                row[f"vs_{key.removesuffix('_TFLOPS')}"] = row["triton_TFLOPS"] / row[key]
        if row.get("bf16_TFLOPS") and row.get("triton_e2e_TFLOPS"):
            row["e2e_vs_bf16"] = row["triton_e2e_TFLOPS"] / row["bf16_TFLOPS"]
        if m <= 512:  # launch-bound sizes: GPU time alone, and the host's cost per call
            peers = {"triton": lambda: backend.matmul(qa, b, torch.bfloat16), "bf16": lambda: a16 @ w16.t()}
            if fbgemm is not None:
                peers["fbgemm_groupwise"] = lambda: fbgemm.f8f8bf16_groupwise(qa.data, qw.data, xs, ws)
            for name, fn in peers.items():
                tg = _time_graph(fn)
                row[f"{name}_graph_TFLOPS"] = tflops(m, n, k, tg) if tg else None
            row["triton_host_us"] = _host_us(peers["triton"])
            for key in ("fbgemm_groupwise", "bf16"):
                if row.get(f"{key}_graph_TFLOPS") and row.get("triton_graph_TFLOPS"):
                    row[f"graph_vs_{key}"] = row["triton_graph_TFLOPS"] / row[f"{key}_graph_TFLOPS"]
        rows_out.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def bench_scaled_matmul(rows_out: list, shapes) -> None:
    backend = kernels()
    for recipe in ("row", "tensor"):
        for m, n, k in shapes:
            qa, qw = _operands(m, n, k, recipe)
            row = {"recipe": recipe, "m": m, "n": n, "k": k}
            t = _time(lambda: backend.matmul(qa, qw.t(), torch.bfloat16))
            row["triton_TFLOPS"] = tflops(m, n, k, t) if t else None
            sa, sb = qa.scale.reshape(-1, 1) if recipe == "row" else qa.scale, qw.scale.reshape(1, -1)
            if recipe == "tensor":
                sa, sb = qa.scale.reshape(()), qw.scale.reshape(())
            ts = _time(lambda: torch._scaled_mm(qa.data, qw.data.t(), sa, sb, out_dtype=torch.bfloat16))
            row["scaled_mm_TFLOPS"] = tflops(m, n, k, ts) if ts else None
            if row["scaled_mm_TFLOPS"] and row["triton_TFLOPS"]:
                row["vs_scaled_mm"] = row["triton_TFLOPS"] / row["scaled_mm_TFLOPS"]
            if recipe == "row":  # end to end: bf16 activation quantized per row per call, weight ready
                a16 = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                w16 = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
                b = qw.t()
                te = _time(lambda: backend.matmul(Fp8Tensor._trusted(*backend.quantize(a16, (1, k), E4M3), (1, k)),
                                                   b, torch.bfloat16))
                t16 = _time(lambda: a16 @ w16.t())
                row["triton_e2e_TFLOPS"] = tflops(m, n, k, te) if te else None
                row["bf16_TFLOPS"] = tflops(m, n, k, t16) if t16 else None
                if te and t16:
                    row["e2e_vs_bf16"] = t16 / te
            rows_out.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def sweep(rows_out: list, shapes, recipe="block") -> None:
    """Time every Hopper configuration on each shape, forced, to choose the autotuner's list."""
    for m, n, k in shapes:
        qa, qw = _operands(m, n, k, recipe)
        b = qw.t()
        configs = mm.HOPPER_SWAP_CONFIGS if m <= mm.SMALL_M else mm.HOPPER_CONFIGS
        for config in configs:
            if recipe == "block" and m > mm.SMALL_M and mm._wide(config):
                continue
            kwargs = dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)
            if m <= mm.SMALL_M and kwargs["BLOCK_M"] != max(16, min(64, 1 << (m - 1).bit_length())):
                continue
            t = _time(lambda: mm.matmul(qa, b, torch.bfloat16, config=kwargs))
            rows_out.append({"recipe": recipe, "m": m, "n": n, "k": k, "config": kwargs,
                             "TFLOPS": tflops(m, n, k, t) if t else None})
            print(f"sweep {recipe} {m}x{n}x{k} {kwargs}: {rows_out[-1]['TFLOPS'] and round(rows_out[-1]['TFLOPS'])}",
                  flush=True)


def quantize_sweep(rows_out: list) -> None:
    """Elements per program and warps per program for the one-pass kernels, GPU time alone."""
    from fp8dispatch.backends.triton import quantize as q

    saved = (q.TILE, q.num_warps_for)
    try:
        for tile in (4096, 8192, 16384, 32768):
            for per_warp in (512, 1024, 2048):
                q.TILE = lambda tile=tile: tile
                q.num_warps_for = lambda n, per_warp=per_warp: max(1, min(16, n // per_warp))
                for rows, cols in ((8192, 8192), (4096, 7168)):
                    x = torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16)
                    row = {"tile": tile, "elements_per_warp": per_warp, "shape": f"{rows}x{cols}"}
                    for gran in ("row", "group", "block"):
                        block = block_for(gran, rows, cols, 128)
                        t = _time_graph(lambda: q.quantize(x, block, E4M3))
                        row[f"{gran}_TBps"] = 3 * x.numel() / t / 1e12 if t else None
                    rows_out.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        q.TILE, q.num_warps_for = saved


# --- report ---------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [f"# triton backend on {report['device']}", "",
             f"`{report['command']}` — torch {report['torch']}, triton {report['triton']}, "
             f"fbgemm {'yes' if report['fbgemm'] else 'no'}; medians of fp8dispatch.timing.time_cuda "
             f"(L2 flushed). Ratios are taken within this run.", ""]
    for check in report.get("correctness", []):
        if "check" not in check:
            lines.append(f"- correctness step failed: {str(check)[-300:]}")
            continue
        n_fail = len(check.get("failures", [])) if "failures" in check else (0 if check.get("ok") else 1)
        lines.append(f"- {check['check']}: {check.get('cases', '')} cases, {n_fail} failures"
                     + (f", worst {check['worst']:.2e}" if "worst" in check else "")
                     + (f", kernels {check['kernels']}" if "kernels" in check else ""))
    lines.append("")

    def table(title, rows, cols):
        if not rows:
            return
        lines.extend([f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    table("Quantize (bf16 in; TB/s counting 3 bytes per element; eager calls)", report.get("quantize", []),
          ["shape", "bf16_copy_TBps"] + [f"triton_{g}_TBps" for g in GRANULARITIES]
          + [f"triton_{g}_vs_copy" for g in GRANULARITIES]
          + ["fbgemm_per_tensor_TBps", "triton_tensor_vs_fbgemm", "fbgemm_per_row_TBps", "triton_row_vs_fbgemm"])
    table("Quantize, GPU time alone (CUDA graph replays), and host cost per eager call",
          report.get("quantize", []),
          ["shape"] + [f"triton_{g}_graph_TBps" for g in GRANULARITIES]
          + [f"triton_{g}_graph_vs_copy" for g in GRANULARITIES]
          + ["fbgemm_per_tensor_graph_TBps", "triton_tensor_graph_vs_fbgemm", "fbgemm_per_row_graph_TBps"]
          + [f"triton_{g}_host_us" for g in GRANULARITIES])
    table("Block-recipe matmul (1×128 · 128×128), TFLOPS", report.get("block_matmul", []),
          ["m", "n", "k", "triton_TFLOPS", "fbgemm_groupwise_TFLOPS", "bf16_TFLOPS", "vs_fbgemm_groupwise",
           "vs_bf16", "triton_e2e_TFLOPS", "e2e_vs_bf16"])
    table("Small M, GPU time alone (CUDA graph replays), TFLOPS", [r for r in report.get("block_matmul", [])
                                                                    if "triton_graph_TFLOPS" in r],
          ["m", "n", "k", "triton_graph_TFLOPS", "fbgemm_groupwise_graph_TFLOPS", "bf16_graph_TFLOPS",
           "graph_vs_fbgemm_groupwise", "graph_vs_bf16", "triton_host_us"])
    table("Rowwise and tensorwise matmul, TFLOPS", report.get("scaled_matmul", []),
          ["recipe", "m", "n", "k", "triton_TFLOPS", "scaled_mm_TFLOPS", "vs_scaled_mm", "triton_e2e_TFLOPS",
           "bf16_TFLOPS", "e2e_vs_bf16"])
    if report.get("quantize_sweep"):
        table("Quantize sweep: tile and warps (GPU time alone), TB/s", report["quantize_sweep"],
              ["tile", "elements_per_warp", "shape", "row_TBps", "group_TBps", "block_TBps"])
    if report.get("sweep"):
        table("Configuration sweep (forced configs), TFLOPS", report["sweep"], ["recipe", "m", "n", "k", "config", "TFLOPS"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for triton-kernels.json and .md")
    parser.add_argument("--only", default="correctness,bench", help="comma list of correctness, bench, sweep, qsweep")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--name", default="triton-kernels", help="file name of the outputs, without suffix")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    parts = set(args.only.split(","))
    fbgemm = fbgemm_ops() if "bench" in parts else None
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "fbgemm": fbgemm is not None,
              "command": "python benchmarks/triton_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    big = [(4096, n, k) for n, k in DEEPSEEK] + [(8192, 8192, 8192)]
    small = [(m, n, k) for m in SMALL_M for n, k in ((7168, 2048), (24576, 1536))]
    if args.quick:  # a check of the whole pipeline in about a minute and a half
        global QUANTIZE_SHAPES, MATMUL_SHAPES
        QUANTIZE_SHAPES = [(7, 300), (4096, 7168)]
        MATMUL_SHAPES = [(m, n, k) for m in (1, 16, 100, 513, 4096) for n, k in ((2112, 7168), (1000, 1000))]
        big, small = [(4096, 7168, 2048)], [(m, 7168, 2048) for m in SMALL_M]
    started = time.time()
    steps = [
        ("correctness", "correctness", lambda log: (check_quantize(log), check_launches(log), check_matmul(log))),
        ("sweep", "sweep", lambda log: sweep(log, big[:2] + big[-1:])),
        ("qsweep", "quantize_sweep", quantize_sweep),
        ("bench", "quantize", lambda log: bench_quantize(log, fbgemm)),
        ("bench", "block_matmul", lambda log: bench_block_matmul(log, fbgemm, big + small)),
        ("bench", "scaled_matmul", lambda log: bench_scaled_matmul(log, (big[:3] + big[-1:] if len(big) > 1 else big)
                                                                   + small[:1 if args.quick else 2])),
    ]
    for part, key, step in steps:
        if part not in parts:
            continue
        print(f"== {key} ({time.time() - started:.0f}s)", flush=True)
        report[key] = []
        try:
            step(report[key])
        except Exception:
            traceback.print_exc()
            report[key].append({"error": traceback.format_exc()[-2000:]})
    report["tuned_configs"] = [{"key": str(key[1:]), "config": config} for key, config in mm._chosen.items()]
    report["seconds"] = time.time() - started
    text = markdown(report)
    print(text)
    if args.out:
        import pathlib

        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=str))
        (out / f"{args.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
