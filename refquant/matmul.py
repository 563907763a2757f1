"""The integer product at the heart of a quantized Linear: uint8 activations times int8 weights, int32 sums.

    acc_i32[m, n] = sum_k x_u8[m, k] * w_i8[n, k]                                            (eq. M1)

Every product fits in 16 bits (255 * -128 .. 255 * 127) and fbgemm sums them in int32, which wraps on
overflow (only possible for K > 65,793 at full range).

Matches: pytorch/FBGEMM src/RefImplementations.cc (matmul_u8i8acc32_ref); on CPUs with AVX-512 VNNI fbgemm's
kernel is src/GenerateKernelU8S8S32ACC32Avx512VNNI.cc (``vpdpbusd``: 4 products added to an int32 lane, wrapping).

CPUs without VNNI (plain AVX2 / AVX-512) multiply with ``vpmaddubsw``, which adds each pair of neighbouring
products (k = 2j, 2j + 1) and saturates that pair sum to int16 before it reaches the int32 accumulator:

    acc_i32[m, n] = sum_j sat16(x[m, 2j] * w[n, 2j] + x[m, 2j+1] * w[n, 2j+1])               (eq. M2)

Matches: pytorch/FBGEMM src/GenerateKernelU8S8S32ACC32.cc (genComputeBlock: ``vpbroadcastd`` of 4 bytes of A,
``vpmaddubsw`` with 64 bytes of packed B, ``vpmaddwd`` with 16-bit ones, ``vpaddd``). Which products form a pair
follows from the packing: PackBMatrix (src/PackBMatrix.cc, ``addr``) stores B with ROW_INTERLEAVE = 4
(include/fbgemm/PackingTraits-inl.h, both the avx2 and avx512 int32 traits), so each int32 lane holds
w[k..k+3, n] with k a multiple of 4 (K blocks KCB = 256 or 512 are multiples of 4 too), and the broadcast dword
of A holds x[m, k..k+3]; ``vpmaddubsw`` pairs bytes (0, 1) and (2, 3) of a lane, i.e. k = (2j, 2j+1) counted
from k = 0. K is padded to a multiple of 4 with zero weights ("fill the remaining with zero" in
PackBMatrix::pack), and a zero product leaves a pair sum unchanged, so odd K needs nothing special.

oneDNN's ``gemm:jit`` (its int8 GEMM on AVX2 CPUs) forms the same pairs, but within each K block of its own: for
256 < K < 768 it splits K in two at b = (K + 1) // 2, and the pairs of the second block start at k = b::

    acc_i32[m, n] = M2(x[m, :b], w[n, :b]) + M2(x[m, b:], w[n, b:])                            (eq. M2b)

which differs from eq. M2 only where b is odd (the pair (b − 1, b) of eq. M2 is split into (b − 1, 0) and
(b, b + 1)). Refquant's kernels compute eq. M2b as eq. M2 on operands with a zero k inserted before k = b
(:class:`PairsRestart`): a zero product changes no pair sum, and every k from b on moves one pair position.
Matches: oneapi-src/oneDNN src/cpu/x64/gemm/gemm_driver.cpp (get_k_padd: one block for K <= bk_traditional = 256,
two of rnd_up((K + 1) / 2, uk) for K < 2·bk = 768, else blocks of bk = 384, even, which change no pair); measured
on an AMD EPYC (Zen 3, AVX2 without VNNI; torch 2.13, oneDNN's matmul ``gemm:jit``): every K from 2 to 1,400 and
every 97th to 4,311, M = 1, 7, 64, one and two threads: the pairs restart at b exactly where the rule says.

Fast kernels
------------
:func:`matmul_u8s8_acc32` runs one of four kernels (``kernel=`` or the environment variable
``REFQUANT_MATMUL_KERNEL``; default ``"auto"``, the best this CPU runs):

* ``"amx"`` (eq. M1 only): Intel AMX-INT8 tiles, ``tdpbusd`` on 16 x 16 int32 tiles (refquant.amx), which fbgemm's
  VNNI kernel does not use but oneDNN's brgemm does on these CPUs. ``"auto"`` picks it where the CPU and Numba's
  target have amx-tile, amx-int8 (and avx512vnni, for what the tiles leave) and Linux grants the tile data;
  ``kernel="amx"`` elsewhere is a RuntimeError naming what is missing. Rows below a whole 16 (all of M < 16, e.g. batch 1) and the last K mod 64
  k run on the ``vpdpbusd`` tiles below inside it.
* ``"avx512"``: Numba with LLVM's x86 intrinsics, the instructions fbgemm emits: eq. M1 with ``vpdpbusd`` (needs
  ``avx512vnni``), eq. M2 with ``vpmaddubsw`` + ``vpmaddwd`` (needs ``avx512bw``). A missing feature is a
  RuntimeError, never an illegal instruction.
* ``"avx2"`` (eq. M2 only): fbgemm's AVX2 instructions (src/GenerateKernelU8S8S32ACC32.cc, inst_set_t::avx2):
  ``vpmaddubsw`` + ``vpmaddwd`` with ones on the two 256-bit halves of each 16-lane vector; ``"auto"`` picks it
  for eq. M2 where avx512bw is missing and avx2 is there. Its tile is one row x 64 columns (8 ymm accumulators of
  the 16 registers; the weights are memory operands of ``vpmaddubsw``): the accumulators are not inputs of the
  multiplies, so one row keeps both multiply pipes busy. Zen 3, 2 cores: ~130 GMAC/s for the fused call at
  1024^3, ~3x the portable kernel. Eq. M1 on codes <= 127 (the 7-bit codes of ``reduce_range``, e.g. the dynamic
  Linear's on fbgemm/x86) is eq. M2 (no pair can saturate), so :func:`kernel_for_seven_bit_codes` runs it here too.
* ``"portable"``: the same tiles with LLVM's generic vector operations (16-bit products, exact, widened to int32;
  ``llvm.sadd.sat`` for eq. M2), which LLVM compiles for any CPU Numba supports.
* ``"reference"``: the readable NumPy functions below.

All kernels give the same bits (tests/test_matmul.py). Structure, as fbgemm's (src/Fbgemm.cc fbgemmPacked, src/ExecuteKernelU8S8.cc):

1. the weight is packed once (:func:`pack_weight_s8`) into panels of 64 columns; a panel's row g is the 256 bytes one
   step of a tile reads: 4 vectors of 16 int32 lanes, lane n holding w[n, 4g .. 4g+3];
2. a tile keeps 6 rows x 64 columns of int32 sums in 24 of the 32 zmm registers (fbgemm VNNI: 8 x 48) while it
   walks 512 k (fbgemm's KCB), so the 32 KB of weights it reads stay in L1 for the 16 tiles of a task; each step
   broadcasts 4 bytes of x per row and issues 24 ``vpdpbusd``;
3. tasks (96 rows x one panel) are shared by the cores on refquant's own thread pool (:mod:`refquant._threads`:
   each thread takes its own share of tasks first, then helps with the others'); below 2^22 multiply-adds, one
   thread. Not Numba's ``prange``: under its GNU OpenMP layer a process forked after a parallel product killed its
   child. The pool is fork-safe and may be used by several Python threads at once.

At (M, K, N) = 1024^3 on this machine (Xeon, AVX-512 VNNI, 2 cores): ~650 GMAC/s, about 1.1x fbgemm, on an idle
machine (~400 with other jobs); the AMX kernel ~700 at 1024^3 with other jobs running (~460 on one core). The history
of attempts and the other shapes are in benchmarks/README.md.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.core.errors import TypingError
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from ._dispatch import SmallCalls
from ._threads import DEFAULT_THREADS, finish_item, item_to_try, share_items, take_item, threads_for

# --------------------------------------------------------------------------------------------------------------
# Readable references
# --------------------------------------------------------------------------------------------------------------


def matmul_u8s8_acc32_ref(x_u8: np.ndarray, w_i8: np.ndarray) -> np.ndarray:
    """Readable reference of eq. M1: (M, K) uint8 x (N, K) int8 -> (M, N) int32, wrapping like int32."""
    x_i64 = x_u8.astype(np.int64)
    w_i64 = w_i8.astype(np.int64)
    acc_i64 = x_i64 @ w_i64.T  # exact: |sum| < 2^63 for any K numpy can hold
    return acc_i64.astype(np.int32)  # int64 -> int32 keeps the low 32 bits: the wrap fbgemm's int32 adds give


def matmul_u8s8_acc32_sat16_ref(x_u8: np.ndarray, w_i8: np.ndarray) -> np.ndarray:
    """Readable reference of eq. M2: products summed in pairs (2j, 2j+1), each pair sum saturated to int16."""
    M, K = x_u8.shape
    N = w_i8.shape[0]
    if K % 2:  # fbgemm pads K with zeros to its interleave width; a zero product changes no pair sum
        x_u8 = np.concatenate([x_u8, np.zeros((M, 1), np.uint8)], axis=1)
        w_i8 = np.concatenate([w_i8, np.zeros((N, 1), np.int8)], axis=1)
    x_i32 = x_u8.astype(np.int32)
    w_i32 = w_i8.astype(np.int32)
    acc_i64 = np.zeros((M, N), np.int64)
    for j in range(0, x_i32.shape[1], 2):
        pair_i32 = np.outer(x_i32[:, j], w_i32[:, j]) + np.outer(x_i32[:, j + 1], w_i32[:, j + 1])
        acc_i64 += np.clip(pair_i32, -32768, 32767)  # vpmaddubsw: saturate the pair sum to int16
    return acc_i64.astype(np.int32)


def matmul_u8s8_acc32_sat16_blocks_ref(x_u8: np.ndarray, w_i8: np.ndarray, block_start: int) -> np.ndarray:
    """Readable reference of eq. M2b: eq. M2 on k < block_start and on k >= block_start, summed in int32."""
    first_i32 = matmul_u8s8_acc32_sat16_ref(x_u8[:, :block_start], w_i8[:, :block_start])
    second_i32 = matmul_u8s8_acc32_sat16_ref(x_u8[:, block_start:], w_i8[:, block_start:])
    return np.add(first_i32, second_i32, dtype=np.int32)  # int32 adds wrap, as the kernel's


# --------------------------------------------------------------------------------------------------------------
# The packed weight
# --------------------------------------------------------------------------------------------------------------

PANEL_COLS = 64  # output columns per weight panel and per tile: 4 vectors of 16 int32 lanes
K_GROUP = 4  # consecutive k in one int32 lane (fbgemm's ROW_INTERLEAVE for int32 accumulation)


@dataclass(frozen=True, eq=False)
class PackedWeightS8:
    """An (N, K) int8 weight prepared once for repeated products (the analogue of fbgemm's PackBMatrix).

    ``panels_i8[p, g, c, r] = w_i8[64 p + c, 4 g + r]`` (zero where n >= N or k >= K): panel ``p`` holds columns
    64p .. 64p + 63; its row ``g`` is 256 bytes = four 64-byte vectors, lane c of vector v holding the 4 weights
    w[64p + 16v + c, 4g .. 4g + 3] that ``vpdpbusd`` / ``vpmaddubsw`` multiply with the 4 bytes x[m, 4g .. 4g + 3].
    The same byte order as PackBMatrix (src/PackBMatrix.cc, ``addr``) with ROW_INTERLEAVE = 4.
    """

    w_i8: np.ndarray  # (N, K) int8, C-contiguous
    panels_i8: np.ndarray  # (ceil(N / 64), ceil(K / 4), 64, 4) int8, C-contiguous

    def __post_init__(self):
        """The kernels read panels_i8 without bounds checks: refuse one that does not fit w_i8."""
        N, K = self.w_i8.shape
        expected = (-(-N // PANEL_COLS), -(-K // K_GROUP), PANEL_COLS, K_GROUP)
        p = self.panels_i8
        if not (isinstance(p, np.ndarray) and p.dtype == np.int8 and p.shape == expected and p.flags.c_contiguous):
            raise ValueError(f"panels_i8 must be a C-contiguous int8 array of shape {expected} for w_i8 of shape "
                             f"{(N, K)}, got {_describe(p)} of shape {getattr(p, 'shape', None)}; "
                             f"use pack_weight_s8(w_i8)")

    @property
    def shape(self) -> tuple[int, int]:
        return self.w_i8.shape


def pack_weight_s8(w_i8: np.ndarray) -> PackedWeightS8:
    """Prepare an (N, K) int8 weight for :func:`matmul_u8s8_acc32`."""
    if not isinstance(w_i8, np.ndarray) or w_i8.dtype != np.int8:
        raise TypeError(f"w_i8 must be an int8 numpy array, got {_describe(w_i8)}")
    if w_i8.ndim != 2:
        raise ValueError(f"w_i8 must be 2-D (N, K), got shape {w_i8.shape}")
    w_i8 = np.ascontiguousarray(w_i8)
    N, K = w_i8.shape
    n_panels = -(-N // PANEL_COLS)
    n_groups = -(-K // K_GROUP)
    padded_i8 = np.zeros((n_panels * PANEL_COLS, n_groups * K_GROUP), np.int8)
    padded_i8[:N, :K] = w_i8
    panels_i8 = aligned_zeros((n_panels, n_groups, PANEL_COLS, K_GROUP), np.int8)  # AMX's B tiles: aligned rows
    panels_i8[:] = padded_i8.reshape(n_panels, PANEL_COLS, n_groups, K_GROUP).transpose(0, 2, 1, 3)
    return PackedWeightS8(w_i8, panels_i8)


@dataclass(frozen=True, eq=False)
class PairsRestart:
    """Eq. M2b on the kernels of eq. M2: int16 pairs that start afresh at ``k`` (odd), computed as eq. M2 of
    operands with one zero k inserted before ``k``. Make it with :func:`pairs_restart`.

    ``packed`` is the (N, K + 1) weight with that zero column; :meth:`input` gives an (M, K) input the same column.
    Row sums Σ_k x and column sums Σ_k w do not change (the inserted k is zero), so eq. L5 is untouched.
    """

    k: int
    packed: "PackedWeightS8"

    def input(self, x2d_u8: np.ndarray) -> np.ndarray:
        """(M, K) uint8 -> (M, K + 1): a zero column before column ``k``."""
        M, K = x2d_u8.shape
        out_u8 = np.empty((M, K + 1), np.uint8)
        out_u8[:, :self.k] = x2d_u8[:, :self.k]
        out_u8[:, self.k] = 0
        out_u8[:, self.k + 1:] = x2d_u8[:, self.k:]
        return out_u8


def pairs_restart(w_i8: np.ndarray, k: int | None) -> PairsRestart | None:
    """The :class:`PairsRestart` of an (N, K) int8 weight whose pairs restart at ``k`` (eq. M2b); None when nothing
    changes: no restart (``k`` None), or an even ``k``, where the pairs of eq. M2 start anyway."""
    if k is None or k % 2 == 0:
        return None
    N, K = w_i8.shape
    if not 0 < k < K:
        raise ValueError(f"the pairs can restart only inside K = {K}, got k = {k}")
    w_inserted_i8 = np.zeros((N, K + 1), np.int8)
    w_inserted_i8[:, :k] = w_i8[:, :k]
    w_inserted_i8[:, k + 1:] = w_i8[:, k:]
    return PairsRestart(k, pack_weight_s8(w_inserted_i8))


# --------------------------------------------------------------------------------------------------------------
# The public product
# --------------------------------------------------------------------------------------------------------------

KERNELS = ("auto", "amx", "avx512", "avx2", "portable", "reference")
KERNEL_ENV_VAR = "REFQUANT_MATMUL_KERNEL"


def matmul_u8s8_acc32(x_u8: np.ndarray, w: np.ndarray | PackedWeightS8, *,
                      saturate_int16_pairs: bool = False, kernel: str | None = None) -> np.ndarray:
    """(M, K) uint8 x (N, K) int8 weight (raw or packed) -> (M, N) int32 accumulators (eq. M1, or M2).

    ``kernel``: ``"auto"`` (the fastest the CPU runs; the reference for a few products below
    :data:`KERNEL_MIN_MACS`), ``"amx"``, ``"avx512"``, ``"avx2"`` (eq. M2 only), ``"portable"`` or ``"reference"``
    (see the module docstring); ``None`` reads the environment variable REFQUANT_MATMUL_KERNEL (unset or empty: ``"auto"``; any
    other value is a ValueError naming the variable).
    Every kernel returns the same bits.
    """
    if not isinstance(x_u8, np.ndarray) or x_u8.dtype != np.uint8:
        raise TypeError(f"x_u8 must be a uint8 numpy array, got {_describe(x_u8)}")
    if x_u8.ndim != 2:
        raise ValueError(f"x_u8 must be 2-D (M, K), got shape {x_u8.shape}")
    if not isinstance(w, PackedWeightS8):
        if not isinstance(w, np.ndarray) or w.dtype != np.int8:
            raise TypeError(f"w must be an int8 numpy array or a PackedWeightS8, got {_describe(w)}")
        if w.ndim != 2:
            raise ValueError(f"w must be 2-D (N, K), got shape {w.shape}")
    N, K = w.shape
    if x_u8.shape[1] != K:
        raise ValueError(f"x_u8 has K = {x_u8.shape[1]} columns but the weight has K = {K} (shape {w.shape})")
    chosen = kernel_for(saturate_int16_pairs=saturate_int16_pairs, kernel=kernel, macs=x_u8.shape[0] * K * N)
    if chosen == "reference":
        w_i8 = w.w_i8 if isinstance(w, PackedWeightS8) else w
        if saturate_int16_pairs:
            return matmul_u8s8_acc32_sat16_ref(x_u8, w_i8)
        return matmul_u8s8_acc32_ref(x_u8, w_i8)
    packed = w if isinstance(w, PackedWeightS8) else pack_weight_s8(w)
    return _matmul_tiled(x_u8, packed, _DOT4[chosen, bool(saturate_int16_pairs)])


KERNEL_MIN_MACS = 1 << 18
"""``kernel="auto"`` runs the readable reference for products of fewer multiply-adds (M·K·N) than this (for the
first refquant._dispatch.SMALL_CALLS such products): it takes at most a millisecond or two there, less than the
tile kernels take to load from Numba's cache (a first run compiles them, ~4.5 s), so a small study (the default
crosscheck study: 54 multiply-adds a row) compiles nothing here. The benchmarked shapes (M·K·N >= 2^20) are above
it. Every kernel gives the same bits."""
_SMALL_PRODUCTS = SmallCalls(KERNEL_MIN_MACS)


def kernel_for(*, saturate_int16_pairs: bool = False, kernel: str | None = None, macs: int | None = None) -> str:
    """The kernel :func:`matmul_u8s8_acc32` runs for these arguments: ``"amx"``, ``"avx512"``, ``"avx2"``,
    ``"portable"`` or ``"reference"``. ``"auto"`` is ``"reference"`` under NUMBA_DISABLE_JIT=1 or for one of the
    first few products of ``macs`` < :data:`KERNEL_MIN_MACS` multiply-adds (each such question counts); else
    ``"amx"`` for eq. M1
    where refquant.amx.amx_unavailable_reason() finds nothing missing (CPU, Numba's target, the OS's permission),
    else ``"avx512"`` where the CPU has the instruction, else ``"avx2"`` for eq. M2 where it has avx2, else
    ``"portable"``. Raises RuntimeError when ``"amx"``, ``"avx512"`` or ``"avx2"`` is asked for where it cannot run
    or for the equation it does not compute (saying why), or a Numba kernel while the JIT is disabled."""
    if kernel is None:
        kernel = os.environ.get(KERNEL_ENV_VAR) or "auto"  # unset or empty: auto
        if kernel not in KERNELS:
            raise ValueError(f"the environment variable {KERNEL_ENV_VAR} is {kernel!r}, which is not a kernel; "
                             f"allowed values: {', '.join(KERNELS)} (or unset it for 'auto')")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 (e.g. a coverage run): the intrinsics cannot run as Python
        if kernel in ("amx", "avx512", "avx2", "portable"):
            raise RuntimeError(f"kernel={kernel!r} needs Numba's JIT, which NUMBA_DISABLE_JIT=1 turns off; "
                               f"use kernel='reference'")
        return "reference"
    if kernel in ("portable", "reference"):
        return kernel
    if kernel == "auto" and macs is not None and _SMALL_PRODUCTS.readable(macs):
        return "reference"
    if kernel in ("amx", "auto") and not saturate_int16_pairs:
        reason = _amx_module().amx_unavailable_reason()
        if reason is None:
            return "amx"
        if kernel == "amx":
            raise RuntimeError(f"kernel='amx' cannot run here: {reason}; use kernel='avx512' or 'auto'")
    if kernel == "amx":  # saturate_int16_pairs
        raise RuntimeError("kernel='amx' computes eq. M1 only (tdpbusd adds 4 exact products to int32); eq. M2 "
                           "(saturate_int16_pairs=True) runs on kernel='avx512' or 'avx2' (vpmaddubsw) or 'portable'")
    if kernel == "avx2":
        if not saturate_int16_pairs:
            raise RuntimeError("kernel='avx2' computes eq. M2 only (vpmaddubsw saturates each pair sum to int16); "
                               "eq. M1 runs on kernel='avx512' (vpdpbusd), 'amx' or 'portable'")
        if _cpu_has("avx2"):
            return "avx2"
        raise RuntimeError("kernel='avx2' needs the CPU feature 'avx2', which this CPU (or NUMBA_CPU_FEATURES) "
                           "lacks; use kernel='portable'")
    feature = _DOT4["avx512", bool(saturate_int16_pairs)].cpu_feature
    if _cpu_has(feature):
        return "avx512"
    if kernel == "auto":
        return "avx2" if saturate_int16_pairs and _cpu_has("avx2") else "portable"
    mode = "eq. M2 (saturate_int16_pairs=True)" if saturate_int16_pairs else "eq. M1"
    raise RuntimeError(f"kernel='avx512' for {mode} needs the CPU feature {feature!r}, which this CPU "
                       f"(or NUMBA_CPU_FEATURES) lacks; use kernel={'avx2' if saturate_int16_pairs else 'portable'!r}")


SEVEN_BIT_MAX_CODE = 127
"""The largest uint8 code for which eq. M1 and eq. M2 agree: with every x <= 127 a pair sum lies within
|x0·w0 + x1·w1| <= 2 · 127 · 128 = 32,512 < 32,767, so ``vpmaddubsw`` never saturates it."""


def kernel_for_seven_bit_codes(*, kernel: str | None = None) -> tuple[str, bool]:
    """(kernel, saturate_int16_pairs) to run eq. M1 on codes that are all <= :data:`SEVEN_BIT_MAX_CODE` (the
    7-bit codes of ``reduce_range``, e.g. torch's dynamic Linear on fbgemm/x86): there eq. M2 gives the same sums,
    so where ``"auto"`` would run eq. M1 on the portable kernel and the CPU has avx2 (AVX2 without VNNI: no
    ``vpdpbusd``), it runs eq. M2 on ``"avx2"`` (~3x faster) instead; any other choice is :func:`kernel_for`'s
    for eq. M1. A kernel asked for by name (``kernel=`` or REFQUANT_MATMUL_KERNEL) is kept as asked.

    Asked at every call of a dynamic Linear, so the answer is kept for what decides it (the kernel asked for, the
    environment variable, NUMBA_DISABLE_JIT, the CPU probes): ~7 us saved per call, ~20 after a product has
    evicted the interpreter's data from the caches."""
    asked = kernel if kernel is not None else (os.environ.get(KERNEL_ENV_VAR) or "auto")
    key = (asked, config.DISABLE_JIT, _cpu_has, _amx_module().amx_unavailable_reason)
    known = _SEVEN_BIT_CHOICE.get(key)
    if known is not None:
        return known
    chosen = kernel_for(saturate_int16_pairs=False, kernel=kernel)
    choice = ("avx2", True) if chosen == "portable" and asked == "auto" and _cpu_has("avx2") else (chosen, False)
    _SEVEN_BIT_CHOICE.clear()  # one answer kept: the key changes only when a test patches what decides it
    _SEVEN_BIT_CHOICE[key] = choice
    return choice


_SEVEN_BIT_CHOICE: dict = {}


def _amx_module():
    """refquant.amx (which builds on this module's tiles, so it cannot be imported at the top), imported at the
    first question: an import statement in kernel_for cost ~0.5 us per call."""
    if not _AMX_MODULE:
        from refquant import amx

        _AMX_MODULE.append(amx)
    return _AMX_MODULE[0]


_AMX_MODULE: list = []


def _describe(a) -> str:
    return f"{type(a).__name__} of dtype {a.dtype}" if hasattr(a, "dtype") else type(a).__name__


@functools.lru_cache(maxsize=None)
def _cpu_has(feature: str) -> bool:
    """True if this CPU runs ``feature`` and Numba compiles for it (NUMBA_CPU_FEATURES may narrow the target)."""
    if not llvm_binding.get_host_cpu_features().get(feature, False):
        return False
    if config.CPU_FEATURES is not None:  # an explicit target ("" for NUMBA_CPU_NAME=generic): LLVM must be
        return f"+{feature}" in config.CPU_FEATURES.split(",")  # allowed to emit the instruction
    return True


# --------------------------------------------------------------------------------------------------------------
# Vector types and instructions for Numba
# --------------------------------------------------------------------------------------------------------------

_I1, _I8, _I16, _I32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V16_I32 = ir.VectorType(_I32, 16)  # one zmm register: 16 int32 lanes, or 64 bytes


class _Int32x16Type(types.Type):
    """Numba type of one 512-bit vector of 16 int32 lanes (an LLVM ``<16 x i32>``; a zmm register)."""

    def __init__(self):
        super().__init__(name="int32x16")


int32x16 = _Int32x16Type()


@register_model(_Int32x16Type)
class _Int32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16_I32)


