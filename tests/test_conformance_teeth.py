"""The conformance suite has teeth: deliberately wrong backends fail it, a correct one passes."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import torch

import fp8dispatch
from fp8dispatch import Backend, Fp8Tensor
from fp8dispatch.backends import reference
from fp8dispatch.cli import main
from fp8dispatch.conformance import cases, runner
from fp8dispatch.conformance import report as reports


def _backend(name, why_not=lambda op, problem, found: [], **ops):
    return Backend(name=name, probe=lambda: None, why_not=why_not, priority=-100, **ops)


def flipped_scale_quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """The reference, with the lowest mantissa bit of the first block's scale flipped."""
    data, s = reference.quantize(x, block, dtype, scale, scale_ub, pow2_scale)
    s = s.clone()
    s.view(torch.int32)[0, 0] ^= 1
    return data, s


def missing_tail_quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """The reference's values in a fresh buffer whose last column is never written."""
    data, s = reference.quantize(x, block, dtype, scale, scale_ub, pow2_scale)
    out = torch.empty_like(data)
    out[:, :-1] = data[:, :-1]
    return out, s


def missing_tail_matmul(a, b, out_dtype, bias=None):
    full = reference.matmul(a, b, out_dtype, bias)
    out = torch.empty_like(full)
    out[:, :-1] = full[:, :-1]
    return out


def nan_for_zero_blocks_quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """No floor on the scale (as in torchao's blockwise act quant): an all-zero block divides 0 by 0."""
    from fp8dispatch.blocks import blockwise_amax, expand_scale
    from fp8dispatch.formats import fp8_format
    from fp8dispatch.scaling import round_up_pow2, saturating_cast

    fmt = fp8_format(dtype)
    if scale is None:
        amax = blockwise_amax(x.float(), block)
        if scale_ub is not None:
            amax = amax.clamp(max=scale_ub)
        scale = amax / torch.full_like(amax, fmt.max_value)
        scale = round_up_pow2(scale) if pow2_scale else scale
    return saturating_cast(x.float() / expand_scale(scale, block, tuple(x.shape)), fmt), scale


def _run(name, op, match=None):
    return runner.run(backends=[name], ops=[op], quick=True, device="cpu", match=match)


def _statuses(run):
    return {r.case.id: r.status for r in run.results}


def test_one_flipped_scale_bit_fails_every_case(sandbox):
    fp8dispatch.register_backend(_backend("flipped", quantize=flipped_scale_quantize))
    run = _run("flipped", "quantize")
    assert run.results and all(r.status == "failed" for r in run.results)
    assert "scale: 1 of" in run.results[0].outcome.detail


def test_a_missing_tail_column_fails(sandbox):
    fp8dispatch.register_backend(_backend("notail", quantize=missing_tail_quantize, matmul=missing_tail_matmul))
    quantized = _run("notail", "quantize", match=["-randn"])
    multiplied = _run("notail", "matmul", match=["-randn", "representable"])
    assert len(quantized.results) > 20 and len(multiplied.results) > 15
    failed = quantized.failed + multiplied.failed
    assert len(failed) == len(quantized.results) + len(multiplied.results), \
        [r.case.id for r in quantized.results + multiplied.results if r.status != "failed"]


def test_nan_for_zero_blocks_fails_only_where_blocks_are_zero(sandbox):
    fp8dispatch.register_backend(_backend("nanzero", quantize=nan_for_zero_blocks_quantize))
    zero = _run("nanzero", "quantize", match=["zero_blocks"])
    assert zero.results and all(r.status == "failed" for r in zero.results)
    assert "data:" in zero.results[0].outcome.detail
    # Without zero blocks the same arithmetic is the reference's: the suite fails it for the bug only.
    plain = _run("nanzero", "quantize", match=["-randn"])
    assert len(plain.results) > 20 and plain.failed == []


def test_declined_cases_must_raise_unsupported_and_accepted_ones_must_not(sandbox):
    def raising_matmul(a, b, out_dtype, bias=None):
        raise fp8dispatch.Unsupported("changed its mind")

    def crashing_dequantize(data, scale, block, out_dtype):
        raise RuntimeError("illegal memory access")

    fp8dispatch.register_backend(_backend("fickle", matmul=raising_matmul, dequantize=crashing_dequantize))
    matmul = _run("fickle", "matmul", match=["256x256x256"])
    assert matmul.results and all("why_not accepted the case but the call raised Unsupported" in r.outcome.detail
                                  for r in matmul.results)
    dequant = _run("fickle", "dequantize", match=["1x200"])
    assert dequant.results and all("raised RuntimeError: illegal memory access" in r.outcome.detail
                                   for r in dequant.results)
    # An op the backend does not implement is declined, and the API raises Unsupported for it.
    quant = _run("fickle", "quantize", match=["1x200"])
    assert {r.status for r in quant.results} == {"unsupported"}
    assert "does not implement quantize" in quant.results[0].outcome.detail


