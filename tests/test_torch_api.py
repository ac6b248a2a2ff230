"""PyTorch's call signature for scaled_dot_product_attention, and dropout in the kernel.

The dropout mask is a hash of (seed, batch, row, column) (fastattn/_kernels/dropout.h);
fastattn.reference.dropout_keep regenerates it in NumPy. With uniform scores and one-hot
values the output reveals the mask the kernel used: out[i, j] = keep[i, j] / (S (1 - p)).
"""
import inspect
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close

sdpa = fastattn.scaled_dot_product_attention
TORCH_PARAMETERS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                    "enable_gqa"]


def make(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def revealed_keep(batch, L, S, p, seed, dtype=np.float64, **kw):
    # The kernel's keep mask, read off its output: q = 0 gives uniform probabilities
    # 1 / S, v = identity puts probability j into column j.
    q = np.zeros(batch + (L, 8), dtype)
    k = np.ones((S, 8), dtype)
    v = np.eye(S, dtype=dtype)
    out = sdpa(q, k, v, None, p, rng=seed, **kw).astype(np.float64)
    scaled = out * S * (1 - p)
    keep = np.rint(scaled)
    np.testing.assert_allclose(scaled, keep, atol=1e-6 if dtype == np.float64 else 2e-2)
    return keep.astype(bool)


# ---- the signature --------------------------------------------------------------------

def test_torch_parameters_come_first_in_torch_order():
    params = inspect.signature(sdpa).parameters
    names = list(params)
    assert names[:8] == TORCH_PARAMETERS
    for name in names[:8]:
        assert params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in names[8:]:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert params["dropout_p"].default == 0.0 and params["rng"].default is None
    # the reference takes the same positional arguments
    assert list(inspect.signature(reference.scaled_dot_product_attention).parameters)[:8] \
        == TORCH_PARAMETERS


def test_torch_positional_call(rng):
    q, k, v = make(rng, (2, 4, 9, 8)), make(rng, (2, 2, 9, 8)), make(rng, (2, 2, 9, 8))
    mask = rng.random((9, 9)) > 0.3
    # (q, k, v, None, 0.0, True) as ported from torch: causal, no dropout
    np.testing.assert_array_equal(sdpa(q, k[:, :1], v[:, :1], None, 0.0, True),
                                  sdpa(q, k[:, :1], v[:, :1], is_causal=True))
    np.testing.assert_array_equal(
        sdpa(q, k, v, mask, 0.0, False, 0.5, True),
        sdpa(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True))
    assert_close(sdpa(q, k, v, None, 0.0, True, None, True),
                 reference.scaled_dot_product_attention(q, k, v, None, 0.0, True, None, True),
                 np.float32)


def test_torch_keywords(rng):
    q, k, v = make(rng, (1, 2, 5, 8)), make(rng, (1, 2, 6, 8)), make(rng, (1, 2, 6, 8))
    np.testing.assert_array_equal(
        sdpa(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=True,
             scale=None, enable_gqa=False),
        sdpa(q, k, v, is_causal=True))


# ---- dropout_p == 0 --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, fastattn.bfloat16])
def test_zero_dropout_is_exactly_no_dropout(rng, dtype):
    q, k, v = make(rng, (2, 3, 70, 32), dtype), make(rng, (2, 3, 90, 32), dtype), \
        make(rng, (2, 3, 90, 32), dtype)
    base = sdpa(q, k, v, is_causal=True)
    gen = np.random.default_rng(3)
    state = gen.bit_generator.state
    for zero in (0.0, 0, np.float32(0.0)):
        np.testing.assert_array_equal(sdpa(q, k, v, None, zero, True, rng=gen), base)
        np.testing.assert_array_equal(sdpa(q, k, v, None, zero, True, rng=5), base)
    assert gen.bit_generator.state == state         # no seed drawn without dropout


# ---- reproducibility -------------------------------------------------------------------

def test_int_seed_repeats_the_mask_and_seeds_differ(rng):
    q, k, v = make(rng, (2, 2, 40, 16)), make(rng, (2, 2, 50, 16)), make(rng, (2, 2, 50, 16))
    a = sdpa(q, k, v, None, 0.2, rng=123)
    np.testing.assert_array_equal(a, sdpa(q, k, v, None, 0.2, rng=123))
    assert not np.array_equal(a, sdpa(q, k, v, None, 0.2, rng=124))
    assert not np.array_equal(a, sdpa(q, k, v))


def test_generator_draws_a_new_mask_per_call_and_replays(rng):
    q, k, v = make(rng, (1, 2, 30, 16)), make(rng, (1, 2, 40, 16)), make(rng, (1, 2, 40, 16))
    gen = np.random.default_rng(9)
    first, second = sdpa(q, k, v, None, 0.3, rng=gen), sdpa(q, k, v, None, 0.3, rng=gen)
    assert not np.array_equal(first, second)
    gen = np.random.default_rng(9)
    np.testing.assert_array_equal(sdpa(q, k, v, None, 0.3, rng=gen), first)
    np.testing.assert_array_equal(sdpa(q, k, v, None, 0.3, rng=gen), second)
    # the reference draws the same seeds from the same generator
    assert_close(sdpa(q, k, v, None, 0.3, rng=np.random.default_rng(9)),
                 reference.scaled_dot_product_attention(q, k, v, None, 0.3,
                                                        rng=np.random.default_rng(9)),
                 np.float32)


def test_without_rng_each_call_draws_fresh_entropy(rng):
    q, k, v = make(rng, (1, 1, 30, 16)), make(rng, (1, 1, 60, 16)), make(rng, (1, 1, 60, 16))
    assert not np.array_equal(sdpa(q, k, v, None, 0.5), sdpa(q, k, v, None, 0.5))


def test_kernel_mask_is_the_reference_hash():
    for p, seed in [(0.1, 0), (0.5, 2**64 - 1), (0.9, 12345)]:
        keep = revealed_keep((2, 3), 37, 70, p, seed)
        np.testing.assert_array_equal(keep, reference.dropout_keep((2, 3, 37, 70), p, seed))


def test_mask_independent_of_tiles_threads_and_key_splits(small_tiles):
    expected = reference.dropout_keep((2, 1, 33, 300), 0.4, 77)
    for tiles in [(256, 256), (5, 7), (16, 64), (1, 300)]:
        small_tiles(*tiles)
        for threads in (1, 2, 4):
            np.testing.assert_array_equal(
                revealed_keep((2, 1), 33, 300, 0.4, 77, num_threads=threads), expected)
    # one query row against many keys: the keys are split across threads and merged
    small_tiles(256, 16)
    for threads in (1, 3, 8):
        np.testing.assert_array_equal(
            revealed_keep((1, 1), 1, 300, 0.4, 77, num_threads=threads),
            reference.dropout_keep((1, 1, 1, 300), 0.4, 77))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, fastattn.bfloat16])
