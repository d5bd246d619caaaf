"""The `torch` backend: PyTorch's own `torch._scaled_mm` / `F.scaled_mm` (cuBLASLt, CUTLASS) matmul.

Named after PyTorch; imports are absolute in Python 3, so `import torch` below is the real
PyTorch, never this module.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8dispatch.blocks import cdiv
from fp8dispatch.capabilities import Capabilities, Serves
from fp8dispatch.registry import Backend

from . import _library as lib

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
GROUP, BLOCK = (1, 128), (128, 128)
# cuBLASLt's 1x128 · 128x128 scaling (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128/BLK128x128) arrived in 12.9.
CUBLASLT_BLOCKWISE = 120900
# cuBLASLt rejects the block recipe unless M % 4 == 0 (CUBLAS_STATUS_NOT_SUPPORTED at M = 1, 2,
# 15, 17; M = 4, 8, 12, 16, 24, 100, 200 work; H100, cuBLASLt 13.1; docs/backends.md): the
# column-major activation scales need 16-byte aligned columns. Other M are padded with zero rows.
BLOCK_M_MULTIPLE = 4


@dataclass(frozen=True)
class Found:
    """What the probe found on this device, frozen: `why_not` reads this and the problem only."""

    cublaslt: int | None  # cublasLtGetVersion() of the loaded cuBLASLt (e.g. 130100); None: unreadable
    scaled_mm_v2: bool  # F.scaled_mm (torch >= 2.10) exists: it takes zero-padded block scales
    rowwise: str | None  # why this device's torch._scaled_mm takes no per-row scales; None: it does
    grouped: str | None = None  # why torch._scaled_grouped_mm cannot run here (`grouped_probe`); None: it can


# A complete install on a supported GPU: what `fp8dispatch support-matrix` describes.
COMPLETE = Found(cublaslt=CUBLASLT_BLOCKWISE, scaled_mm_v2=True, rowwise=None)

def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def probe() -> str | Found:
    reason = lib.cuda_reason((8, 9))
    if reason:
        return reason
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    device = _device()
    reason = _self_test(device, "tensorwise")
    if reason:
        return reason
    return Found(cublaslt_version(), hasattr(F, "scaled_mm"), _self_test(device, "rowwise"), grouped_probe(device))


def _self_test(device: torch.device, scaling: str) -> str | None:
    """One product whose answer is exact: ones · ones over K=32 with scales 2 and 3 is 192."""
    a = torch.ones(16, 32, device=device).to(E4M3)
    b = torch.ones(16, 32, device=device).to(E4M3).t()
    rows, cols = ((16, 1), (1, 16)) if scaling == "rowwise" else ((1, 1), (1, 1))
    sa, sb = torch.full(rows, 2.0, device=device), torch.full(cols, 3.0, device=device)
    try:
        out = torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
    except Exception as e:  # a driver or cuBLASLt that cannot run FP8 reports here, not later
        return f"self-test: torch._scaled_mm {scaling} raised {type(e).__name__}: {lib._first_line(e)}"
    if not torch.equal(out.float().cpu(), torch.full((16, 16), 192.0)):
        return f"self-test: torch._scaled_mm {scaling} gave {out.flatten()[0].item()}, expected 192"
    return None


def cublaslt_version() -> int | None:
    """cublasLtGetVersion() of the cuBLASLt this process loaded (e.g. 130100), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcublasLt" in line})
    except OSError:
        paths = []
    for path in paths:
        try:
            get = ctypes.CDLL(path).cublasLtGetVersion
            get.restype = ctypes.c_size_t
            return int(get())
        except (OSError, AttributeError):
            continue
    return None


# --- why not: the table, and the value checks it cannot express ---------------------------


def _not_e5m2_pair(row, p, found) -> str | None:
    if p.a_dtype == E5M2 and p.b_dtype == E5M2:
        return "a, b: float8_e5m2 × float8_e5m2 is rejected by torch._scaled_mm; quantize one to e4m3fn"
    return None


def _rowwise_runs(row, p, found: Found) -> str | None:
    return f"row recipe: torch._scaled_mm here takes tensorwise scales only ({found.rowwise})" if found.rowwise else None


def _cublaslt_blockwise(row, p, found: Found) -> str | None:
    if (found.cublaslt or 0) >= CUBLASLT_BLOCKWISE:
        return None
    return f"block recipe: needs cuBLASLt >= 12.9, found {found.cublaslt or 'unknown'}"


def _k_blocks_readable(row, p, found: Found) -> str | None:
    if cdiv(p.k, 128) % 4 == 0 or found.scaled_mm_v2:
        return None
    return (f"K={p.k}: torch._scaled_mm is silently wrong unless ceil(K/128) % 4 == 0, and "
            f"F.scaled_mm (torch >= 2.10), which takes padded scales, is missing")


def _grouped_runs(row, p, found: Found) -> str | None:
    return found.grouped


