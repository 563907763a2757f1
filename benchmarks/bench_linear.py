"""Quantized Linear: torch.ops.quantized.linear vs refquant, side by side in one process, per engine.

For each engine and (M, K, N) it builds one problem from integer codes (uint8 activations, int8 weights with the
engine's default qscheme: per-channel symmetric, per-tensor for qnnpack; float32 bias), runs
  * torch:    torch.ops.quantized.linear(x, linear_prepack(w, b), s_y, z_y) with torch.backends.quantized.engine;
  * refquant: QuantizedLinear(..., engine=...)(x_u8), the whole call (refquant.fused_linear: the product's tiles with
    the zero-point correction and requantization as their epilogue);
    and its parts: "stages" = requantize(accumulate(x)) (the readable path's two passes, Numba kernels),
    matmul_u8s8_acc32 alone (eq. M1, or eq. M2 where the layer sums int16-saturated pairs); with
    --requantization VARIANT also the fused call with that integer variant and its time relative to the float path's;
checks that torch and refquant give the same output codes, and prints GMAC/s (M*K*N multiply-adds per second) and
the refquant/torch speed ratio (> 1: refquant is faster). torch and refquant alternate within each of --repeat
rounds, so machine load hits both alike, each measurement after an untimed pause that lets the previous one's
spinning threads sleep (SETTLE_SECONDS); each time is the median over the rounds, each ratio the median of the rounds'
ratios. The CPU (lscpu's model name) and the load average before and after are printed.

    python benchmarks/bench_linear.py [--repeat 7] [--engine fbgemm,x86,qnnpack,onednn|all]
                                      [--kernel auto|amx|avx512|avx2|portable|reference] [--requantization tflite]
                                      [--shapes 1x1024x1024,1024x1024x1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

DEFAULT_SHAPES = [(1, 1024, 1024), (64, 1024, 1024), (1024, 1024, 1024), (256, 4096, 4096)]
ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")


def cpu_model() -> str:
    """lscpu's "Model name" (the figures depend on it), or platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def parse_shapes(parser: argparse.ArgumentParser, text: str | None, default: list) -> list[tuple[int, int, int]]:
    """--shapes "64x1024x1024,1x3x3" as (M, K, N) tuples (``default`` when not given); a parser error otherwise."""
    if not text:
        return default
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
        if all(len(s) == 3 and min(s) >= 1 for s in shapes):
            return shapes
    except ValueError:
        pass
    parser.error(f"--shapes must look like 64x1024x1024,1x3x3 (M x K x N, each >= 1), got {text!r}")


