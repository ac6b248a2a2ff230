# Linear projections  out = x @ W.T + b  (W in torch.nn.Linear's (out, in) layout), in
# fastattn's own threads (the parallel skeleton, parallel.pxd): the Q/K/V/output
# projections of multi-head attention and the query/key projections of additive
# attention.
#
# Why not NumPy's matmul: it runs in NumPy's own BLAS threads, which keep spinning for a
# while after each product, on the cores the attention kernel's threads then need.
# Here each projection is cut into blocks of rows (and, when the rows are too few to keep
# every thread busy, of output columns); a block is one single-threaded BLAS gemm. The
# caller keeps BLAS single-threaded around the call.
#
# A call runs a list of jobs (several projections, e.g. Q, K and V, share one run of
# the skeleton). A job:
#   x     a stack of nmat matrices (n x e), matrix u at element offset x_off[u] from the
#         base pointer, row stride ldx, unit column stride
#   W     (h x e), row stride ldw; or, with w_t, its transpose Wt (e x h, row stride ldw)
#         as it lies in memory (a weight given as `w.T` of a C-ordered array). One W for
#         every matrix, or with w_off a stack of them: W_u at element offset w_off[u]
#         (the per-head scores q_h @ k_h.T are such a job)
#   b     (h,) or NULL
#   out   matrix u at element offset u * out_step, row stride ldo:
#           out[u] = x_u @ W_u.T + b      (n x h)                   transpose False
#           out[u] = W_u @ x_u.T + b[:, None]   (h x n)             transpose True (no w_t)
# The work items of all jobs form one flat index handed out dynamically (one item per
# claim, no scratch); item -> (job, matrix, row block, column block). With a bias, the
# block is first filled with the bias rows and the gemm accumulates onto it (beta = 1):
# OpenBLAS otherwise clears the block before a beta = 0 product, so the bias costs no
# extra pass.
#
# The weight gradients of the projections' backward, dW = dY.T @ X over the batch's
# rows, are a second kind of job (weight_grad, at the end of this file).

from libc.string cimport memcpy
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, DT_FLOAT32
from fastattn._kernels.parallel import dtype_code
from fastattn._kernels.tile cimport intp_data, real, gemm_ab, gemm_abt, gemm_atb, row_fill

cnp.import_array()


cdef struct LinearJob:
    const void *x
    const Py_ssize_t *x_off
    Py_ssize_t nmat, n, e, ldx
    const void *w
    const Py_ssize_t *w_off     # NULL: one W for all matrices
    Py_ssize_t ldw
    bint w_t
    const void *b
    Py_ssize_t h
    void *out
    Py_ssize_t out_step, ldo
    bint transpose
    int dtype                   # parallel.DType of x, W, b and out
    Py_ssize_t block_rows, block_cols
    Py_ssize_t nrb, ncb         # row / column blocks per matrix
    Py_ssize_t first_item       # flat index of the job's first work item


cdef void project_block(const LinearJob *job, Py_ssize_t u, Py_ssize_t r0, Py_ssize_t rows,
                        Py_ssize_t c0, Py_ssize_t cols, const real *x, const real *w,
                        const real *b, real *out) noexcept nogil:
    # Rows r0 : r0 + rows of matrix u, output features c0 : c0 + cols.
    cdef const real *xb = x + job.x_off[u] + r0 * job.ldx
    cdef real *ob
    cdef real beta = 0 if b == NULL else 1
    cdef Py_ssize_t i
    if job.w_off != NULL:
        w = w + job.w_off[u]        # this matrix's own W_u
    if not job.transpose:
        ob = out + u * job.out_step + r0 * job.ldo + c0
        # ob[rows, cols] <- b[c0 : c0 + cols] in every row (or 0)
        for i in range(rows):
            if b != NULL:
                memcpy(ob + i * job.ldo, b + c0, cols * sizeof(real))
            elif job.e == 0:
                row_fill(ob + i * job.ldo, cols, 0)
        if job.e == 0:
            return
        if job.w_t:
            # ob[rows, cols] += xb[rows, e] @ Wt[e, c0 : c0 + cols]
            gemm_ab(<int>rows, <int>cols, <int>job.e, 1, xb, <int>job.ldx, w + c0,
                    <int>job.ldw, beta, ob, <int>job.ldo)
        else:
            # ob[rows, cols] += xb[rows, e] @ W[c0 : c0 + cols, e].T
            gemm_abt(<int>rows, <int>cols, <int>job.e, 1, xb, <int>job.ldx,
                     w + c0 * job.ldw, <int>job.ldw, beta, ob, <int>job.ldo)
    else:
        ob = out + u * job.out_step + c0 * job.ldo + r0
        # ob[cols, rows] <- b[c0 + i] along row i (or 0)
        for i in range(cols):
            if b != NULL:
                row_fill(ob + i * job.ldo, rows, b[c0 + i])
            elif job.e == 0:
                row_fill(ob + i * job.ldo, rows, 0)
        if job.e == 0:
            return
        # ob[cols, rows] += W[c0 : c0 + cols, e] @ xb[rows, e].T
        gemm_abt(<int>cols, <int>rows, <int>job.e, 1, w + c0 * job.ldw, <int>job.ldw,
                 xb, <int>job.ldx, beta, ob, <int>job.ldo)


