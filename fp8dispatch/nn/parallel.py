"""Tensor parallelism for `Fp8Linear`: column- and row-parallel shards over a torch.distributed group.

A column-parallel layer holds the rows `[r·N/w, (r+1)·N/w)` of the weight `[N, K]` on rank r of w
and returns its slice of the output's last dimension; a row-parallel layer holds the columns
`[r·K/w, (r+1)·K/w)`, takes the matching slice of its input and sums the partial products over the
group. Pairing them as torch's tensor-parallel API does (`colwise` up, `rowwise` down) costs one
all-reduce per pair. The dequantization scales travel with the weight: a 128×128 scale block covers
128 rows and 128 columns, so a shard boundary must fall on a block boundary, and one that would not
is refused with the world sizes that do split the layer. The split is done explicitly with
`torch.distributed` collectives on plain tensors (docs/decisions.md says why not DTensor).
"""

from __future__ import annotations

import fnmatch
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from fp8dispatch import api
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, ShardMisaligned
from fp8dispatch.formats import HIGH_PRECISION
from fp8dispatch.nn.linear import Fp8Linear

STYLES = ("colwise", "rowwise", "colwise_gather")
_LISTED = 64  # world sizes named in a misalignment message


# --- the group ----------------------------------------------------------------------------------

def resolve_group(mesh=None) -> tuple[dist.ProcessGroup, int, int]:
    """(group, rank, world) of a 1-D DeviceMesh, a ProcessGroup, or the default group (None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise Fp8ValueError("mesh: torch.distributed is not initialized; call "
                            "torch.distributed.init_process_group first (torchrun does the rest)")
    from torch.distributed.device_mesh import DeviceMesh

    if mesh is None:
        group = dist.group.WORLD
    elif isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise Fp8ValueError(f"mesh: expected a 1-D DeviceMesh (the tensor-parallel dimension), got "
                                f"{mesh.ndim} dimensions {mesh.mesh_dim_names or tuple(mesh.shape)}; pass mesh['tp']")
        group = mesh.get_group()
    elif isinstance(mesh, dist.ProcessGroup):
        group = mesh
    else:
        raise Fp8TypeError(f"mesh: expected a 1-D DeviceMesh, a ProcessGroup or None, got {type(mesh).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise Fp8ValueError("mesh: this process is not a member of the group it was given")
    return group, rank, dist.get_world_size(group)


# --- where shards fall --------------------------------------------------------------------------

def splits(size: int, block: int, world: int) -> bool:
    """Whether `size` elements in scale blocks of `block` split evenly over `world` ranks on block
    boundaries. A block as large as the dimension (one scale for all of it) splits anywhere."""
    if size % world:
        return False
    return block >= size or (size // world) % block == 0


def shard_range(what: str, size: int, block: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share of a dimension; raises ShardMisaligned naming the world sizes that work."""
    if not splits(size, block, world):
        fits = [w for w in range(1, min(size, _LISTED) + 1) if splits(size, block, w)]
        unit = "one scale for all of it" if block >= size else f"{block}-wide scale blocks"
        raise ShardMisaligned(
            f"{what}: {size} cannot be split evenly over {world} ranks on {unit} (a shard boundary "
            f"would fall inside a block, which one scale covers); world sizes that split {what}={size}: "
            f"{', '.join(map(str, fits))}")
    share = size // world
    return rank * share, (rank + 1) * share


def scale_range(start: int, stop: int, block: int, size: int) -> tuple[int, int]:
    """The scale rows (or columns) that cover elements [start, stop): all of them when one covers everything."""
    return (0, 1) if block >= size else (start // block, stop // block)


def shard_bounds(style: str, n: int, k: int, block, world: int, rank: int, name: str = "weight"):
    """(dim, (start, stop) of the weight, (start, stop) of its scale) for one rank's shard."""
    if style not in STYLES:
        raise Fp8ValueError(f"{name}: expected a style among {', '.join(STYLES)}, got {style!r}")
    dim, size, b = (0, n, block[0]) if style != "rowwise" else (1, k, block[1])
    what = f"{name} N (output features)" if dim == 0 else f"{name} K (input features)"
    start, stop = shard_range(what, size, b, world, rank)
    return dim, (start, stop), scale_range(start, stop, b, size)


# --- the layers ---------------------------------------------------------------------------------

class _ParallelLinear(Fp8Linear):
    """An Fp8Linear holding one rank's shard; `in_features`/`out_features` are the shard's."""

    style = ""

    @classmethod
    def shard(cls, layer: Fp8Linear, mesh=None, **options) -> _ParallelLinear:
        """This rank's shard of a whole `Fp8Linear` (every rank holds the same layer)."""
        if not isinstance(layer, Fp8Linear) or isinstance(layer, _ParallelLinear):
            raise Fp8TypeError(f"layer: expected an Fp8Linear (convert nn.Linear first), got {type(layer).__name__}")
        group, rank, world = resolve_group(mesh)
        n, k = layer.out_features, layer.in_features
        dim, (a, b), (sa, sb) = shard_bounds(cls.style, n, k, layer.block, world, rank)
        weight = layer.weight.narrow(dim, a, b - a)
        scale = layer.weight_scale_inv.narrow(dim, sa, sb - sa)
        bias = layer.bias
        if bias is not None and dim == 0:
            bias = bias.detach()[a:b]
        return cls.from_local(weight, scale, bias, block=layer.block, full=(n, k), recipe=layer.recipe,
                              backend=layer.backend, mesh=mesh, **options)

    @classmethod
    def from_local(cls, weight, scale, bias=None, *, block, full: tuple[int, int], recipe: str, backend="auto",
                   mesh=None, **options) -> _ParallelLinear:
        """Wrap an already-sliced shard (what checkpoint loading reads) with its group.

        `recipe` is the whole layer's: a shard's shape alone can read differently (a [N, 128] shard
        of 128×128 blocks has one K block, which reads as per-row scales).
        """
        group, rank, world = resolve_group(mesh)
        local = (min(block[0], weight.shape[0]), min(block[1], weight.shape[1]))
        layer = cls.from_fp8(weight.contiguous(), scale.contiguous(), bias, block=local, backend=backend,
                             recipe=recipe)
        layer.group, layer.rank, layer.world = group, rank, world
        layer.full_out_features, layer.full_in_features = full
        layer._configure(**options)
        return layer

    def _configure(self) -> None:
        pass

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled() and x.requires_grad:
            raise Fp8ValueError(f"x: tensor-parallel FP8 layers run inference only (their collectives carry no "
                                f"gradient); run under torch.no_grad() or torch.inference_mode()")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, {self.style} shard {self.rank} of {self.world} of "
                f"[{self.full_out_features}, {self.full_in_features}]")


