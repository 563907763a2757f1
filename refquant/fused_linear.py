"""QuantizedLinear's call in one pass: each tile of int32 sums is corrected and requantized as soon as it is summed.

The readable path (refquant.linear: :meth:`~refquant.linear.QuantizedLinear.accumulate`, then
:meth:`~refquant.linear.QuantizedLinear.requantize`) writes the (M, N) int32 products, corrects them in a second pass
and requantizes them in a third. Here the product's tiles (refquant.matmul: 6 rows x 64 columns of int32 sums, K
block by K block) end differently: after a tile's last K block, each of its sums goes at once, while the tile is in
L1, through the same two steps, element by element::

    raw[m, n] = acc[m, n] − zx_col[n] − z_w[n]·row_offsets[m]          int32, modulo 2^32            (eq. L5)
                zx_col[n] = z_x·col_offsets[n] (int32, once per layer), row_offsets[m] = Σ_k q_x[m, k]
    q_y[m, n] = <scheme>_requantize_channel(raw[m, n], n, constants)   the engine's own float path, or an
                                                                       integer variant (refquant.engines)

so the int32 products of a whole call never reach memory: a task (96 rows x one 64-column panel) sums into its own
24 KB of scratch, and only uint8 codes are stored. Each output element gets exactly the arithmetic of the readable
path: :func:`zero_point_corrected` is :func:`refquant.linear.accumulate_raw`'s two int32 subtractions for one
element, and the per-element requantization is the Numba function of refquant.engines (or refquant.fixed_point)
that the requantizer's own ``_fast`` kernel runs, itself tested equal to the NumPy statements
(tests/test_engines_details.py). tests/test_fused_linear.py proves the fused call equal to the readable one, bit for
bit, for every scheme it serves.

On AMX (refquant.matmul ``kernel="amx"``, refquant.amx) a task's sums come from 2 x 2 C tiles (16 x 16 int32 each,
32 rows x 32 columns) held in the tile registers over all of K and stored to the task's scratch after the last k
(plus the ``vpdpbusd`` tiles' last K mod 64 k and rows below 16); then the whole task's 96 x 64 sums go through the
same per-element epilogue (:func:`_fused_task_amx`): one switch from tiles to vectors per task (per 32 rows it was
half as fast here, benchmarks/README.md).

Matches: pytorch/FBGEMM src/ExecuteKernelU8S8.cc (ExecuteKernel::execute: after the last K block of an MCB x NCB
block, ``outputProcess_.f`` runs on it) with include/fbgemm/OutputProcessing-inl.h (ReQuantizeOutput::f: the
row/column offset corrections, then requantization, of that block) — fbgemm's output pipeline.

Row by row, 16 outputs at once: :func:`zero_point_corrected_row` is the zero-point step on 16 int32 lanes, and an
epilogue may register a row function (``register_epilogue(name, fn, row_fn)``: fbgemm's, onednn's and the four
integer variants' do, refquant.engines ``<engine>_requantize_row`` / refquant.fixed_point ``requantize_<variant>_row``)
which runs its per-element formula on 16 lanes with the same operations and roundings (refquant._lanes: the integer
variants' 64-bit products on even and odd int32 lanes); qnnpack's loops over its per-element function
(:func:`requantize_row`). tests/test_vector_epilogue.py proves each row function equal to its element function and
to the readable stages. (LLVM's loop vectoriser, tried first, gave no gain on the per-element functions here.)

A scheme joins by naming its epilogue (``Requantizer.epilogue``, ``Requantizer.epilogue_constants()``) and
registering its per-element function here (:func:`register_epilogue`) before the first fused call. The fused
kernels hold the code of those functions of other modules; their cache entries stay valid only while no refquant
module changes (refquant._numba_cache.package_source_stamp), so an edit of an epilogue function recompiles them.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit
from numba.core import types
from numba.core.typing.typeof import Purpose
from numba.extending import NativeValue, models, overload, register_model, typeof_impl, unbox

from refquant.fixed_point import EPILOGUE_FUNCTIONS as INTEGER_EPILOGUE_FUNCTIONS
from refquant.fixed_point import ROW_FUNCTIONS as INTEGER_ROW_FUNCTIONS
from refquant.engines import (fbgemm_requantize_channel, fbgemm_requantize_row, onednn_requantize_channel,
                              onednn_requantize_row, qnnpack_requantize_channel)
from refquant._lanes import load16, mul16_i32, splat16_i32, sub16_i32
from refquant.matmul import (
    _DOT4,
    _vec_store,
    K_BLOCK,
    K_GROUP,
    PANEL_COLS,
    ROWS_PER_TASK,
    PackedWeightS8,
    _block_tiles,
    kernel_for,
    padded_rows,
    run_tasks,
    task_rows_and_panel,
)
from refquant._threads import finish_item, item_to_try, take_item
from refquant.amx import aligned_offset, amx_rows_sums

TILE_ROWS = 6
"""Rows summed before their epilogue runs: one 6 x 64 tile (or three 2 x 64 tiles of the portable kernel)."""

# --------------------------------------------------------------------------------------------------------------
# Which per-element requantization the epilogue runs: a compile-time choice, as refquant.matmul's _Dot4
# --------------------------------------------------------------------------------------------------------------

_EPILOGUE_FUNCTIONS: dict[str, object] = {}  # name -> njit function (raw_i32, n, constants) -> uint8
_ROW_FUNCTIONS: dict[str, object] = {}  # name -> njit function (raw_i32 row, n0, constants, out row), optional


def register_epilogue(name: str, requantize_channel_fn, requantize_row_fn=None) -> None:
    """Let a requantizer with ``epilogue = name`` run fused: ``requantize_channel_fn(raw_i32, n, constants)`` is an
    ``@njit(cache=True, inline="always")`` function returning channel n's uint8 code of one int32 ``raw``.

    ``requantize_row_fn(raw_i32, offset, n_valid, n0, constants, out, m)`` (optional, same decorator): ``out[m,
    n0 + c] = requantize_channel_fn(raw_i32[offset + c], n0 + c, constants)`` for c < n_valid (<= 64), the same
    bits 16 outputs at once (refquant._lanes); without it the fused kernel loops over ``requantize_channel_fn``."""
    _EPILOGUE_FUNCTIONS[name] = requantize_channel_fn
    if requantize_row_fn is None:
        _ROW_FUNCTIONS.pop(name, None)
    else:
        _ROW_FUNCTIONS[name] = requantize_row_fn


class Epilogue:
    """Marker of one registered epilogue; Numba types it by name, so each kernel below is compiled once per name."""

    def __init__(self, name: str):
        if name not in _EPILOGUE_FUNCTIONS:
            raise ValueError(f"epilogue must be one of {tuple(_EPILOGUE_FUNCTIONS)}, got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Epilogue({self.name!r})"


class _EpilogueType(types.Type):
    def __init__(self, name: str):
        self.epilogue_name = name
        super().__init__(name=f"Epilogue({name})")


@typeof_impl.register(Epilogue)
def _typeof_epilogue(val, c):
    return _EpilogueType(val.name)


register_model(_EpilogueType)(models.OpaqueModel)


@unbox(_EpilogueType)
def _unbox_epilogue(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())  # the marker carries no data, only its type


def requantize_channel(epilogue: Epilogue, raw_i32, n, constants):
    """Channel n's uint8 code of ``raw_i32`` by the registered function of ``epilogue`` (a Numba overload picks it
    when the kernel is compiled)."""
    return _EPILOGUE_FUNCTIONS[epilogue.name](raw_i32, n, constants)


@overload(requantize_channel, inline="always")
def _requantize_channel_numba(epilogue, raw_i32, n, constants):
    fn = _EPILOGUE_FUNCTIONS[epilogue.epilogue_name]
    return lambda epilogue, raw_i32, n, constants: fn(raw_i32, n, constants)


def requantize_row(epilogue, raw_i32, offset, n_valid, n0, constants, out, m):
    """out[m, n0 + c] = channel (n0 + c)'s code of raw_i32[offset + c], c < n_valid: ``epilogue``'s row function
    where it registered one, else a loop over its per-element function (Numba only)."""
    raise NotImplementedError("requantize_row is called from Numba kernels only")


@overload(requantize_row, inline="always")
def _requantize_row_numba(epilogue, raw_i32, offset, n_valid, n0, constants, out, m):
    name = epilogue.epilogue_name
    row_fn = _ROW_FUNCTIONS.get(name)
    if row_fn is not None:
        def by_row(epilogue, raw_i32, offset, n_valid, n0, constants, out, m):
            row_fn(raw_i32, offset, n_valid, n0, constants, out, m)

        return by_row
    fn = _EPILOGUE_FUNCTIONS[name]

    def by_element(epilogue, raw_i32, offset, n_valid, n0, constants, out, m):
        if n0 < 0 or offset < 0 or m < 0:  # never: no negative-index wraparound below
            return
        for c in range(n_valid):
            out[m, n0 + c] = fn(raw_i32[offset + c], n0 + c, constants)

    return by_element


register_epilogue("fbgemm", fbgemm_requantize_channel, fbgemm_requantize_row)
register_epilogue("qnnpack", qnnpack_requantize_channel)
register_epilogue("onednn", onednn_requantize_channel, onednn_requantize_row)
for _variant, _fn in INTEGER_EPILOGUE_FUNCTIONS.items():  # requantization="tflite" etc. (refquant.fixed_point)
    register_epilogue(f"integer_{_variant}", _fn, INTEGER_ROW_FUNCTIONS.get(_variant))
del _variant, _fn


# --------------------------------------------------------------------------------------------------------------
# The epilogue of one tile
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def zero_point_corrected(acc_i32, zx_col_i32, zw_i32, row_offset_i32):
    """raw = acc − zx_col[n] − z_w[n]·row_offsets[m] of one element, int32 wrapping: accumulate_raw's
    ``np.subtract(acc, zx_col)`` and ``np.subtract(raw, np.multiply(row_offsets, z_w))``, whose low 32 bits are
    those of the exact int64 value (|each term| < 2^39)."""
    exact = np.int64(acc_i32) - np.int64(zx_col_i32) - np.int64(zw_i32) * np.int64(row_offset_i32)
    return np.int32(exact)  # keep the low 32 bits: int32's wrap


@njit(cache=True, inline="always")
def zero_point_corrected_row(acc_i32, offset, n_valid, n0, zx_col_i32, zw_i32, row_offset_i32):
    """acc_i32[offset + c] = :func:`zero_point_corrected` of it for channel n0 + c (c < n_valid), in place, 16 at
    once: int32 subtractions and the low 32 bits of z_w·row_offset (``vpsubd``, ``vpmulld``), which are those of the
    exact value's (tests/test_vector_epilogue.py)."""
    row_offset = splat16_i32(row_offset_i32)
    for c in range(0, n_valid, 16):
        lanes = n_valid - c
        acc = load16(acc_i32, offset + c, lanes)
        raw = sub16_i32(sub16_i32(acc, load16(zx_col_i32, n0 + c, lanes)),
                        mul16_i32(load16(zw_i32, n0 + c, lanes), row_offset))
        _vec_store(acc_i32, offset + c, raw, lanes)


