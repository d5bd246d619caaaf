"""`fp8dispatch info`: versions, the device, each backend's probe result, and the routing table.

torch and the library are imported in `run`, so `--help` answers at once.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

from fp8dispatch import cli

if TYPE_CHECKING:
    import torch

# One representative problem per op × recipe: the routing table shows who serves each.
_M, _N, _K = 4096, 7168, 2048


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="device to route for (default: cuda if present, else cpu)")


def routing_problems(device: torch.device) -> list[tuple[str, object]]:
    import torch

    from fp8dispatch.problem import DequantizeProblem, MatmulProblem, QuantizeProblem, device_capability

    cap = device_capability(device)
    problems = []
    for granularity, block in (("tensor", (_M, _K)), ("row", (1, _K)), ("group", (1, 128)), ("block", (128, 128))):
        problems.append((f"quantize {granularity}", QuantizeProblem(
            device, cap, torch.bfloat16, (_M, _K), True, block, torch.float8_e4m3fn, False, False, False)))
    for granularity, block in (("tensor", (_M, _K)), ("row", (1, _K)), ("group", (1, 128)), ("block", (128, 128))):
        problems.append((f"dequantize {granularity}", DequantizeProblem(
            device, cap, torch.float8_e4m3fn, (_M, _K), True, block, torch.bfloat16)))
    for recipe, a_block, b_block in (("block", (1, 128), (128, 128)), ("row", (1, _K), (_K, 1)),
                                     ("tensor", (_M, _K), (_K, _N))):
        problems.append((f"matmul {recipe}", MatmulProblem(
            device, cap, recipe, torch.float8_e4m3fn, torch.float8_e4m3fn, _M, _N, _K, a_block, b_block,
            True, True, torch.bfloat16, None)))
    return problems


def run(args) -> int:
    import torch

    from fp8dispatch import registry
    from fp8dispatch.problem import device_capability

    device = cli.device(args.device)
    print(f"fp8dispatch {_version()}   python {platform.python_version()}   torch {torch.__version__}")
    print(f"triton      {_module_version('triton')}")
    print(f"cuda        {torch.version.cuda or '-'}   rocm {getattr(torch.version, 'hip', None) or '-'}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cap = device_capability(device)
        print(f"device      {device}: {props.name}, sm{cap[0]}{cap[1]}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
    else:
        print(f"device      {device} (no GPU)" if not torch.cuda.is_available() else f"device      {device}")
    print("\nbackends")
    for backend in registry.all_backends():
        reason = registry.probe_result(backend.name)
        state = "available" if reason is None else f"unavailable: {reason}"
        version = _safe(backend.version) or "-"
        print(f"  {backend.name:<10} {version:<24} {state}")
    from fp8dispatch import tuning

    print("\nmeasured routing tables (fp8dispatch tune)")
    for line in tuning.status(device):
        print(f"  {line}")
    print(f"\nrouting on {device} (M={_M}, N={_N}, K={_K}, bf16 in/out)")
    for label, problem in routing_problems(device):
        try:
            chosen = registry.choose(problem).name
        except registry.NoBackend:
            chosen = "(none)"
        print(f"  {label:<20} -> {chosen}")
    env = registry.settings()
    overrides = {f"FP8DISPATCH_{op.upper()}_BACKEND": v for op, v in env.per_op.items() if v}
    if env.preference:
        overrides["FP8DISPATCH_BACKEND"] = env.preference
    if env.disabled:
        overrides["FP8DISPATCH_DISABLE"] = tuple(sorted(env.disabled))
    if overrides:
        print("\nenvironment")
        for name, value in overrides.items():
            print(f"  {name}={','.join(value)}")
    return 0


def _version() -> str:
    from fp8dispatch import __version__

    return __version__


def _module_version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception as e:  # noqa: BLE001 - info reports, it does not fail
        return f"not available ({type(e).__name__})"


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None
