"""The `fp8dispatch` command: one module per subcommand, each with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under fp8dispatch.cli, one-line help)
COMMANDS = {
    "info": ("info", "versions, the device, every backend's probe result and the routing table"),
    "demo": ("demo", "quantize and multiply a DeepSeek-V3-shaped problem through auto"),
    "conformance": ("conformance", "hold every backend to the reference and write a report"),
    "bench": ("bench", "time every available backend on a shape grid"),
    "tune": ("tune", "measure the backends here and write the routing table auto uses"),
    "support-matrix": ("support_matrix", "write the backend × op × recipe × format matrix"),
}


def _available() -> dict[str, tuple]:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"fp8dispatch.cli.{module}") is not None:
            out[name] = (module, help_text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fp8dispatch", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in _available().items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        modules[name] = importlib.import_module(f"fp8dispatch.cli.{module}")
        modules[name].add_arguments(sub_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
