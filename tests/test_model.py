"""refquant.model against torch's eager flow on random models, run live, plus its own rules.

For every random model (tests/torch_models.py: depth, widths, fusion, residual add / add_relu / mul, cat, ReLU
placement, Flatten of 3-D input, Dropout / Identity, nested Sequentials, a Linear called twice), torch fuses,
prepares with the fbgemm qconfig, calibrates and converts. Then

(a) refquant's mirror -- ``from_torch(float model)``, ``prepare``, every observer fed what torch's saw, ``convert``
    -- reproduces every observer's histogram, range and qparams, every Linear's integers, and on fresh inputs every
    call's output codes and qparams, every Linear's int32 accumulators and the float output, bit for bit;
(b) ``from_torch(converted model)`` reproduces the same, without calibrating.
"""

from __future__ import annotations

import types
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from crosscheck.from_torch import from_torch
from parity import assert_same
from refquant import functional as F
from refquant import model as rm
from refquant.histogram import HistogramObserver
from refquant.pipeline import linear_float
from refquant.observers import MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver
from torch_models import quantize_with_torch, random_batch, random_model, torch_accumulators, torch_calls
from torch_models import needs_avx2_kernels, power_of_two_qparams, torch_engine, torch_saturates_int16_pairs

SATURATES = torch_saturates_int16_pairs()
COUNTS: Counter = Counter()


def compare_with_torch(qm: rm.QuantizedModel, converted: torch.nn.Module, x: np.ndarray, what: str) -> None:
    """Every call's output (codes or floats) and qparams, every Linear's accumulators, the model's output."""
    y_torch, calls = torch_calls(converted, x)
    traces = qm.trace(x)
    index: Counter = Counter()
    for name, tr in traces.items():
        index[tr.module] += 1
        theirs = calls[tr.module][index[tr.module] - 1]
        assert_same(tr.output, theirs.output, f"{what}: {name} output")
        assert tr.output_qparams == theirs.qparams, f"{what}: {name} qparams {tr.output_qparams} != {theirs.qparams}"
        COUNTS["values"] += tr.output.size
        if tr.accumulators is not None:
            linear = converted.get_submodule(tr.module)
            expected = torch_accumulators(linear, theirs.input_codes, tr.input_qparams[0][1], SATURATES)
            assert_same(tr.accumulators, expected, f"{what}: {name} int32 accumulators")
            COUNTS["values"] += tr.accumulators.size
    assert [len(v) for v in calls.values()] and sum(index.values()) == len(traces)
    assert_same(qm(x), y_torch, f"{what}: model output")
    COUNTS["values"] += y_torch.size


def compare_converted_modules(qm: rm.QuantizedModel, converted: torch.nn.Module, what: str) -> None:
    """The integers convert stored: every Linear's int8 weight, scales, zero points, bias and output qparams,
    every Quantize's and QFunctional's (scale, zero_point)."""
    for path, mod in qm.modules.items():
        theirs = converted.get_submodule(path)
        if isinstance(mod, rm.ConvertedLinear):
            w = theirs.weight()
            assert_same(mod.weight_int8, w.int_repr().numpy(), f"{what}: {path} int8 weight")
            assert_same(np.asarray(mod.weight_scales, np.float64), w.q_per_channel_scales().numpy(),
                        f"{what}: {path} weight scales")
            assert_same(np.asarray(mod.weight_zero_points, np.int64), w.q_per_channel_zero_points().numpy(),
                        f"{what}: {path} weight zero points")
            bias = theirs.bias()
            assert (mod.bias is None) == (bias is None)
            if bias is not None:
                assert_same(mod.bias, bias.detach().numpy(), f"{what}: {path} bias")
            assert (mod.scale, mod.zero_point) == (theirs.scale, theirs.zero_point)
            COUNTS["linears"] += 1
            COUNTS["values"] += 2 * mod.weight_int8.size
        elif isinstance(mod, rm.Quantize):
            assert (mod.scale, mod.zero_point) == (float(theirs.scale), int(theirs.zero_point)), f"{what}: {path}"
        elif isinstance(mod, rm.QFunctional):
            assert (mod.scale, mod.zero_point) == (theirs.scale, theirs.zero_point), f"{what}: {path}"
            COUNTS["functionals"] += 1


