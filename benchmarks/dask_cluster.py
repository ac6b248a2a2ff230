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
    Dense ``B=1, H=8, L=S=8192, E=64`` float32 chunked on heads: 1 single-threaded
    worker against 2 (target: >= 1.7x).

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
                                       processes=True, dashboard_address=None,
                                       silence_logs=40, **kwargs)
    client = distributed.Client(cluster)
    client.run(__import__, "fastattn.dask")
    return cluster, client


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
        ref = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
        got = client.compute(out, sync=True)
        error = float(np.abs(got - ref).max())

        def on_workers():
            distributed.wait(client.persist(out))

        cases = {"fastattn, NumPy, 2 threads":
                 lambda: fastattn.scaled_dot_product_attention(q, k, v, num_threads=2),
                 "fastattn.dask, result on workers": on_workers,
                 "fastattn.dask, result gathered": lambda: client.compute(out, sync=True)}
        with _Load() as load:
            times = _summary(_rounds(cases, rounds))
    finally:
        client.close()
        cluster.close()
    base = times["fastattn, NumPy, 2 threads"]
    print(f"overhead: B={B} H={H} L=S={L} E={E} float32, {len(out.dask)} tasks, "
          f"max |dask - numpy| = {error:.1e}; {load.describe()}")
    result = dict(case="overhead", tasks=len(out.dask), error=error, load=vars(load) | {})
    for name, s in times.items():
        speed = base["median"] / s["median"]
        spread = (base["min"] / s["max"], base["max"] / s["min"])
        print(f"  {name:34s} {_fmt(s)}  speed {speed:.2f} of NumPy "
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
            arrays = _persisted(client, [da.from_array(x, chunks=(1, 1, L, E)) for x in (q, k, v)])
            setups[n] = (cluster, client, fastattn.dask.scaled_dot_product_attention(*arrays))

        def run(n):
            _, client, out = setups[n]
            return lambda: distributed.wait(client.persist(out))

        with _Load() as load:
            times = _summary(_rounds({"1 worker": run(1), "2 workers": run(2)}, rounds))
    finally:
        for cluster, client, _ in setups.values():
            client.close()
            cluster.close()
    one, two = times["1 worker"], times["2 workers"]
    speedup = one["median"] / two["median"]
    print(f"scaling: dense B={B} H={H} L=S={L} E={E} float32 chunked on heads; {load.describe()}")
    for name, s in times.items():
        print(f"  {name:10s} {_fmt(s)}")
    print(f"  speed-up 2 workers / 1: {speedup:.2f}x (round extremes "
          f"{one['min'] / two['max']:.2f}-{one['max'] / two['min']:.2f})")
    return dict(case="scaling", speedup=speedup, load=vars(load) | {}, **times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["overhead", "scaling", "seqpar"],
                        choices=["overhead", "scaling", "seqpar"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16384, help="seqpar length chunk")
    parser.add_argument("--length", type=int, default=131072, help="seqpar L = S")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for case in args.cases:
        if case == "seqpar":
            results.append(seqpar(args.chunk, args.length))
        else:
            results.append(globals()[case](args.rounds))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
