"""``python -m crosscheck.engines``: every static engine, torch vs refquant, and why the engines differ.

* The CLI through its real path (torch in the worker process): every parity row equal, the JSON's conventions, and
  the attribution's bookkeeping (every differing output attributed once; nothing unexplained; refquant's count of
  differing outputs equals torch's).
* A few more studies (ReLU, no bias, K = 1, a large K with oneDNN's AMX kernel) and the perturbation hook in one
  subprocess that imports torch once.
* The attribution itself, without torch, on constructed layers whose cause is known: qnnpack's int32 bias, oneDNN's
  zero point before the rounding, oneDNN's saturation on overflow, qnnpack's multiplier formula and oneDNN's
  reciprocal scales (cases found by a search and checked by hand below); each must be the sole cause of its
  difference and every other swap must change nothing. And on random layers: every chain's ends are the engines'
  own refquant layers, and the hybrid steps agree with them wherever the swapped ingredient cannot matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from conftest import SEED
from crosscheck import engines_study as es
from refquant.linear import QuantizedLinear
from refquant.pipeline import ObservedLinear, QuantizedLinearModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTED = ("parity", "derived")
F32 = np.float32


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_all_equal(doc: dict, context: str) -> None:
    bad = [(f["name"], f["first_mismatch"]) for f in doc["fields"] if f["kind"] in COUNTED and not f["equal"]]
    assert not bad, f"{context}: parity rows differ: {bad} (REFQUANT_SEED={SEED})"
    assert doc["equal"] is True and doc["exit_code"] == 0, context


def assert_attribution_consistent(doc: dict, context: str) -> None:
    for ch in doc["why"]:
        what = f"{context}: {ch['name']}"
        assert ch["error"] is None, what
        assert ch["unexplained"] == 0, what
        assert ch["refquant_differ"] == ch["torch_differ"], what
        assert sum(s["sole_cause"] for s in ch["steps"]) + ch["several_causes"] == ch["refquant_differ"], what
        for s in ch["steps"]:
            assert s["sole_cause"] <= s["changed"], what
        if ch["to"] == "x86":
            assert ch["torch_differ"] == 0 and ch["steps"] == [], what  # x86's Linear is fbgemm's


# ----------------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_every_row_equal_and_every_difference_attributed():
    proc = run(["-m", "crosscheck.engines", "--samples", "200", "--json", "-"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert_all_equal(doc, "crosscheck.engines")
    assert set(doc) == {"equal", "exit_code", "study", "engines", "fields", "why", "environment", "torch_warnings"}
    assert doc["environment"]["torch_side"] == "worker process (forked before torch was imported)"
    assert set(doc["engines"]) == set(es.ENGINES)
    assert doc["engines"]["qnnpack"]["weight_qscheme"] == "per_tensor_symmetric"
    assert [doc["engines"][e]["activation_reduce_range"] for e in es.ENGINES] == [True, True, False, False]
    for e in es.ENGINES:
        assert doc["engines"][e]["equal"] and doc["engines"][e]["parity_rows"] >= 23, e
    names = [f["name"] for f in doc["fields"]]
    for e in es.ENGINES:
        for row in ("input scale", "output zero_point", "weight int8 (int_repr)", "bias", "output codes (200 samples)",
                    "dequantized output (calibration, 4 batches)", "error metrics (200 samples)"):
            assert f"{e}: {row}" in names, (e, row)
        assert f"shared qparams, {e}: output codes" in names
    assert "onednn: oneDNN kernel per call" in names
    od = doc["environment"]["onednn"]
    assert sum(od["torch_impls"].values()) == 3 * sum(od["refquant_kernels"].values())  # own, shared, dynamic
    assert_attribution_consistent(doc, "crosscheck.engines")
    assert [ch["name"] for ch in doc["why"]] == [f"{w}: fbgemm vs {b}" for w in ("own qconfigs", "shared qparams",
                                                                             "dynamic")
                                                 for b in ("x86", "qnnpack", "onednn")]
    for e in es.ENGINES:
        assert f"dynamic, {e}: float output (one call per chunk)" in names


DRIVER = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch  # loaded once: every study below runs its torch side in this process
    torch.set_num_threads(1)
    from crosscheck.engines import main
    jobs = json.loads(sys.argv[1])
    codes = []
    for job in jobs:
        perturb = tuple(job["perturb"]) if job.get("perturb") else None
        codes.append(main(job["argv"], _perturb=perturb))
    print("EXIT_CODES=" + json.dumps(codes))
""")

