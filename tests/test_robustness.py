"""Bad input, broken files and races, as a careless or unlucky user meets them: each a typed error
naming the culprit, a warning, or a correct result; never a crash, never a half-done change."""

import importlib
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fp8dispatch as fd
from fp8dispatch import Backend, Fp8TypeError, Fp8ValueError, UnknownBackend, compat, registry, tuning
from fp8dispatch.backends import reference
from fp8dispatch.cli import main
from fp8dispatch.nn import Fp8Linear, convert, load_fp8_checkpoint
from fp8dispatch.problem import QuantizeProblem

E4M3 = torch.float8_e4m3fn


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- 1. checkpoints: a layer's tensors are checked as a set, and nothing is half-loaded ----------


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Linear(256, 256, bias=False)
        self.up = nn.Linear(256, 200, bias=False)


def _state():
    state = {}
    for name, (n, k) in {"down": (256, 256), "up": (200, 256)}.items():
        q = fd.quantize(randn(n, k, seed=n), "block")
        state[f"{name}.weight"], state[f"{name}.weight_scale_inv"] = q.data, q.scale
    return state


def _nan_scale(s):
    s = s.clone()
    s[0, 1] = float("nan")
    return s


@pytest.mark.parametrize("change, culprit", [
    (lambda s: s.pop("up.weight_scale_inv"), "up.weight_scale_inv"),
    (lambda s: s.pop("up.weight"), "up.weight"),
    (lambda s: s.__setitem__("up.weight_scale_inv", _nan_scale(s["up.weight_scale_inv"])), "up.weight_scale_inv"),
    (lambda s: s.__setitem__("up.weight_scale_inv", torch.full((2, 2), float("inf"))), "up.weight_scale_inv"),
    (lambda s: s.__setitem__("up.weight_scale_inv", torch.zeros(2, 2)), "up.weight_scale_inv"),
    (lambda s: s.__setitem__("up.weight_scale_inv", -torch.ones(2, 2)), "up.weight_scale_inv"),
    (lambda s: s.__setitem__("up.weight_scale_inv", torch.ones(3, 2)), "up.weight_scale_inv"),
])
def test_checkpoint_layer_checked_as_a_set_and_nothing_half_loaded(sandbox, change, culprit):
    sandbox.env(FP8DISPATCH_BACKEND="reference")
    state = _state()
    change(state)
    model = Two()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Fp8ValueError, match=culprit.replace(".", r"\.")):
        load_fp8_checkpoint(model, state)
    assert type(model.down) is nn.Linear and type(model.up) is nn.Linear  # "down" sorts first: untouched too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_corrupt_safetensors_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state(), str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(Fp8ValueError, match="model.safetensors"):
        load_fp8_checkpoint(Two(), path)


# --- 2. the registry under threads -------------------------------------------------------------


def _hammer(*targets):
    """Start every target at once on its own thread; the exceptions they raised."""
    errors, barrier = [], threading.Barrier(len(targets))

    def run(target):
        barrier.wait()
        try:
            target()
        except Exception as e:  # noqa: BLE001 - the test collects every failure
            errors.append(e)

    workers = [threading.Thread(target=run, args=(t,)) for t in targets]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def test_concurrent_first_calls_never_fail(sandbox, monkeypatch):
    real = importlib.import_module

    def slow_import(name, *args):
        time.sleep(0.01)  # a real first import takes far longer: widen the window a race needs
        return real(name, *args)

    monkeypatch.setattr(registry.importlib, "import_module", slow_import)
    registry._backends.clear()  # the sandbox puts every backend back afterwards
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    registry.refresh()
    x = randn(4, 256)
    errors = _hammer(*[lambda: fd.quantize(x, "group")] * 8)
    assert not errors, errors[:3]


