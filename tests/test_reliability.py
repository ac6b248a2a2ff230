"""Regression tests for the defects of the reliability audit (issue 14), one per defect.

Each test is named after the defect it pins down and failed before its fix:
1. float32 softmax sums whose error grew with the row length;
2. unaligned (but contiguous) operands reaching the kernels unaligned;
3. sparse patterns and BlockLayout constructors failing on empty sequences;
4. silent wrong results and weak validation;
5. documented behaviour that differed (to_mask's shape, +inf scores under -inf masks,
   negative strides).
"""
import numpy as np
import pytest

import fastattn
from fastattn import reference
from helpers import assert_close
from kernel_guard import watch_kernels


# ---- 1. long float32 rows ----------------------------------------------------------

def long_row(n):
    # the audit's row: smooth scores in [-3, 3], so every element counts
    return (np.sin(np.arange(n) * 1e-3) * 3).astype(np.float32)


@pytest.mark.parametrize("n", [2**22, 2**24 + 17])
def test_long_row_softmax_sum_does_not_drift(n):
    x = long_row(n)
    p = fastattn.masked_softmax(x)
    # float64 of the same row: the error must not grow with n (it was 1.8e-3 at 2^24)
    want = np.exp(x.astype(np.float64) - x.max())
    want /= want.sum()
    assert abs(p.sum(dtype=np.float64) - 1) < 2e-6
    assert np.abs(p - want).max() <= 2e-6 * want.max()
    lg = fastattn.log_softmax(x)
    assert np.abs(lg - np.log(want)).max() < 2e-5          # |log p| ~ 16 here


def test_long_key_row_attention_weights():
    # attention_weights: one query against 2^22 keys goes through the same row softmax
    n = 2**22
    k = long_row(n)[:, None]
    q = np.ones((1, 1), np.float32)
    w = fastattn.attention_weights(q, k, scale=1.0)
    assert abs(w.sum(dtype=np.float64) - 1) < 2e-6


# ---- 2. misaligned operands --------------------------------------------------------

