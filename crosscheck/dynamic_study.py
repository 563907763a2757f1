"""The dynamic study: torch's ``quantize_dynamic`` Linear and refquant's ``DynamicQuantizedLinear`` from the same
float weights, called on the same samples, every value compared (``python -m crosscheck.linear --dynamic``).

Order of events (:func:`run_dynamic_study`):

1. torch (crosscheck.torch_dynamic, in a worker process): probe the fbgemm kernel family (crosscheck.isa), build
   the Linear from the seed, ``quantize_dynamic`` it on the engine, call it once per sample (each call chooses its
   own input qparams), deriving what the op does not return from torch's own ops.
2. refquant: ``DynamicQuantizedLinear.from_float(weight, bias, engine, weight_qscheme)`` from torch's float weight
   and bias, then ``stages(x)`` for every sample, with the same chunks.
3. one row per field: the weight (codes, scales, zero points), the bias, and per call the batch range, the chosen
   input scale and zero point, the input codes and int32 accumulators (derived rows), the float outputs (bit
   patterns), oneDNN's kernel (onednn), and the error against torch's float model computed by the same code for both.

How refquant knows the machine-dependent choices, and how they are checked:

* fbgemm/x86: ``saturate_int16_pairs`` from the probed kernel family (crosscheck.isa). The module passes
  reduce_range=True, so its 7-bit codes cannot saturate an int16 pair (2·127·128 < 2^15): the family does not change
  these numbers; it is reported.
* onednn: refquant's own prediction, ``refquant.dynamic.default_onednn_kernel()`` (the CPU's features, capped by
  ONEDNN_MAX_CPU_ISA) with the small-shape rule ``onednn_kernel_for_shape``, picks the output formula of every call;
  the torch worker reads oneDNN's verbose line of every call, and the parity row "oneDNN kernel per call" compares
  the two (1 = the AMX kernel's combined scale, eq. DQ5d in refquant.dynamic; 0 = two multiplies, DQ5c).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compare as C
from .isa import saturate_int16_pairs
from .progress import Progress
from .runner import ErrorSums, Perturber, UsageError, onednn_impl_kind, torch_events
from .worker import collector_paused

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
WEIGHT_QSCHEMES = ("per_tensor_symmetric", "per_channel_symmetric")
QCONFIG_NAMES = {"per_tensor_symmetric": "default_dynamic_qconfig",
                 "per_channel_symmetric": "per_channel_dynamic_qconfig"}


@dataclass(frozen=True)
class DynamicConfig:
    """The options of ``--dynamic``. The defaults give the static study's layer and samples, dynamically."""

    in_features: int = 3
    out_features: int = 3
    input_shape: tuple[int, ...] = (1, 2, 3, 3)
    calib_dist: str = "normal"  # the samples' distribution (there is no calibration: the name is crosscheck.linear's)
    samples: int = 1000
    seed: int = 0
    bias: bool = True
    engine: str = "fbgemm"
    weight_qscheme: str = "per_tensor_symmetric"
    isa: str = "auto"

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        d["dynamic"] = True
        return d


