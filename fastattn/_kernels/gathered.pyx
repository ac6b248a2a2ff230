# Content-based sparse attention: rows grouped by their content (a hash sort, a
# clustering) attend to a gathered set of key rows, over the shared tile core.
#
# `gathered_attention` takes work items, each pairing a run of query rows with a run
# of key rows; the runs are slices of row-index arrays (the sorted order of a Reformer
# hash round, the members and top-k keys of a cluster), so nothing is permuted in
# memory beforehand. Per item and thread:
#   qg <- q[q_rows[run]]                                  (gather, <= block_q rows)
#   for each block of <= block_k key rows:
#       kg, vg <- k[k_rows[...]], v[k_rows[...]]          (gather; keys optionally scaled
#                                                          per row: Reformer's unit keys)
#       bias <- -inf where causal forbids, -self_penalty on a query's own row
#       attend_tile(qg, kg, vg, bias)                     (online softmax, tile.pxd)
#   out[out_rows[run]], lse[...] <- finish_row(...)       (scatter)
# Causal and self rules compare row indices: the caller numbers query and key rows
# alike (batch * L + position), so "key row > query row" is "key in the future".
#
# `merge_parts` merges per-round results by their log-sum-exp (merge_partial_row).
# Both run on the parallel skeleton (parallel.pxd): gathered attention's items are the
# work items, merge_parts' the output rows. Extra memory is one scratch block per thread
# (gathered_scratch): gathered tiles, one score tile, one bias tile (causal or self rule
# only), the running softmax state, and for unmasked float32 the key-major buffers.
# The content-based grouping itself (k-means, LSH hashing, top-k keys, Sinkhorn's block
# mixing) is in clustering.pyx.

from libc.string cimport memcpy
from libc.math cimport INFINITY
cimport numpy as cnp
import numpy as np

from fastattn._kernels.parallel cimport run_items, scratch_room, scratch_take, DT_FLOAT32
from fastattn._kernels.parallel import dtype_code
from fastattn._kernels.tile cimport (
    intp_data, real, attend_tile, finish_row, merge_partial_row,
    kmajor_ld, kmajor_scratch_bytes, attend_tile_kmajor,
    row_copy_scale, block_len, start_rows,
    MASK_NONE, MASK_FLOAT, BAND_ALL,
)

cnp.import_array()


cdef struct Gathered:
    # One call of gathered_attention, filled once from its validated arguments.
    const void *q
    const void *k
    const void *v
    void *out
    void *lse                    # NULL: no log-sum-exp wanted
    const void *k_scale          # per key row factor (real), or NULL: keys = k_scale * k
    Py_ssize_t nitems
    int e, ev, block_q, block_k, nthreads
    int dtype                    # parallel.DType of every operand
    Py_ssize_t ldq, ldk, ldv
    const Py_ssize_t *q_rows     # query row of each slot
    const Py_ssize_t *out_rows   # output row of each slot (parallel to q_rows)
    const Py_ssize_t *k_rows     # key/value row of each slot
    const Py_ssize_t *items      # (nitems, 4): q_lo, q_hi, k_lo, k_hi (slices of the above)
    double scale
    bint causal                  # key row > query row is masked out
    double self_penalty          # subtracted from a query's score with its own row (0: no rule)


cdef inline void gather_rows(real *dst, const real *src, Py_ssize_t ld,
                             const Py_ssize_t *rows, Py_ssize_t n, int width,
                             const real *row_scale) noexcept nogil:
    # dst[r, :width] <- src[rows[r], :width] (* row_scale[rows[r]])   (dst row stride = width)
    cdef Py_ssize_t r
    for r in range(n):
        if row_scale == NULL:
            memcpy(dst + r * width, src + rows[r] * ld, width * sizeof(real))
        else:
            row_copy_scale(dst + r * width, src + rows[r] * ld, width, row_scale[rows[r]])


cdef inline bint has_bias(const Gathered *p) noexcept nogil:
    return p.causal or p.self_penalty != 0


