"""The model study: any eager model quantized by torch and by refquant from the same float weights and data, compared
layer by layer, bit for bit. ``python -m crosscheck.model`` runs it; ``python -m crosscheck.linear`` is its
one-layer case (crosscheck.study).

Order of events (:func:`run_model_study`):

1. torch (crosscheck.torch_model, in the worker process): probe fbgemm's kernel family (crosscheck.isa), build the
   model and its data, fuse, prepare with ``get_default_qconfig(engine)``, calibrate (recording what every observer
   saw), convert; then run the calibration batches and the evaluation inputs through the converted model, recording
   every computing call's output, each Linear call's int32 accumulators (derived) and the kernel it ran.
2. refquant (:class:`ModelComparison`): ``refquant.model.prepare(from_torch(float model),
   get_default_qconfig(engine))``, every observer fed what torch's saw, ``convert(engine=...)`` with torch's thread count and fbgemm's kernel
   family; every batch through ``QuantizedModel.trace`` with each Linear call modelling the kernel torch's call ran
   (oneDNN's per call).
3. The comparison, in call order: each observer's range, histogram and chosen clip range; each converted module's
   scale and zero point; each Linear's weight scales, zero points, int8 codes, bias and col_offsets (derived); per
   batch set, each call's int32 accumulators (derived) and output codes (floats as bit patterns), and the model's
   output. The first differing row names the layer, the field, the index and both values.

Only NumPy arrays cross from the torch worker; this module never imports torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import compare as C
from .isa import expected_family, saturate_int16_pairs
from .progress import Progress
from .runner import Perturber, _flip_lsb  # noqa: F401  (the test hook; _flip_lsb re-exported)

COMPUTING_KINDS = ("Quantize", "DeQuantize", "ConvertedLinear", "ReLU", "QFunctional")
"""refquant.model's converted modules that compute (Flatten, Identity and Dropout pass their input on)."""

SETS = ("calibration", "evaluation")

BUILTIN_MODELS = ("digits", "residual")
"""``--builtin``: the digits MLP and the residual MLP (crosscheck.models), both trained on scikit-learn's digits."""


@dataclass(frozen=True, eq=False)
class ModelConfig:
    """What ``python -m crosscheck.model`` studies (picklable: it is sent to the torch worker).

    model: "digits" or "residual" (built in, trained at start on scikit-learn's load_digits), or "user"
    (``factory`` MODULE:FUNCTION with an optional ``state_dict`` file, or a whole pickled module ``pickled`` behind
    ``trust_pickle``); ``calib`` / ``inputs``: a user model's float32 data (validated by the CLI).
    """

    model: str = "digits"
    engine: str = "fbgemm"
    isa: str = "auto"
    seed: int = 0
    factory: str | None = None
    state_dict: str | None = None
    pickled: str | None = None
    trust_pickle: bool = False
    calib: np.ndarray | None = None
    inputs: np.ndarray | None = None
    calib_path: str | None = None
    inputs_path: str | None = None
    batch_size: int = 512
    requantization: tuple[str, ...] = ()  # integer variants to measure per Linear call (crosscheck.requantization)
    cwd: str = field(default_factory=os.getcwd)  # where MODULE of --model is imported from
    torch_side: str = "crosscheck.torch_model:torch_events"

    def to_json(self) -> dict:
        return {"model": self.model, "engine": self.engine, "isa": self.isa, "seed": self.seed,
                "factory": self.factory, "state_dict": self.state_dict, "pickled": self.pickled,
                "trust_pickle": self.trust_pickle, "calib": self.calib_path, "inputs": self.inputs_path,
                "batch_size": self.batch_size, "requantization": list(self.requantization)}


def linear_kernel(engine: str, family: str):
    """refquant.model.LinearKernel modelling the kernel family a torch Linear call ran on ``engine``."""
    from refquant.model import LinearKernel

    if engine == "onednn":
        from .isa import onednn_kernel_options

        pairs, kernel = onednn_kernel_options(family)
        return LinearKernel(saturate_int16_pairs=pairs, onednn_kernel=kernel)
    if engine == "qnnpack":
        return LinearKernel()
    return LinearKernel(saturate_int16_pairs=saturate_int16_pairs(family))