def test_refresh_racing_calls_never_fails(sandbox, monkeypatch):
    sandbox.env(FP8DISPATCH_LOG="warning")
    configure = registry._configure_logging

    def slow_configure(level):
        time.sleep(0.001)  # widen the moment between reading the settings and returning them
        configure(level)

    monkeypatch.setattr(registry, "_configure_logging", slow_configure)
    stop = threading.Event()
    x = randn(4, 256)

    def calls():
        while not stop.is_set():
            fd.quantize(x, "group", backend="auto")

    def refreshes():
        try:
            for _ in range(200):
                registry.refresh()
                time.sleep(0.0005)
        finally:
            stop.set()

    try:
        errors = _hammer(refreshes, *[calls] * 5)
    finally:
        stop.set()
    assert not errors, errors[:3]


# --- 3. the recipe of a product is explicit -----------------------------------------------------


def _rows_of_every_size(m, k):
    return randn(m, k, seed=7) * torch.logspace(-3, 3, m)[:, None]


def _group_reference(x, wq):
    """What the block recipe means: x in 1×128 groups, the FP8 weight as it is, fp32 product."""
    xq = fd.quantize(x, "group", block_size=128, backend="reference")
    return (xq.dequantize(torch.float32) @ wq.dequantize(torch.float32).T).to(x.dtype)


def _row_error(out, expected):
    return ((out.float() - expected.float()).norm(dim=1) / expected.float().norm(dim=1)).max().item()


@pytest.mark.parametrize("n, k", [(100, 100), (128, 128), (64, 128)])
def test_small_block_weight_quantizes_activation_in_groups(sandbox, n, k):
    x, wq = _rows_of_every_size(32, k), fd.quantize(randn(n, k, seed=1), "block")
    assert wq.block == (128, 128)
    expected = _group_reference(x, wq)
    assert _row_error(fd.linear(x, wq, recipe="block"), expected) < 1e-6
    if (n, k) != (128, 128):  # a 128×128 block on a 128×128 weight is also what "tensor" makes
        assert _row_error(fd.linear(x, wq), expected) < 1e-6


@pytest.mark.parametrize("n, k", [(100, 100), (128, 128)])
def test_small_fp8_linear_and_convert_quantize_activation_in_groups(sandbox, n, k):
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=False)
    x = _rows_of_every_size(16, k)
    layer = Fp8Linear.from_linear(dense, "block")
    expected = _group_reference(x, layer.fp8_weight())
    assert _row_error(layer(x), expected) < 1e-6
    model = nn.Sequential(dense)
    convert(model, "block")
    assert _row_error(model(x), expected) < 1e-6


@pytest.mark.parametrize("n, k", [(256, 128), (300, 64)])
def test_one_k_block_weight_reads_as_block_recipe(sandbox, n, k):
    """K ≤ 128 and N > 128: the weight's 128×128 blocks span several output channels, so the
    product is the block recipe, from `linear` and from a layer built off DeepSeek's tensors."""
    x, wq = _rows_of_every_size(8, k), fd.quantize(randn(n, k, seed=2), "block")
    expected = _group_reference(x, wq)
    assert _row_error(fd.linear(x, wq), expected) < 1e-6
    layer = Fp8Linear.from_fp8(wq.data, wq.scale)
    assert layer.recipe == "block"
    assert _row_error(layer(x), expected) < 1e-6


# --- 4. routing tables are parsed defensively ---------------------------------------------------


@pytest.mark.parametrize("content", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"format": ' + b"1" * 5000 + b"}",
    b'{"format": "fp8dispatch-routing", "schema": 1, "tables": [{"environment": {"device": "cpu", '
    b'"capability": null, "libraries": {}}, "entries": [{"op": "quantize", "variant": "v", "n": 0, '
    b'"k": 1e999, "m_bucket": 4, "ranking": []}]}]}',
    b"\xff\xfe\x00garbage",
])
def test_corrupt_routing_table_is_ignored_and_everything_keeps_working(sandbox, tmp_path, monkeypatch, content, capsys):
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "none")
    path = tmp_path / "routing.json"
    path.write_bytes(content)
    sandbox.env(FP8DISPATCH_TUNING=str(path))
    tuning.install()
    problem = QuantizeProblem(
        device=torch.device("cpu"), capability=None, in_dtype=torch.float32, shape=(4, 256), contiguous=True,
        block=(1, 128), fp8_dtype=E4M3, user_scale=False, scale_ub=False, pow2_scale=False)
    with pytest.warns(tuning.TuningWarning, match="routing.json ignored"):
        assert tuning.lookup(problem) is None
    assert fd.quantize(randn(4, 256), "group").data.shape == (4, 256)
    assert main(["info"]) == 0
    assert "routing.json ignored" in capsys.readouterr().out