cdef inline void fill_bias(const Gathered *p, const Py_ssize_t *qr, int rows,
                           const Py_ssize_t *kr, int cols, real *bias) noexcept nogil:
    # bias[r, c] <- -inf (causal: key after query), -self_penalty (own row), else 0.
    # Branch-free selects, so that the compiler can vectorise the row loops.
    cdef int r, c
    cdef Py_ssize_t row
    cdef real penalty = -<real>p.self_penalty
    cdef real *brow
    for r in range(rows):
        brow = bias + r * cols
        row = qr[r]
        for c in range(cols):
            brow[c] = penalty if kr[c] == row else 0
        if p.causal:
            for c in range(cols):
                brow[c] = -INFINITY if kr[c] > row else brow[c]


cdef inline Py_ssize_t gathered_kmajor_ld(const Gathered *p) noexcept nogil:
    # Unmasked float32 tiles go key-major (tile.pxd): the gathered query block is packed
    # once for all its key tiles. The largest block's row stride there, 0 when that path
    # does not apply.
    return 0 if has_bias(p) else kmajor_ld(p.dtype == DT_FLOAT32, p.ev, p.block_q)


cdef size_t gathered_scratch(const Gathered *p, size_t itemsize) noexcept nogil:
    # One thread's scratch (carved in this order by gathered_run): the gathered query,
    # key and value tiles, the score tile, the bias tile (masked calls only), the
    # accumulator, m and l, then the key-major buffers (if any).
    return (scratch_room(p.block_q * p.e * itemsize)
            + scratch_room(p.block_k * p.e * itemsize)
            + scratch_room(p.block_k * p.ev * itemsize)
            + scratch_room(p.block_q * p.block_k * itemsize)
            + (scratch_room(p.block_q * p.block_k * itemsize) if has_bias(p) else 0)
            + scratch_room(p.block_q * p.ev * itemsize)
            + 2 * scratch_room(p.block_q * itemsize)
            + kmajor_scratch_bytes(gathered_kmajor_ld(p), p.e, p.block_k, itemsize))


cdef void gathered_run(const Gathered *p, Py_ssize_t item, real *scratch) noexcept nogil:
    # One item: a run of <= block_q query rows against its run of key rows.
    cdef const real *q = <const real *>p.q
    cdef const real *k = <const real *>p.k
    cdef const real *v = <const real *>p.v
    cdef real *out = <real *>p.out
    cdef real *lse = <real *>p.lse
    cdef real scale = <real>p.scale
    cdef Py_ssize_t r, q_lo, k_lo, k_hi, kt
    cdef int rows, cols, kind
    cdef bint masked = has_bias(p)
    cdef char *cursor = <char *>scratch
    cdef real *qg
    cdef real *kg
    cdef real *vg
    cdef real *s
    cdef real *bias = NULL
    cdef real *acc
    cdef real *m
    cdef real *l
    cdef real *kscratch
    # this item's packing state for attend_tile_kmajor
    cdef Py_ssize_t ldqt

    qg = <real *>scratch_take(&cursor, p.block_q * p.e * sizeof(real))
    kg = <real *>scratch_take(&cursor, p.block_k * p.e * sizeof(real))
    vg = <real *>scratch_take(&cursor, p.block_k * p.ev * sizeof(real))
    s = <real *>scratch_take(&cursor, p.block_q * p.block_k * sizeof(real))
    if masked:
        bias = <real *>scratch_take(&cursor, p.block_q * p.block_k * sizeof(real))
    acc = <real *>scratch_take(&cursor, p.block_q * p.ev * sizeof(real))
    m = <real *>scratch_take(&cursor, p.block_q * sizeof(real))
    l = <real *>scratch_take(&cursor, p.block_q * sizeof(real))
    kscratch = <real *>cursor if gathered_kmajor_ld(p) else NULL

    q_lo = p.items[4 * item]
    rows = <int>(p.items[4 * item + 1] - q_lo)
    k_lo = p.items[4 * item + 2]
    k_hi = p.items[4 * item + 3]
    gather_rows(qg, q, p.ldq, p.q_rows + q_lo, rows, p.e, NULL)
    start_rows(rows, acc, p.ev, p.ev, m, l)
    ldqt = -1 if kscratch != NULL else 0

    kt = k_lo
    while kt < k_hi:
        cols = block_len(k_hi, kt, p.block_k)
        gather_rows(kg, k, p.ldk, p.k_rows + kt, cols, p.e, <const real *>p.k_scale)
        gather_rows(vg, v, p.ldv, p.k_rows + kt, cols, p.ev, NULL)
        if attend_tile_kmajor(rows, cols, p.e, p.ev, scale, qg, p.e, kscratch, &ldqt,
                              kg, p.e, vg, p.ev, NULL, acc, p.ev, m, l):
            kt = kt + cols
            continue
        kind = MASK_NONE
        if masked:
            fill_bias(p, p.q_rows + q_lo, rows, p.k_rows + kt, cols, bias)
            kind = MASK_FLOAT
        attend_tile(qg, p.e, rows, kg, p.e, vg, p.ev, cols, p.e, p.ev, scale,
                    <const void *>bias, kind, cols, 1, -BAND_ALL, BAND_ALL, NULL, NULL, 0,
                    s, acc, p.ev, m, l)
        kt = kt + cols

    # out[out_rows] <- acc / l;  lse[out_rows] <- m + log(l)
    for r in range(rows):
        finish_row(acc + r * p.ev, p.ev, m[r], l[r],
                   (lse + p.out_rows[q_lo + r]) if lse != NULL else NULL)
        memcpy(out + p.out_rows[q_lo + r] * p.ev, acc + r * p.ev, p.ev * sizeof(real))


