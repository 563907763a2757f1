"""The engines' details, one at a time: exact ties and where the output zero point enters, overflow, qnnpack's
int32 bias, the shared int32 accumulation, layers from torch's own quantized weights and modules, output shapes,
and every Numba kernel against its readable NumPy path (and the per-element functions called from a kernel of
another module, as a fused matmul epilogue will call them). Live against torch where torch defines the behaviour.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from numba import njit

import refquant.engines as E
from refquant._dispatch import SmallCalls
from parity import assert_same
from refquant.engines import (
    FBGEMM_BIAS_ADD,
    FBGEMM_BIAS_FMA,
    FBGEMM_BIAS_NONE,
    ONEDNN_KERNELS,
    FbgemmRequantizer,
    OnednnRequantizer,
    QnnpackRequantizer,
    fbgemm_requantize_element,
    onednn_requantize_element,
    qnnpack_accumulate_readable,
    qnnpack_requantize_element,
)
from refquant.linear import QuantizedLinear
from refquant.qconfig import get_default_qconfig
from torch_engines import (
    torch_fbgemm_kernel_family,
    ENGINES,
    onednn_family_from_verbose,
    quantized_engine,
    refquant_layer,
    run_torch,
    torch_qweight,
    torch_threads,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def torch_codes(engine, x_u8, w_i8, w_scale, bias, sx, zx, sy, zy, relu=False):
    """torch from codes with a per-tensor weight of zero point 0; returns the output codes."""
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_i8), float(w_scale), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else torch.from_numpy(bias))
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x_u8), sx, zx)
        op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
        return op(qx, packed, sy, zy).int_repr().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Exact ties, constructed from integer codes: where the output zero point enters
# ----------------------------------------------------------------------------------------------------------------

def tie_codes(sign: int) -> tuple[np.ndarray, np.ndarray, int]:
    """x rows with Σ_k (x − z_x)·1 = sign·(2j + 1) for j = 0..63 (K = 4 weights of code 1, s_x = s_w = 1, s_y = 2:
    y = raw / 2 = sign·(j + 0.5) exactly on every engine: all scales are powers of two, their reciprocals too)."""
    raws = sign * (2 * np.arange(64) + 1)
    zx = 0 if sign > 0 else 255
    x = np.zeros((64, 4), np.int64)
    for r, target in enumerate(raws):
        rest = int(target) if sign > 0 else int(-target)
        for k in range(4):
            step = min(rest, 255)
            x[r, k] = step if sign > 0 else 255 - step
            rest -= step
    x_u8 = x.astype(np.uint8)
    assert ((x_u8.astype(np.int64) - zx).sum(axis=1) == raws).all()
    return x_u8, raws, zx


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("zy", [100, 101, 0, 255])
def test_exact_ties_and_the_output_zero_point(engine, sign, zy):
    """y = ±(j + 0.5) exactly. fbgemm, x86 and qnnpack round first (RNE) and add z_y after:
    code = z_y + RNE(y). onednn adds z_y in float32 first: code = RNE(z_y + y), which differs at every tie when
    z_y is odd. Hand-derived codes, and torch live."""
    x_u8, raws, zx = tie_codes(sign)
    w_i8 = np.ones((1, 4), np.int8)
    y = raws / 2.0  # exact halves
    if engine == "onednn":
        expected = np.rint(zy + y)  # numpy's rint: half to even
    else:
        expected = zy + np.rint(y)
    expected = np.clip(expected, 0, 255).astype(np.uint8)[:, np.newaxis]
    ql = QuantizedLinear.from_quantized(w_i8, 1.0, 0, None, 1.0, zx, 2.0, zy, engine=engine)
    assert_same(ql(x_u8), expected, f"hand-derived tie codes, {engine}, z_y={zy}")
    assert_same(ql(x_u8), torch_codes(engine, x_u8, w_i8, 1.0, None, 1.0, zx, 2.0, zy), f"torch, {engine}")
    if engine == "onednn" and zy % 2 and 0 < zy < 255:
        fbgemm_rule = np.clip(zy + np.rint(y), 0, 255).astype(np.uint8)[:, np.newaxis]
        assert (expected != fbgemm_rule).sum() >= 32, "odd z_y should flip the tie rounding on onednn"


@pytest.mark.parametrize("engine", ENGINES)
def test_overflow_codes(engine):
    """A tiny output scale (s_y = 2^-40, s_x = s_w = 1) makes |y| >= 2^31. fbgemm/x86: cvtps2dq's INT32_MIN + z_y
    clamps to 0 (with ReLU to z_y); qnnpack: INT32_MIN saturates through its int16 packs to 0 (with ReLU the
    clamp's output_min = z_y); onednn saturates in float: 255 for y > 0, 0 for y < 0 (with ReLU: 255 and z_y, as
    max(v, 0) comes before the output scale). raw = 0 gives z_y everywhere."""
    x_u8 = np.array([[200, 200], [0, 0], [100, 100]], np.uint8)
    w_i8 = np.array([[1, 1]], np.int8)
    zy = 77
    for relu in (False, True):
        ql = QuantizedLinear.from_quantized(w_i8, 1.0, 0, None, 1.0, 100, 2.0**-40, zy, relu=relu, engine=engine)
        raw = ql.accumulate(x_u8)
        assert_same(raw, np.array([[200], [-200], [0]], np.int32), "raw")
        if engine == "onednn":
            expected = [255, zy, zy] if relu else [255, 0, zy]
        else:
            expected = [zy, zy, zy] if relu else [0, 0, zy]
        assert_same(ql(x_u8), np.array(expected, np.uint8)[:, np.newaxis], f"{engine} overflow, relu={relu}")
        assert_same(ql(x_u8), torch_codes(engine, x_u8, w_i8, 1.0, None, 1.0, 100, 2.0**-40, zy, relu),
                    f"{engine} overflow vs torch, relu={relu}")


@pytest.mark.parametrize("relu", [False, True])
def test_onednn_nan_codes(capfd, relu):
    """onednn with s_x = s_w = 1e20: for raw != 0, t·s_x'·s_w' = ±inf; for raw = 0 the AMX and gemm kernels
    multiply by their product f32(s_x'·s_w') = inf and get 0·inf = NaN. On brgemm_amx that NaN passes the float
    saturation, becomes INT32_MIN in cvtps2dq and 255 in vpmovusdb; gemm:jit (AVX2) saturates with vmaxps(v, 0),
    which gives 0 for NaN, so code 0; brgemm multiplies 0 by each scale and gets z_y. With ReLU, max(NaN, 0) = 0
    and -inf -> 0 give z_y; +inf gives 255. Torch's own kernel (whichever this CPU runs) is checked at the end."""
    x_u8 = np.array([[3, 3], [1, 1], [5, 5]], np.uint8)  # raw = 0, −4, 4 with z_x = 3
    w_i8 = np.array([[1, 1]], np.int8)
    for kernel in ONEDNN_KERNELS:
        nan_code = {"brgemm": 9, "brgemm_amx": 255, "gemm": 0}[kernel]
        expected = [[9], [9], [255]] if relu else [[nan_code], [0], [255]]
        ql = QuantizedLinear.from_quantized(w_i8, 1e20, 0, None, 1e20, 3, 1.0, 9, relu=relu, engine="onednn",
                                            onednn_kernel=kernel)
        assert_same(ql(x_u8), np.array(expected, np.uint8), f"NaN/inf codes, kernel {kernel}")
        assert_same(ql.requantize(ql.accumulate(x_u8), readable=True), np.array(expected, np.uint8), "readable")
    p = dict(engine="onednn", x=x_u8, w=w_i8, ws=np.array([1e20]), wz=np.zeros(1, np.int64), per_channel=False,
             b=None, sx=1e20, zx=3, sy=1.0, zy=9, relu=relu)
    y_t, family = run_torch(p, capfd)
    assert_same(refquant_layer(p, family)(x_u8), y_t, f"torch ({family})")


