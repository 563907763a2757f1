"""refquant's QuantizedLinear on every engine against torch.ops.quantized.linear / linear_relu, live.

Every problem is built from integer codes (weight codes, scales and zero points as a torch quantized weight holds
them; uint8 input codes), as torch's own qlinear tests do; torch gets a fresh packed weight per problem (so
qnnpack's cache of requantization scales never carries over, see test_engines_refusals.py for that quirk), and
refquant's layer comes from :meth:`QuantizedLinear.from_quantized` with the kernel family torch really ran
(tests/torch_engines.py). Output codes must agree bit for bit with torch's ``int_repr()``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import assert_same
from torch_engines import (
    ENGINES,
    aim_at_a_tie,
    describe,
    random_problem,
    random_w,
    random_x_codes,
    refquant_layer,
    run_torch,
    torch_fbgemm_kernel_family,
    torch_threads,
)

# fbgemm/x86 results follow the kernel family crosscheck.isa probes; .ci/run reruns these under
# FBGEMM_ENABLE_INSTRUCTIONS=AVX2
pytestmark = pytest.mark.isa


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def check_problem(p: dict, capfd, counts: dict) -> None:
    """torch vs refquant on one problem; torch's refusals must be refquant's (a ValueError)."""
    y_t, family = run_torch(p, capfd)
    counts["families"].add(family)
    if isinstance(y_t, Exception):
        with pytest.raises(ValueError):
            refquant_layer(p, family)
        counts["refused"] += 1
        return
    ql = refquant_layer(p, family)
    y_r = ql(p["x"])
    ctx = f"{describe(p)}, family={family}"
    assert_same(y_r, y_t, f"output codes vs torch; {ctx}")
    assert_same(ql.requantize(ql.accumulate(p["x"]), readable=True).reshape(y_t.shape), y_t,
                f"readable requantization vs torch; {ctx}")
    counts["problems"] += 1
    counts["outputs"] += y_t.size


def run_problems(rng, engine: str, count: int, capfd, **kwargs) -> dict:
    counts = {"problems": 0, "outputs": 0, "refused": 0, "families": set()}
    for i in range(count):
        p = random_problem(rng, engine, **kwargs)
        if i % 3 == 0:
            aim_at_a_tie(p, rng)
        check_problem(p, capfd, counts)
    return counts


def test_environment():
    """Record what the parity below ran on."""
    assert set(ENGINES) <= set(torch.backends.quantized.supported_engines)
    print(f"\ntorch {torch.__version__}, engines {torch.backends.quantized.supported_engines}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fbgemm kernel family {torch_fbgemm_kernel_family()}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunk", range(3))
def test_parity_random_problems(rng, capfd, engine, chunk):
    """Random problems per engine: shapes (3-D, single rows), weight kinds, per-tensor / per-channel, symmetric /
    affine (where the engine allows), bias or not (huge biases too), ReLU, extreme output scales and zero points,
    a third of them aimed at a rounding tie."""
    counts = run_problems(rng, engine, 300 if engine != "x86" else 100, capfd)
    with capfd.disabled():
        print(f"\n{engine} chunk {chunk}: {counts['problems']} problems, {counts['outputs']} outputs, 0 differ; "
              f"{counts['refused']} refused by both; kernel families {sorted(counts['families'])}")


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack", "onednn"])
def test_parity_large_k(rng, capfd, engine):
    """K from 515 (where |raw| can pass 2^24 and float32(raw) rounds) to 8192, correlated weights and high codes,
    half the problems aimed at a tie at the largest |raw|. On onednn this is where AMX's float32 compensation
    (eq. DN4b) differs from the int32 one: the verbose line says which kernel ran."""
    counts = {"problems": 0, "outputs": 0, "refused": 0, "families": set()}
    rounded = 0
    for i in range(16):
        p = random_problem(rng, engine, k_choices=(515, 1024, 4095, 4096, 6000, 8192), max_n=40, max_m=20)
        N, K = p["w"].shape
        p["wkind"] = ("positive", "negative", "extremes", "uniform")[i % 4]
        p["w"] = random_w(rng, N, K, p["wkind"])
        p["xkind"] = ("high", "extremes", "all_255", "uniform")[i % 4]
        p["x"] = random_x_codes(rng, p["x"].shape, p["xkind"], p["zx"])
        if i % 2:
            aim_at_a_tie(p, rng, largest=True)
        else:
            p["sy"] = float(p["sx"] * p["ws"].max() * 128 * 200 * K / 255 * 10.0 ** rng.uniform(-1, 0.5))
        raw = refquant_layer(dict(p, sy=1.0, relu=False), "exact").accumulate(p["x"])
        rounded += int((raw.astype(np.float32).astype(np.int64) != raw).sum())
        check_problem(p, capfd, counts)
    assert rounded > 0, "no raw value was inexact in float32: the large-K cases did not test its rounding"
    with capfd.disabled():
        print(f"\n{engine} large K: {counts['problems']} problems, {counts['outputs']} outputs, 0 differ; "
              f"families {sorted(counts['families'])}")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunk", range(10))
def test_parity_random_problems_slow(rng, capfd, engine, chunk):
    """The long run: 10 x 1000 random problems per engine."""
    counts = run_problems(rng, engine, 1000, capfd)
    with capfd.disabled():
        print(f"\n{engine} slow chunk {chunk}: {counts['problems']} problems, {counts['outputs']} outputs, 0 differ; "
              f"{counts['refused']} refused by both; families {sorted(counts['families'])}")
