"""The triton backend's kernels: bit-identical to the reference, two launches for tensorwise, the
interpreter cast fix, and the reasons `why_not` gives. They run where the backend runs: on the GPU
when there is one, else on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1
on a machine without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import fp8dispatch  # noqa: E402
from fp8dispatch.backends import reference  # noqa: E402
from fp8dispatch.backends import triton as backend  # noqa: E402
from fp8dispatch.blocks import block_for  # noqa: E402
from fp8dispatch.numerics import ERROR_BOUND, relative_error, special_values  # noqa: E402
from fp8dispatch.problem import MatmulProblem, QuantizeProblem, device_capability  # noqa: E402
from fp8dispatch.registry import probe_result, probed  # noqa: E402
from fp8dispatch.tensor import Fp8Tensor  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda")
if probe_result("triton") is not None:
    pytest.skip(f"the triton backend cannot run here: {probe_result('triton')}", allow_module_level=True)
interpreter_only = pytest.mark.skipif(not INTERPRETER, reason="checks the interpreter (CPU tensors)")

kernels = backend.kernels()
# The special values overflow numpy on purpose inside the interpreter (x / tiny scale -> inf).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def assert_same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    g, w = got.view(ints), want.view(ints)
    differ = int((g != w).sum())
    assert differ == 0, f"{differ} of {g.numel()} differ; first at {(g != w).nonzero()[0].tolist()}"


# --- the interpreter's cast fix ---------------------------------------------------------------


@interpreter_only
def test_interpreter_fix_is_installed_once():
    from triton.runtime import interpreter as triton_interpreter

    from fp8dispatch.backends.triton import interpreter

    assert interpreter.install() and interpreter.install()
    assert getattr(triton_interpreter._convert_float, "_fp8dispatch", False)


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_every_bf16_pattern_casts_like_torch(fp8):
    """All 65536 bf16 bit patterns through a kernel's saturating cast equal torch's clamp + cast."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    x, one = x.to(DEVICE), torch.ones(1, 1, device=DEVICE)
    data, scale = kernels.quantize(x, (256, 256), fp8, scale=one)
    want = reference.quantize(x, (256, 256), fp8, scale=one)[0]
    assert_same_bits(data, want)


# --- quantize ---------------------------------------------------------------------------------

SHAPES = [(1, 128), (37, 300), (130, 256)]


@pytest.mark.parametrize("granularity", ["tensor", "row", "group", "block"])
@pytest.mark.parametrize("fp8", [E4M3, E5M2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_bit_identical(granularity, fp8, shape):
    for in_dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = special_values(*shape, in_dtype, device=DEVICE)
        block = block_for(granularity, *shape, 128)
        data, scale = kernels.quantize(x, block, fp8)
        want_data, want_scale = reference.quantize(x, block, fp8)
        assert_same_bits(scale, want_scale)
        assert_same_bits(data, want_data)


@pytest.mark.parametrize("granularity", ["tensor", "row", "group", "block"])
@pytest.mark.parametrize("options", [{"pow2_scale": True}, {"scale_ub": 30.0}, {"user": True}],
                         ids=["pow2", "scale_ub", "user_scale"])
def test_quantize_options_bit_identical(granularity, options):
    x = special_values(70, 300, torch.bfloat16, seed=1, device=DEVICE)
    block = block_for(granularity, 70, 300, 128)
    options = dict(options)
    if options.pop("user", False):  # 0.5× the automatic scale: half the values saturate
        options["scale"] = reference.quantize(x, block, E4M3)[1] * 0.5
    got = kernels.quantize(x, block, E4M3, **options)
    want = reference.quantize(x, block, E4M3, **options)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])


@pytest.mark.parametrize("block", [(1, 100), (1, 300), (48, 64), (300, 1), (2, 300)])
def test_quantize_odd_blocks(block):
    """Group widths that are not powers of two, and blocks the chunked kernel sweeps."""
    x = special_values(50, 300, seed=2, device=DEVICE)
    got = kernels.quantize(x, block, E4M3)
    want = reference.quantize(x, block, E4M3)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])


def test_wide_rows_take_the_chunked_path():
    """A row wider than one tile (16384) is swept twice: amax, then cast."""
    x = special_values(2, 20000, seed=3, device=DEVICE)
    got = kernels.quantize(x, (1, 20000), E4M3)
    want = reference.quantize(x, (1, 20000), E4M3)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])