# ----------------------------------------------------------------------------------------------------------------
# qnnpack: the int32 bias, the shared int32 accumulation
# ----------------------------------------------------------------------------------------------------------------

def test_qnnpack_bias_i32_is_torchs_quantize(rng):
    """bias_i32 = quantize_per_channel(bias, s_w·s_x (double), 0, qint32) per channel, quantize_per_tensor per tensor
    (QuantUtils.h QuantizeBias), saturating at the int32 limits: compared with torch's own quantize ops on the same
    doubles."""
    saturated = 0
    for i in range(40):
        N, K = int(rng.integers(2, 20)), int(rng.integers(1, 30))
        per_channel = bool(i % 2)
        ws = (10.0 ** rng.uniform(-4, 0, N if per_channel else 1))
        if i % 4 < 2:
            ws = ws.astype(np.float32).astype(np.float64)
        sx = float(10.0 ** rng.uniform(-4, 0))
        bias = (rng.standard_normal(N) * sx * ws.max() * 10.0 ** rng.uniform(0, 11)).astype(np.float32)
        if i < 2:  # beyond the int32 range in units of s_w·s_x, both signs: saturates to INT32_MAX / INT32_MIN
            bias[:2] = np.float32([3e9, -3e9]) * np.float32(sx * ws.max())
        w = rng.integers(-128, 128, (N, K)).astype(np.int8)
        ql = QuantizedLinear.from_quantized(w, ws if per_channel else float(ws[0]),
                                            np.zeros(N, np.int64) if per_channel else 0, bias, sx, 3, 1.0, 0,
                                            engine="qnnpack")
        if per_channel:
            expected = torch.quantize_per_channel(torch.from_numpy(bias), torch.from_numpy(ws) * sx,
                                                  torch.zeros(N, dtype=torch.int64), 0, torch.qint32)
        else:
            expected = torch.quantize_per_tensor(torch.from_numpy(bias), float(ws[0]) * sx, 0, torch.qint32)
        assert_same(ql.requantizer.bias_i32, expected.int_repr().numpy(), f"bias_i32, case {i}")
        saturated += int((np.abs(ql.requantizer.bias_i32.astype(np.int64)) >= 2**31 - 1).sum())
    assert saturated > 0, "no bias reached the int32 limits: the saturation was not tested"


