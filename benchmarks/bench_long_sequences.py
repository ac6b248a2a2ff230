"""LRA-style efficiency table for the long-sequence variants (issue #4).

For N = 1K..16K (B=1, H=8, E=64, float32) times every variant and measures its peak
traced memory (tracemalloc: NumPy allocations; kernel tile scratch is a few KB per
thread and not included), relative to fastattn's dense kernel. Writes the markdown
table, the numbers as JSON and a plot of time against N (log axes, one line per
variant, the machine, date and commit underneath):

    python benchmarks/bench_long_sequences.py [--sizes 1024 2048 ...] [--repeat 3]
        [--out docs/perf/long-sequences]       # .md, .json and .png are written
    python benchmarks/bench_long_sequences.py --replot docs/perf/long-sequences.json
"""
import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

import fastattn
from fastattn.bench import provenance

# Panels of the plot: (title, variants); dense attention is drawn in each as the yardstick.
FAMILIES = [
    ("block-sparse patterns", ["Local (256, 256)", "Longformer (256, +1 global)",
                               "Sparse Transformer (fixed 128)", "BigBird (block 64, 3 random)"]),
    ("content-based sparsity", ["Reformer (LSH, bucket 64, 1 hash)", "Clustered (100)",
                                "Clustered (100, top-32)", "Sinkhorn (block 64)"]),
    ("low rank and kernelised", ["Linformer (k=256)", "Linear Trans.", "Performer (256)",
                                 "Synthesizer (random)"]),
]
STYLES = [("#0072B2", "o"), ("#E69F00", "s"), ("#009E73", "^"), ("#CC79A7", "D")]

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


def plot(report, path):
    """Time against N on log axes, one panel per family of variants, dense in each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, config, machine = report["results"], report["config"], report["machine"]
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(15, 5.2), sharey=True)
    for ax, (title, names) in zip(axes, FAMILIES):
        for name, (colour, marker) in [("Transformer (dense)", ("black", "x"))] + \
                list(zip(names, STYLES)):
            row = results.get(name, {})
            sizes = sorted(int(n) for n in row)
            if not sizes:
                continue
            dense = name.startswith("Transformer")
            ax.plot(sizes, [row[str(n)]["seconds"] * 1e3 for n in sizes], color=colour,
                    marker=marker, markersize=6, linewidth=1.4 if dense else 1.8,
                    linestyle="--" if dense else "-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(config["sizes"])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda x, _: f"{x / 1024:g}K"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(plain)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("sequence length N (log scale)")
        ax.grid(True, which="major", alpha=0.35)
        ax.legend(fontsize=8.5, loc="upper left")
    axes[0].set_ylabel("time per call (ms, log scale)")
    fig.suptitle(f"Long-sequence variants against dense attention: B={config['B']} "
                 f"H={config['H']} E={config['E']} float32, {config['threads']} threads",
                 fontsize=12)
    caption = (f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs; fastattn "
               f"{machine['fastattn']}, NumPy {machine['numpy']}; measured "
               f"{report.get('date') or 'on an unrecorded date'}, "
               f"{'commit ' + report['commit'] if report.get('commit') else 'commit not recorded'}"
               f"; best of {config['repeat']} runs")
    fig.text(0.01, 0.01, caption, fontsize=8, color="#333333")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="docs/perf/long-sequences")
    parser.add_argument("--replot", metavar="JSON",
                        help="measure nothing: redraw the plot of a saved report")
    args = parser.parse_args()
    if args.replot:
        source = Path(args.replot)
        plot(json.loads(source.read_text()), source.with_suffix(".png"))
        print(f"wrote {source.with_suffix('.png')}")
        return
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

    report = {
        **provenance(),
        "config": {"B": B, "H": H, "E": E, "dtype": "float32", "sizes": list(args.sizes),
                   "repeat": args.repeat, "threads": fastattn.get_num_threads()},
        "command": "python benchmarks/bench_long_sequences.py " + " ".join(sys.argv[1:]),
        "results": {name: {str(n): {"seconds": sec, "peak_bytes": peak, "density": density}
                           for n, (sec, peak, density) in row.items()}
                    for name, row in results.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
