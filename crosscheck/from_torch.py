"""Read a torch eager model into refquant.model, without recalibrating.

    from_torch(converted_model)   -> refquant.model.QuantizedModel: torch's integers and qparams as they are (int8
                                     weights with their scales and zero points, float bias, every Quantize's and
                                     QFunctional's scale/zero_point, every quantized Linear's output qparams)
    from_torch(float_model)       -> refquant.model.FloatModel: the float weights, to prepare and calibrate in
                                     refquant (``refquant.model.prepare``)

The forward is read with torch.fx symbolic tracing: the supported modules are leaves (one ``call_module`` node each),
user modules and ``nn.Sequential`` are traced through, and the methods of FloatFunctional / QFunctional are
recorded as one node per call (with the functional's path) instead of being traced into. Anything else -- a
forward with control flow on a tensor, an unsupported module (``nn.Conv2d``, ``nn.LSTM``, ``nn.Sigmoid``, ...), a
torch function or tensor method in a forward, a Linear reached without a QuantStub -- is ONE
:class:`refquant.model.ModelError` naming the module's path and torch type.

Supported modules (float -> converted): QuantStub -> Quantize, DeQuantStub -> DeQuantize, nn.Linear ->
quantized Linear, LinearReLU (``fuse_modules``) -> quantized LinearReLU, nn.ReLU, nn.Dropout (eval) -> QuantizedDropout,
nn.Identity, nn.Flatten, FloatFunctional -> QFunctional (``add``, ``add_relu``, ``mul``, ``cat``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np


class _RefquantModel:
    """refquant.model, imported at its first use (reading a model): ``import crosscheck``, which exports
    :func:`from_torch`, then imports neither refquant nor Numba (the CLIs' ``--help``, a torch-only script such as
    benchmarks/bench_crosscheck.py's baseline).

    While :func:`from_torch` reads a float model with ``deferred=True`` (in this thread), a class of refquant.model
    named here stands for itself: ``rm.Linear(w, b, relu=False)`` is a :class:`Deferred` constructor call, made by
    :meth:`DeferredFloatModel.build`; only ``ModelError`` and ``FUNCTIONAL_METHODS`` import refquant.model then (an
    error, a model with a FloatFunctional)."""

    def __init__(self) -> None:
        self._state = threading.local()

    @contextlib.contextmanager
    def deferring(self, on: bool) -> Iterator[None]:
        saved = getattr(self._state, "deferring", False)
        self._state.deferring = on
        try:
            yield
        finally:
            self._state.deferring = saved

    def __getattr__(self, name: str) -> Any:
        if name[:1] != "_" and getattr(self._state, "deferring", False) and name not in _NOT_DEFERRED:
            return functools.partial(Deferred, name)
        from refquant import model

        return getattr(model, name)


_NOT_DEFERRED = ("ModelError", "FUNCTIONAL_METHODS")
rm = _RefquantModel()


class Deferred:
    """One constructor call of refquant.model, made later: ``refquant.model.<name>(*args, **kwargs)`` (arguments
    may hold Deferred calls, in tuples, lists and dicts). Plain data: it pickles without refquant."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs

    def __repr__(self) -> str:
        return f"Deferred({self.name!r}, {len(self.args)} args, {sorted(self.kwargs)})"

    def build(self) -> Any:
        from refquant import model

        return getattr(model, self.name)(*_built(self.args), **_built(self.kwargs))


def _built(value: Any) -> Any:
    """``value`` with every :class:`Deferred` call in it made."""
    if isinstance(value, Deferred):
        return value.build()
    if isinstance(value, (tuple, list)):
        return type(value)(_built(v) for v in value)
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    return value


@dataclass
class DeferredFloatModel:
    """What ``from_torch(float_model, deferred=True)`` read, before refquant.model is imported: the modules by path
    and the graph as :class:`Deferred` calls, and each module's torch type (for the errors). :meth:`build` makes
    the refquant.model.FloatModel that ``from_torch(float_model)`` returns, with the same checks and errors.

    Why: the studies' torch worker (crosscheck.worker) is forked before the parent imports refquant and Numba
    (~0.5-0.8 s), which then happens while the worker imports torch; the worker reads the float model without
    them and the parent builds it."""

    modules: dict[str, Deferred]
    graph: Deferred
    torch_types: dict[str, str]

    def build(self) -> Any:
        return _named_by_torch(lambda: rm.FloatModel(_built(self.modules), _built(self.graph)), self.torch_types)


def built_float_model(model: Any) -> Any:
    """A refquant.model.FloatModel: ``model`` itself, or the one a :class:`DeferredFloatModel` describes."""
    return model.build() if isinstance(model, DeferredFloatModel) else model


def _named_by_torch(make: Callable[[], Any], torch_types: dict[str, str]) -> Any:
    """``make()``, with a refquant.model.ModelError naming the module's torch type instead of refquant's."""
    try:
        return make()
    except rm.ModelError as e:
        raise rm.ModelError(e.module, torch_types.get(e.module, e.type_name), e.reason) from None

FUNCTIONAL_METHODS = ("add", "add_relu", "mul", "cat", "add_scalar", "mul_scalar", "matmul")
"""Every method of FloatFunctional / QFunctional; refquant supports those in refquant.model.FUNCTIONAL_METHODS."""


@functools.cache
def _torch_modules():
    """Import torch on first use, not with ``import crosscheck`` (the study keeps torch in its worker process).
    Binds the module names this file uses as globals: torch, nn, nni, nniq, nnq, QuantStub, DeQuantStub, the
    leaf tuples and the tracer class."""
    import torch
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    import torch.fx
    from torch import nn
    from torch.ao.quantization import DeQuantStub, QuantStub

    globals().update(torch=torch, nn=nn, nni=nni, nniq=nniq, nnq=nnq, QuantStub=QuantStub, DeQuantStub=DeQuantStub)
    globals().update(
        FLOAT_LEAVES=(QuantStub, DeQuantStub, nn.Linear, nni.LinearReLU, nn.ReLU, nn.Dropout, nn.Identity,
                      nn.Flatten),
        CONVERTED_LEAVES=(nnq.Quantize, nnq.DeQuantize, nnq.Linear, nniq.LinearReLU, nn.ReLU, nnq.Dropout,
                          nn.Dropout, nn.Identity, nn.Flatten),
        FUNCTIONAL_CLASSES=(nnq.FloatFunctional, nnq.QFunctional),
        _Tracer=_make_tracer_class(torch.fx.Tracer))


def _functional_call(path: str, method: str, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - a marker
    """The target of the graph node that stands for one call ``<path>.<method>(*args)`` of a FloatFunctional."""
    raise RuntimeError("a marker in a traced graph, never called")


def _torch_type(module: nn.Module) -> str:
    """The module's name as ``print(model)`` shows it (``QuantizedLinear`` for a converted Linear)."""
    return module._get_name()


def _make_tracer_class(fx_tracer: type) -> type:
    class _Tracer(fx_tracer):
        """fx's tracer with refquant's leaves, remembering which module's forward was being traced when it failed."""

        def __init__(self, leaves: tuple[type, ...]) -> None:
            super().__init__()
            self.leaves = leaves
            self.failed_in: tuple[str, Any] | None = None

        def is_leaf_module(self, m, module_qualified_name: str) -> bool:
            if isinstance(m, self.leaves) or isinstance(m, FUNCTIONAL_CLASSES):
                return True  # exact types are checked afterwards; a subclass is reported, not traced into
            if isinstance(m, nn.Sequential):
                return False
            return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))  # e.g. nn.Conv2d: reported

        def call_module(self, m, forward, args, kwargs):
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_in is None:
                    self.failed_in = (self.path_of_module(m), m)
                raise

    return _Tracer


