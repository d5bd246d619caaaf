"""`grouped_linear`: every expert's rows of x times that expert's weight, in one call.

Two layouts. *Contiguous*: x `[M, K]` with rows sorted by expert and `offsets [G + 1]`
(`offsets[0] = 0`, non-decreasing, `offsets[G] = M`); the result is `[M, N]`. *Masked* (decode,
static shapes): x `[G, max_m, K]` with `masked_m [G]` valid rows per expert; the result is
`[G, max_m, N]` and its rows past `masked_m[g]` are zero. w is `[G, N, K]`: high precision
(quantized per call by the recipe) or a `GroupedFp8Tensor`. The rest is matmul's contract.

As in `fp8dispatch.api`, the first call with a key (dtypes, shapes, devices, strides, blocks,
options) checks everything static and routes; later calls check only the values that the contract
asks for: the contiguous `offsets` are read on the host once per call (one synchronization; not
while a CUDA graph is being captured), `masked_m` only when it lives on the CPU (docs/decisions.md).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fp8dispatch import checks, registry, tuning
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, NoBackend
from fp8dispatch.formats import HIGH_PRECISION, is_fp8
from fp8dispatch.grouped import (
    GROUPED_RECIPES,
    GroupedFp8Tensor,
    GroupedLinearProblem,
    grouped_block,
    quantize_grouped,
    recipe_of_grouped,
)
from fp8dispatch.problem import device_capability
from fp8dispatch.tensor import Fp8Tensor

INDEX_DTYPES = (torch.int32, torch.int64)
_plans: dict[tuple, Callable] = {}
registry._refresh_hooks.append(_plans.clear)


def grouped_linear(
    x: torch.Tensor | Fp8Tensor,
    w: torch.Tensor | GroupedFp8Tensor,
    offsets: torch.Tensor | None = None,
    *,
    masked_m: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    recipe: str | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`out[rows of g] = x[rows of g] @ w[g].T (+ bias[g])` for every expert g.

    Pass `offsets` (contiguous layout, x `[M, K]`) or `masked_m` (masked layout, x `[G, max_m, K]`),
    not both. `bias` is per expert, `[G, N]`. `recipe` ("block", the default, or "row") says how
    high-precision operands are quantized; FP8 operands carry their blocks. `out_dtype` defaults
    to x's dtype when x is high precision, else bf16.
    """
    if torch.compiler.is_compiling():
        return _traced(x, w, offsets, masked_m, bias, recipe, out_dtype, backend)
    key = (_key("x", x), _key("w", w), _key("offsets", offsets), _key("masked_m", masked_m), _key("bias", bias),
           recipe, out_dtype, backend)
    try:
        run = _plans[key]
    except KeyError:
        run = _plans[key] = _plan(x, w, offsets, masked_m, bias, recipe, out_dtype, backend)
    except TypeError:  # an unhashable argument: the planner names it
        run = _plan(x, w, offsets, masked_m, bias, recipe, out_dtype, backend)
    return run(x, w, offsets, masked_m, bias)


def _key(name: str, t) -> tuple | None:
    if t is None:
        return None
    if isinstance(t, Fp8Tensor):
        return t.dispatch_key()
    if isinstance(t, GroupedFp8Tensor):
        return ("g", t.data.dtype, t.data.shape, t.data.device, t.data.stride(), t.scale.stride(), t.block)
    if isinstance(t, torch.Tensor):
        return (t.dtype, t.shape, t.device, t.stride())
    raise Fp8TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


# --- planning -------------------------------------------------------------------------------


def plan_problem(x, w, offsets=None, masked_m=None, bias=None, recipe=None, out_dtype=None, backend="auto"):
    """The problem a call describes and the blocks its operands will have (for tests and explain)."""
    return _describe(x, w, offsets, masked_m, bias, recipe, out_dtype, backend)[0]


