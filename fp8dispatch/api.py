"""The public ops: check the arguments once per call signature, then go straight to a backend.

Each call builds a key from the arguments' static properties (dtypes, shapes, devices, strides,
options). The first call with a key validates everything, describes the problem, asks the
registry for a backend and stores a plan; later calls with the same key only run the plan.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from fp8dispatch import registry, tuning
from fp8dispatch.blocks import RECIPES, Block, block_for, expand_scale, scale_shape
from fp8dispatch.errors import (
    Fp8DispatchError,
    Fp8TypeError,
    Fp8ValueError,
    NumericalOverflowError,
)
from fp8dispatch.formats import HIGH_PRECISION, finite_amax, fp8_format, is_fp8
from fp8dispatch.problem import (
    DequantizeProblem,
    MatmulProblem,
    QuantizeProblem,
    device_capability,
    recipe_of,
)
from fp8dispatch.scaling import FP32_MAX, SMALLEST_SCALE
from fp8dispatch.tensor import Fp8Tensor

# Under torch.compile each public op becomes one opaque custom op (fp8dispatch/ops.py), so the
# backend is chosen when the graph runs, not while tracing. Eager calls never take that branch:
# `is_compiling()` costs about 0.1 µs, the custom-op dispatcher tens of µs.
from fp8dispatch import ops as _ops  # noqa: E402

OVERFLOW_MODES = ("saturate", "error", "rescale")
_E4M3, _BLOCK_SIZE, _SATURATE, _AUTO = torch.float8_e4m3fn, 128, "saturate", "auto"  # quantize's defaults
_is_compiling = torch.compiler.is_compiling  # bound once: dynamo folds the same function to True
_trusted = Fp8Tensor._trusted
RESCALE_ATTEMPTS = 3

_plans: dict[tuple, object] = {}
registry._refresh_hooks.append(_plans.clear)


def _cached(key: tuple, make: Callable[[], object]):
    try:
        return _plans[key]
    except KeyError:
        plan = _plans[key] = make()
        return plan
    except TypeError:  # an unhashable argument: the planner names it
        return make()


# --- quantize -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _QuantizePlan:
    run: Callable
    block: Block
    shape2d: tuple[int, int]
    flatten: bool  # leading dims to fold into rows (a view op costs microseconds: skip it for 2-d)
    problem: QuantizeProblem | None  # None for empty tensors, which need no backend


def quantize(
    x: torch.Tensor,
    granularity: str = "row",
    *,
    dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int | Block = 128,
    scale: torch.Tensor | None = None,
    scale_ub: float | None = None,
    pow2_scale: bool = False,
    overflow: str = "saturate",
    backend: str = "auto",
) -> Fp8Tensor:
    """Quantize `x` [..., rows, cols] to FP8 by blocks of `granularity`; returns an Fp8Tensor.

    Leading dims flatten into rows. With no `scale`, each block's scale is `amax / fp8_max`
    (`scale_ub` caps amax; `pow2_scale` rounds scales up to powers of two). A user `scale` must
    have the block's scale shape; `overflow` decides what values beyond the range then do.
    """
    if _is_compiling():
        return _ops.traced_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend)
    # Every option at its default, tested by identity (CPython shares small ints and interns
    # identifier-like literals, so `quantize(x, "group", backend="auto")` passes too; an equal
    # value that is another object just takes the general path): a 5-field key, starting with a
    # dtype where every other key starts with a string, whose plan takes x alone.
    if (scale is None and scale_ub is None and dtype is _E4M3 and block_size is _BLOCK_SIZE
            and pow2_scale is False and overflow is _SATURATE and backend is _AUTO):
        try:
            run = _plans[(x.dtype, x.shape, x.device, x.is_contiguous(), granularity)]
        except (KeyError, TypeError, AttributeError):  # the first call, or an argument to reject
            return _quantize_planned(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow,
                                     backend, defaults=True)
        return run(x)
    try:  # the same key as _quantize_planned's, inline: a helper's call would cost ~0.1 µs
        run = _plans[("q", x.dtype, x.shape, x.device, x.is_contiguous(), granularity, dtype,
                      block_size if type(block_size) is int else repr(block_size), scale is None,
                      scale_ub is None, pow2_scale is True, pow2_scale is False, overflow, backend)]
    except (KeyError, TypeError, AttributeError):
        return _quantize_planned(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend)
    return run(x, scale, scale_ub, pow2_scale)


def _quantize_planned(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend,
                      defaults=False):
    """A call whose key missed: plan it (the planner raises on bad arguments), cache, run."""
    try:
        short = (x.dtype, x.shape, x.device, x.is_contiguous(), granularity)
    except AttributeError:
        raise Fp8TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}") from None
    # Values equal to valid ones but of another type (1 for True, 128.0 for 128) must not find
    # a valid call's plan: the key holds the types too, so they reach the planner and its error.
    key = ("q", *short, dtype, block_size if type(block_size) is int else repr(block_size), scale is None,
           scale_ub is None, pow2_scale is True, pow2_scale is False, overflow, backend)
    try:
        run = _plans[key]
    except KeyError:
        run = _plans[key] = _quantize_runner(_plan_quantize(x, granularity, dtype, block_size, scale, scale_ub,
                                                            pow2_scale, overflow, backend), dtype, overflow)
    except TypeError:  # an unhashable argument: the planner names it
        run = _quantize_runner(_plan_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale,
                                              overflow, backend), dtype, overflow)
    if defaults:
        try:
            _plans[short] = _default_runner(run.plan)
        except TypeError:
            pass
    return run(x, scale, scale_ub, pow2_scale)


def _quantize_runner(plan: _QuantizePlan, dtype: torch.dtype, overflow: str) -> Callable:
    """`(x, scale, scale_ub, pow2_scale) -> Fp8Tensor` for a plan: checks the per-call values."""
    run, block, shape2d, flatten = plan.run, plan.block, plan.shape2d, plan.flatten

    def quantize_with(x, scale, scale_ub, pow2_scale):
        x2d = x.reshape(shape2d) if flatten else x
        if scale is not None:
            scale = _user_scale(x2d, scale, block, dtype, overflow)
        if scale_ub is not None:
            scale_ub = _scale_ub(scale_ub)
        data, s = run(x2d, block, dtype, scale, scale_ub, pow2_scale)
        return _trusted(data.view(x.shape) if flatten else data, s, block)

    quantize_with.plan = plan
    return quantize_with


def _default_runner(plan: _QuantizePlan) -> Callable:
    """`x -> Fp8Tensor` for a plan of default options, with nothing left to check or branch on."""
    run, block, shape2d = plan.run, plan.block, plan.shape2d

    if plan.flatten:
        def quantize_default(x):
            data, s = run(x.reshape(shape2d), block, _E4M3, None, None, False)
            return _trusted(data.view(x.shape), s, block)
    else:
        def quantize_default(x):
            data, s = run(x, block, _E4M3, None, None, False)
            return _trusted(data, s, block)
    return quantize_default


def _plan_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend):
    _check_high_precision("x", x)
    if x.dim() < 2:
        raise Fp8ValueError(
            f"x: expected at least 2 dimensions [..., rows, cols], got shape {tuple(x.shape)}"
            + (" (use x.unsqueeze(0) for a single row)" if x.dim() == 1 else "")
        )
    fp8_format(dtype)
    shape2d = _shape2d(x.shape)
    block = block_for(granularity, *shape2d, block_size)
    if overflow not in OVERFLOW_MODES:
        raise Fp8ValueError(f"overflow: expected one of {', '.join(OVERFLOW_MODES)}, got {overflow!r}")
    if not isinstance(pow2_scale, bool):
        raise Fp8TypeError(f"pow2_scale: expected a bool, got {type(pow2_scale).__name__}")
    if scale_ub is not None:
        _scale_ub(scale_ub)
    _check_backend_arg(backend)
    if x.numel() == 0:
        return _QuantizePlan(_quantize_empty, block, shape2d, x.dim() != 2, None)
    problem = QuantizeProblem(
        device=x.device, capability=device_capability(x.device), in_dtype=x.dtype, shape=shape2d,
        contiguous=x.is_contiguous(), block=block, fp8_dtype=dtype, user_scale=scale is not None,
        scale_ub=scale_ub is not None, pow2_scale=pow2_scale,
    )
    chosen = registry.choose(problem, backend)
    return _QuantizePlan(chosen.quantize, block, shape2d, x.dim() != 2, problem)


def _quantize_empty(x2d, block, dtype, scale, scale_ub, pow2_scale):
    s = scale if scale is not None else torch.ones(scale_shape(tuple(x2d.shape), block), device=x2d.device)
    return torch.empty(x2d.shape, dtype=dtype, device=x2d.device), s


def _user_scale(x2d: torch.Tensor, scale, block: Block, dtype: torch.dtype, overflow: str) -> torch.Tensor:
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


def _scale_ub(scale_ub) -> float:
    if isinstance(scale_ub, torch.Tensor) and scale_ub.numel() == 1:
        scale_ub = scale_ub.item()
    if isinstance(scale_ub, bool) or not isinstance(scale_ub, (int, float)):
        raise Fp8TypeError(f"scale_ub: expected a positive float, got {type(scale_ub).__name__}")
    if not (SMALLEST_SCALE / 2 < scale_ub <= FP32_MAX):  # what rounds to a positive finite fp32; NaN fails
        raise Fp8ValueError(f"scale_ub: expected a positive float within fp32's range ({SMALLEST_SCALE / 2:g}, "
                            f"{FP32_MAX:g}], got {scale_ub!r}")
    return float(scale_ub)


# --- dequantize -----------------------------------------------------------------------------


def dequantize(t: Fp8Tensor, dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto") -> torch.Tensor:
    """`t.data * t.scale` (broadcast by blocks) in fp32, cast to `dtype`; the data's shape."""
    if torch.compiler.is_compiling():
        return _ops.traced_dequantize(t, dtype, backend)
    if not isinstance(t, Fp8Tensor):
        raise Fp8TypeError(f"t: expected an Fp8Tensor, got {type(t).__name__}")
    data = t.data
    key = ("d", data.dtype, data.shape, data.device, data.is_contiguous(), t.block, dtype, backend)
    run, shape2d = _cached(key, lambda: _plan_dequantize(t, dtype, backend))
    if data.dim() == 2:
        return run(data, t.scale, t.block, dtype)
    return run(data.reshape(shape2d), t.scale, t.block, dtype).view(data.shape)


