"""Linear attention, Performer, Linformer and Synthesizer against their float64 references."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import lowrank, reference
from helpers import assert_close


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
