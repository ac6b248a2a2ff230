"""paged_attention over float16 / bfloat16 pools and half PagedKVCaches, against the
float64 reference on the same rounded inputs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
import fastattn.paged as paged
from fastattn import _threads, reference
from helpers import assert_close, assert_lse_close

BF16 = np.dtype(ml_dtypes.bfloat16)
HALF = [np.dtype(np.float16), BF16]
HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "fastattn" / "_kernels"


def make(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def pools(rng, num_blocks, hkv, bs, e, ev, dtype):
    return make(rng, (num_blocks, hkv, bs, e), dtype), make(rng, (num_blocks, hkv, bs, ev), dtype)


def check(q, kb, vb, table, lens, causal=True, **kw):
    """paged_attention against the float64 reference on the same (rounded) inputs; the
    result has the promoted dtype, the lse float32 (float64 for a float64 query)."""
    out, lse = fastattn.paged_attention(q, kb, vb, table, lens, causal=causal,
                                        return_lse=True, **kw)
    ref_out, ref_lse = reference.paged_attention(
        q.astype(np.float64), kb.astype(np.float64), vb.astype(np.float64), np.asarray(table),
        lens, causal=causal, scale=kw.get("scale"), return_lse=True)
    result = np.result_type(q.dtype, kb.dtype, vb.dtype)
    assert out.dtype == result
    assert lse.dtype == (np.float64 if result == np.float64 else np.float32)
    assert_close(out, ref_out, result)
    # scores, softmax and accumulation are float32 on exactly widened inputs
    assert_lse_close(lse, ref_lse, np.float32 if result != np.float64 else np.float64)
    return out, lse


def record_plans(monkeypatch):
    """The PagedPlans of every paged kernel call (their arrays are the kernel's operands)."""
    plans = []
    run = paged._paged.paged_attention

    def recording(plan):
        plans.append(plan)
        return run(plan)
    monkeypatch.setattr(paged._paged, "paged_attention", recording)
    return plans


# ---- paged_attention over half pools ---------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("bs", [5, 16])
def test_half_pools_match_reference(rng, dtype, causal, T, H, Hkv, bs):
    # lengths that no block size divides, 0, and one past a block; scattered blocks
    kb, vb = pools(rng, 40, Hkv, bs, 64, 48, dtype)
    lens = np.array([0, 1, bs + 1, 3 * bs - 2, 70])
    nmax = -(-70 // bs)
    table = np.stack([rng.permutation(40)[:nmax] for _ in lens])
    q = make(rng, (len(lens), H, T, 64), dtype)
    out, lse = check(q, kb, vb, table, lens, causal=causal)
    assert not out[0].astype(np.float32).any() and np.isneginf(lse[0]).all()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("query", [np.float32, np.float64, "mixed"])
def test_promotion_reads_half_pools_in_place(rng, monkeypatch, dtype, query):
    # a float32 (float64) query over half pools gives float32 (float64), computed from
    # the pools as they are; float16 keys with bfloat16 values promote to float32
    plans = record_plans(monkeypatch)
    kb, vb = pools(rng, 12, 2, 4, 32, 32, dtype)
    if query == "mixed":
        vb = vb.astype(BF16 if dtype == np.float16 else np.float16)
        query = dtype
    table, lens = rng.permutation(12).reshape(2, 6), np.array([23, 9])
    check(make(rng, (2, 4, 2, 32), query), kb, vb, table, lens)
    key_blocks, value_blocks = plans[-1].arrays[1:3]
    assert key_blocks.dtype == kb.dtype and np.shares_memory(key_blocks, kb)
    assert value_blocks.dtype == vb.dtype and np.shares_memory(value_blocks, vb)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_result_is_narrowed_from_float32(rng, dtype):
    # the half result is the float32 result (float32 query, same pools) rounded once
    kb, vb = pools(rng, 10, 2, 8, 16, 16, dtype)
    table, lens = rng.permutation(10).reshape(2, 5), np.array([37, 12])
    q = make(rng, (2, 4, 1, 16), dtype)
    half = fastattn.paged_attention(q, kb, vb, table, lens, num_threads=1)
    wide = fastattn.paged_attention(q.astype(np.float32), kb, vb, table, lens, num_threads=1)
    np.testing.assert_array_equal(half.view(np.uint16), wide.astype(dtype).view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_split_keys_merge_in_float32(rng, monkeypatch, dtype, threads):
    # one (sequence, kv-head): flash-decoding splits its keys over the threads, merges
    # float32 partial results and narrows each merged row
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)    # threads even for tiny work
    plans = record_plans(monkeypatch)
    kb, vb = pools(rng, 64, 1, 16, 64, 64, dtype)
    table = rng.permutation(64)[None, :]
    q = make(rng, (1, 4, 2, 64), dtype)
    for n in (1000, 17, 1):
        out, _ = check(q, kb, vb, table, np.array([n]), num_threads=threads)
        one = fastattn.paged_attention(q, kb, vb, table, [n], num_threads=1)
        np.testing.assert_allclose(out.astype(np.float32), one.astype(np.float32),
                                   rtol=1e-2, atol=1e-2)
    assert max(plan.nsplit for plan in plans) > 1


@pytest.mark.parametrize("vector_rows", [0, 10**9])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("T", [1, 3])
def test_same_bits_on_any_thread_count(rng, monkeypatch, vector_rows, dtype, T):
    # 16 sequences: the keys are never split for up to 8 threads (nsplit == 1), and each
    # item is computed the same way whichever thread takes it
    monkeypatch.setattr(paged, "VECTOR_ROWS", vector_rows)
    plans = record_plans(monkeypatch)
    B, nmax = 16, 94
    kb, vb = pools(rng, B * nmax, 1, 16, 64, 64, dtype)
    table = rng.permutation(B * nmax).reshape(B, nmax)
    lens = rng.integers(1300, 1501, B)
    q = make(rng, (B, 4, T, 64), dtype)
    one, one_lse = fastattn.paged_attention(q, kb, vb, table, lens, return_lse=True,
                                            num_threads=1)
    for threads in range(2, 9):
        out, lse = fastattn.paged_attention(q, kb, vb, table, lens, return_lse=True,
                                            num_threads=threads)
        np.testing.assert_array_equal(out.view(np.uint16), one.view(np.uint16))
        np.testing.assert_array_equal(lse, one_lse)
    assert [(p.nthreads, p.nsplit) for p in plans] == [(n, 1) for n in range(1, 9)]
    check(q, kb, vb, table, lens)


@pytest.mark.parametrize("vector_rows", [0, 10**9])
def test_prefetch_and_chunks_do_not_change_results(rng, monkeypatch, vector_rows):
    # prefetch distances in half pieces (none, less than a piece, the whole pool) and
    # chunks that end inside blocks give the same bits
    monkeypatch.setattr(paged, "VECTOR_ROWS", vector_rows)
    monkeypatch.setattr(paged, "KEYS_PER_CHUNK", 15)
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 1)
    kb, vb = pools(rng, 30, 3, 5, 40, 24, np.float16)
    table = rng.permutation(30)[:28].reshape(2, 14)
    q = make(rng, (2, 6, 2, 40), np.float16)
    lens = np.array([67, 29])
    outs = []
    for distance in (0, 1, 4096, 10**9):
        monkeypatch.setattr(paged, "PREFETCH_BYTES", distance)
        outs.append(fastattn.paged_attention(q, kb, vb, table, lens, num_threads=2))
    for out in outs[1:]:
        np.testing.assert_array_equal(out.view(np.uint16), outs[0].view(np.uint16))
    check(q, kb, vb, table, lens, num_threads=2)


@st.composite
def problems(draw):
    bs = draw(st.sampled_from([1, 3, 4, 16]))
    nmax = draw(st.integers(1, 6))
    return dict(
        dtype=draw(st.sampled_from(HALF)), query=draw(st.sampled_from(["same", "float32"])),
        B=draw(st.integers(1, 3)), hkv=draw(st.integers(1, 3)),
        group=draw(st.sampled_from([1, 2, 4, 5])), T=draw(st.sampled_from([1, 2, 7, 20])),
        bs=bs, nmax=nmax, e=draw(st.sampled_from([1, 8, 17, 64, 128])),
        ev=draw(st.sampled_from([1, 8, 20, 64])),
        lens=draw(st.lists(st.integers(0, nmax * bs), min_size=3, max_size=3)),
        causal=draw(st.booleans()), threads=draw(st.integers(1, 3)),
        row_tile=draw(st.sampled_from([1, 3, 8, 64])), seed=draw(st.integers(0, 2**32 - 1)))


# VECTOR_ROWS: 0 = BLAS for every tile (the widened piece goes to BLAS), 10**9 = the
# small-GEMM loops for every tile
@pytest.mark.parametrize("vector_rows", [0, 10**9])
@given(p=problems())
def test_random_shapes_match_reference(vector_rows, p):
    with mock.patch.object(paged, "VECTOR_ROWS", vector_rows), \
            mock.patch.object(paged, "ROW_TILE", p["row_tile"]), \
            mock.patch.object(_threads, "WORK_PER_THREAD", 1):
        rng = np.random.default_rng(p["seed"])
        B, nmax, bs = p["B"], p["nmax"], p["bs"]
        kb, vb = pools(rng, B * nmax + 1, p["hkv"], bs, p["e"], p["ev"], p["dtype"])
        table = rng.integers(0, B * nmax + 1, (B, nmax))
        query = p["dtype"] if p["query"] == "same" else np.float32
        q = make(rng, (B, p["hkv"] * p["group"], p["T"], p["e"]), query)
        check(q, kb, vb, table, np.array(p["lens"][:B]), causal=p["causal"],
              num_threads=p["threads"])


def test_special_values_pass_through(rng):
    # inf / NaN in a half value row reach exactly the rows that weigh it; a float16 key
    # near the top of its range does not overflow the float32 scores
    kb = np.zeros((2, 1, 4, 8), np.float16)
    vb = np.ones((2, 1, 4, 8), np.float16)
    vb[1, 0, 1] = np.nan
    kb[0, 0, 0] = 60000.0
    q = np.full((2, 1, 1, 8), 1e-3, np.float16)
    out = fastattn.paged_attention(q, kb, vb, np.array([[0], [1]]), np.array([4, 4]))
    assert np.isnan(out[1].astype(np.float32)).all()
    assert np.allclose(out[0].astype(np.float32), 1.0)


# ---- PagedKVCache with half pools -------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF + ["bfloat16"], ids=str)
def test_half_cache_halves_the_pools(dtype):
    half = fastattn.PagedKVCache(64, 16, 8, 128, dtype=dtype)
    full = fastattn.PagedKVCache(64, 16, 8, 128)
    assert half.key_blocks.dtype == np.dtype(dtype) == half.value_blocks.dtype
    assert half.key_blocks.nbytes * 2 == full.key_blocks.nbytes == 64 * 16 * 8 * 128 * 4
    assert half.value_blocks.nbytes * 2 == full.value_blocks.nbytes


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_half_cache_forks_and_copy_on_write(rng, dtype, causal):
    # appends of float64, float32, integers and the other half type are rounded into the
    # cache's dtype, which never changes; forks share blocks, a shared partly filled
    # block is copied on append; attention over it all matches the reference
    cache = fastattn.PagedKVCache(24, 4, 2, 16, dtype=dtype, value_dim=8)
    other = BF16 if dtype == np.float16 else np.float16
    a = cache.add_sequence()
    k64, v64 = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 6, 8))
    cache.append(a, k64, v64)
    table, lens = cache.block_table([a])
    np.testing.assert_array_equal(
        reference.gather_blocks(cache.key_blocks, table[0], lens[0]).view(np.uint16),
        k64.astype(dtype).view(np.uint16))
    beam = cache.fork(a)
    free = cache.num_free_blocks
    cache.append(beam, make(rng, (2, 1, 16), np.float32), make(rng, (2, 1, 8), other))
    assert cache.num_free_blocks == free - 1                 # the shared last block copied
    cache.append(a, np.arange(32).reshape(2, 1, 16), np.ones((2, 1, 8), np.int8))
    cache.append(a, make(rng, (2, 5, 16), other), make(rng, (2, 5, 8), np.float64))
    assert cache.key_blocks.dtype == dtype == cache.value_blocks.dtype
    seqs = [a, beam]
    table, lens = cache.block_table(seqs)
    assert lens.tolist() == [12, 7] and table[0, 0] == table[1, 0] != table[0, 1] != table[1, 1]
    for query in (dtype, np.float32):
        q = make(rng, (2, 6, 2, 16), query)
        out, lse = cache.attention(q, seqs, causal=causal, return_lse=True)
        want = check(q, cache.key_blocks, cache.value_blocks, table, lens, causal=causal)
        np.testing.assert_array_equal(out, want[0])
        assert out.dtype == np.result_type(query, dtype)


