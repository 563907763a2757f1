"""Dynamic quantization (refquant.dynamic) against torch's dynamic Linear, live, on fbgemm, x86, qnnpack and onednn.

Every parity test builds torch's module the user's way (``quantize_dynamic`` with ``default_dynamic_qconfig`` or
``per_channel_dynamic_qconfig``, or ``linear_prepack`` + ``linear_dynamic`` for given weight codes), runs it on fresh
random inputs and compares the float32 outputs by bit pattern; the intermediates torch exposes (weight codes and
scales, the input qparams, the input codes, exact int32 accumulators derived from torch's own integer tensors) are
compared too.

Two facts of the machine are asked of torch itself rather than assumed:
* which matmul kernel oneDNN runs (its verbose output names it): ``onednn_kernel_in_torch``;
* whether fbgemm sums products in int16-saturated pairs (no VNNI), which matters only with full 8-bit codes
  (``reduce_range=False``): ``fbgemm_saturates_in_torch``, from crosscheck.isa's probe (conftest's ``fbgemm_kernel``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import warnings

import numpy as np
import pytest
from numba.core import config as numba_config

torch = pytest.importorskip("torch")

from parity import assert_same  # noqa: E402

import refquant  # noqa: E402
from refquant import dynamic as dq  # noqa: E402
from refquant import matmul as mm  # noqa: E402
from refquant.matmul import matmul_u8s8_acc32_ref, matmul_u8s8_acc32_sat16_ref  # noqa: E402
from refquant.quantize import _quantize_mul_add_kernel, _quantize_mul_add_readable  # noqa: E402

F32 = np.float32
WEIGHT_QSCHEMES = ("per_tensor_symmetric", "per_channel_symmetric")
INPUT_KINDS = ("normal", "uniform", "heavy", "positive", "negative", "tiny", "huge", "mixed", "sparse", "ties",
               "constant", "zeros", "negative_constant", "single")


# ----------------------------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """torch on one thread: on the shared 2-core machine OpenMP's barriers cost milliseconds per op under load.
    The results do not depend on the thread count (test_thread_count_does_not_matter runs torch's default)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextlib.contextmanager
def quantized_engine(engine: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _qconfig(weight_qscheme: str):
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, qconfig
    if weight_qscheme == "per_tensor_symmetric":
        return qconfig.default_dynamic_qconfig
    if weight_qscheme == "per_channel_symmetric":
        return qconfig.per_channel_dynamic_qconfig
    observer = (PerChannelMinMaxObserver if weight_qscheme.startswith("per_channel") else MinMaxObserver)
    qscheme = getattr(torch, weight_qscheme)
    return QConfig(activation=qconfig.default_dynamic_quant_observer,
                   weight=observer.with_args(dtype=torch.qint8, qscheme=qscheme))


def torch_dynamic_linear(weight: np.ndarray, bias: np.ndarray | None, engine: str, weight_qscheme: str):
    """torch's module, built as a user builds it: quantize_dynamic(Sequential(Linear), {Linear: qconfig})."""
    N, K = weight.shape
    linear = torch.nn.Linear(K, N, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            linear.bias.copy_(torch.from_numpy(bias))
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear),
                                                       {torch.nn.Linear: _qconfig(weight_qscheme)},
                                                       dtype=torch.qint8)
    return model[0]


def torch_weight(module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 codes, float64 scales, int zero points) of torch's quantized weight."""
    qw = module.weight()
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return (qw.int_repr().numpy(), qw.q_per_channel_scales().numpy().astype(np.float64),
                qw.q_per_channel_zero_points().numpy())
    return qw.int_repr().numpy(), np.array([qw.q_scale()], np.float64), np.array([qw.q_zero_point()])


def run_torch(module, x: np.ndarray, engine: str) -> np.ndarray:
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(torch.from_numpy(x)).numpy()


def run_torch_op(packed, x: np.ndarray, engine: str, reduce_range: bool) -> np.ndarray:
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_dynamic(torch.from_numpy(x), packed, reduce_range=reduce_range).numpy()


def torch_prepack(w_i8: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bias, engine: str):
    if scales.size == 1:
        qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_i8), float(scales[0]), int(zero_points[0]))
    else:
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w_i8), torch.from_numpy(scales),
                                                      torch.from_numpy(zero_points.astype(np.int64)), 0)
    b = None if bias is None else torch.from_numpy(bias)
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack(qw, b)


def _capture_stdout_fd(fn) -> str:
    """Run fn with file descriptor 1 redirected to a temporary file (oneDNN's verbose lines are C printf's)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode(errors="replace")


def onednn_matmul_impls(module, inputs: list[np.ndarray]) -> list[str]:
    """oneDNN's implementation name (e.g. "brg_matmul:avx10_1_512_amx") of the matmul each input ran."""
    def run():
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for x in inputs:
                run_torch(module, x, "onednn")
    out = _capture_stdout_fd(run)
    return [line.split(",")[6] for line in out.splitlines() if ",exec,cpu,matmul," in line]


def _kernel_from_impl(impl: str) -> str | None:
    if impl == "gemm:jit":
        return "gemm_no_vnni"                                        # AVX2 without VNNI
    if not impl.startswith("brg_matmul:"):
        return None
    isa = impl.split(":", 1)[1]
    if "amx" in isa:
        return "brgemm_amx"
    if isa == "avx512_core":
        return "brgemm_no_vnni"
    return "brgemm_vnni"                                             # avx512_core_vnni, avx10_1_512, avx2_vnni, ...


@pytest.fixture(scope="module")
def onednn_kernel_in_torch() -> str:
    """The kernel family oneDNN runs here for a large shape, as its verbose output names it."""
    rng = np.random.default_rng(0)
    module = torch_dynamic_linear(rng.standard_normal((64, 64)).astype(F32), None, "onednn", "per_tensor_symmetric")
    impls = onednn_matmul_impls(module, [rng.standard_normal((64, 64)).astype(F32)])
    assert len(impls) == 1, f"expected one oneDNN matmul in the verbose output, got {impls}"
    kernel = _kernel_from_impl(impls[0])
    if kernel is None:
        pytest.skip(f"oneDNN runs {impls[0]} here, which refquant does not model")
    return kernel


@pytest.fixture(scope="module")
def fbgemm_saturates_in_torch(fbgemm_kernel) -> bool:
    """Does torch's fbgemm saturate int16 pairs here (crosscheck.isa's probe, the conftest fixture ``fbgemm_kernel``)?"""
    return fbgemm_kernel == "avx2"


def layer_kwargs(engine: str, onednn_kernel: str | None, saturate: bool = False) -> dict:
    if engine == "onednn":
        return {"onednn_kernel": onednn_kernel}
    if engine in ("fbgemm", "x86"):
        return {"saturate_int16_pairs": saturate}
    return {}


# ----------------------------------------------------------------------------------------------------------------
# random problems
# ----------------------------------------------------------------------------------------------------------------

