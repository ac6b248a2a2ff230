"""The block-sparse family speaks scaled_dot_product_attention's language: attn_mask,
is_causal (causal= deprecated), causal_alignment and grouped-query heads."""
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close, assert_lse_close

DTYPES = [np.float32, np.float64, np.float16, fastattn.bfloat16]


def dense_mask(layout_mask, attn_mask):
    """The layout's pattern and attn_mask as one mask for the dense reference."""
    if attn_mask is None:
        return layout_mask
    if attn_mask.dtype == bool:
        return layout_mask & attn_mask
    return np.where(layout_mask, 0.0, -np.inf) + attn_mask.astype(np.float64)


@st.composite
def problems(draw):
    # (empty L or S: test_empty_sequences; from_blocks of empty shapes is another issue's)
    L = draw(st.sampled_from([1, 5, 17, 40]))
    S = draw(st.sampled_from([1, 6, 23, 40]))
    bq, bk = draw(st.sampled_from([1, 4, 8, 16])), draw(st.sampled_from([1, 4, 8, 16]))
    Hq, Hkv = draw(st.sampled_from([(1, 1), (4, 2), (3, 1), (2, 2)]))
    per_head = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nqb, nkb = -(-L // bq), -(-S // bk)
    blocks = rng.random(((Hq,) if per_head else ()) + (nqb, nkb)) < 0.6
    rule = draw(st.sampled_from([{}, dict(window=(5, 2)), dict(is_causal=True),
                                 dict(global_key=[0] if S else None, window=(3, 3))]))
    if rule.get("global_key", 0) is None:
        rule = {}
    layout = fastattn.BlockLayout.from_blocks(blocks, (L, S), (bq, bk), **rule)
    mask_kind = draw(st.sampled_from([None, "bool", "float", "bool_rows"]))
    B = 2
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = rng.random((B, 1, L, S)) < 0.7
    elif mask_kind == "bool_rows":                 # per key, broadcast over rows; some empty
        attn_mask = rng.random((B, 1, 1, S)) < 0.5
    elif mask_kind == "float":
        attn_mask = rng.standard_normal((L, S)) * 2
        attn_mask[rng.random((L, S)) < 0.2] = -np.inf
    is_causal = draw(st.booleans())
    alignment = draw(st.sampled_from(["top_left", "bottom_right"]))
    dtype = draw(st.sampled_from(DTYPES))
    E, Ev = draw(st.sampled_from([(4, 4), (8, 3), (16, 16)]))
    q = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    if mask_kind == "float":
        attn_mask = attn_mask.astype(np.float32 if dtype != np.float64 else np.float64)
    return q, k, v, layout, attn_mask, is_causal, alignment, dtype


@given(p=problems())
def test_random_problems_match_dense_reference(p):
    q, k, v, layout, attn_mask, is_causal, alignment, dtype = p
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, attn_mask, is_causal=is_causal,
                                               causal_alignment=alignment, enable_gqa=True,
                                               return_lse=True)
    mask = dense_mask(layout.to_mask(), attn_mask)
    want, want_lse = reference.scaled_dot_product_attention(
        q, k, v, mask, is_causal=is_causal, causal_alignment=alignment, enable_gqa=True,
        return_lse=True)
    assert out.dtype == np.dtype(dtype) and out.shape == want.shape
    assert_close(out, want, dtype)
    assert_lse_close(lse, want_lse, dtype if dtype in (np.float32, np.float64) else np.float32)


