"""16 lanes at once: the vector operations of the fused Linear call's epilogue (refquant.fused_linear), as LLVM ops.

The per-element requantizations of refquant.engines compile to scalar code (LLVM's loop vectoriser gave no gain on
them here), about half of the fused call's time. Their row versions (``<engine>_requantize_row``) repeat them on 16
outputs at once with these Numba intrinsics, each ONE LLVM vector operation with the rounding of its scalar
namesake: ``fmul``/``fadd`` (float32, RNE, no fastmath, never contracted), ``sitofp`` (cvtdq2ps), ``llvm.rint``
(round half to even under the default MXCSR), ``llvm.fma`` only where the scalar code has ``fma_f32``. The lanes
past a row's end (``n_valid`` < 16) are neither loaded nor stored (masked loads and stores there, plain ones for
whole vectors: refquant.matmul.store_lanes).

The integer requantizations (refquant.fixed_point) run in int32 lanes too: their 32 x 32 -> 64-bit products are
exact int64 on the even lanes and on the odd lanes apart (``vpmuldq`` each, :func:`_products_even_odd`), rounded
and shifted there, and put back into int32 lanes by one ``vpermt2d``: gemmlowp's SaturatingRoundingDoublingHighMul
and RoundingDivideByPOT, FBGEMM's SaturatingRoundingMulWithShift and TFLite's single-rounding multiply, each an
intrinsic named after the scalar function it repeats.

Types: :data:`refquant.matmul.int32x16` and :data:`float32x16` (an LLVM ``<16 x float>``, one zmm register).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

from .matmul import _I8, _I32, _V16_I32, _splat, int32x16, load_lanes, store_lanes

_F32 = ir.FloatType()
_V16_F32 = ir.VectorType(_F32, 16)
_V16_I8 = ir.VectorType(_I8, 16)


class _Float32x16Type(types.Type):
    """Numba type of one 512-bit vector of 16 float32 lanes (an LLVM ``<16 x float>``)."""

    def __init__(self):
        super().__init__(name="float32x16")


float32x16 = _Float32x16Type()


@register_model(_Float32x16Type)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16_F32)


_VECTOR_OF = {types.int32: (int32x16, _V16_I32), types.float32: (float32x16, _V16_F32)}


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


@intrinsic
def load16(typingctx, arr, offset, n_valid):
    """arr[offset .. offset + n_valid - 1] of a C-contiguous int32 or float32 array in lanes 0 .. n_valid - 1,
    zeros above (a masked load: nothing past the row is read)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in _VECTOR_OF):
        raise TypingError(f"load16 needs a C-contiguous int32 or float32 array, got {arr}")
    vty, llty = _VECTOR_OF[arr.dtype]

    def codegen(context, builder, signature, args):
        arr_v, offset_v, n_valid_v = args
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=arr_v).data
        ptr = builder.bitcast(builder.gep(data, [offset_v]), llty.as_pointer())
        name = "llvm.masked.load.v16i32.p0" if llty is _V16_I32 else "llvm.masked.load.v16f32.p0"
        return load_lanes(builder, ptr, n_valid_v, name)

    return vty(arr, types.intp, types.intp), codegen


