"""Quantized Linear: torch.ops.quantized.linear (fbgemm) vs refquant, side by side in one process.

For each (M, K, N) it builds one problem from integer codes (uint8 activations, per-channel symmetric int8 weights,
float32 bias), runs
  * torch:    torch.ops.quantized.linear(x, linear_prepack(w, b), s_y, z_y) on the fbgemm engine;
  * refquant: QuantizedLinear(...)(x_u8), the whole call (int32 products, zero-point corrections, requantization);
    and its parts: matmul_u8s8_acc32 alone, QuantizedLinear.accumulate and QuantizedLinear.requantize;
checks that the two give the same output codes, and prints GMAC/s (M*K*N multiply-adds per second) and the
refquant/torch speed ratio (> 1: refquant is faster). torch and refquant alternate within each of --repeat rounds,
so machine load hits both alike; each figure is the median over the rounds.

    python benchmarks/bench_linear.py [--repeat 7] [--kernel auto|avx512|portable|reference]
                                      [--shapes 1x3x3,1024x1024x1024] [--json out.json]
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

DEFAULT_SHAPES = [(1, 3, 3), (64, 1024, 1024), (1024, 1024, 1024), (256, 4096, 4096)]


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
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return int(min(max(1, target_seconds / once), 20000))


def _seconds_per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="rounds per shape; the median is reported")
    parser.add_argument("--seconds", type=float, default=0.1, help="time per measurement within a round")
    parser.add_argument("--kernel", default=None, choices=["auto", "avx512", "portable", "reference"],
                        help="refquant matmul kernel (sets REFQUANT_MATMUL_KERNEL; default: the environment or auto)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated MxKxN list (default: 1x3x3,64x1024x1024,1024x1024x1024,256x4096x4096)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0:
        parser.error("--repeat must be >= 1 and --seconds > 0")
    shapes = DEFAULT_SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
            assert all(len(s) == 3 and min(s) >= 1 for s in shapes)
        except (ValueError, AssertionError):
            parser.error(f"--shapes must look like 64x1024x1024,1x3x3 (M x K x N, each >= 1), got {args.shapes!r}")
    if args.kernel:
        os.environ["REFQUANT_MATMUL_KERNEL"] = args.kernel

    import numba
    import torch

    from refquant.linear import QuantizedLinear
    from refquant.matmul import kernel_for, matmul_u8s8_acc32

    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    torch.backends.quantized.engine = "fbgemm"
    kernel = kernel_for()
    print(f"torch {torch.__version__} (fbgemm, {torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.config.NUMBA_NUM_THREADS} threads), numpy {np.__version__}, {platform.processor() or platform.machine()}")
    print(f"refquant matmul kernel: {kernel}; median of {args.repeat} alternating rounds; GMAC/s = M*K*N / time")
    print()
    header = (f"{'M, K, N':>18} | {'torch':>15} | {'refquant':>15} | {'ratio':>6} || {'matmul':>7} | "
              f"{'accumulate':>10} | {'requantize':>10}")
    print(header)
    print(f"{'':>18} | {'GMAC/s':>7} {'us':>7} | {'GMAC/s':>7} {'us':>7} | {'':>6} || {'GMAC/s':>7} | "
          f"{'GMAC/s':>10} | {'us':>10}")
    print("-" * len(header))

    results = []
    for M, K, N in shapes:
        p = _problem(M, K, N, seed=M * 1_000_003 + K * 1009 + N)
        ql = QuantizedLinear(p["w_i8"], p["w_scales"], np.zeros(N, np.int32), p["bias"], p["s_x"], p["z_x"],
                             p["s_y"], p["z_y"])
        xq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(p["x_u8"]), p["s_x"], p["z_x"])
        wq = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(p["w_i8"]), torch.from_numpy(p["w_scales"].astype(np.float64)),
            torch.zeros(N, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(wq, torch.from_numpy(p["bias"]))
        x_u8, acc_i32 = p["x_u8"], ql.accumulate(p["x_u8"])

        fns = {
            "torch": lambda: torch.ops.quantized.linear(xq, packed, p["s_y"], p["z_y"]),
            "refquant": lambda: ql(x_u8),
            "matmul": lambda: matmul_u8s8_acc32(x_u8, ql._packed_weight),
            "accumulate": lambda: ql.accumulate(x_u8),
            "requantize": lambda: ql.requantize(acc_i32),
        }
        y_torch = fns["torch"]().int_repr().numpy()
        y_refquant = fns["refquant"]()
        same = bool(np.array_equal(y_torch, y_refquant))
        calls = {name: _calls_per_round(fn, args.seconds) for name, fn in fns.items()}
        seconds = {name: [] for name in fns}
        for _ in range(args.repeat):
            for name, fn in fns.items():  # alternate: every round times each of them once
                seconds[name].append(_seconds_per_call(fn, calls[name]))
        median = {name: statistics.median(s) for name, s in seconds.items()}
        gmacs = {name: M * K * N / t / 1e9 for name, t in median.items()}
        ratio = median["torch"] / median["refquant"]
        results.append(dict(M=M, K=K, N=N, same_output=same, kernel=kernel, ratio=ratio,
                            seconds_median=median, gmacs=gmacs, seconds_all=seconds))
        shape = f"{M}, {K}, {N}"
        print(f"{shape:>18} | {gmacs['torch']:7.1f} {median['torch'] * 1e6:7.0f} | {gmacs['refquant']:7.1f} "
              f"{median['refquant'] * 1e6:7.0f} | {ratio:6.2f} || {gmacs['matmul']:7.1f} | "
              f"{gmacs['accumulate']:10.1f} | {median['requantize'] * 1e6:10.0f}"
              + ("" if same else "   OUTPUTS DIFFER FROM TORCH"))
        sys.stdout.flush()
    print()
    print("ratio = torch time / refquant time for the whole Linear call (refquant: QuantizedLinear.__call__);")
    print("matmul = matmul_u8s8_acc32 alone; accumulate = matmul + zero-point corrections; us = microseconds per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, numba=numba.__version__, kernel=kernel,
                           repeat=args.repeat, results=results), f, indent=1)
    return 0 if all(r["same_output"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
