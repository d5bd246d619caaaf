"""The traced path: what `fp8dispatch.quantize / dequantize / matmul` put in a torch.compile graph.

Under tracing (`torch.compiler.is_compiling()`) the public functions call `traced_*` below, which
put one `torch.ops.fp8dispatch.*` call in dynamo's graph. Those ops are `torch.library.triton_op`s:
when AOT autograd traces them (fake tensors, sizes possibly symbolic) their body runs as plain
Python. The body plans the call exactly as eager does (`fp8dispatch/planning.py`: the same checks
and routing), guards the power-of-two bucket of the row count M where M is symbolic (the bucket the
routing table and the Triton configurations are keyed by), and calls the chosen backend's traceable
function, so the graph Inductor compiles holds the backend's own ops: `torch._scaled_mm`,
`torch.ops.fbgemm.*`, our Triton kernels as user-defined Triton kernel nodes that Inductor launches
itself, the reference's torch ops. No call re-enters the public API at run time.

A step a trace cannot look into (the Gluon Hopper kernel, the Triton interpreter on CPU, a backend
that declares no traceable op, a user scale whose values must be read) becomes one opaque op,
`fp8dispatch::run_quantize / run_dequantize / run_matmul`, which runs the cached plan of the backend
chosen while tracing. A linear whose activation quantize is a bound kernel and whose GEMM is opaque
anyway or shares its allocation runs whole as one `fp8dispatch::run_linear` (`_whole_linear`): its
plan's own launches cost the host less than Inductor's. An `Fp8Tensor` crosses an op boundary as
`(uint8 bits, FP8 dtype, scale, block)`; it is also a pytree node, so compiled functions may take and
return it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch.library import triton_op

from fp8dispatch import planning, registry, tracing
from fp8dispatch.blocks import block_for, scale_shape
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
from fp8dispatch.tensor import Fp8Tensor

__all__ = ["quantize", "dequantize", "matmul", "traced_quantize", "traced_dequantize", "traced_matmul",
           "linear_parts", "dequantize_parts"]

_E4M3 = torch.float8_e4m3fn


def _flatten(t: Fp8Tensor):
    return [t.data, t.scale], t.block


def _unflatten(children, block) -> Fp8Tensor:
    return Fp8Tensor._trusted(children[0], children[1], block)


pytree.register_pytree_node(
    Fp8Tensor, _flatten, _unflatten, serialized_type_name="fp8dispatch.Fp8Tensor",
    flatten_with_keys_fn=lambda t: ([(pytree.GetAttrKey("data"), t.data),
                                     (pytree.GetAttrKey("scale"), t.scale)], t.block),
)


# --- opaque ops -------------------------------------------------------------------------------

_LIBRARY = torch.library.Library("fp8dispatch", "FRAGMENT")


def _opaque(fake: Callable):
    """Define `fp8dispatch::<the function's name>` (its schema read off the annotations) with the
    function as its one kernel, registered straight to the dispatcher for every device, and `fake`
    for tracing; returns the op. Compiled graphs call these ops at run time, so their dispatch cost
    is paid per call: `torch.library.custom_op` wraps the kernel in Python autograd and output-
    aliasing checks, 2.5-3× the dispatch time of a plain registration (about 40 against 15 µs a call
    on a 2-core CPU). What those checks guard is kept here: every kernel returns new tensors, and an
    input that requires grad is refused (these ops compute no gradient; without an autograd kernel
    torch would differentiate the kernel's own fp32 arithmetic instead, silently). Only for steps
    inside the traced ops: under tracing these ops have no autograd node, so only an enclosing op
    with one (the `triton_op`s below, which refuse backward) keeps a compiled backward from passing
    silently by them; an op users reach directly stays a `custom_op` (`grouped_api`)."""
    def define(fn):
        name = fn.__name__

        def kernel(*args):
            if torch.is_grad_enabled() and any(getattr(a, "requires_grad", False) for a in args):
                raise Fp8TypeError(f"fp8dispatch::{name}: an input requires grad, and this op computes no "
                                   "gradient; call the public function (fp8dispatch.{quantize,matmul,...}) or "
                                   "run under torch.no_grad()")
            return fn(*args)

        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"fp8dispatch::{name}", fake, lib=_LIBRARY)
        return getattr(torch.ops.fp8dispatch, name).default
    return define


# --- quantize -------------------------------------------------------------------------------


@triton_op("fp8dispatch::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, granularity: str, dtype: torch.dtype, block_size: list[int],
    scale: Optional[torch.Tensor], scale_ub: Optional[float], pow2_scale: bool, overflow: str,
    backend: str, routing: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8dispatch.quantize` as an op: returns (data in x's shape, 2-D fp32 scale). `routing` is
    `registry.fingerprint()` while tracing: the graph, and the caches keyed by it, change with it."""
    block = _block_arg(block_size)
    plan = tracing.planned(planning.plan_quantize, tracing.spec(x, True), granularity=granularity, dtype=dtype,
                           block_size=block, scale=scale, scale_ub=scale_ub, pow2_scale=pow2_scale, overflow=overflow,
                           backend=backend)
    routed = plan.routed
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    args = (x2d, plan.block, dtype, None, scale_ub, pow2_scale)
    step = tracing.traced(routed, *args) if routed.problem is not None and scale is None else None
    if step is None:
        return torch.ops.fp8dispatch.run_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale,
                                                  overflow, routed.backend or backend)
    data, s = step(*args)
    return (data if x.dim() == 2 else data.view(x.shape)), s