def test_qnnpack_accumulation_is_the_shared_int32(rng):
    """Σ_k (q_x − z_x)·(w_u8 − kernel_zero_point), the way qnnpack's SSE2 kernel sums, equals the shared
    accumulate_raw (fbgemm's acc − z_x·col_offsets − z_w·row_sums) bit for bit, wrap-around included."""
    for i in range(30):
        N, K = int(rng.integers(1, 30)), 70_000 if i == 0 else int(rng.choice([1, 3, 8, 40, 100, 513]))
        per_channel = bool(i % 2)
        n_params = N if per_channel else 1
        w = rng.integers(-128, 128, (N, K)).astype(np.int8)
        zw = rng.integers(-128, 128, n_params)
        x = rng.integers(0, 256, (int(rng.integers(1, 6)), K)).astype(np.uint8)
        zx = int(rng.integers(0, 256))
        if i == 0:  # |raw| beyond int32: w = −128 − z_w ... force the wrap
            w[:] = -128
            zw[:] = 127
            x[:] = 255
            zx = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ql = QuantizedLinear.from_quantized(w, np.full(n_params, 0.01) if per_channel else 0.01,
                                                zw if per_channel else int(zw[0]), None, 0.01, zx, 1.0, 0,
                                                engine="qnnpack")
        packed = ql.prepacked
        assert_same(packed.weight_uint8, (w.astype(np.int16) + 128).astype(np.uint8), "weight_uint8")
        assert_same(packed.kernel_zero_points, (np.broadcast_to(zw, (N,)) + 128).astype(np.uint8), "kernel zps")
        mine = qnnpack_accumulate_readable(x, packed.weight_uint8, packed.kernel_zero_points, zx)
        assert_same(ql.accumulate(x), mine, f"accumulate_raw vs qnnpack's sum, case {i}")
        if i == 0:
            exact = (x.astype(np.int64) - zx) @ (w.astype(np.int64) - np.broadcast_to(zw, (N,))[:, None]).T
            assert (np.abs(exact) > 2**31 - 1).all() and (mine.astype(np.int64) != exact).all(), "no wrap happened"


