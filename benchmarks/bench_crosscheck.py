"""Wall time of a crosscheck study against the same study done with torch alone, warm or cold (fresh install).

    python benchmarks/bench_crosscheck.py [--study linear|model] [--cold] [--repeats 7] [-- extra study options]
    python benchmarks/bench_crosscheck.py --torch-only [--study model] [study options]   # the torch-only study alone

``--study linear`` (default) times ``python -m crosscheck.linear``, ``--study model`` ``python -m crosscheck.model``
(the digits MLP). The torch-only studies are what a user's script does with torch alone, on the same data (same
seed, same draws):

* linear: build QuantStub -> Linear -> DeQuantStub, prepare, calibrate, convert, print the model, run the
  calibration input and the samples through the quantized and the float model, print the error (mean |err|, max
  |err|, SQNR);
* model: build the same float MLP and train it on the same digits split (crosscheck.models.build), fuse, prepare
  with the same qconfig, calibrate on the training images, convert, print the model, run the held-out images
  through both models, print both accuracies and the error.

Both commands run as fresh processes, alternating, so imports count (torch's import alone is about two seconds),
and the ratio is taken from the medians. ``--cold`` gives every crosscheck run a fresh, empty NUMBA_CACHE_DIR: the
first run after an install, which compiles whatever Numba kernels the study needs. Without it a first, untimed
crosscheck run fills the cache and the timed runs are warm. Goals (issue 14): the default linear study <= 3 s cold
and <= 1.0x torch alone warm; the model study <= 1.5x torch alone warm.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def torch_only_study(argv: list[str]) -> None:
    """The study with torch alone (no refquant, no comparison)."""
    import warnings

    import numpy as np
    import torch

    from crosscheck.linear import parse_config
    from crosscheck.torch_study import StudyModel, draw, sample_chunks

    warnings.simplefilter("ignore")
    config, _ = parse_config(argv)
    torch.backends.quantized.engine = config.engine
    torch.manual_seed(config.seed)
    model = StudyModel(torch.nn.Linear(config.in_features, config.out_features, bias=config.bias), config.relu).eval()
    calibration = [draw(config.calib_dist, config.input_shape) for _ in range(config.calib_batches)]
    model.qconfig = torch.ao.quantization.get_default_qconfig(config.engine)
    fused = torch.ao.quantization.fuse_modules(model, [["fc", "relu"]]) if config.relu else model
    prepared = torch.ao.quantization.prepare(fused)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    quantized = torch.ao.quantization.convert(prepared)
    print(quantized)
    print("weight int8:", quantized.fc.weight().int_repr().numpy().tolist())
    with torch.no_grad():
        print("calibration input: float", model(calibration[0]).numpy().reshape(-1)[:18])
        print("                   quantized", quantized(calibration[0]).numpy().reshape(-1)[:18])
        n = sum_abs = max_abs = sum_sq_err = sum_sq_ref = 0.0
        for x in sample_chunks(config.calib_dist, config.input_shape, config.samples):
            yq = quantized(x).numpy().astype(np.float64)
            yf = model(x).numpy().astype(np.float64)
            e = yq - yf
            n += e.size
            sum_abs += float(np.abs(e).sum())
            max_abs = max(max_abs, float(np.abs(e).max()))
            sum_sq_err += float((e * e).sum())
            sum_sq_ref += float((yf * yf).sum())
    if n:
        print(f"error over {config.samples} samples: mean |err| {sum_abs / n:.8f}, max {max_abs:.8f}, "
              f"SQNR {10 * math.log10(sum_sq_ref / sum_sq_err):.2f} dB")


def torch_only_model_study(argv: list[str]) -> None:
    """The model study with torch alone: the same model, data and qconfig as ``python -m crosscheck.model``."""
    import warnings

    import numpy as np
    import torch

    from crosscheck.model import parse_config
    from crosscheck.models import build

    warnings.simplefilter("ignore")
    config, _ = parse_config(argv)
    torch.backends.quantized.engine = config.engine
    built = build(config)  # the float model trained on the same digits split, its calibration and held-out data
    model = built.model.eval()
    fused = torch.ao.quantization.fuse_modules(model, built.fusions) if built.fusions else model
    fused.qconfig = torch.ao.quantization.get_default_qconfig(config.engine)
    prepared = torch.ao.quantization.prepare(fused)
    with torch.no_grad():
        for x in built.calibration:
            prepared(x)
    quantized = torch.ao.quantization.convert(prepared)
    print(quantized)
    n = correct_float = correct_quantized = outputs = 0
    sum_abs = max_abs = sum_sq_err = sum_sq_ref = 0.0
    with torch.no_grad():
        for x, labels in built.evaluation:
            yq = quantized(x).numpy().astype(np.float64)
            yf = model(x).numpy().astype(np.float64)
            if labels is not None:
                n += len(labels)
                correct_float += int((yf.argmax(1) == labels).sum())
                correct_quantized += int((yq.argmax(1) == labels).sum())
            e = yq - yf
            outputs += e.size
            sum_abs += float(np.abs(e).sum())
            max_abs = max(max_abs, float(np.abs(e).max()))
            sum_sq_err += float((e * e).sum())
            sum_sq_ref += float((yf * yf).sum())
    if n:
        print(f"accuracy on {n} held-out images: float {correct_float / n:.4f}, "
              f"quantized {correct_quantized / n:.4f}")
    if sum_sq_err:
        print(f"error: mean |err| {sum_abs / outputs:.8f}, max {max_abs:.8f}, "
              f"SQNR {10 * math.log10(sum_sq_ref / sum_sq_err):.2f} dB")


def _run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _run_cold(cmd: list[str]) -> tuple[float, float]:
    """:func:`_run` with a fresh, empty Numba cache (NUMBA_CACHE_DIR), removed afterwards: a first run after an
    install."""
    with tempfile.TemporaryDirectory(prefix="bench-numba-cache-") as cache:
        return _run(cmd, env=dict(os.environ, NUMBA_CACHE_DIR=cache))


GOALS = {("linear", False): 1.0, ("linear", True): None, ("model", False): 1.5, ("model", True): None}
"""The ratio goal of each (study, cold) figure (issue 14); the cold linear goal is absolute: COLD_GOAL_S."""
COLD_GOAL_S = 3.0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-only":
        sys.path.insert(0, ROOT)
        rest = sys.argv[2:]
        if rest[:2] == ["--study", "model"]:
            torch_only_model_study(rest[2:])
        else:
            torch_only_study(rest[2:] if rest[:2] == ["--study", "linear"] else rest)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=("linear", "model"), default="linear",
                   help="python -m crosscheck.linear (default) or python -m crosscheck.model")
    p.add_argument("--cold", action="store_true",
                   help="every crosscheck run with a fresh, empty NUMBA_CACHE_DIR (the first run after an install)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("extra", nargs="*", help="options passed to both (after --)")
    args = p.parse_args()
    crosscheck = [sys.executable, "-m", f"crosscheck.{args.study}", *args.extra]
    torch_only = [sys.executable, os.path.join(HERE, "bench_crosscheck.py"), "--torch-only", "--study", args.study,
                  *args.extra]
    run_crosscheck = _run_cold if args.cold else _run
    if not args.cold:
        _run(crosscheck)  # fills the Numba cache if it was empty (that first run compiles); not timed
    times: dict[str, list[float]] = {"crosscheck": [], "torch alone": []}
    cpu: dict[str, list[float]] = {"crosscheck": [], "torch alone": []}
    for _ in range(args.repeats):
        for name, cmd, run in (("crosscheck", crosscheck, run_crosscheck), ("torch alone", torch_only, _run)):
            wall, cpu_s = run(cmd)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"study: python -m crosscheck.{args.study} {' '.join(args.extra)}".rstrip() +
          (", cold: a fresh empty NUMBA_CACHE_DIR per run" if args.cold else ", warm Numba cache"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    for k, v in times.items():
        print(f"{k:<12} wall median {med[k]:.2f} s (min {min(v):.2f}, max {max(v):.2f}, {len(v)} runs); "
              f"CPU median {statistics.median(cpu[k]):.2f} s")
    ratio = med["crosscheck"] / med["torch alone"]
    goal = GOALS[args.study, args.cold]
    print(f"wall ratio crosscheck / torch alone: median {ratio:.2f}x, fastest runs "
          f"{min(times['crosscheck']) / min(times['torch alone']):.2f}x" +
          (f" (goal <= {goal}x)" if goal is not None else ""))
    if args.cold and args.study == "linear" and not args.extra:
        print(f"cold crosscheck wall median {med['crosscheck']:.2f} s (goal <= {COLD_GOAL_S} s)")
    print(f"CPU ratio: {statistics.median(cpu['crosscheck']) / statistics.median(cpu['torch alone']):.2f}x "
          f"(crosscheck runs torch in a worker process, overlapping refquant's start-up on a second core)")


if __name__ == "__main__":
    main()
