"""Explain a mismatch: which arithmetic another implementation's output codes follow, element by element.

Someone's port (C, an FPGA, another runtime) of a quantized model gives output codes that differ from the golden
file's in a few places. The causes are known and few, and refquant computes every one of them exactly, so
:func:`explain` re-runs the golden program (:func:`refquant.program.run_program`) once per **variant** -- one
modelled change of arithmetic, applied to every step it concerns, its effects propagating through the later
layers -- and compares each run's codes with theirs::

    axis             variants (names)                              what changes (where it is computed)
    requantization   fbgemm_fixed_point, tflite,                   the integer requantizations of refquant.fixed_point
                     tflite_single_rounding, float_int32_bias      (eqs. I1-I7), each with its own int32-bias rule
                     <variant>[bias=<rule>]                        the same with another bias rule (eqs. I1a-c)
    engine           fbgemm, x86, qnnpack, onednn                  another engine's formula (refquant.engines)
    kernel           int16_saturation, no_int16_saturation         pre-VNNI int16-saturating pairs, or their absence
                                                                   (refquant.matmul eq. M2)
                     onednn_brgemm, onednn_brgemm_amx, onednn_gemm oneDNN's other kernels (eqs. DN4, DN5)
                     no_pairs_restart                              int16 pairs from k = 0 where gemm:jit restarts them
                                                                   at its second K block (eq. M2b)
    input_rounding   fbgemm_legacy_fma, nearbyint_then_add,        the QuantStub's rounding (refquant.quantize eqs.
                     multiply_then_add (no FMA),                   Q1, Q1c; PORT_ROUNDINGS: half away from zero,
                     half_away, textbook_float64,                  np.round(x / scale + zero_point) in double or in
                     textbook_float64_half_away, textbook_float32  float32)
    zero_point       <step>.zero_point_plus_one / _minus_one       one tensor's zero point off by one, wherever that
                                                                   tensor is written and read
    zero_point_sign  input_zero_point_negated                      the sign of z_x flipped in eq. L5 (every linear)

Only variants that differ from the file's own arithmetic are listed (a golden on x86 lists fbgemm, qnnpack, onednn),
and only where they apply (oneDNN refuses asymmetric weights: that variant is skipped, with the reason). When no
single variant reproduces all their codes, every **combination of two** variants on different axes is tried
(named ``a+b``; pairs where at least one member reproduces one of their differing codes -- the other may change
nothing alone, as TFLite's second rounding on codes that only int16 saturation moved to a tie).

Slips not modelled, because they cannot be recomputed exactly from a golden file: ``reduce_range`` (it changes the
scale the observer computed from the calibration range, which the file does not hold); an output or QuantStub
zero point taken with the wrong sign (the code before the clamp is not kept by the requantizers; only the linear
input zero point's sign slip is modelled, on raw).

**Verified or unexplained, nothing in between.** A variant is *consistent* with their codes when every code it
changes (against the reference run: the file's vectors, or the file's arithmetic on their input codes) is their
code -- a variant that changes a code they did not change is not their arithmetic, and explains nothing. A
differing element is *explained* when a consistent variant reproduces it; its cause names that variant (the one
that reproduces all their codes if one does, else the consistent one that explains most) and what it changes. An
element no consistent variant reproduces is reported as unexplained, with its intermediates, and no cause. So
random ±1 noise stays unexplained: a variant that would move exactly the noisy codes, in their direction, and no
other, is the only way noise can be explained away; and a variant that does not reproduce all their codes must
change at least :data:`MIN_SUPPORT` codes to explain any.

For each differing element, both codes and the golden's intermediates at the step that wrote it (the linear step,
through any ReLU / Identity / Flatten after it): the int32 accumulator, ``raw`` (after the zero-point corrections),
the exact value before the final rounding (the float32 ``y`` of eq. L9 on fbgemm, ``acc·M/2^s`` as a fraction for
the fixed-point variants, ...), its distance to the rounding boundary (0 = a tie) and whether the code was clamped;
for an explained element the same at the variant's run.

``their_input_codes`` (the codes their QuantStub computed, for a golden whose first step quantizes the float input)
separates their input rounding from the rest: the input codes are explained by the input_rounding and zero-point
variants, and every other variant runs from their input codes. ``their_accumulators`` (the int32 accumulators of
the last linear step) must be reproduced as well by a variant for it to count as consistent or to reproduce their
codes.

``refquant.explain`` is the function :func:`explain` (the package exports it under the module's name); the report
classes are imported from the module: ``from refquant.explain import Explanation``. Each variant's arithmetic is
defined, with the upstream source it mirrors, where refquant computes it (refquant.fixed_point, refquant.engines,
refquant.matmul, refquant.quantize); this module only re-runs programs and compares codes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from . import fixed_point as fp
from ._float32 import fmaf
from .engines import ENGINE_SPECS, ENGINES, ONEDNN_KERNELS, FbgemmRequantizer, QnnpackRequantizer, OnednnRequantizer
from .matmul import matmul_u8s8_acc32
from .program import Program, ProgramRun, load_program, program_from_fields, run_program
from .quantize import PORT_ROUNDINGS, ROUNDINGS

AXES: tuple[str, ...] = ("requantization", "engine", "kernel", "input_rounding", "zero_point", "zero_point_sign")

MIN_SUPPORT = 3
"""A variant that does not reproduce all their codes explains elements only if it changes at least this many codes
(all of them to their codes): one or two changed codes that happen to match would let random ±1 noise pass for a
cause (a chance of about (p/2)^m for noise at rate p on m changed codes)."""

VARIANT_WHAT: dict[str, str] = {
    "fbgemm_fixed_point": "int32 bias and FBGEMM's fixed-point multiplier, one rounding half up (eqs. I1a, I2a, I4)",
    "tflite": "TFLite's int32 bias and Q31 multiplier with two roundings: SaturatingRoundingDoublingHighMul, then "
              "RoundingDivideByPOT (eqs. I1b, I2b, I5)",
    "tflite_single_rounding": "TFLite's int32 bias and Q31 multiplier, one rounding half up (TFLITE_SINGLE_ROUNDING, "
                              "eqs. I1b, I2b, I6)",
    "float_int32_bias": "the bias rounded to int32 and added in int32, torch's float32 multiplier kept (eqs. I1a, I7)",
    "fbgemm": "fbgemm's float path: float bias, float32 multiplier, cvtps2dq (refquant.linear eqs. L8-L11)",
    "x86": "the x86 engine (fbgemm's kernels and float path, eqs. L8-L11)",
    "qnnpack": "qnnpack: uint8 weights, the bias quantized to int32 with the double scales, float32 requantization "
               "scale (eqs. QN3-QN6)",
    "onednn": "oneDNN: float32 scales applied one after the other, float bias, dst scale, then RNE (eqs. DN4-DN7)",
    "int16_saturation": "pairs of u8·s8 products saturated to int16 before the int32 sum (vpmaddubsw, pre-VNNI CPUs; "
                        "eq. M2)",
    "no_int16_saturation": "exact int32 sums of the products (VNNI vpdpbusd), where the golden saturated int16 pairs",
    "no_pairs_restart": "int16 pairs (2j, 2j + 1) from k = 0 throughout (eq. M2), where oneDNN's gemm:jit starts them "
                        "afresh at its second K block (pairs_restart_k, eq. M2b)",
    "input_zero_point_negated": "every linear's input zero point with the wrong sign: raw = acc + z_x·col_offsets "
                                "instead of acc − z_x·col_offsets (eq. L5)",
    "fbgemm_legacy_fma": "QuantStub: fmaf(x, 1/scale, zero_point), one rounding, half to even (eq. Q1)",
    "nearbyint_then_add": "QuantStub: rint(x·(1/scale)) + zero_point, the later FBGEMM's rounding",
    "multiply_then_add": "QuantStub without FMA: f32(f32(x·(1/scale)) + zero_point), two roundings (eq. Q1c)",
}
"""One line per variant name: what it computes instead of the golden's arithmetic."""
for _name, _formula in PORT_ROUNDINGS.items():
    VARIANT_WHAT[_name] = "QuantStub: " + _formula