def refquant_observer_state(obs) -> dict:
    """Histogram, range and chosen clip range of a refquant HistogramObserver, with torch's names.

    The clip range is the one its last ``calculate_qparams()`` chose (``new_min``, ``new_max``)."""
    if getattr(obs, "new_min", None) is None and hasattr(obs, "new_min"):
        obs.calculate_qparams()
    return {
        "histogram": np.asarray(obs.histogram) if hasattr(obs, "histogram") else None,
        "min_val": np.asarray(obs.min_val),
        "max_val": np.asarray(obs.max_val),
        "clip_min": np.asarray(obs.new_min) if hasattr(obs, "new_min") else None,
        "clip_max": np.asarray(obs.new_max) if hasattr(obs, "new_max") else None,
        "quant_min": obs.quant_min,
        "quant_max": obs.quant_max,
    }


Describe = Callable[[str, str, str | None], "tuple[str, str] | None"]
"""(layer path or call name, field key, batch set or None) -> (row name, note), or None to leave the row out."""

GENERIC_NOTES = {
    "observer min_val, max_val": "refquant's observer was fed the float32 activations torch's observer saw (recorded "
                                 "by a forward pre-hook on torch's activation_post_process); a zero is compared as "
                                 "+0.0 (torch's aminmax gives either sign, depending on its thread count)",
    "observer histogram": "the HistogramObserver's 2048 float32 bins after calibration",
    "observer calibrated range": "the [min, max] HistogramObserver._non_linear_param_search chose (its clip range, "
                                 "from which the qparams come)",
    "scale": "the converted module's output scale (Quantize: its float32 buffer; Linear, QFunctional: a Python float)",
    "zero_point": "the converted module's output zero point",
    "weight scales (per channel)": "torch: q_per_channel_scales() (float64); refquant: float32, widened exactly",
    "weight scale (per tensor)": "torch: q_scale() (a double); refquant: float32, widened exactly",
    "weight zero_points (per channel)": "torch: q_per_channel_zero_points() (int64); refquant: int32",
    "weight zero_point (per tensor)": "torch: q_zero_point(); refquant: int32",
    "weight int8 (int_repr)": "torch: weight().int_repr(); refquant: ConvertedLinear.weight_int8",
    "bias (float32, not quantized)": "torch: bias(); refquant: ConvertedLinear.bias",
    "col_offsets": "torch side derived from torch's int_repr() with exact int64 torch ops: sum_k qw[n,k] - "
                   "w_zp[n]*K (the engines do not expose it)",
    "int32 accumulators": "sum_k (qx - x_zp)(qw - w_zp) before requantization: torch side derived from the call's "
                          "input codes and int8 weight with exact int64 torch ops (int16-saturated pairs where the "
                          "call's kernel saturates them)",
    "output codes": "torch: the call's output .int_repr() (forward hook); refquant: QuantizedModel.trace",
    "output": "torch: the call's float32 output (forward hook); refquant: QuantizedModel.trace; float32 bits",
    "model output": "torch: converted(x); refquant: QuantizedModel(x); float32 bits",
}


def generic_describe(name: str, key: str, set_name: str | None) -> tuple[str, str]:
    return (f"{name} {key}" + (f" ({set_name})" if set_name else ""), GENERIC_NOTES.get(key, ""))


