"""fastattn.dask: attention over dask arrays against fastattn.reference.

Most tests run on Dask's synchronous scheduler; the cluster tests at the end run on
a ``distributed.LocalCluster`` of 2 worker processes (one of them killed mid-graph).
"""
import importlib
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import fastattn  # noqa: E402
import fastattn.dask as fd  # noqa: E402
from fastattn import reference  # noqa: E402

SYNC = dict(scheduler="sync")


def _chunked(x, chunks):
    return da.from_array(x, chunks=chunks)


def _compute(*arrays):
    return dask.compute(*arrays, **SYNC)


def _assert_close(got, want, atol=1e-10, rtol=1e-9):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, atol=atol, rtol=rtol)


def _assert_lse(got, want):
    assert (np.isneginf(got) == np.isneginf(want)).all()
    finite = np.isfinite(want)
    _assert_close(got[finite], want[finite])


def _qkv(rng, B, Hq, L, S, E=8, Ev=6, Hkv=None, dtype=np.float64):
    Hkv = Hq if Hkv is None else Hkv
    return (rng.standard_normal((B, Hq, L, E)).astype(dtype),
            rng.standard_normal((B, Hkv, S, E)).astype(dtype),
            rng.standard_normal((B, Hkv, S, Ev)).astype(dtype))


def _graph(x):
    return dict(x.__dask_graph__())


def _tasks_named(x, part):
    return [k for k in _graph(x) if isinstance(k, tuple) and part in k[0]]


# ---- scaled_dot_product_attention: chunkings ---------------------------------------

# (batch, heads, query length, key length) chunks of (B=2, H=4, L=40, S=36)
CHUNKINGS = {
    "none": ((2, 4, 40), (2, 4, 36)),
    "batch": ((1, 4, 40), (1, 4, 36)),
    "heads": ((2, 1, 40), (2, 1, 36)),
    "query": ((2, 4, 9), (2, 4, 36)),
    "key": ((2, 4, 40), (2, 4, 7)),
    "all": ((1, 3, 11), (1, 3, 10)),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_chunkings_match_reference(rng, chunking, causal):
    q, k, v = _qkv(rng, 2, 4, 40, 36)
    qc, kc = CHUNKINGS[chunking]
    out, lse = fd.scaled_dot_product_attention(
        _chunked(q, qc + (8,)), _chunked(k, kc + (8,)), _chunked(v, kc + (6,)),
        is_causal=causal, return_lse=True)
    assert out.chunks[:3] == _chunked(q, qc + (8,)).chunks[:3]
    got, got_lse = _compute(out, lse)
    want, want_lse = reference.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                            return_lse=True)
    _assert_close(got, want)
    _assert_lse(got_lse, want_lse)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L, S, q_chunk, k_chunk", [
    (32, 32, 8, 8),      # chunk boundaries on the diagonal
    (32, 32, 8, 5),      # off it
    (32, 32, 6, 10),
    (20, 45, 7, 9),      # L < S: the bottom-right diagonal is shifted by 25
    (45, 20, 8, 6),      # L > S: rows with no key at all (bottom_right) or all (top_left)
    (1, 40, 1, 7),       # decoding
])
def test_causal_alignments_and_diagonal_chunks(rng, alignment, L, S, q_chunk, k_chunk):
    q, k, v = _qkv(rng, 1, 2, L, S)
    out, lse = fd.scaled_dot_product_attention(
        _chunked(q, (1, 2, q_chunk, 8)), _chunked(k, (1, 2, k_chunk, 8)), v,
        is_causal=True, causal_alignment=alignment, return_lse=True, split_every=2)
    got, got_lse = _compute(out, lse)
    want, want_lse = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, causal_alignment=alignment, return_lse=True)
    _assert_close(got, want)
    _assert_lse(got_lse, want_lse)