def compare_observers(observed: rm.ObservedModel, torch_observers: dict, what: str) -> None:
    assert set(observed.observers) == set(torch_observers), f"{what}: observers at different paths"
    for path, ours in observed.observers.items():
        theirs = torch_observers[path]
        assert_same(ours.histogram, theirs.histogram.numpy(), f"{what}: {path} histogram")
        # + 0.0 makes -0.0 into +0.0: the sign of a zero min/max is unspecified in torch too (its aminmax answer
        # depends on its thread count) and changes no bin, scale or zero point (refquant.histogram's docstring)
        zero = np.float32(0)
        assert_same(np.asarray(ours.min_val) + zero, theirs.min_val.numpy() + zero, f"{what}: {path} min_val")
        assert_same(np.asarray(ours.max_val) + zero, theirs.max_val.numpy() + zero, f"{what}: {path} max_val")
        COUNTS["values"] += ours.histogram.size + 2


def run_random_model(rng: np.random.Generator, engine: str = "fbgemm") -> None:
    spec = random_model(rng)
    what = f"{spec.text} [{engine}]"
    calibration = [random_batch(rng, int(rng.integers(1, 17)), spec.input_shape) for _ in range(rng.integers(1, 4))]
    run = quantize_with_torch(spec.model, calibration, engine)
    fresh = [random_batch(rng, int(rng.integers(1, 33)), spec.input_shape),
             random_batch(rng, 5, spec.input_shape, spread=4.0),  # beyond the calibrated ranges: codes up to 255
             calibration[0]]
    threads = torch.get_num_threads()

    # (a) refquant's mirror, calibrated from what torch's observers saw
    observed = rm.prepare(from_torch(run.float_model))
    for path, batches in run.observed.items():
        for x in batches:
            observed.observe(path, x)
    compare_observers(observed, run.observers, what)
    mirror = observed.convert(engine=engine, num_threads=threads, saturate_int16_pairs=SATURATES)
    compare_converted_modules(mirror, run.converted, what + " (mirror)")
    for x in fresh:
        compare_with_torch(mirror, run.converted, x, what + " (mirror)")

    # (b) torch's converted model read as it is
    read = from_torch(run.converted, engine=engine, saturate_int16_pairs=SATURATES)
    compare_converted_modules(read, run.converted, what + " (from_torch)")
    for x in fresh:
        compare_with_torch(read, run.converted, x, what + " (from_torch)")
    COUNTS["models"] += 1
    COUNTS["calls"] += len(read.steps)


@pytest.mark.isa
@needs_avx2_kernels
@pytest.mark.parametrize("i", range(12))
def test_random_model_matches_torch(rng, i):
    run_random_model(rng, engine="x86" if i % 3 == 2 else "fbgemm")


@pytest.mark.isa
@needs_avx2_kernels
@pytest.mark.slow
@pytest.mark.parametrize("i", range(300))
def test_random_model_matches_torch_many(rng, i):
    run_random_model(rng, engine="x86" if i % 3 == 2 else "fbgemm")


def run_tie_prone_model(rng: np.random.Generator) -> None:
    """(b) on a converted model whose output scales are powers of two (tests/torch_models.power_of_two_qparams)."""
    spec = random_model(rng)
    calibration = [random_batch(rng, int(rng.integers(1, 17)), spec.input_shape) for _ in range(2)]
    run = quantize_with_torch(spec.model, calibration)
    power_of_two_qparams(run.converted, rng)
    read = from_torch(run.converted, engine="fbgemm", saturate_int16_pairs=SATURATES)
    for x in (random_batch(rng, int(rng.integers(1, 33)), spec.input_shape), calibration[0]):
        compare_with_torch(read, run.converted, x, spec.text + " (power-of-two scales)")
    COUNTS["tie-prone models"] += 1


@pytest.mark.isa
@needs_avx2_kernels
@pytest.mark.parametrize("i", range(12))
def test_tie_prone_converted_model_matches_torch(rng, i):
    run_tie_prone_model(rng)


