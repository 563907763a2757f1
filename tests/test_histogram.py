"""refquant.histogram.HistogramObserver: its interface, bad input, hand-derived golden values, and the Numba path
equal to the readable NumPy path. (Live torch parity: test_histogram_parity.py; step by step:
test_histogram_steps.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver as TorchHistogramObserver

from parity import assert_same
from refquant._dispatch import SMALL_CALLS
from refquant.histogram import SEARCH_TRACE_DTYPE, HistogramObserver

f32 = np.float32


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("x", [[1.0, 2.0], 1.5, torch.ones(3), None, "abc"], ids=type)
def test_non_array_input_is_a_type_error(x):
    with pytest.raises(TypeError, match="numpy.ndarray of dtype float32"):
        HistogramObserver()(x)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64])
def test_other_dtypes_are_a_type_error(dtype):
    obs = HistogramObserver()
    with pytest.raises(TypeError, match=f"dtype float32, got {np.dtype(dtype)}"):
        obs(np.ones(4, dtype))
    assert obs.min_val == np.inf and not obs.histogram.any()  # unchanged


def test_torch_on_integer_input_raises_too():
    """What torch does with the dtypes refused above: integers fail in histc; float64 is histogrammed in float64."""
    with pytest.raises(NotImplementedError, match="histogram_cpu"):
        TorchHistogramObserver()(torch.arange(5))


@pytest.mark.parametrize("implementation", ["numba", "numpy"])
@pytest.mark.parametrize("position", ["first batch", "later batch"])
def test_nan_is_a_value_error_and_leaves_the_observer_unchanged(rng, implementation, position):
    obs = HistogramObserver(implementation=implementation)
    if position == "later batch":
        obs(rng.standard_normal(100).astype(f32))
    before = (obs.histogram.copy(), obs.min_val, obs.max_val)
    x = rng.standard_normal(50).astype(f32)
    x[17] = np.nan
    x[3] = np.inf  # NaN wins over inf, as in torch (aminmax is NaN)
    with pytest.raises(ValueError, match=r"contains NaN .*torch.histc: range of \[nan, nan\] is not finite"):
        obs(x)
    assert_same(obs.histogram, before[0])
    assert (obs.min_val, obs.max_val) == before[1:]


def test_torch_raises_runtime_error_on_nan():
    """The torch behaviour the ValueError above stands for (on a first batch torch also keeps min_val = NaN)."""
    obs = TorchHistogramObserver()
    with pytest.raises(RuntimeError, match="is not finite"):
        obs(torch.tensor([1.0, float("nan")]))
    assert torch.isnan(obs.min_val)


@pytest.mark.parametrize("qscheme", ["per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams"])
def test_per_channel_qschemes_are_not_implemented_like_torch(qscheme):
    with pytest.raises(NotImplementedError, match="per_tensor"):
        HistogramObserver(qscheme=qscheme)
    with pytest.raises(NotImplementedError):
        TorchHistogramObserver(qscheme=getattr(torch, qscheme))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(bins=0), ValueError),
        (dict(bins=-3), ValueError),
        (dict(bins=2.5), ValueError),
        (dict(bins=True), ValueError),
        (dict(dtype="float32"), ValueError),
        (dict(qscheme="affine"), ValueError),
        (dict(implementation="cuda"), ValueError),
        (dict(num_threads=0), ValueError),
        (dict(quant_min=0), ValueError),
    ],
    ids=str,
)
def test_bad_settings_are_refused(kwargs, error):
    with pytest.raises(error):
        HistogramObserver(**kwargs)


# --------------------------------------------------------------------------------------------- interface


def test_attributes_before_and_after_calibration(rng):
    obs = HistogramObserver(reduce_range=True)
    assert obs.bins == 2048 and obs.dst_nbins == 256 and obs.upsample_rate == 16
    assert (obs.quant_min, obs.quant_max) == (0, 127)
    assert obs.min_val == np.inf and obs.max_val == -np.inf and obs.new_min is None
    assert obs.histogram.dtype == np.float32 and obs.histogram.shape == (2048,)
    x = rng.standard_normal((4, 256)).astype(f32)
    assert obs(x) is x
    assert obs.histogram.sum() == 1024
    assert obs.min_val == x.min() and obs.max_val == x.max()
    scale, zero_point = obs.calculate_qparams()
    assert scale.dtype == np.float32 and scale.shape == (1,)
    assert zero_point.dtype == np.int32 and zero_point.shape == (1,)
    assert obs.min_val <= obs.new_min < obs.new_max <= obs.max_val
    trace = obs.search_trace
    assert trace.dtype == SEARCH_TRACE_DTYPE and trace.size >= 1
    assert trace["accepted"][:-1].all()
    assert (np.diff(trace["l2_error"][trace["accepted"]]) <= 0).all()  # each accepted step lowered the error
    bin_width = f32(f32(obs.max_val - obs.min_val) / f32(2048))
    assert obs.new_min == f32(obs.min_val + f32(bin_width * f32(obs.start_bin)))
    assert obs.new_max == f32(obs.min_val + f32(bin_width * f32(obs.end_bin + 1)))


@pytest.mark.parametrize("dtype, qscheme, dst_nbins, zp_dtype", [
    ("quint8", "per_tensor_affine", 256, np.int32),
    ("qint8", "per_tensor_symmetric", 256, np.int64),
    ("qint32", "per_tensor_affine", 2**32, np.int32),
])
def test_dst_nbins_and_zero_point_dtype(rng, dtype, qscheme, dst_nbins, zp_dtype):
    obs = HistogramObserver(dtype=dtype, qscheme=qscheme)
    assert obs.dst_nbins == dst_nbins  # 2 ** bits, with or without reduce_range
    obs(rng.standard_normal(500).astype(f32))
    assert obs.calculate_qparams()[1].dtype == zp_dtype


def test_calculate_qparams_twice_gives_the_same_answer(rng):
    obs = HistogramObserver()
    obs(rng.standard_normal(3000).astype(f32))
    first = obs.calculate_qparams()
    second = obs.calculate_qparams()
    assert_same(first[0], second[0])
    assert_same(first[1], second[1])


def test_batch_order_does_not_matter_when_the_range_is_set_by_the_first_batch(rng):
    """With the full range in the first batch, later batches only add integer counts: order is irrelevant."""
    wide = np.float32([-4.0, 4.0])
    a = np.clip(rng.standard_normal(1000), -3.9, 3.9).astype(f32)
    b = np.clip(rng.standard_normal(1000) * 0.5, -3.9, 3.9).astype(f32)
    one, two = HistogramObserver(), HistogramObserver()
    for x in (wide, a, b):
        one(x)
    for x in (wide, b, a):
        two(x)
    assert_same(one.histogram, two.histogram)
    assert_same(one.calculate_qparams()[0], two.calculate_qparams()[0])


# --------------------------------------------------------------------------------------------- golden values


def test_golden_two_values():
    """Batch [0, 1]: one count in bin 0, one in bin 2047 (total 2, cSum = [1, 1, ..., 1, 2]).
    Step 1: beta = 1 - 1e-5, cSum[2047] = 2 > f32(2 * beta) moves r to 2046; the end moves (0 > 1 is false) and the
    first candidate (0, 2046) is always accepted (norm_min starts at inf). Then nothing moves until beta < 0.5,
    when r runs down to 0; candidate (0, 0) has a larger error: stop. So the top bin is clipped even here:
    new_max = f32(0 + f32(f32(1/2048) * 2047)) = 2047/2048, scale = f32(2047/2048 / 255), zero_point = 0."""
    obs = HistogramObserver()
    obs(np.float32([0.0, 1.0]))
    assert obs.histogram[0] == 1 and obs.histogram[2047] == 1 and obs.histogram.sum() == 2
    scale, zero_point = obs.calculate_qparams()
    assert (obs.start_bin, obs.end_bin) == (0, 2046)
    assert obs.search_trace[["start_bin", "end_bin", "accepted"]].tolist() == [(0, 2046, True), (0, 0, False)]
    assert obs.new_min == 0.0 and obs.new_max == f32(2047 / 2048)
    assert_same(scale, np.float32([f32(2047 / 2048) / f32(255)]))
    assert_same(zero_point, np.int32([0]))
    theirs = TorchHistogramObserver()
    theirs(torch.tensor([0.0, 1.0]))
    assert_same(scale, theirs.calculate_qparams()[0].numpy())


def test_golden_constant_batch():
    """A constant batch c: histc widens [c, c] to [c - 1, c + 1], so the count sits in bin 1024; min_val = max_val
    = c, bin_width = 0, new_min = new_max = c; for c = 2 (quint8, reduce_range): scale = f32(2 / 127),
    zero_point = 0."""
    obs = HistogramObserver(reduce_range=True)
    obs(np.full(10, np.float32(2.0)))
    assert obs.histogram[1024] == 10 and obs.histogram.sum() == 10
    scale, zero_point = obs.calculate_qparams()
    assert obs.new_min == 2.0 and obs.new_max == 2.0
    assert_same(scale, np.float32([np.float32(2.0) / np.float32(127)]))
    assert_same(zero_point, np.int32([0]))


def test_golden_upscale_of_integer_counts():
    """Old range [0, 2] in 2 bins holding [2, 3], moved to [0, 3]: 32 sub-bins of width 1/16 with mid points
    (2i + 1)/32 and weights 2/16 (i < 16) and 3/16 (i >= 16). New bin 0 is [0, 1.5): mids below 48/32, i.e.
    i <= 23. New bin 0 = 16 * 2/16 + 8 * 3/16 = 3.5, new bin 1 = 8 * 3/16 = 1.5 (all exact in float32)."""
    for implementation in ("numba", "numpy"):
        obs = HistogramObserver(bins=2, implementation=implementation)
        out = obs._upscale_histogram(np.float32([2.0, 3.0]), f32(0), f32(2), f32(0), f32(3))
        assert_same(out, np.float32([3.5, 1.5]))
    torch_out = TorchHistogramObserver(bins=2)._upscale_histogram(
        torch.tensor([2.0, 3.0]), torch.tensor(0.0), torch.tensor(2.0), torch.tensor(0.0), torch.tensor(3.0))
    assert_same(np.float32([3.5, 1.5]), torch_out.numpy())


# --------------------------------------------------------------------------------------------- kernels == readable


def test_numba_and_numpy_paths_agree_on_everything(rng):
    """Same histogram, range, chosen bins, search trace and qparams from both implementations."""
    for i in range(15):
        kwargs = dict(bins=int(rng.choice([2048, 100, 7])), reduce_range=bool(rng.random() < 0.5))
        fast = HistogramObserver(**kwargs, implementation="numba")
        readable = HistogramObserver(**kwargs, implementation="numpy")
        for _ in range(int(rng.integers(1, 5))):
            x = (rng.standard_normal(int(rng.integers(1, 3000))) * rng.choice([0.5, 1, 3])).astype(f32)
            fast(x)
            readable(x)
            assert_same(fast.histogram, readable.histogram, f"set {i}: histogram")
        for a, b in zip(fast.calculate_qparams(), readable.calculate_qparams()):
            assert_same(a, b, f"set {i}: qparams")
        assert (fast.start_bin, fast.end_bin) == (readable.start_bin, readable.end_bin)
        for field in SEARCH_TRACE_DTYPE.names:
            assert_same(fast.search_trace[field], readable.search_trace[field], f"set {i}: trace {field}")


def assert_same_observers(a: HistogramObserver, b: HistogramObserver, what: str) -> None:
    """Same histogram, range, chosen bins, search trace and qparams."""
    assert_same(a.histogram, b.histogram, f"{what}: histogram")
    assert_same(f32([a.min_val, a.max_val]), f32([b.min_val, b.max_val]), f"{what}: range")
    for x, y in zip(a.calculate_qparams(), b.calculate_qparams()):
        assert_same(x, y, f"{what}: qparams")
    assert (a.start_bin, a.end_bin) == (b.start_bin, b.end_bin), what
    for field in SEARCH_TRACE_DTYPE.names:
        assert_same(a.search_trace[field], b.search_trace[field], f"{what}: trace {field}")


def test_auto_runs_numpy_below_the_threshold_and_the_kernels_from_it(rng, monkeypatch):
    """implementation="auto" (the default): the readable path for batches below H.KERNEL_MIN_ELEMENTS (the kernels
    made to fail, so nothing but NumPy ran), the kernels from the first batch of that size on (the readable forward
    made to fail) or after refquant._dispatch.SMALL_CALLS batches; on both sides the same bits as
    implementation="numba" and "numpy" fed the same batches."""
    import refquant.histogram as H

    n = H.KERNEL_MIN_ELEMENTS
    small = [(rng.standard_normal(n - 1) * f32(s)).astype(f32) for s in (1.0, 2.0, 2.0)]
    big = [(rng.standard_normal(n) * f32(s)).astype(f32) for s in (3.0, 1.0)]
    later_small = [(rng.standard_normal(1000) * f32(s)).astype(f32) for s in (4.0, 0.5)]
    auto = HistogramObserver(reduce_range=True)
    kernels = HistogramObserver(reduce_range=True, implementation="numba")
    readable = HistogramObserver(reduce_range=True, implementation="numpy")
    assert auto.implementation == "auto" and not auto.uses_kernels

    def must_not_run(*args, **kwargs):
        raise AssertionError("the other path ran")

    with monkeypatch.context() as m:
        for name in ("_forward_numba", "_upscale_histogram_kernel", "_non_linear_param_search_kernel",
                     "_compute_quantization_error_kernel", "_sum_f32_kernel"):
            target = HistogramObserver if name == "_forward_numba" else H
            m.setattr(target, name, must_not_run)
        for x in small:
            auto(x)
        assert not auto.uses_kernels
        readable_only = HistogramObserver(reduce_range=True, implementation="numpy")
        for x in small:
            readable_only(x)
        assert_same_observers(auto, readable_only, "below the threshold, vs numpy")
    for x in small:
        kernels(x)
        readable(x)
    assert_same_observers(auto, kernels, "below the threshold, vs numba")
    with monkeypatch.context() as m:
        m.setattr(auto, "_forward_numpy", must_not_run)
        for x in big + later_small:
            auto(x)
            kernels(x)
            readable(x)
            assert auto.uses_kernels
    assert_same_observers(auto, kernels, "from the threshold, vs numba")
    assert_same_observers(auto, readable, "from the threshold, vs numpy")
    many = HistogramObserver()  # more than SMALL_CALLS small batches: the kernels from then on, the same bits
    kernels_many = HistogramObserver(implementation="numba")
    for i in range(SMALL_CALLS + 3):
        x = (rng.standard_normal(50) * f32(1 + i / 8)).astype(f32)
        many(x)
        kernels_many(x)
        assert many.uses_kernels == (i >= SMALL_CALLS), i
    assert_same_observers(many, kernels_many, "after SMALL_CALLS small batches, vs numba")
    assert HistogramObserver(bins=H.KERNEL_MIN_ELEMENTS // 16).uses_kernels  # re-binning writes bins * 16 points
    assert not HistogramObserver(bins=H.KERNEL_MIN_ELEMENTS // 16 - 1).uses_kernels


@pytest.mark.parametrize("num_threads", [1, 2, 4])
def test_thread_count_changes_nothing(rng, num_threads):
    batches = [rng.standard_normal(300_000).astype(f32) * f32(s) for s in (1, 2, 0.5)]
    ref, obs = HistogramObserver(num_threads=1), HistogramObserver(num_threads=num_threads)
    for b in batches:
        ref(b)
        obs(b)
    assert_same(obs.histogram, ref.histogram)
    assert_same(obs.calculate_qparams()[0], ref.calculate_qparams()[0])
