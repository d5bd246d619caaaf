"""Property-based fuzzing of the public API over its whole argument space.

Shapes with 0 and tails, dtypes right and wrong, strided and transposed views, every device this
machine has, option values in and out of range, and special values (NaN, ±inf, subnormals, ±max).
Each call must either return what the reference returns for the same call, or raise a typed
error whose message starts with the argument it blames; the inputs are never modified.

CI runs a bounded number of examples per op; `FP8DISPATCH_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`
runs more (the same examples replay first: Hypothesis keeps no database here, the seed is fixed).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

import fp8dispatch as fd
from fp8dispatch import Fp8DispatchError, Fp8Tensor, NoBackend
from fp8dispatch.numerics import ERROR_BOUND, SPECIAL_VALUES, relative_error

EXAMPLES = int(os.environ.get("FP8DISPATCH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HIGH = [torch.float32, torch.bfloat16, torch.float16]
FP8 = list(fd.FORMATS)
WRONG_DTYPES = [torch.float64, torch.int32, torch.float8_e4m3fn, torch.bool]
# The library's special values, and what underflows a scale: -0, fp32 subnormals, 1e-30.
SPECIAL = [*SPECIAL_VALUES, -0.0, 1e-44, 1e-30]
SIZES = [0, 1, 3, 7, 127, 128, 129, 200]
BACKENDS = ["auto", "reference", "triton", "reference,auto", "nosuch", 3]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit, any NaN matching any NaN."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.dtype == torch.bool:
        return torch.equal(got, want)
    nan = torch.isnan(got.float()) & torch.isnan(want.float())
    return bool(((_bits(got) == _bits(want)) | nan).all())


@st.composite
def tensors(draw, dtypes=HIGH, max_dims=3):
    """A tensor of a drawn dtype, shape, layout and device, with special values sprinkled in."""
    dims = draw(st.integers(1, max_dims))
    shape = [draw(st.sampled_from(SIZES if i >= dims - 2 else [0, 1, 2, 3])) for i in range(dims)]
    dtype = draw(st.sampled_from(dtypes))
    device = draw(st.sampled_from(DEVICES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = 10.0 ** draw(st.integers(-30, 30))
    base_shape = list(shape)
    if layout == "sliced" and dims >= 1:
        base_shape[-1] = shape[-1] * 2
    x = torch.randn(base_shape, generator=gen) * scale
    for value in draw(st.lists(st.sampled_from(SPECIAL), max_size=4)):
        if x.numel():
            x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = value
    if dtype == torch.bool:
        x = x > 0
    elif dtype in (torch.int32,):
        x = x.clamp(-1e6, 1e6).nan_to_num().to(dtype)
    else:
        x = x.to(dtype)
    if layout == "sliced":
        x = x[..., ::2]
    elif layout == "transposed" and dims >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.to(device)


def _check_error(e: Exception, names: tuple[str, ...], backend) -> None:
    """A refusal must be typed and begin with the argument it blames (NoBackend only on request)."""
    assert isinstance(e, Fp8DispatchError), f"untyped {type(e).__name__}: {e}"
    event(f"refused: {type(e).__name__} {str(e).split(':', 1)[0][:30]}")
    if isinstance(e, NoBackend):
        assert backend not in ("auto", "reference"), f"auto or reference refused: {e}"
        return
    first = str(e).split(":", 1)[0].split(".")[0]
    assert first in names, f"{type(e).__name__} names {first!r}, not one of {names}: {e}"


def _unchanged(before, after) -> None:
    for old, new in zip(before, after):
        assert _same(new, old), "an input was modified"


def _tensors_of(*values):
    out = []
    for v in values:
        if isinstance(v, Fp8Tensor):
            out += [v.data, v.scale]
        elif isinstance(v, torch.Tensor):
            out.append(v)
    return out


# --- quantize -------------------------------------------------------------------------------

QUANTIZE_ARGS = ("x", "granularity", "dtype", "block_size", "scale", "scale_ub", "pow2_scale", "overflow", "backend")


@st.composite
def quantize_calls(draw):
    x = draw(tensors(dtypes=HIGH * 3 + WRONG_DTYPES))
    kwargs = dict(
        granularity=draw(st.sampled_from(["tensor", "row", "group", "block", "col", 3])),
        dtype=draw(st.sampled_from(FP8 + [torch.float32, "e4m3"])),
        block_size=draw(st.sampled_from([128, 1, 64, 130, (64, 32), (1, 128), 0, -1, 1.5, True, (128,)])),
        scale_ub=draw(st.sampled_from([None, None, 1.0, 448.0, 1e-45, 1e-30, 3e38, 1e39, -1.0, float("nan"), "1"])),
        pow2_scale=draw(st.sampled_from([False, True, 1, None])),
        overflow=draw(st.sampled_from(["saturate", "error", "rescale", "wrap"])),
        backend=draw(st.sampled_from(BACKENDS)),
    )
    kwargs["scale"] = draw(st.sampled_from([None, None, "auto_x2", "zero", 2.0]))
    return x, kwargs


def _user_scale(x, kwargs, how):
    """A scale of the right shape from the reference (×2, or zeroed), or a wrong type."""
    if how is None or how == 2.0:
        return how
    try:
        auto = fd.quantize(x, kwargs["granularity"], dtype=kwargs["dtype"], block_size=kwargs["block_size"],
                           backend="reference").scale
    except Fp8DispatchError:
        return None
    return auto * 2 if how == "auto_x2" else torch.zeros_like(auto)


@FUZZ
@seed(17)
@given(quantize_calls())
def test_quantize(call):
    x, kwargs = call
    kwargs["scale"] = _user_scale(x, kwargs, kwargs["scale"])
    before = [t.clone() for t in _tensors_of(x, kwargs["scale"])]
    try:
        got = fd.quantize(x, **kwargs)
    except Exception as e:  # noqa: BLE001 - the property is about what is raised
        _check_error(e, QUANTIZE_ARGS, kwargs["backend"])
        got = None
    _unchanged(before, _tensors_of(x, kwargs["scale"]))
    if got is None:
        return
    want = fd.quantize(x, **{**kwargs, "backend": "reference"})
    assert got.block == want.block and _same(got.scale, want.scale) and _same(got.data, want.data)
    assert got.data.shape == x.shape


# --- dequantize -----------------------------------------------------------------------------


@st.composite
def dequantize_calls(draw):
    x = draw(tensors(dtypes=[torch.float32]))
    granularity = draw(st.sampled_from(["tensor", "row", "group", "block"]))
    fp8 = draw(st.sampled_from(FP8))
    transpose = draw(st.booleans())
    dtype = draw(st.sampled_from(HIGH + [torch.float64, torch.float8_e4m3fn, "bf16"]))
    backend = draw(st.sampled_from(BACKENDS))
    return x, granularity, fp8, transpose, dtype, backend


@FUZZ
@seed(18)
@given(dequantize_calls())
def test_dequantize(call):
    x, granularity, fp8, transpose, dtype, backend = call
    if x.dim() < 2:
        x = x.unsqueeze(0)
    t = fd.quantize(x, granularity, dtype=fp8, backend="reference")
    if transpose and t.data.dim() == 2:
        t = t.t()
    before = [v.clone() for v in _tensors_of(t)]
    try:
        got = fd.dequantize(t, dtype, backend=backend)
    except Exception as e:  # noqa: BLE001
        _check_error(e, ("t", "dtype", "backend"), backend)
        got = None
    _unchanged(before, _tensors_of(t))
    if got is not None:
        assert _same(got, fd.dequantize(t, dtype, backend="reference"))


# --- matmul and linear ----------------------------------------------------------------------


@st.composite
def matmul_calls(draw):
    m, k, n = (draw(st.sampled_from(SIZES)) for _ in range(3))
    k_b = draw(st.sampled_from([k, k, k, k + 1]))  # sometimes a mismatched K
    device = draw(st.sampled_from(DEVICES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    in_dtype = draw(st.sampled_from(HIGH + [torch.float64]))
    lead = draw(st.sampled_from([(), (), (2,)]))
    a = torch.randn(*lead, m, k, generator=gen).to(in_dtype).to(device)
    w = torch.randn(n, k_b, generator=gen).to(in_dtype).to(device)  # [N, K] as nn.Linear holds it
    a_fp8 = draw(st.sampled_from([None, "group", "row", "tensor"]))
    w_fp8 = draw(st.sampled_from([None, "block", "row", "tensor"]))
    bias = draw(st.sampled_from([None, "right", "wrong"]))
    return dict(a=a, w=w, a_fp8=a_fp8, w_fp8=w_fp8, bias=bias, op=draw(st.sampled_from(["matmul", "linear"])),
                recipe=draw(st.sampled_from([None, None, "block", "row", "tensor", "blocks"])),
                out_dtype=draw(st.sampled_from(HIGH + [torch.float64])), backend=draw(st.sampled_from(BACKENDS)))


def _fp8_operand(t, granularity):
    if granularity is None or t.dtype not in HIGH or t.dim() != 2:
        return t
    return fd.quantize(t, granularity, backend="reference")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The contract's measure over the finite positions, which must be the same on both sides."""
    finite = torch.isfinite(out) & torch.isfinite(ref)
    assert bool((torch.isfinite(out) == torch.isfinite(ref)).all()), "non-finite where the reference is finite"
    return relative_error(out[finite], ref[finite])


