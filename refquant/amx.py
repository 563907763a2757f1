"""AMX tiles: refquant's u8 x s8 -> int32 product (eq. M1 of refquant.matmul) on Intel's tile unit.

``tdpbusd`` (AMX-INT8) adds to each int32 element of a 16 x 16 tile C the products of one row of a 16 x 64-byte
tile A (uint8) with one column of a 16 x 64-byte tile B (int8, 4 consecutive k of one output column per dword):

    C[i, j] += sum_{g=0..15} sum_{r=0..3} A[i, 4g + r] * B[g, 4j + r]          int32, no saturation, wrapping

which is eq. M1 for 64 k at once (the products need 16 bits, each sum of 4 is added to the int32 element with
the wrap of two's complement). Matches: Intel 64 and IA-32 Architectures Software Developer's Manual, Vol. 2
(TDPBUSD "Dot Product of Unsigned/Signed Bytes with Dword Accumulation": ``DPBD(c, x, y)`` sums the four byte
products in int32 and adds them to the dword of C without saturation), LDTILECFG (the 64-byte palette-1 config:
byte 0 the palette, bytes 16 + 2t the bytes per row of tile t, byte 48 + t its rows; loading it zeroes every tile),
TILELOADD / TILESTORED (rows of a tile from / to memory at a byte stride), TILEZERO, TILERELEASE; the LLVM
intrinsics ``llvm.x86.tdpbusd`` etc. with immediate tile numbers are what Intel's Intrinsics Guide calls
``_tile_dpbusd``, ``_tile_loadd``, ``_tile_stored``, ``_tile_loadconfig``, ``_tile_release``.

The operands need no new packing: refquant.matmul's PackedWeightS8 panel p, rows [g][64 c][4 r], *is* B's layout.
The B tile of columns 16v .. 16v + 15 and k groups g0 .. g0 + 15 starts at byte ``panel_offset + 256 g0 + 64 v``
with a row stride of 256 bytes; the A tile of rows m .. m + 15 and k 4 g0 .. 4 g0 + 63 starts at byte
``m lda + 4 g0`` of x (rows of ``lda`` bytes, refquant.matmul.padded_rows), stride ``lda``.

Blocking (the usual one for 8 tiles: four C tiles, each A and B tile used twice; not taken from another library's
code — oneDNN's AMX micro-kernel, src/cpu/x64/brgemm/jit_brgemm_amx_uker.cpp, was not read): :func:`_amx_sums_32x64`
keeps 2 x 2 C tiles (32 rows x 32 columns, tiles 0-3) while it walks K, 64 k per step: 2 A loads (tiles 4, 5), 2 B
loads (tiles 6, 7), 4 ``tdpbusd``; twice per 64-column panel. The C tiles go to the task's int32 scratch (64 per
row) after the last k, where refquant.fused_linear's epilogue reads them (or refquant.matmul copies them out), a
whole task (96 rows) at a time. What the tiles do not cover runs on refquant.matmul's ``vpdpbusd`` tiles (:func:`amx_rows_sums`): the last k of each row when K is not a multiple of
64 (added to the stored sums: int32 addition wraps modulo 2^32, so the order of the partial sums changes no bit),
and rows below a whole 16 (all of M < 16, so batch 1 is the vector kernel's: from 16 rows the tiles win here, 294
vs 260 GMAC/s on one core at (16, 1024, 1024), 422 vs 311 at M = 32; benchmarks/README.md). Tile configuration is per thread: each
call of :func:`amx_rows_sums` (one task: 96 rows x 64 columns x all of K) loads it and releases the tiles at its end
(LDTILECFG + TILERELEASE: ~0.1 us here).

Tile rows are 64-byte aligned: x is copied to rows of a multiple of 64 bytes on a 64-byte boundary
(refquant.matmul.padded_rows(tile_aligned=True)), the packed panels and the scratch start on one. Measured here
with the operands in L1, that made the 2 x 2 tile loop ~2.5x faster (0.6-0.75 -> 1.8-1.9 TMAC/s on one core): a
row straddling two cache lines costs two.

Linux gives a process the tile registers only when it asks (Documentation/arch/x86/xstate.rst: ``arch_prctl(
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; without it the first tile instruction kills the process with
SIGILL). :func:`amx_unavailable_reason` asks once per process (the permission is the process's, for every
thread, and a forked child inherits it) and says why AMX cannot run otherwise; refquant.matmul's ``kernel="amx"``
refuses with that reason, ``"auto"`` falls back to the ``vpdpbusd`` kernel.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from refquant import matmul
from refquant.matmul import K_BLOCK, K_GROUP, PANEL_COLS, ROWS_PER_TASK, _block_tiles, task_rows_and_panel

AMX_FEATURES = ("amx-tile", "amx-int8", "avx512vnni")  # the tiles, tdpbusd, and vpdpbusd for what they leave
TILE_ROWS = 16  # rows of A and C tiles; also k groups (of 4) per B tile
TILE_K = 64  # bytes of an A row: k per tdpbusd
TILE_K_GROUPS = TILE_K // K_GROUP
BLOCK_ROWS = 2 * TILE_ROWS  # rows of one block of 2 x 2 C tiles

# --------------------------------------------------------------------------------------------------------------
# Permission of the operating system
# --------------------------------------------------------------------------------------------------------------

_SYS_ARCH_PRCTL = 158  # x86-64 Linux syscall number of arch_prctl
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18  # the 8 KB of tile data in the XSAVE area


def _linux_tile_permission() -> str | None:
    """Ask Linux for the tile data (Documentation/arch/x86/xstate.rst); None when granted, else why not."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return f"AMX tiles are only enabled on x86-64 Linux here, this is {sys.platform} on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    permitted = ctypes.c_uint64(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(permitted)) == 0 \
            and permitted.value >> _XFEATURE_XTILEDATA & 1:
        return None  # asked before (in this process or a parent it was forked from)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        return None
    code = ctypes.get_errno()
    return (f"Linux refused the AMX tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed with "
            f"{errno.errorcode.get(code, code)}; kernels before 5.16 do not know the request)")


