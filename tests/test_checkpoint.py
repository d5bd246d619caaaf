"""Loading DeepSeek-V3-style FP8 safetensors checkpoints into Fp8Linear layers."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fp8dispatch
from fp8dispatch import Fp8TypeError, Fp8ValueError
from fp8dispatch.nn import Fp8Linear, convert, load_fp8_checkpoint


@pytest.fixture(autouse=True)
def reference_backend(sandbox):
    sandbox.env(FP8DISPATCH_BACKEND="reference")


class Tiny(nn.Module):
    """Norm + two linears (one with a bias, one with a 200-wide tail) + an unquantized head."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(256)
        self.up = nn.Linear(256, 200)
        self.down = nn.Linear(200, 256, bias=False)
        self.head = nn.Linear(256, 64, bias=False)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(self.norm(x)))))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _deepseek_state():
    """What DeepSeek-V3 ships: FP8 [N, K] weights with [ceil(N/128), ceil(K/128)] fp32 scale_inv."""
    state = {"norm.weight": _randn(256, seed=1).to(torch.bfloat16).abs(),
             "up.bias": _randn(200, seed=2).to(torch.bfloat16),
             "head.weight": _randn(64, 256, seed=3).to(torch.bfloat16)}
    for name, (n, k) in {"up": (200, 256), "down": (256, 200)}.items():
        q = fp8dispatch.quantize(_randn(n, k, seed=n + k), "block")
        state[f"{name}.weight"], state[f"{name}.weight_scale_inv"] = q.data, q.scale
    return state


def _expected(state, x):
    def fp8(name):
        return fp8dispatch.Fp8Tensor(state[f"{name}.weight"], state[f"{name}.weight_scale_inv"], (128, 128))

    h = nn.functional.rms_norm(x, (256,), state["norm.weight"])
    h = torch.relu(fp8dispatch.linear(h, fp8("up"), state["up.bias"]))
    return nn.functional.linear(fp8dispatch.linear(h, fp8("down")), state["head.weight"])


def test_loads_a_safetensors_file_into_fp8_layers(tmp_path):
    state = _deepseek_state()
    assert tuple(state["up.weight_scale_inv"].shape) == (2, 2) and state["up.weight"].dtype == torch.float8_e4m3fn
    save_file(state, tmp_path / "model.safetensors")
    model = Tiny().to(torch.bfloat16)
    report = load_fp8_checkpoint(model, tmp_path / "model.safetensors")
    assert report.fp8_layers == ["down", "up"] and not report.missing and not report.unexpected
    assert sorted(report.loaded) == ["head.weight", "norm.weight"]
    assert isinstance(model.up, Fp8Linear) and isinstance(model.head, nn.Linear)
    assert torch.equal(model.up.weight.view(torch.uint8), state["up.weight"].view(torch.uint8))
    x = _randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), _expected(state, x))


def test_loads_a_sharded_directory_into_a_meta_model(tmp_path):
    state = _deepseek_state()
    shards = {"model-00001-of-00002.safetensors": ["up.weight", "up.weight_scale_inv", "up.bias", "norm.weight"],
              "model-00002-of-00002.safetensors": ["down.weight", "down.weight_scale_inv", "head.weight"]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.device("meta"):
        model = Tiny().to(torch.bfloat16)
    load_fp8_checkpoint(model, tmp_path)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    x = _randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), _expected(state, x))


def test_a_converted_model_saves_as_a_deepseek_checkpoint_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    convert(model, filter=lambda m, name: name != "head")
    save_file(model.state_dict(), tmp_path / "fp8.safetensors")
    fresh = Tiny().to(torch.bfloat16)
    report = load_fp8_checkpoint(fresh, tmp_path / "fp8.safetensors")
    assert report.fp8_layers == ["down", "up"]
    x = _randn(4, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bad_checkpoints_raise_naming_the_tensor(tmp_path):
    state = _deepseek_state()
    with pytest.raises(Fp8ValueError, match=r"up.weight_scale_inv: expected shape \(2, 2\).*got \(1, 2\)"):
        load_fp8_checkpoint(Tiny(), {**state, "up.weight_scale_inv": torch.ones(1, 2)})
    with pytest.raises(Fp8TypeError, match="down.weight: expected FP8 data next to down.weight_scale_inv"):
        load_fp8_checkpoint(Tiny(), {**state, "down.weight": torch.zeros(256, 200)})
    partial = {k: v for k, v in state.items() if k != "head.weight"}
    with pytest.raises(Fp8ValueError, match="missing: head.weight"):
        load_fp8_checkpoint(Tiny(), partial)
    assert load_fp8_checkpoint(Tiny(), partial, strict=False).missing == ["head.weight"]
    with pytest.raises(Fp8ValueError, match="no such file"):
        load_fp8_checkpoint(Tiny(), tmp_path / "absent.safetensors")