cdef struct LinearRun:
    const LinearJob *jobs
    Py_ssize_t njobs


# The item hook, and this family's one dtype dispatch.

cdef void linear_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    # item -> (job, matrix, row block, column block)
    cdef const LinearRun *lr = <const LinearRun *>run
    cdef Py_ssize_t j = lr.njobs - 1
    while lr.jobs[j].first_item > item:
        j = j - 1
    cdef const LinearJob *job = &lr.jobs[j]
    item = item - job.first_item
    cdef Py_ssize_t per_mat = job.nrb * job.ncb
    cdef Py_ssize_t u = item // per_mat
    cdef Py_ssize_t rb = (item % per_mat) // job.ncb
    cdef Py_ssize_t cb = item % job.ncb
    cdef Py_ssize_t r0 = rb * job.block_rows
    cdef Py_ssize_t c0 = cb * job.block_cols
    cdef Py_ssize_t rows = min(job.block_rows, job.n - r0)
    cdef Py_ssize_t cols = min(job.block_cols, job.h - c0)
    if job.dtype == DT_FLOAT32:
        project_block[float](job, u, r0, rows, c0, cols, <const float *>job.x,
                             <const float *>job.w, <const float *>job.b, <float *>job.out)
    else:
        project_block[double](job, u, r0, rows, c0, cols, <const double *>job.x,
                              <const double *>job.w, <const double *>job.b, <double *>job.out)


def project(list jobs, int nthreads):
    """Run projection jobs. Private: `fastattn._linear` builds and checks them.

    Each job is a tuple (x, x_off, ldx, n, w, w_off, ldw, w_t, b, out, out_step, ldo,
    transpose, block_rows, block_cols): see the comment at the top of this file. x, w, out
    and b (an ndarray or None) share one dtype, float32 or float64; x_off and w_off (or
    None) are intp vectors of one length; block_rows and block_cols are at least 1.
    nthreads: the threads to run on (fastattn._threads.call_threads). BLAS must be
    single-threaded.
    """
    cdef Py_ssize_t njobs = len(jobs)
    cdef Py_ssize_t nitems = 0
    cdef Py_ssize_t i
    cdef LinearRun run
    cdef LinearJob *job
    cdef cnp.ndarray x, x_off, w, out
    if njobs == 0:
        return
    # the job table, owned by a NumPy array (no allocation of our own to fail or free)
    cdef cnp.ndarray table = cnp.PyArray_ZEROS(1, [njobs * <Py_ssize_t>sizeof(LinearJob)],
                                               cnp.NPY_UINT8, 0)
    run.jobs = <const LinearJob *>cnp.PyArray_DATA(table)
    run.njobs = njobs
    for i in range(njobs):
        (x, x_off, ldx, n, w, w_off, ldw, w_t, b, out, out_step, ldo, transpose,
         block_rows, block_cols) = jobs[i]
        if not (x.dtype == w.dtype == out.dtype and (b is None or b.dtype == x.dtype)
                and x.dtype.num in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64)):
            raise TypeError("fastattn: projection operands must all be float32 or all "
                            "float64")
        job = <LinearJob *>cnp.PyArray_DATA(table) + i
        job.x = cnp.PyArray_DATA(x)
        job.x_off = intp_data(x_off)
        job.nmat = x_off.shape[0]
        job.n = n
        job.e = w.shape[w.ndim - 2] if w_t else w.shape[w.ndim - 1]
        job.ldx = ldx
        job.w = cnp.PyArray_DATA(w)
        job.w_off = NULL
        if w_off is not None:
            job.w_off = intp_data(w_off)
        job.ldw = ldw
        job.w_t = w_t
        job.b = NULL if b is None else cnp.PyArray_DATA(b)
        job.h = w.shape[w.ndim - 1] if w_t else w.shape[w.ndim - 2]
        job.out = cnp.PyArray_DATA(out)
        job.out_step = out_step
        job.ldo = ldo
        job.transpose = transpose
        job.dtype = dtype_code(x.dtype)
        job.block_rows = block_rows
        job.block_cols = block_cols
        job.nrb = (job.n + block_rows - 1) // block_rows
        job.ncb = (job.h + block_cols - 1) // block_cols
        job.first_item = nitems
        nitems += job.nmat * job.nrb * job.ncb
    with nogil:
        run_items(linear_item, &run, nitems, 1, 0, nthreads, "")


