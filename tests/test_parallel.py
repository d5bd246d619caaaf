"""Tensor- and expert-parallel FP8 layers on the CPU: 4 gloo processes, spawned once for the module.

Each process runs every scenario (on the 4-rank group, on 2-rank and 3-rank subgroups, on a device
mesh) and records what it saw; the tests below assert on those records, rank by rank. The math:
column-parallel computes the same dot products as one process, so its outputs are equal bit for
bit; row-parallel sums partial products over ranks, a different rounding order, so it is held to
the conformance bound; expert-parallel adds zeros to each rank's rows, which is exact.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 4
D, F = 256, 512  # model and feed-forward sizes: F is four 128-wide scale blocks, split over 1, 2 or 4 ranks
G, H, I = 4, 256, 128
OFFSETS = [0, 3, 3, 9, 10]


class Mlp(nn.Module):
    def __init__(self, d=D, ffn=F, bias=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=bias), nn.Linear(d, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, d, bias=bias)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


PLAN = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}


def _x(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the record names the type; the test checks it
        return f"{type(e).__name__}: {e}"
    return None


def _linear_scenarios(rec, rank, groups):
    from fp8dispatch.nn import Fp8Linear
    from fp8dispatch.nn.parallel import Fp8ColwiseLinear, Fp8RowwiseLinear
    from fp8dispatch.numerics import relative_error

    torch.manual_seed(0)
    dense = nn.Linear(D, F)
    x = _x(8, D)
    for world in (2, 4):
        group = groups[world]
        member = dist.get_rank(group) >= 0
        for recipe in ("block", "row", "tensor"):
            full = Fp8Linear.from_linear(dense, recipe, backend="reference")
            torch.manual_seed(11)  # the same weights on every rank, whichever scenarios it skipped
            rows = Fp8Linear.from_linear(nn.Linear(F, D), recipe, backend="reference")
            if not member:
                continue
            r = dist.get_rank(group)
            want = full(x)
            gathered = Fp8ColwiseLinear.shard(full, group, gather_output=True)
            local = Fp8ColwiseLinear.shard(full, group)
            share = F // world
            rec[f"colwise {recipe} w{world}"] = (torch.equal(gathered(x), want)
                                                 and torch.equal(local(x), want[:, r * share:(r + 1) * share]))
            xr = _x(8, F, seed=2)
            want = rows(xr)
            part = xr[:, r * (F // world):(r + 1) * (F // world)]
            for reduce in (None, torch.float32):
                y = Fp8RowwiseLinear.shard(rows, group, reduce_dtype=reduce)(part)
                rec[f"rowwise {recipe} w{world} {reduce}"] = (y.dtype, relative_error(y, want))
    with torch.enable_grad():
        rec["rowwise grad"] = _catch(lambda: Fp8RowwiseLinear.shard(rows)(part.detach().requires_grad_()))
    rec["rowwise wrong input"] = _catch(lambda: Fp8RowwiseLinear.shard(rows)(xr))
    odd = Fp8Linear.from_linear(nn.Linear(384, 384), backend="reference")
    if dist.get_rank(groups[2]) >= 0:
        rec["misaligned N"] = _catch(lambda: Fp8ColwiseLinear.shard(odd, groups[2]))
        rec["misaligned K"] = _catch(lambda: Fp8RowwiseLinear.shard(odd, groups[2]))
    rec["reduce dtype"] = _catch(lambda: Fp8RowwiseLinear.shard(full, reduce_dtype=torch.int32))


def _model_scenarios(rec, rank, groups):
    from torch.distributed.device_mesh import init_device_mesh

    from fp8dispatch.nn import convert
    from fp8dispatch.nn.parallel import parallelize
    from fp8dispatch.numerics import relative_error

    torch.manual_seed(3)
    single = Mlp()
    convert(single, backend="reference")
    x = _x(6, D, seed=4)
    want = single(x)
    mesh = init_device_mesh("cpu", (WORLD,))
    for name, where in (("mesh", mesh), ("group2", groups[2])):
        if dist.get_rank(groups[2]) < 0 and name == "group2":
            continue
        model = copy.deepcopy(single)
        parallelize(model, PLAN, where)
        rec[f"mlp {name}"] = relative_error(model(x), want)
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    rec["2-d mesh"] = _catch(lambda: parallelize(Mlp(), PLAN, mesh2d))
    rec["1-d of 2-d mesh"] = _catch(lambda: parallelize(_converted(), PLAN, mesh2d["tp"]))
    rec["not converted"] = _catch(lambda: parallelize(Mlp(), PLAN))
    rec["bad style"] = _catch(lambda: parallelize(_converted(), {"gate_proj": "diagonal"}))
    rec["no match"] = _catch(lambda: parallelize(_converted(), {"layers.*.q": "colwise"}))
    untouched = _converted()
    untouched.down_proj = type(untouched.down_proj).from_linear(nn.Linear(384, D), backend="reference")
    before = [type(m).__name__ for m in untouched.modules()]
    rec["all or nothing"] = (_catch(lambda: parallelize(untouched, PLAN)),
                             [type(m).__name__ for m in untouched.modules()] == before)


def _converted():
    from fp8dispatch.nn import convert

    model = Mlp()
    convert(model, backend="reference")
    return model


def _checkpoint_scenarios(rec, rank, groups, folder):
    from safetensors.torch import save_file

    from fp8dispatch.nn import load_fp8_checkpoint
    from fp8dispatch.nn.parallel_checkpoint import load_fp8_checkpoint_sharded
    from fp8dispatch.numerics import relative_error

    torch.manual_seed(5)
    source = Mlp(bias=True)
    path, bad = os.path.join(folder, "model.safetensors"), os.path.join(folder, "bad.safetensors")
    if rank == 0:
        model = Mlp(bias=True)
        model.load_state_dict(source.state_dict())
        from fp8dispatch.nn import convert

        convert(model, backend="reference")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, path)
        scale = state["down_proj.weight_scale_inv"].clone()
        scale[0, -1] = 0.0  # in the last rank's columns only
        save_file({**state, "down_proj.weight_scale_inv": scale}, bad)
    dist.barrier()
    x = _x(6, D, seed=6)
    with torch.device("meta"):
        whole = Mlp(bias=True)
    load_fp8_checkpoint(whole, path, backend="reference")
    want = whole(x)
    with torch.device("meta"):
        model = Mlp(bias=True)
    report = load_fp8_checkpoint_sharded(model, path, PLAN, backend="reference")
    share = F // WORLD
    rec["sharded load"] = (
        relative_error(model(x), want), sorted(report.fp8_layers),
        type(model.gate_proj).__name__, type(model.down_proj).__name__, tuple(model.down_proj.weight.shape),
        torch.equal(model.down_proj.weight.view(torch.uint8),
                    whole.down_proj.weight[:, rank * share:(rank + 1) * share].view(torch.uint8)),
        torch.equal(model.down_proj.weight_scale_inv, whole.down_proj.weight_scale_inv[:, rank:rank + 1]),
        torch.equal(model.gate_proj.bias, whole.gate_proj.bias[rank * share:(rank + 1) * share]),
        torch.equal(model.down_proj.bias, whole.down_proj.bias))
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = Mlp(bias=True)
    load_fp8_checkpoint_sharded(model, load_file(path), {"gate_proj": "colwise_gather", "up_proj": "colwise_gather"},
                                backend="reference")
    rec["state dict, gathered"] = (relative_error(model(x), want), type(model.up_proj).__name__,
                                   tuple(model.up_proj.weight.shape), model.up_proj.gather_output)
    with torch.device("meta"):
        model = Mlp(bias=True)
    rec["bad scale"] = (_catch(lambda: load_fp8_checkpoint_sharded(model, bad, PLAN, backend="reference")),
                        type(model.down_proj).__name__)
    with torch.device("meta"):
        model = Mlp(bias=True)
    rec["misaligned load"] = (_catch(lambda: load_fp8_checkpoint_sharded(model, path, {"down_proj": "colwise"})),
                              type(model.down_proj).__name__)


def _expert_scenarios(rec, rank, groups):
    import fp8dispatch as fd
    from fp8dispatch.nn import Fp8Experts
    from fp8dispatch.nn.expert_parallel import Fp8ExpertParallel

    gen = torch.Generator().manual_seed(7)
    gate, up = torch.randn(G, I, H, generator=gen) / 16, torch.randn(G, I, H, generator=gen) / 16
    down = torch.randn(G, H, I, generator=gen) / 11
    whole = Fp8Experts.from_weights(gate, up, down, backend="reference")
    x, offsets = _x(10, H, seed=8), torch.tensor(OFFSETS)
    masked_x = _x(G * 3, H, seed=9).view(G, 3, H)
    masked_m = torch.tensor([3, 0, 1, 2], dtype=torch.int32)
    want, want_masked = whole(x, offsets), whole(masked_x, masked_m=masked_m)
    tensors = {}
    for e in range(G):
        for name, w in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            q = fd.quantize(w, "block", backend="reference")
            tensors[f"mlp.experts.{e}.{name}.weight"], tensors[f"mlp.experts.{e}.{name}.weight_scale_inv"] = q.data, q.scale
    for world, group in groups.items():
        if dist.get_rank(group) < 0:
            continue
        if world == 3:
            rec["experts w3"] = _catch(lambda: Fp8ExpertParallel.shard(whole, group))
            continue
        ep = Fp8ExpertParallel.shard(whole, group)
        loaded = Fp8ExpertParallel.from_deepseek(tensors, "mlp.", num_experts=G, mesh=group, backend="reference")
        rec[f"experts w{world}"] = (torch.equal(ep(x, offsets), want), torch.equal(loaded(x, offsets), want),
                                    torch.equal(ep(masked_x, masked_m=masked_m), want_masked),
                                    ep.local.num_experts)


def _worker(rank, folder):
    os.environ.setdefault("FP8DISPATCH_BACKEND", "reference")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    groups = {WORLD: dist.group.WORLD, 2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2])}
    rec = {}
    with torch.no_grad():
        for scenarios in (_linear_scenarios, _model_scenarios, _expert_scenarios):
            scenarios(rec, rank, groups)
        _checkpoint_scenarios(rec, rank, groups, folder)
    torch.save(rec, os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def records():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(folder,), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_column_parallel_equals_one_process_bit_for_bit(records):
    for rank, rec in enumerate(records):
        for world in (2, 4):
            for recipe in ("block", "row", "tensor"):
                if rank < world:
                    assert rec[f"colwise {recipe} w{world}"] is True, (rank, world, recipe)


def test_row_parallel_is_within_the_conformance_bound_in_either_reduce_dtype(records):
    from fp8dispatch.numerics import ERROR_BOUND

    for rank, rec in enumerate(records):
        for world in (2, 4):
            for recipe in ("block", "row", "tensor"):
                for reduce in (None, torch.float32):
                    if rank < world:
                        dtype, error = rec[f"rowwise {recipe} w{world} {reduce}"]
                        assert dtype == torch.bfloat16 and error < ERROR_BOUND, (rank, world, recipe, reduce, error)
        # summing fp32 partials and rounding once loses less than rounding each partial to bf16
        assert rec["rowwise block w4 torch.float32"][1] <= rec["rowwise block w4 None"][1]


def test_misaligned_shards_name_the_world_sizes_that_work(records):
    for rec in records[:2]:
        assert rec["misaligned N"].startswith("ShardMisaligned: weight N (output features): 384 cannot be split "
                                              "evenly over 2 ranks on 128-wide scale blocks")
        assert rec["misaligned N"].endswith("world sizes that split weight N (output features)=384: 1, 3")
        assert "weight K (input features): 384" in rec["misaligned K"]
    for rec in records:
        assert rec["reduce dtype"].startswith("Fp8TypeError: reduce_dtype: expected None")
        assert rec["rowwise grad"].startswith("Fp8ValueError: x: tensor-parallel FP8 layers run inference only")
        assert rec["rowwise wrong input"].startswith("Fp8ValueError: x: expected this rank's 128 of 512 input features")


def test_a_parallelized_model_matches_one_process_on_a_mesh_and_a_subgroup(records):
    from fp8dispatch.numerics import ERROR_BOUND

    for rank, rec in enumerate(records):
        assert rec["mlp mesh"] < ERROR_BOUND
        if rank < 2:
            assert rec["mlp group2"] < ERROR_BOUND


def test_bad_meshes_and_plans_are_typed_errors_and_change_nothing(records):
    for rec in records:
        assert rec["2-d mesh"].startswith("Fp8ValueError: mesh: expected a 1-D DeviceMesh") and "('dp', 'tp')" in rec["2-d mesh"]
        assert rec["1-d of 2-d mesh"] is None
        assert rec["not converted"].startswith("Fp8TypeError: plan['gate_proj']: expected an Fp8Linear")
        assert rec["bad style"].startswith("Fp8ValueError: plan['gate_proj']: expected one of colwise, rowwise")
        assert rec["no match"] == "Fp8ValueError: plan['layers.*.q']: matches no module of the model"
        error, unchanged = rec["all or nothing"]
        assert error.startswith("ShardMisaligned: down_proj.weight K (input features): 384") and unchanged


def test_each_rank_loads_only_its_slice_of_a_checkpoint(records):
    from fp8dispatch.numerics import ERROR_BOUND

    for rec in records:
        error, layers, gate_type, down_type, shape, weight, scale, gate_bias, down_bias = rec["sharded load"]
        assert error < ERROR_BOUND and layers == ["down_proj", "gate_proj", "up_proj"]
        assert (gate_type, down_type, shape) == ("Fp8ColwiseLinear", "Fp8RowwiseLinear", (D, F // WORLD))
        assert weight and scale and gate_bias and down_bias


def test_a_state_dict_loads_sharded_too_and_gathered_outputs_are_whole(records):
    for rec in records:
        error, kind, shape, gathered = rec["state dict, gathered"]
        assert error == 0.0 and (kind, shape, gathered) == ("Fp8ColwiseLinear", (F // WORLD, D), True)


def test_a_bad_slice_on_one_rank_fails_every_rank(records):
    for rank, rec in enumerate(records):
        error, down_type = rec["bad scale"]
        assert down_type == "Linear", "the planned layers are put back"
        if rank == WORLD - 1:
            assert error.startswith("Fp8ValueError: down_proj.weight_scale_inv: expected positive finite scales")
        else:
            assert error.startswith(f"Fp8ValueError: checkpoint: rank {WORLD - 1} could not load its shard")
        error, down_type = rec["misaligned load"]
        assert error.startswith("ShardMisaligned: down_proj.weight N (output features): 256") and down_type == "Linear"


def test_expert_parallel_equals_one_process_bit_for_bit(records):
    for rank, rec in enumerate(records):
        sliced, loaded, masked, local = rec[f"experts w{WORLD}"]
        assert sliced and loaded and masked and local == G // WORLD
        if rank < 2:
            assert rec["experts w2"] == (True, True, True, G // 2)
        if rank < 3:
            assert rec["experts w3"] == ("ShardMisaligned: num_experts: 4 experts cannot be split evenly over "
                                         "3 ranks; world sizes that split them: 1, 2, 4")


def test_without_torch_distributed_the_error_says_how_to_start_it():
    from fp8dispatch.errors import Fp8ValueError
    from fp8dispatch.nn.parallel import parallelize

    with pytest.raises(Fp8ValueError, match="mesh: torch.distributed is not initialized"):
        parallelize(Mlp(), PLAN)


def test_the_gpu_script_runs_on_two_cpu_processes(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "verify_tp_gpu.py"
    out = tmp_path / "tp.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), "--device", "cpu", "--dim", "256", "--ffn", "512", "--heads", "4",
                          "--tokens", "32", "--backend", "reference", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2 and report["checks"]["error below 1e-3"]
    assert report["checks"]["weights at most 1/world (+ scales)"] and report["weight_fraction"] == 0.5
