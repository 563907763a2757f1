"""A whole converted model as an integer program: steps over numbered tensors, every constant, and test vectors.

What a C or HDL port of a quantized model must compute, end to end, float in and float out:
``QuantStub -> Linear[ReLU] -> Linear -> ... -> DeQuantStub``. :func:`model_program` turns a converted model
(:class:`refquant.pipeline.QuantizedLinearModel` or :class:`refquant.model.QuantizedModel`) and a batch of float32
inputs into a flat dict of named values, the golden file format :data:`MODEL_FORMAT`; ``refquant.export``'s
:func:`~refquant.export.export_model` writes it as ``.npz`` + ``.json`` (+ a C header, :func:`c_header`),
:func:`~refquant.export.load_golden` reads it back checked field by field, :func:`load_program` makes a
:class:`Program` of it, and :func:`run_program` runs that program again with refquant, optionally with another
requantization variant, engine, bias rule or QuantStub rounding (what a mismatch explainer needs).
``c/refquant_program.c`` runs the C header and reproduces every test vector (tests/test_program.py).

The program. Tensors are numbered: tensor 0 is the model input (float32, or uint8 codes for a bare layer), step i
reads the tensors listed in ``step<i>.inputs`` (one, for every kind below) and writes tensor i + 1; ``output``
names the model output. Each tensor is stored whole (``tensor<t>``: float32 values or uint8 codes, shape
``tensor<t>.shape``), computed from the test inputs; linear steps also store their int32 accumulators. The kinds::

    quantize    QuantStub (torch's Quantize): float32 -> uint8 codes with (scale, zero_point), by the rounding named
                in step<i>.rounding, whose formula step<i>.formula spells out; torch 2.13 on x86 is
                "fbgemm_legacy_fma" (refquant.quantize eq. Q1):
                    inverse_scale = f32(1 / f32(scale))
                    q = clamp(cvtps2dq(min(fmaf(x, inverse_scale, f32(zero_point)), 2147483520.0f)), 0, 255)
    linear      a quantized Linear [ReLU] on codes (..., K) -> codes (..., N), refquant.linear eqs. L4, L5:
                    acc[m, n] = Σ_k x[m, k]·weight_int8[n, k]                 int32 (wraps; int16 pairs if
                                                                              saturate_int16_pairs, eq. M2)
                (with saturate_int16_pairs the pairs are (2j, 2j + 1) from k = 0; where pairs_restart_k = r > 0,
                 oneDNN gemm:jit's second K block, refquant.matmul eq. M2b: pairs (2j, 2j + 1) for k < r, then
                 (r + 2j, r + 2j + 1), a lone last k of a block its own pair)
                    raw[m, n] = acc − input_zero_point·col_offsets[n] − weight_zero_points[n]·Σ_k x[m, k]   int32
                then the requantization step<i>.requantization of raw, with its constants (per output channel n):
                    "fbgemm"   eqs. L8-L11: bias_mode none/add/fma, bias_term, bias_rcp, output_multiplier
                               (and act_times_w_scale, eq. L6)
                    "qnnpack"  eqs. QN5, QN6: bias_i32, requantization_scales, output_min, output_max
                               (and requantization_output_scale, the s_y eq. QN4 used)
                    "onednn"   eqs. DN4-DN7: onednn_kernel, compensation, input_scale_onednn, weight_scales_onednn,
                               output_scales, bias, dst_multiplier (and eqs. DN1, DN2: input_scale_reciprocal,
                               weight_scales_reciprocal, output_scale_reciprocal, output_scale_onednn)
                    "fbgemm_fixed_point", "tflite", "tflite_single_rounding", "float_int32_bias"
                               refquant.fixed_point eqs. I3-I7: bias_i32, requant_multiplier_i32, requant_shift
                               (shift_convention "right" or "left"), output_multiplier, quant_min, quant_max, and
                               the rules: bias_rule, multiplier_rule; real_multiplier (what the rule started from)
    relu        nn.ReLU: on codes max(q, zero_point) (eq. F5, domain "codes"); on floats x < 0 ? +0.0 : x
    identity    Dropout (eval), Identity, a DeQuantStub on a float tensor: the input unchanged
    flatten     nn.Flatten(start_dim, end_dim): the same values, reshaped
    dequantize  DeQuantStub: codes -> float32, f32(f32(q − zero_point)·f32(scale)) (eq. D1)

Fields (flat names; ``<i>`` a step, ``<t>`` a tensor; the shapes use N, K of the step). The tables in code are
:data:`HEADER_FIELDS`, :data:`STEP_FIELDS`, :data:`KIND_FIELDS` and :data:`REQUANTIZATION_FIELDS`; both readers and
the writer check every field against the table this file's header selects, then that the steps fit together
(dtypes and shapes of the tensors they connect, engine and requantization, rules and formulas)::

    name                          dtype     shape        meaning
    format                        str                    "refquant-golden-model/2" (/1 still read)
    num_steps                     int                    S >= 1
    output                        int                    the tensor the model returns (0..S)
    tensor0.dtype                 str                    "float32" (a model) or "uint8" (a bare layer's codes)
    tensor<t>.shape               int32     (rank,)      t = 0..S; rank 1..8, every tensor non-empty
    tensor<t>                     float32 | uint8        test vectors: the model input (t = 0), each step's output
    step<i>.kind                  str                    quantize, linear, relu, identity, flatten, dequantize
    step<i>.name                  str                    the call's torch path ("fc1", "block.0.fc#2")
    step<i>.module                str                    the converted module's type (Quantize, ConvertedLinear, ...)
    step<i>.inputs                int32     (1,)         the tensor it reads (< i + 1)
    quantize:   scale float64, zero_point int32, quant_min int32, quant_max int32, rounding str, formula str,
                inverse_scale float32
    dequantize: scale float64, zero_point int32
    relu:       domain str ("codes", "float"), zero_point int32 (0 on floats)
    flatten:    start_dim int, end_dim int
    linear:     in_features int (K), out_features int (N), engine str, requantization str, relu bool,
                saturate_int16_pairs bool, weight_qscheme str, input_scale float64, input_zero_point int32,
                output_scale float64, output_zero_point int32, weight_int8 int8 (N, K), weight_scales float32 (N,),
                weight_scales_f64 float64 (N,) (torch's doubles), weight_zero_points int32 (N,),
                col_offsets int32 (N,), has_bias bool, bias float32 (N,) (zeros without), pairs_restart_k int
                (version 2; 0 or refquant.engines.onednn_gemm_pairs_restart(K)), acc_i32 int32 and raw_i32
                int32 (the output tensor's shape), and the constants of its requantization
                (REQUANTIZATION_FIELDS; per-tensor values repeated for every n)

Per-tensor scales and zero points are repeated N times. Floats: JSON gives every float32 and float64 value also as
``<name>_bits`` (unsigned 32- and 64-bit integers), as the linear format does; the C header holds every float as
its bit pattern (``rqg_<name>_bits``) next to a float view written as a C99 hexadecimal literal.

Re-running (what a mismatch explainer needs): :func:`load_program` gives a :class:`Program` from any golden file;
each linear :class:`ProgramStep` rebuilds its layer from its primary quantities (:meth:`ProgramStep.layer`, with
another requantization or engine if asked); :func:`run_program` runs every step again, chained or step by step,
with another variant, engine, bias rule or QuantStub rounding, and :meth:`ProgramRun.differences` counts what
differs from the file's vectors; :func:`refquant.fixed_point.compare_with_float_path` on a step's layer and
``raw_i32`` names the cause of each differing code.

Versioning: the format string carries the version; a reader refuses formats it does not know
(refquant.export.SCHEMAS). Within one version, fields are only ever added by a new version: version 2 added
``pairs_restart_k`` to linear steps. A version-1 file still loads, its linear steps given the restart their layer
runs (a version-1 ``acc_i32`` always paired from k = 0, so on gemm:jit layers it can differ). The linear formats
("refquant-golden-linear/1", "/2": one fbgemm layer, no stubs) stay readable: :func:`load_program` makes a one-step
program of them.

The C header (:func:`c_header`, ``<path>.h``): one C object per field, named ``rqg_`` + the field's name with dots
as underscores (``rqg_step1_weight_int8``, ``rqg_tensor2``, ``rqg_step1_output_multiplier_bits``), and the table
``rqg_fields[RQG_NUM_FIELDS]`` of them (name, dtype, rank, shape, count, data, bits) that
``c/refquant_program.c`` reads. It is self-contained C99 (``<stdint.h>``, ``<stddef.h>``, ``<math.h>`` for NaN and
infinities in float views).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import fixed_point as fp
from .engines import ENGINES, ENGINE_SPECS, check_requantization, onednn_gemm_pairs_restart
from .export import Field, GoldenFileError, Schema, SCHEMAS, load_golden
from .functional import flatten_shape
from .linear import QuantizedLinear
from .matmul import matmul_u8s8_acc32
from .quantize import PORT_ROUNDINGS, ROUNDINGS, dequantize, quantize_per_tensor, quantize_per_tensor_port

MODEL_FORMAT = "refquant-golden-model/2"
"""The format string (kind "model", version 2) of a program of steps: what refquant writes."""
MODEL_FORMAT_V1 = "refquant-golden-model/1"
"""Version 1, still read: no ``pairs_restart_k`` (its ``acc_i32`` always paired from k = 0)."""

STEP_KINDS: tuple[str, ...] = ("quantize", "linear", "relu", "identity", "flatten", "dequantize")
REQUANTIZATION_NAMES: tuple[str, ...] = ("fbgemm", "qnnpack", "onednn", *fp.VARIANTS)
"""The requantizations a golden linear step can hold: the engines' float paths and the integer variants."""
MAX_RANK = 8