for _kernel in ONEDNN_KERNELS:
    VARIANT_WHAT[f"onednn_{_kernel}"] = f"oneDNN's {_kernel} kernel (eqs. DN4, DN5)"
del _name, _formula, _kernel


class ExplainInputError(ValueError):
    """Their codes (or input codes, or accumulators) do not fit the golden: what is wrong, in one line."""


# ================================================================================================================
# Variants
# ================================================================================================================

@dataclass(frozen=True)
class Variant:
    """One modelled change of arithmetic: its ``name``, ``axis`` (:data:`AXES`), one line ``what`` it changes, the
    :func:`refquant.program.run_program` arguments it sets, and the zero-point ``edits`` ((tensor, delta), ...)."""

    name: str
    axis: str
    what: str
    run_args: tuple[tuple[str, Any], ...] = ()
    edits: tuple[tuple[int, int], ...] = ()
    axes: tuple[str, ...] = ()

    def combined(self, other: "Variant") -> "Variant | None":
        """``self+other``, or None when both change the same thing."""
        mine, theirs = dict(self.run_args), dict(other.run_args)
        if set(self.all_axes) & set(other.all_axes) or set(mine) & set(theirs):
            return None
        return Variant(f"{self.name}+{other.name}", "combination", f"{self.what}; and {other.what}",
                       tuple({**mine, **theirs}.items()), self.edits + other.edits,
                       self.all_axes + other.all_axes)

    @property
    def all_axes(self) -> tuple[str, ...]:
        return self.axes or (self.axis,)


def _zero_point_groups(program: Program) -> list[tuple[int, str, list[int]]]:
    """Each uint8 tensor written by a quantize or linear step (or the bare layer's input codes), with the step name
    that writes it and every tensor that carries the same zero point (through ReLU on codes, Identity, Flatten)."""
    out = []
    heads = [(0, "input")] if program.tensors[0].dtype == np.uint8 else []
    heads += [(s.output, s.name) for s in program.steps if s.kind in ("quantize", "linear")]
    for t, name in heads:
        group, frontier = [t], [t]
        while frontier:
            u = frontier.pop()
            for s in program.steps:
                if s.input == u and (s.kind in ("identity", "flatten") or (s.kind == "relu" and
                                                                            s.constants["domain"] == "codes")):
                    group.append(s.output)
                    frontier.append(s.output)
        out.append((t, name, group))
    return out