def _problem(M: int, K: int, N: int, seed: int) -> dict:
    """Integer codes and float32 scales of one quantized Linear, with an output range that fits the outputs."""
    rng = np.random.default_rng(seed)
    x_u8 = rng.integers(0, 255, (M, K), dtype=np.uint8, endpoint=True)
    w_i8 = rng.integers(-128, 127, (N, K), dtype=np.int8, endpoint=True)
    w_scales = (rng.uniform(0.5, 2.0, N) / 128 / np.sqrt(K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    s_x, z_x = 0.02, 128
    y = ((x_u8.astype(np.float64) - z_x) * s_x) @ (w_i8.astype(np.float64) * w_scales[:, None]).T + bias
    s_y = float(max(y.max() - y.min(), 1e-3) / 255)
    z_y = int(np.clip(round(-y.min() / s_y), 0, 255))
    return dict(x_u8=x_u8, w_i8=w_i8, w_scales=w_scales, bias=bias, s_x=s_x, z_x=z_x, s_y=s_y, z_y=z_y)


def _calls_per_round(fn, target_seconds: float) -> int:
    fn()  # the first call may compile or load kernels
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return int(min(max(1, target_seconds / once), 20000))


CLOCK = time.perf_counter  # --clock process: time.process_time (CPU time of this process: with --threads 1 it
# leaves out the time other processes on a shared machine take from this one)


SETTLE_SECONDS = 0.05
"""Untimed pause before each measurement: torch's OpenMP threads spin after its last call (libgomp's default wait
policy; here ~18 ms of CPU in the 11 ms after it) and refquant's pool threads for 0.5 ms, so without it the function
timed right after torch ran with a core taken by torch's spinning threads (measured here at 64 x 1024 x 1024:
refquant's fused call took 690-900 us right after torch, 490-530 us with OMP_WAIT_POLICY=PASSIVE or after the pause;
torch's own time is unchanged by the pause). Each measurement starts on quiet cores."""


def _seconds_per_call(fn, calls: int) -> float:
    time.sleep(SETTLE_SECONDS)  # the previous function's spinning threads go to sleep (not timed)
    fn()  # and this one's wake up (not timed)
    t0 = CLOCK()
    for _ in range(calls):
        fn()
    return (CLOCK() - t0) / calls


def _median_ratio(numerator_s: list[float], denominator_s: list[float]) -> float:
    """The median over the rounds of each round's time ratio: both were timed one after the other in that round,
    so a burst of load on a shared machine moves both (a ratio of the two medians mixes different rounds)."""
    return statistics.median(a / b for a, b in zip(numerator_s, denominator_s))


def _torch_call(torch, engine: str, p: dict, per_channel: bool):
    """torch's quantized::linear for problem p on ``engine``: the callable and its packed weight."""
    N = p["w_i8"].shape[0]
    torch.backends.quantized.engine = engine
    xq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["x_u8"]), p["s_x"], p["z_x"])
    if per_channel:
        wq = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(p["w_i8"]), torch.from_numpy(p["w_scales"].astype(np.float64)),
            torch.zeros(N, dtype=torch.long), 0)
    else:
        wq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["w_i8"]), float(p["w_scales"][0]), 0)
    packed = torch.ops.quantized.linear_prepack(wq, torch.from_numpy(p["bias"]))

    def call():
        torch.backends.quantized.engine = engine
        return torch.ops.quantized.linear(xq, packed, p["s_y"], p["z_y"])

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="rounds per shape; the median is reported")
    parser.add_argument("--seconds", type=float, default=0.1, help="time per measurement within a round")
    parser.add_argument("--engine", default="fbgemm",
                        help="comma-separated engines among fbgemm, x86, qnnpack, onednn, or 'all' (default fbgemm)")
    parser.add_argument("--kernel", default=None, choices=["auto", "amx", "avx512", "avx2", "portable", "reference"],
                        help="refquant matmul kernel (sets REFQUANT_MATMUL_KERNEL; default: the environment or auto)")
    parser.add_argument("--requantization", default=None, metavar="VARIANT",
                        help="also time refquant's call with this integer requantization (refquant.fixed_point "
                             "VARIANTS, e.g. tflite) and print its time relative to the float path's")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated MxKxN list (default: 1x1024x1024,64x1024x1024,1024x1024x1024,"
                             "256x4096x4096)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both torch (torch.set_num_threads) and refquant (NUMBA_NUM_THREADS); "
                             "default: each library's default (all CPUs)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall (time.perf_counter, default) or process (time.process_time: CPU time; with "
                             "--threads 1 robust to other processes' load)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0:
        parser.error("--repeat must be >= 1 and --seconds > 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads is not None:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # before numba is imported
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    shapes = parse_shapes(parser, args.shapes, DEFAULT_SHAPES)
    engines = ENGINES if args.engine == "all" else tuple(args.engine.split(","))
    if not engines or any(e not in ENGINES for e in engines):
        parser.error(f"--engine must be 'all' or a comma-separated list of {', '.join(ENGINES)}, got {args.engine!r}")
    if args.kernel:
        os.environ["REFQUANT_MATMUL_KERNEL"] = args.kernel

    import numba
    import torch

    from refquant.fixed_point import VARIANTS
    from refquant.linear import QuantizedLinear
    from refquant.matmul import kernel_for, matmul_u8s8_acc32

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.requantization is not None and args.requantization not in VARIANTS:
        parser.error(f"--requantization must be one of {', '.join(VARIANTS)}, got {args.requantization!r}")
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    kernel = f"{kernel_for()} for eq. M1 (exact sums), {kernel_for(saturate_int16_pairs=True)} for eq. M2 (int16 pairs)"
    load_before = load_average()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs); load average before: {load_before}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.config.NUMBA_NUM_THREADS} threads), numpy {np.__version__}")
    print(f"refquant matmul kernel: {kernel}; median of {args.repeat} alternating rounds; GMAC/s = M*K*N / time; "
          f"clock: {args.clock}")
    variant = args.requantization
    results = []
    for engine in engines:
        print()
        print(f"engine {engine}")
        extra = f" | {variant[:10]:>10}" if variant else ""
        header = (f"{'M, K, N':>18} | {'torch':>15} | {'refquant':>15} | {'ratio':>6} || {'stages':>7} | "
                  f"{'matmul':>7}" + extra)
        print(header)
        print(f"{'':>18} | {'GMAC/s':>7} {'us':>7} | {'GMAC/s':>7} {'us':>7} | {'':>6} || {'us':>7} | {'GMAC/s':>7}"
              + (f" | {'x float':>10}" if variant else ""))
        print("-" * len(header))
        per_channel = engine != "qnnpack"  # each engine's default qconfig (refquant.qconfig)
        for M, K, N in shapes:
            p = _problem(M, K, N, seed=M * 1_000_003 + K * 1009 + N)
            if not per_channel:
                p["w_scales"] = np.full(N, p["w_scales"].mean(), np.float32)
            scales = p["w_scales"] if per_channel else float(p["w_scales"][0])
            zps = np.zeros(N, np.int64) if per_channel else 0
            options = {}
            if engine == "onednn":
                from crosscheck.engines_study import OnednnPrediction
                from refquant.dynamic import default_onednn_kernel

                onednn_kernel, saturate, _ = OnednnPrediction(default_onednn_kernel()).kernel(M, K, N)
                options = dict(onednn_kernel=onednn_kernel, saturate_int16_pairs=saturate)
            elif engine in ("fbgemm", "x86"):  # fbgemm's pre-VNNI kernels sum int16-saturated pairs (eq. M2): probed
                from crosscheck.isa import saturate_int16_pairs, torch_fbgemm_kernel_family

                options = dict(saturate_int16_pairs=saturate_int16_pairs(torch_fbgemm_kernel_family()))
            ql = QuantizedLinear.from_quantized(p["w_i8"], scales, zps, p["bias"], p["s_x"], p["z_x"], p["s_y"],
                                                p["z_y"], engine=engine, **options)
            x_u8 = p["x_u8"]
            fns = {
                "torch": _torch_call(torch, engine, p, per_channel),
                "refquant": lambda: ql(x_u8),
            }
            if variant:  # timed right after the float path's call, in the same round
                qv = ql.with_requantization(variant)
                fns["variant"] = lambda: qv(x_u8)
            fns["stages"] = lambda: ql.requantize(ql.accumulate(x_u8))
            fns["matmul"] = lambda: matmul_u8s8_acc32(x_u8, ql._packed_weight,  # the layer's own sums, eq. M1 or M2
                                                      saturate_int16_pairs=ql.saturate_int16_pairs)
            y_torch = fns["torch"]().int_repr().numpy()
            y_refquant = fns["refquant"]()
            same = bool(np.array_equal(y_torch, y_refquant))
            same_stages = bool(np.array_equal(fns["stages"](), y_refquant))
            calls = {name: _calls_per_round(fn, args.seconds) for name, fn in fns.items()}
            seconds = {name: [] for name in fns}
            for _ in range(args.repeat):
                for name, fn in fns.items():  # alternate: every round times each of them once
                    seconds[name].append(_seconds_per_call(fn, calls[name]))
            median = {name: statistics.median(s) for name, s in seconds.items()}
            gmacs = {name: M * K * N / t / 1e9 for name, t in median.items()}
            ratio = _median_ratio(seconds["torch"], seconds["refquant"])
            row = dict(engine=engine, M=M, K=K, N=N, same_output=same, same_as_stages=same_stages, kernel=kernel,
                       ratio=ratio, seconds_median=median, gmacs=gmacs, seconds_all=seconds)
            if variant:
                row["variant"] = variant
                row["variant_time_over_float"] = _median_ratio(seconds["variant"], seconds["refquant"])
            results.append(row)
            shape = f"{M}, {K}, {N}"
            print(f"{shape:>18} | {gmacs['torch']:7.1f} {median['torch'] * 1e6:7.0f} | {gmacs['refquant']:7.1f} "
                  f"{median['refquant'] * 1e6:7.0f} | {ratio:6.2f} || {median['stages'] * 1e6:7.0f} | "
                  f"{gmacs['matmul']:7.1f}" + (f" | {row['variant_time_over_float']:10.2f}" if variant else "")
                  + ("" if same else "   OUTPUTS DIFFER FROM TORCH") + ("" if same_stages else "   FUSED != STAGES"))
            sys.stdout.flush()
    print()
    print("ratio = torch time / refquant time for the whole Linear call (refquant: QuantizedLinear.__call__, fused);")
    print("stages = requantize(accumulate(x)), the two-pass path; matmul = matmul_u8s8_acc32 alone, in the layer's "
          "mode (eq. M2 where it sums int16 pairs); us = microseconds")
    if variant:
        print(f"x float = time of the call with requantization={variant!r} / time of the float path's call")
    print(f"load average after: {load_average()}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(cpu=cpu_model(), torch=torch.__version__, numba=numba.__version__, kernel=kernel,
                           threads=args.threads, clock=args.clock,
                           repeat=args.repeat, load_before=load_before, load_after=load_average(),
                           results=results), f, indent=1)
        os.replace(tmp, args.json)
    return 0 if all(r["same_output"] and r["same_as_stages"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
