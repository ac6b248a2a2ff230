"""Where the documented CANN contract is stricter (or looser) than a naive binding or test
double would be, checked against the C test double and through the binding (issue 14,
defect 7). Each rule cites the page it comes from:

* aclnnIncreFlashAttentionV4, page attention: "blocknum不能小于根据actualSeqLengthsKv和
  blockSize计算的每个batch的block数量之和" (ops-transformer
  ``attention/incre_flash_attention/docs/aclnnIncreFlashAttentionV4.md``, 约束说明);
* aclDestroyAclOpExecutor destroys executors made repeatable with
  aclSetAclOpExecutorRepeatable ("本接口需与aclSetAclOpExecutorRepeatable接口配套使用");
  a single-use executor is created by phase 1 and released by phase 2 (hiascend CANN
  aolapi ``operatorlist_00021`` / ``operatorlist_00041``);
* aclnnFlashAttentionScore: "当attenMaskOptional输入为None时，sparseMode、preTokens、
  nextTokens参数不生效，固定为全计算" (ops-transformer
  ``attention/flash_attention_score/docs/aclnnFlashAttentionScore.md``, 约束说明);
* aclrtMemcpy2d supports HOST_TO_DEVICE and DEVICE_TO_HOST only (hicann/runtime
  ``docs/api_docs/aclrtMemcpy2d.md``); other kinds fail the parameter check with
  ACL_ERROR_INVALID_PARAM (``src/acl/aclrt_impl/memory.cpp``, CheckMemcpy2dSyncKind;
  ``docs/api_docs/aclrtMemcpy2dAsync.md``).
"""
import numpy as np
import pytest
from helpers import load_ascend_harness

import ascend
import fastattn
from ascend import _ops
from ascend._meta import DescriptorScope
from fastattn import reference

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
phase1, launch, message = harness.phase1, harness.launch, harness.error_message

ACL_ERROR_INVALID_PARAM = 100000
ACLNN_ERR_PARAM_INVALID = 161002
ACL_FLOAT16, ACL_INT32 = 1, 3


@pytest.fixture
def rng():
    return np.random.default_rng(1414)


class Device:
    """Device buffers and descriptors built by hand for direct operator calls."""

    def __init__(self, rt):
        self.runtime = rt
        self.scope = DescriptorScope(rt.lib)
        self.buffers = []

    def tensor(self, host, acl_dtype):
        buffer = self.runtime.allocate(0, max(host.nbytes, 1))
        self.runtime.upload(buffer, np.ascontiguousarray(host))
        self.buffers.append(buffer)
        return self.scope.tensor(buffer.ptr, host.shape, acl_dtype, cacheable=False)

    def empty(self, shape, itemsize, acl_dtype):
        buffer = self.runtime.allocate(0, int(np.prod(shape)) * itemsize)
        self.buffers.append(buffer)
        return buffer, self.scope.tensor(buffer.ptr, shape, acl_dtype, cacheable=False)

    def close(self):
        self.scope.close()
        for buffer in self.buffers:
            self.runtime._free(buffer)


@pytest.fixture
def device(runtime):
    d = Device(runtime)
    yield d
    d.close()
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# (a) aclnnIncreFlashAttentionV4: the pool holds the blocks the batch reads
# ---------------------------------------------------------------------------

def incre_arguments(device, rng, table, lengths, num_blocks, block_size=16, head_dim=8):
    table = np.asarray(table, np.int32)
    batch = table.shape[0]
    cache = rng.standard_normal((num_blocks, 1, block_size, head_dim)).astype(np.float16)
    query = device.tensor(rng.standard_normal((batch, 1, 1, head_dim)).astype(np.float16),
                          ACL_FLOAT16)
    keys = device.scope.tensor_list([device.tensor(cache, ACL_FLOAT16)])
    values = device.scope.tensor_list([device.tensor(cache, ACL_FLOAT16)])
    out_buffer, out = device.empty((batch, 1, 1, head_dim), 2, ACL_FLOAT16)
    return [query, keys, values, None, None, device.scope.int_array(lengths),
            None, None, None, None, None, None, None,
            device.tensor(table, ACL_INT32), None,
            1, 0.5, _ops._LAYOUT_BNSD, 1, block_size, 1, out]