cdef void gathered_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    # The item hook, and gathered attention's one dtype dispatch.
    cdef const Gathered *p = <const Gathered *>run
    if p.dtype == DT_FLOAT32:
        gathered_run[float](p, item, <float *>scratch)
    else:
        gathered_run[double](p, item, <double *>scratch)


def _check_indices(cnp.ndarray rows, Py_ssize_t n, str name):
    # The kernels index with these: every entry must lie in [0, n).
    if rows.shape[0] and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"{name} must lie in [0, {n})")


def _check_layout(object dtype, *arrays):
    # One float dtype, C-contiguous (the kernels index rows by their length).
    for a in arrays:
        if a is not None and (a.dtype != dtype or not a.flags.c_contiguous):
            raise ValueError(f"kernel operands must be C-contiguous {dtype}, got {a.dtype}")


def _check_runs(cnp.ndarray items, cnp.ndarray q_rows, cnp.ndarray k_rows, int block_q):
    if items.ndim != 2 or items.shape[1] != 4:
        raise ValueError("items must have shape (n, 4)")
    if items.shape[0] == 0:
        return
    q_lo, q_hi, k_lo, k_hi = items[:, 0], items[:, 1], items[:, 2], items[:, 3]
    if ((q_lo < 0).any() or (q_hi < q_lo).any() or (q_hi - q_lo > block_q).any()
            or q_hi.max() > q_rows.shape[0] or (k_lo < 0).any() or (k_hi < k_lo).any()
            or k_hi.max() > k_rows.shape[0]):
        raise ValueError("items must be runs within q_rows / k_rows of at most block_q rows")


