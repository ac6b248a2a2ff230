"""Score modifiers of scaled_dot_product_attention (window, alibi_slopes, softcap) against
fastattn.reference, which follows flash-attn's formulas (tests/test_reference_mods.py):

  [W] window (left, right): i + off - left <= j <= i + off + right, -1/None unbounded
  [A] alibi_slopes (H,) / (B, H): score += -slope * |i + off - j|
  [C] softcap: score <- softcap * tanh(score / softcap)
  [O] the order: scale, softcap, ALiBi, then attn_mask, causal band, window

with off = 0 (top_left) or S - L (bottom_right). Each test names what it checks.
"""
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
import fastattn.attention as attention
from fastattn import reference
from helpers import RTOL, assert_close, assert_lse_close

sdpa = fastattn.scaled_dot_product_attention
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, np.float16, BF16]


def check(q, k, v, mask=None, dtype=np.float32, **kw):
    """fastattn against the reference, output and lse; returns both."""
    out, lse = sdpa(q, k, v, mask, return_lse=True, **kw)
    ref_kw = {n: x for n, x in kw.items() if n not in ("num_threads", "out")}
    ref_out, ref_lse = reference.scaled_dot_product_attention(
        *(np.asarray(a, np.float64) for a in (q, k, v)), mask, return_lse=True, **ref_kw)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    return out, lse


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _window(draw, L, S):
    side = st.one_of(st.none(), st.just(-1), st.integers(0, 4),
                     st.integers(0, L + S + 3))           # beyond the sequence too
    return draw(st.one_of(st.none(), st.tuples(side, side)))


@st.composite
def problems(draw):
    L = draw(st.integers(1, 300))
    S = draw(st.integers(1, 300))
    Hkv = draw(st.integers(1, 2))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), L=L, S=S, B=draw(st.integers(1, 2)),
        Hkv=Hkv, group=draw(st.sampled_from([1, 2, 3])),
        E=draw(st.sampled_from([8, 16, 64, 80])), Ev=draw(st.sampled_from([5, 16, 64])),
        window=_window(draw, L, S), alibi=draw(st.sampled_from([None, "H", "BH"])),
        softcap=draw(st.sampled_from([None, 0.3, 5.0, 50.0])),
        mask=draw(st.sampled_from([None, "bool", "float"])), causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        tiles=draw(st.sampled_from([None, (128, 32), (5, 7), (64, 64)])),
        threads=draw(st.sampled_from([1, 2, 3])), seed=draw(st.integers(0, 2**32 - 1)))