def draw_input(rng: np.random.Generator, shape: tuple[int, ...], kind: str, engine: str = "fbgemm") -> np.ndarray:
    """A float32 input of one of INPUT_KINDS (the edges of the dynamic qparams choice included)."""
    size = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 3)
    elif kind == "uniform":
        lo = rng.uniform(-5, 5)
        x = rng.uniform(lo, lo + 10.0 ** rng.uniform(-2, 1), size)
    elif kind == "heavy":
        x = rng.standard_t(1.5, size) * 10.0 ** rng.uniform(-2, 2)
    elif kind == "positive":
        x = np.abs(rng.standard_normal(size)) * 10.0 ** rng.uniform(-3, 3) + rng.uniform(0, 2)
    elif kind == "negative":
        x = -np.abs(rng.standard_normal(size)) * 10.0 ** rng.uniform(-3, 3) - rng.uniform(0, 2)
    elif kind == "tiny":       # ranges around the 6.1e-5 scale cut-off, and below the 0.1 fallback
        x = rng.standard_normal(size) * 10.0 ** rng.uniform(-42, -2)
        if rng.random() < 0.3:
            x = np.abs(x) * rng.choice([-1, 1])
    elif kind == "huge":
        x = rng.standard_normal(size) * 10.0 ** rng.uniform(20, 37)
    elif kind == "mixed":
        x = rng.standard_normal(size) * 10.0 ** rng.uniform(-6, 4, size)
    elif kind == "sparse":
        x = rng.standard_normal(size) * (rng.random(size) < 0.1)
    elif kind == "constant":
        x = np.full(size, rng.standard_normal() * 10.0 ** rng.uniform(-8, 8))
    elif kind == "zeros":
        x = np.zeros(size)
    elif kind == "negative_constant":
        x = np.full(size, -abs(rng.standard_normal()) * 10.0 ** rng.uniform(-8, 3))
    elif kind == "single":
        x = rng.standard_normal(size) * 10.0 ** rng.uniform(-5, 5)
    elif kind == "ties":
        return draw_ties(rng, shape, engine)
    else:
        raise ValueError(kind)
    return x.astype(F32).reshape(shape)


def draw_ties(rng: np.random.Generator, shape: tuple[int, ...], engine: str) -> np.ndarray:
    """Values a few ulps around (j + 0.5)·s_x for the s_x the engine will choose: the input quantization's ties."""
    lo, hi = F32(-rng.uniform(0.05, 20)), F32(rng.uniform(0.05, 20))
    reduce_range = engine != "qnnpack"
    scale, _ = dq.choose_quantization_params(lo, hi, 0, 255, reduce_range)
    s_x = dq.onednn_scale_round_trip(scale)[()] if engine == "onednn" else F32(scale)
    j = rng.integers(-130, 130, shape)
    x = ((j + 0.5) * np.float64(s_x)).astype(F32)
    x = (x.view(np.int32) + rng.integers(-2, 3, shape).astype(np.int32)).view(F32)
    x = np.clip(x, lo, hi)
    flat = x.reshape(-1)
    flat[0], flat[-1] = lo, hi
    return x


def draw_weight(rng: np.random.Generator, N: int, K: int) -> np.ndarray:
    w = rng.standard_normal((N, K)) * 10.0 ** rng.uniform(-3, 1)
    if rng.random() < 0.5:                                           # rows of very different size (per-channel)
        w *= 10.0 ** rng.uniform(-3, 1, (N, 1))
    if rng.random() < 0.1:
        w[rng.integers(N)] = 0.0
    return w.astype(F32)


def draw_shape(rng: np.random.Generator, kind: str) -> tuple[tuple[int, ...], int]:
    """(input shape, N): 2-D mostly, some 3-D and 4-D; M and N around oneDNN's small-shape rule."""
    K = int(rng.choice([1, 2, 3, 15, 16, 17, 64, 255, 256, 257])) if rng.random() < 0.4 else int(rng.integers(1, 300))
    N = int(rng.choice([1, 4, 8, 9, 16, 64])) if rng.random() < 0.3 else int(rng.integers(1, 80))
    if kind == "single":
        return (1, K), N
    r = rng.random()
    if r < 0.7:
        M = int(rng.choice([1, 2, 8, 32, 33])) if rng.random() < 0.4 else int(rng.integers(1, 70))
        return (M, K), N
    if r < 0.9:
        return (int(rng.integers(1, 5)), int(rng.integers(1, 12)), K), N
    return (2, int(rng.integers(1, 4)), int(rng.integers(1, 5)), K), N


# ----------------------------------------------------------------------------------------------------------------
# parity helpers
# ----------------------------------------------------------------------------------------------------------------

def check_stages_against_torch(layer: dq.DynamicQuantizedLinear, st: dict, x: np.ndarray, w_i8: np.ndarray,
                               w_zp: np.ndarray, what: str) -> None:
    """The intermediates torch exposes: qparams (torch._choose_qparams_per_tensor), input codes
    (torch.quantize_per_tensor with those qparams; fbgemm/x86/qnnpack quantize exactly so), and the int32
    accumulators recomputed with exact int64 ops from torch's codes and torch's weight codes."""
    xt = torch.from_numpy(x)
    if x.size:
        t_min, t_max = torch.aminmax(xt)
        assert st["x_min"] == t_min.item() and st["x_max"] == t_max.item(), what
    scale_t, zp_t = torch._choose_qparams_per_tensor(xt, layer.reduce_range)
    assert (st["input_scale"], st["input_zero_point"]) == (scale_t, zp_t), (what, st["input_scale"], scale_t)
    if layer.engine == "onednn":
        return                        # oneDNN quantizes inside its own reorder: no torch op returns those codes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_t = torch.quantize_per_tensor(xt, scale_t, zp_t, torch.quint8).int_repr().numpy()
    assert_same(st["input_codes"], q_t, f"{what}: input codes")
    K = x.shape[-1]
    x_i64 = q_t.reshape(-1, K).astype(np.int64) - zp_t
    w_i64 = w_i8.astype(np.int64) - np.broadcast_to(w_zp.astype(np.int64), (w_i8.shape[0],))[:, None]
    if getattr(layer, "saturate_int16_pairs", False):  # pre-VNNI fbgemm: Σ of int16-saturated pairs (eq. M2)
        acc = matmul_u8s8_acc32_sat16_ref(q_t.reshape(-1, K), w_i8).astype(np.int64)
        w_zp_n = np.broadcast_to(w_zp.astype(np.int64), (w_i8.shape[0],))
        col = w_i8.astype(np.int64).sum(axis=1) - w_zp_n * K
        raw_i64 = acc - zp_t * col[None, :] - q_t.reshape(-1, K).astype(np.int64).sum(axis=1)[:, None] * w_zp_n
    else:
        raw_i64 = x_i64 @ w_i64.T
    raw = raw_i64.astype(np.int32).reshape(x.shape[:-1] + (w_i8.shape[0],))   # mod 2^32 as int32
    assert_same(st["accumulators"], raw, f"{what}: int32 accumulators")


