"""How well a GPU routes on another GPU's table: `auto`'s choice by a prior table, against the
fastest backend measured at each point of a bench grid on this GPU.

    python benchmarks/prior_figure.py docs/results/h200/benchmarks.json fp8dispatch/tuned/h100.json

For each matmul and quantize point of the grid (the ops a routing table decides; `linear` is both),
the backend the prior table ranks first among those that ran at that point (nearest measured M
bucket, as `auto` looks it up), or the static order where the table has no entry for the shape,
and its time against the fastest backend's. Prints the share of points at >= 0.95x of the fastest
(the figure docs/routing.md quotes for GPUs without a table of their own), then `auto` as the grid
measured it (routed by this GPU's own table) at >= 0.97x, with every miss.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import grid_report  # noqa: E402

from fp8dispatch import static_order, tuning  # noqa: E402

PRIOR_TARGET, OWN_TARGET = 0.95, 0.97


def prior_index(path: str) -> tuple[str, dict]:
    """The prior's device and {(op, variant, N, K): (sorted buckets, rankings)}."""
    (table,) = tuning.read(Path(path))["tables"][-1:]
    index: dict[tuple, tuple[list[int], list[list[str]]]] = {}
    for e in sorted(table["entries"], key=lambda e: e["m_bucket"]):
        buckets, rankings = index.setdefault((e["op"], e["variant"], e["n"], e["k"]), ([], []))
        buckets.append(e["m_bucket"])
        rankings.append([r["backend"] for r in e["ranking"]])
    return table["environment"]["device"], index


def routed(key: list, ran: dict[str, dict], index: dict) -> tuple[str, str]:
    """(backend, why): the prior's first ranked backend that ran here, else the static order's."""
    op, variant, n, k, m = key
    found = index.get((op, variant, n, k))
    if found:
        buckets, rankings = found
        for name in rankings[tuning._nearest(buckets, tuning.m_bucket(m))]:
            if name in ran:
                return name, "table"
    detail = variant.split(":")[0]
    order = sorted(ran, key=lambda b: -(static_order.priority(b, op, detail) or 0))
    return order[0], "static order"


def main(argv: list[str]) -> int:
    grid = grid_report.points(json.loads(Path(argv[0]).read_text())["rows"])
    device, index = prior_index(argv[1])
    by_op: dict[str, list[float]] = defaultdict(list)
    misses, fallbacks = [], 0
    for (op, variant, m, n, k), by_backend in sorted(grid.items()):
        ran = {b: r for b, r in by_backend.items() if b != "auto" and b not in grid_report.BASELINES}
        keyed = [r["key"] for r in ran.values() if r.get("key")]
        if op not in ("matmul", "quantize") or not keyed:
            continue
        best = grid_report.fastest(by_backend)
        name, why = routed(keyed[0], ran, index)
        fallbacks += why != "table"
        ratio = ran[best]["median_s"] / ran[name]["median_s"]
        by_op[op].append(ratio)
        if ratio < PRIOR_TARGET:
            misses.append(f"  {op} {variant} {m}x{n}x{k}: {ratio:.2f}x, routed to {name} by the {why}, fastest {best}")
    total = [r for ratios in by_op.values() for r in ratios]
    print(f"the {device} table as a prior, on this grid: "
          f"{sum(r >= PRIOR_TARGET for r in total)}/{len(total)} points at >= {PRIOR_TARGET}x of the fastest "
          f"({fallbacks} by the static order: shapes the table lacks)")
    for op, ratios in sorted(by_op.items()):
        print(f"  {op}: {sum(r >= PRIOR_TARGET for r in ratios)}/{len(ratios)}, worst {min(ratios):.2f}x")
    print(*misses, sep="\n")
    own = [(by_backend["auto"], grid_report.fastest(by_backend), key) for key, by_backend in sorted(grid.items())
           if "auto" in by_backend and grid_report.fastest(by_backend)]
    ratios = [(b[best]["median_s"] / auto["median_s"], auto, best, key) for auto, best, key in own
              for b in [grid[key]]]
    print(f"\nauto as measured (this GPU's own table): {sum(r >= OWN_TARGET for r, *_ in ratios)}/{len(ratios)} "
          f"points at >= {OWN_TARGET}x of the fastest")
    for r, auto, best, (op, variant, m, n, k) in ratios:
        if r < OWN_TARGET:
            print(f"  {op} {variant} {m}x{n}x{k}: {r:.3f}x, auto chose {auto.get('chosen')}, fastest {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
