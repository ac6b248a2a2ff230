"""Property tests ("fuzzing") of every public function against ``fastattn.reference``.

Each test draws shapes (empty, one, lengths across the kernels' tiles), memory layouts
(C, Fortran, negative strides, every other element, misaligned by one byte), dtypes
(float16, bfloat16, float32, float64), masks (bool, float with ``-inf``, broadcast, fully
masked rows) and thread counts, and compares with the plain float64 reference.

The number of examples comes from the hypothesis profile (tests/conftest.py,
``FASTATTN_HYPOTHESIS_PROFILE``): ``default``/``ci`` are bounded and derandomized; ``long``
runs 700 examples per test, >= 10,000 in all:

    FASTATTN_HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz.py

The session ends with the count (``fuzz: N examples ...``).
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import fastattn
from fastattn import reference
from fuzz_count import EXAMPLES
from helpers import RTOL, assert_close, assert_lse_close

FLOATS = [np.float16, fastattn.bfloat16, np.float32, np.float64]
DTYPES = st.sampled_from(FLOATS)
THREADS = st.sampled_from([1, 2, 3, None])
LAYOUTS = ("c", "fortran", "reversed", "strided", "misaligned")
# lengths: mostly small, sometimes across the kernels' 64/256-row tiles
LENGTHS = st.one_of(st.integers(0, 20), st.integers(21, 80), st.sampled_from([255, 257, 300]))
SMALL = st.integers(0, 24)


def count(name):
    EXAMPLES[name] += 1


# ---- data and its memory layout -------------------------------------------------------

def values(seed, shape, dtype, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


def relayout(a, kind, axes=()):
    """The values of ``a`` in another memory layout (a view where that is the point)."""
    a = np.asarray(a)
    if kind == "c" or a.ndim == 0:
        return a.copy()
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "reversed":                    # negative strides on `axes`
        axes = tuple(ax for ax in axes if ax < a.ndim) or (a.ndim - 1,)
        return np.flip(np.flip(a, axes).copy(), axes)
    if kind == "strided":                     # every other element of `axes`
        axes = tuple(ax for ax in axes if ax < a.ndim) or (a.ndim - 1,)
        big = np.zeros(tuple(n * (2 if ax in axes else 1) for ax, n in enumerate(a.shape)),
                       a.dtype)
        view = big[tuple(slice(None, None, 2) if ax in axes else slice(None)
                         for ax in range(a.ndim))]
        view[...] = a
        return view
    if kind == "misaligned":                  # contiguous, one byte off
        buf = np.zeros(a.nbytes + 1, np.uint8)
        view = buf[1:].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    raise ValueError(kind)


@st.composite
def laid_out(draw, a):
    kind = draw(st.sampled_from(LAYOUTS))
    axes = tuple(draw(st.lists(st.integers(0, max(a.ndim - 1, 0)), max_size=3, unique=True)))
    out = relayout(a, kind, axes)
    assert out.shape == a.shape
    return out


@st.composite
def operand(draw, shape, dtype, low=-2.0, high=2.0):
    seed = draw(st.integers(0, 2**32 - 1))
    return draw(laid_out(values(seed, shape, dtype, low, high)))


def batch_shapes(draw, n, max_dims=2):
    """``n`` leading shapes that broadcast together (each axis 1 or the common size)."""
    ndim = draw(st.integers(0, max_dims))
    full = [draw(st.integers(0, 3) if draw(st.booleans()) else st.integers(1, 3))
            for _ in range(ndim)]
    shapes = []
    for _ in range(n):
        keep = draw(st.integers(0, ndim))               # leading axes may be absent
        shapes.append(tuple(1 if draw(st.booleans()) else s for s in full[ndim - keep:]))
    return tuple(full), shapes


@st.composite
def masks(draw, shape, dtype, allow_float=True):
    """None, a bool mask or a float mask (finite values and -inf) broadcastable to shape,
    with some fully masked rows."""
    kind = draw(st.sampled_from(["none", "bool", "float"] if allow_float else ["none", "bool"]))
    if kind == "none":
        return None, None
    mshape = tuple(1 if draw(st.booleans()) else n for n in shape)
    mshape = mshape[draw(st.integers(0, len(mshape))):] if len(mshape) > 2 else mshape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    keep = rng.random(mshape) < density
    if kind == "bool":
        return draw(laid_out(keep)), keep
    mdtype = draw(st.sampled_from([dtype, np.float32, np.float64]))
    add = np.where(keep, rng.uniform(-1, 1, mshape) * draw(st.sampled_from([0.0, 1.0])),
                   -np.inf).astype(mdtype)
    return draw(laid_out(add)), add


def tol(dtype):
    return np.dtype(dtype)


def result_dtype(*dtypes):
    return fastattn._validation.promoted_dtype(*[np.empty(0, d) for d in dtypes])


def f64(a):
    """A floating array in float64; bool masks (and anything else) as they are."""
    if isinstance(a, np.ndarray) and (a.dtype.kind == "f" or a.dtype == fastattn.bfloat16):
        return a.astype(np.float64)
    return a


def check_grads(got, want, dtype, backward, args, kw):
    """Gradients against the reference's; for half operands, against the same backward
    run in float64 on the same (half-rounded) forward output instead: the backward forms
    D = rowsum(dO * O) from the output as returned (documented, as PyTorch and
    flash-attn do), whose rounding error the sums over L or S rows grow without bound
    (seen: 0.017 for dK at L = 21). The float64 backward is checked against the
    reference by the float64 examples."""
    if dtype in (np.float16, fastattn.bfloat16):
        want = backward(*(f64(a) for a in args), **kw)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        # each gradient comes in its input's dtype (the mask's may be float32 for float64
        # operands): the looser of the two tolerances
        loose = max((np.dtype(dtype), np.dtype(g.dtype)), key=lambda d: RTOL[d])
        check_close(g, w, loose)


def check_close(got, want, dtype):
    """Within the dtype's tolerance of the reference; where the reference lies beyond
    the dtype's range (float16: 65504), the result must have overflowed to it."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    top = float(ml_dtypes.finfo(dtype).max)
    over = np.abs(want) > top
    if over.any():
        assert (np.abs(got[over]) >= top).all() and (np.sign(got[over]) ==
                                                    np.sign(want[over])).all()
        got, want = got[~over], want[~over]
    assert_close(got, want, tol(dtype))


