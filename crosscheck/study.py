"""The one-layer study, run twice from the same float weights and data: once by torch, once by refquant; every value
compared. It is the one-layer case of the model study (crosscheck.model_study): the same torch recording
(crosscheck.torch_model), the same refquant mirror and the same comparison, with the rows named as this study
names them ("input scale" for the QuantStub's scale, "output codes" for the Linear's).

Order of events (``run_study``):

1. torch: probe which int8 kernel family its fbgemm runs (crosscheck.isa), then build QuantStub -> Linear [ReLU] ->
   DeQuantStub, prepare, calibrate, convert (crosscheck.torch_study, crosscheck.torch_model), recording the float
   activations each observer saw and every layer's outputs.
2. refquant (crosscheck.model_study.ModelComparison, over refquant.model): the same float weight and bias; its
   observers are fed exactly the activations torch's observers saw; then ``convert``, modelling the kernel each
   torch call ran (``saturate_int16_pairs`` for fbgemm's pre-VNNI ``vpmaddubsw`` kernels, oneDNN's kernel per call).
3. refquant again, calibrated with its own NumPy float forward: a separate, reported row on whether the output
   qparams change (torch's MKL float Linear sums in a shape-dependent order, docs/numerics.md §8). Never part of
   parity.
4. Both quantized models run on the calibration batches and on ``samples`` fresh random inputs; codes, int32
   accumulators and float outputs are compared, and the error against torch's float model is measured for both
   with the same code.

The torch side runs in a worker process (crosscheck.worker) and sends NumPy arrays as it goes, so this module never
needs torch itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compare as C
from .isa import saturate_int16_pairs
from .model_study import (ModelComparison, Perturber, _flip_lsb, receive_environment, receive_model,  # noqa: F401
                          start)
from .model_study import environment as model_environment
from .model_study import refquant_observer_state, warm_up_refquant  # noqa: F401  (re-exported)
from .progress import Progress
from .runner import ErrorSums
from .torch_record import TorchStudy

_Perturber = Perturber


@dataclass(frozen=True)
class StudyConfig:
    """What the CLI options set. The defaults are the seed study."""

    in_features: int = 3
    out_features: int = 3
    input_shape: tuple[int, ...] = (1, 2, 3, 3)
    calib_batches: int = 1
    calib_dist: str = "normal"
    samples: int = 1000
    seed: int = 0
    relu: bool = False
    bias: bool = True
    engine: str = "fbgemm"
    isa: str = "auto"  # crosscheck.isa.ISAS: the kernel family torch's fbgemm is to run (auto: what this machine runs)
    requantization: tuple[str, ...] = ()  # integer variants to measure (crosscheck.requantization; refquant only)
    torch_side = "crosscheck.torch_study:torch_events"  # what the torch worker runs (crosscheck.worker)

    def torch_kwargs(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, input_shape=self.input_shape,
                    calib_batches=self.calib_batches, calib_dist=self.calib_dist, seed=self.seed, relu=self.relu,
                    bias=self.bias, engine=self.engine)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        d["requantization"] = list(self.requantization)
        return d


def inside_ranges(x: np.ndarray, y_float: np.ndarray, input_qparams: tuple, output_qparams: tuple) -> np.ndarray:
    """True for outputs whose inputs and float value all lie inside the quantized ranges; False for the clipped.

    A float v fits (scale, zero_point, quant_min, quant_max) when
    scale * (quant_min - zero_point - 1/2) <= v <= scale * (quant_max - zero_point + 1/2), computed in float64
    (a statistic for the report, not quantization arithmetic). Output [m, n] is inside when every x[m, :] fits the
    input qparams and y_float[m, n] fits the output qparams.

    "Clipped", in the report, the JSON and the README, means exactly the opposite: quantization clamps the value to
    code quant_min or quant_max (0 or 255; the study passes the full quint8 range, which quantize clamps to even
    with reduce_range). The observers' calibrated range is narrower: it maps onto codes 0..127, and values above it
    use codes 128..255 without being clipped.
    """
    def fits(v, scale, zero_point, qmin, qmax):
        s = float(scale)
        return (v >= s * (qmin - zero_point - 0.5)) & (v <= s * (qmax - zero_point + 0.5))

    x_ok = fits(np.asarray(x, np.float64), *input_qparams).all(axis=-1, keepdims=True)
    return x_ok & fits(np.asarray(y_float, np.float64), *output_qparams)


class ErrorStats:
    """Error of quantized outputs against a float reference, accumulated chunk by chunk, in float64.

        e = f64(y_quantized) - f64(y_float)
        mean_abs = sum |e| / n;  max_abs = max |e|;  SQNR = 10 log10(sum y_float^2 / sum e^2) dB

    also split into outputs computed entirely inside the quantized ranges (only rounding errors: of the inputs,
    the weights and the output) and the rest (an input or the output was clipped). torch's and refquant's outputs
    go through this same code, so equal outputs give equal numbers, bit for bit.
    """

    def __init__(self, keep_errors: int = 0):
        self.all, self.inside, self.clipped = ErrorSums(), ErrorSums(), ErrorSums()
        self.keep_errors = keep_errors
        self.kept: list[np.ndarray] = []
        self.kept_inside: list[np.ndarray] = []
        self.kept_n = 0

    def update(self, y_quantized: np.ndarray, y_float: np.ndarray, inside: np.ndarray | None = None) -> None:
        yq = np.asarray(y_quantized, np.float64)
        yf = np.asarray(y_float, np.float64)
        e = yq - yf
        self.all.add(e, yf)
        if inside is not None:
            inside = np.broadcast_to(inside, e.shape)
            self.inside.add(e[inside], yf[inside])
            self.clipped.add(e[~inside], yf[~inside])
        if self.kept_n < self.keep_errors:
            take = e.reshape(-1)[: self.keep_errors - self.kept_n]
            self.kept.append(take.copy())
            if inside is not None:
                self.kept_inside.append(inside.reshape(-1)[: take.size].copy())
            self.kept_n += take.size

    def result(self) -> dict:
        r = self.all.result()
        r["inside_ranges"] = self.inside.result()
        r["clipped"] = self.clipped.result()
        total = self.all.sum_sq_err
        r["clipped"]["share_of_squared_error"] = self.clipped.sum_sq_err / total if total else 0.0
        return r

    def as_array(self) -> np.ndarray:
        r = self.result()
        values = [r["mean_abs"], r["max_abs"], r["sqnr_db"]]
        for part in ("inside_ranges", "clipped"):
            values += [r[part]["n"], r[part]["mean_abs"], r[part]["max_abs"]]
        return np.array(values, np.float64)

    def errors(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.kept:
            return np.zeros(0), np.zeros(0, bool)
        inside = np.concatenate(self.kept_inside) if self.kept_inside else np.ones(self.kept_n, bool)
        return np.concatenate(self.kept), inside


# Explanations printed beside the rows and written to the JSON.
NOTES = {
    "observer": "refquant's HistogramObserver was fed the float32 activations torch's observer saw (recorded by a "
                "forward pre-hook on torch's observer)",
    "observer_relu": "with ReLU torch's prepared LinearReLU (an nn.Sequential) calls its output observer twice per "
                     "batch, so every count is doubled; refquant is fed both calls",
    "input_scale": "torch: converted Quantize module's scale buffer; refquant: QuantizedLinearModel.input_scale",
    "output_scale": "torch: quantized Linear's .scale (a Python float holding a float32 value); compared as float64",
    "weight_scales": "torch keeps q_per_channel_scales() as float64; refquant's float32 scales are widened exactly "
                     "and compared as float64 bits",
    "weight_int8": "torch: fc.weight().int_repr(); refquant: QuantizedLinear.weight_int8",
    "bias": "float32, NOT quantized: fbgemm adds f32(bias / act_times_w_scale) to f32(int32 accumulator) "
            "(docs/numerics.md §6)",
    "no_bias": "no bias: nn.Linear(bias=False); torch's fc.bias() and refquant's bias are both None",
    "col_offsets": "torch side derived from torch's int_repr() with exact int64 torch ops: "
                   "sum_k qw[n,k] - w_zp[n]*K (fbgemm does not expose its packed col_offsets)",
    "accumulators": "int32 accumulators after zero-point correction, sum_k qx*qw - x_zp*col_offsets[n]: torch side "
                    "derived from torch's own input codes and int8 weights with exact int64 torch ops (fbgemm does "
                    "not expose them); with fbgemm's avx2 kernels the sum is of int16-saturated pairs, on both sides",
    "input_codes": "torch: model.quant(x).int_repr(); refquant: quantize_per_tensor(x, s_x, z_x, 'quint8')",
    "output_codes": "torch: model.fc(qx).int_repr(); refquant: QuantizedLinear(x_u8)",
    "output": "torch: model(x) (DeQuantStub); refquant: dequantize(y_u8, s_y, z_y); compared as float32 bits",
    "error": "[mean |e|, max |e|, SQNR dB, then n, mean |e|, max |e| inside the quantized ranges, then the same for "
             "clipped outputs] against torch's float model, computed by the same code for both sides; float64 bits",
    "act_times_w_scale": "f32(f32(s_x) * w_scale[n]) (torch computes it inside qlinear.cpp and does not expose it)",
    "output_multiplier": "f32(act_times_w_scale[n] / f32(s_y))",
    "float_forward": "refquant calibrated with its own NumPy float32 forward (x @ W.T + b) instead of torch's "
                     "recorded F.linear outputs. torch's MKL sgemm sums in a shape-dependent order, so single "
                     "floats can differ in the last bit and move the histogram observer's choice "
                     "(docs/numerics.md §8). Reported only; the parity rows use torch's recorded activations.",
}


@dataclass
class StudyResult(C.CountedRows):
    config: StudyConfig
    environment: dict
    fields: list[C.Field]
    torch: Any  # crosscheck.torch_record.TorchStudy (a view of the model record)
    refquant: Any  # refquant.pipeline.QuantizedLinearModel (its .model: the refquant.model.QuantizedModel)
    refquant_observed: Any  # refquant.model.ObservedModel (fed torch's activations)
    refquant_own: Any  # refquant.pipeline.ObservedLinear calibrated with refquant's own float forward
    calibration: dict  # first calibration batch: input, float output (torch), quantized output, codes
    error: dict
    float_forward: dict
    plot_data: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # the model study's layers (crosscheck.model_study)
    record: Any = None  # crosscheck.torch_record.ModelRecord
    comparison: Any = None  # crosscheck.model_study.ModelComparison (its .export writes --export's program)
    exported: list[str] | None = None  # the files of --export


OBSERVER_RANGE_NOTE = ("the calibrated range: the [min, max] HistogramObserver._non_linear_param_search chose (its "
                       "clip range, from which the qparams come); with reduce_range it maps onto codes 0..127")


def linear_describe(config: StudyConfig):
    """The model study's rows under this study's names (None: a row this study does not print)."""
    batches = f"{config.calib_batches} batch" + ("es" if config.calib_batches > 1 else "")
    labels = {"calibration": f"calibration, {batches}", "evaluation": f"{config.samples} samples"}
    out_note = NOTES["observer"] + ("; " + NOTES["observer_relu"] if config.relu else "")
    static = {
        ("quant", "observer min_val, max_val"): ("input observer min_val, max_val", NOTES["observer"]),
        ("quant", "observer histogram"): ("input observer histogram", NOTES["observer"]),
        ("quant", "observer calibrated range"): ("input observer calibrated range", OBSERVER_RANGE_NOTE),
        ("quant", "scale"): ("input scale", NOTES["input_scale"]),
        ("quant", "zero_point"): ("input zero_point", "torch: Quantize.zero_point buffer (int64); refquant: "
                                                      "QuantizedLinearModel.input_zero_point"),
        ("fc", "observer min_val, max_val"): ("output observer min_val, max_val", out_note),
        ("fc", "observer histogram"): ("output observer histogram", out_note),
        ("fc", "observer calibrated range"): ("output observer calibrated range", OBSERVER_RANGE_NOTE),
        ("fc", "scale"): ("output scale", NOTES["output_scale"]),
        ("fc", "zero_point"): ("output zero_point", "torch: quantized Linear's .zero_point; refquant: "
                                                    "QuantizedLinear.output_zero_point"),
        ("fc", "weight scales (per channel)"): ("weight scales (per channel)", NOTES["weight_scales"]),
        ("fc", "weight scale (per tensor)"): ("weight scale (per tensor)", "torch keeps q_scale() as a double; "
                                              "refquant's float32 scale is widened exactly and compared as float64 "
                                              "bits"),
        ("fc", "weight zero_points (per channel)"): ("weight zero_points (per channel)", "torch: "
                                                     "q_per_channel_zero_points() (int64); refquant: int32, as "
                                                     "fbgemm's prepack stores them"),
        ("fc", "weight zero_point (per tensor)"): ("weight zero_point (per tensor)", "torch: q_zero_point(); "
                                                   "refquant: int32"),
        ("fc", "weight int8 (int_repr)"): ("weight int8 (int_repr)", NOTES["weight_int8"]),
        ("fc", "bias (float32, not quantized)"): ("bias (float32, not quantized)", NOTES["bias"]),
        ("fc", "no bias"): ("bias (float32, not quantized)", NOTES["no_bias"]),
        ("fc", "col_offsets"): ("col_offsets", NOTES["col_offsets"]),
    }
    forward = {
        ("quant", "output codes"): ("input codes", NOTES["input_codes"]),
        ("fc", "int32 accumulators"): ("int32 accumulators", NOTES["accumulators"]),
        ("fc", "output codes"): ("output codes", NOTES["output_codes"]),
        ("dequant", "output"): ("dequantized output", NOTES["output"]),
    }

    def describe(name: str, key: str, set_name: str | None):
        if set_name is None:
            return static.get((name, key))
        if name == "fc" and key.startswith("output codes, requantization="):  # crosscheck.requantization's rows
            return f"{key} ({labels[set_name]})", ""
        row = forward.get((name, key))
        return None if row is None else (f"{row[0]} ({labels[set_name]})", row[1])

    return describe


def torch_study_view(record, calibration: list[np.ndarray], relu: bool) -> TorchStudy:
    """The one-layer record in the shape this study's report and figures read (crosscheck.torch_record)."""
    fc = record.float_model.modules["fc"]
    q, lin = record.converted["quant"], record.converted["fc"]
    return TorchStudy(
        engine=record.engine, relu=relu, weight=fc.weight, bias=fc.bias, calibration=calibration,
        input_observed=record.observed["quant"], output_observed=record.observed["fc"],
        input_observer=record.observers["quant"], output_observer=record.observers["fc"],
        input_scale=q["scale"], input_zero_point=q["zero_point"], output_scale=float(lin["scale"]),
        output_zero_point=np.int64(lin["zero_point"]), weight_scales=lin["weight_scales"],
        weight_zero_points=lin["weight_zero_points"], weight_int8=lin["weight_int8"], packed_bias=lin["bias"],
        col_offsets=lin["col_offsets"], printed_model=record.printed_model, warnings=record.warnings)


