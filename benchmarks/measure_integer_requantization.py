"""How often do integer-only requantizations give other output codes than torch's float path, by how much, and why?

For random Linear layers calibrated like torch's fbgemm qconfig (refquant.pipeline.ObservedLinear:
HistogramObserver with reduce_range on input and output, per-channel symmetric int8 weights from
QuantizedLinear.from_float), it quantizes fresh inputs, takes the int32 accumulators of eq. L5 and requantizes them
with torch's float path (refquant.linear, == torch) and with every variant of refquant.fixed_point. It prints, per
layer shape, the share of output codes that differ from the float path, the largest difference, and the cause
split obtained by changing one ingredient at a time:

    F   torch's float path: float bias term, f32(raw)·mult, cvtps2dq (RNE)                       (eqs. L8-L11)
    B   + bias rounded to int32 (the variant's rule), float multiply kept       = "float_int32_bias" (eq. I7)
    E   + exact single rounding (half up) of acc·mult_f32: FBGEMM's fixed point  = "fbgemm_fixed_point" (eq. I4)
    S   + TFLite's Q31 multiplier of the double real multiplier, one rounding    = "tflite_single_rounding" (eq. I6)
    D   + TFLite's second rounding (SRDHM, then RoundingDivideByPOT)             = "tflite" (eq. I5)

Each "step" column is the share of codes that change from the previous row; "vs F" columns compare with F.

    python benchmarks/measure_integer_requantization.py [--seeds 10] [--rows 1024] [--shapes 64x32,256x512]
                                                        [--study] [--json out.json]

``--study`` adds the layer of ``python -m crosscheck.linear``'s default study (Linear(3, 3), seed 0, converted by
torch and mirrored bit for bit by refquant; needs torch) on ``--study-samples`` fresh normal inputs of the study's
shape (1, 2, 3, 3) (NumPy, seed 0).

Not part of the test suite (about 25 s on 2 cores); the figures go to the report and docs/numerics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refquant import fixed_point as fp  # noqa: E402
from refquant.pipeline import ObservedLinear  # noqa: E402

SHAPES = [(64, 32), (128, 128), (256, 512), (768, 768), (768, 3072)]   # (in_features K, out_features N)


def _layer(rng: np.random.Generator, k: int, n: int, relu: bool, relu_input: bool, rows: int):
    """A calibrated quantized Linear and the int32 accumulators of fresh inputs."""
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    observed = ObservedLinear(w, b, relu=relu)

    def batch():
        x = rng.standard_normal((rows, k)).astype(np.float32)
        return np.maximum(x, np.float32(0)) if relu_input else x

    for _ in range(4):
        observed.calibrate(batch())
    model = observed.convert()
    raw = model.linear.accumulate(model.quant(batch()))
    return model.linear, raw


def _study(ql, raw) -> dict:
    f = ql.requantize(raw)
    rq = {v: fp.integer_requantization_of(ql, v) for v in fp.VARIANTS}
    b_fb = fp.requantize_integer(raw, rq["float_int32_bias"])
    e_fb = fp.requantize_integer(raw, rq["fbgemm_fixed_point"])
    tfl_bias = rq["tflite"].bias_i32
    b_tfl = fp.requantize_integer(raw, rq["float_int32_bias"].replace(bias_i32=tfl_bias, bias_rule="tflite_legacy"))
    e_tfl = fp.requantize_integer(raw, rq["fbgemm_fixed_point"].replace(bias_i32=tfl_bias, bias_rule="tflite_legacy"))
    s_tfl = fp.requantize_integer(raw, rq["tflite_single_rounding"])
    d_tfl = fp.requantize_integer(raw, rq["tflite"])

    def share(a, b):
        return int((a != b).sum())

    def maxdiff(a):
        return int(np.abs(a.astype(np.int64) - f.astype(np.int64)).max())

    return {
        "codes": int(f.size),
        "bias_i32_differs_fbgemm_vs_tflite": int((rq["fbgemm_fixed_point"].bias_i32 != tfl_bias).sum()),
        "channels": int(tfl_bias.size),
        # chain with FBGEMM's bias rule
        "fb_step_bias": share(b_fb, f), "fb_step_exact": share(e_fb, b_fb),
        # chain with TFLite's bias rule
        "tfl_step_bias": share(b_tfl, f), "tfl_step_exact": share(e_tfl, b_tfl), "tfl_step_q31": share(s_tfl, e_tfl),
        "tfl_step_second": share(d_tfl, s_tfl),
        # each variant against torch's float path
        "vs_f": {"float_int32_bias": share(b_fb, f), "fbgemm_fixed_point": share(e_fb, f),
                 "tflite_single_rounding": share(s_tfl, f), "tflite": share(d_tfl, f)},
        "maxdiff": {"float_int32_bias": maxdiff(b_fb), "fbgemm_fixed_point": maxdiff(e_fb),
                    "tflite_single_rounding": maxdiff(s_tfl), "tflite": maxdiff(d_tfl)},
    }


def _study_layer(samples: int) -> tuple[dict, object]:
    """The default study's layer (torch converts it; refquant's mirror equals it bit for bit) and its raw."""
    from crosscheck.study import StudyConfig, run_study

    config = StudyConfig()
    result = run_study(config)
    if not result.equal:
        raise SystemExit("the study's parity rows are not all equal: refquant's layer is not torch's")
    model = result.refquant
    x = np.random.default_rng(0).standard_normal((samples, *config.input_shape)).astype(np.float32)
    return model.linear, model.linear.accumulate(model.quant(x))


def _shape(text: str) -> tuple[int, int]:
    k, _, n = text.partition("x")
    return int(k), int(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="layers per shape and ReLU setting")
    ap.add_argument("--rows", type=int, default=1024, help="rows per calibration and evaluation batch")
    ap.add_argument("--shapes", type=lambda t: [_shape(v) for v in t.split(",") if v], default=SHAPES,
                    help="layer shapes K x N, comma-separated (default: %(default)s)")
    ap.add_argument("--study", action="store_true", help="also the default study's layer (needs torch)")
    ap.add_argument("--study-samples", type=int, default=100_000, help="inputs for --study")
    ap.add_argument("--json", type=Path, help="write the raw counts here")
    args = ap.parse_args(argv)

    results = []
    if args.study:
        ql, raw = _study_layer(args.study_samples)
        r = _study(ql, raw)
        r["shape"] = "study 3x3"
        results.append(r)
    for k, n in args.shapes:
        total: dict = {}
        for seed in range(args.seeds):
            for relu in (False, True):
                rng = np.random.default_rng([k, n, seed, relu])
                ql, raw = _layer(rng, k, n, relu=relu, relu_input=bool(seed % 2), rows=args.rows)
                r = _study(ql, raw)
                for key, v in r.items():
                    if isinstance(v, dict):
                        sub = total.setdefault(key, {})
                        for kk, vv in v.items():
                            sub[kk] = max(sub.get(kk, 0), vv) if key == "maxdiff" else sub.get(kk, 0) + vv
                    else:
                        total[key] = total.get(key, 0) + v
        total["shape"] = f"{k}x{n}"
        results.append(total)

    def pct(count, codes):
        return f"{count / codes:.1e}" if count else "0"

    print(f"{args.seeds * 2} layers per shape (ReLU off/on), {args.rows} evaluation rows each; shares of output codes")
    print()
    print(f"{'K x N':>10} {'codes':>10} | {'float_int32_bias':>16} {'fbgemm_fixed':>12} {'tflite_1rnd':>12} "
          f"{'tflite':>12} | {'max |diff|':>10}")
    for r in results:
        c = r["codes"]
        v = r["vs_f"]
        print(f"{r['shape']:>10} {c:>10} | {pct(v['float_int32_bias'], c):>16} {pct(v['fbgemm_fixed_point'], c):>12} "
              f"{pct(v['tflite_single_rounding'], c):>12} {pct(v['tflite'], c):>12} | "
              f"{max(r['maxdiff'].values()):>10}")
    print()
    print("cause split (codes changed by each step, as a share of all codes)")
    print(f"{'K x N':>10} | {'FBGEMM: bias':>12} {'exact rnd':>10} | {'TFLite: bias':>12} {'exact rnd':>10} "
          f"{'Q31 mult':>9} {'2nd rnd':>9} | {'bias_i32 fb!=tfl':>16}")
    for r in results:
        c = r["codes"]
        print(f"{r['shape']:>10} | {pct(r['fb_step_bias'], c):>12} {pct(r['fb_step_exact'], c):>10} | "
              f"{pct(r['tfl_step_bias'], c):>12} {pct(r['tfl_step_exact'], c):>10} {pct(r['tfl_step_q31'], c):>9} "
              f"{pct(r['tfl_step_second'], c):>9} | "
              f"{r['bias_i32_differs_fbgemm_vs_tflite']:>7} of {r['channels']:<6}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
