"""Each engine's default qconfig: which observer watches the activations and which watches the weights.

A qconfig is a pair of observer factories, ``QConfig(activation, weight)``; ``prepare`` calls ``activation()`` for
every activation it observes (the QuantStub's input, each Linear's output) and ``convert`` calls ``weight()`` once
per weight. torch builds the factories with ``Observer.with_args(...)``; refquant with ``functools.partial``.
``get_default_qconfig(engine)`` (torch's default engine argument is ``"x86"``)::

    engine          activation                              weight
    fbgemm, x86     HistogramObserver(reduce_range=True)    PerChannelMinMaxObserver(qint8, per_channel_symmetric)
    qnnpack         HistogramObserver(reduce_range=False)   MinMaxObserver(qint8, per_tensor_symmetric)
    onednn          HistogramObserver(reduce_range=False)   PerChannelMinMaxObserver(qint8, per_channel_symmetric)

Every observer keeps its defaults otherwise: quint8 per_tensor_affine activations, eps = float32 epsilon (2^-23),
2048 histogram bins, ch_axis = 0. ``reduce_range=True`` (7-bit activation codes) is what keeps fbgemm's pre-VNNI
int16 pair sums from saturating (refquant.matmul eq. M2); onednn asks for full 8-bit codes and torch warns on a CPU
without avx512_vnni, where oneDNN saturates the same way.

Dynamic quantization (the input is quantized per call from its own min and max, so the activation "observer" is
only a placeholder that says quint8 over [0, 255]; refquant.dynamic builds the layer)::

    default_dynamic_qconfig       activation PlaceholderObserver(quint8, 0..255, is_dynamic=True)
                                  weight     MinMaxObserver(qint8, per_tensor_symmetric)
    per_channel_dynamic_qconfig   activation PlaceholderObserver(quint8, 0..255, is_dynamic=True)
                                  weight     PerChannelMinMaxObserver(qint8, per_channel_symmetric)

Matches: pytorch/pytorch torch/ao/quantization/qconfig.py (QConfig, get_default_qconfig, default_dynamic_qconfig,
per_channel_dynamic_qconfig) and torch/ao/quantization/observer.py (default_weight_observer,
default_per_channel_weight_observer, default_dynamic_quant_observer, PlaceholderObserver).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import llvmlite.binding as llvm_binding
import numpy as np

from .histogram import HistogramObserver
from .observers import FLOAT32_EPS, MinMaxObserver, PerChannelMinMaxObserver

QCONFIG_ENGINES: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")


class QConfig(NamedTuple):
    """``torch.ao.quantization.QConfig``: how to observe activations and weights (each a zero-argument factory)."""

    activation: Callable[[], object]
    weight: Callable[[], object]


class PlaceholderObserver:
    """``torch.ao.quantization.PlaceholderObserver``: records nothing, only carries the settings.

    In a dynamic qconfig it tells ``convert`` that the activation is quantized at run time to ``dtype`` over
    [quant_min, quant_max] (from each input's own range, refquant.dynamic), so there are no qparams to compute.
    """

    def __init__(self, dtype: str = "float32", custom_op_name: str = "", quant_min: int | None = None,
                 quant_max: int | None = None, qscheme: str | None = None, eps: float | None = None,
                 is_dynamic: bool = False) -> None:
        if dtype not in ("quint8", "qint8", "qint32", "float16", "float32"):
            raise ValueError(f"dtype must be a quantized dtype name or 'float16'/'float32', got {dtype!r}")
        self.dtype = dtype
        self.custom_op = custom_op_name
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.qscheme = "per_tensor_affine" if qscheme is None else qscheme
        self.eps = np.float32(FLOAT32_EPS if eps is None else eps)
        self.is_dynamic = bool(is_dynamic)

    def __call__(self, x):
        """Return ``x`` unchanged (torch: ``forward(x) -> x``)."""
        return x

    def calculate_qparams(self):
        """torch raises here: a placeholder has no qparams."""
        raise Exception("calculate_qparams should not be called for PlaceholderObserver")


default_weight_observer = functools.partial(MinMaxObserver, dtype="qint8", qscheme="per_tensor_symmetric")
"""torch.ao.quantization.observer.default_weight_observer (qnnpack's, and the dynamic qconfig's, weight observer)."""

default_per_channel_weight_observer = functools.partial(PerChannelMinMaxObserver, dtype="qint8",
                                                        qscheme="per_channel_symmetric")
"""torch.ao.quantization.observer.default_per_channel_weight_observer (fbgemm's, x86's and onednn's; ch_axis 0)."""

default_dynamic_quant_observer = functools.partial(PlaceholderObserver, dtype="quint8", quant_min=0, quant_max=255,
                                                   is_dynamic=True)
"""torch.ao.quantization.observer.default_dynamic_quant_observer."""

default_dynamic_qconfig = QConfig(activation=default_dynamic_quant_observer, weight=default_weight_observer)
"""torch.ao.quantization.qconfig.default_dynamic_qconfig: dynamic input, per-tensor symmetric int8 weights."""

per_channel_dynamic_qconfig = QConfig(activation=default_dynamic_quant_observer,
                                      weight=default_per_channel_weight_observer)
"""torch.ao.quantization.qconfig.per_channel_dynamic_qconfig: dynamic input, per-channel symmetric int8 weights."""

_DEFAULT_QCONFIGS: dict[str, QConfig] = {
    "fbgemm": QConfig(activation=functools.partial(HistogramObserver, reduce_range=True),
                      weight=default_per_channel_weight_observer),
    "qnnpack": QConfig(activation=functools.partial(HistogramObserver, reduce_range=False),
                       weight=default_weight_observer),
    "onednn": QConfig(activation=functools.partial(HistogramObserver, reduce_range=False),
                      weight=default_per_channel_weight_observer),
    "x86": QConfig(activation=functools.partial(HistogramObserver, reduce_range=True),
                   weight=default_per_channel_weight_observer),
}


def _cpu_has_avx512_vnni() -> bool:
    """What torch.cpu._is_vnni_supported() asks (it checks avx512_vnni only, not avx2_vnni)."""
    return bool(llvm_binding.get_host_cpu_features().get("avx512vnni", False))


def get_default_qconfig(backend: str = "x86", version: int = 0) -> QConfig:
    """The default post-training static qconfig of ``backend`` (see the module docstring's table).

    Like torch, ``version`` must be 0, and ``"onednn"`` warns on a CPU without avx512_vnni (whose oneDNN kernels sum
    u8·s8 products in saturating int16 pairs, so full 8-bit activations can lose accuracy).
    Matches: pytorch/pytorch torch/ao/quantization/qconfig.py (get_default_qconfig).
    """
    if backend not in QCONFIG_ENGINES:
        raise ValueError(f"backend must be one of {list(QCONFIG_ENGINES)} (torch raises AssertionError: "
                         f"'backend: {backend} not supported'), got {backend!r}")
    if version != 0:
        raise ValueError(f"version must be 0 (torch: 'Version number: {version} in get_default_qconfig is not "
                         f"supported'), got {version!r}")
    if backend == "onednn" and not _cpu_has_avx512_vnni():
        warnings.warn("Default qconfig of oneDNN backend with reduce_range of false may have accuracy issues on CPU "
                      "without Vector Neural Network Instruction support.", stacklevel=2)
    return _DEFAULT_QCONFIGS[backend]


def default_weight_qscheme(engine: str) -> str:
    """The weight qscheme of ``engine``'s default qconfig: per_tensor_symmetric for qnnpack, else per_channel."""
    if engine not in QCONFIG_ENGINES:
        raise ValueError(f"engine must be one of {QCONFIG_ENGINES}, got {engine!r}")
    return _DEFAULT_QCONFIGS[engine].weight.keywords["qscheme"]
