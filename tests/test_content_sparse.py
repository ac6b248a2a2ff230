"""Reformer LSH, clustered and Sinkhorn attention against their dense float64 references."""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastattn
from fastattn import content_sparse, reference
from helpers import assert_close, assert_lse_close

DTYPES = st.sampled_from([np.float32, np.float64])
BATCHES = st.sampled_from([(), (3,), (2, 3)])
# work-item rows and key-tile rows of the gathering kernel: the defaults, and tiny ones
# that split query runs and walk several key tiles with the online softmax
TILES = st.sampled_from([(content_sparse.BLOCK_Q, content_sparse.BLOCK_K), (7, 5)])


def tiles(block_q, block_k):
    return mock.patch.multiple(content_sparse, BLOCK_Q=block_q, BLOCK_K=block_k)


def make(rng, shape, dtype=np.float64, strided=False):
    """Standard-normal data; ``strided`` returns a non-contiguous view of the same shape."""
    if not strided:
        return rng.standard_normal(shape).astype(dtype)
    big = rng.standard_normal(shape[:-2] + (2 * shape[-2], shape[-1] + 3)).astype(dtype)
    return big[..., ::2, 1:shape[-1] + 1]


def shared_keys(q):
    E = q.shape[-1]
    q = np.asarray(q, dtype=np.float64)
    return q / np.sqrt((q ** 2).mean(-1, keepdims=True) + 1e-6) / np.sqrt(E)


# ---- Reformer LSH ----------------------------------------------------------------------------

@settings(max_examples=40)
@given(L=st.integers(1, 90), bucket_size=st.integers(1, 24), chunks_before=st.integers(0, 2),
       n_hashes=st.integers(1, 3), n_buckets=st.sampled_from([1, 2, 5]), causal=st.booleans(),
       self_mask=st.booleans(), batch=BATCHES, dtype=DTYPES, strided=st.booleans(),
       block=TILES, seed=st.integers(0, 2**32 - 1))
