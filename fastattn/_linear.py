"""Linear projections ``x @ weight.T + bias`` in fastattn's threads.

The projections of the attention layers (Q, K, V and output in multi-head attention,
query and key in additive attention) run here rather than through NumPy's matmul: the
kernel (`fastattn._kernels.linear`) cuts each projection into blocks of rows, one
single-threaded BLAS gemm per block, in the same threads as the attention
kernels. NumPy's BLAS threads, which keep spinning on the cores for a while after each
product, then never run. Weights follow ``torch.nn.Linear``: shape ``(out, in)``.

Callers validate; everything here takes arrays of the compute dtype (float32 or
float64) with matching sizes.
"""
import numpy as np

from fastattn import _threads
from fastattn._kernels import linear as _projection_kernels
from fastattn._layout import as_kernel_array, as_matrix_stack, batch_offsets

_INT32_MAX = 2**31 - 1
_ONE_MATRIX = np.zeros(1, dtype=np.intp)      # offsets of a stack that is one matrix
_ONE_MATRIX.flags.writeable = False

# Rows per work item: enough items for about ITEMS_PER_THREAD per thread and job, at
# most BLOCK_ROWS_MAX rows (single-threaded sgemm is within a few % of its best from
# 256 rows) and at least BLOCK_ROWS_MIN (below that the weight is re-packed per few rows).
ITEMS_PER_THREAD = 4
BLOCK_ROWS_MAX = 256
BLOCK_ROWS_MIN = 32
# When the row blocks are too few for the threads (decoding: a few rows), the output
# features are split too, into blocks of a multiple of COLUMN_ALIGN and at least
# BLOCK_COLS_MIN.
COLUMN_ALIGN = 16
BLOCK_COLS_MIN = 64
# Weight gradients (weight_grads): each dW = dY.T @ X is one product whose inner
# dimension is the batch's rows. With several threads, the rows are split first (each
# split a whole (h, e) product of at least GRAD_SPLIT_ROWS rows into its own partial
# sum, the partials added at the end, at most GRAD_PARTIALS_BYTES of them), and dW cut
# into blocks of its rows only when the splits are too few: a whole product keeps BLAS
# at its best (2048 rows, 768 x 768 on one thread of the 2-core AVX-512 machine: 28
# GFLOP/s as one product, 20 GFLOP/s in 128 x 128 blocks, which repack the panels).
GRAD_SPLIT_ROWS = 256
GRAD_PARTIALS_BYTES = 16 << 20
GRAD_BLOCK_ROWS_MIN = 16


def linear(*projections, nthreads, out=None, whole_blocks=False):
    """``x @ weight.T + bias`` for each ``(x, weight, bias)``, all in one parallel region.

    BLAS must be single-threaded, as for :func:`run`.

    Parameters
    ----------
    *projections : tuple of (ndarray, ndarray, ndarray or None)
        ``x`` of shape ``(..., in)`` with any strides, ``weight`` ``(out, in)`` with any
        strides, ``bias`` ``(out,)`` or None; one float dtype throughout.
    nthreads : int
    out : sequence of ndarray or None, optional
        Per projection, a C-contiguous ``(..., out)`` array of the dtype to write the
        result into (a work buffer reused across calls), or None for a new array.
    whole_blocks : bool, default=False
        Cut each projection into a multiple of ``nthreads`` equal row blocks of at
        most BLOCK_ROWS_MAX rows and every output feature, rather than about
        ITEMS_PER_THREAD blocks per thread: for a few hundred rows per thread (a chunk
        of a batch), larger blocks keep single-threaded sgemm near its best.

    Returns
    -------
    list of ndarray
        One C-contiguous ``(..., out)`` array per projection (``out``'s where given).
    """
    jobs, outs = [], []
    given = out if out is not None else (None,) * len(projections)
    for (x, weight, bias), dest in zip(projections, given, strict=True):
        h = weight.shape[0]
        shape = x.shape[:-1] + (h,)
        if dest is None:
            dest = np.empty(shape, dtype=x.dtype)
        elif (dest.shape != shape or dest.dtype != x.dtype or not dest.flags.c_contiguous
              or not dest.flags.writeable):
            raise ValueError(f"projection output must be a writable C-contiguous {shape} "
                             f"{x.dtype} array, got {dest.shape} {dest.dtype}")
        xs, offsets, ldx, n = _row_stack(x if x.ndim > 1 else x[np.newaxis])
        jobs.append(stack_job(xs, offsets, ldx, n, weight, bias,
                              dest.reshape(offsets.shape[0], n, h), nthreads,
                              whole_blocks=whole_blocks))
        outs.append(dest)
    run(jobs, nthreads)
    return outs


