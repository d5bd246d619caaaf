"""The registry: backends as frozen data, and the plain-Python choice among them.

A backend is a name, a priority, a `probe()` run once per process whose result is frozen, a
`why_not(op, problem, found)` that returns every reason it cannot run a problem (a pure function
of the problem and what the probe found), and one function per op it serves. Choice,
first match wins: the call's `backend=`; `FP8DISPATCH_<OP>_BACKEND`; `FP8DISPATCH_BACKEND`; a
measured routing table; the static priority order. Decisions are cached per problem.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from fp8dispatch import static_order, user_table
from fp8dispatch.errors import Fp8DispatchError, Fp8TypeError, Fp8ValueError, NoBackend, UnknownBackend
from fp8dispatch.problem import Problem

log = logging.getLogger("fp8dispatch")

OPS = ("quantize", "dequantize", "matmul", "grouped_linear")
AUTO = "auto"

# Built-in backends, by module under fp8dispatch.backends. Each module defines `BACKEND`.
BUILTIN_MODULES = ("reference", "triton", "torch", "fbgemm", "torchao")


@dataclass(frozen=True)
class Backend:
    """One backend: a capability description plus the functions that run each op.

    `priority` orders the automatic choice (higher first); `priorities` overrides it per op or
    per op and recipe/granularity, keyed "matmul", "matmul.block", "quantize.group", ... The
    built-in backends take theirs from one table, `fp8dispatch.static_order.ORDER`.
    `quantize(x2d, block, dtype, scale, scale_ub, pow2_scale) -> (data, scale)`,
    `dequantize(data2d, scale, block, out_dtype) -> Tensor`,
    `matmul(a: Fp8Tensor, b: Fp8Tensor, out_dtype, bias) -> Tensor`, all on 2-D views.
    `grouped_linear(x: Fp8Tensor, w: GroupedFp8Tensor, offsets, masked_m, out_dtype, bias) -> Tensor`
    (fp8dispatch/grouped_api.py; one of offsets / masked_m is None).
    `plan(op, problem) -> runner`, optional: a callable with the op function's signature, bound
    to everything a problem fixes (kernel, configuration, grid, launch arguments). It serves every
    call whose key matches the one planned (dtypes, shapes, strides, devices, options); its
    `kernel` attribute, if any, names the kernel for `explain`. Without it the op function runs.
    """

    name: str
    # The reason it cannot serve here (a str), or what it found (frozen; None if nothing to say).
    probe: Callable[[], object]
    # Every reason it cannot run a problem, from the problem and what the probe found only.
    why_not: Callable[[str, Problem, object], list[str]]
    quantize: Callable | None = None
    dequantize: Callable | None = None
    matmul: Callable | None = None
    grouped_linear: Callable | None = None
    priority: int = 0
    priorities: Mapping[str, int] = field(default_factory=dict)
    version: Callable[[], str | None] = lambda: None
    description: str = ""
    plan: Callable[[str, Problem], Callable] | None = None
    # Ops whose function (or runner) torch.compile may trace into: plain torch ops and registered
    # `torch.ops.*` only. A runner's own `traced` attribute (a function, or None) overrides this.
    traceable: frozenset[str] = frozenset()

    def function(self, op: str) -> Callable | None:
        return getattr(self, op)

    def runner(self, problem: Problem) -> Callable:
        """The function that runs `problem`: the backend's plan for it, else its op function."""
        return self.plan(problem.op, problem) if self.plan is not None else self.function(problem.op)

    def priority_for(self, problem: Problem) -> int:
        detail = getattr(problem, "recipe", None) or getattr(problem, "granularity", None)
        ranked = static_order.priority(self.name, problem.op, detail)
        if ranked is not None:
            return ranked
        for key in (f"{problem.op}.{detail}", problem.op):
            if key in self.priorities:
                return self.priorities[key]
        return self.priority


