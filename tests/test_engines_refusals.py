"""Every refusal of refquant.linear.QuantizedLinear (constructor, from_float, from_quantized, accumulate, requantize,
__call__) and of the engines' prepacks, each next to what torch does with the same thing, live:

* ``test_torch_refuses_too_*``: torch raises as well (its message is checked where it names the cause);
* ``test_strictness_*``: refquant refuses what torch accepts (garbage codes, a crash, or reading past a buffer); the
  torch side of each is run to show what torch does instead (crashes in a subprocess, under ``-m slow``);
* ``test_refquant_argument_checks``: arguments torch has no counterpart of (torch's tensors carry their own qparams).

Also here: qnnpack's cache of requantization scales, keyed on the input scale alone, modelled deliberately
(``qnnpack_cached_output_scale``), and onednn's primitive cache, which changes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from parity import assert_same
from refquant.linear import QuantizedLinear, quantize_weight
from refquant.observers import MinMaxObserver
from torch_engines import ENGINES, quantized_engine, torch_threads

W_I8 = np.array([[1, -2, 3], [4, 5, -6]], np.int8)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def layer(engine="fbgemm", **over):
    """refquant's layer with defaults changed by ``over`` (the constructor's arguments)."""
    args = dict(weight_int8=W_I8, weight_scales=np.array([0.01, 0.02]), weight_zero_points=np.zeros(2, np.int64),
                bias=None, input_scale=0.1, input_zero_point=3, output_scale=0.2, output_zero_point=5,
                weight_qscheme="per_channel_symmetric")
    args.update(over)
    return QuantizedLinear(**args, engine=engine)


def torch_linear(engine, w=W_I8, scales=(0.01, 0.02), zps=(0, 0), bias=None, sx=0.1, zx=3, sy=0.2, zy=5, x=None,
                 per_channel=True):
    """torch's quantized::linear on the same codes; returns the output codes (or raises what torch raises)."""
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if per_channel:
            qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.tensor(scales, dtype=torch.double),
                                                          torch.tensor(zps, dtype=torch.long), 0)
        else:
            qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w), float(scales[0]), int(zps[0]))
        packed = torch.ops.quantized.linear_prepack(qw, bias)
        if x is None:
            x = torch._make_per_tensor_quantized_tensor(torch.tensor([[7, 8, 9], [250, 0, 3]], dtype=torch.uint8),
                                                        sx, zx)
        return torch.ops.quantized.linear(x, packed, sy, zy).int_repr().numpy()


X_U8 = np.array([[7, 8, 9], [250, 0, 3]], np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# torch refuses too
# ----------------------------------------------------------------------------------------------------------------

def test_torch_refuses_too_unknown_engine():
    with pytest.raises(ValueError, match="engine must be one of"):
        layer(engine="fbgemm2")
    with pytest.raises(RuntimeError, match="not a valid value for quantized engine"):
        torch.backends.quantized.engine = "fbgemm2"


@pytest.mark.parametrize("engine", ENGINES)
def test_torch_refuses_too_weight_not_2d(engine):
    with pytest.raises(ValueError, match="weight_int8 must be 2-D"):
        layer(engine, weight_int8=np.ones((6,), np.int8), weight_scales=np.array([0.01]),
              weight_zero_points=np.zeros(1, np.int64), weight_qscheme="per_tensor_symmetric")
    with pytest.raises(ValueError, match="weight must be 2-D"):
        QuantizedLinear.from_float(np.ones((2, 3, 4), np.float32), None, 0.1, 0, 0.1, 0, engine=engine)
    with quantized_engine(engine), pytest.raises(RuntimeError, match="2-dimensional|rank should be == 2"):
        torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(torch.randn(2, 4, 6), 0.1, 0, torch.qint8), None)


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_torch_refuses_too_weight_not_int8(engine):
    """Weight codes must be int8 (qint8): torch's fbgemm and qnnpack prepacks refuse quint8 and qint32 weights
    ("expected scalar type QInt8"); onednn accepts a qint32 one (test_strictness_onednn_dtypes)."""
    with pytest.raises(TypeError, match="weight_int8 must be a numpy int8 array"):
        layer(engine, weight_int8=W_I8.astype(np.uint8))
    with quantized_engine(engine), pytest.raises(RuntimeError, match="expected scalar type QInt8"):  # qnnpack:
        packed = torch.ops.quantized.linear_prepack(  # at the first call
            torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 3, torch.quint8), None)
        torch.ops.quantized.linear(torch._make_per_tensor_quantized_tensor(torch.from_numpy(X_U8), 0.1, 3), packed,
                                   0.2, 5)


