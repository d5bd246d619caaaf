"""The FP8 formats: one table of their limits, and the helpers that read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
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
        """The tensorwise dequantization scale of `x`, `amax / max_value` (amax 0, or no values, gives 1)."""
        return scale_from_amax(finite_amax(_tensor("x", x).float()), self)

    def compute_scale_per_channel(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """One scale per slice along `dim`; the result keeps `dim` (size 1) for broadcasting."""
        x = _tensor("x", x)
        if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise Fp8ValueError(f"dim: expected an int in [{-x.dim()}, {x.dim() - 1}] for x of shape "
                                f"{tuple(x.shape)}, got {dim!r}")
        dims = [d for d in range(x.dim()) if d != dim % x.dim()]
        return scale_from_amax(finite_amax(x.float(), dims), self)

    def is_in_range(self, x: torch.Tensor, scale: torch.Tensor | float) -> bool:
        """Whether every finite value of `x / scale` fits in ±max_value (no saturation needed)."""
        scale = torch.as_tensor(scale, dtype=torch.float32, device=_tensor("x", x).device)
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise Fp8ValueError(f"scale: expected positive finite values, got {scale.tolist()!r}")
        scaled = x.float() / scale
        return bool((finite_amax(scaled) <= self.max_value).all())


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise Fp8TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def finite_amax(x: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
    """amax of |x| over finite values only: NaN and ±inf never decide a block's scale."""
    magnitude = torch.where(torch.isfinite(x), x.abs(), 0.0)
    if dims is None:
        return magnitude.amax() if magnitude.numel() else magnitude.new_zeros(())
    if magnitude.numel() == 0:  # amax refuses empty slices: no values is amax 0
        shape = [1 if d in [i % x.dim() for i in dims] else n for d, n in enumerate(x.shape)]
        return magnitude.new_zeros(shape)
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