class _Dot4:
    """How each int32 lane gets its 4 products ``x[m, 4g + r] * w[n, 4g + r]`` (r = 0..3) added.

    A compile-time choice: Numba types a marker by its name, so every kernel below is compiled once per marker, and
    only for the markers that are called (a kernel with an instruction the CPU lacks is never compiled).
    """

    def __init__(self, name: str, cpu_feature: str | None, rows_per_tile: int | None = None):
        self.name = name
        self.cpu_feature = cpu_feature
        # zmm kernels: 6 rows (24 of 32 registers); generic vector code spills with 24 accumulators on AVX2: 2
        self.rows_per_tile = rows_per_tile or (6 if cpu_feature else 2)

    def __repr__(self) -> str:
        return f"_Dot4({self.name!r})"


class _Dot4Type(types.Type):
    def __init__(self, name: str):
        self.dot4_name = name
        super().__init__(name=f"Dot4({name})")


@typeof_impl.register(_Dot4)
def _typeof_dot4(val, c):
    return _Dot4Type(val.name)


register_model(_Dot4Type)(models.OpaqueModel)


@unbox(_Dot4Type)
def _unbox_dot4(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())  # the marker carries no data, only its type


_DOT4 = {  # (kernel, saturate_int16_pairs) -> marker
    ("amx", False): _Dot4("tdpbusd", "amx-int8"),  # eq. M1 on AMX tiles (refquant.amx), the rest on vpdpbusd
    ("avx512", False): _Dot4("vpdpbusd", "avx512vnni"),  # eq. M1
    ("avx512", True): _Dot4("vpmaddubsw", "avx512bw"),  # eq. M2
    ("avx2", True): _Dot4("vpmaddubsw256", "avx2", rows_per_tile=1),  # eq. M2 on ymm halves, 8 of 16 registers
    ("portable", False): _Dot4("portable_exact", None),  # eq. M1
    ("portable", True): _Dot4("portable_sat16", None),  # eq. M2
}
_FEATURE_OF = {d.name: d.cpu_feature for d in _DOT4.values()}
_FEATURE_OF["tdpbusd"] = "avx512vnni"  # _dot4 with the AMX marker: the vpdpbusd tiles for what AMX tiles leave


