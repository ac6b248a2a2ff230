"""Classic scoring rules against direct NumPy transcriptions of their formulas."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastattn
from fastattn import reference
from fastattn._kernels import additive as additive_kernel
from helpers import assert_close, check_scratch_failure, threads_spy

DTYPES = [np.float32, np.float64]


def make_mask(rng, kind, shape, dtype):
    if kind == "bool":
        return rng.random(shape) > 0.3
    if kind == "float":
        return np.where(rng.random(shape) > 0.3, rng.standard_normal(shape),
                        -np.inf).astype(dtype)
    return None


@st.composite
def problems(draw):
    L, S = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    return dict(L=L, S=S, Eq=draw(st.integers(1, 9)), Ek=draw(st.integers(1, 9)),
                Ev=draw(st.integers(1, 6)), hidden=draw(st.sampled_from([1, 5, 16, 33])),
                B=draw(st.integers(1, 2)), dtype=draw(st.sampled_from(DTYPES)),
                kind=draw(st.sampled_from(["none", "bool", "float"])),
                mshape=draw(st.sampled_from([(L, S), (1, S), (L, 1), "batch"])),
                rule=draw(st.sampled_from(["additive", "concat", "general", "dot"])),
                seed=draw(st.integers(0, 2**32 - 1)))


@given(p=problems())
def test_random_shapes_match_reference(p):
    rng = np.random.default_rng(p["seed"])
    dt, B, L, S = p["dtype"], p["B"], p["L"], p["S"]
    Ek = p["Eq"] if p["rule"] == "dot" else p["Ek"]
    q = rng.standard_normal((B, L, p["Eq"])).astype(dt)
    k = rng.standard_normal((B, S, Ek)).astype(dt)
    v = rng.standard_normal((B, S, p["Ev"])).astype(dt)
    mshape = (B, 1, S) if p["mshape"] == "batch" else p["mshape"]
    mask = make_mask(rng, p["kind"], mshape, dt)
    h = p["hidden"]
    if p["rule"] == "additive":
        w = dict(w_q=rng.standard_normal((h, p["Eq"])), w_k=rng.standard_normal((h, Ek)),
                 v=rng.standard_normal(h))
    elif p["rule"] == "concat":
        w = dict(w=rng.standard_normal((h, p["Eq"] + Ek)), v=rng.standard_normal(h))
    elif p["rule"] == "general":
        w = dict(w=rng.standard_normal((p["Eq"], Ek)) / 3)
    else:
        w = {}
    w = {n: a.astype(dt) for n, a in w.items()}
    fn = getattr(fastattn, p["rule"] + "_attention")
    ref = getattr(reference, p["rule"] + "_attention")
    out, weights = fn(q, k, v, **w, mask=mask, return_weights=True)
    ref_out, ref_weights = ref(q, k, v, **w, mask=mask)
    assert out.dtype == dt and weights.dtype == dt
    assert_close(out, ref_out, dt)
    assert_close(weights, ref_weights, dt)
    assert_close(fn(q, k, v, **w, mask=mask), ref_out, dt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_accuracy(rng, dtype):
    # the kernel's vectorised tanh, seen through a 1-unit hidden layer with v = 1
    x = np.concatenate([np.linspace(-20, 20, 4001), [0.0, 1e-30, -1e-8, 0.624, 0.626, 1e4]])
    q = np.zeros((1, 1), dtype)
    # softmax of one key is 1, so use two keys [x, 0] and read the weights' log-odds
    for xi in x[::97]:
        keys = np.array([[xi], [0.0]], dtype=dtype)
        _, w = fastattn.additive_attention(q, keys, np.eye(2, dtype=dtype), w_q=np.ones((1, 1),
                                           dtype), w_k=np.ones((1, 1), dtype),
                                           v=np.ones(1, dtype), return_weights=True)
        got = np.log(w[0, 0] / w[0, 1])
        tol = 4e-7 if dtype == np.float32 else 1e-15
        assert abs(got - np.tanh(np.float64(dtype(xi)))) <= tol * 4 + 1e-12, xi


def tanh_scores(x, dtype):
    """The kernel's tanh of each x (one hidden unit, w = 1), padded as it needs."""
    x = np.asarray(x, dtype)
    pad = -len(x) % additive_kernel.KEY_PAD
    kpt = np.concatenate([x, np.zeros(pad, dtype)]).reshape(1, -1)
    a = np.full(1, -0.0, dtype)     # x + -0 is x, also for x = -0
    return additive_kernel.tanh_scores(a, kpt, np.ones(1, dtype))[:len(x)]


