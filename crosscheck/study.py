"""The study, run twice from the same float weights and data: once by torch, once by refquant; every value compared.

Order of events (``run_study``):

1. torch: probe which int8 kernel family its fbgemm runs (crosscheck.isa), then build QuantStub -> Linear [ReLU] ->
   DeQuantStub, prepare, calibrate, convert (crosscheck.torch_study), recording the float activations each observer
   saw.
2. refquant (``refquant.pipeline.ObservedLinear``): the same float weight and bias; its observers are fed exactly the
   activations torch's observers saw; then ``convert``, with ``saturate_int16_pairs`` set to model the probed
   family (True for fbgemm's pre-VNNI ``vpmaddubsw`` kernels).
3. refquant again, calibrated with its own NumPy float forward: a separate, reported row on whether the output
   qparams change (torch's MKL float Linear sums in a shape-dependent order, docs/numerics.md §8). Never part of
   parity.
4. Both quantized models run on the calibration batches and on ``samples`` fresh random inputs; codes, int32
   accumulators and float outputs are compared, and the error against torch's float model is measured for both
   with the same code.

The torch side (crosscheck.torch_study) runs in a worker process (crosscheck.worker) and sends NumPy arrays as it
goes, so this module never needs torch itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compare as C
from .isa import expected_family, saturate_int16_pairs
from .progress import Progress


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

    def torch_kwargs(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, input_shape=self.input_shape,
                    calib_batches=self.calib_batches, calib_dist=self.calib_dist, seed=self.seed, relu=self.relu,
                    bias=self.bias, engine=self.engine)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        return d


class _ErrorSums:
    def __init__(self) -> None:
        self.n = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.sum_sq_err = 0.0
        self.sum_sq_ref = 0.0

    def update(self, e: np.ndarray, yf: np.ndarray) -> None:
        if e.size == 0:
            return
        abs_e = np.abs(e)
        self.n += e.size
        self.sum_abs += float(abs_e.sum())
        self.max_abs = max(self.max_abs, float(abs_e.max()))
        self.sum_sq_err += float((e * e).sum())
        self.sum_sq_ref += float((yf * yf).sum())

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {"n": 0, "mean_abs": math.nan, "max_abs": math.nan, "sqnr_db": math.nan}
        if self.sum_sq_err == 0:
            sqnr = math.inf
        elif self.sum_sq_ref == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)
        return {"n": self.n, "mean_abs": self.sum_abs / self.n, "max_abs": self.max_abs, "sqnr_db": sqnr}


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
        self.all, self.inside, self.clipped = _ErrorSums(), _ErrorSums(), _ErrorSums()
        self.keep_errors = keep_errors
        self.kept: list[np.ndarray] = []
        self.kept_inside: list[np.ndarray] = []
        self.kept_n = 0

    def update(self, y_quantized: np.ndarray, y_float: np.ndarray, inside: np.ndarray | None = None) -> None:
        yq = np.asarray(y_quantized, np.float64)
        yf = np.asarray(y_float, np.float64)
        e = yq - yf
        self.all.update(e, yf)
        if inside is not None:
            inside = np.broadcast_to(inside, e.shape)
            self.inside.update(e[inside], yf[inside])
            self.clipped.update(e[~inside], yf[~inside])
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


def _flip_lsb(value: Any, index: int) -> np.ndarray:
    """A copy of ``value`` with the lowest bit of element ``index`` (flat) flipped: the smallest possible change."""
    a = np.array(value, copy=True)
    flat = a.reshape(-1)
    if a.dtype.kind == "f":
        u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
        flat.view(u)[index] ^= u(1)
    elif a.dtype.kind in "iu":
        flat[index] ^= a.dtype.type(1)
    else:
        raise TypeError(f"cannot perturb a {a.dtype} value")
    return a


class _Perturber:
    """Test hook: flip one bit of one refquant value just before it is compared (never set by the CLI)."""

    def __init__(self, spec: tuple[str, int] | None):
        self.name, self.index = spec if spec is not None else (None, 0)
        self.offset: dict[str, int] = {}

    def __call__(self, name: str, value: Any) -> Any:
        if name != self.name or value is None:
            return value
        a = np.asarray(value)
        start = self.offset.get(name, 0)
        self.offset[name] = start + a.size
        if start <= self.index < start + a.size:
            return _flip_lsb(a, self.index - start)
        return value


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
class StudyResult:
    config: StudyConfig
    environment: dict
    fields: list[C.Field]
    torch: Any  # crosscheck.torch_study.TorchStudy
    refquant: Any  # refquant.pipeline.QuantizedLinearModel
    refquant_observed: Any  # refquant.pipeline.ObservedLinear (fed torch's activations)
    refquant_own: Any  # refquant.pipeline.QuantizedLinearModel calibrated with refquant's own float forward
    calibration: dict  # first calibration batch: input, float output (torch), quantized output, codes
    error: dict
    float_forward: dict
    plot_data: dict = field(default_factory=dict)

    @property
    def parity_fields(self) -> list[C.Field]:
        return [f for f in self.fields if f.counted]

    @property
    def equal(self) -> bool:
        return all(f.equal for f in self.parity_fields)


def _observer_rows(add, prefix: str, t: dict, r: dict, note: str) -> None:
    add(f"{prefix} observer min_val, max_val", np.array([t["min_val"], t["max_val"]], np.float32),
        np.array([r["min_val"], r["max_val"]], np.float32), note=note)
    add(f"{prefix} observer histogram", t["histogram"], r["histogram"], note=note)
    add(f"{prefix} observer calibrated range", np.array([t["clip_min"], t["clip_max"]], np.float32),
        np.array([r["clip_min"], r["clip_max"]], np.float32),
        note="the calibrated range: the [min, max] HistogramObserver._non_linear_param_search chose (its clip "
             "range, from which the qparams come); with reduce_range it maps onto codes 0..127")


def refquant_observer_state(obs) -> dict:
    """Histogram, range and chosen clip range of a refquant HistogramObserver, with torch's names.

    The clip range is the one its last ``calculate_qparams()`` chose (``new_min``, ``new_max``)."""
    if obs.new_min is None:
        obs.calculate_qparams()
    return {
        "histogram": np.asarray(obs.histogram),
        "min_val": np.asarray(obs.min_val),
        "max_val": np.asarray(obs.max_val),
        "clip_min": np.asarray(obs.new_min),
        "clip_max": np.asarray(obs.new_max),
        "quant_min": obs.quant_min,
        "quant_max": obs.quant_max,
    }


def warm_up_refquant(saturate: bool = False) -> None:
    """Load refquant's Numba kernels from the cache (first calls) on tiny data, while the torch worker starts; on
    the first run (or after an edit) Numba compiles them instead, which takes 10-40 s. ``saturate`` also loads the
    int16-pair kernel (eq. M2)."""
    from refquant.pipeline import ObservedLinear

    w = np.array([[0.5, -0.25]], np.float32)
    x = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    observed = ObservedLinear(w, np.zeros(1, np.float32))
    observed.observe_input(x)
    observed.observe_input(x * np.float32(2))  # a growing range: the upscale/combine kernels
    observed.calibrate(x)
    model = observed.convert()
    model.stages(x)
    if saturate:
        model.linear(model.quant(x), saturate_int16_pairs=True)


def environment(torch_env: dict, config: StudyConfig) -> dict:
    """Versions, CPU features and the kernel family that change the numbers (docs/numerics.md, 'What changes these
    numbers')."""
    import numba

    from .isa import cpu_has_avx512_vnni

    family = torch_env["fbgemm_kernel"]
    return {"torch": torch_env["torch"], "numpy": np.__version__, "numba": numba.__version__, "engine": config.engine,
            "cpu_isa": torch_env["cpu_isa"], "vnni": cpu_has_avx512_vnni(), "torch_threads": torch_env["torch_threads"],
            "isa": config.isa, "fbgemm_kernel": family,
            "fbgemm_kernel_detected_by": torch_env["fbgemm_kernel_detected_by"],
            "fbgemm_enable_instructions": torch_env["fbgemm_enable_instructions"],
            "refquant_saturate_int16_pairs": saturate_int16_pairs(family), "torch_side": torch_env["torch_side"]}


def run_study(config: StudyConfig, *, progress: bool = False, plot_data: bool = False,
              torch_subprocess: bool | None = None, _perturb: tuple[str, int] | None = None) -> StudyResult:
    """Run the study on both sides and compare every field.

    The torch side runs in a worker process unless torch is already imported here (``torch_subprocess=None``; see
    crosscheck.worker). ``_perturb`` is a test hook only: (field name, flat index) flips the lowest bit of that
    element of refquant's value right before it is compared, to prove a difference is caught and named.
    """
    from .worker import UsageError, torch_events

    events = torch_events(config, subprocess=torch_subprocess)  # a worker process starts on torch's side ...
    with Progress("loading refquant's Numba kernels (the first run compiles them: 10-40 s, cached afterwards)",
                  enabled=progress, delay_s=1.0):
        warm_up_refquant(expected_family(config.isa) == "avx2")  # ... while refquant loads its kernels here
    from refquant.pipeline import ObservedLinear, linear_float

    perturb = _Perturber(_perturb)
    fields: list[C.Field] = []

    def add(name: str, t: Any, r: Any, *, kind: str = C.PARITY, note: str = "") -> None:
        fields.append(C.compare(name, t, perturb(name, r), kind=kind, note=note))

    # 1. torch
    with Progress("torch: import, prepare, calibrate, convert", enabled=progress):
        kind, torch_env = next(events)
        family = torch_env["fbgemm_kernel"]
        if config.isa != "auto" and family != config.isa:
            events.close()
            raise UsageError(f"--isa {config.isa}: torch's fbgemm runs its {family} kernels in "
                             f"{torch_env['torch_side']} and cannot switch ({torch_env['fbgemm_kernel_detected_by']})")
        kind, ts = next(events)
    assert kind == "study", kind
    saturate = saturate_int16_pairs(family)

    # 2. refquant, observers fed what torch's observers saw
    with Progress("refquant: observers, convert", enabled=progress):
        observed = ObservedLinear(ts.weight, ts.bias, relu=config.relu)
        for x in ts.input_observed:
            observed.observe_input(x)
        for y in ts.output_observed:
            observed.observe_output(y)
        model = observed.convert()
        ql = model.linear
        ql.saturate_int16_pairs = saturate  # the layer's default mode (QuantizedLinear's constructor argument)

        # 3. refquant with its own float forward (separate, reported)
        own = ObservedLinear(ts.weight, ts.bias, relu=config.relu)
        own_outputs = [own.calibrate(x) for x in ts.calibration]
        own_scale, own_zp = own.output_observer.calculate_qparams()
        own_changed = not (C.compare("", ts.output_observer["scale"], own_scale).equal
                           and C.compare("", ts.output_observer["zero_point"], own_zp).equal)
        own_model = own.convert() if own_changed else None
        if own_model is not None:
            own_model.linear.saturate_int16_pairs = saturate
    own_codes_differing = 0

    # -- calibration and conversion rows
    r_in = refquant_observer_state(observed.input_observer)
    r_out = refquant_observer_state(observed.output_observer)
    _observer_rows(add, "input", ts.input_observer, r_in, NOTES["observer"])
    add("input scale", ts.input_scale, model.input_scale, note=NOTES["input_scale"])
    add("input zero_point", ts.input_zero_point, np.int64(model.input_zero_point),
        note="torch: Quantize.zero_point buffer (int64); refquant: QuantizedLinearModel.input_zero_point")
    out_note = NOTES["observer"] + ("; " + NOTES["observer_relu"] if config.relu else "")
    _observer_rows(add, "output", ts.output_observer, r_out, out_note)
    add("output scale", np.float64(ts.output_scale), np.float64(model.output_scale), note=NOTES["output_scale"])
    add("output zero_point", ts.output_zero_point, np.int64(model.output_zero_point),
        note="torch: quantized Linear's .zero_point; refquant: QuantizedLinear.output_zero_point")
    add("weight scales (per channel)", ts.weight_scales, ql.weight_scales, note=NOTES["weight_scales"])
    add("weight zero_points (per channel)", ts.weight_zero_points, ql.weight_zero_points,
        note="torch: q_per_channel_zero_points() (int64); refquant: int32, as fbgemm's prepack stores them")
    add("weight int8 (int_repr)", ts.weight_int8, ql.weight_int8, note=NOTES["weight_int8"])
    bias_name = "bias (float32, not quantized)"
    if ts.packed_bias is None and ql.bias is None:
        fields.append(C.Field(name=bias_name, kind=C.PARITY, equal=True, mismatches=0, first_mismatch=None,
                              torch=None, refquant=None, note=NOTES["no_bias"]))
    elif ts.packed_bias is None or ql.bias is None:
        fields.append(C.Field(name=bias_name, kind=C.PARITY, equal=False, mismatches=1,
                              first_mismatch={"index": None, "reason": "bias present on one side only",
                                              "torch": None, "refquant": None},
                              torch=ts.packed_bias, refquant=ql.bias, note=NOTES["bias"]))
    else:
        add(bias_name, ts.packed_bias, ql.bias, note=NOTES["bias"])
    add("col_offsets", ts.col_offsets, ql.col_offsets, kind=C.DERIVED, note=NOTES["col_offsets"])

    # -- forward passes: calibration batches, then fresh samples (as the torch side sends them)
    def comparisons(label: str) -> dict[str, C.ArrayComparison]:
        return {
            "input_codes": C.ArrayComparison(f"input codes ({label})", note=NOTES["input_codes"]),
            "accumulators": C.ArrayComparison(f"int32 accumulators ({label})", C.DERIVED, NOTES["accumulators"]),
            "output_codes": C.ArrayComparison(f"output codes ({label})", note=NOTES["output_codes"]),
            "output": C.ArrayComparison(f"dequantized output ({label})", note=NOTES["output"]),
        }

    def compare_forward(t: dict, comps: dict[str, C.ArrayComparison], batch_axis: bool) -> dict:
        r = model.stages(t["x"])
        for key, comp in comps.items():
            tv, rv = t[key], np.asarray(perturb(comp.name, r[key]))
            if batch_axis:
                tv, rv = tv[np.newaxis], rv[np.newaxis]
            comp.update(tv, rv)
        return r

    batches = f"{config.calib_batches} batch" + ("es" if config.calib_batches > 1 else "")
    calib_comps = comparisons(f"calibration, {batches}")
    sample_comps = comparisons(f"{config.samples} samples")
    in_range = (0, 255)  # quantize_per_tensor clamps to the full quint8 range even with reduce_range
    t_in_q = (ts.input_scale[0], int(ts.input_zero_point[0]), *in_range)
    r_in_q = (model.input_scale, model.input_zero_point, *in_range)
    t_out_q = (ts.output_scale, int(ts.output_zero_point), 0, 255)
    r_out_q = (model.output_scale, model.output_zero_point, 0, 255)
    keep = 200_000 if plot_data else 0
    err_t, err_r, err_own = ErrorStats(keep), ErrorStats(), ErrorStats()
    scatter_float: list[np.ndarray] = []
    scatter_quantized: list[np.ndarray] = []
    scatter_inside: list[np.ndarray] = []
    scatter_n = 0
    first = None
    with Progress(f"forward passes, both sides (calibration {batches}, then samples)", config.samples,
                  enabled=progress) as bar:
        for kind, t in events:
            if kind == "calibration":
                compare_forward(t, calib_comps, batch_axis=True)
                if first is None:
                    first = {"input": t["x"], "float_output": t["float_output"], "quantized_output": t["output"],
                             "output_codes": t["output_codes"], "input_codes": t["input_codes"]}
                continue
            r = compare_forward(t, sample_comps, batch_axis=False)
            x, y_float = t["x"], t["float_output"]
            t_inside = inside_ranges(x, y_float, t_in_q, t_out_q)
            err_t.update(t["output"], y_float, t_inside)
            err_r.update(r["output"], y_float, inside_ranges(x, y_float, r_in_q, r_out_q))
            err_own.update(r["output"], linear_float(x, ts.weight, ts.bias, config.relu))
            if own_model is not None:
                own_codes_differing += int(np.count_nonzero(own_model.linear(r["input_codes"]) != t["output_codes"]))
            if plot_data and scatter_n < 20_000:
                scatter_float.append(y_float.reshape(-1)[:20_000])
                scatter_quantized.append(t["output"].reshape(-1)[:20_000])
                scatter_inside.append(np.broadcast_to(t_inside, y_float.shape).reshape(-1)[:20_000])
                scatter_n += scatter_float[-1].size
            bar.advance(x.shape[0])
    fields.extend(c.result() for c in calib_comps.values())
    if config.samples:
        fields.extend(c.result() for c in sample_comps.values())
        add(f"error metrics ({config.samples} samples)", err_t.as_array(), err_r.as_array(), note=NOTES["error"])

    # -- refquant-only intermediates
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
                         refquant=model, refquant_observed=observed, refquant_own=own, calibration=first,
                         error=error, float_forward=float_forward)
    if plot_data:
        result.plot_data = {
            "errors": err_t.errors(),
            "scatter_float": np.concatenate(scatter_float) if scatter_float else np.zeros(0),
            "scatter_quantized": np.concatenate(scatter_quantized) if scatter_quantized else np.zeros(0),
            "scatter_inside": np.concatenate(scatter_inside) if scatter_inside else np.zeros(0, bool),
        }
    return result