# One row per recipe: torch._scaled_mm serves tensor and row on any FP8 GPU, block on sm90 (cuBLASLt);
# torch._scaled_grouped_mm serves grouped_linear's row recipe on sm90 and sm100.
TENSOR_CORES, ALIGNED = {"arch": "FP8 tensor cores"}, (("K", 16), ("N", 16))
STRIDES = "16-byte aligned strides"
TABLE = Capabilities("torch", (
    Serves("matmul", "tensor", "torch._scaled_mm", multiples=ALIGNED, bias="out_dtype", why=TENSOR_CORES,
           checks=(_not_e5m2_pair,)),
    Serves("matmul", "row", "torch._scaled_mm", multiples=ALIGNED, bias="out_dtype", why=TENSOR_CORES,
           checks=(_not_e5m2_pair, _rowwise_runs)),
    Serves("matmul", "block", "torch._scaled_mm's 1×128 · 128×128 scaling", (GROUP, BLOCK), (E4M3,),
           archs=((9, 0),), multiples=ALIGNED, checks=(_cublaslt_blockwise, _k_blocks_readable),
           why={"arch": "cuBLASLt", "formats": "the only pair verified on the H100"}),
    Serves("grouped_linear", "row", "torch._scaled_grouped_mm", None, (E4M3,), (torch.bfloat16,),
           archs=((9, 0), (10, 0)), multiples=ALIGNED, checks=(_grouped_runs,),
           why={"arch": "its FP8 kernels", "K": STRIDES, "N": STRIDES}),
), elsewhere={"grouped_linear": "torch._scaled_grouped_mm takes rowwise scales (and MX formats on sm100), "
                                "not 1×128 · 128×128 blocks; use triton or fbgemm"})


def why_not(op: str, p, found: Found = COMPLETE) -> list[str]:
    return TABLE.check(p, found)[0]


def matmul(a, b, out_dtype, bias=None):
    m, n = a.data.shape[0], b.data.shape[1]
    if a.block[1] < a.data.shape[1]:
        return lib.add_bias(_block_matmul(a, b, out_dtype), bias)
    sa, sb = a.scale, b.scale
    if sa.numel() != 1 or sb.numel() != 1:  # rowwise: scale_a (M, 1), scale_b (1, N), aligned by per_row
        sa = lib.per_row(sa, a.block[0], m)
        sb = lib.per_row(sb.t(), b.block[1], n).t()
    else:
        sa, sb = lib.aligned(sa), lib.aligned(sb)
    # bias rides in the epilogue only when it has the output's dtype, and never with fp32 output.
    fused = bias is not None and bias.dtype == out_dtype and out_dtype != torch.float32
    # Fast accumulation (no periodic fp32 promotion) for tensor and row, as FBGEMM and vLLM use;
    # the contract forbids it only for the block recipes.
    out = torch._scaled_mm(a.data, b.data, sa, sb, bias=bias if fused else None, out_dtype=out_dtype,
                           use_fast_accum=True)
    return out if fused or bias is None else lib.add_bias(out, bias)


def _block_matmul(a, b, out_dtype):
    """1×128 · 128×128 through cuBLASLt: scale_a column-major (M, K/128), scale_b (K/128, N/128)."""
    m = a.data.shape[0]
    data, scale = lib.pad_rows(a.data, a.scale, BLOCK_M_MULTIPLE)
    sa = scale.t().contiguous().t()  # a fresh copy (K/128 > 1 here), so aligned
    w_scale = b.scale.t()  # [N/128, K/128], the weight's own layout
    kb = w_scale.shape[1]
    if kb % 4 == 0:
        out = torch._scaled_mm(data, b.data, sa, lib.aligned(w_scale.contiguous()).t(), out_dtype=out_dtype)
    else:  # v1 silently misreads these scales; v2 takes them zero-padded to a multiple of 4 K blocks
        padded = w_scale.new_zeros(w_scale.shape[0], -(-kb // 4) * 4)
        padded[:, :kb] = w_scale
        out = F.scaled_mm(data, b.data, sa, F.ScalingType.BlockWise1x128, padded.t(),
                          F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return out[:m] if data.shape[0] != m else out


# --- grouped_linear: torch._scaled_grouped_mm --------------------------------------------------

def grouped_probe(device: torch.device) -> str | None:
    """Why this torch cannot run `torch._scaled_grouped_mm` on `device`, or None: the op must exist,
    have a kernel for the device's dispatch key, and (on CUDA) get one exact product right. Part of
    the probe; torch 2.13's CPU build has the op but no CPU kernel."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    dispatch_key = "CUDA" if device.type == "cuda" else device.type.upper()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_scaled_grouped_mm", dispatch_key):
        return f"torch {torch.__version__} has no {dispatch_key} kernel for torch._scaled_grouped_mm"
    x = torch.ones(32, 32, device=device).to(E4M3)
    w = torch.ones(2, 16, 32, device=device).to(E4M3)
    ends = torch.tensor([16, 32], dtype=torch.int32, device=device)
    try:
        out = torch._scaled_grouped_mm(x, w.transpose(-2, -1), torch.full((32,), 2.0, device=device),
                                       torch.full((2, 16), 3.0, device=device), offs=ends, out_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - an op that cannot run here is a reason
        return f"self-test: torch._scaled_grouped_mm raised {type(e).__name__}: {lib._first_line(e)}"
    if not torch.equal(out.float().cpu(), torch.full((32, 16), 192.0)):
        return f"self-test: torch._scaled_grouped_mm gave {out.flatten()[0].item()}, expected 192"
    return None


@lib.masked_as_contiguous
def grouped_linear(xq, x, w, offsets):
    groups, n, _ = w.data.shape
    sa = lib.per_row(x.scale, x.block[0], xq.shape[0]).view(-1)
    sb = lib.aligned(w.scale.reshape(groups, n))
    return torch._scaled_grouped_mm(xq, w.data.transpose(-2, -1), sa, sb, offs=offsets[1:].to(torch.int32),
                                    out_dtype=torch.bfloat16, use_fast_accum=True)


BACKEND = Backend(
    name="torch",
    probe=probe,
    why_not=why_not,
    matmul=matmul,
    grouped_linear=grouped_linear,
    traceable=frozenset({"matmul"}),
    version=lambda: f"{torch.__version__} (cuBLASLt {cublaslt_version() or '?'})",
    description="torch._scaled_mm / F.scaled_mm: cuBLASLt and CUTLASS FP8 GEMMs shipped with PyTorch",
)
