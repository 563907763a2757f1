"""refquant.fixed_point: golden integers at each source's edges, exact rational models (hypothesis), and the Numba
kernel equal to the readable NumPy path. The C99 twin is compared in tests/test_c_reference.py."""

from __future__ import annotations

from fractions import Fraction
from math import floor

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from parity import assert_same
from refquant import fixed_point as fp
from refquant.linear import QuantizedLinear

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
int32s = st.integers(I32_MIN, I32_MAX)


def _i32(values) -> np.ndarray:
    return np.array(values, np.int64).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# exact rational models (Python ints and fractions; nothing shared with the module)
# ----------------------------------------------------------------------------------------------------------------

def half_up(v: Fraction) -> int:
    """Nearest integer, ties towards +inf."""
    return floor(v + Fraction(1, 2))


def half_away(v: Fraction) -> int:
    """Nearest integer, ties away from zero."""
    return half_up(v) if v >= 0 else -half_up(-v)


def wrap(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


# ----------------------------------------------------------------------------------------------------------------
# golden: the primitives
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, expected", [
    (I32_MIN, I32_MIN, I32_MAX),          # the only overflow: 2^62 / 2^31 = 2^31 saturates
    (I32_MIN, I32_MAX, -(2**31) + 1),     # −2^31·(2^31 − 1) / 2^31 = −2^31 + 1, exact
    (I32_MAX, I32_MAX, 2**31 - 2),        # (2^31 − 1)^2 / 2^31 = 2^31 − 2 + 2^−31 -> 2^31 − 2
    (2**30, 2**30, 2**29),                # 2^60 / 2^31, exact
    (2**15, 2**15, 1),                    # 2^30 / 2^31 = +0.5 -> 1 (tie up)
    (-(2**15), 2**15, 0),                 # −0.5 -> 0: the nudge 1 − 2^30 then truncation: tie towards +inf
    (3 * 2**15, 2**15, 2),                # +1.5 -> 2
    (-3 * 2**15, 2**15, -1),              # −1.5 -> −1 (not −2: no "away from zero" here)
    (2**15, 2**15 - 1, 0),                # 0.49998 -> 0
    (-(2**15), 2**15 + 1, -1),            # −0.50002 -> −1
    (0, I32_MIN, 0),
    (-1, 1, 0),                           # −2^−31 -> 0
])
def test_golden_saturating_rounding_doubling_high_mul(a, b, expected):
    got = fp.saturating_rounding_doubling_high_mul(_i32([a]), _i32([b]))
    assert_same(got, _i32([expected]), "SaturatingRoundingDoublingHighMul")
    assert int(fp.saturating_rounding_doubling_high_mul_scalar(a, b)) == expected


@pytest.mark.parametrize("x, exponent, expected", [
    (-7, 0, -7), (I32_MIN, 0, I32_MIN), (I32_MAX, 0, I32_MAX),   # exponent 0: identity (mask 0, threshold 0)
    (5, 1, 3), (-5, 1, -3),               # ±2.5 -> ±3: ties away from zero
    (3, 1, 2), (-3, 1, -2),               # ±1.5 -> ±2
    (1, 1, 1), (-1, 1, -1),               # ±0.5 -> ±1
    (6, 2, 2), (-6, 2, -2),               # ±1.5
    (-5, 2, -1),                          # −1.25 -> −1
    (I32_MIN, 31, -1),                    # −1.0 exactly
    (I32_MAX, 31, 1),                     # 0.99999999953 -> 1
    (2**30, 31, 1), (-(2**30), 31, -1),   # ±0.5 -> ±1
    (2**30 - 1, 31, 0), (-(2**30) + 1, 31, 0),   # ±0.4999999995 -> 0
    (-1, 31, 0), (0, 31, 0),
])
def test_golden_rounding_divide_by_pot(x, exponent, expected):
    got = fp.rounding_divide_by_pot(_i32([x]), np.array([exponent]))
    assert_same(got, _i32([expected]), "RoundingDivideByPOT")
    assert int(fp.rounding_divide_by_pot_scalar(x, exponent)) == expected


