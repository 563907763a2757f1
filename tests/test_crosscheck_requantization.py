"""``--requantization VARIANT`` and ``--export DIR`` of ``python -m crosscheck.linear`` (and crosscheck.model), live.

* The reported rows count what refquant's variant computes against torch's codes: torch runs the study's model
  here, independently of crosscheck's recording (tests/torch_models.py), refquant's layer from torch's converted
  weights runs the variant (``QuantizedLinear.with_requantization``), and the rows' differing counts, histograms
  and causes must be those numbers; the exit code stays parity's (0, and 1 for a perturbed parity row).
* ``--export``: the study's converted model end to end, for every variant and a few engines, ReLU and no bias, is
  compiled with c/refquant_program.c (the system C compiler, as tests/test_program.py builds it): 0 differing
  codes, 0 differing float bits; the default program's vectors are torch's outputs.
* The README's table of the default study's distances is what the study measures.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (loaded: the studies below run their torch side in this process)

import crosscheck.requantization as cr
from crosscheck.linear import main
from crosscheck.study import StudyConfig, run_study
from crosscheck.torch_study import build
from refquant import fixed_point as fp
from refquant.linear import QuantizedLinear
from refquant.program import load_program
from test_program import assert_c_reproduces, c_runner  # noqa: F401  (the fixture that builds the C runner)
from torch_models import quantize_with_torch, torch_calls, torch_saturates_int16_pairs

ROOT = Path(__file__).resolve().parents[1]
COUNTS: Counter = Counter()

CASES = [  # (engine, relu, bias, in_features, out_features, input shape, calibration batches, samples)
    ("fbgemm", False, True, 3, 3, (1, 2, 3, 3), 1, 300),
    ("x86", True, True, 16, 8, (4, 16), 2, 100),
    ("qnnpack", False, False, 7, 5, (3, 7), 2, 100),
]
CASE_IDS = [f"{c[0]}{'-relu' if c[1] else ''}{'' if c[2] else '-nobias'}" for c in CASES]


def _config(case, seed: int, requantization=()) -> StudyConfig:
    engine, relu, bias, k, n, shape, batches, samples = case
    return StudyConfig(in_features=k, out_features=n, input_shape=shape, calib_batches=batches, samples=samples,
                       seed=seed, relu=relu, bias=bias, engine=engine, requantization=tuple(requantization))


def _argv(config: StudyConfig) -> list[str]:
    argv = ["--in-features", str(config.in_features), "--out-features", str(config.out_features),
            "--input-shape", ",".join(map(str, config.input_shape)), "--calib-batches", str(config.calib_batches),
            "--samples", str(config.samples), "--seed", str(config.seed), "--engine", config.engine, "--quiet"]
    return argv + (["--relu"] if config.relu else []) + ([] if config.bias else ["--no-bias"])


def _torch_study(config: StudyConfig):
    """The study's model and data (crosscheck.torch_study.build), quantized and run by torch here: the converted
    model and, per batch set, the list of (float input, torch's Linear call)."""
    float_model, calibration, samples, fusions = build(config)
    if fusions:  # the study fuses Linear + ReLU before prepare, as the eager flow does
        float_model = torch.ao.quantization.fuse_modules(float_model, fusions)
    calib = [x.numpy() for x in calibration]
    converted = quantize_with_torch(float_model, calib, config.engine).converted
    sets = {"calibration": calib, "evaluation": [x.numpy() for x, _ in samples]}
    calls = {s: [(x, torch_calls(converted, x)[1]["fc"][0]) for x in xs] for s, xs in sets.items()}
    return converted, calls


def _onednn_kernel(converted, x_codes_u8: np.ndarray) -> dict:
    """QuantizedLinear's onednn_kernel / saturate_int16_pairs for the kernel oneDNN runs on these input codes here
    (its verbose output, crosscheck.isa): brgemm with or without VNNI, AMX, or AVX2's gemm:jit."""
    from crosscheck.isa import OnednnVerboseCapture, onednn_family_from_verbose, onednn_kernel_options

    q = converted.quant
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x_codes_u8), float(q.scale), int(q.zero_point))
    with OnednnVerboseCapture() as cap, torch.no_grad():
        converted.fc(qx)
        family = onednn_family_from_verbose(cap.read())
    pairs, kernel = onednn_kernel_options(family)
    return {"onednn_kernel": kernel, "saturate_int16_pairs": pairs}


