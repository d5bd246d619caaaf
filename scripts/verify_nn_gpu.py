"""Verify fp8dispatch.nn on a GPU: a converted transformer block, compiled fullgraph, per backend.

For every registered backend (and `auto`) and each recipe, the script converts a bf16
transformer block (attention + SwiGLU MLP, plain nn.Linear layers) with
`fp8dispatch.nn.convert(..., backend=name)`, compiles it with `torch.compile(fullgraph=True)`,
and compares the compiled output with the bf16 block's by the conformance bound
`1 - 2Σxy/Σ(x²+y²) < 1e-3`. It records graph breaks, where each op routed, the compiled-vs-eager
difference and, on CUDA, the median forward time next to the compiled bf16 block's. Every backend
runs under its own time limit and its failures are caught and reported; the script never stops
at the first one. It writes a Markdown report to OUT (a .md path) and the same data as JSON beside it (.json).

    python scripts/verify_nn_gpu.py docs/results/h100/nn.md                      # a GPU's run
    python scripts/verify_nn_gpu.py /tmp/nn.md --device cpu --dim 256 --ffn 768 --tokens 64  # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
import traceback

import torch
from torch import nn

from fp8dispatch.numerics import ERROR_BOUND, relative_error


class Block(nn.Module):
    """A pre-norm transformer block: RMSNorm, causal attention, RMSNorm, SwiGLU MLP. The head count
    follows q's width, so the block runs sharded too (scripts/verify_tp_gpu.py)."""

    def __init__(self, d: int, ffn: int, heads: int):
        super().__init__()
        self.head_dim = d // heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("per-backend time limit reached")


def log(*args):
    print(*args, flush=True)


def routes(layer, x2d, name: str) -> str:
    """Where the activation quantize and the matmul of one layer route (from fp8dispatch.explain)."""
    import fp8dispatch

    text = fp8dispatch.explain("linear", x2d, layer.fp8_weight(), backend=layer.backend)
    chosen = [line.split("chosen:")[1].strip() for line in text.splitlines() if "chosen:" in line]
    return f"quantize on {chosen[0]}, matmul on {chosen[-1]}" if len(chosen) >= 2 else text.splitlines()[0]


