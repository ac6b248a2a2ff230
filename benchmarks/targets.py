"""Check the speed and memory targets of the issues in one run: `python benchmarks/targets.py`.

Prints ratios against baselines measured in the same run on this machine (SGEMM rate,
memory bandwidth, plain NumPy, PyTorch when installed). Not an asv benchmark module:
nothing runs on import.
"""
import resource
import time

import numpy as np


def _best(fn, repeat=7):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def long_sequence_memory(rng):
    """Runs first: ru_maxrss is the process's peak, so later, larger cases would hide it."""
    import fastattn
    q, k, v = (rng.standard_normal((1, 1, 16384, 64), dtype=np.float32) for _ in range(3))
    out = np.empty_like(q)
    fastattn.scaled_dot_product_attention(q[..., :64, :], k[..., :64, :], v[..., :64, :])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, out=out)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"L=S=16384 H=1: peak RSS grew {grown:.1f} MiB (NumPy's scores alone: 1024 MiB)")


def core(rng):
    import fastattn
    from fastattn.bench import sgemm_gflops
    sgemm = sgemm_gflops()
    print(f"SGEMM rate {sgemm:.0f} GFLOP/s")
    try:
        import torch
        torch.set_num_threads(fastattn.get_num_threads())
    except ImportError:
        torch = None
    cases = [("dense", 1, 8, 2048, 2048, 64, False, False), ("causal", 1, 8, 2048, 2048, 64, True, False),
             ("bool mask", 1, 8, 2048, 2048, 64, False, True), ("BERT-like", 32, 12, 128, 128, 32, False, False),
             ("decode", 1, 8, 1, 4096, 64, False, False)]
    dense_time = None
    for name, B, H, L, S, E, causal, masked in cases:
        q = rng.standard_normal((B, H, L, E), dtype=np.float32)
        k, v = (rng.standard_normal((B, H, S, E), dtype=np.float32) for _ in range(2))
        mask = rng.random((L, S)) > 0.1 if masked else None
        flops = 4 * B * H * L * S * E / (2 if causal else 1)
        t = _best(lambda: fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal), 9)
        line = f"{name:10s}: {flops / t / 1e9:6.1f} GFLOP/s = {flops / t / 1e9 / sgemm:.2f} of SGEMM"
        if name == "dense":
            dense_time = t
        elif L == 2048:
            line += f"; {dense_time / t:.2f}x the dense speed" if causal else \
                f"; {t / dense_time - 1:+.1%} time vs no mask"
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            tm = None if mask is None else torch.from_numpy(mask)
            with torch.no_grad():
                tt = _best(lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, attn_mask=tm, is_causal=causal), 9)
            line += f"; {tt / t:.2f}x torch's speed"
        print(line)


def building_blocks(rng):
    import scipy.special
    import fastattn
    x = rng.standard_normal((8, 12, 512, 512), dtype=np.float32)
    keep = rng.random((8, 1, 512, 512)) > 0.3
    t_np = _best(lambda: scipy.special.softmax(np.where(keep, x, -np.inf), axis=-1), 3)
    t_fa = _best(lambda: fastattn.masked_softmax(x, keep))
    print(f"masked_softmax (8,12,512,512): {t_np / t_fa:.2f}x np.where + scipy.special.softmax")
    L, E, hidden = 512, 64, 256
    q, k, v = (rng.standard_normal((L, E), dtype=np.float32) for _ in range(3))
    w_q, w_k = (rng.standard_normal((hidden, E), dtype=np.float32) * 0.1 for _ in range(2))
    w = rng.standard_normal(hidden, dtype=np.float32)

    def numpy_additive():
        s = np.tanh((q @ w_q.T)[:, None, :] + (k @ w_k.T)[None, :, :]) @ w
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v
    t_np = _best(numpy_additive, 5)
    t_fa = _best(lambda: fastattn.additive_attention(q, k, v, w_q=w_q, w_k=w_k, v=w), 5)
    print(f"additive_attention L=S=512 hidden 256: {t_np / t_fa:.2f}x the broadcasting NumPy formula")


def paged(rng):
    """Issue 5: decode over a paged cache at memory bandwidth; split-KV keeps both cores busy."""
    import fastattn
    from fastattn.bench import memory_bandwidth_gbs
    B, H, Hkv, S, D, block = 8, 32, 8, 4096, 128, 16
    n_blocks = B * S // block
    kb, vb = (rng.standard_normal((n_blocks, Hkv, block, D), dtype=np.float32) for _ in range(2))
    table = rng.permutation(n_blocks).astype(np.int32).reshape(B, S // block)
    lens = np.full(B, S, np.int32)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    # bandwidth and kernel interleaved, best of each: both see the same machine state
    bandwidth, t = 0.0, float("inf")
    for _ in range(3):
        bandwidth = max(bandwidth, memory_bandwidth_gbs())
        t = min(t, _best(lambda: fastattn.paged_attention(q, kb, vb, table, lens), 3))
    rate = (kb.nbytes + vb.nbytes) / t / 1e9
    line = (f"paged decode: {rate:.1f} GB/s of K+V = {rate / bandwidth:.2f} of the measured "
            f"{bandwidth:.1f} GB/s")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        # the same keys and values stored contiguously, (B, H_kv, S, D); one query row sees
        # every key, so no causal mask (torch's is_causal is top-left aligned)
        order = table.astype(np.intp)
        tk, tv = (torch.from_numpy(np.ascontiguousarray(
            pool[order].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, S, D))) for pool in (kb, vb))
        tq = torch.from_numpy(q)
        torch.set_num_threads(fastattn.get_num_threads())
        with torch.no_grad():
            tt = _best(lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, enable_gqa=True), 9)
        line += f"; {tt / t:.2f}x torch SDPA's speed on contiguous K/V"
    print(line)
    # one long sequence: its keys are split across the threads (flash-decoding)
    S1 = 32768
    kb1, vb1 = (rng.standard_normal((S1 // block, Hkv, block, D), dtype=np.float32)
                for _ in range(2))
    table1 = rng.permutation(S1 // block).astype(np.int32)[None]
    q1 = rng.standard_normal((1, H, 1, D), dtype=np.float32)
    # a memory-bound kernel speeds up at most as much as reading does: print both
    t1, tn, bw1, bwn = float("inf"), float("inf"), 0.0, 0.0
    for _ in range(3):
        t1 = min(t1, _best(lambda: fastattn.paged_attention(q1, kb1, vb1, table1, [S1],
                                                            num_threads=1), 3))
        tn = min(tn, _best(lambda: fastattn.paged_attention(q1, kb1, vb1, table1, [S1]), 3))
        bw1, bwn = max(bw1, memory_bandwidth_gbs(threads=1)), max(bwn, memory_bandwidth_gbs())
    rate = (kb1.nbytes + vb1.nbytes) / tn / 1e9
    print(f"paged split-KV (B=1, S={S1}): {t1 / tn:.2f}x faster on "
          f"{fastattn.get_num_threads()} threads than on 1 (reading memory: "
          f"{bwn / bw1:.2f}x); {rate / bwn:.2f} of the measured {bwn:.1f} GB/s")


def main():
    rng = np.random.default_rng(0)
    long_sequence_memory(rng)
    core(rng)
    building_blocks(rng)
    paged(rng)


if __name__ == "__main__":
    main()
