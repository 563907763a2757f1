/*
 * refquant_requant.c: see refquant_requant.h. Each function names the refquant Python function it equals.
 */
#include "refquant_requant.h"

#include <float.h>
#include <math.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "refquant_requant.c needs float expressions evaluated in float (FLT_EVAL_METHOD == 0, e.g. x86-64 SSE)"
#endif

#define RQ_INT32_MIN_F 2147483648.0f /* 2^31 as float */

/* ---- int32 helpers --------------------------------------------------------------------------------------- */

int32_t rq_wrap_i32(int64_t v)
{
    uint32_t u = (uint32_t)(uint64_t)v; /* conversion to unsigned is modulo 2^32 by definition */
    if (u <= (uint32_t)INT32_MAX) {
        return (int32_t)u;
    }
    return (int32_t)(u - 2147483648u) - INT32_MAX - 1; /* u - 2^32, computed without overflow */
}

int64_t rq_floor_shift_right(int64_t v, int s)
{
    if (v >= 0) {
        return v >> s;
    }
    return -((-(v + 1)) >> s) - 1; /* floor(v / 2^s) for v < 0, no shift of a negative value */
}

int32_t rq_clamp(int64_t q, int32_t quant_min, int32_t quant_max)
{
    if (q < quant_min) {
        return quant_min;
    }
    if (q > quant_max) {
        return quant_max;
    }
    return (int32_t)q;
}

/* ---- eq. I1 ---------------------------------------------------------------------------------------------- */

/* refquant.fixed_point.quantize_bias_fbgemm */
int32_t rq_quantize_bias_fbgemm(float bias, float act_times_w_scale)
{
    float inv_scale = 1.0f / act_times_w_scale;
    float transformed = bias * inv_scale;
    double rounded = (double)nearbyintf(transformed); /* half to even under the default rounding mode */
    if (rounded != rounded) {
        return INT32_MIN; /* NaN: what x86's cvttsd2si gives FBGEMM */
    }
    if (rounded < -2147483648.0) {
        rounded = -2147483648.0;
    }
    if (rounded > 2147483647.0) {
        rounded = 2147483647.0;
    }
    return (int32_t)rounded;
}

/* refquant.fixed_point.quantize_bias_tflite */
int32_t rq_quantize_bias_tflite(float bias, float input_scale, float weight_scale)
{
    float scaling_factor = input_scale * weight_scale;
    float scaling_factor_inv = (scaling_factor == 0.0f) ? 0.0f : (float)(1.0 / (double)scaling_factor);
    float product = bias * scaling_factor_inv;
    float rounded = roundf(product); /* half away from zero */
    double safe;
    if (rounded != rounded) {
        safe = 0.0; /* SafeCast: NaN -> 0 */
    } else {
        safe = (double)rounded;
    }
    if (safe < -2147483647.0) { /* SafeCast saturates to int32, then clamp to [-INT32_MAX, INT32_MAX] */
        safe = -2147483647.0;
    }
    if (safe > 2147483647.0) {
        safe = 2147483647.0;
    }
    return (int32_t)safe;
}

/* refquant.fixed_point.quantize_bias_tflite_mlir */
int32_t rq_quantize_bias_tflite_mlir(float bias, float input_scale, float weight_scale)
{
    double scale = (double)input_scale * (double)weight_scale;
    double rounded = round((double)bias / scale);
    if (rounded < -2147483648.0) {
        rounded = -2147483648.0;
    }
    if (rounded > 2147483647.0) {
        rounded = 2147483647.0;
    }
    return (int32_t)rounded;
}

/* ---- eq. I2 ---------------------------------------------------------------------------------------------- */

/* refquant.fixed_point.choose_requantization_multiplier */
int rq_choose_requantization_multiplier(float real_multiplier, int32_t *multiplier, int *right_shift)
{
    float m = real_multiplier;
    int s = 31;
    int64_t q;
    if (!(m > 0.0f) || !(m <= FLT_MAX)) {
        return 1; /* <= 0, NaN, inf */
    }
    while (m < 0.5f) {
        m *= 2.0f;
        s++;
    }
    while (m > 1.0f) {
        m /= 2.0f;
        s--;
    }
    q = (int64_t)nearbyintf(m * RQ_INT32_MIN_F); /* the float product is exact */
    if (q == ((int64_t)1 << 31)) {
        q /= 2;
        s--;
    }
    if (s < 1 || s > 63) {
        return 1;
    }
    *multiplier = (int32_t)q;
    *right_shift = s;
    return 0;
}

