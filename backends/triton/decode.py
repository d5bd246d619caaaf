"""The decode GEMM that quantizes its own activation: `linear(x, w)` for a few tokens in one launch.

At decode sizes a block-recipe `fp8dispatch.linear(x, w)` is two kernels and two allocations: the
1×g group quantize of x (FP8 data and a scale per group), then the GEMM that reads them back. Both
kernels are tiny; what they cost is host time (a launch and an allocation each) and, under CUDA
graphs, a second kernel's latency. Here one kernel does both. Each K step of the GEMM is exactly
one scale group (BLOCK_K = g), so a program can quantize the slice of x it is about to multiply:

    for each K step k:                                   x [M, K] high precision, w [N, K] FP8
        xs[m] = scale_from_amax(max |x[m, k:k+g]|)       the scale quantize would store
        xq    = saturating_cast(x[m, k:k+g] / xs[m])     the FP8 values quantize would store
        acc  += dot(w[n, k:k+g], xq.T) * (xs[m] * sw[k // g_w, n // g'])
    c[m, n] = acc (+ bias), in the output dtype

with the same helpers as the quantize kernels (`scaling.py`), so xq and xs are those bits, and the
same promotion as `matmul.py`'s kernel. Neither ever reaches memory: one allocation (the output),
one launch.

Layout: as in `matmul.py`'s small-M path the operands are swapped, the weight's N on the tile's
wide side and the tokens (at most MAX_M, padded to 16) on the narrow one. Every program re-reads
and re-quantizes all of x: M×K elements, a few KB to 230 KB, from L2, against its BLOCK_N×K bytes
of weight from HBM. The narrow BLOCK_N candidates exist for the small-N projections (N = 576 is 36
programs at 16 rows): the weight read is the whole cost, and it needs programs on every SM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fp8dispatch.blocks import cdiv
from fp8dispatch.formats import fp8_format

from .interpreter import active as interpreting
from .launch import Launcher, build_failed, listening, raw_stream, static_key, tracing
from .scaling import finite_abs, saturating_cast, scale_from_amax
from .tiles import hint

# Up to this many tokens the fused kernel serves (one 16-wide tile of them). Above it x is re-read
# by every program often enough that quantizing it once pays.
MAX_M = 16
_X_DTYPE = torch.float8_e4m3fn  # what the planner quantizes activations to


@triton.jit
def _quantizing_mm_kernel(
    x_ptr, w_ptr, c_ptr, sw_ptr, bias_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wk, stride_wn,  # of b = w.t() [K, N]: the weight's data as the matmul contract passes it
    stride_cm, stride_cn,
    stride_swk, stride_swn,  # of b's scale [ceil(K / g_w), ceil(N / g')]
    w_rows_per_scale,  # g_w, the K extent of a weight block (a multiple of g)
    w_cols_per_scale,  # g', the N extent of a weight block
    FP8_MAX: tl.constexpr,  # of e4m3fn, the format the planner quantizes activations to
    W_TILE_SCALE: tl.constexpr,  # BLOCK_N divides g': one weight scale per tile and K step
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per tile, the narrow side (16)
    BLOCK_N: tl.constexpr,  # output features per tile
    BLOCK_K: tl.constexpr,  # = g, x's group width: one scale per row and K step
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    rn = offs_n % N  # an N tail wraps on load and is masked on store
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk  # x.T: [BLOCK_K, BLOCK_M]
    sw_ptrs = sw_ptr + (rn // w_cols_per_scale) * stride_swn
    sw_tile_ptr = sw_ptr + (pid_n * BLOCK_N // w_cols_per_scale) * stride_swn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[None, :] & (offs_k[:, None] < k_left), other=0.0)
        x = x.to(tl.float32)
        # Padding tokens and a K tail load as 0: they never raise a group's amax, and an all-zero
        # group gets scale 1, as the quantize kernels give it.
        xs = scale_from_amax(tl.max(finite_abs(x), axis=0), 0.0, FP8_MAX, False, False)
        xq = saturating_cast(x, xs[None, :], FP8_MAX, tl.float8e4nv)
        w_row = (k * BLOCK_K) // w_rows_per_scale
        if W_TILE_SCALE:
            acc += tl.dot(w, xq) * (xs * tl.load(sw_tile_ptr + w_row * stride_swk))[None, :]
        else:
            acc += tl.dot(w, xq) * (xs[None, :] * tl.load(sw_ptrs + w_row * stride_swk)[:, None])
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[:, None]
    c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[None, :] & (offs_n < N)[:, None])


# Hopper candidates, timed on a problem's first call: BLOCK_N from 16 (enough programs for N = 576)
# to 128, with deep pipelines (a K step of a 16-row tile is only 2 KB of weight).
HOPPER_CONFIGS = [dict(BLOCK_N=bn, num_stages=stages, num_warps=4) for bn in (16, 32, 64, 128) for stages in (4, 6)]
DEFAULT_CONFIG = dict(BLOCK_N=64, num_stages=3, num_warps=4)  # sm89 (100 KB of shared memory); untuned
INTERPRETER_CONFIG = dict(BLOCK_N=64)  # the interpreter pays per program: few, wide ones

_launcher = Launcher(_quantizing_mm_kernel, tensors=5)
_chosen: dict[tuple, dict] = {}  # tuned configurations, per shape and flags (as in matmul.py)


def serves(p) -> bool:
    """Whether this kernel computes the problem `linear(x, w)` plans for a high-precision x: the
    block recipe, few tokens, x's group a power of two the tensor cores step by (32 to 128)."""
    g = p.a_block[1]
    return (p.recipe == "block" and p.m <= MAX_M and p.a_dtype == _X_DTYPE and g in (32, 64, 128)
            and p.a_block[0] == 1 and p.b_block[0] % g == 0)


