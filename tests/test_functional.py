"""refquant.functional against torch.ops.quantized.add / add_relu / mul / cat and quantized relu / flatten, run live.

Every case draws fresh (scale, zero point) triples and codes; the "ties" cases use power-of-two scales, so that many
sums land exactly on k + 0.5 where the vector lambda (round, then add the zero point) and the scalar lambda (add the
zero point, then round) disagree; "overflow" cases use output scales so small that the float result leaves int32.
Lengths cover the vector body, the scalar tail (numel % 64) and, from 32,768 elements, the thread split.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import assert_same
from refquant import functional as F
from refquant.functional import QTensor
from torch_models import needs_avx2_kernels

pytestmark = needs_avx2_kernels

KINDS = ("random", "ties", "overflow", "underflow", "extreme_zero_points")
LENGTHS = (1, 7, 63, 64, 65, 127, 128, 129, 200, 1000)


def to_torch(q: QTensor) -> torch.Tensor:
    t = torch._make_per_tensor_quantized_tensor(torch.from_numpy(q.codes.copy()), q.scale, q.zero_point)
    if q.layout == "channels_last":  # what qcat_nhwc_kernel allocates: channels-last strides for every shape
        out = torch._empty_affine_quantized(q.shape, scale=q.scale, zero_point=q.zero_point, dtype=torch.quint8,
                                            memory_format=torch.channels_last)
        out.copy_(t)
        assert out.stride() == q.strides()
        return out
    return t


def same_layout(got: QTensor, expected: torch.Tensor) -> bool:
    """refquant's layout is torch's, wherever the layout can matter (not for shapes where the orders coincide)."""
    if got.layout == "strided":
        return not expected.is_contiguous()
    return expected.is_contiguous() if not got.is_channels_last else expected.stride() == got.strides()


def random_qparams(rng: np.random.Generator, kind: str) -> tuple[list[float], list[int]]:
    """(s_a, s_b, s) and (z_a, z_b, z), float32-valued scales as observers give them."""
    if kind == "ties":
        scales = [float(2.0 ** rng.integers(-8, 3)) for _ in range(3)]
    elif kind == "overflow":  # |result / s| beyond 2^31: int32 saturation and wrap-around paths
        scales = [float(np.float32(10.0 ** rng.uniform(-1, 2))) for _ in range(2)]
        scales.append(float(np.float32(10.0 ** rng.uniform(-9, -6))))
    elif kind == "underflow":  # a huge output scale: every result rounds to the zero point
        scales = [float(np.float32(10.0 ** rng.uniform(-4, -1))) for _ in range(2)]
        scales.append(float(np.float32(10.0 ** rng.uniform(3, 8))))
    else:
        scales = [float(np.float32(10.0 ** rng.uniform(-4, 1))) for _ in range(3)]
    if kind == "extreme_zero_points":
        zps = [int(rng.choice([0, 1, 127, 128, 254, 255])) for _ in range(3)]
    else:
        zps = [int(z) for z in rng.integers(0, 256, 3)]
    return scales, zps


def random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    if rng.random() < 0.2:  # a few distinct codes, so ties repeat across vector and scalar elements
        return rng.choice(rng.integers(0, 256, 3), n).astype(np.uint8)
    return rng.integers(0, 256, n).astype(np.uint8)


def random_pair(rng, kind, n):
    (sa, sb, s), (za, zb, z) = random_qparams(rng, kind)
    shape = (n,) if rng.random() < 0.5 else (1, n)
    qa = QTensor(random_codes(rng, n).reshape(shape), sa, za)
    qb = QTensor(random_codes(rng, n).reshape(shape), sb, zb)
    return qa, qb, s, z


BINARY = {
    "add": (F.add, torch.ops.quantized.add),
    "add_relu": (F.add_relu, torch.ops.quantized.add_relu),
    "mul": (F.mul, torch.ops.quantized.mul),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", list(BINARY))
def test_binary_op_matches_torch(rng, op, kind):
    ours, theirs = BINARY[op]
    threads = torch.get_num_threads()
    for n in LENGTHS:
        for _ in range(40):
            qa, qb, s, z = random_pair(rng, kind, n)
            expected = theirs(to_torch(qa), to_torch(qb), s, z)
            got = ours(qa, qb, s, z, num_threads=threads)
            assert (got.scale, got.zero_point) == (expected.q_scale(), expected.q_zero_point())
            assert_same(got.codes, expected.int_repr().numpy(),
                        f"{op} {kind} n={n} a=({qa.scale!r},{qa.zero_point}) b=({qb.scale!r},{qb.zero_point}) "
                        f"out=({s!r},{z})")


@pytest.mark.parametrize("op", list(BINARY))
def test_binary_op_thread_split_matches_torch(rng, op):
    """From 32,768 elements on, torch splits the elements between its threads, and each thread's range ends in
    scalar elements (eq. F0): compare at 1, 2 and 3 threads, with ties everywhere."""
    ours, theirs = BINARY[op]
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for n in (32767, 32768, 40000, 65536 + 37, 100001):
                qa, qb, s, z = random_pair(rng, "ties", n)
                expected = theirs(to_torch(qa), to_torch(qb), s, z).int_repr().numpy()
                assert_same(ours(qa, qb, s, z, num_threads=threads).codes, expected, f"{op} n={n} threads={threads}")
    finally:
        torch.set_num_threads(saved)


def test_cat_large_inputs_on_several_threads_match_torch(rng):
    """cat's quantize_per_tensor (eq. Q1) and dequantize (eq. D1) round every element alike, whatever the threads."""
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for shape, dim in (((40000,), 0), ((300, 130), 1), ((9000, 1, 1, 1), 1)):
                qxs = [QTensor(random_codes(rng, int(np.prod(shape))).reshape(shape), *p)
                       for p in ((0.25, 3), (float(np.float32(0.0371)), 130))]
                s, z = float(np.float32(0.05)), 77
                expected = torch.ops.quantized.cat([to_torch(q) for q in qxs], dim, s, z).int_repr().numpy()
                assert_same(F.cat(qxs, dim, s, z).codes, expected, f"cat {shape} dim={dim} threads={threads}")
    finally:
        torch.set_num_threads(saved)