/* refquant.fixed_point.quantize_multiplier */
int rq_quantize_multiplier(double real_multiplier, int single_rounding, int32_t *quantized_multiplier, int *shift)
{
    double q;
    int e;
    int64_t q_fixed;
    if (!(real_multiplier >= 0.0) || !(real_multiplier <= DBL_MAX)) {
        return 1; /* negative, NaN, inf */
    }
    if (real_multiplier == 0.0) {
        *quantized_multiplier = 0;
        *shift = 0;
        return 0;
    }
    q = frexp(real_multiplier, &e);
    q_fixed = (int64_t)round(q * 2147483648.0); /* exact product; half away from zero */
    if (q_fixed == ((int64_t)1 << 31)) {
        q_fixed /= 2;
        e++;
    }
    if (e < -31) {
        e = 0;
        q_fixed = 0;
    }
    if (single_rounding && e > 30) {
        e = 30;
        q_fixed = INT32_MAX;
    }
    *quantized_multiplier = (int32_t)q_fixed;
    *shift = e;
    return 0;
}

/* ---- eqs. I4-I6 primitives ------------------------------------------------------------------------------- */

/* refquant.fixed_point.saturating_rounding_mul_with_shift: (a*b + 2^(s-1)) >> s, 1 <= s <= 63 */
int64_t rq_saturating_rounding_mul_with_shift(int32_t a, int32_t b, int right_shift)
{
    int64_t ab = (int64_t)a * (int64_t)b;
    int64_t nudge = (int64_t)1 << (right_shift - 1);
    return rq_floor_shift_right(ab + nudge, right_shift);
}

/* refquant.fixed_point.saturating_rounding_doubling_high_mul: floor(a*b / 2^31 + 1/2), MIN*MIN -> MAX */
int32_t rq_saturating_rounding_doubling_high_mul(int32_t a, int32_t b)
{
    int64_t ab, v;
    if (a == b && a == INT32_MIN) {
        return INT32_MAX;
    }
    ab = (int64_t)a * (int64_t)b;
    v = ab + (ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30)));
    return (int32_t)(v / ((int64_t)1 << 31)); /* C99 division truncates towards zero */
}

/* refquant.fixed_point.rounding_divide_by_pot: x / 2^e to nearest, ties away from zero, 0 <= e <= 31 */
int32_t rq_rounding_divide_by_pot(int32_t x, int exponent)
{
    int64_t mask = ((int64_t)1 << exponent) - 1;
    int64_t remainder = (int64_t)x & mask; /* int64_t is two's complement: the low bits of x */
    int64_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (int32_t)(rq_floor_shift_right(x, exponent) + (remainder > threshold ? 1 : 0));
}

/* refquant.fixed_point.multiply_by_quantized_multiplier (TFLite default build: two roundings) */
int32_t rq_multiply_by_quantized_multiplier(int32_t x, int32_t quantized_multiplier, int shift)
{
    int left_shift = shift > 0 ? shift : 0;
    int right_shift = shift > 0 ? 0 : -shift;
    int32_t x_shifted = rq_wrap_i32((int64_t)x * ((int64_t)1 << left_shift));
    return rq_rounding_divide_by_pot(rq_saturating_rounding_doubling_high_mul(x_shifted, quantized_multiplier),
                                     right_shift);
}

/* refquant.fixed_point.multiply_by_quantized_multiplier_single_rounding (TFLITE_SINGLE_ROUNDING) */
int32_t rq_multiply_by_quantized_multiplier_single_rounding(int32_t x, int32_t quantized_multiplier, int shift)
{
    int total_shift = 31 - shift;
    int64_t rnd = (int64_t)1 << (total_shift - 1);
    int64_t result = (int64_t)x * (int64_t)quantized_multiplier + rnd;
    return rq_wrap_i32(rq_floor_shift_right(result, total_shift));
}

/* ---- eqs. I3-I7: one output code ------------------------------------------------------------------------- */

