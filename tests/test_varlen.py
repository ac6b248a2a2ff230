"""varlen_attention (packed variable-length batches, flash-attn's layout) against
fastattn.reference.varlen_attention and against per-sequence dense calls.

  [V] flash-attn varlen: sequence b = rows cu_seqlens[b]:cu_seqlens[b+1] of the packed
      (total, H, E) arrays, attended alone; out (total_q, Hq, Ev), lse (Hq, total_q);
      query head h reads kv head h // (Hq / Hkv); causal bottom-right (off = S_b - L_b)
  [W][A][C] the score modifiers with each sequence's own off (tests/test_score_mods.py)
"""
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
import fastattn.attention as attention
from fastattn import reference
from helpers import assert_close, assert_lse_close, check_scratch_failure

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, np.float16, BF16]
varlen = fastattn.varlen_attention


def cu(lens, dtype=np.int32):
    return np.concatenate([[0], np.cumsum(lens)]).astype(dtype)


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def check(q, k, v, cq, ck, dtype=np.float32, **kw):
    out, lse = varlen(q, k, v, cq, ck, return_lse=True, **kw)
    ref_kw = {n: x for n, x in kw.items()
              if n not in ("num_threads", "out", "max_seqlen_q", "max_seqlen_k")}
    ref_out, ref_lse = reference.varlen_attention(q, k, v, cq, ck, return_lse=True, **ref_kw)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    return out, lse


@st.composite
def problems(draw):
    n = draw(st.integers(1, 5))
    lens = st.one_of(st.integers(0, 2), st.integers(0, 300))     # 0 and 1 often
    lq = draw(st.lists(lens, min_size=n, max_size=n))
    same = draw(st.booleans())
    lk = lq if same else draw(st.lists(lens, min_size=n, max_size=n))
    hkv = draw(st.integers(1, 2))
    side = st.one_of(st.none(), st.integers(-1, 5), st.integers(0, 700))
    return dict(lq=lq, lk=lk, hkv=hkv, group=draw(st.sampled_from([1, 2, 3])),
                E=draw(st.sampled_from([8, 64])), Ev=draw(st.sampled_from([3, 16, 64])),
                dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()),
                alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
                window=draw(st.one_of(st.none(), st.tuples(side, side))),
                alibi=draw(st.sampled_from([None, "H", "BH"])),
                softcap=draw(st.sampled_from([None, 2.0])),
                tiles=draw(st.sampled_from([None, (16, 32), (5, 7), (128, 64)])),
                threads=draw(st.sampled_from([1, 2, 3])),
                cu_dtype=draw(st.sampled_from([np.int32, np.int64])),
                seed=draw(st.integers(0, 2**32 - 1)))