QUANTIZE_FORMULAS: dict[str, str] = {
    "fbgemm_legacy_fma": "inverse_scale = f32(1 / f32(scale)); q = clamp(cvtps2dq(min(fmaf(x, inverse_scale, "
                         "f32(zero_point)), 2147483520.0f)), quant_min, quant_max)",
    "nearbyint_then_add": "inverse_scale = f32(1 / f32(scale)); q = clamp(cvtps2dq(fmin(f32(rint(f32(x * "
                          "inverse_scale)) + f32(zero_point)), 2147483520.0f)), quant_min, quant_max)",
    "multiply_then_add": "inverse_scale = f32(1 / f32(scale)); q = rint(clamp(f32(f32(x * inverse_scale) + "
                         "f32(zero_point)), quant_min, quant_max)); NaN refused",
}
"""The float -> code formula of each QuantStub rounding (refquant.quantize eqs. Q1, Q1c; cvtps2dq: RNE, NaN and
out-of-range -> INT32_MIN; min / fmin: NaN -> 2147483520.0f)."""

INT32 = (-(2**31), 2**31 - 1)

HEADER_FIELDS: dict[str, Field] = {
    "format": Field("str"),
    "num_steps": Field("int", lo=1, hi=2**20),
    "output": Field("int", lo=0, hi=2**20),
    "tensor0.dtype": Field("str", choices=("float32", "uint8")),
}
"""The fields every model program has, before its tensors and steps."""

STEP_FIELDS: dict[str, Field] = {
    "kind": Field("str", choices=STEP_KINDS),
    "name": Field("str"),
    "module": Field("str"),
    "inputs": Field("int32", ("I",), lo=0),
}
"""Every step's fields (``step<i>.`` + name)."""

KIND_FIELDS: dict[str, dict[str, Field]] = {
    "quantize": {
        "scale": Field("float64", positive=True),
        "zero_point": Field("int32", lo=0, hi=255),
        "quant_min": Field("int32", lo=0, hi=0),
        "quant_max": Field("int32", lo=255, hi=255),
        "rounding": Field("str", choices=ROUNDINGS),
        "formula": Field("str", choices=tuple(QUANTIZE_FORMULAS.values())),
        "inverse_scale": Field("float32", positive=True),
    },
    "dequantize": {"scale": Field("float64", positive=True), "zero_point": Field("int32", lo=0, hi=255)},
    "relu": {"domain": Field("str", choices=("codes", "float")), "zero_point": Field("int32", lo=0, hi=255)},
    "identity": {},
    "flatten": {"start_dim": Field("int", lo=-MAX_RANK, hi=MAX_RANK - 1),
                "end_dim": Field("int", lo=-MAX_RANK, hi=MAX_RANK - 1)},
    "linear": {
        "in_features": Field("int", lo=1, hi=INT32[1], dim="K"),
        "out_features": Field("int", lo=1, hi=INT32[1], dim="N"),
        "engine": Field("str", choices=ENGINES),
        "requantization": Field("str", choices=REQUANTIZATION_NAMES),
        "relu": Field("bool"),
        "saturate_int16_pairs": Field("bool"),
        "weight_qscheme": Field("str", choices=("per_channel_symmetric", "per_channel_affine",
                                                "per_tensor_symmetric", "per_tensor_affine")),
        "input_scale": Field("float64", positive=True),
        "input_zero_point": Field("int32", lo=0, hi=255),
        "output_scale": Field("float64", positive=True),
        "output_zero_point": Field("int32", lo=0, hi=255),
        "weight_int8": Field("int8", ("N", "K")),
        "weight_scales": Field("float32", ("N",), positive=True),
        "weight_scales_f64": Field("float64", ("N",), positive=True),
        "weight_zero_points": Field("int32", ("N",), lo=-128, hi=127),
        "col_offsets": Field("int32", ("N",)),
        "has_bias": Field("bool"),
        "bias": Field("float32", ("N",)),
    },
}
"""Each kind's own fields (``step<i>.`` + name). A linear step adds ``acc_i32``, ``raw_i32`` (int32, the shape of
its output tensor), its requantization's fields and, from version 2 on, :data:`LINEAR_FIELDS_V2`."""

LINEAR_FIELDS_V2: dict[str, Field] = {
    "pairs_restart_k": Field("int", lo=0, hi=INT32[1]),
}
"""A linear step's fields added by version 2 (MODEL_FORMAT): ``pairs_restart_k``, the k at which the int16 pairs of
eq. M2 start afresh (eq. M2b, oneDNN's gemm:jit), 0 where they pair from k = 0 only."""

_INTEGER_FIELDS: dict[str, Field] = {
    "bias_rule": Field("str", choices=(*fp.BIAS_RULES, "none")),
    "multiplier_rule": Field("str", choices=tuple(fp.MULTIPLIER_RULE_DEFINITIONS)),
    "shift_convention": Field("str", choices=("right", "left", "none")),
    "bias_i32": Field("int32", ("N",)),
    "requant_multiplier_i32": Field("int32", ("N",), lo=0),
    "requant_shift": Field("int32", ("N",), lo=-31, hi=63),
    "output_multiplier": Field("float32", ("N",)),
    "real_multiplier": Field("float64", ("N",)),
    "quant_min": Field("int32", lo=0, hi=255),
    "quant_max": Field("int32", lo=0, hi=255),
}

REQUANTIZATION_FIELDS: dict[str, dict[str, Field]] = {
    "fbgemm": {
        "bias_mode": Field("str", choices=("none", "add", "fma")),
        "act_times_w_scale": Field("float32", ("N",)),
        "output_multiplier": Field("float32", ("N",)),
        "bias_term": Field("float32", ("N",)),
        "bias_rcp": Field("float32"),
    },
    "qnnpack": {
        "bias_i32": Field("int32", ("N",)),
        "requantization_scales": Field("float32", ("N",), positive=True),
        "requantization_output_scale": Field("float64", positive=True),
        "output_min": Field("int32", lo=0, hi=255),
        "output_max": Field("int32", lo=0, hi=255),
    },
    "onednn": {
        "onednn_kernel": Field("str", choices=("brgemm", "brgemm_amx", "gemm")),
        "compensation": Field("int32", ("N",)),
        "input_scale_reciprocal": Field("float32"),
        "weight_scales_reciprocal": Field("float32", ("N",)),
        "output_scale_reciprocal": Field("float32"),
        "input_scale_onednn": Field("float32"),
        "weight_scales_onednn": Field("float32", ("N",)),
        "output_scale_onednn": Field("float32"),
        "output_scales": Field("float32", ("N",)),
        "dst_multiplier": Field("float32"),
    },
    **{v: {k: f for k, f in _INTEGER_FIELDS.items()
           if v != "float_int32_bias" or k not in ("requant_multiplier_i32", "requant_shift")}
       for v in fp.VARIANTS},
}
"""The constants of each requantization a linear step can hold (``float_int32_bias`` has no fixed-point
multiplier)."""