def test_mask_same_for_every_dtype(dtype):
    # the same hash decides for every element type (half types: read in float32)
    np.testing.assert_array_equal(revealed_keep((2,), 20, 64, 0.3, 5, dtype=dtype),
                                  reference.dropout_keep((2, 20, 64), 0.3, 5))


# ---- statistics ------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate(p):
    keep = revealed_keep((4, 2), 64, 256, p, 2024)
    n = keep.size
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(keep.mean() - (1 - p)) < 5 * sigma
    # no structure along rows, columns or batch entries: pairs of neighbours are kept
    # together as often as independent draws would be
    for pair in (keep[..., 1:] & keep[..., :-1], keep[..., 1:, :] & keep[..., :-1, :],
                 keep[1:] & keep[:-1]):
        q2 = (1 - p) ** 2
        assert abs(pair.mean() - q2) < 5 * np.sqrt(q2 * (1 - q2) / pair.size)
    per_row = keep.mean(axis=-1)
    assert per_row.std() < 2 * np.sqrt(p * (1 - p) / 256)


def test_mean_is_preserved(rng):
    # E[dropout output] = the output without dropout (kept probabilities / (1 - p))
    q, k, v = make(rng, (1, 1, 8, 16), np.float64), make(rng, (1, 1, 32, 16), np.float64), \
        make(rng, (1, 1, 32, 4), np.float64)
    base = sdpa(q, k, v)
    draws = np.stack([sdpa(q, k, v, None, 0.5, rng=seed) for seed in range(4000)])
    stderr = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - base) < 5 * stderr + 1e-12)


def test_lse_ignores_dropout(rng):
    # the softmax denominator is that of all keys (FlashAttention's convention)
    q, k, v = make(rng, (2, 16, 8)), make(rng, (2, 24, 8)), make(rng, (2, 24, 8))
    _, lse = sdpa(q, k, v, return_lse=True)
    _, lse_drop = sdpa(q, k, v, None, 0.6, rng=1, return_lse=True)
    np.testing.assert_array_equal(lse, lse_drop)


# ---- against the reference over random problems ----------------------------------------

