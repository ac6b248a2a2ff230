"""Side-by-side speed comparison of fastattn against its peers: ``python -m fastattn.bench``.

Runs the standard workloads (dense, causal and bool-masked attention, B=1, H=8,
E=64, float32 by default or ``--dtype`` float64/float16/bfloat16, over a range of
sequence lengths) with

- ``fastattn``    -- :func:`fastattn.scaled_dot_product_attention`;
- ``numpy``       -- the unfused NumPy formula (:func:`numpy_attention`; float32/64:
  NumPy's float16 matmul is ~300x slower and its bfloat16 one returns float32);
- ``torch_sdpa``  -- ``torch.nn.functional.scaled_dot_product_attention``, when
  PyTorch is importable (it picks its fused CPU kernel);
- ``torch_math``  -- the same call forced onto PyTorch's unfused math path;
- ``onnxruntime`` -- a one-node ``com.microsoft`` MultiHeadAttention model (its CPU
  flash kernel; 3-D ``(B, L, H*E)`` operands, float32/float16), when onnxruntime and
  onnx are importable;
- ``openvino``    -- a one-node opset-13 ``scaled_dot_product_attention`` model on
  ``CPU``, when openvino is importable (float32 and float16 at the f32 inference
  precision, bfloat16 at bf16: OpenVINO's default on CPUs with bf16 support is bf16
  even for float32 models);
- ``jax``         -- ``jax.nn.dot_product_attention`` under ``jax.jit``, when JAX is
  importable (float32, bfloat16).

The peers are optional: only those importable and supporting the dtype run by
default. Each gets the arrays in its own layout and dtype, converted before timing.

Every system gets the same arrays (``torch.from_numpy`` shares the memory) and the
same thread count; runs are interleaved so all systems see the same machine
state, and medians are reported with GFLOP/s, the fraction of this machine's
SGEMM rate and fastattn's speed-up over each system. Writes ``bench.json`` and,
when matplotlib is importable, ``bench.png`` (time and fastattn's speed-up against
sequence length, with the machine, date and commit in the caption); ``--replot
bench.json`` redraws the figure from saved numbers.

``--suite peers`` runs a different table instead: the eight workloads of issue 20
(dense, causal, key padding, BERT-like, head_dim 128, GQA, decode through
``scaled_dot_product_attention`` and through ``paged_attention``) against every CPU
peer installed (PyTorch SDPA, ONNX Runtime MultiHeadAttention/GroupQueryAttention,
OpenVINO SDPA, JAX ``jax.nn.dot_product_attention``), printed as a Markdown table of
each peer's time over fastattn's (:func:`run_suite`); ``--suite wide`` adds head_dim
80, 96 and 256, ``--suite peers,wide`` runs both.

This module also holds the pieces shared by ``python -m fastattn`` and the asv
suite in ``benchmarks/``: the FLOP convention, the NumPy formula, the machine
baselines (SGEMM rate, memory bandwidth) and the progress bar.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import fastattn
from fastattn._bench_peers import relative_error, seconds

__all__ = ["attention_flops", "numpy_attention", "sgemm_gflops", "memory_bandwidth_gbs",
           "run_comparison", "run_suite", "provenance", "progress_bar", "main"]

SYSTEMS = ("fastattn", "numpy", "torch_sdpa", "torch_math", "onnxruntime", "openvino", "jax")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# The dtypes each system computes in (on the CPU).
SYSTEM_DTYPES = {
    "fastattn": DTYPES,
    "numpy": ("float32", "float64"),
    "torch_sdpa": DTYPES,
    "torch_math": DTYPES,
    "onnxruntime": ("float32", "float16"),      # MultiHeadAttention has no bf16 CPU kernel
    "openvino": ("float32", "float16", "bfloat16"),
    "jax": ("float32", "bfloat16"),             # XLA's CPU dot has no float16 x float16
}
KINDS = ("dense", "causal", "mask")
# Systems that materialise the (H, L, S) scores and so are skipped past a memory budget.
# Each system is timed in one block per workload: WARMUP_RUNS untimed runs that absorb
# what the previous system left behind (its OpenMP/BLAS threads still spinning;
# fastattn and torch each bring their own pool) and wake this system's threads, then
# the timed runs back to back. The order of the systems rotates from workload to
# workload. Alternating single runs was measured to slow whichever system ran second
# by up to 2x, and idle pauses let a VM's vCPUs fall asleep, which costs milliseconds.
WARMUP_RUNS = 2
UNFUSED_SYSTEMS = ("numpy", "torch_math")
FULL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (256, 512, 1024, 2048)
MASK_KEEP_PROBABILITY = 0.9


def attention_flops(batch, heads, L, S, E, Ev, causal):
    """FLOPs of one attention forward pass, by the flash-attention convention.

    ``2·L·S·(E + Ev)`` per head (the two matrix products; softmax and exp are not
    counted), halved when causal.

    Parameters
    ----------
    batch, heads : int
        Batch size and number of query heads.
    L, S : int
        Query and key sequence lengths.
    E, Ev : int
        Head dimension of query/key and of value.
    causal : bool
        Whether only the lower triangle of the scores is computed.

    Returns
    -------
    float
        The FLOP count.

    Examples
    --------
    >>> from fastattn.bench import attention_flops
    >>> attention_flops(1, 8, 2048, 2048, 64, 64, causal=False) / 1e9
    8.589934592
    >>> attention_flops(1, 8, 2048, 2048, 64, 64, causal=True) / 1e9
    4.294967296
    """
    flops = 2.0 * batch * heads * L * S * (E + Ev)
    return flops / 2 if causal else flops


def numpy_attention(q, k, v, causal=False, mask=None):
    """The unfused attention formula as people write it in NumPy, in the inputs' dtype.

    ``softmax(q @ k.T / sqrt(E) + mask) @ v`` with the full ``(..., L, S)`` score
    matrix in memory: the baseline fastattn's fused kernel is measured against.

    Parameters
    ----------
    q : ndarray, shape (..., L, E)
    k : ndarray, shape (..., S, E)
    v : ndarray, shape (..., S, Ev)
    causal : bool, default=False
        Query ``i`` sees keys ``j <= i`` (top-left aligned, like PyTorch).
    mask : ndarray of bool, optional
        Broadcastable to ``(..., L, S)``; True = the key takes part.

    Returns
    -------
    ndarray, shape (..., L, Ev)

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.bench import numpy_attention
    >>> q = k = np.eye(2, dtype=np.float32)
    >>> v = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> numpy_attention(q, k, v, causal=True).round(4)
    array([[1.    , 0.    ],
           [0.3302, 0.6698]], dtype=float32)
    """
    scores = q @ np.swapaxes(k, -1, -2) * q.dtype.type(1 / np.sqrt(q.shape[-1]))
    if causal:
        L, S = scores.shape[-2:]
        scores = np.where(np.tri(L, S, dtype=bool), scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores @ v


def sgemm_gflops(n=2048, repeat=3):
    """This machine's float32 matrix-multiply rate through NumPy's BLAS, in GFLOP/s.

    The best of ``repeat`` timed ``a @ b`` products of two ``(n, n)`` float32
    matrices (after one warm-up), counted as ``2·n³`` FLOPs. The attention targets
    are stated as a fraction of this rate, measured in the same run.

    Parameters
    ----------
    n : int, default=2048
        Matrix size.
    repeat : int, default=3
        Timed products; the fastest counts.

    Returns
    -------
    float

    Examples
    --------
    >>> from fastattn.bench import sgemm_gflops
    >>> sgemm_gflops(n=64, repeat=1) > 0
    True
    """
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    best = min(seconds(lambda: np.matmul(a, b, out=c)) for _ in range(repeat))
    return 2.0 * n ** 3 / best / 1e9


def memory_bandwidth_gbs(nbytes=256 * 2 ** 20, threads=None, repeat=5):
    """This machine's read memory bandwidth, STREAM-style, in GB/s (10⁹ bytes/s).

    Reads a float32 array much larger than the caches, split into one contiguous
    chunk per thread, with ``np.maximum.reduce`` (one cheap vector operation per
    element; NumPy releases the GIL in it), and counts the bytes read. The threads
    start each pass together, and a pass lasts from the first start to the last
    finish. Reading is what decode attention does with its KV cache, so this is the
    ceiling paged attention is measured against.

    Parameters
    ----------
    nbytes : int, default=256 MiB
        Size of the array read.
    threads : int, optional
        Reading threads; default :func:`fastattn.get_num_threads`.
    repeat : int, default=5
        Timed passes; the fastest counts.

    Returns
    -------
    float

    Notes
    -----
    A sum is not a pure read: NumPy's pairwise float32 summation reads about 25 GB/s
    on one Zen 4 core where the maximum reads 31 (thread CPU time), so a summing
    baseline under-measures a machine whose memory can feed each core faster.

    Examples
    --------
    >>> from fastattn.bench import memory_bandwidth_gbs
    >>> memory_bandwidth_gbs(nbytes=2 ** 20, threads=1, repeat=1) > 0
    True
    """
    threads = fastattn.get_num_threads() if threads is None else threads
    data = np.ones(nbytes // 4, dtype=np.float32)          # written, so every page is faulted in
    chunks = np.array_split(data, threads)
    start_together = threading.Barrier(threads)

    def read(chunk):
        start_together.wait()
        start = time.perf_counter()
        np.maximum.reduce(chunk)
        return start, time.perf_counter()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        def one_pass():
            spans = list(pool.map(read, chunks))
            return max(end for _, end in spans) - min(start for start, _ in spans)
        one_pass()
        best = min(one_pass() for _ in range(repeat))
    return data.nbytes / best / 1e9


def run_comparison(lengths=QUICK_LENGTHS, kinds=KINDS, *, systems=None, batch=1, heads=8,
                   dim=64, dtype="float32", repeat=5, threads=None,
                   max_unfused_bytes=4 * 2 ** 30, progress=True):
    """Time every system on every workload, interleaved, and collect the numbers.

    Parameters
    ----------
    lengths : sequence of int
        Sequence lengths ``L = S`` to run.
    kinds : sequence of {"dense", "causal", "mask"}
        Workload kinds; "mask" is a random bool ``(L, S)`` mask (90 % kept, the
        diagonal always kept) broadcast over heads.
    systems : sequence of str, optional
        A subset of ``fastattn.bench.SYSTEMS``; default every one that is importable
        and computes in ``dtype`` (``fastattn.bench.SYSTEM_DTYPES``).
    batch, heads, dim : int
        Shape ``(batch, heads, L, dim)`` of q, k and v.
    dtype : {"float32", "float64", "float16", "bfloat16"}
    repeat : int, default=5
        Timed runs per system and workload, after one untimed warm-up.
    threads : int, optional
        Thread count for every system; default :func:`fastattn.get_num_threads`.
    max_unfused_bytes : int, default=4 GiB
        The unfused systems (numpy, torch_math) are skipped on workloads whose
        estimated transient memory (three score-sized arrays) exceeds this.
    progress : bool, default=True
        Draw a progress bar on stderr (only when stderr is a terminal).

    Returns
    -------
    dict
        ``machine`` (platform, CPU, libraries), ``config``, ``sgemm_gflops``,
        ``memory_bandwidth_gbs`` and ``rows``: one dict per workload and system
        with ``kind``, ``length``, ``system``, ``median_s``, ``min_s``,
        ``gflops``, ``sgemm_fraction``, ``fastattn_speedup`` (this system's
        median over fastattn's) and ``max_rel_diff`` (from fastattn's output).
        Skipped pairs have ``median_s`` None and a ``skipped`` reason.

    Examples
    --------
    >>> from fastattn.bench import run_comparison
    >>> result = run_comparison([32], ["causal"], systems=["fastattn", "numpy"],
    ...                         heads=1, repeat=1, progress=False)
    >>> [(row["system"], row["median_s"] > 0) for row in result["rows"]]
    [('fastattn', True), ('numpy', True)]
    >>> result["rows"][1]["max_rel_diff"] < 1e-4
    True
    """
    dtype = _dtype(dtype)
    threads = fastattn.get_num_threads() if threads is None else threads
    runners = _runners(systems, threads, dtype)
    workloads = [(kind, L) for L in lengths for kind in kinds]
    bar = progress_bar(len(workloads) * (len(runners) + 1) + 2, enabled=progress)

    bar.set_description_str("measuring the SGEMM rate and memory bandwidth")
    with _blas_threads(threads):
        sgemm = sgemm_gflops()
    bandwidth = memory_bandwidth_gbs(threads=threads)
    bar.update()

    rows = []
    rotation = 0
    for kind, L in workloads:
        q, k, v, mask = _workload_arrays(kind, batch, heads, L, dim, dtype)
        causal = kind == "causal"
        unfused_bytes = 3 * batch * heads * L * L * dtype.itemsize
        active = {name: run for name, run in runners.items()
                  if name not in UNFUSED_SYSTEMS or unfused_bytes <= max_unfused_bytes}
        bar.set_description_str(f"{kind} L={L}: warm-up")
        outputs = {name: _result(run, run(q, k, v, causal, mask))
                   for name, run in active.items()}
        times = {}
        names = list(active)
        order = names[rotation % len(names):] + names[:rotation % len(names)]
        rotation += 1                             # so that no system always runs first
        for name in order:
            run = active[name]
            bar.set_description_str(f"{kind} L={L}: {name}")
            for _ in range(WARMUP_RUNS):
                run(q, k, v, causal, mask)
            times[name] = [seconds(lambda: run(q, k, v, causal, mask)) for _ in range(repeat)]
            bar.update()
        bar.update()
        flops = attention_flops(batch, heads, L, L, dim, dim, causal)
        reference = outputs.get("fastattn")
        fastattn_median = statistics.median(times["fastattn"]) if "fastattn" in times else None
        for name in runners:
            row = {"kind": kind, "length": L, "system": name}
            if name not in active:
                row.update(median_s=None, skipped=f"needs ~{unfused_bytes / 2 ** 30:.1f} GiB")
            else:
                median = statistics.median(times[name])
                row.update(
                    median_s=median, min_s=min(times[name]), gflops=flops / median / 1e9,
                    sgemm_fraction=flops / median / 1e9 / sgemm,
                    fastattn_speedup=None if fastattn_median is None else median / fastattn_median,
                    max_rel_diff=None if reference is None else relative_error(
                        outputs[name], reference))
            rows.append(row)
    bar.set_description_str("done")
    bar.update()
    bar.close()
    return {
        **provenance(),
        "config": {"batch": batch, "heads": heads, "dim": dim, "dtype": dtype.name,
                   "threads": threads, "repeat": repeat, "lengths": list(lengths),
                   "kinds": list(kinds), "systems": list(runners)},
        "sgemm_gflops": sgemm,
        "memory_bandwidth_gbs": bandwidth,
        "rows": rows,
    }


def run_suite(suites=("peers",), *, systems=None, repeat=9, threads=None, warmup=2,
              rounds=3, progress=True):
    """Time fastattn and every installed CPU peer on a named suite of workloads.

    The suite ``"peers"`` is the table of issue 20, float32: dense B=1 H=8 L=S=2048
    E=64; causal, same; a key padding mask B=4 H=8 L=S=1024 E=64; BERT-like B=32 H=12
    L=S=128 E=32; head_dim 128; GQA 32/8 heads L=S=1024 E=128 causal; decode B=8 Hq=32
    Hkv=8 L=1 S=4096 E=128 through :func:`fastattn.scaled_dot_product_attention`
    (``enable_gqa=True``) and the same decode through :func:`fastattn.paged_attention`
    (the peers then run their contiguous-cache decode). ``"wide"`` is dense attention at
    head_dim 80, 96 and 256.

    The peers are PyTorch (``torch.nn.functional.scaled_dot_product_attention``), ONNX
    Runtime (one-node ``com.microsoft`` MultiHeadAttention, or GroupQueryAttention for
    GQA, decode and causal self-attention), OpenVINO (an opset-13 ``scaled_dot_product_attention`` node at f32
    precision) and JAX (``jax.nn.dot_product_attention`` under ``jax.jit``), each with
    the same thread count. None of them is required: a peer that is not installed is
    reported as such. Every system's first output is compared with the float64
    reference (``fastattn.reference``) before it is timed; a peer that fails to
    build, fails to run or disagrees is shown so in the table and not timed. The
    ``repeat`` timed runs of each system and workload are taken in ``rounds`` rounds;
    in each round every system runs as one block (untimed warm-up runs, then its timed
    runs back to back: the peers' thread pools interfere when single runs alternate),
    the order rotating from round to round and workload to workload, so that a change
    in the machine's load falls on every system.

    Parameters
    ----------
    suites : sequence of {"peers", "wide", "small"}, default ("peers",)
    systems : sequence of str, optional
        A subset of ``"fastattn", "torch", "onnxruntime", "openvino", "jax"`` (fastattn
        always runs); default all.
    repeat : int, default=9
        Timed runs per system and workload (the median counts).
    threads : int, optional
        Thread count for every system; default :func:`fastattn.get_num_threads`.
    warmup : int, default=2
        Untimed runs before each system's timed ones in the first round (half as many,
        at least one, in the later rounds).
    rounds : int, default=3
        Rounds the timed runs are split into.
    progress : bool, default=True
        Draw a progress bar on stderr (only when stderr is a terminal).

    Returns
    -------
    dict
        ``machine``, ``date``, ``commit`` (:func:`provenance`), ``config``,
        ``load_average`` (before and after), ``sgemm_gflops``,
        ``memory_bandwidth_gbs``, ``systems`` (each one's title, whether installed,
        version and configuration) and ``rows``: per workload its ``label``, fastattn's
        ``gflops`` and ``sgemm_fraction`` (decode: ``gbs`` and
        ``bandwidth_fraction``), ``cells`` (per system: ``status`` "ok", "n/a",
        "not installed", "build failed", "run failed" or "wrong", and when timed
        ``median_s``, ``min_s``, ``max_s`` and ``ratio``, the peer's median over
        fastattn's), ``fastest_peer``, ``fastest_peer_ratio`` and ``target_met``
        (that ratio >= 1.15).

    Examples
    --------
    The ``"small"`` suite has every kind of workload at tiny shapes (for checking,
    not for timing):

    >>> from fastattn.bench import run_suite
    >>> result = run_suite(["small"], systems=["fastattn"], repeat=1, progress=False)
    >>> [(row["workload"], row["cells"]["fastattn"]["status"]) for row in result["rows"]]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('dense', 'ok'), ('causal', 'ok'), ('padding', 'ok'), ('gqa', 'ok'),
     ('decode', 'ok'), ('decode_paged', 'ok')]
    """
    from fastattn._bench_peers import run_peer_suite
    return run_peer_suite(list(suites), systems=systems, repeat=repeat, threads=threads,
                          warmup=warmup, rounds=rounds, progress=progress)


def main(argv=None):
    """Command line of ``python -m fastattn.bench``: run, print the table, write the files.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``); ``--help`` lists them.

    Returns
    -------
    int
        The exit status, 0 on success.

    Examples
    --------
    >>> import contextlib, io, tempfile
    >>> from pathlib import Path
    >>> from fastattn.bench import main
    >>> out = tempfile.mkdtemp()
    >>> with contextlib.redirect_stdout(io.StringIO()):
    ...     status = main(["--lengths", "32", "--kinds", "dense", "--heads", "1",
    ...                    "--repeat", "1", "--systems", "fastattn,numpy", "--no-plot",
    ...                    "--no-progress", "--out", out])
    >>> status
    0
    >>> sorted(p.name for p in Path(out).iterdir())
    ['bench.json']
    """
    args = _parse_args(argv)
    if args.replot:
        source = Path(args.replot)
        out_dir = source.parent if args.out is None else Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        png_path = _plot(json.loads(source.read_text()), out_dir / "bench.png")
        print(f"wrote {png_path}" if png_path else "matplotlib is not installed: no plot")
        return 0 if png_path else 1
    if args.suite:
        return _main_suite(args, argv)
    result = run_comparison(
        args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS), args.kinds,
        systems=args.systems, batch=args.batch, heads=args.heads, dim=args.dim,
        dtype=args.dtype, repeat=args.repeat or (3 if args.quick else 7),
        threads=args.threads, progress=not args.no_progress)
    result["command"] = "python -m fastattn.bench " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(_format_table(result))
    out_dir = Path(args.out or "bench-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = _plot(result, out_dir / "bench.png")
        print(f"wrote {png_path}" if png_path else "matplotlib is not installed: no plot")
    return 0


def _main_suite(args, argv):
    """``--suite``: run the named suites, print the Markdown table, write suite.json and
    suite.md."""
    from fastattn._bench_peers import format_markdown
    result = run_suite(args.suite, systems=args.systems, repeat=args.repeat or 9,
                       threads=args.threads, rounds=args.rounds, progress=not args.no_progress)
    command = "python -m fastattn.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    text = f"`{command.strip()}`\n\n" + format_markdown(result)
    print(text)
    out_dir = Path(args.out or "bench-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "suite.md").write_text(text + "\n")
    print(f"\nwrote {out_dir / 'suite.json'} and {out_dir / 'suite.md'}")
    return 0


# --- systems ----------------------------------------------------------------------

def _dtype(name):
    if str(name) not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return np.dtype(fastattn.bfloat16) if str(name) == "bfloat16" else np.dtype(name)


def _runners(systems, threads, dtype=np.dtype(np.float32)):
    """``name -> run(q, k, v, causal, mask)`` for the requested, available systems.

    A runner may return its result in its own layout or dtype: ``run.result`` (when
    present) turns it into a NumPy ``(B, H, L, Ev)`` array for the comparison.
    """
    torch = _import_torch()
    importable = {"torch_sdpa": torch is not None, "torch_math": torch is not None,
                  "onnxruntime": _importable("onnxruntime", "onnx"),
                  "openvino": _importable("openvino"), "jax": _importable("jax", "jaxlib")}
    available = [s for s in SYSTEMS if importable.get(s, True)]
    if systems is None:
        systems = [s for s in available if dtype.name in SYSTEM_DTYPES[s]]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    missing = [s for s in systems if s not in available]
    if missing:
        raise ValueError(f"{missing} are not importable here (PyTorch, onnxruntime and onnx, "
                         f"openvino, jax)")
    unsupported = [s for s in systems if dtype.name not in SYSTEM_DTYPES[s]]
    if unsupported:
        raise ValueError(f"{unsupported} do not compute in {dtype.name}: "
                         + "; ".join(f"{s}: {', '.join(SYSTEM_DTYPES[s])}" for s in unsupported))

    def run_fastattn(q, k, v, causal, mask):
        return fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal,
                                                     num_threads=threads)

    def run_numpy(q, k, v, causal, mask):
        with _blas_threads(threads):
            return numpy_attention(q, k, v, causal, mask)

    makers = {"fastattn": lambda: run_fastattn, "numpy": lambda: run_numpy,
              "torch_sdpa": lambda: _torch_runners(torch, threads)["torch_sdpa"],
              "torch_math": lambda: _torch_runners(torch, threads)["torch_math"],
              "onnxruntime": lambda: _onnxruntime_runner(threads),
              "openvino": lambda: _openvino_runner(threads),
              "jax": lambda: _jax_runner(threads)}
    return {name: makers[name]() for name in systems}


def _importable(*modules):
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _result(run, out):
    """A runner's output as a NumPy (B, H, L, Ev) array of its own (copied if need be)."""
    convert = getattr(run, "result", None)
    return np.asarray(out) if convert is None else convert(out)