class ModelComparison:
    """refquant's mirror of a torch :class:`~crosscheck.torch_record.ModelRecord`, compared field by field.

    Build it from the record (observers fed, converted: :attr:`observed`, :attr:`model`), feed it every
    :class:`~crosscheck.torch_record.BatchRecord` with :meth:`add_batch`, then read :meth:`fields` and
    :meth:`layers`. ``describe`` names the rows (crosscheck.linear's names for the one-layer case);
    ``batch_axis``: stack a set's batches along a new axis (crosscheck.linear's calibration rows) instead of
    concatenating them along axis 0.
    """

    def __init__(self, record, environment: dict, *, describe: Describe = generic_describe,
                 perturb: Perturber | None = None, batch_axis: dict[str, bool] | None = None,
                 model_output_row: bool = True, requantizations: tuple[str, ...] = ()) -> None:
        from refquant import model as rm
        from refquant.qconfig import get_default_qconfig

        self.record = record
        self.engine = record.engine
        self.describe = describe
        self.perturb = perturb or Perturber(None)
        self.batch_axis = batch_axis or {}
        self.model_output_row = model_output_row
        self.requantizations = tuple(requantizations)  # crosscheck.requantization: reported rows per variant
        self.distances: dict[str, dict[tuple[str, str], Any]] = {s: {} for s in SETS}
        self.static: list[C.Field] = []
        self.forward: dict[str, dict[tuple[str, str], C.ArrayComparison]] = {s: {} for s in SETS}
        self.layer_of: dict[str, str] = {}  # row name -> layer path
        family = environment["fbgemm_kernel"]
        self.default_kernel = linear_kernel(self.engine, {"onednn": "brgemm", "qnnpack": "exact"}.get(self.engine,
                                                                                                        family))
        self.observed = rm.prepare(record.float_model, get_default_qconfig(self.engine))
        for path, batches in record.observed.items():
            for x in batches:
                self.observed.observe(path, x)
        self.model = self.observed.convert(engine=self.engine, num_threads=int(environment["torch_threads"]),
                                           saturate_int16_pairs=self.default_kernel.saturate_int16_pairs,
                                           onednn_kernel=self.default_kernel.onednn_kernel)
        self.first_call = {}
        for step in self.model.steps:
            self.first_call.setdefault(step.call.module, step.name)
        self._static_rows()
        self.predictions: dict[str, list[np.ndarray]] = {"float": [], "torch": [], "refquant": []}
        self.labels: list[np.ndarray] = []
        self.kernels_seen: dict[str, set] = {}
        self.export_batch: tuple[str, np.ndarray, dict] | None = None

    # -- rows ----------------------------------------------------------------------------------------------------

    def _add(self, layer: str, key: str, t: Any, r: Any, *, kind: str = C.PARITY) -> None:
        described = self.describe(layer, key, None)
        if described is None:
            return
        name, note = described
        f = C.compare(name, t, self.perturb(name, r), kind=kind, note=note)
        f.layer = layer
        self.static.append(f)

    def _static_rows(self) -> None:
        from refquant import model as rm

        rec = self.record
        for step in self.model.steps:
            path = step.call.module
            if step.name != self.first_call[path]:
                continue
            if path in self.observed.observers and path in rec.observers:
                t = rec.observers[path]
                r = refquant_observer_state(self.observed.observers[path])
                # + 0.0 turns -0.0 into +0.0 on both sides: torch's aminmax gives either sign for a zero min/max
                # depending on its thread count, and the sign changes no bin, scale or zero point (refquant.histogram)
                zero = np.float32(0)
                self._add(path, "observer min_val, max_val",
                          np.array([t["min_val"], t["max_val"]], np.float32) + zero,
                          np.array([r["min_val"], r["max_val"]], np.float32) + zero)
                if t["histogram"] is not None:
                    self._add(path, "observer histogram", t["histogram"], r["histogram"])
                if t["clip_min"] is not None:
                    self._add(path, "observer calibrated range", np.array([t["clip_min"], t["clip_max"]], np.float32),
                              np.array([r["clip_min"], r["clip_max"]], np.float32))
            mod = self.model.modules[path]
            t = rec.converted.get(path)
            if isinstance(mod, rm.Quantize):
                self._add(path, "scale", t["scale"], np.float32(mod.scale))
                self._add(path, "zero_point", t["zero_point"], np.int64(mod.zero_point))
            elif isinstance(mod, rm.QFunctional):
                self._add(path, "scale", t["scale"], np.float64(mod.scale))
                self._add(path, "zero_point", t["zero_point"], np.int64(mod.zero_point))
            elif isinstance(mod, rm.ConvertedLinear):
                ql = self.model.layer(step.name)
                self._add(path, "scale", t["scale"], np.float64(mod.scale))
                self._add(path, "zero_point", t["zero_point"], np.int64(mod.zero_point))
                per = "s (per channel)" if t["per_channel"] else " (per tensor)"
                self._add(path, f"weight scale{per}", t["weight_scales"], ql.weight_scales)
                self._add(path, f"weight zero_point{per}", t["weight_zero_points"], ql.weight_zero_points)
                self._add(path, "weight int8 (int_repr)", t["weight_int8"], ql.weight_int8)
                self._bias_row(path, t["bias"], rm.stored_bias(mod, self.engine))
                self._add(path, "col_offsets", t["col_offsets"], ql.col_offsets, kind=C.DERIVED)

    def _bias_row(self, path: str, t: Any, r: Any) -> None:
        described = self.describe(path, "bias (float32, not quantized)", None)
        if described is None:
            return
        name, note = described
        if t is None and r is None:
            f = C.Field(name=name, kind=C.PARITY, equal=True, mismatches=0, first_mismatch=None, torch=None,
                        refquant=None, note=self.describe(path, "no bias", None)[1])
        elif t is None or r is None:
            f = C.Field(name=name, kind=C.PARITY, equal=False, mismatches=1,
                        first_mismatch={"index": None, "reason": "bias present on one side only", "torch": None,
                                        "refquant": None}, torch=t, refquant=r, note=note)
        else:
            f = C.compare(name, t, self.perturb(name, r), note=note)
        f.layer = path
        self.static.append(f)

    # -- batches -------------------------------------------------------------------------------------------------

    def add_batch(self, b) -> tuple[np.ndarray, dict]:
        """Run one recorded batch through refquant's model and compare every call; returns (refquant's output,
        the traces)."""
        kernels = {name: linear_kernel(self.engine, fam) for name, fam in b.kernels.items()}
        for name, fam in b.kernels.items():
            self.kernels_seen.setdefault(name, set()).add(fam)
        y, traces = self.model.forward_traced(b.x, linear_kernels=kernels)
        comps = self.forward[b.set]
        stack = self.batch_axis.get(b.set, False)

        def compare(name: str, key: str, module: str, kind: str, t: Any, r: Any) -> None:
            if (name, key) not in comps:
                described = self.describe(name, key, b.set)
                comps[(name, key)] = None if described is None else C.ArrayComparison(described[0], kind,
                                                                                       described[1])
                if comps[(name, key)] is not None:
                    self.layer_of[comps[(name, key)].name] = module
            comp = comps[(name, key)]
            if comp is None:
                return
            r = np.asarray(self.perturb(comp.name, r))
            t = np.asarray(t) if t is not None else np.zeros(0, np.uint8)
            if stack:
                t, r = t[np.newaxis], r[np.newaxis]
            comp.update(t, r)

        for name, tr in traces.items():
            if tr.kind not in COMPUTING_KINDS:
                continue
            if tr.accumulators is not None:
                compare(name, "int32 accumulators", tr.module, C.DERIVED, b.accumulators.get(name), tr.accumulators)
            key = "output" if tr.output_qparams is None else "output codes"
            compare(name, key, tr.module, C.PARITY, b.calls.get(name), tr.output)
            if tr.accumulators is not None and name in b.calls:
                self._distances(b.set, name, tr, b.calls[name])
        if self.model_output_row:
            compare("model", "output", "", C.PARITY, b.output, y)
        if b.set == "evaluation":
            self._predictions(b, y)
        if self.export_batch is None or (b.set == "evaluation" and self.export_batch[0] == "calibration"):
            self.export_batch = (b.set, b.x, kernels)  # the first evaluation batch (else the first calibration one)
        return y, traces

    def _distances(self, set_name: str, name: str, trace, torch_codes: np.ndarray) -> None:
        """Each ``requantizations`` variant's codes from this Linear call's int32 accumulators against torch's
        (crosscheck.requantization.Distance), accumulated per batch set and call."""
        from .requantization import Distance

        for variant in self.requantizations:
            key = (name, variant)
            if key not in self.distances[set_name]:
                described = self.describe(name, f"output codes, requantization={variant}", set_name)
                self.distances[set_name][key] = None if described is None else (described[0], trace.module,
                                                                                Distance(variant))
            entry = self.distances[set_name][key]
            if entry is not None:
                entry[2].update(self.model.layer(name), trace.accumulators, torch_codes)

    def export(self, directory: str, *, requantization: str | None = None) -> list[str]:
        """Write the converted model's integer program (refquant.export.export_model) with the test vectors of the
        first evaluation batch (or, without one, the first calibration batch) to ``directory/model.npz``,
        ``.json`` and ``.h``, each Linear step bound to the kernel torch's call ran on that batch, and with
        ``requantization`` (None: each Linear's engine float path; else an integer variant of
        refquant.fixed_point for every Linear); returns the paths. refquant.program refuses what it does not
        export (QFunctional add, mul, cat) with a ValueError."""
        from refquant.export import export_model

        os.makedirs(directory, exist_ok=True)
        _, x, kernels = self.export_batch
        path = os.path.join(directory, "model")
        export_model(self.model.with_linear_kernels(kernels), x, path, requantization=requantization)
        return [path + suffix for suffix in (".npz", ".json", ".h")]

    def _predictions(self, b, y: np.ndarray) -> None:
        if b.labels is None or y.ndim != 2:
            return
        self.predictions["float"].append(np.argmax(b.float_output, axis=1))
        self.predictions["torch"].append(np.argmax(b.output, axis=1))
        self.predictions["refquant"].append(np.argmax(y, axis=1))
        self.labels.append(np.asarray(b.labels))

    # -- results -------------------------------------------------------------------------------------------------

    def fields(self) -> list[C.Field]:
        """Every row: the static ones in call order, then each batch set's, call by call."""
        out = list(self.static)
        for s in SETS:
            for comp in self.forward[s].values():
                if comp is not None:
                    f = comp.result()
                    f.layer = self.layer_of.get(comp.name)
                    out.append(f)
        for s in SETS:  # the reported requantization rows last (kind "requantization", never counted)
            for entry in self.distances[s].values():
                if entry is not None:
                    out.append(entry[2].result(entry[0], entry[1]))
        return out

    def layers(self, fields: list[C.Field]) -> list[dict]:
        """One entry per module that computes, in call order: its torch path and types, its calls, its output
        qparams, and the indices of its rows in ``fields``."""
        rec, qparams = self.record, self.model.qparams
        out, index = [], {}
        for step in self.model.steps:
            path = step.call.module
            kind = type(self.model.modules[path]).__name__
            if kind not in COMPUTING_KINDS:
                continue
            if path not in index:
                index[path] = len(out)
                qp = qparams.get(path)
                out.append({"path": path, "torch_type": rec.torch_types.get(path),
                            "converted_type": rec.converted_types.get(path), "refquant_type": kind, "calls": [],
                            "scale": None if qp is None else qp[0], "zero_point": None if qp is None else qp[1],
                            "fields": []})
            out[index[path]]["calls"].append(step.name)
            if step.name in self.kernels_seen:
                out[index[path]].setdefault("kernels", {})[step.name] = sorted(self.kernels_seen[step.name])
        for i, f in enumerate(fields):
            if f.layer in index:
                out[index[f.layer]]["fields"].append(i)
        for entry in out:
            rows = [fields[i] for i in entry["fields"] if fields[i].counted]
            entry["equal"] = all(f.equal for f in rows)
            entry["values"] = sum(int(f.size) for f in rows)
            entry["mismatches"] = sum(int(f.mismatches or 0) for f in rows)
            bad = next((f for f in rows if not f.equal), None)
            entry["first_mismatch"] = None if bad is None else {"field": bad.name, **(bad.first_mismatch or {})}
        return out

    def accuracy(self) -> dict | None:
        """Accuracy of the float, torch-quantized and refquant-quantized models on labelled evaluation inputs, and
        how many predictions quantization flipped (None without labels)."""
        if not self.labels:
            return None
        labels = np.concatenate(self.labels)
        p = {k: np.concatenate(v) for k, v in self.predictions.items()}
        n = int(labels.size)
        out = {"n": n}
        for k, v in p.items():
            correct = int((v == labels).sum())
            out[k] = {"correct": correct, "accuracy": correct / n if n else math.nan}
        out["identical_predictions"] = bool(np.array_equal(p["torch"], p["refquant"]))
        out["flipped_by_quantization"] = int((p["torch"] != p["float"]).sum())
        out["flipped_by_quantization_refquant"] = int((p["refquant"] != p["float"]).sum())
        return out


