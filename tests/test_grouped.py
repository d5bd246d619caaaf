"""grouped_linear: the quantizer, the reference against the per-expert loop, every bad input, routing,
and the library translations (fbgemm, torch) run against stand-ins written from their documented layouts."""

from types import SimpleNamespace

import pytest
import torch

import fp8dispatch as fd
from fp8dispatch import GroupedFp8Tensor, registry
from fp8dispatch.backends import fbgemm as fbgemm_backend
from fp8dispatch.backends import torch as torch_backend
from fp8dispatch.errors import Fp8TypeError, Fp8ValueError, NoBackend, Unsupported

G, N, K = 3, 200, 300
OFFSETS = torch.tensor([0, 4, 4, 11])


def _weights(g=G, n=N, k=K, seed=0):
    return torch.randn(g, n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def _x(m, k=K, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


# --- the quantizer --------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, granularity", [("block", "block"), ("row", "row")])
def test_quantize_grouped_is_the_per_expert_quantizer_bit_for_bit(recipe, granularity):
    w = _weights()  # N = 200: the second 128-row block of every expert is partial
    wq = fd.quantize_grouped(w, recipe, backend="reference")
    for g in range(G):
        one = fd.quantize(w[g], granularity, backend="reference")
        assert torch.equal(wq.data[g].view(torch.uint8), one.data.view(torch.uint8))
        assert torch.equal(wq.scale[g], one.scale)
    assert wq.scale.shape == ((G, 2, 3) if recipe == "block" else (G, N, 1))


@pytest.mark.parametrize("recipe", ["block", "row"])
def test_quantize_grouped_works_a_few_experts_at_a_time(recipe, monkeypatch):
    """256 experts of 4096×7168 would be one 28 GiB fp32 working copy in one quantize call: each call
    covers at most QUANTIZE_CHUNK_ELEMENTS of w (rounded to whole experts), with the same bits."""
    from fp8dispatch import api, grouped

    whole = fd.quantize_grouped(_weights(g=5), recipe, backend="reference")
    seen, quantize = [], api.quantize
    monkeypatch.setattr(api, "quantize", lambda x, *a, **k: seen.append(x.numel()) or quantize(x, *a, **k))
    monkeypatch.setattr(grouped, "QUANTIZE_CHUNK_ELEMENTS", 2 * 256 * K)  # two experts of N padded to 256
    chunked = fd.quantize_grouped(_weights(g=5), recipe, backend="reference")
    rows = 256 if recipe == "block" else N
    assert seen == [2 * rows * K, 2 * rows * K, rows * K]
    assert torch.equal(chunked.data.view(torch.uint8), whole.data.view(torch.uint8))
    assert torch.equal(chunked.scale, whole.scale)


def test_quantize_grouped_rejects_bad_weights():
    with pytest.raises(Fp8ValueError, match="w: expected a 3-d"):
        fd.quantize_grouped(torch.randn(4, 4))
    with pytest.raises(Fp8TypeError, match="w: expected float32"):
        fd.quantize_grouped(torch.zeros(2, 4, 4, dtype=torch.float8_e4m3fn))
    with pytest.raises(Fp8ValueError, match="recipe"):
        fd.quantize_grouped(_weights(), "tensor")


def test_grouped_tensor_checks_its_scale_shape():
    wq = fd.quantize_grouped(_weights())
    with pytest.raises(Fp8ValueError, match=r"scale: expected shape \(3, 2, 3\)"):
        GroupedFp8Tensor(wq.data, wq.scale[:, :1], wq.block)
    with pytest.raises(Fp8TypeError, match="scale: expected a float32"):
        GroupedFp8Tensor(wq.data, wq.scale.double(), wq.block)


# --- the reference is the per-expert loop ---------------------------------------------------


def test_reference_contiguous_equals_the_per_expert_linear_loop():
    wq, x = fd.quantize_grouped(_weights()), _x(11)
    bias = torch.randn(G, N)
    out = fd.grouped_linear(x, wq, OFFSETS, bias=bias, backend="reference")
    bounds = OFFSETS.tolist()
    for g in range(G):
        rows = x[bounds[g]:bounds[g + 1]]
        if len(rows):
            want = fd.linear(rows, wq.expert(g), bias[g], backend="reference")
            assert torch.equal(out[bounds[g]:bounds[g + 1]], want)


def test_reference_masked_equals_the_loop_and_zeroes_padding():
    wq = fd.quantize_grouped(_weights())
    x = _x(G * 5).view(G, 5, K).clone()
    x[0, 2:] = float("nan")  # padding rows of expert 0
    masked_m = torch.tensor([2, 0, 5], dtype=torch.int32)
    out = fd.grouped_linear(x, wq, masked_m=masked_m, backend="reference")
    assert out.shape == (G, 5, N) and out.dtype == torch.bfloat16
    assert torch.equal(out[0, :2], fd.linear(x[0, :2], wq.expert(0), backend="reference"))
    assert torch.equal(out[2], fd.linear(x[2], wq.expert(2), backend="reference"))
    assert (out[0, 2:] == 0).all() and (out[1] == 0).all()


def test_high_precision_weights_are_quantized_per_call_like_the_quantizer():
    w, x = _weights(), _x(11)
    got = fd.grouped_linear(x, w, OFFSETS, backend="reference")
    want = fd.grouped_linear(x, fd.quantize_grouped(w), OFFSETS, backend="reference")
    assert torch.equal(got, want)


def test_k_zero_gives_each_experts_bias_on_its_rows():
    w = torch.zeros(G, 8, 0)
    bias = torch.arange(G * 8, dtype=torch.float32).view(G, 8)
    out = fd.grouped_linear(torch.zeros(11, 0), w, OFFSETS, bias=bias)
    assert torch.equal(out[:4], bias[0].expand(4, 8)) and torch.equal(out[4:], bias[2].expand(7, 8))
    masked = fd.grouped_linear(torch.zeros(G, 2, 0), w, masked_m=torch.tensor([1, 2, 0]), bias=bias)
    assert torch.equal(masked[0, 0], bias[0]) and (masked[0, 1] == 0).all() and (masked[2] == 0).all()


# --- every bad input: a typed error naming the argument --------------------------------------


def _bad_calls(wq, x):
    m = torch.tensor([1, 2, 3], dtype=torch.int32)
    x3 = _x(G * 4).view(G, 4, K)
    return [
        (Fp8ValueError, "offsets, masked_m: expected exactly one", lambda: fd.grouped_linear(x, wq)),
        (Fp8ValueError, "offsets, masked_m: expected exactly one",
         lambda: fd.grouped_linear(x, wq, OFFSETS, masked_m=m)),
        (Fp8ValueError, r"offsets: expected shape \(4,\)", lambda: fd.grouped_linear(x, wq, OFFSETS[:3])),
        (Fp8TypeError, "offsets: expected an int32 or int64", lambda: fd.grouped_linear(x, wq, OFFSETS.float())),
        (Fp8TypeError, "offsets: expected a torch.Tensor", lambda: fd.grouped_linear(x, wq, [0, 4, 4, 11])),
        (Fp8ValueError, r"offsets: expected offsets\[0\] == 0",
         lambda: fd.grouped_linear(x, wq, torch.tensor([1, 4, 4, 11]))),
        (Fp8ValueError, r"offsets: expected offsets\[G\] == M == 11",
         lambda: fd.grouped_linear(x, wq, torch.tensor([0, 4, 4, 10]))),
        (Fp8ValueError, r"offsets: expected non-decreasing values, got offsets\[1\] = 6",
         lambda: fd.grouped_linear(x, wq, torch.tensor([0, 6, 4, 11]))),
        (Fp8ValueError, r"masked_m: expected values in \[0, max_m=4\], got masked_m\[2\] = 5",
         lambda: fd.grouped_linear(x3, wq, masked_m=torch.tensor([0, 4, 5]))),
        (Fp8ValueError, r"masked_m: expected values in \[0, max_m=4\], got masked_m\[0\] = -1",
         lambda: fd.grouped_linear(x3, wq, masked_m=torch.tensor([-1, 4, 4]))),
        (Fp8ValueError, r"masked_m: expected shape \(3,\)", lambda: fd.grouped_linear(x3, wq, masked_m=m[:2])),
        (Fp8TypeError, "masked_m: expected an int32 or int64",
         lambda: fd.grouped_linear(x3, wq, masked_m=m.float())),
        (Fp8ValueError, r"x: expected a 3-d \[G=3, max_m, K\]", lambda: fd.grouped_linear(x, wq, masked_m=m)),
        (Fp8ValueError, r"x: expected a 3-d \[G=3, max_m, K\]",
         lambda: fd.grouped_linear(x3[:2], wq, masked_m=m)),
        (Fp8ValueError, r"x: expected a 2-d \[M, K\]", lambda: fd.grouped_linear(x3, wq, OFFSETS)),
        (Fp8ValueError, "w: expected K=299", lambda: fd.grouped_linear(x[:, :299], wq, OFFSETS)),
        (Fp8ValueError, r"w: expected a 3-d \[G, N, K\]", lambda: fd.grouped_linear(x, torch.randn(N, K), OFFSETS)),
        (Fp8TypeError, "w: expected a .* GroupedFp8Tensor .* got an Fp8Tensor",
         lambda: fd.grouped_linear(x, fd.quantize(torch.randn(N, K), "block"), OFFSETS)),
        (Fp8TypeError, "w: expected float32.*quantize_grouped",
         lambda: fd.grouped_linear(x, wq.data, OFFSETS)),
        (Fp8TypeError, "x: expected float32.*Fp8Tensor",
         lambda: fd.grouped_linear(x.to(torch.float8_e4m3fn), wq, OFFSETS)),
        (Fp8ValueError, r"bias: expected shape \(3, 200\)",
         lambda: fd.grouped_linear(x, wq, OFFSETS, bias=torch.zeros(N))),
        (Fp8ValueError, "recipe: expected one of block, row",
         lambda: fd.grouped_linear(x, torch.randn(G, N, K), OFFSETS, recipe="tensor")),
        (Fp8ValueError, "recipe: 'row' contradicts w's per-expert blocks",
         lambda: fd.grouped_linear(x, wq, OFFSETS, recipe="row")),
        (Fp8ValueError, "x: expected per-row blocks",
         lambda: fd.grouped_linear(fd.quantize(x.float(), "block"), wq, OFFSETS)),
        (Fp8ValueError, "x: K blocks must line up",
         lambda: fd.grouped_linear(fd.quantize(x.float(), "group", block_size=64), wq, OFFSETS)),
        (Fp8TypeError, "out_dtype", lambda: fd.grouped_linear(x, wq, OFFSETS, out_dtype=torch.int8)),
        (fd.UnknownBackend, "backend: unknown name 'nope'", lambda: fd.grouped_linear(x, wq, OFFSETS, backend="nope")),
    ]


def test_every_bad_input_raises_a_typed_error_naming_the_argument():
    wq, x = fd.quantize_grouped(_weights()), _x(11)
    for error, message, bad in _bad_calls(wq, x):
        with pytest.raises(error, match=message):
            bad()


def test_explain_grouped_lists_every_backend_and_never_raises():
    wq, x = fd.quantize_grouped(_weights()), _x(11)
    table = fd.explain_grouped(x, wq, OFFSETS)
    assert table.startswith("grouped_linear(contiguous") and "reference" in table and "chosen:" in table
    assert fd.explain_grouped(x, wq).startswith("Fp8ValueError: offsets, masked_m")


# --- routing --------------------------------------------------------------------------------


def test_a_named_backend_that_cannot_run_it_raises_its_reasons():
    wq, x = fd.quantize_grouped(_weights()), _x(11)
    with pytest.raises(NoBackend, match="torch") as caught:
        fd.grouped_linear(x, wq, OFFSETS, backend="torch")
    assert isinstance(caught.value, Unsupported)


def test_the_per_op_environment_variable_routes_grouped_linear(sandbox):
    calls = []

    def counting(x, w, offsets, masked_m, out_dtype, bias=None):
        calls.append(offsets is None)
        return registry.get_backend("reference").grouped_linear(x, w, offsets, masked_m, out_dtype, bias)

    fd.register_backend(fd.Backend(name="counting", probe=lambda: None, why_not=lambda op, p, found: [],
                                   grouped_linear=counting, priority=-100))
    wq, x = fd.quantize_grouped(_weights()), _x(11)
    fd.grouped_linear(x, wq, OFFSETS)
    assert calls == []  # auto: the reference outranks priority -100
    sandbox.env(FP8DISPATCH_GROUPED_LINEAR_BACKEND="counting")
    fd.grouped_linear(x, wq, OFFSETS)
    assert calls == [False]


def test_torch_grouped_availability_comes_from_a_probe():
    reason = torch_backend.grouped_probe(torch.device("cpu"))
    if hasattr(torch, "_scaled_grouped_mm"):  # torch 2.13's CPU build: the op, without a CPU kernel
        assert reason and "no CPU kernel for torch._scaled_grouped_mm" in reason
    else:
        assert reason and "has no torch._scaled_grouped_mm" in reason


# --- library translations against stand-ins written from the libraries' documented layouts ----


def _dequantized_rows(xq, xs):  # xs: one scale per row and K block, [M, KB]
    k = xq.shape[1]
    return xq.float() * xs.repeat_interleave(128, 1)[:, :k]


def _fake_groupwise_grouped(xq, wq, x_scale, w_scale, sizes):
    """fbgemm 1.6: expert g's x scales are a [K/128, M_g] block at offset_g * K/128, its w scales
    [K/128, N/128] (w_scale [G, K/128, N/128]); bf16 out."""
    g_count, n, k = wq.shape
    kb = k // 128
    out, start = torch.empty(xq.shape[0], n), 0
    for g, m in enumerate(sizes.tolist()):
        xs = x_scale[start * kb: (start + m) * kb].view(kb, m).t()
        ws = w_scale[g].t().repeat_interleave(128, 0).repeat_interleave(128, 1)
        out[start:start + m] = _dequantized_rows(xq[start:start + m], xs) @ (wq[g].float() * ws).t()
        start += m
    return out.to(torch.bfloat16)


def _fake_rowwise_stacked(xq, wq, x_scale, w_scale, sizes):
    out, start = torch.empty(xq.shape[0], wq.shape[1]), 0
    for g, m in enumerate(sizes.tolist()):
        rows = xq[start:start + m].float() * x_scale[start:start + m, None]
        out[start:start + m] = rows @ (wq[g].float() * w_scale[g][:, None]).t()
        start += m
    return out.to(torch.bfloat16)


def _fake_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, out_dtype=None, use_fast_accum=False):
    """torch 2.11, 2-d × 3-d: a [M, K], b [G, K, N] (column-major), scale_a [M], scale_b [G, N],
    offs int32 group ends."""
    assert offs.dtype == torch.int32 and scale_a.shape == (a.shape[0],) and scale_b.shape == b.shape[::2]
    out, start = torch.empty(a.shape[0], b.shape[2]), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = (a[start:end].float() * scale_a[start:end, None]) @ (b[g].float() * scale_b[g][None, :])
        start = end
    return out.to(out_dtype)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("recipe", ["block", "row"])
def test_fbgemm_translation_matches_the_reference(monkeypatch, recipe, layout):
    fake = SimpleNamespace(f8f8bf16_groupwise_grouped=_fake_groupwise_grouped,
                           f8f8bf16_rowwise_grouped_stacked=_fake_rowwise_stacked)
    monkeypatch.setattr(fbgemm_backend, "_ops", lambda: fake)
    _translation_matches(fbgemm_backend.grouped_linear, recipe, layout)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_torch_translation_matches_the_reference(monkeypatch, layout):
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _fake_scaled_grouped_mm, raising=False)
    _translation_matches(torch_backend.grouped_linear, "row", layout)


