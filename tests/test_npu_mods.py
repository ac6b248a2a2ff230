"""device="npu" for the score modifiers and packed varlen batches, through the simulator
(tests/ascend_sim), against fastattn.reference:

  window -> aclnnFlashAttentionScore sparse mode 4 (band, lower-right origin,
            preTokens/nextTokens) or an explicit attenMask in mode 0;
  ALiBi  -> realShift (pse), bias / scale, added before scaling;
  varlen -> aclnnFlashAttentionVarLenScore, layout TND, actualSeqQLen / actualSeqKvLen;
  softcap, and what the operators do not document -> NotImplementedError naming it.

The simulator enforces the documented semantics (band rule and intersection, compressed
mask, TND cumulative lengths, mode 3 needing Sq <= Skv per sequence).
"""
import ml_dtypes
import numpy as np
import pytest
from helpers import load_ascend_harness
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend
import fastattn
from ascend import _ops, _varlen
from fastattn import reference

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime

BF16 = np.dtype(ml_dtypes.bfloat16)


def close(actual, expected, dtype):
    rtol, atol = harness.TOLERANCE[np.dtype(dtype).name]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def launches(monkeypatch):
    """Record (operator, preTokens, nextTokens, sparseMode, has pse, mask shape) per call."""
    seen = []
    real = _ops._run_operator

    def spy(rt, device, name, arguments):
        if name == "aclnnFlashAttentionScore":
            seen.append((name, arguments[10], arguments[11], arguments[15],
                         arguments[3] is not None))
        elif name == "aclnnFlashAttentionVarLenScore":
            seen.append((name, arguments[12], arguments[13], arguments[17], False))
        return real(rt, device, name, arguments)
    monkeypatch.setattr(_ops, "_run_operator", spy)
    monkeypatch.setattr(_varlen, "_run_operator", spy)
    return seen


def qkv(rng, B, H, Hkv, L, S, E=16, dtype=np.float32):
    return (rng.standard_normal((B, H, L, E)).astype(dtype),
            rng.standard_normal((B, Hkv, S, E)).astype(dtype),
            rng.standard_normal((B, Hkv, S, E)).astype(dtype))


@pytest.fixture
def rng():
    return np.random.default_rng(19)


# ---- windows: sparse mode 4 or the mask -----------------------------------------------

@pytest.mark.parametrize("L,S,alignment,causal,window,mode", [
    (5, 9, "bottom_right", False, (2, 1), 4),
    (5, 9, "bottom_right", True, (3, None), 4),
    (9, 5, "bottom_right", True, (2, 0), 4),     # rows 0-3 see no key: innerPrecise 2
    (7, 7, "top_left", True, (2, 5), 4),         # L == S: top-left is the lower-right band
    (5, 9, "top_left", False, (1, 2), 0),        # top-left L != S: an explicit band mask
    (9, 5, "top_left", True, (None, 0), 2),      # no left side: plain causal
])
def test_window_modes(runtime, rng, monkeypatch, L, S, alignment, causal, window, mode):
    seen = launches(monkeypatch)
    q, k, v = qkv(rng, 2, 4, 2, L, S)
    out, lse = fastattn.scaled_dot_product_attention(
        q, k, v, is_causal=causal, causal_alignment=alignment, window=window,
        enable_gqa=True, return_lse=True, device="npu")
    ref, ref_lse = reference.scaled_dot_product_attention(
        q, k, v, is_causal=causal, causal_alignment=alignment, window=window, enable_gqa=True,
        return_lse=True)
    close(out, ref, np.float32)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-5, atol=1e-5)
    name, pre, nxt, sparse_mode, _ = seen[-1]
    assert sparse_mode == mode
    if mode == 4:
        left, right = window
        right = 0 if causal and right is None else (min(right, 0) if causal else right)
        assert pre == (_ops.UNLIMITED_TOKENS if left is None else left)
        assert nxt == (_ops.UNLIMITED_TOKENS if right is None else right)
    harness.assert_no_leak(runtime)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), L=st.integers(1, 12), S=st.integers(1, 12),
       causal=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]),
       window=st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 6)),
                                             st.one_of(st.none(), st.integers(0, 6)))),
       alibi=st.sampled_from([None, "H", "BH"]), mask=st.sampled_from([None, "bool", "float"]),
       dtype=st.sampled_from([np.float32, np.float16, BF16]))
def test_random_modifiers_match_reference(runtime, seed, L, S, causal, alignment, window,
                                          alibi, mask, dtype):
    # [W][A] with masks, GQA, both alignments, every NPU dtype
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 2, 4, 2, L, S, dtype=dtype)
    slopes = {None: None, "H": rng.uniform(0, 1, 4), "BH": rng.uniform(0, 1, (2, 4))}[alibi]
    m = None
    if mask == "bool":
        m = rng.random((L, S)) > 0.3
    elif mask == "float":
        m = rng.standard_normal((2, 1, L, S)).astype(np.float32)
    kw = dict(is_causal=causal, causal_alignment=alignment, window=window, enable_gqa=True,
              alibi_slopes=slopes)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, m, return_lse=True,
                                                     device="npu", **kw)
    ref, ref_lse = reference.scaled_dot_product_attention(
        *(a.astype(np.float64) for a in (q, k, v)), m, return_lse=True, **kw)
    close(out, ref, dtype)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    harness.assert_no_leak(runtime)