# The two-sweep 1×g kernel, called directly with plans that force every case: chunks that divide
# the group or leave a tail, rows per program that leave a tail, several groups per row, a last
# group cut short by C. (shape, g, block_r, chunk)
WIDE_CASES = [
    ((37, 7168), 7168, None, None),  # a DeepSeek-width row, the default plan
    ((5, 7168), 7168, 2, 2048),  # 7168 = 3.5 chunks of 2048: a masked last chunk
    ((5, 300), 300, 4, 128),
    ((9, 300), 100, 2, 64),  # three groups per row, each 1.6 chunks
    ((6, 250), 100, 4, 32),  # the last group is 50 wide
    ((4, 512), 256, 1, 64),  # every chunk full: no column mask
]


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}_g{c[1]}_r{c[2]}_c{c[3]}")
def test_wide_groups_bit_identical(fp8, case):
    from fp8dispatch.backends.triton import quantize as q

    shape, g, block_r, chunk = case
    for in_dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = special_values(*shape, in_dtype, seed=8, device=DEVICE)
        got = q._quantize_wide_groups(x, g, fp8, None, None, False, block_r=block_r, chunk=chunk,
                                      evict=block_r == 2, unroll=2 if block_r == 4 else None)
        want = reference.quantize(x, (1, g), fp8)
        assert_same_bits(got[1], want[1])
        assert_same_bits(got[0], want[0])


@pytest.mark.parametrize("options", [{"pow2_scale": True}, {"scale_ub": 30.0}, {"user": True}],
                         ids=["pow2", "scale_ub", "user_scale"])
@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_wide_rows_options_bit_identical(options, fp8):
    """Through `quantize`: a 1100-wide row is swept (≥ 1024, not a power of two)."""
    x = special_values(20, 1100, torch.bfloat16, seed=9, device=DEVICE)
    options = dict(options)
    if options.pop("user", False):
        options["scale"] = reference.quantize(x, (1, 1100), fp8)[1] * 0.5
    got = kernels.quantize(x, (1, 1100), fp8, **options)
    want = reference.quantize(x, (1, 1100), fp8, **options)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])


def test_wide_rows_strided_input():
    from fp8dispatch.backends.triton import quantize as q

    x = special_values(1100, 6, seed=10, device=DEVICE).t()  # [6, 1100], column-major
    got = q._quantize_wide_groups(x, 1100, E4M3, None, None, False, block_r=4, chunk=256)
    want = reference.quantize(x, (1, 1100), E4M3)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])


def test_which_rows_are_swept(monkeypatch):
    from fp8dispatch.backends.triton import quantize as q

    assert [q.swept(g) for g in (100, 300, 1024, 1100, 7168, 8192, 16384, 20000)] == \
        [False, False, False, True, True, False, False, True]
    calls = []
    for name in ("_groups", "_wide_groups", "_blocks"):
        monkeypatch.setattr(q, name, _Counting(getattr(q, name), calls))
    x = special_values(3, 7168, torch.bfloat16, seed=11, device=DEVICE)
    q.quantize(x, (1, 7168), E4M3)
    q.quantize(x[:, :4096], (1, 4096), E4M3)
    q.quantize(x, (1, 128), E4M3)
    assert calls == [q._wide_groups_kernel, q._groups_kernel, q._groups_kernel]


@pytest.mark.parametrize("path, knobs", [
    ("groups", dict(tile=2048, groups=1, num_warps=2)),
    ("groups", dict(tile=4096, groups=4, num_warps=8)),
    ("blocks", dict(tile=1024, num_warps=2)),  # 128×128 blocks swept in 16 chunks of 8×128
    ("blocks", dict(tile=32768, num_warps=16)),
])
def test_tunable_tiles_bit_identical(path, knobs):
    """The knobs the GPU sweep turns change the work split, never the bits."""
    from fp8dispatch.backends.triton import quantize as q

    x = special_values(130, 300, torch.bfloat16, seed=12, device=DEVICE)
    block = (1, 128) if path == "groups" else (128, 128)
    fn = q._quantize_groups if path == "groups" else q._quantize_blocks
    got = fn(x, block[1] if path == "groups" else block, E4M3, None, None, False, **knobs)
    want = reference.quantize(x, block, E4M3)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])


