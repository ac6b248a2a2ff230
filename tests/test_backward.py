"""The backward pass: scaled_dot_product_attention_backward and masked_softmax_backward.

Checked three ways: against fastattn.reference (float64, materialising), against finite
differences of fastattn's own forward in float64 (always), and against torch.autograd
when torch is importable.
"""
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
import fastattn.backward as backward
from fastattn import reference
from helpers import RTOL, assert_close, check_scratch_failure, draw_block_rule

sdpa = fastattn.scaled_dot_product_attention
sdpa_bwd = fastattn.scaled_dot_product_attention_backward
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
# Half-precision gradients are looser than the forward's tolerance (helpers.RTOL): D =
# rowsum(dO * O) is formed from the forward's output as it was returned, rounded to the
# half type, and dS = P * (dP - D) can cancel. (PyTorch and flash-attn do the same.)
GRAD_RTOL = {**RTOL, np.dtype(np.float16): 5e-3, BF16: 3e-2}
MASK_SHAPES = ["LS", "1S", "L1", "B1LS", "HLS", "BH1S", "S", "BHLS"]


def mask_shape(name, B, H, L, S):
    return {"LS": (L, S), "1S": (1, S), "L1": (L, 1), "B1LS": (B, 1, L, S), "HLS": (H, L, S),
            "BH1S": (B, H, 1, S), "S": (S,), "BHLS": (B, H, L, S)}[name]


def make_mask(rng, kind, shape, dtype=np.float64, drop=0.3):
    if kind == "none":
        return None
    keep = rng.random(shape) > drop
    if kind == "bool":
        return keep
    return np.where(keep, rng.standard_normal(shape), -np.inf).astype(dtype)


def forward_and_backward(q, k, v, mask=None, grad=None, rng=None, **kw):
    """fastattn's forward, then its backward for ``grad`` (random when None)."""
    fwd_kw = {key: kw[key] for key in ("is_causal", "scale", "enable_gqa", "causal_alignment")
              if key in kw}
    out, lse = sdpa(q, k, v, mask, return_lse=True, **fwd_kw)
    if grad is None:
        grad = (rng or np.random.default_rng(0)).standard_normal(out.shape).astype(out.dtype)
    return grad, out, lse, sdpa_bwd(grad, q, k, v, out, lse, mask, **kw)


def check_against_reference(q, k, v, mask=None, dtype=None, rng=None, **kw):
    grad, out, lse, got = forward_and_backward(q, k, v, mask, rng=rng, **kw)
    ref_kw = {key: val for key, val in kw.items() if key != "num_threads"}
    want = reference.scaled_dot_product_attention_backward(grad, q, k, v, mask, **ref_kw)
    assert len(got) == len(want)
    for name, a, b, inp in zip(("dq", "dk", "dv", "dmask"), got, want, (q, k, v, mask)):
        assert a.shape == np.shape(inp), (name, a.shape, np.shape(inp))
        assert a.dtype == np.asarray(inp).dtype, (name, a.dtype)
        assert not np.isnan(a.astype(np.float64)).any(), name
        with mock.patch.dict(RTOL, GRAD_RTOL):
            assert_close(a, b, dtype or a.dtype)
    return got