# --- 5. scale rules at the bottom of fp32 -------------------------------------------------------


def _quantize_backends():
    return [b.name for b in registry.all_backends() if b.quantize is not None and registry.probe_result(b.name) is None]


def _quantize_or_skip(x, granularity, backend, **kw):
    try:
        return fd.quantize(x, granularity, backend=backend, **kw)
    except fd.Unsupported as e:
        pytest.skip(f"{backend} cannot run this case: {str(e).splitlines()[-1]}")


@pytest.mark.parametrize("backend", _quantize_backends())
@pytest.mark.parametrize("granularity", ["group", "block", "row"])
@pytest.mark.parametrize("options, smallest", [({}, 2.0**-149), ({"pow2_scale": True}, 2.0**-126),
                                               ({"scale_ub": 1e-45}, 2.0**-149)])
def test_subnormal_amax_never_gives_scale_zero(backend, granularity, options, smallest):
    x = torch.zeros(256, 256)
    x[0, 0], x[0, 130], x[200, 5] = 1e-44, -2e-45, 3.0  # fp32-subnormal blocks beside ordinary ones
    t = _quantize_or_skip(x, granularity, backend, **options)
    assert (t.scale > 0).all() and t.scale.min().item() == smallest
    out = t.dequantize(torch.float32)
    assert torch.isfinite(out).all()
    if "scale_ub" not in options:
        assert out[200, 5].item() == pytest.approx(3.0, rel=0.07)


@pytest.mark.parametrize("scale_ub", [1e39, 1e-50, 3.5e38])
def test_scale_ub_outside_fp32_is_refused(scale_ub):
    with pytest.raises(Fp8ValueError, match="scale_ub"):
        fd.quantize(randn(2, 256), "group", scale_ub=scale_ub)


# --- 6. register_backend checks the Backend ------------------------------------------------------


def _fake(**changes):
    fields = dict(name="fake", probe=lambda: None, why_not=lambda op, p, found: [], quantize=reference.quantize)
    fields.update(changes)
    return Backend(**fields)


@pytest.mark.parametrize("changes, culprit", [
    ({"name": 3}, "name"), ({"priority": "high"}, "priority"), ({"priority": 1.5}, "priority"),
    ({"priorities": {"matmul": "x"}}, "priorities"), ({"priorities": ["matmul"]}, "priorities"),
    ({"probe": None}, "probe"), ({"why_not": "nope"}, "why_not"), ({"why_not": lambda op, p: []}, "why_not"),
    ({"quantize": 5}, "quantize"),
    ({"version": "1.0"}, "version"), ({"description": 7}, "description"),
])
def test_register_backend_refuses_malformed_backends(sandbox, changes, culprit):
    with pytest.raises((Fp8TypeError, Fp8ValueError), match=f"backend.{culprit}"):
        fd.register_backend(_fake(**changes))
    assert fd.quantize(randn(2, 256), "group").data.shape == (2, 256)  # auto still works


# --- 7. explain never raises --------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: fd.explain("matmul"), lambda: fd.explain("linear", randn(2, 8)), lambda: fd.explain("quantize"),
    lambda: fd.explain("dequantize"), lambda: fd.explain("dequantize", 5), lambda: fd.explain(5),
    lambda: fd.explain("quantize", randn(2, 8), nonsense=1), lambda: fd.explain("matmul", randn(2, 8), "b"),
    lambda: fd.explain("linear", randn(2, 8), randn(3, 8), 5),
])
def test_explain_never_raises(call):
    text = call()
    assert isinstance(text, str) and text


# --- 8. weak errors -----------------------------------------------------------------------------


