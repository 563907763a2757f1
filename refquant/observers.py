"""Observers: watch float32 tensors during calibration and turn their range into (scale, zero_point).

Names, keywords and defaults follow ``torch.ao.quantization.observer`` (dtype and qscheme as strings). Every
observer is called on each calibration batch (``observer(x)`` records ``x`` and returns it) and then asked for
``calculate_qparams()``. They differ only in the range they keep:

    MinMaxObserver                          min_val = min(min_val, min(x)),  max_val likewise
    MovingAverageMinMaxObserver             min_val = f32(min_val + f32(f32(c) * f32(min(x) - min_val)))
    PerChannelMinMaxObserver                the MinMax range of each slice along ch_axis
    MovingAveragePerChannelMinMaxObserver   the moving average of each slice

and all share one formula from range to parameters, ``_calculate_qparams``, all in float32 (eq. P1-P3 below).
The histogram observer, which picks its range by minimizing the quantization error, is in
:mod:`refquant.histogram`.

Matches: torch/ao/quantization/observer.py (UniformQuantizationObserverBase._calculate_qparams, MinMaxObserver,
MovingAverageMinMaxObserver, PerChannelMinMaxObserver, MovingAveragePerChannelMinMaxObserver) and
torch/ao/quantization/utils.py (calculate_qmin_qmax, check_min_max_valid), in pytorch/pytorch.
"""

from __future__ import annotations

import functools
import numbers
import threading
import warnings

import numpy as np

from .dtypes import QDTYPES, check_qdtype

QSCHEMES: tuple[str, ...] = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)
PER_TENSOR_QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric")
PER_CHANNEL_QSCHEMES = ("per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams")

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23, torch.finfo(torch.float32).eps


def calculate_qmin_qmax(quant_min: int | None, quant_max: int | None, dtype: str,
                        reduce_range: bool) -> tuple[int, int, bool]:
    """(quant_min, quant_max, has_customized_qrange) as torch's observers settle them.

    Default ranges: quint8 [0, 255], qint8 [-128, 127], qint32 [-2^31, 2^31 - 1]; ``reduce_range`` halves the
    8-bit ones to [0, 127] and [-64, 63] (one bit less: see refquant.linear on why fbgemm wants it). A custom
    range must contain 0; ``reduce_range`` halves it too (quant_min // 2, quant_max // 2).
    Matches: torch/ao/quantization/utils.py (calculate_qmin_qmax, validate_qmin_qmax).
    """
    if (quant_min is None) != (quant_max is None):
        # torch silently ignores a lone bound; refquant says so instead.
        raise ValueError(f"quant_min and quant_max must be given together, got quant_min={quant_min!r}, "
                         f"quant_max={quant_max!r}")
    if quant_min is not None:
        for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {v!r}")
        quant_min, quant_max = int(quant_min), int(quant_max)
        if not quant_min <= 0 <= quant_max:
            raise ValueError(f"the quantization range [quant_min, quant_max] must include 0, "
                             f"got [{quant_min}, {quant_max}]")
        if quant_min >= quant_max:
            raise ValueError(f"quant_min must be less than quant_max, got [{quant_min}, {quant_max}]")
        info = np.iinfo(QDTYPES[dtype])
        if quant_min < info.min or quant_max > info.max:  # torch checks only the length of the range
            raise ValueError(f"[quant_min, quant_max] must lie inside {dtype}'s range [{info.min}, {info.max}], "
                             f"got [{quant_min}, {quant_max}]")
        if reduce_range:
            quant_min, quant_max = quant_min // 2, quant_max // 2
        return quant_min, quant_max, True
    if dtype == "qint8":
        return (-64, 63, False) if reduce_range else (-128, 127, False)
    if dtype == "quint8":
        return (0, 127, False) if reduce_range else (0, 255, False)
    return -(2**31), 2**31 - 1, False  # qint32 ignores reduce_range


