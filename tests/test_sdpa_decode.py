"""scaled_dot_product_attention on the split-KV (decode) kernel against fastattn.reference.

Few query rows per kv-head against many keys run on the paged kernel's core with the
keys and values read in place (fastattn/paged.py ``takes_split_kv``); every option of
the dense entry point holds there, and on both sides of the boundary between the two
kernels.
"""
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import paged, reference
from helpers import assert_close, assert_lse_close

sdpa = fastattn.scaled_dot_product_attention
BF16 = np.dtype(ml_dtypes.bfloat16)


def make(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def compare(q, k, v, mask=None, dtype=np.float32, **kw):
    """Result and lse against the reference (computed from the same, possibly half,
    values in float64)."""
    out, lse = sdpa(q, k, v, mask, return_lse=True, **kw)
    ref_kw = {key: val for key, val in kw.items() if key != "num_threads"}
    wide = [np.asarray(a, np.float64) for a in (q, k, v)]
    ref_out, ref_lse = reference.scaled_dot_product_attention(*wide, mask, return_lse=True,
                                                              **ref_kw)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, np.float64 if dtype == np.float64 else np.float32)
    return out, lse


@pytest.fixture
def route(monkeypatch):
    """route(True): every call takes the split-KV kernel; route(False): none does; the
    returned list records the calls that took it."""
    taken = []
    real = paged.sdpa_split_kv

    def spy(*args, **kwargs):
        taken.append(args[0].out_shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(paged, "sdpa_split_kv", spy)

    def force(split=None):
        if split is not None:
            monkeypatch.setattr(paged, "takes_split_kv", lambda ops: split)
        return taken
    return force


# ---- which kernel ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype,split", [
    # (B, Hq, Hkv, L, S)
    ((8, 32, 8, 1, 4096), np.float32, True),       # GQA decode (issue 20)
    ((1, 32, 8, 16, 100), np.float32, True),       # G * L = 64: the last one
    ((1, 32, 8, 17, 100), np.float32, False),      # G * L = 68
    ((2, 8, 8, 4, 256), np.float32, True),         # MHA, a few rows, many keys
    ((2, 8, 8, 4, 255), np.float32, False),        # MHA, few keys
    ((2, 8, 8, 17, 4096), np.float32, False),      # MHA, L = 17
    ((2, 8, 8, 1, 4096), np.float32, False),       # MHA decode, float32: dense key tiles
    ((2, 8, 8, 1, 4096), np.float16, True),        # ... other dtypes: split-KV
    ((2, 8, 8, 1, 4096), np.float64, True),
])
def test_dispatch(rng, route, shape, dtype, split):
    B, Hq, Hkv, L, S = shape
    taken = route()
    q, k, v = make(rng, (B, Hq, L, 8), dtype), make(rng, (B, Hkv, S, 8), dtype), \
        make(rng, (B, Hkv, S, 8), dtype)
    sdpa(q, k, v, enable_gqa=True)
    assert bool(taken) == split


def test_multi_query_by_broadcasting_shares_the_keys(rng, route):
    # one key/value head broadcast over 8 query heads (no enable_gqa): one kv-head of G = 8
    taken = route()
    q, k, v = make(rng, (2, 8, 2, 16)), make(rng, (2, 1, 300, 16)), make(rng, (2, 1, 300, 16))
    assert paged.kv_group(fastattn.attention._Operands(q, k, v, None, False)) == 8
    compare(q, k, v)
    compare(q, k[:, 0], v[:, 0], enable_gqa=True)       # no head axis at all
    assert len(taken) == 2


# ---- random problems on both sides of the boundary ---------------------------------------