@given(p=problems())
def test_random_shapes_match_reference(p):
    # [W][A][C][O] every modifier alone and combined, with masks, causal, both
    # alignments, GQA, L != S, every dtype, small and sliced tiles, several threads
    rng = np.random.default_rng(p["seed"])
    B, Hkv, G, L, S = p["B"], p["Hkv"], p["group"], p["L"], p["S"]
    H = Hkv * G
    q = rand(rng, (B, H, L, p["E"]), p["dtype"])
    k = rand(rng, (B, Hkv, S, p["E"]), p["dtype"])
    v = rand(rng, (B, Hkv, S, p["Ev"]), p["dtype"])
    slopes = {None: None, "H": rng.uniform(0, 1, H), "BH": rng.uniform(-0.2, 1, (B, H))}
    mask = None
    if p["mask"] == "bool":
        mask = rng.random((L, S)) > 0.2
    elif p["mask"] == "float":
        mask = rng.standard_normal((B, 1, L, S))
    tiles = p["tiles"] or (attention.BLOCK_Q, attention.BLOCK_K)
    with mock.patch.object(attention, "BLOCK_Q", tiles[0]), \
            mock.patch.object(attention, "BLOCK_K", tiles[1]):
        check(q, k, v, mask, p["dtype"], is_causal=p["causal"],
              causal_alignment=p["alignment"], enable_gqa=True, window=p["window"],
              alibi_slopes=slopes[p["alibi"]], softcap=p["softcap"],
              num_threads=p["threads"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_each_modifier_alone(rng, dtype, alignment):
    # [W], [A], [C] one at a time, on shapes that fill whole 256-row tiles (the key-major
    # path) and ragged ones (the row path)
    H = 4
    for L, S in [(512, 512), (300, 700), (700, 300)]:
        q, k, v = (rand(rng, (1, H, n, 64), dtype) for n in (L, S, S))
        check(q, k, v, dtype=dtype, causal_alignment=alignment, window=(100, 37))
        check(q, k, v, dtype=dtype, causal_alignment=alignment,
              alibi_slopes=2.0 ** -np.arange(1, H + 1))
        check(q, k, v, dtype=dtype, causal_alignment=alignment, softcap=2.0)


def test_window_edges(rng):
    # [W] windows of 0 (the diagonal only), wider than the sequence (= no window), one
    # side unbounded, and rows whose window holds no key (output 0, lse -inf)
    q, k, v = rand(rng, (2, 40, 16)), rand(rng, (2, 90, 16)), rand(rng, (2, 90, 8))
    for window in [(0, 0), (0, None), (None, 0), (-1, 0), (500, 500), (3, -1), (89, 0)]:
        for alignment in ("top_left", "bottom_right"):
            check(q, k, v, window=window, causal_alignment=alignment)
            check(q, k, v, window=window, causal_alignment=alignment, is_causal=True)
    wide = sdpa(q, k, v, window=(500, 500))
    np.testing.assert_array_equal(wide, sdpa(q, k, v))
    # top_left, L > S: queries past the last key see nothing with a window (0, 0)
    q2 = rand(rng, (1, 50, 16))
    out, lse = check(q2, k[:1, :20], v[:1, :20], window=(0, 0))
    assert not out[0, 20:].any() and np.isneginf(lse[0, 20:]).all()


def test_window_equals_band_mask(rng):
    # [W] a window gives what the same band as a bool mask gives (the mask path), in every
    # dtype, and a causal window what window (left, 0) gives
    L, S = 600, 600
    q, k, v = rand(rng, (1, 2, L, 64)), rand(rng, (1, 2, S, 64)), rand(rng, (1, 2, S, 64))
    band = reference.window_keep(L, S, (200, 0))
    np.testing.assert_allclose(sdpa(q, k, v, window=(200, 0)), sdpa(q, k, v, band),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sdpa(q, k, v, window=(200, None), is_causal=True),
                               sdpa(q, k, v, window=(200, 0)), rtol=1e-6, atol=1e-7)


def test_alibi_slopes_per_batch_and_zero(rng):
    # [A] (B, H) slopes: entry (b, h) uses its own slope; slope 0 = no bias
    q, k, v = rand(rng, (3, 2, 17, 8)), rand(rng, (3, 2, 23, 8)), rand(rng, (3, 2, 23, 8))
    slopes = np.array([[0.0, 0.5], [1.0, 0.0], [0.25, 2.0]])
    out = check(q, k, v, alibi_slopes=slopes)[0]
    np.testing.assert_array_equal(out[0, 0], sdpa(q[0, 0], k[0, 0], v[0, 0]))
    for b in range(3):
        for h in range(2):
            np.testing.assert_allclose(
                out[b, h], sdpa(q[b, h:h + 1], k[b, h:h + 1], v[b, h:h + 1],
                                alibi_slopes=slopes[b, h:h + 1])[0], rtol=1e-6, atol=1e-7)


def test_alibi_with_gqa_uses_query_heads(rng):
    # [A] one slope per query head, also when key/value heads are shared (GQA)
    q, k, v = rand(rng, (1, 6, 30, 16)), rand(rng, (1, 2, 40, 16)), rand(rng, (1, 2, 40, 16))
    check(q, k, v, enable_gqa=True, alibi_slopes=np.linspace(0.1, 1.0, 6), is_causal=True,
          causal_alignment="bottom_right")


def test_softcap_saturates_large_scores(rng):
    # [C] huge scores are capped: with softcap 1 no score passes 1, so the weights of a
    # row are within e^2 of each other, whatever the inputs
    q, k, v = rand(rng, (1, 256, 64)) * 100, rand(rng, (1, 256, 64)) * 100, rand(rng, (1, 256, 64))
    check(q, k, v, softcap=1.0)
    check(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), None, np.float64,
          softcap=1.0)


def test_modifiers_with_float_mask_order(rng):
    # [O] ALiBi and the float mask add up after soft-capping; -inf entries still mask
    q, k, v = rand(rng, (2, 33, 16)), rand(rng, (2, 47, 16)), rand(rng, (2, 47, 16))
    mask = np.where(rng.random((33, 47)) > 0.2, rng.standard_normal((33, 47)), -np.inf)
    check(q, k, v, mask, softcap=0.7, alibi_slopes=np.array([0.3, 0.6]), is_causal=True,
          window=(10, 5), causal_alignment="bottom_right")


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_decode_split_keys_with_modifiers(rng, threads):
    # [W][A][C] one query against a long cache: the keys are split across threads and
    # merged by lse; a window limits the split to the band's keys
    q, k, v = rand(rng, (1, 2, 1, 64)), rand(rng, (1, 2, 8192, 64)), rand(rng, (1, 2, 8192, 64))
    kw = dict(is_causal=True, causal_alignment="bottom_right", num_threads=threads)
    check(q, k, v, window=(1000, 0), **kw)
    check(q, k, v, alibi_slopes=np.array([0.01, 0.1]), softcap=10.0, **kw)


def test_out_and_noncontiguous(rng):
    # [W][A][C] out= (a strided view) and non-contiguous inputs
    x = rand(rng, (2, 50, 3, 32))                  # (B, L, H, E) viewed as (B, H, L, E)
    q = x.transpose(0, 2, 1, 3)
    k = rand(rng, (2, 3, 60, 64))[..., ::2]
    v = rand(rng, (2, 3, 60, 16))
    out = np.zeros((2, 50, 3, 16), np.float32).transpose(0, 2, 1, 3)
    kw = dict(window=(7, 3), alibi_slopes=np.array([0.1, 0.2, 0.3]), softcap=3.0,
              is_causal=True)
    res = sdpa(q, k, v, out=out, **kw)
    assert res is out
    ref = reference.scaled_dot_product_attention(q, k, v, **kw)
    assert_close(out, ref, np.float32)


def test_independent_of_tiles_and_threads(rng, small_tiles):
    # every tiling and thread count gives the same result (float64 to 1e-12)
    q, k, v = rand(rng, (3, 2, 100, 32), np.float64), rand(rng, (3, 2, 90, 32), np.float64), \
        rand(rng, (3, 2, 90, 16), np.float64)
    kw = dict(window=(20, 3), alibi_slopes=np.array([0.2, 0.7]), softcap=4.0, is_causal=True)
    base = sdpa(q, k, v, num_threads=1, **kw)
    for tiles in [(1, 1), (3, 200), (100, 90), (7, 11), (70, 16)]:
        small_tiles(*tiles)
        for threads in (1, 2, 3):
            np.testing.assert_allclose(sdpa(q, k, v, num_threads=threads, **kw), base,
                                       rtol=1e-12, atol=1e-13)


def test_bf16_fallback_and_dot_paths_agree(rng):
    # [W][A][C] bfloat16: the key-major vdpbf16ps tiles and the row tiles give the
    # reference's results to bfloat16 accuracy
    q, k, v = (rand(rng, (1, 2, n, 64), BF16) for n in (512, 512, 512))
    check(q, k, v, dtype=BF16, softcap=3.0, alibi_slopes=np.array([0.05, 0.5]),
          window=(300, 10))


# ---- bad inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("window,err", [((-2, 0), ValueError), ((0, -5), ValueError),
                                        ((1, 2, 3), ValueError), (5, ValueError),
                                        ((1.5, 2), TypeError), (("a", 1), TypeError)])