# ================================================================================================================
# The schema of one file (refquant.export.Schema)
# ================================================================================================================

def _scoped(table: dict[str, Field], prefix: str, i: int) -> dict[str, Field]:
    """``table`` with names prefixed and the dimension names N, K, I made the step's own (N3, K3, I3)."""
    def dim(d):
        return f"{d}{i}" if isinstance(d, str) else d

    return {prefix + name: Field(f.dtype, tuple(dim(d) for d in f.shape), f.lo, f.hi, f.choices, f.positive,
                                 None if f.dim is None else dim(f.dim))
            for name, f in table.items()}


def _model_fields(peek, source: Path, *, version: int = 2) -> dict[str, Field]:
    """The field table of one model program of format ``version``, from its header: steps, tensor shapes and
    dtypes; checks on the way that each step reads a tensor of the dtype and shape it takes and writes the shape it
    should."""
    fields = dict(HEADER_FIELDS)
    S = peek("num_steps", HEADER_FIELDS["num_steps"])
    shapes: list[tuple[int, ...]] = []
    for t in range(S + 1):
        name = f"tensor{t}.shape"
        fields[name] = Field("int32", (f"R{t}",), lo=1)
        shape = tuple(int(d) for d in np.asarray(peek(name, fields[name])).reshape(-1))
        if len(shape) > MAX_RANK:
            raise GoldenFileError(source, name, f"rank {len(shape)} > {MAX_RANK}")
        shapes.append(shape)
    dtypes = [peek("tensor0.dtype", HEADER_FIELDS["tensor0.dtype"])]
    for i in range(S):
        p = f"step{i}."
        step = _scoped(STEP_FIELDS, p, i)
        step[p + "inputs"] = Field("int32", (f"I{i}",), lo=0, hi=i)
        fields.update(step)
        kind = peek(p + "kind", step[p + "kind"])
        inputs = np.asarray(peek(p + "inputs", step[p + "inputs"])).reshape(-1)
        if inputs.size != 1:
            raise GoldenFileError(source, p + "inputs", f"a {kind} step reads one tensor, got {inputs.size}")
        t_in = int(inputs[0])
        in_dtype, in_shape = dtypes[t_in], shapes[t_in]
        own = _scoped(KIND_FIELDS[kind], p, i)
        fields.update(own)

        def need(dtype: str, what: str):
            if in_dtype != dtype:
                raise GoldenFileError(source, p + "inputs", f"a {what} step reads {dtype} values, tensor {t_in} "
                                                            f"holds {in_dtype}")

        if kind == "quantize":
            need("float32", "quantize")
            out_dtype, out_shape = "uint8", in_shape
        elif kind == "dequantize":
            need("uint8", "dequantize")
            out_dtype, out_shape = "float32", in_shape
        elif kind == "relu":
            domain = peek(p + "domain", own[p + "domain"])
            need("uint8" if domain == "codes" else "float32", f"relu (domain {domain!r})")
            out_dtype, out_shape = in_dtype, in_shape
        elif kind == "identity":
            out_dtype, out_shape = in_dtype, in_shape
        elif kind == "flatten":
            start, end = peek(p + "start_dim", own[p + "start_dim"]), peek(p + "end_dim", own[p + "end_dim"])
            try:
                out_shape = flatten_shape(in_shape, start, end)
            except (IndexError, ValueError) as e:
                raise GoldenFileError(source, p + "start_dim", f"does not fit tensor {t_in} of shape {in_shape}: "
                                                               f"{e}") from None
            out_dtype = in_dtype
        else:  # linear
            need("uint8", "linear")
            K = peek(p + "in_features", own[p + "in_features"])
            N = peek(p + "out_features", own[p + "out_features"])
            if in_shape[-1] != K:
                raise GoldenFileError(source, p + "in_features", f"is {K}, but its input tensor {t_in} has shape "
                                                                 f"{in_shape}")
            requantization = peek(p + "requantization", own[p + "requantization"])
            fields.update(_scoped(REQUANTIZATION_FIELDS[requantization], p, i))
            if version >= 2:
                fields.update(_scoped(LINEAR_FIELDS_V2, p, i))
            out_dtype, out_shape = "uint8", in_shape[:-1] + (N,)
            fields[p + "acc_i32"] = Field("int32", out_shape)
            fields[p + "raw_i32"] = Field("int32", out_shape)
        if shapes[i + 1] != tuple(out_shape):
            raise GoldenFileError(source, f"tensor{i + 1}.shape", f"is {shapes[i + 1]}, but step {i} ({kind}) "
                                                                  f"writes shape {tuple(out_shape)}")
        dtypes.append(out_dtype)
    output = peek("output", HEADER_FIELDS["output"])
    if output > S:
        raise GoldenFileError(source, "output", f"must name a tensor 0..{S}, got {output}")
    for t in range(S + 1):
        fields[f"tensor{t}"] = Field(dtypes[t], shapes[t])
    return fields


def _validate(values: dict[str, object], source: Path) -> None:
    """What no single field says: engine and requantization, qscheme and zero points, rules and formulas."""
    for i in range(values["num_steps"]):
        p = f"step{i}."
        kind = values[p + "kind"]
        if kind == "quantize":
            if values[p + "formula"] != QUANTIZE_FORMULAS[values[p + "rounding"]]:
                raise GoldenFileError(source, p + "formula", f"is not the formula of rounding "
                                                             f"{values[p + 'rounding']!r}")
            if not values[p + "quant_min"] <= values[p + "zero_point"] <= values[p + "quant_max"]:
                raise GoldenFileError(source, p + "zero_point", "outside [quant_min, quant_max]")
        if kind != "linear":
            continue
        engine, name = values[p + "engine"], values[p + "requantization"]
        try:
            check_requantization(name, engine)
        except ValueError as e:
            raise GoldenFileError(source, p + "requantization", str(e)) from None
        if p + "pairs_restart_k" in values:
            _check_pairs_restart(values, p, source)
        qscheme = values[p + "weight_qscheme"]
        zps, scales = values[p + "weight_zero_points"], values[p + "weight_scales_f64"]
        if qscheme.endswith("symmetric") and (zps != 0).any():
            raise GoldenFileError(source, p + "weight_zero_points", f"must be 0 for {qscheme}")
        if qscheme.startswith("per_tensor") and ((zps != zps[0]).any() or (scales != scales[0]).any()):
            raise GoldenFileError(source, p + "weight_scales_f64", f"{qscheme}: one scale and zero point, "
                                                                   f"repeated for every output")
        if (values[p + "weight_scales"] != scales.astype(np.float32)).any():
            raise GoldenFileError(source, p + "weight_scales", "must be weight_scales_f64 rounded to float32")
        if not values[p + "has_bias"] and (values[p + "bias"] != 0).any():
            raise GoldenFileError(source, p + "bias", "must be zeros when has_bias is false")
        if name == "fbgemm":
            mode = "none" if not values[p + "has_bias"] else "add" if qscheme.startswith("per_channel") else "fma"
            if values[p + "bias_mode"] != mode:
                raise GoldenFileError(source, p + "bias_mode", f"must be {mode!r} for {qscheme} with has_bias = "
                                                               f"{values[p + 'has_bias']}")
        elif name in fp.VARIANTS:
            rule = values[p + "bias_rule"]
            if (rule == "none") == values[p + "has_bias"]:
                raise GoldenFileError(source, p + "bias_rule", f"is {rule!r} with has_bias = "
                                                               f"{values[p + 'has_bias']}")
            if values[p + "multiplier_rule"] != fp.MULTIPLIER_RULE[name]:
                raise GoldenFileError(source, p + "multiplier_rule", f"{name!r} uses {fp.MULTIPLIER_RULE[name]!r}")
            if values[p + "shift_convention"] != (fp.SHIFT_CONVENTION[name] or "none"):
                raise GoldenFileError(source, p + "shift_convention", f"{name!r} uses "
                                                                      f"{fp.SHIFT_CONVENTION[name] or 'none'!r}")