@dataclass(frozen=True)
class _Call:
    """A call's launch: grid, integer arguments, constexprs, options, the launcher's static key."""

    grid: tuple
    ints: tuple
    constexprs: dict
    options: dict
    static: tuple


_calls: dict[tuple, _Call] = {}


def linear(x, b, out_dtype, bias=None, group: int = 128):
    """`quantize(x, 1×group) @ b (+ bias)` in one launch, for x [M, K] high precision (M ≤ MAX_M)
    and b the FP8 `.t()` of a [N, K] weight (the planner checked `serves`)."""
    m, k = x.shape
    n = b.data.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    tensors = (x, b.data, c, b.scale, bias if bias is not None else b.scale)
    traced = tracing(x)
    key = (x.shape, x.stride(), b.data.shape, b.data.stride(), b.scale.stride(), b.block, x.dtype, b.data.dtype,
           out_dtype, bias is None, x.device, group)
    call = None if traced else _calls.get(key)
    if call is None:
        call = _plan(x, b, c, tensors, out_dtype, bias is not None, group)
        if not traced:
            _calls[key] = call
    _launcher(call.grid, (*tensors, *call.ints), call.constexprs, call.options, call.static)
    return c


def _plan(x, b, c, tensors, out_dtype, has_bias: bool, g: int) -> _Call:
    m, k = x.shape
    n = b.data.shape[1]
    ints = (m, n, k, x.stride(0), x.stride(1), b.data.stride(0), b.data.stride(1), c.stride(0), c.stride(1),
            b.scale.stride(0), b.scale.stride(1), b.block[0], b.block[1])
    flags = dict(FP8_MAX=fp8_format(_X_DTYPE).max_value, HAS_BIAS=has_bias,
                 EVEN_K=k % g == 0, BLOCK_M=16, BLOCK_K=g)

    def make(config) -> _Call:
        constexprs = dict(config)
        options = {name: constexprs.pop(name) for name in ("num_warps", "num_stages") if name in constexprs}
        constexprs = {**flags, **constexprs, "W_TILE_SCALE": b.block[1] % constexprs["BLOCK_N"] == 0}
        grid = (cdiv(n, constexprs["BLOCK_N"]), cdiv(m, 16))
        return _Call(grid, ints, constexprs, options, static_key(ints, constexprs, options))

    if interpreting():
        return make(INTERPRETER_CONFIG)
    from fp8dispatch.problem import device_capability

    if device_capability(x.device) != (9, 0):
        return make(DEFAULT_CONFIG)
    tune_key = (x.device, n, k, g, b.block, x.dtype, b.data.dtype, out_dtype, has_bias, flags["EVEN_K"])
    if tune_key not in _chosen:
        _chosen[tune_key] = _tune(x, b, out_dtype, has_bias, make)
    return make(_chosen[tune_key])