def test_simulator_refuses_a_batch_needing_more_blocks_than_the_pool(device, rng):
    rt = device.runtime
    name = "aclnnIncreFlashAttentionV4"
    # two rows share both blocks of a pool of 2: each reads 2 blocks, the batch 4 > 2
    status, _, _ = phase1(rt, name, incre_arguments(device, rng, [[0, 1], [0, 1]], [32, 32], 2))
    assert status == ACLNN_ERR_PARAM_INVALID
    assert "blocknum 2 is less than the 4 blocks" in message(rt)
    # 17 + 16 tokens read 2 + 1 blocks: 3 <= 3 is accepted, and runs
    status, size, executor = phase1(rt, name, incre_arguments(device, rng, [[0, 1], [0, 1]],
                                                              [17, 16], 3))
    assert status == 0
    assert launch(rt, name, size, executor) == 0


def test_folded_query_tokens_are_split_into_launches_the_pool_can_hold(runtime, rng):
    """T = 4 tokens of one sequence reading all 3 blocks of the pool: folded into 4 rows
    that read 3 blocks each, run as 4 launches (one fitted call would need 12 blocks)."""
    block_size, num_blocks, tokens = 16, 3, 4
    keys = rng.standard_normal((num_blocks, 2, block_size, 16)).astype(np.float16)
    values = rng.standard_normal((num_blocks, 2, block_size, 16)).astype(np.float16)
    query = rng.standard_normal((1, 4, tokens, 16)).astype(np.float16)
    table, lengths = np.array([[2, 0, 1]], np.int32), np.array([45])
    launches = harness.launch_count(runtime)
    out = ascend.paged_attention(query, keys, values, table, lengths)
    assert harness.launch_count(runtime) == launches + 4   # lengths 42..45: 3 blocks each
    expected = harness.reference_paged(query, keys, values, table, lengths)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=5e-3, atol=5e-3)
    harness.assert_no_leak(runtime)


def test_forked_sequences_sharing_blocks_decode_in_as_many_launches_as_needed(runtime, rng):
    """Six forks of a 40-token prompt share its 3 blocks: the batch reads 18 blocks of a pool
    of 8, so the decode is split; the result is the CPU cache's, row for row."""
    with fastattn.PagedKVCache(8, 16, 1, 16, device="npu") as npu:
        cpu = fastattn.PagedKVCache(8, 16, 1, 16, dtype=np.float32)
        k, v = (rng.standard_normal((1, 40, 16)).astype(np.float16) for _ in range(2))
        for cache in (npu, cpu):
            root = cache.add_sequence()
            cache.append(root, k, v)
            seqs = [root] + [cache.fork(root) for _ in range(5)]
        q = rng.standard_normal((6, 2, 1, 16)).astype(np.float16)
        launches = harness.launch_count(runtime)
        out = npu.attention(q, seqs)
        assert harness.launch_count(runtime) - launches == 3   # 18 blocks, 8 a launch: 6+6+6
        table, lens = cpu.block_table(seqs)
        expected = reference.paged_attention(q.astype(np.float32), cpu.key_blocks.astype(
            np.float16).astype(np.float32), cpu.value_blocks.astype(np.float16).astype(
            np.float32), table, lens)
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=5e-3, atol=5e-3)
    harness.assert_no_leak(runtime)


