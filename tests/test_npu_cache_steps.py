"""A one-layer PagedKVCache(device="npu") takes the decoding-step API too: ragged
append, extend + write (one copy per block touched), truncate; num_layers is CPU-only.

Driven through the C test double, against a float64 CPU cache fed the same operations.
"""
import numpy as np
import pytest

import fastattn
from helpers import load_ascend_harness

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime


def make(rng, shape):
    return rng.standard_normal(shape).astype(np.float16).astype(np.float64)


def same_pools(cpu, npu):
    live = sorted(cpu._seqs)
    for expected, actual in zip(cpu.block_table(live), npu.block_table(live)):
        np.testing.assert_array_equal(actual, expected)
    for host, device in ((cpu.key_blocks, npu.key_blocks), (cpu.value_blocks, npu.value_blocks)):
        np.testing.assert_array_equal(np.asarray(device.to_numpy(), np.float64), host)


def test_steps_mirror_a_cpu_cache(runtime, rng):
    H, E, bs = 2, 8, 16
    cpu = fastattn.PagedKVCache(8, bs, H, E, dtype=np.float64)
    with fastattn.PagedKVCache(8, bs, H, E, device="npu") as npu:
        seqs = [cpu.add_sequence(), cpu.add_sequence()]
        assert [npu.add_sequence(), npu.add_sequence()] == seqs
        prompts = [make(rng, (H, n, E)) for n in (20, 3)]
        for cache in (cpu, npu):
            cache.append(seqs, prompts, prompts)
        same_pools(cpu, npu)
        before = harness.copy_stats(runtime)
        slots = [cache.extend(seqs, [1, 14]) for cache in (cpu, npu)]
        new = [make(rng, (H, 1, E)), make(rng, (H, 14, E))]
        for cache, s in zip((cpu, npu), slots):
            cache.write(s, new, new)
        copied = harness.copies_since(runtime, before)
        # one 2-D copy per block touched and pool: seq 0 one block, seq 1 (3 + 14) two
        assert copied["h2d"][0] == 2 * 3
        same_pools(cpu, npu)
        for cache in (cpu, npu):
            cache.truncate(seqs[1], 5)
            cache.fork(seqs[1])
            cache.append(2, new[0], new[0])        # copy-on-write of the truncated block
        same_pools(cpu, npu)
        q = np.ones((2, 4, 1, E), np.float16)
        out = npu.attention(q, [0, 2])
        assert out.shape == (2, 4, 1, E)
    harness.assert_no_leak(runtime)


def test_whole_model_cache_is_cpu_only(runtime):
    with pytest.raises(NotImplementedError, match="one cache per layer"):
        fastattn.PagedKVCache(8, 16, 1, 8, num_layers=2, device="npu")
    harness.assert_no_leak(runtime)
