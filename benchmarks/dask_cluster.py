"""fastattn.dask on a ``distributed.LocalCluster``: `python benchmarks/dask_cluster.py [cases]`.

The cluster targets of the Dask issue, measured in one run on this machine (the asv
module ``bench_dask.py`` has the small, scheduler-free cases):

overhead
    ``B=1, H=8, L=S=16384, E=64`` float32, chunked on heads, on
    ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` with the
    inputs already on the workers, against ``fastattn.scaled_dot_product_attention``
    on the same NumPy arrays with ``num_threads=2`` in this process (target: speed
    >= 0.85 of it). Two dask timings: the result left on the workers (``persist``),
    and gathered into this process (``compute``, which also moves 32 MiB).
seqpar
    Causal ``B=1, H=4, L=S=131072, E=64`` float32 (q, k, v 128 MiB each, generated
    on the workers), chunked along both lengths, on 2 single-threaded workers with
    ``memory_limit="1GiB"``: time, tasks, each worker's peak resident memory (sampled
    every 50 ms; target <= 1 GiB), and sampled rows against a chunked float64 NumPy
    reference.
scaling
    Dense ``B=1, H=8, L=S=8192, E=64`` float32 chunked on heads and in 4 query chunks
    (32 tasks: 8 could land 5 + 3 on two workers): 1 single-threaded worker against 2
    (target: >= 1.7x).
model
    No cluster: the scaling model of docs/guide/dask.md (tasks, bytes read by tasks,
    critical path, as functions of the chunking) against the statistics of the graphs
    fastattn.dask builds, for causal sequence-parallel shapes sized for 8, 64 and 512
    workers.

Every timed case of one comparison is run round after round in rotating order, so
the other load of the machine hits all alike; medians are reported with the spread
(min-max) of the rounds, and the machine's load average and busy share. Not an asv
benchmark: nothing runs on import.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np


def _cpu_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]           # total, idle + iowait


class _Load:
    """Load average and whole-machine busy share over a block of measurements."""

    def __enter__(self):
        self.start = _cpu_times()
        return self

    def __exit__(self, *exc):
        total, idle = (b - a for a, b in zip(self.start, _cpu_times()))
        self.busy = 1 - idle / max(total, 1)
        self.loadavg = os.getloadavg()[0]
        return False

    def describe(self):
        return f"machine busy {self.busy:.0%}, load average {self.loadavg:.1f} on {os.cpu_count()} CPUs"


def _rounds(cases, rounds):
    """Time each ``cases[name]()`` once per round, rotating the order; seconds per case."""
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _summary(times):
    return {name: dict(median=statistics.median(t), min=min(t), max=max(t), runs=t)
            for name, t in times.items()}


def _fmt(s):
    return f"{s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f}, {len(s['runs'])} runs)"


def _cluster(n_workers, **kwargs):
    import distributed
    cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                       processes=True, dashboard_address=":0",
                                       silence_logs=40, **kwargs)
    client = distributed.Client(cluster)
    client.run(__import__, "fastattn.dask")
    return cluster, client


def _fresh(collection, inputs):
    """A copy of ``collection`` under new keys (``inputs`` kept): each timed run computes
    every task again instead of finding the last run's results still in memory."""
    from dask.graph_manipulation import clone
    return clone(collection, omit=inputs)


def _persisted(client, arrays):
    import distributed
    arrays = client.persist(arrays)
    distributed.wait(arrays)
    return arrays


