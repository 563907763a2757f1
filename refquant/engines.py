"""Where torch's quantized engines differ: weight packing, bias handling and requantization of the static Linear.

``torch.backends.quantized.engine`` picks who runs ``torch.ops.quantized.linear`` (``linear_relu``): fbgemm, x86
(= fbgemm for Linear), qnnpack or onednn. All of them start from the same int32 (refquant.linear eqs. L4, L5)::

    raw[m, n] = Σ_k (q_x[m, k] − z_x)·(q_w[n, k] − z_w[n])            int32, modulo 2^32

fbgemm computes it as ``acc − z_x·col_offsets − z_w·row_offsets``, qnnpack as a sum of (x − z_x)·(w_u8 − (z_w + 128))
products (:func:`qnnpack_accumulate_readable`), oneDNN as ``acc + compensation``: the same int32 in each case, so
refquant computes it once (:func:`refquant.linear.accumulate_raw`) and only what follows is engine-specific. Side by
side (f32 = round to float32, RNE; s_x, s_w, s_y are the input, weight and output scales, z the zero points)::

    step          fbgemm / x86 (L6-L11)          qnnpack (QN1-QN6)                   onednn (DN1-DN7)
    weight        int8 codes, col_offsets        uint8 = int8 + 128,                 int8 codes; z_w must be 0;
                                                 kernel zero point = z_w + 128       reciprocal r_w = f32(1/s_w)
    scales        atws = f32(f32(s_x)·s_w)       f32(f32(s_w·f32(s_x))               s' = f32(1/f32(1/s)) for s_x,
                  mult = f32(atws / f32(s_y))      · f32(1/f32(s_y)))                s_w, s_y; ·s_x' then ·s_w' (or
                                                                                     ·f32(s_x'·s_w')), ·f32(1/s_y')
    bias          float32: f32(raw) + bias/atws  int32: quantize(bias, s_w·s_x),     float32, added after the scale
                  (FMA for per-tensor weights)   added to raw in int32
    rounding      cvtps2dq(y) + z_y              cvtps2dq(y), int16 packs + z_y      z_y added in float, then rint
    overflow      INT32_MIN -> code 0            INT32_MIN -> code 0                 saturates: 255 (NaN: 255;
                                                                                     gemm:jit 0)
    ReLU          clamp below at z_y             output_min = z_y                    max(v, 0) before the output scale

Each engine has: a **prepack** (what ``quantized::linear_prepack`` and the first call keep, and what they refuse), a
**requantizer** (one small frozen object per scheme that holds its per-channel constants and has
``requantize(raw_i32, readable=None)``: NumPy for small inputs, else the kernel), and a per-element Numba function
``<engine>_requantize_element(raw, channel constants...)`` (``@njit(cache=True, inline="always")``) which the row
kernel calls and which refquant.fused_linear calls in the product's epilogue (through
``<engine>_requantize_channel``, the requantizer's ``epilogue`` and ``epilogue_constants()``). Next to it is the
readable NumPy version it must equal (tests/test_engines_details.py). The default requantization of every engine is
its own float path; other schemes (integer-only ones) register with :func:`register_requantization` and are chosen
with ``QuantizedLinear(..., requantization=name)``.

Machine-dependent arithmetic, modelled by switches of refquant.linear.QuantizedLinear:

* ``saturate_int16_pairs``: fbgemm/x86 and onednn on CPUs without VNNI (oneDNN's ``brg_matmul:avx512_core``,
  ``gemm:jit`` on AVX2) add neighbouring u8·s8 products in int16 with saturation (refquant.matmul eq. M2). qnnpack
  (x86: the SSE2 kernel 4x4c2 only) never does: it multiplies zero-point-subtracted int16 values exactly.
* ``onednn_kernel``: oneDNN picks its matmul kernel per call. "brgemm" (``brg_matmul:<isa>``, the default)
  applies the src and weight scales one after the other; "brgemm_amx" (``brg_matmul:<isa>_amx``, chosen for larger
  M on CPUs with AMX) their product, and adds the input zero point's compensation in float32 instead of int32
  (eq. DN4b, which changes results once |Σ x·w| or |z_x·Σ w| exceeds 2^24: K >= 515 at full range); "gemm"
  (``gemm:jit``, AVX2 CPUs) their product. The scale order alone changed 122 of 115,916 outputs of random problems
  (a third of them aimed at rounding ties) when measured.
  gemm:jit also restarts its int16 pairs at its second K block (:func:`onednn_gemm_pairs_restart`, refquant.matmul
  eq. M2b): QuantizedLinear applies it with ``onednn_kernel="gemm"`` and ``saturate_int16_pairs=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
from numba import njit

from ._dispatch import SmallCalls
from ._float32 import cvtps2dq, fma_f32, fmaf
from ._lanes import (add16_f32, add16_i32, cvtps2dq16, fma16_f32, load16, max16_i32, min16_i32, mul16_f32,
                     relu16_f32, saturate_u8_16_f32, splat16_f32, splat16_i32, store16_u8, sub16_i32, to16_f32)
from .quantize import quantize_per_channel, quantize_per_tensor

ENGINES: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")
"""The engines of ``torch.backends.quantized.supported_engines`` whose static Linear refquant models."""

INT32_MIN = -(2**31)
QNNPACK_PADDING_CHANNELS = 8
"""qnnpack pads its per-channel scales with 8 channels of weight scale 1.0 (QnnpackUtils.h kPaddingChannels) and
checks their requantization scales too."""


# ----------------------------------------------------------------------------------------------------------------
# The seam: what a requantizer is given, and how schemes are registered
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LinearQParams:
    """Everything about a layer that weight packing and requantization may use, as the layer holds it.

    Scales appear twice: ``weight_scales`` float32, as fbgemm's prepack and the kernels use them, and
    ``weight_scales_f64`` as torch's quantized weight holds them (``q_per_channel_scales()`` is a double tensor,
    ``q_scale()`` a double); qnnpack quantizes the bias with the double ones, onednn takes the per-tensor reciprocal
    in double. ``input_scale`` and ``output_scale`` are doubles, as ``q_scale()`` and the op's argument are.
    """

    engine: str
    per_channel: bool
    weight_int8: np.ndarray  # (N, K) int8
    weight_scales: np.ndarray  # (N,) or (1,) float32
    weight_scales_f64: np.ndarray  # (N,) or (1,) float64
    weight_zero_points: np.ndarray  # (N,) or (1,) int32
    col_offsets: np.ndarray  # (N,) int32: Σ_k q_w[n, k] − z_w[n]·K (eq. L3)
    bias: np.ndarray | None  # (N,) float32
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    relu: bool

    @property
    def out_features(self) -> int:
        return int(self.weight_int8.shape[0])


@dataclass(frozen=True)
class EngineOptions:
    """Engine-specific switches (each refused on the engines it does not concern).

    onednn_kernel: which oneDNN matmul kernel to model: "brgemm" (default), "brgemm_amx" or "gemm" (eqs. DN4, DN5).
    qnnpack_cached_output_scale: model torch's qnnpack cache deliberately. The packed weight computes its
        requantization scales (eq. QN4) at the first call with a new input scale and reuses them for later calls
        with the same input scale, whatever their output scale; give the output scale of that first call here.
        ``None`` (the default) = this layer's own output scale, i.e. a fresh packed weight.
    """

    onednn_kernel: str = "brgemm"
    qnnpack_cached_output_scale: float | None = None


KERNEL_MIN_ELEMENTS = 1 << 16
""":meth:`Requantizer.requantize` runs the readable NumPy statements below this many int32 values (for the first
refquant._dispatch.SMALL_CALLS such calls), the Numba row kernel otherwise: below it NumPy takes about a
millisecond, less than the kernel takes to load from Numba's cache (a first run compiles it, ~0.5 s), so a small
study compiles nothing here. Both give the same bits (tests/test_engines_details.py proves it on both sides, for
every engine)."""
_SMALL_CALLS = SmallCalls(KERNEL_MIN_ELEMENTS)


class Requantizer:
    """int32 ``raw`` (..., N) -> uint8 output codes (..., N), with the per-channel constants of one scheme.

    Subclasses are frozen dataclasses (their fields are the visible intermediates) implementing ``_readable`` (NumPy,
    one statement per rounding) and ``_fast`` (the Numba row kernel over the per-element function).
    """

    name: ClassVar[str]
    epilogue: ClassVar[str | None] = None
    """The name of this scheme's ``<name>_requantize_channel(raw_i32, n, constants)`` in refquant.fused_linear's
    registry: the product's epilogue in QuantizedLinear's call (None: the call runs accumulate, then requantize)."""

    def epilogue_constants(self) -> tuple:
        """The constants the epilogue function takes (per-channel arrays of length N, scalars)."""
        raise NotImplementedError

    def requantize(self, raw_i32: np.ndarray, *, readable: bool | None = None) -> np.ndarray:
        """(..., N) int32 -> (..., N) uint8; ``readable=True`` runs the NumPy statements, ``False`` the Numba kernel,
        ``None`` (default) the NumPy statements for a few small inputs (:data:`KERNEL_MIN_ELEMENTS`), else the
        kernel."""
        shape = raw_i32.shape
        raw_2d_i32 = np.ascontiguousarray(raw_i32.reshape(-1, shape[-1]))
        if readable is None:
            readable = _SMALL_CALLS.readable(raw_2d_i32.size)
        out_u8 = self._readable(raw_2d_i32) if readable else self._fast(raw_2d_i32)
        return out_u8.reshape(shape)

    def _readable(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _fast(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class RequantizationScheme:
    """A registered requantization: ``build(params, prepacked, options) -> Requantizer`` for the listed engines."""

    name: str
    build: Callable[[LinearQParams, object, EngineOptions], Requantizer]
    engines: tuple[str, ...]


REQUANTIZATIONS: dict[str, RequantizationScheme] = {}
"""Requantization schemes by name. The engines' own float paths are "fbgemm" (fbgemm, x86), "qnnpack", "onednn"."""


