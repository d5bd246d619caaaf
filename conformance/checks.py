"""The checks: one backend against the reference on one case, through the public API.

A backend whose `why_not` declines the case must raise `Unsupported` and return nothing. One that
accepts it must give the reference's bits (quantize values and scales, dequantize), or for matmul
`1 - 2Σxy/Σ(x²+y²) < 1e-3` against the fp32 product of the dequantized operands (bit for bit on
the exactly representable cases); write every output element (outputs are allocated over
poisoned memory); leave its inputs alone; and give the same bits twice.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch

import fp8dispatch
from fp8dispatch import planning, registry
from fp8dispatch.errors import Unsupported
from fp8dispatch.grouped import GroupedFp8Tensor
from fp8dispatch.numerics import ERROR_BOUND, fill_freed_memory, poisoned_allocations, relative_error
from fp8dispatch.problem import dequantize_problem
from fp8dispatch.tensor import Fp8Tensor

from . import grouped
from .cases import Case

PASSED, FAILED, UNSUPPORTED = "passed", "failed", "unsupported"


@dataclass(frozen=True)
class Outcome:
    status: str  # passed, failed or unsupported
    detail: str = ""  # why it failed, or the backend's reasons joined by "; "


@dataclass(frozen=True)
class Expected:
    """The reference's answer to a case, computed once and shared by every backend."""

    result: object  # Fp8Tensor or Tensor from backend="reference"
    product: torch.Tensor | None = None  # matmul: fp32 product of the dequantized operands (+ bias)


def call(case: Case, inputs: dict, backend: str):
    """Run the case through the public API with `backend=`, so dispatch is part of what is tested."""
    if case.op == "grouped_linear":
        return grouped.call(case, inputs, backend)
    if case.op == "quantize":
        return fp8dispatch.quantize(inputs["x"], case.granularity, dtype=case.fp8, block_size=case.block_size,
                                    scale=inputs["scale"], scale_ub=inputs["scale_ub"],
                                    pow2_scale=inputs["pow2_scale"], backend=backend)
    if case.op == "dequantize":
        return fp8dispatch.dequantize(inputs["t"], case.out_dtype, backend=backend)
    return fp8dispatch.matmul(_a(case, inputs), inputs["b"], out_dtype=case.out_dtype, bias=inputs["bias"],
                              backend=backend)


def _a(case: Case, inputs: dict):
    """The a the call gets: the FP8 operand, or the high-precision tensor it was quantized from."""
    return inputs["a_high"] if case.layout == "high_precision_a" else inputs["a"]


def problem_of(case: Case, inputs: dict):
    """The problem the dispatcher will hand to `why_not`, from the API's own planners."""
    if case.op == "grouped_linear":
        return grouped.problem_of(case, inputs)
    if case.op == "quantize":
        x = inputs["x"]
        return planning.plan_quantize(x, case.granularity, dtype=case.fp8, block_size=case.block_size,
                                      scale=inputs["scale"], scale_ub=inputs["scale_ub"],
                                      pow2_scale=inputs["pow2_scale"], backend="reference").problem
    if case.op == "dequantize":
        t = inputs["t"]
        return dequantize_problem(t.device, t.shape2d, t.block, fp8_dtype=t.dtype, out_dtype=case.out_dtype,
                                  contiguous=t.data.is_contiguous())
    return planning.plan_matmul(_a(case, inputs), inputs["b"], out_dtype=case.out_dtype, bias=inputs["bias"],
                                backend="reference").problem


def expected(case: Case, inputs: dict) -> Expected:
    result = call(case, inputs, "reference")
    if case.op == "grouped_linear":
        return Expected(result, grouped.product(case, inputs))
    if case.op != "matmul":
        return Expected(result)
    a, b, bias = inputs["a"], inputs["b"], inputs["bias"]
    m, k = a.shape2d
    product = a.dequantize(torch.float32).reshape(m, k) @ b.dequantize(torch.float32)
    if bias is not None:
        product = product + bias.float()
    return Expected(result, product.reshape(*a.shape[:-1], b.shape[1]))


