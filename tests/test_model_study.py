"""The model study (crosscheck.model_study, ``python -m crosscheck.model``) against torch, live.

* Random models of the supported modules (tests/torch_models.py: depth, widths, fused and unfused ReLUs, residual
  add / add_relu / mul, cat, Flatten, Dropout, a Linear called twice) through the study's torch recording and
  refquant's mirror, on every static engine: every observer, every converted value and every call's output equal.
* The built-in digits model end to end (accuracies printed, exit 0), a user's model from a file with weights
  written by torch.save in another process, the pickled-module guard, and bad models and files (exit 2, one line
  naming the module or the file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from crosscheck.model_study import ModelComparison
from crosscheck.torch_model import model_events
from crosscheck.worker import UsageError
from torch_models import fusions, needs_avx2_kernels, random_batch, random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")
ENGINE_PARAMS = [pytest.param(e, marks=pytest.mark.isa) if e in ("fbgemm", "x86") else e for e in ENGINES]
"""fbgemm's and x86's Linears depend on fbgemm's kernel family (marked isa); qnnpack's and onednn's do not."""
COUNTS: Counter = Counter()


def env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def study_random_model(rng: np.random.Generator, engine: str) -> None:
    spec = random_model(rng)
    calibration = [torch.from_numpy(random_batch(rng, int(rng.integers(1, 17)), spec.input_shape))
                   for _ in range(int(rng.integers(1, 4)))]
    evaluation = [(torch.from_numpy(random_batch(rng, int(rng.integers(1, 33)), spec.input_shape)), None),
                  (torch.from_numpy(random_batch(rng, 5, spec.input_shape, spread=4.0)), None)]  # beyond the ranges
    saved = torch.backends.quantized.engine
    events = model_events(spec.model, calibration, iter(evaluation), engine, fusions=fusions(spec.model))
    try:
        (_, env), (_, record) = next(events), next(events)
        comparison = ModelComparison(record, env)
        inputs = [x.numpy() for x in calibration] + [x.numpy() for x, _ in evaluation]
        for i, x in enumerate(inputs):
            try:
                _, b = next(events)
            except UsageError as e:  # torch refused to run the model: refquant must refuse the same input
                assert engine == "qnnpack" and "failed to create QNNPACK Add operator" in str(e), e
                with pytest.raises(ValueError, match="qnnpack add"):
                    comparison.model(x)
                COUNTS[engine, "refused by both"] += 1
                return
            comparison.add_batch(b)
    finally:
        torch.backends.quantized.engine = saved
    fields = comparison.fields()
    bad = [f for f in fields if f.counted and not f.equal]
    assert not bad, f"{spec.text} [{engine}]: " + "; ".join(f"{f.name}: {f.first_mismatch}" for f in bad)
    layers = comparison.layers(fields)
    assert all(entry["equal"] for entry in layers)
    assert {e["path"] for e in layers} >= {"quant", "dequant"}
    COUNTS[engine, "models"] += 1
    COUNTS[engine, "layers"] += len(layers)
    COUNTS[engine, "values"] += sum(f.size for f in fields if f.counted)


@needs_avx2_kernels
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
@pytest.mark.parametrize("i", range(3))
def test_random_models_are_exact_layer_by_layer_on_every_engine(rng, engine, i):
    study_random_model(rng, engine)


@needs_avx2_kernels
@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
@pytest.mark.parametrize("i", range(100))
def test_random_models_are_exact_layer_by_layer_on_every_engine_many(rng, engine, i):
    study_random_model(rng, engine)


# ----------------------------------------------------------------------------------------------------------------
# python -m crosscheck.model


