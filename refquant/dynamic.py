"""Dynamic quantization of a Linear: float32 in, float32 out, the input's scale and zero point chosen at every call.

What ``torch.ao.nn.quantized.dynamic.Linear`` (``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, i.e.
``torch.ops.quantized.linear_dynamic``) computes on the engines fbgemm, x86, qnnpack and onednn, written out step by
step. Notation as in refquant.linear: ``f32(...)`` rounds to float32, ``fmaf`` is a fused multiply-add (one
rounding), ``RNE`` is round half to even, ``f64`` is double; integer arithmetic is int32 and wraps modulo 2^32.

The weight, once (:meth:`DynamicQuantizedLinear.from_float`): the qconfig's weight observer, then quantize —
eqs. L1, L2 of refquant.linear (``default_dynamic_qconfig``: MinMaxObserver, qint8, per_tensor_symmetric;
``per_channel_dynamic_qconfig``: PerChannelMinMaxObserver(ch_axis=0), qint8, per_channel_symmetric). The bias stays
float32 and is never quantized, on every engine.

Every call, on every engine (x is flattened to (M, K) as torch does)::

    x_min, x_max = min(x), max(x)                        over the whole tensor, float32              (eq. DQ1)
    scale_f64, z_x = ChooseQuantizationParams(x_min, x_max, 0, 255, reduce_range)                    (eq. DQ2)
                     torch's quant_utils version, scale in double; see choose_quantization_params
    q_x   = quantize(x)                                   uint8 codes, per engine                     (eq. DQ3)
    raw   = Σ_k (q_x − z_x)·(q_w − z_w)                   int32 (refquant.linear eqs. L4, L5)        (eq. DQ4)
    y     = float output, per engine                      float32                                     (eq. DQ5)

Per engine (s_x is the float32 input scale the engine uses, s_w[n] the weight scales)::

    fbgemm, x86   reduce_range honoured (the module passes True: codes 0..127)
                  s_x = f32(scale_f64)
                  q_x = clamp(RNE(fmaf(x, f32(1/s_x), f32(z_x))), 0, 255)         eq. Q1 (the FMA quantize)  (DQ3a)
                  y   = fmaf(f32(raw), f32(s_x·s_w[n]), bias[n])   one rounding;  f32(f32(raw)·mult) without bias (DQ5a)
    qnnpack       reduce_range ignored (torch warns): codes 0..255 always
                  s_x = f32(scale_f64);  q_x as DQ3a (at::quantize_per_tensor)
                  y   = f32(f32(f32(s_w[n]·s_x)·f32(raw)) + bias[n])   two roundings; bias = zeros without bias (DQ5b)
    onednn        reduce_range honoured; every scale makes a reciprocal round trip in double:
                  s_x' = f32(1 / f64(f32(1 / scale_f64))),  s_w'[n] = f32(1 / f64(f32(1 / f64(s_w[n]))))
                  q_x = clamp(RNE(f32(f32(x·f32(1/s_x')) + f32(z_x))), 0, 255)    eq. Q1c, no FMA           (DQ3c)
                  y   = f32(f32(f32(raw)·s_x')·s_w'[n]) + bias[n]      kernel "brgemm_vnni"          (DQ5c)
                      = f32(f32(raw)·f32(s_x'·s_w'[n])) + bias[n]      kernel "brgemm_amx", not small (DQ5d)
                  (each product and the sum rounded to float32; no FMA; no add without bias)

Why the engines differ: fbgemm's compiled ReQuantizeForFloat contracts ``x·mult + bias`` into one ``vfmadd``; qnnpack
ignores reduce_range (8-bit codes, a scale half as large: its floats differ from fbgemm's by up to about half an
input step times Σ|w|, e.g. 0.055) and rounds twice; oneDNN receives reciprocal scales and, on AMX CPUs, combines
the two scales first for all but small shapes (:func:`onednn_kernel_for_shape`).

What depends on the CPU (everything else is the same on every x86-64 CPU that runs the engine):

* fbgemm/x86 with full 8-bit codes (``reduce_range=False``, never the module's choice) on a CPU without VNNI sums
  products in int16-saturated pairs (refquant.matmul eq. M2): ``saturate_int16_pairs=True``. With the module's
  7-bit codes a pair cannot saturate, so the module's results are the same everywhere (and on AVX2 CPUs without
  VNNI the fused call runs eq. M1 on eq. M2's avx2 kernel: refquant.matmul.kernel_for_seven_bit_codes).
* qnnpack runs its SSE2 kernel (``pytorch_q8gemm_dq_ukernel_4x4c2__sse2``: exact int16 products, int32 sums) on
  every x86-64 CPU: no ISA dependence.
* onednn chooses its matmul kernel by ISA (``onednn_kernel``): AMX CPUs run "brgemm_amx" (DQ5d) except for small
  shapes, which go to the VNNI kernel (DQ5c); VNNI CPUs (AVX-512 VNNI, AVX10, AVX-VNNI) run "brgemm_vnni" (DQ5c);
  AVX-512 CPUs without VNNI run "brgemm_no_vnni": DQ5c with int16-saturated pairs (eq. M2), which, as on fbgemm,
  matters only for 8-bit codes (reduce_range=False). AVX2 CPUs without VNNI run oneDNN's "gemm:jit"
  ("gemm_no_vnni"): DQ5d at every shape, with int16-saturated pairs that restart at its second K block
  (refquant.matmul eq. M2b, refquant.engines.onednn_gemm_pairs_restart), which again matter only for 8-bit codes.
  (Measured on an AMD EPYC Zen 3, AVX2 without VNNI, where oneDNN's verbose output names ``gemm:jit``.)

Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear_dynamic.cpp (PackedLinearWeight::
apply_dynamic_impl, PackedLinearWeightsQnnp::apply_dynamic_impl, PackedLinearWeightsOnednn::apply_dynamic_impl)
and torch/ao/nn/quantized/dynamic/modules/linear.py (Linear.forward, from_float).
"""

from __future__ import annotations

import math
import os
import struct
import warnings

import llvmlite.binding as llvm_binding
import numpy as np
from numba import njit

from refquant._float32 import fma_f32, fmaf
from refquant._threads import DEFAULT_THREADS, finish_item, item_to_try, share_items, take_item, threads_for
from refquant.fused_linear import FusedLinear, register_epilogue
from refquant.linear import accumulate_raw
from refquant.engines import onednn_gemm_pairs_restart
from refquant.matmul import (K_GROUP, SEVEN_BIT_MAX_CODE, PackedWeightS8, PairsRestart, kernel_for,
                             kernel_for_seven_bit_codes, pack_weight_s8, pairs_restart)
from refquant.observers import MinMaxObserver, PerChannelMinMaxObserver
import refquant.quantize
from refquant.quantize import (_quantize_fma_readable, _quantize_mul_add_readable, _quantize_padded_rows_kernel,
                               quantize_padded_rows,
                               quantize_per_channel, quantize_per_tensor)

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
"""The quantized engines ``torch.backends.quantized.engine`` can name (torch's x86 runs fbgemm for Linear)."""

WEIGHT_QSCHEMES = ("per_tensor_symmetric", "per_channel_symmetric", "per_tensor_affine", "per_channel_affine")
"""Weight qschemes of a qint8 dynamic Linear; onednn accepts only the symmetric ones (zero points 0)."""

ONEDNN_KERNELS = ("brgemm_amx", "brgemm_vnni", "brgemm_no_vnni", "gemm_no_vnni")
"""oneDNN matmul kernels refquant models (oneDNN's implementation names brg_matmul:<isa>, and gemm:jit on AVX2
CPUs): see the module docstring."""

SMALL_SCALE_THRESHOLD = np.float32(6.1e-5)
"""quant_utils' cut-off for tiny input scales ("fp16_min"), a float32 constant compared with a double scale."""

