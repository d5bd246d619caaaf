"""The `fbgemm` backend: FBGEMM GenAI's CUTLASS FP8 GEMMs and its Triton dequantizers.

Every quirk of fbgemm-gpu-genai 1.6 that docs/backends.md lists is translated here or declared in
its capability table: MN-major groupwise scales, bf16-only reads, sm_90a-only cubins, alignment
rules that CUTLASS does not check. Its quantizers are declined: none is the contract (docs/backends.md).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

from fp8dispatch.capabilities import Capabilities, Serves
from fp8dispatch.registry import Backend

from . import _library as lib

E4M3 = torch.float8_e4m3fn
GROUP, BLOCK = (1, 128), (128, 128)
GENAI = "fbgemm_gpu.experimental.gen_ai"
TRITON = "fbgemm_gpu.experimental.gemm.triton_gemm.fp8_gemm"
OPS = ("quantize_fp8_per_row", "quantize_fp8_per_tensor", "f8f8bf16_rowwise", "f8f8bf16",
       "f8f8bf16_groupwise", "f8f8bf16_blockwise", "f8f8bf16_groupwise_grouped", "f8f8bf16_rowwise_grouped_stacked")
# f8f8bf16_groupwise loads the [K/128, M] activation scales by TMA, whose row strides must be
# 16-byte multiples: M=17 failed to build the descriptor and poisoned the context (illegal
# instruction; H100, docs/backends.md). Other M are padded with zero
# rows to a multiple of 4.
GROUPWISE_M_MULTIPLE = 4
GROUPED_OPS = {"block": "f8f8bf16_groupwise_grouped", "row": "f8f8bf16_rowwise_grouped_stacked"}

_import = importlib.import_module
_find_spec = importlib.util.find_spec
# The library's Triton module, for the dequantize runner (filled by the probe; why_not never reads it).
_loaded: dict = {}


@dataclass(frozen=True)
class Found:
    """What the probe found, frozen: `why_not` reads this and the problem only."""

    ops: frozenset[str]  # the torch.ops.fbgemm functions of OPS this build registers
    triton: str | None  # why FBGEMM's Triton kernels failed to load; None: they loaded


# A complete build: what `fp8dispatch support-matrix` describes.
COMPLETE = Found(ops=frozenset(OPS), triton=None)


def _ops():
    return torch.ops.fbgemm


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def probe() -> str | Found:
    # The quantizers ship sm_80 cubins; the GEMMs are gated per problem in why_not.
    _, reason = lib.load((8, 0), "fbgemm_gpu", "fbgemm-gpu-genai", GENAI, _find_spec, _import)
    if reason:
        return reason
    ops = _ops()
    present = frozenset(name for name in OPS if hasattr(ops, name))
    if not present:
        return f"fbgemm_gpu loaded but registers none of torch.ops.fbgemm.{{{', '.join(OPS)}}}"
    triton_module, triton_reason = lib.quiet_import(TRITON, importer=_import)
    _loaded["triton"] = triton_module
    return _self_test(ops, present, _device()) or Found(present, triton_reason)


def _self_test(ops, present, device) -> str | None:
    """Quantize one known row, and on sm90 run one rowwise GEMM with an exact answer."""
    if "quantize_fp8_per_row" in present:
        x = lib.representable(32).to(device, torch.bfloat16)
        try:
            data, scale = ops.quantize_fp8_per_row(x)
        except Exception as e:  # a wheel built for another torch or GPU fails here, not in a user call
            return f"self-test: quantize_fp8_per_row raised {type(e).__name__}: {lib._first_line(e)}"
        # amax 448 gives scale 1 and codes equal to the inputs (all representable in e4m3fn).
        if scale.flatten()[0].item() != 1.0 or not torch.equal(data.float().cpu(), x.float().cpu()):
            return f"self-test: quantize_fp8_per_row gave scale {scale.flatten()[0].item()}, expected 1.0"
    if "f8f8bf16_rowwise" in present and _capability(device) in ((9, 0), (10, 0)):
        a = torch.ones(16, 32, device=device).to(E4M3)
        try:
            out = ops.f8f8bf16_rowwise(a, a, torch.full((16,), 2.0, device=device),
                                       torch.full((16,), 3.0, device=device))
        except Exception as e:
            return f"self-test: f8f8bf16_rowwise raised {type(e).__name__}: {lib._first_line(e)}"
        if not torch.equal(out.float().cpu(), torch.full((16, 16), 192.0)):
            return f"self-test: f8f8bf16_rowwise gave {out.flatten()[0].item()}, expected 192"
    return None


# --- why not: the table, and the value checks it cannot express ---------------------------


def _in_build(row, p, found: Found) -> str | None:
    """Whether this build has the row's function (the dequantizers: FBGEMM's Triton module)."""
    if row.op == "dequantize":
        return f"FBGEMM's Triton kernels: {found.triton}" if found.triton else None
    return None if row.kernel in found.ops else f"torch.ops.fbgemm.{row.kernel} is missing from this fbgemm_gpu build"


def _pow2_sides(row, p, found) -> str | None:
    if all(n > 0 and n & (n - 1) == 0 for n in p.block):
        return None
    return f"block {p.block}: {row.kernel} needs power-of-two block sides"


# One row per function: what it takes, where it has kernels, what it needs (docs/backends.md).
E4M3_ONLY, BF16_ONLY, SM90, SM100 = (E4M3,), (torch.bfloat16,), (9, 0), (10, 0)
SM90A = {"arch": "sm_90a cubins"}
# can_implement is disabled in the block GEMMs: keep to K % 128, where tails are verified.
K128 = (("K", 128), ("N", 16))
TRITON_KERNELS = {"arch": "FBGEMM's Triton FP8 kernels"}
# How f8f8bf16_groupwise_grouped finds expert g's scales (see grouped_linear below).
SCALE_OFFSETS = f"{GROUPED_OPS['block']} finds each expert's scales at offsets in N // 128 and K // 128"
TABLE = Capabilities("FBGEMM", (
    Serves("matmul", "row", "f8f8bf16_rowwise", None, E4M3_ONLY, BF16_ONLY, archs=(SM90, SM100),
           multiples=(("K", 16), ("N", 8)), bias="any", why={"arch": "sm_90a and sm_100a cubins"},
           checks=(_in_build,)),
    Serves("matmul", "tensor", "f8f8bf16", None, E4M3_ONLY, BF16_ONLY, archs=(SM90,),
           multiples=(("K", 16), ("N", 16)), why=SM90A, checks=(_in_build,)),
    Serves("matmul", "block", "f8f8bf16_groupwise", (GROUP, BLOCK), E4M3_ONLY, BF16_ONLY, archs=(SM90,),
           multiples=K128, why=SM90A, checks=(_in_build,)),
    Serves("matmul", "mixed", "f8f8bf16_blockwise", (BLOCK, BLOCK), E4M3_ONLY, BF16_ONLY, archs=(SM90,),
           multiples=K128, why=SM90A, checks=(_in_build,)),
    Serves("dequantize", "row", "dequantize_fp8_row", out_dtypes=BF16_ONLY, multiples=(("rows", 16),),
           why=dict(TRITON_KERNELS, rows="dequantize_fp8_row reads scales in tiles of 16 rows without a mask"),
           checks=(_in_build,)),
    Serves("dequantize", "group", "dequantize_fp8_block", out_dtypes=BF16_ONLY, why=TRITON_KERNELS,
           checks=(_in_build, _pow2_sides)),
    Serves("dequantize", "block", "dequantize_fp8_block", out_dtypes=BF16_ONLY, why=TRITON_KERNELS,
           checks=(_in_build, _pow2_sides)),
    Serves("grouped_linear", "block", GROUPED_OPS["block"], (GROUP, BLOCK), E4M3_ONLY, BF16_ONLY, archs=(SM90,),
           multiples=(("K", 128), ("N", 128)), why=dict(SM90A, K=SCALE_OFFSETS, N=SCALE_OFFSETS),
           checks=(_in_build,)),
    Serves("grouped_linear", "row", GROUPED_OPS["row"], None, E4M3_ONLY, BF16_ONLY, archs=(SM90,),
           multiples=(("K", 16), ("N", 8)), why=SM90A, checks=(_in_build,)),
), declined={"quantize": (
    # Measured on the H100 (docs/backends.md): the CUDA row and tensor quantizers let ±inf into
    # the amax (the scale becomes inf and the row's codes 0 or NaN), a NaN resets their running
    # max, and they floor the scale at 1/(fp8_max·512); the Triton group and block quantizers
    # divide approximately (0 of 26 group cases bit for bit). None is the contract, and the
    # differences hide in values why_not cannot see, so none is offered: the triton backend
    # quantizes every granularity bit for bit.
    "FBGEMM's quantizers are not offered: they depart from the contract on values why_not cannot "
    "see (±inf in the amax, NaN resetting it, a scale floor, approximate division); use triton")})


def why_not(op: str, p, found: Found = COMPLETE) -> list[str]:
    return TABLE.check(p, found)[0]


# --- the ops --------------------------------------------------------------------------------


def dequantize(data, scale, block, out_dtype):
    triton = _loaded["triton"]
    if block[0] == 1 and block[1] >= data.shape[1]:
        return triton.dequantize_fp8_row(data, scale.reshape(-1).contiguous())
    return triton.dequantize_fp8_block(data, scale.contiguous(), block[0], block[1])


def matmul(a, b, out_dtype, bias=None):
    ops = _ops()
    xq, wq = a.data, b.data.t()  # wq is the contiguous [N, K] weight
    m, n = xq.shape[0], wq.shape[0]
    if a.block[1] < xq.shape[1]:
        if a.block[0] == 1:  # groupwise wants both scales MN-major: [K/128, M] and [K/128, N/128]
            xq, xs = lib.pad_rows(xq, a.scale, GROUPWISE_M_MULTIPLE)
            return ops.f8f8bf16_groupwise(xq, wq, xs.t().contiguous(), lib.aligned(b.scale.contiguous()))[:m]
        return ops.f8f8bf16_blockwise(xq, wq, lib.aligned(a.scale.contiguous()), lib.aligned(b.scale.t().contiguous()),
                                      128, 128, 128)
    if a.scale.numel() == 1 and b.scale.numel() == 1:
        # f8f8bf16 reads x_scale·w_scale from device memory: no host sync, unlike _tensorwise.
        return ops.f8f8bf16(xq, wq, (a.scale * b.scale).reshape(1), True)
    xs = lib.per_row(a.scale, a.block[0], m).view(m)
    ws = lib.per_row(b.scale.t(), b.block[1], n).view(n)
    if bias is not None and bias.dtype not in (torch.float32, torch.bfloat16):
        bias = bias.float()
    return ops.f8f8bf16_rowwise(xq, wq, xs, ws, bias=bias, use_fast_accum=True)


# --- grouped_linear -------------------------------------------------------------------------
# Block recipe: f8f8bf16_groupwise_grouped(XQ [M, K], WQ [G, N, K], x_scale, w_scale, M_sizes int64).
# Its argument setup (fbgemm 1.6, f8f8bf16_groupwise_grouped_common.cuh) points expert g's scales at
# x_scale + offset_g * (K / 128) and w_scale + g * (N / 128) * (K / 128) with integer division, and
# reads both MN-major (CUTLASS's Sm90BlockwiseScaleConfig default): expert g's x scales are a
# [K/128, M_g] block, its w scales [K/128, N/128]. So N and K must be multiples of 128, and the
# translation regroups x's [M, K/128] scales per expert (`per_expert_mn_major`). Row recipe:
# f8f8bf16_rowwise_grouped_stacked(XQ, WQ, x_scale [M], w_scale [G, N], M_sizes). Both write bf16,
# take no bias, and have no masked mode: the masked layout runs as contiguous over every slot and
# its padding rows are zeroed after. None of this is checked on a CPU: the GPU conformance run is
# its test (`fp8dispatch conformance --backend fbgemm --op grouped_linear`).
@lib.masked_as_contiguous
def grouped_linear(xq, x, w, offsets):
    ops = _ops()
    groups, n, k = w.data.shape
    sizes = (offsets[1:] - offsets[:-1]).to(torch.int64)
    if x.block[1] < k:
        xs = lib.per_expert_mn_major(x.scale, offsets)
        ws = lib.aligned(w.scale.transpose(1, 2).contiguous())  # [G, K/128, N/128]
        return ops.f8f8bf16_groupwise_grouped(xq, w.data, xs, ws, sizes)
    xs = lib.per_row(x.scale, x.block[0], xq.shape[0]).view(-1)
    ws = lib.aligned(w.scale.reshape(groups, n).contiguous())
    return ops.f8f8bf16_rowwise_grouped_stacked(xq, w.data, xs, ws, sizes)


BACKEND = Backend(
    name="fbgemm",
    probe=probe,
    why_not=why_not,
    dequantize=dequantize,
    matmul=matmul,
    grouped_linear=grouped_linear,
    traceable=frozenset({"matmul"}),
    version=lambda: lib.distribution_version("fbgemm-gpu-genai"),
    description="fbgemm-gpu-genai: CUTLASS rowwise/groupwise/blockwise FP8 GEMMs and Triton dequantizers",
)
