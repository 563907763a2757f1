"""refquant.program: whole models as golden integer programs, read back strictly, run again in Python, run by the
C99 reference c/refquant_program.c (0 differing codes, 0 differing float bits), and equal to torch where torch
has a counterpart. Also: the integer variants as requantizations of QuantizedLinear, and compare_with_float_path.

The C runner is compiled per exported header with the system C compiler (``$CC``, else cc/gcc/clang) as
``-std=c99 -O2 -Wall -Wextra -Werror -ffp-contract=off``; c/refquant_requant.c is compiled once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import refquant.export as ex
import refquant.program as pg
from parity import assert_same
from refquant import fixed_point as fp
from refquant import model as rm
from refquant.engines import ENGINES
from refquant.export import GoldenFileError, export_linear, export_model, load_golden
from refquant.linear import QuantizedLinear
from refquant.matmul import matmul_u8s8_acc32
from refquant.pipeline import ObservedLinear, QuantizedLinearModel
from torch_engines import quantized_engine, random_problem, refquant_layer, run_torch, torch_qweight
from torch_models import torch_saturates_int16_pairs

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "c"
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
COUNTS: Counter = Counter()
RESULT = re.compile(r"^RESULT differing_codes=(\d+) differing_float_bits=(\d+) differing_int32=(\d+) "
                    r"differing_constants=(\d+) float_views=(\d+)$", re.M)
SATURATES = torch_saturates_int16_pairs()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def c_runner(tmp_path_factory):
    """run(header_path) -> (exit code, stdout) of c/refquant_program.c built on that header."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler found ($CC, cc, gcc, clang): the C99 reference cannot be built here")
    build = tmp_path_factory.mktemp("c_program")
    obj = build / "refquant_requant.o"
    cmd = [cc, *CFLAGS, "-c", str(C_DIR / "refquant_requant.c"), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"

    def run(header: Path) -> tuple[int, str]:
        exe = header.with_suffix(".run")
        cmd = [cc, *CFLAGS, f'-DREFQUANT_GOLDEN_HEADER="{header}"', f"-I{C_DIR}", str(C_DIR / "refquant_program.c"),
               str(obj), "-lm", "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"
        out = subprocess.run([str(exe)], capture_output=True, text=True)
        return out.returncode, out.stdout + out.stderr

    return run


def assert_c_reproduces(c_runner, header: Path) -> None:
    rc, out = c_runner(header)
    m = RESULT.search(out)
    assert m is not None, out
    assert rc == 0 and all(int(v) == 0 for v in m.groups()), f"{header.name}:\n{out}"
    COUNTS["c_programs"] += 1


def assert_python_reproduces(path: Path) -> pg.Program:
    """Both files load to the same program, and run_program (chained and per step) reproduces every vector and
    every constant."""
    programs = [pg.load_program(path.with_name(path.name + suffix)) for suffix in (".npz", ".json")]
    for program in programs:
        for chained in (True, False):
            run = pg.run_program(program, chained=chained)
            assert run.differing == 0, [d for d in run.differences() if d.differing]
            assert run.constant_differences() == {}
    a, b = (p.fields() for p in programs)
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], np.ndarray) or isinstance(a[k], np.generic):
            assert_same(a[k], b[k], k)
        else:
            assert a[k] == b[k], k
    return programs[0]


# ----------------------------------------------------------------------------------------------------------------
# random models
# ----------------------------------------------------------------------------------------------------------------

def _pipeline_model(rng, engine: str, K: int, N: int, relu: bool, weight_qscheme: str | None = None,
                    bias: bool = True) -> tuple[QuantizedLinearModel, np.ndarray]:
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = (rng.standard_normal(N) * 0.3).astype(np.float32) if bias else None
    observed = ObservedLinear(w, b, relu=relu, engine=engine)
    observed.calibrate((rng.standard_normal((16, K)) * 1.5).astype(np.float32))
    model = observed.convert()
    if weight_qscheme is not None:
        ql = QuantizedLinear.from_float(w, b, model.linear.input_scale, model.linear.input_zero_point,
                                        model.linear.output_scale, model.linear.output_zero_point, relu=relu,
                                        weight_qscheme=weight_qscheme, engine=engine)
        model = QuantizedLinearModel(model.input_scale, model.input_zero_point, ql)
    x = (rng.standard_normal((int(rng.integers(1, 7)), K)) * 2).astype(np.float32)
    x[0, 0] = 1e6  # beyond the range: code 255
    return model, x