def gathered_attention(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out,
                       object lse, cnp.ndarray q_rows, cnp.ndarray out_rows,
                       cnp.ndarray k_rows, cnp.ndarray items, *, double scale, bint causal,
                       double self_penalty, int block_q, int block_k, int nthreads,
                       object k_scale=None):
    """Attention of gathered query runs over gathered key runs, on ``nthreads`` threads.
    Private: the callers in `fastattn.content_sparse` validate every argument.

    q (.., E), k (.., E), v (.., Ev): 2-D, unit column stride, one dtype (float32 or
    float64); out (R, Ev) C-contiguous and lse (R,) or None in that dtype. q_rows,
    out_rows, k_rows: intp row indices within those arrays; items: intp (n, 4) rows
    (q_lo, q_hi, k_lo, k_hi) of slices into q_rows/out_rows and k_rows, with
    q_hi - q_lo <= block_q. Each output row is written by at most one item. k_scale
    (one factor per row of k, in its dtype) or None scales the key rows as gathered.
    """
    _check_layout(q.dtype, q, k, v, out, lse, k_scale)
    if k_scale is not None and k_scale.shape[0] < k.shape[0]:
        raise ValueError("k_scale needs one factor per row of k")
    _check_layout(np.dtype(np.intp), q_rows, out_rows, k_rows, items)
    _check_runs(items, q_rows, k_rows, block_q)
    _check_indices(q_rows, q.shape[0], "q_rows")
    _check_indices(k_rows, min(k.shape[0], v.shape[0]), "k_rows")
    _check_indices(out_rows, out.shape[0], "out_rows")
    if out_rows.shape[0] != q_rows.shape[0] or (lse is not None and lse.shape[0] < out.shape[0]):
        raise ValueError("out_rows must parallel q_rows, lse must have a row per out row")
    cdef Gathered p
    cdef Py_ssize_t item_size = q.dtype.itemsize
    p.q = cnp.PyArray_DATA(q)
    p.k = cnp.PyArray_DATA(k)
    p.v = cnp.PyArray_DATA(v)
    p.out = cnp.PyArray_DATA(out)
    p.lse = NULL if lse is None else cnp.PyArray_DATA(<cnp.ndarray>lse)
    p.k_scale = NULL if k_scale is None else cnp.PyArray_DATA(<cnp.ndarray>k_scale)
    p.nitems = items.shape[0]
    p.e = <int>q.shape[1]
    p.ev = <int>v.shape[1]
    p.block_q = block_q
    p.block_k = block_k
    p.nthreads = nthreads
    p.dtype = dtype_code(q.dtype)
    p.ldq = q.strides[0] // item_size
    p.ldk = k.strides[0] // item_size
    p.ldv = v.strides[0] // item_size
    p.q_rows = intp_data(q_rows)
    p.out_rows = intp_data(out_rows)
    p.k_rows = intp_data(k_rows)
    p.items = intp_data(items)
    p.scale = scale
    p.causal = causal
    p.self_penalty = self_penalty
    cdef size_t scratch = gathered_scratch(&p, item_size)
    with nogil:
        run_items(gathered_item, &p, p.nitems, 1, scratch, p.nthreads,
                  "gathered attention tile buffers")


# ---- merging per-round results ---------------------------------------------------------

cdef struct Merge:
    # One call of merge_parts: parts (nrows, nparts, ev), part_lse (nrows, nparts).
    const void *parts
    const void *part_lse
    void *out
    void *lse                    # NULL: no log-sum-exp wanted
    Py_ssize_t nrows, nparts, ev
    int dtype, nthreads


cdef void merge_row(const Merge *p, Py_ssize_t r, real *out) noexcept nogil:
    # out (p.out in its dtype) row r <- the merge of row r's parts
    cdef real *lse = <real *>p.lse
    merge_partial_row(<const real *>p.parts + r * p.nparts * p.ev,
                      <const real *>p.part_lse + r * p.nparts, p.nparts, p.ev, p.ev,
                      out + r * p.ev, (lse + r) if lse != NULL else NULL)


cdef void merge_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    # The item hook (one output row), and merge_parts' one dtype dispatch.
    cdef const Merge *p = <const Merge *>run
    if p.dtype == DT_FLOAT32:
        merge_row[float](p, item, <float *>p.out)
    else:
        merge_row[double](p, item, <double *>p.out)


def merge_parts(cnp.ndarray parts, cnp.ndarray part_lse, cnp.ndarray out, object lse,
                int nthreads):
    """out[r] <- the lse-weighted merge of parts[r, :] (R, n, Ev); lse[r] <- their
    log-sum-exp, on ``nthreads`` threads. All C-contiguous, one dtype; lse may be None."""
    if (part_lse.shape[0] != parts.shape[0] or part_lse.shape[1] != parts.shape[1]
            or out.shape[0] != parts.shape[0] or out.shape[1] != parts.shape[2]
            or (lse is not None and lse.shape[0] != parts.shape[0])):
        raise ValueError("merge_parts: parts (R, n, Ev), part_lse (R, n), out (R, Ev), lse (R,)")
    _check_layout(parts.dtype, parts, part_lse, out, lse)
    cdef Merge p
    p.parts = cnp.PyArray_DATA(parts)
    p.part_lse = cnp.PyArray_DATA(part_lse)
    p.out = cnp.PyArray_DATA(out)
    p.lse = NULL if lse is None else cnp.PyArray_DATA(<cnp.ndarray>lse)
    p.nrows = parts.shape[0]
    p.nparts = parts.shape[1]
    p.ev = parts.shape[2]
    p.dtype = dtype_code(parts.dtype)
    p.nthreads = nthreads
    with nogil:
        # rows are small items: claimed 64 at a time
        run_items(merge_item, &p, p.nrows, 64, 0, p.nthreads, "")
