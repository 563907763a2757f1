"""refquant.amx: the AMX-INT8 tile kernel (``tdpbusd``) gives eq. M1's bits, alone (== matmul_u8s8_acc32_ref) and
fused with each engine's epilogue (== the readable stages); where it cannot run, ``"auto"`` falls back to the
``vpdpbusd`` kernel with the same bits and ``kernel="amx"`` says why.

Shapes cover what the tiles leave to the vector kernel: M not a multiple of 16 (and M < 16, all vector rows), K not
a multiple of 64 (the last k added to the tiles' sums), K < 64, K = 1, K = 0, partial last panels; full-range and
extreme codes; K = 70,000 at 255 x -128, where the int32 sums wrap; the thread pool on and off. Tests that run the
tiles carry ``needs_amx`` (skipped, with the reason, where refquant.amx.amx_unavailable_reason() names one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import refquant.amx as amx
import refquant.matmul as mm
from refquant.engines import ENGINES
from refquant.fixed_point import VARIANTS
from refquant.matmul import KERNEL_ENV_VAR, kernel_for, matmul_u8s8_acc32, matmul_u8s8_acc32_ref, pack_weight_s8

from tests.parity import assert_same
from tests.test_fused_linear import random_problem


def _amx_reason() -> str | None:
    try:
        kernel_for(kernel="amx")
    except RuntimeError as why:
        return str(why)
    return None


AMX_REASON = _amx_reason()
needs_amx = pytest.mark.skipif(AMX_REASON is not None, reason=f"no AMX here: {AMX_REASON}")


def draw(rng, shape, kind: str, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    if kind == "uniform":
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if kind == "extremes":
        return np.where(rng.random(shape) < 0.5, info.min, info.max).astype(dtype)
    return np.full(shape, info.max if dtype == np.uint8 else info.min, dtype)  # 255 x -128 everywhere


EDGE_SHAPES = [(1, 64, 16), (15, 64, 64), (16, 64, 64), (17, 64, 64), (32, 64, 64), (33, 128, 64), (48, 64, 33),
               (16, 63, 16), (40, 1, 70), (64, 0, 20), (16, 0, 1), (31, 65, 130), (96, 1100, 65), (97, 640, 129),
               (130, 200, 1), (200, 777, 300)]


@needs_amx
def test_amx_equals_reference_on_edge_and_random_shapes(rng):
    shapes = EDGE_SHAPES + [tuple(int(v) for v in (rng.integers(1, 140), rng.integers(0, 700), rng.integers(1, 200)))
                            for _ in range(30)]
    for i, (M, K, N) in enumerate(shapes):
        kind = ("uniform", "extremes", "max_magnitude")[i % 3]
        x_u8 = draw(rng, (M, K), kind, np.uint8)
        w_i8 = draw(rng, (N, K), kind, np.int8)
        expected = matmul_u8s8_acc32_ref(x_u8, w_i8)
        assert_same(matmul_u8s8_acc32(x_u8, pack_weight_s8(w_i8), kernel="amx"), expected, f"{(M, K, N)} {kind}")


@needs_amx
def test_amx_int32_sums_wrap():
    """K = 70,000 of 255 x -128: each sum is -2,284,800,000, below int32's -2^31, and wraps as fbgemm's does (K is
    not a multiple of 64: the tiles' wrapped sums plus the vector tail's 48 k)."""
    M, K, N = 33, 70_000, 20
    x_u8 = np.full((M, K), 255, np.uint8)
    w_i8 = np.full((N, K), -128, np.int8)
    w_i8[1::2, :7] = 127  # some columns differ
    expected = matmul_u8s8_acc32_ref(x_u8, w_i8)
    assert expected[0, 0] == np.int32(np.int64(70_000 * 255 * -128) - 2**32 * -1)  # the wrapped value
    assert_same(matmul_u8s8_acc32(x_u8, w_i8, kernel="amx"), expected, "K = 70,000, full magnitude")


@needs_amx
@pytest.mark.parametrize("pool", ["serial", "shared"])
def test_amx_with_and_without_the_thread_pool(rng, monkeypatch, pool):
    """Tile configuration is per thread: each pool thread loads it in its own tasks."""
    monkeypatch.setattr(mm, "PARALLEL_MIN_MACS", 0 if pool == "shared" else 1 << 62)
    monkeypatch.setattr(mm, "DEFAULT_THREADS", 3)
    for M, K, N in [(200, 600, 130), (97, 64, 200), (300, 130, 700)]:
        x_u8 = draw(rng, (M, K), "uniform", np.uint8)
        w_i8 = draw(rng, (N, K), "uniform", np.int8)
        assert_same(matmul_u8s8_acc32(x_u8, w_i8, kernel="amx"), matmul_u8s8_acc32_ref(x_u8, w_i8), f"{pool}")


@needs_amx
def test_a_fresh_process_asks_for_the_tiles():
    """The OS permission is asked in each process before its first tile instruction (else SIGILL kills it)."""
    code = ("import numpy as np; from refquant.matmul import matmul_u8s8_acc32, matmul_u8s8_acc32_ref; "
            "x = np.arange(32 * 128, dtype=np.uint8).reshape(32, 128); w = (x[:20] - 100).astype(np.int8); "
            "print(np.array_equal(matmul_u8s8_acc32(x, w, kernel='amx'), matmul_u8s8_acc32_ref(x, w)))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr[-2000:]


def test_auto_falls_back_without_the_permission_with_the_same_bits(rng, monkeypatch):
    """Where Linux refuses the tile data, auto runs the vpdpbusd kernel (or portable), kernel="amx" names why."""
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    x_u8 = draw(rng, (40, 130), "uniform", np.uint8)
    w_i8 = draw(rng, (70, 130), "uniform", np.int8)
    before = matmul_u8s8_acc32(x_u8, w_i8)
    monkeypatch.setattr(amx, "_os_tile_permission", lambda: "Linux refused the AMX tile data (test)")
    # On a CPU without AMX (AMD EPYC) the missing features are named first: claim them, so that the refused
    # permission is what the refusal names on every machine (no AMX code runs below).
    has = mm._cpu_has
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: feature in amx.AMX_FEATURES or has(feature))
    if mm.config.DISABLE_JIT:
        assert kernel_for() == "reference"
    else:
        assert kernel_for() in ("avx512", "portable")
        with pytest.raises(RuntimeError, match=r"kernel='amx' cannot run here: .*Linux refused the AMX tile data"):
            kernel_for(kernel="amx")
    monkeypatch.setattr(mm, "_cpu_has", has)
    assert_same(matmul_u8s8_acc32(x_u8, w_i8), before, "auto without AMX")
    assert_same(before, matmul_u8s8_acc32_ref(x_u8, w_i8), "reference")


def test_amx_needs_its_cpu_features_and_eq_m1(monkeypatch):
    """No amx-int8 (on the CPU or in NUMBA_CPU_FEATURES): auto is not amx, kernel="amx" names the feature; eq. M2
    (int16-saturating pairs) never runs on the tiles."""
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    if mm.config.DISABLE_JIT:
        assert kernel_for(saturate_int16_pairs=True) == "reference"
        return
    assert kernel_for(saturate_int16_pairs=True) in ("avx512", "avx2", "portable")
    with pytest.raises(RuntimeError, match=r"eq. M1 only"):
        kernel_for(kernel="amx", saturate_int16_pairs=True)
    has = mm._cpu_has
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: feature != "amx-int8" and has(feature))
    assert kernel_for() != "amx"
    with pytest.raises(RuntimeError, match=r"lacks (.*, )?amx-int8"):  # without AMX at all: "amx-tile, amx-int8"
        kernel_for(kernel="amx")


def test_tile_config_layout():
    """LDTILECFG's 64 bytes (Intel SDM, LDTILECFG): palette 1, bytes per row at 16 + 2t (uint16), rows at 48 + t."""
    config = amx.tile_config()
    assert config.shape == (64,) and config[0] == 1 and not config[1:16].any()
    assert list(config[16:32].view(np.uint16)) == [64] * 8 and list(config[48:56]) == [16] * 8
    assert not config[56:].any()