@pytest.mark.parametrize("engine", ENGINES)
def test_torch_refuses_too_bias_shape(engine):
    for bad in (np.zeros(3, np.float32), np.zeros((1, 2), np.float32)):
        with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
            layer(engine, bias=bad)
        with pytest.raises(RuntimeError, match="bias should|expected bias"):
            torch_linear(engine, bias=torch.from_numpy(bad))


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_torch_refuses_too_bias_not_float(engine):
    """A complex bias: refquant refuses (real arrays are converted to float32, as ``mod.bias`` is float32 in torch;
    torch's fbgemm and qnnpack refuse any non-float32 bias tensor)."""
    with pytest.raises(TypeError, match="bias must be None or a real float array"):
        layer(engine, bias=np.zeros(2, np.complex64))
    with pytest.raises(RuntimeError, match="expected scalar type Float|expects a Float Tensor"):
        torch_linear(engine, bias=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("engine", ENGINES)
def test_torch_refuses_too_input_rank(engine):
    """fbgemm, x86, qnnpack: rank >= 2 ("Input tensor rank should be >= 2"); onednn: rank >= 1 (a 1-D input is
    accepted, test_engines_details.test_output_shapes)."""
    ql = layer(engine)
    bad = np.array(7, np.uint8) if engine == "onednn" else np.array([7, 8, 9], np.uint8)
    with pytest.raises(ValueError, match="at least"):
        ql(bad)
    x = torch._make_per_tensor_quantized_tensor(torch.from_numpy(bad), 0.1, 3)
    with pytest.raises(RuntimeError, match="larger than or equal to 2|rank should be >= 2|at least 1"):
        torch_linear(engine, x=x)


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
def test_torch_refuses_too_input_width(engine):
    """x's last dimension must be K: fbgemm and onednn refuse; qnnpack does not check (test_strictness_qnnpack_k)."""
    with pytest.raises(ValueError, match="last dimension in_features K = 3"):
        layer(engine)(np.zeros((2, 4), np.uint8))
    x = torch._make_per_tensor_quantized_tensor(torch.zeros((2, 4), dtype=torch.uint8), 0.1, 3)
    with pytest.raises(RuntimeError, match="equal to K|could not create a primitive descriptor"):
        torch_linear(engine, x=x)


@pytest.mark.parametrize("engine", ENGINES)
def test_torch_refuses_too_float_input(engine):
    """Float input: quantize it first (torch: quantized::linear has no float kernel)."""
    with pytest.raises(TypeError, match="quantize floats first"):
        layer(engine)(X_U8.astype(np.float32))
    with pytest.raises(NotImplementedError, match="Could not run 'quantized::linear'"):
        with quantized_engine(engine):
            packed = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 0,
                                                                                  torch.qint8), None)
            torch.ops.quantized.linear(torch.randn(2, 3), packed, 0.2, 5)


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_torch_refuses_too_signed_input(engine):
    """int8 (qint8) input codes: fbgemm and qnnpack refuse them; onednn accepts (test_strictness_onednn_dtypes)."""
    with pytest.raises(TypeError, match="x_u8 must hold uint8 codes"):
        layer(engine)(X_U8.astype(np.int8))
    x = torch._make_per_tensor_quantized_tensor(torch.from_numpy(X_U8.astype(np.int8)), 0.1, 0)
    with pytest.raises(RuntimeError, match="Expected input data type QUInt8"):
        torch_linear(engine, x=x)


@pytest.mark.parametrize("per_channel", [True, False])
def test_torch_refuses_too_onednn_weight_zero_points(per_channel):
    """onednn's prepack: "ONEDNN only supports symmetric quantization of weight"."""
    zps = np.array([0, 3]) if per_channel else np.array([3])
    qscheme = "per_channel_affine" if per_channel else "per_tensor_affine"
    scales = np.array([0.01, 0.02]) if per_channel else np.array([0.01])
    with pytest.raises(ValueError, match=r"engine 'onednn' supports only symmetric weights.*weight_zero_points\["):
        layer("onednn", weight_zero_points=zps, weight_scales=scales, weight_qscheme=qscheme)
    with pytest.raises(ValueError, match="engine 'onednn' supports only symmetric"):
        QuantizedLinear.from_float(np.array([[1.0, -0.5, 2.0]], np.float32), None, 0.1, 0, 0.1, 0,
                                   weight_qscheme="per_tensor_affine", engine="onednn")
    with pytest.raises(RuntimeError, match="ONEDNN only supports symmetric quantization of weight"):
        torch_linear("onednn", zps=tuple(zps), scales=tuple(scales), per_channel=per_channel)


