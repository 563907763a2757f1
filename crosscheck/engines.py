"""``python -m crosscheck.engines``: one float Linear and one data set through every static quantized engine of
torch (fbgemm, x86, qnnpack, onednn), compared with refquant bit for bit, and why the engines' outputs differ.

    (a) each engine with its own default qconfig: torch's eager flow vs refquant, every field compared
    (b) every engine with fbgemm's qparams and int8 weights (linear_prepack on each engine): output codes compared
    (c) the dynamic Linear of every engine (quantize_dynamic): float outputs compared
    (d) how many outputs differ between fbgemm and each other engine, and why: refquant swaps one ingredient at a
        time from fbgemm's layer to the other engine's (qparams, weights, accumulation, reciprocal scales, bias
        quantization, multiplier formula, zero point before rounding, saturation; for the dynamic Linear the input
        range, scales, quantize and output formula), and every differing output is attributed to the swaps that
        changed it; what no swap explains is reported as unexplained

The study is in crosscheck.engines_study, the torch side in crosscheck.torch_engines_study. Exit codes as
crosscheck.linear: 0 every parity row of (a), (b), (c) equal, 1 any mismatch, 2 bad arguments, 3 the study could not
run. ``--json PATH|-`` writes the comparison with crosscheck.linear's conventions (:data:`JSON_SCHEMA`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from . import compare as C
from .engines_study import ENGINES, EnginesConfig, EnginesResult
from .isa import INSTRUCTIONS
from .linear import (DISTRIBUTIONS, EXIT_CODES_EPILOG, EXIT_EQUAL, EXIT_MISMATCH, ISAS, add_feature_options,
                     _int_at_least, _seed, _shape)
from .runner import check_isa, check_json_path, check_shape, json_floats, machine_line, result_line, run_main
from .worker import exit_after_main

PROG = "python -m crosscheck.engines"

JSON_SCHEMA = """\
{
  "equal", "exit_code", "fields", "environment", "torch_warnings": as crosscheck.linear's (crosscheck.report);
               every row's name starts with its engine ("qnnpack: input scale") or with "shared qparams, <engine>:"
  "study":     in_features, out_features, input_shape, calib_batches, calib_dist, samples, seed, relu, bias, isa
  "engines":   {engine: {"qconfig", "activation_reduce_range", "weight_qscheme", "input_scale", "input_zero_point",
                "output_scale", "output_zero_point", "parity_rows", "equal", "error_torch", "error_refquant"}}
  "why":       [one per pair (fbgemm, engine): own qconfigs, shared qparams, dynamic: {"name", "from", "to", "compared",
                "outputs", "torch_differ" (torch's own count), "refquant_differ", "max_abs_difference_torch",
                "max_code_difference_torch", "steps": [{"ingredient", "swap", "changed" (outputs that swap
                changed), "sole_cause" (differing outputs only that swap changed)}], "several_causes",
                "unexplained" (outputs where torch's engines are not the chain's ends), "error"}]
  "environment": crosscheck.linear's keys, and "onednn": {"refquant_kernel_family", "refquant_kernels" (calls per
                predicted kernel), "torch_impls" (calls per oneDNN implementation, ONEDNN_VERBOSE), ...}
}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="One float nn.Linear and one data set through torch's four static quantized engines (fbgemm, "
                    "x86, qnnpack, onednn): (a) each with its own default qconfig, torch vs refquant, every field "
                    "compared; (b) all with fbgemm's qparams and int8 weights; (c) each engine's dynamic Linear; "
                    "(d) how many outputs differ between engines and why, attributed by swapping one ingredient at "
                    "a time in refquant.",
        epilog=EXIT_CODES_EPILOG,
    )
    add_feature_options(p, in_features=64, out_features=32)
    p.add_argument("--input-shape", type=_shape, default=None, metavar="D1,...,K",
                   help="shape of one input tensor, comma-separated; the last dimension must equal --in-features "
                        "(default 4,K)")
    p.add_argument("--calib-batches", type=_int_at_least(1, "--calib-batches"), default=4, metavar="B",
                   help="number of calibration batches, each of --input-shape (default 4)")
    p.add_argument("--calib-dist", choices=DISTRIBUTIONS, default="normal",
                   help="distribution of the calibration batches and the samples (as crosscheck.linear; "
                        "default normal)")
    p.add_argument("--samples", type=_int_at_least(0, "--samples"), default=1000, metavar="S",
                   help="fresh random inputs of --input-shape (default 1000)")
    p.add_argument("--seed", type=_seed, default=0, help="torch.manual_seed before the Linear's init and the data "
                   "(default 0)")
    p.add_argument("--relu", action="store_true", help="Linear + ReLU, fused to LinearReLU before prepare")
    p.add_argument("--no-bias", action="store_true", help="no bias, as nn.Linear(..., bias=False)")
    p.add_argument("--isa", choices=ISAS, default="auto",
                   help="the int8 kernel family torch's fbgemm is to run (as crosscheck.linear's --isa; default auto)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the full comparison as JSON to PATH ('-' for stdout, which then replaces the report)")
    p.add_argument("--quiet", action="store_true", help="print only the result line; no progress on stderr")
    return p


