"""Bad input: a typed error that names the argument, what was expected and what was seen."""

import pytest
import torch

import fp8dispatch
from fp8dispatch import Fp8Tensor, Fp8TypeError, Fp8ValueError

REF = dict(backend="reference")
x = torch.randn(4, 256)
w = torch.randn(32, 256)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: fp8dispatch.quantize(torch.ones(4, 8, dtype=torch.int32), **REF), Fp8TypeError, r"x: expected float32.*int32"),
    (lambda: fp8dispatch.quantize(torch.ones(4, 8).to(torch.float8_e4m3fn), **REF), Fp8TypeError, r"x: .*float8_e4m3fn.*Fp8Tensor"),
    (lambda: fp8dispatch.quantize([[1.0]], **REF), Fp8TypeError, r"x: expected a torch.Tensor, got list"),
    (lambda: fp8dispatch.quantize(torch.tensor(1.0), **REF), Fp8ValueError, r"x: expected at least 2 dimensions.*\(\)"),
    (lambda: fp8dispatch.quantize(torch.ones(5), **REF), Fp8ValueError, r"x: .*\(5,\).*unsqueeze"),
    (lambda: fp8dispatch.quantize(x, "columns", **REF), Fp8ValueError, r"granularity: expected one of .*'columns'"),
    (lambda: fp8dispatch.quantize(x, "group", block_size=0, **REF), Fp8ValueError, r"block_size: expected a positive int, got 0"),
    (lambda: fp8dispatch.quantize(x, "group", block_size=[1, 2], **REF), Fp8TypeError, r"block_size"),
    (lambda: fp8dispatch.quantize(x, dtype=torch.bfloat16, **REF), Fp8TypeError, r"dtype: expected an FP8 dtype.*bfloat16"),
    (lambda: fp8dispatch.quantize(x, overflow="wrap", **REF), Fp8ValueError, r"overflow: expected one of .*'wrap'"),
    (lambda: fp8dispatch.quantize(x, scale_ub=-1.0, **REF), Fp8ValueError, r"scale_ub: expected a positive float within fp32.s range .*, got -1.0"),
    (lambda: fp8dispatch.quantize(x, scale=torch.ones(3, 1), **REF), Fp8ValueError, r"scale: expected shape \(4, 1\).*got \(3, 1\)"),
    (lambda: fp8dispatch.quantize(x, scale=torch.ones(4, 1, dtype=torch.float64), **REF), Fp8TypeError, r"scale: expected float32, got torch.float64"),
    (lambda: fp8dispatch.quantize(x, scale=torch.tensor([[1.0], [0.0], [1.0], [1.0]]), **REF), Fp8ValueError, r"scale: expected positive finite values, got 0.0 at \(1, 0\)"),
    (lambda: fp8dispatch.quantize(x, scale=torch.tensor([[1.0], [float("nan")], [1.0], [1.0]]), **REF), Fp8ValueError, r"scale: .*nan"),
    (lambda: fp8dispatch.quantize(x, scale=torch.ones(4, 1, device="meta"), **REF), Fp8ValueError, r"scale: expected device cpu"),
    (lambda: fp8dispatch.quantize(x, backend=3), Fp8TypeError, r"backend: expected a backend name"),
    (lambda: fp8dispatch.dequantize(x, **REF), Fp8TypeError, r"t: expected an Fp8Tensor, got Tensor"),
    (lambda: fp8dispatch.dequantize(fp8dispatch.quantize(x, **REF), torch.int8, **REF), Fp8TypeError, r"dtype: expected .*int8"),
    (lambda: fp8dispatch.matmul(x, torch.randn(200, 8), **REF), Fp8ValueError, r"b: expected 256 rows to match a's last dim K, got shape \(200, 8\)"),
    (lambda: fp8dispatch.matmul(torch.randn(256), w.t(), **REF), Fp8ValueError, r"a: expected at least 2 dimensions"),
    (lambda: fp8dispatch.matmul(x, torch.randn(2, 256, 8), **REF), Fp8ValueError, r"b: expected a 2-d \[K, N\] operand"),
    (lambda: fp8dispatch.matmul(x, w.t().to("meta"), **REF), Fp8ValueError, r"b: expected device cpu \(a's\), got meta"),
    (lambda: fp8dispatch.matmul(x.long(), w.t(), **REF), Fp8TypeError, r"a: expected float32.*int64"),
    (lambda: fp8dispatch.matmul(x, w.t(), recipe="channel", **REF), Fp8ValueError, r"recipe: expected one of block, row, tensor, got 'channel'"),
    (lambda: fp8dispatch.matmul(x, w.t(), out_dtype=torch.float8_e4m3fn, **REF), Fp8TypeError, r"out_dtype: expected"),
    (lambda: fp8dispatch.matmul(x, w.t(), bias=torch.randn(31), **REF), Fp8ValueError, r"bias: expected shape \(32,\), got \(31,\)"),
    (lambda: fp8dispatch.matmul(x, "w", **REF), Fp8TypeError, r"b: expected a torch.Tensor or Fp8Tensor, got str"),
    (lambda: fp8dispatch.linear(x, torch.randn(32), **REF), Fp8ValueError, r"w: expected a 2-d weight \[N, K\]"),
])
def test_bad_arguments_raise_typed_errors_naming_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_typed_errors_are_also_builtin_errors():
    assert issubclass(Fp8ValueError, ValueError) and issubclass(Fp8TypeError, TypeError)
    assert issubclass(fp8dispatch.NoBackend, fp8dispatch.Unsupported)
    assert issubclass(fp8dispatch.Unsupported, fp8dispatch.Fp8DispatchError)


@pytest.mark.parametrize("make, pattern", [
    (lambda d: Fp8Tensor(d, torch.ones(3, 1), (1, 256)), r"scale: expected shape \(4, 1\) for data \(4, 256\)"),
    (lambda d: Fp8Tensor(d, torch.ones(4, 1, dtype=torch.float16), (1, 256)), r"scale: expected a float32 tensor, got torch.float16"),
    (lambda d: Fp8Tensor(d.float(), torch.ones(4, 1), (1, 256)), r"data: expected a tensor of an FP8 dtype, got torch.float32"),
    (lambda d: Fp8Tensor(d, torch.ones(4, 1), (0, 256)), r"block: expected a pair of positive ints, got \(0, 256\)"),
    (lambda d: Fp8Tensor(d, torch.ones(4, 1, device="meta"), (1, 256)), r"scale: expected device cpu"),
])
def test_fp8_tensor_checks_its_parts(make, pattern):
    data = torch.zeros(4, 256).to(torch.float8_e4m3fn)
    with pytest.raises((Fp8ValueError, Fp8TypeError), match=pattern):
        make(data)


def test_a_failed_call_leaves_its_inputs_untouched():
    before = x.clone()
    with pytest.raises(fp8dispatch.NumericalOverflowError):
        fp8dispatch.quantize(x * 1000, scale=torch.ones(4, 1), overflow="error", **REF)
    assert torch.equal(x, before)


def test_explain_reports_bad_input_instead_of_raising():
    assert fp8dispatch.explain("quantize", x, "columns").startswith("Fp8ValueError: granularity")
    assert fp8dispatch.explain("transpose", x).startswith("explain: unknown op")
