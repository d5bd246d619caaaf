"""`Fp8Linear`: an `nn.Linear` whose weight is stored in FP8 with its dequantization scales."""

from __future__ import annotations

import torch
from torch import nn

from fp8dispatch import api, ops
from fp8dispatch.blocks import RECIPES, Block, block_for, cdiv, scale_shape
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, Unsupported
from fp8dispatch.formats import HIGH_PRECISION, fp8_format, is_fp8
from fp8dispatch.tensor import Fp8Tensor

# Token count used to name the backend a layer's matmul routes to (repr, conversion reports):
# `why_not` depends on M only at the edges, and 128 is a typical prefill tile.
PROBE_M = 128


class Fp8Linear(nn.Module):
    """`y = x @ W.T + b` with W stored as FP8 data `weight` [N, K] and fp32 `weight_scale_inv`.

    `weight_scale_inv` holds dequantization scales, `W ≈ weight.float() * weight_scale_inv`
    broadcast over `block` (128×128 by default; (1, K) for the row recipe, (N, K) for tensor).
    The buffer names are DeepSeek-V3's, so its checkpoints load with `load_state_dict`. Each call
    quantizes x by the recipe the weight's blocks imply (1×128 groups, rows, or one scale) and runs
    the matmul on `backend`. Gradients reach x (and a trainable bias), computed from the
    dequantized weight; the FP8 weight itself is frozen.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: str = "block",
                 block_size: int = 128, dtype: torch.dtype = torch.float8_e4m3fn, backend: str = "auto",
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if recipe not in RECIPES:
            raise Fp8ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
        fp8_format(dtype)
        self.in_features, self.out_features = in_features, out_features
        self.recipe, self.backend = recipe, backend
        self.block: Block = block_for(recipe, out_features, in_features, block_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype, device=device))
        shape = scale_shape((out_features, in_features), self.block)
        self.register_buffer("weight_scale_inv", torch.ones(shape, dtype=torch.float32, device=device))
        self.bias = None if not bias else nn.Parameter(
            torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str = "block", *, block_size: int = 128,
                    dtype: torch.dtype = torch.float8_e4m3fn, backend: str = "auto") -> Fp8Linear:
        """Quantize an `nn.Linear`'s weight by `recipe` ("block", "row" or "tensor")."""
        if not isinstance(linear, nn.Linear):
            raise Fp8TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.dtype not in HIGH_PRECISION:
            raise Fp8TypeError(f"linear.weight: expected float32, float16 or bfloat16, got {w.dtype}")
        if w.device.type == "meta":
            raise Fp8ValueError("linear.weight: is on the meta device; load real weights first "
                                "(or build from FP8 data with Fp8Linear.from_fp8)")
        if recipe not in RECIPES:
            raise Fp8ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
        granularity = "block" if recipe == "block" else recipe
        q = api.quantize(w, granularity, dtype=dtype, block_size=block_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_fp8(q.data, q.scale, bias, block=q.block, backend=backend, recipe=recipe,
                            trainable_bias=linear.bias is not None and linear.bias.requires_grad)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 *, block: Block | None = None, backend: str = "auto", recipe: str | None = None,
                 trainable_bias: bool = False) -> Fp8Linear:
        """Build from FP8 data [N, K] and its dequantization scales (DeepSeek's `weight_scale_inv`).

        With no `block`, it is read off the scale shape: 128×128 blocks (DeepSeek-V3), then rows
        ([N, 1]), then one scale ([1, 1]).
        """
        if not isinstance(weight, torch.Tensor) or not is_fp8(weight.dtype):
            seen = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise Fp8TypeError(f"weight: expected an FP8 tensor [N, K], got {seen}")
        if weight.dim() != 2:
            raise Fp8ValueError(f"weight: expected 2 dimensions [N, K], got shape {tuple(weight.shape)}")
        if not isinstance(weight_scale_inv, torch.Tensor) or weight_scale_inv.dtype not in HIGH_PRECISION:
            seen = getattr(weight_scale_inv, "dtype", type(weight_scale_inv).__name__)
            raise Fp8TypeError(f"weight_scale_inv: expected a float32 tensor, got {seen}")
        n, k = weight.shape
        scale = weight_scale_inv.to(torch.float32)  # bf16/fp16 scales widen exactly
        if scale.dim() == 0:
            scale = scale.reshape(1, 1)
        block = _block_from_scale(n, k, tuple(scale.shape)) if block is None else tuple(block)
        try:
            checked = Fp8Tensor(weight, scale, block)
        except Fp8ValueError as e:  # name the tensor as the caller knows it
            raise Fp8ValueError(str(e).replace("scale:", "weight_scale_inv:", 1)) from None
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = k, n
        layer.recipe = recipe or _recipe_of(block, n, k)
        layer.backend, layer.block = backend, checked.block
        layer.register_buffer("weight", weight.contiguous())
        layer.register_buffer("weight_scale_inv", scale.contiguous())
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise Fp8ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.to(weight.device), requires_grad=trainable_bias)
        layer.bias = bias
        return layer

    # --- use ----------------------------------------------------------------------------------

    def fp8_weight(self) -> Fp8Tensor:
        """The weight as an Fp8Tensor [N, K] sharing the buffers' storage, kept while they are.

        Kept because an Fp8Tensor caches its transpose and dispatch key, which the hot path uses.
        """
        cached = self.__dict__.get("_fp8")
        if cached is None or cached.data is not self.weight or cached.scale is not self.weight_scale_inv:
            cached = self.__dict__["_fp8"] = Fp8Tensor._trusted(self.weight, self.weight_scale_inv, self.block)
        return cached

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return _dequantize(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _Fp8LinearFunction.apply(x, self.weight, self.weight_scale_inv, bias, self.block,
                                            self.backend, None if compiling else self.fp8_weight())
        if compiling:
            return _linear(x, self.weight, self.weight_scale_inv, self.block, bias, self.backend)
        return api.linear(x, self.fp8_weight(), bias, recipe=self.recipe, backend=self.backend)

    def matmul_backend(self, m: int = PROBE_M, dtype: torch.dtype = torch.bfloat16) -> str:
        """The backend this layer's matmul routes to for M tokens, or why none can run it."""
        try:
            return matmul_backend(self.fp8_weight(), self.bias, self.backend, m, dtype)
        except Unsupported as e:
            return f"none ({str(e).splitlines()[0]})"

    def extra_repr(self) -> str:
        chosen = self.matmul_backend() if self.weight.device.type != "meta" else "unknown (meta)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe}, block={self.block}, "
                f"dtype={str(self.weight.dtype).removeprefix('torch.')}, backend={self.backend} "
                f"(matmul on {chosen} at M={PROBE_M})")

    # --- state --------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` and `.half()` convert every floating-point tensor, and float8
        # counts as one: keep the FP8 data and the fp32 scales, follow only device moves.
        frozen = (self.weight, self.weight_scale_inv)

        def keep_dtype(t):
            out = fn(t)
            if any(t is f for f in frozen) and out.dtype != t.dtype:
                return t.to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # load_state_dict copies with a dtype cast; a bf16 weight cast into the FP8 buffer would
        # lose its scale silently, so refuse it by name.
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != self.weight.dtype:
            raise Fp8TypeError(f"{prefix}weight: expected {self.weight.dtype} data for this Fp8Linear, got "
                               f"{w.dtype} (convert high-precision weights with Fp8Linear.from_linear)")
        s = state_dict.get(prefix + "weight_scale_inv")
        if s is not None and s.dtype not in HIGH_PRECISION:
            raise Fp8TypeError(f"{prefix}weight_scale_inv: expected float32 scales, got {s.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _Fp8LinearFunction(torch.autograd.Function):
    """Forward in FP8; backward `grad_x = grad_y @ dequantize(W)` in the gradient's dtype."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, block, backend, fp8):
        ctx.save_for_backward(weight, scale)
        ctx.block = block
        ctx.bias_grad = bias is not None and bias.requires_grad
        if fp8 is None:
            return _linear(x, weight, scale, block, bias, backend)
        return api.linear(x, fp8, bias, backend=backend)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dequantize(weight, scale, ctx.block, grad.dtype)
        if ctx.bias_grad:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None, None, None


# Under torch.compile these take the weight's parts straight to the custom ops: building an
# Fp8Tensor with `_trusted` (slot setters) or calling `.t()` (a cache written by mutation) is
# something dynamo cannot trace.
def _linear(x, weight, scale, block, bias, backend):
    if torch.compiler.is_compiling():
        out_dtype = x.dtype if x.dtype in HIGH_PRECISION else torch.bfloat16
        return ops.linear_parts(x, weight, scale, block, bias, out_dtype, backend)
    return api.linear(x, Fp8Tensor._trusted(weight, scale, block), bias, backend=backend)


def _dequantize(weight, scale, block, dtype):
    if torch.compiler.is_compiling():
        return ops.dequantize_parts(weight, scale, block, dtype)
    return api.dequantize(Fp8Tensor._trusted(weight, scale, block), dtype)


def matmul_backend(w: Fp8Tensor, bias, backend: str, m: int, dtype: torch.dtype) -> str:
    """Name the backend `linear(x [m, K], w)` routes its matmul to; raises Unsupported if none."""
    from fp8dispatch import registry

    x = torch.empty((m, w.shape[1]), dtype=dtype, device=w.device)
    plan = api._plan_matmul(x, w.t(), None, dtype, bias, backend)
    return registry.choose(plan.problem, backend).name if plan.problem is not None else "none (empty)"


def _block_from_scale(n: int, k: int, shape: tuple[int, ...]) -> Block:
    for block in ((128, 128), (1, k), (n, k)):
        if scale_shape((n, k), block) == shape:
            return block
    raise Fp8ValueError(
        f"weight_scale_inv: expected shape ({cdiv(n, 128)}, {cdiv(k, 128)}) (128×128 blocks), ({n}, 1) "
        f"(rows) or (1, 1) (tensor) for weight [{n}, {k}], got {shape}; pass block= for other blocks")


def _recipe_of(block: Block, n: int, k: int) -> str:
    """The recipe a weight [N, K] in `block`s implies: matmul's own reading of its transpose."""
    return api._recipe_carried((block[1], block[0]), k, n, from_a=False)[0]
