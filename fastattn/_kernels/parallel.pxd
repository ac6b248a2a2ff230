# The one parallel skeleton (threadpool.h) and the one dtype code, as every kernel
# family cimports them. A family writes one item hook,
#
#     cdef void family_item(void *plan, Py_ssize_t item, void *scratch) noexcept nogil
#
# which does one work item with the thread's scratch block, and hands it to run_items
# with the plan, the item count, the scratch size and its label. run_items partitions
# the items over the pool's threads, allocates and frees each thread's scratch, and
# raises the call's one MemoryError (labelled) when a thread had none.
#
# The hook is also where the family's one dtype dispatch lives: it switches on the
# plan's `dtype` (a DType) to the specialisation of its fused-type body.

ctypedef void (*ItemFn)(void *plan, Py_ssize_t item, void *scratch) noexcept nogil

# Element types of a kernel's operands, declared once in tilehalf.h and mirrored to Python
# as fastattn._kernels.parallel.DTYPE_CODES; a plan records one of them. The half types
# are computed in float32 (tile.pxd's TileOperands reads them).
cdef extern from "tilehalf.h":
    cpdef enum DType "fa_dtype":
        DT_FLOAT32 "FA_DT_FLOAT32"
        DT_FLOAT64 "FA_DT_FLOAT64"
        DT_FLOAT16 "FA_DT_FLOAT16"
        DT_BFLOAT16 "FA_DT_BFLOAT16"

cdef int run_items(ItemFn item, void *plan, Py_ssize_t nitems, Py_ssize_t grain,
                   size_t scratch_bytes, int nthreads, const char *label) except -1 nogil


# ---- carving a thread's scratch block into aligned pieces ----------------------------
# size: scratch_room(a) + scratch_room(b) + ...; use: p = scratch_take(&cursor, a), ...

cdef inline size_t scratch_room(size_t nbytes) noexcept nogil:
    return (nbytes + 63) // 64 * 64

cdef inline void *scratch_take(char **cursor, size_t nbytes) noexcept nogil:
    cdef void *piece = cursor[0]
    cursor[0] += scratch_room(nbytes)
    return piece
