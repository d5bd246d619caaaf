"""Plans: a call checked, routed and bound once, then run directly.

`plan_quantize`, `plan_dequantize`, `plan_matmul` and `plan_linear` validate their arguments (every
typed error of the public functions comes from here), describe the problem, ask the registry for a
backend, and bind that backend's runner (`Backend.runner`: for the triton backend, the compiled
kernel with its grid and launch arguments). A plan's `run` serves every later call whose key
matches, the key being what the plan depends on: dtypes, shapes, strides, devices and options
(`fp8dispatch/api.py` builds it); it only allocates outputs and launches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fp8dispatch import checks, direct, registry
from fp8dispatch.blocks import RECIPES, Block, block_for, scale_shape
from fp8dispatch.errors import Fp8DispatchError, Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import fp8_format
from fp8dispatch.problem import DequantizeProblem, MatmulProblem, Problem, QuantizeProblem, device_capability, recipe_of
from fp8dispatch.tensor import Fp8Tensor

_E4M3 = torch.float8_e4m3fn
_BLOCK_SIZE = 128  # quantize's default block side
_trusted = Fp8Tensor._trusted

# Every plan's run, by the key of the calls it serves (fp8dispatch/api.py and ops.py build the keys).
runs: dict[tuple, Callable] = {}
generation = 0  # counts registry refreshes: a holder of runs (Fp8Linear) re-plans when it moves


def _forget() -> None:
    global generation
    runs.clear()
    generation += 1


registry._refresh_hooks.append(_forget)


def quantize_key(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend) -> tuple:
    """Everything a quantize plan depends on; each option's type too, so `pow2_scale=1` never finds
    True's plan (nor 128.0 128's) and reaches the planner's error instead."""
    return ("q", x.dtype, x.shape, x.device, x.stride(), granularity, dtype,
            block_size if type(block_size) is int else repr(block_size), scale is None, scale_ub is None,
            pow2_scale is True, pow2_scale is False, overflow, backend)


def dequantize_key(t, dtype, backend) -> tuple:
    return ("d", t.dispatch_key(), dtype, backend)


def matmul_key(a, b, recipe, out_dtype, bias, backend) -> tuple:
    return ("m", operand_key("a", a), operand_key("b", b), recipe, out_dtype,
            None if bias is None else operand_key("bias", bias), backend)


def operand_key(name: str, t) -> tuple:
    """What a plan depends on in a matmul operand: dtype, shape, device, strides (and blocks)."""
    if type(t) is Fp8Tensor:
        return t.dispatch_key()
    if isinstance(t, torch.Tensor):
        return (t.dtype, t.shape, t.device, t.stride())
    raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")


def run_for(key: tuple | None, make: Callable[[], object]) -> Callable:
    """The run stored under `key`, else `make()`'s (the planner raises on bad arguments), kept."""
    try:
        return runs[key]
    except (KeyError, TypeError):
        pass
    run = make().run
    if key is not None:
        try:
            runs[key] = run
        except TypeError:  # an unhashable option: planned, not kept
            pass
    return run


@dataclass(frozen=True)
class _Routed:
    """A problem, the backend chosen for it, the kernel that backend runs (None: nothing to run)
    and the backend's runner."""

    problem: Problem | None
    backend: str | None
    kernel: str | None
    run: Callable | None = None

    def describe(self) -> str:
        if self.problem is None:
            return "empty: no kernel runs"
        return f"{self.problem.describe()}\n  runs: {self.backend} · {self.kernel}"


def _route(problem: Problem, backend: str) -> tuple[Callable, _Routed]:
    chosen = registry.choose(problem, backend)
    run = chosen.runner(problem)
    return run, _Routed(problem, chosen.name, getattr(run, "kernel", f"{chosen.name}.{problem.op}"), run)


# --- quantize -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizePlan:
    """`run(x, scale=None, scale_ub=None) -> Fp8Tensor` for every x with the planned key."""

    run: Callable
    step: Callable  # the backend's runner: (x2d, block, dtype, scale, scale_ub, pow2_scale) -> (data, scale)
    routed: _Routed
    block: Block
    shape2d: tuple[int, int]

    @property
    def problem(self) -> Problem | None:
        return self.routed.problem

    def describe(self) -> str:
        return self.routed.describe()


