"""refquant.export: the exported integer program, reloaded, reproduces the outputs (and torch's)."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch

import refquant.export as ex
from parity import assert_same
from refquant._float32 import fmaf
from refquant.export import FORMAT, LINEAR_FIELDS, GoldenFileError, export_linear, golden_paths, load_golden
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
        p = load_golden(tmp_path / f"layer{suffix}")
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


def test_both_files_give_the_same_typed_dict(tmp_path, rng):
    ql = QuantizedLinear.from_float(rng.normal(0, 1, (3, 5)).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32),
                                    0.1, 4, 0.3, 7, weight_qscheme="per_tensor_affine")
    written = export_linear(ql, rng.integers(0, 256, (2, 5), dtype=np.uint8), tmp_path / "g")
    from_npz, from_json = load_golden(tmp_path / "g.npz"), load_golden(tmp_path / "g.json")
    assert list(from_npz) == list(from_json) == list(LINEAR_FIELDS)
    for name, field in LINEAR_FIELDS.items():
        a, b, w = from_npz[name], from_json[name], written[name]
        assert type(a) is type(b), (name, type(a), type(b))
        if field.is_array:
            assert_same(a, w, f"npz {name}")
            assert_same(b, w, f"json {name}")
        else:
            assert a == b == w, name


def test_docstring_schema_table_is_the_code_table():
    """The schema table in refquant/export.py's docstring lists LINEAR_FIELDS: same names, dtypes and shapes."""
    rows = re.findall(r"^([a-z_0-9]+) +(str|int|bool|int8|uint8|int32|float32) +(\([A-Z, ]+\))?", ex.__doc__, re.M)
    table = {name: (dtype, tuple(d.strip() for d in shape.strip("()").split(",") if d.strip())) for name, dtype, shape
             in rows}
    assert table == {name: (f.dtype, f.shape) for name, f in LINEAR_FIELDS.items()}


# ----------------------------------------------------------------------------------------------------------
# File names and atomic writes


def test_dotted_names_keep_their_tail(tmp_path, rng):
    """"net.fc1" and "net.fc2" are two layers (with_suffix used to turn both into net.npz / net.json, the second
    export overwriting the first)."""
    programs = {}
    for name, n in (("net.fc1", 2), ("net.fc2", 3)):
        ql = QuantizedLinear.from_float(rng.normal(0, 1, (n, 4)).astype(np.float32), None, 0.1, 0, 0.3, 7)
        programs[name] = export_linear(ql, np.ones((1, 4), np.uint8), tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.fc1.json", "net.fc1.npz", "net.fc2.json",
                                                          "net.fc2.npz"]
    for name, program in programs.items():
        for suffix in (".npz", ".json"):
            assert_same(load_golden(tmp_path / f"{name}{suffix}")["weight_int8"], program["weight_int8"], name)
    assert golden_paths(tmp_path / "layer.json") == golden_paths(tmp_path / "layer.npz") == \
        (tmp_path / "layer.npz", tmp_path / "layer.json")
    with pytest.raises(ValueError, match="path must name a file"):
        golden_paths("")


def _layer(rng, n=3, k=4):
    return QuantizedLinear.from_float(rng.normal(0, 1, (n, k)).astype(np.float32), rng.normal(0, 1, n).astype(
        np.float32), 0.1, 3, 0.3, 7)


def test_no_npz_is_left_when_the_json_cannot_be_written(tmp_path, rng):
    (tmp_path / "g.json").mkdir()  # the JSON's name is taken by a directory
    with pytest.raises(IsADirectoryError):
        export_linear(_layer(rng), np.ones((1, 4), np.uint8), tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]


def test_a_failed_rename_of_the_json_removes_the_new_npz(tmp_path, rng, monkeypatch):
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        export_linear(_layer(rng), np.ones((1, 4), np.uint8), tmp_path / "g")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_a_write_that_fails_halfway_leaves_the_old_files_whole(tmp_path, rng, monkeypatch):
    old = export_linear(_layer(rng), np.ones((1, 4), np.uint8), tmp_path / "g")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_written(f, arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ex, "_write_npz", half_written)
    with pytest.raises(OSError, match="Input/output error"):
        export_linear(_layer(rng), np.zeros((1, 4), np.uint8), tmp_path / "g")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file either
    assert_same(load_golden(tmp_path / "g.npz")["x_u8"], old["x_u8"], "old x_u8")