/* refquant.fixed_point.requantize_fbgemm_fixed_point_scalar */
int32_t rq_requantize_fbgemm_fixed_point(int32_t raw, int32_t bias, int32_t multiplier, int right_shift,
                                         int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    int32_t acc = rq_wrap_i32((int64_t)raw + bias);
    int64_t q = (int64_t)zero_point + rq_saturating_rounding_mul_with_shift(acc, multiplier, right_shift);
    return rq_clamp(q, quant_min, quant_max);
}

/* refquant.fixed_point.requantize_tflite_scalar */
int32_t rq_requantize_tflite(int32_t raw, int32_t bias, int32_t multiplier, int shift,
                             int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    int32_t acc = rq_wrap_i32((int64_t)raw + bias);
    int32_t scaled = rq_multiply_by_quantized_multiplier(acc, multiplier, shift);
    return rq_clamp(rq_wrap_i32((int64_t)scaled + zero_point), quant_min, quant_max);
}

/* refquant.fixed_point.requantize_tflite_single_rounding_scalar */
int32_t rq_requantize_tflite_single_rounding(int32_t raw, int32_t bias, int32_t multiplier, int shift,
                                             int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    int32_t acc = rq_wrap_i32((int64_t)raw + bias);
    int32_t scaled = rq_multiply_by_quantized_multiplier_single_rounding(acc, multiplier, shift);
    return rq_clamp(rq_wrap_i32((int64_t)scaled + zero_point), quant_min, quant_max);
}

/* refquant.fixed_point.requantize_float_int32_bias_scalar */
int32_t rq_requantize_float_int32_bias(int32_t raw, int32_t bias, float output_multiplier,
                                       int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    int32_t acc = rq_wrap_i32((int64_t)raw + bias);
    float y = (float)acc * output_multiplier;
    return rq_clamp((int64_t)rq_cvtps2dq(y) + zero_point, quant_min, quant_max);
}

/* ---- the float path (refquant/linear.py) ----------------------------------------------------------------- */

float rq_act_times_w_scale(float input_scale, float weight_scale)
{
    return input_scale * weight_scale;
}

float rq_output_multiplier(float act_times_w_scale, float output_scale)
{
    return act_times_w_scale / output_scale;
}

float rq_bias_term_per_channel(float bias, float act_times_w_scale)
{
    return bias / act_times_w_scale;
}

float rq_bias_reciprocal_per_tensor(float act_times_w_scale)
{
    return (float)(1.0 / (double)act_times_w_scale);
}

int32_t rq_cvtps2dq(float y)
{
    if (y >= -RQ_INT32_MIN_F && y < RQ_INT32_MIN_F) { /* false for NaN */
        return (int32_t)rintf(y);                       /* half to even under the default rounding mode */
    }
    return INT32_MIN; /* the "integer indefinite" value */
}

int32_t rq_requantize_float_no_bias(int32_t raw, float output_multiplier,
                                    int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    float t = (float)raw;                 /* L8a: cvtdq2ps */
    float y = t * output_multiplier;      /* L9 */
    return rq_clamp((int64_t)rq_cvtps2dq(y) + zero_point, quant_min, quant_max); /* L10, L11 */
}

int32_t rq_requantize_float_per_channel(int32_t raw, float bias_term, float output_multiplier,
                                        int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    float t = (float)raw + bias_term;     /* L8b: two roundings */
    float y = t * output_multiplier;
    return rq_clamp((int64_t)rq_cvtps2dq(y) + zero_point, quant_min, quant_max);
}

int32_t rq_requantize_float_per_tensor(int32_t raw, float bias, float bias_reciprocal, float output_multiplier,
                                       int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    float t = fmaf(bias, bias_reciprocal, (float)raw); /* L8c: one rounding (torch's contracted vfmadd) */
    float y = t * output_multiplier;
    return rq_clamp((int64_t)rq_cvtps2dq(y) + zero_point, quant_min, quant_max);
}

/* ---- qnnpack and onednn (refquant/engines.py) ----------------------------------------------------------- */