def _pairs_restart_k(engine: str, onednn_kernel: str | None, saturate_int16_pairs: bool, K: int) -> int:
    """The ``pairs_restart_k`` of a linear step: oneDNN gemm:jit's restart (eq. M2b) on a layer that sums int16
    pairs, else 0 -- what QuantizedLinear.pairs_restart_k gives for that engine, kernel and K."""
    gemm = engine == "onednn" and onednn_kernel == "gemm" and saturate_int16_pairs
    return (onednn_gemm_pairs_restart(K) or 0) if gemm else 0


def _check_pairs_restart(values: dict[str, object], p: str, source: Path) -> None:
    """``pairs_restart_k`` is 0, or oneDNN gemm:jit's restart (eq. M2b) on a layer that sums int16 pairs -- and
    exactly that restart where the step's own onednn_kernel says "gemm"."""
    k, K = values[p + "pairs_restart_k"], values[p + "in_features"]
    restart = onednn_gemm_pairs_restart(K) or 0
    if values[p + "engine"] != "onednn" or not values[p + "saturate_int16_pairs"]:
        if k != 0:
            raise GoldenFileError(source, p + "pairs_restart_k", f"must be 0: only oneDNN's gemm:jit kernel with "
                                                                 f"saturate_int16_pairs restarts its pairs, got {k}")
    elif values.get(p + "onednn_kernel") is not None:
        expected = _pairs_restart_k("onednn", values[p + "onednn_kernel"], True, K)
        if k != expected:
            raise GoldenFileError(source, p + "pairs_restart_k", f"must be {expected} for onednn_kernel "
                                                                 f"{values[p + 'onednn_kernel']!r} and K = {K}, "
                                                                 f"got {k}")
    elif k not in (0, restart):
        raise GoldenFileError(source, p + "pairs_restart_k", f"must be 0 or {restart} (gemm:jit, K = {K}), got {k}")


SCHEMAS[MODEL_FORMAT] = Schema(_model_fields, _validate)
SCHEMAS[MODEL_FORMAT_V1] = Schema(functools.partial(_model_fields, version=1), _validate)


# ================================================================================================================
# The program as objects
# ================================================================================================================

@dataclass
class ProgramStep:
    """One step: ``kind``, the torch call ``name`` and ``module`` type, the tensor it reads (``input``) and writes
    (``output`` = index + 1), its ``constants`` (its fields without the ``step<i>.`` prefix, test vectors aside)
    and, for a linear step, the int32 ``acc_i32`` and ``raw_i32`` of the test vectors."""

    index: int
    kind: str
    name: str
    module: str
    input: int
    constants: dict[str, Any]
    acc_i32: np.ndarray | None = None
    raw_i32: np.ndarray | None = None
    _layer: Any = field(default=None, repr=False, compare=False)  # the live layer of an export (no rebuild)

    @property
    def output(self) -> int:
        return self.index + 1

    def layer(self, *, requantization: str | None = None, engine: str | None = None,
              saturate_int16_pairs: bool | None = None, onednn_kernel: str | None = None) -> QuantizedLinear:
        """A linear step's layer, rebuilt from its primary quantities (int8 weights, float64 scales, zero points,
        float32 bias, output qparams, engine and its switches) -- not from its derived constants.

        ``requantization``: None keeps the file's (if ``engine`` changes and the file's is the old engine's float
        path, the new engine's float path); ``engine``, ``saturate_int16_pairs``, ``onednn_kernel``: None keeps the
        file's."""
        if self.kind != "linear":
            raise ValueError(f"step {self.index} ({self.name!r}) is a {self.kind} step, not a linear one")
        c = self.constants
        old_engine = c["engine"]
        engine = old_engine if engine is None else engine
        if requantization is None:
            requantization = c["requantization"]
            if engine != old_engine and requantization == ENGINE_SPECS[old_engine].requantization:
                requantization = None
        per_channel = c["weight_qscheme"].startswith("per_channel")
        scales = c["weight_scales_f64"] if per_channel else c["weight_scales_f64"][:1]
        zps = c["weight_zero_points"] if per_channel else c["weight_zero_points"][:1]
        cached = c.get("requantization_output_scale")
        if onednn_kernel is None:  # an integer variant's step has no onednn_kernel: a restart says gemm:jit ran
            onednn_kernel = c.get("onednn_kernel", "gemm" if c.get("pairs_restart_k") else "brgemm")
        return QuantizedLinear(
            c["weight_int8"], scales, zps, c["bias"] if c["has_bias"] else None, float(c["input_scale"]),
            int(c["input_zero_point"]), float(c["output_scale"]), int(c["output_zero_point"]), relu=c["relu"],
            weight_qscheme=c["weight_qscheme"],
            saturate_int16_pairs=c["saturate_int16_pairs"] if saturate_int16_pairs is None else saturate_int16_pairs,
            engine=engine, requantization=requantization,
            onednn_kernel=onednn_kernel if engine == "onednn" else "brgemm",
            qnnpack_cached_output_scale=(float(cached) if engine == "qnnpack" and cached is not None
                                         and float(cached) != float(c["output_scale"]) else None))


@dataclass
class Program:
    """A golden program: its ``steps`` in order, every tensor's test vectors (``tensors[t]``; tensors[0] is the
    input), the tensor the model returns (``output``), and the file's ``format`` and ``source`` (None when built
    in memory)."""

    format: str
    steps: list[ProgramStep]
    tensors: list[np.ndarray]
    output: int
    source: Path | None = None

    def fields(self) -> dict[str, object]:
        """The flat dict of :data:`MODEL_FORMAT` fields of this program (what refquant.export.write_golden
        writes)."""
        values: dict[str, object] = {"format": MODEL_FORMAT, "num_steps": len(self.steps), "output": self.output,
                                     "tensor0.dtype": str(self.tensors[0].dtype)}
        for t, x in enumerate(self.tensors):
            values[f"tensor{t}.shape"] = np.array(x.shape, np.int32)
        for s in self.steps:
            p = f"step{s.index}."
            values.update({p + "kind": s.kind, p + "name": s.name, p + "module": s.module,
                           p + "inputs": np.array([s.input], np.int32)})
            values.update({p + k: v for k, v in s.constants.items()})
            if s.kind == "linear":
                values[p + "acc_i32"], values[p + "raw_i32"] = s.acc_i32, s.raw_i32
        for t, x in enumerate(self.tensors):
            values[f"tensor{t}"] = x
        return values

    def __repr__(self) -> str:
        steps = ", ".join(f"{s.kind}({s.name!r})" for s in self.steps)
        return f"Program({steps}; {len(self.tensors)} tensors, source={self.source})"


def program_from_fields(values: dict[str, object], source: Path | None = None) -> Program:
    """A :class:`Program` from the checked fields of any golden format (refquant.export.load_golden's dict):
    :data:`MODEL_FORMAT` (or :data:`MODEL_FORMAT_V1`), or a linear format ("refquant-golden-linear/1", "/2"), which
    becomes one linear step on the input codes x_u8 (engine fbgemm, requantization "fbgemm"; its float32 scales
    taken as the doubles)."""
    fmt = values["format"]
    if fmt not in (MODEL_FORMAT, MODEL_FORMAT_V1):
        return _program_from_linear(values, source)
    steps = []
    for i in range(values["num_steps"]):
        p = f"step{i}."
        own = {k[len(p):]: v for k, v in values.items() if k.startswith(p)}
        kind = own.pop("kind")
        name, module, inputs = own.pop("name"), own.pop("module"), own.pop("inputs")
        acc, raw = own.pop("acc_i32", None), own.pop("raw_i32", None)
        if kind == "linear" and fmt == MODEL_FORMAT_V1:  # version 1 had no pairs_restart_k: what its layer ran
            own["pairs_restart_k"] = _pairs_restart_k(own["engine"], own.get("onednn_kernel"),
                                                      own["saturate_int16_pairs"], own["in_features"])
        steps.append(ProgramStep(i, kind, name, module, int(inputs[0]), own, acc, raw))
    tensors = [values[f"tensor{t}"] for t in range(values["num_steps"] + 1)]
    return Program(fmt, steps, tensors, values["output"], source)