def first_divergence(fields: list[C.Field]) -> dict | None:
    """The first counted row that differs, as {"layer", "field", "index", "torch", "refquant", ...}, or None."""
    for f in fields:
        if f.counted and not f.equal:
            return {"layer": getattr(f, "layer", None), "field": f.name, **(f.first_mismatch or {})}
    return None


def warm_up_refquant(saturate: bool = False, *, in_features: int = 2, out_features: int = 1,
                     calibration_shape: tuple[int, ...] = (2, 2),
                     forward_shapes: tuple[tuple[int, ...], ...] = ((2, 2),)) -> None:
    """Run refquant's one-layer pipeline once on synthetic data while the torch worker starts: observe and calibrate
    on batches of ``calibration_shape``, then quantize, accumulate and requantize batches of ``forward_shapes``
    (last dimension ``in_features``). refquant's dispatchers choose NumPy or a Numba kernel by size (the KERNEL_MIN_*
    thresholds of refquant.histogram, refquant.quantize, refquant.engines, refquant.matmul) as they will for a study
    of these shapes, so the kernels that study runs are loaded from Numba's cache now (compiled on a first run:
    seconds), and a small study (the default, tiny shapes) loads none. ``saturate`` also runs the int16-pair product
    (eq. M2)."""
    from refquant.pipeline import ObservedLinear

    def ramp(shape: tuple[int, ...]) -> np.ndarray:
        return np.linspace(-1, 1, math.prod(shape), dtype=np.float32).reshape(shape)

    w = ramp((out_features, in_features)) * np.float32(0.5)
    observed = ObservedLinear(w, np.zeros(out_features, np.float32))
    x = ramp(calibration_shape)
    observed.observe_input(x)
    observed.observe_input(x * np.float32(2))  # a growing range: the re-binning
    observed.calibrate(x)
    model = observed.convert()
    for shape in forward_shapes:
        x = ramp(shape)
        model.stages(x)
        model.linear(model.quant(x))  # QuantizedLinear's call (the fused kernel, for a large product)
        if saturate:
            model.linear(model.quant(x), saturate_int16_pairs=True)


