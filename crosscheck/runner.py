"""Generic pieces of a crosscheck CLI that runs a torch side and a refquant side and compares them field by field:
used by ``python -m crosscheck.linear --dynamic`` (crosscheck.dynamic) and ``python -m crosscheck.engines``.

* :func:`torch_events`: the torch side of a study in a worker process forked before this process imports torch
  (crosscheck.worker.torch_events, for any torch-side module that defines ``torch_events(config, where)``); only
  NumPy arrays and plain values cross the pipe.
* :class:`Perturber`: the test hook ``_perturb=(field name, flat index)`` that flips the lowest bit of one refquant
  value right before it is compared (crosscheck.study has the same hook for crosscheck.linear).
* :func:`capture_fd` and :func:`onednn_matmul_impls`: oneDNN's verbose lines (C ``printf`` on file
  descriptor 1) read back in the torch worker, so that a study knows which matmul kernel oneDNN ran for each call.
* the parity table, the result line, and writing the report or the JSON (``--json PATH|-``) with crosscheck.linear's
  conventions (crosscheck.report: "equal", "exit_code", "fields", "environment"; exit codes 0/1/2/3).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from . import compare as C
from .worker import TorchSideError, UsageError

__all__ = ["torch_events", "Perturber", "capture_fd", "cpp_warnings", "onednn_matmul_impls", "onednn_impl_kind",
           "ErrorSums", "parity_table", "first_mismatch_line", "result_line", "emit", "UsageError",
           "TorchSideError"]


# ----------------------------------------------------------------------------------------------------------------
# the torch worker, for any torch-side module
# ----------------------------------------------------------------------------------------------------------------

def torch_events(module_name: str, config, *, subprocess: bool | None = None) -> Iterator[tuple[str, Any]]:
    """The events of ``module_name.torch_events(config, where)``: crosscheck.worker.torch_events with that torch
    side (a worker process forked while this process has not imported torch, or this process when torch is
    already loaded and runs the kernel family ``config.isa`` asks for)."""
    from .worker import torch_events as worker_events

    return worker_events(config, subprocess=subprocess, side=f"{module_name}:torch_events")


# ----------------------------------------------------------------------------------------------------------------
# the perturbation hook (tests only)
# ----------------------------------------------------------------------------------------------------------------

def _flip_lsb(value: Any, index: int) -> np.ndarray:
    """A copy of ``value`` with the lowest bit of element ``index`` (flat) flipped (floats: of their bit pattern)."""
    a = np.array(value, copy=True)
    flat = a.reshape(-1)
    if a.dtype.kind == "f":
        u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
        flat.view(u)[index] ^= u(1)
    elif a.dtype.kind in "iu":
        flat[index] ^= a.dtype.type(1)
    elif a.dtype.kind == "b":
        flat[index] = not flat[index]
    else:
        raise TypeError(f"cannot perturb a {a.dtype} value")
    return a


class Perturber:
    """``Perturber((name, index))(name, value)``: flips one bit of element ``index`` of the refquant value of row
    ``name`` (counted over all chunks the row receives, in order); every other value passes unchanged."""

    def __init__(self, spec: tuple[str, int] | None):
        self.name, self.index = spec if spec is not None else (None, 0)
        self.offset = 0
        self.hit = False

    def __call__(self, name: str, value: Any) -> Any:
        if name != self.name or value is None:
            return value
        a = np.asarray(value)
        start = self.offset
        self.offset += a.size
        if start <= self.index < start + a.size:
            self.hit = True
            return _flip_lsb(a, self.index - start)
        return value


# ----------------------------------------------------------------------------------------------------------------
# oneDNN's verbose output, read in the torch worker
# ----------------------------------------------------------------------------------------------------------------

def capture_fd(fn: Callable[[], Any], fd: int = 1) -> tuple[Any, str]:
    """Run ``fn`` with file descriptor ``fd`` (1: stdout, 2: stderr) redirected to a temporary file; returns (fn's
    result, what was written there).

    oneDNN's verbose lines are C ``printf`` output (fd 1), and torch's C++ warnings outside Python's warning
    handler (e.g. qnnpack's "incorrectly ignores reduce_range", TORCH_WARN_ONCE in the op) go to fd 2: neither is
    seen by ``sys.stdout``/``warnings``. Redirecting the descriptor keeps them out of the report (the worker shares
    the parent's stdout and stderr) and lets the study read them."""
    import ctypes
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(fd)
        os.dup2(tmp.fileno(), fd)
        try:
            result = fn()
            libc.fflush(None)
        finally:
            os.dup2(saved, fd)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace")


def cpp_warnings(stderr_text: str) -> list[str]:
    """The messages of torch's C++ warning lines (``[W1201 22:34:32.98 qlinear_dynamic.cpp:251] Warning: ...``)."""
    out = []
    for line in stderr_text.splitlines():
        if "Warning: " in line:
            msg = line.split("Warning: ", 1)[1]
            out.append(msg.rsplit(" (function ", 1)[0].strip())
    return out


def onednn_matmul_impls(verbose_text: str) -> list[str]:
    """The implementation name of every matmul oneDNN executed, in order (``brg_matmul:avx10_1_512_amx``, ...)."""
    return [line.split(",")[6] for line in verbose_text.splitlines() if ",exec,cpu,matmul," in line]


def onednn_impl_kind(impl: str) -> str:
    """What refquant must model for one oneDNN matmul implementation name:

    "amx"      brg_matmul:<isa>_amx: the combined scale f32(s_x'·s_w') (refquant: onednn_kernel "brgemm_amx")
    "vnni"     brg_matmul:<isa> with VNNI (avx512_core_vnni, avx10_*, avx2_vnni, ...): two multiplies ("brgemm")
    "no_vnni"  brg_matmul:avx512_core: two multiplies over int16-saturated pairs (refquant.matmul eq. M2)
    "gemm"     gemm:jit, which oneDNN runs on AVX2 CPUs without VNNI: the combined scale over int16-saturated pairs
               that restart at its second K block (refquant: onednn_kernel "gemm" static, "gemm_no_vnni" dynamic)
    "other"    anything else: not modelled by the studies
    """
    if impl == "gemm:jit":
        return "gemm"
    if not impl.startswith("brg_matmul:"):
        return "other"
    isa = impl.split(":", 1)[1]
    if "amx" in isa:
        return "amx"
    if isa == "avx512_core":
        return "no_vnni"
    return "vnni"


# ----------------------------------------------------------------------------------------------------------------
# error statistics
# ----------------------------------------------------------------------------------------------------------------

class ErrorSums:
    """Error of outputs against a float reference, accumulated chunk by chunk in float64:
    e = f64(y) - f64(y_float); mean |e|, max |e|, SQNR = 10 log10(sum y_float^2 / sum e^2) dB. Both sides of a
    study go through this same code, so equal outputs give equal numbers, bit for bit."""

    def __init__(self) -> None:
        self.n, self.sum_abs, self.max_abs, self.sum_sq_err, self.sum_sq_ref = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, y: np.ndarray, y_float: np.ndarray) -> None:
        """Add outputs ``y`` and their float reference ``y_float`` (any shapes of as many elements)."""
        yf = np.asarray(y_float, np.float64).reshape(-1)
        self.add(np.asarray(y, np.float64).reshape(-1) - yf, yf)

    def add(self, e: np.ndarray, yf: np.ndarray) -> None:
        """Add errors ``e`` and the reference values ``yf`` they are errors of (float64 arrays of one shape)."""
        if e.size == 0:
            return
        abs_e = np.abs(e)
        self.n += e.size
        self.sum_abs += float(abs_e.sum())
        self.max_abs = max(self.max_abs, float(abs_e.max()))
        self.sum_sq_err += float((e * e).sum())
        self.sum_sq_ref += float((yf * yf).sum())

    def result(self) -> dict:
        if self.n == 0:
            return {"n": 0, "mean_abs": math.nan, "max_abs": math.nan, "sqnr_db": math.nan}
        if self.sum_sq_err == 0:
            sqnr = math.inf
        elif self.sum_sq_ref == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)
        return {"n": self.n, "mean_abs": self.sum_abs / self.n, "max_abs": self.max_abs, "sqnr_db": sqnr}

    def as_array(self) -> np.ndarray:
        r = self.result()
        return np.array([r["mean_abs"], r["max_abs"], r["sqnr_db"]], np.float64)


