"""bench and tune on the CPU: shape sets, checked rows, resume/merge, and a clear refusal without a GPU."""

import json

import pytest
import torch

import fp8dispatch
from fp8dispatch import Backend, bench, timing, tuning
from fp8dispatch.backends import reference
from fp8dispatch.cli import main

CPU = torch.device("cpu")
FAST = bench.Settings(CPU, warmup=1, runs=2)


def test_the_deepseek_set_is_seven_projections_by_seven_m():
    shapes = bench.parse_shapes("deepseek")
    assert len(shapes) == 49
    assert bench.Shape(1, 2112, 7168) in shapes and bench.Shape(8192, 32768, 512) in shapes


def test_shape_specs_combine_and_deduplicate(tmp_path):
    spec = tmp_path / "shapes.txt"
    spec.write_text("# a comment\n64x128x256\n512x1024  # NxK: every M\n")
    shapes = bench.parse_shapes(f"@{spec},64x128x256,squares", ms=(1, 8))
    assert shapes[:3] == [bench.Shape(64, 128, 256), bench.Shape(1, 512, 1024), bench.Shape(8, 512, 1024)]
    assert len(shapes) == 3 + len(bench.SQUARES)


@pytest.mark.parametrize("spec", ["12x", "axbxc", "0x8x8", "@/no/such/file", "1x2x3x4"])
def test_bad_shape_specs_name_the_item(spec):
    with pytest.raises(fp8dispatch.Fp8ValueError, match="shapes"):
        bench.parse_shapes(spec)


def test_quantize_points_are_measured_once_per_activation():
    grid = bench.points([bench.Shape(4, 16, 256), bench.Shape(4, 32, 256)], ops=("quantize",),
                        granularities=("row",))
    assert grid == [bench.Point("quantize", "row", bench.Shape(4, 0, 256))]


def test_each_row_has_time_throughput_baseline_ratio_and_error(sandbox):
    rows = bench.measure(bench.Point("matmul", "block", bench.Shape(8, 128, 256)), ["reference"], FAST)
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"bf16 matmul", "reference", "auto"}
    ref = by["reference"]
    assert ref["status"] == "ok" and ref["error"] < 1e-5 and ref["median_s"] > 0 and ref["tflops"] > 0
    assert ref["speedup"] == pytest.approx(by["bf16 matmul"]["median_s"] / ref["median_s"])
    assert ref["key"][0] == "matmul" and by["auto"]["chosen"]
    q = bench.measure(bench.Point("quantize", "group", bench.Shape(8, 0, 256)), ["reference"], FAST)
    assert {r["backend"]: r["status"] for r in q} == {"bf16 copy": "baseline", "reference": "ok", "auto": "ok"}
    assert all(r["gbps"] > 0 for r in q)


def wrong_and_broken(sandbox):
    def garbage(a, b, out_dtype, bias=None):
        return reference.matmul(a, b, out_dtype, bias) * 1.5

    def crash(a, b, out_dtype, bias=None):
        raise RuntimeError("illegal memory access")

    fp8dispatch.register_backend(Backend("liar", lambda: None, lambda op, p, found: [], matmul=garbage, priority=-50))
    fp8dispatch.register_backend(Backend("crasher", lambda: None, lambda op, p, found: [], matmul=crash, priority=-50))
    fp8dispatch.register_backend(Backend("picky", lambda: None, lambda op, p, found: ["N=128: needs N % 256 == 0"],
                                         matmul=garbage, priority=-50))


def test_wrong_failing_and_unsupported_backends_are_rows_not_crashes(sandbox):
    wrong_and_broken(sandbox)
    rows = bench.measure(bench.Point("matmul", "row", bench.Shape(8, 128, 256)),
                         ["reference", "liar", "crasher", "picky"], FAST)
    by = {r["backend"]: r for r in rows}
    assert by["liar"]["status"] == "wrong" and not by["liar"]["ok"] and "not a valid result" in by["liar"]["note"]
    assert by["crasher"]["status"] == "failed" and "illegal memory access" in by["crasher"]["note"]
    assert by["picky"]["status"] == "unsupported" and "N % 256" in by["picky"]["note"]
    table = tuning.build_table(rows, tuning.environment(CPU))
    assert [r["backend"] for r in table["entries"][0]["ranking"]] == ["reference"]  # never the liar


