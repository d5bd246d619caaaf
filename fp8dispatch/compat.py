"""Drop-in names for code written against other FP8 helpers, each a thin mapping onto fp8dispatch.

Same argument order and return conventions as the functions they stand in for. Two scale
conventions meet here (docs/compat.md has the table):

- `act_quant`, `weight_dequant`, `w8a8_block_fp8_matmul`, `per_token_group_quant_fp8`,
  `per_block_quant_fp8` (DeepSeek-V3, vLLM, SGLang, Unsloth) use dequantization scales,
  `x ≈ q * s`, as fp8dispatch does. Their activation scales keep the caller's leading dims
  (`[..., K/128]`); an Fp8Tensor's scale is 2-D over the flattened view, so they are reshaped.
- `quantize_fp8`, `dequantize_fp8`, `fp8_gemm`, `quantize_fp8_with_overflow_handling` and
  `quantize_fp8_fused` take and return the quantization multiplier `scale = fp8_max / amax`,
  `q = x * scale`. fp8dispatch converts at the boundary with a true fp32 division.

Numerics follow fp8dispatch's contract everywhere: `scale = amax / fp8_max` by true division, an
all-zero block gets scale 1 (the originals give NaN or an epsilon floor), saturating casts, and
K need not be a multiple of the block (the originals assert it).
"""

from __future__ import annotations

import torch

from fp8dispatch import api
from fp8dispatch.blocks import cdiv
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, NumericalOverflowError
from fp8dispatch.formats import HIGH_PRECISION, fp8_format, is_fp8
from fp8dispatch.tensor import Fp8Tensor

__all__ = [
    "act_quant", "dequantize_fp8", "fp8_gemm", "per_block_quant_fp8", "per_token_group_quant_fp8",
    "quantize_fp8", "quantize_fp8_fused", "quantize_fp8_with_overflow_handling", "w8a8_block_fp8_matmul",
    "weight_dequant",
]

E4M3 = torch.float8_e4m3fn


# --- dequantization-scale names (DeepSeek-V3, vLLM, SGLang, Unsloth) --------------------------


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    """DeepSeek-V3 `act_quant`: 1×`block_size` groups along the last dim.

    Returns `(y, s)`: y float8_e4m3fn in x's shape, s fp32 `[..., ceil(K/block_size)]`.
    `scale_fmt="ue8m0"` (DeepSeek-V3.1) rounds scales up to powers of two.
    """
    if scale_fmt not in (None, "ue8m0"):
        raise Fp8ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
    t = api.quantize(_at_least_2d(x), "group", block_size=block_size, pow2_scale=scale_fmt is not None)
    return t.data.view(x.shape), t.scale.view(*x.shape[:-1], t.scale.shape[-1])


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, eps: float = 1e-10,
                              dtype: torch.dtype | None = None, column_major_scales: bool = False):
    """vLLM / SGLang `per_token_group_quant_fp8`: `(x_q, x_s)` with x_s `[..., ceil(K/group_size)]`.

    `eps` is accepted for the signature: fp8dispatch gives an all-zero group scale 1 instead of
    flooring amax at eps, so only groups with 0 < amax < eps quantize differently.
    `column_major_scales` returns x_s with the group index as the slow dimension (CUTLASS layout).
    """
    t = api.quantize(_at_least_2d(x), "group", dtype=dtype or E4M3, block_size=group_size)
    s = t.scale
    if column_major_scales:
        s = s.t().contiguous().t()
    return t.data.view(x.shape), s.view(*x.shape[:-1], s.shape[-1]) if x.dim() != 2 else s


def per_block_quant_fp8(x: torch.Tensor, block_size: int = 128, dtype: torch.dtype = E4M3):
    """`(y, s)` with `block_size`² blocks over x's 2-D view; s fp32 `[ceil(M/bs), ceil(K/bs)]`."""
    t = api.quantize(_at_least_2d(x), "block", dtype=dtype, block_size=block_size)
    return t.data.view(x.shape), t.scale


