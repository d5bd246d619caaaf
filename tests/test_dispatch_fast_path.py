"""The cached hot path of the public ops: same results and errors as planning afresh, and a cached
plan only ever serves the options it was planned for."""

from unittest import mock

import pytest
import torch

import fp8dispatch
from fp8dispatch import Fp8TypeError, Fp8ValueError, api, planning, registry
from fp8dispatch.backends import reference
from backends_for_tests import counting_backend

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AUTO = "".join(["au", "to"])  # equal to "auto" but another object: the general path, not the default one


def _x(*shape, dtype=torch.bfloat16):
    torch.manual_seed(sum(shape))
    return torch.randn(*shape, dtype=dtype) * 3


def _same(a, b):
    assert type(a) is type(b) is fp8dispatch.Fp8Tensor
    assert a.block == b.block and a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert torch.equal(a.scale, b.scale)


def _fresh(call):
    """`call()` with every cached plan and decision forgotten first."""
    registry.refresh()
    return call()


X_CASES = {
    "2-d": lambda: _x(4, 256),
    "3-d": lambda: _x(2, 3, 256),
    "strided": lambda: _x(256, 8).t(),
    "fp32": lambda: _x(3, 200, dtype=torch.float32),
    "empty": lambda: _x(0, 256),
}


@pytest.mark.parametrize("granularity", ["row", "group", "block", "tensor"])
@pytest.mark.parametrize("case", X_CASES)
def test_default_and_general_paths_agree_on_every_call(sandbox, case, granularity):
    x = X_CASES[case]()
    first = _fresh(lambda: fp8dispatch.quantize(x, granularity))
    for _ in range(2):
        _same(fp8dispatch.quantize(x, granularity), first)
        _same(fp8dispatch.quantize(x, granularity, backend=AUTO, overflow="".join("saturate")), first)
    _same(_fresh(lambda: fp8dispatch.quantize(x, granularity, backend=AUTO)), first)


def test_equal_options_share_one_plan(sandbox):
    x = _x(4, 256)
    fp8dispatch.quantize(x, "group")
    fp8dispatch.quantize(x, "group", dtype=E4M3, block_size=128, backend="auto", overflow="saturate")
    assert len(planning.runs) == 1


