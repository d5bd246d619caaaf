"""Turn `fp8dispatch bench --out` JSON into the Markdown tables of docs/results/h100/benchmarks.md.

    python benchmarks/grid_report.py docs/results/h100/benchmarks.json > tables.md

One summary table (per op and recipe: points, `auto` at ≥ 0.97× the fastest backend, the worst
point, which backend was fastest how often, `auto` against the bf16 baseline), then one table per
op and recipe with every point: median µs per backend (the fastest in bold), `auto`, what it
chose, and fastest / auto.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter, defaultdict

BASELINES = ("bf16 matmul", "bf16 copy", "bf16 grouped", "fd.linear loop")


def points(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("median_s") and r.get("status") in ("ok", "baseline"):
            out[(r["op"], r["variant"], r["m"], r["n"], r["k"])][r["backend"]] = r
    return out


def fastest(by_backend: dict[str, dict]) -> str | None:
    timed = {n: r["median_s"] for n, r in by_backend.items() if n != "auto" and n not in BASELINES}
    return min(timed, key=timed.get) if timed else None


def summary(grid: dict) -> str:
    groups: dict[tuple, list] = defaultdict(list)
    for key, by_backend in grid.items():
        best = fastest(by_backend)
        if best and "auto" in by_backend:
            groups[key[:2]].append((by_backend[best]["median_s"] / by_backend["auto"]["median_s"], key, best,
                                    by_backend))
    lines = ["| op | recipe | points | auto ≥ 0.97× fastest | worst (point) | fastest backend (points) | auto vs bf16 (median; range) |",
             "|---|---|---|---|---|---|---|"]
    for (op, variant), items in sorted(groups.items()):
        worst = min(items, key=lambda item: item[0])
        wins = Counter(best for _, _, best, _ in items)
        speedups = [b[base]["median_s"] / b["auto"]["median_s"] for _, _, _, b in items for base in BASELINES
                    if base in b]
        spread = (f"{statistics.median(speedups):.2f}× ({min(speedups):.2f}–{max(speedups):.2f})" if speedups
                  else "–")
        lines.append(f"| {op} | {variant} | {len(items)} | {sum(r >= 0.97 for r, *_ in items)} | "
                     f"{worst[0]:.3f} ({_shape(worst[1])}) | "
                     f"{', '.join(f'{n} {c}' for n, c in wins.most_common())} | {spread} |")
    return "\n".join(lines)


def table(grid: dict, op: str, variant: str) -> str:
    keys = sorted(k for k in grid if k[:2] == (op, variant))
    backends = sorted({n for k in keys for n in grid[k] if n != "auto" and n not in BASELINES})
    base = next((b for b in BASELINES if any(b in grid[k] for k in keys)), None)
    head = ["M×N×K" if op != "quantize" else "M×K", *([base] if base else []), *backends, "auto", "auto chose",
            "fastest / auto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        b = grid[k]
        best = fastest(b)
        cells = [_shape(k)]
        if base:
            cells.append(_us(b.get(base)))
        cells += [(f"**{_us(b[n])}**" if n == best else _us(b[n])) if n in b else "–" for n in backends]
        auto = b.get("auto")
        cells += [_us(auto), auto.get("chosen", "") if auto else "",
                  f"{b[best]['median_s'] / auto['median_s']:.2f}" if auto and best else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shape(key: tuple) -> str:
    op, _, m, n, k = key
    return f"{m}×{k}" if op == "quantize" else f"{m}×{n}×{k}"


def _us(row: dict | None) -> str:
    return f"{row['median_s'] * 1e6:.1f}" if row else "–"


def main(argv: list[str]) -> int:
    data = json.load(open(argv[0]))
    grid = points(data["rows"])
    print(summary(grid))
    for op in ("matmul", "linear", "quantize"):
        for variant in sorted({k[1] for k in grid if k[0] == op}):
            what = {"matmul": "the GEMM alone", "linear": "quantize the activation + GEMM",
                    "quantize": "bf16 [M, K] to FP8"}[op]
            print(f"\n### {op} {variant} (median µs; {what})\n")
            print(table(grid, op, variant))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
