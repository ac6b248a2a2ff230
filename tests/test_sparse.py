"""Block-sparse engine and sparse patterns against full attention with the dense mask."""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastattn
import fastattn.sparse as sparse
from fastattn import _threads, reference
from fastattn._kernels import parallel
from fastattn.sparse import BlockLayout
from helpers import assert_close, assert_lse_close, draw_block_rule


def make(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def check_against_mask(out_lse, q, k, v, keep, dtype):
    out, lse = out_lse
    ref_out, ref_lse = reference.scaled_dot_product_attention(q, k, v, keep, return_lse=True)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)


# ---- the engine: any layout + element rule == full attention with layout.to_mask() ------

@st.composite
def layouts(draw):
    return dict(draw_block_rule(draw),
                dtype=draw(st.sampled_from([np.float32, np.float64])),
                heads=draw(st.sampled_from([None, 3])), Ev=draw(st.sampled_from([1, 7, 16])))


@settings(max_examples=80)
@given(p=layouts())
def test_engine_matches_dense_mask(p):
    rng = np.random.default_rng(p["seed"])
    L, S, dtype = p["L"], p["S"], p["dtype"]
    layout = BlockLayout.from_rule((L, S), p["block"], **p["rule"])
    if p["heads"]:
        # per-head: each head drops some of the rule's blocks at random
        blocks = np.broadcast_to(layout.block_mask(), (p["heads"],) + layout.block_mask().shape)
        blocks = blocks & (rng.random(blocks.shape) < 0.7)
        layout = BlockLayout.from_blocks(blocks, (L, S), p["block"], **p["rule"])
    H = p["heads"] or 2
    q = make(rng, (2, H, L, 8), dtype)
    k = make(rng, (2, H, S, 8), dtype)
    v = make(rng, (2, H, S, p["Ev"]), dtype)
    keep = layout.to_mask()
    with mock.patch.object(_threads, "WORK_PER_THREAD", 1):     # threads however small
        got = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    assert got[0].dtype == dtype
    check_against_mask(got, q, k, v, keep, dtype)


@settings(max_examples=40)
@given(p=layouts())
def test_rule_visits_exactly_the_blocks_it_needs(p):
    layout = BlockLayout.from_rule((p["L"], p["S"]), p["block"], **p["rule"])
    needed = BlockLayout.from_mask(layout.to_mask(), p["block"]).block_mask()
    visited = layout.block_mask()
    assert (visited >= needed).all()
    if "segment" not in p["rule"]:      # the segment bound is a (tight) superset
        assert (visited == needed).all()


def test_visited_blocks_only(rng):
    # values outside the visited blocks are poison: they must never be read into the result
    L = S = 256
    layout = BlockLayout.from_rule((L, S), 64, window=(10, 10))
    q, k, v = make(rng, (L, 16)), make(rng, (S, 16)), make(rng, (S, 4))
    out = fastattn.block_sparse_attention(q, k, v, layout)
    far = ~layout.block_mask()[0]        # key blocks query block 0 does not visit
    k2, v2 = k.copy(), v.copy()
    for kb in np.flatnonzero(far):
        k2[kb * 64:(kb + 1) * 64] = np.nan
        v2[kb * 64:(kb + 1) * 64] = np.nan
    out2 = fastattn.block_sparse_attention(q, k2, v2, layout)
    np.testing.assert_array_equal(out2[:64], out[:64])


