"""Plan once, run direct: the public planning functions, bound runners, and what a plan serves."""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

import fp8dispatch
from fp8dispatch import Backend, Fp8TypeError, Fp8ValueError, planning, registry
from fp8dispatch.backends import reference
from fp8dispatch.nn import Fp8Linear


def _x(*shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def planning_backend(name, plans, runs):
    """A backend with a planner: `plans` counts plan() calls, `runs` the bound runners' calls."""

    def plan(op, problem):
        plans.append((op, problem))

        def run(*args):
            runs.append(op)
            return getattr(reference, op)(*args)
        run.kernel = f"{name}'s {op} kernel for {problem.op}"
        return run

    return Backend(name=name, probe=lambda: None, why_not=lambda op, p, found: [], quantize=reference.quantize,
                   matmul=reference.matmul, plan=plan, priority=1000)


def test_a_backend_plans_once_per_key_and_its_runner_serves_every_call(sandbox):
    plans, runs = [], []
    fp8dispatch.register_backend(planning_backend("planned", plans, runs))
    x, w = _x(4, 256), fp8dispatch.quantize(_x(64, 256, seed=1), "block", backend="reference")
    outs = [fp8dispatch.linear(x, w) for _ in range(3)]
    assert [op for op, _ in plans] == ["quantize", "matmul"]
    assert runs == ["quantize", "matmul"] * 3
    want = fp8dispatch.linear(x, w, backend="reference")
    assert all(torch.equal(o, want) for o in outs)


def test_a_cached_runner_never_serves_strides_dtypes_or_devices_it_was_not_planned_for(sandbox):
    plans, runs = [], []
    fp8dispatch.register_backend(planning_backend("planned", plans, runs))
    x = _x(8, 256)
    fp8dispatch.quantize(x, "group")
    strided = _x(256, 8).t().contiguous().t()  # same shape and dtype, other strides
    got = fp8dispatch.quantize(strided, "group")
    fp8dispatch.quantize(x.float(), "group")
    assert len(plans) == 3 and not plans[1][1].contiguous
    want = fp8dispatch.quantize(strided, "group", backend="reference")
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(got.scale, want.scale)


def test_plan_functions_raise_the_public_functions_typed_errors(sandbox):
    with pytest.raises(Fp8ValueError, match="x: expected at least 2 dimensions"):
        planning.plan_quantize(_x(8), "row")
    with pytest.raises(Fp8TypeError, match="b: expected a torch.Tensor or Fp8Tensor, got str"):
        planning.plan_matmul(_x(4, 256), "w")
    with pytest.raises(Fp8ValueError, match=r"w: expected a 2-d weight"):
        planning.plan_linear(_x(4, 256), _x(2, 3, 256))


def test_a_plan_describes_each_step_and_its_kernel(sandbox):
    plans, runs = [], []
    fp8dispatch.register_backend(planning_backend("planned", plans, runs))
    plan = fp8dispatch.plan_linear(_x(4, 256), fp8dispatch.quantize(_x(64, 256), "block", backend="reference"))
    text = plan.describe()
    assert "quantize a: quantize(x: bfloat16[4, 256]" in text
    assert "runs: planned · planned's matmul kernel for matmul" in text
    assert [role for role, _ in plan.problems] == ["quantize a", "matmul"]
    assert "runs: planned · planned's quantize kernel" in fp8dispatch.explain("linear", _x(4, 256), _x(64, 256))


def test_fp8_linear_holds_its_runs_and_replans_when_weight_backend_or_registry_change(sandbox):
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(256, 64).to(torch.bfloat16))
    x = _x(3, 256)
    with mock.patch.object(planning, "plan_linear", wraps=planning.plan_linear) as planned, torch.no_grad():
        first = [layer(x) for _ in range(3)]
        assert planned.call_count == 1
        layer(_x(5, 256))  # a new shape: its own plan
        assert planned.call_count == 2
        registry.refresh()
        layer(x)
        assert planned.call_count == 3
        layer.backend = "reference"
        layer(x)
        assert planned.call_count == 4
        layer.weight = layer.weight.clone()  # a new buffer: never the old weight's runs
        layer(x)
        assert planned.call_count == 5
    with torch.no_grad():
        assert all(torch.equal(o, fp8dispatch.linear(x, layer.fp8_weight(), layer.bias)) for o in first)


