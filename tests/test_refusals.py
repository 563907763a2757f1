"""Every refusal of refquant's observers, histogram observer, quantize/dequantize, dtypes and pipeline, against torch
run live: either torch refuses the same input too (``BOTH_REFUSE``), or the refusal is a deliberate strictness
listed in README.md's section "Where refquant is stricter than torch" (``STRICTER``: each row's refquant call
raises, torch's runs and does what the row says). The table and ``STRICTER`` must list the same rows.

Only inputs are compared, not exception classes: refquant raises ValueError/TypeError/NotImplementedError where
torch raises AssertionError, RuntimeError or IndexError, sometimes later (torch checks ``ch_axis`` in forward,
a float64 weight in convert). Arguments torch does not have (``rounding=``, ``implementation=``, ``num_threads=``,
``kernel=``, refquant.matmul, refquant.export) have their own tests in the module's test file.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.quantization.observer as tobs
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

import refquant.observers as robs
from refquant.histogram import HistogramObserver, histc
from refquant.pipeline import ObservedLinear
from refquant.quantize import dequantize, dequantize_per_channel, quantize_per_channel, quantize_per_tensor

README = Path(__file__).resolve().parents[1] / "README.md"
F32 = np.float32
X = np.float32([0.5, -1.0, 3.0])
X2 = np.zeros((3, 2), np.float32)
ONES3, ZEROS3 = np.ones(3), np.zeros(3, np.int64)
TORCH_ERRORS = (RuntimeError, AssertionError, TypeError, NotImplementedError, IndexError, ValueError,
                AttributeError)


def feed(obs, *batches, torch_side: bool = False):
    """Observe each batch, then calculate_qparams (the whole life of an observer)."""
    for b in batches:
        obs(torch.as_tensor(b) if torch_side else b)
    return obs.calculate_qparams()


def torch_pipeline(weight: np.ndarray, bias: np.ndarray | None, x_dtype=torch.float32):
    """QuantStub -> nn.Linear with this weight and bias -> DeQuantStub, prepared, calibrated and converted by torch,
    then run once (what refquant.pipeline models)."""
    torch.backends.quantized.engine = "fbgemm"
    linear = nn.Linear(1, 1, bias=bias is not None)
    linear.weight = nn.Parameter(torch.from_numpy(weight), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(torch.from_numpy(bias), requires_grad=False)
    model = nn.Sequential(QuantStub(), linear, DeQuantStub()).eval()
    model.qconfig = get_default_qconfig("fbgemm")
    prepared = prepare(model)
    k = weight.shape[-1]
    prepared(torch.randn(4, k, dtype=x_dtype))
    return convert(prepared)(torch.randn(4, k, dtype=x_dtype))


# --------------------------------------------------------------------------------------------------------------
# Refused by both: (refquant's call, refquant's exception, torch's call, a word of torch's message)

P = pytest.param
BOTH_REFUSE = [
    # observers: settings
    P(lambda: robs.MinMaxObserver(qscheme="per_channel_affine"), NotImplementedError,
      lambda: tobs.MinMaxObserver(qscheme=torch.per_channel_affine), "qscheme only support", id="minmax-per-channel"),
    P(lambda: robs.MinMaxObserver(qscheme="affine"), NotImplementedError,
      lambda: tobs.MinMaxObserver(qscheme="affine"), "qscheme only support", id="minmax-unknown-qscheme"),
    P(lambda: robs.PerChannelMinMaxObserver(qscheme="per_tensor_affine"), NotImplementedError,
      lambda: tobs.PerChannelMinMaxObserver(qscheme=torch.per_tensor_affine), "qscheme only support",
      id="per-channel-per-tensor"),
    P(lambda: robs.MovingAverageMinMaxObserver(qscheme="per_tensor_symmetric", reduce_range=True),
      NotImplementedError, lambda: tobs.MovingAverageMinMaxObserver(qscheme=torch.per_tensor_symmetric,
                                                                     reduce_range=True),
      "Cannot reduce range", id="moving-symmetric-quint8-reduce-range"),
    P(lambda: robs.MovingAveragePerChannelMinMaxObserver(qscheme="per_channel_symmetric", reduce_range=True),
      NotImplementedError, lambda: tobs.MovingAveragePerChannelMinMaxObserver(qscheme=torch.per_channel_symmetric,
                                                                               reduce_range=True),
      "Cannot reduce range", id="moving-per-channel-symmetric-quint8-reduce-range"),
    P(lambda: robs.MinMaxObserver(quant_min=1, quant_max=10), ValueError,
      lambda: tobs.MinMaxObserver(quant_min=1, quant_max=10), "must include 0", id="range-without-0"),
    P(lambda: robs.MinMaxObserver(quant_min=0, quant_max=0), ValueError,
      lambda: tobs.MinMaxObserver(quant_min=0, quant_max=0), "strictly less", id="empty-range"),
    P(lambda: robs.MinMaxObserver(dtype="qint8", quant_min=-100, quant_max=200), ValueError,
      lambda: tobs.MinMaxObserver(dtype=torch.qint8, quant_min=-100, quant_max=200), "maximum bit range",
      id="qint8-range-too-long"),
    P(lambda: robs.MinMaxObserver(dtype="qint32", quant_min=0, quant_max=2**32), ValueError,
      lambda: tobs.MinMaxObserver(dtype=torch.qint32, quant_min=0, quant_max=2**32), "maximum bit range",
      id="qint32-range-too-long"),
    P(lambda: robs.MinMaxObserver(quant_min="a", quant_max=3), TypeError,
      lambda: tobs.MinMaxObserver(quant_min="a", quant_max=3), "not supported", id="string-bound"),
    P(lambda: robs.MinMaxObserver(quant_min=False, quant_max=True), TypeError,
      lambda: feed(tobs.MinMaxObserver(quant_min=False, quant_max=True), X, torch_side=True), "bool",
      id="bool-bounds"),
    P(lambda: robs.MinMaxObserver(dtype="float32"), ValueError,
      lambda: tobs.MinMaxObserver(dtype=torch.float32), "only works for", id="float-dtype"),
    P(lambda: HistogramObserver(qscheme="affine"), ValueError,
      lambda: tobs.HistogramObserver(qscheme="affine"), "qscheme only support", id="histogram-unknown-qscheme"),
    P(lambda: robs.PerChannelMinMaxObserver(ch_axis=1.5), TypeError,
      lambda: feed(tobs.PerChannelMinMaxObserver(ch_axis=1.5), X2, torch_side=True), "integers",
      id="ch-axis-float"),  # torch: in forward
    P(lambda: robs.PerChannelMinMaxObserver(ch_axis=True), TypeError,
      lambda: feed(tobs.PerChannelMinMaxObserver(ch_axis=True), X2, torch_side=True), "bool", id="ch-axis-bool"),
    P(lambda: robs.MovingAverageMinMaxObserver(averaging_constant="a"), ValueError,
      lambda: feed(tobs.MovingAverageMinMaxObserver(averaging_constant="a"), X, X, torch_side=True), "index",
      id="averaging-constant-string"),
    # observers: batches
    P(lambda: robs.MinMaxObserver()(np.array(["a"])), TypeError,
      lambda: torch.from_numpy(np.array(["a"])), "numpy.str_", id="string-batch"),
    P(lambda: robs.PerChannelMinMaxObserver()(X), ValueError,
      lambda: feed(tobs.PerChannelMinMaxObserver(), X, torch_side=True), "Dimension out of range",
      id="per-channel-1d-batch"),
    P(lambda: robs.PerChannelMinMaxObserver(ch_axis=2)(X2), ValueError,
      lambda: feed(tobs.PerChannelMinMaxObserver(ch_axis=2), X2, torch_side=True), "out of range",
      id="per-channel-axis-out-of-range"),
    P(lambda: feed(robs.PerChannelMinMaxObserver(), np.zeros((3, 2), F32), np.zeros((4, 2), F32)), ValueError,
      lambda: feed(tobs.PerChannelMinMaxObserver(), np.zeros((3, 2), F32), np.zeros((4, 2), F32), torch_side=True),
      "must match", id="per-channel-3-then-4-channels"),
    # HistogramObserver
    *[P(lambda bins=bins: HistogramObserver(bins=bins), ValueError,
        lambda bins=bins: feed(tobs.HistogramObserver(bins=bins), X, torch_side=True), "", id=f"bins-{bins}")
      for bins in (0, -3, 2.5, True)],
    *[P(lambda q=q: HistogramObserver(qscheme=q), NotImplementedError,
        lambda q=q: tobs.HistogramObserver(qscheme=getattr(torch, q)), "qscheme only support", id=f"histogram-{q}")
      for q in ("per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams")],
    *[P(lambda x=x: HistogramObserver()(x), TypeError,
        lambda x=x: feed(tobs.HistogramObserver(), x, torch_side=True), "not implemented", id=f"histogram-{x.dtype}")
      for x in (np.array([True, False]), np.arange(5), np.arange(5, dtype=np.uint8), np.complex64([1 + 1j, 2]))],
    P(lambda: HistogramObserver()([1.0, 2.0]), TypeError,
      lambda: tobs.HistogramObserver()([1.0, 2.0]), "numel", id="histogram-list"),
    P(lambda: HistogramObserver()(F32([1.0, np.nan])), ValueError,
      lambda: tobs.HistogramObserver()(torch.tensor([1.0, float("nan")])), "not finite", id="histogram-nan"),
    P(lambda: (lambda o: (o(X), setattr(o, "histogram", np.zeros(5, F32)), o.calculate_qparams()))(
        HistogramObserver()), AssertionError,
      lambda: (lambda o: (o(torch.from_numpy(X)), setattr(o, "histogram", torch.zeros(5)), o.calculate_qparams()))(
          tobs.HistogramObserver()), "number of bins", id="histogram-of-the-wrong-length"),
    P(lambda: histc(X, 10, np.nan, 1.0), ValueError,
      lambda: torch.histc(torch.from_numpy(X), 10, float("nan"), 1.0), "not finite", id="histc-nan-range"),
    P(lambda: histc(X, 10, 2.0, 1.0), ValueError,
      lambda: torch.histc(torch.from_numpy(X), 10, 2.0, 1.0), "max must be larger than min", id="histc-max-below-min"),
    # quantize / dequantize
    *[P(lambda dt=dt: quantize_per_tensor(X.astype(dt), 0.1, 0, "quint8"), TypeError,
        lambda dt=dt: torch.quantize_per_tensor(torch.from_numpy(X.astype(dt)), 0.1, 0, torch.quint8),
        "Float Tensor", id=f"quantize-{np.dtype(dt).name}")
      for dt in (np.float64, np.float16, np.int32)],
    P(lambda: quantize_per_tensor("abc", 0.1, 0, "quint8"), TypeError,
      lambda: torch.quantize_per_tensor("abc", 0.1, 0, torch.quint8), "invalid combination", id="quantize-string"),
    P(lambda: quantize_per_tensor(X, np.float32([0.1, 0.2]), 0, "quint8"), ValueError,
      lambda: torch.quantize_per_tensor(torch.from_numpy(X), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]),
                                        torch.quint8), "2 elements", id="quantize-two-scales"),
    P(lambda: quantize_per_tensor(X, "a", 0, "quint8"), TypeError,
      lambda: torch.quantize_per_tensor(torch.from_numpy(X), "a", 0, torch.quint8), "invalid combination",
      id="quantize-string-scale"),
    *[P(lambda zp=zp: quantize_per_tensor(X, 0.1, zp, "quint8"), TypeError,
        lambda zp=zp: torch.quantize_per_tensor(torch.from_numpy(X), 0.1, zp, torch.quint8), "invalid combination",
        id=f"quantize-zero-point-{zp}") for zp in (0.5, True)],
    *[P(lambda zp=zp, dt=dt: quantize_per_tensor(X, 0.1, zp, dt), ValueError,
        lambda zp=zp, dt=dt: torch.quantize_per_tensor(torch.from_numpy(X), 0.1, zp, getattr(torch, dt)), "bound",
        id=f"quantize-{dt}-zero-point-{zp}") for zp, dt in ((256, "quint8"), (-1, "quint8"), (-129, "qint8"))],
    *[P(lambda dt=dt: quantize_per_tensor(X, 0.1, 0, dt), ValueError,
        lambda dt=dt: torch.quantize_per_tensor(torch.from_numpy(X), 0.1, 0, getattr(torch, dt)), "not supported",
        id=f"quantize-dtype-{dt}") for dt in ("int8", "uint8", "uint4")],
    P(lambda: quantize_per_channel(X2, np.ones(2), np.zeros(2, int), 0, "qint8"), ValueError,
      lambda: torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(2, dtype=torch.double),
                                         torch.zeros(2, dtype=torch.long), 0, torch.qint8), "length of scales",
      id="per-channel-scales-length"),
    P(lambda: quantize_per_channel(X2, ONES3, np.zeros(2, int), 0, "qint8"), ValueError,
      lambda: torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(3, dtype=torch.double),
                                         torch.zeros(2, dtype=torch.long), 0, torch.qint8), "must match",
      id="per-channel-zero-points-length"),
    P(lambda: quantize_per_channel(X2, np.ones((3, 1)), np.zeros((3, 1), int), 0, "qint8"), ValueError,
      lambda: torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(3, 1, dtype=torch.double),
                                         torch.zeros(3, 1, dtype=torch.long), 0, torch.qint8), "dimension 1",
      id="per-channel-2d-scales"),
    *[P(lambda axis=axis: quantize_per_channel(X2, np.ones(2), np.zeros(2, int), axis, "qint8"),
        ValueError if isinstance(axis, int) else TypeError,
        lambda axis=axis: torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(2, dtype=torch.double),
                                                     torch.zeros(2, dtype=torch.long), axis, torch.qint8), "axis",
        id=f"per-channel-axis-{axis}") for axis in (2, -1, 1.5)],
    P(lambda: quantize_per_channel(X2, np.ones(3, int), ZEROS3, 0, "qint8"), TypeError,
      lambda: torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(3, dtype=torch.long),
                                         torch.zeros(3, dtype=torch.long), 0, torch.qint8), "floating point",
      id="per-channel-integer-scales"),
    P(lambda: quantize_per_channel(X2, ONES3, np.array([0, 0, 200]), 0, "qint8"), ValueError,
      lambda: torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(3, dtype=torch.double),
                                         torch.tensor([0, 0, 200]), 0, torch.qint8), "above upper bound",
      id="per-channel-zero-point-range"),
    P(lambda: quantize_per_channel(X2.astype(np.float64), ONES3, ZEROS3, 0, "qint8"), TypeError,
      lambda: torch.quantize_per_channel(torch.zeros(3, 2, dtype=torch.double), torch.ones(3, dtype=torch.double),
                                         torch.zeros(3, dtype=torch.long), 0, torch.qint8), "Float Tensor",
      id="per-channel-float64"),
    P(lambda: quantize_per_channel(F32(0.5), np.ones(1), np.zeros(1, int), 0, "qint8"), ValueError,
      lambda: torch.quantize_per_channel(torch.tensor(0.5), torch.ones(1, dtype=torch.double),
                                         torch.zeros(1, dtype=torch.long), 0, torch.qint8), "axis out of range",
      id="per-channel-0d"),
    P(lambda: dequantize([1, 2], 0.1, 0), TypeError, lambda: torch.dequantize([1, 2]), "expected Tensor",
      id="dequantize-list"),
    *[P(lambda dt=dt: dequantize(np.zeros(3, dt), 0.1, 0), TypeError,
        lambda dt=dt: torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.zeros(3, dt)), 0.1, 0),
        "quantized dtype", id=f"dequantize-{np.dtype(dt).name}-codes") for dt in (np.float32, np.int16)],
    P(lambda: dequantize(np.zeros(3, np.uint8), 0.1, 300), ValueError,
      lambda: torch._make_per_tensor_quantized_tensor(torch.zeros(3, dtype=torch.uint8), 0.1, 300).dequantize(),
      "above upper bound", id="dequantize-zero-point-range"),
    P(lambda: dequantize_per_channel(np.zeros((2, 2), np.int8), ONES3, ZEROS3, 0), ValueError,
      lambda: torch._make_per_channel_quantized_tensor(torch.zeros(2, 2, dtype=torch.int8),
                                                       torch.ones(3, dtype=torch.double),
                                                       torch.zeros(3, dtype=torch.long), 0).dequantize(),
      "length of scales", id="dequantize-per-channel-scales-length"),
    P(lambda: dequantize_per_channel(np.zeros((2, 2), np.int8), np.ones(2), np.zeros(2, int), -1), ValueError,
      lambda: torch._make_per_channel_quantized_tensor(torch.zeros(2, 2, dtype=torch.int8),
                                                       torch.ones(2, dtype=torch.double),
                                                       torch.zeros(2, dtype=torch.long), -1).dequantize(),
      "axis out of range", id="dequantize-per-channel-axis"),
    P(lambda: dequantize_per_channel(np.zeros((2, 2), np.int8), np.ones(2), np.array([0, 200]), 0), ValueError,
      lambda: torch._make_per_channel_quantized_tensor(torch.zeros(2, 2, dtype=torch.int8),
                                                       torch.ones(2, dtype=torch.double),
                                                       torch.tensor([0, 200]), 0).dequantize(),
      "above upper bound", id="dequantize-per-channel-zero-point-range"),
    P(lambda: dequantize_per_channel(np.zeros((2, 2), np.int8), np.ones(2, int), np.zeros(2, int), 0), TypeError,
      lambda: torch._make_per_channel_quantized_tensor(torch.zeros(2, 2, dtype=torch.int8),
                                                       torch.ones(2, dtype=torch.long),
                                                       torch.zeros(2, dtype=torch.long), 0).dequantize(),
      "floating point", id="dequantize-per-channel-integer-scales"),
    # pipeline: the weight and bias torch's nn.Linear would hold
    P(lambda: ObservedLinear(np.ones((2, 3)), None), TypeError,
      lambda: torch_pipeline(np.ones((2, 3)), None, torch.float64), "Float Tensor", id="pipeline-float64-weight"),
    P(lambda: ObservedLinear([[1.0]], None), TypeError,
      lambda: setattr(nn.Linear(1, 1), "weight", [[1.0]]), "cannot assign", id="pipeline-list-weight"),
    P(lambda: ObservedLinear(np.ones(3, F32), None), ValueError,
      lambda: torch_pipeline(np.ones(3, F32), None), "Dimension out of range", id="pipeline-1d-weight"),
    *[P(lambda shape=shape: ObservedLinear(np.ones(shape, F32), None), ValueError,
        lambda shape=shape: torch_pipeline(np.ones(shape, F32), None), "length of scales",
        id=f"pipeline-weight-{shape}") for shape in ((0, 3), (2, 0))],
    P(lambda: ObservedLinear(np.ones((2, 3), F32), np.ones(3, F32)), ValueError,
      lambda: torch_pipeline(np.ones((2, 3), F32), np.ones(3, F32)), "size", id="pipeline-bias-shape"),
    P(lambda: ObservedLinear(np.ones((2, 3), F32), np.ones(2)), TypeError,
      lambda: torch_pipeline(np.ones((2, 3), F32), np.ones(2)), "dtype", id="pipeline-float64-bias"),
]


@pytest.mark.parametrize("ours, error, theirs, torch_says", BOTH_REFUSE)
def test_torch_refuses_it_too(ours, error, theirs, torch_says):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            ours()
        with pytest.raises(TORCH_ERRORS) as info:
            theirs()
    assert torch_says in str(info.value), f"torch refused for another reason: {info.value!r}"


def test_inverted_moving_average_range_is_refused_by_both():
    """A channel whose moving-average min ends above its max (set directly on both observers)."""
    ours, theirs = robs.MovingAveragePerChannelMinMaxObserver(), tobs.MovingAveragePerChannelMinMaxObserver()
    ours.min_val, ours.max_val = F32([3.0]), F32([2.0])
    theirs.min_val, theirs.max_val = torch.tensor([3.0]), torch.tensor([2.0])
    with pytest.raises(ValueError, match="should be less than max"):
        ours.calculate_qparams()
    with pytest.raises(AssertionError, match="should be less than max"):
        theirs.calculate_qparams()


# --------------------------------------------------------------------------------------------------------------
# Stricter than torch: the README table, row by row (first column -> refquant's call, its exception, torch's call
# and a check of what torch does instead)


def _torch_qparams_ok(qparams) -> None:
    assert len(qparams) == 2


def _torch_runs_lone_bound():
    obs = tobs.MinMaxObserver(quant_min=0)
    assert (obs.quant_min, obs.quant_max) == (0, 255)  # the lone bound is ignored: the default range


def _torch_float_bounds():
    _, zero_point = feed(tobs.MinMaxObserver(quant_min=0.0, quant_max=255.0), X, torch_side=True)
    assert zero_point.dtype.is_floating_point


def _torch_range_outside_dtype():
    _, zero_point = feed(tobs.MinMaxObserver(quant_min=0, quant_max=300), np.float32([-1.0, 2.0]), torch_side=True)
    _, zero_point_i8 = feed(tobs.MinMaxObserver(dtype=torch.qint8, quant_min=-200, quant_max=10),
                            np.float32([-1.0, 2.0]), torch_side=True)
    assert int(zero_point_i8) < -128  # a qint8 zero point outside [-128, 127]
    feed(tobs.MinMaxObserver(quant_min=-10, quant_max=100), X, torch_side=True)


def _torch_eps():
    scale, _ = feed(tobs.MinMaxObserver(eps=0.0), np.zeros(3, F32), torch_side=True)
    assert float(scale) == 0.0
    scale, _ = feed(tobs.MinMaxObserver(eps=float("nan")), X, torch_side=True)
    assert torch.isnan(scale).all()


def _torch_other_dtypes():
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.quint4x2):
        _torch_qparams_ok(feed(tobs.MinMaxObserver(dtype=dtype), X, torch_side=True))


def _torch_averaging_constant():
    scale, _ = feed(tobs.MovingAverageMinMaxObserver(averaging_constant=float("nan")), X, 2 * X, torch_side=True)
    assert torch.isnan(scale).all()
    _torch_qparams_ok(feed(tobs.MovingAverageMinMaxObserver(averaging_constant=True), X, 2 * X, torch_side=True))


def _torch_non_finite_batch():
    for cls, x in ((tobs.MinMaxObserver, F32([1.0, np.nan])), (tobs.MovingAverageMinMaxObserver, F32([1.0, np.inf])),
                   (tobs.PerChannelMinMaxObserver, F32([[1.0, np.nan], [0.0, 2.0]]))):
        scale, _ = feed(cls(), x, torch_side=True)
        assert not torch.isfinite(scale).all()


def _torch_bool_and_complex_batches():
    _torch_qparams_ok(feed(tobs.MinMaxObserver(), np.array([True, False]), torch_side=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Casting complex values to real discards the imaginary part"
        scale, _ = feed(tobs.MinMaxObserver(), np.complex64([1 + 2j, 3]), torch_side=True)
    assert float(scale) == float(F32(3) / F32(255))  # the real parts' range [0, 3]


def _torch_broadcasts_channels():
    for first, then in ((1, 3), (3, 1)):
        obs = tobs.PerChannelMinMaxObserver()
        feed(obs, np.zeros((first, 2), F32), np.ones((then, 2), F32), torch_side=True)
        assert obs.min_val.shape == (3,)


def _torch_histograms_other_floats():
    for dtype in (torch.float64, torch.float16):
        _torch_qparams_ok(feed(tobs.HistogramObserver(), torch.randn(100).to(dtype), torch_side=True))


def _torch_meaningless_scales():
    for scale in (0.0, -1.0, float("nan"), float("inf"), 1e-300, True):
        torch.quantize_per_tensor(torch.from_numpy(X), scale, 0, torch.quint8)
    torch._make_per_tensor_quantized_tensor(torch.zeros(3, dtype=torch.uint8), -1.0, 0).dequantize()


def _torch_meaningless_channel_scales():
    for bad in (0.0, -1.0, float("nan")):
        scales = torch.tensor([1.0, bad, 1.0], dtype=torch.double)
        torch.quantize_per_channel(torch.from_numpy(X2), scales, torch.zeros(3, dtype=torch.long), 0, torch.qint8)
        torch._make_per_channel_quantized_tensor(torch.ones(3, 2, dtype=torch.int8), scales,
                                                 torch.zeros(3, dtype=torch.long), 0).dequantize()


def _torch_float_zero_points():
    zps = torch.tensor([0.5, 0.0, 0.0], dtype=torch.double)
    torch.quantize_per_channel(torch.from_numpy(X2), torch.ones(3, dtype=torch.double), zps, 0, torch.qint8)
    torch._make_per_channel_quantized_tensor(torch.zeros(3, 2, dtype=torch.int8), torch.ones(3, dtype=torch.double),
                                             zps, 0).dequantize()


def _torch_sub_byte_dtypes():
    for dtype in (torch.quint4x2, torch.quint2x4):
        torch.quantize_per_tensor(torch.from_numpy(X), 0.1, 0, dtype)


def _torch_linear_without_inputs():
    assert torch_pipeline(np.ones((1, 0), F32), None).shape == (4, 1)


STRICTER = {
    "`MinMaxObserver(quant_min=0)`": (
        lambda: robs.MinMaxObserver(quant_min=0), ValueError, _torch_runs_lone_bound),
    "`MinMaxObserver(quant_min=0.0, quant_max=255.0)`": (
        lambda: robs.MinMaxObserver(quant_min=0.0, quant_max=255.0), TypeError, _torch_float_bounds),
    "`MinMaxObserver(quant_min=0, quant_max=300)`": (
        lambda: robs.MinMaxObserver(quant_min=0, quant_max=300), ValueError, _torch_range_outside_dtype),
    "`MinMaxObserver(eps=0.0)`": (lambda: robs.MinMaxObserver(eps=0.0), ValueError, _torch_eps),
    "`MinMaxObserver(dtype=\"uint8\")`": (
        lambda: robs.MinMaxObserver(dtype="uint8"), ValueError, _torch_other_dtypes),
    "`MovingAverageMinMaxObserver(averaging_constant=float(\"nan\"))`": (
        lambda: robs.MovingAverageMinMaxObserver(averaging_constant=float("nan")), ValueError,
        _torch_averaging_constant),
    "`MinMaxObserver()(np.float32([1, np.nan]))`": (
        lambda: robs.MinMaxObserver()(F32([1, np.nan])), ValueError, _torch_non_finite_batch),
    "`MinMaxObserver()(np.array([True, False]))`": (
        lambda: robs.MinMaxObserver()(np.array([True, False])), TypeError, _torch_bool_and_complex_batches),
    "`PerChannelMinMaxObserver()` fed 3 channels after 1": (
        lambda: feed(robs.PerChannelMinMaxObserver(), np.zeros((1, 2), F32), np.ones((3, 2), F32)), ValueError,
        _torch_broadcasts_channels),
    "`HistogramObserver()(np.float64([1, 2]))`": (
        lambda: HistogramObserver()(np.float64([1, 2])), TypeError, _torch_histograms_other_floats),
    "`quantize_per_tensor(x, 0.0, 0, \"quint8\")`": (
        lambda: quantize_per_tensor(X, 0.0, 0, "quint8"), ValueError, _torch_meaningless_scales),
    "`quantize_per_channel(x, [1.0, 0.0, 1.0], ...)`": (
        lambda: quantize_per_channel(X2, np.array([1.0, 0.0, 1.0]), ZEROS3, 0, "qint8"), ValueError,
        _torch_meaningless_channel_scales),
    "`quantize_per_channel(x, scales, np.float64([0.5, 0, 0]), ...)`": (
        lambda: quantize_per_channel(X2, ONES3, np.float64([0.5, 0, 0]), 0, "qint8"), TypeError,
        _torch_float_zero_points),
    "`quantize_per_tensor(x, 0.1, 0, \"quint4x2\")`": (
        lambda: quantize_per_tensor(X, 0.1, 0, "quint4x2"), ValueError, _torch_sub_byte_dtypes),
    "`ObservedLinear(np.ones((1, 0), np.float32), None)`": (
        lambda: ObservedLinear(np.ones((1, 0), F32), None), ValueError, _torch_linear_without_inputs),
}

# The variants each row names besides its first call: each must raise too.
STRICTER_VARIANTS = {
    "`MinMaxObserver(quant_min=0)`": [lambda: HistogramObserver(quant_max=10),
                                      lambda: robs.PerChannelMinMaxObserver(quant_min=-3)],
    "`MinMaxObserver(quant_min=0, quant_max=300)`": [
        lambda: robs.MinMaxObserver(dtype="qint8", quant_min=-200, quant_max=10),
        lambda: robs.MinMaxObserver(quant_min=-10, quant_max=100)],
    "`MinMaxObserver(eps=0.0)`": [lambda: robs.MinMaxObserver(eps=-1.0), lambda: HistogramObserver(eps=np.nan)],
    "`MinMaxObserver(dtype=\"uint8\")`": [lambda d=d: HistogramObserver(dtype=d) for d in
                                          ("int8", "int16", "int32", "uint16", "quint4x2")],
    "`MovingAverageMinMaxObserver(averaging_constant=float(\"nan\"))`": [
        lambda: robs.MovingAverageMinMaxObserver(averaging_constant=np.inf),
        lambda: robs.MovingAveragePerChannelMinMaxObserver(averaging_constant=True)],
    "`MinMaxObserver()(np.float32([1, np.nan]))`": [
        lambda: robs.MovingAverageMinMaxObserver()(F32([1, np.inf])),
        lambda: robs.PerChannelMinMaxObserver()(F32([[1, np.nan], [0, 2]])),
        lambda: robs.MovingAveragePerChannelMinMaxObserver()(F32([[1, -np.inf], [0, 2]]))],
    "`MinMaxObserver()(np.array([True, False]))`": [lambda: robs.MinMaxObserver()(np.complex64([1 + 2j, 3]))],
    "`PerChannelMinMaxObserver()` fed 3 channels after 1": [
        lambda: feed(robs.PerChannelMinMaxObserver(), np.zeros((3, 2), F32), np.ones((1, 2), F32))],
    "`HistogramObserver()(np.float64([1, 2]))`": [lambda: HistogramObserver()(np.float16([1, 2]))],
    "`quantize_per_tensor(x, 0.0, 0, \"quint8\")`": [
        *[lambda s=s: quantize_per_tensor(X, s, 0, "quint8") for s in (-1.0, np.nan, np.inf, 1e-300, True)],
        lambda: dequantize(np.zeros(3, np.uint8), -1.0, 0)],
    "`quantize_per_channel(x, [1.0, 0.0, 1.0], ...)`": [
        lambda: quantize_per_channel(X2, np.array([1.0, np.nan, 1.0]), ZEROS3, 0, "qint8"),
        lambda: dequantize_per_channel(np.ones((3, 2), np.int8), np.array([1.0, -1.0, 1.0]), ZEROS3, 0)],
    "`quantize_per_channel(x, scales, np.float64([0.5, 0, 0]), ...)`": [
        lambda: dequantize_per_channel(np.zeros((3, 2), np.int8), ONES3, np.float64([0.5, 0, 0]), 0)],
    "`quantize_per_tensor(x, 0.1, 0, \"quint4x2\")`": [lambda: quantize_per_tensor(X, 0.1, 0, "quint2x4")],
}


def readme_table_rows() -> list[str]:
    """The first column of each row of README.md's table "Where refquant is stricter than torch"."""
    text = README.read_text()
    section = re.search(r"^## Where refquant is stricter than torch\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no section '## Where refquant is stricter than torch'"
    rows = [line for line in section.group(1).splitlines()
            if line.startswith("| ") and not line.startswith("| refquant call")]
    return [row.split(" | ")[0][2:].strip() for row in rows]


STRICTER_ELSEWHERE = {
    # README rows whose two sides (refquant raises, torch runs) are checked live by the quantized layers' own tests
    "`QuantizedLinear.from_quantized(w, s_w, z_w, b, 0.0, 3, 0.2, 5)`": "test_engines_refusals.py::test_strictness_scales",
    "`QuantizedLinear.from_quantized(w, s_w, z_w, b, 0.1, 300, 0.2, 5)`":
        "test_engines_refusals.py::test_strictness_activation_zero_points",
    "`QuantizedLinear.from_quantized(w, [0.01, 0.0], z_w, ...)`": "test_engines_refusals.py::test_strictness_weight_scales",
    "`QuantizedLinear.from_quantized(w, s_w, [0, 200], ..., weight_qscheme=\"per_channel_affine\")`":
        "test_engines_refusals.py::test_strictness_weight_zero_point_range",
    "`QuantizedLinear.from_quantized(w, s_w, z_w, [0.0, nan], ...)`": "test_engines_refusals.py::test_strictness_non_finite_bias",
    "`QuantizedLinear.from_float([[1.0, nan], ...], ...)`": "test_engines_refusals.py::test_strictness_non_finite_float_weight",
    "`QuantizedLinear.from_quantized(np.zeros((0, 3), np.int8), ...)`":
        "test_engines_refusals.py::test_strictness_empty_weight",
    "`QuantizedLinear(..., engine=\"qnnpack\")(x)` with x wider than K": "test_engines_refusals.py::test_strictness_qnnpack_k",
    "`QuantizedLinear(..., engine=\"onednn\")(x.astype(np.int8))`": "test_engines_refusals.py::test_strictness_onednn_dtypes",
    "`DynamicQuantizedLinear.from_float(w, b)(np.float32([[np.nan, 1.0]]))`":
        "test_dynamic.py::test_non_finite_input_refused",
}


def test_rows_checked_elsewhere_name_tests_that_exist():
    for row, where in STRICTER_ELSEWHERE.items():
        file, test = where.split("::")
        source = (Path(__file__).parent / file).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"{row}: {where} does not exist"


def test_the_readme_table_lists_exactly_the_rows_checked_here():
    rows = readme_table_rows()
    assert len(rows) == len(set(rows)), "a row appears twice"
    checked = set(STRICTER) | set(STRICTER_ELSEWHERE)
    assert set(rows) == checked, (f"in README, not checked: {sorted(set(rows) - checked)}; "
                                  f"checked, not in README: {sorted(checked - set(rows))}")
    assert set(STRICTER_VARIANTS) <= set(STRICTER)


def test_the_readme_section_sits_before_crosschecks_json():
    headings = re.findall(r"^## (.*)$", README.read_text(), re.M)
    assert headings.index("crosscheck's JSON") == headings.index("Where refquant is stricter than torch") + 1


@pytest.mark.parametrize("row", list(STRICTER))
def test_each_stricter_row_raises_in_refquant_and_runs_in_torch(row):
    ours, error, theirs = STRICTER[row]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            ours()
        for variant in STRICTER_VARIANTS.get(row, []):
            with pytest.raises((ValueError, TypeError)):
                variant()
        theirs()  # torch accepts it, and does what the row says
