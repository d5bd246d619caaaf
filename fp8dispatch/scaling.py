"""The scale contract: `scale = amax / fp8_max` by true fp32 division, and the saturating cast."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # formats.py builds its scale methods on this module; the format is only a type here
    from fp8dispatch.formats import FP8Format

_MANTISSA = 0x007FFFFF
_EXPONENT = 0x7F800000
_EXPONENT_ONE = 0x00800000

# The smallest scale a block can get: the smallest positive fp32 (a subnormal, 2**-149). A block
# whose amax is positive but so small that `amax / fp8_max` underflows to 0 gets this instead, so a
# finite input never divides by zero (0 / 0 would dequantize to NaN). With `pow2_scale` it rounds
# up to 2**-126 like every other subnormal scale.
SMALLEST_SCALE = 2.0**-149
FP32_MAX = 3.4028234663852886e38


def scale_from_amax(
    amax: torch.Tensor, fmt: FP8Format, scale_ub: float | None = None, pow2_scale: bool = False
) -> torch.Tensor:
    """Dequantization scales from block amaxes.

    `scale_ub` caps amax (FBGEMM's meaning). The divisor is a tensor on amax's device: torch turns
    a Python or CPU-scalar divisor into a reciprocal multiply, which rounds differently. amax 0
    gives 1; a positive amax never gives less than SMALLEST_SCALE.
    """
    amax = amax.float()
    if scale_ub is not None:
        amax = torch.clamp(amax, max=scale_ub)
    scale = amax / torch.full_like(amax, fmt.max_value)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale).clamp(min=SMALLEST_SCALE)
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
