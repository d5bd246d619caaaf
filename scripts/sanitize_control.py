"""Controls for racecheck: warp-specialized Gluon kernels with the Hopper block-scaled kernel's
partition shape (`backends/triton/hopper.py`) and none of its data path.

Why they exist. Triton lowers `gl.warp_specialize` with a few bytes of shared memory of its own,
one per worker warp: the default warpgroup stores every worker warp's partition number there,
then all 12 warps meet at a CTA-wide named barrier (`barrier.sync 1`), then each worker warp
loads its byte and branches to its partition; at the end of the kernel the default warpgroup
stores the exit code (4) the same way. racecheck flags those stores and loads on the Hopper kernel
although both sides of every pair pass the CTA-wide barrier between them. Each mode below keeps
that protocol and adds one more piece of the Hopper kernel's synchronization, so one racecheck
run tells which piece makes racecheck report it:

- `plain`: the partitions only store their number to global memory (the first control: racecheck
  reported nothing on it);
- `barriers`: plus one CTA barrier at the kernel's entry and in each partition. Inside a
  warp-specialized kernel Triton turns these into named barriers with a thread count (the default
  warpgroup's `bar.sync 0, 128`, the 4-warp partition's `bar.sync 2, 128`), which is what the
  Hopper kernel's default warpgroup executes before each of its two state stores;
- `mbarriers`: the Hopper kernel's pipeline with nothing in it: ready/empty mbarriers initialized by
  the default warpgroup, a 1-warp producer that only arrives on `ready`, two consumer partitions
  that wait on it and release `empty`, in a loop, no TMA, no MMA, no operand buffers.

Each mode is its own kernel, so racecheck names the mode in its report. Exit status 1 if some
partition did not run. `--ptx MODE` prints the kernel compiled for sm90 instead (no GPU needed),
`--ptx hopper` the Hopper kernel as the sanitizer workload specializes it
(tests/test_sanitize_control.py checks that the controls and the kernel share the protocol).
"""

from __future__ import annotations

import argparse
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from fp8dispatch.backends.triton.hopper import CONSUMER_REGS, PRODUCER_REGS

PARTITIONS = 3
PROGRAMS = 8
STAGES = 4  # the Hopper kernel's ring
STEPS = 16  # trips around the ring, so every stage's phase flips a few times


@gluon.jit
def _mark(out_ptr, which, BARRIER: gl.constexpr):
    if BARRIER:
        gl.thread_barrier()
    gl.store(out_ptr + gl.program_id(0) * 3 + which, which + 1)


