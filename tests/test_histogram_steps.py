"""Each step of refquant.histogram against the torch op it mirrors (run live), and each Numba kernel against its
readable NumPy twin, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver as TorchHistogramObserver

import refquant.histogram as H
from parity import assert_same

f32 = np.float32


def magnitude(rng: np.random.Generator, low: int = -30, high: int = 30) -> float:
    return float(10.0 ** rng.integers(low, high + 1))


def random_range(rng: np.random.Generator, scale: float) -> tuple[np.float32, np.float32]:
    """A random float32 range [lo, hi] with lo < hi."""
    while True:
        lo, hi = np.sort((rng.standard_normal(2) * scale).astype(f32))
        if lo < hi:
            return lo, hi


# --------------------------------------------------------------------------------------------- linspace


def test_linspace_matches_torch(rng):
    for _ in range(800):
        start, end = random_range(rng, magnitude(rng))
        if rng.random() < 0.3:
            start, end = end, start  # decreasing
        steps = int(rng.choice([1, 2, 3, 4, 5, 2049, 32769, int(rng.integers(2, 5000))]))
        expected = torch.linspace(float(start), float(end), steps).numpy()
        assert_same(H.linspace(start, end, steps), expected, f"linspace({start}, {end}, {steps})")
        assert_same(H._linspace_kernel(start, end, steps), expected, f"_linspace_kernel({start}, {end}, {steps})")


def test_linspace_is_fused_not_twice_rounded():
    """Golden: one element where fmaf(step, i, start) differs from f32(f32(step * i) + start)."""
    start, end, steps = f32(0.1), f32(1.7), 2049
    step = f32(f32(end - start) / f32(steps - 1))
    i = np.arange(steps // 2, dtype=f32)
    fused = H.linspace(start, end, steps)[: steps // 2]
    twice_rounded = ((step * i).astype(f32) + start).astype(f32)
    assert (fused != twice_rounded).any(), "pick inputs where the two roundings differ"
    assert_same(fused, torch.linspace(float(start), float(end), steps).numpy()[: steps // 2])


def test_linspace_overflowing_step_gives_nan_ends():
    out = H.linspace(f32(-3e38), f32(3e38), 5)
    assert np.isnan(out[0]) and np.isnan(out[-1])
    assert_same(out, torch.linspace(-3e38, 3e38, 5).numpy())
    assert_same(H._linspace_kernel(f32(-3e38), f32(3e38), 5), out)


# --------------------------------------------------------------------------------------------- histc


def histc_cases(rng: np.random.Generator):
    """(x, bins, min, max) covering ordinary data, ties, constants (also above 2^24), overflow, wide ranges."""
    for trial in range(900):
        n = int(rng.choice([1, 2, 7, int(rng.integers(1, 3000))]))
        scale = magnitude(rng, -40, 38)
        with np.errstate(over="ignore"):
            x = (rng.standard_normal(n) * scale).astype(f32)
            kind = trial % 6
            if kind == 1:
                x = np.round(x * f32(3)).astype(f32)
            elif kind == 2:
                x[:] = x[0]
            elif kind == 3:
                x = (rng.integers(-5, 5, n) * f32(scale)).astype(f32)
            elif kind == 4:
                const = rng.choice([3e7, -(2.0**25), 2.0**24, 2.0**24 + 2, 3.4e38, -3.4e38, 1e-45, 0.0, 1.5, 1e30])
                x = np.full(n, f32(const))
            elif kind == 5:
                x = np.concatenate([x, f32([3.4e38, -3.4e38])])  # a range whose width overflows
        x = x[np.isfinite(x)]
        if x.size == 0:
            continue
        bins = int(rng.choice([2048, 2048, 1, 2, 7, 100, 4096]))
        lo, hi = x.min(), x.max()
        if rng.random() < 0.3:  # a wider range than the data, as later batches see it
            with np.errstate(over="ignore"):
                lo = f32(lo - abs(lo) * f32(0.5) - f32(1))
        yield x, bins, lo, hi


def test_histc_matches_torch(rng):
    compared = 0
    for x, bins, lo, hi in histc_cases(rng):
        what = f"histc(n={x.size}, bins={bins}, min={lo!r}, max={hi!r})"
        try:
            expected = torch.histc(torch.from_numpy(x), bins, min=float(lo), max=float(hi)).numpy()
        except RuntimeError:
            with pytest.raises(ValueError):
                H.histc(x, bins, lo, hi)
            continue
        assert_same(H.histc(x, bins, lo, hi), expected, what)
        edge_lo, edge_hi = H.histc_edges(x, lo, hi)
        counts, skipped = H._histc_fast(x, bins, edge_lo, edge_hi, num_threads=1)
        assert_same(counts, expected, what + " [kernel]")
        assert skipped == x.size - int(expected.astype(np.int64).sum()), what
        compared += 1
    assert compared > 600


def test_histc_golden_edges():
    """Hand-derived bins: eq. 1 with lo = 0, hi = 4, 4 bins: bin = trunc(x * 4 / 4)."""
    x = f32([0.0, 0.999999, 1.0, 2.5, 3.9999998, 4.0, -1e-45, 4.0000005])
    #        bin 0  bin 0    bin 1 bin 2 bin 3     bin 3 (right edge)  skipped  skipped
    expected = f32([2, 1, 1, 2])
    assert_same(H.histc(x, 4, 0.0, 4.0), expected)
    counts, skipped = H._histc_fast(x, 4, f32(0), f32(4))
    assert_same(counts, expected)
    assert skipped == 2
    assert_same(expected, torch.histc(torch.from_numpy(x), 4, 0.0, 4.0).numpy())


def test_histc_constant_range_widening_matches_torch():
    """min == max widens to [min(nextafter(lo, -inf), lo - 1), max(nextafter(hi, inf), hi + 1)]: above 2^24 the
    ±1 rounds away and nextafter decides. Golden: x = 3e7 (ulp 2), 10 bins -> edges [29999998, 30000002], bin 5."""
    x = f32([3e7])
    assert H.histc_edges(x, 3e7, 3e7) == (f32(29999998), f32(30000002))
    assert_same(H.histc(x, 10, 3e7, 3e7), f32([0, 0, 0, 0, 0, 1, 0, 0, 0, 0]))
    for c in [0.0, 1.5, -2.0**25, 2.0**24, 2.0**24 + 2, 3.4e38, -3.4e38, 1e-45, float(np.finfo(f32).max)]:
        xc = np.full(3, f32(c))
        expected = torch.histc(torch.from_numpy(xc), 2048, float(xc[0]), float(xc[0])).numpy()
        assert_same(H.histc(xc, 2048, xc[0], xc[0]), expected, f"constant {c}")
        assert_same(H._histc_fast(xc, 2048, *H.histc_edges(xc, xc[0], xc[0]))[0], expected, f"constant {c} kernel")


def test_histc_overflow_cases_match_torch():
    """f32((x - lo) * bins) = inf lands in bin 0 (the int64 cast gives INT64_MIN); a width that overflows makes
    the edges NaN and skips everything."""
    x = f32([-1e35, 0.0, 2e35])
    expected = torch.histc(torch.from_numpy(x), 2048, -1e35, 2e35).numpy()
    assert expected[0] == 2 and expected[682] == 1  # -1e35 itself, 2e35 (f32(3e35 * 2048) = inf -> bin 0); 0.0
    assert_same(H.histc(x, 2048, f32(-1e35), f32(2e35)), expected)
    assert_same(H._histc_fast(x, 2048, f32(-1e35), f32(2e35))[0], expected)
    wide = f32([-3e38, 3e38])
    assert_same(H.histc(wide, 16, wide[0], wide[1]), np.zeros(16, f32))
    assert_same(torch.histc(torch.from_numpy(wide), 16, -3e38, 3e38).numpy(), np.zeros(16, f32))
    counts, skipped = H._histc_fast(wide, 16, wide[0], wide[1])
    assert_same(counts, np.zeros(16, f32))
    assert skipped == 2


def test_histc_kernel_blocks_and_threads_equal_readable(rng):
    """Sizes around the kernel's block of 1024, odd tails, and batches split across threads."""
    for n in [1, 2, 1023, 1024, 1025, 2047, 3001, H.PARALLEL_MIN_ELEMENTS + 3]:
        x = rng.standard_normal(n).astype(f32)
        x[rng.integers(0, n, max(1, n // 100))] = f32(np.inf)  # skipped values
        lo, hi = f32(-2.5), f32(2.5)  # some values fall outside
        expected = H.histc(x, 2048, lo, hi)
        for threads in (1, 2, 3):
            counts, skipped = H._histc_fast(x, 2048, lo, hi, num_threads=threads)
            assert_same(counts, expected, f"n={n} threads={threads}")
            assert skipped == n - int(expected.astype(np.int64).sum())


def test_histc_nan_range_is_an_error():
    with pytest.raises(ValueError, match="not finite"):
        H.histc(f32([1.0, np.nan]), 10, np.nan, np.nan)
    with pytest.raises(RuntimeError, match="not finite"):  # what torch says
        torch.histc(torch.tensor([1.0, float("nan")]), 10)


# --------------------------------------------------------------------------------------------- bucketize, bincount


def test_bucketize_right_matches_torch(rng):
    for _ in range(150):
        lo, hi = random_range(rng, magnitude(rng, -10, 10))
        boundaries = H.linspace(lo, hi, int(rng.integers(2, 3000)))
        values = (rng.uniform(float(lo), float(hi), int(rng.integers(1, 2000)))).astype(f32)
        values = np.concatenate([values, boundaries[rng.integers(0, boundaries.size, 5)], [lo - 1, hi + 1]]).astype(f32)
        expected = torch.bucketize(torch.from_numpy(values), torch.from_numpy(boundaries), right=True).numpy()
        assert_same(H.bucketize_right(values, boundaries), expected)
        assert_same(np.array([H._upper_bound_kernel(boundaries, v) for v in values]), expected)


def test_bucketize_right_with_nan_boundaries_matches_torch():
    """torch's ``!(mid > value)`` steps right past a NaN boundary; np.searchsorted would sort NaN last."""
    boundaries = H.linspace(f32(-3e38), f32(3e38), 9)  # [nan, inf, ..., -inf, nan]
    values = f32([-1.0, 0.0, 5.0, np.inf, -np.inf, np.nan])
    expected = torch.bucketize(torch.from_numpy(values), torch.from_numpy(boundaries), right=True).numpy()
    assert_same(H.bucketize_right(values, boundaries), expected)
    assert_same(np.array([H._upper_bound_kernel(boundaries, v) for v in values]), expected)
    assert not np.array_equal(np.searchsorted(boundaries, values, side="right"), expected)


def test_bincount_f32_is_sequential_float32_like_torch(rng):
    for _ in range(200):
        n, bins = int(rng.integers(1, 5000)), int(rng.integers(1, 50))
        index = rng.integers(0, bins, n)
        weights = (rng.random(n) * 10.0 ** rng.integers(-3, 8, n)).astype(f32)
        expected = torch.bincount(torch.from_numpy(index), weights=torch.from_numpy(weights), minlength=bins).numpy()
        assert_same(H.bincount_f32(index, weights, bins), expected)
    # golden: 2^24 + 1 + 1 in float32 order stays 2^24; a float64 sum would give 2^24 + 2
    out = H.bincount_f32(np.zeros(3, np.int64), f32([2.0**24, 1.0, 1.0]), 1)
    assert_same(out, f32([2.0**24]))
    weights = torch.tensor([2.0**24, 1.0, 1.0])
    assert_same(out, torch.bincount(torch.zeros(3, dtype=torch.long), weights=weights, minlength=1).numpy())


# --------------------------------------------------------------------------------------------- _upscale_histogram


def random_histogram(rng: np.random.Generator, bins: int, kind: int) -> np.ndarray:
    """float32 counts: integers (kind 0), fractional (1, as after upscaling), sparse (2), or heavy-tailed (3)."""
    hist = rng.integers(0, 50, bins).astype(f32)
    if kind == 1:
        hist = (hist * rng.random(bins)).astype(f32)
    elif kind == 2:
        hist[rng.random(bins) < 0.9] = 0
    elif kind == 3:
        hist = (rng.random(bins) ** 8 * 1000).astype(f32)
    return hist


def upscale_cases(rng: np.random.Generator):
    for trial in range(60):
        bins = int(rng.choice([2048, 2048, 100, 7, 1, 4096]))
        kind = trial % 5
        hist = random_histogram(rng, bins, kind)
        scale = magnitude(rng, -30, 30)
        orig_min, orig_max = random_range(rng, scale)
        grow = [0.0, 0.0, 1e-3, 0.05, 1.0, 10.0, 1e4]
        with np.errstate(over="ignore"):
            update_min = f32(orig_min - abs(rng.standard_normal()) * scale * rng.choice(grow))
            update_max = f32(orig_max + abs(rng.standard_normal()) * scale * rng.choice(grow))
        yield hist, orig_min, orig_max, update_min, update_max
    # crafted: a new range whose width overflows (NaN boundaries), bins narrower than an ulp, zero histogram
    yield rng.integers(0, 9, 2048).astype(f32), f32(-1e38), f32(1e38), f32(-3e38), f32(3e38)
    yield rng.integers(0, 9, 2048).astype(f32), f32(1e7), f32(1e7 + 64), f32(1e7 - 8), f32(1e7 + 64)
    yield np.zeros(2048, f32), f32(-1), f32(1), f32(-2), f32(2)
    yield rng.integers(0, 9, 16).astype(f32), f32(0), f32(1e-44), f32(-1e-45), f32(1e-44)


def test_upscale_histogram_matches_torch(rng):
    for hist, omin, omax, nmin, nmax in upscale_cases(rng):
        what = f"_upscale_histogram(bins={hist.size}, [{omin!r}, {omax!r}] -> [{nmin!r}, {nmax!r}])"
        tobs = TorchHistogramObserver(bins=hist.size)
        expected = tobs._upscale_histogram(
            torch.from_numpy(hist), torch.tensor(omin), torch.tensor(omax), torch.tensor(nmin), torch.tensor(nmax)
        ).numpy()
        readable = H._upscale_histogram_numpy(hist, omin, omax, nmin, nmax, 16)
        assert_same(readable, expected, what)
        assert_same(H._upscale_histogram_kernel(hist, omin, omax, nmin, nmax, 16), readable, what + " [kernel]")
        assert_same(
            H._upscale_histogram_generic_kernel(hist, omin, omax, nmin, nmax, 16), readable, what + " [generic]"
        )


# --------------------------------------------------------------------------------------------- sum, cumsum


def test_sum_f32_is_torch_cascade_sum(rng):
    for _ in range(1500):
        n = int(rng.choice([1, 3, 7, 8, 9, 31, 32, 33, 2048, int(rng.integers(1, 32767))]))
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 6)).astype(f32)
        if rng.random() < 0.5:
            x = np.abs(x)
        expected = torch.from_numpy(x).sum().numpy()
        assert_same(H.sum_f32(x), expected, f"sum of {n}")
        assert_same(f32(H._sum_f32_kernel(x)), expected, f"sum of {n} [kernel]")


def test_sum_f32_differs_from_numpy_and_float64_sums(rng):
    """The cascade order matters: on ordinary data np.sum and a float64 sum round differently."""
    differs_np = differs_64 = 0
    for _ in range(200):
        x = (rng.standard_normal(2048) * 100).astype(f32)
        s = H.sum_f32(x)
        differs_np += s != np.sum(x)
        differs_64 += s != f32(np.sum(x, dtype=np.float64))
    assert differs_np > 0 and differs_64 > 0


def test_cumsum_f32_accumulates_in_float64_like_torch(rng):
    for _ in range(300):
        x = (rng.standard_normal(int(rng.integers(1, 5000))) * 1000).astype(f32)
        expected = torch.cumsum(torch.from_numpy(x), 0).numpy()
        assert_same(H.cumsum_f32(x), expected)
        assert_same(H._cumsum_f32_kernel(x), expected)
    # golden: float32 accumulation would stop at 2^24
    x = np.concatenate([f32([2.0**24]), np.ones(3, f32)])
    assert_same(H.cumsum_f32(x), f32([2.0**24, 2.0**24 + 1, 2.0**24 + 2, 2.0**24 + 3]) * f32(1))


# --------------------------------------------------------------------------------------------- floor division


SPECIAL = f32([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 0.5, -0.5, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3e38, -3e38])


def test_floor_divide_matches_torch(rng):
    a = np.concatenate([(rng.standard_normal(30000) * 10.0 ** rng.integers(-40, 38, 30000)).astype(f32), SPECIAL])
    for b in [1.0, 0.3, 1e-45, 0.0, -0.7, 3e38, 1e-38, np.inf, 0.0070351562]:
        b = f32(b)
        expected = torch.div(torch.from_numpy(a), float(b), rounding_mode="floor").numpy()
        assert_same(H.floor_divide_f32(a, b), expected, f"floor_divide(a, {b})")
        exact = np.array([H._floor_divide_f32_kernel(v, b) for v in a], f32)
        assert_same(exact, expected, f"_floor_divide_f32_kernel(a, {b})")


def structured_quotients(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) shaped like the error function's divisions: a = f32(j) * bw (+ bw) for bin offsets j = i - start,
    b = f32(bw * k / 256)."""
    bw = f32(10.0 ** rng.uniform(-30, 30))
    k = int(rng.choice([int(rng.integers(1, 2049)), 1, 2, 8, 128, 256, 512, 1024, 2048, 96, 384]))
    a = (rng.integers(-2048, 2048, n).astype(f32) * bw).astype(f32)
    a = np.where(rng.random(n) < 0.5, a, (a + bw).astype(f32)).astype(f32)
    b = np.full(n, f32(float(bw) * k / 256), f32)
    return a, b


def _fast_floor_divide_disagreements(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    disagree = checked = 0
    for av, bv in zip(a, b):
        fast, valid = H._floor_divide_fast_f32(av, bv)
        if valid:
            checked += 1
            exact = H._floor_divide_f32_kernel(av, bv)
            disagree += int(fast != exact or np.signbit(fast) != np.signbit(exact))
    return disagree, checked


def test_fast_floor_divide_equals_exact_where_valid(rng):
    """The fmod-free shortcut of the error kernel, wherever it claims validity, equals torch's algorithm."""
    total = 0
    for _ in range(20):
        a, b = structured_quotients(rng, 2000)
        disagree, checked = _fast_floor_divide_disagreements(a, b)
        assert disagree == 0
        total += checked
    a = (rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype(f32)
    b = np.abs(rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype(f32)
    near = (rng.integers(-4000, 4000, 20000) * b.astype(np.float64)).astype(f32)  # integer quotients, ± an ulp
    near = np.where(rng.random(20000) < 0.5, near, np.nextafter(near, f32(np.inf))).astype(f32)
    for aa in (a, near, np.concatenate([SPECIAL, -SPECIAL])):
        bb = b[: aa.size]
        disagree, checked = _fast_floor_divide_disagreements(aa, bb)
        assert disagree == 0
        total += checked
    assert total > 50000



@pytest.mark.slow
def test_fast_floor_divide_equals_exact_many(rng):
    """The 1.2e8-quotient check quoted in refquant/histogram.py, with a compiled checker."""
    from numba import njit

    @njit(error_model="numpy")
    def count(a, b):
        disagree = checked = 0
        for i in range(a.shape[0]):
            fast, valid = H._floor_divide_fast_f32(a[i], b[i])
            if valid:
                checked += 1
                exact = H._floor_divide_f32_kernel(a[i], b[i])
                if fast != exact or np.signbit(fast) != np.signbit(exact):
                    disagree += 1
        return disagree, checked

    total = 0
    for _ in range(120):
        a, b = structured_quotients(rng, 1_000_000)
        disagree, checked = count(a, b)
        assert disagree == 0
        total += checked
    print(f"fast floor division: {total} valid quotients, 0 disagreements")
    assert total > 100_000_000


# --------------------------------------------------------------------------------------------- error and search


def histogram_states(rng: np.random.Generator, count: int):
    """(histogram, min_val, max_val) states as torch's observer could hold them."""
    for trial in range(count):
        bins = int(rng.choice([2048, 2048, 100, 7, 4096]))
        kind = trial % 4
        hist = random_histogram(rng, bins, kind)
        lo, hi = random_range(rng, magnitude(rng, -12, 10))
        yield hist, lo, hi


def torch_observer_with(hist: np.ndarray, lo: np.float32, hi: np.float32, **kwargs) -> TorchHistogramObserver:
    obs = TorchHistogramObserver(bins=hist.size, **kwargs)
    obs.histogram = torch.from_numpy(hist.copy())
    obs.min_val, obs.max_val = torch.tensor(lo), torch.tensor(hi)
    return obs


def test_compute_quantization_error_matches_torch(rng):
    for hist, lo, hi in histogram_states(rng, 150):
        tobs = torch_observer_with(hist, lo, hi)
        bins = hist.size
        pairs = [(0, bins - 1), (int(rng.integers(0, bins)), bins - 1)]
        for _ in range(4):
            s = int(rng.integers(0, bins))
            pairs.append((s, int(rng.integers(s, bins))))
        for s, e in pairs:
            expected = tobs._compute_quantization_error(s, e)
            readable = H._compute_quantization_error_numpy(hist, lo, hi, s, e, 256)
            kernel = H._compute_quantization_error_kernel(
                hist, (float(hi) - float(lo)) / bins, s, e, 256, np.empty((2, bins), f32)
            )
            what = f"error(bins={bins}, [{lo!r}, {hi!r}], {s}, {e})"
            assert_same(np.float64(readable), np.float64(expected), what)
            assert_same(np.float64(kernel), np.float64(expected), what + " [kernel]")


def test_compute_quantization_error_overflow_and_underflow_match_torch():
    """Huge ranges make the cubes inf (errors inf or NaN); a range of a few ulps makes dst_bin_width 0 -> 0.0."""
    hist = np.arange(2048, dtype=f32) % 7
    for lo, hi in [(f32(-1e30), f32(1e30)), (f32(-1e15), f32(3e15)), (f32(1.0), np.nextafter(f32(1.0), f32(2))),
                   (f32(0), f32(1e-44))]:
        tobs = torch_observer_with(hist, lo, hi)
        for s, e in [(0, 2047), (5, 9), (1000, 1000)]:
            expected = tobs._compute_quantization_error(s, e)
            assert_same(np.float64(H._compute_quantization_error_numpy(hist, lo, hi, s, e, 256)), np.float64(expected))
            kernel = H._compute_quantization_error_kernel(hist, (float(hi) - float(lo)) / 2048, s, e, 256,
                                                          np.empty((2, 2048), f32))
            assert_same(np.float64(kernel), np.float64(expected))


def test_non_linear_param_search_matches_torch(rng):
    for hist, lo, hi in histogram_states(rng, 30):
        tobs = torch_observer_with(hist, lo, hi)
        t_min, t_max = tobs._non_linear_param_search()
        for implementation in ("numba", "numpy"):
            obs = H.HistogramObserver(bins=hist.size, implementation=implementation)
            obs.histogram, obs.min_val, obs.max_val = hist.copy(), lo, hi
            new_min, new_max = obs._non_linear_param_search()
            what = f"search(bins={hist.size}, [{lo!r}, {hi!r}]) [{implementation}]"
            assert_same(new_min, t_min.numpy(), what + " new_min")
            assert_same(new_max, t_max.numpy(), what + " new_max")
            trace = obs.search_trace  # all accepted but perhaps the last; the chosen bins are the last accepted ones
            assert trace["accepted"][:-1].all()
            accepted = trace[trace["accepted"]]
            chosen = (0, hist.size - 1)
            if accepted.size:
                chosen = (int(accepted["start_bin"][-1]), int(accepted["end_bin"][-1]))
            assert (obs.start_bin, obs.end_bin) == chosen


def test_search_kernel_trace_equals_readable_trace(rng):
    for hist, lo, hi in histogram_states(rng, 40):
        start, end, trace = H._non_linear_param_search_numpy(hist, lo, hi, 256)
        buf = np.zeros(hist.size + 2, H.SEARCH_TRACE_DTYPE)
        k_start, k_end, n = H._non_linear_param_search_kernel(hist, lo, hi, 256, buf)
        assert (k_start, k_end) == (start, end)
        for field in ("start_bin", "end_bin", "l2_error", "accepted"):
            assert_same(buf[:n][field], trace[field], field)
