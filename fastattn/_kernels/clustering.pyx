# Content-based sparse attention, the grouping side: who attends to whom is decided by
# the data (gathered.pyx then runs the attention over the chosen rows).
#
# `nearest_centroid` / `cluster_sums` are the two halves of a Lloyd k-means step;
# `lsh_hash` is the Reformer hash; `centroid_topk` picks each centroid's best keys.
# `kmeans` runs the whole of Lloyd's k-means, one batch entry per thread; `mix_blocks`
# is Sinkhorn attention's block mixing (P @ blocks).

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
cimport numpy as cnp
import numpy as np

from fastattn._kernels.tile cimport intp_data, real, gemm_abt, gemm_ab, row_add_max, block_len
from fastattn._kernels.gathered import _check_indices, _check_layout

cnp.import_array()


# ---- Lloyd k-means -----------------------------------------------------------------------
# A step is assign_nearest over every row, then add_to_clusters and the member means: split
# over row blocks (nearest_centroid, cluster_sums) or a whole batch entry per thread (kmeans).

cdef inline bint assign_nearest(const real *x, int rows, int e, const real *c,
                                const real *neg_c_sq, int C, real *d,
                                Py_ssize_t *assign) noexcept nogil:
    # assign[r] <- argmax_j 2 x_r . c_j - |c_j|^2 (= argmin_j |x_r - c_j|^2; first on ties)
    # for the rows of x (rows x e), with neg_c_sq[j] = -|c_j|^2 and d (rows x C) scratch.
    # Returns whether any entry changed.
    cdef int r
    cdef Py_ssize_t j
    cdef real best
    cdef real *drow
    cdef bint changed = False
    gemm_abt(rows, C, e, 2, x, e, c, e, 0, d, C)
    for r in range(rows):
        drow = d + r * C
        # drow - |c|^2 and its maximum (vectorised), then its first place
        best = row_add_max(drow, neg_c_sq, C)
        j = 0
        while j < C - 1 and not (drow[j] == best):
            j = j + 1
        if assign[r] != j:
            assign[r] = j
            changed = True
    return changed


cdef inline void add_to_clusters(const real *x, const Py_ssize_t *assign, Py_ssize_t L,
                                 Py_ssize_t e, double *sums, Py_ssize_t *counts) noexcept nogil:
    # sums[a] += x[i] and counts[a] += 1 for a = assign[i], over the L rows of x (L x e); in
    # float64 so that a centroid is the same mean whatever the input precision
    cdef Py_ssize_t i, j, a
    cdef double *srow
    cdef const real *xrow
    for i in range(L):
        a = assign[i]
        counts[a] += 1
        srow = sums + a * e
        xrow = x + i * e
        for j in range(e):
            srow[j] += xrow[j]


cdef void nearest_kernel(const real *x, const real *c, const real *neg_c_sq, Py_ssize_t nbatch,
                         Py_ssize_t L, int C, int e, int block, Py_ssize_t *assign,
                         int nthreads, int *failed) noexcept nogil:
    # assign_nearest on each row block of each x[b]
    cdef Py_ssize_t nblk = (L + block - 1) // block
    cdef Py_ssize_t item, b, r0
    cdef real *d
    with nogil, parallel(num_threads=nthreads):
        d = <real *>malloc(block * C * sizeof(real))
        for item in prange(nbatch * nblk, schedule='static'):
            if d == NULL:
                failed[0] = 1
            else:
                b = item // nblk
                r0 = (item % nblk) * block
                assign_nearest(x + (b * L + r0) * e, block_len(L, r0, block), e, c + b * C * e,
                               neg_c_sq + b * C, C, d, assign + b * L + r0)
        free(d)
    # end: with nogil, parallel