def parity_run(rng, engine: str, weight_qscheme: str, n_modules: int, calls_per_module: int,
               onednn_kernel: str | None, kinds=INPUT_KINDS) -> tuple[int, int]:
    """Random modules, each called on several random inputs (so torch's per-module caches are exercised too)."""
    problems = outputs = 0
    for i in range(n_modules):
        kind0 = kinds[i % len(kinds)]
        shape, N = draw_shape(rng, kind0)
        K = shape[-1]
        weight = draw_weight(rng, N, K)
        bias = (rng.standard_normal(N) * 10.0 ** rng.uniform(-3, 2)).astype(F32) if rng.random() < 0.75 else None
        module = torch_dynamic_linear(weight, bias, engine, weight_qscheme)
        layer = dq.DynamicQuantizedLinear.from_float(weight, bias, engine=engine, weight_qscheme=weight_qscheme,
                                                     **layer_kwargs(engine, onednn_kernel))
        w_i8, w_scales, w_zp = torch_weight(module)
        assert_same(layer.weight_int8, w_i8, "weight codes")
        assert_same(layer.weight_scales, w_scales, "weight scales")
        for c in range(calls_per_module):
            kind = kind0 if c == 0 else kinds[int(rng.integers(len(kinds)))]
            if c and rng.random() < 0.5:                             # another batch size for the same module
                shape = (int(rng.integers(1, 70)), K)
            if kind == "single":
                shape = (1,) * (len(shape) - 1) + (K,)
            x = draw_input(rng, shape, kind, engine)
            what = f"{engine} {weight_qscheme} problem {i}.{c} ({kind}, x {x.shape}, N {N}, bias {bias is not None})"
            st = layer.stages(x)
            y = run_torch(module, x, engine)
            assert_same(st["output"], y, what)
            if c == 0:
                check_stages_against_torch(layer, st, x, w_i8, w_zp, what)
            problems += 1
            outputs += y.size
    return problems, outputs


# ----------------------------------------------------------------------------------------------------------------
# parity: the modules (default suite: 8 engine x qscheme pairs, 160 to 400 problems each)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_qscheme", WEIGHT_QSCHEMES)
@pytest.mark.parametrize("engine", dq.ENGINES)
def test_module_parity(rng, engine, weight_qscheme, onednn_kernel_in_torch):
    """quantize_dynamic's module vs DynamicQuantizedLinear.from_float: float32 outputs bit for bit, every input kind
    (normal, heavy tails, all positive/negative, tiny and huge magnitudes, constants, zeros, single elements,
    quantization ties), 2-D/3-D/4-D inputs, with and without bias, repeated calls on one module."""
    n_modules = {"fbgemm": 100, "x86": 100, "qnnpack": 80, "onednn": 40}[engine]    # torch's onednn and qnnpack
    problems, outputs = parity_run(rng, engine, weight_qscheme, n_modules=n_modules,  # prepack and first calls
                                   calls_per_module=4, onednn_kernel=onednn_kernel_in_torch)  # are slow
    print(f"{engine} {weight_qscheme}: {problems} problems, {outputs} float outputs, 0 differ")


@pytest.mark.slow
@pytest.mark.parametrize("weight_qscheme", WEIGHT_QSCHEMES)
@pytest.mark.parametrize("engine", dq.ENGINES)
def test_module_parity_slow(rng, engine, weight_qscheme, onednn_kernel_in_torch):
    n_modules = {"fbgemm": 3000, "x86": 3000, "qnnpack": 2000, "onednn": 1000}[engine]
    problems, outputs = parity_run(rng, engine, weight_qscheme, n_modules=n_modules, calls_per_module=4,
                                   onednn_kernel=onednn_kernel_in_torch)
    print(f"{engine} {weight_qscheme}: {problems} problems, {outputs} float outputs, 0 differ")


@pytest.mark.parametrize("engine", dq.ENGINES)
def test_large_k(rng, engine, onednn_kernel_in_torch):
    """K = 4096 (f32(raw) rounds once |raw| > 2^24) and K = 1000 with outliers, per tensor and per channel."""
    for weight_qscheme in WEIGHT_QSCHEMES:
        for K, kind in ((4096, "normal"), (4096, "uniform"), (1000, "heavy")):
            M, N = int(rng.integers(1, 40)), int(rng.integers(1, 80))
            weight = (rng.standard_normal((N, K))).astype(F32)
            bias = rng.standard_normal(N).astype(F32)
            module = torch_dynamic_linear(weight, bias, engine, weight_qscheme)
            layer = dq.DynamicQuantizedLinear.from_float(weight, bias, engine=engine, weight_qscheme=weight_qscheme,
                                                         **layer_kwargs(engine, onednn_kernel_in_torch))
            x = draw_input(rng, (M, K), kind)
            assert_same(layer(x), run_torch(module, x, engine), f"{engine} {weight_qscheme} K={K}")


@pytest.mark.skipif(numba_config.DISABLE_JIT or not mm._cpu_has("avx2"),
                    reason="needs Numba's JIT and a CPU with avx2")
