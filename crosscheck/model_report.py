"""The printed report and the JSON document of ``python -m crosscheck.model`` (schema: :data:`JSON_SCHEMA`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import compare as C
from .model_study import ModelStudyResult
from .requantization import distance_lines, exported_lines
from .report import _json_floats, kernel_line, layers_to_json
from .runner import first_mismatch_line, fmt_scalar, machine_line

JSON_SCHEMA = """\
{
  "equal", "exit_code", "fields", "environment", "torch_warnings": as in crosscheck.linear's JSON (crosscheck.report),
               each row of "fields" with "layer": the torch module path it belongs to ("model" rows: "")
  "study":     the options: model, engine, isa, seed, factory, state_dict, pickled, trust_pickle, calib, inputs,
               batch_size, requantization
  "layers":    as in crosscheck.linear's JSON: one object per module that computes, in call order
  "first_divergence": null, or {"layer", "field", "index", "torch", "refquant", ...} of the first differing row
  "accuracy":  null (no labels), or {"n", "float", "torch", "refquant": {"correct", "accuracy"},
               "identical_predictions", "flipped_by_quantization" (torch's quantized predictions that differ from
               the float model's), "flipped_by_quantization_refquant"}
  "model":     what the model source reported ("name", "description", "data", training for the built-in ones),
               "qconfig", "printed": print(converted model)
  "data":      {"calibration", "evaluation": {"batches", "inputs"}}
  "export":    null, or the files --export wrote (model.npz, model.json, model.h)
}
"""


def _count(n: int) -> str:
    return f"{n:,}"


def text_report(res: ModelStudyResult) -> str:
    cfg, env, rec = res.config, res.environment, res.record
    info = rec.info
    L: list[str] = ["crosscheck.model: eager post-training static quantization of a whole model, torch vs refquant"]
    L.append(f"  model    {info.get('name')}: {info.get('description', '').rstrip('.')}")
    calls = " -> ".join(n for entry in res.layers for n in entry["calls"])
    L.append(f"  layers   {calls}")
    if "training" in info:
        t = info["training"]
        L.append(f"  trained  {t['steps']} steps of {t['optimizer']} in {t['seconds']:.1f} s (seed {cfg.seed}; "
                 f"training accuracy {t['train_accuracy']:.4f})")
    cal, ev = res.batches["calibration"], res.batches["evaluation"]
    if cfg.model == "user":
        source = f"--calib {cfg.calib_path}" + (f", --inputs {cfg.inputs_path}" if cfg.inputs_path else "")
        L.append(f"  data     {source}: {cal['inputs']} calibration samples ({cal['batches']} batches of <= "
                 f"{cfg.batch_size}), {ev['inputs']} evaluation inputs")
    else:
        L.append(f"  data     scikit-learn load_digits: {cal['inputs']} training images calibrate "
                 f"({cal['batches']} batches of <= {cfg.batch_size}), {ev['inputs']} held-out images evaluate")
    L.append(f"  qconfig  {rec.qconfig}, engine {env['engine']}")
    L.append(f"  system   torch {env['torch']}, numpy {env['numpy']}, numba {env['numba']}")
    L.append(machine_line(env))
    L.append(kernel_line(env, res.layers))
    L.append("")

    L.append("layers in call order: every field compared bit for bit (observer range, histogram, clip range; scale,")
    L.append("zero point; int8 weight, weight scales, bias, col_offsets; per batch: int32 accumulators, output codes)")
    width = max([len(e["path"]) for e in res.layers] + [5])
    twidth = max([len(e["torch_type"] or "") for e in res.layers] + [4])
    L.append(f"  {'layer':<{width}}  {'type':<{twidth}}  {'scale':>14}  {'zero_point':>10}  {'rows':>4}  "
             f"{'values':>10}  equal")
    for e in res.layers:
        scale = "-" if e["scale"] is None else fmt_scalar(np.float32(e["scale"]))  # float32 values
        zp = "-" if e["zero_point"] is None else str(e["zero_point"])
        rows = sum(1 for i in e["fields"] if res.fields[i].counted)
        L.append(f"  {e['path']:<{width}}  {e['torch_type'] or '':<{twidth}}  {scale:>14}  {zp:>10}  {rows:>4}  "
                 f"{_count(e['values']):>10}  {'yes' if e['equal'] else 'NO'}")
    model_rows = [f for f in res.fields if f.counted and f.layer == ""]
    if model_rows:
        ok = all(f.equal for f in model_rows)
        L.append(f"  {'model output':<{width + twidth + 2}}  {'':>14}  {'':>10}  {len(model_rows):>4}  "
                 f"{_count(sum(f.size for f in model_rows)):>10}  {'yes' if ok else 'NO'}")
    L.append("")

    acc = res.accuracy
    if acc is not None:
        n = acc["n"]
        L.append(f"accuracy on {n} held-out images (argmax of the outputs)")
        for key, label in (("float", "float model"), ("torch", "torch, quantized"),
                           ("refquant", "refquant, quantized")):
            a = acc[key]
            L.append(f"  {label:<20} {100 * a['accuracy']:6.2f}%  ({a['correct']} of {n})")
        L.append(f"  identical predictions, torch and refquant: {'yes' if acc['identical_predictions'] else 'NO'}")
        L.append(f"  quantization flipped {acc['flipped_by_quantization']} of {n} predictions (torch's quantized "
                 f"model against the float model)")
        L.append("")

    L += distance_lines(res.fields) + exported_lines(res.exported)

    parity = res.parity_fields
    values = sum(f.size for f in parity)
    bad = [f for f in parity if not f.equal]
    if bad:
        d = res.first_divergence
        layer = next((e for e in res.layers if e["path"] == d["layer"]), None)
        where = f"layer {d['layer'] or 'model output'}" + (f" ({layer['torch_type']})" if layer else "")
        index = "" if d.get("index") is None else f", index {tuple(d['index'])}"
        values_text = (f": torch {d.get('torch')!r}, refquant {d.get('refquant')!r}" if d.get("index") is not None
                       else f": {d.get('reason', 'differs')}")
        L.append(f"MISMATCH: {len(bad)} of {len(parity)} rows differ; first divergence at {where}, field "
                 f"{d['field']!r}{index}{values_text}")
        for f in bad:
            L.append(first_mismatch_line(f))
    else:
        L.append(f"result: all {len(res.layers)} layers equal, bit for bit ({len(parity)} rows, "
                 f"{_count(values)} values)")
    return "\n".join(line.rstrip() for line in L)


def quiet_report(res: ModelStudyResult) -> str:
    """--quiet: the result line, or the first divergence and each differing row."""
    text = text_report(res).split("\n")
    i = next(i for i, line in enumerate(text) if line.startswith(("result:", "MISMATCH:")))
    return "\n".join(text[i:])


def json_document(res: ModelStudyResult) -> dict:
    return {
        "equal": res.equal,
        "exit_code": 0 if res.equal else 1,
        "study": res.config.to_json(),
        "fields": [f.to_json() for f in res.fields],
        "layers": layers_to_json(res.layers),
        "first_divergence": _json_value(res.first_divergence),
        "accuracy": _json_floats(res.accuracy),
        "model": {**_json_floats(res.record.info), "qconfig": res.record.qconfig,
                  "printed": res.record.printed_model},
        "data": res.batches,
        "export": res.exported,
        "environment": res.environment,
        "torch_warnings": res.record.warnings,
    }


def _json_value(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _json_value(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_json_value(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return C.scalar_to_json(d)
    return C.scalar_to_json(d) if not isinstance(d, (str, type(None))) else d
