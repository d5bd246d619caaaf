"""Scaled FP8 matmul: the block recipe (a in 1×g groups, b in g×g' blocks), rowwise and tensorwise.

`c [M, N] = a [M, K] @ b [K, N]` with both operands K-contiguous: a row-major, b the `.t()` of a
[N, K] weight. The K loop steps BLOCK_K at a time, BLOCK_K dividing the scale group g (128 for
DeepSeek), so each step sees one a scale per row and one b scale per column:

    acc += dot(a_tile, b_tile) * (sa[m, k // g] * sb[k // g, n // g'])   (block recipe)
    acc  = dot(a_tile, b_tile, acc); c = acc * sa[m] * sb[n]              (row, tensor)

accumulating in fp32, then bias and the cast to bf16/fp16/fp32. Scales are gathered through
their strides, so per-row, per-column and tensorwise (stride 0 after the index division) share
one kernel. Tails in M and N wrap (`% M`) on load and are masked on store; a K tail is masked.

On Hopper, the block recipe above SMALL_M rows goes to `hopper.py`'s warp-specialized Gluon kernel
instead, which overlaps the promotion with the tensor cores; this kernel serves everything else
(and every GPU from sm89 on, and the interpreter).

Small M (decode, M ≤ SMALL_M) swaps the operands: the tensor cores' wgmma needs 64 rows on the
M side but takes 8 to 256 on the N side, so computing c.T = b.T @ a.T puts the weight's N on the
64-row side and the few tokens on the narrow one instead of padding 1 token to 64 rows.

A decode GEMM with few output tiles (N = 576 at BLOCK_N = 64 is 9 programs on 132 SMs) leaves most
of the GPU idle while each program streams its slice of the weight alone. SPLIT_K programs then
share each tile's K loop: program s walks its own contiguous run of K steps and writes its fp32
sum to a scratch [SPLIT_K, M, N]; `_sum_splits_kernel` adds the SPLIT_K partial sums in a fixed
order (deterministic, unlike atomics), adds the bias and casts. The block recipe's scales apply per
K step, so each partial sum is already scaled; rowwise and tensorwise scale each partial sum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from fp8dispatch.blocks import cdiv
from fp8dispatch.problem import device_capability

from .interpreter import active as interpreting
from .launch import Launcher, build_failed, static_key, tracing
from .tiles import grouped_tile, hint, next_pow2, sm_count

# Up to this M the swapped kernel runs (its narrow side is 16 to 64 wide).
SMALL_M = 64


@triton.jit
def _load_k_step(ptrs, k_mask, EVEN_K: tl.constexpr):
    """A K step of an operand; only a K tail needs the mask (M and N tails wrap instead)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_mask, other=0.0)


