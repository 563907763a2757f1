"""Quantized add, add_relu, mul, cat, relu and flatten on quint8 tensors, bit for bit as torch 2.13 runs them on x86.

What ``FloatFunctional`` becomes after ``convert`` (``QFunctional``: ``torch.ops.quantized.add`` / ``add_relu`` /
``mul`` / ``cat`` with the functional's own (scale, zero_point)), and what ``nn.ReLU`` and ``nn.Flatten`` do to a
quantized tensor. A quantized tensor is a :class:`QTensor`: uint8 codes with one scale and one zero point.

The elementwise ops (add, add_relu, mul) run through TensorIterator's ``cpu_kernel_vec`` with two lambdas: a vector
lambda (AVX2 ``Vectorized<quint8>``, 32 codes per register) and a scalar lambda. They do **not** round alike, so
which elements each lambda computes is part of the arithmetic (eq. F0):

    ranges   numel < 32768 or one thread: the single range [0, numel); otherwise at::parallel_for's OpenMP split
             into T = min(num_threads, ceil(numel / 32768)) ranges of ceil(numel / T) elements each
    vector   the first 64·floor(len / 64) elements of each range (vectorized_loop: two vectors per step)
    scalar   the rest of each range (basic_loop)                                                            (F0)

so on more than one thread tensors of >= 32768 elements get scalar elements in the middle: torch's codes then
depend on its thread count (``num_threads`` here, ``torch.get_num_threads()`` there). The positions count in memory
order: a channels-last operand pair (:attr:`QTensor.layout`) is walked in NHWC order, and operands of
different layouts are not vectorized at all -- every element takes the scalar lambda.

add / add_relu (``qadd_kernel``), with inv = f32(1 / f32(s)) for the output scale s::

    vector   da = fmaf(f32(q_a), f32(s_a), f32(f32(s_a) · −z_a))   dequantize with the premultiplied zero point
             c  = f32(da + db);   add_relu: c = max(c, 0)
             r  = cvtps2dq(min(f32(c · inv), 2147483520.0f))          round half to even, THEN
             q  = clamp(int32(r + z), 0, 255)                         add the zero point (wraps in int32)   (F1)
    scalar   da = f32(f32(q_a − z_a) · f32(s_a))                      dequantize_val (eq. D1)
             c  = f32(da + db);   add_relu: c = max(c, 0)
             q  = clamp(nearbyint(f32(f32(c · inv) + z)), 0, 255)     zero point added BEFORE rounding    (F2)

mul (``qmul_kernel``), with mult = f32(f32(f32(s_a) · f32(s_b)) · inv)::

    p = (q_a − z_a)·(q_b − z_b)                                                                 int32
    vector   q = clamp(int32(cvtps2dq(f32(f32(p) · mult)) + z), 0, 255)                                    (F3)
    scalar   q = clamp(cvtss2si64(f32(f64(p) · f64(mult))) + z, 0, 255)                                     (F4)

(the two differ only where |p · mult| >= 2^31 − 256: the vector's int32 overflows to code 0, the scalar's int64
saturates to 0 or 255). relu keeps the input's (scale, zero_point) and clamps the codes at the zero point::

    q = max(q_x, z_x)                                                                                        (F5)

cat (``quantized::cat``, generic path): dequantize every input (eq. D1), concatenate the floats, quantize with the
functional's (s, z) (eq. Q1, fbgemm's FMA)::

    q = quantize_per_tensor(concatenate([dequantize(q_i, s_i, z_i)], dim), s, z)                             (F6)

except for 4-D inputs that are all contiguous in channels-last layout with ``dim == 1`` (shapes (N, C, 1, 1) and
(N, 1, H, W) of ordinary contiguous tensors): ``qcat_nhwc_kernel`` copies the codes of an input whose (s_i, z_i)
equal (s, z), and otherwise requantizes each (n, h, w) position's channels c: F1's dequantize and quantize for
c < 8·floor(C_i / 8), F2's for the rest (eq. F7). Its output is channels-last in memory, which later ops keep.

flatten keeps codes and (scale, zero_point); it only reshapes (eq. F8).

Engines. fbgemm, x86 and onednn run all of the above (torch's quantized add, mul, cat and relu have no oneDNN
path: BinaryOps.cpp, qmul.cpp, qrelu.cpp and TensorShape.cpp dispatch to the same qadd/qmul/qrelu/qcat kernels
whatever ``torch.backends.quantized.engine`` says, except for qnnpack). On ``engine="qnnpack"`` ``add`` and
``add_relu`` of same-shape quint8 tensors run QNNPACK's ``q8vadd`` (SSE2 on x86), an integer kernel with
fixed-point multipliers (eqs. F9, F10); qnnpack's relu is QNNPACK's ``clamp`` with [z_x, 255], the same codes as
eq. F5; mul and cat have no QNNPACK path::

    r_a = f32(f32(s_a) / f32(s))   r_b = f32(f32(s_b) / f32(s))     each must lie in [2^-14, 2^8)
    shift = 21 − exponent(max(r_a, r_b))                                in [13, 31]  (max(r_a, r_b) >= 2^-10)
    m_a = lrintf(r_a · 2^shift)    m_b = lrintf(r_b · 2^shift)          round half to even; < 2^22     (F9)
    acc = m_a·(q_a − z_a) + m_b·(q_b − z_b)                              exact in int32
    q   = clamp(round_half_away(acc / 2^shift) + z, lo, 255)            lo = z with ReLU, else 0       (F10)

where round_half_away is QNNPACK's remainder test ``(acc >> shift) + ((acc & mask) − (acc < 0) > mask >> 1)``. The
vector loop (8 codes at a time) and the scalar loop compute the same integers, so neither the layout nor the thread
count changes a code.

Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/BinaryOps.cpp (qadd -> qadd_stub),
aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp (qadd_kernel, qmul_kernel, qrelu_kernel,
qcat_nhwc_kernel), aten/src/ATen/cpu/vec/vec256/vec256_qint.h (Vectorized<c10::quint8>::dequantize with
scale_zp_premul, ::quantize -> QuantizeAvx2, ::requantize_from_int -> RequantizeAvx2),
aten/src/ATen/native/quantized/AffineQuantizerBase.cpp (dequantize_val, quantize_val, requantize_from_int),
aten/src/ATen/native/quantized/cpu/TensorShape.cpp (quantized_cat_impl), aten/src/ATen/native/cpu/Loops.h
(vectorized_loop), aten/src/ATen/TensorIterator.cpp (for_each) and aten/src/ATen/ParallelOpenMP.h (invoke_parallel);
for qnnpack: aten/src/ATen/native/quantized/cpu/BinaryOps.cpp (qnnpack_add), pytorch/QNNPACK src/add.c
(qnnp_create_add_nc_q8), src/qnnpack/requantization.h (qnnp_compute_add_quantization_params) and
src/q8vadd/sse2.c (q8vadd_ukernel__sse2), aten/src/ATen/native/quantized/cpu/qrelu.cpp (qnnpack_relu).
torch 2.13's libtorch_cpu.so has these kernels for the DEFAULT and AVX2 capabilities only; an AVX-512 CPU runs the
AVX2 ones (checked in the disassembly). A CPU without AVX2, or ``ATEN_CPU_CAPABILITY=default``, runs the DEFAULT
kernels, which this module does not model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._float32 import cvtps2dq, fmaf
from .quantize import _quantize_scalar_path, check_scale, check_zero_point, dequantize, quantize_per_tensor

GRAIN_SIZE = 32768
"""at::internal::GRAIN_SIZE: TensorIterator splits an op between threads only from this many elements on."""

VECTOR_BLOCK = 64
"""Elements per step of vectorized_loop for uint8: two AVX2 ``Vectorized<quint8>`` of 32 codes."""

NHWC_FLOAT_LANES = 8
"""``Vectorized<float>::size()`` on AVX2: qcat_nhwc_kernel's vector loops cover channels in multiples of 8."""