def _data_ptr(context, builder, arrty, arr, byte_offset):
    """``(int8*) arr.data + byte_offset``."""
    data = cgutils.create_struct_proxy(arrty)(context, builder, value=arr).data
    return builder.gep(builder.bitcast(data, _I8.as_pointer()), [byte_offset])


def _splat(builder, scalar, vector_type):
    v = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vector_type.count), None))


def _lanes(start: int, step: int, count: int):
    """Shuffle mask picking lanes start, start + step, ... (``count`` of them)."""
    return ir.Constant(ir.VectorType(_I32, count), [start + step * i for i in range(count)])


def _lanes_below(builder, n_valid):
    """The 16-lane mask lane < n_valid (n_valid is an intp between -48 and 64 here)."""
    n_i32 = builder.trunc(n_valid, _I32)
    return builder.icmp_signed("<", _lanes(0, 1, 16), _splat(builder, n_i32, _V16_I32))


def store_lanes(builder, value, ptr, n_valid, masked_store_name: str) -> None:
    """Store the first n_valid lanes of ``value`` (16 lanes) at ``ptr``: a plain unaligned store when all 16 are
    valid, else a masked store of those below n_valid (none for n_valid <= 0). Not a masked store every time: AVX2
    has no byte-masked store (LLVM writes 16 conditional scalar stores) and AMD's ``vpmaskmovd`` store is slow."""
    with builder.if_else(builder.icmp_signed(">=", n_valid, ir.Constant(n_valid.type, 16)), likely=True) as (
            whole, part):
        with whole:
            builder.store(value, ptr, align=1)
        with part:
            fnty = ir.FunctionType(ir.VoidType(), [value.type, ptr.type, _I32, ir.VectorType(_I1, 16)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, masked_store_name)
            builder.call(fn, [value, ptr, ir.Constant(_I32, 1), _lanes_below(builder, n_valid)])


def load_lanes(builder, ptr, n_valid, masked_load_name: str):
    """The 16 lanes at ``ptr``, those from n_valid on zero and never read: a plain unaligned load when all 16 are
    valid, else a masked load (see :func:`store_lanes`)."""
    vector_type = ptr.type.pointee
    with builder.if_else(builder.icmp_signed(">=", n_valid, ir.Constant(n_valid.type, 16)), likely=True) as (
            whole, part):
        with whole:
            whole_v = builder.load(ptr, align=1)
            whole_block = builder.block
        with part:
            fnty = ir.FunctionType(vector_type, [ptr.type, _I32, ir.VectorType(_I1, 16), vector_type])
            fn = cgutils.get_or_insert_function(builder.module, fnty, masked_load_name)
            part_v = builder.call(fn, [ptr, ir.Constant(_I32, 1), _lanes_below(builder, n_valid),
                                       ir.Constant(vector_type, None)])
            part_block = builder.block
    lanes = builder.phi(vector_type)
    lanes.add_incoming(whole_v, whole_block)
    lanes.add_incoming(part_v, part_block)
    return lanes


def _check_c_array(arr, what: str):
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        raise TypingError(f"{what} needs a C-contiguous array, got {arr}")


@intrinsic
def _vec_zeros(typingctx):
    """16 int32 zeros (``vpxor``)."""

    def codegen(context, builder, signature, args):
        return ir.Constant(_V16_I32, None)

    return int32x16(), codegen


@intrinsic
def _vec_add(typingctx, a, b):
    """Lane-wise int32 a + b, wrapping (``vpaddd``)."""

    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return int32x16(int32x16, int32x16), codegen


@intrinsic
def _vec_load(typingctx, arr, byte_offset):
    """The 64 bytes at ``arr.data + byte_offset`` (unaligned ``vmovdqu64``)."""
    _check_c_array(arr, "_vec_load")

    def codegen(context, builder, signature, args):
        ptr = _data_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _V16_I32.as_pointer()), align=1)

    return int32x16(arr, types.intp), codegen