def _torch_runners(torch, threads):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def tensor(a):
        if a.dtype == fastattn.bfloat16:       # torch has no ml_dtypes: share the bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)                              # shared memory, no copy

    def call(q, k, v, causal, mask):
        torch.set_num_threads(threads)
        tensors = [tensor(a) for a in (q, k, v)]
        tmask = None if mask is None else torch.from_numpy(mask)
        with torch.inference_mode():
            out = sdpa(*tensors, attn_mask=tmask, is_causal=causal)
        if out.dtype == torch.bfloat16:
            return out.view(torch.int16).numpy().view(fastattn.bfloat16)
        return out.numpy()

    def call_math(q, k, v, causal, mask):
        with sdpa_kernel(SDPBackend.MATH):
            return call(q, k, v, causal, mask)

    return {"torch_sdpa": call, "torch_math": call_math}


class _PreparedInputs:
    """The arrays of the last workload converted to a peer's layout, by identity: each
    workload converts once, outside the timed calls."""

    def __init__(self, convert):
        self.convert, self.key, self.value = convert, None, None

    def __call__(self, *arrays):
        if self.key is None or any(a is not b for a, b in zip(arrays, self.key)):
            self.key, self.value = arrays, self.convert(*arrays)
        return self.value


def _onnxruntime_runner(threads):
    """ONNX Runtime's com.microsoft MultiHeadAttention (its CPU flash kernel) on 3-D
    ``(B, L, H*E)`` operands; causal = ``unidirectional``, the bool mask an additive
    ``(1, 1, L, S)`` attention_bias. One session per shape, dtype and kind."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    sessions = {}

    def session(B, H, L, S, E, Ev, dtype, causal, masked):
        key = (B, H, L, S, E, Ev, dtype.name, causal, masked)
        if key not in sessions:
            elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
            shapes = {"query": [B, L, H * E], "key": [B, S, H * E], "value": [B, S, H * Ev]}
            names = ["query", "key", "value"]
            if masked:
                shapes["attention_bias"] = [1, 1, L, S]
                names += ["", "", "attention_bias"]     # no bias, no key_padding_mask
            node = helper.make_node("MultiHeadAttention", names, ["output"],
                                    domain="com.microsoft", num_heads=H,
                                    unidirectional=int(causal))
            graph = helper.make_graph(
                [node], "attention",
                [helper.make_tensor_value_info(n, elem, s) for n, s in shapes.items()],
                [helper.make_tensor_value_info("output", elem, [B, L, H * Ev])])
            model = helper.make_model(graph, opset_imports=[
                helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions[key] = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        return sessions[key]

    def to_3d(a):                                   # (B, H, L, E) -> (B, L, H*E)
        B, H, L, E = a.shape
        return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(B, L, H * E)

    def convert(q, k, v, mask):
        feed = {"query": to_3d(q), "key": to_3d(k), "value": to_3d(v)}
        if mask is not None:
            feed["attention_bias"] = np.where(mask, 0, -np.inf).astype(q.dtype)[None, None]
        return feed

    prepared = _PreparedInputs(convert)

    def run(q, k, v, causal, mask):
        (B, H, L, E), S, Ev = q.shape, k.shape[-2], v.shape[-1]
        sess = session(B, H, L, S, E, Ev, q.dtype, causal, mask is not None)
        out = sess.run(None, prepared(q, k, v, mask))[0]
        return out.reshape(B, L, H, Ev)

    run.result = lambda out: np.ascontiguousarray(out.transpose(0, 2, 1, 3))
    return run


def _openvino_runner(threads):
    """OpenVINO's opset-13 scaled_dot_product_attention compiled for ``CPU`` on the
    ``(B, H, L, E)`` arrays themselves (shared, not copied). float32 and float16 run
    at the f32 inference precision, bfloat16 at bf16."""
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()
    compiled = {}
    types = {"float32": ov.Type.f32, "float16": ov.Type.f16, "bfloat16": ov.Type.bf16}

    def request(q, k, v, causal, mask):
        key = (q.shape, k.shape, v.shape, q.dtype.name, causal,
               None if mask is None else mask.shape)
        if key not in compiled:
            typ = types[q.dtype.name]
            params = [ops.parameter(list(a.shape), typ, name=n)
                      for n, a in zip("qkv", (q, k, v))]
            inputs = list(params)
            if mask is not None:
                params.append(ops.parameter(list(mask.shape), ov.Type.boolean, name="mask"))
            node = ops.scaled_dot_product_attention(*inputs, *params[3:], causal=causal)
            model = ov.Model([node.output(0)], params)
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": "bf16" if typ == ov.Type.bf16 else "f32"}
            compiled[key] = core.compile_model(model, "CPU", config).create_infer_request()
        return compiled[key]

    def tensor(a):
        if a.dtype == fastattn.bfloat16:
            return ov.Tensor(a.view(np.uint16), a.shape, ov.Type.bf16)
        return ov.Tensor(a, shared_memory=True)

    prepared = _PreparedInputs(lambda *arrays: [tensor(np.ascontiguousarray(a))
                                                for a in arrays if a is not None])

    def run(q, k, v, causal, mask):
        req = request(q, k, v, causal, mask)
        req.infer(prepared(q, k, v, mask), share_inputs=True)
        out = req.get_output_tensor(0).data          # OpenVINO's buffer, reused
        return out.view(np.uint16).view(fastattn.bfloat16) if q.dtype == fastattn.bfloat16 \
            else out

    run.result = lambda out: np.array(out)
    return run


def _jax_runner(threads):
    """JAX's ``jax.nn.dot_product_attention`` under ``jax.jit`` on ``(B, L, H, E)`` device
    arrays, converted once per workload; threads as :class:`fastattn._bench_peers.JaxRunner`
    sets them (JAX's CPU client takes its thread count when it is created)."""
    from fastattn._bench_peers import JaxRunner
    JaxRunner(threads)._init()
    import jax

    device = jax.devices("cpu")[0]
    functions = {}

    def function(causal):
        if causal not in functions:
            functions[causal] = jax.jit(lambda q, k, v, mask: jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=causal))
        return functions[causal]

    prepared = _PreparedInputs(lambda *arrays: [
        None if a is None else jax.device_put(
            np.ascontiguousarray(a.swapaxes(-3, -2)) if a.ndim == 4 else a, device)
        for a in arrays])

    def run(q, k, v, causal, mask):
        return function(causal)(*prepared(q, k, v, mask)).block_until_ready()

    run.result = lambda out: np.asarray(out).swapaxes(-3, -2)
    return run


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@contextlib.contextmanager
def _blas_threads(threads):
    """NumPy's BLAS limited to ``threads`` (fastattn's kernels manage their own)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


# --- workloads and measurement ------------------------------------------------------

def _workload_arrays(kind, batch, heads, L, dim, dtype):
    rng = np.random.default_rng(L)
    q, k, v = (rng.standard_normal((batch, heads, L, dim), dtype=np.float32).astype(dtype)
               for _ in range(3))
    mask = None
    if kind == "mask":
        mask = rng.random((L, L)) < MASK_KEEP_PROBABILITY
        np.fill_diagonal(mask, True)      # no fully masked rows: the systems disagree there
    elif kind not in ("dense", "causal"):
        raise ValueError(f"unknown workload kind {kind!r}; choose from {list(KINDS)}")
    return q, k, v, mask


def _machine_info():
    from threadpoolctl import threadpool_info
    torch = _import_torch()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": [{key: info.get(key) for key in ("internal_api", "version", "num_threads")}
                 for info in threadpool_info() if info.get("user_api") == "blas"],
        "fastattn": fastattn.__version__,
        "torch": None if torch is None else torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "jax": _version("jax"),
    }


def _version(distribution):
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def progress_bar(total, *, enabled=True, desc=None):
    """A progress bar on stderr that draws only when stderr is a terminal.

    A `tqdm <https://tqdm.github.io>`_ bar: in a log file or a pipe (CI, ``| tee``)
    it writes nothing, so logs get no carriage-return lines; ``enabled=False``
    (``--no-progress`` on the command lines) turns it off on a terminal too.

    Parameters
    ----------
    total : int
        Number of steps.
    enabled : bool, default=True
        False: never draw.
    desc : str, optional
        Initial label; change it with ``bar.set_description_str(label)``.

    Returns
    -------
    tqdm.tqdm
        Advance with ``bar.update()``, finish with ``bar.close()``.

    Examples
    --------
    >>> from fastattn.bench import progress_bar
    >>> bar = progress_bar(3, desc="timing")     # stderr is not a terminal: draws nothing
    >>> bar.disable
    True
    >>> for _ in range(3):
    ...     bar.update()
    >>> bar.close()
    """
    from tqdm.auto import tqdm
    # disable=None: tqdm turns itself off when the stream is not a terminal
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None if enabled else True,
                leave=False, dynamic_ncols=True,
                bar_format="{desc:<44.44} {bar} {n_fmt}/{total_fmt} [{elapsed}]")


def provenance():
    """Where and when a measurement is taken: the machine, libraries, date and commit.

    Every figure of the documentation prints these under its plot.

    Returns
    -------
    dict
        ``machine`` (platform, CPU model, logical CPUs, Python, NumPy, its BLAS
        libraries, fastattn and the optional peers' versions), ``date``
        (``YYYY-MM-DD``) and ``commit`` (the short git commit of the fastattn source,
        ``+changes`` when it has uncommitted changes; None for an installed copy).

    Examples
    --------
    >>> from fastattn.bench import provenance
    >>> info = provenance()
    >>> sorted(info)
    ['commit', 'date', 'machine']
    >>> info["machine"]["logical_cpus"] >= 1
    True
    """
    return {"machine": _machine_info(), "date": time.strftime("%Y-%m-%d"),
            "commit": _source_commit()}


def _source_commit():
    """The short git commit of the fastattn source being measured, when it is a
    git checkout (None for an installed copy)."""
    import subprocess
    source = Path(fastattn.__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        found = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = found.stdout.strip() if found.returncode == 0 else None
    if commit:
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        commit += "+changes" if dirty else ""
    return commit


# --- output -------------------------------------------------------------------------

def _format_table(result):
    config, machine = result["config"], result["machine"]
    lines = [
        f"fastattn {machine['fastattn']} on {machine['cpu']} ({machine['logical_cpus']} logical "
        f"CPUs), {config['threads']} threads; numpy {machine['numpy']}, "
        f"torch {machine['torch'] or 'not installed'}"
        + "".join(f", {peer} {machine[peer]}" for peer in ("onnxruntime", "openvino", "jax")
                  if machine.get(peer)),
        f"B={config['batch']} H={config['heads']} E={config['dim']} {config['dtype']}, "
        f"median of {config['repeat']} interleaved runs; SGEMM {result['sgemm_gflops']:.1f} "
        f"GFLOP/s, read bandwidth {result['memory_bandwidth_gbs']:.1f} GB/s",
        "",
        f"{'kind':<7}{'L=S':>6}  {'system':<11}{'median ms':>10}{'GFLOP/s':>9}"
        f"{'of SGEMM':>9}{'fastattn x':>11}{'rel diff':>10}",
    ]
    previous = None
    for row in result["rows"]:
        if previous is not None and (row["kind"], row["length"]) != previous:
            lines.append("")
        previous = row["kind"], row["length"]
        head = f"{row['kind']:<7}{row['length']:>6}  {row['system']:<11}"
        if row["median_s"] is None:
            lines.append(head + f"  skipped ({row['skipped']})")
            continue
        speedup, diff = row["fastattn_speedup"], row["max_rel_diff"]
        lines.append(head + f"{row['median_s'] * 1e3:>10.2f}{row['gflops']:>9.1f}"
                     f"{row['sgemm_fraction']:>9.0%}"
                     f"{'' if speedup is None else f'{speedup:.2f}x':>11}"
                     f"{'' if diff is None else f'{diff:.0e}':>10}")
    return "\n".join(lines)


# One colour and marker per system, the same in every figure (colour-blind-safe
# Okabe-Ito colours; markers tell the lines apart in grey-scale print too).
SYSTEM_STYLES = {
    "fastattn": ("#0072B2", "o"),
    "numpy": ("#E69F00", "s"),
    "torch_sdpa": ("#009E73", "^"),
    "torch_math": ("#CC79A7", "v"),
    "onnxruntime": ("#D55E00", "D"),
    "openvino": ("#56B4E9", "P"),
    "jax": ("#F0E442", "X"),
}


def _caption(result):
    """Machine, libraries, date and commit of a run, for a figure's caption."""
    machine, config = result["machine"], result["config"]
    blas = ", ".join(sorted({f"{b['internal_api']} {b['version']}"
                             for b in machine.get("blas") or []}))
    peers = ", ".join(f"{name} {machine[key]}" for name, key in
                      (("PyTorch", "torch"), ("ONNX Runtime", "onnxruntime"),
                       ("OpenVINO", "openvino"), ("JAX", "jax")) if machine.get(key))
    return (f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
            f"{config['threads']} threads; fastattn {machine['fastattn']}, NumPy "
            f"{machine['numpy']}" + (f" ({blas})" if blas else "")
            + (f", {peers}" if peers else "") + "\n"
            + f"measured {result.get('date') or 'on an unrecorded date'}, "
            + (f"commit {result['commit']}" if result.get("commit") else "commit not recorded")
            + f"; median of {config['repeat']} runs; {result.get('command', '')}".rstrip("; "))


def _plot(result, path):
    """Time and fastattn's speed-up against sequence length: one column per kind, one
    line per system, the run's machine, date and commit underneath."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")                      # files only, never a window
    import matplotlib.pyplot as plt

    config = result["config"]
    kinds, systems = config["kinds"], config["systems"]
    titles = {"dense": "dense", "causal": "causal", "mask": "bool mask (90 % of keys kept)"}
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.4 * len(kinds) + 0.6, 7.2),
                             sharex=True, squeeze=False)
    for col, kind in enumerate(kinds):
        time_ax, speed_ax = axes[0][col], axes[1][col]
        top = 1.0
        for system in systems:
            rows = [r for r in result["rows"] if r["kind"] == kind and r["system"] == system
                    and r["median_s"]]
            if not rows:
                continue
            colour, marker = SYSTEM_STYLES.get(system, ("black", "x"))
            style = dict(color=colour, marker=marker, markersize=6, linewidth=1.8,
                         label=system)
            lengths = [r["length"] for r in rows]
            time_ax.plot(lengths, [r["median_s"] * 1e3 for r in rows], **style)
            if system != "fastattn":
                speedups = [r["fastattn_speedup"] for r in rows]
                speed_ax.plot(lengths, speedups, **style)
                top = max(top, *speedups)
        time_ax.set_title(titles.get(kind, kind), fontsize=12)
        time_ax.set_yscale("log")
        time_ax.yaxis.set_major_formatter(plain)
        speed_ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        speed_ax.set_ylim(0, top * 1.08)
        speed_ax.yaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        speed_ax.set_xscale("log", base=2)
        speed_ax.set_xticks(config["lengths"])
        speed_ax.xaxis.set_major_formatter(plain)
        speed_ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        speed_ax.set_xlabel("sequence length L = S")
        for ax in (time_ax, speed_ax):
            ax.grid(True, which="major", alpha=0.35)
            ax.tick_params(labelsize=9)
    axes[0][0].set_ylabel("time per call (ms, log scale)")
    axes[1][0].set_ylabel("fastattn's speed-up\n(system's time / fastattn's)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False,
               bbox_to_anchor=(0.5, 0.99), fontsize=10)
    fig.suptitle(f"Attention forward pass, B={config['batch']} H={config['heads']} "
                 f"E={config['dim']} {config['dtype']}", y=0.945, fontsize=11)
    fig.text(0.01, 0.005, _caption(result), fontsize=8, color="#333333", va="bottom")
    fig.tight_layout(rect=(0, 0.055, 1, 0.925))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parse_args(argv):
    def int_list(text):
        return [int(x) for x in text.split(",") if x]

    def name_list(text):
        return [x.strip() for x in text.split(",") if x.strip()]

    parser = argparse.ArgumentParser(prog="python -m fastattn.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"lengths {','.join(map(str, QUICK_LENGTHS))} and 3 runs "
                             "(under a minute)")
    parser.add_argument("--out", help="directory for bench.json/bench.png (default bench-out)")
    parser.add_argument("--lengths", type=int_list, help="comma-separated L = S values")
    parser.add_argument("--kinds", type=name_list, default=list(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--systems", type=name_list,
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="head dimension E = Ev")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="operand dtype; each system runs only in the dtypes it supports")
    parser.add_argument("--repeat", type=int, help="timed runs per system (default 7, quick 3)")
    parser.add_argument("--threads", type=int, help="threads for every system (default all)")
    parser.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    parser.add_argument("--replot", metavar="JSON",
                        help="measure nothing: redraw the figure of a saved bench.json "
                             "(written next to it unless --out is given)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--suite", type=name_list, metavar="NAMES",
                        help="run named suites against every CPU peer installed and print a "
                             "Markdown table instead: 'peers' (the 8 workloads of issue 20), "
                             "'wide' (head_dim 80, 96, 256) or 'peers,wide'; --systems picks "
                             "among fastattn,torch,onnxruntime,openvino,jax; --repeat (default "
                             "9) and --threads apply; writes suite.json and suite.md to --out")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--suite: rounds the timed runs are split into, each system "
                             "one block per round, the order rotating (default 3)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