LAYOUT_SHAPES = [(3, 2, 5, 9), (1, 3, 7, 4), (2, 1, 5, 9), (3, 4, 1, 1), (2, 3, 1, 7), (700, 2, 5, 9)]


@pytest.mark.parametrize("op", list(BINARY))
def test_binary_op_on_channels_last_operands_matches_torch(rng, op):
    """Two channels-last operands are walked in NHWC memory order; a channels-last and a row-major operand are not
    vectorized at all (every element scalar); the output takes the first operand's layout."""
    ours, theirs = BINARY[op]
    for shape in LAYOUT_SHAPES:
        for la, lb in ((True, True), (True, False), (False, True)):
            for kind in ("ties", "ties", "ties", "random"):
                (sa, sb, s), (za, zb, z) = random_qparams(rng, kind)
                n = int(np.prod(shape))
                qa = QTensor(random_codes(rng, n).reshape(shape), sa, za, "channels_last" if la else "contiguous")
                qb = QTensor(random_codes(rng, n).reshape(shape), sb, zb, "channels_last" if lb else "contiguous")
                expected = theirs(to_torch(qa), to_torch(qb), s, z)
                got = ours(qa, qb, s, z, num_threads=torch.get_num_threads())
                assert_same(got.codes, expected.int_repr().numpy(), f"{op} {shape} layouts {la, lb} {kind}")
                assert same_layout(got, expected), f"{op} {shape} output layout"


def test_relu_flatten_cat_keep_or_drop_channels_last_like_torch(rng):
    for shape in LAYOUT_SHAPES[:5]:
        qx = QTensor(random_codes(rng, int(np.prod(shape))).reshape(shape), 0.25, 9, "channels_last")
        t = to_torch(qx)
        r = F.relu(qx)
        assert same_layout(r, torch.relu(t)), f"relu {shape}"
        for start, end in ((1, -1), (0, 1), (0, -1), (1, 2), (2, 3), (3, 3)):
            expected = torch.flatten(t, start, end)
            got = F.flatten(qx, start, end)
            assert_same(got.codes, expected.int_repr().numpy(), f"flatten {shape} {start} {end}")
            assert same_layout(got, expected), f"flatten {shape} {start} {end}: {got.layout}, {expected.stride()}"
        for dim in (1, 3, -1):  # channels-last inputs: qcat_nhwc_kernel on dim 1, the generic path elsewhere
            for layout in ("channels_last", "contiguous"):
                other = QTensor(random_codes(rng, int(np.prod(shape))).reshape(shape), 0.125, 201, layout)
                expected = torch.ops.quantized.cat([t, to_torch(other)], dim, 0.5, 3)
                got = F.cat([qx, other], dim, 0.5, 3)
                assert_same(got.codes, expected.int_repr().numpy(), f"cat {shape} dim {dim} with {layout}")
                assert same_layout(got, expected), f"cat {shape} dim {dim} with {layout}: output layout"
    strided = F.flatten(QTensor(np.zeros((2, 3, 4, 5), np.uint8), 0.1, 0, "channels_last"), 2, 3)
    assert strided.layout == "strided"
    with pytest.raises(ValueError, match="strided view"):
        F.add(strided, strided, 0.1, 0)


