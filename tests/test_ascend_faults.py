"""Device faults (issue 14): no device memory is stranded when a CANN call fails.

* defect 6: a failed upload of the cached 2048x2048 causal mask, and ``aclrtFree``
  failing inside ``empty_cache``, used to strand device memory that
  ``empty_cache()`` never gave back;
* fault injection: each NPU operation below (dense, paged and backward calls) is run once to record the sequence of
  the acl/aclnn calls it makes (the simulator numbers every call of libascendcl,
  libnnopbase and libopapi), then once per call with a failure injected into just
  that call. After each failure every device allocation left is one the pool
  holds, the call's error names the failing function, ``empty_cache()`` returns the
  pool to zero, and no descriptor or executor is left (besides the one object a
  failed ``aclDestroy*`` itself refused to destroy).
"""
import numpy as np
import pytest
from helpers import load_ascend_harness

import ascend
import fastattn

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime

FAILURE = 507000          # ACL_ERROR_RT_INTERNAL_ERROR: not an out-of-memory code (no retry)
# Failures the binding absorbs by design: a refused reuse leaves the executor single-use
# (its launch releases it), and a failed destroy of a host descriptor is not an error of
# the call.
ABSORBED = {"aclSetAclOpExecutorRepeatable", "aclDestroyTensor", "aclDestroyIntArray",
            "aclDestroyTensorList", "aclDestroyAclOpExecutor"}
CREATORS = {"aclCreateTensor", "aclCreateIntArray", "aclCreateTensorList"}  # return NULL


def pooled(rt):
    """Buffers the pool holds (idle buffers and cached constants)."""
    return sum(len(buffers) for buffers in rt._idle.values()) + len(rt._constants)


def assert_nothing_stranded(rt, keep=0):
    """Every live device allocation is the pool's (or one of ``keep`` the test holds).

    No garbage collection first: what a failed call leaves must be released by the call
    itself, not by the cycle collector some time later."""
    assert harness.mem_stats(rt)["live"] == pooled(rt) + keep


def assert_pool_returns_to_zero(rt, keep=0):
    ascend.empty_cache()
    stats = harness.mem_stats(rt)
    assert stats["live"] == keep and len(rt._live) == keep, stats
    refused = harness.destroy_refused_object(rt)
    assert harness.object_stats(rt) == dict(tensors=0, int_arrays=0, tensor_lists=0,
                                            executors=0), refused


@pytest.fixture
def rng():
    return np.random.default_rng(6)


# ---------------------------------------------------------------------------
# defect 6
# ---------------------------------------------------------------------------

def test_failed_upload_of_the_causal_mask_strands_nothing(runtime, rng):
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float16)
    with ascend.to_device(q) as x:
        ascend.empty_cache()                         # no cached mask: the call uploads it
        before = harness.mem_stats(runtime)["live"]
        for _ in range(3):                           # resident inputs: the only upload
            harness.fail_next(runtime, "aclrtMemcpy", FAILURE)
            with pytest.raises(ascend.AscendError, match="aclrtMemcpy"):
                ascend.flash_attention(x, x, x, is_causal=True)
            assert_nothing_stranded(runtime, keep=1)
        ascend.empty_cache()
        assert harness.mem_stats(runtime)["live"] == before == 1
        out = ascend.flash_attention(x, x, x, is_causal=True)   # and the next call works
        expected, _ = harness.reference_attention(
            q, q, q, keep=harness.causal_keep(5, 5, bottom_right=False))
        np.testing.assert_allclose(np.asarray(out.to_numpy(), np.float64), expected,
                                   rtol=5e-3, atol=5e-3)
        out.close()
    assert_pool_returns_to_zero(runtime)


def test_failed_free_inside_empty_cache_strands_nothing(runtime, rng):
    ascend.empty_cache()
    for n in (1, 2, 3):
        ascend.to_device(np.ones(100 * n, np.float32)).close()   # three pooled buffers
    ascend.flash_attention(*(rng.standard_normal((1, 1, 4, 8)).astype(np.float32),) * 3,
                           is_causal=True)                      # and the cached mask
    pooled_before = pooled(runtime)
    assert harness.mem_stats(runtime)["live"] == pooled_before >= 4
    harness.fail_next(runtime, "aclrtFree", FAILURE)
    with pytest.raises(ascend.AscendError, match="aclrtFree"):
        ascend.empty_cache()
    assert_nothing_stranded(runtime)          # the one that failed is pooled again
    assert harness.mem_stats(runtime)["live"] == pooled(runtime) == 1
    assert_pool_returns_to_zero(runtime)      # ... and the next empty_cache frees it


# ---------------------------------------------------------------------------
# fault injection into every call of an operation
# ---------------------------------------------------------------------------

def dense_host(rng):
    q = rng.standard_normal((2, 4, 5, 16)).astype(np.float16)
    k = rng.standard_normal((2, 2, 7, 16)).astype(np.float16)
    mask = np.where(rng.random((5, 7)) < 0.3, -np.inf, rng.standard_normal((5, 7)))

    def operation():
        out, lse = ascend.flash_attention(q, k, k, mask.astype(np.float32), return_lse=True)
        assert out.shape == (2, 4, 5, 16) and lse.shape == (2, 4, 5)
    return operation