def _translation_matches(run, recipe, layout):
    g, n, k = 4, 256, 384  # the multiples of 128 fbgemm's groupwise kernel needs
    wq = fd.quantize_grouped(_weights(g, n, k), recipe)
    gran = "group" if recipe == "block" else "row"
    if layout == "contiguous":
        offsets, masked_m = torch.tensor([0, 3, 3, 10, 12]), None
        x = fd.quantize(_x(12, k).float(), gran)
    else:
        offsets, masked_m = None, torch.tensor([0, 2, 4, 1], dtype=torch.int32)
        q = fd.quantize(_x(g * 4, k).float(), gran)
        x = fd.Fp8Tensor(q.data.view(g, 4, k), q.scale, q.block)
    got = run(x, wq, offsets, masked_m, torch.bfloat16)
    want = registry.get_backend("reference").grouped_linear(x, wq, offsets, masked_m, torch.bfloat16)
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    if masked_m is not None:
        assert (got[0] == 0).all() and (got[1, 2:] == 0).all()


# --- the Triton kernel compiles for Hopper (no GPU needed: Triton's own compiler and ptxas) ----

COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fp8dispatch.backends.triton.grouped import _grouped_kernel

names = _grouped_kernel.arg_names
for x, out, bounds, masked, scale_k, even_k, block_m, warps in (
        ("*fp8e4nv", "*bf16", "*i64", False, 128, False, 128, 8), ("*fp8e5", "*fp32", "*i32", True, 0, True, 64, 4)):
    types = {"x_ptr": x, "w_ptr": "*fp8e4nv", "out_ptr": out, "sx_ptr": "*fp32", "sw_ptr": "*fp32",
             "bias_ptr": "*fp32", "bounds_ptr": bounds}
    const = dict(MASKED=masked, SCALE_K=scale_k, HAS_BIAS=True, EVEN_K=even_k, BLOCK_M=block_m, BLOCK_N=128,
                 BLOCK_K=128, NUM_PROGRAMS=132)
    signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    source = ASTSource(fn=_grouped_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
    assert "cubin" in kernel.asm
print("compiled")
"""


def test_the_grouped_kernel_compiles_for_sm90():
    """The interpreter runs Python, not the compiler: this catches what only compilation rejects
    (loop-carried types, dynamic control flow), in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (8, 9), (8, 0)])
