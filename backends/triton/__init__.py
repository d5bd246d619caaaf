"""The `triton` backend: fp8dispatch's own quantize, dequantize and scaled-matmul Triton kernels.

Runs on NVIDIA GPUs with FP8 tensor cores (sm89+), and on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set before import), where it installs the interpreter's float-conversion fix
so CPU results are bit-identical to the GPU's and to the reference.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace

import torch

from fp8dispatch.capabilities import layout_reasons
from fp8dispatch.registry import Backend

_FNUZ = (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_INT32_LIMIT = 2**31  # kernels index with 32-bit offsets


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _interpreting() -> bool:
    from .interpreter import active

    return active()


@dataclass(frozen=True)
class Found:
    """What the probe found, frozen: `why_not` reads this and the problem only."""

    interpreting: bool  # TRITON_INTERPRET=1 at import: the kernels run on CPU tensors, in the interpreter
    version: str  # triton.__version__


# Triton on a GPU: what `fp8dispatch support-matrix` describes.
COMPLETE = Found(interpreting=False, version="")


def probe() -> str | Found:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton
    except Exception as e:  # a broken install is a reason, not a crash
        return f"triton failed to import: {type(e).__name__}: {e}"
    if reason := _untested_version():
        return reason
    if _interpreting():
        from .interpreter import install

        install()
        return Found(interpreting=True, version=triton.__version__)
    if not torch.cuda.is_available():
        return "no CUDA GPU, and TRITON_INTERPRET=1 was not set before import (the CPU interpreter)"
    if torch.version.hip:
        return f"ROCm (HIP {torch.version.hip}): the kernels are written and checked for NVIDIA GPUs only"
    return Found(interpreting=False, version=triton.__version__)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def _untested_version() -> str | None:
    """A torch or Triton outside the range pyproject.toml declares (what CI and the GPU runs test)
    is refused: an untested compiler or interpreter fails in ways no check here has seen. The range
    is read from the installed package's metadata, its one home; a source tree not installed has none."""
    import triton

    installed = {"torch": str(torch.__version__), "triton": str(triton.__version__)}
    for name, bounds in _declared_ranges().items():
        if name in installed and not _satisfies(installed[name], bounds):
            return (f"{name} {installed[name]} is outside the tested range {name}{','.join(bounds)} "
                    f"(pip install \"{name}{','.join(bounds)}\")")
    return None


@cache
def _declared_ranges() -> dict[str, tuple[str, ...]]:
    from importlib import metadata

    try:
        requirements = metadata.requires("fp8dispatch") or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if "extra" in marker:
            continue
        name = re.match(r"[A-Za-z0-9_.-]+", spec.strip()).group()
        bounds = tuple(sorted((b.strip() for b in spec.strip()[len(name):].split(",") if b.strip()), reverse=True))
        ranges[name.lower()] = bounds
    return ranges


def _satisfies(version: str, bounds: tuple[str, ...]) -> bool:
    """`version` against `>=`, `>`, `<=`, `<`, `==` bounds, comparing release numbers (3.9.0+cpu -> 3, 9, 0)."""
    def release(text):
        return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", text.strip()).group().split("."))

    compare = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
               "<": lambda a, b: a < b, "==": lambda a, b: a[:len(b)] == b, "!=": lambda a, b: a[:len(b)] != b}
    for bound in bounds:
        op = re.match(r"[<>=!]+", bound).group()
        if not compare[op](release(version), release(bound[len(op):])):
            return False
    return True


def _device_reasons(problem, found: Found) -> list[str]:
    device = problem.device
    if found.interpreting:
        if device.type != "cpu":
            return [f"device {device}: under TRITON_INTERPRET=1 the kernels run on CPU tensors only"]
        return []
    if device.type != "cuda":
        return [f"device {device}: needs a CUDA tensor (or TRITON_INTERPRET=1 before import, for CPU tensors)"]
    cap = problem.capability
    if cap is not None and cap < (8, 9):
        return [f"needs sm89 or newer (FP8 conversions and tensor cores), this GPU is sm{cap[0]}{cap[1]}"]
    return []


def _format_reasons(name: str, dtype: torch.dtype, found: Found) -> list[str]:
    if dtype not in _FNUZ:
        return []
    if not found.interpreting:
        return [f"{name} {dtype}: Triton lowers the fnuz FP8 formats only on AMD GPUs"]
    version = found.version
    if _version_tuple(version) < (3, 8):
        return [f"{name} {dtype}: the interpreter needs Triton >= 3.8 for fnuz formats, this is {version}"]
    return []


