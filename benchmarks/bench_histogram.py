"""HistogramObserver: torch 2.13 vs refquant, side by side in one process on the same batches.

Measures
  * forward throughput (Melem/s) on 64K- and 1M-element float32 batches whose range grows with every batch (so
    each call re-bins the old histogram: histc + _upscale_histogram);
  * calculate_qparams time at 2048 bins, on the histograms those runs left (the same for both);
  * the classic micro-benchmark: 100 forward calls on one randn(10, 1, 320, 320) batch, then calculate_qparams;
and prints refquant/torch speed ratios (> 1: refquant is faster). Each figure is the median of --repeat runs;
torch and refquant alternate within a run, so machine load hits both alike. torch is timed with its default
thread count and with one thread (on a loaded machine its OpenMP threads can be many times slower than one); the
headline ratio is against the faster of the two. refquant runs with its defaults (batches of >= 2^18 elements
are counted on all cores, smaller ones on one). The results (scale, zero_point) of the two are also compared,
and a mismatch is reported (exit status 1).

Last, a memory reference on the same 1M-element batches (80 MB of them at --batches 20: not in the cores' own
caches, as in the forward runs): ``x.sum()``, a copy, and one read pass of refquant's (its NaN-ignoring min/max on
all cores). One read is the floor for any forward; refquant's forward reads each batch twice (the min and max
decide the bins, then histc counts). benchmarks/README.md has the figures and what each part costs.

    python benchmarks/bench_histogram.py [--repeat 5] [--batches 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import numpy as np


def _growing_batches(n: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` batches of n float32 normals, the k-th scaled by 1 + 0.05 k: every batch widens the range."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n, dtype=np.float32) * np.float32(1 + 0.05 * k)) for k in range(count)]


def _time_forward(make_observer, batches, wrap) -> tuple[float, object]:
    obs = make_observer()
    inputs = [wrap(b) for b in batches]
    t0 = time.perf_counter()
    for x in inputs:
        obs(x)
    return time.perf_counter() - t0, obs


def _time_calculate_qparams(obs, calls: int) -> tuple[float, tuple]:
    result = obs.calculate_qparams()  # warm
    t0 = time.perf_counter()
    for _ in range(calls):
        result = obs.calculate_qparams()
    return (time.perf_counter() - t0) / calls, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--batches", type=int, default=20, help="growing-range batches per forward run")
    parser.add_argument("--qparams-calls", type=int, default=5, help="calculate_qparams calls per timing")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.batches < 2 or args.qparams_calls < 1:
        parser.error("--repeat and --qparams-calls must be >= 1, --batches >= 2")

    import torch
    from torch.ao.quantization.observer import HistogramObserver as TorchHistogramObserver

    from refquant.histogram import HistogramObserver

    warnings.simplefilter("ignore")  # torch's reduce_range deprecation note

    default_threads = torch.get_num_threads()
    torch_threads = [default_threads] if default_threads == 1 else [default_threads, 1]

    def make_torch():
        return TorchHistogramObserver(reduce_range=True)

    def make_refquant():
        return HistogramObserver(reduce_range=True)

    # compile / warm both (Numba's cache makes later process starts cheap; first-call time is not measured here)
    warm = _growing_batches(4096, 3, seed=0)
    for make, wrap in ((make_torch, torch.from_numpy), (make_refquant, lambda a: a)):
        _, o = _time_forward(make, warm, wrap)
        o.calculate_qparams()

    results: dict = {
        "torch": torch.__version__,
        "torch_threads": torch_threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "repeat": args.repeat,
        "cases": {},
    }
    mismatches = 0

    def record(name: str, torch_s: dict[int, list[float]], ref_s: list[float], unit: str, scale: float) -> None:
        """Medians; ``scale`` turns seconds into the unit (Melem/s: elements/1e6 per run; ms: 1e3)."""
        r = statistics.median(ref_s)
        case = {"unit": unit, "refquant": scale / r if unit == "Melem/s" else r * scale}
        for threads, ts in torch_s.items():
            t = statistics.median(ts)
            case[f"torch_{threads}t"] = scale / t if unit == "Melem/s" else t * scale
            case[f"ratio_vs_torch_{threads}t"] = t / r
        case["ratio"] = min(case[f"ratio_vs_torch_{threads}t"] for threads in torch_s)
        results["cases"][name] = case

    def check(label: str, torch_qparams, ref_qparams) -> None:
        nonlocal mismatches
        s_t, z_t = torch_qparams
        s_r, z_r = ref_qparams
        if not (np.array_equal(s_t.numpy(), s_r) and np.array_equal(z_t.numpy(), z_r)):
            mismatches += 1
            print(f"MISMATCH {label}: torch {s_t.numpy()} {z_t.numpy()} refquant {s_r} {z_r}")

    for n, label in ((1 << 16, "64K"), (1 << 20, "1M")):
        fwd_t = {th: [] for th in torch_threads}
        cq_t = {th: [] for th in torch_threads}
        fwd_r, cq_r = [], []
        for rep in range(args.repeat):
            batches = _growing_batches(n, args.batches, seed=rep + 1)
            dt_r, obs_r = _time_forward(make_refquant, batches, lambda a: a)
            fwd_r.append(dt_r)
            c_r, q_r = _time_calculate_qparams(obs_r, args.qparams_calls)
            cq_r.append(c_r)
            for th in torch_threads:
                torch.set_num_threads(th)
                dt_t, obs_t = _time_forward(make_torch, batches, torch.from_numpy)
                fwd_t[th].append(dt_t)
                c_t, q_t = _time_calculate_qparams(obs_t, args.qparams_calls)
                cq_t[th].append(c_t)
                check(f"{label} rep {rep} ({th} threads)", q_t, q_r)
            torch.set_num_threads(default_threads)
        record(f"forward_{label}_growing", fwd_t, fwd_r, "Melem/s", n * args.batches / 1e6)
        record(f"calculate_qparams_after_{label}", cq_t, cq_r, "ms", 1e3)

    classic_t = {th: [] for th in torch_threads}
    classic_r = []
    for rep in range(args.repeat):
        x = np.random.default_rng(100 + rep).standard_normal((10, 1, 320, 320), dtype=np.float32)
        obs = make_refquant()
        t0 = time.perf_counter()
        for _ in range(100):
            obs(x)
        q_r = obs.calculate_qparams()
        classic_r.append(time.perf_counter() - t0)
        xt = torch.from_numpy(x)
        for th in torch_threads:
            torch.set_num_threads(th)
            obs = make_torch()
            t0 = time.perf_counter()
            for _ in range(100):
                obs(xt)
            q_t = obs.calculate_qparams()
            classic_t[th].append(time.perf_counter() - t0)
            check(f"classic rep {rep} ({th} threads)", q_t, q_r)
        torch.set_num_threads(default_threads)
    record("classic_100_calls_randn_10x1x320x320", classic_t, classic_r, "ms", 1e3)
    results["qparams_mismatches"] = mismatches

    from refquant.histogram import _aminmax_fast

    reference: dict[str, list[float]] = {"x.sum()": [], "np.copyto": [], "one read pass": [], "refquant forward": []}
    for rep in range(args.repeat):
        batches = _growing_batches(1 << 20, args.batches, seed=rep + 1)
        out = np.empty_like(batches[0])
        threads = make_refquant().num_threads
        for name, run in (
            ("x.sum()", lambda b: b.sum()),
            ("np.copyto", lambda b: np.copyto(out, b)),
            ("one read pass", lambda b: _aminmax_fast(b, threads)),
        ):
            t0 = time.perf_counter()
            for b in batches:
                run(b)
            reference[name].append(time.perf_counter() - t0)
        reference["refquant forward"].append(_time_forward(make_refquant, batches, lambda a: a)[0])
    elements = (1 << 20) * args.batches / 1e6
    results["memory_reference_1M_Melem_per_s"] = {k: elements / statistics.median(v) for k, v in reference.items()}

    print(f"torch {results['torch']} ({results['cpu_capability']}), median of {args.repeat} runs; "
          f"ratio = torch time / refquant time")
    heads = [f"torch {th}t" for th in torch_threads]
    print(f"{'case':40s} {'unit':>7s} {'refquant':>9s} " + " ".join(f"{h:>9s}" for h in heads)
          + " " + " ".join(f"{'x vs ' + str(th) + 't':>9s}" for th in torch_threads))
    for name, c in results["cases"].items():
        row = f"{name:40s} {c['unit']:>7s} {c['refquant']:9.2f} "
        row += " ".join(f"{c[f'torch_{th}t']:9.2f}" for th in torch_threads) + " "
        row += " ".join(f"{c[f'ratio_vs_torch_{th}t']:8.1f}x" for th in torch_threads)
        print(row)
    print(f"(scale, zero_point) mismatches: {mismatches}")
    print("memory reference on the 1M-element growing batches, Melem/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in results["memory_reference_1M_Melem_per_s"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
