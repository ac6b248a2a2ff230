# The tile/softmax core shared by every kernel family (dense, block-sparse, paged, ...).
#
# A kernel walks (query block, key block) tiles. For each tile, `attend_tile`
#   1. computes the scores  s <- scale * q_blk @ k_blk.T          (tile_scores)
#   2. restricts each row to its visible band of keys (causal band, window), applies the
#      score modifiers (soft-cap, ALiBi: ScoreMods) and the mask,
#   3. folds the row into the running online softmax (m, l, acc)  (FlashAttention-2),
#   4. accumulates          acc <- acc + p @ v_blk                 (tile_accumulate)
#      (with dropout, p's dropped entries zeroed and the kept ones scaled first)
# The two products run on the AVX-512 micro-kernels of tilegemm.h for float32 (when the
# CPU has AVX-512 and ev is a multiple of 16, see `tile_products_native`), else on BLAS.
# After the last tile, `finish_row` turns a row's (m, l, acc) into its output row and
# log-sum-exp.
# All routines are `noexcept nogil` and touch only the memory they are given.
# Beside this core: rowsoftmax.pxd (one whole row of a masked softmax), tanhscores.pxd
# (additive scores) and smallgemm.pxd (small GEMMs for decoding).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
cimport numpy as cnp
from fastattn._kernels.parallel cimport scratch_room
from libc.math cimport INFINITY, log
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm, dgemm

ctypedef fused real:
    float
    double

# Mask kinds understood by attend_tile.
cdef enum:
    MASK_NONE = 0
    MASK_BOOL = 1      # uint8, nonzero = keep
    MASK_FLOAT = 2     # same dtype as the scores, added after scaling

# Block states in a block map (a summary of the mask per tile).
cdef enum:
    BLOCK_SKIP = 0     # every element masked out: the tile is not computed
    BLOCK_MASKED = 1   # the mask must be applied element by element
    BLOCK_FULL = 2     # nothing masked (bool all True / float all 0): no mask work

# A mask as every kernel family reads it: kept at its own (broadcast) shape, plus its
# block map. Filled from a `fastattn._layout.PreparedMask` by `mask_view`.
cdef struct MaskView:
    int kind                    # MASK_NONE, MASK_BOOL or MASK_FLOAT
    const void *data
    const Py_ssize_t *off       # element offset of each batch's (rows, cols) matrix
    Py_ssize_t rs, cs           # row / column strides in elements, 0 where broadcast
    const uint8_t *bmap         # BLOCK_* per tile; NULL without a mask
    const Py_ssize_t *bmap_off  # per-batch offsets into bmap
    Py_ssize_t bmap_rs, bmap_cs


cdef inline const Py_ssize_t *intp_data(cnp.ndarray a):
    # Data pointer of an intp vector (per-batch element offsets built in fastattn._layout).
    return <const Py_ssize_t *>cnp.PyArray_DATA(a)


cdef inline MaskView mask_view(object prepared):
    # The MaskView of a MaskOperand or PreparedMask (fastattn._layout), without a block
    # map for the former; an empty one (kind MASK_NONE) for None.
    cdef MaskView view
    view.kind = MASK_NONE
    view.data = NULL
    view.off = NULL
    view.rs = view.cs = 0
    view.bmap = NULL
    view.bmap_off = NULL
    view.bmap_rs = view.bmap_cs = 0
    if prepared is None:
        return view
    view.kind = prepared.kind
    view.data = cnp.PyArray_DATA(prepared.array)
    view.off = intp_data(prepared.offsets)
    view.rs = prepared.row_stride
    view.cs = prepared.col_stride
    if prepared.block_map is None:
        return view
    view.bmap = <const uint8_t *>cnp.PyArray_DATA(prepared.block_map)
    view.bmap_off = intp_data(prepared.block_offsets)
    view.bmap_rs = prepared.block_row_stride
    view.bmap_cs = prepared.block_col_stride
    return view


# Column band that is "everything" (no causal or window limit).
cdef enum:
    BAND_ALL = 1 << 30


# ---- score modifiers (scoremods.h) ------------------------------------------------------
# Soft-capping and ALiBi, applied to a tile's scaled scores before the mask (flash-attn's
# order). A family that has them keeps one ScoreMods per thread and, for each tile call,
# sets `diag`: i + off - j (query position minus key position) of the call's element
# (0, 0); it passes NULL when a call has none, so unmodified tiles cost nothing extra.

cdef extern from "scoremods.h" nogil:
    ctypedef struct ScoreMods "fa_score_mods":
        double softcap          # > 0: s <- softcap * tanh(s / softcap); 0: off
        double slope            # ALiBi: s <- s - slope * |d|; 0: no bias
        Py_ssize_t diag         # d of element (0, 0); element (r, c) has diag + r - c
    bint fa_mods_active(const ScoreMods *m)
    void fa_mods_row_f32(const ScoreMods *m, float *s, Py_ssize_t n, Py_ssize_t d0)
    void fa_mods_row_f64(const ScoreMods *m, double *s, Py_ssize_t n, Py_ssize_t d0)


cdef inline void row_mods(const ScoreMods *mods, real *s, Py_ssize_t n,
                          Py_ssize_t d0) noexcept nogil:
    # s[j] (j < n, distance d0 - j) soft-capped, then the ALiBi bias added
    if real is float:
        fa_mods_row_f32(mods, s, n, d0)
    else:
        fa_mods_row_f64(mods, s, n, d0)


# ---- dropout on the probabilities (dropout.h) -----------------------------------------
# A driver with dropout points its TileOperands' `dropout` at one of these and keeps its
# batch, row0 and col0 on the current tile; attend_tile (through tile_attend) then drops
# probabilities after the softmax step (the row sums keep them) and before they meet V.

cdef extern from "dropout.h" nogil:
    ctypedef struct DropoutTile "fa_dropout":
        uint64_t seed, threshold
        double scale
        int64_t batch, row0, col0
    void fa_dropout_tile_f32(const DropoutTile *d, int r0, int rows, int cols, float *s)
    void fa_dropout_tile_f64(const DropoutTile *d, int r0, int rows, int cols, double *s)
    uint64_t fa_dropout_row_key(uint64_t seed, int64_t b, int64_t i)
    void fa_dropout_row_f32(float *p, Py_ssize_t n, uint64_t key, int64_t j0,
                            uint64_t threshold, float scale)
    void fa_dropout_row_f64(double *p, Py_ssize_t n, uint64_t key, int64_t j0,
                            uint64_t threshold, double scale)


