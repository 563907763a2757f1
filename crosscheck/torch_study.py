"""The torch side of the study: eager post-training static quantization of one ``nn.Linear``, done the standard way.

    model = QuantStub -> Linear (or Linear + ReLU, fused to LinearReLU) -> DeQuantStub
    torch.backends.quantized.engine = engine            # "fbgemm" or "x86"
    model.qconfig = get_default_qconfig(engine)          # HistogramObserver(reduce_range=True) for activations,
                                                         # PerChannelMinMaxObserver(qint8, per_channel_symmetric)
    prepared = prepare(model)                            # for the weight
    for x in calibration_batches: prepared(x)
    quantized = convert(prepared)

Besides running it, this module records what refquant needs to repeat the study from the same data: the float
weight and bias, the float activations each activation observer saw (forward pre-hooks on the observer modules, so
refquant's observers are fed exactly the same float32 values, including torch's MKL float Linear output), the
observers' histograms, ranges and chosen clip ranges, and every stored quantized value of the converted model.

The torch side can run in a worker process (:func:`torch_events_in_subprocess`), so that torch's import and work
overlap with refquant's on a second core; it then sends only NumPy arrays. :func:`torch_events` is the same
sequence in-process.

All random data comes from torch's global generator after ``torch.manual_seed(seed)``, in this order: the Linear's
default initialisation, the calibration batches, then the evaluation samples. With the defaults this is exactly the
study ``torch.manual_seed(0); Linear(3, 3); prepared(torch.randn(1, 2, 3, 3))``. The Linear is always built with a
bias, which ``bias=False`` then removes (``linear.bias = None``, what ``nn.Linear(..., bias=False)`` holds): its
initialisation draws from the generator, so the same seed gives the same weight, calibration batches and samples
with and without a bias.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .torch_record import TorchStudy
from .worker import UsageError

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


def sample_chunk_rows(input_shape: tuple[int, ...]) -> int:
    """How many ``input_shape`` samples are drawn and evaluated at once (about 2^16 values per chunk)."""
    return max(1, (1 << 16) // math.prod(input_shape))


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


def _observer_state(obs, clip: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    scale, zero_point = obs.calculate_qparams() if clip is None else obs._calculate_qparams(*clip)
    return {
        "histogram": obs.histogram.numpy().copy(),
        "min_val": obs.min_val.numpy().copy(),
        "max_val": obs.max_val.numpy().copy(),
        "clip_min": None if clip is None else clip[0].numpy().copy(),
        "clip_max": None if clip is None else clip[1].numpy().copy(),
        "scale": scale.numpy().copy(),
        "zero_point": zero_point.numpy().copy(),
        "quant_min": obs.quant_min,
        "quant_max": obs.quant_max,
        "reduce_range": obs.reduce_range,
    }


def quantized_forward(quantized_model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The converted model, stage by stage: input codes (uint8), output codes (uint8), dequantized output."""
    m = quantized_model
    with torch.no_grad():
        qx = m.quant(x)
        qy = m.fc(qx)  # LinearReLU when fused: the ReLU is inside the quantized op
        y = m.dequant(qy)
    return {"input_codes": qx.int_repr().numpy(), "output_codes": qy.int_repr().numpy(), "output": y.numpy()}