def register_requantization(name: str, build: Callable[[LinearQParams, object, EngineOptions], Requantizer],
                            engines: tuple[str, ...]) -> None:
    """Make ``QuantizedLinear(..., requantization=name)`` build its requantizer with ``build`` on ``engines``."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"engines must be among {ENGINES}, got {unknown}")
    REQUANTIZATIONS[name] = RequantizationScheme(name, build, tuple(engines))


def _wrap_int32(v_i64):
    """Two's-complement wrap of an int64 value (or array) into int32's range, as int32 adds and multiplies do."""
    return ((v_i64 + 2**31) & 0xFFFFFFFF) - 2**31


def _channel_vector(values: np.ndarray, n: int, dtype) -> np.ndarray:
    """A per-tensor constant (shape (1,)) repeated for the n channels, or the per-channel one, contiguous."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(values, dtype), (n,)))


# ================================================================================================================
# fbgemm (and x86): float bias, float multiplier, cvtps2dq          eqs. L6-L11 (equations in refquant.linear)
# Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear.cpp (PackedLinearWeight::apply_impl),
# pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeOutputProcessingAvx2)
# ================================================================================================================

FBGEMM_BIAS_NONE, FBGEMM_BIAS_ADD, FBGEMM_BIAS_FMA = 0, 1, 2
"""How fbgemm adds the float bias: not at all (L8a), f32(raw) + f32(bias/atws) (L8b, per-channel weights), or
fmaf(bias, f32(1/double(atws)), f32(raw)) (L8c, per-tensor weights)."""


def fbgemm_requantize_readable(raw_i32: np.ndarray, bias_f32: np.ndarray | None, act_times_w_scale_f32: np.ndarray,
                               output_multiplier_f32: np.ndarray, output_zero_point: int, relu: bool,
                               per_channel: bool) -> np.ndarray:
    """int32 ``raw`` (..., N) -> uint8 output codes, eqs. L8-L11, one NumPy statement per rounding.

    ``act_times_w_scale_f32`` and ``output_multiplier_f32`` have shape (N,) for per-channel weights, (1,) per tensor.

    Matches: pytorch/FBGEMM src/QuantUtilsAvx2.cc (requantizeOutputProcessingAvx2, float bias): per-channel
    ``_mm256_div_ps(bias, act_times_w_scale)`` then ``_mm256_add_ps``; per-tensor ``_mm256_set1_ps(1.0 / atws)``
    (division in double) and ``add(cvtepi32_ps(x), mul(bias, rcp))``, which the compiler contracted into one
    ``vfmadd`` in torch 2.13's binary; then ``_mm256_mul_ps`` by the multiplier, ``_mm256_cvtps_epi32``, and the
    saturating packs with the output zero point.
    """
    raw_f32 = raw_i32.astype(np.float32)  # cvtdq2ps: RNE once |raw| > 2^24
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if bias_f32 is None:
            t_f32 = raw_f32  # eq. L8a
        elif per_channel:
            bias_term_f32 = (bias_f32 / act_times_w_scale_f32).astype(np.float32)  # f32(bias / atws), eq. L8b
            t_f32 = (raw_f32 + bias_term_f32).astype(np.float32)
        else:
            rcp_f32 = np.float32(1.0 / np.float64(act_times_w_scale_f32[0]))  # reciprocal taken in double
            t_f32 = fmaf(bias_f32, rcp_f32, raw_f32)  # eq. L8c: bias·rcp + raw with ONE rounding
        y_f32 = (t_f32 * output_multiplier_f32).astype(np.float32)  # eq. L9
    r_i32 = cvtps2dq(y_f32)  # eq. L10: RNE; NaN / out of int32 -> INT32_MIN
    lo = output_zero_point if relu else 0  # ReLU: the lower bound becomes the output zero point
    q_i64 = r_i32.astype(np.int64) + np.int64(output_zero_point)  # eq. L11 (the packs saturate, never wrap)
    return np.clip(q_i64, lo, 255).astype(np.uint8)


