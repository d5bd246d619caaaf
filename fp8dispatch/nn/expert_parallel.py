"""Expert parallelism for `Fp8Experts`: rank r of w holds experts `[r·G/w, (r+1)·G/w)`.

How tokens reach their experts: every rank already holds every token (it is the output of the
tensor-parallel attention before it, which ends in an all-reduce), sorted by expert. Each rank runs
its own experts on their rows, leaves the other rows zero, and one all-reduce of the `[M, H]`
output sums the ranks' disjoint rows. Adding zeros is exact, so the result equals one process's
bit for bit. The cost is that all-reduce, the same bytes as a row-parallel layer's (about
2·M·H·(w-1)/w elements sent per rank), against an all-to-all's M·H·(w-1)/w each way with
duplicated top-k tokens; docs/decisions.md weighs the two.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, ShardMisaligned
from fp8dispatch.nn.experts import Fp8Experts
from fp8dispatch.nn.parallel import resolve_group

_EXPERT = re.compile(r"experts\.(\d+)\.")


def expert_range(num_experts: int, world: int, rank: int) -> tuple[int, int]:
    if num_experts % world:
        fits = [w for w in range(1, num_experts + 1) if num_experts % w == 0]
        raise ShardMisaligned(f"num_experts: {num_experts} experts cannot be split evenly over {world} ranks; "
                              f"world sizes that split them: {', '.join(map(str, fits))}")
    share = num_experts // world
    return rank * share, (rank + 1) * share


class Fp8ExpertParallel(nn.Module):
    """This rank's experts (`local`, an `Fp8Experts` of G/w experts) and the group that holds the rest.

    forward takes what `Fp8Experts` takes, for all G experts and on every rank: x `[M, H]` sorted by
    expert with `offsets [G + 1]`, or `[G, max_m, H]` with `masked_m [G]`. It returns every token's
    output on every rank.
    """

    def __init__(self, local: Fp8Experts, num_experts: int, mesh=None):
        super().__init__()
        if not isinstance(local, Fp8Experts):
            raise Fp8TypeError(f"local: expected an Fp8Experts, got {type(local).__name__}")
        self.group, self.rank, self.world = resolve_group(mesh)
        self.first, stop = expert_range(num_experts, self.world, self.rank)
        if local.num_experts != stop - self.first:
            raise Fp8ValueError(f"local: expected {stop - self.first} of {num_experts} experts on each of "
                                f"{self.world} ranks, got {local.num_experts}")
        self.num_experts, self.local = num_experts, local

    @classmethod
    def shard(cls, experts: Fp8Experts, mesh=None) -> Fp8ExpertParallel:
        """This rank's experts out of a whole `Fp8Experts` (every rank holds the same one)."""
        if not isinstance(experts, Fp8Experts):
            raise Fp8TypeError(f"experts: expected an Fp8Experts, got {type(experts).__name__}")
        _, rank, world = resolve_group(mesh)
        a, b = expert_range(experts.num_experts, world, rank)
        local = Fp8Experts(b - a, experts.hidden_size, experts.intermediate_size, recipe=experts.recipe,
                           dtype=experts.gate_up_weight.dtype, backend=experts.backend, device="meta")
        for name, buffer in experts.named_buffers():
            setattr(local, name, buffer[a:b].clone())
        return cls(local, experts.num_experts, mesh)

    @classmethod
    def from_deepseek(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "", *, num_experts: int,
                      mesh=None, backend: str = "auto", device=None) -> Fp8ExpertParallel:
        """Read only this rank's experts' tensors of a DeepSeek-V3 checkpoint (`Fp8Experts.from_deepseek`'s
        keys and checks, with the rank's experts renumbered from 0)."""
        _, rank, world = resolve_group(mesh)
        a, b = expert_range(num_experts, world, rank)
        local = Fp8Experts.from_deepseek(_Renumbered(tensors, prefix, a, b), prefix, num_experts=b - a,
                                         backend=backend, device=device)
        return cls(local, num_experts, mesh)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor | None = None, *,
                masked_m: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise Fp8ValueError("x: expert-parallel FP8 experts run inference only (their all-reduce carries "
                                "no gradient); run under torch.no_grad() or torch.inference_mode()")
        a, b = self.first, self.first + self.local.num_experts
        if masked_m is not None:
            out = torch.zeros(x.shape[:-1] + (self.local.hidden_size,), dtype=x.dtype, device=x.device)
            out[a:b] = self.local(x[a:b], masked_m=masked_m[a:b])
        else:
            if offsets is None or offsets.numel() != self.num_experts + 1:
                seen = None if offsets is None else tuple(offsets.shape)
                raise Fp8ValueError(f"offsets: expected [{self.num_experts + 1}] (all experts), got {seen}")
            start, stop = int(offsets[a]), int(offsets[b])
            out = torch.zeros(x.shape[:-1] + (self.local.hidden_size,), dtype=x.dtype, device=x.device)
            out[start:stop] = self.local(x[start:stop], offsets[a:b + 1] - offsets[a])
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.local.num_experts - 1} of {self.num_experts}, rank {self.rank} of {self.world}"


class _Renumbered(Mapping):
    """A checkpoint's keys for experts [a, b), renamed to 0..b-a-1; other experts are hidden."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, a: int, b: int):
        self._base, self._names = tensors, {}
        for key in tensors:
            match = _EXPERT.match(key[len(prefix):]) if key.startswith(prefix) else None
            if match and a <= int(match.group(1)) < b:
                local = f"{prefix}experts.{int(match.group(1)) - a}." + key[len(prefix) + match.end():]
                self._names[local] = key

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._base[self._names[key]]

    def __contains__(self, key) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
