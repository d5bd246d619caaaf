"""The grouped points of bench on the CPU: the grid, both baselines, checked rows, reasons as rows."""

import json

import pytest
import torch

from fp8dispatch import bench, bench_grouped
from fp8dispatch.errors import Fp8ValueError

FAST = bench.Settings(torch.device("cpu"), warmup=1, runs=2)


def test_the_grid_is_deepseeks_experts_in_both_layouts():
    grid = bench.points([], ops=("grouped",), recipes=("block", "tensor"))
    assert len(grid) == len(bench_grouped.GRID) * len(bench_grouped.EXPERT_NK)  # tensor has no grouped recipe
    assert bench.Point("grouped", "block:contiguous:g8:uniform", bench.Shape(8 * 4096, 4096, 7168)) in grid
    assert bench.Point("grouped", "block:masked:g256:uniform", bench.Shape(64, 7168, 2048)) in grid


@pytest.mark.parametrize("variant", ["block:sorted:g4:uniform", "block:masked:four:uniform", "tensor:masked:g4:skewed"])
def test_bad_variants_name_the_variant(variant):
    with pytest.raises(Fp8ValueError, match="variant"):
        bench_grouped.parse(variant)


@pytest.mark.parametrize("variant, shape", [
    ("block:contiguous:g4:skewed", bench.Shape(40, 64, 256)),
    ("row:masked:g3:skewed", bench.Shape(8, 64, 256)),
])
def test_rows_hold_both_baselines_checked_backends_and_auto(sandbox, variant, shape):
    rows = bench.measure(bench.Point("grouped", variant, shape), ["reference"], FAST)
    by = {r["backend"]: r for r in rows}
    assert set(by) == {bench_grouped.BF16_GROUPED, bench_grouped.LOOP, "reference", "auto"}
    assert by[bench_grouped.BF16_GROUPED]["status"] == "baseline" and by[bench_grouped.BF16_GROUPED]["note"]
    assert by[bench_grouped.LOOP]["status"] == "baseline" and by[bench_grouped.LOOP]["error"] < 1e-5
    for name in ("reference", "auto"):
        row = by[name]
        assert row["status"] == "ok" and row["error"] < 1e-5 and row["tflops"] > 0
        assert row["speedup"] > 0 and row["vs_loop"] > 0
    assert by["auto"]["chosen"] == "reference"
    assert (by["reference"]["gbps"] is not None) == variant.startswith("row:masked")


def test_a_backend_that_cannot_run_the_point_is_a_row_with_its_reasons():
    rows = bench.measure(bench.Point("grouped", "block:masked:g2:uniform", bench.Shape(4, 64, 256)),
                         ["torch"], bench.Settings(torch.device("cpu"), warmup=1, runs=2, baselines=False))
    by = {r["backend"]: r for r in rows}
    assert by["torch"]["status"] == "unsupported" and by["torch"]["note"]


def test_bench_quick_on_the_cpu_measures_a_small_grouped_grid(sandbox, tmp_path, capsys):
    from fp8dispatch.cli import main

    assert main(["bench", "--device", "cpu", "--quick", "--ops", "grouped", "--recipes", "block",
                 "--out", str(tmp_path / "g")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"block:contiguous:g4:skewed", "block:masked:g4:skewed"}
    assert {r["backend"] for r in rows} >= {bench_grouped.BF16_GROUPED, bench_grouped.LOOP, "reference", "auto"}
    assert all(r["vs_loop"] > 0 for r in rows if r["backend"] in ("reference", "auto"))
    assert "grouped" in capsys.readouterr().out