def test_non_finite_floats_are_strict_json_strings(tmp_path, rng):
    """A bias term that overflows float32 (a tiny input scale) is written as "inf", not the non-standard token
    Infinity that strict JSON parsers refuse; the bits carry the value."""
    ql = QuantizedLinear.from_float(rng.normal(0, 1, (2, 3)).astype(np.float32), np.float32([1e7, -1e7]), 1e-30, 0,
                                    1.0, 7)
    written = export_linear(ql, np.ones((1, 3), np.uint8), tmp_path / "g")
    assert np.isinf(written["bias_term"]).all()

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads((tmp_path / "g.json").read_text(), parse_constant=refuse)
    assert doc["bias_term"] == ["inf", "-inf"]
    assert_same(load_golden(tmp_path / "g.json")["bias_term"], written["bias_term"], "bias_term")


def test_version_1_files_are_read(tmp_path, rng):
    """Format 1 differs only in writing non-finite decimals as NaN / Infinity tokens."""
    ql = QuantizedLinear.from_float(rng.normal(0, 1, (2, 3)).astype(np.float32), np.float32([1e7, 2]), 1e-30, 0,
                                    1.0, 7)
    export_linear(ql, np.ones((1, 3), np.uint8), tmp_path / "g")
    doc = json.loads((tmp_path / "g.json").read_text())
    doc["format"] = ex.FORMAT_V1
    doc["bias_term"] = [float("inf"), doc["bias_term"][1]]
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    assert load_golden(tmp_path / "v1.json")["format"] == ex.FORMAT_V1


# ----------------------------------------------------------------------------------------------------------
# Corrupted files: each gives one GoldenFileError (a ValueError) naming the file and, where there is one, the field


@pytest.fixture
def golden(tmp_path, rng):
    """An exported layer: (program, its JSON document, the path of its .npz)."""
    ql = _layer(rng, int(rng.integers(2, 6)), int(rng.integers(2, 9)))
    program = export_linear(ql, rng.integers(0, 256, (int(rng.integers(2, 5)), ql.in_features), dtype=np.uint8),
                            tmp_path / "good")
    return program, json.loads((tmp_path / "good.json").read_text()), tmp_path / "good.npz"


def refused(path, field=None, words=()):
    """load_golden(path) raises GoldenFileError naming the path and the field (and these words)."""
    with pytest.raises(GoldenFileError) as info:
        load_golden(path)
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.field == field, (info.value.field, field, message)
    if field is not None:
        assert repr(field) in message, message
    for word in words:
        assert word in message, (word, message)
    assert isinstance(info.value, ValueError)
    return message


