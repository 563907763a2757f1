"""Quantize and dequantize: float32 <-> integer codes, with torch's names and torch 2.13's exact rounding.

Affine quantization maps a float ``x`` to an integer code ``q`` with a ``scale`` (float32, > 0) and a
``zero_point`` (the code that stands for 0.0):

    q = clamp(round(x / scale) + zero_point, quant_min, quant_max)          (the textbook formula)
    x ~ (q - zero_point) * scale

What torch 2.13 computes on x86 differs from the textbook in ways that change codes. Each function below writes
the exact steps as numbered equations:

    inv = f32(1 / f32(scale))                                                                    (eq. Q0)

    quint8 / qint8, per tensor (fbgemm's vectorized path, "fbgemm_legacy_fma"):
        v = fmaf(x, inv, f32(zero_point))          one rounding: the zero point is added BEFORE rounding
        v = min(v, 2147483520.0f)                  (_mm256_min_ps; NaN becomes that constant)
        q = clamp(cvtps2dq(v), quant_min, quant_max)        cvtps2dq rounds half to even     (eq. Q1)

    qint32 per tensor, and every dtype per channel (fbgemm's scalar path):
        t = f32(f32(x * inv) + f32(zero_point))
        q = clamp(nearbyint(t), quant_min, quant_max)                                         (eq. Q2)

    dequantize per tensor:   x = f32(f32(q - zero_point) * f32(scale))     a single multiply    (eq. D1)
    dequantize per channel:  x = f32(f64(f32(q) - f32(zp_c)) * f64(scale_c))                  (eq. D2)

The rounding of eq. Q1 is named because it changed across releases: the FBGEMM inside torch 2.13 defaults to
``LEGACY = true``; a later FBGEMM computes ``rint(f32(x * inv)) + zero_point`` instead ("nearbyint_then_add"),
which rounds differently when x * inv lands near a .5 tie.

A third rounding is oneDNN's f32 -> u8 reorder (its dynamic quantized Linear quantizes the input with it; see
refquant.dynamic), two roundings and no FMA:

    v = f32(f32(x * inv) + f32(zero_point));  q = clamp(RNE(v), quant_min, quant_max)      (eq. Q1c)

Other implementations round in ways no torch path does (half away from zero; the textbook
``np.round(x / scale + zero_point)`` of torch's own test reference, in double or in float32):
:data:`PORT_ROUNDINGS` names them with their formulas and :func:`quantize_per_tensor_port` computes them exactly, for
refquant.explain (refquant.program.run_program(rounding=...) runs a golden program with them).
"""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np
from numba import njit

from ._dispatch import SmallCalls
from ._float32 import cvtps2dq, fma_f32, fmaf
from ._threads import DEFAULT_THREADS, finish_item, item_to_try, share_items, take_item, threads_for
from .dtypes import QDTYPES, check_qdtype, qdtype_of_codes, qdtype_range

Rounding = Literal["fbgemm_legacy_fma", "nearbyint_then_add", "multiply_then_add"]
ROUNDINGS: tuple[str, ...] = ("fbgemm_legacy_fma", "nearbyint_then_add", "multiply_then_add")

# The largest float32 below 2^31: fbgemm clamps with it before converting to int32.
INT32_FLOAT_MAX = np.float32(2147483520.0)


# --------------------------------------------------------------------------------------------------------------
# argument checks (shared by the public functions below)


def _as_float32_input(x: object, argname: str = "x") -> np.ndarray:
    """x as a float32 array. Python numbers and lists become float32, as ``torch.tensor`` makes them; a NumPy array
    of another dtype is refused, as ``torch.quantize_per_tensor`` refuses a Double tensor."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(
                f"{argname} must be a float32 array (torch quantizes only Float tensors), got dtype {x.dtype}; "
                f"convert it deliberately with {argname}.astype(np.float32)"
            )
        return x
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{argname} must be a float32 array or a number, got {type(x).__name__}") from e
    return arr


def _scalar(value: object, argname: str, kind: type) -> float | int:
    """A Python float/int from a number or a one-element array (what observers return)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"{argname} must be a single number (or a one-element array), got shape {arr.shape}")
    item = arr.reshape(()).item()
    if kind is int:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            if isinstance(item, float) and item.is_integer():
                return int(item)
            raise TypeError(f"{argname} must be an integer, got {item!r}")
        return int(item)
    if isinstance(item, bool) or not isinstance(item, numbers.Real):
        raise TypeError(f"{argname} must be a real number, got {item!r}")
    return float(item)


