"""The public ops as `torch.library` custom ops, so `torch.compile` sees each call as one opaque op.

Under tracing (`torch.compiler.is_compiling()`), `fp8dispatch.quantize / dequantize / matmul`
call the `traced_*` functions below instead of their eager fast path. Those put exactly one
`torch.ops.fp8dispatch.*` call in the graph, whose real implementation is the eager API: the
backend is chosen when the compiled graph runs, never while tracing, so no probe, `importlib` or
device query happens on a traced path. The fakes give output shapes and dtypes from input shapes
alone. An `Fp8Tensor` crosses the op boundary as `(data, scale)` tensors plus its block as ints;
it is also a pytree node, so compiled functions may take and return it.

Eager calls never pass through here: the custom-op dispatcher costs tens of µs per call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils._pytree as pytree

from fp8dispatch.blocks import block_for, scale_shape
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
from fp8dispatch.tensor import Fp8Tensor

__all__ = ["quantize", "dequantize", "matmul", "traced_quantize", "traced_dequantize", "traced_matmul",
           "linear_parts", "dequantize_parts"]


def _flatten(t: Fp8Tensor):
    return [t.data, t.scale], t.block


def _unflatten(children, block) -> Fp8Tensor:
    return Fp8Tensor._trusted(children[0], children[1], block)


pytree.register_pytree_node(
    Fp8Tensor, _flatten, _unflatten, serialized_type_name="fp8dispatch.Fp8Tensor",
    flatten_with_keys_fn=lambda t: ([(pytree.GetAttrKey("data"), t.data),
                                     (pytree.GetAttrKey("scale"), t.scale)], t.block),
)


def _block_arg(block_size: list[int]) -> int | tuple[int, int]:
    return block_size[0] if len(block_size) == 1 else (block_size[0], block_size[1])


def _fresh(out: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """A contiguous result that shares no storage with an input (a custom op may not alias)."""
    out = out.contiguous()
    storage = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == storage for t in inputs):
        out = out.clone()
    return out


# --- quantize -------------------------------------------------------------------------------


@torch.library.custom_op("fp8dispatch::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, granularity: str, dtype: torch.dtype, block_size: list[int],
    scale: Optional[torch.Tensor], scale_ub: Optional[float], pow2_scale: bool, overflow: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8dispatch.quantize` as an op: returns (data in x's shape, 2-D fp32 scale)."""
    from fp8dispatch import api

    t = api.quantize(x, granularity, dtype=dtype, block_size=_block_arg(block_size), scale=scale,
                     scale_ub=scale_ub, pow2_scale=pow2_scale, overflow=overflow, backend=backend)
    return _fresh(t.data, x), _fresh(t.scale, scale)


@quantize.register_fake
def _(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend):
    rows, cols = _shape2d("x", x)
    block = block_for(granularity, rows, cols, _block_arg(block_size))
    return (x.new_empty(x.shape, dtype=dtype),
            x.new_empty(scale_shape((rows, cols), block), dtype=torch.float32))


def traced_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend) -> Fp8Tensor:
    """What `fp8dispatch.quantize` does under tracing: one op, and the block computed in Python."""
    if not isinstance(x, torch.Tensor):
        raise Fp8TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    sizes = [block_size] if isinstance(block_size, int) else list(block_size)
    if isinstance(scale_ub, torch.Tensor):
        raise Fp8TypeError("scale_ub: under torch.compile pass a Python float, not a tensor")
    data, s = torch.ops.fp8dispatch.quantize(x, granularity, dtype, sizes, scale,
                                             None if scale_ub is None else float(scale_ub),
                                             pow2_scale, overflow, backend)
    rows, cols = _shape2d("x", x)
    # The checked constructor: dynamo traces a dataclass __init__, not `_trusted`'s slot setters.
    return Fp8Tensor(data, s, block_for(granularity, rows, cols, block_size))


# --- dequantize -----------------------------------------------------------------------------


@torch.library.custom_op("fp8dispatch::dequantize", mutates_args=())
def dequantize(bits: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor, block: list[int],
               dtype: torch.dtype, backend: str) -> torch.Tensor:
    """`fp8dispatch.dequantize` as an op on an Fp8Tensor's parts (its data as uint8 bits)."""
    from fp8dispatch import api

    out = api.dequantize(Fp8Tensor(bits.view(fp8_dtype), scale, (block[0], block[1])), dtype, backend=backend)
    return _fresh(out, bits, scale)


