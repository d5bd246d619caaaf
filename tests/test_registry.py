"""The registry with small fake backends: order, overrides, disabling, errors, caching, explain."""

import logging

import pytest
import torch

import fp8dispatch
from fp8dispatch import Backend, NoBackend, UnknownBackend, registry
from backends_for_tests import counting_backend, row_only_backend


def test_auto_takes_the_highest_priority_backend_that_can_run(sandbox):
    fp8dispatch.register_backend(row_only_backend("fast", priority=50))
    x = torch.randn(4, 256)
    assert "chosen: fast" in fp8dispatch.explain("quantize", x, "row")
    table = fp8dispatch.explain("quantize", x, "group")
    assert "chosen: reference" in table and "fast" in table and "only row" in table


def test_per_op_and_recipe_priorities(sandbox):
    fp8dispatch.register_backend(row_only_backend("fast", priority=-5, priorities={"quantize.row": 70}))
    assert "chosen: fast" in fp8dispatch.explain("quantize", torch.randn(4, 64), "row")


def test_a_named_backend_that_cannot_serve_raises_with_its_reasons(sandbox):
    fp8dispatch.register_backend(row_only_backend("fast", priority=50))
    with pytest.raises(NoBackend) as err:
        fp8dispatch.quantize(torch.randn(4, 256), "group", backend="fast")
    message = str(err.value)
    assert "fast" in message and "only row" in message and "the backend= argument" in message
    assert "quantize(x: float32[4, 256]" in message


def test_unknown_names_list_the_known_ones(sandbox):
    with pytest.raises(UnknownBackend, match="known: .*reference"):
        fp8dispatch.quantize(torch.randn(2, 8), backend="nope")
    sandbox.env(FP8DISPATCH_BACKEND="nope")
    with pytest.raises(UnknownBackend, match="nope"):
        fp8dispatch.quantize(torch.randn(2, 8))


def test_choice_order_argument_then_op_env_then_global_env_then_priority(sandbox):
    for name in ("a1", "b2", "c3"):
        fp8dispatch.register_backend(row_only_backend(name, priority=10))
    x = torch.randn(4, 64)

    def chosen(**kw):
        return registry.choose(fp8dispatch.planning.plan_quantize(x, "row").problem, **kw).name

    assert chosen() == "a1"  # equal priorities break by name
    sandbox.env(FP8DISPATCH_BACKEND="c3,a1")
    assert chosen() == "c3"
    sandbox.env(FP8DISPATCH_QUANTIZE_BACKEND="b2")
    assert chosen() == "b2"
    assert chosen(requested="reference") == "reference"


def test_a_preference_list_may_end_in_auto(sandbox):
    fp8dispatch.register_backend(row_only_backend("fast", priority=50))
    sandbox.env(FP8DISPATCH_BACKEND="fast,auto")
    assert "chosen: reference" in fp8dispatch.explain("quantize", torch.randn(4, 256), "group")
    sandbox.env(FP8DISPATCH_BACKEND="fast")
    with pytest.raises(NoBackend, match="FP8DISPATCH_BACKEND"):
        fp8dispatch.quantize(torch.randn(4, 256), "group")


def test_disabled_backends_are_skipped_and_say_so(sandbox):
    fp8dispatch.register_backend(row_only_backend("fast", priority=50))
    sandbox.env(FP8DISPATCH_DISABLE="fast")
    assert "disabled by FP8DISPATCH_DISABLE" in fp8dispatch.explain("quantize", torch.randn(4, 64), "row")
    with pytest.raises(NoBackend, match="disabled by FP8DISPATCH_DISABLE"):
        fp8dispatch.quantize(torch.randn(4, 64), backend="fast")


def test_auto_fails_only_when_nothing_can_serve(sandbox):
    sandbox.env(FP8DISPATCH_DISABLE=",".join(fp8dispatch.backend_names()))
    with pytest.raises(NoBackend) as err:
        fp8dispatch.quantize(torch.randn(4, 64))
    assert "request: auto" in str(err.value) and "reference:" in str(err.value)


