"""`fp8dispatch bench`: time every available backend on a shape grid; table, CSV/JSON and plots.

The measuring core (and torch with it) is imported where it is used, so `--help` answers at once.
"""

from __future__ import annotations

import csv
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fp8dispatch.blocks import GRANULARITIES, RECIPES
from fp8dispatch.devices import gpu_slug
from fp8dispatch.errors import Fp8DispatchError
from fp8dispatch.grid import CPU_QUICK_M, CPU_QUICK_NK, DEEPSEEK_M, OPS, QUICK_M, QUICK_NK

if TYPE_CHECKING:
    from fp8dispatch import bench

# Datasheet dense peaks (TFLOPS fp8, bf16; TB/s) for the roofline; the measured copy rate and
# bf16 matmul from the same run are drawn beside them. Unknown GPUs get the measured lines only.
PEAKS = {
    "H100 80GB HBM3": (1979, 989, 3.35),  # H100 SXM5
    "H100 PCIe": (1513, 756, 2.0),
    "H100 NVL": (1671, 835, 3.9),
    "H200": (1979, 989, 4.8),
}
MARKERS = {"block": "o", "row": "^", "tensor": "s"}
TARGET = 0.97  # auto must reach this fraction of the fastest backend (issue 6)


def add_selection(parser, *, ops_default: str) -> None:
    """The options that choose what to measure; `tune` takes the same ones."""
    g = parser.add_argument_group("what to measure")
    g.add_argument("--device", default=None, help="cuda device (default cuda); 'cpu' checks the plumbing only")
    g.add_argument("--ops", default=ops_default, help=f"comma list of {', '.join(OPS)} (default {ops_default})")
    g.add_argument("--recipes", default=",".join(RECIPES), help="matmul/linear recipes (default block,row,tensor)")
    g.add_argument("--granularities", default=",".join(GRANULARITIES), help="quantize granularities (default all)")
    g.add_argument("--backends", default=None, help="comma list of backends (default every available one)")
    g.add_argument("--shapes", default=None,
                   help="deepseek (default), quick, squares, MxNxK, NxK (with every --m) or @file; comma list")
    g.add_argument("--m", default=None, help=f"M values for NxK shapes (default {','.join(map(str, DEEPSEEK_M))})")
    g.add_argument("--quick", action="store_true",
                   help=f"a small grid: shapes {' '.join(f'{n}x{k}' for n, k in QUICK_NK)}, "
                        f"M {','.join(map(str, QUICK_M))}, 20 runs; on a CPU "
                        f"{' '.join(f'{n}x{k}' for n, k in CPU_QUICK_NK)}, M {','.join(map(str, CPU_QUICK_M))}, 3 runs")
    g.add_argument("--runs", type=int, default=None, help="timed runs per row (default 50, --quick 20)")
    g.add_argument("--warmup", type=int, default=None,
                   help="untimed runs first, where autotuners run (default 5, --quick on a CPU 1)")
    g.add_argument("--out", default=None,
                   help="write OUT.json and OUT.csv, the JSON after every point; '{gpu}' in OUT becomes the "
                        "GPU's short name (results/{gpu}/grid -> results/h200/grid)")
    g.add_argument("--resume", action="store_true", help="keep the rows already in OUT.json, measure the rest")
    g.add_argument("--no-graphs", action="store_true", help="time eager calls, not CUDA graph replays")