@pytest.mark.parametrize("options", [
    dict(dtype=E5M2), dict(block_size=64), dict(block_size=(1, 32)), dict(pow2_scale=True),
    dict(scale_ub=0.5), dict(scale=torch.full((4, 2), 0.01)), dict(backend="reference"),
])
def test_a_cached_plan_serves_only_its_own_options(sandbox, options):
    """Warm the default plan first; a call with other options must still get its own result."""
    x = _x(4, 256)
    fp8dispatch.quantize(x, "group")
    fp8dispatch.quantize(x, "group", backend=AUTO)
    got = fp8dispatch.quantize(x, "group", **options)
    want = _fresh(lambda: fp8dispatch.quantize(x, "group", **options))
    _same(got, want)
    block = (1, options["block_size"][1] if isinstance(options.get("block_size"), tuple)
             else options.get("block_size", 128))
    data, scale = reference.quantize(x, block, options.get("dtype", E4M3), options.get("scale"),
                                     options.get("scale_ub"), options.get("pow2_scale", False))
    assert torch.equal(got.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(got.scale, scale)
    _same(fp8dispatch.quantize(x, "group"), _fresh(lambda: fp8dispatch.quantize(x, "group")))


GOOD_THEN_BAD = {
    "pow2 1 after True": (dict(pow2_scale=True), dict(pow2_scale=1), Fp8TypeError, "pow2_scale"),
    "pow2 0 after False": (dict(), dict(pow2_scale=0), Fp8TypeError, "pow2_scale"),
    "block 128.0 after 128": (dict(), dict(block_size=128.0), Fp8TypeError, "block_size"),
    "block True after 1": (dict(block_size=1), dict(block_size=True), Fp8TypeError, "block_size"),
    "block (1, 64.0) after (1, 64)": (dict(block_size=(1, 64)), dict(block_size=(1, 64.0)), Fp8TypeError,
                                      "block_size"),
    "block [1, 64]": (dict(block_size=(1, 64)), dict(block_size=[1, 64]), Fp8TypeError, "block_size"),
    "bad scale shape": (dict(scale=torch.ones(4, 2)), dict(scale=torch.ones(4, 1)), Fp8ValueError, "scale"),
    "zero scale": (dict(scale=torch.ones(4, 2)), dict(scale=torch.zeros(4, 2)), Fp8ValueError, "scale"),
    "negative scale_ub": (dict(scale_ub=2.0), dict(scale_ub=-1.0), Fp8ValueError, "scale_ub"),
    "bool scale_ub": (dict(scale_ub=1.0), dict(scale_ub=True), Fp8TypeError, "scale_ub"),
    "overflow": (dict(), dict(overflow="wrap"), Fp8ValueError, "overflow"),
    "dtype": (dict(), dict(dtype=torch.bfloat16), Fp8TypeError, "dtype"),
    "backend": (dict(), dict(backend=3), Fp8TypeError, "backend"),
}


@pytest.mark.parametrize("case", GOOD_THEN_BAD)
def test_bad_options_raise_the_same_error_after_a_good_call(sandbox, case):
    good, bad, error, argument = GOOD_THEN_BAD[case]
    x = _x(4, 256)
    with pytest.raises(error, match=argument) as first:
        _fresh(lambda: fp8dispatch.quantize(x, "group", **bad))
    for _ in range(2):
        fp8dispatch.quantize(x, "group", **good)
        with pytest.raises(error, match=argument) as again:
            fp8dispatch.quantize(x, "group", **bad)
        assert str(again.value) == str(first.value)


@pytest.mark.parametrize("bad_x, error, pattern", [
    (lambda x: x.to(torch.int32), Fp8TypeError, r"x: expected float32.*int32"),
    (lambda x: x.to(E4M3), Fp8TypeError, r"x: .*float8_e4m3fn"),
    (lambda x: x.tolist(), Fp8TypeError, r"x: expected a torch.Tensor, got list"),
    (lambda x: x.float().numpy(), Fp8TypeError, r"x: expected a torch.Tensor, got ndarray"),
    (lambda x: x[0], Fp8ValueError, r"x: expected at least 2 dimensions"),
])
def test_bad_x_raises_on_the_default_path_after_a_good_call(sandbox, bad_x, error, pattern):
    x = _x(4, 256)
    for _ in range(2):
        fp8dispatch.quantize(x, "group")
        with pytest.raises(error, match=pattern):
            fp8dispatch.quantize(bad_x(x), "group")


def test_an_unhashable_granularity_is_named_on_every_call(sandbox):
    x = _x(4, 256)
    fp8dispatch.quantize(x, "group")
    for _ in range(2):
        with pytest.raises(Fp8ValueError, match="granularity"):
            fp8dispatch.quantize(x, ["group"])


def test_the_default_path_follows_the_environment_after_refresh(sandbox):
    calls = []
    fp8dispatch.register_backend(counting_backend("counted", calls))  # lowest priority: never auto's pick
    x = _x(4, 256)
    want = fp8dispatch.quantize(x, "group")
    fp8dispatch.quantize(x, "group")
    assert "quantize" not in calls
    sandbox.env(FP8DISPATCH_QUANTIZE_BACKEND="counted")
    for n in (1, 2):
        _same(fp8dispatch.quantize(x, "group"), want)
        assert calls.count("quantize") == n
    sandbox.env(FP8DISPATCH_QUANTIZE_BACKEND="")
    fp8dispatch.quantize(x, "group")
    assert calls.count("quantize") == 2


@pytest.mark.parametrize("options", [
    dict(), dict(backend="counted"), dict(backend=AUTO), dict(pow2_scale=True), dict(scale_ub=0.5),
    dict(block_size=(1, 64)), dict(block_size=64), dict(scale=torch.ones(8, 2)), dict(dtype=E5M2),
])
def test_a_cached_call_plans_nothing_new(sandbox, options):
    calls = []
    fp8dispatch.register_backend(counting_backend("counted", calls))
    sandbox.env(FP8DISPATCH_QUANTIZE_BACKEND="counted")
    x = _x(2, 4, 256)
    fp8dispatch.quantize(x, "group", **options)
    plans = dict(planning.runs)
    missed = AssertionError("a cached call missed its key")
    with mock.patch.object(planning, "plan_quantize", side_effect=missed):
        for _ in range(3):
            fp8dispatch.quantize(x, "group", **options)
    assert calls.count("why_not") == 1 and calls.count("quantize") == 4
    assert planning.runs.keys() == plans.keys() and all(planning.runs[k] is v for k, v in plans.items())


def _operands(kind):
    a, w = _x(2, 3, 256), _x(64, 256)
    a2 = a.reshape(6, 256)
    return {
        "bf16 @ bf16": (a2, w.t(), None),
        "3-d bf16 @ bf16, bias": (a, w.t(), _x(64)),
        "bf16 @ fp8": (a2, fp8dispatch.quantize(w, "block").t(), None),
        "3-d bf16 @ fp8": (a, fp8dispatch.quantize(w, "block").t(), None),
        "fp8 @ bf16": (fp8dispatch.quantize(a2, "group"), w.t(), None),
        "3-d fp8 @ fp8, bias": (fp8dispatch.quantize(a, "group"), fp8dispatch.quantize(w, "block").t(), _x(64)),
        "row fp8 @ fp8": (fp8dispatch.quantize(a2, "row"), fp8dispatch.quantize(w, "row").t(), None),
        "empty M": (_x(0, 256), w.t(), _x(64)),
        "K = 0": (_x(6, 0), _x(0, 64), _x(64)),
    }[kind]


@pytest.mark.parametrize("kind", ["bf16 @ bf16", "3-d bf16 @ bf16, bias", "bf16 @ fp8", "3-d bf16 @ fp8",
                                  "fp8 @ bf16", "3-d fp8 @ fp8, bias", "row fp8 @ fp8", "empty M", "K = 0"])
def test_cached_matmul_and_linear_equal_fresh_planning(sandbox, kind):
    a, b, bias = _operands(kind)
    want = _fresh(lambda: fp8dispatch.matmul(a, b, bias=bias))
    want_linear = _fresh(lambda: fp8dispatch.linear(a, b.t(), bias, out_dtype=torch.float32))
    assert want.dtype == torch.bfloat16 and want_linear.dtype == torch.float32
    assert want.shape == want_linear.shape == (*a.shape[:-1], b.shape[1])
    for _ in range(2):
        assert torch.equal(fp8dispatch.matmul(a, b, bias=bias), want)
        assert torch.equal(fp8dispatch.linear(a, b.t(), bias, out_dtype=torch.float32), want_linear)


def test_linear_out_dtype_follows_x_on_the_cached_path(sandbox):
    x, w = _x(4, 256, dtype=torch.float32), fp8dispatch.quantize(_x(64, 256), "block")
    for _ in range(2):
        assert fp8dispatch.linear(x, w).dtype == torch.float32
        assert fp8dispatch.linear(x.half(), w).dtype == torch.float16
        assert fp8dispatch.linear(fp8dispatch.quantize(x, "group"), w).dtype == torch.bfloat16


def test_matmul_bad_input_after_a_good_call(sandbox):
    x, w = _x(4, 256), _x(32, 256)
    for _ in range(2):
        fp8dispatch.matmul(x, w.t())
        with pytest.raises(Fp8ValueError, match=r"b: expected 256 rows"):
            fp8dispatch.matmul(x, _x(200, 8))
        with pytest.raises(Fp8ValueError, match=r"bias: expected shape \(32,\)"):
            fp8dispatch.matmul(x, w.t(), bias=_x(31))
        with pytest.raises(Fp8TypeError, match=r"b: expected a torch.Tensor or Fp8Tensor, got str"):
            fp8dispatch.matmul(x, "w")
        with pytest.raises(Fp8ValueError, match=r"recipe: expected one of"):
            fp8dispatch.matmul(x, w.t(), recipe=["block"])