@intrinsic
def store16_u8(typingctx, arr, offset, codes, n_valid):
    """Element offset + c of the C-contiguous uint8 array ``arr`` (flat index) = uint8(codes[c]) for c < n_valid:
    ``codes`` (int32x16, each already in [0, 255]) truncated to bytes (``vpmovdb``), stored whole or masked
    (refquant.matmul.store_lanes)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype == types.uint8):
        raise TypingError(f"store16_u8 needs a C-contiguous uint8 array, got {arr}")

    def codegen(context, builder, signature, args):
        arr_v, offset_v, codes_v, n_valid_v = args
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=arr_v).data
        ptr = builder.bitcast(builder.gep(data, [offset_v]), _V16_I8.as_pointer())
        store_lanes(builder, builder.trunc(codes_v, _V16_I8), ptr, n_valid_v, "llvm.masked.store.v16i8.p0")
        return context.get_dummy_value()

    return types.void(arr, types.intp, int32x16, types.intp), codegen


@intrinsic
def splat16_f32(typingctx, x):
    """float32 x in all 16 lanes."""

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], signature.args[0], types.float32)
        return _splat(builder, v, _V16_F32)

    return float32x16(x), codegen


@intrinsic
def splat16_i32(typingctx, x):
    """int32(x) (low 32 bits) in all 16 lanes."""

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], signature.args[0], types.int32)
        return _splat(builder, v, _V16_I32)

    return int32x16(x), codegen


def _binary(name, vty, build):
    def typer(typingctx, a, b):
        if a != vty or b != vty:
            raise TypingError(f"{name} needs two {vty}, got {a}, {b}")

        def codegen(context, builder, signature, args):
            return build(builder, args[0], args[1])

        return vty(vty, vty), codegen

    typer.__name__ = name
    return intrinsic(typer)


mul16_f32 = _binary("mul16_f32", float32x16, lambda b, x, y: b.fmul(x, y))
"""Lane-wise f32(a·b) (``vmulps``)."""
add16_f32 = _binary("add16_f32", float32x16, lambda b, x, y: b.fadd(x, y))
"""Lane-wise f32(a + b) (``vaddps``)."""
add16_i32 = _binary("add16_i32", int32x16, lambda b, x, y: b.add(x, y))
"""Lane-wise int32 a + b, wrapping (``vpaddd``)."""
sub16_i32 = _binary("sub16_i32", int32x16, lambda b, x, y: b.sub(x, y))
"""Lane-wise int32 a − b, wrapping (``vpsubd``)."""
mul16_i32 = _binary("mul16_i32", int32x16, lambda b, x, y: b.mul(x, y))
"""Lane-wise int32 a·b, its low 32 bits (``vpmulld``)."""
min16_i32 = _binary("min16_i32", int32x16, lambda b, x, y: b.select(b.icmp_signed("<", x, y), x, y))
"""Lane-wise signed min (``vpminsd``)."""
max16_i32 = _binary("max16_i32", int32x16, lambda b, x, y: b.select(b.icmp_signed(">", x, y), x, y))
"""Lane-wise signed max (``vpmaxsd``)."""


@intrinsic
def fma16_f32(typingctx, a, b, c):
    """Lane-wise f32(a·b + c) with ONE rounding (``llvm.fma.v16f32``: ``vfmadd``), as _float32.fma_f32."""

    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.fma.v16f32", _V16_F32, list(args))

    return float32x16(float32x16, float32x16, float32x16), codegen


@intrinsic
def to16_f32(typingctx, v):
    """Lane-wise float32(int32) (``vcvtdq2ps``: RNE once |v| > 2^24)."""

    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], _V16_F32)

    return float32x16(int32x16), codegen


@intrinsic
def rint16_f32(typingctx, v):
    """Lane-wise round half to even (``llvm.rint.v16f32``: ``vrndscaleps``), as np.rint."""

    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.rint.v16f32", _V16_F32, [args[0]])

    return float32x16(float32x16), codegen


@intrinsic
def relu16_f32(typingctx, v):
    """Lane-wise ``v if v > 0 else +0.0`` (``vmaxps(v, 0)``: NaN and −0.0 give +0.0)."""

    def codegen(context, builder, signature, args):
        zero = ir.Constant(_V16_F32, None)
        return builder.select(builder.fcmp_ordered(">", args[0], zero), args[0], zero)

    return float32x16(float32x16), codegen


@intrinsic
def cvtps2dq16(typingctx, v):
    """Lane-wise x86 ``cvtps2dq``: rint(v) as int32 where −2^31 <= v < 2^31, else INT32_MIN (NaN too), eq. L10."""

    def codegen(context, builder, signature, args):
        v_v = args[0]
        lo = ir.Constant(_V16_F32, [-2147483648.0] * 16)
        hi = ir.Constant(_V16_F32, [2147483648.0] * 16)
        ok = builder.and_(builder.fcmp_ordered(">=", v_v, lo), builder.fcmp_ordered("<", v_v, hi))  # false for NaN
        safe = builder.select(ok, v_v, ir.Constant(_V16_F32, None))  # no out-of-range fptosi
        r = builder.fptosi(_call(builder, "llvm.rint.v16f32", _V16_F32, [safe]), _V16_I32)
        return builder.select(ok, r, ir.Constant(_V16_I32, [-2147483648] * 16))

    return int32x16(float32x16), codegen


@intrinsic
def saturate_u8_16_f32(typingctx, v):
    """Lane-wise oneDNN eq. DN7 as codes (int32x16): NaN -> 255 (cvtps2dq's INT32_MIN, which vpmovusdb saturates
    to 255), else rint(min(max(v, 0), 255))."""

    def codegen(context, builder, signature, args):
        v_v = args[0]
        zero = ir.Constant(_V16_F32, None)
        top = ir.Constant(_V16_F32, [255.0] * 16)
        nan = builder.fcmp_unordered("uno", v_v, v_v)
        c = builder.select(builder.fcmp_ordered("<", v_v, zero), zero, v_v)
        c = builder.select(builder.fcmp_ordered(">", c, top), top, c)
        c = builder.select(nan, top, c)
        return builder.fptosi(_call(builder, "llvm.rint.v16f32", _V16_F32, [c]), _V16_I32)

    return int32x16(float32x16), codegen


_I64 = ir.IntType(64)
_V8_I64 = ir.VectorType(_I64, 8)


def _c8x64(value: int):
    return ir.Constant(_V8_I64, [value] * 8)


def _c16x32(value: int):
    return ir.Constant(_V16_I32, [value] * 16)


shl16_i32 = _binary("shl16_i32", int32x16, lambda b, x, y: b.shl(x, y))
"""Lane-wise a·2^count modulo 2^32 (``vpsllvd``), for 0 <= count <= 31 (LLVM leaves a larger count undefined)."""


_ODD_TO_EVEN = ir.Constant(ir.VectorType(_I32, 16), [i | 1 for i in range(16)])  # lane 2k + 1 into 2k (and 2k + 1)


def _even_odd_i64(b, v):
    """The int32 lanes of ``v`` as two ``<8 x i64>``: lanes 0, 2, .., 14 and lanes 1, 3, .., 15, each sign-extended
    (element k = lane 2k, resp. 2k + 1): a 64-bit view of the register, and of the register with each odd lane
    copied down (``vpshufd``/``vmovshdup``). An exact product of two such vectors is one ``vpmuldq`` (signed
    32 x 32 -> 64 bits on the low halves), as LLVM sees that both sides have more than 32 sign bits."""
    c32 = _c8x64(32)

    def low_halves_extended(v32):
        v64 = b.bitcast(v32, _V8_I64)
        return b.ashr(b.shl(v64, c32), c32)

    return low_halves_extended(v), low_halves_extended(b.shuffle_vector(v, v, _ODD_TO_EVEN))


_EVEN_ODD_LOW_HALVES = ir.Constant(ir.VectorType(_I32, 16), [i for k in range(8) for i in (2 * k, 16 + 2 * k)])
_EVEN_ODD_HIGH_HALVES = ir.Constant(ir.VectorType(_I32, 16), [i + 1 for k in range(8) for i in (2 * k, 16 + 2 * k)])


def _low_halves(b, even, odd):
    """int32x16 whose lane 2k is the low 32 bits of even[k] and lane 2k + 1 those of odd[k] (one ``vpermt2d``): the
    int32 lanes back from :func:`_even_odd_i64`'s two halves, each wrapped to 32 bits."""
    return b.shuffle_vector(b.bitcast(even, _V16_I32), b.bitcast(odd, _V16_I32), _EVEN_ODD_LOW_HALVES)