def test_alibi_is_the_pse(runtime, rng, monkeypatch):
    # [A] ALiBi goes in realShift: (H,) slopes on (B, H, L, S) inputs
    seen = launches(monkeypatch)
    q, k, v = qkv(rng, 2, 3, 3, 6, 6)
    slopes = np.array([0.1, 0.5, 2.0])
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, alibi_slopes=slopes,
                                                device="npu")
    close(out, reference.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      alibi_slopes=slopes), np.float32)
    assert seen[-1][4] and seen[-1][3] == _ops.SPARSE_CAUSAL_TOP_LEFT


def test_resident_inputs_take_window_and_alibi(runtime, rng):
    q, k, v = qkv(rng, 1, 2, 2, 8, 8)
    with ascend.to_device(q) as qd, ascend.to_device(k) as kd, ascend.to_device(v) as vd:
        res = fastattn.scaled_dot_product_attention(qd, kd, vd, window=(2, 0),
                                                    alibi_slopes=np.array([0.3, 0.7]),
                                                    device="npu")
        out = res.to_numpy()
        res.close()
    close(out, reference.scaled_dot_product_attention(q, k, v, window=(2, 0),
                                                      alibi_slopes=np.array([0.3, 0.7])),
          np.float32)


def test_softcap_not_implemented(runtime, rng):
    q, k, v = qkv(rng, 1, 2, 2, 4, 4)
    with pytest.raises(NotImplementedError, match="softcap"):
        fastattn.scaled_dot_product_attention(q, k, v, softcap=5.0, device="npu")
    with pytest.raises(NotImplementedError, match="softcap"):
        fastattn.varlen_attention(q[0].transpose(1, 0, 2), k[0].transpose(1, 0, 2),
                                  v[0].transpose(1, 0, 2), [0, 4], [0, 4], softcap=5.0,
                                  device="npu")


def test_band_without_intersection_is_refused_by_the_operator(runtime, rng):
    # the simulator enforces sparse_mode_introduction.md: "preTokens and nextTokens must have
    # an intersection" (161002 before anything runs)
    q, k, v = (a[0].transpose(1, 0, 2) for a in qkv(rng, 1, 2, 2, 4, 4))
    with pytest.raises(ascend.AscendError, match="intersection") as info:
        _varlen._launch(_ops.get_runtime(), 0, "float32", q, k, v, np.array([4]),
                        np.array([4]), 0.25, -3, 1, 4)
    assert info.value.code == 161002


# ---- varlen: TND ------------------------------------------------------------------------

def packed(rng, lens_q, lens_k, H=4, Hkv=2, E=16, dtype=np.float32):
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cq[-1], H, E)).astype(dtype)
    k = rng.standard_normal((ck[-1], Hkv, E)).astype(dtype)
    v = rng.standard_normal((ck[-1], Hkv, E)).astype(dtype)
    return q, k, v, cq, ck


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("kw,mode", [
    (dict(), 0),
    (dict(is_causal=True, causal_alignment="top_left"), 2),
    (dict(is_causal=True), 3),
    (dict(window=(3, 1)), 4),
    (dict(window=(2, None), is_causal=True), 4),
])
def test_varlen_tnd(runtime, rng, monkeypatch, dtype, kw, mode):
    # [V] per-sequence attention, lse (Hq, total_q), lengths 0 and 1 inside the batch
    seen = launches(monkeypatch)
    q, k, v, cq, ck = packed(rng, [3, 0, 1, 6, 2], [5, 4, 1, 9, 0], dtype=dtype)
    out, lse = fastattn.varlen_attention(q, k, v, cq, ck, return_lse=True, device="npu", **kw)
    ref, ref_lse = reference.varlen_attention(*(a.astype(np.float64) for a in (q, k, v)), cq,
                                              ck, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == ref.shape and lse.shape == (4, cq[-1])
    close(out, ref, dtype)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=2e-2, atol=2e-2)
    name, pre, nxt, sparse_mode, _ = seen[-1]
    assert name == "aclnnFlashAttentionVarLenScore" and sparse_mode == mode
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("kw,match", [
    (dict(is_causal=True, causal_alignment="bottom_right"), "Sq <= Skv"),
    (dict(window=(2, 2), causal_alignment="top_left"), "top-left window"),
    (dict(window=(2, 0)), "invalid rows"),
    (dict(alibi_slopes=np.ones(4)), "alibi_slopes"),
])
def test_varlen_not_implemented(runtime, rng, kw, match):
    # sequence 0 has more queries than keys: what the TND operator does not document
    q, k, v, cq, ck = packed(rng, [5, 2], [3, 2])
    with pytest.raises(NotImplementedError, match=match):
        fastattn.varlen_attention(q, k, v, cq, ck, device="npu", **kw)


def test_tnd_operator_contract(runtime, rng):
    # the simulator enforces the documented TND inputs: cumulative ends up to T, no empty
    # sequence, mode 3 with Sq <= Skv in every sequence
    q, k, v, _, _ = packed(rng, [3, 4], [5, 2])
    rt = _ops.get_runtime()
    for ends_q, ends_k, mode, match in [
            ([3, 6], [5, 7], 0, "ends at 6, T is 7"),
            ([3, 3, 7], [5, 6, 7], 0, "must increase"),
            ([3, 7], [5, 7], 3, "Sq <= Skv")]:
        with pytest.raises(ascend.AscendError, match=match) as info:
            _varlen._launch(rt, 0, "float32", q, k, v, np.array(ends_q), np.array(ends_k), 0.25,
                            _ops.UNLIMITED_TOKENS, _ops.UNLIMITED_TOKENS, mode)
        assert info.value.code == 161002
    harness.assert_no_leak(runtime)