def _visible_pairs(L, S, q_chunk, k_chunk, diagonal):
    # (query chunk, key chunk) pairs with at least one query i, key j <= i + diagonal
    pairs = 0
    for a in range(0, L, q_chunk):
        b = min(a + q_chunk, L)
        pairs += sum(1 for c in range(0, S, k_chunk) if c <= b - 1 + diagonal)
    return pairs


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_causal_graph_leaves_out_chunks_above_the_diagonal(rng, alignment):
    L, S, qc, kc = 64, 96, 16, 8
    q, k, v = _qkv(rng, 1, 1, L, S)
    out = fd.scaled_dot_product_attention(_chunked(q, (1, 1, qc, 8)), _chunked(k, (1, 1, kc, 8)),
                                          _chunked(v, (1, 1, kc, 6)), is_causal=True,
                                          causal_alignment=alignment)
    diagonal = 0 if alignment == "top_left" else S - L
    partials = _tasks_named(out, "fastattn-sdpa-partial")
    assert len(partials) == _visible_pairs(L, S, qc, kc, diagonal)
    assert len(partials) < (L // qc) * (S // kc)
    _assert_close(_compute(out)[0], reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, causal_alignment=alignment))


@pytest.mark.parametrize("split_every", [2, 3, 4])
def test_key_chunks_merge_in_a_tree(rng, split_every):
    q, k, v = _qkv(rng, 1, 1, 16, 64)
    dk, dv = _chunked(k, (1, 1, 4, 8)), _chunked(v, (1, 1, 4, 6))
    out = fd.scaled_dot_product_attention(_chunked(q, (1, 1, 8, 8)), dk, dv,
                                          split_every=split_every)
    graph = _graph(out)
    deps = {key: dask.core.get_dependencies(graph, key) for key in graph}
    key_chunks = {key for key in graph if key[0] == dk.name}
    for key, d in deps.items():
        if "fastattn-sdpa" in key[0]:
            # no task reads more than one key chunk or merges more than split_every partials
            assert len(d & key_chunks) <= 1
            assert len(d) <= max(split_every, 3)
    merges = [key for key in graph if "fastattn-sdpa-merge" in key[0]]
    assert merges, "16 key chunks must need intermediate merges"
    _assert_close(_compute(out)[0], reference.scaled_dot_product_attention(q, k, v))


# ---- masks ---------------------------------------------------------------------------