def _with_zero_points(program: Program, edits: tuple[tuple[int, int], ...]) -> Program:
    """A copy of ``program`` with the zero point of each edited tensor moved by delta, where it is written (quantize
    zero_point, linear output_zero_point) and wherever it is read (linear input_zero_point, dequantize and ReLU
    zero_point). Layers are rebuilt from the edited primary quantities (ProgramStep.layer)."""
    groups = {t: set(g) for t, _, g in _zero_point_groups(program)}
    steps = []
    for s in program.steps:
        c = dict(s.constants)
        for t, delta in edits:
            group = groups[t]
            if s.output == t and s.kind == "quantize":
                c["zero_point"] = np.int32(c["zero_point"] + delta)
            if s.output == t and s.kind == "linear":
                c["output_zero_point"] = np.int32(c["output_zero_point"] + delta)
            if s.input in group and s.kind == "linear":
                c["input_zero_point"] = np.int32(c["input_zero_point"] + delta)
            if s.input in group and (s.kind == "dequantize" or (s.kind == "relu" and c["domain"] == "codes")):
                c["zero_point"] = np.int32(c["zero_point"] + delta)
        for k in ("zero_point", "output_zero_point", "input_zero_point"):
            if k in c and not 0 <= int(c[k]) <= 255:
                raise ValueError(f"step {s.index} ({s.name!r}): {k} {int(c[k])} leaves [0, 255]")
        steps.append(dataclasses.replace(s, constants=c, _layer=None))
    return dataclasses.replace(program, steps=steps)


def variants_of(program: Program) -> list[Variant]:
    """Every single variant that changes something in ``program`` (see the module docstring), in the order of
    :data:`AXES` (the order that also breaks ties between variants that reproduce the same codes)."""
    linear = [s for s in program.steps if s.kind == "linear"]
    out: list[Variant] = []
    requantizations = {s.constants["requantization"] for s in linear}
    engines = {s.constants["engine"] for s in linear}
    for v in fp.VARIANTS:
        if requantizations != {v}:
            out.append(Variant(v, "requantization", VARIANT_WHAT[v], (("requantization", v),)))
    for v in fp.VARIANTS:
        for rule in fp.BIAS_RULES:
            if rule != fp.DEFAULT_BIAS_RULE[v] and any(s.constants["has_bias"] for s in linear):
                eq = fp.BIAS_RULE_DEFINITIONS[rule][:9]  # "eq. I1b: ..."
                out.append(Variant(f"{v}[bias={rule}]", "requantization",
                                   f"{VARIANT_WHAT[v]}, the bias by rule {rule!r} ({eq})",
                                   (("requantization", v), ("bias_rule", rule))))
    for e in ENGINES:
        if linear and engines != {e}:
            # the engine's own float path (an integer variant in the file stays: ProgramStep.layer)
            args = (("engine", e),)
            if requantizations <= set(fp.VARIANTS):
                args += (("requantization", ENGINE_SPECS[e].requantization),)
            out.append(Variant(e, "engine", VARIANT_WHAT[e], args))
    saturating = {bool(s.constants["saturate_int16_pairs"]) for s in linear}
    if False in saturating:
        out.append(Variant("int16_saturation", "kernel", VARIANT_WHAT["int16_saturation"],
                           (("saturate_int16_pairs", True),)))
    if True in saturating:
        out.append(Variant("no_int16_saturation", "kernel", VARIANT_WHAT["no_int16_saturation"],
                           (("saturate_int16_pairs", False),)))
    if "onednn" in engines:
        kernels = {s.constants.get("onednn_kernel", "brgemm") for s in linear}
        for k in ONEDNN_KERNELS:
            if kernels != {k}:
                out.append(Variant(f"onednn_{k}", "kernel", VARIANT_WHAT[f"onednn_{k}"], (("onednn_kernel", k),)))
    if any(s.constants.get("pairs_restart_k") for s in linear):
        out.append(Variant("no_pairs_restart", "kernel", VARIANT_WHAT["no_pairs_restart"],
                           (("pairs_from_k0", True),)))
    if any(int(s.constants["input_zero_point"]) for s in linear):
        out.append(Variant("input_zero_point_negated", "zero_point_sign", VARIANT_WHAT["input_zero_point_negated"],
                           (("negate_input_zero_point", True),)))
    roundings = {s.constants["rounding"] for s in program.steps if s.kind == "quantize"}
    if roundings:
        for r in (*ROUNDINGS, *PORT_ROUNDINGS):
            if roundings != {r}:
                out.append(Variant(r, "input_rounding", VARIANT_WHAT[r], (("rounding", r),)))
    for t, name, _ in _zero_point_groups(program):
        for delta, word in ((1, "plus_one"), (-1, "minus_one")):
            out.append(Variant(f"{name}.zero_point_{word}", "zero_point",
                               f"the zero point of {name!r}'s output {'+' if delta > 0 else '−'}1 wherever it is "
                               f"written and read", edits=((t, delta),), axes=(f"zero_point:{t}",)))
    return out


def run_variant(program: Program, variant: Variant) -> ProgramRun:
    """``program`` run with ``variant`` (ValueError when it does not apply to the program)."""
    p = _with_zero_points(program, variant.edits) if variant.edits else program
    return run_program(p, **dict(variant.run_args))


