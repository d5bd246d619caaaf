"""Capability tables: what a library backend serves, as data, and the one reader that explains them.

A table lists, per op and kind of scaling (the matmul or grouped_linear recipe, or the
granularity), the library function that serves it and what that function needs: FP8 formats,
output dtypes, GPUs, alignments, whether its epilogue takes a bias, and the few value checks a table
cannot express. `Capabilities.check(problem, found)` turns a table, a problem and the frozen result
of the backend's probe into every reason the table declines it, each naming the quantity, the need
and what was seen: a library backend's whole `why_not`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
Arch = tuple[int, int]
_SHORT = {BF16: "bf16", F16: "fp16", F32: "fp32"}
# The ops whose problems pair two FP8 operands: their names, and the attributes of their dtypes and blocks.
_OPERANDS = {"matmul": ("a, b", ("a_dtype", "b_dtype"), ("a_block", "b_block")),
             "grouped_linear": ("x, w", ("x_dtype", "w_dtype"), ("x_block", "w_block"))}
# A value check: check(row, problem, found) -> a reason, or None when the value passes.
Check = Callable[["Serves", object, object], "str | None"]


@dataclass(frozen=True)
class Serves:
    """One row of a table: the function that runs one op for one kind of scaling, and its needs.

    `why` adds the reason behind a need to its message, keyed by what it explains: "arch",
    "formats", "out_dtype", "bias", or a quantity of `multiples` ("K", "N", "rows"). `checks` are
    what a table cannot express (a value's form, what the probe found), run once the rest is read.
    """

    op: str
    kind: str  # the matmul or grouped_linear recipe, or the quantize / dequantize granularity
    kernel: str  # the library function, named in every reason
    blocks: tuple | None = None  # exactly these blocks ((a, b) for matmul, (x, w) grouped); None: any
    formats: tuple[torch.dtype, ...] = (E4M3, E5M2)
    out_dtypes: tuple[torch.dtype, ...] = (BF16, F16, F32)
    min_arch: Arch = (8, 9)
    archs: tuple[Arch, ...] = ()  # the only GPUs it has kernels for; () means any from min_arch on
    multiples: tuple[tuple[str, int], ...] = ()  # ("K", 16): K % 16 == 0
    bias: str = "none"  # what the matmul epilogue adds: "none", "any", or "out_dtype" (that dtype only)
    why: Mapping[str, str] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()

    def label(self) -> str:
        if self.blocks is None:
            return self.kind
        pairs = self.blocks if self.op in _OPERANDS else (self.blocks,)
        return " · ".join(f"{r}×{c}" for r, c in pairs)


@dataclass(frozen=True)
class Capabilities:
    """What one backend serves: its rows, the devices it runs on, and the ops it declines whole."""

    who: str  # the library, as reasons name it
    serves: tuple[Serves, ...]
    devices: tuple[str, ...] = ("cuda",)
    declined: Mapping[str, str] = field(default_factory=dict)  # op -> why none of it is offered
    elsewhere: Mapping[str, str] = field(default_factory=dict)  # op -> where the kinds not served go

    def lookup(self, p) -> Serves | None:
        """The row that serves this problem's op, kind and blocks, or None."""
        for row in self.serves:
            if row.op == p.op and row.kind == kind_of(p) and row.blocks in (None, blocks_of(p)):
                return row
        return None

    def check(self, p, found=None) -> tuple[list[str], Serves | None]:
        """Every reason the table declines `p` given the probe's `found`, and the row that serves it
        (None: look no further)."""
        if p.device.type not in self.devices:
            return [f"needs a {' or '.join(d.upper() for d in self.devices)} tensor, got device {p.device}"], None
        if p.op in self.declined:
            return [self.declined[p.op]], None
        row = self.lookup(p)
        if row is None:
            served = [r.label() for r in self.serves if r.op == p.op]
            hint = f"; {self.elsewhere[p.op]}" if p.op in self.elsewhere else ""
            return [f"{_kind_text(p)}: {self.who} serves {_listed(served, 'and')} only{hint}"], None
        checked = [check(row, p, found) for check in row.checks]
        return (_arch(row, p.capability) + _formats(row, p) + _out_dtype(row, p) + _bias(row, p)
                + layout_reasons(p) + _multiples(row, p) + [reason for reason in checked if reason]), row


def kind_of(p) -> str:
    return p.recipe if p.op in _OPERANDS else p.granularity


def blocks_of(p) -> tuple:
    if p.op in _OPERANDS:
        return tuple(getattr(p, name) for name in _OPERANDS[p.op][2])
    return p.block


def sm(capability: Arch | None) -> str:
    return "no GPU" if capability is None else f"sm{capability[0]}{capability[1]}"


def layout_reasons(p) -> list[str]:
    """The layout the kernels here read: a row-major [M, K], b column-major [K, N]; x row-major and
    w [G, N, K] contiguous; data contiguous."""
    if p.op == "grouped_linear":
        reasons = [] if p.x_row_major else ["x: needs row-major contiguous data (call .contiguous())"]
        return reasons + ([] if p.w_contiguous else ["w: needs contiguous [G, N, K] data and scales "
                                                     "(build it from .contiguous() ones)"])
    if p.op != "matmul":
        return [] if p.contiguous else ["t: needs contiguous data (call .contiguous())"]
    reasons = []
    if not p.a_row_major:
        reasons.append("a: needs row-major contiguous [M, K] data (call .contiguous())")
    if not p.b_col_major:
        reasons.append("b: needs column-major [K, N] data, the .t() of a contiguous [N, K] weight "
                       "(pass w.contiguous().t())")
    return reasons


def _kind_text(p) -> str:
    if p.op in _OPERANDS:
        return f"recipe {p.recipe} (blocks {' × '.join(map(str, blocks_of(p)))})"
    return f"granularity {p.granularity} (block {p.block})"


def _because(row: Serves, key: str) -> str:
    return f" ({row.why[key]})" if key in row.why else ""


def _listed(items, conjunction: str) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def _arch(row: Serves, cap: Arch | None) -> list[str]:
    if row.archs and cap not in row.archs:
        return [f"{row.kernel} runs on {_listed(map(sm, row.archs), 'and')} only{_because(row, 'arch')}, "
                f"this GPU is {sm(cap)}"]
    if not row.archs and (cap is None or cap < row.min_arch):
        return [f"{row.kernel} needs {sm(row.min_arch)} or newer{_because(row, 'arch')}, this GPU is {sm(cap)}"]
    return []


def _formats(row: Serves, p) -> list[str]:
    operands, dtypes, _ = _OPERANDS.get(p.op, ("t", ("fp8_dtype",), None))
    seen = tuple(getattr(p, name) for name in dtypes)
    if all(dtype in row.formats for dtype in seen):
        return []
    return [f"{operands}: {row.kernel} takes {_listed(map(_name, row.formats), 'and')} only"
            f"{_because(row, 'formats')}, got {' × '.join(map(str, seen))}"]


def _out_dtype(row: Serves, p) -> list[str]:
    if p.op == "quantize" or p.out_dtype in row.out_dtypes:
        return []
    param = "out_dtype" if p.op in _OPERANDS else "dtype"
    return [f"{param}: {row.kernel} writes {_listed(map(_name, row.out_dtypes), 'or')} only"
            f"{_because(row, 'out_dtype')}, asked {p.out_dtype}"]


def _bias(row: Serves, p) -> list[str]:
    """A bias rides in the epilogue, or is added to an fp32 output; adding it to a rounded one would round twice."""
    bias = getattr(p, "bias_dtype", None)
    if bias is None or p.out_dtype == F32 or row.bias == "any" or (row.bias == "out_dtype" and bias == p.out_dtype):
        return []
    fp32 = "; fp32 output takes any bias" if F32 in row.out_dtypes else ""
    if row.bias == "out_dtype":
        return [f"bias: a {bias} bias with {p.out_dtype} output cannot ride in {row.kernel}'s epilogue (it takes "
                f"the output's dtype), and adding it afterwards would round twice{fp32}"]
    return [f"bias: {row.kernel} has no bias epilogue{_because(row, 'bias')}, and adding it afterwards would "
            f"round twice ({_name(p.out_dtype)} output){fp32}"]


def _multiples(row: Serves, p) -> list[str]:
    values = {"K": getattr(p, "k", None), "N": getattr(p, "n", None), "M": getattr(p, "m", None),
              "rows": p.shape[0] if hasattr(p, "shape") else None}
    return [f"{q}={values[q]}: needs {q} % {m} == 0{_because(row, q)}"
            for q, m in row.multiples if values[q] % m]
