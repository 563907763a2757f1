"""The C99 reference (c/refquant_requant.c) equals refquant bit for bit: the integer variants of
refquant.fixed_point, torch's float path of refquant.linear (eqs. L6-L11), QuantStub (Q0, Q1) and DeQuantStub (D1).

The test compiles c/refquant_requant.c with the driver c/refquant_requant_driver.c using the system C compiler
(``$CC``, else cc/gcc/clang) as ``-std=c99 -O2 -Wall -Wextra -Werror -ffp-contract=off``, sends it edge and random
vectors (floats as bit patterns) and compares every answer with the Python functions: 0 may differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from parity import assert_same
from refquant import fixed_point as fp
from refquant._float32 import cvtps2dq
from refquant.linear import QuantizedLinear
from refquant.quantize import dequantize, quantize_per_tensor

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "c"
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler found ($CC, cc, gcc, clang): the C99 reference cannot be built here")
    exe = tmp_path_factory.mktemp("c_reference") / "refquant_requant_driver"
    cmd = [cc, *CFLAGS, str(C_DIR / "refquant_requant.c"), str(C_DIR / "refquant_requant_driver.c"), "-lm",
           "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(cmd)} failed:\n{build.stdout}{build.stderr}"
    return exe


def _run(driver: Path, op: str, *columns) -> list[str]:
    """One request per row: ``op col0[i] col1[i] ...``; returns the answer lines."""
    rows = zip(*columns)
    text = "".join(f"{op} {' '.join(r)}\n" for r in rows)
    out = subprocess.run([str(driver)], input=text, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == text.count("\n") and "error" not in out[:1], f"driver answered {out[:3]} to {op}"
    return out


def _i(a) -> list[str]:
    return [str(int(v)) for v in np.asarray(a).ravel()]


def _f32(a) -> list[str]:
    return [f"0x{int(v):08x}" for v in np.asarray(a, np.float32).ravel().view(np.uint32)]


def _f64(a) -> list[str]:
    return [f"0x{int(v):016x}" for v in np.asarray(a, np.float64).ravel().view(np.uint64)]


def _ints(lines: list[str], dtype=np.int64) -> np.ndarray:
    return np.array([int(x) for x in lines], np.int64).astype(dtype)


def _floats(lines: list[str]) -> np.ndarray:
    return np.array([int(x, 16) for x in lines], np.uint32).view(np.float32)


def _int32_mix(rng, n: int) -> np.ndarray:
    """int32 values of every size, with the extremes and small values (where ties live)."""
    full = rng.integers(I32_MIN, I32_MAX, n, endpoint=True)
    shift = rng.integers(0, 32, n)
    v = full >> shift
    edges = [I32_MIN, I32_MAX, I32_MIN + 1, I32_MAX - 1, 0, 1, -1, 2**30]
    v[: min(n, 8)] = edges[: min(n, 8)]
    return v.astype(np.int32)


def _float32_mix(rng, n: int) -> np.ndarray:
    """float32 of all exponents and signs, plus NaN, ±inf, ±0, exact halves and the edges of the int32 range."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    v = bits.view(np.float32).copy()
    halves = (rng.integers(-2000, 2000, n // 4) + 0.5).astype(np.float32)
    v[: n // 4] = halves
    v[n // 4: n // 2] = (rng.standard_normal(n // 4) * 10.0 ** rng.uniform(-3, 6, n // 4)).astype(np.float32)
    v[:12] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 2.0**31, -(2.0**31), 2147483520.0, -2147483520.0, 0.5, -0.5, 2.5]
    return v


# ----------------------------------------------------------------------------------------------------------------
# the fixed-point primitives
# ----------------------------------------------------------------------------------------------------------------

def test_c_primitives(driver, rng):
    n = 20_000
    a, b, x = _int32_mix(rng, n), _int32_mix(rng, n), _int32_mix(rng, n)
    m = np.abs(_int32_mix(rng, n).astype(np.int64)).clip(0, I32_MAX).astype(np.int32)
    a[8:12], b[8:12] = [I32_MIN, I32_MIN, 2**15, -(2**15)], [I32_MIN, I32_MAX, 2**15, 2**15]
    e = rng.integers(0, 32, n)
    e[:2] = [0, 31]
    s = rng.integers(1, 64, n)
    shift = rng.integers(-31, 31, n)
    assert_same(_ints(_run(driver, "srdhm", _i(a), _i(b)), np.int32),
                fp.saturating_rounding_doubling_high_mul(a, b), "C srdhm")
    assert_same(_ints(_run(driver, "rdbpot", _i(x), _i(e)), np.int32), fp.rounding_divide_by_pot(x, e), "C rdbpot")
    assert_same(_ints(_run(driver, "srmws", _i(a), _i(m), _i(s))),
                fp.saturating_rounding_mul_with_shift(a, m, s), "C srmws")
    assert_same(_ints(_run(driver, "mbqm", _i(x), _i(m), _i(shift)), np.int32),
                fp.multiply_by_quantized_multiplier(x, m, shift), "C mbqm")
    assert_same(_ints(_run(driver, "mbqm1", _i(x), _i(m), _i(shift)), np.int32),
                fp.multiply_by_quantized_multiplier_single_rounding(x, m, shift), "C mbqm single rounding")


# ----------------------------------------------------------------------------------------------------------------
# multipliers and bias rules
# ----------------------------------------------------------------------------------------------------------------

def _python_pairs(fn, values, **kw) -> list[str]:
    out = []
    for v in values:
        try:
            m, s = fn(v, **kw)
            out.append(f"0 {m} {s}")
        except ValueError:
            out.append("1 0 0")
    return out


def test_c_multipliers(driver, rng):
    n = 4000
    # float32 multipliers of every exponent (refused ones included), and the edge values of the golden tests
    real_f32 = np.abs(_float32_mix(rng, n))
    real_f32[12:24] = [0.5, 1.0, 2.0, np.nextafter(np.float32(0.5), np.float32(0)),
                       np.nextafter(np.float32(1), np.float32(0)), 2.0**-32, 2.0**-33, 2.0**-34, 2.0**29, 2.0**30,
                       1.5 * 2.0**29, 1e-40]
    real_f32[-n // 2:] = (10.0 ** rng.uniform(-10, 9, n // 2)).astype(np.float32)
    got = _run(driver, "crm", _f32(real_f32))
    assert got == _python_pairs(fp.choose_requantization_multiplier, [float(v) for v in real_f32]), "C crm"
    # doubles: products of float32 scales as TFLite forms them, and the edges (ties of q·2^31, flush, > 2^30)
    real_f64 = (np.float32(rng.uniform(1e-3, 1, n)).astype(np.float64) * np.float32(rng.uniform(1e-4, 1, n))
                / np.float32(10.0 ** rng.uniform(-4, 1, n)))
    real_f64[:12] = [0.5, 1.0, 1 - 2.0**-53, 0.5 + 2.0**-32, 0.5 + 2.0**-33, 2.0**-32, 2.0**-33, 0.0, 2.0**30,
                     2.0**40, np.inf, np.nan]
    real_f64[12:1000] = 2.0 ** rng.uniform(-40, 40, 988)
    for single in (0, 1):
        got = _run(driver, "qm", _f64(real_f64), [str(single)] * n)
        expected = _python_pairs(fp.quantize_multiplier, [float(v) for v in real_f64], single_rounding=bool(single))
        assert got == expected, f"C qm single_rounding={single}"


def test_c_bias_rules(driver, rng):
    n = 20_000
    s_x = (10.0 ** rng.uniform(-4, 0, n)).astype(np.float32)
    s_w = (10.0 ** rng.uniform(-5, 0, n)).astype(np.float32)
    atws = (s_x * s_w).astype(np.float32)
    bias = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 3, n)).astype(np.float32)
    # exact ties: bias = (k + 0.5)·atws with atws a power of two
    k = n // 10
    s_x[:k], s_w[:k] = np.float32(0.5), (2.0 ** rng.integers(-20, 0, k)).astype(np.float32)
    atws[:k] = s_x[:k] * s_w[:k]
    bias[:k] = ((rng.integers(-1000, 1000, k) + 0.5) * atws[:k]).astype(np.float32)
    bias[k:k + 4] = [1e30, -1e30, 3e38, -3e38]            # saturation
    atws[k + 4], s_x[k + 4], s_w[k + 4], bias[k + 4] = 1e-45, 1e-45, 1.0, 0.0   # 1/atws = inf, 0·inf = NaN
    assert_same(_ints(_run(driver, "bias_fbgemm", _f32(bias), _f32(atws)), np.int32),
                fp.quantize_bias_fbgemm(bias, atws), "C bias fbgemm")
    for op, fn in (("bias_tflite", fp.quantize_bias_tflite), ("bias_mlir", fp.quantize_bias_tflite_mlir)):
        expected = np.array([fn(bias[i:i + 1], float(s_x[i]), s_w[i:i + 1])[0] for i in range(n)], np.int32)
        assert_same(_ints(_run(driver, op, _f32(bias), _f32(s_x), _f32(s_w)), np.int32), expected, f"C {op}")


# ----------------------------------------------------------------------------------------------------------------
# one output code, every variant
# ----------------------------------------------------------------------------------------------------------------

def _random_constants(rng, variant: str) -> fp.IntegerRequantization:
    while True:
        n = int(rng.integers(1, 24))
        s_w = (rng.uniform(0.5, 2.0, n) * 10.0 ** rng.uniform(-4, -1, n)).astype(np.float32)
        bias = (rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 4)).astype(np.float32)
        signed = bool(rng.integers(0, 2))
        qmin, qmax = (-128, 127) if signed else (0, 255)
        try:
            return fp.integer_requantization(variant, float(rng.uniform(0.002, 0.1)), s_w,
                                             float(10.0 ** rng.uniform(-5, 0)), bias, int(rng.integers(qmin, qmax)),
                                             relu=bool(rng.integers(0, 2)), quant_min=qmin, quant_max=qmax)
        except ValueError:
            continue


@pytest.mark.parametrize("variant", fp.VARIANTS)
def test_c_requantize_variants(driver, rng, variant):
    cols = {k: [] for k in ("raw", "bias", "mult", "shift", "zp", "qmin", "qmax")}
    expected = []
    for trial in range(40):
        rq = _random_constants(rng, variant)
        if trial % 4 == 3 and variant != "float_int32_bias":   # every multiplier/shift the source can produce
            n = rq.bias_i32.shape[0]
            lo, hi = (1, 64) if variant == "fbgemm_fixed_point" else (-31, 31)
            rq = rq.replace(requant_multiplier_i32=rng.integers(0, I32_MAX, n, endpoint=True).astype(np.int32),
                            requant_shift=rng.integers(lo, hi, n).astype(np.int32),
                            output_multiplier_f32=np.ones(n, np.float32),
                            bias_i32=_int32_mix(rng, n))
        n = rq.bias_i32.shape[0]
        raw = _int32_mix(rng, 250 * n).reshape(250, n)
        expected.append(fp.requantize_integer_readable(raw, rq).astype(np.int64).ravel())
        c = np.arange(n) if rq.per_channel else np.zeros(n, int)
        tile = lambda v: np.broadcast_to(v, raw.shape).ravel()   # noqa: E731
        cols["raw"] += _i(raw)
        cols["bias"] += _i(tile(rq.bias_i32))
        if variant == "float_int32_bias":
            cols["mult"] += _f32(tile(rq.output_multiplier_f32[c]))
        else:
            cols["mult"] += _i(tile(rq.requant_multiplier_i32[c]))
            cols["shift"] += _i(tile(rq.requant_shift[c]))
        for key, v in (("zp", rq.output_zero_point), ("qmin", rq.quant_min), ("qmax", rq.quant_max)):
            cols[key] += [str(v)] * raw.size
    names = ["raw", "bias", "mult"] + ([] if variant == "float_int32_bias" else ["shift"]) + ["zp", "qmin", "qmax"]
    got = _ints(_run(driver, f"rq_{variant}", *(cols[k] for k in names)))
    assert_same(got, np.concatenate(expected), f"C rq_{variant}")


# ----------------------------------------------------------------------------------------------------------------
# torch's float path (refquant.linear), QuantStub and DeQuantStub
# ----------------------------------------------------------------------------------------------------------------

def _random_float_layer(rng, qscheme: str, with_bias: bool) -> QuantizedLinear:
    n, k = int(rng.integers(1, 24)), int(rng.integers(1, 16))
    per_channel = qscheme.startswith("per_channel")
    c = n if per_channel else 1
    bias = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32) if with_bias else None
    if rng.integers(0, 3) == 0:   # powers of two: exact multipliers, so f32(raw)·mult lands on .5 ties ...
        s_w = (2.0 ** rng.integers(-12, -2, c)).astype(np.float32)
        s_x, s_y = float(2.0 ** rng.integers(-8, 0)), float(2.0 ** rng.integers(-10, 2))
        if with_bias:   # ... also after adding a bias of a whole or half number of atws
            atws = np.broadcast_to(np.float32(s_x) * s_w, (n,))
            bias = (rng.integers(-50, 50, n) / 2 * atws).astype(np.float32)
    else:
        s_w = (rng.uniform(0.5, 2.0, c) * 10.0 ** rng.uniform(-4, -1, c)).astype(np.float32)
        s_x, s_y = float(rng.uniform(0.002, 0.1)), float(10.0 ** rng.uniform(-7, 0))   # 1e-7: cvtps2dq overflow
    w_i8 = rng.integers(-128, 128, (n, k)).astype(np.int8)
    return QuantizedLinear(w_i8, s_w, np.zeros(c, np.int32), bias, s_x, int(rng.integers(0, 256)), s_y,
                           int(rng.integers(0, 256)), relu=bool(rng.integers(0, 2)), weight_qscheme=qscheme)


