"""refquant.export: the exported integer program, reloaded, reproduces the outputs (and torch's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from parity import assert_same
from refquant._float32 import fmaf
from refquant.export import FORMAT, export_linear, load_golden
from refquant.linear import QuantizedLinear


def run_testbench(p: dict) -> dict[str, np.ndarray]:
    """What a C testbench does with the exported arrays, written as plain scalar loops over Python ints and
    float32 scalars: only the file's contents are used, never refquant.linear."""
    B, K = p["x_u8"].shape
    N = p["out_features"]
    acc = np.zeros((B, N), np.int32)
    raw = np.zeros((B, N), np.int32)
    out = np.zeros((B, N), np.uint8)
    wrap = lambda v: (v + 2**31) % 2**32 - 2**31  # noqa: E731  int32 arithmetic
    zx, zy = int(p["input_zero_point"]), int(p["output_zero_point"])
    for b in range(B):
        xs = [int(v) for v in p["x_u8"][b]]
        for n in range(N):
            ws = [int(v) for v in p["weight_int8"][n]]
            if p["saturate_int16_pairs"]:
                pairs = [xs[k] * ws[k] + (xs[k + 1] * ws[k + 1] if k + 1 < K else 0) for k in range(0, K, 2)]
                a = wrap(sum(min(max(s, -32768), 32767) for s in pairs))
            else:
                a = wrap(sum(x * w for x, w in zip(xs, ws)))
            r = wrap(a - wrap(zx * int(p["col_offsets"][n])) - wrap(int(p["weight_zero_points"][n]) * sum(xs)))
            t = np.float32(r)
            if p["bias_mode"] == "add":
                t = np.float32(t + p["bias_term"][n])
            elif p["bias_mode"] == "fma":
                t = fmaf(p["bias"][n], p["bias_rcp"], t)[()]
            y = np.float32(t * p["output_multiplier"][n])
            q = int(np.rint(y)) if np.isfinite(y) and -(2.0**31) <= y < 2.0**31 else -(2**31)
            lo = zy if p["relu"] else 0
            acc[b, n], raw[b, n], out[b, n] = a, r, min(max(q + zy, lo), 255)
    return {"acc_i32": acc, "raw_i32": raw, "y_u8": out}


CASES = [
    dict(weight_qscheme="per_channel_symmetric", relu=False, bias=True),
    dict(weight_qscheme="per_channel_symmetric", relu=True, bias=False),
    dict(weight_qscheme="per_tensor_affine", relu=False, bias=True),
    dict(weight_qscheme="per_channel_affine", relu=True, bias=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("saturate", [False, True])
def test_export_reload_and_reproduce(tmp_path, rng, case, saturate):
    K, N, B = int(rng.integers(1, 40)), int(rng.integers(1, 12)), int(rng.integers(1, 20))
    w = rng.normal(0, 0.3, (N, K)).astype(np.float32)
    bias = rng.normal(0, 1, N).astype(np.float32) if case["bias"] else None
    ql = QuantizedLinear.from_float(w, bias, 0.02, int(rng.integers(0, 256)), 0.05, int(rng.integers(0, 256)),
                                    relu=case["relu"], weight_qscheme=case["weight_qscheme"],
                                    saturate_int16_pairs=saturate)
    x_u8 = rng.integers(0, 256, (B, K), dtype=np.uint8)
    written = export_linear(ql, x_u8, tmp_path / "layer")
    assert_same(written["y_u8"], ql(x_u8), "exported outputs")
    for suffix in (".npz", ".json"):
        p = load_golden((tmp_path / "layer").with_suffix(suffix))
        assert p["format"] == FORMAT
        for name in ("weight_int8", "col_offsets", "output_multiplier", "bias_term", "x_u8", "y_u8"):
            assert_same(p[name], written[name], f"{suffix} {name}")
        bench = run_testbench(p)
        for name, value in bench.items():
            assert_same(value, p[name], f"testbench {name} from {suffix}")


@pytest.mark.isa
def test_exported_outputs_are_torchs(tmp_path, rng, fbgemm_kernel):
    """The exported y_u8 equals torch.ops.quantized.linear on the same weight and inputs (full-range codes: the
    layer sums as this process's fbgemm kernels do, crosscheck.isa)."""
    K, N = 17, 5
    w = rng.normal(0, 0.3, (N, K)).astype(np.float32)
    b = rng.normal(0, 1, N).astype(np.float32)
    ql = QuantizedLinear.from_float(w, b, 0.02, 3, 0.05, 100, saturate_int16_pairs=fbgemm_kernel == "avx2")
    x_u8 = rng.integers(0, 256, (9, K), dtype=np.uint8)
    program = export_linear(ql, x_u8, tmp_path / "layer")
    qw = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(ql.weight_scales.astype(np.float64)),
                                    torch.zeros(N, dtype=torch.int64), 0, torch.qint8)
    torch.backends.quantized.engine = "fbgemm"
    packed = torch.ops.quantized.linear_prepack(qw, torch.from_numpy(b))
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x_u8), 0.02, 3)
    y = torch.ops.quantized.linear(qx, packed, 0.05, 100)
    assert_same(program["y_u8"], y.int_repr().numpy(), "exported y_u8 vs torch")


def test_json_floats_carry_exact_bits(tmp_path, rng):
    ql = QuantizedLinear.from_float(rng.normal(0, 1, (3, 4)).astype(np.float32), None, 0.1, 0, 0.3, 7)
    export_linear(ql, np.zeros((1, 4), np.uint8), tmp_path / "g")
    doc = json.loads((tmp_path / "g.json").read_text())
    assert np.array_equal(np.asarray(doc["output_multiplier_bits"], np.uint32).view(np.float32),
                          ql.output_multiplier)
    assert doc["bias_mode"] == "none"


def test_export_refuses_a_batch_that_is_not_2d(tmp_path):
    ql = QuantizedLinear.from_float(np.ones((2, 3), np.float32), None, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="x_u8 must be a .B, K. batch"):
        export_linear(ql, np.zeros(3, np.uint8), tmp_path / "g")
