"""Random eager models of the modules refquant.model supports, built, prepared, calibrated and converted by torch
(tests only), and torch's side of every comparison: what each observer saw, every call's output, the Linears'
accumulators (derived from torch's own integer tensors with exact int64 ops)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, get_default_qconfig, prepare


AVX2_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2_kernels = pytest.mark.skipif(
    not AVX2_KERNELS, reason="refquant.functional models torch's AVX2 quantized add/mul/cat kernels (also run on "
    "AVX-512 CPUs); this torch runs its DEFAULT ones (ATEN_CPU_CAPABILITY=default or a CPU without AVX2)")


# ----------------------------------------------------------------------------------------------------------------
# blocks: tensor -> tensor, each a small module with a straight-line forward

class LinearBlock(nn.Module):
    """fc -> act (ReLU to fuse, ReLU left unfused, or Identity) -> tail (Dropout or Identity)."""

    def __init__(self, k: int, n: int, act: str, tail: str, bias: bool):
        super().__init__()
        self.fc = nn.Linear(k, n, bias=bias)
        self.act = nn.ReLU() if act in ("fused", "relu") else nn.Identity()
        self.fuse = act == "fused"
        self.tail = nn.Dropout(0.3) if tail == "dropout" else nn.Identity()

    def forward(self, x):
        return self.tail(self.act(self.fc(x)))


class Residual(nn.Module):
    """f.<op>(x, body(x)) with op add, add_relu or mul (body keeps the width), or the operands swapped."""

    def __init__(self, body: nn.Module, op: str, swap: bool):
        super().__init__()
        self.body, self.f, self.op, self.swap = body, FloatFunctional(), op, swap

    def forward(self, x):
        y = self.body(x)
        a, b = (y, x) if self.swap else (x, y)
        return getattr(self.f, self.op)(a, b)


class Concat(nn.Module):
    """f.cat([x, body(x)], dim) (or [body(x), x, ...]), along the last dimension or dim 1 of 4-D tensors."""

    def __init__(self, body: nn.Module, dim: int, order: int):
        super().__init__()
        self.body, self.f, self.dim, self.order = body, FloatFunctional(), dim, order

    def forward(self, x):
        y = self.body(x)
        parts = [[x, y], [y, x], [x, y, x]][self.order]
        return self.f.cat(parts, self.dim)


class SelfOp(nn.Module):
    """f.<op>(x, relu(x)) or f.cat([x, relu(x)], dim): both operands in x's memory layout (channels-last after a cat
    along dim 1 of 4-D tensors), where Residual mixes layouts (a Linear's output is row-major)."""

    def __init__(self, op: str, dim: int = 1):
        super().__init__()
        self.relu, self.f, self.op, self.dim = nn.ReLU(), FloatFunctional(), op, dim

    def forward(self, x):
        if self.op == "cat":
            return self.f.cat([x, self.relu(x)], self.dim)
        return getattr(self.f, self.op)(x, self.relu(x))


class Repeat(nn.Module):
    """The same Linear twice, fc(relu(fc(x))): one module, one observer, two calls."""

    def __init__(self, k: int):
        super().__init__()
        self.fc, self.relu = nn.Linear(k, k), nn.ReLU()

    def forward(self, x):
        return self.fc(self.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, body: nn.Module, flatten_first: bool, flatten_last: bool):
        super().__init__()
        self.quant = QuantStub()
        self.flat_in = nn.Flatten() if flatten_first else nn.Identity()
        self.body = body
        self.flat_out = nn.Flatten() if flatten_last else nn.Identity()
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.flat_out(self.body(self.flat_in(self.quant(x)))))


@dataclass
class Spec:
    """A random model: the torch float model (weights drawn from ``rng``), its input shape (without the batch),
    a description, and the counts of layers."""

    model: Net
    input_shape: tuple[int, ...]
    text: str
    linears: int = 0
    functionals: int = 0


