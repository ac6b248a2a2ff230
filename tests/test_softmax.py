"""masked_softmax, log_softmax and attention_weights against fastattn.reference."""
import numpy as np
import pytest
import scipy.special
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close, check_scratch_failure, threads_spy

DTYPES = [np.float32, np.float64]


@st.composite
def softmax_problems(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()):
        shape = shape[:-1] + (draw(st.integers(1, 300)),)
    # a mask shape that broadcasts to `shape`: some axes 1, maybe fewer dims
    mdims = draw(st.integers(0, ndim))
    mshape = tuple(1 if draw(st.booleans()) else n for n in shape[ndim - mdims:])
    return dict(shape=shape, mshape=mshape, dtype=draw(st.sampled_from(DTYPES)),
                kind=draw(st.sampled_from(["none", "bool", "float"])),
                axis=draw(st.integers(-ndim, ndim - 1)),
                scale=draw(st.sampled_from([None, 0.5, 3.0])),
                log=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@given(p=softmax_problems())
def test_random_shapes_match_reference(p):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal(p["shape"]).astype(p["dtype"])
    mask = None
    if p["kind"] == "bool":
        mask = rng.random(p["mshape"]) > 0.3
    elif p["kind"] == "float":
        mask = np.where(rng.random(p["mshape"]) > 0.3, rng.standard_normal(p["mshape"]),
                        -np.inf).astype(p["dtype"])
    fn, ref = (fastattn.log_softmax, reference.log_softmax) if p["log"] else \
        (fastattn.masked_softmax, reference.softmax)
    got = fn(x, mask, axis=p["axis"], scale=p["scale"])
    want = ref(x, mask, axis=p["axis"], scale=p["scale"])
    assert got.dtype == p["dtype"] and got.shape == x.shape
    if p["log"]:
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        fin = np.isfinite(want)
        assert_close(got[fin], want[fin], p["dtype"])
    else:
        assert_close(got, want, p["dtype"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_scipy(rng, dtype):
    x = rng.standard_normal((3, 4, 50)).astype(dtype)
    for axis in (0, 1, -1):
        assert_close(fastattn.masked_softmax(x, axis=axis), scipy.special.softmax(
            x.astype(np.float64), axis=axis), dtype)
        assert_close(fastattn.log_softmax(x, axis=axis), scipy.special.log_softmax(
            x.astype(np.float64), axis=axis), dtype)


def test_fully_masked_rows_give_zero_not_nan(rng):
    x = rng.standard_normal((4, 7)).astype(np.float32)
    keep = np.ones((4, 7), dtype=bool)
    keep[1] = False
    out = fastattn.masked_softmax(x, keep)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_allclose(out[[0, 2, 3]].sum(-1), 1, rtol=1e-6)
    additive = np.where(keep, 0.0, -np.inf).astype(np.float32)
    np.testing.assert_array_equal(fastattn.masked_softmax(x, additive)[1], 0)
    assert np.isneginf(fastattn.log_softmax(x, keep)[1]).all()


def test_length_one_and_empty(rng):
    np.testing.assert_array_equal(fastattn.masked_softmax(np.array([[3.0], [-2.0]])), 1)
    assert fastattn.masked_softmax(np.zeros((0, 5))).shape == (0, 5)
    assert fastattn.masked_softmax(np.zeros((3, 0))).shape == (3, 0)


def test_non_contiguous_and_read_only_inputs(rng):
    base = rng.standard_normal((6, 40, 30))
    x = base[::2, 5:25, ::3]                          # strided on every axis
    mask = np.broadcast_to(rng.random((1, 20, 1)) > 0.2, (1, 20, 10))
    assert_close(fastattn.masked_softmax(x, mask), reference.softmax(x, mask), np.float64)
    ro = np.array(x)
    ro.flags.writeable = False
    assert_close(fastattn.masked_softmax(ro, axis=1), reference.softmax(ro, axis=1),
                 np.float64)


def test_broadcast_mask_is_not_expanded(monkeypatch, rng):
    import fastattn._layout as layout
    seen = []
    orig = layout.PreparedMask.__init__

    def spy(self, mask, *args):
        seen.append(mask.shape)
        orig(self, mask, *args)
    monkeypatch.setattr(layout.PreparedMask, "__init__", spy)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    m = rng.random((2, 1, 1, 16)) > 0.5
    fastattn.masked_softmax(x, m)
    assert seen == [(2, 1, 1, 16)]


def test_out_and_in_place(rng):
    x = rng.standard_normal((5, 9)).astype(np.float32)
    want = reference.softmax(x)
    out = np.empty_like(x)
    assert fastattn.masked_softmax(x, out=out) is out
    assert_close(out, want, np.float32)
    y = x.copy()
    assert fastattn.masked_softmax(y, out=y) is y
    assert_close(y, want, np.float32)
    out_t = np.empty_like(x)
    fastattn.masked_softmax(x, axis=0, out=out_t)
    assert_close(out_t, reference.softmax(x, axis=0), np.float32)
    with pytest.raises(TypeError, match="dtype"):
        fastattn.masked_softmax(x, out=np.empty((5, 9)))
    with pytest.raises(ValueError, match="shape"):
        fastattn.masked_softmax(x, out=np.empty((9, 5), np.float32))


def test_dtypes(rng):
    x16 = rng.standard_normal((2, 8)).astype(np.float16)
    assert fastattn.masked_softmax(x16).dtype == np.float16
    assert fastattn.masked_softmax(np.arange(6).reshape(2, 3)).dtype == np.float64
    for bad in (np.complex64, bool, object):
        with pytest.raises(TypeError):
            fastattn.masked_softmax(np.ones(3, dtype=bad))
    with pytest.raises(TypeError, match="mask"):
        fastattn.masked_softmax(np.ones(3), np.ones(3, dtype=np.int32))


def test_nan_propagates_to_its_row_only():
    x = np.array([[1.0, np.nan], [1.0, 2.0]])
    out = fastattn.masked_softmax(x)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_independent_of_threads(rng):
    x = rng.standard_normal((3, 37, 61)).astype(np.float32)
    m = rng.random((37, 61)) > 0.4
    one = fastattn.masked_softmax(x, m, num_threads=1)
    np.testing.assert_array_equal(one, fastattn.masked_softmax(x, m, num_threads=3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_for_any_thread_count(monkeypatch, rng, dtype):
    # every row is one softmax_row whatever the threads: the same bits for 1..8
    picked = threads_spy(monkeypatch)
    x = rng.standard_normal((8, 256, 512)).astype(dtype)       # 1M elements: 8 threads
    m = rng.random((256, 512)) > 0.3
    q, k = x[:2, :, :16], rng.standard_normal((2, 512, 16)).astype(dtype)
    runs = [lambda t: fastattn.masked_softmax(x, m, num_threads=t),
            lambda t: fastattn.log_softmax(x, m, axis=1, num_threads=t),
            lambda t: fastattn.attention_weights(q, k, is_causal=True, num_threads=t)]
    for run in runs:
        one = run(1)
        for threads in range(2, 9):
            np.testing.assert_array_equal(run(threads), one)
    assert max(picked) == 8


def test_scratch_failure_raises_memory_error(monkeypatch, rng):
    # log-softmax's row buffer (softmax itself needs no scratch), on one and on 4 threads
    picked = threads_spy(monkeypatch)
    x = rng.standard_normal((4, 256, 512)).astype(np.float32)
    for threads in (1, 4):
        check_scratch_failure(lambda: fastattn.log_softmax(x, num_threads=threads))
    assert max(picked) == 4


def test_bad_inputs():
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3, 4\)"):
        fastattn.masked_softmax(x, np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        fastattn.masked_softmax(x, np.ones((2, 3, 4), dtype=bool))   # would enlarge x
    with pytest.raises(np.exceptions.AxisError):
        fastattn.masked_softmax(x, axis=2)
    with pytest.raises(ValueError):
        fastattn.masked_softmax(np.float64(1.0))
    with pytest.raises(ValueError, match="finite"):
        fastattn.masked_softmax(x, scale=np.inf)
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.masked_softmax(x, num_threads=0)


# ---- attention_weights -------------------------------------------------------------

@given(L=st.integers(1, 40), S=st.integers(1, 70), E=st.sampled_from([1, 8, 33]),
       causal=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]),
       kind=st.sampled_from(["none", "bool", "float"]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_attention_weights_match_reference(L, S, E, causal, alignment, kind, dtype, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 3, L, E)).astype(dtype)
    k = rng.standard_normal((2, 1, S, E)).astype(dtype)
    mask = None
    if kind == "bool":
        mask = rng.random((3, L, S)) > 0.3
    elif kind == "float":
        mask = rng.standard_normal((1, S)).astype(dtype)
    got = fastattn.attention_weights(q, k, mask, is_causal=causal, causal_alignment=alignment)
    want = reference.attention_weights(q, k, mask, is_causal=causal,
                                       causal_alignment=alignment)
    assert got.dtype == dtype
    assert_close(got, want, dtype)


def test_attention_weights_times_value_is_sdpa(rng):
    q, k, v = (rng.standard_normal((2, 4, n, 16)) for n in (9, 13, 13))
    mask = rng.random((9, 13)) > 0.3
    w = fastattn.attention_weights(q, k, mask, is_causal=True)
    assert_close(w @ v, fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=True),
                 np.float64)


def test_attention_weights_mask_extends_batch(rng):
    q, k = rng.standard_normal((5, 8)), rng.standard_normal((6, 8))
    mask = rng.random((2, 3, 5, 6)) > 0.3
    got = fastattn.attention_weights(q, k, mask)
    assert got.shape == (2, 3, 5, 6)
    assert_close(got, reference.attention_weights(q, k, mask), np.float64)


def test_attention_weights_bad_inputs():
    q, k = np.ones((2, 4, 8)), np.ones((2, 5, 8))
    with pytest.raises(ValueError, match="feature size"):
        fastattn.attention_weights(q, np.ones((2, 5, 7)))
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        fastattn.attention_weights(q, k, np.ones((3, 5), dtype=bool))
    with pytest.raises(ValueError, match="do not broadcast"):
        fastattn.attention_weights(q, np.ones((3, 5, 8)))
    with pytest.raises(ValueError, match="causal_alignment"):
        fastattn.attention_weights(q, k, causal_alignment="middle")
    with pytest.raises(TypeError):
        fastattn.attention_weights(q, k, np.ones((4, 5), dtype=np.int8))
    with pytest.raises(ValueError, match="at least 2"):
        fastattn.attention_weights(np.ones(8), k)