def test_fp8_linear_plans_bad_input_into_its_typed_error(sandbox):
    layer = Fp8Linear.from_linear(nn.Linear(256, 64).to(torch.bfloat16)).requires_grad_(False)
    layer(_x(2, 256))
    with pytest.raises(Fp8ValueError, match=r"w: expected \[N, 128\] to match x's last dim K"):
        layer(_x(2, 128))
    with pytest.raises(Fp8TypeError):
        layer("x")


def test_the_triton_backend_names_the_kernel_it_runs():
    """Under the interpreter: the plan is the triton backend's own, and explain says which kernel."""
    triton = registry.get_backend("triton")
    if registry.reasons(triton, planning.plan_quantize(_x(4, 7168), "group", backend="reference").problem):
        pytest.skip("triton cannot run here (needs a CUDA GPU or TRITON_INTERPRET=1)")
    text = fp8dispatch.explain("linear", _x(4, 7168), _x(256, 7168), backend="triton")
    assert "runs: triton · two-sweep 1×g groups kernel" in text or "runs: triton · one-pass groups kernel" in text
    assert "runs: triton · matmul.py: portable scaled-mm kernel, operands swapped (M ≤ 64)" in text


# --- the Triton launcher's bookkeeping (its direct path runs only on a GPU) ----------------------


def test_tracing_is_false_for_eager_tensors_and_true_for_fake_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fp8dispatch.backends.triton.launch import tracing

    assert not tracing(torch.ones(2)) and not tracing(nn.Parameter(torch.ones(2)))
    with FakeTensorMode():
        assert tracing(torch.ones(2))


def test_a_launchers_last_launch_is_bound_only_for_its_own_aligned_first_tensor():
    """`bound` relaunches the latest launch only for the tensor it was made with, when every tensor
    was 16-byte aligned, with the tensors' places left empty for the caller's pointers."""
    from fp8dispatch.backends.triton import launch

    launcher = launch.Launcher(kernel=None, tensors=2)
    first = torch.ones(4)
    handles = ("run", "function", "packed")
    launcher.last = ((3, 1, 1), "compiled", id(first), ((torch.float32, True), (torch.float32, True)), (7, 8),
                     (64,))
    with mock.patch.object(launch, "bind", return_value=handles):
        assert launcher.bound(first) == ((3, 1, 1), *handles, (None, None, 7, 8), (64,))
        assert launcher.bound(torch.ones(4)) is None
        launcher.last = (*launcher.last[:3], ((torch.float32, True), (torch.float32, False)), *launcher.last[4:])
        assert launcher.bound(first) is None
    with mock.patch.object(launch, "bind", return_value=None):  # Triton's own path must serve
        launcher.last = (*launcher.last[:3], ((torch.float32, True),) * 2, *launcher.last[4:])
        assert launcher.bound(first) is None


def test_bind_takes_the_direct_launch_unless_a_launch_hook_listens():
    """Triton 3.6 and newer keep each launch hook as a `HookChain` that is never None: an empty one
    must not keep plans off the direct launch, and a hook in either chain (a profiler) must make
    `listening()` true, which is what every bound runner asks before each direct launch."""
    import triton
    from fp8dispatch.backends.triton import launch

    compiled = SimpleNamespace(run="run", function="function", packed_metadata="packed")
    runtime = triton.knobs.runtime
    if not hasattr(runtime.launch_enter_hook, "calls"):
        pytest.skip(f"Triton {triton.__version__} keeps launch hooks as plain values, not HookChains")
    assert not runtime.launch_enter_hook.calls and not runtime.launch_exit_hook.calls
    assert not launch.listening()
    assert launch.bind(compiled) == ("run", "function", "packed")
    for chain in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        hook = lambda metadata: None  # noqa: E731
        chain.add(hook)
        try:
            assert launch.listening() and launch.bind(compiled) is None
        finally:
            chain.remove(hook)
    assert launch.bind(compiled) == ("run", "function", "packed")


def test_a_hook_set_as_a_plain_value_listens_and_none_does_not():
    from fp8dispatch.backends.triton import launch

    assert not launch._listens(None) and launch._listens(print)
    assert not launch._listens(SimpleNamespace(calls=[])) and launch._listens(SimpleNamespace(calls=[print]))


