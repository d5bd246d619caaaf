"""The conformance suite's pytest plugin: `--backend`, `--op`, `--full`, `--conformance-device`.

The repository's conftest.py loads it; the test itself is conformance/tests/test_conformance.py,
which stays out of the installed package.

Tests are generated from the registry at collection time, case by case with every backend beside
it (so each case's inputs and reference answer are built once). A backend registered by a plugin
(`pytest -p mypackage.fp8_backend conformance`) is collected like a built-in one.
"""

import pytest

from . import runner


def pytest_addoption(parser):
    group = parser.getgroup("fp8dispatch conformance")
    group.addoption("--backend", action="append", default=None, metavar="NAME",
                    help="conformance: backends to check, repeatable or comma-separated (default: all registered)")
    group.addoption("--op", action="append", default=None, metavar="OP",
                    help="conformance: quantize, dequantize, matmul and/or grouped_linear (default: all)")
    group.addoption("--full", action="store_true", default=False,
                    help="conformance: add the large shapes (M up to 8192); for a GPU")
    group.addoption("--conformance-device", default=None, metavar="DEVICE",
                    help="conformance: cpu or cuda (default: cuda if present)")


def pytest_generate_tests(metafunc):
    if "conformance_check" not in metafunc.fixturenames:
        return
    config = metafunc.config
    backends = runner.select_backends(config.getoption("backend"))
    ops = runner.select_ops(config.getoption("op"))
    cases = runner.select_cases(ops, quick=not config.getoption("full"))
    params = [pytest.param((name, case), id=f"{name}-{case.id}") for case in cases for name in backends]
    metafunc.parametrize("conformance_check", params)


@pytest.fixture(scope="session")
def conformance_cache(pytestconfig):
    device = pytestconfig.getoption("conformance_device") or runner.default_device()
    return runner.ReferenceCache(device)
