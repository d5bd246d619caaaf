"""The `torchao` backend: TorchAO's blockwise FP8 Triton kernels (DeepSeek 1×128 · 128×128).

TorchAO's Float8 inference path lowers tensorwise and rowwise to `torch._scaled_mm` (the `torch`
backend) when mslk is absent, so this backend serves only what TorchAO adds: its blockwise
quantizers, dequantizer and GEMM.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from fp8dispatch.registry import Backend

from . import _library as lib

E4M3 = torch.float8_e4m3fn
GROUP, BLOCK = (1, 128), (128, 128)
MODULE = "torchao.kernel.blockwise_quantization"
FUNCTIONS = ("fp8_blockwise_act_quant", "fp8_blockwise_weight_quant", "fp8_blockwise_weight_dequant",
             "blockwise_fp8_gemm")

_import = importlib.import_module
_find_spec = importlib.util.find_spec
_found: dict = {"module": None, "version": None}


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _has_triton() -> bool:
    from torch.utils._triton import has_triton

    return has_triton()


def probe() -> str | None:
    # Triton's FP8 tl.dot and casts need sm89.
    module, reason = lib.load((8, 9), "torchao", "torchao", MODULE, _find_spec, _import)
    if reason:
        return reason
    version = getattr(_import("torchao"), "__version__", None)
    missing = [f for f in FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        return f"torchao {version}: {MODULE} lacks {', '.join(missing)}"
    if not _has_triton():
        return "torch reports no usable Triton (torch.utils._triton.has_triton() is False)"
    _found.update(module=module, version=version)
    return _self_test(module, _device())


def _self_test(module, device) -> str | None:
    """One 1×128 group whose amax is 448: scale exactly 1 and codes equal to the inputs."""
    x = lib.representable(128).to(device, torch.bfloat16)
    try:
        data, scale = module.fp8_blockwise_act_quant(x, 128, E4M3)
    except Exception as e:  # Triton failing to compile for this GPU reports here
        return f"self-test: fp8_blockwise_act_quant raised {type(e).__name__}: {lib._first_line(e)}"
    if scale.flatten()[0].item() != 1.0 or not torch.equal(data.float().cpu(), x.float().cpu()):
        return f"self-test: fp8_blockwise_act_quant gave scale {scale.flatten()[0].item()}, expected 1.0"
    return None


def why_not(op: str, p) -> list[str]:
    if p.device.type != "cuda":
        return [f"needs a CUDA tensor, got device {p.device}"]
    return {"dequantize": _dequantize_reasons, "matmul": _matmul_reasons}[op](p)


def _dequantize_reasons(p) -> list[str]:
    reasons = []
    if p.fp8_dtype not in (E4M3, torch.float8_e5m2):
        reasons.append(f"t: TorchAO's Triton dequantizer compiles for float8_e4m3fn and float8_e5m2 on CUDA, "
                       f"got {p.fp8_dtype}")
    if p.block != BLOCK:
        reasons.append(f"blocks {p.block}: fp8_blockwise_weight_dequant takes 128×128 blocks only")
    if not p.contiguous:
        reasons.append("t: needs contiguous data")
    if torch.get_default_dtype() != torch.float32:
        reasons.append(f"fp8_blockwise_weight_dequant writes torch.get_default_dtype(), which is "
                       f"{torch.get_default_dtype()}, not float32: results would be rounded twice")
    return reasons


def _matmul_reasons(p) -> list[str]:
    reasons = []
    if (p.a_block, p.b_block) != (GROUP, BLOCK):
        reasons.append(f"recipe {p.recipe} (blocks {p.a_block} × {p.b_block}): TorchAO adds only the "
                       f"1×128 · 128×128 block GEMM; tensor and row go to torch._scaled_mm (backend torch)")
    if (p.a_dtype, p.b_dtype) != (E4M3, E4M3):
        reasons.append(f"a, b: blockwise_fp8_gemm is verified with float8_e4m3fn only, got {p.a_dtype} × {p.b_dtype}")
    if p.out_dtype != torch.bfloat16:
        reasons.append(f"out_dtype: blockwise_fp8_gemm writes bf16 only, asked {p.out_dtype}")
    if p.bias_dtype is not None:
        reasons.append("bias: blockwise_fp8_gemm has no bias epilogue; adding it to the bf16 output would round twice")
    return reasons + lib.matmul_layout_reasons(p, need_k=1, need_n=1)


def dequantize(data, scale, block, out_dtype):
    out = _found["module"].fp8_blockwise_weight_dequant(data, scale.contiguous(), 128)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def matmul(a, b, out_dtype, bias=None):
    return _found["module"].blockwise_fp8_gemm(a.data, a.scale.contiguous(), b.data.t(),
                                               b.scale.t().contiguous(), 128)


BACKEND = Backend(
    name="torchao",
    probe=probe,
    why_not=why_not,
    dequantize=dequantize,
    matmul=matmul,
    # No quantize: TorchAO's blockwise quantizers divide with Triton's approximate fp32 division,
    # and 0 of 38 H100 cases of plain data were the contract bit for bit (docs/backends.md).
    version=lambda: _found["version"],
    description="TorchAO blockwise FP8 Triton kernels (1×128 activation, 128×128 weight quant and GEMM)",
)