@st.composite
def decode_problems(draw):
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    L = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17]))
    S = draw(st.sampled_from([1, 2, 31, 32, 33, 64, 255, 256, 300, 513, 1100]))
    mask_shape = draw(st.sampled_from([None, (L, S), (1, S), (L, 1), (S,),
                                       ("B", 1, 1, S), ("B", "H", L, S), ("H", 1, S)]))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=Hkv, G=G, L=L, S=S,
        E=draw(st.sampled_from([1, 8, 24, 64, 128])), Ev=draw(st.sampled_from([1, 8, 40, 64])),
        dtype=draw(st.sampled_from([np.float32, np.float64, np.float16, BF16])),
        mask_kind=draw(st.sampled_from(["bool", "float"])), mask_shape=mask_shape,
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        window=draw(st.sampled_from([None, (None, None), (5, 0), (40, None), (0, 3)])),
        softcap=draw(st.sampled_from([None, 2.0])),
        alibi=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "strided", "gqa_flag"])),
        route=draw(st.sampled_from([None, True])),
        threads=draw(st.sampled_from([1, 2, 3])),
        seed=draw(st.integers(0, 2**32 - 1)))


@given(p=decode_problems())
def test_random_decode_problems_match_reference(p):
    rng = np.random.default_rng(p["seed"])
    B, Hkv, G, L, S, E, Ev, dtype = (p[x] for x in ("B", "Hkv", "G", "L", "S", "E", "Ev",
                                                      "dtype"))
    H = Hkv * G
    q = make(rng, (B, H, L, E), dtype)
    if p["layout"] == "strided":
        # keys and values as views of a (B, S, H_kv, 2 E) array, the query reversed over heads
        k = make(rng, (B, S, Hkv, 2 * E), dtype)[..., ::2].transpose(0, 2, 1, 3)
        v = make(rng, (B, S, Hkv, Ev + 3), dtype)[..., 3:].transpose(0, 2, 1, 3)
        q = q[:, ::-1]
    else:
        k, v = make(rng, (B, Hkv, S, E), dtype), make(rng, (B, Hkv, S, Ev), dtype)
    mask = None
    if p["mask_shape"] is not None:
        shape = tuple(B if d == "B" else H if d == "H" else d for d in p["mask_shape"])
        keep = rng.random(shape) > 0.3
        mask = keep if p["mask_kind"] == "bool" else \
            np.where(keep, rng.standard_normal(shape), -np.inf).astype(
                np.float32 if dtype in (np.float16, BF16) else dtype)
    kw = dict(is_causal=p["causal"], causal_alignment=p["alignment"], window=p["window"],
              softcap=p["softcap"], num_threads=p["threads"],
              alibi_slopes=rng.random(H) if p["alibi"] else None)
    target = paged
    with mock.patch.object(target, "takes_split_kv",
                           target.takes_split_kv if p["route"] is None
                           else (lambda ops: True)):
        compare(q, k, v, mask, dtype, enable_gqa=G > 1 or p["layout"] == "gqa_flag", **kw)


# ---- edges -----------------------------------------------------------------------------

@pytest.mark.parametrize("L,S", [(0, 300), (3, 0), (0, 0)])
def test_empty(rng, route, L, S):
    route(True)
    q, k, v = make(rng, (2, 8, L, 16)), make(rng, (2, 2, S, 16)), make(rng, (2, 2, S, 8))
    out, lse = sdpa(q, k, v, enable_gqa=True, return_lse=True)
    assert out.shape == (2, 8, L, 8) and not out.any()
    assert lse.shape == (2, 8, L) and np.isneginf(lse).all()


