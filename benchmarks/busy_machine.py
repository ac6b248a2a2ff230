"""fastattn's threads on a busy machine: `python benchmarks/busy_machine.py [--quick]`.

Starts its own load -- N processes spinning pure Python (or NumPy) loops on the CPU --
and measures, with N = 0, 1, 2 of them running:

a. one decode step: ``fastattn.paged_attention`` of 3 sequences (44, 58, 72 cached
   tokens in a ``PagedKVCache`` of 16-token blocks), 8 query heads over 2 kv-heads,
   head_dim 32, float32, T=1, at ``num_threads=1`` and ``num_threads=2``; the ratio
   of their medians, 2 threads / 1 thread (targets: <= 1.1 with one busy process,
   <= 1.5 with two: an extra thread must not cost much when it cannot get a core);
b. a decode loop alternating a NumPy projection ``x @ W`` (x (3, 256), W (256, 1024),
   float32, OpenBLAS with 2 threads) with that attention step, against the sum of each
   run alone: loop / (matmul + attention) (target <= 1.2, idle and loaded), which
   shows the two thread pools getting in each other's way.

Every case of one load level is measured interleaved (round after round, each case
given the same slice of wall time, in rotating order), so machine noise -- other
people's compiles -- hits all of them alike. Per-call times are taken with
``time.perf_counter``; the table gives their median and spread (min, 90th
percentile, max) and their mean, and each ratio of medians with its range over the
rounds, then the ratio of means. The two differ when most calls are fast and a few
wait tens of milliseconds for a core: the mean (total time / calls) is what a decode
loop pays, so a target counts as met ("ok") only when both ratios meet it. The whole
sweep over the load levels is repeated (``--sweeps``) and pooled. "cpu busy" is the
whole machine's non-idle CPU share during the level (from /proc/stat): ~N/cores plus
what we use; more means someone else was running too.

The load processes stop when measuring ends (``finally``, also on Ctrl-C or
SIGTERM), at the latest after ``--max-load-seconds``, and within a few milliseconds
if this process dies. Not an asv benchmark (see bench_busy.py): nothing runs on import.
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEED = 20240601                     # benchmarks/common.py's
BLOCK_SIZE = 16
SEQ_LENS = (44, 58, 72)
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32
PROJECTION = (256, 1024)            # x (batch, 256) @ W (256, 1024)
BLAS_THREADS = 2
LOADS = (0, 1, 2)
MAX_LOAD_SECONDS = 600.0            # no load process outlives this, whatever happens
THREAD_TARGETS = {1: 1.1, 2: 1.5}   # a: 2-thread / 1-thread median, by busy processes
LOOP_TARGET = 1.2                   # b: loop / (matmul + attention), every load

# The load: spins until its deadline, or until its parent is gone (checked every ~1 ms).
# SIGINT is ignored: Ctrl-C reaches the whole process group, and the parent stops its
# load itself (SIGTERM), so no child dies with a traceback of its own.
_SPIN = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, deadline, kind = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), sys.argv[3]
if kind == "numpy":
    import numpy as np
    a = np.ones(2048)
    def step():
        for _ in range(100):
            np.multiply(a, 1.0, out=a)
else:
    def step():
        for _ in range(20000):
            pass
sys.stdout.write("ready\n")
sys.stdout.flush()
while os.getppid() == parent and time.monotonic() < deadline:
    step()
"""