def test_bad_window(rng, window, err):
    q = rand(rng, (1, 4, 8))
    with pytest.raises(err, match="window"):
        sdpa(q, q, q, window=window)


@pytest.mark.parametrize("softcap,err", [(0, ValueError), (-1.0, ValueError),
                                         (float("nan"), ValueError), (float("inf"), ValueError),
                                         ("x", TypeError)])
def test_bad_softcap(rng, softcap, err):
    q = rand(rng, (1, 4, 8))
    with pytest.raises(err, match="softcap"):
        sdpa(q, q, q, softcap=softcap)


@pytest.mark.parametrize("slopes", [np.ones(3), np.ones((2, 2)), np.ones((1, 2, 2)),
                                    np.ones(()), np.array([1.0, np.nan])])
def test_bad_alibi_slopes(rng, slopes):
    q = rand(rng, (3, 2, 4, 8))                    # batch shape (B=3, H=2)
    with pytest.raises(ValueError, match="alibi_slopes"):
        sdpa(q, q, q, alibi_slopes=slopes)


def test_bad_alibi_dtype(rng):
    q = rand(rng, (2, 4, 8))
    with pytest.raises(TypeError, match="alibi_slopes"):
        sdpa(q, q, q, alibi_slopes=np.array([1 + 1j, 2]))


