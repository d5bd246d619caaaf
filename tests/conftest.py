"""Fixtures for the framework's own tests: an isolated registry and environment."""

import pytest

from fp8dispatch import registry

ENV_VARS = (
    "FP8DISPATCH_BACKEND", "FP8DISPATCH_QUANTIZE_BACKEND", "FP8DISPATCH_DEQUANTIZE_BACKEND",
    "FP8DISPATCH_MATMUL_BACKEND", "FP8DISPATCH_GROUPED_LINEAR_BACKEND", "FP8DISPATCH_DISABLE", "FP8DISPATCH_LOG", "FP8DISPATCH_TUNING",
)


@pytest.fixture
def sandbox(monkeypatch):
    """A registry of the reference alone (plus what the test registers), no routing table, and a
    clean environment; all of it is undone after the test. The registry's mechanics must not
    depend on which built-in backends this machine has.

    `sandbox.env(NAME=value, ...)` sets variables and re-reads them, as a new process would.
    """
    registry._load_builtins()
    saved = (dict(registry._backends), dict(registry._probes), list(registry.routing_hooks))
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    for name in list(registry._backends):
        if name != "reference":
            del registry._backends[name]
    registry.routing_hooks.clear()
    registry.refresh()

    class Sandbox:
        @staticmethod
        def env(**values):
            for name, value in values.items():
                monkeypatch.setenv(name, value)
            registry.refresh()

    yield Sandbox()
    registry._backends.clear()
    registry._backends.update(saved[0])
    registry._probes.clear()
    registry._probes.update(saved[1])
    registry.routing_hooks[:] = saved[2]
    monkeypatch.undo()
    registry.refresh()  # forget what was read from the test's environment
    registry.refresh()
