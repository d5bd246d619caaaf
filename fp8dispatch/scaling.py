"""The scale contract: `scale = amax / fp8_max` by true fp32 division, and the saturating cast."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # formats.py builds its scale methods on this module; the format is only a type here
    from fp8dispatch.formats import FP8Format

_MANTISSA = 0x007FFFFF
_EXPONENT = 0x7F800000
_EXPONENT_ONE = 0x00800000


def scale_from_amax(
    amax: torch.Tensor, fmt: FP8Format, scale_ub: float | None = None, pow2_scale: bool = False
) -> torch.Tensor:
    """Dequantization scales from block amaxes.

    `scale_ub` caps amax (FBGEMM's meaning). The divisor is a tensor on amax's device: torch turns
    a Python or CPU-scalar divisor into a reciprocal multiply, which rounds differently.
    """
    amax = amax.float()
    if scale_ub is not None:
        amax = torch.clamp(amax, max=scale_ub)
    scale = amax / torch.full_like(amax, fmt.max_value)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return round_up_pow2(scale) if pow2_scale else scale


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two (UE8M0), exactly, on the bits.

    A non-zero mantissa means the value lies strictly between two powers of two: clear it and
    step the exponent. Scales below the smallest normal fp32 become 2**-126.
    """
    bits = scale.view(torch.int32)
    rounded = (bits & _EXPONENT) + (bits & _MANTISSA != 0).to(torch.int32) * _EXPONENT_ONE
    return torch.where(bits & _MANTISSA == 0, bits, rounded).view(torch.float32)


def saturating_cast(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Clamp to ±max, then cast with round-to-nearest-even. NaN stays NaN; ±inf saturates."""
    return x.clamp(-fmt.max_value, fmt.max_value).to(fmt.dtype)
