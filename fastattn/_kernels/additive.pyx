# Additive (Bahdanau) attention:  out = softmax(score + mask) @ value  with
#   score[i, j] = w . tanh(qp[i] + kp[j])      (qp = W_q q, kp = W_k k)
#
# Two parallel passes; the caller keeps BLAS single-threaded around both:
#   project   (fastattn._kernels.linear, shared with multi-head attention)
#             qp = q @ W_q.T for each distinct query matrix and kp.T = W_k @ k.T for each
#             distinct key matrix, in the same threads (no NumPy BLAS threads). The key
#             projections are stored transposed, one column per key, with the key axis
#             padded to FA_TANH_KEY_PAD columns.
#   additive  one flat index over (batch, query row block): the items of the parallel
#             skeleton (parallel.pxd), handed out dynamically one at a time. For
#             each row, `row_tanh_scores` scores a span of keys vectorised over the keys
#             (no lane sums); the spans are cut into pieces of ~128 KiB of kp.T so that
#             the rows of a block reuse each piece from L2. A bool-masked row only scores
#             the keys from its first to its last kept one. Each score row then goes
#             through the tile core's `softmax_row`, and the block's output is one BLAS
#             gemm  out[rows] = p @ value.
# The (L, S, hidden) tensor of the NumPy formula never exists: extra memory is the two
# projections and a rows x S score block per thread (additive_scratch).

from libc.stdint cimport uint8_t
from libc.math cimport INFINITY
import numpy as np
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, scratch_room, scratch_take, DT_FLOAT32
from fastattn._kernels.parallel import dtype_code
from fastattn._kernels.tile cimport (
    intp_data,
    MaskView, mask_view,
    real, gemm_ab, row_fill,
    MASK_NONE, MASK_BOOL, BLOCK_SKIP, BLOCK_FULL,
)
from fastattn._kernels.rowsoftmax cimport softmax_row
from fastattn._kernels.tanhscores cimport row_tanh_scores, FA_TANH_KEY_PAD

cnp.import_array()

# The key axis of kp.T (and of a score row) is padded to a multiple of this.
KEY_PAD = FA_TANH_KEY_PAD

cdef enum:
    KEY_PIECE_BYTES = 128 * 1024  # kp.T columns scored per pass over a row block


# ---- scores, softmax, p @ value ----------------------------------------------------------

cdef struct AdditiveProblem:
    # sizes: L queries, S keys, h hidden units, ev value features
    Py_ssize_t nbatch, L, S, h, ev
    Py_ssize_t ldk              # row stride of kp.T: S rounded up to FA_TANH_KEY_PAD
    # qp (L, h; row stride h), kp.T (h, ldk) and value (S, ev) of batch b at element
    # offsets q_off[b], k_off[b], v_off[b] of their arrays
    const void *qp
    const void *kpt
    const void *v
    const Py_ssize_t *q_off
    const Py_ssize_t *k_off
    const Py_ssize_t *v_off
    Py_ssize_t ldv
    const void *w               # (h,)
    void *out                   # C-contiguous (nbatch, L, ev)
    void *weights               # C-contiguous (nbatch, L, S), or NULL
    int dtype                   # parallel.DType of every array
    MaskView mask               # the mask and its block map (tile.pxd)
    int block_r, nthreads


cdef inline void kept_span(const uint8_t *keep, Py_ssize_t cs, Py_ssize_t S,
                           Py_ssize_t *span) noexcept nogil:
    # span[0:2] <- the columns from the first kept key to the last one, widened to whole
    # FA_TANH_KEY_PAD blocks; empty (0, 0) when no key is kept
    cdef Py_ssize_t j0 = 0
    cdef Py_ssize_t j1 = S
    while j0 < S and not keep[j0 * cs]:
        j0 += 1
    if j0 == S:
        span[0] = span[1] = 0
        return
    while not keep[(j1 - 1) * cs]:
        j1 -= 1
    span[0] = j0 - j0 % FA_TANH_KEY_PAD
    span[1] = (j1 + FA_TANH_KEY_PAD - 1) // FA_TANH_KEY_PAD * FA_TANH_KEY_PAD


