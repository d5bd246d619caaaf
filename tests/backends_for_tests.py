"""Small fake backends for the registry tests; each delegates its math to the reference."""

from fp8dispatch import Backend
from fp8dispatch.backends import reference


def row_only_backend(name, priority=0, priorities=None):
    def why_not(op, problem, found):
        if op == "quantize" and problem.granularity != "row":
            return [f"granularity {problem.granularity}: only row"]
        return []

    return Backend(name=name, probe=lambda: None, why_not=why_not, quantize=reference.quantize,
                   priority=priority, priorities=priorities or {})


def counting_backend(name, calls, probe_error=None):
    def probe():
        calls.append("probe")
        if probe_error:
            raise probe_error

    def why_not(op, problem, found):
        calls.append("why_not")
        return []

    def quantize(*args):
        calls.append("quantize")
        return reference.quantize(*args)

    return Backend(name=name, probe=probe, why_not=why_not, quantize=quantize, priority=-100)