@intrinsic
def _vec_broadcast4(typingctx, arr, byte_offset):
    """The 4 bytes at ``arr.data + byte_offset`` repeated in all 16 lanes (``vpbroadcastd``)."""
    _check_c_array(arr, "_vec_broadcast4")

    def codegen(context, builder, signature, args):
        ptr = _data_ptr(context, builder, signature.args[0], args[0], args[1])
        dword = builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=1)
        return _splat(builder, dword, _V16_I32)

    return int32x16(arr, types.intp), codegen


@intrinsic
def _vec_store(typingctx, arr, offset, v, n_valid):
    """Store lanes 0 .. n_valid - 1 of ``v`` to the int32 array at element ``offset`` (masked ``vmovdqu32``)."""
    _check_c_array(arr, "_vec_store")
    if arr.dtype != types.int32:
        raise TypingError(f"_vec_store needs an int32 array, got {arr}")

    def codegen(context, builder, signature, args):
        arr_v, offset_v, v_v, n_valid_v = args
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=arr_v).data
        ptr = builder.bitcast(builder.gep(data, [offset_v]), _V16_I32.as_pointer())
        store_lanes(builder, v_v, ptr, n_valid_v, "llvm.masked.store.v16i32.p0")
        return context.get_dummy_value()

    return types.void(arr, types.intp, int32x16, types.intp), codegen


