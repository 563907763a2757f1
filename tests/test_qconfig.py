"""refquant.qconfig against torch.ao.quantization.qconfig, live: each engine's default qconfig builds observers with
torch's settings, and those observers give torch's (scale, zero_point) bit for bit on the same data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from torch.ao.quantization import qconfig as torch_qconfig

from parity import assert_same
from refquant import qconfig as rq
from refquant.qconfig import PlaceholderObserver, get_default_qconfig

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
TORCH_QSCHEMES = {torch.per_tensor_affine: "per_tensor_affine", torch.per_tensor_symmetric: "per_tensor_symmetric",
                  torch.per_channel_affine: "per_channel_affine",
                  torch.per_channel_symmetric: "per_channel_symmetric"}
TORCH_DTYPES = {torch.quint8: "quint8", torch.qint8: "qint8", torch.qint32: "qint32", torch.float32: "float32"}


def torch_default_qconfig(engine: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onednn's non-VNNI warning, torch.ao deprecation
        return tq.get_default_qconfig(engine)


def assert_same_settings(mine, theirs, what: str) -> None:
    """dtype, qscheme, quant range, eps, reduce_range (and ch_axis, bins where they exist) as torch's observer."""
    assert type(mine).__name__ == type(theirs).__name__, f"{what}: {type(mine).__name__} vs {type(theirs).__name__}"
    assert mine.dtype == TORCH_DTYPES[theirs.dtype], f"{what}: dtype"
    assert mine.qscheme == TORCH_QSCHEMES[theirs.qscheme], f"{what}: qscheme"
    assert (mine.quant_min, mine.quant_max) == (theirs.quant_min, theirs.quant_max), f"{what}: quant range"
    assert_same(np.float32(mine.eps), np.float32(theirs.eps.item() if torch.is_tensor(theirs.eps) else theirs.eps),
                f"{what}: eps")
    if hasattr(theirs, "reduce_range"):
        assert mine.reduce_range == theirs.reduce_range, f"{what}: reduce_range"
    for attr in ("ch_axis", "bins"):
        if hasattr(theirs, attr):
            assert getattr(mine, attr) == getattr(theirs, attr), f"{what}: {attr}"


@pytest.mark.parametrize("engine", ENGINES)
def test_default_qconfig_observers_have_torchs_settings(engine):
    """Activation: HistogramObserver, reduce_range for fbgemm and x86 only; weight: per-channel symmetric qint8,
    per-tensor symmetric (MinMaxObserver) for qnnpack."""
    mine, theirs = _quiet(get_default_qconfig, engine), torch_default_qconfig(engine)
    assert_same_settings(mine.activation(), theirs.activation(), f"{engine} activation")
    assert_same_settings(mine.weight(), theirs.weight(), f"{engine} weight")


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.parametrize("engine", ENGINES)
def test_default_qconfig_observers_give_torchs_qparams(rng, engine):
    """Fresh observers from both qconfigs see the same batches; calculate_qparams agree bit for bit."""
    mine, theirs = _quiet(get_default_qconfig, engine), torch_default_qconfig(engine)
    for i in range(3):
        act_mine, act_theirs = mine.activation(), theirs.activation()
        for _ in range(2):
            x = (rng.standard_normal((4, 33)) * 10.0 ** rng.uniform(-2, 2) + rng.uniform(-1, 1)).astype(np.float32)
            act_mine(x)
            act_theirs(torch.from_numpy(x))
        s_t, z_t = act_theirs.calculate_qparams()
        s_m, z_m = act_mine.calculate_qparams()
        assert_same(s_m, s_t.numpy(), f"{engine} activation scale, case {i}")
        assert_same(z_m.astype(np.int64), z_t.numpy().astype(np.int64), f"{engine} activation zero point, case {i}")
        w = (rng.standard_normal((7, 19)) * 10.0 ** rng.uniform(-3, 1, (7, 1))).astype(np.float32)
        w_mine, w_theirs = mine.weight(), theirs.weight()
        w_mine(w)
        w_theirs(torch.from_numpy(w))
        s_t, z_t = w_theirs.calculate_qparams()
        s_m, z_m = w_mine.calculate_qparams()
        assert_same(s_m, s_t.numpy(), f"{engine} weight scales, case {i}")
        assert_same(z_m.astype(np.int64), z_t.numpy().astype(np.int64), f"{engine} weight zero points, case {i}")


@pytest.mark.parametrize("name", ["default_dynamic_qconfig", "per_channel_dynamic_qconfig"])
def test_dynamic_qconfigs(rng, name):
    """The dynamic qconfigs: a placeholder for the activation (quint8 over 0..255, dynamic; no qparams) and the
    per-tensor or per-channel symmetric qint8 weight observer, whose qparams are torch's."""
    mine, theirs = getattr(rq, name), getattr(torch_qconfig, name)
    act_mine, act_theirs = mine.activation(), theirs.activation()
    assert isinstance(act_mine, PlaceholderObserver) and type(act_theirs).__name__ == "PlaceholderObserver"
    assert act_mine.dtype == TORCH_DTYPES[act_theirs.dtype]
    assert (act_mine.quant_min, act_mine.quant_max) == (act_theirs.quant_min, act_theirs.quant_max) == (0, 255)
    assert act_mine.is_dynamic is act_theirs.is_dynamic is True
    assert act_mine.qscheme == TORCH_QSCHEMES[act_theirs.qscheme]
    x = np.ones(3, np.float32)
    assert act_mine(x) is x
    with pytest.raises(Exception, match="calculate_qparams should not be called for PlaceholderObserver"):
        act_mine.calculate_qparams()
    with pytest.raises(Exception, match="calculate_qparams should not be called for PlaceholderObserver"):
        act_theirs.calculate_qparams()
    w = (rng.standard_normal((5, 11)) * 10.0 ** rng.uniform(-3, 1, (5, 1))).astype(np.float32)
    w_mine, w_theirs = mine.weight(), theirs.weight()
    assert_same_settings(w_mine, w_theirs, f"{name} weight")
    w_mine(w)
    w_theirs(torch.from_numpy(w))
    assert_same(w_mine.calculate_qparams()[0], w_theirs.calculate_qparams()[0].numpy(), f"{name} weight scales")


def test_default_engine_argument_and_refusals():
    """torch's default backend is "x86"; an unknown backend or a version other than 0 is refused by both."""
    assert get_default_qconfig() is get_default_qconfig("x86")
    assert torch_default_qconfig("x86").activation().reduce_range is True
    with pytest.raises(ValueError, match="backend must be one of"):
        get_default_qconfig("tensorrt")
    with pytest.raises(AssertionError, match="not supported"):
        torch_default_qconfig("tensorrt")
    with pytest.raises(ValueError, match="version must be 0"):
        get_default_qconfig("fbgemm", version=1)
    with pytest.raises(AssertionError, match="Version number"):
        tq.get_default_qconfig("fbgemm", version=1)


def test_onednn_warning_follows_torchs_vnni_check():
    """get_default_qconfig("onednn") warns exactly when torch does: on a CPU without avx512_vnni."""
    with warnings.catch_warnings(record=True) as mine:
        warnings.simplefilter("always")
        get_default_qconfig("onednn")
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        tq.get_default_qconfig("onednn")
    warned_mine = any("Vector Neural Network Instruction" in str(w.message) for w in mine)
    warned_theirs = any("Vector Neural Network Instruction" in str(w.message) for w in theirs)
    assert warned_mine == warned_theirs == (not torch.cpu._is_vnni_supported())
