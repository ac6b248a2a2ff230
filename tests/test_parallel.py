"""The kernels' shared parallel skeleton and thread policy (fastattn/_kernels/threadpool.h,
fastattn/_threads.py): allocation failure, thread-count independence, concurrency."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastattn
from fastattn import _threads
from fastattn._kernels import parallel



def make(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def failing_allocations():
    yield parallel.fail_next_allocations
    parallel.fail_next_allocations(0)


def _big_sdpa_inputs(rng, dtype=np.float32):
    # enough work for call_threads to start several threads
    return (make(rng, (2, 4, 300, 64), dtype), make(rng, (2, 4, 333, 64), dtype),
            make(rng, (2, 4, 333, 64), dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scratch_allocation_failure_raises_memory_error_and_leaks_nothing(
        rng, dtype, failing_allocations):
    q, k, v = _big_sdpa_inputs(rng, dtype)
    want = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
    for fail in (1, 2):   # the calling thread's block; the calling thread's and a worker's
        failing_allocations(fail)
        with pytest.raises(MemoryError, match="dense attention tile buffers"):
            fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
        failing_allocations(0)
        assert parallel.live_scratch_blocks() == 0
    got = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_results_identical_for_every_thread_count(rng, causal):
    # 2 x 4 batches x 2 query blocks: enough items that split_keys never splits the keys,
    # so every item is summed in the same order whichever thread computes it
    q, k, v = _big_sdpa_inputs(rng)
    mask = rng.random((300, 333)) > 0.2
    want = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal,
                                                 num_threads=1)
    for n in range(2, 9):
        got = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal,
                                                    num_threads=n)
        np.testing.assert_array_equal(got, want, err_msg=f"num_threads={n}")


def test_thread_count_follows_the_work():
    assert _threads.call_threads(8, 1000, 1e3) == 1            # a tiny call: one thread
    assert _threads.call_threads(8, 3, 1e12) == 3              # no more threads than items
    assert _threads.call_threads(2, 1000, 1e12) == 2           # the caller's bound
    assert _threads.call_threads(8, 1000, 3 * _threads.WORK_PER_THREAD) == 3


def test_absurd_thread_counts_are_refused_clearly():
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.set_num_threads(10**6)
    q = np.ones((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="num_threads=1000000"):
        fastattn.scaled_dot_product_attention(q, q, q, num_threads=10**6)
    with pytest.raises(ValueError):
        fastattn.scaled_dot_product_attention(q, q, q, num_threads=0)


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of shadow address space: no "
                           "RLIMIT_AS leaves it room to run, whatever the threads")
def test_refused_threads_raise_instead_of_killing_the_process():
    # Under an address-space limit the OS refuses thread stacks: the call must raise a
    # clear RuntimeError (libgomp used to abort the interpreter), and the process goes on.
    code = r"""
import resource, numpy as np, fastattn
q = np.ones((256, 8, 64, 16), np.float32)
fastattn.scaled_dot_product_attention(q, q, q, num_threads=1)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
# room for the kernels' scratch and glibc's cache of exited threads' stacks (up to
# 40 MiB), not for 127 thread stacks of 8 MiB
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
try:
    fastattn.scaled_dot_product_attention(q, q, q, num_threads=128)
except RuntimeError as e:
    print("refused:", e)
else:
    print("ran")
out = fastattn.scaled_dot_product_attention(q, q, q, num_threads=2)
print("after:", float(out.sum()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ran" or ("refused:" in lines[0] and "threads" in lines[0])
    assert lines[-1].startswith("after:")


def _scipy_blas_threads():
    from threadpoolctl import threadpool_info
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")


def test_concurrent_calls_leave_the_blas_thread_count_as_it_was(rng):
    # float64 tiles go through BLAS, so every call holds the shared BLAS limit; eight
    # Python threads finishing in any order must leave BLAS as it was. (OpenBLAS's dgemm
    # rounds differently on different threads, hence the tolerance.)
    before = _scipy_blas_threads()
    q, k, v = (make(rng, (2, 2, 200, 40), np.float64) for _ in range(3))
    want = fastattn.scaled_dot_product_attention(q, k, v)
    errors = []

    def work():
        try:
            for _ in range(5):
                np.testing.assert_allclose(
                    fastattn.scaled_dot_product_attention(q, k, v, num_threads=2), want,
                    rtol=1e-12, atol=1e-14)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _scipy_blas_threads() == before


def test_pool_survives_fork(rng):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    q, k, v = _big_sdpa_inputs(rng)
    want = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
    assert _threads.pool_workers() >= 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:    # child: the parent's workers are gone; the pool must start afresh
        try:
            got = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2)
            os.write(w, b"1" if np.array_equal(got, want) else b"0")
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 1)
    os.waitpid(pid, 0)
    assert result == b"1"