# ---- weight gradients:  dW = sum over rows of dY.T @ X ---------------------------------
# The backward of y = x @ W.T + b needs dW = dY.T @ X summed over every row of the batch:
# a product whose inner dimension is the number of rows. A job:
#   dy    a stack of nmat matrices (n x h), matrix u at element offset dy_off[u], row
#         stride lddy, unit column stride
#   x     the matching stack of (n x e) matrices: x_off, ldx
#   out   ksplit partial sums, C-contiguous (ksplit x h x e); the caller adds them up
#         (ksplit = 1: out is dW itself)
# Split s covers matrices [s * kstep, (s + 1) * kstep) when split_matrices, else rows
# [s * kstep, (s + 1) * kstep) of every matrix: splits keep the threads busy when dW
# has fewer blocks than threads (small layers, many rows). A work item is (split, row
# block of h, column block of e): one single-threaded gemm per matrix, accumulating
# (beta = 1 after the first), so no two items write the same element.

cdef struct GradJob:
    const void *dy
    const Py_ssize_t *dy_off
    Py_ssize_t lddy
    const void *x
    const Py_ssize_t *x_off
    Py_ssize_t ldx
    Py_ssize_t nmat, n, h, e
    void *out
    Py_ssize_t ksplit, kstep
    bint split_matrices
    int dtype                   # parallel.DType of dy, x and out
    Py_ssize_t block_rows, block_cols
    Py_ssize_t nrb, ncb         # row / column blocks of dW
    Py_ssize_t first_item


cdef void grad_block(const GradJob *job, Py_ssize_t s, Py_ssize_t r0, Py_ssize_t rows,
                     Py_ssize_t c0, Py_ssize_t cols, const real *dy, const real *x,
                     real *out) noexcept nogil:
    # Rows r0 : r0 + rows and columns c0 : c0 + cols of split s's partial dW.
    cdef real *ob = out + s * job.h * job.e + r0 * job.e + c0
    cdef Py_ssize_t u0 = 0, u1 = job.nmat, k0 = 0, k1 = job.n
    cdef Py_ssize_t u, i
    cdef real beta = 0
    if job.split_matrices:
        u0 = min(s * job.kstep, job.nmat)
        u1 = min(u0 + job.kstep, job.nmat)
    else:
        k0 = min(s * job.kstep, job.n)
        k1 = min(k0 + job.kstep, job.n)
    if u1 <= u0 or k1 <= k0:
        # no rows (an empty batch, or a split past the end): dW = 0
        for i in range(rows):
            row_fill(ob + i * job.e, cols, 0)
        return
    for u in range(u0, u1):
        # ob[rows, cols] (+)= dY_u[k0:k1, r0 : r0 + rows].T @ X_u[k0:k1, c0 : c0 + cols]
        gemm_atb(<int>rows, <int>cols, <int>(k1 - k0), 1,
                 dy + job.dy_off[u] + k0 * job.lddy + r0, <int>job.lddy,
                 x + job.x_off[u] + k0 * job.ldx + c0, <int>job.ldx, beta, ob, <int>job.e)
        beta = 1


