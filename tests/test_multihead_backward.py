"""The backward of multi-head attention: multi_head_attention(..., return_cache=True) and
multi_head_attention_backward / MultiHeadAttention.backward, and the weight-gradient
kernel under it (fastattn._linear.weight_grads).

Checked against finite differences of fastattn's own forward in float64 (always) and
against torch.nn.MultiheadAttention's autograd when torch is importable.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import _linear, _threads
from helpers import assert_close, load_ascend_harness

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime

mha_fwd = fastattn.multi_head_attention
mha_bwd = fastattn.multi_head_attention_backward
PARAMS = ("q_weight", "k_weight", "v_weight", "out_weight", "q_bias", "k_bias", "v_bias",
          "out_bias")


def make_weights(rng, H, Hkv, D, Dv, Eq, Ek, Ev, Eout, bias=True, dtype=np.float64):
    w = dict(q_weight=rng.standard_normal((H * D, Eq)) / np.sqrt(Eq),
             k_weight=rng.standard_normal((Hkv * D, Ek)) / np.sqrt(Ek),
             v_weight=rng.standard_normal((Hkv * Dv, Ev)) / np.sqrt(Ev),
             out_weight=rng.standard_normal((Eout, H * Dv)) / np.sqrt(H * Dv))
    if bias:
        w.update(q_bias=rng.standard_normal(H * D), k_bias=rng.standard_normal(Hkv * D),
                 v_bias=rng.standard_normal(Hkv * Dv), out_bias=rng.standard_normal(Eout))
    return {n: a.astype(dtype) for n, a in w.items()}


def check_directional(rng, q, k, v, H, weights, self_attention=False, **options):
    """Every gradient against a central difference of the loss sum(G * out) along a
    random direction (one per array), in float64."""
    out, cache = mha_fwd(q, k, v, H, **weights, return_cache=True, **options)
    G = rng.standard_normal(out.shape)
    dq, dk, dv, grads = mha_bwd(G, cache)
    assert list(grads) == [n for n in PARAMS if n in weights]
    arrays = dict(query=q, key=k, value=v, **weights)
    analytic = dict(query=dq, key=dk, value=dv, **grads)
    for name, a in arrays.items():
        assert analytic[name].shape == a.shape and analytic[name].dtype == a.dtype, name

    def loss(**changed):
        a = {**arrays, **changed}
        o = mha_fwd(a["query"], a["key"], a["value"], H,
                    **{n: a[n] for n in weights}, **options)
        return float((G * o).sum())

    eps = 1e-6
    for name, a in arrays.items():
        d = rng.standard_normal(a.shape)
        numeric = (loss(**{name: a + eps * d}) - loss(**{name: a - eps * d})) / (2 * eps)
        got = float((analytic[name] * d).sum())
        assert abs(numeric - got) <= 1e-6 * max(1.0, abs(numeric)), (name, numeric, got)
    return out, (dq, dk, dv, grads)


@given(batch=st.sampled_from([(), (2,), (2, 3)]), L=st.integers(0, 9), S=st.integers(1, 9),
       heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]), D=st.integers(1, 3),
       Dv=st.integers(1, 3), cross=st.booleans(), causal=st.booleans(),
       mask=st.sampled_from(["none", "padding", "bool", "float", "both"]),
       bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gradients_match_finite_differences(batch, L, S, heads, D, Dv, cross, causal, mask,
                                            bias, seed):
    rng = np.random.default_rng(seed)
    H, Hkv = heads
    if cross:
        Eq, Ek, Ev, Eout = 5, 4, 3, 6
        q = rng.standard_normal(batch + (L, Eq))
        k = rng.standard_normal(batch + (S, Ek))
        v = rng.standard_normal(batch + (S, Ev))
    else:
        S = max(L, 1)
        Eq = Ek = Ev = Eout = 4
        q = k = v = rng.standard_normal(batch + (S, Eq))
        L = S
    w = make_weights(rng, H, Hkv, D, Dv, Eq, Ek, Ev, Eout, bias=bias)
    options = dict(num_kv_heads=Hkv, is_causal=causal)
    if mask in ("padding", "both"):
        # some sequences entirely padded: rows without keys, zero gradients
        options["key_padding_mask"] = rng.random(batch + (S,)) > 0.4
    if mask in ("bool", "both"):
        options["attn_mask"] = rng.random((H, L, S)) > 0.3
    if mask == "float":
        options["attn_mask"] = np.where(rng.random((L, S)) > 0.2, rng.standard_normal((L, S)),
                                        -np.inf)
    check_directional(rng, q, k, v, H, w, **options)


def test_every_entry_against_finite_differences(rng):
    # small enough to difference every entry of every input and parameter
    H, Hkv, D = 4, 2, 2
    q = rng.standard_normal((2, 3, 5))
    kv = rng.standard_normal((2, 4, 6))
    w = make_weights(rng, H, Hkv, D, 3, 5, 6, 6, 5)
    keep = np.array([[True, True, False, True], [True, False, True, True]])
    opts = dict(num_kv_heads=Hkv, key_padding_mask=keep)
    out, cache = mha_fwd(q, kv, kv, H, **w, return_cache=True, **opts)
    G = rng.standard_normal(out.shape)
    dq, dk, dv, grads = mha_bwd(G, cache)
    arrays = dict(query=q, kv=kv, **w)
    analytic = dict(query=dq, kv=dk + dv, **grads)

    def loss(a):
        return float((G * mha_fwd(a["query"], a["kv"], a["kv"], H,
                                  **{n: a[n] for n in w}, **opts)).sum())

    for name, a in arrays.items():
        numeric = np.empty_like(a)
        for i in np.ndindex(a.shape):
            e = np.zeros_like(a)
            e[i] = 1e-6
            numeric[i] = (loss({**arrays, name: a + e}) - loss({**arrays, name: a - e})) / 2e-6
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_rows_without_keys_get_zero_gradients(rng):
    w = make_weights(rng, 2, 2, 3, 3, 6, 6, 6, 6)
    x = rng.standard_normal((2, 5, 6))
    keep = np.ones((2, 5), dtype=bool)
    keep[1] = False                           # sequence 1: every key is padding
    out, cache = mha_fwd(x, x, x, 2, **w, key_padding_mask=keep, return_cache=True)
    dq, dk, dv, grads = mha_bwd(np.ones_like(out), cache)
    for d in (dq, dk, dv):
        assert np.isfinite(d).all()
        np.testing.assert_array_equal(d[1], 0)
    np.testing.assert_allclose(grads["out_bias"], 10.0)
    assert all(np.isfinite(g).all() for g in grads.values())


def test_layouts_conventions_and_broadcast(rng):
    # batch_first=False with torch masks, an unbatched query against a batch-wide mask,
    # and a key shared by the batch: gradients come back in each input's own layout
    H = 2
    w = make_weights(rng, H, H, 3, 3, 6, 6, 6, 6)
    x = rng.standard_normal((5, 3, 6))                      # (L, N, E)
    pad = rng.random((3, 5)) > 0.7                          # True = padding (torch)
    pad[:, 0] = False
    mask = rng.random((5, 5)) > 0.8                         # True = masked out (torch)
    np.fill_diagonal(mask, False)
    check_directional(rng, x, x, x, H, w, batch_first=False, mask_convention="torch",
                      key_padding_mask=pad, attn_mask=mask)
    seq_first_grads = check_directional(rng, x, x, x, H, w, batch_first=False)[1]
    batch_first = mha_fwd(x.swapaxes(0, 1), x.swapaxes(0, 1), x.swapaxes(0, 1), H, **w,
                          return_cache=True)[1]
    ref = mha_bwd(np.ones((3, 5, 6)), batch_first)
    got = mha_bwd(np.ones((5, 3, 6)), mha_fwd(x, x, x, H, **w, batch_first=False,
                                                return_cache=True)[1])
    for a, b in zip(got[:3], ref[:3]):
        np.testing.assert_allclose(a, b.swapaxes(0, 1), atol=1e-12)
    assert seq_first_grads[0].shape == (5, 3, 6)
    # unbatched query, mask with a batch axis of 2: out (2, L, E), dq summed back
    q = rng.standard_normal((4, 6))
    check_directional(rng, q, q, q, H, w, attn_mask=rng.standard_normal((2, 1, 4, 4)))
    # one memory shared by a batch of queries
    mem = rng.standard_normal((7, 6))
    check_directional(rng, rng.standard_normal((3, 4, 6)), mem, mem, H, w)


def test_non_contiguous_inputs_and_transposed_weights(rng):
    H = 2
    w = make_weights(rng, H, 1, 4, 4, 6, 6, 6, 6)
    w["q_weight"] = np.asfortranarray(w["q_weight"])       # w.T of a C array
    big = rng.standard_normal((3, 10, 12))
    x = big[:, ::2, 3:9]                                    # strided rows and columns
    check_directional(rng, x, x, x, H, w, num_kv_heads=1, is_causal=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_lower_precision_matches_float64(rng, dtype):
    H = 4
    w64 = make_weights(rng, H, 2, 8, 8, 32, 32, 32, 32)
    x64 = rng.standard_normal((2, 9, 32))
    mask = rng.random((9, 9)) > 0.2
    grads = []
    for dt in (np.float64, dtype):
        w = {n: a.astype(dt) for n, a in w64.items()}
        x = x64.astype(dt)
        out, cache = mha_fwd(x, x, x, H, **w, num_kv_heads=2, attn_mask=mask, is_causal=True,
                             return_cache=True)
        assert out.dtype == np.dtype(dt)
        G = np.linspace(-1, 1, out.size).reshape(out.shape)
        grads.append(mha_bwd(G.astype(dt), cache))
    tol = {np.float32: 2e-4, np.float16: 1e-2, ml_dtypes.bfloat16: 5e-2}[dtype]
    for want, got in zip(grads[0][:3], grads[1][:3]):
        assert got.dtype == np.dtype(dtype)
        err = np.abs(got.astype(np.float64) - want).max()
        assert err <= tol * max(1.0, np.abs(want).max()), err
    for name, want in grads[0][3].items():
        got = grads[1][3][name]
        assert got.dtype == np.dtype(dtype)
        err = np.abs(got.astype(np.float64) - want).max()
        assert err <= tol * max(1.0, np.abs(want).max()), (name, err)


def test_num_threads_do_not_change_results_beyond_rounding(rng, monkeypatch):
    # small GRAD_BLOCK_ROWS_MIN and GRAD_SPLIT_ROWS: several dW blocks and row splits
    monkeypatch.setattr(_linear, "GRAD_BLOCK_ROWS_MIN", 4)
    monkeypatch.setattr(_linear, "GRAD_SPLIT_ROWS", 8)
    w = make_weights(rng, 4, 4, 8, 8, 40, 40, 40, 40)
    x = rng.standard_normal((3, 50, 40))
    out, cache = mha_fwd(x, x, x, 4, **w, is_causal=True, return_cache=True)
    G = rng.standard_normal(out.shape)
    results = [mha_bwd(G, cache, num_threads=n) for n in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        for name in results[0][3]:
            np.testing.assert_allclose(results[0][3][name], other[3][name], rtol=1e-12,
                                       atol=1e-12)


def test_class_backward_and_state_dict(rng):
    mha = fastattn.MultiHeadAttention(24, 4, num_kv_heads=2, rng=0, dtype=np.float64)
    x = rng.standard_normal((2, 6, 24))
    mem = rng.standard_normal((2, 8, 24))
    sd = mha.state_dict()
    assert list(sd) == list(PARAMS)
    assert all(sd[n] is getattr(mha, n) for n in sd)
    out, cache = mha(x, mem, is_causal=False, return_cache=True)
    G = rng.standard_normal(out.shape)
    dq, dk, dv, grads = mha.backward(G, cache)
    assert grads.keys() == sd.keys()
    want = mha_bwd(G, mha_fwd(x, mem, mem, 4, **sd, num_kv_heads=2, return_cache=True)[1])
    for a, b in zip((dq, dk, dv), want[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for n in sd:
        np.testing.assert_allclose(grads[n], want[3][n], rtol=1e-12, atol=1e-12)
    # a step on the state_dict's arrays lowers the loss 0.5 * |out|^2 (G = out)
    out, cache = mha(x, mem, return_cache=True)
    before = 0.5 * float((out ** 2).sum())
    grads = mha.backward(out, cache)[3]
    for n, p in mha.state_dict().items():
        p -= 1e-3 * grads[n]
    assert 0.5 * float((mha(x, mem) ** 2).sum()) < before
    no_bias = fastattn.MultiHeadAttention(8, 2, bias=False, rng=0)
    assert list(no_bias.state_dict()) == ["q_weight", "k_weight", "v_weight", "out_weight"]
    o, c = no_bias(np.ones((3, 8), np.float32), return_cache=True)
    assert no_bias.backward(o, c)[3].keys() == no_bias.state_dict().keys()


def test_matches_torch_multihead_attention(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    E, H, N, L, S = 16, 4, 3, 5, 7
    for batch_first, kdim, bias, dtype in ((True, None, True, torch.float64),
                                           (False, None, False, torch.float32),
                                           (True, 6, True, torch.float32)):
        m = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                        bias=bias, dtype=dtype)
        mha = fastattn.MultiHeadAttention.from_torch(m)
        shape = (lambda n, s, e: (n, s, e)) if batch_first else (lambda n, s, e: (s, n, e))
        q = torch.randn(shape(N, L, E), dtype=dtype, requires_grad=True)
        k = torch.randn(shape(N, S, kdim or E), dtype=dtype, requires_grad=True)
        v = torch.randn(shape(N, S, kdim or E), dtype=dtype, requires_grad=True)
        pad = torch.zeros(N, S, dtype=torch.bool)
        pad[1, 4:] = True                                   # True = padding
        mask = torch.rand(L, S) > 0.8                       # True = masked out
        mask[:, 0] = False
        out, _ = m(q, k, v, key_padding_mask=pad, attn_mask=mask, need_weights=False)
        G = torch.randn_like(out)
        out.backward(G)
        got_out, cache = mha(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                             key_padding_mask=pad.numpy(), attn_mask=mask.numpy(),
                             return_cache=True)
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else \
            dict(rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(got_out, out.detach().numpy(), **tol)
        dq, dk, dv, grads = mha.backward(G.numpy(), cache)
        for got, t in ((dq, q), (dk, k), (dv, v)):
            np.testing.assert_allclose(got, t.grad.numpy(), **tol)
        if m._qkv_same_embed_dim:
            want = dict(zip(("q_weight", "k_weight", "v_weight"),
                            np.split(m.in_proj_weight.grad.numpy(), 3)))
        else:
            want = {f"{n}_weight": getattr(m, f"{n}_proj_weight").grad.numpy() for n in "qkv"}
        want["out_weight"] = m.out_proj.weight.grad.numpy()
        if bias:
            want.update(zip(("q_bias", "k_bias", "v_bias"),
                            np.split(m.in_proj_bias.grad.numpy(), 3)))
            want["out_bias"] = m.out_proj.bias.grad.numpy()
        assert grads.keys() == want.keys() == mha.state_dict().keys()
        for name, g in want.items():
            np.testing.assert_allclose(grads[name], g, err_msg=name, **tol)


def test_errors_name_the_problem(rng):
    w = make_weights(rng, 2, 2, 2, 2, 4, 4, 4, 4)
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(NotImplementedError, match="need_weights"):
        mha_fwd(x, x, x, 2, **w, need_weights=True, return_cache=True)
    out, cache = mha_fwd(x, x, x, 2, **w, return_cache=True)
    assert "cache" in repr(cache) and cache.nbytes > 0
    with pytest.raises(TypeError, match="cache"):
        mha_bwd(out, {"out": out})
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        mha_bwd(out[:, :2], cache)
    with pytest.raises(TypeError, match="grad_out"):
        mha_bwd(out.astype(int), cache)
    a = fastattn.MultiHeadAttention(4, 2, rng=0)
    b = fastattn.MultiHeadAttention(4, 2, rng=1)
    o, c = a(x.astype(np.float32), return_cache=True)
    with pytest.raises(ValueError, match="another|this layer"):
        b.backward(o, c)
    with pytest.raises(ValueError, match="this layer"):
        a.backward(out, cache)                   # a cache of a functional call
    # NaN in grad_out propagates, never raises
    g = np.ones_like(out)
    g[0, 1, 2] = np.nan
    dq = mha_bwd(g, cache)[0]
    assert np.isnan(dq[0]).any() and np.isfinite(dq[1]).all()


def test_npu_attention_core_matches_cpu(runtime, rng):
    # device="npu": the attention core's forward and backward run on the NPU (the C test
    # double here), the projections and their gradients on the CPU
    mha = fastattn.MultiHeadAttention(32, 4, num_kv_heads=2, rng=0)
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    keep = np.ones((2, 9), dtype=bool)
    keep[1, 6:] = False
    G = rng.standard_normal((2, 9, 32)).astype(np.float32)
    results = []
    for device in ("npu", "cpu"):
        out, cache = mha(x, is_causal=True, key_padding_mask=keep, device=device,
                         return_cache=True)
        results.append((out, mha.backward(G, cache)))
    (out_npu, g_npu), (out_cpu, g_cpu) = results
    assert_close(out_npu, out_cpu, np.float32)
    for a, b in zip(g_npu[:3], g_cpu[:3]):
        assert a.dtype == np.float32
        assert_close(a, b, np.float32)
    for name in g_cpu[3]:
        assert_close(g_npu[3][name], g_cpu[3][name], np.float32)
    harness.assert_no_leak(runtime)


# ---- the weight-gradient kernel ----------------------------------------------------------

def _weight_grads(*pairs, nthreads=2):
    with _threads.single_threaded_blas():
        return _linear.weight_grads(*pairs, nthreads=nthreads)


@given(lead=st.sampled_from([(), (1,), (3,), (2, 3), (5, 1)]), n=st.integers(0, 40),
       h=st.integers(1, 40), e=st.integers(1, 40),
       layout=st.sampled_from(["c", "rows_strided", "batch_swapped", "fortran"]),
       dtype=st.sampled_from([np.float32, np.float64]), nthreads=st.integers(1, 4),
       small=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_weight_grads_match_matmul(lead, n, h, e, layout, dtype, nthreads, small, seed):
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(lead + (n, h)).astype(dtype)
    x = rng.standard_normal(lead + (n, e)).astype(dtype)
    if layout == "rows_strided":
        x = np.repeat(x, 2, axis=-2)[..., ::2, :]
        dy = np.concatenate([dy, dy], axis=-1)[..., :h]
    elif layout == "batch_swapped" and len(lead) >= 1:
        x = np.ascontiguousarray(np.swapaxes(x, 0, -2)).swapaxes(0, -2)
    elif layout == "fortran":
        x = np.asfortranarray(x)
    saved = _linear.GRAD_BLOCK_ROWS_MIN, _linear.GRAD_SPLIT_ROWS
    try:
        if small:
            _linear.GRAD_BLOCK_ROWS_MIN, _linear.GRAD_SPLIT_ROWS = 1, 4
        got, = _weight_grads((dy, x), nthreads=nthreads)
    finally:
        _linear.GRAD_BLOCK_ROWS_MIN, _linear.GRAD_SPLIT_ROWS = saved
    want = dy.reshape(-1, h).astype(np.float64).T @ x.reshape(-1, e).astype(np.float64)
    assert got.shape == (h, e) and got.dtype == dtype
    assert_close(got, want, dtype if dtype == np.float64 else np.float32)


def test_weight_grads_split_rows_and_matrices(monkeypatch, rng):
    # the rows are split for the threads first, over the matrices of a strided stack or
    # the rows of one matrix (partial sums added at the end); dW is cut into blocks of
    # its rows when there are too few rows to split
    calls = []
    real = _linear._projection_kernels.weight_grad

    def spy(jobs, nthreads):
        calls.append([(j[7].shape[0], j[8], j[9], j[10]) for j in jobs])
        return real(jobs, nthreads)
    monkeypatch.setattr(_linear._projection_kernels, "weight_grad", spy)
    monkeypatch.setattr(_linear, "GRAD_SPLIT_ROWS", 16)
    one = rng.standard_normal((64, 8)), rng.standard_normal((64, 5))
    stack = rng.standard_normal((6, 10, 8)), rng.standard_normal((10, 6, 5)).swapaxes(0, 1)
    few = rng.standard_normal((10, 64)), rng.standard_normal((10, 5))
    for dy, x in (one, stack, few):
        got, = _weight_grads((dy, x), nthreads=2)
        want = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, 5)
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert calls[0] == [(4, 16, False, 8)]       # 64 rows: 4 splits of 16 rows, whole dW
    assert calls[1] == [(3, 2, True, 8)]         # 6 strided matrices: 3 splits of 2
    assert calls[2] == [(1, 10, False, 16)]      # 10 rows: dW in 4 blocks of 16 rows
    # limits: the partials' memory, one thread (one whole product)
    monkeypatch.setattr(_linear, "GRAD_PARTIALS_BYTES", 2 * 8 * 5 * 8)
    _weight_grads(one, nthreads=2)
    assert calls[3] == [(2, 32, False, 8)]       # 2 splits (the memory), dW rows >= 16
    _weight_grads(one, nthreads=1)
    assert calls[4] == [(1, 64, False, 8)]