def environment(torch_env: dict, engine: str, isa: str) -> dict:
    """Versions, CPU features and the kernel family that change the numbers (docs/numerics.md, 'What changes these
    numbers')."""
    import numba

    from .isa import cpu_has_avx512_vnni

    family = torch_env["fbgemm_kernel"]
    return {"torch": torch_env["torch"], "numpy": np.__version__, "numba": numba.__version__, "engine": engine,
            "cpu_isa": torch_env["cpu_isa"], "vnni": cpu_has_avx512_vnni(), "torch_threads": torch_env["torch_threads"],
            "isa": isa, "fbgemm_kernel": family,
            "fbgemm_kernel_detected_by": torch_env["fbgemm_kernel_detected_by"],
            "fbgemm_enable_instructions": torch_env["fbgemm_enable_instructions"],
            "refquant_saturate_int16_pairs": saturate_int16_pairs(family), "torch_side": torch_env["torch_side"]}


def start(config, *, progress: bool, torch_subprocess: bool | None, warm_up: Callable[[bool], None] | None = None):
    """Start the torch side (a worker process unless torch is loaded here) and warm refquant's kernels meanwhile
    (``warm_up``, default :func:`warm_up_refquant`; its own progress phase); returns the events iterator."""
    from .worker import collector_paused, torch_events

    warm_up = warm_up_refquant if warm_up is None else warm_up
    events = torch_events(config, subprocess=torch_subprocess)  # a worker process starts on torch's side ...
    with Progress("loading refquant's Numba kernels (the first run compiles them: 10-40 s, cached afterwards)",
                  enabled=progress, delay_s=1.0), collector_paused():
        warm_up(expected_family(config.isa) == "avx2")  # ... while refquant loads its kernels here
    return events


