"""What the library backends share: a quiet import, the CUDA device gate, and cached scalar tensors."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
from importlib import metadata
import logging
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

from fp8dispatch import grouped

log = logging.getLogger("fp8dispatch")


@contextlib.contextmanager
def quiet():
    """Run a library import without it touching the user's console or logging setup.

    fbgemm_gpu logs a WARNING (and on failure an ERROR) through the root logger at import, which
    installs a stderr handler there; its Triton module prints a TMA notice; torchao logs
    "Failed to load" lines. We silence records, warnings and Python-level output for the import,
    then put the root logger back exactly as it was.
    """
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    out = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield out
    finally:
        logging.disable(disabled)
        root.handlers[:] = handlers
        root.setLevel(level)
        if out.getvalue().strip():
            log.debug("output while importing a library:\n%s", out.getvalue().rstrip())


def quiet_import(name: str, importer=importlib.import_module):
    """(module, None) or (None, reason). A broken wheel raises OSError, not ImportError."""
    try:
        with quiet():
            return importer(name), None
    except (ImportError, OSError) as e:
        return None, f"{name} failed to load: {type(e).__name__}: {_first_line(e)}"
    except Exception as e:  # a library's import-time code may raise anything
        return None, f"{name} raised on import: {type(e).__name__}: {_first_line(e)}"


def load(min_capability: tuple[int, int], package: str, install: str, module: str, find_spec, importer):
    """(module, None) once the device gate passes and the library imports quietly, or (None, reason).

    `find_spec` and `importer` are the backend's own hooks (tests replace them)."""
    reason = cuda_reason(min_capability)
    if reason:
        return None, reason
    if find_spec(package) is None:
        return None, f"{package} is not installed (pip install {install})"
    return quiet_import(module, importer=importer)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def representable(n: int) -> torch.Tensor:
    """[1, n] values exact in e4m3fn (and bf16) whose amax is 448: quantized, scale 1 and codes = x."""
    return torch.linspace(-448.0, 448.0, n).to(torch.float8_e4m3fn).float().view(1, n)


def cuda_reason(min_capability: tuple[int, int]) -> str | None:
    """Why this process has no CUDA device these kernels can use, or None."""
    if getattr(torch.version, "hip", None):
        return f"ROCm build of torch ({torch.version.hip}): this backend drives CUDA kernels only"
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability()
    if cap < min_capability:
        return f"needs sm{min_capability[0]}{min_capability[1]} or newer, this GPU is sm{cap[0]}{cap[1]}"
    return None


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution, read from its metadata (the library stays unimported)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# cuBLASLt reads per-row and per-block scale vectors only from 16-byte aligned pointers: on the H200,
# torch._scaled_mm raised CUBLAS_STATUS_NOT_SUPPORTED for the row scales of rows a..b of a quantized
# activation whenever a % 4 != 0 (an fp32 scale pointer 4, 8 or 12 bytes past a 16-byte boundary).
# FBGEMM's CUTLASS GEMMs load their scales with vector loads too. Every scale we hand a library GEMM
# passes through `aligned`; Triton kernels (ours, TorchAO's) specialize on alignment and need none.
SCALE_ALIGNMENT = 16


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` when its data pointer is 16-byte aligned, else a fresh copy in the same layout (torch's
    allocators align every new tensor). A slice of a bigger scale tensor is the usual culprit."""
    return t if _is_aligned(t) else t.clone()


def _is_aligned(t: torch.Tensor) -> bool:
    if is_fake(t):  # tracing: no real pointer; storages come aligned, so the offset decides
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(t.storage_offset() * t.element_size() % SCALE_ALIGNMENT == 0)
    return t.data_ptr() % SCALE_ALIGNMENT == 0


def per_row(scale: torch.Tensor, block_rows: int, rows: int) -> torch.Tensor:
    """A [ceil(rows/block_rows), 1] scale as one value per row, [rows, 1] contiguous fp32, aligned.

    Row-recipe operands may be tensorwise or blocked over several rows; the kernels want one
    scale per row (of a) or per column (of b, through its transpose).
    """
    if scale.shape[0] != rows:
        scale = scale.expand(rows, 1) if scale.shape[0] == 1 else scale.repeat_interleave(block_rows, 0)[:rows]
    return aligned(scale.contiguous())


def pad_rows(data: torch.Tensor, scale: torch.Tensor, multiple: int):
    """Zero rows (scale 1) appended so M % multiple == 0; slice the product back with [:M].

    Kernels that read the activation scales M-major (column-major (M, K/128), or [K/128, M])
    need each K block's M floats 16-byte aligned; one copy of A buys that for odd M.
    """
    pad = -data.shape[0] % multiple
    if not pad:
        return data, scale
    return (torch.cat([data, data.new_zeros(pad, data.shape[1])]),
            torch.cat([scale, scale.new_ones(pad, scale.shape[1])]))


_scalars: dict[tuple, torch.Tensor] = {}


def device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached 1-element fp32 tensor on `device` (FBGEMM takes scale_ub as a device tensor)."""
    key = (value, device)
    t = _scalars.get(key)
    if t is None:
        t = _scalars[key] = torch.tensor([value], dtype=torch.float32, device=device)
    return t


def add_bias(out: torch.Tensor, bias) -> torch.Tensor:
    """Add a bias the kernel could not take in its epilogue (one extra elementwise pass)."""
    return out if bias is None else out.add_(bias.to(out.dtype))


# --- grouped (mixture-of-experts) helpers: device-side, no host synchronization ---------------


def masked_as_contiguous(run):
    """A grouped_linear runner for a kernel without a masked mode, from `run(xq, x, w, offsets)`
    that multiplies xq [M, K] (x's data, flattened) in the contiguous layout. A masked-layout x
    [G, max_m, K] runs as contiguous, every expert given all max_m slots; the padding rows this
    computes are then zeroed (`zero_past_masked`). Contiguous offsets on a GPU, which the host does
    not read, reach `run` made valid (`safe_offsets`)."""

    @functools.wraps(run)
    def grouped_linear(x, w, offsets, masked_m, out_dtype, bias=None):
        groups, n, k = w.data.shape
        if offsets is None:
            offsets = torch.arange(groups + 1, device=x.data.device, dtype=torch.int64) * x.data.shape[1]
        elif offsets.is_cuda:
            offsets = grouped.safe_offsets(offsets, x.data.shape[0])
        out = run(x.data.reshape(-1, k), x, w, offsets)
        return out if masked_m is None else zero_past_masked(out.view(groups, -1, n), masked_m)

    return grouped_linear


def zero_past_masked(out: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
    """out [G, max_m, N] with the rows past masked_m[g] set to zero (NaN from padding rows too)."""
    rows = torch.arange(out.shape[1], device=out.device)
    valid = rows[None, :] < masked_m[:, None]
    return torch.where(valid[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def per_expert_mn_major(scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row scales [M, KB] regrouped so expert g's block is [KB, M_g] (M-major), blocks in expert order:
    row r of expert g, K block kb lands at offsets[g] * KB + kb * M_g + (r - offsets[g])."""
    m, kb = scale.shape
    rows = torch.arange(m, device=scale.device)
    expert = torch.searchsorted(offsets[1:].contiguous(), rows, right=True)
    start = offsets[expert]
    count = offsets[expert + 1] - start
    k = torch.arange(kb, device=scale.device)
    target = start[:, None] * kb + k[None, :] * count[:, None] + (rows - start)[:, None]
    out = torch.empty(m * kb, dtype=scale.dtype, device=scale.device)
    out[target.reshape(-1)] = scale.reshape(-1)
    return out