@pytest.mark.parametrize("case, over, match", [
    ("zero output scale via inf", dict(output_scale=1e38, input_scale=1e-20), "channel 0"),
    ("subnormal", dict(input_scale=1e-37, output_scale=1.0), "channel 0"),
    ("overflow", dict(input_scale=1e20, output_scale=1e-20), "channel 0"),
    ("padding channel only", dict(weight_scales=np.array([1e10, 1e10]), input_scale=1e-21, output_scale=1e21),
     "padding channel 0"),
])
def test_torch_refuses_too_qnnpack_requantization_scale(case, over, match):
    """qnnpack's first call: every requantization scale f32(f32(s_w·f32(s_x))·f32(1/f32(s_y))) must be a normal
    float32 > 0, including its 8 padding channels of weight scale 1.0, so a layer whose real channels are fine is
    refused when f32(s_x/s_y) alone is not normal. fbgemm computes such layers (test below)."""
    with pytest.raises(ValueError, match=f"engine 'qnnpack' refuses this layer.*{match}"):
        layer("qnnpack", **over)
    args = dict(sx=over["input_scale"], sy=over["output_scale"])
    if "weight_scales" in over:
        args["scales"] = tuple(over["weight_scales"])
    with pytest.raises(RuntimeError, match="requantization scale must be finite and positive"):
        torch_linear("qnnpack", **args)
    assert_same(layer("fbgemm", **over)(X_U8), torch_linear("fbgemm", **args), f"fbgemm computes it ({case})")


def test_torch_refuses_too_weight_observer_dtype():
    """quantize_weight (torch's _quantize_weight, through Linear.from_float) needs a qint8 weight observer."""
    import torch.ao.nn.quantized as nnq
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import FixedQParamsObserver
    from torch.ao.quantization.observer import MinMaxObserver as TorchMinMaxObserver

    w = np.array([[0.5, -1.0]], np.float32)
    obs = MinMaxObserver(dtype="quint8")
    obs(w)
    with pytest.raises(ValueError, match="weight observer must have dtype 'qint8'"):
        quantize_weight(w, obs)
    lin = torch.nn.Linear(2, 1)
    lin.qconfig = QConfig(activation=FixedQParamsObserver.with_args(scale=0.1, zero_point=3),
                          weight=TorchMinMaxObserver.with_args(dtype=torch.quint8))
    lin.activation_post_process = lin.qconfig.activation()
    with pytest.raises(AssertionError, match="Weight observer must have dtype torch.qint8"):
        nnq.Linear.from_float(lin)


# ----------------------------------------------------------------------------------------------------------------
# Deliberate strictness: refquant refuses, torch computes garbage (shown live)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
@pytest.mark.parametrize("name, value", [("input_scale", 0.0), ("input_scale", -0.1), ("output_scale", 0.0),
                                         ("output_scale", -0.2), ("output_scale", float("nan")),
                                         ("output_scale", float("inf")), ("input_scale", 1e-50)])
def test_strictness_scales(engine, name, value):
    """Scales must be finite and > 0, also as float32: torch's fbgemm and onednn compute meaningless codes from a
    zero, negative, NaN or infinite scale (qnnpack refuses most of them at its first call)."""
    with pytest.raises(ValueError, match=f"{name} must"):
        layer(engine, **{name: value})
    y = torch_linear(engine, **({"sx": value} if name == "input_scale" else {"sy": value}))
    assert y.shape == (2, 2)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name, value", [("input_zero_point", 300), ("output_zero_point", -1),
                                         ("output_zero_point", 256)])
