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
    modules = dict(model.named_modules())
    # Every check first, every change after: a bad tensor anywhere leaves the model as it was.
    layers: dict[str, Fp8Linear] = {}
    for name in _fp8_layer_names(tensors, keys):
        module = modules.get(name)
        if not isinstance(module, nn.Linear | Fp8Linear):
            if strict:
                found = type(module).__name__ if module is not None else "no module"
                raise Fp8ValueError(f"{name}{SCALE_SUFFIX}: expected {name!r} to be an nn.Linear in the model, "
                                    f"found {found}")
            continue
        layers[name] = _layer(name, module, tensors, keys, block, backend, device)
        keys -= {name + ".weight", name + SCALE_SUFFIX, name + ".bias"}
    rest = {k: tensors[k] if device is None else tensors[k].to(device) for k in sorted(keys)}
    state = model.state_dict()
    replaced = tuple(f"{name}." for name in layers)
    report = LoadReport(fp8_layers=list(layers))
    report.missing = [k for k in state if k not in rest and not k.startswith(replaced)]
    report.unexpected = [k for k in rest if k not in state]
    report.loaded = [k for k in rest if k in state]
    for k in report.loaded:
        if tuple(rest[k].shape) != tuple(state[k].shape):
            raise Fp8ValueError(f"{k}: expected shape {tuple(state[k].shape)} for the model's tensor, "
                                f"got {tuple(rest[k].shape)}")
    if strict and (report.missing or report.unexpected):
        raise Fp8ValueError(f"checkpoint: does not match the model: {report}")
    on_meta = any(t.device.type == "meta" for t in state.values())
    for name, layer in layers.items():
        _replace(model, name, layer)
    model.load_state_dict(rest, strict=False, assign=on_meta)
    return report


def _fp8_layer_names(tensors, keys) -> list[str]:
    """Layers with a scale, or with FP8 weights: each must then have both (checked in `_layer`)."""
    scaled = {k[: -len(SCALE_SUFFIX)] for k in keys if k.endswith(SCALE_SUFFIX)}
    weights = {k[: -len(".weight")] for k in keys if k.endswith(".weight") and _holds_fp8(tensors, k)}
    return sorted(scaled | weights)


def _holds_fp8(tensors, key: str) -> bool:
    if isinstance(tensors, _Lazy):
        return tensors.dtype_name(key).startswith("F8")  # read from the header, not the data
    return isinstance(tensors[key], torch.Tensor) and is_fp8(tensors[key].dtype)


def _layer(name, module, tensors, keys, block, backend, device) -> Fp8Linear:
    """One FP8 layer from its tensors, which are checked together: weight, scales and bias."""
    weight_key, scale_key = name + ".weight", name + SCALE_SUFFIX
    if scale_key not in keys:
        raise Fp8ValueError(f"{scale_key}: missing; {weight_key} is FP8 data, which needs its dequantization "
                            f"scales (the weights would load unscaled)")
    if weight_key not in keys:
        raise Fp8ValueError(f"{weight_key}: missing; the checkpoint has {scale_key} without the weight it scales")
    weight, scale = tensors[weight_key], tensors[scale_key]
    if not is_fp8(weight.dtype):
        raise Fp8TypeError(f"{weight_key}: expected FP8 data next to {scale_key}, got {weight.dtype}")
    if isinstance(scale, torch.Tensor) and scale.is_floating_point():
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise Fp8ValueError(f"{scale_key}: expected positive finite scales, got {scale[where].item()!r} at {where}")
    target = device if device is not None else _device_of(module)
    bias = _bias(tensors, keys, name, module)
    try:
        layer = Fp8Linear.from_fp8(weight.to(target), scale.to(target), None if bias is None else bias.to(target),
                                   block=block, backend=backend)
    except (Fp8ValueError, Fp8TypeError) as e:
        raise type(e)(f"{name}.{e}") from None
    if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
        raise Fp8ValueError(f"{weight_key}: expected [{module.out_features}, {module.in_features}] "
                            f"for the model's layer, got {list(weight.shape)}")
    return layer


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

        self._handles = [_reading(f, lambda f=f: safe_open(f, framework="pt")) for f in files]
        self._where = {k: (h, f) for h, f in zip(self._handles, files) for k in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        handle, file = self._where[key]
        return _reading(file, lambda: handle.get_tensor(key))

    def dtype_name(self, key: str) -> str:
        handle, file = self._where[key]
        return _reading(file, lambda: handle.get_slice(key).get_dtype())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _reading(file: str, read):
    """`read()`, with a broken file's error naming the file (safetensors' own does not)."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types, and OSError
        raise Fp8ValueError(f"checkpoint: cannot read {file}: {type(e).__name__}: {e}") from None


def _open(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            names = _reading(index, lambda: sorted(set(_weight_map(index).values())))
        else:
            names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not names:
            raise Fp8ValueError(f"checkpoint: expected .safetensors files in {path}, found none")
        return _Lazy([os.path.join(path, n) for n in names])
    if not os.path.exists(path):
        raise Fp8ValueError(f"checkpoint: no such file or directory: {path}")
    return _Lazy([path])


def _weight_map(index: str) -> dict[str, str]:
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError("weight_map: expected an object of file names")
    return weight_map
