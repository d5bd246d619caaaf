"""The block model: every granularity is a block shape over a 2-D [rows, cols] view.

Importing it imports no torch, so the command line's `--help` can quote GRANULARITIES and RECIPES.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fp8dispatch.errors import Fp8TypeError, Fp8ValueError

if TYPE_CHECKING:
    import torch

GRANULARITIES = ("tensor", "row", "group", "block")
RECIPES = ("block", "row", "tensor")

Block = tuple[int, int]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_for(granularity: str, rows: int, cols: int, block_size: int | Block = 128) -> Block:
    """The block shape of a granularity on a [rows, cols] tensor.

    An empty dimension still gets a block of at least 1, so scale shapes stay defined.
    """
    rows, cols = max(rows, 1), max(cols, 1)
    if granularity == "tensor":
        return (rows, cols)
    if granularity == "row":
        return (1, cols)
    if granularity == "group":
        size = block_size[1] if isinstance(block_size, tuple) else block_size
        return (1, _positive("block_size", size))
    if granularity == "block":
        if isinstance(block_size, tuple):
            if len(block_size) != 2:
                raise Fp8ValueError(f"block_size: expected an int or a (rows, cols) pair, got {block_size!r}")
            return (_positive("block_size", block_size[0]), _positive("block_size", block_size[1]))
        size = _positive("block_size", block_size)
        return (size, size)
    raise Fp8ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def recipe_blocks(recipe: str, m: int, k: int, n: int, group: int = 128) -> tuple[Block, Block]:
    """The blocks of `a [M, K]` and `b [K, N]` under a named recipe: the table of DESIGN.md.

    block: a in 1×group groups, b in group×group blocks (DeepSeek-V3 when group is 128); row: one
    scale per row of a and per column of b; tensor: one scale each. Empty dimensions count as 1.
    """
    m, k, n = max(m, 1), max(k, 1), max(n, 1)
    if recipe == "block":
        return (1, group), (group, group)
    if recipe == "row":
        return (1, k), (k, 1)
    if recipe == "tensor":
        return (m, k), (k, n)
    raise Fp8ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Fp8TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise Fp8ValueError(f"{name}: expected a positive int, got {value}")
    return value


def scale_shape(shape: tuple[int, int], block: Block) -> tuple[int, int]:
    return (cdiv(shape[0], block[0]), cdiv(shape[1], block[1]))


def granularity_of(block: Block, shape: tuple[int, int]) -> str:
    """Name the granularity a block has on a tensor of this shape ("col" for a [K, N] per-column)."""
    rows, cols = shape
    if block[0] >= rows and block[1] >= cols:
        return "tensor"
    if block[0] == 1:
        return "row" if block[1] >= cols else "group"
    if block[1] == 1 and block[0] >= rows:
        return "col"
    return "block"


def expand_scale(scale: torch.Tensor, block: Block, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a [rows/br, cols/bc] scale to one value per element of `shape`; tails are cut."""
    rows, cols = shape
    if scale.shape == (1, 1):
        return scale.expand(rows, cols)
    groups_r, groups_c = scale.shape
    tiled = scale[:, None, :, None].expand(groups_r, block[0], groups_c, block[1])
    return tiled.reshape(groups_r * block[0], groups_c * block[1])[:rows, :cols]


def blockwise_amax(x: torch.Tensor, block: Block) -> torch.Tensor:
    """amax of |x| per block over finite values; a partial tail block is padded with zeros."""
    import torch

    magnitude = torch.where(torch.isfinite(x), x.abs(), 0.0)
    rows, cols = x.shape
    br, bc = min(block[0], rows), min(block[1], cols)
    gr, gc = cdiv(rows, br), cdiv(cols, bc)
    magnitude = torch.nn.functional.pad(magnitude, (0, gc * bc - cols, 0, gr * br - rows))
    return magnitude.view(gr, br, gc, bc).amax(dim=(1, 3))
