"""refquant.pipeline.ObservedLinear(engine=...) against torch's eager flow on every engine, live: prepare with
get_default_qconfig(engine), calibrate, convert and run with torch.backends.quantized.engine = engine. refquant's
observers come from refquant.qconfig and see the activations torch's observers saw (the float Linear's summation
order is not quantization arithmetic, docs/numerics.md §8); everything after must agree bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, prepare

from parity import assert_same
from refquant.pipeline import ObservedLinear
from torch_engines import onednn_family_from_verbose, quantized_engine, torch_fbgemm_kernel_family, torch_threads

# fbgemm/x86 results follow the kernel family crosscheck.isa probes; .ci/run reruns these under
# FBGEMM_ENABLE_INSTRUCTIONS=AVX2
pytestmark = pytest.mark.isa


class Model(nn.Module):
    def __init__(self, K: int, N: int, bias: bool, relu: bool):
        super().__init__()
        self.quant, self.fc, self.dequant = QuantStub(), nn.Linear(K, N, bias=bias), DeQuantStub()
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.dequant(self.relu(self.fc(self.quant(x))))


def torch_flow(engine, weight, bias, batches, relu):
    """torch's eager flow; the converted model and what its two activation observers saw."""
    N, K = weight.shape
    m = Model(K, N, bias is not None, relu).eval()
    with torch.no_grad():
        m.fc.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            m.fc.bias.copy_(torch.from_numpy(bias))
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.qconfig = torch.ao.quantization.get_default_qconfig(engine)
        p = prepare(fuse_modules(m, [["fc", "relu"]]) if relu else m)
        seen_in, seen_out = [], []
        p.quant.activation_post_process.register_forward_pre_hook(lambda mod, a: seen_in.append(a[0].numpy().copy()))
        p.fc.activation_post_process.register_forward_pre_hook(lambda mod, a: seen_out.append(a[0].numpy().copy()))
        with torch.no_grad():
            for x in batches:
                p(torch.from_numpy(x))
        return convert(p), seen_in, seen_out


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack", "onednn"])
@pytest.mark.parametrize("relu, bias", [(False, True), (True, False), (True, True)])
def test_pipeline_per_engine_matches_torch(rng, capfd, engine, relu, bias):
    K, N = int(rng.integers(1, 60)), int(rng.integers(1, 20))
    weight = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = (rng.standard_normal(N) * 0.1).astype(np.float32) if bias else None
    calib = [rng.standard_normal((int(rng.integers(1, 9)), K)).astype(np.float32) for _ in range(3)]
    q, seen_in, seen_out = torch_flow(engine, weight, b, calib, relu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onednn's non-VNNI qconfig warning
        observed = ObservedLinear(weight, b, relu=relu, engine=engine)
    assert observed.input_observer.reduce_range == (engine in ("fbgemm", "x86"))
    for x in seen_in:
        observed.observe_input(x)
    for y in seen_out:
        observed.observe_output(y)
    x = np.concatenate([*calib, rng.standard_normal((20, K)).astype(np.float32) * 2])
    with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = q.quant(torch.from_numpy(x))
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            qy = q.fc(qx)
        y_t = q.dequant(qy).numpy()
    family = onednn_family_from_verbose(capfd.readouterr().out) if engine == "onednn" else None
    kernel, _, pairs = (family or "brgemm").partition("+")
    saturate = bool(pairs) or (engine in ("fbgemm", "x86") and torch_fbgemm_kernel_family() == "avx2")
    model = observed.convert(saturate_int16_pairs=saturate, onednn_kernel=kernel)
    what = f"{engine}, K={K}, N={N}, relu={relu}, bias={bias}, kernel {family}"
    assert_same(np.array([model.input_scale], np.float32), q.quant.scale.numpy(), f"{what}: input scale")
    assert model.input_zero_point == int(q.quant.zero_point)
    assert_same(np.float64(model.output_scale), np.float64(q.fc.scale), f"{what}: output scale")
    assert model.output_zero_point == q.fc.zero_point
    w = q.fc.weight()
    assert_same(model.linear.weight_int8, w.int_repr().numpy(), f"{what}: int8 weight")
    if engine == "qnnpack":
        assert model.linear.weight_qscheme == "per_tensor_symmetric"
        assert_same(model.linear.weight_scales_f64, np.array([w.q_scale()]), f"{what}: weight scale")
    else:
        assert_same(model.linear.weight_scales_f64, w.q_per_channel_scales().numpy(), f"{what}: weight scales")
    stages = model.stages(x)
    assert_same(stages["input_codes"], qx.int_repr().numpy(), f"{what}: input codes")
    assert_same(stages["output_codes"], qy.int_repr().numpy(), f"{what}: output codes")
    assert_same(model(x), y_t, f"{what}: float output")
