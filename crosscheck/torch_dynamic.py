"""The torch side of the dynamic study (``python -m crosscheck.linear --dynamic``): one ``nn.Linear`` quantized the
standard way, then called once per sample::

    torch.backends.quantized.engine = engine                       # fbgemm, x86, qnnpack or onednn
    torch.manual_seed(seed);  model = nn.Sequential(nn.Linear(K, N))
    quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)                 # default_dynamic_qconfig
              = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)  # per channel
    for x in samples: quantized(x)                                  # one call per sample: its own qparams

Recorded: the float weight and bias, torch's quantized weight (``int_repr()``, scales, zero points) and bias, and for
every call the float output. What torch computes inside ``quantized::linear_dynamic`` and does not return is
derived from torch's own ops on the same input, the way the op computes it (crosscheck.compare's "derived" rows):

    x_min, x_max   torch.aminmax(x)                                   (the op: fbgemm::FindMinMax, or min()/max())
    scale, zp      torch._choose_qparams_per_tensor(x, reduce_range)  (the op's quant_utils::ChooseQuantizationParams;
                   reduce_range = True as the module passes it, False on qnnpack, which ignores it and warns)
    input codes    torch.quantize_per_tensor(x, scale, zp, quint8)    (fbgemm, x86, qnnpack quantize exactly so;
                   oneDNN quantizes inside its own reorder, which no torch op exposes: not derived)
    accumulators   Σ_k (q_x − z_x)·(q_w − z_w) from those codes and torch's int_repr(), exact int64 ops, wrapped to
                   int32 (not on onednn)

On onednn the worker also reads oneDNN's verbose line of every call (crosscheck.runner.capture_fd), so the
study knows which matmul kernel oneDNN ran (its AMX kernel multiplies by the combined scale, the others by the two
scales in turn: refquant.dynamic, eqs. DQ5c/DQ5d, chosen by shape on AMX CPUs).

The data comes from torch's generator after ``torch.manual_seed(seed)``: the Linear's initialisation, then the
samples, drawn in the same chunks as crosscheck.linear's samples (so a seed gives the same weight and inputs as
the static study's samples). The bias is always drawn and then removed for ``--no-bias``, as there.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .runner import capture_fd, cpp_warnings, onednn_matmul_impls
from .torch_study import sample_chunks, torch_environment  # the distributions: torch_study.draw
from .worker import UsageError


def _warnings_text(caught) -> list[str]:
    return sorted({" ".join(str(x.message).split("\n")[0].split()) for x in caught})


def quantize_dynamic_module(weight: torch.Tensor | None, config) -> tuple[nn.Module, nn.Module, list[str]]:
    """(float model, quantized model, torch's warnings): nn.Sequential(nn.Linear) drawn from the seed (or given
    ``weight``), quantized by ``quantize_dynamic`` with the qconfig of ``config.weight_qscheme``."""
    linear = nn.Linear(config.in_features, config.out_features)  # with a bias: the generator advances the same
    if not config.bias:
        linear.bias = None
    float_model = nn.Sequential(linear).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if config.weight_qscheme == "per_channel_symmetric":
            spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        else:
            spec = {nn.Linear}  # default_dynamic_qconfig, as the tutorials write it
        quantized = torch.ao.quantization.quantize_dynamic(float_model, spec, dtype=torch.qint8)  # a copy
    return float_model, quantized, _warnings_text(caught)


def torch_weight(module: nn.Module) -> dict[str, np.ndarray]:
    """int8 codes, float64 scales (one, or one per channel) and int64 zero points of a quantized Linear's weight."""
    qw = module.weight()
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = qw.q_per_channel_scales().numpy().astype(np.float64)
        zero_points = qw.q_per_channel_zero_points().numpy().astype(np.int64)
    else:
        scales = np.array([qw.q_scale()], np.float64)
        zero_points = np.array([qw.q_zero_point()], np.int64)
    bias = module.bias()
    return {"weight_int8": qw.int_repr().numpy().copy(), "weight_scales": scales,
            "weight_zero_points": zero_points, "qscheme": str(qw.qscheme()).replace("torch.", ""),
            "packed_bias": None if bias is None else bias.detach().numpy().copy()}


