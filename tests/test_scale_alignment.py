"""Scales reach library GEMMs 16-byte aligned, even when an operand is a slice of a bigger tensor.

cuBLASLt rejects per-row and per-block scale pointers that are not 16-byte aligned
(CUBLAS_STATUS_NOT_SUPPORTED; backends/_library.py). On a CPU the library calls are replaced by
recorders that check every scale pointer they are handed, on the conformance suite's sliced cases.
"""

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import fp8dispatch
from fp8dispatch.backends import _library as lib
from fp8dispatch.backends import fbgemm as fb
from fp8dispatch.backends import reference
from fp8dispatch.backends import torch as tb
from fp8dispatch.conformance import cases, checks, runner

SLICED = [case for case in cases.cases("matmul") if case.layout == "sliced" and case.recipe != "mixed"]


def test_the_sliced_cases_hand_over_misaligned_scales_and_aligned_data():
    """What the recorders below are for: without realignment, misaligned scales would reach them."""
    assert {case.recipe for case in SLICED} == {"block", "row", "tensor"}
    for case in SLICED:
        inputs = checks.fresh(cases.build(case, "cpu"))  # the copy each backend gets keeps the offsets
        a, b = inputs["a"], inputs["b"]
        assert a.data.data_ptr() % 16 == 0 and b.data.data_ptr() % 16 == 0, case.id
        assert a.scale.data_ptr() % 16 and b.scale.data_ptr() % 16, case.id


def test_aligned_returns_an_aligned_tensor_as_is():
    t = torch.rand(64, 1)
    rows = t[4:]  # 16 bytes on
    assert lib.aligned(t) is t and lib.aligned(rows) is rows


@pytest.mark.parametrize("make", [
    lambda: torch.rand(67, 1)[3:],  # rows 3.. of a row scale: 12 bytes past alignment
    lambda: torch.rand(129)[1:].view(2, 64).t(),  # column-major [64, 2], 4 bytes past
    lambda: torch.rand(5, 3)[1:2, :1],  # one scale of a bigger tensor
], ids=["rows", "column-major", "one"])
def test_aligned_copies_a_misaligned_tensor_keeping_values_and_layout(make):
    t = make()
    assert t.data_ptr() % 16
    fixed = lib.aligned(t)
    assert fixed.data_ptr() % 16 == 0
    assert fixed.shape == t.shape and fixed.stride() == t.stride() and torch.equal(fixed, t)


