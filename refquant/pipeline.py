"""The whole eager model, float in and float out: QuantStub -> Linear [-> ReLU] -> DeQuantStub, prepared,
calibrated and converted as ``torch.ao.quantization`` does it with ``get_default_qconfig(engine)`` and
``torch.backends.quantized.engine = engine`` (default "fbgemm"; "x86", "qnnpack", "onednn"). It is the one-layer case
of refquant.model (``FloatModel.sequential({"quant": QuantStub(), "fc": Linear(weight, bias, relu), "dequant":
DeQuantStub()})``, prepared, observed and converted there) with the names of the study; refquant.model strings
together the modules that hold the arithmetic:

    prepare      input observer  = qconfig.activation()   HistogramObserver(reduce_range=True for fbgemm and x86,
                 output observer = qconfig.activation()   False for qnnpack and onednn)  (refquant.qconfig, .histogram)
    calibrate    input_observer(x);  y = linear_float(x) [relu];  output_observer(y)           for every batch
    convert      (s_x, z_x) = input_observer.calculate_qparams()
                 (s_y, z_y) = output_observer.calculate_qparams()
                 weight_observer = qconfig.weight(); weight_observer(weight)   (per-channel symmetric, or per-tensor
                                                                               symmetric for qnnpack)
                 linear = QuantizedLinear(quantize_weight(weight, weight_observer), bias, s_x, z_x, s_y, z_y, relu,
                                          engine=engine)                                       (refquant.linear)
    forward      x_u8 = quantize_per_tensor(x, s_x, z_x, "quint8")        QuantStub    (refquant.quantize, eq. Q1)
                 y_u8 = linear(x_u8)                                      Linear[ReLU] (refquant.linear, eqs. L4-L11)
                 y    = dequantize(y_u8, s_y, z_y)                        DeQuantStub  (refquant.quantize, eq. D1)

``reduce_range`` only shapes the qparams: the observers map their chosen clip range onto codes 0..127, but the
QuantStub and the quantized Linear still clamp to the full 0..255, so values above the calibrated range use codes
128..255 before they saturate.

Matches: pytorch/pytorch torch/ao/quantization/quantize.py (prepare, convert), torch/ao/quantization/qconfig.py
(get_default_qconfig), torch/ao/nn/quantized/modules/__init__.py (Quantize, DeQuantize),
torch/ao/nn/quantized/modules/linear.py (Linear.from_float), torch/ao/nn/quantized/modules/utils.py
(_quantize_weight).

Two things about calibration are not quantization arithmetic, and :class:`ObservedLinear` makes both explicit:

* The output observer sees torch's float Linear, ``F.linear`` (MKL ``sgemm``), whose float32 summation order depends
  on the shape. :func:`linear_float` is NumPy's ``x @ W.T + b`` in float32: usually the same bits, not always, and
  one different float can move the observer's range and hence ``(s_y, z_y)``. To reproduce torch exactly, feed the
  observers the activations torch's observers saw (:meth:`ObservedLinear.observe_input` / ``observe_output``);
  :meth:`ObservedLinear.calibrate` runs refquant's own float forward instead.
* With ``relu=True`` torch's prepared ``LinearReLU`` calls its output observer **twice** per batch on the same
  tensor: ``LinearReLU`` is an ``nn.Sequential``, so its forward runs every child module, including the
  ``activation_post_process`` that ``prepare`` attached, and then prepare's forward hook calls that observer again
  (torch/ao/nn/intrinsic/modules/fused.py, torch/ao/quantization/quantize.py: ``_observer_forward_hook``). The
  histogram counts double; the chosen (scale, zero_point) do not change (every count and every error term of the
  search doubles exactly, so each comparison comes out the same; 0 of 300 random sets changed in torch).
  :meth:`ObservedLinear.calibrate` repeats this, so its histograms equal torch's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import model as rm
from .histogram import HistogramObserver
from .linear import QuantizedLinear
from .model import linear_float
from .qconfig import QConfig, get_default_qconfig
from .quantize import dequantize, quantize_per_tensor

__all__ = ["ObservedLinear", "QuantizedLinearModel", "linear_float"]


@dataclass
class QuantizedLinearModel:
    """The converted model: ``QuantStub -> quantized Linear[ReLU] -> DeQuantStub`` (torch's ``convert(prepared)``).

    Attributes:
        input_scale, input_zero_point: the QuantStub's (s_x, z_x) (torch's ``Quantize.scale``/``.zero_point``).
        linear: the :class:`refquant.linear.QuantizedLinear` (int8 weights, float32 bias, (s_y, z_y)).
        model: the same model as a :class:`refquant.model.QuantizedModel` (calls "quant", "fc", "dequant"), or None.
    """

    input_scale: np.float32
    input_zero_point: int
    linear: QuantizedLinear
    model: rm.QuantizedModel | None = None

    @property
    def output_scale(self) -> float:
        return self.linear.output_scale

    @property
    def output_zero_point(self) -> int:
        return self.linear.output_zero_point

    def quant(self, x: np.ndarray) -> np.ndarray:
        """QuantStub: float32 (..., K) -> uint8 codes, ``quantize_per_tensor(x, s_x, z_x, "quint8")`` (eq. Q1)."""
        return quantize_per_tensor(x, self.input_scale, self.input_zero_point, "quint8")

    def dequant(self, y_u8: np.ndarray) -> np.ndarray:
        """DeQuantStub: uint8 codes -> float32, ``f32(f32(q - z_y) * f32(s_y))`` (eq. D1)."""
        return dequantize(y_u8, self.output_scale, self.output_zero_point)

    def stages(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage of the forward pass: input codes, int32 accumulators (after the zero-point corrections),
        output codes and the dequantized float32 output."""
        x_u8 = self.quant(x)
        acc_i32 = self.linear.accumulate(x_u8)
        y_u8 = self.linear.requantize(acc_i32)
        return {"input_codes": x_u8, "accumulators": acc_i32, "output_codes": y_u8, "output": self.dequant(y_u8)}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 (..., K) -> float32 (..., N): quant, quantized Linear[ReLU], dequant."""
        return self.dequant(self.linear(self.quant(x)))


class ObservedLinear:
    """The prepared model: a float Linear [+ ReLU] between two activation observers (torch's ``prepare(model)``).

    Args:
        weight: float32 (N, K); bias: float32 (N,) or None (``nn.Linear(..., bias=False)``).
        relu: the fused ``LinearReLU`` of ``fuse_modules(model, [["fc", "relu"]])``.
        reduce_range: None (the engine's qconfig: True for fbgemm and x86, False for qnnpack and onednn), or an
            explicit choice for both activation observers (a custom qconfig).
        engine: "fbgemm", "x86", "qnnpack" or "onednn": the qconfig's observers (refquant.qconfig) and the layer
            ``convert`` builds (refquant.linear.QuantizedLinear with ``engine``).

    ``observed`` is the :class:`refquant.model.ObservedModel` underneath; ``input_observer`` and
    ``output_observer`` are its observers of "quant" and "fc".
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, relu: bool = False,
                 reduce_range: bool | None = None, engine: str = "fbgemm") -> None:
        if not isinstance(weight, np.ndarray) or weight.dtype != np.float32:
            got = weight.dtype if isinstance(weight, np.ndarray) else type(weight).__name__
            raise TypeError(f"weight must be a float32 NumPy array (out_features, in_features), got {got}")
        if weight.ndim != 2 or 0 in weight.shape:
            raise ValueError(f"weight must be 2-D (out_features, in_features) and non-empty, got shape {weight.shape}")
        if bias is not None:
            if not isinstance(bias, np.ndarray) or bias.dtype != np.float32:
                got = bias.dtype if isinstance(bias, np.ndarray) else type(bias).__name__
                raise TypeError(f"bias must be None or a float32 NumPy array, got {got}")
            if bias.shape != (weight.shape[0],):
                raise ValueError(f"bias must have shape (out_features,) = ({weight.shape[0]},), got {bias.shape}")
        self.weight = weight
        self.bias = bias
        self.relu = bool(relu)
        self.engine = engine
        self.qconfig = get_default_qconfig(engine)  # refuses an unknown engine
        if reduce_range is not None:
            self.qconfig = QConfig(activation=functools.partial(HistogramObserver, reduce_range=bool(reduce_range)),
                                   weight=self.qconfig.weight)
        float_model = rm.FloatModel.sequential({"quant": rm.QuantStub(), "fc": rm.Linear(weight, bias, self.relu),
                                                "dequant": rm.DeQuantStub()})
        self.observed = rm.prepare(float_model, self.qconfig)
        self.input_observer = self.observed.observers["quant"]
        self.output_observer = self.observed.observers["fc"]

    def observe_input(self, x: np.ndarray) -> None:
        """Record one batch of what the QuantStub's observer sees (the float input)."""
        self.observed.observe("quant", x)

    def observe_output(self, y: np.ndarray) -> None:
        """Record one batch of what the Linear's output observer sees (the float Linear [+ ReLU] output)."""
        self.observed.observe("fc", y)

    def calibrate(self, x: np.ndarray) -> np.ndarray:
        """One calibration batch through refquant's own float forward (:func:`linear_float`); returns its output.

        With ReLU the output observer records the batch twice, as torch's prepared ``LinearReLU`` does
        (refquant.model's float forward).
        """
        return self.observed.calibrate(np.asarray(x, np.float32))

    def convert(self, *, saturate_int16_pairs: bool = False, onednn_kernel: str = "brgemm") -> QuantizedLinearModel:
        """The quantized model, with (s_x, z_x) and (s_y, z_y) from the observers (``calculate_qparams``) and the
        weight quantized by the qconfig's weight observer, on this engine (refquant.model.ObservedModel.convert).

        ``saturate_int16_pairs`` / ``onednn_kernel``: the CPU kernel to model (refquant.linear.QuantizedLinear).
        """
        qm = self.observed.convert(engine=self.engine, saturate_int16_pairs=saturate_int16_pairs,
                                   onednn_kernel=onednn_kernel)
        quant = qm.modules["quant"]
        # torch: Quantize(float(scale), int(zero_point)) holds a float32 buffer; the Linear keeps float(s_y)
        return QuantizedLinearModel(input_scale=np.float32(quant.scale), input_zero_point=int(quant.zero_point),
                                    linear=qm.layer("fc"), model=qm)
