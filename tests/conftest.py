"""Shared fixtures. Every random test draws from ``rng``: a fresh seed each run (printed in the header and in
failures), or the seed in REFQUANT_SEED to reproduce a run."""

from __future__ import annotations

import hashlib
import os
import secrets
import warnings

import numpy as np
import pytest

SEED = int(os.environ.get("REFQUANT_SEED", secrets.randbits(32)))


def pytest_report_header(config):
    return f"refquant random seed: REFQUANT_SEED={SEED}"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the run's seed and the test's name, so each test sees its own stream."""
    name_hash = int.from_bytes(hashlib.blake2b(request.node.nodeid.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([SEED, name_hash])


@pytest.fixture(autouse=True)
def _quiet_torch_deprecations():
    """torch 2.13 warns on every quantized-tensor creation and about reduce_range; parity tests create many."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        yield
