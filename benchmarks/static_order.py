"""The static order from a measured routing table: per op and recipe (or granularity), the backends
by their geometric-mean speed against the fastest over the measured points, best first.

    python benchmarks/static_order.py fp8dispatch/tuned/h200.json

Prints lines for `fp8dispatch/static_order.py`'s ORDER and, per backend, the figures behind them:
at how many points it ran, its geometric mean and worst fastest/backend ratio, and how often it
was the fastest. A backend counts only where it ran (one that cannot run a shape is never chosen
there); one measured at fewer than half of the points comes after those measured everywhere,
whatever its mean (a few good points are not evidence for the rest).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict

from fp8dispatch import tuning


def order(table: dict) -> dict[tuple[str, str], list[dict]]:
    """(op, recipe) -> one summary per backend, in the order `auto` should try them."""
    ratios: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    wins: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    points: dict[tuple, int] = defaultdict(int)
    for e in table["entries"]:
        key = (e["op"], e["variant"].split(":")[0])
        points[key] += 1
        wins[key][e["ranking"][0]["backend"]] += 1
        fastest = min(r["median_s"] for r in e["ranking"])
        for r in e["ranking"]:
            ratios[key][r["backend"]].append(fastest / r["median_s"])
    out = {}
    for key, by in sorted(ratios.items()):
        rows = [{"backend": b, "points": len(v), "of": points[key], "wins": wins[key][b], "worst": min(v),
                 "mean": math.exp(sum(map(math.log, v)) / len(v))} for b, v in by.items()]
        out[key] = sorted(rows, key=lambda r: (2 * r["points"] < r["of"], -r["mean"]))
    return out


def main(argv: list[str]) -> int:
    for table in tuning.read(argv[0])["tables"]:
        print(f"# measured on {table['environment']['device']} ({argv[0]})")
        for (op, recipe), rows in order(table).items():
            names = tuple(r["backend"] for r in rows if r["backend"] != "reference")
            print(f"    ({op!r}, {recipe!r}): {names},")
            for r in rows:
                print(f"        # {r['backend']:<10} {r['points']}/{r['of']} points, mean {r['mean']:.3f}x, "
                      f"worst {r['worst']:.2f}x, fastest at {r['wins']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
