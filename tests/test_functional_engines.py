"""refquant.functional on the qnnpack and onednn engines, live against torch.

qnnpack's add / add_relu run QNNPACK's q8vadd (eqs. F9, F10); its relu is QNNPACK's clamp; mul and cat run aten's
kernels on qnnpack and onednn as on x86 (refquant.functional's docstring). Random shapes (below and above the 8-code
vector step), scales, zero points, power-of-two scales (exact ratios, where rounding ties are frequent), and the
refusals: a scale ratio outside [2^-14, 2^8) and add_relu with output zero point 255 (QNNPACK and refquant both
refuse), both ratios below 2^-10 (refquant only).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from parity import assert_same
from refquant import functional as F
from torch_models import needs_avx2_kernels, torch_engine


def qt(codes: np.ndarray, scale: float, zero_point: int) -> torch.Tensor:
    return torch._make_per_tensor_quantized_tensor(torch.from_numpy(codes), scale, zero_point)


def random_operands(rng: np.random.Generator, tie_prone: bool):
    shape = tuple(int(d) for d in rng.integers(1, 10, rng.integers(1, 5)))
    if tie_prone:
        sa, sb, s = (float(2.0 ** int(e)) for e in rng.integers(-8, 3, 3))
    else:
        sa, sb = (float(v) for v in 10 ** rng.uniform(-3, 0, 2))
        s = float(10 ** rng.uniform(-3, 0.5))
    za, zb, z = (int(v) for v in rng.integers(0, 256, 3))
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = rng.integers(0, 256, shape).astype(np.uint8)
    return a, b, sa, sb, za, zb, s, z


@needs_avx2_kernels
@pytest.mark.parametrize("relu", [False, True])
def test_qnnpack_add_matches_torch(rng, relu):
    n = refused = 0
    with torch_engine("qnnpack"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
        ours = F.add_relu if relu else F.add
        for i in range(600):
            a, b, sa, sb, za, zb, s, z = random_operands(rng, tie_prone=i % 3 == 0)
            try:
                r = ours(F.QTensor(a, sa, za), F.QTensor(b, sb, zb), s, z, engine="qnnpack")
            except ValueError as e:
                refused += 1
                if "below 2**-10" in str(e):  # refquant only: torch runs QNNPACK outside its documented shift range
                    continue
                with pytest.raises(RuntimeError, match="failed to create QNNPACK Add operator"):
                    op(qt(a, sa, za), qt(b, sb, zb), s, z)
                continue
            t = op(qt(a, sa, za), qt(b, sb, zb), s, z)
            assert_same(r.codes, t.int_repr().numpy(), f"qnnpack add relu={relu} {a.shape} {sa} {sb} {s} {za} {zb} {z}")
            assert (r.scale, r.zero_point) == (t.q_scale(), t.q_zero_point())
            n += 1
    assert n > 400 and refused < 100, (n, refused)


def test_qnnpack_add_refusals_name_the_reason():
    a = F.QTensor(np.zeros((2, 3), np.uint8), 1.0, 0)
    with pytest.raises(ValueError, match=r"outside \[2\*\*-14, 2\*\*8\)"):
        F.add(a, a, 1e-3, 0, engine="qnnpack")  # ratio 1000
    with pytest.raises(ValueError, match="range min must be below range max"):
        F.add_relu(a, a, 1.0, 255, engine="qnnpack")
    with pytest.raises(ValueError, match="below 2"):
        F.add(a, a, 2000.0, 0, engine="qnnpack")
    with pytest.raises(ValueError, match="engine must be one of"):
        F.add(a, a, 1.0, 0, engine="tensorrt")


@needs_avx2_kernels
@pytest.mark.parametrize("engine", ["qnnpack", "onednn"])
def test_mul_cat_relu_run_atens_kernels_on_every_engine(rng, engine):
    with torch_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(100):
            a, b, sa, sb, za, zb, s, z = random_operands(rng, tie_prone=i % 3 == 0)
            qa, qb = F.QTensor(a, sa, za), F.QTensor(b, sb, zb)
            t = torch.ops.quantized.mul(qt(a, sa, za), qt(b, sb, zb), s, z)
            assert_same(F.mul(qa, qb, s, z).codes, t.int_repr().numpy(), f"{engine} mul")
            dim = int(rng.integers(0, a.ndim))
            t = torch.ops.quantized.cat([qt(a, sa, za), qt(b, sb, zb)], dim, s, z)
            assert_same(F.cat([qa, qb], dim, s, z).codes, t.int_repr().numpy(), f"{engine} cat dim {dim}")
            assert_same(F.relu(qa).codes, torch.relu(qt(a, sa, za)).int_repr().numpy(), f"{engine} relu")
            if engine == "onednn":  # no oneDNN path for add: aten's kernel, as on x86
                t = torch.ops.quantized.add(qt(a, sa, za), qt(b, sb, zb), s, z)
                assert_same(F.add(qa, qb, s, z, engine="onednn").codes, t.int_repr().numpy(), "onednn add")