def weight_dequant(x: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | int = torch.bfloat16, *,
                   block_size: int = 128) -> torch.Tensor:
    """Unsloth / DeepSeek-V3 `weight_dequant`: `x * s` for an FP8 weight [N, K].

    `s` is per block (`[ceil(N/bs), ceil(K/bs)]`), per row (`[N, 1]`) or one value. DeepSeek's
    order `weight_dequant(x, s, block_size)` also works: an int third argument is the block
    size, and the result then has DeepSeek's dtype, `torch.get_default_dtype()`.
    """
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        block_size, dtype = dtype, torch.get_default_dtype()
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise Fp8ValueError(f"x: expected a 2-d FP8 weight [N, K], got {getattr(x, 'shape', type(x).__name__)}")
    n, k = x.shape
    s = _as_scale("s", s, x.device)
    if s.shape == (cdiv(n, block_size), cdiv(k, block_size)):
        block = (block_size, block_size)
    elif s.shape == (n, 1):
        block = (1, max(k, 1))
    elif s.numel() == 1:
        s, block = s.reshape(1, 1), (max(n, 1), max(k, 1))
    else:
        raise Fp8ValueError(f"s: expected [{cdiv(n, block_size)}, {cdiv(k, block_size)}] block scales, [{n}, 1] "
                            f"row scales or one scale for x [{n}, {k}], got {tuple(s.shape)}")
    return api.dequantize(Fp8Tensor(x, s, block), dtype)


def w8a8_block_fp8_matmul(A: torch.Tensor, B: torch.Tensor, As: torch.Tensor, Bs: torch.Tensor,
                          block_size: int | list[int] = 128, output_dtype: torch.dtype = torch.float16):
    """vLLM / SGLang `w8a8_block_fp8_matmul`: `A @ B.T` from FP8 operands and their block scales.

    A [..., K] with As `[..., ceil(K/bk)]` (1×bk groups); B [N, K] with Bs `[ceil(N/bn), ceil(K/bk)]`;
    `block_size` is bk×bk or `[bn, bk]`. Returns `[..., N]` in `output_dtype` (vLLM's default fp16).
    """
    bn, bk = _block_pair(block_size)
    k = A.shape[-1]
    a = Fp8Tensor(A.reshape(-1, k), _as_scale("As", As, A.device).reshape(-1, cdiv(k, bk)).contiguous(), (1, bk))
    b = Fp8Tensor(B, _as_scale("Bs", Bs, B.device).contiguous(), (bn, bk))
    return api.linear(a, b, out_dtype=output_dtype).view(*A.shape[:-1], B.shape[0])


# --- quantization-multiplier names (scale = fp8_max / amax) ----------------------------------


def quantize_fp8(tensor: torch.Tensor, scale: torch.Tensor | float | None = None):
    """Tensorwise quantization; `scale` is the multiplier `fp8_max / amax` (computed if None).

    Returns `(q, scale)`: q float8_e4m3fn (not uint8 bits) in tensor's shape, and the multiplier
    used, a 0-d fp32 tensor.
    """
    x = _at_least_2d(tensor)
    dequant = None if scale is None else _reciprocal(_as_scale("scale", scale, tensor.device)).reshape(1, 1)
    t = api.quantize(x, "tensor", scale=dequant)
    return t.data.view(tensor.shape), _reciprocal(t.scale).reshape(())