# ---- dense attention, softmax, weights --------------------------------------------------

@st.composite
def sdpa_case(draw):
    dtype = draw(DTYPES)
    L, S = draw(LENGTHS), draw(LENGTHS)
    E, Ev = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    full, (qb, kb) = batch_shapes(draw, 2)
    gqa = draw(st.booleans()) and len(qb) >= 1 and len(kb) >= 1 and qb[-1] > 0
    if gqa:
        hq = qb[-1]
        hk = draw(st.sampled_from([d for d in range(1, hq + 1) if hq % d == 0]))
        kb = kb[:-1] + (hk,)
    q = draw(operand(qb + (L, E), dtype))
    k = draw(operand(kb + (S, E), dtype))
    v = draw(operand(kb + (S, Ev), dtype))
    mask, mvals = draw(masks(full + (L, S), dtype))
    return dtype, q, k, v, mask, gqa


@given(case=sdpa_case(), is_causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]),
       scale=st.sampled_from([None, 0.3, 1.0]), out_kind=st.sampled_from([None] + list(LAYOUTS)),
       dropout=st.sampled_from([0.0, 0.0, 0.0, 0.4]), seed=st.integers(0, 1000), threads=THREADS)
def test_fuzz_scaled_dot_product_attention(case, is_causal, alignment, scale, out_kind,
                                           dropout, seed, threads):
    count("sdpa")
    dtype, q, k, v, mask, gqa = case
    kw = dict(is_causal=is_causal, causal_alignment=alignment, scale=scale, enable_gqa=gqa)
    if dropout:
        kw.update(dropout_p=dropout, rng=seed)
    want, want_lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True,
                                                            **kw)
    rdt = result_dtype(q.dtype, k.dtype, v.dtype)
    out = None if out_kind is None else relayout(np.zeros(want.shape, rdt), out_kind)
    got, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, out=out,
                                                     num_threads=threads, **kw)
    assert got.shape == want.shape and got.dtype == rdt
    if out is not None:
        assert got is out
    check_close(got, want, dtype)
    assert_lse_close(lse, want_lse, np.float32 if dtype != np.float64 else np.float64)


@given(dtype=DTYPES, data=st.data(), log=st.booleans(), scale=st.sampled_from([None, 0.5, 3.0]),
       where=st.sampled_from(["new", "out", "in place"]), threads=THREADS)