def nearest_centroid(cnp.ndarray x, cnp.ndarray c, cnp.ndarray assign, int nthreads):
    """assign (nbatch, L) intp <- nearest row of c (nbatch, C, E) for each row of
    x (nbatch, L, E); x and c C-contiguous, one dtype."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1]
    cdef int e = <int>x.shape[2], C = <int>c.shape[1]
    cdef int block = 256
    if c.shape[0] != nbatch or c.shape[2] != e or assign.shape[0] * assign.shape[1] != nbatch * L \
            or C < 1:
        raise ValueError("nearest_centroid: x (nbatch, L, E), c (nbatch, C >= 1, E), "
                         "assign (nbatch, L)")
    _check_layout(x.dtype, x, c)
    _check_layout(np.dtype(np.intp), assign)
    neg_c_sq = -np.einsum("bce,bce->bc", c, c)
    cdef void *xd = cnp.PyArray_DATA(x)
    cdef void *cd = cnp.PyArray_DATA(c)
    cdef void *sd = cnp.PyArray_DATA(neg_c_sq)
    cdef Py_ssize_t *ad = <Py_ssize_t *>cnp.PyArray_DATA(assign)
    cdef int failed = 0
    cdef bint is_f32 = x.dtype.num == cnp.NPY_FLOAT32
    if nbatch * L == 0:
        return
    with nogil:
        if is_f32:
            nearest_kernel[float](<const float *>xd, <const float *>cd, <const float *>sd,
                                  nbatch, L, C, e, block, ad, nthreads, &failed)
        else:
            nearest_kernel[double](<const double *>xd, <const double *>cd,
                                   <const double *>sd, nbatch, L, C, e, block, ad, nthreads,
                                   &failed)
    if failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its distance tile")


cdef void sums_kernel(const real *x, const Py_ssize_t *assign, Py_ssize_t nbatch,
                      Py_ssize_t L, Py_ssize_t C, Py_ssize_t e, double *sums,
                      Py_ssize_t *counts, int nthreads) noexcept nogil:
    # add_to_clusters on each x[b], one batch entry per thread
    cdef Py_ssize_t b
    for b in prange(nbatch, schedule='static', num_threads=nthreads):
        add_to_clusters(x + b * L * e, assign + b * L, L, e, sums + b * C * e, counts + b * C)


def cluster_sums(cnp.ndarray x, cnp.ndarray assign, cnp.ndarray sums, cnp.ndarray counts,
                 int nthreads):
    """sums (nbatch, C, E) float64 and counts (nbatch, C) intp, both zeroed by the caller,
    <- per-cluster sums and sizes of x (nbatch, L, E) under assign (nbatch, L), whose
    entries must lie in [0, C)."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1], e = x.shape[2], C = sums.shape[1]
    if (sums.shape[0] != nbatch or sums.shape[2] != e or counts.shape[0] != nbatch
            or counts.shape[1] != C or assign.shape[0] != nbatch or assign.shape[1] != L):
        raise ValueError("cluster_sums: x (nbatch, L, E), assign (nbatch, L), sums (nbatch, C, E), "
                         "counts (nbatch, C)")
    _check_layout(np.dtype(np.float64), sums)
    _check_layout(np.dtype(np.intp), assign, counts)
    _check_indices(assign.reshape(-1), C, "assign")
    cdef void *xd = cnp.PyArray_DATA(x)
    cdef const Py_ssize_t *ad = intp_data(assign)
    cdef double *sd = <double *>cnp.PyArray_DATA(sums)
    cdef Py_ssize_t *cd = <Py_ssize_t *>cnp.PyArray_DATA(counts)
    cdef bint is_f32 = x.dtype.num == cnp.NPY_FLOAT32
    with nogil:
        if is_f32:
            sums_kernel[float](<const float *>xd, ad, nbatch, L, C, e, sd, cd, nthreads)
        else:
            sums_kernel[double](<const double *>xd, ad, nbatch, L, C, e, sd, cd, nthreads)


# ---- Reformer hashing ----------------------------------------------------------------------