def test_split_launches_read_a_resident_table_and_query_at_row_offsets(runtime, rng):
    """Resident query, pools and block table: each launch's rows are views into them."""
    keys = rng.standard_normal((3, 2, 16, 8)).astype(np.float16)
    values = rng.standard_normal((3, 2, 16, 8)).astype(np.float16)
    query = rng.standard_normal((4, 4, 1, 8)).astype(np.float16)
    table = np.array([[0, 1], [1, 2], [2, 0], [0, 1]], np.int32)   # every row reads 2 of 3
    lengths = np.array([20, 32, 17, 5])                            # 2 + 2 + 2 + 1 blocks
    with ascend.to_device(query) as q, ascend.to_device(keys) as k, \
            ascend.to_device(values) as v, ascend.to_device(table) as t:
        launches = harness.launch_count(runtime)
        out = ascend.paged_attention(q, k, v, t, lengths)
        assert harness.launch_count(runtime) == launches + 3     # rows [0], [1], [2, 3]
        expected = harness.reference_paged(query, keys, values, table, lengths)
        np.testing.assert_allclose(np.asarray(out.to_numpy(), np.float64), expected,
                                   rtol=5e-3, atol=5e-3)
        out.close()
    harness.assert_no_leak(runtime)


def test_a_sequence_reading_more_blocks_than_the_pool_is_refused_before_device_work(
        runtime, rng):
    keys = rng.standard_normal((2, 1, 16, 8)).astype(np.float16)
    query = rng.standard_normal((1, 1, 1, 8)).astype(np.float16)
    launches, before = harness.launch_count(runtime), harness.copy_stats(runtime)
    with pytest.raises(ValueError, match="sequence 0 \\(48 tokens\\) needs 3 blocks of 16, "
                                         "the pool has 2"):
        ascend.paged_attention(query, keys, keys, np.array([[0, 1, 0]], np.int32), [48])
    assert harness.launch_count(runtime) == launches
    assert harness.copies_since(runtime, before)["h2d"] == (0, 0)
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# (b) executors: aclDestroyAclOpExecutor for repeatable executors only
# ---------------------------------------------------------------------------

def flash_arguments(device, rng):
    q = device.tensor(rng.standard_normal((1, 1, 3, 8)).astype(np.float16), ACL_FLOAT16)
    k = device.tensor(rng.standard_normal((1, 1, 4, 8)).astype(np.float16), ACL_FLOAT16)
    _, row_max = device.empty((1, 1, 3, 8), 4, 0)
    _, row_sum = device.empty((1, 1, 3, 8), 4, 0)
    out_buffer, out = device.empty((1, 1, 3, 8), 2, ACL_FLOAT16)
    return [q, k, k, None, None, None, None, None, 0.5, 1.0, _ops.UNLIMITED_TOKENS,
            _ops.UNLIMITED_TOKENS, 1, _ops._LAYOUT_BNSD, 0, 0, row_max, row_sum,
            device.scope.tensor(None, (0,), ACL_FLOAT16, cacheable=False), out], out_buffer


def test_simulator_destroys_only_repeatable_executors(device, rng):
    rt, meta = device.runtime, device.runtime.lib.meta
    name = "aclnnFlashAttentionScore"
    arguments, _ = flash_arguments(device, rng)
    status, size, executor = phase1(rt, name, arguments)
    assert status == 0
    assert meta.aclDestroyAclOpExecutor(executor) == ACLNN_ERR_PARAM_INVALID
    assert "aclSetAclOpExecutorRepeatable" in message(rt)
    assert harness.object_stats(rt)["executors"] == 1        # still there: phase 2 owns it
    assert launch(rt, name, size, executor) == 0              # ... and releases it
    assert harness.object_stats(rt)["executors"] == 0
    status, size, executor = phase1(rt, name, arguments)
    assert meta.aclSetAclOpExecutorRepeatable(executor) == 0
    assert launch(rt, name, size, executor) == 0
    assert launch(rt, name, size, executor) == 0              # repeatable: runs again
    assert meta.aclDestroyAclOpExecutor(executor) == 0        # and is the caller's to destroy
    assert harness.object_stats(rt)["executors"] == 0


