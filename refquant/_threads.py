"""refquant's own thread pool: how the histogram's big batches and the int8 product's tiles are shared by the cores.

Not part of any arithmetic, only of how fast it runs. A piece of work is cut into ``n_items`` items (chunks of a
batch, tasks of a product); this thread and up to ``threads - 1`` pool threads run the same nogil Numba kernel,
``kernel(claims_i64, thread, threads, *args)``, which walks the items with :func:`item_to_try` and does each item
whose claim it wins (:func:`take_item`, an atomic add on the item's claim counter), then counts it done
(:func:`finish_item`). Thread t first takes the items of its own t-th share, in order, then helps with the other
shares from their ends. This thread then spins until every item is done. So a pool thread that wakes up late only
finds less left to do, and the wait at the end is at most one item. Which thread does which item cannot change a
bit: every item writes its own part of the result.

Waking a sleeping thread is slow on some machines: on this project's virtual machines (Firecracker, no guest halt
polling: an idle virtual CPU halts at once) a pool thread asleep on the queue, or on the GIL, started its share 57 to
175 us after this thread, a third of a 64 x 1024 x 1024 product. So, as OpenMP runtimes do, a pool thread that has
finished its work spins for :data:`STAY_AWAKE_SECONDS` (without the GIL, ``pause`` between reads) waiting for the
next work before it sleeps on the queue, and no thread is made to wait for the GIL in between: this thread puts the
work on the queue, then "rings" (counts one more ring in the pool's state) from a nogil kernel and waits there,
without the GIL, until each spinning pool thread has taken the GIL, its work, and started its kernel (3-5 us); at the
end it waits, without the GIL, until the pool threads are back in their spin before it takes the GIL back. Every
wait is bounded (:data:`START_WAIT_SECONDS`); a pool thread asleep on the queue is woken by the work put there, as
before, and this thread does not wait for it.

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
import platform
import queue
import threading
import time

import numpy as np
from llvmlite import ir
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


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _llvm_spin_pause(typingctx):
    """Numba intrinsic: x86's ``pause`` (LLVM ``llvm.x86.sse2.pause``) in a spin loop, which lets the other
    hardware thread of the core run meanwhile; nothing elsewhere."""

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


def spin_pause() -> None:
    """One pause of a spin loop (see _llvm_spin_pause; nothing in plain Python)."""


@overload(spin_pause)
def _spin_pause_numba():
    return lambda: _llvm_spin_pause()


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


# The pool's state, one int64 each in _state_i64 (atomics only): how many times work was put on the queue
# ("rings"), how many pool threads spin waiting for the next ring, how many run Python (hold or want the GIL).
RINGS, SPINNING, IN_PYTHON = 0, 1, 2


@njit(cache=True, nogil=True)
def _spin_until_done_kernel(claims_i64, state_i64, max_spins, park_spins):
    """True once every item is done and then no pool thread runs Python (or park_spins more reads have passed);
    False if the items are not done after max_spins reads. Waiting here, without the GIL, until the pool threads are
    back in their spin (or asleep on the queue) lets this thread take the GIL back without sleeping for it."""
    n_items = claims_i64.shape[0] - 1
    for _ in range(max_spins):
        if atomic_load_i64(claims_i64, n_items) >= n_items:
            for _ in range(park_spins):
                if atomic_load_i64(state_i64, IN_PYTHON) <= 0:
                    break
                spin_pause()
            return True
        spin_pause()
    return False


@njit(cache=True, nogil=True)
def _spin_for_ring_kernel(state_i64, rings_seen, max_spins):
    """A pool thread waits for work without the GIL: until the ring count differs from ``rings_seen`` (returns
    the new count) or max_spins reads (returns ``rings_seen``); counted as SPINNING, not IN_PYTHON, meanwhile."""
    atomic_add_i64(state_i64, IN_PYTHON, -1)
    atomic_add_i64(state_i64, SPINNING, 1)
    rings = rings_seen
    for _ in range(max_spins):
        rings = atomic_load_i64(state_i64, RINGS)
        if rings != rings_seen:
            break
        spin_pause()
    atomic_add_i64(state_i64, SPINNING, -1)
    atomic_add_i64(state_i64, IN_PYTHON, 1)
    return rings


@njit(cache=True, nogil=True)
def _count_in_python_kernel(state_i64, change):
    """IN_PYTHON += change: -1 before a pool thread sleeps on the queue, +1 when it runs Python again."""
    atomic_add_i64(state_i64, IN_PYTHON, change)


@njit(cache=True, nogil=True)
def _ring_and_spin_until_started_kernel(state_i64, claims_i64, threads, max_spins):
    """Ring, without the GIL, then wait until every pool thread t = 1 .. threads - 1 has claimed the first item of
    its share (it is in its nogil kernel then, done with the GIL), or max_spins rounds. Rung from here, a spinning
    pool thread finds the GIL free and does not sleep waiting for it."""
    atomic_add_i64(state_i64, RINGS, 1)
    n_items = claims_i64.shape[0] - 1
    for _ in range(max_spins):
        started = 0
        for t in range(1, threads):
            if atomic_load_i64(claims_i64, n_items * t // threads) != 0:
                started += 1
        if started == threads - 1:
            return True
        spin_pause()
    return False


# --------------------------------------------------------------------------------------------------------------
# The pool


class _PoolThread(threading.Thread):
    """A daemon thread that runs the kernels put on the shared queue ``_pool_tasks`` (a ThreadPoolExecutor's
    futures and locks cost 0.08 ms more per 1M histogram batch here). An error goes to the caller's list."""

    def __init__(self) -> None:
        super().__init__(name="refquant-pool", daemon=True)

    def run(self) -> None:
        state = _state_i64
        _count_in_python_kernel(state, 1)
        rings_seen = atomic_load_i64(state, RINGS)
        while True:
            try:  # work put before the last ring this thread saw is on the queue by now
                kernel, args, errors = _pool_tasks.get_nowait()
            except queue.Empty:
                rings = _spin_for_ring_kernel(state, rings_seen, _stay_awake_spins())
                if rings != rings_seen:  # rung while spinning: the work is on the queue (or another thread's)
                    rings_seen = rings
                    continue
                _count_in_python_kernel(state, -1)  # idle for a while: sleep on the queue
                kernel, args, errors = _pool_tasks.get()
                _count_in_python_kernel(state, 1)
            try:
                kernel(*args)
            except BaseException as e:  # noqa: BLE001 -- raised by share_items in the caller's thread
                errors.append(e)


