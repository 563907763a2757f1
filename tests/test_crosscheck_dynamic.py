"""``python -m crosscheck.linear --dynamic`` end to end: quantize_dynamic's Linear against DynamicQuantizedLinear.

* The default dynamic study through the real CLI (torch in its worker process), its JSON, and torch's column
  checked against an independent torch run.
* A matrix of engines, weight qschemes, shapes, distributions and seeds (drawn from the run's REFQUANT_SEED): every
  parity row equal. One subprocess imports torch once and calls the CLI's ``main`` per case (torch then runs
  in-process), to keep the suite quick.
* The perturbation hook flips one bit of one refquant value: exit 1, the row and the element named.
* Bad arguments exit 2 with a message naming the option.

The module's 7-bit codes (reduce_range=True) cannot saturate fbgemm's int16 pairs, so no result here depends on the
fbgemm kernel family; the matrix is marked ``isa`` all the same, so that CI runs the dynamic study once more under
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (with ``--isa avx2`` passed explicitly in one case).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import SEED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTED = ("parity", "derived")


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


DRIVER = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch  # loaded once: every study below runs its torch side in this process
    torch.set_num_threads(1)
    from crosscheck.linear import main
    jobs = json.loads(sys.argv[1])
    codes = []
    for job in jobs:
        perturb = tuple(job["perturb"]) if job.get("perturb") else None
        codes.append(main(job["argv"], _perturb=perturb))
    print("EXIT_CODES=" + json.dumps(codes))
""")