@njit(cache=True, inline="always")
def _requantize_tile(epilogue, constants, acc_i32, acc_offset, m0, rows, n0, n_valid, zx_col_i32, zw_i32,
                     row_offsets_i32, out_u8):
    """out_u8[m0 .. m0+rows-1, n0 .. n0+n_valid-1] from the tile's sums (acc_i32 from acc_offset, 64 per row)."""
    if m0 < 0 or n0 < 0 or acc_offset < 0:  # never: tells LLVM the indices below are >= 0, so it skips Numba's
        return  # negative-index wraparound and loads the channel constants as vectors, not gathers
    for r in range(rows):
        m = m0 + r
        row = acc_offset + r * PANEL_COLS
        zero_point_corrected_row(acc_i32, row, n_valid, n0, zx_col_i32, zw_i32, row_offsets_i32[m])
        requantize_row(epilogue, acc_i32, row, n_valid, n0, constants, out_u8, m)


@njit(cache=True)
def requantize_rows_by_row_function(epilogue, raw_2d_i32, n0, constants, out_u8):
    """out[m, n0:] from raw[m, n0:] by :func:`requantize_row` (the epilogue's row function), row by row; with
    :func:`requantize_rows_by_element` and :func:`zero_point_corrected_rows`, what tests/test_vector_epilogue.py
    compares (defined here so that an edit of refquant recompiles them)."""
    n_valid = raw_2d_i32.shape[1] - n0
    flat = raw_2d_i32.ravel()
    for m in range(raw_2d_i32.shape[0]):
        requantize_row(epilogue, flat, m * raw_2d_i32.shape[1] + n0, n_valid, n0, constants, out_u8, m)