def dequantize_fp8(tensor: torch.Tensor, scale: torch.Tensor | float,
                   output_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`tensor / scale` for the multiplier `scale`; `tensor` is FP8, or uint8 bits of float8_e4m3fn."""
    data = tensor.view(E4M3) if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 else tensor
    if not isinstance(data, torch.Tensor) or not is_fp8(data.dtype):
        raise Fp8TypeError(f"tensor: expected an FP8 (or uint8) tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    x = _at_least_2d(data)
    s = _reciprocal(_as_scale("scale", scale, data.device)).reshape(1, 1)
    block = (max(_rows(x), 1), max(x.shape[-1], 1))
    return api.dequantize(Fp8Tensor(x, s, block), output_dtype).view(data.shape)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | float | None = None,
             b_scale: torch.Tensor | float | None = None, output_dtype: torch.dtype = torch.float16):
    """Tensorwise `a [M, K] @ b [K, N]`. High-precision operands are quantized; FP8 (or uint8 bits)
    operands need their multiplier `scale` (`q = x * scale`), as `quantize_fp8` returns it."""
    return api.matmul(_tensorwise("a", a, a_scale), _tensorwise("b", b, b_scale), out_dtype=output_dtype)


def quantize_fp8_with_overflow_handling(tensor: torch.Tensor, scale: torch.Tensor | float | None = None,
                                        max_attempts: int = 3):
    """`quantize_fp8` with a given multiplier that may overflow: halve it (double the dequantization
    scale) up to `max_attempts` times until every finite `|x * scale|` fits, else raise
    NumericalOverflowError. Returns `(q, final multiplier)`."""
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 0:
        raise Fp8ValueError(f"max_attempts: expected an int >= 0, got {max_attempts!r}")
    if scale is None:
        return quantize_fp8(tensor)
    x = _at_least_2d(tensor)
    dequant = _reciprocal(_as_scale("scale", scale, tensor.device)).reshape(1, 1)
    for attempt in range(max_attempts + 1):
        try:
            t = api.quantize(x, "tensor", scale=dequant, overflow="error")
        except NumericalOverflowError as e:
            if attempt == max_attempts:
                raise NumericalOverflowError(f"{e} (after halving the multiplier {max_attempts} times)") from None
            dequant = dequant * 2
            continue
        return t.data.view(tensor.shape), _reciprocal(t.scale).reshape(())


def quantize_fp8_fused(x: torch.Tensor, scale: torch.Tensor | float | None = None, *, dtype: torch.dtype = E4M3):
    """One tensorwise quantization returning `(q, scale, scale_inv)`: the multiplier `fp8_max / amax`
    and its reciprocal, the dequantization scale (`x ≈ q * scale_inv`), both 0-d fp32."""
    fp8_format(dtype)
    xs = _at_least_2d(x)
    dequant = None if scale is None else _reciprocal(_as_scale("scale", scale, x.device)).reshape(1, 1)
    t = api.quantize(xs, "tensor", dtype=dtype, scale=dequant)
    return t.data.view(x.shape), _reciprocal(t.scale).reshape(()), t.scale.reshape(())


# --- helpers --------------------------------------------------------------------------------


def _tensorwise(name: str, t: torch.Tensor, scale) -> Fp8Tensor | torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dtype in HIGH_PRECISION:
        return api.quantize(t, "tensor")
    data = t.view(E4M3) if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 else t
    if not isinstance(data, torch.Tensor) or not is_fp8(data.dtype) or data.dim() != 2:
        raise Fp8TypeError(f"{name}: expected a 2-d high-precision or FP8 tensor, got "
                           f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if scale is None:
        raise Fp8ValueError(f"{name}_scale: required for FP8 {name} (the multiplier quantize_fp8 returned)")
    s = _reciprocal(_as_scale(f"{name}_scale", scale, data.device)).reshape(1, 1)
    return Fp8Tensor(data, s, (max(data.shape[0], 1), max(data.shape[1], 1)))


def _as_scale(name: str, s, device) -> torch.Tensor:
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return torch.tensor(float(s), dtype=torch.float32, device=device)
    if not isinstance(s, torch.Tensor) or s.dtype not in HIGH_PRECISION:
        raise Fp8TypeError(f"{name}: expected a float tensor or a float, got {getattr(s, 'dtype', type(s).__name__)}")
    return s.to(device=device, dtype=torch.float32)


def _reciprocal(s: torch.Tensor) -> torch.Tensor:
    """1 / s by a true fp32 division (a multiplier becomes a dequantization scale and back)."""
    return torch.ones_like(s) / s


def _rows(x: torch.Tensor) -> int:
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return rows


def _block_pair(block_size) -> tuple[int, int]:
    """vLLM's `block_size`: an int (bk×bk) or `[bn, bk]`, each a positive int."""
    pair = (block_size, block_size) if isinstance(block_size, int) else block_size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in pair):
        raise Fp8ValueError(f"block_size: expected a positive int or [bn, bk] of positive ints, got {block_size!r}")
    return tuple(pair)


def _at_least_2d(x):
    if isinstance(x, torch.Tensor) and x.dim() == 1:
        return x.unsqueeze(0)
    return x
