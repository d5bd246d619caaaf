"""Argument checks shared by the eager planner and the traced path: each raises a typed error that
names the argument, what was expected and what was seen."""

from __future__ import annotations

import torch

from fp8dispatch import registry
from fp8dispatch.blocks import Block, expand_scale, scale_shape
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, NumericalOverflowError
from fp8dispatch.formats import HIGH_PRECISION, finite_amax, fp8_format, is_fp8
from fp8dispatch.scaling import FP32_MAX, SMALLEST_SCALE

OVERFLOW_MODES = ("saturate", "error", "rescale")
RESCALE_ATTEMPTS = 3


def high_precision(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise Fp8TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in HIGH_PRECISION:
        hint = " (wrap FP8 data in an Fp8Tensor with its scale)" if is_fp8(t.dtype) else ""
        raise Fp8TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}{hint}")


def out_dtype(name: str, dtype) -> None:
    if dtype not in HIGH_PRECISION:
        raise Fp8TypeError(f"{name}: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def backend_arg(backend) -> None:
    if not isinstance(backend, str):
        raise Fp8TypeError(f"backend: expected a backend name or 'auto', got {type(backend).__name__}")
    for name in backend.split(","):
        if name.strip().lower() != registry.AUTO:
            registry.get_backend(name.strip())


def overflow_mode(overflow) -> None:
    if overflow not in OVERFLOW_MODES:
        raise Fp8ValueError(f"overflow: expected one of {', '.join(OVERFLOW_MODES)}, got {overflow!r}")


def scale_ub(value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Fp8TypeError(f"scale_ub: expected a positive float, got {type(value).__name__}")
    if not (SMALLEST_SCALE / 2 < value <= FP32_MAX):  # what rounds to a positive finite fp32; NaN fails
        raise Fp8ValueError(f"scale_ub: expected a positive float within fp32's range ({SMALLEST_SCALE / 2:g}, "
                            f"{FP32_MAX:g}], got {value!r}")
    return float(value)


def user_scale(x2d: torch.Tensor, scale, block: Block, dtype: torch.dtype, overflow: str) -> torch.Tensor:
    """Check a user scale (this reads its values, so it waits for the device) and apply `overflow`."""
    expected = scale_shape(tuple(x2d.shape), block)
    if not isinstance(scale, torch.Tensor):
        raise Fp8TypeError(f"scale: expected a float32 tensor of shape {expected}, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise Fp8TypeError(f"scale: expected float32, got {scale.dtype}")
    if scale.device != x2d.device:
        raise Fp8ValueError(f"scale: expected device {x2d.device} (x's), got {scale.device}")
    if scale.dim() == 0 and expected == (1, 1):
        scale = scale.reshape(1, 1)
    if tuple(scale.shape) != expected:
        raise Fp8ValueError(f"scale: expected shape {expected} for x {tuple(x2d.shape)} in blocks {block}, "
                            f"got {tuple(scale.shape)}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        raise Fp8ValueError(f"scale: expected positive finite values, got {scale[bad].flatten()[0].item()!r} "
                            f"at {tuple(bad.nonzero()[0].tolist())}")
    if overflow == "saturate" or x2d.numel() == 0:
        return scale
    fp8_max = fp8_format(dtype).max_value
    for attempt in range(RESCALE_ATTEMPTS + 1):
        peak = finite_amax(x2d.float() / expand_scale(scale, block, tuple(x2d.shape)))
        if peak.item() <= fp8_max:
            return scale
        if overflow == "error" or attempt == RESCALE_ATTEMPTS:
            largest = finite_amax(x2d.float()).item()
            raise NumericalOverflowError(
                f"x: values reach {peak.item():.6g}× the scale, beyond {dtype}'s max {fp8_max:g} "
                f"(largest |x| = {largest:.6g}, scale max = {scale.max().item():.6g}"
                + (f", after doubling the scale {RESCALE_ATTEMPTS} times)" if overflow == "rescale" else ")")
            )
        scale = scale * 2
    return scale
