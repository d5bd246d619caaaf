"""`Fp8Experts`: a mixture-of-experts SwiGLU feed-forward whose expert weights are FP8 `[G, N, K]`.

Every expert g computes `down_g(silu(gate_g(x)) * up_g(x))`, as DeepSeek-V3's routed experts do.
The gate and up projections are stacked into one `[G, 2I, H]` weight, so each layer is two
`grouped_linear` calls whatever the number of experts: one for gate and up, one for down. Routing
(which token goes to which expert, and the combine) stays with the caller: forward takes the tokens
already sorted by expert with `offsets`, or the decode layout `[G, max_m, H]` with `masked_m`.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fp8dispatch.blocks import cdiv
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import HIGH_PRECISION, fp8_format, is_fp8
from fp8dispatch.grouped import GROUPED_RECIPES, GroupedFp8Tensor, grouped_block, grouped_scale_shape, quantize_grouped
from fp8dispatch.grouped_api import grouped_linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")


class Fp8Experts(nn.Module):
    """G SwiGLU experts, hidden size H, intermediate size I, with FP8 weights and fp32 scales.

    Buffers: `gate_up_weight` `[G, 2I, H]` (gate rows first, then up) and `down_weight` `[G, H, I]`
    in FP8, with their dequantization scales `*_scale_inv` per expert: `[G, ceil(N/128),
    ceil(K/128)]` for the block recipe (DeepSeek-V3), `[G, N, 1]` for the row recipe.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, recipe: str = "block",
                 dtype: torch.dtype = torch.float8_e4m3fn, backend: str = "auto", device=None):
        super().__init__()
        if recipe not in GROUPED_RECIPES:
            raise Fp8ValueError(f"recipe: expected one of {', '.join(GROUPED_RECIPES)}, got {recipe!r}")
        fp8_format(dtype)
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise Fp8ValueError(f"{name}: expected a positive int, got {value!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.recipe, self.backend = recipe, backend
        g, h, i = num_experts, hidden_size, intermediate_size
        for name, (n, k) in (("gate_up", (2 * i, h)), ("down", (h, i))):
            block = grouped_block(recipe, n, k)
            self.register_buffer(f"{name}_weight", torch.zeros(g, n, k, dtype=dtype, device=device))
            self.register_buffer(f"{name}_weight_scale_inv",
                                 torch.ones(grouped_scale_shape((g, n, k), block), device=device))

    @property
    def gate_up(self) -> GroupedFp8Tensor:
        return GroupedFp8Tensor(self.gate_up_weight, self.gate_up_weight_scale_inv,
                                grouped_block(self.recipe, 2 * self.intermediate_size, self.hidden_size))

    @property
    def down(self) -> GroupedFp8Tensor:
        return GroupedFp8Tensor(self.down_weight, self.down_weight_scale_inv,
                                grouped_block(self.recipe, self.hidden_size, self.intermediate_size))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor | None = None, *,
                masked_m: torch.Tensor | None = None) -> torch.Tensor:
        """x `[M, H]` sorted by expert with `offsets [G + 1]`, or `[G, max_m, H]` with `masked_m [G]`."""
        h = grouped_linear(x, self.gate_up, offsets, masked_m=masked_m, backend=self.backend)
        gate, up = h.split(self.intermediate_size, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down, offsets, masked_m=masked_m, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, recipe={self.recipe}, "
                f"dtype={self.gate_up_weight.dtype}, backend={self.backend}")

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_weights(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, recipe: str = "block",
                     dtype: torch.dtype = torch.float8_e4m3fn, backend: str = "auto") -> Fp8Experts:
        """Quantize high-precision expert weights: gate and up `[G, I, H]`, down `[G, H, I]`."""
        for name, t in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(t, torch.Tensor) or t.dtype not in HIGH_PRECISION or t.dim() != 3:
                seen = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise Fp8TypeError(f"{name}: expected a 3-d float32, float16 or bfloat16 tensor, got {seen}")
        g, i, h = gate.shape
        if tuple(up.shape) != (g, i, h):
            raise Fp8ValueError(f"up: expected gate's shape {(g, i, h)}, got {tuple(up.shape)}")
        if tuple(down.shape) != (g, h, i):
            raise Fp8ValueError(f"down: expected shape {(g, h, i)} ([G, H, I]), got {tuple(down.shape)}")
        module = cls(g, h, i, recipe=recipe, dtype=dtype, backend=backend, device=gate.device)
        for name, w in (("gate_up", torch.cat([gate, up], dim=1)), ("down", down)):
            q = quantize_grouped(w, recipe, dtype=dtype)
            getattr(module, f"{name}_weight").copy_(q.data)
            getattr(module, f"{name}_weight_scale_inv").copy_(q.scale)
        return module

    @classmethod
    def from_deepseek(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "", *, num_experts: int | None = None,
                      backend: str = "auto", device=None) -> Fp8Experts:
        """Build from DeepSeek-V3's per-expert FP8 tensors: `{prefix}experts.{i}.{gate,up,down}_proj.weight`
        (float8_e4m3fn `[N, K]`) and `.weight_scale_inv` (fp32 `[ceil(N/128), ceil(K/128)]`). All or
        nothing: every expert's six tensors are checked before anything is built."""
        found = _expert_keys(tensors, prefix)
        g = num_experts if num_experts is not None else (max(found) + 1 if found else 0)
        if g <= 0:
            raise Fp8ValueError(f"tensors: no '{prefix}experts.<i>.<gate|up|down>_proj.weight' keys found")
        gate = tensors.get(f"{prefix}experts.0.gate_proj.weight")
        if not isinstance(gate, torch.Tensor) or gate.dim() != 2:
            raise Fp8ValueError(f"{prefix}experts.0.gate_proj.weight: expected a 2-d [I, H] tensor, got "
                                f"{type(gate).__name__ if not isinstance(gate, torch.Tensor) else tuple(gate.shape)}")
        i, h = gate.shape
        module = cls(g, h, i, dtype=gate.dtype if is_fp8(gate.dtype) else torch.float8_e4m3fn, backend=backend,
                     device=device if device is not None else gate.device)
        module.load_deepseek(tensors, prefix)
        return module

    def load_deepseek(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Copy DeepSeek-V3's per-expert tensors into the stacked buffers; all or nothing."""
        if self.recipe != "block":
            raise Fp8ValueError(f"recipe: DeepSeek-V3 checkpoints hold 128×128 blocks, this module is {self.recipe!r}")
        g, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        if i % 128:
            raise Fp8ValueError(f"intermediate_size: stacking gate and up block scales needs I % 128 == 0, got {i}")
        extra = sorted(k for k in _expert_keys(tensors, prefix) if k >= g)
        if extra:
            raise Fp8ValueError(f"tensors: expert {extra[0]} is present but this module has num_experts={g}")
        shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        checked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        missing = [f"{prefix}experts.{e}.{p}.{s}" for e in range(g) for p in PROJECTIONS
                   for s in ("weight", "weight_scale_inv") if f"{prefix}experts.{e}.{p}.{s}" not in tensors]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise Fp8ValueError(f"tensors: missing {', '.join(missing[:3])}{more}")
        for e in range(g):
            for p in PROJECTIONS:
                key = f"{prefix}experts.{e}.{p}"
                w, s = tensors[f"{key}.weight"], tensors[f"{key}.weight_scale_inv"]
                n, k = shapes[p]
                if not isinstance(w, torch.Tensor) or w.dtype != self.gate_up_weight.dtype or tuple(w.shape) != (n, k):
                    seen = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
                    raise Fp8ValueError(f"{key}.weight: expected {self.gate_up_weight.dtype} {(n, k)}, got {seen}")
                want = (cdiv(n, 128), cdiv(k, 128))
                if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != want:
                    seen = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
                    raise Fp8ValueError(f"{key}.weight_scale_inv: expected float32 {want}, got {seen}")
                checked[e, p] = (w, s)
        with torch.no_grad():
            for e in range(g):
                (gw, gs), (uw, us), (dw, ds) = (checked[e, p] for p in PROJECTIONS)
                self.gate_up_weight[e].copy_(torch.cat([gw, uw]))
                self.gate_up_weight_scale_inv[e].copy_(torch.cat([gs, us]))
                self.down_weight[e].copy_(dw)
                self.down_weight_scale_inv[e].copy_(ds)


def _expert_keys(tensors: Mapping[str, torch.Tensor], prefix: str) -> set[int]:
    if not isinstance(tensors, Mapping):
        raise Fp8TypeError(f"tensors: expected a mapping of names to tensors, got {type(tensors).__name__}")
    found = set()
    for key in tensors:
        if key.startswith(prefix) and (match := _EXPERT_KEY.match(key[len(prefix):])):
            found.add(int(match.group(1)))
    return found
