"""scaled_dot_product_attention against fastattn.reference (float64, unfused)."""
import threading
import time
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close, assert_lse_close

sdpa = fastattn.scaled_dot_product_attention
FEATURES = [1, 8, 32, 64, 80, 128, 256]


def make(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def check(q, k, v, mask=None, dtype=np.float32, **kw):
    out, lse = sdpa(q, k, v, mask, return_lse=True, **kw)
    ref_kw = {key: val for key, val in kw.items() if key not in ("num_threads",)}
    ref_out, ref_lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True,
                                                              **ref_kw)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    return out, lse


# ---- random shapes ----------------------------------------------------------------------

@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    L = draw(st.integers(1, 150))
    S = draw(st.integers(1, 300))
    E = draw(st.sampled_from(FEATURES))
    Ev = draw(st.sampled_from([1, 5, 16, 48, 64, 80]))
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask_shape = draw(st.sampled_from([(L, S), (1, S), (L, 1), (B, 1, L, S), (H, L, S),
                                       (B, H, 1, S)]))
    return dict(dtype=dtype, L=L, S=S, E=E, Ev=Ev, B=B, H=H, mask_kind=mask_kind,
                mask_shape=mask_shape, causal=draw(st.booleans()),
                alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
                seed=draw(st.integers(0, 2**32 - 1)),
                tiles=draw(st.sampled_from([None, (8, 16), (5, 7), (64, 32)])))


@given(p=problems())
def test_random_shapes_match_reference(p):
    import fastattn.attention as attention
    tiles = p["tiles"] or (attention.BLOCK_Q, attention.BLOCK_K)
    with mock.patch.object(attention, "BLOCK_Q", tiles[0]), \
            mock.patch.object(attention, "BLOCK_K", tiles[1]):
        _check_problem(p)


def _check_problem(p):
    rng = np.random.default_rng(p["seed"])
    B, H, L, S, E, Ev = (p[x] for x in ("B", "H", "L", "S", "E", "Ev"))
    q = make(rng, (B, H, L, E), p["dtype"])
    k = make(rng, (B, H, S, E), p["dtype"])
    v = make(rng, (B, H, S, Ev), p["dtype"])
    mask = None
    if p["mask_kind"] == "bool":
        mask = rng.random(p["mask_shape"]) > 0.3
    elif p["mask_kind"] == "float":
        mask = np.where(rng.random(p["mask_shape"]) > 0.3,
                        rng.standard_normal(p["mask_shape"]), -np.inf).astype(p["dtype"])
    check(q, k, v, mask, p["dtype"], is_causal=p["causal"], causal_alignment=p["alignment"])


