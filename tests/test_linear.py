"""refquant.linear.QuantizedLinear against torch.ops.quantized.linear / linear_relu on the fbgemm engine, live.

Every parity test builds a float32 weight, lets torch quantize it exactly as ``torch.ao.nn.quantized.Linear`` does
(its own observer, then ``_quantize_weight`` -> ``quantize_per_channel`` / ``quantize_per_tensor``), packs it with
``torch.ops.quantized.linear_prepack`` and runs ``torch.ops.quantized.linear`` on uint8 codes; refquant does the same
from the same float32 weight with :meth:`QuantizedLinear.from_float`. Outputs, weight codes, scales and zero points
must agree bit for bit.

Tests whose torch result depends on the int8 kernel family of torch's fbgemm are marked ``isa``: with full-range
8-bit codes, fbgemm's pre-VNNI kernels (``vpmaddubsw``, on CPUs without AVX-512 VNNI or under
FBGEMM_ENABLE_INSTRUCTIONS=AVX2) saturate pairs of products to int16. They model the family crosscheck.isa's probe
finds in this process (``saturate_int16_pairs``), so they hold on every machine; .ci/run runs them under
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 as well.

Recorded with every run (numerics.md "What changes these numbers"): torch version, quantized engine, CPU ISA —
see :func:`test_environment_is_the_measured_one`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.ao.nn.quantized.modules.utils import _quantize_weight
from torch.ao.quantization.observer import MinMaxObserver as TorchMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as TorchPerChannelMinMaxObserver

from crosscheck.isa import saturate_int16_pairs, torch_fbgemm_kernel_family
from parity import assert_same
from refquant._dispatch import SmallCalls
from refquant.linear import (
    WEIGHT_QSCHEMES,
    QuantizedLinear,
    int32_accumulator_can_overflow,
    requantize_fast,
    requantize_readable,
)

torch.backends.quantized.engine = "fbgemm"


# ----------------------------------------------------------------------------------------------------------------
# Helpers: the torch runner
# ----------------------------------------------------------------------------------------------------------------

def torch_weight_observer(qscheme: str):
    """The weight observer torch's default fbgemm qconfig uses (per-tensor variants as torch supports them)."""
    if qscheme.startswith("per_channel"):
        return TorchPerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=getattr(torch, qscheme))
    return TorchMinMaxObserver(dtype=torch.qint8, qscheme=getattr(torch, qscheme))


def torch_quantized_linear(x_u8, w_f32, b_f32, sx, zx, sy, zy, relu, qscheme):
    """torch: observe + _quantize_weight + linear_prepack + quantized::linear(_relu). Returns (y_u8, qweight)."""
    observer = torch_weight_observer(qscheme)
    w_t = torch.from_numpy(np.ascontiguousarray(w_f32))
    observer(w_t)
    qweight = _quantize_weight(w_t, observer)
    packed = torch.ops.quantized.linear_prepack(qweight, None if b_f32 is None else torch.from_numpy(b_f32))
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(x_u8)), sx, zx)
    op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
    y = op(qx, packed, sy, zy)
    return y.int_repr().numpy(), qweight


def torch_weight_params(qweight, qscheme):
    """(weight scales as float32, weight zero points as int32) as fbgemm's prepack stores them."""
    if qscheme.startswith("per_channel"):
        scales = qweight.q_per_channel_scales().numpy()  # float64 tensor; prepack takes .item<float>()
        zps = qweight.q_per_channel_zero_points().numpy()
    else:
        scales = np.array([qweight.q_scale()])
        zps = np.array([qweight.q_zero_point()])
    assert (scales.astype(np.float32).astype(np.float64) == scales).all()  # float32 values held in doubles
    return scales.astype(np.float32), zps.astype(np.int32)


def torch_saturates() -> bool:
    """refquant's ``saturate_int16_pairs`` that models torch's fbgemm in this process (crosscheck.isa's probe)."""
    return saturate_int16_pairs(torch_fbgemm_kernel_family())