class BusyLoad:
    """``n`` processes each keeping one core busy, started by :meth:`start` and stopped
    by :meth:`stop` (or as a context manager). ``kind``: "python" or "numpy" loops."""

    def __init__(self, n, *, seconds=MAX_LOAD_SECONDS, kind="python"):
        if kind not in ("python", "numpy"):
            raise ValueError(f"kind must be 'python' or 'numpy', got {kind!r}")
        self.n, self.seconds, self.kind = n, seconds, kind
        self.processes = []
        self.cpu_seconds = None     # each process's CPU time when stopped (Linux only)
        self._started = self._stopped = None

    def start(self, settle=0.2):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        try:
            for _ in range(self.n):
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-c", _SPIN, str(os.getpid()), str(self.seconds), self.kind],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env))
            for process in self.processes:
                if process.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"load process exited with {process.wait()}")
            time.sleep(settle if self.n else 0)   # let the scheduler see them as CPU-bound
            self._started = time.monotonic()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self.processes:
            self.cpu_seconds = [_cpu_seconds(p.pid) for p in self.processes]
            self._stopped = time.monotonic()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
        self.processes = []

    def core_share(self):
        """Mean CPU time per load process over its run, as a fraction of one core."""
        if not self.cpu_seconds or None in self.cpu_seconds or self._started is None:
            return None
        return statistics.mean(self.cpu_seconds) / max(self._stopped - self._started, 1e-9)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def _cpu_seconds(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def _cpu_jiffies():
    """(busy, total) jiffies of the whole machine, or None off Linux."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)          # idle + iowait
    total = sum(values[:8])                                             # not guest time
    return total - idle, total


# --- the decode step --------------------------------------------------------------

def decode_case(seed=70):
    """``(run, cache)``: ``run(num_threads)`` is one decode step of the brief's case."""
    import fastattn
    rng = np.random.default_rng([SEED, seed])
    blocks = sum(-(-n // BLOCK_SIZE) for n in SEQ_LENS)
    cache = fastattn.PagedKVCache(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=np.float32)
    seq_ids = [cache.add_sequence() for _ in SEQ_LENS]
    # appended in chunks of 10 tokens, round robin, so the sequences' blocks interleave
    for start in range(0, max(SEQ_LENS), 10):
        for seq_id, n in zip(seq_ids, SEQ_LENS):
            tokens = min(10, n - start)
            if tokens > 0:
                shape = (KV_HEADS, tokens, HEAD_DIM)
                cache.append(seq_id, rng.standard_normal(shape, dtype=np.float32),
                             rng.standard_normal(shape, dtype=np.float32))
    table, lengths = cache.block_table(seq_ids)
    query = rng.standard_normal((len(SEQ_LENS), HEADS, 1, HEAD_DIM), dtype=np.float32)
    key_blocks, value_blocks = cache.key_blocks, cache.value_blocks

    def run(num_threads):
        return fastattn.paged_attention(query, key_blocks, value_blocks, table, lengths,
                                        num_threads=num_threads)
    return run, cache


def projection_case(seed=71):
    """``matmul()``: ``x @ W``, x (3, 256) and W (256, 1024) float32."""
    rng = np.random.default_rng([SEED, seed])
    x = rng.standard_normal((len(SEQ_LENS), PROJECTION[0]), dtype=np.float32)
    w = (rng.standard_normal(PROJECTION, dtype=np.float32) / np.sqrt(PROJECTION[0]))

    def matmul():
        return x @ w
    return matmul


def blas_threads(n):
    """Context manager: NumPy's BLAS at ``n`` threads (threadpoolctl), and its info."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext(), []
    return threadpool_limits(n, user_api="blas"), threadpool_info()


# --- interleaved measuring ----------------------------------------------------------

def interleaved(cases, seconds, slice_seconds, min_rounds=3):
    """Per-call times of each of ``cases`` (name -> callable), measured in rounds: each
    round gives every case ``slice_seconds`` of calls (at least 2), in an order rotated
    every round; the first call of each slice is a warm-up and not recorded. Runs for
    ``seconds`` or ``min_rounds`` rounds, whichever is longer. Returns a list of rounds,
    each {name: array of seconds per call}."""
    names = list(cases)
    clock = time.perf_counter
    rounds = []
    end = clock() + seconds
    while len(rounds) < min_rounds or clock() < end:
        shift = len(rounds) % len(names)
        this = {}
        for name in names[shift:] + names[:shift]:
            fn = cases[name]
            fn()
            times = []
            stop = clock() + slice_seconds
            while len(times) < 2 or clock() < stop:
                start = clock()
                fn()
                times.append(clock() - start)
            this[name] = np.array(times)
        rounds.append(this)
    return rounds


def summary(times):
    times = np.asarray(times)
    return {"calls": int(times.size), "median_ms": float(np.median(times)) * 1e3,
            "mean_ms": float(times.mean()) * 1e3,
            "min_ms": float(times.min()) * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3,
            "max_ms": float(times.max()) * 1e3}


def ratio_summary(rounds, numerator, denominator):
    """``numerator`` / ``denominator`` (a case, or a list of cases to add up): the ratio
    of pooled medians and its range over the rounds (of round medians), and the ratio
    of pooled means (total time / calls), which also counts the rare slow calls."""
    def stat(reduce, name_or_names, samples):
        names = [name_or_names] if isinstance(name_or_names, str) else name_or_names
        return sum(float(reduce(samples[n])) for n in names)
    pooled = {n: np.concatenate([r[n] for r in rounds]) for n in rounds[0]}
    per_round = [stat(np.median, numerator, r) / stat(np.median, denominator, r)
                 for r in rounds]
    return {"ratio": stat(np.median, numerator, pooled) / stat(np.median, denominator, pooled),
            "round_min": min(per_round), "round_max": max(per_round), "rounds": len(rounds),
            "mean_ratio": stat(np.mean, numerator, pooled) / stat(np.mean, denominator, pooled)}


# --- the report --------------------------------------------------------------------

CASES = ("attn t1", "attn t2", "matmul", "loop t1", "loop t2")


def measure(loads=LOADS, sweeps=1, seconds=4.0, slice_seconds=0.1, kind="python",
            max_load_seconds=MAX_LOAD_SECONDS, progress=None):
    """Run the sweep(s); returns the JSON-able result (see ``main``)."""
    import fastattn
    attention, cache = decode_case()
    matmul = projection_case()
    blas_limit, blas_info = blas_threads(BLAS_THREADS)

    def loop(num_threads):
        def step():
            matmul()
            attention(num_threads)
        return step

    cases = {"attn t1": lambda: attention(1), "attn t2": lambda: attention(2),
             "matmul": matmul, "loop t1": loop(1), "loop t2": loop(2)}
    assert tuple(cases) == CASES
    rounds = {n: [] for n in loads}
    machine = {n: [] for n in loads}
    with blas_limit:
        for sweep in range(sweeps):
            for n in loads:
                if progress:
                    progress(f"sweep {sweep + 1}/{sweeps}: {n} busy process(es) ...")
                load = BusyLoad(n, seconds=max_load_seconds, kind=kind)
                try:
                    load.start()
                    before, wall = _cpu_jiffies(), time.monotonic()
                    rounds[n] += interleaved(cases, seconds, slice_seconds)
                    after, wall = _cpu_jiffies(), time.monotonic() - wall
                finally:
                    load.stop()
                busy = (None if before is None or after[1] == before[1]
                        else (after[0] - before[0]) / (after[1] - before[1]))
                machine[n].append({"cpu_busy": busy, "load_core_share": load.core_share(),
                                   "seconds": wall, "loadavg": _loadavg()})
    cache.close()
    results = []
    for n in loads:
        results.append({
            "busy_processes": n,
            "cases": {name: summary(np.concatenate([r[name] for r in rounds[n]]))
                      for name in CASES},
            "thread_ratio": dict(ratio_summary(rounds[n], "attn t2", "attn t1"),
                                 target=THREAD_TARGETS.get(n)),
            "loop_ratio": {f"t{t}": dict(ratio_summary(rounds[n], f"loop t{t}",
                                                       ["matmul", f"attn t{t}"]),
                                         target=LOOP_TARGET) for t in (1, 2)},
            "machine": machine[n],
        })
    return {
        "config": {"seq_lens": list(SEQ_LENS), "block_size": BLOCK_SIZE, "heads": HEADS,
                   "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                   "projection": [len(SEQ_LENS), *PROJECTION], "blas_threads": BLAS_THREADS,
                   "load_kind": kind, "sweeps": sweeps, "seconds_per_level": seconds,
                   "slice_seconds": slice_seconds},
        "environment": {"fastattn": fastattn.__file__,
                        "fastattn_version": getattr(fastattn, "__version__", None),
                        "numpy": np.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count(), "usable_cpus": _usable_cpus(),
                        "fastattn_threads": fastattn.get_num_threads(),
                        "blas": [{k: lib.get(k) for k in ("internal_api", "version",
                                                          "num_threads", "architecture")}
                                 for lib in blas_info if lib.get("user_api") == "blas"],
                        "env": {k: os.environ[k] for k in (
                            "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                            "OMP_PROC_BIND", "OPENBLAS_NUM_THREADS") if k in os.environ}},
        "results": results,
    }


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def format_table(result):
    env = result["environment"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)"
                     for b in env["blas"]) or "unknown"
    lines = [f"fastattn {env['fastattn_version']} from {env['fastattn']}",
             f"{env['usable_cpus']} usable CPUs; BLAS: {blas}; env: {env['env'] or '-'}",
             f"load: {result['config']['load_kind']} spin loops; per-call ms, "
             f"{result['config']['sweeps']} sweep(s) x {result['config']['seconds_per_level']:g} s"
             " per load level, cases interleaved", ""]
    head = (f"{'busy':>4} {'case':<8} {'calls':>6} {'median':>9} {'min':>9} {'p90':>9} "
            f"{'max':>9} {'mean':>9}")
    lines += [head, "-" * len(head)]
    for level in result["results"]:
        for name in CASES:
            s = level["cases"][name]
            lines.append(f"{level['busy_processes']:>4} {name:<8} {s['calls']:>6} "
                         f"{s['median_ms']:>9.4f} {s['min_ms']:>9.4f} {s['p90_ms']:>9.4f} "
                         f"{s['max_ms']:>9.3f} {s['mean_ms']:>9.4f}")
        lines.append("")
    head = (f"{'busy':>4} {'2t/1t attn':>28} {'loop/(mm+attn) t1':>28} "
            f"{'loop/(mm+attn) t2':>28} {'cpu busy':>9} {'load core':>9}")
    lines += ["ratios of medians [range over rounds] / of means; ok or >target on both",
              head, "-" * len(head)]
    for level in result["results"]:
        cells = [_ratio_cell(level["thread_ratio"])]
        cells += [_ratio_cell(level["loop_ratio"][t]) for t in ("t1", "t2")]
        busy = [m["cpu_busy"] for m in level["machine"] if m["cpu_busy"] is not None]
        share = [m["load_core_share"] for m in level["machine"]
                 if m["load_core_share"] is not None]
        lines.append(f"{level['busy_processes']:>4} {cells[0]:>28} {cells[1]:>28} "
                     f"{cells[2]:>28} {_percent(busy):>9} {_percent(share):>9}")
    return "\n".join(lines)


def _ratio_cell(r):
    target = "" if r["target"] is None else (
        " ok" if max(r["ratio"], r["mean_ratio"]) <= r["target"] else f" >{r['target']:g}")
    return (f"{_g(r['ratio'])} [{_g(r['round_min'])}-{_g(r['round_max'])}]"
            f"/{_g(r['mean_ratio'])}{target}")


def _g(x):
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _percent(values):
    return f"{100 * statistics.mean(values):.0f}%" if values else "-"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one sweep of 1 s per load level (default: 2 sweeps of 4 s)")
    parser.add_argument("--seconds", type=float, help="measuring time per load level and sweep")
    parser.add_argument("--sweeps", type=int, help="how often to repeat the sweep over loads")
    parser.add_argument("--slice", type=float, default=0.1,
                        help="seconds of calls per case and round (default 0.1)")
    parser.add_argument("--loads", default="0,1,2",
                        help="busy process counts, comma-separated (default 0,1,2)")
    parser.add_argument("--load-kind", choices=("python", "numpy"), default="python")
    parser.add_argument("--max-load-seconds", type=float, default=MAX_LOAD_SECONDS,
                        help="no load process lives longer than this")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 4.0)
    sweeps = args.sweeps if args.sweeps is not None else (1 if args.quick else 2)
    loads = [int(n) for n in args.loads.split(",")]
    # SIGTERM unwinds like Ctrl-C, so the load is stopped by the finally blocks
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = measure(loads, sweeps, seconds, args.slice, args.load_kind,
                         args.max_load_seconds,
                         progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("busy_machine: interrupted; load processes stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _use_this_checkout():
    """Run as a script, measure this checkout's in-place build when it has one
    (``python setup.py build_ext --inplace``), else the installed fastattn."""
    root = Path(__file__).resolve().parent.parent
    if any((root / "fastattn" / "_kernels").glob("*.so")) or any(
            (root / "fastattn" / "_kernels").glob("*.pyd")):
        sys.path.insert(0, str(root))


if __name__ == "__main__":
    _use_this_checkout()
    sys.exit(main())