# ----------------------------------------------------------------------------------------------------------------
# Layers from what torch holds: from_quantized on unpacked weights, from_float on torch's modules
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_from_quantized_unpacked_torch_weight(rng, capfd, engine):
    """torch's packed weight unpacked (``weight().int_repr()``, ``q_per_channel_scales()`` or ``q_scale()``, the
    zero points, ``bias()``) gives a refquant layer with torch's outputs."""
    for i in range(12):
        N, K, M = int(rng.integers(1, 40)), int(rng.integers(1, 100)), int(rng.integers(1, 8))
        per_channel = bool(i % 2)
        affine = engine != "onednn" and i % 4 >= 2
        w = rng.integers(-128, 128, (N, K)).astype(np.int8)
        ws = (10.0 ** rng.uniform(-3, -1, N if per_channel else 1)).astype(np.float32).astype(np.float64)
        wz = rng.integers(-20, 20, N if per_channel else 1) if affine else np.zeros(N if per_channel else 1, np.int64)
        b = (rng.standard_normal(N) * 0.5).astype(np.float32) if i % 3 else None
        with quantized_engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = torch.ops.quantized.linear_prepack(torch_qweight(w, ws, wz, per_channel),
                                                        None if b is None else torch.from_numpy(b))
            qweight, bias = packed.unpack()
        if qweight.qscheme() == torch.per_channel_affine:
            scales, zps = qweight.q_per_channel_scales().numpy(), qweight.q_per_channel_zero_points().numpy()
        else:
            scales, zps = qweight.q_scale(), qweight.q_zero_point()
        bias_np = None if bias is None else bias.numpy()
        p = dict(engine=engine, x=rng.integers(0, 256, (M, K)).astype(np.uint8), w=w, ws=ws, wz=wz,
                 per_channel=per_channel, b=b, sx=0.02, zx=int(rng.integers(0, 256)), sy=0.3, zy=128, relu=False)
        y_t, family = run_torch(p, capfd)
        kernel, _, pairs = family.partition("+")
        ql = QuantizedLinear.from_quantized(qweight.int_repr().numpy(), scales, zps, bias_np, 0.02, p["zx"], 0.3, 128,
                                            engine=engine, saturate_int16_pairs=family == "avx2" or bool(pairs),
                                            onednn_kernel=kernel if kernel in ONEDNN_KERNELS else "brgemm")
        assert_same(ql(p["x"]), y_t, f"from_quantized(unpack()), {engine}, case {i}")


@pytest.mark.isa
@pytest.mark.parametrize("engine", ENGINES)
def test_from_float_matches_torch_module_with_engine_qconfig(rng, capfd, engine):
    """torch.ao.nn.quantized.Linear.from_float with the weight observer of get_default_qconfig(engine) (per-tensor
    for qnnpack) equals QuantizedLinear.from_float(..., engine=engine) with its default weight_qscheme."""
    import torch.ao.nn.quantized as nnq
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import FixedQParamsObserver

    for i in range(6):
        K, N = int(rng.integers(1, 200)), int(rng.integers(1, 40))
        lin = torch.nn.Linear(K, N, bias=bool(i % 2))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy((rng.standard_normal((N, K)) * 0.3).astype(np.float32)))
        sy, zy = float(rng.uniform(0.01, 1.0)), int(rng.integers(0, 256))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin.qconfig = QConfig(activation=FixedQParamsObserver.with_args(scale=sy, zero_point=zy),
                                  weight=torch.ao.quantization.get_default_qconfig(engine).weight)
            lin.activation_post_process = lin.qconfig.activation()
            with quantized_engine(engine):
                qmod = nnq.Linear.from_float(lin)
                sx, zx = float(rng.uniform(0.001, 0.1)), int(rng.integers(0, 256))
                x = rng.integers(0, 256, (int(rng.integers(1, 6)), K)).astype(np.uint8)
                qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), sx, zx)
                capfd.readouterr()
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    y_t = qmod(qx).int_repr().numpy()
        family = onednn_family_from_verbose(capfd.readouterr().out) if engine == "onednn" else None
        kernel = (family or "brgemm").partition("+")[0]
        if engine in ("fbgemm", "x86"):  # full 8-bit codes: fbgemm's pre-VNNI kernels saturate int16 pairs
            family = "+pairs" if torch_fbgemm_kernel_family() == "avx2" else None
        bias = None if lin.bias is None else lin.bias.detach().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ql = QuantizedLinear.from_float(lin.weight.detach().numpy(), bias, sx, zx, qmod.scale, qmod.zero_point,
                                            engine=engine, onednn_kernel=kernel,
                                            saturate_int16_pairs="+pairs" in (family or ""))
        expected_qscheme = "per_tensor_symmetric" if engine == "qnnpack" else "per_channel_symmetric"
        assert ql.weight_qscheme == expected_qscheme
        assert_same(ql.weight_int8, qmod.weight().int_repr().numpy(), f"{engine} weight codes")
        assert_same(ql(x), y_t, f"nnq.Linear.from_float with {engine}'s qconfig, case {i}")
        _ = get_default_qconfig  # refquant's qconfig is checked against torch's in test_qconfig.py


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_output_shapes(rng, capfd, engine):
    """(M, K) -> (M, N); N-D inputs keep their leading dimensions; empty inputs give (..., 0, N) except on onednn,
    which returns (0, N) before reshaping; onednn also takes a 1-D input (K,) -> (N,), the others refuse it."""
    w = rng.integers(-128, 128, (5, 7)).astype(np.int8)
    for shape in [(1, 7), (4, 7), (2, 3, 7), (2, 1, 3, 7), (0, 7), (2, 0, 7), (7,)]:
        x = rng.integers(0, 256, shape).astype(np.uint8)
        p = dict(engine=engine, x=x, w=w, ws=np.full(5, 0.01), wz=np.zeros(5, np.int64), per_channel=True,
                 b=None, sx=0.05, zx=3, sy=0.2, zy=9, relu=False)
        y_t, family = run_torch(p, capfd)
        if isinstance(y_t, Exception):
            assert len(shape) == 1 and engine != "onednn", f"torch refused shape {shape} on {engine}: {y_t}"
            with pytest.raises(ValueError, match="at least 2 dimensions"):
                refquant_layer(p, family)(x)
            continue
        assert_same(refquant_layer(p, family)(x), y_t, f"{engine}, input shape {shape}")