cdef void hash_kernel(const real *x, const real *rot, const Py_ssize_t *rot_index,
                      Py_ssize_t nbatch, Py_ssize_t L, int e, int n_hashes, int half,
                      int block, Py_ssize_t *buckets, int nthreads, int *failed) noexcept nogil:
    # buckets[b, h, i] <- argmax([x_i R_h, -x_i R_h]): the first maximum, as np.argmax
    # of the concatenation (ties between the halves go to the first).
    cdef Py_ssize_t nblk = (L + block - 1) // block
    cdef int width = n_hashes * half
    cdef Py_ssize_t item, b, r0, r, j, hi_j, lo_j
    cdef int rows, h
    cdef real hi, lo
    cdef real *d
    cdef real *drow
    with nogil, parallel(num_threads=nthreads):
        d = <real *>malloc(block * width * sizeof(real))
        for item in prange(nbatch * nblk, schedule='static'):
            if d == NULL:
                failed[0] = 1
            else:
                b = item // nblk
                r0 = (item % nblk) * block
                rows = block_len(L, r0, block)
                # d <- x[b, r0:r0 + rows] @ R   (R: e x width, row-major)
                gemm_ab(rows, width, e, 1, x + (b * L + r0) * e, e,
                        rot + rot_index[b] * e * width, width, 0, d, width)
                for r in range(rows):
                    for h in range(n_hashes):
                        drow = d + r * width + h * half
                        hi = drow[0]
                        lo = drow[0]
                        hi_j = 0
                        lo_j = 0
                        for j in range(1, half):
                            if drow[j] > hi:
                                hi = drow[j]
                                hi_j = j
                            if drow[j] < lo:
                                lo = drow[j]
                                lo_j = j
                        buckets[(b * n_hashes + h) * L + r0 + r] = hi_j if hi >= -lo \
                            else half + lo_j
        free(d)
    # end: with nogil, parallel


