"""refquant.pipeline: the whole eager model (QuantStub -> Linear [ReLU] -> DeQuantStub, prepare, calibrate, convert)
against torch's, run live here with the test's own torch code (independent of crosscheck)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, get_default_qconfig, prepare

from parity import assert_same
from refquant.pipeline import ObservedLinear, QuantizedLinearModel, linear_float


class Model(nn.Module):
    def __init__(self, K: int, N: int, bias: bool, relu: bool):
        super().__init__()
        self.quant, self.fc, self.dequant = QuantStub(), nn.Linear(K, N, bias=bias), DeQuantStub()
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.dequant(self.relu(self.fc(self.quant(x))))


def data(rng: np.random.Generator, dist: str, shape: tuple[int, ...]) -> np.ndarray:
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-3, 3, shape)
    elif dist == "laplace":
        x = rng.laplace(0, 1, shape)
    elif dist == "outliers":
        x = rng.standard_normal(shape) * np.where(rng.random(shape) < 0.02, 30.0, 1.0)
    elif dist == "relu":
        x = np.maximum(rng.standard_normal(shape), 0)
    elif dist == "tiny":
        x = rng.standard_normal(shape) * 1e-6
    elif dist == "positive":
        x = rng.uniform(0.5, 4.0, shape)
    else:
        raise ValueError(dist)
    return x.astype(np.float32)


def torch_study(weight, bias, batches, relu: bool, engine: str):
    """torch's eager flow; returns the converted model and what its two activation observers saw."""
    torch.backends.quantized.engine = engine
    N, K = weight.shape
    m = Model(K, N, bias is not None, relu).eval()
    with torch.no_grad():
        m.fc.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            m.fc.bias.copy_(torch.from_numpy(bias))
    m.qconfig = get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(fuse_modules(m, [["fc", "relu"]]) if relu else m)
        seen_in, seen_out = [], []
        p.quant.activation_post_process.register_forward_pre_hook(lambda mod, a: seen_in.append(a[0].numpy().copy()))
        p.fc.activation_post_process.register_forward_pre_hook(lambda mod, a: seen_out.append(a[0].numpy().copy()))
        with torch.no_grad():
            for x in batches:
                p(torch.from_numpy(x))
        q = convert(p)
    return q, seen_in, seen_out


def torch_forward(q, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = q.quant(torch.from_numpy(x))
        qy = q.fc(qx)
        return {"input_codes": qx.int_repr().numpy(), "output_codes": qy.int_repr().numpy(),
                "output": q.dequant(qy).numpy()}


def check_against_torch(model: QuantizedLinearModel, q, x: np.ndarray, what: str) -> None:
    """Every stored value and stage of refquant's converted model equals torch's; the quantized Linear sums as this
    process's fbgemm kernels do (codes above 127 can saturate int16 pairs on the pre-VNNI kernels, crosscheck.isa)."""
    from crosscheck.isa import saturate_int16_pairs, torch_fbgemm_kernel_family

    model.linear.saturate_int16_pairs = saturate_int16_pairs(torch_fbgemm_kernel_family())
    assert_same(np.array([model.input_scale], np.float32), q.quant.scale.numpy(), f"{what}: input scale")
    assert model.input_zero_point == int(q.quant.zero_point)
    assert_same(np.float64(model.output_scale), np.float64(q.fc.scale), f"{what}: output scale")
    assert model.output_zero_point == q.fc.zero_point
    w = q.fc.weight()
    assert_same(model.linear.weight_int8, w.int_repr().numpy(), f"{what}: int8 weight")
    assert_same(model.linear.weight_scales.astype(np.float64), w.q_per_channel_scales().numpy(), f"{what}: w scales")
    t = torch_forward(q, x)
    r = model.stages(x)
    for key in ("input_codes", "output_codes", "output"):
        assert_same(r[key], t[key], f"{what}: {key}")
    assert_same(model(x), t["output"], f"{what}: model(x)")


CASES = [  # (K, N, batch shape, calibration batches, dist, relu, bias, engine)
    (3, 3, (1, 2, 3), 1, "normal", False, True, "fbgemm"),  # the seed study's shapes
    (3, 3, (1, 2, 3), 1, "normal", True, True, "fbgemm"),
    (8, 4, (5, 8), 3, "uniform", False, False, "x86"),
    (16, 7, (2, 3, 16), 2, "laplace", True, False, "x86"),
    (32, 5, (6, 32), 4, "outliers", False, True, "fbgemm"),
    (5, 6, (4, 5), 2, "relu", True, True, "fbgemm"),
    (4, 2, (3, 4), 1, "tiny", False, True, "x86"),
    (6, 3, (7, 6), 2, "positive", False, True, "fbgemm"),
    (1, 1, (1, 1), 1, "normal", False, True, "fbgemm"),
    (200, 12, (9, 200), 2, "normal", False, True, "x86"),
]


@pytest.mark.isa
@pytest.mark.parametrize("K, N, shape, batches, dist, relu, bias, engine", CASES)
def test_pipeline_fed_torchs_activations_matches_torch(rng, K, N, shape, batches, dist, relu, bias, engine):
    weight = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) * np.float32(0.1) if bias else None
    calib = [data(rng, dist, shape) for _ in range(batches)]
    q, seen_in, seen_out = torch_study(weight, b, calib, relu, engine)
    observed = ObservedLinear(weight, b, relu=relu)
    for x in seen_in:
        observed.observe_input(x)
    for y in seen_out:
        observed.observe_output(y)
    model = observed.convert()
    fresh = data(rng, dist, (50, *shape[1:]))
    check_against_torch(model, q, np.concatenate([*calib, fresh]), f"K={K} N={N} {dist} relu={relu} {engine}")