def test_a_backend_that_writes_its_input_fails(sandbox):
    def scribbling_quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
        out = reference.quantize(x, block, dtype, scale, scale_ub, pow2_scale)
        x.view(-1)[0] = 0.0 if x.is_contiguous() else x.view(-1)[0]
        return out

    fp8dispatch.register_backend(_backend("scribbler", quantize=scribbling_quantize))
    run = _run("scribbler", "quantize", match=["randn"])
    assert any("modified its input x" in r.outcome.detail for r in run.failed)


def third_party_why_not(op, problem, found):
    """A plausible GPU library's limits: no fnuz, K and N multiples of 16, column-major b."""
    reasons = []
    dtypes = [problem.a_dtype, problem.b_dtype] if op == "matmul" else [problem.fp8_dtype]
    reasons += [f"dtype {d}: needs e4m3fn or e5m2" for d in dtypes if "fnuz" in str(d)]
    if op == "matmul":
        reasons += [f"{name}={v}: needs {name} % 16 == 0" for name, v in (("K", problem.k), ("N", problem.n)) if v % 16]
        if not problem.b_col_major:
            reasons.append("b: needs column-major data")
    return reasons


def test_a_correct_third_party_backend_passes_and_is_covered_without_editing_the_suite(sandbox):
    fp8dispatch.register_backend(_backend("thirdparty", why_not=third_party_why_not, quantize=reference.quantize,
                                          dequantize=reference.dequantize, matmul=reference.matmul))
    assert "thirdparty" in runner.select_backends()
    run = runner.run(backends=["thirdparty"], quick=True, device="cpu",
                     match=["-1x200-", "-130x257-", "-136x260-ties", "256x256x256", "3x200x136", "e4m3fnuz"])
    statuses = {r.status for r in run.results}
    assert run.failed == [] and statuses == {"passed", "unsupported"}
    declined = [r for r in run.results if r.status == "unsupported"]
    assert all("needs" in r.outcome.detail for r in declined)
    assert any("K=200: needs K % 16 == 0" in r.outcome.detail for r in declined)


