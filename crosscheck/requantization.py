"""How far an integer-only requantization's output codes are from torch's, and why: the reported rows of
``--requantization VARIANT`` (``python -m crosscheck.linear``, ``python -m crosscheck.model``).

For every Linear call of the study and every batch, refquant's int32 accumulators of that call (``raw``, eq. L5 of
refquant.linear: equal to torch's, a derived parity row) are requantized by the variant
(``refquant.fixed_point.compare_with_float_path``, the layer's own s_x, s_w, s_y, bias and z_y, the variant's bias
rule) and the codes are compared with the codes torch's call returned. Each differing code gets its cause: the
first ingredient that moved it away from torch's code, along the chain

    torch's codes (the engine's float path)
      -> engine_float_path  fbgemm's float path (eqs. L8-L11) instead of the engine's own: qnnpack's int32 bias and
                            float32 scale (eqs. QN5, QN6), oneDNN's (eqs. DN4-DN7); never a cause on fbgemm and x86,
                            whose float path is fbgemm's (the parity rows prove it)
      -> bias_i32           the bias rounded to int32 by the variant's rule, float32 multiply kept
      -> exact_rounding     acc·mult rounded once, exactly, half up (FBGEMM's fixed point)
      -> q31_multiplier     TFLite's Q31 multiplier of the double real multiplier
      -> second_rounding    TFLite's second rounding (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT)

(refquant.fixed_point.CAUSES after the first; each variant walks the chain up to its own ingredients). These rows
are of kind ``requantization``: reported in the text and the JSON, never parity rows, never in the exit code.

The variant's names (:data:`VARIANTS`) are repeated here so that ``--help`` does not import refquant (Numba);
tests/test_crosscheck_requantization.py checks them against refquant.fixed_point.VARIANTS.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import compare as C

VARIANTS = ("fbgemm_fixed_point", "tflite", "tflite_single_rounding", "float_int32_bias")
"""refquant.fixed_point.VARIANTS: the integer requantizations ``QuantizedLinear(requantization=...)`` accepts
besides the engines' float paths."""

ENGINE_CAUSE = "engine_float_path"
CAUSES = (ENGINE_CAUSE, "bias_i32", "exact_rounding", "q31_multiplier", "second_rounding")
"""The chain of ingredients, in order (the last four: refquant.fixed_point.CAUSES)."""

NOTE = ("reported, not parity: refquant.fixed_point.compare_with_float_path requantizes this call's int32 "
        "accumulators with the variant (the layer's s_x, s_w, s_y, bias, z_y; the variant's bias rule) and the codes "
        "are compared with torch's output codes; 'distance' gives the differences (variant - torch) and the first "
        "ingredient that moved each differing code (crosscheck.requantization.CAUSES)")


def parse_variants(text: str) -> tuple[str, ...]:
    """argparse type of ``--requantization``: one variant, a comma-separated list, or ``all``."""
    if text.strip() == "all":
        return VARIANTS
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--requantization must be one of {', '.join(VARIANTS)}, a comma-separated list of them, or all; got "
            f"{text!r}")
    return names


class Distance:
    """One variant on one Linear call over one batch set, accumulated batch by batch (:meth:`update`)."""

    def __init__(self, variant: str):
        self.variant = variant
        self.bias_rule: str | None = None
        self.codes = 0
        self.differing = 0
        self.histogram: dict[int, int] = {}
        self.causes = {c: 0 for c in CAUSES}
        self.chain: tuple[str, ...] = ()
        self.comparison = C.ArrayComparison("", C.REQUANTIZATION)

    def update(self, layer, raw_i32: np.ndarray, torch_codes: np.ndarray) -> np.ndarray:
        """Add one batch: ``layer`` (refquant's QuantizedLinear of the call), its int32 ``raw`` and the codes torch's
        call returned; returns the variant's codes."""
        from refquant.fixed_point import compare_with_float_path

        fpc = compare_with_float_path(layer, self.variant, raw_i32=np.ascontiguousarray(raw_i32))
        torch_codes = np.asarray(torch_codes)
        stages = [torch_codes, fpc.float_codes, *(fpc.stages[c] for c in fpc.changes)]
        self.chain = (ENGINE_CAUSE, *fpc.changes)
        self.bias_rule = fpc.bias_rule
        variant_codes = stages[-1]
        differs = variant_codes != torch_codes
        cause = np.full(differs.shape, -1, np.int8)
        for i in reversed(range(len(self.chain))):  # the first ingredient that moved a code wins
            moved = stages[i + 1] != stages[i]
            cause = np.where(differs & moved, np.int8(CAUSES.index(self.chain[i])), cause)
        self.codes += int(differs.size)
        self.differing += int(differs.sum())
        d = variant_codes.astype(np.int64)[differs] - torch_codes.astype(np.int64)[differs]
        for value, n in zip(*np.unique(d, return_counts=True)):
            self.histogram[int(value)] = self.histogram.get(int(value), 0) + int(n)
        for i, c in enumerate(CAUSES):
            self.causes[c] += int((cause == i).sum())
        self.comparison.update(torch_codes, variant_codes)
        return variant_codes

    def to_json(self) -> dict:
        """The row's ``distance``: {"variant", "bias_rule", "codes", "differing", "share", "max_abs_difference",
        "histogram": [[variant - torch, count], ...] (differing codes only, ascending), "causes": {cause: count}
        (the first ingredient of the chain that moved each differing code; the chain's ingredients only)}."""
        return {
            "variant": self.variant,
            "bias_rule": self.bias_rule,
            "codes": self.codes,
            "differing": self.differing,
            "share": self.differing / self.codes if self.codes else 0.0,
            "max_abs_difference": max((abs(d) for d in self.histogram), default=0),
            "histogram": [[d, self.histogram[d]] for d in sorted(self.histogram)],
            "causes": {c: self.causes[c] for c in CAUSES if c in self.chain},
        }

    def result(self, name: str, layer: str | None) -> C.Field:
        f = self.comparison.result()
        f.name, f.note, f.layer, f.distance = name, NOTE, layer, self.to_json()
        return f


def distance_lines(fields: list[C.Field]) -> list[str]:
    """The text report's section on the requantization rows (empty without them)."""
    rows = [f for f in fields if f.kind == C.REQUANTIZATION]
    if not rows:
        return []
    width = max(len(f.name) for f in rows) + 2
    L = ["integer-only requantization (reported, not parity rows): each variant's codes from the same int32",
         "accumulators against torch's output codes; differences are variant - torch, causes the first ingredient",
         "that moved each code (crosscheck.requantization)",
         f"  {'row':<{width}}  {'differing':>17}  {'share':>8}  differences       causes"]
    for f in rows:
        d = f.distance
        count = f"{d['differing']:,}/{d['codes']:,}"
        hist = ", ".join(f"{v:+d}: {n:,}" for v, n in d["histogram"]) or "-"
        causes = ", ".join(f"{c} {n:,}" for c, n in d["causes"].items() if n) or "-"
        L.append(f"  {f.name:<{width}}  {count:>17}  {d['share']:8.2e}  {hist:<16}  {causes}")
    return L + [""]


def exported_lines(exported: list[str] | None) -> list[str]:
    """The text report's line naming the files of --export (empty without them)."""
    return [f"integer program (refquant.export.export_model): {', '.join(exported)}", ""] if exported else []