def misaligned(a):
    """A C-contiguous copy of ``a`` one byte off its dtype's alignment."""
    a = np.asarray(a)
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = buf[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.flags.c_contiguous and (a.itemsize == 1 or not out.flags.aligned)
    return out


def half_or(dtype, x):
    return np.asarray(x).astype(dtype)


def misaligned_calls(dtype):
    """(name, call(make)) pairs: `make` is `misaligned` or `np.array` (the control)."""
    rng = np.random.default_rng(2)
    d = lambda *shape: rng.standard_normal(shape).astype(dtype)
    q, k, v = d(2, 3, 40, 16), d(2, 3, 70, 16), d(2, 3, 70, 16)
    fmask = np.where(rng.random((40, 70)) < 0.2, -np.inf, rng.standard_normal((40, 70)))
    fmask = fmask.astype(dtype)
    bmask = rng.random((40, 70)) < 0.8
    x = d(4, 40, 70)
    layout = fastattn.BlockLayout.from_rule((40, 70), 16, window=(20, 5))
    ew = [d(48, 48) for _ in range(4)]
    pool_k, pool_v = d(8, 2, 16, 16), d(8, 2, 16, 16)
    table = np.array([[0, 3, 5, 1, 2], [4, 6, 7, 0, 0]], np.intp)
    lens = np.array([70, 40], np.intp)
    lq = d(2, 4, 1, 16)
    w = fastattn.performer_features(16, 32, rng=0).astype(dtype)
    aw = d(8, 16), d(8, 16), d(8)
    mx = d(2, 40, 48), d(2, 70, 48), d(2, 70, 48), d(48), d(48)

    out, lse = fastattn.scaled_dot_product_attention(q, k, v, fmask, return_lse=True)
    g = d(*out.shape)
    y = fastattn.masked_softmax(x)

    def run(name, fn):
        return name, fn
    return [
        run("sdpa backward", lambda m: fastattn.scaled_dot_product_attention_backward(
            m(g), m(q), m(k), m(v), m(out), m(lse), m(fmask))),
        run("masked_softmax backward", lambda m: fastattn.masked_softmax_backward(m(x), m(y))),
        run("sdpa", lambda m: fastattn.scaled_dot_product_attention(m(q), m(k), m(v), m(fmask))),
        run("sdpa bool", lambda m: fastattn.scaled_dot_product_attention(m(q), m(k), m(v), m(bmask))),
        run("sdpa out", lambda m: fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, out=m(np.zeros((2, 3, 40, 16), dtype)))),
        run("masked_softmax", lambda m: fastattn.masked_softmax(m(x), m(fmask))),
        run("masked_softmax in place", lambda m: fastattn.masked_softmax(
            *(lambda y: (y, m(bmask)))(m(x)), out=None)),
        run("log_softmax out", lambda m: fastattn.log_softmax(
            x, fmask, out=m(np.zeros(x.shape, x.dtype if dtype in (np.float32, np.float64)
                                     else x.dtype)))),
        run("attention_weights", lambda m: fastattn.attention_weights(m(q), m(k), m(fmask))),
        run("block_sparse", lambda m: fastattn.block_sparse_attention(
            m(q), m(k), m(v), fastattn.BlockLayout(layout.shape, layout.block_size,
                                                   m(layout.indptr[0]), m(layout.indices),
                                                   window=(20, 5)))),
        run("local", lambda m: fastattn.local_attention(m(q), m(k), m(v), (20, 5))),
        run("linear", lambda m: fastattn.linear_attention(m(q), m(k), m(v))),
        run("performer", lambda m: fastattn.performer_attention(m(q), m(k), m(v), features=m(w))),
        run("paged", lambda m: fastattn.paged_attention(m(lq), m(pool_k), m(pool_v), m(table),
                                                        m(lens))),
        run("clustered", lambda m: fastattn.clustered_attention(
            m(q), m(k), m(v), clusters=4, assignments=m(np.arange(40, dtype=np.intp) % 4))),
        run("lsh", lambda m: fastattn.lsh_attention(
            m(k), m(v), bucket_size=8, buckets=m(np.arange(70, dtype=np.intp)[None] % 4),
            n_buckets=4)),
        run("dot", lambda m: fastattn.dot_attention(m(q), m(k), m(v), mask=m(bmask))),
        run("additive", lambda m: fastattn.additive_attention(
            m(q), m(k), m(v), w_q=m(aw[0]), w_k=m(aw[1]), v=m(aw[2]), mask=m(fmask))),
        run("mha", lambda m: fastattn.multi_head_attention(
            m(mx[0]), m(mx[1]), m(mx[2]), 4, q_weight=m(ew[0]), k_weight=m(ew[1]),
            v_weight=m(ew[2]), out_weight=m(ew[3]), q_bias=m(mx[3]), out_bias=m(mx[4]),
            attn_mask=m(bmask))),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, fastattn.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_misaligned_operands_never_reach_the_kernels(monkeypatch, dtype):
    for name, call in misaligned_calls(dtype):
        if name == "performer" and dtype in (np.float16, fastattn.bfloat16):
            continue
        want = call(np.array)
        record = watch_kernels(monkeypatch)
        got = call(misaligned)
        assert record.calls, f"{name}: no kernel call seen"
        assert not record.misaligned(), f"{name}: misaligned arrays reached the kernels: " \
                                        f"{record.misaligned()}"
        monkeypatch.undo()
        for g, w_ in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
            np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w_, np.float64),
                                          err_msg=name)


# ---- 3. empty sequences in the sparse patterns ----------------------------------------

EMPTY_LENGTHS = [(0, 0), (0, 5), (5, 0), (0, 130), (130, 0)]


def empty_operands(L, S, lead=(2, 3), e=8, ev=4):
    rng = np.random.default_rng(3)
    return (rng.standard_normal(lead + (L, e)), rng.standard_normal(lead + (S, e)),
            rng.standard_normal(lead + (S, ev)))


def assert_same_as_dense(got, q, k, v, keep):
    # the dense kernel with the pattern's mask: output (zeros where nothing is seen)
    # and lse (-inf there), shapes included
    out, lse = got
    want, want_lse = fastattn.scaled_dot_product_attention(q, k, v, keep, return_lse=True)
    assert out.shape == want.shape and lse.shape == want_lse.shape
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)


@pytest.mark.parametrize("L,S", EMPTY_LENGTHS)
def test_empty_sequences_in_every_pattern(L, S):
    q, k, v = empty_operands(L, S)
    kw = dict(return_lse=True)
    cases = [
        (fastattn.local_attention(q, k, v, (2, 1), **kw), reference.local_keep(L, S, (2, 1))),
        (fastattn.local_attention(q, k, v, 3, dilation=2, **kw),
         reference.local_keep(L, S, 3, 2)),
        (fastattn.strided_attention(q, k, v, 4, **kw), reference.strided_keep(L, S, 4)),
        (fastattn.strided_attention(q, k, v, 4, mode="fixed", **kw),
         reference.strided_keep(L, S, 4, "fixed")),
        (fastattn.global_attention(q, k, v, np.zeros(S, bool), **kw),
         reference.local_keep(L, S, (0, 0))),
        (fastattn.longformer_attention(q, k, v, 2, [], **kw), reference.local_keep(L, S, 2)),
    ]
    for got, keep in cases:
        assert_same_as_dense(got, q, k, v, keep)


