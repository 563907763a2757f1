"""``python -m crosscheck.explain GOLDEN THEIRS``: which arithmetic another implementation's output codes follow.

GOLDEN is a golden file written by ``python -m crosscheck.model --export DIR``, ``crosscheck.linear``'s export or
refquant.export (a layer or a whole model with its test vectors), its ``.json`` or its ``.npz``. THEIRS holds the
other implementation's output codes for those vectors: a ``.npy`` of integers, or a text file of whitespace- or
comma-separated integers, one row per vector. A thin command over :func:`refquant.explain` (see refquant/explain.py
for the variants and the rule that an element is explained only by a variant verified to reproduce it).

Exit codes: 0 their codes equal the golden's or every differing code is explained; 1 something stays unexplained;
2 bad input (a file that is not a golden file, codes of the wrong shape, dtype or range), one line naming the file
and what is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .worker import exit_after_main

PROG = "python -m crosscheck.explain"
EXIT_EXPLAINED, EXIT_UNEXPLAINED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """One line: the file and what is wrong with it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Explain, element by element, how another implementation's output codes differ from a "
                    "refquant golden file: every modelled variant (integer requantizations and their int32-bias "
                    "rules, the other engines' formulas, int16-saturating pre-VNNI kernels, QuantStub roundings, a "
                    "zero point off by one or the input zero point's sign flipped, and combinations of two) is "
                    "run on the golden program and scored against their codes. An element is explained only by a "
                    "variant verified to reproduce it; everything else is reported as unexplained with its "
                    "intermediates.",
        epilog="exit codes: 0 equal or fully explained, 1 something unexplained, 2 bad input (one line naming the "
               "file). Example: python -m crosscheck.model --export out && python -m crosscheck.explain "
               "out/model.json my_port_codes.txt --json why.json",
)
    p.add_argument("golden", metavar="GOLDEN", help="the golden file (.json or .npz) written by --export / "
                                                    "refquant.export: a layer or a model with its test vectors")
    p.add_argument("theirs", metavar="THEIRS", help="their output codes for the golden's test vectors: .npy of "
                                                    "integers, or text: whitespace- or comma-separated integers, one "
                                                    "row per vector (for a model ending in DeQuantStub: the codes it "
                                                    "dequantizes)")
    p.add_argument("--their-input-codes", metavar="FILE", default=None,
                   help="their QuantStub's codes of the golden's float inputs (same formats): separates their input "
                        "rounding from the rest")
    p.add_argument("--their-accumulators", metavar="FILE", default=None,
                   help="their int32 accumulators of the last linear step (same formats); a variant must reproduce "
                        "them too")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the whole report as JSON (keys: differing, explained, best_variant, variants, "
                        "elements, ...); '-' prints it instead of the text report")
    p.add_argument("--elements", metavar="N", type=int, default=5, help="differing elements shown on screen "
                                                                         "(default 5; the JSON has all)")
    return p


_SEPARATORS = re.compile(r"[\s,]+")


def read_integers(path: str, what: str) -> np.ndarray:
    """A ``.npy`` of integers, or text rows of whitespace- or comma-separated integers (one row per vector)."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{path}: {what}: no such file")
    if p.suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise BadInput(f"{path}: {what}: not a readable .npy file ({e})") from None
        if a.dtype.kind not in "iu":
            raise BadInput(f"{path}: {what} must be integers, got dtype {a.dtype}")
        return a
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise BadInput(f"{path}: {what}: not text (give a .npy or whitespace/comma-separated integers)") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = [t for t in _SEPARATORS.split(line.strip()) if t]
        if not tokens:
            continue
        try:
            rows.append([int(t) for t in tokens])
        except ValueError:
            bad = next(t for t in tokens if not re.fullmatch(r"[+-]?\d+", t))
            raise BadInput(f"{path}:{lineno}: {what} must be integers, got {bad!r}") from None
    if not rows:
        raise BadInput(f"{path}: {what}: no integers in the file")
    if len({len(r) for r in rows}) != 1:
        raise BadInput(f"{path}: {what}: rows of different lengths ({sorted({len(r) for r in rows})})")
    return np.array(rows, np.int64)


def _write_json(path: str, document: dict) -> None:
    from refquant.export import _write_atomically

    data = (json.dumps(document, indent=1, allow_nan=False) + "\n").encode()
    _write_atomically({Path(path): lambda f: f.write(data)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json not in (None, "-"):
        parent = Path(args.json).resolve().parent
        if not parent.is_dir() or Path(args.json).is_dir():
            parser.error(f"--json {args.json!r}: not a writable file path")
    from refquant.explain import ExplainInputError, explain
    from refquant.export import GoldenFileError
    from refquant.program import load_program

    try:
        if Path(args.golden).suffix not in (".json", ".npz"):
            raise BadInput(f"{args.golden}: not a golden file (give its .json or .npz)")
        try:
            program = load_program(args.golden)
        except FileNotFoundError:
            raise BadInput(f"{args.golden}: no such golden file") from None
        except GoldenFileError as e:
            raise BadInput(f"{args.golden}: not a golden file: {e}") from None
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
            raise BadInput(f"{args.golden}: not a golden file ({type(e).__name__}: {e})") from None
        inputs = {"their_codes": (args.theirs, "their codes")}
        if args.their_input_codes:
            inputs["their_input_codes"] = (args.their_input_codes, "their input codes")
        if args.their_accumulators:
            inputs["their_accumulators"] = (args.their_accumulators, "their accumulators")
        arrays = {k: read_integers(path, what) for k, (path, what) in inputs.items()}
        try:
            report = explain(program, arrays.pop("their_codes"), **arrays)
        except ExplainInputError as e:
            msg = str(e)
            path = next((p for k, (p, w) in inputs.items() if msg.startswith(w)), args.theirs)
            raise BadInput(f"{path}: {msg}") from None
    except BadInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    document = report.to_json()
    document["exit_code"] = EXIT_EXPLAINED if report.unexplained == 0 else EXIT_UNEXPLAINED
    if args.json not in (None, "-"):
        _write_json(args.json, document)  # before the text: a closed stdout cannot lose it
    try:
        if args.json == "-":
            json.dump(document, sys.stdout, indent=1, allow_nan=False)
            sys.stdout.write("\n")
        else:
            print(report.render(max_elements=max(args.elements, 0)))
        sys.stdout.flush()
    except BrokenPipeError:  # a reader that stops early (| head): end quietly, as crosscheck.runner.emit does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return document["exit_code"]


if __name__ == "__main__":
    exit_after_main(main())
