"""torch.compile: the fp8dispatch custom ops pass opcheck, trace with no graph break, match eager."""

from unittest import mock

import pytest
import torch
from torch import nn

import fp8dispatch
import fp8dispatch.nn  # noqa: F401  (fp8dispatch.nn.convert below; the package does not import it)
from fp8dispatch import ops
from backends_for_tests import counting_backend


@pytest.fixture(autouse=True)
def reference(sandbox):
    """Every op on the reference backend: fast on CPU, and the same in eager and compiled runs."""
    sandbox.env(FP8DISPATCH_BACKEND="reference")
    torch._dynamo.reset()


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- opcheck ----------------------------------------------------------------------------------

QUANTIZE_CASES = {
    "row-fp32": (_randn(8, 64), "row", torch.float8_e4m3fn, [128], None, None, False, "saturate", "auto"),
    "group-bf16-3d": (_randn(2, 3, 256, dtype=torch.bfloat16), "group", torch.float8_e4m3fn, [128],
                      None, None, False, "saturate", "auto"),
    "block-tails-e5m2": (_randn(200, 136), "block", torch.float8_e5m2, [128], None, None, False, "saturate", "auto"),
    "block-rect-pow2": (_randn(64, 96), "block", torch.float8_e4m3fn, [32, 64], None, 2.0, True, "saturate", "auto"),
    "tensor-user-scale": (_randn(16, 32), "tensor", torch.float8_e4m3fn, [128], torch.full((1, 1), 0.01),
                          None, False, "rescale", "auto"),
}


@pytest.mark.parametrize("op", ["quantize", "run_quantize"])
@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_opcheck_quantize(case, op):
    torch.library.opcheck(getattr(ops, op), QUANTIZE_CASES[case])


def _q(x, granularity, block_size=128, dtype=torch.float8_e4m3fn):
    return fp8dispatch.quantize(x, granularity, block_size=block_size, dtype=dtype)


DEQUANTIZE_CASES = {
    "group-3d": (_q(_randn(2, 3, 256), "group"), torch.bfloat16),
    "block-tails": (_q(_randn(200, 136), "block"), torch.float32),
    "row-transposed": (_q(_randn(48, 64), "row").t(), torch.float16),
}


@pytest.mark.parametrize("op", ["dequantize", "run_dequantize"])
@pytest.mark.parametrize("case", DEQUANTIZE_CASES)
def test_opcheck_dequantize(case, op):
    t, dtype = DEQUANTIZE_CASES[case]
    torch.library.opcheck(getattr(ops, op), (t.bits(), t.dtype, t.scale, list(t.block), dtype, "auto"))


def _parts(t):
    return (t, None, None, None) if isinstance(t, torch.Tensor) else (t.bits(), t.dtype, t.scale, list(t.block))


MATMUL_CASES = {
    "high-precision": (_randn(16, 256, dtype=torch.bfloat16), _randn(256, 192, dtype=torch.bfloat16), None, None),
    "fp8-weight-bias-3d": (_randn(2, 5, 256), _q(_randn(192, 256), "block").t(), None, _randn(192)),
    "both-fp8-row": (_q(_randn(16, 64), "row"), _q(_randn(48, 64), "row").t(), "row", None),
    "tensor": (_randn(16, 64), _randn(64, 40), "tensor", None),
}


@pytest.mark.parametrize("op", ["matmul", "run_matmul"])
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_opcheck_matmul(case, op):
    a, b, recipe, bias = MATMUL_CASES[case]
    torch.library.opcheck(getattr(ops, op), (*_parts(a), *_parts(b), recipe, torch.bfloat16, bias, "auto"))


# --- eager stays on the fast path -------------------------------------------------------------


def test_eager_calls_never_reach_the_custom_ops():
    x, w = _randn(4, 256), _randn(64, 256)
    boom = mock.Mock(side_effect=AssertionError("eager call routed to a custom op"))
    with mock.patch.multiple(ops, traced_quantize=boom, traced_dequantize=boom, traced_matmul=boom):
        q = fp8dispatch.quantize(w, "block")
        fp8dispatch.dequantize(q)
        fp8dispatch.matmul(x, q.t())
        fp8dispatch.linear(x, q)
    boom.assert_not_called()