cdef void score_rows(const AdditiveProblem *p, Py_ssize_t b, Py_ssize_t r0, Py_ssize_t rows,
                     int kind, const real *qp, const real *kpt, const real *w,
                     real *s, Py_ssize_t *span) noexcept nogil:
    # s[r, span_r] <- w . tanh(qp[r0 + r] + kp[j]) for the keys j of each row's span
    # (row stride ldk); span[2r : 2r + 2] <- that span, all keys unless a bool mask
    # limits it
    cdef const real *qb = qp + p.q_off[b]
    cdef const real *kb = kpt + p.k_off[b]
    cdef const uint8_t *keep
    cdef Py_ssize_t r, c0, c1, lo, hi
    cdef Py_ssize_t piece = p.ldk
    for r in range(rows):
        if kind == MASK_BOOL:
            keep = (<const uint8_t *>p.mask.data) + p.mask.off[b] + (r0 + r) * p.mask.rs
            kept_span(keep, p.mask.cs, p.S, span + 2 * r)
        else:
            span[2 * r] = 0
            span[2 * r + 1] = p.ldk
    if p.h > 0:
        piece = KEY_PIECE_BYTES // (p.h * <Py_ssize_t>sizeof(real))
        piece = max(FA_TANH_KEY_PAD, piece - piece % FA_TANH_KEY_PAD)
    # piece by piece of kp.T, so each piece is read from L2 by every row of the block
    c0 = 0
    while c0 < p.ldk:
        c1 = min(c0 + piece, p.ldk)
        for r in range(rows):
            lo = max(span[2 * r], c0)
            hi = min(span[2 * r + 1], c1)
            if lo < hi:
                row_tanh_scores(qb + (r0 + r) * p.h, kb + lo, p.ldk, w, p.h, hi - lo,
                                s + r * p.ldk + lo)
        c0 = c1


cdef void additive_block(const AdditiveProblem *p, Py_ssize_t item,
                         real *scratch) noexcept nogil:
    # One item: a block of query rows. scratch (additive_scratch): the block_r x ldk
    # score block, then 2 span ends per row.
    cdef const real *qp = <const real *>p.qp
    cdef const real *kpt = <const real *>p.kpt
    cdef const real *w = <const real *>p.w
    cdef const real *v = <const real *>p.v
    cdef real *out = <real *>p.out
    cdef real *weights = <real *>p.weights
    cdef Py_ssize_t nrb = (p.L + p.block_r - 1) // p.block_r
    cdef Py_ssize_t b, rb, r, r0, rows, lo, hi, ldp
    cdef int state, kind
    cdef char *cursor = <char *>scratch
    cdef Py_ssize_t *span
    cdef real *srow
    cdef real *dest
    cdef real *pb
    cdef const void *mrow

    scratch_take(&cursor, p.block_r * p.ldk * sizeof(real))
    span = <Py_ssize_t *>scratch_take(&cursor, 2 * p.block_r * sizeof(Py_ssize_t))
    b = item // nrb
    rb = item % nrb
    r0 = rb * p.block_r
    rows = p.L - r0
    if rows > p.block_r:
        rows = p.block_r
    state = BLOCK_FULL
    if p.mask.bmap != NULL:
        state = p.mask.bmap[p.mask.bmap_off[b] + rb * p.mask.bmap_rs]
    kind = MASK_NONE if state == BLOCK_FULL else p.mask.kind
    if state != BLOCK_SKIP:
        score_rows(p, b, r0, rows, kind, qp, kpt, w, scratch, span)
    for r in range(rows):
        srow = scratch + r * p.ldk
        dest = srow if weights == NULL else weights + (b * p.L + r0 + r) * p.S
        if state == BLOCK_SKIP:
            row_fill(dest, p.S, 0)
            continue
        mrow = NULL
        if kind == MASK_BOOL:
            mrow = <const void *>((<const uint8_t *>p.mask.data) + p.mask.off[b]
                                  + (r0 + r) * p.mask.rs)
            # keys outside the scored span are all masked: give them -inf
            lo = min(span[2 * r], p.S)
            hi = min(span[2 * r + 1], p.S)
            row_fill(srow, lo, -INFINITY)
            row_fill(srow + hi, p.S - hi, -INFINITY)
        elif kind != MASK_NONE:
            mrow = <const void *>((<const real *>p.mask.data) + p.mask.off[b]
                                  + (r0 + r) * p.mask.rs)
        # dest <- softmax(srow + mask)
        softmax_row(srow, dest, NULL, p.S, p.S, 1, mrow, kind, p.mask.cs, False)
    # out[r0:r0+rows] <- p @ value
    if p.ev > 0:
        pb = scratch
        ldp = p.ldk
        if weights != NULL:
            pb = weights + (b * p.L + r0) * p.S
            ldp = p.S
        gemm_ab(<int>rows, <int>p.ev, <int>p.S, 1, pb, <int>ldp,
                v + p.v_off[b], <int>p.ldv, 0, out + (b * p.L + r0) * p.ev,
                <int>p.ev)


# The item hook, and this family's one dtype dispatch.

cdef void additive_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const AdditiveProblem *p = <const AdditiveProblem *>run
    if p.dtype == DT_FLOAT32:
        additive_block[float](p, item, <float *>scratch)
    else:
        additive_block[double](p, item, <double *>scratch)


cdef size_t additive_scratch(const AdditiveProblem *p, size_t itemsize) noexcept nogil:
    # One thread's scratch: a block_r x ldk score block, then 2 span ends per row.
    return (scratch_room(p.block_r * p.ldk * itemsize)
            + scratch_room(2 * p.block_r * sizeof(Py_ssize_t)))