@st.composite
def problems(draw):
    L = draw(st.integers(1, 90))
    S = draw(st.integers(1, 200))
    H = draw(st.sampled_from([1, 2, 4]))
    return dict(
        dtype=draw(st.sampled_from([np.float32, np.float64, np.float16, fastattn.bfloat16])),
        L=L, S=S, E=draw(st.sampled_from([8, 16, 64])), Ev=draw(st.sampled_from([4, 16, 64])),
        B=draw(st.integers(1, 2)), H=H, Hkv=draw(st.sampled_from([h for h in (1, 2, 4)
                                                                   if H % h == 0])),
        mask=draw(st.sampled_from(["none", "bool", "float"])), causal=draw(st.booleans()),
        p=draw(st.sampled_from([0.05, 0.5, 0.95])), seed=draw(st.integers(0, 2**64 - 1)),
        tiles=draw(st.sampled_from([None, (8, 16), (5, 7), (64, 32)])),
        threads=draw(st.sampled_from([1, 2, 3])), transposed=draw(st.booleans()))


@given(pr=problems())
def test_random_problems_match_reference(pr):
    import fastattn.attention as attention
    rng = np.random.default_rng(pr["seed"] % 2**32)
    B, H, Hkv, L, S = pr["B"], pr["H"], pr["Hkv"], pr["L"], pr["S"]
    q = make(rng, (B, L, H, pr["E"]), pr["dtype"])
    q = q.transpose(0, 2, 1, 3) if pr["transposed"] else q.reshape(B, H, L, pr["E"])
    k = make(rng, (B, Hkv, S, pr["E"]), pr["dtype"])
    v = make(rng, (B, Hkv, S, pr["Ev"]), pr["dtype"])
    mask = None
    if pr["mask"] == "bool":
        mask = rng.random((B, 1, L, S)) > 0.3
    elif pr["mask"] == "float":
        mask = np.where(rng.random((L, S)) > 0.3, rng.standard_normal((L, S)), -np.inf)
        mask = mask.astype(np.float32)
    tiles = pr["tiles"] or (attention.BLOCK_Q, attention.BLOCK_K)
    with mock.patch.object(attention, "BLOCK_Q", tiles[0]), \
            mock.patch.object(attention, "BLOCK_K", tiles[1]):
        out = sdpa(q, k, v, mask, pr["p"], pr["causal"], None, True, rng=pr["seed"],
                   num_threads=pr["threads"])
    expected = reference.scaled_dot_product_attention(q, k, v, mask, pr["p"], pr["causal"],
                                                      None, True, rng=pr["seed"])
    # kept probabilities are scaled by up to 1 / (1 - 0.95) = 20: the tolerance follows
    assert out.dtype == np.dtype(pr["dtype"])
    assert_close(np.asarray(out, np.float64) * (1 - pr["p"]), expected * (1 - pr["p"]),
                 pr["dtype"])


# ---- bad input, and errors that name the fix ------------------------------------------

@pytest.mark.parametrize("p, error, match", [
    (1.0, ValueError, r"dropout_p must lie in \[0, 1\), got 1.0"),
    (-0.1, ValueError, "dropout_p must lie in"),
    (float("nan"), ValueError, "dropout_p must lie in"),
    (None, TypeError, "dropout_p must be a real number, got NoneType"),
    ("0.1", TypeError, "dropout_p must be a real number, got str"),
    ([0.1], TypeError, "dropout_p must be a real number"),
])
def test_bad_dropout_p(p, error, match):
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(error, match=match):
        sdpa(q, q, q, None, p)


@pytest.mark.parametrize("rng_arg, error, match", [
    ("seed", TypeError, "rng must be None, an int seed or a numpy.random.Generator"),
    (1.5, TypeError, "rng must be"),
    (-1, ValueError, r"rng as a seed must lie in \[0, 2\*\*64\)"),
    (2**64, ValueError, "rng as a seed"),
    (np.random.RandomState(0), TypeError, "got RandomState"),
])
def test_bad_rng(rng_arg, error, match):
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(error, match=match):
        sdpa(q, q, q, None, 0.1, rng=rng_arg)
    with pytest.raises(error, match=match):      # checked with dropout_p == 0 as well
        sdpa(q, q, q, rng=rng_arg)


def test_dropout_on_npu_is_refused_before_anything_runs():
    q = np.ones((1, 1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="dropout_p > 0 is computed on the CPU only"):
        sdpa(q, q, q, None, 0.1, device="npu:0")


def test_mismatched_heads_suggest_enable_gqa(rng):
    q, k = make(rng, (2, 8, 5, 16)), make(rng, (2, 2, 5, 16))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        sdpa(q, k, k)
    # heads that cannot be grouped get no such hint
    with pytest.raises(ValueError) as info:
        sdpa(q, make(rng, (2, 3, 5, 16)), make(rng, (2, 3, 5, 16)))
    assert "enable_gqa" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int32])