def test_lsh_matches_reference(L, bucket_size, chunks_before, n_hashes, n_buckets, causal,
                               self_mask, batch, dtype, strided, block, seed):
    rng = np.random.default_rng(seed)
    q = make(rng, batch + (L, 6), dtype, strided)
    v = make(rng, batch + (L, 5), dtype, strided)
    buckets = rng.integers(0, n_buckets, batch + (n_hashes, L))
    kw = dict(bucket_size=bucket_size, chunks_before=chunks_before, causal=causal,
              self_mask=self_mask)
    with tiles(*block):
        out, lse = fastattn.lsh_attention(q, v, n_hashes=n_hashes, buckets=buckets,
                                          return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == batch + (L, 5)
    ref_out, ref_lse = reference.lsh_attention(q, v, buckets, return_lse=True, **kw)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("shape, n_buckets", [((3, 70, 8), None), ((2, 3, 70, 8), 6),
                                              ((70, 8), 4)])
def test_lsh_hash_is_the_documented_rotation_argmax(shape, n_buckets):
    rng = np.random.default_rng(0)
    q, v = make(rng, shape), make(rng, shape[:-1] + (4,))
    out = fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=16, n_buckets=n_buckets, rng=7)
    nb = n_buckets or 8                                   # HF: 2 ** floor(log2(2 * (70 // 16)))
    heads = shape[-3:-2]                                  # one draw per head (batch axis -1)
    rotations = np.random.default_rng(7).standard_normal(heads + (8, 2, nb // 2))
    buckets = reference.lsh_buckets(q, rotations)
    assert buckets.max() < nb
    assert_close(out, reference.lsh_attention(q, v, buckets, bucket_size=16), np.float64)
    assert_close(out, fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=16, buckets=buckets),
                 np.float64)


def test_lsh_default_n_buckets_follows_hf():
    assert [content_sparse._default_n_buckets(L, 64) for L in (1, 64, 128, 4096, 5000)] == \
        [2, 2, 4, 128, 128]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lsh_one_chunk_without_self_mask_is_full_attention(dtype):
    rng = np.random.default_rng(1)
    q, v = make(rng, (2, 3, 50, 8), dtype), make(rng, (2, 3, 50, 4), dtype)
    full = reference.scaled_dot_product_attention(q, shared_keys(q), v, scale=1.0)
    one_bucket = np.zeros((2, 50), dtype=int)
    for kw in (dict(buckets=one_bucket), dict(rng=3)):    # any hash: one chunk holds all
        out = fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=50, self_mask=False, **kw)
        assert_close(out, full, dtype)
    # one bucket, so chunks in position order: the last chunk looks back over everything,
    # chunk c over chunks c - 1 and c only
    out = fastattn.lsh_attention(q, v, bucket_size=10, chunks_before=4, self_mask=False,
                                 buckets=one_bucket[:1])
    assert_close(out[..., 40:, :], full[..., 40:, :], dtype)
    out = fastattn.lsh_attention(q, v, bucket_size=10, self_mask=False, buckets=one_bucket[:1])
    band = np.abs(np.arange(50)[:, None] // 10 - np.arange(50) // 10 - 0.5) <= 0.5
    assert_close(out, reference.scaled_dot_product_attention(q, shared_keys(q), v, band,
                                                             scale=1.0), dtype)


def test_lsh_self_attended_only_when_alone():
    rng = np.random.default_rng(2)
    q, v = make(rng, (40, 8)), make(rng, (40, 3))
    one_bucket = np.zeros((1, 40), dtype=int)
    out = fastattn.lsh_attention(q, v, bucket_size=40, causal=True, buckets=one_bucket)
    np.testing.assert_allclose(out[0], v[0], rtol=1e-12)  # nothing else visible
    bumped = v.copy()
    bumped[5:] += 100.0                                  # own values of rows 5.. (and later)
    again = fastattn.lsh_attention(q, bumped, bucket_size=40, causal=True, buckets=one_bucket)
    # row i >= 1 has earlier keys: its own value does not count
    for i in range(1, 40):
        expect = fastattn.lsh_attention(q, np.where(np.arange(40)[:, None] < i, bumped, v),
                                        bucket_size=40, causal=True, buckets=one_bucket)[i]
        np.testing.assert_array_equal(again[i], expect)
    # alone in its chunk with no look-back: every query attends only to itself
    alone = fastattn.lsh_attention(q, v, bucket_size=1, chunks_before=0, rng=0)
    np.testing.assert_allclose(alone, v, rtol=1e-12)


def test_online_softmax_drops_a_tile_whose_max_underflows():
    # Regression (tile.pxd online_softmax_row): a first key tile holding only the
    # penalised own key (score ~ -1e5), then a tile with ordinary scores: the rescale
    # factor exp(-1e5 - max) underflows to 0, and the first tile must vanish with it.
    rng = np.random.default_rng(18)
    q, v = make(rng, (6, 6)), make(rng, (6, 5))
    one_bucket = np.zeros((1, 6), dtype=int)
    ref = reference.lsh_attention(q, v, one_bucket, bucket_size=6, causal=True)
    with tiles(7, 1):                          # one key per tile
        out = fastattn.lsh_attention(q, v, bucket_size=6, causal=True, buckets=one_bucket)
    assert_close(out, ref, np.float64)


def test_lsh_causal_never_sees_the_future():
    rng = np.random.default_rng(3)
    q, v = make(rng, (2, 120, 8)), make(rng, (2, 120, 4))
    out = fastattn.lsh_attention(q, v, n_hashes=3, bucket_size=8, causal=True, rng=5)
    for cut in (0, 37, 100):
        changed = v.copy()
        changed[:, cut + 1:] = rng.standard_normal(changed[:, cut + 1:].shape) * 50
        again = fastattn.lsh_attention(q, changed, n_hashes=3, bucket_size=8, causal=True,
                                       rng=5)
        np.testing.assert_array_equal(again[:, :cut + 1], out[:, :cut + 1])
        assert not np.array_equal(again[:, cut + 1:], out[:, cut + 1:])


def test_lsh_reproducible():
    rng = np.random.default_rng(4)
    q, v = make(rng, (2, 100, 8), np.float32), make(rng, (2, 100, 8), np.float32)
    a = fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=16, rng=11)
    b = fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=16, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=16, rng=12))


