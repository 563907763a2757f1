"""The torch side of the study: eager post-training static quantization of one ``nn.Linear``, done the standard way.

    model = QuantStub -> Linear (or Linear + ReLU, fused to LinearReLU) -> DeQuantStub
    torch.backends.quantized.engine = engine            # "fbgemm" or "x86"
    model.qconfig = get_default_qconfig(engine)          # HistogramObserver(reduce_range=True) for activations,
                                                         # PerChannelMinMaxObserver(qint8, per_channel_symmetric)
    prepared = prepare(model)                            # for the weight
    for x in calibration_batches: prepared(x)
    quantized = convert(prepared)

This module builds the model and its data; the recording is the model study's (crosscheck.torch_model.model_events:
what every activation observer saw, the observers' histograms, ranges and chosen clip ranges, every stored value of
the converted model, and every layer's outputs on the calibration batches and the samples), so the one-layer study
and ``python -m crosscheck.model`` share one torch side. It runs in the torch worker (crosscheck.worker) and sends
only NumPy arrays.

All random data comes from torch's global generator after ``torch.manual_seed(seed)``, in this order: the Linear's
default initialisation, the calibration batches, then the evaluation samples. With the defaults this is exactly the
study ``torch.manual_seed(0); Linear(3, 3); prepared(torch.randn(1, 2, 3, 3))``. The Linear is always built with a
bias, which ``bias=False`` then removes (``linear.bias = None``, what ``nn.Linear(..., bias=False)`` holds): its
initialisation draws from the generator, so the same seed gives the same weight, calibration batches and samples
with and without a bias.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .study import sample_chunk_rows
from .torch_model import (  # noqa: F401  (re-exported: the recording is the model study's)
    check_engine,
    derived_accumulators,
    derived_col_offsets,
    model_events,
    torch_environment,
)
from .torch_model import observer_state as _observer_state  # noqa: F401  (the name crosscheck.engines imports)

DISTRIBUTIONS = ("normal", "uniform", "laplace", "outliers", "relu")


def draw(dist: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Random float32 data from torch's global generator.

    normal: N(0, 1) (``torch.randn``); uniform: U[-1, 1); laplace: Laplace(0, 1) (``torch.distributions``);
    outliers: N(0, 1) with about 1% of the elements multiplied by 20; relu: ``relu(N(0, 1))`` (half zeros, as after
    a ReLU).
    """
    if dist == "normal":
        return torch.randn(shape)
    if dist == "uniform":
        return torch.rand(shape) * 2 - 1
    if dist == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample(shape)
    if dist == "outliers":
        x = torch.randn(shape)
        outlier = torch.rand(shape) < 0.01
        return torch.where(outlier, x * 20, x)
    if dist == "relu":
        return torch.randn(shape).clamp_min(0)
    raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")


class StudyModel(nn.Module):
    """QuantStub -> Linear [-> ReLU] -> DeQuantStub: the eager model of the study."""

    def __init__(self, linear: nn.Linear, relu: bool):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.fc = linear
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.relu(self.fc(self.quant(x))))


def sample_chunks(dist: str, input_shape: tuple[int, ...], samples: int) -> Iterator[torch.Tensor]:
    """The evaluation inputs, ``samples`` tensors of ``input_shape``, drawn chunk by chunk as (rows, *input_shape)."""
    rows = sample_chunk_rows(input_shape)
    done = 0
    while done < samples:
        n = min(rows, samples - done)
        yield draw(dist, (n, *input_shape))
        done += n


def float_forward(float_model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The float model (stubs are identities before prepare): torch's fp32 Linear [+ ReLU]."""
    with torch.no_grad():
        return float_model(x).numpy()


def build(config) -> tuple[nn.Module, list[torch.Tensor], Iterator, list[list[str]] | None]:
    """The study's float model, calibration batches and (lazily drawn) samples, in the generator's order: the
    Linear's initialisation, the calibration batches, then the samples (drawn after convert, which draws nothing)."""
    check_engine(config.engine)
    torch.manual_seed(config.seed)
    linear = nn.Linear(config.in_features, config.out_features)  # with a bias: the generator advances the same
    if not config.bias:
        linear.bias = None  # as nn.Linear(..., bias=False) registers it
    float_model = StudyModel(linear, config.relu).eval()
    calibration = [draw(config.calib_dist, config.input_shape) for _ in range(config.calib_batches)]
    samples = ((x, None) for x in sample_chunks(config.calib_dist, config.input_shape, config.samples))
    return float_model, calibration, samples, [["fc", "relu"]] if config.relu else None


def torch_events(config, where: str = "") -> Iterator[tuple[str, Any]]:
    """The whole torch side as (kind, payload) events, NumPy arrays only (crosscheck.torch_model.model_events):
    ("environment", dict), ("model", ModelRecord), then one ("batch", BatchRecord) per calibration batch (set
    "calibration") and per chunk of the samples (set "evaluation")."""
    float_model, calibration, samples, fusions = build(config)
    yield from model_events(float_model, calibration, samples, config.engine, fusions=fusions,
                            info={"name": "linear"}, where=where)
