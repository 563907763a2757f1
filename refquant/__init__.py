"""refquant: a readable NumPy + Numba golden model of PyTorch's fbgemm int8 static quantization.

The path a value takes, one module per step:

    refquant.observers   MinMax-family observers: calibration range -> (scale, zero_point)
    refquant.histogram   HistogramObserver: the fbgemm qconfig's activation observer (L2-optimal clipping)
    refquant.quantize    quantize / dequantize: float32 <-> integer codes, torch 2.13's exact rounding
    refquant.matmul      uint8 x int8 -> int32 products (VNNI, and the int16-saturating pre-VNNI form)
    refquant.linear      QuantizedLinear: int32 accumulation and fbgemm's requantization with float bias
    refquant.pipeline    the whole QuantStub -> Linear -> DeQuantStub model, end to end
    refquant.functional  quantized add, add_relu, mul, cat, relu, flatten (QFunctional, nn.ReLU on codes)
    refquant.model       whole eager models: prepare, calibrate, convert, every layer by its torch path
    refquant.export      a layer's integer program and test vectors for a C or HDL testbench

refquant never imports torch; ``crosscheck`` compares it with torch value by value.
"""

from .dtypes import QDTYPES, qdtype_range
from .histogram import HistogramObserver
from .linear import QuantizedLinear, int32_accumulator_can_overflow
from .pipeline import ObservedLinear, QuantizedLinearModel, linear_float
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
    "ObservedLinear",
    "QuantizedLinearModel",
    "linear_float",
]
