"""fp8dispatch: FP8 quantize, dequantize and scaled matmul on the best kernel a machine has.

Importing the package costs nothing: the first public name used imports the library (torch and
the measured routing table), so `fp8dispatch --help` and `--version` answer at once.
`fp8dispatch.nn` and `fp8dispatch.compat` are imported the first time they are used.
"""

import importlib

from fp8dispatch import checkout

checkout.install()  # from a source checkout, fp8dispatch.backends is ../backends (docs/decisions.md)

__version__ = "0.1.0"

# Each public name and the module that defines it.
_PUBLIC = {
    **dict.fromkeys(("dequantize", "explain", "linear", "matmul", "quantize"), "api"),
    **dict.fromkeys(("GRANULARITIES", "RECIPES"), "blocks"),
    **dict.fromkeys(("Fp8DispatchError", "Fp8IndexError", "Fp8TypeError", "Fp8ValueError", "NoBackend",
                     "NumericalOverflowError", "Unsupported", "UnknownBackend"), "errors"),
    **dict.fromkeys(("FORMATS", "FP8Format", "fp8_format", "max_value", "min_normal"), "formats"),
    **dict.fromkeys(("Backend", "backend_names", "refresh", "register_backend", "unregister_backend"), "registry"),
    **dict.fromkeys(("plan_dequantize", "plan_linear", "plan_matmul", "plan_quantize"), "planning"),
    "Fp8Tensor": "tensor",
    **dict.fromkeys(("GroupedFp8Tensor", "quantize_grouped"), "grouped"),
    **dict.fromkeys(("explain_grouped", "grouped_linear"), "grouped_api"),
}
_LAZY_SUBMODULES = ("compat", "nn")

__all__ = sorted(_PUBLIC)


def _load() -> None:
    """Import the library once: every public name, the built-in backends, the routing table."""
    if "quantize" in globals():
        return
    backends = importlib.import_module("fp8dispatch.backends")
    importlib.import_module("fp8dispatch.tuning").install()  # the measured routing table (`fp8dispatch tune`), consulted before static priority
    names = {name: getattr(importlib.import_module(f"fp8dispatch.{module}"), name) for name, module in _PUBLIC.items()}
    globals().update(names, backends=backends)
    names["refresh"]()  # settings and the routing fingerprint read now, never first inside a torch.compile trace


def __getattr__(name: str):
    if name in _PUBLIC:
        _load()
        return globals()[name]
    if name in _LAZY_SUBMODULES:
        _load()
        return importlib.import_module(f"fp8dispatch.{name}")
    raise AttributeError(f"module 'fp8dispatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_LAZY_SUBMODULES})