@pytest.mark.parametrize("a, b, right_shift, expected", [
    (3, 1, 1, 2), (-3, 1, 1, -1),         # ±1.5 -> 2, −1: half up (towards +inf)
    (-1, 1, 1, 0), (1, 1, 1, 1),          # ∓0.5 -> 0, 1
    (I32_MIN, 2**30, 31, -(2**30)),       # −2^61 / 2^31, exact
    (I32_MIN, I32_MIN, 62, 1),            # 2^62 / 2^62
    (I32_MAX, 2**31 - 128, 63, 0),        # (2^62 − ε) / 2^63 = 0.4999999 -> 0; the int64 sum does not overflow
    (I32_MIN, 2**31 - 128, 63, 0),        # −0.49999994 -> 0
    (I32_MIN, 2**31 - 1, 63, 0),          # −0.4999999998 -> 0
])
def test_golden_saturating_rounding_mul_with_shift(a, b, right_shift, expected):
    got = fp.saturating_rounding_mul_with_shift(_i32([a]), _i32([b]), np.array([right_shift]))
    assert_same(got, np.array([expected], np.int64), "SaturatingRoundingMulWithShift")
    assert int(fp.saturating_rounding_mul_with_shift_scalar(a, b, right_shift)) == expected


@pytest.mark.parametrize("x, m, shift, double, single", [
    # M = 2^30 (0.5), shift −1: real 0.25; x = ±2 is ±0.5 exactly. SRDHM(±2, 2^30) = ±1 exact, then
    # RoundingDivideByPOT(±1, 1) rounds ±0.5 away from zero: ±1. Single rounding: half up: 1 and 0.
    (2, 2**30, -1, 1, 1), (-2, 2**30, -1, -1, 0),
    (6, 2**30, -1, 2, 2), (-6, 2**30, -1, -2, -1),     # ±1.5
    # The double rounding error: M = 2^30 + 1, shift −1, x = 1: exact 0.2500000002 -> 0; but SRDHM(1, M) =
    # floor((2^30 + 1)/2^31 + 1/2) = 1 and RoundingDivideByPOT(1, 1) = 1 (0.5 away from zero). For x = −1 the
    # high mul sees −0.50000000047 -> −1, and RoundingDivideByPOT(−1, 1) = −1: wrong on both signs.
    (1, 2**30 + 1, -1, 1, 0), (-1, 2**30 + 1, -1, -1, 0),
    # shift > 0 multiplies x in int32 before the high mul: 2^30·2 wraps to −2^31 (TFLite relies on it fitting)
    (2**30, 2**30, 1, -(2**30), 2**30),
    # shift −31 (real = M·2^−62): RoundingDivideByPOT with exponent 31
    (I32_MAX, I32_MAX, -31, 1, 1), (I32_MIN, I32_MAX, -31, -1, -1),   # ±(2^31 − 1)^2 / 2^62 ≈ ±1
    # M = 0 (a flushed tiny multiplier): 0 whatever x
    (I32_MIN, 0, 0, 0, 0),
])
def test_golden_multiply_by_quantized_multiplier(x, m, shift, double, single):
    got_double = fp.multiply_by_quantized_multiplier(_i32([x]), _i32([m]), np.array([shift]))
    got_single = fp.multiply_by_quantized_multiplier_single_rounding(_i32([x]), _i32([m]), np.array([shift]))
    assert_same(got_double, _i32([double]), "MultiplyByQuantizedMultiplier")
    assert_same(got_single, _i32([single]), "MultiplyByQuantizedMultiplier (TFLITE_SINGLE_ROUNDING)")
    assert int(fp.multiply_by_quantized_multiplier_scalar(x, m, shift)) == double
    assert int(fp.multiply_by_quantized_multiplier_single_rounding_scalar(x, m, shift)) == single


# ----------------------------------------------------------------------------------------------------------------
# golden: the multipliers
# ----------------------------------------------------------------------------------------------------------------

F32_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))   # 0.49999997 = 0.5 − 2^−25
F32_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0)))    # 0.99999994 = 1 − 2^−24


