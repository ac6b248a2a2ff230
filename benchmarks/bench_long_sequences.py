"""LRA-style efficiency table for the long-sequence variants (issue #4).

For N = 1K..16K (B=1, H=8, E=64, float32) times every variant and measures its peak
traced memory (tracemalloc: NumPy allocations; kernel tile scratch is a few KB per
thread and not included), relative to fastattn's dense kernel. Writes the markdown
table and a speed-memory plot:

    python benchmarks/bench_long_sequences.py [--sizes 1024 2048 ...] [--repeat 3]
        [--out docs/guide/long-sequences-efficiency]   # .md and .png are written
"""
import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

import fastattn

B, H, E = 1, 8, 64


def variants(N, rng):
    # name -> (callable, visited-block density or None)
    bigbird = fastattn.bigbird_layout(N, num_heads=H, block_size=64, rng=0)
    feats = fastattn.performer_features(E, 256, rng=0)
    proj = (rng.standard_normal((256, N)) / np.sqrt(N)).astype(np.float32)
    synth = rng.standard_normal((N, N), dtype=np.float32) if N <= 8192 else None
    return {
        "Transformer (dense)": (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v),
                                1.0),
        "Local (256, 256)": (lambda q, k, v: fastattn.local_attention(q, k, v, (256, 256)),
                             None),
        "Longformer (256, +1 global)": (
            lambda q, k, v: fastattn.longformer_attention(q, k, v, 256, [0]), None),
        "Sparse Transformer (fixed 128)": (
            lambda q, k, v: fastattn.strided_attention(q, k, v, 128, mode="fixed"), None),
        "BigBird (block 64, 3 random)": (
            lambda q, k, v: fastattn.block_sparse_attention(q, k, v, bigbird), bigbird.density),
        "Reformer (LSH, bucket 64, 1 hash)": (
            lambda q, k, v: fastattn.lsh_attention(q, v, bucket_size=64, rng=0), None),
        "Clustered (100)": (
            lambda q, k, v: fastattn.clustered_attention(q, k, v, clusters=100, rng=0), None),
        "Clustered (100, top-32)": (
            lambda q, k, v: fastattn.clustered_attention(q, k, v, clusters=100, topk=32, rng=0),
            None),
        "Sinkhorn (block 64)": (
            lambda q, k, v: fastattn.sinkhorn_attention(q, k, v, block_size=64, rng=0), None),
        "Linformer (k=256)": (lambda q, k, v: fastattn.linformer_attention(q, k, v, proj),
                              None),
        "Linear Trans.": (lambda q, k, v: fastattn.linear_attention(q, k, v), None),
        "Performer (256)": (lambda q, k, v: fastattn.performer_attention(q, k, v,
                                                                          features=feats), None),
        "Synthesizer (random)": (
            None if synth is None else (lambda q, k, v: fastattn.synthesizer_attention(
                v, weights=synth)), None),
    }


def measure(fn, args, repeat):
    fn(*args)                                    # warm up
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="docs/guide/long-sequences-efficiency")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}          # name -> {N: (seconds, peak bytes, density)}
    for N in args.sizes:
        q, k, v = (rng.standard_normal((B, H, N, E), dtype=np.float32) for _ in range(3))
        for name, (fn, density) in variants(N, rng).items():
            if fn is None:
                continue
            repeat = 1 if (name.startswith("Transformer") and N >= 8192) else args.repeat
            sec, peak = measure(fn, (q, k, v), repeat)
            results.setdefault(name, {})[N] = (sec, peak, density)
            print(f"N={N:6d} {name:32s} {sec * 1e3:10.1f} ms {peak / 2**20:9.1f} MiB", flush=True)

    dense = results["Transformer (dense)"]
    head = "| Model | " + " | ".join(f"ms {n // 1024}K" for n in args.sizes) + " | " + \
        " | ".join(f"MiB {n // 1024}K" for n in args.sizes) + " |"
    lines = [f"fastattn, B={B}, H={H}, E={E}, float32, {fastattn.get_num_threads()} threads. "
             "Time: best of runs, (speed-up over dense). Memory: peak traced allocations.", "",
             head, "|" + "---|" * (1 + 2 * len(args.sizes))]
    for name, row in results.items():
        times = [f"{row[n][0] * 1e3:.1f} ({dense[n][0] / row[n][0]:.1f}x)" if n in row else "-"
                 for n in args.sizes]
        mems = [f"{row[n][1] / 2**20:.1f}" if n in row else "-" for n in args.sizes]
        lines.append(f"| {name} | " + " | ".join(times + mems) + " |")
    bb = results["BigBird (block 64, 3 random)"]
    lines += ["", "BigBird time / (visited-block fraction x dense time): " + ", ".join(
        f"{n // 1024}K {bb[n][0] / (bb[n][2] * dense[n][0]):.2f} (density {bb[n][2]:.3f})"
        for n in args.sizes)]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max(args.sizes)
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, row in results.items():
        if n in row:
            ax.scatter(row[n][1] / 2**20, dense[n][0] / row[n][0], s=60)
            ax.annotate(name, (row[n][1] / 2**20, dense[n][0] / row[n][0]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak memory (MiB, log)")
    ax.set_ylabel("speed-up over dense fastattn (log)")
    ax.set_title(f"Long-sequence variants at N={n} (B={B}, H={H}, E={E}, float32)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
