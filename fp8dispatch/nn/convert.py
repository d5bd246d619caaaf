"""`convert(model)`: swap a model's `nn.Linear` layers for `Fp8Linear`, and say what was skipped and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fp8dispatch import planning, registry
from fp8dispatch.blocks import RECIPES
from fp8dispatch.errors import Fp8ValueError, Unsupported
from fp8dispatch.formats import HIGH_PRECISION
from fp8dispatch.nn.linear import PROBE_M, Fp8Linear


@dataclass(frozen=True)
class Converted:
    name: str
    in_features: int
    out_features: int
    recipe: str
    backend: str  # where the matmul routes at M=PROBE_M tokens
    note: str = ""


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class ConversionReport:
    """What `convert` did to each `nn.Linear`, and the bytes their weights hold before and after."""

    converted: list[Converted] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    bytes_before: int = 0  # weight (+ scale) bytes of the converted layers, before
    bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layers, skipped {len(self.skipped)}"]
        if self.bytes_before:
            lines.append(f"weights of converted layers: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
                         f"({self.bytes_after / self.bytes_before:.1%})")
        for c in self.converted:
            note = f"; {c.note}" if c.note else ""
            lines.append(f"  + {c.name}: {c.in_features}->{c.out_features}, {c.recipe}, matmul on {c.backend}{note}")
        lines.extend(f"  - {s.name}: {s.reason}" for s in self.skipped)
        return "\n".join(lines)


def convert(model: nn.Module, recipe: str = "block", filter: Callable[[nn.Module, str], bool] | None = None,
            *, block_size: int = 128, dtype: torch.dtype = torch.float8_e4m3fn,
            backend: str = "auto") -> ConversionReport:
    """Replace eligible `nn.Linear` layers of `model` in place by `Fp8Linear(recipe)`.

    `filter(module, name)` (TorchAO's order) returns False to keep a layer. With `backend="auto"`
    every plain linear converts: the reference backend runs any shape, tails included, and the
    report names the backend each layer's matmul routes to. A named backend (or list) must be
    able to run the layer, else the layer is skipped with that backend's reasons. Every
    `nn.Linear` the model holds appears in the report, converted or skipped with a reason.
    """
    if not isinstance(model, nn.Module):
        raise Fp8ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if recipe not in RECIPES:
        raise Fp8ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    report = ConversionReport()
    owners = _parameter_owners(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        name = name or "(root)"
        reason = _why_not(model, name, module, filter, owners)
        if reason is None:
            reason, layer, chosen, note = _convert_one(module, recipe, block_size, dtype, backend)
        if reason is not None:
            report.skipped.append(Skipped(name, reason))
            continue
        _replace(model, name, layer)
        report.converted.append(Converted(name, module.in_features, module.out_features, recipe, chosen, note))
        report.bytes_before += _nbytes(module.weight)
        report.bytes_after += _nbytes(layer.weight) + _nbytes(layer.weight_scale_inv)
    return report


def _why_not(model, name, module, filter, owners) -> str | None:
    if type(module) is not nn.Linear:
        return (f"{type(module).__name__} subclasses nn.Linear; its forward, or its parent's (as in "
                f"nn.MultiheadAttention.out_proj), may read .weight directly, so it is left as is")
    if name == "(root)":
        return "the model itself is an nn.Linear and has no parent to swap it in; use Fp8Linear.from_linear"
    if filter is not None and not filter(module, name):
        return "excluded by filter"
    w = module.weight
    if w.dtype not in HIGH_PRECISION:
        return f"weight dtype {w.dtype}: expected float32, float16 or bfloat16"
    if w.device.type == "meta":
        return "weight is on the meta device: load real weights first, or use load_fp8_checkpoint"
    shared = [n for n in owners.get(id(w), ()) if n != f"{name}.weight"]
    if shared:
        return (f"weight is tied to {', '.join(shared)}: converting would untie it and keep a "
                f"high-precision copy for the other user")
    return None


def _convert_one(module, recipe, block_size, dtype, backend):
    try:
        layer = Fp8Linear.from_linear(module, recipe, block_size=block_size, dtype=dtype, backend=backend)
    except (Unsupported, ValueError, TypeError) as e:
        return f"quantizing the weight failed: {e}", None, None, None
    w, bias, act = layer.fp8_weight(), layer.bias, module.weight.dtype
    x = torch.empty((PROBE_M, module.in_features), dtype=act, device=w.device)
    problem = planning.plan_linear(x, w, bias, out_dtype=act, backend="reference").problem
    if problem is None:
        return None, layer, "none (empty weight)", ""
    names = [n.strip() for n in backend.split(",") if n.strip()]
    if backend.strip().lower() != "auto":
        for n in names:
            if n.lower() == "auto" or not registry.reasons(registry.get_backend(n), problem):
                break
        else:  # every named backend refuses: that is the reason, backend by backend
            why = "; ".join(f"{n}: {', '.join(registry.reasons(registry.get_backend(n), problem))}" for n in names)
            return f"{problem.describe()} cannot run on the requested backend ({why})", None, None, None
    chosen = registry.choose(problem, backend).name
    note = ""
    if chosen == "reference" and w.device.type == "cuda":  # correct but slow: say why no kernel took it
        why = [f"{b.name}: {'; '.join(registry.reasons(b, problem))}" for b in registry.all_backends()
               if b.name != "reference" and registry.reasons(b, problem)]
        note = "runs on the fp32 reference (" + " | ".join(why) + ")"
    return None, layer, chosen, note


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    return owners


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes the linear layers' weights hold (FP8 data plus scales for Fp8Linear); biases excluded."""
    total = 0
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            total += _nbytes(m.weight) + _nbytes(m.weight_scale_inv)
        elif isinstance(m, nn.Linear):
            total += _nbytes(m.weight)
    return total