def test_fuzz_masked_and_log_softmax(dtype, data, log, scale, where, threads):
    count("softmax")
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(LENGTHS if i == ndim - 1 else SMALL) for i in range(ndim))
    x = data.draw(operand(shape, dtype, -4, 4))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    mask, _ = data.draw(masks(shape, dtype))
    fn, ref = ((fastattn.log_softmax, reference.log_softmax) if log
               else (fastattn.masked_softmax, reference.softmax))
    with np.errstate(divide="ignore"):
        want = ref(x, mask, axis=axis, scale=scale)
    rdt = result_dtype(x.dtype)
    out = None
    if where == "out":
        out = data.draw(laid_out(np.zeros(shape, rdt)))
    elif where == "in place" and x.dtype == rdt:
        out = x
    if out is not None and not out.flags.c_contiguous:
        out = np.zeros(shape, rdt)                     # out must be C-contiguous (documented)
    got = fn(x, mask, axis=axis, scale=scale, out=out, num_threads=threads)
    assert got.shape == shape and got.dtype == rdt
    np.testing.assert_array_equal(np.isneginf(got.astype(np.float64)), np.isneginf(want))
    fin = np.isfinite(want)
    check_close(got.astype(np.float64)[fin], want[fin], dtype)


@given(case=sdpa_case(), is_causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]), threads=THREADS)
def test_fuzz_attention_weights(case, is_causal, alignment, threads):
    count("attention_weights")
    dtype, q, k, _, mask, gqa = case
    assume(not gqa)
    kw = dict(is_causal=is_causal, causal_alignment=alignment)
    got = fastattn.attention_weights(q, k, mask, num_threads=threads, **kw)
    check_close(got, reference.attention_weights(q, k, mask, **kw), dtype)


# ---- block-sparse attention and its patterns ---------------------------------------------

@st.composite
def qkv(draw, L=None, S=None, batch=None, dtypes=DTYPES):
    dtype = draw(dtypes)
    L = draw(LENGTHS) if L is None else L
    S = draw(LENGTHS) if S is None else S
    E, Ev = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    b = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) if batch is None else batch
    return (dtype, draw(operand(b + (L, E), dtype)), draw(operand(b + (S, E), dtype)),
            draw(operand(b + (S, Ev), dtype)))