def test_lsh_empty_and_broadcast():
    q, v = np.zeros((3, 0, 4)), np.zeros((3, 0, 2))
    out, lse = fastattn.lsh_attention(q, v, return_lse=True)
    assert out.shape == (3, 0, 2) and lse.shape == (3, 0)
    rng = np.random.default_rng(5)
    q, v = make(rng, (30, 4)), make(rng, (2, 30, 3))         # query broadcast over the batch
    buckets = rng.integers(0, 4, (1, 30))
    assert_close(fastattn.lsh_attention(q, v, bucket_size=7, buckets=buckets),
                 reference.lsh_attention(np.broadcast_to(q, (2, 30, 4)), v, buckets,
                                         bucket_size=7), np.float64)


# ---- clustered attention ---------------------------------------------------------------------

@settings(max_examples=30)
@given(L=st.integers(1, 70), S=st.integers(1, 70), clusters=st.integers(1, 12),
       topk=st.one_of(st.none(), st.integers(1, 70)), batch=BATCHES, dtype=DTYPES,
       strided=st.booleans(), block=TILES, seed=st.integers(0, 2**32 - 1))
def test_clustered_matches_reference(L, S, clusters, topk, batch, dtype, strided, block, seed):
    rng = np.random.default_rng(seed)
    clusters = min(clusters, L)
    topk = None if topk is None else min(topk, S)
    q, k = make(rng, batch + (L, 6), dtype, strided), make(rng, batch + (S, 6), dtype, strided)
    v = make(rng, batch + (S, 5), dtype, strided)
    assign = rng.integers(0, clusters, batch + (L,))
    with tiles(*block):
        out = fastattn.clustered_attention(q, k, v, clusters=clusters, topk=topk,
                                           assignments=assign)
    assert out.dtype == dtype and out.shape == batch + (L, 5)
    assert_close(out, reference.clustered_attention(q, k, v, assign, clusters, topk=topk), dtype)


@pytest.mark.parametrize("topk, batch", [(None, (2, 3)), (3, (2, 3)), (40, (2, 3)), (3, ())])
def test_clustered_kmeans_is_lloyd_from_the_documented_start(topk, batch):
    rng = np.random.default_rng(6)
    q, k, v = make(rng, batch + (90, 8)), make(rng, batch + (40, 8)), make(rng, batch + (40, 4))
    # (one batch entry on two threads splits each Lloyd step's rows instead)
    out = fastattn.clustered_attention(q, k, v, clusters=9, iterations=4, topk=topk, rng=8,
                                       num_threads=2)
    nbatch = int(np.prod(batch))
    draws = np.random.default_rng(8).random((nbatch, 90))
    start = np.sort(np.argsort(draws, axis=-1)[:, :9], axis=-1).reshape(batch + (9,))
    assign = reference.kmeans(q, start, 4)
    assert_close(out, reference.clustered_attention(q, k, v, assign, 9, topk=topk), np.float64)