def test_no_score_matrix_is_built(rng):
    # a window, ALiBi and softcap allocate no (L, S) array: peak memory stays a small
    # fraction of one L x S float32 matrix
    import tracemalloc
    L = S = 4096
    q, k, v = rand(rng, (1, L, 64)), rand(rng, (1, S, 64)), rand(rng, (1, S, 64))
    sdpa(q, k, v, window=(256, 0), alibi_slopes=np.array([0.1]), softcap=5.0)
    tracemalloc.start()
    sdpa(q, k, v, window=(256, 0), alibi_slopes=np.array([0.1]), softcap=5.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < L * S * 4 / 16, peak


def test_tolerances_cover_dtypes():
    assert set(np.dtype(d) for d in DTYPES) <= set(RTOL)


# ---- paged_attention -------------------------------------------------------------------

@st.composite
def paged_problems(draw):
    bs = draw(st.sampled_from([1, 4, 16]))
    nmax = draw(st.integers(1, 40))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), B=draw(st.integers(1, 3)),
        hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 3])),
        T=draw(st.integers(1, 4)), bs=bs, nmax=nmax,
        lens=draw(st.lists(st.integers(0, nmax * bs), min_size=3, max_size=3)),
        window=_window(draw, 4, nmax * bs), alibi=draw(st.sampled_from([None, "H", "BH"])),
        softcap=draw(st.sampled_from([None, 0.5, 20.0])), causal=draw(st.booleans()),
        threads=draw(st.sampled_from([1, 2, 4])), seed=draw(st.integers(0, 2**32 - 1)))


@given(p=paged_problems())
def test_paged_random_shapes_match_reference(p):
    # [W][A][C] on paged_attention (decoding, chunked prefill), bottom-right positions
    # pos = len - T + t; half pools; key splits (few sequences, several threads)
    rng = np.random.default_rng(p["seed"])
    B, hkv, G, T, bs, nmax = (p[n] for n in ("B", "hkv", "group", "T", "bs", "nmax"))
    H = hkv * G
    nblocks = B * nmax + 2
    kb = rand(rng, (nblocks, hkv, bs, 16), p["dtype"])
    vb = rand(rng, (nblocks, hkv, bs, 8), p["dtype"])
    table = rng.permutation(nblocks)[:B * nmax].reshape(B, nmax)
    lens = np.array(p["lens"][:B])
    q = rand(rng, (B, H, T, 16), p["dtype"])
    slopes = {None: None, "H": rng.uniform(0, 1, H), "BH": rng.uniform(0, 1, (B, H))}
    kw = dict(window=p["window"], alibi_slopes=slopes[p["alibi"]], softcap=p["softcap"],
              causal=p["causal"])
    out, lse = fastattn.paged_attention(q, kb, vb, table, lens, return_lse=True,
                                        num_threads=p["threads"], **kw)
    ref_out, ref_lse = reference.paged_attention(q, kb, vb, table, lens, return_lse=True,
                                                 **kw)
    assert_close(out, ref_out, p["dtype"])
    assert_lse_close(lse, ref_lse, p["dtype"])