@pytest.mark.parametrize("knob", ["block_r", "chunk"])
def test_wide_groups_knobs_must_be_powers_of_two(knob):
    from fp8dispatch.backends.triton import quantize as q
    from fp8dispatch.errors import Fp8ValueError

    with pytest.raises(Fp8ValueError, match=f"{knob}: expected a power of two"):
        q._quantize_wide_groups(torch.zeros(2, 1100, device=DEVICE), 1100, E4M3, None, None, False, **{knob: 100})

def test_quantize_strided_input():
    x = special_values(300, 64, seed=4, device=DEVICE).t()  # [64, 300], column-major
    got = kernels.quantize(x, (1, 128), E4M3)
    want = reference.quantize(x, (1, 128), E4M3)
    assert_same_bits(got[1], want[1])
    assert_same_bits(got[0], want[0])


def test_public_api_with_leading_dims():
    x = special_values(24, 256, torch.bfloat16, seed=5, device=DEVICE).reshape(2, 12, 256)
    got = fp8dispatch.quantize(x, "group", backend="triton")
    want = fp8dispatch.quantize(x, "group", backend="reference")
    assert got.data.shape == x.shape and got.scale.shape == (24, 2)
    assert_same_bits(got.scale, want.scale)
    assert_same_bits(got.data, want.data)


class _Counting:
    """Stands in for a kernel's launcher and counts its launches."""

    def __init__(self, launcher, calls):
        self.launcher, self.calls = launcher, calls

    def __call__(self, *args):
        self.calls.append(self.launcher.kernel)
        return self.launcher(*args)


def test_tensorwise_two_launches_and_reciprocal(monkeypatch):
    from fp8dispatch.backends.triton import quantize as q

    calls = []
    for name in ("_tensor_amax", "_tensor_cast", "_groups", "_blocks"):
        monkeypatch.setattr(q, name, _Counting(getattr(q, name), calls))
    x = special_values(300, 500, seed=6, device=DEVICE)
    data, scales = q.quantize_tensorwise(x, E4M3)
    assert len(calls) == 2
    want_data, want_scale = reference.quantize(x, (300, 500), E4M3)
    assert_same_bits(scales[:1].view(1, 1), want_scale)
    assert_same_bits(data, want_data)
    assert_same_bits(scales[1:], torch.tensor([1.0], device=DEVICE) / want_scale.view(1))