def test_kmeans_converges_to_a_fixed_point(monkeypatch):
    rng = np.random.default_rng(7)
    centres = 20 * rng.standard_normal((5, 8))
    x = centres[rng.integers(0, 5, (3, 1000))] + rng.standard_normal((3, 1000, 8))
    assign, centroids, counts = content_sparse._kmeans(x, 5, 50, np.random.default_rng(0), 2)
    # centroids are the members' means, and each point is nearest to its own centroid
    onehot = assign[..., None] == np.arange(5)
    assert (counts == onehot.sum(axis=1)).all() and (counts.sum(axis=1) == 1000).all()
    means = np.einsum("blc,ble->bce", onehot, x) / np.maximum(counts, 1)[..., None]
    np.testing.assert_allclose(centroids[counts > 0], means[counts > 0], rtol=1e-12)
    d = ((x[:, :, None] - centroids[:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(d.argmin(-1), assign)
    # an entry per thread, or each step's rows over more threads than entries: the same
    # (every call pays for its threads here, so 8 threads split the 12 row blocks)
    monkeypatch.setattr(fastattn._threads, "WORK_PER_THREAD", 1)
    for threads in (1, 8):
        again = content_sparse._kmeans(x, 5, 50, np.random.default_rng(0), threads)
        for a, b in zip(again, (assign, centroids, counts)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clustered_topk_all_keys_is_full_attention(dtype):
    rng = np.random.default_rng(8)
    q, k, v = make(rng, (2, 60, 8), dtype), make(rng, (2, 50, 8), dtype), make(rng, (2, 50, 3))
    out = fastattn.clustered_attention(q, k, v, clusters=7, topk=50, rng=0)
    assert_close(out, reference.scaled_dot_product_attention(q, k, v), dtype)
    # one query per cluster is exact too, without top-k
    out = fastattn.clustered_attention(q, k, v, clusters=60, assignments=np.arange(60))
    assert_close(out, reference.scaled_dot_product_attention(q, k, v), dtype)


def test_clustered_float32_topk_chooses_by_float64_scores():
    # many keys per centroid, few kept: float32 candidates are rescored in float64
    rng = np.random.default_rng(9)
    q, k, v = (make(rng, (4, n, 16), np.float32) for n in (300, 600, 600))
    assign = rng.integers(0, 10, (4, 300))
    out = fastattn.clustered_attention(q, k, v, clusters=10, topk=4, assignments=assign)
    assert_close(out, reference.clustered_attention(q, k, v, assign, 10, topk=4), np.float32)


def test_clustered_float32_near_tie_resolved_in_float64(monkeypatch):
    # keys 1 and 2 tie in float32 (1 + 2**-30 rounds to 1) but key 2 wins in float64;
    # the two members see them very differently, so the choice shows in the output
    k = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 2.0 ** -30], [-1, -1, -1], [-2, 0, 0]],
                 dtype=np.float32)
    q = np.array([[6, -4, 1], [-4, 6, 1]], dtype=np.float32)      # centroid (1, 1, 1)
    v = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    kw = dict(clusters=1, topk=2, assignments=[0, 0], scale=1.0)
    ref = reference.clustered_attention(q, k, v, np.zeros(2, int), 1, topk=2, scale=1.0)
    assert_close(fastattn.clustered_attention(q, k, v, **kw), ref, np.float32)
    monkeypatch.setattr(content_sparse, "TOPK_MARGIN", 0)       # float32 choice alone
    assert np.abs(fastattn.clustered_attention(q, k, v, **kw) - ref).max() > 0.1


def test_clustered_improves_with_topk():
    rng = np.random.default_rng(10)
    q, k, v = make(rng, (4, 200, 16)), make(rng, (4, 200, 16)), make(rng, (4, 200, 8))
    exact = reference.scaled_dot_product_attention(q, k, v)
    err = [np.abs(fastattn.clustered_attention(q, k, v, clusters=20, topk=t, rng=0)
                  - exact).mean() for t in (None, 8, 64, 200)]
    assert err[0] > err[1] > err[2] > err[3] and err[3] < 1e-12, err


def test_clustered_reproducible():
    rng = np.random.default_rng(11)
    q, k, v = (make(rng, (2, 3, 120, 8), np.float32) for _ in range(3))
    a = fastattn.clustered_attention(q, k, v, clusters=10, rng=3)
    np.testing.assert_array_equal(a, fastattn.clustered_attention(q, k, v, clusters=10, rng=3))
    assert not np.array_equal(a, fastattn.clustered_attention(q, k, v, clusters=10, rng=4))


# ---- Sinkhorn ---------------------------------------------------------------------------------

def test_sinkhorn_converges_to_doubly_stochastic():
    rng = np.random.default_rng(12)
    x = 3 * rng.standard_normal((4, 10, 10))
    errors = []
    for n_iters in (1, 3, 10, 30, 100):
        p = fastattn.sinkhorn(x, n_iters)
        assert (p >= 0).all()
        np.testing.assert_allclose(p.sum(axis=-2), 1, atol=1e-12)       # columns: exact
        errors.append(np.abs(p.sum(axis=-1) - 1).max())
        np.testing.assert_allclose(p, reference.sinkhorn(x, n_iters), rtol=1e-12, atol=1e-15)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6, errors


def test_sinkhorn_inf_entries_and_dtypes():
    x = np.random.default_rng(13).standard_normal((2, 6, 6)).astype(np.float32)
    x[0, 1, 2] = x[0, 4, 0] = -np.inf
    x[1, 3, :] = -np.inf                                  # an all -inf row stays 0
    p = fastattn.sinkhorn(x)
    assert p.dtype == np.float32 and np.isfinite(p).all() and (p >= 0).all()
    assert p[0, 1, 2] == 0 and p[0, 4, 0] == 0 and (p[1, 3] == 0).all()
    assert_close(p, reference.sinkhorn(x), np.float32)
    np.testing.assert_allclose(fastattn.sinkhorn(x, 0), np.exp(x))
    assert fastattn.sinkhorn(np.zeros((2, 2), dtype=int)).dtype == np.float64


@settings(max_examples=30)
@given(N=st.integers(1, 90), block_size=st.integers(1, 40), noise=st.booleans(),
       n_iters=st.integers(0, 8), batch=BATCHES, dtype=DTYPES, strided=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_sinkhorn_attention_matches_reference(N, block_size, noise, n_iters, batch, dtype,
                                              strided, seed):
    rng = np.random.default_rng(seed)
    q, k = make(rng, batch + (N, 6), dtype, strided), make(rng, batch + (N, 6), dtype, strided)
    v = make(rng, batch + (N, 5), dtype, strided)
    n = -(-N // block_size)
    out = fastattn.sinkhorn_attention(q, k, v, block_size=block_size, n_iters=n_iters,
                                      temperature=0.6, rng=seed if noise else None)
    assert out.dtype == dtype and out.shape == batch + (N, 5)
    gumbel = np.random.default_rng(seed).gumbel(size=batch + (n, n)) if noise else None
    ref = reference.sinkhorn_attention(q, k, v, block_size=block_size, n_iters=n_iters,
                                       temperature=0.6, noise=gumbel)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sinkhorn_one_block_is_full_attention(dtype):
    rng = np.random.default_rng(14)
    q, k, v = (make(rng, (2, 3, 45, 8), dtype) for _ in range(3))
    full = reference.scaled_dot_product_attention(q, k, v)
    for block_size in (45, 64):                          # exact fit, and padded
        out = fastattn.sinkhorn_attention(q, k, v, block_size=block_size, rng=1)
        assert_close(out, full, dtype)


def test_sinkhorn_padding_does_not_leak():
    # values of padded rows are zeros; huge real values elsewhere must not matter
    rng = np.random.default_rng(15)
    q, k, v = make(rng, (50, 8)), make(rng, (50, 8)), make(rng, (50, 4))
    out = fastattn.sinkhorn_attention(q, k, v, block_size=16)
    assert np.isfinite(out).all()
    ref = reference.sinkhorn_attention(q, k, v, block_size=16)
    assert_close(out, ref, np.float64)


def test_sinkhorn_attention_reproducible():
    rng = np.random.default_rng(16)
    q, k, v = (make(rng, (2, 100, 8), np.float32) for _ in range(3))
    kw = dict(block_size=10)
    a = fastattn.sinkhorn_attention(q, k, v, rng=5, **kw)
    np.testing.assert_array_equal(a, fastattn.sinkhorn_attention(q, k, v, rng=5, **kw))
    assert not np.array_equal(a, fastattn.sinkhorn_attention(q, k, v, rng=6, **kw))
    np.testing.assert_array_equal(fastattn.sinkhorn_attention(q, k, v, **kw),
                                  fastattn.sinkhorn_attention(q, k, v, **kw))


# ---- bad input --------------------------------------------------------------------------------

def test_bad_inputs():
    rng = np.random.default_rng(17)
    q = make(rng, (10, 4))
    v = make(rng, (10, 3))
    lsh, cl, sk = fastattn.lsh_attention, fastattn.clustered_attention, \
        fastattn.sinkhorn_attention
    cases = [
        (lambda: lsh(q, v, bucket_size=0), "bucket_size"),
        (lambda: lsh(q, v, n_hashes=0), "n_hashes"),
        (lambda: lsh(q, v, chunks_before=-1), "chunks_before"),
        (lambda: lsh(q, v, n_buckets=3), "n_buckets"),
        (lambda: lsh(q, v, n_buckets=0), "n_buckets"),
        (lambda: lsh(q, v[:9]), "value"),
        (lambda: lsh(q, v, buckets=np.zeros((2, 10), int)), "buckets"),
        (lambda: lsh(q, v, buckets=-np.ones((1, 10), int)), "buckets"),
        (lambda: lsh(q, v, n_buckets=4, buckets=np.full((1, 10), 4)), "buckets"),
        (lambda: cl(q, q, v, clusters=0), "clusters"),
        (lambda: cl(q, q, v, clusters=11), "clusters"),
        (lambda: cl(q, q, v, clusters=2, topk=0), "topk"),
        (lambda: cl(q, q, v, clusters=2, topk=11), "topk"),
        (lambda: cl(q, q, v, clusters=2, iterations=0), "iterations"),
        (lambda: cl(q, q[:, :3], v, clusters=2), "feature size"),
        (lambda: cl(q, q, v[:9], clusters=2), "rows"),
        (lambda: cl(q, q, v, clusters=2, assignments=np.full(10, 2)), "assignments"),
        (lambda: cl(q, q, v, clusters=2, assignments=np.zeros(9, int)), "assignments"),
        (lambda: sk(q, q, v, block_size=0), "block_size"),
        (lambda: sk(q, q, v, block_size=4, n_iters=-1), "n_iters"),
        (lambda: sk(q, q, v, block_size=4, temperature=0), "temperature"),
        (lambda: sk(q, q[:8], v[:8], block_size=4), "same length"),
        (lambda: fastattn.sinkhorn(np.ones(3)), "log_alpha"),
        (lambda: fastattn.sinkhorn(np.ones((2, 2)), n_iters=-1), "n_iters"),
        (lambda: fastattn.sinkhorn(np.full((2, 2), np.inf)), "log_alpha"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    z = q.astype(complex)
    for call in (lambda: lsh(z, v), lambda: cl(z, q, v, clusters=2),
                 lambda: sk(q, z, v, block_size=4), lambda: fastattn.sinkhorn(z)):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(TypeError, match="buckets"):
        lsh(q, v, buckets=np.zeros((1, 10)))
    with pytest.raises(TypeError, match="temperature"):
        sk(q, q, v, block_size=4, temperature="hot")
    with pytest.raises(TypeError, match="clusters"):
        cl(q, q, v, clusters=2.5)


@pytest.mark.parametrize("E,Ev", [(24, 16), (64, 64)])
def test_unmasked_float32_tiles_key_major(E, Ev):
    # float32 with Ev % 16 == 0 and blocks of >= 16 queries: the unmasked tiles (no
    # causal band, no self mask) take the key-major path of the tile core
    rng = np.random.default_rng(21)
    N = 300
    q, k = make(rng, (2, N, E), np.float32), make(rng, (2, N, E), np.float32)
    v = make(rng, (2, N, Ev), np.float32)
    full = reference.scaled_dot_product_attention(q, k, v)
    out = fastattn.clustered_attention(q, k, v, clusters=5, topk=N, rng=0)
    assert_close(out, full, np.float32)
    out = fastattn.lsh_attention(q, v, bucket_size=N, self_mask=False,
                                 buckets=np.zeros((1, N), dtype=int))
    assert_close(out, reference.scaled_dot_product_attention(q, shared_keys(q), v, scale=1.0),
                 np.float32)
    out = fastattn.sinkhorn_attention(q, k, v, block_size=64)
    assert_close(out, reference.sinkhorn_attention(q, k, v, block_size=64), np.float32)


# ---- threads: the parallel skeleton (fastattn/_kernels/parallel.pxd) ------------------------

@pytest.fixture
def chosen_threads(monkeypatch):
    """{calling function: threads call_threads chose there} for the calls of a test."""
    from fastattn import _threads
    import sys
    chosen, real = {}, _threads.call_threads

    def spy(bound, items, work):
        n = real(bound, items, work)
        caller = sys._getframe(1).f_code.co_name
        chosen[caller] = max(chosen.get(caller, 0), n)
        return n
    monkeypatch.setattr(_threads, "call_threads", spy)
    return chosen


@pytest.mark.parametrize("dtype, causal, self_mask", [(np.float32, False, False),
                                                      (np.float64, True, True)])
def test_lsh_identical_for_every_thread_count(dtype, causal, self_mask, chosen_threads):
    # Every item of the hash (a row block), of the gathered attention (a chunk's rows and
    # their keys) and of the merge (an output row) is summed in one fixed order by
    # whichever thread takes it: LSH attention is bit-identical for any thread count.
    rng = np.random.default_rng(30)
    q, v = make(rng, (2, 4, 1024, 64), dtype), make(rng, (2, 4, 1024, 64), dtype)
    kw = dict(n_hashes=2, bucket_size=64, causal=causal, self_mask=self_mask, rng=3,
              return_lse=True)
    want = fastattn.lsh_attention(q, v, num_threads=1, **kw)
    for n in range(2, 9):
        got = fastattn.lsh_attention(q, v, num_threads=n, **kw)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=f"num_threads={n}")
    assert all(chosen_threads[f] > 1 for f in ("_lsh_hash", "_gathered", "lsh_attention")), \
        chosen_threads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clustering_identical_for_every_thread_count(dtype, chosen_threads):
    # k-means items are whole batch entries (kmeans) or row blocks (nearest_centroid),
    # cluster sums whole entries, top-k items blocks of centroids: none depends on the
    # thread count. (Eight entries: every bound 1..8 takes the entry-per-thread kernel;
    # one long entry with bounds >= 2 splits each step's rows.)
    rng = np.random.default_rng(31)
    many, one = make(rng, (8, 1024, 32), dtype), make(rng, (1, 8192, 32), dtype)
    ks = make(rng, (8, 2048, 32), dtype)
    want_many = content_sparse._kmeans(many, 32, 6, np.random.default_rng(0), 1)
    want_one = content_sparse._kmeans(one, 64, 6, np.random.default_rng(0), 2)
    c64 = want_many[1]
    want_top = content_sparse._centroid_topk(c64.astype(dtype), c64, ks, 0.2, 16, 1)
    for n in range(2, 9):
        for got, want in ((content_sparse._kmeans(many, 32, 6, np.random.default_rng(0), n),
                           want_many),
                          (content_sparse._kmeans(one, 64, 6, np.random.default_rng(0), n),
                           want_one),
                          (content_sparse._centroid_topk(c64.astype(dtype), c64, ks, 0.2, 16,
                                                         n), want_top)):
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w, err_msg=f"num_threads={n}")
    assert all(chosen_threads[f] > 1 for f in ("_kmeans", "_centroid_topk")), chosen_threads


def test_sinkhorn_mixing_identical_for_every_thread_count(chosen_threads):
    # 16 batch entries: mix_blocks cuts no entry's columns for up to 8 threads, and the
    # dense kernel never splits keys, so every product is summed in one order
    rng = np.random.default_rng(32)
    q, k, v = (make(rng, (4, 4, 1024, 64), np.float32) for _ in range(3))
    want = fastattn.sinkhorn_attention(q, k, v, block_size=64, num_threads=1)
    for n in range(2, 9):
        np.testing.assert_array_equal(
            fastattn.sinkhorn_attention(q, k, v, block_size=64, num_threads=n), want,
            err_msg=f"num_threads={n}")
    assert chosen_threads["sinkhorn_attention"] > 1, chosen_threads


def _failing_calls(dtype):
    # One call per scratch-using kernel, each its first allocation, big enough for
    # call_threads to start two threads: (label of the scratch, call).
    rng = np.random.default_rng(33)
    q, v = make(rng, (2, 4, 512, 64), dtype), make(rng, (2, 4, 512, 64), dtype)
    buckets = rng.integers(0, 8, (2, 4, 1, 512))
    many, one = make(rng, (8, 1024, 32), dtype), make(rng, (1, 8192, 32), dtype)
    rot = np.random.default_rng(0).standard_normal((4, 64, 2, 8))
    c64 = rng.standard_normal((8, 32, 32))
    ks = make(rng, (8, 2048, 32), dtype)
    return [
        ("gathered attention tile buffers",
         lambda: fastattn.lsh_attention(q, v, buckets=buckets, num_threads=2)),
        ("LSH rotation tile", lambda: content_sparse._lsh_hash(many, rot, 2)),
        ("k-means buffers",
         lambda: content_sparse._kmeans(many, 32, 4, np.random.default_rng(0), 2)),
        ("k-means distance tile",
         lambda: content_sparse._kmeans(one, 64, 4, np.random.default_rng(0), 2)),
        ("top-k candidate buffers",
         lambda: content_sparse._centroid_topk(c64.astype(dtype), c64, ks, 0.2, 16, 2)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scratch_allocation_failure_raises_and_leaks_nothing(dtype):
    from fastattn._kernels import parallel
    for label, call in _failing_calls(dtype):
        want = call()
        try:
            for fail in (1, 2):  # the calling thread's block; and a worker's
                parallel.fail_next_allocations(fail)
                with pytest.raises(MemoryError, match=label):
                    call()
                parallel.fail_next_allocations(0)
                assert parallel.live_scratch_blocks() == 0, label
        finally:
            parallel.fail_next_allocations(0)
        got = call()
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            np.testing.assert_array_equal(g, w, err_msg=label)


def test_scratchless_kernels_allocate_nothing():
    # merge_parts, cluster_sums and mix_blocks need no scratch: a pending allocation
    # failure neither stops them nor is used up by them
    from fastattn._kernels import parallel, clustering, gathered
    rng = np.random.default_rng(34)
    parts, part_lse = make(rng, (4096, 3, 32), np.float32), make(rng, (4096, 3), np.float32)
    x, assign = make(rng, (4, 1000, 16)), rng.integers(0, 7, (4, 1000)).astype(np.intp)
    P, xb = make(rng, (16, 8, 8)), make(rng, (16, 8, 256))

    def run():
        out, lse = np.empty((4096, 32), np.float32), np.empty(4096, np.float32)
        gathered.merge_parts(parts, part_lse, out, lse, 2)
        sums, counts = np.zeros((4, 7, 16)), np.zeros((4, 7), np.intp)
        clustering.cluster_sums(x, assign, sums, counts, 2)
        mixed = np.empty_like(xb)
        clustering.mix_blocks(P, xb, mixed, 2)
        return out, lse, sums, counts, mixed

    want = run()
    np.testing.assert_allclose(want[4], P @ xb, rtol=1e-12)
    try:
        parallel.fail_next_allocations(1)
        for g, w in zip(run(), want):
            np.testing.assert_array_equal(g, w)
        with pytest.raises(MemoryError):        # still pending for the next scratch user
            content_sparse._lsh_hash(x, np.ones((16, 1, 4)), 2)
    finally:
        parallel.fail_next_allocations(0)
    assert parallel.live_scratch_blocks() == 0
