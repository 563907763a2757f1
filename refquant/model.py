"""Whole eager models: a straight-line forward of stubs, Linears, ReLUs and FloatFunctionals, prepared, calibrated
and converted as ``torch.ao.quantization`` does it, with every layer's integers visible by its torch path name.

A model is its modules by torch path (``"fc1"``, ``"block.0.fc"``) and a :class:`Graph`: the calls of its forward
in order, each ``output = module(*inputs)`` or ``output = functional.add(a, b)``. The float description
(:class:`FloatModel`) holds float weights; ``prepare`` attaches observers where torch's ``prepare`` puts them;
``convert`` turns the observed ranges into integers (:class:`QuantizedModel`). The supported modules, and what each
becomes:

    float module (torch)                     observer (torch's prepare)               converted (torch's convert)
    QuantStub                                its output (= its input)                  Quantize(s, z)        eq. Q1
    DeQuantStub                              none                                      DeQuantize            eq. D1
    nn.Linear                                its output                                quantized Linear      eqs. L1-L11
    LinearReLU (fuse_modules)                its output, called TWICE per call (*)     quantized LinearReLU
    nn.ReLU                                  none: a ReLU after a Linear leaves the    relu on codes:        eq. F5
                                             Linear's observer seeing the pre-ReLU     max(q, z), same (s, z)
                                             output
    nn.Dropout, nn.Identity                  none                                      no-ops
    nn.Flatten                               none                                      reshape of the codes  eq. F8
    FloatFunctional .add .add_relu           inside the op, on its result              QFunctional with its own
                    .mul  .cat               (add_relu: after the ReLU)                (s, z)           eqs. F0-F7

A module called more than once (a Linear applied twice, one FloatFunctional for two adds) has ONE observer that
sees every call, hence one (scale, zero_point); its calls are named ``path``, ``path#2``, ``path#3``, ...

(*) ``LinearReLU`` is an ``nn.Sequential``: its forward runs the ``activation_post_process`` child ``prepare``
added, and prepare's forward hook runs it again on the same tensor (see refquant.pipeline). The histogram counts
double; the chosen (scale, zero_point) do not change.

Matches: pytorch/pytorch torch/ao/quantization/quantize.py (prepare, _add_observer_, convert, swap_module),
torch/ao/quantization/quantization_mappings.py (which modules get observers and quantized counterparts),
torch/ao/nn/quantized/modules/functional_modules.py (FloatFunctional, QFunctional),
torch/ao/nn/quantized/modules/__init__.py (Quantize, DeQuantize), torch/ao/nn/quantized/modules/linear.py.

Calibration is not quantization arithmetic: torch's observers see torch's float ops (the Linear as MKL ``sgemm``,
whose float32 summation order refquant's NumPy does not reproduce bit for bit; docs/numerics.md §8). To reproduce
torch exactly, feed each observer what torch's observer saw (:meth:`ObservedModel.observe`); refquant's own float
forward (:meth:`ObservedModel.calibrate`) is an approximation of torch's, never a parity claim.

The qconfig is a parameter: any object with ``activation()`` and ``weight()`` returning refquant observers (torch's
``QConfig`` shape), normally ``refquant.qconfig.get_default_qconfig(engine)``; by default fbgemm's:
HistogramObserver(reduce_range=True) for activations, PerChannelMinMaxObserver(qint8, per_channel_symmetric) for
weights (qnnpack's: reduce_range=False and per-tensor symmetric weights; onednn's: reduce_range=False).

Engines (``convert(engine=...)``): fbgemm, x86, qnnpack and onednn. The Linears run the engine's arithmetic
(refquant.engines); add / add_relu run QNNPACK's q8vadd on qnnpack and aten's kernels elsewhere; mul, cat and relu
run aten's kernels on every engine (refquant.functional). Which CPU kernel a Linear call ran can change its integers
(fbgemm without VNNI sums int16-saturated pairs; oneDNN picks brgemm, brgemm_amx or gemm per call): the model's
default is ``saturate_int16_pairs`` / ``onednn_kernel`` of :meth:`ObservedModel.convert`, and
:meth:`QuantizedModel.trace` takes a per-call override (``linear_kernels``), as oneDNN's verbose output reports it.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np

from . import functional
from .functional import QTensor
from .engines import ONEDNN_KERNELS
from .linear import QuantizedLinear, quantize_weight
from .observers import MinMaxObserver, PerChannelMinMaxObserver
from .qconfig import get_default_qconfig
from .quantize import quantize_per_tensor

ENGINES = functional.ENGINES
"""Engines whose arithmetic this module models: fbgemm, x86 (fbgemm's kernels for these ops), qnnpack, onednn."""

FUNCTIONAL_METHODS = ("add", "add_relu", "mul", "cat")
"""The FloatFunctional / QFunctional methods a call can use."""


# ----------------------------------------------------------------------------------------------------------------
# The modules of a float model (what the torch path of a module names before prepare)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantStub:
    """``torch.ao.quantization.QuantStub``: the identity while float; its observer picks the input's (s, z)."""


@dataclass(frozen=True)
class DeQuantStub:
    """``torch.ao.quantization.DeQuantStub``: the identity while float (no observer)."""


@dataclass(frozen=True, eq=False)
class Linear:
    """``nn.Linear`` (``relu=False``) or the fused ``torch.ao.nn.intrinsic.LinearReLU`` (``relu=True``).

    ``weight`` float32 (out_features, in_features), ``bias`` float32 (out_features,) or None.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    relu: bool = False

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2 or 0 in w.shape:
            got = f"{w.dtype} {w.shape}" if isinstance(w, np.ndarray) else type(w).__name__
            raise TypeError(f"Linear weight must be a non-empty float32 (out_features, in_features) array, got {got}")
        b = self.bias
        if b is not None and (not isinstance(b, np.ndarray) or b.dtype != np.float32 or b.shape != (w.shape[0],)):
            got = f"{b.dtype} {b.shape}" if isinstance(b, np.ndarray) else type(b).__name__
            raise TypeError(f"Linear bias must be None or a float32 array of shape ({w.shape[0]},), got {got}")

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class ReLU:
    """``nn.ReLU``: float ``max(x, 0)`` before QuantStub / after DeQuantStub, quantized relu (eq. F5) between."""


@dataclass(frozen=True)
class Dropout:
    """``nn.Dropout`` in eval mode: the identity (torch's ``prepare`` skips it; ``convert`` makes it a no-op)."""


@dataclass(frozen=True)
class Identity:
    """``nn.Identity``."""


@dataclass(frozen=True)
class Flatten:
    """``nn.Flatten(start_dim, end_dim)``: a reshape, on floats or codes (eq. F8)."""

    start_dim: int = 1
    end_dim: int = -1


@dataclass(frozen=True)
class FloatFunctional:
    """``torch.ao.nn.quantized.FloatFunctional``: its methods add, add_relu, mul and cat observe their result."""


FloatModule = Union[QuantStub, DeQuantStub, Linear, ReLU, Dropout, Identity, Flatten, FloatFunctional]


# ----------------------------------------------------------------------------------------------------------------
# The modules of a converted model (what convert makes of them)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantize:
    """``torch.ao.nn.quantized.Quantize``: ``quantize_per_tensor(x, scale, zero_point, quint8)`` (eq. Q1)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class DeQuantize:
    """``torch.ao.nn.quantized.DeQuantize``: ``x.dequantize()`` (eq. D1); a float input passes unchanged."""


@dataclass(frozen=True)
class LinearKernel:
    """The CPU kernel one quantized Linear call ran, where it changes the integers (refquant.engines):
    ``saturate_int16_pairs`` (fbgemm/x86 or oneDNN without VNNI, eq. M2) and ``onednn_kernel`` ("brgemm",
    "brgemm_amx", "gemm"; onednn only)."""

    saturate_int16_pairs: bool = False
    onednn_kernel: str = "brgemm"

    def __post_init__(self) -> None:
        if self.onednn_kernel not in ONEDNN_KERNELS:
            raise ValueError(f"onednn_kernel must be one of {ONEDNN_KERNELS}, got {self.onednn_kernel!r}")


@dataclass(frozen=True, eq=False)
class ConvertedLinear:
    """What ``convert`` makes of a Linear (``torch.ao.nn.quantized.Linear`` / ``LinearReLU``): int8 weight codes
    with their per-channel (or per-tensor) scales and zero points, the float32 bias, the output (scale, zero_point).

    torch's quantized linear reads its input's (scale, zero_point) at run time; :meth:`bind` makes the
    :class:`refquant.linear.QuantizedLinear` for one input's qparams (one per call site of the module) on an engine.
    """

    weight_int8: np.ndarray
    weight_scales: np.ndarray
    weight_zero_points: np.ndarray
    bias: np.ndarray | None
    scale: float
    zero_point: int
    relu: bool = False
    weight_qscheme: str = "per_channel_symmetric"

    @classmethod
    def from_float(cls, linear: Linear, scale: float, zero_point: int,
                   weight_qscheme: str = "per_channel_symmetric", *, weight_observer: Any = None
                   ) -> "ConvertedLinear":
        """torch's ``Linear.from_float``: the qconfig's weight observer sees the float weight, which is quantized
        with its qparams (eqs. L1, L2: refquant.linear.quantize_weight); the bias stays float32.

        ``weight_observer``: a fresh ``qconfig.weight()`` (None: a PerChannelMinMaxObserver or MinMaxObserver of
        qint8 with ``weight_qscheme``, as :meth:`QuantizedLinear.from_float` makes). The weight's quantization does
        not depend on the input's qparams, which :meth:`bind` supplies.
        """
        if weight_observer is None:
            if weight_qscheme.startswith("per_channel"):
                weight_observer = PerChannelMinMaxObserver(ch_axis=0, dtype="qint8", qscheme=weight_qscheme)
            else:
                weight_observer = MinMaxObserver(dtype="qint8", qscheme=weight_qscheme)
        weight_observer(linear.weight)
        w_i8, scales, zero_points, qscheme = quantize_weight(linear.weight, weight_observer)
        scales_f32 = np.asarray(scales, np.float32).reshape(-1)  # torch holds float32 values (as doubles)
        return cls(w_i8, scales_f32, np.asarray(zero_points).reshape(-1).astype(np.int32), linear.bias,
                   float(scale), int(zero_point), linear.relu, qscheme)

    def bind(self, input_scale: float, input_zero_point: int, *, engine: str = "fbgemm",
             kernel: LinearKernel = LinearKernel()) -> QuantizedLinear:
        """The quantized Linear for inputs with (input_scale, input_zero_point) on ``engine``, modelling ``kernel``
        (refquant.linear, refquant.engines)."""
        return QuantizedLinear(self.weight_int8, self.weight_scales, self.weight_zero_points, self.bias,
                               input_scale, input_zero_point, self.scale, self.zero_point, relu=self.relu,
                               weight_qscheme=self.weight_qscheme, saturate_int16_pairs=kernel.saturate_int16_pairs,
                               engine=engine, onednn_kernel=kernel.onednn_kernel)


def stored_bias(linear: ConvertedLinear, engine: str) -> np.ndarray | None:
    """What torch's converted Linear's ``bias()`` returns on ``engine``: the float32 bias, None without one -- except
    on qnnpack, whose prepack stores a float32 zero bias for a layer without one (and unpacks it as such); the
    arithmetic is the same (a quantized bias of 0).
    Matches: pytorch/pytorch aten/src/ATen/native/quantized/cpu/qlinear_prepack.cpp (PackedLinearWeightsQnnp::prepack).
    """
    if linear.bias is None and engine == "qnnpack":
        return np.zeros(linear.weight_int8.shape[0], np.float32)
    return linear.bias


@dataclass(frozen=True)
class QFunctional:
    """``torch.ao.nn.quantized.QFunctional``: the FloatFunctional's methods with its own (scale, zero_point)."""

    scale: float
    zero_point: int


QuantizedModule = Union[Quantize, DeQuantize, ConvertedLinear, ReLU, Dropout, Identity, Flatten, QFunctional]

_PASS_THROUGH = (ReLU, Dropout, Identity, Flatten)
"""Modules that convert leaves as they are."""


# ----------------------------------------------------------------------------------------------------------------
# The forward: a straight line of calls
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One call of the forward: ``output = module(*inputs)``, or ``output = module.<method>(*inputs)`` for a
    FloatFunctional (``cat`` takes the inputs as its list, with ``dim``). Values are named by strings."""

    module: str
    inputs: tuple[str, ...]
    output: str
    method: str = "forward"
    dim: int = 0


@dataclass(frozen=True)
class Graph:
    """The forward of a model: its input names, its calls in order, the name of the value it returns."""

    inputs: tuple[str, ...]
    calls: tuple[Call, ...]
    output: str

    def call_names(self) -> list[str]:
        """Each call's name: the module's path, ``path#2`` for its second call, and so on."""
        seen: dict[str, int] = {}
        names = []
        for call in self.calls:
            seen[call.module] = seen.get(call.module, 0) + 1
            names.append(call.module if seen[call.module] == 1 else f"{call.module}#{seen[call.module]}")
        return names


def _type_name(module: object) -> str:
    return type(module).__name__


class ModelError(ValueError):
    """A model refquant cannot run, with the module at fault: ``module`` (its torch path), ``type_name`` and
    ``reason``; the message reads ``"<path> (<type>) <reason>"``."""

    def __init__(self, module: str, type_name: str, reason: str) -> None:
        super().__init__(f"{module or 'the model'} ({type_name}) {reason}")
        self.module, self.type_name, self.reason = module, type_name, reason


def _check_graph(modules: dict[str, Any], graph: Graph) -> dict[str, str]:
    """Validate the calls against the modules and follow each value's domain ("float" or "quantized").

    Raises one :class:`ModelError` naming the module (path and type) at the first call that cannot run: a Linear
    or a functional on a float value (no QuantStub before it), a QuantStub on a quantized value, an unsupported
    module. A quantized model output (no DeQuantStub after it) is a ValueError. Returns every value's domain.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a refquant.model.Graph, got {type(graph).__name__}")
    domain = {name: "float" for name in graph.inputs}
    for call in graph.calls:
        if call.module not in modules:
            raise ValueError(f"call of {call.module!r}: no such module (modules: {sorted(modules)})")
        mod = modules[call.module]

        def fail(reason: str) -> ModelError:
            return ModelError(call.module, _type_name(mod), reason)

        for name in call.inputs:
            if name not in domain:
                raise fail(f"uses the value {name!r} before anything computes it")
        ins = [domain[name] for name in call.inputs]
        is_functional = isinstance(mod, (FloatFunctional, QFunctional))
        if is_functional != (call.method != "forward"):
            raise fail(f"is called through {call.method!r}: a FloatFunctional through one of its methods "
                       f"{FUNCTIONAL_METHODS}, any other module through forward")
        if is_functional:
            if call.method not in FUNCTIONAL_METHODS:
                raise fail(f"calls the unsupported method {call.method!r} (supported: {FUNCTIONAL_METHODS})")
            if (call.method != "cat" and len(ins) != 2) or len(ins) == 0:
                raise fail(f"calls {call.method} with {len(ins)} tensors")
        elif len(ins) != 1:
            raise fail(f"takes one tensor, got {len(ins)}")
        if isinstance(mod, (QuantStub, Quantize)):
            if ins[0] != "float":
                raise fail("receives an already quantized tensor (two QuantStubs in a row)")
            out = "quantized"
        elif isinstance(mod, (DeQuantStub, DeQuantize)):
            out = "float"  # torch's dequantize() returns a float tensor unchanged
        elif isinstance(mod, (Linear, ConvertedLinear)) or is_functional:
            if "float" in ins:
                raise fail("receives a float tensor: the input reaches it without passing through a QuantStub "
                           "(after convert it needs a quantized tensor)")
            out = "quantized"
        elif isinstance(mod, _PASS_THROUGH):
            out = ins[0]
        else:
            raise fail("is not a supported module (supported: QuantStub, DeQuantStub, Linear, LinearReLU, ReLU, "
                       "Dropout, Identity, Flatten, FloatFunctional)")
        if call.output in domain:
            raise fail(f"computes the value {call.output!r}, which already exists")
        domain[call.output] = out
    if graph.output not in domain:
        raise ValueError(f"the model's output {graph.output!r} is never computed")
    if domain[graph.output] != "float":
        raise ValueError(f"the model's output {graph.output!r} is a quantized tensor: add a DeQuantStub before "
                         f"returning it (refquant models return float32)")
    return domain


def _check_inputs(graph: Graph, xs: tuple) -> dict[str, np.ndarray]:
    if len(xs) != len(graph.inputs):
        raise TypeError(f"the model takes {len(graph.inputs)} input(s) {graph.inputs}, got {len(xs)}")
    env = {}
    for name, x in zip(graph.inputs, xs):
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise TypeError(f"input {name!r} must be a float32 NumPy array, got {got}")
        env[name] = np.ascontiguousarray(x)
    return env


def linear_float(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, relu: bool = False) -> np.ndarray:
    """The float model's Linear [+ ReLU] in float32: ``y = x @ W.T + b``, then ``max(y, 0)`` with ReLU.

    NumPy float32 (BLAS ``sgemm``, then one float32 add of the bias). torch's ``F.linear`` computes the same sum in
    a shape-dependent order, so a few outputs can differ in the last bit (docs/numerics.md §8).
    """
    x_f32 = np.asarray(x, np.float32)
    w_f32 = np.asarray(weight, np.float32)
    y_f32 = np.matmul(x_f32, w_f32.T)  # float32 sums, BLAS order
    if bias is not None:
        y_f32 = y_f32 + np.asarray(bias, np.float32)  # float32 add
    if relu:
        y_f32 = np.maximum(y_f32, np.float32(0))
    return y_f32.astype(np.float32, copy=False)


def float_relu(x_f32: np.ndarray) -> np.ndarray:
    """torch's float ``relu`` (``clamp_min(x, 0)``): negative values become +0.0; -0.0 and NaN pass unchanged."""
    return np.where(x_f32 < 0, np.float32(0), x_f32).astype(np.float32)


def _float_functional(method: str, xs: list[np.ndarray], dim: int) -> np.ndarray:
    """FloatFunctional's float ops: ``torch.add``, ``relu(torch.add)``, ``torch.mul``, ``torch.cat`` in float32."""
    if method == "cat":
        return np.concatenate(xs, axis=dim)
    a, b = xs
    if a.shape != b.shape:
        raise ValueError(f"FloatFunctional.{method}: refquant needs operands of the same shape, got {a.shape} and "
                         f"{b.shape}")
    if method == "mul":
        return (a * b).astype(np.float32)
    y = (a + b).astype(np.float32)
    return float_relu(y) if method == "add_relu" else y


# ----------------------------------------------------------------------------------------------------------------
# The float model
# ----------------------------------------------------------------------------------------------------------------

class FloatModel:
    """An eager float model: modules by torch path and the :class:`Graph` of its forward.

    Build it with :func:`crosscheck.from_torch` from a torch model, with :meth:`sequential`, or from modules and
    a graph. Calling it runs the float forward in NumPy float32 (QuantStub and DeQuantStub are identities).
    """

    def __init__(self, modules: dict[str, FloatModule], graph: Graph) -> None:
        for path, mod in modules.items():
            if not isinstance(mod, (QuantStub, DeQuantStub, Linear, *_PASS_THROUGH, FloatFunctional)):
                raise TypeError(f"{path} ({_type_name(mod)}): not a float module of refquant.model")
        self.modules = dict(modules)
        self.graph = graph
        self.domain = _check_graph(self.modules, graph)

    @classmethod
    def sequential(cls, modules: dict[str, FloatModule]) -> "FloatModel":
        """``nn.Sequential(OrderedDict(modules))``: each module applied to the previous one's output."""
        calls, prev = [], "x"
        for path in modules:
            calls.append(Call(path, (prev,), path))
            prev = path
        return cls(modules, Graph(("x",), tuple(calls), prev))

    def __call__(self, *xs: np.ndarray) -> np.ndarray:
        """The float forward (refquant's NumPy float32; torch's MKL Linear can differ in the last bit)."""
        return _float_forward(self, xs, None)

    def __repr__(self) -> str:
        return f"FloatModel({', '.join(f'{p}={_type_name(m)}' for p, m in self.modules.items())})"


def _float_forward(model: FloatModel, xs: tuple, observe: Callable[[str, np.ndarray], None] | None) -> np.ndarray:
    """The float forward; ``observe(path, x)`` is called wherever torch's prepared model calls an observer."""
    env = _check_inputs(model.graph, xs)
    for call in model.graph.calls:
        mod = model.modules[call.module]
        xs_in = [env[name] for name in call.inputs]
        if isinstance(mod, QuantStub):
            y = xs_in[0]
            if observe:
                observe(call.module, y)  # forward hook: the output, which is the input
        elif isinstance(mod, Linear):
            y = linear_float(xs_in[0], mod.weight, mod.bias, mod.relu)
            if observe:
                observe(call.module, y)
                if mod.relu:
                    observe(call.module, y)  # LinearReLU: the Sequential child, then the forward hook
        elif isinstance(mod, FloatFunctional):
            y = _float_functional(call.method, xs_in, call.dim)
            if observe:
                observe(call.module, y)  # self.activation_post_process(r) inside the method
        elif isinstance(mod, ReLU):
            y = float_relu(xs_in[0])
        elif isinstance(mod, Flatten):
            y = xs_in[0].reshape(functional.flatten_shape(xs_in[0].shape, mod.start_dim, mod.end_dim))
        else:  # DeQuantStub, Dropout (eval), Identity
            y = xs_in[0]
        env[call.output] = y
    return env[model.graph.output]


# ----------------------------------------------------------------------------------------------------------------
# prepare: observers where torch puts them
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_QCONFIG = get_default_qconfig("fbgemm")
"""``get_default_qconfig("fbgemm")`` (refquant.qconfig), what :func:`prepare` uses without a qconfig."""


def _weight_qscheme(qconfig: Any) -> str:
    """The weight qscheme :meth:`QuantizedLinear.from_float` reproduces for ``qconfig.weight()``: a (per-channel,
    ch_axis 0) MinMax or MovingAverage observer of qint8 over the full range [-128, 127]."""
    obs = qconfig.weight()
    ok = (isinstance(obs, (MinMaxObserver, PerChannelMinMaxObserver)) and obs.dtype == "qint8"
          and (obs.quant_min, obs.quant_max) == (-128, 127) and obs.eps == np.float32(np.finfo(np.float32).eps)
          and (not isinstance(obs, PerChannelMinMaxObserver) or obs.ch_axis == 0)
          and obs.qscheme in ("per_channel_symmetric", "per_channel_affine", "per_tensor_symmetric",
                              "per_tensor_affine"))
    if not ok:
        raise ValueError(f"qconfig.weight() gives {obs!r}: refquant quantizes Linear weights with a MinMax-family "
                         f"qint8 observer over [-128, 127] (per channel along axis 0, or per tensor) only")
    return obs.qscheme


class ObservedModel:
    """The prepared model (torch's ``prepare(model)``): the float model with activation observers.

    ``observers[path]`` is the observer of the module at ``path`` (torch's ``<path>.activation_post_process``):
    every QuantStub, Linear / LinearReLU and FloatFunctional the forward calls. Feed it either refquant's own float
    forward (:meth:`calibrate`) or, to reproduce torch exactly, what torch's observer saw (:meth:`observe`).
    """

    def __init__(self, model: FloatModel, qconfig: Any = None) -> None:
        if not isinstance(model, FloatModel):
            raise TypeError(f"model must be a refquant.model.FloatModel, got {type(model).__name__}")
        self.model = model
        self.qconfig = DEFAULT_QCONFIG if qconfig is None else qconfig
        for attr in ("activation", "weight"):
            if not callable(getattr(self.qconfig, attr, None)):
                raise TypeError(f"qconfig must have callable activation() and weight() returning refquant "
                                f"observers (torch's QConfig shape), got {self.qconfig!r}")
        self.weight_qscheme = _weight_qscheme(self.qconfig)
        self.observers: dict[str, Any] = {}
        for call in model.graph.calls:
            mod = model.modules[call.module]
            if isinstance(mod, (QuantStub, Linear, FloatFunctional)) and call.module not in self.observers:
                obs = self.qconfig.activation()
                if getattr(obs, "dtype", None) != "quint8":
                    raise ValueError(f"qconfig.activation() gives {obs!r}: activations must be quint8")
                if getattr(obs, "averaging_constant", None) == 1:
                    raise ValueError("qconfig.activation() is memoryless (averaging_constant=1): torch then observes "
                                     "each module's input instead of its output, which refquant does not model")
                self.observers[call.module] = obs

    def observe(self, path: str, x: np.ndarray) -> None:
        """Record one batch in the observer of ``path``: what torch's ``<path>.activation_post_process`` saw
        (recorded with a forward pre-hook on it; a LinearReLU's observer sees each batch twice)."""
        if path not in self.observers:
            raise KeyError(f"no activation observer at {path!r}; observers: {sorted(self.observers)}")
        self.observers[path](x)

    def calibrate(self, *xs: np.ndarray) -> np.ndarray:
        """One calibration batch through refquant's own float forward, feeding every observer; returns the output.

        Not a parity claim: torch's observers see torch's float Linear (MKL), which can differ in the last bit.
        """
        return _float_forward(self.model, xs, self.observe)

    def qparams(self) -> dict[str, tuple[float, int]]:
        """(scale, zero_point) of every observer, as convert reads them: ``float(scale)``, ``int(zero_point)``."""
        out = {}
        for path, obs in self.observers.items():
            scale, zero_point = obs.calculate_qparams()
            out[path] = (float(np.asarray(scale).reshape(-1)[0]), int(np.asarray(zero_point).reshape(-1)[0]))
        return out

    def convert(self, *, engine: str = "fbgemm", num_threads: int = 1, saturate_int16_pairs: bool = False,
                onednn_kernel: str = "brgemm") -> "QuantizedModel":
        """torch's ``convert``: each observed module becomes its quantized counterpart with the observer's qparams
        (Quantize, ConvertedLinear with int8 weights from a fresh ``qconfig.weight()``, QFunctional); see
        :class:`QuantizedModel` for the options."""
        qparams = self.qparams()
        converted: dict[str, QuantizedModule] = {}
        for path, mod in self.model.modules.items():
            if isinstance(mod, QuantStub):
                converted[path] = Quantize(*qparams[path])
            elif isinstance(mod, DeQuantStub):
                converted[path] = DeQuantize()
            elif isinstance(mod, Linear):
                converted[path] = ConvertedLinear.from_float(mod, *qparams[path],
                                                             weight_observer=self.qconfig.weight())
            elif isinstance(mod, FloatFunctional):
                converted[path] = QFunctional(*qparams[path])
            else:
                converted[path] = mod
        return QuantizedModel(converted, self.model.graph, engine=engine, num_threads=num_threads,
                              saturate_int16_pairs=saturate_int16_pairs, onednn_kernel=onednn_kernel)


def prepare(model: FloatModel, qconfig: Any = None) -> ObservedModel:
    """torch's ``prepare(model)`` with ``model.qconfig = qconfig`` (default: get_default_qconfig("fbgemm"); for
    another engine pass ``refquant.qconfig.get_default_qconfig(engine)``)."""
    return ObservedModel(model, qconfig)


def convert(observed: ObservedModel, **options: Any) -> "QuantizedModel":
    """torch's ``convert(prepared)``: :meth:`ObservedModel.convert`."""
    if not isinstance(observed, ObservedModel):
        raise TypeError(f"observed must be a refquant.model.ObservedModel (from prepare), got "
                        f"{type(observed).__name__}")
    return observed.convert(**options)


# ----------------------------------------------------------------------------------------------------------------
# The converted model
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class LayerTrace:
    """What one call of the quantized forward saw and produced.

    ``inputs``: float32 arrays (a Quantize's input, float-domain modules) or uint8 codes, with ``input_qparams``
    (None for floats); ``output`` likewise with ``output_qparams``; ``accumulators``: a Linear's int32 ``raw``
    (eq. L5 of refquant.linear) right before requantization, else None.
    """

    name: str
    module: str
    kind: str
    inputs: list[np.ndarray]
    input_qparams: list[tuple[float, int] | None]
    output: np.ndarray
    output_qparams: tuple[float, int] | None
    accumulators: np.ndarray | None = None


@dataclass
class Step:
    """One call of the converted forward with what it runs: ``op`` is the :class:`QuantizedLinear` of a Linear
    (bound to its input's qparams), else the converted module itself."""

    name: str
    call: Call
    op: Any
    input_qparams: list[tuple[float, int] | None]
    output_qparams: tuple[float, int] | None


class QuantizedModel:
    """The converted model (torch's ``convert(prepared)``), float32 in and float32 out, every layer visible.

    Args:
        modules: converted modules by torch path (:class:`Quantize`, :class:`DeQuantize`,
            :class:`ConvertedLinear`, :class:`QFunctional`, ReLU, Dropout, Identity, Flatten).
        graph: the forward.
        engine: torch's ``torch.backends.quantized.engine``: "fbgemm", "x86", "qnnpack" or "onednn".
        num_threads: torch's intra-op thread count (``torch.get_num_threads()``): quantized add / mul of 32,768
            or more elements round some elements differently depending on it (refquant.functional, eq. F0).
        saturate_int16_pairs: the Linears sum u8·s8 products in int16-saturated pairs, as fbgemm on a CPU
            without VNNI does (refquant.matmul, eq. M2).
        onednn_kernel: the oneDNN matmul kernel the Linears model by default (engine "onednn"; refquant.engines).

    Every value's (scale, zero_point) is known before the first input arrives (they flow from the Quantize,
    ConvertedLinear and QFunctional modules), so each Linear call is bound once: ``steps``.
    """

    def __init__(self, modules: dict[str, QuantizedModule], graph: Graph, *, engine: str = "fbgemm",
                 num_threads: int = 1, saturate_int16_pairs: bool = False, onednn_kernel: str = "brgemm") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES} (refquant models their kernels), got {engine!r}")
        for path, mod in modules.items():
            if not isinstance(mod, (Quantize, DeQuantize, ConvertedLinear, QFunctional, *_PASS_THROUGH)):
                raise TypeError(f"{path} ({_type_name(mod)}): not a converted module of refquant.model")
        if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1:
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.modules = dict(modules)
        self.graph = graph
        self.engine = engine
        self.num_threads = int(num_threads)
        self.saturate_int16_pairs = bool(saturate_int16_pairs)
        self.kernel = LinearKernel(self.saturate_int16_pairs, onednn_kernel)
        self._variants: dict[tuple[str, LinearKernel], QuantizedLinear] = {}
        _check_graph(self.modules, graph)
        self.steps = self._bind()

    def _bind(self) -> list[Step]:
        """Follow the qparams of every value through the graph and bind each Linear call to its input's."""
        qp: dict[str, tuple[float, int] | None] = {name: None for name in self.graph.inputs}
        steps = []
        for name, call in zip(self.graph.call_names(), self.graph.calls):
            mod = self.modules[call.module]
            ins = [qp[v] for v in call.inputs]
            op = mod
            if isinstance(mod, Quantize):
                out = (float(mod.scale), int(mod.zero_point))
            elif isinstance(mod, DeQuantize):
                out = None
            elif isinstance(mod, ConvertedLinear):
                op = mod.bind(*ins[0], engine=self.engine, kernel=self.kernel)
                out = (float(mod.scale), int(mod.zero_point))
            elif isinstance(mod, QFunctional):
                out = (float(mod.scale), int(mod.zero_point))
            else:  # ReLU, Flatten, Dropout, Identity keep the input's qparams
                out = ins[0]
            qp[call.output] = out
            steps.append(Step(name, call, op, ins, out))
        return steps

    @property
    def qparams(self) -> dict[str, tuple[float, int]]:
        """(scale, zero_point) of every Quantize, quantized Linear and QFunctional, by module path."""
        return {p: (float(m.scale), int(m.zero_point)) for p, m in self.modules.items()
                if isinstance(m, (Quantize, ConvertedLinear, QFunctional))}

    def layer(self, name: str) -> Any:
        """The op a call runs (a bound QuantizedLinear for a Linear), by call name (``"fc1"``, ``"fc1#2"``)."""
        for step in self.steps:
            if step.name == name:
                return step.op
        raise KeyError(f"no call named {name!r}; calls: {[s.name for s in self.steps]}")

    def __call__(self, *xs: np.ndarray, linear_kernels: dict[str, LinearKernel] | None = None) -> np.ndarray:
        """float32 input(s) -> float32 output, through the quantized forward.

        Inputs are taken in row-major order, as torch runs a contiguous tensor (``torch.from_numpy`` of a
        C-contiguous array); the layout of torch's tensors matters to the elementwise ops (refquant.functional).
        ``linear_kernels``: per Linear call name, the kernel that call is to model instead of the model's default.
        """
        return self._forward(xs, None, linear_kernels)

    def trace(self, *xs: np.ndarray, linear_kernels: dict[str, LinearKernel] | None = None
              ) -> dict[str, LayerTrace]:
        """The forward with every call's inputs, outputs and accumulators, by call name, in execution order
        (``linear_kernels`` as in :meth:`__call__`)."""
        traces: dict[str, LayerTrace] = {}
        self._forward(xs, traces, linear_kernels)
        return traces

    def with_linear_kernels(self, linear_kernels: dict[str, LinearKernel]) -> "QuantizedModel":
        """A copy of this model whose Linear calls are bound for ``linear_kernels`` (call name -> kernel; the other
        calls keep the model's default), e.g. to export the kernels torch's calls ran (refquant.export.export_model
        reads each step's bound layer)."""
        new = copy.copy(self)
        new.steps = [dataclasses.replace(step, op=self._op(step, linear_kernels)) for step in self.steps]
        new._variants = self._variants
        return new

    def forward_traced(self, *xs: np.ndarray, linear_kernels: dict[str, LinearKernel] | None = None
                       ) -> tuple[np.ndarray, dict[str, LayerTrace]]:
        """The output and :meth:`trace`'s traces of one forward pass."""
        traces: dict[str, LayerTrace] = {}
        y = self._forward(xs, traces, linear_kernels)
        return y, traces

    def _op(self, step: Step, linear_kernels: dict[str, LinearKernel] | None) -> Any:
        """The op of ``step``, bound for another kernel where ``linear_kernels`` says so (cached)."""
        kernel = linear_kernels.get(step.name) if linear_kernels else None
        if kernel is None or kernel == self.kernel or not isinstance(step.op, QuantizedLinear):
            return step.op
        key = (step.name, kernel)
        if key not in self._variants:
            mod = self.modules[step.call.module]
            self._variants[key] = mod.bind(*step.input_qparams[0], engine=self.engine, kernel=kernel)
        return self._variants[key]

    def _forward(self, xs: tuple, traces: dict[str, LayerTrace] | None,
                 linear_kernels: dict[str, LinearKernel] | None = None) -> np.ndarray:
        env: dict[str, Any] = _check_inputs(self.graph, xs)
        for step in self.steps:
            call, op = step.call, self._op(step, linear_kernels)
            ins = [env[v] for v in call.inputs]
            try:
                y, acc_i32 = self._run(call, op, ins)
            except ValueError as e:  # e.g. operands of different shapes: name the module
                raise ModelError(call.module, _type_name(self.modules[call.module]), f"cannot run: {e}") from None
            env[call.output] = y
            if traces is not None:
                traces[step.name] = LayerTrace(
                    step.name, call.module, _type_name(self.modules[call.module]),
                    [x.codes if isinstance(x, QTensor) else x for x in ins], step.input_qparams,
                    y.codes if isinstance(y, QTensor) else y, step.output_qparams, acc_i32)
        return env[self.graph.output]

    def _run(self, call: Call, op: Any, ins: list) -> tuple[Any, np.ndarray | None]:
        """One call: its output (a QTensor or float32 array) and, for a Linear, its int32 accumulators."""
        acc_i32 = None
        if isinstance(op, Quantize):
            y = QTensor(quantize_per_tensor(ins[0], op.scale, op.zero_point, "quint8"), op.scale, op.zero_point)
        elif isinstance(op, DeQuantize):
            y = ins[0].dequantize() if isinstance(ins[0], QTensor) else ins[0]
        elif isinstance(op, QuantizedLinear):
            acc_i32 = op.accumulate(ins[0].codes)
            y = QTensor(op.requantize(acc_i32), op.output_scale, op.output_zero_point)
        elif isinstance(op, QFunctional):
            y = self._functional(call, op, ins)
        elif isinstance(op, ReLU):
            y = functional.relu(ins[0]) if isinstance(ins[0], QTensor) else float_relu(ins[0])
        elif isinstance(op, Flatten):
            if isinstance(ins[0], QTensor):
                y = functional.flatten(ins[0], op.start_dim, op.end_dim)
            else:
                y = ins[0].reshape(functional.flatten_shape(ins[0].shape, op.start_dim, op.end_dim))
        else:  # Dropout, Identity
            y = ins[0]
        return y, acc_i32

    def _functional(self, call: Call, op: QFunctional, ins: list[QTensor]) -> QTensor:
        if call.method == "cat":
            return functional.cat(ins, call.dim, op.scale, op.zero_point)
        if call.method == "mul":  # aten's qmul kernel on every engine
            return functional.mul(ins[0], ins[1], op.scale, op.zero_point, num_threads=self.num_threads)
        fn = {"add": functional.add, "add_relu": functional.add_relu}[call.method]
        return fn(ins[0], ins[1], op.scale, op.zero_point, num_threads=self.num_threads, engine=self.engine)

    def __repr__(self) -> str:
        return (f"QuantizedModel(engine={self.engine!r}, "
                + ", ".join(f"{s.name}={_type_name(self.modules[s.call.module])}" for s in self.steps) + ")")
