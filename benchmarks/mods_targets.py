"""Issue 19's targets in one run: ``python benchmarks/mods_targets.py``.

Options: ``--threads N`` (default 2: the issue's setting), ``--rounds N`` (default 5),
``--cpu`` (one thread, process CPU time: steadier on a loaded machine), ``--skip-mask``
(the 1 GiB band mask), ``--json PATH``.

Every round times each case once, in the same order, so all cases see the same machine
state; the table gives the median and range over rounds, and each ratio is taken round
by round (median, min-max). Targets:

* causal window of 4096 keys over L=S=32768, H=8, E=64: time per visible (query, key)
  pair <= 1.3x that of dense L=S=8192; faster than the same band as a bool mask; no
  (L, S) allocation (tracemalloc peak of the call);
* ALiBi, soft-capping: <= 10 % over the same call without (L=S=2048, H=8, E=64);
* packed causal batch of 16 sequences of U(64, 2048) tokens: >= 1.5x faster than the
  batch padded to 2048 with a padding mask; GFLOP/s >= 0.85 of a dense causal call with
  the same visible pairs (reported against both a (B, H, L, E) and a (B, L, H, E) dense
  call: flash-attn's dense layout is the latter, as its varlen layout is (T, H, E)).

Not an asv module: nothing runs on import.
"""
import argparse
import json
import statistics
import time
import tracemalloc

import numpy as np

H, E = 8, 64


def visible_pairs(L, S, left, causal=True):
    i = np.arange(L, dtype=np.int64)
    hi = np.minimum(i, S - 1) if causal else np.full(L, S - 1)
    lo = np.maximum(i - left, 0)
    return int(np.maximum(hi - lo + 1, 0).sum())


