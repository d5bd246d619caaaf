"""Quantize variants of the triton backend, checked bit for bit against the reference and timed against a bf16 copy.

    python benchmarks/quantize_variants.py --out docs/results/h100/quantize-variants.json   # GPU, < 3 min
    python benchmarks/quantize_variants.py --smoke                                         # CPU interpreter

For 8192×8192 and 4096×7168 bf16 (e4m3fn out): a bf16 copy (the bandwidth ceiling, 4 bytes per
element), the row path as it was (the one-pass `_groups_kernel` with g = C, padded to a power of
two), the row path `quantize()` now picks, the two-sweep `_wide_groups_kernel` over rows per
program × chunk × warps (× cache hints), and the group (1×128) and block (128×128) paths over
tiles and warps. Quantize bandwidth counts 3 bytes per element (2 read, 1 written), as
docs/results/h100/triton-kernels.md does. GPU time alone: each variant is captured in a CUDA graph and
its replays timed by `fp8dispatch.timing.time_cuda` (median, L2 flushed between runs). The
defaults and the copy are timed twice, first and last, to show the run's spread.

Every variant's output (values and scales, as raw bits) is compared with `backends/reference.py`
on data with zero rows, NaN, ±inf and a wide range; outputs are poisoned before the checked call.
A mismatch prints MISMATCH and makes the exit status 1. `--smoke` runs tiny shapes under
TRITON_INTERPRET=1 on CPU, exactness only. Writes --out (JSON) and the same name with .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

E4M3 = torch.float8_e4m3fn
SHAPES = [(8192, 8192), (4096, 7168)]
SMOKE_SHAPES = [(130, 1024), (9, 7168)]
GROUP = 128
# (block_r, chunk, num_warps, cache hints, unroll) of the two-sweep row kernel: one 16-byte load per
# thread per step at chunk = 1024 × 4 warps (bf16), and the neighbours on each axis. The compiler
# unrolls a constant trip count's amax sweep by itself (7 loads in flight at 7168 / 1024) but not
# the cast sweep, nor a masked (uneven) sweep; unroll asks for it.
WIDE = [(1, 512, 2, False, None), (1, 512, 4, False, None), (1, 1024, 2, False, None), (1, 1024, 4, False, None),
        (1, 1024, 8, False, None), (1, 2048, 4, False, None), (1, 2048, 8, False, None), (1, 4096, 8, False, None),
        (2, 512, 4, False, None), (2, 1024, 4, False, None), (2, 1024, 8, False, None), (2, 2048, 8, False, None),
        (4, 1024, 8, False, None), (4, 2048, 16, False, None),
        (1, 1024, 4, True, None), (1, 2048, 8, True, None), (2, 1024, 8, True, None),
        (1, 1024, 4, False, 4), (1, 512, 4, False, 8), (1, 2048, 8, False, 4), (2, 1024, 8, False, 4),
        (1, 1024, 4, True, 4)]
# (tile elements, groups per program, num_warps) of the one-pass group kernel; None = today's rule
# (tile 8192 on a GPU: [8 rows, 8 groups, 128], 8 warps).
GROUPS = [(None, None, None), (4096, 4, 4), (4096, 8, 4), (8192, 4, 8), (8192, 8, 4), (8192, 16, 8),
          (8192, 64, 8), (16384, 8, 16), (16384, 8, 8), (2048, 2, 2)]
# (block_r, num_warps) of the two-sweep kernel on 1×128 groups, one chunk per group.
WIDE_GROUPS = [(32, 4), (64, 8)]
# (tile elements, num_warps) of the block kernel on 128×128 blocks; None = today's rule (tile 8192:
# two 64×128 chunks per block, swept twice, 8 warps). 16384 holds the block in one pass.
BLOCKS = [(None, None), (16384, 16), (16384, 8), (8192, 4), (4096, 4), (4096, 8), (2048, 4)]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON report path (a .md table is written beside it)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, exactness only (CPU interpreter)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="seconds for all shapes, split evenly: a shape's variants not started within its "
                             "share are listed as skipped (the first Triton compile of each costs ~1 s)")
    return parser.parse_args(argv)


def test_input(rows: int, cols: int, device) -> torch.Tensor:
    """bf16 normal data, one row 10^4 larger, a zero row (scale 1), NaN, ±inf, a value above 448."""
    g = torch.Generator(device=device).manual_seed(rows * 31 + cols)
    x = torch.randn(rows, cols, device=device, generator=g)
    x[0] = 0.0
    x[1 % rows] *= 1e4
    x[2 % rows, 3] = float("nan")
    x[3 % rows, 5] = float("inf")
    x[4 % rows, 7] = float("-inf")
    x[5 % rows, 11] = 1e3
    return x.to(torch.bfloat16)


def variants(q, rows: int, cols: int):
    """(granularity, name, block, fn) for every variant at this shape; fn(x) -> (data, scale)."""
    out = [("row", "row: before (one-pass tile, g = C padded)", (1, cols),
            lambda x: q._quantize_groups(x, cols, E4M3, None, None, False)),
           ("row", f"row: quantize() now ({'swept' if q.swept(cols) else 'one-pass'})", (1, cols),
            lambda x: q.quantize(x, (1, cols), E4M3))]
    for r, c, w, hints, unroll in WIDE:
        name = f"row: sweep r{r} c{c} w{w}{' evict' if hints else ''}{f' unroll {unroll}' if unroll else ''}"
        out.append(("row", name, (1, cols), lambda x, r=r, c=c, w=w, h=hints, u=unroll: q._quantize_wide_groups(
            x, cols, E4M3, None, None, False, block_r=r, chunk=c, num_warps=w, evict=h, unroll=u or 0)))
    for tile, groups, w in GROUPS:
        name = "group: default" if tile is None else f"group: tile {tile} groups {groups} w{w}"
        out.append(("group", name, (1, GROUP),
                    lambda x, t=tile, g=groups, w=w: q._quantize_groups(x, GROUP, E4M3, None, None, False,
                                                                        tile=t, groups=g, num_warps=w)))
    for r, w in WIDE_GROUPS:  # the two-sweep kernel on 1×128 groups: the second read hits L1
        out.append(("group", f"group: sweep r{r} c{GROUP} w{w}", (1, GROUP),
                    lambda x, r=r, w=w: q._quantize_wide_groups(x, GROUP, E4M3, None, None, False, block_r=r,
                                                                chunk=GROUP, num_warps=w, evict=False, unroll=0)))
    for tile, w in BLOCKS:
        name = "block: default" if tile is None else f"block: tile {tile} w{w}"
        out.append(("block", name, (GROUP, GROUP),
                    lambda x, t=tile, w=w: q._quantize_blocks(x, (GROUP, GROUP), E4M3, None, None, False,
                                                              tile=t, num_warps=w)))
    # Baselines first, so that a run cut short by --budget-s loses only exploratory variants.
    return sorted(out, key=lambda v: not v[1].endswith(("default", "padded)")) and "quantize() now" not in v[1])


def mismatch(got, want) -> str | None:
    """None when the bits agree, else how many of which differ."""
    for what, g, w in (("scale", got[1], want[1]), ("data", got[0], want[0])):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{what}: {tuple(g.shape)} {g.dtype}, want {tuple(w.shape)} {w.dtype}"
        ints = {1: torch.uint8, 4: torch.int32}[g.element_size()]
        differ = int((g.view(ints) != w.view(ints)).sum())
        if differ:
            return f"{what}: {differ} of {g.numel()} differ"
    return None


def poison(like) -> None:
    """Fill freed memory of the outputs' sizes with 0x7F (e4m3fn NaN, an fp32 NaN) so that an
    unwritten element of the next output cannot pass for the previous variant's answer."""
    for t in like:
        torch.empty(t.numel() * t.element_size(), dtype=torch.uint8, device=t.device).fill_(0x7F)


