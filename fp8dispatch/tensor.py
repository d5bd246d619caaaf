"""`Fp8Tensor`: FP8 data, its dequantization scales, and the block they apply to."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from fp8dispatch.blocks import Block, expand_scale, scale_shape
from fp8dispatch.errors import Fp8IndexError, Fp8TypeError, Fp8ValueError
from fp8dispatch.formats import fp8_format, is_fp8


class DataView:
    """`shape`, `dtype` and `device`: those of the FP8 `data` a subclass holds."""

    __slots__ = ()

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _check_parts(self) -> None:
        """What every FP8 tensor asks of its parts: FP8 data, fp32 scales beside it, a block of two positive ints."""
        data, scale, block = self.data, self.scale, self.block
        if not isinstance(data, torch.Tensor) or not is_fp8(data.dtype):
            seen = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
            raise Fp8TypeError(f"data: expected a tensor of an FP8 dtype, got {seen}")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            seen = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise Fp8TypeError(f"scale: expected a float32 tensor, got {seen}")
        if scale.device != data.device:
            raise Fp8ValueError(f"scale: expected device {data.device} (the data's), got {scale.device}")
        if (not isinstance(block, tuple) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise Fp8ValueError(f"block: expected a pair of positive ints, got {block!r}")


@dataclass(frozen=True, slots=True, eq=False)
class Fp8Tensor(DataView):
    """`x ≈ data.float() * scale`, the scale broadcast by `block` over the 2-D view of data.

    Data of more than two dimensions is viewed as [prod(leading dims), last dim] for blocks and
    scales; `scale` is always 2-D fp32 of shape ceil(rows/block[0]) × ceil(cols/block[1]).
    Unpacks like a tuple: `data, scale, block = t`.
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: Block
    # An Fp8Tensor never changes, so its transpose and its dispatch key are computed once:
    # torch's view ops cost microseconds each, more than the whole dispatch budget.
    _transposed: Fp8Tensor | None = field(default=None, init=False, repr=False)
    _key: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._check_parts()
        data, scale, block = self.data, self.scale, self.block
        if data.dim() < 1:
            raise Fp8ValueError(f"data: expected at least 1 dimension, got a {data.dim()}-d tensor")
        expected = scale_shape(self.shape2d, block)
        if tuple(scale.shape) != expected:
            raise Fp8ValueError(
                f"scale: expected shape {expected} for data {tuple(data.shape)} in blocks {block}, "
                f"got {tuple(scale.shape)}"
            )

    @classmethod
    def _trusted(cls, data: torch.Tensor, scale: torch.Tensor, block: Block) -> Fp8Tensor:
        """Build without checks, for results the library itself just produced (the hot path)."""
        t = object.__new__(cls)
        _set_data(t, data)
        _set_scale(t, scale)
        _set_block(t, block)
        _set_transposed(t, None)
        _set_key(t, None)
        return t

    def dispatch_key(self) -> tuple:
        """The static properties a routing decision depends on (see fp8dispatch.api)."""
        key = self._key
        if key is None:
            data = self.data
            key = (data.dtype, data.shape, data.device, data.stride(), self.scale.stride(), self.block)
            _set_key(self, key)
        return key

    def __iter__(self):
        return iter((self.data, self.scale, self.block))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index):
        """`t[0]`, `t[1]`, `t[2]`, `t[-1]`, `t[:2]`, as on the tuple `(data, scale, block)`: the
        libraries users migrate from return tuples they index (`act_quant(x)[0]`)."""
        if not isinstance(index, slice):
            try:
                index = operator.index(index)
            except TypeError:
                raise Fp8TypeError(f"index: expected an int or a slice, got {type(index).__name__}") from None
            if not -3 <= index < 3:
                raise Fp8IndexError(f"index: expected -3 to 2 for (data, scale, block), got {index}")
        return (self.data, self.scale, self.block)[index]

    @property
    def shape2d(self) -> tuple[int, int]:
        """The [rows, cols] view that blocks and scales are defined on."""
        shape = self.data.shape
        cols = shape[-1]
        return (self.data.numel() // cols if cols else _prod(shape[:-1]), cols)

    def t(self) -> Fp8Tensor:
        """Transpose data, scale and block together: a row-quantized [N, K] weight becomes [K, N]."""
        transposed = self._transposed
        if transposed is None:
            if self.data.dim() != 2:
                raise Fp8ValueError(f"t(): expected 2-d data, got shape {tuple(self.data.shape)}")
            if torch.compiler.is_compiling():  # dynamo cannot trace the slot setters; it can __init__
                return Fp8Tensor(self.data.t(), self.scale.t(), (self.block[1], self.block[0]))
            transposed = Fp8Tensor._trusted(self.data.t(), self.scale.t(), (self.block[1], self.block[0]))
            _set_transposed(transposed, self)
            _set_transposed(self, transposed)
        return transposed

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """`data * scale` in fp32, then cast to `dtype` (the reference rule, in plain torch)."""
        full = expand_scale(self.scale, self.block, self.shape2d)
        return (self.data.reshape(self.shape2d).float() * full).to(dtype).reshape(self.data.shape)

    def bits(self) -> torch.Tensor:
        """The data as uint8, for storage or formats that lack float8; `from_bits` undoes it."""
        return self.data.view(torch.uint8)

    @classmethod
    def from_bits(cls, bits: torch.Tensor, scale: torch.Tensor, block: Block, dtype: torch.dtype) -> Fp8Tensor:
        if bits.dtype != torch.uint8:
            raise Fp8TypeError(f"bits: expected a uint8 tensor, got {bits.dtype}")
        fp8_format(dtype)
        return cls(bits.view(dtype), scale, block)

    def __repr__(self) -> str:
        return (
            f"Fp8Tensor(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, block={self.block}, "
            f"scale={tuple(self.scale.shape)}, device={self.data.device})"
        )


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


# Slot setters that bypass the frozen dataclass's __setattr__ (which refuses, by design).
_set_data = Fp8Tensor.__dict__["data"].__set__
_set_scale = Fp8Tensor.__dict__["scale"].__set__
_set_block = Fp8Tensor.__dict__["block"].__set__
_set_transposed = Fp8Tensor.__dict__["_transposed"].__set__
_set_key = Fp8Tensor.__dict__["_key"].__set__