@functools.lru_cache(maxsize=None)
def _os_tile_permission() -> str | None:
    return _linux_tile_permission()


def amx_unavailable_reason() -> str | None:
    """None if the AMX kernel can run in this process (the CPU and Numba's target have amx-tile, amx-int8 and
    avx512vnni, and the OS grants the tile data, asked here once); else a sentence saying what is missing."""
    missing = [f for f in AMX_FEATURES if not matmul._cpu_has(f)]
    if missing:
        return (f"the AMX kernel needs the CPU features {', '.join(AMX_FEATURES)}; this CPU (or NUMBA_CPU_FEATURES) "
                f"lacks {', '.join(missing)}")
    return _os_tile_permission()


# --------------------------------------------------------------------------------------------------------------
# Tile instructions for Numba (tile numbers are compile-time constants: the instructions encode them)
# --------------------------------------------------------------------------------------------------------------

_I8, _I64 = ir.IntType(8), ir.IntType(64)


def _tile_number(t, what: str) -> int:
    if not isinstance(t, types.IntegerLiteral) or not 0 <= t.literal_value < 8:
        raise TypingError(f"{what} needs a constant tile number 0..7, got {t}")
    return t.literal_value


def _check_amx(what: str) -> None:
    missing = [f for f in AMX_FEATURES if not matmul._cpu_has(f)]
    if missing:  # LLVM would abort the process on an instruction the target lacks
        raise TypingError(f"{what} needs the CPU features {missing}")


def _byte_pointer(context, builder, array_type, array, byte_offset):
    data = cgutils.create_struct_proxy(array_type)(context, builder, value=array).data
    return builder.gep(builder.bitcast(data, _I8.as_pointer()), [byte_offset])


def _call(builder, name: str, arg_types: list, args: list):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arg_types), name)
    builder.call(fn, args)


@intrinsic
def _tile_config_load(typingctx, config_u8):
    """LDTILECFG from the 64 bytes of ``config_u8`` (shapes of the 8 tiles; zeroes them)."""
    _check_amx("_tile_config_load")

    def codegen(context, builder, signature, args):
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], ir.Constant(_I64, 0))
        _call(builder, "llvm.x86.ldtilecfg", [_I8.as_pointer()], [ptr])
        return context.get_dummy_value()

    return types.void(config_u8), codegen


@intrinsic
def _tile_release(typingctx):
    """TILERELEASE: the tiles back to their initial state (the thread's XSAVE area stays small)."""
    _check_amx("_tile_release")

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic(prefer_literal=True)
def _tile_zero(typingctx, t):
    """TILEZERO tile t."""
    _check_amx("_tile_zero")
    tile = _tile_number(t, "_tile_zero")

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilezero", [_I8], [ir.Constant(_I8, tile)])
        return context.get_dummy_value()

    return types.void(t), codegen


def _tile_memory_intrinsic(llvm_name: str, doc: str):
    @intrinsic(prefer_literal=True)
    def tile_memory(typingctx, t, array, byte_offset, stride_bytes):
        _check_amx(llvm_name)
        tile = _tile_number(t, llvm_name)
        if not (isinstance(array, types.Array) and array.layout == "C"):
            raise TypingError(f"{llvm_name} needs a C-contiguous array, got {array}")

        def codegen(context, builder, signature, args):
            ptr = _byte_pointer(context, builder, signature.args[1], args[1], args[2])
            _call(builder, llvm_name, [_I8, _I8.as_pointer(), _I64], [ir.Constant(_I8, tile), ptr, args[3]])
            return context.get_dummy_value()

        return types.void(t, array, types.intp, types.intp), codegen

    tile_memory.__doc__ = doc
    return tile_memory