@njit(cache=True)
def requantize_rows_by_element(epilogue, raw_2d_i32, n0, constants, out_u8):
    """out[m, n] from raw[m, n], n >= n0, by :func:`requantize_channel` (the per-element function)."""
    for m in range(raw_2d_i32.shape[0]):
        for n in range(n0, raw_2d_i32.shape[1]):
            out_u8[m, n] = requantize_channel(epilogue, raw_2d_i32[m, n], n, constants)


@njit(cache=True)
def zero_point_corrected_rows(acc_2d_i32, n0, zx_col_i32, zw_i32, row_offsets_i32, by_lanes, by_element):
    """by_element[m, n] = :func:`zero_point_corrected` of acc[m, n] (n >= n0); by_lanes (a copy of acc) corrected
    in place by :func:`zero_point_corrected_row`."""
    n_valid = acc_2d_i32.shape[1] - n0
    for m in range(acc_2d_i32.shape[0]):
        for n in range(n0, acc_2d_i32.shape[1]):
            by_element[m, n] = zero_point_corrected(acc_2d_i32[m, n], zx_col_i32[n], zw_i32[n],
                                                       row_offsets_i32[m])
    flat = by_lanes.ravel()
    for m in range(acc_2d_i32.shape[0]):
        zero_point_corrected_row(flat, m * acc_2d_i32.shape[1] + n0, n_valid, n0, zx_col_i32, zw_i32,
                                    row_offsets_i32[m])


