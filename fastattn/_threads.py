"""Thread policy of every kernel: how many threads a call gets, and BLAS inside kernels.

This is the one place a kernel call consults (once, while its plan is built):

- :func:`call_threads` turns the caller's ``num_threads`` (an upper bound) and the
  call's work into the threads actually started: a call too small to pay for waking a
  thread runs on the calling thread alone (a decode step of a few sequences does).
- :func:`kernel_blas` is the BLAS policy: the few kernels whose tile products fall back
  to BLAS hold scipy's BLAS at one thread while any of them runs, by a count shared
  by every Python thread (the last call out restores what was there before).

The threads themselves are the kernels' own pool (``fastattn/_kernels/threadpool.h``):
idle threads sleep instead of spinning, so fastattn yields the cores to other
processes, Dask workers and NumPy's BLAS between calls.
"""
import contextlib
import functools
import os
import threading
from pathlib import Path

import numpy as np

from fastattn._kernels import dense as _dense
from fastattn._kernels import parallel as _parallel
from fastattn._validation import check_int

__all__ = ["set_num_threads", "get_num_threads"]

_num_threads = None           # None: the default below

# A thread is worth waking for at least this much work (floating-point operations, or
# bytes streamed for memory-bound decoding): about 50 us on one Zen 4 core, against the
# 10-30 us it takes to wake a sleeping thread and join it again.
WORK_PER_THREAD = 2_000_000

# More threads than this per usable CPU is a mistake, not a tuning choice: refused with
# a ValueError before the operating system is asked for them.
_MAX_THREADS_PER_CPU = 64


def _usable_cpus():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _omp_num_threads():
    # OMP_NUM_THREADS is honoured as the default, as it was when the kernels used OpenMP
    # and as NumPy's BLAS and most numerical libraries do (read once, as they do).
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


# Read once: the per-call cost matters for decode steps of a few tens of microseconds.
_CPUS = _usable_cpus()
_DEFAULT_THREADS = _omp_num_threads() or _CPUS


def _check_threads(n):
    n = check_int("num_threads", n)
    if n > _MAX_THREADS_PER_CPU * _CPUS:
        raise ValueError(f"num_threads={n} is more than {_MAX_THREADS_PER_CPU} threads for "
                         f"each of the {_CPUS} CPUs this process may use")
    return n


def set_num_threads(n):
    """Set how many threads fastattn's kernels use at most, by default.

    Parameters
    ----------
    n : int or None
        A positive thread count, or None to go back to the default: the CPUs this
        process may run on, or ``OMP_NUM_THREADS`` when that is set.

    Notes
    -----
    This is an upper bound: a call whose work is too small to pay for waking a thread
    runs on fewer (one, for a small decode step).

    Examples
    --------
    >>> import fastattn
    >>> fastattn.set_num_threads(1)
    >>> fastattn.get_num_threads()
    1
    >>> fastattn.set_num_threads(None)
    """
    global _num_threads
    _num_threads = None if n is None else _check_threads(n)


def get_num_threads():
    """Return how many threads fastattn's kernels use at most when ``num_threads=None``.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.get_num_threads() >= 1
    True
    """
    return _num_threads if _num_threads is not None else _DEFAULT_THREADS


def resolve_num_threads(num_threads):
    """The upper bound on a call's threads: its own argument, else the library default."""
    return get_num_threads() if num_threads is None else _check_threads(num_threads)


def call_threads(nthreads, items, work):
    """Threads to start for a call of ``items`` work items and ``work`` units in total.

    At most ``nthreads`` (the caller's bound) and ``items``, and no more than the
    work pays for (``WORK_PER_THREAD`` each); at least 1.
    """
    by_work = int(work // WORK_PER_THREAD)
    return max(1, min(nthreads, items, by_work))


def split_keys(items, key_blocks, nthreads):
    """How to spread ``items`` independent work items over ``nthreads`` threads.

    When the items alone cannot keep every thread busy (decoding: few sequences and
    heads, one query each), each item's keys are split too, into at most
    ``key_blocks`` parts whose partial results the kernel merges by their
    log-sum-exp (flash-decoding). Returns ``(nsplit, threads)``: the number of key
    parts per item and the threads worth starting for ``items * nsplit`` pieces.
    """
    nsplit = 1
    if nthreads > 1 and items < 2 * nthreads and key_blocks > 1:
        nsplit = min(key_blocks, -(-4 * nthreads // items))
    return nsplit, max(1, min(nthreads, items * nsplit))


def pool_workers():
    """Worker threads fastattn's pool has started so far (they sleep when idle)."""
    return _parallel.pool_workers()


class _KernelBlas:
    """Scipy's BLAS held at one thread while any kernel that calls it is running.

    The kernels call BLAS from their own threads (tile products the micro-kernels do
    not cover), where a multi-threaded BLAS would oversubscribe the cores. The limit is
    process-wide (OpenBLAS has no per-thread setting), so it is shared: the first
    kernel call in sets it, the last one out restores the previous setting, whatever
    the order in which concurrent calls from several Python threads finish.

    Only the BLAS that ``scipy.linalg.cython_blas`` links is touched (scipy's own
    OpenBLAS in the wheels): NumPy's ``@`` keeps its threads, and toggling NumPy's
    OpenBLAS too would wake its idle threads. When scipy's BLAS cannot be told apart
    (one shared system BLAS), all are limited.
    """

    # The libraries' own get/set calls, not threadpoolctl's limit(): that rebuilds the
    # libraries' info on every call (about 15 us, a third of a small call's time).

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None          # (library, its thread count) to restore
        self._libs = None

    def _select(self):
        from threadpoolctl import ThreadpoolController
        blas = ThreadpoolController().select(user_api="blas")
        scipy_owned = [lib.filepath for lib in blas.lib_controllers
                       if Path(lib.filepath).parent.name.startswith("scipy")]
        return (blas.select(filepath=scipy_owned) if scipy_owned else blas).lib_controllers

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                if self._libs is None:
                    self._libs = self._select()
                self._saved = [(lib, lib.get_num_threads()) for lib in self._libs]
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(1)
            self._users += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(n)
                self._saved = None
        return False


_kernel_blas = _KernelBlas()


def kernel_blas(uses_blas=True):
    """The BLAS policy of one kernel call: a context to run the kernel in.

    ``uses_blas`` says whether the kernel's products may call BLAS (see
    ``tile_products_native`` in tile.pxd); without BLAS nothing is touched.
    """
    return _kernel_blas if uses_blas else contextlib.nullcontext()


def tile_blas(dtype, ev):
    """:func:`kernel_blas` for a kernel over ``attend_tile`` (dense, block-sparse)."""
    return kernel_blas(_tiles_use_blas(np.dtype(dtype), ev))


@functools.lru_cache(maxsize=64)
def _tiles_use_blas(dtype, ev):
    # half operands are multiplied in float32 (or as bfloat16 pairs), like float32
    return not _dense.tile_products_run_natively(dtype != np.float64, ev)


def single_threaded_blas():
    """:func:`kernel_blas` for a kernel that always calls BLAS."""
    return _kernel_blas
