"""The command line: `fp8dispatch info` and `demo`, in-process and as installed commands."""

import shutil
import subprocess
import sys

import pytest

from fp8dispatch.cli import main


def test_info_lists_versions_backends_and_routing(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("torch", "triton", "backends", "reference", "available", "routing on", "matmul block"):
        assert expected in out


def test_demo_runs_small_and_reports_backends_error_and_time(capsys):
    assert main(["demo", "-m", "8", "-n", "128", "-k", "256"]) == 0
    out = capsys.readouterr().out
    assert "which backend served each op" in out and "ms" in out
    error = float(out.split("fp8 matmul vs fp32 product of the dequantized inputs:")[1].split()[0])
    assert error < 1e-3


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[sys.executable, "-m", "fp8dispatch", "info"], ["fp8dispatch", "info"]])
def test_entry_points(command):
    if command[0] == "fp8dispatch":
        command[0] = shutil.which("fp8dispatch") or str(__import__("pathlib").Path(sys.executable).with_name("fp8dispatch"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reference" in result.stdout
