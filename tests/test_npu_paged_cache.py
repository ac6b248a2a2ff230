"""PagedKVCache(device="npu"): pools resident on the device, bookkeeping on the host.

Driven through the C test double: a device cache fed the same operations as a CPU
cache must hold the same pools and give the same attention, copy only what changed,
and give its device memory back.
"""
import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend
import fastattn
from fastattn import reference
from helpers import assert_close, load_ascend_harness

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
FIXTURES = [HealthCheck.function_scoped_fixture]


def make(rng, shape, dtype=np.float16):
    return rng.standard_normal(shape).astype(dtype)


def storage(x, dtype):
    """What a cache of ``dtype`` stores for ``x`` (float16 or bfloat16), as float32."""
    if dtype == "bfloat16":
        return harness.bf16_round(x)
    return np.asarray(x).astype(np.float16).astype(np.float32)


def assert_same_cache(cpu, npu, dtype):
    """Same tables, lengths and free blocks; same pools, stale slots included."""
    live = sorted(cpu._seqs)
    assert sorted(npu._seqs) == live and cpu.num_free_blocks == npu.num_free_blocks
    for expected, actual in zip(cpu.block_table(live), npu.block_table(live)):
        np.testing.assert_array_equal(actual, expected)
    for host, device in ((cpu.key_blocks, npu.key_blocks), (cpu.value_blocks, npu.value_blocks)):
        assert isinstance(device, ascend.DeviceArray) and device.readonly
        np.testing.assert_array_equal(np.asarray(device.to_numpy(), np.float32),
                                      storage(host, dtype))


def decode_and_compare(cpu, npu, rng, dtype, heads):
    """The NPU decode of every non-empty sequence against the float64 reference."""
    seqs = [s for s in sorted(cpu._seqs) if cpu.length(s) > 0]
    if not seqs:
        return
    E = cpu.key_blocks.shape[3]
    q = make(rng, (len(seqs), heads, 1, E), np.float32)
    q_device = ascend.to_device(q, dtype=dtype)
    out = npu.attention(q_device, seqs)
    assert isinstance(out, ascend.DeviceArray) and out.shape == (len(seqs), heads, 1, E)
    table, lens = cpu.block_table(seqs)
    keys, values = (storage(p, dtype) for p in (cpu.key_blocks, cpu.value_blocks))
    expected = reference.paged_attention(storage(q, dtype), keys, values, table, lens)
    rtol, atol = harness.TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out.to_numpy(), np.float64), expected, rtol=rtol,
                               atol=atol)
    q_device.free()
    out.free()


