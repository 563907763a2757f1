"""The torch side of a model study: an eager float model prepared, calibrated and converted the standard way, with
every layer recorded as NumPy arrays (runs in the torch worker, crosscheck.worker).

    torch.backends.quantized.engine = engine
    fused = fuse_modules(model, fusions)                 # the source's fusions (none for a user's model)
    fused.qconfig = get_default_qconfig(engine)
    prepared = prepare(fused);  for x in calibration: prepared(x);  converted = convert(prepared)

Recorded, for the refquant side to repeat and compare (crosscheck.model_study):

* the float model as refquant reads it (``crosscheck.from_torch(fused)``: the float weights, the forward's calls);
* what every observer saw: a forward pre-hook on each ``activation_post_process`` (so refquant's observers get the
  same float32 values, torch's MKL float Linear outputs included), and each observer's histogram, range, chosen clip
  range (``_non_linear_param_search``, wrapped during ``convert``) and qparams;
* every converted module's stored values: Quantize's scale and zero point buffers, each quantized Linear's int8
  weight (``int_repr``), weight scales and zero points, float bias, output scale and zero point, and its
  col_offsets derived from them with exact int64 torch ops; each QFunctional's scale and zero point;
* per batch (the calibration batches, then the evaluation inputs): every computing call's output (``int_repr`` of
  quantized outputs, float32 otherwise) through forward hooks; each Linear call's int32 accumulators, derived from
  its input codes and int8 weight with exact int64 torch ops (torch does not expose them); the kernel each Linear
  call ran (fbgemm's family from crosscheck.isa's probe, "exact" on qnnpack, oneDNN's per call from its verbose
  output); the float model's output.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

from refquant.engines import onednn_gemm_pairs_restart

from .torch_record import BatchRecord, ModelRecord
from .worker import UsageError

LINEAR_TYPES = (nnq.Linear, nniq.LinearReLU)


def torch_type(module: nn.Module) -> str:
    """The module's name as ``print(model)`` shows it."""
    return module._get_name()


def check_engine(engine: str) -> None:
    if engine not in torch.backends.quantized.supported_engines:
        raise UsageError(f"engine {engine!r} is not supported by this torch build "
                         f"(torch.backends.quantized.supported_engines = {torch.backends.quantized.supported_engines})")


# ----------------------------------------------------------------------------------------------------------------
# What torch stores and computes, as NumPy
# ----------------------------------------------------------------------------------------------------------------