@st.composite
def layouts(draw, L, S, heads):
    """A BlockLayout for (L, S) by one of its constructors, with a random element rule."""
    bs = (draw(st.integers(1, 70)), draw(st.integers(1, 70)))
    nqb, nkb = -(-L // bs[0]), -(-S // bs[1])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rule = {}
    if draw(st.booleans()):
        rule["window"] = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
    if draw(st.booleans()):
        rule["dilation"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        rule["is_causal"] = True
    if draw(st.booleans()):
        rule["segment"] = draw(st.integers(1, 30))
    if draw(st.booleans()):
        rule["global_query"] = rng.random(L) < 0.1
    if draw(st.booleans()):
        rule["global_key"] = np.flatnonzero(rng.random(S) < 0.1)
    how = draw(st.sampled_from(["rule", "mask", "blocks", "rule+mask"]))
    per_head = heads is not None and draw(st.booleans())
    H = (heads,) if per_head else ()
    if how == "mask":
        return fastattn.BlockLayout.from_mask(rng.random(H + (L, S)) < 0.5, bs)
    if how == "blocks":
        return fastattn.BlockLayout.from_blocks(rng.random(H + (nqb, nkb)) < 0.5, (L, S), bs,
                                                **rule)
    if how == "rule+mask":
        rule["mask"] = rng.random(H + (L, S)) < 0.7
    return fastattn.BlockLayout.from_rule((L, S), bs, **rule)


@given(data=st.data(), threads=THREADS)
def test_fuzz_block_sparse_attention(data, threads):
    count("block_sparse")
    heads = data.draw(st.sampled_from([None, 1, 3]))
    batch = () if heads is None else (data.draw(st.integers(1, 2)), heads)
    dtype, q, k, v = data.draw(qkv(batch=batch))
    layout = data.draw(layouts(q.shape[-2], k.shape[-2], heads))
    got, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True,
                                               num_threads=threads)
    mask = layout.to_mask()
    assert mask.shape in ((q.shape[-2], k.shape[-2]), (heads, q.shape[-2], k.shape[-2]))
    want, want_lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    check_close(got, want, dtype)
    assert_lse_close(lse, want_lse, np.float32 if dtype != np.float64 else np.float64)


@given(data=st.data(), threads=THREADS,
       pattern=st.sampled_from(["local", "strided", "fixed", "global", "longformer"]))
def test_fuzz_sparse_patterns(data, threads, pattern):
    count("patterns")
    dtype, q, k, v = data.draw(qkv())
    L, S = q.shape[-2], k.shape[-2]
    window = (data.draw(st.integers(0, 30)), data.draw(st.integers(0, 30)))
    tokens = sorted(set(data.draw(st.lists(st.integers(0, S - 1), max_size=3)))) if S else []
    kw = dict(return_lse=True)
    if pattern == "local":
        dil = data.draw(st.integers(1, 3))
        args = (window,)
        kw.update(dilation=dil, global_tokens=tokens or None)
    elif pattern in ("strided", "fixed"):
        args = (data.draw(st.integers(1, 20)),)
        kw.update(mode=pattern)
    elif pattern == "global":
        args = (tokens,)
        kw.update(window=window)
    else:
        args = (window, tokens)
        kw.update(dilation=data.draw(st.integers(1, 3)))
    name = "strided" if pattern == "fixed" else pattern
    got, lse = getattr(fastattn, f"{name}_attention")(q, k, v, *args, num_threads=threads, **kw)
    want, want_lse = getattr(reference, f"{name}_attention")(q, k, v, *args, **kw)
    check_close(got, want, dtype)
    assert_lse_close(lse, want_lse, np.float32 if dtype != np.float64 else np.float64)


@given(data=st.data(), threads=THREADS, seed=st.integers(0, 1000))
def test_fuzz_bigbird(data, threads, seed):
    count("bigbird")
    n = data.draw(LENGTHS)
    heads = data.draw(st.sampled_from([None, 2]))
    batch = () if heads is None else (heads,)
    dtype, q, k, v = data.draw(qkv(L=n, S=n, batch=batch))
    kw = dict(block_size=data.draw(st.integers(1, 40)),
              num_random_blocks=data.draw(st.integers(0, 3)),
              num_window_blocks=data.draw(st.integers(0, 4)),
              num_global_blocks=data.draw(st.integers(0, 2)))
    got = fastattn.bigbird_attention(q, k, v, rng=seed, num_threads=threads, **kw)
    layout = fastattn.bigbird_layout(n, num_heads=heads, rng=seed, **kw)
    want = reference.scaled_dot_product_attention(q, k, v, layout.to_mask())
    check_close(got, want, dtype)


# ---- content-based sparsity ---------------------------------------------------------------

@given(data=st.data(), threads=THREADS)
def test_fuzz_lsh_attention(data, threads):
    count("lsh")
    dtype, q, _, v = data.draw(qkv(S=0))
    L = q.shape[-2]
    v = data.draw(operand(q.shape[:-1] + (v.shape[-1],), dtype))
    n_hashes = data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    buckets = rng.integers(0, data.draw(st.integers(1, 5)), q.shape[:-2] + (n_hashes, L))
    kw = dict(bucket_size=data.draw(st.integers(1, 24)), chunks_before=data.draw(st.integers(0, 2)),
              causal=data.draw(st.booleans()), self_mask=data.draw(st.booleans()))
    got, lse = fastattn.lsh_attention(q, v, n_hashes=n_hashes, buckets=buckets,
                                      return_lse=True, num_threads=threads, **kw)
    want, want_lse = reference.lsh_attention(q, v, buckets, return_lse=True, **kw)
    check_close(got, want, dtype)
    assert_lse_close(lse, want_lse, dtype)


@given(data=st.data(), threads=THREADS)
def test_fuzz_clustered_attention(data, threads):
    count("clustered")
    dtype, q, k, v = data.draw(qkv())
    L = q.shape[-2]
    clusters = data.draw(st.integers(1, max(1, min(6, L))))     # documented: <= L
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    assign = data.draw(laid_out(rng.integers(0, clusters, q.shape[:-2] + (L,))))
    topk = data.draw(st.sampled_from([None] + [t for t in (1, 3, 50) if t <= k.shape[-2]]))
    got = fastattn.clustered_attention(q, k, v, clusters=clusters, topk=topk,
                                       assignments=assign, num_threads=threads)
    want = reference.clustered_attention(q, k, v, np.asarray(assign), clusters, topk=topk)
    check_close(got, want, dtype)


@given(data=st.data(), threads=THREADS)
def test_fuzz_sinkhorn(data, threads):
    count("sinkhorn")
    dtype, q, k, v = data.draw(qkv())
    k = data.draw(operand(q.shape, dtype))
    v = data.draw(operand(q.shape[:-1] + (v.shape[-1],), dtype))
    kw = dict(block_size=data.draw(st.integers(1, 30)), n_iters=data.draw(st.integers(0, 8)),
              temperature=data.draw(st.sampled_from([0.3, 0.75, 2.0])))
    with np.errstate(over="ignore"):      # a half result may overflow (checked below)
        got = fastattn.sinkhorn_attention(q, k, v, num_threads=threads, **kw)
    check_close(got, reference.sinkhorn_attention(q, k, v, **kw), dtype)
    m = data.draw(st.integers(0, 12))
    x = data.draw(operand(q.shape[:-2] + (m, m), dtype, -3, 3))
    iters = data.draw(st.integers(0, 8))
    check_close(fastattn.sinkhorn(x, iters), reference.sinkhorn(x, iters), dtype)


# ---- low-rank and kernelised attention ----------------------------------------------------

@given(data=st.data(), threads=THREADS,
       kind=st.sampled_from(["linear", "linear causal", "performer", "performer causal",
                             "linformer", "synthesizer"]))
def test_fuzz_lowrank(data, threads, kind):
    count("lowrank")
    causal = kind.endswith("causal")
    if causal:
        n = data.draw(LENGTHS)
        dtype, q, k, v = data.draw(qkv(L=n, S=n))
    else:
        dtype, q, k, v = data.draw(qkv())
    S = k.shape[-2]
    if kind.startswith("linear"):
        eps = data.draw(st.sampled_from([1e-6, 0.0, 0.5]))
        got = fastattn.linear_attention(q, k, v, causal=causal, eps=eps, num_threads=threads)
        with np.errstate(invalid="ignore"):
            want = reference.linear_attention(q, k, v, causal=causal, eps=eps)
        if S == 0:          # no key: zeros (the reference's 0 / eps is NaN for eps = 0)
            want = np.zeros(got.shape)
    elif kind.startswith("performer"):
        w = fastattn.performer_features(q.shape[-1], data.draw(st.integers(1, 40)),
                                        rng=data.draw(st.integers(0, 100)))
        w = data.draw(laid_out(w))
        got = fastattn.performer_attention(q, k, v, features=w, causal=causal,
                                           num_threads=threads)
        if q.shape[-2] and S:
            want = reference.performer_attention(q, k, v, w, causal=causal)
        else:       # the reference's max over no keys fails; nothing seen gives zeros
            want = np.zeros(got.shape)
    elif kind == "linformer":
        assume(S > 0)
        kp = data.draw(st.integers(1, 8))
        e = data.draw(operand((kp, S), dtype, -0.5, 0.5))
        f = data.draw(st.sampled_from([None, "own"]))
        f = None if f is None else data.draw(operand((kp, S), dtype, -0.5, 0.5))
        got = fastattn.linformer_attention(q, k, v, e, f, num_threads=threads)
        want = reference.linformer_attention(q, k, v, e, f)
    else:
        logits = data.draw(operand(q.shape[:-2] + (S, S), dtype, -3, 3))
        got = fastattn.synthesizer_attention(v, weights=logits, num_threads=threads)
        want = reference.synthesizer_attention(v, logits)
    check_close(got, want, dtype)


# ---- masks, positions, heads ---------------------------------------------------------------

@given(L=SMALL, S=st.one_of(st.none(), SMALL), alignment=st.sampled_from(["top_left", "bottom_right"]),
       data=st.data())
def test_fuzz_masks(L, S, alignment, data):
    count("masks")
    m = fastattn.causal_mask(L, S, alignment=alignment)
    np.testing.assert_array_equal(m, reference.causal_keep(L, L if S is None else S, alignment))
    S = L if S is None else S
    lengths = data.draw(st.lists(st.integers(0, S), max_size=4))
    p = fastattn.padding_mask(lengths, S)
    assert p.shape == (len(lengths), 1, 1, S)
    np.testing.assert_array_equal(p[:, 0, 0], np.arange(S) < np.asarray(lengths, int)[:, None])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a, b = rng.random((L, S)) < 0.5, np.where(rng.random((1, S)) < 0.5, 0.0, -np.inf)
    c = fastattn.combine_masks(a, None, b)
    np.testing.assert_array_equal(np.isneginf(c) if c.dtype != bool else ~c,
                                  ~(a & (b == 0)))


@given(data=st.data(), dtype=DTYPES, layout=st.sampled_from(["interleaved", "half"]))
def test_fuzz_positions(data, dtype, layout):
    count("positions")
    length, dim = data.draw(SMALL), 2 * data.draw(st.integers(1, 12))
    base = data.draw(st.sampled_from([100.0, 10000.0]))
    pe = fastattn.sinusoidal_positional_encoding(length, dim, base=base, dtype=np.float64)
    np.testing.assert_allclose(pe, reference.sinusoidal_positional_encoding(length, dim,
                                                                            base=base),
                               atol=1e-12)
    x = data.draw(operand(tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
                          + (length, dim), dtype))
    pos = data.draw(laid_out(np.arange(length) + data.draw(st.integers(0, 50))))
    got = fastattn.apply_rotary(x, pos, base=base, layout=layout)
    want = reference.apply_rotary(x, pos, base=base, layout=layout)
    check_close(got, want, dtype)


@given(data=st.data(), dtype=DTYPES)
def test_fuzz_split_merge_heads(data, dtype):
    count("heads")
    H, D = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    x = data.draw(operand(tuple(data.draw(st.lists(st.integers(0, 3), max_size=2)))
                          + (data.draw(SMALL), H * D), dtype))
    h = fastattn.split_heads(x, H)
    assert h.shape == x.shape[:-2] + (H, x.shape[-2], D)
    np.testing.assert_array_equal(h, np.swapaxes(x.reshape(x.shape[:-1] + (H, D)), -2, -3))
    np.testing.assert_array_equal(fastattn.merge_heads(h), x)


@given(data=st.data(), threads=THREADS, need_weights=st.booleans(), causal=st.booleans())
def test_fuzz_multi_head_attention(data, threads, need_weights, causal):
    count("mha")
    dtype = data.draw(DTYPES)
    H = data.draw(st.integers(1, 4))
    Hkv = data.draw(st.sampled_from([d for d in range(1, H + 1) if H % d == 0]))
    D = data.draw(st.integers(1, 6))
    E, Ek, Ev_in = (data.draw(st.integers(1, 12)) for _ in range(3))
    batch = tuple(data.draw(st.lists(st.integers(1, 2), max_size=1)))
    L, S = data.draw(SMALL), data.draw(SMALL)
    x = data.draw(operand(batch + (L, E), dtype))
    kx = data.draw(operand(batch + (S, Ek), dtype))
    vx = data.draw(operand(batch + (S, Ev_in), dtype))
    Dv = data.draw(st.integers(1, 6))
    w = {"q_weight": data.draw(operand((H * D, E), dtype, -0.5, 0.5)),
         "k_weight": data.draw(operand((Hkv * D, Ek), dtype, -0.5, 0.5)),
         "v_weight": data.draw(operand((Hkv * Dv, Ev_in), dtype, -0.5, 0.5)),
         "out_weight": data.draw(operand((data.draw(st.integers(1, 8)), H * Dv), dtype,
                                         -0.5, 0.5))}
    if data.draw(st.booleans()):
        w["q_bias"] = data.draw(operand((H * D,), dtype))
        w["out_bias"] = data.draw(operand((w["out_weight"].shape[0],), dtype))
    mask = None
    if data.draw(st.booleans()):
        mask = np.random.default_rng(data.draw(st.integers(0, 99))).random((L, S)) < 0.7
    kpm = None
    if data.draw(st.booleans()):
        kpm = np.random.default_rng(data.draw(st.integers(0, 99))).random(batch + (S,)) < 0.7
    kw = dict(num_kv_heads=Hkv, attn_mask=mask, key_padding_mask=kpm, is_causal=causal,
              need_weights=need_weights, **w)
    assume(not (causal and mask is not None))
    got = fastattn.multi_head_attention(x, kx, vx, H, num_threads=threads, **kw)
    want = reference.multi_head_attention(x, kx, vx, H, **kw)
    if need_weights:
        check_close(got[0], want[0], dtype)
        check_close(got[1], want[1], dtype)
    else:
        check_close(got, want, dtype)


@given(data=st.data(), dtype=DTYPES, kv_heads=st.sampled_from([None, 1, 2]),
       bias=st.booleans(), causal=st.booleans(), threads=THREADS)
def test_fuzz_multi_head_attention_class(data, dtype, kv_heads, bias, causal, threads):
    count("mha class")
    E, H = 8, 4
    mha = fastattn.MultiHeadAttention(E, H, num_kv_heads=kv_heads, bias=bias, dtype=dtype,
                                      rng=data.draw(st.integers(0, 99)))
    x = data.draw(operand(tuple(data.draw(st.lists(st.integers(1, 2), max_size=1)))
                          + (data.draw(SMALL), E), dtype))
    got = mha(x, is_causal=causal, num_threads=threads)
    assert got.dtype == dtype and got.shape == x.shape
    w = {n: getattr(mha, n) for n in ("q_weight", "k_weight", "v_weight", "out_weight",
                                      "q_bias", "k_bias", "v_bias", "out_bias")}
    want = reference.multi_head_attention(x, x, x, H, num_kv_heads=mha.num_kv_heads,
                                          is_causal=causal, **w)
    check_close(got, want, dtype)


@given(data=st.data(), threads=THREADS, kind=st.sampled_from(["additive", "concat", "general",
                                                              "dot"]))
def test_fuzz_scoring(data, threads, kind):
    count("scoring")
    dtype, q, k, v = data.draw(qkv(L=data.draw(SMALL), S=data.draw(SMALL)))
    E = q.shape[-1]
    hidden = data.draw(st.integers(1, 8))
    mask, _ = data.draw(masks(q.shape[:-2] + (q.shape[-2], k.shape[-2]), dtype))
    if kind == "additive":
        w = dict(w_q=data.draw(operand((hidden, E), dtype)), w_k=data.draw(operand((hidden, E), dtype)),
                 v=data.draw(operand((hidden,), dtype)))
    elif kind == "concat":
        w = dict(w=data.draw(operand((hidden, 2 * E), dtype)), v=data.draw(operand((hidden,), dtype)))
    elif kind == "general":
        w = dict(w=data.draw(operand((E, E), dtype)))
    else:
        w = {}
    got, weights = getattr(fastattn, f"{kind}_attention")(q, k, v, mask=mask, return_weights=True,
                                                          num_threads=threads, **w)
    want = getattr(reference, f"{kind}_attention")(q, k, v, mask=mask, **w)
    want_out, want_w = want if isinstance(want, tuple) else (want, None)
    check_close(got, want_out, dtype)
    if want_w is not None:
        check_close(weights, want_w, dtype)


# ---- paged decoding -------------------------------------------------------------------------

@given(data=st.data(), threads=THREADS, causal=st.booleans())
def test_fuzz_paged_attention(data, threads, causal):
    count("paged")
    dtype = data.draw(DTYPES)
    B, Hkv = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3))
    H = Hkv * data.draw(st.integers(1, 3))
    T, E, Ev = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    bs, nblocks = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 12))
    kb = data.draw(operand((nblocks, Hkv, bs, E), dtype))
    vb = data.draw(operand((nblocks, Hkv, bs, Ev), dtype))
    maxb = data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    table = data.draw(laid_out(rng.integers(0, nblocks, (B, maxb))))
    lens = data.draw(laid_out(rng.integers(0, maxb * bs + 1, B)))
    q = data.draw(operand((B, H, T, E), dtype))
    got, lse = fastattn.paged_attention(q, kb, vb, table, lens, causal=causal, return_lse=True,
                                        num_threads=threads)
    want, want_lse = reference.paged_attention(q, kb, vb, np.asarray(table), np.asarray(lens),
                                               causal=causal, return_lse=True)
    check_close(got, want, dtype)
    assert_lse_close(lse, want_lse, np.float32 if dtype != np.float64 else np.float64)


