# Additive (Bahdanau) attention:  out = softmax(score + mask) @ value  with
#   score[i, j] = w . tanh(qp[i] + kp[j])      (qp = W_q q, kp = W_k k, projected by BLAS)
#
# Work is one flat index over (batch, query row block), handed out dynamically. For a
# block of rows, each score is one vectorised tanh-dot over the hidden axis, so the
# (L, S, hidden) tensor of the NumPy formula never exists: extra memory is one
# rows x S score block per thread (or the caller's weights array when it wants them).
# Each score row then goes through the tile core's `softmax_row`, and the block's
# output is one BLAS gemm  out[rows] = p @ value.

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels.tile cimport (
    intp_data,
    MaskView, mask_view,
    real, gemm_ab, softmax_row, row_fill, row_tanh_dot,
    MASK_NONE, MASK_BOOL, BLOCK_SKIP, BLOCK_FULL,
)

cnp.import_array()


cdef struct AdditiveProblem:
    # sizes: L queries, S keys, h hidden units, ev value features
    Py_ssize_t nbatch, L, S, h, ev
    # per-batch element offsets and row strides of qp (L, h), kp (S, h), value (S, ev)
    const Py_ssize_t *q_off
    const Py_ssize_t *k_off
    const Py_ssize_t *v_off
    Py_ssize_t ldq, ldk, ldv
    MaskView mask               # the mask and its block map (tile.pxd)
    int block_r, nthreads
    int alloc_failed


cdef void additive_kernel(AdditiveProblem *p, const real *qp, const real *kp, const real *w,
                          const real *v, real *out, real *weights) noexcept nogil:
    cdef Py_ssize_t nrb = (p.L + p.block_r - 1) // p.block_r
    cdef Py_ssize_t nitems = p.nbatch * nrb
    cdef Py_ssize_t item, b, rb, r, r0, rows, j
    cdef int state, kind
    cdef real *scratch
    cdef real *s
    cdef real *srow
    cdef const real *qrow
    cdef const real *kb
    cdef const uint8_t *keep
    cdef const void *mrow

    if nitems == 0:
        return
    scratch = NULL   # (set per thread below)
    with nogil, parallel(num_threads=p.nthreads):
        scratch = NULL
        if weights == NULL:
            scratch = <real *>malloc(p.block_r * p.S * sizeof(real))
        for item in prange(nitems, schedule='dynamic'):
            if weights == NULL and scratch == NULL:
                p.alloc_failed = 1
            else:
                b = item // nrb
                rb = item % nrb
                r0 = rb * p.block_r
                rows = p.L - r0
                if rows > p.block_r:
                    rows = p.block_r
                s = scratch if weights == NULL else weights + (b * p.L + r0) * p.S
                state = BLOCK_FULL
                if p.mask.bmap != NULL:
                    state = p.mask.bmap[p.mask.bmap_off[b] + rb * p.mask.bmap_rs]
                kind = MASK_NONE if state == BLOCK_FULL else p.mask.kind
                kb = kp + p.k_off[b]
                for r in range(rows):
                    srow = s + r * p.S
                    if state == BLOCK_SKIP:
                        row_fill(srow, p.S, 0)
                        continue
                    qrow = qp + p.q_off[b] + (r0 + r) * p.ldq
                    mrow = NULL
                    if kind == MASK_BOOL:
                        keep = (<const uint8_t *>p.mask.data) + p.mask.off[b] + (r0 + r) * p.mask.rs
                        mrow = <const void *>keep
                        # score[j] <- w . tanh(qp[i] + kp[j]), only for keys that are kept
                        for j in range(p.S):
                            if keep[j * p.mask.cs]:
                                srow[j] = row_tanh_dot(qrow, kb + j * p.ldk, w, p.h)
                            else:
                                srow[j] = -INFINITY
                    else:
                        if kind != MASK_NONE:
                            mrow = <const void *>((<const real *>p.mask.data) + p.mask.off[b]
                                                  + (r0 + r) * p.mask.rs)
                        for j in range(p.S):
                            srow[j] = row_tanh_dot(qrow, kb + j * p.ldk, w, p.h)
                    # srow <- softmax(srow + mask)
                    softmax_row(srow, srow, NULL, p.S, p.S, 1, mrow, kind, p.mask.cs, False)
                # out[r0:r0+rows] <- p @ value
                if p.ev > 0:
                    gemm_ab(<int>rows, <int>p.ev, <int>p.S, 1, s, <int>p.S,
                            v + p.v_off[b], <int>p.ldv, 0, out + (b * p.L + r0) * p.ev,
                            <int>p.ev)
        free(scratch)
    # end: with nogil, parallel


def additive(cnp.ndarray qp, cnp.ndarray kp, cnp.ndarray w, cnp.ndarray v,
             cnp.ndarray out, object weights,
             cnp.ndarray q_off, cnp.ndarray k_off, cnp.ndarray v_off,
             Py_ssize_t ldq, Py_ssize_t ldk, Py_ssize_t ldv,
             Py_ssize_t L, Py_ssize_t S, Py_ssize_t h, Py_ssize_t ev,
             object mask, int block_r, int nthreads):
    """Run the additive-attention kernel. Private: `fastattn.scoring` validates everything.

    All arrays share one dtype (float32 or float64). qp, kp, v are base arrays with
    per-batch element offsets (intp vectors); w is contiguous (h,); out is C-contiguous
    (nbatch, L, ev); weights is C-contiguous (nbatch, L, S) or None. mask is a
    `fastattn._layout.PreparedMask` built with block_q = block_r, block_k = S, or None.
    S must be at least 1.
    """
    cdef AdditiveProblem p
    cdef void *qd = cnp.PyArray_DATA(qp)
    cdef void *kd = cnp.PyArray_DATA(kp)
    cdef void *wd = cnp.PyArray_DATA(w)
    cdef void *vd = cnp.PyArray_DATA(v)
    cdef void *od = cnp.PyArray_DATA(out)
    cdef void *pd = NULL
    if weights is not None:
        pd = cnp.PyArray_DATA(weights)
    p.nbatch = q_off.shape[0]
    p.L = L
    p.S = S
    p.h = h
    p.ev = ev
    p.q_off = intp_data(q_off)
    p.k_off = intp_data(k_off)
    p.v_off = intp_data(v_off)
    p.ldq = ldq
    p.ldk = ldk
    p.ldv = ldv
    p.mask = mask_view(mask)
    p.block_r = block_r
    p.nthreads = nthreads
    p.alloc_failed = 0
    cdef bint is_f32 = qp.dtype.num == cnp.NPY_FLOAT32
    with nogil:
        if is_f32:
            additive_kernel[float](&p, <const float *>qd, <const float *>kd, <const float *>wd,
                                   <const float *>vd, <float *>od, <float *>pd)
        else:
            additive_kernel[double](&p, <const double *>qd, <const double *>kd,
                                    <const double *>wd, <const double *>vd, <double *>od,
                                    <double *>pd)
    if p.alloc_failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its score block")
