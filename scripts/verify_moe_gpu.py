"""Verify Fp8Experts and grouped_linear on a device: each backend, both layouts, graphs and compile.

For every backend that can run the grouped op (and `auto`), on a DeepSeek-V3-shaped expert layer
(H 7168, I 2048, 32 experts; `--small` for a CPU smoke test), the script checks:
- eager forward against the reference backend, by the conformance bound 1 - 2Σxy/Σ(x²+y²) < 1e-3,
  in the contiguous layout (skewed counts, some experts empty) and the masked one (masked_m from 0
  to max_m, NaN in x's padding rows; the padding rows of the result must be exactly zero);
- CUDA: the masked forward captured in a CUDA graph and replayed with new inputs and counts equals
  eager (the decode path must not synchronize), and the contiguous one too;
- torch.compile(fullgraph=True) against eager, both layouts.
Each check prints one line, PASS or FAIL with the reason; the exit status is the number of failures.

    python scripts/verify_moe_gpu.py              # on the GPU
    python scripts/verify_moe_gpu.py --small --device cpu
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

import fp8dispatch as fd
from fp8dispatch import registry
from fp8dispatch.grouped import skewed_counts
from fp8dispatch.grouped_api import plan_problem
from fp8dispatch.nn import Fp8Experts
from fp8dispatch.numerics import ERROR_BOUND, relative_error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="H 256, I 128, 8 experts (a CPU smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    g, h, i = (8, 256, 128) if args.small else (32, 7168, 2048)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(g, *shape, generator=gen) / shape[1] ** 0.5 for shape in ((i, h), (i, h), (h, i))]
    counts = torch.tensor(skewed_counts(g, 16 * g))
    counts[1] = 0
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(device)
    x = torch.randn(int(counts.sum()), h, generator=gen).to(device, torch.bfloat16)
    max_m = 16
    masked_m = torch.randint(0, max_m + 1, (g,), generator=gen).to(device, torch.int32)
    xm = torch.randn(g, max_m, h, generator=gen).to(device, torch.bfloat16)
    pad = torch.arange(max_m, device=device)[None, :] >= masked_m[:, None]
    xm[pad] = float("nan")
    failures = 0

    def check(label, fn):
        nonlocal failures
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 - every check reports, none stops the run
            detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n{traceback.format_exc(limit=3)}"
        print(f"{'PASS' if detail is None else 'FAIL'}  {label}" + ("" if detail is None else f": {detail}"))
        failures += detail is not None

    reference = Fp8Experts.from_weights(*(w.to(device) for w in weights), backend="reference")
    want = reference(x, offsets)
    want_masked = reference(xm, masked_m=masked_m)
    problem = plan_problem(x, reference.gate_up, offsets)
    names = [b.name for b in registry.all_backends() if b.name != "reference" and not registry.reasons(b, problem)]
    print(f"device {device}, {g} experts, H {h}, I {i}; backends that take the contiguous problem: {names}")
    for name in [*names, "auto"]:
        experts = Fp8Experts.from_weights(*(w.to(device) for w in weights), backend=name)
        check(f"{name}: contiguous eager", lambda: _close(experts(x, offsets), want))
        check(f"{name}: masked eager", lambda: _masked(experts(xm, masked_m=masked_m), want_masked, masked_m))
        if device.type == "cuda":
            check(f"{name}: masked CUDA graph", lambda: _graph(experts, xm, masked_m, max_m))
            check(f"{name}: contiguous CUDA graph", lambda: _graph(experts, x, offsets, None))
        # Inductor fuses silu(gate) * up in fp32 (eager rounds to bf16 twice): close, not identical.
        compiled = torch.compile(experts, fullgraph=True)
        check(f"{name}: compiled contiguous", lambda: _close(compiled(x, offsets), experts(x, offsets)))
        check(f"{name}: compiled masked",
              lambda: _masked(compiled(xm, masked_m=masked_m), experts(xm, masked_m=masked_m), masked_m))
    print(f"{failures} failed")
    return failures


def _close(got, want, exact=False):
    if exact:
        return None if torch.equal(got, want) else f"differs from eager by {(got.float() - want.float()).abs().max()}"
    error = relative_error(got, want)
    return None if error < ERROR_BOUND else f"1 - 2Σxy/Σ(x²+y²) = {error:.3g} against the reference"


def _masked(got, want, masked_m):
    pad = torch.arange(got.shape[1], device=got.device)[None, :] >= masked_m[:, None]
    if bool((got[pad] != 0).any()):
        return "rows past masked_m are not zero"
    return _close(got, want)


def _graph(experts, x, index, max_m):
    """Capture once, replay with fresh inputs (and counts) copied in, compare with eager."""
    masked = max_m is not None
    static_x, static_i = x.clone(), index.clone()
    run = (lambda: experts(static_x, masked_m=static_i)) if masked else (lambda: experts(static_x, static_i))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm up: compile kernels, plan, allocate outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    new_x = x.flip(0) if not masked else x.roll(1, dims=0)
    new_i = index if not masked else index.roll(1)
    static_x.copy_(new_x)
    static_i.copy_(new_i)
    graph.replay()
    torch.cuda.synchronize()
    eager = experts(new_x, masked_m=new_i) if masked else experts(new_x, new_i)
    return _close(out, eager, exact=True)


if __name__ == "__main__":
    sys.exit(main())
