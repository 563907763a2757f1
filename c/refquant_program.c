/*
 * refquant_program.c: runs a golden program written by refquant (format refquant-golden-model/2 or /1, a C header from
 * refquant.export.export_model / refquant.program.c_header) and compares everything it computes with the
 * program's test vectors and constants, bit for bit.
 *
 * Build (the header's path as a string macro; the default is "golden.h" on the include path):
 *
 *   cc -std=c99 -O2 -Wall -Wextra -Werror -ffp-contract=off -DREFQUANT_GOLDEN_HEADER='"model.h"' \
 *      c/refquant_program.c c/refquant_requant.c -lm -o run_model && ./run_model [-v]
 *
 * What it does, with the arithmetic of c/refquant_requant.c only (one function per equation of refquant):
 *   1. every float field's view (a C99 hexadecimal literal) must equal its bits (NaN: any NaN);
 *   2. every constant a step derives is derived again here from the step's primary quantities (col_offsets, the
 *      QuantStub's inverse scale, fbgemm's act_times_w_scale / output_multiplier / bias terms, each integer
 *      variant's bias_i32, multiplier and shift by its rules, qnnpack's requantization scales, onednn's
 *      round-tripped scales and compensation) and compared with the header's;
 *   3. the program is run twice: "chained" from tensor 0 (each step on what the previous step computed here) and
 *      "per step" (each step on the header's own input tensor), and every output tensor, and each linear step's
 *      acc_i32 and raw_i32, is compared with the header's.
 * It prints one line per comparison and a last line
 *   RESULT differing_codes=<n> differing_float_bits=<n> differing_int32=<n> differing_constants=<n> float_views=<n>
 * and exits 0 when every count is 0, 1 otherwise, 2 when the header is not a program it can run.
 * Not checked here: qnnpack's bias_i32 (refquant.quantize eq. Q2 in double; the test vectors cover its use).
 *
 * Written for refquant; no upstream code. Requirements as c/refquant_requant.h (IEEE-754, FLT_EVAL_METHOD == 0,
 * round to nearest, no -ffast-math, -ffp-contract=off).
 */
#ifndef REFQUANT_GOLDEN_HEADER
#define REFQUANT_GOLDEN_HEADER "golden.h"
#endif
#include REFQUANT_GOLDEN_HEADER

#include "refquant_requant.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long n_codes, n_float_bits, n_int32, n_constants, n_views;
static int verbose;
static int format_version; /* 2 (refquant-golden-model/2) or 1 */

/* ---- fields ----------------------------------------------------------------------------------------------- */

static void fail(const char *what, const char *name)
{
    fprintf(stderr, "refquant_program: %s: %s\n", what, name);
    exit(2);
}

static const rqg_field *find(const char *name)
{
    int i;
    for (i = 0; i < RQG_NUM_FIELDS; i++) {
        if (strcmp(rqg_fields[i].name, name) == 0) {
            return &rqg_fields[i];
        }
    }
    return NULL;
}

static const rqg_field *need(const char *name)
{
    const rqg_field *f = find(name);
    if (f == NULL) {
        fail("missing field", name);
    }
    return f;
}

static const rqg_field *step_field(int step, const char *suffix)
{
    char name[256];
    snprintf(name, sizeof name, "step%d.%s", step, suffix);
    return need(name);
}

static int64_t int_of(const rqg_field *f)
{
    switch (f->dtype) {
    case RQG_INT:
        return *(const int64_t *)f->data;
    case RQG_BOOL:
        return *(const int *)f->data;
    case RQG_INT32:
        return *(const int32_t *)f->data;
    default:
        fail("not an integer field", f->name);
    }
    return 0;
}

static const char *str_of(const rqg_field *f)
{
    if (f->dtype != RQG_STR) {
        fail("not a string field", f->name);
    }
    return (const char *)f->data;
}

