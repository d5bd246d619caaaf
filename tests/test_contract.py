"""The FP8 contract on the reference backend: blocks, scales, saturation, overflow, Fp8Tensor."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fp8dispatch
from fp8dispatch import Fp8Tensor, NumericalOverflowError
from fp8dispatch.formats import FORMATS

E4M3 = torch.float8_e4m3fn
REF = dict(backend="reference")


def q(x, granularity="row", **kw):
    return fp8dispatch.quantize(x, granularity, **REF, **kw)


def true_quotient(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 a / b correctly rounded: computed in float64, which is exact enough to round once."""
    return (a.double() / b.double()).float()


@pytest.mark.parametrize(
    "granularity, block_size, shape, scale_shape, block",
    [
        ("tensor", 128, (300, 200), (1, 1), (300, 200)),
        ("row", 128, (300, 200), (300, 1), (1, 200)),
        ("group", 128, (300, 200), (300, 2), (1, 128)),
        ("block", 128, (300, 200), (3, 2), (128, 128)),
        ("group", 64, (5, 200), (5, 4), (1, 64)),
        ("block", (32, 64), (70, 130), (3, 3), (32, 64)),
        ("row", 128, (2, 3, 50), (6, 1), (1, 50)),
        ("group", 128, (2, 3, 129), (6, 2), (1, 128)),
    ],
)
def test_scale_shapes_and_tails(granularity, block_size, shape, scale_shape, block):
    x = torch.randn(shape)
    t = q(x, granularity, block_size=block_size)
    assert t.shape == x.shape and t.dtype == E4M3
    assert tuple(t.scale.shape) == scale_shape and t.block == block
    assert t.scale.dtype == torch.float32


def test_scale_is_amax_over_fp8_max_by_true_division():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    t = q(x, "group")
    amax = x.abs().view(64, 2, 128).amax(-1)
    assert torch.equal(t.scale, true_quotient(amax, torch.full_like(amax, 448.0)))


def test_values_are_the_rounded_true_quotient():
    x = torch.randn(32, 256)
    t = q(x, "row")
    expected = true_quotient(x, t.scale.expand_as(x)).clamp(-448, 448).to(E4M3)
    assert torch.equal(t.bits(), expected.view(torch.uint8))


def test_zero_block_gets_scale_one_and_zero_data():
    x = torch.randn(4, 256)
    x[1] = 0
    x[2, 128:] = 0
    t = q(x, "group")
    assert t.scale[1].tolist() == [1.0, 1.0] and t.scale[2, 1].item() == 1.0
    assert (t.data[1].float() == 0).all() and (t.data[2, 128:].float() == 0).all()


def test_max_values_map_to_fp8_max():
    x = torch.tensor([[448.0, -448.0, 1.0, 0.0]])
    t = q(x, "row")
    assert t.scale.item() == 1.0
    assert t.data.float().tolist() == [[448.0, -448.0, 1.0, 0.0]]


def test_user_scale_saturates_instead_of_overflowing():
    x = torch.tensor([[1000.0, -1000.0, 10.0]])
    t = q(x, "row", scale=torch.ones(1, 1))
    assert t.data.float().tolist() == [[448.0, -448.0, 10.0]]


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_every_format_saturates_at_its_max(dtype):
    fmax = FORMATS[dtype].max_value
    x = torch.tensor([[fmax * 4, -fmax * 4, 1.0]])
    t = q(x, "row", dtype=dtype, scale=torch.ones(1, 1))
    assert t.data.float()[0, :2].tolist() == [fmax, -fmax]


def test_overflow_error_names_the_value_and_scale():
    x = torch.tensor([[1000.0, 1.0]])
    with pytest.raises(NumericalOverflowError, match=r"1000"):
        q(x, "row", scale=torch.ones(1, 1), overflow="error")
    assert q(x, "row", scale=torch.full((1, 1), 4.0), overflow="error").scale.item() == 4.0


def test_overflow_rescale_doubles_the_scale_at_most_three_times():
    x = torch.tensor([[1000.0, 1.0]])
    t = q(x, "row", scale=torch.ones(1, 1), overflow="rescale")
    assert t.scale.item() == 4.0  # 1000 / 2 > 448, 1000 / 4 <= 448
    assert t.data.float()[0, 0].item() == 256.0  # 250 rounds to the nearest e4m3 value
    with pytest.raises(NumericalOverflowError, match="3 times"):
        q(torch.tensor([[448.0 * 9, 1.0]]), "row", scale=torch.ones(1, 1), overflow="rescale")


def test_scale_ub_caps_amax():
    x = torch.tensor([[100.0, 2.0, -0.5]])
    t = q(x, "row", scale_ub=4.0)
    assert t.scale.item() == true_quotient(torch.tensor(4.0), torch.tensor(448.0)).item()
    assert t.data.float()[0, 0].item() == 448.0  # capped values saturate