def write_doc(tmp_path, doc, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_json_truncated_anywhere(tmp_path, golden, rng):
    text = (tmp_path / "good.json").read_bytes()
    for cut in sorted(set(rng.integers(0, len(text) - 2, 25).tolist()) | {0, 1, len(text) - 3}):
        path = tmp_path / "cut.json"
        path.write_bytes(text[:cut])
        refused(path, None, ["not valid JSON"])


def test_json_flipped_bytes_never_escape_as_another_error(tmp_path, golden, rng):
    """A flipped byte either breaks the file (GoldenFileError) or lands on a value that is still valid (a digit of
    a code): never a JSONDecodeError, UnicodeDecodeError, KeyError, OverflowError, ..."""
    text = bytearray((tmp_path / "good.json").read_bytes())
    outcomes = {"refused": 0, "still valid": 0}
    for _ in range(150):
        bad = bytearray(text)
        for i in rng.integers(0, len(bad), int(rng.integers(1, 4))):
            bad[i] = int(rng.integers(0, 256))
        path = tmp_path / "flip.json"
        path.write_bytes(bytes(bad))
        try:
            load_golden(path)
            outcomes["still valid"] += 1
        except GoldenFileError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes


def test_json_not_text_not_an_object_not_golden(tmp_path, golden):
    good = (tmp_path / "good.json").read_bytes()
    path = tmp_path / "bad.json"
    path.write_bytes(good[:10] + b"\xff\xfe" + good[10:])
    refused(path, None, ["not UTF-8", "0xff"])
    for text, field, words in [("[1, 2, 3]", None, ["JSON object", "list"]), ('"hello"', None, ["str"]),
                               ("{}", "format", ["missing"]), ('{"format": "pytorch"}', "format", ["pytorch"]),
                               ('{"format": "refquant-golden-linear/3"}', "format", ["linear/3"]),
                               ('{"format": 2}', "format", []), ("[" * 100000 + "]" * 100000, None, [])]:
        path.write_text(text)
        refused(path, field, words)


def test_json_duplicate_keys(tmp_path, golden):
    text = (tmp_path / "good.json").read_text()
    path = tmp_path / "bad.json"
    path.write_text(text.replace('"relu": ', '"relu": true, "relu": ', 1))
    refused(path, "relu", ["twice"])


def test_json_every_missing_field_and_bits(tmp_path, golden):
    _, doc, _ = golden
    for name in doc:
        bad = {k: v for k, v in doc.items() if k != name}
        if name == "format":
            refused(write_doc(tmp_path, bad), "format", ["missing"])
        else:
            refused(write_doc(tmp_path, bad), name, ["missing"])


def test_json_foreign_fields(tmp_path, golden):
    _, doc, _ = golden
    for extra in ("comment", "relu_bits", "x_u8_bits", "weight_int8 "):
        refused(write_doc(tmp_path, {**doc, extra: 1}), extra, ["not a field"])


@pytest.mark.parametrize("name, value, words", [
    ("in_features", "4", ["an integer"]), ("in_features", 4.0, ["an integer"]), ("in_features", True, ["integer"]),
    ("in_features", None, ["integer"]), ("in_features", 0, ["[1,"]), ("in_features", -3, ["[1,"]),
    ("in_features", 10**30, ["[1,"]), ("in_features", float("nan"), ["integer"]), ("in_features", [4], ["integer"]),
    ("relu", 1, ["true or false"]), ("relu", "true", ["true or false"]), ("relu", None, ["true or false"]),
    ("saturate_int16_pairs", 0, ["true or false"]),
    ("bias_mode", "mul", ["none", "mul"]), ("bias_mode", 1, ["string"]), ("weight_qscheme", "per_channel", ["one of"]),
    ("input_zero_point", 256, ["[0, 255]"]), ("input_zero_point", -1, ["[0, 255]"]),
    ("output_zero_point", 3.5, ["integer"]), ("output_zero_point", [7], ["single value"]),
    ("output_zero_point", 1e999, ["integer"]), ("input_zero_point", 10**40, ["[0, 255]"]),
    ("x_u8", "codes", ["list"]), ("x_u8", 5, ["list"]), ("x_u8", [1, 2, 3], ["list"]), ("x_u8", [], ["dimension B"]),
    ("col_offsets", [[1, 2]], ["1-dimensional list", "deeper"]), ("input_zero_point", [[1]], ["single value"]),
])
def test_json_wrong_types_and_values(tmp_path, golden, name, value, words):
    _, doc, _ = golden
    refused(write_doc(tmp_path, {**doc, name: value}), name, words)


def test_json_array_values_out_of_range(tmp_path, golden):
    _, doc, _ = golden
    for name, bad, words in [("x_u8", 256, ["[0, 255]"]), ("x_u8", -1, ["[0, 255]"]), ("y_u8", 300, ["[0, 255]"]),
                             ("weight_int8", 128, ["[-128, 127]"]), ("weight_int8", -129, ["[-128, 127]"]),
                             ("weight_zero_points", 200, ["[-128, 127]"]), ("acc_i32", 2**31, ["2147483647"]),
                             ("raw_i32", -(2**31) - 1, ["-2147483648"]), ("acc_i32", 10**30, ["2147483647"]),
                             ("x_u8", 1.5, ["integers"]), ("x_u8", True, ["integers"]), ("x_u8", "7", ["integers"]),
                             ("x_u8", None, ["integers"])]:
        value = json.loads(json.dumps(doc[name]))
        row = value[0] if isinstance(value[0], list) else value
        row[-1] = bad
        refused(write_doc(tmp_path, {**doc, name: value}), name, words)


def test_json_ragged_and_contradicting_shapes(tmp_path, golden):
    program, doc, _ = golden
    N, K = program["out_features"], program["in_features"]
    w = doc["weight_int8"]
    cases = [("weight_int8", [w[0][:-1]] + w[1:], ["different lengths"]),
             ("weight_int8", w[:-1], ["axis 0 should be"]),
             ("weight_int8", [row + [0] for row in w], ["axis 1 should be"]),
             ("bias", doc["bias"] + [1.0], ["axis 0 should be"]),
             ("x_u8", [row[:-1] for row in doc["x_u8"]], ["axis 1 should be"]),
             ("y_u8", doc["y_u8"][:-1], ["axis 0 should be"])]
    for name, value, words in cases:
        bad = {**doc, name: value}
        if name + "_bits" in doc:
            bad[name + "_bits"] = doc[name + "_bits"] + [int(np.float32(1.0).view(np.uint32))]
        refused(write_doc(tmp_path, bad), name, words)
    refused(write_doc(tmp_path, {**doc, "in_features": K + 1}), "weight_int8", [f"K = {K + 1}"])
    refused(write_doc(tmp_path, {**doc, "out_features": N + 1}), "weight_int8", [f"N = {N + 1}"])


def test_json_decimal_must_agree_with_its_bits(tmp_path, golden):
    program, doc, _ = golden
    m = doc["output_multiplier"]
    nudged = float(np.nextafter(np.float32(m[0]), np.float32(np.inf)))
    for name, value, bits, words in [
        ("output_multiplier", [nudged] + m[1:], None, ["disagrees", "flat index 0"]),
        ("output_multiplier", m, [doc["output_multiplier_bits"][0] ^ 1] + doc["output_multiplier_bits"][1:],
         ["disagrees"]),
        ("input_scale", -doc["input_scale"], None, ["disagrees"]),
        ("input_scale", "nan", None, ["disagrees"]), ("input_scale", "inf", None, ["disagrees"]),
        ("input_scale", "0.02", None, ["disagrees"]), ("input_scale", True, None, ["disagrees"]),
        ("bias_rcp", 1e999, None, ["disagrees"]), ("bias_rcp", 10**50, None, ["disagrees"]),
        ("bias_rcp", 10**500, None, ["disagrees"]),
        ("bias", [-0.0 if v == 0 else -v for v in doc["bias"]], None, ["disagrees"]),
    ]:
        bad = {**doc, name: value}
        if bits is not None:
            bad[name + "_bits"] = bits
        refused(write_doc(tmp_path, bad), name, words)
    for bits, words in [([2**32] + doc["bias_bits"][1:], ["[0, 4294967295]"]), ([-1] + doc["bias_bits"][1:],
                                                                                 ["[0, 4294967295]"]),
                        ([1.5] + doc["bias_bits"][1:], ["unsigned"]), (doc["bias_bits"][:-1], ["shape"])]:
        bad = {**doc, "bias_bits": bits}
        if len(bits) != len(doc["bias"]):
            bad["bias"] = doc["bias"][:-1]  # consistent decimal, bits of a different length than N
            refused(write_doc(tmp_path, bad), "bias", ["axis 0 should be"])
        else:
            refused(write_doc(tmp_path, bad), "bias_bits", words)
    # a shorter decimal that rounds to the same float32 stands for the same value
    ok = {**doc, "input_scale": float(str(np.float32(doc["input_scale"])))}
    assert load_golden(write_doc(tmp_path, ok))["input_scale"] == program["input_scale"]


def test_json_scales_must_be_positive(tmp_path, golden):
    _, doc, _ = golden
    for name, value in [("input_scale", 0.0), ("output_scale", -1.0), ("weight_scales", [0.0] * len(doc["bias"])),
                        ("input_scale", "inf"), ("output_scale", "nan")]:
        f32 = np.float32([float(v) for v in value]) if isinstance(value, list) else np.float32(float(value))
        bits = np.asarray(f32).view(np.uint32).tolist()
        refused(write_doc(tmp_path, {**doc, name: value, name + "_bits": bits}), name, ["finite and > 0"])


# ----------------------------------------------------------------------------------------------------------
# Corrupted .npz files


def npz_with(path, arrays: dict, pickled: bool = False):
    """An .npz holding these arrays (np.savez; object arrays pickled when ``pickled``)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=pickled)
    return path


def good_arrays(npz_path) -> dict:
    with np.load(npz_path) as data:
        return {k: data[k] for k in data.files}


class Trap:
    """Unpickling this creates a file: proof that nothing was unpickled when the file stays absent."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_npz_truncated_and_flipped(tmp_path, golden, rng):
    data = golden[2].read_bytes()
    path = tmp_path / "bad.npz"
    for cut in sorted(set(rng.integers(0, len(data) - 1, 20).tolist()) | {0, 3, 30}):
        path.write_bytes(data[:cut])
        refused(path, None, ["not an .npz archive"])  # the zip's directory is at its end
    outcomes = {"refused": 0, "still valid": 0}
    for _ in range(120):
        bad = bytearray(data)
        for i in rng.integers(0, len(bad), int(rng.integers(1, 4))):
            bad[i] = int(rng.integers(0, 256))
        path.write_bytes(bytes(bad))
        try:
            load_golden(path)
            outcomes["still valid"] += 1
        except GoldenFileError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 60, outcomes


def test_npz_that_is_not_a_golden_archive(tmp_path, golden):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"")
    refused(path, None, ["not an .npz archive"])
    np.save(tmp_path / "one.npy", np.arange(3))
    os.replace(tmp_path / "one.npy", path)
    refused(path, None, ["single .npy"])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "not an array")
    refused(path, "format", ["missing"])
    arrays = good_arrays(golden[2])
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, arr)
        zf.writestr("readme.txt", "a foreign member")
    refused(path, "readme.txt", ["not a field"])
    path.write_text(json.dumps(golden[1]))
    refused(path, None, ["not an .npz archive"])