def check(backend: str, case: Case, inputs: dict, want: Expected) -> Outcome:
    """Hold `backend` to the reference on one case, on its own copy of the inputs: a backend that
    writes them is blamed, and the next backend still gets the case as built."""
    reasons = registry.reasons(registry.get_backend(backend), problem_of(case, inputs))
    before = inputs
    inputs = fresh(inputs)
    if reasons:
        return _declined(backend, case, inputs, reasons)
    try:
        first = _poisoned_call(case, inputs, backend, want, 0xFF)
        second = _poisoned_call(case, inputs, backend, want, 0x00)
    except Unsupported as e:
        return Outcome(FAILED, f"why_not accepted the case but the call raised {type(e).__name__}: {_first_line(e)}")
    except Exception as e:  # noqa: BLE001 - any crash is the finding
        return Outcome(FAILED, f"raised {type(e).__name__}: {_first_line(e)}\n{_where(e)}")
    problems = compare(case, first, want, inputs)
    if not problems:
        if not _same_bits(first, second):
            problems.append("two runs differ: " + _first_bit_difference(first, second))
        if changed := _changed(before, inputs):
            problems.append(f"modified its input {changed}")
    return Outcome(FAILED, "; ".join(problems)) if problems else Outcome(PASSED)


def _declined(backend, case, inputs, reasons) -> Outcome:
    try:
        got = call(case, inputs, backend)
    except Unsupported:
        return Outcome(UNSUPPORTED, "; ".join(reasons))
    except Exception as e:  # noqa: BLE001
        return Outcome(FAILED, f"why_not declined ({'; '.join(reasons)}) but the call raised "
                               f"{type(e).__name__}, not Unsupported: {_first_line(e)}")
    return Outcome(FAILED, f"why_not declined ({'; '.join(reasons)}) but the call returned {_kind(got)}")


# --- comparisons ----------------------------------------------------------------------------


def compare(case: Case, got, want: Expected, inputs: dict) -> list[str]:
    """Every way `got` differs from what the contract asks; empty when it conforms."""
    ref = want.result
    if case.op == "quantize":
        if not isinstance(got, Fp8Tensor):
            return [f"returned {_kind(got)}, expected an Fp8Tensor"]
        problems = _same_layout("data", got.data, ref.data) + _same_layout("scale", got.scale, ref.scale)
        if got.block != ref.block:
            problems.append(f"block {got.block}, expected {ref.block}")
        if problems:
            return problems
        x = inputs["x"]
        return (_bits_differ("scale", got.scale, ref.scale)
                + _bits_differ("data", got.data, ref.data, source=x, source_name="x"))
    if not isinstance(got, torch.Tensor):
        return [f"returned {_kind(got)}, expected a tensor"]
    problems = _same_layout("output", got, ref)
    if problems:
        return problems
    if case.op == "dequantize":
        return _bits_differ("output", got, ref)
    if case.op == "grouped_linear":
        return grouped.padding_not_zero(case, got) or _matmul_differs(case, got, want)
    return _matmul_differs(case, got, want)


def _matmul_differs(case: Case, got: torch.Tensor, want: Expected) -> list[str]:
    exact = want.product
    bad = ~torch.isfinite(got) & torch.isfinite(exact.to(got.dtype))
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        return [f"output has {int(bad.sum())} non-finite values where the product is finite "
                f"(first at {at}: got {got[at].item()!r}, expected {exact[at].item()!r}; "
                f"NaN means an element was not written or was read out of bounds)"]
    if case.exact:
        return _bits_differ("output", got, want.result)
    error = relative_error(got, exact)
    if not error < ERROR_BOUND:
        worst = (got.float() - exact).abs().flatten().argmax().item()
        at = tuple(torch.unravel_index(torch.tensor(worst), got.shape))
        at = tuple(int(i) for i in at)
        return [f"1 - 2Σxy/Σ(x²+y²) = {error:.3e} against the fp32 product (needs < {ERROR_BOUND:g}); "
                f"worst element {at}: got {got[at].item()!r}, expected {exact[at].item()!r}"]
    return []


