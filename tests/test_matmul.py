"""refquant.matmul: every fast kernel gives the readable references' bits, for eq. M1 (exact int32 sums, as
``vpdpbusd``) and eq. M2 (int16-saturated pairs, as ``vpmaddubsw``); golden values derived by hand.

The fast kernels run on both paths on an AVX-512 VNNI machine: ``kernel="avx512"`` (the instructions fbgemm uses)
and ``kernel="portable"`` (LLVM's generic vector operations, the fallback for other CPUs), also chosen through the
environment variable REFQUANT_MATMUL_KERNEL. torch itself checks eq. M2 through QuantizedLinear in
tests/test_linear.py (test_saturate_int16_pairs_matches_torch_without_vnni).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba.core import config as numba_config

from parity import assert_same
from refquant import matmul as mm
from refquant.matmul import (
    KERNEL_ENV_VAR,
    SEVEN_BIT_MAX_CODE,
    PackedWeightS8,
    kernel_for,
    kernel_for_seven_bit_codes,
    matmul_u8s8_acc32,
    matmul_u8s8_acc32_ref,
    matmul_u8s8_acc32_sat16_blocks_ref,
    matmul_u8s8_acc32_sat16_ref,
    pack_weight_s8,
    pairs_restart,
)


def _marks(kernel: str, saturate: bool) -> list:
    """Skip the avx512 kernels where the CPU lacks their instructions (vpdpbusd: avx512vnni; vpmaddubsw: avx512bw),
    and the Numba kernels under NUMBA_DISABLE_JIT=1. The reference always runs (it is what the others must equal)."""
    if kernel == "reference":
        return []
    try:
        kernel_for(kernel=kernel, saturate_int16_pairs=saturate)
    except RuntimeError as missing:
        return [pytest.mark.skip(reason=str(missing))]
    return []


def _cases(kernels: list[str]) -> list:
    return [pytest.param(k, s, id=f"{k}-{'M2' if s else 'M1'}", marks=_marks(k, s))
            for s in (False, True) for k in kernels]


needs_jit = pytest.mark.skipif(numba_config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT=1: only the reference runs")
FAST_KERNELS_AND_MODES = _cases(["avx512", "avx2", "portable"])  # (kernel, saturate_int16_pairs)
KERNELS_AND_MODES = _cases(["avx512", "avx2", "portable", "reference"])


def reference(x_u8: np.ndarray, w_i8: np.ndarray, saturate: bool) -> np.ndarray:
    return matmul_u8s8_acc32_sat16_ref(x_u8, w_i8) if saturate else matmul_u8s8_acc32_ref(x_u8, w_i8)


def draw(rng: np.random.Generator, shape, kind: str, dtype) -> np.ndarray:
    """uint8 codes (dtype np.uint8) or int8 codes (np.int8) of one distribution."""
    info = np.iinfo(dtype)
    if kind == "uniform":  # the full range
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if kind == "extremes":  # only the two ends: 0 / 255 and -128 / 127, where pairs saturate most
        return np.where(rng.random(shape) < 0.5, info.min, info.max).astype(dtype)
    if kind == "max_magnitude":  # 255 and -128 everywhere: the largest negative products
        return np.full(shape, info.max if dtype == np.uint8 else info.min, dtype)
    if kind == "sparse":  # mostly zero, some extremes
        values = np.where(rng.random(shape) < 0.5, info.min, info.max).astype(dtype)
        return np.where(rng.random(shape) < 0.9, 0, values).astype(dtype)
    if kind == "seven_bit":  # reduce_range activations 0..127; weights stay full range
        if dtype == np.uint8:
            return rng.integers(0, 127, shape, dtype=dtype, endpoint=True)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    raise ValueError(kind)


KINDS = ["uniform", "extremes", "max_magnitude", "sparse", "seven_bit"]

# (M, K, N): 1 up to > 4096 in each dimension; below, at and above every block size (4 k per lane, 16 lanes,
# 64-column panels, tiles of 6, 2 and 1 rows, 96-row tasks, 512-k blocks) and over the serial/parallel threshold
# (PARALLEL_MIN_MACS = 2^22 multiply-adds)
SHAPES = [
    (1, 1, 1), (1, 3, 3), (2, 1, 17), (1, 2, 1), (3, 5, 2), (5, 4, 16), (6, 4, 64), (7, 13, 70), (8, 8, 65),
    (11, 17, 63), (12, 3, 15), (13, 255, 127), (18, 257, 129), (95, 33, 191), (96, 64, 128), (97, 100, 1),
    (193, 7, 66), (1, 1030, 257), (4099, 5, 7), (3, 4097, 9), (5, 11, 4100), (2, 4, 4096), (130, 1031, 200),
    (301, 257, 66), (64, 1024, 1024), (9, 512, 70), (7, 516, 65), (98, 1536, 64), (20, 2051, 3),
]


# ----------------------------------------------------------------------------------------------------------------
# Golden values derived by hand
# ----------------------------------------------------------------------------------------------------------------

# (x row, w row, eq. M1, eq. M2)
GOLDEN = [
    ([255, 255], [-128, -128], -65280, -32768),  # 2 * 255 * -128 = -65280 saturates to -32768
    ([255, 255], [127, 127], 64770, 32767),  # 2 * 255 * 127 = 64770 saturates to 32767
    ([255, 255, 255, 255], [-128, -128, 127, 127], -510, -1),  # -32768 + 32767
    ([255, 255, 255, 255], [127, -128, -128, 127], -510, -510),  # pairs (0,1), (2,3): -255 each; (1,2) would saturate
    ([255, 255, 255], [-128, -128, -128], -97920, -65408),  # odd K: k = 2 pairs with a zero, -32768 + -32640
    ([0, 255], [-128, -128], -32640, -32640),  # one product alone never saturates
    ([128, 128], [-128, -128], -32768, -32768),  # exactly int16's minimum: no clipping needed
    ([129, 127], [127, 127], 32512, 32512),  # 127 * 256 = 32512 < 32767
    ([1, 2, 3, 4, 5], [1, -1, 2, -2, 3], 12, 12),  # 1 - 2 + 6 - 8 + 15
    ([255], [127], 32385, 32385),  # K = 1
]


@pytest.mark.parametrize("kernel, saturate", KERNELS_AND_MODES)
@pytest.mark.parametrize("x_row, w_row, m1, m2", GOLDEN)
def test_golden_products(kernel, saturate, x_row, w_row, m1, m2, rng):
    """The hand-derived sum, at every position of a larger product (all tile rows, all lanes of all panels)."""
    K = len(x_row)
    M, N = 13, 70  # 2 six-row tiles + 1 row; a full panel of 64 columns + 6
    x_u8 = draw(rng, (M, K), "uniform", np.uint8)
    w_i8 = draw(rng, (N, K), "uniform", np.int8)
    rows = [0, 5, 6, 11, 12]
    cols = [0, 15, 16, 31, 47, 63, 64, 69]
    x_u8[rows] = x_row
    w_i8[cols] = w_row
    acc_i32 = matmul_u8s8_acc32(x_u8, pack_weight_s8(w_i8), saturate_int16_pairs=saturate, kernel=kernel)
    expected = np.full((len(rows), len(cols)), m2 if saturate else m1, np.int32)
    assert_same(acc_i32[np.ix_(rows, cols)], expected, "golden sums")


@pytest.mark.parametrize("kernel, saturate", KERNELS_AND_MODES)
def test_golden_int32_wraps(kernel, saturate):
    """K large enough that the int32 sum wraps, as fbgemm's ``vpaddd`` / ``vpdpbusd`` do.

    M1: 65794 products of 255 * -128 = -32640 sum to -2,147,516,160 < -2^31, which wraps to 2,147,451,136.
    M2: 65537 pairs, each saturated to -32768, sum to -2,147,516,416, which wraps to 2,147,450,880.
    """
    K = 131074 if saturate else 65794
    x_u8 = np.full((7, K), 255, np.uint8)
    w_i8 = np.full((66, K), -128, np.int8)
    if kernel == "reference":  # the readable M2 loop is slow at this K: one row and column show the same
        x_u8, w_i8 = x_u8[:1], w_i8[:1]
    acc_i32 = matmul_u8s8_acc32(x_u8, w_i8, saturate_int16_pairs=saturate, kernel=kernel)
    expected = 2_147_450_880 if saturate else 2_147_451_136
    assert_same(acc_i32, np.full(acc_i32.shape, expected, np.int32), "wrapped int32 sums")


def test_golden_m2_no_wrap_below_the_limit():
    """M2 with 32897 saturated pairs: -32768 * 32897 = -1,077,968,896, far from wrapping; M1 wraps there."""
    x_u8 = np.full((1, 65794), 255, np.uint8)
    w_i8 = np.full((1, 65794), -128, np.int8)
    assert matmul_u8s8_acc32_sat16_ref(x_u8, w_i8)[0, 0] == -1_077_968_896
    assert matmul_u8s8_acc32_ref(x_u8, w_i8)[0, 0] == 2_147_451_136


# ----------------------------------------------------------------------------------------------------------------
# Fast kernels == readable references, exactly
# ----------------------------------------------------------------------------------------------------------------

def check_fast_equals_reference(rng, kernel, saturate, M, K, N):
    """One (M, K, N) problem with random distributions of x and w: the fast kernel's sums == the reference's."""
    kind_x, kind_w = rng.choice(KINDS, 2)
    x_u8 = draw(rng, (M, K), kind_x, np.uint8)
    w_i8 = draw(rng, (N, K), kind_w, np.int8)
    acc_i32 = matmul_u8s8_acc32(x_u8, pack_weight_s8(w_i8), saturate_int16_pairs=saturate, kernel=kernel)
    assert_same(acc_i32, reference(x_u8, w_i8, saturate), f"(M, K, N) = {(M, K, N)}, x {kind_x}, w {kind_w}")


@pytest.mark.parametrize("kernel, saturate", FAST_KERNELS_AND_MODES)
def test_fast_equals_reference_on_shapes(kernel, saturate, rng):
    for M, K, N in SHAPES:
        check_fast_equals_reference(rng, kernel, saturate, M, K, N)


@pytest.mark.parametrize("kernel, saturate", FAST_KERNELS_AND_MODES)
def test_fast_equals_reference_on_random_shapes(kernel, saturate, rng):
    """Random (M, K, N), log-uniform up to 2000, every distribution."""
    for _ in range(40):
        M, K, N = np.exp(rng.uniform(0, np.log(2000), 3)).astype(int)
        while M * K * N > 4_000_000:  # keep the readable references quick
            M, K, N = max(1, M // 2), K, max(1, N // 2)
        check_fast_equals_reference(rng, kernel, saturate, M, K, N)


@pytest.mark.parametrize("kernel, saturate", FAST_KERNELS_AND_MODES)
def test_fast_equals_reference_when_int32_wraps(kernel, saturate, rng):
    """Random extremes with K = 70,001 (odd): partial sums cross +-2^31 and wrap."""
    K = 70_001
    x_u8 = draw(rng, (7, K), "extremes", np.uint8)
    x_u8[0] = 255
    w_i8 = draw(rng, (3, K), "extremes", np.int8)
    w_i8[0] = -128
    acc_i32 = matmul_u8s8_acc32(x_u8, w_i8, saturate_int16_pairs=saturate, kernel=kernel)
    assert_same(acc_i32, reference(x_u8, w_i8, saturate), "large-K sums")
    if not saturate:  # the first row and column wrap: 70001 * -32640 < -2^31
        assert acc_i32[0, 0] == np.int64(70_001 * -32640 + 2**32)


@pytest.mark.parametrize("kernel, saturate", FAST_KERNELS_AND_MODES)
def test_non_contiguous_inputs(kernel, saturate, rng):
    """Strided, transposed (Fortran-ordered) and reversed views of x, and of a raw (unpacked) weight."""
    x_big = draw(rng, (40, 3 * 67), "uniform", np.uint8)
    w_big = draw(rng, (2 * 70, 67), "extremes", np.int8)
    x_views = [x_big[::2, 1::3], np.asfortranarray(x_big[:20, :67]), x_big[:20, 67:134][::-1, ::-1]]
    w_views = [w_big[::2], np.asfortranarray(w_big[:70]), w_big[70:][::-1, ::-1]]
    for x_u8 in x_views:
        for w_i8 in w_views:
            expected = reference(np.ascontiguousarray(x_u8), np.ascontiguousarray(w_i8), saturate)
            assert_same(matmul_u8s8_acc32(x_u8, w_i8, saturate_int16_pairs=saturate, kernel=kernel), expected,
                        "raw weight view")
            assert_same(matmul_u8s8_acc32(x_u8, pack_weight_s8(w_i8), saturate_int16_pairs=saturate, kernel=kernel),
                        expected, "packed weight view")


@pytest.mark.parametrize("kernel, saturate", KERNELS_AND_MODES)
@pytest.mark.parametrize("M, K, N", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_empty_shapes(kernel, saturate, M, K, N):
    """Empty products: an (M, N) int32 array, zeros where K = 0."""
    x_u8 = np.zeros((M, K), np.uint8)
    w_i8 = np.ones((N, K), np.int8)
    acc_i32 = matmul_u8s8_acc32(x_u8, w_i8, saturate_int16_pairs=saturate, kernel=kernel)
    assert_same(acc_i32, np.zeros((M, N), np.int32), "empty product")


# ----------------------------------------------------------------------------------------------------------------
# Properties of eq. M2
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, saturate", [p for p in KERNELS_AND_MODES if p.values[1]])
def test_seven_bit_activations_never_saturate(kernel, saturate, rng):
    """With x <= 127 (reduce_range) a pair sum is at most 2 * 127 * 128 = 32512 < 2^15: M2 == M1 exactly."""
    x_u8 = draw(rng, (50, 301), "seven_bit", np.uint8)
    x_u8[0] = 127
    w_i8 = draw(rng, (70, 301), "extremes", np.int8)
    w_i8[0] = -128
    acc_m2 = matmul_u8s8_acc32(x_u8, w_i8, saturate_int16_pairs=saturate, kernel=kernel)
    assert_same(acc_m2, matmul_u8s8_acc32_ref(x_u8, w_i8), "M2 with 7-bit activations vs M1")


@pytest.mark.parametrize("kernel, saturate", [p for p in KERNELS_AND_MODES if p.values[1]])
def test_full_range_activations_saturate(kernel, saturate, rng):
    """With x up to 255 some pairs saturate: M2 != M1, each of the 32 pairs off by at most 65280 - 32767."""
    x_u8 = draw(rng, (30, 64), "extremes", np.uint8)
    w_i8 = draw(rng, (40, 64), "extremes", np.int8)
    acc_m1 = matmul_u8s8_acc32_ref(x_u8, w_i8)
    acc_m2 = matmul_u8s8_acc32(x_u8, w_i8, saturate_int16_pairs=saturate, kernel=kernel)
    assert (acc_m1 != acc_m2).any()
    assert (np.abs(acc_m2.astype(np.int64) - acc_m1) <= 32 * 32513).all()


# ----------------------------------------------------------------------------------------------------------------
# Eq. M2b: pairs that restart at a K block (oneDNN's gemm:jit)
# ----------------------------------------------------------------------------------------------------------------

def test_golden_pairs_restart():
    """K = 3, the second block from k = 1: pairs (0, pad), (1, 2) instead of eq. M2's (0, 1), (2, pad)."""
    x_u8 = np.array([[255, 255, 255]], np.uint8)
    w_i8 = np.array([[127, -128, -128]], np.int8)
    assert matmul_u8s8_acc32_sat16_ref(x_u8, w_i8)[0, 0] == -255 - 32640  # (127 - 128)·255, then -128·255
    assert matmul_u8s8_acc32_sat16_blocks_ref(x_u8, w_i8, 1)[0, 0] == 32385 - 32768  # 127·255, sat(-65280)
    restart = pairs_restart(w_i8, 1)
    assert_same(restart.input(x_u8), np.array([[255, 0, 255, 255]], np.uint8), "the inserted zero k")
    assert pairs_restart(w_i8, 2) is None and pairs_restart(w_i8, None) is None  # even k: eq. M2 already


