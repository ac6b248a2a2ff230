# The parallel skeleton's Cython face: run_items (cimported by every kernel family, see
# parallel.pxd) and the pool's Python-side controls. The pool itself is threadpool.h,
# compiled into this module only, so the whole process shares one pool.
import ml_dtypes
import numpy as np

cdef extern from "threadpool.h" nogil:
    ctypedef void (*fa_item_fn)(void *ctx, ptrdiff_t item, void *scratch)
    int fa_parallel_run(fa_item_fn item, void *ctx, ptrdiff_t nitems, ptrdiff_t grain,
                        size_t scratch_bytes, int nthreads)
    int fa_pool_workers()
    enum: FA_RUN_OK, FA_RUN_NOMEM, FA_RUN_NOTHREAD
    int fa_fail_allocs
    long fa_live_scratch


DTYPE_CODES = {"float32": DT_FLOAT32, "float64": DT_FLOAT64, "float16": DT_FLOAT16,
               "bfloat16": DT_BFLOAT16}

# The same keyed by NumPy's type number: dtype.name is a slow Python property (about
# 4 us a call), and a small decode step reads four dtypes. bfloat16's number is given
# when ml_dtypes registers it, so it is looked up here, once per process.
_CODE_BY_NUM = {np.dtype(name).num: code for name, code in DTYPE_CODES.items()
                if name != "bfloat16"}
_CODE_BY_NUM[np.dtype(ml_dtypes.bfloat16).num] = DT_BFLOAT16


def dtype_code(dtype):
    """The DType code of a NumPy dtype the kernels take (KeyError for others)."""
    return _CODE_BY_NUM[dtype.num]


cdef int run_items(ItemFn item, void *plan, Py_ssize_t nitems, Py_ssize_t grain,
                   size_t scratch_bytes, int nthreads, const char *label) except -1 nogil:
    cdef int status = fa_parallel_run(<fa_item_fn>item, plan, nitems, grain,
                                      scratch_bytes, nthreads)
    if status == FA_RUN_OK:
        return 0
    with gil:
        if status == FA_RUN_NOMEM:
            raise MemoryError(f"fastattn: a kernel thread could not allocate its "
                              f"{label.decode()} ({scratch_bytes} bytes)")
        raise RuntimeError(f"fastattn: the operating system refused to start "
                           f"{nthreads - 1} worker threads; ask for fewer with "
                           f"num_threads= or fastattn.set_num_threads()")


def pool_workers():
    """Worker threads the pool has started (the calling thread is not one of them)."""
    return fa_pool_workers()


def fail_next_allocations(int n):
    """Test hook: make the next ``n`` scratch allocations fail (0 turns it off)."""
    global fa_fail_allocs
    fa_fail_allocs = n


def live_scratch_blocks():
    """Scratch blocks allocated and not yet freed (0 whenever no kernel is running)."""
    return fa_live_scratch
