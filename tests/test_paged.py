"""PagedKVCache and paged_attention against the gathered-contiguous reference."""
import importlib.util
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
import fastattn.paged as paged
from fastattn import _threads, reference
from fastattn._kernels import parallel
from helpers import assert_close, assert_lse_close

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "toy_decoder.py"


def make(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def pools(rng, num_blocks, hkv, bs, e, ev=None, dtype=np.float32):
    return make(rng, (num_blocks, hkv, bs, e), dtype), make(rng, (num_blocks, hkv, bs, ev or e), dtype)


def check(q, kb, vb, table, lens, dtype=np.float32, causal=True, **kw):
    out, lse = fastattn.paged_attention(q, kb, vb, table, lens, causal=causal, return_lse=True,
                                        **kw)
    ref_out, ref_lse = reference.paged_attention(q, kb, vb, np.asarray(table), lens,
                                                 causal=causal, scale=kw.get("scale"),
                                                 return_lse=True)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    return out, lse


# ---- paged_attention ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 1), (2, 2)])
def test_every_length_around_block_boundaries(rng, dtype, T, H, Hkv):
    # lengths 0 .. 3 blocks + 1: empty, inside the first block, exactly at each block's
    # end and one past it; the blocks are scattered and the table is padded with garbage
    bs, e, nmax = 4, 8, 4
    kb, vb = pools(rng, 12, Hkv, bs, e, 5, dtype)
    lens = np.arange(0, 3 * bs + 2)
    B = len(lens)
    table = np.stack([rng.permutation(12)[:nmax] for _ in range(B)])
    for b, n in enumerate(lens):
        table[b, -(-n // bs):] = rng.integers(-10**6, 10**6, nmax - -(-n // bs))
    q = make(rng, (B, H, T, e), dtype)
    for causal in (True, False):
        out, lse = check(q, kb, vb, table, lens, dtype, causal=causal)
        assert not out[0].any() and np.isneginf(lse[0]).all()      # length 0 -> 0, -inf


def test_equals_dense_sdpa_on_gathered_kv(rng):
    kb, vb = pools(rng, 10, 2, 16, 32)
    table = np.array([[7, 2, 9, 0], [1, 5, 3, 3]])
    lens = np.array([50, 33])
    q = make(rng, (2, 8, 1, 32))
    out = fastattn.paged_attention(q, kb, vb, table, lens)
    for b in range(2):
        k = reference.gather_blocks(kb, table[b], lens[b])
        v = reference.gather_blocks(vb, table[b], lens[b])
        dense = fastattn.scaled_dot_product_attention(q[b], k, v, enable_gqa=True)
        np.testing.assert_allclose(out[b], dense, atol=2e-6)


@st.composite
def problems(draw):
    bs = draw(st.sampled_from([1, 3, 4, 16]))
    nmax = draw(st.integers(1, 6))
    hkv = draw(st.integers(1, 3))
    return dict(
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        B=draw(st.integers(1, 3)), hkv=hkv, group=draw(st.sampled_from([1, 2, 4, 5])),
        T=draw(st.sampled_from([1, 2, 4, 7, 20])), bs=bs, nmax=nmax,
        e=draw(st.sampled_from([1, 8, 17, 64, 128])), ev=draw(st.sampled_from([1, 8, 20, 64])),
        lens=draw(st.lists(st.integers(0, nmax * bs), min_size=3, max_size=3)),
        causal=draw(st.booleans()), threads=draw(st.integers(1, 3)),
        row_tile=draw(st.sampled_from([1, 3, 8, 64])),
        seed=draw(st.integers(0, 2**32 - 1)))


# VECTOR_ROWS: 0 = BLAS for every tile, 10**9 = the vector small-GEMM loops for every tile;
# ROW_TILE: tiles of several kv-heads' rows (a group of rows per kv-head) or of part of one's
@pytest.mark.parametrize("vector_rows", [0, paged.VECTOR_ROWS, 10**9])
@given(p=problems())
def test_random_shapes_match_reference(vector_rows, p):
    # WORK_PER_THREAD 1: the threads asked for, however small the problem
    with mock.patch.object(paged, "VECTOR_ROWS", vector_rows), \
            mock.patch.object(paged, "ROW_TILE", p["row_tile"]), \
            mock.patch.object(_threads, "WORK_PER_THREAD", 1):
        _check_problem(p)


def _check_problem(p):
    rng = np.random.default_rng(p["seed"])
    B, nmax, bs = p["B"], p["nmax"], p["bs"]
    num_blocks = B * nmax + 1
    kb, vb = pools(rng, num_blocks, p["hkv"], bs, p["e"], p["ev"], p["dtype"])
    table = rng.integers(0, num_blocks, (B, nmax))
    lens = np.array(p["lens"][:B])
    q = make(rng, (B, p["hkv"] * p["group"], p["T"], p["e"]), p["dtype"])
    check(q, kb, vb, table, lens, p["dtype"], causal=p["causal"], num_threads=p["threads"])


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_split_keys_across_threads(rng, monkeypatch, threads):
    # one (sequence, kv-head) pair: flash-decoding splits its keys and merges by lse
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)    # threads even for tiny work
    kb, vb = pools(rng, 64, 1, 16, 64)
    table = rng.permutation(64)[None, :]
    q = make(rng, (1, 4, 2, 64))
    for n in (1000, 17, 1):
        one = fastattn.paged_attention(q, kb, vb, table, [n], num_threads=1)
        out, _ = check(q, kb, vb, table, np.array([n]), num_threads=threads)
        np.testing.assert_allclose(out, one, atol=1e-6)


@pytest.mark.parametrize("vector_rows", [0, 10**9])
@pytest.mark.parametrize("row_tile", [1, 4, 12, 18, 10**6])
def test_kv_head_groups_and_row_tiles(rng, monkeypatch, vector_rows, row_tile):
    # G = 2, T = 3: 6 rows per kv-head. ROW_TILE 1 / 4: parts of one kv-head's rows;
    # 12 / 18: groups of 2 / 3 of the 5 kv-heads, the last one smaller; 10**6: all 5.
    # One sequence on 3 threads also splits its keys, merging per-group partial results.
    monkeypatch.setattr(paged, "VECTOR_ROWS", vector_rows)
    monkeypatch.setattr(paged, "ROW_TILE", row_tile)
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)    # threads even for tiny work
    kb, vb = pools(rng, 20, 5, 4, 24, 16)
    table = rng.permutation(20)[:18].reshape(2, 9)
    q = make(rng, (2, 10, 3, 24))
    one = check(q, kb, vb, table, np.array([33, 17]), num_threads=2)[0]
    monkeypatch.setattr(paged, "ROW_TILE", 10**6)
    np.testing.assert_allclose(one, fastattn.paged_attention(q, kb, vb, table, [33, 17]),
                               atol=2e-6)
    for threads in (1, 3):
        check(q[:1], kb, vb, table[:1], np.array([35]), num_threads=threads)


def test_odd_batch_on_two_threads(rng, monkeypatch):
    # 5 sequences of one group of 4 kv-heads on 2 threads: paged.py halves the groups so
    # that the 10 items spread evenly; same answer as with one thread
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)    # threads even for tiny work
    kb, vb = pools(rng, 40, 4, 4, 16)
    table = rng.permutation(40).reshape(5, 8)
    q = make(rng, (5, 8, 1, 16))
    lens = np.array([32, 5, 17, 0, 29])
    out, _ = check(q, kb, vb, table, lens, num_threads=2)
    np.testing.assert_allclose(out, fastattn.paged_attention(q, kb, vb, table, lens,
                                                             num_threads=1), atol=2e-6)


