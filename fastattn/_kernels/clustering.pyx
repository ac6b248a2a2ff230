# Content-based sparse attention, the grouping side: who attends to whom is decided by
# the data (gathered.pyx then runs the attention over the chosen rows).
#
# `nearest_centroid` / `cluster_sums` are the two halves of a Lloyd k-means step;
# `lsh_hash` is the Reformer hash; `centroid_topk` picks each centroid's best keys.
# `kmeans` runs the whole of Lloyd's k-means, one batch entry per thread; `mix_blocks`
# is Sinkhorn attention's block mixing (P @ blocks).
#
# Every kernel runs on the parallel skeleton (parallel.pxd): its call is one struct,
# filled once from the validated arguments; its item hook holds its one dtype dispatch;
# a `*_scratch` function sizes the per-thread scratch that the body carves with
# scratch_take. Items are row blocks, batch entries or column pieces, each written by
# one thread only, so results do not depend on the thread count (except mix_blocks,
# whose column pieces follow it).

cimport numpy as cnp
import numpy as np

from fastattn._kernels.parallel cimport run_items, scratch_room, scratch_take, DT_FLOAT32
from fastattn._kernels.parallel import dtype_code
from fastattn._kernels.tile cimport intp_data, real, gemm_abt, gemm_ab, row_add_max, block_len
from fastattn._kernels.gathered import _check_indices, _check_layout

cnp.import_array()


cdef inline Py_ssize_t even_grain(Py_ssize_t nitems, int nthreads) noexcept nogil:
    # Items claimed at a time for many small items of even cost: about four claims per
    # thread, so that a thread the OS does not schedule delays at most a quarter share.
    cdef Py_ssize_t claims = 4 * (nthreads if nthreads > 0 else 1)
    return (nitems + claims - 1) // claims if nitems > claims else 1


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


cdef struct Nearest:
    # One call of nearest_centroid (or of its row blocks).
    const void *x              # (nbatch, L, e)
    const void *c              # (nbatch, C, e) centroids in x's dtype
    const void *neg_c_sq       # (nbatch, C): -|c_j|^2
    Py_ssize_t *assign         # (nbatch, L)
    Py_ssize_t nbatch, L
    int C, e, block, dtype, nthreads


cdef size_t nearest_scratch(const Nearest *p, size_t itemsize) noexcept nogil:
    # one thread's distance tile: block x C
    return scratch_room(p.block * p.C * itemsize)


cdef void nearest_rows(const Nearest *p, Py_ssize_t item, real *d) noexcept nogil:
    # assign_nearest on row block item of some x[b]; d: the thread's distance tile
    cdef Py_ssize_t nblk = (p.L + p.block - 1) // p.block
    cdef Py_ssize_t b = item // nblk
    cdef Py_ssize_t r0 = (item % nblk) * p.block
    assign_nearest(<const real *>p.x + (b * p.L + r0) * p.e, block_len(p.L, r0, p.block), p.e,
                   <const real *>p.c + b * p.C * p.e, <const real *>p.neg_c_sq + b * p.C,
                   p.C, d, p.assign + b * p.L + r0)


cdef void nearest_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const Nearest *p = <const Nearest *>run
    if p.dtype == DT_FLOAT32:
        nearest_rows[float](p, item, <float *>scratch)
    else:
        nearest_rows[double](p, item, <double *>scratch)