@FUZZ
@seed(19)
@given(matmul_calls())
def test_matmul_and_linear(call):
    a, w = call["a"], call["w"]
    if call["op"] == "linear":
        x, weight = _fp8_operand(a, call["a_fp8"]), _fp8_operand(w, call["w_fp8"])
        run = fd.linear
        names = ("x", "w", "bias", "recipe", "out_dtype", "backend")
    else:
        x = _fp8_operand(a, call["a_fp8"])
        weight = _fp8_operand(w, call["w_fp8"])
        weight = weight.t() if len(weight.shape) == 2 else weight
        run = fd.matmul
        names = ("a", "b", "bias", "recipe", "out_dtype", "backend")
    n = w.shape[0]
    bias = {None: None, "right": torch.randn(n), "wrong": torch.randn(n + 1)}[call["bias"]]
    bias = bias.to(a.device) if bias is not None else None
    kwargs = dict(recipe=call["recipe"], out_dtype=call["out_dtype"], backend=call["backend"])
    args = (x, weight, bias) if call["op"] == "linear" else (x, weight)
    if call["op"] == "matmul":
        kwargs["bias"] = bias
    before = [t.clone() for t in _tensors_of(x, weight, bias)]
    try:
        got = run(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        _check_error(e, names, call["backend"])
        got = None
    _unchanged(before, _tensors_of(x, weight, bias))
    if got is None:
        return
    want = run(*args, **{**kwargs, "backend": "reference"})
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _relative_error(got, want) < ERROR_BOUND


def test_explain_never_raises_on_fuzzed_calls():
    """The same argument space through `explain`: always text, never an exception."""

    @FUZZ
    @seed(20)
    @given(quantize_calls(), matmul_calls())
    def run(q, m):
        x, kwargs = q
        kwargs["scale"] = None
        assert isinstance(fd.explain("quantize", x, **kwargs), str)
        assert isinstance(fd.explain("linear", m["a"], m["w"], recipe=m["recipe"], backend=m["backend"]), str)
        assert isinstance(fd.explain("matmul", m["a"], m["w"].t(), out_dtype=m["out_dtype"]), str)

    run()


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
