"""docs/adding-a-backend.md's worked example runs as written and passes the contract checks."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import fp8dispatch

DOC = Path(__file__).parents[1] / "docs" / "adding-a-backend.md"


def test_the_worked_example_registers_a_backend_that_matches_the_reference(sandbox):
    code = re.search(r"```python\n# my_backend.py\n(.*?)```", DOC.read_text(), re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {})
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    x[3] = 0
    assert "chosen: rowcompiled" in fp8dispatch.explain("quantize", x, "row")
    ours, ref = fp8dispatch.quantize(x, "row"), fp8dispatch.quantize(x, "row", backend="reference")
    assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.bits(), ref.bits())
    assert "only row" in fp8dispatch.explain("quantize", x, "group")


def test_the_worked_example_passes_conformance_through_the_command_line(tmp_path):
    """The doc's module, saved as my_backend.py, and its conformance command run from that folder."""
    text = DOC.read_text()
    (tmp_path / "my_backend.py").write_text(re.search(r"```python\n(# my_backend.py\n.*?)```", text, re.S).group(1))
    command = next(line for line in re.search(r"Then:\n\n```bash\n(.*?)```", text, re.S).group(1).splitlines()
                   if line.startswith("fp8dispatch conformance"))
    script = Path(sys.executable).with_name("fp8dispatch")  # not `python -m`, which puts the folder on the path
    argv = [str(script), *shlex.split(command.split("#")[0])[1:]]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"[1-9]\d* passed, 0 failed", summary), summary
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["my_backend.py"]