def _size_reasons(name: str, rows: int, cols: int) -> list[str]:
    if rows * cols >= _INT32_LIMIT:
        return [f"{name} has {rows * cols} elements: needs < 2**31 (the kernels index in 32 bits)"]
    return []


def why_not(op, problem, found: Found = COMPLETE) -> list[str]:
    reasons = _device_reasons(problem, found)
    if op == "quantize":
        reasons += _format_reasons("dtype", problem.fp8_dtype, found)
        reasons += _size_reasons("x", *problem.shape)
    elif op == "dequantize":
        reasons += _format_reasons("dtype", problem.fp8_dtype, found)
        reasons += _size_reasons("data", *problem.shape)
    elif op == "matmul":
        reasons += _matmul_reasons(problem, found)
    elif op == "grouped_linear":
        reasons += _grouped_reasons(problem, found)
    return reasons


def _grouped_reasons(p, found: Found) -> list[str]:
    reasons = _format_reasons("x", p.x_dtype, found) + _format_reasons("w", p.w_dtype, found)
    if p.recipe == "block" and p.x_block[1] < p.k and p.x_block[1] % 32:
        reasons.append(f"K group g={p.x_block[1]}: needs g % 32 == 0 (the K step of an FP8 tensor-core dot)")
    if not p.x_row_major:
        reasons.append("x: needs row-major (contiguous) data; call .contiguous() on it")
    rows = p.groups * p.m if p.layout == "masked" else p.m
    reasons += _size_reasons("x", rows, p.k) + _size_reasons("the output", rows, p.n)
    reasons += _size_reasons("one expert's weight", p.n, p.k)
    return reasons


def _matmul_reasons(p, found: Found) -> list[str]:
    reasons = _format_reasons("a", p.a_dtype, found) + _format_reasons("b", p.b_dtype, found)
    if p.recipe == "mixed":
        reasons.append(f"blocks a {p.a_block}, b {p.b_block}: needs the block recipe (a in 1×g groups, "
                       f"b in g×g' blocks), rowwise or tensorwise scales")
    if p.recipe == "block" and p.a_block[1] % 32:
        reasons.append(f"K group g={p.a_block[1]}: needs g % 32 == 0 (the K step of an FP8 tensor-core dot)")
    reasons += layout_reasons(p)
    reasons += _size_reasons("a", p.m, p.k) + _size_reasons("b", p.k, p.n) + _size_reasons("the output", p.m, p.n)
    return reasons


@cache
def kernels():
    """The kernel modules, imported on first use (importing triton costs ~0.15 s; probe first)."""
    from . import dequantize, grouped, interpreter, matmul, matmul_plan, quantize  # they replace no names here

    interpreter.install()  # before any kernel runs on CPU tensors, even without the registry
    return SimpleNamespace(quantize=quantize.quantize, dequantize=dequantize.dequantize, matmul=matmul.matmul,
                           grouped_linear=grouped.grouped_linear,
                           plans={"quantize": quantize.plan, "matmul": matmul_plan.plan, "grouped_linear": grouped.plan})


def _plan(op, problem):
    """A bound runner per problem for quantize and matmul (launching the compiled kernel directly),
    grouped_linear's function naming its kernel; any other op runs its function."""
    make = kernels().plans.get(op)
    return BACKEND.function(op) if make is None else make(problem)


def _quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    return kernels().quantize(x, block, dtype, scale, scale_ub, pow2_scale)


def _dequantize(data, scale, block, out_dtype):
    return kernels().dequantize(data, scale, block, out_dtype)


def _matmul(a, b, out_dtype, bias=None):
    return kernels().matmul(a, b, out_dtype, bias)


def _grouped_linear(x, w, offsets, masked_m, out_dtype, bias=None):
    return kernels().grouped_linear(x, w, offsets, masked_m, out_dtype, bias)


BACKEND = Backend(
    name="triton",
    probe=probe,
    why_not=why_not,
    quantize=_quantize,
    dequantize=_dequantize,
    matmul=_matmul,
    grouped_linear=_grouped_linear,
    version=_triton_version,
    plan=_plan,
    description="fp8dispatch's own Triton kernels (sm89+; the interpreter on CPU)",
)