class Fp8ColwiseLinear(_ParallelLinear):
    """Column-parallel: input replicated, output sharded along its last dimension (or gathered)."""

    style = "colwise"

    def _configure(self, gather_output: bool = False) -> None:
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = super().forward(x)
        if not self.gather_output:
            return y
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class Fp8RowwiseLinear(_ParallelLinear):
    """Row-parallel: input sharded along its last dimension, output summed over the group.

    The output has x's dtype, as `Fp8Linear`'s does. The partial products are summed in that dtype,
    or, with `reduce_dtype=torch.float32`, in fp32 and rounded once; the bias is added once, after
    the sum.
    """

    style = "rowwise"

    def _configure(self, reduce_dtype: torch.dtype | None = None) -> None:
        if reduce_dtype is not None and reduce_dtype not in HIGH_PRECISION:
            raise Fp8TypeError(f"reduce_dtype: expected None (the output dtype) or torch.float32, got {reduce_dtype}")
        self.reduce_dtype = reduce_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.shape[-1] != self.in_features:
            raise Fp8ValueError(f"x: expected this rank's {self.in_features} of {self.full_in_features} input "
                                f"features (the output of a colwise layer), got last dimension {x.shape[-1]}")
        out_dtype = x.dtype if x.dtype in HIGH_PRECISION else torch.bfloat16
        partial = api.linear(x, self.fp8_weight(), None, recipe=self.recipe, backend=self.backend,
                             out_dtype=self.reduce_dtype or out_dtype)
        dist.all_reduce(partial, group=self.group)
        if self.bias is not None:
            partial = partial + self.bias.to(partial.dtype)
        return partial.to(out_dtype)


LAYERS = {"colwise": Fp8ColwiseLinear, "colwise_gather": Fp8ColwiseLinear, "rowwise": Fp8RowwiseLinear}


def layer_options(style: str, reduce_dtype) -> dict:
    if style == "rowwise":
        return {"reduce_dtype": reduce_dtype}
    return {"gather_output": style == "colwise_gather"}


# --- a model ------------------------------------------------------------------------------------

def resolve_plan(model: nn.Module, plan: Mapping[str, str]) -> dict[str, str]:
    """{module name: style} from a plan whose keys are names or fnmatch patterns ("layers.*.mlp.up_proj")."""
    if not isinstance(plan, Mapping):
        raise Fp8TypeError(f"plan: expected a mapping of module names to styles, got {type(plan).__name__}")
    names = [n for n, _ in model.named_modules() if n]
    chosen: dict[str, str] = {}
    for pattern, style in plan.items():
        if style not in STYLES:
            raise Fp8ValueError(f"plan[{pattern!r}]: expected one of {', '.join(STYLES)}, got {style!r}")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise Fp8ValueError(f"plan[{pattern!r}]: matches no module of the model")
        for n in hits:
            if chosen.get(n, style) != style:
                raise Fp8ValueError(f"plan: {n} is both {chosen[n]} and {style}")
            chosen[n] = style
    return chosen


def parallelize(model: nn.Module, plan: Mapping[str, str], mesh=None, *,
                reduce_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Shard the model's `Fp8Linear` layers named by `plan` in place over the mesh; returns {name: style}.

    `plan` is torch's tensor-parallel plan with styles as strings: `{"mlp.gate_proj": "colwise",
    "mlp.down_proj": "rowwise"}` ("colwise_gather" also gathers the output). Every layer is checked
    before any is replaced: a layer that is not an `Fp8Linear`, or a split through a scale block,
    raises and leaves the model as it was. Modules that use a sharded output (attention reading a
    head count) must be told their local size; this function changes only the linear layers.
    """
    group, rank, world = resolve_group(mesh)
    chosen = resolve_plan(model, plan)
    shards = {}
    for name, style in chosen.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, Fp8Linear) or isinstance(layer, _ParallelLinear):
            raise Fp8TypeError(f"plan[{name!r}]: expected an Fp8Linear (run fp8dispatch.nn.convert or "
                               f"load_fp8_checkpoint first), got {type(layer).__name__}")
        try:
            shards[name] = LAYERS[style].shard(layer, mesh, **layer_options(style, reduce_dtype))
        except (Fp8ValueError, Fp8TypeError) as e:
            raise type(e)(f"{name}.{e}") from None
    for name, shard in shards.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, shard)
    return chosen
