"""Launch a @triton.jit kernel through its compiled binary, skipping `JITFunction.run` after the first call.

`kernel[grid](...)` re-binds every argument, re-derives its specialization (16-byte alignment of
pointers; integers equal to 1 or divisible by 16), hashes a cache key and reads several knobs on
each call. On an H100 a decode-sized matmul call cost 50-110 µs of host time that
way, several times its GPU time; with this launcher and the matmul's cached plans, 27-34 µs
(docs/triton.md). The first call with a given specialization goes through Triton (compiling if
needed) and keeps the `CompiledKernel`; later calls rebuild only our own key, a superset of what
Triton specializes on, and call the compiled launcher directly.
"""

from __future__ import annotations

import os
import threading

import torch

# FP8DISPATCH_TRITON_FAST_LAUNCH=0 sends every launch through Triton's own path.
ENABLED = os.environ.get("FP8DISPATCH_TRITON_FAST_LAUNCH", "1") != "0"

# Triton's CPU interpreter swaps module-level state of triton.language while a kernel runs, so two
# threads interpreting at once break each other: off the GPU, one launch at a time.
_interpreter_lock = threading.Lock()


def static_key(scalars: tuple, constexprs: dict, options: dict) -> tuple:
    """The non-tensor part of a launch's key: each integer's value (finer than Triton's "equals 1 /
    divisible by 16", so never too coarse), only the type of floats (Triton does not specialize
    them), the constexprs and the options. Tensors add their dtype and 16-byte alignment."""
    return (tuple(v if isinstance(v, int) else type(v) for v in scalars), tuple(constexprs.items()),
            tuple(options.items()))


class Launcher:
    """`Launcher(kernel, tensors)(grid, args, constexprs, options)`: `args` are the runtime
    parameters in order (the first `tensors` of them tensors), `constexprs` the remaining
    parameters by name, `options` num_warps / num_stages."""

    def __init__(self, kernel, tensors: int):
        self.kernel = kernel
        self.tensors = tensors
        self.compiled: dict[tuple, tuple] = {}

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict, static: tuple | None = None):
        """`static`, when given, stands for everything but the tensors (a caller's cached plan)."""
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
        if hit is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            names = self.kernel.arg_names[len(args):]
            self.compiled[key] = (compiled, tuple(constexprs[n] for n in names))
            return
        compiled, tail = hit
        grid3 = (*grid, 1, 1)[:3]  # the compiled runner reads all three dimensions
        compiled[grid3](*args, *tail, stream=torch.cuda.current_stream(args[0].device).cuda_stream)