# --- dequantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "row", "group", "block"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_exact(granularity, out_dtype):
    x = special_values(37, 300, seed=7, device=DEVICE)
    block = block_for(granularity, 37, 300, 128)
    data, scale = reference.quantize(x, block, E4M3)
    got = kernels.dequantize(data, scale, block, out_dtype)
    want = reference.dequantize(data, scale, block, out_dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert_same_bits(got[~nan], want[~nan])


# --- matmul -----------------------------------------------------------------------------------


def _operands(m, n, k, recipe, group=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, w = torch.randn(m, k, generator=g).to(DEVICE), torch.randn(n, k, generator=g).to(DEVICE)
    a_block = {"block": (1, group), "row": (1, k), "tensor": (m, k)}[recipe]
    w_block = {"block": (group, group), "row": (1, k), "tensor": (n, k)}[recipe]
    return (Fp8Tensor(*reference.quantize(a, a_block, E4M3), a_block),
            Fp8Tensor(*reference.quantize(w, w_block, E4M3), w_block))


@pytest.mark.parametrize("recipe", ["block", "row", "tensor"])
@pytest.mark.parametrize("m,n,k", [(1, 96, 256), (70, 200, 384), (130, 64, 300)])
def test_matmul_matches_reference(recipe, m, n, k):
    """M = 1 takes the swapped small-M kernel, 70 and 130 the tiled one; N and K have tails."""
    qa, qw = _operands(m, n, k, recipe)
    bias = torch.randn(n).to(torch.bfloat16).to(DEVICE)
    for out_dtype, b in ((torch.bfloat16, None), (torch.float32, bias)):
        got = kernels.matmul(qa, qw.t(), out_dtype, b)
        want = reference.matmul(qa, qw.t(), out_dtype, b)
        assert got.dtype == out_dtype and got.shape == (m, n)
        assert torch.isfinite(got).all()
        assert relative_error(got.float(), want.float()) < ERROR_BOUND


@pytest.mark.parametrize("recipe", ["block", "row", "tensor"])
@pytest.mark.parametrize("split", [2, 3, 4])
def test_split_k_sums_the_same_product(recipe, split):
    """SPLIT_K programs per tile write fp32 partial sums that a second kernel adds in a fixed order,
    with the bias: the reference's product and the same bits on every run. In the block recipe each
    K step's product is scaled in fp32 on its own, so a split only regroups fp32 additions and stays
    within rounding of one program per tile; rowwise and tensorwise accumulate inside the tensor
    cores, whose FP8 accumulation on Hopper is narrower than fp32, so there only the reference
    bounds them. K = 640 is five 128-wide steps: a split of 4 leaves one program without work."""
    m, n, k = 5, 96, 640
    qa, qw = _operands(m, n, k, recipe, seed=4)
    bias = torch.randn(n).to(torch.bfloat16).to(DEVICE)
    config = dict(BLOCK_M=16, BLOCK_N=64)
    for out_dtype, b in ((torch.float32, bias), (torch.bfloat16, None)):
        whole = kernels.matmul(qa, qw.t(), out_dtype, b, config=config)
        got = kernels.matmul(qa, qw.t(), out_dtype, b, config=dict(config, SPLIT_K=split))
        again = kernels.matmul(qa, qw.t(), out_dtype, b, config=dict(config, SPLIT_K=split))
        want = reference.matmul(qa, qw.t(), out_dtype, b)
        assert got.dtype == out_dtype and got.shape == (m, n) and torch.equal(got, again)
        assert relative_error(got.float(), want.float()) < ERROR_BOUND
        if recipe == "block":
            assert torch.allclose(got.float(), whole.float(), rtol=2**-7 if out_dtype == torch.bfloat16 else 1e-5,
                                  atol=1e-3)


def test_which_splits_are_timed():
    """1, then powers of two up to two programs per SM, each split keeping four K steps or more."""
    from fp8dispatch.backends.triton.matmul import _splits

    assert _splits(tiles=9, steps=56, sms=132) == [1, 2, 4, 8]  # 576×7168 at BLOCK_N = 64
    assert _splits(tiles=112, steps=144, sms=132) == [1, 2]  # 7168×18432
    assert _splits(tiles=288, steps=56, sms=132) == [1]  # 18432×7168: the tiles alone fill the GPU
    assert _splits(tiles=4, steps=7, sms=132) == [1]  # K too short to split


def test_matmul_group_of_64():
    """A K group other than 128 (a 1×64, b 64×64): K steps of 64."""
    qa, qw = _operands(40, 128, 256, "block", group=64, seed=3)
    got = kernels.matmul(qa, qw.t(), torch.float32)
    want = reference.matmul(qa, qw.t(), torch.float32)
    assert relative_error(got, want) < ERROR_BOUND


@pytest.mark.parametrize("change, reason", [
    (dict(), None),
    (dict(k=200), "16-byte aligned rows"),
    (dict(group=64), "1×128 · 128×128 recipe"),
    (dict(recipe="row"), "1×128 · 128×128 recipe"),
    (dict(out_dtype=torch.int32), "out_dtype"),
])
def test_which_calls_the_hopper_kernel_takes(change, reason):
    """The Gluon kernel's own checks (it only runs on sm90, so CPU tests see the decision only)."""
    hopper = pytest.importorskip("fp8dispatch.backends.triton.hopper",
                                 reason="this Triton has no Gluon for Hopper (the portable kernel serves)")
    options = dict(m=192, n=256, k=512, recipe="block", group=128, out_dtype=torch.bfloat16) | change
    qa, qw = _operands(options["m"], options["n"], options["k"], options["recipe"], options["group"])
    why = hopper.why_not(qa, qw.t(), options["out_dtype"], None)
    assert why == reason if reason is None else reason in why


@interpreter_only
def test_the_interpreter_never_takes_the_hopper_kernel():
    from fp8dispatch.backends.triton import matmul as portable

    qa, qw = _operands(192, 256, 512, "block")
    assert not portable._hopper_kernel(qa, qw.t(), torch.bfloat16, None)


def test_a_hopper_kernel_that_cannot_compile_leaves_the_portable_one(monkeypatch, caplog):
    """A Triton whose Gluon cannot build the kernel: the first call says so once and every call is
    served by the portable kernel; an error that is not a compile failure still propagates."""
    from types import SimpleNamespace

    from fp8dispatch.backends.triton import matmul as portable

    def cannot_compile(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(portable, "_hopper_unavailable", [])
    monkeypatch.setattr(portable, "_plans", {})
    monkeypatch.setattr(portable, "_hopper_kernel", lambda a, b, out, bias: not portable._hopper_unavailable)
    monkeypatch.setattr(portable, "_hopper_module", lambda: SimpleNamespace(matmul=cannot_compile))
    qa, qw = _operands(130, 64, 256, "block")
    with caplog.at_level("WARNING", logger="fp8dispatch"):
        got = portable.matmul(qa, qw.t(), torch.float32)
        again = portable.matmul(qa, qw.t(), torch.float32)
    assert relative_error(got, reference.matmul(qa, qw.t(), torch.float32)) < ERROR_BOUND and torch.equal(got, again)
    assert portable._hopper_unavailable == ["RuntimeError: PassManager::run failed"]
    assert sum("failed to compile" in r.message for r in caplog.records) == 1

    def broken(*args):
        raise ValueError("a bug, not a compile failure")

    monkeypatch.setattr(portable, "_hopper_unavailable", [])
    monkeypatch.setattr(portable, "_plans", {})
    monkeypatch.setattr(portable, "_hopper_module", lambda: SimpleNamespace(matmul=broken))
    with pytest.raises(ValueError, match="a bug"):
        portable.matmul(qa, qw.t(), torch.float32)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="direct launches run on a GPU only (the interpreter launches "
                    "through Triton)")
@pytest.mark.parametrize("m, n, k, lead", [(1, 576, 7168, ()), (13, 256, 1536, ()), (16, 192, 512, (4,)),
                                           (1, 7168, 2048, (1,))])
def test_a_decode_linear_takes_one_allocation_and_gives_the_two_steps_bits(m, n, k, lead):
    """From its second call a decode-sized linear on the triton backend makes one allocation (the
    output, with x's FP8 data and scales behind it in the same storage) and launches both kernels
    into it: the same bits as quantize then matmul, an ordinary tensor autograd can modify in place."""
    from fp8dispatch.nn import Fp8Linear

    w = fp8dispatch.quantize(torch.randn(n, k, device=DEVICE).bfloat16(), "block", backend="triton")
    bias = torch.randn(n, device=DEVICE).bfloat16()
    x = torch.randn(*lead, m, k + 64, device=DEVICE).bfloat16()[..., :k]  # rows k + 64 apart: a strided 2-D x
    x = x if not lead else x.contiguous()  # more than two dimensions: contiguous, so rows fold in place
    xq = fp8dispatch.quantize(x, "group", backend="triton")
    want = fp8dispatch.matmul(xq, w.t(), bias=bias, backend="triton")
    outs = [fp8dispatch.linear(x, w, bias, backend="triton") for _ in range(3)]
    for out in outs:
        assert_same_bits(out, want)
    assert outs[-1]._base is None and outs[-1].untyped_storage().nbytes() > out.nbytes + x.numel()  # one allocation
    layer = Fp8Linear.from_linear(torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16), backend="triton")
    xg = x.detach().requires_grad_()
    for _ in range(2):
        y = layer(xg)
        y += 1  # in place on the layer's output, under autograd
        y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_public_linear_routes_to_triton():
    x, w = torch.randn(3, 5, 256, device=DEVICE), torch.randn(192, 256, device=DEVICE)
    got = fp8dispatch.linear(x.bfloat16(), w.bfloat16(), backend="triton")
    want = fp8dispatch.linear(x.bfloat16(), w.bfloat16(), backend="reference")
    assert got.shape == (3, 5, 192)
    assert relative_error(got.float(), want.float()) < ERROR_BOUND


# --- what the backend declares ------------------------------------------------------------------


def _matmul_problem(**changes):
    fields = dict(device=DEVICE, capability=device_capability(DEVICE), recipe="block", a_dtype=E4M3, b_dtype=E4M3,
                  m=64, n=256, k=512, a_block=(1, 128), b_block=(128, 128), a_row_major=True,
                  b_col_major=True, out_dtype=torch.bfloat16, bias_dtype=None)
    fields.update(changes)
    return MatmulProblem(**fields)


def test_probe_passes_here():
    assert probe_result("triton") is None


def test_why_not_names_each_limit():
    found = probed("triton")
    assert found.interpreting == INTERPRETER

    def why(op, problem):
        return backend.BACKEND.why_not(op, problem, found)

    assert why("matmul", _matmul_problem()) == []
    assert any("column-major" in r for r in why("matmul", _matmul_problem(b_col_major=False)))
    assert any("row-major" in r for r in why("matmul", _matmul_problem(a_row_major=False)))
    assert any("block recipe" in r for r in why("matmul", _matmul_problem(recipe="mixed")))
    assert any("g % 32" in r for r in why("matmul", _matmul_problem(a_block=(1, 48), b_block=(48, 48))))
    elsewhere = "CPU tensors only" if INTERPRETER else "needs a CUDA tensor"
    assert any(elsewhere in r for r in why("matmul", _matmul_problem(device=torch.device("meta"))))
    fnuz = QuantizeProblem(device=DEVICE, capability=device_capability(DEVICE), in_dtype=torch.float32, shape=(4, 128),
                           contiguous=True, block=(1, 128), fp8_dtype=torch.float8_e4m3fnuz, user_scale=False,
                           scale_ub=False, pow2_scale=False)
    import triton

    major_minor = tuple(int(p) for p in triton.__version__.split(".")[:2])
    assert bool(why("quantize", fnuz)) == (not INTERPRETER or major_minor < (3, 8))  # on a GPU: AMD only


@pytest.mark.parametrize("granularity", ["tensor", "row", "group", "block"])
def test_blocks_of_denormals(granularity):
    """A block whose amax is an fp32 denormal has a denormal scale; its codes still match."""
    g = torch.Generator().manual_seed(8)
    x = torch.zeros(4, 256)
    x[0, :128] = torch.randn(128, generator=g) * 1e-39
    x[1, 5] = 3e-42
    x[2, 130:] = torch.randn(126, generator=g) * 1e-41
    x = x.to(DEVICE)
    block = block_for(granularity, 4, 256, 128)
    for options in ({}, {"pow2_scale": True}):
        got = kernels.quantize(x, block, E4M3, **options)
        want = reference.quantize(x, block, E4M3, **options)
        assert_same_bits(got[1], want[1])
        assert_same_bits(got[0], want[0])


def test_the_grouped_kernel_clamps_offsets_into_the_rows():
    """Offsets are checked on the host except while a CUDA graph is captured; there the kernel must
    stay in bounds whatever they hold: each is clamped into [0, M] and never below the one before."""
    from fp8dispatch.backends.triton import grouped

    w = torch.randn(3, 200, 256, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    wq = fp8dispatch.quantize_grouped(w, "block", backend="reference")
    x = fp8dispatch.quantize(torch.randn(6, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE), "group",
                             backend="reference")
    got = grouped.grouped_linear(x, wq, torch.tensor([-4, 3, 50, 2], device=DEVICE), None, torch.float32)
    want = grouped.grouped_linear(x, wq, torch.tensor([0, 3, 6, 6], device=DEVICE), None, torch.float32)
    assert torch.equal(got, want)
    assert (got[:3] != 0).any() and (got[3:] != 0).any()  # both experts computed


def test_explain_grouped_names_the_kernel_the_triton_backend_runs(monkeypatch):
    """The portable kernel here; on sm90 from HOPPER_MIN_ROWS rows per expert, the Hopper one."""
    import dataclasses

    from fp8dispatch.backends.triton import grouped
    from fp8dispatch.grouped_api import plan_problem

    w = fp8dispatch.quantize_grouped(torch.randn(3, 256, 256).to(DEVICE), "block", backend="reference")
    x = torch.randn(6 * grouped.HOPPER_MIN_ROWS, 256, dtype=torch.bfloat16, device=DEVICE)
    offsets = torch.tensor([0, 2, 4, 6], device=DEVICE) * grouped.HOPPER_MIN_ROWS
    text = fp8dispatch.explain_grouped(x, w, offsets, backend="triton")
    assert "runs: triton · " in text and ("grouped.py: portable" in text or "hopper_grouped.py" in text)
    problem = dataclasses.replace(plan_problem(x, w, offsets, None, None, None, None, "triton"), capability=(9, 0))
    monkeypatch.setattr(grouped, "interpreting", lambda: False)
    if grouped._hopper_module() is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    assert grouped.kernel_for(problem).startswith("hopper_grouped.py")
    fewer = dataclasses.replace(problem, m=3 * grouped.HOPPER_MIN_ROWS - 1)
    assert grouped.kernel_for(fewer).startswith("grouped.py")