def test_every_builtin_why_not_answers_grouped_problems_of_any_gpu(capability):
    """What `fp8dispatch support-matrix` asks: each built-in backend, a GPU it may not have."""
    from fp8dispatch.grouped import GroupedLinearProblem, grouped_block

    for recipe in ("block", "row"):
        for layout in ("contiguous", "masked"):
            problem = GroupedLinearProblem(torch.device("cuda", 0), capability, layout, recipe, torch.float8_e4m3fn,
                                           torch.float8_e4m3fn, 8, 64, 256, 384, (1, 128) if recipe == "block"
                                           else (1, 384), grouped_block(recipe, 256, 384), torch.int64, True, True,
                                           torch.bfloat16, None)
            for backend in registry.all_backends():
                if backend.grouped_linear is not None:
                    reasons = backend.why_not("grouped_linear", problem)
                    assert all(isinstance(r, str) and r for r in reasons), (backend.name, reasons)



# --- offsets on a GPU: never read on the host, made safe on the device ---------------------


def test_safe_offsets_keep_valid_values_and_make_invalid_ones_valid():
    from fp8dispatch.grouped import safe_offsets

    assert safe_offsets(torch.tensor([0, 3, 3, 10]), 10).tolist() == [0, 3, 3, 10]
    assert safe_offsets(torch.tensor([-4, 7, 2, 50, 9]), 10).tolist() == [0, 7, 7, 10, 10]
    assert safe_offsets(torch.tensor([5, 6, 8]), 10).tolist() == [0, 6, 10]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="offsets on a GPU: needs a CUDA device")