_backends: dict[str, Backend] = {}
_probes: dict[str, object] = {}
_decisions: dict[tuple, Backend] = {}
_builtins_loaded = False
_settings: Settings | None = None
# Guards loading the built-ins and reading the environment: each happens once, and no thread
# sees the registry half-filled. Reentrant, since importing a built-in may register a backend.
_lock = threading.RLock()

# Consulted after the environment and before the static order: `(problem) -> name | None`.
# `fp8dispatch tune` installs the measured routing table here.
routing_hooks: list[Callable[[Problem], str | None]] = []


@dataclass(frozen=True)
class Settings:
    """The environment variables, read once per process (call `refresh()` after changing them)."""

    per_op: Mapping[str, tuple[str, ...]]
    preference: tuple[str, ...]
    disabled: frozenset[str]
    check_offsets: bool = False  # FP8DISPATCH_CHECK_OFFSETS=1: read grouped offsets on the host on a GPU too

    @classmethod
    def from_environ(cls) -> Settings:
        disabled = _names(os.environ.get("FP8DISPATCH_DISABLE", ""))
        for name in disabled:
            get_backend(name, "FP8DISPATCH_DISABLE")
        return cls(
            per_op={op: _names(os.environ.get(f"FP8DISPATCH_{op.upper()}_BACKEND", "")) for op in OPS},
            preference=_names(os.environ.get("FP8DISPATCH_BACKEND", "")),
            disabled=frozenset(disabled),
            check_offsets=os.environ.get("FP8DISPATCH_CHECK_OFFSETS", "").strip() == "1",
        )


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip().lower() for n in text.split(",") if n.strip())


def settings() -> Settings:
    current = _settings  # one read: `refresh()` on another thread may clear the global meanwhile
    if current is not None:
        return current
    with _lock:
        return _read_settings()