def test_host_time_per_call_is_the_best_rounds_time_per_call(monkeypatch):
    """`host_s`: calls back to back, the time until each returns; of three rounds the fastest, since
    a busy host only adds (a clock that advances by each call's cost, no GPU needed)."""
    clock = [0.0]
    costs = iter([5e-6] * 20 + [3e-6] * 20 + [4e-6] * 20)

    def call():
        clock[0] += next(costs)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert timing.time_host_per_call(call) == pytest.approx(3e-6)
    assert next(costs, None) is None  # every round ran its 20 calls


def test_a_run_resumes_and_files_merge(tmp_path):
    grid = bench.points([bench.Shape(4, 128, 256)], ops=("matmul",), recipes=("row", "tensor"))
    first = bench.run(grid[:1], ["reference"], FAST)
    env = tuning.environment(CPU)
    bench.save_results(tmp_path / "a.json", env, first)
    done = {bench.row_id(r) for r in first}
    rest = bench.run(grid, ["reference"], FAST, done=done)
    assert {r["variant"] for r in rest} == {"tensor"}
    bench.save_results(tmp_path / "b.json", env, rest)
    merged_env, merged = bench.load_results([tmp_path / "a.json", tmp_path / "b.json"])
    assert merged_env == env and len(merged) == len(first) + len(rest)
    other = {**env, "device": "Another GPU"}
    bench.save_results(tmp_path / "c.json", other, rest)
    with pytest.raises(fp8dispatch.Fp8ValueError, match="another environment"):
        bench.load_results([tmp_path / "a.json", tmp_path / "c.json"])


def test_without_a_gpu_bench_and_tune_refuse_clearly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("bench", "tune"):
        assert main([command, "--quick"]) == 2
        err = capsys.readouterr().err
        assert f"fp8dispatch {command}: " in err and "torch.cuda.is_available() is False" in err
        assert "--device cpu" in err and "Traceback" not in err


def test_bench_cli_on_cpu_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["bench", "--device", "cpu", "--shapes", "4x128x256", "--ops", "matmul,quantize",
                 "--recipes", "row", "--granularities", "row", "--backends", "reference", "--runs", "2",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "reference" in text and "auto vs fastest backend" in text
    document = json.loads((tmp_path / "r.json").read_text())
    assert {r["backend"] for r in document["rows"]} == {"bf16 matmul", "bf16 copy", "reference", "auto"}
    assert (tmp_path / "r.csv").read_text().startswith("op,variant,m,n,k,backend")


def test_tune_from_results_writes_a_table_that_auto_uses(sandbox, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "none")
    table = tmp_path / "routing.json"
    sandbox.env(FP8DISPATCH_TUNING=str(table))
    tuning.install()  # the sandbox starts with no routing hook
    fp8dispatch.register_backend(Backend("quick", lambda: None, lambda op, p, found: [], quantize=reference.quantize,
                                         priority=-60))
    rows = bench.run(bench.points([bench.Shape(4, 0, 256)], ops=("quantize",), granularities=("group",)),
                     ["reference", "quick"], bench.Settings(CPU, 1, 2, auto=False, baselines=False))
    for r in rows:  # make the measurement decisive: "quick" ten times faster
        r["median_s"] = 1e-5 if r["backend"] == "quick" else 1e-4
    bench.save_results(tmp_path / "r.json", tuning.environment(CPU), rows)
    assert main(["tune", "--from", str(tmp_path / "r.json")]) == 0
    assert "wrote" in capsys.readouterr().out and table.is_file()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert "chosen: quick" in fp8dispatch.explain("quantize", x, "group")
