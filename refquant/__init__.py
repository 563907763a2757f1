"""refquant: a readable NumPy + Numba golden model of PyTorch's int8 static quantization (fbgemm, x86, qnnpack, onednn).

The path a value takes, one module per step:

    refquant.observers   MinMax-family observers: calibration range -> (scale, zero_point)
    refquant.histogram   HistogramObserver: the fbgemm qconfig's activation observer (L2-optimal clipping)
    refquant.quantize    quantize / dequantize: float32 <-> integer codes, torch 2.13's exact rounding
    refquant.matmul      uint8 x int8 -> int32 products (VNNI, and the int16-saturating pre-VNNI form)
    refquant.linear      QuantizedLinear: int32 accumulation and fbgemm's requantization with float bias
    refquant.engines     where qnnpack and onednn differ: weight packing, bias, requantization (engine=...)
    refquant.qconfig     each engine's default qconfig (which observers watch activations and weights)
    refquant.dynamic     DynamicQuantizedLinear: float in, float out, input qparams chosen per call (4 engines)
    refquant.pipeline    the whole QuantStub -> Linear -> DeQuantStub model, end to end
    refquant.functional  quantized add, add_relu, mul, cat, relu, flatten (QFunctional, nn.ReLU on codes)
    refquant.model       whole eager models: prepare, calibrate, convert, every layer by its torch path
    refquant.fixed_point integer-only requantization (FBGEMM's and TFLite's fixed point), requantization=<variant>
    refquant.export      golden files: a layer's integer program and test vectors for a C or HDL testbench
    refquant.program     a whole model as a golden integer program (steps, constants, vectors, C header), re-run
    refquant.explain     which arithmetic another implementation's codes follow, element by element (explain())

refquant never imports torch; ``crosscheck`` compares it with torch value by value.
"""

from . import _numba_cache

_numba_cache.install()  # before any kernel is defined: without a writable Numba cache, compile uncached (one warning)

from .dtypes import QDTYPES, qdtype_range
from .dynamic import DynamicQuantizedLinear
from .explain import explain  # the function; the module stays importable as `from refquant.explain import ...`
from .histogram import HistogramObserver
from .linear import QuantizedLinear, int32_accumulator_can_overflow
from .pipeline import ObservedLinear, QuantizedLinearModel, linear_float
from .qconfig import QConfig, get_default_qconfig
from .observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from .quantize import dequantize, dequantize_per_channel, quantize_per_channel, quantize_per_tensor

__all__ = [
    "QDTYPES",
    "qdtype_range",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "HistogramObserver",
    "quantize_per_tensor",
    "quantize_per_channel",
    "dequantize",
    "dequantize_per_channel",
    "QuantizedLinear",
    "int32_accumulator_can_overflow",
    "DynamicQuantizedLinear",
    "ObservedLinear",
    "QuantizedLinearModel",
    "linear_float",
    "QConfig",
    "get_default_qconfig",
    "explain",
]