static const int32_t *i32s(const rqg_field *f)
{
    if (f->dtype != RQG_INT32) {
        fail("not an int32 field", f->name);
    }
    return (const int32_t *)f->data;
}

static float f32_at(const rqg_field *f, int64_t k)
{
    float v;
    if (f->dtype != RQG_FLOAT32) {
        fail("not a float32 field", f->name);
    }
    memcpy(&v, (const uint32_t *)f->bits + k, sizeof v); /* the bits are the value; the view is checked apart */
    return v;
}

static double f64_at(const rqg_field *f, int64_t k)
{
    double v;
    if (f->dtype != RQG_FLOAT64) {
        fail("not a float64 field", f->name);
    }
    memcpy(&v, (const uint64_t *)f->bits + k, sizeof v);
    return v;
}

static uint32_t bits32(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

static void check_float_views(void)
{
    int i;
    int64_t k;
    for (i = 0; i < RQG_NUM_FIELDS; i++) {
        const rqg_field *f = &rqg_fields[i];
        long bad = 0;
        for (k = 0; f->bits != NULL && k < f->count; k++) {
            if (f->dtype == RQG_FLOAT32) {
                float view = ((const float *)f->data)[k], exact = f32_at(f, k);
                bad += (view != view && exact != exact) ? 0 : (bits32(view) != bits32(exact));
            } else {
                double view = ((const double *)f->data)[k], exact = f64_at(f, k);
                uint64_t a, b;
                memcpy(&a, &view, sizeof a);
                memcpy(&b, &exact, sizeof b);
                bad += (view != view && exact != exact) ? 0 : (a != b);
            }
        }
        if (bad) {
            printf("float view %s: %ld of %" PRId64 " differ from the bits\n", f->name, bad, f->count);
        }
        n_views += bad;
    }
}

/* ---- tensors ---------------------------------------------------------------------------------------------- */

typedef struct {
    int dtype; /* RQG_FLOAT32 or RQG_UINT8 */
    int64_t count;
    float *f;
    uint8_t *u;
} tensor;

static void tensor_alloc(tensor *t, int dtype, int64_t count)
{
    t->dtype = dtype;
    t->count = count;
    t->f = dtype == RQG_FLOAT32 ? (float *)calloc((size_t)count, sizeof(float)) : NULL;
    t->u = dtype == RQG_UINT8 ? (uint8_t *)calloc((size_t)count, 1) : NULL;
    if ((dtype == RQG_FLOAT32 && t->f == NULL) || (dtype == RQG_UINT8 && t->u == NULL)) {
        fail("out of memory", "tensor");
    }
}

static void tensor_free(tensor *t)
{
    free(t->f);
    free(t->u);
    t->f = NULL;
    t->u = NULL;
}

static void tensor_of_file(tensor *t, int index)
{
    char name[64];
    const rqg_field *f;
    int64_t k;
    snprintf(name, sizeof name, "tensor%d", index);
    f = need(name);
    if (f->dtype != RQG_FLOAT32 && f->dtype != RQG_UINT8) {
        fail("a tensor must be float32 or uint8", name);
    }
    tensor_alloc(t, f->dtype, f->count);
    for (k = 0; k < f->count; k++) {
        if (f->dtype == RQG_FLOAT32) {
            t->f[k] = f32_at(f, k);
        } else {
            t->u[k] = ((const uint8_t *)f->data)[k];
        }
    }
}

static void report(const char *pass, const char *what, long bad, int64_t count, int64_t first, long long got,
                   long long expected)
{
    if (bad || verbose) {
        printf("%-8s %-40s %ld of %" PRId64 " differ", pass, what, bad, count);
        if (bad) {
            printf(" (first at flat index %" PRId64 ": got %lld, expected %lld)", first, got, expected);
        }
        printf("\n");
    }
}

static void compare_tensor(const char *pass, int step, const tensor *got, const tensor *expected)
{
    char what[128];
    long bad = 0;
    int64_t k, first = -1;
    long long g = 0, e = 0;
    for (k = 0; k < expected->count; k++) {
        long long a = got->dtype == RQG_UINT8 ? (long long)got->u[k] : (long long)bits32(got->f[k]);
        long long b = expected->dtype == RQG_UINT8 ? (long long)expected->u[k] : (long long)bits32(expected->f[k]);
        if (a != b) {
            if (first < 0) {
                first = k;
                g = a;
                e = b;
            }
            bad++;
        }
    }
    snprintf(what, sizeof what, "step %d output tensor %d (%s)", step, step + 1,
             expected->dtype == RQG_UINT8 ? "codes" : "float bits");
    report(pass, what, bad, expected->count, first, g, e);
    if (expected->dtype == RQG_UINT8) {
        n_codes += bad;
    } else {
        n_float_bits += bad;
    }
}

static void compare_i32(const char *pass, const char *what, const int32_t *got, const int32_t *expected,
                        int64_t count, long *counter)
{
    long bad = 0;
    int64_t k, first = -1;
    for (k = 0; k < count; k++) {
        if (got[k] != expected[k]) {
            if (first < 0) {
                first = k;
            }
            bad++;
        }
    }
    report(pass, what, bad, count, first, first >= 0 ? got[first] : 0, first >= 0 ? expected[first] : 0);
    *counter += bad;
}

static void compare_f32(const char *what, const float *got, const rqg_field *expected, int64_t count)
{
    long bad = 0;
    int64_t k, first = -1;
    for (k = 0; k < count; k++) {
        if (bits32(got[k]) != bits32(f32_at(expected, k))) {
            if (first < 0) {
                first = k;
            }
            bad++;
        }
    }
    report("constant", what, bad, count, first, first >= 0 ? (long long)bits32(got[first]) : 0,
           first >= 0 ? (long long)bits32(f32_at(expected, first)) : 0);
    n_constants += bad;
}

/* ---- requantizations -------------------------------------------------------------------------------------- */

enum { RQ_FBGEMM, RQ_QNNPACK, RQ_ONEDNN, RQ_FBGEMM_FIXED_POINT, RQ_TFLITE, RQ_TFLITE_SINGLE_ROUNDING,
       RQ_FLOAT_INT32_BIAS };

static int requantization_code(const char *name)
{
    static const char *const names[] = {"fbgemm", "qnnpack", "onednn", "fbgemm_fixed_point", "tflite",
                                        "tflite_single_rounding", "float_int32_bias"};
    int i;
    for (i = 0; i < 7; i++) {
        if (strcmp(names[i], name) == 0) {
            return i;
        }
    }
    fail("unknown requantization", name);
    return -1;
}

static int onednn_kernel_code(const char *name)
{
    if (strcmp(name, "brgemm") == 0) {
        return RQ_ONEDNN_BRGEMM;
    }
    if (strcmp(name, "brgemm_amx") == 0) {
        return RQ_ONEDNN_BRGEMM_AMX;
    }
    if (strcmp(name, "gemm") == 0) {
        return RQ_ONEDNN_GEMM;
    }
    fail("unknown onednn_kernel", name);
    return -1;
}

/* eq. M2 on k = lo .. hi - 1: the products summed in pairs (lo + 2j, lo + 2j + 1), each pair saturated to int16
 * (a lone last k is a pair of its own); exact in int64. */
static int64_t saturated_pairs_sum(const uint8_t *x, const int8_t *w, int64_t lo, int64_t hi)
{
    int64_t s = 0, k;
    for (k = lo; k < hi; k += 2) {
        const int64_t p = (int64_t)x[k] * w[k] + (k + 1 < hi ? (int64_t)x[k + 1] * w[k + 1] : 0);
        s += p < -32768 ? -32768 : (p > 32767 ? 32767 : p);
    }
    return s;
}

/* One linear step: input codes (rows x K) -> acc, raw (rows x N) and output codes. */
static void run_linear(int i, const tensor *in, tensor *out, int32_t *acc_out, int32_t *raw_out)
{
    const int64_t K = int_of(step_field(i, "in_features")), N = int_of(step_field(i, "out_features"));
    const int64_t rows = in->count / K;
    const int8_t *w = (const int8_t *)step_field(i, "weight_int8")->data;
    const int32_t *col = i32s(step_field(i, "col_offsets")), *zw = i32s(step_field(i, "weight_zero_points"));
    const int32_t zx = (int32_t)int_of(step_field(i, "input_zero_point"));
    const int32_t zy = (int32_t)int_of(step_field(i, "output_zero_point"));
    const int sat = (int)int_of(step_field(i, "saturate_int16_pairs")), relu = (int)int_of(step_field(i, "relu"));
    const int rq = requantization_code(str_of(step_field(i, "requantization")));
    /* eq. M2b: the k where the pairs start afresh, 0 for none (version 2; version 1 paired from k = 0 only) */
    const int64_t restart = format_version == 1 ? 0 : int_of(step_field(i, "pairs_restart_k"));
    const int64_t block_end = restart > 0 ? restart : K;
    int64_t m, n, k;
    for (m = 0; m < rows; m++) {
        const uint8_t *x = in->u + m * K;
        int64_t sum_x = 0;
        for (k = 0; k < K; k++) {
            sum_x += x[k];
        }
        for (n = 0; n < N; n++) {
            const int8_t *wn = w + n * K;
            int64_t s = 0;
            int32_t acc, raw, q;
            if (sat) { /* eq. M2 over the block [0, block_end), then again over [block_end, K) (eq. M2b) */
                s = saturated_pairs_sum(x, wn, 0, block_end) + saturated_pairs_sum(x, wn, block_end, K);
            } else {
                for (k = 0; k < K; k++) {
                    s += (int64_t)x[k] * wn[k]; /* eq. L4, exact; the wrap below is modulo 2^32 */
                }
            }
            acc = rq_wrap_i32(s);
            raw = rq_wrap_i32((int64_t)acc - (int64_t)zx * col[n] - (int64_t)zw[n] * rq_wrap_i32(sum_x)); /* L5 */
            switch (rq) {
            case RQ_FBGEMM: {
                const char *mode = str_of(step_field(i, "bias_mode"));
                float mult = f32_at(step_field(i, "output_multiplier"), n);
                int32_t lo = relu ? zy : 0;
                if (strcmp(mode, "none") == 0) {
                    q = rq_requantize_float_no_bias(raw, mult, zy, lo, 255);
                } else if (strcmp(mode, "add") == 0) {
                    q = rq_requantize_float_per_channel(raw, f32_at(step_field(i, "bias_term"), n), mult, zy, lo, 255);
                } else {
                    q = rq_requantize_float_per_tensor(raw, f32_at(step_field(i, "bias"), n),
                                                       f32_at(step_field(i, "bias_rcp"), 0), mult, zy, lo, 255);
                }
                break;
            }
            case RQ_QNNPACK:
                q = rq_requantize_qnnpack(raw, i32s(step_field(i, "bias_i32"))[n],
                                          f32_at(step_field(i, "requantization_scales"), n), zy,
                                          (int32_t)int_of(step_field(i, "output_min")),
                                          (int32_t)int_of(step_field(i, "output_max")));
                break;
            case RQ_ONEDNN:
                q = rq_requantize_onednn(raw, onednn_kernel_code(str_of(step_field(i, "onednn_kernel"))),
                                         i32s(step_field(i, "compensation"))[n],
                                         f32_at(step_field(i, "input_scale_onednn"), 0),
                                         f32_at(step_field(i, "weight_scales_onednn"), n),
                                         f32_at(step_field(i, "output_scales"), n),
                                         (int)int_of(step_field(i, "has_bias")), f32_at(step_field(i, "bias"), n),
                                         relu, f32_at(step_field(i, "dst_multiplier"), 0), (float)zy);
                break;
            default: {
                const int32_t bias = i32s(step_field(i, "bias_i32"))[n];
                const int32_t qmin = (int32_t)int_of(step_field(i, "quant_min"));
                const int32_t qmax = (int32_t)int_of(step_field(i, "quant_max"));
                if (rq == RQ_FLOAT_INT32_BIAS) {
                    q = rq_requantize_float_int32_bias(raw, bias, f32_at(step_field(i, "output_multiplier"), n), zy,
                                                       qmin, qmax);
                } else {
                    const int32_t mult = i32s(step_field(i, "requant_multiplier_i32"))[n];
                    const int shift = (int)i32s(step_field(i, "requant_shift"))[n];
                    if (rq == RQ_FBGEMM_FIXED_POINT) {
                        q = rq_requantize_fbgemm_fixed_point(raw, bias, mult, shift, zy, qmin, qmax);
                    } else if (rq == RQ_TFLITE) {
                        q = rq_requantize_tflite(raw, bias, mult, shift, zy, qmin, qmax);
                    } else {
                        q = rq_requantize_tflite_single_rounding(raw, bias, mult, shift, zy, qmin, qmax);
                    }
                }
            }
            }
            acc_out[m * N + n] = acc;
            raw_out[m * N + n] = raw;
            out->u[m * N + n] = (uint8_t)q;
        }
    }
}

/* Derive a linear step's constants again from its primary quantities and compare them with the header's. */
static void check_linear_constants(int i)
{
    const int64_t K = int_of(step_field(i, "in_features")), N = int_of(step_field(i, "out_features"));
    const int8_t *w = (const int8_t *)step_field(i, "weight_int8")->data;
    const int32_t *zw = i32s(step_field(i, "weight_zero_points"));
    const int32_t zx = (int32_t)int_of(step_field(i, "input_zero_point"));
    const double s_x64 = f64_at(step_field(i, "input_scale"), 0), s_y64 = f64_at(step_field(i, "output_scale"), 0);
    const float s_x = (float)s_x64, s_y = (float)s_y64;
    const rqg_field *s_w = step_field(i, "weight_scales"), *bias = step_field(i, "bias");
    const int has_bias = (int)int_of(step_field(i, "has_bias"));
    const int per_channel = strncmp(str_of(step_field(i, "weight_qscheme")), "per_channel", 11) == 0;
    const int rq = requantization_code(str_of(step_field(i, "requantization")));
    int32_t *iv = (int32_t *)calloc((size_t)N, sizeof(int32_t));
    int32_t *iv2 = (int32_t *)calloc((size_t)N, sizeof(int32_t));
    float *fv = (float *)calloc((size_t)N, sizeof(float)), *atws = (float *)calloc((size_t)N, sizeof(float));
    char what[128];
    int64_t n, k;
    if (iv == NULL || iv2 == NULL || fv == NULL || atws == NULL) {
        fail("out of memory", "constants");
    }
    for (n = 0; n < N; n++) { /* eq. L3 */
        int64_t row = 0;
        for (k = 0; k < K; k++) {
            row += w[n * K + k];
        }
        iv[n] = rq_wrap_i32(row - (int64_t)zw[n] * K);
        atws[n] = rq_act_times_w_scale(s_x, f32_at(s_w, n)); /* eq. L6 */
    }
    snprintf(what, sizeof what, "step %d col_offsets", i);
    compare_i32("constant", what, iv, i32s(step_field(i, "col_offsets")), N, &n_constants);
    if (rq == RQ_FBGEMM || rq >= RQ_FBGEMM_FIXED_POINT) {
        if (rq == RQ_FBGEMM) {
            snprintf(what, sizeof what, "step %d act_times_w_scale", i);
            compare_f32(what, atws, step_field(i, "act_times_w_scale"), N);
        }
        for (n = 0; n < N; n++) {
            fv[n] = rq_output_multiplier(atws[n], s_y); /* eq. L7 */
        }
        snprintf(what, sizeof what, "step %d output_multiplier", i);
        compare_f32(what, fv, step_field(i, "output_multiplier"), N);
    }
    if (rq == RQ_FBGEMM) {
        for (n = 0; n < N; n++) {
            fv[n] = rq_bias_term_per_channel(f32_at(bias, n), atws[n]); /* eq. L8b */
        }
        snprintf(what, sizeof what, "step %d bias_term", i);
        compare_f32(what, fv, step_field(i, "bias_term"), N);
        fv[0] = rq_bias_reciprocal_per_tensor(atws[0]); /* eq. L8c */
        snprintf(what, sizeof what, "step %d bias_rcp", i);
        compare_f32(what, fv, step_field(i, "bias_rcp"), 1);
    } else if (rq >= RQ_FBGEMM_FIXED_POINT) {
        const char *rule = str_of(step_field(i, "bias_rule"));
        for (n = 0; n < N; n++) { /* eq. I1 */
            float b = f32_at(bias, n);
            if (!has_bias) {
                iv[n] = 0;
            } else if (strcmp(rule, "fbgemm") == 0) {
                iv[n] = rq_quantize_bias_fbgemm(b, atws[n]);
            } else if (strcmp(rule, "tflite_legacy") == 0) {
                iv[n] = rq_quantize_bias_tflite(b, s_x, f32_at(s_w, n));
            } else {
                iv[n] = rq_quantize_bias_tflite_mlir(b, s_x, f32_at(s_w, n));
            }
        }
        snprintf(what, sizeof what, "step %d bias_i32 (rule %s)", i, rule);
        compare_i32("constant", what, iv, i32s(step_field(i, "bias_i32")), N, &n_constants);
        if (rq != RQ_FLOAT_INT32_BIAS) { /* eq. I2 */
            long refused = 0;
            for (n = 0; n < N; n++) {
                int32_t m = 0;
                int s = 0;
                if (rq == RQ_FBGEMM_FIXED_POINT) {
                    refused += rq_choose_requantization_multiplier(rq_output_multiplier(atws[n], s_y), &m, &s);
                } else {
                    double real = ((double)s_x * (double)f32_at(s_w, n)) / (double)s_y;
                    refused += rq_quantize_multiplier(real, rq == RQ_TFLITE_SINGLE_ROUNDING, &m, &s);
                }
                iv[n] = m;
                iv2[n] = s;
            }
            n_constants += refused;
            snprintf(what, sizeof what, "step %d requant_multiplier_i32", i);
            compare_i32("constant", what, iv, i32s(step_field(i, "requant_multiplier_i32")), N, &n_constants);
            snprintf(what, sizeof what, "step %d requant_shift", i);
            compare_i32("constant", what, iv2, i32s(step_field(i, "requant_shift")), N, &n_constants);
        }
    } else if (rq == RQ_QNNPACK) { /* eq. QN4 */
        const float inv_y = 1.0f / (float)f64_at(step_field(i, "requantization_output_scale"), 0);
        for (n = 0; n < N; n++) {
            float t = f32_at(s_w, n) * s_x;
            fv[n] = t * inv_y;
        }
        snprintf(what, sizeof what, "step %d requantization_scales", i);
        compare_f32(what, fv, step_field(i, "requantization_scales"), N);
    } else { /* onednn, eqs. DN1-DN3 and the compensation */
        const rqg_field *s_w64 = step_field(i, "weight_scales_f64");
        const float r_x = (float)(1.0 / s_x64), r_y = (float)(1.0 / s_y64);
        const float s_x1 = (float)(1.0 / (double)r_x), s_y1 = 1.0f / r_y;
        float one[1];
        one[0] = s_x1;
        snprintf(what, sizeof what, "step %d input_scale_onednn", i);
        compare_f32(what, one, step_field(i, "input_scale_onednn"), 1);
        one[0] = 1.0f / s_y1;
        snprintf(what, sizeof what, "step %d dst_multiplier", i);
        compare_f32(what, one, step_field(i, "dst_multiplier"), 1);
        for (n = 0; n < N; n++) {
            float r_w = per_channel ? 1.0f / f32_at(s_w, n) : (float)(1.0 / f64_at(s_w64, 0));
            fv[n] = r_w;
        }
        snprintf(what, sizeof what, "step %d weight_scales_reciprocal", i);
        compare_f32(what, fv, step_field(i, "weight_scales_reciprocal"), N);
        for (n = 0; n < N; n++) {
            fv[n] = s_x1 * (float)(1.0 / (double)fv[n]);
        }
        snprintf(what, sizeof what, "step %d output_scales", i);
        compare_f32(what, fv, step_field(i, "output_scales"), N);
        for (n = 0; n < N; n++) {
            int64_t row = 0;
            for (k = 0; k < K; k++) {
                row += w[n * K + k];
            }
            iv[n] = rq_wrap_i32(-(int64_t)zx * row);
        }
        snprintf(what, sizeof what, "step %d compensation", i);
        compare_i32("constant", what, iv, i32s(step_field(i, "compensation")), N, &n_constants);
    }
    free(iv);
    free(iv2);
    free(fv);
    free(atws);
}

/* ---- the program ------------------------------------------------------------------------------------------ */

static void run_step(int i, const tensor *in, tensor *out, const char *pass)
{
    const char *kind = str_of(step_field(i, "kind"));
    int64_t k;
    if (strcmp(kind, "quantize") == 0) {
        const char *rounding = str_of(step_field(i, "rounding"));
        const float inv = f32_at(step_field(i, "inverse_scale"), 0);
        const int32_t zp = (int32_t)int_of(step_field(i, "zero_point"));
        const int32_t qmin = (int32_t)int_of(step_field(i, "quant_min"));
        const int32_t qmax = (int32_t)int_of(step_field(i, "quant_max"));
        for (k = 0; k < in->count; k++) {
            int32_t q;
            if (strcmp(rounding, "fbgemm_legacy_fma") == 0) {
                q = rq_quantize_per_tensor(in->f[k], inv, zp, qmin, qmax);
            } else if (strcmp(rounding, "nearbyint_then_add") == 0) {
                q = rq_quantize_nearbyint_then_add(in->f[k], inv, zp, qmin, qmax);
            } else {
                q = rq_quantize_multiply_then_add(in->f[k], inv, zp, qmin, qmax);
            }
            out->u[k] = (uint8_t)q;
        }
    } else if (strcmp(kind, "dequantize") == 0) {
        const float scale = (float)f64_at(step_field(i, "scale"), 0);
        const int32_t zp = (int32_t)int_of(step_field(i, "zero_point"));
        for (k = 0; k < in->count; k++) {
            out->f[k] = rq_dequantize_per_tensor(in->u[k], zp, scale);
        }
    } else if (strcmp(kind, "relu") == 0) {
        const int32_t zp = (int32_t)int_of(step_field(i, "zero_point"));
        for (k = 0; k < in->count; k++) {
            if (in->dtype == RQG_UINT8) {
                out->u[k] = in->u[k] < zp ? (uint8_t)zp : in->u[k]; /* eq. F5 */
            } else {
                out->f[k] = in->f[k] < 0.0f ? 0.0f : in->f[k]; /* -0.0 and NaN pass */
            }
        }
    } else if (strcmp(kind, "identity") == 0 || strcmp(kind, "flatten") == 0) {
        if (in->dtype == RQG_UINT8) {
            memcpy(out->u, in->u, (size_t)in->count);
        } else {
            memcpy(out->f, in->f, (size_t)in->count * sizeof(float));
        }
    } else if (strcmp(kind, "linear") == 0) {
        const rqg_field *acc_f = step_field(i, "acc_i32"), *raw_f = step_field(i, "raw_i32");
        int32_t *acc = (int32_t *)calloc((size_t)acc_f->count, sizeof(int32_t));
        int32_t *raw = (int32_t *)calloc((size_t)raw_f->count, sizeof(int32_t));
        char what[96];
        if (acc == NULL || raw == NULL) {
            fail("out of memory", "accumulators");
        }
        run_linear(i, in, out, acc, raw);
        snprintf(what, sizeof what, "step %d acc_i32", i);
        compare_i32(pass, what, acc, i32s(acc_f), acc_f->count, &n_int32);
        snprintf(what, sizeof what, "step %d raw_i32", i);
        compare_i32(pass, what, raw, i32s(raw_f), raw_f->count, &n_int32);
        free(acc);
        free(raw);
    } else {
        fail("unknown step kind", kind);
    }
}

static void run_program(int chained, tensor *file)
{
    const char *pass = chained ? "chained" : "per-step";
    tensor *mine = (tensor *)calloc(RQG_NUM_TENSORS, sizeof(tensor));
    int i, t;
    if (mine == NULL) {
        fail("out of memory", "tensors");
    }
    tensor_of_file(&mine[0], 0);
    for (i = 0; i < RQG_NUM_STEPS; i++) {
        const int t_in = i32s(step_field(i, "inputs"))[0];
        const tensor *in = chained ? &mine[t_in] : &file[t_in];
        tensor_alloc(&mine[i + 1], file[i + 1].dtype, file[i + 1].count);
        run_step(i, in, &mine[i + 1], pass);
        compare_tensor(pass, i, &mine[i + 1], &file[i + 1]);
    }
    for (t = 0; t < RQG_NUM_TENSORS; t++) {
        tensor_free(&mine[t]);
    }
    free(mine);
}

int main(int argc, char **argv)
{
    tensor file[RQG_NUM_TENSORS];
    int i, t;
    verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
    if (strcmp(str_of(need("format")), "refquant-golden-model/2") == 0) {
        format_version = 2;
    } else if (strcmp(str_of(need("format")), "refquant-golden-model/1") == 0) {
        format_version = 1;
    } else {
        fail("not a program this runner knows", str_of(need("format")));
    }
    if (int_of(need("num_steps")) != RQG_NUM_STEPS) {
        fail("num_steps disagrees with RQG_NUM_STEPS", "num_steps");
    }
    check_float_views();
    for (i = 0; i < RQG_NUM_STEPS; i++) {
        const char *kind = str_of(step_field(i, "kind"));
        if (strcmp(kind, "linear") == 0) {
            check_linear_constants(i);
        } else if (strcmp(kind, "quantize") == 0) {
            float inv[1];
            char what[64];
            inv[0] = rq_inverse_scale((float)f64_at(step_field(i, "scale"), 0)); /* eq. Q0 */
            snprintf(what, sizeof what, "step %d inverse_scale", i);
            compare_f32(what, inv, step_field(i, "inverse_scale"), 1);
        }
    }
    for (t = 0; t < RQG_NUM_TENSORS; t++) {
        tensor_of_file(&file[t], t);
    }
    run_program(1, file);
    run_program(0, file);
    for (t = 0; t < RQG_NUM_TENSORS; t++) {
        tensor_free(&file[t]);
    }
    printf("RESULT differing_codes=%ld differing_float_bits=%ld differing_int32=%ld differing_constants=%ld "
           "float_views=%ld\n", n_codes, n_float_bits, n_int32, n_constants, n_views);
    return (n_codes || n_float_bits || n_int32 || n_constants || n_views) ? 1 : 0;
}
