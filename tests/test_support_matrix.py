"""The committed support matrix is what `fp8dispatch support-matrix` generates from the registry now."""

import os
import subprocess
import sys
from pathlib import Path

from fp8dispatch.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "support-matrix.md"


def _fresh_process(*args):
    # Without TRITON_INTERPRET (set for CI's CPU tests by the root conftest): the triton backend
    # then describes GPUs, as it does for a user, and the file is the one the command writes.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fp8dispatch", "support-matrix", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_committed_support_matrix_is_current():
    proc = _fresh_process("--check", "--output", str(COMMITTED))
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_check_fails_on_a_stale_file_and_the_command_rewrites_it(tmp_path, capsys):
    stale = tmp_path / "support-matrix.md"
    stale.write_text(COMMITTED.read_text().replace("| reference |", "| reference (edited) |", 1))
    assert main(["support-matrix", "--check", "--output", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert main(["support-matrix", "--output", str(stale)]) == 0
    assert main(["support-matrix", "--check", "--output", str(stale)]) == 0
    text = stale.read_text()
    for heading in ("## sm90", "## cpu", "**quantize", "**dequantize", "**matmul"):
        assert heading in text
    assert "| reference | e4m3fn e4m3fnuz e5m2 e5m2fnuz |" in text