@pytest.mark.isa
def test_the_digits_model_prints_its_accuracies_from_real_data_and_exits_0(tmp_path):
    """... and --export writes its integer program, whose test vectors are torch's outputs, bit for bit."""
    import hashlib

    from refquant.program import load_program, run_program

    proc = subprocess.run([sys.executable, "-m", "crosscheck.model", "--export", str(tmp_path / "golden"),
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True, cwd=ROOT,
                          env=env_with_repo(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    program = load_program(tmp_path / "golden" / "model.json")
    assert [st.kind for st in program.steps if st.kind != "identity"] == ["quantize", "linear", "linear",
                                                                            "linear", "dequantize"]
    assert all(d.differing == 0 for d in run_program(program).differences())  # the program reproduces itself
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["export"] == [str(tmp_path / "golden" / f"model{s}") for s in (".npz", ".json", ".h")]
    torch_output = next(f for f in doc["fields"] if f["name"] == "model output (evaluation)")["torch"]
    y = np.ascontiguousarray(program.tensors[program.output])
    assert y.shape == (360, 10) and hashlib.sha256(y.tobytes()).hexdigest() == torch_output["sha256"]
    out = proc.stdout
    assert "accuracy on 360 held-out images" in out
    lines = {line.split("%")[0].rsplit(None, 1)[0].strip(): float(line.split("%")[0].split()[-1])
             for line in out.splitlines() if line.rstrip().endswith("of 360)")}
    assert set(lines) == {"float model", "torch, quantized", "refquant, quantized"}, out
    assert lines["torch, quantized"] == lines["refquant, quantized"] and lines["float model"] > 90, out
    assert "identical predictions, torch and refquant: yes" in out
    assert "result: all 5 layers equal, bit for bit" in out


USER_MODEL = '''
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.ao.nn.intrinsic import LinearReLU


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.fc1 = LinearReLU(nn.Linear(8, 6), nn.ReLU())    # fused by hand: state-dict keys fc1.0.weight, ...
        self.fc2 = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.skip = FloatFunctional()
        self.head = nn.Linear(6, 3)
        self.dequant = DeQuantStub()

    def forward(self, x):
        h = self.fc1(self.quant(x))
        return self.dequant(self.head(self.skip.add(h, self.relu(self.fc2(h)))))


def make():
    net = Net()
    for p in net.parameters():
        nn.init.zeros_(p)      # the weights must come from the state dict
    return net
'''

SAVE = '''
import numpy as np, torch
import mymodel
torch.manual_seed(7)
net = mymodel.Net()
torch.save(net.state_dict(), "weights.pt")
torch.save(net, "whole.pt")
rng = np.random.default_rng(1)
np.save("calib.npy", rng.standard_normal((300, 8)).astype(np.float32))
np.save("inputs.npy", rng.standard_normal((50, 8)).astype(np.float32))
print(sorted(net.state_dict()))
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "mymodel.py").write_text(USER_MODEL)
    proc = subprocess.run([sys.executable, "-c", SAVE], capture_output=True, text=True, cwd=d, env=env_with_repo(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "'fc1.0.weight'" in proc.stdout and "'fc1.0.bias'" in proc.stdout, proc.stdout
    return d


@pytest.mark.isa
def test_a_user_model_from_a_file_with_weights_saved_in_another_process(user_dir):
    proc = subprocess.run([sys.executable, "-m", "crosscheck.model", "--model", "mymodel:make", "--state-dict",
                           "weights.pt", "--calib", "calib.npy", "--inputs", "inputs.npy", "--engine", "x86",
                           "--batch-size", "128", "--json", "out.json"],
                          capture_output=True, text=True, cwd=user_dir, env=env_with_repo(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: all 7 layers equal, bit for bit" in proc.stdout, proc.stdout
    doc = json.loads((user_dir / "out.json").read_text())
    assert [e["path"] for e in doc["layers"]] == ["quant", "fc1", "fc2", "relu", "skip", "head", "dequant"]
    assert doc["layers"][1]["torch_type"] == "LinearReLU" and doc["data"]["calibration"] == {"batches": 3,
                                                                                              "inputs": 300}
    weight = next(f for f in doc["fields"] if f["name"] == "fc1 weight int8 (int_repr)")
    assert weight["layer"] == "fc1" and np.abs(np.array(weight["torch"])).max() >= 127  # not the zeros of make()
    assert doc["equal"] is True and doc["first_divergence"] is None


def test_a_pickled_module_is_refused_without_trust_pickle(user_dir, monkeypatch, capsys):
    from crosscheck.model import main

    monkeypatch.chdir(user_dir)
    with pytest.raises(SystemExit) as e:
        main(["--pickled-model", "whole.pt", "--calib", "calib.npy"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--pickled-model whole.pt: a pickled module runs code from the file" in err and "--trust-pickle" in err
    # the guard is on the torch side too: a config that skipped the CLI never unpickles
    from crosscheck.model_study import ModelConfig, run_model_study
    from crosscheck.worker import UsageError

    with pytest.raises(UsageError, match="runs code from the file"):
        run_model_study(ModelConfig(model="user", pickled=str(user_dir / "whole.pt"), trust_pickle=False,
                                    calib=np.zeros((4, 8), np.float32)), torch_subprocess=False)
    monkeypatch.syspath_prepend(str(user_dir))  # the pickle names mymodel.Net
    assert main(["--pickled-model", "whole.pt", "--trust-pickle", "--calib", "calib.npy", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("result: all 7 layers equal")


def test_export_refuses_a_model_with_an_add_after_the_study(user_dir, monkeypatch, capsys):
    from crosscheck.model import main

    monkeypatch.chdir(user_dir)
    assert main(["--model", "mymodel:make", "--state-dict", "weights.pt", "--calib", "calib.npy", "--quiet",
                 "--export", "golden"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("result: all 7 layers equal")
    assert "--export golden: skip (QFunctional.add): refquant-golden-model/2 has no 'add' step" in captured.err


def test_a_state_dict_that_holds_a_whole_module_is_refused_with_a_hint(user_dir, monkeypatch, capsys):
    from crosscheck.model import main

    monkeypatch.chdir(user_dir)
    assert main(["--model", "mymodel:make", "--state-dict", "whole.pt", "--calib", "calib.npy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--state-dict" in err[0] and "whole.pt" in err[0] and "--pickled-model" in err[0]


BAD_MODELS = {
    "unsupported": ('''
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.fc, self.act, self.dequant = QuantStub(), nn.Linear(4, 4), nn.Sigmoid(), DeQuantStub()
    def forward(self, x):
        return self.dequant(self.act(self.fc(self.quant(x))))
def make():
    return Net()
''', "act (Sigmoid) is not a module refquant supports"),
    "no_quantstub": ('''
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.dequant = nn.Linear(4, 4), DeQuantStub()
    def forward(self, x):
        return self.dequant(self.fc(x))
def make():
    return Net()
''', "fc (Linear) receives a float tensor"),
    "control_flow": ('''
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub
class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.gate, self.dequant = QuantStub(), Gate(), DeQuantStub()
    def forward(self, x):
        return self.dequant(self.gate(self.quant(x)))
def make():
    return Net()
''', "gate (Gate) has control flow on a tensor"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_a_bad_model_exits_2_with_one_line_naming_the_module(tmp_path, monkeypatch, capsys, kind):
    from crosscheck.model import main

    source, words = BAD_MODELS[kind]
    (tmp_path / f"bad_{kind}.py").write_text(source)
    np.save(tmp_path / "calib.npy", np.ones((3, 4), np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", f"bad_{kind}:make", "--calib", "calib.npy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_bad_files_and_options_exit_2_naming_them(tmp_path, monkeypatch, capsys):
    from crosscheck.model import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(USER_MODEL)
    np.save(tmp_path / "f64.npy", np.ones((3, 8)))
    np.save(tmp_path / "one_d.npy", np.ones(8, np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]], np.float32))
    np.save(tmp_path / "ok.npy", np.ones((3, 8), np.float32))
    np.save(tmp_path / "ok5.npy", np.ones((3, 5), np.float32))
    torch.save({"fc9.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    cases = [
        (["--model", "m:make", "--calib", "f64.npy"], "--calib f64.npy: dtype float64, expected float32"),
        (["--model", "m:make", "--calib", "one_d.npy"], "--calib one_d.npy: shape (8,)"),
        (["--model", "m:make", "--calib", "obj.npy"], "--calib obj.npy: not a plain .npy array"),
        (["--model", "m:make", "--calib", "nan.npy"], "--calib nan.npy: element (0, 1) is"),
        (["--model", "m:make", "--calib", "missing.npy"], "--calib missing.npy: no such file"),
        (["--model", "m:make", "--calib", "ok.npy", "--inputs", "ok5.npy"], "--inputs ok5.npy: samples of shape"),
        (["--model", "m:make"], "needs calibration data: --calib"),
        (["--model", "m", "--calib", "ok.npy"], "expected MODULE:FUNCTION"),
        (["--state-dict", "wrong.pt"], "--state-dict goes with --model"),
        (["--calib", "ok.npy"], "--calib and --inputs are for --model"),
        (["--model", "m:make", "--calib", "ok.npy", "--trust-pickle"], "--trust-pickle goes with --pickled-model"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert words in capsys.readouterr().err, (argv, words)
    for argv, words in [
        (["--model", "m:make", "--calib", "ok.npy", "--state-dict", "wrong.pt"],
         "--state-dict wrong.pt: does not fit the model"),
        (["--model", "nosuchmodule:make", "--calib", "ok.npy"], "cannot import module 'nosuchmodule'"),
        (["--model", "m:nosuchfunction", "--calib", "ok.npy"], "has no callable 'nosuchfunction'"),
        (["--model", "m:make", "--calib", "ok5.npy"], "torch cannot calibrate the model on calibration batch 0"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)


@pytest.mark.isa
def test_a_difference_is_named_by_layer_field_index_and_both_values(user_dir, monkeypatch, capsys):
    from crosscheck.model import main

    monkeypatch.chdir(user_dir)
    argv = ["--model", "mymodel:make", "--state-dict", "weights.pt", "--calib", "calib.npy", "--inputs", "inputs.npy"]
    assert main(argv + ["--quiet"], _perturb=("fc2 output codes (evaluation)", 20)) == 1
    out = capsys.readouterr().out
    assert "first divergence at layer fc2 (Linear), field 'fc2 output codes (evaluation)', index (3, 2): torch" \
        in out, out
    assert main(argv + ["--json", "-"], _perturb=("fc1 weight int8 (int_repr)", 5)) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["first_divergence"]["layer"] == "fc1" and doc["first_divergence"]["index"] == [0, 5]
    fc1 = next(e for e in doc["layers"] if e["path"] == "fc1")
    assert fc1["equal"] is False and fc1["first_mismatch"]["field"] == "fc1 weight int8 (int_repr)"
    assert all(e["equal"] for e in doc["layers"] if e["path"] != "fc1") and doc["exit_code"] == 1


@pytest.mark.parametrize("engine", ["qnnpack", "onednn"])
def test_crosscheck_linear_runs_every_static_engine(engine, capsys):
    from crosscheck.linear import main

    assert main(["--engine", engine, "--samples", "300", "--relu", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["environment"]["engine"] == engine and doc["equal"] is True
    assert [e["path"] for e in doc["layers"]] == ["quant", "fc", "dequant"]
    names = [f["name"] for f in doc["fields"]]
    per_tensor = engine == "qnnpack"
    assert ("weight scale (per tensor)" in names) == per_tensor and ("weight scales (per channel)" in names) != \
        per_tensor
    if engine == "onednn":
        assert set(doc["layers"][1]["kernels"]["fc"]) <= {"brgemm", "brgemm_amx", "gemm", "brgemm+pairs",
                                                          "gemm+pairs"}


@pytest.mark.parametrize("kind", ["unsupported", "no_quantstub"])
def test_a_bad_model_exits_2_from_a_fresh_process_too(tmp_path, kind):
    """A fresh process forks its torch worker before importing refquant: the worker reads the float model without
    it (crosscheck.from_torch deferred=True) and this process builds it, so an unsupported module is found by the
    worker and a Linear without a QuantStub by this process: the same one line, exit 2, either way."""
    source, words = BAD_MODELS[kind]
    (tmp_path / f"bad_{kind}.py").write_text(source)
    np.save(tmp_path / "calib.npy", np.ones((3, 4), np.float32))
    proc = subprocess.run([sys.executable, "-m", "crosscheck.model", "--model", f"bad_{kind}:make", "--calib",
                           "calib.npy", "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env_with_repo(),
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "the model cannot be studied" in err[0], err