def build_cases(threads, skip_mask):
    import fastattn
    rng = np.random.default_rng(19)

    def arr(shape):
        return rng.standard_normal(shape, dtype=np.float32)

    sdpa = fastattn.scaled_dot_product_attention
    cases, pairs = {}, {}
    # window target
    q8, k8, v8 = (arr((1, H, 8192, E)) for _ in range(3))
    cases["dense L=8192"] = lambda: sdpa(q8, k8, v8, num_threads=threads)
    pairs["dense L=8192"] = H * 8192 * 8192
    L, W = 32768, 4096
    q32, k32, v32 = (arr((1, H, L, E)) for _ in range(3))
    cases["window 4096, L=32768"] = lambda: sdpa(q32, k32, v32, is_causal=True,
                                                 window=(W - 1, 0), num_threads=threads)
    pairs["window 4096, L=32768"] = H * visible_pairs(L, L, W - 1)
    if not skip_mask:
        i = np.arange(L)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)   # 1 GiB
        cases["band as bool mask, L=32768"] = lambda: sdpa(q32, k32, v32, band,
                                                           num_threads=threads)
        pairs["band as bool mask, L=32768"] = pairs["window 4096, L=32768"]
    # modifier overhead
    q2, k2, v2 = (arr((1, H, 2048, E)) for _ in range(3))
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
    for causal in (False, True):
        tag = "causal" if causal else "dense"
        for name, kw in (("none", {}), ("alibi", dict(alibi_slopes=slopes)),
                         ("softcap", dict(softcap=30.0)),
                         ("alibi+softcap", dict(alibi_slopes=slopes, softcap=30.0))):
            cases[f"{tag} 2048 {name}"] = (lambda kw=kw, causal=causal: sdpa(
                q2, k2, v2, is_causal=causal, num_threads=threads, **kw))
    # varlen
    lens = np.random.default_rng(1).integers(64, 2049, 16)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    qp, kp, vp = (arr((T, H, E)) for _ in range(3))
    vpairs = H * int((lens * (lens + 1) // 2).sum())
    cases["varlen packed"] = lambda: fastattn.varlen_attention(qp, kp, vp, cu, cu,
                                                               is_causal=True,
                                                               num_threads=threads)
    pairs["varlen packed"] = vpairs
    P = 2048
    qd, kd, vd = (np.zeros((16, H, P, E), np.float32) for _ in range(3))
    for b in range(16):
        s = slice(cu[b], cu[b + 1])
        for src, dst in ((qp, qd), (kp, kd), (vp, vd)):
            dst[b, :, :lens[b]] = src[s].transpose(1, 0, 2)
    keep = (np.arange(P)[None, :] < lens[:, None])[:, None, None, :]
    cases["varlen padded + mask"] = lambda: sdpa(qd, kd, vd, keep, is_causal=True,
                                                 num_threads=threads)
    Ld = int(round((np.sqrt(1 + 8 * vpairs / H) - 1) / 2))
    qe, ke, ve = (arr((1, H, Ld, E)) for _ in range(3))
    cases[f"dense causal L={Ld} (B,H,L,E)"] = lambda: sdpa(qe, ke, ve, is_causal=True,
                                                           num_threads=threads)
    pairs[f"dense causal L={Ld} (B,H,L,E)"] = H * Ld * (Ld + 1) // 2
    qf, kf, vf = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
                  for a in (qe, ke, ve))
    cases[f"dense causal L={Ld} (B,L,H,E)"] = lambda: sdpa(qf, kf, vf, is_causal=True,
                                                           num_threads=threads)
    pairs[f"dense causal L={Ld} (B,L,H,E)"] = H * Ld * (Ld + 1) // 2
    return cases, pairs, Ld


def window_peak_bytes(threads):
    """tracemalloc peak of the window call beyond its output (NumPy allocations)."""
    import fastattn
    rng = np.random.default_rng(0)
    L = 32768
    q, k, v = (rng.standard_normal((1, H, L, E), dtype=np.float32) for _ in range(3))
    out = np.empty_like(q)
    tracemalloc.start()
    fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, window=(4095, 0), out=out,
                                          num_threads=threads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", action="store_true",
                        help="one thread, process CPU time (overrides --threads)")
    parser.add_argument("--skip-mask", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    threads = 1 if args.cpu else args.threads
    clock = time.process_time if args.cpu else time.perf_counter
    cases, pairs, Ld = build_cases(threads, args.skip_mask)
    for run in cases.values():          # warm up (and check every case runs)
        run()
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = clock()
            run()
            times[name].append(clock() - start)

    def stat(values):
        return statistics.median(values), min(values), max(values)

    print(f"{'case':40s} {'median s':>10s} {'min':>8s} {'max':>8s}   ps/pair")
    for name, values in times.items():
        med, lo, hi = stat(values)
        per = f"{med / pairs[name] * 1e12:9.1f}" if name in pairs else ""
        print(f"{name:40s} {med:10.4f} {lo:8.4f} {hi:8.4f}   {per}")

    def ratio(a, b, scale=1.0):
        r = [x / y * scale for x, y in zip(times[a], times[b])]
        return stat(r)

    results = {}

    def report(label, value, target):
        med, lo, hi = value
        results[label] = dict(median=med, min=lo, max=hi, target=target)
        print(f"{label:62s} {med:6.3f} [{lo:.3f}-{hi:.3f}]  target {target}")

    print()
    w, d = "window 4096, L=32768", "dense L=8192"
    report("window: time per visible pair / dense L=8192's",
           ratio(w, d, pairs[d] / pairs[w]), "<= 1.3")
    if "band as bool mask, L=32768" in times:
        report("window: time / the band as a bool mask's", ratio(w, "band as bool mask, L=32768"),
               "< 1")
    for tag in ("dense", "causal"):
        for mod in ("alibi", "softcap", "alibi+softcap"):
            report(f"{tag} 2048 {mod}: time / without", ratio(f"{tag} 2048 {mod}",
                                                             f"{tag} 2048 none"), "<= 1.10")
    report("varlen: padded + mask time / packed time",
           ratio("varlen padded + mask", "varlen packed"), ">= 1.5")
    for layout in ("(B,H,L,E)", "(B,L,H,E)"):
        dense = f"dense causal L={Ld} {layout}"
        report(f"varlen GFLOP/s / dense causal {layout}'s",
               ratio(dense, "varlen packed", pairs["varlen packed"] / pairs[dense]), ">= 0.85")
    peak = window_peak_bytes(threads)
    print(f"\nwindow call: tracemalloc peak {peak / 2**20:.1f} MiB beyond its output "
          f"(the band as a bool mask: {32768 ** 2 / 2**30:.0f} GiB)")
    results["window tracemalloc peak bytes"] = peak
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(times=times, ratios=results, threads=threads, cpu=args.cpu), f,
                      indent=1)


if __name__ == "__main__":
    main()