def test_empty_sequences(rng):
    for L, S in ((0, 5), (4, 0)):
        layout = fastattn.BlockLayout((L, S), 4, [0] * (-(-L // 4) + 1), [])
        q = rng.standard_normal((2, 4, L, 8))
        k, v = (rng.standard_normal((2, 2, S, 8)) for _ in range(2))
        out, lse = fastattn.block_sparse_attention(q, k, v, layout, np.ones((L, S), bool),
                                                   is_causal=True, enable_gqa=True,
                                                   return_lse=True)
        assert out.shape == (2, 4, L, 8) and not out.any() and np.isneginf(lse).all()


def test_equals_scaled_dot_product_attention_call_for_call(rng):
    # the same arguments as the dense call, the layout on top: identical semantics
    q = rng.standard_normal((2, 4, 50, 8), dtype=np.float32)
    k, v = (rng.standard_normal((2, 2, 70, 8), dtype=np.float32) for _ in range(2))
    layout = fastattn.BlockLayout.from_rule((50, 70), 16, window=(40, 40))
    pad = fastattn.padding_mask([70, 33], 70)
    for alignment in ("top_left", "bottom_right"):
        got = fastattn.block_sparse_attention(q, k, v, layout, pad, is_causal=True,
                                              causal_alignment=alignment, enable_gqa=True)
        want = fastattn.scaled_dot_product_attention(q, k, v, pad & layout.to_mask(),
                                                     is_causal=True, causal_alignment=alignment,
                                                     enable_gqa=True)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_grouped_query_heads_are_not_repeated(monkeypatch, rng):
    import fastattn.sparse as sparse
    seen = {}
    real = sparse.AttentionPlan

    def spy(q, k, v, *args, **kwargs):
        seen["k"], seen["v"] = k, v
        return real(q, k, v, *args, **kwargs)
    monkeypatch.setattr(sparse, "AttentionPlan", spy)
    q = rng.standard_normal((1, 8, 64, 16), dtype=np.float32)
    k, v = (rng.standard_normal((1, 2, 64, 16), dtype=np.float32) for _ in range(2))
    layout = fastattn.BlockLayout.from_rule((64, 64), 16, window=(16, 0))
    out = fastattn.block_sparse_attention(q, k, v, layout, enable_gqa=True)
    assert seen["k"] is k and seen["v"] is v                     # read in place, not repeated
    want = fastattn.block_sparse_attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1),
                                           layout)
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        fastattn.block_sparse_attention(q, k, v, layout)         # heads differ, no enable_gqa
    with pytest.raises(ValueError, match="must divide the query heads"):
        fastattn.block_sparse_attention(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1), layout,
                                        enable_gqa=True)


def test_float_mask_with_element_rule_tiles(rng):
    # tiles where the rule builds an element mask and a float attn_mask applies: the
    # combined additive tile (and its -inf where the rule drops pairs)
    q, k, v = (rng.standard_normal((3, 37, 8)) for _ in range(3))
    layout = fastattn.BlockLayout.from_rule((37, 37), 8, window=(6, 1), dilation=2,
                                            global_key=[3])
    fm = rng.standard_normal((3, 37, 37))
    fm[:, :, 10:20] = -np.inf
    got, lse = fastattn.block_sparse_attention(q, k, v, layout, fm, return_lse=True)
    want, want_lse = reference.scaled_dot_product_attention(
        q, k, v, dense_mask(layout.to_mask(), fm), return_lse=True)
    assert_close(got, want, np.float64)
    assert_lse_close(lse, want_lse, np.float64)


def test_attn_mask_skips_tiles_it_rules_out(monkeypatch, rng):
    # a mask that rules out whole tiles: same result, and its block map is what the
    # kernel reads (prepared with the layout's block sizes)
    import fastattn.sparse as sparse
    sizes = []
    real = sparse.PreparedMask

    def spy(mask, dtype, L, S, batch_shape, bq, bk):
        sizes.append((bq, bk))
        return real(mask, dtype, L, S, batch_shape, bq, bk)
    monkeypatch.setattr(sparse, "PreparedMask", spy)
    q, k, v = (rng.standard_normal((64, 8)) for _ in range(3))
    layout = fastattn.BlockLayout.from_rule((64, 64), (16, 32))
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    got = fastattn.block_sparse_attention(q, k, v, layout, mask)
    assert sizes == [(16, 32)]
    assert_close(got, reference.scaled_dot_product_attention(q[None], k, v, mask)[0],
                 np.float64)