def test_empty_rows_give_zero(rng):
    # L > S bottom-right: the first L - S queries sit before key 0 and see nothing
    q, k, v = make(rng, (10, 8)), make(rng, (3, 8)), make(rng, (3, 5))
    out, lse = fastattn.local_attention(q, k, v, (0, 0), return_lse=True)
    assert not np.isnan(out).any()
    assert (out[:7] == 0).all() and np.isneginf(lse[:7]).all()
    check_against_mask((out, lse), q, k, v, reference.local_keep(10, 3, (0, 0)), np.float64)
    # an empty layout
    layout = BlockLayout((4, 4), 2, [0, 0, 0], [])
    out, lse = fastattn.block_sparse_attention(q[:4], k[:3].repeat(2, 0)[:4], v[:3].repeat(2, 0)[:4],
                                               layout, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


# ---- key-major tiles: float32 blocks of >= 16 rows, value widths a multiple of 16 ------

@pytest.mark.parametrize("block", [16, 40, 64, 128])
@pytest.mark.parametrize("E,Ev", [(8, 16), (24, 48), (64, 64), (72, 80), (64, 128)])
def test_key_major_tiles(rng, block, E, Ev):
    # L, S not multiples of the block: partial query blocks (rows % 16 != 0) and partial
    # key blocks; the window makes some tiles partial (row-major) next to whole ones
    L, S = 3 * block + 21, 2 * block + 37
    q = make(rng, (2, 2, L, E), np.float32) * 2
    k = make(rng, (2, 2, S, E), np.float32)
    v = make(rng, (2, 2, S, Ev), np.float32)
    for rule in ({}, {"window": (block + 5, 7)}, {"global_query": np.arange(L) % 29 == 0}):
        layout = BlockLayout.from_rule((L, S), block, **rule)
        got = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
        check_against_mask(got, q, k, v, layout.to_mask(), np.float32)
    # a strided (B, L, H, E) view and a row-major-only twin (float64) agree too
    qs = make(rng, (2, L, 2, E), np.float32).swapaxes(1, 2)
    blocks = rng.random((2, -(-L // block), -(-S // block))) < 0.5
    layout = BlockLayout.from_blocks(blocks, (L, S), block)
    got = fastattn.block_sparse_attention(qs, k, v, layout)
    want = fastattn.block_sparse_attention(qs.astype(np.float64), k.astype(np.float64),
                                           v.astype(np.float64), layout)
    assert_close(got, want, np.float32)


def test_key_major_tiles_non_finite(rng):
    # an inf or NaN score sends its tile back to the row-major path, which defines them:
    # the float32 result has NaN exactly where the float64 (row-major only) one has
    L, E = 200, 64
    q, k, v = (make(rng, (1, L, E), np.float32) for _ in range(3))
    q[0, 5, 3] = np.inf
    q[0, 70, 0] = np.nan
    k[0, 150, 1] = -np.inf
    # every score of query 100 is -inf: like a fully masked row, it gives 0
    k[..., 0] = np.abs(k[..., 0]) + 0.5
    q[0, 100, 0] = -np.inf
    layout = BlockLayout.from_rule((L, L), 64, window=(64, 64))
    got = fastattn.block_sparse_attention(q, k, v, layout)
    want = fastattn.block_sparse_attention(*(a.astype(np.float64) for a in (q, k, v)), layout)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert (got[0, 100] == 0).all()
    fin = ~np.isnan(want)
    assert_close(got[fin], want[fin], np.float32)


def test_zero_sizes(rng):
    layout = BlockLayout((0, 5), 4, [0], [])
    out = fastattn.block_sparse_attention(np.zeros((0, 3)), np.ones((5, 3)), np.ones((5, 2)), layout)
    assert out.shape == (0, 2)
    layout = BlockLayout((3, 0), 4, [0, 0], [])
    out = fastattn.block_sparse_attention(np.ones((3, 3)), np.ones((0, 3)), np.ones((0, 2)), layout)
    assert out.shape == (3, 2) and (out == 0).all()


def test_threads_and_layouts_agree(rng, monkeypatch):
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)    # threads even for tiny work
    q, k, v = make(rng, (2, 4, 300, 16)), make(rng, (2, 4, 300, 16)), make(rng, (2, 4, 300, 8))
    layout = BlockLayout.from_rule((300, 300), (32, 48), window=(40, 5), dilation=2,
                                   global_key=[3])
    one = fastattn.block_sparse_attention(q, k, v, layout, num_threads=1)
    two = fastattn.block_sparse_attention(q, k, v, layout, num_threads=2)
    np.testing.assert_array_equal(one, two)


def _record_threads(monkeypatch):
    # the threads of every block-sparse kernel call
    threads = []
    run = sparse._sparse.block_sparse

    def recording(plan, layout):
        threads.append(plan.nthreads)
        return run(plan, layout)
    monkeypatch.setattr(sparse._sparse, "block_sparse", recording)
    return threads


def _big_problem(rng, dtype, rule, heads=False):
    # 2 x 4 heads x 8 query blocks: 64 items, and enough flops that 8 threads start
    q, k = make(rng, (2, 4, 512, 64), dtype), make(rng, (2, 4, 512, 64), dtype)
    v = make(rng, (2, 4, 512, 32), dtype)
    layout = BlockLayout.from_rule((512, 512), 64, **rule)
    if heads:
        blocks = np.broadcast_to(layout.block_mask(), (4,) + layout.block_mask().shape)
        blocks = blocks & (rng.random(blocks.shape) < 0.7)
        blocks[:, :, 0] = True
        layout = BlockLayout.from_blocks(blocks, (512, 512), 64, **rule)
    return q, k, v, layout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule,heads", [
    (dict(), False),                                            # full tiles: key-major
    (dict(window=(100, 0)), False),                             # bands
    (dict(window=(150, 20), dilation=3, global_key=[5, 300], is_causal=True), True),  # masks
])
def test_same_bits_on_any_thread_count(rng, monkeypatch, dtype, rule, heads):
    # items are computed the same way whichever thread takes them: 1..8 threads give
    # identical results
    threads = _record_threads(monkeypatch)
    q, k, v, layout = _big_problem(rng, dtype, rule, heads)
    one, one_lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True,
                                                   num_threads=1)
    for n in range(2, 9):
        out, lse = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True,
                                                   num_threads=n)
        np.testing.assert_array_equal(out, one)
        np.testing.assert_array_equal(lse, one_lse)
    assert threads == list(range(1, 9))
    check_against_mask((one, one_lse), q, k, v, layout.to_mask(), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_scratch_allocation_failure(rng, monkeypatch, dtype, threads):
    # a thread without scratch: one MemoryError naming the buffers, every scratch block
    # freed, and the next call computes normally
    started = _record_threads(monkeypatch)
    q, k, v, layout = _big_problem(rng, dtype, dict(window=(100, 0)))
    expected = fastattn.block_sparse_attention(q, k, v, layout, num_threads=threads)
    assert started == [threads]
    try:
        parallel.fail_next_allocations(1)
        with pytest.raises(MemoryError, match="block-sparse attention tile buffers"):
            fastattn.block_sparse_attention(q, k, v, layout, num_threads=threads)
    finally:
        parallel.fail_next_allocations(0)
    assert parallel.live_scratch_blocks() == 0
    out = fastattn.block_sparse_attention(q, k, v, layout, num_threads=threads)
    np.testing.assert_array_equal(out, expected)


def test_non_contiguous_and_broadcast(rng):
    base = make(rng, (2, 90, 3, 24), np.float32)          # (B, L, H, E) viewed as (B, H, L, E)
    q = base.transpose(0, 2, 1, 3)
    k = base[..., ::-1].transpose(0, 2, 1, 3)
    v = make(rng, (90, 5), np.float32)                     # broadcast over batch and heads
    out = fastattn.local_attention(q, k, v, (7, 3), dilation=2, return_lse=True)
    check_against_mask(out, q, k, v, reference.local_keep(90, 90, (7, 3), 2), np.float32)


def test_float16_and_integers(rng):
    q = make(rng, (40, 8)).astype(np.float16)
    out = fastattn.local_attention(q, q, q, 5)
    assert out.dtype == np.float16
    assert_close(out, reference.local_attention(q, q, q, 5), np.float16)
    qi = rng.integers(-2, 3, (20, 4))
    assert fastattn.local_attention(qi, qi, qi, 2).dtype == np.float64


# ---- the patterns == full attention with their reference masks --------------------------

SHAPES = [(1, 1), (63, 63), (65, 65), (200, 200), (130, 70), (70, 130)]


@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("window,dilation", [((0, 0), 1), ((5, 0), 1), ((3, 9), 1),
                                             ((70, 70), 3), ((300, 0), 2), (17, 1)])
def test_local(rng, L, S, window, dilation):
    q, k, v = make(rng, (2, L, 16)), make(rng, (2, S, 16)), make(rng, (2, S, 8))
    got = fastattn.local_attention(q, k, v, window, dilation=dilation, return_lse=True)
    check_against_mask(got, q, k, v, reference.local_keep(L, S, window, dilation), np.float64)


@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("mode,stride,summary", [("strided", 1, None), ("strided", 7, None),
                                                 ("strided", 100, None), ("fixed", 16, None),
                                                 ("fixed", 10, 3), ("fixed", 128, 32)])
def test_strided(rng, L, S, mode, stride, summary):
    q, k, v = make(rng, (L, 16)), make(rng, (S, 16)), make(rng, (S, 8))
    got = fastattn.strided_attention(q, k, v, stride, mode=mode, summary=summary,
                                     return_lse=True)
    check_against_mask(got, q, k, v, reference.strided_keep(L, S, stride, mode, summary),
                       np.float64)


@pytest.mark.parametrize("L,S", SHAPES)
def test_global_and_longformer(rng, L, S):
    q, k, v = make(rng, (3, L, 16)), make(rng, (3, S, 16)), make(rng, (3, S, 8))
    tokens = [0, S // 2, S - 1]
    got = fastattn.global_attention(q, k, v, tokens, return_lse=True)
    check_against_mask(got, q, k, v, reference.local_keep(L, S, (0, 0))
                       | reference.global_keep(L, S, tokens), np.float64)
    got = fastattn.longformer_attention(q, k, v, 9, tokens, dilation=2, return_lse=True)
    check_against_mask(got, q, k, v, reference.local_keep(L, S, 9, 2)
                       | reference.global_keep(L, S, tokens), np.float64)
    flags = np.zeros(S, dtype=bool)
    flags[tokens] = True
    np.testing.assert_array_equal(fastattn.longformer_attention(q, k, v, 9, flags, dilation=2),
                                  got[0])


@pytest.mark.parametrize("N,block", [(1, 4), (50, 8), (64, 16), (300, 16), (1000, 64)])
def test_bigbird(rng, N, block):
    q, k, v = make(rng, (2, 3, N, 8)), make(rng, (2, 3, N, 8)), make(rng, (2, 3, N, 8))
    got = fastattn.bigbird_attention(q, k, v, block_size=block, num_random_blocks=2, rng=7,
                                     return_lse=True)
    layout = fastattn.bigbird_layout(N, num_heads=3, block_size=block, num_random_blocks=2,
                                     rng=7)
    keep = np.kron(layout.block_mask(), np.ones((block, block), dtype=bool))[:, :N, :N]
    np.testing.assert_array_equal(keep, layout.to_mask())
    check_against_mask(got, q, k, v, keep[None], np.float64)


def test_bigbird_layout_structure():
    layout = fastattn.bigbird_layout(16 * 10, block_size=16, num_random_blocks=3, rng=0)
    blocks = layout.block_mask()
    n = blocks.shape[0]
    assert blocks[[0, n - 1]].all() and blocks[:, [0, n - 1]].all()      # global rows/cols
    for i in range(1, n - 1):
        assert blocks[i, i - 1:i + 2].all()                               # window
        extra = blocks[i].sum() - len({0, n - 1} | {i - 1, i, i + 1})
        assert extra == 3                                                 # random


def test_bigbird_reproducible(rng):
    q = make(rng, (2, 400, 8))
    a = fastattn.bigbird_attention(q, q, q, block_size=16, rng=np.random.default_rng(3))
    b = fastattn.bigbird_attention(q, q, q, block_size=16, rng=np.random.default_rng(3))
    c = fastattn.bigbird_attention(q, q, q, block_size=16, rng=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_from_mask_round_trip(rng):
    mask = rng.random((3, 70, 50)) > 0.8
    layout = BlockLayout.from_mask(mask, (16, 8))
    np.testing.assert_array_equal(layout.to_mask(), mask)
    q, k, v = make(rng, (3, 70, 8)), make(rng, (3, 50, 8)), make(rng, (3, 50, 8))
    got = fastattn.block_sparse_attention(q, k, v, layout, return_lse=True)
    check_against_mask(got, q, k, v, mask, np.float64)


# ---- bad input ---------------------------------------------------------------------------

def test_bad_inputs(rng):
    q = make(rng, (8, 4))
    with pytest.raises(ValueError, match="window"):
        fastattn.local_attention(q, q, q, (-1, 2))
    with pytest.raises(ValueError, match="window"):
        fastattn.longformer_attention(q, q, q, -3, [0])
    with pytest.raises(ValueError, match="dilation"):
        fastattn.local_attention(q, q, q, 2, dilation=0)
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout((8, 8), 0, [0, 0], [])
    with pytest.raises(ValueError, match="block_size"):
        fastattn.bigbird_attention(q, q, q, block_size=-1)
    with pytest.raises(ValueError, match="stride"):
        fastattn.strided_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="mode"):
        fastattn.strided_attention(q, q, q, 2, mode="diagonal")
    with pytest.raises(ValueError, match="indptr"):
        BlockLayout((8, 8), 4, [0, 1], [0])
    with pytest.raises(ValueError, match="indptr"):
        BlockLayout((8, 8), 4, [0, 2, 1], [0, 1])
    with pytest.raises(ValueError, match="indices"):
        BlockLayout((8, 8), 4, [0, 1, 2], [0, 2])
    with pytest.raises(ValueError, match="increasing"):
        BlockLayout((8, 8), 4, [0, 2, 2], [1, 0])
    with pytest.raises(ValueError, match="increasing"):
        BlockLayout((8, 8), 4, [0, 2, 2], [1, 1])
    with pytest.raises(TypeError, match="indices"):
        BlockLayout((8, 8), 4, [0, 1, 1], [0.5])
    with pytest.raises(ValueError, match="global_tokens"):
        fastattn.global_attention(q, q, q, [8])
    with pytest.raises(TypeError, match="mask"):
        BlockLayout((8, 8), 4, [0, 0, 0], [], mask=np.ones((8, 8)))
    with pytest.raises(ValueError, match="mask"):
        BlockLayout((8, 8), 4, [0, 0, 0], [], mask=np.ones((7, 8), bool))
    layout = BlockLayout.from_rule((8, 8), 4, window=1)
    with pytest.raises(ValueError, match=r"\(L, S\)"):
        fastattn.block_sparse_attention(q[:7], q, q, layout)
    with pytest.raises(TypeError, match="BlockLayout"):
        fastattn.block_sparse_attention(q, q, q, np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="L must equal S"):
        fastattn.bigbird_attention(q[:4], q, q)
    with pytest.raises(ValueError, match="key"):
        fastattn.local_attention(q, q[:, :3], q, 1)
    with pytest.raises(TypeError):
        fastattn.local_attention(q.astype(complex), q, q, 1)
    per_head = BlockLayout.from_blocks(np.ones((3, 2, 2), bool), (8, 8), 4)
    with pytest.raises(ValueError, match="broadcast"):
        fastattn.block_sparse_attention(np.ones((2, 8, 4)), q, q, per_head)