@contextlib.contextmanager
def _functional_methods_recorded(tracer: _Tracer) -> Iterator[None]:
    """While tracing, ``ff.add(a, b)`` on a FloatFunctional / QFunctional becomes one node
    ``_functional_call(path, "add", a, b)`` instead of the torch ops inside the method."""
    saved = {(cls, name): cls.__dict__[name] for cls in FUNCTIONAL_CLASSES for name in FUNCTIONAL_METHODS
             if name in cls.__dict__}

    def recorder(method: str):
        def record(self, *args, **kwargs):
            return tracer.create_proxy("call_function", _functional_call,
                                       (tracer.path_of_module(self), method, *args), kwargs)
        return record

    try:
        for cls, name in saved:
            setattr(cls, name, recorder(name))
        yield
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)


def _where(root: nn.Module, node: torch.fx.Node) -> tuple[str, nn.Module]:
    """The module whose forward created ``node``: the innermost entry of fx's module stack, else the root."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = next(reversed(stack.values()))[0]
        return path, root.get_submodule(path)
    return "", root


def _trace(root: nn.Module, leaves: tuple[type, ...]) -> torch.fx.Graph:
    tracer = _Tracer(leaves)
    try:
        with _functional_methods_recorded(tracer):
            return tracer.trace(root)
    except Exception as e:
        path, mod = tracer.failed_in or ("", root)
        if isinstance(e, torch.fx.proxy.TraceError) and "control flow" in str(e):
            reason = ("has control flow on a tensor in its forward; refquant reads a straight-line forward only "
                      f"(torch.fx: {e})")
        else:
            reason = f"has a forward torch.fx cannot trace with refquant's leaves: {type(e).__name__}: {e}"
        raise rm.ModelError(path, _torch_type(mod), reason) from None


def _arg_name(root: nn.Module, node: torch.fx.Node, arg: Any) -> str:
    if not isinstance(arg, torch.fx.Node):
        path, mod = _where(root, node)
        raise rm.ModelError(path, _torch_type(mod), f"passes {arg!r} where refquant expects a tensor computed by the "
                                                    f"forward ({node.format_node()})")
    return arg.name


def _graph(root: nn.Module, fx_graph: torch.fx.Graph) -> tuple[rm.Graph, list[str]]:
    """The refquant Graph of a traced forward, and the paths of the modules it calls."""
    inputs, calls, used, output = [], [], [], None
    for node in fx_graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
        elif node.op == "call_module":
            mod = root.get_submodule(node.target)
            if node.kwargs or len(node.args) != 1:
                raise rm.ModelError(node.target, _torch_type(mod), f"is called with {len(node.args)} positional and "
                                                                   f"{len(node.kwargs)} keyword arguments; refquant "
                                                                   f"supports module(x)")
            calls.append(rm.Call(node.target, (_arg_name(root, node, node.args[0]),), node.name))
            used.append(node.target)
        elif node.op == "call_function" and node.target is _functional_call:
            path, method, *args = node.args
            mod = root.get_submodule(path)
            if method not in rm.FUNCTIONAL_METHODS:
                raise rm.ModelError(path, _torch_type(mod), f"calls the unsupported method {method!r} (supported: "
                                                            f"{rm.FUNCTIONAL_METHODS})")
            kwargs = dict(node.kwargs)
            dim = 0
            if method == "cat":
                tensors = args[0] if args else kwargs.pop("x")
                dim = args[1] if len(args) > 1 else kwargs.pop("dim", 0)
                if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or kwargs:
                    raise rm.ModelError(path, _torch_type(mod), "calls cat with arguments refquant does not read "
                                                                "(expected cat([tensors], dim) with an int dim)")
                args = list(tensors)
            elif kwargs:
                raise rm.ModelError(path, _torch_type(mod), f"calls {method} with keyword arguments {sorted(kwargs)}")
            calls.append(rm.Call(path, tuple(_arg_name(root, node, a) for a in args), node.name, method=method,
                                 dim=dim))
            used.append(path)
        elif node.op == "output":
            if not isinstance(node.args[0], torch.fx.Node):
                raise rm.ModelError("", _torch_type(root), "returns something other than one tensor; refquant "
                                                           "models have one output")
            output = node.args[0].name
        else:
            path, mod = _where(root, node)
            what = {"call_function": "calls the function", "call_method": "calls the tensor method",
                    "get_attr": "reads the attribute"}[node.op]
            target = getattr(node.target, "__name__", node.target)
            raise rm.ModelError(path, _torch_type(mod), f"{what} {target!r} in its forward; refquant reads modules "
                                                        f"and FloatFunctional methods only (use nn.ReLU, nn.Flatten, "
                                                        f"FloatFunctional)")
    return rm.Graph(tuple(inputs), tuple(calls), output), used


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _float_module(path: str, mod: nn.Module) -> rm.FloatModule:
    if type(mod) is QuantStub:
        return rm.QuantStub()
    if type(mod) is DeQuantStub:
        return rm.DeQuantStub()
    if type(mod) is nn.Linear or type(mod) is nni.LinearReLU:
        linear = mod if type(mod) is nn.Linear else mod[0]
        if type(mod) is nni.LinearReLU and not (type(mod[0]) is nn.Linear and type(mod[1]) is nn.ReLU):
            raise rm.ModelError(path, _torch_type(mod), "is a LinearReLU whose children are not (Linear, ReLU)")
        if linear.weight.dtype != torch.float32:
            raise rm.ModelError(path, _torch_type(mod), f"has a {linear.weight.dtype} weight; refquant expects float32")
        bias = None if linear.bias is None else _numpy(linear.bias)
        return rm.Linear(_numpy(linear.weight), bias, relu=type(mod) is nni.LinearReLU)
    if type(mod) is nn.Dropout:
        if mod.training and mod.p > 0:
            raise rm.ModelError(path, _torch_type(mod), "is in training mode: call model.eval() before quantizing "
                                                        "(torch's post-training quantization calibrates in eval mode)")
        return rm.Dropout()
    if type(mod) is nnq.FloatFunctional:
        return rm.FloatFunctional()
    return _shared_module(path, mod)


def _shared_module(path: str, mod: nn.Module) -> rm.FloatModule:
    """The modules convert leaves as they are."""
    if type(mod) is nn.ReLU:
        return rm.ReLU()
    if type(mod) is nn.Identity:
        return rm.Identity()
    if type(mod) is nn.Flatten:
        return rm.Flatten(mod.start_dim, mod.end_dim)
    subclass = next((t.__name__ for t in (*FLOAT_LEAVES, *CONVERTED_LEAVES, *FUNCTIONAL_CLASSES)
                     if isinstance(mod, t)), None)
    hint = f" (a subclass of {subclass}: torch's prepare and convert swap the exact type only)" if subclass else ""
    raise rm.ModelError(path, _torch_type(mod), "is not a module refquant supports (QuantStub, DeQuantStub, Linear, "
                                                "LinearReLU, ReLU, Dropout, Identity, Flatten, FloatFunctional)"
                        + hint)


def _converted_module(path: str, mod: nn.Module) -> rm.QuantizedModule:
    if type(mod) is nnq.Quantize:
        if mod.dtype != torch.quint8:
            raise rm.ModelError(path, _torch_type(mod), f"quantizes to {mod.dtype}; refquant models quint8")
        return rm.Quantize(float(mod.scale), int(mod.zero_point))
    if type(mod) is nnq.DeQuantize:
        return rm.DeQuantize()
    if type(mod) is nnq.Linear or type(mod) is nniq.LinearReLU:
        w = mod.weight()
        if w.dtype != torch.qint8:
            raise rm.ModelError(path, _torch_type(mod), f"has a {w.dtype} weight; refquant models qint8 weights")
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            if w.q_per_channel_axis() != 0:
                raise rm.ModelError(path, _torch_type(mod), "has per-channel weight qparams on an axis other than 0")
            scales, zero_points = _numpy(w.q_per_channel_scales()), _numpy(w.q_per_channel_zero_points())
            qscheme = "per_channel_affine"
        else:
            scales, zero_points = np.array([w.q_scale()]), np.array([w.q_zero_point()])
            qscheme = "per_tensor_affine"
        bias = mod.bias()
        return rm.ConvertedLinear(_numpy(w.int_repr()), scales, zero_points, None if bias is None else _numpy(bias),
                                  float(mod.scale), int(mod.zero_point), relu=type(mod) is nniq.LinearReLU,
                                  weight_qscheme=qscheme)
    if type(mod) in (nnq.Dropout, nn.Dropout):
        return rm.Dropout()  # QuantizedDropout.forward returns its input
    if type(mod) is nnq.QFunctional:
        return rm.QFunctional(float(mod.scale), int(mod.zero_point))
    return _shared_module(path, mod)


def _is_converted(root: nn.Module) -> bool:
    """True for a converted model, False for a float one; a prepared model (observers attached) is refused."""
    kinds = set()
    for path, mod in root.named_modules():
        if hasattr(mod, "activation_post_process") and not isinstance(mod.activation_post_process, nn.Identity):
            raise rm.ModelError(path, _torch_type(mod), "carries an activation observer: this is a prepared model; "
                                                        "pass the float model (before prepare) or the converted one")
        if isinstance(mod, (QuantStub, DeQuantStub, nnq.FloatFunctional)) or type(mod) in (nn.Linear,
                                                                                             nni.LinearReLU):
            kinds.add(("float", path, mod))
        elif isinstance(mod, (nnq.Quantize, nnq.DeQuantize, nnq.Linear, nnq.QFunctional)):
            kinds.add(("converted", path, mod))
    found = {k for k, _, _ in kinds}
    if found == {"float", "converted"}:
        path, mod = next((p, m) for k, p, m in sorted(kinds, key=lambda t: t[1]) if k == "float")
        raise rm.ModelError(path, _torch_type(mod), "is a float module in a converted model (a partly converted "
                                                    "model); refquant reads float models or fully converted ones")
    return found == {"converted"}


def from_torch(model: nn.Module, engine: str | None = None, *, saturate_int16_pairs: bool = False,
               deferred: bool = False) -> rm.FloatModel | rm.QuantizedModel | DeferredFloatModel:
    """refquant's description of a torch eager model: a QuantizedModel for a converted model, a FloatModel for a
    float one (with QuantStub / DeQuantStub, un-prepared).

    Args:
        model: the torch model (``nn.Module``).
        engine: for a converted model, the engine its quantized ops run on; None: ``torch.backends.quantized.engine``
            now. refquant models "fbgemm", "x86", "qnnpack" and "onednn" (oneDNN's matmul kernel can change per
            call: see refquant.model.QuantizedModel.trace's ``linear_kernels``).
        saturate_int16_pairs: model a CPU without VNNI in the quantized Linears (refquant.matmul eq. M2).
        deferred: for a float model, return a :class:`DeferredFloatModel` (read without importing refquant;
            ``.build()`` makes the FloatModel, with the same checks); a converted model is read at once.

    The converted model's ``num_threads`` is ``torch.get_num_threads()`` (quantized add / mul of >= 32,768
    elements depend on it; refquant.functional eq. F0).
    """
    _torch_modules()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    converted = _is_converted(model)
    if not converted and engine is not None:
        raise ValueError(f"engine={engine!r} applies to a converted model; for a float model pass it to convert()")
    defer = deferred and not converted
    with rm.deferring(defer):
        fx_graph = _trace(model, CONVERTED_LEAVES if converted else FLOAT_LEAVES)
        graph, used = _graph(model, fx_graph)
        read = _converted_module if converted else _float_module
        modules = {path: read(path, model.get_submodule(path)) for path in dict.fromkeys(used)}
    torch_types = {path: _torch_type(model.get_submodule(path)) for path in modules}
    if defer:
        return DeferredFloatModel(modules, graph, torch_types)
    if not converted:
        return _named_by_torch(lambda: rm.FloatModel(modules, graph), torch_types)
    engine = torch.backends.quantized.engine if engine is None else engine
    return _named_by_torch(lambda: rm.QuantizedModel(modules, graph, engine=engine, num_threads=torch.get_num_threads(),
                                                     saturate_int16_pairs=saturate_int16_pairs), torch_types)