@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
def test_seven_bit_codes_on_the_avx2_kernel(rng, monkeypatch, engine, onednn_kernel_in_torch):
    """With reduce_range (7-bit codes, the module's default but on qnnpack) the fused call may run eq. M2's avx2
    kernel for eq. M1 (refquant.matmul.kernel_for_seven_bit_codes), as it does on AVX2 CPUs without VNNI: forced here
    on any CPU with avx2 (refquant.matmul._cpu_has reports avx2 alone), the outputs equal torch's, whatever kernel
    torch runs. Every input kind, large K, M = 1 and beyond the thread pool's threshold."""
    monkeypatch.delenv(mm.KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(mm, "_cpu_has", lambda feature: feature == "avx2")
    for i, kind in enumerate(INPUT_KINDS + ("normal", "heavy")):
        shape, N = draw_shape(rng, kind)
        if i >= len(INPUT_KINDS):
            shape, N = ((1, 1100) if i % 2 else (70, 2050)), 130
        weight = draw_weight(rng, N, shape[-1])
        bias = rng.standard_normal(N).astype(F32) if i % 3 else None
        module = torch_dynamic_linear(weight, bias, engine, WEIGHT_QSCHEMES[i % 2])
        layer = dq.DynamicQuantizedLinear.from_float(weight, bias, engine=engine, weight_qscheme=WEIGHT_QSCHEMES[i % 2],
                                                     **layer_kwargs(engine, onednn_kernel_in_torch))
        assert layer.reduce_range
        if not layer._saturates():
            assert layer._product_kernel() == ("avx2", True)
        x = draw_input(rng, shape, kind, engine)
        assert_same(layer(x), run_torch(module, x, engine), f"{engine} {kind} x {x.shape} N {N}")


# ----------------------------------------------------------------------------------------------------------------
# parity: the op, with given weight codes (affine weights, reduce_range both ways)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.isa
@pytest.mark.parametrize("engine", dq.ENGINES)
def test_from_quantized_parity(rng, engine, onednn_kernel_in_torch, fbgemm_saturates_in_torch):
    """linear_prepack + linear_dynamic(reduce_range=True/False) vs DynamicQuantizedLinear.from_quantized (stages and
    the fused call), with symmetric and (not on onednn) affine weights, per tensor and per channel. With reduce_range=False, fbgemm/x86
    use full 8-bit codes: the model saturates int16 pairs exactly when the probe says torch does."""
    count = 0
    n_problems = 30 if engine == "onednn" else 60
    for i in range(n_problems):
        shape, N = draw_shape(rng, "normal")
        K = shape[-1]
        w_i8 = rng.integers(-128, 128, (N, K)).astype(np.int8)
        per_channel = bool(i % 2)
        n_params = N if per_channel else 1
        scales = (10.0 ** rng.uniform(-4, 0, n_params)).astype(F32).astype(np.float64)
        affine = engine != "onednn" and i % 4 >= 2
        zps = rng.integers(-20, 21, n_params) if affine else np.zeros(n_params, np.int64)
        bias = rng.standard_normal(N).astype(F32) if i % 3 else None
        packed = torch_prepack(w_i8, scales, zps, bias, engine)
        for reduce_range in (True, False):
            kind = INPUT_KINDS[int(rng.integers(len(INPUT_KINDS)))]
            x = draw_input(rng, shape, kind, engine)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # qnnpack's reduce_range warning
                layer = dq.DynamicQuantizedLinear.from_quantized(
                    w_i8, scales, zps, bias, engine=engine, reduce_range=reduce_range,
                    **layer_kwargs(engine, onednn_kernel_in_torch, saturate=fbgemm_saturates_in_torch))
            y = run_torch_op(packed, x, engine, reduce_range)
            st = layer.stages(x)
            what = f"{engine} problem {i} rr={reduce_range} ({kind}, x {x.shape}, affine {affine})"
            assert_same(st["output"], y, what)
            assert_same(layer(x), y, f"{what}, the fused call (its row offsets from the quantize pass)")
            check_stages_against_torch(layer, st, x, w_i8, zps, what)
            count += 1
    assert count == 2 * n_problems


@pytest.mark.parametrize("engine", dq.ENGINES)
def test_thread_count_does_not_matter(rng, engine, onednn_kernel_in_torch):
    """The same parity on torch's default thread count (2 on the reference machine), shapes big enough to split."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    try:
        for weight_qscheme in WEIGHT_QSCHEMES:
            weight = draw_weight(rng, 96, 200)
            bias = rng.standard_normal(96).astype(F32)
            module = torch_dynamic_linear(weight, bias, engine, weight_qscheme)
            layer = dq.DynamicQuantizedLinear.from_float(weight, bias, engine=engine, weight_qscheme=weight_qscheme,
                                                         **layer_kwargs(engine, onednn_kernel_in_torch))
            for M in (1, 64, 300):
                x = draw_input(rng, (M, 200), "normal")
                assert_same(layer(x), run_torch(module, x, engine), f"{engine} {weight_qscheme} M={M}")
    finally:
        torch.set_num_threads(previous)


CHILD_SCRIPT = """
import sys, warnings
import numpy as np
import torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
engine = sys.argv[2]
torch.backends.quantized.engine = engine
data = np.load(sys.argv[1])
outputs = {}
for i in range(int(data["n"])):
    w, x, rr = data[f"w{i}"], data[f"x{i}"], bool(data[f"rr{i}"])
    b = data[f"b{i}"] if f"b{i}" in data else None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        if b is not None:
            lin.bias.copy_(torch.from_numpy(b))
    qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if i % 2 else
               torch.ao.quantization.default_dynamic_qconfig)
    m = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: qconfig},
                                               dtype=torch.qint8)[0]
    print(f"PROBLEM {i}", flush=True)
    y = torch.ops.quantized.linear_dynamic(torch.from_numpy(x), m._packed_params._packed_params, reduce_range=rr)
    outputs[f"y{i}"] = y.numpy()
np.savez(sys.argv[3], **outputs)
"""


def run_in_child(tmp_path, engine: str, env_extra: dict, problems: list) -> tuple[list, list]:
    """torch's linear_dynamic in a fresh process with ``env_extra`` (instruction-set switches are read at start-up);
    returns the outputs and, per problem, the oneDNN matmul implementations the verbose output named."""
    import subprocess
    arrays = {"n": np.array(len(problems))}
    for i, (w, b, x, rr) in enumerate(problems):
        arrays.update({f"w{i}": w, f"x{i}": x, f"rr{i}": np.array(rr)})
        if b is not None:
            arrays[f"b{i}"] = b
    np.savez(tmp_path / "in.npz", **arrays)
    (tmp_path / "child.py").write_text(CHILD_SCRIPT)
    env = dict(os.environ, **env_extra)
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "in.npz"), engine,
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    impls: list[list[str]] = []
    for line in done.stdout.splitlines():
        if line.startswith("PROBLEM"):
            impls.append([])
        elif ",exec,cpu,matmul," in line and impls:
            impls[-1].append(line.split(",")[6])
    out = np.load(tmp_path / "out.npz")
    return [out[f"y{i}"] for i in range(len(problems))], impls


def other_isa_problems(rng, n: int) -> list:
    problems = []
    for i in range(n):
        M, K, N = int(rng.choice([1, 4, 40, 64])), int(rng.integers(8, 200)), int(rng.integers(4, 70))
        if i % 4 == 3:  # oneDNN gemm:jit's two K blocks (refquant.engines.onednn_gemm_pairs_restart)
            K = int(rng.choice([257, 301, 513, 765]))
        w = rng.uniform(-1, 1, (N, K)).astype(F32)
        if i % 3 == 0:                             # neighbouring products near 255·(-128): pairs leave int16
            w = rng.uniform(-1, -0.8, (N, K)).astype(F32)
        x = rng.uniform(0.5, 1, (M, K)).astype(F32) if i % 3 == 0 else draw_input(rng, (M, K), "normal")
        b = rng.standard_normal(N).astype(F32) if i % 2 else None
        problems.append((w, b, x, bool(i % 4 < 2)))
    return problems


ISA_CASES = [
    pytest.param("fbgemm", {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, id="fbgemm-AVX2"),
    pytest.param("onednn", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ONEDNN_VERBOSE": "1"}, id="onednn-AVX512_CORE"),
    pytest.param("onednn", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "ONEDNN_VERBOSE": "1"},
                 id="onednn-AVX512_CORE_VNNI", marks=pytest.mark.slow),
    pytest.param("onednn", {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "ONEDNN_VERBOSE": "1"}, id="onednn-AVX2_VNNI",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("engine, env_extra", ISA_CASES)
def test_cpus_without_vnni_or_amx(tmp_path, rng, engine, env_extra):
    """The other CPUs' kernels, live: torch in a child process with fbgemm held to AVX2 (the pre-VNNI kernel) or
    oneDNN held below AMX / VNNI. fbgemm-AVX2 must equal saturate_int16_pairs=True; oneDNN must equal the kernel
    its verbose output names (a CPU that lacks the ISA falls back further, and the name says which)."""
    problems = other_isa_problems(rng, 24)
    outputs, impls = run_in_child(tmp_path, engine, env_extra, problems)
    saturated_somewhere = False
    for i, ((w, b, x, rr), y) in enumerate(zip(problems, outputs)):
        qscheme = WEIGHT_QSCHEMES[i % 2]
        if engine == "fbgemm":
            kwargs = {"saturate_int16_pairs": True}
        else:
            assert len(impls[i]) == 1, impls[i]
            kernel = _kernel_from_impl(impls[i][0])
            if kernel is None:
                pytest.skip(f"oneDNN ran {impls[i][0]} here, which refquant does not model")
            kwargs = {"onednn_kernel": kernel}
        layer = dq.DynamicQuantizedLinear.from_float(w, b, engine=engine, reduce_range=rr, weight_qscheme=qscheme,
                                                     **kwargs)
        assert_same(layer(x), y, f"{engine} {env_extra} problem {i} (reduce_range={rr}, x {x.shape})")
        if layer._saturates():  # did a pair of this problem's codes leave int16 (eq. M2 != eq. M1)?
            codes = layer.stages(x)["input_codes"].reshape(-1, w.shape[1])
            saturated_somewhere |= not np.array_equal(matmul_u8s8_acc32_sat16_ref(codes, layer.weight_int8),
                                                      matmul_u8s8_acc32_ref(codes, layer.weight_int8))
    if engine == "fbgemm" or "AVX512_CORE" == env_extra.get("ONEDNN_MAX_CPU_ISA"):
        assert saturated_somewhere, "no problem exercised the int16 saturation"


def test_full_range_codes_without_vnni_differ(rng):
    """The model of a CPU without VNNI: with 8-bit codes (reduce_range=False) saturated pairs change outputs; with
    the module's 7-bit codes they cannot (2·127·128 = 32512 < 32767)."""
    weight = rng.uniform(-1, -0.8, (16, 64)).astype(F32)                 # products near 255·(-128)
    x = rng.uniform(0.8, 1, (8, 64)).astype(F32)
    outputs = {}
    for reduce_range in (False, True):
        for saturate in (False, True):
            layer = dq.DynamicQuantizedLinear.from_float(weight, None, engine="fbgemm", reduce_range=reduce_range,
                                                         saturate_int16_pairs=saturate)
            outputs[reduce_range, saturate] = layer(x)
    assert not np.array_equal(outputs[False, False], outputs[False, True])
    assert_same(outputs[True, True], outputs[True, False], "7-bit codes never saturate")


