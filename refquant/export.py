"""Export a quantized Linear (and, with refquant.program, a whole model) as an integer program plus test vectors.

A hardware or runtime port needs exactly what fbgemm computes, in the order it computes it. ``export_linear``
writes the layer's constants and a batch of input/output code vectors to ``<path>.npz`` (NumPy) and
``<path>.json`` (any language); ``load_golden`` reads either back, checked field by field. The program the
testbench runs, for each input row x (K uint8 codes) and output feature n (equation numbers of
:mod:`refquant.linear`)::

    acc     = sum_k int32(x[k]) * int32(weight_int8[n, k])                      int32, wraps      (L4)
    raw     = acc - input_zero_point * col_offsets[n]
                  - weight_zero_points[n] * sum_k x[k]                          int32, wraps      (L5)
    t       = float(raw)                                       if bias_mode == "none"             (L8a)
              f32(float(raw) + bias_term[n])                   if bias_mode == "add"              (L8b)
              fmaf(bias[n], bias_rcp, float(raw))              if bias_mode == "fma"              (L8c)
    y       = f32(t * output_multiplier[n])                                                       (L9)
    r       = round_half_even(y), or INT32_MIN if y is NaN or |y| >= 2^31                          (L10)
    out     = clamp(r + output_zero_point, relu ? output_zero_point : 0, 255)          uint8      (L11)

Schema (the same names in both files; ``FORMAT`` names its version). The table in code is ``LINEAR_FIELDS``; both
readers and the writer check every field against it (``values``: the range a value must lie in):

=====================  ============  =========  ==============  =====================================================
name                   dtype         shape      values          meaning
=====================  ============  =========  ==============  =====================================================
format                 str                      FORMAT          "refquant-golden-linear/2" (version 1 is read too)
in_features            int                      >= 1            K
out_features           int                      >= 1            N
relu                   bool                                     fused ReLU (lower clamp bound = output_zero_point)
weight_qscheme         str                      4 qschemes      how the weights were quantized (informative)
saturate_int16_pairs   bool                                     products summed in int16-saturated pairs (pre-VNNI)
bias_mode              str                      none/add/fma    "add" for per-channel weights, "fma" per-tensor
input_scale            float32                  > 0, finite     s_x (informative: the program needs only the terms
                                                                below)
input_zero_point       int32                    [0, 255]        z_x
output_scale           float32                  > 0, finite     s_y (informative)
output_zero_point      int32                    [0, 255]        z_y
weight_int8            int8          (N, K)                     weight codes
weight_scales          float32       (N,)       > 0, finite     per output feature (a per-tensor scale repeated)
weight_zero_points     int32         (N,)       [-128, 127]     per output feature (0 for symmetric weights)
col_offsets            int32         (N,)                       sum_k weight_int8[n, k] - weight_zero_points[n] * K
act_times_w_scale      float32       (N,)                       f32(f32(s_x) * weight_scales[n])
output_multiplier      float32       (N,)                       f32(act_times_w_scale[n] / f32(s_y))
bias                   float32       (N,)                       the float bias (zeros when bias_mode == "none")
bias_term              float32       (N,)                       f32(bias[n] / act_times_w_scale[n]) (used when "add")
bias_rcp               float32                                  f32(1.0 / double(act_times_w_scale[0])) ("fma")
x_u8                   uint8         (B, K)     B >= 1          input codes
acc_i32                int32         (B, N)                     L4, before zero-point corrections
raw_i32                int32         (B, N)                     L5, what requantization starts from
y_u8                   uint8         (B, N)                     output codes
=====================  ============  =========  ==============  =====================================================

In the JSON file, every float32 value (or array) ``name`` also appears as ``name_bits``: its IEEE-754 bit patterns
as unsigned integers, so a testbench can load the exact bits without trusting a decimal parser. The decimal is the
exact value of the float32 (Python's repr of it as a double); NaN and infinities are the strings ``"nan"``,
``"inf"``, ``"-inf"`` (strict JSON; format version 1 wrote the non-standard tokens NaN and Infinity, the only
difference). A reader takes the bits; ``load_golden`` also checks that each decimal rounds to exactly those bits.

Files: ``export_linear(ql, x, "net.fc1")`` writes ``net.fc1.npz`` and ``net.fc1.json`` (the name is kept whole; a
trailing ``.npz`` or ``.json`` is dropped first). Both are written to temporary files in the same directory and
then renamed over the final names, so a failed export leaves no half-written file and no ``.npz`` without its
``.json``.

Reading (:func:`load_golden`) trusts nothing: a file that is not what the schema says -- truncated, corrupted,
another format, a field missing, foreign or of the wrong type, shape or range, a decimal that disagrees with its
bits, pickled objects (never unpickled) -- raises one :class:`GoldenFileError` (a ValueError) naming the file and
the field. To add a format, write its table of :class:`Field`\\ s (or a :class:`Schema` that derives the table
from the file's header) and register it in ``SCHEMAS`` under its own versioned format string; both readers and the
writer follow it. refquant.program registers the whole-model format "refquant-golden-model/2" (and reads /1;
steps over tensors, any engine's float path or integer variant, float64 fields, a C header): :func:`export_model`
writes it, and :func:`export_linear` writes it for every layer that is not fbgemm's float path;
``write_golden(..., header=True)`` adds the C header ``<path>.h`` of any format.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .linear import QuantizedLinear

FORMAT = "refquant-golden-linear/2"
FORMAT_V1 = "refquant-golden-linear/1"

INT32_RANGE = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Field:
    """One entry of a golden file's schema.

    dtype: ``"str"``, ``"bool"``, ``"int"`` (a Python int) or a NumPy dtype name (``"int8"``, ``"uint8"``,
        ``"int32"``, ``"float32"``, ``"float64"``: a scalar of that dtype when ``shape`` is empty, else an array).
    shape: one entry per axis: a dimension name (``"N"``, ``"K"``, ``"B"``), bound by the first field that has it
        (or by an ``"int"`` field's ``dim``), or a fixed int.
    lo, hi: the smallest and largest value allowed (integers; bounds of the dtype if None).
    choices: the allowed strings.
    positive: float values must be finite and > 0.
    dim: an ``"int"`` field that gives the dimension of this name its size (``in_features`` -> ``"K"``).
    """

    dtype: str
    shape: tuple[str | int, ...] = ()
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()
    positive: bool = False
    dim: str | None = None

    @property
    def is_array(self) -> bool:
        return self.dtype not in ("str", "bool", "int")


LINEAR_FIELDS: dict[str, Field] = {
    "format": Field("str"),  # checked first: it chooses the schema (SCHEMAS)
    "in_features": Field("int", lo=1, hi=INT32_RANGE[1], dim="K"),
    "out_features": Field("int", lo=1, hi=INT32_RANGE[1], dim="N"),
    "relu": Field("bool"),
    "weight_qscheme": Field("str", choices=("per_channel_symmetric", "per_channel_affine", "per_tensor_symmetric",
                                            "per_tensor_affine")),
    "saturate_int16_pairs": Field("bool"),
    "bias_mode": Field("str", choices=("none", "add", "fma")),
    "input_scale": Field("float32", positive=True),
    "input_zero_point": Field("int32", lo=0, hi=255),
    "output_scale": Field("float32", positive=True),
    "output_zero_point": Field("int32", lo=0, hi=255),
    "weight_int8": Field("int8", ("N", "K")),
    "weight_scales": Field("float32", ("N",), positive=True),
    "weight_zero_points": Field("int32", ("N",), lo=-128, hi=127),
    "col_offsets": Field("int32", ("N",)),
    "act_times_w_scale": Field("float32", ("N",)),
    "output_multiplier": Field("float32", ("N",)),
    "bias": Field("float32", ("N",)),
    "bias_term": Field("float32", ("N",)),
    "bias_rcp": Field("float32"),
    "x_u8": Field("uint8", ("B", "K")),
    "acc_i32": Field("int32", ("B", "N")),
    "raw_i32": Field("int32", ("B", "N")),
    "y_u8": Field("uint8", ("B", "N")),
}

@dataclass(frozen=True)
class Schema:
    """A format whose fields depend on its own header (a model program: which steps, which constants).

    ``fields(peek, source)`` returns the field table of one file; ``peek(name, field)`` reads the value of a header
    field from the file being read or written, typed and checked against ``field`` (a missing field is a
    GoldenFileError). ``validate(values, source)``, if given, then checks what no single field can (e.g. that the
    steps fit together), on the checked values, raising GoldenFileError naming the field.
    """

    fields: Callable[[Callable[[str, Field], object], Path], dict[str, Field]]
    validate: Callable[[dict[str, object], Path], None] | None = None


SCHEMAS: dict[str, dict[str, Field] | Schema] = {FORMAT: LINEAR_FIELDS, FORMAT_V1: LINEAR_FIELDS}
"""Format string -> its fields (or a :class:`Schema` that derives them from the file's header). Every format string
names a kind and a version ("refquant-golden-<kind>/<n>"); refquant.program registers "refquant-golden-model/2"
and "/1"."""

BITS_SUFFIX = "_bits"
FLOAT_DTYPES = {"float32": np.uint32, "float64": np.uint64}
"""The float dtypes of a schema, with the unsigned type of their bit patterns (``<name>_bits``)."""


class GoldenFileError(ValueError):
    """A golden file that does not follow its schema. ``path`` and ``field`` (None for the whole file) say where."""

    def __init__(self, path: Path | str, field: str | None, problem: str) -> None:
        where = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{path}: {where}{problem}")
        self.path = Path(path)
        self.field = field


# --------------------------------------------------------------------------------------------------------------
# The program


def golden_program(ql: QuantizedLinear, x_u8: np.ndarray) -> dict[str, object]:
    """The integer program of ``ql`` and the codes it produces for the input rows ``x_u8`` (B, K), B >= 1, as a
    dict of values named and typed by ``LINEAR_FIELDS`` (see this module's docstring)."""
    x_u8 = np.asarray(x_u8)
    if x_u8.ndim != 2:
        raise ValueError(f"x_u8 must be a (B, K) batch of input code rows, got shape {x_u8.shape}")
    if x_u8.shape[0] == 0:
        raise ValueError(f"x_u8 must hold at least one input row (B >= 1), got shape {x_u8.shape}")
    if ql.requantization != "fbgemm":
        raise ValueError(f"format {FORMAT!r} holds fbgemm's float path (requantization='fbgemm' on engine fbgemm or "
                         f"x86); this layer runs engine={ql.engine!r} with requantization={ql.requantization!r}: "
                         f"export it as refquant.program.MODEL_FORMAT (export_linear does so by default)")
    N = ql.out_features
    per_n = lambda a: np.broadcast_to(np.asarray(a), (N,)).copy()  # noqa: E731  (per-tensor values repeated)
    if ql.bias is None:
        bias_mode, bias = "none", np.zeros(N, np.float32)
    else:
        bias_mode, bias = ("add" if ql.per_channel else "fma"), ql.bias
    atws = per_n(ql.act_times_w_scale).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        bias_term = (bias / atws).astype(np.float32)
        bias_rcp = np.float32(1.0 / np.float64(atws[0]))
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
        "bias_rcp": bias_rcp,
        "x_u8": x_u8.astype(np.uint8),
        "acc_i32": ql.products(x_u8),
        "raw_i32": raw_i32,
        "y_u8": ql.requantize(raw_i32),
    }


# --------------------------------------------------------------------------------------------------------------
# Checking a value against its Field (shared by both readers and the writer)


def _integer_bounds(field: Field) -> tuple[int, int]:
    if field.dtype == "int":
        lo, hi = -(2**63), 2**63 - 1
    else:
        info = np.iinfo(np.dtype(field.dtype))
        lo, hi = int(info.min), int(info.max)
    return (lo if field.lo is None else field.lo), (hi if field.hi is None else field.hi)


def _check_shape(name: str, field: Field, shape: tuple[int, ...], dims: dict[str, int], source: Path) -> None:
    """``shape`` must fit the field's shape rule; dimension names seen for the first time are bound in ``dims``."""
    if len(shape) != len(field.shape):
        raise GoldenFileError(source, name, f"must have {len(field.shape)} dimension(s) {field.shape}, "
                                            f"got shape {shape}")
    for axis, (size, rule) in enumerate(zip(shape, field.shape)):
        if isinstance(rule, int):
            expected = rule
        elif rule in dims:
            expected = dims[rule]
        else:
            if size < 1:
                raise GoldenFileError(source, name, f"dimension {rule} must be >= 1, got shape {shape}")
            dims[rule] = size
            continue
        if size != expected:
            rules = ", ".join(str(r) for r in field.shape)
            known = ", ".join(f"{k} = {v}" for k, v in dims.items())
            raise GoldenFileError(source, name, f"shape {shape} does not match ({rules}) with {known} "
                                                f"(axis {axis} should be {expected})")


def _check_value(name: str, field: Field, value, dims: dict[str, int], source: Path):
    """The value of a field, checked and typed: str, bool and int as Python values; a dtype field as a NumPy scalar
    (shape ()) or an array of exactly that dtype. ``value`` has the field's type already (the readers make sure)."""
    if field.dtype == "str":
        if field.choices and value not in field.choices:
            raise GoldenFileError(source, name, f"must be one of {list(field.choices)}, got {value!r}")
        return value
    if field.dtype == "bool":
        return value
    if field.dtype == "int":
        lo, hi = _integer_bounds(field)
        if not lo <= value <= hi:
            raise GoldenFileError(source, name, f"must lie in [{lo}, {hi}], got {value}")
        if field.dim is not None:
            dims[field.dim] = value
        return value
    arr = np.asarray(value)
    _check_shape(name, field, arr.shape, dims, source)
    if arr.dtype.kind in "iu":
        lo, hi = _integer_bounds(field)
        if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
            bad = np.flatnonzero((arr.reshape(-1) < lo) | (arr.reshape(-1) > hi))[0]
            raise GoldenFileError(source, name, f"values must lie in [{lo}, {hi}], got {arr.reshape(-1)[bad]} at "
                                                f"flat index {bad}")
    if field.positive and not (np.isfinite(arr) & (arr > 0)).all():
        bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)).reshape(-1))[0]
        raise GoldenFileError(source, name, f"values must be finite and > 0, got {arr.reshape(-1)[bad]} at "
                                            f"flat index {bad}")
    return arr[()] if arr.ndim == 0 else arr


