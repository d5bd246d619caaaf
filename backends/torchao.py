"""The `torchao` backend: TorchAO's blockwise FP8 Triton kernels (DeepSeek 1×128 · 128×128).

TorchAO's Float8 inference path lowers tensorwise and rowwise to `torch._scaled_mm` (the `torch`
backend) when mslk is absent, so this backend serves only what TorchAO adds: its blockwise
quantizers, dequantizer and GEMM.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from fp8dispatch.capabilities import Capabilities, Serves
from fp8dispatch.registry import Backend

from . import _library as lib

E4M3 = torch.float8_e4m3fn
GROUP, BLOCK = (1, 128), (128, 128)
MODULE = "torchao.kernel.blockwise_quantization"
FUNCTIONS = ("fp8_blockwise_act_quant", "fp8_blockwise_weight_quant", "fp8_blockwise_weight_dequant",
             "blockwise_fp8_gemm")

_import = importlib.import_module
_find_spec = importlib.util.find_spec
# The library module, for the runners (filled by the probe; why_not never reads it).
_loaded: dict = {}


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
    _loaded["module"] = module
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


def _writes_float32(row, p, found) -> str | None:
    if torch.get_default_dtype() == torch.float32:
        return None
    return (f"fp8_blockwise_weight_dequant writes torch.get_default_dtype(), which is "
            f"{torch.get_default_dtype()}, not float32: results would be rounded twice")


# One row per function TorchAO adds; tensor and row go to torch._scaled_mm (the torch backend).
TABLE = Capabilities("TorchAO", (
    Serves("dequantize", "block", "fp8_blockwise_weight_dequant", BLOCK, checks=(_writes_float32,)),
    Serves("matmul", "block", "blockwise_fp8_gemm", (GROUP, BLOCK), (E4M3,), (torch.bfloat16,),
           why={"formats": "the only format verified"}),
), elsewhere={"matmul": "tensor and row go to torch._scaled_mm (backend torch)"})


def why_not(op: str, p, found=None) -> list[str]:
    return TABLE.check(p, found)[0]


def dequantize(data, scale, block, out_dtype):
    out = _loaded["module"].fp8_blockwise_weight_dequant(data, scale.contiguous(), 128)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def matmul(a, b, out_dtype, bias=None):
    return _loaded["module"].blockwise_fp8_gemm(a.data, a.scale.contiguous(), b.data.t(),
                                               b.scale.t().contiguous(), 128)


BACKEND = Backend(
    name="torchao",
    probe=probe,
    why_not=why_not,
    dequantize=dequantize,
    matmul=matmul,
    # No quantize: TorchAO's blockwise quantizers divide with Triton's approximate fp32 division,
    # and 0 of 38 H100 cases of plain data were the contract bit for bit (docs/backends.md).
    version=lambda: lib.distribution_version("torchao"),
    description="TorchAO blockwise FP8 Triton kernels (1×128 activation, 128×128 weight quant and GEMM)",
)