@intrinsic
def _vec_load_masked(typingctx, arr, offset, n_valid):
    """Lanes 0 .. n_valid - 1 from the int32 array at element ``offset``, zeros above (masked ``vmovdqu32``)."""
    _check_c_array(arr, "_vec_load_masked")
    if arr.dtype != types.int32:
        raise TypingError(f"_vec_load_masked needs an int32 array, got {arr}")

    def codegen(context, builder, signature, args):
        arr_v, offset_v, n_valid_v = args
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=arr_v).data
        ptr = builder.bitcast(builder.gep(data, [offset_v]), _V16_I32.as_pointer())
        return load_lanes(builder, ptr, n_valid_v, "llvm.masked.load.v16i32.p0")

    return int32x16(arr, types.intp, types.intp), codegen


@intrinsic
def _dot4(typingctx, dot4, acc, x4, w4):
    """``acc`` + the 4 products of each lane: bytes of ``x4`` (uint8) times bytes of ``w4`` (int8), per lane.

    ``vpdpbusd``:       acc + (x0 w0 + x1 w1 + x2 w2 + x3 w3)            exact, int32 wrap      (eq. M1)
    ``vpmaddubsw``:     acc + sat16(x0 w0 + x1 w1) + sat16(x2 w2 + x3 w3) then ``vpmaddwd`` with ones (eq. M2)
    ``portable_*``:     the same two formulas with LLVM's generic vector operations.
    """
    if not isinstance(dot4, _Dot4Type):
        raise TypingError(f"_dot4 needs a _Dot4 marker, got {dot4}")
    name = dot4.dot4_name
    feature = _FEATURE_OF[name]
    if feature is not None and not _cpu_has(feature):  # LLVM would abort the process on a missing instruction
        raise TypingError(f"_dot4({name}) needs the CPU feature {feature!r}")

    def codegen(context, builder, signature, args):
        _, acc_v, x_v, w_v = args
        if name in ("vpdpbusd", "tdpbusd"):  # the AMX kernel's vector remainders (refquant.amx) are vpdpbusd's
            fnty = ir.FunctionType(_V16_I32, [_V16_I32, _V16_I32, _V16_I32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, [acc_v, x_v, w_v])
        v64_i8, v32_i16 = ir.VectorType(_I8, 64), ir.VectorType(_I16, 32)
        x_i8 = builder.bitcast(x_v, v64_i8)
        w_i8 = builder.bitcast(w_v, v64_i8)
        if name == "vpmaddubsw256":
            v32_i8, v16_i16, v8_i32 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
            madd_ub = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16_i16, [v32_i8, v32_i8]),
                                                     "llvm.x86.avx2.pmadd.ub.sw")
            madd_wd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8_i32, [v16_i16, v16_i16]),
                                                     "llvm.x86.avx2.pmadd.wd")
            ones = ir.Constant(v16_i16, [1] * 16)
            halves = []
            for h in (0, 1):
                xh = builder.shuffle_vector(x_i8, x_i8, _lanes(32 * h, 1, 32))
                wh = builder.shuffle_vector(w_i8, w_i8, _lanes(32 * h, 1, 32))
                halves.append(builder.call(madd_wd, [builder.call(madd_ub, [xh, wh]), ones]))
            quads_i32 = builder.shuffle_vector(halves[0], halves[1], _lanes(0, 1, 16))
            return builder.add(acc_v, quads_i32)
        if name == "vpmaddubsw":
            fnty = ir.FunctionType(v32_i16, [v64_i8, v64_i8])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.pmaddubs.w.512")
            pairs_i16 = builder.call(fn, [x_i8, w_i8])  # sat16(x0 w0 + x1 w1), sat16(x2 w2 + x3 w3)
            fnty = ir.FunctionType(_V16_I32, [v32_i16, v32_i16])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.pmaddw.d.512")
            quads_i32 = builder.call(fn, [pairs_i16, ir.Constant(v32_i16, [1] * 32)])  # exact int32 sums
            return builder.add(acc_v, quads_i32)
        # portable: products in int16 are exact (-32640 .. 32385)
        v64_i16 = ir.VectorType(_I16, 64)
        prod_i16 = builder.mul(builder.zext(x_i8, v64_i16), builder.sext(w_i8, v64_i16))
        if name == "portable_exact":  # pair sums need 17 bits: add them in int32
            prod_i32 = builder.sext(prod_i16, ir.VectorType(_I32, 64))
            pairs_i32 = builder.add(builder.shuffle_vector(prod_i32, prod_i32, _lanes(0, 2, 32)),
                                    builder.shuffle_vector(prod_i32, prod_i32, _lanes(1, 2, 32)))
        else:  # portable_sat16: the pair sum saturates at int16, as vpmaddubsw does
            even_i16 = builder.shuffle_vector(prod_i16, prod_i16, _lanes(0, 2, 32))  # x0 w0, x2 w2 of each lane
            odd_i16 = builder.shuffle_vector(prod_i16, prod_i16, _lanes(1, 2, 32))  # x1 w1, x3 w3
            fnty = ir.FunctionType(v32_i16, [v32_i16, v32_i16])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.sadd.sat.v32i16")
            pairs_i32 = builder.sext(builder.call(fn, [even_i16, odd_i16]), ir.VectorType(_I32, 32))
        quads_i32 = builder.add(builder.shuffle_vector(pairs_i32, pairs_i32, _lanes(0, 2, 16)),
                                builder.shuffle_vector(pairs_i32, pairs_i32, _lanes(1, 2, 16)))
        return builder.add(acc_v, quads_i32)

    return int32x16(dot4, int32x16, int32x16, int32x16), codegen