def test_strictness_activation_zero_points(engine, name, value):
    """Activation zero points must lie in [0, 255]: torch accepts any integer and wraps or clamps somewhere."""
    with pytest.raises(ValueError, match=rf"{name} must be a quint8 zero point in \[0, 255\]"):
        layer(engine, **{name: value})
    y = torch_linear(engine, **({"zx": value} if name == "input_zero_point" else {"zy": value}))
    assert y.shape == (2, 2)


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
@pytest.mark.parametrize("scale", [0.0, -0.01, float("nan"), float("inf")])
def test_strictness_weight_scales(engine, scale):
    """Weight scales must be finite and > 0 as float32 (qnnpack refuses the same at its first call, above)."""
    with pytest.raises(ValueError, match="weight_scales must be finite and > 0"):
        layer(engine, weight_scales=np.array([0.01, scale]))
    assert torch_linear(engine, scales=(0.01, scale)).shape == (2, 2)


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_strictness_weight_zero_point_range(engine):
    """A qint8 zero point outside [-128, 127]: torch's fbgemm and qnnpack take it (onednn refuses any nonzero)."""
    with pytest.raises(ValueError, match=r"\[-128, 127\]"):
        layer(engine, weight_zero_points=np.array([0, 200]), weight_qscheme="per_channel_affine")
    assert torch_linear(engine, zps=(0, 200)).shape == (2, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_strictness_non_finite_bias(engine):
    """A NaN or inf bias: torch computes with it (fbgemm/onednn float, qnnpack quantizes it to an int32 limit)."""
    with pytest.raises(ValueError, match=r"bias must be finite.*bias\[1\]"):
        layer(engine, bias=np.array([0.0, np.nan], np.float32))
    assert torch_linear(engine, bias=torch.tensor([0.0, float("nan")])).shape == (2, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_strictness_non_finite_float_weight(engine):
    """from_float with a NaN/inf weight: fbgemm and onednn quantize it to garbage codes, qnnpack refuses at its first
    call (NaN requantization scale)."""
    import torch.ao.nn.quantized as nnq
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import FixedQParamsObserver

    w = np.array([[1.0, np.nan], [1.0, 2.0]], np.float32)
    with pytest.raises(ValueError, match=r"weight must be finite.*weight\[0, 1\]"):
        QuantizedLinear.from_float(w, None, 0.1, 3, 0.2, 5, engine=engine)
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin.weight.copy_(torch.from_numpy(w))
        lin.qconfig = QConfig(activation=FixedQParamsObserver.with_args(scale=0.2, zero_point=5),
                              weight=torch.ao.quantization.get_default_qconfig(engine).weight)
        lin.activation_post_process = lin.qconfig.activation()
        with quantized_engine(engine):
            qmod = nnq.Linear.from_float(lin)
            x = torch._make_per_tensor_quantized_tensor(torch.tensor([[7, 8]], dtype=torch.uint8), 0.1, 3)
            if engine == "qnnpack":
                with pytest.raises(RuntimeError, match="requantization scale"):
                    qmod(x)
            else:
                assert qmod(x).shape == (1, 2)


def test_strictness_qnnpack_k():
    """qnnpack compares x's width with itself (``cols_w`` is taken from the input), so torch runs a K = 3 weight on
    4-wide rows, reading past the packed weight; refquant refuses as fbgemm does."""
    with pytest.raises(ValueError, match="last dimension in_features K = 3"):
        layer("qnnpack")(np.zeros((2, 4), np.uint8))
    x = torch._make_per_tensor_quantized_tensor(torch.zeros((2, 4), dtype=torch.uint8), 0.1, 3)
    assert torch_linear("qnnpack", x=x).shape == (2, 2)


def test_strictness_onednn_dtypes():
    """onednn accepts what refquant refuses: int8 (qint8) input codes (its s8s8 kernel, not modelled), a qint32
    weight and an int32 or float64 bias (read as if they were int8 / float32)."""
    with pytest.raises(TypeError, match="x_u8 must hold uint8 codes"):
        layer("onednn")(X_U8.astype(np.int8))
    x = torch._make_per_tensor_quantized_tensor(torch.from_numpy(X_U8.astype(np.int8)), 0.1, 0)
    assert torch_linear("onednn", x=x).dtype == np.int8
    with pytest.raises(TypeError, match="weight_int8 must be a numpy int8 array"):
        layer("onednn", weight_int8=W_I8.astype(np.int32))
    with quantized_engine("onednn"):
        packed = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 0,
                                                                              torch.qint32), None)
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(X_U8), 0.1, 3)
        assert torch.ops.quantized.linear(qx, packed, 0.2, 5).shape == (2, 2)
    assert torch_linear("onednn", bias=torch.zeros(2, dtype=torch.float64)).shape == (2, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_strictness_empty_weight(engine):
    """N = 0 or K = 0: refquant refuses; torch's fbgemm computes something (code 0 for K = 0, not even the zero
    point), qnnpack crashes (SIGFPE) on N = 0 and onednn on K = 0 (test_strictness_empty_weight_torch_crashes)."""
    for shape in ((0, 3), (2, 0)):
        with pytest.raises(ValueError, match="weight_int8 must be 2-D .* non-empty"):
            QuantizedLinear.from_quantized(np.zeros(shape, np.int8), 0.1, 0, None, 0.1, 3, 0.2, 5, engine=engine)
    if engine in ("fbgemm", "x86"):
        w = torch.quantize_per_tensor(torch.randn(2, 0), 0.1, 0, torch.qint8)
        x = torch._make_per_tensor_quantized_tensor(torch.zeros((3, 0), dtype=torch.uint8), 0.1, 3)
        with quantized_engine(engine):
            y = torch.ops.quantized.linear(x, torch.ops.quantized.linear_prepack(w, None), 0.2, 5)
        assert y.shape == (3, 2)


_CRASH_CHILD = textwrap.dedent("""
    import sys, warnings, torch
    warnings.filterwarnings("ignore")
    engine, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.backends.quantized.engine = engine
    w = torch.quantize_per_tensor(torch.randn(n, k), 0.1, 0, torch.qint8)
    x = torch._make_per_tensor_quantized_tensor(torch.zeros((2, k), dtype=torch.uint8), 0.1, 3)
    torch.ops.quantized.linear(x, torch.ops.quantized.linear_prepack(w, None), 0.2, 5)
""")


@pytest.mark.slow
@pytest.mark.parametrize("engine, n, k", [("qnnpack", 0, 3), ("onednn", 2, 0)])
def test_strictness_empty_weight_torch_crashes(engine, n, k):
    """The torch side of test_strictness_empty_weight: the process dies of a signal."""
    run = subprocess.run([sys.executable, "-c", _CRASH_CHILD, engine, str(n), str(k)], capture_output=True, timeout=300)
    assert run.returncode < 0 or run.returncode > 128, f"torch {engine} with a ({n}, {k}) weight did not crash"


# ----------------------------------------------------------------------------------------------------------------
# refquant's own arguments (no torch counterpart)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, match", [
    (lambda: layer(weight_scales=np.array([0.01])), ValueError, "weight_scales must hold 2"),
    (lambda: layer(weight_scales=np.array([1, 2])), ValueError, "weight_scales must hold 2 float"),
    (lambda: layer(weight_zero_points=np.zeros(3, np.int64)), ValueError, "weight_zero_points must hold 2"),
    (lambda: layer(weight_zero_points=np.array([0, 1])), ValueError, "must be 0 for per_channel_symmetric"),
    (lambda: layer(weight_qscheme="per_channel_affine_float_qparams"), ValueError, "weight_qscheme must be one of"),
    (lambda: QuantizedLinear.from_quantized(W_I8, np.ones((2, 1)), np.zeros((2, 1)), None, 0.1, 3, 0.2, 5),
     ValueError, "weight_scales must be q_scale"),
    (lambda: QuantizedLinear.from_quantized(W_I8, np.ones(2), 0, None, 0.1, 3, 0.2, 5), ValueError,
     "weight_zero_points must have the form of weight_scales"),
    (lambda: layer("qnnpack", saturate_int16_pairs=True), ValueError, "saturate_int16_pairs=True does not apply"),
    (lambda: layer("qnnpack")(X_U8, saturate_int16_pairs=True), ValueError, "does not apply to engine='qnnpack'"),
    (lambda: layer("fbgemm", onednn_kernel="brgemm_amx"), ValueError, "applies to engine='onednn'"),
    (lambda: layer("onednn", onednn_kernel="jit"), ValueError, "onednn_kernel must be one of"),
    (lambda: layer("onednn", onednn_kernel="brgemm_amx", saturate_int16_pairs=True), ValueError, "contradict"),
    (lambda: layer("fbgemm", qnnpack_cached_output_scale=0.1), ValueError, "applies to engine='qnnpack'"),
    (lambda: layer("qnnpack", qnnpack_cached_output_scale=-0.1), ValueError, "qnnpack_cached_output_scale must"),
    (lambda: layer("fbgemm", requantization="qnnpack"), ValueError, "applies to engine"),
    (lambda: layer("fbgemm", requantization="gemmlowp"), ValueError, "requantization must be None"),
    (lambda: layer()([[7, 8, 9]]), TypeError, "x_u8 must be a numpy array"),
    (lambda: layer().requantize(np.zeros((2, 2), np.int64)), TypeError, "acc_i32 must hold int32"),
    (lambda: layer().requantize(np.zeros((2, 3), np.int32)), ValueError, "out_features N = 2"),
    (lambda: layer().requantize(np.zeros(2, np.int32)), ValueError, "at least 2 dimensions"),
    (lambda: QuantizedLinear.from_float(np.ones((2, 2), np.float32), None, 0.1, 0, 0.1, 0, engine="qnnpack2"),
     ValueError, "engine must be one of"),
])
def test_refquant_argument_checks(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------------------

def test_qnnpack_cache_keyed_on_the_input_scale_alone(rng):
    """torch's qnnpack packed weight computes its requantization scales (and the int32 bias) at the first call with a
    new input scale and keeps them for every later call with that input scale, whatever their output scale: a
    second call with output scale s2 computes with the first call's s1 (but the new output zero point). refquant
    models this only when asked: ``qnnpack_cached_output_scale=s1``; a new input scale recomputes everything."""
    w = rng.integers(-128, 128, (16, 40)).astype(np.int8)
    ws = (10.0 ** rng.uniform(-3, -1, 16)).astype(np.float32).astype(np.float64)
    b = rng.standard_normal(16).astype(np.float32)
    x = rng.integers(0, 256, (8, 40)).astype(np.uint8)
    sx, s1, s2, s3 = 0.02, 0.5, 0.37, 0.021
    with quantized_engine("qnnpack"):
        packed = torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(ws),
                                                     torch.zeros(16, dtype=torch.long), 0), torch.from_numpy(b))
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), sx, 7)
        first = torch.ops.quantized.linear(qx, packed, s1, 100).int_repr().numpy()
        second = torch.ops.quantized.linear(qx, packed, s2, 90).int_repr().numpy()
        qx3 = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), s3, 7)
        third = torch.ops.quantized.linear(qx3, packed, s2, 90).int_repr().numpy()

    def ql(sx_, sy, zy, cached=None):
        return QuantizedLinear.from_quantized(w, ws, np.zeros(16, np.int64), b, sx_, 7, sy, zy, engine="qnnpack",
                                              qnnpack_cached_output_scale=cached)

    assert_same(ql(sx, s1, 100)(x), first, "first call = fresh layer")
    assert_same(ql(sx, s2, 90, cached=s1)(x), second, "second call = cached requantization scales of s1")
    assert (ql(sx, s2, 90)(x) != second).sum() > 10, "a fresh layer with s2 should differ from torch's cached call"
    assert_same(ql(s3, s2, 90)(x), third, "a new input scale recomputes: fresh layer")