def _refquant_layer(converted, engine: str, x_codes_u8: np.ndarray | None = None) -> QuantizedLinear:
    """refquant's layer from torch's converted weights and qparams (refquant.linear.from_quantized); for onednn,
    modelling the kernel oneDNN runs on ``x_codes_u8``."""
    fc = converted.fc
    w = fc.weight()
    per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    scales = w.q_per_channel_scales().numpy() if per_channel else w.q_scale()
    zps = w.q_per_channel_zero_points().numpy() if per_channel else w.q_zero_point()
    bias = None if fc.bias() is None else fc.bias().detach().numpy()
    return QuantizedLinear.from_quantized(
        w.int_repr().numpy(), scales, zps, bias, float(converted.quant.scale), int(converted.quant.zero_point),
        float(fc.scale), int(fc.zero_point), relu=type(fc).__name__ == "LinearReLU", engine=engine,
        **(_onednn_kernel(converted, x_codes_u8) if engine == "onednn" else
           {"saturate_int16_pairs": engine in ("fbgemm", "x86") and torch_saturates_int16_pairs()}))


def test_variants_are_refquants():
    assert cr.VARIANTS == fp.VARIANTS
    assert cr.CAUSES[1:] == fp.CAUSES and cr.CAUSES[0] == cr.ENGINE_CAUSE


@pytest.mark.isa
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reported_rows_count_the_variants_codes_against_torchs(tmp_path, rng, case):
    seed = int(rng.integers(0, 2**31))
    config = _config(case, seed)
    path = tmp_path / "out.json"
    assert main([*_argv(config), "--requantization", "all", "--json", str(path)]) == 0  # parity decides: 0
    doc = json.loads(path.read_text())
    assert doc["equal"] is True and doc["exit_code"] == 0 and doc["study"]["requantization"] == list(fp.VARIANTS)
    rows = {f["name"]: f for f in doc["fields"] if f["kind"] == "requantization"}
    batches = f"{config.calib_batches} batch" + ("es" if config.calib_batches > 1 else "")
    labels = {"calibration": f"calibration, {batches}", "evaluation": f"{config.samples} samples"}
    assert len(rows) == 2 * len(fp.VARIANTS)

    converted, calls = _torch_study(config)
    layer = _refquant_layer(converted, config.engine)
    for variant in fp.VARIANTS:
        layer_v = layer.with_requantization(variant)
        for set_name, batches in calls.items():
            t = np.concatenate([c.output.reshape(-1) for _, c in batches]).astype(np.int64)
            v = np.concatenate([layer_v(c.input_codes).reshape(-1) for _, c in batches]).astype(np.int64)
            row = rows[f"output codes, requantization={variant} ({labels[set_name]})"]
            d = row["distance"]
            differs = v != t
            values, counts = np.unique(v[differs] - t[differs], return_counts=True)
            context = f"{variant} {set_name} (seed {seed})"
            assert (d["codes"], d["differing"]) == (t.size, int(differs.sum())), context
            assert d["histogram"] == [[int(a), int(b)] for a, b in zip(values, counts)], context
            assert d["max_abs_difference"] == (int(np.abs(values).max()) if values.size else 0), context
            assert row["mismatches"] == d["differing"] and row["equal"] == (d["differing"] == 0), context
            assert sum(d["causes"].values()) == d["differing"], context
            assert d["variant"] == variant and d["bias_rule"] == (fp.DEFAULT_BIAS_RULE[variant] if config.bias
                                                                 else None), context
            if config.engine in ("fbgemm", "x86"):  # torch's codes are fbgemm's float path: refquant's attribution
                assert d["causes"].pop(cr.ENGINE_CAUSE) == 0, context
                x_u8 = np.concatenate([c.input_codes.reshape(-1, config.in_features) for _, c in batches])
                assert d["causes"] == fp.compare_with_float_path(layer, variant, x_u8=x_u8).counts(), context
            COUNTS[variant, "codes"] += d["codes"]
            COUNTS[variant, "differing"] += d["differing"]


