"""scripts/sanitize_control.py's kernels keep the Hopper kernel's warp-specialize protocol.

racecheck reported hazards on the bytes through which Triton's lowering of `gl.warp_specialize`
tells each worker warp which partition to run (docs/results/h200/sanitizer/summary.md). The
controls only settle whether those reports are the lowering's if their compiled code has the same
protocol: the same state bytes stored by the default warpgroup, the CTA-wide `barrier.sync 1`,
the byte loads of the worker warps, and, in the modes that add them, the named barriers with a
thread count. Compiled for sm90 by Triton and ptxas, no GPU, in a process without the interpreter.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
COMPILE = r"""
import json, sys
sys.path.insert(0, "scripts")
import sanitize_control as c
print(json.dumps({mode: c.ptx(mode) for mode in c.KERNELS} | {"hopper": c.hopper_ptx()}))
"""
# 12 warps: the default warpgroup (0-3), the second consumer (4-7), Triton's 2-warp padding
# partition (8, 9), the producer (10), a 1-warp padding partition (11): bytes 0 0 0 0 2 2 1 3,
# stored as two words; 4 in every byte means "exit".
START = "{0, 50397698}"
EXIT = "{67372036, 67372036}"


@pytest.fixture(scope="module")
def ptx():
    import triton

    if not triton.__version__.startswith("3.6."):
        pytest.skip(f"the controls and the protocol checked here are Triton 3.6's lowering of warp_specialize "
                    f"(the sanitizer run's Triton); this is Triton {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _protocol(text):
    """(state offset, [the instructions of the protocol, in order]) of one kernel's PTX."""
    offsets = set(re.findall(r"st\.shared\.v2\.b32\s+\[global_smem\+?(\d*)\], \{", text))
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if re.match(r"(st\.shared\.v2\.b32\s+\[global_smem|ld\.shared\.b8|barrier\.sync|"
                                               r"bar\.sync)", line)]
    return offsets, kept


@pytest.mark.parametrize("kernel", ["plain", "barriers", "mbarriers", "hopper"])
def test_every_kernel_has_the_state_bytes_and_the_cta_barrier(ptx, kernel):
    offsets, kept = _protocol(ptx[kernel])
    assert len(offsets) == 1, offsets  # one 8-byte word, stored twice
    stores = [line for line in kept if line.startswith("st.shared.v2.b32")]
    assert [START in stores[0], EXIT in stores[-1], len(stores)] == [True, True, 2]
    # every store is followed by the CTA-wide barrier before anything else of the protocol
    for i, line in enumerate(kept):
        if line.startswith("st.shared.v2.b32"):
            assert kept[i + 1] == "barrier.sync \t1;", kept[i:i + 2]
    assert any(line.startswith("ld.shared.b8") for line in kept)
    assert ".reqntid 384" in ptx[kernel]


@pytest.mark.parametrize("kernel", ["barriers", "mbarriers", "hopper"])
def test_the_default_warpgroup_passes_a_counted_named_barrier_before_each_store(ptx, kernel):
    _, kept = _protocol(ptx[kernel])
    stores = [i for i, line in enumerate(kept) if line.startswith("st.shared.v2.b32")]
    for previous, store in zip([0, *stores], stores):
        assert "bar.sync \t0, 128;" in kept[previous:store], kernel
    assert any(line == "bar.sync \t2, 128;" for line in kept)  # the 4-warp partition's own barrier


def test_the_plain_control_has_no_counted_barrier(ptx):
    _, kept = _protocol(ptx["plain"])
    assert not [line for line in kept if line.startswith("bar.sync")]


def test_the_mbarrier_control_waits_like_the_kernel(ptx):
    for kernel in ("mbarriers", "hopper"):
        assert "mbarrier.try_wait.parity.shared.b64" in ptx[kernel]
        assert "mbarrier.arrive.shared::cta.b64" in ptx[kernel]
    assert "cp.async.bulk.tensor" not in ptx["mbarriers"] and "wgmma" not in ptx["mbarriers"]
