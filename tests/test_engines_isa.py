"""onednn on other CPUs than this one, live: torch in a child process with ONEDNN_MAX_CPU_ISA capped (AVX2 without
VNNI: oneDNN's gemm:jit, int16-saturated pairs and the product of the scales; AVX-512 without VNNI: brgemm with
saturated pairs; with VNNI: brgemm exact). The child records oneDNN's verbose line per problem, so each problem is
compared with the kernel family torch really ran (a CPU that lacks the capped ISA runs a lower one, and the
comparison follows). fbgemm's non-VNNI path is checked the same way in tests/test_linear.py
(FBGEMM_ENABLE_INSTRUCTIONS); qnnpack's x86 kernel is SSE2 only and never saturates.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from parity import assert_same
from torch_engines import aim_at_a_tie, describe, onednn_family_from_verbose, random_problem, refquant_layer

_CHILD = textwrap.dedent("""
    import pickle, sys, warnings
    import numpy as np, torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "onednn"
    problems = pickle.load(open(sys.argv[1], "rb"))
    outputs = []
    for i, p in enumerate(problems):
        if p["per_channel"]:
            qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(p["w"]), torch.from_numpy(p["ws"]),
                                                          torch.from_numpy(p["wz"]), 0)
        else:
            qw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["w"]), float(p["ws"][0]), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if p["b"] is None else torch.from_numpy(p["b"]))
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["x"]), p["sx"], p["zx"])
        op = torch.ops.quantized.linear_relu if p["relu"] else torch.ops.quantized.linear
        print(f"PROBLEM {i}", flush=True)
        outputs.append(op(qx, packed, p["sy"], p["zy"]).int_repr().numpy())
    pickle.dump(outputs, open(sys.argv[2], "wb"))
""")


def run_capped(tmp_path, problems, isa: str):
    """torch's outputs and the family oneDNN reported for each problem, under ONEDNN_MAX_CPU_ISA=isa."""
    (tmp_path / "in.pkl").write_bytes(pickle.dumps(problems))
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, ONEDNN_VERBOSE="1")
    run = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pkl"), str(tmp_path / "out.pkl")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    outputs = pickle.loads((tmp_path / "out.pkl").read_bytes())
    isa_lines = [line.split("isa:", 1)[1] for line in run.stdout.splitlines() if ",info,cpu,isa:" in line]
    assert isa_lines, "the child printed no oneDNN ISA line"
    families, chunk, current = [None] * len(problems), [], None
    for line in run.stdout.splitlines() + ["PROBLEM end"]:
        if line.startswith("PROBLEM"):
            if current is not None:
                families[current] = onednn_family_from_verbose("\n".join(chunk), cpu_isa=isa_lines[0])
            current = None if line == "PROBLEM end" else int(line.split()[1])
            chunk = []
        else:
            chunk.append(line)
    return outputs, families


def check_capped(rng, tmp_path, isa: str, count: int, k_choices) -> set:
    problems = []
    for i in range(count):
        p = random_problem(rng, "onednn", k_choices=k_choices)
        if i % 3 == 0:
            aim_at_a_tie(p, rng)
        problems.append(p)
    outputs, families = run_capped(tmp_path, problems, isa)
    seen = set()
    for p, y_t, family in zip(problems, outputs, families):
        family = family or "brgemm"  # no matmul ran (M·N = 0)
        seen.add(family)
        assert_same(refquant_layer(p, family)(p["x"]), y_t, f"ONEDNN_MAX_CPU_ISA={isa}; {describe(p)}, {family}")
    print(f"\nONEDNN_MAX_CPU_ISA={isa}: {count} problems, 0 differ; kernel families {sorted(seen)}")
    return seen


SMALL_K = (1, 2, 3, 5, 8, 17, 31, 64, 100, 255, 256)
# gemm:jit sums one K block up to K = 256; below 768 two, whose int16 pairs restart at (K + 1) // 2 (odd for these
# K but 767: refquant.engines.onednn_gemm_pairs_restart); from 768 on blocks of 384
GEMM_BLOCK_K = (257, 258, 301, 513, 514, 765, 767, 768, 1024)


def test_onednn_avx2_gemm_jit(rng, tmp_path):
    seen = check_capped(rng, tmp_path, "AVX2", 150, SMALL_K + GEMM_BLOCK_K)
    assert seen, "no problem ran"


@pytest.mark.slow
@pytest.mark.parametrize("isa, k_choices", [("AVX512_CORE", SMALL_K + (513, 514, 1024, 4096)),
                                            ("AVX512_CORE_VNNI", SMALL_K + (513, 514, 1024, 4096)),
                                            ("AVX2_VNNI", SMALL_K + (513, 514, 1024)),
                                            ("AVX2", SMALL_K + GEMM_BLOCK_K)])
def test_onednn_capped_isa_slow(rng, tmp_path, isa, k_choices):
    check_capped(rng, tmp_path, isa, 600, k_choices)