@triton.jit
def _on_m(v, SWAP: tl.constexpr):
    """A vector over the tile's M side, broadcast against the accumulator (whose rows are M, or N
    when swapped)."""
    # if/else, not an early return: the compiler (not the interpreter) types every return it sees,
    # and the two shapes differ.
    if SWAP:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _on_n(v, SWAP: tl.constexpr):
    if SWAP:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _scaled_mm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    a_rows_per_scale,  # 1 for groups and rows; a tensorwise scale has M, so every row reads index 0
    b_cols_per_scale,  # g' of b's g×g' blocks; 1 per column; N tensorwise
    SCALE_K: tl.constexpr,  # the K width of a scale group; 0 when no scale varies along K
    B_TILE_SCALE: tl.constexpr,  # BLOCK_N divides g': one b scale per tile and K group, a scalar
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per tile (the narrow side when swapped)
    BLOCK_N: tl.constexpr,  # output features per tile (the tensor cores' 64-row side when swapped)
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # programs walk GROUP_M row tiles per column tile, so b tiles stay in L2
    SWAP: tl.constexpr,  # compute c.T = b.T @ a.T tile by tile (small M); a 2-D grid (N tiles, M tiles)
    SPLIT_K: tl.constexpr,  # programs per tile along K (grid axis 2); above 1, c is the fp32 scratch
):
    if SWAP:
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    else:
        pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, rn = offs_m % M, offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    # The left operand x [rows, BLOCK_K] and the right one y [BLOCK_K, cols] of each K step's dot.
    if SWAP:
        x_ptrs = b_ptr + rn[:, None] * stride_bn + offs_k[None, :] * stride_bk
        y_ptrs = a_ptr + offs_k[:, None] * stride_ak + rm[None, :] * stride_am
        x_step, y_step = BLOCK_K * stride_bk, BLOCK_K * stride_ak
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
        y_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
        x_step, y_step = BLOCK_K * stride_ak, BLOCK_K * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sa_ptrs = sa_ptr + (rm // a_rows_per_scale) * stride_sam
    sb_ptrs = sb_ptr + (rn // b_cols_per_scale) * stride_sbn

    sb_tile_ptr = sb_ptr + (pid_n * BLOCK_N // b_cols_per_scale) * stride_sbn

    steps = tl.cdiv(K, BLOCK_K)
    first = 0
    if SPLIT_K > 1:  # this program's run of K steps (maybe none); its sum goes to slice pid_k of the scratch
        per_split = tl.cdiv(steps, SPLIT_K)
        first = tl.program_id(2) * per_split
        steps = tl.minimum(per_split, steps - first)
        x_ptrs += first * x_step
        y_ptrs += first * y_step
        c_ptr += tl.program_id(2) * M * N
    for step in range(0, steps):  # from 0: the software pipeliner's canonical loop
        k = first + step
        k_left = K - k * BLOCK_K
        x = _load_k_step(x_ptrs, offs_k[None, :] < k_left, EVEN_K)
        y = _load_k_step(y_ptrs, offs_k[:, None] < k_left, EVEN_K)
        if SCALE_K > 0:
            group = (k * BLOCK_K) // SCALE_K
            sa = tl.load(sa_ptrs + group * stride_sak)
            if B_TILE_SCALE:  # one multiply per element per K step instead of two
                acc += tl.dot(x, y) * _on_m(sa * tl.load(sb_tile_ptr + group * stride_sbk), SWAP)
            else:
                acc += tl.dot(x, y) * (_on_m(sa, SWAP) * _on_n(tl.load(sb_ptrs + group * stride_sbk), SWAP))
        else:
            acc = tl.dot(x, y, acc)
        x_ptrs += x_step
        y_ptrs += y_step
    if SCALE_K == 0:
        acc = acc * (_on_m(tl.load(sa_ptrs), SWAP) * _on_n(tl.load(sb_ptrs), SWAP))
    if HAS_BIAS:
        acc += _on_n(tl.load(bias_ptr + rn).to(tl.float32), SWAP)
    mask = _on_m(offs_m < M, SWAP) & _on_n(offs_n < N, SWAP)
    c_ptrs = c_ptr + _on_m(offs_m, SWAP) * stride_cm + _on_n(offs_n, SWAP) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(
    c_ptr,  # contiguous [M, N]
    parts_ptr,  # fp32 [SPLIT_K, M, N], contiguous: the split programs' partial sums
    bias_ptr,
    MN, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(parts_ptr + offs, mask=mask)
    for s in tl.static_range(1, SPLIT_K):  # always this order: the same bits on every run
        acc += tl.load(parts_ptr + s * MN + offs, mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


SUM_BLOCK = 1024  # outputs per program of `_sum_splits_kernel`; M·N ≤ 64 × 32768 at decode


# --- configurations -------------------------------------------------------------------------


def _config(bm, bn, stages, warps, group_m=8, **extra):
    kwargs = dict(BLOCK_M=bm, BLOCK_N=bn, **extra)
    if group_m is not None:
        kwargs["GROUP_M"] = group_m
    return triton.Config(kwargs, num_stages=stages, num_warps=warps)


# Hopper (sm90, 228 KB shared memory, 64K registers per SM). A 128×128×128 fp8 stage is 32 KB.
# The block recipe keeps two fp32 tiles live (the dot's and the running sum): 178 registers a
# thread at 128×128 and 8 warps (ptxas), so one program per SM; 64×128 at 4 warps leaves room for
# two or three, whose scale FMAs can overlap each other's tensor-core work. Measured choices in
# docs/triton.md.
HOPPER_CONFIGS = [
    _config(128, 128, 3, 8),
    _config(128, 128, 4, 8),
    _config(64, 128, 3, 4),
    _config(64, 128, 4, 4),
    _config(128, 64, 4, 4),
    # Rowwise and tensorwise keep one accumulator (128 registers a thread at 128×128), so the
    # 256-wide tiles fit there.
    _config(128, 256, 3, 8),
    _config(128, 256, 4, 8),
    _config(256, 128, 3, 8),
]
HOPPER_SWAP_CONFIGS = [
    _config(bm, bn, stages, warps, group_m=None)
    for bm in (16, 32, 64) for bn, stages, warps in ((64, 6, 4), (128, 5, 4), (128, 4, 8))
]
# sm89 (Ada, 100 KB of shared memory per block): 3 stages of 64×128×128 = 72 KB; untuned.
DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_stages=3, num_warps=4)
DEFAULT_SWAP_CONFIG = dict(BLOCK_N=64, num_stages=3, num_warps=4)
# The interpreter costs about 2 ms per program whatever its size: big tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8)


def _wide(config) -> bool:
    return max(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) > 128


def block_k_for(scale_k: int) -> int:
    """The K step: 128, or the largest power of two dividing the scale group g (g % 32 == 0)."""
    if scale_k == 0:
        return 128
    return min(128, scale_k & -scale_k)


_launcher = Launcher(_scaled_mm_kernel, tensors=6)
_sum_launcher = Launcher(_sum_splits_kernel, tensors=3)

# Chosen configurations, per (device, shape bucket, dtypes, flags): filled by timing the
# candidates on a problem's first call (about a second), then one dict lookup per call. Triton's
# own @autotune wrapper adds Python work to every launch (docs/triton.md has the host costs).
_chosen: dict[tuple, dict] = {}


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that its shapes, strides, blocks and dtypes decide."""

    launcher: Launcher
    grid: tuple
    ints: tuple  # the integer arguments after the six tensors
    constexprs: dict
    options: dict
    static: tuple  # the launcher's key for all of the above
    split: int = 1  # SPLIT_K; above 1 a second launch sums the partial sums (and adds the bias)

    def launch(self, da, db, c, sa, sb, bias) -> None:
        if self.split == 1:
            self.launcher(self.grid, (da, db, c, sa, sb, sa if bias is None else bias, *self.ints), self.constexprs,
                          self.options, self.static)
            return
        m, n = c.shape
        parts = torch.empty((self.split, m, n), dtype=torch.float32, device=c.device)
        self.launcher(self.grid, (da, db, parts, sa, sb, sa, *self.ints), self.constexprs, self.options, self.static)
        _sum_launcher((cdiv(m * n, SUM_BLOCK),), (c, parts, parts if bias is None else bias, m * n, n),
                      dict(SPLIT_K=self.split, HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK), {})


_plans: dict[tuple, _Plan] = {}


def matmul(a, b, out_dtype, bias=None, config: dict | None = None):
    """The backend's matmul. `config` forces one configuration of the portable kernel (benchmarks
    sweep with it; "tuned" is the portable kernel's own choice, to compare it with Hopper's)."""
    da, db, sa, sb = a.data, b.data, a.scale, b.scale
    traced = tracing(da)  # under torch.compile (the portable kernel only: plans send Hopper's calls elsewhere)
    key = (da.shape, db.shape, da.stride(), db.stride(), sa.stride(), sb.stride(), a.block, b.block,
           da.dtype, db.dtype, out_dtype, bias is None, da.device)
    plan = _plans.get(key) if config is None and not traced else None
    if plan is None and config is None and not traced and _hopper_kernel(a, b, out_dtype, bias):
        try:
            c = _hopper_module().matmul(a, b, out_dtype, bias)  # compiles on a key's first call
        except Exception as e:  # noqa: BLE001 - re-raised unless this Triton cannot build the kernel
            if not build_failed(e):
                raise
            _hopper_unavailable.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _log.warning("triton: the Hopper block-scaled kernel failed to compile on this Triton (%s); "
                         "the portable kernel serves instead", _hopper_unavailable[0])
        else:
            _plans[key] = _hopper_module().matmul
            return c
    if callable(plan):
        return plan(a, b, out_dtype, bias)
    c = torch.empty((da.shape[0], db.shape[1]), dtype=out_dtype, device=da.device)
    tensors = (da, db, c, sa, sb, bias)
    if plan is None:
        plan = _plan(a, b, c, tensors, out_dtype, bias is not None, config)
        if config is None and not traced:
            _plans[key] = plan
    plan.launch(*tensors)
    return c


def _hopper_kernel(a, b, out_dtype, bias) -> bool:
    """Whether the warp-specialized Gluon kernel (`hopper.py`) takes this call: the block recipe on
    sm90 above SMALL_M rows, with TMA-friendly layouts. Measured on the DeepSeek-V3 shapes
    (docs/triton.md): 1.02–1.26× FBGEMM's groupwise GEMM and 1.2–1.8× this module's kernel at
    M=4096, 1.1–1.4× this module's kernel at M=512, 0.94× at M=128 (one shape measured there)."""
    if (interpreting() or a.data.shape[0] <= SMALL_M or _hopper_unavailable
            or device_capability(a.data.device) != (9, 0)):
        return False
    hopper = _hopper_module()
    return hopper is not None and hopper.why_not(a, b, out_dtype, bias) is None


# Why the Hopper kernel cannot be built here, once a compile has failed (then never tried again).
_hopper_unavailable: list[str] = []
_log = logging.getLogger("fp8dispatch")


@cache
def _hopper_module():
    """`hopper.py`, or None where this Triton has no Gluon warp specialization for Hopper."""
    try:
        from . import hopper
    except (ImportError, AttributeError):
        return None
    return hopper


def _plan(a, b, c, tensors, out_dtype, has_bias: bool, config) -> _Plan:
    """Choose the kernel and its configuration (timing the candidates once on Hopper)."""
    m, k = a.data.shape
    n = b.data.shape[1]
    scale_k = a.block[1] if a.block[1] < k else 0  # recipe_of: "block" iff a's groups split K
    block_k = block_k_for(scale_k)
    sa, sb = a.scale, b.scale
    ints = (m, n, k, a.data.stride(0), a.data.stride(1), b.data.stride(0), b.data.stride(1), c.stride(0),
            c.stride(1), sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), a.block[0], b.block[1])
    flags = dict(SCALE_K=scale_k, HAS_BIAS=has_bias, EVEN_K=k % block_k == 0, BLOCK_K=block_k)
    swap = bool(m <= SMALL_M)  # a guard when m is symbolic (the plan keeps m in one bucket)

    def make(config) -> _Plan:
        constexprs = dict(config)
        options = {name: constexprs.pop(name) for name in ("num_warps", "num_stages") if name in constexprs}
        if swap:
            constexprs["GROUP_M"] = 1  # the swapped grid is 2-D: no grouping
            constexprs.setdefault("BLOCK_M", _narrow(m))
        constexprs["SWAP"] = swap
        constexprs["B_TILE_SCALE"] = b.block[1] % constexprs["BLOCK_N"] == 0
        constexprs.setdefault("SPLIT_K", 1)
        constexprs = {**flags, **constexprs}
        if constexprs["SPLIT_K"] > 1:
            constexprs["HAS_BIAS"] = False  # the sum adds it, once
        return _Plan(_launcher, _grid(m, n, swap, constexprs), ints, constexprs, options,
                     static_key(ints, constexprs, options), constexprs["SPLIT_K"])

    def launch(config):
        make(config).launch(*tensors)

    if config is None:
        config = _default_config(a.data.device, swap)
    if config == "tuned":
        key = (a.data.device, swap, next_pow2(m), n, k, a.block[0] == 1, b.block[1], a.dtype,
               b.dtype, out_dtype, has_bias, flags["EVEN_K"], scale_k)
        config = _chosen.get(key)
        if config is None and tracing(a.data):  # tune on real operands of the traced shapes, as eager would
            _tune_real(a, b, out_dtype, has_bias)
            config = _chosen[key]
        if config is None:
            config = _chosen[key] = _tune(launch, _candidates(m, n, k, swap, scale_k, a.data.device))
    return make(config)


def _tune_real(a, b, out_dtype, has_bias: bool) -> None:
    """Run the tuning `_plan` does on a first eager call, on random operands shaped like traced ones."""
    from torch.utils._python_dispatch import _disable_current_modes

    def real(t):
        size, stride = [hint(d) for d in t.shape], [hint(d) for d in t.stride()]
        out = torch.empty_strided(size, stride, dtype=t.dtype, device=t.device)
        return out.copy_(torch.randn(size, device=t.device).to(t.dtype)) if t.dtype != torch.float32 else out.fill_(1.0)

    with _disable_current_modes():
        ra = type(a)._trusted(real(a.data), real(a.scale), a.block)
        rb = type(b)._trusted(real(b.data), real(b.scale), b.block)
        bias = torch.zeros(hint(b.data.shape[1]), dtype=out_dtype, device=ra.data.device) if has_bias else None
        matmul(ra, rb, out_dtype, bias, config="tuned")


def _narrow(m: int) -> int:
    """The swapped kernel's token side: the smallest of 16, 32, 64 that holds M (wgmma's N ≥ 8)."""
    return max(16, min(64, next_pow2(m)))


def _kwargs(config: triton.Config) -> dict:
    return dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)


def _candidates(m: int, n: int, k: int, swap: bool, scale_k: int, device) -> list[dict]:
    if swap:
        return [dict(_kwargs(c), SPLIT_K=split) for c in HOPPER_SWAP_CONFIGS if c.kwargs["BLOCK_M"] == _narrow(m)
                for split in _splits(cdiv(n, c.kwargs["BLOCK_N"]), cdiv(k, block_k_for(scale_k)), sm_count(device))]
    return [_kwargs(c) for c in HOPPER_CONFIGS if not (scale_k and _wide(c))]


def _splits(tiles: int, steps: int, sms: int) -> list[int]:
    """SPLIT_K values worth timing: 1, and the powers of two that bring `tiles` programs up to at
    most two per SM while each split keeps at least MIN_SPLIT_STEPS K steps."""
    splits, split = [1], 2
    while tiles * split <= 2 * sms and steps // split >= MIN_SPLIT_STEPS:
        splits.append(split)
        split *= 2
    return splits


MIN_SPLIT_STEPS = 4  # K steps per split: at least the software pipeline's depth (4-6 stages)
# A split adds a launch: 5-8 µs of host time on H200 hosts (docs/results/h200/host-layers.md),
# which a host-bound eager decode step pays in full. A split is kept only if it saves more GPU time.
SPLIT_COST_MS = 0.005


def _tune(launch, candidates: list[dict]) -> dict:
    """Time each candidate (5 ms warm-up, 20 ms of runs: enough to separate 3% differences)."""
    best, best_ms = None, float("inf")
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
        except triton.runtime.errors.OutOfResources:
            continue
        ms += SPLIT_COST_MS if config.get("SPLIT_K", 1) > 1 else 0.0
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def _grid(m, n, swap, config):
    if swap:
        return (cdiv(n, config["BLOCK_N"]), cdiv(m, config["BLOCK_M"]), config["SPLIT_K"])
    return (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]),)


def _default_config(device: torch.device, swap: bool):
    if interpreting():
        return INTERPRETER_CONFIG
    if device_capability(device) == (9, 0):
        return "tuned"
    return DEFAULT_SWAP_CONFIG if swap else DEFAULT_CONFIG