def random_model(rng: np.random.Generator) -> Spec:
    """Depth 1-5, widths 1-12, 2-D, 3-D (Flatten of 3-D input) or 4-D inputs (cat on dim 1 of (B, 1, H, W)
    tensors, torch's channels-last cat), fused and unfused ReLUs, residual add / add_relu / mul, cat, Dropout,
    Identity, nested Sequentials, a Linear called twice."""
    kind = rng.choice(["2d", "3d_flatten", "3d", "4d"], p=[0.4, 0.2, 0.2, 0.2])
    k = int(rng.integers(1, 13))
    if kind == "2d":
        input_shape = (k,)
    elif kind in ("3d", "3d_flatten"):
        input_shape = (int(rng.integers(1, 5)), k)
    else:
        input_shape = (1, int(rng.integers(1, 4)), k)
    width = int(np.prod(input_shape)) if kind == "3d_flatten" else k
    ndim = 2 if kind in ("2d", "3d_flatten") else len(input_shape) + 1
    counts = {"linears": 0, "functionals": 0}
    text = []

    def linear_block(k_in: int, n_out: int) -> nn.Module:
        counts["linears"] += 1
        act = str(rng.choice(["fused", "relu", "none"]))
        tail = str(rng.choice(["dropout", "identity", "none"], p=[0.2, 0.2, 0.6]))
        text.append(f"Linear({k_in},{n_out}){'+' + act if act != 'none' else ''}")
        return LinearBlock(k_in, n_out, act, tail, bias=bool(rng.random() < 0.85))

    blocks: list[nn.Module] = []
    for _ in range(int(rng.integers(1, 6))):
        choice = rng.choice(["linear", "residual", "concat", "relu", "repeat", "nested", "selfop"],
                            p=[0.28, 0.22, 0.15, 0.08, 0.07, 0.1, 0.1] if ndim < 4 else
                            [0.15, 0.2, 0.3, 0.05, 0.05, 0.05, 0.2])
        if choice == "linear" or (choice == "concat" and ndim == 4 and rng.random() < 0.3):
            n = int(rng.integers(1, 13))
            blocks.append(linear_block(width, n))
            width = n
        elif choice == "residual":
            op = str(rng.choice(["add", "add_relu", "mul"]))
            counts["functionals"] += 1
            blocks.append(Residual(linear_block(width, width), op, bool(rng.random() < 0.3)))
            text.append(op)
        elif choice == "concat":
            n = int(rng.integers(1, 13))
            order = int(rng.integers(0, 3))
            if ndim == 4:  # (B, C, H, W) along C: the body keeps W, so both parts are (B, C, H, W)
                dim, n = 1, width
            else:
                dim = int(rng.choice([-1, ndim - 1]))
            counts["functionals"] += 1
            blocks.append(Concat(linear_block(width, n), dim, order))
            text.append(f"cat(dim={dim})")
            if ndim != 4:  # the last dimension grows; along dim 1 of 4-D tensors the width stays
                width = width + n if order < 2 else 2 * width + n
        elif choice == "selfop":
            op = str(rng.choice(["add", "add_relu", "mul", "cat"]))
            dim = 1 if ndim == 4 else -1
            counts["functionals"] += 1
            blocks.append(SelfOp(op, dim))
            text.append(f"self-{op}")
            if op == "cat" and ndim != 4:
                width *= 2
        elif choice == "relu":
            blocks.append(nn.ReLU())
            text.append("ReLU")
        elif choice == "repeat":
            counts["linears"] += 1
            blocks.append(Repeat(width))
            text.append(f"Linear({width},{width}) twice")
        else:
            n = int(rng.integers(1, 13))
            inner = [linear_block(width, n), nn.Sequential(linear_block(n, n), nn.ReLU())]
            blocks.append(nn.Sequential(*inner))
            width = n
    body = nn.Sequential(*blocks)
    net = Net(body, flatten_first=kind == "3d_flatten", flatten_last=kind in ("3d", "4d") and rng.random() < 0.5)
    return Spec(net.eval(), input_shape, f"{kind} {input_shape}: " + " -> ".join(text), **counts)


def fusions(model: nn.Module) -> list[list[str]]:
    """fuse_modules' lists: every LinearBlock's [fc, act] whose ReLU is to be fused."""
    return [[f"{path}.fc", f"{path}.act"] for path, m in model.named_modules()
            if isinstance(m, LinearBlock) and m.fuse]


def random_batch(rng: np.random.Generator, batch: int, input_shape: tuple[int, ...], spread: float = 1.0
                 ) -> np.ndarray:
    dist = rng.choice(["normal", "uniform", "laplace", "outliers"])
    shape = (batch, *input_shape)
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-2, 2, shape)
    elif dist == "laplace":
        x = rng.laplace(0, 1, shape)
    else:
        x = rng.standard_normal(shape) * np.where(rng.random(shape) < 0.03, 10.0, 1.0)
    return (x * spread).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# torch's side

@dataclass
class TorchRun:
    """The float (fused) model, the converted model, and what each activation observer saw, by module path."""

    float_model: nn.Module
    converted: nn.Module
    observed: dict[str, list[np.ndarray]] = field(default_factory=dict)
    observers: dict[str, object] = field(default_factory=dict)