def test_onednn_kernels_differ_as_modelled(rng):
    """On the same problem the three oneDNN kernels give different floats where the model says they do."""
    weight = rng.uniform(-1, -0.8, (64, 100)).astype(F32)                # products near 255·(-128): pairs
    x = rng.uniform(0.8, 1, (64, 100)).astype(F32)                       # leave int16 without VNNI
    y = {k: dq.DynamicQuantizedLinear.from_float(weight, None, engine="onednn", reduce_range=False,
                                                 onednn_kernel=k)(x) for k in dq.ONEDNN_KERNELS}
    assert not np.array_equal(y["brgemm_amx"].view(np.uint32), y["brgemm_vnni"].view(np.uint32))
    assert not np.array_equal(y["brgemm_vnni"].view(np.uint32), y["brgemm_no_vnni"].view(np.uint32))


# ----------------------------------------------------------------------------------------------------------------
# oneDNN's kernel choice, as oneDNN reports it
# ----------------------------------------------------------------------------------------------------------------

def test_onednn_kernel_choice_matches_onednn(rng, onednn_kernel_in_torch):
    """refquant's small-shape rule (onednn_kernel_for_shape) names the kernel oneDNN's verbose output reports, at
    the rule's edges; default_onednn_kernel() predicts the family oneDNN runs on this CPU."""
    assert dq.default_onednn_kernel() == onednn_kernel_in_torch
    shapes = [(1, 256, 9), (1, 255, 300), (32, 64, 8), (32, 64, 9), (33, 64, 4), (16, 16, 64), (16, 17, 64),
              (64, 64, 64), (2, 300, 128), (8, 32, 32), (8, 32, 33)]
    for M, K, N in shapes:
        module = torch_dynamic_linear(rng.standard_normal((N, K)).astype(F32), None, "onednn",
                                      "per_tensor_symmetric")
        (impl,) = onednn_matmul_impls(module, [rng.standard_normal((M, K)).astype(F32)])
        formula = dq.onednn_kernel_for_shape(onednn_kernel_in_torch, M, K, N)
        combined = "amx" in impl or impl == "gemm:jit"  # AVX2's gemm:jit multiplies by the scales' product too
        assert combined == (formula == "onednn_combined_scale"), (M, K, N, impl, formula)


def test_onednn_kernel_rule_golden():
    rule = dq.onednn_kernel_for_shape
    assert rule("brgemm_amx", 1, 256, 1000) == "onednn_two_multiplies"      # M == 1 and K == 256
    assert rule("brgemm_amx", 1, 257, 1000) == "onednn_combined_scale"
    assert rule("brgemm_amx", 32, 100, 8) == "onednn_two_multiplies"        # M·N = 256
    assert rule("brgemm_amx", 32, 100, 9) == "onednn_combined_scale"
    assert rule("brgemm_amx", 33, 100, 1) == "onednn_combined_scale"        # M > 32
    assert rule("brgemm_amx", 1000, 16, 1000) == "onednn_two_multiplies"    # K <= 16
    for kernel in ("brgemm_vnni", "brgemm_no_vnni"):
        assert rule(kernel, 1000, 1000, 1000) == "onednn_two_multiplies"


# ----------------------------------------------------------------------------------------------------------------
# eq. DQ2 against torch's own op, and at its edges
# ----------------------------------------------------------------------------------------------------------------

def test_choose_quantization_params_parity(rng):
    """choose_quantization_params vs torch._choose_qparams_per_tensor (the same quant_utils function), the double
    scale and the zero point, over ranges of every kind (the 0.1 fallback, the 6.1e-5 cut-off and its three
    branches, constants, one sign only, huge ranges)."""
    n = 0
    for i in range(3000):
        kind = INPUT_KINDS[i % len(INPUT_KINDS)]
        x = draw_input(rng, (int(rng.integers(1, 20)),), kind if kind != "ties" else "normal")
        for reduce_range in (False, True):
            expected = torch._choose_qparams_per_tensor(torch.from_numpy(x), reduce_range)
            got = dq.choose_quantization_params(x.min(), x.max(), 0, 255, reduce_range)
            assert got == expected, (kind, x.min(), x.max(), reduce_range, got, expected)
            n += 1
    assert n == 6000


def test_choose_quantization_params_golden():
    # all zeros: scale 0 -> 0.1, zero point 0
    assert dq.choose_quantization_params(0.0, 0.0) == (0.1, 0)
    # [-1, 3] on 0..255: scale 4/255 in double; zero point from min: 0 + 63.75 -> 64
    assert dq.choose_quantization_params(-1.0, 3.0) == (4 / 255, 64)
    # reduce_range: 0..127
    assert dq.choose_quantization_params(-1.0, 3.0, reduce_range=True) == (4 / 127, 32)
    # a negative constant c: range [c, 0], zero point 255 (127 with reduce_range)
    assert dq.choose_quantization_params(-2.0, -2.0) == (2 / 255, 255)
    # tiny positive range: the scale is raised to f32(6.1e-5), the zero point stays 0
    scale, zp = dq.choose_quantization_params(1e-6, 1e-6)
    assert scale == float(np.float32(6.1e-5)) and zp == 0
    with pytest.raises(ValueError, match="x_min must be <= x_max"):
        dq.choose_quantization_params(1.0, 0.5)