def plan_quantize(x, granularity: str = "row", *, dtype: torch.dtype = _E4M3, block_size: int | Block = 128,
                  scale=None, scale_ub=None, pow2_scale: bool = False, overflow: str = "saturate",
                  backend: str = "auto") -> QuantizePlan:
    """Check `fp8dispatch.quantize`'s arguments, route and bind; `scale`'s values are checked per call."""
    checks.high_precision("x", x)
    if x.dim() < 2:
        raise Fp8ValueError(
            f"x: expected at least 2 dimensions [..., rows, cols], got shape {tuple(x.shape)}"
            + (" (use x.unsqueeze(0) for a single row)" if x.dim() == 1 else ""))
    fp8_format(dtype)
    shape2d = (math.prod(x.shape[:-1]), x.shape[-1])
    block = block_for(granularity, *shape2d, block_size)
    checks.overflow_mode(overflow)
    if not isinstance(pow2_scale, bool):
        raise Fp8TypeError(f"pow2_scale: expected a bool, got {type(pow2_scale).__name__}")
    if scale_ub is not None:
        checks.scale_ub(scale_ub)
    checks.backend_arg(backend)
    if x.numel() == 0:
        run, routed = _quantize_empty, _Routed(None, None, None)
    else:
        problem = QuantizeProblem(
            device=x.device, capability=device_capability(x.device), in_dtype=x.dtype, shape=shape2d,
            contiguous=x.is_contiguous(), block=block, fp8_dtype=dtype, user_scale=scale is not None,
            scale_ub=scale_ub is not None, pow2_scale=pow2_scale)
        run, routed = _route(problem, backend)
    return QuantizePlan(_quantize_runner(run, block, shape2d, x.dim() != 2, dtype, overflow, pow2_scale), run,
                        routed, block, shape2d)


def _quantize_runner(run, block, shape2d, flatten: bool, dtype, overflow, pow2_scale) -> Callable:
    if not flatten:
        def quantize(x, scale=None, scale_ub=None):
            if scale is None and scale_ub is None:
                data, s = run(x, block, dtype, None, None, pow2_scale)
                return _trusted(data, s, block)
            if scale is not None:
                scale = checks.user_scale(x, scale, block, dtype, overflow)
            data, s = run(x, block, dtype, scale, None if scale_ub is None else checks.scale_ub(scale_ub), pow2_scale)
            return _trusted(data, s, block)
        return quantize

    def quantize_flat(x, scale=None, scale_ub=None):  # leading dims fold into rows
        x2d = x.reshape(shape2d)
        if scale is not None:
            scale = checks.user_scale(x2d, scale, block, dtype, overflow)
        data, s = run(x2d, block, dtype, scale, None if scale_ub is None else checks.scale_ub(scale_ub), pow2_scale)
        return _trusted(data.view(x.shape), s, block)
    return quantize_flat


def _quantize_empty(x2d, block, dtype, scale, scale_ub, pow2_scale):
    s = scale if scale is not None else torch.ones(scale_shape(tuple(x2d.shape), block), device=x2d.device)
    return torch.empty(x2d.shape, dtype=dtype, device=x2d.device), s


# --- dequantize -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DequantizePlan:
    """`run(t: Fp8Tensor) -> Tensor` for every t with the planned key."""

    run: Callable
    routed: _Routed

    @property
    def problem(self) -> Problem | None:
        return self.routed.problem

    def describe(self) -> str:
        return self.routed.describe()


