"""Float32 arithmetic exactly as the C++ in torch and fbgemm performs it.

NumPy rounds every float32 operation on its own, which is what most of torch does too. Two things it lacks:

* a fused multiply-add, ``fmaf(a, b, c) = f32(a * b + c)`` with a single rounding. The compiler contracts some
  multiply-adds in torch 2.13 and FBGEMM into ``vfmadd`` (quantize, linspace, the per-tensor bias term); mirroring
  them needs the same single rounding. :func:`fmaf` computes it exactly in NumPy; :func:`fma_f32` is the same
  operation for Numba kernels, emitted as LLVM's ``llvm.fma.f32`` (one ``vfmadd`` instruction on x86-64).
* ``cvtps2dq`` (float32 -> int32 with round-half-to-even), which maps NaN and every value outside int32 to
  INT32_MIN: :func:`cvtps2dq`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

INT32_MIN = np.int32(-(2**31))


def fmaf(a, b, c) -> np.ndarray:
    """f32(a * b + c) with ONE rounding, for float32 arrays (broadcasting), exactly as C's ``fmaf``.

    The product of two float32 values is exact in float64 (24 + 24 significant bits < 53). The sum
    ``p + c`` is then split error-free into ``s + e`` (Knuth's TwoSum), s = fl64(p + c). Rounding s to float32
    is correct except when s lies exactly halfway between two float32 values and e != 0: then the exact sum is
    just above or below the midpoint, and it rounds towards the side e points to.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    c = np.asarray(c, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        p = a.astype(np.float64) * b.astype(np.float64)  # exact
        c64 = c.astype(np.float64)
        s = p + c64
        bb = s - p  # TwoSum: e = (p - (s - bb)) + (c - bb) is the exact rounding error of s
        e = (p - (s - bb)) + (c64 - bb)
        r = s.astype(np.float32)  # round to nearest even: right unless s is a float32 midpoint
        r64 = r.astype(np.float64)
        below = np.where(r64 <= s, r, np.nextafter(r, np.float32(-np.inf)))  # float32 neighbours around s
        above = np.where(r64 >= s, r, np.nextafter(r, np.float32(np.inf)))
        midpoint = (s - below.astype(np.float64)) == (above.astype(np.float64) - s)
        fix = midpoint & np.isfinite(e) & (e != 0) & (below != above)
        r = np.where(fix & (e > 0), above, np.where(fix & (e < 0), below, r))
    return r.astype(np.float32)


def cvtps2dq(v: np.ndarray) -> np.ndarray:
    """float32 -> int32 as x86's ``cvtps2dq``: round half to even; NaN and |v| >= 2^31 give INT32_MIN."""
    v = np.asarray(v, np.float32)
    ok = np.isfinite(v) & (v >= np.float32(-(2.0**31))) & (v < np.float32(2.0**31))
    r = np.rint(np.where(ok, v, np.float32(0)))
    return np.where(ok, r.astype(np.int32), INT32_MIN)


@intrinsic
def _llvm_fma_f32(typingctx, a, b, c):
    """Numba intrinsic: LLVM's ``llvm.fma.f32`` (one ``vfmadd`` on x86-64; a correctly rounded libm call elsewhere)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fnty = ir.FunctionType(f32, [f32, f32, f32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


def fma_f32(a, b, c) -> np.float32:
    """Scalar float32 fused multiply-add ``a * b + c`` rounded once: usable in Numba kernels (where it compiles to
    ``llvm.fma.f32``) and in plain Python (where it is :func:`fmaf`, e.g. under ``NUMBA_DISABLE_JIT=1``)."""
    return fmaf(a, b, c)[()]


@overload(fma_f32)
def _fma_f32_numba(a, b, c):
    def impl(a, b, c):
        return _llvm_fma_f32(np.float32(a), np.float32(b), np.float32(c))

    return impl
