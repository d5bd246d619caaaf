"""The runner: every selected backend × op × case, from the registry, into a list of results.

Cases run one at a time; the inputs and the reference answer are computed once per case, and every
backend checks its own copy of the inputs (`checks.fresh`), so one backend's fault is never blamed
on another. A backend registered with `fp8dispatch.register_backend` before the run is covered
with no change here.
"""

from __future__ import annotations

import platform
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

import fp8dispatch
from fp8dispatch import registry
from fp8dispatch.errors import Fp8ValueError

from . import cases as case_lists
from .cases import OPS, Case
from .checks import FAILED, PASSED, UNSUPPORTED, Expected, Outcome, check, expected


@dataclass(frozen=True)
class Result:
    backend: str
    case: Case
    outcome: Outcome
    seconds: float

    @property
    def status(self) -> str:
        return self.outcome.status


@dataclass
class Run:
    """A finished (or running) conformance run: what ran where, and every result."""

    device: str
    quick: bool
    backends: list[str]
    ops: list[str]
    environment: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)  # backend -> None or why it cannot serve here
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    planned: int = 0  # checks selected; more than len(results) when the run was interrupted

    @property
    def interrupted(self) -> bool:
        return len(self.results) < self.planned

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == FAILED]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def select_backends(names: list[str] | None = None) -> list[str]:
    """Registered backend names (all, or the ones named; an unknown name is an error listing them)."""
    known = registry.backend_names()
    if not names:
        return known
    wanted = [n.strip().lower() for name in names for n in name.split(",") if n.strip()]
    for name in wanted:
        registry.get_backend(name)  # raises UnknownBackend naming the known ones
    return [n for n in known if n in wanted]


def select_ops(names: list[str] | None = None) -> list[str]:
    if not names:
        return list(OPS)
    wanted = [n.strip().lower() for name in names for n in name.split(",") if n.strip()]
    for name in wanted:
        if name not in OPS:
            raise Fp8ValueError(f"op: expected one of {', '.join(OPS)}, got {name!r}")
    return [op for op in OPS if op in wanted]


def select_cases(ops: list[str], quick: bool, match: list[str] | None = None) -> list[Case]:
    """The cases of `ops`; `match` keeps those whose id contains any of the strings."""
    chosen = case_lists.all_cases(quick, tuple(ops))
    if match:
        chosen = [c for c in chosen if any(m in c.id for m in match)]
    return chosen


class ReferenceCache:
    """Inputs and the reference's answer for the last few cases (each backend checks a copy)."""

    def __init__(self, device, size: int = 4):
        self.device, self.size = torch.device(device), size
        self._entries: OrderedDict[str, tuple[dict, Expected]] = OrderedDict()

    def get(self, case: Case) -> tuple[dict, Expected]:
        entry = self._entries.get(case.id)
        if entry is None:
            inputs = case_lists.build(case, self.device)
            entry = (inputs, expected(case, inputs))
            self._entries[case.id] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry


def check_case(backend: str, case: Case, cache: ReferenceCache) -> Result:
    start = time.perf_counter()
    try:
        inputs, want = cache.get(case)
    except Exception as e:  # noqa: BLE001 - a broken reference is reported, not hidden
        outcome = Outcome(FAILED, f"building the case or the reference answer raised {type(e).__name__}: {e}")
    else:
        outcome = check(backend, case, inputs, want)
    return Result(backend, case, outcome, time.perf_counter() - start)


def run(
    backends: list[str] | None = None,
    ops: list[str] | None = None,
    quick: bool = True,
    device: str | torch.device | None = None,
    match: list[str] | None = None,
    progress: Callable[[int, int, Result], None] | None = None,
) -> Run:
    """Check every selected backend on every case of the selected ops."""
    device = torch.device(device) if device is not None else default_device()
    names = select_backends(backends)
    op_names = select_ops(ops)
    chosen = select_cases(op_names, quick, match)
    out = Run(device=str(device), quick=quick, backends=names, ops=op_names, environment=environment(device),
              probes={name: registry.probe_result(name) for name in names})
    cache = ReferenceCache(device)
    out.planned = len(chosen) * len(names)
    start = time.perf_counter()
    try:
        for case in chosen:
            for name in names:
                out.results.append(check_case(name, case, cache))
                if progress is not None:
                    progress(len(out.results), out.planned, out.results[-1])
    except KeyboardInterrupt:  # Ctrl-C or a time limit: keep what finished, the report says so
        pass
    out.seconds = time.perf_counter() - start
    return out


def environment(device: torch.device) -> dict:
    env = {
        "fp8dispatch": fp8dispatch.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "-",
        "device": str(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        env["gpu"] = f"{props.name}, sm{major}{minor}"
    versions = {}
    for backend in registry.all_backends():
        registry.probe_result(backend.name)  # versions are what the probe found (cuBLASLt, the library)
        try:
            versions[backend.name] = backend.version()
        except Exception:  # noqa: BLE001 - a version is information, not a requirement
            versions[backend.name] = None
    env["backend_versions"] = versions
    return env


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # noqa: BLE001
        return f"not available ({type(e).__name__})"


__all__ = ["FAILED", "PASSED", "UNSUPPORTED", "ReferenceCache", "Result", "Run", "check_case", "run",
           "select_backends", "select_cases", "select_ops"]
