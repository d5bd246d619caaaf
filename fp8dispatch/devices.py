"""Names of GPUs: the short name that files measured on a GPU are named after."""

from __future__ import annotations

import re

# Words that name a vendor or product line, not a chip.
_LINE = ("nvidia", "geforce", "tesla", "quadro")
# A memory size or form factor: variants of one chip, where its short name stops.
_VARIANT = re.compile(r"\d+gb|pcie|sxm\d*|nvl|hbm\w*|mig|generation")


def gpu_slug(name: str) -> str:
    """A GPU's short name for file names: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'.

    The vendor and product-line words go, and so does everything from the first memory size or
    form factor on (80GB, PCIe, SXM4, NVL, HBM3): variants of one chip share a name.
    """
    kept = []
    for word in re.split(r"[^a-z0-9]+", name.lower()):
        if _VARIANT.fullmatch(word):
            break
        if word and word not in _LINE:
            kept.append(word)
    return "-".join(kept) or "unknown"


def current_gpu_slug(device=None) -> str:
    """The short name of the CUDA device this process measures on (`gpu_slug` of its name)."""
    import torch

    return gpu_slug(torch.cuda.get_device_name(device))
