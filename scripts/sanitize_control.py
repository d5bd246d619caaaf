"""A control for racecheck: a warp-specialized Gluon kernel that owns no shared memory at all.

Its partitions have the same shape as the Hopper block-scaled kernel's (a default warpgroup, then
workers of 4 and 1 warps) and each only stores its index to global memory. Any shared-memory hazard
racecheck reports here belongs to Triton's lowering of `gl.warp_specialize` (the byte-per-warp state
that tells each worker warp which partition to run), not to our kernels. Exit status 1 if the
partitions did not all run.
"""

from __future__ import annotations

import inspect
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from fp8dispatch.backends.triton.hopper import CONSUMER_REGS, PRODUCER_REGS

PARTITIONS = 3


@gluon.jit
def _mark(out_ptr, which):
    gl.store(out_ptr + gl.program_id(0) * 3 + which, which + 1)


@gluon.jit
def _control_kernel(out_ptr, LIST_API: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    if LIST_API:
        gl.warp_specialize([(_mark, (out_ptr, 0)), (_mark, (out_ptr, 1)), (_mark, (out_ptr, 2))], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize((out_ptr, 0), _mark, ((out_ptr, 1), (out_ptr, 2)), [_mark, _mark], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])


def main() -> int:
    programs = 8
    out = torch.zeros(programs * PARTITIONS, dtype=torch.int32, device="cuda")
    list_api = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters
    _control_kernel[(programs,)](out, LIST_API=list_api, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
                                 num_warps=4)
    expected = torch.arange(1, PARTITIONS + 1, dtype=torch.int32, device="cuda").repeat(programs)
    ok = torch.equal(out, expected)
    print("control: every partition ran" if ok else f"control: partitions missing: {out.tolist()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