# --------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _fused_task_amx(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32,
                    row_offsets_i32, epilogue, constants, out_u8):
    """One task on AMX tiles (refquant.amx): all of its rows' sums (2 x 2 C tiles held over all of K, stored to the
    24 KB scratch acc_i32), then their epilogue while the scratch is in L1: one switch from tiles to vectors per
    task, not per 32 rows."""
    n_panels = panels_i8.shape[0]
    m_start, m_end, panel = task_rows_and_panel(task, M, n_panels)
    n0 = panel * PANEL_COLS
    n_valid = min(PANEL_COLS, N - n0)
    panel_offset = panel * panels_i8.shape[1] * (PANEL_COLS * K_GROUP)
    acc_offset = aligned_offset(acc_i32)  # tile stores on 64-byte boundaries (the scratch has 16 int32 to spare)
    amx_rows_sums(dot4, x_u8, lda, m_start, m_end, panels_i8, panel_offset, acc_i32, acc_offset, n_valid)
    _requantize_tile(epilogue, constants, acc_i32, acc_offset, m_start, m_end - m_start, n0, n_valid, zx_col_i32,
                     zw_i32, row_offsets_i32, out_u8)


@njit(cache=True, inline="always")
def _fused_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32,
                row_offsets_i32, epilogue, constants, out_u8):
    """One task (rows [m_start, m_end) x one panel): every K block but the last over all its rows (as
    refquant.matmul's _matmul_task, into the scratch acc_i32), then the last K block tile by tile, each tile's
    epilogue right after it."""
    n_panels = panels_i8.shape[0]
    n_groups = panels_i8.shape[1]  # >= 1: K >= 1
    m_start, m_end, panel = task_rows_and_panel(task, M, n_panels)
    n0 = panel * PANEL_COLS
    n_valid = min(PANEL_COLS, N - n0)
    panel_offset = panel * n_groups * (PANEL_COLS * K_GROUP)
    step = K_BLOCK // K_GROUP
    last_g0 = (n_groups - 1) // step * step
    for g0 in range(0, last_g0, step):
        _block_tiles(dot4, rows_per_tile, x_u8, lda, m_start, m_end, g0, step, panels_i8, panel_offset, acc_i32,
                     0, PANEL_COLS, n_valid)
    for m in range(m_start, m_end, TILE_ROWS):
        rows = min(TILE_ROWS, m_end - m)
        acc_offset = (m - m_start) * PANEL_COLS
        _block_tiles(dot4, rows_per_tile, x_u8, lda, m, m + rows, last_g0, n_groups - last_g0, panels_i8,
                     panel_offset, acc_i32, acc_offset, PANEL_COLS, n_valid)
        _requantize_tile(epilogue, constants, acc_i32, acc_offset, m, rows, n0, n_valid, zx_col_i32, zw_i32,
                         row_offsets_i32, out_u8)


