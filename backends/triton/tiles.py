"""Tile sizes and warp counts shared by the memory-bound kernels (quantize, dequantize)."""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from .interpreter import active as interpreting

# Elements per program on a GPU: 8192 bf16 values (16 KB) per program keeps enough loads in flight
# per SM at 4 to 8 resident programs; measured on the H100 (docs/triton.md, quantize sweep).
GPU_TILE = 8192
# The interpreter costs about 2 ms per program instance whatever its size, so CPU runs use big tiles.
INTERPRETER_TILE = 65536


def TILE() -> int:  # noqa: N802 - reads like the constant it stands for
    return INTERPRETER_TILE if interpreting() else GPU_TILE


# The two-sweep 1×g kernel (rows wider than a tile, or not a power of two): rows per program,
# columns per step, warps, cache hints, unroll (0: the compiler's choice). Measured on the H100
# (docs/results/h100/quantize-variants.md, 4096×7168 bf16 rows): one row, 1024 columns per step over
# 8 warps reads 0.81 of a bf16 copy's bandwidth, against 0.68 at 4 warps and 0.65 for the padded
# one-pass tile; more rows per program or wider steps were slower.
WIDE_BLOCK_R = 1
WIDE_CHUNK = 1024
WIDE_WARPS = 8
WIDE_EVICT = False
WIDE_UNROLL = 0


def wide_groups_plan(rows: int, group: int) -> dict:
    """block_r, chunk, num_warps, evict and unroll for `_wide_groups_kernel` on groups `group` wide."""
    chunk = min(WIDE_CHUNK, next_pow2(group))
    if interpreting():  # few, large programs: the interpreter pays per program and per step
        block_r = min(next_pow2(rows), max(1, INTERPRETER_TILE // (8 * chunk)))
        return dict(block_r=block_r, chunk=chunk, num_warps=1, evict=False, unroll=0)
    return dict(block_r=WIDE_BLOCK_R, chunk=chunk, num_warps=max(1, min(WIDE_WARPS, chunk // 128)),
                evict=WIDE_EVICT, unroll=WIDE_UNROLL)


def next_pow2(n: int) -> int:
    """The next power of two ≥ n (≥ 1), in plain Python: `triton.next_power_of_2` is a
    constexpr function whose host-side call costs several microseconds."""
    return 1 << (max(n, 1) - 1).bit_length()


def num_warps_for(elements: int) -> int:
    """About 32 fp32 values per thread: 4 warps for 4096 elements, 16 at most."""
    return max(1, min(16, elements // 1024))


@cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` when programs walk GROUP_M row tiles per column
    tile: consecutive programs share a column tile of b, which then stays in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m