def json_floats(d: Any) -> Any:
    """``d`` with non-finite floats as the strings "nan", "inf", "-inf" (crosscheck.report's JSON convention)."""
    if isinstance(d, dict):
        return {k: json_floats(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_floats(v) for v in d]
    if isinstance(d, (float, np.floating, np.integer, np.bool_)):
        return C.scalar_to_json(d)
    return d


# ----------------------------------------------------------------------------------------------------------------
# the text report's parity table and result line (crosscheck.report's layout)
# ----------------------------------------------------------------------------------------------------------------

def machine_line(env: dict) -> str:
    """Every report's ``machine`` line: torch's CPU capability, AVX-512 VNNI, FBGEMM_ENABLE_INSTRUCTIONS if set."""
    forced = f", FBGEMM_ENABLE_INSTRUCTIONS={env['fbgemm_enable_instructions']}" \
        if env["fbgemm_enable_instructions"] else ""
    vnni = "yes" if env["vnni"] else "no"
    return f"  machine  torch's CPU capability {env['cpu_isa']}, AVX-512 VNNI {vnni}{forced}"


def fmt_scalar(v: Any) -> str:
    v = v[()] if isinstance(v, np.ndarray) else v
    if isinstance(v, np.float32):
        return str(v)
    if isinstance(v, (np.floating, float)):
        return repr(float(v))
    return str(v)


def fmt_value(a: Any, limit: int = 4) -> str:
    """Small arrays inline, larger ones as dtype and shape."""
    if a is None:
        return "None"
    a = np.asarray(a)
    if a.size == 1:
        return fmt_scalar(a.reshape(-1)[0])
    if a.size <= limit:
        return "[" + " ".join(fmt_scalar(v) for v in a.reshape(-1)) + "]"
    return f"{a.dtype} {tuple(a.shape)}"


def field_line(f: C.Field, width: int) -> str:
    """One row: name (``*`` marks a derived row), equal, mismatches/size, the value or its dtype and shape."""
    name = f.name + (" *" if f.kind == C.DERIVED else "")
    if f.kind == C.REFQUANT_ONLY:
        return f"  {name:<{width}}  {'-':<5}  {'':>11}  refquant {fmt_value(f.refquant, 3)}"
    eq = "yes" if f.equal else "NO"
    count = f"{f.mismatches}/{f.size}"
    shown = f"{f.torch_dtype}" + ("" if f.torch_dtype == f.refquant_dtype else f" / {f.refquant_dtype}") + \
        f" {tuple(f.shape) if f.shape is not None else ''}"
    if f.size <= 4 and f.torch is not None:
        inline = f"torch {fmt_value(f.torch)}" + ("" if f.equal else f"  refquant {fmt_value(f.refquant)}")
        if len(inline) <= 60:
            shown = inline
    return f"  {name:<{width}}  {eq:<5}  {count:>11}  {shown}"


def parity_table(fields: list[C.Field], width: int | None = None) -> list[str]:
    """The counted (parity and derived) rows, then the refquant-only rows, as crosscheck.linear prints them."""
    width = width or max([len(f.name) for f in fields] + [20]) + 2
    L = [f"  {'field':<{width}}  {'equal':<5}  {'mismatches':>11}  value"]
    L += [field_line(f, width) for f in fields if f.counted]
    only = [f for f in fields if f.kind == C.REFQUANT_ONLY]
    if only:
        L.append("  refquant only (torch computes these inside its kernels and does not expose them):")
        L += [field_line(f, width) for f in only]
    return L


def first_mismatch_line(f: C.Field) -> str:
    m = f.first_mismatch or {}
    if m.get("index") is None:
        return f"    {f.name}: {m.get('reason', 'differs')}"
    bits = f" (bits {m['torch_bits']} vs {m['refquant_bits']})" if m.get("torch_bits") else ""
    return (f"    {f.name}: {f.mismatches} of {f.size} differ; first at index {tuple(m['index'])}: "
            f"torch {m['torch']!r}, refquant {m['refquant']!r}{bits}")


def result_line(fields: list[C.Field]) -> str:
    """"result: all N parity rows equal, bit for bit", or the MISMATCH line and each differing row's first
    difference."""
    counted = [f for f in fields if f.counted]
    bad = [f for f in counted if not f.equal]
    if not bad:
        return f"result: all {len(counted)} parity rows equal, bit for bit"
    return "\n".join([f"MISMATCH: {len(bad)} of {len(counted)} parity rows differ"] +
                     [first_mismatch_line(f) for f in bad])


def run_main(prog: str, build_parser: Callable, study: Callable[[], Any], json_path: str | None,
             document: Callable[[Any], dict], text: Callable[[Any], str]) -> int:
    """The end of a CLI's ``main``: run ``study()``, then :func:`emit` its JSON ``document(result)`` and report
    ``text(result)``; returns the exit code (crosscheck.linear's: 0 equal, 1 mismatch, 2 the torch side refused the
    options, 3 the torch side failed or the study is not modelled)."""
    from .linear import EXIT_EQUAL, EXIT_FAILED, EXIT_MISMATCH, EXIT_USAGE

    try:
        result = study()
    except UsageError as e:
        build_parser().print_usage(sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (TorchSideError, NotImplementedError) as e:
        print(f"{prog}: the study could not run: {e}", file=sys.stderr)
        return EXIT_FAILED
    emit(json_path, lambda: document(result), lambda: text(result))
    return EXIT_EQUAL if result.equal else EXIT_MISMATCH


def emit(json_path: str | None, document: Callable[[], dict], text: Callable[[], str]) -> None:
    """Write the JSON to ``json_path`` (a file first, so that a closed stdout cannot lose it; ``-``: stdout instead
    of the text report), then the text report; a reader that stops early (``| head``) ends it quietly."""
    if json_path not in (None, "-"):
        with open(json_path, "w") as f:
            json.dump(document(), f, indent=1, allow_nan=False)
            f.write("\n")
    try:
        if json_path == "-":
            json.dump(document(), sys.stdout, indent=1, allow_nan=False)
            sys.stdout.write("\n")
        else:
            print(text())
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ----------------------------------------------------------------------------------------------------------------
# argument checks shared by the CLIs (crosscheck.linear, crosscheck.model, crosscheck.dynamic, crosscheck.engines)
# ----------------------------------------------------------------------------------------------------------------

def unwritable_dir(path: str, *, create: bool) -> str | None:
    """None if a file can be created in directory ``path`` (made first when ``create``), else the reason: checked
    before the study runs, so that a bad --plots or --json path costs nothing. (A real test write, not os.access,
    which says yes to root on a read-only file system.)"""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_json_path(parser, path: str | None) -> None:
    """parser.error (exit code 2) unless ``--json path`` can be written (None and '-' pass): checked before the
    study runs (every crosscheck CLI)."""
    if path in (None, "-"):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        parser.error(f"--json {path!r}: directory {parent!r} does not exist")
    if os.path.isdir(path):
        parser.error(f"--json {path!r} is a directory; give a file path")
    problem = unwritable_dir(parent, create=False)
    if problem:
        parser.error(f"--json {path!r}: cannot write to directory {parent!r} ({problem})")


def check_export_dir(parser, path: str | None) -> None:
    """parser.error unless ``--export DIR`` (crosscheck.linear, crosscheck.model) is a directory that can be made and
    written (None passes)."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"--export {path!r} exists and is not a directory")
    problem = unwritable_dir(path, create=True)
    if problem:
        parser.error(f"--export {path!r}: cannot write there ({problem})")


def check_shape(parser, shape: tuple[int, ...], in_features: int, out_features: int) -> None:
    """parser.error unless ``--input-shape`` has >= 2 dimensions, ends with ``--in-features`` and is not huge."""
    from .linear import MAX_ELEMENTS

    text = ",".join(map(str, shape))
    if len(shape) < 2:
        parser.error(f"--input-shape {text}: give at least 2 dimensions, e.g. 1,{shape[0]} (torch's quantized::"
                     f"linear refuses 1-D input: 'The dimension of input tensor should be larger than or equal to 2')")
    if shape[-1] != in_features:
        parser.error(f"--input-shape {text}: the last dimension ({shape[-1]}) must equal --in-features "
                     f"({in_features})")
    if math.prod(shape) > MAX_ELEMENTS or in_features * out_features > MAX_ELEMENTS:
        parser.error(f"--input-shape {shape} with --out-features {out_features} is too large "
                     f"(more than {MAX_ELEMENTS} elements in one tensor)")


def check_isa(parser, isa: str) -> None:
    if isa == "vnni":
        from .isa import cpu_has_avx512_vnni

        if not cpu_has_avx512_vnni():
            parser.error("--isa vnni: this CPU has no AVX-512 VNNI, so torch's fbgemm cannot run its VNNI kernels "
                         "here (FBGEMM_ENABLE_INSTRUCTIONS can only lower the ISA); use --isa auto or avx2")