cdef struct GradRun:
    const GradJob *jobs
    Py_ssize_t njobs


cdef void grad_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    # item -> (job, split, row block, column block)
    cdef const GradRun *gr = <const GradRun *>run
    cdef Py_ssize_t j = gr.njobs - 1
    while gr.jobs[j].first_item > item:
        j = j - 1
    cdef const GradJob *job = &gr.jobs[j]
    item = item - job.first_item
    cdef Py_ssize_t per_split = job.nrb * job.ncb
    cdef Py_ssize_t s = item // per_split
    cdef Py_ssize_t rb = (item % per_split) // job.ncb
    cdef Py_ssize_t cb = item % job.ncb
    cdef Py_ssize_t r0 = rb * job.block_rows
    cdef Py_ssize_t c0 = cb * job.block_cols
    cdef Py_ssize_t rows = min(job.block_rows, job.h - r0)
    cdef Py_ssize_t cols = min(job.block_cols, job.e - c0)
    if job.dtype == DT_FLOAT32:
        grad_block[float](job, s, r0, rows, c0, cols, <const float *>job.dy,
                          <const float *>job.x, <float *>job.out)
    else:
        grad_block[double](job, s, r0, rows, c0, cols, <const double *>job.dy,
                           <const double *>job.x, <double *>job.out)


def weight_grad(list jobs, int nthreads):
    """Run weight-gradient jobs. Private: `fastattn._linear.weight_grads` builds them.

    Each job is a tuple (dy, dy_off, lddy, x, x_off, ldx, n, out, kstep, split_matrices,
    block_rows, block_cols): see the comment above grad_block. dy, x and out share one
    dtype, float32 or float64; dy_off and x_off are intp vectors of one length; out is
    C-contiguous (ksplit, h, e); block_rows and block_cols are at least 1. BLAS must be
    single-threaded.
    """
    cdef Py_ssize_t njobs = len(jobs)
    cdef Py_ssize_t nitems = 0
    cdef Py_ssize_t i
    cdef GradRun run
    cdef GradJob *job
    cdef cnp.ndarray dy, dy_off, x, x_off, out
    if njobs == 0:
        return
    cdef cnp.ndarray table = cnp.PyArray_ZEROS(1, [njobs * <Py_ssize_t>sizeof(GradJob)],
                                               cnp.NPY_UINT8, 0)
    run.jobs = <const GradJob *>cnp.PyArray_DATA(table)
    run.njobs = njobs
    for i in range(njobs):
        (dy, dy_off, lddy, x, x_off, ldx, n, out, kstep, split_matrices, block_rows,
         block_cols) = jobs[i]
        if not (dy.dtype == x.dtype == out.dtype
                and x.dtype.num in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64)):
            raise TypeError("fastattn: weight-gradient operands must all be float32 or all "
                            "float64")
        if (out.ndim != 3 or not out.flags.c_contiguous or dy_off.shape[0] != x_off.shape[0]
                or out.shape[1] != dy.shape[dy.ndim - 1] or out.shape[2] != x.shape[x.ndim - 1]):
            raise ValueError("fastattn: weight-gradient job shapes do not match")
        job = <GradJob *>cnp.PyArray_DATA(table) + i
        job.dy = cnp.PyArray_DATA(dy)
        job.dy_off = intp_data(dy_off)
        job.lddy = lddy
        job.x = cnp.PyArray_DATA(x)
        job.x_off = intp_data(x_off)
        job.ldx = ldx
        job.nmat = x_off.shape[0]
        job.n = n
        job.h = out.shape[1]
        job.e = out.shape[2]
        job.out = cnp.PyArray_DATA(out)
        job.ksplit = out.shape[0]
        job.kstep = kstep
        job.split_matrices = split_matrices
        job.dtype = dtype_code(x.dtype)
        job.block_rows = block_rows
        job.block_cols = block_cols
        job.nrb = (job.h + block_rows - 1) // block_rows
        job.ncb = (job.e + block_cols - 1) // block_cols
        job.first_item = nitems
        nitems += job.ksplit * job.nrb * job.ncb
    with nogil:
        run_items(grad_item, &run, nitems, 1, 0, nthreads, "")