def test_exit_code_stays_paritys_and_the_text_report_lists_the_rows(capsys):
    """A perturbed parity row exits 1 with --requantization as without; a requantization row that differs does
    not (the default study's tflite codes differ from torch's, exit 0)."""
    argv = ["--samples", "200", "--requantization", "tflite,float_int32_bias"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "integer-only requantization (reported, not parity rows)" in out
    assert re.search(r"output codes, requantization=tflite \(200 samples\) +[1-9]\d*/3,600 ", out), out
    assert "requantization=fbgemm_fixed_point" not in out
    assert main([*argv, "--quiet"], _perturb=("output codes (200 samples)", 7)) == 1
    assert "MISMATCH: 1 of 24 parity rows differ" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--requantization", "tflite_double"], "--requantization must be one of fbgemm_fixed_point, tflite"),
    (["--requantization", ""], "--requantization must be one of"),
    (["--export", "x", "--requantization", "tflite,fbgemm_fixed_point"], "--export writes one program"),
])
def test_bad_requantization_exits_2(argv, message, capsys, tmp_path):
    from crosscheck.model import main as model_main

    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    for run in (main, model_main):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_the_model_study_reports_every_linear_call(tmp_path):
    """crosscheck.model --requantization: a row per Linear call and batch set, exit code 0."""
    from crosscheck.model import main as model_main

    path = tmp_path / "model.json"
    assert model_main(["--requantization", "fbgemm_fixed_point", "--quiet", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    rows = [f for f in doc["fields"] if f["kind"] == "requantization"]
    assert [(f["layer"], f["name"]) for f in rows] == [
        (layer, f"{layer} output codes, requantization=fbgemm_fixed_point ({s})")
        for s in ("calibration", "evaluation") for layer in ("fc1", "fc2", "fc3")]
    assert all(f["distance"]["codes"] == f["size"] > 0 for f in rows)


# ----------------------------------------------------------------------------------------------------------------
# --export: the converted model end to end, run by the C99 reference


EXPORT_CASES = [*CASES[1:], ("onednn", False, True, 12, 6, (5, 12), 1, 20)]


@pytest.mark.isa
@pytest.mark.parametrize("case", EXPORT_CASES, ids=[*CASE_IDS[1:], "onednn"])
def test_exported_programs_run_in_c_and_the_default_one_is_torchs(tmp_path, rng, c_runner, case):  # noqa: F811
    config = _config(case, int(rng.integers(0, 2**31)), requantization=fp.VARIANTS)
    result = run_study(config)
    assert result.equal
    for variant in (None, *fp.VARIANTS):
        directory = tmp_path / str(variant)
        files = result.comparison.export(str(directory), requantization=variant)
        assert files == [str(directory / f"model{s}") for s in (".npz", ".json", ".h")]
        program = load_program(directory / "model.json")
        kinds = [s.kind for s in program.steps if s.kind != "identity"]  # a fused ReLU's Identity
        assert kinds == ["quantize", "linear", "dequantize"], kinds
        linear = program.steps[1]
        assert linear.constants["requantization"] == (variant or {"x86": "fbgemm"}.get(config.engine,
                                                                                      config.engine))
        if variant in ("fbgemm_fixed_point", "tflite", "tflite_single_rounding"):
            assert {"bias_i32", "requant_multiplier_i32", "requant_shift"} <= set(linear.constants)
        assert_c_reproduces(c_runner, directory / "model.h")
        COUNTS["c programs", config.engine] += 1
        if variant is None:  # the default program's vectors are torch's outputs on the exported inputs
            converted, _ = _torch_study(config)
            x = program.tensors[0]
            y, calls = torch_calls(converted, x)
            assert np.array_equal(program.tensors[1], calls["fc"][0].input_codes)
            assert np.array_equal(program.tensors[2], calls["fc"][0].output)
            assert np.array_equal(program.tensors[program.output].view(np.uint32), y.view(np.uint32))
        elif variant in ("fbgemm_fixed_point", "tflite"):  # its codes are the variant's, as the rows count them
            layer = _refquant_layer(_torch_study(config)[0], config.engine, program.tensors[1]
                                    ).with_requantization(variant)
            assert np.array_equal(program.tensors[2], layer(program.tensors[1]))


def test_export_cli_writes_the_files_and_names_them(tmp_path, c_runner, capsys):  # noqa: F811
    directory = tmp_path / "golden"
    path = tmp_path / "out.json"
    assert main(["--samples", "40", "--requantization", "tflite", "--export", str(directory),
                 "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["export"] == [str(directory / f"model{s}") for s in (".npz", ".json", ".h")]
    program = load_program(directory / "model.npz")
    assert program.steps[1].constants["requantization"] == "tflite"
    assert_c_reproduces(c_runner, directory / "model.h")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--export", str(tmp_path / "a-file")])
    assert e.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# the README's figures


@pytest.mark.isa
def test_readme_distances_are_what_the_default_study_measures(tmp_path):
    """The README's table of the default study's distances per variant (section "Porting to integer-only
    hardware") is what `python -m crosscheck.linear --requantization all` measures."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- crosscheck.linear --requantization all: measured by tests/test_crosscheck_requantizat"
                      r"ion.py -->\n(.*?)\n\n", readme, re.S)
    assert block, "README.md lost its marked table of the study's distances"
    path = tmp_path / "out.json"
    assert main(["--requantization", "all", "--quiet", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    rows = [f for f in doc["fields"] if f["kind"] == "requantization"]
    lines = ["| variant | inputs | codes | differing | share | differences (variant − torch) | causes |",
             "|---|---|---:|---:|---:|---|---|"]
    for f in rows:
        d = f["distance"]
        hist = ", ".join(f"{v:+d}: {n}" for v, n in d["histogram"]) or "-"
        causes = ", ".join(f"{c} {n}" for c, n in d["causes"].items() if n) or "-"
        inputs = f["name"].rsplit("(", 1)[1].rstrip(")")
        lines.append(f"| {d['variant']} | {inputs} | {d['codes']:,} | {d['differing']} | {d['share']:.2e} | {hist} "
                     f"| {causes} |")
    assert block.group(1) == "\n".join(lines), "README.md's distances drifted; paste:\n" + "\n".join(lines)


def test_report_counts():
    """Not a check: prints what this module compared (run with -s to see it)."""
    print(dict(COUNTS))