def run_main_batch(jobs: list[dict], tmp_path) -> list[tuple[int, dict, str]]:
    """crosscheck.linear.main for each job (argv, optional perturb) in ONE subprocess: (exit code, JSON, stdout)."""
    for i, job in enumerate(jobs):
        job["argv"] = [*job["argv"], "--json", str(tmp_path / f"job{i}.json")]
    proc = run(["-c", DRIVER, json.dumps(jobs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.split("EXIT_CODES=")[-1])
    return [(code, json.loads((tmp_path / f"job{i}.json").read_text()), proc.stdout) for i, code in enumerate(codes)]


def assert_all_equal(doc: dict, context: str) -> None:
    bad = [(f["name"], f["first_mismatch"]) for f in doc["fields"] if f["kind"] in COUNTED and not f["equal"]]
    assert not bad, f"{context}: parity rows differ: {bad} (REFQUANT_SEED={SEED})"
    assert doc["equal"] is True and doc["exit_code"] == 0, context


def fields_by_name(doc: dict) -> dict[str, dict]:
    return {f["name"]: f for f in doc["fields"]}


# ----------------------------------------------------------------------------------------------------------------
# the default dynamic study, through the real CLI


def test_default_dynamic_study_json_and_an_independent_torch_run():
    proc = run(["-m", "crosscheck.linear", "--dynamic", "--json", "-"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert_all_equal(doc, "default dynamic study")
    assert set(doc) == {"equal", "exit_code", "study", "qconfig", "reduce_range", "fields", "first_calls", "error",
                        "environment", "torch_warnings"}
    assert doc["study"] == {"in_features": 3, "out_features": 3, "input_shape": [1, 2, 3, 3], "calib_dist": "normal",
                            "samples": 1000, "seed": 0, "bias": True, "engine": "fbgemm",
                            "weight_qscheme": "per_tensor_symmetric", "isa": "auto", "dynamic": True}
    assert doc["qconfig"] == "default_dynamic_qconfig" and doc["reduce_range"] is True
    assert doc["environment"]["torch_side"] == "worker process (forked before torch was imported)"
    f = fields_by_name(doc)
    kinds = {name: row["kind"] for name, row in f.items()}
    assert kinds["float output (1000 calls)"] == "parity"
    for name in ("batch min, max (1000 calls)", "input scale, double (1000 calls)", "input zero_point (1000 calls)",
                 "input codes (1000 calls)", "int32 accumulators (1000 calls)"):
        assert kinds[name] == "derived", name
    assert f["float output (1000 calls)"]["shape"] == [1000, 1, 2, 3, 3]
    assert f["input scale, double (1000 calls)"]["torch_dtype"] == "float64"
    assert sum(k in COUNTED for k in kinds.values()) == 11
    assert doc["error"]["torch"] == doc["error"]["refquant"] and doc["error"]["equal"] is True

    # torch's column really is torch's: the same study, independently of crosscheck's code
    import warnings

    import torch

    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        xs = torch.randn(1000, 1, 2, 3, 3)  # the samples: one chunk (crosscheck.study.sample_chunk_rows)
        with torch.no_grad():
            ys = torch.stack([q(xs[i]) for i in range(1000)]).numpy()
    assert f["weight int8 (int_repr)"]["torch"] == q[0].weight().int_repr().tolist()
    assert f["weight scales"]["torch"] == [q[0].weight().q_scale()]
    assert f["float output (1000 calls)"]["torch"]["sha256"] == hashlib.sha256(ys.tobytes()).hexdigest()
    x0 = xs[0]
    scale, zp = torch._choose_qparams_per_tensor(x0, True)
    assert doc["first_calls"][0] == {"x_min": float(x0.min()), "x_max": float(x0.max()), "scale": scale,
                                     "zero_point": zp}


# ----------------------------------------------------------------------------------------------------------------
# a matrix of studies, seeds from the run's seed


def _matrix_jobs() -> list[dict]:
    rng = np.random.default_rng([SEED, 11])
    seeds = iter(int(s) for s in rng.integers(0, 2**31, 64))
    dists = ("normal", "uniform", "laplace", "outliers", "relu")
    shapes = [(3, 3, "1,2,3,3"), (1, 1, "1,1"), (17, 5, "3,4,17"), (64, 40, "40,64"), (257, 9, "2,257")]
    jobs = []
    for i, engine in enumerate(("fbgemm", "x86", "qnnpack", "onednn")):
        for j, qscheme in enumerate(("per_tensor_symmetric", "per_channel_symmetric")):
            K, N, shape = shapes[(2 * i + j) % len(shapes)]
            argv = ["--dynamic", "--engine", engine, "--weight-qscheme", qscheme, "--in-features", str(K),
                    "--out-features", str(N), "--input-shape", shape, "--samples", "30", "--seed", str(next(seeds)),
                    "--calib-dist", dists[(i + j) % len(dists)], "--quiet"]
            if (i + j) % 3 == 2:
                argv.append("--no-bias")
            jobs.append({"argv": argv})
    jobs.append({"argv": ["--dynamic", "--engine", "onednn", "--in-features", "16", "--out-features", "64",
                          "--input-shape", "33,16", "--samples", "10", "--quiet"]})  # K <= 16: the VNNI kernel on AMX
    jobs.append({"argv": ["--dynamic", "--engine", "onednn", "--in-features", "64", "--out-features", "9",
                          "--input-shape", "32,64", "--samples", "10", "--quiet"]})  # M·N = 288: AMX on AMX CPUs
    return jobs


@pytest.mark.isa
def test_dynamic_studies_every_field_equal(tmp_path):
    jobs = _matrix_jobs()
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() == "AVX2":
        jobs.append({"argv": ["--dynamic", "--isa", "avx2", "--samples", "20", "--quiet"]})
    results = run_main_batch(jobs, tmp_path)
    qnnpack_warned: list[bool] = []
    for job, (code, doc, _) in zip(jobs, results):
        context = " ".join(job["argv"][:-2])
        assert_all_equal(doc, context)
        assert code == 0, context
        f = fields_by_name(doc)
        cfg = doc["study"]
        S, lead, N = cfg["samples"], cfg["input_shape"][:-1], cfg["out_features"]
        assert f[f"float output ({S} calls)"]["shape"] == [S, *lead, N], context
        assert f[f"input zero_point ({S} calls)"]["size"] == S, context
        assert doc["reduce_range"] is (cfg["engine"] != "qnnpack"), context
        if cfg["engine"] == "onednn":
            od = doc["environment"]["onednn"]
            assert sum(od["torch_impls"].values()) == S and f[f"oneDNN kernel per call ({S} calls)"]["equal"]
            assert f[f"input codes ({S} calls)"]["kind"] == "refquant_only", context
        else:
            assert f[f"input codes ({S} calls)"]["kind"] == "derived", context
        if cfg["engine"] == "qnnpack":  # its C++ warning (TORCH_WARN_ONCE: once per process), caught off stderr
            qnnpack_warned.append(any("qnnpack incorrectly ignores reduce_range" in w for w in doc["torch_warnings"]))
        scales = f["weight scales" + (" (per channel)" if cfg["weight_qscheme"].startswith("per_channel") else "")]
        assert scales["size"] == (N if cfg["weight_qscheme"].startswith("per_channel") else 1), context
    assert qnnpack_warned[0] and not any(qnnpack_warned[1:]), qnnpack_warned


# ----------------------------------------------------------------------------------------------------------------
# a deliberately broken comparison, and bad arguments


PERTURBATIONS = [  # (engine, row, flat index)
    ("fbgemm", "float output (20 calls)", 77),
    ("fbgemm", "input zero_point (20 calls)", 3),
    ("qnnpack", "input scale, double (20 calls)", 19),
    ("x86", "int32 accumulators (20 calls)", 0),
    ("onednn", "oneDNN kernel per call (20 calls)", 5),
    ("onednn", "weight scales", 0),
    ("fbgemm", "batch min, max (20 calls)", 39),
    ("qnnpack", "error metrics (20 calls)", 2),
]


def test_perturbed_value_exits_1_and_names_the_row_and_element(tmp_path):
    jobs = [{"argv": ["--dynamic", "--engine", e, "--samples", "20", "--quiet"], "perturb": [name, index]}
            for e, name, index in PERTURBATIONS]
    results = run_main_batch(jobs, tmp_path)
    out = results[0][2]
    for (engine, name, index), (code, doc, _) in zip(PERTURBATIONS, results):
        assert code == 1 and doc["exit_code"] == 1 and doc["equal"] is False, name
        bad = [f for f in doc["fields"] if f["kind"] in COUNTED and not f["equal"]]
        assert [f["name"] for f in bad] == [name], (name, [f["name"] for f in bad])
        f = bad[0]
        assert f["mismatches"] == 1, name
        expected = list(np.unravel_index(index, f["shape"]))
        assert f["first_mismatch"]["index"] == [int(i) for i in expected], name
        assert f"{name}: 1 of {f['size']} differ; first at index {tuple(int(i) for i in expected)}" in out
    assert out.count("MISMATCH: 1 of") == len(PERTURBATIONS)


@pytest.mark.parametrize("argv, words", [
    (["--relu"], ["--relu", "does not apply to --dynamic"]),
    (["--calib-batches", "3"], ["--calib-batches", "does not apply"]),
    (["--plots", "/tmp/x"], ["--plots", "does not apply"]),
    (["--engine", "tpu"], ["--engine", "invalid choice", "tpu"]),
    (["--weight-qscheme", "per_tensor_affine"], ["--weight-qscheme", "invalid choice"]),
    (["--in-features", "4", "--input-shape", "1,2,3,3"], ["--input-shape 1,2,3,3", "must equal --in-features (4)"]),
    (["--input-shape", "3,4", "--in-features", "5"], ["last dimension (4)", "--in-features (5)"]),
    (["--input-shape", "5"], ["at least 2 dimensions"]),
    (["--samples", "-1"], ["--samples", "got -1"]),
    (["--json", "/nonexistent/dir/out.json"], ["--json", "does not exist"]),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, words):
    from crosscheck.dynamic import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_linear_dispatches_dynamic_and_its_abbreviation():
    """``crosscheck.linear --dyn`` (argparse's abbreviation) reaches the dynamic parser: its own refusals apply."""
    proc = run(["-m", "crosscheck.linear", "--dyn", "--relu"])
    assert proc.returncode == 2 and "does not apply to --dynamic" in proc.stderr, proc.stderr
    proc = run(["-m", "crosscheck.linear", "--dynamic", "--help"])
    assert proc.returncode == 0 and "--weight-qscheme" in proc.stdout and "--dynamic" in proc.stdout.split("\n")[0]


@pytest.mark.slow
def test_many_dynamic_studies_every_field_equal(tmp_path):
    """40 more studies: every engine and qscheme over random shapes (M and N around oneDNN's small-shape rule),
    distributions and seeds."""
    rng = np.random.default_rng([SEED, 17])
    jobs = []
    for i in range(40):
        engine = ("fbgemm", "x86", "qnnpack", "onednn")[i % 4]
        K, N = int(rng.choice([1, 3, 16, 17, 64, 256, 300])), int(rng.choice([1, 8, 9, 33, 100]))
        lead = [int(rng.choice([1, 2, 32, 33, 64]))] + ([int(rng.integers(1, 4))] if i % 5 == 0 else [])
        jobs.append({"argv": ["--dynamic", "--engine", engine, "--weight-qscheme",
                              ("per_tensor_symmetric", "per_channel_symmetric")[(i // 4) % 2],
                              "--in-features", str(K), "--out-features", str(N), "--input-shape",
                              ",".join(map(str, [*lead, K])), "--samples", "25", "--seed",
                              str(int(rng.integers(0, 2**31))), "--calib-dist",
                              ("normal", "uniform", "laplace", "outliers", "relu")[i % 5], "--quiet"]
                     + (["--no-bias"] if i % 7 == 3 else [])})
    for job, (code, doc, _) in zip(jobs, run_main_batch(jobs, tmp_path)):
        assert_all_equal(doc, " ".join(job["argv"][:-2]))
        assert code == 0