def test_vector_and_scalar_lambdas_really_differ():
    """Golden: 0.5·5 + 0 = 2.5 with z = 1: the vector lambda gives rint(2.5) + 1 = 3, the scalar rint(3.5) = 4.
    For 200 elements the first 192 are vector elements (three steps of 64), the last 8 scalar (eq. F0)."""
    qa = QTensor(np.full(200, 5, np.uint8), 0.5, 0)
    qb = QTensor(np.full(200, 7, np.uint8), 1.0, 7)
    expected = np.array([3] * 192 + [4] * 8, np.uint8)
    assert_same(F.add(qa, qb, 1.0, 1).codes, expected, "add at a tie")
    assert_same(to_torch_add(qa, qb, 1.0, 1), expected, "torch's add at a tie")


def to_torch_add(qa, qb, s, z):
    return torch.ops.quantized.add(to_torch(qa), to_torch(qb), s, z).int_repr().numpy()


def test_parallel_ranges_golden():
    assert F.parallel_ranges(32767, 2) == [(0, 32767)]
    assert F.parallel_ranges(40000, 1) == [(0, 40000)]
    assert F.parallel_ranges(40000, 2) == [(0, 20000), (20000, 40000)]
    assert F.parallel_ranges(70001, 3) == [(0, 23334), (23334, 46668), (46668, 70001)]
    assert F.parallel_ranges(40000, 8) == [(0, 20000), (20000, 40000)]  # at most ceil(numel / 32768) tasks
    mask = F.vectorized_mask(40000, 2)
    assert mask[:19968].all() and not mask[19968:20000].any() and mask[20000:39968].all()


def test_dequantize_vec_is_one_fma():
    """Golden: q = 1, z = 3, s = 0.1f. dequantize_val: (1 − 3)·0.1f = −0.2f exactly (doubling is exact). The vector
    form rounds the premultiplied −3·0.1f first and adds 0.1f in one FMA: one float32 step below −0.2f."""
    s = float(np.float32(0.1))
    assert F.dequantize_val(np.array([1], np.uint8), s, 3)[0] == np.float32(-0.2)
    premul = np.float32(np.float32(s) * np.float32(-3))
    fma = F.dequantize_vec(np.array([1], np.uint8), s, 3)[0]
    assert fma == np.float32(np.float64(premul) + np.float64(np.float32(s)))  # the exact sum rounded once
    assert fma == np.nextafter(np.float32(-0.2), np.float32(-1))


def test_quantize_vec_wraps_near_int32_max():
    """Golden: a huge sum is clamped to 2147483520.0f, cvtps2dq'd, then the zero point is added in int32: with
    z = 128 that is 2^31, which wraps to INT32_MIN and saturates to code 0; with z = 127 it stays at 255."""
    big = np.array([3e38], np.float32)
    assert F.quantize_vec(big, 1.0, 128)[0] == 0
    assert F.quantize_vec(big, 1.0, 127)[0] == 255
    assert F.quantize_val(big, 1.0, 128)[0] == 255


@pytest.mark.parametrize("kind", KINDS)
def test_relu_matches_torch(rng, kind):
    for n in LENGTHS:
        (s, _, _), (z, _, _) = random_qparams(rng, kind)
        qx = QTensor(random_codes(rng, n), s, z)
        for fn in (torch.relu, torch.nn.ReLU(), torch.nn.ReLU(inplace=True)):
            expected = fn(to_torch(qx))
            got = F.relu(qx)
            assert (got.scale, got.zero_point) == (expected.q_scale(), expected.q_zero_point())
            assert_same(got.codes, expected.int_repr().numpy(), f"relu n={n} zp={z}")


def test_flatten_matches_torch(rng):
    for shape, start, end in [((2, 3, 4), 1, -1), ((2, 3, 4), 0, -1), ((2, 3, 4, 5), 1, 2), ((5,), 0, -1),
                              ((2, 3), -1, -1), ((2, 1, 3), -2, -1)]:
        qx = QTensor(rng.integers(0, 256, shape).astype(np.uint8), 0.05, 3)
        expected = torch.flatten(to_torch(qx), start, end)
        got = F.flatten(qx, start, end)
        assert (got.scale, got.zero_point) == (expected.q_scale(), expected.q_zero_point())
        assert_same(got.codes, expected.int_repr().numpy(), f"flatten {shape} {start} {end}")
    with pytest.raises(IndexError, match="start_dim"):
        F.flatten(QTensor(np.zeros((2, 3), np.uint8), 0.1, 0), 2)