def test_tanh_ulp_error_float32():
    # tanhscores.h: at most 5 ulp over every float with FMA, 6.3 without (checked exhaustively
    # in C); here a dense sweep of [-10, 10], where all the error is, tiny and huge values
    x = np.concatenate([np.linspace(-10, 10, 400_001), np.geomspace(1e-38, 1, 2001),
                        -np.geomspace(1e-38, 1, 2001), [8.0, 8.000001, 7.999999, 1e30, -3e38]])
    x = x.astype(np.float32)
    got = tanh_scores(x, np.float32).astype(np.float64)
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    err = np.abs(got - ref) / ulp
    assert err.max() <= 6.5, (err.max(), x[err.argmax()])
    assert err.mean() <= 1


def test_tanh_error_float64():
    # at most 9 ulp (absolute error 1e-15) against long double tanh
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-25, 25, 200_000), rng.uniform(-1, 1, 100_000),
                        np.geomspace(1e-300, 1, 1001), np.linspace(18.4, 18.6, 1001)])
    got = tanh_scores(x, np.float64)
    ref = np.tanh(x.astype(np.longdouble))
    err = np.abs(got - ref).astype(np.float64)
    assert err.max() <= 1e-15
    assert (err / np.spacing(np.abs(ref).astype(np.float64))).max() <= 9


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_special_values(dtype):
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 30.0, -30.0, 3e38], dtype)
    got = tanh_scores(x, dtype)
    np.testing.assert_array_equal(got[[0, 1, 6, 7, 8]], [1, -1, 1, -1, 1])
    assert np.isnan(got[2])
    np.testing.assert_array_equal(got[3:5], 0)    # a sum: +-0 both give +0
    assert got[5] == x[5]


