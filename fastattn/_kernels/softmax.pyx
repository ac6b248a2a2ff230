# Masked softmax / log-softmax over the last axis of a stack of (R, N) matrices.
#
# Work is one flat index over (batch, row block): the items of the parallel skeleton
# (parallel.pxd), claimed `grain` at a time (every row costs about the same, so a few
# claims per thread balance the load at little cost). Each row is one call of the tile
# core's `softmax_row`: scale, mask, max, exp + sum, normalise, all on the output row
# while it sits in L1.
# The mask is read at its own (broadcast) shape through per-batch offsets and strides
# (0 where broadcast), and its block map lets a row block skip mask work entirely
# (BLOCK_FULL) or be filled without computing (BLOCK_SKIP).
# Extra memory: one row per thread, for log-softmax only (softmax_scratch).

from libc.stdint cimport uint8_t
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, scratch_room, DT_FLOAT32
from fastattn._kernels.parallel import dtype_code
from fastattn._kernels.tile cimport (
    intp_data,
    MaskView, mask_view,
    real, row_fill, MASK_NONE, MASK_BOOL, BLOCK_SKIP, BLOCK_FULL,
)
from fastattn._kernels.rowsoftmax cimport softmax_row

cnp.import_array()

cdef enum:
    CLAIMS_PER_THREAD = 8       # claims of `grain` row blocks each thread makes, about


cdef struct SoftmaxProblem:
    # sizes: nbatch matrices of R rows x N columns
    Py_ssize_t nbatch, R, N
    # the input: batch b's matrix at element offset x_off[b] of x, row stride ldx
    const void *x
    const Py_ssize_t *x_off
    Py_ssize_t ldx
    void *out                   # C-contiguous (nbatch, R, N); may be x
    int dtype                   # parallel.DType of x and out
    double scale
    MaskView mask               # the mask and its block map (tile.pxd)
    # causal band: row i keeps columns j <= i + causal_offset
    bint causal
    Py_ssize_t causal_offset
    bint log_out
    int block_r, nthreads


cdef void softmax_block(const SoftmaxProblem *p, Py_ssize_t item,
                        real *scratch) noexcept nogil:
    # One item: the rows of one row block. scratch: one row (log-softmax) or NULL.
    cdef const real *x = <const real *>p.x
    cdef real *out = <real *>p.out
    cdef Py_ssize_t nrb = (p.R + p.block_r - 1) // p.block_r
    cdef Py_ssize_t b, rb, r, r0, r1, visible
    cdef int state, kind
    cdef real *orow
    cdef const void *mrow
    cdef real empty = -INFINITY if p.log_out else 0

    b = item // nrb
    rb = item % nrb
    r0 = rb * p.block_r
    r1 = r0 + p.block_r
    if r1 > p.R:
        r1 = p.R
    state = BLOCK_FULL
    if p.mask.bmap != NULL:
        state = p.mask.bmap[p.mask.bmap_off[b] + rb * p.mask.bmap_rs]
    kind = MASK_NONE if state == BLOCK_FULL else p.mask.kind
    for r in range(r0, r1):
        orow = out + (b * p.R + r) * p.N
        visible = p.N
        if p.causal:
            visible = r + p.causal_offset + 1
            if visible < 0:
                visible = 0
            elif visible > p.N:
                visible = p.N
        if state == BLOCK_SKIP:
            # every key of these rows is masked out
            row_fill(orow, p.N, empty)
            continue
        mrow = NULL
        if kind == MASK_BOOL:
            mrow = <const void *>((<const uint8_t *>p.mask.data) + p.mask.off[b]
                                  + r * p.mask.rs)
        elif kind != MASK_NONE:
            mrow = <const void *>((<const real *>p.mask.data) + p.mask.off[b]
                                  + r * p.mask.rs)
        softmax_row(x + p.x_off[b] + r * p.ldx, orow, scratch, p.N, visible,
                    <real>p.scale, mrow, kind, p.mask.cs, p.log_out)


# The item hook, and this family's one dtype dispatch.

cdef void softmax_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const SoftmaxProblem *p = <const SoftmaxProblem *>run
    if p.dtype == DT_FLOAT32:
        softmax_block[float](p, item, <float *>scratch)
    else:
        softmax_block[double](p, item, <double *>scratch)


cdef size_t softmax_scratch(const SoftmaxProblem *p, size_t itemsize) noexcept nogil:
    # One thread's scratch: a row for log-softmax's exp pass; none for softmax.
    return scratch_room(p.N * itemsize) if p.log_out else 0


def softmax(cnp.ndarray x, cnp.ndarray out, cnp.ndarray x_off, Py_ssize_t ldx,
            Py_ssize_t R, Py_ssize_t N, double scale, object mask, bint causal,
            Py_ssize_t causal_offset, bint log_out, int block_r, int nthreads):
    """Run the masked-softmax kernel. Private: `fastattn.softmax` validates everything.

    x and out are float32 or float64 (one dtype); x_off (intp, one entry per batch)
    gives each batch's element offset into x. out is C-contiguous (nbatch, R, N) and
    may be x itself (then x_off and ldx must describe out's own layout). mask is a
    `fastattn._layout.PreparedMask` built with block_q = block_r, block_k = N, or None.
    nthreads: the threads to run on (fastattn._threads.call_threads).
    """
    cdef SoftmaxProblem p
    p.nbatch = x_off.shape[0]
    p.R = R
    p.N = N
    p.x = cnp.PyArray_DATA(x)
    p.x_off = intp_data(x_off)
    p.ldx = ldx
    p.out = cnp.PyArray_DATA(out)
    p.dtype = dtype_code(x.dtype)
    p.scale = scale
    p.mask = mask_view(mask)
    p.causal = causal
    p.causal_offset = causal_offset
    p.log_out = log_out
    p.block_r = block_r
    p.nthreads = nthreads
    cdef Py_ssize_t nitems = p.nbatch * ((R + block_r - 1) // block_r)
    cdef Py_ssize_t grain = max(1, nitems // (CLAIMS_PER_THREAD * <Py_ssize_t>nthreads))
    cdef size_t scratch = softmax_scratch(&p, x.itemsize)
    with nogil:
        run_items(softmax_item, &p, nitems, grain, scratch, nthreads,
                  "log-softmax row buffer")
