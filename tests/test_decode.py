"""The triton backend's decode GEMM that quantizes its own activation (`backends/triton/decode.py`).

A block-recipe `linear(x, w)` with at most 16 tokens, routed to triton for both steps, runs one
kernel instead of the group quantize and the GEMM. The test that matters: the FP8 values it
multiplies are bit for bit the contract's quantize of x (read through an identity weight), on tails
and special values; then the product against the reference, with biases and every output dtype.
On the GPU when there is one, else on CPU tensors in Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import fp8dispatch as fd  # noqa: E402
from fp8dispatch import registry  # noqa: E402
from fp8dispatch.backends import triton as backend  # noqa: E402
from fp8dispatch.numerics import ERROR_BOUND, relative_error  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda")
if registry.probe_result("triton") is not None:
    pytest.skip(f"the triton backend cannot run here: {registry.probe_result('triton')}", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # x / tiny scale overflows numpy on purpose


@pytest.fixture
def triton_only(sandbox):
    """Every step routed to triton, as `backend="triton"` routes the GEMM and the planner the quantize."""
    fd.register_backend(backend.BACKEND, replace=True)
    sandbox.env(FP8DISPATCH_BACKEND="triton")
    yield sandbox


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return fd.quantize(torch.randn(n, k, generator=g).to(DEVICE), "block")


def _x(m, k, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype)


def _two_steps(x, wq, bias=None, out_dtype=torch.bfloat16):
    """The same call as a group quantize, then the GEMM on its result."""
    xq = fd.quantize(x.reshape(-1, x.shape[-1]), "group", backend="triton")
    out = fd.matmul(xq, wq.t(), bias=bias, out_dtype=out_dtype, backend="triton")
    return out.view(*x.shape[:-1], out.shape[-1])


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _identity(k):
    """I [k, k] in FP8 with every block scale 1: `x @ I.T` in fp32 is x's dequantized FP8 values
    exactly (one non-zero product per output, whatever order the tensor cores sum in)."""
    eye = torch.eye(k, device=DEVICE).to(torch.float8_e4m3fn)
    return fd.Fp8Tensor(eye, torch.ones((k + 127) // 128, (k + 127) // 128, device=DEVICE), (128, 128))


@pytest.mark.parametrize("m, k", [(1, 256), (3, 300), (16, 640), (9, 129)])
def test_the_quantize_inside_is_the_contracts(triton_only, m, k):
    """Through an identity weight the kernel's output is its quantized x: bit for bit what
    `fd.quantize(x, "group")` gives, K tails, zero groups, ±inf and tiny values included."""
    x = _x(m, k)
    x[0, : min(128, k)] = 0.0
    x[-1, k - 1] = float("inf")
    x[m // 2, 0] = -float("inf")
    x[m // 2, k // 2] = 1e-30
    assert fd.plan_linear(x, _identity(k), out_dtype=torch.float32).fused is not None
    got = fd.linear(x, _identity(k), out_dtype=torch.float32)
    want = fd.dequantize(fd.quantize(x, "group", backend="reference"), torch.float32)
    _same(got, want)


@pytest.mark.parametrize("m, n, k", [(1, 256, 512), (3, 200, 300), (7, 96, 1024), (16, 384, 640), (16, 130, 129)])
def test_one_kernel_against_the_reference_and_the_two_steps(triton_only, m, n, k):
    x, wq = _x(m, k), _weight(n, k)
    plan = fd.plan_linear(x, wq)
    assert plan.fused is not None and plan.fused.kernel.startswith("decode.py")
    got = fd.linear(x, wq)
    assert relative_error(got, fd.linear(x, wq, backend="reference")) < ERROR_BOUND
    # The same FP8 values and promotion; only the tensor cores' summation order may differ (tiles).
    assert relative_error(got, _two_steps(x, wq)) < 1e-5


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bias_and_output_dtypes(triton_only, out_dtype):
    x, wq = _x(5, 384, torch.float16), _weight(256, 384)
    bias = torch.randn(256, device=DEVICE).to(out_dtype)
    got = fd.linear(x, wq, bias=bias, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert relative_error(got, fd.linear(x, wq, bias=bias, out_dtype=out_dtype, backend="reference")) < ERROR_BOUND


def test_leading_dims_and_strided_rows(triton_only):
    wq = _weight(128, 256)
    x = _x(2 * 3, 256).view(2, 3, 256)
    got = fd.linear(x, wq)
    assert got.shape == (2, 3, 128)
    _same(got, fd.linear(x.reshape(6, 256), wq).view(2, 3, 128))
    rows = _x(8, 512)[:, :256]  # a row stride of 512: x is read in place
    assert fd.plan_linear(rows, wq).fused is not None
    _same(fd.linear(rows, wq), fd.linear(rows.contiguous(), wq))


def test_a_nan_spreads_over_its_row_only(triton_only):
    x, wq = _x(4, 512), _weight(128, 512)
    x[1, 5] = float("nan")
    got = fd.linear(x, wq)
    assert got[1].isnan().all() and not got[[0, 2, 3]].isnan().any()


def test_runs_twice_with_the_same_bits_and_leaves_x_alone(triton_only):
    x, wq = _x(2, 768), _weight(256, 768)
    before = x.clone()
    first = fd.linear(x, wq)
    _same(fd.linear(x, wq), first)  # the second call takes the plan's direct launch on a GPU
    assert torch.equal(x, before)


def test_not_above_decode_sizes_nor_for_other_recipes(triton_only):
    wq = _weight(128, 256)
    assert fd.plan_linear(_x(17, 256), wq).fused is None
    assert fd.plan_linear(_x(4, 256), fd.quantize(torch.randn(128, 256).to(DEVICE), "row")).fused is None


def test_a_quantize_routed_elsewhere_is_not_fused(triton_only):
    """FP8DISPATCH_QUANTIZE_BACKEND=reference is the user's choice for the quantize step: kept."""
    triton_only.env(FP8DISPATCH_QUANTIZE_BACKEND="reference")
    x, wq = _x(4, 256), _weight(128, 256)
    plan = fd.plan_linear(x, wq)
    assert plan.fused is None and plan.quantize_a.routed.backend == "reference"
    assert relative_error(fd.linear(x, wq), _two_steps(x, wq)) < 1e-5


def test_explain_names_the_one_kernel(triton_only):
    x, wq = _x(4, 256), _weight(128, 256)
    text = fd.explain("linear", x, wq)
    assert "runs: triton · inside the matmul's kernel (below)" in text
    assert "runs: triton · decode.py: the activation quantize inside the decode GEMM" in text
    assert "inside the matmul's kernel" in fd.plan_linear(x, wq).describe()