def test_probe_runs_once_and_a_raising_probe_is_a_reason(sandbox):
    calls = []
    fp8dispatch.register_backend(counting_backend("flaky", calls, probe_error=OSError("libfoo.so: cannot open")))
    x = torch.randn(4, 64)
    for _ in range(3):
        assert "OSError: libfoo.so" in fp8dispatch.explain("quantize", x, backend="flaky")
    assert calls.count("probe") == 1


def test_a_probe_first_reached_while_compiling_runs_on_real_tensors(sandbox):
    """The first call may come under torch.compile, which plans on fake tensors; a probe's
    self-test run on fakes would prove nothing (and the finding is kept for the process), so
    probes run outside the trace's modes. Compiling first must route as eager does."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    seen = []

    def probe():
        t = torch.ones(2)
        seen.append(is_fake(t))
        return "self-test ran on a fake tensor" if is_fake(t) else None

    fp8dispatch.register_backend(Backend("selftest", probe, lambda op, p, found: [],
                                         quantize=counting_backend("q", []).quantize, priority=500))
    x = torch.randn(4, 64)
    compiled = torch.compile(lambda x: fp8dispatch.quantize(x, "group"), fullgraph=True, backend="aot_eager")
    compiled(x)  # no eager call before: the probe's first run happens while tracing
    assert seen == [False]
    assert "chosen: selftest" in fp8dispatch.explain("quantize", x, "group")
    with FakeTensorMode():
        fp8dispatch.register_backend(Backend("selftest2", probe, lambda op, p, found: []))
        assert registry.probed("selftest2") is None
    assert seen == [False, False]


def test_decisions_are_cached_per_problem_until_refresh(sandbox):
    calls = []
    fp8dispatch.register_backend(counting_backend("counted", calls))
    x = torch.randn(4, 64)
    for _ in range(3):
        fp8dispatch.quantize(x, backend="counted")
    assert calls.count("why_not") == 1 and calls.count("quantize") == 3
    fp8dispatch.quantize(torch.randn(5, 64), backend="counted")
    assert calls.count("why_not") == 2
    registry.refresh()
    fp8dispatch.quantize(x, backend="counted")
    assert calls.count("why_not") == 3


def test_routing_hooks_come_after_the_environment_and_before_priority(sandbox):
    fp8dispatch.register_backend(row_only_backend("tuned", priority=-10))
    registry.routing_hooks.append(lambda problem: "tuned" if problem.op == "quantize" else None)
    registry.refresh()
    x = torch.randn(4, 256)
    assert "chosen: tuned" in fp8dispatch.explain("quantize", x, "row")
    assert "chosen: reference" in fp8dispatch.explain("quantize", x, "group")  # tuned can't: priority order
    sandbox.env(FP8DISPATCH_QUANTIZE_BACKEND="reference")
    assert "chosen: reference" in fp8dispatch.explain("quantize", x, "row")


def test_each_new_decision_is_logged_once(sandbox, caplog):
    sandbox.env(FP8DISPATCH_LOG="debug")
    with caplog.at_level(logging.DEBUG, logger="fp8dispatch"):
        for _ in range(3):
            fp8dispatch.quantize(torch.randn(4, 64), backend="reference")
    decisions = [r for r in caplog.records if "-> reference" in r.getMessage()]
    assert len(decisions) == 1


def test_register_backend_checks_its_argument(sandbox):
    with pytest.raises(TypeError, match="backend"):
        fp8dispatch.register_backend("reference")
    with pytest.raises(ValueError, match="already registered"):
        fp8dispatch.register_backend(row_only_backend("reference"))
    with pytest.raises(ValueError, match="auto"):
        fp8dispatch.register_backend(row_only_backend("auto"))
    fp8dispatch.register_backend(row_only_backend("twice"))
    fp8dispatch.register_backend(row_only_backend("twice", priority=3), replace=True)
    assert registry.get_backend("twice").priority == 3


def test_backends_lists_registered_names(sandbox):
    assert "reference" in fp8dispatch.backend_names()
    fp8dispatch.register_backend(row_only_backend("extra", priority=99))
    assert fp8dispatch.backend_names()[0] == "extra"
    fp8dispatch.unregister_backend("extra")
    assert "extra" not in fp8dispatch.backend_names()


def test_backend_is_frozen():
    backend = row_only_backend("x")
    assert isinstance(backend, Backend)
    with pytest.raises(AttributeError):
        backend.priority = 5