static int64_t rq_clamp64(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* refquant.engines.qnnpack_requantize_element */
int32_t rq_requantize_qnnpack(int32_t raw, int32_t bias_i32, float requantization_scale, int32_t zero_point,
                              int32_t output_min, int32_t output_max)
{
    int32_t acc = rq_wrap_i32((int64_t)raw + bias_i32);
    float y = (float)acc * requantization_scale;
    int64_t r = rq_clamp64(rq_cvtps2dq(y), -32768, 32767);   /* _mm_packs_epi32 */
    int64_t v = rq_clamp64(r + zero_point, -32768, 32767);   /* _mm_adds_epi16 */
    int64_t q = rq_clamp64(v, 0, 255);                       /* _mm_packus_epi16 */
    if (q > output_max) {
        q = output_max;                                      /* _mm_min_epu8 */
    }
    if (q < output_min) {
        q = output_min;                                      /* _mm_max_epu8 */
    }
    return (int32_t)q;
}

/* refquant.engines.onednn_requantize_element */
int32_t rq_requantize_onednn(int32_t raw, int kernel, int32_t compensation, float input_scale_onednn,
                             float weight_scale_onednn, float output_scale, int has_bias, float bias, int relu,
                             float dst_multiplier, float zero_point_f32)
{
    float t, v;
    if (kernel == RQ_ONEDNN_BRGEMM_AMX) {
        int32_t acc = rq_wrap_i32((int64_t)raw - compensation);
        t = (float)acc + (float)compensation;                /* DN4b: the compensation added in float32 */
    } else {
        t = (float)raw;                                      /* DN4a */
    }
    if (kernel == RQ_ONEDNN_BRGEMM) {
        float u = t * input_scale_onednn;                    /* DN5a: the src scale, then the weight scale */
        v = u * weight_scale_onednn;
    } else {
        v = t * output_scale;                                /* DN5b */
    }
    if (has_bias) {
        v = v + bias;                                        /* DN5c */
    }
    if (relu && !(v > 0.0f)) {
        v = 0.0f;                                            /* vmaxps(v, 0): NaN and -0.0 -> +0.0 */
    }
    v = v * dst_multiplier;                                  /* DN6 */
    v = v + zero_point_f32;
    if (v != v) {                                            /* brgemm: NaN -> INT32_MIN -> vpmovusdb gives 255; */
        return kernel == RQ_ONEDNN_GEMM ? 0 : 255;           /* gemm:jit's vmaxps(v, 0) gives 0 for NaN */
    }
    if (v < 0.0f) {                                          /* DN7: saturate in float, then RNE */
        v = 0.0f;
    }
    if (v > 255.0f) {
        v = 255.0f;
    }
    return (int32_t)rintf(v);
}

/* ---- QuantStub / DeQuantStub (refquant/quantize.py) ------------------------------------------------------ */

float rq_inverse_scale(float scale)
{
    return 1.0f / scale;
}

int32_t rq_quantize_per_tensor(float x, float inverse_scale, int32_t zero_point, int32_t quant_min, int32_t quant_max)
{
    float v = fmaf(x, inverse_scale, (float)zero_point); /* the zero point added before the one rounding */
    if (!(v < 2147483520.0f)) {
        v = 2147483520.0f; /* _mm256_min_ps(v, 2147483520.0f): NaN also becomes the constant */
    }
    return rq_clamp(rq_cvtps2dq(v), quant_min, quant_max);
}

float rq_dequantize_per_tensor(int32_t q, int32_t zero_point, float scale)
{
    return (float)rq_wrap_i32((int64_t)q - zero_point) * scale;
}

int32_t rq_quantize_nearbyint_then_add(float x, float inverse_scale, int32_t zero_point, int32_t quant_min,
                                       int32_t quant_max)
{
    float t = rintf(x * inverse_scale);
    float v = fminf(t + (float)zero_point, 2147483520.0f); /* fmin: NaN -> the constant */
    return rq_clamp(rq_cvtps2dq(v), quant_min, quant_max);
}

int32_t rq_quantize_multiply_then_add(float x, float inverse_scale, int32_t zero_point, int32_t quant_min,
                                      int32_t quant_max)
{
    float t = x * inverse_scale;
    float v = t + (float)zero_point;
    if (v != v) {
        return quant_min;
    }
    if (v < (float)quant_min) {
        v = (float)quant_min;
    }
    if (v > (float)quant_max) {
        v = (float)quant_max;
    }
    return (int32_t)rintf(v);
}