PERTURBATIONS = [
    ("qnnpack: output codes (30 samples)", 123),
    ("shared qparams, onednn: output codes", 5),
    ("onednn: input observer histogram", 1000),
    ("x86: int32 accumulators (calibration, 4 batches)", 7),
]


@pytest.fixture(scope="module")
def driver_runs(tmp_path_factory):
    rng = np.random.default_rng([SEED, 13])
    seeds = iter(int(s) for s in rng.integers(0, 2**31, 16))
    tmp = tmp_path_factory.mktemp("engines")
    jobs = [
        {"argv": ["--in-features", "7", "--out-features", "5", "--input-shape", "3,2,7", "--relu", "--no-bias",
                  "--calib-dist", "relu", "--samples", "30", "--seed", str(next(seeds))]},
        {"argv": ["--in-features", "1", "--out-features", "1", "--input-shape", "1,1", "--calib-batches", "1",
                  "--samples", "30", "--calib-dist", "uniform", "--seed", str(next(seeds))]},
        {"argv": ["--in-features", "300", "--out-features", "20", "--input-shape", "16,300", "--calib-batches", "2",
                  "--samples", "30", "--calib-dist", "outliers", "--seed", str(next(seeds))]},
    ]
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() == "AVX2":
        jobs.append({"argv": ["--isa", "avx2", "--samples", "30", "--seed", str(next(seeds))]})
    n_studies = len(jobs)
    jobs += [{"argv": ["--samples", "30", "--quiet"], "perturb": [name, index]} for name, index in PERTURBATIONS]
    for i, job in enumerate(jobs):
        job["argv"] = [*job["argv"], "--json", str(tmp / f"job{i}.json")]
    proc = run(["-c", DRIVER, json.dumps(jobs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.split("EXIT_CODES=")[-1])
    docs = [json.loads((tmp / f"job{i}.json").read_text()) for i in range(len(jobs))]
    return jobs, codes, docs, proc.stdout, n_studies


@pytest.mark.isa
def test_more_studies_every_row_equal(driver_runs):
    jobs, codes, docs, out, n = driver_runs
    for job, code, doc in zip(jobs[:n], codes[:n], docs[:n]):
        context = " ".join(job["argv"][:-2])
        assert_all_equal(doc, context)
        assert code == 0, context
        assert_attribution_consistent(doc, context)
        if doc["study"]["in_features"] == 300:  # oneDNN's AMX kernel on AMX CPUs: the prediction was checked
            f = {x["name"]: x for x in doc["fields"]}
            assert f["onednn: oneDNN kernel per call"]["equal"], context
        if not doc["study"]["bias"]:
            f = {x["name"]: x for x in doc["fields"]}
            assert f["qnnpack: bias"]["torch"] == [0.0] * doc["study"]["out_features"]  # qnnpack's zero bias
            assert f["fbgemm: bias"]["torch"] is None


def test_perturbed_value_exits_1_and_names_the_row(driver_runs):
    jobs, codes, docs, out, n = driver_runs
    for (name, index), code, doc in zip(PERTURBATIONS, codes[n:], docs[n:]):
        assert code == 1 and doc["exit_code"] == 1, name
        bad = [f for f in doc["fields"] if f["kind"] in COUNTED and not f["equal"]]
        assert [f["name"] for f in bad] == [name], name
        expected = [int(i) for i in np.unravel_index(index, bad[0]["shape"])]
        assert bad[0]["mismatches"] == 1 and bad[0]["first_mismatch"]["index"] == expected, name
        assert f"{name}: 1 of {bad[0]['size']} differ; first at index {tuple(expected)}" in out


@pytest.mark.parametrize("argv, words", [
    (["--engine", "qnnpack"], ["unrecognized arguments", "--engine"]),
    (["--input-shape", "4,63"], ["last dimension (63)", "--in-features (64)"]),
    (["--calib-batches", "0"], ["--calib-batches", "got 0"]),
    (["--calib-dist", "cauchy"], ["--calib-dist", "invalid choice"]),
    (["--seed", "x"], ["--seed", "'x'"]),
    (["--json", "/nonexistent/dir/out.json"], ["--json", "does not exist"]),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, words):
    from crosscheck.engines import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


# ----------------------------------------------------------------------------------------------------------------
# the attribution on constructed cases (no torch)


def model(w_i8, s_w, bias, s_x, z_x, s_y, z_y, relu=False) -> QuantizedLinearModel:
    """A refquant model (QuantStub -> fbgemm Linear) from given codes and qparams; per-channel weight scales."""
    lin = QuantizedLinear.from_quantized(np.asarray(w_i8, np.int8), np.asarray(s_w, np.float64),
                                         np.zeros(len(s_w), np.int64), bias, s_x, z_x, s_y, z_y, relu=relu)
    return QuantizedLinearModel(F32(s_x), z_x, lin)


def attribute(m: QuantizedLinearModel, x: np.ndarray, b: str, kernel: str = "brgemm") -> es.ChainAttribution:
    """The shared-qparams chain fbgemm -> b over one model; refquant's real engine layers stand in for torch."""
    layers = es.RecipeLayers({e: m for e in es.ENGINES})
    qparams = es.chain_qparams({e: m for e in es.ENGINES}, {e: None for e in es.ENGINES})
    start, end = es.own_recipe("fbgemm", False), es.own_recipe(b, False, source="fbgemm")
    ch = es.ChainAttribution("test", "fbgemm", b, start, end, qparams, codes=True)
    engine_layer = es._layer_from(m, b, kernel=kernel)
    ya = m.dequant(es._layer_from(m, "fbgemm")(m.quant(x)))
    yb = m.dequant(engine_layer(m.quant(x)))
    ch.update(layers, x, kernel, ya, yb)
    return ch


def counts(ch: es.ChainAttribution) -> dict[str, tuple[int, int]]:
    return {ing: (int(c), int(s)) for (ing, _), c, s in zip(ch.steps, ch.changed, ch.sole)}


def test_qnnpack_bias_quantization_is_the_sole_cause():
    # raw = 0; fbgemm: f32(0 + 1.4/1)·0.5 = 0.7 -> 1 -> code 11; qnnpack: bias_i32 = rint(1.4) = 1, 1·0.5 = 0.5 ->
    # 0 (half to even) -> code 10
    m = model([[1]], [1.0], F32([1.4]), 1.0, 0, 2.0, 10)
    x = F32([[0.0]])
    assert m.linear(m.quant(x)).tolist() == [[11]]
    assert es._layer_from(m, "qnnpack")(m.quant(x)).tolist() == [[10]]
    ch = attribute(m, x, "qnnpack")
    assert ch.differ == 1 and ch.unexplained == 0
    assert counts(ch) == {"bias": (1, 1), "formula": (0, 0), "saturation": (0, 0)}


def test_onednn_zero_point_before_rounding_is_the_sole_cause():
    # y = raw / 2 at ties 0.5, 1.5, 2.5 with z_y = 101: fbgemm RNE(y) + 101 = 101, 103, 103; onednn RNE(y + 101) =
    # 102, 102, 104 (docs/numerics.md §11)
    m = model([[1]], [1.0], None, 1.0, 0, 2.0, 101)
    x = F32([[1.0], [3.0], [5.0]])
    ch = attribute(m, x, "onednn")
    assert ch.differ == 3 and ch.unexplained == 0
    assert counts(ch) == {"scales": (0, 0), "formula": (0, 0), "zero_point": (3, 3), "saturation": (0, 0)}


def test_onednn_saturation_on_overflow_is_the_sole_cause():
    # a tiny output scale: y = 1e30 overflows int32; fbgemm's cvtps2dq gives INT32_MIN -> code 0, oneDNN clamps in
    # float first -> 255. No other swap touches it (the overflow survives the reciprocal scales and the formula).
    m = model([[1]], [1.0], None, 1.0, 0, 1e-30, 0)
    x = F32([[1.0]])
    assert m.linear(m.quant(x)).tolist() == [[0]]
    assert es._layer_from(m, "onednn")(m.quant(x)).tolist() == [[255]]
    ch = attribute(m, x, "onednn")
    assert counts(ch) == {"scales": (0, 0), "formula": (0, 0), "zero_point": (0, 0), "saturation": (1, 1)}


def _find(rng, want: str, tries: int = 400):
    """A two-weight layer (codes 127 and 1, no bias, z_x = 0, z_y = 128) and an input on which the ingredient
    ``want`` changes the output code by itself: float32 scales drawn at random, and every raw = 127·q1 + q2 in
    0..32,511 tried at once (q1 <= 255, q2 <= 126), so that a rounding near a tie turns up within a few draws."""
    from refquant.engines import FbgemmRequantizer

    raw = np.arange(0, 256 * 127, dtype=np.int32)[:, None]
    for _ in range(tries):
        s_x, s_w = F32(10.0 ** rng.uniform(-3, -1)), F32(10.0 ** rng.uniform(-3, -1))
        s_y = F32(float(s_x) * float(s_w) * 32000 / 120 * rng.uniform(0.5, 1))  # the outputs span ~120 codes
        m = model([[127, 1]], [float(s_w)], None, float(s_x), 0, float(s_y), 128)
        fb = m.linear.requantize(raw)
        if want == "formula":  # qnnpack's rs for fbgemm's multiplier, nothing else
            rs = es._layer_from(m, "qnnpack").requantizer.requantization_scales
            other = FbgemmRequantizer(True, None, np.ones(1, F32), rs, 128, False, 1).requantize(raw)
        else:  # fbgemm's formula with oneDNN's reciprocal scales
            odq = es._layer_from(m, "onednn").requantizer
            other = es._layer_from(m, "fbgemm", input_scale=odq.input_scale_onednn,
                                   weight_scales=odq.weight_scales_onednn,
                                   output_scale=odq.output_scale_onednn).requantize(raw)
        hit = np.flatnonzero(fb[:, 0] != other[:, 0])
        if hit.size:
            r = int(raw[hit[0], 0])
            q = np.array([[r // 127, r % 127]], np.int64)
            x = (q * np.float64(s_x)).astype(F32)
            return m, x, q
    raise AssertionError(f"no case found for {want} in {tries} draws")


@pytest.mark.parametrize("want, engine", [("formula", "qnnpack"), ("scales", "onednn")])
def test_searched_cases_attributed_to_their_swap(rng, want, engine):
    m, x, q = _find(rng, want)
    assert m.quant(x).tolist() == q.tolist()  # the input reaches the searched codes
    ch = attribute(m, x, engine)
    c = counts(ch)
    assert c[want][0] == 1, c  # the swap changes the code ...
    if ch.differ:  # ... and, when no later swap takes it back, it alone explains the difference
        assert c[want][1] == 1 or ch.several == 1, c
    assert ch.unexplained == 0


def _random_model(rng, engine_models: bool = True):
    K, N = int(rng.integers(1, 40)), int(rng.integers(1, 12))
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(F32)
    b = (rng.standard_normal(N) * 0.3).astype(F32) if rng.random() < 0.7 else None
    relu = bool(rng.random() < 0.3)
    calib = [rng.standard_normal((int(rng.integers(1, 6)), K)).astype(F32) for _ in range(2)]
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in es.ENGINES:
            obs = ObservedLinear(w, b, relu=relu, engine=e)
            for x in calib:
                obs.calibrate(x)
            models[e] = obs.convert()
    x = (rng.standard_normal((int(rng.integers(1, 50)), K)) * rng.uniform(0.5, 3)).astype(F32)
    return models, x


@pytest.mark.parametrize("kernel", ["brgemm", "brgemm_amx"])
def test_chain_ends_are_the_engines_own_layers(rng, kernel):
    """Own-qconfig chains on random layers: the start is fbgemm's layer, every end is that engine's own refquant
    layer (the same recipe evaluator reproduces qnnpack's and onednn's requantizers); and each engine's recipe
    with fbgemm's qparams is that engine's layer with fbgemm's qparams. sole + several = differ throughout."""
    for _ in range(25):
        models, x = _random_model(rng)
        layers = es.RecipeLayers(models)
        same = es.same_values(models)
        qparams = es.chain_qparams(models, {e: None for e in es.ENGINES})
        fb = models["fbgemm"](x)
        for b in es.OTHERS:
            own_b = es._layer_from(models[b], b, kernel=kernel if b == "onednn" else "brgemm")
            yb = models[b].dequant(own_b(models[b].quant(x)))
            end = es.own_recipe(b, False)
            assert np.array_equal(layers.output(end, x, kernel).view(np.uint32), yb.view(np.uint32)), b
            ch = es.ChainAttribution("t", "fbgemm", b, es.own_recipe("fbgemm", False), end, qparams, codes=False,
                                     same=same)
            ch.update(layers, x, kernel, fb, yb)
            assert ch.unexplained == 0 and ch.error is None, b
            assert int(ch.sole.sum()) + ch.several == ch.differ, b
            shared = es.RecipeLayers({e: models["fbgemm"] for e in es.ENGINES})
            m = models["fbgemm"]
            yb_shared = m.dequant(es._layer_from(m, b, kernel=kernel if b == "onednn" else "brgemm")(m.quant(x)))
            got = shared.output(es.own_recipe(b, False, source="fbgemm"), x, kernel)
            assert np.array_equal(got.view(np.uint32), yb_shared.view(np.uint32)), b


def test_hybrid_steps_that_cannot_matter_change_nothing(rng):
    """Where an ingredient cannot change a code, its swap changes none: qnnpack's int16 packs never differ from a
    clamp of the int32 (|r| > 32767 saturates to the same end codes), and oneDNN's float clamp differs from
    fbgemm's only on overflow (none with these scales)."""
    for _ in range(25):
        models, x = _random_model(rng)
        layers = es.RecipeLayers({e: models["fbgemm"] for e in es.ENGINES})
        qn = es.own_recipe("qnnpack", False, source="fbgemm")
        from dataclasses import replace

        assert np.array_equal(layers.output_codes(qn, x), layers.output_codes(replace(qn, saturation="fbgemm"), x))
        od = es.own_recipe("onednn", False, source="fbgemm")
        assert np.array_equal(layers.output_codes(od, x), layers.output_codes(replace(od, saturation="fbgemm"), x))


def test_chain_skips_ingredients_with_the_same_values():
    a = es.own_recipe("fbgemm", False)
    b = es.own_recipe("x86", False)
    assert [ing for ing, _ in es.chain(a, b)] == ["qparams_in", "qparams_out", "weights"]
    assert es.chain(a, b, same=lambda ing, u, v: ing in ("qparams_in", "qparams_out", "weights")) == []
    steps = es.chain(a, es.own_recipe("onednn", True))
    assert [ing for ing, _ in steps] == ["qparams_in", "qparams_out", "weights", "pairs", "scales", "formula",
                                         "zero_point", "saturation"]
    assert steps[-1][1] == es.own_recipe("onednn", True)


@pytest.mark.parametrize("family", ["brgemm_vnni", "brgemm_amx"])
def test_dynamic_chain_ends_are_the_engines_layers(rng, family):
    """The dynamic recipes: each engine's own recipe is its DynamicQuantizedLinear (onednn: the CPU family given,
    the kernel then chosen by shape), and on inputs aimed at the input quantization's ties (j + 1/2)·s_x the
    quantize swap (FMA vs oneDNN's multiply-then-add) changes codes, attributed to it."""
    from refquant.dynamic import DynamicQuantizedLinear, choose_quantization_params, onednn_scale_round_trip

    quantize_changed = 0
    for i in range(20):
        K, N = int(rng.integers(1, 60)), int(rng.integers(1, 40))
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(F32)
        b = rng.standard_normal(N).astype(F32) if i % 2 else None
        M = int(rng.choice([1, 8, 40, 100]))
        x = rng.standard_normal((M, K)).astype(F32)
        if i % 2:  # near ties of oneDNN's scale s_x' (its reduce_range=True range)
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            s = onednn_scale_round_trip(choose_quantization_params(lo, hi, 0, 255, True)[0])[()]
            j = rng.integers(-60, 60, x.shape)
            x = np.clip(((j + 0.5) * np.float64(s)).astype(F32), F32(lo), F32(hi))
            x.reshape(-1)[0], x.reshape(-1)[-1] = F32(lo), F32(hi)
        layers = {e: DynamicQuantizedLinear.from_float(w, b, engine=e,
                                                       **({"onednn_kernel": family} if e == "onednn" else {}))
                  for e in es.ENGINES}
        dl = es.DynamicLayers(layers["fbgemm"], family)
        for e in es.ENGINES:
            got = dl.output(es.own_dynamic_recipe(e), x)
            assert np.array_equal(got.view(np.uint32), layers[e](x).view(np.uint32)), (e, i)
        ch = es.ChainAttribution("t", "fbgemm", "onednn", es.own_dynamic_recipe("fbgemm"),
                                 es.own_dynamic_recipe("onednn"), {}, codes=False, compared="float outputs")
        ch.update(dl, x, "", layers["fbgemm"](x), layers["onednn"](x))
        assert ch.unexplained == 0 and int(ch.sole.sum()) + ch.several == ch.differ
        assert [ing for ing, _ in ch.steps] == ["scales", "quantize", "formula"]
        quantize_changed += int(ch.changed[1])
    assert quantize_changed > 0


@pytest.mark.slow
def test_many_engine_studies_every_row_equal(tmp_path):
    """12 more studies over random shapes, distributions, ReLU and bias, seeds from the run's seed."""
    rng = np.random.default_rng([SEED, 19])
    jobs = []
    for i in range(12):
        K, N = int(rng.choice([1, 5, 16, 17, 64, 300])), int(rng.choice([1, 7, 32, 65]))
        lead = [int(rng.choice([1, 3, 8, 40]))] + ([2] if i % 4 == 0 else [])
        jobs.append({"argv": ["--in-features", str(K), "--out-features", str(N), "--input-shape",
                              ",".join(map(str, [*lead, K])), "--calib-batches", str(int(rng.integers(1, 5))),
                              "--samples", "40", "--seed", str(int(rng.integers(0, 2**31))), "--calib-dist",
                              ("normal", "uniform", "laplace", "outliers", "relu")[i % 5], "--quiet"]
                     + (["--relu"] if i % 3 == 1 else []) + (["--no-bias"] if i % 4 == 2 else [])})
    for i, job in enumerate(jobs):
        job["argv"] = [*job["argv"], "--json", str(tmp_path / f"job{i}.json")]
    proc = run(["-c", DRIVER, json.dumps(jobs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.split("EXIT_CODES=")[-1])
    for i, (job, code) in enumerate(zip(jobs, codes)):
        doc = json.loads((tmp_path / f"job{i}.json").read_text())
        context = " ".join(job["argv"][:-2])
        assert_all_equal(doc, context)
        assert_attribution_consistent(doc, context)
        assert code == 0, context
