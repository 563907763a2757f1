"""One float layer and one data set through every static engine, torch vs refquant, and why the engines differ
(``python -m crosscheck.engines``).

Four parts (:func:`run_engines_study`):

(a) **own qconfigs** — for each of fbgemm, x86, qnnpack, onednn: torch's eager flow, ``get_default_qconfig(engine)``
    (crosscheck.torch_engines_study) against ``refquant.pipeline.ObservedLinear(engine=...)`` fed the activations
    torch's observers saw: every field compared, as crosscheck.linear compares its one engine.
(b) **shared qparams** — fbgemm's input and output qparams and int8 weights forced onto every engine (torch:
    ``linear_prepack`` of fbgemm's quantized weight on each engine; refquant: ``QuantizedLinear.from_quantized`` with
    ``engine=``): output codes and accumulators compared per engine.
(c) **dynamic** — each engine's ``quantize_dynamic`` Linear (default_dynamic_qconfig) called once per chunk of data
    against ``refquant.dynamic.DynamicQuantizedLinear(engine=...)``: weights, bias, float outputs (bits).
(d) **why they differ** — for each engine B, a chain of refquant layers from fbgemm's to B's that swaps one
    ingredient at a time (:class:`Recipe`): the input qparams, the output qparams, the weights (qnnpack's per-tensor
    qconfig), the int16 pair saturation of the accumulation, the scales' reciprocal round trip (onednn), the bias
    (qnnpack's int32 bias), the multiplier / requantization formula, where the output zero point is added (onednn:
    before the rounding), and the saturation of the conversion; for the dynamic Linears (:class:`DynamicRecipe`)
    the input's code range, the reciprocal scales, the input quantize and the output formula. Every output that
    differs between fbgemm and B is attributed to the swaps that changed it, so an attribution is never a guess:
    each was reproduced by its swap. The chain starts at refquant's fbgemm layer and ends at refquant's layer of B,
    both equal to torch (parts a-c); "unexplained" counts the outputs where torch's engines differ from the chain's
    ends (0 when parity holds).

The hybrid layers in the middle of a chain are no engine's arithmetic; they are built from refquant's own pieces
(the engines' requantizers with other constants) except for one readable function, :func:`onednn_before_rounding`,
which repeats oneDNN's epilogue (refquant.engines eqs. DN4-DN6) up to the output zero point so that the zero point
and the saturation can be swapped separately. tests/test_crosscheck_engines.py checks that each chain's end equals
the engine's own refquant layer, and the attribution on constructed cases whose cause is known.

The oneDNN kernel: refquant predicts it per call (``refquant.dynamic.default_onednn_kernel()`` with the small-shape
rule ``onednn_kernel_for_shape``, which oneDNN's static matmul follows too), and the parity row "oneDNN kernel per
call" compares the prediction with the kernel oneDNN's verbose output names for that call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from . import compare as C
from .isa import expected_family, saturate_int16_pairs
from .progress import Progress
from .runner import ErrorSums, Perturber, UsageError, onednn_impl_kind, torch_events

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
OTHERS = ("x86", "qnnpack", "onednn")
KERNEL_CODES = {"vnni": 0, "amx": 1, "no_vnni": 2, "gemm": 3, "other": -1}
"""oneDNN kernel per call, as the parity row holds it: 0 brg_matmul with VNNI (two multiplies), 1 the AMX kernel
(combined scale), 2 brg_matmul:avx512_core (two multiplies, int16-saturated pairs), 3 gemm:jit on AVX2 (combined
scale, int16-saturated pairs restarting at its second K block), -1 anything else."""


@dataclass(frozen=True)
class EnginesConfig:
    """The options of ``python -m crosscheck.engines``."""

    in_features: int = 64
    out_features: int = 32
    input_shape: tuple[int, ...] = (4, 64)
    calib_batches: int = 4
    calib_dist: str = "normal"
    samples: int = 1000
    seed: int = 0
    relu: bool = False
    bias: bool = True
    isa: str = "auto"

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["input_shape"] = list(self.input_shape)
        return d


# ----------------------------------------------------------------------------------------------------------------
# refquant's side: the layers, with oneDNN's kernel predicted per call
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class OnednnPrediction:
    """Which oneDNN kernel refquant expects for an (M, K) x (K, N) call on this CPU."""

    family: str | None  # refquant.dynamic.default_onednn_kernel(): brgemm_amx, brgemm_vnni, brgemm_no_vnni,
    # gemm_no_vnni, None

    def kernel(self, M: int, K: int, N: int) -> tuple[str, bool, int]:
        """(refquant.engines onednn_kernel, saturate_int16_pairs, KERNEL_CODES value) for one call."""
        from refquant.dynamic import onednn_kernel_for_shape

        if self.family is None:
            raise NotImplementedError("this CPU runs an int8 path of oneDNN below AVX2, which refquant does not model")
        if self.family == "brgemm_no_vnni":
            return "brgemm", True, KERNEL_CODES["no_vnni"]
        if self.family == "gemm_no_vnni":
            return "gemm", True, KERNEL_CODES["gemm"]
        amx = onednn_kernel_for_shape(self.family, M, K, N) == "onednn_combined_scale"
        return ("brgemm_amx", False, 1) if amx else ("brgemm", False, 0)


class EngineModels:
    """refquant's converted model of one engine (own qconfig), one per oneDNN kernel it needs."""

    def __init__(self, engine: str, layer: dict, record: dict, pairs: bool, relu: bool):
        import warnings

        from refquant.pipeline import ObservedLinear

        self.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_default_qconfig("onednn") warns on CPUs without VNNI
            self.observed = ObservedLinear(layer["weight"], layer["bias"], relu=relu, engine=engine)
        self.pairs = pairs
        self._models: dict[tuple[str, bool], Any] = {}
        for x in record["input_observed"]:
            self.observed.observe_input(x)
        for y in record["output_observed"]:
            self.observed.observe_output(y)

    def model(self, kernel: str = "brgemm", pairs: bool | None = None):
        key = (kernel, self.pairs if pairs is None else pairs)
        if key not in self._models:
            self._models[key] = self.observed.convert(saturate_int16_pairs=key[1], onednn_kernel=kernel)
        return self._models[key]


def _layer_from(model, engine: str, *, kernel: str = "brgemm", pairs: bool = False, input_scale=None,
                weight_scales=None, output_scale=None):
    """A refquant.linear.QuantizedLinear on ``engine`` with the qparams and int8 weights of ``model`` (a
    QuantizedLinearModel), optionally with other scales (the reciprocal round trip of the chains)."""
    from refquant.linear import QuantizedLinear

    lin = model.linear
    s_w = lin.weight_scales_f64 if weight_scales is None else np.asarray(weight_scales, np.float64)
    return QuantizedLinear(lin.weight_int8, s_w, lin.weight_zero_points, lin.bias,
                           float(model.input_scale if input_scale is None else input_scale), model.input_zero_point,
                           float(lin.output_scale if output_scale is None else output_scale), lin.output_zero_point,
                           relu=lin.relu, weight_qscheme=lin.weight_qscheme, saturate_int16_pairs=pairs,
                           engine=engine, onednn_kernel=kernel)