def _high_halves(b, even, odd):
    """As :func:`_low_halves` with the HIGH 32 bits of each int64 (one ``vpermt2d``)."""
    return b.shuffle_vector(b.bitcast(even, _V16_I32), b.bitcast(odd, _V16_I32), _EVEN_ODD_HIGH_HALVES)


def _products_even_odd(b, x, y):
    """The exact int64 products x·y of the even lanes and of the odd lanes (two ``vpmuldq``)."""
    xe, xo = _even_odd_i64(b, x)
    ye, yo = _even_odd_i64(b, y)
    return b.mul(xe, ye), b.mul(xo, yo)


@intrinsic
def saturating_rounding_doubling_high_mul16(typingctx, a, b):
    """Lane-wise refquant.fixed_point.saturating_rounding_doubling_high_mul_scalar (gemmlowp's
    SaturatingRoundingDoublingHighMul) on int32 lanes, every step exact::

        ab = a·b                     exact int64, even and odd lanes apart (vpmuldq each)
        h  = (ab + 2^30) >> 31       floor(ab / 2^31 + 1/2): the high 32 bits of 2·(ab + 2^30) (bits 31..62 of
                                     ab + 2^30, two vpaddq), one vpermt2d for both halves
        INT32_MAX where h is INT32_MIN

    That is gemmlowp's nudge-and-truncate, for both signs: for ab >= 0, (ab + 2^30) / 2^31 truncated is the floor;
    for ab < 0, v = ab + 1 − 2^30 < 0 and truncating v / 2^31 towards zero is floor((v + 2^31 − 1) / 2^31) =
    floor((ab + 2^30) / 2^31). |ab| <= 2^62, so ab + 2^30 fits int64, and so does 2·(ab + 2^30) except for
    ab = 2^62 (a = b = INT32_MIN), where it wraps (LLVM's add) to a high half 0x80000000 = INT32_MIN. And the
    saturation: −2^62 + 2^31 <= ab <= 2^62 gives −2^31 + 1 <= h <= 2^31, with h = 2^31 (seen as INT32_MIN) only for
    a = b = INT32_MIN, the one product gemmlowp saturates to INT32_MAX; so no other lane has INT32_MIN there.

    Matches: google/gemmlowp fixedpoint/fixedpoint.h (SaturatingRoundingDoublingHighMul, int32 scalar and its SIMD
    versions), as tensorflow/tensorflow tensorflow/lite/kernels/internal/common.h (MultiplyByQuantizedMultiplier)
    calls it."""
    if a != int32x16 or b != int32x16:
        raise TypingError(f"saturating_rounding_doubling_high_mul16 needs two int32x16, got {a}, {b}")

    def codegen(context, builder, signature, args):
        bld = builder
        even, odd = _products_even_odd(bld, *args)
        half = _c8x64(1 << 30)

        def doubled(p):  # 2·(ab + 2^30): its high 32 bits are those of (ab + 2^30) >> 31 (adds, not shifts)
            t = bld.add(p, half)
            return bld.add(t, t)

        high = _high_halves(bld, doubled(even), doubled(odd))
        overflow = bld.icmp_signed("==", high, _c16x32(-(2**31)))  # a = b = INT32_MIN, and only there
        return bld.select(overflow, _c16x32(2**31 - 1), high)

    return int32x16(int32x16, int32x16), codegen