def check_scale(scale: object, argname: str = "scale") -> np.float32:
    """The scale as torch's kernels use it, f32(scale); refuse scales that would give garbage codes.

    torch accepts 0, negative, NaN and inf scales and returns meaningless codes; refquant raises instead.
    """
    s = _scalar(scale, argname, float)
    s_f32 = np.float32(s)
    if not (np.isfinite(s) and s > 0 and np.isfinite(s_f32) and s_f32 > 0):
        raise ValueError(f"{argname} must be a finite positive number (also after rounding to float32), got {s!r}")
    return s_f32


def check_zero_point(zero_point: object, dtype: str, argname: str = "zero_point") -> int:
    """The zero point as an int, inside the dtype's range (torch: "zero_point 300 is above upper bound")."""
    zp = _scalar(zero_point, argname, int)
    qmin, qmax = qdtype_range(dtype)
    if not qmin <= zp <= qmax:
        raise ValueError(f"{argname} must lie in [{qmin}, {qmax}] for {dtype}, got {zp}")
    return zp


def _check_axis(axis: object, ndim: int, argname: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{argname} must be an int, got {axis!r}")
    if not 0 <= axis < ndim:  # torch refuses negative axes too ("Channel axis out of range")
        raise ValueError(f"{argname} must lie in [0, {ndim}) for an input with {ndim} dimensions, got {axis}")
    return int(axis)


def _per_channel_params(scales: object, zero_points: object, n_channels: int, dtype: str | None):
    """Per-channel scales as float64 (torch stores them as double) and zero points as int64, checked."""
    scales_f64 = np.asarray(scales)
    if scales_f64.ndim != 1 or scales_f64.shape[0] != n_channels:
        raise ValueError(f"scales must be a 1-D array of length {n_channels} (one per channel), "
                         f"got shape {scales_f64.shape}")
    if not np.issubdtype(scales_f64.dtype, np.floating):
        raise TypeError(f"scales must be a floating-point array, got dtype {scales_f64.dtype}")
    scales_f64 = scales_f64.astype(np.float64)
    s_f32 = scales_f64.astype(np.float32)
    bad = ~(np.isfinite(scales_f64) & (scales_f64 > 0) & np.isfinite(s_f32) & (s_f32 > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"scales must be finite and positive (also after rounding to float32); "
                         f"scales[{i}] = {scales_f64[i]!r}")
    zps = np.asarray(zero_points)
    if zps.ndim != 1 or zps.shape[0] != n_channels:
        raise ValueError(f"zero_points must be a 1-D array of length {n_channels}, got shape {zps.shape}")
    if not np.issubdtype(zps.dtype, np.integer):
        raise TypeError(f"zero_points must be an integer array, got dtype {zps.dtype}")
    zps_i64 = zps.astype(np.int64)
    if dtype is not None:
        qmin, qmax = qdtype_range(dtype)
        bad = (zps_i64 < qmin) | (zps_i64 > qmax)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"zero_points must lie in [{qmin}, {qmax}] for {dtype}; zero_points[{i}] = {zps_i64[i]}")
    return scales_f64, zps_i64


def _channel_view(n_channels: int, axis: int, ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis``."""
    shape = [1] * ndim
    shape[axis] = n_channels
    return tuple(shape)


# --------------------------------------------------------------------------------------------------------------
# quantize


def quantize_per_tensor(x: object, scale: object, zero_point: object, dtype: str,
                        *, rounding: Rounding = "fbgemm_legacy_fma") -> np.ndarray:
    """Quantize float32 ``x`` with one scale and zero point; returns the integer codes (torch's ``int_repr()``).

    quint8 / qint8, ``rounding="fbgemm_legacy_fma"`` (torch 2.13's default), eq. Q1::

        inv = f32(1 / f32(scale))
        v   = fmaf(x, inv, f32(zero_point))       # zero point added before rounding, one rounding
        v   = min(v, 2147483520.0f)               # NaN -> 2147483520.0f
        q   = clamp(cvtps2dq(v), quant_min, quant_max)

    so NaN and +inf give quant_max, -inf gives quant_min.
    Matches: pytorch/FBGEMM src/QuantUtilsAvx2.cc (QuantizeAvx2<T, LEGACY=true>, _mm256_fmadd_ps), reached from
    pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp
    (quantize_tensor_per_tensor_affine_cpu -> fbgemm::Quantize).

    ``rounding="nearbyint_then_add"`` is what a later FBGEMM (LEGACY = false) computes::

        q = clamp(rint(f32(x * inv)) + zero_point, quant_min, quant_max)

    qint32 always takes fbgemm's scalar path, eq. Q2 (``rounding`` does not apply)::

        t = f32(f32(x * inv) + f32(zero_point));  q = clamp(nearbyint(t), -2^31, 2^31 - 1)   # NaN -> -2^31

    Matches: pytorch/FBGEMM include/fbgemm/QuantUtils.h (Quantize<T> scalar loop, clamp in double).

    ``rounding="multiply_then_add"`` (quint8/qint8) is oneDNN's f32 -> int8 reorder with a runtime destination
    scale and zero point, eq. Q1c: two float32 roundings before the round half to even, no FMA::

        q = clamp(RNE(f32(f32(x * inv) + f32(zero_point))), quant_min, quant_max)

    NaN raises a ValueError (what oneDNN does with it is not verified here).
    Matches: oneapi-src/oneDNN src/cpu/x64/jit_uni_reorder.cpp (the "jit:uni" reorder torch's onednn
    linear_dynamic runs; verified against torch at constructed near-ties in tests/test_dynamic.py).

    Args:
        x: float32 array of any shape and layout (Python numbers/lists become float32; other arrays are refused).
        scale: positive finite number (or one-element array, as observers return); used as f32(scale).
        zero_point: integer in the dtype's range.
        dtype: "quint8" (uint8 codes), "qint8" (int8) or "qint32" (int32).
        rounding: "fbgemm_legacy_fma", "nearbyint_then_add" or "multiply_then_add" (quint8/qint8 only).
    """
    x_f32 = _as_float32_input(x)
    dtype = check_qdtype(dtype)
    scale_f32 = check_scale(scale)
    zp = check_zero_point(zero_point, dtype)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    inv_f32 = np.float32(1) / scale_f32                                             # eq. Q0
    qmin, qmax = qdtype_range(dtype)
    out = np.empty(x_f32.shape, QDTYPES[dtype])
    flat_x = np.ascontiguousarray(x_f32).reshape(-1)
    if dtype == "qint32":
        out.reshape(-1)[:] = _quantize_scalar_path(flat_x, inv_f32, np.float32(zp), qmin, qmax)
    elif rounding == "fbgemm_legacy_fma" and _SMALL_CALLS.readable(flat_x.size):
        out.reshape(-1)[:] = _quantize_fma_readable(flat_x, inv_f32, np.float32(zp), qmin, qmax)
    elif rounding == "fbgemm_legacy_fma":
        _quantize_fma_kernel(flat_x, inv_f32, np.float32(zp), qmin, qmax, out.reshape(-1))
    elif rounding == "multiply_then_add":
        n_nan = _quantize_mul_add_kernel(flat_x, inv_f32, np.float32(zp), qmin, qmax, out.reshape(-1))
        if n_nan:
            raise ValueError(f"x contains {n_nan} NaN value(s); rounding='multiply_then_add' (oneDNN's reorder) "
                             f"refuses them: what oneDNN does with NaN is not verified")
    else:
        out.reshape(-1)[:] = _quantize_nearbyint_then_add(flat_x, inv_f32, zp, qmin, qmax)
    return out


KERNEL_MIN_ELEMENTS = 1 << 16
"""Eq. Q1 runs as the readable NumPy statements below this many elements (for the first
refquant._dispatch.SMALL_CALLS such calls), as the Numba kernel otherwise: below it NumPy takes well under a
millisecond, less than the kernel takes to load from Numba's cache (a first run compiles it, ~0.3 s), so a small
study compiles nothing here. Both give the same bits (tests/test_quantize.py proves it on both sides)."""
_SMALL_CALLS = SmallCalls(KERNEL_MIN_ELEMENTS)


def _quantize_fma_readable(x_f32: np.ndarray, inv_f32: np.float32, zp_f32: np.float32,
                           qmin: int, qmax: int) -> np.ndarray:
    """Eq. Q1 step by step in NumPy (the definition :func:`_quantize_fma_kernel` must equal)."""
    v_f32 = fmaf(x_f32, inv_f32, zp_f32)                 # one rounding of x * inv + zero_point
    v_f32 = np.fmin(v_f32, INT32_FLOAT_MAX)              # _mm256_min_ps(v, 2147483520.0f): NaN -> the constant
    r_i32 = cvtps2dq(v_f32)                              # round half to even; -inf -> INT32_MIN
    return np.clip(r_i32, qmin, qmax)                    # packus / min-max to the dtype's range


@njit(cache=True, inline="always")
def quantize_fma_element(x_f32, inv_f32, zp_f32, lo_f32, hi_f32):
    """Eq. Q1 of one element, as an int32 code in [lo, hi] (integer bounds as float32). Clamping before rounding
    equals rounding before clamping because the bounds are integers; NaN fails ``v < hi`` and takes quant_max, as
    ``fmin(v, 2147483520.0f)`` then the clamp gives it in the readable path. Python's min and max (``min(a, b)``
    is ``b if b < a else a``), in this order, give NaN that answer and compile to vminps/vmaxps: it vectorizes."""
    v = fma_f32(x_f32, inv_f32, zp_f32)
    v = max(lo_f32, min(hi_f32, v))                 # NaN: min(hi, NaN) = hi
    return np.int32(np.rint(v))


@njit(cache=True)
def _quantize_fma_kernel(x_f32, inv_f32, zp_f32, qmin, qmax, out):
    """Eq. Q1 as a loop of :func:`quantize_fma_element`, writing codes into ``out``."""
    lo = np.float32(qmin)
    hi = np.float32(qmax)
    for i in range(x_f32.size):
        out[i] = quantize_fma_element(x_f32[i], inv_f32, zp_f32, lo, hi)


def _quantize_mul_add_readable(x_f32: np.ndarray, inv_f32: np.float32, zp_f32: np.float32,
                               qmin: int, qmax: int) -> np.ndarray:
    """Eq. Q1c step by step in NumPy (the definition :func:`_quantize_mul_add_kernel` must equal); finite x only."""
    t_f32 = x_f32 * inv_f32                              # f32(x * inv): first rounding
    v_f32 = t_f32 + zp_f32                               # f32(t + zero_point): second rounding
    v_f32 = np.clip(v_f32, np.float32(qmin), np.float32(qmax))   # saturate in float32 (integer bounds)
    return np.rint(v_f32).astype(np.int32)               # round half to even


@njit(cache=True, inline="always")
def quantize_mul_add_element(x_f32, inv_f32, zp_f32, lo_f32, hi_f32):
    """Eq. Q1c of one finite element, as an int32 code in [lo, hi]: two float32 roundings, then RNE. (NaN, which
    the readable path does not define, takes quant_max.)"""
    v = np.float32(np.float32(x_f32 * inv_f32) + zp_f32)
    v = max(lo_f32, min(hi_f32, v))                 # as in quantize_fma_element
    return np.int32(np.rint(v))


@njit(cache=True)
def _quantize_mul_add_kernel(x_f32, inv_f32, zp_f32, qmin, qmax, out):
    """Eq. Q1c as a loop of :func:`quantize_mul_add_element`, writing codes into ``out``; returns the number of
    NaNs met (their codes are left 0)."""
    lo = np.float32(qmin)
    hi = np.float32(qmax)
    n_nan = 0
    for i in range(x_f32.size):
        x = x_f32[i]
        if x != x:
            n_nan += 1
            out[i] = 0
        else:
            out[i] = quantize_mul_add_element(x, inv_f32, zp_f32, lo, hi)
    return n_nan


# --------------------------------------------------------------------------------------------------------------
# quantize an (M, K) input as the int8 product reads it: padded rows and their sums


def quantize_padded_rows_readable(x2d_f32: np.ndarray, inv_f32: np.float32, zp_f32: np.float32, lda: int,
                                  rounding: Rounding = "fbgemm_legacy_fma") -> tuple[np.ndarray, np.ndarray]:
    """The quint8 codes of a finite float32 (M, K) ``x2d_f32`` (eq. Q1, or eq. Q1c for ``"multiply_then_add"``),
    stored in (M, lda) rows (lda >= K) padded with zeros, and each row's sum Σ_k q[m, k] as int32: what fbgemm's
    PackAWithQuantRowOffset::pack does per row of A (QuantizeAvx2, the row offset reduceAvx2, the zero fill)."""
    M, K = x2d_f32.shape
    quantize = _quantize_mul_add_readable if rounding == "multiply_then_add" else _quantize_fma_readable
    codes_u8 = quantize(x2d_f32, inv_f32, zp_f32, 0, 255).astype(np.uint8)
    padded_u8 = np.zeros((M, lda), np.uint8)
    padded_u8[:, :K] = codes_u8
    row_sums_i32 = codes_u8.sum(axis=1, dtype=np.int64).astype(np.int32)
    return padded_u8, row_sums_i32


@njit(cache=True, nogil=True)
def _quantize_padded_rows_kernel(x2d_f32, inv_f32, zp_f32, fma, out_u8, row_sums_i32, m_start, m_end):
    """Rows [m_start, m_end) of :func:`quantize_padded_rows_readable` (``fma``: eq. Q1, else eq. Q1c), each row in
    one pass: codes, their sum, the zero padding."""
    if m_start < 0:  # never: tells LLVM the row indices are >= 0 (no negative-index wraparound)
        return
    K = x2d_f32.shape[1]
    lda = out_u8.shape[1]
    lo = np.float32(0)
    hi = np.float32(255)
    for m in range(m_start, m_end):
        x_row = x2d_f32[m]
        q_row = out_u8[m]
        row_sum = np.int32(0)
        if fma:
            for k in range(K):
                q = quantize_fma_element(x_row[k], inv_f32, zp_f32, lo, hi)
                q_row[k] = q
                row_sum = np.int32(row_sum + q)   # int32 (Numba would widen to int64): 8 lanes, not 4
        else:
            for k in range(K):
                q = quantize_mul_add_element(x_row[k], inv_f32, zp_f32, lo, hi)
                q_row[k] = q
                row_sum = np.int32(row_sum + q)   # int32 (Numba would widen to int64): 8 lanes, not 4
        for k in range(K, lda):
            q_row[k] = 0
        row_sums_i32[m] = row_sum


QUANTIZE_ITEM_SIZE = 1 << 15
"""About this many elements (whole rows) per item when the pool shares the quantization."""

QUANTIZE_PARALLEL_MIN_SIZE = 1 << 19
"""Below this many elements one thread quantizes: a hand-off to the pool costs ~10-40 us."""


@njit(cache=True, nogil=True)
def _quantize_padded_rows_shared(claims_i64, thread, threads, x2d_f32, inv_f32, zp_f32, fma, out_u8, row_sums_i32,
                                 rows_per_item):
    """The pool's version (refquant._threads.share_items): item c is rows [c·rows_per_item, (c+1)·rows_per_item)."""
    n_items = claims_i64.shape[0] - 1
    M = x2d_f32.shape[0]
    for j in range(n_items):
        c = item_to_try(j, n_items, thread, threads)
        if take_item(claims_i64, c):
            _quantize_padded_rows_kernel(x2d_f32, inv_f32, zp_f32, fma, out_u8, row_sums_i32, c * rows_per_item,
                                         min(M, (c + 1) * rows_per_item))
            finish_item(claims_i64)


def quantize_padded_rows(x2d_f32: np.ndarray, inv_f32: np.float32, zp_f32: np.float32, lda: int,
                         rounding: Rounding = "fbgemm_legacy_fma") -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_padded_rows_readable` in one Numba pass over x (the same bits), shared by the cores
    (refquant._threads) from QUANTIZE_PARALLEL_MIN_SIZE elements on; every row is written by one thread.
    ``x2d_f32``: C-contiguous float32 (M, K), finite (the caller checked); ``inv_f32`` = f32(1 / f32(scale))."""
    M, K = x2d_f32.shape
    out_u8 = np.empty((M, lda), np.uint8)
    row_sums_i32 = np.empty(M, np.int32)
    fma = rounding != "multiply_then_add"
    rows_per_item = max(1, QUANTIZE_ITEM_SIZE // max(K, 1))
    n_items = -(-M // rows_per_item)
    threads = threads_for(n_items, DEFAULT_THREADS) if M * K >= QUANTIZE_PARALLEL_MIN_SIZE else 1
    if threads == 1:
        _quantize_padded_rows_kernel(x2d_f32, inv_f32, zp_f32, fma, out_u8, row_sums_i32, 0, M)
    else:
        share_items(_quantize_padded_rows_shared, n_items,
                    [(x2d_f32, inv_f32, zp_f32, fma, out_u8, row_sums_i32, rows_per_item)] * threads)
    return out_u8, row_sums_i32


def _quantize_nearbyint_then_add(x_f32: np.ndarray, inv_f32: np.float32, zp: int,
                                 qmin: int, qmax: int) -> np.ndarray:
    """The later FBGEMM's non-legacy rounding: rint(f32(x * inv)) + zero_point, then clamp (NaN -> quant_max)."""
    with np.errstate(invalid="ignore", over="ignore"):
        t_f32 = np.rint(x_f32 * inv_f32)                 # float32 multiply, then round half to even
        v_f32 = np.fmin(t_f32 + np.float32(zp), INT32_FLOAT_MAX)
    return np.clip(cvtps2dq(v_f32), qmin, qmax)


def _quantize_scalar_path(x_f32: np.ndarray, inv_f32: np.float32 | np.ndarray, zp_f32: np.float32 | np.ndarray,
                          qmin: int, qmax: int) -> np.ndarray:
    """Eq. Q2: fbgemm's scalar ``Quantize``: multiply, add the zero point, round, clamp (in double).

    NaN becomes INT32_MIN before the cast to the storage type; for 8-bit storage that truncates to 0.
    Matches: pytorch/FBGEMM include/fbgemm/QuantUtils.h (Quantize<T>(src, scale, zero_point, qparams) scalar).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        t_f32 = x_f32 * inv_f32                          # f32(x * inv)
        t_f32 = zp_f32 + t_f32                           # f32(f32(zero_point) + t)
        r_f32 = np.rint(t_f32)                           # nearbyint: round half to even
    nan = np.isnan(r_f32)
    r_f64 = np.clip(r_f32.astype(np.float64), qmin, qmax)   # std::min/max in double
    r_f64[nan] = -(2.0**31)                                  # NaN: the int conversion gives INT32_MIN
    return r_f64.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# roundings other implementations use (no torch path takes them; refquant.explain models them)

PORT_ROUNDINGS: dict[str, str] = {
    "half_away": "q = clamp(round_half_away(fmaf(x, inv, f32(zero_point))), quant_min, quant_max)   "
                 "(eq. Q1 with C's round() for cvtps2dq's half-to-even)",
    "textbook_float64": "q = clamp(RNE(f64(x) / f64(scale) + zero_point), quant_min, quant_max)   "
                        "(np.round on doubles: torch's test reference _quantize fed float64 inputs)",
    "textbook_float64_half_away": "q = clamp(round_half_away(f64(x) / f64(scale) + zero_point), quant_min, "
                                  "quant_max)   (C's round() on doubles)",
    "textbook_float32": "q = clamp(RNE(f32(f32(x / f32(scale)) + f32(zero_point))), quant_min, quant_max)   "
                        "(np.round(x / scale + zero_point) on a float32 x: NumPy computes it in float32, a "
                        "division, no reciprocal)",
}
"""Float -> code roundings of other implementations, by name, each with its formula (``inv = f32(1 / f32(scale))``
as in eq. Q0; ``scale`` the double torch stores). torch's own test reference is
torch/testing/_internal/common_quantized.py ``_quantize``: ``np.round(x / scale + zero_point)``, then clip, which is
"textbook_float64" on float64 inputs and "textbook_float32" on float32 ones (NumPy keeps float32 against a Python
float scale). None of these is what torch computes (eq. Q1); :func:`quantize_per_tensor_port` computes them exactly."""


def _round_half_away(v_f64: np.ndarray) -> np.ndarray:
    """C's round(): floor(|v| + frac >= 0.5) with the sign put back; exact on doubles (and on float32 values)."""
    a = np.abs(v_f64)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= 0.5), v_f64)


def quantize_per_tensor_port(x: object, scale: object, zero_point: object, dtype: str, rounding: str) -> np.ndarray:
    """Quantize float32 ``x`` as another implementation would, by one of :data:`PORT_ROUNDINGS` (quint8 / qint8).

    ``scale`` is used as given (a double) by the textbook formulas, as f32(scale) by the others. NaN is refused
    (these formulas give no defined code for it). Each formula is one NumPy statement per rounding, exact: float32
    operations are float32 NumPy operations (one rounding each), fmaf is refquant._float32.fmaf, and the double
    formulas are float64 NumPy operations.
    """
    x_f32 = _as_float32_input(x)
    dtype = check_qdtype(dtype)
    if dtype == "qint32":
        raise ValueError("quantize_per_tensor_port models 8-bit codes (quint8, qint8), got dtype 'qint32'")
    if rounding not in PORT_ROUNDINGS:
        raise ValueError(f"rounding must be one of {tuple(PORT_ROUNDINGS)}, got {rounding!r}")
    if np.isnan(x_f32).any():
        raise ValueError(f"x contains {int(np.isnan(x_f32).sum())} NaN value(s); the port roundings give no code "
                         f"for NaN")
    scale_f32 = check_scale(scale)
    scale_f64 = float(_scalar(scale, "scale", float))
    zp = check_zero_point(zero_point, dtype)
    qmin, qmax = qdtype_range(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        if rounding == "half_away":
            inv_f32 = np.float32(1) / scale_f32                                      # eq. Q0
            v = fmaf(x_f32, inv_f32, np.float32(zp)).astype(np.float64)              # one rounding, as eq. Q1
            r = _round_half_away(v)
        elif rounding == "textbook_float64":
            r = np.round(x_f32.astype(np.float64) / scale_f64 + zp)                  # np.round: half to even
        elif rounding == "textbook_float64_half_away":
            r = _round_half_away(x_f32.astype(np.float64) / scale_f64 + zp)
        else:  # textbook_float32
            t_f32 = (x_f32 / scale_f32).astype(np.float32)                           # float32 division
            r = np.round((t_f32 + np.float32(zp)).astype(np.float32)).astype(np.float64)
    return np.clip(r, qmin, qmax).astype(QDTYPES[dtype])


def quantize_per_channel(x: object, scales: object, zero_points: object, axis: int, dtype: str) -> np.ndarray:
    """Quantize float32 ``x`` with one (scale, zero point) per slice along ``axis``; returns integer codes.

    Every dtype takes fbgemm's scalar path, eq. Q2, channel by channel (no FMA)::

        inv_c = f32(1 / f32(scales[c]))
        t     = f32(f32(x * inv_c) + f32(zero_points[c]))
        q     = clamp(nearbyint(t), quant_min, quant_max)      # NaN -> 0 (8-bit) or -2^31 (qint32)

    The scales are rounded to float32 (torch keeps them as double but hands float to fbgemm).
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/AffineQuantizerBase.cpp (quantize_val ->
    fbgemm::Quantize<T>), via aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp
    (quantize_tensor_per_channel_affine_cpu).

    Args:
        x: float32 array; ``x.shape[axis]`` channels.
        scales: 1-D floating array, one positive finite scale per channel.
        zero_points: 1-D integer array, one zero point per channel, in the dtype's range.
        axis: the channel axis, 0 <= axis < x.ndim (torch refuses negative axes).
        dtype: "quint8", "qint8" or "qint32".
    """
    x_f32 = _as_float32_input(x)
    dtype = check_qdtype(dtype)
    axis = _check_axis(axis, x_f32.ndim)
    scales_f64, zps_i64 = _per_channel_params(scales, zero_points, x_f32.shape[axis], dtype)
    view = _channel_view(x_f32.shape[axis], axis, x_f32.ndim)
    inv_f32 = (np.float32(1) / scales_f64.astype(np.float32)).reshape(view)         # eq. Q0 per channel
    zp_f32 = zps_i64.astype(np.float32).reshape(view)
    qmin, qmax = qdtype_range(dtype)
    q = _quantize_scalar_path(x_f32, inv_f32, zp_f32, qmin, qmax)
    return q.astype(QDTYPES[dtype])                      # NaN's INT32_MIN keeps its low bits: 0 for 8-bit codes


# --------------------------------------------------------------------------------------------------------------
# dequantize


def dequantize(q: np.ndarray, scale: object, zero_point: object) -> np.ndarray:
    """Integer codes back to float32 with one scale and zero point, eq. D1::

        x = f32(f32(q - zero_point) * f32(scale))      # the subtraction in int32 (it wraps for qint32)

    A single multiply: no fused multiply-add, so ``q * scale - zero_point * scale`` would differ.
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp
    (dequantize_tensor_per_tensor_affine_cpu, Vectorized<c10::quint8>::dequantize).

    Args:
        q: uint8 (quint8), int8 (qint8) or int32 (qint32) codes; the dtype of ``q`` decides which.
        scale: positive finite number; used as f32(scale).
        zero_point: integer in the dtype's range.
    """
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q must be a NumPy array of integer codes, got {type(q).__name__}")
    dtype = qdtype_of_codes(q)
    scale_f32 = check_scale(scale)
    zp = check_zero_point(zero_point, dtype)
    with np.errstate(over="ignore"):
        diff_i32 = q.astype(np.int32) - np.int32(zp)          # int32, wrapping (matters only for qint32)
    return diff_i32.astype(np.float32) * scale_f32           # f32(q - zp), then one float32 multiply


def dequantize_per_channel(q: np.ndarray, scales: object, zero_points: object, axis: int) -> np.ndarray:
    """Integer codes back to float32 with a (scale, zero point) per slice along ``axis``, eq. D2::

        x = f32(f64(f32(q) - f32(zero_points[c])) * f64(scales[c]))

    Unlike the quantize side, the scale enters in full double precision (torch stores per-channel scales as
    double); the difference is taken in float32.
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp
    (dequantize_per_channel_affine_kernel).

    Args:
        q: uint8, int8 or int32 codes.
        scales: 1-D floating array, one scale per channel (float32 values are taken exactly).
        zero_points: 1-D integer array.
        axis: the channel axis, 0 <= axis < q.ndim.
    """
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q must be a NumPy array of integer codes, got {type(q).__name__}")
    dtype = qdtype_of_codes(q)
    axis = _check_axis(axis, q.ndim)
    scales_f64, zps_i64 = _per_channel_params(scales, zero_points, q.shape[axis], dtype)
    view = _channel_view(q.shape[axis], axis, q.ndim)
    diff_f32 = q.astype(np.float32) - zps_i64.astype(np.float32).reshape(view)    # float32 subtraction
    return (diff_f32.astype(np.float64) * scales_f64.reshape(view)).astype(np.float32)