# --------------------------------------------------------------------------------------------------------------
# Tiles: rows x 64 columns of int32 sums kept in registers over one block of K
# --------------------------------------------------------------------------------------------------------------
# A "row" of a tile is a tuple of 4 int32x16 vectors: 64 output columns of one output row.

K_BLOCK = 512  # k per pass (fbgemm's KCB for avx512_vnni): 512 x 64 weight bytes of a panel stay in L1 meanwhile
ROWS_PER_TASK = 96  # a task: 96 output rows x one 64-column panel (a multiple of 6 and of 2 rows)


@njit(cache=True, inline="always")
def _row_start(out_i32, offset, n_valid, first_block):
    """The sums so far: zeros before the first K block, else what the previous block stored (wrapping in int32)."""
    if first_block:
        z = _vec_zeros()
        return (z, z, z, z)
    return (_vec_load_masked(out_i32, offset, n_valid), _vec_load_masked(out_i32, offset + 16, n_valid - 16),
            _vec_load_masked(out_i32, offset + 32, n_valid - 32), _vec_load_masked(out_i32, offset + 48, n_valid - 48))


@njit(cache=True, inline="always")
def _panel_load(panels_i8, byte_offset):
    """Row g of a panel: 64 columns x 4 k as four 64-byte vectors."""
    return (_vec_load(panels_i8, byte_offset), _vec_load(panels_i8, byte_offset + 64),
            _vec_load(panels_i8, byte_offset + 128), _vec_load(panels_i8, byte_offset + 192))


@njit(cache=True, inline="always")
def _row_dot4(dot4, acc, x4, w):
    return (_dot4(dot4, acc[0], x4, w[0]), _dot4(dot4, acc[1], x4, w[1]),
            _dot4(dot4, acc[2], x4, w[2]), _dot4(dot4, acc[3], x4, w[3]))


@njit(cache=True, inline="always")
def _row_store(out_i32, offset, acc, n_valid):
    """Store the first ``n_valid`` of the 64 columns (the last panel may be partly padding)."""
    _vec_store(out_i32, offset, acc[0], n_valid)
    _vec_store(out_i32, offset + 16, acc[1], n_valid - 16)
    _vec_store(out_i32, offset + 32, acc[2], n_valid - 32)
    _vec_store(out_i32, offset + 48, acc[3], n_valid - 48)