@pytest.mark.parametrize("kernel, saturate", [p for p in KERNELS_AND_MODES if p.values[1]])
@pytest.mark.parametrize("kind", ["uniform", "extremes", "max_magnitude", "sparse"])
def test_pairs_restart_equals_the_two_blocks(kernel, saturate, kind, rng):
    """Eq. M2 of the operands with the zero k (every kernel) equals eq. M2b written as two blocks, at oneDNN's
    split points and elsewhere, and differs from eq. M2 where pairs leave int16."""
    differs = False
    for M, K, N in [(1, 257, 3), (7, 301, 64), (40, 513, 70), (3, 765, 17), (97, 259, 5), (2, 5, 1)]:
        k = K // 2 if (K // 2) % 2 else K // 2 + 1
        x_u8 = draw(rng, (M, K), kind, np.uint8)
        w_i8 = draw(rng, (N, K), kind, np.int8)
        restart = pairs_restart(w_i8, k)
        got = matmul_u8s8_acc32(restart.input(x_u8), restart.packed, saturate_int16_pairs=True, kernel=kernel)
        expected = matmul_u8s8_acc32_sat16_blocks_ref(x_u8, w_i8, k)
        assert_same(got, expected, f"eq. M2b, kernel {kernel}, (M, K, N) = {(M, K, N)}, k = {k}, {kind}")
        differs |= not np.array_equal(expected, matmul_u8s8_acc32_sat16_ref(x_u8, w_i8))
    if kind in ("uniform", "extremes"):  # all equal products (max_magnitude) pair the same in both forms
        assert differs, "no case told eq. M2b from eq. M2"


