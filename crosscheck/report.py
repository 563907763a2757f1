"""The study's printed report and its JSON document (schema: see ``JSON_SCHEMA`` below and the README)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from . import compare as C
from .isa import INSTRUCTIONS
from .requantization import distance_lines, exported_lines
from .runner import field_line, first_mismatch_line, fmt_scalar, machine_line  # shared by the CLIs
from .study import StudyResult

JSON_SCHEMA = """\
{
  "equal":     true when every parity and derived row is equal (exit code 0), else false (exit code 1)
  "exit_code": 0 or 1
  "study":     the options: in_features, out_features, input_shape, calib_batches, calib_dist, samples, seed,
               relu, bias, engine, isa, requantization (the --requantization variants, a list)
  "fields": [  one object per compared value, in the printed order:
    {"name":       e.g. "input scale", "weight int8 (int_repr)", "output codes (1000 samples)"
     "kind":       "parity"        torch's value read from torch's model, observers or outputs;
                   "derived"       torch's value computed from torch's own integer tensors with exact int64
                                   torch ops (fbgemm does not expose col_offsets or int32 accumulators);
                   "refquant_only" an intermediate torch does not expose (torch null, equal null);
                   "float_forward" refquant's own NumPy float forward vs torch's F.linear: reported, never
                                   part of "equal"
                   "requantization" --requantization: an integer-only variant's output codes (from the same
                                   int32 accumulators) vs torch's: reported, never part of "equal"
     "equal":      true/false (null for refquant_only): integers equal by value, floats by bit pattern
     "mismatches": number of differing elements
     "first_mismatch": null, or {"index": [...] (index into the value), "torch": v, "refquant": v,
                   "torch_bits"/"refquant_bits": "0x..." for floats}
     "size", "shape", "torch_dtype", "refquant_dtype"
     "torch", "refquant": the value (a number or nested lists) when it has <= 256 elements, else
                   {"shape", "dtype", "first": [first 8 values], "sha256": of the raw bytes}; floats are exact
                   (JSON numbers round-trip float64), non-finite floats are the strings "nan", "inf", "-inf"
     "note":       where each side's value comes from, and what to know about it
     "distance":   "requantization" rows only: {"variant", "bias_rule", "codes", "differing", "share",
                   "max_abs_difference", "histogram": [[variant - torch, count], ...] of the differing codes,
                   "causes": {ingredient: count}, the first ingredient that moved each differing code:
                   "engine_float_path", "bias_i32", "exact_rounding", "q31_multiplier", "second_rounding"}}
  ]
  "calibration": the first calibration batch: "input", "float_output" (torch's float model),
                 "quantized_output" (torch's quantized model), "output_codes", "input_codes"
  "error":     {"samples", "distribution", "reference" (torch's float model on the same inputs),
                "torch": {"n", "mean_abs", "max_abs", "sqnr_db",
                          "inside_ranges": {"n", "mean_abs", "max_abs", "sqnr_db"}  outputs whose inputs and
                                           float value fit the quantized ranges: rounding error only,
                          "clipped": {same, plus "share_of_squared_error"}         the rest},
                "refquant": {same, from refquant's outputs}, "equal": both identical bit for bit,
                "refquant_vs_own_float_forward": {"n", "mean_abs", "max_abs", "sqnr_db"} against refquant's
                NumPy float forward instead}
  "float_forward": {"output_qparams_changed", "torch": {"scale", "zero_point"},
                "refquant_own": {"scale", "zero_point"}, "float_outputs_differing", "float_outputs",
                "sample_output_codes_differing" (a model calibrated on refquant's own floats vs torch's codes,
                0 when the qparams did not change), "explanation"}
  "environment": {"torch", "numpy", "numba", "engine", "cpu_isa" (torch.backends.cpu.get_cpu_capability()),
                "vnni" (the CPU has AVX-512 VNNI, which fbgemm's VNNI kernels need), "torch_threads",
                "isa" (--isa: "auto", "vnni" or "avx2"),
                "fbgemm_kernel": "vnni" (vpdpbusd, exact int32 sums) or "avx2" (vpmaddubsw, int16-saturated
                                 pairs: AVX2, or AVX-512 without VNNI), what torch really ran,
                "fbgemm_kernel_detected_by" (the probe of crosscheck/isa.py and its result),
                "fbgemm_enable_instructions" (FBGEMM_ENABLE_INSTRUCTIONS in the torch process, or null),
                "refquant_saturate_int16_pairs" (true for "avx2": how refquant modelled it),
                "torch_side" (the process torch ran in)}
  "torch_warnings": the distinct warnings torch raised (deprecations), first lines
  "layers": [  one object per module that computes (the model study's layers), in call order:
    {"path":      its torch module path ("quant", "fc"; "body.0.fc" in a model)
     "torch_type", "converted_type": its type before and after convert, as torch prints them ("LinearReLU",
                  "QuantizedLinearReLU"); "refquant_type": refquant.model's ("ConvertedLinear")
     "calls":     its calls in order ("fc", "fc#2" for a module called twice)
     "kernels":   Linear calls only: call -> the kernel families torch ran ("vnni", "avx2", "exact", oneDNN's
                  "brgemm", "brgemm_amx", "gemm", "+pairs" when they saturate int16 pairs)
     "scale", "zero_point": its output qparams (null for DeQuantStub and ReLU)
     "fields":    indices into "fields" of its rows (each such row also carries "layer": the path)
     "equal", "values" (elements compared), "mismatches",
     "first_mismatch": null, or {"field", "index", "torch", "refquant", ...} of its first differing row}
  ]
  "export":    null, or the files --export wrote (model.npz, model.json, model.h)
}
"""


MACHINE_DEPENDENT = (
    # the header lines that describe the machine: CPU features, the kernel family torch's fbgemm runs
    (re.compile(r"^(  machine  ).*$", re.M), r"\1<this machine>"),
    (re.compile(r"^(  kernel   ).*$", re.M), r"\1<this machine>"),
    # refquant's own NumPy float forward against torch's MKL sgemm: both BLAS pick kernels by CPU
    (re.compile(r"^(  calibrating with NumPy's float32 .*?: )\d+( of \d+ floats differ;\n).*?(?=^  torch's MKL)",
                re.M | re.S), r"\1<n>\2  <what that does to the output qparams>\n"),
)
"""What the text report may print differently on another machine with the same versions, and nothing else."""


def mask_machine_dependent(text: str) -> str:
    """``text`` (a text report) with the lines and figures of :data:`MACHINE_DEPENDENT` replaced by placeholders,
    so that two reports from different machines compare equal exactly when everything else is."""
    for pattern, placeholder in MACHINE_DEPENDENT:
        text = pattern.sub(placeholder, text)
    return text


def kernel_line(env: dict, layers: list[dict]) -> str:
    """The report's ``kernel`` line: which int8 kernel the engine's Linears ran, and how refquant modelled it."""
    engine = env["engine"]
    if engine == "qnnpack":
        return "  kernel   qnnpack runs its SSE2 kernel (exact int16 products, never saturated); refquant models it"
    if engine == "onednn":
        seen = sorted({k for entry in layers for ks in entry.get("kernels", {}).values() for k in ks})
        return (f"  kernel   oneDNN picks its matmul kernel per call, read from its verbose output: "
                f"{', '.join(seen) or 'none ran'}; refquant models each call's")
    family = env["fbgemm_kernel"]
    return (f"  kernel   fbgemm runs {family} ({INSTRUCTIONS[family]}; probed), refquant "
            f"saturate_int16_pairs={env['refquant_saturate_int16_pairs']}")


def text_report(res: StudyResult) -> str:
    cfg, ts, env = res.config, res.torch, res.environment
    L: list[str] = []
    layer = f"Linear({cfg.in_features}, {cfg.out_features}{'' if cfg.bias else ', bias=False'})"
    if cfg.relu:
        layer = f"LinearReLU({cfg.in_features}, {cfg.out_features}{'' if cfg.bias else ', bias=False'})"
    L.append("crosscheck.linear: eager post-training static quantization, torch vs refquant")
    L.append(f"  model    QuantStub -> {layer} -> DeQuantStub, qconfig = get_default_qconfig({cfg.engine!r})")
    batches = f"{cfg.calib_batches} calibration batch{'es' if cfg.calib_batches > 1 else ''}"
    L.append(f"  data     seed {cfg.seed}; {batches} of shape {tuple(cfg.input_shape)} ({cfg.calib_dist}); "
             f"{cfg.samples} samples")
    L.append(f"  system   torch {env['torch']} (engine {env['engine']}), numpy {env['numpy']}, numba {env['numba']}")
    L.append(machine_line(env))
    L.append(kernel_line(env, res.layers))
    L.append("")

    reduce_range = bool(ts.input_observer["reduce_range"])
    L.append(f"calibration: HistogramObserver(reduce_range={reduce_range}) picks a range, then scale and zero point")
    L.append(f"  {'':<8} {'min_val':>11} {'max_val':>11}   {'calibrated range':<25} {'scale':>22} {'zero_point':>10}")
    for label, obs, scale, zp in (("input", ts.input_observer, ts.input_scale[0], ts.input_zero_point[0]),
                                  ("output", ts.output_observer, np.float32(ts.output_scale),
                                   ts.output_zero_point)):
        clip = f"[{fmt_scalar(obs['clip_min'])}, {fmt_scalar(obs['clip_max'])}]"
        L.append(f"  {label:<8} {fmt_scalar(obs['min_val']):>11} {fmt_scalar(obs['max_val']):>11}   {clip:<25} "
                 f"{fmt_scalar(scale):>22} {int(zp):>10}")
    if reduce_range:
        L.append(f"  reduce_range maps the calibrated range onto codes {ts.input_observer['quant_min']}.."
                 f"{ts.input_observer['quant_max']} (7 bits); quantize still clamps to 0..255:")
        L.append("  headroom above the calibrated range (codes 128..255), none below it (code 0 is its minimum)")
    else:
        L.append(f"  the calibrated range maps onto codes {ts.input_observer['quant_min']}.."
                 f"{ts.input_observer['quant_max']} (8 bits, no reduce_range): no headroom above it")
    L.append("")

    N, K = ts.weight_int8.shape
    per_channel = np.asarray(ts.weight_scales).size == N and res.environment["engine"] != "qnnpack"
    if N * K <= 64:
        if per_channel:
            L.append("weight: PerChannelMinMaxObserver(qint8, per_channel_symmetric); scale = max|w[n]| / 127.5;")
            L.append("  torch stores it as per_channel_affine, zero points 0 (quantize_per_channel has no symmetric "
                     "kind)")
        else:
            L.append("weight: MinMaxObserver(qint8, per_tensor_symmetric); one scale = max|w| / 127.5, zero point 0;")
            L.append("  torch stores it as per_tensor_affine (every row below has the same scale)")
        L.append(f"  {'float weight':<{11 * K}}  {'int8 (int_repr)':<{6 * K}}  {'scale':<12}  "
                 f"{'bias (float32, not quantized)' if ts.bias is not None else ''}")
        for n in range(N):
            wrow = " ".join(f"{v: .6f}"[:10].rjust(10) for v in ts.weight[n])
            qrow = " ".join(f"{int(v):5d}" for v in ts.weight_int8[n])
            b = f"{ts.packed_bias[n]: .8f}" if ts.packed_bias is not None else ""
            w_scale = np.asarray(ts.weight_scales).reshape(-1)[n if per_channel else 0]
            L.append(f"  {wrow:<{11 * K}}  {qrow:<{6 * K}}  {fmt_scalar(np.float32(w_scale)):<12}  {b}")
        L.append("")

    if res.calibration is not None:
        c = res.calibration
        yf, yq, codes = (c["float_output"].reshape(-1), c["quantized_output"].reshape(-1),
                         c["output_codes"].reshape(-1))
        shown = min(yf.size, 18)
        L.append(f"calibration input through both models (first batch, {shown} of {yf.size} outputs)")
        L.append(f"  {'float model':>12} {'quantized':>12} {'code':>5} {'error':>12}")
        for i in range(shown):
            L.append(f"  {yf[i]:12.6f} {yq[i]:12.6f} {int(codes[i]):5d} {float(yq[i]) - float(yf[i]):12.6f}")
        L.append("")

    e = res.error
    if cfg.samples:
        L.append(f"error of the quantized model over {cfg.samples} random inputs ({cfg.calib_dist}), "
                 f"against the float model")
        L.append(f"  {'':<9} {'mean |err|':>12} {'max |err|':>12} {'SQNR':>10}")
        for side in ("torch", "refquant"):
            m = e[side]
            L.append(f"  {side:<9} {m['mean_abs']:12.8f} {m['max_abs']:12.8f} {m['sqnr_db']:7.2f} dB")
        L.append(f"  identical: {'yes' if e['equal'] else 'NO'} (same code on both sides, compared bit for bit)")
        m = e["torch"]
        ins, clp = m["inside_ranges"], m["clipped"]
        L.append("  where it comes from (torch; clipped: an input or the float output lies beyond what codes 0..255 "
                 "stand for):")
        if ins["n"]:
            L.append(f"    inside the ranges  {ins['n']:>8} outputs  mean |err| {ins['mean_abs']:.8f}  "
                     f"max {ins['max_abs']:.8f}   rounding of inputs, weights and output")
        if clp["n"]:
            L.append(f"    clipped            {clp['n']:>8} outputs  mean |err| {clp['mean_abs']:.8f}  "
                     f"max {clp['max_abs']:.8f}   {100 * clp['share_of_squared_error']:.1f}% of the squared error")
        else:
            L.append("    clipped                   0 outputs")
        L.append(f"  output scale {np.float32(ts.output_scale)!s}: rounding the output alone contributes |err| <= "
                 f"{np.float32(ts.output_scale) / 2:.6g}")
        L.append("")

    parity = [f for f in res.fields if f.kind in C.COUNTED_KINDS]
    width = max(len(f.name) for f in res.fields) + 2
    L.append("parity: torch vs refquant, bit for bit (floats compared as raw bits)")
    L.append(f"  {'field':<{width}}  {'equal':<5}  {'mismatches':>11}  value")
    for f in parity:
        L.append(field_line(f, width))
    L.append("  * torch's side derived from torch's own integer tensors with exact int64 ops (fbgemm keeps these inside)")
    L.append("")

    only = [f for f in res.fields if f.kind == C.REFQUANT_ONLY]
    if only:
        L.append("refquant only (torch computes these inside quantized::linear and does not expose them)")
        for f in only:
            L.append(field_line(f, width))
        L.append("")

    L += distance_lines(res.fields) + exported_lines(res.exported)

    ff = res.float_forward
    L.append("refquant's own float forward (reported, not a parity row)")
    L.append(f"  calibrating with NumPy's float32 x @ W.T + b instead of torch's recorded F.linear outputs: "
             f"{ff['float_outputs_differing']} of {ff['float_outputs']} floats differ;")
    t_scale, o_scale = np.float32(ff["torch"]["scale"]), np.float32(ff["refquant_own"]["scale"])
    if ff["output_qparams_changed"]:
        L.append(f"  the output qparams CHANGE: torch scale {t_scale!s} zero_point {ff['torch']['zero_point']}, "
                 f"own forward scale {o_scale!s} zero_point {ff['refquant_own']['zero_point']};")
        if cfg.samples:
            L.append(f"  a model calibrated that way gives different output codes for "
                     f"{ff['sample_output_codes_differing']} of {res.error['torch']['n']} sample outputs.")
    else:
        L.append(f"  the output qparams are unchanged (scale {t_scale!s}, zero_point {ff['torch']['zero_point']}).")
    L.append("  torch's MKL sgemm sums in a shape-dependent order, so this can differ for other shapes and data")
    L.append("  (docs/numerics.md §8); the parity rows feed refquant the activations torch's observers saw.")
    L.append("")

    bad = [f for f in parity if not f.equal]
    if bad:
        L.append(f"MISMATCH: {len(bad)} of {len(parity)} parity rows differ")
        for f in bad:
            L.append(first_mismatch_line(f))
    else:
        L.append(f"result: all {len(parity)} parity rows equal, bit for bit")
    return "\n".join(line.rstrip() for line in L)


def quiet_report(res: StudyResult) -> str:
    """--quiet: the result line, and the first difference of each differing parity row."""
    parity = [f for f in res.fields if f.kind in C.COUNTED_KINDS]
    bad = [f for f in parity if not f.equal]
    if not bad:
        return f"result: all {len(parity)} parity rows equal, bit for bit"
    return "\n".join([f"MISMATCH: {len(bad)} of {len(parity)} parity rows differ"] +
                     [first_mismatch_line(f) for f in bad])


def json_document(res: StudyResult) -> dict:
    c = res.calibration
    calibration = None
    if c is not None:
        calibration = {k: C.array_to_json(v) for k, v in c.items()}
    return {
        "equal": res.equal,
        "exit_code": 0 if res.equal else 1,
        "study": res.config.to_json(),
        "fields": [f.to_json() for f in res.fields],
        "calibration": calibration,
        "error": _json_floats(res.error),
        "float_forward": _json_floats(res.float_forward),
        "environment": res.environment,
        "torch_warnings": res.torch.warnings,
        "layers": layers_to_json(res.layers),
        "export": res.exported,
    }


def layers_to_json(layers: list[dict]) -> list[dict]:
    """The model study's layers (crosscheck.model_study.ModelComparison.layers) as JSON values."""
    return [{k: C.scalar_to_json(v) if not isinstance(v, (list, dict, type(None))) else v for k, v in entry.items()}
            for entry in layers]


def _json_floats(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _json_floats(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return C.scalar_to_json(d)
    return d
