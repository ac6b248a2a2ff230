"""multi_head_attention / MultiHeadAttention against the head-by-head reference and torch."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import _linear, _threads, reference
from helpers import assert_close, threads_spy


def weights(rng, E, Eq, Ek, Ev, H, Hkv, Eout, dtype, bias=True):
    D = E // H
    w = dict(q_weight=rng.standard_normal((E, Eq)) / np.sqrt(Eq),
             k_weight=rng.standard_normal((Hkv * D, Ek)) / np.sqrt(Ek),
             v_weight=rng.standard_normal((Hkv * D, Ev)) / np.sqrt(Ev),
             out_weight=rng.standard_normal((Eout, E)) / np.sqrt(E))
    if bias:
        w.update(q_bias=rng.standard_normal(E), k_bias=rng.standard_normal(Hkv * D),
                 v_bias=rng.standard_normal(Hkv * D), out_bias=rng.standard_normal(Eout))
    return {n: a.astype(dtype) for n, a in w.items()}


@given(L=st.integers(1, 20), S=st.integers(1, 20), heads=st.sampled_from([(1, 1), (4, 4),
       (4, 2), (6, 1)]), D=st.sampled_from([1, 4, 8]), cross=st.booleans(),
       causal=st.booleans(), padding=st.booleans(), dtype=st.sampled_from([np.float32,
                                                                           np.float64]),
       seed=st.integers(0, 2**32 - 1))
def test_random_shapes_match_reference(L, S, heads, D, cross, causal, padding, dtype, seed):
    rng = np.random.default_rng(seed)
    H, Hkv = heads
    E = H * D
    B = 2
    x = rng.standard_normal((B, L, E)).astype(dtype)
    if cross:
        mem = rng.standard_normal((B, S, 5)).astype(dtype)
        w = weights(rng, E, E, 5, 5, H, Hkv, 7, dtype)
        q, k, v = x, mem, mem
    else:
        S = L
        w = weights(rng, E, E, E, E, H, Hkv, E, dtype)
        q = k = v = x
    kpm = None
    if padding:
        kpm = fastattn.padding_mask(rng.integers(1, S + 1, B), S)[:, 0, 0]
    out, avg = fastattn.multi_head_attention(q, k, v, H, **w, num_kv_heads=Hkv,
                                             key_padding_mask=kpm, is_causal=causal,
                                             need_weights=True)
    ref_out, ref_avg = reference.multi_head_attention(q, k, v, H, **w, num_kv_heads=Hkv,
                                                      key_padding_mask=kpm, is_causal=causal,
                                                      need_weights=True)
    assert out.dtype == dtype and avg.dtype == dtype
    assert_close(out, ref_out, dtype)
    assert_close(avg, ref_avg, dtype)


def test_attn_mask_per_head_and_unbatched(rng):
    H, D, L = 3, 4, 6
    w = weights(rng, H * D, H * D, H * D, H * D, H, H, H * D, np.float64)
    x = rng.standard_normal((L, H * D))
    mask = rng.random((H, L, L)) > 0.3
    out = fastattn.multi_head_attention(x, x, x, H, **w, attn_mask=mask)
    assert out.shape == (L, H * D)
    assert_close(out, reference.multi_head_attention(x, x, x, H, **w, attn_mask=mask),
                 np.float64)
    fm = rng.standard_normal((L, L))
    assert_close(fastattn.multi_head_attention(x, x, x, H, **w, attn_mask=fm),
                 reference.multi_head_attention(x, x, x, H, **w, attn_mask=fm), np.float64)
    # head weights: a mask that adds a batch axis, float and bool, with a grouped key head
    wg = weights(rng, H * D, H * D, H * D, H * D, H, 1, H * D, np.float64)
    masks = (rng.random((2, H, L, L)) > 0.3, rng.standard_normal((2, 1, 1, L)).astype(np.float32))
    for m in masks:
        got = fastattn.multi_head_attention(x, x, x, H, **wg, num_kv_heads=1, attn_mask=m,
                                            need_weights=True, is_causal=m.dtype == bool)
        want = reference.multi_head_attention(x, x, x, H, **wg, num_kv_heads=1, attn_mask=m,
                                              need_weights=True, is_causal=m.dtype == bool)
        for g, r in zip(got, want):
            assert g.shape == r.shape and g.shape[0] == 2
            assert_close(g, r, np.float64)


def test_no_bias_and_dtype_promotion(rng):
    w = weights(rng, 8, 8, 8, 8, 2, 2, 8, np.float32, bias=False)
    x = rng.standard_normal((3, 8))
    out = fastattn.multi_head_attention(x, x, x, 2, **w)
    assert out.dtype == np.float64
    assert_close(out, reference.multi_head_attention(x, x, x, 2, **w), np.float64)


def test_heads_are_views_of_the_projections(monkeypatch, rng):
    # the attention kernel must receive strided views of the projections, no copies
    import fastattn.multihead as mh
    seen = {}
    real = mh.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen["q"] = q
        return real(q, k, v, *args, **kw)
    monkeypatch.setattr(mh, "scaled_dot_product_attention", spy)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    w = weights(rng, 12, 12, 12, 12, 3, 3, 12, np.float32)
    fastattn.multi_head_attention(x, x, x, 3, **w)
    q = seen["q"]
    assert q.shape == (2, 3, 5, 4) and not q.flags.owndata and q.strides[-2] == 12 * 4


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    E, H, B, L, S = 16, 4, 2, 5, 7
    torch.manual_seed(0)
    for kdim in (None, 6):
        m = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        sd = {n: t.detach().numpy() for n, t in m.state_dict().items()}
        mha = fastattn.MultiHeadAttention.from_torch_state_dict(sd, H)
        q = rng.standard_normal((B, L, E)).astype(np.float32)
        kv = rng.standard_normal((B, S, kdim or E)).astype(np.float32)
        keep = fastattn.padding_mask([7, 4], S)[:, 0, 0]
        want, want_w = m(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
                         key_padding_mask=torch.from_numpy(~keep), need_weights=True)
        got, got_w = mha(q, kv, kv, key_padding_mask=keep, need_weights=True)
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_w, want_w.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_class_init_is_seeded_xavier(rng):
    a = fastattn.MultiHeadAttention(32, 4, rng=7)
    b = fastattn.MultiHeadAttention(32, 4, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.q_weight, b.q_weight)
    bound = np.sqrt(6 / (96 + 32))
    assert abs(a.k_weight).max() <= bound and a.q_weight.dtype == np.float32
    np.testing.assert_array_equal(a.out_bias, 0)
    g = fastattn.MultiHeadAttention(32, 4, num_kv_heads=2, kdim=10, vdim=6, bias=False, rng=0)
    assert g.k_weight.shape == (16, 10) and g.v_weight.shape == (16, 6) and g.q_bias is None
    x, mem = rng.standard_normal((3, 32)), rng.standard_normal((5, 10))
    assert g(x, mem, rng.standard_normal((5, 6))).shape == (3, 32)


def test_split_merge_heads(rng):
    x = rng.standard_normal((2, 5, 12))
    h = fastattn.split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4) and np.shares_memory(h, x)
    np.testing.assert_array_equal(h[:, 1], x[:, :, 4:8])
    np.testing.assert_array_equal(fastattn.merge_heads(h), x)
    with pytest.raises(ValueError, match="5"):
        fastattn.split_heads(np.ones((2, 5)), 2)
    with pytest.raises(ValueError):
        fastattn.merge_heads(np.ones((2, 5)))


def test_bad_inputs(rng):
    x = np.ones((2, 4, 8))
    w = weights(rng, 8, 8, 8, 8, 2, 2, 8, np.float64)
    mha = fastattn.multi_head_attention
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        mha(x, x, x, 3, **w)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=2"):
        mha(x, x, x, 2, **w, num_kv_heads=3)
    bad = dict(w, k_weight=np.ones((8, 5)))
    with pytest.raises(ValueError, match=r"k_weight.*\(8, 5\)"):
        mha(x, x, x, 2, **bad)
    with pytest.raises(ValueError, match=r"k_weight must have 4 rows"):
        mha(x, x, x, 2, **w, num_kv_heads=1)
    with pytest.raises(ValueError, match="out_weight"):
        mha(x, x, x, 2, **dict(w, out_weight=np.ones((8, 6))))
    with pytest.raises(ValueError, match="q_bias"):
        mha(x, x, x, 2, **dict(w, q_bias=np.ones(5)))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, 2, **w, key_padding_mask=np.ones((2, 3), bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        mha(x, x, x, 2, **w, key_padding_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, 2, **w, attn_mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="do not broadcast"):
        mha(x, np.ones((3, 4, 8)), np.ones((3, 4, 8)), 2, **w)
    with pytest.raises(ValueError, match="same length"):
        mha(x, x, np.ones((2, 5, 8)), 2, **w)
    with pytest.raises(ValueError, match="device"):
        mha(x, x, x, 2, **w, device="gpu")
    with pytest.raises(ValueError, match="num_heads"):
        mha(x, x, x, 0, **w)
    with pytest.raises(ValueError, match="add_bias_kv"):
        fastattn.MultiHeadAttention.from_torch_state_dict(
            {"in_proj_weight": np.ones((24, 8)), "bias_k": np.ones((1, 1, 8)),
             "out_proj.weight": np.ones((8, 8))}, 2)
    with pytest.raises(KeyError, match="out_proj.weight"):
        fastattn.MultiHeadAttention.from_torch_state_dict({"in_proj_weight": np.ones((24, 8))},
                                                          2)
    with pytest.raises(ValueError, match="must divide"):
        fastattn.MultiHeadAttention(10, 3)


def test_strided_inputs_transposed_weights_and_broadcast(rng):
    # inputs sliced along rows and features, a query broadcast against batched keys,
    # weights given transposed (a C-ordered (in, out) array's .T), strided and reversed,
    # an int64 bias
    H, D, B, L, S = 4, 3, 2, 5, 7
    E = H * D
    w = weights(rng, E, E, 6, 6, H, 2, 9, np.float64)
    w["q_weight"] = np.ascontiguousarray(w["q_weight"].T).T
    w["k_weight"] = np.repeat(w["k_weight"], 2, axis=0)[::2]
    w["v_weight"] = np.ascontiguousarray(w["v_weight"][:, ::-1])[:, ::-1]
    w["out_bias"] = np.arange(9)
    q = rng.standard_normal((L, 2 * E))[:, ::2]
    mem = rng.standard_normal((B, 2 * S, 6))[:, ::2]
    for kw in ({}, dict(is_causal=True, need_weights=True)):
        got = fastattn.multi_head_attention(q, mem, mem, H, **w, num_kv_heads=2, **kw)
        want = reference.multi_head_attention(q, mem, mem, H, **w, num_kv_heads=2, **kw)
        got, want = (got, want) if kw else ((got,), (want,))
        for g, r in zip(got, want):
            assert g.shape == r.shape
            assert_close(g, r, np.float64)


# ---- heads written in place, the batch in chunks ---------------------------------------

@pytest.fixture
def chunks_of_two(monkeypatch):
    """Chunks of 2 sequences of L = 6 rows (3 rows per thread, 2 threads), with a record
    of the chunks each call went through."""
    import fastattn.multihead as mh
    monkeypatch.setattr(mh, "CHUNK_ROWS_PER_THREAD", 6)
    seen = []
    real = mh._Layer.attend

    def spy(self, q, k, v, mask, work=None, out=None, weights=None):
        seen.append((q.shape[0], None if work is None else work[3]))
        return real(self, q, k, v, mask, work, out, weights)
    monkeypatch.setattr(mh._Layer, "attend", spy)
    return seen


def _mha_both(x, mem, H, w, **kw):
    got = fastattn.multi_head_attention(x, mem, mem, H, **w, num_threads=2, **kw)
    kw.pop("device", None)
    want = reference.multi_head_attention(x, mem, mem, H, **w, **kw)
    got, want = (got, want) if kw.get("need_weights") else ((got,), (want,))
    for g, r in zip(got, want):
        assert g.shape == r.shape
        assert_close(g, r, np.float64)


@pytest.mark.parametrize("B", [4, 5])
def test_chunked_batch_matches_reference(rng, chunks_of_two, B):
    # B a multiple of the chunk and not; masks per sequence and shared, padding, causal,
    # grouped KV heads, cross-attention (L != S), head weights
    H, D, L, S = 4, 3, 6, 7
    E = H * D
    x = rng.standard_normal((B, L, E))
    mem = rng.standard_normal((B, S, 5))
    w = weights(rng, E, E, 5, 5, H, 2, 9, np.float64)
    keep = fastattn.padding_mask(rng.integers(1, S + 1, B), S)[:, 0, 0]
    cases = [dict(attn_mask=rng.random((L, S)) > 0.3),
             dict(attn_mask=rng.standard_normal((B, 1, L, S))),
             dict(attn_mask=rng.random((B, H, L, S)) > 0.2, need_weights=True),
             dict(key_padding_mask=keep, attn_mask=rng.random((1, H, L, S)) > 0.2),
             dict(key_padding_mask=keep, need_weights=True),
             dict(is_causal=True, need_weights=True)]
    for kw in cases:
        chunks_of_two.clear()
        _mha_both(x, mem, H, dict(w), num_kv_heads=2, **kw)
        assert [n for n, _ in chunks_of_two] == [2, 2] + [B - 4] * (B > 4)
        # one set of work buffers for every chunk
        assert all(np.shares_memory(m, chunks_of_two[0][1]) for _, m in chunks_of_two)


def test_chunked_batch_shapes_and_fallbacks(rng, chunks_of_two):
    H, D, L = 2, 4, 6
    E = H * D
    w = weights(rng, E, E, E, E, H, H, E, np.float64)
    # two batch axes, flattened for chunking; a mask with both of them
    x = rng.standard_normal((2, 3, L, E))
    _mha_both(x, x, H, w, attn_mask=rng.random((2, 3, 1, L, L)) > 0.2, need_weights=True)
    assert [n for n, _ in chunks_of_two] == [2, 2, 2]
    # a batch axis that does not flatten without a copy (sliced): one shot; so do
    # inputs whose batch axes broadcast, masks adding or broadcasting within the batch
    # axes, and a batch of one chunk
    one_shot = [(x[:, ::2], x[:, ::2], {}),
                (x[:1], x, {}),
                (x, x, dict(attn_mask=np.ones((4, 1, 1, 1, L, L), bool))),
                (x, x, dict(attn_mask=rng.random((1, 3, 1, L, L)) > 0.2)),
                (x[0, :2], x[0, :2], {})]
    for q, kv, kw in one_shot:
        chunks_of_two.clear()
        _mha_both(q, kv, H, w, **kw)
        assert [work for _, work in chunks_of_two] == [None]


def test_chunked_float32_and_decode(rng, chunks_of_two):
    # float32 end to end; one query row per sequence (all of it one chunk)
    H, D = 4, 8
    E = H * D
    w = weights(rng, E, E, E, E, H, H, E, np.float32)
    x = rng.standard_normal((7, 6, E)).astype(np.float32)
    out = fastattn.multi_head_attention(x, x, x, H, **w, is_causal=True, num_threads=2)
    assert out.dtype == np.float32 and len(chunks_of_two) == 4
    assert_close(out, reference.multi_head_attention(x, x, x, H, **w, is_causal=True),
                 np.float32)
    chunks_of_two.clear()
    q, mem = x[:, :1], rng.standard_normal((7, 40, E)).astype(np.float32)
    assert_close(fastattn.multi_head_attention(q, mem, mem, H, **w, num_threads=2),
                 reference.multi_head_attention(q, mem, mem, H, **w), np.float32)
    assert len(chunks_of_two) == 1


def test_heads_are_written_into_the_merged_array(monkeypatch, rng):
    # the attention kernel fills a split_heads view of the array the output projection
    # reads: no merge copy
    import fastattn.multihead as mh
    seen = {}
    real_sdpa, real_linear = mh.scaled_dot_product_attention, _linear.linear

    def sdpa_spy(*args, out=None, **kw):
        seen["out"] = out
        return real_sdpa(*args, out=out, **kw)

    def linear_spy(*projections, **kw):
        seen.setdefault("x", []).append(projections[0][0])
        return real_linear(*projections, **kw)
    monkeypatch.setattr(mh, "scaled_dot_product_attention", sdpa_spy)
    monkeypatch.setattr(_linear, "linear", linear_spy)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    w = weights(rng, 12, 12, 12, 12, 3, 3, 12, np.float32)
    fastattn.multi_head_attention(x, x, x, 3, **w)
    merged = seen["x"][-1]
    assert merged.shape == (2, 5, 12) and merged.flags.c_contiguous
    assert seen["out"].shape == (2, 3, 5, 4) and seen["out"].base is not None
    assert np.shares_memory(seen["out"], merged)


# ---- the shared projection (fastattn._linear, also behind additive attention) -----

def _linear_call(function, *args, **kwargs):
    # as the library calls it: BLAS single-threaded inside fastattn's threads
    with _threads.single_threaded_blas():
        return function(*args, **kwargs)


def _layout(a, how):
    # the same values as `a`, laid out as named
    if how == "sliced_rows" and a.ndim >= 2:
        big = np.repeat(a, 2, axis=-2)
        return big[..., ::2, :]
    if how == "sliced_cols":
        return np.repeat(a, 2, axis=-1)[..., ::2]
    if how == "swapped" and a.ndim >= 3:
        return np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1)
    if how == "reversed" and a.ndim >= 2:
        return np.ascontiguousarray(a[::-1])[::-1]
    if how == "fortran":
        return np.asfortranarray(a)
    return a


@given(lead=st.lists(st.integers(0, 4), max_size=3), e=st.integers(0, 9),
       h=st.sampled_from([0, 1, 5, 16, 70, 130]), bias=st.booleans(),
       x_layout=st.sampled_from(["c", "sliced_rows", "sliced_cols", "swapped", "reversed"]),
       w_layout=st.sampled_from(["c", "fortran", "sliced_rows", "sliced_cols", "reversed"]),
       dtype=st.sampled_from([np.float32, np.float64]), nthreads=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_linear_matches_matmul(lead, e, h, bias, x_layout, w_layout, dtype, nthreads, seed):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(tuple(lead) + (e,)).astype(dtype)
    w0 = rng.standard_normal((h, e)).astype(dtype)
    b0 = rng.standard_normal(h).astype(dtype) if bias else None
    x, w = _layout(x0, x_layout), _layout(w0, w_layout)
    out, = _linear_call(_linear.linear, (x, w, b0), nthreads=nthreads)
    want = x0.astype(np.float64) @ w0.astype(np.float64).T
    if bias:
        want += b0
    assert out.dtype == dtype and out.flags.c_contiguous
    assert_close(out, want, dtype)


def test_linear_blocks_and_threads(monkeypatch, rng):
    # many small row blocks with ragged ends, and few rows split over output columns
    # (decoding); the result does not depend on how the work is cut
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)      # threads even for tiny work
    x = rng.standard_normal((3, 37, 20))
    w, b = rng.standard_normal((150, 20)), rng.standard_normal(150)
    want = x @ w.T + b
    for rows_min, rows_max, threads in ((1, 4, 3), (8, 8, 2), (32, 256, 1), (32, 256, 4)):
        monkeypatch.setattr(_linear, "BLOCK_ROWS_MIN", rows_min)
        monkeypatch.setattr(_linear, "BLOCK_ROWS_MAX", rows_max)
        out, = _linear_call(_linear.linear, (x, w, b), nthreads=threads)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    assert _linear._blocks(1, 2, 150, 4) == (2, 64)         # 2 rows: columns split
    assert _linear._blocks(1, 4096, 512, 2) == (256, 512)
    few = x[:, -1]                                           # (3, 20), row stride 37*20
    out, = _linear_call(_linear.linear, (few, w, None), nthreads=4)
    np.testing.assert_allclose(out, few @ w.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_bit_identical_for_any_thread_count(monkeypatch, rng, dtype):
    # blocks of BLOCK_ROWS_MAX rows and every output feature for 1..8 threads (rows
    # >= 4 * 8 * BLOCK_ROWS_MAX): the same gemms, so the same bits
    picked = threads_spy(monkeypatch)
    x = rng.standard_normal((2, 4096, 48)).astype(dtype)
    w, b = rng.standard_normal((80, 48)).astype(dtype), rng.standard_normal(80).astype(dtype)
    one, = _linear_call(_linear.linear, (x, w, b), nthreads=1)
    for threads in range(2, 9):
        out, = _linear_call(_linear.linear, (x, w, b), nthreads=threads)
        np.testing.assert_array_equal(out, one)
    assert max(picked) == 8


def test_linear_needs_no_scratch(rng):
    # the projections allocate no thread scratch: a pending allocation failure is not
    # theirs to meet (it stays pending), and no block is left behind
    from fastattn._kernels import parallel
    x, w = rng.standard_normal((1024, 64)), rng.standard_normal((64, 64))
    try:
        parallel.fail_next_allocations(1)
        out, = _linear_call(_linear.linear, (x, w, None), nthreads=4)
        with pytest.raises(MemoryError):          # the next kernel with scratch meets it
            fastattn.log_softmax(x, num_threads=1)
    finally:
        parallel.fail_next_allocations(0)
    assert parallel.live_scratch_blocks() == 0
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-12, atol=1e-12)


def test_linear_weight_layouts_are_not_copied(rng):
    w = rng.standard_normal((6, 5)).astype(np.float32)
    for view, transposed in ((w, False), (np.asfortranarray(w), True),
                             (np.repeat(w, 2, axis=0)[::2], False)):
        a, _, t = _linear._weight(view, np.float32, allow_transposed=True)
        assert t == transposed and np.shares_memory(a, view)
    # kp.T = W @ x.T (additive's key projection) takes only the (out, in) layout
    a, ld, t = _linear._weight(np.asfortranarray(w), np.float32, allow_transposed=False)
    assert not t and a.flags.c_contiguous and ld == 5


def test_linear_into_given_arrays_and_whole_blocks(rng):
    x = rng.standard_normal((3, 40, 20))
    w, b = rng.standard_normal((50, 20)), rng.standard_normal(50)
    dest = np.full((3, 40, 50), np.nan)
    for whole in (False, True):
        out, fresh = _linear_call(_linear.linear, (x, w, b), (x[0], w, None), nthreads=2,
                                  out=[dest, None], whole_blocks=whole)
        assert out is dest and fresh.shape == (40, 50)
        np.testing.assert_allclose(dest, x @ w.T + b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(fresh, x[0] @ w.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="C-contiguous"):
        _linear_call(_linear.linear, (x, w, b), nthreads=2, out=[dest[:, ::2]])
    # whole blocks: a multiple of the threads, equal, at most BLOCK_ROWS_MAX rows, every
    # output feature; too few rows fall back to the usual cut
    assert _linear._blocks(1, 512, 768, 2, whole=True) == (256, 768)
    assert _linear._blocks(1, 300, 768, 2, whole=True) == (150, 768)
    assert _linear._blocks(1, 2048, 768, 2, whole=True) == (256, 768)
    assert _linear._blocks(1, 40, 768, 2, whole=True) == _linear._blocks(1, 40, 768, 2)


def test_stacked_abt_broadcast_and_grouped(rng):
    # per-head scores q_h @ k_h.T: a broadcast query stack, grouped key heads read in place
    a = rng.standard_normal((3, 1, 4, 5)).astype(np.float32)
    b = rng.standard_normal((2, 6, 5)).astype(np.float32)[:, ::2]      # 2 heads, 3 rows
    out = _linear_call(_linear.stacked_abt, a, b, (3, 4), 2, group_axis=1, group=2)
    want = a.astype(np.float64) @ np.repeat(b, 2, axis=0).swapaxes(-1, -2)
    assert out.shape == (3, 4, 4, 3) and out.dtype == np.float32
    assert_close(out, np.broadcast_to(want, (3, 4, 4, 3)), np.float32)
