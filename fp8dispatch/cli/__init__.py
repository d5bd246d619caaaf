"""The `fp8dispatch` command: one module per subcommand, each with `add_arguments` and `run`.

Only the chosen subcommand's module is imported, so `--help` and `--version` never import torch.
A user's mistake (a `UsageError` from `run`, or a malformed argument) prints one line naming the
argument and exits 2; a failed check exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fp8dispatch import __version__

# name -> (module under fp8dispatch.cli, one-line help)
COMMANDS = {
    "info": ("info", "versions, the device, every backend's probe result and the routing table"),
    "demo": ("demo", "quantize and multiply a DeepSeek-V3-shaped problem through auto"),
    "conformance": ("conformance", "hold every backend to the reference and write a report"),
    "bench": ("bench", "time every available backend on a shape grid"),
    "tune": ("tune", "measure the backends here and write the routing table auto uses"),
    "support-matrix": ("support_matrix", "write the backend × op × recipe × format matrix"),
}

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line, found after parsing: `argument` names the option."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, not argparse's usage block: the mistake and where to read more."""
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def device(text: str | None, argument: str = "--device"):
    """The torch device `--device` names (default: cuda if present, else cpu), or a UsageError."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise UsageError(argument, f"expected cpu or cuda[:N], got {text!r}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise UsageError(argument, f"expected cpu or cuda[:N], got {text!r}")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(argument, f"{text}: this machine has no CUDA device (torch {torch.__version__})")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(argument, f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the line: the first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="fp8dispatch", description="FP8 quantize, dequantize and scaled matmul on the best kernel a machine has")
    parser.add_argument("--version", action="version", version=f"fp8dispatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _command_in(argv)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"fp8dispatch.cli.{module_name}")
            module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    importlib.import_module("fp8dispatch")._load()  # the library, its backends and routing table
    try:
        return module.run(args) or 0
    except UsageError as e:
        print(f"fp8dispatch {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
