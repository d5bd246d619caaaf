"""The fbgemm, torchao and torch backends on CPU: probing paths with fakes, and every declared limit."""

import dataclasses
import logging
import subprocess
import sys
import types

import pytest
import torch

import fp8dispatch
from fp8dispatch.backends import _library as lib
from fp8dispatch.backends import fbgemm as fb
from fp8dispatch.backends import reference
from fp8dispatch.backends import torch as tb
from fp8dispatch.backends import torchao as ta
import fp8dispatch.problem as problems
from fp8dispatch.grouped import GroupedLinearProblem
from fp8dispatch.blocks import block_for, recipe_blocks

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16 = torch.bfloat16
CUDA = torch.device("cuda")  # a device object only: why_not never touches the GPU
H100 = (9, 0)
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


# --- import hygiene -------------------------------------------------------------------------


def test_importing_fp8dispatch_and_its_backends_imports_no_library():
    code = ("import sys, fp8dispatch; from fp8dispatch import registry; registry.all_backends(); "
            "print(sorted(m for m in ('fbgemm_gpu', 'torchao') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_torch_backend_module_sees_the_real_torch():
    assert tb.torch is sys.modules["torch"] and tb.torch.__name__ == "torch"
    assert tb.F is sys.modules["torch.nn.functional"]
    assert sys.modules["fp8dispatch.backends.torch"] is tb


@no_gpu
@pytest.mark.parametrize("name", ["fbgemm", "torchao", "torch"])
def test_on_a_cpu_machine_each_says_no_cuda_device(name):
    module = {"fbgemm": fb, "torchao": ta, "torch": tb}[name]
    assert module.probe() == "no CUDA device"
    with pytest.raises(fp8dispatch.NoBackend, match=f"(?s){name}:.*no CUDA device"):
        fp8dispatch.quantize(torch.randn(4, 256), "group", backend=name)


# --- the quiet import -----------------------------------------------------------------------


def noisy(exc=None):
    """An importer that does what fbgemm_gpu does at import: root-logger setup, prints, warnings."""

    def importer(name):
        logging.basicConfig(level=logging.INFO)
        logging.warning("_fbgemm_torch_compat_table has no entry for 1.6.0")
        print("TMA benchmarks will be running without grid constant TMA descriptor.")
        print("to stderr", file=sys.stderr)
        if exc is not None:
            raise exc
        return types.SimpleNamespace(__name__=name)

    return importer


@pytest.mark.parametrize("exc", [None, OSError("Could not load this library: x.so"), ImportError("no module"),
                                 RuntimeError("bad build")])
def test_quiet_import_leaves_console_and_root_logger_alone(exc, capsys):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    module, reason = lib.quiet_import("fake_lib", importer=noisy(exc))
    assert root.handlers == handlers and root.level == level
    assert capsys.readouterr() == ("", "")
    if exc is None:
        assert module.__name__ == "fake_lib" and reason is None
    else:
        assert module is None and f"{type(exc).__name__}: {exc}" in reason
        assert reason.startswith("fake_lib " + ("raised on import" if isinstance(exc, RuntimeError) else "failed to load"))


# --- fbgemm probe ---------------------------------------------------------------------------


def fake_per_row(wrong=False, raises=False):
    def quantize_fp8_per_row(x, bs=None, scale_ub=None, output_dtype=None):
        if raises:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        data, scale = reference.quantize(x.float(), (1, x.shape[1]), E4M3)
        return data, scale.view(-1) * (2 if wrong else 1)

    return quantize_fp8_per_row


def installed_on_cpu(monkeypatch, module):
    """A library backend probing on CPU: the device gate passes and the library is 'installed'."""
    monkeypatch.setattr(module, "_loaded", {})
    monkeypatch.setattr(lib, "cuda_reason", lambda capability: None)
    monkeypatch.setattr(module, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(module, "_find_spec", lambda name: object())


@pytest.fixture
def fbgemm_fakes(monkeypatch):
    installed_on_cpu(monkeypatch, fb)
    monkeypatch.setattr(fb, "_import", lambda name: types.SimpleNamespace(__name__=name))
    monkeypatch.setattr(fb, "_ops", lambda: types.SimpleNamespace(quantize_fp8_per_row=fake_per_row()))
    return monkeypatch


def test_fbgemm_missing(fbgemm_fakes):
    fbgemm_fakes.setattr(fb, "_find_spec", lambda name: None)
    assert fb.probe() == "fbgemm_gpu is not installed (pip install fbgemm-gpu-genai)"


def test_fbgemm_failing_to_load_with_oserror(fbgemm_fakes, capsys):
    fbgemm_fakes.setattr(fb, "_import", noisy(OSError("Could not load this library: fbgemm_gpu_experimental_gen_ai.so")))
    reason = fb.probe()
    assert reason == ("fbgemm_gpu.experimental.gen_ai failed to load: OSError: Could not load this library: "
                      "fbgemm_gpu_experimental_gen_ai.so")
    assert capsys.readouterr() == ("", "")


def test_fbgemm_without_any_op(fbgemm_fakes):
    fbgemm_fakes.setattr(fb, "_ops", lambda: types.SimpleNamespace())
    assert "registers none of torch.ops.fbgemm." in fb.probe()


def test_fbgemm_missing_one_op_is_declared_per_problem(fbgemm_fakes):
    found = fb.probe()  # quantize_fp8_per_row alone, answering right
    assert found.ops == {"quantize_fp8_per_row"}
    assert "torch.ops.fbgemm.f8f8bf16_rowwise is missing from this fbgemm_gpu build" in fb.why_not(
        "matmul", matmul_problem("row"), found)
    assert fb.why_not("matmul", matmul_problem("tensor"), found) == [
        "torch.ops.fbgemm.f8f8bf16 is missing from this fbgemm_gpu build"]


@pytest.mark.parametrize("wrong, raises, expected", [
    (True, False, "self-test: quantize_fp8_per_row gave scale 2.0, expected 1.0"),
    (False, True, "self-test: quantize_fp8_per_row raised RuntimeError: CUDA error: no kernel image"),
])
def test_fbgemm_self_test_catches_a_wrong_or_broken_kernel(fbgemm_fakes, wrong, raises, expected):
    fbgemm_fakes.setattr(fb, "_ops", lambda: types.SimpleNamespace(
        quantize_fp8_per_row=fake_per_row(wrong, raises), f8f8bf16_rowwise=None))
    assert fb.probe().startswith(expected)


# --- torchao probe --------------------------------------------------------------------------


def fake_torchao(wrong=False, drop=()):
    def act_quant(x, block_size=128, dtype=E4M3):
        data, scale = reference.quantize(x.float(), (1, block_size), dtype)
        return data, scale * (0.5 if wrong else 1)

    functions = {name: (act_quant if name == "fp8_blockwise_act_quant" else (lambda *a: None))
                 for name in ta.FUNCTIONS if name not in drop}
    return types.SimpleNamespace(__version__="0.17.0", **functions)


@pytest.fixture
def torchao_fakes(monkeypatch):
    installed_on_cpu(monkeypatch, ta)
    monkeypatch.setattr(ta, "_has_triton", lambda: True)
    monkeypatch.setattr(ta, "_import", lambda name: fake_torchao())
    return monkeypatch


def test_torchao_probe_passes_with_a_right_answer(torchao_fakes):
    assert ta.probe() is None and ta._loaded["module"].__version__ == "0.17.0"


def test_torchao_missing(torchao_fakes):
    torchao_fakes.setattr(ta, "_find_spec", lambda name: None)
    assert ta.probe() == "torchao is not installed (pip install torchao)"


def test_torchao_failing_to_load_with_oserror(torchao_fakes, capsys):
    torchao_fakes.setattr(ta, "_import", noisy(OSError("libc10_cuda.so: cannot open shared object file")))
    assert ta.probe() == ("torchao.kernel.blockwise_quantization failed to load: OSError: libc10_cuda.so: "
                          "cannot open shared object file")
    assert capsys.readouterr() == ("", "")


def test_torchao_function_missing(torchao_fakes):
    torchao_fakes.setattr(ta, "_import", lambda name: fake_torchao(drop=("blockwise_fp8_gemm",)))
    assert ta.probe() == "torchao 0.17.0: torchao.kernel.blockwise_quantization lacks blockwise_fp8_gemm"


def test_torchao_without_triton(torchao_fakes):
    torchao_fakes.setattr(ta, "_has_triton", lambda: False)
    assert "no usable Triton" in ta.probe()


def test_torchao_self_test_wrong(torchao_fakes):
    torchao_fakes.setattr(ta, "_import", lambda name: fake_torchao(wrong=True))
    assert ta.probe() == "self-test: fp8_blockwise_act_quant gave scale 0.5, expected 1.0"


# --- torch probe ----------------------------------------------------------------------------


@pytest.fixture
def torch_fakes(monkeypatch):
    monkeypatch.setattr(lib, "cuda_reason", lambda capability: None)
    monkeypatch.setattr(tb, "_device", lambda: torch.device("cpu"))
    return monkeypatch


def test_torch_probe_passes_on_cpus_scaled_mm_and_records_rowwise(torch_fakes):
    """CPU torch._scaled_mm runs tensorwise scales exactly (torch 2.11 and newer); rowwise ones
    only on some releases: the probe records which, and why_not follows it."""
    found = tb.probe()
    assert found.scaled_mm_v2 == hasattr(torch.nn.functional, "scaled_mm")
    rowwise = found.rowwise
    assert rowwise is None or rowwise.startswith("self-test: torch._scaled_mm rowwise ")
    row = [r for r in tb.why_not("matmul", matmul_problem("row"), found) if "tensorwise scales only" in r]
    assert row == ([] if rowwise is None else [f"row recipe: torch._scaled_mm here takes tensorwise scales only "
                                                f"({rowwise})"])
    assert not tb.why_not("matmul", matmul_problem("tensor"), found)


def test_a_scaled_mm_without_rowwise_serves_tensor_only(torch_fakes):
    """What torch 2.11's CPU _scaled_mm does: per-row scales raise, scalar ones work."""
    real = torch._scaled_mm

    def tensorwise_only(a, b, scale_a, scale_b, **kwargs):
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("Invalid scaling configuration")
        return real(a, b, scale_a, scale_b, **kwargs)

    torch_fakes.setattr(torch, "_scaled_mm", tensorwise_only)
    found = tb.probe()
    assert found.rowwise == "self-test: torch._scaled_mm rowwise raised RuntimeError: Invalid scaling configuration"
    assert any("tensorwise scales only" in r for r in tb.why_not("matmul", matmul_problem("row"), found))
    assert not tb.why_not("matmul", matmul_problem("tensor"), found)


def test_torch_without_scaled_mm(torch_fakes):
    torch_fakes.delattr(torch, "_scaled_mm")
    assert tb.probe() == f"torch {torch.__version__} has no torch._scaled_mm"


@pytest.mark.parametrize("fake, expected", [
    (lambda *a, **k: torch.zeros(16, 16, dtype=BF16), "self-test: torch._scaled_mm tensorwise gave 0.0, expected 192"),
    (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")),
     "self-test: torch._scaled_mm tensorwise raised RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"),
])
def test_torch_self_test_wrong_or_raising(torch_fakes, fake, expected):
    torch_fakes.setattr(torch, "_scaled_mm", fake)
    assert tb.probe() == expected


@pytest.mark.parametrize("ga, gw", [("tensor", "tensor"), ("row", "row"), ("tensor", "row"), ((2, 64), "row")],
                         ids=["tensor", "row", "tensor-row", "row-pairs"])
def test_torch_row_and_tensor_translation_on_cpu(torch_fakes, ga, gw):
    """CPU torch._scaled_mm checks the scale layouts we build, as far as this torch's CPU kernel
    goes: tensorwise always, per-row scales where the probe found them to work."""
    rowwise = tb.probe().rowwise
    if gw == "row" and rowwise:
        pytest.skip(f"this torch's CPU _scaled_mm takes no per-row scales ({rowwise})")
    x, w = torch.randn(6, 64), torch.randn(48, 64)
    a = (fp8dispatch.quantize(x, "block", block_size=ga, backend="reference") if isinstance(ga, tuple)
         else fp8dispatch.quantize(x, ga, backend="reference"))  # (2, 64): rows in pairs
    b = fp8dispatch.quantize(w, gw, backend="reference").t()
    expected = fp8dispatch.matmul(a, b, out_dtype=torch.float32, backend="reference")
    assert torch.allclose(tb.matmul(a, b, torch.float32), expected, rtol=1e-5, atol=1e-4)


# --- why_not: every declared limit ----------------------------------------------------------


def quantize_problem(granularity, shape=(4096, 7168), *, in_dtype=BF16, contiguous=True, fp8=E4M3,
                     user_scale=False, scale_ub=False, pow2=False, block=None, capability=H100):
    return problems.quantize_problem(CUDA, shape, block or block_for(granularity, *shape), in_dtype=in_dtype,
                                     fp8_dtype=fp8, contiguous=contiguous, user_scale=user_scale,
                                     scale_ub=scale_ub, pow2_scale=pow2, capability=capability)


def matmul_problem(recipe, m=4096, n=7168, k=2048, *, a_dtype=E4M3, b_dtype=E4M3, out=BF16, capability=H100,
                   a_row_major=True, b_col_major=True, blocks=None, bias=None):
    mixed = ((128, 128), (128, 128))  # blocks that match no named recipe
    blocks = blocks or (mixed if recipe == "mixed" else recipe_blocks(recipe, m, k, n))
    return problems.matmul_problem(CUDA, m, n, k, *blocks, a_dtype=a_dtype, b_dtype=b_dtype, out_dtype=out,
                                   bias_dtype=bias, a_row_major=a_row_major, b_col_major=b_col_major,
                                   capability=capability)


def dequantize_problem(shape, block, fp8=E4M3, out=BF16):
    return problems.dequantize_problem(CUDA, shape, block, fp8_dtype=fp8, out_dtype=out, capability=H100)


def grouped_problem(recipe, n=7168, k=2048, *, x_dtype=E4M3, w_dtype=E4M3, out=BF16, capability=H100,
                    blocks=None, bias=None, x_row_major=True, w_contiguous=True):
    x_block, w_block = blocks or (((1, 128), (128, 128)) if recipe == "block" else ((1, k), (1, k)))
    return GroupedLinearProblem(CUDA, capability, "contiguous", recipe, x_dtype, w_dtype, 8, 4096, n, k,
                                x_block, w_block, torch.int64, x_row_major, w_contiguous, out, bias)


@pytest.mark.parametrize("module, op, problem", [
    (tb, "matmul", matmul_problem("block")), (tb, "matmul", matmul_problem("row", m=1)),
    (tb, "matmul", matmul_problem("tensor", out=torch.float32)), (tb, "matmul", matmul_problem("block", m=17, k=640)),
    (fb, "matmul", matmul_problem("block", m=1)), (fb, "matmul", matmul_problem("row", n=200)),
    (fb, "matmul", matmul_problem("tensor")), (fb, "matmul", matmul_problem("mixed")),
    (ta, "matmul", matmul_problem("block", k=400)),
    (fb, "matmul", matmul_problem("row", bias=torch.float16)), (tb, "matmul", matmul_problem("row", bias=BF16)),
    (tb, "matmul", matmul_problem("block", out=torch.float32, bias=BF16)),
    (fb, "dequantize", dequantize_problem((4096, 7168), (128, 128), E4M3, BF16)),
    (ta, "dequantize", dequantize_problem((300, 200), (128, 128), E5M2, torch.float16)),
    (fb, "grouped_linear", grouped_problem("block")), (fb, "grouped_linear", grouped_problem("row", n=200, k=48)),
    (tb, "grouped_linear", grouped_problem("row", capability=(10, 0))),
])
def test_what_each_backend_accepts(module, op, problem):
    assert module.why_not(op, problem) == []


@pytest.mark.parametrize("module, op, problem, reason", [
    # torch
    (tb, "matmul", matmul_problem("row", k=200), "K=200: needs K % 16 == 0"),
    (tb, "matmul", matmul_problem("row", n=200), "N=200: needs N % 16 == 0"),
    (tb, "matmul", matmul_problem("row", a_dtype=E5M2, b_dtype=E5M2), "float8_e5m2 × float8_e5m2 is rejected"),
    (tb, "matmul", matmul_problem("row", a_dtype=torch.float8_e4m3fnuz), "a, b: torch._scaled_mm takes float8_e4m3fn and float8_e5m2 only, got torch.float8_e4m3fnuz"),
    (tb, "matmul", matmul_problem("row", capability=(8, 6)), "needs sm89 or newer (FP8 tensor cores), this GPU is sm86"),
    (tb, "matmul", matmul_problem("row", a_row_major=False), "a: needs row-major contiguous [M, K] data"),
    (tb, "matmul", matmul_problem("row", b_col_major=False), "b: needs column-major [K, N] data"),
    (tb, "matmul", matmul_problem("block", capability=(8, 9)), "torch._scaled_mm's 1×128 · 128×128 scaling runs on sm90 only (cuBLASLt), this GPU is sm89"),
    (tb, "matmul", matmul_problem("block", capability=(10, 0)), "this GPU is sm100"),
    (tb, "matmul", matmul_problem("block", a_dtype=E5M2), "takes float8_e4m3fn only (the only pair verified on the H100), got torch.float8_e5m2"),
    (tb, "matmul", matmul_problem("mixed"), "recipe mixed (blocks (128, 128) × (128, 128)): torch serves tensor, row and 1×128 · 128×128 only"),
    (tb, "matmul", matmul_problem("block", blocks=((1, 64), (64, 64))), "recipe block (blocks (1, 64) × (64, 64)): torch serves tensor, row and 1×128 · 128×128 only"),
    # fbgemm matmul
    (fb, "matmul", matmul_problem("row", capability=(8, 9)), "f8f8bf16_rowwise runs on sm90 and sm100 only (sm_90a and sm_100a cubins), this GPU is sm89"),
    (fb, "matmul", matmul_problem("row", capability=(10, 3)), "this GPU is sm103"),
    (fb, "matmul", matmul_problem("tensor", capability=(10, 0)), "f8f8bf16 runs on sm90 only (sm_90a cubins), this GPU is sm100"),
    (fb, "matmul", matmul_problem("block", capability=(12, 0)), "f8f8bf16_groupwise runs on sm90 only (sm_90a cubins), this GPU is sm120"),
    (fb, "matmul", matmul_problem("row", n=100), "N=100: needs N % 8 == 0"),
    (fb, "matmul", matmul_problem("row", k=40), "K=40: needs K % 16 == 0"),
    (fb, "matmul", matmul_problem("block", k=400), "K=400: needs K % 128 == 0"),
    (fb, "matmul", matmul_problem("mixed", n=200), "N=200: needs N % 16 == 0"),
    (fb, "matmul", matmul_problem("row", a_dtype=E5M2), "a, b: f8f8bf16_rowwise takes float8_e4m3fn only, got torch.float8_e5m2 × torch.float8_e4m3fn"),
    (fb, "matmul", matmul_problem("row", out=torch.float16), "out_dtype: f8f8bf16_rowwise writes bf16 only, asked torch.float16"),
    (fb, "matmul", matmul_problem("block", blocks=((1, 64), (64, 64))), "FBGEMM serves row, tensor, 1×128 · 128×128 and 128×128 · 128×128 only"),
    (tb, "matmul", matmul_problem("row", bias=torch.float16), "bias: a torch.float16 bias with torch.bfloat16 output"),
    (tb, "matmul", matmul_problem("block", bias=BF16), "adding it afterwards would round twice"),
    (fb, "matmul", matmul_problem("block", bias=BF16), "bias: f8f8bf16_groupwise has no bias epilogue, and adding it afterwards would round twice (bf16 output)"),
    (ta, "matmul", matmul_problem("block", bias=BF16), "bias: blockwise_fp8_gemm has no bias epilogue"),
    # fbgemm quantize / dequantize
    (fb, "dequantize", dequantize_problem((128, 256), (1, 128), torch.float8_e4m3fnuz, BF16),
     "t: dequantize_fp8_block takes float8_e4m3fn and float8_e5m2 only, got torch.float8_e4m3fnuz"),
    (ta, "dequantize", dequantize_problem((128, 256), (128, 128), torch.float8_e5m2fnuz, BF16),
     "t: fp8_blockwise_weight_dequant takes float8_e4m3fn and float8_e5m2 only, got torch.float8_e5m2fnuz"),
    (fb, "dequantize", dequantize_problem((100, 64), (1, 64), E4M3, BF16),
     "rows=100: needs rows % 16 == 0 (dequantize_fp8_row reads scales in tiles of 16 rows without a mask)"),
    (fb, "dequantize", dequantize_problem((128, 64), (1, 64), E4M3, torch.float32),
     "dtype: dequantize_fp8_row writes bf16 only, asked torch.float32"),
    (fb, "dequantize", dequantize_problem((128, 64), (128, 64), E4M3, BF16),
     "granularity tensor (block (128, 64)): FBGEMM serves row, group and block only"),
    # torchao
    (ta, "matmul", matmul_problem("row"), "tensor and row go to torch._scaled_mm (backend torch)"),
    (ta, "matmul", matmul_problem("block", out=torch.float32), "blockwise_fp8_gemm writes bf16 only"),
    (ta, "matmul", matmul_problem("block", b_dtype=E5M2), "a, b: blockwise_fp8_gemm takes float8_e4m3fn only (the only format verified), got torch.float8_e4m3fn × torch.float8_e5m2"),
    (fb, "quantize", quantize_problem("row"), "±inf in the amax"),
    (fb, "quantize", quantize_problem("tensor"), "FBGEMM's quantizers are not offered"),
    (fb, "quantize", quantize_problem("group"), "approximate division"),
    (fb, "quantize", quantize_problem("block"), "use triton"),
    (ta, "dequantize", dequantize_problem((128, 128), (1, 128), E4M3, BF16),
     "granularity row (block (1, 128)): TorchAO serves 128×128 only"),
    # fbgemm grouped_linear
    (fb, "grouped_linear", grouped_problem("block", capability=(10, 0)),
     "f8f8bf16_groupwise_grouped runs on sm90 only (sm_90a cubins), this GPU is sm100"),
    (fb, "grouped_linear", grouped_problem("row", capability=(8, 9)),
     "f8f8bf16_rowwise_grouped_stacked runs on sm90 only (sm_90a cubins), this GPU is sm89"),
    (fb, "grouped_linear", grouped_problem("block", n=200),
     "N=200: needs N % 128 == 0 (f8f8bf16_groupwise_grouped finds each expert's scales at offsets in N // 128 "
     "and K // 128)"),
    (fb, "grouped_linear", grouped_problem("block", k=320), "K=320: needs K % 128 == 0"),
    (fb, "grouped_linear", grouped_problem("row", k=40), "K=40: needs K % 16 == 0"),
    (fb, "grouped_linear", grouped_problem("row", n=100), "N=100: needs N % 8 == 0"),
    (fb, "grouped_linear", grouped_problem("row", x_dtype=E5M2),
     "x, w: f8f8bf16_rowwise_grouped_stacked takes float8_e4m3fn only, got torch.float8_e5m2 × torch.float8_e4m3fn"),
    (fb, "grouped_linear", grouped_problem("block", out=torch.float32),
     "out_dtype: f8f8bf16_groupwise_grouped writes bf16 only, asked torch.float32"),
    (fb, "grouped_linear", grouped_problem("block", bias=BF16),
     "bias: f8f8bf16_groupwise_grouped has no bias epilogue, and adding it afterwards would round twice (bf16 output)"),
    (fb, "grouped_linear", grouped_problem("block", blocks=((1, 64), (64, 64))),
     "recipe block (blocks (1, 64) × (64, 64)): FBGEMM serves 1×128 · 128×128 and row only"),
    (fb, "grouped_linear", grouped_problem("row", x_row_major=False),
     "x: needs row-major contiguous data (call .contiguous())"),
    (fb, "grouped_linear", grouped_problem("row", w_contiguous=False), "w: needs contiguous [G, N, K] data and scales"),
    # torch grouped_linear
    (tb, "grouped_linear", grouped_problem("block"),
     "recipe block (blocks (1, 128) × (128, 128)): torch serves row only; torch._scaled_grouped_mm takes rowwise "
     "scales (and MX formats on sm100), not 1×128 · 128×128 blocks; use triton or fbgemm"),
    (tb, "grouped_linear", grouped_problem("row", capability=(8, 9)),
     "torch._scaled_grouped_mm runs on sm90 and sm100 only (its FP8 kernels), this GPU is sm89"),
    (tb, "grouped_linear", grouped_problem("row", w_dtype=E5M2),
     "x, w: torch._scaled_grouped_mm takes float8_e4m3fn only, got torch.float8_e4m3fn × torch.float8_e5m2"),
    (tb, "grouped_linear", grouped_problem("row", out=torch.float16),
     "out_dtype: torch._scaled_grouped_mm writes bf16 only, asked torch.float16"),
    (tb, "grouped_linear", grouped_problem("row", bias=torch.float32), "bias: torch._scaled_grouped_mm has no bias epilogue"),
    (tb, "grouped_linear", grouped_problem("row", k=200), "K=200: needs K % 16 == 0 (16-byte aligned strides)"),
    (tb, "grouped_linear", grouped_problem("row", n=200), "N=200: needs N % 16 == 0 (16-byte aligned strides)"),
])
def test_every_declared_limit_names_quantity_need_and_value(module, op, problem, reason):
    reasons = module.why_not(op, problem)
    assert any(reason in r for r in reasons), reasons


def test_what_the_probe_found_declines_grouped_problems():
    no_kernel = dataclasses.replace(tb.COMPLETE, grouped="torch 2.13.0 has no CUDA kernel for torch._scaled_grouped_mm")
    assert tb.why_not("grouped_linear", grouped_problem("row"), no_kernel) == [no_kernel.grouped]
    partial_build = fb.Found(ops=frozenset(fb.OPS) - {"f8f8bf16_groupwise_grouped"}, triton=None)
    assert fb.why_not("grouped_linear", grouped_problem("block"), partial_build) == [
        "torch.ops.fbgemm.f8f8bf16_groupwise_grouped is missing from this fbgemm_gpu build"]
    assert fb.why_not("grouped_linear", grouped_problem("row"), partial_build) == []


def test_cublaslt_and_v2_limits_of_the_torch_block_recipe():
    old = dataclasses.replace(tb.COMPLETE, cublaslt=120800)
    assert "block recipe: needs cuBLASLt >= 12.9, found 120800" in tb.why_not("matmul", matmul_problem("block"), old)
    v1 = dataclasses.replace(tb.COMPLETE, cublaslt=130100, scaled_mm_v2=False)
    assert tb.why_not("matmul", matmul_problem("block", k=2048), v1) == []  # ceil(K/128) = 16: v1 is right
    assert any("ceil(K/128) % 4 == 0" in r for r in tb.why_not("matmul", matmul_problem("block", k=640), v1))


@pytest.mark.parametrize("module, problem", [(fb, matmul_problem("block")), (ta, matmul_problem("block")),
                                             (tb, matmul_problem("block")), (fb, grouped_problem("block", n=100)),
                                             (tb, grouped_problem("row", out=torch.float16))])
def test_cpu_tensors_are_declined_before_anything_else(module, problem):
    cpu = dataclasses.replace(problem, device=torch.device("cpu"), capability=None)
    assert module.why_not(problem.op, cpu) == ["needs a CUDA tensor, got device cpu"]


def test_library_quantizers_are_not_offered():
    """No library quantizer is the contract: FBGEMM's CUDA ones take ±inf into the amax and floor
    the scale, its Triton ones and TorchAO's divide approximately (docs/backends.md)."""
    assert fb.BACKEND.quantize is None and ta.BACKEND.quantize is None


def test_pad_rows_appends_zero_rows_with_unit_scales_only_when_needed():
    data = torch.randn(5, 256).to(E4M3)
    scale = torch.rand(5, 2) + 0.5
    padded, padded_scale = lib.pad_rows(data, scale, 4)
    assert padded.shape == (8, 256) and padded_scale.shape == (8, 2)
    assert torch.equal(padded[:5].view(torch.uint8), data.view(torch.uint8))
    assert not padded[5:].view(torch.uint8).any() and torch.equal(padded_scale[5:], torch.ones(3, 2))
    same, same_scale = lib.pad_rows(data[:4], scale[:4], 4)
    assert same.data_ptr() == data.data_ptr() and same_scale.data_ptr() == scale.data_ptr()


# --- why_not is a pure function of the problem and the frozen probe result ---------------------


def every_answer(module, found):
    """why_not on the support matrix's problems, for every target, given one probe result."""
    from fp8dispatch.cli.support_matrix import TARGETS, sections

    answers = []
    for _, device, capability in TARGETS:
        for _, _, by_column in sections(device, capability):
            for by_format in by_column.values():
                answers += [module.why_not(p.op, p, found) for p in by_format.values()
                            if getattr(module.BACKEND, p.op) is not None]
    return answers


def test_why_not_depends_on_its_arguments_only(fbgemm_fakes, torch_fakes):
    """Probing (for real, or with fakes that find less) changes nothing that why_not answers for a
    given probe result; two results give two answers, in either order."""
    partial_build = fb.Found(ops=frozenset({"quantize_fp8_per_row"}), triton="fbgemm_gpu...fp8_gemm failed")
    tensorwise_only = dataclasses.replace(tb.COMPLETE, rowwise="self-test: rowwise raised", cublaslt=None)
    cases = [(fb, fb.COMPLETE, partial_build), (tb, tb.COMPLETE, tensorwise_only), (ta, None, None)]
    before = {m.__name__: (every_answer(m, one), every_answer(m, other)) for m, one, other in cases}
    assert fb.probe() == fb.Found(frozenset({"quantize_fp8_per_row"}), None)
    assert isinstance(tb.probe(), tb.Found)
    ta.probe()
    for module, one, other in cases:
        assert (every_answer(module, other), every_answer(module, one)) == before[module.__name__][::-1]
    assert before[fb.__name__][0] != before[fb.__name__][1]
    assert before[tb.__name__][0] != before[tb.__name__][1]


def test_the_registry_hands_why_not_the_frozen_probe_result(monkeypatch):
    """What why_not receives is what probe() returned, once, whatever else runs in between."""
    from fp8dispatch import registry

    seen = []
    backend = dataclasses.replace(reference.BACKEND, name="spy", probe=lambda: tb.COMPLETE,
                                  why_not=lambda op, p, found: seen.append(found) or [])
    fp8dispatch.register_backend(backend)
    try:
        problem = matmul_problem("row")
        assert registry.reasons(backend, problem) == [] and registry.probe_result("spy") is None
        registry.refresh()
        registry.reasons(backend, problem)
        assert seen == [tb.COMPLETE, tb.COMPLETE] and seen[0] is seen[1]
    finally:
        fp8dispatch.unregister_backend("spy")