def test_pairs_restart_refuses_a_k_outside():
    with pytest.raises(ValueError, match="inside K = 4, got k = 5"):
        pairs_restart(np.zeros((2, 4), np.int8), 5)


# ----------------------------------------------------------------------------------------------------------------
# Packing and kernel choice
# ----------------------------------------------------------------------------------------------------------------

def test_packed_weight_layout(rng):
    """panels_i8[p, g, c, r] == w_i8[64 p + c, 4 g + r], zero in the padding, as PackBMatrix::addr places them."""
    N, K = 70, 13
    w_i8 = draw(rng, (N, K), "uniform", np.int8)
    packed = pack_weight_s8(w_i8)
    assert isinstance(packed, PackedWeightS8)
    assert packed.shape == (N, K)
    assert_same(packed.w_i8, w_i8, "w_i8 kept")
    assert packed.panels_i8.shape == (2, 4, 64, 4) and packed.panels_i8.flags.c_contiguous
    for p in range(2):
        for g in range(4):
            for c in range(64):
                for r in range(4):
                    n, k = 64 * p + c, 4 * g + r
                    expected = w_i8[n, k] if n < N and k < K else 0
                    assert packed.panels_i8[p, g, c, r] == expected, (p, g, c, r)


@needs_jit
def test_kernel_choice_and_environment_variable(monkeypatch, rng):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    assert kernel_for() in ("amx", "avx512", "portable")
    assert kernel_for(saturate_int16_pairs=True) in ("avx512", "avx2", "portable")
    x_u8 = draw(rng, (9, 21), "extremes", np.uint8)
    w_i8 = draw(rng, (5, 21), "extremes", np.int8)
    for name in ("portable", "reference"):
        monkeypatch.setenv(KERNEL_ENV_VAR, name)
        assert kernel_for() == name
        assert kernel_for(saturate_int16_pairs=True) == name
        assert_same(matmul_u8s8_acc32(x_u8, w_i8), matmul_u8s8_acc32_ref(x_u8, w_i8), f"env {name}")
    monkeypatch.setenv(KERNEL_ENV_VAR, "portable")
    assert kernel_for(kernel="reference") == "reference"  # the argument wins over the environment
    monkeypatch.setenv(KERNEL_ENV_VAR, "")
    assert kernel_for() == kernel_for(kernel="auto")  # empty: as if unset