def _same_layout(name, got, ref) -> list[str]:
    if not isinstance(got, torch.Tensor):
        return [f"{name} is {_kind(got)}, expected a tensor"]
    out = []
    if got.dtype != ref.dtype:
        out.append(f"{name} dtype {got.dtype}, expected {ref.dtype}")
    if tuple(got.shape) != tuple(ref.shape):
        out.append(f"{name} shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if got.device != ref.device:
        out.append(f"{name} on {got.device}, expected {ref.device}")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _bits_differ(name, got, ref, source=None, source_name="") -> list[str]:
    """Bit-for-bit equality, except that any NaN code matches any NaN (a NaN's sign means nothing)."""
    nan_got, nan_ref = torch.isnan(got.float()), torch.isnan(ref.float())
    differ = (_bits(got) != _bits(ref)) & ~(nan_got & nan_ref)
    count = int(differ.sum())
    if count == 0:
        return []
    at = tuple(int(i) for i in differ.nonzero()[0].tolist())
    where = f" from {source_name}={source.reshape(got.shape)[at].item()!r}" if source is not None else ""
    return [f"{name}: {count} of {got.numel()} elements differ from the reference; first at {at}{where}: "
            f"got {got[at].float().item()!r} (0x{_bits(got)[at].item() & _mask(got):0{2 * got.element_size()}x}), "
            f"expected {ref[at].float().item()!r} (0x{_bits(ref)[at].item() & _mask(ref):0{2 * ref.element_size()}x})"]


def _mask(t):
    return (1 << (8 * t.element_size())) - 1


# --- poisoning, snapshots, determinism ------------------------------------------------------


def _poisoned_call(case, inputs, backend, want, byte):
    """Run the case with every fresh buffer holding `byte`, so an element the backend never writes shows.

    Two layers: freed memory of the outputs' sizes is filled just before the call, and during the
    call torch's uninitialised constructors return filled tensors (fp8dispatch.numerics). The first
    run uses 0xFF (NaN in every float dtype here), the second 0x00, so an unwritten element also
    breaks the two-run comparison.
    """
    ref = want.result
    sizes = [ref.data.nbytes, ref.scale.nbytes] if isinstance(ref, Fp8Tensor) else [ref.nbytes]
    device = ref.data.device if isinstance(ref, Fp8Tensor) else ref.device
    fill_freed_memory([n * f for n in sizes for f in (1, 4)], byte, device)
    with poisoned_allocations(byte):
        got = call(case, inputs, backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return got


def _tensors(obj):
    if isinstance(obj, (Fp8Tensor, GroupedFp8Tensor)):
        return [obj.data, obj.scale]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return []


def fresh(inputs: dict) -> dict:
    """A copy of a case's inputs with the same dtypes, shapes, strides and storage offsets (a
    transposed view stays one, and a slice of a bigger tensor keeps its pointer's alignment)."""
    return {name: _copy(value) for name, value in inputs.items()}


def _copy(value):
    if isinstance(value, Fp8Tensor):
        return Fp8Tensor(_copy(value.data), _copy(value.scale), value.block)
    if isinstance(value, torch.Tensor):
        offset = value.storage_offset()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
        storage = torch.empty(offset + extent * (value.numel() > 0), dtype=value.dtype, device=value.device)
        return storage.as_strided(value.shape, value.stride(), offset).copy_(value)
    return value


def _changed(before: dict, inputs: dict) -> str | None:
    for name, value in before.items():
        for old, new in zip(_tensors(value), _tensors(inputs[name])):
            if not torch.equal(_bits(old), _bits(new)):
                return name
    return None


def _same_bits(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(ta, tb))


def _first_bit_difference(a, b) -> str:
    for name, x, y in zip(("data", "scale"), _tensors(a), _tensors(b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{name} {tuple(x.shape)} {x.dtype} then {tuple(y.shape)} {y.dtype}"
        differ = _bits(x) != _bits(y)
        if bool(differ.any()):
            at = tuple(int(i) for i in differ.nonzero()[0].tolist())
            label = "output" if isinstance(a, torch.Tensor) else name
            return (f"{label} {int(differ.sum())} elements, first at {at}: {x[at].float().item()!r} then "
                    f"{y[at].float().item()!r} (an unwritten element, a race, or a non-deterministic reduction)")
    return "different kinds of result"


# --- messages -------------------------------------------------------------------------------


def _kind(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor {tuple(obj.shape)}"
    return type(obj).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    return "\n".join(f"  at {f.filename}:{f.lineno} in {f.name}" for f in frames)