def lsh_hash(cnp.ndarray x, cnp.ndarray rot, cnp.ndarray rot_index, cnp.ndarray buckets,
             int n_hashes, int nthreads):
    """buckets (nbatch, n_hashes, L) intp <- Reformer hashes of the rows of x (nbatch, L, E)
    under rotations rot (nrot, E, n_hashes * half); batch b uses rot[rot_index[b]]. x and
    rot C-contiguous, one dtype."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1]
    cdef int e = <int>x.shape[2]
    if (rot.shape[1] != x.shape[2] or n_hashes < 1 or rot.shape[2] % n_hashes
            or rot.shape[2] < n_hashes or buckets.shape[0] != nbatch
            or buckets.shape[1] != n_hashes or buckets.shape[2] != L
            or rot_index.shape[0] != nbatch):
        raise ValueError("lsh_hash: x (nbatch, L, E), rot (nrot, E, n_hashes * half), "
                         "buckets (nbatch, n_hashes, L)")
    _check_layout(x.dtype, x, rot)
    _check_layout(np.dtype(np.intp), rot_index, buckets)
    _check_indices(rot_index, rot.shape[0], "rot_index")
    cdef int half = <int>(rot.shape[2] // n_hashes)
    cdef void *xd = cnp.PyArray_DATA(x)
    cdef void *rd = cnp.PyArray_DATA(rot)
    cdef const Py_ssize_t *ri = intp_data(rot_index)
    cdef Py_ssize_t *bd = <Py_ssize_t *>cnp.PyArray_DATA(buckets)
    cdef int failed = 0
    cdef bint is_f32 = x.dtype.num == cnp.NPY_FLOAT32
    if nbatch * L == 0:
        return
    with nogil:
        if is_f32:
            hash_kernel[float](<const float *>xd, <const float *>rd, ri, nbatch, L, e,
                               n_hashes, half, 256, bd, nthreads, &failed)
        else:
            hash_kernel[double](<const double *>xd, <const double *>rd, ri, nbatch, L, e,
                                n_hashes, half, 256, bd, nthreads, &failed)
    if failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its rotation tile")


# ---- the top-k keys of each centroid --------------------------------------------------------

cdef struct Candidate:
    double score
    Py_ssize_t index


cdef inline bint ranks_before(const Candidate *a, const Candidate *b) noexcept nogil:
    # higher score first; the lower index on ties
    return a.score > b.score or (a.score == b.score and a.index < b.index)


cdef inline void sift_down(Candidate *heap, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    # Restore the heap below i; heap[0] is the candidate ranked last (a min-heap).
    cdef Py_ssize_t child
    cdef Candidate tmp
    while True:
        child = 2 * i + 1
        if child >= n:
            return
        if child + 1 < n and ranks_before(heap + child, heap + child + 1):
            child += 1
        if not ranks_before(heap + i, heap + child):
            return
        tmp = heap[i]
        heap[i] = heap[child]
        heap[child] = tmp
        i = child


cdef inline void heap_offer(Candidate *heap, Py_ssize_t *size, Py_ssize_t cap, double score,
                            Py_ssize_t index) noexcept nogil:
    # Keep the cap best candidates seen so far.
    cdef Py_ssize_t i, parent
    cdef Candidate c, tmp
    c.score = score
    c.index = index
    if size[0] < cap:
        # sift up
        i = size[0]
        heap[i] = c
        size[0] += 1
        while i > 0:
            parent = (i - 1) // 2
            if not ranks_before(heap + parent, heap + i):
                break
            tmp = heap[i]
            heap[i] = heap[parent]
            heap[parent] = tmp
            i = parent
    elif ranks_before(&c, heap):
        heap[0] = c
        sift_down(heap, size[0], 0)


cdef void topk_kernel(const real *c, const double *c64, const real *k,
                      Py_ssize_t nbatch, Py_ssize_t C, Py_ssize_t S, int e, real scale,
                      Py_ssize_t topk, Py_ssize_t cap, int block_c, int block_k,
                      Py_ssize_t *top, double *top_score, int nthreads,
                      int *failed) noexcept nogil:
    # For each centroid row (b, i): the topk keys j with the largest float64 scores
    # scale * c64[b, i] . k[b, j]. Candidates are first the cap >= topk best by the
    # compute-dtype scores (tile gemms), then rescored in float64 and the best topk
    # kept, so the choice agrees with float64 scores unless rounding reorders keys
    # across the cap-th place.
    cdef Py_ssize_t nblk = (C + block_c - 1) // block_c
    cdef Py_ssize_t item, b, i0, r, k0, j, t
    cdef int rows, cols
    cdef double acc
    cdef real *s
    cdef Candidate *heaps
    cdef Py_ssize_t *sizes
    cdef Candidate *heap
    cdef const double *crow
    cdef const real *krow
    with nogil, parallel(num_threads=nthreads):
        s = <real *>malloc(block_c * block_k * sizeof(real))
        heaps = <Candidate *>malloc(block_c * cap * sizeof(Candidate))
        sizes = <Py_ssize_t *>malloc(block_c * sizeof(Py_ssize_t))
        for item in prange(nbatch * nblk, schedule='dynamic'):
            if s == NULL or heaps == NULL or sizes == NULL:
                failed[0] = 1
            else:
                b = item // nblk
                i0 = (item % nblk) * block_c
                rows = block_len(C, i0, block_c)
                for r in range(rows):
                    sizes[r] = 0
                k0 = 0
                while k0 < S:
                    cols = block_len(S, k0, block_k)
                    # s <- scale * c[b, i0:i0 + rows] @ k[b, k0:k0 + cols].T
                    gemm_abt(rows, cols, e, scale, c + (b * C + i0) * e, e,
                             k + (b * S + k0) * e, e, 0, s, cols)
                    for r in range(rows):
                        heap = heaps + r * cap
                        for j in range(cols):
                            # most keys rank below a full heap's worst: reject them first
                            if sizes[r] == cap and s[r * cols + j] < heap[0].score:
                                continue
                            heap_offer(heap, sizes + r, cap, s[r * cols + j], k0 + j)
                    k0 = k0 + cols
                for r in range(rows):
                    # rescore the candidates in float64, then keep the best topk
                    heap = heaps + r * cap
                    crow = c64 + (b * C + i0 + r) * e
                    for t in range(sizes[r]):
                        krow = k + (b * S + heap[t].index) * e
                        acc = 0
                        for j in range(e):
                            acc = acc + crow[j] * krow[j]
                        heap[t].score = acc * scale
                    # heapify, then pop the worst until topk remain
                    t = sizes[r] // 2
                    while t > 0:
                        t = t - 1
                        sift_down(heap, sizes[r], t)
                    while sizes[r] > topk:
                        sizes[r] -= 1
                        heap[0] = heap[sizes[r]]
                        sift_down(heap, sizes[r], 0)
                    for t in range(topk):
                        top[(b * C + i0 + r) * topk + t] = heap[t].index
                        top_score[(b * C + i0 + r) * topk + t] = heap[t].score
        free(s)
        free(heaps)
        free(sizes)
    # end: with nogil, parallel


def centroid_topk(cnp.ndarray c, cnp.ndarray c64, cnp.ndarray k, double scale, Py_ssize_t topk,
                  Py_ssize_t cap, cnp.ndarray top, cnp.ndarray top_score, int nthreads):
    """top (nbatch, C, topk) intp, top_score (same shape) float64 <- for every centroid the
    topk keys with the largest scale * c64 . k (float64), found among the cap best by
    compute-dtype scores. c (nbatch, C, E) and k (nbatch, S, E) C-contiguous in one dtype;
    c64 their float64 centroids; topk <= cap <= S."""
    cdef Py_ssize_t nbatch = c.shape[0], C = c.shape[1], S = k.shape[1]
    cdef int e = <int>c.shape[2]
    if not (1 <= topk <= cap <= S) or c64.shape[0] != nbatch or c64.shape[1] != C \
            or k.shape[0] != nbatch or k.shape[2] != e or c64.shape[2] != e \
            or top.size != nbatch * C * topk or top_score.size != nbatch * C * topk:
        raise ValueError("centroid_topk: needs 1 <= topk <= cap <= S and matching shapes")
    _check_layout(c.dtype, c, k)
    _check_layout(np.dtype(np.float64), c64, top_score)
    _check_layout(np.dtype(np.intp), top)
    cdef void *cd = cnp.PyArray_DATA(c)
    cdef const double *c64d = <const double *>cnp.PyArray_DATA(c64)
    cdef void *kd = cnp.PyArray_DATA(k)
    cdef Py_ssize_t *td = <Py_ssize_t *>cnp.PyArray_DATA(top)
    cdef double *sd = <double *>cnp.PyArray_DATA(top_score)
    cdef int failed = 0
    cdef bint is_f32 = c.dtype.num == cnp.NPY_FLOAT32
    if nbatch * C == 0:
        return
    with nogil:
        if is_f32:
            topk_kernel[float](<const float *>cd, c64d, <const float *>kd, nbatch, C, S,
                               e, <float>scale, topk, cap, 32, 512, td, sd, nthreads, &failed)
        else:
            topk_kernel[double](<const double *>cd, c64d, <const double *>kd, nbatch, C,
                                S, e, scale, topk, cap, 32, 512, td, sd, nthreads, &failed)
    if failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its top-k buffers")


# ---- Lloyd k-means, one batch entry per thread ------------------------------------------------

cdef void kmeans_kernel(const real *x, double *c64, Py_ssize_t *assign, Py_ssize_t *counts,
                        Py_ssize_t nbatch, Py_ssize_t L, int C, int e, int iterations,
                        int block, int nthreads, int *failed) noexcept nogil:
    # For each batch entry b, independently (no synchronisation between iterations):
    #   repeat `iterations` times, or until the assignment stops changing:
    #     assign[b, i] <- argmax_j 2 x_i . c_j - |c_j|^2      (nearest centroid)
    #     c64[b, j] <- mean of its members (float64); an empty cluster keeps its centroid
    #   counts[b, j] <- members of cluster j under the final assignment
    # x[b] (L x e) stays in this thread's cache across the iterations.
    cdef Py_ssize_t b, r0, j, it
    cdef int rows, t
    cdef bint changed
    cdef real *c
    cdef real *neg_sq
    cdef real *d
    cdef double *sums
    cdef double *crow
    cdef double *srow
    cdef const real *xb
    cdef Py_ssize_t *ab
    cdef Py_ssize_t *cb
    with nogil, parallel(num_threads=nthreads):
        c = <real *>malloc(C * e * sizeof(real))
        neg_sq = <real *>malloc(C * sizeof(real))
        d = <real *>malloc(block * C * sizeof(real))
        sums = <double *>malloc(C * e * sizeof(double))
        for b in prange(nbatch, schedule='dynamic'):
            if c == NULL or neg_sq == NULL or d == NULL or sums == NULL:
                failed[0] = 1
            else:
                xb = x + b * L * e
                ab = assign + b * L
                cb = counts + b * C
                for it in range(iterations):
                    # c <- the centroids in the compute dtype; neg_sq <- -|c_j|^2
                    for j in range(C):
                        neg_sq[j] = 0
                        for t in range(e):
                            c[j * e + t] = <real>c64[(b * C + j) * e + t]
                            neg_sq[j] -= c[j * e + t] * c[j * e + t]
                    changed = it == 0
                    r0 = 0
                    while r0 < L:
                        rows = block_len(L, r0, block)
                        if assign_nearest(xb + r0 * e, rows, e, c, neg_sq, C, d, ab + r0):
                            changed = True
                        r0 = r0 + rows
                    if not changed:
                        break           # a fixed point: c64 already holds these means
                    # c64 <- member means
                    for j in range(C * e):
                        sums[j] = 0
                    for j in range(C):
                        cb[j] = 0
                    add_to_clusters(xb, ab, L, e, sums, cb)
                    for j in range(C):
                        if cb[j] > 0:
                            crow = c64 + (b * C + j) * e
                            srow = sums + j * e
                            for t in range(e):
                                crow[t] = srow[t] / cb[j]
        free(c)
        free(neg_sq)
        free(d)
        free(sums)
    # end: with nogil, parallel


def kmeans(cnp.ndarray x, cnp.ndarray c64, cnp.ndarray assign, cnp.ndarray counts,
           int iterations, int nthreads):
    """Lloyd's k-means on each x[b] (nbatch, L, E) from the float64 centroids c64
    (nbatch, C, E), updated in place; assign (nbatch, L) and counts (nbatch, C) intp get
    the final assignment and cluster sizes. iterations >= 1."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1]
    cdef int e = <int>x.shape[2], C = <int>c64.shape[1]
    if (c64.shape[0] != nbatch or c64.shape[2] != e or C < 1 or iterations < 1
            or assign.shape[0] != nbatch or assign.shape[1] != L
            or counts.shape[0] != nbatch or counts.shape[1] != C):
        raise ValueError("kmeans: x (nbatch, L, E), c64 (nbatch, C >= 1, E), assign "
                         "(nbatch, L), counts (nbatch, C), iterations >= 1")
    _check_layout(x.dtype, x)
    _check_layout(np.dtype(np.float64), c64)
    _check_layout(np.dtype(np.intp), assign, counts)
    cdef void *xd = cnp.PyArray_DATA(x)
    cdef double *cd = <double *>cnp.PyArray_DATA(c64)
    cdef Py_ssize_t *ad = <Py_ssize_t *>cnp.PyArray_DATA(assign)
    cdef Py_ssize_t *nd = <Py_ssize_t *>cnp.PyArray_DATA(counts)
    cdef int failed = 0
    cdef bint is_f32 = x.dtype.num == cnp.NPY_FLOAT32
    if nbatch * L == 0:
        return
    with nogil:
        if is_f32:
            kmeans_kernel[float](<const float *>xd, cd, ad, nd, nbatch, L, C, e, iterations,
                                 256, nthreads, &failed)
        else:
            kmeans_kernel[double](<const double *>xd, cd, ad, nd, nbatch, L, C, e, iterations,
                                  256, nthreads, &failed)
    if failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its k-means buffers")