def test_half_cache_bad_appends(rng):
    cache = fastattn.PagedKVCache(4, 4, 1, 8, dtype=np.float16)
    s = cache.add_sequence()
    for bad in (complex, bool, object):
        with pytest.raises(TypeError, match=r"real numbers \(float16/32/64, bfloat16 or "
                                            r"integers\)"):
            cache.append(s, np.ones((1, 1, 8), bad), np.ones((1, 1, 8)))
    assert cache.length(s) == 0 and cache.num_free_blocks == 4
    with pytest.warns(RuntimeWarning, match="overflow"):
        cache.append(s, np.full((1, 1, 8), 1e6), np.ones((1, 1, 8)))
    assert np.isinf(cache.key_blocks[0, 0, 0]).all()           # beyond float16: inf


def test_half_cpu_cache_does_not_run_on_the_npu():
    cache = fastattn.PagedKVCache(4, 16, 1, 8, dtype=np.float16)
    s = cache.add_sequence()
    cache.append(s, np.ones((1, 2, 8)), np.ones((1, 2, 8)))
    with pytest.raises(TypeError, match="uploaded whole on every call.*device='npu'"):
        cache.attention(np.ones((1, 1, 1, 8), np.float16), [s], device="npu")


# ---- the widening itself: the vector and scalar conversions ------------------------------