INT32_FLOAT_MAX = np.float32(2147483520.0)
"""The largest float32 below 2^31; aten's QuantizeAvx2 clamps with it before cvtps2dq."""

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
"""``torch.backends.quantized.engine`` values whose add / add_relu / mul / cat / relu this module models."""


# ----------------------------------------------------------------------------------------------------------------
# The quantized tensor
# ----------------------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "strided")
"""How torch holds a quantized tensor in memory: row-major; NHWC (``torch.channels_last``); another strided view."""


@dataclass(frozen=True)
class QTensor:
    """A per-tensor affine quint8 tensor as torch holds it: ``codes`` is ``int_repr()`` (uint8), ``scale`` is
    ``q_scale()`` (a Python float, a double in torch), ``zero_point`` is ``q_zero_point()``.

    Value of a code: ``(codes − zero_point) · scale`` (:meth:`dequantize`, eq. D1).

    ``codes`` are in logical order; ``layout`` is torch's memory layout (:data:`LAYOUTS`): "channels_last" for the
    output of the channels-last cat (eq. F7) and of ops that keep their input's layout (relu, add, mul, cat);
    "strided" for a flatten that torch answers with a non-contiguous view. The layout decides which elements the
    vector lambda computes (eq. F0) and which cat path runs; channels-last matters only where NHWC order differs
    from the logical one (:attr:`is_channels_last`: 4-D with C > 1 and H·W > 1).
    """

    codes: np.ndarray
    scale: float
    zero_point: int
    layout: str = "contiguous"

    def __post_init__(self) -> None:
        if not isinstance(self.codes, np.ndarray) or self.codes.dtype != np.uint8:
            got = self.codes.dtype if isinstance(self.codes, np.ndarray) else type(self.codes).__name__
            raise TypeError(f"QTensor codes must be a uint8 NumPy array (quint8 codes), got {got}")
        check_scale(self.scale, "scale")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "zero_point", check_zero_point(self.zero_point, "quint8", "zero_point"))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "channels_last" and self.codes.ndim != 4:
            raise ValueError(f"the channels_last layout applies to 4-D tensors, got shape {self.codes.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def is_channels_last(self) -> bool:
        """True when torch's memory order (NHWC) differs from the logical order: channels_last, C > 1, H·W > 1."""
        return self.layout == "channels_last" and self.shape[1] > 1 and self.shape[2] * self.shape[3] > 1

    def suggests_channels_last(self) -> bool:
        """torch's ``suggest_memory_format() == channels_last``: channels-last strides, except the shape (N, 1, 1, 1)
        (torch falls back to contiguous for it). Ops that allocate "like the input" keep this layout."""
        return self.layout == "channels_last" and self.shape[1:] != (1, 1, 1)

    def strides(self) -> tuple[int, ...]:
        """torch's strides (in elements) for this shape and layout (not defined for "strided")."""
        if self.layout == "channels_last":
            n, c, h, w = (max(d, 1) for d in self.shape)
            return (h * w * c, 1, w * c, c)
        if self.layout == "strided":
            raise ValueError(f"a strided view of shape {self.shape} has no strides refquant knows")
        return _row_major_strides(self.shape)

    def memory_order(self) -> np.ndarray:
        """The codes as a 1-D array in the order torch holds them in memory (NHWC when :attr:`is_channels_last`)."""
        if self.layout == "strided":
            raise ValueError(f"a strided view of shape {self.shape} (a flatten torch answers with a non-contiguous "
                             f"view) has a memory order refquant does not model")
        if self.is_channels_last:
            return np.ascontiguousarray(np.moveaxis(self.codes, 1, -1)).reshape(-1)
        return np.ascontiguousarray(self.codes).reshape(-1)

    def from_memory_order(self, flat: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`memory_order` for this tensor's shape and layout: 1-D codes -> logical order."""
        if self.is_channels_last:
            n, c, h, w = self.shape
            return np.ascontiguousarray(np.moveaxis(flat.reshape(n, h, w, c), -1, 1))
        return flat.reshape(self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 values, ``f32(f32(q − z) · f32(s))`` (eq. D1; torch's ``Tensor.dequantize``)."""
        return dequantize(self.codes, self.scale, self.zero_point)


def _row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """``Tensor.is_contiguous()``: row-major strides, ignoring dimensions of size 1."""
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def view_strides(shape: tuple[int, ...], strides: tuple[int, ...], new_shape: tuple[int, ...]
                 ) -> tuple[int, ...] | None:
    """The strides of ``x.view(new_shape)``, or None where torch's ``reshape`` must copy instead.
    Matches: pytorch/pytorch aten/src/ATen/TensorUtils.cpp (computeStride)."""
    if math.prod(shape) == 0 or len(shape) == 0:
        return None
    new_strides = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    chunk_base_stride = strides[-1]
    tensor_numel = view_numel = 1
    for tensor_d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[tensor_d]
        if tensor_d == 0 or (shape[tensor_d - 1] != 1 and strides[tensor_d - 1] != tensor_numel * chunk_base_stride):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                new_strides[view_d] = view_numel * chunk_base_stride
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base_stride = strides[tensor_d - 1]
                tensor_numel = view_numel = 1
    return tuple(new_strides) if view_d == -1 else None


def _check_qtensor(q: object, argname: str) -> QTensor:
    if not isinstance(q, QTensor):
        raise TypeError(f"{argname} must be a refquant.functional.QTensor (quint8 codes with scale and zero point), "
                        f"got {type(q).__name__}")
    return q


def _check_output_qparams(scale: object, zero_point: object) -> tuple[float, int]:
    check_scale(scale, "scale")
    return float(scale), check_zero_point(zero_point, "quint8", "zero_point")


def _check_num_threads(num_threads: object) -> int:
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, numbers.Integral) \
            or int(num_threads) < 1:
        raise ValueError(f"num_threads must be an integer >= 1 (torch.get_num_threads()), got {num_threads!r}")
    return int(num_threads)


# ----------------------------------------------------------------------------------------------------------------
# Which elements the vector lambda computes (eq. F0)
# ----------------------------------------------------------------------------------------------------------------

def parallel_ranges(numel: int, num_threads: int = 1, grain_size: int = GRAIN_SIZE) -> list[tuple[int, int]]:
    """The [begin, end) ranges TensorIterator::for_each hands to its threads (eq. F0, first line).

    One range when ``numel < grain_size`` or one thread; otherwise at::parallel_for's OpenMP split: T =
    min(num_threads, ceil(numel / grain_size)) tasks of ceil(numel / T) elements, the last one shorter.
    Matches: pytorch/pytorch aten/src/ATen/TensorIterator.cpp (TensorIteratorBase::for_each) and
    aten/src/ATen/ParallelOpenMP.h (invoke_parallel).
    """
    num_threads = _check_num_threads(num_threads)
    if numel <= 0:
        return []
    if numel < grain_size or num_threads == 1:
        return [(0, numel)]
    tasks = min(num_threads, math.ceil(numel / grain_size))
    chunk = math.ceil(numel / tasks)
    return [(begin, min(numel, begin + chunk)) for begin in range(0, numel, chunk)]


def vectorized_mask(numel: int, num_threads: int = 1) -> np.ndarray:
    """Boolean (numel,): True where ``cpu_kernel_vec`` computes the element with the vector lambda (eq. F0).

    In each range, vectorized_loop steps 64 elements at a time while a whole step fits; basic_loop (the scalar
    lambda) takes the remaining ``len % 64``. Holds for contiguous, same-shape operands (what the model produces).
    Matches: pytorch/pytorch aten/src/ATen/native/cpu/Loops.h (vectorized_loop, VectorizedLoop2d).
    """
    mask = np.zeros(numel, bool)
    for begin, end in parallel_ranges(numel, num_threads):
        mask[begin:begin + (end - begin) // VECTOR_BLOCK * VECTOR_BLOCK] = True
    return mask


def binary_vectorized_mask(qa: "QTensor", qb: "QTensor", num_threads: int = 1) -> np.ndarray:
    """:func:`vectorized_mask` for ``qa op qb`` over memory-order positions (:meth:`QTensor.memory_order` of qa):
    operands of the same layout are walked as one contiguous range; operands of different layouts give the
    TensorIterator no contiguous inner dimension, so every element takes the scalar lambda."""
    if qa.is_channels_last != qb.is_channels_last:  # (qa.memory_order() refuses a strided view first)
        return np.zeros(qa.codes.size, bool)
    return vectorized_mask(qa.codes.size, num_threads)


# ----------------------------------------------------------------------------------------------------------------
# The building blocks: torch's vector and scalar dequantize, quantize and requantize
# ----------------------------------------------------------------------------------------------------------------

def dequantize_vec(q_u8: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``Vectorized<quint8>::dequantize(scale, zero_point, scale_zp_premul)``: one FMA per code (eq. F1, line 1)::

        premul = f32(f32(s) · −f32(z));   x = fmaf(f32(q), f32(s), premul)

    Not eq. D1 (``f32(f32(q − z) · s)``, torch's ``Tensor.dequantize`` and dequantize_val): the two differ in the
    last bit for many (q, s, z).
    """
    scale_f32 = np.float32(scale)
    premul_f32 = np.float32(scale_f32 * -np.float32(zero_point))  # self_scale_vec * self_zero_point_vec.neg()
    return fmaf(q_u8.astype(np.float32), scale_f32, premul_f32)  # vfmadd: q * scale + premul, one rounding


def dequantize_val(q_u8: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``at::native::dequantize_val``: ``f32(f32(q − z) · f32(s))`` — the same as eq. D1 (:func:`dequantize`)."""
    return dequantize(q_u8, scale, zero_point)


def quantize_vec(x_f32: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``Vectorized<quint8>::quantize`` (aten's ``QuantizeAvx2``): round, THEN add the zero point (eq. F1)::

        inv = f32(1 / f32(s));   t = min(f32(x · inv), 2147483520.0f)     (vminps: NaN -> the constant)
        q   = clamp(int32(cvtps2dq(t) + z), 0, 255)                        (vpaddd wraps; packs saturate)

    Unlike eq. Q1 (``quantize_per_tensor``, fbgemm's one-FMA quantize), the zero point is added to the rounded
    integer, and a value just below 2^31 wraps to a negative int32 (code 0) once the zero point is added.
    """
    scale_f32 = np.float32(scale)
    inv_f32 = np.float32(1) / scale_f32
    with np.errstate(over="ignore", invalid="ignore"):
        t_f32 = (x_f32 * inv_f32).astype(np.float32)  # vmulps
    t_f32 = np.fmin(t_f32, INT32_FLOAT_MAX)  # vminps(t, max): NaN -> max
    r_i32 = cvtps2dq(t_f32)  # round half to even; -inf / < -2^31 -> INT32_MIN
    q_i32 = np.add(r_i32, np.int32(zero_point), dtype=np.int32)  # vpaddd: wraps modulo 2^32
    return np.clip(q_i32, 0, 255).astype(np.uint8)  # vpackssdw + vpackuswb: saturate to [0, 255]


def quantize_val(x_f32: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``at::native::quantize_val<quint8>`` (fbgemm's scalar ``Quantize``): the zero point added BEFORE rounding::

        inv = f32(1 / f32(s));   t = f32(f32(x · inv) + f32(z));   q = clamp(nearbyint(t), 0, 255)   (NaN -> 0)

    The same arithmetic as eq. Q2 (refquant.quantize's scalar path), read off torch 2.13's binary.
    """
    inv_f32 = np.float32(1) / np.float32(scale)
    return _quantize_scalar_path(x_f32, inv_f32, np.float32(zero_point), 0, 255).astype(np.uint8)


def cvtss2si64(y_f32: np.ndarray) -> np.ndarray:
    """float32 -> int64 as x86's ``cvtss2si`` with a 64-bit destination: round half to even; NaN and |y| >= 2^63
    give INT64_MIN."""
    ok = np.isfinite(y_f32) & (np.abs(y_f32.astype(np.float64)) < 2.0**63)
    r = np.rint(np.where(ok, y_f32, np.float32(0))).astype(np.int64)
    return np.where(ok, r, np.int64(-(2**63)))


def requantize_from_int_vec(p_i32: np.ndarray, multiplier_f32: np.float32, zero_point: int) -> np.ndarray:
    """``Vectorized<quint8>::requantize_from_int`` (``RequantizeAvx2``), eq. F3::

        q = clamp(int32(cvtps2dq(f32(f32(p) · mult)) + z), 0, 255)      (no clamp before cvtps2dq)
    """
    with np.errstate(over="ignore", invalid="ignore"):
        y_f32 = (p_i32.astype(np.float32) * np.float32(multiplier_f32)).astype(np.float32)  # vcvtdq2ps, vmulps
    q_i32 = np.add(cvtps2dq(y_f32), np.int32(zero_point), dtype=np.int32)  # vcvtps2dq, vpaddd (wraps)
    return np.clip(q_i32, 0, 255).astype(np.uint8)  # saturating packs


def requantize_from_int_val(p_i32: np.ndarray, multiplier_f32: np.float32, zero_point: int) -> np.ndarray:
    """``at::native::requantize_from_int<quint8>``, eq. F4: the product in double, rounded to float32, then
    ``cvtss2si`` to int64 (``lrintf``)::

        q = clamp(cvtss2si64(f32(f64(p) · f64(mult))) + z, 0, 255)
    """
    with np.errstate(over="ignore", invalid="ignore"):
        y_f32 = (p_i32.astype(np.float64) * np.float64(np.float32(multiplier_f32))).astype(np.float32)
    r_i64 = cvtss2si64(y_f32)
    with np.errstate(over="ignore"):
        q_i64 = r_i64 + np.int64(zero_point)  # INT64_MIN + z stays negative
    return np.clip(q_i64, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# add, add_relu, mul
# ----------------------------------------------------------------------------------------------------------------

def _check_binary(qa: object, qb: object, op: str) -> tuple[QTensor, QTensor]:
    qa = _check_qtensor(qa, "qa")
    qb = _check_qtensor(qb, "qb")
    if qa.shape != qb.shape:
        # torch's fbgemm/x86 path allocates the output with qa's shape; refquant models same-shape operands only
        raise ValueError(f"quantized {op} needs operands of the same shape (refquant does not model broadcasting), "
                         f"got qa {qa.shape} and qb {qb.shape}")
    return qa, qb


def _operands_in_memory_order(qa: QTensor, qb: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """Both operands' codes, element by element in the output's memory order (the output takes qa's layout)."""
    qb.memory_order()  # refuses a strided view
    qb_in_qa_layout = QTensor(qb.codes, qb.scale, qb.zero_point, qa.layout)
    return qa.memory_order(), qb_in_qa_layout.memory_order()


def _output(qa: QTensor, flat_u8: np.ndarray, scale: float, zero_point: int) -> QTensor:
    """The output tensor: qa's layout (torch allocates it with ``qa.suggest_memory_format()``)."""
    layout = "channels_last" if qa.suggests_channels_last() else "contiguous"
    return QTensor(qa.from_memory_order(flat_u8), scale, zero_point, layout)


def _add(qa: QTensor, qb: QTensor, scale: float, zero_point: int, relu: bool, num_threads: int) -> QTensor:
    a_u8, b_u8 = _operands_in_memory_order(qa, qb)
    vec = binary_vectorized_mask(qa, qb, num_threads)
    out_u8 = np.empty(a_u8.size, np.uint8)
    # vector lambda (F1)
    c_f32 = (dequantize_vec(a_u8[vec], qa.scale, qa.zero_point)
             + dequantize_vec(b_u8[vec], qb.scale, qb.zero_point)).astype(np.float32)
    if relu:
        c_f32 = np.maximum(c_f32, np.float32(0))  # vec::maximum(c, 0)
    out_u8[vec] = quantize_vec(c_f32, scale, zero_point)
    # scalar lambda (F2)
    c_f32 = (dequantize_val(a_u8[~vec], qa.scale, qa.zero_point)
             + dequantize_val(b_u8[~vec], qb.scale, qb.zero_point)).astype(np.float32)
    if relu:
        c_f32 = np.maximum(c_f32, np.float32(0))  # std::max<float>(c, 0.0)
    out_u8[~vec] = quantize_val(c_f32, scale, zero_point)
    return _output(qa, out_u8, scale, zero_point)


def _check_engine(engine: object) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (torch.backends.quantized.engine), got {engine!r}")
    return engine


def add(qa: QTensor, qb: QTensor, scale: float, zero_point: int, *, num_threads: int = 1,
        engine: str = "x86") -> QTensor:
    """``torch.ops.quantized.add(qa, qb, scale, zero_point)``: eq. F1 on the vector elements, F2 on the rest (F0);
    on ``engine="qnnpack"`` QNNPACK's q8vadd (eqs. F9, F10).

    ``num_threads`` is torch's intra-op thread count; it matters only from 32,768 elements on (not on qnnpack).
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp (qadd_kernel<false>).
    """
    qa, qb = _check_binary(qa, qb, "add")
    scale, zero_point = _check_output_qparams(scale, zero_point)
    if _check_engine(engine) == "qnnpack":
        return qnnpack_add(qa, qb, scale, zero_point, relu=False)
    return _add(qa, qb, scale, zero_point, False, _check_num_threads(num_threads))


def add_relu(qa: QTensor, qb: QTensor, scale: float, zero_point: int, *, num_threads: int = 1,
             engine: str = "x86") -> QTensor:
    """``torch.ops.quantized.add_relu``: :func:`add` with ``c = max(c, 0)`` in float before quantizing (F1, F2);
    on qnnpack q8vadd with output_min = z (F10).

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp (qadd_kernel<true>).
    """
    qa, qb = _check_binary(qa, qb, "add_relu")
    scale, zero_point = _check_output_qparams(scale, zero_point)
    if _check_engine(engine) == "qnnpack":
        return qnnpack_add(qa, qb, scale, zero_point, relu=True)
    return _add(qa, qb, scale, zero_point, True, _check_num_threads(num_threads))


@dataclass(frozen=True)
class QnnpackAddParams:
    """QNNPACK's add quantization parameters (eq. F9): the float32 scale ratios, the shift, the fixed-point
    multipliers and the output range [output_min, output_max]."""

    a_output_scale: np.float32
    b_output_scale: np.float32
    shift: int
    a_multiplier: int
    b_multiplier: int
    output_min: int
    output_max: int


def qnnpack_add_params(a_scale: float, b_scale: float, scale: float, zero_point: int, relu: bool
                       ) -> QnnpackAddParams:
    """Eq. F9, with the refusals of ``pytorch_qnnp_create_add_nc_q8`` (torch then raises "failed to create QNNPACK
    Add operator").

    ``float`` arguments: torch passes its double scales to QNNPACK's float parameters (rounded to float32).
    Matches: pytorch/QNNPACK src/add.c (qnnp_create_add_nc_q8), src/qnnpack/requantization.h
    (qnnp_compute_add_quantization_params).
    """
    with np.errstate(over="ignore", under="ignore"):
        s_a, s_b, s = np.float32(a_scale), np.float32(b_scale), np.float32(scale)
    for name, v in (("qa's scale", s_a), ("qb's scale", s_b), ("the output scale", s)):
        if not (v > 0 and np.isfinite(v) and v >= np.finfo(np.float32).tiny):  # isnormal
            raise ValueError(f"qnnpack add: {name} must be a normal float32 > 0 (QNNPACK refuses the operator), got "
                             f"{float(v)!r}")
    output_min = zero_point if relu else 0  # activationLimits(RELU).first = zero_point
    if output_min >= 255:
        raise ValueError(f"qnnpack add_relu with output zero_point {zero_point}: QNNPACK refuses the output range "
                         f"[{output_min}, 255] (range min must be below range max)")
    with np.errstate(over="ignore", under="ignore"):
        r_a = np.float32(s_a / s)
        r_b = np.float32(s_b / s)
    for name, r in (("qa", r_a), ("qb", r_b)):
        if not np.float32(2.0**-14) <= r < np.float32(2.0**8):
            raise ValueError(f"qnnpack add: {name}'s scale / output scale = {float(r)!r} is outside [2**-14, 2**8), "
                             f"which QNNPACK refuses (torch raises 'failed to create QNNPACK Add operator')")
    r_max = max(r_a, r_b)
    exponent = int(np.array(r_max, np.float32).view(np.uint32) >> np.uint32(23)) - 127
    shift = 21 - exponent
    if shift > 31:  # QNNPACK asserts shift < 32; a release build shifts by shift mod 32
        raise ValueError(f"qnnpack add: both scale ratios are below 2**-10 (largest {float(r_max)!r}), where QNNPACK's "
                         f"shift {shift} leaves its documented range [13, 31]; refquant does not model this")
    scale_multiplier = np.float32(2.0**shift)  # fp32_from_bits((21 - exponent + 127) << 23)
    a_multiplier = int(np.rint(np.float32(r_a * scale_multiplier)))  # lrintf: round half to even
    b_multiplier = int(np.rint(np.float32(r_b * scale_multiplier)))
    return QnnpackAddParams(r_a, r_b, shift, a_multiplier, b_multiplier, output_min, 255)


def qnnpack_add(qa: QTensor, qb: QTensor, scale: float, zero_point: int, *, relu: bool = False) -> QTensor:
    """``quantized::add`` / ``add_relu`` on the qnnpack engine: QNNPACK's ``q8vadd`` (eq. F10) with eq. F9's
    parameters; the output takes qa's layout (``qa.suggest_memory_format()``).

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/BinaryOps.cpp (qnnpack_add) and pytorch/QNNPACK
    src/q8vadd/sse2.c (q8vadd_ukernel__sse2: the vector and the scalar loop give the same integers).
    """
    qa, qb = _check_binary(qa, qb, "add")
    scale, zero_point = _check_output_qparams(scale, zero_point)
    if len(qa.shape) == 0:
        raise ValueError("qnnpack add of 0-d tensors: torch refuses them ('qnnpack_add(): Got empty input tensor.')")
    p = qnnpack_add_params(qa.scale, qb.scale, scale, zero_point, relu)
    a_i64 = qa.codes.astype(np.int64) - np.int64(qa.zero_point)
    b_i64 = qb.codes.astype(np.int64) - np.int64(qb.zero_point)
    acc_i64 = np.int64(p.a_multiplier) * a_i64 + np.int64(p.b_multiplier) * b_i64  # = the int32 acc (no overflow)
    mask = (1 << p.shift) - 1
    remainder_i64 = (acc_i64 & mask) - (acc_i64 < 0)  # (acc & remainder_mask) - (acc < 0)
    q_i64 = (acc_i64 >> p.shift) + (remainder_i64 > (mask >> 1))  # asr, + 1 above the threshold: half away from 0
    q_i64 = np.clip(q_i64 + np.int64(zero_point), p.output_min, p.output_max)  # + y_zero_point, clamp [min, max]
    layout = "channels_last" if qa.suggests_channels_last() else "contiguous"
    return QTensor(q_i64.astype(np.uint8), scale, zero_point, layout)


def mul(qa: QTensor, qb: QTensor, scale: float, zero_point: int, *, num_threads: int = 1) -> QTensor:
    """``torch.ops.quantized.mul(qa, qb, scale, zero_point)``: the int32 product of the centred codes, requantized
    with one float32 multiplier (eq. F3 on the vector elements, F4 on the rest, F0)::

        inv = f32(1 / f32(s));   mult = f32(f32(f32(s_a) · f32(s_b)) · inv);   p = (q_a − z_a)·(q_b − z_b)

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp (qmul_kernel<false>).
    """
    qa, qb = _check_binary(qa, qb, "mul")
    scale, zero_point = _check_output_qparams(scale, zero_point)
    num_threads = _check_num_threads(num_threads)
    inv_f32 = np.float32(1) / np.float32(scale)
    multiplier_f32 = np.float32(np.float32(np.float32(qa.scale) * np.float32(qb.scale)) * inv_f32)
    a_u8, b_u8 = _operands_in_memory_order(qa, qb)
    p_i32 = (a_u8.astype(np.int32) - np.int32(qa.zero_point)) * (b_u8.astype(np.int32) - np.int32(qb.zero_point))
    vec = binary_vectorized_mask(qa, qb, num_threads)
    out_u8 = np.empty(a_u8.size, np.uint8)
    out_u8[vec] = requantize_from_int_vec(p_i32[vec], multiplier_f32, zero_point)
    out_u8[~vec] = requantize_from_int_val(p_i32[~vec], multiplier_f32, zero_point)
    return _output(qa, out_u8, scale, zero_point)


# ----------------------------------------------------------------------------------------------------------------
# relu, flatten
# ----------------------------------------------------------------------------------------------------------------

def relu(qx: QTensor) -> QTensor:
    """``torch.relu`` / ``nn.ReLU`` on a quantized tensor: ``max(q, z)`` with the input's (scale, zero_point) (F5).

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp (qrelu_kernel).
    """
    qx = _check_qtensor(qx, "qx")
    layout = "channels_last" if qx.suggests_channels_last() else "contiguous"  # suggest_memory_format()
    return QTensor(np.maximum(qx.codes, np.uint8(qx.zero_point)), qx.scale, qx.zero_point, layout)


def flatten_shape(shape: tuple[int, ...], start_dim: int = 1, end_dim: int = -1) -> tuple[int, ...]:
    """The shape ``torch.flatten(x, start_dim, end_dim)`` gives (negative dims count from the end; a 0-d tensor
    becomes 1-d), with torch's error for a dimension out of range."""
    ndim = max(len(shape), 1)
    dims = []
    for name, d in (("start_dim", start_dim), ("end_dim", end_dim)):
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not -ndim <= d < ndim:
            raise IndexError(f"flatten {name} out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
                             f"but got {d!r}) for an input of shape {shape}")
        dims.append(int(d) % ndim)
    start, end = dims
    if start > end:
        raise ValueError(f"flatten() has invalid args: start_dim {start_dim} cannot come after end_dim {end_dim}")
    if len(shape) == 0:
        return (1,)
    return shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]


def flatten(qx: QTensor, start_dim: int = 1, end_dim: int = -1) -> QTensor:
    """``nn.Flatten`` / ``torch.flatten`` on a quantized tensor: the same codes reshaped, same qparams (F8).

    ``start_dim == end_dim`` returns the tensor itself. Otherwise torch's ``reshape``: a view where the strides
    allow one (row-major if the input is; "strided" if not, e.g. merging H and W of a channels-last tensor), else
    a contiguous copy.
    """
    qx = _check_qtensor(qx, "qx")
    shape = flatten_shape(qx.shape, start_dim, end_dim)
    if len(qx.shape) and int(start_dim) % len(qx.shape) == int(end_dim) % len(qx.shape):
        return qx  # torch.flatten returns self
    if qx.layout == "contiguous":
        return QTensor(qx.codes.reshape(shape), qx.scale, qx.zero_point)
    strides = view_strides(qx.shape, qx.strides(), shape)
    layout = "contiguous" if strides is None or _is_contiguous(shape, strides) else "strided"
    return QTensor(qx.codes.reshape(shape), qx.scale, qx.zero_point, layout)


# ----------------------------------------------------------------------------------------------------------------
# cat
# ----------------------------------------------------------------------------------------------------------------

def _is_channels_last_contiguous(shape: tuple[int, ...]) -> bool:
    """``Tensor.is_contiguous(memory_format=torch.channels_last)`` for a 4-D row-major contiguous tensor: its
    strides must also be those of the NHWC layout, ignoring dimensions of size 1.
    Matches: pytorch/pytorch c10/core/TensorImpl.h (compute_channels_last_contiguous_2d)."""
    if len(shape) != 4:
        return False
    strides = (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)  # row-major (NCHW) strides
    expected = 1
    for d in (1, 3, 2, 0):
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def _cat_nhwc(qxs: list[QTensor], scale: float, zero_point: int) -> QTensor:
    """eq. F7: ``qcat_nhwc_kernel``, channel by channel in NHWC order."""
    n, _, h, w = qxs[0].shape
    blocks = []
    for qx in qxs:
        c = qx.shape[1]
        x_nhwc_u8 = np.ascontiguousarray(np.moveaxis(qx.codes, 1, -1))  # (N, H, W, C_i): what the kernel walks
        if qx.scale == scale and qx.zero_point == zero_point:
            blocks.append(x_nhwc_u8)  # is_fast_path: memcpy of the codes
            continue
        vec_c = c // NHWC_FLOAT_LANES * NHWC_FLOAT_LANES  # the 32-wide and 8-wide vector loops together
        out_u8 = np.empty_like(x_nhwc_u8)
        out_u8[..., :vec_c] = quantize_vec(dequantize_vec(x_nhwc_u8[..., :vec_c], qx.scale, qx.zero_point),
                                           scale, zero_point)
        out_u8[..., vec_c:] = quantize_val(dequantize_val(x_nhwc_u8[..., vec_c:], qx.scale, qx.zero_point),
                                           scale, zero_point)
        blocks.append(out_u8)
    out_nhwc_u8 = np.concatenate(blocks, axis=-1)
    return QTensor(np.ascontiguousarray(np.moveaxis(out_nhwc_u8, -1, 1)).reshape(n, -1, h, w), scale, zero_point,
                   "channels_last")  # allocated with MemoryFormat::ChannelsLast


def cat(qxs: list[QTensor], dim: int, scale: float, zero_point: int) -> QTensor:
    """``torch.ops.quantized.cat(qxs, dim, scale, zero_point)``: eq. F6, or F7 for channels-last 4-D inputs on
    ``dim == 1`` (the literal 1: torch checks ``dim == 1`` before wrapping negative dims).

    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/TensorShape.cpp (quantized_cat_impl) and
    aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp (qcat_nhwc_kernel).
    """
    if not isinstance(qxs, (list, tuple)) or len(qxs) == 0:
        raise ValueError(f"qxs must be a non-empty list of QTensor, got {qxs!r}")
    qxs = [_check_qtensor(q, f"qxs[{i}]") for i, q in enumerate(qxs)]
    scale, zero_point = _check_output_qparams(scale, zero_point)
    ndim = len(qxs[0].shape)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= dim < max(ndim, 1):
        raise IndexError(f"cat dim out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {dim!r})")
    for i, q in enumerate(qxs):
        if len(q.shape) != ndim or any(q.shape[d] != qxs[0].shape[d] for d in range(ndim) if d != dim % ndim):
            raise ValueError(f"cat: every input must have the shape of qxs[0] {qxs[0].shape} except in dim {dim}, "
                             f"got qxs[{i}] of shape {q.shape}")
    if dim == 1 and all(q.layout == "channels_last" or (q.layout == "contiguous"
                                                        and _is_channels_last_contiguous(q.shape)) for q in qxs):
        return _cat_nhwc(qxs, scale, zero_point)
    x_f32 = np.concatenate([q.dequantize() for q in qxs], axis=dim)  # eq. D1 per input, then at::cat
    channels_last = all(q.suggests_channels_last() for q in qxs)  # at::cat's output memory format, kept by quantize
    return QTensor(quantize_per_tensor(x_f32, scale, zero_point, "quint8"), scale, zero_point,  # eq. Q1
                   "channels_last" if channels_last and ndim == 4 else "contiguous")
