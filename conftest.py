"""Test setup for the whole repository: on a machine with no GPU, run Triton in its interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorator runs, so before fp8dispatch's backends import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The conformance suite's options and parametrization (`pytest conformance --backend triton`).
pytest_plugins = ("fp8dispatch.conformance.plugin",)