def directional_check(q, k, v, mask=None, mask_grad=False, seed=0, eps=1e-6, **kw):
    """Finite differences in float64 of loss = sum(G * sdpa(...)) along random directions
    of every input, against the backward's gradients (inner products)."""
    rng = np.random.default_rng(seed)
    fwd_kw = {key: kw[key] for key in ("is_causal", "scale", "enable_gqa", "causal_alignment")
              if key in kw}
    inputs = [q, k, v] + ([mask] if mask_grad else [])
    G = rng.standard_normal(sdpa(q, k, v, mask, **fwd_kw).shape)

    def loss(args):
        m = args[3] if mask_grad else mask
        return float((G * sdpa(args[0], args[1], args[2], m, **fwd_kw)).sum())

    out, lse = sdpa(q, k, v, mask, return_lse=True, **fwd_kw)
    grads = sdpa_bwd(G, q, k, v, out, lse, mask, mask_grad=mask_grad, **kw)
    for i, (x, g) in enumerate(zip(inputs, grads)):
        u = rng.standard_normal(x.shape)
        if i == 3:
            u = np.where(np.isfinite(x), u, 0.0)
        plus = list(inputs)
        minus = list(inputs)
        plus[i] = x + eps * u
        minus[i] = x - eps * u
        numeric = (loss(plus) - loss(minus)) / (2 * eps)
        analytic = float((np.where(np.isfinite(g), g, 0) * u).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (i, numeric, analytic)


# ---- random shapes ---------------------------------------------------------------------

@st.composite
def problems(draw):
    L = draw(st.integers(1, 90))
    S = draw(st.integers(1, 140))
    B, H = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    return dict(
        dtype=draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"])),
        L=L, S=S, B=B, H=H,
        Hkv=draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0])),
        E=draw(st.sampled_from([1, 8, 16, 24, 64])),
        Ev=draw(st.sampled_from([1, 5, 16, 32])),
        mask_kind=draw(st.sampled_from(["none", "bool", "float"])),
        mask_shape=draw(st.sampled_from(MASK_SHAPES)),
        mask_grad=draw(st.booleans()),
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        k_broadcast=draw(st.booleans()),          # key/value shared by the batch
        tiles=draw(st.sampled_from([None, (8, 16), (5, 7), (16, 32)])),
        strategy=draw(st.sampled_from(["splits", "two_pass"])),
        threads=draw(st.sampled_from([1, 2, 3])),
        seed=draw(st.integers(0, 2**32 - 1)))