def _as_observed_float32(x: object, argname: str = "x") -> np.ndarray:
    """What torch's observers do first: ``x.to(torch.float32)``. Floating and integer arrays are converted;
    anything else is refused."""
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{argname} must be a real-valued array (float32, or convertible to it), got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _check_finite(x_f32: np.ndarray, argname: str = "x") -> None:
    """NaN or inf in an observed batch make torch's MinMax observers return a NaN or inf scale; refuse them."""
    if not np.isfinite(x_f32).all():
        bad = x_f32[~np.isfinite(x_f32)][0]
        raise ValueError(f"{argname} contains non-finite values (first: {bad}); torch's MinMax observers would "
                         f"record it and return a meaningless scale. Drop them first (HistogramObserver drops inf).")


def _torch_maximum(scale: np.ndarray, eps: np.float32) -> np.ndarray:
    """``torch.max(scale, eps_tensor)`` for float32: shape at least (1,), and a NaN result is the canonical quiet NaN
    0x7fc00000 that torch's scalar ``maximum`` returns (np.maximum would keep the NaN's own sign and payload).
    A NaN scale arises only from a range wider than float32 can hold (a HistogramObserver clip range).
    Matches: pytorch/pytorch aten/src/ATen/native/cpu/BinaryOpsKernel.cpp (maximum_kernel, scalar lambda)."""
    out = np.maximum(scale, eps[None]).astype(np.float32)
    nan = np.isnan(out)
    if nan.any():
        out[nan] = np.float32(np.nan)
    return out


