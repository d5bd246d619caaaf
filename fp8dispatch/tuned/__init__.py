"""Routing tables measured by `fp8dispatch tune` on known GPUs, shipped with the package (see docs/tuning.md)."""
