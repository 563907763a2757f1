"""Wall time of ``python -m crosscheck.linear`` (warm Numba cache) against the same study done with torch alone.

    python benchmarks/bench_crosscheck.py [--repeats 7] [-- extra crosscheck options]
    python benchmarks/bench_crosscheck.py --torch-only [crosscheck options]     # the torch-only study by itself

The torch-only study is what a user's script does: build QuantStub -> Linear -> DeQuantStub, prepare, calibrate,
convert, print the model, run the calibration input and the samples through the quantized and the float model, and
print the error (mean |err|, max |err|, SQNR); it uses the same data as crosscheck (same seed, same draws). Both
commands run as fresh processes, alternating, so imports count (torch's import alone is about a second), and the
ratio is taken from the medians. The goal (issue 5, item 8) is crosscheck <= 1.3x torch alone.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
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


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-only":
        sys.path.insert(0, ROOT)
        torch_only_study(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("extra", nargs="*", help="options passed to both (after --)")
    args = p.parse_args()
    crosscheck = [sys.executable, "-m", "crosscheck.linear", *args.extra]
    torch_only = [sys.executable, os.path.join(HERE, "bench_crosscheck.py"), "--torch-only", *args.extra]
    cold, _ = _run(crosscheck)  # fills the Numba cache if it was empty (the first run compiles)
    times: dict[str, list[float]] = {"crosscheck": [], "torch alone": []}
    cpu: dict[str, list[float]] = {"crosscheck": [], "torch alone": []}
    for _ in range(args.repeats):
        for name, cmd in (("crosscheck", crosscheck), ("torch alone", torch_only)):
            wall, cpu_s = _run(cmd)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"study: python -m crosscheck.linear {' '.join(args.extra)}".rstrip())
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"first run (Numba cache possibly cold): {cold:.2f} s")
    for k, v in times.items():
        print(f"{k:<12} wall median {med[k]:.2f} s (min {min(v):.2f}, max {max(v):.2f}, {len(v)} runs); "
              f"CPU median {statistics.median(cpu[k]):.2f} s")
    ratio = med["crosscheck"] / med["torch alone"]
    print(f"wall ratio crosscheck / torch alone: median {ratio:.2f}x, fastest runs "
          f"{min(times['crosscheck']) / min(times['torch alone']):.2f}x (goal <= 1.3x)")
    print(f"CPU ratio: {statistics.median(cpu['crosscheck']) / statistics.median(cpu['torch alone']):.2f}x "
          f"(crosscheck runs torch in a worker process, overlapping refquant's Numba start-up on a second core)")


if __name__ == "__main__":
    main()