def _compile(tmp_path, flags):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "half_check"
    subprocess.run([cc, "-O3", "-fno-math-errno", *flags, f"-I{KERNELS}",
                    str(HERE / "half_check.c"), "-o", str(exe)], check=True, capture_output=True)
    return exe


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="compiles a C program")
@pytest.mark.parametrize("flags", [[], ["-DFASTATTN_NO_CLONES"]], ids=["vector", "scalar"])
def test_widening_every_pattern(tmp_path, flags):
    # fa_widen as this CPU runs it (AVX-512) and as CPUs without it do (the portable
    # loop): the same floats as the scalar conversions, and as NumPy's / ml_dtypes'
    exe = _compile(tmp_path, flags)
    res = subprocess.run([str(exe), "check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:]
    dump = subprocess.run([str(exe), "dump"], capture_output=True, check=True).stdout
    got = np.frombuffer(dump, np.float32).reshape(2, 65536)
    bits = np.arange(65536, dtype=np.uint16)
    for row, dtype in zip(got, HALF):
        want = bits.view(dtype).astype(np.float32)
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(row), nan)
        np.testing.assert_array_equal(np.signbit(row[nan]), np.signbit(want[nan]))
        np.testing.assert_array_equal(row[~nan].view(np.uint32), want[~nan].view(np.uint32))