# ================================================================================================================
# The golden's (or a variant's) intermediates at one element
# ================================================================================================================

def _fraction_text(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _rounding_facts(value: Fraction, rule: str) -> dict[str, Any]:
    fl = math.floor(value)
    frac = value - fl
    distance = abs(frac - Fraction(1, 2))
    if rule == "half_even":
        rounded = fl + 1 if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and fl % 2) else fl
    elif rule == "half_up":
        rounded = math.floor(value + Fraction(1, 2))
    else:  # half_away
        rounded = int(math.copysign(math.floor(abs(value) + Fraction(1, 2)), value)) if value else 0
    return {"value": float(value), "value_exact": _fraction_text(value), "rounding": rule,
            "distance_to_boundary": float(distance), "tie": distance == 0, "rounded": int(rounded)}


def _clamp_facts(rounded: int, zero_point: int, lo: int, hi: int) -> dict[str, Any]:
    q = rounded + zero_point
    clamp = "low" if q < lo else "high" if q > hi else None
    return {"output_zero_point": zero_point, "unclamped_code": int(q), "clamp": clamp,
            "clamp_range": [lo, hi], "code": int(min(max(q, lo), hi))}


def before_rounding(layer, raw: int, n: int) -> dict[str, Any]:
    """The value a layer's requantization rounds last for one element (int32 ``raw`` at output channel ``n``), its
    distance to the rounding boundary, and the clamp -- computed from the requantizer's own constants, one Python
    statement per rounding of its equations (the per-element form of refquant.engines' and refquant.fixed_point's
    readable requantizations). ``code`` is what it rounds to: tests/test_explain.py proves it the layer's code for
    every element, engine, integer variant and oneDNN kernel, and each report element says ``verified``."""
    rq = layer.requantizer
    raw = int(raw)
    if isinstance(rq, FbgemmRequantizer):  # eqs. L8-L11
        c = n if rq.per_channel else 0
        raw_f32 = np.float32(raw)
        if rq.bias_mode == 0:
            t = raw_f32
        elif rq.bias_mode == 1:
            t = np.float32(raw_f32 + rq.bias_term[n])
        else:
            t = np.float32(fmaf(np.float32(rq.bias[n]), rq.bias_rcp, raw_f32))
        y = np.float32(t * rq.output_multiplier[c])  # eq. L9
        facts = {"formula": "y = f32(t·output_multiplier), t = raw with the float bias (eqs. L8, L9)",
                 "bias_added_f32": float(t)} | _rounding_facts(Fraction(float(y)), "half_even")
        lo = rq.output_zero_point if rq.relu else 0
        return facts | _clamp_facts(facts["rounded"], rq.output_zero_point, lo, 255)
    if isinstance(rq, QnnpackRequantizer):  # eqs. QN5, QN6
        acc = int(fp.wrap_int32(np.int64(raw) + np.int64(rq.bias_i32[n])))
        y = np.float32(np.float32(acc) * rq.requantization_scales[n])
        facts = {"formula": "y = f32(f32(raw + bias_i32)·requantization_scale) (eqs. QN5, QN6)",
                 "bias_i32": int(rq.bias_i32[n])} | _rounding_facts(Fraction(float(y)), "half_even")
        r = min(max(facts["rounded"], -32768), 32767)
        return facts | _clamp_facts(r, rq.output_zero_point, rq.output_min, rq.output_max)
    if isinstance(rq, fp.IntegerRequantizer):  # eqs. I3-I7
        acc = int(fp.wrap_int32(np.int64(raw) + np.int64(rq.bias_i32[n])))
        facts: dict[str, Any] = {"bias_i32": int(rq.bias_i32[n])}
        if rq.variant == "float_int32_bias":
            y = np.float32(np.float32(acc) * rq.output_multiplier[n])
            facts |= {"formula": "y = f32(f32(raw + bias_i32)·output_multiplier) (eq. I7)"}
            facts |= _rounding_facts(Fraction(float(y)), "half_even")
        else:
            M, s = int(rq.requant_multiplier_i32[n]), int(rq.requant_shift[n])
            facts["requant_multiplier_i32"], facts["requant_shift"] = M, s
            if rq.variant == "fbgemm_fixed_point":
                facts["formula"] = "(raw + bias_i32)·M / 2^s, rounded half up (eq. I4)"
                facts |= _rounding_facts(Fraction(acc * M, 2**s), "half_up")
            elif rq.variant == "tflite_single_rounding":
                facts["formula"] = "(raw + bias_i32)·M / 2^(31 − shift), rounded half up (eq. I6)"
                facts |= _rounding_facts(Fraction(acc * M, 2 ** (31 - s)), "half_up")
            else:  # tflite: the value before RoundingDivideByPOT, after the first rounding (SRDHM)
                x = int(fp.wrap_int32(np.int64(acc) * np.int64(2 ** max(s, 0))))
                h = int(fp.saturating_rounding_doubling_high_mul(np.array([x], np.int32), np.array([M], np.int32))[0])
                facts["formula"] = ("h = SaturatingRoundingDoublingHighMul((raw + bias_i32)·2^max(shift, 0), M) "
                                    "(first rounding, half up), then h / 2^max(−shift, 0) rounded half away (eq. I5)")
                facts["first_rounding"] = {"exact": _fraction_text(Fraction(x * M, 2**31)), "rounded": h}
                facts |= _rounding_facts(Fraction(h, 2 ** max(-s, 0)), "half_away")
        r = facts["rounded"]
        return facts | _clamp_facts(r, rq.output_zero_point, rq.quant_min, rq.quant_max)
    if isinstance(rq, OnednnRequantizer):  # eqs. DN4-DN7
        if rq.kernel == "brgemm_amx":
            acc = int(fp.wrap_int32(np.int64(raw) - np.int64(rq.compensation[n])))
            t = np.float32(np.float32(acc) + np.float32(rq.compensation[n]))  # eq. DN4b
        else:
            t = np.float32(raw)  # eq. DN4a
        if rq.kernel == "brgemm":
            v = np.float32(np.float32(t * rq.input_scale_onednn) * rq.weight_scales_onednn[n])  # eq. DN5a
        else:
            v = np.float32(t * rq.output_scales[n])  # eq. DN5b
        if rq.bias is not None:
            v = np.float32(v + rq.bias[n])  # eq. DN5c
        if rq.relu:
            v = v if v > 0 else np.float32(0)
        v = np.float32(np.float32(v * rq.dst_multiplier) + np.float32(rq.output_zero_point))  # eq. DN6
        clamp = "low" if v < 0 else "high" if v > 255 else None
        v = np.float32(min(max(v, np.float32(0)), np.float32(255)))  # eq. DN7: saturate in float32, then RNE
        facts = {"formula": "v = clamp(f32(f32(scaled raw + bias)·dst_multiplier) + z_y, 0, 255), the zero point "
                            "added before rounding (eqs. DN4-DN7)"} | _rounding_facts(Fraction(float(v)), "half_even")
        return facts | {"output_zero_point": rq.output_zero_point, "clamp": clamp, "clamp_range": [0, 255],
                        "code": facts["rounded"]}
    return {"formula": f"{type(rq).__name__}: not decomposed"}


