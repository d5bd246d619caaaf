"""`fp8dispatch conformance`: hold every registered backend to the reference, print the matrix, write a report."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time

from fp8dispatch import cli


def add_arguments(parser) -> None:
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backends to check, repeatable or comma-separated (default: every registered one)")
    parser.add_argument("--op", action="append", metavar="OP",
                        help="quantize, dequantize, matmul and/or grouped_linear, repeatable or comma-separated "
                             "(default: all)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small shapes (≤ 256), the default without a GPU: fast under the Triton interpreter")
    size.add_argument("--full", action="store_true", help="add large shapes (M up to 8192), the default on a GPU")
    parser.add_argument("--case", action="append", metavar="TEXT",
                        help="only cases whose id contains TEXT (repeatable); a failure prints its exact id")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--load", action="append", metavar="MODULE",
                        help="import MODULE first, e.g. one that calls fp8dispatch.register_backend (repeatable)")
    parser.add_argument("--report", metavar="PATH",
                        help="write the Markdown report to PATH and the JSON beside it (PATH with .json)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other backends' results from the JSON already at --report PATH "
                             "(run backends one at a time where one command has a time limit)")
    parser.add_argument("--from", nargs="+", dest="sources", metavar="JSON",
                        help="check nothing: merge these JSON reports (each backend's results from the last "
                             "one holding it) into --report PATH")
    parser.add_argument("--list", action="store_true", help="list the selected case ids and exit")


def run(args) -> int:
    if args.sources:
        return _merge_reports(args.sources, args.report)
    device = cli.device(args.device)
    # `python -m` puts the current directory on the path; --load does too, for a module beside you.
    sys.path.insert(0, os.getcwd())
    for module in args.load or ():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if module != e.name and not module.startswith(f"{e.name}."):
                raise  # the module was found; something it imports is missing
            raise cli.UsageError("--load", f"no module named {module!r} here or on the Python path") from None
    from fp8dispatch import registry
    from fp8dispatch.conformance import report, runner
    from fp8dispatch.errors import Fp8ValueError, UnknownBackend

    try:
        backends, ops = runner.select_backends(args.backend), runner.select_ops(args.op)
    except Fp8ValueError as e:
        raise cli.UsageError("--backend" if isinstance(e, UnknownBackend) else "--op", str(e)) from None
    quick = args.quick or (not args.full and device.type != "cuda")
    if args.list:
        for case in runner.select_cases(ops, quick, args.case):
            print(case.id)
        return 0
    bar = ProgressBar(sys.stderr)
    # `timeout` sends SIGTERM: stop like Ctrl-C, so the checks that finished still reach the report.
    # Installed after the backends' libraries load and probe, which may install handlers of their own.
    for name in backends:
        registry.probe_result(name)
    signal.signal(signal.SIGTERM, _interrupt)
    result = runner.run(backends=args.backend, ops=args.op, quick=quick, device=device, match=args.case,
                        progress=bar.update)
    bar.close()
    print(report.matrix_markdown(result))
    print()
    for failure in result.failed:
        print(f"FAILED {failure.backend} {failure.case.id}\n  {failure.outcome.detail.replace(chr(10), chr(10) + '  ')}"
              f"\n  reproduce: {report.repro_command(failure, result)}")
    for name, probe in result.probes.items():
        if probe is not None:
            print(f"unavailable here: {name}: {probe}")
    print(report.summary_line(result))
    if args.report:
        written = report.merge(result, args.report) if args.merge else result
        md, js = report.write(written, args.report)
        print(f"report: {md} and {js}" + (f" ({report.summary_line(written)})" if args.merge else ""))
    if not result.planned:
        print("no checks selected", file=sys.stderr)
        return 2
    return 1 if result.failed or result.interrupted else 0


def _merge_reports(sources: list[str], path: str | None) -> int:
    from functools import reduce
    from pathlib import Path

    from fp8dispatch.conformance import report

    if not path:
        raise cli.UsageError("--from", "needs --report PATH to write the merged report to")
    for source in sources:
        if not Path(source).with_suffix(".json").is_file():
            raise cli.UsageError("--from", f"{source}: no such JSON report")
    merged = reduce(report.combine, map(report.load, sources))
    md, js = report.write(merged, path)
    print(report.matrix_markdown(merged))
    print(f"report: {md} and {js} ({report.summary_line(merged)})")
    return 1 if merged.failed or merged.interrupted else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class ProgressBar:
    """A one-line bar on a terminal; elsewhere (CI logs) a line every tenth of the way."""

    WIDTH = 30

    def __init__(self, stream):
        self.stream, self.tty = stream, stream.isatty()
        self.failed, self.start, self.last_tenth = 0, time.perf_counter(), -1

    def update(self, done: int, total: int, result) -> None:
        self.failed += result.status == "failed"
        elapsed = time.perf_counter() - self.start
        fill = int(self.WIDTH * done / max(total, 1))
        line = (f"[{'#' * fill}{'.' * (self.WIDTH - fill)}] {done}/{total} {elapsed:5.0f} s "
                f"{self.failed} failed  {result.backend} {result.case.op}")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
        elif (tenth := 10 * done // max(total, 1)) != self.last_tenth:
            self.last_tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