def build(p):
    rng = np.random.default_rng(p["seed"])
    B, H, Hkv, L, S, E, Ev = (p[x] for x in ("B", "H", "Hkv", "L", "S", "E", "Ev"))
    dtype = BF16 if p["dtype"] == "bfloat16" else np.dtype(p["dtype"])
    kb = 1 if p["k_broadcast"] else B
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((kb, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((kb, Hkv, S, Ev)).astype(dtype)
    mask = make_mask(rng, p["mask_kind"], mask_shape(p["mask_shape"], B, H, L, S), dtype)
    kw = dict(is_causal=p["causal"], causal_alignment=p["alignment"], enable_gqa=Hkv != H,
              mask_grad=p["mask_grad"] and p["mask_kind"] == "float")
    return q, k, v, mask, kw


@given(p=problems())
def test_random_shapes_match_reference(p):
    q, k, v, mask, kw = build(p)
    tiles = p["tiles"] or (backward.BLOCK_Q, backward.BLOCK_K)
    with mock.patch.object(backward, "BLOCK_Q", tiles[0]), \
            mock.patch.object(backward, "BLOCK_K", tiles[1]), \
            mock.patch.object(backward, "DQ_STRATEGY", p["strategy"]):
        check_against_reference(q, k, v, mask, num_threads=p["threads"],
                                rng=np.random.default_rng(p["seed"]), **kw)


@given(p=problems())
def test_random_shapes_finite_differences(p):
    p = dict(p, dtype="float64", L=min(p["L"], 24), S=min(p["S"], 30))
    q, k, v, mask, kw = build(p)
    with mock.patch.object(backward, "BLOCK_Q", 8), mock.patch.object(backward, "BLOCK_K", 16):
        directional_check(q, k, v, mask, seed=p["seed"], **kw)


# ---- finite differences, element by element ---------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_every_element_matches_finite_differences(rng, causal):
    q, k, v = (rng.standard_normal((2, 3, 6, 4)) for _ in range(3))
    bias = rng.standard_normal((3, 6, 6))
    G = rng.standard_normal((2, 3, 6, 4))
    args = [q, k, v, bias]
    out, lse = sdpa(q, k, v, bias, is_causal=causal, return_lse=True)
    grads = sdpa_bwd(G, q, k, v, out, lse, bias, is_causal=causal, mask_grad=True)
    eps = 1e-6
    for i, x in enumerate(args):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            hi, lo = [a.copy() for a in args], [a.copy() for a in args]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            numeric[idx] = ((G * sdpa(*hi[:3], hi[3], is_causal=causal)).sum()
                            - (G * sdpa(*lo[:3], lo[3], is_causal=causal)).sum()) / (2 * eps)
        np.testing.assert_allclose(grads[i], numeric, atol=1e-7, rtol=1e-6)


# ---- torch.autograd ----------------------------------------------------------------------

def _torch_grads(torch, q, k, v, mask, G, mask_grad=False, **kw):
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tm = None
    if mask is not None:
        tm = torch.tensor(mask, requires_grad=mask_grad)
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, **kw)
    out.backward(torch.tensor(G))
    grads = [t.grad.numpy() for t in (tq, tk, tv)]
    if mask_grad:
        grads.append(tm.grad.numpy())
    return grads


@pytest.mark.parametrize("case", ["dense", "causal", "bool", "float", "gqa", "bias_grad",
                                  "cross", "length1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_autograd(rng, case, dtype):
    torch = pytest.importorskip("torch")
    B, H, L, S, E, Ev = 2, 4, 70, 70, 32, 48
    if case == "cross":
        L, S = 33, 150
    if case == "length1":
        L, S = 1, 1
    Hkv = 2 if case == "gqa" else H
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    G = rng.standard_normal((B, H, L, Ev)).astype(dtype)
    mask = None
    if case == "bool":
        mask = rng.random((B, 1, L, S)) > 0.3
        mask[..., 0] = True                # torch's math path gives NaN for empty rows
    elif case in ("float", "bias_grad"):
        mask = rng.standard_normal((H, L, S)).astype(dtype)
    kw = dict(is_causal=case == "causal", enable_gqa=case == "gqa")
    mask_grad = case == "bias_grad"
    out, lse = sdpa(q, k, v, mask, return_lse=True, **kw)
    got = sdpa_bwd(G, q, k, v, out, lse, mask, mask_grad=mask_grad, **kw)
    want = _torch_grads(torch, q, k, v, mask, G, mask_grad=mask_grad, **kw)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, dtype)


def test_bottom_right_causal_matches_torch(rng):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.bias import causal_lower_right
    q = rng.standard_normal((1, 2, 20, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 50, 16)).astype(np.float32) for _ in range(2))
    G = rng.standard_normal((1, 2, 20, 16)).astype(np.float32)
    out, lse = sdpa(q, k, v, is_causal=True, causal_alignment="bottom_right", return_lse=True)
    got = sdpa_bwd(G, q, k, v, out, lse, is_causal=True, causal_alignment="bottom_right")
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv,
                                                         attn_mask=causal_lower_right(20, 50))
    o.backward(torch.tensor(G))
    for a, t in zip(got, (tq, tk, tv)):
        assert_close(a, t.grad.numpy(), np.float32)


# ---- conventions: broadcasting, GQA, masks, dtypes -------------------------------------

