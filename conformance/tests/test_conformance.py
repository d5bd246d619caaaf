"""Every registered backend × op × case against the reference (`pytest conformance`)."""

import pytest

from fp8dispatch.conformance import runner


def test_conformance(conformance_check, conformance_cache):
    backend, case = conformance_check
    result = runner.check_case(backend, case, conformance_cache)
    if result.status == runner.UNSUPPORTED:
        # Only a probe or why_not lands here, and only after the call raised Unsupported as it must.
        pytest.skip(f"{backend} declines: {result.outcome.detail}")
    if result.status == runner.FAILED:
        pytest.fail(f"{backend} on {case.id} ({case.describe()}):\n{result.outcome.detail}\n"
                    f"reproduce: fp8dispatch conformance --backend {backend} --op {case.op} --case {case.id} "
                    f"--device {conformance_cache.device}", pytrace=False)
    assert result.status == runner.PASSED
