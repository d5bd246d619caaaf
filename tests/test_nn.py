"""fp8dispatch.nn: Fp8Linear (recipes, state, gradients) and convert() with its report."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import fp8dispatch
from fp8dispatch import Backend, Fp8TypeError, Fp8ValueError, register_backend
from fp8dispatch.backends import reference
from fp8dispatch.nn import Fp8Linear, convert, linear_weight_bytes
from fp8dispatch.numerics import ERROR_BOUND, relative_error


@pytest.fixture(autouse=True)
def reference_backend(sandbox):
    sandbox.env(FP8DISPATCH_BACKEND="reference")
    return sandbox


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _linear(k, n, bias=True, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


# --- Fp8Linear --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,block,scale", [
    ("block", (128, 128), (3, 3)), ("row", (1, 300), (320, 1)), ("tensor", (320, 300), (1, 1)),
])
def test_from_linear_stores_fp8_weight_and_scales_by_recipe(recipe, block, scale):
    lin = _linear(300, 320)
    layer = Fp8Linear.from_linear(lin, recipe)
    assert layer.weight.dtype == torch.float8_e4m3fn and tuple(layer.weight.shape) == (320, 300)
    assert layer.weight_scale_inv.dtype == torch.float32 and tuple(layer.weight_scale_inv.shape) == scale
    assert layer.block == block and layer.recipe == recipe
    x = _randn(4, 7, 300, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (4, 7, 320) and y.dtype == torch.bfloat16
    assert relative_error(y, lin(x)) < ERROR_BOUND
    # the module is exactly the functional API on the same FP8 weight
    assert torch.equal(y, fp8dispatch.linear(x, layer.fp8_weight(), layer.bias))


def test_from_fp8_reads_the_block_off_the_scale_shape():
    q = fp8dispatch.quantize(_randn(200, 136), "block")
    assert Fp8Linear.from_fp8(q.data, q.scale).block == (128, 128)
    r = fp8dispatch.quantize(_randn(200, 136), "row")
    assert Fp8Linear.from_fp8(r.data, r.scale).recipe == "row"
    with pytest.raises(Fp8ValueError, match=r"weight_scale_inv: expected shape \(2, 2\).*got \(3, 5\)"):
        Fp8Linear.from_fp8(q.data, torch.ones(3, 5))
    with pytest.raises(Fp8TypeError, match="weight: expected an FP8 tensor"):
        Fp8Linear.from_fp8(_randn(200, 136), q.scale)


def test_state_dict_round_trips_and_refuses_high_precision_weights():
    layer = Fp8Linear.from_linear(_linear(256, 192))
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale_inv", "bias"}
    fresh = Fp8Linear(256, 192)
    fresh.load_state_dict(state)
    x = _randn(5, 256, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(Fp8TypeError, match="weight: expected torch.float8_e4m3fn data"):
        fresh.load_state_dict(_linear(256, 192).state_dict(), strict=False)


def test_dtype_moves_keep_fp8_data_and_fp32_scales():
    layer = Fp8Linear.from_linear(_linear(256, 128, dtype=torch.float32))
    weight = layer.weight.clone()
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))
    assert layer.bias.dtype == torch.float16


def test_extra_repr_shows_recipe_and_backend():
    text = repr(Fp8Linear.from_linear(_linear(256, 128), "row", backend="reference"))
    assert "recipe=row" in text and "backend=reference (matmul on reference at M=128)" in text


def test_gradients_reach_the_input_from_the_dequantized_weight():
    lin = _linear(256, 192)
    lin.bias.requires_grad_(True)
    layer = Fp8Linear.from_linear(lin)
    assert layer.bias.requires_grad and not layer.weight.requires_grad
    x = _randn(3, 4, 256, dtype=torch.bfloat16).requires_grad_(True)
    grad = _randn(3, 4, 192, dtype=torch.bfloat16, seed=1)
    layer(x).backward(grad)
    assert torch.equal(x.grad, grad @ layer.dequantized_weight(torch.bfloat16))
    assert torch.equal(layer.bias.grad, grad.reshape(-1, 192).sum(0))
    assert layer.weight.grad is None


# --- convert ----------------------------------------------------------------------------------


def _load_script_block():
    """The block scripts/verify_nn_gpu.py converts and compiles on the GPU: the CPU tests use the same one."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "verify_nn_gpu.py"
    spec = importlib.util.spec_from_file_location("verify_nn_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Block


Block = _load_script_block()


def _block():
    torch.manual_seed(0)
    return Block(d=256, ffn=768, heads=4).to(torch.bfloat16)


def test_convert_swaps_every_plain_linear_and_stays_within_the_bound():
    model = _block()
    bf16 = copy.deepcopy(model)
    report = convert(model)
    assert [c.name for c in report.converted] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert not report.skipped and all(c.backend == "reference" for c in report.converted)
    assert all(isinstance(getattr(model, n), Fp8Linear) for n in ("q", "down"))
    x = _randn(2, 16, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(model(x), bf16(x)) < ERROR_BOUND


def test_converted_linear_weights_take_about_half_the_bytes():
    model = _block()
    before = linear_weight_bytes(model)
    report = convert(model)
    after = linear_weight_bytes(model)
    # bf16: 2 bytes per weight; FP8: 1 byte plus one fp32 scale per 128×128 block
    assert before == 2 * (4 * 256 * 256 + 3 * 256 * 768)
    assert after == before // 2 + 4 * (4 * 2 * 2 + 3 * 2 * 6)
    assert (report.bytes_before, report.bytes_after) == (before, after)
    assert 0.500 < after / before < 0.501


def test_convert_reports_every_skip_with_its_reason():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4)
            self.head = nn.Linear(64, 100, bias=False)
            self.embed = nn.Embedding(100, 64)
            self.embed.weight = self.head.weight  # tied
            self.keep = nn.Linear(64, 64)
            self.fc = nn.Linear(64, 64)

    model = Model()
    report = convert(model, filter=lambda module, name: name != "keep")
    assert [c.name for c in report.converted] == ["fc"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"attn.out_proj", "head", "keep"}
    assert "NonDynamicallyQuantizableLinear subclasses nn.Linear" in reasons["attn.out_proj"]
    assert "tied to embed.weight" in reasons["head"]
    assert reasons["keep"] == "excluded by filter"
    assert "skipped 3" in str(report) and "- head: weight is tied" in str(report)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64))
    assert "meta device" in convert(meta).skipped[0].reason
    assert "has no parent" in convert(nn.Linear(64, 64)).skipped[0].reason


def test_a_named_backend_that_cannot_run_a_layer_skips_it_with_its_reasons():
    def why_not(op, problem, found):
        if op == "matmul" and problem.k % 16:
            return [f"K={problem.k}: needs K % 16 == 0"]
        return []

    register_backend(Backend(name="aligned", probe=lambda: None, why_not=why_not,
                             quantize=reference.quantize, dequantize=reference.dequantize,
                             matmul=reference.matmul))
    model = nn.Sequential(nn.Linear(200, 64), nn.Linear(64, 200))
    report = convert(model, backend="aligned")
    assert [c.name for c in report.converted] == ["1"] and report.converted[0].backend == "aligned"
    assert report.skipped[0].name == "0"
    assert "aligned: K=200: needs K % 16 == 0" in report.skipped[0].reason
    # with auto the reference runs the tail, so the same layer converts
    assert [c.name for c in convert(nn.Sequential(nn.Linear(200, 64))).converted] == ["0"]