# ----------------------------------------------------------------------------------------------------------------
# Numba kernels == readable NumPy, for every engine; the element functions from another module's kernel
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["below", "at"])
def test_requantize_dispatch_on_both_sides_of_the_threshold(rng, monkeypatch, size):
    """requantize(raw) runs the NumPy statements below refquant.engines.KERNEL_MIN_ELEMENTS int32 values and the
    Numba row kernel from it, for every engine's requantizer; on each side kernel == readable (the path that must
    not run is made to fail, so each call proves which one ran)."""
    monkeypatch.setattr(E, "_SMALL_CALLS", SmallCalls(E.KERNEL_MIN_ELEMENTS, max_calls=10**9))  # size alone
    N = 64
    M = E.KERNEL_MIN_ELEMENTS // N - (1 if size == "below" else 0)
    raw = random_raw(rng, M, N)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for i in range(3):
            for rq in random_requantizers(rng, N, i):
                readable = rq.requantize(raw, readable=True)
                assert_same(rq.requantize(raw, readable=False), readable, f"{type(rq).__name__} kernel, {M}x{N}")

                def must_not_run(*args):
                    raise AssertionError("the other path ran")

                with monkeypatch.context() as m:
                    m.setattr(type(rq), "_fast" if size == "below" else "_readable", must_not_run)
                    assert_same(rq.requantize(raw), readable, f"{type(rq).__name__} dispatch, {M}x{N}")


def random_raw(rng, M, N) -> np.ndarray:
    raw = rng.integers(-2**31, 2**31, (M, N), dtype=np.int64)
    raw = np.where(rng.random((M, N)) < 0.5, raw >> rng.integers(0, 31, (M, N)), raw).astype(np.int32)
    if M:
        raw[0, 0], raw[-1, -1] = np.iinfo(np.int32).min, np.iinfo(np.int32).max
        raw[0, -1] = 0
    return raw


def random_requantizers(rng, N: int, i: int):
    """One requantizer of each engine with random constants, extremes included (overflow, NaN, wrap)."""
    per_channel = bool(i % 2)
    n_params = N if per_channel else 1
    bias = None if i % 3 == 0 else (rng.standard_normal(N) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32)
    atws = (10.0 ** rng.uniform(-12, 2, n_params)).astype(np.float32)
    mult = (atws / np.float32(10.0 ** rng.uniform(-14, 3))).astype(np.float32)
    zp, relu = int(rng.integers(0, 256)), bool(rng.integers(0, 2))
    fb = FbgemmRequantizer(per_channel, bias, atws, mult, zp, relu, N)
    bias_i32 = rng.integers(-2**31, 2**31, N, dtype=np.int64).astype(np.int32) >> rng.integers(0, 31)
    scales = (10.0 ** rng.uniform(-38, 30, N)).astype(np.float32)
    qn = QnnpackRequantizer(bias_i32.astype(np.int32), scales, 1.0, zp, zp if relu else 0, 255)
    s_x = np.float32(10.0 ** rng.uniform(-20, 20))
    s_w = (10.0 ** rng.uniform(-20, 20, N)).astype(np.float32)
    if i % 5 == 0:
        s_w[0] = np.float32(np.inf)  # inf·0 = NaN paths
    dm = np.float32(10.0 ** rng.uniform(-20, 20)) if i % 7 else np.float32(np.inf)
    comp = rng.integers(-2**31, 2**31, N, dtype=np.int64).astype(np.int32)
    with np.errstate(over="ignore"):
        osc = (s_x * s_w).astype(np.float32)
    od = [OnednnRequantizer(kernel, np.float32(1) / s_x, np.float32(1) / s_w, np.float32(1) / dm, s_x, s_w,
                            np.float32(1) / dm, osc, dm, bias, relu, zp, comp) for kernel in ONEDNN_KERNELS]
    return [fb, qn] + od