@pytest.mark.isa
@needs_avx2_kernels
@pytest.mark.slow
@pytest.mark.parametrize("i", range(300))
def test_tie_prone_converted_model_matches_torch_many(rng, i):
    run_tie_prone_model(rng)


def test_zz_report_counts():
    """Prints what the random-model tests of this run compared (run with -s); runs after them (file order)."""
    if not COUNTS["models"] + COUNTS["tie-prone models"]:
        pytest.skip("no random-model test ran in this session")
    print(f"\nrefquant.model vs torch: {COUNTS['models']} random models (+{COUNTS['tie-prone models']} with "
          f"power-of-two scales), {COUNTS['calls']} calls, {COUNTS['linears']} Linear weight sets, "
          f"{COUNTS['functionals']} functionals, {COUNTS['values']:,} values compared, 0 differing "
          f"(VNNI {'no' if SATURATES else 'yes'})")


# ----------------------------------------------------------------------------------------------------------------
# another qconfig: MinMax activations, per-tensor weights

class TorchQConfigs:
    @staticmethod
    def minmax_per_tensor():
        aq = torch.ao.quantization
        return aq.QConfig(activation=aq.MinMaxObserver.with_args(reduce_range=True),
                          weight=aq.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))


REFQUANT_MINMAX_PER_TENSOR = types.SimpleNamespace(
    activation=lambda: MinMaxObserver(dtype="quint8", qscheme="per_tensor_affine", reduce_range=True),
    weight=lambda: MinMaxObserver(dtype="qint8", qscheme="per_tensor_symmetric"))


