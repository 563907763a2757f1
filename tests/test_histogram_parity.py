"""refquant.histogram.HistogramObserver against torch.ao.quantization.observer.HistogramObserver, run live on fresh
random calibration sets: the histogram, its range and (scale, zero_point) must be the same bits.

Default suite: 1,000 random sets (bins >= 100, a first batch of >= 50 values), 60 hard sets (a handful of values,
1-16 bins, tie-heavy, constant, and magnitudes where torch's L2 error underflows or overflows), the readable NumPy
path on 40 sets, and the scenarios the issue names. ``-m slow``: 10,000 more (10% hard).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver as TorchHistogramObserver

from parity import assert_same
from refquant.histogram import HistogramObserver

TORCH_DTYPE = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}
TORCH_QSCHEME = {"per_tensor_affine": torch.per_tensor_affine, "per_tensor_symmetric": torch.per_tensor_symmetric}

# How often each distribution is drawn. torch's own search loop runs ~10^5 Python iterations when every candidate
# range has the same error (tie-heavy and constant data; magnitudes where the error underflows or overflows), so
# those are rarer in the default sets and common in the hard ones.
KIND_WEIGHTS = {
    "normal": 6,
    "uniform": 4,
    "heavy_tailed": 4,
    "lognormal": 4,
    "post_relu": 4,
    "outliers": 4,
    "discrete": 1,
    "constant": 0.5,
    "tiny": 1.5,
    "huge": 1.5,
    "offset": 3,
}
HARD_KIND_WEIGHTS = {**KIND_WEIGHTS, "discrete": 4, "constant": 4, "tiny": 4, "huge": 4}

OBSERVER_SETTINGS = (
    dict(),  # torch's defaults
    dict(reduce_range=True),  # the fbgemm qconfig's activation observer
    dict(reduce_range=True),
    dict(reduce_range=True),
    dict(dtype="qint8"),
    dict(dtype="qint8", reduce_range=True),
    dict(qscheme="per_tensor_symmetric"),
    dict(dtype="qint8", qscheme="per_tensor_symmetric"),
    dict(quant_min=0, quant_max=15),
    dict(dtype="qint32"),
)


def draw(rng: np.random.Generator, kind: str, n: int, scale: float, hard: bool) -> np.ndarray:
    """n float32 values of a kind; ``hard`` makes tiny and huge extreme (torch's error under/overflows)."""
    if kind == "normal":
        x = rng.standard_normal(n) * scale
    elif kind == "uniform":
        lo = rng.uniform(-2, 1) * scale
        x = rng.uniform(lo, lo + rng.uniform(0.01, 3) * scale, n)
    elif kind == "heavy_tailed":
        x = rng.standard_t(rng.choice([1, 2, 3]), n) * scale
    elif kind == "lognormal":
        x = rng.lognormal(0, rng.uniform(0.3, 2), n) * scale
    elif kind == "post_relu":
        x = np.maximum(rng.standard_normal(n) + rng.uniform(-1, 1), 0) * scale
    elif kind == "outliers":
        x = rng.standard_normal(n) * scale
        x[rng.integers(0, n, max(1, n // 500))] *= rng.uniform(20, 1000)
    elif kind == "discrete":  # ties: a few levels, many values on each
        levels = rng.integers(2, 12)
        x = (rng.integers(-levels, levels + 1, n) * 0.5 + rng.choice([0.0, 0.25])) * scale
    elif kind == "constant":
        x = np.full(n, rng.choice([0.0, 1.0, -3.5, 0.1, 2.0**25 + 2, -1e-30, 6.5e4]) * scale)
    elif kind == "tiny":
        x = rng.standard_normal(n) * scale * 10.0 ** rng.choice([-12, -20, -30, -35] if hard else [-5, -7, -8])
    elif kind == "huge":
        x = rng.standard_normal(n) * scale * 10.0 ** rng.choice([12, 20, 30, 35] if hard else [4, 6, 8])
    elif kind == "offset":  # all positive or all negative, away from 0
        x = rng.standard_normal(n) * scale + rng.uniform(-5, 5) * scale
    else:  # pragma: no cover
        raise ValueError(kind)
    with np.errstate(over="ignore"):
        return x.astype(np.float32)


def calibration_set(rng: np.random.Generator, hard: bool = False) -> tuple[dict, list[np.ndarray], str]:
    """(observer settings, 1-6 batches of 1-20,000 values with ranges that grow and shrink, main kind)."""
    weights = HARD_KIND_WEIGHTS if hard else KIND_WEIGHTS
    kinds = list(weights)
    p = np.array([weights[k] for k in kinds])
    kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
    settings = dict(OBSERVER_SETTINGS[rng.integers(len(OBSERVER_SETTINGS))])
    settings["bins"] = int(rng.choice([1, 2, 3, 7, 16, 2048, 2048, 4096] if hard
                                      else [2048] * 8 + [100, 255, 256, 1000, 4096]))
    base = float(10.0 ** rng.uniform(-2, 2))
    batches = []
    for b in range(int(rng.integers(1, 7))):
        if hard:
            n = int(rng.choice([1, 2, 3, rng.integers(1, 100), rng.integers(1, 20001)]))
        else:
            n = int(rng.integers(50, 20001) if b == 0 else rng.choice([rng.integers(1, 50), rng.integers(50, 20001)]))
        batch_kind = kind if (rng.random() < 0.8 or kind in ("tiny", "huge", "constant")) else \
            kinds[rng.integers(len(kinds))]
        batch_scale = base * float(rng.choice([0.3, 0.7, 1.0, 1.0, 1.5, 3.0]))  # ranges grow and shrink
        batches.append(draw(rng, batch_kind, n, batch_scale, hard))
    return settings, batches, kind


def torch_observer(settings: dict) -> TorchHistogramObserver:
    kwargs = dict(settings)
    kwargs["dtype"] = TORCH_DTYPE[kwargs.get("dtype", "quint8")]
    kwargs["qscheme"] = TORCH_QSCHEME[kwargs.get("qscheme", "per_tensor_affine")]
    return TorchHistogramObserver(**kwargs)


def assert_matches_torch(settings: dict, batches: list[np.ndarray], what: str, implementation: str = "numba"):
    """Feed the same batches to both observers; the state after each batch and the final qparams must agree."""
    theirs = torch_observer(settings)
    ours = HistogramObserver(**settings, implementation=implementation)
    for i, batch in enumerate(batches):
        theirs(torch.from_numpy(batch))
        assert ours(batch) is batch
        assert_same(ours.histogram, theirs.histogram.numpy(), f"{what}: histogram after batch {i}")
        assert_same(np.float32(ours.min_val), theirs.min_val.numpy(), f"{what}: min_val after batch {i}")
        assert_same(np.float32(ours.max_val), theirs.max_val.numpy(), f"{what}: max_val after batch {i}")
    scale, zero_point = ours.calculate_qparams()
    expected_scale, expected_zero_point = theirs.calculate_qparams()
    assert_same(scale, expected_scale.numpy(), f"{what}: scale")
    assert_same(zero_point, expected_zero_point.numpy(), f"{what}: zero_point")
    return ours


def run_random_sets(rng: np.random.Generator, count: int, hard_fraction: float) -> collections.Counter:
    kinds = collections.Counter()
    for i in range(count):
        hard = rng.random() < hard_fraction
        settings, batches, kind = calibration_set(rng, hard)
        assert_matches_torch(settings, batches, f"set {i} ({kind}{', hard' if hard else ''}, {settings}, "
                                                f"batch sizes {[b.size for b in batches]})")
        kinds[kind] += 1
    return kinds


@pytest.mark.parametrize("chunk", range(10))
def test_random_calibration_sets_match_torch(rng, chunk):
    """10 chunks x 100 = 1,000 random calibration sets, each compared after every batch and at the end."""
    kinds = run_random_sets(rng, 100, hard_fraction=0.0)
    assert len(kinds) >= 6  # the sets really are spread over the distributions


def test_hard_calibration_sets_match_torch(rng):
    kinds = run_random_sets(rng, 60, hard_fraction=1.0)
    assert {"discrete", "constant", "tiny", "huge"} & set(kinds)


def test_readable_numpy_path_matches_torch(rng):
    """implementation="numpy" end to end (the slow readable path) on 40 sets."""
    for i in range(40):
        settings, batches, kind = calibration_set(rng, hard=False)
        batches = [b[:3000] for b in batches]
        assert_matches_torch(settings, batches, f"numpy set {i} ({kind}, {settings})", implementation="numpy")



QUINT8_SYMMETRIC_REDUCED = (
    dict(qscheme="per_tensor_symmetric", reduce_range=True),
    dict(qscheme="per_tensor_symmetric", reduce_range=True, quant_min=0, quant_max=255),
    dict(qscheme="per_tensor_symmetric", reduce_range=True, quant_min=0, quant_max=100),
)


@pytest.mark.parametrize("settings", QUINT8_SYMMETRIC_REDUCED, ids=str)
def test_quint8_symmetric_with_reduce_range_matches_torch(rng, settings):
    """torch's HistogramObserver accepts quint8 + per_tensor_symmetric + reduce_range (only MinMaxObserver and
    PerChannelMinMaxObserver refuse it, in their own __init__; torch's TestHistogramObserver runs it): quant range
    [0, 127] (or the custom range halved), zero point 128 (or (quant_min + quant_max) // 2). 20 random sets per
    setting, hard ones among them, 3 of them through the readable NumPy path."""
    theirs = torch_observer(settings)
    ours = HistogramObserver(**settings)
    assert (ours.quant_min, ours.quant_max) == (theirs.quant_min, theirs.quant_max)
    for i in range(20):
        hard = i % 4 == 0
        drawn, batches, kind = calibration_set(rng, hard)
        case = {**settings, "bins": drawn["bins"]}
        implementation = "numpy" if i < 3 else "numba"
        if implementation == "numpy":
            batches = [b[:2000] for b in batches]
        assert_matches_torch(case, batches, f"set {i} ({kind}, {case}, {implementation})", implementation)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(100))
def test_many_random_calibration_sets_match_torch(rng, chunk):
    """100 chunks x 100 = 10,000 random calibration sets, 10% of them hard."""
    kinds = run_random_sets(rng, 100, hard_fraction=0.1)
    print(f"chunk {chunk}: 100 sets, 0 differing; kinds {dict(kinds)}")


# --------------------------------------------------------------------------------------------- named scenarios

SETTINGS = [
    dict(reduce_range=True),
    dict(),
    dict(dtype="qint8"),
    dict(qscheme="per_tensor_symmetric"),
    dict(dtype="qint8", qscheme="per_tensor_symmetric", reduce_range=True),
    dict(qscheme="per_tensor_symmetric", reduce_range=True),  # quint8: refused by the MinMax family only
    dict(dtype="qint32"),
    dict(bins=7),
    dict(bins=4096, reduce_range=True),
]


def normal(rng, n, scale=1.0, loc=0.0):
    return (rng.standard_normal(n) * scale + loc).astype(np.float32)


SCENARIOS = {
    "first batch only": lambda rng: [normal(rng, 5000)],
    "growing range": lambda rng: [normal(rng, 3000, 1 + 0.5 * k) for k in range(5)],
    "shrinking range": lambda rng: [normal(rng, 3000, 3 - 0.5 * k) for k in range(5)],
    "same batch again": lambda rng: [normal(rng, 3000)] * 3,
    "grows on one side": lambda rng: [normal(rng, 3000), normal(rng, 3000, loc=2.0)],
    "constant batches": lambda rng: [np.full(100, np.float32(1.25))] * 3,
    "constant above 2^24": lambda rng: [np.full(10, np.float32(3e7))] * 2,
    "constant history then spread": lambda rng: [np.full(50, np.float32(0.5)), np.full(7, np.float32(0.5)),
                                                  normal(rng, 4000)],
    "spread then constant inside": lambda rng: [normal(rng, 4000), np.full(100, np.float32(0.1))],
    "spread then constant outside": lambda rng: [normal(rng, 4000), np.full(100, np.float32(9.0))],
    "zero then spread": lambda rng: [np.zeros(30, np.float32), normal(rng, 300)],
    "one element": lambda rng: [np.float32([0.75])],
    "one element each": lambda rng: [np.float32([v]) for v in rng.standard_normal(5)],
    "two equal then one more": lambda rng: [np.float32([2.0, 2.0]), np.float32([-1.0])],
    "all negative": lambda rng: [-np.abs(normal(rng, 3000)) - 1],
    "all positive": lambda rng: [np.abs(normal(rng, 3000)) + 1],
    "tiny": lambda rng: [normal(rng, 2000, 1e-6)],
    "huge": lambda rng: [normal(rng, 2000, 1e6)],
    "ties at bin edges": lambda rng: [np.float32(np.arange(-1024, 1024) / 256), np.float32(np.arange(0, 2049) / 256)],
    "2-d and 4-d batches": lambda rng: [normal(rng, 600).reshape(20, 30), normal(rng, 600).reshape(2, 3, 10, 10)],
    "non-contiguous batch": lambda rng: [normal(rng, 2000).reshape(40, 50)[:, ::3]],
}


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenarios_match_torch(rng, scenario, settings):
    batches = SCENARIOS[scenario](rng)
    assert_matches_torch(settings, batches, scenario)


def test_inf_elements_are_dropped_with_a_warning_like_torch(rng):
    x = normal(rng, 1000)
    x[[3, 500]] = np.inf
    x[7] = -np.inf
    theirs, ours = torch_observer({}), HistogramObserver()
    with pytest.warns(UserWarning, match="torch.inf detected"):
        theirs(torch.from_numpy(x))
    with pytest.warns(UserWarning, match="torch.inf detected"):
        ours(x)
    assert_same(ours.histogram, theirs.histogram.numpy())
    assert_same(np.float32(ours.min_val), theirs.min_val.numpy())
    y = normal(rng, 1000, 3)
    y[0] = -np.inf
    with pytest.warns(UserWarning):
        theirs(torch.from_numpy(y))
    with pytest.warns(UserWarning):
        ours(y)
    assert_same(ours.histogram, theirs.histogram.numpy())
    assert_same(ours.calculate_qparams()[0], theirs.calculate_qparams()[0].numpy())


@pytest.mark.parametrize("implementation", ["numba", "numpy"])
def test_all_inf_and_empty_batches_are_ignored_like_torch(rng, implementation):
    batches = [np.float32([np.inf, -np.inf]), np.zeros(0, np.float32), normal(rng, 500), np.float32([np.inf]),
               np.zeros((3, 0), np.float32), normal(rng, 500, 2)]
    theirs, ours = torch_observer({}), HistogramObserver(implementation=implementation)
    for b in batches:
        with _maybe_warns(np.isinf(b).any()):
            theirs(torch.from_numpy(b))
        with _maybe_warns(np.isinf(b).any()):
            assert ours(b) is b
        assert_same(ours.histogram, theirs.histogram.numpy())
        assert_same(np.float32(ours.min_val), theirs.min_val.numpy())
    assert_same(ours.calculate_qparams()[1], theirs.calculate_qparams()[1].numpy())


def _maybe_warns(expected: bool):
    return pytest.warns(UserWarning, match="torch.inf") if expected else _nothing()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_uncalibrated_observer_returns_torch_defaults():
    theirs, ours = torch_observer({}), HistogramObserver()
    with pytest.warns(UserWarning, match="must run observer"):
        expected = theirs.calculate_qparams()
    with pytest.warns(UserWarning, match="must run observer"):
        scale, zero_point = ours.calculate_qparams()
    assert_same(scale, expected[0].numpy())
    assert_same(zero_point, expected[1].numpy())


WIDER_THAN_FLOAT32 = [
    [np.float32([-3e38, 1.0, 3e38])],
    [np.float32([-1e38, 3e38])],
    [np.float32([0.0, 1.0]), np.float32([-2e38, 2e38])],
]


@pytest.mark.parametrize("batches", WIDER_THAN_FLOAT32, ids=str)
def test_range_wider_than_float32_max_matches_torch(batches):
    """max - min overflows: histc's edges are NaN (nothing is counted) and bin_width is inf, so new_min =
    min_val + inf * start_bin is NaN or inf and torch returns a NaN or inf-derived scale. Same here; the NaN's bits
    are checked in the test below."""
    theirs, ours = torch_observer({}), HistogramObserver()
    for b in batches:
        theirs(torch.from_numpy(b))
        ours(b)
    assert_same(ours.histogram, theirs.histogram.numpy())
    t_new_min, t_new_max = theirs._non_linear_param_search()
    new_min, new_max = ours._non_linear_param_search()
    assert_same(new_min, t_new_min.numpy(), "new_min")
    assert_same(new_max, t_new_max.numpy(), "new_max")
    scale, zero_point = ours.calculate_qparams()
    expected_scale, expected_zero_point = theirs.calculate_qparams()
    if np.isnan(expected_scale.numpy()).all():
        assert np.isnan(scale).all()
    else:
        assert_same(scale, expected_scale.numpy())
    assert_same(zero_point, expected_zero_point.numpy())


def test_range_wider_than_float32_max_nan_scale_bits():
    """The clip range overflows float32, the scale is NaN: torch's scalar maximum makes it quiet_NaN() (0x7fc00000)."""
    theirs, ours = torch_observer({}), HistogramObserver()
    x = np.float32([-3e38, 1.0, 3e38])
    theirs(torch.from_numpy(x))
    ours(x)
    assert_same(ours.calculate_qparams()[0], theirs.calculate_qparams()[0].numpy())


def test_many_batches_growing_like_the_benchmark(rng):
    """20 batches of 64K elements, each widening the range (every call upscales the old histogram)."""
    batches = [normal(rng, 1 << 16, 1 + 0.05 * k) for k in range(20)]
    assert_matches_torch(dict(reduce_range=True), batches, "20 growing batches")


def test_batches_split_across_threads_match_torch(rng):
    """Batches of >= 2^18 elements are counted in pieces on several threads."""
    batches = [normal(rng, 300_000, 1.0), normal(rng, 300_000, 1.5), normal(rng, 300_000, 0.5)]
    assert_matches_torch(dict(reduce_range=True), batches, "threaded batches")
