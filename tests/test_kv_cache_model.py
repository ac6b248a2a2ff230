"""PagedKVCache for whole models (num_layers), ragged appends, extend/write, truncate.

The random operation sequences run against a plain reference that keeps each
sequence's keys and values per layer in ordinary arrays.
"""
import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fastattn
from fastattn import reference
from helpers import assert_close


def snapshot(cache):
    """Everything observable about a cache, for 'left unchanged' checks."""
    seqs = sorted(cache._seqs)
    table, lens = cache.block_table(seqs)
    return (seqs, table.tolist(), lens.tolist(), cache.num_free_blocks,
            np.array(cache.key_blocks), np.array(cache.value_blocks))


def assert_unchanged(cache, before):
    after = snapshot(cache)
    assert after[:4] == before[:4]
    np.testing.assert_array_equal(after[4], before[4])
    np.testing.assert_array_equal(after[5], before[5])


class CacheMachine(RuleBasedStateMachine):
    """Random add / ragged append / extend+write / fork / truncate / free against the
    per-layer reference; every step checks tables, refcounts and the cached tokens."""

    @initialize(layers=st.sampled_from([None, 1, 3]), num_blocks=st.integers(0, 12),
                 block_size=st.sampled_from([1, 2, 3, 4, 8]), kv_heads=st.integers(1, 2),
                 dims=st.sampled_from([(4, 4), (3, 5)]), seed=st.integers(0, 2**32 - 1))
    def setup(self, layers, num_blocks, block_size, kv_heads, dims, seed):
        E, Ev = dims
        self.cache = fastattn.PagedKVCache(num_blocks, block_size, kv_heads, E, value_dim=Ev,
                                           num_layers=layers, dtype=np.float64)
        self.L = 1 if layers is None else layers
        self.layered = layers is not None
        self.rng = np.random.default_rng(seed)
        self.keys, self.values = {}, {}      # seq -> list over layers of (H_kv, T, E)
        self.H, self.E, self.Ev = kv_heads, E, Ev

    def tokens(self, T):
        k = self.rng.standard_normal((self.L, self.H, T, self.E))
        v = self.rng.standard_normal((self.L, self.H, T, self.Ev))
        return k, v

    def live(self):
        return sorted(self.keys)

    def grow(self, seq, k, v):
        self.keys[seq] = [np.concatenate([a, b], axis=1) for a, b in zip(self.keys[seq], k)]
        self.values[seq] = [np.concatenate([a, b], axis=1) for a, b in zip(self.values[seq], v)]

    @rule()
    def add(self):
        seq = self.cache.add_sequence()
        self.keys[seq] = [np.zeros((self.H, 0, self.E))] * self.L
        self.values[seq] = [np.zeros((self.H, 0, self.Ev))] * self.L

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def append(self, data):
        seqs = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        counts = data.draw(st.lists(st.integers(0, 9), min_size=len(seqs),
                                    max_size=len(seqs)))
        single = len(seqs) == 1 and counts[0] > 0 and data.draw(st.booleans())
        pairs = [self.tokens(T) for T in counts]
        lay = (lambda a: a) if self.layered else (lambda a: a[0])
        before = snapshot(self.cache)
        try:
            if single:
                self.cache.append(seqs[0], lay(pairs[0][0]), lay(pairs[0][1]))
            else:
                self.cache.append(seqs, [lay(k) for k, _ in pairs], [lay(v) for _, v in pairs])
        except MemoryError:
            assert_unchanged(self.cache, before)
            return
        for seq, (k, v) in zip(seqs, pairs):
            self.grow(seq, k, v)

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def extend_and_write(self, data):
        seqs = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        uniform = data.draw(st.booleans())
        if uniform:
            T = data.draw(st.integers(0, 5))
            counts = [T] * len(seqs)
        else:
            counts = data.draw(st.lists(st.integers(0, 5), min_size=len(seqs),
                                        max_size=len(seqs)))
        before = snapshot(self.cache)
        try:
            slots = self.cache.extend(seqs, T if uniform else counts)
        except MemoryError:
            assert_unchanged(self.cache, before)
            return
        assert slots.seq_ids == tuple(seqs) and slots.num_tokens == tuple(counts)
        pairs = [self.tokens(T) for T in counts]
        for layer in data.draw(st.permutations(range(self.L))):
            if uniform:
                k = np.stack([k[layer] for k, _ in pairs])
                v = np.stack([v[layer] for _, v in pairs])
            else:
                k = [k[layer] for k, _ in pairs]
                v = [v[layer] for _, v in pairs]
            self.cache.write(slots, k, v, layer=layer if self.layered else None)
        for seq, (k, v) in zip(seqs, pairs):
            self.grow(seq, k, v)

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def fork(self, data):
        seq = data.draw(st.sampled_from(self.live()))
        new = self.cache.fork(seq)
        self.keys[new] = list(self.keys[seq])
        self.values[new] = list(self.values[seq])

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self.live()))
        n = self.cache.length(seq)
        length = data.draw(st.integers(-2, n + 2))
        if not 0 <= length <= n:
            before = snapshot(self.cache)
            with pytest.raises(ValueError, match="cannot truncate"):
                self.cache.truncate(seq, length)
            assert_unchanged(self.cache, before)
            return
        self.cache.truncate(seq, length)
        self.keys[seq] = [k[:, :length] for k in self.keys[seq]]
        self.values[seq] = [v[:, :length] for v in self.values[seq]]

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live()))
        self.cache.free(seq)
        del self.keys[seq], self.values[seq]

    @precondition(lambda self: any(k[0].shape[1] for k in self.keys.values()))
    @rule(data=st.data())
    def decode(self, data):
        seqs = [s for s in self.live() if self.keys[s][0].shape[1]]
        seqs = data.draw(st.lists(st.sampled_from(seqs), min_size=1, unique=True))
        T = data.draw(st.integers(1, min(self.keys[s][0].shape[1] for s in seqs)))
        group = data.draw(st.integers(1, 2))
        q = self.rng.standard_normal((len(seqs), self.H * group, T, self.E))
        layer = data.draw(st.integers(0, self.L - 1))
        out = self.cache.attention(q, seqs, layer=layer if self.layered else None)
        for b, seq in enumerate(seqs):
            want = reference.scaled_dot_product_attention(
                q[b], self.keys[seq][layer], self.values[seq][layer], is_causal=True,
                causal_alignment="bottom_right", enable_gqa=True)
            assert_close(out[b], want, np.float64)

    @invariant()
    def matches_reference(self):
        if not hasattr(self, "cache"):
            return
        cache = self.cache
        live = self.live()
        assert sorted(cache._seqs) == live
        table, lens = cache.block_table(live)
        used = {}
        for row, n, seq in zip(table, lens, live):
            assert n == self.keys[seq][0].shape[1] == cache.length(seq)
            blocks = row[:-(-n // cache.block_size)] if n else row[:0]
            assert len(cache._seqs[seq][0]) == len(blocks)
            for blk in blocks:
                used[int(blk)] = used.get(int(blk), 0) + 1
            for layer in range(self.L):
                pools = ((cache.key_blocks[layer], cache.value_blocks[layer]) if self.layered
                         else (cache.key_blocks, cache.value_blocks))
                for pool, want in zip(pools, (self.keys[seq][layer], self.values[seq][layer])):
                    np.testing.assert_array_equal(reference.gather_blocks(pool, row, n), want)
        # reference counts and the free list account for every block exactly once
        N = len(cache._refs)
        assert cache.num_free_blocks + len(used) == N
        assert sorted(cache._free) == sorted(set(range(N)) - set(used))
        for blk in range(N):
            assert cache._refs[blk] == used.get(blk, 0)


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25,
                                          deadline=None)
TestCacheOperations = CacheMachine.TestCase


# ---- targeted cases -------------------------------------------------------------------

def ones(*shape, value=1.0):
    return np.full(shape, value)


def test_truncate_into_a_shared_block_copies_on_the_next_append():
    cache = fastattn.PagedKVCache(6, 4, 1, 2, num_layers=2)
    a = cache.add_sequence()
    cache.append(a, ones(2, 1, 8, 2), ones(2, 1, 8, 2))          # blocks 0, 1 (full)
    b = cache.fork(a)
    cache.truncate(b, 6)                                           # b ends inside block 1
    assert cache.num_free_blocks == 4                              # still shared
    cache.append(b, ones(2, 1, 1, 2, value=7), ones(2, 1, 1, 2, value=7))
    table, lens = cache.block_table([a, b])
    assert table.tolist() == [[0, 1], [0, 2]] and lens.tolist() == [8, 7]
    for layer in range(2):
        pool = cache.key_blocks[layer]
        assert (reference.gather_blocks(pool, table[0], 8) == 1).all()   # a untouched
        got = reference.gather_blocks(pool, table[1], 7)
        assert (got[:, :6] == 1).all() and (got[:, 6] == 7).all()


def test_truncate_releases_blocks_and_rejects_bad_lengths():
    cache = fastattn.PagedKVCache(4, 2, 1, 2)
    s = cache.add_sequence()
    cache.append(s, ones(1, 7, 2), ones(1, 7, 2))
    assert cache.num_free_blocks == 0
    before = snapshot(cache)
    for bad, error in ((8, ValueError), (-1, ValueError), (2.0, TypeError)):
        with pytest.raises(error):
            cache.truncate(s, bad)
        assert_unchanged(cache, before)
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.truncate(99, 0)
    cache.truncate(s, 3)
    assert cache.length(s) == 3 and cache.num_free_blocks == 2
    cache.truncate(s, 0)
    assert cache.num_free_blocks == 4 and cache.block_table([s])[0].shape == (1, 0)
    cache.append(s, ones(1, 1, 2), ones(1, 1, 2))                 # usable again
    assert cache.length(s) == 1


def test_speculative_decoding_round_trip(rng):
    # append k draft tokens, keep the accepted prefix, continue: the cache equals one
    # that only ever saw the accepted tokens
    H, E, bs = 2, 8, 4
    spec = fastattn.PagedKVCache(16, bs, H, E, num_layers=2)
    plain = fastattn.PagedKVCache(16, bs, H, E, num_layers=2)
    s, p = spec.add_sequence(), plain.add_sequence()
    prompt = rng.standard_normal((2, H, 5, E))
    spec.append(s, prompt, prompt)
    plain.append(p, prompt, prompt)
    for accepted in (0, 2, 3, 1):
        draft = rng.standard_normal((2, H, 3, E))
        spec.append(s, draft, draft)
        spec.truncate(s, spec.length(s) - 3 + accepted)
        if accepted:
            plain.append(p, draft[:, :, :accepted], draft[:, :, :accepted])
        q = rng.standard_normal((1, 4, 1, E), dtype=np.float32)
        for layer in range(2):
            np.testing.assert_array_equal(spec.attention(q, [s], layer=layer),
                                          plain.attention(q, [p], layer=layer))
    assert spec.num_free_blocks == plain.num_free_blocks


def test_ragged_append_is_all_or_nothing():
    cache = fastattn.PagedKVCache(4, 2, 1, 2, num_layers=2)
    a, b, c = (cache.add_sequence() for _ in range(3))
    cache.append(a, ones(2, 1, 3, 2), ones(2, 1, 3, 2))
    before = snapshot(cache)
    k = [ones(2, 1, 1, 2), ones(2, 1, 2, 2), ones(2, 1, 3, 2)]
    with pytest.raises(MemoryError, match="appending 1, 2, 3 tokens to sequences 0, 1, 2 needs 3"):
        cache.append([a, b, c], k, k)
    assert_unchanged(cache, before)
    with pytest.raises(MemoryError):
        cache.extend([a, b, c], [1, 2, 3])
    assert_unchanged(cache, before)
    # bad input anywhere in the batch: nothing appended either
    for keys, error in (([ones(2, 1, 1, 2), ones(2, 1, 1, 3)], ValueError),
                        ([ones(2, 1, 1, 2), ones(1, 1, 2)], ValueError),
                        ([ones(2, 1, 1, 2)], ValueError),
                        ([ones(2, 1, 1, 2), np.ones((2, 1, 1, 2), complex)], TypeError)):
        with pytest.raises(error):
            cache.append([a, b], keys, keys)
        assert_unchanged(cache, before)
    with pytest.raises(ValueError, match="once per call"):
        cache.append([a, a], [ones(2, 1, 1, 2)] * 2, [ones(2, 1, 1, 2)] * 2)
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.append([a, 7], [ones(2, 1, 1, 2)] * 2, [ones(2, 1, 1, 2)] * 2)
    assert_unchanged(cache, before)
    cache.append([a, b], [ones(2, 1, 1, 2), ones(2, 1, 2, 2)],
                 [ones(2, 1, 1, 2), ones(2, 1, 2, 2)])
    assert (cache.length(a), cache.length(b), cache.num_free_blocks) == (4, 2, 1)


def test_two_forks_appending_to_one_shared_block_in_one_call():
    # both copy-on-write decisions are taken in one plan: the first fork to append copies
    # the shared block, the second then owns the original
    cache = fastattn.PagedKVCache(4, 4, 1, 1)
    a = cache.add_sequence()
    cache.append(a, ones(1, 2, 1), ones(1, 2, 1))
    b = cache.fork(a)
    cache.append([a, b], [ones(1, 1, 1, value=2), ones(1, 1, 1, value=3)],
                 [ones(1, 1, 1, value=2), ones(1, 1, 1, value=3)])
    table, lens = cache.block_table([a, b])
    assert table.tolist() == [[1], [0]] and cache.num_free_blocks == 2
    assert cache.key_blocks[1, 0, :3, 0].tolist() == [1, 1, 2]
    assert cache.key_blocks[0, 0, :3, 0].tolist() == [1, 1, 3]


def test_decoder_step_matches_dense_reference(rng):
    # a batched decoding step of a 3-layer model through extend/write/attention, against
    # dense attention over each sequence's own keys and values
    L, H, Hkv, E, bs = 3, 4, 2, 16, 4
    cache = fastattn.PagedKVCache(32, bs, Hkv, E, num_layers=L)
    prompts = [5, 1, 9]
    seqs = [cache.add_sequence() for _ in prompts]
    kv = {s: [rng.standard_normal((2, Hkv, n, E)).astype(np.float32) for _ in range(L)]
          for s, n in zip(seqs, prompts)}
    cache.append(seqs, [np.stack([kv[s][l][0] for l in range(L)]) for s in seqs],
                 [np.stack([kv[s][l][1] for l in range(L)]) for s in seqs])
    for step in range(6):
        slots = cache.extend(seqs)
        for layer in range(L):
            new = rng.standard_normal((2, len(seqs), Hkv, 1, E)).astype(np.float32)
            cache.write(slots, new[0], new[1], layer=layer)
            for b, s in enumerate(seqs):
                kv[s][layer] = np.concatenate([kv[s][layer], new[:, b]], axis=2)
            q = rng.standard_normal((len(seqs), H, 1, E)).astype(np.float32)
            out = cache.attention(q, slots, layer=layer)
            for b, s in enumerate(seqs):
                k, v = kv[s][layer]
                want = reference.scaled_dot_product_attention(q[b], k, v, enable_gqa=True)
                assert_close(out[b], want, np.float32)
        if step == 2:
            cache.free(seqs.pop(1))


def test_half_pools_and_query_dtypes(rng):
    for dtype in (np.float16, fastattn.bfloat16):
        cache = fastattn.PagedKVCache(8, 4, 1, 8, num_layers=2, dtype=dtype)
        s = cache.add_sequence()
        k = rng.standard_normal((2, 1, 6, 8))
        cache.append(s, k, k)
        for qdtype, want in ((np.float32, np.float32), (dtype, dtype), (np.float64, np.float64)):
            q = rng.standard_normal((1, 2, 1, 8)).astype(qdtype)
            out = cache.attention(q, [s], layer=1)
            assert out.dtype == np.dtype(want)
            table, lens = cache.block_table([s])
            expected = fastattn.paged_attention(q, cache.key_blocks[1], cache.value_blocks[1],
                                                table, lens)
            np.testing.assert_array_equal(out, expected)


def test_stale_slots_and_bad_writes(rng):
    cache = fastattn.PagedKVCache(8, 4, 2, 4, num_layers=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    slots = cache.extend([a, b], [1, 2])
    with pytest.raises(ValueError, match="layers: pass layer=0..1"):
        cache.write(slots, [ones(2, 1, 4), ones(2, 2, 4)], [ones(2, 1, 4), ones(2, 2, 4)])
    with pytest.raises(ValueError, match=r"layer must lie in \[0, 2\)"):
        cache.write(slots, [ones(2, 1, 4), ones(2, 2, 4)], [ones(2, 1, 4), ones(2, 2, 4)],
                    layer=2)
    with pytest.raises(ValueError, match="ragged counts take one array per sequence"):
        cache.write(slots, ones(2, 2, 2, 4), ones(2, 2, 2, 4), layer=0)
    with pytest.raises(ValueError, match=r"T_b the tokens reserved per sequence, \(1, 2\)"):
        cache.write(slots, [ones(2, 2, 4), ones(2, 2, 4)], [ones(2, 2, 4), ones(2, 2, 4)],
                    layer=0)
    with pytest.raises(TypeError, match="KVSlots"):
        cache.write([a, b], ones(2, 2, 1, 4), ones(2, 2, 1, 4), layer=0)
    other = fastattn.PagedKVCache(8, 4, 2, 4, num_layers=2)
    with pytest.raises(TypeError, match="KVSlots"):
        other.write(slots, ones(2, 2, 1, 4), ones(2, 2, 1, 4), layer=0)
    cache.write(slots, [ones(2, 1, 4), ones(2, 2, 4)], [ones(2, 1, 4), ones(2, 2, 4)], layer=0)
    cache.fork(a)
    with pytest.raises(ValueError, match="stale"):
        cache.write(slots, [ones(2, 1, 4), ones(2, 2, 4)], [ones(2, 1, 4), ones(2, 2, 4)],
                    layer=1)
    with pytest.raises(ValueError, match="stale"):
        cache.attention(np.ones((2, 2, 1, 4)), slots, layer=0)
    with pytest.raises(ValueError, match="num_tokens"):
        cache.extend([a], [1, 2])
    with pytest.raises(ValueError, match="num_tokens"):
        cache.extend([a], -1)
    with pytest.raises(ValueError, match="once per call"):
        cache.extend([a, a])
    with pytest.raises(ValueError, match="one layer"):
        fastattn.PagedKVCache(4, 4, 1, 4).attention(np.ones((1, 1, 1, 4)), [], layer=1)


def test_one_layer_cache_extend_write_and_empty_batch(rng):
    cache = fastattn.PagedKVCache(8, 2, 1, 4)
    s = cache.add_sequence()
    slots = cache.extend([s], 3)
    k = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    cache.write(slots, k, k)
    np.testing.assert_array_equal(reference.gather_blocks(cache.key_blocks,
                                                          cache.block_table([s])[0][0], 3), k[0])
    empty = cache.extend([], 1)
    cache.write(empty, np.zeros((0, 1, 1, 4)), np.zeros((0, 1, 1, 4)))
    assert cache.attention(np.zeros((0, 2, 1, 4), np.float32), []).shape == (0, 2, 1, 4)


def test_attention_reuses_one_table_for_all_layers(monkeypatch, rng):
    import fastattn.kv_cache as kv_cache
    built = []
    real = kv_cache._Table

    def counting(entries):
        built.append(len(entries))
        return real(entries)
    monkeypatch.setattr(kv_cache, "_Table", counting)
    cache = fastattn.PagedKVCache(8, 4, 1, 4, num_layers=4)
    seqs = [cache.add_sequence() for _ in range(3)]
    slots = cache.extend(seqs, 2)
    q = np.ones((3, 2, 1, 4), np.float32)
    for layer in range(4):
        cache.write(slots, np.ones((3, 1, 2, 4)), np.ones((3, 1, 2, 4)), layer=layer)
        cache.attention(q, seqs, layer=layer)
    assert built == [3]
    cache.truncate(seqs[0], 1)
    cache.attention(q, seqs, layer=0)
    assert built == [3, 3]


def test_repr_and_npu_refusal():
    cache = fastattn.PagedKVCache(8, 4, 2, 16, num_layers=4, dtype=np.float16, value_dim=8)
    s = cache.add_sequence()
    cache.extend([s], 5)
    assert repr(cache) == ("PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16, "
                           "value_dim=8, num_layers=4, dtype=float16, device='cpu'; "
                           "1 sequence, 5 tokens, 6 of 8 blocks free)")
    cache.close()
    assert repr(cache).endswith("device='cpu'; closed)")
    with pytest.raises(NotImplementedError, match="one cache per layer"):
        fastattn.PagedKVCache(8, 16, 1, 8, num_layers=2, device="npu")
    with pytest.raises(ValueError, match="num_layers"):
        fastattn.PagedKVCache(8, 16, 1, 8, num_layers=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_sides(side):
    lengths = np.array([0, 3, 5], dtype=np.uint8)
    mask = fastattn.padding_mask(lengths, 5, side=side)[:, 0, 0]
    assert mask.sum(axis=1).tolist() == [0, 3, 5]
    if side == "left":
        assert mask[1].tolist() == [False, False, True, True, True]
    else:
        assert mask[1].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="side"):
        fastattn.padding_mask(lengths, 5, side="center")
