"""The 16-lane epilogue rows (refquant._lanes; <engine>_requantize_row, fused_linear.zero_point_corrected_row) give
the bits of the per-element functions and of the readable NumPy stages: random raw values and edge ones (rounding
ties, raw near ±2^31, INT32_MIN/MAX, saturation at 0 and 255), every engine's float path with a row function
(fbgemm, onednn with each oneDNN kernel), per-tensor and per-channel, bias or none, ReLU or not, rows of every
length 1..64 starting at any channel (the masked lanes past a row's end). The Numba drivers are
refquant.fused_linear's (so that an edit of refquant recompiles them, refquant._numba_cache)."""

from __future__ import annotations

import numpy as np
import pytest

import refquant.fixed_point as fp
import refquant.fused_linear as fl
from refquant.engines import ONEDNN_KERNELS
from refquant.linear import QuantizedLinear

from tests.parity import assert_same

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def edge_raw(rng, M: int, N: int, ties_step: int) -> np.ndarray:
    """Random int32 raw with a quarter of edge values: INT32_MIN/MAX, near ±2^31, 0, and multiples of half the
    step at which the output scale makes ties."""
    raw = rng.integers(-(2**20), 2**20, (M, N)).astype(np.int64)
    edges = np.array([INT32_MIN, INT32_MIN + 1, INT32_MAX, INT32_MAX - 1, -(2**31) + 64, 2**31 - 128, 0, 1, -1,
                      2**24 + 1, -(2**24) - 1], np.int64)
    pick = rng.random((M, N))
    raw = np.where(pick < 0.15, rng.choice(edges, (M, N)), raw)
    halves = (rng.integers(-600, 600, (M, N)) * 2 + 1) * (ties_step // 2)
    raw = np.where((pick >= 0.15) & (pick < 0.35), halves, raw)
    return raw.astype(np.int32)


def layers(rng, engine: str, N: int, **options):
    """Every combination of per-tensor/per-channel, bias/none, ReLU/not, with scales making ties (s_y = 2^j)
    half the time."""
    for per_channel in (False, True):
        for with_bias in (False, True):
            for relu in (False, True):
                for ties in (False, True):
                    K = 64
                    w_i8 = rng.integers(-128, 128, (N, K), dtype=np.int8)
                    if ties:
                        w_scales = np.ones(N) if per_channel else 1.0
                        s_x, s_y = 1.0, 16.0
                        bias = rng.integers(-50, 51, N).astype(np.float32) if with_bias else None
                    else:
                        w_scales = rng.uniform(0.5, 2.0, N if per_channel else None) / 1024
                        s_x, s_y = float(rng.uniform(0.005, 0.05)), float(rng.uniform(0.0005, 0.1))
                        bias = (rng.standard_normal(N) * 3).astype(np.float32) if with_bias else None
                    zps = np.zeros(N, np.int64) if per_channel else 0
                    zx, zy = int(rng.integers(0, 256)), int(rng.integers(0, 256))
                    yield QuantizedLinear.from_quantized(w_i8, w_scales, zps, bias, s_x, zx, s_y, zy, relu=relu,
                                                         engine=engine, **options), 16


def check_rows(rng, ql: QuantizedLinear, ties_step: int, what: str, raw: np.ndarray | None = None) -> None:
    rq = ql.requantizer
    assert rq.epilogue in fl._ROW_FUNCTIONS, what
    N = ql.out_features
    raw = edge_raw(rng, 9, N, ties_step) if raw is None else raw
    readable = ql.requantize(raw, readable=True)
    constants = rq.epilogue_constants()
    epilogue = fl.Epilogue(rq.epilogue)
    by_element = np.zeros(raw.shape, np.uint8)
    fl.requantize_rows_by_element(epilogue, raw, 0, constants, by_element)
    assert_same(by_element, readable, f"element function vs readable stages, {what}")
    for n0 in (0, 1, 15, 16, 17, N - 1):  # rows of every length, starting anywhere
        if not 0 <= n0 < N:
            continue
        by_row = np.full(raw.shape, 7, np.uint8)
        fl.requantize_rows_by_row_function(epilogue, raw, n0, constants, by_row)
        assert_same(by_row[:, n0:], by_element[:, n0:], f"row function vs element function, n0={n0}, {what}")
        assert (by_row[:, :n0] == 7).all(), f"row function wrote before channel n0={n0}, {what}"


@pytest.mark.parametrize("N", [1, 15, 16, 17, 64, 70])
def test_fbgemm_row_equals_element_and_readable(rng, N):
    for i, (ql, step) in enumerate(layers(rng, "fbgemm", N)):
        check_rows(rng, ql, step, f"fbgemm N={N} layer {i} {ql.requantizer!r}"[:400])


def test_fbgemm_row_keeps_the_per_tensor_bias_fma(rng):
    """Per-tensor weights: t = fmaf(bias, f32(1/atws), f32(raw)), ONE rounding (eq. L8c). With atws = 3 and mult =
    1, raw ≈ −bias/3 cancels the bias term's high bits, and a product rounded on its own first (vmulps then vaddps)
    moves some codes: the test first checks that these inputs tell the two apart."""
    from refquant._float32 import cvtps2dq, fmaf

    N, M = 64, 64
    rcp = np.float32(1 / np.float64(3.0))

    def codes(bias_f32, raw_i32):  # (fused, multiply-then-add) codes of t for these inputs
        fused = fmaf(bias_f32, rcp, raw_i32.astype(np.float32))
        separate = ((bias_f32 * rcp).astype(np.float32) + raw_i32.astype(np.float32)).astype(np.float32)
        return cvtps2dq(fused), cvtps2dq(separate)

    # candidates: 4096 biases x 200 raw offsets around -bias/3; keep 64 biases for which some offset separates the
    # two roundings, and put that offset in row 0 (the other rows: random offsets)
    candidates = (rng.integers(-2**20, 2**20, 4096) / 8).astype(np.float32)
    offsets = np.arange(-100, 100)
    near = -np.rint(candidates.astype(np.float64) / 3)
    trial = (near[:, None] + offsets[None, :]).astype(np.int32)
    fused, separate = codes(np.repeat(candidates[:, None], len(offsets), axis=1), trial)
    differs = fused != separate
    keep = np.flatnonzero(differs.any(axis=1))[:N]
    assert len(keep) == N, f"only {len(keep)} of 4096 biases separate FMA from multiply-then-add"
    bias = candidates[keep]
    raw = (near[keep][None, :] + rng.integers(-100, 100, (M, N))).astype(np.int32)
    raw[0] = trial[keep, differs[keep].argmax(axis=1)]
    fused, separate = codes(bias, raw)
    assert (fused != separate).any(), "inputs must separate FMA from multiply-then-add"
    ql = QuantizedLinear.from_quantized(rng.integers(-128, 128, (N, 8), dtype=np.int8), 3.0, 0, bias, 1.0, 0, 3.0,
                                        128, engine="fbgemm")
    assert ql.requantizer.bias_mode == 2  # FBGEMM_BIAS_FMA
    check_rows(rng, ql, 2, "fbgemm per-tensor bias FMA", raw=raw)


@pytest.mark.parametrize("kernel", ONEDNN_KERNELS)
@pytest.mark.parametrize("N", [1, 17, 64, 70])
def test_onednn_row_equals_element_and_readable(rng, kernel, N):
    for i, (ql, step) in enumerate(layers(rng, "onednn", N, onednn_kernel=kernel)):
        check_rows(rng, ql, step, f"onednn {kernel} N={N} layer {i}")


@pytest.mark.parametrize("kernel", ONEDNN_KERNELS)
@pytest.mark.parametrize("relu", [False, True])
def test_onednn_row_on_nan_and_inf(rng, kernel, relu):
    """Scales of 1e20: raw = 0 gives 0·inf = NaN on the kernels that multiply by f32(s_x'·s_w') (brgemm_amx: code
    255; gemm: 0), every other raw ±inf; the row function must saturate them as the element function does."""
    N = 40
    w_i8 = rng.integers(-128, 128, (N, 8), dtype=np.int8)
    bias = (rng.standard_normal(N) * 3).astype(np.float32)
    ql = QuantizedLinear.from_quantized(w_i8, 1e20, 0, bias, 1e20, 3, 1.0, 9, relu=relu, engine="onednn",
                                        onednn_kernel=kernel)
    raw = rng.integers(-3, 4, (9, N)).astype(np.int32)
    raw[0] = 0
    check_rows(rng, ql, 2, f"onednn {kernel} NaN/inf, relu={relu}", raw=raw)
    if kernel != "brgemm" and not relu:
        assert (ql.requantize(raw, readable=True)[0] == (0 if kernel == "gemm" else 255)).all()


def test_zero_point_correction_in_lanes_equals_the_scalar_one(rng):
    """int32 wrap of acc − zx_col − z_w·row_offset, with full-range values (the products overflow int32)."""
    for N in (1, 16, 33, 64):
        acc = rng.integers(INT32_MIN, INT32_MAX, (5, N), endpoint=True).astype(np.int32)
        zx_col = rng.integers(INT32_MIN, INT32_MAX, N, endpoint=True).astype(np.int32)
        zw = rng.integers(-128, 128, N).astype(np.int32)
        row_offsets = rng.integers(0, 255 * 4096, 5).astype(np.int32)
        for n0 in (0, N // 2):
            by_lanes = acc.copy()
            by_element = acc.copy()
            fl.zero_point_corrected_rows(acc, n0, zx_col, zw, row_offsets, by_lanes, by_element)
            exact = acc.astype(np.int64) - zx_col - zw.astype(np.int64) * row_offsets[:, None]
            wrapped = (((exact + 2**31) & 0xFFFFFFFF) - 2**31).astype(np.int32)
            assert_same(by_element[:, n0:], wrapped[:, n0:], f"zero_point_corrected vs exact, N={N}")
            assert_same(by_lanes, by_element, f"zero_point_corrected_row vs zero_point_corrected, N={N} n0={n0}")


@pytest.mark.parametrize("variant", fp.VARIANTS)
@pytest.mark.parametrize("N", [1, 17, 64, 70])
def test_integer_variant_row_equals_element_and_readable(rng, variant, N):
    """requantization=<integer variant> (refquant.fixed_point ``requantize_<variant>_row``) on the layers above."""
    for i, (ql, step) in enumerate(layers(rng, "fbgemm", N, requantization=variant)):
        check_rows(rng, ql, step, f"{variant} N={N} layer {i}")


# The integer rows on the constants' extremes: every shift the sources produce, multipliers at 0.5 (2^30), just
# below 1 (2^31 − 1), INT32_MIN (SaturatingRoundingDoublingHighMul's overflow), powers of two (which make ties),
# 0, ±1 and random ones; raws whose accumulators sit on the ties of each rounding, of both signs, at ±2^31, and large
# enough to saturate. coverage() proves that the raws reach each of these cases.

EXTREME_MULTIPLIERS = (2**30, 2**31 - 1, INT32_MIN, 0, 1, -1, -(2**30), "pow2", "pow2", "pow2", "random", "random")


def extreme_integer_constants(rng, variant: str, N: int, trial: int) -> fp.IntegerRequantization:
    """Per-channel constants of ``variant`` (N channels) cycling through the extremes, in a shuffled order; output
    ranges by trial: [0, 255] with z_y >= 128 (so that an int32 add of z_y to 2^31 − 128 would wrap), ReLU, and
    a narrow [10, 200]."""
    if variant == "float_int32_bias":
        mults = np.array([1.0, 2.0, 0.5, 2.0**-8, 2.0**-30, 1e-6, 1e30, -1.0, -2.0, np.float32(np.inf),
                          np.float32(np.nan)] + list(rng.uniform(-3, 3, 8)), np.float32)
        multiplier = shift = None
        output_multiplier = rng.permutation(np.resize(mults, N)).astype(np.float32)
    else:
        shifts = np.arange(1, 64) if variant == "fbgemm_fixed_point" else np.arange(-31, 31)
        shift = rng.permutation(np.resize(shifts, N)).astype(np.int32)
        multiplier = np.empty(N, np.int64)
        for n, kind in enumerate(rng.permutation(np.resize(np.array(EXTREME_MULTIPLIERS, object), N))):
            if kind == "pow2":
                multiplier[n] = 2 ** int(rng.integers(0, 31))
            elif kind == "random":
                multiplier[n] = rng.integers(INT32_MIN, INT32_MAX, endpoint=True)
            else:
                multiplier[n] = kind
        multiplier = multiplier.astype(np.int32)
        output_multiplier = np.ones(N, np.float32)
    bias = np.where(rng.random(N) < 0.3, 0, rng.integers(INT32_MIN, INT32_MAX, N, endpoint=True)).astype(np.int32)
    zp = int(rng.integers(*[(128, 256), (0, 128), (128, 201)][trial % 3]))
    quant_min, quant_max = [(0, 255), (zp, 255), (10, 200)][trial % 3]
    return fp.IntegerRequantization(variant=variant, bias_rule="fbgemm", bias_i32=bias,
                                    requant_multiplier_i32=multiplier, requant_shift=shift,
                                    output_multiplier_f32=output_multiplier, real_multiplier=np.ones(N),
                                    output_zero_point=zp, quant_min=quant_min, quant_max=quant_max)


def tie_exponents(rq: fp.IntegerRequantization, n: int) -> list[int]:
    """e such that accumulators ±odd·2^e put channel n's multiply exactly on a rounding tie (for a power-of-two
    multiplier 2^j): SRDHM's and RoundingDivideByPOT's (tflite), the one rounding's (fbgemm_fixed_point,
    tflite_single_rounding), the float multiply's half-way (float_int32_bias, multiplier 2^−j)."""
    if rq.variant == "float_int32_bias":
        j = -np.frexp(np.float64(rq.output_multiplier_f32[n]))[1] + 1  # 2^−j
        return [j - 1] if np.float64(rq.output_multiplier_f32[n]) == 2.0**-j else []
    m = int(rq.requant_multiplier_i32[n])
    if m <= 0 or m & (m - 1):
        return []
    j = m.bit_length() - 1
    s = int(rq.requant_shift[n])
    if rq.variant == "tflite":
        left, right = max(s, 0), max(-s, 0)
        return [30 - j - left] + ([right - 1 + 31 - j - left] if right else [])
    total = s if rq.variant == "fbgemm_fixed_point" else 31 - s
    return [total - 1 - j]


def extreme_integer_raw(rng, rq: fp.IntegerRequantization, rows: int) -> np.ndarray:
    """(rows, N) raw: per channel, accumulators on its ties (±odd·2^e, and ±1 around them), at INT32_MIN (with
    an INT32_MIN multiplier: the overflow, also through the left shift), INT32_MAX, small and full-range random."""
    N = len(rq.bias_i32)
    acc = rng.integers(INT32_MIN, INT32_MAX, (rows, N), endpoint=True)
    acc[rows // 4: rows // 2] >>= rng.integers(8, 31, (rows // 2 - rows // 4, N))
    for n in range(N):
        fixed = [INT32_MIN, INT32_MAX, INT32_MIN + 1, 2**31 - 128, 0, 1, -1]  # 2^31 − 128: the largest float32 < 2^31
        if rq.variant.startswith("tflite") and rq.requant_shift[n] > 0:
            fixed.append(2 ** (31 - int(rq.requant_shift[n])))  # acc·2^left wraps to INT32_MIN
        for e in tie_exponents(rq, n):
            if 0 <= e <= 30:
                odd = (rng.integers(0, 2 ** (30 - e) if e < 30 else 1, 6) * 2 + 1) * np.array([1, -1] * 3)
                fixed += [int(v) for v in odd * 2**e + np.array([0, 0, 1, -1, 0, 0])]
        fixed = [v for v in fixed if INT32_MIN <= v <= INT32_MAX][: rows // 2]
        acc[rows - len(fixed):, n] = fixed
    raw = acc - rq.bias_i32.astype(np.int64)  # acc = wrap32(raw + bias)
    return fp.wrap_int32(raw)


def coverage(rq: fp.IntegerRequantization, raw: np.ndarray) -> set[str]:
    """The cases these inputs reach, computed with the readable functions of refquant.fixed_point."""
    acc = fp.wrap_int32(raw.astype(np.int64) + rq.bias_i32).astype(np.int64)
    out = fp.requantize_integer_readable(raw, rq)
    reached = set()
    inside = (out > rq.quant_min) & (out < rq.quant_max)
    if (out == rq.quant_min).any() and (out == rq.quant_max).any() and inside.any():
        reached.add("saturation and inside")
    if (np.abs(acc) >= 2**31 - 1).any():
        reached.add("±2^31")

    def ties(v, e, name):  # v / 2^e exactly half-way, for v > 0 and v < 0
        e = np.broadcast_to(np.asarray(e, np.int64), v.shape)
        ok = e >= 1
        rem = np.where(ok, v & ((np.int64(1) << np.where(ok, e, 1)) - 1), -1)
        half = np.where(ok, np.int64(1) << np.where(ok, e - 1, 0), -2)
        tie = ok & (rem == half)
        if (tie & (v > 0)).any() and (tie & (v < 0)).any():
            reached.add(name)

    if rq.variant == "float_int32_bias":
        with np.errstate(over="ignore", invalid="ignore"):
            y = acc.astype(np.float32) * rq.output_multiplier_f32
            frac = np.abs(y.astype(np.float64) - np.trunc(y.astype(np.float64)))
        if ((frac == 0.5) & (y > 0)).any() and ((frac == 0.5) & (y < 0)).any():
            reached.add("ties")
        if (~np.isfinite(y) | (np.abs(y) >= 2.0**31)).any():
            reached.add("out of int32")
        if (np.where(np.abs(y) < 2.0**31, y, 0).astype(np.int64) + rq.output_zero_point > INT32_MAX).any():
            reached.add("z_y add beyond int32")
        return reached
    m = rq.requant_multiplier_i32.astype(np.int64)
    s = rq.requant_shift.astype(np.int64)
    if rq.variant == "tflite":
        left, right = np.maximum(s, 0), np.maximum(-s, 0)
        x = fp.wrap_int32(acc << left).astype(np.int64)
        ties(x * m, 31, "SRDHM ties")
        if ((x == INT32_MIN) & (m == INT32_MIN)).any():
            reached.add("INT32_MIN·INT32_MIN")
        ties(fp.saturating_rounding_doubling_high_mul(x, m).astype(np.int64), right, "RDBPOT ties")
    elif rq.variant == "fbgemm_fixed_point":
        ties(acc * m, s, "ties")
        q = fp.saturating_rounding_mul_with_shift(acc, m, s) + rq.output_zero_point
        if (q > INT32_MAX).any() and (q < INT32_MIN).any():
            reached.add("z_y add beyond int32")
    else:
        ties(acc * m, 31 - s, "ties")
    return reached


EXPECTED_COVERAGE = {"tflite": {"SRDHM ties", "RDBPOT ties", "INT32_MIN·INT32_MIN"},
                     "fbgemm_fixed_point": {"ties", "z_y add beyond int32"}, "tflite_single_rounding": {"ties"},
                     "float_int32_bias": {"ties", "out of int32"}}


@pytest.mark.parametrize("variant", fp.VARIANTS)
def test_integer_rows_on_extreme_constants(rng, variant):
    """Row == element == readable for every row start n0 and every length (N = 1..70 - n0), on extreme constants
    and raws; the inputs provably reach every tie, the overflow and the saturation (coverage())."""
    N = 70
    for trial in range(3):
        rq = extreme_integer_constants(rng, variant, N, trial)
        raw = extreme_integer_raw(rng, rq, 48)
        expected = EXPECTED_COVERAGE[variant] | {"saturation and inside", "±2^31"}
        if variant == "float_int32_bias" and rq.output_zero_point >= 128:
            expected = expected | {"z_y add beyond int32"}
        assert coverage(rq, raw) >= expected, f"{variant} trial {trial}: the inputs miss {expected - coverage(rq, raw)}"
        requantizer = fp.IntegerRequantizer.from_constants(rq, N)
        epilogue = fl.Epilogue(requantizer.epilogue)
        assert epilogue.name in fl._ROW_FUNCTIONS
        constants = requantizer.epilogue_constants()
        readable = fp.requantize_integer_readable(raw, rq)
        by_element = np.zeros(raw.shape, np.uint8)
        fl.requantize_rows_by_element(epilogue, raw, 0, constants, by_element)
        assert_same(by_element, readable, f"{variant} element function vs readable, trial {trial}")
        for end in range(1, N + 1):  # rows raw[:, n0:end]: every start and length
            raw_end = np.ascontiguousarray(raw[:, :end])
            for n0 in range(end):
                by_row = np.full(raw_end.shape, 7, np.uint8)
                fl.requantize_rows_by_row_function(epilogue, raw_end, n0, constants, by_row)
                assert_same(by_row[:, n0:], by_element[:, n0:end], f"{variant} row n0={n0} end={end}, trial {trial}")
                assert (by_row[:, :n0] == 7).all(), f"{variant} row function wrote before n0={n0}"


def test_fbgemm_fixed_point_row_on_its_one_int64_overflow():
    """acc = M = INT32_MIN with s = 63: the scalar's (and FBGEMM's) int64 sum 2^62 + 2^62 wraps to −2^63, so the
    rounded product is −1; the 16-lane row function must give the same code (a seed of the random test above met it
    once: 145 against 143), next to the neighbouring cases that do not wrap."""
    N = 16
    multiplier = np.full(N, INT32_MIN, np.int32)
    multiplier[8:] = INT32_MAX
    shift = np.array([63, 62] * 8, np.int32)
    rq = fp.IntegerRequantization(variant="fbgemm_fixed_point", bias_rule="fbgemm", bias_i32=np.zeros(N, np.int32),
                                  requant_multiplier_i32=multiplier, requant_shift=shift,
                                  output_multiplier_f32=np.ones(N, np.float32), real_multiplier=np.ones(N),
                                  output_zero_point=144, quant_min=0, quant_max=255)
    raw = np.array([[INT32_MIN] * N, [INT32_MIN + 1] * N, [INT32_MAX] * N, [0] * N], np.int32)
    readable = fp.requantize_integer_readable(raw, rq)
    assert readable[0, 0] == 143  # z_y + (−1): the wrap, as documented in fixed_point.saturating_rounding_mul_with_shift
    requantizer = fp.IntegerRequantizer.from_constants(rq, N)
    epilogue = fl.Epilogue(requantizer.epilogue)
    constants = requantizer.epilogue_constants()
    by_element = np.zeros(raw.shape, np.uint8)
    fl.requantize_rows_by_element(epilogue, raw, 0, constants, by_element)
    by_row = np.zeros(raw.shape, np.uint8)
    fl.requantize_rows_by_row_function(epilogue, raw, 0, constants, by_row)
    assert_same(by_element, readable, "element function vs readable")
    assert_same(by_row, readable, "row function vs readable")


def test_every_row_function_is_registered_with_its_element_function():
    """The engines' float paths served with a row function (the others loop over their element function)."""
    assert {"fbgemm", "onednn"} | {f"integer_{v}" for v in fp.VARIANTS} <= set(fl._ROW_FUNCTIONS)
    assert set(fl._ROW_FUNCTIONS) <= set(fl._EPILOGUE_FUNCTIONS)