def test_pickles_are_never_loaded(tmp_path, golden):
    marker = tmp_path / "unpickled"
    path = tmp_path / "bad.npz"
    path.write_bytes(pickle.dumps(Trap(marker)))
    refused(path, None, ["not an .npz archive"])
    arrays = good_arrays(golden[2])
    trap = np.empty(1, object)
    trap[0] = Trap(marker)
    npz_with(path, {**arrays, "bias": trap}, pickled=True)
    refused(path, "bias", ["pickled", "never"])
    npz_with(path, {**arrays, "format": np.array(Trap(marker), object)}, pickled=True)
    refused(path, "format", ["pickled"])
    assert not marker.exists()


@pytest.mark.parametrize("name, value, words", [
    ("x_u8", lambda a: a.astype(np.int64), ["dtype uint8", "int64"]),
    ("weight_int8", lambda a: a.astype(np.int16), ["dtype int8"]),
    ("bias", lambda a: a.astype(np.float64), ["dtype float32"]),
    ("input_scale", lambda a: a.astype(np.float64), ["dtype float32"]),
    ("relu", lambda a: np.array(1), ["bool"]),
    ("relu", lambda a: np.array([True]), ["bool"]),
    ("in_features", lambda a: a.astype(np.float64), ["integer"]),
    ("in_features", lambda a: np.array([a]), ["integer"]),
    ("format", lambda a: np.array(b"refquant-golden-linear/2"), ["string"]),
    ("format", lambda a: np.array("refquant-golden-linear/9"), ["linear/9"]),
    ("bias_mode", lambda a: np.array("sub"), ["one of"]),
    ("input_zero_point", lambda a: np.int32(300), ["[0, 255]"]),
    ("input_zero_point", lambda a: np.array([3], np.int32), ["0 dimension"]),
    ("weight_zero_points", lambda a: np.full_like(a, 200), ["[-128, 127]"]),
    ("weight_scales", lambda a: -a, ["finite and > 0"]),
    ("output_scale", lambda a: np.float32(np.nan), ["finite and > 0"]),
    ("weight_int8", lambda a: a[:, :-1], ["axis 1 should be"]),
    ("y_u8", lambda a: a[:-1], ["axis 0 should be"]),
    ("bias_term", lambda a: a[None], ["1 dimension"]),
    ("out_features", lambda a: np.array(int(a) + 1), ["N = "]),
    ("in_features", lambda a: np.array(0), ["[1,"]),
])
def test_npz_wrong_types_shapes_and_values(tmp_path, golden, name, value, words):
    arrays = good_arrays(golden[2])
    arrays[name] = value(arrays[name])
    path = npz_with(tmp_path / "bad.npz", arrays)
    field = "weight_int8" if name == "out_features" else name
    refused(path, field, words)


def test_npz_missing_and_foreign_members(tmp_path, golden):
    arrays = good_arrays(golden[2])
    for name in arrays:
        if name == "format":
            continue
        refused(npz_with(tmp_path / "bad.npz", {k: v for k, v in arrays.items() if k != name}), name, ["missing"])
    refused(npz_with(tmp_path / "bad.npz", {**arrays, "bias_bits": np.zeros(1, np.uint32)}), "bias_bits",
            ["not a field"])


def test_load_golden_wants_npz_or_json(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.npz or \.json"):
        load_golden(tmp_path / "layer")
    with pytest.raises(FileNotFoundError):
        load_golden(tmp_path / "absent.json")