def _check_fields(fields: dict[str, Field], format_name: str, values: dict[str, object], source: Path,
                  typed: Callable) -> dict:
    """Every field of the schema, in its order: present, of its type (``typed(name, field, raw)``), checked."""
    missing = [name for name in fields if name not in values]
    if missing:
        raise GoldenFileError(source, missing[0], f"missing (fields missing: {missing})")
    foreign = [name for name in values if name not in fields]
    if foreign:
        raise GoldenFileError(source, foreign[0], f"not a field of {format_name!r} (foreign: {foreign})")
    dims: dict[str, int] = {}
    return {name: _check_value(name, field, typed(name, field, values[name]), dims, source)
            for name, field in fields.items()}


def _schema_of(format_value: object, source: Path) -> dict[str, Field] | Schema:
    if not isinstance(format_value, str) or format_value not in SCHEMAS:
        raise GoldenFileError(source, "format", f"not a refquant golden file format: got {format_value!r}, "
                                                f"expected one of {sorted(SCHEMAS)}")
    return SCHEMAS[format_value]


def _fields_of(format_name: str, values: dict[str, object], source: Path, typed: Callable) -> dict[str, Field]:
    """The field table of one file: the format's table, or what its :class:`Schema` derives from the header."""
    schema = _schema_of(format_name, source)
    if isinstance(schema, dict):
        return schema

    def peek(name: str, field: Field):
        if name not in values:
            raise GoldenFileError(source, name, f"missing (a field of {format_name!r})")
        return _check_value(name, field, typed(name, field, values[name]), {}, source)

    return schema.fields(peek, source)