def test_gqa_sums_over_each_group(rng):
    q = rng.standard_normal((2, 6, 10, 8))
    k, v = (rng.standard_normal((2, 2, 12, 8)) for _ in range(2))
    _, _, _, (dq, dk, dv) = forward_and_backward(q, k, v, enable_gqa=True, rng=rng)
    # the same as repeating K and V for each query head and summing the copies' gradients
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    _, _, _, (_, dkr, dvr) = forward_and_backward(q, kr, vr, rng=np.random.default_rng(0))
    _, _, _, (_, dk0, dv0) = forward_and_backward(q, k, v, enable_gqa=True,
                                                  rng=np.random.default_rng(0))
    np.testing.assert_allclose(dk0, dkr.reshape(2, 2, 3, 12, 8).sum(2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dv0, dvr.reshape(2, 2, 3, 12, 8).sum(2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes", [
    ((3, 4, 9, 8), (4, 11, 8), (4, 11, 8)),           # key/value shared by the batch
    ((9, 8), (3, 11, 8), (3, 11, 8)),                 # one query for every batch entry
    ((3, 1, 9, 8), (1, 4, 11, 8), (3, 4, 11, 8)),     # everything broadcast differently
])
def test_broadcast_inputs_get_summed_gradients(rng, shapes):
    q, k, v = (rng.standard_normal(s) for s in shapes)
    check_against_reference(q, k, v, rng=rng)
    directional_check(q, k, v)


@pytest.mark.parametrize("shape", [(1, 1, 9, 11), (9, 11), (2, 1, 1, 11), (9, 1), (11,),
                                   (1,), (4, 9, 11), (2, 4, 1, 1)])
def test_mask_gradient_has_the_mask_shape(rng, shape):
    q, k, v = (rng.standard_normal((2, 4, n, 8)) for n in (9, 11, 11))
    bias = rng.standard_normal(shape).astype(np.float32)
    got = check_against_reference(q, k, v, bias, mask_grad=True, rng=rng)
    assert got[3].shape == shape and got[3].dtype == np.float32
    directional_check(q, k, v, bias.astype(np.float64), mask_grad=True)


def test_fully_masked_rows_give_zero_gradients(rng):
    q, k, v = (rng.standard_normal((1, 2, 8, 4)).astype(np.float32) for _ in range(3))
    keep = np.ones((8, 8), bool)
    keep[3] = False
    bias = np.where(keep, 0.0, -np.inf).astype(np.float32)
    for mask in (keep, bias):
        mg = mask.dtype != np.bool_
        _, _, _, grads = forward_and_backward(q, k, v, mask, mask_grad=mg)
        for g in grads:
            assert np.isfinite(g).all()
        assert not grads[0][..., 3, :].any()
        if mg:
            assert not grads[3][3].any()
    # keys nobody sees (bottom-right causal with L > S leaves early queries empty too)
    q2 = rng.standard_normal((1, 1, 12, 4))
    _, _, _, (dq, dk, dv) = forward_and_backward(q2, k[:1, :1].astype(np.float64),
                                                 v[:1, :1].astype(np.float64), is_causal=True,
                                                 causal_alignment="bottom_right")
    assert not dq[..., :4, :].any() and np.isfinite(dq).all()


def test_nan_in_grad_out_propagates(rng):
    q, k, v = (rng.standard_normal((1, 2, 10, 16)).astype(np.float32) for _ in range(3))
    out, lse = sdpa(q, k, v, return_lse=True)
    G = np.ones_like(out)
    G[0, 1, 4, 2] = np.nan
    dq, dk, dv = sdpa_bwd(G, q, k, v, out, lse)
    assert np.isnan(dq[0, 1, 4]).all()
    assert np.isnan(dk[0, 1]).any() and np.isnan(dv[0, 1]).any()
    assert np.isfinite(dq[0, 0]).all() and np.isfinite(dk[0, 0]).all()


@pytest.mark.parametrize("dtype", [np.float16, BF16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_matches_reference(rng, dtype, causal):
    q, k, v = (rng.standard_normal((2, 2, 70, 32)).astype(dtype) for _ in range(3))
    mask = make_mask(rng, "float", (70, 70), np.float32)
    got = check_against_reference(q, k, v, mask, dtype=dtype, is_causal=causal,
                                  mask_grad=True, rng=rng)
    assert [g.dtype for g in got] == [np.dtype(dtype)] * 3 + [np.dtype(np.float32)]


def test_half_inputs_accept_a_float32_grad_out(rng):
    q, k, v = (rng.standard_normal((1, 2, 20, 16)).astype(np.float16) for _ in range(3))
    out, lse = sdpa(q, k, v, return_lse=True)
    G = rng.standard_normal(out.shape).astype(np.float32)
    got = sdpa_bwd(G, q, k, v, out, lse)
    want = reference.scaled_dot_product_attention_backward(G, q, k, v)
    for a, b in zip(got, want):
        assert a.dtype == np.float16
        assert_close(a, b, np.float16)


def test_mixed_and_integer_inputs(rng):
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.integers(-3, 3, (2, 7, 8))
    v = rng.standard_normal((2, 7, 8))
    out, lse = sdpa(q, k, v, return_lse=True)
    dq, dk, dv = sdpa_bwd(np.ones_like(out), q, k, v, out, lse)
    assert (dq.dtype, dk.dtype, dv.dtype) == (np.float32, np.float64, np.float64)


def test_non_contiguous_inputs(rng):
    B, L, H, E = 2, 40, 3, 16
    qkv = rng.standard_normal((B, L, 3, H, E)).astype(np.float32)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, H, L, E) views
    mask = (rng.random((L, L)) > 0.3).T
    out, lse = sdpa(q, k, v, mask, return_lse=True)
    out_view = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    G = rng.standard_normal((B, L, H, E)).astype(np.float32).transpose(0, 2, 1, 3)
    lse_view = np.ascontiguousarray(lse.T).T if lse.ndim == 2 else lse[..., ::1]
    got = sdpa_bwd(G, q, k, v, out_view, lse_view, mask)
    want = reference.scaled_dot_product_attention_backward(G, q, k, v, mask)
    for a, b in zip(got, want):
        assert_close(a, b, np.float32)


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 5, 8), (2, 5, 8)])
def test_empty_inputs(shape):
    B, L, E = shape
    q = np.ones((B, L, E))
    for S in (0, 6):
        k, v = np.ones((B, S, E)), np.ones((B, S, 3))
        out, lse = sdpa(q, k, v, return_lse=True)
        dq, dk, dv = sdpa_bwd(np.ones_like(out), q, k, v, out, lse)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        if S == 0 or L == 0 or B == 0:
            assert not dq.any() and not dk.any() and not dv.any()


