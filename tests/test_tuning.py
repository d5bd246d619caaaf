"""The routing table: keys, ranking, round trip, atomic writes, refusal of bad files, and routing."""

import json
import os
import warnings

import pytest
import torch

import fp8dispatch
from fp8dispatch import Backend, registry, tuning
from fp8dispatch.backends import reference
from fp8dispatch.blocks import block_for
from fp8dispatch import problem as problems

CPU = torch.device("cpu")


@pytest.fixture
def tables(sandbox, tmp_path, monkeypatch):
    """A private user table path and an empty shipped directory; returns the user path."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    path = tmp_path / "routing.json"
    sandbox.env(FP8DISPATCH_TUNING=str(path))
    tuning.install()  # the sandbox starts with no routing hook; it restores the hooks afterwards
    return path


def fake(name, priority, calls=None):
    """A CPU backend that runs the reference's quantize and notes each call."""

    def quantize(*args):
        if calls is not None:
            calls.append(name)
        return reference.quantize(*args)

    return Backend(name=name, probe=lambda: None, why_not=lambda op, p, found: [], quantize=quantize, priority=priority)


def quantize_problem(m=4, k=256, granularity="group"):
    """The problem `fp8dispatch.quantize(bf16 [m, k], granularity)` describes."""
    return problems.quantize_problem(CPU, (m, k), block_for(granularity, m, k))


def rows_for(problem, timings):
    """Bench-style rows: {backend: (median_s, error)} for one problem."""
    key = list(tuning.key_of(problem))
    return [{"op": problem.op, "backend": b, "median_s": t, "error": e, "ok": True, "key": key}
            for b, (t, e) in timings.items()]


def write_table(path, rows, env=None):
    env = env or tuning.environment(CPU)
    tuning.write(path, tuning.merge(None, tuning.build_table(rows, env)))


def test_m_buckets_are_powers_of_two_rounding_up():
    assert [tuning.m_bucket(m) for m in (1, 2, 3, 16, 17, 4096, 5000)] == [1, 2, 4, 16, 32, 4096, 8192]


def test_key_names_blocks_relative_to_the_tensor_and_every_dtype():
    op, variant, n, k, m = tuning.key_of(quantize_problem(4, 256, "row"))
    assert (op, n, k, m) == ("quantize", 0, 256, 4)
    assert variant == "row:1x*:bfloat16->float8_e4m3fn"
    assert tuning.key_of(quantize_problem(4, 256, "group"))[1].startswith("group:1x128:")


def test_ties_go_to_the_smaller_error_and_the_rest_stay_in_time_order():
    ranked = tuning.rank([
        {"backend": "a", "median_s": 1.00, "error": 2e-5},
        {"backend": "b", "median_s": 1.01, "error": 1e-6},  # within 2%: tied with a, better error
        {"backend": "c", "median_s": 1.50, "error": 0.0},
        {"backend": "d", "median_s": float("nan"), "error": 0.0},  # never a candidate
    ])
    assert [r["backend"] for r in ranked] == ["b", "a", "c"]


def test_a_backend_whose_host_time_is_near_its_kernel_time_ranks_by_its_host_time():
    """An eager model pays the longer of a call's GPU time and its host time counted twice (the
    host also issues the work around each GEMM): a library backend with a 20 µs kernel and 80 µs of
    Python and launches ranks last; one with a 35 µs kernel and 40 µs of host time ranks behind a
    45 µs kernel that costs the host 10; a row without a host time ranks by its GPU time, as tables
    measured before host times were recorded did."""
    assert tuning.HOST_WEIGHT == 2.0
    ranked = tuning.rank([
        {"backend": "library", "median_s": 20e-6, "host_s": 80e-6, "error": 0.0},
        {"backend": "busy", "median_s": 35e-6, "host_s": 40e-6, "error": 0.0},
        {"backend": "bound", "median_s": 45e-6, "host_s": 10e-6, "error": 0.0},
        {"backend": "old", "median_s": 60e-6, "error": 0.0},
    ])
    assert [r["backend"] for r in ranked] == ["bound", "old", "busy", "library"]
    p = quantize_problem()
    rows = rows_for(p, {"library": (20e-6, 0.0), "bound": (45e-6, 0.0)})
    rows[0]["host_s"], rows[1]["host_s"] = 80e-6, 10e-6
    (entry,) = tuning.build_table(rows, tuning.environment(CPU))["entries"]
    assert [(r["backend"], r["host_s"]) for r in entry["ranking"]] == [("bound", 10e-6), ("library", 80e-6)]