def derived_accumulators(codes_u8: np.ndarray, zero_point: int, weight_int8: np.ndarray,
                         weight_zero_points: np.ndarray) -> np.ndarray:
    """Σ_k (q_x − z_x)·(q_w − z_w) with exact int64 torch ops, wrapped to int32 (what the op holds before its float
    output); ``codes_u8`` (..., K) -> (..., N)."""
    K, N = weight_int8.shape[1], weight_int8.shape[0]
    qx = torch.from_numpy(np.ascontiguousarray(codes_u8)).reshape(-1, K).to(torch.int64) - int(zero_point)
    qw = torch.from_numpy(np.ascontiguousarray(weight_int8)).to(torch.int64)
    qw = qw - torch.from_numpy(np.broadcast_to(weight_zero_points, (N,)).copy()).to(torch.int64)[:, None]
    raw = qx @ qw.T
    raw = ((raw + 2**31) % 2**32) - 2**31  # int32's wrap, exactly
    return raw.to(torch.int32).numpy().reshape(*codes_u8.shape[:-1], N)


def torch_events(config, where: str = "") -> Iterator[tuple[str, Any]]:
    """("environment", dict), ("layer", dict), then one ("samples", chunk) per chunk of samples, each a dict of
    NumPy arrays stacked over the chunk's calls: "x", "output", "float_output", "x_min_max", "input_scale",
    "input_zero_point", "input_codes" and "accumulators" (None on onednn), "onednn_impls" (onednn only)."""
    yield "environment", torch_environment(where)
    engine = config.engine
    if engine not in torch.backends.quantized.supported_engines:
        raise UsageError(f"engine {engine!r} is not supported by this torch build "
                         f"(torch.backends.quantized.supported_engines = {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = engine
    torch.manual_seed(config.seed)
    float_model, quantized, caught = quantize_dynamic_module(None, config)
    linear, qlinear = float_model[0], quantized[0]
    layer = {
        "weight": linear.weight.detach().numpy().copy(),
        "bias": None if linear.bias is None else linear.bias.detach().numpy().copy(),
        "module": type(qlinear).__module__ + "." + type(qlinear).__name__,
        "printed_model": str(quantized),
        **torch_weight(qlinear),
    }
    reduce_range = engine != "qnnpack"  # the module passes True; qnnpack ignores it (and warns)
    w_i8, w_zp = layer["weight_int8"], layer["weight_zero_points"]

    calls_warnings: list[str] = []
    for xs in sample_chunks(config.calib_dist, config.input_shape, config.samples):
        n = xs.shape[0]

        def run_calls():
            def calls():
                with torch.no_grad(), warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    out = [quantized(xs[i]) for i in range(n)]
                calls_warnings.extend(_warnings_text(w))
                return out
            out, err = capture_fd(calls, 2)  # torch's C++ warnings (qnnpack's reduce_range one) land on fd 2
            calls_warnings.extend(cpp_warnings(err))
            return out

        impls = None
        if engine == "onednn":
            def verbose_calls():
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    return run_calls()
            outputs, text = capture_fd(verbose_calls)
            impls = onednn_matmul_impls(text)
            if len(impls) != n:
                raise RuntimeError(f"expected one oneDNN matmul per call in the verbose output, got {len(impls)} "
                                   f"for {n} calls")
        else:
            outputs = run_calls()
        chunk: dict[str, Any] = {"x": xs.numpy(), "output": torch.stack(outputs).numpy(), "onednn_impls": impls}
        with torch.no_grad():
            chunk["float_output"] = torch.stack([float_model(xs[i]) for i in range(n)]).numpy()
        mm = np.empty((n, 2), np.float32)
        scales = np.empty(n, np.float64)
        zps = np.empty(n, np.int64)
        codes = np.empty(xs.shape, np.uint8) if engine != "onednn" else None
        for i in range(n):
            lo, hi = torch.aminmax(xs[i])
            mm[i] = (lo.item(), hi.item())
            scales[i], zps[i] = torch._choose_qparams_per_tensor(xs[i], reduce_range)
            if codes is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch 2.13 deprecates the quantized dtypes
                    q = torch.quantize_per_tensor(xs[i], float(scales[i]), int(zps[i]), torch.quint8)
                codes[i] = q.int_repr().numpy()
        chunk.update(x_min_max=mm, input_scale=scales, input_zero_point=zps, input_codes=codes)
        chunk["accumulators"] = None if codes is None else np.stack(
            [derived_accumulators(codes[i], int(zps[i]), w_i8, w_zp) for i in range(n)])
        if layer is not None:  # the layer record goes out once, with the warnings of the first calls
            layer["warnings"] = sorted(set(caught) | set(calls_warnings))
            yield "layer", layer
            layer = None
        yield "samples", chunk
    if layer is not None:  # --samples 0
        layer["warnings"] = caught
        yield "layer", layer
