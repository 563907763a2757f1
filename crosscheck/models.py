"""The models of ``python -m crosscheck.model`` and their data, built in the torch worker (imports torch).

Built in, both trained at start (full-batch Adam, a second or two) on scikit-learn's bundled ``load_digits``: 1,797
8x8 images of handwritten digits, pixel values 0..16, read from scikit-learn's package data (nothing downloaded).
The images are scaled to [0, 1] and split by a fixed permutation (``numpy.random.default_rng(seed)``) into 1,437
training images, which also calibrate the quantized model, and 360 held-out images, which evaluate it:

    digits     QuantStub -> Linear(64, 64) + ReLU -> Linear(64, 32) + ReLU -> Linear(32, 10) -> DeQuantStub
               (each Linear + ReLU fused to LinearReLU before prepare)
    residual   QuantStub -> Linear(64, 32) + ReLU (fused) -> [Linear(32, 32) -> ReLU (unfused nn.ReLU)]
               -> FloatFunctional.add(x, block(x)) -> Linear(32, 10) -> DeQuantStub

The user's own model (``--model MODULE:FUNCTION``): ``importlib.import_module(MODULE)`` (from the working
directory, as ``python -m`` puts it first on sys.path), ``FUNCTION()`` must return the float ``nn.Module`` (with its
QuantStub / DeQuantStub, already fused if it is to be); ``--state-dict FILE.pt`` is loaded with
``torch.load(FILE, weights_only=True)`` (tensors only: no code runs) and ``load_state_dict(..., strict=True)``.
``--pickled-model FILE.pt`` loads a whole module saved with ``torch.save(model)``, which unpickles, i.e. runs code
named in the file: only with ``--trust-pickle``. The data comes from ``--calib`` and ``--inputs`` (NumPy arrays the
CLI loaded with ``allow_pickle=False`` and checked).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from .torch_model import chunk_rows, chunks
from .worker import UsageError

TRAIN_IMAGES = 1437
"""Training images (80% of load_digits' 1,797); the other 360 are held out."""


class DigitsMLP(nn.Module):
    """QuantStub -> Linear(64, 64) + ReLU -> Linear(64, 32) + ReLU -> Linear(32, 10) -> DeQuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.fc1, self.relu1 = nn.Linear(64, 64), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(64, 32), nn.ReLU()
        self.fc3 = nn.Linear(32, 10)
        self.dequant = DeQuantStub()

    fusions = [["fc1", "relu1"], ["fc2", "relu2"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.quant(x)))))))


class ResidualBlock(nn.Module):
    """x + relu(fc(x)) through a FloatFunctional (its own observer, its own scale and zero point once converted)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc, self.relu, self.add = nn.Linear(width, width), nn.ReLU(), FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add.add(x, self.relu(self.fc(x)))


class DigitsResidual(nn.Module):
    """QuantStub -> Linear(64, 32) + ReLU (fused) -> residual block (unfused ReLU, FloatFunctional.add) ->
    Linear(32, 10) -> DeQuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.fc_in, self.relu_in = nn.Linear(64, 32), nn.ReLU()
        self.block = ResidualBlock(32)
        self.fc_out = nn.Linear(32, 10)
        self.dequant = DeQuantStub()

    fusions = [["fc_in", "relu_in"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc_out(self.block(self.relu_in(self.fc_in(self.quant(x))))))


BUILTIN = {"digits": DigitsMLP, "residual": DigitsResidual}


@dataclass
class Built:
    """A model and its data, ready for crosscheck.torch_model.model_events."""

    model: nn.Module
    calibration: list[torch.Tensor]
    evaluation: Iterator[tuple[torch.Tensor, Any]]
    fusions: list[list[str]] | None = None
    info: dict = field(default_factory=dict)


def digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels): load_digits / 16 as float32 (N, 64)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:TRAIN_IMAGES], order[TRAIN_IMAGES:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, steps: int = 300) -> dict:
    """Full-batch Adam on the cross-entropy (the float model, before any quantization)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()  # from the seeded generator
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    return {"steps": steps, "optimizer": "Adam(lr=0.01), full batch", "loss": float(loss.detach()),
            "train_accuracy": accuracy, "seconds": time.perf_counter() - start}


def build_builtin(config) -> Built:
    x_train, y_train, x_test, y_test = digits(config.seed)
    model = BUILTIN[config.model]()
    training = train(model, x_train, y_train, config.seed)
    rows = config.batch_size
    calibration = [torch.from_numpy(np.ascontiguousarray(x_train[i:i + rows])) for i in range(0, len(x_train), rows)]
    info = {"name": config.model, "description": model.__doc__.split("\n")[0] if model.__doc__ else "",
            "data": "scikit-learn load_digits (8x8 images / 16), fixed split", "train_images": int(len(x_train)),
            "test_images": int(len(x_test)), "training": training}
    return Built(model, calibration, chunks(x_test, len(x_test), y_test), type(model).fusions, info)


def _import_factory(factory: str, cwd: str):
    module_name, _, function = factory.partition(":")
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # like python -m: the working directory first
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"--model {factory}: cannot import module {module_name!r} (from {cwd}): "
                         f"{type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if fn is None or not callable(fn):
        raise UsageError(f"--model {factory}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                         f"callable {function!r}")
    try:
        model = fn()
    except Exception as e:
        raise UsageError(f"--model {factory}: {function}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {factory}: {function}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_state_dict(model: nn.Module, path: str, cwd: str) -> None:
    try:
        state = torch.load(os.path.join(cwd, path), weights_only=True, map_location="cpu")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (" (it holds more than tensors: a whole pickled module? Load one with --pickled-model FILE "
                    "--trust-pickle, which runs code from the file)")
        raise UsageError(f"--state-dict {path}: torch.load(weights_only=True) failed: {first}{hint}") from None
    if not isinstance(state, dict):
        raise UsageError(f"--state-dict {path}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise UsageError(f"--state-dict {path}: does not fit the model: {' '.join(str(e).split())}") from None


def build_user(config) -> Built:
    if config.pickled is not None:
        if not config.trust_pickle:  # the CLI refuses it first; never unpickle without the flag
            raise UsageError(f"--pickled-model {config.pickled}: loading a pickled module runs code from the file; "
                             f"pass --trust-pickle if you trust it")
        try:
            model = torch.load(os.path.join(config.cwd, config.pickled), weights_only=False, map_location="cpu")
        except Exception as e:
            raise UsageError(f"--pickled-model {config.pickled}: torch.load failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"--pickled-model {config.pickled}: holds a {type(model).__name__}, not a torch.nn.Module")
        name = os.path.basename(config.pickled)
    else:
        model = _import_factory(config.factory, config.cwd)
        if config.state_dict is not None:
            _load_state_dict(model, config.state_dict, config.cwd)
        name = config.factory
    model.eval()
    rows = config.batch_size
    calib = config.calib
    calibration = [torch.from_numpy(np.ascontiguousarray(calib[i:i + rows])) for i in range(0, len(calib), rows)]
    inputs = config.inputs
    evaluation = chunks(inputs, chunk_rows(inputs.shape[1:])) if inputs is not None else iter(())
    info = {"name": name, "description": type(model).__name__, "data": "--calib" + (" and --inputs" if inputs is
                                                                                     not None else ""),
            "calib_samples": int(len(calib)), "inputs": 0 if inputs is None else int(len(inputs))}
    return Built(model, calibration, evaluation, None, info)


def build(config) -> Built:
    """The model of a crosscheck.model_study.ModelConfig and its data."""
    if config.model in BUILTIN:
        return build_builtin(config)
    if config.model == "user":
        return build_user(config)
    raise UsageError(f"unknown model {config.model!r}")