def test_onednn_scale_round_trip_golden():
    """s' = f32(1/f64(f32(1/s))) is not always f32(s): 1/3 survives, some scales move by one ulp."""
    s = np.float64(np.float32(1 / 3))
    assert dq.onednn_scale_round_trip(s)[()] == np.float32(s)
    moved = [v for v in np.linspace(0.01, 0.02, 2000) if dq.onednn_scale_round_trip(v)[()] != np.float32(v)]
    assert moved, "some scales change in the round trip"


# ----------------------------------------------------------------------------------------------------------------
# kernels == readable paths
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", dq.ENGINES)
def test_stages_kernels_equal_readable(rng, engine):
    for i in range(60):
        kind = INPUT_KINDS[i % len(INPUT_KINDS)]
        shape, N = draw_shape(rng, kind)
        weight = draw_weight(rng, N, shape[-1])
        bias = rng.standard_normal(N).astype(F32) if i % 2 else None
        for onednn_kernel in (dq.ONEDNN_KERNELS if engine == "onednn" else (None,)):
            kw = {"onednn_kernel": onednn_kernel} if engine == "onednn" else {}
            layer = dq.DynamicQuantizedLinear.from_float(weight, bias, engine=engine,
                                                         weight_qscheme=WEIGHT_QSCHEMES[i % 2], **kw)
            x = draw_input(rng, shape, kind, engine)
            fast, readable = layer.stages(x), layer.stages(x, readable=True)
            assert fast.keys() == readable.keys()
            for key in fast:
                if key in ("x_min", "x_max"):
                    assert fast[key] == readable[key] and type(fast[key]) is type(readable[key]), key
                elif isinstance(fast[key], np.ndarray):
                    np.testing.assert_array_equal(fast[key], readable[key], strict=True)
                    assert_same(fast[key], readable[key], key)
                else:
                    assert fast[key] == readable[key], key


def test_float_output_kernel_equals_readable(rng):
    """Every formula, with raw values beyond 2^24, no bias / bias, per channel scales of all sizes."""
    for formula in dq.FORMULAS:
        for _ in range(30):
            M, N = int(rng.integers(1, 20)), int(rng.integers(1, 40))
            raw = rng.integers(-2**31, 2**31, (M, N), dtype=np.int64).astype(np.int32)
            raw[:, 0] = rng.integers(-1000, 1000, M)
            s_x = F32(10.0 ** rng.uniform(-5, 2))
            s_w = (10.0 ** rng.uniform(-8, 0, N)).astype(F32)
            bias = (rng.standard_normal(N) * 10.0 ** rng.uniform(-3, 6)).astype(F32) if rng.random() < 0.7 else None
            assert_same(dq.float_output_fast(raw, formula, s_x, s_w, bias),
                        dq.float_output_readable(raw, formula, s_x, s_w, bias), formula)


def test_choose_quantization_params_kernel_equals_readable(rng):
    """The Numba twin of eq. DQ2 (run inside the one-call input kernel) == choose_quantization_params, scale and
    zero point, over ranges of every magnitude and sign: zeros, subnormals (the 0.1 fallback and the float32
    reciprocal's overflow), around the 6.1e-5 cut-off (its three branches), constants, FLT_MAX, random bits, and
    ranges whose zero point is an exact tie (round half to even)."""
    flt_max = np.finfo(F32).max
    edges = [0.0, -0.0, 1e-45, -1e-45, 2.9e-39, 3e-39, 1e-38, 7.7e-36, 7.8e-36, 6.1e-5 * 127, 6.1e-5 * 255, 1.0,
             -1.0, 1e30, -1e30, flt_max, -flt_max]
    ranges = [(a, b) for a in edges for b in edges]
    bits = rng.integers(0, 2**32, 8000, dtype=np.uint64).astype(np.uint32).view(F32)
    bits = bits[np.isfinite(bits)]
    ranges += list(zip(bits[0::2], bits[1::2]))
    ranges += [tuple(rng.standard_normal(2) * 10.0 ** rng.uniform(-44, 38)) for _ in range(3000)]
    ranges += [(-i / 16, j / 16) for i in range(1, 129, 3) for j in range(1, 129, 2)]  # zero points at exact .5 ties
    n = 0
    for a, b in ranges:
        lo, hi = sorted((F32(a), F32(b)))
        for qmin, qmax in ((0, 255), (0, 127)):
            want = dq.choose_quantization_params(lo, hi, qmin, qmax)
            got = dq._choose_quantization_params_kernel(lo, hi, qmin, qmax)
            assert got == want and type(got[0]) is float, (lo, hi, qmin, qmax, got, want)
            n += 1
    assert n > 8000


@pytest.mark.parametrize("engine", dq.ENGINES)
def test_one_call_input_kernel_equals_the_steps(rng, engine):
    """Eqs. DQ1-DQ3 in one Numba call (inputs one thread handles) == the steps one by one (find_min_max,
    choose_quantization_params, quantize_padded_rows, as for inputs the pool shares), every stage, every kind."""
    kw = {"onednn_kernel": "brgemm_vnni"} if engine == "onednn" else {}
    for i in range(60):
        kind = INPUT_KINDS[i % len(INPUT_KINDS)]
        shape, N = draw_shape(rng, kind)
        layer = dq.DynamicQuantizedLinear.from_float(draw_weight(rng, N, shape[-1]), None, engine=engine,
                                                     weight_qscheme=WEIGHT_QSCHEMES[i % 2], **kw)
        x = draw_input(rng, shape, kind, engine)
        assert 0 < x.size < layer._one_call_max_size
        one_call = layer._quantized_input(x, False)
        layer._one_call_max_size = 0
        steps = layer._quantized_input(x, False)
        assert one_call.keys() == steps.keys()
        for key in one_call:
            if isinstance(one_call[key], np.ndarray):
                assert_same(one_call[key], steps[key], f"{engine} {kind} {key}")
            elif key not in ("x", "lead_shape", "M"):
                assert one_call[key] == steps[key] and type(one_call[key]) is type(steps[key]), (engine, kind, key)
    x = rng.standard_normal((3, 5)).astype(F32)
    x[1, 2] = np.inf
    layer = dq.DynamicQuantizedLinear.from_float(rng.standard_normal((2, 5)).astype(F32), None, engine=engine, **kw)
    with pytest.raises(ValueError, match="x must be finite"):
        layer(x)


