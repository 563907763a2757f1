"""The torch side of ``python -m crosscheck.engines``: one float layer and one data set through every static engine.

    torch.manual_seed(seed)
    linear = nn.Linear(K, N);  calibration = [draw(dist, input_shape) for each batch];  samples (chunks)
    for engine in fbgemm, x86, qnnpack, onednn:                       (a) each engine with its own default qconfig
        torch.backends.quantized.engine = engine
        model = QuantStub -> linear [ReLU] -> DeQuantStub;  model.qconfig = get_default_qconfig(engine)
        prepared = prepare(model);  prepared(batch) for each calibration batch;  quantized[engine] = convert(prepared)
    for engine in ...:                                                (b) all with fbgemm's qparams and weights
        packed = torch.ops.quantized.linear_prepack(fbgemm's quantized weight, bias)   on that engine
        y_u8 = torch.ops.quantized.linear[_relu](q_x, packed, s_y, z_y)          q_x, s_y, z_y: fbgemm's

    for engine in ...:                                                (d) the dynamic Linear of each engine
        dynamic[engine] = quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)

Every engine sees the same float weight, the same calibration batches and the same samples. Recorded per engine,
as crosscheck.torch_study records its one engine: what each activation observer saw, its histogram, range and
chosen clip range, the converted model's qparams, int8 weight (per channel, or per tensor on qnnpack), bias; and per
chunk of data the input codes, the int32 accumulators (derived from torch's codes and int_repr() with exact int64
ops: no engine exposes them), the output codes and dequantized outputs. On onednn the worker reads oneDNN's verbose
line of every call (crosscheck.runner.capture_fd), which names the matmul kernel oneDNN ran (AMX or not; VNNI or
not), since the engine's arithmetic depends on it (refquant.engines eqs. DN4, DN5).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .runner import capture_fd, cpp_warnings, onednn_impl_kind, onednn_matmul_impls
from .torch_study import (StudyModel, _observer_state, derived_accumulators, derived_col_offsets, draw,
                          sample_chunks, torch_environment)
from .worker import UsageError

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")


def _warnings_text(caught) -> list[str]:
    return sorted({" ".join(str(x.message).split("\n")[0].split()) for x in caught})


class quantized_engine:
    """``with quantized_engine("qnnpack"):`` sets torch.backends.quantized.engine for the block."""

    def __init__(self, engine: str):
        self.engine = engine

    def __enter__(self):
        self.previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.previous


def torch_weight(qweight: torch.Tensor) -> dict[str, Any]:
    """int8 codes, float64 scales ((N,) per channel, (1,) per tensor), int64 zero points, and which."""
    if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return {"weight_int8": qweight.int_repr().numpy().copy(), "per_channel": True,
                "weight_scales": qweight.q_per_channel_scales().numpy().astype(np.float64),
                "weight_zero_points": qweight.q_per_channel_zero_points().numpy().astype(np.int64)}
    return {"weight_int8": qweight.int_repr().numpy().copy(), "per_channel": False,
            "weight_scales": np.array([qweight.q_scale()], np.float64),
            "weight_zero_points": np.array([qweight.q_zero_point()], np.int64)}


def static_flow(engine: str, linear: nn.Linear, relu: bool, calibration: list[torch.Tensor]) -> tuple[nn.Module, dict]:
    """prepare / calibrate / convert with get_default_qconfig(engine) on a copy of the float model; the record."""
    with quantized_engine(engine), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        float_model = StudyModel(linear, relu).eval()
        float_model.qconfig = torch.ao.quantization.get_default_qconfig(engine)
        to_prepare = torch.ao.quantization.fuse_modules(float_model, [["fc", "relu"]]) if relu else float_model
        prepared = torch.ao.quantization.prepare(to_prepare)  # a copy: the float Linear is shared by no one
        in_obs = prepared.quant.activation_post_process
        out_obs = prepared.fc.activation_post_process
        input_observed: list[np.ndarray] = []
        output_observed: list[np.ndarray] = []
        in_obs.register_forward_pre_hook(lambda mod, args: input_observed.append(args[0].detach().numpy().copy()))
        out_obs.register_forward_pre_hook(lambda mod, args: output_observed.append(args[0].detach().numpy().copy()))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        clips: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for obs in (in_obs, out_obs):  # keep the clip range each HistogramObserver chooses inside convert()
            search = obs._non_linear_param_search

            def recording_search(search=search, key=id(obs)):
                clips[key] = search()
                return clips[key]

            obs._non_linear_param_search = recording_search
        quantized = torch.ao.quantization.convert(prepared, inplace=True)
        for obs in (in_obs, out_obs):
            del obs._non_linear_param_search
    fc = quantized.fc
    w = torch_weight(fc.weight())
    bias = fc.bias()
    record = {
        "engine": engine,
        "qconfig_reduce_range": bool(in_obs.reduce_range),
        "input_observed": input_observed,
        "output_observed": output_observed,
        "input_observer": _observer_state(in_obs, clips.get(id(in_obs))),
        "output_observer": _observer_state(out_obs, clips.get(id(out_obs))),
        "input_scale": quantized.quant.scale.numpy().copy(),
        "input_zero_point": quantized.quant.zero_point.numpy().copy(),
        "output_scale": float(fc.scale),
        "output_zero_point": np.int64(fc.zero_point),
        **w,
        "packed_bias": None if bias is None else bias.detach().numpy().copy(),
        "col_offsets": derived_col_offsets(w["weight_int8"], w["weight_zero_points"]),
        "warnings": _warnings_text(caught),
    }
    return quantized, record


def _dynamic_weight(module: nn.Module) -> dict:
    """A dynamic Linear's weight (int8 codes, float64 scale, int64 zero point) and bias, as torch holds them."""
    w = torch_weight(module.weight())
    bias = module.bias()
    w["packed_bias"] = None if bias is None else bias.detach().numpy().copy()
    return w