@pytest.mark.isa
@needs_avx2_kernels
@pytest.mark.parametrize("i", range(4))
def test_other_qconfig_matches_torch(rng, i):
    """The qconfig is a parameter: MinMaxObserver(reduce_range) activations and per-tensor symmetric weights
    (per-tensor weights take fbgemm's FMA bias path, eq. L8c) give torch's integers too."""
    from torch.ao.quantization import convert, fuse_modules, prepare
    from torch_models import fusions

    spec = random_model(rng)
    calibration = [random_batch(rng, 8, spec.input_shape) for _ in range(2)]
    with torch_engine("fbgemm"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fuse_modules(spec.model, fusions(spec.model)) if fusions(spec.model) else spec.model
        fused.qconfig = TorchQConfigs.minmax_per_tensor()
        prepared = prepare(fused)
        with torch.no_grad():
            for x in calibration:
                prepared(torch.from_numpy(x))
        converted = convert(prepared)
    observed = rm.prepare(from_torch(fused), REFQUANT_MINMAX_PER_TENSOR)
    assert observed.weight_qscheme == "per_tensor_symmetric"
    for x in calibration:  # only the QuantStub's observer is sure to see torch's exact floats this way ...
        observed.calibrate(x)
    read = from_torch(converted, engine="fbgemm", saturate_int16_pairs=SATURATES)
    for path, mod in read.modules.items():
        if isinstance(mod, rm.ConvertedLinear):
            assert mod.weight_qscheme == "per_tensor_affine" and mod.weight_scales.shape == (1,)
    x = random_batch(rng, 9, spec.input_shape, spread=2.0)
    compare_with_torch(read, converted, x, spec.text + " (per-tensor weights)")
    mirror = observed.convert(saturate_int16_pairs=SATURATES)
    assert mirror.qparams["quant"] == read.qparams["quant"]  # ... and it does: no float op before it
    for path, mod in mirror.modules.items():  # the weights never depend on calibration
        if isinstance(mod, rm.ConvertedLinear):
            assert_same(mod.weight_int8, read.modules[path].weight_int8, f"{path} per-tensor int8 weight")


def test_own_float_calibration_is_reported_not_claimed(rng):
    """refquant's own float forward (NumPy's Linear, not MKL's) calibrates too; its QuantStub observer sees exactly
    torch's input, so that (scale, zero_point) is torch's; the others are usually, not necessarily, the same."""
    spec = random_model(rng)
    calibration = [random_batch(rng, 8, spec.input_shape) for _ in range(2)]
    run = quantize_with_torch(spec.model, calibration)
    observed = rm.prepare(from_torch(run.float_model))
    for x in calibration:
        y = observed.calibrate(x)
        assert y.dtype == np.float32
    read = from_torch(run.converted, engine="fbgemm")
    assert observed.qparams()["quant"] == read.qparams["quant"]
    same = sum(observed.qparams()[p] == read.qparams[p] for p in read.qparams)
    print(f"\nown float calibration: {same} of {len(read.qparams)} qparams equal torch's ({spec.text})")


# ----------------------------------------------------------------------------------------------------------------
# refquant's own rules (no torch)

def small_float_model(relu: bool = False) -> rm.FloatModel:
    w = np.array([[0.5, -1.0], [0.25, 0.75]], np.float32)
    return rm.FloatModel.sequential({"quant": rm.QuantStub(), "fc": rm.Linear(w, np.zeros(2, np.float32), relu),
                                     "dequant": rm.DeQuantStub()})


def test_sequential_prepare_calibrate_convert_trace(rng):
    model = small_float_model()
    observed = rm.prepare(model)
    assert sorted(observed.observers) == ["fc", "quant"]
    assert isinstance(observed.observers["quant"], HistogramObserver)
    x = rng.standard_normal((4, 2)).astype(np.float32)
    assert_same(observed.calibrate(x), model(x), "calibrate returns the float forward")
    qm = rm.convert(observed)
    traces = qm.trace(x)
    assert list(traces) == ["quant", "fc", "dequant"]
    assert traces["quant"].inputs[0] is x and traces["quant"].output.dtype == np.uint8
    assert traces["fc"].accumulators.dtype == np.int32 and traces["fc"].accumulators.shape == (4, 2)
    assert traces["fc"].input_qparams == [qm.qparams["quant"]] and traces["fc"].output_qparams == qm.qparams["fc"]
    assert_same(qm(x), traces["dequant"].output, "call == trace")
    ql = qm.layer("fc")
    assert_same(traces["fc"].output, ql.requantize(ql.accumulate(traces["quant"].output)), "fc's op")


def test_fused_linear_relu_observes_twice_and_a_shared_module_shares_one_observer(rng):
    """LinearReLU's observer sees each batch twice (the histogram counts double); a Linear called twice has one
    observer that sees both calls, and its calls are named fc, fc#2."""
    x = rng.standard_normal((5, 2)).astype(np.float32)
    fused = rm.prepare(small_float_model(relu=True))
    fused.calibrate(x)
    plain = rm.prepare(small_float_model(relu=True))
    plain.observe("fc", fused.model(x))
    assert_same(fused.observers["fc"].histogram, plain.observers["fc"].histogram * np.float32(2), "double counts")

    w = rng.standard_normal((2, 2)).astype(np.float32)
    calls = (rm.Call("quant", ("x",), "q"), rm.Call("fc", ("q",), "a"), rm.Call("fc", ("a",), "b"),
             rm.Call("dequant", ("b",), "y"))
    model = rm.FloatModel({"quant": rm.QuantStub(), "fc": rm.Linear(w), "dequant": rm.DeQuantStub()},
                          rm.Graph(("x",), calls, "y"))
    observed = rm.prepare(model)
    assert sorted(observed.observers) == ["fc", "quant"]
    seen = []
    observed.observers["fc"] = _Recorder(seen)
    observed.calibrate(x)
    assert len(seen) == 2
    assert_same(seen[1], linear_float(seen[0], w, None), "the second call sees the first call's output")
    assert model.graph.call_names() == ["quant", "fc", "fc#2", "dequant"]


class _Recorder:
    def __init__(self, seen):
        self.seen = seen

    def __call__(self, x):
        self.seen.append(x)
        return x


def test_functional_calls_and_num_threads(rng):
    """A residual add, add_relu, mul and cat built without torch; num_threads reaches the elementwise ops."""
    w = (rng.standard_normal((3, 3)) / 2).astype(np.float32)
    modules = {"quant": rm.QuantStub(), "fc": rm.Linear(w, None), "f": rm.FloatFunctional(),
               "g": rm.FloatFunctional(), "relu": rm.ReLU(), "dequant": rm.DeQuantStub()}
    calls = (rm.Call("quant", ("x",), "q"), rm.Call("fc", ("q",), "h"), rm.Call("f", ("q", "h"), "s", "add_relu"),
             rm.Call("relu", ("s",), "r"), rm.Call("g", ("r", "q"), "c", "cat", dim=-1),
             rm.Call("dequant", ("c",), "y"))
    model = rm.FloatModel(modules, rm.Graph(("x",), calls, "y"))
    observed = rm.prepare(model)
    x = rng.standard_normal((40000, 3)).astype(np.float32)
    observed.calibrate(x)
    qm1 = observed.convert(num_threads=1)
    qm2 = observed.convert(num_threads=2)
    assert qm1(x).shape == (40000, 6)
    for qm in (qm1, qm2):  # 120,000 elements: the thread split decides which ones the scalar lambda computes
        tr = qm.trace(x)
        q = F.QTensor(tr["quant"].output, *qm.qparams["quant"])
        h = F.QTensor(tr["fc"].output, *qm.qparams["fc"])
        expected = F.add_relu(q, h, *qm.qparams["f"], num_threads=qm.num_threads)
        assert_same(tr["f"].output, expected.codes, f"add_relu with num_threads={qm.num_threads}")
    assert qm1.qparams == qm2.qparams


@pytest.mark.parametrize("build, words", [
    (lambda: rm.FloatModel.sequential({"fc": rm.Linear(np.ones((2, 2), np.float32)), "dequant": rm.DeQuantStub()}),
     r"fc \(Linear\) receives a float tensor.*QuantStub"),
    (lambda: rm.FloatModel.sequential({"quant": rm.QuantStub(), "fc": rm.Linear(np.ones((2, 2), np.float32))}),
     "quantized tensor: add a DeQuantStub"),
    (lambda: rm.FloatModel.sequential({"quant": rm.QuantStub(), "quant2": rm.QuantStub(),
                                       "dequant": rm.DeQuantStub()}), r"quant2 \(QuantStub\) receives an already"),
    (lambda: rm.FloatModel({"quant": rm.QuantStub(), "f": rm.FloatFunctional(), "dequant": rm.DeQuantStub()},
                           rm.Graph(("x",), (rm.Call("quant", ("x",), "q"), rm.Call("f", ("q", "q"), "s", "sub"),
                                             rm.Call("dequant", ("s",), "y")), "y")),
     r"f \(FloatFunctional\) calls the unsupported method 'sub'"),
    (lambda: rm.FloatModel({"quant": rm.QuantStub(), "dequant": rm.DeQuantStub()},
                           rm.Graph(("x",), (rm.Call("quant", ("z",), "q"), rm.Call("dequant", ("q",), "y")), "y")),
     "uses the value 'z' before"),
])
def test_bad_models_give_one_clear_error(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_bad_arguments():
    model = small_float_model()
    with pytest.raises(TypeError, match="float32"):
        model(np.ones((1, 2)))  # float64
    with pytest.raises(TypeError, match="takes 1 input"):
        model(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="Linear weight"):
        rm.Linear(np.ones((2, 2)))
    with pytest.raises(ValueError, match="qconfig.weight"):
        rm.prepare(model, types.SimpleNamespace(activation=lambda: HistogramObserver(reduce_range=True),
                                                weight=lambda: PerChannelMinMaxObserver(dtype="qint8",
                                                                                        reduce_range=True)))
    with pytest.raises(ValueError, match="memoryless"):
        rm.prepare(model, types.SimpleNamespace(
            activation=lambda: MovingAverageMinMaxObserver(averaging_constant=1.0),
            weight=lambda: PerChannelMinMaxObserver(dtype="qint8", qscheme="per_channel_symmetric")))
    with pytest.raises(TypeError, match="qconfig"):
        rm.prepare(model, object())
    with pytest.raises(KeyError, match="no activation observer"):
        rm.prepare(model).observe("dequant", np.ones(2, np.float32))
    with pytest.raises(ValueError, match="engine"):
        rm.prepare(model).convert(engine="tensorrt")