def test_the_cli_exits_non_zero_and_reports_each_failure_with_its_case(sandbox, tmp_path, capsys):
    fp8dispatch.register_backend(_backend("flipped", quantize=flipped_scale_quantize))
    path = tmp_path / "report.md"
    code = main(["conformance", "--backend", "flipped,reference", "--op", "quantize", "--case=-1x200-",
                 "--quick", "--device", "cpu", "--report", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED flipped quantize-" in out and "| flipped |" in out and "**" in out
    data = json.loads(path.with_suffix(".json").read_text())
    failures = [r for r in data["results"] if r["status"] == "failed"]
    assert failures and all(r["backend"] == "flipped" for r in failures)
    assert failures[0]["reproduce"].startswith("fp8dispatch conformance --backend flipped --op quantize --case ")
    case = cases.by_id(failures[0]["case"])
    assert case.op == "quantize"
    assert "## Failures" in path.read_text() and failures[0]["case"] in path.read_text()
    assert main(["conformance", "--backend", "reference", "--op", "quantize", "--case=-1x200-",
                 "--quick", "--device", "cpu"]) == 0


def test_case_ids_are_unique_and_rebuild_the_same_inputs():
    for quick in (True, False):
        ids = [c.id for c in cases.all_cases(quick)]
        assert len(ids) == len(set(ids))
    case = cases.cases("quantize")[5]
    first, again = cases.build(case, "cpu")["x"], cases.build(cases.by_id(case.id), "cpu")["x"]
    assert torch.equal(first, again)


def test_quick_sizes_stay_small_for_the_interpreter():
    for case in cases.all_cases(quick=True):
        if case.op == "grouped_linear":  # all experts' rows together; K up to 384 as for matmul
            rows = sum(case.counts) if case.layout == "contiguous" else len(case.counts) * case.max_m
            assert max(rows, case.n) <= 300 and case.k <= 384, case.id
            continue
        rows, cols = cases._rows_cols(case.shape)
        # ≤ 300 rows and columns; K up to 384 so that ceil(K/128) = 3 is covered (not a multiple of 4).
        assert max(rows, case.n) <= 300 and cols <= (384 if case.op == "matmul" else 300), case.id


def test_reports_name_the_matrix_cells(sandbox):
    fp8dispatch.register_backend(_backend("flipped", quantize=flipped_scale_quantize))
    run = runner.run(backends=["flipped", "reference"], ops=["quantize", "dequantize"], quick=True, device="cpu",
                     match=["-1x200-"])
    grid = reports.matrix(run)
    assert grid["flipped"]["quantize"]["row"]["failed"] == 1
    assert grid["flipped"]["dequantize"]["row"]["unsupported"] == 1
    assert grid["reference"]["dequantize"]["row"]["passed"] == 1
    text = reports.to_markdown(run)
    assert "| flipped | **1 ✗** | **1 ✗** | **1 ✗** | **1 ✗** |" in text
    assert "does not implement dequantize" in text


PLUGIN = '''
import fp8dispatch
from fp8dispatch import Backend
from fp8dispatch.backends import reference

fp8dispatch.register_backend(Backend(name="pluggedin", probe=lambda: None, why_not=lambda op, p, found: [],
                                     dequantize=reference.dequantize, priority=-100))
'''


def test_pytest_collects_a_backend_registered_by_a_plugin(tmp_path):
    (tmp_path / "pluggedin_backend.py").write_text(textwrap.dedent(PLUGIN))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "-p", "pluggedin_backend", "--backend", "pluggedin",
         "--op", "dequantize", "-q", "-k", "1x200 or 7x130", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 passed" in proc.stdout, proc.stdout[-2000:]


def test_merge_keeps_other_backends_and_replaces_a_rerun_one(sandbox, tmp_path):
    fp8dispatch.register_backend(_backend("flipped", quantize=flipped_scale_quantize))
    path = tmp_path / "h100.md"
    first = runner.run(backends=["flipped", "reference"], ops=["quantize"], device="cpu", match=["-1x200-"])
    reports.write(first, path)
    again = runner.run(backends=["reference"], ops=["quantize", "dequantize"], device="cpu", match=["-1x200-"])
    merged = reports.merge(again, path)
    assert sorted(merged.backends) == ["flipped", "reference"] and merged.ops == ["quantize", "dequantize"]
    assert len(merged.failed) == 4 and {r.backend for r in merged.failed} == {"flipped"}
    assert len([r for r in merged.results if r.backend == "reference"]) == 8


def test_merge_replaces_only_the_ops_a_backend_was_checked_on_again(sandbox, tmp_path):
    """A backend's ops checked by separate commands (each under its own time limit) add up."""
    path = tmp_path / "conformance.md"
    reports.write(runner.run(backends=["reference"], ops=["quantize", "dequantize"], device="cpu",
                             match=["-1x200-"]), path)
    again = runner.run(backends=["reference"], ops=["dequantize"], device="cpu", match=["-1x200-"])
    merged = reports.merge(again, path)
    by_op = Counter(r.case.op for r in merged.results)
    assert by_op == {"quantize": 4, "dequantize": 4} and merged.ops == ["quantize", "dequantize"]
    assert all(r in merged.results for r in again.results)


def test_reports_run_side_by_side_merge_with_from(sandbox, tmp_path, capsys):
    """Backends checked by separate commands, each to its own report, merge into one with `--from`:
    every result kept, a failure still fails the merged report, and it reads back the same."""
    fp8dispatch.register_backend(_backend("flipped", quantize=flipped_scale_quantize))
    for name in ("flipped", "reference"):
        assert main(["conformance", "--backend", name, "--op", "quantize", "--case=-1x200-", "--device", "cpu",
                     "--report", str(tmp_path / name / "conformance.md")]) == (name == "flipped")
    merged_path = tmp_path / "all" / "conformance.md"
    code = main(["conformance", "--from", str(tmp_path / "flipped" / "conformance.json"),
                 str(tmp_path / "reference" / "conformance.json"), "--report", str(merged_path)])
    assert code == 1
    merged = reports.load(merged_path)
    assert sorted(merged.backends) == ["flipped", "reference"] and not merged.interrupted
    assert {r.backend for r in merged.failed} == {"flipped"}
    assert len([r for r in merged.results if r.backend == "reference" and r.status == "passed"]) == 4
    assert main(["conformance", "--from", str(tmp_path / "nothing.json"), "--report", str(merged_path)]) == 2
    assert "nothing.json" in capsys.readouterr().err

def scribbling_quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    """The reference's answer, after which it doubles its input in place."""
    out = reference.quantize(x, block, dtype, scale, scale_ub, pow2_scale)
    x.mul_(2)
    return out


def _scribbler_and_clean():
    """A faulty backend checked first, a clean one after it on the same cases."""
    fp8dispatch.register_backend(_backend("scribbler", quantize=scribbling_quantize))
    fp8dispatch.register_backend(Backend(name="clean", probe=lambda: None, why_not=lambda op, p, found: [],
                                         quantize=reference.quantize, priority=-200))


def test_a_backend_that_writes_its_input_is_blamed_alone(sandbox, capsys):
    _scribbler_and_clean()
    run = runner.run(backends=["scribbler", "clean"], ops=["quantize"], device="cpu", match=["-1x200-", "-7x130-"])
    assert [r.backend for r in run.results][:2] == ["scribbler", "clean"]
    assert {r.status for r in run.results if r.backend == "clean"} == {"passed"}
    assert all("modified its input x" in r.outcome.detail for r in run.results if r.backend == "scribbler")
    # pytest's path: the session's one cache of inputs, a check per backend
    cache = runner.ReferenceCache("cpu")
    for case in cases.cases("quantize")[:6]:
        assert runner.check_case("scribbler", case, cache).status == "failed"
        assert runner.check_case("clean", case, cache).status == "passed", case.id
    code = main(["conformance", "--backend", "scribbler,clean", "--op", "quantize", "--case=-1x200-",
                 "--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED scribbler quantize-" in out and "FAILED clean" not in out


SCRIBBLER_PLUGIN = '''
import fp8dispatch
from fp8dispatch import Backend
from fp8dispatch.backends import reference


def scribbling_quantize(x, block, dtype, scale=None, scale_ub=None, pow2_scale=False):
    out = reference.quantize(x, block, dtype, scale, scale_ub, pow2_scale)
    x.mul_(2)
    return out


fp8dispatch.register_backend(Backend(name="scribbler", probe=lambda: None, why_not=lambda op, p, found: [],
                                     quantize=scribbling_quantize, priority=-100))
fp8dispatch.register_backend(Backend(name="clean", probe=lambda: None, why_not=lambda op, p, found: [],
                                     quantize=reference.quantize, priority=-200))
'''


def test_pytest_blames_only_the_backend_that_writes_its_input(tmp_path):
    (tmp_path / "scribbler_backends.py").write_text(SCRIBBLER_PLUGIN)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "-p", "scribbler_backends", "--backend", "scribbler,clean",
         "--op", "quantize", "-q", "-rfE", "-k", "1x200 or 7x130", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert failed and all("[scribbler-" in line for line in failed), proc.stdout[-3000:]
    assert "8 passed" in proc.stdout and "8 failed" in proc.stdout, proc.stdout[-2000:]


def _round_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


def reduced_accumulation_matmul(a, b, out_dtype, bias=None):
    """Each K block's partial product in fp32, summed across blocks in an accumulator of 14
    significant bits: Hopper's FP8 fast accumulation without promotion to fp32."""
    x, y = reference.dequantize(*a, torch.float32), reference.dequantize(*b, torch.float32)
    k = x.shape[1]
    step = a.block[1] if a.block[1] < k else 128
    acc = torch.zeros(x.shape[0], y.shape[1])
    for start in range(0, k, step):
        acc = _round_to_bits(acc + x[:, start:start + step] @ y[start:start + step], 14)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def test_a_reduced_precision_accumulator_fails_the_block_recipe(sandbox):
    fp8dispatch.register_backend(_backend("fastacc", matmul=reduced_accumulation_matmul))
    run = runner.run(backends=["fastacc"], ops=["matmul"], device="cpu", match=["matmul-block-"])
    failed = {r.case.id for r in run.failed}
    assert failed and all("cancel" in case_id for case_id in failed), failed
    assert {r.case.id for r in run.results if "cancel" in r.case.id} == failed
    exact = runner.run(backends=["reference"], ops=["matmul"], device="cpu", match=["cancel"])
    assert exact.results and not exact.failed


def test_per_block_extremes_catch_a_scale_read_from_the_wrong_block(sandbox):
    def neighbour_scale_matmul(a, b, out_dtype, bias=None):
        """The reference, but b's last block takes its neighbour's scale (an off-by-one at the tail)."""
        scale = b.scale.clone()
        if scale.shape[1] > 1:
            scale[-1, -1] = scale[-1, -2]
        elif scale.shape[0] > 1:
            scale[-1, -1] = scale[-2, -1]
        return reference.matmul(a, Fp8Tensor(b.data, scale, b.block), out_dtype, bias)

    def dropped_block_matmul(a, b, out_dtype, bias=None):
        """The reference, skipping a's last K block (a loop bound one block short)."""
        data = a.data.clone()
        data[:, (data.shape[1] - 1) // 128 * 128:] = 0
        return reference.matmul(Fp8Tensor(data, a.scale, a.block), b, out_dtype, bias)

    fp8dispatch.register_backend(_backend("offbyone", matmul=neighbour_scale_matmul))
    fp8dispatch.register_backend(_backend("dropped", matmul=dropped_block_matmul))
    corner = runner.run(backends=["offbyone"], ops=["matmul"], device="cpu", match=["matmul-block-", "-corner"])
    assert {r.status for r in corner.results if "matmul-block-" in r.case.id and "-corner" in r.case.id} == {"failed"}
    sparse = runner.run(backends=["dropped"], ops=["matmul"], device="cpu", match=["-sparse"])
    assert len(sparse.results) == 3 and {r.status for r in sparse.results} == {"failed"}