def test_zero_width_values_give_zero_gradients(rng):
    q, k = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 6, 4))
    v = np.ones((2, 6, 0))
    out, lse = sdpa(q, k, v, return_lse=True)
    dq, dk, dv = sdpa_bwd(np.ones_like(out), q, k, v, out, lse)
    assert not dq.any() and not dk.any() and dv.shape == (2, 6, 0)


def test_thread_counts_and_strategies_agree(rng):
    q, k, v = (rng.standard_normal((1, 1, 300, 32)).astype(np.float32) for _ in range(3))
    out, lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    G = rng.standard_normal(out.shape).astype(np.float32)
    want = sdpa_bwd(G, q, k, v, out, lse, is_causal=True, num_threads=1)
    for strategy in ("splits", "two_pass"):
        with mock.patch.object(backward, "DQ_STRATEGY", strategy), \
                mock.patch.object(backward, "BLOCK_K", 32):
            for threads in (2, 3, 4):
                got = sdpa_bwd(G, q, k, v, out, lse, is_causal=True, num_threads=threads)
                for a, b in zip(got, want):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_same_result_on_every_call(rng):
    # per-split dQ is summed in a fixed order: no dependence on which thread ran what
    q, k, v = (rng.standard_normal((1, 1, 500, 64)).astype(np.float32) for _ in range(3))
    out, lse = sdpa(q, k, v, return_lse=True)
    G = rng.standard_normal(out.shape).astype(np.float32)
    first = sdpa_bwd(G, q, k, v, out, lse, num_threads=2)
    for _ in range(3):
        for a, b in zip(sdpa_bwd(G, q, k, v, out, lse, num_threads=2), first):
            np.testing.assert_array_equal(a, b)