def _program_from_linear(v: dict[str, object], source: Path | None) -> Program:
    f64 = np.float64
    c = {"in_features": v["in_features"], "out_features": v["out_features"], "engine": "fbgemm",
         "requantization": "fbgemm", "relu": v["relu"], "saturate_int16_pairs": v["saturate_int16_pairs"],
         "weight_qscheme": v["weight_qscheme"], "input_scale": f64(v["input_scale"]),
         "input_zero_point": v["input_zero_point"], "output_scale": f64(v["output_scale"]),
         "output_zero_point": v["output_zero_point"], "weight_int8": v["weight_int8"],
         "weight_scales": v["weight_scales"], "weight_scales_f64": v["weight_scales"].astype(np.float64),
         "weight_zero_points": v["weight_zero_points"], "col_offsets": v["col_offsets"],
         "has_bias": v["bias_mode"] != "none", "bias": v["bias"], "bias_mode": v["bias_mode"],
         "act_times_w_scale": v["act_times_w_scale"], "output_multiplier": v["output_multiplier"],
         "bias_term": v["bias_term"], "bias_rcp": v["bias_rcp"], "pairs_restart_k": 0}  # fbgemm: eq. M2's pairs
    step = ProgramStep(0, "linear", "linear", "QuantizedLinear", 0, c, v["acc_i32"], v["raw_i32"])
    return Program(v["format"], [step], [v["x_u8"], v["y_u8"]], 1, source)


def load_program(path: str | Path) -> Program:
    """Read a golden file (``.npz`` or ``.json``, any format refquant writes) with
    :func:`refquant.export.load_golden` -- every field checked, one GoldenFileError naming file and field -- and
    make a :class:`Program` of it."""
    return program_from_fields(load_golden(path), Path(path))


# ================================================================================================================
# Building a program from a model, and running one
# ================================================================================================================

def _linear_constants(ql: QuantizedLinear) -> dict[str, Any]:
    """Every constant of a layer's program (its step's fields without the prefix), from the live layer."""
    N = ql.out_features

    def per_n(a, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype), (N,)))

    bias = np.zeros(N, np.float32) if ql.bias is None else ql.bias.astype(np.float32)
    c: dict[str, Any] = {
        "in_features": int(ql.in_features), "out_features": int(N), "engine": ql.engine,
        "requantization": ql.requantization, "relu": bool(ql.relu), "saturate_int16_pairs": ql.saturate_int16_pairs,
        "weight_qscheme": ql.weight_qscheme, "input_scale": np.float64(ql.input_scale),
        "input_zero_point": np.int32(ql.input_zero_point), "output_scale": np.float64(ql.output_scale),
        "output_zero_point": np.int32(ql.output_zero_point), "weight_int8": ql.weight_int8,
        "weight_scales": per_n(ql.weight_scales, np.float32), "weight_scales_f64": per_n(ql.weight_scales_f64,
                                                                                         np.float64),
        "weight_zero_points": per_n(ql.weight_zero_points, np.int32), "col_offsets": ql.col_offsets.astype(np.int32),
        "has_bias": ql.bias is not None, "bias": bias, "pairs_restart_k": ql.pairs_restart_k or 0,
    }
    rq, name = ql.requantizer, ql.requantization
    if name == "fbgemm":
        c.update(bias_mode=("none", "add", "fma")[rq.bias_mode], act_times_w_scale=per_n(rq.act_times_w_scale,
                                                                                           np.float32),
                 output_multiplier=per_n(rq.output_multiplier, np.float32), bias_term=rq.bias_term.astype(np.float32),
                 bias_rcp=np.float32(rq.bias_rcp))
    elif name == "qnnpack":
        c.update(bias_i32=rq.bias_i32.astype(np.int32), requantization_scales=rq.requantization_scales,
                 requantization_output_scale=np.float64(rq.requantization_output_scale),
                 output_min=np.int32(rq.output_min), output_max=np.int32(rq.output_max))
    elif name == "onednn":
        c.update(onednn_kernel=rq.kernel, compensation=rq.compensation.astype(np.int32),
                 input_scale_reciprocal=np.float32(rq.input_scale_reciprocal),
                 weight_scales_reciprocal=per_n(rq.weight_scales_reciprocal, np.float32),
                 output_scale_reciprocal=np.float32(rq.output_scale_reciprocal),
                 input_scale_onednn=np.float32(rq.input_scale_onednn),
                 weight_scales_onednn=per_n(rq.weight_scales_onednn, np.float32),
                 output_scale_onednn=np.float32(rq.output_scale_onednn),
                 output_scales=per_n(rq.output_scales, np.float32), dst_multiplier=np.float32(rq.dst_multiplier))
    elif name in fp.VARIANTS:
        c.update(bias_rule=rq.bias_rule or "none", multiplier_rule=rq.multiplier_rule,
                 shift_convention=rq.shift_convention or "none", bias_i32=rq.bias_i32,
                 output_multiplier=rq.output_multiplier,
                 real_multiplier=rq.real_multiplier, quant_min=np.int32(rq.quant_min),
                 quant_max=np.int32(rq.quant_max))
        if name != "float_int32_bias":
            c.update(requant_multiplier_i32=rq.requant_multiplier_i32, requant_shift=rq.requant_shift)
    else:
        raise ValueError(f"requantization {name!r} has no golden-file form (supported: {REQUANTIZATION_NAMES})")
    return c


def _quantize_constants(scale: float, zero_point: int, rounding: str = "fbgemm_legacy_fma") -> dict[str, Any]:
    with np.errstate(over="ignore"):
        inverse = np.float32(1) / np.float32(scale)  # eq. Q0
    return {"scale": np.float64(scale), "zero_point": np.int32(zero_point), "quant_min": np.int32(0),
            "quant_max": np.int32(255), "rounding": rounding, "formula": QUANTIZE_FORMULAS[rounding],
            "inverse_scale": inverse}


def _step_of(index: int, kind: str, name: str, module: str, t_in: int, constants: dict, layer=None) -> ProgramStep:
    return ProgramStep(index, kind, name, module, t_in, constants, _layer=layer)


def _rebuild(ql: QuantizedLinear, *, engine: str | None = None, requantization: str | None = None,
             keep: bool = True) -> QuantizedLinear:
    """``ql`` on another engine and/or with another requantization (``keep``: the requantization unchanged)."""
    engine = ql.engine if engine is None else engine
    if keep and requantization is None and engine == ql.engine:
        return ql
    if keep and requantization is None:
        requantization = None if ql.requantization == ENGINE_SPECS[ql.engine].requantization else ql.requantization
    scales = ql.weight_scales_f64 if ql.per_channel else ql.weight_scales_f64[:1]
    zps = ql.weight_zero_points if ql.per_channel else ql.weight_zero_points[:1]
    return QuantizedLinear(ql.weight_int8, scales, zps, ql.bias, ql.input_scale, ql.input_zero_point,
                           ql.output_scale, ql.output_zero_point, relu=ql.relu, weight_qscheme=ql.weight_qscheme,
                           saturate_int16_pairs=ql.saturate_int16_pairs, engine=engine,
                           requantization=requantization,
                           onednn_kernel=ql.engine_options.onednn_kernel if engine == "onednn" else "brgemm",
                           qnnpack_cached_output_scale=ql.engine_options.qnnpack_cached_output_scale
                           if engine == "qnnpack" else None)