# ---- Sinkhorn: mixing blocks ------------------------------------------------------------------

cdef void mix_kernel(const real *P, const real *xb, real *out, Py_ssize_t nbatch,
                     int n, int width, Py_ssize_t ldo, Py_ssize_t bstride, int split,
                     int nthreads) noexcept nogil:
    # out[b, i, :width] <- sum_j P[b, i, j] xb[b, j, :width]  (out: batch stride bstride,
    # row stride ldo), columns cut in `split` pieces so that few batch entries still
    # use every thread.
    cdef Py_ssize_t item, b, w0
    cdef int piece = (width + split - 1) // split
    cdef int cols
    for item in prange(nbatch * split, schedule='static', num_threads=nthreads):
        b = item // split
        w0 = (item % split) * piece
        if w0 < width:
            cols = block_len(width, w0, piece)
            gemm_ab(n, cols, n, 1, P + b * n * n, n, xb + b * n * width + w0, width, 0,
                    out + b * bstride + w0, <int>ldo)


def mix_blocks(cnp.ndarray P, cnp.ndarray xb, cnp.ndarray out, int nthreads):
    """out[b, i, :W] <- P[b] @ xb[b] for P (nbatch, n, n), xb (nbatch, n, W) C-contiguous,
    out (nbatch, n, W) with unit column stride and rows of at least W elements apart
    (e.g. the second half of an (nbatch, n, 2W) array)."""
    cdef Py_ssize_t nbatch = P.shape[0]
    cdef int n = <int>P.shape[1], width = <int>xb.shape[2]
    cdef Py_ssize_t item_size = P.dtype.itemsize
    cdef Py_ssize_t ldo, bstride
    if (P.shape[2] != n or xb.shape[0] != nbatch or xb.shape[1] != n
            or out.shape[0] != nbatch or out.shape[1] != n or out.shape[2] != width):
        raise ValueError("mix_blocks: P (nbatch, n, n), xb (nbatch, n, W), out (nbatch, n, W)")
    _check_layout(P.dtype, P, xb)
    if nbatch * n * width == 0:
        return
    # strides of size-1 axes carry no meaning: only the used ones are checked
    ldo = out.strides[1] // item_size if n > 1 else width
    bstride = out.strides[0] // item_size if nbatch > 1 else 0
    if (out.dtype != P.dtype or (width > 1 and out.strides[2] != item_size)
            or any(st % item_size for st in (out.strides[0], out.strides[1])) or ldo < width
            or (nbatch > 1 and bstride < n * ldo)):
        raise ValueError("mix_blocks: out must be rows of W contiguous elements that do not "
                         "overlap")
    cdef int split = max(1, min(8, (2 * nthreads + nbatch - 1) // nbatch))
    cdef void *pd = cnp.PyArray_DATA(P)
    cdef void *xd = cnp.PyArray_DATA(xb)
    cdef void *od = cnp.PyArray_DATA(out)
    cdef bint is_f32 = P.dtype.num == cnp.NPY_FLOAT32
    with nogil:
        if is_f32:
            mix_kernel[float](<const float *>pd, <const float *>xd, <float *>od, nbatch, n,
                              width, ldo, bstride, split, nthreads)
        else:
            mix_kernel[double](<const double *>pd, <const double *>xd, <double *>od, nbatch,
                               n, width, ldo, bstride, split, nthreads)