@intrinsic
def rounding_divide_by_pot16(typingctx, x, exponent, mask, half_mask):
    """Lane-wise refquant.fixed_point.rounding_divide_by_pot_scalar (gemmlowp's RoundingDivideByPOT) in int32 lanes,
    0 <= exponent <= 31, with mask = 2^exponent − 1 and half_mask = mask >> 1 given (per-channel constants):
    x / 2^exponent rounded to nearest, ties away from zero::

        remainder = x & mask;  threshold = half_mask + (x < 0);  (x >> exponent) + (remainder > threshold)

    Every term is the int64 scalar's value (0 <= remainder <= mask <= 2^31 − 1, threshold <= 2^30), so nothing
    wraps. Matches: google/gemmlowp fixedpoint/fixedpoint.h (RoundingDivideByPOT)."""
    if any(v != int32x16 for v in (x, exponent, mask, half_mask)):
        raise TypingError(f"rounding_divide_by_pot16 needs four int32x16, got {x}, {exponent}, {mask}, {half_mask}")

    def codegen(context, builder, signature, args):
        b = builder
        x_v, e_v, mask_v, half_v = args
        remainder = b.and_(x_v, mask_v)
        threshold = b.add(half_v, b.zext(b.icmp_signed("<", x_v, _c16x32(0)), _V16_I32))
        return b.add(b.ashr(x_v, e_v), b.zext(b.icmp_signed(">", remainder, threshold), _V16_I32))

    return int32x16(int32x16, int32x16, int32x16, int32x16), codegen


def _halved_shift_even_odd(b, x, y, right_shift):
    """floor(x·y / 2^(s − 1)) for the even and the odd lanes, exact int64 (s = right_shift's lane, s − 1 >= 0): the
    first half of :func:`_round_half_up_of_halved` (vpmuldq, vpsravq)."""
    even, odd = _products_even_odd(b, x, y)
    s64 = b.bitcast(b.sub(right_shift, _c16x32(1)), _V8_I64)
    s_even = b.and_(s64, _c8x64(0xFFFFFFFF))  # s − 1 >= 0: zero-extended is sign-extended
    s_odd = b.lshr(s64, _c8x64(32))
    return b.ashr(even, s_even), b.ashr(odd, s_odd)