def _checked(format_name: str, fields: dict[str, Field], values: dict[str, object], source: Path,
             typed: Callable) -> dict:
    """:func:`_check_fields`, then the format's own cross-field checks (``Schema.validate``)."""
    checked = _check_fields(fields, format_name, values, source, typed)
    schema = SCHEMAS[format_name]
    if isinstance(schema, Schema) and schema.validate is not None:
        schema.validate(checked, source)
    return checked


# --------------------------------------------------------------------------------------------------------------
# .npz


def _npz_typed(source: Path) -> Callable:
    def typed(name: str, field: Field, arr: object):
        if not isinstance(arr, np.ndarray):  # a zip member that is not a .npy file
            raise GoldenFileError(source, name, "is not a NumPy array (.npy) in the archive")
        if field.dtype == "str":
            if arr.dtype.kind != "U" or arr.ndim != 0:
                raise GoldenFileError(source, name, f"must be a string, got a {arr.dtype} array of shape {arr.shape}")
            return str(arr[()])
        if field.dtype == "bool":
            if arr.dtype != np.bool_ or arr.ndim != 0:
                raise GoldenFileError(source, name, f"must be a bool, got a {arr.dtype} array of shape {arr.shape}")
            return bool(arr[()])
        if field.dtype == "int":
            if arr.dtype.kind not in "iu" or arr.ndim != 0:
                raise GoldenFileError(source, name, f"must be an integer, got a {arr.dtype} array of shape "
                                                    f"{arr.shape}")
            return int(arr[()])
        if arr.dtype != np.dtype(field.dtype):
            raise GoldenFileError(source, name, f"must have dtype {field.dtype}, got {arr.dtype}")
        return arr

    return typed


