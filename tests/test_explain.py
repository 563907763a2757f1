"""refquant.explain and ``python -m crosscheck.explain``: foreign implementations, written here in plain NumPy (and
Python fractions where an exact fused multiply-add is needed), each deliberately different from torch in one known
way (and a few in two), run on random layers and models; the explainer must name the variant that produced their
codes and explain every differing code. Random ±1 noise must stay unexplained. Goldens are refquant-built layers
and models and, for a few, torch's own (a torch eager model converted by torch, read by crosscheck.from_torch,
exported by refquant.export.export_model, its output codes checked against torch's first).

None of the foreign implementations calls refquant's arithmetic: they read the golden's primary quantities
(weights, scales, zero points, float bias) as a port would read a model file, and compute the rest themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import refquant
import refquant.program as pg
from crosscheck import explain as cli
from refquant.explain import MIN_SUPPORT, explain
from refquant.export import export_linear, export_model
from refquant.linear import QuantizedLinear

ROOT = Path(__file__).resolve().parents[1]
COUNTS: Counter = Counter()
F32 = np.float32


# ----------------------------------------------------------------------------------------------------------------
# foreign implementations (plain NumPy): the integer part, the requantizations, the QuantStub roundings
# ----------------------------------------------------------------------------------------------------------------

def port_raw(x_u8, w_i8, zx, saturate_pairs=False):
    """Σ_k x·w − z_x·Σ_k w (symmetric weights), int64; with ``saturate_pairs`` the products are summed in pairs
    (k = 2j, 2j + 1) each saturated to int16 first, as vpmaddubsw does."""
    x = x_u8.astype(np.int64).reshape(-1, x_u8.shape[-1])
    w = w_i8.astype(np.int64)
    if saturate_pairs:
        K = x.shape[1]
        if K % 2:
            x, w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
        prod = x[:, None, :] * w[None, :, :]
        pairs = np.clip(prod[:, :, 0::2] + prod[:, :, 1::2], -32768, 32767)
        acc = pairs.sum(axis=2)
    else:
        acc = x @ w.T
    return acc - zx * w_i8.astype(np.int64).sum(axis=1)


def port_torch_float(raw, c, zy_delta=0):
    """torch's fbgemm float path for per-channel weights: f32(raw) + f32(bias / atws), times the float32
    multiplier, rounded half to even, plus the output zero point (``zy_delta`` moves it)."""
    sw = c["weight_scales"].astype(F32)
    atws = (F32(c["input_scale"]) * sw).astype(F32)
    mult = (atws / F32(c["output_scale"])).astype(F32)
    t = raw.astype(F32)
    if c["has_bias"]:
        t = (t + (c["bias"] / atws).astype(F32)).astype(F32)
    y = (t * mult).astype(F32)
    zy = int(c["output_zero_point"]) + zy_delta
    return np.clip(np.rint(y).astype(np.int64) + zy, zy if c["relu"] else 0, 255)


def port_int32_bias(raw, c):
    """The bias rounded to int32 (half to even of f32(bias·f32(1/atws))), added in int32; torch's multiplier."""
    sw = c["weight_scales"].astype(F32)
    atws = (F32(c["input_scale"]) * sw).astype(F32)
    mult = (atws / F32(c["output_scale"])).astype(F32)
    b = np.rint((c["bias"] * (F32(1) / atws)).astype(F32)).astype(np.int64) if c["has_bias"] else 0
    y = ((raw + b).astype(F32) * mult).astype(F32)
    zy = int(c["output_zero_point"])
    return np.clip(np.rint(y).astype(np.int64) + zy, zy if c["relu"] else 0, 255)


