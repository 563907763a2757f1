"""refquant.observers against torch.ao.quantization.observer, run live."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.ao.quantization.observer as tobs
from hypothesis import given, settings
from hypothesis import strategies as st

import refquant.observers as robs
from parity import assert_same
from refquant.quantize import dequantize, quantize_per_tensor

TORCH_DTYPE = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}
TORCH_QSCHEME = {name: getattr(torch, name) for name in robs.QSCHEMES}
DISTRIBUTIONS = ["normal", "uniform", "laplace", "lognormal", "relu", "negative", "outliers", "constant", "one",
                 "tiny", "huge", "integers"]


def batch(rng: np.random.Generator, kind: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    loc, spread = rng.uniform(-3, 3), 10.0 ** rng.uniform(-2, 2)
    x = {
        "normal": lambda: rng.normal(loc, spread, n),
        "uniform": lambda: rng.uniform(loc - spread, loc + spread, n),
        "laplace": lambda: rng.laplace(loc, spread, n),
        "lognormal": lambda: rng.lognormal(0, 2, n),
        "relu": lambda: np.maximum(rng.normal(loc, spread, n), 0),
        "negative": lambda: -np.abs(rng.normal(loc, spread, n)) - 0.1,
        "outliers": lambda: rng.normal(0, 1, n) * np.where(rng.random(n) < 0.01, 1e4, 1),
        "constant": lambda: np.full(n, loc),
        "one": lambda: np.full(n, loc),
        "tiny": lambda: rng.normal(0, 1e-30, n),
        "huge": lambda: rng.normal(0, 1e30, n),
        "integers": lambda: rng.integers(-5, 6, n).astype(np.float64),
    }[kind]()
    return x.astype(np.float32).reshape(shape)


def per_tensor_configs():
    for dtype in ("quint8", "qint8", "qint32"):
        for qscheme in ("per_tensor_affine", "per_tensor_symmetric"):
            for reduce_range in (False, True):
                if reduce_range and qscheme == "per_tensor_symmetric" and dtype == "quint8":
                    continue  # refused by both (tested below)
                yield dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
            custom = {"quint8": (0, 100), "qint8": (-50, 60), "qint32": (-1000, 2**20)}[dtype]
            yield dict(dtype=dtype, qscheme=qscheme, quant_min=custom[0], quant_max=custom[1])


def per_channel_configs():
    for dtype in ("quint8", "qint8", "qint32"):
        for qscheme in ("per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams"):
            yield dict(dtype=dtype, qscheme=qscheme)
    yield dict(dtype="qint8", qscheme="per_channel_symmetric", reduce_range=True)
    yield dict(dtype="qint8", qscheme="per_channel_affine", quant_min=-100, quant_max=100)


def torch_kwargs(kwargs: dict) -> dict:
    return {**kwargs, "dtype": TORCH_DTYPE[kwargs["dtype"]], "qscheme": TORCH_QSCHEME[kwargs["qscheme"]]}


def assert_same_qparams(ours, theirs, what):
    scale, zero_point = ours
    assert_same(scale, theirs[0].numpy(), f"{what}: scale")
    assert_same(zero_point, theirs[1].numpy(), f"{what}: zero_point")


@pytest.mark.parametrize("cls", ["MinMaxObserver", "MovingAverageMinMaxObserver"])
@pytest.mark.parametrize("kwargs", list(per_tensor_configs()), ids=str)
def test_per_tensor_observers_match_torch(rng, cls, kwargs):
    for kind in DISTRIBUTIONS:
        extra = {"averaging_constant": float(rng.choice([0.01, rng.uniform(0, 1), 1.0]))} \
            if cls.startswith("Moving") else {}
        ours = getattr(robs, cls)(**kwargs, **extra)
        theirs = getattr(tobs, cls)(**torch_kwargs(kwargs), **extra)
        for _ in range(int(rng.integers(1, 5))):  # several batches; their ranges grow and shrink
            shape = (1,) if kind == "one" else tuple(int(v) for v in rng.integers(1, 30, rng.integers(1, 4)))
            x = batch(rng, kind, shape)
            assert ours(x) is x
            theirs(torch.from_numpy(x))
        assert_same(ours.min_val, theirs.min_val.numpy(), f"{cls} {kind}: min_val")
        assert_same(ours.max_val, theirs.max_val.numpy(), f"{cls} {kind}: max_val")
        try:
            expected = theirs.calculate_qparams()
        except AssertionError:  # float32 moving averages can leave min just above max: torch refuses, so must we
            with pytest.raises(ValueError, match="min .* should be less than max"):
                ours.calculate_qparams()
            continue
        assert_same_qparams(ours.calculate_qparams(), expected, f"{cls} {kwargs} {kind}")


@pytest.mark.parametrize("cls", ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"])
@pytest.mark.parametrize("kwargs", list(per_channel_configs()), ids=str)
def test_per_channel_observers_match_torch(rng, cls, kwargs):
    for kind in DISTRIBUTIONS:
        shape = tuple(int(v) for v in rng.integers(1, 12, rng.integers(2, 5)))
        ch_axis = int(rng.integers(-len(shape), len(shape)))
        extra = {"averaging_constant": float(rng.uniform(0, 0.3))} if cls.startswith("Moving") else {}
        ours = getattr(robs, cls)(ch_axis=ch_axis, **kwargs, **extra)
        theirs = getattr(tobs, cls)(ch_axis=ch_axis, **torch_kwargs(kwargs), **extra)
        for _ in range(int(rng.integers(1, 4))):
            x = batch(rng, kind, shape)
            ours(x)
            theirs(torch.from_numpy(x))
        assert_same(ours.min_val, theirs.min_val.numpy(), f"{cls} {kind}: min_val")
        try:
            expected = theirs.calculate_qparams()
        except AssertionError:  # moving averages can leave min > max in a channel: torch refuses
            with pytest.raises(ValueError, match="min .* should be less than max"):
                ours.calculate_qparams()
            continue
        assert_same_qparams(ours.calculate_qparams(), expected, f"{cls} {kwargs} {kind} ch_axis={ch_axis}")


def test_moving_average_per_channel_inverted_range_raises_like_torch():
    """Float32 rounding in the two averages can leave a channel's min just above its max. That state is set
    directly here, on both observers, to check that both refuse it."""
    ours = robs.MovingAveragePerChannelMinMaxObserver(averaging_constant=1.0)
    theirs = tobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=1.0)
    for obs, mk in ((ours, np.asarray), (theirs, torch.tensor)):
        obs(mk(np.float32([[0.0, 10.0]])))
    ours.min_val, ours.max_val = np.float32([3.0]), np.float32([2.0])
    theirs.min_val, theirs.max_val = torch.tensor([3.0]), torch.tensor([2.0])
    with pytest.raises(AssertionError):
        theirs.calculate_qparams()
    with pytest.raises(ValueError, match="min .* should be less than max"):
        ours.calculate_qparams()


def test_float64_and_integer_batches_are_converted_like_torch(rng):
    for x in (rng.normal(0, 1, (4, 5)) * 1.000000001, rng.integers(-300, 300, (4, 5))):
        for cls in ("MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
                    "MovingAveragePerChannelMinMaxObserver"):
            ours, theirs = getattr(robs, cls)(), getattr(tobs, cls)()
            for _ in range(2):
                ours(x)
                theirs(torch.from_numpy(x))
            assert_same_qparams(ours.calculate_qparams(), theirs.calculate_qparams(), f"{cls} {x.dtype}")


@pytest.mark.parametrize("cls", ["MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
                                 "MovingAveragePerChannelMinMaxObserver"])
def test_uncalibrated_observer_returns_defaults_with_a_warning_like_torch(cls):
    with pytest.warns(UserWarning, match="must run observer"):
        ours = getattr(robs, cls)().calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(tobs, cls)().calculate_qparams()
    assert_same_qparams(ours, theirs, f"{cls} uncalibrated")


def test_empty_batch_is_a_no_op(rng):
    for cls in ("MinMaxObserver", "PerChannelMinMaxObserver"):
        ours = getattr(robs, cls)()
        x = batch(rng, "normal", (3, 4))
        ours(x)
        before = ours.calculate_qparams()
        ours(np.zeros((3, 0), np.float32))
        after = ours.calculate_qparams()
        assert_same(after[0], before[0], "scale after empty batch")


# ----------------------------------------------------------------------------------------------------------
# golden values and properties


def test_golden_fbgemm_activation_qparams():
    """quint8, reduce_range (the fbgemm activation setting): range [-1, 3] -> quant range [0, 127];
    scale = f32(4 / 127) = 0.031496063; zero_point = 0 - round(-1 / scale) = round(31.75) = 32."""
    obs = robs.MinMaxObserver(dtype="quint8", reduce_range=True)
    obs(np.float32([-1.0, 3.0, 0.5]))
    scale, zp = obs.calculate_qparams()
    assert scale.tolist() == [float(np.float32(4.0) / np.float32(127))] and zp.tolist() == [32]
    assert (scale.dtype, zp.dtype, scale.shape) == (np.float32, np.int32, (1,))


def test_golden_symmetric_weight_qparams():
    """qint8 per-channel symmetric (fbgemm's weights): scale = amax / 127.5, zero point 0 (int64)."""
    obs = robs.PerChannelMinMaxObserver(dtype="qint8", qscheme="per_channel_symmetric")
    obs(np.float32([[-2.0, 1.0], [0.5, 0.25], [0.0, 0.0]]))
    scale, zp = obs.calculate_qparams()
    eps = np.finfo(np.float32).eps
    assert scale.tolist() == [float(np.float32(2) / np.float32(127.5)), float(np.float32(0.5) / np.float32(127.5)),
                              float(np.float32(eps))]  # an all-zero channel gets scale eps
    assert zp.tolist() == [0, 0, 0] and zp.dtype == np.int64


def test_golden_quint8_symmetric_zero_point_is_128():
    obs = robs.MinMaxObserver(dtype="quint8", qscheme="per_tensor_symmetric")
    obs(np.float32([-1.0, 2.0]))
    assert obs.calculate_qparams()[1].tolist() == [128]
    custom = robs.MinMaxObserver(dtype="quint8", qscheme="per_tensor_symmetric", quant_min=0, quant_max=15)
    custom(np.float32([-1.0, 2.0]))
    assert custom.calculate_qparams()[1].tolist() == [7]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40),
       st.sampled_from(["per_tensor_affine", "per_tensor_symmetric"]), st.booleans())
