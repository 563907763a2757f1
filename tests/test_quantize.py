"""refquant.quantize against torch.quantize_per_tensor / quantize_per_channel / dequantize, run live."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refquant.quantize as Q
from refquant._dispatch import SMALL_CALLS, SmallCalls
from parity import assert_same
from refquant._float32 import cvtps2dq, fmaf
from refquant.quantize import (
    _quantize_fma_kernel,
    _quantize_fma_readable,
    dequantize,
    dequantize_per_channel,
    quantize_per_channel,
    quantize_per_tensor,
)

TORCH_DTYPE = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}
ZP_RANGE = {"quint8": (0, 255), "qint8": (-128, 127), "qint32": (-(2**31), 2**31 - 1)}
DTYPES = list(TORCH_DTYPE)
KINDS = ["normal", "uniform", "ties", "integers", "constant", "one", "negative", "positive", "tiny", "huge",
         "specials", "out_of_range"]
CASES_PER_KIND = 25


def float_samples(rng: np.random.Generator, kind: str, shape, scale: float) -> np.ndarray:
    """float32 test data of one kind, sized relative to ``scale`` so the codes land in and around the range."""
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n) * scale * rng.uniform(1, 200)
    elif kind == "uniform":
        x = rng.uniform(-300, 300, n) * scale
    elif kind == "ties":  # x / scale lands on (or one float32 step from) k + 0.5
        x = (rng.integers(-300, 300, n) + 0.5) * scale
        x = np.nextafter(x.astype(np.float32), rng.choice([-np.inf, 0, np.inf], n).astype(np.float32))
    elif kind == "integers":
        x = rng.integers(-300, 300, n).astype(np.float64) * rng.choice([1.0, scale, 0.5])
    elif kind == "constant":
        x = np.full(n, rng.standard_normal() * scale * 50)
    elif kind == "one":
        x = rng.standard_normal(1) * scale * 100
    elif kind == "negative":
        x = -np.abs(rng.standard_normal(n)) * scale * 100
    elif kind == "positive":
        x = np.abs(rng.standard_normal(n)) * scale * 100
    elif kind == "tiny":
        x = rng.standard_normal(n) * 1e-30
    elif kind == "huge":
        x = rng.standard_normal(n) * 1e30
    elif kind == "specials":
        x = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-45]), n)
    else:  # out_of_range: far beyond quant_max * scale in both directions
        x = rng.choice([-1.0, 1.0], n) * rng.uniform(1e3, 1e9, n) * scale
    if kind == "one":
        shape = (1,)
    return x.astype(np.float32).reshape(shape)


def random_layout(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """The same values seen through a transposed or strided view half the time (torch.from_numpy keeps it)."""
    choice = rng.integers(0, 3)
    if choice == 1 and x.ndim >= 2:
        return x.T
    if choice == 2:
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), np.float32)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def random_shape(rng: np.random.Generator):
    return tuple(int(v) for v in rng.integers(1, 40, rng.integers(1, 4)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_tensor_matches_torch(rng, dtype, kind):
    lo, hi = ZP_RANGE[dtype]
    for _ in range(CASES_PER_KIND):
        scale = float(10.0 ** rng.uniform(-6, 3))
        zero_point = int(rng.integers(max(lo, -1000), min(hi, 1000) + 1))
        x = random_layout(rng, float_samples(rng, kind, random_shape(rng), scale))
        expected = torch.quantize_per_tensor(torch.from_numpy(x), scale, zero_point, TORCH_DTYPE[dtype])
        q = quantize_per_tensor(x, scale, zero_point, dtype)
        assert_same(q, expected.int_repr().numpy(), f"quantize_per_tensor {dtype} {kind} s={scale!r} zp={zero_point}")
        assert_same(dequantize(q, scale, zero_point), expected.dequantize().numpy(), f"dequantize {dtype} {kind}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_tensor_every_length(rng, dtype):
    """Lengths 1..70 cover fbgemm's vector body and its scalar tail, which must round the same way."""
    for n in range(1, 71):
        scale = float(np.float32(10.0 ** rng.uniform(-3, 0)))
        x = float_samples(rng, "ties", (n,), scale)
        expected = torch.quantize_per_tensor(torch.from_numpy(x), scale, 7, TORCH_DTYPE[dtype]).int_repr().numpy()
        assert_same(quantize_per_tensor(x, scale, 7, dtype), expected, f"length {n}")