def nearest_centroid(cnp.ndarray x, cnp.ndarray c, cnp.ndarray assign, int nthreads):
    """assign (nbatch, L) intp <- nearest row of c (nbatch, C, E) for each row of
    x (nbatch, L, E); x and c C-contiguous, one dtype."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1]
    cdef int e = <int>x.shape[2], C = <int>c.shape[1]
    if c.shape[0] != nbatch or c.shape[2] != e or assign.shape[0] * assign.shape[1] != nbatch * L \
            or C < 1:
        raise ValueError("nearest_centroid: x (nbatch, L, E), c (nbatch, C >= 1, E), "
                         "assign (nbatch, L)")
    _check_layout(x.dtype, x, c)
    _check_layout(np.dtype(np.intp), assign)
    neg_c_sq = -np.einsum("bce,bce->bc", c, c)
    cdef Nearest p
    p.x = cnp.PyArray_DATA(x)
    p.c = cnp.PyArray_DATA(c)
    p.neg_c_sq = cnp.PyArray_DATA(neg_c_sq)
    p.assign = <Py_ssize_t *>cnp.PyArray_DATA(assign)
    p.nbatch = nbatch
    p.L = L
    p.C = C
    p.e = e
    p.block = 256
    p.dtype = dtype_code(x.dtype)
    p.nthreads = nthreads
    cdef size_t scratch = nearest_scratch(&p, x.dtype.itemsize)
    with nogil:
        run_items(nearest_item, &p, nbatch * ((L + p.block - 1) // p.block), 1, scratch,
                  p.nthreads, "k-means distance tile")


cdef struct Sums:
    # One call of cluster_sums.
    const void *x              # (nbatch, L, e)
    const Py_ssize_t *assign   # (nbatch, L)
    double *sums               # (nbatch, C, e)
    Py_ssize_t *counts         # (nbatch, C)
    Py_ssize_t nbatch, L, C, e
    int dtype, nthreads


cdef void sums_entry(const Sums *p, Py_ssize_t b, const real *x) noexcept nogil:
    # add_to_clusters on x[b] (x: p.x in its dtype)
    add_to_clusters(x + b * p.L * p.e, p.assign + b * p.L, p.L, p.e,
                    p.sums + b * p.C * p.e, p.counts + b * p.C)


cdef void sums_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const Sums *p = <const Sums *>run
    if p.dtype == DT_FLOAT32:
        sums_entry[float](p, item, <const float *>p.x)
    else:
        sums_entry[double](p, item, <const double *>p.x)


def cluster_sums(cnp.ndarray x, cnp.ndarray assign, cnp.ndarray sums, cnp.ndarray counts,
                 int nthreads):
    """sums (nbatch, C, E) float64 and counts (nbatch, C) intp, both zeroed by the caller,
    <- per-cluster sums and sizes of x (nbatch, L, E) under assign (nbatch, L), whose
    entries must lie in [0, C). One batch entry per item."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1], e = x.shape[2], C = sums.shape[1]
    if (sums.shape[0] != nbatch or sums.shape[2] != e or counts.shape[0] != nbatch
            or counts.shape[1] != C or assign.shape[0] != nbatch or assign.shape[1] != L):
        raise ValueError("cluster_sums: x (nbatch, L, E), assign (nbatch, L), sums (nbatch, C, E), "
                         "counts (nbatch, C)")
    _check_layout(np.dtype(np.float64), sums)
    _check_layout(np.dtype(np.intp), assign, counts)
    _check_indices(assign.reshape(-1), C, "assign")
    cdef Sums p
    p.x = cnp.PyArray_DATA(x)
    p.assign = intp_data(assign)
    p.sums = <double *>cnp.PyArray_DATA(sums)
    p.counts = <Py_ssize_t *>cnp.PyArray_DATA(counts)
    p.nbatch = nbatch
    p.L = L
    p.C = C
    p.e = e
    p.dtype = dtype_code(x.dtype)
    p.nthreads = nthreads
    with nogil:
        run_items(sums_item, &p, nbatch, even_grain(nbatch, nthreads), 0, p.nthreads, "")


# ---- Reformer hashing ----------------------------------------------------------------------

cdef struct Hash:
    # One call of lsh_hash.
    const void *x              # (nbatch, L, e)
    const void *rot            # (nrot, e, n_hashes * half)
    const Py_ssize_t *rot_index  # (nbatch,): batch b uses rot[rot_index[b]]
    Py_ssize_t *buckets        # (nbatch, n_hashes, L)
    Py_ssize_t nbatch, L
    int e, n_hashes, half, block, dtype, nthreads