def test_compat_block_size_and_attempts():
    a = fd.quantize(randn(4, 256), "group")
    b = fd.quantize(randn(128, 256), "block")
    with pytest.raises(Fp8ValueError, match="block_size"):
        compat.w8a8_block_fp8_matmul(a.data, b.data, a.scale, b.scale, block_size=0)
    with pytest.raises(Fp8ValueError, match="block_size"):
        compat.w8a8_block_fp8_matmul(a.data, b.data, a.scale, b.scale, block_size=[128])
    with pytest.raises(Fp8ValueError, match="max_attempts"):
        compat.quantize_fp8_with_overflow_handling(randn(4, 8), torch.tensor(1.0), max_attempts=-1)


def test_linear_errors_name_x_and_w_with_w_shape():
    with pytest.raises(Fp8ValueError, match=r"^w: .*\(32, 48\)") as e:
        fd.linear(randn(4, 64), randn(32, 48))
    assert "(48, 32)" not in str(e.value)
    with pytest.raises(Fp8TypeError, match="^x: "):
        fd.linear(torch.ones(4, 64, dtype=torch.int32), randn(32, 64))
    with pytest.raises(Fp8TypeError, match="^w: "):
        fd.linear(randn(4, 64), torch.ones(32, 64, dtype=torch.int32))
    with pytest.raises(Fp8ValueError, match="^x: "):
        fd.linear(randn(64), randn(32, 64))


def test_format_helpers():
    fmt = fd.fp8_format(E4M3)
    assert fmt.compute_scale(torch.empty(0)).item() == 1.0
    with pytest.raises(Fp8ValueError, match="dim"):
        fmt.compute_scale_per_channel(randn(4, 8), dim=2)
    for scale in (0.0, -1.0, float("nan"), torch.tensor([1.0, 0.0])):
        with pytest.raises(Fp8ValueError, match="scale"):
            fmt.is_in_range(randn(4, 8), scale)


def test_unknown_backend_in_environment_names_the_variable(sandbox):
    sandbox.env(FP8DISPATCH_BACKEND="refrence")
    with pytest.raises(UnknownBackend, match="FP8DISPATCH_BACKEND"):
        fd.quantize(randn(2, 256), "group")


def test_unknown_name_in_disable_is_an_error(sandbox):
    sandbox.env(FP8DISPATCH_DISABLE="refrence")
    with pytest.raises(UnknownBackend, match="FP8DISPATCH_DISABLE"):
        fd.quantize(randn(2, 256), "group")


@pytest.mark.parametrize("level", ["shutdown", "Handler", "loud"])
def test_bad_log_level_is_a_typed_error(sandbox, level):
    sandbox.env(FP8DISPATCH_LOG=level)
    with pytest.raises(Fp8ValueError, match="FP8DISPATCH_LOG"):
        fd.quantize(randn(2, 256), "group")


def test_good_log_level_is_accepted(sandbox):
    sandbox.env(FP8DISPATCH_LOG="info")
    assert fd.quantize(randn(2, 256), "group").data.shape == (2, 256)


@pytest.mark.parametrize("backend", [b.name for b in registry.all_backends() if b.matmul is not None])
def test_a_strided_bias_adds_the_same_values_as_its_contiguous_copy(backend):
    """Kernels read the bias as a contiguous vector: a strided one (every other element of a
    longer vector) must still add its own values, eagerly and compiled."""
    if registry.probe_result(backend) is not None:
        pytest.skip(f"{backend} cannot run here: {registry.probe_result(backend)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = fd.quantize(torch.randn(64, 256, device=device).bfloat16(), "block", backend="reference")
    x = torch.randn(3, 256, device=device).bfloat16()
    bias = torch.randn(128, device=device).bfloat16()[::2]
    try:
        want = fd.linear(x, w, bias.contiguous(), backend=backend)
    except fd.Unsupported as e:
        pytest.skip(f"{backend} cannot run this case: {str(e).splitlines()[-1]}")
    for _ in range(2):  # the plan's first call, then its bound runner
        assert torch.equal(fd.linear(x, w, bias, backend=backend), want)
    compiled = torch.compile(lambda x, bias: fd.linear(x, w, bias, backend=backend), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x, bias), want)