def test_onednn_primitive_cache_changes_nothing(rng, capfd):
    """onednn caches its primitive at the first call; later calls with other scales miss the cache and compute with
    their own scales: the same packed weight gives what a fresh layer gives."""
    from torch_engines import onednn_family_from_verbose

    w = rng.integers(-128, 128, (16, 40)).astype(np.int8)
    ws = (10.0 ** rng.uniform(-3, -1, 16)).astype(np.float32).astype(np.float64)
    b = rng.standard_normal(16).astype(np.float32)
    x = rng.integers(0, 256, (8, 40)).astype(np.uint8)
    with quantized_engine("onednn"):
        packed = torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(ws),
                                                     torch.zeros(16, dtype=torch.long), 0), torch.from_numpy(b))
        for sx, sy, zy in ((0.02, 0.5, 100), (0.02, 0.37, 90), (0.021, 0.37, 91), (0.02, 0.5, 100)):
            qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), sx, 7)
            capfd.readouterr()
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                y_t = torch.ops.quantized.linear(qx, packed, sy, zy).int_repr().numpy()
            family = onednn_family_from_verbose(capfd.readouterr().out)
            kernel, _, pairs = family.partition("+")
            ql = QuantizedLinear.from_quantized(w, ws, np.zeros(16, np.int64), b, sx, 7, sy, zy, engine="onednn",
                                                onednn_kernel=kernel, saturate_int16_pairs=bool(pairs))
            assert_same(ql(x), y_t, f"onednn call with sx={sx}, sy={sy}")