cdef size_t hash_scratch(const Hash *p, size_t itemsize) noexcept nogil:
    # one thread's rotated rows: block x (n_hashes * half)
    return scratch_room(p.block * p.n_hashes * p.half * itemsize)


cdef void hash_rows(const Hash *p, Py_ssize_t item, real *d) noexcept nogil:
    # buckets[b, h, i] <- argmax([x_i R_h, -x_i R_h]) for the rows i of row block item
    # of x[b]: the first maximum, as np.argmax of the concatenation (ties between the
    # halves go to the first). d: the thread's scratch.
    cdef Py_ssize_t nblk = (p.L + p.block - 1) // p.block
    cdef int half = p.half
    cdef int width = p.n_hashes * half
    cdef Py_ssize_t b = item // nblk
    cdef Py_ssize_t r0 = (item % nblk) * p.block
    cdef int rows = block_len(p.L, r0, p.block)
    cdef Py_ssize_t L = p.L
    cdef Py_ssize_t *bucket = p.buckets + b * p.n_hashes * L + r0   # round h at h * L
    cdef Py_ssize_t r, j, hi_j, lo_j
    cdef int h
    cdef real hi, lo, val
    cdef real *drow
    # d <- x[b, r0:r0 + rows] @ R   (R: e x width, row-major)
    gemm_ab(rows, width, p.e, 1, <const real *>p.x + (b * p.L + r0) * p.e, p.e,
            <const real *>p.rot + p.rot_index[b] * p.e * width, width, 0, d, width)
    for r in range(rows):
        for h in range(p.n_hashes):
            drow = d + r * width + h * half
            hi = drow[0]
            lo = drow[0]
            hi_j = 0
            lo_j = 0
            for j in range(1, half):
                # branch-free selects (cmov, maxss): the data's order is random
                val = drow[j]
                hi_j = j if val > hi else hi_j
                hi = val if val > hi else hi
                lo_j = j if val < lo else lo_j
                lo = val if val < lo else lo
            bucket[h * L + r] = hi_j if hi >= -lo else half + lo_j


cdef void hash_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const Hash *p = <const Hash *>run
    if p.dtype == DT_FLOAT32:
        hash_rows[float](p, item, <float *>scratch)
    else:
        hash_rows[double](p, item, <double *>scratch)


