"""``python -m crosscheck.linear``: quantize one nn.Linear with torch's eager fbgemm flow and with refquant, and
compare every value bit for bit.

With no arguments it runs the seed study::

    torch.manual_seed(0)
    model = QuantStub -> nn.Linear(3, 3) -> DeQuantStub;  model.qconfig = get_default_qconfig("fbgemm")
    prepared = prepare(model);  prepared(torch.randn(1, 2, 3, 3));  quantized = convert(prepared)

then runs 1000 fresh random inputs through both quantized models and the float model.

``--isa auto|vnni|avx2`` chooses the int8 kernel family torch's fbgemm runs (crosscheck.isa: the torch worker starts
with the environment of the target CPU, a probe checks what torch really runs, refquant models it). Phases that take
long (Numba compiling refquant's kernels on the first run, torch's calibration, the forward passes, the figures) say
so on stderr, one line each when stderr is not a terminal; stdout carries only the report (or the JSON of
``--json -``).

``--requantization VARIANT`` (refquant.fixed_point's integer-only variants, a list, or ``all``) adds reported rows:
how many output codes each variant changes, by how much, and why (crosscheck.requantization); never parity rows.
``--export DIR`` writes the converted model end to end as an integer program with test vectors (the same
``ModelComparison.export`` as ``python -m crosscheck.model --export``), with the variant of ``--requantization``.

Exit codes: 0 every parity row equal; 1 any mismatch (the first differing element and both values are printed);
2 bad arguments (a message says what was wrong); 3 the study could not run (the torch side failed; its traceback is
printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

EXIT_EQUAL, EXIT_MISMATCH, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
DISTRIBUTIONS = ("normal", "uniform", "laplace", "outliers", "relu")  # crosscheck.torch_study.draw
ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")  # refquant.engines.ENGINES: every static engine
ISAS = ("auto", "vnni", "avx2")  # crosscheck.isa.ISAS
MAX_ELEMENTS = 1 << 28  # refuse shapes whose single input or weight would not fit comfortably in memory

from .requantization import VARIANTS, parse_variants  # noqa: E402  (no refquant import: --help stays fast)
from .runner import check_export_dir, check_isa, check_json_path, check_shape, emit, unwritable_dir  # noqa: E402
from .worker import exit_after_main  # noqa: E402


def _int_at_least(lowest: int, name: str):
    """argparse type: an int >= lowest, or a message naming the option, what it got and what it expects."""
    expects = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {expects}, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"{name} must be {expects}, got {v}")
        return v
    return parse


EXIT_CODES_EPILOG = ("Exit codes: 0 every parity row equal, 1 any mismatch (first differing element printed), "
                     "2 bad arguments, 3 the study could not run (torch side failed).")
"""The --help epilog of the one-layer CLIs (crosscheck.linear, its --dynamic study, crosscheck.engines)."""


def add_feature_options(p: argparse.ArgumentParser, *, in_features: int, out_features: int) -> None:
    """--in-features K and --out-features N with these defaults (the one-layer CLIs)."""
    p.add_argument("--in-features", type=_int_at_least(1, "--in-features"), default=in_features, metavar="K",
                   help=f"nn.Linear in_features K (default {in_features})")
    p.add_argument("--out-features", type=_int_at_least(1, "--out-features"), default=out_features, metavar="N",
                   help=f"nn.Linear out_features N (default {out_features})")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape must be comma-separated positive integers such as 1,2,3,3, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-shape dimensions must all be >= 1, got {text!r}")
    return dims


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, 2**63), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crosscheck.linear",
        description="Quantize one nn.Linear with torch's eager post-training static quantization (QuantStub -> "
                    "Linear -> DeQuantStub, get_default_qconfig(engine), prepare, calibrate, convert) and with "
                    "refquant from the same float weights and calibration data; compare every value bit for bit. "
                    "With no options: the seed study, nn.Linear(3, 3), calibration on one torch.randn(1, 2, 3, 3) "
                    "batch, seed 0, engine fbgemm.",
        epilog=EXIT_CODES_EPILOG,
    )
    add_feature_options(p, in_features=3, out_features=3)
    p.add_argument("--input-shape", type=_shape, default=None, metavar="D1,...,K",
                   help="shape of one input tensor, comma-separated; the last dimension must equal --in-features "
                        "(default 1,2,3,K)")
    p.add_argument("--calib-batches", type=_int_at_least(1, "--calib-batches"), default=1, metavar="B",
                   help="number of calibration batches, each of --input-shape (default 1)")
    p.add_argument("--calib-dist", choices=DISTRIBUTIONS, default="normal",
                   help="distribution of the calibration batches and of the samples: normal N(0,1); uniform "
                        "U[-1,1); laplace Laplace(0,1); outliers N(0,1) with ~1%% of values x20; relu relu(N(0,1)) "
                        "(default normal)")
    p.add_argument("--samples", type=_int_at_least(0, "--samples"), default=1000, metavar="S",
                   help="fresh random inputs of --input-shape for the error study and the forward-pass parity "
                        "rows (default 1000; 0 skips them)")
    p.add_argument("--seed", type=_seed, default=0, help="torch.manual_seed before the Linear's init, the "
                   "calibration data and the samples (default 0)")
    p.add_argument("--relu", action="store_true", help="Linear + ReLU, fused to LinearReLU before prepare")
    p.add_argument("--no-bias", action="store_true",
                   help="no bias, as nn.Linear(..., bias=False); the bias is still drawn (then removed), so a seed "
                        "gives the same weight, calibration data and samples with and without --no-bias")
    p.add_argument("--engine", choices=ENGINES, default="fbgemm",
                   help="torch.backends.quantized.engine and get_default_qconfig(engine) (default fbgemm; x86 runs "
                        "the same fbgemm kernels for a Linear; qnnpack: per-tensor symmetric weights and "
                        "reduce_range=False; onednn: reduce_range=False, oneDNN's kernel read per call from its "
                        "verbose output)")
    p.add_argument("--isa", choices=ISAS, default="auto",
                   help="the int8 kernel family torch's fbgemm is to run: auto (what this machine runs), vnni "
                        "(AVX-512 VNNI vpdpbusd, exact int32 sums; needs a CPU with AVX-512 VNNI) or avx2 (the "
                        "pre-VNNI vpmaddubsw kernels, which saturate pairs of products to int16; the torch worker "
                        "starts with FBGEMM_ENABLE_INSTRUCTIONS=AVX2). A probe checks what torch really runs, and "
                        "refquant models it (saturate_int16_pairs). Default auto")
    p.add_argument("--requantization", type=parse_variants, default=(), metavar="VARIANT[,VARIANT...]|all",
                   help="also measure how far integer-only requantizations are from torch: " + ", ".join(VARIANTS) +
                        " (refquant.fixed_point; 'all' for every one). Per variant, on the calibration batches and "
                        "on the samples, reported rows (never parity rows: the exit code stays parity's) say how "
                        "many output codes differ from torch's, the histogram of the differences and the cause of "
                        "each (the int32 bias rounding, FBGEMM's exact rounding, TFLite's Q31 multiplier, TFLite's "
                        "second rounding; crosscheck.requantization). With --export: the variant of the program "
                        "(one variant only)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write the converted model end to end as an integer program (refquant.export.export_model, "
                        "as python -m crosscheck.model --export): the QuantStub (scale, zero point, the exact float "
                        "-> code formula), the Linear with every constant of its requantization (the engine's "
                        "float path, or the --requantization variant: bias_i32, requant_multiplier_i32, "
                        "requant_shift), the DeQuantStub, and test vectors of the first batch of samples (of the "
                        "calibration batch with --samples 0): float inputs, input codes, int32 accumulators, "
                        "output codes, float outputs; to DIR/model.npz, model.json and the C header model.h, which "
                        "c/refquant_program.c runs")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the full comparison as JSON to PATH ('-' for stdout, which then replaces the "
                        "text report)")
    p.add_argument("--plots", metavar="DIR", default=None,
                   help="draw PNG figures into DIR (needs matplotlib: pip install 'refquant[plots]')")
    p.add_argument("--quiet", action="store_true",
                   help="print only the result line (and the first mismatch of each differing row); no progress on "
                        "stderr")
    p.add_argument("--dynamic", action="store_true",
                   help="the dynamic study instead: quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), one call "
                        "per sample, every per-call value compared (its options: python -m crosscheck.linear "
                        "--dynamic --help; crosscheck.dynamic)")
    return p


def parse_config(argv: Sequence[str] | None):
    """Parse and validate the options; argparse exits with code 2 and a message on any problem."""
    from .study import StudyConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    shape = args.input_shape if args.input_shape is not None else (1, 2, 3, args.in_features)
    check_shape(parser, tuple(shape), args.in_features, args.out_features)
    check_isa(parser, args.isa)
    if args.plots is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plots needs matplotlib, which is not installed: pip install 'refquant[plots]' "
                         "(or pip install matplotlib)")
        if os.path.exists(args.plots) and not os.path.isdir(args.plots):
            parser.error(f"--plots {args.plots!r} exists and is not a directory")
        problem = unwritable_dir(args.plots, create=True)
        if problem:
            parser.error(f"--plots {args.plots!r}: cannot write figures there ({problem})")
    if args.export is not None and len(args.requantization) > 1:
        parser.error(f"--export writes one program: give one --requantization variant with it, got "
                     f"{','.join(args.requantization)}")
    check_export_dir(parser, args.export)
    check_json_path(parser, args.json)
    config = StudyConfig(in_features=args.in_features, out_features=args.out_features, input_shape=tuple(shape),
                         calib_batches=args.calib_batches, calib_dist=args.calib_dist, samples=args.samples,
                         seed=args.seed, relu=args.relu, bias=not args.no_bias, engine=args.engine, isa=args.isa,
                         requantization=tuple(args.requantization))
    return config, args


def main(argv: Sequence[str] | None = None, *, _perturb: tuple[str, int] | None = None) -> int:
    """Run the CLI; returns the exit code. ``_perturb`` is a test hook (see crosscheck.study.run_study)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(len(a) > 4 and "--dynamic".startswith(a) for a in argv):  # also argparse's abbreviations (--dyn)
        from .dynamic import main as dynamic_main

        return dynamic_main(argv, _perturb=_perturb)
    config, args = parse_config(argv)
    from .report import json_document, quiet_report, text_report
    from .study import run_study
    from .worker import TorchSideError, UsageError

    try:
        result = run_study(config, progress=not args.quiet, plot_data=args.plots is not None, _perturb=_perturb)
    except UsageError as e:  # e.g. an engine this torch build lacks: the torch side says so
        build_parser().print_usage(sys.stderr)
        print(f"python -m crosscheck.linear: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TorchSideError as e:
        print(f"python -m crosscheck.linear: the study could not run: {e}", file=sys.stderr)
        return EXIT_FAILED
    code = EXIT_EQUAL if result.equal else EXIT_MISMATCH

    # files first, so that a closed stdout (piped into `head`) cannot lose them
    if args.export is not None:
        from .progress import Progress

        try:
            with Progress("writing the integer program (--export)", enabled=not args.quiet):
                result.exported = result.comparison.export(
                    args.export, requantization=args.requantization[0] if args.requantization else None)
        except ValueError as e:  # a constant the program's schema refuses (refquant.program): say which, exit 2
            print(f"python -m crosscheck.linear: error: --export {args.export}: {e}", file=sys.stderr)
            return EXIT_USAGE
    figures = []
    if args.plots is not None:
        from .plots import draw_all
        from .progress import Progress

        with Progress("drawing the figures", enabled=not args.quiet):
            figures = draw_all(result, args.plots)
    shown = f"\nfigures: {', '.join(figures)}" if figures else ""
    emit(args.json, lambda: json_document(result),
         lambda: (quiet_report(result) if args.quiet else text_report(result)) + shown)
    return code


if __name__ == "__main__":
    exit_after_main(main())