def _tune(x, b, out_dtype, has_bias, make) -> dict:
    """Time each candidate on real operands of the call's shapes (random ones while tracing), 5 ms
    of warm-up and 20 ms of runs each; candidates this Triton cannot build are skipped."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        xr, br = _real(x), type(b)._trusted(_real(b.data), _real(b.scale), b.block)
        c = torch.empty((hint(x.shape[0]), hint(br.data.shape[1])), dtype=out_dtype, device=xr.device)
        tensors = (xr, br.data, c, br.scale, torch.zeros(c.shape[1], dtype=out_dtype, device=c.device)
                   if has_bias else br.scale)
        best, best_ms = None, float("inf")
        for config in HOPPER_CONFIGS:
            call = make(config)
            try:
                ms = triton.testing.do_bench(
                    lambda: _launcher(call.grid, (*tensors, *call.ints), call.constexprs, call.options), warmup=5,
                    rep=20)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot be built is skipped
                if not build_failed(e):
                    raise
                continue
            if ms < best_ms:
                best, best_ms = config, ms
    if best is None:
        raise RuntimeError("triton: no configuration of the quantizing decode kernel builds on this Triton")
    return best


def _real(t: torch.Tensor) -> torch.Tensor:
    """A real tensor shaped and strided like `t` (fake while tracing), with values to time on."""
    size, stride = [hint(d) for d in t.shape], [hint(d) for d in t.stride()]
    out = torch.empty_strided(size, stride, dtype=t.dtype, device=t.device)
    if t.dtype == torch.float32:  # scales
        return out.fill_(1.0)
    return out.copy_(torch.randn(size, device=t.device).to(t.dtype))


def kernel_name() -> str:
    return f"decode.py: the activation quantize inside the decode GEMM, one launch (M ≤ {MAX_M})"


def plan(problem):
    """A runner `(x, b, out_dtype, bias) -> c` for every call of `problem` with a high-precision x
    whose key the caller fixed: the first call tunes and compiles as `linear` does, later calls
    allocate the output and launch the same compiled kernel directly."""
    group = problem.a_block[1]

    def traced(x, b, out_dtype, bias=None):
        return linear(x, b, out_dtype, bias, group)

    if interpreting():
        traced = None
    if problem.device.type != "cuda":
        def run(x, b, out_dtype, bias=None):
            return linear(x, b, out_dtype, bias, group)
        run.kernel, run.traced = kernel_name(), traced
        return run
    bound = None

    def run(x, b, out_dtype, bias=None):
        nonlocal bound
        if bound:
            try:
                out = bound(x, b, bias)
            except TypeError:  # this Triton's launcher takes its arguments otherwise: never again
                bound = False
            else:
                if out is not None:
                    return out
        out = linear(x, b, out_dtype, bias, group)
        if bound is None:
            bound = _bind(x, out, bias)
        return out

    run.kernel, run.traced = kernel_name(), traced
    return run


def _bind(x, c, bias):
    """`(x, b, bias) -> c` relaunching the kernel `linear` just ran for x directly, or None."""
    found = _launcher.bound(x)
    if found is None:
        return None
    (g0, g1, g2), launch, function, packed, args, tail = found
    ints, has_bias = args[5:], bias is not None
    shape, out_dtype, device, index = tuple(c.shape), c.dtype, x.device, x.device.index
    stream = raw_stream

    def run(x, b, bias):
        px, pw, psw = x.data_ptr(), b.data.data_ptr(), b.scale.data_ptr()
        pbias = bias.data_ptr() if has_bias else psw
        if (px | pw | psw | pbias) & 15 or listening():
            return None
        out = torch.empty(shape, dtype=out_dtype, device=device)
        launch(g0, g1, g2, stream(index), function, packed, None, None, None, px, pw, out.data_ptr(), psw, pbias,
               *ints, *tail)
        return out

    return run