# ----------------------------------------------------------------------------------------------------------------
# (d) the ingredients, and a layer for any combination of them
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How one layer turns float inputs into output codes: where each ingredient comes from.

    qparams_in, qparams_out, weights: the engine whose (s_x, z_x), (s_y, z_y), int8 weights and scales are used
    (its own-qconfig model, or fbgemm's for all in part b). pairs: the products are summed in int16-saturated pairs
    (refquant.matmul eq. M2). The arithmetic after the int32 ``raw``:

        scales      "plain" f32(s) | "reciprocal" s' = f32(1/f32(1/s)) for s_x, s_w, s_y (onednn's, eq. DN2)
        bias        "float" fbgemm's f32(bias / atws) added to f32(raw) (eq. L8b; FMA per tensor, L8c)
                    | "int32" qnnpack's bias_i32 = quantize(bias, s_w·s_x, qint32) added to raw in int32
        formula     "fbgemm" y = f32(t·mult), mult = f32(f32(f32(s_x)·s_w) / f32(s_y))        (eqs. L6, L7, L9)
                    | "qnnpack" y = f32(f32(acc)·rs), rs = f32(f32(s_w·f32(s_x))·f32(1/f32(s_y)))
                    | "onednn" v = f32(f32(t·s_x')·s_w') (AMX: f32(t·f32(s_x'·s_w'))), + bias, × f32(1/s_y')
        zero_point  "after": cvtps2dq(y) + z_y | "before": cvtps2dq(f32(v + f32(z_y))) (onednn, eq. DN6)
        saturation  "fbgemm": clamp(int32, lo, 255), cvtps2dq's overflow INT32_MIN -> lo (eq. L11)
                    | "qnnpack": its int16 packs and saturating adds | "onednn": clamp to [0, 255] in float first
                    (an overflow gives 255), eq. DN7
    """

    qparams_in: str
    qparams_out: str
    weights: str
    pairs: bool
    scales: str = "plain"
    bias: str = "float"
    formula: str = "fbgemm"
    zero_point: str = "after"
    saturation: str = "fbgemm"


INGREDIENTS = ("qparams_in", "qparams_out", "weights", "pairs", "scales", "bias", "formula", "zero_point",
               "saturation")
"""The order in which a chain swaps them: the qparams first (they change almost every output), then the
arithmetic in the order a value travels."""


def own_recipe(engine: str, pairs: bool, source: str | None = None) -> Recipe:
    """``engine``'s own arithmetic, with the qparams and weights of ``source`` (default: its own)."""
    src = engine if source is None else source
    if engine in ("fbgemm", "x86"):
        return Recipe(src, src, src, pairs)
    if engine == "qnnpack":
        return Recipe(src, src, src, False, "plain", "int32", "qnnpack", "after", "qnnpack")
    if engine == "onednn":
        return Recipe(src, src, src, pairs, "reciprocal", "float", "onednn", "before", "onednn")
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def describe_step(ingredient: str, a: Recipe, b: Recipe, qparams: dict[str, tuple]) -> str:
    """What swapping ``ingredient`` from recipe ``a`` to ``b`` changes, in words."""
    if isinstance(b, DynamicRecipe):
        return describe_dynamic_step(ingredient, a, b)
    if ingredient == "qparams_in":
        (sa, za), (sb, zb) = qparams[a.qparams_in]["input"], qparams[b.qparams_in]["input"]
        return (f"input qparams (reduce_range={qparams[b.qparams_in]['reduce_range']}): s_x, z_x = {sb!s}, {zb} "
                f"for {sa!s}, {za}")
    if ingredient == "qparams_out":
        (sa, za), (sb, zb) = qparams[a.qparams_out]["output"], qparams[b.qparams_out]["output"]
        return (f"output qparams (reduce_range={qparams[b.qparams_out]['reduce_range']}): s_y, z_y = {sb!s}, {zb} "
                f"for {sa!s}, {za}")
    if ingredient == "weights":
        return (f"weights {qparams[b.weights]['weight_qscheme']} ({b.weights}'s qconfig): other scales, other "
                f"weight rounding")
    if ingredient == "pairs":
        return ("accumulation: int16-saturated pairs of products (eq. M2)" if b.pairs else
                "accumulation: exact int32 sums, not int16-saturated pairs (eq. M2)")
    if ingredient == "scales":
        return "reciprocal scales: s' = f32(1/f32(1/s)) for s_x, s_w, s_y (onednn's round trip)"
    if ingredient == "bias":
        return "bias quantization: qnnpack's int32 bias quantize(bias, s_w·s_x), added to the int32 sum"
    if ingredient == "formula" and b.formula == "qnnpack":
        return "multiplier formula: qnnpack's f32(f32(s_w·f32(s_x))·f32(1/f32(s_y))), not f32(atws / f32(s_y))"
    if ingredient == "formula" and b.formula == "onednn":
        return ("requantization formula: onednn's f32(raw)·s_x'·s_w' (AMX, gemm:jit: ·f32(s_x'·s_w')) + bias, "
                "·f32(1/s_y')")
    if ingredient == "zero_point":
        return "requantization rounding: onednn adds the output zero point in float, before the rounding"
    if ingredient == "saturation" and b.saturation == "qnnpack":
        return "saturation: qnnpack's int16 packs and saturating adds instead of one clamp"
    if ingredient == "saturation" and b.saturation == "onednn":
        return "saturation/overflow: onednn clamps in float first (an overflow gives 255, fbgemm's 0)"
    return f"{ingredient}: {getattr(a, ingredient)} -> {getattr(b, ingredient)}"


def chain(a: Recipe, b: Recipe, same=None) -> list[tuple[str, Recipe]]:
    """The recipes from ``a`` to ``b``, one ingredient swapped at a time, in :data:`INGREDIENTS` order:
    [(ingredient, recipe after the swap), ...]. An ingredient that is the same in both is skipped, and so is one
    whose values are the same (``same(ingredient, a_value, b_value)``: x86's qparams are fbgemm's, onednn's
    weights are fbgemm's); the recipe still takes the new name, so the chain ends exactly at ``b``."""
    steps, current = [], a
    for name in (INGREDIENTS if isinstance(a, Recipe) else tuple(f.name for f in fields(a))):
        old, new = getattr(current, name), getattr(b, name)
        if old != new:
            current = replace(current, **{name: new})
            if same is None or not same(name, old, new):
                steps.append((name, current))
            elif steps:
                steps[-1] = (steps[-1][0], current)
    return steps


def _wrap_int32(v: np.ndarray) -> np.ndarray:
    return (((v.astype(np.int64) + 2**31) & 0xFFFFFFFF) - 2**31).astype(np.int32)


def onednn_before_rounding(raw_i32: np.ndarray, odq) -> np.ndarray:
    """oneDNN's epilogue up to the output zero point (refquant.engines eqs. DN4-DN6 without ``+ z_y``), from an
    OnednnRequantizer's constants: t = f32(raw) (AMX: f32(f32(raw − comp) + f32(comp))); v = f32(f32(t·s_x')·s_w')
    (AMX: f32(t·f32(s_x'·s_w'))); v = f32(v + bias); ReLU max(v, 0); v = f32(v·f32(1/s_y')). The same statements
    as refquant.engines.onednn_requantize_readable, stopped early so that the chains can swap the zero point and
    the saturation separately."""
    with np.errstate(over="ignore", invalid="ignore"):
        if odq.kernel == "brgemm_amx":
            acc_i32 = _wrap_int32(raw_i32.astype(np.int64) - odq.compensation.astype(np.int64))
            t_f32 = (acc_i32.astype(np.float32) + odq.compensation.astype(np.float32)).astype(np.float32)
        else:
            t_f32 = raw_i32.astype(np.float32)
        if odq.kernel == "brgemm":
            v_f32 = ((t_f32 * odq.input_scale_onednn).astype(np.float32) * odq.weight_scales_onednn).astype(np.float32)
        else:
            v_f32 = (t_f32 * odq.output_scales).astype(np.float32)
        if odq.bias is not None:
            v_f32 = (v_f32 + odq.bias).astype(np.float32)
        if odq.relu:
            v_f32 = np.where(v_f32 > 0, v_f32, np.float32(0))
        return (v_f32 * odq.dst_multiplier).astype(np.float32)


class RecipeLayers:
    """Evaluates recipes on float inputs with refquant's layers (cached), given each engine's own models."""

    def __init__(self, models: dict[str, Any]):
        self.models = models  # engine -> QuantizedLinearModel whose qparams and weights a recipe may take
        self._cache: dict[tuple, Any] = {}

    def _model(self, r: Recipe):
        """A QuantizedLinearModel with the recipe's qparams and weights (engine fbgemm: for codes and raw)."""
        key = ("model", r.qparams_in, r.qparams_out, r.weights)
        if key not in self._cache:
            from refquant.linear import QuantizedLinear
            from refquant.pipeline import QuantizedLinearModel

            mi, mo, mw = self.models[r.qparams_in], self.models[r.qparams_out], self.models[r.weights]
            w = mw.linear
            lin = QuantizedLinear(w.weight_int8, w.weight_scales_f64, w.weight_zero_points, w.bias,
                                  float(mi.input_scale), mi.input_zero_point, float(mo.output_scale),
                                  mo.output_zero_point, relu=w.relu, weight_qscheme=w.weight_qscheme)
            self._cache[key] = QuantizedLinearModel(np.float32(mi.input_scale), mi.input_zero_point, lin)
        return self._cache[key]

    def _layer(self, r: Recipe, engine: str, kernel: str = "brgemm", reciprocal: bool = False):
        if engine != "onednn" and not reciprocal:
            kernel = "brgemm"  # oneDNN's kernel matters on onednn only
        key = ("layer", r.qparams_in, r.qparams_out, r.weights, engine, kernel, reciprocal)
        if key not in self._cache:
            m = self._model(r)
            if reciprocal:  # the scales oneDNN works with, in fbgemm's arithmetic
                odq = self._layer(r, "onednn", kernel).requantizer
                per_channel = m.linear.per_channel
                s_w = odq.weight_scales_onednn if per_channel else odq.weight_scales_onednn[:1]
                self._cache[key] = _layer_from(m, engine, input_scale=odq.input_scale_onednn, weight_scales=s_w,
                                               output_scale=odq.output_scale_onednn)
            else:
                self._cache[key] = _layer_from(m, engine, kernel=kernel)
        return self._cache[key]

    def output_codes(self, r: Recipe, x: np.ndarray, kernel: str = "brgemm") -> np.ndarray:
        """uint8 output codes of recipe ``r`` for float32 input ``x`` (``kernel``: oneDNN's for this call)."""
        from refquant.engines import FbgemmRequantizer
        from refquant._float32 import cvtps2dq

        m = self._model(r)
        base = self._layer(r, "fbgemm")
        x_u8 = m.quant(x)
        raw = base.accumulate(x_u8, saturate_int16_pairs=r.pairs)
        shape = raw.shape
        raw = raw.reshape(-1, shape[-1])
        z_y, relu, N = base.output_zero_point, base.relu, base.out_features
        lo = z_y if relu else 0
        if r.formula == "fbgemm":
            fbq = self._layer(r, "fbgemm", kernel, reciprocal=r.scales == "reciprocal").requantizer
            if r.bias == "float":
                q = fbq.requantize(raw)
            else:  # qnnpack's int32 bias in fbgemm's arithmetic
                bias_i32 = self._layer(r, "qnnpack").requantizer.bias_i32
                acc = _wrap_int32(raw.astype(np.int64) + bias_i32.astype(np.int64))
                q = FbgemmRequantizer(fbq.per_channel, None, fbq.act_times_w_scale, fbq.output_multiplier, z_y, relu,
                                      N).requantize(acc)
        elif r.formula == "qnnpack":
            if r.bias != "int32" or r.scales != "plain":
                raise ValueError(f"recipe {r}: qnnpack's multiplier goes with its int32 bias and plain scales")
            qnq = self._layer(r, "qnnpack").requantizer
            if r.saturation == "qnnpack":
                q = qnq.requantize(raw)
            else:
                acc = _wrap_int32(raw.astype(np.int64) + qnq.bias_i32.astype(np.int64))
                q = FbgemmRequantizer(True, None, np.ones(N, np.float32), qnq.requantization_scales, z_y, relu,
                                      N).requantize(acc)
        elif r.formula == "onednn":
            if r.bias != "float":
                raise ValueError(f"recipe {r}: onednn's formula adds the float bias itself")
            od = self._layer(r, "onednn", kernel)
            if r.zero_point == "before" and r.saturation == "onednn":
                q = od.requantize(raw)
            else:
                v = onednn_before_rounding(raw, od.requantizer)
                if r.zero_point == "before":
                    with np.errstate(over="ignore", invalid="ignore"):
                        v = (v + np.float32(z_y)).astype(np.float32)
                    r_i64 = cvtps2dq(v).astype(np.int64)
                else:
                    r_i64 = cvtps2dq(v).astype(np.int64) + np.int64(z_y)
                if r.saturation != "fbgemm":
                    raise ValueError(f"recipe {r}: not a point of the chains")
                q = np.clip(r_i64, lo, 255).astype(np.uint8)
        else:
            raise ValueError(f"recipe {r}: unknown formula")
        return q.reshape(shape)

    def output(self, r: Recipe, x: np.ndarray, kernel: str = "brgemm") -> np.ndarray:
        """The dequantized float32 output of recipe ``r`` (codes with the recipe's output qparams)."""
        return self._model(r).dequant(self.output_codes(r, x, kernel))


@dataclass(frozen=True)
class DynamicRecipe:
    """How a dynamic Linear (refquant.dynamic) turns a float call into float outputs, ingredient by ingredient::

        reduce_range  the input's codes: 0..127 (True: fbgemm, x86, onednn) or 0..255 (qnnpack ignores it)
        scales        "plain" s_x = f32(scale), f32(s_w) | "reciprocal" onednn's f32(1/f64(f32(1/s)))
        quantize      "fbgemm_legacy_fma" RNE(fmaf(x, f32(1/s_x), z_x)) (eq. Q1) | "multiply_then_add" (eq. Q1c)
        formula       "fbgemm" fmaf(f32(raw), f32(s_x·s_w), bias) | "qnnpack" two roundings, + bias |
                      "onednn" two multiplies (or the AMX kernel's combined scale, by shape), + bias
                      (refquant.dynamic eqs. DQ5a-d)
    """

    reduce_range: bool
    scales: str = "plain"
    quantize: str = "fbgemm_legacy_fma"
    formula: str = "fbgemm"


def own_dynamic_recipe(engine: str) -> DynamicRecipe:
    if engine in ("fbgemm", "x86"):
        return DynamicRecipe(True)
    if engine == "qnnpack":
        return DynamicRecipe(False, formula="qnnpack")
    if engine == "onednn":
        return DynamicRecipe(True, "reciprocal", "multiply_then_add", "onednn")
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def describe_dynamic_step(ingredient: str, a: DynamicRecipe, b: DynamicRecipe) -> str:
    if ingredient == "reduce_range":
        return ("input qparams: codes 0..255 (qnnpack ignores reduce_range=True, and warns), each call's own range"
                if not b.reduce_range else "input qparams: codes 0..127 (reduce_range=True)")
    if ingredient == "scales":
        return "reciprocal scales: s' = f32(1/f64(f32(1/s))) for s_x and s_w (onednn's round trip)"
    if ingredient == "quantize":
        return "input quantize: f32(f32(x·f32(1/s_x)) + z_x), then RNE (oneDNN's reorder), not one FMA"
    if ingredient == "formula" and b.formula == "qnnpack":
        return "output formula: f32(f32(f32(s_w·s_x)·f32(raw)) + bias) (qnnpack), not fmaf(f32(raw), mult, bias)"
    if ingredient == "formula" and b.formula == "onednn":
        return "output formula: f32(f32(f32(raw)·s_x')·s_w') + bias (AMX, gemm:jit: ·f32(s_x'·s_w')), not one FMA"
    return f"{ingredient}: {getattr(a, ingredient)} -> {getattr(b, ingredient)}"


class DynamicLayers:
    """Evaluates :class:`DynamicRecipe` on float calls from refquant.dynamic's own steps (eqs. DQ1-DQ5), with the
    weight codes and scales of one DynamicQuantizedLinear (every engine's dynamic weight is the same here:
    default_dynamic_qconfig on the same float weight; parity rows check each engine's)."""

    def __init__(self, dql, onednn_family: str | None):
        from refquant.matmul import pack_weight_s8

        self.dql = dql
        self.onednn_family = onednn_family
        self.packed = pack_weight_s8(dql.weight_int8)
        self.w_zp = np.ascontiguousarray(np.broadcast_to(dql.weight_zero_points, (dql.out_features,)))

    def output(self, r: DynamicRecipe, x: np.ndarray, kernel: str = "") -> np.ndarray:
        from refquant import dynamic as dq
        from refquant.linear import accumulate_raw
        from refquant.quantize import quantize_per_tensor

        d = self.dql
        K, N = d.in_features, d.out_features
        x2d = np.ascontiguousarray(x.reshape(-1, K))
        lo, hi, _ = dq.find_min_max(x2d)                                                     # eq. DQ1
        scale, zp = dq.choose_quantization_params(lo, hi, 0, 255, reduce_range=r.reduce_range)  # eq. DQ2
        if r.scales == "reciprocal":
            s_x = dq.onednn_scale_round_trip(scale)[()]
            s_w = dq.onednn_scale_round_trip(d.weight_scales).astype(np.float32)
        else:
            s_x = np.float32(scale)
            s_w = d.weight_scales.astype(np.float32)
        s_w = np.ascontiguousarray(np.broadcast_to(s_w, (N,)))
        codes = quantize_per_tensor(x2d, s_x, zp, "quint8", rounding=r.quantize)              # eq. DQ3
        raw = accumulate_raw(codes, self.packed, d.col_offsets, zp, self.w_zp)                 # eq. DQ4
        formula = r.formula
        if formula == "onednn":
            formula = dq.onednn_kernel_for_shape(self.onednn_family, x2d.shape[0], K, N)
        y = dq.float_output_fast(raw, formula, s_x, s_w, d.bias)                              # eq. DQ5
        return y.reshape(x.shape[:-1] + (N,))


def chain_qparams(models: dict[str, Any], reduce_range: dict[str, bool]) -> dict[str, dict]:
    """What :func:`describe_step` says about each engine's model: its qparams, reduce_range and weight qscheme."""
    return {e: {"input": (np.float32(m.input_scale), m.input_zero_point),
                "output": (np.float32(m.output_scale), m.output_zero_point),
                "reduce_range": reduce_range.get(e), "weight_qscheme": m.linear.weight_qscheme}
            for e, m in models.items()}


def same_values(models: dict[str, Any]):
    """``same(ingredient, a, b)`` for :func:`chain`: True when engine b's qparams or weights are engine a's."""
    def same(ingredient: str, a: str, b: str) -> bool:
        if ingredient not in ("qparams_in", "qparams_out", "weights"):
            return False
        ma, mb = models[a], models[b]
        if ingredient == "qparams_in":
            return (np.float32(ma.input_scale), ma.input_zero_point) == (np.float32(mb.input_scale),
                                                                         mb.input_zero_point)
        if ingredient == "qparams_out":
            return (ma.output_scale, ma.output_zero_point) == (mb.output_scale, mb.output_zero_point)
        if ingredient == "weights":
            la, lb = ma.linear, mb.linear
            return (np.array_equal(la.weight_int8, lb.weight_int8) and la.weight_scales_f64.shape ==
                    lb.weight_scales_f64.shape and np.array_equal(la.weight_scales_f64, lb.weight_scales_f64)
                    and np.array_equal(la.weight_zero_points, lb.weight_zero_points))
        return False
    return same


class ChainAttribution:
    """Counts, over all chunks, which swaps of a chain changed the outputs that differ between its two ends.

    For each output: y_0 (fbgemm's recipe) ... y_k (engine B's), compared as float32 bit patterns. ``changed[i]``
    counts outputs whose value step i changed; an output that differs between the ends (y_0 != y_k) is attributed
    to step i alone when step i was the only step that changed it ("sole": that one swap reproduces the difference),
    else to "several" swaps. sole + several = the outputs that differ. ``torch_differ`` counts torch's own
    differences between the two engines; ``unexplained`` the outputs where torch's engines are not the chain's ends
    (torch's fbgemm != y_0 or torch's B != y_k): 0 exactly when both engines' parity rows hold.
    """

    def __init__(self, name: str, a: str, b: str, start: Recipe, end: Recipe, qparams: dict, codes: bool,
                 same=None, compared: str | None = None):
        self.name, self.a, self.b, self.codes = name, a, b, codes
        self.compared = compared or ("output codes" if codes else "dequantized outputs")
        self.start, self.end = start, end
        self.steps = chain(start, end, same)
        self.labels = [describe_step(ing, prev, rec, qparams)
                       for (ing, rec), prev in zip(self.steps, [start] + [r for _, r in self.steps[:-1]])]
        k = len(self.steps)
        self.changed = np.zeros(k, np.int64)
        self.sole = np.zeros(k, np.int64)
        self.several = 0
        self.differ = 0
        self.torch_differ = 0
        self.unexplained = 0
        self.n = 0
        self.max_abs_torch = 0.0
        self.max_code_torch = 0
        self.error: str | None = None

    def update(self, layers: RecipeLayers, x: np.ndarray, kernel: str, torch_a: np.ndarray, torch_b: np.ndarray,
               torch_codes: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        if self.error is not None:
            return
        try:
            ys = [layers.output(self.start, x, kernel)] + [layers.output(r, x, kernel) for _, r in self.steps]
        except ValueError as e:  # e.g. qnnpack refuses a requantization scale: no chain through it
            self.error = str(e)
            return
        bits = [y.view(np.uint32).reshape(-1) for y in ys]
        ta, tb = torch_a.view(np.uint32).reshape(-1), torch_b.view(np.uint32).reshape(-1)
        differ = bits[0] != bits[-1]
        steps = [bits[i + 1] != bits[i] for i in range(len(self.steps))]
        n_changes = np.sum(steps, axis=0) if steps else np.zeros(differ.shape, np.int64)
        for i, ch in enumerate(steps):
            self.changed[i] += int(np.count_nonzero(ch))
            self.sole[i] += int(np.count_nonzero(differ & ch & (n_changes == 1)))
        self.several += int(np.count_nonzero(differ & (n_changes >= 2)))
        self.differ += int(np.count_nonzero(differ))
        self.torch_differ += int(np.count_nonzero(ta != tb))
        self.unexplained += int(np.count_nonzero((ta != bits[0]) | (tb != bits[-1])))
        self.n += differ.size
        d = np.abs(torch_a.astype(np.float64) - torch_b.astype(np.float64))
        self.max_abs_torch = max(self.max_abs_torch, float(d.max()) if d.size else 0.0)
        if torch_codes is not None:
            dc = np.abs(torch_codes[0].astype(np.int64) - torch_codes[1].astype(np.int64))
            self.max_code_torch = max(self.max_code_torch, int(dc.max()) if dc.size else 0)

    def to_json(self) -> dict:
        return {"name": self.name, "from": self.a, "to": self.b, "compared": self.compared, "outputs": self.n,
                "torch_differ": self.torch_differ,
                "refquant_differ": self.differ, "max_abs_difference_torch": self.max_abs_torch,
                "max_code_difference_torch": self.max_code_torch if self.codes else None,
                "steps": [{"ingredient": ing, "swap": label, "changed": int(c), "sole_cause": int(s)}
                          for (ing, _), label, c, s in zip(self.steps, self.labels, self.changed, self.sole)],
                "several_causes": self.several, "unexplained": self.unexplained, "error": self.error}


# ----------------------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------------------

NOTES = {
    "observer": "refquant's HistogramObserver (the engine's qconfig: reduce_range True on fbgemm/x86, False on "
                "qnnpack/onednn) fed the float32 activations torch's observer saw",
    "weight": "torch: fc.weight() (q_per_channel_scales()/q_scale() float64, zero points int64, int_repr()); "
              "refquant: the engine's default weight observer (per channel; qnnpack per tensor)",
    "bias": "float32 as the quantized Linear holds it (qnnpack quantizes it per call: refquant-only row)",
    "qnnpack_bias": "no bias, on qnnpack: its prepack stores a zero bias (at::zeros, PackedLinearWeightsQnnp::"
                    "prepack), so torch's fc.bias() returns zeros; refquant's layer holds None and its "
                    "QnnpackRequantizer quantizes zeros; compared: torch's zeros vs those zeros",
    "col_offsets": "Σ_k q_w[n,k] − z_w[n]·K: torch side derived from int_repr() with exact int64 torch ops",
    "input_codes": "torch: model.quant(x).int_repr(); refquant: quantize_per_tensor(x, s_x, z_x, 'quint8')",
    "accumulators": "int32 Σ_k (q_x − z_x)(q_w − z_w): torch side derived from torch's codes and int_repr() with "
                    "exact int64 ops (int16-saturated pairs where the engine's kernel saturates: fbgemm's avx2 "
                    "kernels, oneDNN's avx512_core)",
    "output_codes": "torch: model.fc(q_x).int_repr() on the engine; refquant: QuantizedLinear(engine=...)",
    "output": "torch: model(x) (DeQuantStub); refquant: dequantize(y_u8, s_y, z_y); float32 bits",
    "kernel": "per call: 0 oneDNN brg_matmul with VNNI (two multiplies), 1 its AMX kernel (combined scale), 2 "
              "brg_matmul:avx512_core (int16-saturated pairs), 3 gemm:jit on AVX2 (combined scale, int16-saturated "
              "pairs restarting at its second K block); torch: the implementation ONEDNN_VERBOSE named; "
              "refquant: its prediction (default_onednn_kernel() and the small-shape rule onednn_kernel_for_shape)",
    "error": "[mean |e|, max |e|, SQNR dB] against torch's float model, the same code for both sides; float64 bits",
    "dyn_weight": "torch: quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8) on the engine, "
                  "weight() (q_scale() float64); refquant: DynamicQuantizedLinear.from_float (MinMaxObserver, "
                  "per_tensor_symmetric)",
    "dyn_output": "torch: the dynamic module called once on each chunk of data (each call its own input qparams); "
                  "refquant: DynamicQuantizedLinear(engine=...) on the same chunk; float32 bits, rows of (M, N)",
    "dyn_kernel": "per call of the dynamic Linear: as the static row (refquant: the formula its stages() chose)",
    "shared": "fbgemm's (s_x, z_x), (s_y, z_y) and quantized weight: torch linear_prepack(fbgemm's weight, bias) "
              "on the engine and quantized::linear(q_x, packed, s_y, z_y); refquant QuantizedLinear with the same "
              "values and engine=",
}


@dataclass
class EnginesResult(C.CountedRows):
    config: EnginesConfig
    environment: dict
    fields: list[C.Field]
    engines: dict  # engine -> summary (qconfig, qparams, equal, rows, error)
    chains: list[ChainAttribution]
    torch_warnings: list[str] = field(default_factory=list)


def _scalar(v) -> Any:
    return np.asarray(v).reshape(-1)[0]


def run_engines_study(config: EnginesConfig, *, progress: bool = False, torch_subprocess: bool | None = None,
                      _perturb: tuple[str, int] | None = None) -> EnginesResult:
    """Run parts (a)-(d) of the module docstring. ``_perturb`` (tests only): (row name, flat index) flips
    one bit of that refquant value before it is compared."""
    events = torch_events("crosscheck.torch_engines_study", config, subprocess=torch_subprocess)
    with Progress("loading refquant's Numba kernels (the first run compiles them: 10-40 s, cached afterwards)",
                  enabled=progress, delay_s=1.0):
        from .study import warm_up_refquant

        warm_up_refquant(expected_family(config.isa) == "avx2")
    from refquant.dynamic import default_onednn_kernel
    from refquant.quantize import dequantize

    perturb = Perturber(_perturb)
    fields: list[C.Field] = []

    def add(name: str, t: Any, r: Any, *, kind: str = C.PARITY, note: str = "") -> None:
        fields.append(C.compare(name, t, perturb(name, r), kind=kind, note=note))

    with Progress("torch: import, prepare, calibrate, convert on every engine", enabled=progress):
        kind, torch_env = next(events)
        family = torch_env["fbgemm_kernel"]
        if config.isa != "auto" and family != config.isa:
            events.close()
            raise UsageError(f"--isa {config.isa}: torch's fbgemm runs its {family} kernels in "
                             f"{torch_env['torch_side']} and cannot switch ({torch_env['fbgemm_kernel_detected_by']})")
        kind, layer = next(events)
    assert kind == "layer", kind
    fb_pairs = saturate_int16_pairs(family)
    onednn = OnednnPrediction(default_onednn_kernel())
    if onednn.family is None:
        events.close()
        raise NotImplementedError("this CPU (or ONEDNN_MAX_CPU_ISA) runs an int8 path of oneDNN below AVX2, which "
                                  "refquant does not model (refquant.dynamic.default_onednn_kernel)")
    od_pairs = onednn.family in ("brgemm_no_vnni", "gemm_no_vnni")
    pairs = {"fbgemm": fb_pairs, "x86": fb_pairs, "qnnpack": False, "onednn": od_pairs}
    K, N = config.in_features, config.out_features

    # (a) refquant's models, observers fed what torch's observers saw
    engine_models: dict[str, EngineModels] = {}
    for e in ENGINES:
        rec = layer["engines"][e]
        engine_models[e] = EngineModels(e, layer, rec, pairs[e], config.relu)
    base = {e: engine_models[e].model() for e in ENGINES}
    for e in ENGINES:
        rec, em, m = layer["engines"][e], engine_models[e], base[e]
        ql = m.linear
        for prefix, t, obs in (("input", rec["input_observer"], em.observed.input_observer),
                               ("output", rec["output_observer"], em.observed.output_observer)):
            if obs.new_min is None:
                obs.calculate_qparams()
            add(f"{e}: {prefix} observer min_val, max_val", np.array([t["min_val"], t["max_val"]], np.float32),
                np.array([obs.min_val, obs.max_val], np.float32), note=NOTES["observer"])
            add(f"{e}: {prefix} observer histogram", t["histogram"], np.asarray(obs.histogram),
                note=NOTES["observer"])
            add(f"{e}: {prefix} observer calibrated range", np.array([t["clip_min"], t["clip_max"]], np.float32),
                np.array([obs.new_min, obs.new_max], np.float32), note=NOTES["observer"])
            if prefix == "input":
                add(f"{e}: input scale", rec["input_scale"], np.float32(m.input_scale), note="torch: Quantize.scale")
                add(f"{e}: input zero_point", rec["input_zero_point"], np.int64(m.input_zero_point),
                    note="torch: Quantize.zero_point")
            else:
                add(f"{e}: output scale", np.float64(rec["output_scale"]), np.float64(m.output_scale),
                    note="torch: fc.scale (a Python float); compared as float64")
                add(f"{e}: output zero_point", rec["output_zero_point"], np.int64(m.output_zero_point),
                    note="torch: fc.zero_point")
        add(f"{e}: weight scales", rec["weight_scales"], ql.weight_scales_f64, note=NOTES["weight"])
        add(f"{e}: weight zero_points", rec["weight_zero_points"], ql.weight_zero_points, note=NOTES["weight"])
        add(f"{e}: weight int8 (int_repr)", rec["weight_int8"], ql.weight_int8, note=NOTES["weight"])
        r_bias = ql.bias
        if r_bias is None and e == "qnnpack":  # qnnpack's prepack stores a zero bias; refquant adds zeros too
            r_bias = np.zeros(N, np.float32)
        if rec["packed_bias"] is None and r_bias is None:
            fields.append(C.Field(name=f"{e}: bias", kind=C.PARITY, equal=True, mismatches=0, first_mismatch=None,
                                  torch=None, refquant=None, note="no bias on either side"))
        elif rec["packed_bias"] is None or r_bias is None:
            fields.append(C.Field(name=f"{e}: bias", kind=C.PARITY, equal=False, mismatches=1,
                                  first_mismatch={"index": None, "reason": "bias present on one side only",
                                                  "torch": None, "refquant": None},
                                  torch=rec["packed_bias"], refquant=r_bias, note=NOTES["bias"]))
        else:
            add(f"{e}: bias", rec["packed_bias"], r_bias, note=NOTES["qnnpack_bias"] if ql.bias is None
                else NOTES["bias"])
        add(f"{e}: col_offsets", rec["col_offsets"], ql.col_offsets, kind=C.DERIVED, note=NOTES["col_offsets"])

    # (b) fbgemm's qparams and weights on every engine
    fb_model = base["fbgemm"]

    shared_cache: dict[tuple[str, str], Any] = {}

    def shared_layer(e: str, kernel: str = "brgemm"):
        if (e, kernel) not in shared_cache:
            shared_cache[e, kernel] = _layer_from(fb_model, e, kernel=kernel,
                                                  pairs=pairs[e] and kernel != "brgemm_amx")
        return shared_cache[e, kernel]

    # (d) the chains
    qparams = chain_qparams(base, {e: layer["engines"][e]["qconfig_reduce_range"] for e in ENGINES})
    own_layers = RecipeLayers(base)
    shared_layers = RecipeLayers({e: fb_model for e in ENGINES})
    same = same_values(base)
    start = own_recipe("fbgemm", fb_pairs)
    chains = [ChainAttribution(f"own qconfigs: fbgemm vs {b}", "fbgemm", b, start, own_recipe(b, pairs[b]),
                               qparams, codes=False, same=same) for b in OTHERS]
    chains += [ChainAttribution(f"shared qparams: fbgemm vs {b}", "fbgemm", b, start,
                                own_recipe(b, pairs[b], source="fbgemm"), qparams, codes=True) for b in OTHERS]

    # (c) the dynamic Linear of each engine (default_dynamic_qconfig), from the same float weight
    from refquant.dynamic import DynamicQuantizedLinear

    dyn = {}
    for e in ENGINES:
        kw = {"onednn_kernel": onednn.family} if e == "onednn" else (
            {"saturate_int16_pairs": fb_pairs} if e in ("fbgemm", "x86") else {})
        dyn[e] = DynamicQuantizedLinear.from_float(layer["weight"], layer["bias"], engine=e, **kw)
        rec = layer["dynamic"][e]
        add(f"dynamic, {e}: weight int8 (int_repr)", rec["weight_int8"], dyn[e].weight_int8, note=NOTES["dyn_weight"])
        add(f"dynamic, {e}: weight scale", rec["weight_scales"], dyn[e].weight_scales, note=NOTES["dyn_weight"])
        r_bias = dyn[e].bias
        if r_bias is None and e == "qnnpack":
            r_bias = np.zeros(N, np.float32)
        if rec["packed_bias"] is None and r_bias is None:
            fields.append(C.Field(name=f"dynamic, {e}: bias", kind=C.PARITY, equal=True, mismatches=0,
                                  first_mismatch=None, torch=None, refquant=None, note="no bias on either side"))
        else:
            add(f"dynamic, {e}: bias", rec["packed_bias"], r_bias,
                note=NOTES["qnnpack_bias"] if dyn[e].bias is None else NOTES["bias"])
    dyn_layers = DynamicLayers(dyn["fbgemm"], onednn.family)
    chains += [ChainAttribution(f"dynamic: fbgemm vs {b}", "fbgemm", b, own_dynamic_recipe("fbgemm"),
                                own_dynamic_recipe(b), qparams, codes=False, compared="float outputs")
               for b in OTHERS]
    dyn_comps = {e: C.ArrayComparison(f"dynamic, {e}: float output (one call per chunk)", note=NOTES["dyn_output"])
                 for e in ENGINES}
    kernel_dyn = C.ArrayComparison("dynamic, onednn: oneDNN kernel per call", note=NOTES["dyn_kernel"])

    # forward passes
    def comps(label: str, kind_: str) -> dict:
        d = {}
        for e in ENGINES:
            d[e, "input_codes"] = C.ArrayComparison(f"{e}: input codes ({label})", note=NOTES["input_codes"])
            d[e, "accumulators"] = C.ArrayComparison(f"{e}: int32 accumulators ({label})", C.DERIVED,
                                                     NOTES["accumulators"])
            d[e, "output_codes"] = C.ArrayComparison(f"{e}: output codes ({label})", note=NOTES["output_codes"])
            d[e, "output"] = C.ArrayComparison(f"{e}: dequantized output ({label})", note=NOTES["output"])
        return d

    batches = f"{config.calib_batches} batch" + ("es" if config.calib_batches > 1 else "")
    own_comps = {"calibration": comps(f"calibration, {batches}", "calibration"),
                 "samples": comps(f"{config.samples} samples", "samples")}
    kernel_own = C.ArrayComparison("onednn: oneDNN kernel per call", note=NOTES["kernel"])
    shared_comps = {}
    for e in ENGINES:
        shared_comps[e, "accumulators"] = C.ArrayComparison(f"shared qparams, {e}: int32 accumulators", C.DERIVED,
                                                            NOTES["accumulators"])
        shared_comps[e, "output_codes"] = C.ArrayComparison(f"shared qparams, {e}: output codes", C.PARITY,
                                                            NOTES["shared"])
    kernel_shared = C.ArrayComparison("shared qparams, onednn: oneDNN kernel per call", note=NOTES["kernel"])
    errors = {e: (ErrorSums(), ErrorSums()) for e in ENGINES}
    kernel_counts: dict[str, int] = {}
    predicted_counts: dict[str, int] = {}
    torch_warnings: list[str] = []
    with Progress(f"forward passes, 4 engines x 2 (calibration {batches}, then samples)", config.samples,
                  enabled=progress) as bar:
        for kind, t in events:
            if kind == "warnings":
                torch_warnings = t
                continue
            x = t["x"]
            M = int(np.prod(x.shape[:-1]))
            od_kernel, od_call_pairs, od_code = onednn.kernel(M, K, N)
            predicted_counts[od_kernel] = predicted_counts.get(od_kernel, 0) + 1
            outputs_own: dict[str, np.ndarray] = {}
            for e in ENGINES:
                te = t["own"][e]
                m = engine_models[e].model(od_kernel, od_call_pairs) if e == "onednn" else base[e]
                r = m.stages(x)
                for key in ("input_codes", "accumulators", "output_codes", "output"):
                    comp = own_comps[kind][e, key]
                    tv, rv = te[key], np.asarray(perturb(comp.name, r[key]))
                    if kind == "calibration":  # one batch per row, as crosscheck.linear's calibration rows
                        tv, rv = tv[np.newaxis], rv[np.newaxis]
                    comp.update(tv, rv)
                outputs_own[e] = r["output"]
                if kind == "samples":
                    errors[e][0].update(te["output"], t["float_output"])
                    errors[e][1].update(r["output"], t["float_output"])
            impl = t["own"]["onednn"]["onednn_impl"]
            kernel_counts[impl] = kernel_counts.get(impl, 0) + 1
            kernel_own.update(np.array([KERNEL_CODES[onednn_impl_kind(impl)]]),
                              perturb(kernel_own.name, np.array([od_code])))
            for e in ENGINES:
                ts = t["shared"][e]
                lay = shared_layer(e, od_kernel if e == "onednn" else "brgemm")
                acc = lay.accumulate(fb_model.quant(x), saturate_int16_pairs=pairs[e] and od_kernel != "brgemm_amx")
                codes = lay.requantize(acc)
                for key, value in (("accumulators", acc), ("output_codes", codes)):
                    comp = shared_comps[e, key]  # rows of the (M, N) output of every call, calibration first
                    comp.update(ts[key].reshape(-1, N), np.asarray(perturb(comp.name, value)).reshape(-1, N))
            impl_s = t["shared"]["onednn"]["onednn_impl"]
            kernel_counts[impl_s] = kernel_counts.get(impl_s, 0) + 1
            kernel_shared.update(np.array([KERNEL_CODES[onednn_impl_kind(impl_s)]]),
                                 perturb(kernel_shared.name, np.array([od_code])))
            # (c)
            for e in ENGINES:
                st = dyn[e].stages(x)
                comp = dyn_comps[e]
                comp.update(t["dynamic"][e]["output"].reshape(-1, N),
                            np.asarray(perturb(comp.name, st["output"])).reshape(-1, N))
                if e == "onednn":
                    impl_d = t["dynamic"][e]["onednn_impl"]
                    kernel_counts[impl_d] = kernel_counts.get(impl_d, 0) + 1
                    kernel_dyn.update(np.array([KERNEL_CODES[onednn_impl_kind(impl_d)]]),
                                      perturb(kernel_dyn.name, np.array(
                                          [{"brgemm_no_vnni": 2, "gemm_no_vnni": 3}.get(
                                              onednn.family, int(st["output_formula"] == "onednn_combined_scale"))])))
            # (d)
            for ch in chains:
                if ch.name.startswith("dynamic"):
                    ch.update(dyn_layers, x, od_kernel, t["dynamic"][ch.a]["output"], t["dynamic"][ch.b]["output"])
                elif ch.codes:
                    ta, tb = t["shared"][ch.a]["output_codes"], t["shared"][ch.b]["output_codes"]
                    sy, zy = fb_model.output_scale, fb_model.output_zero_point
                    ch.update(shared_layers, x, od_kernel, dequantize(ta, sy, zy), dequantize(tb, sy, zy), (ta, tb))
                else:
                    ch.update(own_layers, x, od_kernel, t["own"][ch.a]["output"], t["own"][ch.b]["output"])
            if kind == "samples":
                bar.advance(x.shape[0])

    order = []
    for e in ENGINES:
        for kind in ("calibration", "samples"):
            if kind == "samples" and not config.samples:
                continue
            order += [own_comps[kind][e, k] for k in ("input_codes", "accumulators", "output_codes", "output")]
    fields.extend(c.result() for c in order)
    fields.append(kernel_own.result())
    if config.samples:
        for e in ENGINES:
            add(f"{e}: error metrics ({config.samples} samples)", errors[e][0].as_array(), errors[e][1].as_array(),
                note=NOTES["error"])
    for e in ENGINES:
        fields += [shared_comps[e, "accumulators"].result(), shared_comps[e, "output_codes"].result()]
    fields.append(kernel_shared.result())
    fields += [dyn_comps[e].result() for e in ENGINES] + [kernel_dyn.result()]

    # refquant-only intermediates of each engine's requantization
    for e in ENGINES:
        rq = base[e].linear.requantizer
        if e in ("fbgemm", "x86"):
            fields.append(C.refquant_only(f"{e}: act_times_w_scale", rq.act_times_w_scale, "f32(f32(s_x)·s_w[n])"))
            fields.append(C.refquant_only(f"{e}: output multiplier", rq.output_multiplier, "f32(atws / f32(s_y))"))
        elif e == "qnnpack":
            fields.append(C.refquant_only("qnnpack: bias_i32", rq.bias_i32,
                                          "quantize(bias, s_w·s_x (double), 0, qint32), at the first call"))
            fields.append(C.refquant_only("qnnpack: requantization scales", rq.requantization_scales,
                                          "f32(f32(s_w·f32(s_x))·f32(1/f32(s_y)))"))
        else:
            fields.append(C.refquant_only("onednn: scales s_x', s_y' after the round trip",
                                          np.array([rq.input_scale_onednn, rq.output_scale_onednn], np.float32),
                                          "f32(1/f32(1/s)) (eq. DN2)"))
            fields.append(C.refquant_only("onednn: weight scales s_w'", rq.weight_scales_onednn, "eq. DN2"))
            fields.append(C.refquant_only("onednn: dst_multiplier", np.float32(rq.dst_multiplier), "f32(1/s_y')"))

    summaries = {}
    for e in ENGINES:
        rows = [f for f in fields if f.counted and f.name.startswith(f"{e}:")]
        m = base[e]
        summaries[e] = {
            "qconfig": f"get_default_qconfig({e!r})",
            "activation_reduce_range": layer["engines"][e]["qconfig_reduce_range"],
            "weight_qscheme": m.linear.weight_qscheme,
            "input_scale": C.scalar_to_json(np.float32(m.input_scale)), "input_zero_point": m.input_zero_point,
            "output_scale": m.output_scale, "output_zero_point": m.output_zero_point,
            "parity_rows": len(rows), "equal": all(f.equal for f in rows),
            "error_torch": errors[e][0].result(), "error_refquant": errors[e][1].result(),
        }
    import numba

    from .isa import cpu_has_avx512_vnni

    environment = {
        "torch": torch_env["torch"], "numpy": np.__version__, "numba": numba.__version__, "engines": list(ENGINES),
        "cpu_isa": torch_env["cpu_isa"], "vnni": cpu_has_avx512_vnni(), "torch_threads": torch_env["torch_threads"],
        "isa": config.isa, "fbgemm_kernel": family, "fbgemm_kernel_detected_by": torch_env["fbgemm_kernel_detected_by"],
        "fbgemm_enable_instructions": torch_env["fbgemm_enable_instructions"],
        "refquant_saturate_int16_pairs": fb_pairs, "torch_side": torch_env["torch_side"],
        "onednn": {"refquant_kernel_family": onednn.family, "refquant_kernels": predicted_counts,
                   "torch_impls": kernel_counts,
                   "torch_impls_detected_by": "ONEDNN_VERBOSE, one exec,cpu,matmul line per call, read in the torch "
                                              "process",
                   "refquant_kernel_predicted_by": "refquant.dynamic.default_onednn_kernel() (CPU features, "
                                                   "ONEDNN_MAX_CPU_ISA) and onednn_kernel_for_shape (M, K, N)"},
    }
    return EnginesResult(config=config, environment=environment, fields=fields, engines=summaries, chains=chains,
                         torch_warnings=torch_warnings)