@pytest.mark.parametrize("real, multiplier, right_shift", [
    (0.5, 2**30, 31),                          # already in [1/2, 1)
    (0.75, 3 * 2**29, 31),
    (F32_BELOW_ONE, 2**31 - 2**7, 31),        # (1 − 2^−24)·2^31: the 24 bits of the float, exactly
    (1.0, 2**30, 30),                          # m = 1 is not > 1: M = 2^31 is halved, s − 1
    (F32_BELOW_HALF, 2**31 - 2**7, 32),       # doubled once to 1 − 2^−24
    (2.0, 2**30, 29),
    (2.0**-32, 2**30, 62),                     # 31 doublings to 0.5
    (2.0**-33, 2**30, 63),                     # the largest shift FBGEMM allows (asserts s < 64)
    (2.0**29, 2**30, 1),                       # 29 halvings to 1.0 (not > 1), M halved: s = 1
    (1.5 * 2.0**29, 3 * 2**29, 1),             # 30 halvings to 0.75
    (float(np.float32(0.1)), 1717986944, 34),  # f32(0.1)·2^34 = 1717986944 exactly (0x66666680)
])
def test_golden_choose_requantization_multiplier(real, multiplier, right_shift):
    assert fp.choose_requantization_multiplier(real) == (multiplier, right_shift)
    assert Fraction(multiplier, 2**right_shift) == Fraction(float(np.float32(real)))   # exact, always


@pytest.mark.parametrize("real, match", [
    (2.0**30, "right_shift 0"),        # 30 halvings to 1.0, M halved: s = 0 (1ll << −1 in FBGEMM)
    (2.0**31, "right_shift -1"),
    (2.0**-34, "right_shift 64"),      # FBGEMM: assert(s < 64)
    (0.0, "finite and > 0"), (-0.5, "finite and > 0"), (float("inf"), "finite and > 0"),
    (float("nan"), "finite and > 0"), (1e-46, "finite and > 0"),   # 1e-46 is 0 as float32
])
def test_choose_requantization_multiplier_refuses(real, match):
    with pytest.raises(ValueError, match=match):
        fp.choose_requantization_multiplier(real)


@pytest.mark.parametrize("real, single_rounding, multiplier, shift", [
    (0.5, False, 2**30, 0),                    # frexp(0.5) = (0.5, 0)
    (1.0, False, 2**30, 1),                    # frexp(1.0) = (0.5, 1)
    (F32_BELOW_ONE, False, 2**31 - 2**7, 0),
    (F32_BELOW_HALF, False, 2**31 - 2**7, -1),
    (1.0 - 2.0**-53, False, 2**30, 1),         # q·2^31 = 2^31 − 2^−22 rounds to 2^31: halved, shift + 1
    (0.5 + 2.0**-33, False, 2**30, 0),         # q·2^31 = 2^30 + 0.25 -> 2^30
    (0.5 + 2.0**-32, False, 2**30 + 1, 0),     # q·2^31 = 2^30 + 0.5: TfLiteRound = std::round, away from zero
    (0.5 + 3 * 2.0**-33, False, 2**30 + 1, 0),  # 2^30 + 0.75
    (2.0**-32, False, 2**30, -31),             # the smallest kept shift
    (2.0**-33, False, 0, 0),                   # shift −32 < −31: flushed to (0, 0)
    (0.0, False, 0, 0),
    (2.0**30, False, 2**30, 31),               # returned as is without TFLITE_SINGLE_ROUNDING ...
    (2.0**30, True, 2**31 - 1, 30),            # ... saturated with it (newer TF)
    (2.0**29, True, 2**30, 30),
])
def test_golden_quantize_multiplier(real, single_rounding, multiplier, shift):
    assert fp.quantize_multiplier(real, single_rounding=single_rounding) == (multiplier, shift)


@pytest.mark.parametrize("real", [-0.5, float("inf"), float("nan")])
def test_quantize_multiplier_refuses(real):
    with pytest.raises(ValueError, match="finite and >= 0"):
        fp.quantize_multiplier(real)