def _call(engine: str, fn) -> tuple[Any, str | None, list[str]]:
    """Run one quantized op on ``engine``: (result, oneDNN's matmul implementation or None, C++ warnings)."""
    def run():
        with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if engine != "onednn":
                return fn()
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                return fn()

    impl = None
    if engine == "onednn":
        (y, err), text = capture_fd(lambda: capture_fd(run, 2))
        impls = onednn_matmul_impls(text)
        if len(impls) != 1:
            raise RuntimeError(f"expected one oneDNN matmul in the verbose output of one call, got {impls}")
        impl = impls[0]
    else:
        y, err = capture_fd(run, 2)
    return y, impl, cpp_warnings(err)


def torch_events(config, where: str = "") -> Iterator[tuple[str, Any]]:
    """("environment", dict), ("layer", dict: the float weight and bias and one record per engine), then one
    ("calibration", chunk) per calibration batch and one ("samples", chunk) per chunk of samples: a dict with the
    input "x", the float model's "float_output", and "own" / "shared": {engine: {"input_codes" (own only),
    "accumulators", "output_codes", "output" (own only), "onednn_impl"}}, "dynamic": {engine: {"output",
    "onednn_impl"}} (one call of the dynamic Linear per chunk)."""
    env = torch_environment(where)
    yield "environment", env
    missing = [e for e in ENGINES if e not in torch.backends.quantized.supported_engines]
    if missing:
        raise UsageError(f"engine(s) {missing} not supported by this torch build "
                         f"(torch.backends.quantized.supported_engines = {torch.backends.quantized.supported_engines})")
    from .isa import saturate_int16_pairs

    fbgemm_pairs = saturate_int16_pairs(env["fbgemm_kernel"])
    torch.manual_seed(config.seed)
    linear = nn.Linear(config.in_features, config.out_features)
    if not config.bias:
        linear.bias = None
    float_model = StudyModel(linear, config.relu).eval()
    calibration = [draw(config.calib_dist, config.input_shape) for _ in range(config.calib_batches)]
    quantized: dict[str, nn.Module] = {}
    records: dict[str, dict] = {}
    for engine in ENGINES:
        quantized[engine], records[engine] = static_flow(engine, linear, config.relu, calibration)
    fb = quantized["fbgemm"]
    shared_weight = fb.fc.weight()
    shared_bias = fb.fc.bias()
    s_y, z_y = float(fb.fc.scale), int(fb.fc.zero_point)
    op = torch.ops.quantized.linear_relu if config.relu else torch.ops.quantized.linear
    packed: dict[str, Any] = {}
    for engine in ENGINES:
        with quantized_engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed[engine] = torch.ops.quantized.linear_prepack(shared_weight, shared_bias)
    dynamic: dict[str, nn.Module] = {}
    dynamic_records: dict[str, dict] = {}
    for engine in ENGINES:
        with quantized_engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic[engine] = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear},
                                                                     dtype=torch.qint8)
        dynamic_records[engine] = _dynamic_weight(dynamic[engine][0])
    yield "layer", {"weight": linear.weight.detach().numpy().copy(), "dynamic": dynamic_records,
                    "bias": None if linear.bias is None else linear.bias.detach().numpy().copy(),
                    "engines": records, "printed_models": {e: str(q) for e, q in quantized.items()}}

    cpp: set[str] = set()

    def pairs(engine: str, impl: str | None) -> bool:
        if engine in ("fbgemm", "x86"):
            return fbgemm_pairs
        return engine == "onednn" and onednn_impl_kind(impl) in ("no_vnni", "gemm")

    def restart(engine: str, impl: str | None) -> int | None:
        """Where gemm:jit's int16 pairs start afresh (its second K block), else None."""
        from refquant.engines import onednn_gemm_pairs_restart

        gemm = engine == "onednn" and onednn_impl_kind(impl) == "gemm"
        return onednn_gemm_pairs_restart(config.in_features) if gemm else None

    def chunk(x: torch.Tensor) -> dict:
        out: dict[str, Any] = {"x": x.numpy(), "own": {}, "shared": {}}
        with torch.no_grad():
            out["float_output"] = float_model(x).numpy()
        for engine in ENGINES:
            q, rec = quantized[engine], records[engine]
            with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qx = q.quant(x)
            qy, impl, w = _call(engine, lambda: q.fc(qx))
            cpp.update(w)
            with torch.no_grad():
                y = q.dequant(qy)
            codes = qx.int_repr().numpy()
            out["own"][engine] = {
                "input_codes": codes, "output_codes": qy.int_repr().numpy(), "output": y.numpy(),
                "accumulators": derived_accumulators(codes, rec["weight_int8"], int(rec["input_zero_point"][0]),
                                                     rec["weight_zero_points"], pairs(engine, impl),
                                                     restart(engine, impl)),
                "onednn_impl": impl}
        qx = None
        with quantized_engine("fbgemm"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = fb.quant(x)  # fbgemm's input codes (the QuantStub is the same op on every engine)
        codes = qx.int_repr().numpy()
        rec = records["fbgemm"]
        for engine in ENGINES:
            qy, impl, w = _call(engine, lambda: op(qx, packed[engine], s_y, z_y))
            cpp.update(w)
            out["shared"][engine] = {
                "output_codes": qy.int_repr().numpy(),
                "accumulators": derived_accumulators(codes, rec["weight_int8"], int(rec["input_zero_point"][0]),
                                                     rec["weight_zero_points"], pairs(engine, impl),
                                                     restart(engine, impl)),
                "onednn_impl": impl}
        out["dynamic"] = {}
        for engine in ENGINES:
            y, impl, w = _call(engine, lambda: dynamic[engine](x))
            cpp.update(w)
            out["dynamic"][engine] = {"output": y.numpy(), "onednn_impl": impl}
        return out

    for x in calibration:
        yield "calibration", chunk(x)
    for x in sample_chunks(config.calib_dist, config.input_shape, config.samples):
        yield "samples", chunk(x)
    yield "warnings", sorted(cpp | {m for r in records.values() for m in r["warnings"]})
