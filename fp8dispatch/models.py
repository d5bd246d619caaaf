"""A model as tuning sees it: the (N, K) of its linear layers, and tuning for exactly those.

`shapes_of` reads them without loading a weight: from a Hugging Face `config.json` (the
projections derived from its fields), from the headers of a safetensors checkpoint or of the
shards its `model.safetensors.index.json` names (each 2-D `*.weight`; only the FP8 ones when the
checkpoint holds any, since those are the layers FP8 serves), from a directory holding any of
these, or from an `nn.Module` (its `nn.Linear` and `Fp8Linear` layers). `tune` measures those
shapes at a few M and merges the result into the user's routing table, as `fp8dispatch tune
--model PATH` does. torch is imported only once a model or device is at hand, so that command's
`--help` can quote the defaults below without it.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from fp8dispatch.errors import Fp8DispatchError, Fp8TypeError, Fp8ValueError

# The token counts tuned for a model by default: decode, a small batch, a prefill chunk, a long prefill.
MODEL_M = (1, 16, 128, 4096)
# Left out unless asked for by name: TorchAO's GEMM autotunes 48 configurations per new
# (N, K, log2 M) bucket, about a minute each (docs/tuning.md).
SLOW_TO_TUNE = ("torchao",)
# A safetensors header is JSON of a few MB even for the largest shards; more is not a checkpoint.
MAX_HEADER = 100 * 2**20
INDEX = "model.safetensors.index.json"


def shapes_of(model) -> list[tuple[int, int]]:
    """(N, K) = (out_features, in_features) of each distinct linear layer, in the model's order."""
    import torch

    if isinstance(model, torch.nn.Module):
        shapes = [(int(m.out_features), int(m.in_features)) for m in model.modules()
                  if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Fp8Linear"]
        where = f"the {type(model).__name__} module"
    elif isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        shapes, where = _shapes_of_path(path), str(path)
    else:
        raise Fp8TypeError(f"model: expected an nn.Module or a path to a config.json, a .safetensors file, "
                           f"{INDEX} or a directory of them, got {type(model).__name__}")
    if not shapes:
        raise Fp8ValueError(f"model: no linear layers found in {where}")
    return list(dict.fromkeys(shapes))


def _shapes_of_path(path: Path) -> list[tuple[int, int]]:
    if path.is_dir():
        for candidate in (path / INDEX, *sorted(path.glob("*.safetensors")), path / "config.json"):
            if candidate.is_file():
                return _shapes_of_path(path if candidate.suffix == ".safetensors" else candidate)
        raise Fp8ValueError(f"model: expected {INDEX}, .safetensors files or config.json in {path}, found none")
    if not path.is_file():
        raise Fp8ValueError(f"model: no such file or directory: {path}")
    if path.suffix == ".safetensors":
        return _from_headers([_header(path)])
    document = _json(path)
    if isinstance(document.get("weight_map"), dict):  # a sharded checkpoint's index
        files = sorted(set(map(str, document["weight_map"].values())))
        return _from_headers([_header(path.parent / f) for f in files])
    return from_config(document, str(path))


def _json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Fp8ValueError(f"model: {path} is not readable JSON: {type(e).__name__}: {e}") from None
    if not isinstance(document, dict):
        raise Fp8ValueError(f"model: {path}: expected a JSON object, got {type(document).__name__}")
    return document


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file: 8 bytes of length, then {name: {dtype, shape, ...}}."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= MAX_HEADER:
                raise Fp8ValueError(f"model: {path} is not a safetensors file (header length {size})")
            header = json.loads(f.read(size))
    except OSError as e:
        raise Fp8ValueError(f"model: cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, Fp8ValueError):
            raise
        raise Fp8ValueError(f"model: {path} is not a safetensors file: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise Fp8ValueError(f"model: {path} is not a safetensors file (header is not an object)")
    return header


def _from_headers(headers: list[dict]) -> list[tuple[int, int]]:
    """2-D `*.weight` tensors, embeddings aside (a lookup, not a matmul); only FP8 ones if any."""
    weights = [(name, t) for header in headers for name, t in sorted(header.items(), key=_offset)
               if name.endswith(".weight") and "embed" not in name and isinstance(t, dict)
               and isinstance(t.get("shape"), list) and len(t["shape"]) == 2
               and all(isinstance(d, int) and d > 0 for d in t["shape"])]
    fp8 = [(name, t) for name, t in weights if str(t.get("dtype", "")).startswith("F8")]
    return [tuple(t["shape"]) for _, t in (fp8 or weights)]


def _offset(item) -> int:
    """Where a tensor's bytes start in its file: the order the checkpoint was written in."""
    offsets = item[1].get("data_offsets") if isinstance(item[1], dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else 0


def from_config(config: dict, where: str = "config") -> list[tuple[int, int]]:
    """The linear layers of a Hugging Face decoder config: attention (MLA as in DeepSeek-V3, or
    grouped-query as in Llama), the dense MLP, routed and shared experts; (N, K) each."""
    config = config.get("text_config", config) if "hidden_size" not in config else config

    def get(field, default=None):
        value = config.get(field, default)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise Fp8ValueError(f"model: {where}: {field}: expected an int >= 0, got {value!r}")
        return value

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if not hidden or not heads:
        raise Fp8ValueError(f"model: {where}: expected a transformer config with hidden_size and "
                            f"num_attention_heads, got fields {', '.join(sorted(config)[:12]) or 'none'}")
    shapes = []
    if get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3)
        nope, rope, v = get("qk_nope_head_dim", 0), get("qk_rope_head_dim", 0), get("v_head_dim", 0)
        q_rank = get("q_lora_rank")
        shapes += [(q_rank, hidden), (heads * (nope + rope), q_rank)] if q_rank else [(heads * (nope + rope), hidden)]
        shapes += [(get("kv_lora_rank") + rope, hidden), (heads * (nope + v), get("kv_lora_rank")),
                   (hidden, heads * v)]
    else:
        head_dim = get("head_dim") or hidden // heads
        kv_heads = get("num_key_value_heads") or heads
        shapes += [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim)]
    experts = get("n_routed_experts") or get("num_local_experts") or get("num_experts")
    expert_width = get("moe_intermediate_size") or get("intermediate_size")
    dense = get("intermediate_size")
    if dense and (not experts or get("first_k_dense_replace", 0) or get("mlp_only_layers")):
        shapes += [(dense, hidden), (hidden, dense)]
    if experts and expert_width:
        shapes += [(expert_width, hidden), (hidden, expert_width)]
    shared = get("shared_expert_intermediate_size") or (get("n_shared_experts", 0) or 0) * (expert_width or 0)
    if shared:
        shapes += [(shared, hidden), (hidden, shared)]
    return shapes


def default_backends(device) -> list[str]:
    """Every available backend but those too slow to tune by default (`SLOW_TO_TUNE`) and, on a
    GPU, the reference (fp32 math on dequantized copies: never the fastest, slow at large M)."""
    import torch

    from fp8dispatch import bench

    skip = SLOW_TO_TUNE + (("reference",) if torch.device(device).type == "cuda" else ())
    return [name for name in bench.available_backends() if name not in skip]


def tune(model, m=MODEL_M, *, backends=None, ops=("matmul", "quantize"), recipes=None, granularities=None,
         runs: int = 50, warmup: int = 5, device=None, table=None) -> dict:
    """Measure the backends on `model`'s linear shapes at each M, merge the result into the routing
    table (`table`, else the user's: $FP8DISPATCH_TUNING or ~/.cache/fp8dispatch/routing.json) and
    return what was measured (a table: environment and entries). `auto` uses it at once."""
    import torch

    from fp8dispatch import bench, registry, tuning
    from fp8dispatch.blocks import GRANULARITIES, RECIPES
    from fp8dispatch.cli.bench import Progress

    shapes = shapes_of(model)
    ms = [int(v) for v in m]
    if not ms or min(ms) <= 0:
        raise Fp8ValueError(f"m: expected positive token counts, got {m!r}")
    dev = bench.require_device(device)
    names = bench.available_backends(backends) if backends else default_backends(dev)
    path = Path(table).expanduser() if table else tuning.user_path()
    if path is None:
        raise Fp8DispatchError(f"{tuning.ENV_VAR}=off disables routing tables: pass table=PATH to write one")
    grid = bench.points([bench.Shape(mm, n, k) for n, k in shapes for mm in ms], list(ops),
                        list(recipes or RECIPES), list(granularities or GRANULARITIES))
    print(f"tuning {len(shapes)} (N, K) of {type(model).__name__ if isinstance(model, torch.nn.Module) else model} "
          f"at M {','.join(map(str, ms))}: {len(grid)} points with {', '.join(names)}", file=sys.stderr)
    rows = bench.run(grid, names, bench.Settings(dev, warmup, runs, auto=False, baselines=False), progress=Progress())
    measured = tuning.build_table(rows, tuning.environment(dev), f"fp8dispatch.models.tune({model!r:.80})")
    if not measured["entries"]:
        raise Fp8DispatchError("tune: nothing was measured successfully, no table written")
    bench.save_table(path, measured)
    registry.refresh()
    return measured