def float_forward(float_model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The float model (stubs are identities before prepare): torch's fp32 Linear [+ ReLU]."""
    with torch.no_grad():
        return float_model(x).numpy()


def derived_col_offsets(weight_int8: np.ndarray, weight_zero_points: np.ndarray) -> np.ndarray:
    """col_offsets[n] = sum_k qw[n,k] - w_zp[n]*K from torch's int8 weights with exact int64 torch ops, as int32."""
    qw = torch.from_numpy(np.ascontiguousarray(weight_int8)).to(torch.int64)
    w_zp = torch.from_numpy(np.asarray(weight_zero_points)).to(torch.int64)
    return (qw.sum(dim=1) - w_zp * weight_int8.shape[1]).to(torch.int32).numpy()


def derived_accumulators(input_codes_u8: np.ndarray, weight_int8: np.ndarray, input_zero_point: int,
                         weight_zero_points: np.ndarray, saturate_int16_pairs: bool = False) -> np.ndarray:
    """int32 accumulators from torch's own integer tensors with exact int64 torch ops (then wrapped to int32).

    raw[m, n] = sum_k qx[m,k]*qw[n,k] - x_zp*col_offsets[n] - w_zp[n]*sum_k qx[m,k]  (fbgemm does not expose them)

    With ``saturate_int16_pairs`` (fbgemm's "avx2" kernel family, crosscheck.isa) the first sum is the one
    ``vpmaddubsw`` forms: sum_j clamp(qx[m,2j]*qw[n,2j] + qx[m,2j+1]*qw[n,2j+1], -32768, 32767), K padded with a
    zero column when odd (refquant.matmul eq. M2).
    """
    K = weight_int8.shape[1]
    qx = torch.from_numpy(np.ascontiguousarray(input_codes_u8)).reshape(-1, K).to(torch.int64)
    qw = torch.from_numpy(np.ascontiguousarray(weight_int8)).to(torch.int64)
    w_zp = torch.from_numpy(np.asarray(weight_zero_points)).to(torch.int64)
    col_offsets = qw.sum(dim=1) - w_zp * K
    if saturate_int16_pairs:
        qx_even = torch.nn.functional.pad(qx, (0, K % 2))
        qw_even = torch.nn.functional.pad(qw, (0, K % 2))
        acc = torch.zeros(qx.shape[0], qw.shape[0], dtype=torch.int64)
        for j in range(0, qx_even.shape[1], 2):
            pair = torch.outer(qx_even[:, j], qw_even[:, j]) + torch.outer(qx_even[:, j + 1], qw_even[:, j + 1])
            acc += pair.clamp(-32768, 32767)
    else:
        acc = qx @ qw.T
    raw = acc - input_zero_point * col_offsets - qx.sum(dim=1, keepdim=True) * w_zp
    lead = input_codes_u8.shape[:-1]
    return raw.to(torch.int32).numpy().reshape(*lead, weight_int8.shape[0])


def run_torch_study(*, in_features: int, out_features: int, input_shape: tuple[int, ...], calib_batches: int,
                    calib_dist: str, seed: int, relu: bool, bias: bool,
                    engine: str) -> tuple[TorchStudy, nn.Module, nn.Module]:
    """Build, prepare, calibrate and convert the model exactly as the study does, recording every value.

    Returns the record, the float model and the quantized model."""
    if engine not in torch.backends.quantized.supported_engines:
        raise UsageError(f"engine {engine!r} is not supported by this torch build "
                         f"(torch.backends.quantized.supported_engines = {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        linear = nn.Linear(in_features, out_features)  # with a bias: the generator advances the same either way
        if not bias:
            linear.bias = None  # as nn.Linear(..., bias=False) registers it
        float_model = StudyModel(linear, relu).eval()
        calibration = [draw(calib_dist, input_shape) for _ in range(calib_batches)]

        float_model.qconfig = torch.ao.quantization.get_default_qconfig(engine)
        to_prepare = float_model
        if relu:
            to_prepare = torch.ao.quantization.fuse_modules(float_model, [["fc", "relu"]])  # -> LinearReLU
        prepared = torch.ao.quantization.prepare(to_prepare)  # a copy: float_model stays float

        # Record what each activation observer sees: a forward pre-hook on the observer module itself.
        in_obs = prepared.quant.activation_post_process
        out_obs = prepared.fc.activation_post_process
        input_observed: list[np.ndarray] = []
        output_observed: list[np.ndarray] = []
        in_obs.register_forward_pre_hook(lambda mod, args: input_observed.append(args[0].detach().numpy().copy()))
        out_obs.register_forward_pre_hook(lambda mod, args: output_observed.append(args[0].detach().numpy().copy()))
        with torch.no_grad():
            for x in calibration:
                prepared(x)

        # Keep the clip range each HistogramObserver chooses inside convert() (its _non_linear_param_search).
        clips: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for obs in (in_obs, out_obs):
            search = obs._non_linear_param_search

            def recording_search(search=search, key=id(obs)):
                clips[key] = search()
                return clips[key]

            obs._non_linear_param_search = recording_search
        quantized = torch.ao.quantization.convert(prepared, inplace=True)
        for obs in (in_obs, out_obs):
            del obs._non_linear_param_search
        caught = sorted({" ".join(str(x.message).split("\n")[0].split()) for x in w})

    fc = quantized.fc
    qweight = fc.weight()
    packed_bias = fc.bias()
    linear = float_model.fc
    record = TorchStudy(
        engine=engine,
        relu=relu,
        weight=linear.weight.detach().numpy().copy(),
        bias=None if linear.bias is None else linear.bias.detach().numpy().copy(),
        calibration=[x.numpy() for x in calibration],
        input_observed=input_observed,
        output_observed=output_observed,
        input_observer=_observer_state(in_obs, clips.get(id(in_obs))),
        output_observer=_observer_state(out_obs, clips.get(id(out_obs))),
        input_scale=quantized.quant.scale.numpy().copy(),
        input_zero_point=quantized.quant.zero_point.numpy().copy(),
        output_scale=float(fc.scale),  # a Python float: float(float32 observer scale)
        output_zero_point=np.int64(fc.zero_point),
        weight_scales=qweight.q_per_channel_scales().numpy().copy(),
        weight_zero_points=qweight.q_per_channel_zero_points().numpy().copy(),
        weight_int8=qweight.int_repr().numpy().copy(),
        packed_bias=None if packed_bias is None else packed_bias.detach().numpy().copy(),
        col_offsets=derived_col_offsets(qweight.int_repr().numpy(), qweight.q_per_channel_zero_points().numpy()),
        printed_model=str(quantized),
        warnings=caught,
    )
    return record, float_model, quantized


def sample_chunks(dist: str, input_shape: tuple[int, ...], samples: int) -> Iterator[torch.Tensor]:
    """The evaluation inputs, ``samples`` tensors of ``input_shape``, drawn chunk by chunk as (rows, *input_shape)."""
    rows = sample_chunk_rows(input_shape)
    done = 0
    while done < samples:
        n = min(rows, samples - done)
        yield draw(dist, (n, *input_shape))
        done += n


def torch_environment(where: str = "") -> dict:
    """What changes torch's numbers (numerics.md, 'What changes these numbers'), seen from torch, with the kernel
    family of fbgemm's int8 GEMM found by crosscheck.isa's probe."""
    import os

    from .isa import ENV_VAR, probe_description, torch_fbgemm_kernel_family

    family = torch_fbgemm_kernel_family()
    return {
        "torch": str(torch.__version__),  # TorchVersion would make the parent import torch to unpickle it
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "torch_vnni": bool(torch.cpu._is_vnni_supported()),
        "torch_threads": torch.get_num_threads(),
        "fbgemm_kernel": family,
        "fbgemm_kernel_detected_by": probe_description(family),
        "fbgemm_enable_instructions": os.environ.get(ENV_VAR),
        "torch_side": where,
    }


def torch_events(config, where: str = "") -> Iterator[tuple[str, Any]]:
    """The whole torch side as a sequence of (kind, payload) events, NumPy arrays only:

    ("environment", dict), ("study", TorchStudy), then one ("calibration", batch) per calibration batch and one
    ("samples", chunk) per chunk of the evaluation inputs, each batch/chunk a dict with the input "x",
    "input_codes", "accumulators" (derived), "output_codes", "output" and "float_output".
    """
    yield "environment", torch_environment(where)
    record, float_model, quantized = run_torch_study(**config.torch_kwargs())
    yield "study", record
    x_zp = int(record.input_zero_point[0])
    from .isa import saturate_int16_pairs, torch_fbgemm_kernel_family

    saturate = saturate_int16_pairs(torch_fbgemm_kernel_family())

    def forward(x: torch.Tensor) -> dict[str, np.ndarray]:
        out = quantized_forward(quantized, x)
        out["accumulators"] = derived_accumulators(out["input_codes"], record.weight_int8, x_zp,
                                                   record.weight_zero_points, saturate)
        out["float_output"] = float_forward(float_model, x)
        out["x"] = x.numpy()
        return out

    for x in record.calibration:
        yield "calibration", forward(torch.from_numpy(x))
    for x in sample_chunks(config.calib_dist, config.input_shape, config.samples):
        yield "samples", forward(x)


def _worker(config, conn, where: str = "worker process") -> None:
    """Worker process: send every event of :func:`torch_events` through ``conn``; an exception as ("error", text)."""
    try:
        for event in torch_events(config, where):
            conn.send(event)
        conn.send(("done", None))
    except UsageError as e:
        conn.send(("usage_error", str(e)))
    except BaseException:  # pragma: no cover - reported by the parent
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
