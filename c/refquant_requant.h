/*
 * refquant_requant.h: a self-contained C99 reference of refquant's requantization arithmetic.
 *
 * The same functions, bit for bit, as refquant/fixed_point.py (integer-only variants, eqs. I1-I7 of its
 * docstring and of docs/numerics.md) and as the float path of refquant/linear.py (eqs. L6-L11) and
 * refquant/quantize.py (eqs. Q0, Q1, D1), one function per step, so that a whole-model golden program
 * (QuantStub -> Linear -> DeQuantStub) can be assembled from them. tests/test_c_reference.py compiles this file
 * with `cc -std=c99 -O2 -Wall -Wextra -Werror -ffp-contract=off` and compares every function with refquant.
 *
 * Written for refquant; no upstream code. Requirements: IEEE-754 float/double, FLT_EVAL_METHOD == 0 (float
 * expressions evaluated in float: x86-64 SSE, ARM64), the default rounding mode (round to nearest even), no
 * -ffast-math, and -ffp-contract=off (only the explicit fmaf() calls may fuse). Signed overflow is never relied
 * on: every int32 wrap-around is computed explicitly (rq_wrap_i32), every arithmetic right shift of a negative
 * value by rq_floor_shift_right.
 *
 * Shift conventions: FBGEMM's right_shift is a RIGHT shift (real = M * 2^-s, 1 <= s <= 63); TFLite's shift is a
 * LEFT shift (positive = left, real ~= M * 2^(shift - 31), -31 <= shift <= 30).
 */
#ifndef REFQUANT_REQUANT_H
#define REFQUANT_REQUANT_H

#include <stdint.h>

/* ---- int32 helpers --------------------------------------------------------------------------------------- */
int32_t rq_wrap_i32(int64_t v);                       /* v modulo 2^32, as a two's-complement int32 */
int64_t rq_floor_shift_right(int64_t v, int s);       /* floor(v / 2^s), 0 <= s <= 63 (an arithmetic >>) */
int32_t rq_clamp(int64_t q, int32_t quant_min, int32_t quant_max);

/* ---- eq. I1: the int32 bias ------------------------------------------------------------------------------ */
/* FBGEMM (fbgemm::Quantize<int32_t>(bias, 0, atws, 32)): clamp(RNE(f32(bias * f32(1/atws)))), NaN -> INT32_MIN */
int32_t rq_quantize_bias_fbgemm(float bias, float act_times_w_scale);
/* TFLite converter, legacy quantizer: sf = f32(s_x*s_w); round_half_away(f32(bias * f32(1.0/(double)sf))),
 * saturated, then clamped to [-INT32_MAX, INT32_MAX] */
int32_t rq_quantize_bias_tflite(float bias, float input_scale, float weight_scale);
/* TFLite MLIR quantizer without legacy_float_scale: round_half_away((double)bias / ((double)s_x*(double)s_w)) */
int32_t rq_quantize_bias_tflite_mlir(float bias, float input_scale, float weight_scale);

/* ---- eq. I2: fixed-point multipliers (return 0 on success, 1 when the source refuses) --------------------- */
int rq_choose_requantization_multiplier(float real_multiplier, int32_t *multiplier, int *right_shift);
int rq_quantize_multiplier(double real_multiplier, int single_rounding, int32_t *quantized_multiplier, int *shift);

/* ---- eqs. I4-I6: fixed-point primitives ------------------------------------------------------------------ */
int64_t rq_saturating_rounding_mul_with_shift(int32_t a, int32_t b, int right_shift);      /* FBGEMM */
int32_t rq_saturating_rounding_doubling_high_mul(int32_t a, int32_t b);                   /* gemmlowp */
int32_t rq_rounding_divide_by_pot(int32_t x, int exponent);                              /* gemmlowp, 0..31 */
int32_t rq_multiply_by_quantized_multiplier(int32_t x, int32_t quantized_multiplier, int shift);  /* TFLite */
int32_t rq_multiply_by_quantized_multiplier_single_rounding(int32_t x, int32_t quantized_multiplier, int shift);

/* ---- eqs. I3-I7: one output code from one int32 raw accumulator (after the zero-point corrections) -------- */
int32_t rq_requantize_fbgemm_fixed_point(int32_t raw, int32_t bias, int32_t multiplier, int right_shift,
                                         int32_t zero_point, int32_t quant_min, int32_t quant_max);