def fused_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32, row_offsets_i32,
               epilogue, constants, out_u8):
    """One task on ``dot4``'s kernel, chosen when the kernel calling it is compiled: :func:`_fused_task_amx` for
    refquant.matmul's AMX marker, else :func:`_fused_task`. (Numba only: see the overload below.)"""
    raise NotImplementedError("fused_task is called from Numba kernels only")


@overload(fused_task, inline="always")
def _fused_task_numba(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32,
                      row_offsets_i32, epilogue, constants, out_u8):
    task_fn = _fused_task_amx if getattr(dot4, "dot4_name", None) == "tdpbusd" else _fused_task

    def run(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32, row_offsets_i32,
            epilogue, constants, out_u8):
        task_fn(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32,
                row_offsets_i32, epilogue, constants, out_u8)

    return run


@njit(cache=True, nogil=True)
def _fused_tasks_shared(claims_i64, thread, threads, dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, zx_col_i32,
                        zw_i32, row_offsets_i32, epilogue, constants, out_u8):
    """Take tasks (refquant._threads.share_items) and run each one this thread wins, in its own scratch."""
    acc_i32 = np.empty(ROWS_PER_TASK * PANEL_COLS + 16, np.int32)
    n_tasks = claims_i64.shape[0] - 1
    for k in range(n_tasks):
        task = item_to_try(k, n_tasks, thread, threads)
        if take_item(claims_i64, task):
            fused_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32,
                        row_offsets_i32, epilogue, constants, out_u8)
            finish_item(claims_i64)