# ----------------------------------------------------------------------------------------------------------------
# golden: the bias rules
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias, fbgemm, tflite, mlir", [
    # s_x = 0.5, s_w = 0.25: atws = 0.125, 1/atws = 8 exactly, so bias·8 is exact
    (0.3125, 2, 3, 3),             # 2.5: RNE (fbgemm's nearbyint) -> 2; std::round -> 3
    (-0.3125, -2, -3, -3),         # −2.5
    (0.4375, 4, 4, 4),             # 3.5: RNE -> 4, away -> 4
    (0.0625, 0, 1, 1),             # 0.5
    (1e30, I32_MAX, I32_MAX, I32_MAX),
    (-1e30, I32_MIN, -I32_MAX, I32_MIN),     # TFLite's legacy rule clamps symmetrically to −(2^31 − 1)
    (-268435456.0, I32_MIN, -I32_MAX, I32_MIN),   # exactly −2^31 after scaling
])
def test_golden_bias_rules(bias, fbgemm, tflite, mlir):
    b = np.array([bias], np.float32)
    s_w = np.array([0.25], np.float32)
    assert_same(fp.quantize_bias_fbgemm(b, np.float32(0.125)), _i32([fbgemm]), "fbgemm bias")
    assert_same(fp.quantize_bias_tflite(b, 0.5, s_w), _i32([tflite]), "tflite bias")
    assert_same(fp.quantize_bias_tflite_mlir(b, 0.5, s_w), _i32([mlir]), "tflite mlir bias")


def test_golden_bias_rules_reciprocal_vs_division():
    """s = 0.1f: fbgemm and TFLite's legacy rule multiply by a float32 reciprocal, the MLIR rule divides in double.

    f32(1/0.1f) = 10.0 exactly, so bias = 0.35f gives 0.35f·10 = 3.4999999 rounded to float32: 3.5 (RNE and
    away: 4), while 0.35f / 0.1f in double is 3.49999989 (3). bias = 0.45f: 4.5 in float32 (RNE: 4, away: 5),
    4.49999981 in double (4).
    """
    b = np.array([0.35, 0.45], np.float32)
    one = np.array([1.0], np.float32)
    assert_same(fp.quantize_bias_fbgemm(b, np.float32(0.1)), _i32([4, 4]), "fbgemm")
    assert_same(fp.quantize_bias_tflite(b, 0.1, one), _i32([4, 5]), "tflite legacy")
    assert_same(fp.quantize_bias_tflite_mlir(b, 0.1, one), _i32([3, 4]), "tflite mlir")


# ----------------------------------------------------------------------------------------------------------------
# golden: whole variants on ties of both signs
# ----------------------------------------------------------------------------------------------------------------

def _layer(variant, s_x, bias=None, relu=False, zp=128, **kw):
    return fp.integer_requantization(variant, s_x, np.array([1.0], np.float32), 1.0, bias, zp, relu=relu, **kw)


@pytest.mark.parametrize("variant, expected", [
    # real multiplier 0.5 (s_x = 0.5, s_w = s_y = 1); raw 3, −3, −1, 1, 0 -> 1.5, −1.5, −0.5, 0.5, 0; z_y = 128
    ("fbgemm_fixed_point", [130, 127, 128, 129, 128]),      # half up: 2, −1, 0, 1, 0
    ("tflite", [130, 127, 128, 129, 128]),                  # SRDHM(x, 2^30) rounds half up; RDBPOT(., 0) = id
    ("tflite_single_rounding", [130, 127, 128, 129, 128]),
    ("float_int32_bias", [130, 126, 128, 128, 128]),        # cvtps2dq: half to even: 2, −2, −0, 0, 0
])
def test_golden_variants_ties_at_one_half(variant, expected):
    rq = _layer(variant, 0.5)
    raw = np.array([[3, -3, -1, 1, 0]], np.int32).T   # one output channel, five rows
    assert_same(fp.requantize_integer_readable(raw, rq).ravel(), np.array(expected, np.uint8), variant)


@pytest.mark.parametrize("variant, expected", [
    # real multiplier 0.25; raw 2, −2, 6, −6 -> 0.5, −0.5, 1.5, −1.5
    ("fbgemm_fixed_point", [129, 128, 130, 127]),           # half up
    ("tflite", [129, 127, 130, 126]),                       # exact SRDHM, then RDBPOT(., 1): away from zero
    ("tflite_single_rounding", [129, 128, 130, 127]),       # half up
    ("float_int32_bias", [128, 128, 130, 126]),             # half to even
])
def test_golden_variants_ties_at_one_quarter(variant, expected):
    rq = _layer(variant, 0.25)
    raw = np.array([[2, -2, 6, -6]], np.int32).T
    assert_same(fp.requantize_integer_readable(raw, rq).ravel(), np.array(expected, np.uint8), variant)


