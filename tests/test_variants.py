"""Linear attention, Performer, Linformer and Synthesizer against their float64 references."""
import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import lowrank, reference
from helpers import assert_close, check_scratch_failure, threads_spy


def make(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


# ---- linear attention -------------------------------------------------------------------

@given(L=st.integers(1, 300), S=st.integers(1, 300), causal=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_linear_matches_naive(L, S, causal, dtype, seed):
    rng = np.random.default_rng(seed)
    if causal:
        S = L
    q, k, v = make(rng, (2, L, 8), dtype), make(rng, (2, S, 8), dtype), make(rng, (2, S, 5), dtype)
    out = fastattn.linear_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    assert_close(out, reference.linear_attention(q, k, v, causal=causal), dtype)


def test_causal_scan_equals_recurrence(rng, monkeypatch):
    monkeypatch.setattr(lowrank, "SCAN_CHUNK", 7)        # many chunks, ragged last one
    q, k, v = make(rng, (50, 6)), make(rng, (50, 6)), make(rng, (50, 4))
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))
    state, z, rows = np.zeros((6, 4)), np.zeros(6), []
    for i in range(50):                                  # S_i = S_{i-1} + phi(k_i) v_i^T
        state += np.outer(phi(k[i]), v[i])
        z += phi(k[i])
        rows.append(phi(q[i]) @ state / (phi(q[i]) @ z + 1e-6))
    np.testing.assert_allclose(fastattn.linear_attention(q, k, v, causal=True), np.array(rows),
                               rtol=1e-12, atol=1e-12)


def test_linear_callable_feature_map(rng):
    q, k, v = make(rng, (40, 8)), make(rng, (30, 8)), make(rng, (30, 3))
    relu = lambda x: np.maximum(x, 0) + 0.1
    assert_close(fastattn.linear_attention(q, k, v, feature_map=relu),
                 reference.linear_attention(q, k, v, feature_map=relu), np.float64)


# ---- Performer --------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_its_formula(rng, causal, monkeypatch):
    monkeypatch.setattr(lowrank, "SCAN_CHUNK", 16)
    q, k, v = make(rng, (2, 70, 8)), make(rng, (2, 70, 8)), make(rng, (2, 70, 5))
    w = fastattn.performer_features(8, 32, rng=1)
    out = fastattn.performer_attention(q, k, v, features=w, causal=causal)
    assert_close(out, reference.performer_attention(q, k, v, w, causal=causal), np.float64)
    again = fastattn.performer_attention(q, k, v, num_features=32, rng=1, causal=causal)
    np.testing.assert_array_equal(out, again)            # same seed, same draw


def test_performer_error_falls_with_features(rng):
    q, k, v = (0.5 * make(rng, (4, 128, 16)) for _ in range(3))
    exact = reference.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 128, 1024, 8192):
        trials = [np.abs(fastattn.performer_attention(q, k, v, num_features=m, rng=seed)
                         - exact).mean() for seed in range(3)]
        errors.append(np.mean(trials))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.02, errors


def test_performer_features_orthogonal():
    w = fastattn.performer_features(16, 40, rng=0)
    assert w.shape == (40, 16)
    for b0 in range(0, 40, 16):
        block = w[b0:b0 + 16]
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        gram = unit @ unit.T
        np.testing.assert_allclose(gram, np.eye(len(block)), atol=1e-10)
    iid = fastattn.performer_features(16, 40, orthogonal=False, rng=0)
    assert iid.shape == (40, 16)
    np.testing.assert_array_equal(w, fastattn.performer_features(16, 40, rng=0))


def test_performer_float32(rng):
    q, k, v = (make(rng, (64, 8), np.float32) for _ in range(3))
    w = fastattn.performer_features(8, 64, rng=2)
    out = fastattn.performer_attention(q, k, v, features=w)
    assert out.dtype == np.float32
    assert_close(out, reference.performer_attention(q, k, v, w), np.float32)


# ---- the chunked kernels (fastattn/_kernels/lowrank.pyx) --------------------------------

@contextlib.contextmanager
def chunk_sizes(chunk, scan_chunk):
    """Smaller chunks than the defaults, so short inputs cross many chunk edges."""
    old = lowrank.CHUNK, lowrank.SCAN_CHUNK
    lowrank.CHUNK, lowrank.SCAN_CHUNK = chunk, scan_chunk
    try:
        yield
    finally:
        lowrank.CHUNK, lowrank.SCAN_CHUNK = old


# (query, key, value) batch dimensions: none, equal, broadcast (heads sharing keys and
# values, like multi-query attention), broadcast the other way
BATCHES = [((), (), ()), ((2,), (2,), (2,)), ((3, 2), (1, 2), (3, 1)), ((2, 1), (1,), (2, 3)),
           ((3,), (1,), (1,))]