@given(data=st.data(), threads=THREADS)
def test_fuzz_paged_kv_cache(data, threads):
    count("kv_cache")
    dtype = data.draw(DTYPES)
    Hkv, E = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 8))
    bs = data.draw(st.integers(1, 6))
    cache = fastattn.PagedKVCache(64, bs, Hkv, E, dtype=dtype)
    seqs, keys, vals = [], [], []
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for _ in range(data.draw(st.integers(1, 3))):
        if seqs and data.draw(st.booleans()):
            src = data.draw(st.integers(0, len(seqs) - 1))
            seqs.append(cache.fork(seqs[src]))
            keys.append(keys[src].copy())
            vals.append(vals[src].copy())
        else:
            seqs.append(cache.add_sequence())
            keys.append(np.zeros((Hkv, 0, E), dtype))
            vals.append(np.zeros((Hkv, 0, E), dtype))
        for _ in range(data.draw(st.integers(0, 3))):
            n = data.draw(st.integers(1, 7))           # documented: T >= 1
            kn = rng.standard_normal((Hkv, n, E)).astype(dtype)
            vn = rng.standard_normal((Hkv, n, E)).astype(dtype)
            cache.append(seqs[-1], data.draw(laid_out(kn)), data.draw(laid_out(vn)))
            keys[-1] = np.concatenate([keys[-1], kn], axis=1)
            vals[-1] = np.concatenate([vals[-1], vn], axis=1)
    T = data.draw(st.integers(1, 3))
    q = rng.standard_normal((len(seqs), Hkv * 2, T, E)).astype(dtype)
    got = cache.attention(q, seqs, causal=False, num_threads=threads)
    for i in range(len(seqs)):
        k = np.repeat(keys[i], 2, axis=0)
        v = np.repeat(vals[i], 2, axis=0)
        check_close(got[i], reference.scaled_dot_product_attention(q[i], k, v), dtype)