@njit(cache=True, nogil=True)
def _fused_tasks_serial(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, zx_col_i32, zw_i32, row_offsets_i32,
                        epilogue, constants, out_u8):
    acc_i32 = np.empty(ROWS_PER_TASK * PANEL_COLS + 16, np.int32)
    n_tasks = -(-M // ROWS_PER_TASK) * panels_i8.shape[0]
    for task in range(n_tasks):
        fused_task(dot4, rows_per_tile, x_u8, lda, M, panels_i8, N, task, acc_i32, zx_col_i32, zw_i32,
                    row_offsets_i32, epilogue, constants, out_u8)


# --------------------------------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------------------------------

def epilogue_registered(requantizer) -> bool:
    """True when ``requantizer`` names a registered epilogue (``requantizer.epilogue``, :func:`register_epilogue`)."""
    name = getattr(requantizer, "epilogue", None)
    return name is not None and name in _EPILOGUE_FUNCTIONS


def fused_kernel_serves(requantizer, *, saturate_int16_pairs: bool = False, kernel: str | None = None) -> bool:
    """True when :class:`FusedLinear` runs this requantizer: it names a registered epilogue and the product runs a
    Numba kernel (not ``kernel="reference"``, not under NUMBA_DISABLE_JIT=1)."""
    if not epilogue_registered(requantizer):
        return False
    return kernel_for(saturate_int16_pairs=saturate_int16_pairs, kernel=kernel) != "reference"


class FusedLinear:
    """One layer's fused call: (M, K) uint8 codes -> (M, N) outputs of an epilogue, with the bits of
    ``<requantize>(accumulate_raw(x2d_u8, packed, col_offsets_i32, input_zero_point, weight_zero_points_i32,
    saturate_int16_pairs=...))``.

    Holds what does not change between calls (the packed weight, eq. L5's z_w vector) and, per kernel, the compiled
    function to call: Numba's dispatcher types every argument at every call, which costs ~15 us here with the
    markers and the constants tuple (more than the whole product at M = 1), so the compiled function for the
    argument types is looked up once (``Dispatcher.overloads[signature].entry_point``) and then called directly.
    """

    def __init__(self, packed: PackedWeightS8, col_offsets_i32: np.ndarray, weight_zero_points_i32: np.ndarray):
        self.packed = packed
        self.col_offsets_i32 = col_offsets_i32
        N = packed.shape[0]
        self.zw_i32 = np.ascontiguousarray(np.broadcast_to(weight_zero_points_i32.astype(np.int32), (N,)))
        self.affine = bool((weight_zero_points_i32 != 0).any())
        self._zx_col: tuple[int, np.ndarray] | None = None  # (z_x, z_x·col_offsets) of the last call
        self._zero_rows_i32 = np.zeros(0, np.int32)
        self._plans: dict = {}  # (kernel, saturate_int16_pairs, epilogue, out_dtype) -> _Plan
        self._constants_types: tuple | None = None  # the last call's constants and their types (the kernel key)

    def __call__(self, x2d_u8: np.ndarray, input_zero_point: int, epilogue: str, constants: tuple, *,
                 out_dtype=np.uint8, saturate_int16_pairs: bool = False, kernel: str | None = None,
                 row_offsets_i32: np.ndarray | None = None) -> np.ndarray:
        """``epilogue``: a registered name; ``constants``: what its function takes; ``out_dtype``: what it
        returns (uint8 codes, or float32 for the dynamic Linear). ``x2d_u8`` may already be padded with zero
        columns as refquant.matmul.padded_rows pads it; ``row_offsets_i32``: Σ_k x2d_u8[m, k] if the caller has
        them (refquant.quantize.quantize_padded_rows sums them while it quantizes), else summed here."""
        chosen = kernel_for(saturate_int16_pairs=saturate_int16_pairs, kernel=kernel)
        if chosen == "reference" or epilogue not in _EPILOGUE_FUNCTIONS:
            raise ValueError(f"the fused kernel does not serve epilogue {epilogue!r} with the {chosen!r} matmul "
                             f"kernel; use the readable stages (accumulate, then requantize)")
        return self.run(x2d_u8, input_zero_point, epilogue, constants, chosen, out_dtype=out_dtype,
                        saturate_int16_pairs=saturate_int16_pairs, row_offsets_i32=row_offsets_i32)

    def run(self, x2d_u8: np.ndarray, input_zero_point: int, epilogue: str, constants: tuple, kernel: str, *,
            out_dtype=np.uint8, saturate_int16_pairs: bool = False,
            row_offsets_i32: np.ndarray | None = None) -> np.ndarray:
        """The call of :meth:`__call__` for a ``kernel`` that refquant.matmul.kernel_for has chosen (a Numba
        kernel's name) and a registered ``epilogue``, neither checked again: what a layer calls when it has asked
        kernel_for itself (once per call: at batch 1 each Python step here is a few percent of the call)."""
        M = x2d_u8.shape[0]
        N = self.packed.shape[0]
        out = np.empty((M, N), out_dtype)
        if M == 0:
            return out
        plan = self._plans.get((kernel, saturate_int16_pairs, epilogue, out_dtype))
        if plan is None:
            plan = self._plans[kernel, saturate_int16_pairs, epilogue, out_dtype] = _Plan(
                _DOT4[kernel, bool(saturate_int16_pairs)], epilogue)
        if self._zx_col is None or self._zx_col[0] != input_zero_point:
            zx_col_i32 = np.multiply(np.int32(input_zero_point), self.col_offsets_i32, dtype=np.int32)  # wraps
            self._zx_col = (input_zero_point, zx_col_i32)
        zx_col_i32 = self._zx_col[1]
        if row_offsets_i32 is None:
            if self.affine:
                row_offsets_i32 = x2d_u8.sum(axis=1, dtype=np.int64).astype(np.int32)  # PackAWithRowOffset
            else:  # every z_w is 0: the term vanishes (zeros kept for the largest M so far, read only)
                if self._zero_rows_i32.shape[0] < M:
                    self._zero_rows_i32 = np.zeros(M, np.int32)
                row_offsets_i32 = self._zero_rows_i32[:M]
        dot4 = plan.dot4
        x_u8, lda = padded_rows(x2d_u8, self.packed, tile_aligned=plan.tile_aligned)
        args = (dot4, dot4.rows_per_tile, x_u8, lda, M, self.packed.panels_i8, N, zx_col_i32, self.zw_i32,
                row_offsets_i32, plan.epilogue, constants, out)
        last = self._constants_types  # (constants, their types): a layer passes the same tuple at every call
        if last is None or last[0] is not constants:
            last = self._constants_types = (constants, tuple(
                (c.dtype.char, c.ndim, c.flags.writeable) if isinstance(c, np.ndarray) else type(c)
                for c in constants))
        key = (x_u8.flags.writeable, last[1])
        kernels = plan.kernels.get(key)
        if kernels is None:
            kernels = plan.kernels[key] = (_CompiledOnFirstCall(_fused_tasks_serial, args),
                                           _CompiledOnFirstCall(_fused_tasks_shared,
                                                                (np.zeros(1, np.int64), 0, 1) + args))
        run_tasks(kernels[0], kernels[1], M, x2d_u8.shape[1], self.packed, args)
        return out


class _Plan:
    """What a :class:`FusedLinear` call needs for one (kernel, saturation, epilogue, output dtype), made at the
    first such call: the product's marker, the epilogue's marker, and the compiled kernels by the remaining Numba
    types (x's writeability, the constants' types)."""

    def __init__(self, dot4, epilogue: str) -> None:
        self.dot4 = dot4
        self.tile_aligned = dot4.name == "tdpbusd"
        self.epilogue = Epilogue(epilogue)
        self.kernels: dict = {}


class _CompiledOnFirstCall:
    """``dispatcher``'s compiled function for the Numba types of ``example_args``, looked up (compiled, or loaded
    from the cache) at its first call, then called without type dispatch. Only the kernels a run uses are compiled:
    a layer whose calls all stay below the thread pool's threshold never compiles the shared kernel."""

    def __init__(self, dispatcher, example_args: tuple):
        from numba import typeof

        self.dispatcher = dispatcher
        self.signature = tuple(typeof(a, Purpose.argument) for a in example_args)
        self.entry_point = None
        self._lock = threading.Lock()  # pool threads may make the first call together

    def __call__(self, *args):
        if self.entry_point is None:
            with self._lock:
                if self.entry_point is None:
                    if self.signature not in self.dispatcher.overloads:
                        self.dispatcher.compile(self.signature)
                    self.entry_point = self.dispatcher.overloads[self.signature].entry_point
        return self.entry_point(*args)


def linear_fused(x2d_u8: np.ndarray, packed: PackedWeightS8, col_offsets_i32: np.ndarray, input_zero_point: int,
                 weight_zero_points_i32: np.ndarray, requantizer, *, saturate_int16_pairs: bool = False,
                 kernel: str | None = None) -> np.ndarray:
    """:class:`FusedLinear` for one call with a requantizer (QuantizedLinear keeps its own): the bits of
    ``requantizer.requantize(accumulate_raw(x2d_u8, packed, col_offsets_i32, input_zero_point,
    weight_zero_points_i32, saturate_int16_pairs=...))``. Needs :func:`fused_kernel_serves` (else a ValueError)."""
    name = getattr(requantizer, "epilogue", None)
    if name is None:
        raise ValueError(f"the fused kernel does not serve requantization {getattr(requantizer, 'name', None)!r} "
                         f"(no epilogue); use QuantizedLinear.accumulate then requantize")
    return FusedLinear(packed, col_offsets_i32, weight_zero_points_i32)(
        x2d_u8, input_zero_point, name, requantizer.epilogue_constants(),
        saturate_int16_pairs=saturate_int16_pairs, kernel=kernel)
