"""The FP8 formats: one table of their limits, and the helpers that read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8dispatch.errors import Fp8TypeError
from fp8dispatch.scaling import scale_from_amax


@dataclass(frozen=True)
class FP8Format:
    """One FP8 format: its torch dtype and the limits every scale rule is built from."""

    name: str
    dtype: torch.dtype
    max_value: float
    min_normal: float
    min_subnormal: float

    def compute_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The tensorwise dequantization scale of `x`, `amax / max_value` (amax 0 gives 1)."""
        return scale_from_amax(finite_amax(x.float()), self)

    def compute_scale_per_channel(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """One scale per slice along `dim`; the result keeps `dim` (size 1) for broadcasting."""
        dims = [d for d in range(x.dim()) if d != dim % x.dim()]
        return scale_from_amax(finite_amax(x.float(), dims), self)

    def is_in_range(self, x: torch.Tensor, scale: torch.Tensor | float) -> bool:
        """Whether every finite value of `x / scale` fits in ±max_value (no saturation needed)."""
        scaled = x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        return bool((finite_amax(scaled) <= self.max_value).all())


def finite_amax(x: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
    """amax of |x| over finite values only: NaN and ±inf never decide a block's scale."""
    magnitude = torch.where(torch.isfinite(x), x.abs(), 0.0)
    if dims is None:
        return magnitude.amax()
    return magnitude.amax(dim=dims, keepdim=True)


# Limits from the OCP FP8 spec and the AMD "fnuz" variants (no inf, one NaN code, bias + 1).
FORMATS: dict[torch.dtype, FP8Format] = {
    f.dtype: f
    for f in (
        FP8Format("e4m3fn", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9),
        FP8Format("e4m3fnuz", torch.float8_e4m3fnuz, 240.0, 2.0**-7, 2.0**-10),
        FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16),
        FP8Format("e5m2fnuz", torch.float8_e5m2fnuz, 57344.0, 2.0**-15, 2.0**-17),
    )
}

HIGH_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def fp8_format(dtype: torch.dtype) -> FP8Format:
    """The format of an FP8 dtype; a TypeError names the dtypes that are FP8."""
    try:
        return FORMATS[dtype]
    except KeyError:
        known = ", ".join(str(d) for d in FORMATS)
        raise Fp8TypeError(f"dtype: expected an FP8 dtype ({known}), got {dtype}") from None


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FORMATS


def max_value(dtype: torch.dtype) -> float:
    return fp8_format(dtype).max_value


def min_normal(dtype: torch.dtype) -> float:
    return fp8_format(dtype).min_normal