def test_pow2_scales_are_the_next_power_of_two():
    x = torch.randn(16, 512) * torch.logspace(-4, 4, 16)[:, None]
    plain, pow2 = q(x, "group"), q(x, "group", pow2_scale=True)
    mantissa, exponent = torch.frexp(pow2.scale)
    assert (mantissa == 0.5).all()
    assert (pow2.scale >= plain.scale).all() and (pow2.scale < 2 * plain.scale).all()
    exact = torch.tensor([[0.25 * 448, 1.0]])  # amax/448 = 0.25 exactly: already a power of two
    assert q(exact, "row", pow2_scale=True).scale.item() == 0.25


def test_non_finite_values_poison_nothing_but_themselves():
    x = torch.randn(2, 256)
    y = x.clone()
    y[0, 3], y[0, 7], y[0, 200] = float("nan"), float("inf"), float("-inf")
    clean = x.clone()
    clean[0, 3] = clean[0, 7] = clean[0, 200] = 0
    t, ref = q(y, "group"), q(clean, "group")
    assert torch.equal(t.scale, ref.scale)
    data = t.data.float()
    assert math.isnan(data[0, 3]) and data[0, 7] == 448 and data[0, 200] == -448
    keep = torch.ones_like(data, dtype=torch.bool)
    keep[0, [3, 7, 200]] = False
    assert torch.equal(t.bits()[keep], ref.bits()[keep])


class _SubTensor(Fp8Tensor):
    """A user's subclass: `_trusted` must still build one, frozen, whatever its memory layout."""


@pytest.mark.parametrize("cls", [Fp8Tensor, _SubTensor])
def test_the_unchecked_constructor_builds_a_frozen_instance_of_its_class(cls):
    import dataclasses

    data, scale = torch.zeros(2, 4, dtype=E4M3), torch.ones(2, 1)
    t = cls._trusted(data, scale, (1, 4))
    assert type(t) is cls and t.data is data and t.scale is scale and t.block == (1, 4)
    assert t.t().block == (4, 1) and tuple(t) == (data, scale, (1, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.block = (1, 2)


def test_fp8_tensor_unpacks_transposes_and_round_trips_bits():
    w = torch.randn(256, 384)
    t = q(w, "block")
    data, scale, block = t
    assert data is t.data and scale is t.scale and block == (128, 128)
    tt = q(torch.randn(256, 384), "row").t()
    assert tt.shape == (384, 256) and tt.scale.shape == (1, 256) and tt.block == (384, 1)
    back = Fp8Tensor.from_bits(t.bits(), t.scale, t.block, t.dtype)
    assert torch.equal(back.bits(), t.bits()) and back.dtype == E4M3
    assert torch.equal(t.t().dequantize(torch.float32), t.dequantize(torch.float32).t())


def test_dequantize_is_data_times_scale_in_fp32():
    x = torch.randn(3, 300)
    t = q(x, "group")
    full = t.scale.repeat_interleave(128, 1)[:, :300]
    expected = (t.data.float() * full).to(torch.bfloat16)
    assert torch.equal(fp8dispatch.dequantize(t, **REF), expected)
    assert torch.equal(fp8dispatch.dequantize(t, torch.float32, **REF), t.data.float() * full)


def test_format_helpers():
    fmt = fp8dispatch.fp8_format(E4M3)
    assert (fmt.max_value, fmt.min_normal, fmt.min_subnormal) == (448.0, 2**-6, 2**-9)
    assert fp8dispatch.max_value(torch.float8_e5m2) == 57344.0
    x = torch.tensor([[1.0, -896.0], [3.0, 0.0]])
    assert fmt.compute_scale(x).item() == 2.0
    assert fmt.compute_scale_per_channel(x, 0).flatten().tolist() == [2.0, true_quotient(torch.tensor(3.0), torch.tensor(448.0)).item()]
    assert fmt.is_in_range(x, 2.0) and not fmt.is_in_range(x, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 300),
    granularity=st.sampled_from(["tensor", "row", "group", "block"]),
    block_size=st.sampled_from([16, 32, 128]), log_range=st.integers(0, 8),
)
def test_round_trip_error_is_within_half_an_fp8_step(rows, cols, granularity, block_size, log_range):
    x = torch.randn(rows, cols) * torch.logspace(-log_range, log_range, cols)
    t = q(x, granularity, block_size=block_size)
    back = t.dequantize(torch.float32)
    # e4m3 keeps 3 mantissa bits: rounding moves a value by at most 2^-4 of itself, or half the
    # smallest subnormal (2^-10) times the scale in the subnormal range.
    scale = t.scale.repeat_interleave(t.block[0], 0)[:rows].repeat_interleave(t.block[1], 1)[:, :cols]
    bound = x.abs() * 2**-4 + scale * 2**-10
    assert ((x - back).abs() <= bound * (1 + 2**-20)).all()