def overhead(rounds):
    import dask.array as da
    import distributed
    import fastattn
    import fastattn.dask
    B, H, L, E = 1, 8, 16384, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
    cluster, client = _cluster(2)
    try:
        dq, dk, dv = _persisted(client, [da.from_array(x, chunks=(1, 1, L, E)) for x in (q, k, v)])
        out = fastattn.dask.scaled_dot_product_attention(dq, dk, dv)
        # 8 tasks may land 5 + 3 on the workers (Dask places them with their inputs);
        # 4 query chunks per head make 32 tasks that even out
        dq4 = dq.rechunk((1, 1, L // 4, E)).persist()
        out4 = fastattn.dask.scaled_dot_product_attention(dq4, dk, dv)
        ref = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
        got = client.compute(out, sync=True)
        error = float(np.abs(got - ref).max())

        def on_workers():
            distributed.wait(client.persist(_fresh(out, [dq, dk, dv])))

        def gathered():
            client.compute(_fresh(out, [dq, dk, dv]), sync=True)

        cases = {"fastattn, NumPy, 2 threads":
                 lambda: fastattn.scaled_dot_product_attention(q, k, v, num_threads=2),
                 "fastattn.dask, result on workers": on_workers,
                 "fastattn.dask, result gathered": gathered,
                 "fastattn.dask, 4 query chunks, on workers":
                 lambda: distributed.wait(client.persist(_fresh(out4, [dq4, dk, dv])))}
        with _Load() as load:
            times = _summary(_rounds(cases, rounds))
    finally:
        client.close()
        cluster.close()
    base = times["fastattn, NumPy, 2 threads"]
    print(f"overhead: B={B} H={H} L=S={L} E={E} float32 chunked on heads, {len(out.dask)} "
          f"tasks (inputs included), "
          f"max |dask - numpy| = {error:.1e}; {load.describe()}")
    result = dict(case="overhead", tasks=len(out.dask), error=error, load=vars(load) | {})
    for name, s in times.items():
        speed = base["median"] / s["median"]
        spread = (base["min"] / s["max"], base["max"] / s["min"])
        print(f"  {name:42s} {_fmt(s)}  speed {speed:.2f} of NumPy "
              f"(round extremes {spread[0]:.2f}-{spread[1]:.2f})")
        result[name] = s | dict(speed=speed)
    return result


def _reference_rows(q, k, v, rows, scale, chunk=16384):
    """Causal attention of the given query rows of every head, float64, keys in chunks
    merged by log-sum-exp (each row's scores never exceed one chunk)."""
    out = np.empty((q.shape[1], len(rows), v.shape[-1]))
    for h in range(q.shape[1]):
        for n, i in enumerate(rows):
            qi = q[0, h, i].astype(np.float64)
            m, total, acc = -np.inf, 0.0, 0.0
            for c in range(0, i + 1, chunk):
                s = (k[0, h, c:min(c + chunk, i + 1)].astype(np.float64) @ qi) * scale
                m_new = max(m, s.max())
                w = np.exp(s - m_new)
                total = total * np.exp(m - m_new) + w.sum()
                acc = acc * np.exp(m - m_new) + w @ v[0, h, c:c + len(w)].astype(np.float64)
                m = m_new
            out[h, n] = acc / total
    return out


def _sample_rss(pids, stop, peaks, period=0.05):
    import psutil
    procs = {addr: psutil.Process(pid) for addr, pid in pids.items()}
    while not stop.is_set():
        for addr, p in procs.items():
            try:
                peaks[addr] = max(peaks.get(addr, 0), p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(period)


def seqpar(chunk=16384, length=131072):
    import dask.array as da
    import distributed
    import fastattn.dask
    B, H, E = 1, 4, 64
    cluster, client = _cluster(2, memory_limit="1GiB")
    try:
        rng = da.random.default_rng(7)
        shape, chunks = (B, H, length, E), (1, 1, chunk, E)
        start = time.perf_counter()
        q, k, v = _persisted(client, [rng.standard_normal(shape, dtype=np.float32, chunks=chunks)
                                      for _ in range(3)])
        generated = time.perf_counter() - start
        out = fastattn.dask.scaled_dot_product_attention(q, k, v, is_causal=True)
        graph = dict(out.__dask_graph__())
        kinds = {}
        for key in graph:
            name = key[0] if isinstance(key, tuple) else key
            if "fastattn" in name:
                kind = name.split("-")[2] if name.count("-") > 2 else "final"
                kinds[kind] = kinds.get(kind, 0) + 1
        pids = client.run(os.getpid)
        peaks, stop = {}, threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(pids, stop, peaks))
        sampler.start()
        with _Load() as load:
            start = time.perf_counter()
            res = client.persist(out)
            distributed.wait(res)
            elapsed = time.perf_counter() - start
        stop.set()
        sampler.join()
        flops = 4 * B * H * length * length * E / 2
        sample = np.random.default_rng(1).choice(length, 12, replace=False).tolist() + [0, length - 1]
        sample = sorted(set(sample))
        got = np.stack([res[:, :, i, :].compute() for i in sample], axis=2)[0]
        qn, kn, vn = client.compute([q, k, v], sync=True)
        want = _reference_rows(qn, kn, vn, sample, 1 / np.sqrt(E))
        error = float(np.abs(got - want).max())
        dead = len(client.scheduler_info()["workers"]) != 2
    finally:
        client.close()
        cluster.close()
    print(f"seqpar: causal B={B} H={H} L=S={length} E={E} float32, chunks {chunk} on both "
          f"lengths: {elapsed:.1f} s ({flops / elapsed / 1e9:.0f} GFLOP/s), inputs generated "
          f"in {generated:.1f} s; {len(graph)} tasks in the graph (inputs included), "
          f"fastattn tasks by kind {kinds}; peak RSS per worker "
          f"{', '.join(f'{p / 2**20:.0f} MiB' for p in peaks.values())} (limit 1024 MiB); "
          f"max error on {len(sample)} sampled rows x {H} heads vs float64 = {error:.1e}; "
          f"{load.describe()}{'; A WORKER DIED' if dead else ''}")
    return dict(case="seqpar", seconds=elapsed, gflops=flops / elapsed / 1e9,
                generate_seconds=generated, tasks=len(graph), kinds=kinds,
                peak_rss_mib={a: p / 2**20 for a, p in peaks.items()}, error=error,
                rows=sample, load=vars(load) | {}, worker_died=dead)


def scaling(rounds):
    import dask.array as da
    import distributed
    import fastattn.dask
    B, H, L, E = 1, 8, 8192, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
    setups = {}
    try:
        for n in (1, 2):
            cluster, client = _cluster(n)
            arrays = _persisted(client, [da.from_array(x, chunks=(1, 1, rows, E))
                                         for x, rows in ((q, L // 4), (k, L), (v, L))])
            setups[n] = (cluster, client, arrays)

        import psutil
        cores = {1: [], 2: []}          # CPU seconds the workers got per wall-clock second

        def run(n):
            _, client, arrays = setups[n]
            out = fastattn.dask.scaled_dot_product_attention(*arrays)
            procs = [psutil.Process(pid) for pid in client.run(os.getpid).values()]

            def timed():
                cpu = sum(sum(p.cpu_times()[:2]) for p in procs)
                start = time.perf_counter()
                distributed.wait(client.persist(_fresh(out, arrays)))
                wall = time.perf_counter() - start
                cores[n].append((sum(sum(p.cpu_times()[:2]) for p in procs) - cpu) / wall)
            return timed

        with _Load() as load:
            times = _summary(_rounds({"1 worker": run(1), "2 workers": run(2)}, rounds))
    finally:
        for cluster, client, _ in setups.values():
            client.close()
            cluster.close()
    one, two = times["1 worker"], times["2 workers"]
    speedup = one["median"] / two["median"]
    print(f"scaling: dense B={B} H={H} L=S={L} E={E} float32 chunked on heads and 4 query "
          f"chunks; {load.describe()}")
    for (name, s), n in zip(times.items(), (1, 2)):
        print(f"  {name:10s} {_fmt(s)}; the workers got {statistics.median(cores[n]):.2f} "
              f"CPU cores (median; rounds {min(cores[n]):.2f}-{max(cores[n]):.2f})")
    print(f"  speed-up 2 workers / 1: {speedup:.2f}x (round extremes "
          f"{one['min'] / two['max']:.2f}-{one['max'] / two['min']:.2f}); per core obtained "
          f"{speedup * statistics.median(cores[1]) / statistics.median(cores[2]):.2f}x of 1")
    return dict(case="scaling", speedup=speedup, cores=cores, load=vars(load) | {}, **times)


# ---- the scaling model of docs/guide/dask.md, checked against real graphs -----------

def critical_path(graph):
    """Tasks on the longest dependency chain of a dask graph (inputs included)."""
    from dask.core import get_dependencies
    depth = {}
    for key in _topological(graph):
        deps = get_dependencies(graph, key)
        depth[key] = 1 + max((depth[d] for d in deps), default=0)
    return max(depth.values(), default=0)


def _topological(graph):
    from dask.core import get_dependencies
    order, state = [], {}
    for root in graph:
        stack = [(root, False)]
        while stack:
            key, done = stack.pop()
            if done:
                state[key] = 2
                order.append(key)
                continue
            if state.get(key):
                continue
            state[key] = 1
            stack.append((key, True))
            stack.extend((d, False) for d in get_dependencies(graph, key) if not state.get(d))
    return order



def block_tasks(p, split_every):
    """(tasks, chain) of one output block whose query chunk meets ``p`` key chunks: the
    partial and merge tasks fastattn.dask builds, and the longest chain among them."""
    if p <= 1:
        return 1, 1                     # one task (p = 0: zeros; p = 1: the whole block)
    tasks, chain, n = p + 1, 2, p       # p partials, the final merge
    while n > split_every:              # intermediate merges: groups of >= 2 partials
        tasks += n // split_every + (n % split_every >= 2)
        n, chain = -(-n // split_every), chain + 1
    return tasks, chain


def model_counts(H, L, chunk, E=64, split_every=4, itemsize=4):
    """The model for causal self-attention, B=1, H heads, L=S, chunks of ``chunk`` rows
    on both lengths (the last one ragged) and one head per block."""
    n = -(-L // chunk)
    rows = [min(chunk, L - i * chunk) for i in range(n)]
    tasks = chain = pairs = read = 0
    for i in range(n):
        p = i + 1                                   # key chunks 0..i (on or below the diagonal)
        t, c = block_tasks(p, split_every)
        tasks += H * t
        chain = max(chain, c)
        pairs += H * p
        # each pair reads a query, a key and a value chunk ...
        inputs = sum(rows[i] + 2 * rows[j] for j in range(p)) * E * itemsize
        partial = rows[i] * (E + 1) * itemsize      # ... and writes out + lse
        merged = t - p if p > 1 else 0              # merge tasks; each reads its children
        read += H * (inputs + (p + merged - 1) * partial * (p > 1))
    flops = 4 * H * L * L * E / 2
    return dict(n=n, pairs=pairs, tasks=tasks, inputs=3 * H * n, chain=chain + 1,
                bytes_read=read, flops=flops)


def graph_counts(H, L, chunk, E=64, split_every=4):
    """The same statistics measured on the graph fastattn.dask builds."""
    import dask.array as da
    from dask.core import get_dependencies
    import fastattn.dask
    shape, chunks = (1, H, L, E), (1, 1, chunk, E)
    qkv = [da.zeros(shape, chunks=chunks, dtype=np.float32, name=f"model-{x}") for x in "qkv"]
    out = fastattn.dask.scaled_dot_product_attention(*qkv, is_causal=True,
                                                     split_every=split_every)
    graph = dict(out.__dask_graph__())
    names, rows = {a.name for a in qkv}, qkv[0].chunks[2]

    def nbytes(key):
        # key[3]: the row chunk of an input block, the query chunk of a partial or merge
        return rows[key[3]] * (E if key[0] in names else E + 1) * 4
    read = sum(nbytes(d) for key in graph if key[0] not in names
               for d in get_dependencies(graph, key))
    inputs = sum(1 for key in graph if key[0] in names)
    pairs = sum(1 for key in graph if "partial" in key[0]) + sum(
        1 for key in graph if key[0] == out.name      # single-pair blocks read q, k, v alone
        and all(d[0] in names for d in get_dependencies(graph, key)))
    return dict(pairs=pairs, tasks=len(graph) - inputs, inputs=inputs,
                chain=critical_path(graph), bytes_read=read)


def model(configs=((8, 4, 131072, 16384), (64, 32, 262144, 16384),
                   (512, 32, 1048576, 16384), (512, 32, 1048576, 32768))):
    rate = 85e9                         # one core's kernel rate here (idle), FLOP/s
    result = []
    for workers, H, L, chunk in configs:
        m = model_counts(H, L, chunk)
        start = time.perf_counter()
        g = graph_counts(H, L, chunk)
        built = time.perf_counter() - start
        same = {k: (m[k], g[k]) for k in ("pairs", "tasks", "inputs", "chain", "bytes_read")}
        ok = all(a == b for a, b in same.values())
        work = m["flops"] / rate
        per_pair = 4 * chunk * chunk * 64 / rate
        print(f"model: {workers} workers, causal H={H} L=S={L} chunk {chunk} "
              f"({m['n']} chunks per length): pairs {m['pairs']}, fastattn tasks "
              f"{m['tasks']} (+{m['inputs']} inputs), critical path {m['chain']} tasks, "
              f"bytes read by tasks {m['bytes_read'] / 2**30:.1f} GiB = "
              f"{m['bytes_read'] / workers / 2**20:.0f} MiB per worker; "
              f"{m['tasks'] / workers:.1f} tasks and {work / workers:.1f} s of kernel work "
              f"per worker at {rate / 1e9:.0f} GFLOP/s, a pair {per_pair * 1e3:.0f} ms; graph "
              f"{'agrees' if ok else 'DISAGREES: ' + str(same)} (built and measured in "
              f"{built:.1f} s)")
        result.append(dict(case="model", workers=workers, H=H, L=L, chunk=chunk, model=m,
                           graph=g, agrees=ok))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["overhead", "scaling", "seqpar", "model"],
                        choices=["overhead", "scaling", "seqpar", "model"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16384, help="seqpar length chunk")
    parser.add_argument("--length", type=int, default=131072, help="seqpar L = S")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for case in args.cases:
        if case == "seqpar":
            results.append(seqpar(args.chunk, args.length))
        elif case == "model":
            results.extend(model())
        else:
            results.append(globals()[case](args.rounds))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
