"""The fast forward path of refquant.histogram: its kernels equal the readable NumPy path bit for bit, a thread
split never changes a bit, and NaN is still found (the fast aminmax ignores NaN; histc's skip count finds it)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver as TorchHistogramObserver

import refquant._threads as pool
import refquant.histogram as H
from parity import assert_same
from refquant.histogram import HistogramObserver

f32 = np.float32

# lengths around the kernels' vector width (8), the histc block (H._HISTC_BLOCK) and its tables (H._HISTC_TABLES)
SMALL_LENGTHS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 127, 128, 129, 255, 256, 257, 1000]


def hard_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """n float32 values: normal at a random magnitude, with some ties, constants, ±inf, huge and tiny values."""
    kind = int(rng.integers(0, 6))
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 39)).astype(f32)
        if kind == 1:
            x = np.round(x * f32(3)).astype(f32)  # ties and signed zeros
        elif kind == 2:
            x[:] = x[0]
        elif kind == 3:
            x[rng.integers(0, n, max(1, n // 10))] = rng.choice(f32([np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -0.0]))
        elif kind == 4:
            x = (rng.integers(-3, 4, n) * f32(2.0**25)).astype(f32)  # above 2^24: lo - 1 rounds to lo
    return x


def zero_sign_cleared(v) -> np.ndarray:
    """v + 0.0: -0.0 becomes +0.0, everything else is unchanged (the sign of a zero min is unspecified, see
    test_sign_of_a_zero_min_changes_nothing)."""
    return (np.asarray(v, f32) + f32(0)).astype(f32)


# --------------------------------------------------------------------------------------------- aminmax


def test_nan_ignoring_aminmax_kernel_equals_fmin_fmax(rng):
    for trial in range(600):
        n = int(rng.choice(SMALL_LENGTHS + [int(rng.integers(1, 5000))]))
        x = hard_values(rng, n)
        if trial % 3 == 0:
            x[rng.integers(0, n, int(rng.integers(1, n + 1)))] = np.nan  # some or all NaN
        mn, mx = H._nan_ignoring_aminmax_kernel(x)
        expected_min, expected_max = np.fmin.reduce(x, initial=np.inf), np.fmax.reduce(x, initial=-np.inf)
        assert_same(zero_sign_cleared(mn), zero_sign_cleared(expected_min), f"min, trial {trial}, n={n}")
        assert_same(zero_sign_cleared(mx), zero_sign_cleared(expected_max), f"max, trial {trial}, n={n}")


def test_nan_ignoring_aminmax_kernel_of_nothing_but_nan_is_an_empty_range():
    mn, mx = H._nan_ignoring_aminmax_kernel(np.full(100, np.nan, f32))
    assert (mn, mx) == (np.inf, -np.inf)


def test_minnum_maxnum_python_fallback_is_fmin_fmax():
    """The plain-Python twin used under NUMBA_DISABLE_JIT=1."""
    assert H.minnum_f32(f32(np.nan), f32(2)) == 2 and H.maxnum_f32(f32(2), f32(np.nan)) == 2
    assert H.minnum_f32(f32(-1), f32(2)) == -1 and H.maxnum_f32(f32(-1), f32(2)) == 2
    assert np.isnan(H.minnum_f32(f32(np.nan), f32(np.nan)))


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_aminmax_fast_threads_equal_numpy(rng, num_threads):
    for n in [H.PARALLEL_MIN_ELEMENTS - 1, H.PARALLEL_MIN_ELEMENTS, 5 * H._CHUNK + 3]:
        x = rng.standard_normal(n).astype(f32)
        x[rng.integers(0, n)] = f32(rng.choice([-1e30, 1e30, np.inf, -np.inf]))
        mn, mx = H._aminmax_fast(x, num_threads)
        assert isinstance(mn, np.float32) and isinstance(mx, np.float32)
        assert_same(mn, np.min(x), f"n={n}")
        assert_same(mx, np.max(x), f"n={n}")


# --------------------------------------------------------------------------------------------- histc


def random_edges(rng: np.random.Generator, x: np.ndarray) -> tuple[np.float32, np.float32]:
    """histc edges around (or inside, or far outside) x's range, or overflowing float32."""
    finite = x[np.isfinite(x)]
    choice = int(rng.integers(0, 5))
    if choice == 4 or finite.size == 0:
        return f32(-3e38), f32(3e38)  # hi - lo overflows: torch skips every value
    lo, hi = f32(finite.min()), f32(finite.max())
    if choice == 1:
        lo, hi = f32(lo * f32(0.5)), f32(hi * f32(0.5))  # some values outside
    elif choice == 2:
        with np.errstate(over="ignore"):
            width = f32(hi - lo) if hi > lo else f32(1)
            wider = f32(lo - width), f32(hi + width)
        if np.isfinite(wider).all():
            lo, hi = wider
    with np.errstate(over="ignore", invalid="ignore"):
        return H.histc_edges(finite, lo, hi)