MODULE_REDUCE_RANGE = True
"""What ``torch.ao.nn.quantized.dynamic.Linear.forward`` (module version 4) passes to linear_dynamic."""


# ----------------------------------------------------------------------------------------------------------------
# eq. DQ1: the input's range (one pass; the readable form is x.min(), x.max())
# ----------------------------------------------------------------------------------------------------------------

def find_min_max_readable(x_f32: np.ndarray) -> tuple[np.float32, np.float32, bool]:
    """(min, max, all_finite) of a float32 array, eq. DQ1; (0, 0, True) for an empty one (fbgemm::FindMinMax).

    For finite input the order of comparisons cannot change a min or a max (only the sign of a zero result, which no
    later step can see). Matches: pytorch/FBGEMM src/QuantUtilsAvx2.cc (FindMinMax); qnnpack takes
    ``input.min()``, ``input.max()``, the same values.
    """
    if x_f32.size == 0:
        return np.float32(0), np.float32(0), True
    return np.float32(x_f32.min()), np.float32(x_f32.max()), bool(np.isfinite(x_f32).all())


@njit(cache=True, nogil=True)
def _min_max_bits_kernel(x_i32):
    """Eq. DQ1's reductions over the float32 bits ``x_i32`` (an int32 view, size >= 1): the smallest and largest
    bit pattern read as int32 (smin, smax) and the largest read as uint32 (umax). Three integer reductions, one
    instruction each per 8 lanes (a float32 min/max reduction does not vectorize without fast-math);
    :func:`min_max_from_bit_reductions` turns them into the min, the max and whether all are finite."""
    smin = np.int32(2147483647)
    smax = np.int32(-2147483648)
    umax = np.uint32(0)
    for i in range(x_i32.size):
        b = x_i32[i]
        smin = min(smin, b)
        smax = max(smax, b)
        umax = max(umax, np.uint32(b))
    return smin, smax, umax


@njit(cache=True, nogil=True)
def min_max_from_bit_reductions(smin, smax, umax):
    """(bits of the min, bits of the max, all finite) from :func:`_min_max_bits_kernel`'s reductions.

    A float32 with bits b is negative iff b < 0 as int32; positive floats sort as their int32 bits, negative ones
    in reverse (a larger magnitude is a larger uint32, INT32_MIN is −0). So: there is a negative iff smin < 0; then
    the min is the negative of largest magnitude, bits umax (negatives read as uint32 exceed every positive),
    else it is smin. There is a positive iff smax >= 0; then the max is smax, else the negative of smallest
    magnitude, smin. Non-finite (all exponent bits set): a positive one iff smax >= 0x7f800000, a negative one
    iff umax >= 0xff800000."""
    min_bits = np.int32(umax) if smin < 0 else smin
    max_bits = smax if smax >= 0 else smin
    finite = smax < np.int32(0x7F800000) and umax < np.uint32(0xFF800000)
    return min_bits, max_bits, finite


MIN_MAX_CHUNK = 1 << 15
"""Elements per item when the pool shares the min/max pass (128 KB of float32)."""

MIN_MAX_PARALLEL_MIN_SIZE = 1 << 19
"""Below this many elements (~80 us on one core) one thread does the min/max: a hand-off to the pool costs ~10-40 us."""


@njit(cache=True, nogil=True)
def _min_max_chunks_shared(claims_i64, thread, threads, x_i32, chunk, reductions_i32):
    """The pool's version (refquant._threads.share_items): chunk c (``chunk`` elements) -> reductions_i32[c] =
    :func:`_min_max_bits_kernel`'s (smin, smax, umax as int32 bits); the caller reduces the chunks'."""
    n_chunks = claims_i64.shape[0] - 1
    for j in range(n_chunks):
        c = item_to_try(j, n_chunks, thread, threads)
        if take_item(claims_i64, c):
            smin, smax, umax = _min_max_bits_kernel(x_i32[c * chunk:(c + 1) * chunk])
            reductions_i32[c, 0] = smin
            reductions_i32[c, 1] = smax
            reductions_i32[c, 2] = np.int32(umax)
            finish_item(claims_i64)


_INT32 = struct.Struct("<i")
_FLOAT32 = struct.Struct("<f")


def _bits_to_float32(bits) -> np.float32:
    """The float32 with these int32 bits, on the host."""
    return np.float32(_FLOAT32.unpack(_INT32.pack(int(bits)))[0])       # float32 -> double -> float32: exact