def lsh_hash(cnp.ndarray x, cnp.ndarray rot, cnp.ndarray rot_index, cnp.ndarray buckets,
             int n_hashes, int nthreads):
    """buckets (nbatch, n_hashes, L) intp <- Reformer hashes of the rows of x (nbatch, L, E)
    under rotations rot (nrot, E, n_hashes * half); batch b uses rot[rot_index[b]]. x and
    rot C-contiguous, one dtype."""
    cdef Py_ssize_t nbatch = x.shape[0], L = x.shape[1]
    if (rot.shape[1] != x.shape[2] or n_hashes < 1 or rot.shape[2] % n_hashes
            or rot.shape[2] < n_hashes or buckets.shape[0] != nbatch
            or buckets.shape[1] != n_hashes or buckets.shape[2] != L
            or rot_index.shape[0] != nbatch):
        raise ValueError("lsh_hash: x (nbatch, L, E), rot (nrot, E, n_hashes * half), "
                         "buckets (nbatch, n_hashes, L)")
    _check_layout(x.dtype, x, rot)
    _check_layout(np.dtype(np.intp), rot_index, buckets)
    _check_indices(rot_index, rot.shape[0], "rot_index")
    cdef Hash p
    p.x = cnp.PyArray_DATA(x)
    p.rot = cnp.PyArray_DATA(rot)
    p.rot_index = intp_data(rot_index)
    p.buckets = <Py_ssize_t *>cnp.PyArray_DATA(buckets)
    p.nbatch = nbatch
    p.L = L
    p.e = <int>x.shape[2]
    p.n_hashes = n_hashes
    p.half = <int>(rot.shape[2] // n_hashes)
    p.block = 256
    p.dtype = dtype_code(x.dtype)
    p.nthreads = nthreads
    cdef size_t scratch = hash_scratch(&p, x.dtype.itemsize)
    with nogil:
        run_items(hash_item, &p, nbatch * ((L + p.block - 1) // p.block), 1, scratch,
                  p.nthreads, "LSH rotation tile")


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


cdef struct TopK:
    # One call of centroid_topk.
    const void *c              # (nbatch, C, e) centroids in the compute dtype
    const double *c64          # (nbatch, C, e) the same in float64
    const void *k              # (nbatch, S, e)
    Py_ssize_t *top            # (nbatch, C, topk)
    double *top_score          # (nbatch, C, topk)
    Py_ssize_t nbatch, C, S, topk, cap
    double scale
    int e, block_c, block_k, dtype, nthreads


cdef size_t topk_scratch(const TopK *p, size_t itemsize) noexcept nogil:
    # One thread's scratch (carved in this order by topk_rows): the score tile, one heap
    # of cap candidates per centroid row of a block, and the heaps' sizes.
    return (scratch_room(p.block_c * p.block_k * itemsize)
            + scratch_room(p.block_c * p.cap * sizeof(Candidate))
            + scratch_room(p.block_c * sizeof(Py_ssize_t)))


cdef void topk_rows(const TopK *p, Py_ssize_t item, real *s) noexcept nogil:
    # For each centroid row (b, i) of block item: the topk keys j with the largest
    # float64 scores scale * c64[b, i] . k[b, j]. Candidates are first the cap >= topk
    # best by the compute-dtype scores (tile gemms), then rescored in float64 and the
    # best topk kept, so the choice agrees with float64 scores unless rounding reorders
    # keys across the cap-th place. s: the thread's scratch (topk_scratch).
    cdef const real *c = <const real *>p.c
    cdef const real *k = <const real *>p.k
    cdef Py_ssize_t C = p.C, S = p.S, cap = p.cap, topk = p.topk
    cdef int e = p.e
    cdef real scale = <real>p.scale
    cdef Py_ssize_t nblk = (C + p.block_c - 1) // p.block_c
    cdef Py_ssize_t b, i0, r, k0, j, t
    cdef int rows, cols
    cdef double acc
    cdef char *cursor = <char *>s
    cdef Candidate *heaps
    cdef Py_ssize_t *sizes
    cdef Candidate *heap
    cdef const double *crow
    cdef const real *krow

    scratch_take(&cursor, p.block_c * p.block_k * sizeof(real))
    heaps = <Candidate *>scratch_take(&cursor, p.block_c * cap * sizeof(Candidate))
    sizes = <Py_ssize_t *>scratch_take(&cursor, p.block_c * sizeof(Py_ssize_t))

    b = item // nblk
    i0 = (item % nblk) * p.block_c
    rows = block_len(C, i0, p.block_c)
    for r in range(rows):
        sizes[r] = 0
    k0 = 0
    while k0 < S:
        cols = block_len(S, k0, p.block_k)
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
        crow = p.c64 + (b * C + i0 + r) * e
        for t in range(sizes[r]):
            krow = k + (b * S + heap[t].index) * e
            acc = 0
            for j in range(e):
                acc = acc + crow[j] * krow[j]
            heap[t].score = acc * p.scale
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
            p.top[(b * C + i0 + r) * topk + t] = heap[t].index
            p.top_score[(b * C + i0 + r) * topk + t] = heap[t].score


cdef void topk_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const TopK *p = <const TopK *>run
    if p.dtype == DT_FLOAT32:
        topk_rows[float](p, item, <float *>scratch)
    else:
        topk_rows[double](p, item, <double *>scratch)


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
    cdef TopK p
    p.c = cnp.PyArray_DATA(c)
    p.c64 = <const double *>cnp.PyArray_DATA(c64)
    p.k = cnp.PyArray_DATA(k)
    p.top = <Py_ssize_t *>cnp.PyArray_DATA(top)
    p.top_score = <double *>cnp.PyArray_DATA(top_score)
    p.nbatch = nbatch
    p.C = C
    p.S = S
    p.topk = topk
    p.cap = cap
    p.scale = scale
    p.e = e
    p.block_c = 32
    p.block_k = 512
    p.dtype = dtype_code(c.dtype)
    p.nthreads = nthreads
    cdef size_t scratch = topk_scratch(&p, c.dtype.itemsize)
    with nogil:
        run_items(topk_item, &p, nbatch * ((C + p.block_c - 1) // p.block_c), 1, scratch,
                  p.nthreads, "top-k candidate buffers")


# ---- Lloyd k-means, one batch entry per thread ------------------------------------------------

cdef struct KMeans:
    # One call of kmeans.
    const void *x              # (nbatch, L, e)
    double *c64                # (nbatch, C, e), updated in place
    Py_ssize_t *assign         # (nbatch, L)
    Py_ssize_t *counts         # (nbatch, C)
    Py_ssize_t nbatch, L
    int C, e, iterations, block, dtype, nthreads


cdef size_t kmeans_scratch(const KMeans *p, size_t itemsize) noexcept nogil:
    # One thread's scratch (carved in this order by kmeans_entry): the centroids in the
    # compute dtype, their -|c_j|^2, a distance tile of block x C, and float64 sums.
    return (scratch_room(p.C * p.e * itemsize) + scratch_room(p.C * itemsize)
            + scratch_room(p.block * p.C * itemsize) + scratch_room(p.C * p.e * sizeof(double)))


cdef void kmeans_entry(const KMeans *p, Py_ssize_t b, real *c) noexcept nogil:
    # For batch entry b (no synchronisation with the others between iterations):
    #   repeat `iterations` times, or until the assignment stops changing:
    #     assign[b, i] <- argmax_j 2 x_i . c_j - |c_j|^2      (nearest centroid)
    #     c64[b, j] <- mean of its members (float64); an empty cluster keeps its centroid
    #   counts[b, j] <- members of cluster j under the final assignment
    # x[b] (L x e) stays in this thread's cache across the iterations. c: the thread's
    # scratch (kmeans_scratch).
    cdef Py_ssize_t L = p.L, j, it, r0
    cdef int C = p.C, e = p.e, rows, t
    cdef bint changed
    cdef char *cursor = <char *>c
    cdef real *neg_sq
    cdef real *d
    cdef double *sums
    cdef double *crow
    cdef double *srow
    cdef double *c64 = p.c64
    cdef const real *xb = <const real *>p.x + b * L * e
    cdef Py_ssize_t *ab = p.assign + b * L
    cdef Py_ssize_t *cb = p.counts + b * C

    scratch_take(&cursor, C * e * sizeof(real))
    neg_sq = <real *>scratch_take(&cursor, C * sizeof(real))
    d = <real *>scratch_take(&cursor, p.block * C * sizeof(real))
    sums = <double *>scratch_take(&cursor, C * e * sizeof(double))
    for it in range(p.iterations):
        # c <- the centroids in the compute dtype; neg_sq <- -|c_j|^2
        for j in range(C):
            neg_sq[j] = 0
            for t in range(e):
                c[j * e + t] = <real>c64[(b * C + j) * e + t]
                neg_sq[j] -= c[j * e + t] * c[j * e + t]
        changed = it == 0
        r0 = 0
        while r0 < L:
            rows = block_len(L, r0, p.block)
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


cdef void kmeans_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const KMeans *p = <const KMeans *>run
    if p.dtype == DT_FLOAT32:
        kmeans_entry[float](p, item, <float *>scratch)
    else:
        kmeans_entry[double](p, item, <double *>scratch)


def kmeans(cnp.ndarray x, cnp.ndarray c64, cnp.ndarray assign, cnp.ndarray counts,
           int iterations, int nthreads):
    """Lloyd's k-means on each x[b] (nbatch, L, E) from the float64 centroids c64
    (nbatch, C, E), updated in place; assign (nbatch, L) and counts (nbatch, C) intp get
    the final assignment and cluster sizes. iterations >= 1. One batch entry per item."""
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
    if L == 0:
        return
    cdef KMeans p
    p.x = cnp.PyArray_DATA(x)
    p.c64 = <double *>cnp.PyArray_DATA(c64)
    p.assign = <Py_ssize_t *>cnp.PyArray_DATA(assign)
    p.counts = <Py_ssize_t *>cnp.PyArray_DATA(counts)
    p.nbatch = nbatch
    p.L = L
    p.C = C
    p.e = e
    p.iterations = iterations
    p.block = 256
    p.dtype = dtype_code(x.dtype)
    p.nthreads = nthreads
    cdef size_t scratch = kmeans_scratch(&p, x.dtype.itemsize)
    with nogil:
        run_items(kmeans_item, &p, nbatch, 1, scratch, p.nthreads, "k-means buffers")


# ---- Sinkhorn: mixing blocks ------------------------------------------------------------------

cdef struct Mix:
    # One call of mix_blocks: out[b] <- P[b] @ xb[b], columns cut in `split` pieces.
    const void *P              # (nbatch, n, n)
    const void *xb             # (nbatch, n, width)
    void *out                  # batch stride bstride, row stride ldo
    Py_ssize_t nbatch, ldo, bstride
    int n, width, split, dtype, nthreads


cdef void mix_piece(const Mix *p, Py_ssize_t item, real *out) noexcept nogil:
    # out[b, i, w0:w0 + cols] <- sum_j P[b, i, j] xb[b, j, w0:w0 + cols] for column piece
    # item of batch entry b (out: p.out in its dtype)
    cdef Py_ssize_t b = item // p.split
    cdef int piece = (p.width + p.split - 1) // p.split
    cdef Py_ssize_t w0 = (item % p.split) * piece
    cdef int n = p.n
    if w0 < p.width:
        gemm_ab(n, block_len(p.width, w0, piece), n, 1, <const real *>p.P + b * n * n, n,
                <const real *>p.xb + b * n * p.width + w0, p.width, 0,
                out + b * p.bstride + w0, <int>p.ldo)


cdef void mix_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const Mix *p = <const Mix *>run
    if p.dtype == DT_FLOAT32:
        mix_piece[float](p, item, <float *>p.out)
    else:
        mix_piece[double](p, item, <double *>p.out)


def mix_blocks(cnp.ndarray P, cnp.ndarray xb, cnp.ndarray out, int nthreads):
    """out[b, i, :W] <- P[b] @ xb[b] for P (nbatch, n, n), xb (nbatch, n, W) C-contiguous,
    out (nbatch, n, W) with unit column stride and rows of at least W elements apart
    (e.g. the second half of an (nbatch, n, 2W) array). The columns of each entry are
    cut in pieces so that few batch entries still use every one of ``nthreads``."""
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
    cdef Mix p
    p.P = cnp.PyArray_DATA(P)
    p.xb = cnp.PyArray_DATA(xb)
    p.out = cnp.PyArray_DATA(out)
    p.nbatch = nbatch
    p.ldo = ldo
    p.bstride = bstride
    p.n = n
    p.width = width
    p.split = max(1, min(8, (2 * nthreads + nbatch - 1) // nbatch))
    p.dtype = dtype_code(P.dtype)
    p.nthreads = nthreads
    with nogil:
        run_items(mix_item, &p, nbatch * p.split, even_grain(nbatch * p.split, nthreads), 0,
                  p.nthreads, "")