def test_quantize_per_tensor_extreme_zero_points(rng):
    for dtype in DTYPES:
        lo, hi = ZP_RANGE[dtype]
        for zp in (lo, hi):
            x = float_samples(rng, "normal", (500,), 0.01)
            expected = torch.quantize_per_tensor(torch.from_numpy(x), 0.01, zp, TORCH_DTYPE[dtype])
            q = quantize_per_tensor(x, 0.01, zp, dtype)
            assert_same(q, expected.int_repr().numpy(), f"{dtype} zp={zp}")
            assert_same(dequantize(q, 0.01, zp), expected.dequantize().numpy(), f"dequantize {dtype} zp={zp}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_channel_matches_torch(rng, dtype, kind):
    lo, hi = ZP_RANGE[dtype]
    for i in range(CASES_PER_KIND):
        shape = (1,) if kind == "one" else random_shape(rng)
        x = random_layout(rng, float_samples(rng, kind, shape, float(10.0 ** rng.uniform(-5, 2))).reshape(shape))
        axis = int(rng.integers(0, x.ndim))
        channels = x.shape[axis]
        scales = 10.0 ** rng.uniform(-5, 2, channels)
        scales = scales.astype(np.float32) if i % 2 else scales  # float32 (observer output) or float64 scales
        zero_points = rng.integers(max(lo, -1000), min(hi, 1000) + 1, channels)
        expected = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scales),
                                              torch.from_numpy(zero_points), axis, TORCH_DTYPE[dtype])
        q = quantize_per_channel(x, scales, zero_points, axis, dtype)
        assert_same(q, expected.int_repr().numpy(), f"quantize_per_channel {dtype} {kind} axis={axis}")
        assert_same(dequantize_per_channel(q, scales, zero_points, axis), expected.dequantize().numpy(),
                    f"dequantize_per_channel {dtype} {kind}")


def test_dequantize_every_code_matches_torch(rng):
    """All 256 codes of each 8-bit dtype, and int32 codes near the wrap, against torch's dequantize."""
    cases = [("quint8", np.arange(256, dtype=np.uint8)), ("qint8", np.arange(-128, 128).astype(np.int8)),
             ("qint32", np.array([-(2**31), -(2**31) + 1, -1, 0, 1, 2**24 + 1, 2**31 - 2, 2**31 - 1], np.int32))]
    for dtype, codes in cases:
        lo, hi = ZP_RANGE[dtype]
        for _ in range(20):
            scale = float(10.0 ** rng.uniform(-8, 4))
            zp = int(rng.integers(lo, hi, endpoint=True))
            t = torch._make_per_tensor_quantized_tensor(torch.from_numpy(codes.copy()), scale, zp)
            assert_same(dequantize(codes, scale, zp), t.dequantize().numpy(), f"dequantize {dtype} zp={zp}")
            channels = torch.from_numpy(codes.reshape(1, -1).repeat(3, 0))
            scales = (10.0 ** rng.uniform(-8, 4, 3))
            zps = rng.integers(lo, hi, 3, endpoint=True)
            tc = torch._make_per_channel_quantized_tensor(channels, torch.from_numpy(scales),
                                                          torch.from_numpy(zps), 0)
            assert_same(dequantize_per_channel(channels.numpy(), scales, zps, 0), tc.dequantize().numpy(),
                        f"dequantize_per_channel {dtype}")


# ----------------------------------------------------------------------------------------------------------
# golden values, derived by hand


def test_golden_zero_point_added_before_rounding():
    """scale = f32(1/3), so inv = f32(1/f32(1/3)) = 3.0 exactly; x = f32(1/6) = 0.1666666716...

    x * inv = 0.50000001490116... (exact). Textbook and later FBGEMM: rint(f32(x*inv)) = rint(0.5) = 0, plus
    zero_point 1 -> 1. torch 2.13 adds the zero point inside the FMA: f32(1.50000001490116) = 1.5 -> RNE -> 2.
    """
    x = np.float32(1 / 6)
    assert quantize_per_tensor(x, 1 / 3, 1, "quint8") == 2
    assert quantize_per_tensor(x, 1 / 3, 1, "quint8", rounding="nearbyint_then_add") == 1
    assert torch.quantize_per_tensor(torch.tensor(x), 1 / 3, 1, torch.quint8).int_repr().item() == 2