def test_round_trip_and_merge_keep_one_table_per_environment(tables):
    p = quantize_problem()
    write_table(tables, rows_for(p, {"reference": (2e-5, 0.0)}))
    document = tuning.read(tables)
    assert document["format"] == tuning.FORMAT and len(document["tables"]) == 1
    entry = document["tables"][0]["entries"][0]
    assert (entry["op"], entry["k"], entry["m_bucket"]) == ("quantize", 256, 4)
    other = quantize_problem(m=64)
    merged = tuning.merge(document, tuning.build_table(rows_for(other, {"reference": (3e-5, 0.0)}),
                                                       tuning.environment(CPU)))
    assert len(merged["tables"]) == 1 and len(merged["tables"][0]["entries"]) == 2
    foreign = tuning.merge(merged, tuning.build_table(rows_for(other, {"reference": (1e-5, 0.0)}),
                                                      {"device": "Other GPU", "capability": [8, 9], "libraries": {}}))
    assert len(foreign["tables"]) == 2


def test_a_failed_write_leaves_the_old_file_whole(tables, monkeypatch):
    write_table(tables, rows_for(quantize_problem(), {"reference": (2e-5, 0.0)}))
    before = tables.read_text()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_table(tables, rows_for(quantize_problem(m=64), {"reference": (2e-5, 0.0)}))
    assert tables.read_text() == before
    assert sorted(os.listdir(tables.parent)) == ["routing.json", "shipped"]  # no temporary file left


def test_the_table_changes_autos_choice(tables):
    calls = []
    fp8dispatch.register_backend(fake("slow", priority=60, calls=calls))
    fp8dispatch.register_backend(fake("quick", priority=-60, calls=calls))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    fp8dispatch.quantize(x, "group")
    assert calls == ["slow"]  # static priority, before any table
    p = quantize_problem()
    write_table(tables, rows_for(p, {"slow": (9e-5, 0.0), "quick": (1e-5, 0.0), "reference": (5e-5, 0.0)}))
    fp8dispatch.refresh()
    fp8dispatch.quantize(x, "group")
    assert calls == ["slow", "quick"]
    assert "chosen: quick" in fp8dispatch.explain("quantize", x, "group")


def test_a_user_choice_still_wins_over_the_table(tables, monkeypatch):
    calls = []
    fp8dispatch.register_backend(fake("slow", priority=60, calls=calls))
    fp8dispatch.register_backend(fake("quick", priority=-60, calls=calls))
    write_table(tables, rows_for(quantize_problem(), {"slow": (9e-5, 0.0), "quick": (1e-5, 0.0)}))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    fp8dispatch.quantize(x, "group", backend="slow")
    registry.refresh()
    monkeypatch.setenv("FP8DISPATCH_QUANTIZE_BACKEND", "slow")
    registry.refresh()
    fp8dispatch.quantize(x, "group")
    assert calls == ["slow", "slow"]


def test_a_ranked_backend_that_cannot_run_falls_to_the_next(tables):
    calls = []
    picky = Backend(name="picky", probe=lambda: None, why_not=lambda op, p, found: ["K=256: needs K % 1000 == 0"],
                    quantize=reference.quantize, priority=-50)
    fp8dispatch.register_backend(picky)
    fp8dispatch.register_backend(fake("quick", priority=-60, calls=calls))
    fp8dispatch.register_backend(fake("other", priority=-70, calls=calls))
    write_table(tables, rows_for(quantize_problem(), {"gone": (1e-6, 0.0), "picky": (2e-6, 0.0),
                                                      "other": (1e-5, 0.0), "quick": (5e-5, 0.0)}))
    fp8dispatch.quantize(torch.randn(4, 256, dtype=torch.bfloat16), "group")
    assert calls == ["other"]  # "gone" is not registered here and "picky" cannot run it


def test_the_nearest_measured_m_bucket_serves_unmeasured_m(tables):
    fp8dispatch.register_backend(fake("quick", priority=-60))
    write_table(tables, rows_for(quantize_problem(m=4), {"quick": (1e-5, 0.0), "reference": (5e-5, 0.0)})
                + rows_for(quantize_problem(m=512), {"quick": (9e-5, 0.0), "reference": (5e-5, 0.0)}))
    assert tuning.lookup(quantize_problem(m=8)) == "quick"
    assert tuning.lookup(quantize_problem(m=300)) == "reference"