@njit(cache=True, inline="always")
def fbgemm_requantize_element(raw_i32, bias_mode, bias_f32, bias_term_f32, rcp_f32, mult_f32, output_zero_point,
                              lo):
    """One output code of fbgemm, eqs. L8-L11, from raw[m, n] and channel n's constants (a fused kernel's epilogue).

    bias_mode: FBGEMM_BIAS_NONE / _ADD / _FMA; bias_f32, bias_term_f32 = f32(bias[n] / atws[n]), mult_f32: channel
    n's; rcp_f32 = f32(1 / double(atws)) (per-tensor weights); lo = z_y with ReLU, else 0.
    """
    raw_f32 = np.float32(raw_i32)  # cvtdq2ps
    if bias_mode == 0:
        t_f32 = raw_f32  # eq. L8a
    elif bias_mode == 1:
        t_f32 = np.float32(raw_f32 + bias_term_f32)  # eq. L8b
    else:
        t_f32 = fma_f32(bias_f32, rcp_f32, raw_f32)  # eq. L8c, one rounding
    y_f32 = np.float32(t_f32 * mult_f32)  # eq. L9
    if y_f32 >= np.float32(-2147483648.0) and y_f32 < np.float32(2147483648.0):  # false for NaN
        r = np.int32(np.rint(y_f32))  # cvtps2dq: RNE
    else:
        r = np.int32(-2147483648)  # cvtps2dq's "integer indefinite" INT32_MIN, eq. L10
    # eq. L11, clamp(r + z_y, lo, 255): r is first clamped to [-256, 511], which changes no result (z_y and lo are in
    # [0, 255]) and keeps r + z_y inside int32, so the compiler can use 16 int32 lanes (a vector kernel's epilogue)
    r = min(max(r, np.int32(-256)), np.int32(511))
    q = np.int32(r + np.int32(output_zero_point))
    return np.uint8(min(max(q, np.int32(lo)), np.int32(255)))


@njit(cache=True)
def _fbgemm_requantize_rows(raw_i32, bias_mode, bias_f32, bias_term_f32, rcp_f32, mult_f32, output_zero_point, lo,
                            out_u8):
    """(M, N) int32 -> (M, N) uint8 with :func:`fbgemm_requantize_element` (no fastmath), row by row."""
    for m in range(raw_i32.shape[0]):
        for n in range(raw_i32.shape[1]):
            out_u8[m, n] = fbgemm_requantize_element(raw_i32[m, n], bias_mode, bias_f32[n], bias_term_f32[n],
                                                     rcp_f32, mult_f32[n], output_zero_point, lo)


@njit(cache=True, inline="always")
def fbgemm_requantize_row(raw_i32, offset, n_valid, n0, constants, out_u8, m):
    """out_u8[m, n0 + c] = :func:`fbgemm_requantize_element` of raw_i32[offset + c] with channel n0 + c's
    constants, c < n_valid, 16 outputs at once (refquant._lanes: the same operations and roundings; the per-tensor
    bias term is the same single-rounding FMA, ``llvm.fma.v16f32``). tests/test_vector_epilogue.py proves it equal
    to the element function."""
    bias_mode, bias_f32, bias_term_f32, rcp_f32, mult_f32, output_zero_point, lo = constants
    rcp = splat16_f32(rcp_f32)
    low = splat16_i32(-256)
    high = splat16_i32(511)
    zero_point = splat16_i32(output_zero_point)
    lower = splat16_i32(lo)
    top = splat16_i32(255)
    out_offset = m * out_u8.shape[1] + n0
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        n = n0 + c
        raw_f32 = to16_f32(load16(raw_i32, offset + c, lanes))  # cvtdq2ps
        if bias_mode == 0:
            t = raw_f32  # eq. L8a
        elif bias_mode == 1:
            t = add16_f32(raw_f32, load16(bias_term_f32, n, lanes))  # eq. L8b
        else:
            t = fma16_f32(load16(bias_f32, n, lanes), rcp, raw_f32)  # eq. L8c, one rounding
        r = cvtps2dq16(mul16_f32(t, load16(mult_f32, n, lanes)))  # eqs. L9, L10
        r = min16_i32(max16_i32(r, low), high)  # as the element function: changes no code
        q = min16_i32(max16_i32(add16_i32(r, zero_point), lower), top)  # eq. L11
        store16_u8(out_u8, out_offset + c, q, lanes)


@njit(cache=True, inline="always")
def fbgemm_requantize_channel(raw_i32, n, constants):
    """:func:`fbgemm_requantize_element` of raw[m, n] with channel n's constants taken from ``constants`` =
    FbgemmRequantizer.epilogue_constants() (the fused kernel's epilogue, refquant.fused_linear)."""
    bias_mode, bias_f32, bias_term_f32, rcp_f32, mult_f32, output_zero_point, lo = constants
    return fbgemm_requantize_element(raw_i32, bias_mode, bias_f32[n], bias_term_f32[n], rcp_f32, mult_f32[n],
                                     output_zero_point, lo)


