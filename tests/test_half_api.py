"""float16 and bfloat16 across the public API: every function taking float arrays accepts
the half types, returns them (lse in float32) and matches the float64 reference on the
same rounded inputs; mixed dtypes promote; bad input raises as it does for float32.

The paged functions (``paged_attention``, ``PagedKVCache``) are tested elsewhere.
"""
import ml_dtypes
import numpy as np
import pytest

import fastattn
from fastattn import reference
from fastattn.sparse import BlockLayout
from helpers import assert_close, assert_lse_close

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
HALF = [F16, BF16]
MASK_KINDS = ["bool", "float32", "half"]


def make(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def make_mask(rng, kind, shape, dtype):
    """A mask that drops about 30% of the entries: bool, or additive in float32 / ``dtype``."""
    if kind == "bool":
        return rng.random(shape) > 0.3
    mdt = F32 if kind == "float32" else dtype
    return np.where(rng.random(shape) > 0.3, rng.standard_normal(shape), -np.inf).astype(mdt)


def ref_mask(mask):
    return mask if mask is None or mask.dtype == np.bool_ else f64(mask)


def check(out, ref, dtype):
    assert out.dtype == dtype, (out.dtype, dtype)
    assert_close(out, ref, dtype)


def check_lse(lse, ref_lse, dtype):
    assert lse.dtype == F32, lse.dtype
    assert_lse_close(lse, ref_lse, dtype)


def qkv(rng, dtype, lead=(2,), L=37, S=45, E=16, Ev=8):
    return (make(rng, lead + (L, E), dtype), make(rng, lead + (S, E), dtype),
            make(rng, lead + (S, Ev), dtype))


# ---- dense attention ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", [None] + MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa(rng, dtype, kind, causal):
    q = make(rng, (2, 4, 30, 16), dtype)
    k, v = make(rng, (2, 2, 50, 16), dtype), make(rng, (2, 2, 50, 8), dtype)
    mask = None if kind is None else make_mask(rng, kind, (30, 50), dtype)
    kw = dict(is_causal=causal, causal_alignment="bottom_right", enable_gqa=True)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kw)
    ref, ref_lse = reference.scaled_dot_product_attention(f64(q), f64(k), f64(v),
                                                          ref_mask(mask), return_lse=True, **kw)
    check(out, ref, dtype)
    check_lse(lse, ref_lse, dtype)
    buf = np.empty(out.shape, dtype)
    assert fastattn.scaled_dot_product_attention(q, k, v, mask, out=buf, **kw) is buf
    np.testing.assert_array_equal(buf.view(np.uint16), out.view(np.uint16))


# ---- softmax family ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", [None] + MASK_KINDS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_masked_softmax_and_log_softmax(rng, dtype, kind, axis):
    x = make(rng, (6, 7, 33), dtype)
    mshape = (7, 33) if axis == -1 else (6, 1, 33)
    mask = None if kind is None else make_mask(rng, kind, mshape, dtype)
    if mask is not None:
        mask[0] = False if kind == "bool" else -np.inf     # fully masked rows (axis -1)
    got = fastattn.masked_softmax(x, mask, axis=axis, scale=0.7)
    want = reference.softmax(f64(x), ref_mask(mask), axis=axis, scale=0.7)
    check(got, want, dtype)
    if mask is not None and axis == -1:
        assert not np.any(f64(got)[:, 0])                   # fully masked rows give 0
    out = np.empty(x.shape, dtype)
    assert fastattn.masked_softmax(x, mask, axis=axis, scale=0.7, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint16), got.view(np.uint16))

    got = fastattn.log_softmax(x, mask, axis=axis, scale=0.7)
    want = reference.log_softmax(f64(x), ref_mask(mask), axis=axis, scale=0.7)
    assert got.dtype == dtype
    assert_lse_close(got, want, dtype)      # -inf exactly where dropped, else close


