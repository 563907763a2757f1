"""What the torch side of a study records: NumPy arrays and plain Python values only, so the parent process can
receive it from the torch worker without importing torch (see crosscheck.worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TorchStudy:
    """Everything torch's prepare/calibrate/convert produced, as NumPy arrays (crosscheck.torch_study fills it)."""

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
