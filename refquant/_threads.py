"""refquant's own thread pool: how the histogram's big batches and the int8 product's tiles are shared by the cores.

Not part of any arithmetic, only of how fast it runs. A piece of work is cut into ``n_items`` items (chunks of a
batch, tasks of a product); this thread and up to ``threads - 1`` pool threads run the same nogil Numba kernel,
``kernel(claims_i64, thread, threads, *args)``, which walks the items with :func:`item_to_try` and does each item
whose claim it wins (:func:`take_item`, an atomic add on the item's claim counter), then counts it done
(:func:`finish_item`). Thread t first takes the items of its own t-th share, in order, then helps with the other
shares from their ends. This thread then spins until every item is done. So a pool thread that wakes up late only
finds less left to do: nobody waits for a thread to start, and the wait at the end is at most one item (a hand-off to
a sleeping pool thread and back costs 30-70 us here, a one-way wake-up 7.5 us). Which thread does which item
cannot change a bit: every item writes its own part of the result.

Why not Numba's ``parallel=True``: with its GNU OpenMP threading layer (the one installed with numba from pip on
Linux), a process that forks after a parallel call kills its child ("fork() called from a process already using
GNU OpenMP, this is unsafe"); the fork-safe alternatives are TBB (not installed with numba) and the workqueue layer,
which aborts the process when two Python threads launch parallel work at once and cost 90 us per launch here. This
pool is safe on both counts: after a fork the child forgets the parent's pool threads (which do not exist there)
and starts its own when needed; several Python threads can share the pool at once (each can finish its own items
alone). And it sets no process-wide Numba option, so other Numba code in the process keeps its threading layer.

Numba's cache does not notice edits to another file: the kernels of refquant.histogram and refquant.matmul that
call the functions below keep their compiled copies after this file changes, so clear the caches (``__pycache__``
or NUMBA_CACHE_DIR) after editing it.
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np
from numba import config as numba_config
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_sched_yield = getattr(os, "sched_yield", lambda: None)

DEFAULT_THREADS = max(1, int(numba_config.NUMBA_NUM_THREADS))
"""Threads a shared piece of work uses by default: NUMBA_NUM_THREADS (default: the CPUs this process may use)."""


# --------------------------------------------------------------------------------------------------------------
# Atomics for Numba kernels


def _atomic_codegen(op: str):
    """Numba codegen of an atomic operation on ``array[index]`` of an int64 array (sequentially consistent)."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])
        if op == "load":
            return builder.load_atomic(ptr, "seq_cst", 8)
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return codegen


@intrinsic
def _llvm_atomic_add_i64(typingctx, array, index, value):
    """Numba intrinsic: LLVM ``atomicrmw add`` on ``array[index]``; returns the old value."""
    return types.int64(array, types.intp, types.int64), _atomic_codegen("add")


@intrinsic
def _llvm_atomic_load_i64(typingctx, array, index):
    """Numba intrinsic: LLVM ``load atomic`` of ``array[index]`` (never kept in a register by the compiler)."""
    return types.int64(array, types.intp), _atomic_codegen("load")


def atomic_add_i64(array: np.ndarray, index: int, value: int) -> int:
    """``array[index] += value`` as one atomic instruction in Numba; returns the old value. (In plain Python, under
    NUMBA_DISABLE_JIT=1, it is not atomic, and one thread does all the work: see :func:`share_items`.)"""
    old = int(array[index])
    array[index] = old + value
    return old


def atomic_load_i64(array: np.ndarray, index: int) -> int:
    """``array[index]``, read atomically in Numba (a spinning loop sees other threads' writes)."""
    return int(array[index])


@overload(atomic_add_i64)
def _atomic_add_i64_numba(array, index, value):
    return lambda array, index, value: _llvm_atomic_add_i64(array, index, value)


@overload(atomic_load_i64)
def _atomic_load_i64_numba(array, index):
    return lambda array, index: _llvm_atomic_load_i64(array, index)


# --------------------------------------------------------------------------------------------------------------
# Claiming items (called from the kernels)


@njit(cache=True, nogil=True)
def item_to_try(k, n_items, thread, threads):
    """The k-th item (k = 0 .. n_items - 1) that ``thread`` of ``threads`` tries to take: its own share in
    order, then the items before it backwards, wrapping around (the other shares from their ends)."""
    first, end = n_items * thread // threads, n_items * (thread + 1) // threads
    if k < end - first:
        return first + k
    return (first - 1 - (k - (end - first))) % n_items


@njit(cache=True, nogil=True)
def take_item(claims_i64, item):
    """True for the one thread whose claim on ``item`` came first. ``claims_i64`` holds a claim counter per
    item, then the number of items done."""
    return atomic_add_i64(claims_i64, item, 1) == 0


@njit(cache=True, nogil=True)
def finish_item(claims_i64):
    """Count one more item done (after its results are written)."""
    atomic_add_i64(claims_i64, claims_i64.shape[0] - 1, 1)


@njit(cache=True, nogil=True)
def _spin_until_done_kernel(claims_i64, max_spins):
    """True once every item is done; False if they are not after max_spins reads."""
    n_items = claims_i64.shape[0] - 1
    for _ in range(max_spins):
        if atomic_load_i64(claims_i64, n_items) >= n_items:
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# The pool


class _PoolThread(threading.Thread):
    """A daemon thread that runs the kernels put on the shared queue ``_pool_tasks`` (a ThreadPoolExecutor's
    futures and locks cost 0.08 ms more per 1M histogram batch here). An error goes to the caller's list."""

    def __init__(self) -> None:
        super().__init__(name="refquant-pool", daemon=True)

    def run(self) -> None:
        while True:
            kernel, args, errors = _pool_tasks.get()
            try:
                kernel(*args)
            except BaseException as e:  # noqa: BLE001 -- raised by share_items in the caller's thread
                errors.append(e)


_pool_tasks: queue.SimpleQueue = queue.SimpleQueue()
_pool: list[_PoolThread] = []
_pool_lock = threading.Lock()  # two callers growing the pool at once start each thread once


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so start a new pool when needed."""
    global _pool_tasks, _pool_lock
    _pool_tasks = queue.SimpleQueue()
    _pool.clear()
    _pool_lock = threading.Lock()  # the parent may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def threads_for(n_items: int, num_threads: int) -> int:
    """How many threads share n_items items: at most one per item, and one under NUMBA_DISABLE_JIT=1 (the kernels
    are plain Python then, and the atomics are not atomic)."""
    if numba_config.DISABLE_JIT:
        return 1
    return max(1, min(int(num_threads), int(n_items)))


def share_items(kernel, n_items: int, thread_args: list[tuple]) -> None:
    """``kernel(claims_i64, t, threads, *thread_args[t])`` for t = 0 on this thread and t = 1 .. threads - 1 on
    pool threads, at once (threads = len(thread_args)); returns when each of the n_items items has been taken and
    done. An exception in a pool thread's kernel is raised here."""
    threads = len(thread_args)
    claims_i64 = np.zeros(n_items + 1, np.int64)  # a claim counter per item, then the number done
    errors: list[BaseException] = []
    with _pool_lock:
        while len(_pool) < threads - 1:
            _pool.append(_PoolThread())
            _pool[-1].start()
    for t in range(1, threads):
        _pool_tasks.put((kernel, (claims_i64, t, threads, *thread_args[t]), errors))
    kernel(claims_i64, 0, threads, *thread_args[0])
    while not _spin_until_done_kernel(claims_i64, 10_000):  # a pool thread is finishing an item
        if errors:
            raise errors[0]
        _sched_yield()
