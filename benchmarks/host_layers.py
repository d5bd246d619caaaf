"""Host time per call of `fd.quantize(x, "group")` and `fd.linear(x, wq)`, one layer peeled off at a time.

From the public call down to the compiled kernel's own launcher, each layer is called on its
own in a loop of back-to-back calls: the public call; the key lookup; the cached plan's run
(what the key finds, called directly); the backend's runner (what the plan calls: allocate,
launch); the output allocations alone, with the exact shapes and dtypes the runner asks for;
the compiled kernel's launch with every argument packed beforehand (Triton's `CompiledKernel.run`,
what the triton backend's direct path calls); the stream lookup; building the `Fp8Tensor`.
Beside them, in the same run: an empty Python call (the loop's own cost), an empty Triton kernel
launched the usual way and through its compiled launcher, `F.linear` in bf16 and
`torch._scaled_mm`. Differences between adjacent layers say where a call's time goes.

Host time = `perf_counter` around `calls` back-to-back calls, the GPU synchronized before each
repetition but not inside it (the kernels are tiny: the host is the bottleneck, and a repetition
queues fewer launches than the GPU's queue holds); the median and the minimum of the repetitions.
A layer that does not exist for a backend or a device (no compiled kernel in Triton's CPU
interpreter; `auto` chose another backend) keeps its row, with the reason instead of a figure.

    python benchmarks/dispatch_overhead.py --breakdown --out host-layers.json
    TRITON_INTERPRET=1 python benchmarks/dispatch_overhead.py --breakdown --tiny   # on a CPU
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fp8dispatch as fd
from fp8dispatch import planning, registry
from fp8dispatch.errors import NoBackend
from fp8dispatch.tensor import Fp8Tensor

E4M3, BF16 = torch.float8_e4m3fn, torch.bfloat16
GROUP = (1, 128)
# Decode-sized: one token through a DeepSeek-V3-sized projection (K = its hidden size 7168).
SIZES = {"full": (1, 2048, 7168), "tiny": (1, 128, 256)}


def per_call_us(fn, calls: int, repeats: int, sync=None, wait: bool = True) -> list[float]:
    """µs per call, one value per repeat of `calls` back-to-back calls, `sync` (the GPU's) run
    before each repeat; with `wait`, the time until the GPU has finished them, else host time alone."""
    for _ in range(max(calls // 10, 10)):
        fn()
    out = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync and wait:
            sync()
        out.append((time.perf_counter() - start) / calls * 1e6)
    if sync and not wait:
        sync()  # the launches queued by the last repeat finish before anything else is timed
    return out


def host_us(fn, calls: int, repeats: int, sync) -> tuple[float, float]:
    """(median, minimum) over `repeats` of the host µs per call of `calls` back-to-back `fn()`."""
    times = per_call_us(fn, calls, repeats, sync, wait=False)
    return statistics.median(times), min(times)


class Table:
    """Rows of (op, backend, layer): a figure, or why the layer has none here."""

    def __init__(self, calls: int, repeats: int, sync):
        self.calls, self.repeats, self.sync, self.rows = calls, repeats, sync, []

    def time(self, op: str, backend: str, layer: str, fn, note: str = "") -> None:
        row = {"op": op, "backend": backend, "layer": layer, "us": None, "min_us": None, "note": note}
        if isinstance(fn, str):  # no such layer here: the reason
            row["note"] = fn
        else:
            try:
                row["us"], row["min_us"] = host_us(fn, self.calls, self.repeats, self.sync)
            except Exception as e:  # noqa: BLE001 - one layer that cannot run is reported, the rest go on
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        self.rows.append(row)
        figure = "n/a" if row["us"] is None else f"{row['us']:8.2f} µs"
        print(f"  {op:<9} {backend:<14} {layer:<58} {figure:>11}  {row['note']}", flush=True)


def _alloc(shape, dtype, device):
    return lambda: torch.empty(shape, dtype=dtype, device=device)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')}"


def _triton_modules():
    from fp8dispatch.backends.triton import launch, matmul, quantize

    return launch, quantize, matmul


def quantize_layers(table: Table, x: torch.Tensor, backend: str) -> None:
    op = "quantize"
    plan = fd.plan_quantize(x, "group", backend=backend)
    name = backend if backend != "auto" else f"auto ({plan.routed.backend})"
    key = planning.quantize_key(x, "group", E4M3, 128, None, None, False, "saturate", backend)
    runs = planning.runs
    fd.quantize(x, "group", backend=backend)  # plans and keeps the run under `key`
    run, step = runs[key], plan.step
    table.time(op, name, f'fd.quantize(x {_shape(x)}, "group")', lambda: fd.quantize(x, "group", backend=backend),
               f"runs {plan.routed.backend} · {plan.routed.kernel}")
    table.time(op, name, "key: planning.quantize_key(...) + runs[key]",
               lambda: runs[planning.quantize_key(x, "group", E4M3, 128, None, None, False, "saturate", backend)])
    table.time(op, name, "cached plan's run: runs[key](x, None, None)", lambda: run(x, None, None))
    table.time(op, name, "backend runner: step(x, block, dtype, ...) -> (data, scale)",
               lambda: step(x, GROUP, E4M3, None, None, False))
    data, scale = step(x, GROUP, E4M3, None, None, False)
    table.time(op, name, f"torch.empty({_shape(data)})", _alloc(data.shape, data.dtype, x.device))
    table.time(op, name, f"torch.empty({_shape(scale)})", _alloc(scale.shape, scale.dtype, x.device))
    both = (_alloc(data.shape, data.dtype, x.device), _alloc(scale.shape, scale.dtype, x.device))
    table.time(op, name, "both outputs", lambda: (both[0](), both[1]()))
    table.time(op, name, "compiled kernel's launch, args packed (CompiledKernel.run)",
               _quantize_launch(plan, x, data, scale))
    table.time(op, name, "Fp8Tensor._trusted(data, scale, block)", lambda: Fp8Tensor._trusted(data, scale, GROUP))


def _quantize_launch(plan, x, data, scale):
    """The compiled kernel the triton backend's direct path launches, every argument packed now."""
    if plan.routed.backend != "triton":
        return f"n/a: {plan.routed.backend} serves this call"
    if x.device.type != "cuda":
        return "n/a: Triton's CPU interpreter compiles no kernel"
    launch_mod, quantize_mod, _ = _triton_modules()
    launcher, _ = quantize_mod.kernel_for(plan.routed.problem)
    quantize_mod.quantize(x, GROUP, E4M3)  # through the Launcher: its latest launch is for x again
    found = None if launcher is None else launcher.bound(x)
    if found is None:
        return "n/a: no direct launch for this kernel (launch hooks set, or fast launches off)"
    (g0, g1, g2), launch, function, packed, args, tail = found
    stream = launch_mod.raw_stream(x.device.index)
    ptrs = (x.data_ptr(), data.data_ptr(), scale.data_ptr())
    scalars = args[3:]
    return lambda: launch(g0, g1, g2, stream, function, packed, None, None, None, *ptrs, *scalars, *tail)


def linear_layers(table: Table, x: torch.Tensor, wq: Fp8Tensor, backend: str) -> None:
    op = "linear"
    wt = wq.t()
    plan = fd.plan_linear(x, wq, backend=backend)
    qa, routed = plan.quantize_a, plan.routed
    name = backend if backend != "auto" else f"auto ({routed.backend})"
    key = planning.matmul_key(x, wt, None, BF16, None, backend)
    runs = planning.runs
    fd.linear(x, wq, backend=backend)
    run, mm, qstep = runs[key], routed.run, qa.step
    table.time(op, name, f"fd.linear(x {_shape(x)}, wq [{', '.join(map(str, wq.shape))}])",
               lambda: fd.linear(x, wq, backend=backend),
               f"quantize: {qa.routed.backend} · {qa.routed.kernel}; GEMM: {routed.backend} · {routed.kernel}")
    table.time(op, name, "fd.matmul(x, wq.t())", lambda: fd.matmul(x, wt, backend=backend))
    table.time(op, name, "key: planning.matmul_key(...) + runs[key]",
               lambda: runs[planning.matmul_key(x, wt, None, BF16, None, backend)])
    table.time(op, name, "cached plan's run: runs[key](x, wq.t(), None)", lambda: run(x, wt, None))
    table.time(op, name, "quantize runner: step(x, ...) -> (data, scale)",
               lambda: qstep(x, qa.block, E4M3, None, None, False))
    data, scale = qstep(x, qa.block, E4M3, None, None, False)
    xq = Fp8Tensor._trusted(data, scale, qa.block)
    table.time(op, name, "GEMM runner: mm(xq, wq.t(), bf16, None)", lambda: mm(xq, wt, BF16, None))
    out = mm(xq, wt, BF16, None)
    table.time(op, name, f"torch.empty({_shape(out)})", _alloc(out.shape, out.dtype, x.device))
    launch, descriptors = _matmul_launch(routed, xq, wt, out)
    table.time(op, name, "GEMM compiled kernel's launch, args packed (CompiledKernel.run)", launch)
    table.time(op, name, "GEMM: two TMA descriptors (a, out) built per call", descriptors)
    table.time(op, name, "Fp8Tensor._trusted(data, scale, block)", lambda: Fp8Tensor._trusted(data, scale, qa.block))


def _matmul_launch(routed, a: Fp8Tensor, b: Fp8Tensor, c: torch.Tensor):
    """(raw launch, descriptor building) of the GEMM kernel the triton backend runs, or reasons."""
    if routed.backend != "triton":
        reason = f"n/a: {routed.backend} serves this call"
        return reason, reason
    if c.device.type != "cuda":
        reason = "n/a: Triton's CPU interpreter compiles no kernel"
        return reason, reason
    launch_mod, _, matmul_mod = _triton_modules()
    da, db, sa, sb = a.data, b.data, a.scale, b.scale
    key = (da.shape, db.shape, da.stride(), db.stride(), sa.stride(), sb.stride(), a.block, b.block, da.dtype,
           db.dtype, c.dtype, True, da.device)
    chosen = matmul_mod._plans.get(key)
    if chosen is None:
        return "n/a: the backend kept no plan for these operands", "n/a"
    stream = launch_mod.raw_stream(da.device.index)
    if isinstance(chosen, matmul_mod._Plan):
        matmul_mod.matmul(a, b, c.dtype)  # the launcher's latest launch is for these operands again
        found = chosen.launcher.bound(da)
        if found is None:
            return "n/a: no direct launch (launch hooks set, or fast launches off)", "n/a: the portable kernel"
        (g0, g1, g2), launch, function, packed, args, tail = found
        ptrs = (da.data_ptr(), db.data_ptr(), c.data_ptr(), sa.data_ptr(), sb.data_ptr(), sa.data_ptr())
        scalars = args[6:]
        return (lambda: launch(g0, g1, g2, stream, function, packed, None, None, None, *ptrs, *scalars, *tail),
                "n/a: the portable kernel takes pointers")
    from fp8dispatch.backends.triton import hopper

    hopper.matmul(a, b, c.dtype)
    handles = launch_mod.bind(hopper.last[2][0]) if hopper.last and hopper.last[0] == id(da) else None
    if handles is None:
        return "n/a: no direct launch (launch hooks set, or fast launches off)", "n/a"
    launch, function, packed = handles
    _, (g0, g1, g2), (_, tail), ints = hopper.last
    m, n, k = ints[:3]
    weight = db.t()
    a_layout = hopper._layout(da.dtype, hopper.HALF, hopper.BLOCK_K)
    c_layout = hopper._layout(c.dtype, hopper.HALF, hopper.BLOCK_N)

    def descriptors():
        return (hopper._descriptor(da, [m, k], [da.stride(0), 1], [hopper.HALF, hopper.BLOCK_K], a_layout),
                hopper._descriptor(c, [m, n], [c.stride(0), 1], [hopper.HALF, hopper.BLOCK_N], c_layout))

    a_desc, c_desc = descriptors()
    b_desc = hopper._descriptor(weight, [n, k], [weight.stride(0), 1], [hopper.BLOCK_N, hopper.BLOCK_K],
                                hopper._layout(weight.dtype, hopper.BLOCK_N, hopper.BLOCK_K))
    bias = hopper._no_bias(da.device)
    return (lambda: launch(g0, g1, g2, stream, function, packed, None, None, None, a_desc, b_desc, c_desc, sa, sb,
                           bias, *ints, *tail), descriptors)


def reference_layers(table: Table, x: torch.Tensor, w: torch.Tensor) -> None:
    from fp8dispatch.cli.bench_model import _empty

    op, name = "reference", "-"
    table.time(op, name, "empty Python call (the loop's own cost)", lambda: None)
    table.time(op, name, f"torch.empty({_shape(x)})", _alloc(x.shape, x.dtype, x.device))
    table.time(op, name, "empty Triton kernel: kernel[grid](x, N=1)", lambda: _empty[(1,)](x, N=1))
    if x.device.type == "cuda":
        from fp8dispatch.backends.triton import launch as launch_mod

        handles = launch_mod.bind(_empty[(1,)](x, N=1))
        if handles is None:
            raw = "n/a: no direct launch (launch hooks set, or fast launches off)"
        else:
            launch, function, packed = handles
            stream, px = launch_mod.raw_stream(x.device.index), x.data_ptr()

            def raw():
                launch(1, 1, 1, stream, function, packed, None, None, None, px, 1)
        table.time(op, name, "empty Triton kernel: compiled launch, args packed", raw)
        index = x.device.index
        table.time(op, name, "stream: torch._C._cuda_getCurrentRawStream(index)",
                   lambda: launch_mod.raw_stream(index))
        table.time(op, name, "stream: torch.cuda.current_stream(device).cuda_stream",
                   lambda: torch.cuda.current_stream(x.device).cuda_stream)
    else:
        for layer in ("empty Triton kernel: compiled launch, args packed",
                      "stream: torch._C._cuda_getCurrentRawStream(index)",
                      "stream: torch.cuda.current_stream(device).cuda_stream"):
            table.time(op, name, layer, "n/a: no CUDA device")
    table.time(op, name, f"F.linear(x, w {_shape(w)})", lambda: F.linear(x, w))
    x8, w8t = x.to(E4M3), w.to(E4M3).t()
    sa, sb = torch.ones(x.shape[0], 1, device=x.device), torch.ones(1, w.shape[0], device=x.device)
    table.time(op, name, "torch._scaled_mm(x8, w8.t(), rowwise scales)",
               (lambda: torch._scaled_mm(x8, w8t, sa, sb, out_dtype=BF16)) if x.device.type == "cuda"
               else "n/a: no CUDA device")


def run(size: str = "full", backends=("triton", "auto"), calls: int = 200, repeats: int = 15,
        device: str | None = None) -> dict:
    """Every layer of both calls on `device` (CUDA if there is one), for each backend."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    m, n, k = SIZES[size]
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=BF16)
    w = torch.randn(n, k, device=dev, dtype=BF16) / k**0.5
    wq = fd.quantize(w, "block")
    table = Table(calls, repeats, sync)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"host time per call, M={m} N={n} K={k} on {where}: median of {repeats} × {calls} calls")
    for backend in backends:
        reason = None if backend == "auto" else registry.probe_result(backend)
        if reason is not None:
            for op, layer in (("quantize", 'fd.quantize(x, "group")'), ("linear", "fd.linear(x, wq)")):
                table.time(op, backend, layer, f"n/a: {backend} cannot run here: {reason}")
            continue
        for op, layer, layers in (("quantize", 'fd.quantize(x, "group")', lambda: quantize_layers(table, x, backend)),
                                  ("linear", "fd.linear(x, wq)", lambda: linear_layers(table, x, wq, backend))):
            try:
                layers()
            except NoBackend as e:  # declined for these operands (say CPU tensors with a GPU's Triton)
                table.time(op, backend, layer, f"n/a: {backend} cannot run this call: {str(e).splitlines()[-1].strip()}")
    reference_layers(table, x, w)
    env = {"device": where, "torch": torch.__version__, "python": platform.python_version(),
           "triton": _version("triton"), "m": m, "n": n, "k": k, "calls": calls, "repeats": repeats}
    return {"env": env, "rows": table.rows}


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"Host time per call on {env['device']}, M={env['m']} N={env['n']} K={env['k']} "
             f"(torch {env['torch']}, triton {env['triton']}, Python {env['python']}); median (minimum) of "
             f"{env['repeats']} × {env['calls']} back-to-back calls.", "",
             "| op | backend | layer | host µs | min µs | note |", "|---|---|---|---:|---:|---|"]
    for r in report["rows"]:
        us = "n/a" if r["us"] is None else f"{r['us']:.2f}"
        low = "" if r["min_us"] is None else f"{r['min_us']:.2f}"
        lines.append(f"| {r['op']} | {r['backend']} | {r['layer'].replace('|', '/')} | {us} | {low} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"