def check_problem(p: dict) -> int:
    """Run one problem through torch and refquant; assert everything equal; return the number of outputs compared.

    refquant's layer sums as torch's fbgemm does in this process (exactly, or in int16-saturated pairs)."""
    saturate = torch_saturates()
    ctx = (f"problem: M-shape {p['x'].shape}, N={p['w'].shape[0]}, weight={p['wkind']}, x={p['xkind']}, "
           f"qscheme={p['qscheme']}, bias={'no' if p['b'] is None else 'yes'}, relu={p['relu']}, sx={p['sx']!r}, "
           f"zx={p['zx']}, sy={p['sy']!r}, zy={p['zy']}, aimed at a tie={p.get('tie', False)}, seed={p.get('seed')}, "
           f"saturate_int16_pairs={saturate}")
    y_t, qweight = torch_quantized_linear(p["x"], p["w"], p["b"], p["sx"], p["zx"], p["sy"], p["zy"], p["relu"],
                                          p["qscheme"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the K > 65,793 overflow warning
        ql = QuantizedLinear.from_float(p["w"], p["b"], p["sx"], p["zx"], p["sy"], p["zy"], relu=p["relu"],
                                        weight_qscheme=p["qscheme"], saturate_int16_pairs=saturate)
    assert_same(ql.weight_int8, qweight.int_repr().numpy(), f"weight_int8 vs torch int_repr(); {ctx}")
    scales_t, zps_t = torch_weight_params(qweight, p["qscheme"])
    assert_same(ql.weight_scales, scales_t, f"weight_scales; {ctx}")
    assert_same(ql.weight_zero_points, zps_t, f"weight_zero_points; {ctx}")
    y_r = ql(p["x"])
    assert_same(y_r, y_t, f"output codes vs torch.ops.quantized.linear{'_relu' if p['relu'] else ''}; {ctx}")
    assert_same(ql.requantize(ql.accumulate(p["x"])), y_r, f"requantize(accumulate(x)) vs __call__; {ctx}")
    return y_t.size


# ----------------------------------------------------------------------------------------------------------------
# Random problems
# ----------------------------------------------------------------------------------------------------------------

WEIGHT_KINDS = ("normal", "uniform", "outliers", "zero_channel", "constant_channel", "tiny", "huge",
                "channel_magnitudes", "all_negative", "all_positive", "grid_ties", "single_value")
X_KINDS = ("uniform", "extremes", "all_255", "all_0", "near_zero_point", "constant")


def random_weight(rng: np.random.Generator, N: int, K: int, kind: str) -> np.ndarray:
    mag = 10.0 ** rng.uniform(-3, 2)
    if kind == "normal":
        w = rng.standard_normal((N, K)) * mag
    elif kind == "uniform":
        w = rng.uniform(-mag, mag, (N, K))
    elif kind == "outliers":
        w = rng.standard_normal((N, K)) * mag
        hits = rng.random((N, K)) < 0.02
        w[hits] *= 10.0 ** rng.uniform(1, 3)
    elif kind == "zero_channel":
        w = rng.standard_normal((N, K)) * mag
        w[rng.integers(0, N)] = 0.0
    elif kind == "constant_channel":
        w = rng.standard_normal((N, K)) * mag
        w[rng.integers(0, N)] = rng.choice([-1.0, 1.0]) * mag * rng.uniform(0.1, 10)
    elif kind == "tiny":
        w = rng.standard_normal((N, K)) * 10.0 ** rng.uniform(-42, -25)  # down to float32 denormals
    elif kind == "huge":
        w = rng.standard_normal((N, K)) * 10.0 ** rng.uniform(20, 36)
    elif kind == "channel_magnitudes":
        w = rng.standard_normal((N, K)) * 10.0 ** rng.uniform(-6, 6, (N, 1))
    elif kind == "all_negative":
        w = -np.abs(rng.standard_normal((N, K))) * mag
    elif kind == "all_positive":
        w = np.abs(rng.standard_normal((N, K))) * mag
    elif kind == "grid_ties":  # multiples of amax/255: many weights land on .5 ties after scaling
        w = rng.integers(-255, 256, (N, K)) * (mag / 255.0)
        w[:, 0] = mag
    elif kind == "single_value":
        w = np.full((N, K), rng.choice([-1.0, 1.0]) * mag)
    else:
        raise AssertionError(kind)
    return w.astype(np.float32)


def random_x(rng: np.random.Generator, shape: tuple, kind: str, zx: int) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "extremes":  # codes at both ends: floats far outside the calibrated range
        return rng.choice(np.array([0, 255], np.uint8), shape)
    if kind == "all_255":
        return np.full(shape, 255, np.uint8)
    if kind == "all_0":
        return np.zeros(shape, np.uint8)
    if kind == "near_zero_point":
        return np.clip(zx + rng.integers(-3, 4, shape), 0, 255).astype(np.uint8)
    if kind == "constant":
        return np.full(shape, rng.integers(0, 256), np.uint8)
    if kind == "high":  # upper half only: with same-sign weights the sums grow like K
        return rng.integers(128, 256, shape, dtype=np.uint8)
    raise AssertionError(kind)


def random_problem(rng: np.random.Generator, k_choices=(1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 64, 100, 255, 513),
                   max_n: int = 70, max_m: int = 9) -> dict:
    K = int(rng.choice(k_choices))
    N = int(rng.integers(1, max_n + 1))  # covers fbgemm's 32-wide, 8-wide and masked remainder column loops
    lead = [int(rng.integers(1, max_m + 1))]
    r = rng.random()
    if r < 0.15:
        lead = [int(rng.integers(1, 4)), int(rng.integers(1, 5))]
    elif r < 0.2:
        lead = [2, 1, int(rng.integers(1, 4))]
    wkind = str(rng.choice(WEIGHT_KINDS))
    xkind = str(rng.choice(X_KINDS, p=[0.6, 0.12, 0.07, 0.07, 0.07, 0.07]))
    qscheme = str(rng.choice(WEIGHT_QSCHEMES, p=[0.5, 0.2, 0.15, 0.15]))
    w = random_weight(rng, N, K, wkind)
    sx = float(10.0 ** rng.uniform(-4, 1))  # a double, as q_scale() is: refquant must round it to float32 itself
    zx = int(rng.integers(0, 256))
    x = random_x(rng, tuple(lead) + (K,), xkind, zx)
    amax = float(np.abs(w).max()) or 1.0
    b = None
    if rng.random() < 0.7:
        bmag = min(sx * amax * math.sqrt(K) * 10.0 ** rng.uniform(-2, 3), 1e35)  # finite in float32
        b = (rng.standard_normal(N) * bmag).astype(np.float32)
        if rng.random() < 0.1:
            b[rng.integers(0, N)] = 0.0
    # output scale: typical outputs spread over the codes, sometimes saturating, sometimes tiny (|y| >= 2^31)
    typical = sx * amax * math.sqrt(K) * 100.0 / 255.0
    s = rng.random()
    if s < 0.08:
        sy = typical * 10.0 ** rng.uniform(-16, -8)  # tiny: y overflows int32 -> INT32_MIN -> code 0
    elif s < 0.13:
        sy = typical * 10.0 ** rng.uniform(2, 6)
    else:
        sy = typical * 10.0 ** rng.uniform(-1.5, 1.5)
    sy = float(min(max(sy, 1e-30), 1e30))
    zy = int(rng.choice([0, 128, 255, int(rng.integers(0, 256))]))
    relu = bool(rng.random() < 0.3)
    return dict(x=x, w=w, b=b, sx=sx, zx=zx, sy=sy, zy=zy, relu=relu, qscheme=qscheme, wkind=wkind, xkind=xkind)


def aim_output_scale_at_a_tie(p: dict, rng: np.random.Generator, largest_raw: bool = False) -> bool:
    """Pick the output scale so that one chosen output y = t·mult lies (in exact arithmetic) on k + 0.5.

    The float32 path then lands a few ulps above or below the tie, or on it, and which one depends on every rounding
    before it: float32(raw), the bias term's form (eq. L8b/L8c), f32(s_x), atws, the multiplier. A formula that is
    one ulp off anywhere rounds the other way in about half of these problems. Returns False when no tie fits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ql = QuantizedLinear.from_float(p["w"], p["b"], p["sx"], p["zx"], 1.0, p["zy"], weight_qscheme=p["qscheme"],
                                        saturate_int16_pairs=torch_saturates())
    raw = ql.accumulate(p["x"]).reshape(-1, ql.out_features)
    if raw.size == 0:
        return False
    m, n = int(rng.integers(0, raw.shape[0])), int(rng.integers(0, raw.shape[1]))
    if largest_raw:  # where float32(raw) is most likely inexact
        m, n = (int(i) for i in np.unravel_index(np.argmax(np.abs(raw.astype(np.int64))), raw.shape))
    atws = float(ql.act_times_w_scale[n if ql.per_channel else 0])
    t = float(raw[m, n]) + (0.0 if p["b"] is None else float(p["b"][n]) / atws)  # float64 estimate of eq. L8
    lo = p["zy"] if p["relu"] else 0
    ks = np.arange(0, 255 - p["zy"]) if t > 0 else np.arange(lo - p["zy"], 0) if t < 0 else np.arange(0)
    if ks.size == 0:
        return False
    k = int(rng.choice(ks[:8] if rng.random() < 0.5 else ks))  # small |y| is where float32 keeps the most bits
    sy = atws * t / (k + 0.5)
    with np.errstate(over="ignore"):
        sy_f32 = np.float32(sy)
    if not (np.isfinite(sy_f32) and sy_f32 > 0):
        return False
    p["sy"] = float(sy)
    return True


def run_random_problems(rng: np.random.Generator, count: int, **kwargs) -> tuple[int, int]:
    """``count`` random problems; a third of them with the output scale aimed at a rounding tie."""
    values = 0
    for i in range(count):
        p = random_problem(rng, **kwargs)
        p["seed"] = f"problem {i} of this test's stream"
        if i % 3 == 0:
            p["tie"] = aim_output_scale_at_a_tie(p, rng)
        values += check_problem(p)
    return count, values


# ----------------------------------------------------------------------------------------------------------------
# Parity against torch, live
# ----------------------------------------------------------------------------------------------------------------

def test_environment_is_the_measured_one():
    """Record what the parity below was measured with; fbgemm must be the engine."""
    assert torch.backends.quantized.engine == "fbgemm"
    print(f"\ntorch {torch.__version__}, engine {torch.backends.quantized.engine}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, fbgemm kernels {torch_fbgemm_kernel_family()}")


@pytest.mark.isa
@pytest.mark.parametrize("chunk", range(8))
def test_parity_random_problems(rng, chunk):
    """250 random problems per chunk: shapes (incl. N-D), weight kinds, x kinds, qschemes, bias, ReLU, scales."""
    problems, values = run_random_problems(rng, 250)
    print(f"\nchunk {chunk}: {problems} problems, {values} outputs, 0 mismatches")


@pytest.mark.isa
@pytest.mark.parametrize("chunk", range(4))
def test_parity_large_k(rng, chunk):
    """K around and above 4096 with correlated weights and full-range codes, so |raw| > 2^24 and float32(raw)
    rounds; the output scale is set from the actual raw range so that outputs spread over the codes."""
    rounded_seen = 0
    for i in range(24):
        p = random_problem(rng, k_choices=(1024, 4095, 4096, 4097, 6000, 8192), max_n=40, max_m=4)
        N, K = p["w"].shape
        p["wkind"] = ("all_positive", "all_negative", "single_value", "constant_channel", "normal", "grid_ties")[i % 6]
        p["w"] = random_weight(rng, N, K, p["wkind"])
        p["xkind"] = ("high", "extremes", "high", "uniform")[i % 4]
        p["zx"] = int(rng.integers(0, 32)) if i % 3 else p["zx"]
        p["x"] = random_x(rng, p["x"].shape, p["xkind"], p["zx"])
        p["seed"] = f"large-K problem {i}"
        ql = QuantizedLinear.from_float(p["w"], p["b"], p["sx"], p["zx"], p["sy"], p["zy"],
                                        weight_qscheme=p["qscheme"])
        raw = ql.accumulate(p["x"])
        rounded_seen += int((raw.astype(np.float32).astype(np.int64) != raw).sum())
        spread = float(np.abs(raw).max()) * float(ql.act_times_w_scale.max()) / 100.0
        if i % 2:
            p["tie"] = aim_output_scale_at_a_tie(p, rng, largest_raw=True)
        elif spread > 0:
            p["sy"] = spread
        check_problem(p)
    assert rounded_seen > 0, "no raw value was inexact in float32: the large-K cases did not test the rounding"


@pytest.mark.parametrize("qscheme", ["per_channel_symmetric", "per_tensor_symmetric"])
def test_parity_float32_raw_rounding_near_ties(rng, qscheme):
    """Crafted live cases where only the early rounding of float32(raw) decides the output (K = 40,000).

    For raw in [2^E, 2^(E+1)), E = 24..29, float32 keeps multiples of s = 2^(E−23). Take s_x = s_w = 1 (atws = 1),
    bias = s/2 (so the bias term is exactly s/2 in both forms, eq. L8b/L8c) and s_y = 2^e, e = E − 8 (multiplier
    exactly 2^−e, so y = t·2^−e is exact). Let t* = (j + 0.5)·2^e with j even, and raw = t* + d, 0 < |d| < s/2.
    torch: f32(raw) = t*, then t* + s/2 is a tie between t* and t* + s -> t* (t*/s is even) -> y = j + 0.5 -> j.
    Rounding once, f32(raw + s/2), would give t* + s for d > 0 -> y = j + 0.5 + 2^−15 -> j + 1.
    Channel 0 has codes 127 (and 1s to reach raw exactly); channel 1 has 126s and 1s, raw arbitrary."""
    K, K_ones = 40_000, 8
    w_i8 = np.full((2, K), 127, np.int8)
    w_i8[1] = 126
    w_i8[:, K - K_ones:] = 1
    differs_from_single_rounding = 0
    n_params = 2 if qscheme.startswith("per_channel") else 1
    for E in range(24, 30):
        e, s = E - 8, 2 ** (E - 23)
        rows, raws = [], []
        for i in range(24):
            j = 2 * int(rng.integers(64, 127))
            d = int(rng.integers(1, s // 2)) * (1 if i % 3 else -1) if s > 2 else (0, 1, -1)[i % 3]
            R = (2 * j + 1) * 2 ** (e - 1) + d
            q, rem = divmod(R, 127)  # R = 127·Σ x[:K − 8] + Σ x[K − 8:]
            x = np.zeros(K, np.int64)
            x[: K - K_ones] = q // (K - K_ones)
            x[: q % (K - K_ones)] += 1
            x[K - K_ones:] = rem // K_ones
            x[K - K_ones: K - K_ones + rem % K_ones] += 1
            assert x.max() <= 255 and int(x @ w_i8[0].astype(np.int64)) == R
            rows.append(x.astype(np.uint8))
            raws.append(R)
        x_u8 = np.stack(rows)
        bias = np.full(2, s / 2, np.float32)
        ql = QuantizedLinear(w_i8, np.ones(n_params, np.float32), np.zeros(n_params, np.int32), bias, 1.0, 0,
                             2.0**e, 0, weight_qscheme=qscheme)
        assert_same(ql.accumulate(x_u8)[:, 0], np.array(raws, np.int32), "crafted raw")
        if qscheme.startswith("per_channel"):
            qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w_i8), torch.ones(2, dtype=torch.double),
                                                          torch.zeros(2, dtype=torch.int64), 0)
        else:
            qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_i8), 1.0, 0)
        packed = torch.ops.quantized.linear_prepack(qw, torch.from_numpy(bias))
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x_u8), 1.0, 0)
        y_t = torch.ops.quantized.linear(qx, packed, 2.0**e, 0).int_repr().numpy()
        assert_same(ql(x_u8), y_t, f"float32(raw) near-tie outputs, {qscheme}, E = {E}")
        once = np.float32(np.array(raws, np.float64) + s / 2)  # raw + s/2 is exact in float64: one rounding
        single = np.clip(np.rint(once.astype(np.float64) * 2.0**-e), 0, 255)
        differs_from_single_rounding += int((single != y_t[:, 0]).sum())
    assert differs_from_single_rounding > 0, "float32(raw) changed no output: the crafted cases test nothing"


@pytest.mark.isa
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("qscheme", WEIGHT_QSCHEMES)
def test_parity_each_weight_kind(rng, kind, qscheme):
    """Every weight distribution under every qscheme, with and without bias and ReLU."""
    for i in range(8):
        p = random_problem(rng)
        p["w"] = random_weight(rng, p["w"].shape[0], p["w"].shape[1], kind)
        p.update(wkind=kind, qscheme=qscheme, relu=bool(i % 2), seed=(kind, qscheme, i))
        if i % 4 < 2:
            p["b"] = None
        check_problem(p)


@pytest.mark.isa
def test_parity_tiny_output_scale_gives_zero_not_255(rng):
    """|y| >= 2^31 (and inf, NaN from inf·0) becomes INT32_MIN in cvtps2dq, hence code 0: the lrintf path would clamp
    large positive y to 255. Checks that such outputs really occur and that torch agrees."""
    K, N = 64, 40
    w = random_weight(rng, N, K, "normal")
    w[3] = 0.0  # a zero channel: t = 0, and with an infinite multiplier 0·inf = NaN -> INT32_MIN -> 0
    x = rng.integers(0, 256, (16, K), dtype=np.uint8)
    for sy in (1e-12, 1e-20, 1e-38, 1e-44):
        for relu in (False, True):
            p = dict(x=x, w=w, b=None, sx=0.05, zx=100, sy=sy, zy=77, relu=relu, qscheme="per_channel_symmetric",
                     wkind="normal", xkind="uniform", seed=("tiny", sy))
            check_problem(p)
    ql = QuantizedLinear.from_float(w, None, 0.05, 100, 1e-12, 77)
    y = ql(x)
    raw = ql.accumulate(x)
    big_positive = raw.astype(np.float32) * ql.output_multiplier >= 2.0**31
    assert big_positive.any() and (y[big_positive] == 0).all()


def test_parity_per_tensor_bias_fma_case():
    """A problem where the per-tensor FMA bias term (eq. L8c) and the per-channel division (eq. L8b) round
    differently, run through torch with both weight qschemes (hand derivation in test_golden_per_tensor_fma)."""
    K, N = 1024, 1
    x = np.full((1, K), 128, np.uint8)
    w_i8 = np.full((N, K), 64, np.int8)  # raw = 1024·128·64 = 2^23
    for qscheme, expected in (("per_tensor_symmetric", 1), ("per_channel_symmetric", 0)):
        if qscheme == "per_tensor_symmetric":
            qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_i8), 2.0, 0)
        else:
            qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w_i8), torch.tensor([2.0], dtype=torch.double),
                                                          torch.tensor([0]), 0)
        packed = torch.ops.quantized.linear_prepack(qw, torch.tensor([1.5]))
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), 1.5, 0)
        y_t = torch.ops.quantized.linear(qx, packed, 3.0 * 2**24, 0).int_repr().numpy()
        ql = QuantizedLinear(w_i8, [2.0], [0], np.array([1.5], np.float32), 1.5, 0, 3.0 * 2**24, 0,
                             weight_qscheme=qscheme)
        assert_same(ql(x), y_t, f"{qscheme} FMA case vs torch")
        assert int(y_t[0, 0]) == expected


@pytest.mark.isa
def test_parity_torch_module_from_float(rng):
    """The module path: torch.ao.nn.quantized.Linear / LinearReLU .from_float on an observed nn.Linear equals
    QuantizedLinear.from_float on the same float32 weight and bias."""
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.intrinsic.quantized as nniq
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import FixedQParamsObserver

    for i in range(20):
        K, N = int(rng.integers(1, 300)), int(rng.integers(1, 50))
        relu = bool(i % 2)
        lin = torch.nn.Linear(K, N, bias=bool(i % 3))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(random_weight(rng, N, K, str(rng.choice(WEIGHT_KINDS)))))
        sy, zy = float(rng.uniform(0.01, 1.0)), int(rng.integers(0, 256))
        mod = nni.LinearReLU(lin, torch.nn.ReLU()) if relu else lin
        mod.qconfig = QConfig(activation=FixedQParamsObserver.with_args(scale=sy, zero_point=zy),
                              weight=TorchPerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                                             qscheme=torch.per_channel_symmetric))
        lin.qconfig = mod.qconfig  # LinearReLU.from_float reads the weight observer from its inner Linear
        mod.activation_post_process = mod.qconfig.activation()
        qmod = (nniq.LinearReLU if relu else nnq.Linear).from_float(mod)
        sx, zx = float(rng.uniform(0.001, 0.1)), int(rng.integers(0, 256))
        x = rng.integers(0, 256, (int(rng.integers(1, 6)), K), dtype=np.uint8)
        y_t = qmod(torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), sx, zx)).int_repr().numpy()
        bias = None if lin.bias is None else lin.bias.detach().numpy()
        ql = QuantizedLinear.from_float(lin.weight.detach().numpy(), bias, sx, zx, qmod.scale, qmod.zero_point,
                                        relu=relu, saturate_int16_pairs=torch_saturates())
        assert_same(ql(x), y_t, f"nnq.Linear.from_float module output, case {i}, K={K}, N={N}, relu={relu}")


@pytest.mark.isa
def test_parity_empty_batch_and_shapes(rng):
    """M = 0, N-D and non-contiguous inputs keep torch's output shapes (..., N) and values."""
    w = random_weight(rng, 5, 7, "normal")
    for shape in [(0, 7), (2, 0, 7), (1, 7), (3, 1, 7), (2, 3, 4, 7)]:
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        p = dict(x=x, w=w, b=None, sx=0.1, zx=3, sy=0.2, zy=5, relu=False, qscheme="per_channel_symmetric",
                 wkind="normal", xkind="uniform", seed=("shape", shape))
        check_problem(p)
    ql = QuantizedLinear.from_float(w, None, 0.1, 3, 0.2, 5)
    x_wide = rng.integers(0, 256, (6, 3, 14), dtype=np.uint8)
    for view in (x_wide[:, :, ::2], x_wide[::2, :, 7:], np.swapaxes(rng.integers(0, 256, (7, 4), dtype=np.uint8), 0, 1)):
        assert not view.flags.c_contiguous
        assert_same(ql(view), ql(np.ascontiguousarray(view)), f"non-contiguous view of shape {view.shape}")


@pytest.mark.isa
def test_parity_int32_wrap_large_k():
    """K = 70,000 > 65,793: all-255 codes times all −128 weights wrap the int32 accumulator; torch wraps the same way,
    and from_float warns."""
    K = 70_000
    w = np.full((3, K), -1.0, np.float32)  # symmetric: −amax/(amax/127.5) = −127.5 -> −128 for every weight
    w[1] = 1.0  # -> 127
    w[2, ::2] = -1.0
    w[2, 1::2] = 1.0
    x = np.full((2, K), 255, np.uint8)
    x[1, ::3] = 0
    with pytest.warns(RuntimeWarning, match="wrap"):
        ql = QuantizedLinear.from_float(w, None, 1.0, 0, 1e7, 0)
    raw = ql.accumulate(x)
    true_raw = (x.astype(np.int64) @ ql.weight_int8.astype(np.int64).T)
    assert (raw != true_raw).any(), "no accumulator wrapped: the test does not test wrapping"
    assert_same(raw, true_raw.astype(np.int32), "raw wraps modulo 2^32")
    p = dict(x=x, w=w, b=None, sx=1.0, zx=0, sy=1e7, zy=0, relu=False, qscheme="per_channel_symmetric",
             wkind="wrap", xkind="full", seed="wrap")
    check_problem(p)


@pytest.mark.isa
@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(40))
def test_parity_random_problems_slow(rng, chunk):
    """The long run: 40 x 1500 random problems, plus 40 x 30 at large K."""
    problems, values = run_random_problems(rng, 1500)
    for i in range(30):
        p = random_problem(rng, k_choices=(2048, 4096, 4097, 5000, 8191, 16384), max_n=64, max_m=8)
        p["seed"] = f"large-K problem {i}"
        if i % 2:
            p["tie"] = aim_output_scale_at_a_tie(p, rng, largest_raw=True)
        values += check_problem(p)
        problems += 1
    print(f"\nslow chunk {chunk}: {problems} problems, {values} outputs, 0 mismatches")


# ----------------------------------------------------------------------------------------------------------------
# Non-VNNI CPUs: int16-saturated pairs, against torch forced onto fbgemm's AVX2 / AVX-512 kernels
# ----------------------------------------------------------------------------------------------------------------

_ISA_CHILD = textwrap.dedent("""
    import sys, warnings
    import numpy as np, torch
    warnings.filterwarnings("ignore")
    torch.backends.quantized.engine = "fbgemm"
    data = np.load(sys.argv[1])
    out = {}
    for i in range(int(data["count"])):
        x, w, b = data[f"x{i}"], data[f"w{i}"], data[f"b{i}"]
        sx, zx, sy, zy, relu = data[f"params{i}"]
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(data[f"ws{i}"]).double(),
                                                      torch.zeros(w.shape[0], dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qw, torch.from_numpy(b) if b.size else None)
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), float(sx), int(zx))
        op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
        out[f"y{i}"] = op(qx, packed, float(sy), int(zy)).int_repr().numpy()
    np.savez(sys.argv[2], **out)
""")


def _isa_problems(rng: np.random.Generator) -> list[dict]:
    problems = []
    for i, K in enumerate([1, 2, 3, 4, 5, 7, 8, 9, 31, 64, 65, 127, 300, 1000, 2049]):
        for j in range(4):
            N = int(rng.integers(1, 50))
            M = int(rng.integers(1, 12))
            if j == 0:  # full range, the pair sums that saturate: 255·(−128)·2 < −32768, 255·127·2 > 32767
                x = rng.choice(np.array([0, 200, 255], np.uint8), (M, K))
                w = rng.choice(np.array([-128, -127, -100, 100, 127], np.int8), (N, K))
            elif j == 3:  # 7-bit activations (reduce_range): 2·127·(−128) = −32,512 never saturates
                x = rng.choice(np.array([0, 100, 127], np.uint8), (M, K))
                w = rng.choice(np.array([-128, -127, 127], np.int8), (N, K))
            else:
                x = rng.integers(0, 256, (M, K), dtype=np.uint8)
                w = rng.integers(-128, 128, (N, K), dtype=np.int8)
            ws = (10.0 ** rng.uniform(-3, -1, N)).astype(np.float32)
            b = (rng.standard_normal(N) * 0.3).astype(np.float32) if j != 1 else np.zeros(0, np.float32)
            sx, zx = float(rng.uniform(0.005, 0.05)), int(rng.integers(0, 256))
            sy = float(sx * ws.max() * 128 * math.sqrt(K) * 0.5 * 10.0 ** rng.uniform(-1, 0))
            problems.append(dict(x=x, w=w, ws=ws, b=b, seven_bit=j == 3,
                                 params=np.array([sx, zx, sy, int(rng.integers(0, 256)), j == 2], np.float64)))
    return problems


@pytest.mark.isa
@pytest.mark.parametrize("isa", ["AVX2", "AVX512"])
def test_saturate_int16_pairs_matches_torch_without_vnni(rng, tmp_path, isa, fbgemm_kernel):
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (or AVX512, without VNNI) makes fbgemm use vpmaddubsw, which saturates pairs
    of products to int16. refquant's ``saturate_int16_pairs=True`` must equal torch there, and refquant modelling
    this process's family (the probe: VNNI, or the same saturating kernels on a CPU without VNNI, or when this run
    itself has FBGEMM_ENABLE_INSTRUCTIONS=AVX2) must equal torch here. When this process runs VNNI the two torch runs
    must differ (proof the child took the non-VNNI path), otherwise they must agree — except on 7-bit activation
    codes (reduce_range), where no pair saturates and every run agrees."""
    problems = _isa_problems(rng)
    data = {"count": len(problems)}
    for i, p in enumerate(problems):
        for key in ("x", "w", "ws", "b", "params"):
            data[f"{key}{i}"] = p[key]
    np.savez(tmp_path / "in.npz", **data)
    (tmp_path / "child.py").write_text(_ISA_CHILD)
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS=isa)
    subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   env=env, check=True, timeout=300)
    forced = np.load(tmp_path / "out.npz")

    changed = compared = 0
    for i, p in enumerate(problems):
        sx, zx, sy, zy, relu = p["params"]
        bias = p["b"] if p["b"].size else None
        ql = QuantizedLinear(p["w"], p["ws"], np.zeros(len(p["ws"]), np.int32), bias, float(sx), int(zx), float(sy),
                             int(zy), relu=bool(relu))
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(p["w"]), torch.from_numpy(p["ws"]).double(),
                                                      torch.zeros(len(p["ws"]), dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else torch.from_numpy(bias))
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["x"]), float(sx), int(zx))
        op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
        y_here = op(qx, packed, float(sy), int(zy)).int_repr().numpy()
        ctx = f"isa {isa}, problem {i}, x {p['x'].shape}, N={len(p['ws'])}"
        assert_same(ql(p["x"], saturate_int16_pairs=saturate_int16_pairs(fbgemm_kernel)), y_here,
                    f"refquant modelling this process's {fbgemm_kernel} kernels vs torch here; {ctx}")
        assert_same(ql(p["x"], saturate_int16_pairs=True), forced[f"y{i}"], f"saturate_int16_pairs vs torch {isa}; {ctx}")
        if p["seven_bit"]:
            assert_same(forced[f"y{i}"], y_here, f"7-bit codes: torch {isa} vs {fbgemm_kernel} should agree; {ctx}")
        changed += int((y_here != forced[f"y{i}"]).sum())
        compared += y_here.size
    print(f"\n{isa}: {len(problems)} problems, {compared} outputs equal; {changed} of them differ between this "
          f"process ({fbgemm_kernel}) and {isa}")
    if fbgemm_kernel == "vnni":
        assert changed > 0, f"torch under FBGEMM_ENABLE_INSTRUCTIONS={isa} gave the VNNI results: not forced"
    else:  # this process already runs the int16-saturating kernels (no VNNI here, or forced): the same results
        assert changed == 0, f"torch here ({fbgemm_kernel}) and under FBGEMM_ENABLE_INSTRUCTIONS={isa} differ"


def test_seven_bit_activations_never_saturate(rng):
    """With x <= 127 (reduce_range) the int16-pair mode equals the exact mode, even at the extreme codes; with
    x = 255 and w = −128 it does not (a pair sum −65,280 saturates to −32,768)."""
    K = 64
    w_i8 = rng.choice(np.array([-128, 127], np.int8), (16, K))
    ql = QuantizedLinear(w_i8, np.full(16, 0.01, np.float32), np.zeros(16, np.int32), None, 0.02, 0, 10.0, 128)
    x7 = np.concatenate([np.full((1, K), 127, np.uint8), rng.choice(np.array([0, 127], np.uint8), (31, K))])
    assert_same(ql.accumulate(x7, saturate_int16_pairs=True), ql.accumulate(x7), "7-bit codes")
    x8 = np.full((1, K), 255, np.uint8)
    assert (ql.accumulate(x8, saturate_int16_pairs=True) != ql.accumulate(x8)).any()


# ----------------------------------------------------------------------------------------------------------------
# Golden tests: hand-derived integers
# ----------------------------------------------------------------------------------------------------------------

def test_golden_accumulate_and_requantize():
    """x = [10, 4], z_x = 2, q_w = [2, −1], s_x = 0.25, s_w = 0.5, s_y = 0.5, z_y = 100, bias = 0.25.

    acc = 10·2 + 4·(−1) = 16; col_offsets = 2 − 1 = 1; raw = 16 − 2·1 = 14 = (10−2)·2 + (4−2)·(−1);
    atws = 0.125; mult = 0.25; t = 14 + 0.25/0.125 = 16; y = 4; q = 104."""
    ql = QuantizedLinear(np.array([[2, -1]], np.int8), [0.5], [0], np.array([0.25], np.float32), 0.25, 2, 0.5, 100)
    x = np.array([[10, 4]], np.uint8)
    assert_same(ql.col_offsets, np.array([1], np.int32), "col_offsets")
    assert_same(ql.act_times_w_scale, np.array([0.125], np.float32), "act_times_w_scale")
    assert_same(ql.output_multiplier, np.array([0.25], np.float32), "output_multiplier")
    assert_same(ql.accumulate(x), np.array([[14]], np.int32), "raw")
    assert_same(ql(x), np.array([[104]], np.uint8), "output")


def test_golden_affine_weights_row_offsets():
    """Per-channel affine, z_w = [3, −2]: raw = acc − z_x·col_offsets − z_w·Σx.

    q_w = [[5, 1], [−2, 0]], x = [7, 9], z_x = 4, K = 2. col_offsets = [6 − 3·2, −2 + 2·2] = [0, 2];
    acc = [7·5 + 9·1, −14] = [44, −14]; Σx = 16; raw = [44 − 0 − 48, −14 − 8 + 32] = [−4, 10]
    = [(7−4)(5−3) + (9−4)(1−3), (7−4)(−2+2) + (9−4)(0+2)] = [6 − 10, 0 + 10]."""
    ql = QuantizedLinear(np.array([[5, 1], [-2, 0]], np.int8), [1.0, 1.0], [3, -2], None, 1.0, 4, 1.0, 50,
                         weight_qscheme="per_channel_affine")
    x = np.array([[7, 9]], np.uint8)
    assert_same(ql.col_offsets, np.array([0, 2], np.int32), "col_offsets")
    assert_same(ql.accumulate(x), np.array([[-4, 10]], np.int32), "raw")
    assert_same(ql(x), np.array([[46, 60]], np.uint8), "output")
    qlt = QuantizedLinear(np.array([[5, 1], [-2, 0]], np.int8), [1.0], [3], None, 1.0, 4, 1.0, 50,
                          weight_qscheme="per_tensor_affine")  # z_w = 3 for both: raw = [−4, −14 − 4·(−8) − 48]
    assert_same(qlt.col_offsets, np.array([0, -8], np.int32), "per-tensor col_offsets")
    assert_same(qlt.accumulate(x), np.array([[-4, -30]], np.int32), "per-tensor affine raw")


def test_golden_round_half_to_even_and_relu():
    """s_x = s_w = 1, s_y = 4 -> mult = 0.25; raw 2, 6, 10, −2, −6 -> y 0.5, 1.5, 2.5, −0.5, −1.5
    -> r 0, 2, 2, 0, −2 (ties to even); z_y = 100 -> 100, 102, 102, 100, 98; ReLU floors at 100."""
    raw = np.array([[2, 6, 10, -2, -6]], np.int32)
    for relu, expected in ((False, [100, 102, 102, 100, 98]), (True, [100, 102, 102, 100, 100])):
        ql = QuantizedLinear(np.ones((5, 1), np.int8), np.ones(5, np.float32), np.zeros(5, np.int32), None,
                             1.0, 0, 4.0, 100, relu=relu)
        for readable in (False, True):
            assert_same(ql.requantize(raw, readable=readable), np.array([expected], np.uint8), f"relu={relu}")


def test_golden_float32_raw_rounds():
    """raw = 2^24 + 1 is not a float32: cvtdq2ps gives 2^24 (tie to even); with mult = 2^−25, y = 0.5 -> 0.
    The exact value would give 0.5 + 2^−25 -> 1. Likewise 2^24 + 3 -> 2^24 + 4 -> y = 0.5 + 2^−23 -> 1."""
    ql = QuantizedLinear(np.ones((2, 1), np.int8), np.ones(2, np.float32), np.zeros(2, np.int32), None,
                         1.0, 0, 2.0**25, 0)
    raw = np.array([[2**24 + 1, 2**24 + 3]], np.int32)
    for readable in (False, True):
        assert_same(ql.requantize(raw, readable=readable), np.array([[0, 1]], np.uint8), "float32(raw) rounding")


def test_golden_int32_min_gives_zero():
    """s_x = s_w = 1, s_y = 2^−31 -> mult = 2^31. raw = 1 -> y = 2^31 -> cvtps2dq INT32_MIN -> 0 (lrintf+clamp: 255);
    raw = −1 -> y = −2^31 = INT32_MIN exactly -> 0; raw = 0 -> z_y = 9."""
    ql = QuantizedLinear(np.ones((3, 1), np.int8), np.ones(3, np.float32), np.zeros(3, np.int32), None,
                         1.0, 0, 2.0**-31, 9)
    raw = np.array([[1, -1, 0]], np.int32)
    for readable in (False, True):
        assert_same(ql.requantize(raw, readable=readable), np.array([[0, 0, 9]], np.uint8), "INT32_MIN")


def test_golden_per_tensor_fma():
    """Per-tensor weights, s_x = 1.5, s_w = 2 -> atws = 3; s_y = 3·2^24 -> mult = 2^−24; bias = 1.5; raw = 2^23.

    rcp = f32(1/3) = 11184811·2^−25 (a little above 1/3), so bias·rcp = 0.5 + 2^−26 exactly (not a float32).
    eq. L8c, one rounding: 2^23 + 0.5 + 2^−26 -> 2^23 + 1 -> y = 0.5 + 2^−24 -> 1.
    Rounding bias·rcp first (0.5), or the per-channel division 1.5/3 = 0.5: 2^23 + 0.5 is a tie -> 2^23 -> y = 0.5 -> 0."""
    rcp = np.float32(1.0 / 3.0)
    assert Fraction(float(rcp)) == Fraction(11184811, 2**25)
    assert Fraction(3, 2) * Fraction(float(rcp)) == Fraction(1, 2) + Fraction(1, 2**26)
    raw = np.array([[2**23]], np.int32)
    for qscheme, expected in (("per_tensor_symmetric", 1), ("per_channel_symmetric", 0)):
        ql = QuantizedLinear(np.ones((1, 1), np.int8), [2.0], [0], np.array([1.5], np.float32), 1.5, 0,
                             3.0 * 2**24, 0, weight_qscheme=qscheme)
        assert_same(ql.output_multiplier, np.array([2.0**-24], np.float32), "multiplier")
        for readable in (False, True):
            assert_same(ql.requantize(raw, readable=readable), np.array([[expected]], np.uint8), qscheme)


def test_golden_scales_rounded_to_float32():
    """input_scale and output_scale are doubles in torch (q_scale()); qlinear.cpp rounds both to float32 first:
    atws = f32(f32(0.1)·0.5), mult = f32(atws / f32(0.3))."""
    ql = QuantizedLinear(np.ones((1, 1), np.int8), [0.5], [0], None, 0.1, 0, 0.3, 0)
    atws = np.float32(np.float32(0.1) * np.float32(0.5))
    assert_same(ql.act_times_w_scale, np.array([atws], np.float32), "act_times_w_scale")
    assert_same(ql.output_multiplier, np.array([np.float32(atws / np.float32(0.3))], np.float32), "multiplier")


def test_golden_weight_quantization_symmetric():
    """Channel [−3, 1, 3]: s = f32(3/127.5); the reciprocal f32(1/s) is exactly 42.5, so −3·42.5 = −127.5 -> −128
    (RNE), 1·42.5 = 42.5 -> 42 (tie to even), 3·42.5 = 127.5 -> 128 -> clamped to 127: col_offsets = 41.
    Channel [−1, 0.5, 1]: s = f32(1/127.5) whose reciprocal is 127.49999 (not 127.5): −1 -> −127, 0.5 -> 64, 1 -> 127.
    A zero channel: s = eps = 2^−23, codes 0."""
    w = np.array([[-3.0, 1.0, 3.0], [-1.0, 0.5, 1.0], [0.0, 0.0, 0.0]], np.float32)
    s0 = np.float32(np.float32(3.0) / np.float32(127.5))
    s1 = np.float32(np.float32(1.0) / np.float32(127.5))
    assert np.float32(1) / s0 == np.float32(42.5) and np.float32(1) / s1 < np.float32(127.5)
    ql = QuantizedLinear.from_float(w, None, 1.0, 0, 1.0, 0)
    assert_same(ql.weight_int8, np.array([[-128, 42, 127], [-127, 64, 127], [0, 0, 0]], np.int8), "weight_int8")
    assert_same(ql.weight_scales, np.array([s0, s1, 2.0**-23], np.float32), "scales")
    assert_same(ql.weight_zero_points, np.zeros(3, np.int32), "zero points")
    assert_same(ql.col_offsets, np.array([41, 64, 0], np.int32), "col_offsets")


def test_overflow_check():
    """K·255·128 > 2^31 − 1 from K = 65,794 on."""
    assert not int32_accumulator_can_overflow(65_793)
    assert int32_accumulator_can_overflow(65_794)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizedLinear(np.ones((1, 65_793), np.int8), [1.0], [0], None, 1.0, 0, 1.0, 0)
    with pytest.warns(RuntimeWarning, match="K = 65794"):
        QuantizedLinear(np.ones((1, 65_794), np.int8), [1.0], [0], None, 1.0, 0, 1.0, 0)


# ----------------------------------------------------------------------------------------------------------------
# Numba kernel == readable NumPy
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["below", "at"])
def test_small_products_run_numpy_and_large_ones_the_kernels(rng, monkeypatch, side):
    """Below refquant.matmul.KERNEL_MIN_MACS multiply-adds (M·K·N) matmul_u8s8_acc32's "auto" runs the NumPy
    reference and QuantizedLinear's call the two stages (for the first refquant._dispatch.SMALL_CALLS products);
    from it, or after them, the tile kernel and the fused call. On both sides
    the same bits as the reference product and the readable stages (the path that must not run is made to fail)."""
    import refquant.linear as L
    import refquant.matmul as mm

    monkeypatch.delenv(mm.KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(mm, "_SMALL_PRODUCTS", SmallCalls(mm.KERNEL_MIN_MACS))  # no small product made yet
    K = N = 64
    M = mm.KERNEL_MIN_MACS // (K * N) - (1 if side == "below" else 0)
    x_u8 = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w_i8 = rng.integers(-128, 128, (N, K), dtype=np.int8)
    ql = QuantizedLinear.from_quantized(w_i8, rng.uniform(0.5, 2.0, N) / 2048, rng.integers(-5, 6, N),
                                        rng.standard_normal(N).astype(np.float32), 0.02, 128, 0.05, 100)
    expected_acc = mm.matmul_u8s8_acc32_ref(x_u8, w_i8)
    expected_y = ql.requantize(ql.accumulate(x_u8), readable=True)
    for kernel in ("avx512", "portable") if mm._cpu_has("avx512vnni") else ("portable",):
        assert_same(mm.matmul_u8s8_acc32(x_u8, w_i8, kernel=kernel), expected_acc, f"{kernel} kernel, M = {M}")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the other path ran")

    if side == "below":
        monkeypatch.setattr(mm, "_matmul_tiled", must_not_run)
        monkeypatch.setattr(L.FusedLinear, "__call__", must_not_run)
        monkeypatch.setattr(L.FusedLinear, "run", must_not_run)
    else:
        monkeypatch.setattr(mm, "matmul_u8s8_acc32_ref", must_not_run)
        monkeypatch.setattr(L.QuantizedLinear, "accumulate", must_not_run)
    assert_same(mm.matmul_u8s8_acc32(x_u8, w_i8), expected_acc, f"auto dispatch, M = {M}")
    assert_same(ql(x_u8), expected_y, f"QuantizedLinear's call, M = {M}")
    if side == "below":  # after SMALL_CALLS small products, the kernels: the tiles, and the fused call
        monkeypatch.undo()
        monkeypatch.delenv(mm.KERNEL_ENV_VAR, raising=False)
        monkeypatch.setattr(mm, "_SMALL_PRODUCTS", SmallCalls(mm.KERNEL_MIN_MACS, max_calls=0))
        monkeypatch.setattr(mm, "matmul_u8s8_acc32_ref", must_not_run)
        monkeypatch.setattr(L.QuantizedLinear, "accumulate", must_not_run)
        assert_same(mm.matmul_u8s8_acc32(x_u8, w_i8), expected_acc, f"auto after SMALL_CALLS, M = {M}")
        assert_same(ql(x_u8), expected_y, f"QuantizedLinear's call after SMALL_CALLS, M = {M}")


@pytest.mark.parametrize("chunk", range(6))
def test_requantize_kernel_equals_readable(rng, chunk):
    """Random int32 raw values (including INT32_MIN/MAX and values above 2^24), biases, scales, both bias forms."""
    for i in range(60):
        M, N = int(rng.integers(0, 20)), int(rng.integers(1, 40))
        raw = rng.integers(-2**31, 2**31, (M, N), dtype=np.int64).astype(np.int32)
        raw = np.where(rng.random((M, N)) < 0.5, (raw >> rng.integers(0, 31)), raw).astype(np.int32)
        if M:
            raw[0, 0] = np.iinfo(np.int32).min
            raw[-1, -1] = np.iinfo(np.int32).max
        per_channel = bool(i % 2)
        n_params = N if per_channel else 1
        atws = (10.0 ** rng.uniform(-12, 2, n_params)).astype(np.float32)
        mult = (atws / np.float32(10.0 ** rng.uniform(-14, 3))).astype(np.float32)
        bias = None if i % 3 == 0 else (rng.standard_normal(N) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32)
        zp, relu = int(rng.integers(0, 256)), bool(rng.integers(0, 2))
        args = (bias, atws, mult, zp, relu, per_channel)
        expected = requantize_readable(raw, *args)
        assert_same(requantize_fast(raw, *args), expected, f"kernel vs readable, case {i}, per_channel={per_channel}")


def test_requantize_kernel_equals_readable_on_ties():
    """Outputs exactly at .5 and per-tensor FMA near-ties: raw·mult on a grid of halves."""
    raw = np.arange(-4096, 4096, dtype=np.int32).reshape(64, 128)
    for per_channel in (False, True):
        n_params = 128 if per_channel else 1
        atws = np.full(n_params, 3.0, np.float32)
        mult = np.full(n_params, 0.5, np.float32)
        bias = np.linspace(-3, 3, 128).astype(np.float32)
        for b in (None, bias):
            args = (b, atws, mult, 128, False, per_channel)
            assert_same(requantize_fast(raw, *args), requantize_readable(raw, *args), "ties")


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_linear():
    return QuantizedLinear.from_float(np.ones((3, 4), np.float32), None, 0.1, 0, 0.1, 0)


@pytest.mark.parametrize("x, exc, match", [
    (np.zeros((2, 4), np.int8), TypeError, "x_u8 must hold uint8"),
    (np.zeros((2, 4), np.float32), TypeError, "quantize floats first"),
    (np.zeros((2, 4), np.int32), TypeError, "x_u8"),
    ([[0, 1, 2, 3]], TypeError, "x_u8 must be a numpy array"),
    (np.zeros((2, 5), np.uint8), ValueError, "last dimension in_features K = 4"),
    (np.zeros((4,), np.uint8), ValueError, "at least 2 dimensions"),
])
def test_bad_input_codes(small_linear, x, exc, match):
    with pytest.raises(exc, match=match):
        small_linear(x)


def test_bad_requantize_input(small_linear):
    with pytest.raises(TypeError, match="acc_i32 must hold int32"):
        small_linear.requantize(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="out_features N = 3"):
        small_linear.requantize(np.zeros((2, 4), np.int32))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(weight=np.ones((3,), np.float32)), ValueError, "weight must be 2-D"),
    (dict(weight=np.ones((2, 3, 4), np.float32)), ValueError, "weight must be 2-D"),
    (dict(weight=np.ones((0, 4), np.float32)), ValueError, "at least one"),
    (dict(weight=np.array([[1.0, np.nan]], np.float32)), ValueError, r"weight must be finite.*weight\[0, 1\]"),
    (dict(weight=np.array([[1.0, np.inf]], np.float32)), ValueError, "weight must be finite"),
    (dict(weight=np.array([[1e39, 1.0]])), ValueError, "weight must be finite"),  # inf once rounded to float32
    (dict(weight=np.ones((2, 2), np.complex64)), TypeError, "weight must be a real float array"),
    (dict(bias=np.ones(3, np.float32)), ValueError, r"bias must have shape \(2,\)"),
    (dict(bias=np.ones((2, 1), np.float32)), ValueError, r"bias must have shape \(2,\)"),
    (dict(bias=np.array([0.0, np.nan], np.float32)), ValueError, r"bias must be finite.*bias\[1\]"),
    (dict(input_scale=float("nan")), ValueError, "input_scale must be a finite scale > 0"),
    (dict(input_scale=float("inf")), ValueError, "input_scale must be a finite scale > 0"),
    (dict(input_scale=0.0), ValueError, "input_scale must be a finite scale > 0"),
    (dict(input_scale=1e-50), ValueError, "input_scale must stay finite and > 0 when rounded to float32"),
    (dict(output_scale=-1.0), ValueError, "output_scale must be a finite scale > 0"),
    (dict(output_scale=1e40), ValueError, "output_scale must stay finite"),
    (dict(output_scale="0.1"), TypeError, "output_scale must be a real number"),
    (dict(input_zero_point=256), ValueError, r"input_zero_point must be a quint8 zero point in \[0, 255\]"),
    (dict(output_zero_point=-1), ValueError, r"output_zero_point must be a quint8 zero point in \[0, 255\]"),
    (dict(output_zero_point=1.5), TypeError, "output_zero_point must be an integer"),
    (dict(weight_qscheme="per_channel_affine_float_qparams"), ValueError, "weight_qscheme must be one of"),
])
def test_bad_from_float_arguments(kwargs, exc, match):
    args = dict(weight=np.ones((2, 2), np.float32), bias=None, input_scale=0.1, input_zero_point=0,
                output_scale=0.1, output_zero_point=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        QuantizedLinear.from_float(**args)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(weight_int8=np.ones((2, 2), np.int16)), TypeError, "weight_int8 must be a numpy int8 array"),
    (dict(weight_int8=np.ones((2,), np.int8)), ValueError, "weight_int8 must be 2-D"),
    (dict(weight_scales=[1.0]), ValueError, "weight_scales must hold 2"),
    (dict(weight_scales=[1.0, np.nan]), ValueError, "weight_scales must be finite and > 0"),
    (dict(weight_scales=[1.0, 0.0]), ValueError, "weight_scales must be finite and > 0"),
    (dict(weight_zero_points=[0, 1]), ValueError, "weight_zero_points must be 0 for per_channel_symmetric"),
    (dict(weight_zero_points=[0, 0, 0]), ValueError, "weight_zero_points must hold 2"),
    (dict(weight_zero_points=[0, 200], weight_qscheme="per_channel_affine"), ValueError, r"\[-128, 127\]"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    args = dict(weight_int8=np.ones((2, 2), np.int8), weight_scales=[1.0, 1.0], weight_zero_points=[0, 0], bias=None,
                input_scale=0.1, input_zero_point=0, output_scale=0.1, output_zero_point=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        QuantizedLinear(**args)
