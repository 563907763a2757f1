"""16 lanes at once: the vector operations of the fused Linear call's epilogue (refquant.fused_linear), as LLVM ops.

The per-element requantizations of refquant.engines compile to scalar code (LLVM's loop vectoriser gave no gain on
them here), about half of the fused call's time. Their row versions (``<engine>_requantize_row``) repeat them on 16
outputs at once with these Numba intrinsics, each ONE LLVM vector operation with the rounding of its scalar
namesake: ``fmul``/``fadd`` (float32, RNE, no fastmath, never contracted), ``sitofp`` (cvtdq2ps), ``llvm.rint``
(round half to even under the default MXCSR), ``llvm.fma`` only where the scalar code has ``fma_f32``. The lanes
past a row's end (``n_valid`` < 16) are neither loaded nor stored (masked loads and stores).

Types: :data:`refquant.matmul.int32x16` and :data:`float32x16` (an LLVM ``<16 x float>``, one zmm register).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

from .matmul import _I1, _I8, _I32, _V16_I32, _lanes_below, _splat, int32x16

_F32 = ir.FloatType()
_V16_F32 = ir.VectorType(_F32, 16)
_V16_I1 = ir.VectorType(_I1, 16)
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
        mask = _lanes_below(builder, n_valid_v)
        fnty = ir.FunctionType(llty, [llty.as_pointer(), _I32, _V16_I1, llty])
        name = "llvm.masked.load.v16i32.p0" if llty is _V16_I32 else "llvm.masked.load.v16f32.p0"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, [ptr, ir.Constant(_I32, 4), mask, ir.Constant(llty, None)])

    return vty(arr, types.intp, types.intp), codegen


@intrinsic
def store16_u8(typingctx, arr, offset, codes, n_valid):
    """Element offset + c of the C-contiguous uint8 array ``arr`` (flat index) = uint8(codes[c]) for c < n_valid:
    ``codes`` (int32x16, each already in [0, 255]) truncated to bytes (``vpmovdb``) and stored masked."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype == types.uint8):
        raise TypingError(f"store16_u8 needs a C-contiguous uint8 array, got {arr}")

    def codegen(context, builder, signature, args):
        arr_v, offset_v, codes_v, n_valid_v = args
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=arr_v).data
        ptr = builder.bitcast(builder.gep(data, [offset_v]), _V16_I8.as_pointer())
        mask = _lanes_below(builder, n_valid_v)
        bytes_v = builder.trunc(codes_v, _V16_I8)
        _call(builder, "llvm.masked.store.v16i8.p0", ir.VoidType(), [bytes_v, ptr, ir.Constant(_I32, 1), mask])
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
_V16_I64 = ir.VectorType(_I64, 16)


def _c64(value: int):
    return ir.Constant(_V16_I64, [value] * 16)


@intrinsic
def tflite_requantize16(typingctx, raw, bias, multiplier, shift, zero_point, quant_min, quant_max):
    """refquant.fixed_point.requantize_tflite_scalar on 16 lanes (int32x16 raw, bias, multiplier, shift; splat
    zero_point, quant_min, quant_max as int32x16) -> int32x16 codes: each int64 step of the scalar function is one
    ``<16 x i64>`` operation (two zmm registers of 8 lanes), the same shifts, products, nudges and selects::

        acc = wrap32(raw + bias);  left = max(shift, 0);  right = max(−shift, 0)
        x = wrap32(acc · 2^left)
        SRDHM: INT32_MAX if x = M = INT32_MIN; ab = x·M; v = ab + (2^30 if ab >= 0 else 1 − 2^30);
               h = v >> 31 if v >= 0 else −((−v) >> 31)
        RDBPOT: mask = 2^right − 1; (h >> right) + ((h & mask) > (mask >> 1) + (h < 0))
        q = clamp(wrap32(that + z_y), quant_min, quant_max)
    """
    sig = int32x16(int32x16, int32x16, int32x16, int32x16, int32x16, int32x16, int32x16)

    def codegen(context, builder, signature, args):
        b = builder
        raw_v, bias_v, mult_v, shift_v, zp_v, qmin_v, qmax_v = (b.sext(a, _V16_I64) for a in args)
        zero, one = _c64(0), _c64(1)

        def wrap32(v):  # ((v + 2^31) & 0xFFFFFFFF) − 2^31, the int32 value v wraps to, is sext(trunc32(v)); LLVM
            return b.sext(b.trunc(v, _V16_I32), _V16_I64)  # then knows x·M below is 32 x 32 bits (vpmuldq)

        def select_max(x, y):
            return b.select(b.icmp_signed(">", x, y), x, y)

        acc = wrap32(b.add(raw_v, bias_v))
        left = b.select(b.icmp_signed(">", shift_v, zero), shift_v, zero)
        right = b.select(b.icmp_signed("<", shift_v, zero), b.neg(shift_v), zero)
        x = wrap32(b.shl(acc, left))  # acc·2^left: the same low 64 bits
        # SaturatingRoundingDoublingHighMul(x, M)
        overflow = b.and_(b.icmp_signed("==", x, mult_v), b.icmp_signed("==", x, _c64(-(2**31))))
        ab = b.mul(x, mult_v)
        nudge = b.select(b.icmp_signed(">=", ab, zero), _c64(1 << 30), _c64(1 - (1 << 30)))
        v = b.add(ab, nudge)
        high = b.select(b.icmp_signed(">=", v, zero), b.ashr(v, _c64(31)), b.neg(b.ashr(b.neg(v), _c64(31))))
        high = b.select(overflow, _c64(2**31 - 1), high)
        # RoundingDivideByPOT(high, right)
        mask = b.sub(b.shl(one, right), one)
        remainder = b.and_(high, mask)
        threshold = b.add(b.ashr(mask, one), b.zext(b.icmp_signed("<", high, zero), _V16_I64))
        divided = b.add(b.ashr(high, right), b.zext(b.icmp_signed(">", remainder, threshold), _V16_I64))
        q = wrap32(b.add(divided, zp_v))
        q = select_max(q, qmin_v)  # _clamp_scalar: below quant_min -> quant_min, above quant_max -> quant_max
        q = b.select(b.icmp_signed(">", q, qmax_v), qmax_v, q)
        return b.trunc(q, _V16_I32)

    return sig, codegen
