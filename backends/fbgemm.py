"""The `fbgemm` backend: FBGEMM GenAI's CUTLASS FP8 GEMMs and its Triton dequantizers.

Every quirk of fbgemm-gpu-genai 1.6 that docs/backends.md lists is translated here or declared in
`why_not`: MN-major groupwise scales, bf16-only reads, sm_90a-only cubins, alignment rules that
CUTLASS does not check. Its quantizers are declined: none is the contract (docs/backends.md).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from fp8dispatch.registry import Backend

from . import _library as lib

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
GROUP, BLOCK = (1, 128), (128, 128)
GENAI = "fbgemm_gpu.experimental.gen_ai"
TRITON = "fbgemm_gpu.experimental.gemm.triton_gemm.fp8_gemm"
OPS = ("quantize_fp8_per_row", "quantize_fp8_per_tensor", "f8f8bf16_rowwise", "f8f8bf16",
       "f8f8bf16_groupwise", "f8f8bf16_blockwise")
# f8f8bf16_groupwise loads the [K/128, M] activation scales by TMA, whose row strides must be
# 16-byte multiples: M=17 failed to build the descriptor and poisoned the context (illegal
# instruction; H100, docs/backends.md). Other M are padded with zero
# rows to a multiple of 4.
GROUPWISE_M_MULTIPLE = 4

_import = importlib.import_module
_find_spec = importlib.util.find_spec
# What the probe found: the ops this build registers, the Triton module, the version. Until the
# probe runs (only `fp8dispatch support-matrix` asks why_not before it: dispatch always probes
# first), why_not describes a complete build.
_found: dict = {"ops": None, "triton": None, "triton_reason": None, "version": None}


def _ops():
    return torch.ops.fbgemm


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def probe() -> str | None:
    # The quantizers ship sm_80 cubins; the GEMMs are gated per problem in why_not.
    module, reason = lib.load((8, 0), "fbgemm_gpu", "fbgemm-gpu-genai", GENAI, _find_spec, _import)
    if reason:
        return reason
    ops = _ops()
    present = frozenset(name for name in OPS if hasattr(ops, name))
    if not present:
        return f"fbgemm_gpu loaded but registers none of torch.ops.fbgemm.{{{', '.join(OPS)}}}"
    triton_module, triton_reason = lib.quiet_import(TRITON, importer=_import)
    _found.update(ops=present, triton=triton_module, triton_reason=triton_reason,
                  version=_version_of(module))
    return _self_test(ops, present, _device())


def _version_of(module) -> str | None:
    try:
        from importlib.metadata import version

        return version("fbgemm-gpu-genai")
    except Exception:  # noqa: BLE001 - a version is informative, not required
        return getattr(module, "__version__", None)


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


# --- why not --------------------------------------------------------------------------------


def why_not(op: str, p) -> list[str]:
    if p.device.type != "cuda":
        return [f"needs a CUDA tensor, got device {p.device}"]
    return {"quantize": _quantize_reasons, "dequantize": _dequantize_reasons, "matmul": _matmul_reasons,
            "grouped_linear": _grouped_reasons}[op](p)


def _needs_op(name: str) -> list[str]:
    ops = _found["ops"]
    return [] if ops is None or name in ops else [f"torch.ops.fbgemm.{name} is missing from this fbgemm_gpu build"]


def _needs_triton(p) -> list[str]:
    missing = _found["triton"] is None and _found["triton_reason"] is not None
    reasons = [f"FBGEMM's Triton kernels: {_found['triton_reason']}"] if missing else []
    if p.capability < (8, 9):
        reasons.append(f"FBGEMM's Triton FP8 kernels need sm89 or newer, this GPU is {lib.sm(p.capability)}")
    return reasons


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _quantize_reasons(p) -> list[str]:
    # Measured on the H100 (docs/backends.md): the CUDA row and tensor quantizers let ±inf into
    # the amax (the scale becomes inf and the row's codes 0 or NaN), a NaN resets their running
    # max, and they floor the scale at 1/(fp8_max·512); the Triton group and block quantizers
    # divide approximately (0 of 26 group cases bit for bit). None is the contract, and the
    # differences hide in values why_not cannot see, so none is offered: the triton backend
    # quantizes every granularity bit for bit.
    return ["FBGEMM's quantizers are not offered: they depart from the contract on values why_not cannot "
            "see (±inf in the amax, NaN resetting it, a scale floor, approximate division); use triton"]


def _dequantize_reasons(p) -> list[str]:
    reasons = _needs_triton(p)
    if p.fp8_dtype not in (E4M3, E5M2):
        reasons.append(f"t: FBGEMM's Triton dequantizers compile for float8_e4m3fn and float8_e5m2 on CUDA, "
                       f"got {p.fp8_dtype}")
    if p.out_dtype != torch.bfloat16:
        reasons.append(f"dtype: FBGEMM's dequantizers write bf16 only, asked {p.out_dtype}")
    if not p.contiguous:
        reasons.append("t: needs contiguous data")
    rows, cols = p.shape
    granularity = p.granularity
    if granularity == "row":
        if rows % 16:
            reasons.append(f"rows={rows}: dequantize_fp8_row reads scales in tiles of 16 rows without a mask, "
                           f"so needs rows % 16 == 0")
    elif granularity in ("group", "block"):
        if not (_pow2(p.block[0]) and _pow2(p.block[1])):
            reasons.append(f"block {p.block}: dequantize_fp8_block needs power-of-two block sides")
    else:
        reasons.append(f"granularity {granularity}: FBGEMM has no dequantizer for blocks {p.block}")
    return reasons


def _matmul_reasons(p) -> list[str]:
    reasons = []
    if (p.a_dtype, p.b_dtype) != (E4M3, E4M3):
        reasons.append(f"a, b: FBGEMM's CUDA GEMMs take float8_e4m3fn only, got {p.a_dtype} × {p.b_dtype}")
    if p.out_dtype != torch.bfloat16:
        reasons.append(f"out_dtype: FBGEMM's GEMMs write bf16 only, asked {p.out_dtype}")
    if p.bias_dtype is not None and p.recipe != "row":
        reasons.append(f"bias: only f8f8bf16_rowwise adds a bias in its epilogue; adding it to the bf16 "
                       f"output of {p.recipe} would round twice")
    if p.recipe == "row":
        reasons += _needs_op("f8f8bf16_rowwise")
        if p.capability not in ((9, 0), (10, 0)):
            reasons.append(f"row recipe: f8f8bf16_rowwise has sm_90a and sm_100a kernels only, "
                           f"this GPU is {lib.sm(p.capability)}")
        return reasons + lib.matmul_layout_reasons(p, need_k=16, need_n=8)
    if p.recipe == "tensor":
        op, layout = "f8f8bf16", lib.matmul_layout_reasons(p, need_k=16, need_n=16)
    elif (p.a_block, p.b_block) == (GROUP, BLOCK):
        # can_implement is disabled in the groupwise kernel: keep to K % 128, where tails are verified.
        op, layout = "f8f8bf16_groupwise", lib.matmul_layout_reasons(p, need_k=128, need_n=16)
    elif (p.a_block, p.b_block) == (BLOCK, BLOCK):
        op, layout = "f8f8bf16_blockwise", lib.matmul_layout_reasons(p, need_k=128, need_n=16)
    else:
        return reasons + [f"blocks {p.a_block} × {p.b_block}: FBGEMM serves tensor, row, 1×128 · 128×128 "
                          f"and 128×128 · 128×128 only"]
    reasons += _needs_op(op)
    if p.capability != (9, 0):
        reasons.append(f"{op} has sm_90a kernels only, this GPU is {lib.sm(p.capability)}")
    return reasons + layout


# --- the ops --------------------------------------------------------------------------------


def dequantize(data, scale, block, out_dtype):
    triton = _found["triton"]
    if block[0] == 1 and block[1] >= data.shape[1]:
        return triton.dequantize_fp8_row(data, scale.reshape(-1).contiguous())
    return triton.dequantize_fp8_block(data, scale.contiguous(), block[0], block[1])


def matmul(a, b, out_dtype, bias=None):
    ops = torch.ops.fbgemm
    xq, wq = a.data, b.data.t()  # wq is the contiguous [N, K] weight
    m, n = xq.shape[0], wq.shape[0]
    if a.block[1] < xq.shape[1]:
        if a.block[0] == 1:  # groupwise wants both scales MN-major: [K/128, M] and [K/128, N/128]
            xq, xs = lib.pad_rows(xq, a.scale, GROUPWISE_M_MULTIPLE)
            return ops.f8f8bf16_groupwise(xq, wq, xs.t().contiguous(), b.scale.contiguous())[:m]
        return ops.f8f8bf16_blockwise(xq, wq, a.scale.contiguous(), b.scale.t().contiguous(), 128, 128, 128)
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
GROUPED_OPS = {"block": "f8f8bf16_groupwise_grouped", "row": "f8f8bf16_rowwise_grouped_stacked"}


def _grouped_reasons(p) -> list[str]:
    op = GROUPED_OPS[p.recipe]
    reasons = [] if _found["ops"] is None or hasattr(_ops(), op) else \
        [f"torch.ops.fbgemm.{op} is missing from this fbgemm_gpu build"]
    if p.capability != (9, 0):
        reasons.append(f"{op} has sm_90a kernels only, this GPU is {lib.sm(p.capability)}")
    if (p.x_dtype, p.w_dtype) != (E4M3, E4M3):
        reasons.append(f"x, w: FBGEMM's grouped GEMMs take float8_e4m3fn only, got {p.x_dtype} × {p.w_dtype}")
    if p.out_dtype != torch.bfloat16:
        reasons.append(f"out_dtype: FBGEMM's grouped GEMMs write bf16 only, asked {p.out_dtype}")
    if p.bias_dtype is not None:
        reasons.append("bias: FBGEMM's grouped GEMMs take no bias, and adding it to the bf16 output would round twice")
    if not (p.x_row_major and p.w_contiguous):
        reasons.append("x, w: need contiguous data (x row-major [M, K], w [G, N, K])")
    if p.recipe == "block":
        if (p.x_block, p.w_block) != (GROUP, BLOCK):
            reasons.append(f"blocks {p.x_block} × {p.w_block}: {op} takes 1×128 · 128×128 only")
        if p.k % 128 or p.n % 128:
            reasons.append(f"N={p.n}, K={p.k}: {op} finds each expert's scales by N / 128 and K / 128 "
                           f"(integer division), so needs N % 128 == 0 and K % 128 == 0")
    elif p.k % 16 or p.n % 8:
        reasons.append(f"N={p.n}, K={p.k}: needs K % 16 == 0 and N % 8 == 0")
    return reasons


def grouped_linear(x, w, offsets, masked_m, out_dtype, bias=None):
    ops = _ops()
    groups, n, k = w.data.shape
    xq = x.data.reshape(-1, k)
    if offsets is None:
        offsets = lib.masked_as_contiguous(groups, x.data.shape[1], xq.device)
    sizes = (offsets[1:] - offsets[:-1]).to(torch.int64)
    if x.block[1] < k:
        xs = lib.per_expert_mn_major(x.scale, offsets)
        ws = w.scale.transpose(1, 2).contiguous()  # [G, K/128, N/128]
        out = ops.f8f8bf16_groupwise_grouped(xq, w.data, xs, ws, sizes)
    else:
        xs = lib.per_row(x.scale, x.block[0], xq.shape[0]).view(-1)
        out = ops.f8f8bf16_rowwise_grouped_stacked(xq, w.data, xs, w.scale.reshape(groups, n).contiguous(), sizes)
    if masked_m is not None:
        out = lib.zero_past_masked(out.view(groups, -1, n), masked_m)
    return out


def _version() -> str | None:
    return _found["version"]


BACKEND = Backend(
    name="fbgemm",
    probe=probe,
    why_not=why_not,
    dequantize=dequantize,
    matmul=matmul,
    grouped_linear=grouped_linear,
    version=_version,
    description="fbgemm-gpu-genai: CUTLASS rowwise/groupwise/blockwise FP8 GEMMs and Triton dequantizers",
)
