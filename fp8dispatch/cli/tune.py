"""`fp8dispatch tune`: measure the backends here and write the routing table `auto` consults.

The measuring core (and torch with it) is imported in `run`, so `--help` answers at once.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from fp8dispatch import models, user_table
from fp8dispatch.cli import bench as bench_cli
from fp8dispatch.errors import Fp8DispatchError


def add_arguments(parser) -> None:
    bench_cli.add_selection(parser, ops_default="matmul,quantize")
    g = parser.add_argument_group("the table")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="measure this model's linear shapes (a config.json, a .safetensors file, "
                        f"{models.INDEX} or their directory) at each --m (default "
                        f"{','.join(map(str, models.MODEL_M))}); {', '.join(models.SLOW_TO_TUNE)} and, on a "
                        "GPU, the reference only if named in --backends")
    g.add_argument("--from", dest="sources", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: build the table from these `bench --out` result files")
    g.add_argument("--table", default=None, metavar="PATH",
                   help=f"where to write (default ${user_table.ENV_VAR}, else {_default_path()}); "
                        "'{gpu}' in PATH becomes the GPU's short name (h200)")
    g.add_argument("--dry-run", action="store_true", help="print the table, write nothing")


def _default_path() -> str:
    return f"~/.cache/{user_table.CACHE_FILE}"


def run(args) -> int:
    from fp8dispatch import bench, registry, tuning

    try:
        if args.model:
            _select_model(args)
        if args.sources:
            env, rows = bench.load_results([Path(p) for p in args.sources])
        else:
            args.no_auto = args.no_baselines = True  # the table needs the backends alone
            env, rows = bench_cli.measure(args)
        path = Path(bench_cli.named(args.table, env)).expanduser() if args.table else user_table.user_path()
        if path is None and not args.dry_run:
            raise Fp8DispatchError(f"{user_table.ENV_VAR}=off disables routing tables: pass --table PATH to write one")
    except Fp8DispatchError as e:
        print(f"fp8dispatch tune: {e}", file=sys.stderr)
        return 2
    command = "fp8dispatch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = tuning.build_table(rows, env, command)
    print(f"routing table for {env['device']} (capability {env['capability']}): {len(table['entries'])} entries")
    for e in table["entries"]:
        ranking = ", ".join(f"{r['backend']} {r['median_s'] * 1e6:.1f}µs" + _host(r) for r in e["ranking"])
        shape = f"N={e['n']} K={e['k']}" if e["n"] else f"K={e['k']}"
        print(f"  {e['op']:<14} {_kind(e):<17} M≤{e['m_bucket']:<5} {shape:<16} {ranking}")
    if not table["entries"]:
        print("nothing measured successfully: no table written", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    bench.save_table(path, table)
    registry.refresh()
    print(f"wrote {path}")
    return 0


def _kind(entry: dict) -> str:
    """The variant's recipe or granularity; a grouped entry's layout too (its M is rows per expert)."""
    words = entry["variant"].split(":")
    return ":".join(words[:2] if entry["op"] == "grouped_linear" else words[:1])


def _select_model(args) -> None:
    """--model: its (N, K) at each --m become the shapes; torchao only when named (it is slow to tune)."""
    from fp8dispatch import bench

    clash = [flag for flag, given in (("--shapes", args.shapes), ("--quick", args.quick), ("--from", args.sources))
             if given]
    if clash:
        raise Fp8DispatchError(f"--model: measures the model's own shapes; drop {', '.join(clash)}")
    shapes = models.shapes_of(args.model)
    args.shapes = ",".join(f"{n}x{k}" for n, k in shapes)
    args.m = ",".join(map(str, bench_cli._ints("m", args.m) if args.m else models.MODEL_M))
    if not args.backends:
        device = bench.require_device(args.device)  # no GPU: the clear message, before probing anything
        args.backends = ",".join(models.default_backends(device))
    print(f"{args.model}: {len(shapes)} linear shapes (N x K): {args.shapes.replace(',', ' ')}", file=sys.stderr)


def _host(r: dict) -> str:
    """The host time, shown where it is what ranks the backend (longer than its GPU time)."""
    host = r.get("host_s")
    return f" (host {host * 1e6:.1f}µs)" if host and host > r["median_s"] else ""
