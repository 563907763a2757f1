"""``python -m crosscheck.model``: quantize a whole eager model with torch and with refquant from the same float
weights and data, and compare every layer bit for bit (crosscheck.model_study).

With no arguments it trains the digits MLP at start (a second or two, on scikit-learn's bundled ``load_digits``
images), calibrates it on the 1,437 training images, evaluates it on the 360 held-out ones and prints, besides the
layer-by-layer parity, the accuracy of the float model, of torch's quantized model and of refquant's (identical),
and how many predictions quantization flipped. ``--builtin residual`` does the same with a residual MLP
(FloatFunctional.add, an unfused ReLU). ``--model MODULE:FUNCTION`` studies the user's own model.

``--export DIR`` writes the converted model's whole integer program (refquant.export.export_model) with test
vectors that torch reproduces bit for bit (``--requantization VARIANT``: every Linear with that integer variant);
``--requantization`` alone adds reported rows per Linear call (crosscheck.requantization).

Exit codes: 0 every compared row equal; 1 any mismatch (the first divergence is printed: layer, field, index, both
values); 2 bad arguments, files or models (one line saying what and where), or a model --export cannot write; 3 the
torch side failed (its traceback).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

import numpy as np

from .linear import EXIT_EQUAL, EXIT_FAILED, EXIT_MISMATCH, EXIT_USAGE, ENGINES, ISAS, _int_at_least, _seed
from .runner import check_export_dir, check_isa, check_json_path, emit
from .worker import exit_after_main
from .requantization import VARIANTS, parse_variants
from .model_study import BUILTIN_MODELS

PROG = "python -m crosscheck.model"
FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Quantize a whole eager model with torch's post-training static quantization (fuse, prepare "
                    "with get_default_qconfig(engine), calibrate, convert) and with refquant from the same float "
                    "weights and calibration data; compare every layer bit for bit: observer ranges, histograms "
                    "and qparams, int8 weights, scales, zero points, bias, int32 accumulators, output codes. With "
                    "no options: the digits MLP, trained at start on scikit-learn's load_digits images.",
        epilog="Exit codes: 0 every row equal, 1 any mismatch (the first divergence printed), 2 bad arguments, files "
               "or models, 3 the torch side failed. A pickled whole module (torch.save(model)) is unpickled by "
               "torch.load(weights_only=False), which runs whatever code the file names: a file from someone else "
               "can do anything your account can. So --pickled-model needs --trust-pickle; prefer --model "
               "MODULE:FUNCTION with --state-dict, which loads tensors only (weights_only=True).")
    src = p.add_argument_group("the model")
    src.add_argument("--builtin", choices=BUILTIN_MODELS, default=None,
                     help="a built-in model trained at start on load_digits: digits (QuantStub -> Linear(64, 64) + "
                          "ReLU -> Linear(64, 32) + ReLU -> Linear(32, 10) -> DeQuantStub, ReLUs fused) or residual "
                          "(a block x + relu(fc(x)) through FloatFunctional.add, its ReLU unfused). Default digits")
    src.add_argument("--model", metavar="MODULE:FUNCTION", default=None,
                     help="your own model: FUNCTION() in MODULE (imported from the working directory, like "
                          "uvicorn's module:app) returns the float nn.Module, with QuantStub and DeQuantStub, "
                          "already fused where you want fusion; needs --calib")
    src.add_argument("--state-dict", metavar="FILE.pt", default=None,
                     help="weights for --model, written by torch.save(model.state_dict(), FILE); loaded with "
                          "torch.load(FILE, weights_only=True), which reads tensors only, then "
                          "load_state_dict(strict=True)")
    src.add_argument("--pickled-model", metavar="FILE.pt", default=None,
                     help="a whole module written by torch.save(model); needs --trust-pickle (see below) and --calib")
    src.add_argument("--trust-pickle", action="store_true",
                     help="allow --pickled-model: unpickling runs code named in the file (any code: it can delete "
                          "files or send them away), so only for files you made or trust")
    data = p.add_argument_group("the data (for --model / --pickled-model)")
    data.add_argument("--calib", metavar="FILE.npy", default=None,
                      help="calibration inputs, a float32 array (samples, ...) saved with numpy.save; loaded with "
                           "allow_pickle=False")
    data.add_argument("--inputs", metavar="FILE.npy", default=None,
                      help="evaluation inputs, float32 (samples, ...) of the calibration inputs' sample shape")
    p.add_argument("--batch-size", type=_int_at_least(1, "--batch-size"), default=512, metavar="B",
                   help="calibration batch size: the calibration inputs are fed to the observers B samples at a "
                        "time (default 512)")
    p.add_argument("--engine", choices=ENGINES, default="fbgemm",
                   help="torch.backends.quantized.engine and get_default_qconfig(engine) (default fbgemm)")
    p.add_argument("--isa", choices=ISAS, default="auto",
                   help="the int8 kernel family torch's fbgemm is to run: auto, vnni or avx2 (as in "
                        "python -m crosscheck.linear; default auto)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="the built-in models' training seed and data split (default 0)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write the converted model's integer program (refquant.export.export_model: every step's "
                        "constants, int8 weights, multipliers, and test vectors of the first evaluation batch, each "
                        "Linear with the kernel torch's call ran) to DIR/model.npz, model.json and the C header "
                        "model.h; models with FloatFunctional add, mul or cat are not exported (refquant.program)")
    p.add_argument("--requantization", type=parse_variants, default=(), metavar="VARIANT[,VARIANT...]|all",
                   help="also measure, per Linear call, how far integer-only requantizations are from torch: "
                        + ", ".join(VARIANTS) + " ('all' for every one). Reported rows (never parity rows), on "
                        "the calibration and evaluation batches: output codes differing from torch's when the "
                        "call's int32 accumulators (torch's inputs) are requantized by the variant, the histogram "
                        "of the differences and the cause of each (crosscheck.requantization). With --export: "
                        "every Linear of the program runs the variant (one variant only)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the full comparison as JSON to PATH ('-' for stdout, which then replaces the text "
                        "report)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the result line (and the first divergence); no progress on stderr")
    return p


def load_array(parser: argparse.ArgumentParser, option: str, path: str) -> np.ndarray:
    """A float32 (samples, ...) array from a .npy file, or exit 2 with one line saying what is wrong."""
    if not os.path.isfile(path):
        parser.error(f"{option} {path}: no such file")
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as e:
        parser.error(f"{option} {path}: not a plain .npy array ({e}); save one with numpy.save(path, array)")
    except Exception as e:
        parser.error(f"{option} {path}: cannot read it as .npy: {type(e).__name__}: {e}")
    if not isinstance(a, np.ndarray):
        parser.error(f"{option} {path}: holds {type(a).__name__} (an .npz archive?), expected one array saved "
                     f"with numpy.save")
    if a.dtype != np.float32:
        parser.error(f"{option} {path}: dtype {a.dtype}, expected float32 (the model's input); convert with "
                     f"array.astype(numpy.float32)")
    if a.ndim < 2 or a.shape[0] == 0 or 0 in a.shape:
        parser.error(f"{option} {path}: shape {a.shape}, expected (samples, ...) with at least 2 dimensions and "
                     f"no empty one")
    if not np.isfinite(a).all():
        i = tuple(int(v) for v in np.argwhere(~np.isfinite(a))[0])
        parser.error(f"{option} {path}: element {i} is {a[i]!r}; inputs must be finite")
    return np.ascontiguousarray(a)


def parse_config(argv: Sequence[str] | None):
    """Parse and validate the options; exits with code 2 and a message on any problem."""
    from .model_study import ModelConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    user = args.model is not None or args.pickled_model is not None
    if args.builtin is not None and user:
        parser.error("--builtin and --model / --pickled-model exclude each other: pick one model")
    if args.model is not None and args.pickled_model is not None:
        parser.error("--model and --pickled-model exclude each other: pick one model")
    if args.model is not None and not FACTORY.match(args.model):
        parser.error(f"--model {args.model!r}: expected MODULE:FUNCTION, e.g. mymodels:make_model (a module on "
                     f"the path, from the working directory, and a function in it)")
    if args.state_dict is not None:
        if args.model is None:
            parser.error("--state-dict goes with --model MODULE:FUNCTION (the function builds the module, the "
                         "file fills its weights)")
        if not os.path.isfile(args.state_dict):
            parser.error(f"--state-dict {args.state_dict}: no such file")
    if args.pickled_model is not None:
        if not args.trust_pickle:
            parser.error(f"--pickled-model {args.pickled_model}: a pickled module runs code from the file when it "
                         f"is loaded; pass --trust-pickle if you trust the file, or use --model MODULE:FUNCTION "
                         f"with --state-dict (tensors only)")
        if not os.path.isfile(args.pickled_model):
            parser.error(f"--pickled-model {args.pickled_model}: no such file")
    elif args.trust_pickle:
        parser.error("--trust-pickle goes with --pickled-model")
    if user and args.calib is None:
        parser.error("your model needs calibration data: --calib FILE.npy (float32 samples)")
    if not user and (args.calib is not None or args.inputs is not None):
        parser.error("--calib and --inputs are for --model / --pickled-model; the built-in models use load_digits")
    calib = inputs = None
    if args.calib is not None:
        calib = load_array(parser, "--calib", args.calib)
    if args.inputs is not None:
        inputs = load_array(parser, "--inputs", args.inputs)
        if inputs.shape[1:] != calib.shape[1:]:
            parser.error(f"--inputs {args.inputs}: samples of shape {inputs.shape[1:]}, but --calib's are "
                         f"{calib.shape[1:]}")
    check_isa(parser, args.isa)
    if args.export is not None and len(args.requantization) > 1:
        parser.error(f"--export writes one program: give one --requantization variant with it, got "
                     f"{','.join(args.requantization)}")
    check_export_dir(parser, args.export)
    check_json_path(parser, args.json)
    config = ModelConfig(model="user" if user else (args.builtin or "digits"), engine=args.engine, isa=args.isa,
                         seed=args.seed, factory=args.model,
                         state_dict=args.state_dict, pickled=args.pickled_model,
                         trust_pickle=args.trust_pickle, calib=calib, inputs=inputs, calib_path=args.calib,
                         inputs_path=args.inputs, batch_size=args.batch_size,
                         requantization=tuple(args.requantization))
    return config, args


def main(argv: Sequence[str] | None = None, *, _perturb: tuple[str, int] | None = None) -> int:
    """Run the CLI; returns the exit code. ``_perturb`` is a test hook (see crosscheck.model_study)."""
    config, args = parse_config(argv)
    from .model_report import json_document, quiet_report, text_report
    from .model_study import run_model_study
    from .worker import TorchSideError, UsageError

    try:
        result = run_model_study(config, progress=not args.quiet, _perturb=_perturb)
    except UsageError as e:  # a model or file the torch side could not use: one line, exit 2
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TorchSideError as e:
        print(f"{PROG}: the study could not run: {e}", file=sys.stderr)
        return EXIT_FAILED
    code = EXIT_EQUAL if result.equal else EXIT_MISMATCH
    export_error = None
    if args.export is not None:
        try:
            result.exported = result.comparison.export(
                args.export, requantization=args.requantization[0] if args.requantization else None)
        except ValueError as e:  # refquant.program does not export this model (QFunctional add, mul, cat)
            export_error = f"{PROG}: error: --export {args.export}: {e}"
    emit(args.json, lambda: json_document(result), lambda: quiet_report(result) if args.quiet else text_report(result))
    if export_error is not None:
        print(export_error, file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    exit_after_main(main())