CAT_SHAPES = [  # (shape of every input with -1 at the cat dim, dim)
    ((-1,), 0), ((3, -1), 1), ((-1, 5), 0), ((2, -1, 4), 1), ((2, 3, -1), -1),
    ((2, -1, 1, 1), 1), ((2, -1, 3, 2), 1), ((1, -1, 1, 1), 1), ((2, 3, 1, -1), 3), ((2, -1, 1, 1), -3),
]


def cat_inputs(rng, kind, shape, count):
    qxs = []
    for i in range(count):
        (s, _, _), (z, _, _) = random_qparams(rng, kind)
        size = [int(rng.integers(1, 40)) if d == -1 else d for d in shape]
        qxs.append(QTensor(random_codes(rng, int(np.prod(size))).reshape(size), s, z))
    return qxs


@pytest.mark.parametrize("kind", KINDS)
def test_cat_matches_torch(rng, kind):
    for shape, dim in CAT_SHAPES:
        for _ in range(10):
            qxs = cat_inputs(rng, kind, shape, int(rng.integers(1, 4)))
            (s, _, _), (z, _, _) = random_qparams(rng, kind)
            if rng.random() < 0.3:  # the functional's qparams equal one input's: qcat_nhwc_kernel copies its codes
                s, z = qxs[0].scale, qxs[0].zero_point
            expected = torch.ops.quantized.cat([to_torch(q) for q in qxs], dim, s, z)
            got = F.cat(qxs, dim, s, z)
            assert (got.scale, got.zero_point) == (expected.q_scale(), expected.q_zero_point())
            assert_same(got.codes, expected.int_repr().numpy(),
                        f"cat {kind} shapes {[q.shape for q in qxs]} dim={dim} out=({s!r},{z})")


def test_cat_channels_last_path_golden():
    """(N, C, 1, 1) inputs on dim 1 take qcat_nhwc_kernel: the first 8·floor(C/8) channels round like the vector
    lambda (F1), the rest like the scalar one (F2). A tie in every channel: 0.5·5 = 2.5, out zero point 1."""
    qx = QTensor(np.full((1, 11, 1, 1), 5, np.uint8), 0.5, 0)
    got = F.cat([qx], 1, 1.0, 1).codes.reshape(-1)
    assert_same(got, np.array([3] * 8 + [4] * 3, np.uint8), "nhwc cat at a tie")
    expected = torch.ops.quantized.cat([to_torch(qx)], 1, 1.0, 1).int_repr().numpy().reshape(-1)
    assert_same(got, expected, "torch's nhwc cat at a tie")
    # the generic path (dim -3 is the same dimension, but torch tests for the literal 1): eq. Q1, fmaf(2.5, 1, 1)
    assert_same(F.cat([qx], -3, 1.0, 1).codes.reshape(-1), np.full(11, 4, np.uint8), "generic cat at a tie")


@pytest.mark.parametrize("call, exc, words", [
    (lambda: F.add(QTensor(np.zeros(3, np.uint8), 1.0, 0), QTensor(np.zeros(4, np.uint8), 1.0, 0), 1.0, 0),
     ValueError, "same shape"),
    (lambda: F.add(np.zeros(3, np.uint8), QTensor(np.zeros(3, np.uint8), 1.0, 0), 1.0, 0), TypeError, "qa"),
    (lambda: F.mul(QTensor(np.zeros(3, np.uint8), 1.0, 0), QTensor(np.zeros(3, np.uint8), 1.0, 0), 0.0, 0),
     ValueError, "scale"),
    (lambda: F.add(QTensor(np.zeros(3, np.uint8), 1.0, 0), QTensor(np.zeros(3, np.uint8), 1.0, 0), 1.0, 256),
     ValueError, "zero_point"),
    (lambda: QTensor(np.zeros(3, np.int8), 1.0, 0), TypeError, "uint8"),
    (lambda: F.cat([], 0, 1.0, 0), ValueError, "non-empty"),
    (lambda: F.cat([QTensor(np.zeros((2, 3), np.uint8), 1.0, 0), QTensor(np.zeros((3, 3), np.uint8), 1.0, 0)], 1,
                   1.0, 0), ValueError, "shape"),
    (lambda: F.add(QTensor(np.zeros(3, np.uint8), 1.0, 0), QTensor(np.zeros(3, np.uint8), 1.0, 0), 1.0, 0,
                   num_threads=0), ValueError, "num_threads"),
])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