@pytest.mark.parametrize("value", ["fastest", "AVX512", " auto", "vnni"])
def test_bad_environment_variable_is_named(monkeypatch, value):
    """A bad REFQUANT_MATMUL_KERNEL names the variable, what it holds and the allowed values."""
    monkeypatch.setenv(KERNEL_ENV_VAR, value)
    with pytest.raises(ValueError) as info:
        matmul_u8s8_acc32(np.zeros((1, 4), np.uint8), np.zeros((2, 4), np.int8))
    message = str(info.value)
    assert "environment variable REFQUANT_MATMUL_KERNEL" in message and repr(value) in message, message
    assert "allowed values: auto, amx, avx512, avx2, portable, reference" in message, message


@needs_jit
def test_missing_cpu_feature_is_an_error_not_an_illegal_instruction(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: False)
    assert kernel_for() == "portable" and kernel_for(saturate_int16_pairs=True) == "portable"
    with pytest.raises(RuntimeError, match="needs the CPU feature 'avx2'"):
        kernel_for(kernel="avx2", saturate_int16_pairs=True)
    with pytest.raises(RuntimeError, match="amx-tile, amx-int8, avx512vnni"):
        kernel_for(kernel="amx")
    with pytest.raises(RuntimeError, match="avx512vnni"):
        kernel_for(kernel="avx512")
    with pytest.raises(RuntimeError, match="avx512bw"):
        matmul_u8s8_acc32(np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.int8), saturate_int16_pairs=True,
                          kernel="avx512")


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