cdef inline void dropout_row(const DropoutTile *d, Py_ssize_t batch, Py_ssize_t row,
                             Py_ssize_t col0, real *x, Py_ssize_t n) noexcept nogil:
    # x[:n] (columns col0 .. of query row `row` of batch entry `batch`) <- kept values
    # / (1 - p), dropped 0: the same decisions as dropout_tile (the backward's use)
    cdef uint64_t key = fa_dropout_row_key(d.seed, batch, row)
    if real is float:
        fa_dropout_row_f32(x, n, key, col0, d.threshold, <float>d.scale)
    else:
        fa_dropout_row_f64(x, n, key, col0, d.threshold, d.scale)


cdef inline void dropout_tile(const DropoutTile *d, int r0, int rows, int cols,
                              real *s) noexcept nogil:
    # s (rows x cols, the tile's rows r0 ..) <- kept probabilities / (1 - p), dropped 0
    if real is float:
        fa_dropout_tile_f32(d, r0, rows, cols, s)
    else:
        fa_dropout_tile_f64(d, r0, rows, cols, s)


cdef extern from "vecmath.h" nogil:
    float fa_max_f32(const float *x, Py_ssize_t n)
    double fa_max_f64(const double *x, Py_ssize_t n)
    float fa_add_max_f32(float *x, const float *add, Py_ssize_t n)
    double fa_add_max_f64(double *x, const double *add, Py_ssize_t n)
    float fa_keep_max_f32(float *x, const uint8_t *keep, Py_ssize_t n)
    double fa_keep_max_f64(double *x, const uint8_t *keep, Py_ssize_t n)
    float fa_exp_sum_f32(float *x, Py_ssize_t n, float m)
    double fa_exp_sum_f64(double *x, Py_ssize_t n, double m)
    void fa_scale_f32(float *x, Py_ssize_t n, float a)
    void fa_scale_f64(double *x, Py_ssize_t n, double a)
    void fa_axpy_f32(float *y, const float *x, Py_ssize_t n, float a)
    void fa_axpy_f64(double *y, const double *x, Py_ssize_t n, double a)
    float fa_dot_f32(const float *x, const float *y, Py_ssize_t n)
    double fa_dot_f64(const double *x, const double *y, Py_ssize_t n)
    float fa_expneg_f32(float x)
    double fa_expneg_f64(double x)


# ---- BLAS on row-major tiles --------------------------------------------------------
# BLAS is column-major: a row-major (m x n) matrix with row stride ld is its (n x m)
# transpose. So row-major C = A @ B^T is column-major C^T = B @ A^T, and so on.

cdef inline void gemm_abt(int m, int n, int k, real alpha, const real *a, int lda,
                          const real *b, int ldb, real beta, real *c, int ldc) noexcept nogil:
    # c[m, n] = alpha * a[m, k] @ b[n, k].T + beta * c
    cdef char ta = b'T'
    cdef char tb = b'N'
    if real is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, <float *>b, &ldb, <float *>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, <double *>b, &ldb, <double *>a, &lda, &beta, c, &ldc)


cdef inline void gemm_ab(int m, int n, int k, real alpha, const real *a, int lda,
                         const real *b, int ldb, real beta, real *c, int ldc) noexcept nogil:
    # c[m, n] = alpha * a[m, k] @ b[k, n] + beta * c
    cdef char t = b'N'
    if real is float:
        sgemm(&t, &t, &n, &m, &k, &alpha, <float *>b, &ldb, <float *>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&t, &t, &n, &m, &k, &alpha, <double *>b, &ldb, <double *>a, &lda, &beta, c, &ldc)


cdef inline void gemm_atb(int m, int n, int k, real alpha, const real *a, int lda,
                          const real *b, int ldb, real beta, real *c, int ldc) noexcept nogil:
    # c[m, n] = alpha * a[k, m].T @ b[k, n] + beta * c   (column-major: c^T = b^T a)
    cdef char tn = b'N'
    cdef char tt = b'T'
    if real is float:
        sgemm(&tn, &tt, &n, &m, &k, &alpha, <float *>b, &ldb, <float *>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tn, &tt, &n, &m, &k, &alpha, <double *>b, &ldb, <double *>a, &lda, &beta, c, &ldc)


# ---- the two tile products: own micro-kernels (tilegemm.h) or BLAS -------------------

cdef extern from "tilegemm.h" nogil:
    int fa_tile_products_ok(int ev)
    int fa_tile_scores_f32(int rows, int cols, int e, float scale, const float *q,
                           Py_ssize_t ldq, const float *k, Py_ssize_t ldk, float *s)
    void fa_tile_pv_f32(int rows, int ev, int cols, const float *p, Py_ssize_t ldp,
                        const float *v, Py_ssize_t ldv, float *acc, Py_ssize_t ldacc)

    # acc += p.T @ v, p stored key-major (cols x rows, row stride ldpt)
    void fa_tile_pv_t_f32(int rows, int ev, int cols, const float *pt, Py_ssize_t ldpt,
                          const float *v, Py_ssize_t ldv, float *acc, Py_ssize_t ldacc)

    Py_ssize_t fa_kmajor_ld(int rows)
    void fa_pack_transposed(int cols, int e, const float *k, Py_ssize_t ldk, float *kt,
                            Py_ssize_t ldkt)
    void fa_pack_transposed_scaled(int cols, int e, const float *k, Py_ssize_t ldk,
                                   float *kt, Py_ssize_t ldkt, float scale)
    # s = scale * q @ kt[:, :cols], kt packed by fa_pack_transposed
    void fa_scores_from_panel(int rows, int cols, int e, float scale, const float *q,
                              Py_ssize_t ldq, const float *kt, Py_ssize_t ldkt, float *s,
                              Py_ssize_t lds)
    int fa_attend_tile_kmajor_f32(int rows, int cols, int e, int ev, float scale,
                                  const float *qt, Py_ssize_t ldqt, const float *k,
                                  Py_ssize_t ldk, const float *v, Py_ssize_t ldv, float *st,
                                  const ScoreMods *mods, Py_ssize_t band_lo,
                                  Py_ssize_t band_hi, float *acc, Py_ssize_t ldacc,
                                  float *m, float *l)
    enum: FA_PACK_MIN_ROWS
    enum: FA_PANEL