def test_paged_window_skips_blocks_before_it(rng):
    # [W] a decode step with a window reads only the blocks the window covers: blocks
    # before it may hold NaN without changing the result
    bs, nmax = 16, 64
    kb, vb = rand(rng, (nmax, 2, bs, 32)), rand(rng, (nmax, 2, bs, 32))
    table = np.arange(nmax)[None]
    lens = np.array([nmax * bs - 5])
    q = rand(rng, (1, 4, 1, 32))
    want = fastattn.paged_attention(q, kb, vb, table, lens, window=(100, 0))
    kb[:50], vb[:50] = np.nan, np.nan            # keys 0 .. 799; the window starts at 914
    got = fastattn.paged_attention(q, kb, vb, table, lens, window=(100, 0))
    np.testing.assert_array_equal(got, want)
    ref = reference.paged_attention(q, np.nan_to_num(kb), np.nan_to_num(vb), table, lens,
                                    window=(100, 0))
    assert_close(got, ref, np.float32)


def test_paged_bad_modifiers(rng):
    kb, vb = rand(rng, (2, 1, 4, 8)), rand(rng, (2, 1, 4, 8))
    q = rand(rng, (1, 2, 1, 8))
    args = (q, kb, vb, [[0, 1]], [5])
    with pytest.raises(ValueError, match="window"):
        fastattn.paged_attention(*args, window=(-3, 0))
    with pytest.raises(ValueError, match="softcap"):
        fastattn.paged_attention(*args, softcap=0.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.paged_attention(*args, alibi_slopes=np.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spread_rows_layout_matches_reference(rng, small_tiles, dtype):
    # keys and values of a (B, L, H, E) array viewed as (B, H, L, E) (rows H*E apart) are
    # copied per batch entry into the thread's scratch and reused by its next query blocks:
    # entries switching between items, several threads, with and without modifiers
    small_tiles(32, 48)
    x = rand(rng, (2, 150, 3, 3, 32), dtype)          # (B, L, 3, H, E): q, k, v packed
    q, k, v = (x[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    for threads in (1, 2, 3):
        check(q, k, v, dtype=dtype, is_causal=True, num_threads=threads)
        check(q, k, v, dtype=dtype, window=(20, 5), alibi_slopes=np.array([0.1, 0.2, 0.3]),
              softcap=4.0, num_threads=threads)


def test_softcap_non_finite_scores(rng):
    # [C] a NaN score keeps its row NaN (and only its row); an infinite one is capped to
    # +-softcap, as tanh(+-inf) = +-1 (full 256-row tiles: the key-major path sends such
    # tiles the row way)
    q, k, v = rand(rng, (1, 256, 64)), rand(rng, (1, 256, 64)), rand(rng, (1, 256, 64))
    q[0, 3, 0] = np.nan
    out = sdpa(q, k, v, softcap=5.0)
    assert np.isnan(out[0, 3]).all() and not np.isnan(np.delete(out[0], 3, axis=0)).any()
    q[0, 3, 0] = 0.0
    k[0, 7, 1] = np.inf               # key 7: +-inf scores wherever q[:, 1] != 0
    ref = reference.scaled_dot_product_attention(q, k, v, softcap=5.0)
    assert_close(sdpa(q, k, v, softcap=5.0), ref, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16])
def test_dropout_with_modifiers(rng, small_tiles, dtype):
    # [W][A][C] with dropout: the kept probabilities are the reference's for the same seed
    # (the band's row slices keep each probability's absolute column)
    small_tiles(96, 40)
    q, k, v = (rand(rng, (2, 2, n, 32), dtype) for n in (150, 170, 170))
    kw = dict(is_causal=True, causal_alignment="bottom_right", window=(50, None),
              alibi_slopes=np.array([0.05, 0.2]), softcap=6.0)
    out = sdpa(q, k, v, None, 0.3, rng=11, **kw)
    ref = reference.scaled_dot_product_attention(
        *(a.astype(np.float64) for a in (q, k, v)), None, 0.3, rng=11, **kw)
    assert_close(out, ref, dtype)
