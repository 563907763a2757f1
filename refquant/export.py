"""Export one quantized Linear as an integer program plus test vectors, for a C or HDL testbench.

A hardware or runtime port needs exactly what fbgemm computes, in the order it computes it. ``export_linear``
writes the layer's constants and a batch of input/output code vectors to ``<path>.npz`` (NumPy) and
``<path>.json`` (any language); ``load_golden`` reads either back. The program the testbench runs, for each input
row x (K uint8 codes) and output feature n (equation numbers of :mod:`refquant.linear`)::

    acc     = sum_k int32(x[k]) * int32(weight_int8[n, k])                      int32, wraps      (L4)
    raw     = acc - input_zero_point * col_offsets[n]
                  - weight_zero_points[n] * sum_k x[k]                          int32, wraps      (L5)
    t       = float(raw)                                       if bias_mode == "none"             (L8a)
              f32(float(raw) + bias_term[n])                   if bias_mode == "add"              (L8b)
              fmaf(bias[n], bias_rcp, float(raw))              if bias_mode == "fma"              (L8c)
    y       = f32(t * output_multiplier[n])                                                       (L9)
    r       = round_half_even(y), or INT32_MIN if y is NaN or |y| >= 2^31                          (L10)
    out     = clamp(r + output_zero_point, relu ? output_zero_point : 0, 255)          uint8      (L11)

Schema (the same names in both files; ``FORMAT`` names its version):

=====================  ============  =========  ===================================================================
name                   dtype         shape      meaning
=====================  ============  =========  ===================================================================
format                 str                      "refquant-golden-linear/1"
in_features            int                      K
out_features           int                      N
relu                   bool                     fused ReLU (lower clamp bound = output_zero_point)
weight_qscheme         str                      how the weights were quantized (informative)
saturate_int16_pairs   bool                     products summed in int16-saturated pairs (pre-VNNI CPUs)
bias_mode              str                      "none", "add" (per-channel weights) or "fma" (per-tensor)
input_scale            float32                  s_x (informative: the program needs only the terms below)
input_zero_point       int32                    z_x
output_scale           float32                  s_y (informative)
output_zero_point      int32                    z_y
weight_int8            int8          (N, K)     weight codes
weight_scales          float32       (N,)       per output feature (a per-tensor scale repeated)
weight_zero_points     int32         (N,)       per output feature (0 for symmetric weights)
col_offsets            int32         (N,)       sum_k weight_int8[n, k] - weight_zero_points[n] * K
act_times_w_scale      float32       (N,)       f32(f32(s_x) * weight_scales[n])
output_multiplier      float32       (N,)       f32(act_times_w_scale[n] / f32(s_y))
bias                   float32       (N,)       the float bias (zeros when bias_mode == "none")
bias_term              float32       (N,)       f32(bias[n] / act_times_w_scale[n]) (used when "add")
bias_rcp               float32                  f32(1.0 / double(act_times_w_scale[0])) (used when "fma")
x_u8                   uint8         (B, K)     input codes
acc_i32                int32         (B, N)     L4, before zero-point corrections
raw_i32                int32         (B, N)     L5, what requantization starts from
y_u8                   uint8         (B, N)     output codes
=====================  ============  =========  ===================================================================

In the JSON file, every float32 value (or array) ``name`` also appears as ``name_bits``: its IEEE-754 bit patterns
as unsigned integers, so a testbench can load the exact bits without trusting a decimal parser. Decimal values are
written with Python's shortest round-trip repr of the float32 value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .linear import QuantizedLinear
from .matmul import matmul_u8s8_acc32

FORMAT = "refquant-golden-linear/1"


def golden_program(ql: QuantizedLinear, x_u8: np.ndarray) -> dict[str, object]:
    """The integer program of ``ql`` and the codes it produces for the input rows ``x_u8`` (B, K), as a dict of
    NumPy values named by the schema in this module's docstring."""
    x_u8 = np.asarray(x_u8)
    if x_u8.ndim != 2:
        raise ValueError(f"x_u8 must be a (B, K) batch of input code rows, got shape {x_u8.shape}")
    N = ql.out_features
    per_n = lambda a: np.broadcast_to(np.asarray(a), (N,)).copy()  # noqa: E731  (per-tensor values repeated)
    if ql.bias is None:
        bias_mode, bias = "none", np.zeros(N, np.float32)
    else:
        bias_mode, bias = ("add" if ql.per_channel else "fma"), ql.bias
    atws = per_n(ql.act_times_w_scale).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        bias_term = (bias / atws).astype(np.float32)
    raw_i32 = ql.accumulate(x_u8)  # checks x_u8 (uint8, last dimension K)
    return {
        "format": FORMAT,
        "in_features": int(ql.in_features),
        "out_features": int(N),
        "relu": bool(ql.relu),
        "weight_qscheme": ql.weight_qscheme,
        "saturate_int16_pairs": bool(ql.saturate_int16_pairs),
        "bias_mode": bias_mode,
        "input_scale": np.float32(ql.input_scale),
        "input_zero_point": np.int32(ql.input_zero_point),
        "output_scale": np.float32(ql.output_scale),
        "output_zero_point": np.int32(ql.output_zero_point),
        "weight_int8": ql.weight_int8,
        "weight_scales": per_n(ql.weight_scales).astype(np.float32),
        "weight_zero_points": per_n(ql.weight_zero_points).astype(np.int32),
        "col_offsets": ql.col_offsets.astype(np.int32),
        "act_times_w_scale": atws,
        "output_multiplier": per_n(ql.output_multiplier).astype(np.float32),
        "bias": bias.astype(np.float32),
        "bias_term": bias_term,
        "bias_rcp": np.float32(1.0 / np.float64(atws[0])),
        "x_u8": x_u8.astype(np.uint8),
        "acc_i32": matmul_u8s8_acc32(x_u8, ql.weight_int8, saturate_int16_pairs=ql.saturate_int16_pairs),
        "raw_i32": raw_i32,
        "y_u8": ql.requantize(raw_i32),
    }