_tile_load = _tile_memory_intrinsic(
    "llvm.x86.tileloadd64", "TILELOADD tile t: its rows from ``array``'s bytes at byte_offset, stride_bytes apart.")
_tile_store = _tile_memory_intrinsic(
    "llvm.x86.tilestored64", "TILESTORED tile t: its rows to ``array``'s bytes at byte_offset, stride_bytes apart.")


@intrinsic(prefer_literal=True)
def _tile_dot_u8s8(typingctx, c, a, b):
    """TDPBUSD: tile c += tile a (uint8) times tile b (int8), 4 products per int32, wrapping (eq. M1)."""
    _check_amx("_tile_dot_u8s8")
    tiles = [_tile_number(t, "_tile_dot_u8s8") for t in (c, a, b)]

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tdpbusd", [_I8] * 3, [ir.Constant(_I8, t) for t in tiles])
        return context.get_dummy_value()

    return types.void(c, a, b), codegen


def tile_config() -> np.ndarray:
    """The 64-byte LDTILECFG operand: palette 1, tiles 0-7 each 16 rows x 64 bytes (C tiles: 16 int32 columns;
    A tiles: 64 k of 16 rows; B tiles: 16 k groups x 16 columns x 4 bytes)."""
    config_u8 = np.zeros(64, np.uint8)
    config_u8[0] = 1  # palette 1
    config_u8[16:32].view(np.uint16)[:] = TILE_K  # bytes per row of tiles 0..7 (little-endian uint16)
    config_u8[48:56] = TILE_ROWS  # rows of tiles 0..7
    return config_u8


TILE_CONFIG = tile_config()
TILE_CONFIG.flags.writeable = False  # a constant of the compiled kernels

# --------------------------------------------------------------------------------------------------------------
# Tile kernels
# --------------------------------------------------------------------------------------------------------------

_B_ROW_BYTES = PANEL_COLS * K_GROUP  # 256: one k group of a panel
_C_ROW_BYTES = PANEL_COLS * 4  # 256: one row of the int32 scratch (64 columns)


@njit(cache=True)
def _amx_sums_32x64(x_u8, lda, m, n_groups, panels_i8, panel_offset, acc_i32, acc_offset):
    """acc rows 0..31 (64 int32 each, from element acc_offset) = the products of x rows m .. m+31 with the panel's
    64 columns over k in [0, 4 n_groups), n_groups a multiple of 16. C tiles 0-3 = rows (0-15, 16-31) x
    columns (16v .. 16v+15, 16v+16 .. 16v+31) for v = 0, then 2."""
    for v in range(0, 4, 2):
        _tile_zero(0)
        _tile_zero(1)
        _tile_zero(2)
        _tile_zero(3)
        for g in range(0, n_groups, TILE_K_GROUPS):
            a = m * lda + g * K_GROUP
            _tile_load(4, x_u8, a, lda)  # x rows m .. m+15, k 4g .. 4g+63
            _tile_load(5, x_u8, a + TILE_ROWS * lda, lda)  # rows m+16 .. m+31
            b = panel_offset + g * _B_ROW_BYTES + v * TILE_K
            _tile_load(6, panels_i8, b, _B_ROW_BYTES)  # columns 16v .. 16v+15, k groups g .. g+15
            _tile_load(7, panels_i8, b + TILE_K, _B_ROW_BYTES)  # columns 16v+16 .. 16v+31
            _tile_dot_u8s8(0, 4, 6)
            _tile_dot_u8s8(1, 4, 7)
            _tile_dot_u8s8(2, 5, 6)
            _tile_dot_u8s8(3, 5, 7)
        c = acc_offset * 4 + v * TILE_K  # bytes: 16 int32 columns are 64 bytes
        _tile_store(0, acc_i32, c, _C_ROW_BYTES)
        _tile_store(1, acc_i32, c + TILE_K, _C_ROW_BYTES)
        _tile_store(2, acc_i32, c + TILE_ROWS * _C_ROW_BYTES, _C_ROW_BYTES)
        _tile_store(3, acc_i32, c + TILE_ROWS * _C_ROW_BYTES + TILE_K, _C_ROW_BYTES)