def additive(cnp.ndarray qp, cnp.ndarray kpt, cnp.ndarray w, cnp.ndarray v,
             cnp.ndarray out, object weights,
             cnp.ndarray q_off, cnp.ndarray k_off, cnp.ndarray v_off, Py_ssize_t ldv,
             Py_ssize_t L, Py_ssize_t S, Py_ssize_t ev,
             object mask, int block_r, int nthreads):
    """Run the additive-attention kernel. Private: `fastattn.scoring` validates everything.

    All arrays share one dtype (float32 or float64) and are C-contiguous unless stated:
    qp holds (L, h) query projections and kpt (h, ldk) transposed key projections, with
    ldk = kpt.shape[-1] a multiple of KEY_PAD and >= S; q_off, k_off, v_off (intp) give
    each batch's element offset into qp, kpt and v (value base array, row stride ldv);
    w is (h,); out is (nbatch, L, ev); weights is (nbatch, L, S) or None. mask is a
    `fastattn._layout.PreparedMask` built with block_q = block_r, block_k = S, or None.
    S must be at least 1. nthreads: the threads to run on (fastattn._threads.call_threads).
    BLAS must be single-threaded.
    """
    cdef AdditiveProblem p
    p.nbatch = q_off.shape[0]
    p.L = L
    p.S = S
    p.h = w.shape[0]
    p.ev = ev
    p.ldk = kpt.shape[kpt.ndim - 1]
    p.qp = cnp.PyArray_DATA(qp)
    p.kpt = cnp.PyArray_DATA(kpt)
    p.v = cnp.PyArray_DATA(v)
    p.q_off = intp_data(q_off)
    p.k_off = intp_data(k_off)
    p.v_off = intp_data(v_off)
    p.ldv = ldv
    p.w = cnp.PyArray_DATA(w)
    p.out = cnp.PyArray_DATA(out)
    p.weights = NULL if weights is None else cnp.PyArray_DATA(<cnp.ndarray>weights)
    p.dtype = dtype_code(qp.dtype)
    p.mask = mask_view(mask)
    p.block_r = block_r
    p.nthreads = nthreads
    cdef Py_ssize_t nitems = p.nbatch * ((L + block_r - 1) // block_r)
    cdef size_t scratch = additive_scratch(&p, qp.itemsize)
    with nogil:
        run_items(additive_item, &p, nitems, 1, scratch, nthreads, "additive score block")


cdef struct TanhScoresCall:
    const void *a
    const void *kpt
    const void *w
    void *s
    Py_ssize_t h, n
    int dtype


cdef void tanh_scores_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    # tanh_scores' one item, on the calling thread
    cdef const TanhScoresCall *c = <const TanhScoresCall *>run
    if c.dtype == DT_FLOAT32:
        row_tanh_scores[float](<const float *>c.a, <const float *>c.kpt, c.n,
                               <const float *>c.w, c.h, c.n, <float *>c.s)
    else:
        row_tanh_scores[double](<const double *>c.a, <const double *>c.kpt, c.n,
                                <const double *>c.w, c.h, c.n, <double *>c.s)


def tanh_scores(cnp.ndarray a, cnp.ndarray kpt, cnp.ndarray w):
    """``s[j] = sum_c w[c] * tanh(a[c] + kpt[c, j])``: the kernel's score routine for one
    query, exposed for its tests. a, w: (h,); kpt: (h, n), n a multiple of KEY_PAD; all
    C-contiguous float32 or all float64.
    """
    if not (a.dtype == kpt.dtype == w.dtype and a.dtype in (np.float32, np.float64)):
        raise TypeError(f"a, kpt and w must all be float32 or all float64, got {a.dtype}, "
                        f"{kpt.dtype}, {w.dtype}")
    if (a.ndim != 1 or w.ndim != 1 or kpt.ndim != 2 or w.shape[0] != a.shape[0]
            or kpt.shape[0] != a.shape[0] or kpt.shape[1] % KEY_PAD):
        raise ValueError(f"need a (h,), kpt (h, n) with n a multiple of {KEY_PAD}, w (h,): "
                         f"got {(<object>a).shape}, {(<object>kpt).shape}, "
                         f"{(<object>w).shape}")
    if not (a.flags.c_contiguous and kpt.flags.c_contiguous and w.flags.c_contiguous):
        raise ValueError("a, kpt and w must be C-contiguous")
    cdef TanhScoresCall c
    cdef cnp.ndarray s = np.empty(kpt.shape[1], dtype=a.dtype)
    c.a = cnp.PyArray_DATA(a)
    c.kpt = cnp.PyArray_DATA(kpt)
    c.w = cnp.PyArray_DATA(w)
    c.s = cnp.PyArray_DATA(s)
    c.h = kpt.shape[0]
    c.n = kpt.shape[1]
    c.dtype = dtype_code(a.dtype)
    with nogil:
        run_items(tanh_scores_item, &c, 1, 1, 0, 1, "")
    return s
