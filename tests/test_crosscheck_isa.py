"""crosscheck.isa: the probe of the kernel family torch's fbgemm runs.

* The probe's expected codes are refquant's own arithmetic (eq. M1 or M2, then the requantization), not numbers
  copied from a torch run.
* In fresh processes with and without FBGEMM_ENABLE_INSTRUCTIONS, the probe's answer predicts torch's outputs on
  full-range problems of every shape fbgemm blocks differently (M = 1 .. 200 across its MCB row blocks, N = 1 .. 130
  with remainder column kernels, K = 1 .. 1100 across its KCB = 512 depth blocks and odd K): refquant modelling the
  probed family equals torch everywhere, and the two families really differ on those problems.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from crosscheck import isa
from parity import assert_same
from refquant.linear import QuantizedLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_layer(saturate: bool) -> QuantizedLinear:
    return QuantizedLinear(np.array(isa.PROBE_W, np.int8), [1.0], [0], None, 1.0, 0, isa.PROBE_OUTPUT_SCALE,
                           isa.PROBE_OUTPUT_ZERO_POINT, weight_qscheme="per_tensor_symmetric",
                           saturate_int16_pairs=saturate)


def test_probe_codes_are_refquants_arithmetic_of_each_family():
    x = np.array([isa.PROBE_X], np.uint8)
    for family in isa.FAMILIES:
        layer = probe_layer(isa.saturate_int16_pairs(family))
        assert tuple(int(v) for v in layer(x)[0]) == isa.PROBE_CODES[family], family
    exact, saturated = probe_layer(False), probe_layer(True)
    assert exact.accumulate(x).tolist() == [[-130_560, 129_540]]  # 4·255·(−128), 4·255·127
    assert saturated.accumulate(x).tolist() == [[-65_536, 65_534]]  # two pairs, each saturated to int16
    assert isa.PROBE_CODES["vnni"] != isa.PROBE_CODES["avx2"]


def test_family_from_probe_refuses_anything_else():
    assert isa.family_from_probe([64, 191]) == "vnni" and isa.family_from_probe((96, 160)) == "avx2"
    with pytest.raises(RuntimeError, match=r"probe gave codes \(64, 160\): neither"):
        isa.family_from_probe([64, 160])
    with pytest.raises(ValueError, match="family must be one of"):
        isa.saturate_int16_pairs("avx512")


def test_the_family_is_probed_once_per_process_and_leaves_the_engine_alone(fbgemm_kernel):
    import torch

    torch.backends.quantized.engine = "x86"
    assert isa.family_from_probe(isa.run_probe()) == fbgemm_kernel == isa.torch_fbgemm_kernel_family()
    assert torch.backends.quantized.engine == "x86"
    torch.backends.quantized.engine = "fbgemm"


def test_worker_environment_of_each_isa():
    assert isa.worker_environment("auto") == {}
    assert isa.worker_environment("avx2") == {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    assert isa.worker_environment("vnni") == {"FBGEMM_ENABLE_INSTRUCTIONS": None}
    with pytest.raises(ValueError, match="isa must be one of"):
        isa.worker_environment("sse")


_CHILD = textwrap.dedent("""
    import sys, warnings
    import numpy as np, torch
    warnings.filterwarnings("ignore")
    from crosscheck.isa import torch_fbgemm_kernel_family
    data = np.load(sys.argv[1])
    out = {"family": np.array(torch_fbgemm_kernel_family())}
    torch.backends.quantized.engine = "fbgemm"
    for i in range(int(data["count"])):
        x, w, ws = data[f"x{i}"], data[f"w{i}"], data[f"ws{i}"]
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(ws).double(),
                                                      torch.zeros(w.shape[0], dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), 0.02, 0)
        out[f"y{i}"] = torch.ops.quantized.linear(qx, packed, float(data[f"sy{i}"]), 128).int_repr().numpy()
    np.savez(sys.argv[2], **out)
""")

SHAPES = [(M, N, K) for M in (1, 7, 200) for N in (1, 17, 130) for K in (1, 3, 4, 64, 513, 1100)]


def _problems(rng: np.random.Generator) -> list[dict]:
    problems = []
    for M, N, K in SHAPES:
        x = rng.choice(np.array([0, 128, 200, 255], np.uint8), (M, K))  # full range: pairs can saturate
        w = rng.choice(np.array([-128, -127, -64, 0, 64, 127], np.int8), (N, K))
        ws = np.full(N, 0.01, np.float32)
        sy = 0.02 * 0.01 * 128 * 255 * np.sqrt(K) / 40  # outputs spread over the codes
        problems.append(dict(x=x, w=w, ws=ws, sy=np.float64(sy)))
    return problems


@pytest.mark.parametrize("forced", [None, "AVX2", "AVX512"])
def test_probe_predicts_torch_on_every_shape(rng, tmp_path, forced):
    problems = _problems(rng)
    data = {"count": len(problems)}
    for i, p in enumerate(problems):
        data.update({f"{k}{i}": v for k, v in p.items()})
    np.savez(tmp_path / "in.npz", **data)
    (tmp_path / "child.py").write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != isa.ENV_VAR}
    if forced:
        env[isa.ENV_VAR] = forced
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   env=env, check=True, timeout=300, cwd=ROOT)
    out = np.load(tmp_path / "out.npz")
    family = str(out["family"])
    # fbgemm runs VNNI exactly when the CPU has AVX-512 VNNI and nothing lowers the ISA
    assert family == ("vnni" if forced is None and isa.cpu_has_avx512_vnni() else "avx2")
    differ = 0
    for i, (p, (M, N, K)) in enumerate(zip(problems, SHAPES)):
        ql = QuantizedLinear(p["w"], p["ws"], np.zeros(N, np.int32), None, 0.02, 0, float(p["sy"]), 128)
        assert_same(ql(p["x"], saturate_int16_pairs=isa.saturate_int16_pairs(family)), out[f"y{i}"],
                    f"refquant modelling the probed {family} kernels vs torch ({isa.ENV_VAR}={forced}), "
                    f"M={M} N={N} K={K}")
        differ += int((ql(p["x"], saturate_int16_pairs=False) != ql(p["x"], saturate_int16_pairs=True)).sum())
    assert differ > 0, "no problem distinguishes the two families: the shapes test nothing"


def test_onednn_gemm_jit_family_from_the_isa_line_or_the_cpu(monkeypatch):
    """gemm:jit's name carries no ISA: oneDNN's "isa:" line decides (AVX2 without VNNI: int16-saturated pairs);
    when that line was printed before anyone listened, the CPU's features (capped by ONEDNN_MAX_CPU_ISA) do."""
    import crosscheck.isa as isa_module
    from refquant import dynamic

    line = "onednn_verbose,v1,primitive,exec,cpu,matmul,gemm:jit,undef,src:u8::blocked:ab::f0,,,4x300:300x8,7.8"
    assert isa_module.onednn_family_from_verbose(line, cpu_isa="Intel AVX2") == "gemm+pairs"
    assert isa_module.onednn_family_from_verbose(line, cpu_isa="Intel AVX-512 with Intel DL Boost") == "gemm"
    monkeypatch.setattr(isa_module, "_ONEDNN_CPU_ISA", [])
    for predicted, family in (("gemm_no_vnni", "gemm+pairs"), ("brgemm_vnni", "gemm")):
        monkeypatch.setattr(dynamic, "default_onednn_kernel", lambda p=predicted: p)
        assert isa_module.onednn_family_from_verbose(line) == family