# Row slices of a packed query block taken key-major start at multiples of this.
cdef enum:
    KMAJOR_SLICE = 32


cdef inline bint tile_products_native(bint is_float32, int ev) noexcept nogil:
    # True when attend_tile's products never call BLAS for this dtype and value width,
    # so the caller need not limit BLAS's threads around the kernel.
    return is_float32 and fa_tile_products_ok(ev) != 0


cdef inline void tile_scores(int rows, int cols, int e, real scale, const real *q,
                             Py_ssize_t ldq, const real *k, Py_ssize_t ldk,
                             real *s, int ev) noexcept nogil:
    # s[rows, cols] (row stride cols) <- scale * q @ k.T
    if real is float:
        if fa_tile_products_ok(ev) and fa_tile_scores_f32(rows, cols, e, scale, q, ldq,
                                                          k, ldk, s):
            return
    gemm_abt(rows, cols, e, scale, q, <int>ldq, k, <int>ldk, 0, s, cols)


cdef inline void tile_accumulate(int rows, int ev, int cols, const real *p, const real *v,
                                 Py_ssize_t ldv, real *acc, Py_ssize_t ldacc) noexcept nogil:
    # acc[rows, ev] (row stride ldacc) += p[rows, cols] (row stride cols) @ v
    if real is float:
        if fa_tile_products_ok(ev):
            fa_tile_pv_f32(rows, ev, cols, p, cols, v, ldv, acc, ldacc)
            return
    gemm_ab(rows, ev, cols, 1, p, cols, v, <int>ldv, 1, acc, <int>ldacc)


# ---- key-major tiles (tilegemm.h) ------------------------------------------------------
# A driver whose query block meets unmasked tiles hands them to attend_tile_kmajor, which
# computes the same online-softmax step as attend_tile with the keys along the rows: the
# query block is packed once, at its first such tile, instead of transposing every
# tile's keys, and the softmax is vectorised across queries.

cdef inline Py_ssize_t kmajor_ld(bint is_float32, int ev, int rows) noexcept nogil:
    # Row stride of a packed block of `rows` queries (scratch: qt of e * ld and st of
    # (cols + 1) * ld elements), or 0 when the key-major path does not apply (not
    # float32, no AVX-512 kernels, too few rows).
    if not is_float32 or rows < FA_PACK_MIN_ROWS or not fa_tile_products_ok(ev):
        return 0
    return fa_kmajor_ld(rows)


cdef inline size_t kmajor_scratch_bytes(Py_ssize_t ld_max, int e, int block_k,
                                        size_t itemsize) noexcept nogil:
    # Bytes of one thread's scratch for attend_tile_kmajor with query blocks of stride up
    # to ld_max (kmajor_ld) and key blocks of up to block_k rows: the packed queries, then
    # the key-major score tile. 0 when ld_max is 0 (no tile goes key-major).
    return (e + block_k + 1) * ld_max * itemsize


cdef inline bint attend_tile_kmajor(
        int rows, int cols, int e, int ev, real scale, const real *q, Py_ssize_t ldq,
        real *scratch, Py_ssize_t *ldqt, const real *k, Py_ssize_t ldk, const real *v,
        Py_ssize_t ldv, const ScoreMods *mods, real *acc, Py_ssize_t ldacc, real *m,
        real *l) noexcept nogil:
    # attend_tile for an unmasked tile (every element in the band), key-major, with the
    # score modifiers mods (or NULL); scratch of kmajor_scratch_bytes. ldqt is the query
    # block's packing state: the caller sets it to -1 for each new block (0 without
    # scratch); the first call packs q at the start of scratch and keeps the stride there
    # (0 when the path does not apply).
    # Returns False, the state untouched, when the path does not apply or a score is not
    # finite: the caller then calls attend_tile, which defines those cases.
    return attend_tile_kmajor_rows(rows, 0, rows, cols, e, ev, scale, q, ldq, scratch, ldqt,
                                   k, ldk, v, ldv, mods, -BAND_ALL, BAND_ALL, acc, ldacc, m, l)


