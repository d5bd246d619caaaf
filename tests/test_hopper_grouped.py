"""The Hopper grouped kernel (backends/triton/hopper_grouped.py): it compiles for sm90 with the
installed Triton on any machine, and on an sm90 GPU it matches the reference and the portable
kernel on empty experts, tails, masked padding, bias, both OCP formats and every output dtype."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fp8dispatch as fd
from fp8dispatch import registry
from fp8dispatch.numerics import ERROR_BOUND, relative_error

COMPILE_FOR_SM90 = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from fp8dispatch.backends.triton import hopper, hopper_grouped as hg

DTYPES = {"fp8e4nv": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}

def descriptor(name, rows, cols):
    return f"tensordesc<{name}[{rows}, {cols}],{hopper._layout(DTYPES[name], rows, cols)!r}>"

def build(fn, constexprs, types):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(names.index(k),): v for k, v in constexprs.items()},
                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr")})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    assert "wgmma" in kernel.asm["ptx"] and kernel.metadata.shared <= 232448, kernel.metadata.shared

regs = dict(CONSUMER_REGS=hopper.CONSUMER_REGS, LIST_API=hopper._list_api())
for masked, out, size in ((False, "bf16", 2), (True, "fp32", 4)):
    build(hg._grouped_block_kernel, dict(MASKED=masked, GROUP_M=hopper.GROUP_M, STAGES=hg.STAGES[size],
                                         PRODUCER_REGS=hg.PRODUCER_REGS, **regs),
          dict(x_desc=descriptor("fp8e4nv", hopper.HALF, 128), w_desc=descriptor("fp8e4nv", 128, 128),
               c_desc=descriptor(out, hopper.HALF, 128), out_ptr="*" + out, sx_ptr="*fp32", sw_ptr="*fp32",
               bias_ptr="*fp32", bounds_ptr="*i32"))
build(hopper._block_scaled_mm_kernel, dict(GROUP_M=hopper.GROUP_M, STAGES=hopper.STAGES,
                                           PRODUCER_REGS=hopper.PRODUCER_REGS, **regs),
      dict(a_desc=descriptor("fp8e4nv", hopper.HALF, 128), b_desc=descriptor("fp8e4nv", 128, 128),
           c_desc=descriptor("bf16", hopper.HALF, hopper.BLOCK_N),
           sa_ptr="*fp32", sb_ptr="*fp32", bias_ptr="*fp32"))
print("compiled")
"""


def test_the_hopper_kernels_compile_for_sm90_with_this_triton():
    """Both Gluon kernels (grouped and matmul) through Triton's own compiler and ptxas, no GPU: this
    catches an API a Triton release renamed (3.9 removed `tma.async_copy_global_to_shared`, which
    left the matmul kernel failing to build there, the portable kernel serving in its place)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _sm90(), reason="the Hopper grouped kernel runs on an sm90 GPU only")


def _operands(layout, n, k, x_dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if layout == "contiguous":
        counts = [0, 300, 1, 129, 0, 200]  # empty experts, first and last; rows not multiples of anything
        offsets, masked_m = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device="cuda"), None
        groups, rows = len(counts), sum(counts)
        x = torch.randn(rows, k, device="cuda", generator=gen)
        xq = fd.quantize(x, "group", dtype=x_dtype, backend="reference")
    else:
        groups, max_m = 4, 192
        offsets, masked_m = None, torch.tensor([0, 192, 5, 130], dtype=torch.int32, device="cuda")
        x = torch.randn(groups * max_m, k, device="cuda", generator=gen)
        q = fd.quantize(x, "group", dtype=x_dtype, backend="reference")
        xq = fd.Fp8Tensor(q.data.view(groups, max_m, k), q.scale, q.block)
    w = torch.randn(groups, n, k, device="cuda", generator=gen) / k**0.5
    return xq, fd.quantize_grouped(w, "block", backend="reference"), offsets, masked_m


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("n, k", [(256, 512), (200, 336)])  # N and K tails (a partial 128 block each)
@pytest.mark.parametrize("x_dtype, out_dtype, bias", [
    (torch.float8_e4m3fn, torch.bfloat16, False), (torch.float8_e5m2, torch.float32, True),
    (torch.float8_e4m3fn, torch.float16, True)])
def test_the_hopper_grouped_kernel_matches_the_reference(layout, n, k, x_dtype, out_dtype, bias):
    from fp8dispatch.backends.triton import grouped

    xq, wq, offsets, masked_m = _operands(layout, n, k, x_dtype)
    b = torch.randn(wq.data.shape[0], n, device="cuda") if bias else None
    got = grouped.grouped_linear(xq, wq, offsets, masked_m, out_dtype, b, kernel="hopper")
    want = registry.get_backend("reference").grouped_linear(xq, wq, offsets, masked_m, torch.float32, b)
    portable = grouped.grouped_linear(xq, wq, offsets, masked_m, out_dtype, b, kernel="portable")
    assert got.shape == want.shape and got.dtype == out_dtype
    # Both kernels promote each 128-wide K step in fp32 like the reference; within a step Hopper's
    # FP8 wgmma accumulates with about 14 mantissa bits (the DeepSeek-V3 report's figure), so an
    # fp32 result differs from the reference by up to ~2^-11 of the largest output; bf16 and fp16
    # outputs add their own rounding (2^-8, 2^-11 relative).
    tol = {torch.float32: 2**-11, torch.bfloat16: 2**-7, torch.float16: 2**-10}[out_dtype]
    assert relative_error(got.float(), want) < ERROR_BOUND  # the contract's bound
    scale = want.abs().max()
    assert (got.float() - want).abs().max() <= tol * scale
    assert (got.float() - portable.float()).abs().max() <= tol * scale
    if masked_m is not None:  # rows past masked_m[g] are zero, bias or not
        for g, valid in enumerate(masked_m.tolist()):
            assert (got[g, valid:] == 0).all()


@gpu
def test_the_backend_runs_the_hopper_kernel_from_its_minimum_rows_per_expert():
    from fp8dispatch.backends.triton import grouped

    xq, wq, offsets, _ = _operands("contiguous", 256, 512, torch.float8_e4m3fn)  # 630 rows, 6 experts
    for rows, hopper in ((6 * grouped.HOPPER_MIN_ROWS - 1, False), (6 * grouped.HOPPER_MIN_ROWS, True)):
        x = fd.Fp8Tensor(xq.data[:rows], xq.scale[:rows], xq.block)
        assert grouped._hopper_takes(x, wq, offsets, torch.bfloat16, None) is hopper, rows


@gpu
@pytest.mark.parametrize("kernel", ["portable", "hopper"])
def test_offsets_out_of_range_stay_in_bounds(kernel):
    """Under CUDA-graph capture offsets are not checked on the host (that would end the capture):
    the kernels clamp them into [0, M], so bad values compute a defined result and write nothing
    outside the output."""
    from fp8dispatch.backends.triton import grouped

    xq, wq, _, _ = _operands("contiguous", 256, 512, torch.float8_e4m3fn)  # 630 rows, 6 experts
    bad = torch.tensor([-5, 300, 10**6, 2, 640, 630, 10**9], device="cuda")
    clamped = torch.tensor([0, 300, 630, 630, 630, 630, 630], device="cuda")
    got = grouped.grouped_linear(xq, wq, bad, None, torch.float32, kernel=kernel)
    torch.cuda.synchronize()
    want = grouped.grouped_linear(xq, wq, clamped, None, torch.float32, kernel=kernel)
    assert torch.equal(got, want)
