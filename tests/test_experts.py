"""Fp8Experts: construction, DeepSeek-V3 per-expert loading (all or nothing), both layouts, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import fp8dispatch as fd
from fp8dispatch.errors import Fp8ValueError
from fp8dispatch.grouped_api import grouped_linear_op
from fp8dispatch.nn import Fp8Experts

G, H, I = 4, 256, 128
OFFSETS = torch.tensor([0, 3, 3, 9, 10])


@pytest.fixture(autouse=True)
def reference(sandbox):
    sandbox.env(FP8DISPATCH_BACKEND="reference")
    torch._dynamo.reset()


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(G, I, H, generator=gen) / 16, torch.randn(G, I, H, generator=gen) / 16,
            torch.randn(G, H, I, generator=gen) / 11)


def _deepseek_tensors(gate, up, down, prefix="model.layers.3.mlp."):
    out = {}
    for e in range(G):
        for name, w in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            q = fd.quantize(w, "block")
            out[f"{prefix}experts.{e}.{name}.weight"] = q.data
            out[f"{prefix}experts.{e}.{name}.weight_scale_inv"] = q.scale
    out[f"{prefix}gate.weight"] = torch.zeros(G, H)  # the router: not the experts' business
    return out


def _x(m, seed=1):
    return torch.randn(m, H, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_forward_is_swiglu_through_two_grouped_calls():
    experts = Fp8Experts.from_weights(*_weights())
    x = _x(10)
    h = fd.grouped_linear(x, experts.gate_up, OFFSETS)
    want = fd.grouped_linear(F.silu(h[:, :I]) * h[:, I:], experts.down, OFFSETS)
    assert torch.equal(experts(x, OFFSETS), want)


def test_deepseek_per_expert_tensors_load_into_the_stacked_form():
    gate, up, down = _weights()
    built = Fp8Experts.from_weights(gate, up, down)
    loaded = Fp8Experts.from_deepseek(_deepseek_tensors(gate, up, down), "model.layers.3.mlp.")
    assert (loaded.num_experts, loaded.hidden_size, loaded.intermediate_size) == (G, H, I)
    for name in ("gate_up_weight", "down_weight"):
        assert torch.equal(getattr(loaded, name).view(torch.uint8), getattr(built, name).view(torch.uint8))
        assert torch.equal(getattr(loaded, name + "_scale_inv"), getattr(built, name + "_scale_inv"))
    x = _x(10)
    assert torch.equal(loaded(x, OFFSETS), built(x, OFFSETS))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("p.experts.2.up_proj.weight_scale_inv"), r"missing p\.experts\.2\.up_proj\.weight_scale_inv"),
    (lambda t: t.__setitem__("p.experts.1.down_proj.weight_scale_inv", torch.ones(1, 1)),
     r"p\.experts\.1\.down_proj\.weight_scale_inv: expected float32 \(2, 1\)"),
    (lambda t: t.__setitem__("p.experts.3.gate_proj.weight", torch.zeros(I, H)),
     r"p\.experts\.3\.gate_proj\.weight: expected torch\.float8_e4m3fn"),
    (lambda t: t.__setitem__("p.experts.4.gate_proj.weight", t["p.experts.0.gate_proj.weight"]),
     "expert 4 is present but this module has num_experts=4"),
])
def test_loading_is_all_or_nothing_with_the_key_named(damage, message):
    experts = Fp8Experts.from_weights(*_weights(seed=5))
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    tensors = _deepseek_tensors(*_weights(), prefix="p.")
    damage(tensors)
    with pytest.raises(Fp8ValueError, match=message):
        experts.load_deepseek(tensors, "p.")
    for k, v in experts.state_dict().items():
        assert torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)), k


def test_constructor_and_loader_reject_bad_arguments():
    with pytest.raises(Fp8ValueError, match="recipe"):
        Fp8Experts(2, 128, 128, recipe="tensor")
    with pytest.raises(Fp8ValueError, match="num_experts: expected a positive int"):
        Fp8Experts(0, 128, 128)
    with pytest.raises(Fp8ValueError, match="intermediate_size: stacking gate and up"):
        Fp8Experts(2, 128, 100).load_deepseek({})
    with pytest.raises(Fp8ValueError, match="no 'experts"):
        Fp8Experts.from_deepseek({"x.weight": torch.zeros(1)})
    with pytest.raises(Fp8ValueError, match=r"down: expected shape \(4, 256, 128\)"):
        Fp8Experts.from_weights(*_weights()[:2], torch.zeros(G, I, H))


def test_masked_layout_matches_contiguous_rows_and_zeroes_the_rest():
    experts = Fp8Experts.from_weights(*_weights())
    x = _x(10)
    contiguous = experts(x, OFFSETS)
    padded = torch.full((G, 6, H), float("nan"), dtype=torch.bfloat16)
    bounds = OFFSETS.tolist()
    for e in range(G):
        padded[e, : bounds[e + 1] - bounds[e]] = x[bounds[e]:bounds[e + 1]]
    masked_m = (OFFSETS[1:] - OFFSETS[:-1]).to(torch.int32)
    out = experts(padded, masked_m=masked_m)
    for e in range(G):
        count = bounds[e + 1] - bounds[e]
        assert torch.equal(out[e, :count], contiguous[bounds[e]:bounds[e + 1]])
        assert (out[e, count:] == 0).all()


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_compiles_fullgraph_and_matches_eager(layout):
    experts = Fp8Experts.from_weights(*_weights())
    if layout == "contiguous":
        args, kwargs = (_x(10), OFFSETS), {}
    else:
        args, kwargs = (_x(G * 3).view(G, 3, H),), {"masked_m": torch.tensor([3, 0, 1, 2], dtype=torch.int32)}
    compiled = torch.compile(experts, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args, **kwargs), experts(*args, **kwargs))


def test_the_grouped_custom_op_passes_opcheck():
    wq = fd.quantize_grouped(_weights()[2])
    xq = fd.quantize(_x(10).float()[:, :I], "group")
    for masked in (False, True):
        x = xq.data.view(2, 5, I) if masked else xq.data
        index = dict(offsets=None, masked_m=torch.tensor([5, 2], dtype=torch.int32)) if masked else \
            dict(offsets=OFFSETS, masked_m=None)
        w = wq if not masked else fd.GroupedFp8Tensor(wq.data[:2], wq.scale[:2], wq.block)
        torch.library.opcheck(grouped_linear_op, (x.view(torch.uint8), x.dtype, xq.scale, list(xq.block),
                                                  w.data.view(torch.uint8), w.dtype, w.scale, list(w.block),
                                                  index["offsets"], index["masked_m"], None, None, torch.bfloat16,
                                                  "auto"))