def test_torch_fused_linear_relu_observes_each_batch_twice_and_calibrate_does_too(rng):
    """torch's prepared LinearReLU is an nn.Sequential: its forward runs the attached observer as a child, then
    prepare's forward hook calls it again. refquant's calibrate() mirrors it, so the histograms agree."""
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    x = data(rng, "normal", (5, 6))
    q, seen_in, seen_out = torch_study(weight, bias, [x], relu=True, engine="fbgemm")
    assert len(seen_in) == 1 and len(seen_out) == 2
    assert_same(seen_out[0], seen_out[1], "the two observations")
    observed = ObservedLinear(weight, bias, relu=True)
    observed.calibrate(x)
    once = ObservedLinear(weight, bias, relu=True)
    once.observe_output(linear_float(x, weight, bias, relu=True))
    assert_same(observed.output_observer.histogram, once.output_observer.histogram * np.float32(2), "doubled counts")


@pytest.mark.isa
def test_calibrate_with_own_float_forward_matches_torch_when_the_floats_agree(rng):
    """When NumPy's float Linear gives torch's bits (checked here), refquant calibrated on its own reproduces torch.
    Where the floats differ, qparams may differ (docs/numerics.md §8): crosscheck reports that separately."""
    for _ in range(20):
        weight = rng.standard_normal((3, 3)).astype(np.float32)
        bias = rng.standard_normal(3).astype(np.float32)
        x = data(rng, "normal", (1, 3))
        q, seen_in, seen_out = torch_study(weight, bias, [x], relu=False, engine="fbgemm")
        own = linear_float(x, weight, bias)
        if np.array_equal(own.view(np.uint32), seen_out[0].view(np.uint32)):
            observed = ObservedLinear(weight, bias)
            observed.calibrate(x)
            check_against_torch(observed.convert(), q, x, "own float forward")
            return
    pytest.fail("NumPy's float Linear never matched torch's in 20 tries; expected it to, most of the time")


def test_linear_float_is_float32_matmul_plus_bias_then_relu():
    x = np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32)
    w = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    b = np.array([0.125, -10.0], np.float32)
    y = linear_float(x, w, b)
    assert y.dtype == np.float32
    assert y.tolist() == [[0.5 - 2.0 + 0.125, 2.0 + 0.5 - 10.0], [-1.5 - 0.5 + 0.125, -6.0 + 0.125 - 10.0]]
    assert linear_float(x, w, b, relu=True).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert linear_float(x, w, None).tolist() == [[-1.5, 2.5], [-2.0, -5.875]]


def test_stages_are_consistent_with_the_linear_layer(rng):
    weight = rng.standard_normal((5, 7)).astype(np.float32)
    observed = ObservedLinear(weight, None)
    x = data(rng, "normal", (4, 7))
    observed.calibrate(x)
    model = observed.convert()
    s = model.stages(x)
    assert s["input_codes"].dtype == np.uint8 and s["accumulators"].dtype == np.int32
    assert_same(model.linear.requantize(s["accumulators"]), s["output_codes"], "requantize(accumulate)")
    assert_same(model.linear(s["input_codes"]), s["output_codes"], "linear(codes)")
    assert_same(model.dequant(s["output_codes"]), s["output"], "dequant")


def test_uncalibrated_convert_warns_and_uses_scale_1_zero_point_0_like_torch():
    weight = np.eye(2, dtype=np.float32)
    with pytest.warns(UserWarning, match="must run observer before calling calculate_qparams"):
        model = ObservedLinear(weight, None).convert()
    assert (float(model.input_scale), model.input_zero_point, model.output_scale, model.output_zero_point) == \
        (1.0, 0, 1.0, 0)


@pytest.mark.parametrize("weight, bias, error, message", [
    (np.ones((2, 2), np.float64), None, TypeError, "weight must be a float32 NumPy array"),
    ([[1.0]], None, TypeError, "weight must be a float32 NumPy array (out_features, in_features), got list"),
    (np.ones(3, np.float32), None, ValueError, "weight must be 2-D"),
    (np.ones((2, 3), np.float32), np.ones(3, np.float32), ValueError, r"bias must have shape \(out_features,\) = "),
    (np.ones((2, 3), np.float32), np.ones(2, np.float64), TypeError, "bias must be None or a float32"),
])
def test_bad_weight_or_bias_is_refused_with_a_message(weight, bias, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)") if error is TypeError
                       else message):
        ObservedLinear(weight, bias)


def test_pipeline_does_not_import_torch():
    code = "import sys, refquant.pipeline; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