@pytest.mark.parametrize("variant", fp.VARIANTS)
def test_golden_int32_bias_add_wraps(variant):
    """raw = INT32_MAX plus an int32 bias of 1 wraps to INT32_MIN (vpaddd; C++ int32 += on the machines TFLite and
    DNNLOWP run on), so the output saturates LOW: 0, not 255."""
    rq = _layer(variant, 0.5).replace(bias_i32=np.array([1], np.int32))
    raw = np.array([[I32_MAX], [I32_MAX - 1]], np.int32)
    assert_same(fp.requantize_integer_readable(raw, rq), np.array([[0], [255]], np.uint8), variant)
    assert_same(fp.requantize_integer(raw, rq), np.array([[0], [255]], np.uint8), variant)


def test_golden_relu_and_int8_range():
    rq = _layer("tflite", 0.25, relu=True, zp=-5, quant_min=-128, quant_max=127)
    assert rq.quant_min == -5 and rq.output_dtype == np.int8
    raw = np.array([[-400], [-2], [2], [1000]], np.int32)   # −100, −0.5 -> −1, 0.5 -> 1, 250
    assert_same(fp.requantize_integer_readable(raw, rq), np.array([[-5], [-5], [-4], [127]], np.int8), "relu")


def test_golden_float_int32_bias_overflow_gives_int32_min():
    """As torch's float path (eq. L10): f32(acc)·mult beyond 2^31 converts to INT32_MIN, so the code is 0."""
    rq = fp.integer_requantization("float_int32_bias", 1.0, np.array([1.0], np.float32), 1e-6, None, 128)
    raw = np.array([[10_000], [-10_000], [2000]], np.int32)   # 1e10 -> INT32_MIN -> 0; −1e10 -> 0; 2e9 -> 255
    assert_same(fp.requantize_integer(raw, rq), np.array([[0], [0], [255]], np.uint8), "cvtps2dq overflow")


def test_golden_constants_of_a_layer():
    """s_x = 0.02, s_w = 0.004, s_y = 0.1: the constants each source derives, worked out by hand."""
    s_w = np.array([0.004], np.float32)
    bias = np.array([0.001], np.float32)
    fb = fp.integer_requantization("fbgemm_fixed_point", 0.02, s_w, 0.1, bias, 128)
    atws = np.float32(np.float32(0.02) * np.float32(0.004))
    mult = np.float32(atws / np.float32(0.1))
    m, s = fb.requant_multiplier_i32[0], fb.requant_shift[0]
    assert Fraction(int(m), 2 ** int(s)) == Fraction(float(mult)) and 2**30 <= m < 2**31   # mult = M·2^−s exactly
    assert fb.bias_i32[0] == 12          # 0.001 / 8e-5 = 12.5 -> in float32 12.499999 -> 12
    tf = fp.integer_requantization("tflite", 0.02, s_w, 0.1, bias, 128)
    real = float(np.float32(0.02)) * float(np.float32(0.004)) / float(np.float32(0.1))
    q, e = np.frexp(real)
    assert tf.requant_shift[0] == e and tf.requant_multiplier_i32[0] == round(q * 2**31)
    assert tf.shift_convention == "left" and fb.shift_convention == "right"


# ----------------------------------------------------------------------------------------------------------------
# property tests against exact rational models
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(int32s, int32s)
def test_property_doubling_high_mul_is_half_up_of_ab_over_2_31(a, b):
    expected = I32_MAX if a == b == I32_MIN else half_up(Fraction(a * b, 2**31))
    assert int(fp.saturating_rounding_doubling_high_mul(_i32([a]), _i32([b]))[0]) == expected
    assert int(fp.saturating_rounding_doubling_high_mul_scalar(a, b)) == expected