cdef inline bint attend_tile_kmajor_rows(
        int block_rows, int r0, int rows, int cols, int e, int ev, real scale, const real *q,
        Py_ssize_t ldq, real *scratch, Py_ssize_t *ldqt, const real *k, Py_ssize_t ldk,
        const real *v, Py_ssize_t ldv, const ScoreMods *mods, Py_ssize_t band_lo,
        Py_ssize_t band_hi, real *acc, Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # attend_tile_kmajor for rows r0 .. r0 + rows (r0 a multiple of KMAJOR_SLICE) of a query
    # block of block_rows rows (packed whole at the first call), restricted to a band as
    # attend_tile's (relative to row r0); acc, m and l point at row r0's. False also when
    # rows < FA_PACK_MIN_ROWS.
    if real is float:
        # the block is packed times scale (the same for all its tiles), so that the score
        # kernel multiplies by nothing more
        if ldqt[0] < 0:
            ldqt[0] = kmajor_ld(True, ev, block_rows)
            if ldqt[0]:
                fa_pack_transposed_scaled(block_rows, e, q, ldq, scratch, ldqt[0], scale)
        return ldqt[0] > 0 and rows >= FA_PACK_MIN_ROWS and fa_attend_tile_kmajor_f32(
            rows, cols, e, ev, 1, scratch + r0, ldqt[0], k, ldk, v, ldv,
            scratch + e * ldqt[0], mods, band_lo, band_hi, acc, ldacc, m, l) != 0
    else:
        return False


# ---- vector row routines (vecmath.h), dispatched on the element type ---------------

cdef inline real row_max(const real *x, Py_ssize_t n) noexcept nogil:
    if real is float:
        return fa_max_f32(x, n)
    else:
        return fa_max_f64(x, n)

cdef inline real row_add_max(real *x, const real *add, Py_ssize_t n) noexcept nogil:
    if real is float:
        return fa_add_max_f32(x, add, n)
    else:
        return fa_add_max_f64(x, add, n)

cdef inline real row_keep_max(real *x, const uint8_t *keep, Py_ssize_t n) noexcept nogil:
    if real is float:
        return fa_keep_max_f32(x, keep, n)
    else:
        return fa_keep_max_f64(x, keep, n)

cdef inline real row_exp_sum(real *x, Py_ssize_t n, real m) noexcept nogil:
    if real is float:
        return fa_exp_sum_f32(x, n, m)
    else:
        return fa_exp_sum_f64(x, n, m)

cdef inline void row_scale(real *x, Py_ssize_t n, real a) noexcept nogil:
    if real is float:
        fa_scale_f32(x, n, a)
    else:
        fa_scale_f64(x, n, a)

cdef inline void row_axpy(real *y, const real *x, Py_ssize_t n, real a) noexcept nogil:
    if real is float:
        fa_axpy_f32(y, x, n, a)
    else:
        fa_axpy_f64(y, x, n, a)

cdef inline real row_dot(const real *x, const real *y, Py_ssize_t n) noexcept nogil:
    if real is float:
        return fa_dot_f32(x, y, n)
    else:
        return fa_dot_f64(x, y, n)

cdef inline real exp_nonpositive(real x) noexcept nogil:
    if real is float:
        return fa_expneg_f32(x)
    else:
        return fa_expneg_f64(x)

cdef inline void row_fill(real *x, Py_ssize_t n, real value) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        x[j] = value


# ---- masking one row of scores -------------------------------------------------------

cdef inline real mask_row_max(real *s, Py_ssize_t n, const void *mask, int mask_kind,
                              Py_ssize_t mask_col_stride) noexcept nogil:
    # s[:n] <- s[:n] masked; return its max.  `mask` points at the first element.
    cdef Py_ssize_t j
    cdef const uint8_t *keep
    cdef const real *add
    if mask_kind == MASK_NONE:
        return row_max(s, n)
    if mask_kind == MASK_BOOL:
        keep = <const uint8_t *>mask
        if mask_col_stride == 1:
            return row_keep_max(s, keep, n)
        for j in range(n):
            if not keep[j * mask_col_stride]:
                s[j] = -INFINITY
        return row_max(s, n)
    # float mask: s += mask, where a -inf of the mask drops the entry whatever its score
    # (+inf or NaN too), as a skipped tile (BLOCK_SKIP) and a bool False do
    add = <const real *>mask
    if mask_col_stride == 1:
        return row_add_max(s, add, n)
    for j in range(n):
        if add[j * mask_col_stride] == -INFINITY:
            s[j] = -INFINITY
        else:
            s[j] += add[j * mask_col_stride]
    return row_max(s, n)


# ---- online softmax ------------------------------------------------------------------

cdef inline bint online_softmax_row(real *s, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t ncols,
                                    real s_max, real *m, real *l,
                                    real *acc, Py_ssize_t ev) noexcept nogil:
    # Fold the scores s[c0:c1] (scaled and masked, their max is s_max) into the running
    # max m, denominator l and output accumulator acc[:ev] of one query row.
    # On return s[:ncols] holds the unnormalised probabilities exp(s - m) to multiply
    # with V: zero outside [c0, c1) and wherever the score was -inf.
    # Returns False when the row contributes nothing (no finite score).
    cdef real m_new = s_max if (s_max > m[0] or s_max != s_max) else m[0]   # NaN propagates
    cdef real alpha
    if m_new == -INFINITY:
        # exp(-inf - -inf) would be NaN: the row has no visible key yet, leave it empty.
        row_fill(s, ncols, 0)
        return False
    if m_new > m[0]:
        # acc and l were accumulated relative to the old max: rescale them.
        alpha = exp_nonpositive(m[0] - m_new)   # 0 when m was -inf
        # Test l before scaling it: alpha can underflow to 0 (old max far below the new
        # one, e.g. a finite -1e5 mask), and then acc must be zeroed too.
        if l[0] != 0:
            row_scale(acc, ev, alpha)
        l[0] *= alpha
        m[0] = m_new
    row_fill(s, c0, 0)
    l[0] += row_exp_sum(s + c0, c1 - c0, m_new)
    row_fill(s + c1, ncols - c1, 0)
    return True


cdef inline void finish_row(real *acc, Py_ssize_t ev, real m, real l, real *lse) noexcept nogil:
    # acc <- acc / l and lse <- m + log(l). A row that saw no key (l == 0) gives 0 and -inf.
    cdef Py_ssize_t j
    if l == 0:
        row_fill(acc, ev, 0)
        if lse != NULL:
            lse[0] = -INFINITY
        return
    row_scale(acc, ev, 1 / l)
    if lse != NULL:
        lse[0] = m + log(l)


cdef inline bint softmax_tile(
        int rows, int cols, int ev,
        const void *mask, int mask_kind, Py_ssize_t mask_rs, Py_ssize_t mask_cs,
        Py_ssize_t band_lo, Py_ssize_t band_hi, const ScoreMods *mods,
        real *s, real *acc, Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # The middle of attend_tile: s (rows x cols) holds the scaled scores; restrict each
    # row to its band, apply the score modifiers (mods, or NULL) and the mask, and fold
    # it into (m, l, acc). On return s holds the unnormalised probabilities. False when
    # no row contributes.
    cdef Py_ssize_t r, c0, c1
    cdef bint any_row = False
    cdef real s_max
    cdef const void *mrow
    cdef real *srow
    for r in range(rows):
        srow = s + r * cols
        c0 = r + band_lo
        if c0 < 0:
            c0 = 0
        c1 = r + band_hi + 1
        if c1 > cols:
            c1 = cols
        if c1 <= c0:
            row_fill(srow, cols, 0)
            continue
        if mods != NULL:
            row_mods(mods, srow + c0, c1 - c0, mods.diag + r - c0)
        mrow = NULL
        if mask_kind == MASK_BOOL:
            mrow = <const void *>((<const uint8_t *>mask) + r * mask_rs + c0 * mask_cs)
        elif mask_kind == MASK_FLOAT:
            mrow = <const void *>((<const real *>mask) + r * mask_rs + c0 * mask_cs)
        s_max = mask_row_max(srow + c0, c1 - c0, mrow, mask_kind, mask_cs)
        if online_softmax_row(srow, c0, c1, cols, s_max, m + r, l + r, acc + r * ldacc, ev):
            any_row = True
    return any_row


cdef inline void attend_tile(
        const real *q, Py_ssize_t ldq, int rows,
        const real *k, Py_ssize_t ldk, const real *v, Py_ssize_t ldv, int cols,
        int e, int ev, real scale,
        const void *mask, int mask_kind, Py_ssize_t mask_rs, Py_ssize_t mask_cs,
        Py_ssize_t band_lo, Py_ssize_t band_hi, const ScoreMods *mods,
        const DropoutTile *dropout, int dropout_r0,
        real *s, real *acc, Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # One (query block, key block) tile of the online softmax.
    #   q: rows x e, k: cols x e, v: cols x ev (row strides ldq, ldk, ldv)
    #   mask: element (r, c) of the tile at r * mask_rs + c * mask_cs (MASK_NONE: unused)
    #   band: row r sees tile columns c with r + band_lo <= c <= r + band_hi
    #         (causal: band_lo = -BAND_ALL, band_hi = q0 + offset - k0)
    #   mods: soft-cap and ALiBi (ScoreMods, diag at element (0, 0)), or NULL
    #   dropout: NULL, or the probabilities dropped (dropout.h) as rows dropout_r0 .. of
    #         its current tile, after the row sums took them
    #   s: rows x cols scratch;  acc: rows x ev with row stride ldacc;  m, l: rows
    # s <- scale * q @ k.T
    tile_scores(rows, cols, e, scale, q, ldq, k, ldk, s, ev)
    # acc <- acc + p @ v
    if softmax_tile(rows, cols, ev, mask, mask_kind, mask_rs, mask_cs, band_lo, band_hi,
                    mods, s, acc, ldacc, m, l):
        if dropout != NULL:
            dropout_tile(dropout, dropout_r0, rows, cols, s)
        tile_accumulate(rows, ev, cols, s, v, ldv, acc, ldacc)


cdef inline void merge_partial_row(const real *part_out, const real *part_lse, Py_ssize_t nparts,
                                   Py_ssize_t part_stride, Py_ssize_t ev,
                                   real *out, real *lse) noexcept nogil:
    # Merge nparts normalised partial results of one query row (each computed over a
    # disjoint set of keys) by their log-sum-exp (flash-decoding):
    #   lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i
    # Part i is part_out[i * part_stride : i * part_stride + ev] and part_lse[i].
    cdef Py_ssize_t i
    cdef real mx = -INFINITY
    cdef real total = 0
    cdef real w
    for i in range(nparts):
        if part_lse[i] > mx:
            mx = part_lse[i]
    row_fill(out, ev, 0)
    if mx == -INFINITY:
        if lse != NULL:
            lse[0] = -INFINITY
        return
    for i in range(nparts):
        total += exp_nonpositive(part_lse[i] - mx)
    for i in range(nparts):
        w = exp_nonpositive(part_lse[i] - mx) / total
        if w != 0:
            row_axpy(out, part_out + i * part_stride, ev, w)
    if lse != NULL:
        lse[0] = mx + log(total)


# ---- row helpers: copy with a scale, add a constant (vecmath.h) -----------------------
# (softmax_row in rowsoftmax.pxd, and other families' drivers)

cdef extern from "vecmath.h" nogil:
    void fa_copy_scale_f32(float *y, const float *x, Py_ssize_t n, float a)
    void fa_copy_scale_f64(double *y, const double *x, Py_ssize_t n, double a)
    void fa_add_const_f32(float *x, Py_ssize_t n, float c)
    void fa_add_const_f64(double *x, Py_ssize_t n, double c)

cdef inline void row_copy_scale(real *y, const real *x, Py_ssize_t n, real a) noexcept nogil:
    if real is float:
        fa_copy_scale_f32(y, x, n, a)
    else:
        fa_copy_scale_f64(y, x, n, a)

cdef inline void row_add_const(real *x, Py_ssize_t n, real c) noexcept nogil:
    if real is float:
        fa_add_const_f32(x, n, c)
    else:
        fa_add_const_f64(x, n, c)


# ---- plumbing shared by the kernel families' drivers ---------------------------------

cdef inline int block_len(Py_ssize_t n, Py_ssize_t start, Py_ssize_t block) noexcept nogil:
    # length of the block starting at `start` of a range of n (the last may be shorter)
    return <int>(n - start if n - start < block else block)


cdef inline void start_rows(int rows, real *acc, Py_ssize_t ldacc, Py_ssize_t ev,
                            real *m, real *l) noexcept nogil:
    # an empty online softmax for `rows` rows: acc = 0, running max -inf, sum 0
    cdef int r
    for r in range(rows):
        row_fill(acc + r * ldacc, ev, 0)
        m[r] = -INFINITY
        l[r] = 0


# The data pointers of a kernel call's arrays (one dtype, float32 or float64).
cdef struct Operands:
    const void *q
    const void *k
    const void *v
    void *out
    void *lse                   # NULL without return_lse


cdef inline Operands operands(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out,
                              object lse):
    cdef Operands ops
    ops.q = cnp.PyArray_DATA(q)
    ops.k = cnp.PyArray_DATA(k)
    ops.v = cnp.PyArray_DATA(v)
    ops.out = cnp.PyArray_DATA(out)
    ops.lse = NULL if lse is None else cnp.PyArray_DATA(<cnp.ndarray>lse)
    return ops


# Where a kernel call's matrices are: per batch entry one (L, e) query, (S, e) key and
# (S, ev) value matrix at element offsets q_off[b], k_off[b], v_off[b] of their arrays,
# with row strides ldq, ldk, ldv (built by fastattn._layout.batch_offsets).
cdef struct QkvLayout:
    Py_ssize_t nbatch, L, S
    int e, ev
    const Py_ssize_t *q_off
    const Py_ssize_t *k_off
    const Py_ssize_t *v_off
    Py_ssize_t ldq, ldk, ldv


cdef inline QkvLayout qkv_layout(cnp.ndarray q_off, cnp.ndarray k_off, cnp.ndarray v_off,
                                 Py_ssize_t ldq, Py_ssize_t ldk, Py_ssize_t ldv,
                                 Py_ssize_t L, Py_ssize_t S, int e, int ev):
    cdef QkvLayout x
    x.nbatch = q_off.shape[0]
    x.L = L
    x.S = S
    x.e = e
    x.ev = ev
    x.q_off = intp_data(q_off)
    x.k_off = intp_data(k_off)
    x.v_off = intp_data(v_off)
    x.ldq = ldq
    x.ldk = ldk
    x.ldv = ldv
    return x


# ---- operands of any element type (tilehalf.h) ----------------------------------------
# A family body is written once over the compute type `real` (float for float32 and both
# half types, double for float64) and reads its query, key and value tiles through a
# TileOperands: tile_begin_block at each query block, then tile_attend /
# tile_attend_kmajor for its tiles. Native operands (float32, float64) go straight to
# attend_tile; half operands (float16, bfloat16) are either widened to float32 into the
# thread's scratch as they are read, or, for bfloat16 on CPUs with AVX512_BF16, multiplied
# as bfloat16 pairs (see tilehalf.h). Results are float32 for half operands; the family
# narrows its output rows with narrow_rows.

cdef extern from "tilehalf.h" nogil:
    enum: FA_DT_FLOAT32, FA_DT_FLOAT64, FA_DT_FLOAT16, FA_DT_BFLOAT16
    void fa_widen(int dtype, int rows, int n, const uint16_t *x, Py_ssize_t ldx, float *y,
                  Py_ssize_t ldy)
    void fa_narrow(int dtype, int rows, int n, const float *x, Py_ssize_t ldx, uint16_t *y,
                   Py_ssize_t ldy)
    void fa_widen_f64(int dtype, int rows, int n, const uint16_t *x, Py_ssize_t ldx, double *y,
                      Py_ssize_t ldy)
    int fa_bf16_dot_ok()
    void fa_pack_pairs(int n, int e, const uint16_t *x, Py_ssize_t ldx, uint32_t *xt,
                       Py_ssize_t ldxt)
    void fa_pack_value_pairs(int cols, int ev, const uint16_t *v, Py_ssize_t ldv,
                             uint32_t *vp, Py_ssize_t ldvp)
    void fa_bf16_scores_from_panel(int rows, int cols, int e, float scale, const uint16_t *a,
                                   Py_ssize_t lda, const uint32_t *pt, Py_ssize_t ldpt,
                                   float *s, Py_ssize_t lds)
    void fa_bf16_pv(int rows, int ev, int npairs, const uint32_t *pw, Py_ssize_t prs,
                    Py_ssize_t pcs, const uint32_t *vp, Py_ssize_t ldvp, float *acc,
                    Py_ssize_t ldacc)
    void fa_bf16_pairs_rows(int rows, int cols, const float *s, Py_ssize_t lds, uint32_t *pw,
                            Py_ssize_t ldpw)
    int fa_attend_tile_kmajor_bf16(int rows, int cols, int e, int ev, float scale,
                                   const uint32_t *qp, Py_ssize_t ldqt, const uint16_t *k,
                                   Py_ssize_t ldk, const uint16_t *v, Py_ssize_t ldv,
                                   float *st, uint32_t *pw, uint32_t *vp,
                                   const ScoreMods *mods, Py_ssize_t band_lo,
                                   Py_ssize_t band_hi, float *acc, Py_ssize_t ldacc,
                                   float *m, float *l)


cdef struct TileOperands:
    int dtype               # FA_DT_* of q, k and v
    Py_ssize_t itemsize
    int e, ev
    bint dot                # bfloat16 products on vdpbf16ps (else half operands widen)
    # the current query block (tile_begin_block): rows of e elements, row stride ldq
    const char *q
    Py_ssize_t ldq
    # half operands' buffers, carved from the thread's scratch (tile_operands_init)
    float *q32              # widened query block          (block_q x e)
    float *k32              # widened key tile             (block_k x e)
    float *v32              # widened value tile           (block_k x ev)
    uint32_t *kp            # key pair panel               ((e + 1) / 2 x block_k rounded to 32)
    uint32_t *vp            # value pair rows              ((block_k + 1) / 2 x ev)
    uint32_t *pw            # probability pairs            ((block_k + 1) / 2 x block_q rounded to 32)
    # an output block of float32 for half results: acc32 (block_q x ev)
    float *acc32
    # dropout on the probabilities (dropout.h), or NULL; set by the driver
    const DropoutTile *dropout


cdef inline bint is_half(int dtype) noexcept nogil:
    return dtype == FA_DT_FLOAT16 or dtype == FA_DT_BFLOAT16


cdef inline bint bf16_dot_products(int dtype, int ev) noexcept nogil:
    # Whether bfloat16 tiles multiply as bfloat16 pairs (vdpbf16ps) rather than widen.
    return dtype == FA_DT_BFLOAT16 and ev % 16 == 0 and fa_bf16_dot_ok() != 0


cdef inline Py_ssize_t round32(Py_ssize_t n) noexcept nogil:
    return (n + 31) // 32 * 32


cdef inline char *scratch_at(char *base, size_t offset) noexcept nogil:
    # base + offset, or NULL when only sizing (base NULL)
    return base + offset if base != NULL else NULL


cdef inline size_t tile_operands_init(TileOperands *t, int dtype, Py_ssize_t itemsize, int e,
                                      int ev, int block_q, int block_k,
                                      char *scratch) noexcept nogil:
    # Set up t for operands of `dtype`, carving its buffers from scratch; returns the
    # bytes they take (0 for native operands). With scratch NULL it only sizes them.
    cdef Py_ssize_t width = e if e > ev else ev
    cdef size_t off = 0
    t.dtype = dtype
    t.itemsize = itemsize
    t.e = e
    t.ev = ev
    t.dot = bf16_dot_products(dtype, ev)
    t.q = NULL
    t.ldq = 0
    t.q32 = t.k32 = t.v32 = t.acc32 = NULL
    t.kp = t.vp = t.pw = NULL
    t.dropout = NULL
    if not is_half(dtype):
        return 0
    t.acc32 = <float *>scratch_at(scratch, off)
    off += scratch_room(block_q * ev * 4)
    if t.dot:
        t.kp = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room((e + 1) // 2 * round32(block_k) * 4)
        t.vp = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room((block_k + 1) // 2 * ev * 4)
        t.pw = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room((block_k + 1) // 2 * round32(block_q) * 4)
    else:
        t.q32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_q * width * 4)
        t.k32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_k * width * 4)
        t.v32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_k * width * 4)
    return off


# One thread's buffers for walking query blocks over key tiles (dense, block-sparse):
# the score tile, the running max and sum, the key-major buffers, a value tile and the
# TileOperands. Sized and carved by one function, so the size cannot drift from the layout.
cdef struct TileBuffers:
    void *s                 # block_q x block_k scores (compute type)
    void *m                 # block_q running maxima
    void *l                 # block_q running sums
    void *kscratch          # key-major buffers (kmajor_scratch_bytes), or NULL
    void *vtile             # block_k x ev values (native operands; NULL for half ones)
    void *ktile             # block_k x e keys (native operands; NULL for half ones)
    TileOperands ops


cdef inline size_t tile_buffers_init(TileBuffers *b, int dtype, Py_ssize_t itemsize, int e,
                                     int ev, int block_q, int block_k,
                                     char *scratch) noexcept nogil:
    # Carve b from scratch (NULL: only size it); returns the bytes it takes. The
    # compute type is float64 for float64 operands, float32 for the others.
    cdef size_t realsize = 8 if dtype == FA_DT_FLOAT64 else 4
    cdef Py_ssize_t ld_max = kmajor_ld(realsize == 4, ev, block_q)
    cdef size_t off = 0
    b.s = scratch_at(scratch, off)
    off += scratch_room(block_q * block_k * realsize)
    b.m = scratch_at(scratch, off)
    off += scratch_room(block_q * realsize)
    b.l = scratch_at(scratch, off)
    off += scratch_room(block_q * realsize)
    b.kscratch = scratch_at(scratch, off) if ld_max else NULL
    off += scratch_room(kmajor_scratch_bytes(ld_max, e, block_k, realsize))
    b.vtile = b.ktile = NULL
    if not is_half(dtype):
        b.vtile = scratch_at(scratch, off)
        off += scratch_room(block_k * ev * realsize)
        b.ktile = scratch_at(scratch, off)
        off += scratch_room(block_k * e * realsize)
    return off + tile_operands_init(&b.ops, dtype, itemsize, e, ev, block_q, block_k,
                                    scratch_at(scratch, off))


cdef inline const void *gather_value_tile(const void *v, Py_ssize_t ldv, int cols, int ev,
                                          Py_ssize_t itemsize, void *vtile) noexcept nogil:
    # The value tile at v (cols rows of ev elements, row stride ldv) copied to vtile with
    # rows next to each other, when its rows are spread out (ldv > ev); else v itself.
    # The products stream a tile's values once per few query rows: rows far apart (a
    # (total, H, E) packed batch, a (B, L, H, E) array viewed as (B, H, L, E)) fall into
    # few cache sets and were evicted between passes (a packed varlen batch ran 10% slower
    # than the same data head-major).
    cdef Py_ssize_t r
    if vtile == NULL or ldv <= ev:
        return v
    for r in range(cols):
        memcpy(<char *>vtile + r * ev * itemsize, <const char *>v + r * ldv * itemsize,
               ev * itemsize)
    return vtile


cdef inline const void *element(const void *base, Py_ssize_t offset,
                                Py_ssize_t itemsize) noexcept nogil:
    # base + offset elements of itemsize bytes
    return <const void *>((<const char *>base) + offset * itemsize)


cdef inline void tile_begin_block(TileOperands *t, const void *q, Py_ssize_t ldq,
                                  int rows) noexcept nogil:
    # The next query block: rows x e at q, row stride ldq (elements).
    t.q = <const char *>q
    t.ldq = ldq
    if is_half(t.dtype) and not t.dot:
        fa_widen(t.dtype, rows, t.e, <const uint16_t *>q, ldq, t.q32, t.e)


cdef inline void tile_attend(
        TileOperands *t, int r0, int rows, const void *k, Py_ssize_t ldk, const void *v,
        Py_ssize_t ldv, int cols, real scale,
        const void *mask, int mask_kind, Py_ssize_t mask_rs, Py_ssize_t mask_cs,
        Py_ssize_t band_lo, Py_ssize_t band_hi, const ScoreMods *mods,
        real *s, real *acc, Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # attend_tile for rows r0 .. r0 + rows of the current query block, against the key
    # and value tile at k and v (cols rows each, row strides ldk and ldv in elements).
    # band and mods.diag are relative to the call's first row (r0).
    cdef Py_ssize_t npairs, ldpt
    if not is_half(t.dtype):
        attend_tile(<const real *>element(t.q, r0 * t.ldq, t.itemsize), t.ldq, rows,
                    <const real *>k, ldk, <const real *>v, ldv, cols, t.e, t.ev, scale,
                    mask, mask_kind, mask_rs, mask_cs, band_lo, band_hi, mods, t.dropout, r0,
                    s, acc, ldacc, m, l)
        return
    if real is float:
        if t.dot:
            ldpt = round32(cols)
            fa_pack_pairs(cols, t.e, <const uint16_t *>k, ldk, t.kp, ldpt)
            fa_bf16_scores_from_panel(rows, cols, t.e, scale,
                                      <const uint16_t *>element(t.q, r0 * t.ldq, 2), t.ldq,
                                      t.kp, ldpt, s, cols)
            if softmax_tile(rows, cols, t.ev, mask, mask_kind, mask_rs, mask_cs, band_lo,
                            band_hi, mods, s, acc, ldacc, m, l):
                if t.dropout != NULL:
                    dropout_tile(t.dropout, r0, rows, cols, s)
                npairs = (cols + 1) // 2
                fa_bf16_pairs_rows(rows, cols, s, cols, t.pw, npairs)
                fa_pack_value_pairs(cols, t.ev, <const uint16_t *>v, ldv, t.vp, t.ev)
                fa_bf16_pv(rows, t.ev, <int>npairs, t.pw, npairs, 1, t.vp, t.ev, acc, ldacc)
        else:
            fa_widen(t.dtype, cols, t.e, <const uint16_t *>k, ldk, t.k32, t.e)
            fa_widen(t.dtype, cols, t.ev, <const uint16_t *>v, ldv, t.v32, t.ev)
            attend_tile(t.q32 + r0 * t.e, t.e, rows, t.k32, t.e, t.v32, t.ev, cols, t.e,
                        t.ev, scale, mask, mask_kind, mask_rs, mask_cs, band_lo, band_hi,
                        mods, t.dropout, r0, s, acc, ldacc, m, l)


cdef inline bint tile_attend_kmajor(
        TileOperands *t, int rows, const void *k, Py_ssize_t ldk, const void *v,
        Py_ssize_t ldv, int cols, real scale, real *kscratch, Py_ssize_t *ldqt,
        const ScoreMods *mods, real *acc, Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # attend_tile_kmajor for the current query block (all its rows), with the same
    # packing state ldqt and scratch; False when the caller must use tile_attend (always
    # with dropout: the fused key-major step has no place for it).
    return tile_attend_kmajor_rows(t, rows, 0, rows, k, ldk, v, ldv, cols, scale, kscratch,
                                   ldqt, mods, -BAND_ALL, BAND_ALL, acc, ldacc, m, l)


cdef inline bint tile_attend_kmajor_rows(
        TileOperands *t, int block_rows, int r0, int rows, const void *k, Py_ssize_t ldk,
        const void *v, Py_ssize_t ldv, int cols, real scale, real *kscratch, Py_ssize_t *ldqt,
        const ScoreMods *mods, Py_ssize_t band_lo, Py_ssize_t band_hi, real *acc,
        Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # tile_attend_kmajor for rows r0 .. r0 + rows of the current query block of block_rows
    # rows (r0 a multiple of KMAJOR_SLICE; acc, m, l at row r0's), restricted to the band
    # (relative to row r0): a row slice of a tile crossing the band's edge. False when the
    # caller must use tile_attend (always with dropout).
    if t.dropout != NULL:
        return False
    if not is_half(t.dtype):
        return attend_tile_kmajor_rows(block_rows, r0, rows, cols, t.e, t.ev, scale,
                                       <const real *>t.q, t.ldq, kscratch, ldqt,
                                       <const real *>k, ldk, <const real *>v, ldv, mods,
                                       band_lo, band_hi, acc, ldacc, m, l)
    if real is float:
        if t.dot:
            if ldqt[0] < 0:
                ldqt[0] = kmajor_ld(True, t.ev, block_rows)
                if ldqt[0]:
                    fa_pack_pairs(block_rows, t.e, <const uint16_t *>t.q, t.ldq,
                                  <uint32_t *>kscratch, ldqt[0])
            return ldqt[0] > 0 and rows >= FA_PACK_MIN_ROWS and fa_attend_tile_kmajor_bf16(
                rows, cols, t.e, t.ev, scale, (<const uint32_t *>kscratch) + r0, ldqt[0],
                <const uint16_t *>k, ldk, <const uint16_t *>v, ldv,
                kscratch + t.e * ldqt[0], t.pw, t.vp, mods, band_lo, band_hi, acc, ldacc,
                m, l) != 0
        if ldqt[0] == 0 or rows < FA_PACK_MIN_ROWS:
            return False
        fa_widen(t.dtype, cols, t.e, <const uint16_t *>k, ldk, t.k32, t.e)
        fa_widen(t.dtype, cols, t.ev, <const uint16_t *>v, ldv, t.v32, t.ev)
        return attend_tile_kmajor_rows(block_rows, r0, rows, cols, t.e, t.ev, scale, t.q32,
                                       t.e, kscratch, ldqt, t.k32, t.e, t.v32, t.ev, mods,
                                       band_lo, band_hi, acc, ldacc, m, l)
    return False


cdef inline void narrow_rows(int dtype, int rows, int n, const float *x, Py_ssize_t ldx,
                             void *y, Py_ssize_t ldy) noexcept nogil:
    # y[r, :n] <- x[r, :n] rounded to the half type `dtype` (to nearest even)
    fa_narrow(dtype, rows, n, x, ldx, <uint16_t *>y, ldy)


cdef inline void widen_rows(int dtype, int rows, int n, const void *x, Py_ssize_t ldx,
                            real *y, Py_ssize_t ldy) noexcept nogil:
    # y[r, :n] <- x[r, :n] (the half type `dtype`, row stride ldx elements) in the compute
    # type, exactly: F16C / AVX-512 for float32 where the CPU has them, else scalar
    if real is float:
        fa_widen(dtype, rows, n, <const uint16_t *>x, ldx, y, ldy)
    else:
        fa_widen_f64(dtype, rows, n, <const uint16_t *>x, ldx, y, ldy)


# ---- the key-split merge (flash-decoding), shared by the families that split keys -----
# A family whose items each cover one split of the keys writes normalised partial rows
# and their lse (compute type), then runs merge_split_item over the output rows, one
# item a row (run_items with merge_split_scratch).

cdef struct SplitMerge:
    # Output row i (i < nrows) has nsplit partial results: part j is
    #   part_out[i * row_step + j * part_stride : ... + ev] with lse part_lse[i * nsplit + j]
    # and is merged into out + out_off[i // rows_per_batch] + (i % rows_per_batch) * ldo
    # (out_off NULL: out + i * ldo), its lse into lse[i] (NULL: none).
    const void *part_out
    const void *part_lse
    Py_ssize_t nsplit, row_step, part_stride, ev
    void *out
    const Py_ssize_t *out_off
    Py_ssize_t rows_per_batch, ldo
    void *lse
    int dtype                   # FA_DT_* of out (half: merged in float32, then narrowed)
    Py_ssize_t itemsize         # of out


cdef inline size_t merge_split_scratch(const SplitMerge *g) noexcept nogil:
    # a float32 row for half outputs
    return g.ev * 4 if is_half(g.dtype) else 0


cdef inline void merge_split_row(const SplitMerge *g, Py_ssize_t i, real *row) noexcept nogil:
    cdef Py_ssize_t off = (g.out_off[i // g.rows_per_batch] + (i % g.rows_per_batch) * g.ldo
                           if g.out_off != NULL else i * g.ldo)
    cdef void *out = <void *>element(g.out, off, g.itemsize)
    merge_partial_row(<const real *>g.part_out + i * g.row_step,
                      <const real *>g.part_lse + i * g.nsplit, g.nsplit, g.part_stride, g.ev,
                      row if row != NULL else <real *>out,
                      (<real *>g.lse + i) if g.lse != NULL else NULL)
    if real is float:
        if row != NULL:
            narrow_rows(g.dtype, 1, <int>g.ev, row, g.ev, out, g.ev)


cdef inline void merge_split_item(void *merge, Py_ssize_t item, void *scratch) noexcept nogil:
    # The merge's item hook (one output row) and its dtype dispatch.
    cdef const SplitMerge *g = <const SplitMerge *>merge
    if g.dtype == FA_DT_FLOAT64:
        merge_split_row[double](g, item, NULL)
    else:
        merge_split_row[float](g, item, <float *>scratch if is_half(g.dtype) else NULL)