# ---- gradients ---------------------------------------------------------------------------

def _lse_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


@given(case=sdpa_case(), is_causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]),
       scale=st.sampled_from([None, 0.3]), dropout=st.sampled_from([0.0, 0.0, 0.3]),
       threads=THREADS, data=st.data())
def test_fuzz_scaled_dot_product_attention_backward(case, is_causal, alignment, scale,
                                                    dropout, threads, data):
    count("sdpa backward")
    dtype, q, k, v, mask, gqa = case
    kw = dict(is_causal=is_causal, causal_alignment=alignment, scale=scale, enable_gqa=gqa)
    if dropout:
        kw.update(dropout_p=dropout, rng=data.draw(st.integers(0, 1000)))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kw)
    grad = data.draw(operand(out.shape, out.dtype))
    mask_grad = mask is not None and mask.dtype != bool and data.draw(st.booleans())
    got = fastattn.scaled_dot_product_attention_backward(grad, q, k, v, out, lse, mask,
                                                         mask_grad=mask_grad,
                                                         num_threads=threads, **kw)
    want = reference.scaled_dot_product_attention_backward(grad, q, k, v, mask,
                                                           mask_grad=mask_grad, **kw)
    check_grads(got, want, dtype, fastattn.scaled_dot_product_attention_backward,
                (grad, q, k, v, out, lse, mask), dict(mask_grad=mask_grad, **kw))