@pytest.mark.parametrize("chunk", range(3))
def test_kernels_equal_readable_paths(rng, chunk):
    """Every engine's requantizer: the Numba row kernel (over the per-element function) == the NumPy statements,
    strict (dtype, shape, bits), on random raw values and random constants, extremes included."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for i in range(40):
            M, N = int(rng.integers(0, 12)), int(rng.integers(1, 40))
            raw = random_raw(rng, M, N)
            for rq in random_requantizers(rng, N, i):
                assert_same(rq.requantize(raw, readable=False), rq.requantize(raw, readable=True),
                            f"{type(rq).__name__} kernel vs readable, case {i}")


@njit(cache=True)
def _fused_epilogue_fbgemm(raw, bias_mode, bias, bias_term, rcp, mult, zp, lo, out):
    """What a matmul kernel with requantization in its epilogue would do: call the per-element function."""
    for m in range(raw.shape[0]):
        for n in range(raw.shape[1]):
            out[m, n] = fbgemm_requantize_element(raw[m, n], bias_mode, bias[n], bias_term[n], rcp, mult[n], zp, lo)


@njit(cache=True)
def _fused_epilogue_qnnpack(raw, bias_i32, scales, zp, lo, hi, out):
    for m in range(raw.shape[0]):
        for n in range(raw.shape[1]):
            out[m, n] = qnnpack_requantize_element(raw[m, n], bias_i32[n], scales[n], zp, lo, hi)


@njit(cache=True)
def _fused_epilogue_onednn(raw, kernel_code, comp, s_x, s_w, osc, has_bias, bias, relu, dm, zp_f32, out):
    for m in range(raw.shape[0]):
        for n in range(raw.shape[1]):
            out[m, n] = onednn_requantize_element(raw[m, n], kernel_code, comp[n], s_x, s_w[n], osc[n], has_bias,
                                                  bias[n], relu, dm, zp_f32)


def test_element_functions_callable_from_another_kernel(rng):
    """The per-element functions work inside a Numba kernel of another module (the fused-epilogue use) and give the
    readable path's codes."""
    N = 33
    raw = random_raw(rng, 9, N)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for i in range(12):
            fb, qn, *ods = random_requantizers(rng, N, i)
            out = np.empty(raw.shape, np.uint8)
            mode = np.int64(fb.bias_mode)
            assert mode in (FBGEMM_BIAS_NONE, FBGEMM_BIAS_ADD, FBGEMM_BIAS_FMA)
            bias = fb.bias if fb.bias is not None else np.zeros(N, np.float32)
            mult = np.ascontiguousarray(np.broadcast_to(fb.output_multiplier, (N,)))
            _fused_epilogue_fbgemm(raw, mode, bias, fb.bias_term, fb.bias_rcp, mult, np.int64(fb.output_zero_point),
                                   np.int64(fb.output_zero_point if fb.relu else 0), out)
            assert_same(out, fb.requantize(raw, readable=True), f"fbgemm element, case {i}")
            _fused_epilogue_qnnpack(raw, qn.bias_i32, qn.requantization_scales, np.int64(qn.output_zero_point),
                                    np.int64(qn.output_min), np.int64(qn.output_max), out)
            assert_same(out, qn.requantize(raw, readable=True), f"qnnpack element, case {i}")
            for od, code in zip(ods, range(3)):
                bias = od.bias if od.bias is not None else np.zeros(N, np.float32)
                _fused_epilogue_onednn(raw, np.int64(code), od.compensation, od.input_scale_onednn,
                                       od.weight_scales_onednn, od.output_scales, od.bias is not None, bias, od.relu,
                                       od.dst_multiplier, np.float32(od.output_zero_point), out)
                assert_same(out, od.requantize(raw, readable=True), f"onednn element ({od.kernel}), case {i}")