def receive_environment(events, config) -> dict:
    """torch's first event, its environment; refuses an --isa torch cannot honour."""
    from .worker import UsageError

    kind, torch_env = next(events)
    assert kind == "environment", kind
    family = torch_env["fbgemm_kernel"]
    if config.isa != "auto" and family != config.isa:
        events.close()
        raise UsageError(f"--isa {config.isa}: torch's fbgemm runs its {family} kernels in "
                         f"{torch_env['torch_side']} and cannot switch ({torch_env['fbgemm_kernel_detected_by']})")
    return torch_env


def receive_model(events):
    """torch's second event, the model's record, with its float model built in refquant (the worker reads it without
    refquant: crosscheck.from_torch.DeferredFloatModel); a model refquant cannot run is a UsageError, as in the
    worker (crosscheck.torch_model.quantize_and_record)."""
    from .from_torch import built_float_model
    from .worker import UsageError

    kind, record = next(events)
    assert kind == "model", kind
    try:
        record.float_model = built_float_model(record.float_model)
    except ValueError as e:  # refquant.model.ModelError, or a model with a quantized output
        events.close()
        raise UsageError(f"the model cannot be studied: {e}") from None
    return record


@dataclass
class ModelStudyResult(C.CountedRows):
    config: ModelConfig
    environment: dict
    record: Any  # crosscheck.torch_record.ModelRecord
    comparison: ModelComparison
    fields: list[C.Field]
    layers: list[dict]
    accuracy: dict | None
    batches: dict = field(default_factory=dict)  # set -> number of batches, inputs
    exported: list[str] | None = None  # the files of --export

    @property
    def first_divergence(self) -> dict | None:
        return first_divergence(self.fields)