def test_golden_ties_round_half_to_even():
    x = np.float32([0.25, 0.75, 1.25, -0.25, -0.75, 1.75])  # scale 0.5, zp 3: x/s + 3 = 3.5, 4.5, 5.5, 2.5, 1.5, 6.5
    assert quantize_per_tensor(x, 0.5, 3, "quint8").tolist() == [4, 4, 6, 2, 2, 6]
    assert quantize_per_tensor(x, 0.5, 3, "qint8").tolist() == [4, 4, 6, 2, 2, 6]
    assert quantize_per_tensor(x, 0.5, 3, "qint32").tolist() == [4, 4, 6, 2, 2, 6]


def test_golden_specials_and_clamping():
    x = np.float32([np.nan, np.inf, -np.inf, 1e30, -1e30, 127.0, 128.0, -129.0])
    assert quantize_per_tensor(x, 1.0, 0, "quint8").tolist() == [255, 255, 0, 255, 0, 127, 128, 0]
    assert quantize_per_tensor(x, 1.0, 0, "qint8").tolist() == [127, 127, -128, 127, -128, 127, 127, -128]
    assert quantize_per_tensor(x, 1.0, 0, "qint32").tolist() == [-(2**31), 2**31 - 1, -(2**31), 2**31 - 1,
                                                                 -(2**31), 127, 128, -129]
    # per channel, every dtype goes through the scalar path: NaN -> 0 for 8-bit codes
    col = x.reshape(-1, 1)
    assert quantize_per_channel(col, np.ones(1), np.zeros(1, np.int64), 1, "qint8").ravel().tolist() == \
        [0, 127, -128, 127, -128, 127, 127, -128]
    assert quantize_per_channel(col, np.ones(1), np.zeros(1, np.int64), 1, "quint8").ravel().tolist() == \
        [0, 255, 0, 255, 0, 127, 128, 0]


def test_golden_symmetric_weight_reaches_minus_128():
    """Symmetric weights use scale = amax / 127.5. With amax = 3: scale = f32(3/127.5) = 0.023529412, and
    inv = f32(1/scale) = 42.5 exactly, so -3 -> -127.5 -> RNE -> -128, while +3 -> 127.5 -> 128 -> clamped to 127.
    With amax = 1, inv = 127.49999 (f32 rounding), so -1 -> -127.49999 -> -127: -128 depends on the rounding."""
    w = np.float32([[3.0, -3.0, 1.5], [1.0, -1.0, 0.5]])
    scales = np.float32([3.0, 1.0]) / np.float32(127.5)
    q = quantize_per_channel(w, scales, np.array([0, 0]), 0, "qint8")
    assert q.tolist() == [[127, -128, 64], [127, -127, 64]]  # 1.5 * 42.5 = 63.75 -> 64; 0.5 * 127.49999 -> 64


def test_golden_dequantize_is_one_multiply_and_wraps_for_qint32():
    assert dequantize(np.uint8([0, 3, 255]), 0.5, 3).tolist() == [-1.5, 0.0, 126.0]
    # qint32: q - zp wraps in int32: (2^31 - 1) - (-1000) = -2147482649 -> float32 -2147482624.0
    assert dequantize(np.int32([2**31 - 1]), 1.0, -1000).tolist() == [float(np.float32(-2147482649))]


def test_zero_maps_to_zero_point_exactly(rng):
    for dtype in DTYPES:
        lo, hi = ZP_RANGE[dtype]
        for _ in range(200):
            zp = int(rng.integers(max(lo, -10**6), min(hi, 10**6), endpoint=True))
            scale = float(10.0 ** rng.uniform(-30, 30))
            zeros = np.float32([0.0, -0.0])
            assert quantize_per_tensor(zeros, scale, zp, dtype).tolist() == [zp, zp]
            assert dequantize(np.array([zp], np.dtype(quantize_per_tensor(zeros, scale, zp, dtype).dtype)),
                              scale, zp).tolist() == [0.0]


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-4, 1e3, allow_subnormal=False), st.integers(0, 255),
       st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=50))