def add_arguments(parser) -> None:
    add_selection(parser, ops_default="matmul,quantize,linear")
    g = parser.add_argument_group("output")
    g.add_argument("--from", dest="sources", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: merge these result files and report them")
    g.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNG plots here (needs matplotlib); '{gpu}' as in --out")
    g.add_argument("--no-auto", action="store_true", help="skip the auto rows")
    g.add_argument("--no-baselines", action="store_true", help="skip the bf16 baselines")
    g.add_argument("--all", action="store_true", help="also list unsupported and failed rows in the table")
    g = parser.add_argument_group("model level (--model)")
    g.add_argument("--model", action="store_true",
                   help="time DeepSeek-V3 blocks converted to FP8 beside bf16 in eager, torch.compile and "
                        "reduce-overhead mode, plus the host time of single calls; writes model.json/.md/.png "
                        "to --out (default docs/results/<gpu>/); --m picks the token counts")
    g.add_argument("--blocks", default=None, help="with --model: comma list of mlp, attention (default both)")
    g.add_argument("--modes", default=None, help="with --model: comma list of eager, compile, reduce-overhead")
    g.add_argument("--budget", type=float, default=0, metavar="SECONDS",
                   help="with --model: stop starting new measurements after this long (0: no limit)")


def selection(args) -> tuple[list[bench.Point], list[str], bench.Settings]:
    """Parse the selection options; raises Fp8DispatchError with a clear message."""
    from fp8dispatch import bench

    device = bench.require_device(args.device)
    cpu = device.type == "cpu"
    quick_m = CPU_QUICK_M if cpu else QUICK_M
    ms = quick_m if args.quick and not args.m else _ints("m", args.m) if args.m else DEEPSEEK_M
    spec = args.shapes or (("cpu-quick" if cpu else "quick") if args.quick else "deepseek")
    shapes = bench.parse_shapes(spec, ms)
    recipes = _names("recipes", args.recipes, RECIPES)
    grans = _names("granularities", args.granularities, GRANULARITIES)
    ops = _names("ops", args.ops, OPS)
    backends = bench.available_backends(_names("backends", args.backends, None) if args.backends else None)
    runs = args.runs or (3 if args.quick and cpu else 20 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else 1 if args.quick and cpu else 5
    settings = bench.Settings(device, warmup, runs, not getattr(args, "no_auto", False),
                              not getattr(args, "no_baselines", False), not args.no_graphs)
    return bench.points(shapes, ops, recipes, grans), backends, settings


def _names(what: str, text: str, allowed) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad or not names:
        raise Fp8DispatchError(f"--{what}: expected some of {', '.join(allowed)}, got {text!r}")
    return names


def _ints(what: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise Fp8DispatchError(f"--{what}: expected a comma list of positive ints, got {text!r}")
    return values


def measure(args) -> tuple[dict, list[dict]]:
    """Run the selected grid (resuming from OUT.json if asked); returns (environment, rows)."""
    from fp8dispatch import bench, tuning

    grid, backends, settings = selection(args)
    env = tuning.environment(settings.device)
    args.out = named(args.out, env)
    out = Path(args.out + ".json") if args.out else None
    rows: list[dict] = []
    if args.resume and out is not None and out.is_file():
        old_env, rows = bench.load_results([out])
        if old_env != env:
            raise Fp8DispatchError(f"--resume: {out} was measured in another environment: {old_env}")
        rows = [r for r in rows if r.get("status") != "failed"]  # failed rows are tried again
    done = {bench.row_id(r) for r in rows}
    command = "fp8dispatch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"measuring {len(grid)} points on {env['device']} with {', '.join(backends)}"
          + (f" ({len(done)} rows kept from {out})" if done else ""), file=sys.stderr)
    bar = Progress()
    last_point = [None]

    def keep(row):
        rows.append(row)
        if out is not None and last_point[0] != row_point(row):  # a point's rows land together
            last_point[0] = row_point(row)
            bench.save_results(out, env, rows, command)

    bench.run(grid, backends, settings, done=done, on_row=keep, progress=bar)
    if out is not None:
        bench.save_results(out, env, rows, command)
    return env, rows


def named(path: str | None, env: dict) -> str | None:
    """An output path with '{gpu}' replaced by the short name of the GPU it was measured on."""
    return path.replace("{gpu}", gpu_slug(env["device"])) if path else path


def row_point(row: dict) -> tuple:
    return row["op"], row["variant"], row["m"], row["n"], row["k"]


class Progress:
    """A one-line bar on stderr when it is a terminal, else a line every 10% (for logs)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.shown = -1

    def __call__(self, i: int, total: int, point) -> None:
        elapsed = time.monotonic() - self.start
        what = f"{point.op} {point.variant} {point.shape.label}" if point else "done"
        if self.tty:
            filled = int(30 * i / max(total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {i}/{total} {elapsed:6.0f}s {what:<40}")
            if point is None:
                sys.stderr.write("\n")
        elif point is None or i * 10 // max(total, 1) > self.shown:
            self.shown = i * 10 // max(total, 1)
            sys.stderr.write(f"[{i}/{total}] {elapsed:.0f}s {what}\n")
        sys.stderr.flush()


# --- reporting ------------------------------------------------------------------------------


def table(rows: list[dict], show_all: bool = False) -> str:
    head = ("op", "variant", "M×N×K", "backend", "median µs", "±%", "TFLOPS", "GB/s", "×bf16", "error", "note")
    lines = []
    for r in sorted(rows, key=_order):
        if r.get("median_s") is None and not show_all:
            continue
        shape = f"{r['m']}×{r['n']}×{r['k']}" if r["n"] else f"{r['m']}×{r['k']}"
        note = r.get("chosen") or ("" if r.get("status") in ("ok", "baseline") else r.get("status", ""))
        if r.get("status") in ("unsupported", "failed", "wrong"):
            note = f"{r['status']}: {r.get('note', '')}"[:70]
        lines.append((r["op"], r["variant"], shape, r["backend"], _f(r.get("median_s"), 1e6, ".1f"),
                      _f(r.get("spread"), 100, ".0f"), _f(r.get("tflops"), 1, ".0f"), _f(r.get("gbps"), 1, ".0f"),
                      _f(r.get("speedup"), 1, ".2f"), _f(r.get("error"), 1, ".1e"), note))
    return _format([head] + lines)


def _label(r: dict) -> str:
    from fp8dispatch import bench

    return bench.Shape(r["m"], r["n"], r["k"]).label


def _order(r):
    kind = 0 if r["backend"].startswith("bf16") else 2 if r["backend"] == "auto" else 1
    return (OPS.index(r["op"]) if r["op"] in OPS else 9, r["variant"], r["n"], r["k"], r["m"],
            kind, r.get("median_s") or float("inf"))


def _f(v, scale, spec) -> str:
    return "-" if v is None else format(v * scale, spec)


def _format(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [str(c).rjust(w) if 4 <= i <= 9 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def auto_report(rows: list[dict]) -> tuple[str, list[dict]]:
    """auto against the fastest valid backend at each point: a line per miss, and a summary."""
    points: dict[tuple, dict] = {}
    for r in rows:
        if r.get("status") == "ok" and r["backend"] not in ("bf16 matmul", "bf16 copy"):
            points.setdefault(row_point(r), {})[r["backend"]] = r
    summary = []
    for key, by_backend in sorted(points.items()):
        auto = by_backend.pop("auto", None)
        if auto is None or not by_backend:
            continue
        best = min(by_backend.values(), key=lambda r: r["median_s"])
        summary.append({"op": key[0], "variant": key[1], "m": key[2], "n": key[3], "k": key[4],
                        "fastest": best["backend"], "chosen": auto.get("chosen"),
                        "ratio": best["median_s"] / auto["median_s"]})
    if not summary:
        return "auto vs fastest: no point has both an auto row and a backend row", summary
    misses = [s for s in summary if s["ratio"] < TARGET]
    worst = min(summary, key=lambda s: s["ratio"])
    same = sum(1 for s in summary if s["chosen"] == s["fastest"])
    lines = [f"auto vs fastest backend: {len(summary) - len(misses)}/{len(summary)} points at >= {TARGET}x; "
             f"worst {worst['ratio']:.3f}x ({worst['op']} {worst['variant']} {_label(worst)}); "
             f"auto chose the fastest backend itself at {same}/{len(summary)}"]
    for s in misses:
        # The same backend timed twice: the shortfall is the run-to-run spread, not a wrong choice.
        why = "same backend: timing noise" if s["chosen"] == s["fastest"] else f"fastest {s['fastest']}"
        lines.append(f"  below {TARGET}: {s['op']} {s['variant']} {_label(s)}: "
                     f"{s['ratio']:.3f}x, auto chose {s['chosen']} ({why})")
    return "\n".join(lines), summary


CSV_FIELDS = ("op", "variant", "m", "n", "k", "backend", "status", "median_s", "p10_s", "p90_s", "runs",
              "spread", "timing", "tflops", "gbps", "baseline", "speedup", "error", "chosen", "note")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=_order))


def plots(directory: Path, env: dict, rows: list[dict]) -> list[Path]:
    """TFLOPS per shape per backend (one figure per op × recipe) and a roofline; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed", file=sys.stderr)
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    valid = [r for r in rows if r.get("status") in ("ok", "baseline") and r.get("tflops")]
    for op in ("matmul", "linear"):
        for recipe in RECIPES:
            sel = [r for r in valid if r["op"] == op and r["variant"] == recipe]
            if not sel:
                continue
            nks = sorted({(r["n"], r["k"]) for r in sel})
            cols = min(4, len(nks))
            fig, axes = plt.subplots((len(nks) + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * ((len(nks) + cols - 1) // cols)),
                                     squeeze=False)
            for ax, (n, k) in zip(axes.flat, nks):
                for backend in sorted({r["backend"] for r in sel}):
                    pts = sorted((r["m"], r["tflops"]) for r in sel if (r["n"], r["k"]) == (n, k) and r["backend"] == backend)
                    if pts:
                        style = "--" if backend.startswith("bf16") else ":" if backend == "auto" else "-"
                        ax.plot(*zip(*pts), style, marker="o", ms=3, label=backend)
                ax.set_xscale("log", base=2)
                ax.set_title(f"N={n} K={k}", fontsize=9)
                ax.set_xlabel("M")
                ax.set_ylabel("TFLOPS")
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(nks):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=7)
            fig.suptitle(f"{op} ({recipe} recipe) on {env['device']}", fontsize=11)
            fig.tight_layout()
            path = directory / f"{op}-{recipe}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    grouped = [r for r in valid if r["op"] == "grouped" and r["backend"] != "reference"]
    if grouped:
        written.append(_grouped_figure(plt, directory, env, grouped))
    if any(r["op"] == "matmul" for r in valid):
        written.append(_roofline(plt, directory, env, rows))
    return written


def _grouped_figure(plt, directory: Path, env: dict, rows: list[dict]) -> Path:
    """TFLOPS of each backend and baseline at every grouped point, one panel per recipe × (N, K)."""
    panels = sorted({(r["variant"].split(":")[0], r["n"], r["k"]) for r in rows})
    names = sorted({r["backend"] for r in rows}, key=lambda b: (b.startswith("bf16") or " " in b, b))
    cols = min(2, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(6.5 * cols, 4.6 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (recipe, n, k) in zip(axes.flat, panels):
        sel = [r for r in rows if r["variant"].startswith(recipe + ":") and (r["n"], r["k"]) == (n, k)]
        labels = sorted({(r["variant"], r["m"]) for r in sel}, key=lambda p: (p[0].split(":")[1], p[0], p[1]))
        width = 0.8 / len(names)
        for j, backend in enumerate(names):
            tflops = {(r["variant"], r["m"]): r["tflops"] for r in sel if r["backend"] == backend}
            ax.barh([i + j * width for i in range(len(labels))], [tflops.get(p, 0) for p in labels], width,
                    label=backend, hatch="//" if backend.startswith("bf16") or " " in backend else None)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_yticklabels([f"{v.split(':', 1)[1]} {m}" for v, m in labels], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("TFLOPS")
        ax.set_title(f"{recipe} recipe, N={n} K={k}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"grouped_linear on {env['device']} (rows: layout:experts:counts, then M or max_m)", fontsize=11)
    fig.tight_layout()
    path = directory / "grouped.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _roofline(plt, directory: Path, env: dict, rows: list[dict]) -> Path:
    """FP8 GEMMs: TFLOPS against arithmetic intensity (FLOPs per byte of A, B and the bf16 output)."""
    fig, ax = plt.subplots(figsize=(10, 5.5))
    seen: set[str] = set()
    gemms = [r for r in rows if r["op"] == "matmul" and r.get("status") in ("ok", "baseline") and r.get("tflops")
             and r["backend"] != "reference"]  # fp32 math on dequantized copies: off the chart's scale
    colors = {}
    for r in sorted(gemms, key=lambda r: (r["backend"], r["variant"])):
        m, n, k, backend = r["m"], r["n"], r["k"], r["backend"]
        elem = 2 if backend.startswith("bf16") else 1
        if backend not in colors:
            colors[backend] = f"C{len(colors)}"
        label = f"{backend} ({r['variant']})" if not backend.startswith("bf16") else backend
        ax.scatter(2 * m * n * k / (elem * (m * k + n * k) + 2 * m * n), r["tflops"], s=12,
                   color=colors[backend], marker=MARKERS.get(r["variant"], "x") if elem == 1 else "x",
                   label=label if label not in seen else None)
        seen.add(label)
    copy = max((r["gbps"] for r in rows if r["backend"] == "bf16 copy" and r.get("gbps")), default=None)
    x = [2**i for i in range(-1, 14)]
    peak = next((v for name, v in PEAKS.items() if name in env["device"]), None)
    if peak:
        fp8, bf16, tbs = peak
        ax.plot(x, [min(fp8, tbs * i) for i in x], "k-", lw=1, label=f"datasheet: {fp8} TFLOPS fp8, {tbs} TB/s")
        ax.plot(x, [min(bf16, tbs * i) for i in x], "k--", lw=1, label=f"datasheet: {bf16} TFLOPS bf16")
    if copy:
        top = max(r["tflops"] for r in gemms) if gemms else 1
        ax.plot(x, [min(top, copy / 1e3 * i) for i in x], color="gray", lw=1, ls=":",
                label=f"measured bf16 copy {copy / 1e3:.2f} TB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("FLOPs per byte (A, B read once, bf16 output written once)")
    ax.set_ylabel("TFLOPS")
    ax.set_title(f"FP8 GEMM roofline, {env['device']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = directory / "roofline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    if args.model:
        from fp8dispatch.cli import bench_model

        return bench_model.run(args)
    from fp8dispatch import bench

    try:
        if args.sources:
            env, rows = bench.load_results([Path(p) for p in args.sources])
            args.out = named(args.out, env)
            if args.out:
                bench.save_results(Path(args.out + ".json"), env, rows, "merged: " + " ".join(args.sources))
        else:
            env, rows = measure(args)
    except Fp8DispatchError as e:
        print(f"fp8dispatch bench: {e}", file=sys.stderr)
        return 2
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    print(f"{env['device']} (capability {env['capability']}); {libs}\n")
    print(table(rows, args.all))
    text, _ = auto_report(rows)
    print("\n" + text)
    wrong = [r for r in rows if r.get("status") == "wrong"]
    failed = [r for r in rows if r.get("status") == "failed"]
    if wrong or failed:
        print(f"\n{len(wrong)} wrong and {len(failed)} failed rows (see the note column with --all)")
    if args.out:
        write_csv(Path(args.out + ".csv"), rows)
        print(f"\nwrote {args.out}.json and {args.out}.csv")
    if args.plots:
        for path in plots(Path(named(args.plots, env)), env, rows):
            print(f"wrote {path}")
    return 0
