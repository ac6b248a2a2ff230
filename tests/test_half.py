"""float16 and bfloat16 operands, computed in float32, against the float64 reference on
the same rounded inputs."""
import os
import subprocess
import sys
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close, assert_lse_close

BF16 = np.dtype(ml_dtypes.bfloat16)
HALF = [np.dtype(np.float16), BF16]
sdpa = fastattn.scaled_dot_product_attention


def make(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def check(q, k, v, mask=None, **kw):
    dtype = q.dtype
    out, lse = sdpa(q, k, v, mask, return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == np.float32
    ref_out, ref_lse = reference.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
        None if mask is None else (mask if mask.dtype == np.bool_ else mask.astype(np.float64)),
        return_lse=True, **{key: val for key, val in kw.items() if key != "num_threads"})
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, np.float32 if dtype == np.float16 else dtype)
    return out


@st.composite
def problems(draw):
    L = draw(st.integers(1, 150))
    S = draw(st.integers(1, 300))
    return dict(
        dtype=draw(st.sampled_from(HALF)), L=L, S=S,
        E=draw(st.sampled_from([1, 7, 16, 32, 64, 80, 128])),
        Ev=draw(st.sampled_from([1, 5, 16, 48, 64, 80])),
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)),
        mask_kind=draw(st.sampled_from(["none", "bool", "float32", "half"])),
        mask_shape=draw(st.sampled_from([(L, S), (1, S), (L, 1), (2, 1, L, S)])),
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        seed=draw(st.integers(0, 2**32 - 1)),
        tiles=draw(st.sampled_from([None, (8, 16), (5, 7), (64, 32), (32, 64)])))


@given(p=problems())
def test_random_shapes_match_reference(p):
    import fastattn.attention as attention
    rng = np.random.default_rng(p["seed"])
    B, H, L, S, E, Ev = (p[x] for x in ("B", "H", "L", "S", "E", "Ev"))
    q, k, v = (make(rng, shape, p["dtype"]) for shape in
               ((B, H, L, E), (B, H, S, E), (B, H, S, Ev)))
    mask = None
    if p["mask_kind"] == "bool":
        mask = rng.random(p["mask_shape"]) > 0.3
    elif p["mask_kind"] != "none":
        mdt = np.float32 if p["mask_kind"] == "float32" else p["dtype"]
        mask = np.where(rng.random(p["mask_shape"]) > 0.3,
                        rng.standard_normal(p["mask_shape"]), -np.inf).astype(mdt)
    tiles = p["tiles"] or (attention.BLOCK_Q, attention.BLOCK_K)
    with mock.patch.object(attention, "BLOCK_Q", tiles[0]), \
            mock.patch.object(attention, "BLOCK_K", tiles[1]):
        check(q, k, v, mask, is_causal=p["causal"], causal_alignment=p["alignment"])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 700), (300, 333), (513, 257), (256, 512)])