# --- one allocation for a linear's two launches (fp8dispatch/direct.py) ---------------------------


class _Step:
    """A runner whose kernel, once it has run, launches on raw pointers: what the triton backend's
    bound runners offer. `launches` records each direct launch's pointers."""

    def __init__(self, sizes, launches, listening=lambda: False):
        self.sizes, self.launches, self.ran = sizes, launches, False
        self.listening = listening

    def __call__(self, *args):
        self.ran = True

    def direct(self):
        if not self.ran:
            return None
        return SimpleNamespace(launch=lambda *p: self.launches.append(p), sizes=self.sizes, listening=self.listening)


@pytest.mark.parametrize("scratch", [(), (4 * 3 * 8 * 40,)])
def test_a_linears_two_launches_share_one_allocation_laid_out_aligned(scratch):
    from fp8dispatch import direct

    m, k, n, g = 3, 256, 40, 128
    launches, fallbacks = [], []
    quantize = _Step((m * k, m * (k // g) * 4), launches)
    gemm = _Step((m * n * 2, *scratch), launches)

    def two_steps(x, w, bias):
        quantize(), gemm()
        fallbacks.append(1)
        return torch.zeros(m, n, dtype=torch.bfloat16)

    run = direct.linear_runner(quantize, gemm, (m, n), torch.bfloat16, two_steps)
    x, w = _x(m, k), fp8dispatch.quantize(_x(n, k, seed=1), "block", backend="reference")
    run(x, w, None)
    assert fallbacks == [1] and launches == []  # the first call binds both steps
    out = run(x, w, None)
    assert fallbacks == [1] and len(launches) == 2
    (px, p_data, p_scale), (p_a, p_w, p_sa, p_sw, p_bias, p_out, *p_scratch) = launches
    base = out.data_ptr()
    assert (px, p_w, p_sw, p_bias) == (x.data_ptr(), w.data.data_ptr(), w.scale.data_ptr(), 0)
    assert (p_a, p_sa, p_out) == (p_data, p_scale, base)
    # The output first, then x's data, its scales and the GEMM's scratch, 16-byte aligned, disjoint.
    spans = [(base, m * n * 2), (p_data, m * k), (p_scale, m * (k // g) * 4)] + list(zip(p_scratch, scratch))
    assert all(start % 16 == 0 for start, _ in spans)
    assert all(a + size <= b for (a, size), (b, _) in zip(spans, spans[1:]))
    assert spans[-1][0] + spans[-1][1] <= base + out.untyped_storage().nbytes()
    # An ordinary tensor of the output's shape, not a view: autograd and in-place ops treat it as any other.
    assert out.shape == (m, n) and out.is_contiguous() and out._base is None and out.dtype == torch.bfloat16


def test_a_linear_takes_its_two_steps_while_a_hook_listens_or_a_pointer_is_unaligned():
    from fp8dispatch import direct

    launches, hooked = [], [False]
    quantize = _Step((3 * 256, 3 * 2 * 4), launches, listening=lambda: hooked[0])
    gemm = _Step((3 * 40 * 2,), launches)
    calls = []
    run = direct.linear_runner(quantize, gemm, (3, 40), torch.bfloat16,
                               lambda x, w, b: (quantize(), gemm(), calls.append(1), torch.zeros(3, 40))[-1])
    w = fp8dispatch.quantize(_x(40, 256, seed=1), "block", backend="reference")
    run(_x(3, 256), w, None)
    hooked[0] = True
    run(_x(3, 256), w, None)
    hooked[0] = False
    unaligned = torch.empty(3 * 256 + 1, dtype=torch.bfloat16)[1:].view(3, 256)
    run(unaligned, w, None)
    assert len(calls) == 3 and launches == []
    run(_x(3, 256), w, None)
    assert len(calls) == 3 and len(launches) == 2


def test_a_linear_whose_steps_cannot_launch_directly_keeps_its_two_steps():
    from fp8dispatch import direct

    calls = []
    run = direct.linear_runner(lambda *a: None, lambda *a: None, (2, 8), torch.bfloat16,
                               lambda x, w, b: calls.append(1) or torch.zeros(2, 8))
    for _ in range(3):
        run(None, None, None)
    assert len(calls) == 3