def ramp_keys(rng, shape, dtype, rising):
    """Keys whose size grows (or shrinks) along the sequence: with FAVOR the running key
    maximum then rises chunk after chunk (or is set by the first chunk)."""
    k = make(rng, shape)
    ramp = np.linspace(0.2, 1.5, shape[-2])
    return (k * (ramp if rising else ramp[::-1])[:, None]).astype(dtype)


lowrank_cases = dict(
    L=st.integers(1, 200), S=st.integers(1, 200), causal=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]), batch=st.sampled_from(BATCHES),
    chunk=st.sampled_from([1, 7, 16, 64, 256]), scan_chunk=st.sampled_from([1, 5, 16, 128]),
    threads=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))


@given(m=st.sampled_from([1, 5, 32, 64]), amplitude=st.sampled_from([0.3, 1.0, 2.5]),
       rising=st.booleans(), **lowrank_cases)
def test_performer_chunked_matches_reference(L, S, causal, dtype, batch, chunk, scan_chunk,
                                             threads, seed, m, amplitude, rising):
    rng = np.random.default_rng(seed)
    if causal:
        S = L
    bq, bk, bv = batch
    q = (amplitude * make(rng, bq + (L, 8))).astype(dtype)
    k = (amplitude * ramp_keys(rng, bk + (S, 8), np.float64, rising)).astype(dtype)
    v = make(rng, bv + (S, 5), dtype)
    w = fastattn.performer_features(8, m, rng=seed)
    with chunk_sizes(chunk, scan_chunk):
        out = fastattn.performer_attention(q, k, v, features=w, causal=causal,
                                           num_threads=threads)
    assert out.dtype == dtype
    assert_close(out, reference.performer_attention(q, k, v, w, causal=causal), dtype)


@given(**lowrank_cases)
def test_linear_chunked_matches_reference(L, S, causal, dtype, batch, chunk, scan_chunk,
                                          threads, seed):
    rng = np.random.default_rng(seed)
    if causal:
        S = L
    bq, bk, bv = batch
    q, k, v = make(rng, bq + (L, 8), dtype), make(rng, bk + (S, 8), dtype), \
        make(rng, bv + (S, 5), dtype)
    with chunk_sizes(chunk, scan_chunk):
        out = fastattn.linear_attention(q, k, v, causal=causal, num_threads=threads)
    assert out.dtype == dtype
    assert_close(out, reference.linear_attention(q, k, v, causal=causal), dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["linear", "performer"])
def test_lowrank_independent_of_threads_and_chunks(rng, variant, causal):
    # the same sums in another grouping: key splits (non-causal) or segments (causal,
    # one batch entry and several threads), and other chunk edges
    q, k, v = make(rng, (1, 333, 16)), make(rng, (1, 333, 16)), make(rng, (1, 333, 16))
    w = fastattn.performer_features(16, 48, rng=3)
    run = {"linear": lambda t: fastattn.linear_attention(q, k, v, causal=causal, num_threads=t),
           "performer": lambda t: fastattn.performer_attention(q, k, v, features=w,
                                                               causal=causal, num_threads=t)}
    one = run[variant](1)
    for threads, chunk, scan_chunk in [(2, 256, 128), (4, 32, 16), (3, 1, 1)]:
        with chunk_sizes(chunk, scan_chunk):
            np.testing.assert_allclose(run[variant](threads), one, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["linear", "performer"])