def environment(torch_env: dict, config: StudyConfig) -> dict:
    """Versions, CPU features and the kernel family that change the numbers (docs/numerics.md, 'What changes these
    numbers')."""
    return model_environment(torch_env, config.engine, config.isa)


def sample_chunk_rows(input_shape: tuple[int, ...]) -> int:
    """How many ``input_shape`` samples are drawn and evaluated at once (about 2^16 values per chunk; the torch
    side draws them so, crosscheck.torch_study.sample_chunks)."""
    return max(1, (1 << 16) // math.prod(input_shape))


def forward_batch_shapes(config: StudyConfig) -> tuple[tuple[int, ...], ...]:
    """The shapes of the batches the study runs through the quantized model: a calibration batch (``input_shape``)
    and the largest chunk of samples (:func:`sample_chunk_rows`, at most ``samples``)."""
    rows = min(config.samples, sample_chunk_rows(config.input_shape))
    return (config.input_shape,) + (((rows, *config.input_shape),) if rows else ())


def run_study(config: StudyConfig, *, progress: bool = False, plot_data: bool = False,
              torch_subprocess: bool | None = None, _perturb: tuple[str, int] | None = None) -> StudyResult:
    """Run the study on both sides and compare every field.

    The torch side runs in a worker process unless torch is already imported here (``torch_subprocess=None``; see
    crosscheck.worker). ``_perturb`` is a test hook only: (field name, flat index) flips the lowest bit of that
    element of refquant's value right before it is compared, to prove a difference is caught and named.
    """
    perturb = Perturber(_perturb)

    # 1. torch (its worker forked before this process imports refquant, which it does meanwhile)
    events = start(config, progress=progress, torch_subprocess=torch_subprocess,
                   warm_up=lambda saturate: warm_up_refquant(
                       saturate, in_features=config.in_features, out_features=config.out_features,
                       calibration_shape=config.input_shape, forward_shapes=forward_batch_shapes(config)))
    from refquant.pipeline import ObservedLinear, QuantizedLinearModel, linear_float

    with Progress("torch: import, prepare, calibrate, convert", enabled=progress):
        torch_env = receive_environment(events, config)
        record = receive_model(events)

    # 2. refquant, observers fed what torch's observers saw: the model study's mirror, under this study's names
    with Progress("refquant: observers, convert", enabled=progress):
        comparison = ModelComparison(record, torch_env, describe=linear_describe(config), perturb=perturb,
                                     batch_axis={"calibration": True}, model_output_row=False,
                                     requantizations=config.requantization)
        qm = comparison.model
        ql = qm.layer("fc")
        quant = qm.modules["quant"]
        model = QuantizedLinearModel(np.float32(quant.scale), int(quant.zero_point), ql, qm)
        fc = record.float_model.modules["fc"]
        weight, bias = fc.weight, fc.bias

        # 3. refquant with its own float forward (separate, reported)
        own = ObservedLinear(weight, bias, relu=config.relu, engine=config.engine)
        calibration: list[np.ndarray] = []
    fields: list[C.Field] = list(comparison.static)
    ts = None

    # -- forward passes: calibration batches, then fresh samples (as the torch side sends them)
    batches = f"{config.calib_batches} batch" + ("es" if config.calib_batches > 1 else "")
    in_range = (0, 255)  # quantize_per_tensor clamps to the full quint8 range even with reduce_range
    t_in_q = (record.converted["quant"]["scale"][0], int(record.converted["quant"]["zero_point"][0]), *in_range)
    r_in_q = (model.input_scale, model.input_zero_point, *in_range)
    t_out_q = (float(record.converted["fc"]["scale"]), int(record.converted["fc"]["zero_point"]), 0, 255)
    r_out_q = (model.output_scale, model.output_zero_point, 0, 255)
    keep = 200_000 if plot_data else 0
    err_t, err_r, err_own = ErrorStats(keep), ErrorStats(), ErrorStats()
    scatter_float: list[np.ndarray] = []
    scatter_quantized: list[np.ndarray] = []
    scatter_inside: list[np.ndarray] = []
    scatter_n = 0
    first = None
    own_model = None
    own_outputs: list[np.ndarray] = []
    own_codes_differing = 0
    own_scale = own_zp = None
    with Progress(f"forward passes, both sides (calibration {batches}, then samples)", config.samples,
                  enabled=progress) as bar:
        for kind, b in events:
            if b.set == "calibration":
                comparison.add_batch(b)
                calibration.append(b.x)
                own_outputs.append(own.calibrate(b.x))
                if first is None:
                    first = {"input": b.x, "float_output": b.float_output, "quantized_output": b.output,
                             "output_codes": b.calls["fc"], "input_codes": b.calls["quant"]}
                continue
            if own_scale is None:  # the calibration batches are done: convert the own-calibrated model
                own_model, own_scale, own_zp = _own_model(own, record, config, comparison)
            y, traces = comparison.add_batch(b)
            x, y_float = b.x, b.float_output
            t_inside = inside_ranges(x, y_float, t_in_q, t_out_q)
            err_t.update(b.output, y_float, t_inside)
            err_r.update(y, y_float, inside_ranges(x, y_float, r_in_q, r_out_q))
            err_own.update(y, linear_float(x, weight, bias, config.relu))
            if own_model is not None:
                own_codes_differing += int(np.count_nonzero(own_model.linear(traces["quant"].output)
                                                            != b.calls["fc"]))
            if plot_data and scatter_n < 20_000:
                scatter_float.append(y_float.reshape(-1)[:20_000])
                scatter_quantized.append(b.output.reshape(-1)[:20_000])
                scatter_inside.append(np.broadcast_to(t_inside, y_float.shape).reshape(-1)[:20_000])
                scatter_n += scatter_float[-1].size
            bar.advance(x.shape[0])
    if own_scale is None:
        own_model, own_scale, own_zp = _own_model(own, record, config, comparison)
    ts = torch_study_view(record, calibration, config.relu)
    fields.extend(comparison.fields()[len(comparison.static):])
    if config.samples:
        name = f"error metrics ({config.samples} samples)"
        f = C.compare(name, err_t.as_array(), perturb(name, err_r.as_array()), note=NOTES["error"])
        f.layer = "dequant"
        fields.append(f)

    # -- refquant-only intermediates (fbgemm's constants; the other engines keep theirs in .requantizer)
    if hasattr(ql.requantizer, "act_times_w_scale"):
        fields.append(C.refquant_only("act_times_w_scale", ql.act_times_w_scale, NOTES["act_times_w_scale"]))
        fields.append(C.refquant_only("output multiplier", ql.output_multiplier, NOTES["output_multiplier"]))

    # -- refquant's own float forward (reported, not parity)
    recorded = np.concatenate([y.reshape(-1) for y in ts.output_observed[:: 2 if config.relu else 1]])
    own_flat = np.concatenate([y.reshape(-1) for y in own_outputs])
    float_rows = [
        C.compare("own float forward: Linear outputs (calibration)", recorded, own_flat, kind=C.FLOAT_FORWARD,
                  note="torch's F.linear outputs the observer saw vs refquant.pipeline.linear_float"),
        C.compare("own float forward: output scale", ts.output_observer["scale"], np.asarray(own_scale),
                  kind=C.FLOAT_FORWARD, note=NOTES["float_forward"]),
        C.compare("own float forward: output zero_point", ts.output_observer["zero_point"], np.asarray(own_zp),
                  kind=C.FLOAT_FORWARD, note=NOTES["float_forward"]),
    ]
    fields.extend(float_rows)
    float_forward = {
        "output_qparams_changed": not (float_rows[1].equal and float_rows[2].equal),
        "torch": {"scale": C.scalar_to_json(ts.output_observer["scale"].reshape(-1)[0]),
                  "zero_point": C.scalar_to_json(ts.output_observer["zero_point"].reshape(-1)[0])},
        "refquant_own": {"scale": C.scalar_to_json(np.asarray(own_scale).reshape(-1)[0]),
                         "zero_point": C.scalar_to_json(np.asarray(own_zp).reshape(-1)[0])},
        "sample_output_codes_differing": own_codes_differing,  # the own-calibrated model vs torch, if qparams moved
        "float_outputs_differing": float_rows[0].mismatches,
        "float_outputs": float_rows[0].size,
        "explanation": NOTES["float_forward"],
    }

    error = {
        "samples": config.samples,
        "distribution": config.calib_dist,
        "reference": "torch's float model (nn.Linear, fp32) on the same inputs",
        "torch": err_t.result(),
        "refquant": err_r.result(),
        "equal": bool(np.array_equal(err_t.as_array().view(np.uint64), err_r.as_array().view(np.uint64))),
        "refquant_vs_own_float_forward": err_own.result(),
    }

    result = StudyResult(config=config, environment=environment(torch_env, config), fields=fields, torch=ts,
                         refquant=model, refquant_observed=comparison.observed, refquant_own=own, calibration=first,
                         error=error, float_forward=float_forward, layers=comparison.layers(fields),
                         record=record, comparison=comparison)
    if plot_data:
        result.plot_data = {
            "errors": err_t.errors(),
            "scatter_float": np.concatenate(scatter_float) if scatter_float else np.zeros(0),
            "scatter_quantized": np.concatenate(scatter_quantized) if scatter_quantized else np.zeros(0),
            "scatter_inside": np.concatenate(scatter_inside) if scatter_inside else np.zeros(0, bool),
        }
    return result


def _own_model(own, record, config: StudyConfig, comparison: ModelComparison):
    """The model calibrated on refquant's own float forward, if its output qparams differ from torch's (else None),
    with its output (scale, zero_point)."""
    own_scale, own_zp = own.output_observer.calculate_qparams()
    t_obs = record.observers["fc"]
    own_changed = not (C.compare("", t_obs["scale"], own_scale).equal
                       and C.compare("", t_obs["zero_point"], own_zp).equal)
    own_model = None
    if own_changed:
        k = comparison.default_kernel
        own_model = own.convert(saturate_int16_pairs=k.saturate_int16_pairs, onednn_kernel=k.onednn_kernel)
    return own_model, own_scale, own_zp
