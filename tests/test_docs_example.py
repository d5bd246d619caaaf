"""docs/adding-a-backend.md's worked example runs as written and passes the contract checks."""

import re
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