# --- compiled == eager, one opaque op per call ------------------------------------------------


def _graph_ops(fn, *args):
    """Compile `fn` with a backend that records the dynamo graph's call targets, then run it."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, targets


def test_public_ops_compile_to_one_custom_op_each_and_match_eager():
    def fn(x, w):
        q = fp8dispatch.quantize(x, "group")
        y = fp8dispatch.matmul(q, w.t())
        return y, fp8dispatch.dequantize(q, torch.float32), fp8dispatch.linear(x, w)

    x, w = _randn(8, 256, dtype=torch.bfloat16), _q(_randn(96, 256), "block")
    compiled, targets = _graph_ops(fn, x, w)
    for got, want in zip(compiled, fn(x, w)):
        assert torch.equal(got, want)
    fp8_ops = [t for t in targets if t.startswith("fp8dispatch.")]
    assert fp8_ops == ["fp8dispatch.quantize", "fp8dispatch.matmul", "fp8dispatch.dequantize",
                       "fp8dispatch.matmul"]


def test_compiled_function_takes_and_returns_fp8tensors():
    def fn(x):
        return fp8dispatch.quantize(x, "block", block_size=(32, 64))

    x = _randn(64, 128)
    got, want = torch.compile(fn, backend="aot_eager", fullgraph=True)(x), fn(x)
    assert isinstance(got, fp8dispatch.Fp8Tensor) and got.block == want.block == (32, 64)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(got.scale, want.scale)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 256, bias=False)).to(torch.bfloat16)
    fp8dispatch.nn.convert(model)
    return model


def test_model_compiles_fullgraph_with_inductor_and_matches_eager():
    model = _mlp()
    x = _randn(3, 7, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)  # inductor: ReLU is exact, the FP8 ops opaque
    assert torch.equal(got, want)


def test_gradients_through_compiled_fp8_linear_match_eager():
    model = _mlp()
    x = _randn(5, 256, dtype=torch.bfloat16)
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        run(xi).float().square().sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    assert all(not b.requires_grad for b in model.buffers())


def test_dynamic_token_count_compiles_once():
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m in (3, 17, 64):
            x = _randn(m, 256, dtype=torch.bfloat16, seed=m)
            assert torch.equal(compiled(x), model(x))


# --- routed while tracing: the backend's ops in the graph, opaque steps only where needed ----------


def _inductor(fn, *args):
    from torch._inductor.utils import run_and_get_code

    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    return out, "\n".join(code)


def test_compiled_graph_holds_the_backends_ops_not_the_public_api():
    """The reference's quantize is plain torch: Inductor compiles it into the graph; its matmul is
    declared opaque (one `run_matmul` op); no op re-enters the public API; eager's bits."""
    model = _mlp()
    x = _randn(5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        got, code = _inductor(model, x)
    assert torch.equal(got, want)
    assert "fp8dispatch.run_matmul" in code and "amax" in code
    assert "fp8dispatch.run_quantize" not in code and "fp8dispatch.matmul.default" not in code


def _compiled_linear_code(device: str = "cpu") -> str:
    """Inductor's code for `linear(x, w)` compiled fullgraph, after checking it gives eager's bits."""
    x, w = _randn(4, 256, dtype=torch.bfloat16).to(device), _q(_randn(64, 256).to(device), "block")

    def fn(x):
        return fp8dispatch.linear(x, w)

    with torch.no_grad():
        got, code = _inductor(fn, x)
        assert torch.equal(got, fn(x))
    return code


def test_triton_steps_in_a_compiled_graph(sandbox):
    """The Triton interpreter (a machine without a GPU) cannot be traced: each step is one
    `fp8dispatch::run_*` op that runs the cached plan of the backend chosen while tracing. On a GPU
    the steps are the kernels themselves. Either way eager's bits, and no re-entry into the API."""
    from fp8dispatch.backends import triton

    found = triton.probe()
    if isinstance(found, str):
        pytest.skip(f"triton cannot run here: {found}")
    fp8dispatch.register_backend(triton.BACKEND, replace=True)
    sandbox.env(FP8DISPATCH_BACKEND="triton")
    interpreted = not torch.cuda.is_available()
    code = _compiled_linear_code("cpu" if interpreted else "cuda")
    if interpreted:
        assert "fp8dispatch.run_quantize" in code and "fp8dispatch.run_matmul" in code
    else:  # M = 4: the one-allocation plan, one opaque op (test below)
        assert "fp8dispatch.run_linear" in code and "fp8dispatch.run_quantize" not in code
    assert "fp8dispatch.matmul.default" not in code


def test_a_one_allocation_linear_compiles_to_one_op_running_its_plan(sandbox):
    """Where a linear's quantize and GEMM launch directly into one allocation (their runners offer
    `direct`, as the triton backend's do on a GPU at decode sizes), the graph holds one `run_linear`
    op on the high-precision x that runs that plan: no quantize in the graph, eager's bits."""
    from fp8dispatch.backends import reference

    def plan(op, problem):
        def run(*args):
            return getattr(reference, op)(*args)
        run.direct = lambda: None  # never bound: the plan keeps its two steps, as off the GPU
        return run

    fp8dispatch.register_backend(fp8dispatch.Backend(
        name="direct", probe=lambda: None, why_not=lambda op, problem, found: [], quantize=reference.quantize,
        matmul=reference.matmul, plan=plan, traceable=frozenset({"quantize", "matmul"})))
    sandbox.env(FP8DISPATCH_BACKEND="direct")
    x, w = _randn(4, 256, dtype=torch.bfloat16), _q(_randn(64, 256), "block")
    assert fp8dispatch.planning.plan_linear(x, w).one_allocation
    assert fp8dispatch.planning.ONE_ALLOCATION in fp8dispatch.explain("linear", x, w)
    code = _compiled_linear_code()
    assert "fp8dispatch.run_linear" in code and "amax" not in code
    assert "fp8dispatch.run_quantize" not in code and "fp8dispatch.run_matmul" not in code


def test_a_linear_whose_gemm_is_opaque_and_quantize_is_a_bound_kernel_runs_whole(sandbox):
    """A GEMM no trace can look into is one opaque op anyway; when the activation quantize before it
    is a bound kernel (its step offers `direct`, Inductor would launch it at a higher host cost than
    the plan does), the whole linear is one `run_linear` op: eager's bits, no quantize node."""
    from fp8dispatch.backends import reference

    def plan(op, problem):
        def run(*args):
            return getattr(reference, op)(*args)
        if op == "quantize":
            run.direct = lambda: None
        return run

    fp8dispatch.register_backend(fp8dispatch.Backend(
        name="boundq", probe=lambda: None, why_not=lambda op, problem, found: [], quantize=reference.quantize,
        matmul=reference.matmul, plan=plan, traceable=frozenset({"quantize"})))
    sandbox.env(FP8DISPATCH_BACKEND="boundq")
    x, w = _randn(4, 256, dtype=torch.bfloat16), _q(_randn(64, 256), "block")
    assert not fp8dispatch.planning.plan_linear(x, w).one_allocation
    code = _compiled_linear_code()
    assert "fp8dispatch.run_linear" in code and "amax" not in code
    assert "fp8dispatch.run_quantize" not in code and "fp8dispatch.run_matmul" not in code


def test_run_linear_replans_for_operands_its_plans_did_not_check():
    """`run_linear` keys its plans by every operand's dtype, shape, strides and device, so a call on
    other operands (here a strided x, then a 3-d one, then a bias) is planned afresh and gives the
    eager bits; its static arguments travel as one string, read again after the cache is dropped."""
    w = _q(_randn(64, 256), "block")
    wt = w.t()
    spec = ops._linear_spec(wt, None, torch.bfloat16, "reference")
    bias = _randn(64, dtype=torch.bfloat16)
    wide = _randn(4, 512, dtype=torch.bfloat16)
    cases = [(_randn(4, 256, dtype=torch.bfloat16), None), (wide[:, ::2], None),
             (_randn(2, 3, 256, dtype=torch.bfloat16), None), (_randn(4, 256, dtype=torch.bfloat16), bias)]
    for clear in (False, True):
        if clear:
            ops._LINEARS.clear()
        for x, b in cases:
            got = ops.run_linear(x, wt.data.view(torch.uint8), wt.scale, b, spec)
            assert torch.equal(got, fp8dispatch.linear(x, w, b, backend="reference"))
    torch.library.opcheck(ops.run_linear, (cases[0][0], wt.data.view(torch.uint8), wt.scale, bias, spec))
    for bad in ("float8_e4m3fn:128x128", "nn:128x128::bfloat16:reference", "float8_e4m3fn:128:x:bfloat16:reference"):
        with pytest.raises(fp8dispatch.Fp8ValueError, match="spec: expected"):
            ops.run_linear(cases[0][0], wt.data.view(torch.uint8), wt.scale, None, bad)


@torch.library.custom_op("fp8dispatch_tests::no_fake_copy", mutates_args=())
def _no_fake_copy(x: torch.Tensor) -> torch.Tensor:
    """A library op registered without a fake kernel: it cannot run on fake tensors."""
    return x.clone()


def test_a_library_op_without_a_fake_kernel_stays_opaque(sandbox):
    """A backend may declare its matmul traceable while the library op under it has no fake kernel
    (fbgemm-gpu-genai 1.6's f8f8bf16_groupwise): tried once on fakes, the step becomes one opaque
    `run_matmul` op, and the fullgraph compile succeeds with eager's bits."""
    from fp8dispatch.backends import reference

    def matmul(a, b, out_dtype, bias=None):
        return _no_fake_copy(reference.matmul(a, b, out_dtype, bias))

    fp8dispatch.register_backend(fp8dispatch.Backend(
        name="nofake", probe=lambda: None, why_not=lambda op, problem, found: [], quantize=reference.quantize,
        matmul=matmul, traceable=frozenset({"quantize", "matmul"})))
    sandbox.env(FP8DISPATCH_BACKEND="nofake")
    code = _compiled_linear_code()
    assert "fp8dispatch.run_matmul" in code and "fp8dispatch.run_quantize" not in code


def test_dynamic_token_count_recompiles_only_across_power_of_two_buckets():
    """Routing and kernel configurations are keyed by M's power-of-two bucket: one graph serves the
    bucket, a token count outside it recompiles (a guard, never a wrong plan)."""
    model = _mlp()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=torch._dynamo.backends.common.aot_autograd(fw_compiler=count),
                             fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m, expected in ((3, 1), (4, 1), (5, 2), (7, 2), (8, 2), (2, 3)):
            x = _randn(m, 256, dtype=torch.bfloat16, seed=m)
            assert torch.equal(compiled(x), model(x))
            assert len(graphs) == expected, f"M={m}"


def test_a_compiled_graph_is_never_reused_after_routing_changes(sandbox):
    """Each op carries the routing fingerprint, so a change of the environment (here the requested
    backend) recompiles instead of running what the old routing chose."""
    fp8dispatch.register_backend(counting_backend("counted", []))
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = _randn(4, 256)
    compiled = torch.compile(lambda x: fp8dispatch.quantize(x, "group"), backend=count, fullgraph=True)
    first = compiled(x)
    compiled(x)
    assert len(graphs) == 1
    sandbox.env(FP8DISPATCH_BACKEND="counted")
    second = compiled(x)
    assert len(graphs) == 2
    assert torch.equal(first.data.view(torch.uint8), second.data.view(torch.uint8))


def test_opaque_ops_refuse_inputs_that_require_grad():
    """The run_* ops have no autograd kernel: without the refusal torch would differentiate the
    kernel's own arithmetic (quantization included) and hand back gradients no formula defines."""
    a, b = _randn(16, 64).requires_grad_(), _randn(64, 40)
    args = (a, None, None, None, b, None, None, None, "tensor", torch.bfloat16, None, "auto")
    with pytest.raises(fp8dispatch.Fp8TypeError, match="run_matmul: an input requires grad"):
        ops.run_matmul(*args)
    with torch.no_grad():
        assert ops.run_matmul(*args).shape == (16, 40)


def test_a_compiled_backward_through_an_opaque_step_fails_loudly():
    """The opaque run_* ops carry no autograd node of their own: the traced op around them must
    still refuse a backward under torch.compile (a silent None gradient would be worse)."""
    x, w = _randn(16, 256).requires_grad_(), fp8dispatch.quantize(_randn(64, 256), "block")
    compiled = torch.compile(lambda x: fp8dispatch.matmul(x, w.t()), fullgraph=True)
    with pytest.raises(Exception, match="no autograd formula"):
        compiled(x).float().sum().backward()