@given(p=problems())
def test_random_batches_match_reference(p):
    # [V][W][A][C] random packed batches with lengths 0 and 1 inside, GQA, L_b != S_b,
    # every dtype, both alignments, small tiles, several threads
    rng = np.random.default_rng(p["seed"])
    Hq = p["hkv"] * p["group"]
    cq, ck = cu(p["lq"], p["cu_dtype"]), cu(p["lk"], p["cu_dtype"])
    q = rand(rng, (cq[-1], Hq, p["E"]), p["dtype"])
    k = rand(rng, (ck[-1], p["hkv"], p["E"]), p["dtype"])
    v = rand(rng, (ck[-1], p["hkv"], p["Ev"]), p["dtype"])
    B = len(p["lq"])
    slopes = {None: None, "H": rng.uniform(0, 1, Hq), "BH": rng.uniform(0, 1, (B, Hq))}
    tiles = p["tiles"] or (attention.BLOCK_Q, attention.BLOCK_K)
    with mock.patch.object(attention, "BLOCK_Q", tiles[0]), \
            mock.patch.object(attention, "BLOCK_K", tiles[1]):
        check(q, k, v, cq, ck, p["dtype"], is_causal=p["causal"],
              causal_alignment=p["alignment"], window=p["window"],
              alibi_slopes=slopes[p["alibi"]], softcap=p["softcap"],
              num_threads=p["threads"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_per_sequence_dense_calls(rng, dtype, monkeypatch):
    # [V] each sequence alone through scaled_dot_product_attention (the same kernel body
    # on an unpacked, contiguous copy) gives the same numbers; the short sequences' shapes
    # would take the split-KV kernel (fastattn/paged.py), held to the dense one here
    monkeypatch.setattr(fastattn.paged, "takes_split_kv", lambda ops: False)
    lq, lk = [7, 1, 0, 300, 64], [9, 1, 5, 280, 64]
    cq, ck = cu(lq), cu(lk)
    q, k, v = rand(rng, (cq[-1], 6, 64), dtype), rand(rng, (ck[-1], 2, 64), dtype), \
        rand(rng, (ck[-1], 2, 32), dtype)
    slopes = rng.uniform(0, 1, (5, 6))
    kw = dict(is_causal=True, window=(40, 2), softcap=4.0)
    out, lse = varlen(q, k, v, cq, ck, alibi_slopes=slopes, return_lse=True, **kw)
    for b in range(5):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l_ = fastattn.scaled_dot_product_attention(
            np.ascontiguousarray(q[rq].transpose(1, 0, 2)), k[rk].transpose(1, 0, 2),
            v[rk].transpose(1, 0, 2), enable_gqa=True, causal_alignment="bottom_right",
            alibi_slopes=slopes[b], return_lse=True, **kw)
        np.testing.assert_allclose(np.asarray(out[rq], np.float64),
                                   np.asarray(o.transpose(1, 0, 2), np.float64),
                                   rtol=1e-6, atol=1e-6 if dtype == np.float64 else 1e-3)
        np.testing.assert_allclose(lse[:, rq], l_, rtol=1e-6, atol=1e-5)


def test_lengths_zero_and_one(rng):
    # [V] empty sequences (no queries, or no keys: zeros and lse -inf) and single tokens
    lq, lk = [0, 1, 3, 1, 0, 2], [4, 1, 0, 5, 0, 2]
    q, k, v = rand(rng, (7, 2, 8)), rand(rng, (12, 2, 8)), rand(rng, (12, 2, 8))
    for causal in (False, True):
        out, lse = check(q, k, v, cu(lq), cu(lk), is_causal=causal)
        assert not out[1:4].any() and np.isneginf(lse[:, 1:4]).all()   # sequence 2: S = 0


def test_empty_batches(rng):
    q = np.zeros((0, 2, 8), np.float32)
    out, lse = varlen(q, q, q, [0], [0], return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    out, lse = varlen(q, rand(rng, (3, 2, 8)), rand(rng, (3, 2, 8)), [0, 0], [0, 3],
                      return_lse=True)
    assert out.shape == (0, 2, 8)
    q1 = rand(rng, (3, 2, 8))
    out, lse = varlen(q1, q, q, [0, 3], [0, 0], return_lse=True)
    assert not out.any() and np.isneginf(lse).all()


def test_noncontiguous_packed_inputs_and_out(rng):
    # [V] q, k, v as views of one packed (total, 3, H, E) qkv array; out= filled in place
    lens = [5, 17, 40]
    c = cu(lens)
    qkv = rand(rng, (c[-1], 3, 4, 32))
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    out = np.full((c[-1], 4, 32), np.nan, np.float32)
    res = varlen(q, k, v, c, c, is_causal=True, out=out)
    assert res is out
    assert_close(out, reference.varlen_attention(q, k, v, c, c, is_causal=True), np.float32)
    strided_out = np.zeros((c[-1], 4, 64), np.float32)[..., ::2]
    varlen(q, k, v, c, c, is_causal=True, out=strided_out)
    np.testing.assert_array_equal(strided_out, out)


def test_results_identical_for_every_thread_count(rng):
    # items are claimed dynamically; every thread count gives the same bits
    lens = [1000, 3, 64, 700, 0, 129]
    c = cu(lens)
    q, k, v = rand(rng, (c[-1], 4, 64)), rand(rng, (c[-1], 4, 64)), rand(rng, (c[-1], 4, 64))
    base = varlen(q, k, v, c, c, is_causal=True, window=(300, 0), num_threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(
            varlen(q, k, v, c, c, is_causal=True, window=(300, 0), num_threads=threads), base)


def test_items_are_balanced_by_work(monkeypatch, rng):
    # one long sequence and many short ones: items are query blocks (of every head), the
    # long sequence's first, each (sequence, head)'s blocks together and heaviest first,
    # so the threads share the long sequence and finish on the light items
    from fastattn import varlen as varlen_module
    seen = {}
    real = varlen_module.RaggedBatch

    def spy(*args):
        seen["ragged"] = real(*args)
        return seen["ragged"]
    monkeypatch.setattr(varlen_module, "RaggedBatch", spy)
    lens = [64] * 8 + [2048] + [64] * 8
    c = cu(lens)
    q = rand(rng, (c[-1], 2, 16))
    varlen(q, q, q, c, c, is_causal=True)
    items = seen["ragged"].items
    assert items.shape == (2 * (8 + 16), 2)
    # sequence 8 (batch entries 16 and 17: heads 0, 1), its causal blocks 7 .. 0
    np.testing.assert_array_equal(items[:8], np.c_[[16] * 8, np.arange(7, -1, -1)])
    np.testing.assert_array_equal(items[8:16], np.c_[[17] * 8, np.arange(7, -1, -1)])
    assert set(items[16:, 0].tolist()) == set(range(34)) - {16, 17}


def test_scratch_failure_raises_memory_error(rng):
    c = cu([30, 50])
    q = rand(rng, (80, 2, 16))
    check_scratch_failure(lambda: varlen(q, q, q, c, c, is_causal=True))


# ---- bad inputs: ValueError naming the array and the first bad position ------------------

def _args(rng, lq=(3, 4), lk=(5, 2)):
    q, k, v = rand(rng, (sum(lq), 2, 8)), rand(rng, (sum(lk), 2, 8)), rand(rng, (sum(lk), 2, 8))
    return q, k, v, cu(lq), cu(lk)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("bad,match", [
    ([1, 3, 7], r"\[0\] must be 0, got 1"),
    ([0, 5, 3, 7], r"non-decreasing: cu_seqlens_._\[2\] = 3 < cu_seqlens_._\[1\] = 5"),
    ([0, 3, 6], r"\[2\] = 6 must equal the packed length"),
    ([0, 3, 9], r"\[2\] = 9 must equal the packed length"),
    ([0, 100, 7], r"non-decreasing: cu_seqlens_._\[2\] = 7 < cu_seqlens_._\[1\] = 100"),
    (np.array([0, 3, 7], np.int16), r"int32 or int64.*int16"),
    (np.array([0, 3, 7], np.uint32), r"int32 or int64.*uint32"),
    (np.array([0.0, 3.0, 7.0]), r"int32 or int64.*float64"),
    (np.array([[0, 3, 7]], np.int32), r"shape \(batch \+ 1,\)"),
    (np.array([], np.int32), r"shape \(batch \+ 1,\)"),
])
def test_bad_cu_seqlens(rng, which, bad, match):
    q, k, v, cq, ck = _args(rng, (3, 4), (3, 4))
    args = dict(cu_seqlens_q=cq, cu_seqlens_k=ck)
    if not isinstance(bad, np.ndarray):
        bad = np.array(bad, np.int32)
    args[which] = bad
    # the message names the array (and, for a bad value, its first bad position)
    with pytest.raises(ValueError, match=which + ".*" + match.replace("cu_seqlens_._", which)):
        varlen(q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"])


def test_batch_counts_must_agree(rng):
    q, k, v, cq, _ = _args(rng, (3, 4), (3, 4))
    with pytest.raises(ValueError, match="cu_seqlens_q has 2.*cu_seqlens_k 3"):
        varlen(q, k, v, cq, cu([3, 2, 2]))


def test_bad_max_seqlen_and_modifiers(rng):
    q, k, v, cq, ck = _args(rng)
    with pytest.raises(ValueError, match="max_seqlen_q = 3 is shorter.*4"):
        varlen(q, k, v, cq, ck, max_seqlen_q=3)
    with pytest.raises(TypeError, match="max_seqlen_k"):
        varlen(q, k, v, cq, ck, max_seqlen_k=5.5)
    varlen(q, k, v, cq, ck, max_seqlen_q=4, max_seqlen_k=100)       # larger is fine
    with pytest.raises(ValueError, match="window"):
        varlen(q, k, v, cq, ck, window=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        varlen(q, k, v, cq, ck, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        varlen(q, k, v, cq, ck, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes"):
        varlen(q, k, v, cq, ck, alibi_slopes=np.ones((3, 2)))       # batch is 2


def test_bad_shapes(rng):
    q, k, v, cq, ck = _args(rng)
    with pytest.raises(ValueError, match="packed query"):
        varlen(q[None], k, v, cq, ck)
    with pytest.raises(ValueError, match="divide"):
        varlen(rand(rng, (7, 3, 8)), k, v, cq, ck)
    with pytest.raises(ValueError, match="head size"):
        varlen(rand(rng, (7, 2, 4)), k, v, cq, ck)
    with pytest.raises(TypeError):
        varlen(q.astype(complex), k, v, cq, ck)


def test_checks_run_before_any_kernel(rng, monkeypatch):
    # a bad cu_seqlens never reaches the kernel (which would read past the arrays)
    from fastattn._kernels import dense
    monkeypatch.setattr(dense, "sdpa", lambda plan: pytest.fail("kernel ran"))
    q, k, v, cq, ck = _args(rng)
    with pytest.raises(ValueError):
        varlen(q, k, v, cq, np.array([0, 50, 7], np.int32))
