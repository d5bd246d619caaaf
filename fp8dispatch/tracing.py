"""Planning while torch.compile traces fp8dispatch's ops: on memory-less stand-ins of the traced
tensors, outside the trace's modes, so planning records nothing in the graph.

A traced size may be symbolic: `size` takes its example value and installs the guard that keeps
the graph to sizes the same plan serves (that value exactly, or for the row count M its
power-of-two bucket, the bucket routing tables and Triton configurations are keyed by). `traced`
says whether a routed step can be traced into the graph or must stay one opaque op.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from fp8dispatch import registry
from fp8dispatch.tensor import Fp8Tensor


def size(n, exact: bool) -> int:
    """A size as an int. A symbolic one gives its example value, after a guard that keeps the graph
    to sizes the same plan serves: that value exactly, or (for M) its power-of-two bucket."""
    if isinstance(n, int):
        return n
    h = n.node.hint
    if exact:
        ok = n == h
    else:
        hi = 1 << max(h - 1, 0).bit_length()
        ok = (hi // 2 < n) & (n <= hi) if hi > 1 else n <= 1
    if not ok:  # evaluating the condition is what installs the guard
        raise AssertionError(f"size {n} left the range its example {h} set")
    return h


class _Spec:
    """A tensor's planning stand-in, taken outside the trace: its example sizes (see `size`)."""

    def __init__(self, t: torch.Tensor, rows_bucketed: bool):
        sizes = tuple(t.shape)
        if rows_bucketed and len(sizes) >= 2:
            rows = 1
            for d in sizes[:-1]:
                rows = rows * d
            size(rows, exact=False)
            sizes = tuple(_hint(d) for d in sizes[:-1]) + (size(sizes[-1], exact=True),)
        else:
            sizes = tuple(size(d, exact=True) for d in sizes)
        self.sizes, self.strides = sizes, tuple(_hint(s) for s in t.stride())
        self.dtype, self.device = t.dtype, t.device

    def tensor(self) -> torch.Tensor:
        return torch.empty_strided(self.sizes, self.strides, dtype=self.dtype, device=self.device)


def _hint(n) -> int:
    return n if isinstance(n, int) else n.node.hint


def spec(t, rows_bucketed: bool):
    if t is None:
        return None
    if isinstance(t, Fp8Tensor):
        return (_Spec(t.data, rows_bucketed), _Spec(t.scale, rows_bucketed), t.block)
    return _Spec(t, rows_bucketed)


def _stand_in(s):
    if s is None:
        return None
    if isinstance(s, tuple):
        return Fp8Tensor._trusted(s[0].tensor(), s[1].tensor(), s[2])
    return s.tensor()


@contextlib.contextmanager
def fakes():
    """Outside the trace's modes, with memory-less tensors: what runs here records nothing in the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), FakeTensorMode():
        yield


def planned(plan, *specs, **options):
    """`plan(*stand-ins, **options)`, run on memory-less stand-ins of the traced tensors."""
    with fakes():
        return plan(*(_stand_in(s) for s in specs), **options)


def traced(routed, *args) -> Callable | None:
    """The backend's function to trace for a routed step called on `args`, or None when the step
    must stay opaque."""
    run = routed.run
    step = getattr(run, "traced", run)
    if step is run:
        if routed.problem.op not in registry.get_backend(routed.backend).traceable:
            return None
        if not _runs_on_fakes(routed, step, args):
            return None
    return step


_RUNS_ON_FAKES: dict = {}  # (backend, problem) -> bool; a re-registered backend is tried afresh
registry._refresh_hooks.append(_RUNS_ON_FAKES.clear)


def _runs_on_fakes(routed, step, args) -> bool:
    """Whether a library step runs on fake tensors, tried once per problem outside the trace. A
    library op registered without a fake kernel cannot enter a graph (fbgemm-gpu-genai 1.6's
    f8f8bf16_groupwise: "Operator does not support running with fake tensors"), so its step stays
    one opaque op instead of failing the compile."""
    key = (routed.backend, routed.problem)
    if key not in _RUNS_ON_FAKES:
        try:
            with fakes():
                step(*map(_example, args))
            _RUNS_ON_FAKES[key] = True
        except Exception:  # any failure on fakes: the opaque op runs the same step on real tensors
            _RUNS_ON_FAKES[key] = False
    return _RUNS_ON_FAKES[key]


def _example(t):
    """A traced tensor's memory-less copy at its example sizes, installing no guard (see `size`)."""
    if isinstance(t, Fp8Tensor):
        return Fp8Tensor._trusted(_example(t.data), _example(t.scale), t.block)
    if isinstance(t, torch.Tensor):
        return torch.empty_strided(tuple(map(_hint, t.shape)), tuple(map(_hint, t.stride())), dtype=t.dtype,
                                   device=t.device)
    return t