def _quantize_fake(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend):
    rows, cols = _shape2d("x", x)
    block = block_for(granularity, rows, cols, _block_arg(block_size))
    return (x.new_empty(x.shape, dtype=dtype),
            x.new_empty(scale_shape((rows, cols), block), dtype=torch.float32))


@_opaque(fake=_quantize_fake)
def run_quantize(
    x: torch.Tensor, granularity: str, dtype: torch.dtype, block_size: list[int],
    scale: Optional[torch.Tensor], scale_ub: Optional[float], pow2_scale: bool, overflow: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached plan of a quantize, run as one opaque step."""
    block = _block_arg(block_size)
    run = planning.run_for(
        planning.quantize_key(x, granularity, dtype, block, scale, scale_ub, pow2_scale, overflow, backend),
        lambda: planning.plan_quantize(x, granularity, dtype=dtype, block_size=block, scale=scale, scale_ub=scale_ub,
                                       pow2_scale=pow2_scale, overflow=overflow, backend=backend))
    t = run(x, scale, scale_ub)
    return t.data.contiguous(), _fresh(t.scale, scale)  # an empty x's plan hands a user scale back


def traced_quantize(x, granularity, dtype, block_size, scale, scale_ub, pow2_scale, overflow, backend) -> Fp8Tensor:
    """What `fp8dispatch.quantize` does under tracing: one op, and the block computed in Python."""
    if not isinstance(x, torch.Tensor):
        raise Fp8TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    sizes = [block_size] if isinstance(block_size, int) else list(block_size)
    if isinstance(scale_ub, torch.Tensor):
        raise Fp8TypeError("scale_ub: under torch.compile pass a Python float, not a tensor")
    data, s = torch.ops.fp8dispatch.quantize(x, granularity, dtype, sizes, scale,
                                             None if scale_ub is None else float(scale_ub),
                                             pow2_scale, overflow, backend, registry.fingerprint())
    rows, cols = _shape2d("x", x)
    # The checked constructor: dynamo traces a dataclass __init__, not `_trusted`'s slot setters.
    return Fp8Tensor(data, s, block_for(granularity, rows, cols, block_size))


# --- dequantize -----------------------------------------------------------------------------


@triton_op("fp8dispatch::dequantize", mutates_args=())
def dequantize(bits: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor, block: list[int],
               dtype: torch.dtype, backend: str, routing: str = "") -> torch.Tensor:
    """`fp8dispatch.dequantize` as an op on an Fp8Tensor's parts (its data as uint8 bits)."""
    t = Fp8Tensor(bits.view(fp8_dtype), scale, (block[0], block[1]))
    plan = tracing.planned(planning.plan_dequantize, tracing.spec(t, True), dtype=dtype, backend=backend)
    data = t.data if t.data.dim() == 2 else t.data.reshape(-1, t.data.shape[-1])
    args = (data, scale, t.block, dtype)
    step = tracing.traced(plan.routed, *args) if plan.problem is not None else None
    if step is None:
        return torch.ops.fp8dispatch.run_dequantize(bits, fp8_dtype, scale, block, dtype,
                                                    plan.routed.backend or backend)
    out = step(*args)
    return out if t.data.dim() == 2 else out.view(t.data.shape)


def _dequantize_fake(bits, fp8_dtype, scale, block, dtype, backend):
    return bits.new_empty(bits.shape, dtype=dtype)


@_opaque(fake=_dequantize_fake)
def run_dequantize(bits: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor, block: list[int],
                   dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The cached plan of a dequantize, run as one opaque step (every plan's output is a new tensor)."""
    t = Fp8Tensor(bits.view(fp8_dtype), scale, (block[0], block[1]))
    run = planning.run_for(planning.dequantize_key(t, dtype, backend),
                           lambda: planning.plan_dequantize(t, dtype, backend=backend))
    return run(t).contiguous()  # the fake's layout


def traced_dequantize(t, dtype, backend) -> torch.Tensor:
    if not isinstance(t, Fp8Tensor):
        raise Fp8TypeError(f"t: expected an Fp8Tensor, got {type(t).__name__}")
    return torch.ops.fp8dispatch.dequantize(_bits(t.data), t.data.dtype, t.scale, list(t.block), dtype, backend,
                                            registry.fingerprint())


# --- matmul ---------------------------------------------------------------------------------

opaque_when_direct = True  # False puts a one-allocation linear's two kernels in the graph instead


@triton_op("fp8dispatch::matmul", mutates_args=())
def matmul(
    a: torch.Tensor, a_fp8: Optional[torch.dtype], a_scale: Optional[torch.Tensor], a_block: Optional[list[int]],
    b: torch.Tensor, b_fp8: Optional[torch.dtype], b_scale: Optional[torch.Tensor], b_block: Optional[list[int]],
    recipe: Optional[str], out_dtype: torch.dtype, bias: Optional[torch.Tensor], backend: str, routing: str = "",
) -> torch.Tensor:
    """`fp8dispatch.matmul` as an op. An FP8 operand comes as (uint8 bits, its FP8 dtype, scale, block);
    a high-precision one as (tensor, None, None, None)."""
    a, b = _operand(a, a_fp8, a_scale, a_block), _operand(b, b_fp8, b_scale, b_block)
    if bias is not None and not bias.is_contiguous():  # kernels read the bias as a contiguous vector
        bias = bias.contiguous()
    plan = tracing.planned(lambda a, b, bias: planning.plan_matmul(a, b, recipe=recipe, out_dtype=out_dtype, bias=bias,
                                                                   backend=backend),
                           tracing.spec(a, True), tracing.spec(b, False), tracing.spec(bias, False))
    if plan.problem is None:  # an empty product: zeros (plus bias)
        return plan.run(a, b, bias)
    if _whole_linear(plan, b):
        return torch.ops.fp8dispatch.run_linear(a, _bits(b.data), b.scale, bias,
                                                _linear_spec(b, recipe, out_dtype, plan.routed.backend))
    k, n = b.shape
    lead = a.shape[:-1]
    if plan.quantize_a is not None:
        a = _quantize_step(plan.quantize_a, a.reshape(-1, k))
    elif len(a.shape) != 2:
        a = Fp8Tensor._trusted(a.data.reshape(-1, k), a.scale, a.block)
    if plan.quantize_b is not None:
        t = _quantize_step(plan.quantize_b, b.t())
        b = Fp8Tensor._trusted(t.data.t(), t.scale.t(), (t.block[1], t.block[0]))
    step = tracing.traced(plan.routed, a, b, out_dtype, bias)
    if step is None:
        out = torch.ops.fp8dispatch.run_matmul(*_parts("a", a), *_parts("b", b), None, out_dtype, bias,
                                               plan.routed.backend)
    else:
        out = step(a, b, out_dtype, bias)
    return out if len(lead) == 1 else out.view(*lead, n)


def _quantize_step(q, x2d) -> Fp8Tensor:
    args = (x2d, q.block, _E4M3, None, None, False)
    step = tracing.traced(q.routed, *args)
    if step is None:
        data, s = torch.ops.fp8dispatch.run_quantize(x2d, "block", _E4M3, list(q.block), None, None, False,
                                                     "saturate", q.routed.backend)
    else:
        data, s = step(*args)
    return Fp8Tensor._trusted(data, s, q.block)


def _matmul_fake(a, a_fp8, a_scale, a_block, b, b_fp8, b_scale, b_block, recipe, out_dtype, bias, backend):
    if a.dim() < 2 or b.dim() != 2:
        raise Fp8ValueError(f"a, b: expected a [..., M, K] and b [K, N], got shapes "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    torch._check(a.shape[-1] == b.shape[0],
                 lambda: f"b: expected {a.shape[-1]} rows to match a's last dim K, got shape {tuple(b.shape)}")
    return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=out_dtype)


@_opaque(fake=_matmul_fake)
def run_matmul(
    a: torch.Tensor, a_fp8: Optional[torch.dtype], a_scale: Optional[torch.Tensor], a_block: Optional[list[int]],
    b: torch.Tensor, b_fp8: Optional[torch.dtype], b_scale: Optional[torch.Tensor], b_block: Optional[list[int]],
    recipe: Optional[str], out_dtype: torch.dtype, bias: Optional[torch.Tensor], backend: str,
) -> torch.Tensor:
    """The cached plan of a matmul, run as one opaque step (every plan's output is a new tensor).
    Its operands come from a traced graph, which built them as checked Fp8Tensors."""
    a_, b_ = _operand(a, a_fp8, a_scale, a_block, trusted=True), _operand(b, b_fp8, b_scale, b_block, trusted=True)
    run = planning.run_for(planning.matmul_key(a_, b_, recipe, out_dtype, bias, backend),
                           lambda: planning.plan_matmul(a_, b_, recipe=recipe, out_dtype=out_dtype, bias=bias,
                                                        backend=backend))
    return run(a_, b_, bias).contiguous()  # the fake's layout


def _whole_linear(plan, b) -> bool:
    """Whether `linear(x, w)` enters the graph as one opaque `run_linear` op running its eager plan
    rather than as its two steps. Inductor's launch of a Triton kernel costs 15-28 µs of host time
    on an H200's host where the plan's bound launch costs 5-7 (docs/results/h200/model.md), so a
    linear whose activation quantize is a bound kernel (its step offers `direct`) runs whole when
    its GEMM is one opaque op anyway (the Gluon kernel, a library op without a fake kernel) or when
    both steps launch into one allocation. A quantize Inductor compiles itself (plain torch ops)
    stays in the graph, where it can fuse with the ops before it."""
    qa = plan.quantize_a
    if qa is None or plan.quantize_b is not None or not isinstance(b, Fp8Tensor):
        return False
    if plan.one_allocation:
        return opaque_when_direct
    if not hasattr(qa.step, "direct"):
        return False
    p = plan.problem
    with tracing.fakes():
        a = Fp8Tensor._trusted(torch.empty(p.m, p.k, dtype=p.a_dtype, device=p.device),
                               torch.empty(scale_shape((p.m, p.k), p.a_block), device=p.device), p.a_block)
    return tracing.traced(plan.routed, a, b, p.out_dtype, None) is None


def _linear_spec(w: Fp8Tensor, recipe: str | None, out_dtype: torch.dtype, backend: str) -> str:
    """`run_linear`'s static arguments in one string (cheaper to pass and look up than five; a
    graph reloaded from torch.compile's caches in a new process still carries all of it)."""
    return f"{_name(w.data.dtype)}:{w.block[0]}x{w.block[1]}:{recipe or ''}:{_name(out_dtype)}:{backend}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_spec(spec: str) -> tuple:
    try:
        fp8, block, recipe, out_dtype, backend = spec.split(":")
        rows, cols = block.split("x")
        fp8, out_dtype, block = getattr(torch, fp8), getattr(torch, out_dtype), (int(rows), int(cols))
        if isinstance(fp8, torch.dtype) and isinstance(out_dtype, torch.dtype):
            return fp8, block, recipe or None, out_dtype, backend
    except (ValueError, AttributeError):
        pass
    raise Fp8ValueError(f"spec: expected 'fp8 dtype:RxC block:recipe:out dtype:backend' as `_linear_spec` writes it, "
                        f"got {spec!r}")


_LINEARS: dict[str, tuple] = {}  # spec -> (FP8 dtype, block, recipe, out dtype, backend, runs by operand key)
registry._refresh_hooks.append(_LINEARS.clear)


def _linear_fake(x, w, w_scale, bias, spec):
    return x.new_empty((*x.shape[:-1], w.shape[1]), dtype=_parse_spec(spec)[3])


@_opaque(fake=_linear_fake)
def run_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
               spec: str) -> torch.Tensor:
    """`x @ w` for a high-precision x [..., K] and an FP8 weight given as its uint8 bits [K, N] and
    scales, run by the eager plan of the backend chosen while tracing (`spec`, `_linear_spec`), as
    one opaque step. Its key holds everything the plan checked of the operands."""
    held = _LINEARS.get(spec)
    if held is None:
        held = _LINEARS[spec] = (*_parse_spec(spec), {})
    fp8, block, recipe, out_dtype, backend, runs = held
    key = (planning.operand_key("x", x), planning.operand_key("w", w), planning.operand_key("w_scale", w_scale),
           None if bias is None else planning.operand_key("bias", bias))
    run = runs.get(key)
    if run is None:
        wt = Fp8Tensor(w.view(fp8), w_scale, block)  # checked once, at the first call of this key
        run = runs[key] = planning.plan_matmul(x, wt, recipe=recipe, out_dtype=out_dtype, bias=bias,
                                               backend=backend).run
    return run(x, Fp8Tensor._trusted(w.view(fp8), w_scale, block), bias).contiguous()  # the fake's layout


def _operand(t, fp8_dtype, scale, block, trusted: bool = False):
    if fp8_dtype is None:
        return t
    return (Fp8Tensor._trusted if trusted else Fp8Tensor)(t.view(fp8_dtype), scale, (block[0], block[1]))


def _parts(name: str, t):
    if isinstance(t, Fp8Tensor):
        return _bits(t.data), t.data.dtype, t.scale, list(t.block)
    if isinstance(t, torch.Tensor):
        return t, None, None, None
    raise Fp8TypeError(f"{name}: expected a torch.Tensor or Fp8Tensor, got {type(t).__name__}")


def traced_matmul(a, b, recipe, out_dtype, bias, backend) -> torch.Tensor:
    return torch.ops.fp8dispatch.matmul(*_parts("a", a), *_parts("b", b), recipe, out_dtype, bias, backend,
                                        registry.fingerprint())


def linear_parts(x, data, scale, block, bias, out_dtype, backend, recipe=None) -> torch.Tensor:
    """`x @ W.T` for an FP8 weight given as its parts [N, K], as one traced op."""
    if data.dim() != 2:
        raise Fp8ValueError(f"w: expected a 2-d weight [N, K], got shape {tuple(data.shape)}")
    return torch.ops.fp8dispatch.matmul(*_parts("x", x), _bits(data).t(), data.dtype, scale.t(),
                                        [block[1], block[0]], recipe, out_dtype, bias, backend, registry.fingerprint())


def dequantize_parts(data, scale, block, dtype, backend="auto") -> torch.Tensor:
    return torch.ops.fp8dispatch.dequantize(_bits(data), data.dtype, scale, list(block), dtype, backend,
                                            registry.fingerprint())


def _block_arg(block_size: list[int]) -> int | tuple[int, int]:
    return block_size[0] if len(block_size) == 1 else (block_size[0], block_size[1])


def _fresh(out: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """A contiguous result that shares no storage with an input (a custom op may not alias)."""
    out = out.contiguous()
    storage = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == storage for t in inputs):
        out = out.clone()
    return out


def _bits(data: torch.Tensor) -> torch.Tensor:
    # FP8 crosses an op boundary as uint8 bits: opcheck's schema check compares inputs with
    # allclose, which torch does not implement for float8 (a view, free at run time).
    return data.view(torch.uint8)


def _shape2d(name: str, x: torch.Tensor):
    if x.dim() < 2:
        raise Fp8ValueError(f"{name}: expected at least 2 dimensions [..., rows, cols], got shape {tuple(x.shape)}")
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    return rows, x.shape[-1]