def run(args) -> tuple[dict, int]:
    from fp8dispatch.backends import reference
    from fp8dispatch.backends.triton import kernels
    from fp8dispatch.backends.triton import quantize as q
    from fp8dispatch.timing import time_graph

    kernels()  # installs the interpreter's cast fix on CPU
    device = torch.device("cpu" if args.smoke and not torch.cuda.is_available() else "cuda")
    timed = device.type == "cuda" and not args.smoke
    start = time.perf_counter()
    rows_out, skipped, failures = [], [], 0
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    for i, (rows, cols) in enumerate(shapes):
        shape = f"{rows}x{cols}"
        deadline = start + args.budget_s * (i + 1) / len(shapes)
        x = test_input(rows, cols, device)
        copy_bw = []
        if timed:
            y = torch.empty_like(x)
            copy_bw.append(4 * x.numel() / time_graph(lambda: y.copy_(x)).median_s / 1e12)
        wants = {}
        todo = variants(q, rows, cols)
        defaults = [v for v in todo if v[1].endswith(("default", "padded)")) or "quantize() now" in v[1]]
        for gran, name, block, fn in todo + [(g, n + " (again)", b, f) for g, n, b, f in defaults]:
            if time.perf_counter() > deadline:
                skipped.append(f"{shape} {name}")
                continue
            row = {"shape": shape, "granularity": gran, "variant": name}
            try:
                if block not in wants:
                    wants[block] = reference.quantize(x, block, E4M3)
                poison(wants[block])
                got = fn(x)
                row["exact"] = (bad := mismatch(got, wants[block])) is None
                if bad:
                    failures += 1
                    row["mismatch"] = bad
                    print(f"MISMATCH {shape} {name}: {bad}", flush=True)
                del got
                if timed:
                    t = time_graph(lambda: fn(x)).median_s
                    row["us"] = t * 1e6
                    row["TBps"] = 3 * x.numel() / t / 1e12
                    row["vs_copy"] = row["TBps"] / copy_bw[0]
            except Exception as e:  # a variant that fails to compile or launch is reported, not fatal
                failures += 1
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"ERROR {shape} {name}: {row['error']}", flush=True)
            rows_out.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if timed:
            copy_bw.append(4 * x.numel() / time_graph(lambda: y.copy_(x)).median_s / 1e12)
            rows_out.append({"shape": shape, "granularity": "copy", "variant": "bf16 copy (first, last)",
                             "exact": True, "TBps": copy_bw[0], "TBps_again": copy_bw[1]})
    report = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU interpreter ({platform.machine()})",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "timed": timed,
        "seconds": time.perf_counter() - start,
        "failures": failures,
        "skipped": skipped,
        "rows": rows_out,
    }
    return report, failures


