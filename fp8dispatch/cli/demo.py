"""`fp8dispatch demo`: a DeepSeek-V3-shaped FP8 linear layer through `auto`, explained and timed.

torch is imported in `run`, so `--help` answers at once.
"""

from __future__ import annotations

import time

import fp8dispatch
from fp8dispatch import cli
from fp8dispatch.cli import positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("-m", type=positive_int, default=None, help="tokens (default 256 on CPU, 4096 on a GPU)")
    parser.add_argument("-n", type=positive_int, default=None,
                        help="output features (default 2048 on CPU, 7168 on a GPU)")
    parser.add_argument("-k", type=positive_int, default=7168, help="input features (default 7168)")


def _timed(fn, device, repeats):
    import torch

    fn()  # warm up: first-call planning, compilation, autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def run(args) -> int:
    import torch

    from fp8dispatch.numerics import relative_error

    device = cli.device(args.device)
    gpu = device.type == "cuda"
    m = args.m if args.m is not None else (4096 if gpu else 256)
    n = args.n if args.n is not None else (7168 if gpu else 2048)
    k = args.k
    repeats = 20 if gpu else 2
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
    print(f"DeepSeek-V3-shaped linear on {device}: x [{m}, {k}] bf16 @ w [{n}, {k}]ᵀ, recipe block "
          f"(x by 1×128 groups, w by 128×128 blocks)\n")

    wq, t_wq = _timed(lambda: fp8dispatch.quantize(w, "block"), device, repeats)
    xq, t_xq = _timed(lambda: fp8dispatch.quantize(x, "group"), device, repeats)
    out, t_mm = _timed(lambda: fp8dispatch.linear(xq, wq), device, repeats)
    full, t_full = _timed(lambda: fp8dispatch.linear(x, wq), device, repeats)
    bf16, t_bf16 = _timed(lambda: x @ w.t(), device, repeats)
    exact = xq.dequantize(torch.float32) @ wq.dequantize(torch.float32).t()

    served = {
        "quantize w (block 128×128)": _served("quantize", w, "block"),
        "quantize x (group 1×128)": _served("quantize", x, "group"),
        "matmul (block recipe)": _served("linear", xq, wq),
    }
    flops = 2 * m * n * k
    rows = [
        ("quantize w", t_wq, None),
        ("quantize x", t_xq, None),
        ("fp8 matmul", t_mm, flops),
        ("x bf16 -> out (quantize + matmul)", t_full, flops),
        ("bf16 x @ w.T (torch)", t_bf16, flops),
    ]
    print("which backend served each op")
    for op, name in served.items():
        print(f"  {op:<28} {name}")
    print("\ntime (mean of %d after a warm-up)" % repeats)
    for label, seconds, work in rows:
        rate = f"{work / seconds / 1e12:8.2f} TFLOPS" if work else ""
        print(f"  {label:<36} {seconds * 1e3:9.3f} ms {rate}")
    print("\nerror, 1 - 2Σxy/Σ(x²+y²)")
    print(f"  fp8 matmul vs fp32 product of the dequantized inputs: {relative_error(out, exact):.2e}")
    print(f"  fp8 matmul vs bf16 product of the unquantized inputs: {relative_error(out, bf16):.2e}")
    print(f"  x bf16 -> out vs the fp8 matmul on pre-quantized x:  {relative_error(full, out):.2e}")
    print("\nwhy the others were not chosen: fp8dispatch.explain('linear', x, w) or `fp8dispatch info`")
    return 0


def _served(op, *args) -> str:
    """The backend chosen for the call's last op (the GEMM for linear), read from explain's table."""
    table = fp8dispatch.explain(op, *args).split("\n\n")[-1]
    for line in table.splitlines():
        if line.strip().startswith("chosen:"):
            return line.strip().removeprefix("chosen:").strip()
    return "(none)"