NOTES = {
    "weight_int8": "torch: module.weight().int_repr(); refquant: DynamicQuantizedLinear.weight_int8 "
                   "(the qconfig's weight observer, then quantize)",
    "weight_scales": "torch: q_scale() (per tensor) or q_per_channel_scales(), float64; refquant: weight_scales "
                     "(float64: the observer's float32 scales widened, as torch holds them)",
    "weight_zero_points": "torch: q_zero_point() / q_per_channel_zero_points() (int64); refquant: int32",
    "bias": "torch: module.bias(); refquant: bias. float32 and never quantized, on every engine",
    "qnnpack_bias": "no bias, on qnnpack: its prepack stores a zero bias (at::zeros, PackedLinearWeightsQnnp::"
                    "prepack), so torch's module.bias() returns zeros; refquant's layer holds None and adds zeros "
                    "(eq. DQ5b of refquant.dynamic); compared: torch's zeros vs those zeros",
    "no_bias": "no bias: nn.Linear(bias=False); torch's module.bias() and refquant's bias are both None",
    "x_min_max": "per call: torch side derived with torch.aminmax(x) (the op computes it inside: FindMinMax); "
                 "refquant: stages(x)['x_min'], ['x_max'] (eq. DQ1 of refquant.dynamic)",
    "input_scale": "per call, the double scale: torch side derived with torch._choose_qparams_per_tensor(x, "
                   "reduce_range), the quant_utils function the op calls; refquant: stages(x)['input_scale']",
    "input_zero_point": "per call: torch side derived as for the scale; refquant: stages(x)['input_zero_point']",
    "input_codes": "per call: torch side derived with torch.quantize_per_tensor(x, scale, zero_point, quint8), the "
                   "FMA quantize the op runs (refquant.quantize eq. Q1); refquant: stages(x)['input_codes']",
    "accumulators": "per call: Σ_k (q_x − z_x)(q_w − z_w), torch side derived from torch's codes and int_repr() with "
                    "exact int64 ops (the op keeps them inside); refquant: stages(x)['accumulators']",
    "output": "per call: torch: module(x); refquant: DynamicQuantizedLinear(x); float32 compared as bit patterns",
    "kernel": "per call: 1 = oneDNN's AMX kernel or gemm:jit on AVX2 (the combined scale f32(s_x'·s_w'), refquant "
              "formula onednn_combined_scale), 0 = its other brgemm kernels (two multiplies, onednn_two_multiplies). "
              "torch: "
              "the implementation ONEDNN_VERBOSE named in the torch worker; refquant: its own prediction "
              "(default_onednn_kernel() and onednn_kernel_for_shape)",
    "error": "[mean |e|, max |e|, SQNR dB] against torch's float model (nn.Linear on the same inputs), computed by the "
             "same code for both sides; float64 bits",
    "onednn_codes": "onednn: oneDNN quantizes inside its own reorder, no torch op returns these codes (refquant: "
                    "f32(f32(x·f32(1/s_x')) + z_x), then rint: refquant.quantize eq. Q1c)",
    "onednn_acc": "onednn: no torch op returns oneDNN's int32 sums (refquant: stages(x)['accumulators'])",
    "scale_used": "per call, the float32 input scale the engine multiplies by: f32(scale), or on onednn "
                  "f32(1/f64(f32(1/scale))) after the reciprocal round trip",
    "weight_scales_used": "the float32 weight scales the engine multiplies by (onednn: after the reciprocal "
                          "round trip)",
}


@dataclass
class DynamicResult(C.CountedRows):
    config: DynamicConfig
    environment: dict
    fields: list[C.Field]
    layer: dict  # torch's layer record (crosscheck.torch_dynamic)
    refquant: Any  # refquant.dynamic.DynamicQuantizedLinear
    first_calls: list[dict]  # the first few calls: x_min, x_max, scale, zero_point (torch's derived values)
    first_sample: dict | None  # x, float output, torch's output
    error: dict
    torch_warnings: list[str] = field(default_factory=list)


def warm_up_refquant(engine: str) -> None:
    """Load refquant's Numba kernels of the dynamic path (compiled on the first run) while torch starts."""
    from refquant.dynamic import DynamicQuantizedLinear

    w = np.array([[0.5, -0.25]], np.float32)
    kw = {"onednn_kernel": "brgemm_vnni"} if engine == "onednn" else {}
    DynamicQuantizedLinear.from_float(w, np.zeros(1, np.float32), engine=engine, **kw).stages(
        np.array([[1.0, -2.0], [0.5, 0.25]], np.float32))


def environment(torch_env: dict, config: DynamicConfig, onednn: dict | None) -> dict:
    import numba

    from .isa import cpu_has_avx512_vnni

    family = torch_env["fbgemm_kernel"]
    env = {"torch": torch_env["torch"], "numpy": np.__version__, "numba": numba.__version__, "engine": config.engine,
           "cpu_isa": torch_env["cpu_isa"], "vnni": cpu_has_avx512_vnni(), "torch_threads": torch_env["torch_threads"],
           "isa": config.isa, "fbgemm_kernel": family,
           "fbgemm_kernel_detected_by": torch_env["fbgemm_kernel_detected_by"],
           "fbgemm_enable_instructions": torch_env["fbgemm_enable_instructions"],
           "refquant_saturate_int16_pairs": saturate_int16_pairs(family) and config.engine in ("fbgemm", "x86"),
           "torch_side": torch_env["torch_side"]}
    if onednn is not None:
        env["onednn"] = onednn
    return env


