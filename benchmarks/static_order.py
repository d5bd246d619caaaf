"""The static order from a measured routing table: per op and recipe (or granularity), the backends
by their worst slowdown against the fastest over every measured point, smallest first.

    python benchmarks/static_order.py fp8dispatch/tuned/h200.json

Prints the lines of `fp8dispatch/static_order.py`'s ORDER and, per backend, its worst ratio, the
point where it happens and how often it was the fastest. A backend counts only at the points where
it ran (one that cannot run a shape is never chosen there).
"""

from __future__ import annotations

import sys
from collections import defaultdict

from fp8dispatch import tuning


def order(table: dict) -> dict[tuple[str, str], list[tuple[str, float, str, int]]]:
    """(op, recipe) -> [(backend, worst fastest/backend ratio, worst point, times fastest)], best first."""
    worst: dict[tuple, dict[str, tuple[float, str]]] = defaultdict(dict)
    wins: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in table["entries"]:
        key = (e["op"], e["variant"].split(":")[0])
        fastest = min(r["median_s"] for r in e["ranking"])
        wins[key][e["ranking"][0]["backend"]] += 1
        for r in e["ranking"]:
            ratio = fastest / r["median_s"]
            point = f"M≤{e['m_bucket']} N={e['n']} K={e['k']}"
            if ratio < worst[key].get(r["backend"], (2.0, ""))[0]:
                worst[key][r["backend"]] = (ratio, point)
    return {key: sorted(((b, ratio, point, wins[key][b]) for b, (ratio, point) in by.items()),
                        key=lambda item: -item[1])
            for key, by in sorted(worst.items())}


def main(argv: list[str]) -> int:
    document = tuning.read(argv[0])
    for table in document["tables"]:
        print(f"# measured on {table['environment']['device']} ({argv[0]})")
        for (op, recipe), ranked in order(table).items():
            names = tuple(b for b, *_ in ranked if b != "reference")
            print(f"    ({op!r}, {recipe!r}): {names},")
            for b, ratio, point, won in ranked:
                print(f"        # {b:<10} worst {ratio:.2f}x at {point}, fastest at {won}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
