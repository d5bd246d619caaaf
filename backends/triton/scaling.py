"""The scale contract of fp8dispatch.scaling, as @triton.jit helpers every quantize kernel inlines.

Bit-exactness with the reference rests on three choices: the divisions are `tl.math.div_rn`
(correctly rounded; plain fp32 `/` in a Triton kernel differs from torch's division in 28% of
random cases on the H100), the clamp is a pair of `where`s (`tl.minimum` would turn NaN into
the max), and the power-of-two rounding is the same integer trick on the fp32 bits.
"""

import triton
import triton.language as tl

from fp8dispatch import scaling

FP32_MAX = tl.constexpr(scaling.FP32_MAX)  # the largest finite fp32
SMALLEST_SCALE = tl.constexpr(scaling.SMALLEST_SCALE)  # a positive amax never gives scale 0


@triton.jit
def finite_abs(x):
    """|x| with NaN and ±inf replaced by 0: they never decide a block's scale."""
    mag = tl.abs(x)
    return tl.where(mag <= FP32_MAX, mag, 0.0)


@triton.jit
def scale_from_amax(amax, scale_ub, FP8_MAX: tl.constexpr, HAS_UB: tl.constexpr, POW2: tl.constexpr):
    """`amax / FP8_MAX` by true division; amax 0 -> 1, else at least SMALLEST_SCALE (an fp32-subnormal
    amax would underflow to 0); `scale_ub` caps amax; POW2 rounds up."""
    if HAS_UB:
        # Triton passes a Python float below fp32's smallest normal as fp64: round it to fp32 here.
        amax = tl.minimum(amax, tl.full(amax.shape, scale_ub, tl.float32))
    scale = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
    scale = tl.where(amax == 0.0, 1.0, scale)
    scale = tl.where(scale < SMALLEST_SCALE, SMALLEST_SCALE, scale)
    if POW2:
        # A non-zero mantissa lies strictly between two powers of two: clear it, step the exponent.
        bits = scale.to(tl.int32, bitcast=True)
        mantissa = bits & 0x007FFFFF
        rounded = (bits & 0x7F800000) + tl.where(mantissa != 0, 0x00800000, 0)
        scale = tl.where(mantissa == 0, bits, rounded).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def saturating_cast(x, scale, FP8_MAX: tl.constexpr, out_dtype: tl.constexpr):
    """`x / scale` correctly rounded, clamped to ±FP8_MAX (NaN stays NaN), then cast with RNE."""
    x, scale = tl.broadcast(x, scale)
    q = tl.math.div_rn(x, scale)
    q = tl.where(q > FP8_MAX, FP8_MAX, q)
    q = tl.where(q < -FP8_MAX, -FP8_MAX, q)
    return q.to(out_dtype)
