"""PyTorch modules: `Fp8Linear`, model conversion and FP8 checkpoint loading."""

from fp8dispatch.nn.checkpoint import LoadReport, load_fp8_checkpoint
from fp8dispatch.nn.experts import Fp8Experts
from fp8dispatch.nn.convert import ConversionReport, convert, linear_weight_bytes
from fp8dispatch.nn.linear import Fp8Linear

__all__ = ["ConversionReport", "Fp8Experts", "Fp8Linear", "LoadReport", "convert", "linear_weight_bytes", "load_fp8_checkpoint"]
