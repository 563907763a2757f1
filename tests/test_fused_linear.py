"""refquant.fused_linear: QuantizedLinear's one-pass call (product tiles + zero-point correction + requantization as
their epilogue) gives the bits of the readable stages, accumulate then requantize(readable=True), for every scheme
it serves, on random problems: rounding ties, ReLU, no bias, per-tensor and per-channel (affine) weights, 3-D input,
M = 1, K across several K blocks, int16-saturating pairs, the thread pool on and off, the portable kernel."""

from __future__ import annotations

import numpy as np
import pytest

import refquant.matmul as mm
from refquant._dispatch import SmallCalls
from refquant.engines import ENGINES, ONEDNN_KERNELS
from refquant.fixed_point import VARIANTS
from refquant.fused_linear import fused_kernel_serves, linear_fused, zero_point_corrected
from refquant.linear import QuantizedLinear
from refquant.matmul import KERNEL_ENV_VAR

from tests.parity import assert_same


@pytest.fixture(autouse=True)
def fused_at_every_size(monkeypatch):
    """The fused kernel at every shape here, also below refquant.matmul.KERNEL_MIN_MACS, where QuantizedLinear's
    call runs the NumPy stages instead (that dispatch: tests/test_linear.py)."""
    monkeypatch.setattr(mm, "_SMALL_PRODUCTS", SmallCalls(0))


def random_problem(rng, engine: str, M: int, K: int, N: int, i: int, **options):
    """A layer with random codes and constants, and a random (M, K) input. Every third problem aims at rounding
    ties: s_x = s_w = 1, s_y = 2^j, integer bias, x codes near z_x and small weights, so that y = (raw + bias) / 2^j
    is exactly some n + 1/2 for one raw in 2^j."""
    per_channel = bool(i % 2)
    affine = engine != "onednn" and i % 4 in (1, 2)  # onednn refuses nonzero weight zero points
    ties = i % 3 == 0
    zx, zy = int(rng.integers(0, 256)), int(rng.integers(0, 256))
    if ties:
        w_i8 = rng.integers(-3, 4, (N, K), dtype=np.int8)
        x_u8 = np.clip(zx + rng.integers(-3, 4, (M, K)), 0, 255).astype(np.uint8)
        w_scales = np.ones(N) if per_channel else 1.0
        s_x, s_y = 1.0, float(2.0 ** max(1, int(np.ceil(np.log2(3 * np.sqrt(K))))))
        bias = None if i % 5 == 0 else rng.integers(-50, 51, N).astype(np.float32)
    else:
        w_i8 = rng.integers(-128, 128, (N, K), dtype=np.int8)
        x_u8 = rng.integers(0, 256, (M, K), dtype=np.uint8)
        w_scales = rng.uniform(0.5, 2.0, N if per_channel else None) / 128 / np.sqrt(K)
        s_x, s_y = float(rng.uniform(0.005, 0.05)), float(rng.uniform(0.005, 0.1))
        bias = None if i % 5 == 0 else (rng.standard_normal(N) * 3).astype(np.float32)
    zps = (rng.integers(-20, 21, N if per_channel else None) if affine
           else np.zeros(N, np.int64) if per_channel else 0)
    relu = bool(rng.integers(0, 2))
    ql = QuantizedLinear.from_quantized(w_i8, w_scales, zps, bias, s_x, zx, s_y, zy, relu=relu, engine=engine,
                                        **options)
    return ql, x_u8


def check_fused_equals_readable(ql: QuantizedLinear, x_u8: np.ndarray, what: str) -> None:
    assert fused_kernel_serves(ql.requantizer, saturate_int16_pairs=ql.saturate_int16_pairs), what
    readable = ql.requantize(ql.accumulate(x_u8), readable=True)
    assert_same(ql(x_u8), readable, f"fused call vs readable stages, {what}")


SHAPES = [(1, 3, 5), (1, 1024, 70), (7, 100, 64), (13, 515, 130), (100, 1100, 65), (6, 4, 1)]