def test_scratch_allocation_failure_raises_memory_error(rng):
    q, k, v = (rng.standard_normal((1, 2, 100, 16)).astype(np.float32) for _ in range(3))
    out, lse = sdpa(q, k, v, return_lse=True)
    G = np.ones_like(out)
    check_scratch_failure(lambda: sdpa_bwd(G, q, k, v, out, lse, num_threads=2))


def test_memory_stays_linear_in_the_length(rng):
    import tracemalloc
    L, E = 4096, 16
    q, k, v = (rng.standard_normal((1, 1, L, E)).astype(np.float32) for _ in range(3))
    out, lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    G = np.ones_like(out)
    tracemalloc.start()
    sdpa_bwd(G, q, k, v, out, lse, is_causal=True, num_threads=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * L * E * 4          # a few copies of one input; scores would be 64 MiB


# ---- bad input ---------------------------------------------------------------------------

def _good(rng, dtype=np.float32):
    q, k, v = (rng.standard_normal((2, 3, 5, 4)).astype(dtype) for _ in range(3))
    out, lse = sdpa(q, k, v, return_lse=True)
    return np.ones_like(out), q, k, v, out, lse


@pytest.mark.parametrize("which, bad, error, words", [
    (0, lambda a: a[..., :4, :], ValueError, "grad_out has shape"),
    (4, lambda a: a[:, :2], ValueError, "out has shape"),
    (5, lambda a: a[..., None], ValueError, "lse has shape"),
    (0, lambda a: a.astype(np.float64), TypeError, "grad_out has dtype"),
    (0, lambda a: a.astype(np.int32), TypeError, "grad_out must be floating"),
    (4, lambda a: a.astype(np.float64), TypeError, "out has dtype"),
    (5, lambda a: a.astype(np.float64), TypeError, "lse has dtype"),
    (1, lambda a: a.astype(np.complex64), TypeError, "query"),
    (2, lambda a: a[..., :3], ValueError, "key"),
])
def test_bad_arrays_are_named(rng, which, bad, error, words):
    args = list(_good(rng))
    args[which] = bad(args[which])
    with pytest.raises(error, match=words):
        sdpa_bwd(*args)


def test_bad_options(rng):
    args = _good(rng)
    with pytest.raises(ValueError, match="mask_grad=True needs a floating attn_mask"):
        sdpa_bwd(*args, mask_grad=True)
    with pytest.raises(ValueError, match="mask_grad=True needs a floating attn_mask"):
        sdpa_bwd(*args, np.ones((5, 5), bool), mask_grad=True)
    with pytest.raises(ValueError, match="causal_alignment"):
        sdpa_bwd(*args, causal_alignment="middle")
    with pytest.raises(ValueError, match="device"):
        sdpa_bwd(*args, device="gpu")
    with pytest.raises(NotImplementedError, match="mask_grad=True with device='npu'"):
        sdpa_bwd(*args, np.ones((5, 5)), mask_grad=True, device="npu")   # tests/test_npu_backward.py
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa_bwd(*args, np.ones((4, 4)))
    with pytest.raises(ValueError, match="num_threads"):
        sdpa_bwd(*args, num_threads=0)


# ---- masked_softmax_backward ---------------------------------------------------------------

@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       axis=st.integers(-3, 2), dtype=st.sampled_from(["float32", "float64"]),
       masked=st.booleans(), scale=st.sampled_from([None, 0.5]),
       seed=st.integers(0, 2**32 - 1))
def test_softmax_backward_matches_reference(shape, axis, dtype, masked, scale, seed):
    rng = np.random.default_rng(seed)
    axis = axis % len(shape)
    x = rng.standard_normal(shape).astype(dtype)
    mask = rng.random(shape) > 0.3 if masked else None
    y = fastattn.masked_softmax(x, mask, axis=axis, scale=scale)
    g = rng.standard_normal(shape).astype(dtype)
    got = fastattn.masked_softmax_backward(g, y, axis, scale=scale)
    want = reference.masked_softmax_backward(g, y, axis, scale=scale)
    assert got.shape == y.shape and got.dtype == np.dtype(dtype)
    assert_close(got, want, dtype)
    if masked:
        assert not got[~mask].any()