@pytest.mark.parametrize("dtype", HALF)
def test_softmax_in_place(rng, dtype):
    x = make(rng, (5, 40), dtype)
    want = fastattn.masked_softmax(x)
    assert fastattn.masked_softmax(x, out=x) is x
    np.testing.assert_array_equal(x.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", [None] + MASK_KINDS)
def test_attention_weights(rng, dtype, kind):
    q, k = make(rng, (2, 3, 20, 16), dtype), make(rng, (2, 3, 31, 16), dtype)
    mask = None if kind is None else make_mask(rng, kind, (3, 20, 31), dtype)
    for causal in (False, True):
        got = fastattn.attention_weights(q, k, mask, is_causal=causal,
                                         causal_alignment="bottom_right")
        want = reference.attention_weights(f64(q), f64(k), ref_mask(mask), is_causal=causal,
                                           causal_alignment="bottom_right")
        check(got, want, dtype)


# ---- masks, positions, heads -------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
def test_masks_positions_and_heads(rng, dtype):
    additive = make_mask(rng, "half", (1, 4, 4), dtype)
    m = fastattn.combine_masks(fastattn.causal_mask(4), additive)
    assert m.dtype == dtype
    np.testing.assert_array_equal(f64(m), np.where(reference.causal_keep(4, 4), 0, -np.inf)
                                  + f64(additive))
    assert fastattn.combine_masks(additive, additive.astype(F32)).dtype == F32

    pe = fastattn.sinusoidal_positional_encoding(50, 16, dtype=dtype)
    check(pe, reference.sinusoidal_positional_encoding(50, 16), dtype)

    x = make(rng, (2, 3, 25, 16), dtype)
    for layout in ("interleaved", "half"):
        got = fastattn.apply_rotary(x, np.arange(25) + 3, layout=layout)
        check(got, reference.apply_rotary(f64(x), np.arange(25) + 3, layout=layout), dtype)

    y = make(rng, (2, 25, 16), dtype)
    heads = fastattn.split_heads(y, 4)
    assert heads.dtype == dtype and heads.shape == (2, 4, 25, 4)
    merged = fastattn.merge_heads(heads)
    assert merged.dtype == dtype
    np.testing.assert_array_equal(merged.view(np.uint16), y.view(np.uint16))


# ---- multi-head attention ----------------------------------------------------------------

def mha_weights(rng, dtype, E=32, kv=16, kdim=24, vdim=20, bias=True):
    w = dict(q_weight=make(rng, (E, E), dtype) / 4, k_weight=make(rng, (kv, kdim), dtype) / 4,
             v_weight=make(rng, (kv, vdim), dtype) / 4, out_weight=make(rng, (E, E), dtype) / 4)
    if bias:
        w.update(q_bias=make(rng, (E,), dtype), k_bias=make(rng, (kv,), dtype),
                 v_bias=make(rng, (kv,), dtype), out_bias=make(rng, (E,), dtype))
    return {n: a.astype(dtype) for n, a in w.items()}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", [None] + MASK_KINDS)
def test_multi_head_attention(rng, dtype, kind):
    w = mha_weights(rng, dtype)
    x, mem, val = (make(rng, (3, 11, 32), dtype), make(rng, (3, 17, 24), dtype),
                   make(rng, (3, 17, 20), dtype))
    mask = None if kind is None else make_mask(rng, kind, (11, 17), dtype)
    kpm = np.ones((3, 17), bool)
    kpm[1, 9:] = False
    for causal in (False, True):
        kw = dict(num_kv_heads=2, attn_mask=mask, key_padding_mask=kpm, is_causal=causal,
                  need_weights=True, **w)
        out, weights = fastattn.multi_head_attention(x, mem, val, 4, **kw)
        ref_kw = dict(kw, attn_mask=ref_mask(mask), **{n: f64(a) for n, a in w.items()})
        ref, ref_weights = reference.multi_head_attention(f64(x), f64(mem), f64(val), 4,
                                                          **ref_kw)
        check(out, ref, dtype)
        check(weights, ref_weights, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_multi_head_attention_class(rng, dtype):
    mha = fastattn.MultiHeadAttention(32, 4, num_kv_heads=2, rng=0, dtype=dtype)
    for name in ("q_weight", "k_weight", "v_weight", "out_weight", "q_bias", "out_bias"):
        assert getattr(mha, name).dtype == dtype, name
    x = make(rng, (2, 13, 32), dtype)
    out = mha(x, is_causal=True)
    w = {n: f64(getattr(mha, n)) for n in ("q_weight", "k_weight", "v_weight", "out_weight",
                                           "q_bias", "k_bias", "v_bias", "out_bias")}
    ref = reference.multi_head_attention(f64(x), f64(x), f64(x), 4, num_kv_heads=2,
                                         is_causal=True, **w)
    check(out, ref, dtype)
    # float32 inputs through half weights promote to float32
    assert mha(x.astype(F32)).dtype == F32


# ---- classic scoring rules ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", [None] + MASK_KINDS)
@pytest.mark.parametrize("rule", ["additive", "concat", "general", "dot"])
def test_scoring(rng, dtype, kind, rule):
    L, S, Eq, Ek, hidden = 9, 14, 6, 5 if rule != "dot" else 6, 12
    q, k, v = make(rng, (2, L, Eq), dtype), make(rng, (2, S, Ek), dtype), \
        make(rng, (2, S, 4), dtype)
    weights = {"additive": dict(w_q=make(rng, (hidden, Eq), dtype),
                                w_k=make(rng, (hidden, Ek), dtype), v=make(rng, (hidden,), dtype)),
               "concat": dict(w=make(rng, (hidden, Eq + Ek), dtype), v=make(rng, (hidden,), dtype)),
               "general": dict(w=make(rng, (Eq, Ek), dtype)),
               "dot": {}}[rule]
    mask = None if kind is None else make_mask(rng, kind, (L, S), dtype)
    fn = getattr(fastattn, f"{rule}_attention")
    out, w = fn(q, k, v, mask=mask, return_weights=True, **weights)
    ref, ref_w = getattr(reference, f"{rule}_attention")(
        f64(q), f64(k), f64(v), mask=ref_mask(mask), **{n: f64(a) for n, a in weights.items()})
    check(out, ref, dtype)
    check(w, ref_w, dtype)


# ---- block-sparse engine and its patterns ------------------------------------------------

def check_masked(got, q, k, v, keep, dtype):
    out, lse = got
    ref, ref_lse = reference.scaled_dot_product_attention(f64(q), f64(k), f64(v), keep,
                                                          return_lse=True)
    check(out, ref, dtype)
    check_lse(lse, ref_lse, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_block_sparse_attention(rng, dtype):
    q, k, v = qkv(rng, dtype, lead=(2, 3), L=70, S=90)
    layouts = [BlockLayout.from_rule((70, 90), (16, 32), window=(20, 5), is_causal=True,
                                     global_key=[0, 1]),
               BlockLayout.from_mask(rng.random((3, 70, 90)) > 0.6, (8, 16))]
    for layout in layouts:
        got = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
        check_masked(got, q, k, v, layout.to_mask(), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_sparse_patterns(rng, dtype):
    L = S = 130
    q, k, v = qkv(rng, dtype, L=L, S=S)
    tokens = [0, 64, 129]
    cases = [
        (fastattn.local_attention(q, k, v, (9, 3), dilation=2, return_lse=True),
         reference.local_keep(L, S, (9, 3), 2)),
        (fastattn.strided_attention(q, k, v, 16, mode="fixed", summary=4, return_lse=True),
         reference.strided_keep(L, S, 16, "fixed", 4)),
        (fastattn.strided_attention(q, k, v, 7, return_lse=True),
         reference.strided_keep(L, S, 7)),
        (fastattn.global_attention(q, k, v, tokens, return_lse=True),
         reference.local_keep(L, S, (0, 0)) | reference.global_keep(L, S, tokens)),
        (fastattn.longformer_attention(q, k, v, 9, tokens, dilation=2, return_lse=True),
         reference.local_keep(L, S, 9, 2) | reference.global_keep(L, S, tokens)),
    ]
    for got, keep in cases:
        check_masked(got, q, k, v, keep, dtype)
    q, k, v = qkv(rng, dtype, lead=(2, 3), L=100, S=100)
    got = fastattn.bigbird_attention(q, k, v, block_size=16, num_random_blocks=2, rng=7,
                                     return_lse=True)
    layout = fastattn.bigbird_layout(100, num_heads=3, block_size=16, num_random_blocks=2,
                                     rng=7)
    check_masked(got, q, k, v, layout.to_mask()[None], dtype)


# ---- content-based sparsity --------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
def test_lsh_attention(rng, dtype):
    q, v = make(rng, (2, 60, 16), dtype), make(rng, (2, 60, 8), dtype)
    buckets = rng.integers(0, 4, (2, 2, 60))
    for causal in (False, True):
        out, lse = fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=8, buckets=buckets,
                                          causal=causal, return_lse=True)
        ref, ref_lse = reference.lsh_attention(f64(q), f64(v), buckets, bucket_size=8,
                                               causal=causal, return_lse=True)
        check(out, ref, dtype)
        check_lse(lse, ref_lse, dtype)
    assert fastattn.lsh_attention(q, v, n_hashes=2, bucket_size=8, rng=0).dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("topk", [None, 5])
def test_clustered_attention(rng, dtype, topk):
    q, k, v = qkv(rng, dtype, L=40, S=50)
    assign = rng.integers(0, 6, (2, 40))
    out = fastattn.clustered_attention(q, k, v, clusters=6, assignments=assign, topk=topk)
    check(out, reference.clustered_attention(f64(q), f64(k), f64(v), assign, 6, topk=topk),
          dtype)
    assert fastattn.clustered_attention(q, k, v, clusters=6, topk=topk, rng=1).dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_sinkhorn(rng, dtype):
    x = make(rng, (3, 6, 6), dtype)
    x[0, 1, 2] = -np.inf
    check(fastattn.sinkhorn(x, 5), reference.sinkhorn(f64(x), 5), dtype)
    q, k, v = qkv(rng, dtype, L=50, S=50)
    out = fastattn.sinkhorn_attention(q, k, v, block_size=8, n_iters=4, temperature=0.6)
    check(out, reference.sinkhorn_attention(f64(q), f64(k), f64(v), block_size=8, n_iters=4,
                                            temperature=0.6), dtype)
    gumbel = np.random.default_rng(3).gumbel(size=(2, 7, 7))
    out = fastattn.sinkhorn_attention(q, k, v, block_size=8, rng=3)
    check(out, reference.sinkhorn_attention(f64(q), f64(k), f64(v), block_size=8, noise=gumbel),
          dtype)


# ---- low-rank and kernelised -------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_and_performer(rng, dtype, causal):
    q, k, v = qkv(rng, dtype, L=40, S=40)
    check(fastattn.linear_attention(q, k, v, causal=causal),
          reference.linear_attention(f64(q), f64(k), f64(v), causal=causal), dtype)
    w = fastattn.performer_features(16, 32, rng=1)
    for feats in (w, w.astype(dtype)):
        out = fastattn.performer_attention(q, k, v, features=feats, causal=causal)
        check(out, reference.performer_attention(f64(q), f64(k), f64(v), f64(feats),
                                                 causal=causal), dtype)
    assert fastattn.performer_attention(q, k, v, num_features=16, rng=0).dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_linformer_and_synthesizer(rng, dtype):
    q, k, v = qkv(rng, dtype, L=30, S=40)
    e, f = make(rng, (12, 40), dtype), make(rng, (12, 40), dtype)
    check(fastattn.linformer_attention(q, k, v, e, f),
          reference.linformer_attention(f64(q), f64(k), f64(v), f64(e), f64(f)), dtype)
    check(fastattn.linformer_attention(q, k, v, e),
          reference.linformer_attention(f64(q), f64(k), f64(v), f64(e)), dtype)

    v = make(rng, (2, 40, 6), dtype)
    big = make(rng, (64, 64), dtype)
    check(fastattn.synthesizer_attention(v, weights=big),
          reference.synthesizer_attention(f64(v), f64(big)[:40, :40]), dtype)
    r1, r2 = make(rng, (64, 4), dtype), make(rng, (4, 64), dtype)
    check(fastattn.synthesizer_attention(v, weights=(r1, r2), mode="factorized"),
          reference.synthesizer_attention(f64(v), f64(r1)[:40] @ f64(r2)[:, :40]), dtype)
    x = make(rng, (2, 40, 8), dtype)
    w1, b1, w2, b2 = (make(rng, s, dtype) for s in ((8, 12), (12,), (12, 64), (64,)))
    logits = np.maximum(f64(x) @ f64(w1) + f64(b1), 0) @ f64(w2)[:, :40] + f64(b2)[:40]
    check(fastattn.synthesizer_attention(v, weights=(w1, b1, w2, b2), mode="dense", query=x),
          reference.synthesizer_attention(f64(v), logits), dtype)


# ---- promotion and bad input over the whole API ------------------------------------------

def _calls():
    """``name -> f(q, k, v)`` for every function of (query, key, value)-like operands;
    shapes (2, 32, 8) each."""
    feats = fastattn.performer_features(8, 16, rng=0)
    return {
        "scaled_dot_product_attention": lambda q, k, v: fastattn.scaled_dot_product_attention(
            q, k, v),
        "block_sparse_attention": lambda q, k, v: fastattn.block_sparse_attention(
            q, k, v, BlockLayout.from_rule((32, 32), 8, is_causal=True)),
        "local_attention": lambda q, k, v: fastattn.local_attention(q, k, v, 4),
        "strided_attention": lambda q, k, v: fastattn.strided_attention(q, k, v, 4),
        "global_attention": lambda q, k, v: fastattn.global_attention(q, k, v, [0]),
        "longformer_attention": lambda q, k, v: fastattn.longformer_attention(q, k, v, 3, [0]),
        "bigbird_attention": lambda q, k, v: fastattn.bigbird_attention(
            q, k, v, block_size=8, num_random_blocks=1, rng=0),
        "lsh_attention": lambda q, k, v: fastattn.lsh_attention(q, v, bucket_size=8, rng=0),
        "clustered_attention": lambda q, k, v: fastattn.clustered_attention(
            q, k, v, clusters=4, rng=0),
        "sinkhorn_attention": lambda q, k, v: fastattn.sinkhorn_attention(q, k, v,
                                                                          block_size=8),
        "linear_attention": lambda q, k, v: fastattn.linear_attention(q, k, v),
        "performer_attention": lambda q, k, v: fastattn.performer_attention(
            q, k, v, features=feats),
        "linformer_attention": lambda q, k, v: fastattn.linformer_attention(
            q, k, v, np.ones((4, 32), q.dtype)),
        "synthesizer_attention": lambda q, k, v: fastattn.synthesizer_attention(
            v, weights=np.tile(k[0], 4)),
        "masked_softmax": lambda q, k, v: fastattn.masked_softmax(q, k > 0),
        "log_softmax": lambda q, k, v: fastattn.log_softmax(q, k),
        "attention_weights": lambda q, k, v: fastattn.attention_weights(q, k),
        "apply_rotary": lambda q, k, v: fastattn.apply_rotary(q, np.arange(32)),
        "sinkhorn": lambda q, k, v: fastattn.sinkhorn(q[..., :8, :]),
        "multi_head_attention": lambda q, k, v: fastattn.multi_head_attention(
            q, k, v, 2, q_weight=np.eye(8, dtype=q.dtype), k_weight=np.eye(8, dtype=q.dtype),
            v_weight=np.eye(8, dtype=q.dtype), out_weight=np.eye(8, dtype=q.dtype)),
        "additive_attention": lambda q, k, v: fastattn.additive_attention(
            q, k, v, w_q=np.ones((4, 8), q.dtype), w_k=np.ones((4, 8), q.dtype),
            v=np.ones(4, q.dtype)),
        "concat_attention": lambda q, k, v: fastattn.concat_attention(
            q, k, v, w=np.ones((4, 16), q.dtype), v=np.ones(4, q.dtype)),
        "general_attention": lambda q, k, v: fastattn.general_attention(
            q, k, v, w=np.eye(8, dtype=q.dtype)),
        "dot_attention": lambda q, k, v: fastattn.dot_attention(q, k, v),
    }


CALLS = _calls()


def first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("dtype", HALF)
def test_mixed_dtypes_promote(rng, name, dtype):
    call = CALLS[name]
    q, k, v = (make(rng, (2, 32, 8), dtype) for _ in range(3))
    assert first(call(q, k, v)).dtype == dtype
    # a float32 operand promotes the result to float32
    for i in range(3):
        args = [q, k, v]
        args[i] = args[i].astype(F32)
        got = first(call(*args)).dtype
        touched = {"lsh_attention": (0, 2), "masked_softmax": (0,), "log_softmax": (0,),
                   "attention_weights": (0, 1), "apply_rotary": (0,), "sinkhorn": (0,),
                   "synthesizer_attention": (1, 2)}.get(name, (0, 1, 2))
        assert got == (F32 if i in touched else dtype), (i, got)
    other = F16 if dtype == BF16 else BF16
    if name not in ("apply_rotary", "sinkhorn", "masked_softmax", "log_softmax",
                    "synthesizer_attention"):
        # float16 with bfloat16 promotes to float32 (the ml_dtypes rule)
        assert first(call(q, k.astype(other), v.astype(other))).dtype == F32


@pytest.mark.parametrize("name", [n for n in CALLS if n not in ("apply_rotary", "sinkhorn")])
def test_wrong_shape_bfloat16_same_error_as_float32(rng, name):
    call = CALLS[name]
    msgs = []
    for dtype in (F32, BF16):
        q, v = make(rng, (2, 32, 8), dtype), make(rng, (2, 32, 8), dtype)
        bad = make(rng, (2, 33, 7), dtype)
        with pytest.raises(ValueError) as info:
            call(q, bad, v) if name not in ("lsh_attention", "synthesizer_attention") \
                else call(q, v, bad)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


def test_bad_shapes_single_operand(rng):
    msgs = {}
    for dtype in (F32, BF16):
        x = make(rng, (3, 7), dtype)
        for name, fn in [("apply_rotary", lambda: fastattn.apply_rotary(x, np.arange(7))),
                         ("sinkhorn", lambda: fastattn.sinkhorn(x[0])),
                         ("masked_softmax", lambda: fastattn.masked_softmax(x, np.ones((2, 7),
                                                                                    bool)))]:
            with pytest.raises(ValueError) as info:
                fn()
            msgs.setdefault(name, []).append(str(info.value))
    for name, (a, b) in msgs.items():
        assert a == b, name


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("bad", [np.complex64, object])
def test_complex_and_object_name_bfloat16(rng, name, bad):
    call = CALLS[name]
    q, k, v = (make(rng, (2, 32, 8), BF16) for _ in range(3))
    where = {"lsh_attention": 0, "masked_softmax": 0, "log_softmax": 0, "apply_rotary": 0,
             "sinkhorn": 0, "synthesizer_attention": 2}.get(name, 1)
    args = [q, k, v]
    args[where] = args[where].astype(np.float32).astype(bad)
    with pytest.raises(TypeError, match="bfloat16"):
        call(*args)


def test_positional_encoding_bad_dtype_names_bfloat16():
    with pytest.raises(TypeError, match="bfloat16"):
        fastattn.sinusoidal_positional_encoding(4, 4, dtype=np.complex64)
