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