def test_patterns_take_the_same_keywords(rng):
    q = rng.standard_normal((2, 4, 90, 8))
    k, v = (rng.standard_normal((2, 2, 90, 8)) for _ in range(2))
    pad = fastattn.padding_mask([90, 61], 90)
    L = S = 90
    local = reference.local_keep(L, S, (10, 10))
    cases = [
        (fastattn.local_attention(q, k, v, (10, 10), attn_mask=pad, is_causal=True,
                                  enable_gqa=True), local),
        (fastattn.global_attention(q, k, v, [0], window=(4, 4), attn_mask=pad, is_causal=True,
                                   enable_gqa=True), reference.global_keep(L, S, [0])
         | reference.local_keep(L, S, (4, 4))),
        (fastattn.longformer_attention(q, k, v, 10, [0], attn_mask=pad, is_causal=True,
                                       enable_gqa=True), local | reference.global_keep(L, S, [0])),
        (fastattn.strided_attention(q, k, v, 8, attn_mask=pad, enable_gqa=True),
         reference.strided_keep(L, S, 8)),
    ]
    for i, (got, keep) in enumerate(cases):
        causal = i < 3
        want = reference.scaled_dot_product_attention(q, k, v, pad & keep, is_causal=causal,
                                                      enable_gqa=True)
        assert_close(got, want, np.float64)
    out = fastattn.bigbird_attention(q[..., :64, :], k[..., :64, :], v[..., :64, :],
                                     block_size=16, rng=3, attn_mask=pad[..., :64],
                                     enable_gqa=True)
    layout = fastattn.bigbird_layout(64, num_heads=4, block_size=16, rng=3)
    want = reference.scaled_dot_product_attention(q[..., :64, :], k[..., :64, :],
                                                  v[..., :64, :], pad[..., :64] & layout.to_mask(),
                                                  enable_gqa=True)
    assert_close(out, want, np.float64)


def test_patterns_is_causal_is_bottom_right(rng):
    # positions in the pattern functions are bottom-right aligned, the causal limit too
    q = rng.standard_normal((10, 8))
    k, v = (rng.standard_normal((30, 8)) for _ in range(2))
    got = fastattn.local_attention(q, k, v, (5, 5), is_causal=True)
    want = fastattn.local_attention(q, k, v, (5, 0))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_causal_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="use is_causal=") as record:
        old = fastattn.BlockLayout((4, 4), 2, [0, 1, 3], [0, 0, 1], causal=True)
    assert record[0].filename == __file__
    new = fastattn.BlockLayout((4, 4), 2, [0, 1, 3], [0, 0, 1], is_causal=True)
    np.testing.assert_array_equal(old.to_mask(), new.to_mask())
    with pytest.warns(DeprecationWarning) as record:
        layout = fastattn.BlockLayout.from_rule((8, 8), 2, window=(2, 0), causal=True)
    assert len(record) == 1 and record[0].filename == __file__
    assert layout.is_causal
    with pytest.warns(DeprecationWarning, match="BlockLayout.is_causal"):
        assert layout.causal is True
    with pytest.raises(ValueError, match="contradict"):
        fastattn.BlockLayout((4, 4), 2, [0, 1, 3], [0, 0, 1], is_causal=True, causal=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastattn.BlockLayout.from_rule((8, 8), 2, is_causal=True)
        fastattn.strided_attention(np.ones((8, 4)), np.ones((8, 4)), np.ones((8, 4)), 2)


def test_bad_sparse_inputs(rng):
    q = np.ones((8, 4))
    layout = fastattn.BlockLayout.from_rule((8, 8), 4)
    with pytest.raises(ValueError, match="causal_alignment"):
        fastattn.block_sparse_attention(q, q, q, layout, is_causal=True, causal_alignment="top")
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        fastattn.block_sparse_attention(q, q, q, layout, np.ones((8, 8), np.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        fastattn.block_sparse_attention(q, q, q, layout, np.ones((3, 8), bool))