def test_rows_that_see_nothing(rng, route):
    taken = route()
    # bottom-right causal with L > S: the first L - S rows see no key; a fully masked row
    q, k, v = make(rng, (1, 8, 6, 16)), make(rng, (1, 2, 4, 16)), make(rng, (1, 2, 4, 16))
    out, lse = compare(q, k, v, enable_gqa=True, is_causal=True,
                       causal_alignment="bottom_right")
    assert not out[:, :, :2].any() and np.isneginf(lse[:, :, :2]).all()
    mask = np.ones((6, 4), bool)
    mask[3] = False
    out, lse = compare(q, k, v, mask, enable_gqa=True)
    assert not out[:, :, 3].any() and np.isneginf(lse[:, :, 3]).all()
    assert len(taken) == 2


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_keys_split_across_threads(rng, threads):
    # one sequence, one kv-head: its keys are split over the threads and merged by lse
    q, k, v = make(rng, (1, 4, 1, 64)), make(rng, (1, 1, 5000, 64)), make(rng, (1, 1, 5000, 64))
    compare(q, k, v, enable_gqa=True, num_threads=threads)
    compare(q, k, v, np.arange(5000) % 7 != 0, enable_gqa=True, num_threads=threads,
            window=(1000, None), is_causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_out_argument(rng, route, dtype):
    taken = route()
    q, k, v = make(rng, (2, 8, 1, 32), dtype), make(rng, (2, 2, 300, 32), dtype), \
        make(rng, (2, 2, 300, 32), dtype)
    want = sdpa(q, k, v, enable_gqa=True)
    out = np.empty((2, 8, 1, 32), dtype)
    assert sdpa(q, k, v, enable_gqa=True, out=out) is out
    np.testing.assert_array_equal(out, want)
    merged = np.zeros((2, 1, 8, 64), dtype)                 # (B, L, H, 2 Ev), heads split
    view = merged.transpose(0, 2, 1, 3)[..., ::2]           # no unit last stride: copied
    assert sdpa(q, k, v, enable_gqa=True, out=view) is view
    np.testing.assert_array_equal(view, want)
    assert not merged[..., 1::2].any()
    assert len(taken) == 3


def test_mixed_dtypes(rng, route):
    taken = route()
    q = make(rng, (1, 8, 2, 32), np.float32)
    k, v = make(rng, (1, 2, 400, 32), np.float16), make(rng, (1, 2, 400, 32), BF16)
    out, _ = compare(q, k, v, enable_gqa=True)
    assert out.dtype == np.float32
    out, _ = compare(q.astype(np.float16), k, k, None, np.float16, enable_gqa=True)
    assert out.dtype == np.float16
    assert len(taken) == 2


def test_dropout_runs_on_the_dense_kernel(rng, route):
    taken = route()
    q, k, v = make(rng, (1, 8, 1, 16)), make(rng, (1, 2, 600, 16)), make(rng, (1, 2, 600, 16))
    out = sdpa(q, k, v, None, 0.3, enable_gqa=True, rng=5)
    ref = reference.scaled_dot_product_attention(q, k, v, None, 0.3, enable_gqa=True, rng=5)
    assert_close(out, ref, np.float32)
    assert not taken
    sdpa(q, k, v, None, 0.0, enable_gqa=True, rng=5)        # no dropout: split-KV
    assert taken


def test_nan_reaches_only_its_rows(rng, route):
    route(True)
    q, k, v = make(rng, (1, 4, 2, 8)), make(rng, (1, 2, 300, 8)), make(rng, (1, 2, 300, 8))
    q[0, 1, 0, 0] = np.nan
    out = sdpa(q, k, v, enable_gqa=True)
    assert np.isnan(out[0, 1, 0]).all()
    assert np.isfinite(np.delete(out.reshape(8, 8), 2, axis=0)).all()


def test_layout_caches_are_bounded_and_read_only(rng):
    # per-layout offsets are cached for small batches only, and shared read-only
    from fastattn import _layout
    small = make(rng, (2, 3, 4, 8))
    off = _layout.batch_offsets(small, (2, 3))
    assert off is _layout.batch_offsets(small.copy(), (2, 3))
    with pytest.raises(ValueError):
        off[0] = 1
    before = _layout._cached_offsets.cache_info().currsize
    big = np.zeros((_layout.CACHED_OFFSETS + 1, 1, 1), np.float32)
    np.testing.assert_array_equal(_layout.batch_offsets(big, big.shape[:1]),
                                  np.arange(big.shape[0]))
    assert _layout._cached_offsets.cache_info().currsize == before
    q = make(rng, (_layout.CACHED_OFFSETS + 1, 2, 1, 8))
    k = make(rng, (_layout.CACHED_OFFSETS + 1, 1, 300, 8))
    before = paged._split_layout.cache_info().currsize
    compare(q, k, k, enable_gqa=True)
    assert paged._split_layout.cache_info().currsize == before