@pytest.mark.parametrize("n", [0])
def test_empty_sequence_bigbird(n):
    q, k, v = empty_operands(n, n)
    out, lse = fastattn.bigbird_attention(q, k, v, return_lse=True, rng=0)
    assert out.shape == (2, 3, 0, 4) and lse.shape == (2, 3, 0)
    layout = fastattn.bigbird_layout(0, num_heads=3)
    assert layout.num_blocks == 0 and layout.to_mask().shape == (3, 0, 0)


@pytest.mark.parametrize("L,S", EMPTY_LENGTHS)
def test_empty_sequences_in_block_layouts(L, S):
    q, k, v = empty_operands(L, S)
    bq, bk = 64, 32
    nqb, nkb = -(-L // bq), -(-S // bk)
    heads_mask = np.ones((3, L, S), bool)
    layouts = [
        fastattn.BlockLayout.from_rule((L, S), (bq, bk), window=(4, 4)),
        fastattn.BlockLayout.from_rule((L, S), (bq, bk), is_causal=True, dilation=2),
        fastattn.BlockLayout.from_rule((L, S), (bq, bk), global_query=np.ones(L, bool),
                                       global_key=np.zeros(S, bool)),
        fastattn.BlockLayout.from_rule((L, S), (bq, bk), mask=heads_mask),
        fastattn.BlockLayout.from_mask(np.ones((L, S), bool), (bq, bk)),
        fastattn.BlockLayout.from_mask(heads_mask, (bq, bk)),
        fastattn.BlockLayout.from_blocks(np.ones((nqb, nkb), bool), (L, S), (bq, bk)),
        fastattn.BlockLayout.from_blocks(np.ones((3, nqb, nkb), bool), (L, S), (bq, bk)),
        fastattn.BlockLayout((L, S), (bq, bk), np.zeros(nqb + 1, int), []),
    ]
    for layout in layouts:
        assert layout.num_blocks == 0 and layout.density == 0.0
        mask = layout.to_mask()
        assert mask.shape[-2:] == (L, S)
        assert layout.block_mask().shape[-2:] == (nqb, nkb)
        got = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
        assert_same_as_dense(got, q, k, v, mask)


# ---- 5. documented behaviour ----------------------------------------------------------

def test_to_mask_of_a_shared_layout_from_a_2d_mask_is_2d():
    mask = np.tril(np.ones((6, 5), bool))
    for layout in (fastattn.BlockLayout.from_mask(mask, 2),
                   fastattn.BlockLayout.from_rule((6, 5), 2, mask=mask),
                   fastattn.BlockLayout.from_rule((6, 5), 2, mask=mask[None]),
                   fastattn.BlockLayout.from_rule((6, 5), 2, mask=mask[:1])):
        got = layout.to_mask()
        assert got.shape == (6, 5)
        np.testing.assert_array_equal(got, mask if layout.mask.shape[1] == 6
                                      else np.broadcast_to(mask[:1], (6, 5)))
    # per head: the blocks or the mask
    heads = np.stack([mask, ~mask, mask])
    assert fastattn.BlockLayout.from_mask(heads, 2).to_mask().shape == (3, 6, 5)
    assert fastattn.BlockLayout.from_rule((6, 5), 2, mask=heads).to_mask().shape == (3, 6, 5)
    np.testing.assert_array_equal(fastattn.BlockLayout.from_mask(heads, 2).to_mask(), heads)


# ---- 4. silent wrong results and weak validation -------------------------------------

def weights(e=16):
    rng = np.random.default_rng(4)
    return {n: rng.standard_normal((e, e)) / 4
            for n in ("q_weight", "k_weight", "v_weight", "out_weight")}


@pytest.mark.parametrize("call,error,words", [
    (lambda: fastattn.MultiHeadAttention(16, 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: fastattn.MultiHeadAttention(16, 4, dtype=complex), TypeError, "dtype"),
    (lambda: fastattn.MultiHeadAttention(16, 4, dtype=np.longdouble), TypeError, "dtype"),
    (lambda: fastattn.MultiHeadAttention(16, 4, dtype=bool), TypeError, "dtype"),
    (lambda: fastattn.linear_attention(*[np.ones((4, 8))] * 3, eps=np.nan), ValueError, "eps"),
    (lambda: fastattn.linear_attention(*[np.ones((4, 8))] * 3, eps=np.inf), ValueError, "eps"),
    (lambda: fastattn.linear_attention(*[np.ones((4, 8))] * 3, eps=-1.0), ValueError, "eps"),
    (lambda: fastattn.linear_attention(*[np.ones((4, 8))] * 3, eps="1"), TypeError, "eps"),
    (lambda: fastattn.multi_head_attention(*[np.ones((2, 16))] * 3, 4,
                                           **{**weights(), "out_weight": None}),
     TypeError, "out_weight"),
    (lambda: fastattn.multi_head_attention(*[np.ones((2, 16))] * 3, 4,
                                           **{**weights(), "q_weight": None}),
     TypeError, "q_weight"),
    (lambda: fastattn.bigbird_attention(*[np.ones((4, 8))] * 3, num_random_blocks=1.5),
     TypeError, "num_random_blocks"),
    (lambda: fastattn.bigbird_attention(*[np.ones((4, 8))] * 3, num_random_blocks="3"),
     TypeError, "num_random_blocks"),
    (lambda: fastattn.bigbird_layout(64.0), TypeError, "length"),
    (lambda: fastattn.bigbird_layout(64, num_window_blocks=-1), ValueError, "num_window_blocks"),
    (lambda: fastattn.sinkhorn(np.zeros((3, 4))), ValueError, "square"),
    (lambda: fastattn.masked_softmax(np.ones((2, 3)), axis=1.0), TypeError, "axis"),
    (lambda: fastattn.log_softmax(np.ones((2, 3)), axis="1"), TypeError, "axis"),
    (lambda: fastattn.linformer_attention(*[np.ones((4, 8))] * 3, np.ones((2, 4)),
                                          np.ones((3, 4))), ValueError, "f_proj"),
    (lambda: fastattn.linformer_attention(*[np.ones((2, 4, 8))] * 3, np.ones((3, 2, 4))),
     ValueError, "e_proj"),
], ids=lambda x: "" if callable(x) or isinstance(x, type) else x)
def test_bad_arguments_raise_at_once(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_performer_features_too_many_raises_memory_error_at_once():
    # it drew 2^37 QR blocks (minutes) before failing; run in a child with a deadline
    import subprocess
    import sys
    code = ("import fastattn\n"
            "try:\n    fastattn.performer_features(8, 2**40)\n"
            "except MemoryError:\n    print('MemoryError')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.stdout.strip() == "MemoryError", res.stderr[-2000:]


def test_multi_head_attention_class_keeps_its_float_dtype():
    x = np.random.default_rng(5).standard_normal((2, 3, 16))
    for dtype in (np.float16, np.float32, np.float64, fastattn.bfloat16):
        mha = fastattn.MultiHeadAttention(16, 4, dtype=dtype, rng=0)
        assert mha.q_weight.dtype == dtype and np.abs(mha.out_weight.astype(float)).max() > 0
        assert mha(x.astype(dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [3, 16, 37, 300])
def test_float_mask_minus_inf_drops_inf_and_nan_scores(dtype, n):
    # one rule (documented with masked_softmax and scaled_dot_product_attention): a -inf
    # of a float mask drops the pair whatever its score, as False does; a kept +inf or
    # NaN score still gives a NaN row
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, n)).astype(dtype)
    mask = np.zeros((4, n), dtype)
    x[0, 0], mask[0, 0] = np.inf, -np.inf
    x[1, n - 1], mask[1, n - 1] = np.nan, -np.inf
    x[2, n // 2], mask[2, n // 2] = -np.inf, -np.inf
    keep = mask == 0
    want = reference.softmax(np.where(keep, x, 0), keep)
    for m in (mask, np.repeat(mask, 2, axis=1)[:, ::2]):        # unit and strided columns
        got = fastattn.masked_softmax(x, m)
        assert_close(got, want, dtype)
        lg = fastattn.log_softmax(x, m)
        assert np.isneginf(lg[~keep]).all() and np.isfinite(lg[keep]).all()
    np.testing.assert_array_equal(fastattn.masked_softmax(x, keep), got)
    # a kept +inf or NaN still poisons its row
    x[3, 1] = np.inf
    assert np.isnan(fastattn.masked_softmax(x, mask)[3]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, fastattn.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_inf_score_under_minus_inf_mask_same_in_skipped_and_partial_tiles(dtype):
    # key 5 (in a partly masked tile) and key 600 (in a tile the mask rules out entirely,
    # which the kernel skips) both score +inf; both are masked with -inf
    L, S, E = 8, 700, 4
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, L, E))
    k = rng.standard_normal((2, S, E))
    v = rng.standard_normal((2, S, E))
    k[:, [5, 600]] = np.inf
    q[:] = np.abs(q)
    mask = np.zeros((L, S))
    mask[:, 5] = -np.inf
    mask[:, 512:] = -np.inf
    q, k, v, mask = (a.astype(dtype) for a in (q, k, v, mask))
    out = fastattn.scaled_dot_product_attention(q, k, v, mask, scale=0.5)
    assert np.isfinite(out.astype(np.float64)).all()
    # the same as with those keys left out of the computation altogether
    keep = np.ones(S, bool)
    keep[5] = False
    keep[512:] = False
    want = reference.scaled_dot_product_attention(q, k[:, keep], v[:, keep], mask[:, keep],
                                                  scale=0.5)
    assert_close(out, want, dtype)
    assert_close(reference.scaled_dot_product_attention(q, k, v, mask, scale=0.5), want,
                 np.float64)


def test_negative_strides_batch_axes_in_place_last_two_axes_copied():
    # documented in scaled_dot_product_attention and docs/guide/attention.md: batch axes
    # with negative strides are read in place; a reversed row axis is copied once
    import tracemalloc
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 4, 64, 32), dtype=np.float32)
    k = rng.standard_normal((2, 4, 1024, 32), dtype=np.float32)
    v = rng.standard_normal((2, 4, 1024, 32), dtype=np.float32)

    def run(kk, vv):
        fastattn.scaled_dot_product_attention(q, kk, vv, num_threads=1)
        tracemalloc.start()
        try:
            out = fastattn.scaled_dot_product_attention(q, kk, vv, num_threads=1)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    size = k.nbytes
    for kk, vv, copied in [(k[::-1], v[::-1], False), (k[:, ::-1], v[:, ::-1], False),
                           (k[:, :, ::-1], v[:, :, ::-1], True),
                           (k[..., ::-1], v[..., ::-1], True)]:
        out, peak = run(kk, vv)
        assert (peak >= 2 * size) == copied, (kk.strides, peak)
        want = reference.scaled_dot_product_attention(q, kk, vv)
        assert_close(out, want, np.float32)


# ---- found by the property tests (tests/test_fuzz.py, long profile) -------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_attention_weights_of_a_fortran_ordered_query(dtype):
    # np.matmul returned Fortran-ordered scores for a Fortran-ordered query, which the
    # softmax kernel then normalised in place as if they were in C order
    rng = np.random.default_rng(9)
    q = np.asfortranarray(rng.standard_normal((2, 2, 3, 4)).astype(dtype))
    k = rng.standard_normal((21, 4)).astype(dtype)
    got = fastattn.attention_weights(q, k)
    assert_close(got, reference.attention_weights(q, k), dtype)


def test_empty_content_sparse_inputs():
    # lsh_attention (explicit buckets) and clustered_attention raised on L = 0
    q = np.zeros((2, 0, 3))
    assert fastattn.lsh_attention(q, q, buckets=np.zeros((2, 1, 0), int)).shape == (2, 0, 3)
    assert fastattn.clustered_attention(q, np.ones((2, 5, 3)), np.ones((2, 5, 4)),
                                        clusters=2).shape == (2, 0, 4)
    assert fastattn.clustered_attention(q, q, q, clusters=1,
                                        assignments=np.zeros((2, 0), int)).shape == (2, 0, 3)
    assert fastattn.padding_mask([], 4).shape == (0, 1, 1, 4)


def test_linear_attention_without_keys_gives_zeros():
    # S = 0 with eps = 0 gave 0 / 0 = NaN; no key gives zeros, as in dense attention
    q = np.ones((2, 3, 4))
    k = np.zeros((2, 0, 4))
    for eps in (0.0, 1e-6):
        out = fastattn.linear_attention(q, k, np.zeros((2, 0, 5)), eps=eps)
        np.testing.assert_array_equal(out, np.zeros((2, 3, 5)))
