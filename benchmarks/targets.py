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
    import fastattn
    from fastattn.bench import memory_bandwidth_gbs
    B, H, Hkv, S, D, block = 8, 32, 8, 4096, 128, 16
    n_blocks = B * S // block
    kb, vb = (rng.standard_normal((n_blocks, Hkv, block, D), dtype=np.float32) for _ in range(2))
    table = rng.permutation(n_blocks).astype(np.int32).reshape(B, S // block)
    lens = np.full(B, S, np.int32)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    bandwidth = memory_bandwidth_gbs()
    t = _best(lambda: fastattn.paged_attention(q, kb, vb, table, lens), 9)
    rate = (kb.nbytes + vb.nbytes) / t / 1e9
    print(f"paged decode: {rate:.1f} GB/s of K+V = {rate / bandwidth:.2f} of the measured "
          f"{bandwidth:.1f} GB/s")


def main():
    rng = np.random.default_rng(0)
    long_sequence_memory(rng)
    core(rng)
    building_blocks(rng)
    paged(rng)


if __name__ == "__main__":
    main()