def test_softmax_backward_finite_differences(rng):
    x = rng.standard_normal((3, 7))
    mask = rng.standard_normal((3, 7))
    mask[1] = -np.inf                       # a fully masked row: zero gradient
    G = rng.standard_normal((3, 7))
    y = fastattn.masked_softmax(x, mask, scale=0.7)
    dx = fastattn.masked_softmax_backward(G, y, scale=0.7)
    eps = 1e-6
    for idx in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        num = ((G * fastattn.masked_softmax(hi, mask, scale=0.7)).sum()
               - (G * fastattn.masked_softmax(lo, mask, scale=0.7)).sum()) / (2 * eps)
        assert abs(num - dx[idx]) < 1e-7
    assert not dx[1].any()


def test_softmax_backward_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    G = rng.standard_normal((4, 5, 6)).astype(np.float32)
    for axis in (0, 1, 2):
        tx = torch.tensor(x, requires_grad=True)
        torch.softmax(tx, dim=axis).backward(torch.tensor(G))
        y = fastattn.masked_softmax(x, axis=axis)
        assert_close(fastattn.masked_softmax_backward(G, y, axis=axis), tx.grad.numpy(),
                     np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_softmax_backward_half(rng, dtype):
    x = rng.standard_normal((5, 33)).astype(dtype)
    y = fastattn.masked_softmax(x)
    g = rng.standard_normal((5, 33)).astype(dtype)
    got = fastattn.masked_softmax_backward(g, y)
    assert got.dtype == np.dtype(dtype)
    assert_close(got, reference.masked_softmax_backward(g, y), dtype)


def test_softmax_backward_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        fastattn.masked_softmax_backward(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match="grad"):
        fastattn.masked_softmax_backward(np.ones(3, complex), np.ones(3))
    with pytest.raises(np.exceptions.AxisError):
        fastattn.masked_softmax_backward(np.ones(3), np.ones(3), axis=1)
    with pytest.raises(ValueError, match="0-d"):
        fastattn.masked_softmax_backward(np.float64(1), np.float64(1))
    assert fastattn.masked_softmax_backward(np.ones((0, 3)), np.ones((0, 3))).shape == (0, 3)


# ---- block_sparse_attention_backward ---------------------------------------------------

@st.composite
def sparse_problems(draw):
    return dict(draw_block_rule(draw),
                dtype=draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"])),
                heads=draw(st.sampled_from([None, 3])), E=draw(st.sampled_from([8, 16, 32])),
                Ev=draw(st.sampled_from([1, 7, 16])), k_broadcast=draw(st.booleans()),
                threads=draw(st.sampled_from([1, 2, 3])))


def sparse_layout(p, rng):
    L, S = p["L"], p["S"]
    layout = fastattn.BlockLayout.from_rule((L, S), p["block"], **p["rule"])
    if p["heads"]:
        # per-head: each head drops some of the rule's blocks at random
        blocks = np.broadcast_to(layout.block_mask(), (p["heads"],) + layout.block_mask().shape)
        blocks = blocks & (rng.random(blocks.shape) < 0.7)
        layout = fastattn.BlockLayout.from_blocks(blocks, (L, S), p["block"], **p["rule"])
    return layout


@given(p=sparse_problems())
def test_block_sparse_backward_matches_dense_backward(p):
    rng = np.random.default_rng(p["seed"])
    L, S = p["L"], p["S"]
    dtype = BF16 if p["dtype"] == "bfloat16" else np.dtype(p["dtype"])
    layout = sparse_layout(p, rng)
    H = p["heads"] or 2
    q = rng.standard_normal((2, H, L, p["E"])).astype(dtype)
    k = rng.standard_normal((1 if p["k_broadcast"] else 2, H, S, p["E"])).astype(dtype)
    v = rng.standard_normal(k.shape[:-1] + (p["Ev"],)).astype(dtype)
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    grad = rng.standard_normal(out.shape).astype(dtype)
    got = fastattn.block_sparse_attention_backward(grad, q, k, v, out, lse, layout,
                                                   num_threads=p["threads"])
    # the dense backward with the layout's mask, from the dense forward's out and lse
    mask = layout.to_mask()
    out2, lse2 = sdpa(q, k, v, mask, return_lse=True)
    want = sdpa_bwd(grad, q, k, v, out2, lse2, mask)
    ref = reference.scaled_dot_product_attention_backward(grad, q, k, v, mask)
    for a, b, r, x in zip(got, want, ref, (q, k, v)):
        assert a.shape == x.shape and a.dtype == x.dtype
        with mock.patch.dict(RTOL, GRAD_RTOL):
            assert_close(a, r, dtype)
        if dtype in (np.float32, np.float64):
            assert_close(a, b, dtype)


def test_block_sparse_backward_finite_differences(rng):
    L = S = 40
    layout = fastattn.BlockLayout.from_rule((L, S), (8, 16), window=(12, 3), dilation=2,
                                            global_query=[5])
    q, k, v = (rng.standard_normal((2, L, 8)) for _ in range(3))
    G = rng.standard_normal((2, L, 8))
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    grads = fastattn.block_sparse_attention_backward(G, q, k, v, out, lse, layout)
    args = [q, k, v]
    eps = 1e-6
    for i, x in enumerate(args):
        u = rng.standard_normal(x.shape)
        hi, lo = list(args), list(args)
        hi[i], lo[i] = x + eps * u, x - eps * u
        num = ((G * fastattn.block_sparse_attention(*hi, layout)).sum()
               - (G * fastattn.block_sparse_attention(*lo, layout)).sum()) / (2 * eps)
        assert abs(num - (grads[i] * u).sum()) < 1e-6 * max(1.0, abs(num))


def test_block_sparse_backward_per_head_layout_broadcasts(rng):
    # a per-head layout against heads-less operands: the gradients sum over the heads
    L = S = 48
    blocks = rng.random((3, 3, 3)) < 0.6
    layout = fastattn.BlockLayout.from_blocks(blocks, (L, S), 16)
    q, k, v = (rng.standard_normal((L, 16)).astype(np.float32) for _ in range(3))
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    assert out.shape == (3, L, 16)
    G = rng.standard_normal(out.shape).astype(np.float32)
    got = fastattn.block_sparse_attention_backward(G, q, k, v, out, lse, layout)
    want = reference.scaled_dot_product_attention_backward(G, q, k, v, layout.to_mask())
    for a, b in zip(got, want):
        assert a.shape == (L, 16)
        assert_close(a, b, np.float32)


def test_block_sparse_backward_bad_input(rng):
    layout = fastattn.BlockLayout.from_rule((16, 16), 8, window=(4, 0))
    q, k, v = (rng.standard_normal((16, 8)) for _ in range(3))
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    with pytest.raises(TypeError, match="BlockLayout"):
        fastattn.block_sparse_attention_backward(out, q, k, v, out, lse, layout.to_mask())
    with pytest.raises(ValueError, match="layout is for"):
        fastattn.block_sparse_attention_backward(out[:8], q[:8], k, v, out[:8], lse[:8],
                                                 layout)
    with pytest.raises(ValueError, match="lse has shape"):
        fastattn.block_sparse_attention_backward(out, q, k, v, out, lse[:4], layout)
    with pytest.raises(TypeError, match="out has dtype"):
        fastattn.block_sparse_attention_backward(out, q, k, v, out.astype(np.float32), lse,
                                                 layout)
    empty = fastattn.BlockLayout((16, 16), 8, [0, 0, 0], [])
    o2, l2 = fastattn.block_sparse_attention(q, k, v, empty, return_lse=True)
    grads = fastattn.block_sparse_attention_backward(np.ones_like(o2), q, k, v, o2, l2, empty)
    assert not any(g.any() for g in grads)