def weight_grads(*pairs, nthreads):
    """``dy.T @ x`` summed over every row, for each ``(dy, x)``, in one parallel region.

    The weight gradients of projections ``y = x @ weight.T + bias``: ``dy`` is the
    gradient of ``y``, shape ``(..., out)``, and ``x`` the projection's input, shape
    ``(..., in)`` with the same leading shape; any strides, one float dtype (float32 or
    float64). Returns one C-contiguous ``(out, in)`` array per pair. BLAS must be
    single-threaded, as for :func:`run`. The rounding depends on the thread count (the
    row splits), not on anything else.
    """
    jobs, outs = [], []
    for dy, x in pairs:
        (dys, dy_off, lddy), (xs, x_off, ldx), n = _paired_rows(dy, x)
        h, e = dy.shape[-1], x.shape[-1]
        ksplit, kstep, split_matrices, block_rows = _grad_plan(
            x_off.shape[0], n, h, e, x.dtype.itemsize, nthreads)
        block_cols = max(e, 1)
        out = np.empty((ksplit, h, e), dtype=x.dtype)
        jobs.append((dys, dy_off, lddy, xs, x_off, ldx, n, out, kstep, split_matrices,
                     block_rows, block_cols))
        outs.append(out)
    items = sum(o.shape[0] * -(-o.shape[1] // j[10]) * -(-o.shape[2] // j[11])
                for o, j in zip(outs, jobs))
    work = sum(2 * j[4].shape[0] * j[6] * o.shape[1] * o.shape[2] for o, j in zip(outs, jobs))
    _projection_kernels.weight_grad(jobs, _threads.call_threads(nthreads, items, work))
    return [o[0] if o.shape[0] == 1 else o.sum(axis=0) for o in outs]


def _grad_plan(nmat, n, h, e, itemsize, nthreads):
    # (row splits, matrices or rows per split, split over matrices?, rows of dW per
    # block) for a weight gradient over nmat matrices of n rows: about two items per
    # thread, row splits first (see GRAD_SPLIT_ROWS)
    if nthreads == 1:
        return 1, max(n, 1), False, max(h, 1)
    target = 2 * nthreads
    want = min(target, nmat * n // GRAD_SPLIT_ROWS,
               GRAD_PARTIALS_BYTES // max(h * e * itemsize, 1))
    ksplit, kstep, split_matrices = 1, max(n, 1), False
    if want > 1 and nmat >= want:
        split_matrices, kstep = True, -(-nmat // want)
        ksplit = -(-nmat // kstep)
    elif want > 1:
        kstep = -(-n // want)
        ksplit = -(-n // kstep)
    blocks = -(-target // ksplit)
    block_rows = max(GRAD_BLOCK_ROWS_MIN, -(-h // blocks))
    return ksplit, kstep, split_matrices, max(1, min(h, block_rows))


def _paired_rows(dy, x):
    # ((dy, offsets, row stride), (x, offsets, row stride), rows per matrix): dy and x
    # as stacks of matrices with the same partition of their rows: all rows as one
    # matrix each when both allow it, else one matrix per entry of the leading axes.
    if dy.ndim == 1:
        dy, x = dy[np.newaxis], x[np.newaxis]
    a, a_off, lda, na = _row_stack(dy)
    b, b_off, ldb, nb = _row_stack(x)
    if a_off is _ONE_MATRIX and b_off is _ONE_MATRIX:
        return (a, a_off, lda), (b, b_off, ldb), na
    lead = x.shape[:-2]
    a, lda = as_matrix_stack(dy, dy.dtype)
    b, ldb = as_matrix_stack(x, x.dtype)
    return ((a, batch_offsets(a, lead), lda), (b, batch_offsets(b, lead), ldb),
            x.shape[-2])


def stack_job(x, offsets, ldx, n, weight, bias, out, nthreads, *, transpose=False,
              weight_offsets=None, whole_blocks=False):
    """One projection job for :func:`run` over a stack of matrices.

    Matrix ``u`` of the stack is ``n`` rows of ``x`` (row stride ``ldx``, unit column
    stride) from element offset ``offsets[u]`` (intp). ``weight`` is ``(out, in)``, or
    with ``weight_offsets`` a stack of such matrices laid out for BLAS (unit column
    stride), ``u`` using the one at ``weight_offsets[u]``. ``out`` is C-contiguous,
    ``(len(offsets), n, out)``, or with ``transpose`` ``(len(offsets), out, ldo)``
    with ``ldo >= n``: the projections stored as columns, columns ``n`` and up left
    as they are.
    """
    dtype = x.dtype
    if weight_offsets is None:
        w, ldw, w_t = _weight(weight, dtype, allow_transposed=not transpose)
    else:
        (w, ldw), w_t = as_matrix_stack(weight, dtype), False
    h = weight.shape[-2]
    b = None if bias is None else as_kernel_array(bias, dtype)
    block_rows, block_cols = _blocks(offsets.shape[0], n, h, nthreads, whole_blocks)
    ldo = out.shape[-1] if transpose else h
    out_step = (h * ldo) if transpose else (n * h)
    return (x, offsets, ldx, n, w, weight_offsets, ldw, w_t, b, out, out_step, ldo,
            transpose, block_rows, block_cols)


def stacked_abt(a, b, batch_shape, nthreads, *, group_axis=None, group=1):
    """``a @ b.swapaxes(-1, -2)`` over the broadcast ``batch_shape``, in one parallel region.

    ``a`` is ``(..., m, k)`` and ``b`` ``(..., n, k)``, any strides, leading axes
    broadcasting to ``batch_shape``; with ``group > 1``, batch index ``h`` along
    ``group_axis`` reads ``b``'s entry ``h // group`` (grouped-query heads). Neither is
    expanded or copied when its matrices suit BLAS. Returns a C-contiguous
    ``(*batch_shape, m, n)`` array. BLAS must be single-threaded, as for :func:`run`.
    """
    a, lda = as_matrix_stack(a, a.dtype)
    b, ldb = as_matrix_stack(b, a.dtype)
    a_off = batch_offsets(a, batch_shape)
    b_off = batch_offsets(b, batch_shape, group_axis, group)
    m, n = a.shape[-2], b.shape[-2]
    out = np.empty(tuple(batch_shape) + (m, n), dtype=a.dtype)
    run([stack_job(a, a_off, lda, m, b, None, out, nthreads, weight_offsets=b_off)],
        nthreads)
    return out


def run(jobs, nthreads):
    """Run projection jobs from :func:`stack_job` in one parallel region.

    BLAS must be single-threaded: callers hold
    :func:`fastattn._threads.single_threaded_blas` around this call and the kernels
    that follow it, so that the limit is set and lifted once (lifting it can wake
    BLAS's idle threads).
    """
    items = sum(_items(job) for job in jobs)
    work = sum(2 * _work(job) for job in jobs)                    # flops
    _projection_kernels.project(jobs, _threads.call_threads(nthreads, items, work))


def _row_stack(x):
    # (base, offsets, row stride, rows per matrix) covering every row of x (..., in).
    # When the leading axes and the row axis step evenly through memory (C order, or a
    # slice along the rows), all rows form one matrix, so the blocks run across batches.
    total = int(np.prod(x.shape[:-1], dtype=np.int64))
    e = max(x.shape[-1], 1)
    if x.flags.c_contiguous and x.flags.aligned and e <= _INT32_MAX:
        return x, _ONE_MATRIX, e, total
    x, ldx = as_matrix_stack(x, x.dtype)
    item = x.dtype.itemsize
    axes = [(n, s // item) for n, s in zip(x.shape[:-1], x.strides[:-1]) if n != 1]
    if total == 0 or not axes:
        return x, _ONE_MATRIX, e, total
    if all(s0 == s1 * n1 for (_, s0), (n1, s1) in zip(axes, axes[1:])):
        ld = axes[-1][1]
        if e <= ld <= _INT32_MAX:
            return x, _ONE_MATRIX, ld, total
    return x, batch_offsets(x, x.shape[:-2]), ldx, x.shape[-2]


def _weight(w, dtype, allow_transposed):
    # (array, row stride, transposed): the weight (out, in) as the kernel takes it. A
    # weight whose columns are not unit-stride (e.g. `wt.T` of a C-ordered wt) is passed
    # as its transpose, copied to C order only when that is strided too.
    w = np.asarray(w, dtype=dtype)
    if w.flags.c_contiguous and w.flags.aligned and w.shape[1] <= _INT32_MAX:
        return w, max(w.shape[1], 1), False
    if allow_transposed and w.shape[1] > 1 and w.strides[1] != w.itemsize:
        a, ld = as_matrix_stack(w.T, dtype)
        return a, ld, True
    a, ld = as_matrix_stack(w, dtype)
    return a, ld, False


def _work(job):
    # multiply-adds of a job from stack_job: matrices * rows * out * in
    x, offsets, _, n, w, _, _, w_t = job[:8]
    h = w.shape[-1] if w_t else w.shape[-2]
    return offsets.shape[0] * n * h * x.shape[-1]


def _items(job):
    # work items of a job from stack_job: matrices * row blocks * column blocks
    _, offsets, _, n, w, _, _, w_t = job[:8]
    h = w.shape[-1] if w_t else w.shape[-2]
    block_rows, block_cols = job[13:15]
    return offsets.shape[0] * -(-n // block_rows) * -(-h // block_cols)


def _blocks(nmat, n, h, nthreads, whole=False):
    # (rows, columns) per work item of a job
    if whole and nmat == 1:
        # one matrix of n rows: parts equal row blocks, parts a multiple of nthreads
        parts = nthreads * -(-n // (nthreads * BLOCK_ROWS_MAX))
        rows = -(-n // parts)
        if rows >= BLOCK_ROWS_MIN:
            return int(rows), max(h, 1)
    target = ITEMS_PER_THREAD * nthreads
    rows = -(-nmat * n // target)
    rows = max(1, min(n, BLOCK_ROWS_MAX, max(BLOCK_ROWS_MIN, rows)))
    row_items = nmat * -(-n // rows)
    cols = max(h, 1)
    if row_items < target and h > BLOCK_COLS_MIN:
        parts = -(-target // max(row_items, 1))
        cols = -(-h // parts)
        cols = max(BLOCK_COLS_MIN, -(-cols // COLUMN_ALIGN) * COLUMN_ALIGN)
    return int(rows), int(cols)