@settings(max_examples=40, deadline=None)
@given(h=st.sampled_from([0, 1, 5, 16, 17, 40]), blocks=st.integers(1, 4),
       scale=st.sampled_from([0.01, 1.0, 10.0]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_tanh_scores_match_formula(h, blocks, scale, dtype, seed):
    # s[j] = sum_c w[c] tanh(a[c] + kpt[c, j]), against float64 on the same rounded sums
    rng = np.random.default_rng(seed)
    n = blocks * additive_kernel.KEY_PAD
    a = (rng.standard_normal(h) * scale).astype(dtype)
    kpt = (rng.standard_normal((h, n)) * scale).astype(dtype)
    w = rng.standard_normal(h).astype(dtype)
    got = additive_kernel.tanh_scores(a, kpt, w)
    terms = w[:, None].astype(np.float64) * np.tanh((a[:, None] + kpt).astype(np.float64))
    ref = terms.sum(axis=0)
    eps = np.finfo(dtype).eps
    # tanh (<= 10 ulp) and the summation (<= h roundings), relative to sum |terms|
    tol = (10 + h) * eps * np.abs(terms).sum(axis=0)
    assert got.dtype == dtype and got.shape == (n,)
    assert np.all(np.abs(got - ref) <= tol + 1e-300)


def test_tanh_scores_rejects_bad_input():
    f32, pad = np.float32, additive_kernel.KEY_PAD
    with pytest.raises(TypeError, match="float32 or all float64"):
        additive_kernel.tanh_scores(np.zeros(2), np.zeros((2, pad), f32), np.zeros(2))
    with pytest.raises(ValueError, match="multiple of"):
        additive_kernel.tanh_scores(np.zeros(2), np.zeros((2, pad + 1)), np.zeros(2))
    with pytest.raises(ValueError, match="C-contiguous"):
        additive_kernel.tanh_scores(np.zeros(2), np.zeros((2, 2 * pad))[:, ::2], np.zeros(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_mask_spans_and_key_pieces(rng, dtype):
    # hidden 300 cuts kp.T into pieces of 48 (float64) / 96 (float32) keys; rows whose
    # kept keys start or end mid-vector, a single kept key, none, all
    L, S, h = 7, 203, 300
    q = rng.standard_normal((2, L, 6)).astype(dtype)
    k = rng.standard_normal((2, S, 5)).astype(dtype)
    v = rng.standard_normal((2, S, 3)).astype(dtype)
    w = dict(w_q=(rng.standard_normal((h, 6)) / 3).astype(dtype),
             w_k=(rng.standard_normal((h, 5)) / 3).astype(dtype),
             v=(rng.standard_normal(h) / 8).astype(dtype))
    mask = np.zeros((2, L, S), bool)
    mask[:, 0, 17:50] = True
    mask[:, 1, 100] = True
    mask[:, 2, S - 1] = True
    mask[:, 3] = True
    mask[:, 4, [0, 95, 96, 150]] = True
    mask[:, 6] = rng.random(S) > 0.5
    out, a = fastattn.additive_attention(q, k, v, **w, mask=mask, return_weights=True)
    ref_out, ref_a = reference.additive_attention(q, k, v, **w, mask=mask)
    assert_close(out, ref_out, dtype)
    assert_close(a, ref_a, dtype)
    np.testing.assert_array_equal(a[~mask], 0)
    np.testing.assert_array_equal(out[:, 5], 0)
    np.testing.assert_allclose(a[:, [1, 2]].sum(-1), 1)


def test_broadcast_projections_and_weight_layouts(rng):
    # one query matrix against several key matrices and the reverse (each distinct matrix
    # is projected once); weights as a transposed view and a strided slice; no hidden
    # units; no features
    w_q = rng.standard_normal((5, 7)).T                   # (7, 5), column-major
    w_k = rng.standard_normal((14, 4))[::2]               # (7, 4), row stride 8
    cases = [(rng.standard_normal((4, 5)), rng.standard_normal((3, 2, 6, 4)), w_q, w_k),
             (rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((6, 4)), w_q, w_k),
             (rng.standard_normal((4, 5)), rng.standard_normal((2, 6, 4)),
              np.ones((0, 5)), np.ones((0, 4))),
             (np.ones((4, 0)), rng.standard_normal((2, 6, 0)), np.ones((7, 0)), np.ones((7, 0)))]
    for q, k, wq, wk in cases:
        v = rng.standard_normal((6, 2))
        w = dict(w_q=wq, w_k=wk, v=rng.standard_normal(wq.shape[0]))
        out, a = fastattn.additive_attention(q, k, v, **w, return_weights=True)
        ref_out, ref_a = reference.additive_attention(q, k, v, **w)
        assert_close(out, ref_out, np.float64)
        assert_close(a, ref_a, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_and_tiny_projections(rng, dtype):
    # |W_q q + W_k k| far beyond the clamp (tanh exactly +-1) and far below (tanh = x)
    q, k = rng.standard_normal((3, 4)), rng.standard_normal((20, 4))
    v = rng.standard_normal((20, 2))
    for scale in (1e6, 1e-6):
        w = dict(w_q=rng.standard_normal((8, 4)) * scale, w_k=rng.standard_normal((8, 4)) * scale,
                 v=rng.standard_normal(8) / scale ** 0.5)
        args = [a.astype(dtype) for a in (q, k, v)]
        w = {n: a.astype(dtype) for n, a in w.items()}
        out, a = fastattn.additive_attention(*args, **w, return_weights=True)
        ref_out, ref_a = reference.additive_attention(*args, **w)
        assert np.isfinite(out).all()
        assert_close(out, ref_out, dtype)
        assert_close(a, ref_a, dtype)


def test_fully_masked_rows_and_batch_broadcast(rng):
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((1, 5, 4))
    v = rng.standard_normal((5, 2))
    mask = np.ones((3, 5), bool)
    mask[1] = False
    w = dict(w_q=rng.standard_normal((6, 4)), w_k=rng.standard_normal((6, 4)),
             v=rng.standard_normal(6))
    out, a = fastattn.additive_attention(q, k, v, **w, mask=mask, return_weights=True)
    assert out.shape == (2, 3, 2) and not np.isnan(out).any()
    np.testing.assert_array_equal(out[:, 1], 0)
    np.testing.assert_array_equal(a[:, 1], 0)
    ref_out, _ = reference.additive_attention(q, k, v, **w, mask=mask)
    assert_close(out, ref_out, np.float64)


def test_independent_of_threads_and_non_contiguous(rng):
    q = rng.standard_normal((40, 10))[:, ::2]
    k = rng.standard_normal((3, 30, 5)).transpose(1, 0, 2)[:, 1]
    v = rng.standard_normal((30, 6))[:, ::2]
    w = dict(w_q=rng.standard_normal((8, 5)), w_k=rng.standard_normal((8, 5)),
             v=rng.standard_normal(8))
    one = fastattn.additive_attention(q, k, v, **w, num_threads=1)
    # thread count changes the row blocks, hence BLAS rounding only
    np.testing.assert_allclose(one, fastattn.additive_attention(q, k, v, **w, num_threads=4),
                               rtol=1e-13, atol=1e-15)
    assert_close(one, reference.additive_attention(q, k, v, **w)[0], np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_bit_identical_for_any_thread_count(monkeypatch, rng, dtype):
    # row blocks of BLOCK_ROWS for every thread count (L * batch >= 4 * 8 * BLOCK_ROWS)
    # and projections in blocks of BLOCK_ROWS_MAX rows: the same bits for 1..8 threads
    picked = threads_spy(monkeypatch)
    q = rng.standard_normal((2, 4096, 12)).astype(dtype)
    k = rng.standard_normal((2, 4096, 12)).astype(dtype)[:, :150]
    v = rng.standard_normal((2, 150, 7)).astype(dtype)
    mask = rng.random((4096, 150)) > 0.2
    w = dict(w_q=rng.standard_normal((16, 12)), w_k=rng.standard_normal((16, 12)),
             v=rng.standard_normal(16))
    one = fastattn.additive_attention(q, k, v, **w, mask=mask, num_threads=1)
    for threads in range(2, 9):
        np.testing.assert_array_equal(
            fastattn.additive_attention(q, k, v, **w, mask=mask, num_threads=threads), one)
    assert max(picked) == 8


def test_additive_scratch_failure_raises_memory_error(monkeypatch, rng):
    picked = threads_spy(monkeypatch)
    q, k, v = (rng.standard_normal((2, 1000, 16)) for _ in range(3))
    w = dict(w_q=rng.standard_normal((32, 16)), w_k=rng.standard_normal((32, 16)),
             v=rng.standard_normal(32))
    for threads in (1, 4):
        check_scratch_failure(lambda: fastattn.additive_attention(
            q, k, v, **w, return_weights=True, num_threads=threads))
    assert max(picked) == 4


def test_additive_memory_is_not_l_s_hidden(rng):
    L = S = 256
    hidden = 128
    q = rng.standard_normal((L, 16)).astype(np.float32)
    k = rng.standard_normal((S, 16)).astype(np.float32)
    w = dict(w_q=rng.standard_normal((hidden, 16)).astype(np.float32),
             w_k=rng.standard_normal((hidden, 16)).astype(np.float32),
             v=rng.standard_normal(hidden).astype(np.float32))
    tracemalloc.start()
    fastattn.additive_attention(q, k, k, **w)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < L * S * hidden * 4 / 20          # the broadcast tensor would be 32 MiB


def test_bad_inputs(rng):
    q, k = np.ones((2, 4)), np.ones((3, 5))
    ok = dict(w_q=np.ones((6, 4)), w_k=np.ones((6, 5)), v=np.ones(6))
    add = fastattn.additive_attention
    with pytest.raises(ValueError, match=r"w_k must have shape \(6, 5\)"):
        add(q, k, k, **dict(ok, w_k=np.ones((6, 4))))
    with pytest.raises(ValueError, match=r"w_q must have shape \(hidden, 4\)"):
        add(q, k, k, **dict(ok, w_q=np.ones((6, 3))))
    with pytest.raises(ValueError, match=r"v must have shape \(6,\)"):
        add(q, k, k, **dict(ok, v=np.ones(5)))
    with pytest.raises(ValueError, match="same length"):
        add(q, k, np.ones((4, 5)), **ok)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4\)"):
        add(q, k, k, **ok, mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="do not broadcast"):
        add(np.ones((2, 2, 4)), np.ones((3, 3, 5)), np.ones((3, 3, 5)), **ok)
    with pytest.raises(TypeError):
        add(q, k, k, **ok, mask=np.ones((2, 3), int))
    with pytest.raises(TypeError):
        add(q.astype(complex), k, k, **ok)
    with pytest.raises(ValueError, match=r"w must have shape \(hidden, 9\)"):
        fastattn.concat_attention(q, k, k, w=np.ones((6, 8)), v=np.ones(6))
    with pytest.raises(ValueError, match=r"w must have shape \(4, 5\)"):
        fastattn.general_attention(q, k, k, w=np.ones((5, 4)))
    with pytest.raises(ValueError, match="same feature size"):
        fastattn.dot_attention(q, k, k)
