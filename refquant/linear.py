"""Quantized Linear: uint8 activations x int8 weights -> uint8, every intermediate visible, on every engine.

What ``torch.ao.nn.quantized.Linear`` (``torch.ops.quantized.linear`` / ``linear_relu``) computes, written out step by
step for the fbgemm engine (the default; x86 runs the same for Linear). qnnpack and onednn share eqs. L1-L5 and
differ after them (their weight packing, bias and requantization: refquant.engines, ``engine=``). Notation:
``f32(...)`` rounds to float32 (nearest-even), ``fmaf`` is a fused multiply-add (one rounding), ``RNE`` is round
half to even, ``Σ_k`` runs over the K input features, all integer arithmetic is int32 and wraps modulo 2^32 exactly
as fbgemm's does.

Weight (once, in :meth:`QuantizedLinear.from_float`; :meth:`QuantizedLinear.from_quantized` starts at eq. L3)::

    s_w, z_w    = observer(weight).calculate_qparams()                    per channel n, or one per tensor  (eq. L1)
    q_w[n, k]   = quantize(weight[n, k], s_w[n], z_w[n], qint8)                                             (eq. L2)
    col_offsets[n] = Σ_k q_w[n, k] − z_w[n]·K                                                 int32         (eq. L3)

Activations (every call; q_x are uint8 codes with scale s_x and zero point z_x)::

    acc[m, n]   = Σ_k q_x[m, k]·q_w[n, k]                                                     int32         (eq. L4)
    raw[m, n]   = acc[m, n] − z_x·col_offsets[n] − z_w[n]·Σ_k q_x[m, k]                       int32         (eq. L5)
                  (= Σ_k (q_x − z_x)·(q_w − z_w) modulo 2^32)
    atws[n]     = f32(f32(s_x)·s_w[n])                          "act_times_w_scale"           float32       (eq. L6)
    mult[n]     = f32(atws[n] / f32(s_y))                        output multiplier            float32       (eq. L7)
    t[m, n]     = f32(raw)                                        without bias                              (eq. L8a)
                = f32(f32(raw) + f32(bias[n] / atws[n]))          per-channel weights (two roundings)       (eq. L8b)
                = fmaf(bias[n], f32(1.0 / double(atws)), f32(raw))  per-tensor weights (one rounding)       (eq. L8c)
    y[m, n]     = f32(t·mult[n])                                  (no FMA)                                  (eq. L9)
    r[m, n]     = cvtps2dq(y)      RNE; NaN and |y| >= 2^31 -> INT32_MIN                                    (eq. L10)
    q_y[m, n]   = clamp(r + z_y, lo, 255),   lo = z_y with ReLU, else 0                       uint8         (eq. L11)

The bias is never quantized: it enters as the float32 ``bias / atws`` added to float32(raw). ``f32(raw)`` rounds
once |raw| > 2^24 (full range reaches that at K >= 515: 515·255·128 = 16,809,600 > 2^24). ``cvtps2dq`` turns an
overflowing y (a tiny output scale) into INT32_MIN, so such outputs become 0, where a ``lrintf``-then-clamp formula
would give 255.

Two things make the same layer give different codes on different machines, both modelled here:

* the int32 accumulator wraps modulo 2^32 (possible once K·255·128 > 2^31 − 1, K > 65,793):
  :func:`int32_accumulator_can_overflow`, and a warning from the constructor;
* CPUs without VNNI multiply with ``vpmaddubsw``, which saturates each pair of neighbouring products to int16
  (refquant.matmul eq. M2): ``saturate_int16_pairs=True``. Two products 255·(−128) already leave int16, so
  full-range activations can change outputs; 7-bit activations (255 -> 127, the qconfig's ``reduce_range``) keep
  every pair sum inside int16 (2·127·128 = 32,512), which is why fbgemm's default qconfig asks for them.

Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear.cpp (PackedLinearWeight::apply_impl) with
pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeOutputProcessingAvx2) — the path torch takes on x86, not the
``lrintf`` reference loop in include/fbgemm/OutputProcessing-inl.h (ReQuantizeOutput::f, generic branch).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from refquant.engines import (
    ENGINE_SPECS,
    EngineOptions,
    LinearQParams,
    Requantizer,
    check_engine,
    check_engine_options,
    check_requantization,
    fbgemm_requantize_fast,
    fbgemm_requantize_readable,
    onednn_gemm_pairs_restart,
)
from refquant import fixed_point as _fixed_point  # noqa: F401  registers the integer variants (requantization=)
from refquant.fused_linear import FusedLinear, epilogue_registered
from refquant.matmul import (PackedWeightS8, PairsRestart, kernel_for, matmul_u8s8_acc32, pack_weight_s8,
                             pairs_restart)
from refquant.observers import MinMaxObserver, PerChannelMinMaxObserver
from refquant.qconfig import _DEFAULT_QCONFIGS
from refquant.quantize import quantize_per_channel, quantize_per_tensor

WEIGHT_QSCHEMES = ("per_channel_symmetric", "per_channel_affine", "per_tensor_symmetric", "per_tensor_affine")
"""The weight qschemes torch's fbgemm ``linear_prepack`` accepts for a qint8 weight (torch's names, as strings)."""

INT32_MAX = 2**31 - 1
MAX_ABS_PRODUCT = 255 * 128
"""Largest |q_x·q_w| of one uint8 x int8 product: 255·(−128)."""


# ----------------------------------------------------------------------------------------------------------------
# Overflow of the int32 accumulator
# ----------------------------------------------------------------------------------------------------------------

def int32_accumulator_can_overflow(in_features: int) -> bool:
    """True when K·255·128 > 2^31 − 1, i.e. K > 65,793: then some inputs make the int32 sum of eq. L4 wrap.

    fbgemm does not widen: the accumulator wraps modulo 2^32 (and so does refquant). Since eq. L5 is also computed
    modulo 2^32, a wrapped ``acc`` still gives the right ``raw`` as long as the true raw = Σ (q_x − z_x)(q_w − z_w)
    fits in int32; this check bounds |acc| and is therefore conservative for raw.
    """
    return int(in_features) * MAX_ABS_PRODUCT > INT32_MAX


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (clear errors naming the argument)
# ----------------------------------------------------------------------------------------------------------------

def _check_positive_scale(value: object, argname: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argname} must be a real number (a float scale), got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"{argname} must be a finite scale > 0, got {value!r}")
    with np.errstate(over="ignore"):
        value_f32 = np.float32(value)
    if not (value_f32 > 0 and np.isfinite(value_f32)):
        raise ValueError(f"{argname} must stay finite and > 0 when rounded to float32 (torch keeps it as a float "
                         f"there), got {value!r}")
    return value


def _check_quint8_zero_point(value: object, argname: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argname} must be an integer zero point, got {type(value).__name__} {value!r}")
    value = int(value)
    if not 0 <= value <= 255:
        raise ValueError(f"{argname} must be a quint8 zero point in [0, 255], got {value}")
    return value


def _check_float_weight(weight: object) -> np.ndarray:
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu" or w.dtype.kind == "b":
        raise TypeError(f"weight must be a real float array (float32, as torch's Linear.weight), got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must have at least one output and one input feature, got shape {w.shape}")
    with np.errstate(over="ignore"):
        w_f32 = w.astype(np.float32)  # torch's from_float quantizes mod.weight.float()
    if not np.isfinite(w_f32).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w_f32))[0])
        raise ValueError(f"weight must be finite (as float32); weight{list(bad)} = {w_f32[bad]!r}")
    return w_f32


def _check_bias(bias: object, out_features: int) -> np.ndarray | None:
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype.kind not in "fiu" or b.dtype.kind == "b":
        raise TypeError(f"bias must be None or a real float array (float32), got dtype {b.dtype}")
    if b.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},) (one value per output feature), got {b.shape}")
    with np.errstate(over="ignore"):
        b_f32 = np.ascontiguousarray(b, dtype=np.float32)  # torch keeps the bias a float32 tensor, never quantized
    if not np.isfinite(b_f32).all():
        i = int(np.argwhere(~np.isfinite(b_f32))[0, 0])
        raise ValueError(f"bias must be finite (as float32); bias[{i}] = {b_f32[i]!r}")
    return b_f32


def _check_codes(x: object, dtype: type, argname: str, last_dim: int, last_name: str,
                 min_ndim: int = 2) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{argname} must be a numpy array of {np.dtype(dtype).name} codes, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{argname} must hold {np.dtype(dtype).name} codes, got dtype {x.dtype}"
                        + (" (quantize floats first, e.g. with refquant.quantize.quantize_per_tensor)"
                           if dtype is np.uint8 and x.dtype.kind == "f" else ""))
    if x.ndim < min_ndim:
        # torch: "The dimension of input tensor should be larger than or equal to 2" (fbgemm), "Input tensor rank
        # should be >= 2" (qnnpack), "input dim should be at least 1" (onednn) (qlinear.cpp, apply_impl)
        raise ValueError(f"{argname} must have at least {min_ndim} dimension{'s' if min_ndim > 1 else ''} "
                         f"(..., {last_name}) like torch's quantized linear input on this engine, got shape {x.shape}")
    if x.shape[-1] != last_dim:
        raise ValueError(f"{argname} must have last dimension {last_name} = {last_dim}, got shape {x.shape}")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Accumulation (eqs. L4, L5): shared by every layer that multiplies uint8 codes by int8 weights
# ----------------------------------------------------------------------------------------------------------------

def accumulate_raw(x2d_u8: np.ndarray, packed_weight: PackedWeightS8, col_offsets_i32: np.ndarray,
                   input_zero_point: int, weight_zero_points_i32: np.ndarray, *,
                   saturate_int16_pairs: bool = False) -> np.ndarray:
    """(M, K) uint8 codes -> (M, N) int32 ``raw``: eq. L4, then the zero-point corrections of eq. L5.

    raw = acc − z_x·col_offsets[n] − z_w[n]·Σ_k q_x[m, k], each step in int32 wrapping modulo 2^32 — what fbgemm
    holds in its int32 buffer right before requantization. ``saturate_int16_pairs`` sums the products in
    int16-saturated pairs as non-VNNI CPUs do (refquant.matmul eq. M2).

    Matches: pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeOutputProcessingAvx2: ``_mm256_mullo_epi32`` and
    ``_mm256_sub_epi32`` with col_offsets and row_offsets); row offsets from PackAWithRowOffset.
    """
    acc_i32 = matmul_u8s8_acc32(x2d_u8, packed_weight, saturate_int16_pairs=saturate_int16_pairs)
    # eq. L5, first correction: z_x·col_offsets[n] (skipped by fbgemm when z_x == 0: subtracting 0 is the same)
    zx_col_i32 = np.multiply(np.int32(input_zero_point), col_offsets_i32, dtype=np.int32)  # wraps
    raw_i32 = np.subtract(acc_i32, zx_col_i32[np.newaxis, :], dtype=np.int32)
    # eq. L5, second correction: z_w[n]·Σ_k q_x[m, k] (row_offsets), nonzero only for affine weights
    if (weight_zero_points_i32 != 0).any():
        row_offsets_i32 = x2d_u8.sum(axis=1, dtype=np.int64).astype(np.int32)  # PackAWithRowOffset
        zw_row_i32 = np.multiply(row_offsets_i32[:, np.newaxis], weight_zero_points_i32[np.newaxis, :],
                                 dtype=np.int32)  # wraps
        raw_i32 = np.subtract(raw_i32, zw_row_i32, dtype=np.int32)
    return raw_i32


# ----------------------------------------------------------------------------------------------------------------
# Requantization (eqs. L6-L11 for fbgemm; the other engines' in refquant.engines)
# ----------------------------------------------------------------------------------------------------------------

requantize_readable = fbgemm_requantize_readable
"""fbgemm's eqs. L8-L11 in NumPy: ``requantize_readable(raw_i32, bias_f32, act_times_w_scale_f32,
output_multiplier_f32, output_zero_point, relu, per_channel)`` (refquant.engines.fbgemm_requantize_readable)."""

requantize_fast = fbgemm_requantize_fast
"""The same as :func:`requantize_readable` with the Numba row kernel (refquant.engines.fbgemm_requantize_fast)."""


# ----------------------------------------------------------------------------------------------------------------
# Weight quantization (eqs. L1, L2)
# ----------------------------------------------------------------------------------------------------------------

def quantize_weight(weight_f32: np.ndarray, observer) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """float32 (N, K) weight -> (int8 codes, scales, zero points, qscheme) with an observer that has seen it.

    ``observer.calculate_qparams()`` (eq. L1), then per tensor ``quantize_per_tensor(w, float(scale),
    int(zero_point), "qint8")`` (torch's vector FMA path) or per channel ``quantize_per_channel(w, scales,
    zero_points, ch_axis, "qint8")`` (torch's scalar path), eq. L2; codes outside the observer's
    [quant_min, quant_max] are clamped into it (``_clamp_weights``; a no-op for the full-range default observers).
    Matches: pytorch/pytorch torch/ao/nn/quantized/modules/utils.py (_quantize_weight, _clamp_weights) and
    torch/ao/nn/quantized/modules/linear.py (Linear.from_float: "Weight observer must have dtype torch.qint8").
    """
    if getattr(observer, "dtype", None) != "qint8":
        raise ValueError(f"the weight observer must have dtype 'qint8' (torch asserts \"Weight observer must have "
                         f"dtype torch.qint8\"), got {getattr(observer, 'dtype', None)!r}")
    scales, zero_points = observer.calculate_qparams()
    if observer.qscheme in ("per_tensor_symmetric", "per_tensor_affine"):
        scale = float(np.asarray(scales).reshape(-1)[0])  # torch: float(wt_scale), int(wt_zp)
        zero_point = int(np.asarray(zero_points).reshape(-1)[0])
        w_i8 = quantize_per_tensor(weight_f32, scale, zero_point, "qint8")
    elif observer.qscheme in ("per_channel_symmetric", "per_channel_affine"):
        w_i8 = quantize_per_channel(weight_f32, scales, zero_points, observer.ch_axis, "qint8")
    else:
        raise ValueError(f"weight observer qscheme must be per-tensor or per-channel (symmetric or affine) for an "
                         f"int8 Linear weight, got {observer.qscheme!r}")
    if observer.quant_min > -128 or observer.quant_max < 127:  # _needs_weight_clamping
        w_i8 = np.clip(w_i8, observer.quant_min, observer.quant_max).astype(np.int8)
    return w_i8, np.asarray(scales), np.asarray(zero_points), observer.qscheme


# ----------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------

class QuantizedLinear:
    """``torch.ao.nn.quantized.Linear`` (and ``LinearReLU``) on any engine, with every intermediate public.

    Build it with :meth:`from_float` (float32 weight, as torch's ``from_float``), :meth:`from_quantized` (the int8
    codes, scales and zero points a torch quantized weight holds) or the constructor. Call it on uint8 input codes
    of shape (..., K) to get uint8 output codes (..., N)::

        ql = QuantizedLinear.from_float(w, b, input_scale=0.02, input_zero_point=64,
                                        output_scale=0.05, output_zero_point=128)
        y_u8 = ql(x_u8)                                     # == torch.ops.quantized.linear(...).int_repr()
        assert (y_u8 == ql.requantize(ql.accumulate(x_u8))).all()

    ``engine`` ("fbgemm" by default, "x86", "qnnpack", "onednn") selects what torch runs under
    ``torch.backends.quantized.engine = engine``: the int32 ``raw`` of eqs. L4, L5 is shared; the weight packing,
    the bias and the requantization are the engine's (refquant.engines, where their equations are side by side).

    Attributes (dtype-honest; per-tensor weights have length-1 scale arrays):
        weight_int8 (N, K) int8, weight_scales float32 (as the kernels use them), weight_scales_f64 (as torch's
        quantized weight holds them), weight_zero_points int32, bias float32 (N,) or None, col_offsets (N,) int32
        (eq. L3), input/output scale and zero point, relu, weight_qscheme, engine, saturate_int16_pairs (emulate a
        non-VNNI CPU, eq. M2 of refquant.matmul), prepacked (the engine's packed weight: qnnpack's uint8 codes and
        kernel zero points, onednn's reciprocal scales; None for fbgemm/x86, whose packing is eq. L3), requantizer
        (the engine's constants: fbgemm's act_times_w_scale and output_multiplier, qnnpack's bias_i32 and
        requantization_scales, onednn's round-tripped scales), requantization (its scheme's name).
        act_times_w_scale (eq. L6) and output_multiplier (eq. L7) are shortcuts to fbgemm's requantizer.

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear.cpp (PackedLinearWeight::apply_impl,
    PackedLinearWeightsQnnp::apply_impl, PackedLinearWeightsOnednn::apply_impl) and
    aten/src/ATen/native/quantized/cpu/qlinear_prepack.cpp (the three ``prepack``).
    """

    def __init__(self, weight_int8: np.ndarray, weight_scales: object, weight_zero_points: object,
                 bias: object, input_scale: float, input_zero_point: int, output_scale: float,
                 output_zero_point: int, relu: bool = False, weight_qscheme: str = "per_channel_symmetric",
                 saturate_int16_pairs: bool = False, *, engine: str = "fbgemm", requantization: str | None = None,
                 onednn_kernel: str = "brgemm", qnnpack_cached_output_scale: float | None = None) -> None:
        """Prepack int8 weight codes for ``engine``: eq. L3, the engine's packing, and its requantization constants.

        ``weight_scales`` / ``weight_zero_points``: N values for a per-channel ``weight_qscheme``, one for per-tensor.
        Scales are kept as float32 (``q_per_channel_scales()[i].item<float>()`` / ``(float)q_scale()``) and as the
        float64 values given (torch's quantized weight holds doubles), zero points as int32.
        ``requantization``: None (the engine's own float path) or a scheme registered in refquant.engines: the
        engine's float path by name ("fbgemm" on fbgemm and x86, "qnnpack", "onednn"), or an integer-only variant
        of refquant.fixed_point ("fbgemm_fixed_point", "tflite", "tflite_single_rounding", "float_int32_bias"; on
        every engine, see refquant.fixed_point.IntegerRequantizer).
        ``onednn_kernel`` / ``qnnpack_cached_output_scale``: see refquant.engines.EngineOptions.
        """
        spec = check_engine(engine)
        if weight_qscheme not in WEIGHT_QSCHEMES:
            raise ValueError(f"weight_qscheme must be one of {WEIGHT_QSCHEMES}, got {weight_qscheme!r}")
        if not isinstance(weight_int8, np.ndarray) or weight_int8.dtype != np.int8:
            got = weight_int8.dtype if isinstance(weight_int8, np.ndarray) else type(weight_int8).__name__
            raise TypeError(f"weight_int8 must be a numpy int8 array of weight codes, got {got}")
        if weight_int8.ndim != 2 or 0 in weight_int8.shape:
            raise ValueError(f"weight_int8 must be 2-D (out_features, in_features), non-empty, got "
                             f"{weight_int8.shape}")
        N, K = weight_int8.shape
        self.engine = engine
        self.weight_qscheme = weight_qscheme
        self.per_channel = weight_qscheme.startswith("per_channel")
        n_params = N if self.per_channel else 1

        scales = np.asarray(weight_scales)
        if scales.dtype.kind != "f" or scales.size != n_params:
            raise ValueError(f"weight_scales must hold {n_params} float scale(s) for {weight_qscheme} with N = {N}, "
                             f"got dtype {scales.dtype}, shape {scales.shape}")
        with np.errstate(over="ignore"):
            weight_scales_f32 = scales.reshape(n_params).astype(np.float32)  # prepack stores float32 scales
        if not (np.isfinite(weight_scales_f32).all() and (weight_scales_f32 > 0).all()):
            raise ValueError(f"weight_scales must be finite and > 0 as float32, got {weight_scales_f32}")
        zps = np.asarray(weight_zero_points)
        if zps.dtype.kind not in "iu" or zps.size != n_params:
            raise ValueError(f"weight_zero_points must hold {n_params} integer(s) for {weight_qscheme} with N = {N}, "
                             f"got dtype {zps.dtype}, shape {zps.shape}")
        zps_i64 = zps.reshape(n_params).astype(np.int64)
        if ((zps_i64 < -128) | (zps_i64 > 127)).any():
            raise ValueError(f"weight_zero_points must be qint8 zero points in [-128, 127], got {zps_i64}")
        if weight_qscheme.endswith("symmetric") and (zps_i64 != 0).any():
            raise ValueError(f"weight_zero_points must be 0 for {weight_qscheme}, got {zps_i64}")

        self.in_features = K
        self.out_features = N
        self.weight_int8 = np.ascontiguousarray(weight_int8)
        self.weight_scales = weight_scales_f32
        self.weight_scales_f64 = scales.reshape(n_params).astype(np.float64)
        self.weight_zero_points = zps_i64.astype(np.int32)  # weight_zero_points_int32 in prepack
        self.bias = _check_bias(bias, N)
        self.input_scale = _check_positive_scale(input_scale, "input_scale")
        self.input_zero_point = _check_quint8_zero_point(input_zero_point, "input_zero_point")
        self.output_scale = _check_positive_scale(output_scale, "output_scale")
        self.output_zero_point = _check_quint8_zero_point(output_zero_point, "output_zero_point")
        self.relu = bool(relu)
        self.saturate_int16_pairs = bool(saturate_int16_pairs)
        cached = qnnpack_cached_output_scale
        self.engine_options = EngineOptions(
            onednn_kernel=onednn_kernel,
            qnnpack_cached_output_scale=None if cached is None else _check_positive_scale(
                cached, "qnnpack_cached_output_scale"))
        check_engine_options(engine, self.engine_options, self.saturate_int16_pairs)
        scheme = check_requantization(requantization, engine)

        # eq. L3: col_offsets[n] = Σ_k q_w[n, k] − z_w[n]·K, int32 (calc_col_offsets_transpose in qlinear_prepack.cpp)
        row_sum_w_i64 = self.weight_int8.sum(axis=1, dtype=np.int64)
        zw_per_row_i64 = np.broadcast_to(zps_i64, (N,))
        self.col_offsets = (row_sum_w_i64 - zw_per_row_i64 * np.int64(K)).astype(np.int32)

        params = self.qparams()
        self.prepacked = None if spec.prepack is None else spec.prepack(params)  # the engine's refusals
        self.requantizer: Requantizer = scheme.build(params, self.prepacked, self.engine_options)
        self.requantization = scheme.name

        self._packed_weight: PackedWeightS8 = pack_weight_s8(self.weight_int8)
        self._fused: FusedLinear | None = None  # refquant.fused_linear, made at the first fused call
        # oneDNN's gemm:jit (AVX2) restarts its int16 pairs at its second K block (refquant.matmul eq. M2b)
        restart_k = onednn_gemm_pairs_restart(K) if engine == "onednn" and onednn_kernel == "gemm" else None
        self._pairs_restart: PairsRestart | None = pairs_restart(self.weight_int8, restart_k)
        self._fused_restart: FusedLinear | None = None
        if int32_accumulator_can_overflow(K):
            warnings.warn(f"in_features K = {K} > 65,793: K·255·128 exceeds int32, so the int32 accumulators can "
                          f"wrap (modulo 2^32) exactly as {engine}'s do; outputs are then not the real-number result",
                          RuntimeWarning, stacklevel=2)

    @property
    def pairs_restart_k(self) -> int | None:
        """The k at which this layer's int16 pairs start afresh (eq. M2b: oneDNN's ``gemm:jit`` with
        ``saturate_int16_pairs``, an odd k = refquant.engines.onednn_gemm_pairs_restart(K)); None where the pairs are
        those of eq. M2 or there are none."""
        return self._pairs_restart.k if self.saturate_int16_pairs and self._pairs_restart is not None else None

    def with_requantization(self, requantization: str | None) -> "QuantizedLinear":
        """The same layer (weights, scales, zero points, bias, engine and its switches) with another requantization
        scheme (None: the engine's own float path)."""
        scales = self.weight_scales_f64 if self.per_channel else self.weight_scales_f64[:1]
        zps = self.weight_zero_points if self.per_channel else self.weight_zero_points[:1]
        return QuantizedLinear(self.weight_int8, scales, zps, self.bias, self.input_scale, self.input_zero_point,
                               self.output_scale, self.output_zero_point, relu=self.relu,
                               weight_qscheme=self.weight_qscheme, saturate_int16_pairs=self.saturate_int16_pairs,
                               engine=self.engine, requantization=requantization,
                               onednn_kernel=self.engine_options.onednn_kernel,
                               qnnpack_cached_output_scale=self.engine_options.qnnpack_cached_output_scale)

    def qparams(self) -> LinearQParams:
        """The layer's quantization parameters as refquant.engines' weight packing and requantizers take them."""
        return LinearQParams(self.engine, self.per_channel, self.weight_int8, self.weight_scales,
                             self.weight_scales_f64, self.weight_zero_points, self.col_offsets, self.bias,
                             self.input_scale, self.input_zero_point, self.output_scale, self.output_zero_point,
                             self.relu)

    @classmethod
    def from_float(cls, weight: object, bias: object, input_scale: float, input_zero_point: int,
                   output_scale: float, output_zero_point: int, relu: bool = False,
                   weight_qscheme: str | None = None, saturate_int16_pairs: bool = False, *,
                   engine: str = "fbgemm", requantization: str | None = None, onednn_kernel: str = "brgemm",
                   qnnpack_cached_output_scale: float | None = None) -> "QuantizedLinear":
        """Observe and quantize a float32 (N, K) weight as torch does, keep the bias float32, then prepack.

        eq. L1: the weight observer of ``engine``'s default qconfig (``weight_qscheme=None``: per_channel_symmetric
        for fbgemm, x86 and onednn, per_tensor_symmetric for qnnpack; refquant.qconfig), or for an explicit
        ``weight_qscheme`` ``PerChannelMinMaxObserver(ch_axis=0, dtype="qint8", qscheme=...)`` (per-channel) or
        ``MinMaxObserver(dtype="qint8", qscheme=...)`` (per-tensor), sees the weight; eq. L2:
        :func:`quantize_weight` (torch's ``_quantize_weight``).

        Matches: pytorch/pytorch torch/ao/nn/quantized/modules/linear.py (Linear.from_float) and
        torch/ao/nn/quantized/modules/utils.py (_quantize_weight).
        """
        check_engine(engine)
        if weight_qscheme is not None and weight_qscheme not in WEIGHT_QSCHEMES:
            raise ValueError(f"weight_qscheme must be one of {WEIGHT_QSCHEMES} or None (the engine's default "
                             f"qconfig), got {weight_qscheme!r}")
        w_f32 = _check_float_weight(weight)
        if weight_qscheme is None:
            observer = _DEFAULT_QCONFIGS[engine].weight()
        elif weight_qscheme.startswith("per_channel"):
            observer = PerChannelMinMaxObserver(ch_axis=0, dtype="qint8", qscheme=weight_qscheme)
        else:
            observer = MinMaxObserver(dtype="qint8", qscheme=weight_qscheme)
        observer(w_f32)
        w_i8, scales, zero_points, qscheme = quantize_weight(w_f32, observer)
        return cls(w_i8, scales, zero_points, bias, input_scale, input_zero_point, output_scale,
                   output_zero_point, relu=relu, weight_qscheme=qscheme, saturate_int16_pairs=saturate_int16_pairs,
                   engine=engine, requantization=requantization, onednn_kernel=onednn_kernel,
                   qnnpack_cached_output_scale=qnnpack_cached_output_scale)

    @classmethod
    def from_quantized(cls, weight_int8: np.ndarray, weight_scales: object, weight_zero_points: object,
                       bias: object, input_scale: float, input_zero_point: int, output_scale: float,
                       output_zero_point: int, relu: bool = False, engine: str = "fbgemm", *,
                       requantization: str | None = None, saturate_int16_pairs: bool = False,
                       onednn_kernel: str = "brgemm", qnnpack_cached_output_scale: float | None = None
                       ) -> "QuantizedLinear":
        """A layer from what torch's quantized weight holds, without float weights.

        ``weight_int8`` = ``weight().int_repr()``; ``weight_scales`` = ``q_per_channel_scales()`` (a 1-D array: per
        channel) or ``q_scale()`` (a scalar: per tensor); ``weight_zero_points`` = ``q_per_channel_zero_points()``
        or ``q_zero_point()``, in the same form; ``bias`` = ``bias()`` (float32 or None). The qscheme is
        ``*_symmetric`` when every zero point is 0, else ``*_affine`` (a torch quantized tensor is always
        per_tensor_affine or per_channel_affine; the name only records what the zero points say).
        """
        check_engine(engine)
        scales = np.asarray(weight_scales)
        zps = np.asarray(weight_zero_points)
        if scales.ndim not in (0, 1):
            raise ValueError(f"weight_scales must be q_scale() (a scalar, per tensor) or q_per_channel_scales() (1-D, "
                             f"per channel), got shape {scales.shape}")
        if zps.ndim != scales.ndim:
            raise ValueError(f"weight_zero_points must have the form of weight_scales (a scalar with q_scale(), 1-D "
                             f"with q_per_channel_scales()), got shapes {zps.shape} and {scales.shape}")
        per_channel = scales.ndim == 1
        affine = zps.dtype.kind in "iu" and bool((zps != 0).any())
        qscheme = ("per_channel_" if per_channel else "per_tensor_") + ("affine" if affine else "symmetric")
        return cls(weight_int8, scales.reshape(-1), zps.reshape(-1), bias, input_scale, input_zero_point,
                   output_scale, output_zero_point, relu=relu, weight_qscheme=qscheme,
                   saturate_int16_pairs=saturate_int16_pairs, engine=engine, requantization=requantization,
                   onednn_kernel=onednn_kernel, qnnpack_cached_output_scale=qnnpack_cached_output_scale)

    # ------------------------------------------------------------------------------------------------------------

    @property
    def act_times_w_scale(self) -> np.ndarray:
        """fbgemm's eq. L6, f32(f32(s_x)·s_w[n]), float32 (N,) or (1,)."""
        return self._fbgemm_constant("act_times_w_scale")

    @property
    def output_multiplier(self) -> np.ndarray:
        """fbgemm's eq. L7, f32(act_times_w_scale[n] / f32(s_y)), float32 (N,) or (1,)."""
        return self._fbgemm_constant("output_multiplier")

    def _fbgemm_constant(self, name: str) -> np.ndarray:
        if not hasattr(self.requantizer, name):
            raise AttributeError(f"{name} is a constant of fbgemm's requantization (eqs. L6, L7); this layer runs "
                                 f"engine={self.engine!r} with requantization={self.requantization!r}, whose "
                                 f"constants are in .requantizer")
        return getattr(self.requantizer, name)

    def products(self, x_u8: np.ndarray, *, saturate_int16_pairs: bool | None = None) -> np.ndarray:
        """uint8 input codes (..., K) -> int32 ``acc`` (..., N) = Σ_k x[.., k]·w[n, k], before any zero-point
        correction: eq. L4 (M1), or with ``saturate_int16_pairs`` eq. M2 -- and eq. M2b where the layer models
        oneDNN's ``gemm:jit`` (its pairs restart at refquant.engines.onednn_gemm_pairs_restart(K)).

        What a port's multiply-accumulate loop must produce; :meth:`accumulate` corrects it to ``raw``.
        """
        x2d_u8, packed, saturate, lead_shape = self._product_operands(x_u8, saturate_int16_pairs)
        acc_i32 = matmul_u8s8_acc32(x2d_u8, packed, saturate_int16_pairs=saturate)
        return acc_i32.reshape(lead_shape + (self.out_features,))

    def accumulate(self, x_u8: np.ndarray, *, saturate_int16_pairs: bool | None = None) -> np.ndarray:
        """uint8 input codes (..., K) -> int32 ``raw`` (..., N): eq. L4 then the zero-point corrections of eq. L5.

        N-D input is flattened to (M, K) as torch does, then :func:`accumulate_raw`. ``saturate_int16_pairs``
        (default: the layer's setting) sums the products in int16-saturated pairs as non-VNNI CPUs do. Every engine
        starts requantization from this same int32 (refquant.engines).
        """
        x2d_u8, packed, saturate, lead_shape = self._product_operands(x_u8, saturate_int16_pairs)
        raw_i32 = accumulate_raw(x2d_u8, packed, self.col_offsets, self.input_zero_point,
                                 self.weight_zero_points, saturate_int16_pairs=saturate)
        return raw_i32.reshape(lead_shape + (self.out_features,))

    def _product_operands(self, x_u8: np.ndarray, saturate_int16_pairs: bool | None
                          ) -> tuple[np.ndarray, PackedWeightS8, bool, tuple[int, ...]]:
        """Checked (M, K) codes, the packed weight and the pairs rule of one product; with eq. M2b's restart, both
        operands get its zero k (:class:`refquant.matmul.PairsRestart`)."""
        spec = ENGINE_SPECS[self.engine]
        x_u8 = _check_codes(x_u8, np.uint8, "x_u8", self.in_features, "in_features K", spec.min_input_ndim)
        if saturate_int16_pairs is None:
            saturate_int16_pairs = self.saturate_int16_pairs
        else:
            check_engine_options(self.engine, self.engine_options, bool(saturate_int16_pairs))
        lead_shape = x_u8.shape[:-1]
        x2d_u8 = np.ascontiguousarray(x_u8.reshape(-1, self.in_features))  # torch flattens N-D input to (M, K)
        packed = self._packed_weight
        if saturate_int16_pairs and self._pairs_restart is not None:  # eq. M2b: a zero k where the pairs restart
            x2d_u8, packed = self._pairs_restart.input(x2d_u8), self._pairs_restart.packed
        return x2d_u8, packed, bool(saturate_int16_pairs), lead_shape

    def requantize(self, acc_i32: np.ndarray, *, readable: bool | None = None) -> np.ndarray:
        """int32 ``raw`` (..., N) from :meth:`accumulate` -> uint8 output codes (..., N): the engine's
        requantization (fbgemm: eqs. L8-L11; qnnpack: QN5, QN6; onednn: DN4-DN7, refquant.engines).

        ``readable=True`` runs the NumPy statements, ``False`` the Numba kernel (the same bits), ``None`` (default)
        the NumPy statements for a few small inputs (refquant.engines.KERNEL_MIN_ELEMENTS), else the kernel.
        """
        spec = ENGINE_SPECS[self.engine]
        acc_i32 = _check_codes(acc_i32, np.int32, "acc_i32", self.out_features, "out_features N",
                               spec.min_input_ndim)
        return self.requantizer.requantize(acc_i32, readable=readable)

    def __call__(self, x_u8: np.ndarray, *, saturate_int16_pairs: bool | None = None) -> np.ndarray:
        """uint8 input codes (..., K) -> uint8 output codes (..., N) = requantize(accumulate(x_u8)).

        Computed in one pass by refquant.fused_linear (each tile of sums corrected and requantized while in cache,
        the same bits) when it serves the layer's requantization and the matmul runs a Numba kernel (not for the
        first few calls below refquant.matmul.KERNEL_MIN_MACS multiply-adds, whose product is the NumPy reference);
        else as the two stages. onednn returns an empty input's output with shape (0, N), whatever the input's rank,
        as torch does. Matches: torch.ops.quantized.linear (linear_relu when ``relu``) with
        torch.backends.quantized.engine.
        """
        saturate = self.saturate_int16_pairs if saturate_int16_pairs is None else bool(saturate_int16_pairs)
        macs = (x_u8.size if isinstance(x_u8, np.ndarray) else np.size(x_u8)) * self.out_features  # M·K·N: a few small calls run the stages in NumPy (matmul's
        # KERNEL_MIN_MACS; this question and the product's own both count towards its SMALL_CALLS)
        kernel = kernel_for(saturate_int16_pairs=saturate, macs=macs)  # once per call: it reads the environment
        spec = ENGINE_SPECS[self.engine]
        if kernel != "reference" and epilogue_registered(self.requantizer):
            x_u8 = _check_codes(x_u8, np.uint8, "x_u8", self.in_features, "in_features K", spec.min_input_ndim)
            if saturate_int16_pairs is not None:
                check_engine_options(self.engine, self.engine_options, saturate)
            x2d_u8 = x_u8 if x_u8.ndim == 2 else x_u8.reshape(-1, self.in_features)  # torch flattens N-D input
            if saturate and self._pairs_restart is not None:  # eq. M2b: a zero k where the pairs restart
                x2d_u8 = self._pairs_restart.input(x2d_u8)
                if self._fused_restart is None:
                    self._fused_restart = FusedLinear(self._pairs_restart.packed, self.col_offsets,
                                                      self.weight_zero_points)
                fused = self._fused_restart
            else:
                if self._fused is None:
                    self._fused = FusedLinear(self._packed_weight, self.col_offsets, self.weight_zero_points)
                fused = self._fused
            y_u8 = fused.run(x2d_u8, self.input_zero_point, self.requantizer.epilogue,
                             self.requantizer.epilogue_constants(), kernel, saturate_int16_pairs=saturate)
            if x_u8.ndim != 2:
                y_u8 = y_u8.reshape(x_u8.shape[:-1] + (self.out_features,))
        else:
            y_u8 = self.requantize(self.accumulate(x_u8, saturate_int16_pairs=saturate_int16_pairs))
        if spec.empty_output_is_2d and y_u8.size == 0:
            y_u8 = y_u8.reshape(0, self.out_features)  # qlinear.cpp: if (output.numel() == 0) return output;
        return y_u8

    def __repr__(self) -> str:
        return (f"QuantizedLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_qscheme={self.weight_qscheme!r}, input_scale={self.input_scale!r}, "
                f"input_zero_point={self.input_zero_point}, output_scale={self.output_scale!r}, "
                f"output_zero_point={self.output_zero_point}, relu={self.relu}, bias={self.bias is not None}"
                + (f", engine={self.engine!r}" if self.engine != "fbgemm" else "")
                + (f", requantization={self.requantization!r}"
                   if self.requantization != ENGINE_SPECS[self.engine].requantization else "")
                + (", saturate_int16_pairs=True" if self.saturate_int16_pairs else "")
                + (f", onednn_kernel={self.engine_options.onednn_kernel!r}"
                   if self.engine_options.onednn_kernel != "brgemm" else "")
                + (f", qnnpack_cached_output_scale={self.engine_options.qnnpack_cached_output_scale!r}"
                   if self.engine_options.qnnpack_cached_output_scale is not None else "") + ")")
