"""Threads and processes: observers shared between threads lose no batch; a process forked after a parallel product
computes correctly; refquant imports and computes when no Numba cache location is writable."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from numba import njit
from numba.core import config as numba_config

import refquant.observers as robs
from parity import assert_same
from refquant.histogram import HistogramObserver
from refquant.linear import QuantizedLinear
from refquant._threads import finish_item, item_to_try, take_item
from refquant.matmul import PARALLEL_MIN_MACS, matmul_u8s8_acc32, matmul_u8s8_acc32_ref

F32 = np.float32
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# (a) threads sharing one observer


@contextlib.contextmanager
def frequent_thread_switches():
    """Let Python switch threads every microsecond, so that unlocked read-modify-writes interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def feed_from_threads(observer, batches: list[np.ndarray], n_threads: int) -> None:
    """Thread t feeds batches t, t + n_threads, ... to the one observer, all threads starting together."""
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for b in batches[t::n_threads]:
                observer(b)
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    with frequent_thread_switches():
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors


def growing_batches(rng, count: int, n: int) -> list[np.ndarray]:
    """Batches whose ranges grow, shrink and move: every forward changes the recorded range now and then."""
    return [(rng.standard_normal(n) * (1 + 0.05 * i) + rng.uniform(-3, 3)).astype(F32) for i in range(count)]


def test_histogram_observer_shared_by_threads_loses_no_batch(rng):
    """8 threads x 25 batches with moving ranges: every value is counted once, the range is everything's range.
    (Unlocked, as torch's is, most batches were lost: 82,000 of 640,000 values counted.)"""
    batches = growing_batches(rng, 200, 1000)
    obs = HistogramObserver()
    feed_from_threads(obs, batches, 8)
    everything = np.concatenate(batches)
    # When the range grows, the old counts are upsampled and re-binned in float32 (fractions of a count), so the
    # total drifts from the number of values by rounding: far below one value, where a lost batch is 1000.
    assert abs(float(obs.histogram.astype(np.float64).sum()) - everything.size) < 0.5
    assert (obs.min_val, obs.max_val) == (everything.min(), everything.max())
    obs.calculate_qparams()


def test_histogram_observer_shared_by_threads_equals_a_serial_feed(rng):
    """When the first batch sets the range, the order does not matter: the histogram from 8 threads equals the
    serial one bit for bit, and so do the qparams. (Unlocked, this failed now and then: the one-pass shortcut's
    read-modify-write is short; test_histogram_observer_shared_by_threads_loses_no_batch is the sure one.)"""
    first = np.concatenate([rng.uniform(-4, 4, 1000), [-4.0, 4.0]]).astype(F32)
    batches = [rng.uniform(-4, 4, int(rng.integers(1, 3000))).astype(F32) for _ in range(120)]
    shared, serial = HistogramObserver(), HistogramObserver()
    shared(first)
    serial(first)
    feed_from_threads(shared, batches, 8)
    for b in batches:
        serial(b)
    assert_same(shared.histogram, serial.histogram, "histogram")
    for got, want in zip(shared.calculate_qparams(), serial.calculate_qparams()):
        assert_same(got, want, "qparams")


@pytest.mark.parametrize("round_", range(4))
def test_minmax_observers_shared_by_threads_lose_no_batch(rng, round_):
    """MinMaxObserver: the range of everything. PerChannelMinMaxObserver: batch i alone sets channel i to -1 and
    +1 (all others are 0), so a lost batch leaves its channel at 0. (Unlocked, a round lost a batch about every
    second time: four rounds.)"""
    batches = growing_batches(rng, 400, 50)
    obs = robs.MinMaxObserver()
    feed_from_threads(obs, batches, 8)
    everything = np.concatenate(batches)
    assert (obs.min_val, obs.max_val) == (everything.min(), everything.max())

    n = 400
    marked = []
    for i in range(n):
        b = np.zeros((n, 3), F32)
        b[i] = [-1.0, 1.0, 0.5]
        marked.append(b)
    per_channel = robs.PerChannelMinMaxObserver()
    feed_from_threads(per_channel, marked, 8)
    lost = np.flatnonzero(per_channel.min_val != -1)
    assert lost.size == 0, f"{lost.size} of {n} batches lost, e.g. batch {lost[:5]}"
    assert (per_channel.max_val == 1).all()