def find_min_max(x_f32: np.ndarray) -> tuple[np.float32, np.float32, bool]:
    """:func:`find_min_max_readable` in one Numba pass (same values; ``x_f32`` C-contiguous float32), shared by
    the cores (refquant._threads) from MIN_MAX_PARALLEL_MIN_SIZE elements on: a min and a max do not depend on
    the order in which the chunks are reduced."""
    if x_f32.size == 0:
        return np.float32(0), np.float32(0), True
    x_i32 = x_f32.reshape(-1).view(np.int32)
    n_chunks = -(-x_i32.size // MIN_MAX_CHUNK)
    threads = threads_for(n_chunks, DEFAULT_THREADS) if x_i32.size >= MIN_MAX_PARALLEL_MIN_SIZE else 1
    if threads == 1:
        smin, smax, umax = _min_max_bits_kernel(x_i32)
    else:
        reductions_i32 = np.empty((n_chunks, 3), np.int32)
        share_items(_min_max_chunks_shared, n_chunks, [(x_i32, MIN_MAX_CHUNK, reductions_i32)] * threads)
        smin, smax = reductions_i32[:, 0].min(), reductions_i32[:, 1].max()
        umax = reductions_i32[:, 2].view(np.uint32).max()
    min_bits, max_bits, finite = min_max_from_bit_reductions(np.int32(smin), np.int32(smax), np.uint32(umax))
    return _bits_to_float32(min_bits), _bits_to_float32(max_bits), bool(finite)


# ----------------------------------------------------------------------------------------------------------------
# eq. DQ2: from the range to (scale, zero_point) — torch's quant_utils::ChooseQuantizationParams
# ----------------------------------------------------------------------------------------------------------------

_RECIPROCAL_MAY_OVERFLOW = np.float32(1e-37)  # f32(1/s) <= 1e37 < FLT_MAX for every float32 s >= 1e-37


def choose_quantization_params(x_min: float, x_max: float, qmin: int = 0, qmax: int = 255,
                               reduce_range: bool = False) -> tuple[float, int]:
    """(scale as a double, zero_point) for the input range [x_min, x_max], eq. DQ2::

        reduce_range:  qmin, qmax = qmin/2, qmax/2                                  (0..255 -> 0..127)
        min, max   = min(x_min, 0), max(x_max, 0)                                   float32: 0 stays exact
        scale      = (f64(max) − min) / (qmax − qmin)                               double
        scale      = 0.1        if f32(scale) == 0 or 1/f32(scale) is inf
        if scale < f64(f32(6.1e-5)):                                                tiny ranges, float32 steps
            org = f32(scale);  scale = f64(f32(6.1e-5))
            min == 0:  max = f32(6.1e-5f·(qmax − qmin))
            max == 0:  min = f32(−6.1e-5f·(qmax − qmin))
            else:      amp = f32(6.1e-5f / org);  min = f32(min·amp);  max = f32(max·amp)
        zp_min = qmin − min/scale;   err_min = |qmin| − |min/scale|                 double
        zp_max = qmax − max/scale;   err_max = |qmax| − |max/scale|
        z0     = zp_min if err_min < err_max else zp_max
        zero_point = qmin if z0 < qmin, qmax if z0 > qmax, else RNE(z0)             (nearbyint)

    This is NOT the observers' formula (refquant.observers, float32 division, eps) nor pytorch/FBGEMM
    src/QuantUtils.cc ChooseQuantizationParams (float scale, errors as |q| + |r/scale|): torch's op calls its own
    copy, which keeps the scale in double. Each engine then rounds the scale to float32 its own way.
    Raises ValueError for x_min > x_max (torch: "In ChooseQuantizationParams, min should be less than or equal
    to max") and for qmin >= qmax.
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/QuantUtils.h (quant_utils::ChooseQuantizationParams
    with preserve_sparsity = force_scale_power_of_two = false), as ``torch._choose_qparams_per_tensor`` also runs.
    """
    mn = np.float32(x_min)
    mx = np.float32(x_max)
    if not (math.isfinite(mn) and math.isfinite(mx)):
        raise ValueError(f"x_min and x_max must be finite, got {mn!r}, {mx!r}")
    if not mn <= mx:
        raise ValueError(f"x_min must be <= x_max (torch: 'In ChooseQuantizationParams, min should be less than or "
                         f"equal to max'), got {mn!r} > {mx!r}")
    qmin, qmax = int(qmin), int(qmax)
    if reduce_range:
        qmin, qmax = int(qmin / 2), int(qmax / 2)   # C++ integer division (truncates towards zero)
    if not qmin < qmax:
        raise ValueError(f"qmin must be < qmax, got [{qmin}, {qmax}]")
    zero = np.float32(0)
    mn = min(mn, zero)
    mx = max(mx, zero)
    scale = (float(mx) - float(mn)) / (qmax - qmin)                        # double
    scale_f32 = np.float32(scale)
    if scale_f32 < _RECIPROCAL_MAY_OVERFLOW:                                # 1/f32(scale) is finite above it
        with np.errstate(divide="ignore", over="ignore"):
            if scale_f32 == 0 or np.isinf(np.float32(1) / scale_f32):
                scale = 0.1
    if scale < float(SMALL_SCALE_THRESHOLD):
        org_scale_f32 = np.float32(scale)
        scale = float(SMALL_SCALE_THRESHOLD)
        if mn == 0:
            mx = np.float32(SMALL_SCALE_THRESHOLD * np.float32(qmax - qmin))
        elif mx == 0:
            mn = np.float32(-SMALL_SCALE_THRESHOLD * np.float32(qmax - qmin))
        else:
            amplifier_f32 = np.float32(SMALL_SCALE_THRESHOLD / org_scale_f32)
            mn = np.float32(mn * amplifier_f32)
            mx = np.float32(mx * amplifier_f32)
    zero_point_from_min = qmin - float(mn) / scale
    zero_point_from_max = qmax - float(mx) / scale
    zero_point_from_min_error = abs(qmin) - abs(float(mn) / scale)
    zero_point_from_max_error = abs(qmax) - abs(float(mx) / scale)
    initial_zero_point = (zero_point_from_min if zero_point_from_min_error < zero_point_from_max_error
                          else zero_point_from_max)
    if initial_zero_point < qmin:
        zero_point = qmin
    elif initial_zero_point > qmax:
        zero_point = qmax
    else:
        zero_point = int(np.rint(initial_zero_point))                      # nearbyint: round half to even
    return scale, zero_point


@njit(cache=True, nogil=True)
def _choose_quantization_params_kernel(mn, mx, qmin, qmax):
    """:func:`choose_quantization_params` for a checked range (float32 mn <= mx, finite) and checked bounds
    (reduce_range already applied, qmin < qmax), step by step the same: float32 values where it keeps float32
    (Numba's float32 x float32 is float32; a product or quotient of two float32 rounded once to float32 equals the
    double one rounded to float32), double where it computes in double. Returns (scale as double, zero_point)."""
    zero = np.float32(0)
    mn = min(mn, zero)
    mx = max(mx, zero)
    scale = (np.float64(mx) - np.float64(mn)) / np.float64(qmax - qmin)  # double
    scale_f32 = np.float32(scale)
    if scale_f32 == 0 or np.isinf(np.float32(np.float32(1) / scale_f32)):
        scale = 0.1
    threshold = np.float32(SMALL_SCALE_THRESHOLD)
    if scale < np.float64(threshold):
        org_scale_f32 = np.float32(scale)
        scale = np.float64(threshold)
        if mn == 0:
            mx = np.float32(threshold * np.float32(qmax - qmin))
        elif mx == 0:
            mn = np.float32(-threshold * np.float32(qmax - qmin))
        else:
            amplifier_f32 = np.float32(threshold / org_scale_f32)
            mn = np.float32(mn * amplifier_f32)
            mx = np.float32(mx * amplifier_f32)
    zero_point_from_min = qmin - np.float64(mn) / scale
    zero_point_from_max = qmax - np.float64(mx) / scale
    zero_point_from_min_error = abs(qmin) - abs(np.float64(mn) / scale)
    zero_point_from_max_error = abs(qmax) - abs(np.float64(mx) / scale)
    initial_zero_point = (zero_point_from_min if zero_point_from_min_error < zero_point_from_max_error
                          else zero_point_from_max)
    if initial_zero_point < qmin:
        zero_point = qmin
    elif initial_zero_point > qmax:
        zero_point = qmax
    else:
        zero_point = int(np.rint(initial_zero_point))                      # nearbyint: round half to even
    return scale, zero_point


# ----------------------------------------------------------------------------------------------------------------
# Scales as each engine uses them
# ----------------------------------------------------------------------------------------------------------------

def onednn_scale_round_trip(scale_f64: np.ndarray | float) -> np.ndarray:
    """s' = f32(1 / f64(f32(1 / f64(s)))): a scale after the reciprocal torch hands oneDNN and the reciprocal
    ideep takes back ("Scales of ONEDNN and PyTorch are reciprocal"). Often s' == f32(s), not always.

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear_dynamic.cpp (``ideep::scale_t(1,
    1.0/q_params.scale)``), qlinear_prepack.cpp (weights: ``1.0 / q_scale()``), intel/ideep
    include/ideep/operators/matmul.hpp (do_prepare_dynamic_quant, do_compute_dynamic_quant: ``s = 1.0 / s``).
    """
    s_f64 = np.asarray(scale_f64, np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        reciprocal_f32 = np.asarray(1.0 / s_f64).astype(np.float32)         # scale_t holds floats
        return np.asarray(1.0 / reciprocal_f32.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# eqs. DQ1-DQ3 in one call, for inputs one thread handles (no Python between the steps)
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _input_scale_used_kernel(scale, onednn):
    """The float32 input scale the engine uses (see :meth:`DynamicQuantizedLinear.stages`): f32(scale), or on
    onednn :func:`onednn_scale_round_trip`'s f32(1 / f64(f32(1 / scale))) (scale >= 6.1e-5: no division by 0)."""
    if onednn:
        return np.float32(1.0 / np.float64(np.float32(1.0 / scale)))
    return np.float32(scale)


@njit(cache=True, nogil=True)
def _quantize_input_kernel(x2d_f32, qmin, qmax, onednn, out_u8, row_sums_i32):
    """Eqs. DQ1-DQ3 of a finite input in one call on one thread, from the kernels of each step: the min/max
    (:func:`_min_max_bits_kernel`), the qparams (:func:`_choose_quantization_params_kernel`, bounds with
    reduce_range applied), the scale the engine uses (:func:`_input_scale_used_kernel`) and the quantized padded
    rows (refquant.quantize._quantize_padded_rows_kernel: eq. Q1, or Q1c on onednn).
    Returns (finite, x_min, x_max, scale, zero_point, s_x_f32); when not finite, nothing after the min/max ran."""
    smin, smax, umax = _min_max_bits_kernel(x2d_f32.reshape(-1).view(np.int32))
    bits = np.empty(2, np.int32)
    bits[0], bits[1], finite = min_max_from_bit_reductions(smin, smax, umax)
    x_min, x_max = bits.view(np.float32)[0], bits.view(np.float32)[1]
    if not finite:
        return False, x_min, x_max, 0.0, 0, np.float32(0)
    scale, zero_point = _choose_quantization_params_kernel(x_min, x_max, qmin, qmax)
    s_x_f32 = _input_scale_used_kernel(scale, onednn)
    inv_f32 = np.float32(np.float32(1) / s_x_f32)                          # eq. Q0
    _quantize_padded_rows_kernel(x2d_f32, inv_f32, np.float32(zero_point), not onednn, out_u8, row_sums_i32, 0,
                                 x2d_f32.shape[0])
    return True, x_min, x_max, scale, zero_point, s_x_f32


# ----------------------------------------------------------------------------------------------------------------
# eq. DQ5: the float output, per element (inline functions a fused kernel can call) and over (M, N)
# ----------------------------------------------------------------------------------------------------------------

FORMULAS = ("fbgemm", "qnnpack", "onednn_two_multiplies", "onednn_combined_scale")
"""The four float-output formulas (eqs. DQ5a, DQ5b, DQ5c, DQ5d), in the order of the kernel's ``formula`` code."""


@njit(inline="always")
def fbgemm_output_element(raw_i32, mult_f32, bias_f32, has_bias):
    """Eq. DQ5a: fmaf(f32(raw), mult, bias), or f32(f32(raw)·mult) without bias (requantizeForFloatAvx2)."""
    raw_f32 = np.float32(raw_i32)
    if has_bias:
        return fma_f32(raw_f32, mult_f32, bias_f32)
    return np.float32(raw_f32 * mult_f32)


@njit(inline="always")
def qnnpack_output_element(raw_i32, mult_f32, bias_f32):
    """Eq. DQ5b: f32(f32(mult·f32(raw)) + bias); qnnpack always adds a bias (zeros without one)."""
    return np.float32(np.float32(mult_f32 * np.float32(raw_i32)) + bias_f32)


@njit(inline="always")
def onednn_two_multiplies_element(raw_i32, s_x_f32, s_w_f32, bias_f32, has_bias):
    """Eq. DQ5c: f32(f32(f32(raw)·s_x')·s_w') [+ bias] (oneDNN's brgemm kernel, VNNI)."""
    t_f32 = np.float32(np.float32(np.float32(raw_i32) * s_x_f32) * s_w_f32)
    if has_bias:
        return np.float32(t_f32 + bias_f32)
    return t_f32


@njit(inline="always")
def onednn_combined_scale_element(raw_i32, mult_f32, bias_f32, has_bias):
    """Eq. DQ5d: f32(f32(raw)·f32(s_x'·s_w')) [+ bias] (oneDNN's brgemm kernel, AMX)."""
    t_f32 = np.float32(np.float32(raw_i32) * mult_f32)
    if has_bias:
        return np.float32(t_f32 + bias_f32)
    return t_f32


# The four formulas as epilogues of refquant.fused_linear (registered as "dynamic_<formula>"), with the
# per-call constants (s_x_f32, s_w_f32 (N,), mult_f32 (N,) = f32(s_x·s_w), bias_f32 (N,), has_bias).

@njit(cache=True, inline="always")
def fbgemm_output_channel(raw_i32, n, constants):
    s_x_f32, s_w_f32, mult_f32, bias_f32, has_bias = constants
    return fbgemm_output_element(raw_i32, mult_f32[n], bias_f32[n], has_bias)


@njit(cache=True, inline="always")
def qnnpack_output_channel(raw_i32, n, constants):
    s_x_f32, s_w_f32, mult_f32, bias_f32, has_bias = constants
    return qnnpack_output_element(raw_i32, mult_f32[n], bias_f32[n])


@njit(cache=True, inline="always")
def onednn_two_multiplies_channel(raw_i32, n, constants):
    s_x_f32, s_w_f32, mult_f32, bias_f32, has_bias = constants
    return onednn_two_multiplies_element(raw_i32, s_x_f32, s_w_f32[n], bias_f32[n], has_bias)


@njit(cache=True, inline="always")
def onednn_combined_scale_channel(raw_i32, n, constants):
    s_x_f32, s_w_f32, mult_f32, bias_f32, has_bias = constants
    return onednn_combined_scale_element(raw_i32, mult_f32[n], bias_f32[n], has_bias)


EPILOGUE_FUNCTIONS = {"fbgemm": fbgemm_output_channel, "qnnpack": qnnpack_output_channel,
                      "onednn_two_multiplies": onednn_two_multiplies_channel,
                      "onednn_combined_scale": onednn_combined_scale_channel}
"""Each formula's epilogue function for refquant.fused_linear, registered there as "dynamic_<formula>"."""
for _formula, _fn in EPILOGUE_FUNCTIONS.items():
    register_epilogue(f"dynamic_{_formula}", _fn)
del _formula, _fn


def float_output_constants(s_x_f32: np.float32, s_w_f32: np.ndarray, bias_f32: np.ndarray | None) -> tuple:
    """The constants of the epilogue functions and of the row kernel: (s_x, s_w, f32(s_x·s_w), bias or zeros,
    has_bias)."""
    s_x_f32 = np.float32(s_x_f32)
    with np.errstate(over="ignore", under="ignore"):
        mult_f32 = (s_x_f32 * s_w_f32).astype(np.float32)                   # f32(s_x·s_w): commutative
    has_bias = bias_f32 is not None
    bias = bias_f32 if has_bias else np.zeros(s_w_f32.shape[0], np.float32)
    return s_x_f32, s_w_f32, mult_f32, bias, has_bias


@njit(cache=True)
def _float_output_kernel(raw_i32, formula, s_x_f32, s_w_f32, mult_f32, bias_f32, has_bias, out_f32):
    """Eqs. DQ5a-d over an (M, N) int32 ``raw``: the per-element functions above, row by row."""
    M, N = raw_i32.shape
    for m in range(M):
        for n in range(N):
            r = raw_i32[m, n]
            if formula == 0:
                out_f32[m, n] = fbgemm_output_element(r, mult_f32[n], bias_f32[n], has_bias)
            elif formula == 1:
                out_f32[m, n] = qnnpack_output_element(r, mult_f32[n], bias_f32[n])
            elif formula == 2:
                out_f32[m, n] = onednn_two_multiplies_element(r, s_x_f32, s_w_f32[n], bias_f32[n], has_bias)
            else:
                out_f32[m, n] = onednn_combined_scale_element(r, mult_f32[n], bias_f32[n], has_bias)


def float_output_readable(raw_i32: np.ndarray, formula: str, s_x_f32: np.float32, s_w_f32: np.ndarray,
                          bias_f32: np.ndarray | None) -> np.ndarray:
    """(M, N) int32 ``raw`` -> float32 output, eqs. DQ5a-d, one NumPy statement per rounding.

    ``s_x_f32`` is the float32 input scale the engine uses, ``s_w_f32`` the (N,) float32 weight scales it uses (for
    onednn both after :func:`onednn_scale_round_trip`). ``formula`` is one of :data:`FORMULAS`.
    Matches: pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeForFloatAvx2: ``_mm256_mul_ps`` then ``_mm256_add_ps``,
    contracted into one vfmadd in torch 2.13's binary); pytorch/pytorch aten/src/ATen/native/quantized/cpu/qnnpack/
    src/q8gemm/4x4c2-dq-sse2.c (``_mm_mul_ps(vmultiplier, cvtepi32_ps(acc))`` then ``_mm_add_ps(vbias)``); oneDNN
    brg_matmul (verified against torch: tests/test_dynamic.py).
    """
    raw_f32 = raw_i32.astype(np.float32)                                    # cvtdq2ps: RNE once |raw| > 2^24
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if formula == "fbgemm":
            mult_f32 = (s_x_f32 * s_w_f32).astype(np.float32)               # r.A_scale * r.B_scale, float
            if bias_f32 is None:
                return (raw_f32 * mult_f32).astype(np.float32)
            return fmaf(raw_f32, mult_f32, bias_f32)                        # one rounding
        if formula == "qnnpack":
            mult_f32 = (s_w_f32 * s_x_f32).astype(np.float32)               # generate_requantization_scales
            bias = np.zeros(s_w_f32.shape, np.float32) if bias_f32 is None else bias_f32
            t_f32 = (mult_f32 * raw_f32).astype(np.float32)
            return (t_f32 + bias).astype(np.float32)
        if formula == "onednn_two_multiplies":
            t_f32 = ((raw_f32 * s_x_f32).astype(np.float32) * s_w_f32).astype(np.float32)
        elif formula == "onednn_combined_scale":
            t_f32 = (raw_f32 * (s_x_f32 * s_w_f32).astype(np.float32)).astype(np.float32)
        else:
            raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
        return t_f32 if bias_f32 is None else (t_f32 + bias_f32).astype(np.float32)


def float_output_fast(raw_i32: np.ndarray, formula: str, s_x_f32: np.float32, s_w_f32: np.ndarray,
                      bias_f32: np.ndarray | None) -> np.ndarray:
    """:func:`float_output_readable` as one Numba pass (the same bits)."""
    code = FORMULAS.index(formula)
    s_x_f32, s_w_f32, mult_f32, bias, has_bias = float_output_constants(s_x_f32, s_w_f32, bias_f32)
    out_f32 = np.empty(raw_i32.shape, np.float32)
    _float_output_kernel(np.ascontiguousarray(raw_i32), code, s_x_f32, s_w_f32, mult_f32, bias, has_bias, out_f32)
    return out_f32


# ----------------------------------------------------------------------------------------------------------------
# oneDNN's kernel choice
# ----------------------------------------------------------------------------------------------------------------

def onednn_kernel_for_shape(kernel: str, M: int, K: int, N: int) -> str:
    """The output formula oneDNN's matmul uses for an (M, K) x (K, N) problem on a CPU whose best kernel is
    ``kernel``: "onednn_combined_scale" (DQ5d) for "brgemm_amx" unless the shape is small, else
    "onednn_two_multiplies" (DQ5c). Small shapes (int8, 2-D) are dispatched from AMX to the VNNI kernel::

        small = (M == 1 and K == 256) or (M <= 32 and M·N <= 256) or K <= 16

    Matches: oneapi-src/oneDNN src/cpu/x64/matmul/brgemm_matmul_utils.cpp (init_brgemm_matmul_conf, "Dispatch small
    shapes to VNNI for better performance"); torch reshapes an N-D input to 2-D first, so M counts all rows.
    """
    if kernel not in ONEDNN_KERNELS:
        raise ValueError(f"onednn_kernel must be one of {ONEDNN_KERNELS}, got {kernel!r}")
    if kernel == "brgemm_amx":
        small = (M == 1 and K == 256) or (M <= 32 and M * N <= 256) or K <= 16
        return "onednn_two_multiplies" if small else "onednn_combined_scale"
    if kernel == "gemm_no_vnni":  # gemm:jit multiplies by the scales' product at every shape
        return "onednn_combined_scale"
    return "onednn_two_multiplies"


def default_onednn_kernel() -> str | None:
    """The oneDNN matmul kernel family this CPU runs: "brgemm_amx", "brgemm_vnni", "brgemm_no_vnni",
    "gemm_no_vnni" (AVX2 without VNNI: gemm:jit), or None for a CPU without AVX2, whose path refquant does not model.

    From the CPU's features (llvmlite's host features), capped by the environment variable ONEDNN_MAX_CPU_ISA
    (oneDNN's own switch; DNNL_MAX_CPU_ISA is its old name). This predicts what oneDNN picks; a test that needs
    certainty asks oneDNN itself (its verbose output names the implementation, e.g. ``brg_matmul:avx10_1_512_amx``).
    """
    features = llvm_binding.get_host_cpu_features()
    if features.get("amx-int8", False) and features.get("amx-tile", False):
        best = "brgemm_amx"
    elif features.get("avx512vnni", False) or features.get("avxvnni", False):
        best = "brgemm_vnni"
    elif features.get("avx512bw", False):
        best = "brgemm_no_vnni"
    elif features.get("avx2", False):
        best = "gemm_no_vnni"
    else:
        return None
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap in ("ALL", "DEFAULT") or "AMX" in cap:
        return best
    order = [None, "gemm_no_vnni", "brgemm_no_vnni", "brgemm_vnni", "brgemm_amx"]
    if cap in ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX2_VNNI",
               "AVX2_VNNI_2", "AVX10_2_512"):
        limit = "brgemm_vnni"
    elif cap == "AVX512_CORE":
        limit = "brgemm_no_vnni"
    elif cap == "AVX2":
        limit = "gemm_no_vnni"
    else:
        return None
    return min(best, limit, key=order.index)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------

def _check_engine(engine: object) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (torch.backends.quantized.engine), got {engine!r}")
    return str(engine)


def _check_reduce_range(reduce_range: object) -> bool | None:
    if reduce_range is None or isinstance(reduce_range, (bool, np.bool_)):
        return None if reduce_range is None else bool(reduce_range)
    raise TypeError(f"reduce_range must be None (what the engine's module uses), True or False, got "
                    f"{type(reduce_range).__name__} {reduce_range!r}")


def _check_float_weight(weight: object) -> np.ndarray:
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weight must be a real float array (float32, as torch's Linear.weight), got dtype {w.dtype}")
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be 2-D (out_features, in_features) and non-empty, got shape {w.shape}")
    with np.errstate(over="ignore"):
        w_f32 = np.ascontiguousarray(w, dtype=np.float32)                  # from_float quantizes weight.float()
    if not np.isfinite(w_f32).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w_f32))[0])
        raise ValueError(f"weight must be finite (as float32); weight{list(bad)} = {w_f32[bad]!r}")
    return w_f32