def run_one(name, recipe, model, x, ref, device, timing) -> dict:
    from fp8dispatch import registry
    from fp8dispatch.nn import convert

    row = {"backend": name, "recipe": recipe}
    # The matmul is forced through Fp8Linear(backend=name); quantize and dequantize prefer the
    # same backend and fall back to auto where it cannot serve (not every backend quantizes).
    for op in ("QUANTIZE", "DEQUANTIZE"):
        os.environ[f"FP8DISPATCH_{op}_BACKEND"] = "auto" if name == "auto" else f"{name},auto"
    registry.refresh()
    torch._dynamo.reset()
    fp8 = copy.deepcopy(model)
    report = convert(fp8, recipe, backend=name)
    row["converted"] = len(report.converted)
    row["skipped"] = [f"{s.name}: {s.reason}" for s in report.skipped]
    row["bytes"] = f"{report.bytes_after:,} / {report.bytes_before:,}"
    if not report.converted:
        row["status"] = "refused"
        return row
    first = fp8.get_submodule(report.converted[0].name)
    row["routes"] = routes(first, x.reshape(-1, x.shape[-1]), name)
    with torch.no_grad():
        eager = fp8(x)
        counters = torch._dynamo.utils.counters
        counters.clear()
        compiled_fn = torch.compile(fp8, fullgraph=True)
        t0 = time.perf_counter()
        out = compiled_fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["error_vs_bf16"] = relative_error(out, ref)
        row["compiled_vs_eager"] = relative_error(out, eager)
        row["eager_error_vs_bf16"] = relative_error(eager, ref)
        if timing is not None:
            row["ms"] = round(timing(lambda: compiled_fn(x)) * 1e3, 4)
    ok = row["error_vs_bf16"] < ERROR_BOUND and row["graph_breaks"] == 0
    row["status"] = "pass" if ok else "FAIL"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="Markdown report path (the JSON goes beside it, suffix .json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--recipes", default="block,row,tensor")
    p.add_argument("--backends", default="", help="comma list (default: every registered backend, then auto)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="batch 4 × tokens/4 sequence")
    p.add_argument("--per-backend-timeout", type=int, default=240, help="seconds per backend × recipe")
    p.add_argument("--budget", type=int, default=540, help="seconds; later runs are listed as not run")
    args = p.parse_args(argv)
    start = time.monotonic()

    import fp8dispatch
    from fp8dispatch import registry

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: pass --device cpu for a smoke test")
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"fp8dispatch {fp8dispatch.__version__}, torch {torch.__version__}, device {gpu}")
    names = [n.strip() for n in args.backends.split(",") if n.strip()] or registry.backend_names() + ["auto"]
    probes = {n: (registry.probe_result(n) if n != "auto" else None) for n in names}
    for n, why in probes.items():
        log(f"  {n:<10} {'available' if why is None else 'unavailable: ' + why}")

    torch.manual_seed(0)
    model = Block(args.dim, args.ffn, args.heads).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randn(4, args.tokens // 4, args.dim, device=device, dtype=torch.bfloat16)
    timing = None
    if device.type == "cuda":
        from fp8dispatch.timing import time_cuda

        def timing(fn):
            return time_cuda(fn, warmup=3, runs=20).median_s
    with torch.no_grad():
        ref = model(x)
        baseline = {"backend": "bf16 (no FP8)", "recipe": "-", "status": "baseline"}
        torch._dynamo.reset()
        compiled_ref = torch.compile(model, fullgraph=True)
        baseline["error_vs_bf16"] = relative_error(compiled_ref(x), ref)
        if timing is not None:
            baseline["ms"] = round(timing(lambda: compiled_ref(x)) * 1e3, 4)
    rows = [baseline]
    signal.signal(signal.SIGALRM, _alarm)
    for name in names:
        for recipe in args.recipes.split(","):
            if probes[name] is not None:
                rows.append({"backend": name, "recipe": recipe, "status": "unavailable", "why": probes[name]})
                continue
            left = args.budget - (time.monotonic() - start)
            if left < 20:
                rows.append({"backend": name, "recipe": recipe, "status": "not run (time budget)"})
                continue
            log(f"--- {name} / {recipe}")
            signal.alarm(int(min(args.per_backend_timeout, left)))
            try:
                row = run_one(name, recipe, model, x, ref, device, timing)
            except BaseException as e:  # noqa: BLE001 - one backend's failure must not stop the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                row = {"backend": name, "recipe": recipe, "status": "error",
                       "why": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                       "trace": traceback.format_exc(limit=-4)}
            finally:
                signal.alarm(0)
            rows.append(row)
            log(json.dumps({k: v for k, v in row.items() if k != "trace"}))
    write(args.out, rows, gpu, args)
    failed = [r for r in rows if r["status"] in ("FAIL", "error")]
    log(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.json; {len(failed)} failed runs")
    return 1 if failed else 0


def write(path, rows, gpu, args):
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"device": gpu, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=1)
    lines = [
        f"# fp8dispatch.nn on {gpu}: a converted transformer block, compiled fullgraph",
        "",
        f"Block: d={args.dim}, ffn={args.ffn}, heads={args.heads}, {args.tokens} tokens (4 × {args.tokens // 4}), "
        f"bf16; torch {torch.__version__}. Error = 1 − 2Σxy/Σ(x²+y²) of the compiled FP8 block's output "
        f"against the bf16 block's (bound {ERROR_BOUND:g}). Command: `python scripts/verify_nn_gpu.py {args.out}`.",
        "",
        "| backend | recipe | status | error vs bf16 | compiled vs eager | graph breaks | routes (first layer) "
        "| ms (compiled) | compile s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def g(key, fmt="{}"):
            return fmt.format(r[key]) if key in r else ""
        notes = r.get("why", "")
        if r.get("skipped"):
            notes = (notes + " " if notes else "") + f"skipped {len(r['skipped'])}: " + "; ".join(r["skipped"][:2])
        lines.append(f"| {r['backend']} | {r['recipe']} | {r['status']} | {g('error_vs_bf16', '{:.2e}')} | "
                     f"{g('compiled_vs_eager', '{:.2e}')} | {g('graph_breaks')} | {g('routes')} | {g('ms')} | "
                     f"{g('compile_s')} | {notes.replace('|', '/')[:300]} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