@njit(cache=True)
def _amx_sums_16x64(x_u8, lda, m, n_groups, panels_i8, panel_offset, acc_i32, acc_offset):
    """The same for x rows m .. m+15: C tiles 0, 1 (columns 16v .. 16v+31), one A tile."""
    for v in range(0, 4, 2):
        _tile_zero(0)
        _tile_zero(1)
        for g in range(0, n_groups, TILE_K_GROUPS):
            _tile_load(4, x_u8, m * lda + g * K_GROUP, lda)
            b = panel_offset + g * _B_ROW_BYTES + v * TILE_K
            _tile_load(6, panels_i8, b, _B_ROW_BYTES)
            _tile_load(7, panels_i8, b + TILE_K, _B_ROW_BYTES)
            _tile_dot_u8s8(0, 4, 6)
            _tile_dot_u8s8(1, 4, 7)
        c = acc_offset * 4 + v * TILE_K
        _tile_store(0, acc_i32, c, _C_ROW_BYTES)
        _tile_store(1, acc_i32, c + TILE_K, _C_ROW_BYTES)


@njit(cache=True)
def amx_rows_sums(dot4, x_u8, lda, m_start, m_end, panels_i8, panel_offset, acc_i32, acc_offset, n_valid):
    """acc rows (64 int32 each, from element acc_offset) = eq. M1 of x rows [m_start, m_end) and one panel, all of
    K: whole 16-row tiles and whole 64-k steps on AMX, then the rest on the ``vpdpbusd`` tiles of refquant.matmul
    (``dot4`` is their marker): the last k (< 64) of those rows added to their stored sums, and the last rows
    (< 16) over all of K."""
    n_groups = panels_i8.shape[1]
    amx_groups = n_groups // TILE_K_GROUPS * TILE_K_GROUPS
    amx_rows = (m_end - m_start) // TILE_ROWS * TILE_ROWS if amx_groups > 0 else 0
    if amx_rows > 0:
        _tile_config_load(TILE_CONFIG)
        m = m_start
        while m + BLOCK_ROWS <= m_start + amx_rows:
            _amx_sums_32x64(x_u8, lda, m, amx_groups, panels_i8, panel_offset, acc_i32,
                            acc_offset + (m - m_start) * PANEL_COLS)
            m += BLOCK_ROWS
        if m < m_start + amx_rows:
            _amx_sums_16x64(x_u8, lda, m, amx_groups, panels_i8, panel_offset, acc_i32,
                            acc_offset + (m - m_start) * PANEL_COLS)
        _tile_release()
        if amx_groups < n_groups:  # the last k: added to the tiles' sums (g0 > 0: _block_tiles loads them)
            _block_tiles(dot4, 6, x_u8, lda, m_start, m_start + amx_rows, amx_groups, n_groups - amx_groups,
                         panels_i8, panel_offset, acc_i32, acc_offset, PANEL_COLS, n_valid)
    m = m_start + amx_rows
    if m < m_end:  # the rows below a whole tile, as refquant.matmul's _matmul_task: K block by K block
        for g0 in range(0, max(n_groups, 1), K_BLOCK // K_GROUP):  # K = 0 still stores the zeros
            _block_tiles(dot4, 6, x_u8, lda, m, m_end, g0, min(K_BLOCK // K_GROUP, n_groups - g0), panels_i8,
                         panel_offset, acc_i32, acc_offset + amx_rows * PANEL_COLS, PANEL_COLS, n_valid)


@njit(cache=True, inline="always")
def aligned_offset(acc_i32):
    """The first element of the int32 scratch on a 64-byte boundary (0 .. 15): tile stores there are faster."""
    misalignment = np.intp(acc_i32.ctypes.data % 64)  # bytes past a boundary: a multiple of 4 for int32 data
    return (64 - misalignment) % 64 // 4


@njit(cache=True)
def matmul_task_amx(dot4, x_u8, lda, M, panels_i8, out_i32, N, task):
    """One task of refquant.matmul's product (rows [m_start, m_end) x one panel, its _matmul_task) on AMX: the
    task's sums into a scratch of 96 x 64 int32, then copied to the output's n_valid columns."""
    n_panels = panels_i8.shape[0]
    m_start, m_end, panel = task_rows_and_panel(task, M, n_panels)
    n0 = panel * PANEL_COLS
    n_valid = min(PANEL_COLS, N - n0)
    panel_offset = panel * panels_i8.shape[1] * _B_ROW_BYTES
    acc_i32 = np.empty(ROWS_PER_TASK * PANEL_COLS + 16, np.int32)
    acc_offset = aligned_offset(acc_i32)
    amx_rows_sums(dot4, x_u8, lda, m_start, m_end, panels_i8, panel_offset, acc_i32, acc_offset, n_valid)
    for r in range(m_end - m_start):
        for c in range(n_valid):
            out_i32[m_start + r, n0 + c] = acc_i32[acc_offset + r * PANEL_COLS + c]