int32_t rq_requantize_tflite(int32_t raw, int32_t bias, int32_t multiplier, int shift,
                             int32_t zero_point, int32_t quant_min, int32_t quant_max);
int32_t rq_requantize_tflite_single_rounding(int32_t raw, int32_t bias, int32_t multiplier, int shift,
                                             int32_t zero_point, int32_t quant_min, int32_t quant_max);
int32_t rq_requantize_float_int32_bias(int32_t raw, int32_t bias, float output_multiplier,
                                       int32_t zero_point, int32_t quant_min, int32_t quant_max);

/* ---- torch's float path (refquant/linear.py eqs. L6-L11) ------------------------------------------------- */
float rq_act_times_w_scale(float input_scale, float weight_scale);           /* L6: f32(s_x * s_w) */
float rq_output_multiplier(float act_times_w_scale, float output_scale);     /* L7: f32(atws / s_y) */
float rq_bias_term_per_channel(float bias, float act_times_w_scale);         /* L8b: f32(bias / atws) */
float rq_bias_reciprocal_per_tensor(float act_times_w_scale);                /* L8c: f32(1.0 / (double)atws) */
int32_t rq_cvtps2dq(float y);                                                 /* L10: RNE; NaN, |y|>=2^31 -> MIN */
int32_t rq_requantize_float_no_bias(int32_t raw, float output_multiplier,
                                    int32_t zero_point, int32_t quant_min, int32_t quant_max);   /* L8a-L11 */
int32_t rq_requantize_float_per_channel(int32_t raw, float bias_term, float output_multiplier,
                                        int32_t zero_point, int32_t quant_min, int32_t quant_max); /* L8b-L11 */
int32_t rq_requantize_float_per_tensor(int32_t raw, float bias, float bias_reciprocal, float output_multiplier,
                                       int32_t zero_point, int32_t quant_min, int32_t quant_max);  /* L8c-L11 */

/* ---- qnnpack's and onednn's float paths (refquant/engines.py eqs. QN5, QN6 and DN4-DN7) ---------------- */
/* QN5, QN6: acc = wrap32(raw + bias_i32); y = f32(f32(acc) * scale); cvtps2dq; int16 packs with the zero point
 * (saturating); uint8 pack; then clamp to [output_min, output_max] */
int32_t rq_requantize_qnnpack(int32_t raw, int32_t bias_i32, float requantization_scale, int32_t zero_point,
                              int32_t output_min, int32_t output_max);
/* DN4-DN7; kernel 0 brgemm (src then weight scale), 1 brgemm_amx (compensation added in float, product of the
 * scales), 2 gemm (product of the scales) */
#define RQ_ONEDNN_BRGEMM 0
#define RQ_ONEDNN_BRGEMM_AMX 1
#define RQ_ONEDNN_GEMM 2
int32_t rq_requantize_onednn(int32_t raw, int kernel, int32_t compensation, float input_scale_onednn,
                             float weight_scale_onednn, float output_scale, int has_bias, float bias, int relu,
                             float dst_multiplier, float zero_point_f32);

/* ---- QuantStub / DeQuantStub (refquant/quantize.py eqs. Q0, Q1, D1) --------------------------------------- */
float rq_inverse_scale(float scale);                                          /* Q0: f32(1 / scale) */
int32_t rq_quantize_per_tensor(float x, float inverse_scale, int32_t zero_point,
                               int32_t quant_min, int32_t quant_max);          /* Q1: fmaf, min, cvtps2dq, clamp */
/* the later FBGEMM's rounding: clamp(cvtps2dq(fmin(f32(rint(f32(x * inv)) + zp), 2147483520.0f))) */
int32_t rq_quantize_nearbyint_then_add(float x, float inverse_scale, int32_t zero_point,
                                       int32_t quant_min, int32_t quant_max);
/* oneDNN's reorder (Q1c): rint(clamp(f32(f32(x * inv) + zp), qmin, qmax)); NaN gives quant_min (refquant refuses
 * NaN for this rounding) */
int32_t rq_quantize_multiply_then_add(float x, float inverse_scale, int32_t zero_point,
                                      int32_t quant_min, int32_t quant_max);
float rq_dequantize_per_tensor(int32_t q, int32_t zero_point, float scale);  /* D1: f32(f32(q - zp) * scale) */

#endif /* REFQUANT_REQUANT_H */
