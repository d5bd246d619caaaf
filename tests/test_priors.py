"""A GPU without a table of its own: the closest measured GPU of its architecture serves as a prior,
and `info` and `explain` say where routing comes from."""

import pytest
import torch

import fp8dispatch
from fp8dispatch import tuning
from fp8dispatch.devices import gpu_slug
from fp8dispatch.problem import QuantizeProblem
from test_tuning import fake, rows_for, tables, write_table  # noqa: F401 - tables is a fixture

GPU = torch.device("cuda", 0)


@pytest.fixture
def on_gpu(tables, monkeypatch):
    """Pretend this process runs on `name` (capability [9, 0]); returns a setter. No GPU needed."""

    def be(name, capability=(9, 0)):
        monkeypatch.setitem(tuning._identities, GPU, (name, list(capability)))
        fp8dispatch.refresh()

    fp8dispatch.register_backend(fake("quick", priority=-60))
    fp8dispatch.register_backend(fake("other", priority=-70))
    return be


def problem(capability=(9, 0)):
    return QuantizeProblem(GPU, capability, torch.bfloat16, (4, 256), True, (1, 128), torch.float8_e4m3fn,
                           False, False, False)


def env(device, capability=(9, 0)):
    return {"device": device, "capability": list(capability), "libraries": tuning.libraries()}


def ship(device, fastest, capability=(9, 0), measured="2026-01-01"):
    """A shipped table measured on `device` in which `fastest` wins."""
    table = tuning.build_table(rows_for(problem(capability), {fastest: (1e-5, 0.0), "reference": (5e-5, 0.0)}),
                               env(device, capability))
    table["measured"] = measured
    tuning.write(tuning.SHIPPED_DIR / f"{gpu_slug(device)}.json", tuning.merge(None, table))


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H200 NVL", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"), ("", "unknown"),
])
def test_gpu_slugs(name, slug):
    assert gpu_slug(name) == slug


def test_output_paths_take_the_gpus_short_name():
    from fp8dispatch.cli.bench import named

    assert named("docs/results/{gpu}/benchmarks", {"device": "NVIDIA H200"}) == "docs/results/h200/benchmarks"
    assert named("plain/path", {"device": "NVIDIA H200"}) == "plain/path" and named(None, {"device": "x"}) is None


def test_the_exact_table_wins_over_a_prior(on_gpu):
    ship("NVIDIA H100 80GB HBM3", "quick", measured="2025-01-01")
    ship("NVIDIA H200", "other", measured="2026-01-01")
    on_gpu("NVIDIA H100 80GB HBM3")
    assert tuning.lookup(problem()) == "quick"
    assert tuning.routing_source(GPU).startswith("routing from the NVIDIA H100 80GB HBM3 table (measured on this GPU)")


def test_an_unmeasured_gpu_borrows_the_newest_table_of_its_architecture(on_gpu):
    ship("NVIDIA H100 80GB HBM3", "quick", measured="2025-01-01")
    ship("NVIDIA H200", "other", measured="2026-01-01")
    on_gpu("NVIDIA H800")
    assert tuning.lookup(problem()) == "other"
    assert tuning.routing_source(GPU) == ("routing from the NVIDIA H200 table (same sm90); "
                                          "run `fp8dispatch tune` to measure this GPU")


def test_the_same_name_family_comes_before_the_newest(on_gpu):
    ship("NVIDIA H100 80GB HBM3", "quick", measured="2025-01-01")
    ship("NVIDIA H200", "other", measured="2026-01-01")
    on_gpu("NVIDIA H100 PCIe")
    assert tuning.lookup(problem()) == "quick"
    assert "the NVIDIA H100 80GB HBM3 table (same sm90)" in tuning.routing_source(GPU)


def test_the_users_own_table_beats_shipped_ones(on_gpu, tables):
    ship("NVIDIA H200", "other")
    write_table(tables, rows_for(problem(), {"quick": (1e-5, 0.0)}), env("NVIDIA H200"))
    on_gpu("NVIDIA H200")
    assert tuning.lookup(problem()) == "quick"
    assert tuning.routing_source(GPU).startswith(f"routing from your table {tables} (NVIDIA H200) and the "
                                                 "NVIDIA H200 table (measured on this GPU)")


def test_a_prior_fills_the_shapes_the_own_table_lacks(on_gpu, tables):
    ship("NVIDIA H200", "other")
    elsewhere = QuantizeProblem(GPU, (9, 0), torch.bfloat16, (4, 512), True, (1, 128), torch.float8_e4m3fn,
                                False, False, False)
    write_table(tables, rows_for(elsewhere, {"quick": (1e-5, 0.0)}), env("NVIDIA H200 NVL"))
    on_gpu("NVIDIA H200 NVL")
    assert tuning.lookup(elsewhere) == "quick"
    assert tuning.lookup(problem()) == "other"
    assert tuning.routing_source(GPU).endswith(", then the NVIDIA H200 table (same sm90) for shapes not measured here")


def test_another_architecture_routes_by_the_static_order_and_says_so(on_gpu):
    ship("NVIDIA H200", "other")
    on_gpu("NVIDIA L40S", (8, 9))
    assert tuning.lookup(problem((8, 9))) is None
    assert tuning.routing_source(GPU) == ("routing by the static order (no table measured on an sm89 GPU); "
                                          "run `fp8dispatch tune` to measure this GPU")


def test_info_and_explain_name_the_source(tables):
    cpu = torch.device("cpu")
    assert tuning.status(cpu)[0] == tuning.routing_source(cpu)
    text = fp8dispatch.explain("quantize", torch.randn(4, 256, dtype=torch.bfloat16), "group")
    assert text.splitlines()[-1] == tuning.routing_source(cpu)
