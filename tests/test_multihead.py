"""multi_head_attention / MultiHeadAttention against the head-by-head reference and torch."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close


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


def test_no_bias_and_dtype_promotion(rng):
    w = weights(rng, 8, 8, 8, 8, 2, 2, 8, np.float32, bias=False)
    x = rng.standard_normal((3, 8))
    out = fastattn.multi_head_attention(x, x, x, 2, **w)
    assert out.dtype == np.float64
    assert_close(out, reference.multi_head_attention(x, x, x, 2, **w), np.float64)


def test_projections_are_one_matmul_and_heads_are_views(monkeypatch, rng):
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