def test_zero_is_exactly_representable(values, qscheme, reduce_range):
    """Whatever the range, 0.0 quantizes to the zero point and back to 0.0 exactly (padding stays exact)."""
    if reduce_range and qscheme == "per_tensor_symmetric":
        reduce_range = False
    obs = robs.MinMaxObserver(dtype="quint8", qscheme=qscheme, reduce_range=reduce_range)
    obs(np.float32(values))
    scale, zp = obs.calculate_qparams()
    q0 = quantize_per_tensor(np.float32([0.0]), scale, zp, "quint8")
    assert q0.tolist() == zp.tolist()
    assert dequantize(q0, scale, zp).tolist() == [0.0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_minmax_does_not_depend_on_batch_order(batches, random):
    shuffled = list(batches)
    random.shuffle(shuffled)
    a, b = robs.MinMaxObserver(), robs.MinMaxObserver()
    for x in batches:
        a(np.float32(x))
    for x in shuffled:
        b(np.float32(x))
    assert_same(a.calculate_qparams()[0], b.calculate_qparams()[0], "scale")
    assert_same(a.calculate_qparams()[1], b.calculate_qparams()[1], "zero_point")


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("make, exc, words", [
    (lambda: robs.MinMaxObserver(dtype="uint8"), ValueError, ["dtype", "uint8"]),
    (lambda: robs.MinMaxObserver(qscheme="per_channel_affine"), NotImplementedError, ["qscheme"]),
    (lambda: robs.MinMaxObserver(qscheme="affine"), NotImplementedError, ["qscheme", "affine"]),
    (lambda: robs.PerChannelMinMaxObserver(qscheme="per_tensor_affine"), NotImplementedError, ["qscheme"]),
    (lambda: robs.MinMaxObserver(qscheme="per_tensor_symmetric", reduce_range=True), NotImplementedError,
     ["reduce range", "quint8"]),
    (lambda: robs.MinMaxObserver(quant_min=0), ValueError, ["quant_min", "quant_max", "together"]),
    (lambda: robs.MinMaxObserver(quant_min=1, quant_max=10), ValueError, ["include 0"]),
    (lambda: robs.MinMaxObserver(quant_min=0, quant_max=300), ValueError, ["quint8", "300"]),
    (lambda: robs.MinMaxObserver(dtype="qint8", quant_min=-200, quant_max=10), ValueError, ["qint8", "-200"]),
    (lambda: robs.MinMaxObserver(eps=0.0), ValueError, ["eps"]),
    (lambda: robs.PerChannelMinMaxObserver(ch_axis=1.5), TypeError, ["ch_axis"]),
    (lambda: robs.MovingAverageMinMaxObserver(averaging_constant=float("nan")), ValueError, ["averaging_constant"]),
])
def test_bad_settings_are_refused(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("cls", ["MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
                                 "MovingAveragePerChannelMinMaxObserver"])
def test_symmetric_quint8_reduce_range_is_refused_by_both(cls):
    """The MinMax family refuses quint8 + symmetric + reduce_range in its own __init__, in torch as in refquant
    (HistogramObserver accepts it: tests/test_histogram_parity.py)."""
    qscheme = "per_channel_symmetric" if "PerChannel" in cls else "per_tensor_symmetric"
    with pytest.raises(NotImplementedError, match="Cannot reduce range for symmetric quantization for quint8"):
        getattr(robs, cls)(dtype="quint8", qscheme=qscheme, reduce_range=True)
    with pytest.raises(NotImplementedError, match="Cannot reduce range for symmetric"):
        getattr(tobs, cls)(dtype=torch.quint8, qscheme=TORCH_QSCHEME[qscheme], reduce_range=True)
    getattr(robs, cls)(dtype="qint8", qscheme=qscheme, reduce_range=True)  # qint8 is fine in both
    getattr(tobs, cls)(dtype=torch.qint8, qscheme=TORCH_QSCHEME[qscheme], reduce_range=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls", ["MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
                                 "MovingAveragePerChannelMinMaxObserver"])
def test_non_finite_batches_are_refused(cls, bad):
    """torch would record NaN/inf and return a NaN or inf scale; refquant says what is wrong instead."""
    obs = getattr(robs, cls)()
    with pytest.raises(ValueError, match="non-finite"):
        obs(np.float32([[1.0, bad], [0.0, 2.0]]))


def test_other_bad_batches():
    with pytest.raises(TypeError, match="x must be a real-valued array"):
        robs.MinMaxObserver()(np.array(["a"]))
    with pytest.raises(ValueError, match="at least 2 dimensions"):  # torch: "Dimension out of range"
        robs.PerChannelMinMaxObserver()(np.float32([1.0, 2.0]))
    obs = robs.PerChannelMinMaxObserver()
    obs(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="x has 4 channels .* recorded 3"):
        obs(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="ch_axis=2 is out of range"):
        robs.PerChannelMinMaxObserver(ch_axis=2)(np.zeros((3, 2), np.float32))


def test_import_refquant_without_torch():
    """refquant never imports torch: import every module with torch made unimportable."""
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import refquant\n"
        "for m in pkgutil.iter_modules(refquant.__path__):\n"
        "    importlib.import_module('refquant.' + m.name)\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