def _chain_model(rng, engine: str = "fbgemm", depth: int | None = None, max_width: int = 24,
                 flatten: bool | None = None) -> tuple[rm.QuantizedModel, np.ndarray]:
    """QuantStub [-> Flatten] -> Linear[ReLU] (-> ReLU | Dropout | Identity)* -> ... -> DeQuantStub [-> ReLU],
    calibrated by refquant's own float forward (the fbgemm qconfig)."""
    depth = int(rng.integers(1, 4)) if depth is None else depth
    flatten = bool(rng.random() < 0.3) if flatten is None else flatten
    lead = (int(rng.integers(1, 4)), int(rng.integers(1, 5)))
    modules: dict[str, object] = {"quant": rm.QuantStub()}
    if flatten:
        k = int(rng.integers(2, 9))
        inner = (int(rng.integers(1, 4)), k)
        modules["flat"] = rm.Flatten(1)
        shape, width = (lead[0], *inner), inner[0] * k
    else:
        width = int(rng.integers(1, max_width))
        shape = (*lead, width) if rng.random() < 0.4 else (lead[0], width)
    for d in range(depth):
        n = int(rng.integers(1, max_width))
        w = (rng.standard_normal((n, width)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.2).astype(np.float32) if rng.random() < 0.8 else None
        modules[f"fc{d}"] = rm.Linear(w, b, relu=bool(rng.random() < 0.4))
        extra = rng.choice(["none", "relu", "dropout", "identity"])
        if extra == "relu":
            modules[f"act{d}"] = rm.ReLU()
        elif extra == "dropout":
            modules[f"drop{d}"] = rm.Dropout()
        elif extra == "identity":
            modules[f"id{d}"] = rm.Identity()
        width = n
    modules["dequant"] = rm.DeQuantStub()
    if rng.random() < 0.3:
        modules["out_relu"] = rm.ReLU()
    observed = rm.prepare(rm.FloatModel.sequential(modules))
    for _ in range(2):
        observed.calibrate((rng.standard_normal(shape) * 1.5).astype(np.float32))
    qm = observed.convert(engine=engine)
    x = (rng.standard_normal(shape) * 1.5).astype(np.float32)
    return qm, x


# ----------------------------------------------------------------------------------------------------------------
# A: the integer variants as requantizations of QuantizedLinear
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variant", fp.VARIANTS)
def test_variant_layers_equal_fixed_point(rng, engine, variant):
    """QuantizedLinear(requantization=variant) == fixed_point's functions on the layer's raw, every engine; the
    requantizer exposes the constants per output channel with its rules."""
    for trial in range(12):
        K, N = int(rng.integers(1, 40)), int(rng.integers(1, 20))
        qscheme = None if trial % 3 else ("per_tensor_affine" if engine != "onednn" else "per_tensor_symmetric")
        bias = (rng.standard_normal(N) * 10.0 ** rng.uniform(-2, 1)).astype(np.float32) if trial % 4 else None
        w = rng.standard_normal((N, K)).astype(np.float32)
        sx, sy = float(10.0 ** rng.uniform(-3, -1)), float(10.0 ** rng.uniform(-2, 0.5))
        ql = QuantizedLinear.from_float(w, bias, sx, int(rng.integers(0, 256)), sy, int(rng.integers(0, 256)),
                                        relu=bool(trial % 2), weight_qscheme=qscheme, engine=engine,
                                        requantization=variant)
        x = rng.integers(0, 256, (int(rng.integers(1, 9)), K), dtype=np.uint8)
        raw = ql.accumulate(x)
        rq = fp.integer_requantization_of(ql, variant)
        expected = fp.requantize_integer_readable(raw, rq)
        assert_same(ql(x), expected, f"{engine} {variant} layer")
        assert_same(ql.requantize(raw, readable=True), expected, f"{engine} {variant} readable")
        r = ql.requantizer
        assert ql.requantization == r.name == variant
        assert_same(r.bias_i32, np.zeros(N, np.int32) if bias is None else rq.bias_i32, "bias_i32 (N,)")
        assert r.bias_rule == (None if bias is None else fp.DEFAULT_BIAS_RULE[variant])
        assert r.multiplier_rule == fp.MULTIPLIER_RULE[variant] and "Matches:" in r.multiplier_rule_definition
        if variant == "float_int32_bias":
            assert r.requant_multiplier_i32 is None and r.requant_shift is None and r.shift_convention is None
        else:
            c = np.arange(N) if ql.per_channel else np.zeros(N, int)
            assert_same(r.requant_multiplier_i32, rq.requant_multiplier_i32[c], "multiplier (N,)")
            assert_same(r.requant_shift, rq.requant_shift[c], "shift (N,)")
            assert r.shift_convention == fp.SHIFT_CONVENTION[variant]
            assert ("RIGHT" if r.shift_convention == "right" else "LEFT") in r.shift_convention_definition
        COUNTS["variant_codes"] += expected.size


def test_default_requantization_and_fbgemm_name():
    w = np.float32([[0.5, -0.25], [0.1, 0.3]])
    default = QuantizedLinear.from_float(w, None, 0.1, 3, 0.2, 5)
    named = QuantizedLinear.from_float(w, None, 0.1, 3, 0.2, 5, requantization="fbgemm", engine="x86")
    assert default.requantization == named.requantization == "fbgemm"
    with pytest.raises(ValueError, match="applies to engine"):
        QuantizedLinear.from_float(w, None, 0.1, 3, 0.2, 5, requantization="fbgemm", engine="qnnpack")
    with pytest.raises(ValueError, match="cannot represent this layer"):  # real multiplier >= 2^30
        QuantizedLinear.from_float(w, None, 1.0, 3, 1e-12, 5, requantization="fbgemm_fixed_point")
    assert default.with_requantization("tflite").requantization == "tflite"
    assert default.with_requantization("tflite").with_requantization(None).requantization == "fbgemm"


# ----------------------------------------------------------------------------------------------------------------
# compare_with_float_path: which ingredient moved a code
# ----------------------------------------------------------------------------------------------------------------

def _unit_layer(bias, s_y, zy=128):
    return QuantizedLinear(np.ones((1, 1), np.int8), np.array([1.0]), np.zeros(1, np.int32),
                           None if bias is None else np.float32([bias]), 1.0, 0, s_y, zy)


@pytest.mark.parametrize("variant, bias, s_y, raw, float_code, code, cause", [
    # bias 0.5·atws: torch adds 0.5 in float (1 + 0.5 -> 2 by RNE); FBGEMM's int32 bias RNE(0.5) = 0 -> 1
    ("float_int32_bias", 0.5, 1.0, 1, 130, 129, "bias_i32"),
    # TFLite's bias rule rounds 0.5 away from zero: 0 + 1 -> 1, torch's 0.5 -> 0
    ("tflite_single_rounding", 0.5, 1.0, 0, 128, 129, "bias_i32"),
    # mult 0.5: 1·0.5 = 0.5, torch RNE -> 0; FBGEMM's fixed point rounds half up -> 1
    ("fbgemm_fixed_point", None, 2.0, 1, 128, 129, "exact_rounding"),
    # mult 0.25, raw −2: −0.5; torch -> −0 (128), single rounding half up -> 0 (128), TFLite's SRDHM then
    # RoundingDivideByPOT (ties away from zero) -> −1 (127)
    ("tflite", None, 4.0, -2, 128, 127, "second_rounding"),
])
def test_golden_causes(variant, bias, s_y, raw, float_code, code, cause):
    ql = _unit_layer(bias, s_y)
    cmp = fp.compare_with_float_path(ql, variant, raw_i32=np.array([[raw]], np.int32))
    assert int(cmp.float_codes[0, 0]) == float_code and int(cmp.variant_codes[0, 0]) == code
    assert fp.CAUSES[int(cmp.cause[0, 0])] == cause
    assert cmp.counts()[cause] == 1 and cmp.differing == 1


@pytest.mark.parametrize("variant", fp.VARIANTS)
def test_compare_with_float_path_is_consistent(rng, variant):
    """Random calibrated layers: the float codes are torch's path (the fbgemm layer's), the variant codes the
    variant layer's, a cause exactly where they differ, and without bias float_int32_bias never differs."""
    totals: Counter = Counter()
    for trial in range(10):
        model, _ = _pipeline_model(rng, "fbgemm", int(rng.integers(4, 64)), int(rng.integers(2, 32)),
                                   relu=bool(trial % 2), bias=trial != 3)
        ql = model.linear
        x = rng.integers(0, 256, (64, ql.in_features), dtype=np.uint8)
        cmp = fp.compare_with_float_path(ql, variant, x_u8=x)
        assert_same(cmp.float_codes, ql(x), "float path")
        assert_same(cmp.variant_codes, ql.with_requantization(variant)(x), "variant")
        assert_same(cmp.cause >= 0, cmp.variant_codes != cmp.float_codes, "cause where they differ")
        assert sum(cmp.counts().values()) == cmp.differing
        assert list(cmp.stages) == ["float", *fp.CAUSES[:len(cmp.stages) - 1]]
        if ql.bias is None and variant == "float_int32_bias":
            assert cmp.differing == 0
        totals.update(cmp.counts())
    COUNTS[f"causes {variant}"] = dict(totals)


# ----------------------------------------------------------------------------------------------------------------
# B, C: export, reload, run again, run in C
# ----------------------------------------------------------------------------------------------------------------

PIPELINE_CASES = [(e, None) for e in ENGINES] + [("fbgemm", "per_tensor_affine"),
                                                 pytest.param("x86", "per_channel_affine", marks=pytest.mark.slow),
                                                 pytest.param("qnnpack", "per_channel_affine", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine, qscheme", PIPELINE_CASES)
@pytest.mark.parametrize("requantization", [None, *fp.VARIANTS])
def test_pipeline_models_every_engine_and_variant(tmp_path, rng, c_runner, engine, qscheme, requantization):
    K, N = int(rng.integers(1, 48)), int(rng.integers(1, 24))
    model, x = _pipeline_model(rng, engine, K, N, relu=bool(rng.random() < 0.5), weight_qscheme=qscheme,
                               bias=bool(rng.random() < 0.8))
    path = tmp_path / "model"
    program = export_model(model, x, path, requantization=requantization)
    if requantization is None:
        assert_same(program["tensor3"], model(x), "exported output = the model's")
        assert_same(program["tensor1"], model.quant(x), "input codes")
        assert_same(program["step1.raw_i32"], model.linear.accumulate(model.quant(x)), "raw")
    else:
        assert_same(program["tensor2"], model.linear.with_requantization(requantization)(model.quant(x)), "codes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h", "model.json", "model.npz"]
    assert_python_reproduces(path)
    assert_c_reproduces(c_runner, path.with_suffix(".h"))
    COUNTS[f"exported {engine}/{qscheme or 'default'}/{requantization or 'float path'}"] += 1


def check_chains(tmp_path, rng, c_runner, engine, trials: int) -> None:
    for trial in range(trials):
        qm, x = _chain_model(rng, engine)
        traces = qm.trace(x)
        for requantization in (None, *fp.VARIANTS):
            path = tmp_path / f"chain{trial}_{requantization}"
            try:
                program = export_model(qm, x, path, requantization=requantization)
            except ValueError as e:
                assert "cannot represent this layer" in str(e)
                continue
            if requantization is None:
                for i, tr in enumerate(traces.values()):
                    assert_same(program[f"tensor{i + 1}"], tr.output, f"{tr.name} output")
                    if tr.accumulators is not None:
                        assert_same(program[f"step{i}.raw_i32"], tr.accumulators, f"{tr.name} raw")
                assert_same(program[f"tensor{program['output']}"], qm(x), "model output")
            assert_python_reproduces(path)
            assert_c_reproduces(c_runner, path.with_suffix(".h"))
            COUNTS[f"chain steps {requantization or 'float path'}"] += program["num_steps"]


@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_chains_of_layers(tmp_path, rng, c_runner, engine):
    """QuantizedModel chains (Flatten, LinearReLU, ReLU, Dropout, Identity, float ReLU after DeQuantStub): the
    exported vectors are the model's own trace, and Python and C reproduce them for the float path and every
    integer variant."""
    check_chains(tmp_path, rng, c_runner, engine, trials=1)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_more_chains_of_layers(tmp_path, rng, c_runner, engine):
    check_chains(tmp_path, rng, c_runner, engine, trials=8)


def test_export_linear_any_layer(tmp_path, rng, c_runner):
    """export_linear keeps writing refquant-golden-linear/2 for fbgemm's float path and writes the model format
    (one linear step on codes) for every other engine and variant; a linear/2 file loads as a program, runs again
    and gets a C header the C runner reproduces."""
    w = rng.standard_normal((5, 9)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    x = rng.integers(0, 256, (4, 3, 9), dtype=np.uint8)
    ql = QuantizedLinear.from_float(w, b, 0.03, 7, 0.2, 100)
    legacy = export_linear(ql, x[0], tmp_path / "fc", header=True)
    assert legacy["format"] == ex.FORMAT
    program = assert_python_reproduces(tmp_path / "fc")
    assert program.format == ex.FORMAT and program.steps[0].kind == "linear"
    assert_c_reproduces(c_runner, tmp_path / "fc.h")
    for engine in ENGINES:
        for requantization in (None, *fp.VARIANTS):
            layer = QuantizedLinear.from_float(w, b, 0.03, 7, 0.2, 100, engine=engine, requantization=requantization)
            if layer.requantization == "fbgemm":
                continue
            path = tmp_path / f"fc_{engine}_{layer.requantization}"
            fields = export_linear(layer, x, path, header=True)
            assert fields["format"] == pg.MODEL_FORMAT and fields["tensor0.dtype"] == "uint8"
            assert_same(fields["tensor1"], layer(x), "exported codes")
            assert_python_reproduces(path)
            if requantization is None or engine == "x86":  # the other pairs: test_pipeline_models_every_...
                assert_c_reproduces(c_runner, path.with_suffix(".h"))
    with pytest.raises(ValueError, match="holds fbgemm's float path"):
        export_linear(ql.with_requantization("tflite"), x[0], tmp_path / "bad", format=ex.FORMAT)


def test_run_program_with_other_variants(tmp_path, rng):
    """The explainer's seam: re-running a float-path program with each variant gives that variant's codes."""
    qm, x = _chain_model(rng, depth=2)
    program = pg.load_program(export_model(qm, x, tmp_path / "m", header=False) and tmp_path / "m.npz")
    for variant in fp.VARIANTS:
        try:
            run = pg.run_program(program, requantization=variant)
            expected = pg.model_program(qm, x, requantization=variant)
        except ValueError as e:
            assert "cannot represent" in str(e)
            continue
        for t, tensor in enumerate(run.tensors):
            assert_same(tensor, expected[f"tensor{t}"], f"{variant} tensor {t}")
    run = pg.run_program(program, requantization="tflite", bias_rule="tflite_mlir", chained=False)
    assert len(run.tensors) == len(program.tensors)
    run = pg.run_program(program, rounding="nearbyint_then_add")
    assert run.tensors[1].dtype == np.uint8
    with pytest.raises(ValueError, match="bias_rule applies to the integer variants"):
        pg.run_program(program, bias_rule="fbgemm")
    with pytest.raises(ValueError, match="requantization must be None or one of"):
        pg.run_program(program, requantization="gemmlowp")


def test_other_roundings_run_in_c(tmp_path, rng, c_runner):
    """A program whose QuantStub uses another rounding (a later FBGEMM's, oneDNN's) runs in C too."""
    model, x = _pipeline_model(rng, "fbgemm", 8, 4, relu=False)
    x = (x * 37).astype(np.float32)
    fields = pg.model_program(model, x)
    for rounding in ("nearbyint_then_add", "multiply_then_add"):
        program = pg.program_from_fields(fields)
        program.steps[0].constants.update(rounding=rounding, formula=pg.QUANTIZE_FORMULAS[rounding])
        run = pg.run_program(program, rounding=rounding)
        program.tensors = run.tensors
        for s in program.steps:
            if s.kind == "linear":
                s.acc_i32, s.raw_i32 = run.acc_i32[s.index], run.raw_i32[s.index]
        ex.write_golden(program.fields(), tmp_path / rounding, header=True)
        assert_c_reproduces(c_runner, tmp_path / f"{rounding}.h")


def test_the_c_runner_can_fail(tmp_path, rng, c_runner):
    """A header with one output code, one float bit, one accumulator and one constant changed: the C runner counts
    each and exits 1."""
    model, x = _pipeline_model(rng, "fbgemm", 6, 3, relu=False)
    fields = pg.model_program(model, x, requantization="tflite")
    fields["tensor2"] = fields["tensor2"].copy()
    fields["tensor2"][0, 0] ^= 1
    fields["tensor3"] = pg.model_program(model, x)["tensor3"].copy()
    fields["tensor3"] = fields["tensor3"].view(np.uint32).copy()
    fields["tensor3"][-1, -1] ^= 1
    fields["tensor3"] = fields["tensor3"].view(np.float32)
    fields["step1.raw_i32"] = fields["step1.raw_i32"] + np.int32(1)
    fields["step1.requant_shift"] = fields["step1.requant_shift"] - np.int32(1)
    ex.write_golden(fields, tmp_path / "bad", header=True)
    rc, out = c_runner(tmp_path / "bad.h")
    m = RESULT.search(out)
    assert rc == 1 and m is not None, out
    codes, bits, i32, constants, views = (int(v) for v in m.groups())
    assert codes >= 1 and bits >= 1 and i32 >= 2 and constants >= 1 and views == 0, out


def test_refusals(rng, tmp_path):
    qm, x = _chain_model(rng, depth=1)
    w = np.ones((2, 2), np.float32)
    modules = {"quant": rm.QuantStub(), "fc": rm.Linear(w), "add": rm.FloatFunctional(), "dequant": rm.DeQuantStub()}
    calls = (rm.Call("quant", ("x",), "q"), rm.Call("fc", ("q",), "h"), rm.Call("add", ("h", "q"), "s", "add"),
             rm.Call("dequant", ("s",), "y"))
    observed = rm.prepare(rm.FloatModel(modules, rm.Graph(("x",), calls, "y")))
    observed.calibrate(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"add \(QFunctional.add\).*no 'add' step"):
        export_model(observed.convert(), np.ones((2, 2), np.float32), tmp_path / "m")
    with pytest.raises(TypeError, match="x_f32 must be a float32"):
        export_model(qm, x.astype(np.float64), tmp_path / "m")
    with pytest.raises(TypeError, match="model must be"):
        export_model("model", x, tmp_path / "m")
    with pytest.raises(ValueError, match="requantization must be None"):
        export_model(qm, x, tmp_path / "m", requantization="gemmlowp")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# strict reading
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def model_files(tmp_path, rng):
    qm, x = _chain_model(rng, depth=2, flatten=False)
    fields = export_model(qm, x, tmp_path / "good", requantization="tflite", header=False)
    return fields, json.loads((tmp_path / "good.json").read_text())


def _refused(path, field, *words):
    with pytest.raises(GoldenFileError) as info:
        load_golden(path)
    assert info.value.field == field, (info.value.field, str(info.value))
    assert str(path) in str(info.value)
    for w in words:
        assert w in str(info.value), str(info.value)


def _edit(tmp_path, doc, **changes):
    doc = json.loads(json.dumps(doc))
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del doc[k]
        else:
            doc[k] = v
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


def test_model_files_are_read_strictly(tmp_path, model_files):
    fields, doc = model_files
    lin = next(i for i in range(fields["num_steps"]) if fields[f"step{i}.kind"] == "linear")
    p = f"step{lin}."
    cases = [
        ({"num_steps": 0}, "num_steps", "must lie in"),
        ({"step0__kind": "conv"}, "step0.kind", "must be one of"),
        ({p + "requant_shift": None}, p + "requant_shift", "missing"),
        ({p + "foreign": 1}, p + "foreign", "not a field"),
        ({p + "requantization": "qnnpack"}, None, None),  # the qnnpack fields are missing: caught below
        ({"tensor1.shape": [1]}, "tensor1.shape", "writes shape"),
        ({p + "weight_int8": [[1]]}, p + "weight_int8", "shape"),
        ({p + "shift_convention": "right"}, p + "shift_convention", "'tflite' uses 'left'"),
        ({"step0__formula": pg.QUANTIZE_FORMULAS["nearbyint_then_add"]}, "step0.formula", "not the formula"),
        ({p + "input_scale_bits": doc[p + "input_scale_bits"] + 1}, p + "input_scale", "disagrees"),
        ({p + "inputs": [0]}, p + "inputs", "reads uint8 values"),
        ({"output": 99}, "output", "must name a tensor"),
        ({p + "pairs_restart_k": 151}, p + "pairs_restart_k", "must be 0"),
        ({p + "pairs_restart_k": None}, p + "pairs_restart_k", "missing"),
    ]
    for changes, field, words in cases:
        path = _edit(tmp_path, doc, **{k.replace(".", "__"): v for k, v in changes.items()})
        if field is None:
            with pytest.raises(GoldenFileError):
                load_golden(path)
            continue
        _refused(path, field, words)
    doc2 = json.loads(json.dumps(doc))
    doc2[p + "engine"] = "onednn"
    doc2[p + "requantization"] = "fbgemm"
    for k in list(doc2):
        if k.startswith(p) and k[len(p):].split("_bits")[0] in pg.REQUANTIZATION_FIELDS["tflite"]:
            del doc2[k]
    for k, f in pg.REQUANTIZATION_FIELDS["fbgemm"].items():
        n = fields[p + "out_features"]
        doc2[p + k] = "none" if k == "bias_mode" else ([1.0] * n if f.shape else 1.0)
        if f.dtype == "float32":
            doc2[p + k + "_bits"] = [0x3F800000] * n if f.shape else 0x3F800000
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc2))
    _refused(path, p + "requantization", "applies to engine")


def test_docstring_lists_the_field_tables():
    """Every field name of the code tables appears in refquant/program.py's docstring."""
    doc = pg.__doc__
    names = set(pg.HEADER_FIELDS) | set(pg.STEP_FIELDS)
    for table in (*pg.KIND_FIELDS.values(), *pg.REQUANTIZATION_FIELDS.values(), pg.LINEAR_FIELDS_V2):
        names |= set(table)
    undocumented = [n for n in sorted(names) if n not in doc]
    assert undocumented == []


# ----------------------------------------------------------------------------------------------------------------
# against torch, live
# ----------------------------------------------------------------------------------------------------------------

def _torch_pipeline(model: QuantizedLinearModel, engine: str):
    ql = model.linear
    qw = torch_qweight(ql.weight_int8, ql.weight_scales_f64, ql.weight_zero_points.astype(np.int64), ql.per_channel)
    cls = torch.ao.nn.intrinsic.quantized.LinearReLU if ql.relu else torch.ao.nn.quantized.Linear
    with quantized_engine(engine):
        lin = cls(ql.in_features, ql.out_features)
        lin.set_weight_bias(qw, None if ql.bias is None else torch.from_numpy(ql.bias))
        lin.scale, lin.zero_point = float(ql.output_scale), int(ql.output_zero_point)
    quant = torch.ao.nn.quantized.Quantize(float(model.input_scale), int(model.input_zero_point), torch.quint8)
    return quant, lin, torch.ao.nn.quantized.DeQuantize()


@pytest.mark.parametrize("engine, qscheme", [("fbgemm", None), ("fbgemm", "per_tensor_symmetric"),
                                             ("x86", "per_channel_affine"), ("qnnpack", None)])
def test_exported_model_vectors_are_torchs(tmp_path, rng, engine, qscheme):
    """The exported input codes, output codes and float output equal torch's Quantize -> quantized Linear ->
    DeQuantize built from the same integers, on the same inputs (7-bit-safe: the fbgemm layers are compared with
    refquant modelling the int16 pairs exactly as this CPU's torch runs them)."""
    for _ in range(4):
        model, x = _pipeline_model(rng, engine, int(rng.integers(1, 40)), int(rng.integers(1, 16)),
                                   relu=bool(rng.random() < 0.5), weight_qscheme=qscheme)
        if SATURATES and engine in ("fbgemm", "x86"):  # this CPU's torch sums int16-saturated pairs (eq. M2)
            ql = model.linear
            c = slice(None) if ql.per_channel else slice(0, 1)
            ql = QuantizedLinear(ql.weight_int8, ql.weight_scales_f64[c], ql.weight_zero_points[c], ql.bias,
                                 ql.input_scale, ql.input_zero_point, ql.output_scale, ql.output_zero_point,
                                 relu=ql.relu, weight_qscheme=ql.weight_qscheme, saturate_int16_pairs=True,
                                 engine=engine)
            model = QuantizedLinearModel(model.input_scale, model.input_zero_point, ql)
        fields = export_model(model, x, tmp_path / "m", header=False)
        quant, lin, dequant = _torch_pipeline(model, engine)
        with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = quant(torch.from_numpy(x))
            qy = lin(qx)
            y = dequant(qy)
        assert_same(fields["tensor1"], qx.int_repr().numpy(), "input codes vs torch")
        assert_same(fields["tensor2"], qy.int_repr().numpy(), "output codes vs torch")
        assert_same(fields["tensor3"], y.numpy(), "float output vs torch")
        COUNTS["torch codes"] += fields["tensor2"].size


def test_exported_chain_is_torchs(tmp_path, rng):
    """A chain QuantStub -> Linear[ReLU] -> ReLU -> Linear -> DeQuantStub built in torch from refquant's converted
    integers: every exported tensor equals torch's."""
    for _ in range(3):
        qm, x = _chain_model(rng, depth=2, flatten=False)
        qm = rm.QuantizedModel(qm.modules, qm.graph, saturate_int16_pairs=SATURATES)
        fields = export_model(qm, x, tmp_path / "chain", header=False)
        with quantized_engine("fbgemm"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = [torch.from_numpy(x)]
            for i in range(fields["num_steps"]):
                s = qm.steps[i]
                v = values[int(fields[f"step{i}.inputs"][0])]
                kind = fields[f"step{i}.kind"]
                if kind == "quantize":
                    out = torch.quantize_per_tensor(v, s.op.scale, s.op.zero_point, torch.quint8)
                elif kind == "linear":
                    ql = s.op
                    qw = torch_qweight(ql.weight_int8, ql.weight_scales_f64, ql.weight_zero_points.astype(np.int64),
                                       ql.per_channel)
                    packed = torch.ops.quantized.linear_prepack(qw, None if ql.bias is None else
                                                                torch.from_numpy(ql.bias))
                    op = torch.ops.quantized.linear_relu if ql.relu else torch.ops.quantized.linear
                    out = op(v, packed, float(ql.output_scale), int(ql.output_zero_point))
                elif kind == "relu":
                    out = torch.relu(v)
                elif kind == "dequantize":
                    out = v.dequantize()
                else:
                    out = v
                values.append(out)
                got = out.int_repr().numpy() if out.is_quantized else out.numpy()
                assert_same(fields[f"tensor{i + 1}"], got, f"tensor {i + 1} ({kind}) vs torch")
                COUNTS["torch chain values"] += got.size


@pytest.mark.parametrize("engine", ENGINES)
def test_exported_layers_are_torchs_every_engine(tmp_path, rng, capfd, c_runner, engine):
    """Random problems from integer codes (tests/torch_engines.py) run by torch on each engine; refquant's layer
    modelling the kernel family torch ran, exported in the model format, gives torch's codes, and C reproduces
    the file."""
    done = 0
    while done < 3:
        p = random_problem(rng, engine, k_choices=(1, 3, 8, 17, 64, 302), max_n=12, max_m=5)
        y, family = run_torch(p, capfd)
        if isinstance(y, Exception):
            continue
        try:
            ql = refquant_layer(p, family)
        except ValueError:
            continue
        fields = export_linear(ql, p["x"], tmp_path / f"l{done}", format=pg.MODEL_FORMAT, header=True)
        assert_same(fields["tensor1"], y, f"exported codes vs torch ({engine}, {family})")
        if done == 0:
            assert_c_reproduces(c_runner, tmp_path / f"l{done}.h")
        done += 1
        COUNTS[f"torch layers {engine}"] += 1


def _gemm_jit_layer(rng, K: int, N: int, requantization: str | None = None) -> QuantizedLinear:
    """An onednn layer modelling gemm:jit on a CPU without VNNI (int16-saturated pairs, eq. M2b), its weights near
    ±127 so that pairs of full-range codes saturate."""
    w = rng.choice(np.array([-128, -127, -126, 125, 126, 127], np.int8), size=(N, K))
    w[:, rng.random(K) < 0.3] = rng.integers(-128, 128, size=1, dtype=np.int8)
    scales = rng.uniform(0.002, 0.01, N)
    return QuantizedLinear(w, scales, np.zeros(N, np.int64), rng.standard_normal(N).astype(np.float32),
                           0.02, int(rng.integers(0, 256)), float(rng.uniform(2, 40)), int(rng.integers(0, 256)),
                           relu=bool(rng.random() < 0.3), weight_qscheme="per_channel_symmetric",
                           saturate_int16_pairs=True, engine="onednn", requantization=requantization,
                           onednn_kernel="gemm")


@pytest.mark.parametrize("K, restart", [(200, 0), (300, 0), (302, 151), (513, 257), (767, 0), (800, 0)])
@pytest.mark.parametrize("requantization", [None, "tflite"])
def test_gemm_jit_pairs_restart_in_the_program(tmp_path, rng, c_runner, K, restart, requantization):
    """oneDNN gemm:jit's second K block starts new int16 pairs at an odd k (eq. M2b): the file names that k
    (pairs_restart_k), its acc_i32 are the layer's own products, Python re-runs them from the file, and C
    reproduces every vector -- where pairing from k = 0 (eq. M2) would give other accumulators."""
    ql = _gemm_jit_layer(rng, K, N=int(rng.integers(3, 9)), requantization=requantization)
    x = rng.choice(np.array([0, 1, 254, 255], np.uint8), size=(int(rng.integers(2, 6)), K))
    x[0] = 255
    path = tmp_path / f"gemm{K}"
    fields = export_linear(ql, x, path, format=pg.MODEL_FORMAT, header=True)
    assert fields["format"] == "refquant-golden-model/2"
    assert fields["step0.pairs_restart_k"] == restart == (ql.pairs_restart_k or 0)
    assert_same(fields["step0.acc_i32"], ql.products(x), "acc_i32 = the layer's products")
    assert_same(fields["tensor1"], ql(x), "codes = the layer's")
    from_k0 = matmul_u8s8_acc32(x, ql.weight_int8, saturate_int16_pairs=True)
    if restart:  # the case is one where the restart matters
        assert not np.array_equal(fields["step0.acc_i32"], from_k0)
    else:
        assert_same(fields["step0.acc_i32"], from_k0, "no restart: eq. M2")
    program = assert_python_reproduces(path)
    assert program.steps[0].layer().pairs_restart_k == ql.pairs_restart_k
    assert_c_reproduces(c_runner, path.with_suffix(".h"))
    COUNTS["gemm:jit programs"] += 1


def test_gemm_jit_pairs_restart_is_read_strictly(tmp_path, rng):
    """A file whose pairs_restart_k disagrees with its onednn_kernel and K is refused; a version-1 file (no
    pairs_restart_k) loads with the restart its layer runs."""
    ql = _gemm_jit_layer(rng, 302, 4)
    x = np.full((2, 302), 255, np.uint8)
    fields = export_linear(ql, x, tmp_path / "g", format=pg.MODEL_FORMAT, header=False)
    doc = json.loads((tmp_path / "g.json").read_text())
    _refused(_edit(tmp_path, doc, step0__pairs_restart_k=0), "step0.pairs_restart_k", "must be 151",
             "onednn_kernel 'gemm'")
    _refused(_edit(tmp_path, doc, step0__onednn_kernel="brgemm"), "step0.pairs_restart_k", "must be 0")
    v1 = _edit(tmp_path, doc, format=pg.MODEL_FORMAT_V1, step0__pairs_restart_k=None)
    program = pg.load_program(v1)
    assert program.steps[0].constants["pairs_restart_k"] == 151
    run = pg.run_program(program)
    assert_same(run.tensors[1], fields["tensor1"], "a version-1 file's codes")
    with pytest.raises(GoldenFileError, match="not a field"):
        load_golden(_edit(tmp_path, doc, format=pg.MODEL_FORMAT_V1))


@pytest.mark.slow
def test_larger_random_models_in_c(tmp_path, rng, c_runner):
    """Wider layers and deeper chains, every variant."""
    for trial in range(6):
        qm, x = _chain_model(rng, depth=int(rng.integers(2, 5)), max_width=200)
        for requantization in (None, *fp.VARIANTS):
            path = tmp_path / f"big{trial}_{requantization}"
            try:
                export_model(qm, x, path, requantization=requantization)
            except ValueError:
                continue
            assert_c_reproduces(c_runner, path.with_suffix(".h"))


def test_report_counts():
    """Not a check: prints what this module exported and reproduced (run with -s to see it)."""
    print(dict(COUNTS))
