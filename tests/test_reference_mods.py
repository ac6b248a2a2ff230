"""fastattn.reference's score modifiers and varlen attention against flash-attn's
documented formulas (flash_attn_interface.py docstrings; attention_ref,
construct_local_mask and attn_bias_from_alibi_slopes in flash-attn's tests).

Each test names the formula it checks. Notation: query i, key j, off = 0 (top_left) or
S - L (bottom_right, flash-attn's alignment).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastattn import reference


def _loops_window(L, S, left, right, off):
    # [W] flash-attn window_size=(left, right), -1 = unbounded:
    #     i + off - left <= j <= i + off + right
    keep = np.zeros((L, S), dtype=bool)
    for i in range(L):
        for j in range(S):
            keep[i, j] = ((left == -1 or j >= i + off - left)
                          and (right == -1 or j <= i + off + right))
    return keep


def test_window_docstring_causal_examples():
    # [W] with window (-1, 0) = flash-attn's causal mask, bottom-right aligned; the two
    # examples of flash_attn_varlen_func's docstring (seqlen_q=2, seqlen_k=5 and 5, 2)
    np.testing.assert_array_equal(reference.window_keep(2, 5, (-1, 0), "bottom_right"),
                                  [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(reference.window_keep(5, 2, (None, 0), "bottom_right"),
                                  [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])


@given(L=st.integers(0, 12), S=st.integers(0, 12), left=st.integers(-1, 14),
       right=st.integers(-1, 14), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_window_keep_is_the_band(L, S, left, right, alignment):
    # [W] element by element, -1 and None both unbounded
    off = 0 if alignment == "top_left" else S - L
    want = _loops_window(L, S, left, right, off)
    np.testing.assert_array_equal(reference.window_keep(L, S, (left, right), alignment), want)
    as_none = tuple(None if w == -1 else w for w in (left, right))
    np.testing.assert_array_equal(reference.window_keep(L, S, as_none, alignment), want)


@given(L=st.integers(1, 9), S=st.integers(1, 9), H=st.integers(1, 3),
       alignment=st.sampled_from(["top_left", "bottom_right"]), batched=st.booleans())
def test_alibi_bias_formula(L, S, H, alignment, batched):
    # [A] alibi_slopes (H,) or (B, H): bias -slope * |i + off - j| (flash-attn's
    #     "-alibi_slope * |i + seqlen_k - seqlen_q - j|" for bottom_right)
    rng = np.random.default_rng(L * 100 + S)
    slopes = rng.uniform(0, 1, (2, H) if batched else (H,))
    off = 0 if alignment == "top_left" else S - L
    bias = reference.alibi_bias(slopes, L, S, alignment)
    assert bias.shape == slopes.shape + (L, S)
    for idx in np.ndindex(slopes.shape):
        for i in range(L):
            for j in range(S):
                assert bias[idx + (i, j)] == -slopes[idx] * abs(i + off - j)


def test_softcap_formula():
    # [C] softcap: s <- softcap * tanh(s / softcap)
    s = np.array([-1e9, -3.0, 0.0, 0.5, 40.0])
    np.testing.assert_allclose(reference.softcap_scores(s, 2.5), 2.5 * np.tanh(s / 2.5))


def _scores_by_hand(q, k, scale, softcap, slopes, mask, causal, window, alignment):
    # [O] flash-attn's order (attention_ref): scale, softcap, + ALiBi bias, then the
    #     mask, the causal band and the window as -inf
    L, S = q.shape[-2], k.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if slopes is not None:
        off = 0 if alignment == "top_left" else S - L
        d = np.abs(np.arange(L)[:, None] + off - np.arange(S)[None, :])
        s = s - np.asarray(slopes)[..., None, None] * d
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    keep = np.ones((L, S), dtype=bool)
    if causal:
        keep &= reference.causal_keep(L, S, alignment)
    if window is not None:
        off = 0 if alignment == "top_left" else S - L
        keep &= _loops_window(L, S, *[-1 if w is None else w for w in window], off)
    return np.where(keep, s, -np.inf)


@given(seed=st.integers(0, 2**32 - 1), L=st.integers(1, 7), S=st.integers(1, 7),
       softcap=st.sampled_from([None, 0.5, 3.0]), alibi=st.booleans(),
       mask=st.sampled_from([None, "bool", "float"]), causal=st.booleans(),
       window=st.sampled_from([None, (1, 0), (0, 0), (2, 1), (None, 1), (3, None)]),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_sdpa_modifier_order(seed, L, S, softcap, alibi, mask, causal, window, alignment):
    # [O] every modifier combination: the reference equals the softmax of the scores
    #     built by hand in flash-attn's order
    rng = np.random.default_rng(seed)
    H = 2
    q, k, v = rng.normal(size=(H, L, 4)), rng.normal(size=(H, S, 4)), rng.normal(size=(H, S, 3))
    slopes = rng.uniform(0, 1, H) if alibi else None
    m = None
    if mask == "bool":
        m = rng.random((L, S)) < 0.8
    elif mask == "float":
        m = rng.normal(size=(L, S))
    out, lse = reference.scaled_dot_product_attention(
        q, k, v, m, is_causal=causal, causal_alignment=alignment, return_lse=True,
        window=window, alibi_slopes=slopes, softcap=softcap)
    s = _scores_by_hand(q, k, 0.5, softcap, slopes, m, causal, window, alignment)
    mx = np.max(s, axis=-1, keepdims=True)
    safe = np.where(np.isfinite(mx), mx, 0)
    e = np.exp(s - safe)
    tot = e.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, (e / np.where(tot == 0, 1, tot)) @ v, atol=1e-12)
    with np.errstate(divide="ignore"):
        want_lse = np.where(tot[..., 0] == 0, -np.inf, safe[..., 0] + np.log(tot[..., 0]))
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)


def test_causal_alibi_matches_flash_attn_test_bias_up_to_lse():
    # [A] flash-attn's own test reference uses slope * (j - S + 1) when causal: the same
    #     softmax (a constant per row), an lse lower by slope * (i + off - S + 1)
    rng = np.random.default_rng(5)
    L, S, H = 4, 7, 2
    q, k, v = rng.normal(size=(H, L, 8)), rng.normal(size=(H, S, 8)), rng.normal(size=(H, S, 8))
    slopes = np.array([0.25, 0.75])
    ours, lse = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, causal_alignment="bottom_right", alibi_slopes=slopes,
        return_lse=True)
    theirs_bias = slopes[:, None, None] * (np.arange(S) - S + 1)[None, None, :]
    theirs, theirs_lse = reference.scaled_dot_product_attention(
        q, k, v, np.broadcast_to(theirs_bias, (H, L, S)), is_causal=True,
        causal_alignment="bottom_right", return_lse=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    shift = slopes[:, None] * (np.arange(L) + S - L - S + 1)[None, :]
    np.testing.assert_allclose(lse, theirs_lse - shift, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), lens=st.lists(st.tuples(st.integers(0, 6),
                                                               st.integers(0, 6)),
                                                     min_size=1, max_size=4),
       causal=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_varlen_reference_is_per_sequence(seed, lens, causal, alignment):
    # [V] flash-attn varlen: sequence b = rows cu_seqlens[b]:cu_seqlens[b+1] of the packed
    #     (total, H, E) arrays, attended alone; out (total_q, Hq, Ev), lse (Hq, total_q);
    #     GQA: query head h reads kv head h // (Hq / Hkv)
    rng = np.random.default_rng(seed)
    lq, lk = np.array(lens).T
    cq, ck = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    Hq, Hkv = 4, 2
    q = rng.normal(size=(cq[-1], Hq, 3))
    k = rng.normal(size=(ck[-1], Hkv, 3))
    v = rng.normal(size=(ck[-1], Hkv, 2))
    slopes = rng.uniform(0, 1, (len(lens), Hq))
    out, lse = reference.varlen_attention(q, k, v, cq, ck, is_causal=causal,
                                          causal_alignment=alignment, alibi_slopes=slopes,
                                          window=(2, None), return_lse=True)
    assert out.shape == (cq[-1], Hq, 2) and lse.shape == (Hq, cq[-1])
    for b in range(len(lens)):
        for h in range(Hq):
            qs, ks = q[cq[b]:cq[b + 1], h], k[ck[b]:ck[b + 1], h // 2]
            vs = v[ck[b]:ck[b + 1], h // 2]
            o, l_ = reference.scaled_dot_product_attention(
                qs, ks, vs, is_causal=causal, causal_alignment=alignment, return_lse=True,
                alibi_slopes=slopes[b, h:h + 1], window=(2, None))
            np.testing.assert_allclose(out[cq[b]:cq[b + 1], h], o[0] if o.ndim == 3 else o,
                                       atol=1e-12)
            np.testing.assert_array_equal(np.isneginf(lse[h, cq[b]:cq[b + 1]]),
                                          np.isneginf(np.reshape(l_, -1)))
