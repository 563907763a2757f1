"""What the torch side of a study records: NumPy arrays and plain Python values only, so the parent process can
receive it from the torch worker without importing torch (see crosscheck.worker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TorchStudy:
    """crosscheck.linear's view of its one-layer ModelRecord (crosscheck.study.torch_study_view builds it): what
    torch's prepare/calibrate/convert produced, under the names the report and the figures read."""

    engine: str
    relu: bool
    weight: np.ndarray  # float32 (N, K), the Linear's weight
    bias: np.ndarray | None  # float32 (N,)
    calibration: list[np.ndarray]  # the calibration batches (float32)
    input_observed: list[np.ndarray]  # what the QuantStub's observer saw, batch by batch
    output_observed: list[np.ndarray]  # what the Linear's output observer saw (torch's float Linear [+ ReLU])
    input_observer: dict  # histogram, min_val, max_val, clip_min, clip_max, scale, zero_point (torch's observer)
    output_observer: dict
    input_scale: np.ndarray  # converted Quantize module's buffers: float32 (1,), int64 (1,)
    input_zero_point: np.ndarray
    output_scale: float  # converted Linear's .scale (a Python float holding a float32 value), .zero_point
    output_zero_point: np.int64
    weight_scales: np.ndarray  # q_per_channel_scales(): float64 (N,)
    weight_zero_points: np.ndarray  # q_per_channel_zero_points(): int64 (N,)
    weight_int8: np.ndarray  # int_repr(): int8 (N, K)
    packed_bias: np.ndarray | None  # the float32 bias the quantized Linear holds
    col_offsets: np.ndarray  # derived: sum_k qw[n,k] - w_zp[n]*K from int_repr(), exact int64 torch ops -> int32
    printed_model: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class ModelRecord:
    """A whole model as torch prepared, calibrated and converted it (crosscheck.torch_model fills it).

    Paths are torch's module paths (``"fc1"``, ``"block.0.fc"``); a module's calls are named ``path``, ``path#2``, ...
    as in refquant.model.
    """

    engine: str
    float_model: Any  # refquant.model.FloatModel: crosscheck.from_torch of the (fused) float model (in a worker
    # forked before refquant was imported, a crosscheck.from_torch.DeferredFloatModel: model_study.receive_model builds it)
    torch_types: dict[str, str]  # path -> the float module's type as torch prints it ("LinearReLU", "QuantStub")
    converted_types: dict[str, str]  # path -> the converted module's type ("QuantizedLinearReLU", "Quantize")
    observed: dict[str, list[np.ndarray]]  # observer owner path -> what its activation_post_process saw, in order
    observers: dict[str, dict]  # path -> histogram, min_val, max_val, clip_min, clip_max, scale, zero_point, ...
    converted: dict[str, dict]  # path -> the converted module's stored values (see torch_model.converted_values)
    qconfig: str  # how the qconfig was made, e.g. "get_default_qconfig('fbgemm')"
    printed_model: str = ""
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what the model source reports (name, training, data)


@dataclass
class BatchRecord:
    """One batch through torch's converted model (and its float model), every computing call recorded."""

    set: str  # "calibration" or "evaluation"
    x: np.ndarray  # the float32 input
    calls: dict[str, np.ndarray]  # call name -> output: uint8 codes (int_repr) or float32
    qparams: dict[str, tuple | None]  # call name -> (q_scale(), q_zero_point()) of its output, None for floats
    accumulators: dict[str, np.ndarray]  # Linear call -> int32 raw, derived from torch's integers (exact int64 ops)
    kernels: dict[str, str]  # Linear call -> the kernel family it ran ("vnni", "avx2", "exact", oneDNN's)
    output: np.ndarray  # the converted model's output
    float_output: np.ndarray  # the float model's output on x
    labels: np.ndarray | None = None