@settings(max_examples=300, deadline=None)
@given(int32s, st.integers(0, 31))
def test_property_rounding_divide_by_pot_is_half_away(x, e):
    expected = half_away(Fraction(x, 2**e))
    assert int(fp.rounding_divide_by_pot(_i32([x]), np.array([e]))[0]) == expected
    assert int(fp.rounding_divide_by_pot_scalar(x, e)) == expected


@settings(max_examples=300, deadline=None)
@given(int32s, st.integers(0, I32_MAX), st.integers(1, 63))
def test_property_mul_with_shift_is_half_up(a, b, s):
    expected = half_up(Fraction(a * b, 2**s))
    assert int(fp.saturating_rounding_mul_with_shift(_i32([a]), _i32([b]), np.array([s]))[0]) == expected


@settings(max_examples=300, deadline=None)
@given(int32s, st.integers(0, I32_MAX), st.integers(-31, 30))
def test_property_single_rounding_is_half_up_of_x_m_2_pow_shift_minus_31(x, m, shift):
    expected = wrap(half_up(Fraction(x * m) * Fraction(2) ** (shift - 31)))
    got = fp.multiply_by_quantized_multiplier_single_rounding(_i32([x]), _i32([m]), np.array([shift]))
    assert int(got[0]) == expected


@settings(max_examples=300, deadline=None)
@given(int32s, st.integers(0, I32_MAX), st.integers(-31, 30))
def test_property_double_rounding_is_two_roundings(x, m, shift):
    """Model: x·2^left wrapped to int32; half up of x·M/2^31 (saturating at MIN·MIN); half away of that / 2^right.
    Without the wrap it is within one of the exact result, which single rounding gives exactly."""
    left, right = max(shift, 0), max(-shift, 0)
    x_shifted = wrap(x * 2**left)
    high = half_up(Fraction(x_shifted * m, 2**31))
    expected = half_away(Fraction(high, 2**right))
    got = int(fp.multiply_by_quantized_multiplier(_i32([x]), _i32([m]), np.array([shift]))[0])
    assert got == expected
    if x_shifted == x * 2**left:
        assert abs(got - half_up(Fraction(x * m) * Fraction(2) ** (shift - 31))) <= 1


@settings(max_examples=300, deadline=None)
@given(st.floats(2.0**-33, 2.0**29, allow_subnormal=False, width=32))
def test_property_fbgemm_multiplier_is_the_float_exactly(real):
    m, s = fp.choose_requantization_multiplier(real)
    assert 2**30 <= m < 2**31 and 1 <= s <= 63
    assert Fraction(m, 2**s) == Fraction(real)


@settings(max_examples=300, deadline=None)
@given(st.floats(2.0**-32, 2.0**30, exclude_max=True))
def test_property_tflite_multiplier_within_half_an_ulp_of_q31(real):
    m, shift = fp.quantize_multiplier(real)
    assert 2**30 <= m < 2**31 and -31 <= shift <= 31   # 31: real within 2^-32 relative of 2^30 rounds up
    assert abs(Fraction(m) * Fraction(2) ** (shift - 31) - Fraction(real)) <= Fraction(2) ** (shift - 32)


@settings(max_examples=200, deadline=None)
@given(st.lists(int32s, min_size=1, max_size=8), st.integers(-(2**20), 2**20),
       st.floats(2.0**-20, 4.0, width=32), st.integers(0, 255), st.booleans())
def test_property_fbgemm_fixed_point_is_one_exact_rounding(raws, bias_i32, mult, zp, relu):
    """fbgemm_fixed_point = clamp(z_y + half_up(wrap32(raw + bias)·mult_f32)): the float32 multiplier is exact in
    (M, s), so one rounding of the exact product is all there is."""
    rq = fp.integer_requantization("fbgemm_fixed_point", float(mult), np.array([1.0], np.float32), 1.0, None, zp,
                                   relu=relu).replace(bias_i32=np.array([bias_i32], np.int32))
    raw = np.array(raws, np.int32).reshape(-1, 1)
    lo = zp if relu else 0
    expected = [min(max(zp + half_up(wrap(r + bias_i32) * Fraction(float(rq.output_multiplier_f32[0]))), lo), 255)
                for r in raws]
    assert_same(fp.requantize_integer_readable(raw, rq).ravel(), np.array(expected, np.uint8), "fbgemm model")
    assert_same(fp.requantize_integer(raw, rq).ravel(), np.array(expected, np.uint8), "fbgemm model, kernel")


