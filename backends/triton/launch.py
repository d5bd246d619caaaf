"""Launch a @triton.jit kernel through its compiled binary, skipping `JITFunction.run` after the first call.

`kernel[grid](...)` re-binds every argument, re-derives its specialization (16-byte alignment of
pointers; integers equal to 1 or divisible by 16), hashes a cache key and reads several knobs on
each call; on an H100 a decode-sized matmul call cost 50-110 µs of host time that
way. Two cheaper paths, both starting from the `CompiledKernel` the first call returns:

- `Launcher`: later calls rebuild only our own key (a superset of what Triton specializes on) and
  call the compiled kernel;
- `bind`: a backend's plan, whose key already fixed every integer and dtype, keeps the compiled
  kernel's own launcher, function handle and packed metadata, and each call passes raw pointers
  (ints, which Triton's launcher takes as they are) and the current stream straight to it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from torch.library import wrap_triton

from torch._subclasses.fake_tensor import is_fake

# FP8DISPATCH_TRITON_FAST_LAUNCH=0 sends every launch through Triton's own path.
ENABLED = os.environ.get("FP8DISPATCH_TRITON_FAST_LAUNCH", "1") != "0"

# Triton's CPU interpreter swaps module-level state of triton.language while a kernel runs, so two
# threads interpreting at once break each other: off the GPU, one launch at a time.
_interpreter_lock = threading.Lock()

# The stream torch's current-stream context selects, as the raw handle Triton's launcher takes;
# the same query Triton's own driver makes (a CUDA-graph capture switches it). 0.1 µs a call on an
# H200 against 4 µs for `torch.cuda.current_stream(i).cuda_stream`, the fallback where it is missing.
raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)


def static_key(scalars: tuple, constexprs: dict, options: dict) -> tuple:
    """The non-tensor part of a launch's key: each integer's value (finer than Triton's "equals 1 /
    divisible by 16", so never too coarse), only the type of floats (Triton does not specialize
    them), the constexprs and the options. Tensors add their dtype and 16-byte alignment."""
    return (tuple(v if isinstance(v, int) else type(v) for v in scalars), tuple(constexprs.items()),
            tuple(options.items()))


class Launcher:
    """`Launcher(kernel, tensors)(grid, args, constexprs, options)`: `args` are the runtime
    parameters in order (the first `tensors` of them tensors), `constexprs` the remaining
    parameters by name, `options` num_warps / num_stages. `last` is the latest launch, for `bound`:
    (grid of 3, the CompiledKernel, id of the first tensor, each tensor's (dtype, 16-byte aligned),
    the non-tensor args, constexpr values in parameter order). It holds no tensor: one kept alive
    from a CUDA-graph capture would break the capture's memory pool."""

    def __init__(self, kernel, tensors: int):
        self.kernel = kernel
        self.tensors = tensors
        self.compiled: dict[tuple, tuple] = {}
        self.last: tuple | None = None

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict, static: tuple | None = None):
        """`static`, when given, stands for everything but the tensors (a caller's cached plan)."""
        if tracing(args[0]):  # under torch.compile: a node of the graph, which Inductor launches itself
            wrap_triton(self.kernel)[grid](*args, **constexprs, **options)
            return
        if args[0].device.type != "cuda":
            with _interpreter_lock:
                self.kernel[grid](*args, **constexprs, **options)
            return
        if not ENABLED:
            self.kernel[grid](*args, **constexprs, **options)
            return
        if static is None:
            static = static_key(args[self.tensors:], constexprs, options)
        key = (args[0].device.index, static, tuple((t.dtype, t.data_ptr() % 16 == 0) for t in args[:self.tensors]))
        hit = self.compiled.get(key)
        grid3 = (*grid, 1, 1)[:3]  # the compiled runner reads all three dimensions
        if hit is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            names = self.kernel.arg_names[len(args):]
            hit = self.compiled[key] = (compiled, tuple(constexprs[n] for n in names))
        else:
            hit[0][grid3](*args, *hit[1], stream=raw_stream(args[0].device.index))
        # Cheap on purpose (it runs on every launch): the checks and the args' rebuild wait for `bound`.
        self.last = (grid3, hit[0], id(args[0]), key[2], args[self.tensors:], hit[1])

    def bound(self, first: torch.Tensor) -> tuple | None:
        """`(grid, run, function, packed, args, constexprs)` for `bind`'s direct relaunch of the kernel
        last launched with `first` as its first tensor (`args` with tensors left out), or None: that
        launch was for another tensor or had an unaligned one, or Triton's own path must serve."""
        last = self.last
        if last is None or last[2] != id(first) or not all(aligned for _, aligned in last[3]):
            return None
        grid, compiled, _, _, scalars, constexprs = last
        handles = bind(compiled)
        return None if handles is None else (grid, *handles, (None,) * self.tensors + scalars, constexprs)


def build_failed(e: Exception) -> bool:
    """A failure to build a kernel (not to run it): Triton's compile errors and MLIR pass failures."""
    return (isinstance(e, (triton.compiler.errors.CompilationError, triton.runtime.errors.OutOfResources))
            or (isinstance(e, RuntimeError) and "PassManager" in str(e)))


def tracing(t: torch.Tensor) -> bool:
    """Whether a torch.compile trace is running this code on `t` (then kernels become graph nodes).
    A plain eager tensor answers from its type: `is_fake` alone costs 3 µs a call on a CPU."""
    if type(t) is torch.Tensor and not torch._is_functional_tensor(t):
        return False
    return is_fake(t)


def bind(compiled):
    """`(run, function, packed)` such that `run(g0, g1, g2, stream, function, packed, None, None,
    None, *args)` launches `compiled` (every parameter in order, constexprs included): Triton's
    own launch minus its per-call work. None when a launch hook listens (a profiler; only Triton's
    full path calls hooks) or when fast launches are switched off. Bound runners ask `listening()`
    again on every call, so a profiler attached later still sees each launch."""
    if not ENABLED or getattr(triton, "knobs", None) is None or listening():
        return None
    try:
        run = compiled.run  # loads the module on first access
        return run, compiled.function, compiled.packed_metadata
    except AttributeError:  # a Triton whose CompiledKernel is laid out otherwise: its own path serves
        return None


def listening() -> bool:
    """Whether a Triton launch hook is set. Triton 3.6 and newer keep each hook as a `HookChain`
    that is never None and listens only when it holds a call; older ones use None for no hook."""
    runtime = triton.knobs.runtime
    return _listens(runtime.launch_enter_hook) or _listens(runtime.launch_exit_hook)


def _listens(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


@dataclass(frozen=True)
class Direct:
    """A bound kernel launched on raw pointers into memory its caller owns: `launch(*inputs,
    *outputs)` (16-byte aligned, as the kernel was compiled for) and each output's bytes. Plans
    that chain two kernels give both steps' outputs one allocation this way (fp8dispatch/direct.py)."""

    launch: Callable
    sizes: tuple[int, ...]
    # Whether a launch hook listens now (a profiler): then the caller takes the full path instead.
    listening: Callable[[], bool] = listening
