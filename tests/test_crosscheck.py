"""``python -m crosscheck.linear`` end to end: the CLI runs in subprocesses, its JSON is checked field by field.

* The default study (the seed study) and its JSON, with torch's column checked against an independent torch run.
* A matrix of shapes, seeds (drawn from the run's REFQUANT_SEED), distributions, ReLU, no-bias and both engines:
  every parity row equal. To keep the suite quick, one subprocess imports torch once and calls the CLI's ``main``
  once per case (the torch side then runs in-process); the default runs use the real worker process.
* A deliberately broken comparison (the ``_perturb`` test hook flips one bit of one refquant value) exits 1 and
  names the field, the index and both values.
* Bad arguments exit 2 with a message that says what was wrong.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import SEED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTED = ("parity", "derived")
FIELD_KEYS = {"name", "kind", "equal", "mismatches", "first_mismatch", "torch", "refquant"}


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_cli(*options: str) -> subprocess.CompletedProcess:
    return run(["-m", "crosscheck.linear", *options])


DRIVER = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch  # loaded once: every study below runs its torch side in this process
    from crosscheck.linear import main
    jobs = json.loads(sys.argv[1])
    codes = []
    for job in jobs:
        perturb = tuple(job["perturb"]) if job.get("perturb") else None
        codes.append(main(job["argv"], _perturb=perturb))
    print("EXIT_CODES=" + json.dumps(codes))
""")


def run_main_batch(jobs: list[dict], tmp_path) -> list[tuple[int, dict, str]]:
    """Run ``crosscheck.linear.main`` for each job (argv, optional perturb) in ONE subprocess; returns
    (exit code, JSON document, the process's stdout) per job."""
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
# the default study


