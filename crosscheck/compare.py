"""Field-by-field comparison of torch's and refquant's values: exact, bitwise for floats, with the first difference.

Equality means identical raw values, never "close":

* integers compare by value (torch's int64 zero point equals refquant's int32 zero point when the numbers agree; both
  dtypes are reported);
* floats compare by their bit patterns at their own width (``x.view(np.uint32)`` for float32), so ``-0.0 != 0.0`` and
  a NaN equals only the same NaN. When one side is float64 and the other float32 (torch keeps per-channel weight
  scales as float64), the float32 side is widened, which is exact, and the float64 bit patterns are compared;
* a shape difference, or a float on one side and an integer on the other, is a mismatch of every element.

A :class:`Field` is one row of the report. :class:`ArrayComparison` compares arrays that arrive in chunks (the
``--samples`` inputs are evaluated a chunk at a time) and remembers the first differing element by its index in the
whole array, plus a SHA-256 of each side's raw bytes so a JSON reader can see two large arrays are the same without
storing them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Row kinds. Only "parity" and "derived" rows decide the exit code.
PARITY = "parity"  # torch's value read from torch's model/observers/outputs
DERIVED = "derived"  # torch's value computed from torch's own integer tensors with exact integer torch ops
REFQUANT_ONLY = "refquant_only"  # an intermediate torch does not expose (torch value null, equal null)
FLOAT_FORWARD = "float_forward"  # refquant's own float forward vs torch's: reported, never part of parity
REQUANTIZATION = "requantization"  # an integer-only variant's codes vs torch's (crosscheck.requantization): reported

COUNTED_KINDS = (PARITY, DERIVED)

# Arrays with at most this many elements are written to the JSON in full; larger ones as a summary.
JSON_FULL_LIMIT = 256


def _raw(a: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two arrays as comparable raw integers, or None if one is float and the other is not."""
    a_float = a.dtype.kind == "f"
    o_float = other.dtype.kind == "f"
    if a_float != o_float:
        return None
    if not a_float:
        if a.dtype.kind == "b" or other.dtype.kind == "b":
            return a.astype(np.int64), other.astype(np.int64)
        if a.dtype.kind == "u" and a.dtype.itemsize == 8 or other.dtype.kind == "u" and other.dtype.itemsize == 8:
            return a.astype(np.uint64), other.astype(np.uint64)
        return a.astype(np.int64), other.astype(np.int64)
    width = max(a.dtype.itemsize, other.dtype.itemsize)
    ftype = {2: np.float16, 4: np.float32, 8: np.float64}[width]
    utype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    a_w = np.ascontiguousarray(a.astype(ftype))  # widening float32 -> float64 is exact
    o_w = np.ascontiguousarray(other.astype(ftype))
    return a_w.view(utype), o_w.view(utype)


def scalar_to_json(v: Any) -> Any:
    """One NumPy/Python scalar as JSON: ints as ints, finite floats as floats (exact: repr round-trips), else str."""
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)  # float32 -> float64 is exact, and Python's repr of a float64 round-trips
        if math.isfinite(f):
            return f
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    return v


def float_bits(v: Any) -> str | None:
    """The hex bit pattern of a float scalar at its own width (``0x3c14c5e2``), None for integers."""
    v = np.asarray(v)
    if v.dtype.kind != "f":
        return None
    u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[v.dtype.itemsize]
    return f"0x{int(v.reshape(()).view(u)):0{2 * v.dtype.itemsize}x}"


