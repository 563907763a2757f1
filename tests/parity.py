"""One comparison helper for every exact test (against torch, a readable reference or a golden value): equality of
raw values, with a useful failure message."""

from __future__ import annotations

import numpy as np

from conftest import SEED


def _raw(a: np.ndarray) -> np.ndarray:
    """Floats compared by their bits (so -0.0 != 0.0 and NaN == NaN of the same payload), integers as they are."""
    if a.dtype == np.float32:
        return a.view(np.uint32)
    if a.dtype == np.float64:
        return a.view(np.uint64)
    return a


def assert_same(actual, expected, what: str = "values") -> None:
    """Assert refquant's ``actual`` equals ``expected`` (torch's, a reference's or a golden value) bit for bit:
    same dtype, same shape, same bits.

    On failure, say how many values differ, the first differing index and both values, and the run's seed.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype} (seed {SEED})"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape} (seed {SEED})"
    differ = _raw(actual) != _raw(expected)
    if differ.any():
        idx = np.unravel_index(int(np.flatnonzero(differ)[0]), differ.shape) if differ.ndim else ()
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {differ.size} values differ; first at index {idx}: "
            f"got {actual[idx]!r}, expected {expected[idx]!r} (REFQUANT_SEED={SEED})"
        )