@pytest.mark.parametrize("shared", [False, True], ids=["one_thread", "pool"])
def test_min_max_kernel_equals_readable(rng, monkeypatch, shared):
    """find_min_max == find_min_max_readable, on one thread and shared by the pool in chunks of 7 elements (so
    chunks of every position, and a short last one), for every input kind, random float32 bit patterns (±0,
    subnormals, ±FLT_MAX; mixed signs, all positive, all negative), and a NaN or ±inf anywhere."""
    if shared:
        monkeypatch.setattr(dq, "MIN_MAX_PARALLEL_MIN_SIZE", 1)
        monkeypatch.setattr(dq, "MIN_MAX_CHUNK", 7)
    for kind in INPUT_KINDS:
        for _ in range(20):
            x = draw_input(rng, (int(rng.integers(1, 3000)),), kind)
            lo, hi, finite = dq.find_min_max(x)
            assert (lo, hi, finite) == dq.find_min_max_readable(x) and finite
            assert lo.dtype == hi.dtype == np.float32
    finite_bits = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32).view(F32)
    finite_bits = finite_bits[np.isfinite(finite_bits)]
    edges = F32([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, np.finfo(F32).max, -np.finfo(F32).max])
    for i in range(60):
        x = np.concatenate([rng.choice(finite_bits, int(rng.integers(1, 200))), rng.choice(edges, 3)])
        if i % 3:                                                      # all >= +0 or all <= -0 too
            x = np.abs(x) if i % 3 == 1 else -np.abs(x)
        rng.shuffle(x)
        lo, hi, finite = dq.find_min_max(x)
        want = dq.find_min_max_readable(x)
        assert finite and want[2]
        assert lo.view(np.uint32) == want[0].view(np.uint32) or lo == want[0] == 0  # the sign of a zero may differ
        assert hi.view(np.uint32) == want[1].view(np.uint32) or hi == want[1] == 0
    x = rng.standard_normal(100).astype(F32)
    for bad in (np.nan, np.inf, -np.inf, F32(-np.nan)):
        for where in (0, int(rng.integers(1, 99)), 99):
            y = x.copy()
            y[where] = bad
            assert dq.find_min_max(y)[2] is False and dq.find_min_max_readable(y)[2] is False
    assert dq.find_min_max(np.zeros(0, F32)) == (0, 0, True)
    for v in (0.0, -3.5, 1e-40, np.finfo(F32).max):                      # a single element: min = max = it
        assert dq.find_min_max(F32([v])) == (F32(v), F32(v), True)


