"""Classic scoring rules against direct NumPy transcriptions of their formulas."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close

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
