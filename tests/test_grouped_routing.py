"""grouped_linear routed by measured tables: its key, bench rows that carry it, the tables `tune`
builds from them, `auto` and `explain_grouped` following a table, and per-recipe static orders."""

import dataclasses
import json

import pytest
import torch

import fp8dispatch as fd
from fp8dispatch import bench, registry, static_order, tuning
from fp8dispatch.grouped_api import plan_problem

CPU = torch.device("cpu")
G, N, K = 3, 256, 256
FAST = bench.Settings(CPU, warmup=1, runs=2, auto=False, baselines=False)
E4M3 = "float8_e4m3fnxfloat8_e4m3fn->bfloat16"



@pytest.fixture
def tables(sandbox, tmp_path, monkeypatch):
    """A private user table path, no shipped tables, and this process's grouped backends back in the
    sandbox (it starts with the reference alone); returns the user path."""
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "shipped")
    path = tmp_path / "routing.json"
    sandbox.env(FP8DISPATCH_TUNING=str(path))
    tuning.install()  # the sandbox starts with no routing hook; it restores the hooks afterwards
    for backend in GROUPED.values():
        fd.register_backend(backend, replace=True)
    return path


def _weights(recipe="block", groups=G):
    return fd.quantize_grouped(torch.randn(groups, N, K), recipe, backend="reference")


def _contiguous(rows, recipe="block", groups=G):
    """(x, w, offsets) of a contiguous call, rows split as evenly as they go."""
    bounds = [rows * g // groups for g in range(groups + 1)]
    return torch.randn(rows, K, dtype=torch.bfloat16), _weights(recipe, groups), torch.tensor(bounds)


def _problem(rows, recipe="block", layout="contiguous", **kw):
    if layout == "masked":
        masked_m = torch.full((G,), rows, dtype=torch.int32)
        return plan_problem(torch.randn(G, rows, K, dtype=torch.bfloat16), _weights(recipe), masked_m=masked_m, **kw)
    x, w, offsets = _contiguous(rows, recipe)
    return plan_problem(x, w, offsets, recipe=recipe, **kw)


def _grouped_backends() -> dict:
    """The registered backends that can run this file's grouped problems (CPU tensors), by name: on a
    GPU machine the library backends and triton decline them (CPU tensors), so only the reference."""
    block, row = _problem(40, "block"), _problem(40, "row")
    return {b.name: b for b in registry.all_backends()
            if b.grouped_linear is not None and (not registry.reasons(b, block) or not registry.reasons(b, row))}


GROUPED = _grouped_backends()


# --- the key --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, rows, per_expert", [
    ("contiguous", 40, 14),  # ceil(40 / 3): the mean, since the counts stay on the device
    ("contiguous", 3, 1),
    ("masked", 8, 8),  # max_m
])
@pytest.mark.parametrize("recipe, blocks", [("block", "x1x128:w128x128"), ("row", "x1x*:w1x*")])
def test_key_is_rows_per_expert_and_blocks_per_expert(layout, rows, per_expert, recipe, blocks):
    assert tuning.key_of(_problem(rows, recipe, layout)) == \
        ("grouped_linear", f"{recipe}:{layout}:{blocks}:{E4M3}", N, K, per_expert)


def test_key_names_the_output_and_bias_dtypes_but_not_the_expert_count():
    x, w, offsets = _contiguous(40)
    key = tuning.key_of(plan_problem(x, w, offsets, bias=torch.zeros(G, N), out_dtype=torch.float32))
    assert key[1] == "block:contiguous:x1x128:w128x128:float8_e4m3fnxfloat8_e4m3fn->float32+biasfloat32"
    x, w, offsets = _contiguous(4 * 14, groups=4)  # four experts of 14 rows: the same entry as three
    assert tuning.key_of(plan_problem(x, w, offsets)) == tuning.key_of(_problem(40))


@pytest.mark.parametrize("field", ["x_row_major", "w_contiguous"])
def test_no_key_for_operands_no_table_describes(field):
    assert tuning.key_of(dataclasses.replace(_problem(40), **{field: False})) is None


# --- bench rows and the tables built from them ------------------------------------------------


def test_bench_rows_carry_the_key_and_build_grouped_entries(sandbox):
    point = bench.Point("grouped", "block:contiguous:g3:skewed", bench.Shape(40, N, K))
    rows = bench.measure(point, ["reference"], bench.Settings(CPU, warmup=1, runs=2))
    key = list(tuning.key_of(_problem(40)))
    assert {r["backend"]: r.get("key") for r in rows} == {
        "reference": key, "auto": key, "bf16 grouped": None, "fd.linear loop": None}
    table = tuning.build_table(rows, tuning.environment(CPU))
    [entry] = table["entries"]  # the auto row and the baselines are no backend's measurement
    assert (entry["op"], entry["variant"], entry["n"], entry["k"], entry["m_bucket"]) == \
        ("grouped_linear", key[1], N, K, 16)
    assert [r["backend"] for r in entry["ranking"]] == ["reference"]
    tuning.validate(tuning.merge(None, table))


def _rank_first(path, problem, first):
    """Write a table ranking `first` fastest, then every other grouped backend here."""
    others = [name for name in GROUPED if name != first]
    key = list(tuning.key_of(problem))
    rows = [{"backend": name, "median_s": 1e-5 * (i + 1), "error": 0.0, "ok": True, "key": key}
            for i, name in enumerate([first, *others])]
    tuning.write(path, tuning.merge(None, tuning.build_table(rows, tuning.environment(CPU))))
    fd.refresh()