@dataclass(frozen=True, eq=False)
class FbgemmRequantizer(Requantizer):
    """fbgemm's (and x86's) requantization, eqs. L6-L11, with its intermediates.

    act_times_w_scale (eq. L6) and output_multiplier (eq. L7) have shape (N,) for per-channel weights, (1,) per
    tensor, as in fbgemm; bias_term / bias_rcp are the two forms of the bias term (eq. L8b / L8c).
    """

    name: ClassVar[str] = "fbgemm"
    epilogue: ClassVar[str] = "fbgemm"
    per_channel: bool
    bias: np.ndarray | None
    act_times_w_scale: np.ndarray
    output_multiplier: np.ndarray
    output_zero_point: int
    relu: bool
    out_features: int
    bias_mode: int = field(init=False)
    bias_term: np.ndarray = field(init=False)  # (N,) float32, f32(bias / atws) (used per channel)
    bias_rcp: np.float32 = field(init=False)  # f32(1.0 / double(atws[0])) (used per tensor)
    _kernel_args: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.out_features
        bias_f32 = np.zeros(n, np.float32) if self.bias is None else self.bias
        atws_n = _channel_vector(self.act_times_w_scale, n, np.float32)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            bias_term = (bias_f32 / atws_n).astype(np.float32)
            rcp = np.float32(1.0 / np.float64(self.act_times_w_scale[0]))
        mode = FBGEMM_BIAS_NONE if self.bias is None else FBGEMM_BIAS_ADD if self.per_channel else FBGEMM_BIAS_FMA
        object.__setattr__(self, "bias_mode", mode)
        object.__setattr__(self, "bias_term", bias_term)
        object.__setattr__(self, "bias_rcp", rcp)
        lo = self.output_zero_point if self.relu else 0
        object.__setattr__(self, "_kernel_args", (
            np.int64(mode), np.ascontiguousarray(bias_f32), bias_term, rcp,
            _channel_vector(self.output_multiplier, n, np.float32), np.int64(self.output_zero_point), np.int64(lo)))

    @classmethod
    def build(cls, params: LinearQParams, prepacked: object = None,
              options: EngineOptions = EngineOptions()) -> "FbgemmRequantizer":
        """eqs. L6, L7 (apply_impl): ``float input_scale_float = input.q_scale()``,
        ``static_cast<float>(output_scale)``."""
        input_scale_f32 = np.float32(params.input_scale)
        output_scale_f32 = np.float32(params.output_scale)
        with np.errstate(over="ignore"):
            act_times_w_scale = (input_scale_f32 * params.weight_scales).astype(np.float32)  # eq. L6
            output_multiplier = (act_times_w_scale / output_scale_f32).astype(np.float32)  # eq. L7
        return cls(params.per_channel, params.bias, act_times_w_scale, output_multiplier, params.output_zero_point,
                   params.relu, params.out_features)

    def _readable(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        return fbgemm_requantize_readable(raw_2d_i32, self.bias, self.act_times_w_scale, self.output_multiplier,
                                          self.output_zero_point, self.relu, self.per_channel)

    def _fast(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        out_u8 = np.empty(raw_2d_i32.shape, np.uint8)
        _fbgemm_requantize_rows(raw_2d_i32, *self._kernel_args, out_u8)
        return out_u8

    def epilogue_constants(self) -> tuple:
        return self._kernel_args


def fbgemm_requantize_fast(raw_i32: np.ndarray, bias_f32: np.ndarray | None, act_times_w_scale_f32: np.ndarray,
                           output_multiplier_f32: np.ndarray, output_zero_point: int, relu: bool,
                           per_channel: bool) -> np.ndarray:
    """Same result as :func:`fbgemm_requantize_readable` (same arguments), computed by the Numba row kernel."""
    return FbgemmRequantizer(per_channel, bias_f32, act_times_w_scale_f32, output_multiplier_f32,
                             int(output_zero_point), bool(relu), raw_i32.shape[-1]).requantize(raw_i32)


# ================================================================================================================
# qnnpack: uint8 weights, int32 bias quantized at the first call, float requantization scale
# Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear_prepack.cpp (PackedLinearWeightsQnnp::prepack),
# qlinear.cpp (PackedLinearWeightsQnnp::apply_impl), QnnpackUtils.h (make_zero_points_and_scales_tensor,
# generate_requantization_scales), QuantUtils.h (QuantizeBias), qnnpack/src/q8gemm/4x4c2-sse2.c
#
#   w_u8[n, k]   = q_w[n, k] + 128                    kernel_zero_point[n] = z_w[n] + 128      uint8    (eq. QN1)
#   kernel_scale = f32(s_w) (N of them, then 8 padding channels of 1.0)                        float32  (eq. QN2)
#   bias_i32[n]  = quantize(bias[n], s_w[n]·s_x (double), 0, qint32)   (refquant.quantize eq. Q2)  int32 (eq. QN3)
#   rs[n]        = f32(f32(kernel_scale[n]·f32(s_x))·f32(1 / f32(s_y)))   every rs must be a normal float32 > 0,
#                                                                          the padding channels' too  (eq. QN4)
#   acc[m, n]    = bias_i32[n] + Σ_k (q_x − z_x)(w_u8 − kernel_zero_point) = bias_i32[n] + raw    int32 (eq. QN5)
#   q_y[m, n]    = clamp(sat16(sat16(cvtps2dq(f32(f32(acc)·rs[n]))) + z_y), output_min, 255)          (eq. QN6)
#                  with output_min = z_y for ReLU, else 0 (activationLimits); cvtps2dq's INT32_MIN (overflow,
#                  NaN) saturates to code 0.
# ================================================================================================================

@dataclass(frozen=True, eq=False)
class QnnpackPackedWeight:
    """What qnnpack's packed weight holds (eqs. QN1, QN2): uint8 codes and kernel zero points shifted by 128, and
    the float32 kernel scales padded with 8 channels of 1.0 (all N + 8 of them enter the check of eq. QN4)."""

    weight_uint8: np.ndarray  # (N, K) uint8
    kernel_zero_points: np.ndarray  # (N,) uint8
    kernel_scales: np.ndarray  # (N + 8,) float32


def qnnpack_prepack(params: LinearQParams) -> QnnpackPackedWeight:
    """eqs. QN1, QN2. torch's ``linear_prepack`` (qnnpack) refuses only a non-2-D weight and a bias of the wrong
    shape (refquant.linear checks both); everything else is refused at the first call (eq. QN4)."""
    N = params.out_features
    weight_uint8 = (params.weight_int8.astype(np.int16) + 128).astype(np.uint8)  # w_data[i] + 128
    kernel_zero_points = (_channel_vector(params.weight_zero_points, N, np.int64) + 128).astype(np.uint8)
    kernel_scales = np.ones(N + QNNPACK_PADDING_CHANNELS, np.float32)  # padding channels: 1.f
    kernel_scales[:N] = _channel_vector(params.weight_scales, N, np.float32)  # static_cast<float>
    return QnnpackPackedWeight(weight_uint8, kernel_zero_points, kernel_scales)


def qnnpack_accumulate_readable(x2d_u8: np.ndarray, weight_uint8: np.ndarray, kernel_zero_points: np.ndarray,
                                input_zero_point: int) -> np.ndarray:
    """qnnpack's own way to the int32 of eq. QN5 (without the bias): Σ_k (q_x − z_x)·(w_u8 − kernel_zero_point).

    The SSE2 kernel widens both to int16 (``_mm_unpacklo_epi8``, ``_mm_sub_epi16``: values in [−255, 255]) and adds
    pairs of products with ``_mm_madd_epi16`` into int32 (|pair| <= 2·255·255: exact); int32 adds wrap. The result
    equals refquant.linear.accumulate_raw's ``raw`` bit for bit (tests/test_engines.py), which is why refquant
    computes ``raw`` once for every engine.
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qnnpack/src/q8gemm/4x4c2-sse2.c.
    """
    xd_i64 = x2d_u8.astype(np.int64) - np.int64(input_zero_point)  # int16 in the kernel
    wd_i64 = weight_uint8.astype(np.int64) - kernel_zero_points.astype(np.int64)[:, np.newaxis]
    return _wrap_int32(xd_i64 @ wd_i64.T).astype(np.int32)  # exact, then int32's wrap


def qnnpack_requantize_readable(raw_i32: np.ndarray, bias_i32: np.ndarray, requantization_scales_f32: np.ndarray,
                                output_zero_point: int, output_min: int, output_max: int) -> np.ndarray:
    """(M, N) int32 raw -> uint8 codes, eqs. QN5, QN6, one NumPy statement per step of the SSE2 kernel.

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qnnpack/src/q8gemm/4x4c2-sse2.c (the accumulator
    starts at the packed bias; ``_mm_cvtepi32_ps``, ``_mm_mul_ps``, ``_mm_cvtps_epi32``, ``_mm_packs_epi32``,
    ``_mm_adds_epi16`` with the output zero point, ``_mm_packus_epi16``, ``_mm_min_epu8``/``_mm_max_epu8``).
    """
    acc_i32 = _wrap_int32(raw_i32.astype(np.int64) + bias_i32.astype(np.int64)).astype(np.int32)  # eq. QN5
    with np.errstate(over="ignore", invalid="ignore"):
        y_f32 = (acc_i32.astype(np.float32) * requantization_scales_f32).astype(np.float32)
    r_i32 = cvtps2dq(y_f32)  # RNE; NaN / out of int32 -> INT32_MIN
    r_i16 = np.clip(r_i32.astype(np.int64), -32768, 32767)  # _mm_packs_epi32: saturate to int16
    v_i16 = np.clip(r_i16 + np.int64(output_zero_point), -32768, 32767)  # _mm_adds_epi16: saturating add
    q_u8 = np.clip(v_i16, 0, 255)  # _mm_packus_epi16: saturate to uint8
    q_u8 = np.maximum(np.minimum(q_u8, output_max), output_min)  # _mm_min_epu8(output_max), _mm_max_epu8(min)
    return q_u8.astype(np.uint8)


@njit(cache=True, inline="always")
def qnnpack_requantize_element(raw_i32, bias_i32, requantization_scale_f32, output_zero_point, output_min,
                               output_max):
    """One output code of qnnpack, eqs. QN5, QN6, from raw[m, n] and channel n's bias_i32 and scale."""
    acc = np.int64(raw_i32) + np.int64(bias_i32)
    acc = ((acc + np.int64(2147483648)) & np.int64(0xFFFFFFFF)) - np.int64(2147483648)  # int32 add wraps
    y_f32 = np.float32(np.float32(acc) * requantization_scale_f32)
    if y_f32 >= np.float32(-2147483648.0) and y_f32 < np.float32(2147483648.0):  # false for NaN
        r = np.int64(np.rint(y_f32))  # _mm_cvtps_epi32: RNE
    else:
        r = np.int64(-2147483648)  # INT32_MIN
    r = min(max(r, np.int64(-32768)), np.int64(32767))  # _mm_packs_epi32
    v = min(max(r + np.int64(output_zero_point), np.int64(-32768)), np.int64(32767))  # _mm_adds_epi16
    q = min(max(v, np.int64(0)), np.int64(255))  # _mm_packus_epi16
    q = max(min(q, np.int64(output_max)), np.int64(output_min))  # _mm_min_epu8, _mm_max_epu8
    return np.uint8(q)


@njit(cache=True, inline="always")
def qnnpack_requantize_channel(raw_i32, n, constants):
    """:func:`qnnpack_requantize_element` of raw[m, n] with channel n's constants from ``constants`` =
    QnnpackRequantizer.epilogue_constants() (refquant.fused_linear)."""
    bias_i32, requantization_scales_f32, output_zero_point, output_min, output_max = constants
    return qnnpack_requantize_element(raw_i32, bias_i32[n], requantization_scales_f32[n], output_zero_point,
                                      output_min, output_max)


@njit(cache=True)
def _qnnpack_requantize_rows(raw_i32, bias_i32, requantization_scales_f32, output_zero_point, output_min,
                             output_max, out_u8):
    for m in range(raw_i32.shape[0]):
        for n in range(raw_i32.shape[1]):
            out_u8[m, n] = qnnpack_requantize_element(raw_i32[m, n], bias_i32[n], requantization_scales_f32[n],
                                                      output_zero_point, output_min, output_max)


def qnnpack_requantization_scales(kernel_scales_f32: np.ndarray, input_scale: float,
                                  output_scale: float) -> np.ndarray:
    """eq. QN4 for every kernel scale (N + 8): ``(weight_scale · input_scale) · (1.f / output_scale)`` in float32.

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/QnnpackUtils.h (generate_requantization_scales:
    ``const float input_scale, const float output_scale`` parameters, so both are rounded to float32 first).
    """
    input_scale_f32 = np.float32(input_scale)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        inverse_output_scale_f32 = np.float32(1) / np.float32(output_scale)
        return ((kernel_scales_f32 * input_scale_f32).astype(np.float32) * inverse_output_scale_f32).astype(np.float32)


def _is_normal_positive_f32(v: np.ndarray) -> np.ndarray:
    return np.isfinite(v) & (v >= np.finfo(np.float32).tiny)


@dataclass(frozen=True, eq=False)
class QnnpackRequantizer(Requantizer):
    """qnnpack's requantization (eqs. QN3-QN6), with its intermediates.

    bias_i32 (N,) int32 (zeros without a bias: prepack stores a zero float bias), requantization_scales (N,)
    float32 (the padding channels' are checked, not kept), output_min / output_max the clamp (ReLU: z_y).
    requantization_output_scale is the output scale eq. QN4 used (the layer's, or EngineOptions'
    qnnpack_cached_output_scale).
    """

    name: ClassVar[str] = "qnnpack"
    epilogue: ClassVar[str] = "qnnpack"
    bias_i32: np.ndarray
    requantization_scales: np.ndarray
    requantization_output_scale: float
    output_zero_point: int
    output_min: int
    output_max: int

    @classmethod
    def build(cls, params: LinearQParams, prepacked: QnnpackPackedWeight,
              options: EngineOptions = EngineOptions()) -> "QnnpackRequantizer":
        """eqs. QN3, QN4 as ``apply_impl`` computes them at the first call with this input scale; refuses what
        ``generate_requantization_scales`` refuses (a requantization scale that is not a normal float32 > 0)."""
        N = params.out_features
        cached = options.qnnpack_cached_output_scale
        output_scale = params.output_scale if cached is None else float(cached)
        scales_f32 = qnnpack_requantization_scales(prepacked.kernel_scales, params.input_scale, output_scale)
        bad = ~_is_normal_positive_f32(scales_f32)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            where = f"channel {i}" if i < N else f"padding channel {i - N} (qnnpack pads with weight scale 1.0)"
            raise ValueError(
                f"engine 'qnnpack' refuses this layer, as torch's first quantized::linear call does: the "
                f"requantization scale f32(f32(weight_scale·f32(input_scale))·f32(1/f32(output_scale))) of {where} "
                f"is {scales_f32[i]!r}, not a normal float32 > 0 (input_scale={params.input_scale!r}, "
                f"output_scale={output_scale!r}, weight scale {prepacked.kernel_scales[i]!r})")
        bias_f32 = np.zeros(N, np.float32) if params.bias is None else params.bias  # prepack: at::zeros(rows_w)
        if params.per_channel:  # QuantizeBias: q_per_channel_scales() * input_scale, in double
            bias_scales_f64 = params.weight_scales_f64 * np.float64(params.input_scale)
            bias_i32 = quantize_per_channel(bias_f32, bias_scales_f64, np.zeros(N, np.int64), 0, "qint32")
        else:  # q_scale() * input_scale, in double
            bias_scale_f64 = float(params.weight_scales_f64[0]) * float(params.input_scale)
            bias_i32 = quantize_per_tensor(bias_f32, bias_scale_f64, 0, "qint32")
        output_min = params.output_zero_point if params.relu else 0  # activationLimits(RELU).first = z_y
        return cls(bias_i32.astype(np.int32), np.ascontiguousarray(scales_f32[:N]), output_scale,
                   params.output_zero_point, output_min, 255)

    def _readable(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        return qnnpack_requantize_readable(raw_2d_i32, self.bias_i32, self.requantization_scales,
                                           self.output_zero_point, self.output_min, self.output_max)

    def _fast(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        out_u8 = np.empty(raw_2d_i32.shape, np.uint8)
        _qnnpack_requantize_rows(raw_2d_i32, *self.epilogue_constants(), out_u8)
        return out_u8

    def epilogue_constants(self) -> tuple:
        return (self.bias_i32, self.requantization_scales, np.int64(self.output_zero_point),
                np.int64(self.output_min), np.int64(self.output_max))


# ================================================================================================================
# onednn: reciprocal scales (round trip), float bias, the output zero point added in float, saturating conversion
# Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear_prepack.cpp (PackedLinearWeightsOnednn::
# prepack), qlinear.cpp (PackedLinearWeightsOnednn::apply_impl: "Scales of ONEDNN and PyTorch are reciprocal");
# intel/ideep include/ideep/operators/matmul.hpp (do_prepare_static_quant: ``s = 1.0 / s`` for src and weights,
# ``s = dst_coeff / s`` for dst); oneapi-src/oneDNN src/cpu/cpu_primitive.hpp (DEFINE_ARG_SCALES_BUFFER: ``1.f / s``
# for DNNL_ARG_DST), src/cpu/scale_utils.cpp (precompute_scales: src_scale·wei_scale),
# src/cpu/x64/brgemm/jit_brgemm_kernel.cpp (apply_compensation, store_accumulators_apply_post_ops),
# src/cpu/x64/brgemm/jit_brgemm_amx_uker.cpp (process_output_range), src/cpu/x64/jit_gemm_inner_product_utils.cpp
# (the gemm:jit post-processing), src/cpu/x64/jit_generator.hpp (saturate_f32). oneDNN 3.12 (torch 2.13's) was
# measured where the mirrored source (an earlier oneDNN) is silent: its brgemm kernels without AMX apply the src and
# the weight scale one after the other (eq. DN5a), the AMX ones their precomputed product (eq. DN5b).
#
#   r_x = f32(1 / s_x), r_w[n] = f32(1 / s_w[n]), r_y = f32(1 / s_y)   what torch hands to oneDNN      (eq. DN1)
#         (per-tensor r_w: 1.0 / q_scale() in double; per-channel: 1.0f / float scale)
#   s_x' = f32(1 / r_x), s_w'[n] = f32(1 / r_w[n]), s_y' = f32(1 / r_y)    ideep inverts them back     (eq. DN2)
#   output_scale[n] = f32(s_x'·s_w'[n]),   dst_multiplier = f32(1 / s_y')                               (eq. DN3)
#   t[m, n] = f32(raw)                       brgemm and gemm: the compensation −z_x·Σ_k q_w added in int32 (eq. DN4a)
#           = f32(f32(acc) + f32(comp[n])),  comp[n] = −z_x·Σ_k q_w[n, k] (int32), acc = raw − comp:
#             the AMX kernels add the zero-point compensation in float32                                  (eq. DN4b)
#   v = f32(f32(t·s_x')·s_w'[n])             brgemm without AMX: two multiplies                         (eq. DN5a)
#     = f32(t·output_scale[n])               brgemm with AMX, gemm:jit: one                             (eq. DN5b)
#   v = f32(v + bias[n]);  v = max(v, 0) with ReLU (NaN -> 0)                                           (eq. DN5c)
#   v = f32(f32(v·dst_multiplier) + f32(z_y))          the output zero point added BEFORE rounding      (eq. DN6)
#   q_y = vpmovusdb(cvtps2dq(min(max(v, 0), 255)))     NaN stays NaN -> INT32_MIN -> 255                (eq. DN7)
#         gemm:jit (AVX2): its saturate_f32 takes vmaxps(v, 0), whose second operand wins for NaN: NaN -> 0
#
# Which kernel runs is oneDNN's choice per call (ONEDNN_VERBOSE names it): brg_matmul:<isa> without AMX ("brgemm"),
# brg_matmul:<isa>_amx on CPUs with AMX for larger M ("brgemm_amx"), gemm:jit on AVX2 CPUs ("gemm").
# ================================================================================================================

ONEDNN_KERNELS: tuple[str, ...] = ("brgemm", "brgemm_amx", "gemm")
"""The oneDNN matmul kernels whose arithmetic differs (eqs. DN4, DN5): EngineOptions.onednn_kernel."""
_ONEDNN_KERNEL_CODES = {"brgemm": 0, "brgemm_amx": 1, "gemm": 2}

ONEDNN_GEMM_ONE_BLOCK_MAX_K = 256  # oneDNN gemm_driver's bk_traditional: up to this K, one K block
ONEDNN_GEMM_BLOCK_K = 384  # its bk: below 2·bk, two blocks of (K + 1) // 2; from 2·bk on, blocks of bk (even)


def onednn_gemm_pairs_restart(K: int) -> int | None:
    """The k at which oneDNN's ``gemm:jit`` starts a K block whose int16 pairs start afresh at an odd k (refquant.matmul
    eq. M2b), or None where its pairs are those of eq. M2: b = (K + 1) // 2 for 256 < K < 768 when b is odd.

    Matches: oneapi-src/oneDNN src/cpu/x64/gemm/gemm_driver.cpp (get_k_padd: ``rnd_up((k + 1) / 2, uk)`` for
    bk_traditional < k < 2·bk; uk = 1 on AVX2's int8 kernel, as measured: refquant.matmul's module docstring)."""
    if ONEDNN_GEMM_ONE_BLOCK_MAX_K < K < 2 * ONEDNN_GEMM_BLOCK_K:
        b = (K + 1) // 2
        return b if b % 2 else None
    return None


@dataclass(frozen=True, eq=False)
class OnednnPackedWeight:
    """What onednn's prepack keeps besides the int8 codes: the reciprocal weight scales r_w (eq. DN1)."""

    weight_scales_reciprocal: np.ndarray  # (N,) or (1,) float32


def onednn_prepack(params: LinearQParams) -> OnednnPackedWeight:
    """Refuse nonzero weight zero points, as ``quantized::linear_prepack`` (onednn) does; store r_w (eq. DN1)."""
    zps = np.asarray(params.weight_zero_points)
    if (zps != 0).any():
        i = int(np.flatnonzero(zps != 0)[0])
        raise ValueError(f"engine 'onednn' supports only symmetric weights: weight_zero_points must be 0 (torch's "
                         f"quantized::linear_prepack (onednn) refuses the layer: \"ONEDNN only supports symmetric "
                         f"quantization of weight\"), got weight_zero_points[{i}] = {int(zps[i])}")
    with np.errstate(divide="ignore", over="ignore"):
        if params.per_channel:  # 1.0f / q_per_channel_scales()[i].item<float>()
            reciprocal = (np.float32(1) / params.weight_scales.astype(np.float32)).astype(np.float32)
        else:  # ideep::scale_t(1, 1.0/weight.q_scale()): the division in double
            reciprocal = np.array([1.0 / params.weight_scales_f64[0]]).astype(np.float32)
    return OnednnPackedWeight(reciprocal)


def onednn_requantize_readable(raw_i32: np.ndarray, kernel: str, compensation_i32: np.ndarray,
                               input_scale_onednn_f32: np.float32, weight_scales_onednn_f32: np.ndarray,
                               output_scales_f32: np.ndarray, bias_f32: np.ndarray | None, relu: bool,
                               dst_multiplier_f32: np.float32, output_zero_point: int) -> np.ndarray:
    """(M, N) int32 raw -> uint8 codes, eqs. DN4-DN7, one NumPy statement per instruction of oneDNN's epilogue.

    ``kernel``: "brgemm", "brgemm_amx" or "gemm" (which of eqs. DN4a/b and DN5a/b apply).
    Matches: oneapi-src/oneDNN src/cpu/x64/brgemm/jit_brgemm_kernel.cpp (store_accumulators_apply_post_ops:
    ``uni_vcvtdq2ps``, ``uni_vmulps`` by the scales, ``uni_vaddps`` the bias, the eltwise ReLU, ``vmulps`` by the
    dst scale, ``uni_vaddps`` the dst zero point, saturate_cvt_f32, ``vpmovusdb``), jit_brgemm_amx_uker.cpp,
    src/cpu/x64/jit_gemm_inner_product_utils.cpp.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if kernel == "brgemm_amx":
            acc_i32 = _wrap_int32(raw_i32.astype(np.int64) - compensation_i32.astype(np.int64))  # Σ_k x·w, int32
            t_f32 = (acc_i32.astype(np.float32) + compensation_i32.astype(np.float32)).astype(np.float32)  # DN4b
        else:
            t_f32 = raw_i32.astype(np.float32)  # eq. DN4a: the compensation was added in int32
        if kernel == "brgemm":
            v_f32 = (t_f32 * input_scale_onednn_f32).astype(np.float32)  # eq. DN5a: the src scale,
            v_f32 = (v_f32 * weight_scales_onednn_f32).astype(np.float32)  # then the weight scale
        else:
            v_f32 = (t_f32 * output_scales_f32).astype(np.float32)  # eq. DN5b: their product
        if bias_f32 is not None:
            v_f32 = (v_f32 + bias_f32).astype(np.float32)  # eq. DN5c
        if relu:
            v_f32 = np.where(v_f32 > 0, v_f32, np.float32(0))  # vmaxps(v, 0): NaN -> 0
        v_f32 = (v_f32 * dst_multiplier_f32).astype(np.float32)  # eq. DN6
        v_f32 = (v_f32 + np.float32(output_zero_point)).astype(np.float32)
        if kernel == "gemm":  # gemm:jit's saturate_f32 starts with vmaxps(v, 0), which gives 0 for NaN
            v_f32 = np.where(v_f32 > 0, v_f32, np.float32(0))
        v_f32 = np.where(np.isnan(v_f32), v_f32, np.clip(v_f32, np.float32(0), np.float32(255)))  # eq. DN7
    r_i32 = cvtps2dq(v_f32)  # RNE; NaN -> INT32_MIN
    return np.where(r_i32 < 0, 255, r_i32).astype(np.uint8)  # vpmovusdb: INT32_MIN as unsigned saturates to 255


@njit(cache=True, inline="always")
def onednn_requantize_element(raw_i32, kernel_code, compensation_i32, input_scale_onednn_f32,
                              weight_scale_onednn_f32, output_scale_f32, has_bias, bias_f32, relu,
                              dst_multiplier_f32, zero_point_f32):
    """One output code of onednn, eqs. DN4-DN7, from raw[m, n] and channel n's compensation, scales and bias.

    kernel_code: 0 brgemm, 1 brgemm_amx, 2 gemm (eqs. DN4a/b, DN5a/b).
    """
    if kernel_code == 1:
        acc = np.int64(raw_i32) - np.int64(compensation_i32)
        acc = ((acc + np.int64(2147483648)) & np.int64(0xFFFFFFFF)) - np.int64(2147483648)  # int32 wrap
        t_f32 = np.float32(np.float32(acc) + np.float32(compensation_i32))  # eq. DN4b
    else:
        t_f32 = np.float32(raw_i32)  # eq. DN4a
    if kernel_code == 0:
        v = np.float32(np.float32(t_f32 * input_scale_onednn_f32) * weight_scale_onednn_f32)  # eq. DN5a
    else:
        v = np.float32(t_f32 * output_scale_f32)  # eq. DN5b
    if has_bias:
        v = np.float32(v + bias_f32)  # eq. DN5c
    if relu and not v > np.float32(0):  # vmaxps(v, 0): NaN and -0.0 -> +0.0
        v = np.float32(0)
    v = np.float32(v * dst_multiplier_f32)  # eq. DN6
    v = np.float32(v + zero_point_f32)
    if v != v:  # NaN passes brgemm's saturate_f32 unchanged; cvtps2dq gives INT32_MIN; vpmovusdb saturates it
        return np.uint8(0) if kernel_code == 2 else np.uint8(255)  # to 255; gemm:jit's vmaxps(v, 0) gives 0
    if v < np.float32(0):  # eq. DN7: saturate in float, then round half to even
        v = np.float32(0)
    if v > np.float32(255):
        v = np.float32(255)
    return np.uint8(np.rint(v))


@njit(cache=True, inline="always")
def onednn_requantize_channel(raw_i32, n, constants):
    """:func:`onednn_requantize_element` of raw[m, n] with channel n's constants from ``constants`` =
    OnednnRequantizer.epilogue_constants() (refquant.fused_linear)."""
    (kernel_code, compensation_i32, input_scale_onednn_f32, weight_scales_onednn_f32, output_scales_f32, has_bias,
     bias_f32, relu, dst_multiplier_f32, zero_point_f32) = constants
    return onednn_requantize_element(raw_i32, kernel_code, compensation_i32[n], input_scale_onednn_f32,
                                     weight_scales_onednn_f32[n], output_scales_f32[n], has_bias, bias_f32[n],
                                     relu, dst_multiplier_f32, zero_point_f32)


@njit(cache=True, inline="always")
def onednn_requantize_row(raw_i32, offset, n_valid, n0, constants, out_u8, m):
    """out_u8[m, n0 + c] = :func:`onednn_requantize_element` of raw_i32[offset + c] with channel n0 + c's
    constants, c < n_valid (a row of the fused kernel's epilogue, refquant.fused_linear), 16 outputs at once: each
    step of the element function is one 16-lane operation of refquant._lanes with the same rounding, in the same
    order (no FMA: oneDNN's epilogue has none). tests/test_vector_epilogue.py proves it equal to the element
    function."""
    (kernel_code, compensation_i32, input_scale_onednn_f32, weight_scales_onednn_f32, output_scales_f32, has_bias,
     bias_f32, relu, dst_multiplier_f32, zero_point_f32) = constants
    input_scale = splat16_f32(input_scale_onednn_f32)
    dst_multiplier = splat16_f32(dst_multiplier_f32)
    zero_point = splat16_f32(zero_point_f32)
    out_offset = m * out_u8.shape[1] + n0
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        n = n0 + c
        raw = load16(raw_i32, offset + c, lanes)
        if kernel_code == 1:  # eq. DN4b: Σ x·w (int32 wrap), then the compensation added in float32
            compensation = load16(compensation_i32, n, lanes)
            t = add16_f32(to16_f32(sub16_i32(raw, compensation)), to16_f32(compensation))
        else:
            t = to16_f32(raw)  # eq. DN4a
        if kernel_code == 0:  # eq. DN5a
            v = mul16_f32(mul16_f32(t, input_scale), load16(weight_scales_onednn_f32, n, lanes))
        else:  # eq. DN5b
            v = mul16_f32(t, load16(output_scales_f32, n, lanes))
        if has_bias:
            v = add16_f32(v, load16(bias_f32, n, lanes))  # eq. DN5c
        if relu:
            v = relu16_f32(v)
        v = add16_f32(mul16_f32(v, dst_multiplier), zero_point)  # eq. DN6
        if kernel_code == 2:  # gemm:jit's saturate_f32 starts with vmaxps(v, 0): NaN -> 0, as relu16_f32
            v = relu16_f32(v)
        store16_u8(out_u8, out_offset + c, saturate_u8_16_f32(v), lanes)  # eq. DN7, vpmovusdb


@njit(cache=True)
def _onednn_requantize_rows(raw_i32, kernel_code, compensation_i32, input_scale_onednn_f32,
                            weight_scales_onednn_f32, output_scales_f32, has_bias, bias_f32, relu,
                            dst_multiplier_f32, zero_point_f32, out_u8):
    for m in range(raw_i32.shape[0]):
        for n in range(raw_i32.shape[1]):
            out_u8[m, n] = onednn_requantize_element(raw_i32[m, n], kernel_code, compensation_i32[n],
                                                     input_scale_onednn_f32, weight_scales_onednn_f32[n],
                                                     output_scales_f32[n], has_bias, bias_f32[n], relu,
                                                     dst_multiplier_f32, zero_point_f32)


@dataclass(frozen=True, eq=False)
class OnednnRequantizer(Requantizer):
    """onednn's requantization (eqs. DN1-DN7), with its intermediates.

    The scales as torch hands them over (input_scale_reciprocal r_x, weight_scales_reciprocal r_w,
    output_scale_reciprocal r_y), as oneDNN uses them after inverting them back (input_scale_onednn s_x',
    weight_scales_onednn s_w' (N,), output_scale_onednn s_y'), output_scales (N,) = f32(s_x'·s_w'), dst_multiplier
    = f32(1/s_y'), compensation (N,) int32 = −z_x·Σ_k q_w (enters only with kernel "brgemm_amx"), kernel.
    """

    name: ClassVar[str] = "onednn"
    epilogue: ClassVar[str] = "onednn"
    kernel: str
    input_scale_reciprocal: np.float32
    weight_scales_reciprocal: np.ndarray
    output_scale_reciprocal: np.float32
    input_scale_onednn: np.float32
    weight_scales_onednn: np.ndarray
    output_scale_onednn: np.float32
    output_scales: np.ndarray
    dst_multiplier: np.float32
    bias: np.ndarray | None
    relu: bool
    output_zero_point: int
    compensation: np.ndarray

    @classmethod
    def build(cls, params: LinearQParams, prepacked: OnednnPackedWeight,
              options: EngineOptions = EngineOptions()) -> "OnednnRequantizer":
        """eqs. DN1-DN3 and the compensation of eq. DN4b."""
        N = params.out_features
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            r_x = np.float32(1.0 / params.input_scale)  # ideep::scale_t(1, 1.0/input_scale): double division
            r_y = np.float32(1.0 / params.output_scale)  # ideep::scale_t(1, 1.0/output_scale)
            s_x = np.float32(1.0 / np.float64(r_x))  # ideep: s = 1.0 / s (double, stored as float)
            s_w = _channel_vector((1.0 / prepacked.weight_scales_reciprocal.astype(np.float64)).astype(np.float32),
                                  N, np.float32)
            s_y = np.float32(np.float32(1) / r_y)  # ideep: s = dst_coeff / s with dst_coeff = 1.0f
            output_scales = (s_x * s_w).astype(np.float32)  # precompute_scales: src_scales[0] * wei_scales[c]
            dst_multiplier = np.float32(np.float32(1) / s_y)  # DEFINE_ARG_SCALES_BUFFER: 1.f / s
        row_sums_i64 = params.col_offsets.astype(np.int64)  # z_w = 0: col_offsets = Σ_k q_w[n, k]
        compensation = _wrap_int32(-np.int64(params.input_zero_point) * row_sums_i64).astype(np.int32)
        return cls(options.onednn_kernel, r_x, prepacked.weight_scales_reciprocal, r_y, s_x, s_w, s_y,
                   output_scales, dst_multiplier, params.bias, params.relu, params.output_zero_point, compensation)

    def _readable(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        return onednn_requantize_readable(raw_2d_i32, self.kernel, self.compensation, self.input_scale_onednn,
                                          self.weight_scales_onednn, self.output_scales, self.bias, self.relu,
                                          self.dst_multiplier, self.output_zero_point)

    def _fast(self, raw_2d_i32: np.ndarray) -> np.ndarray:
        out_u8 = np.empty(raw_2d_i32.shape, np.uint8)
        _onednn_requantize_rows(raw_2d_i32, *self.epilogue_constants(), out_u8)
        return out_u8

    def epilogue_constants(self) -> tuple:
        has_bias = self.bias is not None
        bias_f32 = self.bias if has_bias else np.zeros(len(self.compensation), np.float32)
        return (np.int64(_ONEDNN_KERNEL_CODES[self.kernel]), self.compensation, self.input_scale_onednn,
                self.weight_scales_onednn, self.output_scales, has_bias, bias_f32, self.relu, self.dst_multiplier,
                np.float32(self.output_zero_point))


# ================================================================================================================
# The engines
# ================================================================================================================

@dataclass(frozen=True)
class EngineSpec:
    """What refquant.linear.QuantizedLinear needs to know about an engine.

    requantization: the engine's own float path (the default scheme); prepack: the engine's weight handling and
    refusals (None: fbgemm's prepack is refquant.linear's eq. L3, nothing more); min_input_ndim: torch refuses
    lower-rank inputs ("Input tensor rank should be >= 2"; onednn accepts 1-D); empty_output_is_2d: onednn returns
    an empty input's output as (0, N) before reshaping (``if (output.numel() == 0) return output``);
    int16_pair_saturation: the engine has CPU kernels that saturate pairs of products (eq. M2).
    """

    name: str
    requantization: str
    prepack: Callable[[LinearQParams], object] | None
    min_input_ndim: int
    empty_output_is_2d: bool
    int16_pair_saturation: bool


ENGINE_SPECS: dict[str, EngineSpec] = {
    "fbgemm": EngineSpec("fbgemm", "fbgemm", None, 2, False, True),
    # qlinear_prepack.cpp QLinearPackWeightInt8::run packs for FBGEMM and X86 alike: x86's Linear is fbgemm's
    "x86": EngineSpec("x86", "fbgemm", None, 2, False, True),
    "qnnpack": EngineSpec("qnnpack", "qnnpack", qnnpack_prepack, 2, False, False),
    "onednn": EngineSpec("onednn", "onednn", onednn_prepack, 1, True, True),
}

register_requantization("fbgemm", FbgemmRequantizer.build, ("fbgemm", "x86"))
register_requantization("qnnpack", QnnpackRequantizer.build, ("qnnpack",))
register_requantization("onednn", OnednnRequantizer.build, ("onednn",))


def check_engine(engine: object) -> EngineSpec:
    """The spec of ``engine`` (a name of :data:`ENGINES`), or a ValueError listing the names."""
    if not isinstance(engine, str) or engine not in ENGINE_SPECS:
        raise ValueError(f"engine must be one of {ENGINES} (torch.backends.quantized.engine), got {engine!r}")
    return ENGINE_SPECS[engine]


def check_requantization(requantization: object, engine: str) -> RequantizationScheme:
    """The scheme named ``requantization`` (None: the engine's own float path), if it applies to ``engine``."""
    spec = check_engine(engine)
    name = spec.requantization if requantization is None else requantization
    if not isinstance(name, str) or name not in REQUANTIZATIONS:
        raise ValueError(f"requantization must be None (the engine's own float path) or one of "
                         f"{tuple(REQUANTIZATIONS)}, got {requantization!r}")
    scheme = REQUANTIZATIONS[name]
    if engine not in scheme.engines:
        raise ValueError(f"requantization={name!r} applies to engine(s) {scheme.engines}, not engine={engine!r}; "
                         f"engine {engine!r}'s own float path is requantization={spec.requantization!r} (None)")
    return scheme


def check_engine_options(engine: str, options: EngineOptions, saturate_int16_pairs: bool) -> None:
    """Refuse switches that do not concern ``engine`` (or contradict each other), naming them."""
    spec = check_engine(engine)
    if options.onednn_kernel not in ONEDNN_KERNELS:
        raise ValueError(f"onednn_kernel must be one of {ONEDNN_KERNELS}, got {options.onednn_kernel!r}")
    if options.onednn_kernel != "brgemm" and engine != "onednn":
        raise ValueError(f"onednn_kernel={options.onednn_kernel!r} models a oneDNN kernel; it applies to "
                         f"engine='onednn', not engine={engine!r}")
    if options.onednn_kernel == "brgemm_amx" and saturate_int16_pairs:
        raise ValueError("onednn_kernel='brgemm_amx' and saturate_int16_pairs=True contradict each other: AMX tiles "
                         "multiply exactly (every CPU with AMX has VNNI)")
    if options.qnnpack_cached_output_scale is not None and engine != "qnnpack":
        raise ValueError(f"qnnpack_cached_output_scale models torch's qnnpack cache; it applies to "
                         f"engine='qnnpack', not engine={engine!r}")
    if saturate_int16_pairs and not spec.int16_pair_saturation:
        raise ValueError(f"saturate_int16_pairs=True does not apply to engine={engine!r}: its x86 kernel (SSE2 "
                         f"4x4c2) multiplies zero-point-subtracted int16 values exactly and never saturates")