def _read_npz(path: Path) -> dict[str, object]:
    values: dict[str, object] = {}
    with open(path, "rb") as f:  # a missing or unreadable file is the OSError open() gives, not a bad file
        try:
            archive = np.load(f, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 -- whatever np.load makes of a bad file, it is a bad file
            raise GoldenFileError(path, None, f"not an .npz archive ({type(e).__name__}: {e})") from e
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise GoldenFileError(path, None, "not an .npz archive (a single .npy array)")
        with archive:
            for name in archive.files:
                try:
                    values[name] = archive[name]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise GoldenFileError(path, name, "holds pickled Python objects, which are never "
                                                          "loaded") from e
                    raise GoldenFileError(path, name, f"cannot be read ({e})") from e
                except Exception as e:  # noqa: BLE001 -- a corrupted member (CRC, zlib, truncated data, ...)
                    raise GoldenFileError(path, name, f"cannot be read: the archive is corrupted "
                                                      f"({type(e).__name__}: {e})") from e
    if "format" not in values:
        raise GoldenFileError(path, "format", "missing: not a refquant golden file")
    typed = _npz_typed(path)
    format_name = typed("format", LINEAR_FIELDS["format"], values["format"])
    _schema_of(format_name, path)
    return _checked(format_name, _fields_of(format_name, values, path, typed), values, path, typed)


# --------------------------------------------------------------------------------------------------------------
# .json

_NON_FINITE = {"nan": np.float32(np.nan), "inf": np.float32(np.inf), "-inf": np.float32(-np.inf)}


def _nested_leaves(value: object, ndim: int, name: str, source: Path, depth: int = 0) -> tuple[tuple[int, ...], list]:
    """(shape, flat list of leaves) of ``ndim`` levels of nested JSON lists, which must be rectangular."""
    if ndim == 0:
        if isinstance(value, list):
            what = "a single value" if depth == 0 else f"a {depth}-dimensional list"
            raise GoldenFileError(source, name, f"must be {what}, got lists nested deeper")
        return (), [value]
    if not isinstance(value, list):
        raise GoldenFileError(source, name, f"must be a {depth + ndim}-dimensional list, got "
                                            f"{type(value).__name__} {value!r:.40}")
    parts = [_nested_leaves(v, ndim - 1, name, source, depth + 1) for v in value]
    inner = {shape for shape, _ in parts}
    if len(inner) > 1:
        raise GoldenFileError(source, name, f"rows of different lengths {sorted(inner)}")
    inner_shape = inner.pop() if inner else (0,) * (ndim - 1)
    return (len(value), *inner_shape), [leaf for _, leaves in parts for leaf in leaves]


def _json_integers(name: str, leaves: list, lo: int, hi: int, source: Path, what: str = "integers") -> None:
    for i, v in enumerate(leaves):
        if isinstance(v, bool) or not isinstance(v, int):
            raise GoldenFileError(source, name, f"must hold {what}, got {v!r} at flat index {i}")
        if not lo <= v <= hi:
            raise GoldenFileError(source, name, f"values must lie in [{lo}, {hi}], got {v} at flat index {i}")


def _json_typed(doc: dict, source: Path) -> Callable:
    def typed(name: str, field: Field, value: object):
        if field.dtype == "str":
            if not isinstance(value, str):
                raise GoldenFileError(source, name, f"must be a string, got {value!r}")
            return value
        if field.dtype == "bool":
            if not isinstance(value, bool):
                raise GoldenFileError(source, name, f"must be true or false, got {value!r}")
            return value
        if field.dtype == "int":
            _json_integers(name, [value], *_integer_bounds(field), source, "an integer")
            return value
        shape, leaves = _nested_leaves(value, len(field.shape), name, source)
        if field.dtype not in FLOAT_DTYPES:
            _json_integers(name, leaves, *_integer_bounds(field), source)  # before NumPy could overflow
            return np.array(leaves, np.dtype(field.dtype)).reshape(shape)
        bits_name = name + BITS_SUFFIX
        if bits_name not in doc:
            raise GoldenFileError(source, bits_name, "missing (every float field carries its bits)")
        bits_shape, bits = _nested_leaves(doc[bits_name], len(field.shape), bits_name, source)
        width = np.dtype(FLOAT_DTYPES[field.dtype]).itemsize * 8
        _json_integers(bits_name, bits, 0, 2**width - 1, source,
                       f"IEEE-754 bit patterns (unsigned {width}-bit integers)")
        if bits_shape != shape:
            raise GoldenFileError(source, bits_name, f"shape {bits_shape} differs from {name}'s {shape}")
        f32 = np.array(bits, FLOAT_DTYPES[field.dtype]).view(np.dtype(field.dtype))
        for i, (decimal, exact) in enumerate(zip(leaves, f32)):
            if not _decimal_is(decimal, exact):
                raise GoldenFileError(source, name, f"decimal {decimal!r} at flat index {i} disagrees with "
                                                    f"{bits_name} = {bits[i]:#010x} ({exact!r})")
        return f32.reshape(shape)

    return typed


def _decimal_is(decimal: object, exact: np.floating) -> bool:
    """True if a JSON decimal stands for the float ``exact`` (float32 or float64): a number that rounds to exactly
    its bits (a finite
    number never stands for an infinity), or "nan" / "inf" / "-inf" (and NaN / Infinity, as version 1 wrote)."""
    if isinstance(decimal, str):
        if decimal not in _NON_FINITE:
            return False
        expected = _NON_FINITE[decimal]
        return bool(np.isnan(exact)) if decimal == "nan" else bool(exact == expected)
    if isinstance(decimal, bool) or not isinstance(decimal, (int, float)):
        return False
    if isinstance(decimal, float) and math.isnan(decimal):
        return bool(np.isnan(exact))
    kind = type(exact)
    if isinstance(decimal, int) and abs(decimal) > (2**128 if kind is np.float32 else 2**1023):
        return False
    with np.errstate(over="ignore"):
        rounded = kind(float(decimal)) if kind is np.float64 else kind(decimal)
    if np.isinf(rounded) and not math.isinf(decimal):
        return False
    bits = FLOAT_DTYPES[np.dtype(kind).name]
    return rounded.view(bits) == exact.view(bits)


def _no_duplicate_keys(source: Path) -> Callable:
    def hook(pairs: list[tuple[str, object]]) -> dict:
        doc: dict[str, object] = {}
        for key, value in pairs:
            if key in doc:
                raise GoldenFileError(source, key, "appears twice")
            doc[key] = value
        return doc

    return hook


def _read_json(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GoldenFileError(path, None, f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from e
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise GoldenFileError(path, None, f"not valid JSON, truncated or corrupted? ({e})") from e
    except RecursionError as e:
        raise GoldenFileError(path, None, "not a golden file: nested too deeply") from e
    if not isinstance(doc, dict):
        raise GoldenFileError(path, None, f"must hold a JSON object, got {type(doc).__name__}")
    if "format" not in doc:
        raise GoldenFileError(path, "format", "missing: not a refquant golden file")
    _schema_of(doc["format"], path)
    format_name = doc["format"]
    typed = _json_typed(doc, path)
    schema = _fields_of(format_name, doc, path, typed)
    bit_fields = {name + BITS_SUFFIX for name, field in schema.items() if field.dtype in FLOAT_DTYPES}
    for bits_name in sorted(bit_fields - set(doc)):
        raise GoldenFileError(path, bits_name, "missing (every float field carries its bits)")
    values = {name: value for name, value in doc.items() if name not in bit_fields}
    return _checked(format_name, schema, values, path, typed)


# --------------------------------------------------------------------------------------------------------------
# Writing


def golden_paths(path: str | Path) -> tuple[Path, Path]:
    """The two files of a golden program: ``<path>.npz`` and ``<path>.json``. The whole name is kept (``net.fc1``
    gives ``net.fc1.npz``); only a trailing ``.npz`` or ``.json`` is dropped first."""
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    if not path.name or path.name in (".", ".."):
        raise ValueError(f"path must name a file (without extension), got {str(path)!r}")
    return path.with_name(path.name + ".npz"), path.with_name(path.name + ".json")


def _json_value(field: Field, value: object) -> object:
    if not field.is_array:
        return value
    arr = np.asarray(value)
    if field.dtype not in FLOAT_DTYPES:
        return arr.tolist()
    as_list = np.vectorize(lambda v: v if math.isfinite(v) else ("nan" if math.isnan(v) else
                                                                 ("inf" if v > 0 else "-inf")),
                           otypes=[object])(arr.astype(np.float64))
    return as_list.tolist() if arr.ndim else as_list[()]


def _npz_value(field: Field, value: object) -> np.ndarray:
    if field.dtype == "int":
        return np.array(value, np.int64)
    if field.dtype in ("str", "bool"):
        return np.array(value)
    return np.asarray(value, np.dtype(field.dtype))


def _write_atomically(files: dict[Path, Callable[[BinaryIO], None]]) -> None:
    """Write every file to a temporary file in its directory, then rename each over its final name (os.replace).
    On any failure, remove the temporary files and any final file already renamed in this call: a failed export
    leaves neither a half-written file under a final name nor an ``.npz`` without its ``.json``."""
    for final in files:
        if final.is_dir():
            raise IsADirectoryError(f"{final} is a directory; cannot write the golden file there")
    temporary: dict[Path, Path] = {}
    renamed: list[Path] = []
    try:
        for final, write in files.items():
            tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            temporary[final] = tmp
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for final, tmp in temporary.items():
            os.replace(tmp, final)
            renamed.append(final)
    except BaseException:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        for final in renamed:
            final.unlink(missing_ok=True)
        raise


def check_program(program: dict[str, object]) -> dict[str, object]:
    """``program`` (a dict of a golden format's fields) checked against the schema of its format, as the writer
    checks it: the typed values, or one GoldenFileError naming the field."""
    source = Path("<program>")
    _schema_of(program.get("format"), source)
    typed = _program_typed(source)
    fields = _fields_of(program["format"], program, source, typed)
    return _checked(program["format"], fields, program, source, typed)


def write_golden(program: dict[str, object], path: str | Path, *, header: bool = False) -> tuple[Path, ...]:
    """Check ``program`` against the schema of its format and write it to ``<path>.npz`` and ``<path>.json``
    (see :func:`golden_paths`; the directory must exist), and with ``header=True`` also the C header
    ``<path>.h`` (refquant.program.c_header), atomically: all files or none. Returns the paths written."""
    npz_path, json_path = golden_paths(path)
    source = Path("<program>")
    _schema_of(program.get("format"), source)
    typed = _program_typed(source)
    schema = _fields_of(program["format"], program, source, typed)
    checked = _checked(program["format"], schema, program, source, typed)
    doc: dict[str, object] = {}
    for name, field in schema.items():
        doc[name] = _json_value(field, program[name])
        if field.dtype in FLOAT_DTYPES:
            bits = FLOAT_DTYPES[field.dtype]
            doc[name + BITS_SUFFIX] = np.asarray(program[name], np.dtype(field.dtype)).view(bits).tolist()
    text = (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")
    arrays = {name: _npz_value(field, program[name]) for name, field in schema.items()}
    files: dict[Path, Callable[[BinaryIO], None]] = {npz_path: lambda f: _write_npz(f, arrays),
                                                      json_path: lambda f: f.write(text)}
    if header:
        from .program import c_header, header_path

        header_text = c_header(checked, schema).encode("utf-8")
        files[header_path(path)] = lambda f: f.write(header_text)
    _write_atomically(files)
    return tuple(files)


def _write_npz(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (an uncompressed zip of ``<name>.npy`` members), refusing object arrays."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, arr in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _program_typed(source: Path) -> Callable:
    """The writer's view of a program's values: Python or NumPy values of the field's type, refused otherwise."""
    def typed(name: str, field: Field, value: object):
        kinds = {"str": (str,), "bool": (bool, np.bool_), "int": (int, np.integer)}
        if field.dtype in kinds:
            if not isinstance(value, kinds[field.dtype]) or (field.dtype == "int" and isinstance(value, bool)):
                raise GoldenFileError(source, name, f"must be a {field.dtype}, got {value!r}")
            return {"str": str, "bool": bool, "int": int}[field.dtype](value)
        arr = np.asarray(value)
        if arr.dtype != np.dtype(field.dtype):
            raise GoldenFileError(source, name, f"must have dtype {field.dtype}, got {arr.dtype}")
        return arr

    return typed


def export_linear(ql: QuantizedLinear, x_u8: np.ndarray, path: str | Path, *, format: str | None = None,
                  header: bool = False) -> dict[str, object]:
    """Write the integer program of ``ql`` and its outputs for the input rows ``x_u8`` to ``<path>.npz`` and
    ``<path>.json`` (see :func:`write_golden`; ``header=True`` adds the C header ``<path>.h``); return the program
    dict.

    ``format``: None picks :data:`FORMAT` ("refquant-golden-linear/2", :func:`golden_program`) for fbgemm's float
    path (``requantization="fbgemm"``, engines fbgemm and x86) and refquant.program.MODEL_FORMAT (one "linear" step
    on input codes, :func:`refquant.program.linear_program`) for every other engine and requantization variant;
    give MODEL_FORMAT to write any layer in it. ``path`` is a file name without extension, kept whole
    (``"net.fc1"`` -> ``net.fc1.npz``, ``net.fc1.json``); its directory must exist.
    """
    from .program import MODEL_FORMAT, linear_program

    if format is None:
        format = FORMAT if ql.requantization == "fbgemm" else MODEL_FORMAT
    if format == FORMAT:
        program = golden_program(ql, x_u8)
    elif format == MODEL_FORMAT:
        program = linear_program(ql, x_u8)
    else:
        raise ValueError(f"format must be None, {FORMAT!r} or {MODEL_FORMAT!r}, got {format!r}")
    write_golden(program, path, header=header)
    return program


def export_model(model: object, x_f32: np.ndarray, path: str | Path, *, requantization: str | None = None,
                 header: bool = True) -> dict[str, object]:
    """Write the integer program of a whole converted model (refquant.pipeline.QuantizedLinearModel or
    refquant.model.QuantizedModel) and its test vectors for the float32 inputs ``x_f32`` to ``<path>.npz``,
    ``<path>.json`` and (``header=True``) the C header ``<path>.h``, in refquant.program.MODEL_FORMAT; return the
    program dict. ``requantization``: None (each Linear's own) or a scheme for every Linear (an integer variant of
    refquant.fixed_point, or the engine's float path by name). See :func:`refquant.program.model_program`."""
    from .program import model_program

    program = model_program(model, x_f32, requantization=requantization)
    write_golden(program, path, header=header)
    return program


def load_golden(path: str | Path) -> dict[str, object]:
    """Read a program written by :func:`export_linear` or :func:`export_model` from its ``.npz`` or ``.json`` file
    (any format of ``SCHEMAS``; refquant.program.load_program makes a runnable program of it), checked against the
    schema of its format (see the module docstring): the same dict from either file. str, bool and int fields are
    Python values; float32 and int32 scalars NumPy scalars; arrays have the schema's dtype. From JSON, float32
    values are rebuilt from their ``_bits`` (exact). Any deviation raises :class:`GoldenFileError` (a ValueError)
    naming the file and the field; a missing file is FileNotFoundError."""
    path = Path(path)
    if path.suffix == ".npz":
        return _read_npz(path)
    if path.suffix == ".json":
        return _read_json(path)
    raise ValueError(f"path must end in .npz or .json, got {str(path)!r}")


from . import program as _program  # noqa: E402,F401  registers refquant.program.MODEL_FORMAT in SCHEMAS