@dequantize.register_fake
def _(bits, fp8_dtype, scale, block, dtype, backend):
    return bits.new_empty(bits.shape, dtype=dtype)


def traced_dequantize(t, dtype, backend) -> torch.Tensor:
    if not isinstance(t, Fp8Tensor):
        raise Fp8TypeError(f"t: expected an Fp8Tensor, got {type(t).__name__}")
    return torch.ops.fp8dispatch.dequantize(_bits(t.data), t.data.dtype, t.scale, list(t.block), dtype, backend)


# --- matmul ---------------------------------------------------------------------------------


@torch.library.custom_op("fp8dispatch::matmul", mutates_args=())
def matmul(
    a: torch.Tensor, a_fp8: Optional[torch.dtype], a_scale: Optional[torch.Tensor], a_block: Optional[list[int]],
    b: torch.Tensor, b_fp8: Optional[torch.dtype], b_scale: Optional[torch.Tensor], b_block: Optional[list[int]],
    recipe: Optional[str], out_dtype: torch.dtype, bias: Optional[torch.Tensor], backend: str,
) -> torch.Tensor:
    """`fp8dispatch.matmul` as an op. An FP8 operand comes as (uint8 bits, its FP8 dtype, scale, block);
    a high-precision one as (tensor, None, None, None)."""
    from fp8dispatch import api

    out = api.matmul(_operand(a, a_fp8, a_scale, a_block), _operand(b, b_fp8, b_scale, b_block),
                     recipe=recipe, out_dtype=out_dtype, bias=bias, backend=backend)
    return _fresh(out, a, b, bias)


@matmul.register_fake
def _(a, a_fp8, a_scale, a_block, b, b_fp8, b_scale, b_block, recipe, out_dtype, bias, backend):
    if a.dim() < 2 or b.dim() != 2:
        raise Fp8ValueError(f"a, b: expected a [..., M, K] and b [K, N], got shapes "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    torch._check(a.shape[-1] == b.shape[0],
                 lambda: f"b: expected {a.shape[-1]} rows to match a's last dim K, got shape {tuple(b.shape)}")
    return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=out_dtype)


def _operand(t, fp8_dtype, scale, block):
    return t if fp8_dtype is None else Fp8Tensor(t.view(fp8_dtype), scale, (block[0], block[1]))


def _parts(name: str, t):
    if isinstance(t, Fp8Tensor):
        return _bits(t.data), t.data.dtype, t.scale, list(t.block)
    if isinstance(t, torch.Tensor):
        return t, None, None, None
    raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")


def traced_matmul(a, b, recipe, out_dtype, bias, backend) -> torch.Tensor:
    return torch.ops.fp8dispatch.matmul(*_parts("a", a), *_parts("b", b), recipe, out_dtype, bias, backend)


def linear_parts(x, data, scale, block, bias, out_dtype, backend, recipe=None) -> torch.Tensor:
    """`x @ W.T` for an FP8 weight given as its parts [N, K], as one traced op."""
    if data.dim() != 2:
        raise Fp8ValueError(f"w: expected a 2-d weight [N, K], got shape {tuple(data.shape)}")
    return torch.ops.fp8dispatch.matmul(*_parts("x", x), _bits(data).t(), data.dtype, scale.t(),
                                        [block[1], block[0]], recipe, out_dtype, bias, backend)


def dequantize_parts(data, scale, block, dtype, backend="auto") -> torch.Tensor:
    return torch.ops.fp8dispatch.dequantize(_bits(data), data.dtype, scale, list(block), dtype, backend)


def _bits(data: torch.Tensor) -> torch.Tensor:
    # FP8 crosses the op boundary as uint8 bits: opcheck's schema check compares inputs with
    # allclose, which torch does not implement for float8 (a view, free at run time).
    return data.view(torch.uint8)


def _shape2d(name: str, x: torch.Tensor):
    if x.dim() < 2:
        raise Fp8ValueError(f"{name}: expected at least 2 dimensions [..., rows, cols], got shape {tuple(x.shape)}")
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    return rows, x.shape[-1]