@gluon.jit
def _plain_kernel(out_ptr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    gl.warp_specialize([(_mark, (out_ptr, 0, False)), (_mark, (out_ptr, 1, False)), (_mark, (out_ptr, 2, False))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@gluon.jit
def _barriers_kernel(out_ptr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    gl.thread_barrier()  # runs on the default warpgroup only, before the partitions start
    gl.warp_specialize([(_mark, (out_ptr, 0, True)), (_mark, (out_ptr, 1, True)), (_mark, (out_ptr, 2, True))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@gluon.jit
def _consume(ready, empty, out_ptr, which, steps):
    STAGES: gl.constexpr = ready.type.shape[0]
    for i in range(steps):
        mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
        mbarrier.arrive(empty.index(i % STAGES), count=1)
    gl.store(out_ptr + gl.program_id(0) * 3 + which, which + 1)


@gluon.jit
def _produce(ready, empty, out_ptr, steps):
    STAGES: gl.constexpr = ready.type.shape[0]
    for i in range(steps):
        # mbarriers start with phase 1 complete: the first pass over the ring finds every stage empty.
        mbarrier.wait(empty.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
        mbarrier.arrive(ready.index(i % STAGES), count=1)
    gl.store(out_ptr + gl.program_id(0) * 3 + 2, 3)


@gluon.jit
def _mbarriers_kernel(out_ptr, steps, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr):
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release a stage
    gl.warp_specialize([(_consume, (ready, empty, out_ptr, 0, steps)), (_consume, (ready, empty, out_ptr, 1, steps)),
                        (_produce, (ready, empty, out_ptr, steps))], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


KERNELS = {"plain": _plain_kernel, "barriers": _barriers_kernel, "mbarriers": _mbarriers_kernel}


def _args(mode: str, out) -> tuple[tuple, dict]:
    regs = dict(CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS)
    return ((out, STEPS), dict(STAGES=STAGES, **regs)) if mode == "mbarriers" else ((out, ), regs)


def ptx(mode: str) -> str:
    """The mode's kernel compiled for sm90 the way the Hopper kernel is (4 warps, maxnreg 168), no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = KERNELS[mode]
    _, constexprs = _args(mode, None)
    signature = {name: "constexpr" if name in constexprs else "*i32" if name == "out_ptr" else "i32"
                 for name in fn.arg_names}
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k), ): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168)).asm["ptx"]


def hopper_ptx(m: int = 130, n: int = 200, k: int = 256) -> str:
    """The Hopper kernel compiled for sm90 as scripts/sanitize_triton.py's `linear 130x256 @ 200x256.T
    block` call specializes it (float32 out, no bias, a's scales [M, K/128] row-major, the weight's
    transposed), to set the controls' protocol beside the kernel's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from fp8dispatch.backends.triton import hopper

    def descriptor(dtype, name, rows, cols):
        return f"tensordesc<{name}[{rows}, {cols}],{hopper._layout(dtype, rows, cols)!r}>"

    fn, names = hopper._block_scaled_mm_kernel, hopper._block_scaled_mm_kernel.arg_names
    constexprs = dict(GROUP_M=hopper.GROUP_M, STAGES=hopper.STAGES, LIST_API=True, CONSUMER_REGS=CONSUMER_REGS,
                      PRODUCER_REGS=PRODUCER_REGS)
    ints = dict(M=m, N=n, K=k, stride_sam=triton.cdiv(k, 128), stride_sak=1, stride_sbk=1,
                stride_sbn=triton.cdiv(k, 128), has_bias=0)
    constexprs.update({name: 1 for name, value in ints.items() if value == 1})  # as Triton's launcher specializes
    signature = dict(a_desc=descriptor(torch.float8_e4m3fn, "fp8e4nv", hopper.HALF, hopper.BLOCK_K),
                     b_desc=descriptor(torch.float8_e4m3fn, "fp8e4nv", hopper.BLOCK_N, hopper.BLOCK_K),
                     c_desc=descriptor(torch.float32, "fp32", hopper.HALF, hopper.BLOCK_N),
                     sa_ptr="*fp32", sb_ptr="*fp32", bias_ptr="*fp32")
    signature = {name: "constexpr" if name in constexprs else signature.get(name, "i32") for name in names}
    aligned = [name for name in names if name.endswith("_ptr") or ints.get(name, 1) % 16 == 0]
    source = GluonASTSource(fn=fn, signature=signature,
                            constexprs={(names.index(k), ): v for k, v in constexprs.items()},
                            attrs={(names.index(name), ): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168)).asm["ptx"]


def run(mode: str) -> bool:
    out = torch.zeros(PROGRAMS * PARTITIONS, dtype=torch.int32, device="cuda")
    args, constexprs = _args(mode, out)
    KERNELS[mode][(PROGRAMS, )](*args, **constexprs, num_warps=4, maxnreg=168)
    torch.cuda.synchronize()  # racecheck prints a kernel's hazards before this mode's line below
    ok = torch.equal(out, torch.arange(1, PARTITIONS + 1, dtype=torch.int32, device="cuda").repeat(PROGRAMS))
    print(f"control {mode}: every partition ran" if ok else f"control {mode}: partitions missing: {out.tolist()}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=[*KERNELS, "all"], default="all")
    parser.add_argument("--ptx", choices=[*KERNELS, "hopper"],
                        help="print this mode's (or the Hopper kernel's) sm90 PTX and exit (no GPU needed)")
    options = parser.parse_args()
    if options.ptx:
        print(hopper_ptx() if options.ptx == "hopper" else ptx(options.ptx))
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    modes = list(KERNELS) if options.mode == "all" else [options.mode]
    ok = all([run(mode) for mode in modes])
    print(f"control: {'every partition ran' if ok else 'partitions missing'} ({', '.join(modes)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
