"""Load a DeepSeek-V3 FP8 checkpoint straight into tensor-parallel shards: each rank reads its slice.

`load_fp8_checkpoint_sharded` reads, for every layer the plan names, only this rank's rows (colwise)
or columns (rowwise) of `weight` and the matching scale rows or columns of `weight_scale_inv`,
through safetensors' `get_slice`, so no rank ever holds a whole sharded weight. Everything else goes
through `load_fp8_checkpoint` and its all-or-nothing checks, which see the slices as the tensors.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from fp8dispatch.blocks import scale_shape
from fp8dispatch.errors import Fp8DispatchError, Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import is_fp8
from fp8dispatch.nn.checkpoint import SCALE_SUFFIX, LoadReport, _Lazy, _open, load_fp8_checkpoint
from fp8dispatch.nn.linear import Fp8Linear
from fp8dispatch.nn.parallel import LAYERS, layer_options, resolve_group, resolve_plan, shard_bounds


def load_fp8_checkpoint_sharded(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                                plan: Mapping[str, str], mesh=None, *, block_size: tuple[int, int] = (128, 128),
                                backend: str = "auto", device=None, strict: bool = True,
                                reduce_dtype: torch.dtype | None = None) -> LoadReport:
    """`load_fp8_checkpoint`, with the layers `plan` names loaded as this rank's shards.

    `model` holds `nn.Linear` (or `Fp8Linear`) layers of the full shapes, typically on the meta
    device; `plan` is as for `parallelize`. A planned layer must be FP8 in the checkpoint, and its
    split must fall on scale-block boundaries; these checks read only headers and are the same on
    every rank. If any rank fails (a bad scale in its slice), every rank raises, naming it.
    """
    group, rank, world = resolve_group(mesh)
    tensors = _open(checkpoint)
    keys = set(tensors)  # `in` on the mapping itself would read the tensor
    block = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    chosen = resolve_plan(model, plan)
    slices, full = {}, {}
    for name, style in chosen.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear | Fp8Linear):
            raise Fp8TypeError(f"plan[{name!r}]: expected a linear layer, got {type(module).__name__}")
        weight_key, scale_key = name + ".weight", name + SCALE_SUFFIX
        if weight_key not in keys or scale_key not in keys:
            raise Fp8ValueError(f"plan[{name!r}]: the checkpoint holds no FP8 weight with scales for it "
                                f"({weight_key} and {scale_key}); only FP8 layers shard")
        n, k = _shape(tensors, weight_key)
        if (n, k) != (module.out_features, module.in_features):
            raise Fp8ValueError(f"{weight_key}: expected [{module.out_features}, {module.in_features}] "
                                f"for the model's layer, got [{n}, {k}]")
        if _shape(tensors, scale_key) != scale_shape((n, k), block):
            raise Fp8ValueError(f"{scale_key}: expected shape {scale_shape((n, k), block)} for {block} blocks "
                                f"of [{n}, {k}], got {_shape(tensors, scale_key)}")
        dim, rows, scale_rows = shard_bounds(style, n, k, block, world, rank, name=weight_key)
        slices[weight_key], slices[scale_key] = (dim, rows), (dim, scale_rows)
        if dim == 0 and name + ".bias" in keys:
            slices[name + ".bias"] = (0, rows)
        full[name] = (n, k)
    shards = _Sliced(tensors, slices)
    originals = {name: model.get_submodule(name) for name in chosen}
    for name in chosen:  # the loader checks shapes against the model: show it the shard's
        _set(model, name, _local_linear(originals[name], chosen[name], full[name], world))
    failure = None
    try:
        report = load_fp8_checkpoint(model, shards, block_size=block, backend=backend, device=device, strict=strict)
    except Fp8DispatchError as e:
        failure = e
    failures = [None] * world
    dist.all_gather_object(failures, None if failure is None else f"{type(failure).__name__}: {failure}", group=group)
    if failure is not None or any(failures):
        for name, module in originals.items():
            _set(model, name, module)
        if failure is not None:
            raise failure
        who = next(r for r, f in enumerate(failures) if f)
        raise Fp8ValueError(f"checkpoint: rank {who} could not load its shard ({failures[who]}); the model on "
                            f"this rank holds whatever else loaded, reload it")
    for name, style in chosen.items():
        layer = model.get_submodule(name)
        _set(model, name, LAYERS[style].from_local(
            layer.weight, layer.weight_scale_inv, None if layer.bias is None else layer.bias.detach(),
            block=block, full=full[name], recipe="block", backend=backend, mesh=mesh, **layer_options(style, reduce_dtype)))
    return report


def _shape(tensors, key: str) -> tuple[int, ...]:
    if isinstance(tensors, _Lazy):
        handle, _ = tensors._where[key]
        return tuple(handle.get_slice(key).get_shape())
    return tuple(tensors[key].shape)


def _local_linear(module: nn.Module, style: str, full: tuple[int, int], world: int) -> nn.Linear:
    n, k = full
    n, k = (n // world, k) if style != "rowwise" else (n, k // world)
    return nn.Linear(k, n, bias=getattr(module, "bias", None) is not None, device="meta")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class _Sliced(_Lazy):
    """The checkpoint's tensors, with the planned layers' tensors cut to this rank's slice on read."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], slices: dict[str, tuple[int, tuple[int, int]]]):
        self._base, self._slices = tensors, slices
        self._where = tensors._where if isinstance(tensors, _Lazy) else None
        self._keys = set(tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._slices:
            return self._base[key]
        dim, (a, b) = self._slices[key]
        if self._where is None:
            return self._base[key].narrow(dim, a, b - a).contiguous()
        handle, _ = self._where[key]
        part = handle.get_slice(key)
        return part[a:b] if dim == 0 else part[:, a:b]

    def dtype_name(self, key: str) -> str:
        if self._where is None:
            return "F8" if is_fp8(self._base[key].dtype) else str(self._base[key].dtype)
        return self._base.dtype_name(key)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)