# --------------------------------------------------------------------------------------------------------------
# Fused with the epilogues (refquant.fused_linear)
# --------------------------------------------------------------------------------------------------------------

FUSED_SHAPES = [(16, 64, 64), (33, 130, 70), (100, 1100, 65), (47, 16, 20), (64, 700, 129), (1, 200, 30)]


def check_fused_amx_equals_reference_stages(ql, x_u8, monkeypatch, what: str) -> None:
    """The fused call on AMX vs the readable stages over the readable product (kernel "reference")."""
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    assert kernel_for() == "amx"
    fused = ql(x_u8)
    monkeypatch.setenv(KERNEL_ENV_VAR, "reference")
    readable = ql.requantize(ql.accumulate(x_u8), readable=True)
    monkeypatch.delenv(KERNEL_ENV_VAR)
    assert_same(fused, readable, what)


@needs_amx
@pytest.mark.parametrize("engine", ENGINES)
def test_fused_amx_equals_readable_stages(rng, monkeypatch, engine):
    for i, (M, K, N) in enumerate(FUSED_SHAPES * 2):
        ql, x_u8 = random_problem(rng, engine, M, K, N, i)
        check_fused_amx_equals_reference_stages(ql, x_u8, monkeypatch, f"{engine} case {i} {(M, K, N)} {ql!r}")


