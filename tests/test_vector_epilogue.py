"""The 16-lane epilogue rows (refquant._lanes; <engine>_requantize_row, fused_linear.zero_point_corrected_row) give
the bits of the per-element functions and of the readable NumPy stages: random raw values and edge ones (rounding
ties, raw near ±2^31, INT32_MIN/MAX, saturation at 0 and 255), every engine's float path with a row function
(fbgemm, onednn with each oneDNN kernel), per-tensor and per-channel, bias or none, ReLU or not, rows of every
length 1..64 starting at any channel (the masked lanes past a row's end). The Numba drivers are
refquant.fused_linear's (so that an edit of refquant recompiles them, refquant._numba_cache)."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.mark.parametrize("N", [1, 17, 64, 70])
def test_tflite_row_equals_element_and_readable(rng, N):
    """requantization="tflite" (Q31 doubling high multiply + rounding right shift, in int64 lanes)."""
    for i, (ql, step) in enumerate(layers(rng, "fbgemm", N, requantization="tflite")):
        check_rows(rng, ql, step, f"tflite N={N} layer {i}")


def test_every_row_function_is_registered_with_its_element_function():
    """The engines' float paths served with a row function (the others loop over their element function)."""
    assert {"fbgemm", "onednn", "integer_tflite"} <= set(fl._ROW_FUNCTIONS)
    assert set(fl._ROW_FUNCTIONS) <= set(fl._EPILOGUE_FUNCTIONS)