X = np.zeros((3, 5), np.uint8)
W = np.zeros((4, 5), np.int8)


@pytest.mark.parametrize("args, exc, match", [
    ((X.astype(np.int8), W), TypeError, "x_u8 must be a uint8 numpy array, got ndarray of dtype int8"),
    ((X.astype(np.float32), W), TypeError, "x_u8 must be a uint8"),
    ((X.tolist(), W), TypeError, "x_u8 must be a uint8 numpy array, got list"),
    ((X[0], W), ValueError, r"x_u8 must be 2-D \(M, K\), got shape \(5,\)"),
    ((X[None], W), ValueError, "x_u8 must be 2-D"),
    ((X, W.astype(np.uint8)), TypeError, "w must be an int8 numpy array or a PackedWeightS8"),
    ((X, W[0]), ValueError, r"w must be 2-D \(N, K\)"),
    ((X, W[:, :4]), ValueError, r"x_u8 has K = 5 columns but the weight has K = 4"),
    ((X, pack_weight_s8(W[:, :4])), ValueError, r"x_u8 has K = 5 columns but the weight has K = 4"),
])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        matmul_u8s8_acc32(*args)


def test_bad_pack_input():
    with pytest.raises(TypeError, match="w_i8 must be an int8 numpy array, got ndarray of dtype float32"):
        pack_weight_s8(W.astype(np.float32))
    with pytest.raises(ValueError, match=r"w_i8 must be 2-D \(N, K\), got shape \(1, 4, 5\)"):
        pack_weight_s8(W[None])