def markdown(report: dict) -> str:
    lines = [f"# Quantize variants on {report['device']}", "",
             f"`{report['command']}` — torch {report['torch']}, triton {report['triton']}; "
             f"{report['failures']} failures, {len(report['skipped'])} skipped, {report['seconds']:.0f} s. "
             "TB/s counts 3 bytes per element for quantize, 4 for the copy; GPU time alone (CUDA graph "
             "replays, L2 flushed); vs_copy = quantize TB/s / copy TB/s of the same shape in this run.", "",
             "| shape | variant | exact | µs | TB/s | vs copy |", "|---|---|---|---|---|---|"]
    order = {"copy": 0, "row": 1, "group": 2, "block": 3}
    for r in sorted(report["rows"], key=lambda r: (r["shape"], order[r["granularity"]], -(r.get("TBps") or 0))):
        exact = "yes" if r.get("exact") else f"**NO** {r.get('mismatch') or r.get('error', '')}"
        tb = f"{r['TBps']:.3g}" + (f" / {r['TBps_again']:.3g}" if "TBps_again" in r else "") if "TBps" in r else ""
        lines.append(f"| {r['shape']} | {r['variant']} | {exact} | {r['us']:.1f} | {tb} | {r['vs_copy']:.3f} |"
                     if "us" in r else f"| {r['shape']} | {r['variant']} | {exact} |  | {tb} |  |")
    if report["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported, below
    report, failures = run(args)
    text = markdown(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text)
    if failures:
        print(f"{failures} VARIANTS FAILED (mismatch or error): see MISMATCH/ERROR lines above", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