@pytest.mark.parametrize("round_", range(3))
@pytest.mark.parametrize("cls", ["MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"])
def test_moving_average_shared_by_threads_equals_some_serial_order(rng, cls, round_):
    """A moving average depends on the order. The observer records the order in which batches updated it (a
    subclass that only notes each batch's tag); feeding the batches serially in that order gives the same bits."""
    order: list[int] = []

    class Recording(getattr(robs, cls)):
        def _update_range(self, cur_min, cur_max):
            order.append(int(np.max(cur_max)))  # the batch's tag: its maximum
            return super()._update_range(cur_min, cur_max)

    batches = []
    for i in range(300):
        b = rng.uniform(-1, 1, (4, 6)).astype(F32)
        b[:, 0] = F32(10 + i)  # the tag: the maximum of the batch and of each channel
        batches.append(b)
    shared = Recording(averaging_constant=0.25)
    feed_from_threads(shared, batches, 8)
    first = sorted(set(range(10, 310)) - set(order))
    assert len(first) == 1 and len(order) == 299, "every batch but the first must have updated the range"
    serial = getattr(robs, cls)(averaging_constant=0.25)
    for tag in first + order:
        serial(batches[tag - 10])
    assert_same(np.asarray(shared.min_val), np.asarray(serial.min_val), "min_val")
    assert_same(np.asarray(shared.max_val), np.asarray(serial.max_val), "max_val")


@pytest.mark.parametrize("make", [HistogramObserver, robs.MinMaxObserver, robs.MovingAverageMinMaxObserver,
                                  robs.PerChannelMinMaxObserver, robs.MovingAveragePerChannelMinMaxObserver])
def test_observers_still_pickle_and_copy(rng, make):
    """The lock is not pickled; a copy gets its own and goes on observing."""
    obs = make()
    x = rng.standard_normal((4, 5)).astype(F32)
    obs(x)
    for clone in (pickle.loads(pickle.dumps(obs)), copy.deepcopy(obs), copy.copy(obs)):
        assert clone._lock is not obs._lock
        clone(2 * x)
        obs2 = pickle.loads(pickle.dumps(obs))
        obs2(2 * x)
        for got, want in zip(clone.calculate_qparams(), obs2.calculate_qparams()):
            assert_same(got, want, f"{make.__name__} copy")


# --------------------------------------------------------------------------------------------------------------
# (b) a process forked after a parallel product


def _parallel_problem(rng):
    M, K, N = 200, 300, 130  # 7.8M multiply-adds: above PARALLEL_MIN_MACS, 3 x 3 tasks
    assert M * K * N >= PARALLEL_MIN_MACS
    x_u8 = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = rng.normal(0, 0.3, (N, K)).astype(F32)
    b = rng.normal(0, 1, N).astype(F32)
    return x_u8, w, b