def test_packed_weight_must_fit_its_weight():
    """The kernels read the panels without bounds checks, so a PackedWeightS8 checks them when built."""
    packed = pack_weight_s8(np.ones((70, 13), np.int8))
    for panels, what in [(packed.panels_i8[:1], "too few panels"), (packed.panels_i8[:, :3], "too few k groups"),
                         (packed.panels_i8.astype(np.int16), "wrong dtype"),
                         (np.asfortranarray(packed.panels_i8), "not C-contiguous")]:
        with pytest.raises(ValueError, match=r"panels_i8 must be a C-contiguous int8 array of shape \(2, 4, 64, 4\)"):
            PackedWeightS8(packed.w_i8, panels)


def test_numba_disable_jit_falls_back_to_the_reference(monkeypatch):
    """Under NUMBA_DISABLE_JIT=1 the intrinsics cannot run: auto picks the readable reference, the others refuse."""
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(numba_config, "DISABLE_JIT", True)
    assert kernel_for() == "reference" and kernel_for(saturate_int16_pairs=True) == "reference"
    for kernel in ("amx", "avx512", "avx2", "portable"):
        with pytest.raises(RuntimeError, match="NUMBA_DISABLE_JIT"):
            kernel_for(kernel=kernel)


def test_cpu_features_follow_numba_target(monkeypatch):
    """NUMBA_CPU_FEATURES narrows what LLVM may emit ("" for NUMBA_CPU_NAME=generic): no avx512 kernel then."""
    cpu_has = mm._cpu_has.__wrapped__  # uncached
    monkeypatch.setattr(numba_config, "CPU_FEATURES", "")
    assert not cpu_has("avx512vnni") and not cpu_has("avx512bw")
    monkeypatch.setattr(numba_config, "CPU_FEATURES", "+avx2,+avx512bw")
    assert not cpu_has("avx512vnni")
    monkeypatch.setattr(numba_config, "CPU_FEATURES", None)
    import llvmlite.binding as llvm
    assert cpu_has("avx512vnni") == bool(llvm.get_host_cpu_features().get("avx512vnni", False))


def test_bad_kernel_name():
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'amx', 'avx512', 'avx2', 'portable', 'reference'\)"):
        matmul_u8s8_acc32(X, W, kernel="vnni")


@needs_jit
def test_avx2_kernel_computes_eq_m2_only():
    """kernel="avx2" (vpmaddubsw on ymm halves) saturates every pair sum: asked for eq. M1 it says so."""
    with pytest.raises(RuntimeError, match=r"kernel='avx2' computes eq. M2 only"):
        matmul_u8s8_acc32(X, W, kernel="avx2")


