"""Host time and wall time of one `fp8dispatch.linear` call per backend, beside `F.linear` in bf16.

For DeepSeek-V3's attention projections and dense MLP at M = 1, 16, 128 and 1024, on a GPU: 50
calls back to back, the time until the last returns (host µs per call) and until the GPU is done
(wall µs per call), the best of three rounds. A call whose host time exceeds its GPU time leaves
the GPU waiting, which no kernel speed makes up for in a model run eagerly.

    python benchmarks/host_per_backend.py host-per-backend.json      # on a GPU: measure
    python benchmarks/host_per_backend.py host-per-backend.json --md  # the markdown table of a run
"""

from __future__ import annotations

import json
import sys
import time

SHAPES = [(18432, 7168), (7168, 18432), (1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384)]
MS = (1, 16, 128, 1024)
CALLS = ("F.linear", "auto", "triton", "torch", "fbgemm")


def _timed(fn, calls: int = 50) -> tuple[float, float]:
    import torch

    for _ in range(3):
        fn()
    host = wall = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        host = min(host, (returned - start) / calls * 1e6)
        wall = min(wall, (time.perf_counter() - start) / calls * 1e6)
    return host, wall


def measure(out: str) -> None:
    import torch
    import torch.nn.functional as F

    import fp8dispatch as fd

    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        wq = fd.quantize(w, "block")
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"n": n, "k": k, "m": m, "F.linear": _timed(lambda: F.linear(x, w))}
            for backend in CALLS[1:]:
                try:
                    with torch.no_grad():
                        row[backend] = _timed(lambda: fd.linear(x, wq, backend=backend))
                except Exception as e:  # noqa: BLE001 - a backend that cannot serve is a cell, not the end
                    row[backend] = f"{type(e).__name__}: {e}"[:120]
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


def markdown(path: str) -> str:
    with open(path) as f:
        doc = json.load(f)
    lines = ["| N×K | M | " + " | ".join(CALLS) + " |", "|---|---:|" + "---:|" * len(CALLS)]
    for r in doc["rows"]:
        cells = [f"{r[c][0]:.1f} / {r[c][1]:.1f}" if isinstance(r[c], list) else "–" for c in CALLS]
        lines.append(f"| {r['n']}×{r['k']} | {r['m']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--md" in sys.argv:
        print(markdown(sys.argv[1]), end="")
    else:
        measure(sys.argv[1])
