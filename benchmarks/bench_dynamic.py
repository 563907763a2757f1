"""Dynamic quantized Linear: torch.ops.quantized.linear_dynamic vs refquant.DynamicQuantizedLinear, side by side.

For each (M, K, N): a float32 weight (per-tensor symmetric int8 after quantization, torch's default_dynamic_qconfig),
a float32 bias and a float32 input; torch's ``quantized::linear_dynamic`` on the engine (fbgemm by default, with
``reduce_range`` as torch's dynamic Linear module passes it) and refquant's ``DynamicQuantizedLinear(...)(x)`` (the
input's range and quantization, then the fused product + zero-point correction + float output). The script checks
that the float32 outputs are equal bit for bit (exit status 1 if not), alternates torch and refquant within each
of --repeat rounds and prints the medians and their ratio (> 1: refquant is faster), with the CPU and the load.

    python benchmarks/bench_dynamic.py [--repeat 7] [--engine fbgemm] [--shapes 64x1024x1024,1024x1024x1024]
                                       [--threads N] [--clock wall|process] [--breakdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_linear  # noqa: E402  (cpu_model, load_average, parse_shapes, the timing helpers)

DEFAULT_SHAPES = [(1, 1024, 1024), (64, 1024, 1024), (1024, 1024, 1024)]


def _refquant_parts(dq, x) -> dict:
    """The two parts of ``dq(x)`` as callables, each on the same input (for --breakdown): the input passes and the
    fused product (with the first call's codes)."""
    q = dq._quantized_input(x, False)
    formula = f"dynamic_{dq._formula(q['M'])}"
    constants = dq._output_constants(q["input_scale_used"])
    kernel, saturate = dq._product_kernel()

    def fused_product():
        return dq._fused(q["x_padded_u8"], q["input_zero_point"], formula, constants, out_dtype=np.float32,
                         saturate_int16_pairs=saturate, kernel=kernel, row_offsets_i32=q["row_sums"])

    return {"input_passes": lambda: dq._quantized_input(x, False), "fused_product": fused_product}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="rounds per shape; the median is reported")
    parser.add_argument("--seconds", type=float, default=0.1, help="time per measurement within a round")
    parser.add_argument("--engine", default="fbgemm", choices=["fbgemm", "x86", "qnnpack", "onednn"],
                        help="torch.backends.quantized.engine and refquant's engine= (default fbgemm)")
    parser.add_argument("--shapes", default=None, help="comma-separated MxKxN list (default: 1x1024x1024,"
                                                       "64x1024x1024,1024x1024x1024)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and refquant (default: all)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall (default) or process (CPU time; with --threads 1 robust to others' load)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time refquant's two parts of a call, measured alone: the input passes (min/max, "
                             "qparams, quantize with row sums: eqs. DQ1-DQ3) and the fused product with its float "
                             "output (eqs. DQ4, DQ5); the rest of a call is Python")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat and --threads must be >= 1 and --seconds > 0")
    shapes = bench_linear.parse_shapes(parser, args.shapes, DEFAULT_SHAPES)
    if args.threads is not None:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    bench_linear.CLOCK = time.process_time if args.clock == "process" else time.perf_counter

    import torch

    from refquant.dynamic import DynamicQuantizedLinear, default_onednn_kernel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    engine = args.engine
    torch.backends.quantized.engine = engine
    reduce_range = engine in ("fbgemm", "x86")  # torch's dynamic Linear: reduce_range=True except qnnpack/onednn
    load_before = bench_linear.load_average()
    print(f"CPU: {bench_linear.cpu_model()} ({os.cpu_count()} CPUs); load average before: {load_before}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); engine {engine}, reduce_range="
          f"{reduce_range}; median of {args.repeat} alternating rounds; clock: {args.clock}")
    print()
    header = f"{'M, K, N':>18} | {'torch us':>9} | {'refquant us':>11} | {'ratio':>6} | float bits"
    print(header)
    print("-" * len(header))
    results = []
    for M, K, N in shapes:
        rng = np.random.default_rng(M * 1_000_003 + K * 1009 + N)
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        x = rng.standard_normal((M, K)).astype(np.float32)
        kw = {"onednn_kernel": default_onednn_kernel()} if engine == "onednn" else {}
        dq = DynamicQuantizedLinear.from_float(w, bias, engine=engine, reduce_range=reduce_range, **kw)
        wq = torch.quantize_per_tensor(torch.from_numpy(w), float(dq.weight_scales[0]),
                                       int(dq.weight_zero_points[0]), torch.qint8)
        packed = torch.ops.quantized.linear_prepack(wq, torch.from_numpy(bias))
        xt = torch.from_numpy(x)

        def torch_call():
            torch.backends.quantized.engine = engine
            return torch.ops.quantized.linear_dynamic(xt, packed, reduce_range)

        fns = {"torch": torch_call, "refquant": lambda: dq(x)}
        if args.breakdown:
            fns.update(_refquant_parts(dq, x))
        same = bool(np.array_equal(fns["torch"]().numpy().view(np.uint32), fns["refquant"]().view(np.uint32)))
        calls = {k: bench_linear._calls_per_round(f, args.seconds) for k, f in fns.items()}
        seconds = {k: [] for k in fns}
        for _ in range(args.repeat):
            for k, f in fns.items():
                seconds[k].append(bench_linear._seconds_per_call(f, calls[k]))
        median = {k: statistics.median(v) for k, v in seconds.items()}
        ratio = median["torch"] / median["refquant"]
        results.append(dict(M=M, K=K, N=N, engine=engine, same_float_bits=same, ratio=ratio, seconds_median=median,
                            seconds_all=seconds))
        print(f"{f'{M}, {K}, {N}':>18} | {median['torch'] * 1e6:9.0f} | {median['refquant'] * 1e6:11.0f} | "
              f"{ratio:6.2f} | {'equal' if same else 'DIFFER'}")
        if args.breakdown:
            print(f"{'':>18}   refquant: input passes {median['input_passes'] * 1e6:.0f} us, fused product + float "
                  f"output {median['fused_product'] * 1e6:.0f} us, the rest (Python) "
                  f"{(median['refquant'] - median['input_passes'] - median['fused_product']) * 1e6:.0f} us")
        sys.stdout.flush()
    print()
    print("ratio = torch time / refquant time (quantized::linear_dynamic vs DynamicQuantizedLinear.__call__)")
    print(f"load average after: {bench_linear.load_average()}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(cpu=bench_linear.cpu_model(), torch=torch.__version__, engine=engine, clock=args.clock,
                           threads=args.threads, load_before=load_before, load_after=bench_linear.load_average(),
                           results=results), f, indent=1)
        os.replace(tmp, args.json)
    return 0 if all(r["same_float_bits"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