def _to_json_value(value: object) -> object:
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        return np.asarray(value).tolist()
    return value


def export_linear(ql: QuantizedLinear, x_u8: np.ndarray, path: str | Path) -> dict[str, object]:
    """Write ``golden_program(ql, x_u8)`` to ``<path>.npz`` and ``<path>.json``; return the program dict.

    ``path`` is a file name without extension (its directory must exist).
    """
    program = golden_program(ql, x_u8)
    path = Path(path)
    np.savez(path.with_suffix(".npz"), **{k: np.asarray(v) for k, v in program.items()})
    doc: dict[str, object] = {}
    for name, value in program.items():
        doc[name] = _to_json_value(value)
        if np.asarray(value).dtype == np.float32:
            doc[name + "_bits"] = _to_json_value(np.asarray(value).view(np.uint32))
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    return program


def load_golden(path: str | Path) -> dict[str, object]:
    """Read a program written by :func:`export_linear` from ``.npz`` or ``.json`` with the schema's dtypes.

    From JSON, float32 values are rebuilt from their ``_bits`` (exact), integers with the schema's dtypes.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            out = {k: data[k] for k in data.files}
        for k in ("format", "weight_qscheme", "bias_mode"):
            out[k] = str(out[k])
        for k in ("in_features", "out_features"):
            out[k] = int(out[k])
        for k in ("relu", "saturate_int16_pairs"):
            out[k] = bool(out[k])
        return out
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format = {doc.get('format')!r})")
    dtypes = {"input_zero_point": np.int32, "output_zero_point": np.int32, "weight_int8": np.int8,
              "weight_zero_points": np.int32, "col_offsets": np.int32, "x_u8": np.uint8, "acc_i32": np.int32,
              "raw_i32": np.int32, "y_u8": np.uint8}
    out = {}
    for name, value in doc.items():
        if name.endswith("_bits"):
            continue
        if name + "_bits" in doc:
            out[name] = np.asarray(doc[name + "_bits"], np.uint32).view(np.float32)
            if out[name].ndim == 0:
                out[name] = out[name][()]
        elif name in dtypes:
            out[name] = np.asarray(value, dtypes[name])
        else:
            out[name] = value
    return out