# ================================================================================================================
# The report
# ================================================================================================================

@dataclass
class VariantResult:
    """One variant against their codes: ``differing`` (their codes it does not reproduce), ``explains`` (their
    differing codes it reproduces, counted only when it is ``consistent``), ``changes`` (codes it changes against
    the reference run), ``accumulators_differing`` (against their accumulators, when given)."""

    name: str
    axis: str
    what: str
    differing: int
    changes: int
    consistent: bool
    explains: int
    accumulators_differing: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Element:
    """One differing code: its ``index`` in the codes tensor, ``golden`` and ``theirs``, whether a verified variant
    reproduces it (``explained``, ``cause`` one line, ``variants`` every consistent variant that reproduces it), and
    the intermediates of the golden (and of the cause's run)."""

    index: tuple[int, ...]
    golden: int
    theirs: int
    explained: bool
    cause: str | None
    variants: list[str]
    golden_intermediates: dict[str, Any]
    variant_intermediates: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["index"] = list(self.index)
        return d

    def line(self) -> str:
        g = self.golden_intermediates
        where = ",".join(map(str, self.index))
        bits = [f"[{where}] golden {self.golden}, theirs {self.theirs}"]
        if "acc_i32" in g:
            bits.append(f"acc {g['acc_i32']}, raw {g['raw_i32']}")
        if "value_exact" in g:
            tie = " (a tie)" if g["tie"] else ""
            bits.append(f"value before rounding {g['value']:.9g} = {g['value_exact']}, "
                        f"{g['distance_to_boundary']:.3g} from the boundary{tie}")
        if g.get("clamp"):
            bits.append(f"clamped {g['clamp']}")
        if g.get("int16_saturated"):
            bits.append("int16 pairs saturated")
        head = "; ".join(bits)
        return f"{head}\n      -> {self.cause if self.explained else 'UNEXPLAINED: no modelled variant reproduces it'}"


@dataclass
class InputReport:
    """Their input codes against the golden QuantStub's: the same counts for the input rounding variants."""

    differing: int
    explained: int
    best_variant: str | None
    variants: list[VariantResult]
    elements: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"differing": self.differing, "explained": self.explained, "best_variant": self.best_variant,
                "variants": [v.to_json() for v in self.variants], "elements": self.elements}


