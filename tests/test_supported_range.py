"""The supported range: pyproject's bounds, what CI installs, what README says, what the probe refuses."""

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
CI = (ROOT / ".ci" / "run").read_text()
README = (ROOT / "README.md").read_text()


def declared(name: str) -> str:
    """pyproject's specifier for a dependency, e.g. '>=3.6,<3.10'."""
    return re.search(rf'"{name}([<>=!][^;"]*)', PYPROJECT).group(1)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_pyproject_bounds_both_ends(name):
    bounds = declared(name).split(",")
    assert any(b.startswith(">=") for b in bounds) and any(b.startswith("<") for b in bounds), bounds


def test_ci_runs_readme_commands_then_the_oldest_triton():
    quick_start = re.search(r"## Quick start\n(.*?)\n## ", README, re.S).group(1)
    commands = re.findall(r"```bash\n(.*?)```", quick_start, re.S)[-1]
    for line in commands.strip().splitlines():
        command = line.split("  #")[0].strip()
        assert re.search(rf"^{re.escape(command)}$", CI, re.M), f".ci/run does not run README's {command!r}"
    assert 'pip install -q --disable-pip-version-check "triton==$oldest"' in CI
    assert CI.count("python -m pytest") == 2
    assert "triton==3.7.1" not in CI  # the first run takes what pip gives a newcomer


def test_readme_says_how_to_get_a_cpu_torch_before_the_commands():
    quick_start = re.search(r"## Quick start\n(.*?)\n## ", README, re.S).group(1)
    cpu = quick_start.index("https://download.pytorch.org/whl/cpu")
    assert cpu < quick_start.index('pip install -e ".[test]"')
    assert f'pip install "torch{declared("torch")}" --index-url' in quick_start
    assert "/opt" not in quick_start and "local CPU wheel" not in quick_start


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    from fp8dispatch.backends import triton as backend

    if not backend._declared_ranges():
        pytest.skip("fp8dispatch is not installed (no metadata with the declared range)")
    return backend


@pytest.mark.parametrize("name, version", [
    ("triton", "3.5.1"), ("triton", "3.10.0"), ("torch", "2.10.0"), ("torch", "2.14.1+cu130"),
])
def test_probe_refuses_a_version_outside_the_range(triton_backend, monkeypatch, name, version):
    monkeypatch.setattr(sys.modules[name], "__version__", version)
    reason = triton_backend.probe()
    assert isinstance(reason, str) and f"{name} {version} is outside the tested range" in reason, reason


@pytest.mark.parametrize("name, version", [("triton", "3.6.0"), ("triton", "3.9.0"), ("torch", "2.11.0+cu130")])
def test_probe_admits_both_ends(triton_backend, monkeypatch, name, version):
    monkeypatch.setattr(sys.modules[name], "__version__", version)
    result = triton_backend.probe()  # a str is a refusal; anything else is what it found
    assert not (isinstance(result, str) and "outside the tested range" in result), result


def test_installed_versions_are_in_range(triton_backend):
    assert triton_backend._untested_version() is None, torch.__version__
