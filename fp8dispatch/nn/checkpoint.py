"""Load DeepSeek-V3-style FP8 checkpoints: `weight` float8_e4m3fn [N, K] plus `weight_scale_inv`.

DeepSeek-V3/R1 and the Hugging Face "fine-grained FP8" format store each quantized linear layer as
`<layer>.weight` (FP8 data) and `<layer>.weight_scale_inv` ([ceil(N/128), ceil(K/128)] fp32
dequantization scales, despite the name: `W ≈ weight * weight_scale_inv` per 128×128 block).
Everything else (norms, embeddings, unquantized layers) is ordinary high-precision tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from fp8dispatch.errors import Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import is_fp8
from fp8dispatch.nn.linear import Fp8Linear

SCALE_SUFFIX = ".weight_scale_inv"


@dataclass
class LoadReport:
    fp8_layers: list[str] = field(default_factory=list)  # nn.Linear swapped for Fp8Linear
    loaded: list[str] = field(default_factory=list)  # other tensors copied into the model
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model lacks

    def __str__(self) -> str:
        lines = [f"{len(self.fp8_layers)} FP8 linear layers, {len(self.loaded)} other tensors loaded"]
        lines += [f"  missing: {', '.join(self.missing)}"] if self.missing else []
        lines += [f"  unexpected: {', '.join(self.unexpected)}"] if self.unexpected else []
        return "\n".join(lines)


def load_fp8_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], *,
                        block_size: tuple[int, int] = (128, 128), backend: str = "auto", device=None,
                        strict: bool = True) -> LoadReport:
    """Load `checkpoint` into `model`, turning each linear with FP8 weights into an `Fp8Linear`.

    `checkpoint` is a `.safetensors` file, a directory of them (sharded Hugging Face layout), or a
    state dict. `model` may live on the meta device: FP8 layers are built from the checkpoint's
    tensors, the rest are assigned. `block_size` is the checkpoint's `weight_block_size`
    (DeepSeek-V3: 128×128); a scale of another shape raises, naming the tensor. With `strict`, a
    model tensor the checkpoint lacks, or a checkpoint tensor the model lacks, raises.
    """
    tensors = _open(checkpoint)
    keys = set(tensors)
    block = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    report = LoadReport()
    modules = dict(model.named_modules())
    for scale_key in sorted(k for k in keys if k.endswith(SCALE_SUFFIX)):
        name = scale_key[: -len(SCALE_SUFFIX)]
        module = modules.get(name)
        if not isinstance(module, nn.Linear | Fp8Linear):
            if strict:
                found = type(module).__name__ if module is not None else "no module"
                raise Fp8ValueError(f"{scale_key}: expected {name!r} to be an nn.Linear in the model, found {found}")
            continue
        weight = tensors[name + ".weight"]
        if not is_fp8(weight.dtype):
            raise Fp8TypeError(f"{name}.weight: expected FP8 data next to {scale_key}, got {weight.dtype}")
        target = device if device is not None else _device_of(module)
        bias = _bias(tensors, keys, name, module)
        try:
            layer = Fp8Linear.from_fp8(weight.to(target), tensors[scale_key].to(target),
                                       None if bias is None else bias.to(target), block=block, backend=backend)
        except (Fp8ValueError, Fp8TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
        if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
            raise Fp8ValueError(f"{name}.weight: expected [{module.out_features}, {module.in_features}] "
                                f"for the model's layer, got {list(weight.shape)}")
        _replace(model, name, layer)
        keys -= {name + ".weight", scale_key, name + ".bias"}
        report.fp8_layers.append(name)
    rest = {k: tensors[k] if device is None else tensors[k].to(device) for k in sorted(keys)}
    on_meta = any(t.device.type == "meta" for t in model.state_dict().values())
    result = model.load_state_dict(rest, strict=False, assign=on_meta)
    built = {f"{n}.{part}" for n in report.fp8_layers for part in ("weight", "weight_scale_inv", "bias")}
    report.loaded = [k for k in rest if k not in result.unexpected_keys]
    report.missing = [k for k in result.missing_keys if k not in built]
    report.unexpected = list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise Fp8ValueError(f"checkpoint: does not match the model: {report}")
    return report


def _bias(tensors, keys, name, module):
    if name + ".bias" in keys:
        return tensors[name + ".bias"]
    bias = getattr(module, "bias", None)
    if bias is not None and bias.device.type != "meta":
        return bias.detach()
    if bias is not None:
        raise Fp8ValueError(f"{name}.bias: the model's layer has a bias, the checkpoint has none")
    return None


def _device_of(module: nn.Module):
    w = getattr(module, "weight", None)
    return "cpu" if w is None or w.device.type == "meta" else w.device


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


class _Lazy(Mapping):
    """Tensors of one or more safetensors files, read one at a time (checkpoints outgrow RAM)."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._handles = [safe_open(f, framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        else:
            names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not names:
            raise Fp8ValueError(f"checkpoint: expected .safetensors files in {path}, found none")
        return _Lazy([os.path.join(path, n) for n in names])
    if not os.path.exists(path):
        raise Fp8ValueError(f"checkpoint: no such file or directory: {path}")
    return _Lazy([path])