_pool_tasks: queue.SimpleQueue = queue.SimpleQueue()
_state_i64 = np.zeros(3, np.int64)  # RINGS, SPINNING, IN_PYTHON

STAY_AWAKE_SECONDS = 0.0005
"""How long an idle pool thread spins for the next work before it sleeps on the queue (see :func:`share_items`)."""
START_WAIT_SECONDS = 0.00005
"""How long share_items waits at most for spinning pool threads to start, or at the end to leave Python."""
_SPINS_PER_SECOND: list = []


def _stay_awake_spins() -> int:
    return max(1, int(STAY_AWAKE_SECONDS * _spins_per_second()))


def _spins_per_second() -> float:
    """Reads (with their ``pause``) per second of the spin kernels, measured once (20,000 reads, ~0.5-3 ms)."""
    if not _SPINS_PER_SECOND:
        probe = np.zeros(3, np.int64)
        _spin_for_ring_kernel(probe, 0, 1)  # compiled or loaded from the cache before it is timed
        t0 = time.perf_counter()
        _spin_for_ring_kernel(probe, 0, 20_000)
        _SPINS_PER_SECOND.append(20_000 / max(time.perf_counter() - t0, 1e-6))
    return _SPINS_PER_SECOND[0]


_pool: list[_PoolThread] = []
_pool_lock = threading.Lock()  # two callers growing the pool at once start each thread once


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so start a new pool when needed."""
    global _pool_tasks, _pool_lock
    _pool_tasks = queue.SimpleQueue()
    _pool.clear()
    _state_i64[:] = 0  # the parent's pool threads, spinning or not, do not exist here
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
    if atomic_load_i64(_state_i64, SPINNING) > 0:  # awake pool threads: they take the GIL and start first
        _ring_and_spin_until_started_kernel(_state_i64, claims_i64, threads,
                                            max(1, int(START_WAIT_SECONDS * _spins_per_second())))
    else:  # asleep on the queue (or none yet): put woke them; this thread starts its share at once
        atomic_add_i64(_state_i64, RINGS, 1)
    kernel(claims_i64, 0, threads, *thread_args[0])
    wait_spins = max(1, int(START_WAIT_SECONDS * _spins_per_second()))
    while not _spin_until_done_kernel(claims_i64, _state_i64, 10 * wait_spins, wait_spins):  # a pool thread is
        if errors:                                                                          # finishing an item
            raise errors[0]
        _sched_yield()