def test_executors_are_made_repeatable_only_when_the_workspace_needs_an_allocation(
        runtime, rng):
    """A workspace from the pool cannot fail: the executor stays single-use and its
    launch releases it. One that needs aclrtMalloc can: the executor is made repeatable
    first (so that it can be destroyed if the allocation fails) and destroyed after."""
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    with ascend.to_device(q) as x:
        ascend.empty_cache()
        calls = []
        for _ in range(2):
            harness.start_trace(runtime)
            ascend.flash_attention(x, x, x).close()
            calls.append(harness.stop_trace(runtime))
        cold, warm = calls
        assert "aclrtMalloc" in cold and "aclrtMalloc" not in warm
        for name in ("aclSetAclOpExecutorRepeatable", "aclDestroyAclOpExecutor"):
            assert cold.count(name) == 1 and name not in warm
        assert cold.index("aclSetAclOpExecutorRepeatable") == \
            cold.index("aclnnFlashAttentionScoreGetWorkspaceSize") + 1   # right after phase 1
    harness.assert_no_leak(runtime)


def test_a_call_whose_operator_refuses_reuse_still_runs_and_leaks_nothing(runtime, rng):
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    expected = ascend.flash_attention(q, q, q)
    ascend.empty_cache()          # the workspace needs a new allocation: reuse is asked for
    harness.fail_next(runtime, "aclSetAclOpExecutorRepeatable", 561103)
    harness.start_trace(runtime)
    try:
        out = ascend.flash_attention(q, q, q)      # single use: the launch releases it
    finally:
        trace = harness.stop_trace(runtime)
        harness.clear_injection(runtime)
    assert "aclSetAclOpExecutorRepeatable" in trace and "aclDestroyAclOpExecutor" not in trace
    np.testing.assert_array_equal(out, expected)
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# (c) sparseMode without a mask; aclrtMemcpy2d kinds
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sparse_mode", [0, 1, 2, 3])
def test_sparse_mode_without_a_mask_computes_everything(device, rng, sparse_mode):
    rt = device.runtime
    name = "aclnnFlashAttentionScore"
    arguments, out_buffer = flash_arguments(device, rng)
    arguments[15] = sparse_mode
    status, size, executor = phase1(rt, name, arguments)
    assert status == 0, message(rt)
    assert launch(rt, name, size, executor) == 0
    out = np.empty((1, 1, 3, 8), np.float16)
    rt.download(out_buffer, out)
    q, k = (np.asarray(device_array, np.float64) for device_array in
            (_download(rt, device.buffers[0], (1, 1, 3, 8)),
             _download(rt, device.buffers[1], (1, 1, 4, 8))))
    expected, _ = harness.reference_attention(q, k, k, scale=0.5)
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=5e-3, atol=5e-3)


def _download(rt, buffer, shape):
    host = np.empty(shape, np.float16)
    rt.download(buffer, host)
    return host


@pytest.mark.parametrize("kind", [0, 3, 4])   # HOST_TO_HOST, DEVICE_TO_DEVICE, DEFAULT
def test_memcpy2d_refuses_other_kinds_as_an_invalid_parameter(runtime, kind):
    acl = runtime.lib.acl
    first, second = runtime.allocate(0, 256), runtime.allocate(0, 256)
    try:
        status = acl.aclrtMemcpy2d(first.ptr, 64, second.ptr, 64, 32, 2, kind)
        assert status == ACL_ERROR_INVALID_PARAM
        assert "invalid kind" in message(runtime)
        host = np.arange(64, dtype=np.uint8)
        assert acl.aclrtMemcpy2d(first.ptr, 64, host.ctypes.data, 32, 32, 2, 1) == 0
    finally:
        runtime._free(first)
        runtime._free(second)
    harness.assert_no_leak(runtime)
