"""Issue 15's targets in one run, against PyTorch: ``python benchmarks/backward_targets.py``.

Options: ``--threads N`` (default 2: the issue's setting), ``--repeat N`` (rounds,
default 7), ``--length L`` (default 2048), ``--skip-memory``.

Every round times each case once, in the same order (fastattn and PyTorch forward +
``.backward()``, dense and causal; the backward alone; its half-precision variants; the
two dQ strategies at H=1; the SGEMM rate at the same threads), so all cases see the same
machine state; the table gives the median and the range over the rounds, and each
ratio is taken round by round (median, min-max). The memory target runs first, in a fresh
process, because the peak RSS only ever grows. Not an asv module: nothing runs on import.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

MEMORY_CODE = """
import resource, sys, tracemalloc
import numpy as np
import fastattn
L, threads = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
q, k, v, g = (rng.standard_normal((1, 1, L, 64), dtype=np.float32) for _ in range(4))
small = [a[..., :64, :] for a in (q, k, v)]
o, l = fastattn.scaled_dot_product_attention(*small, return_lse=True)
fastattn.scaled_dot_product_attention_backward(g[..., :64, :], *small, o, l)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True,
                                                 num_threads=threads)
grads = fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=True,
                                                       num_threads=threads)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
results = out.nbytes + lse.nbytes + sum(x.nbytes for x in grads)
print(grown * 1024 - results, peak - results, results)
"""


def memory(length, threads):
    """(peak RSS growth, tracemalloc peak) beyond the results, bytes, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEMORY_CODE, str(length), str(threads)],
                          capture_output=True, text=True, check=True)
    rss, traced, results = (int(x) for x in done.stdout.split())
    return rss, traced, results


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cases(length, threads):
    import torch

    import fastattn
    from fastattn import backward as fb

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    H, E = 8, 64
    q, k, v, g = (rng.standard_normal((1, H, length, E), dtype=np.float32) for _ in range(4))
    saved = {}
    for causal in (False, True):
        saved[causal] = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                              return_lse=True)
    half = {}
    for name in ("bfloat16", "float16"):
        dt = fastattn.bfloat16 if name == "bfloat16" else np.float16
        hq, hk, hv, hg = (a.astype(dt) for a in (q, k, v, g))
        out, lse = fastattn.scaled_dot_product_attention(hq, hk, hv, return_lse=True)
        half[name] = (hg, hq, hk, hv, out, lse)
    q1, k1, v1, g1 = (rng.standard_normal((1, 1, 2 * length, E), dtype=np.float32)
                      for _ in range(4))
    o1, l1 = fastattn.scaled_dot_product_attention(q1, k1, v1, return_lse=True)
    tensors = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    tg = torch.tensor(g)
    a2 = rng.standard_normal((2048, 2048), dtype=np.float32)
    c2 = np.empty_like(a2)

    def fa_step(causal):
        def run():
            out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                             return_lse=True,
                                                             num_threads=threads)
            fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse,
                                                           is_causal=causal,
                                                           num_threads=threads)
        return run

    def torch_step(causal):
        def run():
            for t in tensors:
                t.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(*tensors, is_causal=causal)
            out.backward(tg)
        return run

    def fa_backward(causal):
        out, lse = saved[causal]
        return lambda: fastattn.scaled_dot_product_attention_backward(
            g, q, k, v, out, lse, is_causal=causal, num_threads=threads)

    def fa_half(name):
        return lambda: fastattn.scaled_dot_product_attention_backward(*half[name],
                                                                      num_threads=threads)

    def dq_strategy(name):
        def run():
            previous, fb.DQ_STRATEGY = fb.DQ_STRATEGY, name
            try:
                fastattn.scaled_dot_product_attention_backward(g1, q1, k1, v1, o1, l1,
                                                               num_threads=threads)
            finally:
                fb.DQ_STRATEGY = previous
        return run

    def sgemm():
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=threads, user_api="blas"):
            np.matmul(a2, a2, out=c2)

    return {
        "fastattn fwd+bwd dense": fa_step(False), "torch fwd+bwd dense": torch_step(False),
        "fastattn fwd+bwd causal": fa_step(True), "torch fwd+bwd causal": torch_step(True),
        "fastattn bwd dense": fa_backward(False), "fastattn bwd causal": fa_backward(True),
        "fastattn bwd bfloat16": fa_half("bfloat16"), "fastattn bwd float16": fa_half("float16"),
        f"H=1 L={2 * length} bwd, dQ splits": dq_strategy("splits"),
        f"H=1 L={2 * length} bwd, dQ two_pass": dq_strategy("two_pass"),
        "sgemm 2048": sgemm,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    report = {"threads": args.threads, "length": args.length,
              "loadavg_before": open("/proc/loadavg").read().split()[:3]
              if sys.platform.startswith("linux") else None}

    if not args.skip_memory:
        rss, traced, results = memory(16384, args.threads)
        report["memory"] = dict(rss_growth_mib=rss / 2**20, traced_peak_mib=traced / 2**20,
                                results_mib=results / 2**20)
        print(f"L=S=16384 H=1 E=64 causal forward + backward: peak RSS grew "
              f"{rss / 2**20:.1f} MiB, NumPy allocations peaked {traced / 2**20:.1f} MiB "
              f"beyond the {results / 2**20:.1f} MiB of results (target < 64 MiB)")

    runs = cases(args.length, args.threads)
    for fn in runs.values():                    # warm-up: pools, first-touch, caches
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            times[name].append(_seconds(fn))

    L, H, E = args.length, 8, 64
    fwd = 4.0 * H * L * L * E
    flops = {"fastattn bwd dense": 2.5 * fwd, "fastattn bwd causal": 1.25 * fwd,
             "fastattn bwd bfloat16": 2.5 * fwd, "fastattn bwd float16": 2.5 * fwd,
             "sgemm 2048": 2.0 * 2048 ** 3}
    print(f"\n{args.repeat} interleaved rounds, {args.threads} threads, B=1 H=8 L=S={L} E=64 "
          f"float32 unless stated (load average before: {report['loadavg_before']})")
    print(f"{'case':<38}{'median ms':>11}{'min':>9}{'max':>9}{'GFLOP/s':>10}")
    report["cases"] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = flops[name] / med / 1e9 if name in flops else None
        report["cases"][name] = dict(median_s=med, min_s=min(ts), max_s=max(ts), gflops=rate)
        print(f"{name:<38}{med * 1e3:>11.1f}{min(ts) * 1e3:>9.1f}{max(ts) * 1e3:>9.1f}"
              + (f"{rate:>10.1f}" if rate else ""))

    def ratio(label, num, den, target, scale_num=1.0, scale_den=1.0):
        per_round = [scale_num * a / (scale_den * b) for a, b in zip(times[num], times[den])]
        med = statistics.median(per_round)
        report.setdefault("ratios", {})[label] = dict(median=med, min=min(per_round),
                                                      max=max(per_round), target=target)
        verdict = "met" if med >= target else "NOT met"
        print(f"{label:<58}{med:>6.2f}  (rounds {min(per_round):.2f}-{max(per_round):.2f}; "
              f"target >= {target}: {verdict})")

    print()
    ratio("fwd+bwd dense: torch time / fastattn time", "torch fwd+bwd dense",
          "fastattn fwd+bwd dense", 1.3)
    ratio("fwd+bwd causal: torch time / fastattn time", "torch fwd+bwd causal",
          "fastattn fwd+bwd causal", 1.3)
    # backward rate (2.5x forward flops) / SGEMM rate = (2.5 fwd / t_bwd) / (2 n^3 / t_sgemm)
    ratio("backward dense rate / SGEMM rate", "sgemm 2048", "fastattn bwd dense", 0.6,
          scale_num=2.5 * fwd, scale_den=2.0 * 2048 ** 3)
    ratio("backward: causal speed-up over dense", "fastattn bwd dense", "fastattn bwd causal",
          1.8)
    ratio("fwd+bwd: causal speed-up over dense", "fastattn fwd+bwd dense",
          "fastattn fwd+bwd causal", 1.8)
    ratio("backward: bfloat16 speed-up over float32", "fastattn bwd dense",
          "fastattn bwd bfloat16", 1.5)
    ratio("backward: float16 speed-up over float32", "fastattn bwd dense",
          "fastattn bwd float16", 1.5)
    ratio(f"H=1 L={2 * L}: two_pass time / splits time (> 1: splits faster)",
          f"H=1 L={2 * L} bwd, dQ two_pass", f"H=1 L={2 * L} bwd, dQ splits", 1.0)
    report["loadavg_after"] = (open("/proc/loadavg").read().split()[:3]
                               if sys.platform.startswith("linux") else None)
    print(f"load average after: {report['loadavg_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