def run_model_study(config: ModelConfig, *, progress: bool = False, torch_subprocess: bool | None = None,
                    _perturb: tuple[str, int] | None = None) -> ModelStudyResult:
    """Run the model study on both sides and compare every layer (see the module docstring).

    ``_perturb`` is a test hook only: (row name, flat index) flips the lowest bit of that element of refquant's
    value right before it is compared.
    """
    events = start(config, progress=progress, torch_subprocess=torch_subprocess)
    with Progress("torch: import, build the model and its data, prepare, calibrate, convert", enabled=progress):
        torch_env = receive_environment(events, config)
        record = receive_model(events)
    env = environment(torch_env, config.engine, config.isa)
    with Progress("refquant: observers, convert", enabled=progress):
        comparison = ModelComparison(record, torch_env, perturb=Perturber(_perturb),
                                     requantizations=config.requantization)
    batches = {s: [0, 0] for s in SETS}
    with Progress("forward passes, both sides, layer by layer", enabled=progress):
        for kind, b in events:
            comparison.add_batch(b)
            batches[b.set][0] += 1
            batches[b.set][1] += int(b.x.shape[0]) if b.x.ndim else 1
    fields = comparison.fields()
    return ModelStudyResult(config=config, environment=env, record=record, comparison=comparison, fields=fields,
                            layers=comparison.layers(fields), accuracy=comparison.accuracy(),
                            batches={s: {"batches": n, "inputs": m} for s, (n, m) in batches.items()})
