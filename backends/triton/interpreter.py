"""Correct float conversions for Triton's CPU interpreter (TRITON_INTERPRET=1), routed through torch.

The interpreter converts floats with a bit-twiddling `triton.runtime.interpreter._convert_float`
that loses rounding carries, rounds ties away from zero, never saturates and mangles NaN/inf
(measured on Triton 3.4 to 3.9). Every FP8 cast and every
fp32 -> bf16 cast of a kernel run on CPU goes through it. We replace it with torch's `.to()`,
which rounds to nearest even and saturates e4m3fn exactly as the GPU's `cvt.rn.satfinite` does;
the kernels clamp to ±max before casting, so e5m2's overflow rule never comes into play.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
import torch

_SIGNED = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


@cache
def active() -> bool:
    """Whether @triton.jit kernels run in the interpreter, read as Triton reads it, once: the
    choice is made when the kernels are decorated, at import."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def install() -> bool:
    """Patch the interpreter once per process, only when it is active; True if the patch is in."""
    if not active():
        return False
    from triton.runtime import interpreter

    if getattr(interpreter._convert_float, "_fp8dispatch", False):
        return True
    original = interpreter._convert_float
    torch_dtypes = _torch_dtypes()
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        src, dst = torch_dtypes.get(input_dtype.name), torch_dtypes.get(output_dtype.name)
        if src is None or dst is None or rounding_mode == rtz:
            return original(input, input_dtype, output_dtype, rounding_mode)
        raw = np.ascontiguousarray(input).reshape(-1).view(f"int{input_dtype.primitive_bitwidth}")
        out = torch.from_numpy(raw).view(src).to(dst).view(_SIGNED[output_dtype.primitive_bitwidth])
        return out.numpy().view(f"uint{output_dtype.primitive_bitwidth}").reshape(np.shape(input))

    convert_float._fp8dispatch = True
    interpreter._convert_float = convert_float
    _fix_scalar_index(interpreter)
    return True


def _fix_scalar_index(interpreter) -> None:
    """A runtime loop bound (`for i in range(n)` with `n` an argument) turns a scalar into an int
    through `tensor.__index__`. Triton 3.6's interpreter does that with `int(array)` on a
    one-element array, which NumPy >= 2.4 refuses; Triton 3.7 added the `.squeeze()` we add here.
    The interpreter re-installs `__index__` at every launch, so the fix wraps that installer."""
    install_tensor_methods = getattr(interpreter, "_patch_lang_tensor", None)
    if install_tensor_methods is None or getattr(install_tensor_methods, "_fp8dispatch", False):
        return

    def patch_lang_tensor(tensor, scope):
        install_tensor_methods(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fp8dispatch = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _torch_dtypes() -> dict[str, torch.dtype]:
    """Triton dtype names to torch dtypes; fnuz names exist from Triton 3.8 in the interpreter."""
    return {
        "fp8e4nv": torch.float8_e4m3fn,
        "fp8e5": torch.float8_e5m2,
        "fp8e4b8": torch.float8_e4m3fnuz,
        "fp8e5b16": torch.float8_e5m2fnuz,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        "fp64": torch.float64,
    }