@dataclass
class Explanation:
    """What :func:`explain` found. ``differing``: their codes that differ from the golden's; ``explained``: how
    many of those a verified variant reproduces; ``best_variant``: the first variant (or ``a+b``) that reproduces
    all their codes, None when none does (or nothing differs); ``reproducing``: every one that does;
    ``variants``: every variant tried, combinations included; ``elements``: every differing code."""

    source: str | None
    tensor: int
    shape: tuple[int, ...]
    size: int
    differing: int
    explained: int
    best_variant: str | None
    reproducing: list[str]
    variants: list[VariantResult]
    elements: list[Element]
    skipped: dict[str, str] = field(default_factory=dict)
    input: InputReport | None = None
    accumulators_differing: int | None = None

    @property
    def unexplained(self) -> int:
        return self.differing - self.explained + (self.input.differing - self.input.explained if self.input else 0)

    @property
    def equal(self) -> bool:
        return self.differing == 0 and (self.input is None or self.input.differing == 0)

    def to_json(self) -> dict[str, Any]:
        return {"golden": self.source, "tensor": self.tensor, "shape": list(self.shape), "size": self.size,
                "differing": self.differing, "explained": self.explained, "unexplained": self.unexplained,
                "best_variant": self.best_variant, "reproducing": self.reproducing,
                "variants": [v.to_json() for v in self.variants], "elements": [e.to_json() for e in self.elements],
                "skipped": self.skipped, "input": None if self.input is None else self.input.to_json(),
                "accumulators_differing": self.accumulators_differing}

    def render(self, max_elements: int = 5) -> str:
        """The text report: counts, the variants that matter, the first ``max_elements`` differing codes."""
        lines = [f"their codes: {self.size} (tensor {self.tensor}, shape {self.shape}); differing from the golden: "
                 f"{self.differing}; explained: {self.explained}"]
        if self.input is not None:
            lines.append(f"their input codes: differing {self.input.differing}, explained {self.input.explained}"
                         + (f" by {self.input.best_variant}" if self.input.best_variant else ""))
        if self.accumulators_differing is not None:
            lines.append(f"their accumulators: {self.accumulators_differing} differ from the golden's")
        if self.equal:
            lines.append("equal: nothing to explain")
            return "\n".join(lines)
        if self.best_variant:
            others = [r for r in self.reproducing if r != self.best_variant]
            lines.append(f"best variant: {self.best_variant} reproduces all their codes"
                         + (f" (so do {', '.join(others)})" if others else ""))
        else:
            lines.append("best variant: none reproduces all their codes")
        ranked = sorted((v for v in self.variants if v.changes), key=lambda v: v.differing)[:8]
        lines.append("variants (their codes each does not reproduce; * = consistent):")
        for v in ranked:
            lines.append(f"  {v.name:<40} {v.differing:>7}{' *' if v.consistent else ''}")
        lines.append(f"differing elements (first {min(max_elements, len(self.elements))} of {len(self.elements)}):")
        for e in self.elements[:max_elements]:
            lines.append("  " + e.line())
        if self.unexplained:
            lines.append(f"UNEXPLAINED: {self.unexplained} code(s) no modelled variant reproduces")
        return "\n".join(lines)


# ================================================================================================================
# explain
# ================================================================================================================

def _codes_tensor(program: Program) -> int:
    """The tensor of output codes: the program's output if it holds codes, else the codes its final dequantize
    reads (back through float ReLU / Identity / Flatten)."""
    t = program.output
    while program.tensors[t].dtype != np.uint8:
        step = program.steps[t - 1] if t > 0 else None
        if step is None or step.kind not in ("dequantize", "relu", "identity", "flatten"):
            raise ExplainInputError(f"the golden's output tensor {program.output} holds no codes and is not a "
                                    f"dequantized code tensor")
        t = step.input
    return t


def _writer(program: Program, t: int):
    """The linear step that wrote codes tensor ``t`` (through ReLU on codes, Identity, Flatten), or None."""
    while t > 0:
        s = program.steps[t - 1]
        if s.kind == "linear":
            return s
        if s.kind not in ("relu", "identity", "flatten"):
            return None
        t = s.input
    return None


def _as_codes(values: object, shape: tuple[int, ...], what: str, dtype=np.uint8) -> np.ndarray:
    a = np.asarray(values)
    if a.dtype.kind not in "iu":
        raise ExplainInputError(f"{what} must be integers, got dtype {a.dtype}")
    if a.size != int(np.prod(shape)) or (a.ndim and a.shape[-1] != shape[-1]):
        raise ExplainInputError(f"{what} have shape {a.shape}, the golden's vectors have shape {shape} (rows of "
                                f"{shape[-1]})")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        bad = a[(a < info.min) | (a > info.max)].reshape(-1)[0]
        raise ExplainInputError(f"{what} must lie in [{info.min}, {info.max}], got {int(bad)}")
    return a.astype(np.int64).reshape(shape).astype(dtype)


def _subprogram_from_input_codes(program: Program, codes: np.ndarray) -> Program:
    """The program after its QuantStub, started from ``codes`` (tensor 1 becomes tensor 0)."""
    steps = [dataclasses.replace(s, index=s.index - 1, input=s.input - 1, _layer=None) for s in program.steps[1:]]
    return Program(program.format, steps, [codes, *program.tensors[2:]], program.output - 1, program.source)


def _score(name, axis, what, codes, reference, theirs, golden, acc=None, their_acc=None
           ) -> tuple[VariantResult, np.ndarray]:
    """A variant's codes against theirs: consistent when every code it changes from the ``reference`` run is
    theirs; then it explains their codes that differ from the ``golden`` file's and that it reproduces."""
    changes = codes != reference
    reproduces = codes == theirs
    acc_diff = None if their_acc is None or acc is None else int((acc != their_acc).sum())
    consistent = bool(changes.any()) and bool(reproduces[changes].all()) and not acc_diff
    explains = consistent & reproduces & (theirs != golden)
    return (VariantResult(name, axis, what, int((~reproduces).sum()), int(changes.sum()), consistent,
                          int(explains.sum()), acc_diff), explains)