def observer_state(obs, clip: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """A HistogramObserver's histogram, range, chosen clip range and qparams (as convert computed them)."""
    scale, zero_point = obs.calculate_qparams() if clip is None else obs._calculate_qparams(*clip)
    histogram = getattr(obs, "histogram", None)
    return {
        "kind": type(obs).__name__,
        "histogram": None if histogram is None else histogram.numpy().copy(),
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


def derived_col_offsets(weight_int8: np.ndarray, weight_zero_points: np.ndarray) -> np.ndarray:
    """col_offsets[n] = sum_k qw[n,k] - w_zp[n]*K from torch's int8 weights with exact int64 torch ops, as int32."""
    qw = torch.from_numpy(np.ascontiguousarray(weight_int8)).to(torch.int64)
    w_zp = torch.from_numpy(np.asarray(weight_zero_points)).to(torch.int64)
    return (qw.sum(dim=1) - w_zp * weight_int8.shape[1]).to(torch.int32).numpy()


def derived_accumulators(input_codes_u8: np.ndarray, weight_int8: np.ndarray, input_zero_point: int,
                         weight_zero_points: np.ndarray, saturate_int16_pairs: bool = False,
                         pairs_restart_at: int | None = None) -> np.ndarray:
    """int32 accumulators from torch's own integer tensors with exact int64 torch ops (then wrapped to int32).

    raw[m, n] = sum_k qx[m,k]*qw[n,k] - x_zp*col_offsets[n] - w_zp[n]*sum_k qx[m,k]  (torch does not expose them)

    With ``saturate_int16_pairs`` (fbgemm's "avx2" kernel family, oneDNN without VNNI: crosscheck.isa) the first sum
    is the one ``vpmaddubsw`` forms: sum_j clamp(qx[m,2j]*qw[n,2j] + qx[m,2j+1]*qw[n,2j+1], -32768, 32767), K padded
    with a zero column when odd (refquant.matmul eq. M2). ``pairs_restart_at``: the k where the pairs start afresh
    (oneDNN's gemm:jit on AVX2, its second K block: refquant.matmul eq. M2b); each block is paired on its own.
    """
    K = weight_int8.shape[1]
    qx = torch.from_numpy(np.ascontiguousarray(input_codes_u8)).reshape(-1, K).to(torch.int64)
    qw = torch.from_numpy(np.ascontiguousarray(weight_int8)).to(torch.int64)
    w_zp = torch.from_numpy(np.asarray(weight_zero_points)).to(torch.int64)
    col_offsets = qw.sum(dim=1) - w_zp * K
    if saturate_int16_pairs:
        acc = torch.zeros(qx.shape[0], qw.shape[0], dtype=torch.int64)
        starts = [0] if pairs_restart_at is None else [0, pairs_restart_at]
        for start, end in zip(starts, starts[1:] + [K]):
            width = end - start
            qx_even = torch.nn.functional.pad(qx[:, start:end], (0, width % 2))
            qw_even = torch.nn.functional.pad(qw[:, start:end], (0, width % 2))
            for j in range(0, qx_even.shape[1], 2):
                pair = torch.outer(qx_even[:, j], qw_even[:, j]) + torch.outer(qx_even[:, j + 1], qw_even[:, j + 1])
                acc += pair.clamp(-32768, 32767)
    else:
        acc = qx @ qw.T
    raw = acc - input_zero_point * col_offsets - qx.sum(dim=1, keepdim=True) * w_zp
    lead = input_codes_u8.shape[:-1]
    return raw.to(torch.int32).numpy().reshape(*lead, weight_int8.shape[0])


def converted_values(mod: nn.Module) -> dict | None:
    """The values a converted module stores, as NumPy (None for modules that store none)."""
    if type(mod) is nnq.Quantize:
        return {"scale": mod.scale.numpy().copy(), "zero_point": mod.zero_point.numpy().copy()}
    if type(mod) in LINEAR_TYPES:
        w = mod.weight()
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        if per_channel:
            scales = w.q_per_channel_scales().numpy().copy()
            zero_points = w.q_per_channel_zero_points().numpy().copy()
        else:
            scales, zero_points = np.array([w.q_scale()], np.float64), np.array([w.q_zero_point()], np.int64)
        w_i8 = w.int_repr().numpy().copy()
        bias = mod.bias()
        return {"weight_int8": w_i8, "weight_scales": scales, "weight_zero_points": zero_points,
                "per_channel": per_channel, "bias": None if bias is None else bias.detach().numpy().copy(),
                "scale": np.float64(mod.scale), "zero_point": np.int64(mod.zero_point),
                "col_offsets": derived_col_offsets(w_i8, zero_points)}
    if type(mod) is nnq.QFunctional:
        return {"scale": np.float64(mod.scale), "zero_point": np.int64(mod.zero_point)}
    return None


# ----------------------------------------------------------------------------------------------------------------
# prepare, calibrate, convert
# ----------------------------------------------------------------------------------------------------------------

def quantize_and_record(model: nn.Module, calibration: list[torch.Tensor], engine: str, *,
                        fusions: list[list[str]] | None = None, info: dict | None = None
                        ) -> tuple[ModelRecord, nn.Module, nn.Module]:
    """fuse_modules, prepare with ``get_default_qconfig(engine)``, calibrate, convert, recording every observer and
    every converted module. Returns the record, the fused float model and the converted model.

    A model refquant cannot read (crosscheck.from_torch: an unsupported module, no QuantStub, control flow) is a
    UsageError naming the module; so is calibration data torch cannot run.
    """
    from .from_torch import from_torch

    check_engine(engine)
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()
        fused = torch.ao.quantization.fuse_modules(model, fusions) if fusions else model
        try:  # deferred in a worker forked before refquant was imported: the parent builds it (.build())
            refquant_model = from_torch(fused, deferred="refquant.model" not in sys.modules)
        except ValueError as e:  # refquant.model.ModelError, or a model with a quantized output
            raise UsageError(f"the model cannot be studied: {e}") from None
        fused.qconfig = torch.ao.quantization.get_default_qconfig(engine)
        prepared = torch.ao.quantization.prepare(fused)  # a copy: fused stays float

        observed: dict[str, list[np.ndarray]] = {}
        observers = {}
        for name, mod in prepared.named_modules():
            if name.endswith("activation_post_process") and not isinstance(mod, nn.Identity):
                owner = name[: -len(".activation_post_process")] if "." in name else ""
                observers[owner] = mod
                observed[owner] = []
                mod.register_forward_pre_hook(
                    lambda m, args, owner=owner: observed[owner].append(args[0].detach().numpy().copy()))
        with torch.no_grad():
            for i, x in enumerate(calibration):
                try:
                    prepared(x)
                except Exception as e:  # e.g. the data does not fit the model
                    raise UsageError(f"torch cannot calibrate the model on calibration batch {i} of shape "
                                     f"{tuple(x.shape)}: {type(e).__name__}: {str(e).splitlines()[0]}") from None

        # Keep the clip range each HistogramObserver chooses inside convert() (its _non_linear_param_search).
        clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for owner, obs in observers.items():
            search = getattr(obs, "_non_linear_param_search", None)
            if search is None:
                continue

            def recording_search(search=search, owner=owner):
                clips[owner] = search()
                return clips[owner]

            obs._non_linear_param_search = recording_search
        converted = torch.ao.quantization.convert(prepared, inplace=True)
        for obs in observers.values():
            obs.__dict__.pop("_non_linear_param_search", None)
        messages = sorted({" ".join(str(x.message).split("\n")[0].split()) for x in caught})

    paths = list(refquant_model.modules)
    record = ModelRecord(
        engine=engine,
        float_model=refquant_model,
        torch_types={p: torch_type(fused.get_submodule(p)) for p in paths},
        converted_types={p: torch_type(converted.get_submodule(p)) for p in paths},
        observed=observed,
        observers={p: observer_state(obs, clips.get(p)) for p, obs in observers.items()},
        converted={p: v for p in paths if (v := converted_values(converted.get_submodule(p))) is not None},
        qconfig=f"get_default_qconfig({engine!r})",
        printed_model=str(converted),
        warnings=messages,
        info=dict(info or {}),
    )
    return record, fused, converted


# ----------------------------------------------------------------------------------------------------------------
# forward passes, call by call
# ----------------------------------------------------------------------------------------------------------------

class ForwardRecorder:
    """Forward hooks on every computing module of a converted model (Quantize, DeQuantize, quantized Linear /
    LinearReLU, ReLU, and each QFunctional's ``activation_post_process``, which every method ends with); one
    :meth:`run` per batch. ``family``: fbgemm's kernel family in this process (crosscheck.isa)."""

    def __init__(self, converted: nn.Module, float_model: nn.Module, engine: str, family: str) -> None:
        self.converted, self.float_model, self.engine, self.family = converted, float_model, engine, family
        self._calls: list[tuple[str, Any, Any, Any]] = []
        self._capture = None
        for path, mod in converted.named_modules():
            if path.endswith("activation_post_process"):
                owner = path[: -len(".activation_post_process")] if "." in path else ""
                if type(converted.get_submodule(owner)) is nnq.QFunctional:
                    mod.register_forward_hook(self._hook(owner, None))
            elif type(mod) in (nnq.Quantize, nnq.DeQuantize, nn.ReLU, *LINEAR_TYPES):
                if type(mod) in LINEAR_TYPES and engine == "onednn":
                    mod.register_forward_pre_hook(self._drop_verbose)
                mod.register_forward_hook(self._hook(path, mod if type(mod) in LINEAR_TYPES else None))

    def _drop_verbose(self, mod, args) -> None:
        """Before a Linear call: forget oneDNN's earlier lines, so the call's own matmul line is read after it."""
        self._capture.read()

    def _hook(self, path: str, linear):
        def hook(mod, args, out):
            kernel = None
            if linear is not None:
                kernel = self._linear_kernel()
            self._calls.append((path, out, args[0] if linear is not None else None, kernel))
        return hook

    def _linear_kernel(self) -> str:
        if self.engine == "qnnpack":
            return "exact"
        if self.engine == "onednn":
            from .isa import onednn_family_from_verbose

            return onednn_family_from_verbose(self._capture.read()) or "brgemm"  # no matmul ran: an empty batch
        return self.family

    def run(self, x: torch.Tensor, set_name: str, labels: np.ndarray | None = None) -> BatchRecord:
        from .isa import OnednnVerboseCapture

        self._calls = []
        capture = OnednnVerboseCapture() if self.engine == "onednn" else contextlib.nullcontext()
        with torch.no_grad(), warnings.catch_warnings(), capture as cap:
            warnings.simplefilter("ignore")
            self._capture = cap
            try:
                y = self.converted(x)
            except RuntimeError as e:  # e.g. QNNPACK refuses an add whose scale ratio is outside [2^-14, 2^8)
                lines = [line for line in str(e).splitlines() if line.strip()]
                raise UsageError(f"torch cannot run the converted model on engine {self.engine!r} (after the calls "
                                 f"{[c[0] for c in self._calls][-3:]}): {lines[0] if lines else type(e).__name__}"
                                 ) from None
            self._capture = None
            float_y = self.float_model(x)
        calls, qparams, accumulators, kernels = {}, {}, {}, {}
        seen: dict[str, int] = {}
        for path, out, inp, kernel in self._calls:
            seen[path] = seen.get(path, 0) + 1
            name = path if seen[path] == 1 else f"{path}#{seen[path]}"
            if out.is_quantized:
                calls[name] = out.int_repr().numpy().copy()
                qparams[name] = (float(out.q_scale()), int(out.q_zero_point()))
            else:
                calls[name] = out.detach().numpy().copy()
                qparams[name] = None
            if kernel is not None:
                kernels[name] = kernel
                w = self.converted.get_submodule(path).weight()
                per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
                w_zp = w.q_per_channel_zero_points().numpy() if per_channel else np.array([w.q_zero_point()])
                pairs = kernel in ("avx2",) or kernel.endswith("+pairs")
                restart = (onednn_gemm_pairs_restart(w.shape[1]) if kernel == "gemm+pairs" else None)  # gemm:jit
                accumulators[name] = derived_accumulators(inp.int_repr().numpy(), w.int_repr().numpy(),
                                                          int(inp.q_zero_point()), w_zp, pairs, restart)
        return BatchRecord(set=set_name, x=x.numpy(), calls=calls, qparams=qparams, accumulators=accumulators,
                           kernels=kernels, output=y.detach().numpy(), float_output=float_y.detach().numpy(),
                           labels=labels)


# ----------------------------------------------------------------------------------------------------------------
# the environment and the event stream
# ----------------------------------------------------------------------------------------------------------------

def torch_environment(where: str = "") -> dict:
    """What changes torch's numbers (numerics.md, 'What changes these numbers'), seen from torch, with the kernel
    family of fbgemm's int8 GEMM found by crosscheck.isa's probe."""
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


def model_events(model: nn.Module, calibration: list[torch.Tensor], evaluation: Iterator, engine: str, *,
                 fusions: list[list[str]] | None = None, info: dict | None = None, where: str = ""
                 ) -> Iterator[tuple[str, Any]]:
    """The torch side of a model study as (kind, payload) events, NumPy arrays only:

    ("environment", dict), ("model", ModelRecord), then one ("batch", BatchRecord) per calibration batch (set
    "calibration") and per evaluation chunk (set "evaluation"; ``evaluation`` yields (x, labels or None)).
    """
    from .isa import torch_fbgemm_kernel_family

    yield "environment", torch_environment(where)
    record, fused, converted = quantize_and_record(model, calibration, engine, fusions=fusions, info=info)
    yield "model", record
    recorder = ForwardRecorder(converted, fused, engine, torch_fbgemm_kernel_family())
    for x in calibration:
        yield "batch", recorder.run(x, "calibration")
    for x, labels in evaluation:
        yield "batch", recorder.run(x, "evaluation", labels)


def chunks(x: np.ndarray, rows: int, labels: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
    """``x`` (and its labels) in chunks of ``rows`` along axis 0, as torch tensors."""
    for start in range(0, x.shape[0], rows):
        yield (torch.from_numpy(np.ascontiguousarray(x[start:start + rows])),
               None if labels is None else labels[start:start + rows])


def chunk_rows(sample_shape: tuple[int, ...]) -> int:
    """Rows per evaluation chunk: about 2^16 input values."""
    return max(1, (1 << 16) // max(1, math.prod(sample_shape)))


def torch_events(config, where: str = "") -> Iterator[tuple[str, Any]]:
    """The torch side of ``python -m crosscheck.model`` (crosscheck.model_study.ModelConfig): build the model and
    its data (crosscheck.models), then :func:`model_events`."""
    from .models import build

    built = build(config)
    yield from model_events(built.model, built.calibration, built.evaluation, config.engine, fusions=built.fusions,
                            info=built.info, where=where)