def test_lowrank_bit_identical_for_any_thread_count(monkeypatch, rng, variant, causal, dtype):
    # 16 batch entries: no key splits or segments for up to 8 threads, so each entry's
    # sums run in one order whatever the threads: the same bits for 1..8
    picked = threads_spy(monkeypatch)
    q, k, v = (make(rng, (4, 4, 300, 32), dtype) for _ in range(3))
    w = fastattn.performer_features(32, 64, rng=1)
    run = {"linear": lambda t: fastattn.linear_attention(q, k, v, causal=causal, num_threads=t),
           "performer": lambda t: fastattn.performer_attention(q, k, v, features=w,
                                                               causal=causal, num_threads=t)}
    one = run[variant](1)
    for threads in range(2, 9):
        np.testing.assert_array_equal(run[variant](threads), one)
    assert max(picked) == 8


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["linear", "performer"])
def test_lowrank_scratch_failure_raises_memory_error(monkeypatch, rng, variant, causal):
    # the first pass of each kind of call: key pass (non-causal; causal with segments,
    # one batch entry on 4 threads) or scan (causal, one thread)
    picked = threads_spy(monkeypatch)
    q, k, v = (make(rng, (1, 2048, 32)) for _ in range(3))
    w = fastattn.performer_features(32, 64, rng=1)
    for threads in (1, 4):
        if variant == "linear":
            call = lambda: fastattn.linear_attention(q, k, v, causal=causal, num_threads=threads)
        else:
            call = lambda: fastattn.performer_attention(q, k, v, features=w, causal=causal,
                                                        num_threads=threads)
        check_scratch_failure(call)
    assert max(picked) == 4


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_non_contiguous_inputs(rng, causal):
    # row strides, transposed matrices, swapped batch axes, Fortran order: copied or
    # read in place, the result is the same
    big = make(rng, (3, 2, 80, 16))
    q = big[:, :, ::2, :8]                                   # strided rows and columns
    k = np.swapaxes(make(rng, (2, 3, 8, 40)), -1, -2)         # transposed matrices
    k = np.swapaxes(k, 0, 1)                                 # batch axes swapped
    v = np.asfortranarray(make(rng, (3, 2, 40, 6)))
    w = fastattn.performer_features(8, 24, rng=0)
    contiguous = [np.ascontiguousarray(a) for a in (q, k, v)]
    assert_close(fastattn.performer_attention(q, k, v, features=w, causal=causal),
                 reference.performer_attention(*contiguous, w, causal=causal), np.float64)
    assert_close(fastattn.linear_attention(q, k, v, causal=causal),
                 reference.linear_attention(*contiguous, causal=causal), np.float64)
    q32, k32, v32 = (a.astype(np.float32)[..., ::-1, :] for a in (q, k, v))   # negative strides
    assert_close(fastattn.performer_attention(q32, k32, v32, features=w, causal=causal),
                 reference.performer_attention(q32, k32, v32, w, causal=causal), np.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_length_one_and_empty(rng, causal):
    q, k, v = make(rng, (2, 1, 4)), make(rng, (2, 1, 4)), make(rng, (2, 1, 3))
    w = fastattn.performer_features(4, 8, rng=0)
    # one key: the output is that key's value
    np.testing.assert_allclose(fastattn.performer_attention(q, k, v, features=w, causal=causal),
                               v, rtol=1e-12)
    np.testing.assert_allclose(fastattn.linear_attention(q, k, v, causal=causal), v, rtol=1e-5)
    empty = make(rng, (2, 0, 4))
    assert fastattn.performer_attention(empty, empty, empty[..., :3], features=w,
                                        causal=causal).shape == (2, 0, 3)
    assert fastattn.linear_attention(empty, empty, empty, causal=causal).shape == (2, 0, 4)
    if not causal:   # no keys: empty sums over the keys, output 0 (the guard keeps 0 / 0 away)
        for fn in (lambda *a: fastattn.performer_attention(*a, features=w),
                   fastattn.linear_attention):
            out = fn(q, empty, empty[..., :3])
            np.testing.assert_array_equal(out, np.zeros((2, 1, 3)))
        np.testing.assert_array_equal(reference.linear_attention(q, empty, empty[..., :3]),
                                      np.zeros((2, 1, 3)))


def test_performer_key_max_set_late(rng):
    # One key far larger than the rest, in the last chunk: every earlier chunk was
    # summed relative to a smaller running max and must be rescaled (non-causal), or
    # its rows corrected at the end (causal: the stabiliser is over ALL keys).
    q, k, v = make(rng, (2, 300, 8)), 0.3 * make(rng, (2, 300, 8)), make(rng, (2, 300, 4))
    k[:, -1] *= 40
    w = fastattn.performer_features(8, 32, rng=5)
    for causal in (False, True):
        with chunk_sizes(16, 16):
            out = fastattn.performer_attention(q, k, v, features=w, causal=causal)
        assert_close(out, reference.performer_attention(q, k, v, w, causal=causal), np.float64)


def test_linear_callable_features_of_another_size(rng):
    q, k, v = make(rng, (2, 40, 8)), make(rng, (2, 30, 8)), make(rng, (2, 30, 3))
    both = lambda x: np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1) + 0.1
    for causal in (False, True):
        kk, vv = (k, v) if not causal else (make(rng, (2, 40, 8)), make(rng, (2, 40, 3)))
        assert_close(fastattn.linear_attention(q, kk, vv, feature_map=both, causal=causal),
                     reference.linear_attention(q, kk, vv, feature_map=both, causal=causal),
                     np.float64)


def test_lowrank_float16(rng):
    q, k, v = (make(rng, (2, 50, 8), np.float16) for _ in range(3))
    w = fastattn.performer_features(8, 16, rng=0)
    out = fastattn.performer_attention(q, k, v, features=w, causal=True)
    assert out.dtype == np.float16
    assert_close(out, reference.performer_attention(q, k, v, w, causal=True), np.float16)
    assert fastattn.linear_attention(q, k, v).dtype == np.float16


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_memory_has_no_feature_matrices(causal):
    # O(N) memory: the output plus states and per-row numbers, no (N, m) feature matrix
    # (here 4 MiB per head; the output is 1 MiB per head)
    rng = np.random.default_rng(0)
    N, m = 4096, 256
    q, k, v = (rng.standard_normal((2, N, 64), dtype=np.float32) for _ in range(3))
    w = fastattn.performer_features(64, m, rng=0)
    out_bytes = 2 * N * 64 * 4
    for fn in (lambda: fastattn.performer_attention(q, k, v, features=w, causal=causal),
               lambda: fastattn.linear_attention(q, k, v, causal=causal)):
        fn()
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < out_bytes + (1 << 20), peak / out_bytes