@pytest.mark.parametrize("E", FEATURES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_sizes(rng, E, dtype):
    q, k, v = make(rng, (2, 70, E), dtype), make(rng, (2, 300, E), dtype), make(rng, (2, 300, 24), dtype)
    check(q, k, v, dtype=dtype)
    check(q, k, v, dtype=dtype, is_causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("L,S", [(1, 1), (1, 4096), (4096 + 3, 1), (1, 257), (257, 1), (65, 513)])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_lengths(rng, L, S, causal):
    q, k, v = make(rng, (1, L, 16)), make(rng, (1, S, 16)), make(rng, (1, S, 8))
    check(q, k, v, is_causal=causal, causal_alignment="bottom_right")
    check(q, k, v, is_causal=causal)


@pytest.mark.parametrize("ev", [16, 48, 64, 80, 128])
def test_tile_micro_kernel_edges(rng, small_tiles, ev):
    # float32 tiles with ev % 16 == 0 run on tilegemm.h: register blocks of 8 rows x 32
    # keys (scores) and 4 rows x 64 values (p @ v), a dot-product path below 16 rows, and
    # partial vectors at every edge. Whole problems as single tiles hit each edge exactly.
    for rows, cols, e in [(1, 1, 1), (1, 17, 64), (7, 33, 3), (8, 32, 16), (9, 31, 17),
                          (15, 16, 64), (16, 15, 80), (17, 47, 64), (33, 100, 8),
                          (64, 256, 64), (70, 257, 128)]:
        small_tiles(rows, cols)
        q = make(rng, (2, rows, 2 * e))[..., ::2]          # row stride != e
        k = make(rng, (2, cols, e))
        v = make(rng, (2, cols, ev + 16))[..., 16:]          # unaligned start, stride != ev
        check(q, k, v)
        check(q, k, v, is_causal=True)


def test_independent_of_tiles_and_threads(rng, small_tiles):
    q, k, v = make(rng, (3, 2, 100, 32), np.float64), make(rng, (3, 2, 90, 32), np.float64), \
        make(rng, (3, 2, 90, 16), np.float64)
    mask = rng.random((100, 90)) > 0.5
    base = sdpa(q, k, v, mask, is_causal=True, num_threads=1)
    for tiles in [(1, 1), (3, 200), (100, 90), (7, 11)]:
        small_tiles(*tiles)
        for threads in (1, 2, 3):
            np.testing.assert_allclose(sdpa(q, k, v, mask, is_causal=True, num_threads=threads),
                                       base, rtol=1e-12, atol=1e-13)


def test_decode_split_keys(rng):
    # one query against a long cache: the keys are split across threads and merged by lse
    q, k, v = make(rng, (1, 1, 1, 64)), make(rng, (1, 1, 8192, 64)), make(rng, (1, 1, 8192, 64))
    for threads in (1, 2, 8):
        check(q, k, v, num_threads=threads)
        check(q, k, v, is_causal=True, causal_alignment="bottom_right", num_threads=threads)


# ---- masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (1,), (9,), (7, 1), (1, 9), (7, 9), (2, 1, 7, 9),
                                   (1, 3, 1, 9), (3, 7, 9), (2, 3, 7, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_shapes(rng, shape, kind):
    q, k, v = make(rng, (2, 3, 7, 8)), make(rng, (2, 3, 9, 8)), make(rng, (2, 3, 9, 4))
    mask = rng.random(shape) > 0.4 if kind == "bool" else rng.standard_normal(shape)
    check(q, k, v, mask)


def test_mask_extends_batch(rng):
    # a mask with more leading dims than q/k/v broadcasts the output, like the formula
    q, k, v = make(rng, (5, 8)), make(rng, (6, 8)), make(rng, (6, 3))
    mask = rng.random((4, 5, 6)) > 0.3
    out, _ = check(q, k, v, mask)
    assert out.shape == (4, 5, 3)


def test_fully_masked_rows_give_zero(rng):
    q, k, v = make(rng, (2, 40, 16)), make(rng, (2, 300, 16)), make(rng, (2, 300, 16))
    mask = rng.random((2, 40, 300)) > 0.5
    mask[0, 3] = False
    mask[1, :] = False
    fmask = np.where(mask, 0.0, -np.inf)
    for m in (mask, fmask):
        out, lse = check(q, k, v, m)
        assert not np.isnan(out).any()
        assert np.all(out[0, 3] == 0) and np.all(out[1] == 0)
        assert np.isneginf(lse[0, 3]) and np.isneginf(lse[1]).all()


def test_causal_rows_before_the_keys_are_empty(rng):
    # bottom-right with L > S: the first L - S queries see no key
    q, k, v = make(rng, (10, 8)), make(rng, (4, 8)), make(rng, (4, 8))
    out, lse = check(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert np.all(out[:5] == 0) and np.isneginf(lse[:5]).all() and np.isfinite(lse[6:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_whose_max_underflows_is_dropped(rng, dtype):
    # A large finite mask (-1e5, HF style) on the first key tile: when a later tile raises
    # the running max by that much, exp(old - new) underflows to 0 and the earlier tile's
    # accumulated values must be dropped with it (one thread: no key-split merge).
    q, k, v = make(rng, (600, 8), dtype), make(rng, (512, 8), dtype), make(rng, (512, 4), dtype)
    mask = np.zeros((600, 512), dtype)
    mask[:, :256] = -1e5
    for threads in (1, 2):
        check(q, k, v, mask, dtype, num_threads=threads)


def test_mask_and_causal_combine(rng):
    q, k, v = make(rng, (1, 2, 33, 8)), make(rng, (1, 2, 33, 8)), make(rng, (1, 2, 33, 8))
    mask = rng.random((1, 1, 33, 33)) > 0.5
    check(q, k, v, mask, is_causal=True)
    check(q, k, v, np.where(mask, 0.5, -np.inf), is_causal=True, causal_alignment="bottom_right")


def test_zero_keys(rng):
    q, k, v = make(rng, (3, 4)), make(rng, (0, 4)), make(rng, (0, 5))
    out, lse = sdpa(q, k, v, return_lse=True)
    assert out.shape == (3, 5) and np.all(out == 0) and np.isneginf(lse).all()
    out = sdpa(make(rng, (0, 4)), make(rng, (6, 4)), make(rng, (6, 5)))
    assert out.shape == (0, 5)


# ---- layouts ------------------------------------------------------------------------------

def test_non_contiguous_inputs(rng):
    B, L, H, E = 2, 37, 4, 16
    qkv = make(rng, (B, L, 3, H, E), np.float64)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, H, L, E) views
    assert not q.flags.c_contiguous
    check(q, k, v, dtype=np.float64, is_causal=True)
    check(q[:, ::-1], k[:, :, ::-1], v[:, :, ::-1], dtype=np.float64)   # negative strides
    check(q[..., ::2], k[..., ::2], v, dtype=np.float64)               # strided last axis
    check(np.asfortranarray(q[0, 0]), np.asfortranarray(k[0, 0]), v[0, 0], dtype=np.float64)
    mask = (rng.random((L, L)) > 0.5).T                                 # transposed mask
    check(q, k, v, mask, dtype=np.float64)


def test_read_only_and_broadcast_inputs(rng):
    q = make(rng, (7, 8))
    k = np.broadcast_to(make(rng, (1, 9, 8)), (3, 9, 8))
    v = make(rng, (3, 9, 8))
    q.flags.writeable = False
    check(q, k, v)


def test_gqa(rng):
    q = make(rng, (2, 8, 20, 16))
    k, v = make(rng, (2, 2, 30, 16)), make(rng, (2, 2, 30, 12))
    out, _ = check(q, k, v, enable_gqa=True, is_causal=True)
    # query head h reads kv head h // 4
    ref = sdpa(q[:, 5:6], k[:, 1:2], v[:, 1:2], is_causal=True)
    np.testing.assert_allclose(out[:, 5:6], ref, rtol=1e-6)
    check(q, k[:, :1], v[:, :1], enable_gqa=True)         # multi-query
    with pytest.raises(ValueError, match="divide"):
        sdpa(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1), enable_gqa=True)
    with pytest.raises(ValueError, match="broadcast"):
        sdpa(q, k, v)                                      # without enable_gqa


# ---- dtypes, out=, return values ----------------------------------------------------------

@pytest.mark.parametrize("dtypes,expected", [
    ((np.float32,) * 3, np.float32), ((np.float64,) * 3, np.float64),
    ((np.float16,) * 3, np.float16), ((np.float32, np.float64, np.float32), np.float64),
    ((np.int64,) * 3, np.float64), ((np.int32, np.float32, np.float32), np.float64),
    ((np.float16, np.float32, np.float16), np.float32),
])
def test_dtype_promotion(rng, dtypes, expected):
    q, k, v = (rng.integers(-3, 4, (5, 6, 8)).astype(d) for d in dtypes)
    out = sdpa(q, k, v)
    assert out.dtype == expected
    ref = reference.scaled_dot_product_attention(q, k, v)
    assert_close(out, ref, expected)


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, object, "U3"])
def test_bad_dtypes(dtype):
    q = np.ones((3, 4)).astype(dtype)
    with pytest.raises(TypeError):
        sdpa(q, np.ones((3, 4)), np.ones((3, 4)))


def test_out_argument(rng):
    q, k, v = make(rng, (2, 5, 8)), make(rng, (2, 6, 8)), make(rng, (2, 6, 3))
    out = np.full((2, 5, 3), np.nan, np.float32)
    res = sdpa(q, k, v, out=out)
    assert res is out
    np.testing.assert_allclose(out, sdpa(q, k, v), rtol=1e-6)
    out16 = np.empty((2, 5, 3), np.float16)
    assert sdpa(q.astype(np.float16), k, v.astype(np.float16), out=np.empty((2, 5, 3), np.float32)).dtype == np.float32
    assert sdpa(*(a.astype(np.float16) for a in (q, k, v)), out=out16) is out16
    with pytest.raises(ValueError, match="shape"):
        sdpa(q, k, v, out=np.empty((2, 5, 4), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        sdpa(q, k, v, out=np.empty((2, 5, 3), np.float64))
    read_only = np.empty((2, 5, 3), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        sdpa(q, k, v, out=read_only)
    # out aliasing an input: computed as if the input were copied first
    vq = make(rng, (4, 8))
    expected = sdpa(vq, vq, vq)
    np.testing.assert_allclose(sdpa(vq, vq, vq, out=vq), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_out_is_written_in_place(rng, dtype):
    # out with a contiguous last axis and any other strides: the kernel writes straight
    # into it (no temporary); everything around the view is left alone
    B, H, L, S, D = 2, 3, 37, 45, 16
    q, k, v = make(rng, (B, H, L, D), dtype), make(rng, (B, H, S, D), dtype), \
        make(rng, (B, H, S, D), dtype)
    want = sdpa(q, k, v)
    merged = np.full((B, L, H * D + 5), np.nan, dtype)           # padded rows
    heads = fastattn.split_heads(merged[..., :H * D], H)         # (B, H, L, D) view
    from fastattn import attention
    kernel = mock.Mock(wraps=attention._dense.sdpa)
    with mock.patch.object(attention._dense, "sdpa", kernel):
        assert sdpa(q, k, v, out=heads) is heads
    assert kernel.call_args.args[0].arrays[3] is heads
    np.testing.assert_allclose(heads, want, rtol=1e-6)
    assert np.isnan(merged[..., H * D:]).all()
    # batch axes swapped, batch axis reversed (negative offsets); split keys (decoding)
    # and causal with lse
    for view in (np.empty((H, B, L, D), dtype).swapaxes(0, 1),
                 np.empty((B, H, L, D), dtype)[::-1]):
        with mock.patch.object(attention._dense, "sdpa", kernel):
            sdpa(q, k, v, out=view)
        assert kernel.call_args.args[0].arrays[3] is view
        np.testing.assert_allclose(view, want, rtol=1e-6)
    dq, dk, dv = make(rng, (2, 1, D), dtype), make(rng, (2, 4096, D), dtype), \
        make(rng, (2, 4096, D), dtype)
    dec = np.zeros((1, 2, 2 * D), dtype)[0].reshape(2, 1, 2 * D)[..., D:]
    sdpa(dq, dk, dv, out=dec, num_threads=2)
    np.testing.assert_allclose(dec, sdpa(dq, dk, dv), rtol=1e-6)
    res, lse = sdpa(q, k, v, is_causal=True, return_lse=True, out=heads)
    want_c, want_lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    np.testing.assert_allclose(heads, want_c, rtol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)


def test_out_without_unit_last_stride_is_filled_by_copy(rng):
    q, k, v = make(rng, (2, 5, 8)), make(rng, (2, 6, 8)), make(rng, (2, 6, 3))
    want = sdpa(q, k, v)
    for out in (np.empty((2, 3, 5), np.float32).transpose(0, 2, 1),     # columns strided
                np.empty((2, 5, 6), np.float32)[..., ::2],
                np.empty((2, 5, 3), np.float32)[:, ::-1],                # rows reversed
                np.lib.stride_tricks.as_strided(np.empty(40, np.float32), (2, 5, 3),
                                                (4, 4, 4))):           # rows overlap
        assert sdpa(q, k, v, out=out) is out
        if not np.shares_memory(out[0, 0], out[0, 1]):
            np.testing.assert_allclose(out, want, rtol=1e-6)
    from fastattn.attention import _kernel_writable
    assert not _kernel_writable(np.lib.stride_tricks.as_strided(
        np.empty(40, np.float32), (2, 5, 3), (4, 12, 4)))
    assert _kernel_writable(fastattn.split_heads(np.empty((2, 5, 12), np.float32), 4))


def test_scale(rng):
    q, k, v = make(rng, (5, 8), np.float64), make(rng, (6, 8), np.float64), make(rng, (6, 3), np.float64)
    check(q, k, v, dtype=np.float64, scale=0.3)
    check(q, k, v, dtype=np.float64, scale=-2)
    check(q, k, v, dtype=np.float64, scale=0)


def test_nan_input_propagates(rng):
    q, k, v = make(rng, (3, 4)), make(rng, (5, 4)), make(rng, (5, 2))
    q[1, 0] = np.nan
    out = sdpa(q, k, v)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("shapes,match", [
    (((3, 4), (5, 6), (5, 2)), "feature size"),
    (((3, 4), (5, 4), (6, 2)), "same number of rows"),
    (((2, 3, 4), (3, 5, 4), (3, 5, 2)), "broadcast"),
    (((4,), (5, 4), (5, 2)), "at least 2 dimensions"),
    (((3, 0), (5, 0), (5, 2)), "E = 0"),
])
def test_bad_shapes(shapes, match):
    q, k, v = (np.ones(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        sdpa(q, k, v)


def test_bad_masks_and_options():
    q = k = v = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa(q, k, v, np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="broadcast"):
        sdpa(q, k, v, np.ones((5, 3, 3), bool))
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, v, np.ones((3, 3), np.int64))
    with pytest.raises(ValueError, match="'cpu'"):
        sdpa(q, k, v, device="gpu")
    with pytest.raises(ValueError, match="causal_alignment"):
        sdpa(q, k, v, is_causal=True, causal_alignment="diagonal")
    with pytest.raises(ValueError, match="num_threads"):
        sdpa(q, k, v, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        sdpa(q, k, v, num_threads=1.5)
    with pytest.raises(ValueError, match="finite"):
        sdpa(q, k, v, scale=np.inf)
    with pytest.raises(TypeError, match="scale"):
        sdpa(q, k, v, scale="big")
    with pytest.raises(TypeError, match="NumPy array"):
        sdpa(q, k, v, out=[[0.0]])


# ---- resources ----------------------------------------------------------------------------

def test_long_sequence_memory_is_tiles_not_scores(rng):
    # L = S = 8192: the score matrix alone would be 256 MiB; allocations traced by NumPy
    # must stay near the inputs and output (the kernel's own tiles are a few hundred KiB).
    L, E = 8192, 64
    q, k, v = (make(rng, (1, L, E)) for _ in range(3))
    tracemalloc.start()
    out = sdpa(q, k, v, is_causal=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * out.nbytes + (1 << 20)
    ref_rows = reference.scaled_dot_product_attention(q[:, -3:], k, v)  # last rows see all keys
    assert_close(out[:, -1:], ref_rows[:, -1:], np.float32)


def test_gil_is_released(rng):
    q, k, v = (make(rng, (1, 4, 2048, 64)) for _ in range(3))
    done = threading.Event()
    ticks = 0

    def work():
        for _ in range(3):
            sdpa(q, k, v, num_threads=1)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks > 10   # the main thread kept running while the kernel worked


def test_python_constants_come_from_the_compiled_core():
    from fastattn import _layout
    from fastattn._kernels import plan
    assert set(plan.CONSTANTS) == {"MASK_NONE", "MASK_BOOL", "MASK_FLOAT",
                                   "BLOCK_SKIP", "BLOCK_MASKED", "BLOCK_FULL"}
    for name in ("MASK_BOOL", "MASK_FLOAT", "BLOCK_SKIP", "BLOCK_MASKED", "BLOCK_FULL"):
        assert getattr(_layout, name) == plan.CONSTANTS[name], name


def test_num_threads_setting():
    fastattn.set_num_threads(3)
    try:
        assert fastattn.get_num_threads() == 3
    finally:
        fastattn.set_num_threads(None)
    assert fastattn.get_num_threads() >= 1
    with pytest.raises(ValueError):
        fastattn.set_num_threads(0)