def _serialized(method):
    """Run ``method`` holding the observer's lock, so that threads sharing one observer take turns.

    Each forward reads the recorded state (range, histogram), computes and writes it back; two threads doing that at
    once lose one batch (torch's observers do). With the lock the result equals feeding the batches one after the
    other, in the order the threads got the lock. An RLock: an observer's method may call another."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class UniformQuantizationObserverBase:
    """What every affine observer shares: settings, their validation, and the range -> (scale, zero_point) step.

    Args:
        dtype: "quint8" (activations), "qint8" (weights) or "qint32".
        qscheme: "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric"
            or "per_channel_affine_float_qparams".
        reduce_range: use one bit less of range ([0, 127] for quint8, [-64, 63] for qint8).
        quant_min, quant_max: a custom range (both or neither).
        eps: the smallest scale; float32 epsilon (2^-23) by default, stored as float32.
    """

    def __init__(self, dtype: str = "quint8", qscheme: str = "per_tensor_affine", reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = FLOAT32_EPS) -> None:
        self._lock = threading.RLock()  # see _serialized
        self.dtype = check_qdtype(dtype)
        if qscheme not in QSCHEMES:
            raise ValueError(f"qscheme must be one of {QSCHEMES}, got {qscheme!r}")
        self.qscheme = qscheme
        self.reduce_range = bool(reduce_range)
        self.quant_min, self.quant_max, self.has_customized_qrange = calculate_qmin_qmax(
            quant_min, quant_max, self.dtype, self.reduce_range)
        eps_f32 = np.float32(eps)
        if not (np.isfinite(eps_f32) and eps_f32 > 0):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        self.eps = eps_f32

    def _refuse_symmetric_quint8_reduce_range(self) -> None:
        """MinMaxObserver and PerChannelMinMaxObserver (and their moving averages) refuse a symmetric quint8 range
        with reduce_range in their own ``__init__``, as torch's do; HistogramObserver accepts it, as torch's does
        (quant range [0, 127], zero point 128).
        Matches: torch/ao/quantization/observer.py (MinMaxObserver.__init__, PerChannelMinMaxObserver.__init__)."""
        if self.qscheme in ("per_tensor_symmetric", "per_channel_symmetric") and self.reduce_range \
                and self.dtype == "quint8":
            raise NotImplementedError(f"Cannot reduce range for symmetric quantization for quint8 ({type(self).__name__}"
                                      f" refuses it, as torch's does; HistogramObserver accepts it)")

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - each observer defines it
        raise NotImplementedError

    def __getstate__(self) -> dict:
        """Pickling and copying keep everything but the lock (a lock cannot be pickled); the copy gets its own."""
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _calculate_qparams(self, min_val: np.ndarray, max_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """From a recorded range to (scale, zero_point), every step a float32 tensor op as in torch.

        With min_neg = min(min_val, 0) and max_pos = max(max_val, 0), so that 0.0 is always representable:

            symmetric:  scale = max(f32(max(-min_neg, max_pos) / f32((quant_max - quant_min) / 2)), eps)    (P1)
                        zero_point = 0, or 128 for quint8 ((quant_min + quant_max) // 2 with a custom range)
            affine:     scale = max(f32(f32(max_pos - min_neg) / f32(quant_max - quant_min)), eps)          (P2)
                        zero_point = clamp(quant_min - round_half_even(f32(min_neg / scale)),
                                           quant_min, quant_max)
            affine_float_qparams:                                                                           (P3)
                        scale = f32(f32(max_val - min_val) / f32(quant_max - quant_min)), 1.0 where <= eps
                        zero_point = f32(-min_val / scale)   (a float, -0.0 kept)

        True division, not a reciprocal multiply. Zero points are int64 for symmetric and int32 for affine
        schemes; per-tensor results have shape (1,). An observer that saw nothing returns (1.0, 0) with a warning.
        Matches: torch/ao/quantization/observer.py (UniformQuantizationObserverBase._calculate_qparams).
        """
        min_val = np.asarray(min_val, np.float32)
        max_val = np.asarray(max_val, np.float32)
        if not self._check_min_max_valid(min_val, max_val):
            return np.array([1.0], np.float32), np.array([0], np.int64)
        quant_min, quant_max = self.quant_min, self.quant_max
        zero = np.float32(0)
        min_val_neg = np.minimum(min_val, zero)
        max_val_pos = np.maximum(max_val, zero)

        if self.qscheme in ("per_tensor_symmetric", "per_channel_symmetric"):
            max_val_pos = np.maximum(-min_val_neg, max_val_pos)
            scale = max_val_pos / np.float32((quant_max - quant_min) / 2)          # (P1)
            scale = _torch_maximum(scale, self.eps)                               # broadcast with eps: shape >= (1,)
            if self.dtype == "quint8":
                zp_value = (quant_min + quant_max) // 2 if self.has_customized_qrange else 128
            else:
                zp_value = 0
            zero_point = np.full(min_val_neg.shape, zp_value, np.int64)
        elif self.qscheme == "per_channel_affine_float_qparams":
            scale = (max_val - min_val) / np.float32(quant_max - quant_min)      # (P3)
            scale = np.where(scale > self.eps, scale, np.float32(1)).astype(np.float32)
            zero_point = (-min_val / scale).astype(np.float32)                    # -1 * min_val: an exact negation
        else:
            scale = (max_val_pos - min_val_neg) / np.float32(quant_max - quant_min)  # (P2)
            scale = _torch_maximum(scale, self.eps)
            with np.errstate(invalid="ignore"):
                rounded_i32 = np.rint(min_val_neg / scale).astype(np.int32)      # torch.round(...).to(torch.int)
            zero_point = (np.int32(quant_min) - rounded_i32).astype(np.int32)
            zero_point = np.minimum(np.maximum(zero_point, np.int32(quant_min)), np.int32(quant_max))  # clamp

        if scale.ndim == 0:
            scale = scale.reshape(1)
        if zero_point.ndim == 0:
            zero_point = zero_point.reshape(1)
        return scale, zero_point

    @staticmethod
    def _check_min_max_valid(min_val: np.ndarray, max_val: np.ndarray) -> bool:
        """False (with torch's warning) for an observer that has seen nothing; an error if min > max.
        Matches: torch/ao/quantization/utils.py (check_min_max_valid)."""
        if min_val.size == 0 or max_val.size == 0 or (
                min_val.ndim == 0 and min_val == np.inf and max_val == -np.inf):
            warnings.warn("must run observer before calling calculate_qparams. Returning default values.",
                          stacklevel=3)
            return False
        if (min_val > max_val).any():
            raise ValueError(f"min {min_val} should be less than max {max_val} (the observer's range is "
                             f"inverted; a moving-average per-channel observer can end up like this)")
        return True


class _RangeObserver(UniformQuantizationObserverBase):
    """What the four MinMax-family observers share: convert and check a batch, find its range, fold it into the
    recorded range (``_update_range``: min/max, or a moving average), and apply ``_calculate_qparams``."""

    def _batch_range(self, x_f32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    def _has_range(self) -> bool:
        raise NotImplementedError  # pragma: no cover

    def _update_range(self, cur_min: np.ndarray, cur_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Running min and max (torch.min / torch.max with the recorded values)."""
        return np.minimum(cur_min, self.min_val), np.maximum(cur_max, self.max_val)

    @_serialized
    def forward(self, x):
        """Record the batch ``x`` (converted to float32 as torch's ``x.to(torch.float32)``); return ``x``.
        Threads may share an observer: each batch is recorded whole, one at a time (see :func:`_serialized`)."""
        x_f32 = _as_observed_float32(x)
        if x_f32.size == 0:
            return x
        _check_finite(x_f32)
        cur_min, cur_max = self._batch_range(x_f32)
        if self._has_range():
            self.min_val, self.max_val = self._update_range(cur_min, cur_max)
        else:
            self.min_val, self.max_val = cur_min, cur_max
        return x

    @_serialized
    def calculate_qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero_point) from the recorded range, eq. P1-P3: float32 scales; zero points int32 (affine),
        int64 (symmetric) or float32 (affine_float_qparams); shape (1,) per tensor, (C,) per channel."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_val={self.min_val}, max_val={self.max_val})"


def _moving_average(old_f32: np.ndarray, cur_f32: np.ndarray, averaging_constant: float) -> np.ndarray:
    """f32(old + f32(f32(c) * f32(cur - old))): torch's ``old + c * (cur - old)`` on float32 tensors, where the
    Python float c is rounded to float32 first."""
    return old_f32 + np.float32(averaging_constant) * (cur_f32 - old_f32)


def _check_averaging_constant(c: object) -> float:
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not np.isfinite(c):
        raise ValueError(f"averaging_constant must be a finite real number, got {c!r}")
    return float(c)


class MinMaxObserver(_RangeObserver):
    """The running minimum and maximum of everything observed, per tensor.

        min_val = min(min_val, min(x)),   max_val = max(max_val, max(x))     (x converted to float32 first)

    then ``calculate_qparams`` applies eq. P1 or P2. The order of the batches does not matter.
    Matches: torch/ao/quantization/observer.py (MinMaxObserver).
    """

    def __init__(self, dtype: str = "quint8", qscheme: str = "per_tensor_affine", reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = FLOAT32_EPS) -> None:
        if qscheme not in PER_TENSOR_QSCHEMES:
            raise NotImplementedError(f"{type(self).__name__}'s qscheme only supports {PER_TENSOR_QSCHEMES}, "
                                      f"got {qscheme!r}")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps)
        self._refuse_symmetric_quint8_reduce_range()
        self.reset_min_max_vals()

    def _batch_range(self, x_f32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x_f32.min(), x_f32.max()  # torch.aminmax(x)

    def _has_range(self) -> bool:
        return not (self.min_val == np.inf and self.max_val == -np.inf)

    @_serialized
    def reset_min_max_vals(self) -> None:
        """Forget everything observed: min_val = +inf, max_val = -inf."""
        self.min_val = np.float32(np.inf)
        self.max_val = np.float32(-np.inf)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """An exponential moving average of each batch's minimum and maximum, per tensor.

        first batch:  min_val = min(x)
        later:        min_val = f32(min_val + f32(f32(c) * f32(min(x) - min_val)))       c = averaging_constant

    (max_val likewise), every operation rounded to float32 with ``c`` itself rounded to float32 -- torch computes
    ``min_val + c * (cur - min_val)`` on float32 tensors. Matches: torch/ao/quantization/observer.py
    (MovingAverageMinMaxObserver.forward).
    """

    def __init__(self, averaging_constant: float = 0.01, dtype: str = "quint8", qscheme: str = "per_tensor_affine",
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 eps: float = FLOAT32_EPS) -> None:
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps)

    def _update_range(self, cur_min, cur_max):
        return (_moving_average(self.min_val, cur_min, self.averaging_constant),
                _moving_average(self.max_val, cur_max, self.averaging_constant))