@pytest.mark.parametrize("shared", [False, True], ids=["one_thread", "pool"])
@pytest.mark.parametrize("rounding", ["fbgemm_legacy_fma", "multiply_then_add"])
def test_quantize_padded_rows_equals_readable(rng, monkeypatch, rounding, shared):
    """The input quantization of the fast path (codes, row sums, zero padding in one pass) == the NumPy statements
    of eq. Q1 / Q1c, for every input kind at the engine's own qparams (ties a few ulps around code midpoints
    included), huge and tiny magnitudes, M = 1, odd K, lda > K; on one thread and shared by the pool in items of
    one or a few rows."""
    if shared:
        monkeypatch.setattr(refquant.quantize, "QUANTIZE_PARALLEL_MIN_SIZE", 1)
        monkeypatch.setattr(refquant.quantize, "QUANTIZE_ITEM_SIZE", int(rng.integers(1, 600)))
    engine = "onednn" if rounding == "multiply_then_add" else "fbgemm"
    n = 0
    for i in range(150):
        kind = INPUT_KINDS[i % len(INPUT_KINDS)]
        K = int(rng.choice([1, 2, 3, 4, 5, 17, 255, 257])) if rng.random() < 0.5 else int(rng.integers(1, 300))
        M = 1 if kind == "single" or rng.random() < 0.2 else int(rng.integers(2, 40))
        x = draw_input(rng, (M, K), kind, engine)
        scale, zp = dq.choose_quantization_params(x.min(), x.max(), 0, 255, reduce_range=bool(i % 2))
        s_x = dq.onednn_scale_round_trip(scale)[()] if engine == "onednn" else F32(scale)
        if rng.random() < 0.2:                                        # codes beyond the range: saturation
            s_x = F32(s_x * F32(rng.uniform(0.01, 0.5)))
        inv, zp_f32 = F32(1) / s_x, F32(zp)
        lda = -(-K // 4) * 4 + (4 * int(rng.integers(0, 3)) if rng.random() < 0.3 else 0)
        got_codes, got_sums = refquant.quantize.quantize_padded_rows(x, inv, zp_f32, lda, rounding)
        want_codes, want_sums = refquant.quantize.quantize_padded_rows_readable(x, inv, zp_f32, lda, rounding)
        assert_same(got_codes, want_codes, f"codes, {kind}, M={M}, K={K}, lda={lda}")
        assert_same(got_sums, want_sums, f"row sums, {kind}, M={M}, K={K}")
        assert got_codes.shape == (M, lda) and (got_codes[:, K:] == 0).all()
        n += 1
    assert n == 150
    if rounding == "fbgemm_legacy_fma":                               # eq. Q1's NaN and ±inf, as the readable path
        x = F32([[np.nan, np.inf, -np.inf, 1.0, -1.0]])
        got = refquant.quantize.quantize_padded_rows(x, F32(10), F32(3), 8, rounding)
        want = refquant.quantize.quantize_padded_rows_readable(x, F32(10), F32(3), 8, rounding)
        assert_same(got[0], want[0], "non-finite")
        assert_same(got[1], want[1], "non-finite sums")
        assert got[0][0, :5].tolist() == [255, 255, 0, 13, 0]


def test_multiply_then_add_kernel_equals_readable(rng):
    """quantize's eq. Q1c (oneDNN's reorder): kernel == readable, near ties and out of range included."""
    for _ in range(50):
        inv = F32(10.0 ** rng.uniform(-3, 3))
        zp = int(rng.integers(0, 256))
        x = ((rng.integers(-300, 300, 500) + 0.5) / np.float64(inv)).astype(F32)
        x = (x.view(np.int32) + rng.integers(-2, 3, 500).astype(np.int32)).view(F32)
        out = np.empty(500, np.uint8)
        assert _quantize_mul_add_kernel(x, inv, F32(zp), 0, 255, out) == 0
        assert_same(out, _quantize_mul_add_readable(x, inv, F32(zp), 0, 255).astype(np.uint8), "Q1c")


def test_multiply_then_add_differs_from_fma_at_ties(rng):
    """At near-ties the two roundings of oneDNN's reorder and fbgemm's single FMA rounding give different codes
    (which is why the onednn parity needs eq. Q1c)."""
    s = F32(0.0123)
    x = ((rng.integers(-100, 100, 4000) + 0.5) * np.float64(s)).astype(F32)
    a = refquant.quantize_per_tensor(x, s, 64, "quint8", rounding="multiply_then_add")
    b = refquant.quantize_per_tensor(x, s, 64, "quint8")
    assert (a != b).any()
    with pytest.raises(ValueError, match="NaN"):
        refquant.quantize_per_tensor(np.float32([np.nan]), s, 64, "quint8", rounding="multiply_then_add")


# ----------------------------------------------------------------------------------------------------------------
# what torch does at the edges, and refquant's errors
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", dq.ENGINES)
def test_empty_batch(rng, engine, onednn_kernel_in_torch):
    weight = rng.standard_normal((5, 7)).astype(F32)
    module = torch_dynamic_linear(weight, None, engine, "per_tensor_symmetric")
    layer = dq.DynamicQuantizedLinear.from_float(weight, None, engine=engine,
                                                 **layer_kwargs(engine, onednn_kernel_in_torch))
    for shape in ((0, 7), (2, 0, 7)):
        x = np.zeros(shape, F32)
        y = run_torch(module, x, engine)
        assert layer(x).shape == y.shape and layer(x).dtype == y.dtype == np.float32


@pytest.mark.parametrize("engine", dq.ENGINES)
def test_non_finite_input_refused(rng, engine):
    """Strictness row: torch fails ("min should be less than or equal to max") for a NaN at x[0] and on qnnpack,
    silently ignores a NaN elsewhere on fbgemm/onednn, and returns inf/NaN for inf inputs; refquant refuses all."""
    weight = rng.standard_normal((3, 12)).astype(F32)
    module = torch_dynamic_linear(weight, None, engine, "per_tensor_symmetric")
    layer = dq.DynamicQuantizedLinear.from_float(weight, None, engine=engine, **(
        {"onednn_kernel": "brgemm_vnni"} if engine == "onednn" else {}))
    x = rng.standard_normal((2, 12)).astype(F32)
    x_nan0 = x.copy()
    x_nan0[0, 0] = np.nan
    with pytest.raises(RuntimeError, match="min should be less than or equal to max"):
        run_torch(module, x_nan0, engine)
    x_inf = x.copy()
    x_inf[1, 3] = np.inf
    if engine != "qnnpack":
        assert not np.isfinite(run_torch(module, x_inf, engine)).all()
    for bad_x in (x_nan0, x_inf):
        with pytest.raises(ValueError, match="x must be finite"):
            layer(bad_x)


def test_qnnpack_ignores_reduce_range_and_warns(rng):
    weight = rng.standard_normal((4, 9)).astype(F32)
    with pytest.warns(UserWarning, match="qnnpack ignores reduce_range"):
        layer = dq.DynamicQuantizedLinear.from_float(weight, None, engine="qnnpack", reduce_range=True)
    assert layer.reduce_range is False
    assert dq.DynamicQuantizedLinear.from_float(weight, None, engine="qnnpack").reduce_range is False
    assert dq.DynamicQuantizedLinear.from_float(weight, None, engine="fbgemm").reduce_range is True
    assert dq.DynamicQuantizedLinear.from_float(weight, None, engine="onednn",
                                                onednn_kernel="brgemm_vnni").reduce_range is True


def test_qnnpack_differs_from_fbgemm_by_its_input_range(rng):
    """Why qnnpack's floats differ from fbgemm's: the input range, not the bias. With reduce_range=False on fbgemm
    both choose the same qparams and codes; the outputs then differ only by fbgemm's FMA (a last-bit effect)."""
    weight = rng.standard_normal((32, 128)).astype(F32)
    bias = rng.standard_normal(32).astype(F32)
    x = rng.standard_normal((16, 128)).astype(F32)
    qn = dq.DynamicQuantizedLinear.from_float(weight, bias, engine="qnnpack").stages(x)
    fb7 = dq.DynamicQuantizedLinear.from_float(weight, bias, engine="fbgemm").stages(x)
    fb8 = dq.DynamicQuantizedLinear.from_float(weight, bias, engine="fbgemm", reduce_range=False).stages(x)
    assert qn["input_zero_point"] != fb7["input_zero_point"] or qn["input_scale"] != fb7["input_scale"]
    assert (qn["input_scale"], qn["input_zero_point"]) == (fb8["input_scale"], fb8["input_zero_point"])
    assert_same(qn["accumulators"], fb8["accumulators"], "same codes, same integers")
    step = np.abs(qn["output"] - fb7["output"]).max()
    last_bit = np.abs(qn["output"] - fb8["output"]).max()
    assert last_bit <= 4 * np.spacing(np.abs(qn["output"]).max()) < step


@pytest.mark.parametrize("make, error, words", [
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, engine="tpu"), ValueError, ["engine", "tpu"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, reduce_range=1), TypeError, ["reduce_range"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, weight_qscheme="per_tensor"), ValueError,
     ["weight_qscheme"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, engine="onednn", weight_qscheme="per_tensor_affine"),
     ValueError, ["weight_qscheme", "onednn"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w[0], None), ValueError, ["weight", "2-D"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, np.zeros(3, F32)), ValueError, ["bias", "(4,)"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(np.where(w > 0, np.nan, w), None), ValueError,
     ["weight", "finite"]),
    (lambda w: dq.DynamicQuantizedLinear.from_quantized(w, 0.1, 0, None), TypeError, ["weight_int8", "int8"]),
    (lambda w: dq.DynamicQuantizedLinear.from_quantized(w.astype(np.int8), np.float32([0.1, 0.2]), [0, 0], None),
     ValueError, ["weight_scales", "4"]),
    (lambda w: dq.DynamicQuantizedLinear.from_quantized(w.astype(np.int8), np.float64([-0.1]), [0], None),
     ValueError, ["weight_scales", "> 0"]),
    (lambda w: dq.DynamicQuantizedLinear.from_quantized(w.astype(np.int8), np.float64([0.1]), [200], None),
     ValueError, ["weight_zero_points", "[-128, 127]"]),
    (lambda w: dq.DynamicQuantizedLinear.from_quantized(w.astype(np.int8), np.float64([0.1]), [3], None,
                                                        engine="onednn", onednn_kernel="brgemm_vnni"),
     ValueError, ["weight_zero_points", "onednn"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, engine="qnnpack", saturate_int16_pairs=True),
     ValueError, ["saturate_int16_pairs", "qnnpack"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, engine="onednn", onednn_kernel="mkl"),
     ValueError, ["onednn_kernel", "mkl"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None, engine="fbgemm", onednn_kernel="brgemm_amx"),
     ValueError, ["onednn_kernel", "fbgemm"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None)(np.zeros((2, 5), np.float64)), TypeError,
     ["x", "float32", "float64"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None)(np.zeros(5, F32)), ValueError,
     ["x", "2 dimensions"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None)(np.zeros((2, 6), F32)), ValueError,
     ["x", "in_features = 5"]),
    (lambda w: dq.DynamicQuantizedLinear.from_float(w, None)([[0.0] * 5]), TypeError, ["x", "numpy"]),
])
def test_bad_arguments(make, error, words):
    w = np.arange(20, dtype=F32).reshape(4, 5) / 20 - 0.5
    with pytest.raises(error) as info:
        make(w)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_torch_refuses_what_refquant_refuses(rng):
    """The refusals that mirror torch: float64 and 1-D inputs, affine weights on onednn."""
    weight = rng.standard_normal((3, 4)).astype(F32)
    module = torch_dynamic_linear(weight, None, "fbgemm", "per_tensor_symmetric")
    with pytest.raises(RuntimeError, match="expected scalar type Float"):
        module(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="larger than or equal to 2"):
        module(torch.zeros(4))
    with pytest.raises(RuntimeError, match="ONEDNN only supports symmetric"):
        torch_prepack(np.zeros((3, 4), np.int8), np.float64([0.1]), np.array([3]), None, "onednn")


def test_exported():
    assert refquant.DynamicQuantizedLinear is dq.DynamicQuantizedLinear
