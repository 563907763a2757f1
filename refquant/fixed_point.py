"""Integer-only requantization: FBGEMM's and TFLite's fixed-point multipliers next to torch's float path.

torch's ``quantized::linear`` requantizes with float32 arithmetic and a float bias (refquant.linear, eqs. L6-L11).
Integer-only runtimes replace that by an int32 bias and a fixed-point multiplier. This module computes the
constants each source derives from the float quantities of a quantized Linear (input scale ``s_x``, weight scales
``s_w[n]`` as float32, output scale ``s_y``, float32 ``bias[n]``) and the integer requantization of the raw int32
accumulators (``raw`` of eq. L5, after the zero-point corrections). Notation as in refquant.linear: ``f32(e)``
rounds to float32, ``f64(e)`` to double (both nearest-even), ``wrap32(v)`` reduces modulo 2^32 into int32,
``RNE`` rounds half to even, ``>>`` is an arithmetic shift (floor division by a power of two).

The variants (:data:`VARIANTS`)::

    "fbgemm_fixed_point"       FBGEMM's pure fixed-point path (ChooseRequantizationMultiplier, RequantizeFixedPoint),
                               as Caffe2's DNNLOWP operators used it: one rounding, half up.
    "tflite"                   TFLite's reference integer FullyConnected: QuantizeMultiplier, then
                               MultiplyByQuantizedMultiplier = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul):
                               two roundings (gemmlowp's).
    "tflite_single_rounding"   the same built with TFLITE_SINGLE_ROUNDING: one rounding, half up.
    "float_int32_bias"         torch's float32 multiplier (eq. L7) kept, the bias rounded to int32 and added to raw in
                               int32: FBGEMM's requantizeOutputProcessingAvx2 instantiated with BIAS_TYPE = int32_t
                               (what DNNLOWP ran with its float multipliers). Not what torch's ``quantized::linear``
                               runs: torch hands fbgemm a float bias.

Constants, per output channel n (per-tensor weights: one multiplier and shift for all n)::

    atws[n] = f32(f32(s_x)·s_w[n])            mult[n] = f32(atws[n] / f32(s_y))          (= eqs. L6, L7)

    bias_i32, FBGEMM (fbgemm::Quantize<int32_t>(bias, 0, atws, 32), as DNNLOWP calls it):
        clamp(RNE(f32(bias · f32(1 / atws))), −2^31, 2^31 − 1)           clamp in double; NaN -> INT32_MIN  (eq. I1a)
    bias_i32, TFLite converter (legacy quantizer, which TF's Python converter uses: legacy_float_scale):
        sf = f32(f32(s_x)·s_w);  clamp(round_half_away(f32(bias · f32(1 / f64(sf)))), −(2^31 − 1), 2^31 − 1) (eq. I1b)
    bias_i32, TFLite's MLIR quantizer without legacy_float_scale (offered, not a variant's default):
        clamp(round_half_away(f64(bias) / (f64(f32(s_x))·f64(s_w))), −2^31, 2^31 − 1)                      (eq. I1c)

    FBGEMM ChooseRequantizationMultiplier(real = mult[n]) -> (requant_multiplier_i32 = M, requant_shift = s):
        m = real (float32); s = 31; while m < 0.5: m *= 2, s += 1; while m > 1: m /= 2, s −= 1
        M = nearbyint(f32(m · 2^31)); if M == 2^31: M = 2^30, s −= 1          real = M·2^−s exactly        (eq. I2a)
        s is a RIGHT shift (positive = right), 1 <= s <= 63 (FBGEMM asserts 0 <= s < 64; s = 0 shifts by −1)
    TFLite QuantizeMultiplier(real = f64(f32(s_x))·f64(s_w[n]) / f64(f32(s_y))) -> (M, shift):
        (q, e) = frexp(real), q in [0.5, 1);  M = round_half_away(q·2^31);  if M == 2^31: M = 2^30, e += 1
        if e < −31: M = 0, e = 0 (flush);  single rounding only (newer TF): if e > 30: M = 2^31 − 1, e = 30
        shift = e is a LEFT shift (positive = left): real ≈ M·2^(shift − 31)                                (eq. I2b)

Requantization of one int32 ``raw`` (the bias added in int32 in every variant, wrapping as the machines do)::

    acc = wrap32(raw + bias_i32)                                                                            (eq. I3)
    fbgemm_fixed_point:  q = clamp(z_y + ((acc·M + 2^(s−1)) >> s), qmin, qmax)              int64          (eq. I4)
    tflite:              x = wrap32(acc·2^max(shift, 0))
                         h = SaturatingRoundingDoublingHighMul(x, M) = floor(x·M / 2^31 + 1/2)   (ties to +inf;
                             INT32_MIN·INT32_MIN -> INT32_MAX)
                         r = RoundingDivideByPOT(h, max(−shift, 0))   (ties away from zero)
                         q = clamp(wrap32(r + z_y), qmin, qmax)                                             (eq. I5)
    tflite_single_rounding:
                         r = wrap32((acc·M + 2^(30 − shift)) >> (31 − shift))     (ties to +inf)
                         q = clamp(wrap32(r + z_y), qmin, qmax)                                             (eq. I6)
    float_int32_bias:    q = clamp(cvtps2dq(f32(f32(acc)·mult)) + z_y, qmin, qmax)     (= eqs. L9-L11)     (eq. I7)

ReLU is ``qmin = z_y``. Every intermediate fits int64 exactly (|acc·M| < 2^62), so the readable functions use NumPy
int64 arithmetic and are exact; the Numba per-element functions (``*_scalar``, ``inline="always"``) repeat them for
fused kernels, and the tests prove the two equal, and equal to exact rational models, and to the C99 reference in
``c/refquant_requant.c``. The fused Linear call's epilogue runs each variant 16 outputs at once
(``requantize_<variant>_row``, int32 lanes; the 32 x 32 -> 64-bit products exact on even and odd lanes apart,
refquant._lanes), proven equal to the per-element functions by tests/test_vector_epilogue.py.

As a layer's requantization: ``QuantizedLinear(..., requantization=<variant>)`` on any engine builds an
:class:`IntegerRequantizer` (registered with refquant.engines.register_requantization), which exposes per output
channel ``bias_i32``, ``requant_multiplier_i32``, ``requant_shift`` and the rules that made them
(:data:`BIAS_RULE_DEFINITIONS`, :data:`MULTIPLIER_RULE_DEFINITIONS`, :data:`SHIFT_CONVENTION_DEFINITIONS`: formula
and source). :func:`compare_with_float_path` gives, for a layer and its inputs, a variant's codes against torch's
float path and the ingredient (:data:`CAUSES`: int32 bias rounding, exact rounding, Q31 multiplier, second
rounding) that moved each differing code.

Overflow, as the sources do it: the int32 bias add is ``_mm256_add_epi32`` in FBGEMM (wraps) and a plain C++
``int32_t +=`` in DNNLOWP and TFLite's reference kernels (undefined behaviour in C++, two's-complement wrap on the
compilers and CPUs they run on); refquant wraps. TFLite's ``x * (1 << left_shift)`` and the final ``acc +=
output_offset`` are int32 as well (wrap). FBGEMM's RequantizeFixedPoint works in int64 (no wrap) and clamps.

Paths and versions not modelled, or equal:

* FBGEMM's x86 ``RequantizeFixedPointAvx2`` (8-bit outputs) computes the same floor shift (adding 2^63 to use a
  logical shift, exact) but clamps only the LOW 32 BITS of the int64 result; it differs from eq. I4 (the scalar
  ``Requantize<T>``, modelled here) only when z_y + result leaves int32, i.e. for real multipliers > 1 on huge
  accumulators. Its scalar tail uses ``1ll << max(0, right_shift − 1)``.
* gemmlowp's RoundingDivideByPOT has been this formula since 2017 (commit 12c15b7, "Add proper RoundingDivideByPOT");
  the code before it (truncating division plus the bit below the cut) rounded the same way, ties away from zero.
* TFLite's MultiplyByQuantizedMultiplier lived in common.h (double rounding only; older releases split it into
  ...SmallerThanOneExp / ...GreaterThanOne, the same two roundings) and moved to common.cc with the
  TFLITE_SINGLE_ROUNDING branch; QuantizeMultiplier gained the shift > 30 saturation under that macro. The int64
  overload (16-bit activations, a 16-bit "reduced" multiplier) is not used by int8 FullyConnected and not modelled.
* TFLite's optimized kernels (ruy, NEON) are meant to equal the reference kernels; not checked here.

Matches: pytorch/FBGEMM include/fbgemm/QuantUtils.h (Quantize<T>, Requantize<T>, RequantizeFixedPoint),
src/QuantUtils.cc (ChooseRequantizationMultiplier, SaturatingRoundingMulWithShift), src/QuantUtilsAvx2.cc
(requantizeOutputProcessingAvx2, the int32-bias branch); pytorch/pytorch caffe2/quantization/server
(fully_connected_dnnlowp_op.cc: bias via fbgemm::Quantize<int32_t>); tensorflow/tensorflow
tensorflow/lite/kernels/internal/quantization_util.cc (QuantizeMultiplier), .../internal/common.cc and common.h
(MultiplyByQuantizedMultiplier, both TFLITE_SINGLE_ROUNDING branches), .../internal/reference/integer_ops/
fully_connected.h, tensorflow/lite/kernels/kernel_util.cc (PopulateConvolutionQuantizationParams: the real
multiplier in double), tensorflow/lite/tools/optimize/quantization_utils.cc (SymmetricPerChannelBiasQuantize),
tensorflow/compiler/mlir/quantization/common/ir/UniformSupport.h (UniformQuantizedValueConverter);
google/gemmlowp fixedpoint/fixedpoint.h (SaturatingRoundingDoublingHighMul, RoundingDivideByPOT).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np
from numba import njit

from . import engines as _engines_module  # the Requantizer seam (refquant.engines does not import this module)
from ._lanes import (add16_i32, cvtps2dq16, load16, max16_i32, min16_i32, mul16_f32,
                     multiply_by_quantized_multiplier_single_rounding16, rounding_divide_by_pot16,
                     saturating_rounding_doubling_high_mul16, saturating_rounding_mul_with_shift16, shl16_i32,
                     splat16_i32, store16_u8, to16_f32)

VARIANTS: tuple[str, ...] = ("fbgemm_fixed_point", "tflite", "tflite_single_rounding", "float_int32_bias")
"""The integer requantization variants, by the names issue 11 gives them."""

BIAS_RULES: tuple[str, ...] = ("fbgemm", "tflite_legacy", "tflite_mlir")
"""How a float bias becomes int32: eqs. I1a, I1b, I1c."""

DEFAULT_BIAS_RULE: dict[str, str] = {"fbgemm_fixed_point": "fbgemm", "tflite": "tflite_legacy",
                                     "tflite_single_rounding": "tflite_legacy", "float_int32_bias": "fbgemm"}

SHIFT_CONVENTION: dict[str, str | None] = {"fbgemm_fixed_point": "right", "tflite": "left",
                                           "tflite_single_rounding": "left", "float_int32_bias": None}
"""``requant_shift`` sign convention per variant: FBGEMM's ``right_shift`` (real = M·2^−s), TFLite's ``shift``
(positive = left: real = M·2^(shift − 31)); the float variant has no shift."""

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
_VARIANT_CODE = {name: i for i, name in enumerate(VARIANTS)}


# ----------------------------------------------------------------------------------------------------------------
# int32 wrap-around and the two roundings used by the bias rules
# ----------------------------------------------------------------------------------------------------------------

def wrap_int32(v: np.ndarray) -> np.ndarray:
    """int64 values -> int32 modulo 2^32 (two's complement), as an int32 add or multiply wraps on the machine."""
    return np.asarray(v, np.int64).astype(np.int32)  # astype truncates to the low 32 bits


def _round_half_away_from_zero(v_f64: np.ndarray) -> np.ndarray:
    """C's round() on doubles, exactly: floor(|v|) + (frac >= 0.5), with the sign put back. Both steps exact."""
    a = np.abs(v_f64)
    fl = np.floor(a)
    frac = a - fl  # exact (Sterbenz for |v| >= 1; fl = 0 below)
    return np.copysign(fl + (frac >= 0.5), v_f64)


# ----------------------------------------------------------------------------------------------------------------
# eq. I1: the int32 bias
# ----------------------------------------------------------------------------------------------------------------

def quantize_bias_fbgemm(bias_f32: np.ndarray, act_times_w_scale_f32: np.ndarray) -> np.ndarray:
    """float32 bias -> int32 as ``fbgemm::Quantize<int32_t>(bias, 0, s_x·s_w, 32)`` (eq. I1a)::

        inv = f32(1 / atws);  t = f32(bias · inv);  q = clamp(RNE(t), −2^31, 2^31 − 1)   (clamp in double)

    ``atws`` = f32(f32(s_x)·s_w[n]), the float product DNNLOWP passes (equal to torch's act_times_w_scale, eq. L6).
    NaN (only for 0·inf, when 1/atws overflows) converts to INT32_MIN, as x86's cvttsd2si does.

    Matches: pytorch/FBGEMM include/fbgemm/QuantUtils.h (Quantize<T>: ``1.0f / scale``, ``nearbyint``,
    ``clamp<double, T>``), called from pytorch/pytorch caffe2/quantization/server/fully_connected_dnnlowp_op.cc.
    """
    bias_f32 = np.asarray(bias_f32, np.float32)
    atws_f32 = np.asarray(act_times_w_scale_f32, np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        inv_scale_f32 = np.float32(1.0) / atws_f32                   # float inv_scale = 1.0f / scale
        transformed_f32 = (bias_f32 * inv_scale_f32).astype(np.float32)  # src * inv_scale, float32
        rounded_f32 = np.rint(transformed_f32)                        # nearbyint: half to even
        clamped_f64 = np.clip(rounded_f32.astype(np.float64), INT32_MIN, INT32_MAX)  # clamp<double, int32_t>
    nan = np.isnan(clamped_f64)
    return np.where(nan, INT32_MIN, np.where(nan, 0, clamped_f64).astype(np.int64)).astype(np.int32)


def quantize_bias_tflite(bias_f32: np.ndarray, input_scale: float, weight_scales_f32: np.ndarray) -> np.ndarray:
    """float32 bias -> int32 as TFLite's converter quantizes it (legacy quantizer, eq. I1b)::

        sf  = f32(f32(s_x)·s_w[n]);   inv = f32(1.0 / f64(sf))   (0 if sf == 0)
        q   = round_half_away(f32(bias · inv))    TfLiteRound = std::round
        q   = SafeCast<int32_t>(q)                NaN -> 0, beyond int32 -> INT32_MIN / INT32_MAX
        q   = clamp(q, −(2^31 − 1), 2^31 − 1)     symmetric: −INT32_MAX

    TF's Python converter quantizes with ``legacy_float_scale`` (reported for converter_python_api.cc; the bias
    scale is then float32), so constants go through QuantizeLegacy -> this rule.

    Matches: tensorflow/tensorflow tensorflow/lite/tools/optimize/quantization_utils.cc
    (SymmetricPerChannelBiasQuantize, SymmetricPerLayerBiasQuantize) and
    tensorflow/compiler/mlir/quantization/common/quantization_lib/quantization_utils.cc (QuantizeLegacy,
    GetUniformQuantizedTypeForBias with legacy_float_scale: scales cast to float).
    """
    bias_f32 = np.asarray(bias_f32, np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaling_factor_f32 = (np.float32(input_scale) * np.asarray(weight_scales_f32, np.float32)).astype(np.float32)
        inv_f64 = np.where(scaling_factor_f32 == 0, 0.0, 1.0 / scaling_factor_f32.astype(np.float64))
        scaling_factor_inv_f32 = inv_f64.astype(np.float32)          # float scaling_factor_inv = 1.0 / sf
        product_f32 = (bias_f32 * scaling_factor_inv_f32).astype(np.float32)
        rounded_f64 = _round_half_away_from_zero(product_f32.astype(np.float64))  # std::round(float), exact
    nan = np.isnan(rounded_f64)
    safe_f64 = np.clip(np.where(nan, 0.0, rounded_f64), INT32_MIN, INT32_MAX)     # SafeCast saturates
    return np.clip(safe_f64, -INT32_MAX, INT32_MAX).astype(np.int32)             # min(kScale, max(-kScale, q))


def quantize_bias_tflite_mlir(bias_f32: np.ndarray, input_scale: float, weight_scales_f32: np.ndarray) -> np.ndarray:
    """float32 bias -> int32 as TFLite's MLIR quantizer does without ``legacy_float_scale`` (eq. I1c)::

        scale = f64(f32(s_x))·f64(s_w[n])            (exact: two float32 in double)
        q     = clamp(round_half_away(f64(bias) / scale), −2^31, 2^31 − 1)    one double division

    Matches: tensorflow/tensorflow tensorflow/compiler/mlir/quantization/common/ir/UniformSupport.h
    (UniformQuantizedValueConverter::quantizeFloatToInt, rmNearestTiesToAway) with the bias scale of
    GetUniformQuantizedTypeForBias (a double product).
    """
    bias_f64 = np.asarray(bias_f32, np.float32).astype(np.float64)
    scale_f64 = np.float64(np.float32(input_scale)) * np.asarray(weight_scales_f32, np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        scaled_f64 = bias_f64 / scale_f64
    return np.clip(_round_half_away_from_zero(scaled_f64), INT32_MIN, INT32_MAX).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# eq. I2: the fixed-point multipliers
# ----------------------------------------------------------------------------------------------------------------

def choose_requantization_multiplier(real_multiplier: float) -> tuple[int, int]:
    """FBGEMM: float32 real multiplier -> (multiplier M, right_shift s) with real = M·2^−s (eq. I2a).

    The normalisation runs in float32 (multiplying by 2 is exact), so M = nearbyint(m·2^31) is exact too: M has the
    24 significant bits of the float32 multiplier, and M·2^−s equals it exactly. m == 1.0 gives M = 2^31, which is
    halved (M = 2^30, s − 1). Only the default ``requantization_multiplier_precision = 32`` is modelled (the start
    s = 31 assumes it).

    Refused (FBGEMM asserts or misbehaves): real <= 0, NaN or inf (inf loops forever); s < 1 (real >= 2^30:
    ``SaturatingRoundingMulWithShift`` would compute ``1ll << −1``); s > 63 (real < 2^−32; FBGEMM asserts s < 64).

    Matches: pytorch/FBGEMM src/QuantUtils.cc (ChooseRequantizationMultiplier).
    """
    if isinstance(real_multiplier, (bool, np.bool_)) or not isinstance(real_multiplier, numbers.Real):
        raise TypeError(f"real_multiplier must be a real number, got {type(real_multiplier).__name__}")
    m_f32 = np.float32(real_multiplier)  # the parameter is a float
    if not (np.isfinite(m_f32) and m_f32 > 0):
        raise ValueError(f"real_multiplier must be finite and > 0 as float32 (FBGEMM asserts != 0 and loops forever "
                         f"on inf), got {real_multiplier!r}")
    right_shift = 31
    while m_f32 < np.float32(0.5):
        m_f32 = np.float32(m_f32 * np.float32(2.0))
        right_shift += 1
    while m_f32 > np.float32(1.0):
        m_f32 = np.float32(m_f32 / np.float32(2.0))
        right_shift -= 1
    multiplier = int(np.rint(np.float32(m_f32 * np.float32(2.0**31))))  # nearbyint(float · 2^31): exact
    if multiplier == 2**31:  # the real multiplier was exactly 1.0 after normalisation
        multiplier //= 2
        right_shift -= 1
    if right_shift < 1:
        raise ValueError(f"real_multiplier {float(real_multiplier)!r} >= 2^30 gives right_shift {right_shift}: FBGEMM "
                         f"asserts right_shift >= 0 and its SaturatingRoundingMulWithShift shifts 1 by right_shift − 1")
    if right_shift > 63:
        raise ValueError(f"real_multiplier {float(real_multiplier)!r} < 2^-32 gives right_shift {right_shift}: FBGEMM "
                         f"asserts right_shift < 64")
    return multiplier, right_shift


def quantize_multiplier(double_multiplier: float, *, single_rounding: bool = False) -> tuple[int, int]:
    """TFLite: double real multiplier -> (quantized_multiplier M, shift) with real ≈ M·2^(shift − 31) (eq. I2b).

    ``frexp`` gives q in [0.5, 1) and the exponent; M = round_half_away(q·2^31) (``TfLiteRound``, exact: q·2^31 is
    a double with 22 fractional bits), M == 2^31 is halved (shift + 1); shift < −31 flushes to (0, 0).
    ``single_rounding=True`` adds newer TF's TFLITE_SINGLE_ROUNDING clamp: shift > 30 -> (2^31 − 1, 30). The shift is
    a LEFT shift (positive = left). TFLite returns shifts up to 1024 for huge multipliers without
    TFLITE_SINGLE_ROUNDING; :func:`integer_requantization` refuses those (``1 << shift`` overflows int for > 30).

    Refused: negative, NaN or inf (TFLite would make a negative multiplier its kernels DCHECK against, or run frexp on
    a non-finite value).

    Matches: tensorflow/tensorflow tensorflow/lite/kernels/internal/quantization_util.cc (QuantizeMultiplier).
    """
    if isinstance(double_multiplier, (bool, np.bool_)) or not isinstance(double_multiplier, numbers.Real):
        raise TypeError(f"double_multiplier must be a real number, got {type(double_multiplier).__name__}")
    d = float(double_multiplier)
    if not (math.isfinite(d) and d >= 0):
        raise ValueError(f"double_multiplier must be finite and >= 0, got {double_multiplier!r}")
    if d == 0.0:
        return 0, 0
    q, shift = math.frexp(d)  # d = q·2^shift, q in [0.5, 1)
    q_fixed = int(_round_half_away_from_zero(np.float64(q * 2.0**31)))  # q·2^31 is exact in double
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:  # "flush denormals to zero"
        shift = 0
        q_fixed = 0
    if single_rounding and shift > 30:  # newer TF, #if TFLITE_SINGLE_ROUNDING: saturate
        shift = 30
        q_fixed = 2**31 - 1
    return q_fixed, shift


# ----------------------------------------------------------------------------------------------------------------
# eqs. I4-I6: the fixed-point arithmetic, readable NumPy (int64, exact)
# ----------------------------------------------------------------------------------------------------------------

def saturating_rounding_mul_with_shift(a_i32: np.ndarray, b_i32: np.ndarray, right_shift: np.ndarray) -> np.ndarray:
    """FBGEMM: (a·b + 2^(right_shift − 1)) >> right_shift in int64: a·b·2^−s rounded half up (ties to +inf).

    Despite the name nothing saturates. The int64 sum overflows in one case only: a = b = INT32_MIN with s = 63,
    2^62 + 2^62 = 2^63, which wraps to −2^63 (NumPy's int64, and the two's-complement add C++ compiles to on x86,
    where the overflow is undefined behaviour), so the result is −1 there, not 1. Real multipliers never reach it
    (ChooseRequantizationMultiplier's are in [2^30, 2^31)).
    Matches: pytorch/FBGEMM src/QuantUtils.cc (SaturatingRoundingMulWithShift).
    """
    ab_i64 = np.asarray(a_i32, np.int64) * np.asarray(b_i32, np.int64)
    s_i64 = np.asarray(right_shift, np.int64)
    nudge_i64 = np.left_shift(np.int64(1), s_i64 - 1)
    return np.right_shift(ab_i64 + nudge_i64, s_i64)  # arithmetic shift: floor


def saturating_rounding_doubling_high_mul(a_i32: np.ndarray, b_i32: np.ndarray) -> np.ndarray:
    """gemmlowp: the high 32 bits of 2·a·b, rounded: floor(a·b / 2^31 + 1/2) (ties to +inf, also for negatives).

    nudge = 2^30 for a·b >= 0, 1 − 2^30 below; (a·b + nudge) / 2^31 with C++'s truncating division. The only overflow,
    INT32_MIN·INT32_MIN, saturates to INT32_MAX (as ARM's ``sqrdmulh``).
    Matches: google/gemmlowp fixedpoint/fixedpoint.h (SaturatingRoundingDoublingHighMul, int32 scalar).
    """
    a_i64 = np.asarray(a_i32, np.int64)
    b_i64 = np.asarray(b_i32, np.int64)
    overflow = (a_i64 == b_i64) & (a_i64 == INT32_MIN)
    ab_i64 = a_i64 * b_i64
    nudge_i64 = np.where(ab_i64 >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    v_i64 = ab_i64 + nudge_i64
    ab_x2_high32 = np.where(v_i64 >= 0, v_i64 >> 31, -((-v_i64) >> 31))  # division truncating towards zero
    return np.where(overflow, INT32_MAX, ab_x2_high32).astype(np.int32)


def rounding_divide_by_pot(x_i32: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp: x / 2^exponent rounded to nearest, ties away from zero (0 <= exponent <= 31, asserted upstream).

    mask = 2^e − 1; remainder = x & mask; threshold = (mask >> 1) + (x < 0); (x >> e) + (remainder > threshold).
    Matches: google/gemmlowp fixedpoint/fixedpoint.h (RoundingDivideByPOT).
    """
    x_i64 = np.asarray(x_i32, np.int64)
    e_i64 = np.asarray(exponent, np.int64)
    mask_i64 = np.left_shift(np.int64(1), e_i64) - 1
    remainder_i64 = x_i64 & mask_i64
    threshold_i64 = (mask_i64 >> 1) + (x_i64 < 0)
    return ((x_i64 >> e_i64) + (remainder_i64 > threshold_i64)).astype(np.int32)


def multiply_by_quantized_multiplier(x_i32: np.ndarray, quantized_multiplier_i32: np.ndarray,
                                     shift: np.ndarray) -> np.ndarray:
    """TFLite, default build: two roundings (eq. I5, middle lines)::

        left_shift = max(shift, 0); right_shift = max(−shift, 0)
        RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(wrap32(x·2^left_shift), M), right_shift)

    Matches: tensorflow/tensorflow tensorflow/lite/kernels/internal/common.cc (MultiplyByQuantizedMultiplier,
    int32 overload, #else branch of TFLITE_SINGLE_ROUNDING; in common.h in older TF).
    """
    shift_i64 = np.asarray(shift, np.int64)
    left_shift_i64 = np.maximum(shift_i64, 0)
    right_shift_i64 = np.maximum(-shift_i64, 0)
    x_shifted_i32 = wrap_int32(np.asarray(x_i32, np.int64) * np.left_shift(np.int64(1), left_shift_i64))
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x_shifted_i32, quantized_multiplier_i32),
                                  right_shift_i64)


def multiply_by_quantized_multiplier_single_rounding(x_i32: np.ndarray, quantized_multiplier_i32: np.ndarray,
                                                     shift: np.ndarray) -> np.ndarray:
    """TFLite with TFLITE_SINGLE_ROUNDING: one rounding, half up (eq. I6, first line)::

        total_shift = 31 − shift;  wrap32((x·M + 2^(total_shift − 1)) >> total_shift)      (−31 <= shift <= 30)

    The int64 result is cast to int32 (a DCHECK in debug builds; wraps in release).
    Matches: tensorflow/tensorflow tensorflow/lite/kernels/internal/common.cc (MultiplyByQuantizedMultiplier,
    int32 overload, #if TFLITE_SINGLE_ROUNDING).
    """
    total_shift_i64 = 31 - np.asarray(shift, np.int64)
    round_i64 = np.left_shift(np.int64(1), total_shift_i64 - 1)
    result_i64 = np.asarray(x_i32, np.int64) * np.asarray(quantized_multiplier_i32, np.int64) + round_i64
    return wrap_int32(np.right_shift(result_i64, total_shift_i64))


def _cvtps2dq(y_f32: np.ndarray) -> np.ndarray:
    """float32 -> int64 as x86's cvtps2dq: RNE; NaN and |y| >= 2^31 -> INT32_MIN (eq. L10)."""
    ok = (y_f32 >= np.float32(-(2.0**31))) & (y_f32 < np.float32(2.0**31))  # false for NaN
    return np.where(ok, np.rint(np.where(ok, y_f32, np.float32(0))).astype(np.int64), np.int64(INT32_MIN))


# ----------------------------------------------------------------------------------------------------------------
# The constants of one layer
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IntegerRequantization:
    """Everything a variant needs to requantize int32 ``raw`` (..., N) to output codes (eqs. I1-I7).

    Attributes:
        variant: one of :data:`VARIANTS`.
        bias_i32: (N,) int32, or None without bias; ``bias_rule`` says which of eqs. I1a-c made it.
        requant_multiplier_i32: (C,) int32 fixed-point multipliers (C = N per channel, 1 per tensor); None for
            "float_int32_bias".
        requant_shift: (C,) int32 in the source's convention (``shift_convention``): FBGEMM's right shift
            (real = M·2^−s), TFLite's left shift (real = M·2^(shift − 31)); None for "float_int32_bias".
        output_multiplier_f32: (C,) float32 torch multiplier f32(atws / f32(s_y)) (eq. L7); the float variant uses it,
            FBGEMM's fixed point is derived from it.
        real_multiplier: (C,) float64, the real multiplier the variant's rule started from (informative).
        output_zero_point, quant_min, quant_max: z_y and the clamp range (ReLU: quant_min = z_y).
    """

    variant: str
    bias_rule: str | None
    bias_i32: np.ndarray | None
    requant_multiplier_i32: np.ndarray | None
    requant_shift: np.ndarray | None
    output_multiplier_f32: np.ndarray
    real_multiplier: np.ndarray
    output_zero_point: int
    quant_min: int
    quant_max: int

    @property
    def shift_convention(self) -> str | None:
        """"right" (FBGEMM), "left" (TFLite) or None (float multiplier)."""
        return SHIFT_CONVENTION[self.variant]

    @property
    def per_channel(self) -> bool:
        return self.output_multiplier_f32.shape[0] > 1

    @property
    def output_dtype(self) -> type[np.integer]:
        """uint8 for a range inside [0, 255], int8 inside [−128, 127], else int32."""
        if 0 <= self.quant_min and self.quant_max <= 255:
            return np.uint8
        if -128 <= self.quant_min and self.quant_max <= 127:
            return np.int8
        return np.int32

    def replace(self, **changes: object) -> "IntegerRequantization":
        """A copy with some constants swapped (e.g. another bias), for studies that change one ingredient."""
        return dataclasses.replace(self, **changes)


def _check_scale(value: object, argname: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argname} must be a real number (a float scale), got {type(value).__name__} {value!r}")
    value = float(value)
    with np.errstate(over="ignore"):
        value_f32 = np.float32(value)
    if not (math.isfinite(value) and value > 0 and np.isfinite(value_f32) and value_f32 > 0):
        raise ValueError(f"{argname} must be a finite scale > 0 (also as float32), got {value!r}")
    return value


def integer_requantization(variant: str, input_scale: float, weight_scales: object, output_scale: float,
                           bias: object, output_zero_point: int, *, relu: bool = False, quant_min: int = 0,
                           quant_max: int = 255, bias_rule: str | None = None) -> IntegerRequantization:
    """The constants of ``variant`` for one quantized Linear (eqs. I1, I2).

    Args:
        variant: one of :data:`VARIANTS`.
        input_scale: s_x (the QuantStub's scale; used as f32(s_x), as torch and TFLite store it).
        weight_scales: float32 s_w, N values (per channel) or 1 (per tensor), as refquant's QuantizedLinear holds them.
        output_scale: s_y (used as f32(s_y)).
        bias: float32 (N,) or None.
        output_zero_point: z_y in [quant_min, quant_max].
        relu: clamp below at z_y (quant_min = z_y), as torch's linear_relu and TFLite's fused ReLU.
        quant_min, quant_max: the output range (0, 255 for torch's quint8; −128, 127 for TFLite int8).
        bias_rule: None for the variant's own rule (:data:`DEFAULT_BIAS_RULE`), or one of :data:`BIAS_RULES`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if bias_rule is None:
        bias_rule = DEFAULT_BIAS_RULE[variant]
    if bias_rule not in BIAS_RULES:
        raise ValueError(f"bias_rule must be None or one of {BIAS_RULES}, got {bias_rule!r}")
    s_x = _check_scale(input_scale, "input_scale")
    s_y = _check_scale(output_scale, "output_scale")
    w = np.asarray(weight_scales)
    if w.dtype.kind != "f" or w.ndim > 1 or w.size == 0:
        raise ValueError(f"weight_scales must be a non-empty 1-D float array (N per channel, or 1), got dtype {w.dtype}, "
                         f"shape {w.shape}")
    s_w_f32 = w.reshape(-1).astype(np.float32)
    if not (np.isfinite(s_w_f32).all() and (s_w_f32 > 0).all()):
        raise ValueError(f"weight_scales must be finite and > 0 as float32, got {s_w_f32}")
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max), ("output_zero_point", output_zero_point)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    quant_min, quant_max, output_zero_point = int(quant_min), int(quant_max), int(output_zero_point)
    if not INT32_MIN <= quant_min <= quant_max <= INT32_MAX:
        raise ValueError(f"need INT32_MIN <= quant_min <= quant_max <= INT32_MAX, got [{quant_min}, {quant_max}]")
    if not quant_min <= output_zero_point <= quant_max:
        raise ValueError(f"output_zero_point must lie in [{quant_min}, {quant_max}], got {output_zero_point}")
    bias_f32 = None
    if bias is not None:
        b = np.asarray(bias)
        if b.dtype.kind != "f" or b.ndim != 1 or (s_w_f32.size > 1 and b.shape[0] != s_w_f32.size):
            raise ValueError(f"bias must be None or a 1-D float32 array of length N = {s_w_f32.size}"
                             f"{'' if s_w_f32.size > 1 else ' (any N for per-tensor weights)'}, got dtype {b.dtype}, "
                             f"shape {b.shape}")
        bias_f32 = b.astype(np.float32)
        if not np.isfinite(bias_f32).all():
            raise ValueError(f"bias must be finite as float32, got {bias_f32[~np.isfinite(bias_f32)][:3]}")

    # eqs. L6, L7: torch's float32 constants (FBGEMM's fixed point and the float variant start from them)
    with np.errstate(over="ignore", under="ignore"):
        atws_f32 = (np.float32(s_x) * s_w_f32).astype(np.float32)
        output_multiplier_f32 = (atws_f32 / np.float32(s_y)).astype(np.float32)

    # eq. I1: the int32 bias
    bias_i32 = None
    if bias_f32 is not None:
        if bias_rule == "fbgemm":
            bias_i32 = quantize_bias_fbgemm(bias_f32, atws_f32)
        elif bias_rule == "tflite_legacy":
            bias_i32 = quantize_bias_tflite(bias_f32, s_x, s_w_f32)
        else:
            bias_i32 = quantize_bias_tflite_mlir(bias_f32, s_x, s_w_f32)

    # eq. I2: the fixed-point multipliers
    multiplier_i32 = shift_i32 = None
    if variant in ("fbgemm_fixed_point", "float_int32_bias"):
        real_multiplier = output_multiplier_f32.astype(np.float64)
    else:  # TFLite: double(input_scale) * double(filter_scale) / double(output_scale)
        real_multiplier = (np.float64(np.float32(s_x)) * s_w_f32.astype(np.float64)) / np.float64(np.float32(s_y))
    if variant == "fbgemm_fixed_point":
        pairs = []
        for c, m in enumerate(output_multiplier_f32):
            try:
                pairs.append(choose_requantization_multiplier(m))
            except ValueError as e:
                raise ValueError(f"channel {c}: {e}") from None
    elif variant in ("tflite", "tflite_single_rounding"):
        single = variant == "tflite_single_rounding"
        pairs = [quantize_multiplier(m, single_rounding=single) for m in real_multiplier]
        for c, (_, shift) in enumerate(pairs):
            if shift > 30:  # only possible without TFLITE_SINGLE_ROUNDING
                raise ValueError(f"channel {c}: real multiplier {real_multiplier[c]!r} >= 2^30 gives shift {shift}: "
                                 f"TFLite's double-rounding MultiplyByQuantizedMultiplier computes 1 << shift in int")
    if variant != "float_int32_bias":
        multiplier_i32 = np.array([p[0] for p in pairs], np.int32)
        shift_i32 = np.array([p[1] for p in pairs], np.int32)

    return IntegerRequantization(
        variant=variant, bias_rule=bias_rule if bias_i32 is not None else None, bias_i32=bias_i32,
        requant_multiplier_i32=multiplier_i32, requant_shift=shift_i32, output_multiplier_f32=output_multiplier_f32,
        real_multiplier=np.asarray(real_multiplier, np.float64), output_zero_point=output_zero_point,
        quant_min=output_zero_point if relu else quant_min, quant_max=quant_max)


def integer_requantization_of(linear: object, variant: str, *, bias_rule: str | None = None) -> IntegerRequantization:
    """:func:`integer_requantization` from a :class:`refquant.linear.QuantizedLinear` (its s_x, s_w, s_y, bias, z_y,
    ReLU), with torch's quint8 output range [0, 255]."""
    return integer_requantization(variant, linear.input_scale, linear.weight_scales, linear.output_scale, linear.bias,
                                  linear.output_zero_point, relu=linear.relu, bias_rule=bias_rule)


# ----------------------------------------------------------------------------------------------------------------
# Requantization (eqs. I3-I7): readable NumPy, then the Numba kernel
# ----------------------------------------------------------------------------------------------------------------

def _check_raw(raw_i32: object, rq: IntegerRequantization) -> np.ndarray:
    if not isinstance(raw_i32, np.ndarray) or raw_i32.dtype != np.int32:
        got = raw_i32.dtype if isinstance(raw_i32, np.ndarray) else type(raw_i32).__name__
        raise TypeError(f"raw_i32 must be a numpy int32 array of accumulators (eq. L5), got {got}")
    if raw_i32.ndim < 1:
        raise ValueError("raw_i32 must have at least one dimension (..., N)")
    n = raw_i32.shape[-1]
    for name, arr in (("bias_i32", rq.bias_i32), ("output_multiplier_f32", rq.output_multiplier_f32)):
        if arr is not None and arr.shape[0] not in ((n,) if name == "bias_i32" else (1, n)):
            raise ValueError(f"raw_i32 has N = {n} outputs but the constants' {name} has {arr.shape[0]}")
    return raw_i32


def requantize_integer_readable(raw_i32: np.ndarray, rq: IntegerRequantization) -> np.ndarray:
    """int32 ``raw`` (..., N) -> output codes (..., N) of ``rq.variant``, one NumPy statement per step (eqs. I3-I7)."""
    raw_i32 = _check_raw(raw_i32, rq)
    raw_i64 = raw_i32.astype(np.int64)
    bias_i64 = np.int64(0) if rq.bias_i32 is None else rq.bias_i32.astype(np.int64)
    acc_i32 = wrap_int32(raw_i64 + bias_i64)  # eq. I3: int32 add, wraps
    zp = np.int64(rq.output_zero_point)
    if rq.variant == "fbgemm_fixed_point":  # eq. I4 (Requantize<T>): int64, no wrap
        q_i64 = zp + saturating_rounding_mul_with_shift(acc_i32, rq.requant_multiplier_i32, rq.requant_shift)
    elif rq.variant == "tflite":  # eq. I5
        scaled_i32 = multiply_by_quantized_multiplier(acc_i32, rq.requant_multiplier_i32, rq.requant_shift)
        q_i64 = wrap_int32(scaled_i32.astype(np.int64) + zp).astype(np.int64)  # acc += output_offset (int32)
    elif rq.variant == "tflite_single_rounding":  # eq. I6
        scaled_i32 = multiply_by_quantized_multiplier_single_rounding(acc_i32, rq.requant_multiplier_i32,
                                                                      rq.requant_shift)
        q_i64 = wrap_int32(scaled_i32.astype(np.int64) + zp).astype(np.int64)
    else:  # "float_int32_bias", eq. I7: cvtdq2ps, one float32 multiply, cvtps2dq, saturating packs
        with np.errstate(over="ignore", invalid="ignore"):  # inf·0 -> NaN -> INT32_MIN, as cvtps2dq
            y_f32 = (acc_i32.astype(np.float32) * rq.output_multiplier_f32).astype(np.float32)
        q_i64 = _cvtps2dq(y_f32) + zp
    return np.clip(q_i64, rq.quant_min, rq.quant_max).astype(rq.output_dtype)


# Per-element steps for Numba kernels. Each is exactly its NumPy namesake above, on int64 scalars holding int32
# values (so a fused matmul epilogue can call them); inline="always" puts them into the caller's loop.

@njit(cache=True, inline="always")
def wrap_int32_scalar(v):
    """int64 -> the int32 value it wraps to, kept in an int64 (see :func:`wrap_int32`)."""
    return ((np.int64(v) + np.int64(2147483648)) & np.int64(0xFFFFFFFF)) - np.int64(2147483648)


@njit(cache=True, inline="always")
def saturating_rounding_mul_with_shift_scalar(a, b, right_shift):
    """:func:`saturating_rounding_mul_with_shift` on scalars."""
    ab = np.int64(a) * np.int64(b)
    nudge = np.int64(1) << (np.int64(right_shift) - np.int64(1))
    return (ab + nudge) >> np.int64(right_shift)


@njit(cache=True, inline="always")
def saturating_rounding_doubling_high_mul_scalar(a, b):
    """:func:`saturating_rounding_doubling_high_mul` on scalars."""
    a = np.int64(a)
    b = np.int64(b)
    if a == b and a == np.int64(-2147483648):
        return np.int64(2147483647)
    ab = a * b
    nudge = np.int64(1 << 30) if ab >= 0 else np.int64(1 - (1 << 30))
    v = ab + nudge
    return v >> np.int64(31) if v >= 0 else -((-v) >> np.int64(31))  # truncating division by 2^31


@njit(cache=True, inline="always")
def rounding_divide_by_pot_scalar(x, exponent):
    """:func:`rounding_divide_by_pot` on scalars."""
    x = np.int64(x)
    e = np.int64(exponent)
    mask = (np.int64(1) << e) - np.int64(1)
    remainder = x & mask
    threshold = (mask >> np.int64(1)) + (np.int64(1) if x < 0 else np.int64(0))
    return (x >> e) + (np.int64(1) if remainder > threshold else np.int64(0))


@njit(cache=True, inline="always")
def multiply_by_quantized_multiplier_scalar(x, quantized_multiplier, shift):
    """:func:`multiply_by_quantized_multiplier` on scalars (TFLite, two roundings)."""
    shift = np.int64(shift)
    left_shift = shift if shift > 0 else np.int64(0)
    right_shift = -shift if shift < 0 else np.int64(0)
    x_shifted = wrap_int32_scalar(np.int64(x) * (np.int64(1) << left_shift))
    return rounding_divide_by_pot_scalar(saturating_rounding_doubling_high_mul_scalar(x_shifted, quantized_multiplier),
                                         right_shift)


@njit(cache=True, inline="always")
def multiply_by_quantized_multiplier_single_rounding_scalar(x, quantized_multiplier, shift):
    """:func:`multiply_by_quantized_multiplier_single_rounding` on scalars."""
    total_shift = np.int64(31) - np.int64(shift)
    rnd = np.int64(1) << (total_shift - np.int64(1))
    result = np.int64(x) * np.int64(quantized_multiplier) + rnd
    return wrap_int32_scalar(result >> total_shift)


@njit(cache=True, inline="always")
def _clamp_scalar(q, quant_min, quant_max):
    if q < quant_min:
        return np.int64(quant_min)
    if q > quant_max:
        return np.int64(quant_max)
    return np.int64(q)


@njit(cache=True, inline="always")
def requantize_fbgemm_fixed_point_scalar(raw, bias, multiplier, right_shift, zero_point, quant_min, quant_max):
    """One output of "fbgemm_fixed_point" (eqs. I3, I4) from one int32 raw and the channel's constants."""
    acc = wrap_int32_scalar(np.int64(raw) + np.int64(bias))
    q = np.int64(zero_point) + saturating_rounding_mul_with_shift_scalar(acc, multiplier, right_shift)
    return _clamp_scalar(q, quant_min, quant_max)


@njit(cache=True, inline="always")
def requantize_tflite_scalar(raw, bias, multiplier, shift, zero_point, quant_min, quant_max):
    """One output of "tflite" (eqs. I3, I5)."""
    acc = wrap_int32_scalar(np.int64(raw) + np.int64(bias))
    q = wrap_int32_scalar(multiply_by_quantized_multiplier_scalar(acc, multiplier, shift) + np.int64(zero_point))
    return _clamp_scalar(q, quant_min, quant_max)


@njit(cache=True, inline="always")
def requantize_tflite_single_rounding_scalar(raw, bias, multiplier, shift, zero_point, quant_min, quant_max):
    """One output of "tflite_single_rounding" (eqs. I3, I6)."""
    acc = wrap_int32_scalar(np.int64(raw) + np.int64(bias))
    q = wrap_int32_scalar(multiply_by_quantized_multiplier_single_rounding_scalar(acc, multiplier, shift)
                          + np.int64(zero_point))
    return _clamp_scalar(q, quant_min, quant_max)


@njit(cache=True, inline="always")
def requantize_float_int32_bias_scalar(raw, bias, output_multiplier_f32, zero_point, quant_min, quant_max):
    """One output of "float_int32_bias" (eqs. I3, I7): cvtdq2ps, f32 multiply, cvtps2dq (INT32_MIN out of range)."""
    acc = wrap_int32_scalar(np.int64(raw) + np.int64(bias))
    y_f32 = np.float32(np.float32(acc) * np.float32(output_multiplier_f32))
    if y_f32 >= np.float32(-2147483648.0) and y_f32 < np.float32(2147483648.0):  # false for NaN
        r = np.int64(np.rint(y_f32))
    else:
        r = np.int64(-2147483648)
    return _clamp_scalar(r + np.int64(zero_point), quant_min, quant_max)


@njit(cache=True)
def _requantize_integer_kernel(raw_i32, variant_code, bias_i32, multiplier_i32, shift_i32, output_multiplier_f32,
                               zero_point, quant_min, quant_max, out):
    """(M, N) int32 raw -> (M, N) codes: the per-element function of the variant over every output."""
    per_channel = output_multiplier_f32.shape[0] > 1
    for m in range(raw_i32.shape[0]):
        for n in range(raw_i32.shape[1]):
            c = n if per_channel else 0
            raw = raw_i32[m, n]
            b = bias_i32[n]
            if variant_code == 0:
                q = requantize_fbgemm_fixed_point_scalar(raw, b, multiplier_i32[c], shift_i32[c], zero_point,
                                                         quant_min, quant_max)
            elif variant_code == 1:
                q = requantize_tflite_scalar(raw, b, multiplier_i32[c], shift_i32[c], zero_point, quant_min, quant_max)
            elif variant_code == 2:
                q = requantize_tflite_single_rounding_scalar(raw, b, multiplier_i32[c], shift_i32[c], zero_point,
                                                             quant_min, quant_max)
            else:
                q = requantize_float_int32_bias_scalar(raw, b, output_multiplier_f32[c], zero_point, quant_min,
                                                       quant_max)
            out[m, n] = q


# The variants' per-element functions with channel n's constants from IntegerRequantizer.epilogue_constants() =
# (channel_i32, output_multiplier_f32, zero_point, quant_min, quant_max): channel_i32 is (CHANNEL_ROWS, N) int32,
# one row per per-channel constant (:func:`epilogue_channel_constants`; one array, not seven, because the fused
# call unboxes each array it is passed, ~0.4 us apiece at batch 1), output_multiplier_f32 (N,) float32. These are
# the epilogues of refquant.fused_linear, one per variant (a compile-time choice there).

BIAS, MULTIPLIER, SHIFT, LEFT_SHIFT, RIGHT_SHIFT, REMAINDER_MASK, HALF_MASK = range(7)
CHANNEL_ROWS = 7
"""The rows of the epilogue's channel_i32: bias_i32, requant_multiplier_i32, requant_shift, and TFLite's shift
split once per layer as :func:`multiply_by_quantized_multiplier` splits it (left_shift = max(shift, 0), right_shift
= max(−shift, 0)) with RoundingDivideByPOT's mask = 2^right_shift − 1 and mask >> 1 (zeros for the other variants,
whose rows do not use them)."""


def epilogue_channel_constants(bias_i32: np.ndarray, multiplier_i32: np.ndarray, shift_i32: np.ndarray,
                               shift_convention: str | None) -> np.ndarray:
    """(CHANNEL_ROWS, N) int32 C-contiguous: the rows named by :data:`CHANNEL_ROWS` (multiplier and shift (N,) each,
    zeros for the float variant)."""
    shift_i64 = np.asarray(shift_i32, np.int64)
    tflite = shift_i64 if shift_convention == "left" else np.zeros_like(shift_i64)
    left_shift = np.maximum(tflite, 0)
    right_shift = np.maximum(-tflite, 0)
    remainder_mask = (np.int64(1) << right_shift) - 1
    rows = (bias_i32, multiplier_i32, shift_i32, left_shift, right_shift, remainder_mask, remainder_mask >> 1)
    return np.ascontiguousarray(np.stack([np.asarray(r, np.int64) for r in rows]).astype(np.int32))


@njit(cache=True, inline="always")
def requantize_fbgemm_fixed_point_channel(raw_i32, n, constants):
    channel_i32, _, zero_point, quant_min, quant_max = constants
    return np.uint8(requantize_fbgemm_fixed_point_scalar(raw_i32, channel_i32[BIAS, n], channel_i32[MULTIPLIER, n],
                                                         channel_i32[SHIFT, n], zero_point, quant_min, quant_max))


@njit(cache=True, inline="always")
def requantize_tflite_channel(raw_i32, n, constants):
    channel_i32, _, zero_point, quant_min, quant_max = constants
    return np.uint8(requantize_tflite_scalar(raw_i32, channel_i32[BIAS, n], channel_i32[MULTIPLIER, n],
                                             channel_i32[SHIFT, n], zero_point, quant_min, quant_max))


@njit(cache=True, inline="always")
def requantize_tflite_single_rounding_channel(raw_i32, n, constants):
    channel_i32, _, zero_point, quant_min, quant_max = constants
    return np.uint8(requantize_tflite_single_rounding_scalar(raw_i32, channel_i32[BIAS, n],
                                                             channel_i32[MULTIPLIER, n], channel_i32[SHIFT, n],
                                                             zero_point, quant_min, quant_max))


@njit(cache=True, inline="always")
def requantize_float_int32_bias_channel(raw_i32, n, constants):
    channel_i32, output_multiplier_f32, zero_point, quant_min, quant_max = constants
    return np.uint8(requantize_float_int32_bias_scalar(raw_i32, channel_i32[BIAS, n], output_multiplier_f32[n],
                                                       zero_point, quant_min, quant_max))


# The same per-element functions on 16 outputs at once (refquant._lanes: int32 lanes, the 64-bit products on even
# and odd lanes apart), the row functions of refquant.fused_linear: out_u8[m, n0 + c] = the channel function's code
# of raw_i32[offset + c] for c < n_valid. Their domain is what the variants' constants can hold: uint8 codes
# (0 <= quant_min <= zero_point <= quant_max <= 255), TFLite's −31 <= shift <= 30, FBGEMM's 1 <= right_shift <= 63;
# any int32 raw, bias and multiplier. tests/test_vector_epilogue.py proves each equal to its channel function.

@njit(cache=True, inline="always")
def _clamp16(q, quant_min, quant_max):
    """_clamp_scalar on 16 lanes (quant_min <= quant_max): min(max(q, quant_min), quant_max)."""
    return min16_i32(max16_i32(q, quant_min), quant_max)


@njit(cache=True, inline="always")
def requantize_fbgemm_fixed_point_row(raw_i32, offset, n_valid, n0, constants, out_u8, m):
    """:func:`requantize_fbgemm_fixed_point_channel` on 16 outputs at once (eqs. I3, I4): the int32 bias add
    (``vpaddd``, wraps), :func:`refquant._lanes.saturating_rounding_mul_with_shift16` (exact int64 on even and odd
    lanes, saturated to [−2^29, 2^29]), then z_y + that in int32 (no wrap: |z_y| <= 255), clamped. With
    0 <= quant_min <= z_y <= quant_max <= 255, a value beyond ±2^29 gives quant_min or quant_max in the scalar's
    int64 sum as well.

    Matches: pytorch/FBGEMM include/fbgemm/QuantUtils.h (Requantize<T>, RequantizeFixedPoint)."""
    channel_i32, _, zero_point, quant_min, quant_max = constants
    N = channel_i32.shape[1]
    zp = splat16_i32(zero_point)
    qmin = splat16_i32(quant_min)
    qmax = splat16_i32(quant_max)
    out_offset = m * out_u8.shape[1] + n0
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        n = n0 + c
        acc = add16_i32(load16(raw_i32, offset + c, lanes), load16(channel_i32, BIAS * N + n, lanes))  # eq. I3
        r = saturating_rounding_mul_with_shift16(acc, load16(channel_i32, MULTIPLIER * N + n, lanes),
                                                 load16(channel_i32, SHIFT * N + n, lanes))
        q = _clamp16(add16_i32(r, zp), qmin, qmax)  # eq. I4
        store16_u8(out_u8, out_offset + c, q, lanes)


@njit(cache=True, inline="always")
def requantize_tflite_row(raw_i32, offset, n_valid, n0, constants, out_u8, m):
    """:func:`requantize_tflite_channel` on 16 outputs at once (eqs. I3, I5), in int32 lanes, step by step as
    :func:`multiply_by_quantized_multiplier_scalar`, with the channel's shift split once per layer
    (rows LEFT_SHIFT, RIGHT_SHIFT, REMAINDER_MASK, HALF_MASK of :data:`CHANNEL_ROWS`)::

        acc = raw + bias                                  vpaddd (wraps, as wrap32)
        x   = acc · 2^left_shift                          vpsllvd (the low 32 bits: wrap32)
        h   = SaturatingRoundingDoublingHighMul(x, M)     refquant._lanes.saturating_rounding_doubling_high_mul16
        r   = RoundingDivideByPOT(h, right_shift)         refquant._lanes.rounding_divide_by_pot16
        q   = clamp(r + z_y, quant_min, quant_max)        vpaddd (wraps), vpmaxsd, vpminsd

    Matches: google/gemmlowp fixedpoint/fixedpoint.h (SaturatingRoundingDoublingHighMul, RoundingDivideByPOT);
    tensorflow/tensorflow tensorflow/lite/kernels/internal/common.h (MultiplyByQuantizedMultiplier) and
    .../reference/integer_ops/fully_connected.h (the bias add, output offset and clamp)."""
    channel_i32, _, zero_point, quant_min, quant_max = constants
    N = channel_i32.shape[1]
    zp = splat16_i32(zero_point)
    qmin = splat16_i32(quant_min)
    qmax = splat16_i32(quant_max)
    out_offset = m * out_u8.shape[1] + n0
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        n = n0 + c
        acc = add16_i32(load16(raw_i32, offset + c, lanes), load16(channel_i32, BIAS * N + n, lanes))  # eq. I3
        x = shl16_i32(acc, load16(channel_i32, LEFT_SHIFT * N + n, lanes))
        high = saturating_rounding_doubling_high_mul16(x, load16(channel_i32, MULTIPLIER * N + n, lanes))
        r = rounding_divide_by_pot16(high, load16(channel_i32, RIGHT_SHIFT * N + n, lanes),
                                     load16(channel_i32, REMAINDER_MASK * N + n, lanes),
                                     load16(channel_i32, HALF_MASK * N + n, lanes))
        q = _clamp16(add16_i32(r, zp), qmin, qmax)  # eq. I5
        store16_u8(out_u8, out_offset + c, q, lanes)


@njit(cache=True, inline="always")
def requantize_tflite_single_rounding_row(raw_i32, offset, n_valid, n0, constants, out_u8, m):
    """:func:`requantize_tflite_single_rounding_channel` on 16 outputs at once (eqs. I3, I6): the int32 bias add,
    :func:`refquant._lanes.multiply_by_quantized_multiplier_single_rounding16` (exact int64 on even and odd lanes,
    wrapped to int32 as the scalar's wrap32), z_y added in int32 (wraps), clamped.

    Matches: tensorflow/tensorflow tensorflow/lite/kernels/internal/common.cc (MultiplyByQuantizedMultiplier,
    #if TFLITE_SINGLE_ROUNDING)."""
    channel_i32, _, zero_point, quant_min, quant_max = constants
    N = channel_i32.shape[1]
    zp = splat16_i32(zero_point)
    qmin = splat16_i32(quant_min)
    qmax = splat16_i32(quant_max)
    out_offset = m * out_u8.shape[1] + n0
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        n = n0 + c
        acc = add16_i32(load16(raw_i32, offset + c, lanes), load16(channel_i32, BIAS * N + n, lanes))  # eq. I3
        r = multiply_by_quantized_multiplier_single_rounding16(acc, load16(channel_i32, MULTIPLIER * N + n, lanes),
                                                               load16(channel_i32, SHIFT * N + n, lanes))
        q = _clamp16(add16_i32(r, zp), qmin, qmax)  # eq. I6
        store16_u8(out_u8, out_offset + c, q, lanes)


@njit(cache=True, inline="always")
def requantize_float_int32_bias_row(raw_i32, offset, n_valid, n0, constants, out_u8, m):
    """:func:`requantize_float_int32_bias_channel` on 16 outputs at once (eqs. I3, I7): the int32 bias add
    (``vpaddd``), ``vcvtdq2ps``, one ``vmulps`` by the float32 multiplier (RNE, never contracted), cvtps2dq
    (refquant._lanes.cvtps2dq16: INT32_MIN out of range), then z_y added and clamped. As in
    refquant.engines.fbgemm_requantize_row, the int32 result is first clamped to [−256, 511], which changes no code
    (0 <= quant_min <= z_y <= quant_max <= 255) and keeps the int32 add of z_y from wrapping.

    Matches: pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeOutputProcessingAvx2, BIAS_TYPE = int32_t)."""
    channel_i32, output_multiplier_f32, zero_point, quant_min, quant_max = constants
    N = channel_i32.shape[1]
    zp = splat16_i32(zero_point)
    qmin = splat16_i32(quant_min)
    qmax = splat16_i32(quant_max)
    low = splat16_i32(-256)
    high = splat16_i32(511)
    out_offset = m * out_u8.shape[1] + n0
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        n = n0 + c
        acc = add16_i32(load16(raw_i32, offset + c, lanes), load16(channel_i32, BIAS * N + n, lanes))  # eq. I3
        y = mul16_f32(to16_f32(acc), load16(output_multiplier_f32, n, lanes))
        r = _clamp16(cvtps2dq16(y), low, high)
        q = _clamp16(add16_i32(r, zp), qmin, qmax)  # eq. I7
        store16_u8(out_u8, out_offset + c, q, lanes)


ROW_FUNCTIONS = {"fbgemm_fixed_point": requantize_fbgemm_fixed_point_row, "tflite": requantize_tflite_row,
                 "tflite_single_rounding": requantize_tflite_single_rounding_row,
                 "float_int32_bias": requantize_float_int32_bias_row}
"""Each variant's 16-lane row function (refquant.fused_linear's optional ``requantize_row_fn``)."""

EPILOGUE_FUNCTIONS = {"fbgemm_fixed_point": requantize_fbgemm_fixed_point_channel,
                      "tflite": requantize_tflite_channel,
                      "tflite_single_rounding": requantize_tflite_single_rounding_channel,
                      "float_int32_bias": requantize_float_int32_bias_channel}
"""Each variant's epilogue function for refquant.fused_linear (registered there as "integer_<variant>")."""


def requantize_integer(raw_i32: np.ndarray, rq: IntegerRequantization) -> np.ndarray:
    """Same result as :func:`requantize_integer_readable`, computed by the Numba kernel (one thread)."""
    raw_i32 = _check_raw(raw_i32, rq)
    shape = raw_i32.shape
    raw_2d = np.ascontiguousarray(raw_i32.reshape(-1, shape[-1]))
    n = shape[-1]
    bias = rq.bias_i32 if rq.bias_i32 is not None else np.zeros(n, np.int32)
    mult = rq.requant_multiplier_i32 if rq.requant_multiplier_i32 is not None else np.zeros(1, np.int32)
    shift = rq.requant_shift if rq.requant_shift is not None else np.zeros(1, np.int32)
    out = np.empty(raw_2d.shape, rq.output_dtype)
    _requantize_integer_kernel(raw_2d, _VARIANT_CODE[rq.variant], bias, mult, shift, rq.output_multiplier_f32,
                               np.int64(rq.output_zero_point), np.int64(rq.quant_min), np.int64(rq.quant_max), out)
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# The variants as requantizations of refquant.linear.QuantizedLinear (``requantization=<variant>``)
# ----------------------------------------------------------------------------------------------------------------

BIAS_RULE_DEFINITIONS: dict[str, str] = {
    "fbgemm": "eq. I1a: clamp(RNE(f32(bias·f32(1/atws))), −2^31, 2^31 − 1), atws = f32(f32(s_x)·s_w[n]); NaN -> "
              "INT32_MIN. Matches: pytorch/FBGEMM include/fbgemm/QuantUtils.h (Quantize<int32_t>(bias, 0, atws, 32)), "
              "as pytorch/pytorch caffe2/quantization/server/fully_connected_dnnlowp_op.cc calls it",
    "tflite_legacy": "eq. I1b: clamp(round_half_away(f32(bias·f32(1/f64(f32(f32(s_x)·s_w[n]))))), −(2^31 − 1), "
                     "2^31 − 1). Matches: tensorflow/tensorflow tensorflow/lite/tools/optimize/quantization_utils.cc "
                     "(SymmetricPerChannelBiasQuantize), reached through QuantizeLegacy (legacy_float_scale)",
    "tflite_mlir": "eq. I1c: clamp(round_half_away(f64(bias) / (f64(f32(s_x))·f64(s_w[n]))), −2^31, 2^31 − 1). "
                   "Matches: tensorflow/tensorflow tensorflow/compiler/mlir/quantization/common/ir/UniformSupport.h "
                   "(UniformQuantizedValueConverter)",
}
"""What each bias rule (:data:`BIAS_RULES`) computes, and the source it mirrors."""

MULTIPLIER_RULE: dict[str, str] = {"fbgemm_fixed_point": "fbgemm_choose_requantization_multiplier",
                                   "tflite": "tflite_quantize_multiplier",
                                   "tflite_single_rounding": "tflite_quantize_multiplier_single_rounding",
                                   "float_int32_bias": "torch_float32_multiplier"}
"""The rule that produced each variant's multiplier."""

MULTIPLIER_RULE_DEFINITIONS: dict[str, str] = {
    "fbgemm_choose_requantization_multiplier":
        "eq. I2a: (M, s) from real = mult[n] = f32(atws[n] / f32(s_y)) (float32): normalise into [1/2, 1] by ×2 / ÷2 "
        "in float32, M = nearbyint(m·2^31), M = 2^31 -> (2^30, s − 1); real = M·2^−s exactly. Matches: "
        "pytorch/FBGEMM src/QuantUtils.cc (ChooseRequantizationMultiplier)",
    "tflite_quantize_multiplier":
        "eq. I2b: (M, shift) from real = f64(f32(s_x))·f64(s_w[n]) / f64(f32(s_y)): (q, e) = frexp(real), "
        "M = round_half_away(q·2^31), M = 2^31 -> (2^30, e + 1), e < −31 -> (0, 0). Matches: tensorflow/tensorflow "
        "tensorflow/lite/kernels/internal/quantization_util.cc (QuantizeMultiplier), "
        "tensorflow/lite/kernels/kernel_util.cc (PopulateConvolutionQuantizationParams)",
    "tflite_quantize_multiplier_single_rounding":
        "eq. I2b with TFLITE_SINGLE_ROUNDING: as tflite_quantize_multiplier, and shift > 30 -> (2^31 − 1, 30). "
        "Matches: tensorflow/tensorflow tensorflow/lite/kernels/internal/quantization_util.cc (QuantizeMultiplier)",
    "torch_float32_multiplier":
        "eq. L7: mult[n] = f32(f32(f32(s_x)·s_w[n]) / f32(s_y)), kept as a float32 (no fixed point). Matches: "
        "pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeOutputProcessingAvx2, BIAS_TYPE = int32_t)",
}
"""What each multiplier rule computes, and the source it mirrors."""

SHIFT_CONVENTION_DEFINITIONS: dict[str, str] = {
    "right": "FBGEMM's right_shift: a RIGHT shift, real = M·2^−s, 1 <= s <= 63 (pytorch/FBGEMM "
             "include/fbgemm/QuantUtils.h RequantizationParams::right_shift)",
    "left": "TFLite's shift: positive = LEFT, real ≈ M·2^(shift − 31), −31 <= shift <= 30 (tensorflow/tensorflow "
            "tensorflow/lite/kernels/internal/common.cc MultiplyByQuantizedMultiplier)",
}
"""The two sign conventions of ``requant_shift``."""


@dataclass(frozen=True, eq=False)
class IntegerRequantizer(_engines_module.Requantizer):
    """A variant of :data:`VARIANTS` as the requantizer of a :class:`refquant.linear.QuantizedLinear`
    (``requantization=variant``): eqs. I1-I7 on the layer's int32 ``raw`` (eq. L5).

    Per output channel n (per-tensor constants repeated N times): ``bias_i32`` (N,) int32 (zeros without a bias,
    ``bias_rule`` None), ``requant_multiplier_i32`` (N,) int32 and ``requant_shift`` (N,) int32 in the convention
    ``shift_convention`` ("right": FBGEMM, "left": TFLite; both None for "float_int32_bias"), ``output_multiplier``
    (N,) float32 (torch's eq. L7; the multiplier of "float_int32_bias"), ``real_multiplier`` (N,) float64 (what
    the multiplier rule started from), ``output_zero_point``, ``quant_min`` (z_y with ReLU), ``quant_max``.
    ``bias_rule`` / ``multiplier_rule`` name the rules that produced the constants; ``*_definition`` give each
    rule's formula and the source it mirrors. ``constants`` is the :class:`IntegerRequantization` itself.

    The variants are no torch engine's arithmetic: they take only s_x, s_w (float32), s_y, the float32 bias, z_y and
    ``raw``, which every engine computes alike, so they are registered on every engine; the engine still decides
    the weight packing's refusals (onednn: symmetric weights only) and the input rank rules.
    """

    variant: str
    constants: IntegerRequantization
    bias_i32: np.ndarray
    requant_multiplier_i32: np.ndarray | None
    requant_shift: np.ndarray | None
    output_multiplier: np.ndarray
    real_multiplier: np.ndarray
    bias_rule: str | None
    multiplier_rule: str
    shift_convention: str | None
    output_zero_point: int
    quant_min: int
    quant_max: int
    _epilogue_constants: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        # built once: a layer's call passes the same tuple each time (refquant.fused_linear keys its compiled
        # kernel on the tuple's identity, and new arrays per call cost ~2 us at batch 1)
        n = len(self.bias_i32)
        zeros_i32 = np.zeros(n, np.int32)
        mult = zeros_i32 if self.requant_multiplier_i32 is None else self.requant_multiplier_i32
        shift = zeros_i32 if self.requant_shift is None else self.requant_shift
        object.__setattr__(self, "_epilogue_constants", (
            epilogue_channel_constants(self.bias_i32, mult, shift, self.shift_convention), self.output_multiplier,
            np.int64(self.output_zero_point), np.int64(self.quant_min), np.int64(self.quant_max)))

    @property
    def name(self) -> str:  # type: ignore[override]  (the scheme's name is the variant)
        return self.variant

    @property
    def bias_rule_definition(self) -> str | None:
        return None if self.bias_rule is None else BIAS_RULE_DEFINITIONS[self.bias_rule]

    @property
    def multiplier_rule_definition(self) -> str:
        return MULTIPLIER_RULE_DEFINITIONS[self.multiplier_rule]

    @property
    def shift_convention_definition(self) -> str | None:
        return None if self.shift_convention is None else SHIFT_CONVENTION_DEFINITIONS[self.shift_convention]

    @classmethod
    def build(cls, variant: str, params, prepacked: object = None, options: object = None,
              *, bias_rule: str | None = None) -> "IntegerRequantizer":
        """The constants of ``variant`` (eqs. I1, I2) for a layer's :class:`refquant.engines.LinearQParams`,
        with torch's quint8 output range [0, 255]."""
        try:
            rq = integer_requantization(variant, params.input_scale, params.weight_scales, params.output_scale,
                                        params.bias, params.output_zero_point, relu=params.relu, bias_rule=bias_rule)
        except ValueError as e:
            raise ValueError(f"requantization={variant!r} cannot represent this layer: {e}") from None
        return cls.from_constants(rq, params.out_features)

    @classmethod
    def from_constants(cls, rq: IntegerRequantization, out_features: int) -> "IntegerRequantizer":
        """The requantizer of the constants ``rq`` for a layer with ``out_features`` outputs."""
        n = int(out_features)

        def per_n(a, dtype):
            return None if a is None else np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype), (n,)))

        bias_i32 = np.zeros(n, np.int32) if rq.bias_i32 is None else per_n(rq.bias_i32, np.int32)
        return cls(rq.variant, rq, bias_i32, per_n(rq.requant_multiplier_i32, np.int32),
                   per_n(rq.requant_shift, np.int32), per_n(rq.output_multiplier_f32, np.float32),
                   per_n(rq.real_multiplier, np.float64), rq.bias_rule, MULTIPLIER_RULE[rq.variant],
                   rq.shift_convention, rq.output_zero_point, rq.quant_min, rq.quant_max)

    def _readable(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        return requantize_integer_readable(raw_2d_i32, self.constants)

    def _fast(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        return requantize_integer(raw_2d_i32, self.constants)

    @property
    def epilogue(self) -> str | None:  # type: ignore[override]
        """"integer_<variant>" (refquant.fused_linear) for uint8 outputs; None for other output ranges."""
        return f"integer_{self.variant}" if self.constants.output_dtype == np.uint8 else None

    def epilogue_constants(self) -> tuple:
        return self._epilogue_constants


def _builder(variant: str):
    def build(params, prepacked=None, options=None) -> IntegerRequantizer:
        return IntegerRequantizer.build(variant, params, prepacked, options)

    build.__name__ = build.__qualname__ = f"build_{variant}"
    build.__doc__ = f"IntegerRequantizer.build({variant!r}, ...)"
    return build


for _variant in VARIANTS:
    _engines_module.register_requantization(_variant, _builder(_variant), _engines_module.ENGINES)
del _variant


# ----------------------------------------------------------------------------------------------------------------
# Where a variant's codes leave torch's float path, and why
# ----------------------------------------------------------------------------------------------------------------

CAUSES: tuple[str, ...] = ("bias_i32", "exact_rounding", "q31_multiplier", "second_rounding")
"""The ingredients a variant changes, in the order :func:`compare_with_float_path` changes them:

    bias_i32         the bias rounded to int32 by the variant's rule and added in int32; float32 multiply kept
                     (= "float_int32_bias" with that bias, eq. I7)
    exact_rounding   acc·mult rounded ONCE, exactly, half up, instead of f32(f32(acc)·mult) then RNE
                     (= "fbgemm_fixed_point": FBGEMM's fixed point carries mult exactly, eq. I4)
    q31_multiplier   TFLite's Q31 multiplier of the double real multiplier instead of the float32 one
                     (= "tflite_single_rounding", eq. I6)
    second_rounding  TFLite's two roundings, SRDHM then RoundingDivideByPOT (= "tflite", eq. I5)
"""

_CHAIN_LENGTH = {"float_int32_bias": 1, "fbgemm_fixed_point": 2, "tflite_single_rounding": 3, "tflite": 4}


@dataclass(frozen=True)
class FloatPathComparison:
    """A variant's output codes against torch's float path (fbgemm, eqs. L8-L11) on the same int32 ``raw``.

    ``stages``: the codes after each ingredient of :data:`CAUSES` the variant changes, in order, starting from
    ``"float"`` (torch's codes); the last is the variant's. ``cause``: int8 (..., N), −1 where the variant's code
    equals torch's, else the index into :data:`CAUSES` of the FIRST ingredient that moved the code away from
    torch's. ``changes[c]``: bool (..., N), where ingredient c changed the code (a code can move twice).
    """

    variant: str
    bias_rule: str | None
    float_codes: np.ndarray
    variant_codes: np.ndarray
    stages: dict[str, np.ndarray]
    changes: dict[str, np.ndarray]
    cause: np.ndarray

    @property
    def differing(self) -> int:
        """How many codes differ from torch's float path."""
        return int((self.cause >= 0).sum())

    def counts(self) -> dict[str, int]:
        """Differing codes by first cause (every cause of the variant listed, zeros included)."""
        return {c: int((self.cause == i).sum()) for i, c in enumerate(CAUSES) if c in self.changes}

    def max_abs_difference(self) -> int:
        d = np.abs(self.variant_codes.astype(np.int64) - self.float_codes.astype(np.int64))
        return int(d.max()) if d.size else 0


def compare_with_float_path(layer, variant: str, *, raw_i32: np.ndarray | None = None,
                            x_u8: np.ndarray | None = None, bias_rule: str | None = None) -> FloatPathComparison:
    """For a :class:`refquant.linear.QuantizedLinear` and its int32 ``raw`` (or input codes ``x_u8``), the codes of
    ``variant`` against torch's fbgemm float path (eqs. L8-L11, what torch runs on fbgemm/x86), with the cause
    of each difference: changing one ingredient of :data:`CAUSES` at a time, from torch's codes to the variant's.

    The float path is fbgemm's whatever the layer's engine (the ingredients are defined against it); the variant's
    constants come from the layer's s_x, s_w, s_y, bias and z_y (:func:`integer_requantization_of`), with its own
    bias rule unless ``bias_rule`` is given.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if (raw_i32 is None) == (x_u8 is None):
        raise ValueError("give exactly one of raw_i32 (the int32 accumulators of eq. L5) and x_u8 (input codes)")
    raw = layer.accumulate(x_u8) if x_u8 is not None else raw_i32
    if not isinstance(raw, np.ndarray) or raw.dtype != np.int32 or raw.ndim < 1 or raw.shape[-1] != layer.out_features:
        raise ValueError(f"raw_i32 must be an int32 array (..., N = {layer.out_features}), got "
                         f"{getattr(raw, 'dtype', type(raw).__name__)} {getattr(raw, 'shape', '')}")
    eng = _engines_module
    float_rq = eng.FbgemmRequantizer.build(layer.qparams())
    float_codes = float_rq.requantize(raw)
    if bias_rule is None:
        bias_rule = DEFAULT_BIAS_RULE[variant]
    tflite = variant.startswith("tflite")
    base = integer_requantization_of(layer, "float_int32_bias", bias_rule=bias_rule)
    stages = {"float": float_codes, "bias_i32": requantize_integer(raw, base)}
    n_stages = _CHAIN_LENGTH[variant]
    if n_stages >= 2:
        exact = integer_requantization_of(layer, "fbgemm_fixed_point", bias_rule=bias_rule)
        stages["exact_rounding"] = requantize_integer(raw, exact)
    if n_stages >= 3:
        assert tflite
        q31 = integer_requantization_of(layer, "tflite_single_rounding", bias_rule=bias_rule)
        stages["q31_multiplier"] = requantize_integer(raw, q31)
    if n_stages >= 4:
        stages["second_rounding"] = requantize_integer(raw, integer_requantization_of(layer, "tflite",
                                                                                      bias_rule=bias_rule))
    names = list(stages)
    changes = {names[i]: stages[names[i]] != stages[names[i - 1]] for i in range(1, len(names))}
    variant_codes = stages[names[-1]]
    cause = np.full(raw.shape, -1, np.int8)
    differs = variant_codes != float_codes
    for c in reversed(list(changes)):  # the first ingredient that moved the code wins
        cause = np.where(differs & changes[c], np.int8(CAUSES.index(c)), cause)
    return FloatPathComparison(variant, base.bias_rule, float_codes, variant_codes, stages, changes, cause)