@needs_amx
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_amx_integer_variants(rng, monkeypatch, variant):
    for i, (M, K, N) in enumerate(FUSED_SHAPES):
        for engine in ENGINES:
            ql, x_u8 = random_problem(rng, engine, M, K, N, i + 1, requantization=variant)
            check_fused_amx_equals_reference_stages(ql, x_u8, monkeypatch, f"{variant} {engine} case {i}")


@needs_amx
@pytest.mark.parametrize("pool", ["serial", "shared"])
def test_fused_amx_with_and_without_the_thread_pool(rng, monkeypatch, pool):
    monkeypatch.setattr(mm, "PARALLEL_MIN_MACS", 0 if pool == "shared" else 1 << 62)
    monkeypatch.setattr(mm, "DEFAULT_THREADS", 3)
    for i, (M, K, N) in enumerate([(200, 600, 130), (97, 64, 200)]):
        for engine in ENGINES:
            ql, x_u8 = random_problem(rng, engine, M, K, N, i)
            check_fused_amx_equals_reference_stages(ql, x_u8, monkeypatch, f"{pool} {engine} {i}")


def test_fused_call_falls_back_without_the_permission_with_the_same_bits(rng, monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    for i, engine in enumerate(ENGINES):
        ql, x_u8 = random_problem(rng, engine, 50, 200, 70, i)
        before = ql(x_u8)
        monkeypatch.setattr(amx, "_os_tile_permission", lambda: "Linux refused the AMX tile data (test)")
        assert kernel_for() != "amx"
        assert_same(ql(x_u8), before, f"{engine} without AMX")
        monkeypatch.undo()


def test_tile_aligned_rows_keep_the_codes(rng):
    """The AMX kernel's copy of x (refquant.matmul.padded_rows(tile_aligned=True)): from 16 rows every row starts on
    a 64-byte boundary and lda is a multiple of 64; the codes are unchanged and the last group's padding is zero;
    the packed panels start on a 64-byte boundary (empty arrays, never read, excepted)."""
    for M, K in [(16, 64), (20, 100), (40, 1), (3, 64), (17, 0)]:
        x_u8 = draw(rng, (M, K), "uniform", np.uint8)
        packed = pack_weight_s8(draw(rng, (5, K), "uniform", np.int8))
        assert packed.panels_i8.size == 0 or packed.panels_i8.ctypes.data % 64 == 0  # (an empty one is never read)
        rows_u8, lda = mm.padded_rows(x_u8, packed, tile_aligned=True)
        assert_same(rows_u8[:, :K], x_u8, f"{(M, K)}")
        assert lda == rows_u8.shape[1] and lda >= -(-K // 4) * 4
        assert not rows_u8[:, K:-(-K // 4) * 4].any()  # the last group's padding meets zero weights
        if M >= 16:
            assert lda % 64 == 0 and (rows_u8.size == 0 or rows_u8.ctypes.data % 64 == 0)