@settings(max_examples=200, deadline=None)
@given(st.lists(int32s, min_size=1, max_size=8), st.floats(1e-4, 1.0), st.floats(1e-4, 1.0),
       st.floats(1e-3, 1.0), st.integers(0, 255))
def test_property_tflite_single_rounding_is_one_rounding_of_the_q31_multiplier(raws, s_x, s_w, s_y, zp):
    rq = fp.integer_requantization("tflite_single_rounding", s_x, np.array([s_w], np.float32), s_y, None, zp)
    m, shift = int(rq.requant_multiplier_i32[0]), int(rq.requant_shift[0])
    raw = np.array(raws, np.int32).reshape(-1, 1)
    expected = [min(max(wrap(zp + wrap(half_up(Fraction(r * m) * Fraction(2) ** (shift - 31)))), 0), 255)
                for r in raws]
    assert_same(fp.requantize_integer_readable(raw, rq).ravel(), np.array(expected, np.uint8), "single rounding")


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6, width=32), st.floats(2.0**-13, 1.0, width=32), st.floats(2.0**-13, 1.0, width=32))
def test_property_bias_rules_round_to_nearest_of_their_float_quotient(bias, s_x, s_w):
    """Each rule is within 1/2 (plus float32 or double rounding of the quotient) of bias / (s_x·s_w)."""
    b = np.array([bias], np.float32)
    w = np.array([s_w], np.float32)
    exact = Fraction(float(bias)) / (Fraction(float(s_x)) * Fraction(float(s_w)))
    assume(abs(exact) < 2**31 - 2**12)   # saturation has its own golden test
    slack = Fraction(1, 2) + abs(exact) * Fraction(1, 2**21)   # a few float32 ulps of the quotient
    atws = np.float32(np.float32(s_x) * np.float32(s_w))
    for got in (fp.quantize_bias_fbgemm(b, atws), fp.quantize_bias_tflite(b, s_x, w),
                fp.quantize_bias_tflite_mlir(b, s_x, w)):
        assert abs(int(got[0]) - exact) <= slack
    assert int(fp.quantize_bias_tflite_mlir(b, s_x, w)[0]) == half_away(Fraction(float(np.float64(bias) / (
        np.float64(np.float32(s_x)) * np.float64(np.float32(s_w))))))


# ----------------------------------------------------------------------------------------------------------------
# kernel == readable path
# ----------------------------------------------------------------------------------------------------------------

def _random_raw(rng, m, n) -> np.ndarray:
    """Accumulators of every size: small, typical, near ±2^31, and the extremes themselves."""
    kind = rng.integers(0, 4, (m, n))
    full = rng.integers(I32_MIN, I32_MAX, (m, n), endpoint=True)
    raw = np.where(kind == 0, full >> 20, np.where(kind == 1, full >> 8, full))
    raw[0, : min(n, 4)] = [I32_MIN, I32_MAX, I32_MIN + 1, I32_MAX - 1][: min(n, 4)]
    return raw.astype(np.int32)


@pytest.mark.parametrize("variant", fp.VARIANTS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_kernel_equals_readable(rng, variant, per_channel):
    for trial in range(6):
        n = int(rng.integers(1, 40))
        c = n if per_channel else 1
        s_x = float(rng.uniform(0.002, 0.1))
        s_w = (rng.uniform(0.5, 2.0, c) * 10.0 ** rng.uniform(-4, -1, c)).astype(np.float32)
        s_y = float(10.0 ** rng.uniform(-4, 0))
        bias = None if trial % 3 == 0 else (rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 3)).astype(np.float32)
        signed = trial % 2 == 1
        qmin, qmax = (-128, 127) if signed else (0, 255)
        zp = int(rng.integers(qmin, qmax + 1))
        try:
            rq = fp.integer_requantization(variant, s_x, s_w, s_y, bias, zp, relu=trial == 4, quant_min=qmin,
                                           quant_max=qmax)
        except ValueError as e:  # a multiplier outside what the source accepts
            assert "shift" in str(e)
            continue
        raw = _random_raw(rng, int(rng.integers(1, 30)), n)
        assert_same(fp.requantize_integer(raw, rq), fp.requantize_integer_readable(raw, rq), variant)


