"""crosscheck.from_torch: what it reads from torch models, and the one clear error for a model it cannot read.

The random-model parity (from_torch(converted) reproduces torch bit for bit) is in tests/test_model.py.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

import crosscheck
from crosscheck.from_torch import from_torch
from parity import assert_same
from refquant import model as rm
from test_model import SATURATES, compare_with_torch
from torch_models import needs_avx2_kernels, torch_engine


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.fc, self.add, self.dequant = QuantStub(), nn.Linear(4, 4), FloatFunctional(), DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.add.add_relu(x, self.fc(x)))


def quantize(model: nn.Module, rng: np.random.Generator, shape=(8, 4), engine="fbgemm") -> nn.Module:
    with torch_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval().qconfig = get_default_qconfig(engine)
        prepared = prepare(model)
        with torch.no_grad():
            prepared(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
        return convert(prepared)


def test_exported_from_crosscheck():
    assert crosscheck.from_torch is from_torch


def test_float_model_is_read_with_its_weights(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    m = Residual().eval()
    fm = from_torch(m)
    assert isinstance(fm, rm.FloatModel)
    assert fm.graph.call_names() == ["quant", "fc", "add", "dequant"]
    assert fm.graph.calls[2].method == "add_relu" and fm.graph.calls[2].inputs == ("quant", "fc")
    assert_same(fm.modules["fc"].weight, m.fc.weight.detach().numpy(), "float weight")
    assert_same(fm.modules["fc"].bias, m.fc.bias.detach().numpy(), "float bias")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():  # an add after a Linear: NumPy and torch agree here up to the Linear's summation order
        np.testing.assert_allclose(fm(x), m(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)


@needs_avx2_kernels
def test_converted_model_is_read_without_calibrating(rng):
    q = quantize(Residual(), rng)
    qm = from_torch(q, engine="fbgemm")
    assert isinstance(qm, rm.QuantizedModel) and qm.engine == "fbgemm"
    assert qm.num_threads == torch.get_num_threads()
    assert qm.qparams["add"] == (q.add.scale, q.add.zero_point)
    assert qm.qparams["quant"] == (float(q.quant.scale), int(q.quant.zero_point))
    assert qm.layer("fc").input_scale == float(q.quant.scale)  # bound to its input's qparams
    for x in (rng.standard_normal((50, 4)), 5 * rng.standard_normal((3, 4))):
        compare_with_torch(from_torch(q, engine="fbgemm", saturate_int16_pairs=SATURATES), q, x.astype(np.float32), "residual")


@needs_avx2_kernels
def test_large_batch_crosses_the_thread_split(rng):
    """A residual add_relu of 48,000 elements: from 32,768 on torch splits it between its threads (eq. F0); the
    model's num_threads is torch's, so the outputs still agree bit for bit."""
    q = quantize(Residual(), rng)
    x = rng.standard_normal((12000, 4)).astype(np.float32)
    qm = from_torch(q, engine="fbgemm", saturate_int16_pairs=SATURATES)
    compare_with_torch(qm, q, x, "residual, 12000 x 4")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        compare_with_torch(from_torch(q, engine="fbgemm", saturate_int16_pairs=SATURATES), q, x, "residual, one thread")
    finally:
        torch.set_num_threads(saved)


class ChannelsLastMix(nn.Module):
    """A cat along dim 1 of (B, 1, H, W) tensors is channels-last in torch's memory; the adds after it see one
    operand of each layout (no vector lambda at all) and two channels-last operands (NHWC order)."""

    def __init__(self, w: int):
        super().__init__()
        self.quant, self.fc, self.fc2, self.dequant = QuantStub(), nn.Linear(w, w), nn.Linear(w, w), DeQuantStub()
        self.cat, self.mixed, self.both, self.cat2 = FloatFunctional(), FloatFunctional(), FloatFunctional(), \
            FloatFunctional()
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.quant(x)
        c = self.cat.cat([x, self.fc(x)], 1)          # (B, 2, H, W), channels-last
        m = self.mixed.add(c, self.fc2(c))            # channels-last + row-major
        b = self.both.add(m, self.relu(m))            # channels-last + channels-last
        return self.dequant(self.cat2.cat([b, c], 1))  # qcat_nhwc_kernel again, on channels-last inputs


@needs_avx2_kernels
def test_channels_last_layouts_through_a_model(rng):
    """Power-of-two scales and odd zero points put many sums on ties, where the layouts decide the codes."""
    from torch_models import power_of_two_qparams

    q = quantize(ChannelsLastMix(9), rng, shape=(16, 1, 3, 9))
    power_of_two_qparams(q, rng)
    for path in ("mixed", "both", "cat2"):
        q.get_submodule(path).zero_point = int(rng.integers(0, 128)) * 2 + 1
    qm = from_torch(q, engine="fbgemm", saturate_int16_pairs=SATURATES)
    for _ in range(3):
        compare_with_torch(qm, q, rng.standard_normal((32, 1, 3, 9)).astype(np.float32), "channels-last mix")


def test_engine_defaults_to_torchs_and_can_be_given(rng):
    q = quantize(Residual(), rng, engine="x86")
    with torch_engine("x86"):
        assert from_torch(q).engine == "x86"
    with torch_engine("fbgemm"):
        assert from_torch(q).engine == "fbgemm"
    assert from_torch(q, engine="x86").engine == "x86"
    with pytest.raises(ValueError, match="engine"):
        from_torch(q, engine="tensorrt")
    with pytest.raises(ValueError, match="engine"):
        from_torch(Residual(), engine="fbgemm")  # a float model has no engine yet


# ----------------------------------------------------------------------------------------------------------------
# one clear error naming the module (path and torch type)

class Wrap(nn.Module):
    """QuantStub -> body -> DeQuantStub, the body a torch module given by the test."""

    def __init__(self, body: nn.Module, quant: bool = True):
        super().__init__()
        self.quant = QuantStub() if quant else nn.Identity()
        self.body = body
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class CallsTorchRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class PlusOperator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class TensorMethod(nn.Module):
    def forward(self, x):
        return x.view(-1)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()

    def forward(self, x):
        x = self.dequant(self.quant(x))
        return x, x


class ScalarAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = FloatFunctional()

    def forward(self, x):
        return self.f.add_scalar(x, 1.0)


class MyLinear(nn.Linear):
    pass


class NoDequant(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.fc = QuantStub(), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.quant(x))


BAD_FLOAT_MODELS = [
    (lambda: Wrap(ControlFlow()), r"body \(ControlFlow\) has control flow"),
    (lambda: Wrap(nn.Conv2d(1, 1, 1)), r"body \(Conv2d\) is not a module refquant supports"),
    (lambda: Wrap(nn.LSTM(4, 4)), r"body \(LSTM\) is not a module refquant supports"),
    (lambda: Wrap(nn.Sigmoid()), r"body \(Sigmoid\) is not a module refquant supports"),
    (lambda: Wrap(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), r"body.1 \(Tanh\) is not a module"),
    (lambda: Wrap(nn.Linear(4, 4), quant=False), r"body \(Linear\) receives a float tensor.*QuantStub"),
    (lambda: Wrap(CallsTorchRelu()), r"body \(CallsTorchRelu\) calls the function 'relu'"),
    (lambda: Wrap(PlusOperator()), r"body \(PlusOperator\) calls the function 'add'"),
    (lambda: Wrap(TensorMethod()), r"body \(TensorMethod\) calls the tensor method 'view'"),
    (lambda: TwoOutputs(), r"the model \(TwoOutputs\) returns something other than one tensor"),
    (lambda: Wrap(ScalarAdd()), r"body.f \(FloatFunctional\) calls the unsupported method 'add_scalar'"),
    (lambda: Wrap(MyLinear(4, 4)), r"body \(MyLinear\) is not a module refquant supports.*subclass of Linear"),
    (lambda: Wrap(nn.Dropout(0.5)).train(), r"body \(Dropout\) is in training mode"),
    (lambda: NoDequant(), "quantized tensor: add a DeQuantStub"),
]


@pytest.mark.parametrize("build, words", BAD_FLOAT_MODELS)
def test_bad_float_model_gives_one_clear_error(build, words):
    model = build()
    if not isinstance(model, TwoOutputs) and not any(isinstance(m, nn.Dropout) for m in model.modules()):
        model.eval()
    with pytest.raises(ValueError, match=words):
        from_torch(model)


def test_bad_converted_models_give_one_clear_error(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU())).eval()
        m.qconfig = get_default_qconfig("fbgemm")
        prepared = prepare(m)
        with pytest.raises(ValueError, match=r"quant \(QuantStub\) carries an activation observer: this is a prepared"):
            from_torch(prepared)
        prepared(torch.randn(3, 4))
        q = convert(prepared)
    q.body.add_module("2", nn.Sigmoid())
    with pytest.raises(ValueError, match=r"body.2 \(Sigmoid\) is not a module"):
        from_torch(q, engine="fbgemm")
    q.body._modules.pop("2")
    q.quant = nn.Identity()  # the QuantStub's Quantize removed: the quantized Linear gets a float input
    with pytest.raises(ValueError, match=r"body.0 \(QuantizedLinear\) receives a float tensor.*QuantStub"):
        from_torch(q, engine="fbgemm")
    q.quant = QuantStub()  # a float QuantStub in a converted model
    with pytest.raises(ValueError, match=r"quant \(QuantStub\) is a float module in a converted model"):
        from_torch(q, engine="fbgemm")


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        from_torch(np.zeros(3))


# --------------------------------------------------------------------------------------------------------------
# deferred=True: the studies' torch worker reads a float model without importing refquant; the parent builds it
# --------------------------------------------------------------------------------------------------------------

def deferred_models():
    """Float models of every supported module kind (and a fused LinearReLU)."""
    torch.manual_seed(0)
    fused = torch.ao.quantization.fuse_modules(
        nn.Sequential(QuantStub(), nn.Linear(4, 3), nn.ReLU(), nn.Dropout(0.1), nn.Identity(), DeQuantStub()).eval(),
        [["1", "2"]])
    flat = nn.Sequential(QuantStub(), nn.Flatten(0, -1), nn.Linear(8, 2), DeQuantStub()).eval()
    return [Residual().eval(), fused, flat, Wrap(nn.Linear(4, 4)).eval()]


def same_float_model(a: rm.FloatModel, b: rm.FloatModel) -> None:
    assert repr(a) == repr(b) and a.graph == b.graph and a.domain == b.domain
    for path, mod in a.modules.items():
        other = b.modules[path]
        assert type(mod) is type(other), path
        for name, value in vars(mod).items():
            if isinstance(value, np.ndarray):
                assert_same(value, vars(other)[name], f"{path}.{name}")
            else:
                assert value == vars(other)[name], (path, name)


@pytest.mark.parametrize("index", range(4))
def test_a_deferred_read_builds_the_same_float_model(index):
    import pickle

    from crosscheck.from_torch import DeferredFloatModel, built_float_model

    model = deferred_models()[index]
    deferred = from_torch(model, deferred=True)
    assert isinstance(deferred, DeferredFloatModel)
    same_float_model(pickle.loads(pickle.dumps(deferred)).build(), from_torch(model))
    plain = from_torch(model)
    assert built_float_model(plain) is plain


@pytest.mark.parametrize("build, words", BAD_FLOAT_MODELS)
def test_a_deferred_read_of_a_bad_model_fails_with_the_same_error(build, words):
    """Each error either while reading (the torch side) or when the parent builds the model: the same message."""
    model = build()
    if not isinstance(model, TwoOutputs) and not any(isinstance(m, nn.Dropout) for m in model.modules()):
        model.eval()
    with pytest.raises(ValueError) as direct:
        from_torch(model)
    with pytest.raises(ValueError, match=words) as deferred:
        from_torch(model, deferred=True).build()
    assert type(deferred.value) is type(direct.value) and str(deferred.value) == str(direct.value)


def test_a_deferred_read_imports_no_refquant(tmp_path):
    import subprocess
    import sys

    script = (
        "import pickle, sys\n"
        "sys.modules['refquant'] = None  # any import of refquant fails\n"
        "import torch\n"
        "from torch import nn\n"
        "from torch.ao.quantization import DeQuantStub, QuantStub\n"
        "from crosscheck.from_torch import from_torch\n"
        "m = nn.Sequential(QuantStub(), nn.Linear(4, 3), nn.ReLU(), DeQuantStub()).eval()\n"
        "d = from_torch(m, deferred=True)\n"
        "sys.stdout.write(str(len(pickle.dumps(d))) + ' ' + str(sorted(d.modules)))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(" ", 1)[1] == "['0', '1', '2', '3']"