def explain(golden_or_program: object, their_codes: object, *, their_input_codes: object = None,
            their_accumulators: object = None, max_combinations: int = 400) -> Explanation:
    """Explain how ``their_codes`` differ from a golden program's output codes, element by element.

    Args:
        golden_or_program: a :class:`refquant.program.Program`, a golden file path (``.npz`` or ``.json`` of any
            format refquant writes) or its checked fields (refquant.export.load_golden's dict).
        their_codes: integers (any integer dtype), the other implementation's output codes for the golden's test
            vectors: the program's output tensor, or for a model ending in DeQuantStub the codes it dequantizes;
            the same shape, or rows of its last dimension (one row per vector).
        their_input_codes: optional, their QuantStub's codes of the golden's float input (tensor 1).
        their_accumulators: optional int32, their accumulators of the linear step that wrote the output codes.
        max_combinations: at most this many two-variant combinations are run.

    Returns an :class:`Explanation`. Raises :class:`ExplainInputError` (a ValueError) for codes that do not fit.
    """
    if isinstance(golden_or_program, Program):
        program = golden_or_program
    elif isinstance(golden_or_program, dict):
        program = program_from_fields(golden_or_program)
    elif isinstance(golden_or_program, (str, Path)):
        program = load_program(golden_or_program)
    else:
        raise TypeError(f"golden_or_program must be a refquant.program.Program, a golden file path or its fields, "
                        f"got {type(golden_or_program).__name__}")
    T = _codes_tensor(program)
    golden = program.tensors[T]
    theirs = _as_codes(their_codes, golden.shape, "their codes")
    writer = _writer(program, T)
    their_acc = None
    if their_accumulators is not None:
        if writer is None:
            raise ExplainInputError("their accumulators: the golden's output codes are not written by a linear step")
        a = np.asarray(their_accumulators)
        their_acc = _as_codes(a, writer.acc_i32.shape, "their accumulators", np.int32).astype(np.int32)

    variants = variants_of(program)
    input_report = None
    base, reference_run = program, None
    if their_input_codes is not None:
        if not program.steps or program.steps[0].kind != "quantize" or program.steps[0].input != 0:
            raise ExplainInputError("their input codes: the golden does not start with a QuantStub (quantize step)")
        their_in = _as_codes(their_input_codes, program.tensors[1].shape, "their input codes")
        input_report = _explain_input(program, their_in, [v for v in variants if v.axis in ("input_rounding",
                                                                                              "zero_point")])
        base = _subprogram_from_input_codes(program, their_in)
        T -= 1
        writer = _writer(base, T)
        variants = [v for v in variants if v.axis != "input_rounding"]
        variants = [dataclasses.replace(v, edits=tuple((t - 1, d) for t, d in v.edits)) for v in variants]
        reference_run = run_program(base)
        reference = reference_run.tensors[T]
    else:
        reference = golden
    differs = theirs != golden

    def acc_of(run):
        return None if writer is None else run.acc_i32[writer.index]

    results: list[VariantResult] = []
    runs: dict[str, ProgramRun] = {}
    explains: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    if reference_run is not None:  # the file's arithmetic on their input codes: a run like the variants'
        changes = reference != golden
        consistent = bool(changes.any()) and bool((reference == theirs)[changes].all())
        e = consistent & (reference == theirs) & differs
        results.append(VariantResult("their_input_codes", "input", "the golden's arithmetic run on their input codes",
                                     int((reference != theirs).sum()), int(changes.sum()), consistent, int(e.sum())))
        runs["their_input_codes"], explains["their_input_codes"] = reference_run, e
    singles: dict[str, Variant] = {}

    def attempt(v: Variant) -> None:
        try:
            run = run_variant(base, v)
        except ValueError as err:
            skipped[v.name] = str(err)
            return
        r, e = _score(v.name, v.axis, v.what, run.tensors[T], reference, theirs, golden, acc_of(run), their_acc)
        r.explains = int((e & differs).sum())
        results.append(r)
        runs[v.name], explains[v.name] = run, e & differs

    if differs.any() or their_acc is not None:
        for v in variants:
            singles[v.name] = v
            attempt(v)
        if not any(r.differing == 0 and not r.accumulators_differing for r in results):
            useful = [singles[r.name] for r in results if r.name in singles and r.changes
                      and (r.explains or (runs[r.name].tensors[T] == theirs)[differs].any())]
            tried = 0
            # a member may change nothing alone and still matter with the other (tflite's ties after saturation)
            for a, b in itertools.combinations([singles[r.name] for r in results if r.name in singles], 2):
                if a not in useful and b not in useful:
                    continue
                ab = a.combined(b)
                if ab is None:
                    continue
                if tried >= max_combinations:
                    skipped["combinations"] = f"stopped after {max_combinations} combinations"
                    break
                tried += 1
                attempt(ab)

    reproducing = [r.name for r in results if r.differing == 0 and not r.accumulators_differing and differs.any()]
    best = reproducing[0] if reproducing else None
    acc_differing = None
    if their_acc is not None:
        ref_acc = reference_run.acc_i32[writer.index] if reference_run is not None else writer.acc_i32
        acc_differing = int((ref_acc != their_acc).sum())

    elements = []
    explained_mask = np.zeros(golden.shape, bool)
    by_strength = sorted((r for r in results if r.consistent and r.explains
                          and (r.name in reproducing or r.changes >= MIN_SUPPORT)),
                         key=lambda r: (r.name != best, -r.explains))
    layers: dict = {}
    T_file = T + (1 if reference_run is not None else 0)  # the codes tensor in the file's own numbering
    for idx in zip(*np.nonzero(differs)):
        idx = tuple(int(i) for i in idx)
        names = [r.name for r in by_strength if explains[r.name][idx]]
        inter = _intermediates(program, None, T_file, idx, their_acc, layers)  # the file's own vectors
        el = Element(idx, int(golden[idx]), int(theirs[idx]), bool(names), None, names, inter)
        if names:
            explained_mask[idx] = True
            cause = names[0]
            vi = _intermediates(base, runs[cause], T, idx, None, layers)
            what = next(r.what for r in results if r.name == cause)
            el.cause = f"{cause}: {what}; gives {int(theirs[idx])} where the golden gives {int(golden[idx])}"
            if reference_run is not None and cause != "their_input_codes" and reference[idx] == theirs[idx]:
                el.cause += " (their input codes alone give it)"
            if "_row" in vi and "_row" in inter and not np.array_equal(vi["_row"], inter["_row"]):
                el.cause += " (this layer's input codes differ already: an earlier step changed them)"
            elif "raw_i32" in vi and "raw_i32" in inter and vi["raw_i32"] != inter["raw_i32"]:
                el.cause += f" (raw int32 {vi['raw_i32']} instead of {inter['raw_i32']})"
            elif "value_exact" in vi and "value_exact" in inter:
                el.cause += f" (value before rounding {vi['value_exact']} instead of {inter['value_exact']})"
            vi.pop("_row", None)
            el.variant_intermediates = vi
        inter.pop("_row", None)
        elements.append(el)
    return Explanation(None if program.source is None else str(program.source), T + (1 if reference_run else 0),
                       golden.shape, int(golden.size), int(differs.sum()), int(explained_mask.sum()), best,
                       reproducing, results, elements, skipped, input_report, acc_differing)


