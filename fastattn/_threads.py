"""Thread-count control shared by every kernel, and single-threaded BLAS inside them."""
import contextlib
import threading
from pathlib import Path

import numpy as np

from fastattn._kernels import dense as _dense
from fastattn._validation import check_int

__all__ = ["set_num_threads", "get_num_threads"]

_num_threads = None           # None: OpenMP's default (OMP_NUM_THREADS or all cores)
_controller = None
_controller_lock = threading.Lock()


def set_num_threads(n):
    """Set how many threads fastattn's kernels use by default.

    Parameters
    ----------
    n : int or None
        A positive thread count, or None to go back to the default: all cores, or
        ``OMP_NUM_THREADS`` when that is set.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.set_num_threads(1)
    >>> fastattn.get_num_threads()
    1
    >>> fastattn.set_num_threads(None)
    """
    global _num_threads
    _num_threads = None if n is None else check_int("num_threads", n)


def get_num_threads():
    """Return how many threads fastattn's kernels use when ``num_threads=None``.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.get_num_threads() >= 1
    True
    """
    return _num_threads if _num_threads is not None else max(1, _dense.max_threads())




def resolve_num_threads(num_threads):
    """The thread count a call uses: its own argument, else the library default."""
    return get_num_threads() if num_threads is None else check_int("num_threads", num_threads)


def _kernel_blas_controller():
    """threadpoolctl controller for the BLAS library the kernels call.

    That is the one scipy.linalg.cython_blas links (scipy's own OpenBLAS in the
    wheels). Touching only it matters: toggling NumPy's separate OpenBLAS as well
    wakes its idle threads, which then spin on the cores our threads need. When
    scipy's BLAS cannot be told apart (one shared system BLAS), limit them all.
    """
    from threadpoolctl import ThreadpoolController
    blas = ThreadpoolController().select(user_api="blas")
    scipy_owned = [lib.filepath for lib in blas.lib_controllers
                   if Path(lib.filepath).parent.name.startswith("scipy")]
    return blas.select(filepath=scipy_owned) if scipy_owned else blas


def split_keys(items, key_blocks, nthreads):
    """How to spread ``items`` independent work items over ``nthreads`` threads.

    When the items alone cannot keep every thread busy (decoding: few sequences and
    heads, one query each), each item's keys are split too, into at most
    ``key_blocks`` parts whose partial results the kernel merges by their
    log-sum-exp (flash-decoding). Returns ``(nsplit, threads)``: the number of key
    parts per item and the threads worth starting for ``items * nsplit`` pieces.
    """
    nsplit = 1
    if items < 2 * nthreads and key_blocks > 1:
        nsplit = min(key_blocks, -(-4 * nthreads // items))
    return nsplit, max(1, min(nthreads, items * nsplit))


def tile_blas_limit(dtype, ev):
    """The BLAS thread limit a kernel over ``attend_tile`` needs (see tile.pxd).

    None when the tile products run on fastattn's own micro-kernels (float32 on an
    AVX-512 CPU, ``ev`` a multiple of 16): BLAS is then never called, and not touching
    its thread count spares waking its idle worker threads.
    """
    if _dense.tile_products_run_natively(dtype == np.float32, ev):
        return contextlib.nullcontext()
    return single_threaded_blas()


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS to one thread while our OpenMP threads each call it on their tiles."""
    global _controller
    if _controller is None:
        with _controller_lock:
            if _controller is None:
                _controller = _kernel_blas_controller()
    with _controller.limit(limits=1):
        yield