def test_kernel_equals_readable_on_extreme_constants(rng):
    """Every multiplier and shift each source can produce, on every kind of raw."""
    raw = _random_raw(rng, 64, 16)
    for variant, shifts in (("fbgemm_fixed_point", rng.integers(1, 64, 16)),
                            ("tflite", rng.integers(-31, 31, 16)), ("tflite_single_rounding", rng.integers(-31, 31, 16))):
        rq = _layer(variant, 0.5).replace(
            requant_multiplier_i32=rng.integers(0, I32_MAX, 16, endpoint=True).astype(np.int32),
            requant_shift=shifts.astype(np.int32), output_multiplier_f32=np.ones(16, np.float32),
            bias_i32=rng.integers(I32_MIN, I32_MAX, 16, endpoint=True).astype(np.int32))
        assert_same(fp.requantize_integer(raw, rq), fp.requantize_integer_readable(raw, rq), variant)


def test_from_quantized_linear(rng):
    w = rng.standard_normal((12, 20)).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    ql = QuantizedLinear.from_float(w, b, 0.03, 100, 0.2, 60, relu=True)
    x = rng.integers(0, 256, (9, 20), dtype=np.uint8)
    raw = ql.accumulate(x)
    for variant in fp.VARIANTS:
        rq = fp.integer_requantization_of(ql, variant)
        assert rq.quant_min == 60 and rq.bias_i32.shape == (12,)
        assert_same(rq.output_multiplier_f32, ql.output_multiplier, "eq. L7")
        got = fp.requantize_integer(raw, rq)
        assert_same(got, fp.requantize_integer_readable(raw, rq), variant)
        assert np.abs(got.astype(int) - ql.requantize(raw).astype(int)).max() <= 1   # ±1 of torch's float path


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(variant="gemmlowp"), ValueError, "variant must be one of"),
    (dict(input_scale=0.0), ValueError, "input_scale must be a finite scale"),
    (dict(output_scale=float("nan")), ValueError, "output_scale"),
    (dict(weight_scales=np.array([1, 2])), ValueError, "weight_scales must be a non-empty 1-D float"),
    (dict(weight_scales=np.array([0.1, -0.1], np.float32)), ValueError, "finite and > 0"),
    (dict(bias=np.zeros(3, np.float32)), ValueError, "bias must be None or a 1-D float32 array of length N = 2"),
    (dict(bias=np.array([np.inf, 0], np.float32)), ValueError, "bias must be finite"),
    (dict(output_zero_point=300), ValueError, "output_zero_point must lie in"),
    (dict(bias_rule="round"), ValueError, "bias_rule must be"),
    (dict(output_scale=1e-14, variant="fbgemm_fixed_point"), ValueError, "channel 0: .* right_shift"),
    (dict(output_scale=1e-14, variant="tflite"), ValueError, "channel 0: .* 1 << shift"),
])
def test_bad_constants(kwargs, exc, match):
    args = dict(variant="tflite", input_scale=0.02, weight_scales=np.array([0.01, 0.02], np.float32),
                output_scale=0.1, bias=None, output_zero_point=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fp.integer_requantization(args.pop("variant"), **args)


def test_single_rounding_accepts_huge_multipliers_by_saturating():
    rq = fp.integer_requantization("tflite_single_rounding", 0.02, np.array([0.01], np.float32), 1e-14, None, 10)
    assert (rq.requant_multiplier_i32[0], rq.requant_shift[0]) == (I32_MAX, 30)


def test_bad_raw():
    rq = _layer("tflite", 0.5)
    with pytest.raises(TypeError, match="raw_i32 must be a numpy int32 array"):
        fp.requantize_integer(np.zeros((2, 1), np.int64), rq)
    with pytest.raises(ValueError, match="N = 3 outputs"):
        fp.requantize_integer_readable(np.zeros((2, 3), np.int32), rq.replace(bias_i32=np.zeros(1, np.int32)))