def _describe(x, w, offsets, masked_m, bias, recipe, out_dtype, backend):
    if recipe is not None and recipe not in GROUPED_RECIPES:
        raise Fp8ValueError(f"recipe: expected one of {', '.join(GROUPED_RECIPES)} for grouped_linear, got {recipe!r}")
    checks.backend_arg(backend)
    for name, t in (("x", x), ("w", w)):
        if isinstance(t, torch.Tensor) and t.dtype not in HIGH_PRECISION:
            hint = {"x": " (wrap FP8 data in an Fp8Tensor with its 1×128 group scales)",
                    "w": " (use fp8dispatch.quantize_grouped, or a GroupedFp8Tensor)"}[name]
            raise Fp8TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}"
                               + (hint if is_fp8(t.dtype) else ""))
    if not isinstance(x, (torch.Tensor, Fp8Tensor)):
        raise Fp8TypeError(f"x: expected a torch.Tensor or Fp8Tensor, got {type(x).__name__}")
    if isinstance(w, Fp8Tensor):
        raise Fp8TypeError("w: expected a [G, N, K] tensor or a GroupedFp8Tensor (per-expert scales), got an "
                           "Fp8Tensor; make one with fp8dispatch.quantize_grouped")
    if not isinstance(w, (torch.Tensor, GroupedFp8Tensor)):
        raise Fp8TypeError(f"w: expected a torch.Tensor or GroupedFp8Tensor, got {type(w).__name__}")
    if len(w.shape) != 3:
        raise Fp8ValueError(f"w: expected a 3-d [G, N, K] weight, got shape {tuple(w.shape)}")
    groups, n, k = w.shape
    if (offsets is None) == (masked_m is None):
        raise Fp8ValueError("offsets, masked_m: expected exactly one (offsets for x [M, K] sorted by expert, "
                            f"masked_m for x [G, max_m, K]), got {'both' if offsets is not None else 'neither'}")
    layout = "contiguous" if offsets is not None else "masked"
    if layout == "contiguous":
        if len(x.shape) != 2:
            raise Fp8ValueError(f"x: expected a 2-d [M, K] tensor with offsets, got shape {tuple(x.shape)}")
        rows = x.shape[0]
        _check_index("offsets", offsets, (groups + 1,), x.device, "[G + 1]")
    else:
        if len(x.shape) != 3 or x.shape[0] != groups:
            raise Fp8ValueError(f"x: expected a 3-d [G={groups}, max_m, K] tensor with masked_m, "
                                f"got shape {tuple(x.shape)}")
        rows = x.shape[1]
        _check_index("masked_m", masked_m, (groups,), x.device, "[G]")
    if x.shape[-1] != k:
        raise Fp8ValueError(f"w: expected K={x.shape[-1]} (x's last dim) in [G, N, K], got shape {tuple(w.shape)}")
    if w.device != x.device:
        raise Fp8ValueError(f"w: expected device {x.device} (x's), got {w.device}")
    if out_dtype is None:
        out_dtype = x.dtype if isinstance(x, torch.Tensor) else torch.bfloat16
    checks.out_dtype("out_dtype", out_dtype)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in HIGH_PRECISION:
            seen = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise Fp8TypeError(f"bias: expected a float32, float16 or bfloat16 tensor, got {seen}")
        if tuple(bias.shape) != (groups, n):
            raise Fp8ValueError(f"bias: expected shape ({groups}, {n}) (one row per expert), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise Fp8ValueError(f"bias: expected device {x.device} (x's), got {bias.device}")
    recipe, w_block, x_block = _blocks(x, w, recipe, n, k)
    problem = GroupedLinearProblem(
        device=x.device, capability=device_capability(x.device), layout=layout, recipe=recipe,
        x_dtype=x.dtype if isinstance(x, Fp8Tensor) else torch.float8_e4m3fn,
        w_dtype=w.dtype if isinstance(w, GroupedFp8Tensor) else torch.float8_e4m3fn,
        groups=groups, m=rows, n=n, k=k, x_block=x_block, w_block=w_block,
        offsets_dtype=(offsets if offsets is not None else masked_m).dtype,
        x_row_major=not isinstance(x, Fp8Tensor) or x.data.is_contiguous(),
        w_contiguous=not isinstance(w, GroupedFp8Tensor) or (w.data.is_contiguous() and w.scale.is_contiguous()),
        out_dtype=out_dtype, bias_dtype=None if bias is None else bias.dtype,
    )
    return problem, out_dtype


def _check_index(name, t, shape, device, meaning) -> None:
    if not isinstance(t, torch.Tensor):
        raise Fp8TypeError(f"{name}: expected an int32 or int64 tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise Fp8TypeError(f"{name}: expected an int32 or int64 tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise Fp8ValueError(f"{name}: expected shape {shape} ({meaning}, from w's G), got {tuple(t.shape)}")
    if t.device != device:
        raise Fp8ValueError(f"{name}: expected device {device} (x's), got {t.device}")


def _blocks(x, w, recipe, n, k):
    """The recipe, w's per-expert block and x's block: from the FP8 operands, else from the recipe."""
    if isinstance(w, GroupedFp8Tensor):
        named = recipe_of_grouped(w.block, k)
        if recipe is not None and recipe != named:
            raise Fp8ValueError(f"recipe: {recipe!r} contradicts w's per-expert blocks {w.block} ({named!r})")
        w_block = w.block
        if named == "block" and w_block[0] == 1:
            raise Fp8ValueError(f"w: blocks {w_block} vary along K but not across N; expected 128×128-style "
                                "blocks or one scale per row")
    elif isinstance(x, Fp8Tensor) and x.block[0] == 1:
        named = "row" if x.block[1] >= k else "block"
        if recipe is not None and recipe != named:
            raise Fp8ValueError(f"recipe: {recipe!r} contradicts x's blocks {x.block} ({named!r})")
        w_block = grouped_block(named, n, k, x.block[1]) if named == "block" else grouped_block("row", n, k)
    else:
        named = recipe or "block"
        w_block = grouped_block(named, n, k)
    x_block = (1, w_block[1]) if named == "block" else (1, max(k, 1))
    if isinstance(x, Fp8Tensor):
        if x.block[0] != 1:
            raise Fp8ValueError(f"x: expected per-row blocks (1, g) so that no block straddles two experts, "
                                f"got blocks {x.block}")
        if named == "block" and x.block[1] != w_block[1]:
            raise Fp8ValueError(f"x: K blocks must line up with w's: x has {x.block[1]}-wide groups, "
                                f"w has {w_block[1]}-wide blocks")
        if named == "row" and x.block[1] < k:
            raise Fp8ValueError(f"x: the row recipe needs one scale per row, got {x.block[1]}-wide groups over K={k}")
        x_block = x.block
    return named, w_block, x_block


def _plan(x, w, offsets, masked_m, bias, recipe, out_dtype, backend) -> Callable:
    problem, out_dtype = _describe(x, w, offsets, masked_m, bias, recipe, out_dtype, backend)
    masked = problem.layout == "masked"
    rows, n, k = problem.m, problem.n, problem.k
    out_shape = (problem.groups, rows, n) if masked else (rows, n)
    check_values = _masked_m_checker(rows) if masked else _offsets_checker(rows)
    chosen = registry.choose(problem, backend)  # a backend asked for by name must be able to run it
    if rows * n * problem.groups == 0 or k == 0:
        def empty(x, w, offsets, masked_m, bias):
            check_values(offsets if offsets is not None else masked_m)
            return _bias_only(out_shape, out_dtype, x.device, offsets, masked_m, bias)
        return empty
    run = chosen.grouped_linear
    x_gran = "group" if problem.recipe == "block" else "row"
    x_group, w_recipe = problem.x_block[1], problem.recipe
    w_size = problem.w_block[1] if problem.recipe == "block" else 128

    def grouped(x, w, offsets, masked_m, bias):
        check_values(offsets if offsets is not None else masked_m)
        if type(x) is not Fp8Tensor:
            from fp8dispatch.api import quantize
            q = quantize(x.reshape(-1, k), x_gran, block_size=x_group)
            x = Fp8Tensor._trusted(q.data.view(x.shape), q.scale, q.block)
        if type(w) is not GroupedFp8Tensor:
            w = quantize_grouped(w, w_recipe, block_size=w_size)
        return run(x, w, offsets, masked_m, out_dtype, bias)
    return grouped


def _offsets_checker(rows: int) -> Callable:
    on_gpu_too = registry.settings().check_offsets

    def check(offsets):
        if offsets.is_cuda and (not on_gpu_too or torch.cuda.is_current_stream_capturing()):
            return  # a read would synchronize (or end a capture); every backend stays in bounds regardless
        values = offsets.tolist()
        if values[0] != 0:
            raise Fp8ValueError(f"offsets: expected offsets[0] == 0, got {values[0]}")
        if values[-1] != rows:
            raise Fp8ValueError(f"offsets: expected offsets[G] == M == {rows} (x's rows), got {values[-1]}")
        for g in range(len(values) - 1):
            if values[g + 1] < values[g]:
                raise Fp8ValueError(f"offsets: expected non-decreasing values, got offsets[{g}] = {values[g]} "
                                    f"> offsets[{g + 1}] = {values[g + 1]}")
    return check


def _masked_m_checker(max_m: int) -> Callable:
    def check(masked_m):
        if masked_m.is_cuda:
            return  # no synchronization in the decode layout; kernels clamp to [0, max_m] (docs/decisions.md)
        bad = ((masked_m < 0) | (masked_m > max_m)).nonzero()
        if bad.numel():
            g = int(bad[0, 0])
            raise Fp8ValueError(f"masked_m: expected values in [0, max_m={max_m}], got masked_m[{g}] = "
                                f"{int(masked_m[g])}")
    return check


def _bias_only(out_shape, out_dtype, device, offsets, masked_m, bias) -> torch.Tensor:
    """The result when K == 0 or nothing is computed: zeros, plus each expert's bias on its valid rows."""
    out = torch.zeros(out_shape, dtype=out_dtype, device=device)
    if bias is None or out.numel() == 0:
        return out
    if offsets is not None:
        expert = torch.searchsorted(offsets[1:].contiguous(), torch.arange(out_shape[0], device=device), right=True)
        return bias[expert].to(out_dtype)
    valid = torch.arange(out_shape[1], device=device)[None, :] < masked_m[:, None]
    return torch.where(valid[:, :, None], bias[:, None, :].to(out_dtype), out)


def explain_grouped(x, w, offsets=None, *, masked_m=None, bias=None, recipe=None, out_dtype=None,
                    backend="auto") -> str:
    """The routing table of a grouped_linear call (each backend and its reasons) and where the
    routing came from (a measured table or the static order), as `explain` says it; never raises."""
    try:
        problem = plan_problem(x, w, offsets, masked_m, bias, recipe, out_dtype, backend)
        table = registry.explain_problem(problem, backend)
        try:
            chosen = registry.choose(problem, backend)
            kernel = getattr(chosen.runner(problem), "kernel", f"{chosen.name}.{problem.op}")  # as `explain`
            table += f"\n  runs: {chosen.name} · {kernel}"
        except NoBackend:
            pass  # the table says why
        return f"{table}\n\n{tuning.routing_source(problem.device)}"
    except (Fp8TypeError, Fp8ValueError, TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


# --- torch.compile --------------------------------------------------------------------------


@torch.library.custom_op("fp8dispatch::grouped_linear", mutates_args=())
def grouped_linear_op(
    x: torch.Tensor, x_fp8: Optional[torch.dtype], x_scale: Optional[torch.Tensor], x_block: Optional[list[int]],
    w: torch.Tensor, w_fp8: Optional[torch.dtype], w_scale: Optional[torch.Tensor], w_block: Optional[list[int]],
    offsets: Optional[torch.Tensor], masked_m: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    recipe: Optional[str], out_dtype: Optional[torch.dtype], backend: str,
) -> torch.Tensor:
    """`grouped_linear` as one opaque op. An FP8 operand comes as (uint8 bits, its FP8 dtype, scale,
    block), as in fp8dispatch/ops.py; a high-precision one as (tensor, None, None, None)."""
    xa = x if x_fp8 is None else Fp8Tensor(x.view(x_fp8), x_scale, (x_block[0], x_block[1]))
    wa = w if w_fp8 is None else GroupedFp8Tensor(w.view(w_fp8), w_scale, (w_block[0], w_block[1]))
    out = grouped_linear(xa, wa, offsets, masked_m=masked_m, bias=bias, recipe=recipe, out_dtype=out_dtype,
                         backend=backend)
    return out.clone() if any(t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                              for t in (x, w, bias)) else out


@grouped_linear_op.register_fake
def _(x, x_fp8, x_scale, x_block, w, w_fp8, w_scale, w_block, offsets, masked_m, bias, recipe, out_dtype, backend):
    if out_dtype is None:
        out_dtype = x.dtype if x_fp8 is None and x.dtype in HIGH_PRECISION else torch.bfloat16
    return x.new_empty((*x.shape[:-1], w.shape[1]), dtype=out_dtype)


def _parts(t) -> tuple:
    if isinstance(t, (Fp8Tensor, GroupedFp8Tensor)):
        return t.data.view(torch.uint8), t.data.dtype, t.scale, list(t.block)
    return t, None, None, None


def _traced(x, w, offsets, masked_m, bias, recipe, out_dtype, backend):
    return grouped_linear_op(*_parts(x), *_parts(w), offsets, masked_m, bias, recipe, out_dtype, backend)

__all__ = ["explain_grouped", "grouped_linear", "plan_problem"]