@pytest.mark.parametrize("engine", ENGINES)
def test_fused_call_equals_readable_stages(rng, engine):
    """Every engine's own float path: ties, ReLU, no bias, per-tensor / per-channel, affine weights, M = 1, K over
    three K blocks (1100 > 2·512) and past 2^24 (K >= 515), partial last panels (N = 70, 130, 65, 1)."""
    for i, (M, K, N) in enumerate(SHAPES * 2):
        ql, x_u8 = random_problem(rng, engine, M, K, N, i)
        check_fused_equals_readable(ql, x_u8, f"{engine} case {i} {(M, K, N)} {ql!r}")


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
def test_fused_call_with_int16_saturating_pairs(rng, engine):
    """saturate_int16_pairs=True (eq. M2, non-VNNI CPUs): the fused kernel runs the same vpmaddubsw tiles."""
    for i, (M, K, N) in enumerate(SHAPES):
        ql, x_u8 = random_problem(rng, engine, M, K, N, i, saturate_int16_pairs=True)
        check_fused_equals_readable(ql, x_u8, f"{engine} sat16 case {i}")


@pytest.mark.parametrize("kernel", ["avx2", "portable"])
def test_fused_call_with_int16_saturating_pairs_on_each_vector_kernel(rng, monkeypatch, kernel):
    """The same bits from kernel="avx2" (vpmaddubsw on ymm halves, the 1-row tile; auto's choice on AVX2-only
    CPUs) and "portable": fbgemm's eq. M2 and oneDNN gemm:jit's eq. M2b (K = 515, 1100 restart the pairs), over
    whole and partial panels (plain and masked stores) and the thread pool."""
    try:
        mm.kernel_for(kernel=kernel, saturate_int16_pairs=True)
    except RuntimeError as missing:
        pytest.skip(str(missing))
    monkeypatch.setattr(mm, "PARALLEL_MIN_MACS", 0)
    for i, (M, K, N) in enumerate(SHAPES + [(200, 302, 128), (97, 513, 200)]):
        for engine, options in (("fbgemm", {}), ("onednn", {"onednn_kernel": "gemm"})):
            ql, x_u8 = random_problem(rng, engine, M, K, N, i, saturate_int16_pairs=True, **options)
            what = f"{kernel} {engine} sat16 case {i} {(M, K, N)}"
            monkeypatch.setenv(KERNEL_ENV_VAR, "reference")  # the readable product (eq. M2 / M2b) and stages
            raw_i32 = ql.accumulate(x_u8)
            readable = ql.requantize(raw_i32, readable=True)
            monkeypatch.setenv(KERNEL_ENV_VAR, kernel)
            assert_same(ql.accumulate(x_u8), raw_i32, f"accumulate, {what}")
            assert_same(ql(x_u8), readable, f"fused call vs readable stages, {what}")


@pytest.mark.parametrize("kernel", ONEDNN_KERNELS)
def test_fused_call_every_onednn_kernel(rng, kernel):
    for i, (M, K, N) in enumerate(SHAPES):
        ql, x_u8 = random_problem(rng, "onednn", M, K, N, i, onednn_kernel=kernel)
        check_fused_equals_readable(ql, x_u8, f"onednn {kernel} case {i}")


def test_fused_call_keeps_shapes(rng):
    """3-D input (torch flattens to (M, K) and restores the leading dimensions); onednn's 1-D input and empty
    input's (0, N) output."""
    ql, _ = random_problem(rng, "fbgemm", 1, 40, 9, 1)
    x3 = rng.integers(0, 256, (2, 5, 40), dtype=np.uint8)
    y3 = ql(x3)
    assert y3.shape == (2, 5, 9)
    assert_same(y3, ql.requantize(ql.accumulate(x3), readable=True), "3-D input")
    qo, _ = random_problem(rng, "onednn", 1, 40, 9, 2)
    x1 = rng.integers(0, 256, 40, dtype=np.uint8)
    assert_same(qo(x1), qo.requantize(qo.accumulate(x1), readable=True), "onednn 1-D input")
    assert qo(np.zeros((0, 3, 40), np.uint8)).shape == (0, 9)
    assert ql(np.zeros((0, 3, 40), np.uint8)).shape == (0, 3, 9)


@pytest.mark.parametrize("pool", ["serial", "shared"])
def test_fused_call_with_and_without_the_thread_pool(rng, monkeypatch, pool):
    """The same bits whether the tasks run on this thread or are shared by three (refquant._threads)."""
    monkeypatch.setattr(mm, "PARALLEL_MIN_MACS", 0 if pool == "shared" else 1 << 62)
    monkeypatch.setattr(mm, "DEFAULT_THREADS", 3)
    for i, (M, K, N) in enumerate([(200, 600, 130), (97, 64, 200), (1, 1024, 300)]):
        for engine in ENGINES:
            ql, x_u8 = random_problem(rng, engine, M, K, N, i)
            check_fused_equals_readable(ql, x_u8, f"{pool} {engine} {i}")


