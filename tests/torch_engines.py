"""Shared by the engine tests: torch's quantized Linear run from integer codes on any engine, the probes of which
kernel family torch really runs, and random problems built from integer codes (as torch's own qlinear tests do).

Kernel families (what changes the integers, refquant.engines):
    fbgemm / x86   "vnni" (exact products) or "avx2" (int16-saturated pairs, eq. M2)
    qnnpack        "exact" always (SSE2 kernel on x86)
    onednn         per call, from oneDNN's verbose line: the kernel ("brgemm", "brgemm_amx", "gemm": eqs. DN4, DN5)
                   and "+pairs" when it saturates int16 pairs (no VNNI: brg_matmul:avx512_core, gemm:jit on AVX2)
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from crosscheck.isa import onednn_family_from_verbose  # noqa: F401  (moved there; the engine tests import it here)
from refquant.engines import ONEDNN_KERNELS
from refquant.linear import QuantizedLinear

ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) for the block. One thread keeps a torch call at ~20 us on a loaded machine (with two,
    OpenMP's barrier can cost milliseconds); the families probed per call keep every comparison right either way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quantized_engine(engine: str):
    """torch.backends.quantized.engine = engine for the block (restored afterwards)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


# ----------------------------------------------------------------------------------------------------------------
# Probes of what torch runs
# ----------------------------------------------------------------------------------------------------------------

def torch_fbgemm_kernel_family() -> str:
    """"vnni" or "avx2": the int8 kernel family torch's fbgemm runs in this process (crosscheck.isa's probe)."""
    from crosscheck.isa import torch_fbgemm_kernel_family as probe

    return probe()


# ----------------------------------------------------------------------------------------------------------------
# torch's quantized Linear from integer codes
# ----------------------------------------------------------------------------------------------------------------

def torch_qweight(w_i8: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, per_channel: bool):
    """A torch qint8 weight from codes: per channel (double scales, int64 zero points, axis 0) or per tensor."""
    if per_channel:
        return torch._make_per_channel_quantized_tensor(torch.from_numpy(np.ascontiguousarray(w_i8)),
                                                        torch.from_numpy(np.asarray(scales, np.float64)),
                                                        torch.from_numpy(np.asarray(zero_points, np.int64)), 0)
    return torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(w_i8)),
                                                   float(np.asarray(scales).reshape(-1)[0]),
                                                   int(np.asarray(zero_points).reshape(-1)[0]))


def run_torch(p: dict, capfd=None) -> tuple[np.ndarray | Exception, str]:
    """torch on problem ``p`` with a fresh packed weight: (output codes or the exception torch raised, family)."""
    engine = p["engine"]
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            qw = torch_qweight(p["w"], p["ws"], p["wz"], p["per_channel"])
            packed = torch.ops.quantized.linear_prepack(qw, None if p["b"] is None else torch.from_numpy(p["b"]))
            qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(p["x"])), p["sx"],
                                                         p["zx"])
            op = torch.ops.quantized.linear_relu if p["relu"] else torch.ops.quantized.linear
            if engine == "onednn":
                if capfd is None:
                    raise AssertionError("onednn runs need pytest's capfd fixture to read oneDNN's verbose line")
                capfd.readouterr()
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    y = op(qx, packed, p["sy"], p["zy"])
                family = onednn_family_from_verbose(capfd.readouterr().out) or "brgemm"  # no matmul ran: M·N = 0
            else:
                y = op(qx, packed, p["sy"], p["zy"])
                family = "exact" if engine == "qnnpack" else torch_fbgemm_kernel_family()
        except RuntimeError as e:
            return e, "exact"
    return y.int_repr().numpy(), family