def test_roundtrip_within_half_a_scale_inside_the_range(scale, zero_point, values):
    """For x inside the representable range, |dequantize(quantize(x)) - x| <= scale / 2 (plus float32 slack)."""
    s = float(np.float32(scale))
    x = np.float32(values)
    lo, hi = (0 - zero_point) * s, (255 - zero_point) * s
    inside = x[(x >= lo) & (x <= hi)]
    if inside.size == 0:
        return
    back = dequantize(quantize_per_tensor(inside, scale, zero_point, "quint8"), scale, zero_point)
    err = np.abs(back.astype(np.float64) - inside.astype(np.float64))
    slack = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(inside), 255 * s)
    assert np.all(err <= s / 2 + slack), (err.max(), s)


# ----------------------------------------------------------------------------------------------------------
# the float32 building blocks


def _exact_fmaf(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """fmaf from exact rational arithmetic: a*b + c exactly, then rounded once to float32 (half to even)."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    lo = np.float32(float(exact))  # float64 rounding first; fix by checking both float32 neighbours
    candidates = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.uint32)) & 1))
    return np.float32(best)


def test_fmaf_single_rounding_golden():
    """3 * (2^22 + 0.5) = 12582913.5 is a float32 midpoint; adding -2^-40 moves the exact sum just below it.
    Rounding once gives 12582913; rounding to float64 first lands on the midpoint and then on 12582914."""
    a, b, c = np.float32(3), np.float32(2**22 + 0.5), np.float32(-(2.0**-40))
    assert fmaf(a, b, c) == np.float32(12582913)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == np.float32(12582914)


def test_fmaf_against_exact_rationals(rng):
    a = (rng.integers(1, 2**24, 3000) * 2.0 ** rng.integers(-30, 10, 3000)).astype(np.float32)
    b = (rng.integers(1, 2**24, 3000) * 2.0 ** rng.integers(-30, 10, 3000)).astype(np.float32)
    c = (rng.choice([-1, 1], 3000) * rng.integers(1, 2**24, 3000) * 2.0 ** rng.integers(-80, 30, 3000)).astype(np.float32)
    got = fmaf(a, b, c)
    want = np.array([_exact_fmaf(*t) for t in zip(a, b, c)], np.float32)
    assert_same(got, want, "fmaf vs exact rational arithmetic")


def test_cvtps2dq_golden():
    v = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, np.nan, np.inf, -np.inf, 2147483520.0, 2.0**31, -(2.0**31)])
    assert cvtps2dq(v).tolist() == [0, 2, 2, 0, -2, -(2**31), -(2**31), -(2**31), 2147483520, -(2**31), -(2**31)]


def test_fma_kernel_equals_readable_path(rng):
    x = np.concatenate([float_samples(rng, k, (2000,), 0.05) for k in KINDS]).astype(np.float32)
    for dtype, (qmin, qmax) in (("quint8", (0, 255)), ("qint8", (-128, 127))):
        for _ in range(5):
            inv = np.float32(1) / np.float32(10.0 ** rng.uniform(-4, 1))
            zp = np.float32(rng.integers(qmin, qmax, endpoint=True))
            out = np.empty(x.size, np.uint8 if dtype == "quint8" else np.int8)
            _quantize_fma_kernel(x, inv, zp, qmin, qmax, out)
            assert_same(out, _quantize_fma_readable(x, inv, zp, qmin, qmax).astype(out.dtype), "kernel vs readable")


@pytest.mark.parametrize("n", [Q.KERNEL_MIN_ELEMENTS - 1, Q.KERNEL_MIN_ELEMENTS])
def test_quantize_runs_readable_below_the_threshold_and_the_kernel_from_it(rng, monkeypatch, n):
    """quantize_per_tensor takes eq. Q1's readable statements below KERNEL_MIN_ELEMENTS elements (for the first
    refquant._dispatch.SMALL_CALLS calls) and the kernel otherwise; on each side the two give the same bits (the
    other path is made to fail, so each call proves its path)."""
    kinds = np.concatenate([float_samples(rng, k, (4000,), 0.05).ravel() for k in KINDS])
    x = np.resize(rng.permutation(kinds.ravel()), n).astype(np.float32)
    scale, zp = float(10.0 ** rng.uniform(-3, 0)), int(rng.integers(0, 256))
    inv = np.float32(1) / np.float32(scale)
    expected = _quantize_fma_readable(x, inv, np.float32(zp), 0, 255).astype(np.uint8)
    kernel_out = np.empty(n, np.uint8)
    _quantize_fma_kernel(x, inv, np.float32(zp), 0, 255, kernel_out)
    assert_same(kernel_out, expected, f"kernel vs readable at {n} elements")

    def must_not_run(*args):
        raise AssertionError("the other path ran")

    monkeypatch.setattr(Q, "_SMALL_CALLS", SmallCalls(Q.KERNEL_MIN_ELEMENTS))  # no small call made yet
    with monkeypatch.context() as m:
        other_path = "_quantize_fma_readable" if n >= Q.KERNEL_MIN_ELEMENTS else "_quantize_fma_kernel"
        m.setattr(Q, other_path, must_not_run)
        assert_same(quantize_per_tensor(x, scale, zp, "quint8"), expected, f"dispatch at {n} elements")
    if n < Q.KERNEL_MIN_ELEMENTS:  # after SMALL_CALLS small calls, the kernel
        for _ in range(SMALL_CALLS - 1):
            quantize_per_tensor(x[:10], scale, zp, "quint8")
        monkeypatch.setattr(Q, "_quantize_fma_readable", must_not_run)
        assert_same(quantize_per_tensor(x, scale, zp, "quint8"), expected, "the kernel after SMALL_CALLS calls")


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call, exc, words", [
    (lambda: quantize_per_tensor(np.zeros(3), 0.1, 0, "quint8"), TypeError, ["x", "float32", "float64"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.int32), 0.1, 0, "quint8"), TypeError, ["x", "int32"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 0.0, 0, "quint8"), ValueError, ["scale", "positive"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), -1.0, 0, "quint8"), ValueError, ["scale", "-1.0"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), float("nan"), 0, "quint8"), ValueError, ["scale", "nan"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 1e-300, 0, "quint8"), ValueError, ["scale", "float32"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 0.1, 256, "quint8"), ValueError, ["zero_point", "256"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 0.1, -129, "qint8"), ValueError, ["zero_point", "-129"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 0.1, 0.5, "quint8"), TypeError, ["zero_point", "integer"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 0.1, 0, "uint4"), ValueError, ["dtype", "uint4"]),
    (lambda: quantize_per_tensor(np.zeros(3, np.float32), 0.1, 0, "quint8", rounding="up"), ValueError,
     ["rounding", "up"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.ones(2), np.zeros(2, int), 0, "qint8"),
     ValueError, ["scales", "length 3"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.ones(3), np.zeros(2, int), 0, "qint8"),
     ValueError, ["zero_points", "length 3"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.ones(3), np.zeros(3, int), 2, "qint8"),
     ValueError, ["axis", "[0, 2)"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.ones(3), np.zeros(3, int), -1, "qint8"),
     ValueError, ["axis", "-1"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.array([1.0, 0.0, 1.0]), np.zeros(3, int), 0,
                                  "qint8"), ValueError, ["scales[1]"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.ones(3), np.array([0, 0, 200]), 0, "qint8"),
     ValueError, ["zero_points[2]", "200"]),
    (lambda: quantize_per_channel(np.zeros((3, 2), np.float32), np.ones(3, int), np.zeros(3, int), 0, "qint8"),
     TypeError, ["scales", "floating"]),
    (lambda: dequantize(np.zeros(3, np.float32), 0.1, 0), TypeError, ["q", "float32"]),
    (lambda: dequantize(np.zeros(3, np.int16), 0.1, 0), TypeError, ["q", "int16"]),
    (lambda: dequantize(np.zeros(3, np.uint8), 0.1, 300), ValueError, ["zero_point", "300"]),
    (lambda: dequantize([1, 2], 0.1, 0), TypeError, ["q", "list"]),
    (lambda: dequantize_per_channel(np.zeros((2, 2), np.int8), np.ones(3), np.zeros(3, int), 0), ValueError,
     ["scales", "length 2"]),
])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_python_numbers_become_float32_like_torch_tensor():
    """A list is taken as float32 (torch.tensor's default), not refused."""
    got = quantize_per_tensor([0.1, 0.2], 0.01, 0, "quint8")
    want = torch.quantize_per_tensor(torch.tensor([0.1, 0.2]), 0.01, 0, torch.quint8).int_repr().numpy()
    assert_same(got, want, "list input")