def test_fused_call_on_the_portable_kernel(rng, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV_VAR, "portable")
    for i, (M, K, N) in enumerate([(5, 600, 70), (1, 8, 3)]):
        ql, x_u8 = random_problem(rng, "fbgemm", M, K, N, i)
        check_fused_equals_readable(ql, x_u8, f"portable case {i}")


def test_reference_kernel_is_not_fused_and_linear_fused_says_so(rng, monkeypatch):
    ql, x_u8 = random_problem(rng, "fbgemm", 3, 16, 4, 1)
    monkeypatch.setenv(KERNEL_ENV_VAR, "reference")
    assert not fused_kernel_serves(ql.requantizer)
    assert_same(ql(x_u8), ql.requantize(ql.accumulate(x_u8), readable=True), "reference kernel: the stages")
    with pytest.raises(ValueError, match="does not serve"):
        linear_fused(x_u8, ql._packed_weight, ql.col_offsets, ql.input_zero_point, ql.weight_zero_points,
                     ql.requantizer)


def test_zero_point_correction_wraps_as_accumulate_raw(rng):
    """The epilogue's per-element eq. L5 == accumulate_raw's NumPy int32 arithmetic, at the int32 extremes."""
    n = 4000
    ext = np.array([-2**31, 2**31 - 1, 0, -1], np.int64)
    acc = np.where(rng.random(n) < 0.3, rng.choice(ext, n), rng.integers(-2**31, 2**31, n)).astype(np.int32)
    zx_col = np.where(rng.random(n) < 0.3, rng.choice(ext, n), rng.integers(-2**31, 2**31, n)).astype(np.int32)
    zw = rng.integers(-128, 128, n).astype(np.int32)
    row_off = np.where(rng.random(n) < 0.3, rng.choice(ext, n), rng.integers(-2**31, 2**31, n)).astype(np.int32)
    expected = np.subtract(np.subtract(acc, zx_col, dtype=np.int32), np.multiply(row_off, zw, dtype=np.int32),
                           dtype=np.int32)
    got = np.array([zero_point_corrected(a, b, c, d) for a, b, c, d in zip(acc, zx_col, zw, row_off)], np.int32)
    assert_same(got, expected, "zero_point_corrected vs NumPy int32")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_call_integer_variants(rng, variant):
    """requantization=<integer variant> (refquant.fixed_point) through the same fused kernel, on every engine."""
    for i, (M, K, N) in enumerate(SHAPES):
        for engine in ENGINES:
            ql, x_u8 = random_problem(rng, engine, M, K, N, i + 1, requantization=variant)
            assert ql.requantizer.epilogue == f"integer_{variant}"
            check_fused_equals_readable(ql, x_u8, f"{variant} {engine} case {i}")


@pytest.mark.parametrize("engine", ENGINES)
def test_fused_dynamic_call_equals_readable_stages(rng, engine):
    """DynamicQuantizedLinear's call (eqs. DQ4, DQ5 through the fused kernel, float32 epilogues) == stages(readable=
    True)["output"], float32 bit patterns, for every engine and oneDNN kernel, with and without bias, per-tensor and
    per-channel weights, 3-D and empty input."""
    from refquant.dynamic import ONEDNN_KERNELS as DYNAMIC_ONEDNN_KERNELS, DynamicQuantizedLinear

    kernels = DYNAMIC_ONEDNN_KERNELS if engine == "onednn" else (None,)
    for i, (M, K, N) in enumerate(SHAPES + [(0, 5, 3)]):
        for kernel in kernels:
            w = rng.standard_normal((N, K)).astype(np.float32)
            bias = None if i % 3 == 0 else rng.standard_normal(N).astype(np.float32)
            kw = {"onednn_kernel": kernel} if kernel else {}
            qscheme = "per_channel_symmetric" if i % 2 else "per_tensor_symmetric"
            d = DynamicQuantizedLinear.from_float(w, bias, engine=engine, weight_qscheme=qscheme, **kw)
            x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10)).astype(np.float32)
            if i == 2:
                x = x.reshape(1, M, K)
            y = d(x)
            expected = d.stages(x, readable=True)["output"]
            assert y.shape == expected.shape and y.dtype == np.float32
            assert_same(y.view(np.uint32), expected.view(np.uint32), f"dynamic {engine} {kernel} case {i}")