@pytest.mark.parametrize("qscheme", ["per_channel_symmetric", "per_tensor_symmetric"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_c_float_path_equals_refquant_linear(driver, rng, qscheme, with_bias):
    cols = {k: [] for k in ("raw", "bias", "atws", "mult", "zp", "qmin", "qmax")}
    expected, atws_c, atws_py = [], [], []
    for _ in range(40):
        ql = _random_float_layer(rng, qscheme, with_bias)
        n = ql.out_features
        raw = _int32_mix(rng, 250 * n).reshape(250, n)
        expected.append(ql.requantize(raw, readable=True).astype(np.int64).ravel())
        assert_same(ql.requantize(raw, readable=False), ql.requantize(raw, readable=True), "refquant kernel")
        c = np.arange(n) if ql.per_channel else np.zeros(n, int)
        tile = lambda v: np.broadcast_to(v, raw.shape).ravel()   # noqa: E731
        cols["raw"] += _i(raw)
        if with_bias:
            cols["bias"] += _f32(tile(ql.bias))
            cols["atws"] += _f32(tile(ql.act_times_w_scale[c]))
        cols["mult"] += _f32(tile(ql.output_multiplier[c]))
        for key, v in (("zp", ql.output_zero_point), ("qmin", ql.output_zero_point if ql.relu else 0),
                       ("qmax", 255)):
            cols[key] += [str(v)] * raw.size
        # eqs. L6, L7 in C from the float32 scales
        s_x = np.full(ql.weight_scales.shape, np.float32(ql.input_scale))
        atws = _floats(_run(driver, "atws", _f32(s_x), _f32(ql.weight_scales)))
        mult = _floats(_run(driver, "omult", _f32(atws), _f32(np.full(atws.shape, np.float32(ql.output_scale)))))
        atws_c += [atws, mult]
        atws_py += [ql.act_times_w_scale, ql.output_multiplier]
    assert_same(np.concatenate(atws_c), np.concatenate(atws_py), "C eqs. L6, L7")
    if not with_bias:
        got = _run(driver, "lin_nb", *(cols[k] for k in ("raw", "mult", "zp", "qmin", "qmax")))
    else:
        op = "lin_pc" if qscheme.startswith("per_channel") else "lin_pt"
        got = _run(driver, op, *(cols[k] for k in ("raw", "bias", "atws", "mult", "zp", "qmin", "qmax")))
    assert_same(_ints(got), np.concatenate(expected), f"C float path {qscheme}, bias={with_bias}")


def test_c_cvtps2dq(driver, rng):
    y = _float32_mix(rng, 20_000)
    assert_same(_ints(_run(driver, "cvt", _f32(y)), np.int32), cvtps2dq(y), "C cvtps2dq")


def test_c_quantstub_and_dequantstub(driver, rng):
    for _ in range(20):
        scale = float(10.0 ** rng.uniform(-4, 1))
        zp = int(rng.integers(0, 256))
        x = _float32_mix(rng, 2000)
        x[12:1000] = (rng.integers(-400, 400, 988) * np.float32(scale) / 2).astype(np.float32)  # near ties
        got = _ints(_run(driver, "quant", _f32(x), _f32([scale] * x.size), [str(zp)] * x.size, ["0"] * x.size,
                         ["255"] * x.size), np.uint8)
        assert_same(got, quantize_per_tensor(x, scale, zp, "quint8"), "C QuantStub (eq. Q1)")
        q = np.arange(256, dtype=np.uint8)
        back = _floats(_run(driver, "dequant", _i(q), [str(zp)] * 256, _f32([scale] * 256)))
        assert_same(back, dequantize(q, scale, zp), "C DeQuantStub (eq. D1)")


def _fma_sensitive_case(rng) -> tuple[np.float32, np.float32]:
    """(atws, bias) with bias·f32(1/atws) just below −0.5: the product rounds to −0.5 in float32, yet the fused
    bias·rcp + raw of eq. L8c keeps the tiny excess."""
    while True:
        atws = np.float32(rng.uniform(1e-4, 1e-2))
        rcp = np.float32(1.0 / np.float64(atws))
        bias = np.float32(-0.5 / np.float64(rcp))
        for _ in range(8):
            p = np.float64(bias) * np.float64(rcp)
            if -0.5 - 2.0**-25 < p < -0.5:
                return atws, bias
            bias = np.nextafter(bias, np.float32(-np.inf) if p > -0.5 else np.float32(np.inf))


def test_c_float_path_per_tensor_fma(driver, rng):
    """eq. L8c's single rounding decides the code: raw = 8486912 = 129.5·2^16, mult = 2^−16. Fused:
    t = 8486911.5 − ε -> 8486911, y = 129.49998 -> 129. Unfused, f32(f32(bias·rcp) + raw) = RNE(8486911.5) =
    8486912, y = 129.5 -> 130. A C compiler that dropped the fmaf (or contracted the other lines) fails here."""
    cols = {k: [] for k in ("raw", "bias", "atws", "mult", "zp", "qmin", "qmax")}
    expected = []
    for _ in range(20):
        atws, bias = _fma_sensitive_case(rng)
        ql = QuantizedLinear(np.ones((1, 1), np.int8), np.array([atws]), np.zeros(1, np.int32),
                             np.array([bias], np.float32), 1.0, 0, float(atws * np.float32(65536)), 0,
                             weight_qscheme="per_tensor_symmetric")
        raw = np.array([[8486912]], np.int32)
        code = ql.requantize(raw, readable=True)
        unfused = np.rint(np.float32(np.float32(bias * np.float32(1.0 / np.float64(atws))) + np.float32(8486912))
                          * ql.output_multiplier[0])
        assert (int(code[0, 0]), int(unfused)) == (129, 130)   # the case really depends on the fused rounding
        expected.append(code.ravel().astype(np.int64))
        for key, v in (("raw", _i(raw)), ("bias", _f32([bias])), ("atws", _f32(ql.act_times_w_scale)),
                       ("mult", _f32(ql.output_multiplier)), ("zp", ["0"]), ("qmin", ["0"]), ("qmax", ["255"])):
            cols[key] += v
    got = _run(driver, "lin_pt", *(cols[k] for k in ("raw", "bias", "atws", "mult", "zp", "qmin", "qmax")))
    assert_same(_ints(got), np.concatenate(expected), "C float path, per-tensor FMA")


# ----------------------------------------------------------------------------------------------------------------
# qnnpack's and onednn's float paths, the other QuantStub roundings (what c/refquant_program.c runs)
# ----------------------------------------------------------------------------------------------------------------

def test_c_qnnpack_requantize(driver, rng):
    from refquant.engines import qnnpack_requantize_readable

    got, expected = [], []
    for _ in range(20):
        n = 500
        raw, bias = _int32_mix(rng, n), _int32_mix(rng, n) >> rng.integers(0, 31, n)
        scale = (10.0 ** rng.uniform(-9, 1, n)).astype(np.float32)
        scale[:3] = [2.0**-20, 1.0, 0.5]
        zp, relu = int(rng.integers(0, 256)), bool(rng.integers(0, 2))
        lo = zp if relu else 0
        expected.append(qnnpack_requantize_readable(raw[None, :], bias.astype(np.int32), scale, zp, lo, 255)
                        .astype(np.int64).ravel())
        got.append(_ints(_run(driver, "rq_qnnpack", _i(raw), _i(bias), _f32(scale), [str(zp)] * n, [str(lo)] * n,
                              ["255"] * n)))
    assert_same(np.concatenate(got), np.concatenate(expected), "C qnnpack requantization")


@pytest.mark.parametrize("kernel", ["brgemm", "brgemm_amx", "gemm"])
def test_c_onednn_requantize(driver, rng, kernel):
    from refquant.engines import onednn_requantize_readable

    code = {"brgemm": 0, "brgemm_amx": 1, "gemm": 2}[kernel]
    got, expected = [], []
    for trial in range(20):
        n = 400
        raw, comp = _int32_mix(rng, n), _int32_mix(rng, n) >> rng.integers(0, 31, n)
        s_x = np.float32(10.0 ** rng.uniform(-4, 0))
        s_w = (10.0 ** rng.uniform(-5, 0, n)).astype(np.float32)
        out_scales = (s_x * s_w).astype(np.float32)
        has_bias = trial % 3 != 0
        bias = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
        bias[:2] = [np.inf, -np.inf] if trial == 1 else bias[:2]   # inf - inf -> NaN -> 255
        relu, zp = bool(rng.integers(0, 2)), int(rng.integers(0, 256))
        dst = np.float32(10.0 ** rng.uniform(-2, 6))
        expected.append(onednn_requantize_readable(raw[None, :], kernel, comp.astype(np.int32), s_x, s_w, out_scales,
                                                   bias if has_bias else None, relu, dst, zp).astype(np.int64).ravel())
        got.append(_ints(_run(driver, "rq_onednn", _i(raw), [str(code)] * n, _i(comp), _f32([s_x] * n), _f32(s_w),
                              _f32(out_scales), [str(int(has_bias))] * n, _f32(bias), [str(int(relu))] * n,
                              _f32([dst] * n), _f32([np.float32(zp)] * n))))
    assert_same(np.concatenate(got), np.concatenate(expected), f"C onednn requantization ({kernel})")


@pytest.mark.parametrize("rounding, op", [("nearbyint_then_add", "quant_nbta"), ("multiply_then_add", "quant_mta")])
def test_c_other_quantstub_roundings(driver, rng, rounding, op):
    for _ in range(10):
        scale = float(10.0 ** rng.uniform(-4, 1))
        zp = int(rng.integers(0, 256))
        x = _float32_mix(rng, 2000)
        x[12:1000] = (rng.integers(-400, 400, 988) * np.float32(scale) / 2).astype(np.float32)  # near ties
        if rounding == "multiply_then_add":
            x = x[~np.isnan(x)]   # refquant refuses NaN for oneDNN's reorder
        got = _ints(_run(driver, op, _f32(x), _f32([scale] * x.size), [str(zp)] * x.size, ["0"] * x.size,
                         ["255"] * x.size), np.uint8)
        assert_same(got, quantize_per_tensor(x, scale, zp, "quint8", rounding=rounding), f"C QuantStub {rounding}")