def test_integer_mask_suggests_astype_bool(dtype):
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(TypeError, match=r"attn_mask.astype\(bool\)"):
        sdpa(q, q, q, np.ones((3, 3), dtype))


def test_unknown_device_lists_npu_n():
    q = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"\['cpu', 'npu', 'npu:N'\], got 'cuda'"):
        sdpa(q, q, q, device="cuda")


# ---- the backward regenerates the forward's mask ---------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, fastattn.bfloat16])
@pytest.mark.parametrize("shape, causal, mask_kind", [
    ((2, 4, 2, 37, 70, 16), True, "none"),
    ((1, 2, 2, 130, 300, 64), False, "bool"),
    ((2, 2, 1, 1, 500, 32), False, "float"),
])
def test_backward_with_dropout_matches_reference(rng, dtype, shape, causal, mask_kind):
    B, H, Hkv, L, S, E = shape
    q, k, v = make(rng, (B, H, L, E), dtype), make(rng, (B, Hkv, S, E), dtype), \
        make(rng, (B, Hkv, S, E), dtype)
    mask = None
    if mask_kind == "bool":
        mask = rng.random((L, S)) > 0.3
    elif mask_kind == "float":
        # the mask gradient comes back in the mask's dtype
        mask = rng.standard_normal((B, 1, L, S)).astype(
            np.float64 if dtype == np.float64 else np.float32)
    out, lse = sdpa(q, k, v, mask, 0.3, causal, None, True, rng=9, return_lse=True)
    grad = make(rng, out.shape, dtype)
    extra = dict(mask_grad=True) if mask_kind == "float" else {}
    got = fastattn.scaled_dot_product_attention_backward(
        grad, q, k, v, out, lse, mask, is_causal=causal, enable_gqa=True, dropout_p=0.3,
        rng=9, **extra)
    want = reference.scaled_dot_product_attention_backward(
        grad, q, k, v, mask, is_causal=causal, enable_gqa=True, dropout_p=0.3, rng=9, **extra)
    without = reference.scaled_dot_product_attention_backward(
        grad, q, k, v, mask, is_causal=causal, enable_gqa=True, **extra)
    for g, w, n in zip(got, want, without):
        assert_close(g, w, dtype)
        assert not np.allclose(w, n)           # dropout changed the gradients


def test_backward_dropout_independent_of_threads(rng, small_tiles):
    q, k, v = (make(rng, (1, 2, 50, 16), np.float64) for _ in range(3))
    out, lse = sdpa(q, k, v, None, 0.5, True, rng=3, return_lse=True)
    grad = make(rng, out.shape, np.float64)
    base = fastattn.scaled_dot_product_attention_backward(
        grad, q, k, v, out, lse, is_causal=True, dropout_p=0.5, rng=3, num_threads=1)
    for threads in (2, 4):
        for g, b in zip(fastattn.scaled_dot_product_attention_backward(
                grad, q, k, v, out, lse, is_causal=True, dropout_p=0.5, rng=3,
                num_threads=threads), base):
            np.testing.assert_allclose(g, b, rtol=1e-12, atol=1e-13)


def test_reference_dropout_backward_is_autograd_of_the_dropped_forward(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (make(rng, (2, 3, 12, 8), np.float64) for _ in range(3))
    grad = make(rng, (2, 3, 12, 8), np.float64)
    p, seed = 0.4, 17
    keep = torch.from_numpy(reference.dropout_keep((2, 3, 12, 12), p, seed))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    probs = torch.softmax(tq @ tk.transpose(-1, -2) / np.sqrt(8), dim=-1)
    out = (probs * keep / (1 - p)) @ tv
    out.backward(torch.from_numpy(grad))
    want = reference.scaled_dot_product_attention_backward(grad, q, k, v, dropout_p=p,
                                                           rng=seed)
    np.testing.assert_allclose(out.detach().numpy(),
                               reference.scaled_dot_product_attention(q, k, v, None, p,
                                                                      rng=seed), atol=1e-12)
    for w, t in zip(want, (tq, tk, tv)):
        np.testing.assert_allclose(w, t.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("rng_arg", [None, np.random.default_rng(0)])
def test_backward_dropout_needs_the_int_seed(rng_arg):
    q = np.ones((1, 4, 8), np.float32)
    out, lse = sdpa(q, q, q, None, 0.2, rng=1, return_lse=True)
    with pytest.raises(ValueError, match="pass the int seed the forward was given as rng"):
        fastattn.scaled_dot_product_attention_backward(q, q, q, q, out, lse, dropout_p=0.2,
                                                       rng=rng_arg)