class PerChannelMinMaxObserver(_RangeObserver):
    """The running minimum and maximum of each slice of x along ``ch_axis`` (one pair per channel).

    For a Linear weight (N, K) with ch_axis=0, channel n is the row of output feature n. With the fbgemm
    qconfig's weight settings (dtype="qint8", qscheme="per_channel_symmetric") eq. P1 gives
    scale[n] = max|w[n, :]| / 127.5 and zero point 0.
    Matches: torch/ao/quantization/observer.py (PerChannelMinMaxObserver._forward).
    """

    def __init__(self, ch_axis: int = 0, dtype: str = "quint8", qscheme: str = "per_channel_affine",
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 eps: float = FLOAT32_EPS) -> None:
        if qscheme not in PER_CHANNEL_QSCHEMES:
            raise NotImplementedError(f"{type(self).__name__}'s qscheme only supports {PER_CHANNEL_QSCHEMES}, "
                                      f"got {qscheme!r}")
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, numbers.Integral):
            raise TypeError(f"ch_axis must be an int, got {ch_axis!r}")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps)
        self._refuse_symmetric_quint8_reduce_range()
        self.ch_axis = int(ch_axis)
        self.reset_min_max_vals()

    def _batch_range(self, x_f32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Move ch_axis to the front, flatten the rest, take min and max of each row (torch.aminmax(dim=1))."""
        if x_f32.ndim < 2:  # torch: flatten(start_dim=1) raises "Dimension out of range" on a 1-D input
            raise ValueError(f"x must have at least 2 dimensions for a per-channel observer, got shape {x_f32.shape}")
        if not -x_f32.ndim <= self.ch_axis < x_f32.ndim:
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for an input with {x_f32.ndim} dimensions")
        rows = np.moveaxis(x_f32, self.ch_axis, 0).reshape(x_f32.shape[self.ch_axis], -1)
        if self.min_val.size and rows.shape[0] != self.min_val.shape[0]:
            raise ValueError(f"x has {rows.shape[0]} channels along ch_axis={self.ch_axis}, but this observer "
                             f"has recorded {self.min_val.shape[0]}")
        return rows.min(axis=1), rows.max(axis=1)

    def _has_range(self) -> bool:
        return self.min_val.size > 0

    @_serialized
    def reset_min_max_vals(self) -> None:
        """Forget everything observed (empty per-channel ranges)."""
        self.min_val = np.zeros(0, np.float32)
        self.max_val = np.zeros(0, np.float32)


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """The moving average of each channel's minimum and maximum (see MovingAverageMinMaxObserver):

        min_val[c] = f32(min_val[c] + f32(f32(averaging_constant) * f32(min(x[c]) - min_val[c])))

    With averaging, a channel's min can end above its max; ``calculate_qparams`` then raises, as torch does.
    Matches: torch/ao/quantization/observer.py (MovingAveragePerChannelMinMaxObserver.forward).
    """

    def __init__(self, averaging_constant: float = 0.01, ch_axis: int = 0, dtype: str = "quint8",
                 qscheme: str = "per_channel_affine", reduce_range: bool = False, quant_min: int | None = None,
                 quant_max: int | None = None, eps: float = FLOAT32_EPS) -> None:
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        super().__init__(ch_axis, dtype, qscheme, reduce_range, quant_min, quant_max, eps)

    def _update_range(self, cur_min, cur_max):
        return (_moving_average(self.min_val, cur_min, self.averaging_constant),
                _moving_average(self.max_val, cur_max, self.averaging_constant))
