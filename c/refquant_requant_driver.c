/*
 * refquant_requant_driver.c: a line-oriented driver for tests/test_c_reference.py.
 *
 * Reads one request per line from stdin, `<op> <arg> ...`, and prints one answer line per request. Integers are
 * decimal; floats travel as their bit patterns in hexadecimal (0x3f800000 for 1.0f, 16 hex digits for doubles),
 * so no value is ever rounded by printf/scanf. Unknown ops print "error".
 */
#include "refquant_requant.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float f32_of(const char *s)
{
    uint32_t u = (uint32_t)strtoul(s, NULL, 0);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double f64_of(const char *s)
{
    uint64_t u = (uint64_t)strtoull(s, NULL, 0);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static int32_t i32_of(const char *s)
{
    return (int32_t)strtoll(s, NULL, 10);
}

#define MAX_ARGS 12

int main(void)
{
    char line[1024];
    while (fgets(line, sizeof line, stdin) != NULL) {
        char *tok[MAX_ARGS + 1];
        int n = 0;
        char *p = strtok(line, " \t\r\n");
        while (p != NULL && n <= MAX_ARGS) {
            tok[n++] = p;
            p = strtok(NULL, " \t\r\n");
        }
        if (n == 0) {
            continue;
        }
#define ARG(i) (tok[(i) + 1])
#define IS(name, nargs) (strcmp(tok[0], (name)) == 0 && n == (nargs) + 1)
        if (IS("srmws", 3)) {
            printf("%" PRId64 "\n", rq_saturating_rounding_mul_with_shift(i32_of(ARG(0)), i32_of(ARG(1)),
                                                                        (int)i32_of(ARG(2))));
        } else if (IS("srdhm", 2)) {
            printf("%" PRId32 "\n", rq_saturating_rounding_doubling_high_mul(i32_of(ARG(0)), i32_of(ARG(1))));
        } else if (IS("rdbpot", 2)) {
            printf("%" PRId32 "\n", rq_rounding_divide_by_pot(i32_of(ARG(0)), (int)i32_of(ARG(1))));
        } else if (IS("mbqm", 3)) {
            printf("%" PRId32 "\n", rq_multiply_by_quantized_multiplier(i32_of(ARG(0)), i32_of(ARG(1)),
                                                                       (int)i32_of(ARG(2))));
        } else if (IS("mbqm1", 3)) {
            printf("%" PRId32 "\n", rq_multiply_by_quantized_multiplier_single_rounding(
                                        i32_of(ARG(0)), i32_of(ARG(1)), (int)i32_of(ARG(2))));
        } else if (IS("crm", 1)) {
            int32_t m = 0;
            int s = 0;
            int status = rq_choose_requantization_multiplier(f32_of(ARG(0)), &m, &s);
            printf("%d %" PRId32 " %d\n", status, status ? 0 : m, status ? 0 : s);
        } else if (IS("qm", 2)) {
            int32_t m = 0;
            int s = 0;
            int status = rq_quantize_multiplier(f64_of(ARG(0)), (int)i32_of(ARG(1)), &m, &s);
            printf("%d %" PRId32 " %d\n", status, status ? 0 : m, status ? 0 : s);
        } else if (IS("bias_fbgemm", 2)) {
            printf("%" PRId32 "\n", rq_quantize_bias_fbgemm(f32_of(ARG(0)), f32_of(ARG(1))));
        } else if (IS("bias_tflite", 3)) {
            printf("%" PRId32 "\n", rq_quantize_bias_tflite(f32_of(ARG(0)), f32_of(ARG(1)), f32_of(ARG(2))));
        } else if (IS("bias_mlir", 3)) {
            printf("%" PRId32 "\n", rq_quantize_bias_tflite_mlir(f32_of(ARG(0)), f32_of(ARG(1)), f32_of(ARG(2))));
        } else if (IS("rq_fbgemm_fixed_point", 7)) {
            printf("%" PRId32 "\n", rq_requantize_fbgemm_fixed_point(i32_of(ARG(0)), i32_of(ARG(1)), i32_of(ARG(2)),
                                                                    (int)i32_of(ARG(3)), i32_of(ARG(4)),
                                                                    i32_of(ARG(5)), i32_of(ARG(6))));
        } else if (IS("rq_tflite", 7)) {
            printf("%" PRId32 "\n", rq_requantize_tflite(i32_of(ARG(0)), i32_of(ARG(1)), i32_of(ARG(2)),
                                                        (int)i32_of(ARG(3)), i32_of(ARG(4)), i32_of(ARG(5)),
                                                        i32_of(ARG(6))));
        } else if (IS("rq_tflite_single_rounding", 7)) {
            printf("%" PRId32 "\n", rq_requantize_tflite_single_rounding(i32_of(ARG(0)), i32_of(ARG(1)),
                                                                        i32_of(ARG(2)), (int)i32_of(ARG(3)),
                                                                        i32_of(ARG(4)), i32_of(ARG(5)),
                                                                        i32_of(ARG(6))));
        } else if (IS("rq_float_int32_bias", 6)) {
            printf("%" PRId32 "\n", rq_requantize_float_int32_bias(i32_of(ARG(0)), i32_of(ARG(1)), f32_of(ARG(2)),
                                                                  i32_of(ARG(3)), i32_of(ARG(4)), i32_of(ARG(5))));
        } else if (IS("atws", 2)) {
            printf("0x%08" PRIx32 "\n", bits_of(rq_act_times_w_scale(f32_of(ARG(0)), f32_of(ARG(1)))));
        } else if (IS("omult", 2)) {
            printf("0x%08" PRIx32 "\n", bits_of(rq_output_multiplier(f32_of(ARG(0)), f32_of(ARG(1)))));
        } else if (IS("cvt", 1)) {
            printf("%" PRId32 "\n", rq_cvtps2dq(f32_of(ARG(0))));
        } else if (IS("lin_nb", 5)) { /* raw mult zp qmin qmax */
            printf("%" PRId32 "\n", rq_requantize_float_no_bias(i32_of(ARG(0)), f32_of(ARG(1)), i32_of(ARG(2)),
                                                               i32_of(ARG(3)), i32_of(ARG(4))));
        } else if (IS("lin_pc", 7)) { /* raw bias atws mult zp qmin qmax */
            float bias_term = rq_bias_term_per_channel(f32_of(ARG(1)), f32_of(ARG(2)));
            printf("%" PRId32 "\n", rq_requantize_float_per_channel(i32_of(ARG(0)), bias_term, f32_of(ARG(3)),
                                                                   i32_of(ARG(4)), i32_of(ARG(5)),
                                                                   i32_of(ARG(6))));
        } else if (IS("lin_pt", 7)) { /* raw bias atws mult zp qmin qmax */
            float rcp = rq_bias_reciprocal_per_tensor(f32_of(ARG(2)));
            printf("%" PRId32 "\n", rq_requantize_float_per_tensor(i32_of(ARG(0)), f32_of(ARG(1)), rcp,
                                                                  f32_of(ARG(3)), i32_of(ARG(4)), i32_of(ARG(5)),
                                                                  i32_of(ARG(6))));
        } else if (IS("quant", 5)) { /* x scale zp qmin qmax */
            float inv = rq_inverse_scale(f32_of(ARG(1)));
            printf("%" PRId32 "\n", rq_quantize_per_tensor(f32_of(ARG(0)), inv, i32_of(ARG(2)), i32_of(ARG(3)),
                                                          i32_of(ARG(4))));
        } else if (IS("dequant", 3)) { /* q zp scale */
            printf("0x%08" PRIx32 "\n", bits_of(rq_dequantize_per_tensor(i32_of(ARG(0)), i32_of(ARG(1)),
                                                                        f32_of(ARG(2)))));
        } else if (IS("rq_qnnpack", 6)) { /* raw bias_i32 scale zp out_min out_max */
            printf("%" PRId32 "\n", rq_requantize_qnnpack(i32_of(ARG(0)), i32_of(ARG(1)), f32_of(ARG(2)), i32_of(ARG(3)),
                                                         i32_of(ARG(4)), i32_of(ARG(5))));
        } else if (IS("rq_onednn", 11)) { /* raw kernel comp s_x' s_w' out_scale has_bias bias relu dst zp_f32 */
            printf("%" PRId32 "\n", rq_requantize_onednn(i32_of(ARG(0)), (int)i32_of(ARG(1)), i32_of(ARG(2)),
                                                        f32_of(ARG(3)), f32_of(ARG(4)), f32_of(ARG(5)),
                                                        (int)i32_of(ARG(6)), f32_of(ARG(7)), (int)i32_of(ARG(8)),
                                                        f32_of(ARG(9)), f32_of(ARG(10))));
        } else if (IS("quant_nbta", 5)) { /* x scale zp qmin qmax: nearbyint_then_add */
            float inv = rq_inverse_scale(f32_of(ARG(1)));
            printf("%" PRId32 "\n", rq_quantize_nearbyint_then_add(f32_of(ARG(0)), inv, i32_of(ARG(2)),
                                                                  i32_of(ARG(3)), i32_of(ARG(4))));
        } else if (IS("quant_mta", 5)) { /* x scale zp qmin qmax: multiply_then_add */
            float inv = rq_inverse_scale(f32_of(ARG(1)));
            printf("%" PRId32 "\n", rq_quantize_multiply_then_add(f32_of(ARG(0)), inv, i32_of(ARG(2)),
                                                                 i32_of(ARG(3)), i32_of(ARG(4))));
        } else {
            printf("error\n");
        }
#undef IS
#undef ARG
    }
    return 0;
}