def dense_resident_causal(rng):
    q = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)

    def operation():
        with ascend.to_device(q) as x, ascend.to_device(q[:, :1]) as y:
            out, lse = ascend.flash_attention(x, y, y, is_causal=True,
                                              causal_alignment="bottom_right", return_lse=True)
            out.close()
            lse.close()
    return operation


def paged_resident_decode(rng):
    pool = rng.standard_normal((6, 2, 16, 8)).astype(np.float16)
    q = rng.standard_normal((3, 4, 1, 8)).astype(np.float16)
    table = np.array([[0, 1], [2, 3], [4, 5]], np.int32)

    def operation():
        with ascend.to_device(pool) as keys, ascend.to_device(pool) as values:
            out = ascend.paged_attention(q, keys, values, table, [20, 32, 5])
            assert out.shape == (3, 4, 1, 8)
    return operation


def paged_split_launches(rng):
    """T = 3 query tokens of two sequences reading 2 blocks each of a pool of 4: six
    folded rows, run as three launches."""
    pool = rng.standard_normal((4, 1, 16, 8)).astype(np.float16)
    q = rng.standard_normal((2, 2, 3, 8)).astype(np.float16)
    table = np.array([[0, 1], [2, 3]], np.int32)

    def operation():
        out = ascend.paged_attention(q, pool, pool, table, [30, 32])
        assert out.shape == (2, 2, 3, 8)
    return operation


def paged_cache_lifecycle(rng):
    """A resident PagedKVCache: pools, appends (aclrtMemcpy2d), a fork's copy-on-write
    (device to device), a decode."""
    k = rng.standard_normal((2, 20, 16)).astype(np.float16)
    q = rng.standard_normal((2, 2, 1, 16)).astype(np.float16)

    def operation():
        with fastattn.PagedKVCache(4, 16, 2, 16, device="npu") as cache:
            seq = cache.add_sequence()
            cache.append(seq, k, k)
            beam = cache.fork(seq)
            cache.append(beam, k[:, :1], k[:, :1])      # the shared, partly filled block
            assert cache.attention(q, [seq, beam]).shape == (2, 2, 1, 16)
    return operation


def backward_host(rng):
    """aclnnFlashAttentionScoreGrad with a bool mask and causal (the combined mask), GQA."""
    q = rng.standard_normal((1, 4, 5, 8)).astype(np.float16)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float16)
    mask = rng.random((5, 6)) < 0.8
    out, lse = ascend.flash_attention(q, k, k, mask, is_causal=True, return_lse=True)
    grad_out = rng.standard_normal(out.shape).astype(np.float16)

    def operation():
        grads = ascend.flash_attention_backward(grad_out, q, k, k, out, lse, mask,
                                                is_causal=True)
        assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    return operation


def backward_resident_causal(rng):
    """Forward then backward on resident inputs: the cached causal mask, the forward's lse
    downloaded for the statistics, resident gradients."""
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)

    def operation():
        with ascend.to_device(q) as x:
            out, lse = ascend.flash_attention(x, x, x, is_causal=True, return_lse=True)
            with out, lse:
                grads = ascend.flash_attention_backward(out, x, x, x, out, lse, is_causal=True)
                for g in grads:
                    g.close()
    return operation


OPERATIONS = {
    "dense_host": dense_host,
    "dense_resident_causal": dense_resident_causal,
    "paged_resident_decode": paged_resident_decode,
    "paged_split_launches": paged_split_launches,
    "paged_cache_lifecycle": paged_cache_lifecycle,
    "backward_host": backward_host,
    "backward_resident_causal": backward_resident_causal,
}


def record(rt, operation):
    """The names of the calls ``operation()`` and the ``empty_cache()`` after it make,
    from a cold start: nothing pooled or cached, no device current on the thread (the
    device's stream, made once per process, exists: a warm-up call makes it)."""
    operation()
    ascend.empty_cache()
    rt._local.device = None
    harness.start_trace(rt)
    try:
        operation()
        ascend.empty_cache()
    finally:
        trace = harness.stop_trace(rt)
    return trace


def run_with_failure_at(rt, operation, index, name):
    ascend.empty_cache()
    rt._local.device = None
    harness.fail_at(rt, index, FAILURE)
    raised = None
    try:
        try:
            operation()
        except ascend.AscendError as exc:
            raised = (exc.name, exc.code)
        assert_nothing_stranded(rt)
        try:
            ascend.empty_cache()
        except ascend.AscendError as exc:
            assert raised is None
            raised = (exc.name, exc.code)
        assert harness.fail_at_hit(rt), f"call {index} ({name}) was not reached"
    finally:
        harness.fail_at(rt, -1, 0)
    if name in ABSORBED:
        assert raised is None, (index, name, raised)
    else:
        assert raised is not None and raised[0] == name, (index, name, raised)
        assert name in CREATORS or raised[1] == FAILURE
    assert_pool_returns_to_zero(rt)


@pytest.mark.parametrize("make", list(OPERATIONS.values()), ids=list(OPERATIONS))
def test_a_failure_in_any_call_strands_no_device_memory(runtime, rng, make):
    operation = make(rng)
    trace = record(runtime, operation)
    assert_pool_returns_to_zero(runtime)
    assert {"aclrtMalloc", "aclrtFree", "aclCreateTensor"} <= set(trace)
    assert any(name.startswith("aclnn") for name in trace)
    for index, name in enumerate(trace):
        run_with_failure_at(runtime, operation, index, name)
    operation()                                   # the device still works afterwards
    assert_pool_returns_to_zero(runtime)