def _linear_step(index: int, name: str, module: str, t_in: int, ql: QuantizedLinear,
                 requantization: str | None) -> ProgramStep:
    if requantization is not None:
        try:
            ql = ql.with_requantization(requantization)
        except ValueError as e:
            raise ValueError(f"step {index} ({name!r}): {e}") from None
    return _step_of(index, "linear", name, module, t_in, _linear_constants(ql), ql)


def _model_steps(model: object, requantization: str | None) -> tuple[list[ProgramStep], int]:
    """The steps of a model (and the index of the tensor it returns)."""
    from .model import (ConvertedLinear, DeQuantize, Dropout, Flatten, Identity, QFunctional, QuantizedModel,
                        Quantize, ReLU)
    from .pipeline import QuantizedLinearModel

    if isinstance(model, QuantizedLinearModel):
        return [_step_of(0, "quantize", "quant", "Quantize", 0,
                         _quantize_constants(float(model.input_scale), model.input_zero_point)),
                _linear_step(1, "linear", "QuantizedLinear", 1, model.linear, requantization),
                _step_of(2, "dequantize", "dequant", "DeQuantize", 2,
                         {"scale": np.float64(model.output_scale), "zero_point": np.int32(model.output_zero_point)})], 3
    if isinstance(model, QuantizedLinear):
        return [_linear_step(0, "linear", "QuantizedLinear", 0, model, requantization)], 1
    if not isinstance(model, QuantizedModel):
        raise TypeError(f"model must be a refquant.pipeline.QuantizedLinearModel or refquant.model.QuantizedModel, "
                        f"got {type(model).__name__}")
    if len(model.graph.inputs) != 1:
        raise ValueError(f"{MODEL_FORMAT} programs take one input tensor; this model takes {model.graph.inputs}")
    tensor_of = {model.graph.inputs[0]: 0}
    steps: list[ProgramStep] = []
    for step in model.steps:
        i, call, op = len(steps), step.call, step.op
        mod = model.modules[call.module]
        module = type(mod).__name__
        if isinstance(mod, QFunctional):
            raise ValueError(f"{step.name} ({module}.{call.method}): {MODEL_FORMAT} has no {call.method!r} step; it "
                             f"holds chains of quantize, linear, relu, identity (Dropout, Identity), flatten and "
                             f"dequantize steps")
        t_in = tensor_of[call.inputs[0]]
        qp = step.input_qparams[0]
        if isinstance(mod, Quantize):
            s = _step_of(i, "quantize", step.name, module, t_in, _quantize_constants(mod.scale, mod.zero_point))
        elif isinstance(mod, DeQuantize):
            s = (_step_of(i, "identity", step.name, module, t_in, {}) if qp is None else
                 _step_of(i, "dequantize", step.name, module, t_in,
                          {"scale": np.float64(qp[0]), "zero_point": np.int32(qp[1])}))
        elif isinstance(mod, ConvertedLinear):
            ql = _rebuild(op, engine=model.engine)
            s = _linear_step(i, step.name, module, t_in, ql, requantization)
        elif isinstance(mod, ReLU):
            s = _step_of(i, "relu", step.name, module, t_in,
                         {"domain": "float", "zero_point": np.int32(0)} if qp is None else
                         {"domain": "codes", "zero_point": np.int32(qp[1])})
        elif isinstance(mod, Flatten):
            s = _step_of(i, "flatten", step.name, module, t_in,
                         {"start_dim": int(mod.start_dim), "end_dim": int(mod.end_dim)})
        elif isinstance(mod, (Dropout, Identity)):
            s = _step_of(i, "identity", step.name, module, t_in, {})
        else:  # pragma: no cover -- QuantizedModel accepts nothing else
            raise ValueError(f"{step.name} ({module}): no step of {MODEL_FORMAT} for it")
        steps.append(s)
        tensor_of[call.output] = i + 1
    return steps, tensor_of[model.graph.output]


def _run_step(step: ProgramStep, x: np.ndarray, layer: QuantizedLinear | None, *, rounding: str | None = None,
              requantizer=None, negate_input_zero_point: bool = False, pairs_from_k0: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One step on its input values: (output, acc_i32, raw_i32) -- the last two only for a linear step."""
    c = step.constants
    if step.kind == "quantize":
        if rounding in PORT_ROUNDINGS:  # another implementation's rounding (refquant.explain)
            return quantize_per_tensor_port(x, float(c["scale"]), int(c["zero_point"]), "quint8", rounding), None, None
        return quantize_per_tensor(x, float(c["scale"]), int(c["zero_point"]), "quint8",
                                   rounding=c["rounding"] if rounding is None else rounding), None, None
    if step.kind == "dequantize":
        return dequantize(x, float(c["scale"]), int(c["zero_point"])), None, None
    if step.kind == "relu":
        if c["domain"] == "codes":
            return np.maximum(x, np.uint8(c["zero_point"])), None, None  # eq. F5
        return np.where(x < 0, np.float32(0), x).astype(np.float32), None, None  # torch's float relu
    if step.kind == "identity":
        return x, None, None
    if step.kind == "flatten":
        return x.reshape(flatten_shape(x.shape, c["start_dim"], c["end_dim"])), None, None
    acc = layer.products(x)  # eq. L4 (M2, M2b: the CPU kernel's pairs)
    raw = layer.accumulate(x)
    if pairs_from_k0 and layer.pairs_restart_k is not None:  # a port that ignores eq. M2b: eq. M2's pairs from k = 0
        x2d = np.ascontiguousarray(x.reshape(-1, layer.in_features))
        plain = matmul_u8s8_acc32(x2d, layer.weight_int8, saturate_int16_pairs=True).reshape(acc.shape)
        raw = (raw.astype(np.int64) + plain.astype(np.int64) - acc.astype(np.int64)).astype(np.int32)  # int32 wrap
        acc = plain
    if negate_input_zero_point:  # a port's sign slip: acc + z_x·col_offsets, i.e. raw + 2·z_x·col_offsets (int32)
        raw = (raw.astype(np.int64) + 2 * int(layer.input_zero_point) * layer.col_offsets.astype(np.int64)
               ).astype(np.int32)  # astype keeps the low 32 bits: int32's wrap
    y = layer.requantize(raw) if requantizer is None else requantizer.requantize(raw)
    return y, acc, raw


def _check_x(x: object, argname: str, dtype) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != dtype:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{argname} must be a {np.dtype(dtype).name} NumPy array of test inputs, got {got}")
    if x.ndim < 1 or x.size == 0 or x.ndim > MAX_RANK:
        raise ValueError(f"{argname} must be a non-empty array of rank 1..{MAX_RANK}, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _assemble(steps: list[ProgramStep], x: np.ndarray, output: int) -> dict[str, object]:
    tensors = [x]
    for s in steps:
        y, acc, raw = _run_step(s, tensors[s.input], s._layer)
        s.acc_i32, s.raw_i32 = acc, raw
        tensors.append(np.ascontiguousarray(y))
    program = Program(MODEL_FORMAT, steps, tensors, output)
    return program.fields()


def model_program(model: object, x_f32: np.ndarray, *, requantization: str | None = None) -> dict[str, object]:
    """The :data:`MODEL_FORMAT` fields of a converted model and its test vectors for the float32 inputs ``x_f32``.

    ``model``: a :class:`refquant.pipeline.QuantizedLinearModel` (quantize -> linear -> dequantize) or a
    :class:`refquant.model.QuantizedModel` whose forward is a chain (or tree) of one-input calls: QuantStub,
    Linear / LinearReLU, ReLU, Dropout, Identity, Flatten, DeQuantStub. add, add_relu, mul and cat (QFunctional)
    are refused with a ValueError naming the call. ``requantization``: None (each Linear's own), or one scheme for
    every Linear (e.g. "tflite"; refquant.linear.QuantizedLinear.with_requantization). The test vectors are
    computed by refquant's modules (quantize_per_tensor, QuantizedLinear, functional.relu, dequantize): what the
    model computes, tensor by tensor (tests/test_program.py compares them with the model's own forward).
    """
    if isinstance(model, QuantizedLinear):
        raise TypeError("model is a QuantizedLinear (codes in, codes out): use linear_program(ql, x_u8) or "
                        "refquant.export.export_linear")
    x = _check_x(x_f32, "x_f32", np.float32)
    steps, output = _model_steps(model, requantization)
    return _assemble(steps, x, output)


def linear_program(ql: QuantizedLinear, x_u8: np.ndarray) -> dict[str, object]:
    """The :data:`MODEL_FORMAT` fields of one layer (any engine and requantization) as a one-step program on the
    uint8 input codes ``x_u8`` (..., K): tensor 0 the codes, tensor 1 the output codes."""
    if not isinstance(ql, QuantizedLinear):
        raise TypeError(f"ql must be a refquant.linear.QuantizedLinear, got {type(ql).__name__}")
    x = _check_x(x_u8, "x_u8", np.uint8)
    if x.shape[-1] != ql.in_features:
        raise ValueError(f"x_u8 must have last dimension K = {ql.in_features}, got shape {x.shape}")
    steps, output = _model_steps(ql, None)
    return _assemble(steps, x, output)


@dataclass(frozen=True)
class Difference:
    """How many values of one output of a run differ from the program's test vectors (floats by their bits)."""

    step: int
    what: str  # "tensor", "acc_i32", "raw_i32"
    tensor: int | None
    kind: str  # "codes", "float_bits", "int32"
    differing: int
    size: int
    first_index: tuple[int, ...] | None


@dataclass
class ProgramRun:
    """What :func:`run_program` computed: every tensor, each linear step's acc_i32 / raw_i32 and layer."""

    program: Program
    chained: bool
    tensors: list[np.ndarray]
    acc_i32: dict[int, np.ndarray] = field(default_factory=dict)
    raw_i32: dict[int, np.ndarray] = field(default_factory=dict)
    layers: dict[int, QuantizedLinear] = field(default_factory=dict)

    def differences(self) -> list[Difference]:
        """Every step's output, accumulators and int32 raw against the program's (one entry each)."""
        out = []

        def compare(step, what, t, a, b):
            bits = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
            kind = "float_bits" if a.dtype.kind == "f" else "codes" if a.dtype == np.uint8 else "int32"
            if a.shape != b.shape or a.dtype != b.dtype:
                out.append(Difference(step, what, t, kind, int(max(a.size, b.size)), int(b.size), None))
                return
            av, bv = (a.view(bits[a.dtype]), b.view(bits[b.dtype])) if a.dtype.kind == "f" else (a, b)
            d = av != bv
            first = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(d)[0]), d.shape)) if d.any() else None
            out.append(Difference(step, what, t, kind, int(d.sum()), int(d.size), first))

        for s in self.program.steps:
            compare(s.index, "tensor", s.output, self.tensors[s.output], self.program.tensors[s.output])
            if s.kind == "linear":
                compare(s.index, "acc_i32", None, self.acc_i32[s.index], s.acc_i32)
                compare(s.index, "raw_i32", None, self.raw_i32[s.index], s.raw_i32)
        return out

    @property
    def differing(self) -> int:
        """Total differing values (codes, float bits, int32) over every step."""
        return sum(d.differing for d in self.differences())

    def constant_differences(self) -> dict[int, list[str]]:
        """For each linear step, the constants the rebuilt layer computes differently from the file's (names of
        fields present in both with the same shape; differing values), e.g. to find a hand-edited or foreign
        constant."""
        out: dict[int, list[str]] = {}
        for i, layer in self.layers.items():
            mine = _linear_constants(layer)
            theirs = self.program.steps[i].constants
            bad = []
            for k, v in mine.items():
                if k not in theirs:
                    continue
                a, b = np.asarray(v), np.asarray(theirs[k])
                if a.shape != b.shape or a.dtype != b.dtype:
                    bad.append(k)
                elif a.dtype.kind == "f":
                    if (a.view(np.uint64 if a.itemsize == 8 else np.uint32)
                            != b.view(np.uint64 if b.itemsize == 8 else np.uint32)).any():
                        bad.append(k)
                elif (a != b).any():
                    bad.append(k)
            if bad:
                out[i] = bad
        return out