def parse_config(argv: Sequence[str] | None) -> tuple[EnginesConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    shape = args.input_shape if args.input_shape is not None else (4, args.in_features)
    check_shape(parser, tuple(shape), args.in_features, args.out_features)
    check_isa(parser, args.isa)
    check_json_path(parser, args.json)
    config = EnginesConfig(in_features=args.in_features, out_features=args.out_features, input_shape=tuple(shape),
                           calib_batches=args.calib_batches, calib_dist=args.calib_dist, samples=args.samples,
                           seed=args.seed, relu=args.relu, bias=not args.no_bias, isa=args.isa)
    return config, args


def _matrix(fields: list[C.Field], prefixes: dict[str, str], title: str) -> list[str]:
    """A parity table with one column per engine: rows are the field names after the engine's prefix."""
    cells: dict[str, dict[str, C.Field]] = {}
    for f in fields:
        if not f.counted:
            continue
        for e, prefix in prefixes.items():
            if f.name.startswith(prefix):
                cells.setdefault(f.name[len(prefix):], {})[e] = f
                break
    if not cells:
        return []
    width = max(len(n) for n in cells) + 2
    L = [title, f"  {'field':<{width}}" + "".join(f"{e:>17}" for e in prefixes)]
    for name, row in cells.items():
        derived = any(f.kind == C.DERIVED for f in row.values())
        line = f"  {name + (' *' if derived else ''):<{width}}"
        for e in prefixes:
            f = row.get(e)
            line += f"{'-':>17}" if f is None else f"{('' if f.equal else 'NO ') + f'{f.mismatches}/{f.size}':>17}"
        L.append(line)
    return L


def _f(v, digits: int = 8) -> str:
    return f"{v:.{digits}f}" if np.isfinite(v) else str(v)


def text_report(res: EnginesResult) -> str:
    cfg, env = res.config, res.environment
    L: list[str] = []
    lin = f"Linear({cfg.in_features}, {cfg.out_features}{'' if cfg.bias else ', bias=False'})"
    if cfg.relu:
        lin = "LinearReLU" + lin[len("Linear"):]
    L.append("crosscheck.engines: one float layer and one data set through every quantized engine, torch vs refquant")
    L.append(f"  model    QuantStub -> {lin} -> DeQuantStub on fbgemm, x86, qnnpack, onednn")
    batches = f"{cfg.calib_batches} calibration batch{'es' if cfg.calib_batches > 1 else ''}"
    L.append(f"  data     seed {cfg.seed}; {batches} of shape {tuple(cfg.input_shape)} ({cfg.calib_dist}); "
             f"{cfg.samples} samples")
    L.append(f"  system   torch {env['torch']}, numpy {env['numpy']}, numba {env['numba']}")
    L.append(machine_line(env))
    family = env["fbgemm_kernel"]
    L.append(f"  kernels  fbgemm, x86: {family} ({INSTRUCTIONS[family]}; probed); qnnpack: SSE2 (exact)")
    od = env["onednn"]
    impls = ", ".join(f"{k} ({v})" for k, v in od["torch_impls"].items())
    preds = ", ".join(f"{k} ({v})" for k, v in od["refquant_kernels"].items())
    L.append(f"           onednn: oneDNN ran {impls} (calls: static own, shared and dynamic; ONEDNN_VERBOSE)")
    L.append(f"           refquant predicted family {od['refquant_kernel_family']}, per chunk of data: {preds}")
    L.append("")

    L.append("(a) each engine with its own default qconfig: get_default_qconfig(engine)")
    L.append(f"  {'engine':<8} {'reduce_range':>12} {'weights':>22} {'s_x':>13} {'z_x':>4} {'s_y':>13} {'z_y':>4} "
             f"{'mean |err|':>11} {'SQNR':>9}")
    for e in ENGINES:
        s = res.engines[e]
        err = s["error_torch"]
        L.append(f"  {e:<8} {str(s['activation_reduce_range']):>12} {s['weight_qscheme']:>22} "
                 f"{str(np.float32(s['input_scale'])):>13} {s['input_zero_point']:>4} "
                 f"{str(np.float32(s['output_scale'])):>13} {s['output_zero_point']:>4} "
                 f"{_f(err['mean_abs']):>11} {err['sqnr_db']:6.2f} dB")
    L.append("  (error against torch's float model over the samples; refquant's numbers are the same bits, a "
             "parity row)")
    L.append("")
    L += _matrix(res.fields, {e: f"{e}: " for e in ENGINES},
                 "  parity, torch vs refquant (mismatches/compared; floats as raw bits):")
    L.append("  * torch's side derived from torch's own integer tensors with exact int64 ops")
    L.append("")
    L += _matrix(res.fields, {e: f"shared qparams, {e}: " for e in ENGINES},
                 "(b) every engine with fbgemm's qparams and int8 weights (linear_prepack on each engine):")
    L.append("")

    L += _matrix(res.fields, {e: f"dynamic, {e}: " for e in ENGINES},
                 "(c) the dynamic Linear of every engine: quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), "
                 "one call per chunk:")
    L.append("")
    L.append("(d) why the engines differ: refquant swaps one ingredient at a time from fbgemm's layer to the other's")
    L.append("    changed: outputs that swap changed; sole cause: outputs that differ between the two engines and")
    L.append("    that only this swap changed (the swap alone reproduces the difference)")
    for ch in res.chains:
        what = ch.compared
        head = f"  {ch.name}: {ch.torch_differ} of {ch.n} {what} differ in torch"
        if ch.torch_differ:
            head += f" (max |diff| {ch.max_abs_torch:.6g}" + (f", {ch.max_code_torch} code)" if ch.codes else ")")
        L.append(head)
        if ch.error:
            L.append(f"    attribution not computed: {ch.error}")
            continue
        if not ch.steps:
            L.append("    the same qparams, weights and arithmetic: nothing to swap")
        else:
            L.append(f"    {'changed':>8} {'sole cause':>10}  swap")
        for (ing, _), label, c, s in zip(ch.steps, ch.labels, ch.changed, ch.sole):
            L.append(f"    {int(c):>8} {int(s):>10}  {label}")
        if ch.steps:
            L.append(f"    {'':>8} {ch.several:>10}  several swaps changed them (interacting causes)")
        L.append(f"    {'':>8} {ch.unexplained:>10}  unexplained: torch's engines are not the chain's ends")
    L.append("")
    L.append(result_line(res.fields))
    return "\n".join(line.rstrip() for line in L)


def json_document(res: EnginesResult) -> dict:
    return {
        "equal": res.equal,
        "exit_code": EXIT_EQUAL if res.equal else EXIT_MISMATCH,
        "study": res.config.to_json(),
        "engines": json_floats(res.engines),
        "fields": [f.to_json() for f in res.fields],
        "why": json_floats([ch.to_json() for ch in res.chains]),
        "environment": json_floats(res.environment),
        "torch_warnings": res.torch_warnings,
    }


def main(argv: Sequence[str] | None = None, *, _perturb: tuple[str, int] | None = None) -> int:
    """Run the CLI; returns the exit code. ``_perturb`` is the test hook of crosscheck.runner.Perturber."""
    config, args = parse_config(argv)
    from .engines_study import run_engines_study

    return run_main(PROG, build_parser, lambda: run_engines_study(config, progress=not args.quiet, _perturb=_perturb),
                    args.json, json_document, lambda r: result_line(r.fields) if args.quiet else text_report(r))


if __name__ == "__main__":
    exit_after_main(main())
