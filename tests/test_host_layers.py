"""The host-time breakdown (benchmarks/host_layers.py through dispatch_overhead.py --breakdown) on CPU."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fp8dispatch import registry
from fp8dispatch.errors import NoBackend

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# What each op's table must peel, in this order; the layers a CPU has no figure for.
QUANTIZE = ["fd.quantize(x", "key: planning.quantize_key", "cached plan's run", "backend runner",
            "torch.empty([1, 256] float8_e4m3fn)", "torch.empty([1, 2] float32)", "both outputs",
            "compiled kernel's launch", "Fp8Tensor._trusted"]
LINEAR = ["fd.linear(x", "fd.matmul(x", "key: planning.matmul_key", "cached plan's run", "quantize runner",
          "GEMM runner", "torch.empty([1, 128] bfloat16)", "GEMM compiled kernel's launch", "GEMM: two TMA descriptors",
          "Fp8Tensor._trusted"]
REFERENCES = ["empty Python call", "empty Triton kernel: kernel[grid]", "empty Triton kernel: compiled launch",
              "stream: torch._C._cuda_getCurrentRawStream", "F.linear", "torch._scaled_mm"]
NO_FIGURE_ON_CPU = ("compiled kernel's launch", "compiled launch", "TMA descriptors", "stream:", "torch._scaled_mm")


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(registry.probe_result("triton") is not None or torch.cuda.is_available(),
                    reason="needs the triton backend in its interpreter, serving CPU tensors (with a GPU, triton "
                           "serves CUDA tensors only; the breakdown's GPU rows come from running the benchmark)")
def test_breakdown_reports_every_layer(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # dispatch_overhead imports host_layers beside it
    out = tmp_path / "host.json"
    assert load("dispatch_overhead").main(["--breakdown", "--tiny", "--cpu-only", "--out", str(out)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line for line in (tmp_path / "host.md").read_text().splitlines() if line.startswith("| ")] == table
    rows = json.loads(out.read_text())["rows"]
    assert len(table) == len(rows) + 1  # the header, then one line per row
    for backend in ("triton", "auto (triton)"):
        for op, layers in (("quantize", QUANTIZE), ("linear", LINEAR)):
            mine = [r for r in rows if r["op"] == op and r["backend"] == backend]
            assert len(mine) == len(layers)
            for row, layer in zip(mine, layers):
                assert row["layer"].startswith(layer)
                assert any(line.startswith(f"| {op} | {backend} | {row['layer']} |") for line in table)
    references = [r for r in rows if r["op"] == "reference"]
    for layer in REFERENCES:
        assert any(r["layer"].startswith(layer) for r in references), layer
    for row in rows:
        if any(word in row["layer"] for word in NO_FIGURE_ON_CPU):
            assert row["us"] is None and row["note"].startswith("n/a"), row
        else:
            assert row["us"] is not None and 0 < row["min_us"] <= row["us"], row
    public = {r["backend"]: r["us"] for r in rows if r["layer"].startswith("fd.quantize(")}
    lookup = {r["backend"]: r["us"] for r in rows if r["layer"].startswith("key: planning.quantize_key")}
    assert all(public[b] > lookup[b] for b in public)  # the interpreter's kernel alone outweighs a dict lookup


def test_a_backend_that_cannot_run_keeps_its_rows_with_the_reason(monkeypatch):
    module = load("host_layers")
    monkeypatch.setattr(registry, "probe_result", lambda name: "not here" if name == "triton" else None)
    report = module.run("tiny", ["triton"], calls=1, repeats=1, device="cpu")
    mine = [r for r in report["rows"] if r["backend"] == "triton"]
    assert [r["op"] for r in mine] == ["quantize", "linear"]
    assert all(r["us"] is None and "not here" in r["note"] for r in mine)
    assert "| quantize | triton |" in module.markdown(report)


def test_a_backend_that_declines_the_operands_keeps_its_rows_with_the_reason(monkeypatch):
    """On a GPU machine triton refuses CPU tensors at plan time: its rows say so, the run goes on."""
    module = load("host_layers")

    def declined(*args, **kwargs):
        raise NoBackend("no backend can run quantize(...)\n  triton:\n    - device cpu: needs a CUDA tensor")

    monkeypatch.setattr(module, "quantize_layers", declined)
    monkeypatch.setattr(module, "linear_layers", declined)
    monkeypatch.setattr(registry, "probe_result", lambda name: None)
    report = module.run("tiny", ["triton"], calls=1, repeats=1, device="cpu")
    mine = [r for r in report["rows"] if r["backend"] == "triton"]
    assert [r["op"] for r in mine] == ["quantize", "linear"]
    assert all(r["us"] is None and "needs a CUDA tensor" in r["note"] for r in mine)