def _spy(backend, calls):
    """The backend, noting each grouped_linear it runs."""
    def grouped_linear(*args):
        calls.append(backend.name)
        return backend.grouped_linear(*args)
    return dataclasses.replace(backend, grouped_linear=grouped_linear)


@pytest.mark.parametrize("first", sorted(GROUPED))
def test_auto_runs_the_backend_a_table_ranks_first(tables, first):
    calls = []
    for backend in GROUPED.values():
        fd.register_backend(_spy(backend, calls), replace=True)
    x, w, offsets = _contiguous(40)
    static = registry.choose(plan_problem(x, w, offsets)).name
    _rank_first(tables, plan_problem(x, w, offsets), first)
    fd.grouped_linear(x, w, offsets)
    assert calls == [first]
    text = fd.explain_grouped(x, w, offsets)
    assert f"chosen: {first}" in text and f"routing from your table {tables}" in text
    masked = _problem(8, layout="masked")  # another variant: the table does not speak for it
    assert registry.choose(masked).name == static


def test_on_the_cpu_the_table_overrides_the_interpreted_triton(tables):
    if "triton" not in GROUPED:
        pytest.skip(f"triton cannot run grouped_linear here: {registry.probe_result('triton')}")
    x, w, offsets = _contiguous(40)
    assert registry.choose(plan_problem(x, w, offsets)).name == "triton"  # the static order, no table yet
    _rank_first(tables, plan_problem(x, w, offsets), "reference")
    assert registry.choose(plan_problem(x, w, offsets)).name == "reference"


def test_the_nearest_measured_rows_per_expert_serve_unmeasured_ones(tables):
    fd.register_backend(dataclasses.replace(registry.get_backend("reference"), name="quick", priority=-60))
    document = tuning.merge(None, tuning.build_table(
        [{"backend": name, "median_s": t, "error": 0.0, "ok": True, "key": list(tuning.key_of(_problem(rows)))}
         for rows, ranking in ((12, ("quick", "reference")), (3 * 512, ("reference", "quick")))
         for name, t in zip(ranking, (1e-5, 2e-5))],
        tuning.environment(CPU)))
    tuning.write(tables, document)
    fd.refresh()
    assert [e["m_bucket"] for e in tuning.read(tables)["tables"][0]["entries"]] == [4, 512]
    assert tuning.ranking_for(_problem(3 * 8)) == ("quick", "reference")  # 8 rows per expert: 4 is nearer than 512
    assert tuning.lookup(_problem(3 * 8)) == "quick"
    assert tuning.lookup(_problem(3 * 200)) == "reference"  # 200: bucket 256, and 512 is nearer
    assert tuning.lookup(_problem(8, layout="masked")) is None  # no masked entry


# --- the CLI --------------------------------------------------------------------------------


def test_tune_measures_grouped_points_into_entries(sandbox, tmp_path, capsys):
    from fp8dispatch.cli import main

    table = tmp_path / "t.json"
    assert main(["tune", "--device", "cpu", "--quick", "--ops", "grouped", "--recipes", "row",
                 "--backends", "reference", "--runs", "1", "--table", str(table)]) == 0
    assert "grouped_linear row:masked" in capsys.readouterr().out
    entries = tuning.read(table)["tables"][0]["entries"]
    assert {(e["op"], e["variant"].split(":")[1]) for e in entries} == \
        {("grouped_linear", "contiguous"), ("grouped_linear", "masked")}


def test_tune_from_a_saved_grouped_bench_builds_grouped_entries(sandbox, tmp_path):
    from fp8dispatch.cli import main

    assert main(["bench", "--device", "cpu", "--quick", "--ops", "grouped", "--recipes", "block",
                 "--backends", "reference", "--runs", "1", "--out", str(tmp_path / "g")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    keyed = {r["backend"] for r in rows if r.get("key")}
    assert keyed == {"reference", "auto"}
    assert main(["tune", "--from", str(tmp_path / "g.json"), "--table", str(tmp_path / "t.json")]) == 0
    entries = tuning.read(tmp_path / "t.json")["tables"][0]["entries"]
    assert sorted(e["variant"].split(":")[1] for e in entries) == ["contiguous", "masked"]
    assert all(e["op"] == "grouped_linear" and e["ranking"][0]["backend"] == "reference" for e in entries)


# --- the static order ------------------------------------------------------------------------


def test_a_per_recipe_static_order_routes_that_recipe_alone(tables, monkeypatch):
    """An `("grouped_linear", recipe)` entry orders that recipe; the other follows the op's default."""
    monkeypatch.setitem(static_order.ORDER, ("grouped_linear", "row"), ("torch", "fbgemm", "triton"))
    reference = registry.get_backend("reference")
    row, block = _problem(40, "row"), _problem(40, "block")
    for name, row_place in (("torch", 0), ("fbgemm", 1), ("triton", 2)):
        ranked = dataclasses.replace(reference, name=name)
        assert ranked.priority_for(row) == static_order.TOP - static_order.STEP * row_place
        block_order = static_order.ORDER[("grouped_linear", "block")]  # untouched by the row entry
        block_place = block_order.index(name) if name in block_order else None
        assert ranked.priority_for(block) == (reference.priority if block_place is None
                                              else static_order.TOP - static_order.STEP * block_place)
    monkeypatch.setitem(static_order.ORDER, ("grouped_linear", "row"), ("reference",))
    fd.refresh()
    assert registry.choose(row).name == "reference"
    assert registry.choose(block).name == ("triton" if "triton" in GROUPED else "reference")