@contextlib.contextmanager
def torch_engine(engine: str):
    """torch.backends.quantized.engine = engine inside, restored after (other test files set their own)."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved


def quantize_with_torch(model: nn.Module, batches: list[np.ndarray], engine: str = "fbgemm") -> TorchRun:
    """fuse_modules, prepare, calibrate, convert, as the eager flow does; records every observer's inputs."""
    with torch_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fuse_modules(model, fusions(model)) if fusions(model) else model
        fused.qconfig = get_default_qconfig(engine)
        prepared = prepare(fused)
        run = TorchRun(fused, None)
        for name, mod in prepared.named_modules():
            if name.endswith(".activation_post_process") and not isinstance(mod, nn.Identity):
                owner = name[: -len(".activation_post_process")]
                run.observers[owner] = mod
                mod.register_forward_pre_hook(
                    lambda m, args, owner=owner: run.observed.setdefault(owner, []).append(args[0].numpy().copy()))
        with torch.no_grad():
            for x in batches:
                prepared(torch.from_numpy(x))
        run.converted = convert(prepared)
    return run


@dataclass
class TorchCall:
    output: np.ndarray  # uint8 codes or float32
    qparams: tuple[float, int] | None
    input_codes: np.ndarray | None = None  # of a quantized Linear


def torch_calls(converted: nn.Module, x: np.ndarray) -> tuple[np.ndarray, dict[str, list[TorchCall]]]:
    """Run the converted model on ``x``; every call's output by module path, in call order (QFunctional calls
    through forward hooks on their ``activation_post_process``, the Identity every method ends with)."""
    calls: dict[str, list[TorchCall]] = {}
    handles = []

    def record(path, want_input):
        def hook(mod, args, out):
            qp = (out.q_scale(), out.q_zero_point()) if out.is_quantized else None
            codes = out.int_repr().numpy().copy() if out.is_quantized else out.numpy().copy()
            inp = args[0].int_repr().numpy().copy() if want_input else None
            calls.setdefault(path, []).append(TorchCall(codes, qp, inp))
        return hook

    for path, mod in converted.named_modules():
        if path.endswith(".activation_post_process"):
            owner = path[: -len(".activation_post_process")]
            handles.append(mod.register_forward_hook(record(owner, False)))
        elif isinstance(mod, torch.ao.nn.quantized.Linear) or (path and not list(mod.children())
                                                                  and not path.endswith("._packed_params")):
            handles.append(mod.register_forward_hook(record(path, isinstance(mod, torch.ao.nn.quantized.Linear))))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = converted(torch.from_numpy(x)).numpy()
    finally:
        for h in handles:
            h.remove()
    return y, calls


def torch_accumulators(linear, input_codes_u8: np.ndarray, input_zero_point: int, saturate_int16_pairs: bool) -> np.ndarray:
    """The int32 ``raw`` torch's kernel requantizes, from torch's own integers (crosscheck's exact int64 derivation,
    int16-saturated pairs where fbgemm runs its pre-VNNI kernels)."""
    from crosscheck.torch_model import derived_accumulators

    w = linear.weight()
    per_channel = w.qscheme() == torch.per_channel_affine
    zw = w.q_per_channel_zero_points().numpy() if per_channel else np.array([w.q_zero_point()])
    return derived_accumulators(input_codes_u8, w.int_repr().numpy(), input_zero_point, zw,
                                saturate_int16_pairs=saturate_int16_pairs)


def torch_saturates_int16_pairs() -> bool:
    """True where torch's fbgemm sums u8·s8 products in int16-saturated pairs (crosscheck.isa's probe)."""
    from crosscheck.isa import saturate_int16_pairs, torch_fbgemm_kernel_family

    return saturate_int16_pairs(torch_fbgemm_kernel_family())


def power_of_two_qparams(converted: nn.Module, rng: np.random.Generator) -> None:
    """Round every Quantize's, quantized Linear's and QFunctional's output scale to a power of two (in place), and
    move some zero points: the sums in add / cat / mul then land on k + 0.5 often, where the vector and scalar
    lambdas (and the channels-last cat) round differently. A stress test of the layer-by-layer parity."""
    def pow2(s: float) -> float:
        return float(2.0 ** round(float(np.log2(s)) + rng.integers(-1, 2)))

    for mod in converted.modules():
        if isinstance(mod, torch.ao.nn.quantized.Quantize):
            mod.scale.fill_(pow2(float(mod.scale)))
        elif isinstance(mod, (torch.ao.nn.quantized.Linear, torch.ao.nn.quantized.QFunctional)):
            mod.scale = pow2(mod.scale)
            if rng.random() < 0.3:
                mod.zero_point = int(rng.integers(0, 256))