def array_to_json(a: np.ndarray | None) -> Any:
    """A value for the JSON: the array itself (nested lists) if small, else shape, dtype, first values and SHA-256."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.size <= JSON_FULL_LIMIT:
        return _nested(a)
    return {
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "first": [scalar_to_json(v) for v in a.reshape(-1)[:8]],
        "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
    }


def _nested(a: np.ndarray) -> Any:
    if a.ndim == 0:
        return scalar_to_json(a[()])
    return [_nested(x) for x in a]


@dataclass
class Field:
    """One row of the comparison."""

    name: str
    kind: str
    equal: bool | None
    mismatches: int | None
    first_mismatch: dict | None
    torch: Any  # a NumPy array (or None for refquant_only rows); JSON-encoded by to_json
    refquant: Any
    note: str = ""
    size: int = 0
    torch_dtype: str | None = None
    refquant_dtype: str | None = None
    shape: tuple | None = None
    torch_sha256: str | None = None
    refquant_sha256: str | None = None
    layer: str | None = None  # the torch module path of the layer the row belongs to (model studies)
    distance: dict | None = None  # requantization rows: how far the variant's codes are, and why (JSON "distance")

    @property
    def counted(self) -> bool:
        return self.kind in COUNTED_KINDS

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "equal": self.equal,
            "mismatches": self.mismatches,
            "first_mismatch": self.first_mismatch,
            "size": self.size,
            "shape": list(self.shape) if self.shape is not None else None,
            "torch_dtype": self.torch_dtype,
            "refquant_dtype": self.refquant_dtype,
            "torch": array_to_json(self.torch) if self.torch is not None else self.torch_summary(),
            "refquant": array_to_json(self.refquant) if self.refquant is not None else self.refquant_summary(),
            "note": self.note,
        }
        if self.layer is not None:
            out["layer"] = self.layer
        if self.distance is not None:
            out["distance"] = self.distance
        return out

    def torch_summary(self) -> Any:
        if self.torch_sha256 is None:
            return None
        return {"shape": list(self.shape), "dtype": self.torch_dtype, "sha256": self.torch_sha256}

    def refquant_summary(self) -> Any:
        if self.refquant_sha256 is None:
            return None
        return {"shape": list(self.shape), "dtype": self.refquant_dtype, "sha256": self.refquant_sha256}


class ArrayComparison:
    """Compares two arrays exactly, fed chunk by chunk along axis 0; keeps the first difference and byte hashes."""

    def __init__(self, name: str, kind: str = PARITY, note: str = "", keep_limit: int = JSON_FULL_LIMIT):
        self.name, self.kind, self.note = name, kind, note
        self.keep_limit = keep_limit
        self.mismatches = 0
        self.first: dict | None = None
        self.rows = 0  # elements of axis 0 seen so far
        self.size = 0
        self.tail_shape: tuple | None = None
        self.t_dtype: np.dtype | None = None
        self.r_dtype: np.dtype | None = None
        self.t_hash = hashlib.sha256()
        self.r_hash = hashlib.sha256()
        self.t_kept: list[np.ndarray] = []
        self.r_kept: list[np.ndarray] = []
        self.shape_error: str | None = None

    def update(self, torch_value: Any, refquant_value: Any) -> None:
        t = np.asarray(torch_value)
        r = np.asarray(refquant_value)
        if t.ndim == 0:
            t = t.reshape(1)
        if r.ndim == 0:
            r = r.reshape(1)
        if self.t_dtype is None:
            self.t_dtype, self.r_dtype, self.tail_shape = t.dtype, r.dtype, t.shape[1:]
        self.t_hash.update(np.ascontiguousarray(t).tobytes())
        self.r_hash.update(np.ascontiguousarray(r).tobytes())
        if self.size + t.size <= self.keep_limit:
            self.t_kept.append(t.copy())
            self.r_kept.append(r.copy())
        else:
            self.t_kept = self.r_kept = None  # too large to keep: JSON gets the summary
        if self.shape_error is None and t.shape != r.shape:
            self.shape_error = f"shape {t.shape} (torch) vs {r.shape} (refquant)"
        raw = None if self.shape_error else _raw(t, r)
        if raw is None:
            self.mismatches += max(t.size, r.size)
            if self.first is None:
                reason = self.shape_error or f"dtype {t.dtype} (torch) vs {r.dtype} (refquant)"
                self.first = {"index": None, "reason": reason, "torch": None, "refquant": None}
        else:
            t_raw, r_raw = raw
            diff = t_raw != r_raw
            n = int(np.count_nonzero(diff))
            if n and self.first is None:
                flat = int(np.flatnonzero(diff.reshape(-1))[0])
                idx = list(np.unravel_index(flat, t.shape))
                idx[0] += self.rows
                tv, rv = t.reshape(-1)[flat], r.reshape(-1)[flat]
                self.first = {
                    "index": [int(i) for i in idx],
                    "torch": scalar_to_json(tv),
                    "refquant": scalar_to_json(rv),
                    "torch_bits": float_bits(tv),
                    "refquant_bits": float_bits(rv),
                }
            self.mismatches += n
        self.rows += t.shape[0]
        self.size += t.size

    def result(self) -> Field:
        shape = (self.rows, *self.tail_shape) if self.tail_shape is not None else None
        keep = self.t_kept is not None
        return Field(
            name=self.name,
            kind=self.kind,
            equal=self.mismatches == 0 and self.first is None,
            mismatches=self.mismatches,
            first_mismatch=self.first,
            torch=np.concatenate(self.t_kept) if keep and self.t_kept else None,
            refquant=np.concatenate(self.r_kept) if keep and self.r_kept else None,
            note=self.note,
            size=self.size,
            torch_dtype=str(self.t_dtype),
            refquant_dtype=str(self.r_dtype),
            shape=shape,
            torch_sha256=None if keep else self.t_hash.hexdigest(),
            refquant_sha256=None if keep else self.r_hash.hexdigest(),
        )


def compare(name: str, torch_value: Any, refquant_value: Any, *, kind: str = PARITY, note: str = "") -> Field:
    """One row comparing two whole values (scalars are treated as 1-element arrays)."""
    c = ArrayComparison(name, kind, note, keep_limit=1 << 62)
    t = np.asarray(torch_value)
    r = np.asarray(refquant_value)
    c.update(t.reshape(1) if t.ndim == 0 else t, r.reshape(1) if r.ndim == 0 else r)
    f = c.result()
    f.torch = np.asarray(torch_value)  # keep the original shapes (a 0-d scalar stays a scalar in the JSON)
    f.refquant = np.asarray(refquant_value)
    return f


def refquant_only(name: str, value: Any, note: str) -> Field:
    """A row showing an intermediate only refquant exposes; not compared, not counted."""
    v = np.asarray(value)
    return Field(name=name, kind=REFQUANT_ONLY, equal=None, mismatches=None, first_mismatch=None, torch=None,
                 refquant=v, note=note, size=int(v.size), torch_dtype=None, refquant_dtype=str(v.dtype),
                 shape=tuple(v.shape))


class CountedRows:
    """The studies' results (crosscheck.study, model_study, dynamic_study, engines_study) hold their rows in
    ``fields``; the counted ones (parity, derived) decide ``equal`` and so the exit code."""

    fields: list[Field]

    @property
    def parity_fields(self) -> list[Field]:
        return [f for f in self.fields if f.counted]

    @property
    def equal(self) -> bool:
        return all(f.equal for f in self.parity_fields)