@njit(cache=True)
def _tile_6x64(dot4, x_u8, lda, m, g0, n_groups, panels_i8, panel_offset, out_i32, out_offset, ldc, n_valid):
    """out rows (from element out_offset, ldc apart) += the products of x rows m .. m+5 and 64 weight columns for k
    in [4 g0, 4 (g0 + n_groups)) (eq. M1 or M2).

    24 accumulators (6 rows x 4 vectors), 4 weight vectors, 1 broadcast: fbgemm's genComputeBlock with
    rowRegs = 6, colRegs = 4. The k group g of x row m is the 4 bytes at m * lda + 4 g.
    """
    first = g0 == 0
    acc0 = _row_start(out_i32, out_offset, n_valid, first)
    acc1 = _row_start(out_i32, out_offset + ldc, n_valid, first)
    acc2 = _row_start(out_i32, out_offset + 2 * ldc, n_valid, first)
    acc3 = _row_start(out_i32, out_offset + 3 * ldc, n_valid, first)
    acc4 = _row_start(out_i32, out_offset + 4 * ldc, n_valid, first)
    acc5 = _row_start(out_i32, out_offset + 5 * ldc, n_valid, first)
    for g in range(n_groups):
        w = _panel_load(panels_i8, panel_offset + (g0 + g) * (PANEL_COLS * K_GROUP))
        xk = m * lda + (g0 + g) * K_GROUP
        acc0 = _row_dot4(dot4, acc0, _vec_broadcast4(x_u8, xk), w)
        acc1 = _row_dot4(dot4, acc1, _vec_broadcast4(x_u8, xk + lda), w)
        acc2 = _row_dot4(dot4, acc2, _vec_broadcast4(x_u8, xk + 2 * lda), w)
        acc3 = _row_dot4(dot4, acc3, _vec_broadcast4(x_u8, xk + 3 * lda), w)
        acc4 = _row_dot4(dot4, acc4, _vec_broadcast4(x_u8, xk + 4 * lda), w)
        acc5 = _row_dot4(dot4, acc5, _vec_broadcast4(x_u8, xk + 5 * lda), w)
    _row_store(out_i32, out_offset, acc0, n_valid)
    _row_store(out_i32, out_offset + ldc, acc1, n_valid)
    _row_store(out_i32, out_offset + 2 * ldc, acc2, n_valid)
    _row_store(out_i32, out_offset + 3 * ldc, acc3, n_valid)
    _row_store(out_i32, out_offset + 4 * ldc, acc4, n_valid)
    _row_store(out_i32, out_offset + 5 * ldc, acc5, n_valid)


@njit(cache=True)
def _tile_2x64(dot4, x_u8, lda, m, g0, n_groups, panels_i8, panel_offset, out_i32, out_offset, ldc, n_valid):
    """The same for x rows m, m+1: the tile for generic vector code (AVX2 has 16 registers, not 32)."""
    acc0 = _row_start(out_i32, out_offset, n_valid, g0 == 0)
    acc1 = _row_start(out_i32, out_offset + ldc, n_valid, g0 == 0)
    for g in range(n_groups):
        w = _panel_load(panels_i8, panel_offset + (g0 + g) * (PANEL_COLS * K_GROUP))
        xk = m * lda + (g0 + g) * K_GROUP
        acc0 = _row_dot4(dot4, acc0, _vec_broadcast4(x_u8, xk), w)
        acc1 = _row_dot4(dot4, acc1, _vec_broadcast4(x_u8, xk + lda), w)
    _row_store(out_i32, out_offset, acc0, n_valid)
    _row_store(out_i32, out_offset + ldc, acc1, n_valid)


@njit(cache=True)
def _tile_1x64(dot4, x_u8, lda, m, g0, n_groups, panels_i8, panel_offset, out_i32, out_offset, ldc, n_valid):
    """The same for x row m: the last rows (and all of M = 1). Even and odd k groups go to two sets of 4
    accumulators, added at the end: 8 independent ``vpdpbusd`` chains instead of 4, which one row alone would wait
    on. The same bits: int32 sums wrap modulo 2^32, so their order changes nothing (and eq. M2 saturates within a
    group, never across groups)."""
    acc0 = _row_start(out_i32, out_offset, n_valid, g0 == 0)
    z = _vec_zeros()
    acc1 = (z, z, z, z)
    g = 0
    while g + 2 <= n_groups:
        xk = m * lda + (g0 + g) * K_GROUP
        w = _panel_load(panels_i8, panel_offset + (g0 + g) * (PANEL_COLS * K_GROUP))
        acc0 = _row_dot4(dot4, acc0, _vec_broadcast4(x_u8, xk), w)
        w = _panel_load(panels_i8, panel_offset + (g0 + g + 1) * (PANEL_COLS * K_GROUP))
        acc1 = _row_dot4(dot4, acc1, _vec_broadcast4(x_u8, xk + K_GROUP), w)
        g += 2
    if g < n_groups:
        w = _panel_load(panels_i8, panel_offset + (g0 + g) * (PANEL_COLS * K_GROUP))
        acc0 = _row_dot4(dot4, acc0, _vec_broadcast4(x_u8, m * lda + (g0 + g) * K_GROUP), w)
    acc0 = (_vec_add(acc0[0], acc1[0]), _vec_add(acc0[1], acc1[1]), _vec_add(acc0[2], acc1[2]),
            _vec_add(acc0[3], acc1[3]))
    _row_store(out_i32, out_offset, acc0, n_valid)


@njit(cache=True)
def _tile_row_64(dot4, x_u8, lda, m, g0, n_groups, panels_i8, panel_offset, out_i32, out_offset, ldc, n_valid):
    """x row m times 64 weight columns, one set of 4 accumulators (8 ymm on AVX2)."""
    acc = _row_start(out_i32, out_offset, n_valid, g0 == 0)
    for g in range(n_groups):
        w = _panel_load(panels_i8, panel_offset + (g0 + g) * (PANEL_COLS * K_GROUP))
        acc = _row_dot4(dot4, acc, _vec_broadcast4(x_u8, m * lda + (g0 + g) * K_GROUP), w)
    _row_store(out_i32, out_offset, acc, n_valid)


@njit(cache=True)
def _block_tiles(dot4, rows_per_tile, x_u8, lda, m_start, m_end, g0, block_groups, panels_i8, panel_offset, out_i32,
                 out_offset, ldc, n_valid):
    """Rows [m_start, m_end) of x times one panel over one K block, in tiles of ``rows_per_tile`` rows: 6 (or 2),
    then single rows; 1 (the avx2 marker) row by row; x row m_start's sums go to out_i32 from element out_offset,
    the next rows ldc elements apart."""
    m = m_start
    if rows_per_tile == 1:
        while m < m_end:
            _tile_row_64(dot4, x_u8, lda, m, g0, block_groups, panels_i8, panel_offset, out_i32,
                         out_offset + (m - m_start) * ldc, ldc, n_valid)
            m += 1
        return
    if rows_per_tile == 6:
        while m + 6 <= m_end:
            _tile_6x64(dot4, x_u8, lda, m, g0, block_groups, panels_i8, panel_offset, out_i32,
                       out_offset + (m - m_start) * ldc, ldc, n_valid)
            m += 6
    while m + 2 <= m_end:
        _tile_2x64(dot4, x_u8, lda, m, g0, block_groups, panels_i8, panel_offset, out_i32,
                   out_offset + (m - m_start) * ldc, ldc, n_valid)
        m += 2
    while m < m_end:
        _tile_1x64(dot4, x_u8, lda, m, g0, block_groups, panels_i8, panel_offset, out_i32,
                   out_offset + (m - m_start) * ldc, ldc, n_valid)
        m += 1