@pytest.mark.isa
def test_default_study_prints_the_comparison_and_exits_0():
    proc = run(["-c", "import runpy, sys; sys.argv = ['crosscheck.linear']\n"
                      "try:\n    runpy.run_module('crosscheck.linear', run_name='__main__')\n"
                      "except SystemExit as e:\n"
                      "    print('TORCH_IN_PARENT=%s' % ('torch' in sys.modules)); sys.exit(e.code)"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "QuantStub -> Linear(3, 3) -> DeQuantStub, qconfig = get_default_qconfig('fbgemm')" in out
    assert "1 calibration batch of shape (1, 2, 3, 3) (normal); 1000 samples" in out
    assert "error of the quantized model over 1000 random inputs" in out
    assert "result: all 24 parity rows equal, bit for bit" in out
    for name in ("input scale", "output zero_point", "weight int8 (int_repr)", "bias (float32, not quantized)",
                 "output codes (1000 samples)", "dequantized output (calibration, 1 batch)"):
        assert name in out
    assert "MISMATCH" not in out
    assert "TORCH_IN_PARENT=False" in out  # torch ran in the worker process only
    # no torch deprecation noise; off a terminal, at most one progress line per slow phase
    assert all(line.startswith("crosscheck: ") and "\r" not in line for line in proc.stderr.splitlines()), proc.stderr


@pytest.mark.isa
def test_default_study_json_matches_an_independent_torch_run():
    proc = run_cli("--json", "-")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert_all_equal(doc, "default study")
    assert set(doc) == {"equal", "exit_code", "study", "fields", "calibration", "error", "float_forward",
                        "environment", "torch_warnings", "layers", "export"}  # as crosscheck.report.JSON_SCHEMA
    assert doc["export"] is None
    assert [(e["path"], e["torch_type"], e["calls"]) for e in doc["layers"]] == [
        ("quant", "QuantStub", ["quant"]), ("fc", "Linear", ["fc"]), ("dequant", "DeQuantStub", ["dequant"])]
    assert all(doc["fields"][i]["layer"] == e["path"] for e in doc["layers"] for i in e["fields"])
    assert set(doc["error"]["torch"]) == {"n", "mean_abs", "max_abs", "sqnr_db", "inside_ranges", "clipped"}
    assert doc["study"] == {"in_features": 3, "out_features": 3, "input_shape": [1, 2, 3, 3], "calib_batches": 1,
                            "calib_dist": "normal", "samples": 1000, "seed": 0, "relu": False, "bias": True,
                            "engine": "fbgemm", "isa": "auto", "requantization": []}
    assert set(doc["environment"]) >= {"torch", "numpy", "numba", "engine", "cpu_isa", "vnni", "fbgemm_kernel",
                                       "fbgemm_kernel_detected_by", "refquant_saturate_int16_pairs"}
    assert doc["environment"]["engine"] == "fbgemm"
    assert doc["environment"]["torch_side"] == "worker process (forked before torch was imported)"
    for f in doc["fields"]:
        assert FIELD_KEYS <= set(f), f["name"]
    f = fields_by_name(doc)
    assert [f["kind"] for f in doc["fields"]].count("parity") + \
        [f["kind"] for f in doc["fields"]].count("derived") == 24
    assert f["output codes (1000 samples)"]["shape"] == [1000, 1, 2, 3, 3]
    assert f["output codes (1000 samples)"]["size"] == 18000
    assert f["act_times_w_scale"]["kind"] == "refquant_only" and f["act_times_w_scale"]["torch"] is None
    assert doc["error"]["equal"] is True
    assert doc["error"]["torch"] == doc["error"]["refquant"]
    assert doc["error"]["torch"]["n"] == 18000

    # torch's column really is torch: redo the seed study here, independently of crosscheck's code.
    import warnings

    import torch
    from torch import nn
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.fc, self.dequant = QuantStub(), nn.Linear(3, 3), DeQuantStub()

        def forward(self, x):
            return self.dequant(self.fc(self.quant(x)))

    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = M().eval()
        m.qconfig = get_default_qconfig("fbgemm")
        p = prepare(m)
        x = torch.randn(1, 2, 3, 3)
        p(x)
        q = convert(p)
        y = q(x)
    assert f["weight int8 (int_repr)"]["torch"] == q.fc.weight().int_repr().tolist()
    assert f["input scale"]["torch"] == [float(q.quant.scale)]
    assert f["input zero_point"]["torch"] == [int(q.quant.zero_point)]
    assert f["output scale"]["torch"] == q.fc.scale
    assert f["output zero_point"]["torch"] == q.fc.zero_point
    assert f["bias (float32, not quantized)"]["torch"] == q.fc.bias().tolist()
    assert doc["calibration"]["input"] == x.tolist()
    assert doc["calibration"]["quantized_output"] == y.tolist()
    assert f["dequantized output (calibration, 1 batch)"]["torch"] == [y.tolist()]
    # ... and refquant's column is refquant's (the same numbers here, but read from the other side)
    assert f["weight int8 (int_repr)"]["refquant"] == f["weight int8 (int_repr)"]["torch"]


# ----------------------------------------------------------------------------------------------------------------
# a range of studies, seeds from the run's seed


def _matrix_jobs() -> list[dict]:
    rng = np.random.default_rng([SEED, 5])
    seeds = iter(int(s) for s in rng.integers(0, 2**31, 64))
    jobs = []
    dists = ("normal", "uniform", "laplace", "outliers", "relu")
    for i, dist in enumerate(dists):
        for relu, bias, engine in ((False, True, "fbgemm"), (True, False, "x86")):
            argv = ["--in-features", "7", "--out-features", "5", "--input-shape", "3,4,7", "--calib-batches", "3",
                    "--calib-dist", dist, "--samples", "64", "--seed", str(next(seeds)), "--engine", engine,
                    "--quiet"]
            jobs.append({"argv": argv + (["--relu"] if relu else []) + ([] if bias else ["--no-bias"])})
    shapes = [  # (K, N, input shape, calibration batches)
        (1, 1, "1,1", 1),
        (1, 4, "5,1", 2),
        (16, 8, "2,3,4,16", 1),
        (64, 3, "10,64", 4),
        (300, 20, "16,300", 2),
    ]
    for K, N, shape, batches in shapes:
        for engine in ("fbgemm", "x86"):
            jobs.append({"argv": ["--in-features", str(K), "--out-features", str(N), "--input-shape", shape,
                                  "--calib-batches", str(batches), "--samples", "40", "--seed", str(next(seeds)),
                                  "--engine", engine, "--calib-dist", dists[(K + N) % 5], "--quiet"]})
    for _ in range(4):  # the seed study with other seeds
        jobs.append({"argv": ["--seed", str(next(seeds)), "--samples", "200", "--quiet"]})
    jobs.append({"argv": ["--relu", "--no-bias", "--samples", "200", "--quiet"]})  # seed 0, fused, no bias
    return jobs


@pytest.mark.isa
def test_range_of_studies_every_field_equal(tmp_path):
    jobs = _matrix_jobs()
    results = run_main_batch(jobs, tmp_path)
    for job, (code, doc, _) in zip(jobs, results):
        context = " ".join(job["argv"][:-2])
        assert_all_equal(doc, context)
        assert code == 0, context
        f = fields_by_name(doc)
        cfg = doc["study"]
        lead = cfg["input_shape"][:-1]
        assert f[f"output codes ({cfg['samples']} samples)"]["shape"] == [cfg["samples"], *lead,
                                                                           cfg["out_features"]], context
        assert f["weight int8 (int_repr)"]["shape"] == [cfg["out_features"], cfg["in_features"]], context
        bias = f["bias (float32, not quantized)"]
        if cfg["bias"]:
            assert len(bias["torch"]) == len(bias["refquant"]) == cfg["out_features"], context
        else:
            assert bias["torch"] is None and bias["refquant"] is None and bias["equal"], context
        assert doc["environment"]["engine"] == cfg["engine"]
        assert doc["error"]["equal"] is True, context
        if cfg["relu"]:  # fused LinearReLU: outputs never below the zero point, dequantized never negative
            assert "relu" in cfg and doc["error"]["torch"]["n"] > 0


# ----------------------------------------------------------------------------------------------------------------
# a deliberately broken comparison


@pytest.mark.isa
def test_perturbed_refquant_value_exits_1_and_names_the_field_cli():
    """The real CLI path (torch in its worker process), with one refquant output code changed by one bit."""
    proc = run(["-c", "import sys\nfrom crosscheck.linear import main\n"
                      "sys.exit(main([], _perturb=('output codes (1000 samples)', 12345)))"])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "MISMATCH: 1 of 24 parity rows differ" in out
    index = np.unravel_index(12345, (1000, 1, 2, 3, 3))
    assert f"output codes (1000 samples): 1 of 18000 differ; first at index {tuple(int(i) for i in index)}" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("output codes (1000 samples)") and "NO" in l)
    assert "1/18000" in line


PERTURBATIONS = [  # (field, flat index): one row of each kind of value
    ("input scale", 0),
    ("input zero_point", 0),
    ("output observer histogram", 1000),
    ("output observer calibrated range", 1),
    ("output scale", 0),
    ("weight scales (per channel)", 2),
    ("weight zero_points (per channel)", 1),
    ("weight int8 (int_repr)", 4),
    ("bias (float32, not quantized)", 1),
    ("col_offsets", 0),
    ("input codes (calibration, 1 batch)", 3),
    ("int32 accumulators (calibration, 1 batch)", 17),
    ("dequantized output (1000 samples)", 17999),
    ("error metrics (1000 samples)", 2),
]


@pytest.mark.isa
def test_each_perturbed_field_is_named_with_index_and_both_values(tmp_path):
    jobs = [{"argv": ["--samples", "1000"], "perturb": [field, index]} for field, index in PERTURBATIONS]
    jobs.append({"argv": ["--samples", "10", "--quiet"], "perturb": ["no such field", 0]})
    results = run_main_batch(jobs, tmp_path)
    for (field, index), (code, doc, out) in zip(PERTURBATIONS, results):
        _check_perturbed(code, doc, out, field, index)
    code, doc, _ = results[-1]  # the hook acts only on the field it names
    assert code == 0
    assert_all_equal(doc, "perturbing a field that does not exist")


def _check_perturbed(code: int, doc: dict, out: str, field: str, index: int) -> None:
    assert code == 1 and doc["equal"] is False and doc["exit_code"] == 1
    bad = [f for f in doc["fields"] if f["kind"] in COUNTED and not f["equal"]]
    assert [f["name"] for f in bad] == [field]
    f = bad[0]
    assert f["mismatches"] == 1
    shape = f["shape"]
    expected_index = [int(i) for i in np.unravel_index(index, shape)]
    assert f["first_mismatch"]["index"] == expected_index
    assert f["first_mismatch"]["torch"] != f["first_mismatch"]["refquant"]
    if f["torch_dtype"].startswith("float"):
        assert f["first_mismatch"]["torch_bits"] != f["first_mismatch"]["refquant_bits"]
    assert f"{field}: 1 of {f['size']} differ; first at index {tuple(expected_index)}" in out


# ----------------------------------------------------------------------------------------------------------------
# bad arguments


def test_bad_argument_exits_2_with_a_message_cli():
    proc = run_cli("--in-features", "4", "--input-shape", "1,2,3,3")
    assert proc.returncode == 2
    assert "--input-shape 1,2,3,3: the last dimension (3) must equal --in-features (4)" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["--input-shape", "1,2,3,4"], "the last dimension (4) must equal --in-features (3)"),
    (["--input-shape", "1,x,3"], "--input-shape must be comma-separated positive integers"),
    (["--input-shape", "0,3"], "--input-shape dimensions must all be >= 1"),
    (["--input-shape", "3"], "give at least 2 dimensions"),
    (["--in-features", "0"], "--in-features must be a positive integer, got 0"),
    (["--out-features", "two"], "--out-features must be a positive integer, got 'two'"),
    (["--calib-batches", "0"], "--calib-batches must be a positive integer"),
    (["--samples", "-1"], "--samples must be an integer >= 0, got -1"),
    (["--seed", "-3"], "--seed must be in [0, 2**63)"),
    (["--calib-dist", "cauchy"], "invalid choice: 'cauchy'"),
    (["--engine", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--json", "/nonexistent-dir/out.json"], "directory '/nonexistent-dir' does not exist"),
    (["--in-features", "100000", "--out-features", "100000"], "is too large"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_arguments_exit_2_and_say_what_was_wrong(argv, message, capsys):
    from crosscheck.linear import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_plots_dir_that_is_a_file_exits_2(tmp_path, capsys):
    from crosscheck.linear import main

    target = tmp_path / "a-file"
    target.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--plots", str(target)])
    assert exc.value.code == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_plots_without_matplotlib_exits_2_with_install_hint(monkeypatch, capsys, tmp_path):
    from crosscheck.linear import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["--plots", str(tmp_path / "figs")])
    assert exc.value.code == 2
    assert "--plots needs matplotlib, which is not installed: pip install 'refquant[plots]'" in capsys.readouterr().err


def test_help_explains_every_option():
    from crosscheck.linear import build_parser

    text = build_parser().format_help()
    for option in ("--in-features", "--out-features", "--input-shape", "--calib-batches", "--calib-dist",
                   "--samples", "--seed", "--relu", "--no-bias", "--engine", "--isa", "--json", "--plots", "--quiet"):
        assert option in text
    assert "Exit codes: 0" in text


@pytest.mark.isa
@pytest.mark.slow
def test_many_random_studies_every_field_equal(tmp_path):
    """200 random studies (shapes, K up to 1024, 1-6 calibration batches, every distribution, ReLU, bias, engine)."""
    rng = np.random.default_rng([SEED, 7])
    dists = ("normal", "uniform", "laplace", "outliers", "relu")
    jobs = []
    for _ in range(200):
        K = int(rng.choice([1, 2, 3, 5, 8, 17, 64, 130, 512, 1024]))
        N = int(rng.integers(1, 33))
        lead = [int(d) for d in rng.integers(1, 6, int(rng.integers(1, 4)))]
        argv = ["--in-features", str(K), "--out-features", str(N), "--input-shape", ",".join(map(str, [*lead, K])),
                "--calib-batches", str(int(rng.integers(1, 7))), "--calib-dist", str(rng.choice(dists)),
                "--samples", str(int(rng.integers(1, 60))), "--seed", str(int(rng.integers(0, 2**31))),
                "--engine", str(rng.choice(["fbgemm", "x86"])), "--quiet"]
        argv += ["--relu"] if rng.random() < 0.4 else []
        argv += ["--no-bias"] if rng.random() < 0.3 else []
        jobs.append({"argv": argv})
    results = run_main_batch(jobs, tmp_path)
    for job, (code, doc, _) in zip(jobs, results):
        assert_all_equal(doc, " ".join(job["argv"][:-2]))
        assert code == 0


def test_plots_into_an_unwritable_path_exits_2_before_the_study(tmp_path, capsys, monkeypatch):
    """--plots is checked (created, written to) before anything runs: a path under a file, or anywhere the figures
    cannot go, is a usage error, not a traceback after the whole study."""
    import crosscheck.study
    from crosscheck.linear import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("the study ran although --plots cannot be written")

    monkeypatch.setattr(crosscheck.study, "run_study", must_not_run)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--plots", str(tmp_path / "a-file" / "figs")])
    assert exc.value.code == 2
    assert f"--plots '{tmp_path / 'a-file' / 'figs'}': cannot write figures there (Not a directory)" in \
        capsys.readouterr().err
    main_ok = tmp_path / "new" / "figs"  # a directory that does not exist yet is made up front
    with pytest.raises(AssertionError, match="the study ran"):
        main(["--plots", str(main_ok)])
    assert main_ok.is_dir()


# ----------------------------------------------------------------------------------------------------------------
# progress on stderr, stdout clean


def test_a_slow_numba_start_says_so_once_on_stderr_and_stdout_stays_json(monkeypatch, capsys):
    """The first run compiles refquant's Numba kernels for 10-40 s: a warm-up longer than a second says so on
    stderr, once, in one line (stderr is not a terminal here); stdout holds nothing but the JSON document."""
    import crosscheck.study
    from crosscheck.linear import main

    warm_up = crosscheck.study.warm_up_refquant

    def slow_warm_up(*args, **kwargs):
        time.sleep(1.2)  # past the 1 s delay of this phase
        warm_up(*args, **kwargs)

    monkeypatch.setattr(crosscheck.study, "warm_up_refquant", slow_warm_up)
    assert main(["--samples", "5", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["equal"] is True
    compile_lines = [line for line in err.splitlines() if "Numba" in line]
    assert len(compile_lines) == 1, err
    assert re.fullmatch(r"crosscheck: loading refquant's Numba kernels \(the first run compiles them: 10-40 s, "
                        r"cached afterwards\) \.\.\. done in \d+\.\d s", compile_lines[0])
    assert all(line.startswith("crosscheck: ") for line in err.splitlines()), err
    assert main(["--samples", "5", "--quiet"]) == 0  # --quiet: no progress at all
    out, err = capsys.readouterr()
    assert out == "result: all 24 parity rows equal, bit for bit\n" and err == ""


@pytest.mark.slow
def test_a_cold_numba_cache_is_announced(tmp_path):
    """A real first run: an empty NUMBA_CACHE_DIR makes Numba compile every kernel (10-40 s)."""
    proc = subprocess.run([sys.executable, "-m", "crosscheck.linear", "--samples", "10"], cwd=ROOT, text=True,
                          capture_output=True, timeout=600, env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("the first run compiles them") == 1, proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# fbgemm's kernel family: found by a probe, modelled, and chosen with --isa


BRIEF = ["--in-features", "256", "--out-features", "64", "--calib-dist", "outliers"]  # outliers reach codes > 127


def test_fbgemm_avx2_kernels_are_modelled_and_reported():
    """Under FBGEMM_ENABLE_INSTRUCTIONS=AVX2 torch's fbgemm saturates pairs of products to int16 (outliers put codes
    above 127, where that changes outputs). crosscheck finds it with its probe, says so, and refquant follows."""
    proc = subprocess.run([sys.executable, "-m", "crosscheck.linear", *BRIEF, "--json", "-"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert_all_equal(doc, "FBGEMM_ENABLE_INSTRUCTIONS=AVX2 " + " ".join(BRIEF))
    env = doc["environment"]
    assert (env["fbgemm_kernel"], env["fbgemm_enable_instructions"], env["refquant_saturate_int16_pairs"]) == \
        ("avx2", "AVX2", True)
    assert env["fbgemm_kernel_detected_by"].startswith("probe: torch.ops.quantized.linear") and "96, 160" in \
        env["fbgemm_kernel_detected_by"]


def test_isa_option_runs_each_family_and_refquant_follows(tmp_path, fbgemm_kernel):
    """--isa avx2 and --isa vnni from a process that already runs torch (in-process where the family is the one
    torch runs here, a fresh worker with the target's environment where it is not): every parity row equal in both,
    the probe reports the family asked for, and torch's output codes differ between the two families."""
    import crosscheck.isa

    jobs = [{"argv": [*BRIEF, "--isa", "avx2", "--samples", "300", "--quiet"]}]
    if crosscheck.isa.cpu_has_avx512_vnni():
        jobs.append({"argv": [*BRIEF, "--isa", "vnni", "--samples", "300", "--quiet"]})
    results = run_main_batch(jobs, tmp_path)
    codes = {}
    for job, (code, doc, _) in zip(jobs, results):
        isa = job["argv"][job["argv"].index("--isa") + 1]
        assert_all_equal(doc, f"--isa {isa}")
        assert code == 0
        assert doc["study"]["isa"] == doc["environment"]["isa"] == doc["environment"]["fbgemm_kernel"] == isa
        assert doc["environment"]["refquant_saturate_int16_pairs"] == (isa == "avx2")
        # the driver runs torch's kernels of this process (fbgemm_kernel): the other family needs a fresh worker
        assert doc["environment"]["torch_side"] == ("this process (torch already imported)" if isa == fbgemm_kernel
                                                    else "worker process (spawned before torch was imported)")
        codes[isa] = fields_by_name(doc)["output codes (300 samples)"]["torch"]["sha256"]
    if len(codes) == 2:
        assert codes["avx2"] != codes["vnni"], "the two kernel families gave the same codes: --isa changed nothing"


def test_isa_vnni_without_avx512_vnni_is_a_usage_error(monkeypatch, capsys):
    import crosscheck.isa
    from crosscheck.linear import main

    monkeypatch.setattr(crosscheck.isa, "cpu_has_avx512_vnni", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--isa", "vnni"])
    assert exc.value.code == 2
    assert "--isa vnni: this CPU has no AVX-512 VNNI" in capsys.readouterr().err