def test_histc_count_kernel_equals_readable_histc(rng):
    """The kernel alone (one thread, every block and table layout, tails) against the readable histc."""
    for trial in range(500):
        n = int(rng.choice(SMALL_LENGTHS + [int(rng.integers(1, 20000))]))
        x = hard_values(rng, n)
        if trial % 4 == 0:
            x[rng.integers(0, n, max(1, n // 20))] = np.nan
        bins = int(rng.choice([2048, 1, 2, 7, 100, 4096]))
        lo, hi = random_edges(rng, x)
        with np.errstate(over="ignore"):
            expected = H.histc(x, bins, lo, hi)
        counts, skipped = H._histc_fast(x, bins, lo, hi, num_threads=1)
        assert_same(counts, expected, f"trial {trial}: n={n} bins={bins} [{lo}, {hi}]")
        assert skipped == n - int(expected.astype(np.int64).sum()), f"trial {trial}: skipped"


@pytest.mark.parametrize("num_threads", [2, 3, 4])
def test_histc_fast_thread_split_changes_no_bit(rng, num_threads):
    """Batches shared chunk by chunk between threads (sizes around the chunk and the threshold)."""
    chunk = H._CHUNK
    for n in [H.PARALLEL_MIN_ELEMENTS, H.PARALLEL_MIN_ELEMENTS + 1, 4 * chunk - 1, 5 * chunk + 129, 7 * chunk]:
        x = hard_values(rng, n)
        x[rng.integers(0, n, 50)] = np.nan
        lo, hi = random_edges(rng, x)
        with np.errstate(over="ignore"):
            expected = H.histc(x, 2048, lo, hi)
        one = H._histc_fast(x, 2048, lo, hi, num_threads=1)
        shared = H._histc_fast(x, 2048, lo, hi, num_threads=num_threads)
        assert_same(one[0], expected, f"n={n}: one thread")
        assert_same(shared[0], expected, f"n={n}: {num_threads} threads")
        assert shared[1] == one[1] == n - int(expected.astype(np.int64).sum())


def test_histc_bin_index_golden():
    """Hand-derived indices over [0, 8] with 4 bins: (x - 0) * 4 / 8 truncated; the right edge goes to bin 3;
    values outside, NaN and ±inf are skipped (index = bins); an overflowing product lands in bin 0."""
    x = f32([0.0, 1.99, 2.0, 5.5, 7.99, 8.0, -0.0, -1e-45, 8.000001, np.nan, np.inf, -np.inf])
    expected = [0, 0, 1, 2, 3, 3, 0, 4, 4, 4, 4, 4]
    got = [int(H._histc_bin_index(v, f32(0), f32(8), 4)) for v in x]
    assert got == expected
    # 8 bins over [0, 1e38]: f32(x * 8) overflows above 0.425e38, and torch's cast of inf lands in bin 0
    x = f32([0.3e38, 0.5e38, 1.0e38])
    got = [int(H._histc_bin_index(v, f32(0), f32(1e38), 8)) for v in x]
    assert got == [2, 0, 0]
    for v, b in zip(x, got):
        assert torch.histc(torch.tensor([v]), 8, 0.0, float(f32(1e38)))[b] == 1


# --------------------------------------------------------------------------------------------- observer


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def inf_warning(expected: bool):
    """pytest.warns for torch's "torch.inf detected" warning where a batch holds ±inf, else no warning at all."""
    return pytest.warns(UserWarning, match="inf detected") if expected else _no_warning()


def observer_state(obs: HistogramObserver) -> tuple:
    return obs.histogram.copy(), obs.min_val, obs.max_val


@pytest.mark.parametrize("n", [50, 3000, H.PARALLEL_MIN_ELEMENTS + 11])
def test_nan_anywhere_raises_and_changes_nothing(rng, n):
    """NaN at random places of first and later batches, with and without ±inf, also all-NaN and NaN + inf only;
    big batches go through the threaded path. Torch raises on every one of these (see test_histogram.py)."""
    for case in range(12):
        obs = HistogramObserver(implementation="numba")
        if case % 2:
            obs(rng.standard_normal(1000).astype(f32) * f32(rng.choice([0.5, 4.0])))
        if case % 3 == 2:
            obs(rng.standard_normal(1000).astype(f32))
            for _ in range(2):  # two batches inside the range: the one-pass shortcut is armed
                obs(rng.standard_normal(1000).astype(f32) * f32(0.01))
        before = observer_state(obs)
        x = rng.standard_normal(n).astype(f32) * f32(rng.choice([0.1, 1.0, 10.0]))
        x[rng.integers(0, n, int(rng.integers(1, 4)))] = np.nan
        if case in (4, 5):  # an inf where there is no NaN (overwriting the only NaN would leave none to find)
            x[rng.choice(np.flatnonzero(~np.isnan(x)))] = f32(rng.choice([np.inf, -np.inf]))
        if case in (6, 7):
            x[:] = np.nan
        if case in (8, 9):
            x[:] = np.nan
            x[rng.integers(0, n)] = np.inf
        with pytest.raises(ValueError, match="contains NaN"):
            obs(x)
        after = observer_state(obs)
        assert_same(after[0], before[0], f"case {case}: histogram")
        assert_same(f32([after[1], after[2]]), f32([before[1], before[2]]), f"case {case}: range")


def test_nan_with_an_overflowing_range_is_found_and_none_is_not_invented():
    """With hi - lo = inf histc skips every value, so the skip count cannot tell NaN: np.isnan decides."""
    obs = HistogramObserver(implementation="numba")
    with pytest.raises(ValueError, match="contains NaN"):
        obs(f32([-3e38, 3e38, np.nan]))
    ours, theirs = HistogramObserver(implementation="numba"), TorchHistogramObserver()
    x = f32([-3e38, 3e38, 1.0])
    ours(x)
    theirs(torch.from_numpy(x))
    assert_same(ours.histogram, theirs.histogram.numpy())


@pytest.mark.parametrize("num_threads", [2, 3])
def test_observer_thread_split_changes_no_bit(rng, num_threads):
    """Growing, shrinking and repeated ranges (the one-pass shortcut), ±inf elements, big and small batches."""
    sizes = [H.PARALLEL_MIN_ELEMENTS + 5, 4000, 3 * H._CHUNK + 17, H.PARALLEL_MIN_ELEMENTS + 5]
    one = HistogramObserver(implementation="numba", num_threads=1)
    shared = HistogramObserver(implementation="numba", num_threads=num_threads)
    for i, n in enumerate(sizes * 2):
        x = rng.standard_normal(n).astype(f32) * f32(rng.choice([0.5, 1.0, 1.5]))
        if i in (2, 3, 4, 6):
            x = np.clip(x, f32(-1), f32(1))  # inside the range so far: from the third, the one-pass shortcut
        if i == 5:
            x[rng.integers(0, n, 3)] = f32(np.inf)
        with inf_warning(i == 5):
            one(x)
        with inf_warning(i == 5):
            shared(x)
        assert_same(shared.histogram, one.histogram, f"batch {i}: histogram")
        assert_same(f32([shared.min_val, shared.max_val]), f32([one.min_val, one.max_val]), f"batch {i}: range")
    for a, b in zip(shared.calculate_qparams(), one.calculate_qparams()):
        assert_same(a, b, "qparams")


def test_big_batches_match_torch(rng):
    """The threaded path against torch itself: growing, then repeated ranges, a batch with ±inf."""
    ours = HistogramObserver(reduce_range=True, implementation="numba")
    theirs = TorchHistogramObserver(reduce_range=True)
    n = H.PARALLEL_MIN_ELEMENTS + 3 * H._CHUNK + 1
    for i, scale in enumerate([1.0, 1.3, 1.3, 0.7, 2.0]):
        x = rng.standard_normal(n).astype(f32) * f32(scale)
        if i == 2:
            x[rng.integers(0, n, 5)] = f32(-np.inf)
        with inf_warning(i == 2):
            ours(x)
        with inf_warning(i == 2):
            theirs(torch.from_numpy(x))
        assert_same(ours.histogram, theirs.histogram.numpy(), f"batch {i}: histogram")
        assert_same(f32(ours.min_val), theirs.min_val.numpy(), f"batch {i}: min_val")
        assert_same(f32(ours.max_val), theirs.max_val.numpy(), f"batch {i}: max_val")
    scale, zero_point = ours.calculate_qparams()
    expected_scale, expected_zero_point = theirs.calculate_qparams()
    assert_same(scale, expected_scale.numpy(), "scale")
    assert_same(zero_point, expected_zero_point.numpy(), "zero_point")


def test_sign_of_a_zero_min_changes_nothing(rng):
    """When a batch's minimum is zero and it holds both -0.0 and +0.0, which one is min_val is unspecified: torch's
    own answer depends on its thread count (its aminmax reduces per thread and per vector lane), NumPy's and the
    kernel's on their lane order. The sign changes no bin, no upscaled count, no scale and no zero point."""
    x = (np.abs(rng.standard_normal(5000)) + 1).astype(f32)
    x[[10, 2000]] = f32([-0.0, 0.0])
    later = (rng.standard_normal(5000) * 3).astype(f32)  # grows the range: the old histogram is upscaled
    results = []
    for min_sign in (f32(-0.0), f32(0.0)):
        obs = HistogramObserver(implementation="numba")
        obs(x)
        obs.min_val = min_sign  # as if aminmax had returned this zero
        results.append((obs.histogram.copy(), obs.calculate_qparams()))
        obs(later)
        results.append((obs.histogram.copy(), obs.calculate_qparams()))
    theirs = TorchHistogramObserver()
    theirs(torch.from_numpy(x))
    expected_first = theirs.calculate_qparams()
    theirs(torch.from_numpy(later))
    expected_later = theirs.calculate_qparams()
    for k, expected in enumerate([expected_first, expected_later]):
        (hist_neg, qp_neg), (hist_pos, qp_pos) = results[k], results[2 + k]
        assert_same(hist_neg, hist_pos, f"step {k}: histogram")
        for a, b, t in zip(qp_neg, qp_pos, expected):
            assert_same(a, b, f"step {k}: qparams")
            assert_same(a, t.numpy(), f"step {k}: qparams vs torch")


def test_each_thread_tries_every_chunk_once_own_share_first():
    for n_chunks in range(1, 20):
        for threads in range(1, 6):
            for t in range(threads):
                order = [int(pool.item_to_try(k, n_chunks, t, threads)) for k in range(n_chunks)]
                assert sorted(order) == list(range(n_chunks)), (n_chunks, threads, t, order)
                first, end = n_chunks * t // threads, n_chunks * (t + 1) // threads
                assert order[: end - first] == list(range(first, end))


def test_plain_python_kernels_give_the_same_bits(rng):
    """Under NUMBA_DISABLE_JIT=1 the kernels run as Python (intrinsics fall back to NumPy, one thread): same
    histogram and qparams as the compiled path, and NaN still raises."""
    batches = [rng.standard_normal(n).astype(f32) * f32(s) for n, s in ((300, 1.0), (257, 2.5), (129, 0.5))]
    batches[1][7] = f32(np.inf)
    script = (
        "import sys, warnings, numpy as np\n"
        "from refquant.histogram import HistogramObserver\n"
        "warnings.simplefilter('ignore')\n"
        "data = np.load(sys.argv[1])\n"
        "obs = HistogramObserver(reduce_range=True, implementation='numba')\n"
        "for k in sorted(data):\n"
        "    obs(data[k])\n"
        "scale, zero_point = obs.calculate_qparams()\n"
        "np.save(sys.argv[2], np.concatenate([obs.histogram, scale, zero_point.astype(np.float32)]))\n"
        "try:\n"
        "    obs(np.float32([1.0, np.nan]))\n"
        "except ValueError:\n"
        "    print('NaN raised')\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "in.npz"), **{f"b{i}": b for i, b in enumerate(batches)})
        env = dict(os.environ, NUMBA_DISABLE_JIT="1")
        out = os.path.join(tmp, "out.npy")
        done = subprocess.run(
            [sys.executable, "-c", script, os.path.join(tmp, "in.npz"), out],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "NaN raised" in done.stdout
        plain = np.load(out)
    obs = HistogramObserver(reduce_range=True, implementation="numba")
    for b in batches:
        with inf_warning(bool(np.isinf(b).any())):
            obs(b)
    scale, zero_point = obs.calculate_qparams()
    assert_same(plain, np.concatenate([obs.histogram, scale, zero_point.astype(f32)]))


def test_one_pass_shortcut_after_two_unchanged_ranges(rng, monkeypatch):
    """Once two batches in a row left the range unchanged, a batch inside the range is counted in one pass (no
    aminmax) with the same bits as torch; a batch outside it then takes the two passes."""
    ours, theirs = HistogramObserver(implementation="numba"), TorchHistogramObserver()
    batches = [rng.standard_normal(H.PARALLEL_MIN_ELEMENTS + 9).astype(f32) * f32(s) for s in (4, 1, 1, 1, 1, 5)]
    aminmax_calls = []
    real_aminmax = H._aminmax_fast
    monkeypatch.setattr(H, "_aminmax_fast", lambda *a: aminmax_calls.append(1) or real_aminmax(*a))
    for i, x in enumerate(batches):
        ours(x)
        theirs(torch.from_numpy(x))
        assert_same(ours.histogram, theirs.histogram.numpy(), f"batch {i}: histogram")
        assert_same(f32([ours.min_val, ours.max_val]), f32([theirs.min_val, theirs.max_val]), f"batch {i}: range")
    assert len(aminmax_calls) == 4  # batches 0, 1, 2 and 5; 3 and 4 in one pass


def test_kernels_are_compiled_for_float32_only(rng):
    """A float32 value that comes back from a Numba call is a Python float (float64); passed on unconverted, it
    would compile a float64 version of a kernel, whose arithmetic gives other bins. None exists after all paths ran."""
    obs = HistogramObserver(implementation="numba")
    for n, scale in ((1000, 1.0), (H.PARALLEL_MIN_ELEMENTS + 1, 2.0), (1000, 0.5), (1000, 0.5), (1000, 0.5)):
        obs(rng.standard_normal(n).astype(f32) * f32(scale))
    H._histc_fast(rng.standard_normal(5000).astype(f32), 100, 0.25, 1.5, num_threads=2)  # Python floats in
    for kernel in (H._histc_count_kernel, H._histc_chunks_kernel, H._nan_ignoring_aminmax_kernel):
        for signature in kernel.signatures:
            floats = [str(t) for t in signature if "float" in str(t) and "array" not in str(t)]
            assert all(t == "float32" for t in floats), f"{kernel.__name__} compiled for {signature}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_counts_big_batches_too(rng):
    """The parent's pool threads do not exist in a forked child: the child starts its own (and gets the same
    bits). Before the pool is reset on fork, tasks would pile up unserved in the child's queue."""
    x = rng.standard_normal(H.PARALLEL_MIN_ELEMENTS + 7).astype(f32)
    parent = HistogramObserver(implementation="numba")
    parent(x)  # the pool is running in the parent now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the histogram's bytes and how many tasks wait unserved, then leave at once
        try:
            child = HistogramObserver(implementation="numba")
            child(x)
            child(x * f32(2))
            for _ in range(300):  # a late pool thread finds its chunks taken and returns at once
                if pool._pool_tasks.qsize() == 0:
                    break
                time.sleep(0.01)
            payload = child.histogram.tobytes() + np.int64(pool._pool_tasks.qsize()).tobytes()
            os.write(write_end, payload)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    parent(x * f32(2))
    assert_same(np.frombuffer(payload[:-8], f32), parent.histogram, "child's histogram")
    assert np.frombuffer(payload[-8:], np.int64)[0] == 0, "tasks left unserved in the child"