def plan_dequantize(t, dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto") -> DequantizePlan:
    if not isinstance(t, Fp8Tensor):
        raise Fp8TypeError(f"t: expected an Fp8Tensor, got {type(t).__name__}")
    checks.out_dtype("dtype", dtype)
    checks.backend_arg(backend)
    shape2d = t.shape2d
    if t.data.numel() == 0:
        return DequantizePlan(lambda t: torch.empty(t.data.shape, dtype=dtype, device=t.data.device),
                              _Routed(None, None, None))
    problem = DequantizeProblem(
        device=t.device, capability=device_capability(t.device), fp8_dtype=t.dtype, shape=shape2d,
        contiguous=t.data.is_contiguous(), block=t.block, out_dtype=dtype)
    run, routed = _route(problem, backend)
    if t.data.dim() == 2:
        return DequantizePlan(lambda t: run(t.data, t.scale, t.block, dtype), routed)
    return DequantizePlan(lambda t: run(t.data.reshape(shape2d), t.scale, t.block, dtype).view(t.data.shape), routed)


# --- matmul and linear ----------------------------------------------------------------------


ONE_ALLOCATION = "quantize a and matmul: one allocation (the output, x's FP8 data and scales), two direct launches"


@dataclass(frozen=True)
class MatmulPlan:
    """`run(a, b, bias) -> a @ b (+ bias)` for operands with the planned keys: the quantizes it
    needs (high-precision operands), then the GEMM."""

    run: Callable
    routed: _Routed
    quantize_a: QuantizePlan | None
    quantize_b: QuantizePlan | None
    # Both steps launch on raw pointers into one allocation (fp8dispatch/direct.py) once bound.
    one_allocation: bool = False

    @property
    def problem(self) -> Problem | None:
        return self.routed.problem

    def describe(self) -> str:
        parts = [f"quantize {name}: {q.describe()}" for name, q in (("a", self.quantize_a), ("b", self.quantize_b))
                 if q is not None]
        shared = [ONE_ALLOCATION] if self.one_allocation else []
        return "\n".join([*parts, f"matmul: {self.routed.describe()}", *shared])

    @property
    def problems(self) -> list[tuple[str, Problem]]:
        """(role, problem) of every routed step, in the order they run."""
        steps = [(f"quantize {name}", q.routed.problem) for name, q in (("a", self.quantize_a),
                                                                         ("b", self.quantize_b)) if q is not None]
        return [(role, p) for role, p in [*steps, ("matmul", self.routed.problem)] if p is not None]


def plan_linear(x, w, bias=None, *, recipe: str | None = None, out_dtype: torch.dtype = torch.bfloat16,
                backend: str = "auto") -> MatmulPlan:
    """The plan of `fp8dispatch.linear(x, w, bias)`: `plan_matmul(x, w.t())`; run it as
    `plan.run(x, w.t(), bias)`."""
    if not isinstance(w, (torch.Tensor, Fp8Tensor)):
        raise Fp8TypeError(f"w: expected a tensor or Fp8Tensor, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise Fp8ValueError(f"w: expected a 2-d weight [N, K], got shape {tuple(w.shape)}")
    try:
        return plan_matmul(x, w.t(), recipe=recipe, out_dtype=out_dtype, bias=bias, backend=backend)
    except Fp8DispatchError:
        check_linear(x, w)  # the same finding in linear's own terms
        raise


def plan_matmul(a, b, *, recipe: str | None = None, out_dtype: torch.dtype = torch.bfloat16, bias=None,
                backend: str = "auto") -> MatmulPlan:
    """Check `fp8dispatch.matmul`'s arguments, route the quantizes and the GEMM, bind their runners."""
    if recipe is not None and recipe not in RECIPES:
        raise Fp8ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    checks.out_dtype("out_dtype", out_dtype)
    checks.backend_arg(backend)
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, (torch.Tensor, Fp8Tensor)):
            raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")
        if not isinstance(t, Fp8Tensor):
            checks.high_precision(name, t)
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
        checks.high_precision("bias", bias)
        if tuple(bias.shape) != (n,):
            raise Fp8ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise Fp8ValueError(f"bias: expected device {a.device} (a's), got {bias.device}")
    a_block, b_block, recipe = operand_blocks(a, b, recipe, m, k, n)
    out_shape = (*a.shape[:-1], n)
    if m == 0 or n == 0 or k == 0:
        return MatmulPlan(_empty_product(out_shape, out_dtype, m and n), _Routed(None, None, None), None, None)
    quantize_a = quantize_b = None
    if isinstance(a, torch.Tensor):
        quantize_a = plan_quantize(a.reshape(m, k), "block", block_size=a_block)
    if isinstance(b, torch.Tensor):  # quantized as b.t() [N, K], so K stays the fast dimension
        quantize_b = plan_quantize(b.t(), "block", block_size=(b_block[1], b_block[0]))
    problem = MatmulProblem(
        device=a.device, capability=device_capability(a.device), recipe=recipe_of(a_block, b_block, m, k, n),
        a_dtype=a.dtype if isinstance(a, Fp8Tensor) else _E4M3, b_dtype=b.dtype if isinstance(b, Fp8Tensor) else _E4M3,
        m=m, n=n, k=k, a_block=a_block, b_block=b_block,
        a_row_major=not isinstance(a, Fp8Tensor) or a.data.is_contiguous(),
        b_col_major=not isinstance(b, Fp8Tensor) or b.data.t().is_contiguous(),
        out_dtype=out_dtype, bias_dtype=None if bias is None else bias.dtype)
    mm, routed = _route(problem, backend)
    run = _matmul_runner(mm, quantize_a, quantize_b, len(a.shape) != 2, m, out_shape, out_dtype)
    one_allocation = (quantize_a is not None and quantize_b is None
                      and (len(a.shape) == 2 or a.is_contiguous())  # x's pointer is that of the 2-D rows quantized
                      and hasattr(quantize_a.step, "direct") and hasattr(mm, "direct"))
    if one_allocation:
        run = direct.linear_runner(quantize_a.step, mm, out_shape, out_dtype, run)
    if bias is not None and not bias.is_contiguous():  # kernels read the bias as a contiguous vector
        run = _contiguous_bias(run)
    return MatmulPlan(run, routed, quantize_a, quantize_b, one_allocation)


def _contiguous_bias(run: Callable) -> Callable:
    return lambda a, b, bias: run(a, b, bias.contiguous())


def _matmul_runner(mm, qa: QuantizePlan | None, qb: QuantizePlan | None, flatten: bool, m: int, out_shape,
                   out_dtype) -> Callable:
    """`(a, b, bias) -> a @ b`: only the steps this plan needs, nothing left to branch on."""
    if qa is not None:
        qa_run, qa_block = qa.step, qa.block
        if flatten:
            a_shape = qa.shape2d

            def operand_a(a):
                data, s = qa_run(a.reshape(a_shape), qa_block, _E4M3, None, None, False)
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
    if qb is not None:
        qb_run, qb_block = qb.step, qb.block
        b_block = (qb_block[1], qb_block[0])

        def operand_b(b):
            data, s = qb_run(b.t(), qb_block, _E4M3, None, None, False)
            return _trusted(data.t(), s.t(), b_block)
    else:
        operand_b = None

    if operand_a is None and operand_b is None:  # both FP8 already: the GEMM alone
        return lambda a, b, bias: mm(a, b, out_dtype, bias)
    if operand_b is None and not flatten:  # linear(x, fp8 weight) on 2-d x: quantize, GEMM
        qa_run, qa_block = qa.step, qa.block

        def linear(a, b, bias):
            data, s = qa_run(a, qa_block, _E4M3, None, None, False)
            return mm(_trusted(data, s, qa_block), b, out_dtype, bias)
        return linear

    def matmul(a, b, bias):
        out = mm(a if operand_a is None else operand_a(a), b if operand_b is None else operand_b(b), out_dtype, bias)
        return out.view(out_shape) if flatten else out
    return matmul


def _empty_product(out_shape, out_dtype, nonempty) -> Callable:
    def run(a, b, bias):
        out = torch.zeros(out_shape, dtype=out_dtype, device=a.device)
        if bias is not None and nonempty:
            out += bias.to(out_dtype)
        return out
    return run


def operand_blocks(a, b, recipe, m, k, n) -> tuple[Block, Block, str]:
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
            recipe, group = recipe_carried(given.block, rows, cols, from_a=a_fp8)
        else:
            group = _k_group(recipe, given.block, rows, cols, from_a=a_fp8)
            if group is None:
                carried = recipe_carried(given.block, rows, cols, from_a=a_fp8)[0]
                raise Fp8ValueError(f"recipe: {recipe!r} contradicts the blocks {given.block} of "
                                    f"{name}, which say {carried!r}")
    else:
        recipe, group = recipe or "block", 128
    a_block = a.block if a_fp8 else {"block": (1, group), "row": (1, max(k, 1)), "tensor": (max(m, 1), max(k, 1))}[recipe]
    b_block = b.block if b_fp8 else {"block": (group, group), "row": (max(k, 1), 1), "tensor": (max(k, 1), max(n, 1))}[recipe]
    return a_block, b_block, recipe


def recipe_carried(block: Block, rows: int, cols: int, from_a: bool) -> tuple[str, int]:
    """The recipe an Fp8Tensor operand implies when the call names none, and its K block size.

    A weight (b) whose block covers it whole is "tensor" only if the block is exactly its shape
    and not the block recipe's 128×128: `quantize(w, "block")` on a weight of at most 128×128
    gives a 128×128 block too, and reading that as "tensor" would quantize the activation with one
    scale for all its tokens. An exactly 128×128 tensor-scaled weight thus gets per-token
    activations (the row recipe's numerics): more accurate, never less. A weight with a single K
    block (K ≤ 128) whose blocks span several output channels but not all of them is the block
    recipe too: the row recipe scales each output channel on its own.
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
    if not from_a and block[1] > 1:  # one K block, several output channels per scale: not per-channel
        return "block", k_block
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


def check_linear(x, w) -> None:
    """The operand checks of matmul, worded for `linear(x, w)`; run only once matmul has refused."""
    for name, t in (("x", x), ("w", w)):
        if isinstance(t, torch.Tensor):
            checks.high_precision(name, t)
        elif not isinstance(t, Fp8Tensor):
            raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")
    if len(x.shape) < 2:
        raise Fp8ValueError(f"x: expected at least 2 dimensions [..., M, K], got shape {tuple(x.shape)}"
                            + (" (use x.unsqueeze(0) for a single row)" if len(x.shape) == 1 else ""))
    if x.shape[-1] != w.shape[1]:
        raise Fp8ValueError(f"w: expected [N, {x.shape[-1]}] to match x's last dim K, got shape {tuple(w.shape)}")
    if x.device != w.device:
        raise Fp8ValueError(f"w: expected device {x.device} (x's), got {w.device}")
