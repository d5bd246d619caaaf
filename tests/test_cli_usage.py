"""The command line as a tool: usage errors are one line and exit 2, --help and --version need no
torch, commands write only where told, tables are well-formed, info and conformance agree."""

import os
import re
import subprocess
import sys

import pytest
import torch

from fp8dispatch import bench
from fp8dispatch.cli import bench as bench_cli
from fp8dispatch.cli import COMMANDS, main
from fp8dispatch.grid import CPU_QUICK_M, CPU_QUICK_NK

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_main(argv):
    """main's exit status, whether it returns or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, argument", [
    (["conformance", "--backend", "nosuch"], "--backend"),
    (["conformance", "--op", "nosuch"], "--op"),
    (["conformance", "--load", "no_such_module_here"], "--load"),
    (["demo", "-m", "0"], "-m"),
    (["demo", "-n", "-3"], "-n"),
    (["info", "--device", "tpu"], "--device"),
    (["info", "--no-such-option"], "--no-such-option"),
])
def test_a_usage_error_is_one_line_naming_the_argument_and_exits_2(capsys, argv, argument):
    assert run_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and argument in lines[0] and "Traceback" not in captured.err, captured.err


@NO_CUDA
@pytest.mark.parametrize("command", ["demo", "info", "conformance"])
def test_cuda_without_cuda_is_a_usage_error(capsys, command):
    assert run_main([command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err and "no CUDA device" in err


def test_version(capsys):
    assert run_main(["--version"]) == 0
    from fp8dispatch import __version__

    assert capsys.readouterr().out.strip() == f"fp8dispatch {__version__}"


def test_help_and_version_import_no_torch():
    code = ("import sys\nfrom fp8dispatch.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("no torch"), out.stdout + out.stderr
    assert "COMMAND" in out.stdout and "support-matrix" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_a_commands_help_and_usage_errors_import_no_torch(command):
    """`fp8dispatch COMMAND --help` answers at once: its options are described without importing torch."""
    code = ("import sys\nfrom fp8dispatch.cli import main\n"
            f"for argv in ([{command!r}, '--help'], [{command!r}, '--no-such-option']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("no torch"), out.stdout + out.stderr
    assert f"usage: fp8dispatch {command}" in out.stdout and "--no-such-option" in out.stderr, out.stdout + out.stderr


def test_support_matrix_outside_the_repository_creates_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(["support-matrix"]) == 2
    assert list(tmp_path.iterdir()) == []
    assert "--output" in capsys.readouterr().err


def markdown_tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_an_empty_conformance_section_is_not_a_broken_table(capsys):
    assert run_main(["conformance", "--device", "cpu", "--backend", "reference", "--case", "no-case-has-this"]) == 2
    out = capsys.readouterr().out
    assert "no checks ran" in out
    for table in markdown_tables(out):
        widths = {line.count("|") for line in table}
        assert len(widths) == 1 and len(table) >= 2 and re.fullmatch(r"\|(---\|)+", table[1]), table


def test_quantize_points_are_labelled_by_their_activation():
    points = bench.points([bench.Shape(1, 2112, 256)], ops=("quantize", "matmul"))
    labels = {p.op: p.shape.label for p in points}
    assert labels == {"quantize": "1x256", "matmul": "1x2112x256"}


def test_bench_quick_on_a_cpu_measures_a_small_grid():
    parser = __import__("argparse").ArgumentParser()
    bench_cli.add_arguments(parser)
    grid, _, settings = bench_cli.selection(parser.parse_args(["--quick", "--device", "cpu"]))
    assert {(p.shape.n, p.shape.k) for p in grid if p.op != "quantize"} == set(CPU_QUICK_NK)
    assert max(p.shape.m for p in grid) == max(CPU_QUICK_M) and settings.runs <= 5


@NO_CUDA
def test_info_and_conformance_agree_about_the_interpreter():
    """Neither turns the Triton interpreter on by itself: both report the same probe reason."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cli = [sys.executable, "-m", "fp8dispatch"]
    info = subprocess.run([*cli, "info"], capture_output=True, text=True, env=env, timeout=300)
    check = subprocess.run([*cli, "conformance", "--backend", "triton", "--op", "dequantize", "--case", "7x130"],
                           capture_output=True, text=True, env=env, timeout=300)
    reason = re.search(r"^  triton .*unavailable: (.*)$", info.stdout, re.M)
    assert reason, info.stdout + info.stderr
    assert f"unavailable here: triton: {reason.group(1)}" in check.stdout, check.stdout + check.stderr
    assert "TRITON_INTERPRET" in reason.group(1)
