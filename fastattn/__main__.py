"""`python -m fastattn`: run attention on a realistic workload and report how it went.

Checks the fused kernel against the float64 reference, then times it against the
plain NumPy formula on the same arrays and reports time, GFLOP/s and the speed-up.
"""
import argparse
import sys
import time

import numpy as np

import fastattn
from fastattn import reference
from fastattn.bench import attention_flops, numpy_attention, progress_bar


def _best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048, help="L = S")
    parser.add_argument("--dim", type=int, default=64, help="head dimension E = Ev")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-causal", action="store_true", help="dense instead of causal")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is drawn only on a terminal anyway)")
    args = parser.parse_args(argv)

    causal = not args.no_causal
    B, H, L, E = args.batch, args.heads, args.length, args.dim
    dtype = np.dtype(args.dtype)
    print(f"fastattn {fastattn.__version__}: B={B} H={H} L=S={L} E={E} {dtype} "
          f"{'causal' if causal else 'dense'}, {fastattn.get_num_threads() if args.threads is None else args.threads} threads")

    bar = progress_bar(2 + 2 * args.repeat, enabled=not args.no_progress, desc="making inputs")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float64).astype(dtype) for _ in range(3))
    bar.update()
    bar.set_description_str("checking against the float64 reference")
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, num_threads=args.threads)
    expected = reference.scaled_dot_product_attention(q, k, v, is_causal=causal)
    err = float(np.abs(out - expected).max() / max(np.abs(expected).max(), 1e-300))
    tol = 2e-4 if dtype == np.float32 else 1e-10
    bar.update()

    def fused():
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, num_threads=args.threads)

    t_fused = []
    t_numpy = []
    for _ in range(args.repeat):           # interleaved so both see the same machine state
        bar.set_description_str("timing fastattn")
        t_fused.append(_best_time(fused, 1))
        bar.update()
        bar.set_description_str("timing plain NumPy")
        t_numpy.append(_best_time(lambda: numpy_attention(q, k, v, causal), 1))
        bar.update()
    bar.close()

    flops = attention_flops(B, H, L, L, E, E, causal)
    best_fused, best_numpy = min(t_fused), min(t_numpy)
    print(f"max error vs reference : {err:.2e} (relative to max |out|; tolerance {tol:g})")
    print(f"fastattn               : {best_fused * 1e3:9.2f} ms  {flops / best_fused / 1e9:8.1f} GFLOP/s")
    print(f"plain NumPy            : {best_numpy * 1e3:9.2f} ms  {flops / best_numpy / 1e9:8.1f} GFLOP/s")
    print(f"speed-up over NumPy    : {best_numpy / best_fused:9.2f}x")
    if not err <= tol:
        print("ERROR: the result does not match the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