def _check_bias(bias: object, out_features: int) -> np.ndarray | None:
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype.kind not in "fiu":
        raise TypeError(f"bias must be None or a real float array (float32), got dtype {b.dtype}")
    if b.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},) (one value per output feature), got {b.shape}")
    with np.errstate(over="ignore"):
        b_f32 = np.ascontiguousarray(b, dtype=np.float32)                  # never quantized: a float32 vector
    if not np.isfinite(b_f32).all():
        i = int(np.argwhere(~np.isfinite(b_f32))[0, 0])
        raise ValueError(f"bias must be finite (as float32); bias[{i}] = {b_f32[i]!r}")
    return b_f32


def _check_input(x: object, in_features: int) -> np.ndarray:
    """torch's checks on linear_dynamic's input, with refquant's refusal of non-finite values done later."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a float32 numpy array (..., in_features), got {type(x).__name__}")
    if x.dtype != np.float32:
        # torch: "expected scalar type Float but found Double" (fbgemm), "Quantize only works on Float Tensor" (qnnpack)
        raise TypeError(f"x must be float32 (torch's dynamic Linear takes Float tensors), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., in_features) (torch: 'The dimension of input "
                         f"tensor should be larger than or equal to 2'), got shape {x.shape}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features = {in_features}, got shape {x.shape}")
    return np.ascontiguousarray(x)                                          # input.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------

class DynamicQuantizedLinear:
    """A dynamically quantized Linear on one engine: float32 (..., K) -> float32 (..., N), bit for bit as torch's
    ``torch.ao.nn.quantized.dynamic.Linear`` with ``torch.backends.quantized.engine = engine``::

        dql = DynamicQuantizedLinear.from_float(w, b, engine="fbgemm")     # default_dynamic_qconfig's weights
        y = dql(x)                                                          # == torch's module(x), bits
        st = dql.stages(x)                                                  # every per-call intermediate

    Args (of the constructor; :meth:`from_float` and :meth:`from_quantized` are the usual entry points):
        weight_int8: (N, K) int8 weight codes.
        weight_scales: one scale (per tensor) or N scales (per channel), kept as float64 as torch's quantized weight
            tensor holds them; each engine rounds them its own way.
        weight_zero_points: one or N int8 zero points (all 0 for the symmetric qschemes; onednn requires 0).
        bias: float32 (N,) or None.
        engine: "fbgemm", "x86", "qnnpack" or "onednn".
        reduce_range: None = what the engine's module does (True; qnnpack ignores it and uses 0..255); True/False as
            passed to ``torch.ops.quantized.linear_dynamic`` (qnnpack warns and ignores True, as torch does).
        saturate_int16_pairs: fbgemm/x86 only: sum products in int16-saturated pairs as a CPU without VNNI does
            (refquant.matmul eq. M2); it can change results only with ``reduce_range=False``.
        onednn_kernel: onednn only: "brgemm_amx", "brgemm_vnni", "brgemm_no_vnni" or "gemm_no_vnni" (see the
            module docstring);
            None = :func:`default_onednn_kernel` for this CPU.

    Attributes: in_features, out_features, engine, reduce_range (the effective one), weight_qscheme, weight_int8,
    weight_scales (float64), weight_zero_points (int32), bias, col_offsets (int32, eq. L3 of refquant.linear),
    weight_scales_used (float32, what the engine multiplies by), onednn_kernel.
    """

    def __init__(self, weight_int8: np.ndarray, weight_scales: object, weight_zero_points: object, bias: object,
                 engine: str = "x86", reduce_range: bool | None = None, *, saturate_int16_pairs: bool = False,
                 onednn_kernel: str | None = None) -> None:
        self.engine = _check_engine(engine)
        requested = _check_reduce_range(reduce_range)
        if not isinstance(weight_int8, np.ndarray) or weight_int8.dtype != np.int8:
            got = weight_int8.dtype if isinstance(weight_int8, np.ndarray) else type(weight_int8).__name__
            raise TypeError(f"weight_int8 must be a numpy int8 array of weight codes (qint8 int_repr()), got {got}")
        if weight_int8.ndim != 2 or 0 in weight_int8.shape:
            raise ValueError(f"weight_int8 must be 2-D (out_features, in_features), non-empty, got "
                             f"{weight_int8.shape}")
        N, K = weight_int8.shape

        scales = np.asarray(weight_scales)
        if scales.dtype.kind != "f" or scales.size not in (1, N):
            raise ValueError(f"weight_scales must hold 1 (per tensor) or N = {N} (per channel) float scales, got "
                             f"dtype {scales.dtype}, shape {scales.shape}")
        scales_f64 = scales.reshape(-1).astype(np.float64)
        scales_f32 = scales_f64.astype(np.float32)
        if not (np.isfinite(scales_f64).all() and (scales_f64 > 0).all() and np.isfinite(scales_f32).all()
                and (scales_f32 > 0).all()):
            raise ValueError(f"weight_scales must be finite and > 0 (also as float32), got {scales_f64}")
        zps = np.asarray(weight_zero_points)
        if zps.dtype.kind not in "iu" or zps.size != scales_f64.size:
            raise ValueError(f"weight_zero_points must hold {scales_f64.size} integer(s), one per weight scale, got "
                             f"dtype {zps.dtype}, shape {zps.shape}")
        zps_i64 = zps.reshape(-1).astype(np.int64)
        if ((zps_i64 < -128) | (zps_i64 > 127)).any():
            raise ValueError(f"weight_zero_points must be qint8 zero points in [-128, 127], got {zps_i64}")
        symmetric = bool((zps_i64 == 0).all())
        if self.engine == "onednn" and not symmetric:
            # torch: "quantized::linear_prepack: ONEDNN only supports symmetric quantization of weight, whose zero
            # point must be 0"
            raise ValueError(f"weight_zero_points must all be 0 on onednn (it supports only symmetric weights), got "
                             f"{zps_i64}")
        per_channel = scales_f64.size == N and N > 1
        self.weight_qscheme = ("per_channel_" if per_channel else "per_tensor_") + (
            "symmetric" if symmetric else "affine")

        self.in_features = K
        self.out_features = N
        self.weight_int8 = np.ascontiguousarray(weight_int8)
        self.weight_scales = scales_f64
        self.weight_zero_points = zps_i64.astype(np.int32)
        self.bias = _check_bias(bias, N)
        # eq. L3 of refquant.linear: col_offsets[n] = Σ_k q_w[n, k] − z_w[n]·K, int32
        row_sum_w_i64 = self.weight_int8.sum(axis=1, dtype=np.int64)
        self.col_offsets = (row_sum_w_i64 - np.broadcast_to(zps_i64, (N,)) * np.int64(K)).astype(np.int32)
        self._weight_zero_points_n = np.ascontiguousarray(np.broadcast_to(self.weight_zero_points, (N,)))
        self._packed_weight: PackedWeightS8 = pack_weight_s8(self.weight_int8)
        self._fused = None  # refquant.fused_linear.FusedLinear, made at the first call
        self._fused_restart = None  # the same for eq. M2b's operands (gemm:jit, 8-bit codes)
        self._bias_or_zeros = None  # the bias, or N zeros: float_output_constants' fourth entry, made once
        # x's rows as the product's tiles read them: whole groups of K_GROUP bytes (refquant.matmul.padded_rows)
        self._lda = self._packed_weight.panels_i8.shape[1] * K_GROUP

        # reduce_range and the scales as the engine uses them
        if self.engine == "qnnpack":
            if requested:
                warnings.warn("qnnpack ignores reduce_range=True (torch: 'Currently, qnnpack incorrectly ignores "
                              "reduce_range when it is set to true; this may change in a future release.'): the "
                              "input uses codes 0..255", UserWarning, stacklevel=2)
            self.reduce_range = False
        else:
            self.reduce_range = MODULE_REDUCE_RANGE if requested is None else requested
        if self.engine == "onednn":
            weight_scales_used = onednn_scale_round_trip(scales_f64)
        else:
            weight_scales_used = scales_f32                                 # prepack keeps float scales
        self.weight_scales_used = np.ascontiguousarray(np.broadcast_to(weight_scales_used, (N,)))

        if saturate_int16_pairs and self.engine not in ("fbgemm", "x86"):
            raise ValueError(f"saturate_int16_pairs applies to fbgemm/x86 only (onednn: onednn_kernel="
                             f"'brgemm_no_vnni'; qnnpack never saturates), got engine {self.engine!r}")
        self.saturate_int16_pairs = bool(saturate_int16_pairs)
        if self.engine == "onednn":
            if onednn_kernel is None:
                onednn_kernel = default_onednn_kernel()
                if onednn_kernel is None:
                    raise NotImplementedError("this CPU (or ONEDNN_MAX_CPU_ISA) runs an int8 path of oneDNN below "
                                              "AVX2, which refquant does not model; pass onednn_kernel= "
                                              "to model another CPU")
            elif onednn_kernel not in ONEDNN_KERNELS:
                raise ValueError(f"onednn_kernel must be None or one of {ONEDNN_KERNELS}, got {onednn_kernel!r}")
        elif onednn_kernel is not None:
            raise ValueError(f"onednn_kernel applies to engine 'onednn' only, got engine {self.engine!r}")
        self.onednn_kernel = onednn_kernel
        # gemm:jit restarts its int16 pairs at its second K block (refquant.matmul eq. M2b); 7-bit codes
        # (reduce_range) never saturate a pair, so there the restart changes nothing and is skipped
        restart_k = (onednn_gemm_pairs_restart(K) if onednn_kernel == "gemm_no_vnni" and not self.reduce_range
                     else None)
        self._pairs_restart: PairsRestart | None = pairs_restart(self.weight_int8, restart_k)
        # the input's code range (eq. DQ2 with reduce_range applied), and up to which size one Numba call does
        # eqs. DQ1-DQ3 (_quantize_input_kernel) rather than the steps shared by the pool
        self._input_qmin, self._input_qmax = (0, 127) if self.reduce_range else (0, 255)
        self._one_call_max_size = (min(MIN_MAX_PARALLEL_MIN_SIZE, refquant.quantize.QUANTIZE_PARALLEL_MIN_SIZE)
                                   if threads_for(2, DEFAULT_THREADS) > 1 else np.inf)

    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight: object, bias: object, engine: str = "x86", reduce_range: bool | None = None,
                   weight_qscheme: str = "per_tensor_symmetric", **kwargs) -> "DynamicQuantizedLinear":
        """Observe and quantize a float32 (N, K) weight as torch's dynamic ``Linear.from_float`` does.

        ``weight_qscheme="per_tensor_symmetric"`` is ``default_dynamic_qconfig`` (what ``quantize_dynamic(model,
        {nn.Linear}, dtype=torch.qint8)`` uses): ``MinMaxObserver(dtype="qint8", qscheme=...)``, then
        ``quantize_per_tensor(w, scale, zero_point, "qint8")``. ``"per_channel_symmetric"`` is
        ``per_channel_dynamic_qconfig``: ``PerChannelMinMaxObserver(ch_axis=0, ...)``, then
        ``quantize_per_channel``. The affine qschemes work the same way (fbgemm, x86, qnnpack). ``kwargs`` go to
        the constructor (``saturate_int16_pairs``, ``onednn_kernel``).

        Matches: pytorch/pytorch torch/ao/nn/quantized/dynamic/modules/linear.py (Linear.from_float),
        torch/ao/nn/quantized/modules/utils.py (_quantize_weight), torch/ao/quantization/qconfig.py
        (default_dynamic_qconfig, per_channel_dynamic_qconfig).
        """
        if weight_qscheme not in WEIGHT_QSCHEMES:
            raise ValueError(f"weight_qscheme must be one of {WEIGHT_QSCHEMES}, got {weight_qscheme!r}")
        _check_engine(engine)
        if engine == "onednn" and weight_qscheme.endswith("affine"):
            raise ValueError(f"weight_qscheme must be symmetric on onednn (it supports only zero weight zero "
                             f"points), got {weight_qscheme!r}")
        w_f32 = _check_float_weight(weight)
        if weight_qscheme.startswith("per_channel"):
            observer = PerChannelMinMaxObserver(ch_axis=0, dtype="qint8", qscheme=weight_qscheme)
            observer(w_f32)
            scales, zero_points = observer.calculate_qparams()
            w_i8 = quantize_per_channel(w_f32, scales, zero_points, 0, "qint8")
        else:
            observer = MinMaxObserver(dtype="qint8", qscheme=weight_qscheme)
            observer(w_f32)
            scales, zero_points = observer.calculate_qparams()
            w_i8 = quantize_per_tensor(w_f32, float(np.asarray(scales).reshape(-1)[0]),
                                       int(np.asarray(zero_points).reshape(-1)[0]), "qint8")
        return cls(w_i8, np.asarray(scales, np.float64), np.asarray(zero_points), bias, engine, reduce_range,
                   **kwargs)

    @classmethod
    def from_quantized(cls, weight_int8: np.ndarray, weight_scales: object, weight_zero_points: object,
                       bias: object, engine: str = "x86", reduce_range: bool | None = None,
                       **kwargs) -> "DynamicQuantizedLinear":
        """From weight codes that are already quantized (torch's ``weight().int_repr()``, ``q_scale()`` or
        ``q_per_channel_scales()``, and the zero points): what ``torch.ops.quantized.linear_prepack`` packs.
        One scale means per tensor, N scales per channel."""
        return cls(weight_int8, weight_scales, weight_zero_points, bias, engine, reduce_range, **kwargs)

    # ------------------------------------------------------------------------------------------------------------

    def input_qparams(self, x_min: float, x_max: float) -> tuple[float, int]:
        """(scale as double, zero_point) this engine chooses for an input range, eq. DQ2 (reduce_range applied)."""
        return choose_quantization_params(x_min, x_max, 0, 255, reduce_range=self.reduce_range)

    def stages(self, x: np.ndarray, *, readable: bool = False) -> dict[str, object]:
        """Every per-call intermediate of ``self(x)``:

        ``x_min``, ``x_max`` (float32, eq. DQ1), ``input_scale`` (the double of eq. DQ2), ``input_zero_point``,
        ``input_scale_used`` (float32: f32(scale), or onednn's round trip), ``input_codes`` (uint8 (..., K), eq.
        DQ3), ``accumulators`` (int32 (..., N): raw of eq. DQ4, after the zero-point corrections),
        ``output_formula`` (which of eqs. DQ5a-d), ``output`` (float32 (..., N)).
        ``readable=True`` runs the NumPy statements instead of the Numba kernels (the same bits).

        An empty batch gives an empty output; on onednn of shape (0, N) whatever the input's rank, as torch's
        (PackedLinearWeightsOnednn::apply_dynamic_impl returns before it reshapes). Non-finite inputs are refused
        (ValueError): torch's answer depends on where the NaN sits (an error when it
        is x[0], otherwise codes from a range that ignored it), and inf gives inf/NaN outputs.
        """
        q = self._quantized_input(x, readable)
        x2d_u8, input_zero_point, s_x_f32, M = q["x2d_u8"], q["input_zero_point"], q["input_scale_used"], q["M"]
        K, N = self.in_features, self.out_features
        lead_shape = q["lead_shape"]
        x_min, x_max, input_scale = q["x_min"], q["x_max"], q["input_scale"]
        x = q["x"]
        product_x_u8, packed = x2d_u8, self._packed_weight
        if self._pairs_restart is not None:  # eq. M2b: a zero k where gemm:jit's pairs restart
            product_x_u8, packed = self._pairs_restart.input(x2d_u8), self._pairs_restart.packed
        raw_i32 = accumulate_raw(product_x_u8, packed, self.col_offsets, input_zero_point,           # eq. DQ4
                                 self._weight_zero_points_n, saturate_int16_pairs=self._saturates())

        formula = self._formula(M)                                                              # eq. DQ5
        output_fn = float_output_readable if readable else float_output_fast
        y2d_f32 = output_fn(raw_i32, formula, s_x_f32, self.weight_scales_used, self.bias)

        output_shape = lead_shape + (N,)
        if self.engine == "onednn" and M == 0:
            output_shape = (0, N)   # torch quirk, mirrored: onednn returns an empty 2-D output before its reshape
        return {
            "x_min": x_min, "x_max": x_max,
            "input_scale": input_scale, "input_zero_point": input_zero_point, "input_scale_used": s_x_f32,
            "input_codes": x2d_u8.reshape(x.shape),
            "accumulators": raw_i32.reshape(lead_shape + (N,)),
            "output_formula": formula,
            "output": y2d_f32.reshape(output_shape),
        }

    def _quantized_input(self, x: np.ndarray, readable: bool) -> dict[str, object]:
        """Eqs. DQ1-DQ3 of :meth:`stages`: the checked input, its range, qparams and uint8 codes (M, K).

        The fast path (``readable=False``) quantizes into the padded rows the product's tiles read
        (refquant.quantize.quantize_padded_rows, as fbgemm's PackAWithQuantRowOffset: codes, row sums and zero
        padding in one pass): ``x2d_u8`` is a view of ``x_padded_u8`` (M, lda), ``row_sums`` = Σ_k q_x[m, k]."""
        x = _check_input(x, self.in_features)
        K = self.in_features
        lead_shape = x.shape[:-1]
        x2d_f32 = x.reshape(-1, K)
        M = x2d_f32.shape[0]

        if not readable and 0 < x2d_f32.size < self._one_call_max_size:     # one thread: one Numba call
            x_padded_u8 = np.empty((M, self._lda), np.uint8)
            row_sums_i32 = np.empty(M, np.int32)
            finite, x_min, x_max, input_scale, input_zero_point, s_x_f32 = _quantize_input_kernel(
                x2d_f32, self._input_qmin, self._input_qmax, self.engine == "onednn", x_padded_u8, row_sums_i32)
            if finite:
                return {"x": x, "lead_shape": lead_shape, "M": M, "x_min": np.float32(x_min),
                        "x_max": np.float32(x_max), "input_scale": input_scale, "input_zero_point": input_zero_point,
                        "input_scale_used": np.float32(s_x_f32), "x2d_u8": x_padded_u8[:, :K],
                        "x_padded_u8": x_padded_u8, "row_sums": row_sums_i32}
            # not finite: the steps below raise the error

        x_min, x_max, finite = (find_min_max_readable if readable else find_min_max)(x2d_f32)   # eq. DQ1
        if not finite:
            bad = x2d_f32[~np.isfinite(x2d_f32)][0]
            raise ValueError(f"x must be finite; it contains {bad!r} (torch's dynamic Linear either fails or returns "
                             f"garbage there, depending on where the value sits: refquant refuses it)")
        input_scale, input_zero_point = self.input_qparams(x_min, x_max)                         # eq. DQ2

        if self.engine == "onednn":                                                             # eq. DQ3
            s_x_f32 = onednn_scale_round_trip(input_scale)[()]
            rounding = "multiply_then_add"
        else:
            s_x_f32 = np.float32(input_scale)
            rounding = "fbgemm_legacy_fma"
        inv_f32 = np.float32(1) / s_x_f32                                   # eq. Q0: s_x_f32 is finite and > 0
        zp_f32 = np.float32(input_zero_point)
        if readable:
            quantize = _quantize_mul_add_readable if rounding == "multiply_then_add" else _quantize_fma_readable
            x2d_u8 = quantize(x2d_f32, inv_f32, zp_f32, 0, 255).astype(np.uint8)
            x_padded_u8 = row_sums_i32 = None
        else:
            x_padded_u8, row_sums_i32 = quantize_padded_rows(x2d_f32, inv_f32, zp_f32, self._lda, rounding)
            x2d_u8 = x_padded_u8[:, :K]

        return {"x": x, "lead_shape": lead_shape, "M": M, "x_min": x_min, "x_max": x_max, "input_scale": input_scale,
                "input_zero_point": input_zero_point, "input_scale_used": s_x_f32, "x2d_u8": x2d_u8,
                "x_padded_u8": x_padded_u8, "row_sums": row_sums_i32}

    def _formula(self, M: int) -> str:
        """Which of eqs. DQ5a-d this call's output uses."""
        if self.engine == "onednn":
            return onednn_kernel_for_shape(self.onednn_kernel, M, self.in_features, self.out_features)
        return "qnnpack" if self.engine == "qnnpack" else "fbgemm"

    def _saturates(self) -> bool:
        """Whether the products are summed in int16-saturated pairs (eq. M2): fbgemm/x86 when asked, onednn on a CPU
        without VNNI."""
        return self.saturate_int16_pairs or self.onednn_kernel in ("brgemm_no_vnni", "gemm_no_vnni")

    def _product_kernel(self) -> tuple[str, bool]:
        """(kernel, saturate_int16_pairs) of the fused call's product (refquant.matmul.kernel_for). With 7-bit
        codes (reduce_range) no pair can saturate, so eq. M2's kernel gives eq. M1's sums: on AVX2 CPUs without
        VNNI the fused call runs the avx2 kernel rather than the portable one
        (refquant.matmul.kernel_for_seven_bit_codes)."""
        saturate = self._saturates()
        if not saturate and self._input_qmax <= SEVEN_BIT_MAX_CODE:
            return kernel_for_seven_bit_codes()
        return kernel_for(saturate_int16_pairs=saturate), saturate

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 (..., K) -> float32 (..., N). Matches: torch.ops.quantized.linear_dynamic (reduce_range as set).

        The product, the zero-point corrections and the float output (eqs. DQ4, DQ5) run in one pass
        (refquant.fused_linear, the same bits as :meth:`stages`) when the matmul runs a Numba kernel. Before it,
        two passes over x, as fbgemm's op makes them (FindMinMax, then PackAWithQuantRowOffset): the min/max
        (eq. DQ1), then the codes with their row sums, written in the padded rows the product's tiles read
        (eq. DQ3); below MIN_MAX_PARALLEL_MIN_SIZE elements both, with eq. DQ2 between them, in one Numba call
        (:func:`_quantize_input_kernel`), above it each pass shared by the cores (refquant._threads)."""
        kernel, saturate = self._product_kernel()
        if kernel == "reference":
            return self.stages(x)["output"]
        q = self._quantized_input(x, False)
        M, N = q["M"], self.out_features
        x_u8 = q["x_padded_u8"]
        if self._pairs_restart is not None:  # eq. M2b: a zero k where gemm:jit's pairs restart (sums unchanged)
            x_u8 = self._pairs_restart.input(q["x2d_u8"])
            if self._fused_restart is None:
                self._fused_restart = FusedLinear(self._pairs_restart.packed, self.col_offsets,
                                                  self._weight_zero_points_n)
            fused = self._fused_restart
        else:
            if self._fused is None:
                self._fused = FusedLinear(self._packed_weight, self.col_offsets, self._weight_zero_points_n)
            fused = self._fused
        formula = self._formula(M)
        constants = self._output_constants(q["input_scale_used"])
        y2d_f32 = fused.run(x_u8, q["input_zero_point"], f"dynamic_{formula}", constants, kernel,  # kernel_for's
                            out_dtype=np.float32, saturate_int16_pairs=saturate,                # choice above
                            row_offsets_i32=q["row_sums"])
        output_shape = q["lead_shape"] + (N,)
        if self.engine == "onednn" and M == 0:
            output_shape = (0, N)   # as in stages()
        return y2d_f32.reshape(output_shape)

    def _output_constants(self, s_x_f32: np.float32) -> tuple:
        """:func:`float_output_constants` of this call: only f32(s_x·s_w) changes from call to call."""
        if self._bias_or_zeros is None:
            self._bias_or_zeros = float_output_constants(s_x_f32, self.weight_scales_used, self.bias)[3]
            self._max_weight_scale = float(self.weight_scales_used.max())
        if float(s_x_f32) * self._max_weight_scale < 1e38:                  # no product can overflow float32
            mult_f32 = np.multiply(s_x_f32, self.weight_scales_used, dtype=np.float32)     # f32(s_x·s_w)
        else:
            with np.errstate(over="ignore"):
                mult_f32 = np.multiply(s_x_f32, self.weight_scales_used, dtype=np.float32)
        return s_x_f32, self.weight_scales_used, mult_f32, self._bias_or_zeros, self.bias is not None

    def __repr__(self) -> str:
        extra = f", onednn_kernel={self.onednn_kernel!r}" if self.engine == "onednn" else ""
        if self.saturate_int16_pairs:
            extra += ", saturate_int16_pairs=True"
        return (f"DynamicQuantizedLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"engine={self.engine!r}, reduce_range={self.reduce_range}, weight_qscheme={self.weight_qscheme!r}, "
                f"bias={self.bias is not None}{extra})")
