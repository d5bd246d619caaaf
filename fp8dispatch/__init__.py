"""fp8dispatch: FP8 quantize, dequantize and scaled matmul on the best kernel a machine has."""

from fp8dispatch import checkout

checkout.install()  # from a source checkout, fp8dispatch.backends is ../backends (docs/decisions.md)

from fp8dispatch.api import dequantize, explain, linear, matmul, quantize
from fp8dispatch.blocks import GRANULARITIES, RECIPES
from fp8dispatch.errors import (
    Fp8DispatchError,
    Fp8TypeError,
    Fp8ValueError,
    NoBackend,
    NumericalOverflowError,
    Unsupported,
    UnknownBackend,
)
from fp8dispatch.grouped import GroupedFp8Tensor, quantize_grouped
from fp8dispatch.grouped_api import explain_grouped, grouped_linear
from fp8dispatch.formats import FORMATS, FP8Format, fp8_format, max_value, min_normal
from fp8dispatch.registry import Backend, backend_names, refresh, register_backend, unregister_backend
from fp8dispatch.tensor import Fp8Tensor
from fp8dispatch import tuning as _tuning

_tuning.install()  # the measured routing table (`fp8dispatch tune`), consulted before static priority

__version__ = "0.1.0"


__all__ = [
    "Backend", "FORMATS", "FP8Format", "Fp8DispatchError", "Fp8Tensor", "Fp8TypeError", "Fp8ValueError",
    "GRANULARITIES", "NoBackend", "NumericalOverflowError", "RECIPES", "UnknownBackend", "Unsupported",
    "GroupedFp8Tensor", "backend_names", "dequantize", "explain", "explain_grouped", "fp8_format",
    "grouped_linear", "linear", "quantize_grouped", "matmul", "max_value", "min_normal",
    "quantize", "refresh", "register_backend", "unregister_backend",
]