def _round_half_up_of_halved(b, t, one):
    """(t + 1) >> 1 for t = floor(p / 2^(s − 1)): equals (p + 2^(s − 1)) >> s = floor(p / 2^s + 1/2), since
    floor((floor(y) + 1) / 2) = floor((y + 1) / 2) for every real y (here y = p / 2^(s − 1))."""
    return b.ashr(b.add(t, one), one)


@intrinsic
def saturating_rounding_mul_with_shift16(typingctx, a, b, right_shift):
    """Lane-wise refquant.fixed_point.saturating_rounding_mul_with_shift_scalar (FBGEMM's
    SaturatingRoundingMulWithShift), 1 <= right_shift <= 63, SATURATED to [−2^29, 2^29] (the scalar keeps the int64
    value: a caller clamping into a range inside it, plus a small zero point, gets the same codes)::

        t = floor(a·b / 2^(s − 1))          exact int64, even and odd lanes apart (vpmuldq, vpsravq)
        t = clamp(t, −2^30, 2^30)           (vpmaxsq, vpminsq), then int32 lanes
        (t + 1) >> 1                        = (a·b + 2^(s − 1)) >> s, saturated to [−2^29, 2^29]
        −1 where a = b = INT32_MIN and s = 63 (the scalar's int64 sum 2^62 + 2^62 wraps to −2^63 there)

    (a t beyond ±2^30 would give a result beyond ±2^29, and the clamped t gives exactly ±2^29.)
    Matches: pytorch/FBGEMM src/QuantUtils.cc (SaturatingRoundingMulWithShift)."""
    if a != int32x16 or b != int32x16 or right_shift != int32x16:
        raise TypingError(f"saturating_rounding_mul_with_shift16 needs three int32x16, got {a}, {b}, {right_shift}")

    def codegen(context, builder, signature, args):
        bld = builder
        lo, hi = _c8x64(-(2**30)), _c8x64(2**30)

        def clamped(v):
            v = bld.select(bld.icmp_signed("<", v, lo), lo, v)
            return bld.select(bld.icmp_signed(">", v, hi), hi, v)

        even, odd = _halved_shift_even_odd(bld, *args)
        r = _round_half_up_of_halved(bld, _low_halves(bld, clamped(even), clamped(odd)), _c16x32(1))
        x, multiplier, shift = args  # the scalar's one int64 overflow: INT32_MIN·INT32_MIN + 2^62 at s = 63
        min32 = _c16x32(-(2**31))
        wraps = bld.and_(bld.and_(bld.icmp_signed("==", x, min32), bld.icmp_signed("==", multiplier, min32)),
                         bld.icmp_signed("==", shift, _c16x32(63)))
        return bld.select(wraps, _c16x32(-1), r)  # (−2^63) >> 63 = −1, as the scalar and the readable function

    return int32x16(int32x16, int32x16, int32x16), codegen


@intrinsic
def multiply_by_quantized_multiplier_single_rounding16(typingctx, x, quantized_multiplier, shift):
    """Lane-wise refquant.fixed_point.multiply_by_quantized_multiplier_single_rounding_scalar (TFLite's
    MultiplyByQuantizedMultiplier built with TFLITE_SINGLE_ROUNDING), −31 <= shift <= 30::

        total = 31 − shift (1..62);  wrap32((x·M + 2^(total − 1)) >> total)

    exact in int64 on even and odd lanes apart, as ((x·M >> (total − 1)) + 1) >> 1 (vpmuldq, vpsravq), then the low
    32 bits (the scalar's wrap32). Matches: tensorflow/tensorflow tensorflow/lite/kernels/internal/common.cc
    (MultiplyByQuantizedMultiplier, #if TFLITE_SINGLE_ROUNDING)."""
    if x != int32x16 or quantized_multiplier != int32x16 or shift != int32x16:
        raise TypingError(f"multiply_by_quantized_multiplier_single_rounding16 needs three int32x16, got {x}, "
                          f"{quantized_multiplier}, {shift}")

    def codegen(context, builder, signature, args):
        x_v, m_v, shift_v = args
        even, odd = _halved_shift_even_odd(builder, x_v, m_v, builder.sub(_c16x32(31), shift_v))
        one = _c8x64(1)
        return _low_halves(builder, _round_half_up_of_halved(builder, even, one),
                           _round_half_up_of_halved(builder, odd, one))

    return int32x16(int32x16, int32x16, int32x16), codegen