def _child_computes(x_u8, w, b, conn) -> None:
    """In the forked child: a parallel matmul and a QuantizedLinear, results sent back to the parent."""
    ql = QuantizedLinear.from_float(w, b, 0.02, 3, 0.05, 100)
    conn.send((matmul_u8s8_acc32(x_u8, ql.weight_int8), ql(x_u8)))
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_process_forked_after_a_parallel_product_computes(rng, how):
    """The parent runs a product big enough for the parallel path; a forked child then computes one too (with
    GNU OpenMP as Numba's threading layer the child was killed: "fork() called from a process already using GNU
    OpenMP"; torch's child deadlocks). A timeout turns a deadlock into a failure."""
    x_u8, w, b = _parallel_problem(rng)
    ql = QuantizedLinear.from_float(w, b, 0.02, 3, 0.05, 100)
    expected_acc = matmul_u8s8_acc32_ref(x_u8, ql.weight_int8)
    assert_same(matmul_u8s8_acc32(x_u8, ql.weight_int8), expected_acc, "parent")  # the pool is running now
    expected_y = ql(x_u8)
    if how == "multiprocessing":
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child_computes, args=(x_u8, w, b, child_end))
        child.start()
        child_end.close()
        assert parent_end.poll(120), "the forked child sent nothing within 120 s (deadlock?)"
        acc, y = parent_end.recv()
        child.join(30)
        assert child.exitcode == 0
    else:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: write the results' bytes, leave at once whatever happens
            code = 1
            try:
                ql_child = QuantizedLinear.from_float(w, b, 0.02, 3, 0.05, 100)
                payload = matmul_u8s8_acc32(x_u8, ql_child.weight_int8).tobytes() + ql_child(x_u8).tobytes()
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(payload)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        import select

        ready, _, _ = select.select([read_fd], [], [], 120)
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child wrote nothing within 120 s (deadlock?)")
        with os.fdopen(read_fd, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"child exit status {status}"
        n_acc = expected_acc.nbytes
        acc = np.frombuffer(payload[:n_acc], np.int32).reshape(expected_acc.shape)
        y = np.frombuffer(payload[n_acc:], np.uint8).reshape(expected_y.shape)
    assert_same(acc, expected_acc, "child's accumulators")
    assert_same(y, expected_y, "child's QuantizedLinear")


def test_matmul_from_many_threads_at_once(rng):
    """Parallel products called from 6 threads at once share the pool and each gets its own right answer."""
    problems = [(rng.integers(0, 256, (200, 256), dtype=np.uint8), rng.integers(-128, 128, (100, 256), dtype=np.int8))
                for _ in range(6)]
    assert 200 * 256 * 100 >= PARALLEL_MIN_MACS
    results: dict[int, list] = {i: [] for i in range(6)}

    def work(i: int) -> None:
        for _ in range(5):
            results[i].append(matmul_u8s8_acc32(*problems[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    for i, (x, w) in enumerate(problems):
        expected = matmul_u8s8_acc32_ref(x, w)
        assert len(results[i]) == 5
        for got in results[i]:
            assert_same(got, expected, f"thread {i}")


@njit(nogil=True)
def _count_takers(claims_i64, thread, threads, takers_i64, fail_thread):
    """A shared kernel for the pool's tests: each item records which thread took it (takers += thread + 1). With
    fail_thread >= 0 only that thread takes items, and it raises at its first."""
    if 0 <= fail_thread != thread:
        return
    n_items = claims_i64.shape[0] - 1
    for k in range(n_items):
        item = item_to_try(k, n_items, thread, threads)
        if take_item(claims_i64, item):
            if thread == fail_thread:
                raise ValueError("a pool thread's kernel failed")
            takers_i64[item] += thread + 1
            finish_item(claims_i64)


def _wait_for(condition, seconds: float = 5.0) -> bool:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if condition():
            return True
        time.sleep(0.001)
    return condition()


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT=1: one thread does all the work")
def test_pool_spins_between_calls_then_sleeps_and_every_item_runs_once():
    """Calls back to back (the pool threads spin between them, refquant._threads), calls after the pool has gone to
    sleep on the queue, and 2 to 5 threads: every item is taken by exactly one thread every time; idle, the pool's
    state settles (no thread spinning, none in Python) and the next call still runs every item."""
    from refquant import _threads as pool

    for threads in (2, 3, 5):
        for n_items in (threads, 7, 64):
            for call in range(40):
                takers = np.zeros(n_items, np.int64)
                pool.share_items(_count_takers, n_items, [(takers, -1)] * threads)
                assert np.all((takers >= 1) & (takers <= threads)), (threads, n_items, call, takers)
                if call % 10 == 9:  # idle longer than the pool stays awake: it sleeps on the queue
                    assert _wait_for(lambda: pool._state_i64[pool.SPINNING] == 0
                                     and pool._state_i64[pool.IN_PYTHON] == 0), pool._state_i64
    assert pool._state_i64[pool.SPINNING] >= 0 and pool._state_i64[pool.IN_PYTHON] >= 0


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT=1: one thread does all the work")
def test_pool_thread_error_is_raised_and_the_pool_goes_on():
    """A pool thread's kernel that raises (while the pool spins between calls): share_items raises that error in
    the caller; the next calls run every item."""
    from refquant import _threads as pool

    pool.share_items(_count_takers, 8, [(np.zeros(8, np.int64), -1)] * 2)  # the pool is awake
    with pytest.raises(ValueError, match="a pool thread's kernel failed"):
        pool.share_items(_count_takers, 8, [(np.zeros(8, np.int64), 1)] * 2)
    for _ in range(5):
        takers = np.zeros(8, np.int64)
        pool.share_items(_count_takers, 8, [(takers, -1)] * 2)
        assert np.all((takers >= 1) & (takers <= 2)), takers


# --------------------------------------------------------------------------------------------------------------
# (c) no writable Numba cache location

_CHILD = r"""
import json, sys, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import refquant
    from refquant.quantize import _quantize_fma_kernel
    x = np.frombuffer(bytes.fromhex(sys.argv[1]), np.float32)
    q = refquant.quantize_per_tensor(x, 0.05, 3, "quint8")
    y = None
    if sys.argv[2] == "linear":
        w = x[:12].reshape(3, 4)
        ql = refquant.QuantizedLinear.from_float(w, None, 0.02, 3, 0.05, 100)
        y = ql(np.arange(8, dtype=np.uint8).reshape(2, 4) * np.uint8(30)).tolist()
print(json.dumps({"file": refquant.__file__, "q": q.tolist(), "y": y, "cache": type(_quantize_fma_kernel._cache).__name__,
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""


@pytest.mark.parametrize("numba_cache_dir", ["unset", "/proc"])
def test_import_and_compute_without_a_writable_numba_cache(tmp_path, rng, numba_cache_dir):
    """Every cache location Numba tries is made unwritable for real (root ignores chmod, so permissions would not
    do): a copy of the package whose ``__pycache__`` is a regular file (Numba's in-tree locator cannot create its
    directory there), XDG_CACHE_HOME and HOME under a regular file (the user-wide locator's ~/.cache/numba), and
    NUMBA_CACHE_DIR unset or under /proc (where even root cannot create a directory). On main, ``import refquant``
    failed: "cannot cache function ...: no locator available". Now it imports, computes the same bits uncached,
    and warns once, saying how to set NUMBA_CACHE_DIR."""
    import json

    site = tmp_path / "site"
    shutil.copytree(ROOT / "refquant", site / "refquant", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "refquant" / "__pycache__").write_text("a file where Numba would put its in-tree cache directory\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(blocker),
           "XDG_CACHE_HOME": str(blocker / "cache"), "REFQUANT_MATMUL_KERNEL": "reference"}
    env.pop("NUMBA_CACHE_DIR", None)
    if numba_cache_dir == "/proc":
        env["NUMBA_CACHE_DIR"] = "/proc/refquant-numba-cache"
    x = rng.normal(0, 3, 40).astype(F32)
    mode = "linear" if numba_cache_dir == "unset" else "quantize"
    run = subprocess.run([sys.executable, "-c", _CHILD, x.tobytes().hex(), mode], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["file"] == str(site / "refquant" / "__init__.py")
    assert out["cache"] == "NullCache"  # compiled uncached
    from refquant.quantize import quantize_per_tensor

    assert_same(np.asarray(out["q"], np.uint8), quantize_per_tensor(x, 0.05, 3, "quint8"), "codes")
    if mode == "linear":
        ql = QuantizedLinear.from_float(x[:12].reshape(3, 4), None, 0.02, 3, 0.05, 100)
        assert_same(np.asarray(out["y"], np.uint8), ql(np.arange(8, dtype=np.uint8).reshape(2, 4) * np.uint8(30)),
                    "QuantizedLinear")
    assert [w[0] for w in out["warnings"]] == ["NumbaCacheWarning"], out["warnings"]
    assert "set NUMBA_CACHE_DIR to a writable directory" in out["warnings"][0][1]
    assert (site / "refquant" / "__pycache__").is_file() and blocker.is_file()  # nothing was written


def test_a_writable_cache_changes_nothing():
    """Where Numba can cache (this test run), refquant's kernels are cached as before and nothing is patched."""
    from numba.core import dispatcher

    import refquant._numba_cache as nc
    from refquant.quantize import _quantize_fma_kernel

    if not nc.numba_can_cache():
        pytest.skip("no writable Numba cache location on this machine")
    assert dispatcher.Dispatcher.enable_caching is nc._numba_enable_caching
    assert type(_quantize_fma_kernel._cache).__name__ == "FunctionCache"


_PROBE_CALLER = """from numba import njit
from refquant._probe_callee import value


@njit(cache=True)
def call_value():
    return value()
"""
_PROBE_CALLEE = """from numba import njit


@njit(cache=True)
def value():
    return {}
"""


def test_an_edit_of_another_module_recompiles_a_cached_kernel(tmp_path):
    """A cached kernel holds the code of the functions it calls from other modules (the fused Linear's epilogues
    live in refquant.engines and refquant.fixed_point). Numba keys a cache entry to its own file only: editing the
    callee's module alone loaded the old kernel, which computed the old value. refquant's stamp covers the whole
    package (refquant._numba_cache.package_source_stamp): the edit recompiles, and the new value comes out."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "refquant", site / "refquant", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "refquant" / "_probe_caller.py").write_text(_PROBE_CALLER)
    callee = site / "refquant" / "_probe_callee.py"
    env = {**os.environ, "PYTHONPATH": str(site), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    child = ("import refquant; from refquant._probe_caller import call_value; "
             "print(call_value(), sum(call_value.stats.cache_hits.values()))")

    def run() -> list[str]:
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.split()

    callee.write_text(_PROBE_CALLEE.format(1))
    assert run()[0] == "1"
    assert run() == ["1", "1"]  # the second process loads the kernel from the cache
    callee.write_text(_PROBE_CALLEE.format(22))  # the caller's file is unchanged
    assert run()[0] == "22"
    assert run() == ["22", "1"]  # and the new kernel is cached in turn