def test_lengths_and_tiles(rng, dtype, L, S):
    q, k, v = make(rng, (2, L, 64), dtype), make(rng, (2, S, 64), dtype), \
        make(rng, (2, S, 64), dtype)
    for causal in (False, True):
        check(q, k, v, is_causal=causal, causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", HALF)
def test_gqa_and_fully_masked_rows(rng, dtype):
    q = make(rng, (2, 8, 40, 32), dtype)
    k, v = make(rng, (2, 2, 90, 32), dtype), make(rng, (2, 2, 90, 32), dtype)
    mask = rng.random((40, 90)) > 0.5
    mask[7] = False
    out = check(q, k, v, mask, enable_gqa=True)
    assert not np.any(out[..., 7, :].astype(np.float32))


@pytest.mark.parametrize("dtype", HALF)
def test_no_overflow_from_large_float16_scores(dtype):
    # q . k = 64 * 300^2 overflows float16 (65504); the scores are float32 inside
    q = np.full((1, 16, 64), 300, dtype)
    k = np.full((1, 16, 64), 300, dtype)
    v = np.ones((1, 16, 8), dtype)
    out = sdpa(q, k, v)
    assert np.all(np.isfinite(out.astype(np.float32)))
    np.testing.assert_array_equal(out.astype(np.float32), 1.0)


@pytest.mark.parametrize("dtype", HALF)
def test_out_of_half_dtype(rng, dtype):
    q, k, v = (make(rng, (3, 50, 16), dtype) for _ in range(3))
    want = sdpa(q, k, v)
    buf = np.empty((3, 50, 16), dtype)
    assert sdpa(q, k, v, out=buf) is buf
    np.testing.assert_array_equal(buf.view(np.uint16), want.view(np.uint16))
    strided = np.empty((50, 3, 20), dtype)[..., :16].swapaxes(0, 1)
    sdpa(q, k, v, out=strided)
    np.testing.assert_array_equal(strided.view(np.uint16), want.view(np.uint16))
    with pytest.raises(TypeError):
        sdpa(q, k, v, out=np.empty((3, 50, 16), np.float32))


@pytest.mark.parametrize("dtypes,expected", [
    ((BF16,) * 3, BF16), ((np.float16,) * 3, np.float16),
    ((BF16, np.float32, BF16), np.float32), ((BF16, np.float16, BF16), np.float32),
    ((BF16, BF16, np.float64), np.float64),
])
def test_promotion(rng, dtypes, expected):
    q, k, v = (make(rng, (2, 9, 16), d) for d in dtypes)
    out = sdpa(q, k, v)
    assert out.dtype == expected


def test_bad_inputs_name_bfloat16(rng):
    q = make(rng, (4, 8), BF16)
    with pytest.raises(TypeError, match="bfloat16"):
        sdpa(q, q, np.ones((4, 8), np.complex64))
    with pytest.raises(ValueError, match="same feature size"):
        sdpa(q, make(rng, (4, 9), BF16), q)


def test_results_identical_for_every_thread_count(rng):
    q, k, v = (make(rng, (2, 4, 300, 64), BF16) for _ in range(3))
    want = sdpa(q, k, v, is_causal=True, num_threads=1)
    for n in range(2, 9):
        got = sdpa(q, k, v, is_causal=True, num_threads=n)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_accumulation_is_float32_at_16k(rng):
    # 16384 keys of equal weight: a float16 or bfloat16 running sum would stall long
    # before the end (2048 + 1 == 2048 in float16); float32 accumulation gets the mean.
    L = S = 16384
    q = np.zeros((1, 1, 16), BF16)
    k = make(rng, (1, S, 16), BF16)
    v = (np.arange(S, dtype=np.float64) % 7 - 3)[None, :, None].repeat(16, -1).astype(BF16)
    out = sdpa(q, k, v)
    want = float(np.mean(v.astype(np.float64)[0, :, 0]))
    assert abs(float(out.astype(np.float32)[0, 0, 0]) - want) <= 1e-2 * 3
    q2, k2, v2 = (make(rng, (1, 1, n, 64), np.float16) for n in (L, S, S))
    check(q2[:, :, :1024], k2, v2, is_causal=True, causal_alignment="bottom_right")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subprocess env test")
def test_forced_widening_fallback_matches_reference():
    # FASTATTN_HALF_FALLBACK=1: bfloat16 tiles are widened to float32 instead of being
    # multiplied with vdpbf16ps (the path of CPUs without AVX512_BF16)
    code = r"""
import numpy as np, ml_dtypes, fastattn
from fastattn import reference
rng = np.random.default_rng(0)
bf = ml_dtypes.bfloat16
for L, S, causal in [(300, 333, False), (513, 700, True), (1, 90, False)]:
    q, k, v = (rng.standard_normal((2, n, 64)).astype(bf) for n in (L, S, S))
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref = reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)),
                                                 is_causal=causal)
    err = np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert out.dtype == bf and err <= 1e-2, err
print("ok")
"""
    env = dict(os.environ, FASTATTN_HALF_FALLBACK="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@st.composite
def sparse_problems(draw):
    return dict(
        dtype=draw(st.sampled_from(HALF)), L=draw(st.integers(1, 300)),
        S=draw(st.integers(1, 300)), E=draw(st.sampled_from([1, 7, 16, 64, 80])),
        Ev=draw(st.sampled_from([1, 5, 16, 48, 64])), H=draw(st.integers(1, 3)),
        block=draw(st.sampled_from([(16, 16), (32, 64), (64, 64), (5, 7)])),
        window=draw(st.sampled_from([(8, 0), (40, 40), (200, 3), (0, 0)])),
        seed=draw(st.integers(0, 2**32 - 1)))


@given(p=sparse_problems())
def test_block_sparse_random_shapes_match_reference(p):
    # the block-sparse engine reads half operands through the same TileOperands as the
    # dense kernel: ragged blocks, element rules, key-major and row-major tiles
    rng = np.random.default_rng(p["seed"])
    H, L, S, E, Ev = (p[x] for x in ("H", "L", "S", "E", "Ev"))
    q, k, v = (make(rng, shape, p["dtype"]) for shape in
               ((H, L, E), (H, S, E), (H, S, Ev)))
    layout = fastattn.BlockLayout.from_rule((L, S), p["block"], window=p["window"])
    out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    assert out.dtype == p["dtype"] and lse.dtype == np.float32
    ref_out, ref_lse = reference.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), layout.to_mask(),
        return_lse=True)
    assert_close(out, ref_out, p["dtype"])
    assert_lse_close(lse, ref_lse, np.float32 if p["dtype"] == np.float16 else p["dtype"])
