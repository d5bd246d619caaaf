"""The public ops: a key per call signature, then the plan stored under it.

Each call builds a key from the arguments' static properties (dtypes, shapes, strides, devices,
options). The first call with a key plans it (`fp8dispatch/planning.py`: every check, the
routing, the backend's bound runner); every call then runs the plan. Under `torch.compile` the
ops route while tracing instead and put the chosen backend's own op in the graph
(`fp8dispatch/ops.py`).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from fp8dispatch import ops, planning, registry, tuning
from fp8dispatch.blocks import Block
from fp8dispatch.errors import Fp8DispatchError, Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import HIGH_PRECISION
from fp8dispatch.tensor import Fp8Tensor

_is_compiling = torch.compiler.is_compiling  # bound once: dynamo folds the same function to True
try:  # the routing fingerprint the traced ops carry, read now: a torch.compile trace only reads it
    registry.fingerprint()
except Fp8DispatchError:  # a bad setting: the first call raises it, in its own words
    pass
_runs, _run_for = planning.runs, planning.run_for  # key -> the plan's run
_quantize_key, _dequantize_key, _matmul_key = planning.quantize_key, planning.dequantize_key, planning.matmul_key


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
        return ops.traced_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend)
    try:
        run = _runs[_quantize_key(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend)]
    except (KeyError, TypeError, AttributeError):  # a first call, or an argument the planner rejects
        run = _run_for(_key(_quantize_key, x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow,
                            backend),
                       lambda: planning.plan_quantize(x, granularity, dtype=dtype, block_size=block_size, scale=scale,
                                                      scale_ub=scale_ub, pow2_scale=pow2_scale, overflow=overflow,
                                                      backend=backend))
    return run(x, scale, scale_ub)


def dequantize(t: Fp8Tensor, dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto") -> torch.Tensor:
    """`t.data * t.scale` (broadcast by blocks) in fp32, cast to `dtype`; the data's shape."""
    if _is_compiling():
        return ops.traced_dequantize(t, dtype, backend)
    try:
        run = _runs[_dequantize_key(t, dtype, backend)]
    except (KeyError, TypeError, AttributeError):
        run = _run_for(_key(_dequantize_key, t, dtype, backend),
                       lambda: planning.plan_dequantize(t, dtype, backend=backend))
    return run(t)


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
        return ops.traced_matmul(a, b, recipe, out_dtype, bias, backend)
    try:
        run = _runs[_matmul_key(a, b, recipe, out_dtype, bias, backend)]
    except (KeyError, TypeError):
        run = _run_for(_key(_matmul_key, a, b, recipe, out_dtype, bias, backend),
                       lambda: planning.plan_matmul(a, b, recipe=recipe, out_dtype=out_dtype, bias=bias,
                                                    backend=backend))
    return run(a, b, bias)


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
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
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
        planning.check_linear(x, w)  # the same finding in linear's own terms: x, w and w's shape
        raise


def _key(make_key: Callable, *args) -> tuple | None:
    """A call's key, or None where an argument cannot give one (the planner then names it)."""
    try:
        key = make_key(*args)
        hash(key)
        return key
    except (TypeError, AttributeError):
        return None


def explain(op: str, *args, **kwargs) -> str:
    """The routing table of each step this call runs (every backend, and why it can or cannot serve
    it), which kernel runs, and where the routing came from; never raises. A call the op itself
    would refuse gets, instead of the table, the error it would raise."""
    calls = {"quantize": quantize, "dequantize": dequantize, "matmul": matmul, "linear": linear}
    if not isinstance(op, str) or op not in calls:
        return f"explain: unknown op {op!r}; expected quantize, dequantize, matmul or linear"
    try:
        call = inspect.signature(calls[op]).bind(*args, **kwargs)
    except TypeError as e:
        return f"explain: {op}() cannot be called this way: {e}"
    call.apply_defaults()
    try:
        return _explain(op, dict(call.arguments))
    except Exception as e:  # noqa: BLE001 - never raises: whatever the call would hit is the answer
        return f"{type(e).__name__}: {e}"


def _explain(op: str, given: dict) -> str:
    backend = given.pop("backend")
    shared = None
    if op == "quantize":
        steps = [(planning.plan_quantize(**given, backend=backend).problem, backend)]
    elif op == "dequantize":
        steps = [(planning.plan_dequantize(given["t"], given["dtype"], backend=backend).problem, backend)]
    else:
        if op == "linear":
            x, w = given.pop("x"), given.pop("w")
            if given["out_dtype"] is None:
                given["out_dtype"] = x.dtype if getattr(x, "dtype", None) in HIGH_PRECISION else torch.bfloat16
            try:
                plan = planning.plan_linear(x, w, **given, backend=backend)
            except Fp8DispatchError:
                planning.check_linear(x, w)
                raise
        else:
            plan = planning.plan_matmul(given.pop("a"), given.pop("b"), **given, backend=backend)
        steps = [(p, backend if role == "matmul" else "auto") for role, p in plan.problems]
        if plan.one_allocation:
            shared = planning.ONE_ALLOCATION
    steps = [(p, requested) for p, requested in steps if p is not None]
    if not steps:
        return "nothing to route: the tensors are empty"
    tables = []
    for problem, requested in steps:
        chosen = registry.choose(problem, requested)
        kernel = getattr(chosen.runner(problem), "kernel", f"{chosen.name}.{problem.op}")
        tables.append(f"{registry.explain_problem(problem, requested)}\n  runs: {chosen.name} · {kernel}")
    return "\n\n".join([*tables, *([shared] if shared else []), tuning.routing_source(steps[-1][0].device)])
