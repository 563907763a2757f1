"""``python -m crosscheck.linear --dynamic`` (also ``python -m crosscheck.dynamic``): torch's dynamic quantization of
one nn.Linear against refquant's, bit for bit::

    torch.backends.quantized.engine = engine;  torch.manual_seed(seed);  model = nn.Sequential(nn.Linear(K, N))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    for x in samples: quantized(x)            # one call per sample: each chooses its own input scale and zero point

and refquant's ``DynamicQuantizedLinear.from_float`` from the same float weight (``--weight-qscheme
per_channel_symmetric``: ``per_channel_dynamic_qconfig``). Every per-call value is compared: the batch's min and
max, the input scale and zero point, the input codes and int32 accumulators (derived from torch's own ops: the op
keeps them inside), the float outputs (bit patterns), oneDNN's kernel (onednn), and the error against the float
model. The study is in crosscheck.dynamic_study, the torch side in crosscheck.torch_dynamic.

Exit codes as crosscheck.linear: 0 every parity row equal; 1 any mismatch (first difference printed); 2 bad
arguments; 3 the study could not run. ``--json PATH|-`` writes the comparison with crosscheck.linear's conventions
(:data:`JSON_SCHEMA`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from .dynamic_study import ENGINES, QCONFIG_NAMES, WEIGHT_QSCHEMES, DynamicConfig, DynamicResult
from .isa import INSTRUCTIONS
from .linear import (DISTRIBUTIONS, EXIT_CODES_EPILOG, EXIT_EQUAL, EXIT_MISMATCH, ISAS, add_feature_options,
                     _int_at_least, _seed, _shape)
from .runner import (check_isa, check_json_path, check_shape, json_floats, machine_line, parity_table, result_line,
                     run_main)
from .worker import exit_after_main

PROG = "python -m crosscheck.linear --dynamic"

JSON_SCHEMA = """\
{
  "equal", "exit_code", "fields", "environment", "torch_warnings": as crosscheck.linear's (crosscheck.report);
               the rows are the weight's, then one per per-call value over all calls (first axis: the call)
  "study":     in_features, out_features, input_shape, calib_dist (the samples' distribution), samples, seed,
               bias, engine, weight_qscheme, isa, "dynamic": true
  "qconfig":   "default_dynamic_qconfig" or "per_channel_dynamic_qconfig"
  "reduce_range": what the op used (True; False on qnnpack, which ignores the module's True)
  "first_calls": [{"x_min", "x_max", "scale" (double), "zero_point"}] of the first calls (torch's, derived)
  "error":     {"samples", "distribution", "reference", "torch": {"n", "mean_abs", "max_abs", "sqnr_db"},
                "refquant": {same}, "equal"}
  "environment": crosscheck.linear's keys, plus on onednn "onednn": {"refquant_kernel", "refquant_formulas"
                (calls per output formula), "torch_impls" (calls per oneDNN implementation, from ONEDNN_VERBOSE),
                "refquant_kernel_predicted_by", "torch_impls_detected_by"}
}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Quantize one nn.Linear with torch's quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8) "
                    "and with refquant's DynamicQuantizedLinear from the same float weights; call both once per "
                    "sample and compare every value bit for bit (weights, per-call input range, scale, zero point, "
                    "codes, int32 accumulators, float outputs). With no options: nn.Linear(3, 3), seed 0, 1000 "
                    "samples of shape (1, 2, 3, 3), engine fbgemm, default_dynamic_qconfig.",
        epilog=EXIT_CODES_EPILOG,
    )
    add_feature_options(p, in_features=3, out_features=3)
    p.add_argument("--input-shape", type=_shape, default=None, metavar="D1,...,K",
                   help="shape of one input tensor (one call), comma-separated; the last dimension must equal "
                        "--in-features (default 1,2,3,K)")
    p.add_argument("--calib-dist", choices=DISTRIBUTIONS, default="normal",
                   help="distribution of the samples (crosscheck.linear's distributions; there is no calibration: "
                        "each call takes its qparams from its own input) (default normal)")
    p.add_argument("--samples", type=_int_at_least(0, "--samples"), default=1000, metavar="S",
                   help="number of calls, each on a fresh random input of --input-shape (default 1000)")
    p.add_argument("--seed", type=_seed, default=0, help="torch.manual_seed before the Linear's init and the "
                   "samples (default 0; the same weight and inputs as crosscheck.linear's samples)")
    p.add_argument("--no-bias", action="store_true", help="no bias, as nn.Linear(..., bias=False)")
    p.add_argument("--engine", choices=ENGINES, default="fbgemm",
                   help="torch.backends.quantized.engine (default fbgemm)")
    p.add_argument("--weight-qscheme", choices=WEIGHT_QSCHEMES, default="per_tensor_symmetric",
                   help="per_tensor_symmetric: default_dynamic_qconfig (quantize_dynamic's default); "
                        "per_channel_symmetric: per_channel_dynamic_qconfig (default per_tensor_symmetric)")
    p.add_argument("--isa", choices=ISAS, default="auto",
                   help="the int8 kernel family torch's fbgemm is to run (as crosscheck.linear's --isa); the "
                        "module's 7-bit codes give the same numbers with either (default auto)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the full comparison as JSON to PATH ('-' for stdout, which then replaces the report)")
    p.add_argument("--quiet", action="store_true", help="print only the result line; no progress on stderr")
    # crosscheck.linear options that have no meaning here: refused with a reason
    for option in ("--calib-batches", "--plots"):
        p.add_argument(option, default=None, help=argparse.SUPPRESS)
    p.add_argument("--relu", action="store_true", default=False, help=argparse.SUPPRESS)
    p.add_argument("--dynamic", action="store_true", help=argparse.SUPPRESS)  # as passed on by crosscheck.linear
    return p


def parse_config(argv: Sequence[str] | None) -> tuple[DynamicConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.calib_batches is not None:
        parser.error("--calib-batches does not apply to --dynamic: a dynamic Linear is not calibrated (each call "
                     "chooses its qparams from its own input)")
    if args.relu:
        parser.error("--relu does not apply to --dynamic: quantize_dynamic(model, {nn.Linear}) quantizes the Linear "
                     "alone (a following ReLU stays a float module)")
    if args.plots is not None:
        parser.error("--plots does not apply to --dynamic (the figures are of the static study's calibration)")
    shape = args.input_shape if args.input_shape is not None else (1, 2, 3, args.in_features)
    check_shape(parser, tuple(shape), args.in_features, args.out_features)
    check_isa(parser, args.isa)
    check_json_path(parser, args.json)
    config = DynamicConfig(in_features=args.in_features, out_features=args.out_features, input_shape=tuple(shape),
                           calib_dist=args.calib_dist, samples=args.samples, seed=args.seed, bias=not args.no_bias,
                           engine=args.engine, weight_qscheme=args.weight_qscheme, isa=args.isa)
    return config, args


def _f32(v) -> str:
    return str(np.float32(v))


def text_report(res: DynamicResult) -> str:
    cfg, env, layer = res.config, res.environment, res.layer
    L: list[str] = []
    lin = f"Linear({cfg.in_features}, {cfg.out_features}{'' if cfg.bias else ', bias=False'})"
    spec = "{nn.Linear}" if cfg.weight_qscheme == "per_tensor_symmetric" else "{nn.Linear: per_channel_dynamic_qconfig}"
    reduce_range = cfg.engine != "qnnpack"
    L.append("crosscheck.linear --dynamic: dynamic quantization, torch vs refquant")
    L.append(f"  model    {lin}, quantize_dynamic(model, {spec}, dtype=torch.qint8)")
    L.append(f"           -> {layer['module']} ({QCONFIG_NAMES[cfg.weight_qscheme]})")
    L.append(f"  data     seed {cfg.seed}; {cfg.samples} samples of shape {tuple(cfg.input_shape)} ({cfg.calib_dist}), "
             f"one call each")
    L.append(f"  system   torch {env['torch']} (engine {env['engine']}), numpy {env['numpy']}, numba {env['numba']}")
    L.append(machine_line(env))
    family = env["fbgemm_kernel"]
    if cfg.engine in ("fbgemm", "x86"):
        L.append(f"  kernel   fbgemm runs {family} ({INSTRUCTIONS[family]}; probed), refquant saturate_int16_pairs="
                 f"{env['refquant_saturate_int16_pairs']} (7-bit codes: a pair cannot saturate either way)")
    elif cfg.engine == "qnnpack":
        L.append("  kernel   qnnpack's SSE2 kernel (exact int16 products, int32 sums) on every x86-64 CPU")
    else:
        od = env["onednn"]
        impls = ", ".join(f"{k} ({v} calls)" for k, v in od["torch_impls"].items()) or "no call"
        formulas = ", ".join(f"{k} ({v})" for k, v in od["refquant_formulas"].items()) or "no call"
        L.append(f"  kernel   oneDNN ran {impls} (ONEDNN_VERBOSE, read per call)")
        L.append(f"           refquant predicts onednn_kernel={od['refquant_kernel']!r} with the small-shape rule: "
                 f"{formulas}")
    L.append("")

    top = 127 if reduce_range else 255
    L.append(f"per call: the input's own range -> scale (double) and zero point, codes 0..{top}"
             + (" (reduce_range=True)" if reduce_range else " (qnnpack ignores reduce_range=True and warns)"))
    L.append(f"  {'call':>5} {'x_min':>12} {'x_max':>12} {'scale':>24} {'zero_point':>10}")
    for i, c in enumerate(res.first_calls[:5]):
        L.append(f"  {i:>5} {_f32(c['x_min']):>12} {_f32(c['x_max']):>12} {float(c['scale']):>24.17g} "
                 f"{c['zero_point']:>10}")
    if cfg.samples > 5:
        L.append(f"  ... {cfg.samples} calls in all (every one compared below)")
    L.append("")

    N, K = layer["weight_int8"].shape
    if N * K <= 64:
        per_channel = cfg.weight_qscheme.startswith("per_channel")
        obs = "PerChannelMinMaxObserver" if per_channel else "MinMaxObserver"
        rule = "max|w[n]| / 127.5 per channel" if per_channel else "max|w| / 127.5 for the whole tensor"
        L.append(f"weight: {obs}(qint8, {cfg.weight_qscheme}); scale = {rule}; torch stores it as {layer['qscheme']}")
        L.append(f"  {'float weight':<{11 * K}}  {'int8 (int_repr)':<{6 * K}}  {'scale':<12}  "
                 f"{'bias (float32, not quantized)' if layer['bias'] is not None else ''}")
        scales = np.broadcast_to(layer["weight_scales"], (N,))
        for n in range(N):
            wrow = " ".join(f"{v: .6f}"[:10].rjust(10) for v in layer["weight"][n])
            qrow = " ".join(f"{int(v):5d}" for v in layer["weight_int8"][n])
            b = f"{layer['packed_bias'][n]: .8f}" if layer["packed_bias"] is not None else ""
            s = _f32(scales[n]) if per_channel or n == 0 else ""
            L.append(f"  {wrow:<{11 * K}}  {qrow:<{6 * K}}  {s:<12}  {b}")
        L.append("")

    if res.first_sample is not None:
        s = res.first_sample
        yf, yq = s["float_output"].reshape(-1), s["output"].reshape(-1)
        shown = min(yf.size, 12)
        same = np.array_equal(s["output"].view(np.uint32), s["refquant_output"].view(np.uint32))
        L.append(f"the first call through both models ({shown} of {yf.size} outputs; refquant's are "
                 f"{'the same bits' if same else 'NOT the same bits: see the parity rows'})")
        L.append(f"  {'float model':>12} {'dynamic':>12} {'error':>12}")
        for i in range(shown):
            L.append(f"  {yf[i]:12.6f} {yq[i]:12.6f} {float(yq[i]) - float(yf[i]):12.6f}")
        L.append("")

    e = res.error
    if cfg.samples:
        L.append(f"error of the dynamically quantized model over {cfg.samples} calls ({cfg.calib_dist}), against the "
                 f"float model")
        L.append(f"  {'':<9} {'mean |err|':>12} {'max |err|':>12} {'SQNR':>10}")
        for side in ("torch", "refquant"):
            m = e[side]
            L.append(f"  {side:<9} {m['mean_abs']:12.8f} {m['max_abs']:12.8f} {m['sqnr_db']:7.2f} dB")
        L.append(f"  identical: {'yes' if e['equal'] else 'NO'} (same code on both sides, compared bit for bit); "
                 "nothing is clipped: each call's range covers its input")
        L.append("")

    L.append("parity: torch vs refquant, bit for bit (floats compared as raw bits)")
    L += parity_table(res.fields)
    L.append("  * torch's side derived with torch's own ops on the same input (the op keeps these inside)")
    L.append("")
    L.append(result_line(res.fields))
    return "\n".join(line.rstrip() for line in L)


def json_document(res: DynamicResult) -> dict:
    return {
        "equal": res.equal,
        "exit_code": EXIT_EQUAL if res.equal else EXIT_MISMATCH,
        "study": res.config.to_json(),
        "qconfig": QCONFIG_NAMES[res.config.weight_qscheme],
        "reduce_range": res.config.engine != "qnnpack",
        "fields": [f.to_json() for f in res.fields],
        "first_calls": json_floats(res.first_calls),
        "error": json_floats(res.error),
        "environment": json_floats(res.environment),
        "torch_warnings": res.torch_warnings,
    }


def main(argv: Sequence[str] | None = None, *, _perturb: tuple[str, int] | None = None) -> int:
    """Run the CLI; returns the exit code. ``_perturb`` is the test hook of crosscheck.runner.Perturber."""
    config, args = parse_config(argv)
    from .dynamic_study import run_dynamic_study

    return run_main(PROG, build_parser, lambda: run_dynamic_study(config, progress=not args.quiet, _perturb=_perturb),
                    args.json, json_document, lambda r: result_line(r.fields) if args.quiet else text_report(r))


if __name__ == "__main__":
    exit_after_main(main())