def _half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _trunc_div(v, d):
    return np.where(v >= 0, v // d, -((-v) // d))


def port_tflite(raw, c):
    """TFLite's reference integer FullyConnected: the bias by its converter (round half away of
    f32(bias·f32(1/(double)sf))), QuantizeMultiplier (frexp, round half away), then two roundings:
    SaturatingRoundingDoublingHighMul (nudge, C division) and RoundingDivideByPOT (mask and threshold)."""
    sx, sy = F32(c["input_scale"]), F32(c["output_scale"])
    sw = c["weight_scales"].astype(F32)
    sf = (sx * sw).astype(F32)
    b = _half_away((c["bias"] * (1.0 / sf.astype(np.float64)).astype(F32)).astype(F32).astype(np.float64))
    b = b.astype(np.int64) if c["has_bias"] else 0
    Ms, shifts = [], []
    for swn in sw:
        real = float(sx) * float(swn) / float(sy)
        q, e = math.frexp(real)
        M = int(_half_away(np.float64(q * 2.0**31)))
        if M == 2**31:
            M, e = M // 2, e + 1
        Ms.append(M)
        shifts.append(e)
    M, shift = np.array(Ms, np.int64), np.array(shifts, np.int64)
    acc = raw + b
    x = acc * (2 ** np.maximum(shift, 0))
    ab = x * M
    nudge = np.where(ab >= 0, 2**30, 1 - 2**30)
    h = _trunc_div(ab + nudge, 2**31)
    right = np.maximum(-shift, 0)
    mask = (np.int64(1) << right) - 1
    remainder = h & mask
    threshold = (mask >> 1) + (h < 0)
    r = (h >> right) + (remainder > threshold)
    zy = int(c["output_zero_point"])
    return np.clip(r + zy, zy if c["relu"] else 0, 255)


def port_qnnpack(raw, c):
    """qnnpack's requantization for per-tensor weights: the bias to int32 with the double scale s_w·s_x (multiply
    by f32(1/f32(scale)), round half to even), the scale f32(f32(s_w·f32(s_x))·f32(1/f32(s_y))), RNE."""
    sw64 = float(c["weight_scales_f64"][0])
    scale_b = F32(sw64 * float(c["input_scale"]))
    b = np.rint((c["bias"] * (F32(1) / scale_b)).astype(F32)).astype(np.int64) if c["has_bias"] else 0
    rs = F32(F32(F32(sw64) * F32(c["input_scale"])) * (F32(1) / F32(c["output_scale"])))
    y = ((raw + b).astype(F32) * rs).astype(F32)
    zy = int(c["output_zero_point"])
    return np.clip(np.rint(y).astype(np.int64) + zy, zy if c["relu"] else 0, 255)


def _round_f32(v: Fraction) -> F32:
    """An exact rational to the nearest float32, ties to even (an exact fmaf's one rounding)."""
    f = F32(float(v))
    cands = [np.nextafter(f, F32(-np.inf)), f, np.nextafter(f, F32(np.inf))]
    best = min(cands, key=lambda g: (abs(Fraction(float(g)) - v), int(np.array(g).view(np.uint32)) & 1))
    return F32(best)


def port_quantize(x, c, how):
    """The QuantStub as a port computes it: "fma_half_away" (an exact fmaf, then C's round()), "no_fma"
    (f32(f32(x·inv) + z), half to even), "textbook64" (np.round of f64(x) / scale + z)."""
    z = int(c["zero_point"])
    inv = F32(1) / F32(c["scale"])
    if how == "no_fma":
        r = np.rint(((x * inv).astype(F32) + F32(z)).astype(F32))
    elif how == "textbook64":
        r = np.round(x.astype(np.float64) / float(c["scale"]) + z)
    elif how == "textbook32":  # torch's test reference, common_quantized._quantize, on a float32 x
        r = np.round(x / float(c["scale"]) + z)
    else:
        v = np.array([float(_round_f32(Fraction(float(xi)) * Fraction(float(inv)) + z)) for xi in x.reshape(-1)])
        r = _half_away(v).reshape(x.shape)
    return np.clip(r, 0, 255).astype(np.uint8)


def port_model(program: pg.Program, *, quantize=None, linear=port_torch_float, saturate_pairs=False):
    """A whole program run by the port: each step from the program's primary quantities; returns the codes the
    final dequantize reads (or the output codes)."""
    t = [program.tensors[0]]
    for s in program.steps:
        x, c = t[s.input], s.constants
        if s.kind == "quantize":
            y = port_quantize(x, c, quantize) if quantize else program.tensors[s.output]
            if quantize is None:
                assert s.input == 0  # the torch QuantStub: the golden's own codes
        elif s.kind == "linear":
            raw = port_raw(x, c["weight_int8"], int(c["input_zero_point"]), saturate_pairs)
            y = linear(raw, c).astype(np.uint8).reshape(x.shape[:-1] + (c["out_features"],))
        elif s.kind == "relu":
            y = np.maximum(x, np.uint8(c["zero_point"])) if c["domain"] == "codes" else np.maximum(x, 0)
        elif s.kind == "dequantize":
            y = ((x.astype(F32) - F32(c["zero_point"])) * F32(c["scale"])).astype(F32)
        else:
            y = x
        t.append(y)
    from refquant.explain import _codes_tensor

    return t[_codes_tensor(program)]


# ----------------------------------------------------------------------------------------------------------------
# goldens
# ----------------------------------------------------------------------------------------------------------------

def _layer(rng, K, N, *, qscheme=None, relu=None, high=False):
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(F32)
    b = (rng.standard_normal(N) * 10.0 ** rng.uniform(-1.5, 0)).astype(F32) if rng.random() < 0.85 else None
    sx, sy = float(10.0 ** rng.uniform(-2.5, -1)), float(10.0 ** rng.uniform(-2, -0.5))
    relu = bool(rng.random() < 0.3) if relu is None else relu
    return QuantizedLinear.from_float(w, b, sx, int(rng.integers(0, 256 if not high else 60)), sy,
                                      int(rng.integers(0, 256)), relu=relu, weight_qscheme=qscheme)


def layer_golden(rng, *, qscheme=None, high=False, M=None):
    """A bare fbgemm layer on random uint8 codes (``high``: mostly near 255, so int16 pairs saturate)."""
    ql = _layer(rng, int(rng.integers(4, 48)), int(rng.integers(2, 24)), qscheme=qscheme, high=high)
    M = int(rng.integers(16, 64)) if M is None else M
    x = rng.integers(180 if high else 0, 256, (M, ql.in_features), dtype=np.uint8)
    return pg.program_from_fields(pg.linear_program(ql, x))


def model_golden(rng, *, depth=1, ties=True):
    """QuantStub -> Linear[ReLU] x depth -> DeQuantStub from refquant's observers; half of the inputs on exact
    x / scale = k + 0.5 - zero_point points (after float32 rounding: near-ties), where the roundings disagree."""
    K = int(rng.integers(4, 32))
    from refquant import model as rm

    modules = {"quant": rm.QuantStub()}
    width = K
    for d in range(depth):
        n = int(rng.integers(2, 20))
        w = (rng.standard_normal((n, width)) / np.sqrt(width)).astype(F32)
        b = (rng.standard_normal(n) * 0.3).astype(F32)
        modules[f"fc{d}"] = rm.Linear(w, b, relu=bool(d < depth - 1 or rng.random() < 0.3))
        width = n
    modules["dequant"] = rm.DeQuantStub()
    observed = rm.prepare(rm.FloatModel.sequential(modules))
    observed.calibrate((rng.standard_normal((32, K)) * 1.5).astype(F32))
    qm = observed.convert(engine="fbgemm")
    x = (rng.standard_normal((int(rng.integers(24, 64)), K)) * 1.5).astype(F32)
    if ties:
        q = qm.modules["quant"]
        k = rng.integers(0, 255, x.shape)
        near = ((k + 0.5 - q.zero_point) * q.scale).astype(F32)
        x = np.where(rng.random(x.shape) < 0.5, near, x).astype(F32)
    return pg.program_from_fields(pg.model_program(qm, x))


def assert_explains(program, theirs, intended, **kw):
    """Every differing code explained, by a variant that reproduces all of them, the intended one among those. For a
    combination a+b, a or b alone is accepted when it already reproduces every code (b changed nothing more)."""
    rep = explain(program, theirs, **kw)
    assert rep.explained == rep.differing, rep.render()
    if rep.differing:
        accepted = [intended, *intended.split("+")] if "+" in intended else [intended]
        assert any(a in rep.reproducing for a in accepted), (intended, rep.render())
        assert rep.best_variant in rep.reproducing
        assert all(e.explained and e.cause and e.cause.split(":")[0] in rep.reproducing for e in rep.elements)
        COUNTS[f"{intended} layers"] += 1
        COUNTS[f"{intended} codes explained"] += rep.differing
        COUNTS["best is the intended"] += rep.best_variant == intended
    return rep


# ----------------------------------------------------------------------------------------------------------------
# one known difference each
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("port, intended, least", [(port_tflite, "tflite", 5),
                                                   (port_int32_bias, "float_int32_bias", 3)])
def test_requantization_ports_on_random_layers(rng, port, intended, least):
    named = 0
    for _ in range(75):  # until least layers gave differing codes
        if named >= least:
            break
        p = layer_golden(rng, M=256)
        s = p.steps[0]
        theirs = port(port_raw(p.tensors[0], s.constants["weight_int8"], int(s.constants["input_zero_point"])),
                      s.constants)
        rep = assert_explains(p, theirs, intended)
        named += rep.differing > 0
    assert named >= least, f"only {named} layers gave differing codes: the test saw too little"


def test_qnnpack_formula(rng):
    named = 0
    for _ in range(60):  # until 3 layers gave differing codes
        if named >= 3:
            break
        p = layer_golden(rng, qscheme="per_tensor_symmetric", M=256)
        c = p.steps[0].constants
        theirs = port_qnnpack(port_raw(p.tensors[0], c["weight_int8"], int(c["input_zero_point"])), c)
        rep = assert_explains(p, theirs, "qnnpack")
        named += rep.differing > 0
    assert named >= 3


def test_int16_saturation(rng):
    named = 0
    for _ in range(45):  # until 5 layers gave differing codes
        if named >= 5:
            break
        p = layer_golden(rng, high=True)
        c = p.steps[0].constants
        raw = port_raw(p.tensors[0], c["weight_int8"], int(c["input_zero_point"]), saturate_pairs=True)
        rep = assert_explains(p, port_torch_float(raw, c), "int16_saturation")
        named += rep.differing > 0
        if rep.differing:
            assert any(e.golden_intermediates["int16_pairs_would_saturate"] for e in rep.elements)
            assert rep.best_variant == "int16_saturation"  # nothing else moves the accumulators
    assert named >= 5


def test_pairs_restart_ignored(rng):
    """A port of a oneDNN gemm:jit golden (K = 302: its second K block starts new int16 pairs at k = 151, eq. M2b)
    that sums the pairs from k = 0, plain NumPy (port_raw), with the golden's own requantization."""
    named = 0
    for _ in range(12):  # until 3 layers gave differing codes
        if named >= 3:
            break
        K, N = int(rng.choice([302, 514])), int(rng.integers(2, 12))
        w = rng.choice(np.array([-128, -127, 126, 127], np.int8), size=(N, K))
        ql = QuantizedLinear(w, rng.uniform(0.002, 0.01, N), np.zeros(N, np.int64),
                             rng.standard_normal(N).astype(F32), 0.02, int(rng.integers(0, 256)),
                             float(rng.uniform(5, 40)), int(rng.integers(0, 256)),
                             weight_qscheme="per_channel_symmetric", saturate_int16_pairs=True, engine="onednn",
                             onednn_kernel="gemm")
        assert ql.pairs_restart_k == (K + 1) // 2
        x = rng.choice(np.array([0, 200, 255], np.uint8), size=(int(rng.integers(4, 16)), K))
        p = pg.program_from_fields(pg.linear_program(ql, x))
        raw = port_raw(x, w, ql.input_zero_point, saturate_pairs=True).astype(np.int32)
        theirs = ql.requantize(raw)
        rep = assert_explains(p, theirs, "no_pairs_restart")
        named += rep.differing > 0  # (fbgemm's engine, which pairs from k = 0 too, may reproduce them as well)
    assert named >= 3


@pytest.mark.parametrize("how, intended", [("fma_half_away", "half_away"), ("no_fma", "multiply_then_add"),
                                           ("textbook64", "textbook_float64"), ("textbook32", "textbook_float32")])
def test_quantstub_roundings(rng, how, intended):
    named = 0
    for _ in range(24):  # until 4 layers gave differing codes
        if named >= 4:
            break
        p = model_golden(rng)
        rep = assert_explains(p, port_model(p, quantize=how), intended)
        named += rep.differing > 0
        # their input codes given: the input is explained by the rounding, the rest by the golden's arithmetic
        their_in = port_quantize(p.tensors[0], p.steps[0].constants, how)
        rep2 = explain(p, port_model(p, quantize=how), their_input_codes=their_in)
        assert rep2.input.explained == rep2.input.differing and rep2.explained == rep2.differing
        assert rep2.input.differing == 0 or intended in [v.name for v in rep2.input.variants if v.differing == 0]
    assert named >= 4


def test_port_roundings_equal_the_ports(rng):
    """refquant.quantize.quantize_per_tensor_port (what run_program runs for the explainer) equals the ports above,
    on near-ties, exact ties (a power-of-two scale), the range's ends and infinities; NaN is refused."""
    from refquant.quantize import quantize_per_tensor_port

    for scale in (float(10.0 ** rng.uniform(-3, 0)), 2.0 ** -5):
        z = int(rng.integers(0, 256))
        k = rng.integers(-20, 280, 4000)
        x = ((k + 0.5 - z) * scale).astype(F32)
        x[:4] = [np.inf, -np.inf, 1e30, -1e30]
        c = {"scale": scale, "zero_point": z}
        for how, name in [("fma_half_away", "half_away"), ("textbook64", "textbook_float64"),
                          ("textbook32", "textbook_float32")]:
            with np.errstate(invalid="ignore", over="ignore"):
                expected = port_quantize(x[4:], c, how)
            assert np.array_equal(quantize_per_tensor_port(x[4:], scale, z, "quint8", name), expected), name
            assert quantize_per_tensor_port(x[:4], scale, z, "quint8", name).tolist() == [255, 0, 255, 0]
    with pytest.raises(ValueError, match="NaN"):
        quantize_per_tensor_port(np.float32([np.nan]), 0.1, 0, "quint8", "half_away")


def test_zero_point_off_by_one(rng):
    for _ in range(6):
        p = model_golden(rng, ties=False)
        lin = next(s for s in p.steps if s.kind == "linear")
        if int(lin.constants["output_zero_point"]) == 255 or lin.constants["relu"]:
            continue  # the slip + 1 would leave the range / ReLU clamps it onto the zero point
        theirs = port_model(p, linear=lambda raw, c: port_torch_float(raw, c, zy_delta=1))
        rep = assert_explains(p, theirs, f"{lin.name}.zero_point_plus_one")
        assert rep.differing > 0


@pytest.mark.parametrize("engine", ["qnnpack"])
def test_golden_of_another_engine(rng, engine):
    """A golden from qnnpack's layer; the port runs torch's fbgemm float path (per-channel weights)."""
    named = 0
    for _ in range(30):  # until 3 layers gave differing codes
        if named >= 3:
            break
        ql = _layer(rng, int(rng.integers(4, 48)), int(rng.integers(2, 24)), qscheme="per_channel_symmetric")
        ql = QuantizedLinear(ql.weight_int8, ql.weight_scales_f64, ql.weight_zero_points, ql.bias, ql.input_scale,
                             ql.input_zero_point, ql.output_scale, ql.output_zero_point, relu=ql.relu,
                             weight_qscheme=ql.weight_qscheme, engine=engine)
        p = pg.program_from_fields(pg.linear_program(ql, rng.integers(0, 256, (512, ql.in_features), np.uint8)))
        c = p.steps[0].constants
        rep = assert_explains(p, port_torch_float(port_raw(p.tensors[0], c["weight_int8"],
                                                           int(c["input_zero_point"])), c), "fbgemm")
        named += rep.differing > 0
        for e in rep.elements:  # the golden's own decomposition rounds to the golden's code
            assert e.golden_intermediates["code"] == e.golden, e.golden_intermediates
    assert named >= 3


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack", "onednn"])
def test_decomposition_rounds_to_the_code(rng, engine):
    """refquant.explain.before_rounding, the value each requantization rounds last, rounds and clamps to the code
    the layer computes, for every element (the engines' float paths and the integer variants, every oneDNN kernel;
    ties included: power-of-two scales)."""
    from refquant import fixed_point as fp
    from refquant.explain import before_rounding

    kernels = ["brgemm", "brgemm_amx", "gemm"] if engine == "onednn" else ["brgemm"]
    for trial in range(6):
        ql0 = _layer(rng, int(rng.integers(2, 24)), int(rng.integers(1, 12)),
                     qscheme="per_channel_symmetric" if trial % 2 else "per_tensor_symmetric")
        sy = 2.0 ** int(rng.integers(-8, -3)) if trial % 3 == 0 else ql0.output_scale
        for requantization in (None, *fp.VARIANTS):
            c = slice(None) if ql0.per_channel else slice(0, 1)
            ql = QuantizedLinear(ql0.weight_int8, ql0.weight_scales_f64[c], ql0.weight_zero_points[c], ql0.bias,
                                 ql0.input_scale, ql0.input_zero_point, sy, ql0.output_zero_point, relu=ql0.relu,
                                 weight_qscheme=ql0.weight_qscheme, engine=engine, requantization=requantization,
                                 onednn_kernel=kernels[trial % len(kernels)])
            x = rng.integers(0, 256, (8, ql.in_features), dtype=np.uint8)
            raw, y = ql.accumulate(x), ql(x)
            for (m, n), code in np.ndenumerate(y):
                d = before_rounding(ql, int(raw[m, n]), n)
                assert d["code"] == code, (engine, ql.requantization, d)
                COUNTS["decomposed codes"] += 1


def test_input_zero_point_sign(rng):
    """A port that folds the input zero point with the wrong sign: Σ (x + z_x)·w."""
    named = 0
    for _ in range(24):  # until 6 layers gave differing codes
        if named >= 6:
            break
        p = layer_golden(rng, M=16)
        c = p.steps[0].constants
        raw = port_raw(p.tensors[0], c["weight_int8"], -int(c["input_zero_point"]))
        rep = assert_explains(p, port_torch_float(raw, c), "input_zero_point_negated")
        named += rep.differing > 0
    assert named >= 6


# ----------------------------------------------------------------------------------------------------------------
# two known differences, models of several layers
# ----------------------------------------------------------------------------------------------------------------

def test_tflite_with_int16_saturation(rng):
    named = 0
    for _ in range(45):  # until 3 layers gave differing codes
        if named >= 3:
            break
        p = layer_golden(rng, high=True, M=128)
        c = p.steps[0].constants
        raw = port_raw(p.tensors[0], c["weight_int8"], int(c["input_zero_point"]), saturate_pairs=True)
        rep = assert_explains(p, port_tflite(raw, c), "tflite+int16_saturation")
        named += rep.differing > 0 and rep.best_variant and "+" in rep.best_variant
    assert named >= 3


def test_half_away_with_int32_bias(rng):
    named = 0
    for _ in range(18):  # until 3 layers gave differing codes
        if named >= 3:
            break
        p = model_golden(rng)
        theirs = port_model(p, quantize="fma_half_away", linear=port_int32_bias)
        rep = assert_explains(p, theirs, "float_int32_bias+half_away")
        named += rep.differing > 0
    assert named >= 3


@pytest.mark.parametrize("depth", [2, 3])
def test_multi_layer_models(rng, depth):
    """Every layer of the port is TFLite's; the variant applies to every layer and its changes propagate."""
    propagated = 0
    for _ in range(5):
        p = model_golden(rng, depth=depth, ties=False)
        rep = assert_explains(p, port_model(p, linear=port_tflite), "tflite")
        propagated += sum("earlier step" in e.cause for e in rep.elements)
    COUNTS["codes moved by an earlier layer"] += propagated


# ----------------------------------------------------------------------------------------------------------------
# noise, and what the report says
# ----------------------------------------------------------------------------------------------------------------

def test_noise_is_never_explained(rng):
    """±1 on random codes of the golden: nothing is explained, no element carries a cause; and noise on top of a
    TFLite port leaves exactly the noisy codes that tflite does not move unexplained."""
    for trial in range(12):
        p = layer_golden(rng, M=40) if trial % 2 else model_golden(rng)
        golden = p.tensors[pg.program_from_fields(p.fields()).output if p.tensors[p.output].dtype == np.uint8
                           else p.steps[-1].input]
        theirs = golden.astype(np.int64)
        hit = rng.random(theirs.shape) < 0.02
        hit.reshape(-1)[0] = True
        sign = np.where(theirs == 0, 1, np.where(theirs == 255, -1, rng.choice([-1, 1], theirs.shape)))
        theirs = theirs + np.where(hit, sign, 0)  # every hit changes its code
        rep = explain(p, theirs)
        assert rep.explained == 0 and rep.best_variant is None, rep.render()
        assert all(not e.explained and e.cause is None for e in rep.elements)
        assert "UNEXPLAINED" in rep.render()
        COUNTS["noise codes left unexplained"] += rep.differing
    for _ in range(8):
        p = layer_golden(rng, M=48)
        c = p.steps[0].constants
        port = port_tflite(port_raw(p.tensors[0], c["weight_int8"], int(c["input_zero_point"])), c)
        tfl = pg.run_program(p, requantization="tflite").tensors[1]
        moved = tfl != p.tensors[1]
        free = np.flatnonzero(~moved.reshape(-1))
        noisy = rng.choice(free, size=3, replace=False)
        theirs = port.astype(np.int64).reshape(-1)
        theirs[noisy] = np.where(theirs[noisy] < 255, theirs[noisy] + 1, 254)
        theirs = theirs.reshape(port.shape)
        rep = explain(p, theirs)
        unexplained = {e.index for e in rep.elements if not e.explained}
        noisy_idx = {tuple(int(i) for i in np.unravel_index(k, port.shape)) for k in noisy}
        assert unexplained == noisy_idx or (moved.sum() < MIN_SUPPORT and unexplained >= noisy_idx), rep.render()
        assert rep.best_variant is None


def test_intermediates_and_json_keys(rng):
    p = layer_golden(rng, M=64)
    c = p.steps[0].constants
    theirs = port_tflite(port_raw(p.tensors[0], c["weight_int8"], int(c["input_zero_point"])), c)
    rep = refquant.explain(p, theirs)
    doc = json.loads(json.dumps(rep.to_json()))
    assert {"differing", "explained", "best_variant", "variants", "elements"} <= set(doc)
    assert all({"name", "differing"} <= set(v) for v in doc["variants"])
    assert len(doc["elements"]) == doc["differing"] == int((theirs != p.tensors[1]).sum())
    for e in rep.elements:
        g = e.golden_intermediates
        assert g["verified"] and g["code"] == e.golden and e.variant_intermediates["code"] == e.theirs
        assert g["acc_i32"] == int(p.steps[0].acc_i32[e.index]) and g["raw_i32"] == int(p.steps[0].raw_i32[e.index])
        # the fbgemm value before rounding is the float32 y of eq. L9, exactly, and rounds to the golden's code
        assert Fraction(g["value_exact"]) == Fraction(g["value"]) and abs(g["distance_to_boundary"]) <= 0.5


def test_bad_arguments():
    p = layer_golden(np.random.default_rng(0), M=4)
    y = p.tensors[1]
    for bad, word in [(y[:, :-1], "shape"), (y.astype(np.int64) + 300, "lie in"), (y.astype(F32), "integers")]:
        with pytest.raises(ValueError, match=word):
            explain(p, bad)
    with pytest.raises(TypeError, match="golden_or_program"):
        explain(42, y)


# ----------------------------------------------------------------------------------------------------------------
# torch's own goldens
# ----------------------------------------------------------------------------------------------------------------

def torch_golden(rng, tmp_path):
    """A torch eager model (QuantStub, Linear, ReLU, Linear, DeQuantStub) converted by torch on fbgemm, read by
    crosscheck.from_torch and exported by refquant.export.export_model; its output codes checked to be torch's."""
    import torch
    from torch import nn

    from crosscheck.from_torch import from_torch

    class Net(nn.Module):
        def __init__(self, k, h, n):
            super().__init__()
            self.quant, self.fc1, self.relu = torch.ao.quantization.QuantStub(), nn.Linear(k, h), nn.ReLU()
            self.fc2, self.dequant = nn.Linear(h, n), torch.ao.quantization.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))

    torch.manual_seed(int(rng.integers(2**31)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm"
        net = Net(int(rng.integers(8, 40)), int(rng.integers(4, 24)), int(rng.integers(2, 12))).eval()
        net.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
        prepared = torch.ao.quantization.prepare(net)
        for _ in range(3):
            prepared(torch.randn(32, net.fc1.in_features) * 1.5)
        converted = torch.ao.quantization.convert(prepared)
        x = (torch.randn(64, net.fc1.in_features) * 1.5)
        with torch.no_grad():
            q = converted.quant(x)
            h = converted.relu(converted.fc1(q))
            out_codes = converted.fc2(h).int_repr().numpy()
        model = from_torch(converted, "fbgemm")
    export_model(model, x.numpy(), tmp_path / "torch_net", header=False)
    p = pg.load_program(tmp_path / "torch_net.npz")
    assert np.array_equal(p.tensors[p.steps[-1].input], out_codes), "the golden is not torch's"
    COUNTS["torch golden codes"] += out_codes.size
    return p, out_codes


def test_torch_golden(rng, tmp_path):
    """On torch's golden, a TFLite port of both Linears is explained, and torch's own codes are equal."""
    p, out_codes = torch_golden(rng, tmp_path)
    assert_explains(p, port_model(p, linear=port_tflite), "tflite")
    assert explain(p, out_codes).differing == 0


def test_cli_on_torch_golden(rng, tmp_path, capsys):
    """The command line on torch's golden: a TFLite port explained (exit 0, JSON); one code changed more stays
    unexplained, alone, with its intermediates and no cause (exit 1)."""
    p, _ = torch_golden(rng, tmp_path)
    theirs = port_model(p, linear=port_tflite)
    np.save(tmp_path / "port.npy", theirs.astype(np.int16))
    rc = cli.main([str(tmp_path / "torch_net.json"), str(tmp_path / "port.npy"), "--json", str(tmp_path / "r.json")])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and doc["explained"] == doc["differing"]
    assert doc["differing"] == 0 or "tflite" in doc["reproducing"]
    golden = p.tensors[p.steps[-1].input]
    same = np.flatnonzero((theirs == golden).reshape(-1))
    noisy = theirs.astype(np.int64).reshape(-1)
    k = same[len(same) // 2]
    noisy[k] = noisy[k] + 1 if noisy[k] < 255 else 254
    np.savetxt(tmp_path / "noisy.txt", noisy.reshape(theirs.shape), fmt="%d")
    rc = cli.main([str(tmp_path / "torch_net.npz"), str(tmp_path / "noisy.txt"), "--json", str(tmp_path / "n.json")])
    doc = json.loads((tmp_path / "n.json").read_text())
    unexplained = {tuple(e["index"]): e for e in doc["elements"] if not e["explained"]}
    noisy_index = tuple(int(i) for i in np.unravel_index(k, theirs.shape))
    assert rc == 1 and noisy_index in unexplained
    assert all(e["cause"] is None and "value_exact" in e["golden_intermediates"] for e in unexplained.values())
    tflite = next(v for v in doc["variants"] if v["name"] == "tflite")
    if tflite["changes"] >= MIN_SUPPORT:  # else tflite's few codes are too little evidence once it is not complete
        assert list(unexplained) == [noisy_index] and doc["explained"] == doc["differing"] - 1
    assert "UNEXPLAINED" in capsys.readouterr().out


def test_their_accumulators(rng):
    """Their int32 accumulators must be reproduced too: the int16-saturating port's accumulators make
    int16_saturation consistent; exact accumulators given with the same codes make it inconsistent."""
    checked = 0
    for _ in range(30):  # until 5 layers gave differing codes
        if checked >= 5:
            break
        p = layer_golden(rng, high=True)
        c = p.steps[0].constants
        x, w = p.tensors[0], c["weight_int8"]
        acc_sat = port_raw(x, w, 0, saturate_pairs=True)
        raw = acc_sat - int(c["input_zero_point"]) * w.astype(np.int64).sum(axis=1)
        theirs = port_torch_float(raw, c)
        if (theirs == p.tensors[1]).all():
            continue
        rep = explain(p, theirs, their_accumulators=acc_sat)
        assert rep.best_variant == "int16_saturation" and rep.explained == rep.differing
        assert rep.accumulators_differing == int((acc_sat != p.steps[0].acc_i32).sum()) > 0
        assert all("their_acc_i32" in e.golden_intermediates for e in rep.elements)
        wrong = explain(p, theirs, their_accumulators=p.steps[0].acc_i32)
        assert wrong.best_variant is None and wrong.explained == 0
        checked += 1
    assert checked >= 5


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------

def test_cli_exit_codes_and_bad_inputs(tmp_path, rng, capsys):
    ql = _layer(rng, 24, 12)
    x = rng.integers(0, 256, (64, 24), dtype=np.uint8)
    export_linear(ql, x, tmp_path / "fc")  # the linear format (refquant-golden-linear/2)
    p = pg.load_program(tmp_path / "fc.json")
    c = p.steps[0].constants
    port = port_tflite(port_raw(x, c["weight_int8"], int(c["input_zero_point"])), c)
    np.savetxt(tmp_path / "port.txt", port, fmt="%d", delimiter=", ")
    np.save(tmp_path / "port.npy", port.astype(np.int32))
    noisy = port.copy()
    noisy[0, 0] = noisy[0, 0] + 1 if noisy[0, 0] < 255 else 254
    np.savetxt(tmp_path / "noisy.txt", noisy, fmt="%d")
    np.savetxt(tmp_path / "golden.txt", p.tensors[1], fmt="%d")

    def run(*args):
        rc = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = run(tmp_path / "fc.json", tmp_path / "golden.txt")
    assert rc == 0 and "equal" in out
    rc, out, _ = run(tmp_path / "fc.npz", tmp_path / "port.npy", "--json", tmp_path / "r.json")
    expect = 0 if (port == p.tensors[1]).all() or explain(p, port).best_variant else 1
    assert rc == expect, out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["exit_code"] == rc and doc["differing"] == int((port != p.tensors[1]).sum())
    rc, out, _ = run(tmp_path / "fc.json", tmp_path / "noisy.txt")
    assert rc == 1 and "UNEXPLAINED" in out

    np.savetxt(tmp_path / "short.txt", port[:, :-1], fmt="%d")
    np.savetxt(tmp_path / "range.txt", port.astype(np.int64) + 256, fmt="%d")
    np.save(tmp_path / "float.npy", port.astype(F32))
    (tmp_path / "words.txt").write_text("1 2 x\n")
    (tmp_path / "ragged.txt").write_text("1 2 3\n4 5\n")
    (tmp_path / "other.json").write_text('{"format": "something/1"}')
    (tmp_path / "broken.json").write_text("{")
    cases = [((tmp_path / "fc.json", tmp_path / "short.txt"), "short.txt", "shape"),
             ((tmp_path / "fc.json", tmp_path / "range.txt"), "range.txt", "lie in"),
             ((tmp_path / "fc.json", tmp_path / "float.npy"), "float.npy", "dtype float32"),
             ((tmp_path / "fc.json", tmp_path / "words.txt"), "words.txt", "integers"),
             ((tmp_path / "fc.json", tmp_path / "ragged.txt"), "ragged.txt", "rows"),
             ((tmp_path / "fc.json", tmp_path / "missing.txt"), "missing.txt", "no such file"),
             ((tmp_path / "other.json", tmp_path / "port.txt"), "other.json", "not a golden file"),
             ((tmp_path / "broken.json", tmp_path / "port.txt"), "broken.json", "not a golden file"),
             ((tmp_path / "port.txt", tmp_path / "port.txt"), "port.txt", "not a golden file"),
             ((tmp_path / "fc.json", tmp_path / "port.txt", "--their-input-codes", tmp_path / "port.txt"),
              "port.txt", "QuantStub"),
             ((tmp_path / "fc.json", tmp_path / "port.txt", "--their-accumulators", tmp_path / "short.txt"),
              "short.txt", "shape")]
    for args, name, word in cases:
        rc, out, err = run(*args)
        assert rc == 2 and out == "", (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and word in lines[0], (args, err)
    COUNTS["bad inputs refused"] += len(cases)


def test_cli_help_and_module():
    done = subprocess.run([sys.executable, "-m", "crosscheck.explain", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0
    for word in ("GOLDEN", "THEIRS", "--their-input-codes", "--their-accumulators", "--json", "exit codes"):
        assert word in done.stdout


def test_report_counts():
    """The figures of this module's run (printed with -s)."""
    print("\ntest_explain:", dict(COUNTS))
    assert COUNTS["best is the intended"] > 0