def test_aligned_judges_a_fake_tensor_by_its_offset_without_touching_its_pointer():
    """While tracing there is no pointer (FakeTensor.data_ptr() warns and returns nonsense)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("error")
        base = torch.empty(68, 1)
        rows = base[4:]
        assert lib.aligned(rows) is rows
        moved = lib.aligned(base[3:])
        assert moved.storage_offset() == 0 and moved.shape == (65, 1)


def _expand(scale, rows, cols):
    """A scale broadcast over [rows, cols]: one value, per row, per column, or per 128 × 128 block."""
    def side(count, length):
        return length if count == 1 else 1 if count == length else 128
    r, c = side(scale.shape[0], rows), side(scale.shape[1], cols)
    return scale.repeat_interleave(r, 0)[:rows].repeat_interleave(c, 1)[:, :cols]


def _product(data_a, data_b, scale_a, scale_b):
    (m, k), n = data_a.shape, data_b.shape[1]
    return (data_a.float() * _expand(scale_a, m, k)) @ (data_b.float() * _expand(scale_b, k, n))


class Recorder:
    """Stands in for a library GEMM: notes every scale pointer's alignment, returns the product."""

    def __init__(self):
        self.misaligned = []

    def check(self, name, *scales):
        self.misaligned += [f"{name} scale {i}: {s.data_ptr() % 16}" for i, s in enumerate(scales)
                            if s.data_ptr() % 16]

    def scaled_mm(self, a, b, scale_a, scale_b, bias=None, out_dtype=None, use_fast_accum=False):
        self.check("torch._scaled_mm", scale_a, scale_b)
        out = _product(a, b, scale_a, scale_b)
        return (out if bias is None else out + bias.float()).to(out_dtype)

    def scaled_mm_v2(self, a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=None):
        self.check("F.scaled_mm", scale_a, scale_b)
        return _product(a, b, scale_a, scale_b[:-(-b.shape[0] // 128)]).to(output_dtype)


@pytest.mark.parametrize("case", SLICED, ids=lambda case: case.id)
def test_the_torch_backend_hands_scaled_mm_aligned_scales(monkeypatch, case):
    recorder = Recorder()
    monkeypatch.setattr(torch, "_scaled_mm", recorder.scaled_mm)
    monkeypatch.setattr(F, "scaled_mm", recorder.scaled_mm_v2)
    inputs = checks.fresh(cases.build(case, "cpu"))
    got = tb.matmul(inputs["a"], inputs["b"], case.out_dtype)
    assert recorder.misaligned == []
    want = reference.matmul(inputs["a"], inputs["b"], torch.float32)
    assert checks.relative_error(got, want) < checks.ERROR_BOUND


def fbgemm_recorder(recorder):
    def rowwise(xq, wq, xs, ws, bias=None, use_fast_accum=True):
        recorder.check("f8f8bf16_rowwise", xs, ws)
        return _product(xq, wq.t(), xs[:, None], ws[None, :]).to(torch.bfloat16)

    def tensorwise(xq, wq, scale, use_fast_accum=True):
        recorder.check("f8f8bf16", scale)
        return _product(xq, wq.t(), scale.view(1, 1), torch.ones(1, 1)).to(torch.bfloat16)

    def groupwise(xq, wq, xs, ws):  # xs [K/128, M] and ws [K/128, N/128], both MN-major
        recorder.check("f8f8bf16_groupwise", xs, ws)
        return _product(xq, wq.t(), xs.t(), ws).to(torch.bfloat16)

    return types.SimpleNamespace(f8f8bf16_rowwise=rowwise, f8f8bf16=tensorwise, f8f8bf16_groupwise=groupwise)


@pytest.mark.parametrize("case", SLICED, ids=lambda case: case.id)
def test_the_fbgemm_backend_hands_its_gemms_aligned_scales(monkeypatch, case):
    recorder = Recorder()
    monkeypatch.setattr(fb, "_ops", lambda: fbgemm_recorder(recorder))
    inputs = checks.fresh(cases.build(case, "cpu"))
    got = fb.matmul(inputs["a"], inputs["b"], torch.bfloat16)
    assert recorder.misaligned == []
    want = reference.matmul(inputs["a"], inputs["b"], torch.float32)
    assert checks.relative_error(got, want) < checks.ERROR_BOUND


def test_a_backend_that_rejects_misaligned_scales_fails_exactly_the_sliced_cases(sandbox):
    """The conformance suite catches what cuBLASLt did: every backend's copy of a sliced case keeps
    its misaligned scale pointers, and a backend that cannot take them fails there and only there."""
    def picky_matmul(a, b, out_dtype, bias=None):
        if a.scale.data_ptr() % 16 or b.scale.data_ptr() % 16:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")
        return reference.matmul(a, b, out_dtype, bias)

    fp8dispatch.register_backend(fp8dispatch.Backend(name="picky", probe=lambda: None, priority=-100,
                                                     why_not=lambda op, problem, found: [], matmul=picky_matmul))
    run = runner.run(backends=["picky"], ops=["matmul"], device="cpu", match=["-sliced", "-randn"])
    failed = {r.case.id for r in run.failed}
    assert failed == {r.case.id for r in run.results if r.case.layout == "sliced"} and len(failed) == 8
    assert len(run.results) > 20 and "CUBLAS_STATUS_NOT_SUPPORTED" in run.failed[0].outcome.detail