# operations: (kind, sequence pick, tokens)
OPERATIONS = st.lists(st.tuples(st.sampled_from(["add", "append", "append", "append", "fork",
                                                  "fork", "free"]),
                                st.integers(0, 10 ** 6),
                                st.one_of(st.integers(1, 3), st.integers(1, 40))),
                      min_size=1, max_size=16)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(operations=OPERATIONS, kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       head_dim=st.integers(1, 24), block_size=st.sampled_from([16, 32]),
       num_blocks=st.integers(1, 10), dtype=st.sampled_from(["float16", "bfloat16"]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_device_cache_mirrors_cpu_cache(runtime, operations, kv_heads, group, head_dim,
                                        block_size, num_blocks, dtype, seed):
    rng = np.random.default_rng(seed)
    cpu = fastattn.PagedKVCache(num_blocks, block_size, kv_heads, head_dim, dtype=np.float64)
    with fastattn.PagedKVCache(num_blocks, block_size, kv_heads, head_dim, dtype=dtype,
                               device="npu") as npu:
        assert npu.device == "npu:0"
        for kind, pick, tokens in operations:
            seqs = sorted(cpu._seqs)
            if kind == "add" or not seqs:
                assert cpu.add_sequence() == npu.add_sequence()
                continue
            seq = seqs[pick % len(seqs)]
            if kind == "fork":
                assert cpu.fork(seq) == npu.fork(seq)
            elif kind == "free":
                cpu.free(seq)
                npu.free(seq)
            else:
                key = make(rng, (kv_heads, tokens, head_dim), np.float64)
                value = make(rng, (kv_heads, tokens, head_dim), np.float64)
                try:
                    cpu.append(seq, key, value)
                except MemoryError:
                    with pytest.raises(MemoryError):
                        npu.append(seq, key, value)
                else:
                    npu.append(seq, key, value)
            assert_same_cache(cpu, npu, dtype)
        decode_and_compare(cpu, npu, rng, dtype, kv_heads * group)
    harness.assert_no_leak(runtime)


def test_append_uploads_only_the_new_tokens(runtime, rng):
    kv_heads, head_dim, block_size = 2, 8, 16
    with fastattn.PagedKVCache(8, block_size, kv_heads, head_dim, device="npu") as cache:
        seq = cache.add_sequence()
        token_bytes = kv_heads * head_dim * 2                     # float16, per pool
        for tokens, blocks_touched in ((5, 1), (30, 3), (1, 1), (12, 1)):
            before = harness.copy_stats(runtime)
            start = cache.length(seq)
            cache.append(seq, make(rng, (kv_heads, tokens, head_dim)),
                         make(rng, (kv_heads, tokens, head_dim)))
            copied = harness.copies_since(runtime, before)
            # one 2-D copy per block touched and pool, exactly the new tokens' bytes
            assert copied["h2d"] == (2 * blocks_touched, 2 * tokens * token_bytes), (start, copied)
            assert copied["d2d"] == copied["d2h"] == (0, 0)


def test_copy_on_write_copies_one_block_on_the_device(runtime, rng):
    with fastattn.PagedKVCache(6, 16, 2, 8, device="npu") as cache:
        parent = cache.add_sequence()
        keys, values = make(rng, (2, 20, 8)), make(rng, (2, 20, 8))
        cache.append(parent, keys, values)
        child = cache.fork(parent)
        before_pools = cache.key_blocks.to_numpy(), cache.value_blocks.to_numpy()
        before = harness.copy_stats(runtime)
        new_key, new_value = make(rng, (2, 1, 8)), make(rng, (2, 1, 8))
        cache.append(child, new_key, new_value)
        copied = harness.copies_since(runtime, before)
        block_bytes = 2 * 16 * 8 * 2
        assert copied["d2d"] == (2, 2 * block_bytes)          # the shared last block, per pool
        assert copied["h2d"] == (2, 2 * 2 * 8 * 2)            # then the one new token
        assert copied["d2h"] == (0, 0)
        (parent_blocks, child_blocks), lens = cache.block_table([parent, child])
        assert parent_blocks[0] == child_blocks[0] and parent_blocks[1] != child_blocks[1]
        assert lens.tolist() == [20, 21]
        after = cache.key_blocks.to_numpy(), cache.value_blocks.to_numpy()
        for pool_before, pool_after, appended, new in ((before_pools[0], after[0], keys, new_key),
                                                       (before_pools[1], after[1], values,
                                                        new_value)):
            # the parent's blocks are untouched on the device
            np.testing.assert_array_equal(pool_after[parent_blocks], pool_before[parent_blocks])
            # the child's copy holds the parent's 4 tokens of block 1, then its own
            copy = pool_after[child_blocks[1]]
            np.testing.assert_array_equal(copy[:, :4], appended[:, 16:20])
            np.testing.assert_array_equal(copy[:, 4], new[:, 0])
        q = make(rng, (2, 4, 1, 8))
        out = cache.attention(q, [parent, child])
        expected = reference.paged_attention(q, *after, *cache.block_table([parent, child]))
        assert_close(out, expected, np.float16)


def test_resident_decode_moves_no_pool_data(runtime, rng):
    with fastattn.PagedKVCache(64, 16, 2, 16, device="npu") as cache:
        seqs = [cache.add_sequence() for _ in range(3)]
        for seq, n in zip(seqs, (1, 40, 300)):
            cache.append(seq, make(rng, (2, n, 16)), make(rng, (2, n, 16)))
        table, lens = cache.block_table(seqs)
        q = make(rng, (3, 4, 1, 16))
        with ascend.to_device(q) as q_device:
            launches, before = harness.launch_count(runtime), harness.copy_stats(runtime)
            out = fastattn.paged_attention(q_device, cache.key_blocks, cache.value_blocks,
                                           table, lens, device="npu")
            copied = harness.copies_since(runtime, before)
            assert harness.launch_count(runtime) == launches + 1
            assert copied["h2d"] == (1, table.size * 4)     # the int32 block table only
            assert copied["d2h"] == copied["d2d"] == (0, 0)
            assert isinstance(out, ascend.DeviceArray)
            host_out = cache.attention(q, seqs)               # NumPy query: NumPy result
            assert isinstance(host_out, np.ndarray) and host_out.dtype == np.float16
            np.testing.assert_array_equal(out.to_numpy(), host_out)
            out.free()
        expected = reference.paged_attention(q, cache.key_blocks.to_numpy(),
                                             cache.value_blocks.to_numpy(), table, lens)
        assert_close(host_out, expected, np.float16)
        # without causal masking an empty sequence attends to nothing: zeros
        empty = cache.add_sequence()
        out = cache.attention(q[:2], [empty, seqs[1]], causal=False)
        assert np.all(out[0] == 0) and np.any(out[1] != 0)
    harness.assert_no_leak(runtime)


def test_device_memory_is_released_by_close_exit_and_gc(runtime, rng):
    harness.assert_no_leak(runtime)

    def fill(cache):
        seq = cache.add_sequence()
        cache.append(seq, make(rng, (1, 20, 16)), make(rng, (1, 20, 16)))
        return seq

    cache = fastattn.PagedKVCache(4, 16, 1, 16, device="npu")
    fill(cache)
    assert harness.mem_stats(runtime)["live"] == 2         # the two pools, nothing else
    cache.free(0)                                           # blocks go back to the cache only
    assert harness.mem_stats(runtime)["live"] == 2 and cache.num_free_blocks == 4
    cache.close()
    cache.close()                                           # idempotent
    with pytest.raises(ValueError, match="closed"):
        cache.key_blocks
    with pytest.raises(ValueError, match="closed"):
        fill(cache)
    with pytest.raises(ValueError, match="closed"):
        cache.attention(make(rng, (1, 1, 1, 16)), [0])
    harness.assert_no_leak(runtime)

    with fastattn.PagedKVCache(4, 16, 1, 16, device="npu:1") as cache:
        fill(cache)
        assert cache.device == "npu:1" and cache.key_blocks.device == 1
    harness.assert_no_leak(runtime)

    cache = fastattn.PagedKVCache(4, 16, 1, 16, device="npu")
    fill(cache)
    view = cache.key_blocks
    del cache
    gc.collect()
    assert view.to_numpy().shape == (4, 1, 16, 16)         # a view keeps its pool alive
    del view
    gc.collect()
    harness.assert_no_leak(runtime)


def test_failed_allocation_leaks_nothing(runtime):
    with ascend.to_device(np.zeros((4, 1, 16, 16), np.float16)):
        pass                                 # an idle buffer: the key pool gets it, no malloc
    harness.fail_next(runtime, "aclrtMalloc", 107000)   # ... so the value pool's malloc fails
    with pytest.raises(ascend.AscendError, match="aclrtMalloc"):
        fastattn.PagedKVCache(4, 16, 1, 16, device="npu")
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("function,fork", [("aclrtMemcpy2d", False), ("aclrtMemcpy", True)])
def test_failed_device_copy_leaves_the_cache_unchanged(runtime, rng, function, fork):
    with fastattn.PagedKVCache(6, 16, 2, 8, device="npu") as cache:
        seq = cache.add_sequence()
        cache.append(seq, make(rng, (2, 20, 8)), make(rng, (2, 20, 8)))
        if fork:                             # the next append copies the shared last block
            seq = cache.fork(seq)
        state = cache.block_table(sorted(cache._seqs)), cache.num_free_blocks
        harness.fail_next(runtime, function, 507000)
        with pytest.raises(ascend.AscendError, match=function):
            cache.append(seq, make(rng, (2, 30, 8)), make(rng, (2, 30, 8)))
        for actual, expected in zip(cache.block_table(sorted(cache._seqs)), state[0]):
            np.testing.assert_array_equal(actual, expected)
        assert cache.num_free_blocks == state[1]
        cache.append(seq, make(rng, (2, 30, 8)), make(rng, (2, 30, 8)))   # usable as before
        assert cache.length(seq) == 50 and cache.num_free_blocks == state[1] - 2 - fork
    harness.assert_no_leak(runtime)


def test_pools_are_read_only_views(runtime, rng):
    with fastattn.PagedKVCache(4, 16, 1, 8, device="npu") as cache:
        seq = cache.add_sequence()
        cache.append(seq, np.ones((1, 3, 8)), np.ones((1, 3, 8)))
        with pytest.raises(ValueError, match="read-only"):
            cache.key_blocks[0] = 0.0
        with pytest.raises(ValueError, match="read-only"):
            cache.value_blocks.copy_region(1, cache.value_blocks, 0)
        cache.key_blocks.free()                    # frees the view, not the pool
        with cache.value_blocks:                   # the same for a with block
            pass
        out = cache.attention(np.ones((1, 2, 1, 8), np.float16), [seq])
        np.testing.assert_array_equal(out, np.ones((1, 2, 1, 8)))
        pool = cache.key_blocks
    with pytest.raises(ValueError, match="freed"):
        pool.to_numpy()                            # the cache closed: its views are dead


def test_devices_of_cache_and_call_must_agree(runtime, rng):
    keys, values = make(rng, (2, 5, 8)), make(rng, (2, 5, 8))
    cpu = fastattn.PagedKVCache(4, 16, 2, 8)
    with fastattn.PagedKVCache(4, 16, 2, 8, device="npu") as npu:
        for cache in (cpu, npu):
            cache.append(cache.add_sequence(), keys, values)
        q = make(rng, (1, 2, 1, 8))
        table, lens = npu.block_table([0])
        # a device cache never silently comes back to the host
        with pytest.raises(TypeError, match=r"key_blocks is an ascend.DeviceArray on npu:0.*"
                                            r"to_numpy"):
            npu.attention(q, [0], device="cpu")
        with pytest.raises(TypeError, match="to_numpy"):
            fastattn.paged_attention(q, npu.key_blocks, npu.value_blocks, table, lens)
        with ascend.to_device(q) as q_device:
            with pytest.raises(TypeError, match="query is an ascend.DeviceArray"):
                fastattn.paged_attention(q_device, cpu.key_blocks, cpu.value_blocks, table, lens)
        with pytest.raises(ValueError, match="npu:0 but the call runs on npu:1"):
            npu.attention(q, [0], device="npu:1")
        # a CPU cache's float32 pools are no dtype of the NPU operator: a clear error ...
        with pytest.raises(TypeError, match="create the cache with device='npu'"):
            cpu.attention(q, [0], device="npu")
        # ... while float16 host pools are uploaded for the call
        out = fastattn.paged_attention(q, cpu.key_blocks.astype(np.float16),
                                       cpu.value_blocks.astype(np.float16), table, lens,
                                       device="npu")
        np.testing.assert_array_equal(out, npu.attention(q, [0]))
        assert_close(out, cpu.attention(q, [0]), np.float16)
    harness.assert_no_leak(runtime)


def test_device_array_keys_are_not_appended(runtime, small_cache):
    with ascend.to_device(np.ones((2, 1, 8), np.float16)) as key:
        activity = DeviceActivity(runtime)
        with pytest.raises(TypeError, match="to_numpy"):
            small_cache.append(0, key, np.ones((2, 1, 8)))
        activity.assert_none()
    assert small_cache.length(0) == 20


# ---------------------------------------------------------------------------
# bad input: raised before any device memory, copy or launch
# ---------------------------------------------------------------------------

class DeviceActivity:
    """Snapshot of allocations, copies and launches; ``assert_none`` checks nothing happened."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.allocs = harness.mem_stats(runtime)["allocs"]
        self.copies = harness.copy_stats(runtime)
        self.launches = harness.launch_count(runtime)

    def assert_none(self):
        assert harness.mem_stats(self.runtime)["allocs"] == self.allocs
        assert harness.copy_stats(self.runtime) == self.copies
        assert harness.launch_count(self.runtime) == self.launches


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dtype=np.float32), TypeError, "dtype must be float16 or bfloat16"),
    (dict(dtype=np.float64), TypeError, "dtype must be float16 or bfloat16"),
    (dict(block_size=8), ValueError, "multiple of 16"),
    (dict(block_size=528), ValueError, "multiple of 16"),
    (dict(head_dim=520), ValueError, "D <= 512"),
    (dict(value_dim=4), ValueError, "value_dim must equal head_dim"),
    (dict(device="npu:7"), ValueError, "npu:7"),
    (dict(device="gpu"), ValueError, "device must be one of"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
])
def test_bad_device_cache_is_refused_before_allocating(runtime, kwargs, error, match):
    arguments = dict(num_blocks=4, block_size=16, num_kv_heads=1, head_dim=8, device="npu")
    arguments.update(kwargs)
    activity = DeviceActivity(runtime)
    with pytest.raises(error, match=match):
        fastattn.PagedKVCache(**arguments)
    activity.assert_none()


@pytest.fixture
def small_cache(runtime, rng):
    with fastattn.PagedKVCache(4, 16, 2, 8, device="npu") as cache:
        for n in (20, 3):
            cache.append(cache.add_sequence(), make(rng, (2, n, 8)), make(rng, (2, n, 8)))
        yield cache
    harness.assert_no_leak(runtime)


def _query(batch=2, heads=4, tokens=1, dim=8, dtype=np.float16):
    return np.ones((batch, heads, tokens, dim), dtype)


@pytest.mark.parametrize("call,error,match", [
    (lambda c: c.append(0, np.ones((2, 1, 9)), np.ones((2, 1, 8))), ValueError, "head_dim=8"),
    (lambda c: c.append(0, np.ones((3, 1, 8)), np.ones((3, 1, 8))), ValueError,
     "num_kv_heads=2"),
    (lambda c: c.append(0, np.ones((2, 1, 8), complex), np.ones((2, 1, 8))), TypeError,
     "real numbers"),
    (lambda c: c.append(5, np.ones((2, 1, 8)), np.ones((2, 1, 8))), ValueError,
     "unknown sequence"),
    (lambda c: c.append(0, np.ones((2, 60, 8)), np.ones((2, 60, 8))), MemoryError,
     "needs 3 free blocks"),
    (lambda c: c.attention(_query(), [0, 9]), ValueError, "unknown sequence"),
    (lambda c: c.attention(_query(dtype=np.float32), [0, 1]), TypeError, "one dtype"),
    (lambda c: c.attention(_query(dim=4), [0, 1]), ValueError, "same head size"),
    (lambda c: c.attention(_query(heads=3), [0, 1]), ValueError, "multiple of the kv-heads"),
    (lambda c: c.attention(_query(batch=1), [0, 1]), ValueError, "B=1"),
    (lambda c: c.attention(_query(), [0, 1], return_lse=True), NotImplementedError,
     "log-sum-exp"),
    (lambda c: fastattn.paged_attention(_query(), c.key_blocks, c.value_blocks,
                                        [[0, 3], [4, 0]], [20, 3], device="npu"),
     ValueError, "block id 4"),
    (lambda c: fastattn.paged_attention(_query(), c.key_blocks, c.value_blocks,
                                        [[0, 1], [2, 0]], [20, 33], device="npu"),
     ValueError, "seq_lens must lie"),
    (lambda c: fastattn.paged_attention(_query(), c.key_blocks, c.value_blocks,
                                        np.zeros((2, 2)), [20, 3], device="npu"),
     TypeError, "block_table must hold integers"),
    (lambda c: fastattn.paged_attention(_query(), c.key_blocks, c.value_blocks,
                                        [[0, 1], [2, 0]], [20, 3], scale=np.inf,
                                        device="npu"),
     ValueError, "scale must be finite"),
])
def test_bad_calls_raise_before_any_device_work(runtime, small_cache, call, error, match):
    before = small_cache.key_blocks.to_numpy(), small_cache.block_table([0, 1])
    activity = DeviceActivity(runtime)
    with pytest.raises(error, match=match):
        call(small_cache)
    activity.assert_none()
    np.testing.assert_array_equal(small_cache.key_blocks.to_numpy(), before[0])
    for actual, expected in zip(small_cache.block_table([0, 1]), before[1]):
        np.testing.assert_array_equal(actual, expected)