def _masks(rng, L, S):
    bool_full = rng.random((2, 3, L, S)) > 0.3
    bool_full[..., 5, :] = False                             # a fully masked row
    float_rows = np.where(rng.random((2, 1, L, 1)) > 0.2, 0.0, -np.inf)
    return {
        "bool (B, H, L, S)": bool_full,
        "bool (L, S)": rng.random((L, S)) > 0.5,
        "bool (H, 1, S)": rng.random((3, 1, S)) > 0.5,
        "bool (S,)": rng.random(S) > 0.2,
        "bool scalar": np.array(True),
        "float (L, S)": rng.standard_normal((L, S)),
        "float (B, 1, L, 1) with -inf rows": float_rows,
        "float32 (1, 1, 1, S)": rng.standard_normal((1, 1, 1, S)).astype(np.float32),
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", list(_masks(np.random.default_rng(0), 8, 8)))
def test_masks_chunked_like_the_scores(rng, kind, causal):
    L, S = 30, 26
    q, k, v = _qkv(rng, 2, 3, L, S)
    mask = _masks(rng, L, S)[kind]
    # the mask's own chunks are deliberately unlike the query's and key's
    dmask = da.from_array(mask, chunks=tuple(max(1, n // 2) for n in mask.shape)) \
        if mask.ndim else mask
    out, lse = fd.scaled_dot_product_attention(
        _chunked(q, (1, 2, 8, 8)), _chunked(k, (2, 1, 7, 8)), _chunked(v, (1, 3, 13, 6)),
        dmask, is_causal=causal, causal_alignment="bottom_right", return_lse=True)
    got, got_lse = _compute(out, lse)
    want, want_lse = reference.scaled_dot_product_attention(
        q, k, v, mask, is_causal=causal, causal_alignment="bottom_right", return_lse=True)
    _assert_close(got, want)
    _assert_lse(got_lse, want_lse)


def test_broadcast_mask_stays_broadcast(rng):
    q, k, v = _qkv(rng, 2, 4, 32, 32)
    mask = da.from_array(rng.random((32, 32)) > 0.5, chunks=(8, 8))
    out = fd.scaled_dot_product_attention(_chunked(q, (1, 1, 8, 8)), _chunked(k, (1, 1, 8, 8)),
                                          _chunked(v, (1, 1, 8, 6)), mask)
    graph = _graph(out)
    # the (L, S) mask is read as its own 16 blocks: nothing expands it over B and H
    mask_keys = {key for key in graph if key[0] == mask.name}
    assert len(mask_keys) == 16
    assert not [key for key in graph if "rechunk" in str(key[0]) or "broadcast" in str(key[0])]


def test_fully_masked_rows_give_zeros_and_minus_inf(rng):
    q, k, v = _qkv(rng, 1, 1, 12, 20)
    mask = np.ones((12, 20), dtype=bool)
    mask[3] = False
    mask[7, :10] = False                 # masked in the first key chunk only
    out, lse = fd.scaled_dot_product_attention(
        _chunked(q, (1, 1, 4, 8)), _chunked(k, (1, 1, 10, 8)), _chunked(v, (1, 1, 10, 6)),
        mask, return_lse=True)
    got, got_lse = _compute(out, lse)
    assert (got[0, 0, 3] == 0).all() and np.isneginf(got_lse[0, 0, 3])
    want, want_lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    _assert_close(got, want)
    _assert_lse(got_lse, want_lse)


# ---- GQA, dtypes, empty shapes, NumPy inputs -------------------------------------------

@pytest.mark.parametrize("head_chunks", [(8,), (4, 4), (3, 5), (2, 2, 4), (1,) * 8, (6, 2)])
def test_gqa_keeps_kv_heads_unrepeated(rng, head_chunks):
    q, k, v = _qkv(rng, 2, 8, 24, 20, Hkv=2)
    dk, dv = _chunked(k, (1, 1, 7, 8)), _chunked(v, (2, 2, 20, 6))
    out = fd.scaled_dot_product_attention(_chunked(q, (1, head_chunks, 9, 8)), dk, dv,
                                          enable_gqa=True, is_causal=True)
    # every query chunk reads key/value head chunks of the key's own size (2 heads)
    graph = _graph(out)
    assert sum(out.chunks[1]) == 8 and all(
        key[2] in (0, 1) for key in graph if key[0] == dk.name)
    _assert_close(_compute(out)[0], reference.scaled_dot_product_attention(
        q, k, v, enable_gqa=True, is_causal=True))


@pytest.mark.parametrize("dtype", [np.float16, fastattn.bfloat16, np.float32, np.int32])
def test_dtypes_match_the_numpy_function(rng, dtype):
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 1, 2, 48, 40, E=16, Ev=16))
    out, lse = fd.scaled_dot_product_attention(_chunked(q, (1, 1, 16, 16)),
                                               _chunked(k, (1, 1, 16, 16)), v, is_causal=True,
                                               return_lse=True)
    got, got_lse = _compute(out, lse)
    want, want_lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           return_lse=True)
    assert got.dtype == want.dtype and got_lse.dtype == want_lse.dtype
    assert out.dtype == want.dtype and lse.dtype == want_lse.dtype
    ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    tol = {np.dtype(np.float16): 2e-3, np.dtype(fastattn.bfloat16): 2e-2}.get(np.dtype(dtype), 1e-5)
    _assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", ["S=0", "L=0", "B=0"])
def test_empty_dimensions(rng, shape):
    B, L, S = {"S=0": (1, 5, 0), "L=0": (1, 0, 5), "B=0": (0, 5, 5)}[shape]
    q, k, v = _qkv(rng, B, 2, L, S)
    out, lse = fd.scaled_dot_product_attention(q, k, v, return_lse=True)
    got, got_lse = _compute(out, lse)
    want, want_lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert got.shape == want.shape and got_lse.shape == want_lse.shape
    _assert_close(got, want)
    assert (np.isneginf(got_lse) == np.isneginf(want_lse)).all()


def test_numpy_inputs_and_batch_broadcasting(rng):
    q = rng.standard_normal((3, 1, 20, 8))                  # (B, 1, L, E)
    k = rng.standard_normal((4, 16, 8))                     # (H, S, E)
    v = rng.standard_normal((1, 4, 16, 6))
    mask = rng.random((3, 4, 20, 16)) > 0.3                 # spans B and H alone
    out = fd.scaled_dot_product_attention(q, _chunked(k, (2, 5, 8)), v,
                                          da.from_array(mask, chunks=(1, 1, 20, 16)))
    assert out.shape == (3, 4, 20, 6)
    _assert_close(_compute(out)[0], reference.scaled_dot_product_attention(q, k, v, mask))


def test_return_lse_is_lazy(rng):
    calls = []

    def counted(x):
        calls.append(1)
        return x
    q, k, v = _qkv(rng, 1, 2, 16, 16)
    dq = _chunked(q, (1, 1, 8, 8)).map_blocks(counted, meta=q[:0, :0, :0, :0])
    out, lse = fd.scaled_dot_product_attention(dq, k, v, return_lse=True)
    assert isinstance(out, da.Array) and isinstance(lse, da.Array)
    assert lse.shape == (1, 2, 16) and lse.chunks == ((1,), (1, 1), (8, 8))
    assert not calls
    got, got_lse = _compute(out, lse)
    want, want_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    _assert_close(got, want)
    _assert_close(got_lse, want_lse)


@settings(max_examples=40)
@given(st.data())
def test_random_shapes_and_chunks(data):
    draw = data.draw
    B, H, L, S = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 40)),
                  draw(st.integers(1, 40)))
    E = draw(st.integers(1, 9))
    causal = draw(st.booleans())
    alignment = draw(st.sampled_from(["top_left", "bottom_right"]))
    masked = draw(st.sampled_from([None, "bool", "float"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    q, k, v = _qkv(rng, B, H, L, S, E=E, Ev=draw(st.integers(1, 5)))
    chunk = lambda n: draw(st.integers(1, max(n, 1)))     # noqa: E731
    mask = None
    if masked == "bool":
        mask = rng.random((L, S)) > 0.4
    elif masked == "float":
        mask = np.where(rng.random((H, L, S)) > 0.4, rng.standard_normal((H, L, S)), -np.inf)
    dmask = None if mask is None else da.from_array(
        mask, chunks=tuple(chunk(n) for n in mask.shape))
    out, lse = fd.scaled_dot_product_attention(
        _chunked(q, (chunk(B), chunk(H), chunk(L), E)), _chunked(k, (chunk(B), chunk(H), chunk(S), E)),
        _chunked(v, (chunk(B), chunk(H), chunk(S), v.shape[-1])), dmask, is_causal=causal,
        causal_alignment=alignment, return_lse=True, split_every=draw(st.integers(2, 5)))
    got, got_lse = _compute(out, lse)
    want, want_lse = reference.scaled_dot_product_attention(
        q, k, v, mask, is_causal=causal, causal_alignment=alignment, return_lse=True)
    _assert_close(got, want)
    _assert_lse(got_lse, want_lse)


# ---- bad input: rejected before any task runs, as the NumPy function rejects it ------

def _bad_cases(rng):
    q, k, v = _qkv(rng, 1, 4, 8, 8)
    return {
        "complex": ((q.astype(complex), k, v), {}),
        "feature sizes": ((q, k[..., :5], v), {}),
        "key and value rows": ((q, k, v[..., :5, :]), {}),
        "batch": ((q, k[:, :3], v[:, :3]), {}),
        "mask shape": ((q, k, v, np.ones((3, 8), bool)), {}),
        "mask dtype": ((q, k, v, np.ones((8, 8), np.int8)), {}),
        "alignment": ((q, k, v), dict(is_causal=True, causal_alignment="middle")),
        "gqa heads": ((q, k[:, :3], v[:, :3]), dict(enable_gqa=True)),
        "scale": ((q, k, v), dict(scale=float("nan"))),
        "scale type": ((q, k, v), dict(scale="big")),
        "1-d": ((q[0, 0, 0], k, v), {}),
    }


@pytest.mark.parametrize("case", list(_bad_cases(np.random.default_rng(0))))
def test_bad_input_is_rejected_like_the_numpy_function(rng, case):
    args, kwargs = _bad_cases(rng)[case]
    with pytest.raises((TypeError, ValueError)) as numpy_error:
        fastattn.scaled_dot_product_attention(*args, **kwargs)
    ran = []

    def tracked(x):
        ran.append(1)
        return x
    dask_args = [da.from_array(a, chunks=-1).map_blocks(tracked, meta=a[(slice(0, 0),) * a.ndim])
                 if np.ndim(a) else a for a in args]
    with pytest.raises(numpy_error.type) as dask_error:
        fd.scaled_dot_product_attention(*dask_args, **kwargs)
    assert str(dask_error.value) == str(numpy_error.value)
    assert not ran


def test_import_without_dask_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "fastattn.dask")
    for name in [n for n in sys.modules if n == "dask" or n.startswith("dask.")]:
        monkeypatch.setitem(sys.modules, name, None)      # as if Dask were not installed
    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(ImportError, match=r'pip install "fastattn\[dask\]"'):
        importlib.import_module("fastattn.dask")


def test_unknown_chunk_sizes_are_a_clear_error(rng):
    q, k, v = _qkv(rng, 1, 1, 8, 8)
    dq = _chunked(q, (1, 1, 4, 8))
    rows = dq[0, 0]
    dq = rows[rows[:, 0] > -10][None, None]        # boolean indexing: unknown lengths
    assert np.isnan(dq.shape[2])
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        fd.scaled_dot_product_attention(dq, k, v)


def test_split_every_and_num_threads_are_checked(rng):
    q, k, v = _qkv(rng, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="split_every"):
        fd.scaled_dot_product_attention(q, k, v, split_every=1)
    with pytest.raises(ValueError, match="num_threads"):
        fd.scaled_dot_product_attention(q, k, v, num_threads=0)
    with pytest.raises(ValueError, match="split_every"):
        fd.linear_attention(q, k, v, split_every=1)


def test_misaligned_chunks_are_rechunked(rng):
    q, k, v = _qkv(rng, 2, 2, 30, 30)
    mask = rng.random((2, 1, 30, 30)) > 0.3
    out = fd.scaled_dot_product_attention(
        _chunked(q, (1, 2, 7, 8)), _chunked(k, (2, 1, 11, 4)), _chunked(v, (1, 1, 6, 3)),
        da.from_array(mask, chunks=(1, 1, 5, 9)), is_causal=True)
    assert out.chunks == ((1, 1), (2,), (7, 7, 7, 7, 2), (6,))
    _assert_close(_compute(out)[0], reference.scaled_dot_product_attention(
        q, k, v, mask, is_causal=True))


# ---- threads -------------------------------------------------------------------------

def test_task_threads_local_schedulers():
    probe = dask.delayed(fd.task_threads)
    assert probe().compute(scheduler="sync") == fastattn.get_num_threads()
    threaded = probe().compute(scheduler="threads", num_workers=2)
    assert threaded == max(1, fastattn.get_num_threads() // 2)
    with dask.config.set(num_workers=1):
        assert probe().compute(scheduler="threads") == fastattn.get_num_threads()
    assert probe(5).compute(scheduler="threads") == 5


def test_each_task_gets_its_thread_share(rng, monkeypatch):
    # the kernel is called with task_threads(): record what each call was given
    seen = []
    real = fd._sdpa

    def spy(*args, num_threads=None, **kwargs):
        seen.append(num_threads)
        return real(*args, num_threads=num_threads, **kwargs)
    monkeypatch.setattr(fd, "_sdpa", spy)
    q, k, v = _qkv(rng, 1, 2, 16, 16)
    out = fd.scaled_dot_product_attention(_chunked(q, (1, 1, 8, 8)), _chunked(k, (1, 1, 8, 8)), v)
    with dask.config.set(num_workers=2):
        out.compute(scheduler="threads")
    assert seen and set(seen) == {max(1, fastattn.get_num_threads() // 2)}
    seen.clear()
    fd.scaled_dot_product_attention(q, k, v, num_threads=1).compute(scheduler="threads")
    assert set(seen) == {1}


# ---- local attention -----------------------------------------------------------------

@pytest.mark.parametrize("window, dilation, global_tokens", [
    ((5, 0), 1, None),        # causal sliding window
    ((4, 4), 1, None),
    ((7, 9), 2, None),        # dilated, asymmetric
    ((30, 25), 3, None),      # wider than a chunk: reads from several neighbours
    ((3, 2), 1, [0, 10]),
    ((6, 0), 1, [5, 33, 59]),
])
@pytest.mark.parametrize("L, S", [(60, 60), (50, 60), (60, 45)])
def test_local_attention_matches_reference(rng, window, dilation, global_tokens, L, S):
    q, k, v = _qkv(rng, 2, 2, L, S)
    global_tokens = None if global_tokens is None else [g for g in global_tokens if g < S]
    out, lse = fd.local_attention(_chunked(q, (1, 2, 13, 8)), _chunked(k, (2, 1, 11, 8)),
                                  _chunked(v, (1, 2, 9, 6)), window, dilation=dilation,
                                  global_tokens=global_tokens, return_lse=True, split_every=2)
    got, got_lse = _compute(out, lse)
    want, want_lse = reference.local_attention(q, k, v, window, dilation=dilation,
                                               global_tokens=global_tokens, return_lse=True)
    _assert_close(got, want)
    _assert_lse(got_lse, want_lse)
    np.testing.assert_allclose(got, fastattn.local_attention(
        q, k, v, window, dilation=dilation, global_tokens=global_tokens), atol=1e-12)


def test_local_attention_reads_only_the_halo(rng):
    q, k, v = _qkv(rng, 1, 1, 64, 64)
    dk = _chunked(k, (1, 1, 16, 8))
    out = fd.local_attention(_chunked(q, (1, 1, 16, 8)), dk, _chunked(v, (1, 1, 16, 6)),
                             window=(4, 0))
    graph = _graph(out)
    for key in _tasks_named(out, "fastattn-local"):
        if "halo" in key[0]:
            continue
        deps = dask.core.get_dependencies(graph, key)
        # a query chunk reads its own key chunk and a 4-row halo of the previous one
        key_reads = [d for d in deps if d[0] == dk.name or "halo-key" in d[0]]
        assert len(key_reads) <= 2
    halos = [key for key in graph if "halo-key" in key[0]]
    assert len(halos) == 3
    _assert_close(_compute(out)[0], reference.local_attention(q, k, v, (4, 0)))


def test_local_attention_bad_input(rng):
    q, k, v = _qkv(rng, 1, 1, 8, 8)
    for kwargs in (dict(window=-1), dict(window=(1, 2, 3)), dict(window=2, dilation=0),
                   dict(window=2, global_tokens=[9])):
        with pytest.raises((TypeError, ValueError)) as numpy_error:
            fastattn.local_attention(q, k, v, **kwargs)
        with pytest.raises(numpy_error.type):
            fd.local_attention(_chunked(q, 4), k, v, **kwargs)


# ---- linear attention ----------------------------------------------------------------

def _positive_features(x):
    return np.concatenate([np.exp(-x * x), 1 + np.tanh(x)], axis=-1)


@pytest.mark.parametrize("feature_map", ["elu", _positive_features])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_reference(rng, causal, feature_map):
    q, k, v = _qkv(rng, 2, 3, 70, 70 if causal else 55)
    v = v[:1]                                        # broadcast over the batch
    out = fd.linear_attention(_chunked(q, (1, 2, 16, 8)), _chunked(k, (2, 1, 9, 8)),
                              _chunked(v, (1, 3, 12, 6)), feature_map=feature_map,
                              causal=causal, split_every=2)
    assert out.chunks[2] == (16, 16, 16, 16, 6)
    got = _compute(out)[0]
    _assert_close(got, reference.linear_attention(q, k, v, feature_map=feature_map,
                                                  causal=causal), atol=1e-9)
    graph = _graph(out)
    if causal:
        assert any("cumsum" in str(key[0]) for key in graph)
    else:
        assert any("sum" in str(key[0]) for key in graph)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_linear_attention_dtypes(rng, dtype):
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 1, 2, 64, 64))
    for causal in (False, True):
        got = _compute(fd.linear_attention(_chunked(q, (1, 1, 16, 8)), k, v, causal=causal))[0]
        want = fastattn.linear_attention(q, k, v, causal=causal)
        assert got.dtype == want.dtype
        _assert_close(got, want.astype(np.float64), atol=5e-3, rtol=5e-3)


def test_linear_attention_bad_input(rng):
    q, k, v = _qkv(rng, 1, 1, 8, 6)
    for kwargs in (dict(causal=True), dict(feature_map="relu"), dict(feature_map=3),
                   dict(feature_map=lambda x: x[..., :0])):
        with pytest.raises((TypeError, ValueError)) as numpy_error:
            fastattn.linear_attention(q, k, v, **kwargs)
        with pytest.raises(numpy_error.type):
            fd.linear_attention(_chunked(q, 4), k, v, **kwargs)


# ---- on a cluster of two worker processes --------------------------------------------

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    import cloudpickle
    # the test module's helpers run on the workers, which cannot import it
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=40)
    with distributed.Client(cluster) as c:
        c.run(importlib.import_module, "fastattn.dask")      # workers start warm
        yield c
    cluster.close()


def _slow_copy(x, seconds):
    time.sleep(seconds)
    return x.copy()


def test_cluster_results_and_thread_share(client, rng):
    q, k, v = _qkv(rng, 2, 4, 96, 80, dtype=np.float32)
    mask = rng.random((96, 80)) > 0.2
    out, lse = fd.scaled_dot_product_attention(
        _chunked(q, (1, 2, 32, 8)), _chunked(k, (1, 2, 20, 8)), _chunked(v, (1, 2, 20, 6)),
        mask, is_causal=True, return_lse=True)
    local = fd.local_attention(_chunked(q, (2, 4, 24, 8)), _chunked(k[..., :96, :], (2, 4, 24, 8)),
                               v, window=(10, 3))
    linear = fd.linear_attention(_chunked(q, (2, 2, 16, 8)), _chunked(k, (2, 2, 16, 8)), v)
    got, got_lse, got_local, got_linear = client.compute([out, lse, local, linear], sync=True)
    want, want_lse = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                                            return_lse=True)
    _assert_close(got, want, atol=2e-5, rtol=1e-4)
    _assert_close(got_lse, want_lse, atol=2e-5, rtol=1e-4)
    _assert_close(got_local, reference.local_attention(q, k[..., :96, :], v, (10, 3)),
                  atol=2e-5, rtol=1e-4)
    _assert_close(got_linear, reference.linear_attention(q, k, v), atol=2e-5, rtol=1e-4)
    # one thread per task in single-threaded worker processes: no kernel thread pool
    assert client.submit(fd.task_threads, pure=False).result() == 1
    assert set(client.run(fastattn._threads.pool_workers).values()) == {0}


def _task_threads_beside_another():
    from distributed import get_worker
    state, deadline = get_worker().state, time.monotonic() + 30
    while state.executing_count < 2 and time.monotonic() < deadline:
        time.sleep(0.005)                   # until both tasks are executing
    share = fd.task_threads()
    time.sleep(0.5)                         # (still executing while the other one looks)
    return share


def test_task_threads_in_a_worker_with_two_threads():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        assert c.submit(fd.task_threads, pure=False).result() == 2     # alone: both threads
        a = c.submit(_task_threads_beside_another, pure=False)
        b = c.submit(_task_threads_beside_another, pure=False)
        assert (a.result(), b.result()) == (1, 1)                       # shared


def test_worker_killed_mid_graph(client, rng):
    q, k, v = _qkv(rng, 1, 2, 128, 128, dtype=np.float32)
    # a slow upstream copy keeps the graph running for a few seconds, whatever the load
    dq = _chunked(q, (1, 1, 16, 8)).map_blocks(_slow_copy, 0.15, dtype=q.dtype)
    out = fd.scaled_dot_product_attention(dq, _chunked(k, (1, 1, 32, 8)),
                                          _chunked(v, (1, 1, 32, 6)), is_causal=True)
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    future = client.compute(out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = client.has_what().get(victim, ())
        if any("fastattn" in str(key) for key in held):
            break
        time.sleep(0.02)
    assert not future.done(), "the graph finished before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    got = future.result(timeout=60)
    _assert_close(got, reference.scaled_dot_product_attention(q, k, v, is_causal=True),
                  atol=2e-5, rtol=1e-4)
    assert victim not in client.run(os.getpid)       # its results were lost and recomputed