def _plan_dequantize(t: Fp8Tensor, dtype, backend):
    _check_out_dtype("dtype", dtype)
    _check_backend_arg(backend)
    shape2d = t.shape2d
    if t.data.numel() == 0:
        return (lambda d, s, b, o: torch.empty(d.shape, dtype=o, device=d.device)), shape2d
    problem = DequantizeProblem(
        device=t.device, capability=device_capability(t.device), fp8_dtype=t.dtype, shape=shape2d,
        contiguous=t.data.is_contiguous(), block=t.block, out_dtype=dtype,
    )
    return registry.choose(problem, backend).dequantize, shape2d


# --- matmul ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MatmulPlan:
    quantize_a: _QuantizePlan | None  # None when a is already an Fp8Tensor
    quantize_b: _QuantizePlan | None
    run: Callable | None  # None when the result is empty or K == 0
    m: int
    n: int
    out_shape: tuple[int, ...]
    flatten: bool  # a has leading batch dims
    problem: MatmulProblem | None


def matmul(
    a: torch.Tensor | Fp8Tensor,
    b: torch.Tensor | Fp8Tensor,
    *,
    recipe: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`a @ b` in FP8 for a [..., M, K] and b [K, N]; high-precision inputs are quantized first.

    `recipe` ("block": a by 1×128 groups, b by 128×128 blocks; "row"; "tensor") says how
    high-precision operands are quantized; default "block". An Fp8Tensor operand carries its own
    blocks, the other operand is quantized to match them, and a contradicting `recipe` raises.
    `backend` picks the GEMM's backend; quantizing the inputs follows the quantize routing.
    """
    if _is_compiling():
        return _ops.traced_matmul(a, b, recipe, out_dtype, bias, backend)
    key = ("m", a.dispatch_key() if type(a) is Fp8Tensor else _operand_key("a", a),
           b.dispatch_key() if type(b) is Fp8Tensor else _operand_key("b", b), recipe, out_dtype,
           None if bias is None else _operand_key("bias", bias), backend)
    try:
        run = _plans[key]
    except (KeyError, TypeError):
        run = _cached(key, lambda: _matmul_runner(_plan_matmul(a, b, recipe, out_dtype, bias, backend), out_dtype))
    return run(a, b, bias)


def _matmul_runner(plan: _MatmulPlan, out_dtype: torch.dtype) -> Callable:
    """`(a, b, bias) -> a @ b` for a plan: the quantizes it needs, then the GEMM, nothing to branch on."""
    if plan.run is None:
        return lambda a, b, bias: _empty_product(a, plan, out_dtype, bias)
    mm, qa, qb, flatten, m, out_shape = plan.run, plan.quantize_a, plan.quantize_b, plan.flatten, plan.m, plan.out_shape
    if qa is not None:
        qa_run, qa_block, qa_shape = qa.run, qa.block, qa.shape2d
        if flatten:
            def operand_a(a):
                data, s = qa_run(a.reshape(qa_shape), qa_block, _E4M3, None, None, False)
                return _trusted(data, s, qa_block)
        else:
            def operand_a(a):
                data, s = qa_run(a, qa_block, _E4M3, None, None, False)
                return _trusted(data, s, qa_block)
    elif flatten:
        def operand_a(a):
            return _trusted(a.data.reshape(m, -1), a.scale, a.block)
    else:
        operand_a = None
    if qb is not None:  # quantize b.t() [N, K] so K stays the fast dimension
        qb_run, qb_block = qb.run, qb.block
        b_block = (qb_block[1], qb_block[0])

        def operand_b(b):
            data, s = qb_run(b.t(), qb_block, _E4M3, None, None, False)
            return _trusted(data.t(), s.t(), b_block)
    else:
        operand_b = None

    if operand_a is None and operand_b is None:  # both FP8 already: the GEMM alone
        return lambda a, b, bias: mm(a, b, out_dtype, bias)
    if operand_b is None and not flatten:  # the common case: linear(x, fp8 weight) on 2-d x
        return lambda a, b, bias: mm(operand_a(a), b, out_dtype, bias)

    def matmul_with(a, b, bias):
        out = mm(a if operand_a is None else operand_a(a), b if operand_b is None else operand_b(b), out_dtype, bias)
        return out.view(out_shape) if flatten else out
    return matmul_with


def linear(
    x: torch.Tensor | Fp8Tensor,
    w: torch.Tensor | Fp8Tensor,
    bias: torch.Tensor | None = None,
    *,
    recipe: str | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`x @ w.T` for a weight w [N, K] (nn.Linear layout); out_dtype defaults to x's dtype."""
    if out_dtype is None:
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else None  # each tensor property read costs ~0.1 µs
        if out_dtype not in HIGH_PRECISION:
            out_dtype = torch.bfloat16
    wt = w._transposed if isinstance(w, Fp8Tensor) else None  # cached after the first call
    if wt is None:
        if not isinstance(w, (torch.Tensor, Fp8Tensor)):
            raise Fp8TypeError(f"w: expected a tensor or Fp8Tensor, got {type(w).__name__}")
        if len(w.shape) != 2:
            raise Fp8ValueError(f"w: expected a 2-d weight [N, K], got shape {tuple(w.shape)}")
        wt = w.t()
    try:
        return matmul(x, wt, recipe=recipe, out_dtype=out_dtype, bias=bias, backend=backend)
    except Fp8DispatchError:
        _check_linear(x, w)  # raise the same finding in linear's own terms: x, w and w's shape
        raise


def _check_linear(x, w) -> None:
    """The operand checks of matmul, worded for `linear(x, w)`; run only once matmul has refused."""
    for name, t in (("x", x), ("w", w)):
        if isinstance(t, torch.Tensor):
            _check_high_precision(name, t)
        elif not isinstance(t, Fp8Tensor):
            raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")
    if len(x.shape) < 2:
        raise Fp8ValueError(f"x: expected at least 2 dimensions [..., M, K], got shape {tuple(x.shape)}"
                            + (" (use x.unsqueeze(0) for a single row)" if len(x.shape) == 1 else ""))
    if x.shape[-1] != w.shape[1]:
        raise Fp8ValueError(f"w: expected [N, {x.shape[-1]}] to match x's last dim K, got shape {tuple(w.shape)}")
    if x.device != w.device:
        raise Fp8ValueError(f"w: expected device {x.device} (x's), got {w.device}")


def _operand_key(name: str, t) -> tuple:
    if isinstance(t, Fp8Tensor):
        return t.dispatch_key()
    if isinstance(t, torch.Tensor):
        return (t.dtype, t.shape, t.device, t.stride())
    raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")


def _plan_matmul(a, b, recipe, out_dtype, bias, backend) -> _MatmulPlan:
    if recipe is not None and recipe not in RECIPES:
        raise Fp8ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    _check_out_dtype("out_dtype", out_dtype)
    _check_backend_arg(backend)
    for name, t in (("a", a), ("b", b)):
        if isinstance(t, torch.Tensor):
            _check_high_precision(name, t)
    if len(a.shape) < 2:
        raise Fp8ValueError(f"a: expected at least 2 dimensions [..., M, K], got shape {tuple(a.shape)}")
    if len(b.shape) != 2:
        raise Fp8ValueError(f"b: expected a 2-d [K, N] operand, got shape {tuple(b.shape)}")
    k, n = b.shape
    if a.shape[-1] != k:
        raise Fp8ValueError(f"b: expected {a.shape[-1]} rows to match a's last dim K, got shape {tuple(b.shape)}")
    if a.device != b.device:
        raise Fp8ValueError(f"b: expected device {a.device} (a's), got {b.device}")
    m = math.prod(a.shape[:-1])
    if bias is not None:
        _check_high_precision("bias", bias)
        if tuple(bias.shape) != (n,):
            raise Fp8ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise Fp8ValueError(f"bias: expected device {a.device} (a's), got {bias.device}")
    a_block, b_block, recipe = _operand_blocks(a, b, recipe, m, k, n)
    out_shape = (*a.shape[:-1], n)
    if m == 0 or n == 0 or k == 0:
        return _MatmulPlan(None, None, None, m, n, out_shape, len(a.shape) != 2, None)
    quantize_a = quantize_b = None
    if isinstance(a, torch.Tensor):
        quantize_a = _plan_quantize(a.reshape(m, k), "block", torch.float8_e4m3fn, a_block,
                                    None, None, False, "saturate", "auto")
    if isinstance(b, torch.Tensor):
        quantize_b = _plan_quantize(b.t(), "block", torch.float8_e4m3fn, (b_block[1], b_block[0]),
                                    None, None, False, "saturate", "auto")
    problem = MatmulProblem(
        device=a.device, capability=device_capability(a.device), recipe=recipe_of(a_block, b_block, m, k, n),
        a_dtype=a.dtype if isinstance(a, Fp8Tensor) else torch.float8_e4m3fn,
        b_dtype=b.dtype if isinstance(b, Fp8Tensor) else torch.float8_e4m3fn,
        m=m, n=n, k=k, a_block=a_block, b_block=b_block,
        a_row_major=not isinstance(a, Fp8Tensor) or a.data.is_contiguous(),
        b_col_major=not isinstance(b, Fp8Tensor) or b.data.t().is_contiguous(),
        out_dtype=out_dtype, bias_dtype=None if bias is None else bias.dtype,
    )
    run = registry.choose(problem, backend).matmul
    return _MatmulPlan(quantize_a, quantize_b, run, m, n, out_shape, len(a.shape) != 2, problem)


def _operand_blocks(a, b, recipe, m, k, n) -> tuple[Block, Block, str]:
    """The blocks both operands will have: from the Fp8Tensors, else from the recipe.

    An explicit `recipe` is carried through, not re-read from block shapes (at 128×128 or smaller
    a weight's 128×128 block also covers the whole tensor): an Fp8Tensor operand only has to be
    able to serve it.
    """
    a_fp8, b_fp8 = isinstance(a, Fp8Tensor), isinstance(b, Fp8Tensor)
    if a_fp8 and b_fp8:
        a_block, b_block = a.block, b.block
        if a_block[1] < k and b_block[0] < k and a_block[1] != b_block[0]:
            raise Fp8ValueError(f"b: K blocks must line up with a's: a has {a_block[1]}-wide K blocks, "
                                f"b has {b_block[0]}-tall ones")
        named = recipe_of(a_block, b_block, m, k, n)
        if recipe is not None:
            for name, t, rows, cols in (("a", a, m, k), ("b", b, k, n)):
                if _k_group(recipe, t.block, rows, cols, from_a=name == "a") is None:
                    raise Fp8ValueError(f"recipe: {recipe!r} contradicts the blocks {t.block} of {name} "
                                        f"(the operands' blocks make {named!r})")
        return a_block, b_block, named
    if a_fp8 or b_fp8:
        given, name = (a, "a") if a_fp8 else (b, "b")
        rows, cols = (m, k) if a_fp8 else (k, n)
        if recipe is None:
            recipe, group = _recipe_carried(given.block, rows, cols, from_a=a_fp8)
        else:
            group = _k_group(recipe, given.block, rows, cols, from_a=a_fp8)
            if group is None:
                carried = _recipe_carried(given.block, rows, cols, from_a=a_fp8)[0]
                raise Fp8ValueError(f"recipe: {recipe!r} contradicts the blocks {given.block} of "
                                    f"{name}, which say {carried!r}")
    else:
        recipe, group = recipe or "block", 128
    a_block = a.block if a_fp8 else {"block": (1, group), "row": (1, max(k, 1)), "tensor": (max(m, 1), max(k, 1))}[recipe]
    b_block = b.block if b_fp8 else {"block": (group, group), "row": (max(k, 1), 1), "tensor": (max(k, 1), max(n, 1))}[recipe]
    return a_block, b_block, recipe


def _recipe_carried(block: Block, rows: int, cols: int, from_a: bool) -> tuple[str, int]:
    """The recipe an Fp8Tensor operand implies when the call names none, and its K block size.

    A weight (b) whose block covers it whole is "tensor" only if the block is exactly its shape
    and not the block recipe's 128×128: `quantize(w, "block")` on a weight of at most 128×128
    gives a 128×128 block too, and reading that as "tensor" would quantize the activation with one
    scale for all its tokens. An exactly 128×128 tensor-scaled weight thus gets per-token
    activations (the row recipe's numerics): more accurate, never less.
    """
    k_block = block[1] if from_a else block[0]
    k = cols if from_a else rows
    if k_block < k:
        return "block", k_block
    covers = block[0] >= rows and block[1] >= cols
    if covers and not from_a and (block != (max(rows, 1), max(cols, 1)) or block == (_BLOCK_SIZE, _BLOCK_SIZE)):
        return "block", k_block
    if covers:
        return "tensor", k
    return "row", k


def _k_group(recipe: str, block: Block, rows: int, cols: int, from_a: bool) -> int | None:
    """The K block size an Fp8Tensor operand's `block` gives under `recipe`; None if it cannot serve it."""
    k_block, across = (block[1], block[0]) if from_a else (block[0], block[1])
    k, width = (cols, rows) if from_a else (rows, cols)
    if recipe == "block":  # a in 1×g groups; b in blocks, not per output channel
        return k_block if (block[0] == 1 if from_a else across > 1 or width == 1) else None
    if k_block < k:  # row and tensor: no scale varies along K
        return None
    if recipe == "row":
        return k if across == 1 or across >= width else None
    return k if across >= width else None


def _empty_product(a, plan: _MatmulPlan, out_dtype, bias) -> torch.Tensor:
    out = torch.zeros(plan.out_shape, dtype=out_dtype, device=a.device)
    if bias is not None and plan.m and plan.n:
        out += bias.to(out_dtype)
    return out


# --- shared checks --------------------------------------------------------------------------


def _check_high_precision(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise Fp8TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in HIGH_PRECISION:
        hint = " (wrap FP8 data in an Fp8Tensor with its scale)" if is_fp8(t.dtype) else ""
        raise Fp8TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}{hint}")


def _check_out_dtype(name: str, dtype) -> None:
    if dtype not in HIGH_PRECISION:
        raise Fp8TypeError(f"{name}: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def _check_backend_arg(backend) -> None:
    if not isinstance(backend, str):
        raise Fp8TypeError(f"backend: expected a backend name or 'auto', got {type(backend).__name__}")
    for name in backend.split(","):
        if name.strip().lower() != registry.AUTO:
            registry.get_backend(name.strip())


def _shape2d(shape: torch.Size) -> tuple[int, int]:
    return (math.prod(shape[:-1]), shape[-1])


# --- explain --------------------------------------------------------------------------------


def explain(op: str, *args, **kwargs) -> str:
    """The routing table for this call (each backend, and why it can or cannot serve); never raises.

    A call the op itself would refuse gets, instead of the table, the error it would raise.
    """
    ops = {"quantize": quantize, "dequantize": dequantize, "matmul": matmul, "linear": linear}
    if not isinstance(op, str) or op not in ops:
        return f"explain: unknown op {op!r}; expected quantize, dequantize, matmul or linear"
    try:
        call = inspect.signature(ops[op]).bind(*args, **kwargs)
    except TypeError as e:
        return f"explain: {op}() cannot be called this way: {e}"
    call.apply_defaults()
    given = call.arguments
    try:
        return _explain(op, given)
    except Exception as e:  # noqa: BLE001 - never raises: whatever the call would hit is the answer
        return f"{type(e).__name__}: {e}"


def _explain(op: str, given: dict) -> str:
    backend = given["backend"]
    if op == "quantize":
        plan = _plan_quantize(*(given[k] for k in ("x", "granularity", "dtype", "block_size", "scale", "scale_ub",
                                                  "pow2_scale", "overflow", "backend")))
        problems = [(plan.problem, backend)]
    elif op == "dequantize":
        t, dtype = given["t"], given["dtype"]
        if not isinstance(t, Fp8Tensor):
            raise Fp8TypeError(f"t: expected an Fp8Tensor, got {type(t).__name__}")
        _plan_dequantize(t, dtype, backend)
        problems = [(DequantizeProblem(
            device=t.device, capability=device_capability(t.device), fp8_dtype=t.dtype, shape=t.shape2d,
            contiguous=t.data.is_contiguous(), block=t.block, out_dtype=dtype), backend)]
    else:
        a, b = (given["a"], given["b"]) if op == "matmul" else (given["x"], given["w"])
        out_dtype = given["out_dtype"]
        if op == "linear":
            if out_dtype is None:
                out_dtype = a.dtype if isinstance(a, torch.Tensor) and a.dtype in HIGH_PRECISION else torch.bfloat16
            if isinstance(a, (torch.Tensor, Fp8Tensor)) and isinstance(b, (torch.Tensor, Fp8Tensor)):
                _check_linear(a, b)
            b = b.t()
        plan = _plan_matmul(a, b, given["recipe"], out_dtype, given["bias"], backend)
        problems = [(q.problem, "auto") for q in (plan.quantize_a, plan.quantize_b) if q is not None]
        problems.append((plan.problem, backend))
    routed = [p for p, _ in problems if p is not None]
    if not routed:
        return "nothing to route: the tensors are empty"
    return "\n\n".join([*(registry.explain_problem(p, req) for p, req in problems if p is not None),
                        tuning.routing_source(routed[-1].device)])