def _read_settings() -> Settings:
    global _settings
    if _settings is None:
        level = os.environ.get("FP8DISPATCH_LOG", "").strip().lower()
        if level and level not in LOG_LEVELS:
            raise Fp8ValueError(f"FP8DISPATCH_LOG: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
        current = Settings.from_environ()
        if level:
            _configure_logging(level)
        _settings = current
    return _settings


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _configure_logging(level: str) -> None:
    log.setLevel(getattr(logging, level.upper()))
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[fp8dispatch] %(message)s"))
        log.addHandler(handler)


def refresh() -> None:
    """Forget cached decisions and re-read the environment (probe results stay frozen)."""
    global _settings, _fingerprint
    with _lock:
        _settings = None
        _decisions.clear()
        for hook in _refresh_hooks:
            hook()
        _fingerprint = None
    try:
        fingerprint()  # now, in eager code: a trace only reads it
    except Fp8DispatchError:  # a bad setting: the next call raises it, in its own words
        pass


_fingerprint: str | None = None


def fingerprint() -> str:
    """What routing depends on besides the problem, as a short text: the environment settings, the
    backends and their priorities, the routing hooks, and the source of the package and of every
    backend. Compiled graphs carry it as an argument of each fp8dispatch op, so neither a graph nor
    torch.compile's on-disk caches (keyed by the graph) outlive a change of any of these."""
    global _fingerprint
    if _fingerprint is None:
        import hashlib
        import sys
        from pathlib import Path

        backends = [(b.name, b.priority, sorted(b.priorities.items()), sorted(b.traceable)) for b in all_backends()]
        hooks = [(getattr(h, "__qualname__", repr(h)), getattr(h, "state", None)) for h in routing_hooks]
        digest = hashlib.sha256(repr((settings(), os.environ.get(user_table.ENV_VAR), backends, hooks)).encode())
        folders = {Path(__file__).parent} | {Path(sys.modules[b.probe.__module__].__file__).parent
                                             for b in all_backends() if b.probe.__module__ in sys.modules}
        for path in sorted(p for folder in folders for ext in ("*.py", "*.json") for p in folder.rglob(ext)):
            digest.update(path.read_bytes())
        _fingerprint = digest.hexdigest()[:16]
    return _fingerprint


_refresh_hooks: list[Callable[[], None]] = []


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend; it takes part in dispatch, `explain`, `info` and conformance at once."""
    _check_backend(backend)
    name = backend.name.lower()
    _load_builtins()
    with _lock:
        if name in _backends and not replace:
            raise UnknownBackend(f"backend.name: {name!r} is already registered (pass replace=True)")
        _backends[name] = backend
        _probes.pop(name, None)
        refresh()
    return backend


def _check_backend(backend) -> None:
    """A malformed Backend is refused here, not found out by every later call that routes."""
    if not isinstance(backend, Backend):
        raise Fp8TypeError(f"backend: expected an fp8dispatch.Backend, got {type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str):
        raise Fp8TypeError(f"backend.name: expected a str, got {type(name).__name__} {name!r}")
    if name.lower() == AUTO or not name.isidentifier():
        raise UnknownBackend(f"backend.name: expected an identifier other than 'auto', got {name!r}")
    for field_name in ("probe", "why_not", "version"):
        if not callable(getattr(backend, field_name)):
            raise Fp8TypeError(f"backend.{field_name}: expected a callable, got {getattr(backend, field_name)!r}")
    if not _takes(backend.why_not, 3):
        raise Fp8TypeError(f"backend.why_not: expected a function of (op, problem, found), where found is what "
                           f"probe() returned; got {backend.why_not!r}")
    for op in OPS:
        if not (backend.function(op) is None or callable(backend.function(op))):
            raise Fp8TypeError(f"backend.{op}: expected a callable or None, got {backend.function(op)!r}")
    if isinstance(backend.priority, bool) or not isinstance(backend.priority, int):
        raise Fp8TypeError(f"backend.priority: expected an int, got {backend.priority!r}")
    if not isinstance(backend.priorities, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in backend.priorities.items()):
        raise Fp8TypeError(f"backend.priorities: expected a mapping of str to int, got {backend.priorities!r}")
    if not isinstance(backend.description, str):
        raise Fp8TypeError(f"backend.description: expected a str, got {backend.description!r}")


def _takes(function: Callable, count: int) -> bool:
    try:
        inspect.signature(function).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): let the call decide
        pass
    return True


def unregister_backend(name: str) -> None:
    _load_builtins()
    with _lock:
        _backends.pop(name, None)
        _probes.pop(name, None)
        refresh()


def _load_builtins() -> None:
    """Import the built-in backends, once; a caller returns only after all of them are in."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        for module in BUILTIN_MODULES:
            try:
                mod = importlib.import_module(f"fp8dispatch.backends.{module}")
            except ModuleNotFoundError as e:
                if e.name == f"fp8dispatch.backends.{module}":
                    continue  # not built yet in this checkout
                raise
            if getattr(mod, "__file__", None) is None:
                continue  # an empty folder (a namespace package): a backend still being written
            _backends.setdefault(mod.BACKEND.name, mod.BACKEND)
        _builtins_loaded = True


def all_backends() -> list[Backend]:
    """Registered backends, highest default priority first, then by their place in the static order."""
    _load_builtins()
    return sorted(_backends.values(), key=lambda b: (-b.priority, static_order.best_place(b.name), b.name))


def backend_names() -> list[str]:
    return [b.name for b in all_backends()]


def get_backend(name: str, source: str = "backend") -> Backend:
    """The backend called `name`; an unknown name is an error naming `source`, where it came from."""
    _load_builtins()
    try:
        return _backends[name.lower()]
    except KeyError:
        raise UnknownBackend(
            f"{source}: unknown name {name!r}; known: {', '.join(backend_names())} (or 'auto')"
        ) from None


def probed(name: str) -> object:
    """The backend's probe, run once per process and frozen: a str is why it cannot serve here;
    anything else is what it found, which `why_not` receives."""
    try:
        return _probes[name]
    except KeyError:
        pass
    from torch.utils._python_dispatch import _disable_current_modes

    backend = get_backend(name)
    try:
        # Outside any trace's modes: a first call under torch.compile plans on fake tensors, and a
        # probe's self-test run on fakes proves nothing (it could refuse a backend for the process).
        with _disable_current_modes():
            result = backend.probe()
    except Exception as e:  # a probe that raises is a backend that cannot serve
        result = f"probe raised {type(e).__name__}: {e}"
    _probes[name] = result
    return result


def probe_result(name: str) -> str | None:
    """None if the backend can serve in this process, else why not."""
    found = probed(name)
    return found if isinstance(found, str) else None


def reasons(backend: Backend, problem: Problem) -> list[str]:
    """Every reason `backend` cannot run `problem`; empty means it can."""
    if backend.name in settings().disabled:
        return ["disabled by FP8DISPATCH_DISABLE"]
    found = probed(backend.name)
    if isinstance(found, str):
        return [found]
    if backend.function(problem.op) is None:
        return [f"does not implement {problem.op}"]
    try:
        return list(backend.why_not(problem.op, problem, found))
    except Exception as e:
        return [f"why_not raised {type(e).__name__}: {e}"]


def requested_names(op: str, requested: str | None) -> tuple[tuple[str, ...], str]:
    """The names the user asked for, and where the request came from."""
    if requested is not None and requested.strip().lower() != AUTO:
        return _names(requested), "the backend= argument"
    env = settings()
    if env.per_op.get(op):
        return env.per_op[op], f"FP8DISPATCH_{op.upper()}_BACKEND"
    if env.preference:
        return env.preference, "FP8DISPATCH_BACKEND"
    return (), "auto"


def choose(problem: Problem, requested: str | None = AUTO) -> Backend:
    """The backend that runs `problem`, cached per (problem, request)."""
    key = (problem, requested)
    backend = _decisions.get(key)
    if backend is None:
        backend = _decide(problem, requested)
        _decisions[key] = backend
        log.debug("%s -> %s", problem.describe(), backend.name)
    return backend


def _decide(problem: Problem, requested: str | None) -> Backend:
    names, source = requested_names(problem.op, requested)
    tried: list[Backend] = []
    for name in names:
        if name == AUTO:  # an explicit "..., auto" at the end of a preference list
            break
        backend = get_backend(name, "backend" if source.startswith("the ") else source)
        if not reasons(backend, problem):
            return backend
        tried.append(backend)
    else:
        if names:
            raise NoBackend(_report(problem, tried, f"requested by {source}: {', '.join(names)}"))
    for name in _routed(problem):
        backend = _backends.get(name)
        if backend is not None and not reasons(backend, problem):
            return backend
    candidates = sorted(all_backends(), key=lambda b: (-b.priority_for(problem), b.name))
    for backend in candidates:
        if not reasons(backend, problem):
            return backend
    raise NoBackend(_report(problem, candidates, "auto"))


def _routed(problem: Problem) -> list[str]:
    return [name for hook in routing_hooks if (name := hook(problem))]


def _report(problem: Problem, backends: list[Backend], request: str) -> str:
    lines = [f"no backend can run {problem.describe()}", f"  request: {request}"]
    for backend in backends:
        lines.append(f"  {backend.name}:")
        lines.extend(f"    - {reason}" for reason in reasons(backend, problem))
    return "\n".join(lines)


def explain_problem(problem: Problem, requested: str | None = AUTO) -> str:
    """The routing table for one problem: every backend, its priority, and why it can't serve."""
    try:
        chosen = choose(problem, requested).name
        verdict = f"chosen: {chosen}"
    except NoBackend as e:
        chosen, verdict = None, f"no backend: {str(e).splitlines()[1].strip()}"
    lines = [problem.describe(), f"  {verdict}"]
    for backend in sorted(all_backends(), key=lambda b: (-b.priority_for(problem), b.name)):
        why = reasons(backend, problem)
        mark = "*" if backend.name == chosen else " "
        state = "can run" if not why else "; ".join(why)
        lines.append(f"  {mark} {backend.name:<10} priority {backend.priority_for(problem):>4}  {state}")
    return "\n".join(lines)