# ---- Linformer and Synthesizer: degenerate limits == full attention --------------------------

def test_linformer(rng):
    q, k, v = make(rng, (2, 3, 50, 8)), make(rng, (2, 3, 60, 8)), make(rng, (2, 3, 60, 4))
    assert_close(fastattn.linformer_attention(q, k, v, np.eye(60)),
                 reference.scaled_dot_product_attention(q, k, v), np.float64)
    e, f = make(rng, (16, 60)), make(rng, (16, 60))
    assert_close(fastattn.linformer_attention(q, k, v, e, f),
                 reference.linformer_attention(q, k, v, e, f), np.float64)
    assert_close(fastattn.linformer_attention(q, k, v, e),
                 reference.linformer_attention(q, k, v, e, e), np.float64)


def test_synthesizer_modes(rng):
    q, k, v = make(rng, (2, 40, 8)), make(rng, (2, 40, 8)), make(rng, (2, 40, 6))
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(8)
    assert_close(fastattn.synthesizer_attention(v, weights=logits),
                 reference.scaled_dot_product_attention(q, k, v), np.float64)
    big = make(rng, (64, 64))                             # max_len 64, sliced to S = 40
    assert_close(fastattn.synthesizer_attention(v, weights=big),
                 reference.synthesizer_attention(v, big[:40, :40]), np.float64)
    r1, r2 = make(rng, (64, 4)), make(rng, (4, 64))
    assert_close(fastattn.synthesizer_attention(v, weights=(r1, r2), mode="factorized"),
                 reference.synthesizer_attention(v, r1[:40] @ r2[:, :40]), np.float64)
    x = make(rng, (2, 40, 8))
    w1, b1, w2, b2 = make(rng, (8, 12)), make(rng, (12,)), make(rng, (12, 64)), make(rng, (64,))
    logits = np.maximum(x @ w1 + b1, 0) @ w2[:, :40] + b2[:40]
    assert_close(fastattn.synthesizer_attention(v, weights=(w1, b1, w2, b2), mode="dense",
                                                query=x),
                 reference.synthesizer_attention(v, logits), np.float64)


# ---- bad input ---------------------------------------------------------------------------

def test_bad_inputs(rng):
    q = make(rng, (10, 4))
    with pytest.raises(ValueError, match="num_features"):
        fastattn.performer_attention(q, q, q, num_features=0)
    with pytest.raises(ValueError, match="features"):
        fastattn.performer_attention(q, q, q, features=np.ones((5, 3)))
    with pytest.raises(ValueError, match="L == S"):
        fastattn.linear_attention(q, q[:5], q[:5], causal=True)
    with pytest.raises(ValueError, match="feature_map"):
        fastattn.linear_attention(q, q, q, feature_map="relu")
    with pytest.raises(ValueError, match="e_proj"):
        fastattn.linformer_attention(q, q, q, np.ones((4, 9)))
    with pytest.raises(ValueError, match="f_proj"):
        fastattn.linformer_attention(q, q, q, np.ones((4, 10)), np.ones((4, 11)))
    with pytest.raises(ValueError, match="weights"):
        fastattn.synthesizer_attention(q, weights=np.ones((5, 5)))
    with pytest.raises(ValueError, match="mode"):
        fastattn.synthesizer_attention(q, weights=np.ones((10, 10)), mode="learned")
    with pytest.raises(ValueError, match="query"):
        fastattn.synthesizer_attention(q, weights=(np.ones((4, 3)), np.ones((3, 10))),
                                       mode="dense")
    with pytest.raises(TypeError):
        fastattn.linear_attention(q.astype(complex), q, q)
    with pytest.raises(ValueError, match="batch dimensions"):
        fastattn.performer_attention(make(rng, (2, 10, 4)), make(rng, (3, 10, 4)), q)
    with pytest.raises(ValueError, match="batch dimensions"):
        fastattn.linear_attention(make(rng, (2, 10, 4)), q, make(rng, (3, 10, 4)))
    with pytest.raises(ValueError, match="feature_map"):
        fastattn.linear_attention(q, q, q, feature_map=lambda x: x[..., :1, :])
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.performer_attention(q, q, q, num_threads=0)
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.linear_attention(q, q, q, num_threads=0)
