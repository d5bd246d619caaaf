"""Run every triton kernel once on small, tail-bearing problems and check each answer (the workload
that scripts/sanitize_triton.sh runs under compute-sanitizer).

Shapes are small so the sanitizer finishes in minutes, and every one has a partial tile or block
in some dimension, where out-of-bounds reads and writes hide. Each result is compared with the
reference backend, so a kernel that ran but computed garbage also shows. Exit status 1 on any
mismatch; prints one line per call.
"""

from __future__ import annotations

import sys

import torch

import fp8dispatch as fd
from fp8dispatch.numerics import ERROR_BOUND, relative_error

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
QUANTIZE = [  # (shape, granularity, options)
    ((1, 1), "row", {}), ((7, 130), "group", {}), ((130, 257), "block", {}), ((136, 260), "tensor", {}),
    ((3, 65, 200), "group", {"dtype": E5M2}), ((136, 7168 + 64), "group", {}),  # the wide-groups kernel
    ((136, 260), "group", {"block_size": 64, "pow2_scale": True}),
    ((136, 260), "block", {"block_size": (64, 32), "scale_ub": 1e-45}),
    ((129, 300), "row", {"scale_ub": 2.0}),
]
MATMUL = [  # (m, k, n, recipe)
    (1, 256, 96, "block"), (3, 200, 136, "block"), (130, 256, 200, "block"), (4, 3884, 576, "block"),
    (257, 384, 136, "block"), (64, 7168, 576, "block"), (7, 200, 136, "row"), (130, 256, 200, "tensor"),
]


def _bits(t):
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for shape, granularity, options in QUANTIZE:
        x = (torch.randn(shape, generator=gen) * 3).to(torch.bfloat16).to(device)
        x.view(-1)[::97] = 0.0
        got = fd.quantize(x, granularity, backend="triton", **options)
        want = fd.quantize(x, granularity, backend="reference", **options)
        same = torch.equal(_bits(got.data), _bits(want.data)) and torch.equal(_bits(got.scale), _bits(want.scale))
        back = fd.dequantize(got, torch.bfloat16, backend="triton")
        same = same and torch.equal(_bits(back), _bits(fd.dequantize(got, torch.bfloat16, backend="reference")))
        bad += not same
        print(f"quantize+dequantize {shape} {granularity} {options}: {'ok' if same else 'MISMATCH'}")
    for m, k, n, recipe in MATMUL:
        a = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16).to(device)
        wq = fd.quantize(w, {"block": "block", "row": "row", "tensor": "tensor"}[recipe], backend="reference")
        got = fd.linear(a, wq, recipe=recipe, out_dtype=torch.float32, backend="triton")
        want = fd.linear(a, wq, recipe=recipe, out_dtype=torch.float32, backend="reference")
        error = relative_error(got, want)
        ok = error < ERROR_BOUND
        bad += not ok
        print(f"linear {m}x{k} @ {n}x{k}.T {recipe}: error {error:.2e} {'ok' if ok else 'MISMATCH'}")
    torch.cuda.synchronize()
    print(f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