def run_program(program: Program, *, requantization: str | None = None, engine: str | None = None,
                bias_rule: str | None = None, rounding: str | None = None,
                saturate_int16_pairs: bool | None = None, onednn_kernel: str | None = None,
                negate_input_zero_point: bool = False, pairs_from_k0: bool = False,
                chained: bool = True) -> ProgramRun:
    """Run a program again with refquant: every step, from its primary quantities (weights, scales, zero points,
    bias: :meth:`ProgramStep.layer`), optionally with another requantization, engine or bias rule for every linear
    step and another QuantStub rounding.

    Args:
        requantization: None keeps each step's; a name of :data:`REQUANTIZATION_NAMES` runs every linear step
            with it (e.g. every integer variant in turn, to see which one a hardware's codes follow).
        engine: None keeps each step's engine.
        bias_rule: with an integer variant, the int32 bias rule (refquant.fixed_point.BIAS_RULES) instead of the
            variant's own.
        rounding: the QuantStub rounding (refquant.quantize.ROUNDINGS, or another implementation's of
            refquant.quantize.PORT_ROUNDINGS) instead of the file's.
        saturate_int16_pairs, onednn_kernel: the CPU kernel to model instead of the file's.
        negate_input_zero_point: model a port that takes every linear step's input zero point with the wrong sign,
            acc + z_x·col_offsets[n] instead of eq. L5's acc − z_x·col_offsets[n] (the weight zero-point term kept),
            in int32 (refquant.explain's "input_zero_point_negated").
        pairs_from_k0: model a port that sums eq. M2's int16 pairs from k = 0 where the step's pairs restart
            (pairs_restart_k > 0, oneDNN gemm:jit's eq. M2b), the zero-point corrections kept (refquant.explain's
            "no_pairs_restart").
        chained: True runs the program end to end from tensor 0 (every step on what the previous computed);
            False runs each step on the program's own input tensor, so a difference stays in the step that made it.

    :meth:`ProgramRun.differences` compares the run with the program's test vectors; with nothing changed, a
    file refquant wrote gives 0 differences.
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a refquant.program.Program (load_program), got {type(program).__name__}")
    if requantization is not None and requantization not in REQUANTIZATION_NAMES:
        raise ValueError(f"requantization must be None or one of {REQUANTIZATION_NAMES}, got {requantization!r}")
    if bias_rule is not None and bias_rule not in fp.BIAS_RULES:
        raise ValueError(f"bias_rule must be None or one of {fp.BIAS_RULES}, got {bias_rule!r}")
    if rounding is not None and rounding not in ROUNDINGS and rounding not in PORT_ROUNDINGS:
        raise ValueError(f"rounding must be None or one of {ROUNDINGS + tuple(PORT_ROUNDINGS)}, got {rounding!r}")
    run = ProgramRun(program, chained, [program.tensors[0]])
    for s in program.steps:
        x = run.tensors[s.input] if chained else program.tensors[s.input]
        layer = requantizer = None
        if s.kind == "linear":
            try:
                layer = s.layer(requantization=requantization, engine=engine,
                                saturate_int16_pairs=saturate_int16_pairs, onednn_kernel=onednn_kernel)
            except ValueError as e:
                raise ValueError(f"step {s.index} ({s.name!r}): {e}") from None
            if bias_rule is not None:
                if layer.requantization not in fp.VARIANTS:
                    raise ValueError(f"bias_rule applies to the integer variants {fp.VARIANTS}; step {s.index} runs "
                                     f"{layer.requantization!r}")
                requantizer = fp.IntegerRequantizer.build(layer.requantization, layer.qparams(), bias_rule=bias_rule)
            run.layers[s.index] = layer
        y, acc, raw = _run_step(s, x, layer, rounding=rounding, requantizer=requantizer,
                                negate_input_zero_point=negate_input_zero_point, pairs_from_k0=pairs_from_k0)
        run.tensors.append(y)
        if s.kind == "linear":
            run.acc_i32[s.index], run.raw_i32[s.index] = acc, raw
    return run


# ================================================================================================================
# The C header
# ================================================================================================================

_C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int32": "int32_t", "int": "int64_t", "bool": "int",
            "float32": "float", "float64": "double"}


def header_path(path: str | Path) -> Path:
    """``<path>.h`` for the golden files ``<path>.npz`` / ``<path>.json`` (refquant.export.golden_paths)."""
    from .export import golden_paths

    return golden_paths(path)[0].with_suffix(".h")


def _c_name(name: str) -> str:
    return "rqg_" + name.replace(".", "_")


def _c_string(s: str) -> str:
    out = []
    for ch in s.encode("utf-8"):
        c = chr(ch)
        out.append(c if 32 <= ch < 127 and c not in '"\\?' else f"\\{ch:03o}")
    return '"' + "".join(out) + '"'


def _c_int(v: int, dtype: str) -> str:
    v = int(v)
    if dtype == "int":
        return f"INT64_C({v})" if v != -(2**63) else "INT64_MIN"
    if dtype == "int32" and v == INT32[0]:
        return "INT32_MIN"
    return str(v)


def _c_float(v: float, dtype: str) -> str:
    suffix = "f" if dtype == "float32" else ""
    cast = "(float)" if dtype == "float32" else "(double)"
    if math.isnan(v):
        return f"{cast}NAN"
    if math.isinf(v):
        return f"{cast}INFINITY" if v > 0 else f"-{cast}INFINITY"
    return float(v).hex() + suffix


def _c_list(items: list[str], per_line: int = 12) -> str:
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return "{\n    " + ",\n    ".join(lines) + "\n}"


def c_header(values: dict[str, object], fields: dict[str, Field] | None = None) -> str:
    """The C99 header of a golden program: every field as a C object and the field table ``rqg_fields`` (see the
    module docstring). ``values``: checked fields (refquant.export.load_golden / check_program); a linear-format
    program is written as its one-step model program."""
    from .export import check_program

    if values["format"] != MODEL_FORMAT:
        values = program_from_fields(values).fields()
        fields = None
    if fields is None:
        source = Path("<program>")
        values = check_program(values)
        fields = _model_fields(lambda n, f: values[n], source)
    S = values["num_steps"]
    lines = [
        f"/* Golden program, format {MODEL_FORMAT}, written by refquant (refquant.program.c_header). Do not edit.",
        " *",
        " * Steps (step i reads tensor step<i>.inputs[0], writes tensor i + 1):",
    ]
    for i in range(S):
        p = f"step{i}."
        extra = ""
        if values[p + "kind"] == "linear":
            extra = (f" {values[p + 'in_features']} -> {values[p + 'out_features']}, engine {values[p + 'engine']}, "
                     f"requantization {values[p + 'requantization']}" + (", relu" if values[p + "relu"] else ""))
        name = values[p + "name"].replace("*/", "* /")
        lines.append(f" *   step {i}: {values[p + 'kind']} {name!r} (tensor {int(values[p + 'inputs'][0])} -> "
                     f"tensor {i + 1}){extra}")
    lines += [f" * Model output: tensor {values['output']}.",
              " * Every float is given by its IEEE-754 bits (rqg_<name>_bits) and as a float view (C99 hex literal).",
              " * c/refquant_program.c runs it: cc -std=c99 -DREFQUANT_GOLDEN_HEADER='\"<this file>\"' "
              "c/refquant_program.c c/refquant_requant.c -lm",
              " */",
              "#ifndef REFQUANT_GOLDEN_PROGRAM_H", "#define REFQUANT_GOLDEN_PROGRAM_H", "",
              "#include <math.h>", "#include <stddef.h>", "#include <stdint.h>", "",
              f'#define RQG_FORMAT "{MODEL_FORMAT}"', f"#define RQG_NUM_STEPS {S}",
              f"#define RQG_NUM_TENSORS {S + 1}", f"#define RQG_OUTPUT_TENSOR {values['output']}",
              f"#define RQG_MAX_RANK {MAX_RANK}", "",
              "#ifndef RQG_TYPES_V1", "#define RQG_TYPES_V1",
              "enum { RQG_STR = 0, RQG_BOOL = 1, RQG_INT = 2, RQG_INT8 = 3, RQG_UINT8 = 4, RQG_INT32 = 5, "
              "RQG_FLOAT32 = 6, RQG_FLOAT64 = 7 };",
              "typedef struct {",
              "    const char *name;              /* the golden file's field name */",
              "    int dtype;                     /* RQG_*: int64_t for RQG_INT, int for RQG_BOOL, char for RQG_STR */",
              "    int rank;                      /* 0 for a scalar (and a string) */",
              "    int64_t shape[RQG_MAX_RANK];",
              "    int64_t count;                 /* elements (a string's length) */",
              "    const void *data;              /* the values; for floats, the float view */",
              "    const void *bits;              /* floats: their uint32_t / uint64_t bit patterns; else NULL */",
              "} rqg_field;", "#endif", ""]
    table = []
    for name, f in fields.items():
        v = values[name]
        cname = _c_name(name)
        if f.dtype == "str":
            lines.append(f"static const char {cname}[] = {_c_string(v)};")
            table.append((name, f.dtype, 0, (), len(v.encode("utf-8")), cname, "NULL"))
            continue
        if f.dtype in ("bool", "int"):
            lines.append(f"static const {_C_TYPES[f.dtype]} {cname} = {_c_int(int(v), f.dtype)};")
            table.append((name, f.dtype, 0, (), 1, "&" + cname, "NULL"))
            continue
        arr = np.asarray(v, np.dtype(f.dtype))
        flat = arr.reshape(-1)
        ctype = _C_TYPES[f.dtype]
        bits_ref = "NULL"
        if f.dtype in ("float32", "float64"):
            utype, ubits = ("uint32_t", np.uint32) if f.dtype == "float32" else ("uint64_t", np.uint64)
            width = 8 if f.dtype == "float32" else 16
            bits = [f"UINT32_C(0x{int(b):0{width}x})" if f.dtype == "float32" else f"UINT64_C(0x{int(b):0{width}x})"
                    for b in flat.view(ubits)]
            view = [_c_float(float(x), f.dtype) for x in flat.astype(np.float64)]
            if arr.ndim == 0:
                lines.append(f"static const {utype} {cname}_bits = {bits[0]};")
                lines.append(f"static const {ctype} {cname} = {view[0]};")
                bits_ref, data_ref = "&" + cname + "_bits", "&" + cname
            else:
                lines.append(f"static const {utype} {cname}_bits[{flat.size}] = {_c_list(bits, 6)};")
                lines.append(f"static const {ctype} {cname}[{flat.size}] = {_c_list(view, 6)};")
                bits_ref, data_ref = cname + "_bits", cname
        else:
            items = [_c_int(x, f.dtype) for x in flat.tolist()]
            if arr.ndim == 0:
                lines.append(f"static const {ctype} {cname} = {items[0]};")
                data_ref = "&" + cname
            else:
                per_line = 16 if f.dtype != "int32" else 10
                lines.append(f"static const {ctype} {cname}[{flat.size}] = {_c_list(items, per_line)};")
                data_ref = cname
        table.append((name, f.dtype, arr.ndim, arr.shape, int(flat.size), data_ref, bits_ref))
    lines += ["", f"#define RQG_NUM_FIELDS {len(table)}", "static const rqg_field rqg_fields[RQG_NUM_FIELDS] = {"]
    for name, dtype, rank, shape, count, data_ref, bits_ref in table:
        shape_c = "{" + ", ".join(f"INT64_C({d})" for d in shape) + "}" if shape else "{0}"
        lines.append(f"    {{{_c_string(name)}, RQG_{dtype.upper()}, {rank}, {shape_c}, "
                     f"INT64_C({count}), {data_ref}, {bits_ref}}},")
    lines += ["};", "", "#endif /* REFQUANT_GOLDEN_PROGRAM_H */", ""]
    return "\n".join(lines)