def refquant_layer(p: dict, family: str) -> QuantizedLinear:
    """refquant's layer for problem ``p`` from the same codes, modelling the kernel family torch ran."""
    kernel, _, pairs = family.partition("+")
    scales = p["ws"] if p["per_channel"] else float(p["ws"][0])
    zps = p["wz"] if p["per_channel"] else int(p["wz"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the K > 65,793 overflow warning
        return QuantizedLinear.from_quantized(p["w"], scales, zps, p["b"], p["sx"], p["zx"], p["sy"], p["zy"],
                                              relu=p["relu"], engine=p["engine"],
                                              saturate_int16_pairs=family == "avx2" or pairs == "pairs",
                                              onednn_kernel=kernel if kernel in ONEDNN_KERNELS else "brgemm")


def describe(p: dict) -> str:
    return (f"engine={p['engine']}, x {p['x'].shape} ({p.get('xkind')}), w {p['w'].shape} ({p.get('wkind')}), "
            f"per_channel={p['per_channel']}, affine={bool((p['wz'] != 0).any())}, bias={p['b'] is not None}, "
            f"relu={p['relu']}, sx={p['sx']!r}, zx={p['zx']}, sy={p['sy']!r}, zy={p['zy']}, tie={p.get('tie')}")


# ----------------------------------------------------------------------------------------------------------------
# Random problems from integer codes
# ----------------------------------------------------------------------------------------------------------------

W_KINDS = ("uniform", "extremes", "small", "positive", "negative", "zero_channel", "constant_channel", "sparse")
X_KINDS = ("uniform", "extremes", "near_zero_point", "constant", "all_0", "all_255", "seven_bit", "high")


def random_w(rng: np.random.Generator, N: int, K: int, kind: str) -> np.ndarray:
    if kind == "uniform":
        w = rng.integers(-128, 128, (N, K))
    elif kind == "extremes":
        w = rng.choice(np.array([-128, -127, 127]), (N, K))
    elif kind == "small":
        w = rng.integers(-3, 4, (N, K))
    elif kind == "positive":
        w = rng.integers(64, 128, (N, K))
    elif kind == "negative":
        w = rng.integers(-128, -64, (N, K))
    elif kind == "zero_channel":
        w = rng.integers(-128, 128, (N, K))
        w[rng.integers(0, N)] = 0
    elif kind == "constant_channel":
        w = rng.integers(-128, 128, (N, K))
        w[rng.integers(0, N)] = rng.integers(-128, 128)
    elif kind == "sparse":
        w = rng.integers(-128, 128, (N, K)) * (rng.random((N, K)) < 0.1)
    else:
        raise AssertionError(kind)
    return w.astype(np.int8)


def random_x_codes(rng: np.random.Generator, shape: tuple, kind: str, zx: int) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "extremes":
        return rng.choice(np.array([0, 255], np.uint8), shape)
    if kind == "near_zero_point":
        return np.clip(zx + rng.integers(-3, 4, shape), 0, 255).astype(np.uint8)
    if kind == "constant":
        return np.full(shape, rng.integers(0, 256), np.uint8)
    if kind == "all_0":
        return np.zeros(shape, np.uint8)
    if kind == "all_255":
        return np.full(shape, 255, np.uint8)
    if kind == "seven_bit":
        return rng.integers(0, 128, shape, dtype=np.uint8)
    if kind == "high":
        return rng.integers(200, 256, shape, dtype=np.uint8)
    raise AssertionError(kind)


def random_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Weight scales as torch holds them (doubles): usually float32 values (what observers give), sometimes
    arbitrary doubles (what a hand-made quantized weight may hold), with spread magnitudes."""
    base = 10.0 ** rng.uniform(-4, 0)
    s = base * (10.0 ** rng.uniform(-1, 1, n) if rng.random() < 0.7 else 10.0 ** rng.uniform(-4, 3, n))
    if rng.random() < 0.8:
        s = s.astype(np.float32).astype(np.float64)
    return s


def random_problem(rng: np.random.Generator, engine: str,
                   k_choices=(1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 64, 100, 255, 513, 514),
                   max_n: int = 70, max_m: int = 9) -> dict:
    K = int(rng.choice(k_choices))
    N = int(rng.integers(1, max_n + 1))
    lead = [int(rng.integers(1, max_m + 1))]
    r = rng.random()
    if r < 0.1:
        lead = [1]  # single rows
    elif r < 0.25:
        lead = [int(rng.integers(1, 4)), int(rng.integers(1, 5))]  # 3-D input
    per_channel = bool(rng.random() < 0.5)
    n_params = N if per_channel else 1
    affine = engine != "onednn" and rng.random() < 0.35  # onednn refuses nonzero weight zero points
    wkind = str(rng.choice(W_KINDS))
    xkind = str(rng.choice(X_KINDS, p=[0.5, 0.1, 0.08, 0.06, 0.05, 0.05, 0.08, 0.08]))
    ws = random_scales(rng, n_params)
    wz = rng.integers(-128, 128, n_params) if affine else np.zeros(n_params, np.int64)
    sx = float(10.0 ** rng.uniform(-4, 1))
    zx = int(rng.choice([0, 128, int(rng.integers(0, 256))]))
    x = random_x_codes(rng, tuple(lead) + (K,), xkind, zx)
    w = random_w(rng, N, K, wkind)
    typical = sx * float(ws.max()) * 128 * math.sqrt(K)
    b = None
    if rng.random() < 0.7:
        b = (rng.standard_normal(N) * typical * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
        u = rng.random()
        if u < 0.05:  # beyond qnnpack's int32 bias range (it saturates); fbgemm/onednn keep it float
            huge = rng.choice([-1.0, 1.0]) * sx * float(ws.min()) * 2.0**rng.uniform(31, 40)
            b[rng.integers(0, N)] = np.float32(huge)
        elif u < 0.15:
            b[rng.integers(0, N)] = 0.0
    s = rng.random()
    if s < 0.07:
        sy = typical * 10.0 ** rng.uniform(-16, -8)  # tiny: overflow (fbgemm/qnnpack: 0, onednn: saturates)
    elif s < 0.12:
        sy = typical * 10.0 ** rng.uniform(2, 6)
    else:
        sy = typical * 10.0 ** rng.uniform(-2.5, 0.5) / 2.55
    sy = float(min(max(sy, 1e-30), 1e30))
    zy = int(rng.choice([0, 128, 255, int(rng.integers(0, 256))]))
    relu = bool(rng.random() < 0.3)
    return dict(engine=engine, x=x, w=w, ws=ws, wz=wz, per_channel=per_channel, b=b, sx=sx, zx=zx, sy=sy, zy=zy,
                relu=relu, wkind=wkind, xkind=xkind)


def aim_at_a_tie(p: dict, rng: np.random.Generator, largest: bool = False) -> bool:
    """Set the output scale so that one output's value before rounding is exactly k + 0.5 in real arithmetic.

    Real value (before adding z_y; fbgemm, onednn): u = s_x·s_w[n]·raw + bias[n]; qnnpack: u = s_x·s_w[n]·(raw +
    bias_i32[n]). With s_y = u / (k + 0.5) every float32 rounding on the way decides on which side of the tie the
    engine lands; a formula one ulp off anywhere rounds the other way in about half of these problems.
    """
    q = dict(p, sy=1.0, relu=False)
    try:
        ql = refquant_layer(q, "exact")
    except ValueError:
        return False
    raw = ql.accumulate(p["x"]).reshape(-1, ql.out_features).astype(np.float64)
    if raw.size == 0:
        return False
    if largest:
        m, n = (int(i) for i in np.unravel_index(np.argmax(np.abs(raw)), raw.shape))
    else:
        m, n = int(rng.integers(0, raw.shape[0])), int(rng.integers(0, raw.shape[1]))
    s_w = float(p["ws"][n if p["per_channel"] else 0])
    if p["engine"] == "qnnpack":
        u = p["sx"] * s_w * (raw[m, n] + float(ql.requantizer.bias_i32[n]))
    else:
        u = p["sx"] * s_w * raw[m, n] + (0.0 if p["b"] is None else float(p["b"][n]))
    lo = -p["zy"] if not p["relu"] else 0
    ks = np.arange(0, 255 - p["zy"]) if u > 0 else np.arange(lo, 0) if u < 0 else np.arange(0)
    if ks.size == 0:
        return False
    k = int(rng.choice(ks[:8] if rng.random() < 0.5 else ks))
    sy = u / (k + 0.5)
    if not (1e-37 < sy < 1e37):
        return False
    p["sy"] = float(sy)
    p["tie"] = (m, n, k)
    return True