def _intermediates(program: Program, run: ProgramRun | None, T: int, idx: tuple[int, ...],
                   their_acc: np.ndarray | None, layers: dict) -> dict[str, Any]:
    """The intermediates of codes tensor ``T`` at ``idx``: of the program's own vectors (``run`` None) or of a run
    (``layers`` caches the rebuilt golden layers)."""
    writer = _writer(program, T)
    if writer is None:
        return {"writer": program.steps[T - 1].kind if T > 0 else "input"}
    tensors = program.tensors if run is None else run.tensors
    flat = int(np.ravel_multi_index(idx, tensors[T].shape))
    acc = (writer.acc_i32 if run is None else run.acc_i32[writer.index]).reshape(-1)
    raw = (writer.raw_i32 if run is None else run.raw_i32[writer.index]).reshape(-1)
    if run is None:
        if writer.index not in layers:
            layers[writer.index] = writer.layer()
        layer = layers[writer.index]
    else:
        layer = run.layers[writer.index]
    n = flat % layer.out_features
    row = tensors[writer.input].reshape(-1, layer.in_features)[flat // layer.out_features]
    d: dict[str, Any] = {"step": writer.index, "step_name": writer.name, "output_channel": n,
                         "acc_i32": int(acc[flat]), "raw_i32": int(raw[flat])}
    if their_acc is not None:
        d["their_acc_i32"] = int(their_acc.reshape(-1)[flat])
    # would pairs of products saturate to int16 (eq. M2) in this element's sum?
    pairs = [matmul_u8s8_acc32(row[None, :], layer.weight_int8[n:n + 1], saturate_int16_pairs=sat)[0, 0]
             for sat in (True, False)]
    d["int16_pairs_would_saturate"] = bool(pairs[0] != pairs[1])
    d["saturate_int16_pairs"] = bool(layer.saturate_int16_pairs)
    d.update(before_rounding(layer, d["raw_i32"], n))
    if "code" in d:  # the decomposition rounds to what the layer computed
        d["verified"] = d["code"] == int(tensors[writer.output].reshape(-1)[flat])
    d["_row"] = row
    return d


def _explain_input(program: Program, their_in: np.ndarray, variants: list[Variant]) -> InputReport:
    golden = program.tensors[1]
    differs = their_in != golden
    results, explains = [], {}
    for v in variants:
        if v.axis == "zero_point" and v.edits[0][0] != 1:
            continue
        try:
            run = run_variant(Program(program.format, program.steps[:1], program.tensors[:2], 1), v)
        except ValueError:
            continue
        r, e = _score(v.name, v.axis, v.what, run.tensors[1], golden, their_in, golden)
        r.explains = int((e & differs).sum())
        results.append(r)
        explains[v.name] = e & differs
    reproducing = [r.name for r in results if r.differing == 0 and differs.any()]
    explained = np.zeros(golden.shape, bool)
    for m in explains.values():
        explained |= m
    x = program.tensors[0]
    c = program.steps[0].constants
    elements = []
    for idx in zip(*np.nonzero(differs)):
        idx = tuple(int(i) for i in idx)
        names = [r.name for r in results if explains[r.name][idx]]
        elements.append({"index": list(idx), "golden": int(golden[idx]), "theirs": int(their_in[idx]),
                         "x": float(x[idx]), "x_over_scale": float(np.float64(x[idx]) / float(c["scale"])),
                         "zero_point": int(c["zero_point"]), "explained": bool(names), "variants": names})
    return InputReport(int(differs.sum()), int(explained.sum()), reproducing[0] if reproducing else None, results,
                       elements)