def _bad_offsets_call(backend):
    wq = fd.quantize_grouped(_weights().cuda(), "block" if backend != "torch" else "row", backend="reference")
    x = fd.quantize(_x(11).float().cuda(), "group" if backend != "torch" else "row", backend="reference")
    return lambda offsets: fd.grouped_linear(x, wq, offsets.cuda(), backend=backend)


@cuda
@pytest.mark.parametrize("backend", [b.name for b in registry.all_backends() if b.grouped_linear is not None])
def test_bad_offsets_on_a_gpu_stay_in_bounds_on_every_backend(backend, monkeypatch):
    """Not read on the host (no synchronization): a bad `offsets` computes what its valid version
    does, bit for bit, on every backend; FP8DISPATCH_CHECK_OFFSETS=1 reads them and raises."""
    call = _bad_offsets_call(backend)
    try:
        want = call(torch.tensor([0, 4, 11, 11]))
    except Unsupported as e:
        pytest.skip(f"{backend} cannot run this problem: {e}")
    got = call(torch.tensor([-3, 4, 99, 5]))
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    monkeypatch.setenv("FP8DISPATCH_CHECK_OFFSETS", "1")
    registry.refresh()
    try:
        with pytest.raises(Fp8ValueError, match=r"offsets\[0\] == 0"):
            call(torch.tensor([-3, 4, 99, 5]))
    finally:
        monkeypatch.delenv("FP8DISPATCH_CHECK_OFFSETS")
        registry.refresh()