@pytest.mark.parametrize("vector_rows", [0, 10**9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefetch_does_not_change_results(rng, monkeypatch, vector_rows, dtype):
    # prefetching is only a hint: any distance (none, less than a piece, the whole pool)
    # gives the same bits, also past the end of an item's keys and across chunks
    monkeypatch.setattr(paged, "VECTOR_ROWS", vector_rows)
    monkeypatch.setattr(paged, "KEYS_PER_CHUNK", 15)
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)    # threads even for tiny work
    kb, vb = pools(rng, 30, 3, 5, 40, 24, dtype)
    table = rng.permutation(30)[:28].reshape(2, 14)
    q = make(rng, (2, 6, 2, 40), dtype)
    lens = np.array([67, 29])
    outs = []
    for distance in (0, 1, 4096, 10**9):
        monkeypatch.setattr(paged, "PREFETCH_BYTES", distance)
        outs.append(fastattn.paged_attention(q, kb, vb, table, lens, num_threads=2))
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    check(q, kb, vb, table, lens, dtype, num_threads=2)


def _record_plans(monkeypatch):
    # the (threads, key splits) of every paged kernel call
    plans = []
    run = paged._paged.paged_attention

    def recording(plan):
        plans.append((plan.nthreads, plan.nsplit))
        return run(plan)
    monkeypatch.setattr(paged._paged, "paged_attention", recording)
    return plans


def _decode_problem(rng, dtype, B=16, H=4, Hkv=1, T=1, E=64, bs=16, S=1500):
    # B sequences of one kv-head group each: B items, enough that split_keys never splits
    # the keys for up to 8 threads, and enough work (~25M) that call_threads starts 8
    nmax = -(-S // bs)
    kb, vb = pools(rng, B * nmax, Hkv, bs, E, dtype=dtype)
    table = rng.permutation(B * nmax).reshape(B, nmax)
    lens = rng.integers(S - 200, S + 1, B)
    return make(rng, (B, H, T, E), dtype), kb, vb, table, lens


@pytest.mark.parametrize("vector_rows", [0, 10**9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 3])
def test_same_bits_on_any_thread_count(rng, monkeypatch, vector_rows, dtype, T):
    # items are computed the same way whichever thread takes them: with the key split
    # fixed (nsplit == 1 here), 1..8 threads give identical results
    monkeypatch.setattr(paged, "VECTOR_ROWS", vector_rows)
    plans = _record_plans(monkeypatch)
    q, kb, vb, table, lens = _decode_problem(rng, dtype, T=T)
    one, one_lse = fastattn.paged_attention(q, kb, vb, table, lens, return_lse=True,
                                            num_threads=1)
    for threads in range(2, 9):
        out, lse = fastattn.paged_attention(q, kb, vb, table, lens, return_lse=True,
                                            num_threads=threads)
        np.testing.assert_array_equal(out, one)
        np.testing.assert_array_equal(lse, one_lse)
    assert plans == [(n, 1) for n in range(1, 9)]
    check(q, kb, vb, table, lens, dtype)


@pytest.mark.parametrize("B,threads", [(16, 1), (16, 2), (1, 2)])
def test_scratch_allocation_failure(rng, monkeypatch, B, threads):
    # a thread without scratch: one MemoryError naming the buffers, every scratch block
    # freed, and the next call computes normally (B=1 also splits the keys: the merge
    # does not run on partial results)
    plans = _record_plans(monkeypatch)
    q, kb, vb, table, lens = _decode_problem(rng, np.float32, B=B, S=24000 // B)
    expected = fastattn.paged_attention(q, kb, vb, table, lens, num_threads=threads)
    assert plans[0][0] == threads and (plans[0][1] > 1) == (B == 1)
    try:
        parallel.fail_next_allocations(1)
        with pytest.raises(MemoryError, match="paged attention tile buffers"):
            fastattn.paged_attention(q, kb, vb, table, lens, num_threads=threads)
    finally:
        parallel.fail_next_allocations(0)
    assert parallel.live_scratch_blocks() == 0
    out = fastattn.paged_attention(q, kb, vb, table, lens, num_threads=threads)
    np.testing.assert_array_equal(out, expected)
    check(q, kb, vb, table, lens, num_threads=threads)


def test_causal_rows_before_the_first_key_are_zero(rng):
    # T = 5 new rows but only 2 keys: rows 0..2 see nothing (bottom-right alignment)
    kb, vb = pools(rng, 3, 1, 4, 8)
    out, lse = check(make(rng, (1, 2, 5, 8)), kb, vb, np.array([[2]]), np.array([2]))
    assert not out[:, :, :3].any() and np.isneginf(lse[:, :, :3]).all()
    assert np.isfinite(lse[:, :, 3:]).all()


@pytest.mark.parametrize("vector_rows", [0, 10**9])
def test_scale_row_tiles_and_chunks(rng, monkeypatch, vector_rows):
    monkeypatch.setattr(paged, "VECTOR_ROWS", vector_rows)
    monkeypatch.setattr(paged, "ROW_TILE", 5)
    monkeypatch.setattr(paged, "KEYS_PER_CHUNK", 8)
    kb, vb = pools(rng, 9, 2, 4, 16)
    table = rng.permutation(9)[:8].reshape(2, 4)
    check(make(rng, (2, 6, 7, 16)), kb, vb, table, np.array([16, 9]), scale=0.3)


def test_dtypes(rng):
    kb, vb = pools(rng, 4, 1, 4, 8)
    table, lens = np.array([[1, 3]]), np.array([6])
    q = make(rng, (1, 2, 1, 8))
    assert fastattn.paged_attention(q, kb, vb, table, lens).dtype == np.float32
    out = fastattn.paged_attention(q.astype(np.float64), kb, vb, table, lens)
    assert out.dtype == np.float64
    check(q.astype(np.float64), kb, vb, table, lens, np.float64)
    half = [a.astype(np.float16) for a in (q, kb, vb)]
    assert fastattn.paged_attention(*half, table, lens).dtype == np.float16
    # int32 and uint8 tables and lengths are accepted
    out8 = fastattn.paged_attention(q, kb, vb, table.astype(np.uint8), lens.astype(np.int32))
    np.testing.assert_array_equal(out8, fastattn.paged_attention(q, kb, vb, table, lens))


def test_strided_pools_are_read_in_place(rng):
    kb, vb = pools(rng, 6, 4, 8, 16)
    table, lens = np.array([[5, 1, 2]]), np.array([20])
    q = make(rng, (1, 4, 1, 16))
    check(q, kb[:, 1:3], vb[:, ::2], table, lens)        # head-strided views
    check(q, kb[:, :2, :, :], np.asfortranarray(vb[:, :2]), table, lens)


def test_empty_batch(rng):
    kb, vb = pools(rng, 2, 1, 4, 8)
    out, lse = fastattn.paged_attention(np.zeros((0, 2, 1, 8), np.float32), kb, vb,
                                        np.zeros((0, 3), np.int32), np.zeros(0, np.int32),
                                        return_lse=True)
    assert out.shape == (0, 2, 1, 8) and lse.shape == (0, 2, 1)


def _bad_cases():
    rng = np.random.default_rng(0)
    kb, vb = pools(rng, 4, 2, 4, 8)
    q = make(rng, (1, 4, 1, 8))
    t, n = np.array([[0, 1]]), np.array([5])
    V = ValueError
    return [
        (V, "query", (q[0], kb, vb, t, n), {}),
        (V, "key_blocks", (q, kb[0], vb, t, n), {}),
        (V, "value_blocks", (q, kb, vb[:3], t, n), {}),
        (V, "value_blocks", (q, kb, vb[:, :1], t, n), {}),
        (V, "head size", (q[..., :4], kb, vb, t, n), {}),
        (V, "multiple", (q[:, :3], kb, vb, t, n), {}),
        (V, "T >= 1", (q[:, :, :0], kb, vb, t, n), {}),
        (V, "block_table", (q, kb, vb, t[0], n), {}),
        (V, "block_table", (q, kb, vb, np.zeros((2, 2), int), n), {}),
        (V, "seq_lens", (q, kb, vb, t, np.array([5, 5])), {}),
        (V, r"\[0, 8\]", (q, kb, vb, t, np.array([9])), {}),
        (V, r"\[0, 8\]", (q, kb, vb, t, np.array([-1])), {}),
        (V, "block id 4", (q, kb, vb, np.array([[0, 4]]), n), {}),
        (V, "block id -1", (q, kb, vb, np.array([[-1, 0]]), n), {}),
        (V, "device", (q, kb, vb, t, n), {"device": "gpu"}),
        (V, "scale", (q, kb, vb, t, n), {"scale": np.nan}),
        (V, "num_threads", (q, kb, vb, t, n), {"num_threads": 0}),
        (TypeError, "block_table", (q, kb, vb, t.astype(float), n), {}),
        (TypeError, "block_table", (q, kb, vb, t.astype(bool), n), {}),
        (TypeError, "seq_lens", (q, kb, vb, t, n.astype(float)), {}),
        (TypeError, "query", (q.astype(complex), kb, vb, t, n), {}),
        (TypeError, "key_blocks", (q, kb.astype(bool), vb, t, n), {}),
    ]


@pytest.mark.parametrize("exc,match,args,kw", _bad_cases())
def test_bad_inputs(exc, match, args, kw):
    with pytest.raises(exc, match=match):
        fastattn.paged_attention(*args, **kw)


def test_garbage_beyond_seq_lens_is_not_read(rng):
    kb, vb = pools(rng, 4, 1, 4, 8)
    q = make(rng, (1, 2, 1, 8))
    table = np.array([[3, 2**40, -2**40]])
    check(q, kb, vb, table, np.array([4]))


# ---- PagedKVCache ------------------------------------------------------------------------

def cache_reference(cache, query, seq_ids, **kw):
    table, lens = cache.block_table(seq_ids)
    return reference.paged_attention(query, cache.key_blocks, cache.value_blocks, table, lens,
                                     **kw)


def test_cache_append_and_attention(rng):
    cache = fastattn.PagedKVCache(16, 4, 2, 8, value_dim=6)
    seqs = [cache.add_sequence() for _ in range(3)]
    keys = {s: np.zeros((2, 0, 8)) for s in seqs}
    vals = {s: np.zeros((2, 0, 6)) for s in seqs}
    for step, T in enumerate([1, 3, 4, 5, 1, 2]):
        for s in seqs[: 1 + step % 3]:
            k, v = make(rng, (2, T, 8)), make(rng, (2, T, 6))
            cache.append(s, k, v)
            keys[s] = np.concatenate([keys[s], k], axis=1)
            vals[s] = np.concatenate([vals[s], v], axis=1)
    table, lens = cache.block_table(seqs)
    assert table.dtype == np.int32 and lens.dtype == np.int32
    for b, s in enumerate(seqs):
        assert cache.length(s) == lens[b] == keys[s].shape[1]
        np.testing.assert_array_equal(
            reference.gather_blocks(cache.key_blocks, table[b], lens[b]),
            keys[s].astype(np.float32))
        np.testing.assert_array_equal(
            reference.gather_blocks(cache.value_blocks, table[b], lens[b]),
            vals[s].astype(np.float32))
    q = make(rng, (3, 4, 2, 8))
    out = cache.attention(q, seqs)
    assert_close(out, cache_reference(cache, q, seqs), np.float32)
    used = sum(-(-int(n) // 4) for n in lens)
    assert cache.num_free_blocks == 16 - used


def test_cache_views_are_read_only():
    cache = fastattn.PagedKVCache(2, 4, 1, 8)
    assert cache.key_blocks.shape == (2, 1, 4, 8) and cache.value_blocks.dtype == np.float32
    with pytest.raises(ValueError):
        cache.key_blocks[0] = 1
    with pytest.raises(ValueError):
        cache.value_blocks[0] = 1


def test_fork_is_copy_on_write(rng):
    cache = fastattn.PagedKVCache(8, 4, 1, 8)
    a = cache.add_sequence()
    cache.append(a, make(rng, (1, 6, 8)), make(rng, (1, 6, 8)))
    before = reference.gather_blocks(cache.key_blocks, cache.block_table([a])[0][0], 6).copy()
    b = cache.fork(a)
    assert cache.num_free_blocks == 6                      # nothing copied yet
    ta, tb = (cache.block_table([s])[0][0] for s in (a, b))
    np.testing.assert_array_equal(ta, tb)

    cache.append(b, np.full((1, 3, 8), 7.0), np.full((1, 3, 8), 7.0))
    ta2, tb2 = (cache.block_table([s])[0][0] for s in (a, b))
    np.testing.assert_array_equal(ta2, ta)                 # a keeps its blocks
    assert tb2[0] == ta[0] and tb2[1] != ta[1]             # full block shared, last copied
    np.testing.assert_array_equal(                         # a's tokens untouched
        reference.gather_blocks(cache.key_blocks, ta2, 6), before)
    kb = reference.gather_blocks(cache.key_blocks, tb2, 9)
    np.testing.assert_array_equal(kb[:, :6], before)
    assert (kb[:, 6:] == 7).all()

    cache.append(a, np.ones((1, 1, 8)), np.ones((1, 1, 8)))   # a's last block now private
    assert cache.block_table([a])[0][0, 1] == ta[1]
    cache.free(a)
    assert cache.length(b) == 9 and cache.num_free_blocks == 8 - 3
    cache.free(b)
    assert cache.num_free_blocks == 8


def test_fork_of_full_blocks_needs_no_copy(rng):
    cache = fastattn.PagedKVCache(4, 4, 1, 8)
    a = cache.add_sequence()
    cache.append(a, make(rng, (1, 8, 8)), make(rng, (1, 8, 8)))
    b = cache.fork(a)
    cache.append(b, np.ones((1, 1, 8)), np.ones((1, 1, 8)))
    assert cache.num_free_blocks == 1
    np.testing.assert_array_equal(cache.block_table([b])[0][0, :2],
                                  cache.block_table([a])[0][0])


def test_memory_error_leaves_cache_unchanged(rng):
    cache = fastattn.PagedKVCache(3, 4, 1, 8)
    a = cache.add_sequence()
    cache.append(a, make(rng, (1, 6, 8)), make(rng, (1, 6, 8)))
    b = cache.fork(a)
    state = (cache.block_table([a, b]), cache.num_free_blocks,
             cache.key_blocks.copy(), cache.value_blocks.copy())
    with pytest.raises(MemoryError, match="needs 2 free blocks, 1 of 3"):
        cache.append(b, np.ones((1, 3, 8)), np.ones((1, 3, 8)))   # CoW copy + 1 new
    with pytest.raises(MemoryError):
        cache.append(a, np.ones((1, 7, 8)), np.ones((1, 7, 8)))
    (table, lens), free, keys, values = state
    after_table, after_lens = cache.block_table([a, b])
    np.testing.assert_array_equal(after_table, table)
    np.testing.assert_array_equal(after_lens, lens)
    assert cache.num_free_blocks == free
    np.testing.assert_array_equal(cache.key_blocks, keys)
    np.testing.assert_array_equal(cache.value_blocks, values)
    cache.append(b, np.ones((1, 2, 8)), np.ones((1, 2, 8)))        # what fits still does


def test_append_one_token_does_not_reallocate(rng):
    cache = fastattn.PagedKVCache(4, 16, 2, 8)
    pool = cache.key_blocks.__array_interface__["data"][0]
    s = cache.add_sequence()
    for _ in range(40):
        cache.append(s, make(rng, (2, 1, 8)), make(rng, (2, 1, 8)))
    assert cache.key_blocks.__array_interface__["data"][0] == pool
    assert cache.length(s) == 40 and cache.num_free_blocks == 1


def test_cache_bad_inputs():
    for dtype in (np.int32, complex, np.longdouble):
        with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
            fastattn.PagedKVCache(2, 4, 1, 8, dtype=dtype)
    with pytest.raises(ValueError, match="block_size"):
        fastattn.PagedKVCache(2, 0, 1, 8)
    with pytest.raises(TypeError, match="num_blocks"):
        fastattn.PagedKVCache(2.5, 4, 1, 8)
    cache = fastattn.PagedKVCache(2, 4, 2, 8)
    s = cache.add_sequence()
    for k, v in [((2, 1, 7), (2, 1, 8)), ((1, 1, 8), (1, 1, 8)), ((2, 0, 8), (2, 0, 8)),
                 ((2, 2, 8), (2, 1, 8)), ((2, 8), (2, 8))]:
        with pytest.raises(ValueError, match="expected key"):
            cache.append(s, np.ones(k), np.ones(v))
    with pytest.raises(TypeError):
        cache.append(s, np.ones((2, 1, 8), complex), np.ones((2, 1, 8)))
    for method in (cache.length, cache.free, cache.fork):
        with pytest.raises(ValueError, match="unknown sequence"):
            method(99)
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.block_table([s, 99])
    cache.free(s)
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.append(s, np.ones((2, 1, 8)), np.ones((2, 1, 8)))
    assert cache.num_free_blocks == 2


# ---- the worked example in docs/ ---------------------------------------------------------

def test_toy_decoder_example_matches_recomputation():
    spec = importlib.util.spec_from_file_location("toy_decoder", EXAMPLE)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    model = toy.ToyDecoder(vocab=50, dim=32, heads=4, kv_heads=2, layers=2, seed=0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13]]
    tokens, logits = toy.generate(model, prompts, steps=12, block_size=4)
    assert [len(t) for t in tokens] == [15, 21, 13]
    # the cached decoder gives the same logits as running the model over the whole text
    for seq, last in zip(tokens, logits):
        full = model.forward_full(np.array(seq[:-1]))
        np.testing.assert_allclose(last, full[-1], rtol=1e-3, atol=1e-3)


def test_reversed_and_padded_pools(rng):
    kb, vb = pools(rng, 6, 2, 8, 16)
    table, lens = np.array([[5, 1, 2]]), np.array([20])
    q = make(rng, (1, 4, 1, 16))
    check(q, kb[::-1], vb[:, :, ::-1], table, lens)       # negative block / row strides
    padded = np.zeros((6, 2, 8, 20), np.float32)
    padded[..., :16] = kb
    check(q, padded[..., :16], vb, table, lens)            # row stride > row length
