# Masked softmax / log-softmax over the last axis of a stack of (R, N) matrices.
#
# Work is one flat index over (batch, row block), split statically over OpenMP threads
# (every row costs the same). Each row is one call of the tile core's `softmax_row`:
# scale, mask, max, exp + sum, normalise, all on the output row while it sits in L1.
# The mask is read at its own (broadcast) shape through per-batch offsets and strides
# (0 where broadcast), and its block map lets a row block skip mask work entirely
# (BLOCK_FULL) or be filled without computing (BLOCK_SKIP).
# Extra memory: one row per thread, for log-softmax only.

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels.tile cimport (
    intp_data,
    MaskView, mask_view,
    real, row_fill, MASK_NONE, MASK_BOOL, BLOCK_SKIP, BLOCK_FULL,
)
from fastattn._kernels.rowsoftmax cimport softmax_row

cnp.import_array()


cdef struct SoftmaxProblem:
    # sizes: nbatch matrices of R rows x N columns
    Py_ssize_t nbatch, R, N
    # element offset of each batch's input matrix, and its row stride
    const Py_ssize_t *x_off
    Py_ssize_t ldx
    MaskView mask               # the mask and its block map (tile.pxd)
    # causal band: row i keeps columns j <= i + causal_offset
    bint causal
    Py_ssize_t causal_offset
    bint log_out
    int block_r, nthreads
    int alloc_failed


cdef void softmax_kernel(SoftmaxProblem *p, real scale, const real *x,
                         real *out) noexcept nogil:
    cdef Py_ssize_t nrb = (p.R + p.block_r - 1) // p.block_r
    cdef Py_ssize_t nitems = p.nbatch * nrb
    cdef Py_ssize_t item, b, rb, r, r0, r1, visible
    cdef int state, kind
    cdef real *scratch
    cdef real *orow
    cdef const void *mrow
    cdef real empty = -INFINITY if p.log_out else 0

    if nitems == 0:
        return
    scratch = NULL   # (set per thread below)
    with nogil, parallel(num_threads=p.nthreads):
        scratch = <real *>malloc(p.N * sizeof(real)) if p.log_out else NULL
        for item in prange(nitems, schedule='static'):
            if p.log_out and scratch == NULL:
                p.alloc_failed = 1
            else:
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
                                scale, mrow, kind, p.mask.cs, p.log_out)
        free(scratch)
    # end: with nogil, parallel


def softmax(cnp.ndarray x, cnp.ndarray out, cnp.ndarray x_off, Py_ssize_t ldx,
            Py_ssize_t R, Py_ssize_t N, double scale, object mask, bint causal,
            Py_ssize_t causal_offset, bint log_out, int block_r, int nthreads):
    """Run the masked-softmax kernel. Private: `fastattn.softmax` validates everything.

    x and out are float32 or float64 (one dtype); x_off (intp, one entry per batch)
    gives each batch's element offset into x. out is C-contiguous (nbatch, R, N) and
    may be x itself (then x_off and ldx must describe out's own layout). mask is a
    `fastattn._layout.PreparedMask` built with block_q = block_r, block_k = N, or None.
    """
    cdef SoftmaxProblem p
    cdef void *xd = cnp.PyArray_DATA(x)
    cdef void *od = cnp.PyArray_DATA(out)
    p.nbatch = x_off.shape[0]
    p.R = R
    p.N = N
    p.x_off = intp_data(x_off)
    p.ldx = ldx
    p.mask = mask_view(mask)
    p.causal = causal
    p.causal_offset = causal_offset
    p.log_out = log_out
    p.block_r = block_r
    p.nthreads = nthreads
    p.alloc_failed = 0
    cdef bint is_f32 = x.dtype.num == cnp.NPY_FLOAT32
    with nogil:
        if is_f32:
            softmax_kernel[float](&p, <float>scale, <const float *>xd, <float *>od)
        else:
            softmax_kernel[double](&p, scale, <const double *>xd, <double *>od)
    if p.alloc_failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its row buffer")
