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


@pytest.fixture(scope="session")
def fbgemm_kernel() -> str:
    """"vnni" or "avx2": the int8 kernel family torch's fbgemm runs in this test process, found by crosscheck.isa's
    probe (AVX-512 VNNI ``vpdpbusd``, or ``vpmaddubsw``, which saturates pairs of products to int16: CPUs without
    VNNI, or FBGEMM_ENABLE_INSTRUCTIONS=AVX2). A parity test of torch's fbgemm linear with full-range 8-bit
    activations models it with ``saturate_int16_pairs=(fbgemm_kernel == "avx2")`` and is marked ``isa``."""
    from crosscheck.isa import torch_fbgemm_kernel_family

    return torch_fbgemm_kernel_family()


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