@given(dtype=DTYPES, data=st.data(), scale=st.sampled_from([None, 0.5]), threads=THREADS)
def test_fuzz_masked_softmax_backward(dtype, data, scale, threads):
    count("softmax backward")
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(LENGTHS if i == ndim - 1 else SMALL) for i in range(ndim))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    mask, _ = data.draw(masks(shape, dtype))
    y = fastattn.masked_softmax(data.draw(operand(shape, dtype, -4, 4)), mask, axis=axis,
                                scale=scale)
    y = data.draw(laid_out(y))
    grad = data.draw(operand(shape, dtype))
    got = fastattn.masked_softmax_backward(grad, y, axis, scale=scale, num_threads=threads)
    check_close(got, reference.masked_softmax_backward(grad, y, axis, scale=scale), dtype)


@given(data=st.data(), threads=THREADS)
def test_fuzz_block_sparse_attention_backward(data, threads):
    count("block_sparse backward")
    heads = data.draw(st.sampled_from([None, 2]))
    batch = () if heads is None else (1, heads)
    dtype, q, k, v = data.draw(qkv(batch=batch))
    layout = data.draw(layouts(q.shape[-2], k.shape[-2], heads))
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    grad = data.draw(operand(out.shape, out.dtype))
    got = fastattn.block_sparse_attention_backward(grad, q, k, v, out, lse, layout,
                                                   num_threads=threads)
    want = reference.scaled_dot_product_attention_backward(grad, q, k, v, layout.to_mask())
    check_grads(got, want, dtype, fastattn.block_sparse_attention_backward,
                (grad, q, k, v, out, lse, layout), {})