@njit(cache=True, inline="always")
def task_rows_and_panel(task, M, n_panels):
    """Task ``task`` covers output rows [m_start, m_end) and the 64 columns of panel ``panel``."""
    chunk = task // n_panels
    panel = task % n_panels
    m_start = chunk * ROWS_PER_TASK
    return m_start, min(M, m_start + ROWS_PER_TASK), panel


@njit(cache=True)
def _matmul_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task):
    """One task: output rows [96 c, 96 c + 96) times panel p (columns [64 p, 64 p + 64)), K block by K block."""
    n_panels = panels_i8.shape[0]
    n_groups = panels_i8.shape[1]
    m_start, m_end, panel = task_rows_and_panel(task, M, n_panels)
    n0 = panel * PANEL_COLS
    n_valid = min(PANEL_COLS, N - n0)
    panel_offset = panel * n_groups * (PANEL_COLS * K_GROUP)
    for g0 in range(0, max(n_groups, 1), K_BLOCK // K_GROUP):  # K = 0 still stores the zeros
        block_groups = min(K_BLOCK // K_GROUP, n_groups - g0)
        _block_tiles(dot4, rows_per_tile, x_u8, lda, m_start, m_end, g0, block_groups, panels_i8, panel_offset,
                     out_i32, m_start * N + n0, N, n_valid)


def matmul_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task):
    """One task on ``dot4``'s kernel, chosen when a kernel calling it is compiled: refquant.amx.matmul_task_amx for
    the AMX marker, else :func:`_matmul_task`. (Numba only: see the overload below.)"""
    raise NotImplementedError("matmul_task is called from Numba kernels only")


@overload(matmul_task)
def _matmul_task_numba(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task):
    if isinstance(dot4, _Dot4Type) and dot4.dot4_name == "tdpbusd":
        from refquant.amx import matmul_task_amx  # refquant.amx imports this module

        def amx_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task):
            matmul_task_amx(dot4, x_u8, lda, M, panels_i8, out_i32, N, task)

        return amx_task

    def vector_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task):
        _matmul_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task)

    return vector_task


@njit(cache=True, nogil=True)
def _matmul_tasks_shared(claims_i64, thread, threads, dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N):
    """Take tasks (refquant._threads.share_items: this thread's share first) and run each one it wins."""
    n_tasks = claims_i64.shape[0] - 1
    for k in range(n_tasks):
        task = item_to_try(k, n_tasks, thread, threads)
        if take_item(claims_i64, task):
            matmul_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task)
            finish_item(claims_i64)


@njit(cache=True, nogil=True)
def _matmul_tasks_serial(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N):
    n_tasks = -(-M // ROWS_PER_TASK) * panels_i8.shape[0]
    for task in range(n_tasks):
        matmul_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, out_i32, N, task)


PARALLEL_MIN_MACS = 1 << 22  # below this many multiply-adds (~12 us on one core), one thread: handing tasks to a
# pool thread costs ~10 us (a wake-up and the GIL), so below it the pool thread arrives when the work is done


TILE_ALIGN = 64  # bytes: AMX tile rows that start on a cache line load ~2.5x faster here (refquant.amx)


def aligned_zeros(shape, dtype) -> np.ndarray:
    """A C-contiguous array of zeros whose data starts on a 64-byte boundary (NumPy's own arrays start 16 bytes
    past one: malloc's header)."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    buffer_u8 = np.zeros(n_bytes + TILE_ALIGN, np.uint8)
    start = -buffer_u8.ctypes.data % TILE_ALIGN
    return buffer_u8[start:start + n_bytes].view(dtype).reshape(shape)


def padded_rows(x_u8: np.ndarray, packed: PackedWeightS8, *, tile_aligned: bool = False) -> tuple[np.ndarray, int]:
    """x as the tiles read it: C-contiguous rows of whole groups of 4 bytes (the last group padded with zeros, which
    meet zero weights), and that row length ``lda``. ``tile_aligned`` (the AMX kernel, from 16 rows): every row
    starts on a 64-byte boundary, lda a multiple of 64 (a copy unless x is so already; the padding is never read)."""
    M, K = x_u8.shape
    lda = packed.panels_i8.shape[1] * K_GROUP
    if tile_aligned and M >= 16:
        lda_aligned = -(-lda // TILE_ALIGN) * TILE_ALIGN
        if lda_aligned != K or x_u8.ctypes.data % TILE_ALIGN or not x_u8.flags.c_contiguous:
            x_aligned_u8 = aligned_zeros((M, lda_aligned), np.uint8)
            x_aligned_u8[:, :K] = x_u8
            return x_aligned_u8, lda_aligned
        return x_u8, lda_aligned
    if lda != K:  # the last group of a row reads 4 bytes: pad with zeros (times zero weights)
        x_padded_u8 = np.zeros((M, lda), np.uint8)
        x_padded_u8[:, :K] = x_u8
        return x_padded_u8, lda
    return np.ascontiguousarray(x_u8), lda


def run_tasks(serial_kernel, shared_kernel, M: int, K: int, packed: PackedWeightS8, args: tuple) -> None:
    """Run every task of an (M, K) x packed product: ``serial_kernel(*args)`` on this thread below
    PARALLEL_MIN_MACS multiply-adds, else ``shared_kernel`` on the pool (refquant._threads.share_items)."""
    N = packed.shape[0]
    n_tasks = -(-M // ROWS_PER_TASK) * packed.panels_i8.shape[0]
    threads = threads_for(n_tasks, DEFAULT_THREADS) if M * N * K >= PARALLEL_MIN_MACS else 1
    if threads == 1:
        serial_kernel(*args)
    else:
        share_items(shared_kernel, n_tasks, [args] * threads)


def _matmul_tiled(x_u8: np.ndarray, packed: PackedWeightS8, dot4: _Dot4) -> np.ndarray:
    """Run the tiles: x padded so that each row has whole groups of 4 bytes, output (M, N) int32."""
    M, K = x_u8.shape
    N = packed.shape[0]
    x_u8, lda = padded_rows(x_u8, packed, tile_aligned=dot4.name == "tdpbusd")
    out_i32 = np.empty((M, N), np.int32)
    run_tasks(_matmul_tasks_serial, _matmul_tasks_shared, M, K, packed,
              (dot4, dot4.rows_per_tile, x_u8, lda, M, packed.panels_i8, out_i32, N))
    return out_i32