@needs_jit
def test_auto_picks_avx2_for_eq_m2_where_avx512bw_is_missing(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: feature == "avx2")
    assert kernel_for(saturate_int16_pairs=True) == "avx2" and kernel_for() == "portable"


def test_eq_m1_equals_eq_m2_on_seven_bit_codes(rng):
    """Codes <= 127 never saturate a pair (|x0·w0 + x1·w1| <= 2·127·128 = 32,512): eq. M2 is eq. M1 there, at the
    extremes (x = 127 with w = -128 or 127 on both k of a pair) and on random codes; code 255 does saturate."""
    K = 64
    w_extreme = np.stack([np.full(K, -128), np.full(K, 127), np.tile([-128, 127], K // 2),
                          rng.integers(-128, 128, K)]).astype(np.int8)
    x_extreme = np.stack([np.full(K, SEVEN_BIT_MAX_CODE), np.tile([SEVEN_BIT_MAX_CODE, 0], K // 2),
                          rng.integers(0, SEVEN_BIT_MAX_CODE + 1, K)]).astype(np.uint8)
    x_random = rng.integers(0, SEVEN_BIT_MAX_CODE + 1, (50, 301)).astype(np.uint8)
    w_random = rng.choice(np.array([-128, 127, -1, 0, 5], np.int8), (40, 301))
    for x_u8, w_i8 in ((x_extreme, w_extreme), (x_random, w_random)):
        np.testing.assert_array_equal(matmul_u8s8_acc32_sat16_ref(x_u8, w_i8), matmul_u8s8_acc32_ref(x_u8, w_i8))
    x_full = np.full((1, K), 255, np.uint8)
    assert not np.array_equal(matmul_u8s8_acc32_sat16_ref(x_full, w_extreme), matmul_u8s8_acc32_ref(x_full, w_extreme))


@needs_jit
def test_seven_bit_codes_run_eq_m2_on_avx2_where_eq_m1_would_run_portable(monkeypatch):
    """kernel_for_seven_bit_codes: eq. M2 on "avx2" only where auto would run eq. M1 on the portable kernel and the
    CPU has avx2; else eq. M1 as kernel_for chooses it; a kernel asked for by name is kept."""
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: feature == "avx2")
    assert kernel_for_seven_bit_codes() == ("avx2", True)
    assert kernel_for_seven_bit_codes(kernel="auto") == ("avx2", True)
    assert kernel_for_seven_bit_codes(kernel="portable") == ("portable", False)
    assert kernel_for_seven_bit_codes(kernel="reference") == ("reference", False)
    monkeypatch.setenv(KERNEL_ENV_VAR, "portable")
    assert kernel_for_seven_bit_codes() == ("portable", False)
    monkeypatch.setenv(KERNEL_ENV_VAR, "vnni")
    with pytest.raises(ValueError, match=f"the environment variable {KERNEL_ENV_VAR} is 'vnni'"):
        kernel_for_seven_bit_codes()
    monkeypatch.delenv(KERNEL_ENV_VAR)
    assert kernel_for_seven_bit_codes() == ("avx2", True)  # the kept answer follows the environment
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: feature in ("avx2", "avx512bw", "avx512vnni"))
    assert kernel_for_seven_bit_codes() == ("avx512", False)  # vpdpbusd: eq. M1 as it is
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: False)
    assert kernel_for_seven_bit_codes() == ("portable", False)


@needs_jit
@pytest.mark.skipif(not mm._cpu_has("avx2"), reason="the CPU lacks avx2")
def test_avx2_kernel_gives_eq_m1_on_seven_bit_codes(rng):
    for M, K, N in ((1, 1, 1), (7, 515, 70), (64, 1100, 130), (200, 64, 64)):
        x_u8 = rng.integers(0, SEVEN_BIT_MAX_CODE + 1, (M, K)).astype(np.uint8)
        x_u8[0, :] = SEVEN_BIT_MAX_CODE
        w_i8 = rng.choice(np.array([-128, 127, -7, 0, 3], np.int8), (N, K))
        got = matmul_u8s8_acc32(x_u8, w_i8, kernel="avx2", saturate_int16_pairs=True)
        np.testing.assert_array_equal(got, matmul_u8s8_acc32_ref(x_u8, w_i8), strict=True)