def run_dynamic_study(config: DynamicConfig, *, progress: bool = False, torch_subprocess: bool | None = None,
                      _perturb: tuple[str, int] | None = None) -> DynamicResult:
    """Run both sides and compare every field; ``_perturb`` (tests only) flips one bit of one refquant value."""
    events = torch_events("crosscheck.torch_dynamic", config, subprocess=torch_subprocess)
    with Progress("loading refquant's Numba kernels (the first run compiles them: 10-40 s, cached afterwards)",
                  enabled=progress, delay_s=1.0), collector_paused():
        warm_up_refquant(config.engine)
    from refquant.dynamic import DynamicQuantizedLinear, default_onednn_kernel

    perturb = Perturber(_perturb)
    fields: list[C.Field] = []

    def add(name: str, t: Any, r: Any, *, kind: str = C.PARITY, note: str = "") -> None:
        fields.append(C.compare(name, t, perturb(name, r), kind=kind, note=note))

    with Progress(f"torch: import, quantize_dynamic on {config.engine}", enabled=progress):
        kind, torch_env = next(events)
        family = torch_env["fbgemm_kernel"]
        if config.isa != "auto" and family != config.isa:
            events.close()
            raise UsageError(f"--isa {config.isa}: torch's fbgemm runs its {family} kernels in "
                             f"{torch_env['torch_side']} and cannot switch ({torch_env['fbgemm_kernel_detected_by']})")
        kind, layer = next(events)
    assert kind == "layer", kind

    # refquant, from torch's float weight and bias
    kwargs: dict[str, Any] = {}
    onednn_kernel = None
    if config.engine == "onednn":
        onednn_kernel = default_onednn_kernel()
        if onednn_kernel is None:
            events.close()
            raise NotImplementedError("this CPU (or ONEDNN_MAX_CPU_ISA) runs an int8 path of oneDNN below AVX2, "
                                      "which refquant does not model (refquant.dynamic.default_onednn_kernel)")
        kwargs["onednn_kernel"] = onednn_kernel
    elif config.engine in ("fbgemm", "x86"):
        kwargs["saturate_int16_pairs"] = saturate_int16_pairs(family)
    dql = DynamicQuantizedLinear.from_float(layer["weight"], layer["bias"], engine=config.engine,
                                            weight_qscheme=config.weight_qscheme, **kwargs)

    add("weight int8 (int_repr)", layer["weight_int8"], dql.weight_int8, note=NOTES["weight_int8"])
    add("weight scales" + (" (per channel)" if config.weight_qscheme.startswith("per_channel") else ""),
        layer["weight_scales"], dql.weight_scales, note=NOTES["weight_scales"])
    add("weight zero_points", layer["weight_zero_points"], dql.weight_zero_points, note=NOTES["weight_zero_points"])
    bias_name = "bias (float32, not quantized)"
    r_bias = dql.bias
    if r_bias is None and config.engine == "qnnpack":
        r_bias = np.zeros(dql.out_features, np.float32)  # what qnnpack's packed weight holds (NOTES["qnnpack_bias"])
    if layer["packed_bias"] is None and r_bias is None:
        fields.append(C.Field(name=bias_name, kind=C.PARITY, equal=True, mismatches=0, first_mismatch=None,
                              torch=None, refquant=None, note=NOTES["no_bias"]))
    elif layer["packed_bias"] is None or r_bias is None:
        fields.append(C.Field(name=bias_name, kind=C.PARITY, equal=False, mismatches=1,
                              first_mismatch={"index": None, "reason": "bias present on one side only",
                                              "torch": None, "refquant": None},
                              torch=layer["packed_bias"], refquant=r_bias, note=NOTES["bias"]))
    else:
        add(bias_name, layer["packed_bias"], r_bias,
            note=NOTES["qnnpack_bias"] if dql.bias is None else NOTES["bias"])

    S = config.samples
    onednn = config.engine == "onednn"
    comps = {
        "x_min_max": C.ArrayComparison(f"batch min, max ({S} calls)", C.DERIVED, NOTES["x_min_max"]),
        "input_scale": C.ArrayComparison(f"input scale, double ({S} calls)", C.DERIVED, NOTES["input_scale"]),
        "input_zero_point": C.ArrayComparison(f"input zero_point ({S} calls)", C.DERIVED,
                                              NOTES["input_zero_point"]),
    }
    if not onednn:
        comps["input_codes"] = C.ArrayComparison(f"input codes ({S} calls)", C.DERIVED, NOTES["input_codes"])
        comps["accumulators"] = C.ArrayComparison(f"int32 accumulators ({S} calls)", C.DERIVED,
                                                  NOTES["accumulators"])
    else:
        comps["kernel"] = C.ArrayComparison(f"oneDNN kernel per call ({S} calls)", C.PARITY, NOTES["kernel"])
    comps["output"] = C.ArrayComparison(f"float output ({S} calls)", C.PARITY, NOTES["output"])
    err_t, err_r = ErrorSums(), ErrorSums()
    scale_used: list[np.float32] = []
    onednn_codes: list[np.ndarray] = []
    onednn_acc: list[np.ndarray] = []
    impl_counts: dict[str, int] = {}
    formula_counts: dict[str, int] = {}
    first_calls: list[dict] = []
    first_sample = None
    torch_warnings = layer.get("warnings", [])
    with Progress(f"calls, both sides ({S} samples, one call each)", S, enabled=progress) as bar:
        for kind, t in events:
            assert kind == "samples", kind
            n = t["x"].shape[0]
            stages = [dql.stages(t["x"][i]) for i in range(n)]
            r = {
                "x_min_max": np.array([[s["x_min"], s["x_max"]] for s in stages], np.float32),
                "input_scale": np.array([s["input_scale"] for s in stages], np.float64),
                "input_zero_point": np.array([s["input_zero_point"] for s in stages], np.int64),
                "input_codes": np.stack([s["input_codes"] for s in stages]),
                "accumulators": np.stack([s["accumulators"] for s in stages]),
                "output": np.stack([s["output"] for s in stages]),
                "kernel": np.array([s["output_formula"] == "onednn_combined_scale" for s in stages], np.int64),
            }
            if onednn:
                kinds = [onednn_impl_kind(i) for i in t["onednn_impls"]]
                t = dict(t, kernel=np.array([{"amx": 1, "vnni": 0, "no_vnni": 0, "gemm": 1}.get(k, -1) for k in kinds],
                                            np.int64))
                for impl in t["onednn_impls"]:
                    impl_counts[impl] = impl_counts.get(impl, 0) + 1
                onednn_codes.append(r["input_codes"])
                onednn_acc.append(r["accumulators"])
            for s in stages:
                formula_counts[s["output_formula"]] = formula_counts.get(s["output_formula"], 0) + 1
                scale_used.append(np.float32(s["input_scale_used"]))
            for key, comp in comps.items():
                comp.update(t[key], perturb(comp.name, r[key]))
            err_t.update(t["output"], t["float_output"])
            err_r.update(r["output"], t["float_output"])
            for i in range(min(n, 8 - len(first_calls))):
                first_calls.append({"x_min": t["x_min_max"][i, 0], "x_max": t["x_min_max"][i, 1],
                                    "scale": t["input_scale"][i], "zero_point": int(t["input_zero_point"][i])})
            if first_sample is None:
                first_sample = {"x": t["x"][0], "float_output": t["float_output"][0], "output": t["output"][0],
                                "refquant_output": r["output"][0]}
            bar.advance(n)
    if S:
        fields.extend(c.result() for c in comps.values())
        add(f"error metrics ({S} calls)", err_t.as_array(), err_r.as_array(), note=NOTES["error"])

    # refquant-only intermediates
    if onednn and S:
        fields.append(C.refquant_only(f"input codes ({S} calls)", np.concatenate(onednn_codes),
                                      NOTES["onednn_codes"]))
        fields.append(C.refquant_only(f"int32 accumulators ({S} calls)", np.concatenate(onednn_acc),
                                      NOTES["onednn_acc"]))
    if S:
        fields.append(C.refquant_only(f"input scale used, float32 ({S} calls)", np.array(scale_used, np.float32),
                                      NOTES["scale_used"]))
    fields.append(C.refquant_only("weight scales used, float32", dql.weight_scales_used,
                                  NOTES["weight_scales_used"]))

    onednn_env = None
    if onednn:
        onednn_env = {"refquant_kernel": onednn_kernel,
                      "refquant_kernel_predicted_by": "refquant.dynamic.default_onednn_kernel() (CPU features, "
                                                      "ONEDNN_MAX_CPU_ISA) and onednn_kernel_for_shape (M, K, N)",
                      "refquant_formulas": formula_counts,
                      "torch_impls": impl_counts,
                      "torch_impls_detected_by": "ONEDNN_VERBOSE, one exec,cpu,matmul line per call, read in the "
                                                 "torch process"}
    error = {"samples": S, "distribution": config.calib_dist,
             "reference": "torch's float model (nn.Linear, fp32) on the same inputs",
             "torch": err_t.result(), "refquant": err_r.result(),
             "equal": bool(np.array_equal(err_t.as_array().view(np.uint64), err_r.as_array().view(np.uint64)))}
    return DynamicResult(config=config, environment=environment(torch_env, config, onednn_env), fields=fields,
                         layer=layer, refquant=dql, first_calls=first_calls, first_sample=first_sample, error=error,
                         torch_warnings=torch_warnings)