@pytest.mark.parametrize("content, why", [
    ("{not json", "not JSON"),
    (json.dumps({"format": "something-else", "schema": 1, "tables": []}), "format"),
    (json.dumps({"format": tuning.FORMAT, "schema": 99, "tables": []}), "schema"),
    (json.dumps({"format": tuning.FORMAT, "schema": 1, "tables": [{"environment": {"device": "cpu",
     "capability": None, "libraries": {}}, "entries": [{"op": "quantize", "variant": "v", "n": 0, "k": 8,
     "m_bucket": 3, "ranking": [{"backend": "x", "median_s": 1.0, "error": 0.0}]}]}]}), "power of two"),
    (json.dumps({"format": tuning.FORMAT, "schema": 1, "tables": [{"environment": {"device": "cpu",
     "capability": None, "libraries": {}}, "entries": [{"op": "quantize", "variant": "v", "n": 0, "k": 8,
     "m_bucket": 4, "ranking": [{"backend": "__import__('os')", "median_s": 1.0, "error": 0.0}]}]}]}), "backend names"),
    (json.dumps({"format": tuning.FORMAT, "schema": 1, "tables": [{"environment": {"device": "cpu",
     "capability": None, "libraries": {}}, "entries": [{"op": "quantize", "variant": "v", "n": 0, "k": 8,
     "m_bucket": 4, "ranking": [{"backend": "x", "median_s": 1.0, "host_s": -1.0, "error": 0.0}]}]}]}), "host_s"),
])
def test_corrupt_files_are_ignored_with_a_warning(tables, content, why):
    fp8dispatch.register_backend(fake("quick", priority=-60))
    tables.write_text(content)
    with pytest.warns(tuning.TuningWarning, match=why):
        assert tuning.lookup(quantize_problem()) is None
    with pytest.raises(tuning.InvalidTable):
        tuning.read(tables)


def test_stale_and_foreign_tables_are_ignored_with_a_warning(tables):
    fp8dispatch.register_backend(fake("quick", priority=-60))
    rows = rows_for(quantize_problem(), {"quick": (1e-5, 0.0), "reference": (5e-5, 0.0)})
    env = tuning.environment(CPU)
    stale = {**env, "libraries": {**env["libraries"], "torch": "1.0.0"}}
    write_table(tables, rows, stale)
    with pytest.warns(tuning.TuningWarning, match="other libraries: torch 1.0.0"):
        assert tuning.lookup(quantize_problem()) is None
    write_table(tables, rows, {**env, "device": "NVIDIA Imaginary 1"})
    fp8dispatch.refresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a GPU's table says nothing about CPU calls: no warning
        assert tuning.lookup(quantize_problem()) is None


def test_a_table_for_another_architecture_warns(tables, monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setitem(tuning._identities, gpu, ("NVIDIA Imaginary 2", [9, 0]))  # no GPU needed
    p = problems.quantize_problem(gpu, (4, 256), (1, 128), capability=(9, 0))
    env = {"device": "NVIDIA Imaginary 1", "capability": [8, 9], "libraries": tuning.libraries()}
    write_table(tables, rows_for(p, {"reference": (1e-5, 0.0)}), env)
    with pytest.warns(tuning.TuningWarning, match="measured on NVIDIA Imaginary 1, this is NVIDIA Imaginary 2"):
        assert tuning.lookup(p) is None


def test_a_shipped_table_serves_when_the_user_has_none(tables):
    fp8dispatch.register_backend(fake("quick", priority=-60))
    write_table(tuning.SHIPPED_DIR / "cpu.json", rows_for(quantize_problem(), {"quick": (1e-5, 0.0)}))
    assert not tables.exists()
    assert tuning.lookup(quantize_problem()) == "quick"


def test_off_disables_every_table(tables, sandbox):
    fp8dispatch.register_backend(fake("quick", priority=-60))
    write_table(tables, rows_for(quantize_problem(), {"quick": (1e-5, 0.0)}))
    write_table(tuning.SHIPPED_DIR / "cpu.json", rows_for(quantize_problem(), {"quick": (1e-5, 0.0)}))
    sandbox.env(FP8DISPATCH_TUNING="off")
    assert tuning.user_path() is None and tuning.sources() == []
    assert tuning.lookup(quantize_problem()) is None
    assert "chosen: quick" not in fp8dispatch.explain("quantize", torch.randn(4, 256, dtype=torch.bfloat16), "group")


def test_the_hook_is_installed_once():
    assert registry.routing_hooks.count(tuning.lookup) == 1
    tuning.install()
    assert registry.routing_hooks.count(tuning.lookup) == 1


def test_status_says_what_serves_a_device(tables, sandbox):
    assert any("none" in line for line in tuning.status(CPU))
    write_table(tables, rows_for(quantize_problem(), {"reference": (1e-5, 0.0)}))
    fp8dispatch.refresh()
    assert any("1 (op, variant, N, K) keys" in line for line in tuning.status(CPU))
    sandbox.env(FP8DISPATCH_TUNING="off")
    assert tuning.status(CPU) == ["routing by the static order: routing tables are off (FP8DISPATCH_TUNING=off)"]
