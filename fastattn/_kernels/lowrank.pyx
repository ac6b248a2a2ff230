# Linear attention and Performer (FAVOR+) as chunked reductions over the sequence.
#
# Both are  out_i = f(q_i) @ St / (f(q_i) . z)  with the state  St = sum_j f(k_j) v_j^T
# (m x Ev) and the normaliser  z = sum_j f(k_j) (m), over j <= i when causal. The
# feature map f is elu(x) + 1 (linear attention), a precomputed map (the rows of q and k
# are the features), or FAVOR+:
#
#   f(x) = m^{-1/2} (exp(root w_r . x - root^2 |x|^2 / 2 - stab) + EPS),  EPS = 1e-4
#   stab = the row's own max for a query, one max over all keys and features for keys.
#
# Nothing of size (N, m) is formed: rows go through in chunks whose features live in
# per-thread scratch (chunk x m, a few hundred KB: L2), computed, exponentiated and
# reduced into the state at once; the two products per chunk run on the tile core's
# float32 micro-kernels (tilegemm.h) or single-threaded BLAS.
#
# The key stabiliser is a max over every key, known only at the end. The state is kept
# relative to a running max M instead (flash-style): a chunk that raises M rescales the
# accumulated exp-parts by exp(M_old - M_new). EPS is not multiplied by exp(...), so it
# is kept out of the running sums and added once M is final:
#
#   sum_j f(k_j) v_j^T = m^{-1/2} (sum_j exp(p_j - M) v_j^T + EPS 1 (sum_j v_j)^T)
#
# which is why a state is  A (m x Ev), z (m), vs (Ev) = sum_j v_j, M  (layout below).
#
# Every pass is one run of the parallel skeleton (parallel.pxd) over its items, with one
# item hook (and the family's one dtype dispatch) per kind of item:
# Non-causal: (1) key pass, one item per (state, key split): each folds its keys into a
#   partial state; (2) merge the partials of each state to the common M, add the EPS
#   term, scale by 1/m (both m^{-1/2}); (3) query pass, one item per (batch, query
#   chunk). Splits exist only when batch entries alone cannot keep the threads busy.
# Causal (prefix scan): one item per (batch, segment). A chunk's rows see earlier chunks
#   through the running state and their own chunk through its lower triangle. Rows are
#   produced while M is still running, so for FAVOR each row is stored relative to its
#   chunk's M_c together with (den_c, qsum) and fixed up when the item ends:
#     num_i = (exp(M_c - M) a_i + EPS qsum_i sum_{j<=i} v_j) / m
#     den_i = (exp(M_c - M) d_i + EPS qsum_i (i + 1)) / m,    qsum_i = sum_r u_ir
#   With several segments per batch entry (fewer entries than threads), a first key pass
#   gives every segment's partial state; a segment starts from the merge of those
#   before it, and M is the max over all of them.
# Extra memory: per thread a few chunk x m buffers (one scratch block per pass, sized by
# lowrank_scratch); partial states; for causal FAVOR two numbers per row and one per
# chunk.

from libc.string cimport memcpy
from libc.math cimport INFINITY, fabs
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, scratch_room, scratch_take, DT_FLOAT32
from fastattn._kernels.parallel import dtype_code
from fastattn._kernels.tile cimport (
    intp_data, real, gemm_ab, gemm_atb, tile_scores, fa_tile_products_ok, fa_tile_pv_f32,
    row_max, row_add_max, row_exp_sum, row_scale, row_axpy, row_dot, row_fill, row_add_const,
    exp_nonpositive,
)

cnp.import_array()

# elu(x) + 1 in two vector passes around row_exp_sum (the vector exp): `fa_elu_pre`
# f = x where x <= 0 (NaN included) else 0, then exp, then `fa_elu_post` f = x + 1 where
# x > 0. Plain selects, so gcc vectorises each target clone (a Cython loop compiles for
# baseline x86-64 only and stayed scalar: 26% of linear attention's time).
cdef extern from *:
    """
    #include "vecmath.h"
    #define FA_DEFINE_ELU(T, SFX)                                                    \
    FA_VECTOR static void fa_elu_pre_##SFX(const T *x, T *f, ptrdiff_t n)            \
    {                                                                                \
        for (ptrdiff_t j = 0; j < n; j++) f[j] = x[j] > 0 ? (T)0 : x[j];             \
    }                                                                                \
    FA_VECTOR static void fa_elu_post_##SFX(const T *x, T *f, ptrdiff_t n)           \
    {                                                                                \
        for (ptrdiff_t j = 0; j < n; j++) f[j] = x[j] > 0 ? x[j] + (T)1 : f[j];      \
    }
    FA_DEFINE_ELU(float, f32)
    FA_DEFINE_ELU(double, f64)
    """
    void fa_elu_pre_f32(const float *x, float *f, Py_ssize_t n) noexcept nogil
    void fa_elu_pre_f64(const double *x, double *f, Py_ssize_t n) noexcept nogil
    void fa_elu_post_f32(const float *x, float *f, Py_ssize_t n) noexcept nogil
    void fa_elu_post_f64(const double *x, double *f, Py_ssize_t n) noexcept nogil

# Feature maps.
cdef enum:
    FEAT_GIVEN = 0     # the rows of q and k are the features (m = E)
    FEAT_ELU = 1       # elu(x) + 1 (m = E)
    FEAT_FAVOR = 2     # FAVOR+ with m random directions w

FEATURE_MAPS = dict(given=FEAT_GIVEN, elu=FEAT_ELU, favor=FEAT_FAVOR)

# FAVOR+ offset added to every exponentiated feature (google-research), and its
# denominator guard: |den| <= GUARD gets 2 * GUARD added.
cdef double FAVOR_EPS = 1e-4
cdef double GUARD = 1e-6


cdef struct LowRank:
    # One call (LowRankPlan below): the feature map, sizes, chunk rows and parameters
    int kind
    int dtype                   # parallel.DType of every array
    bint causal
    Py_ssize_t L, S
    int e, m, ev, chunk
    double root, eps            # FAVOR's sqrt(scale); the others' denominator offset
    # q, k, v of batch entry b at element offsets q_off[b], k_off[s], v_off[s], row
    # strides ldq, ldk, ldv; s = state_of[b] (non-causal: one state per distinct key and
    # value pair) or b (causal: k_off, v_off per batch entry, state_of NULL)
    const void *q
    const void *k
    const void *v
    const void *w               # FAVOR's directions (m, e), C-contiguous
    Py_ssize_t ldq, ldk, ldv
    Py_ssize_t nbatch, nstate
    const Py_ssize_t *q_off
    const Py_ssize_t *k_off
    const Py_ssize_t *v_off
    const Py_ssize_t *state_of
    void *out                   # C-contiguous (nbatch, L, ev)
    # key splits per state (non-causal) or segments per batch entry (causal), and the
    # partial states, (nstate * nsplit, state_size)
    int nsplit
    void *parts
    void *states                # non-causal: (nstate, state_size) final states
    void *rowinfo               # causal FAVOR: (nbatch, L, 2) and
    void *chunk_max             # (nbatch, L / chunk + 1 + nsplit); NULL otherwise
    int nthreads


# ---- a state: A (m x ev) | z (m) | vs (ev) | M ---------------------------------------
# Partial: A = sum_j exp(p_j - M) v_j^T, z = sum_j exp(p_j - M), vs = sum_j v_j, M the
# running max (FAVOR); A = sum_j f(k_j) v_j^T, z = sum_j f(k_j), M = 0 (other maps).
# Final (non-causal, after `finish_state`): A = St, z, vs = colsum(St), M = sum(z).

cdef inline Py_ssize_t state_size(int m, int ev) noexcept nogil:
    return <Py_ssize_t>m * ev + m + ev + 1


cdef inline void start_state(const LowRank *p, real *st) noexcept nogil:
    row_fill(st, state_size(p.m, p.ev) - 1, 0)
    st[state_size(p.m, p.ev) - 1] = -INFINITY if p.kind == FEAT_FAVOR else 0


cdef void merge_states(const LowRank *p, const real *parts, Py_ssize_t n,
                       real *st) noexcept nogil:
    # st <- the n states parts[i * size], brought to their common (largest) M and added.
    cdef Py_ssize_t size = state_size(p.m, p.ev)
    cdef Py_ssize_t i, mev = <Py_ssize_t>p.m * p.ev
    cdef real mx = -INFINITY if p.kind == FEAT_FAVOR else 0
    cdef real alpha
    cdef const real *part
    start_state(p, st)
    for i in range(n):
        if parts[i * size + size - 1] > mx:
            mx = parts[i * size + size - 1]
    for i in range(n):
        part = parts + i * size
        # alpha = 1 without a stabiliser; 0 for a part that saw no key (M = -inf: not
        # exp(-inf - -inf), which is NaN when no part saw one)
        if p.kind != FEAT_FAVOR:
            alpha = 1
        elif part[size - 1] == -INFINITY:
            alpha = 0
        else:
            alpha = exp_nonpositive(part[size - 1] - mx)
        if alpha != 0:
            row_axpy(st, part, mev + p.m, alpha)                 # A, z
        row_axpy(st + mev + p.m, part + mev + p.m, p.ev, 1)      # vs
    st[size - 1] = mx


cdef void finish_state(const LowRank *p, real *st, Py_ssize_t nkeys) noexcept nogil:
    # A merged state -> the final one the query pass reads:
    #   FAVOR: St = (A + EPS 1 vs^T) / m,  z = (z + EPS nkeys) / m;   others: St = A
    #   then vs <- colsum(St) and M <- sum(z), so that u @ St and u . z for u = e + EPS
    #   cost one product: e @ St + EPS colsum(St) and e . z + EPS sum(z).
    cdef Py_ssize_t r, mev = <Py_ssize_t>p.m * p.ev
    cdef real *a = st
    cdef real *z = st + mev
    cdef real *vs = z + p.m
    cdef real inv_m = 1.0 / p.m
    cdef real zsum = 0
    if p.kind == FEAT_FAVOR:
        for r in range(p.m):
            row_axpy(a + r * p.ev, vs, p.ev, <real>FAVOR_EPS)
            z[r] += <real>FAVOR_EPS * nkeys
        row_scale(a, mev + p.m, inv_m)
    row_fill(vs, p.ev, 0)
    for r in range(p.m):
        row_axpy(vs, a + r * p.ev, p.ev, 1)
        zsum += z[r]
    vs[p.ev] = zsum                                              # the M slot


# ---- products on row-major blocks ----------------------------------------------------

cdef inline void prod_ab(int rows, int n, int k, const real *a, int lda, const real *b,
                         int ldb, real *c, int ldc, bint accumulate) noexcept nogil:
    # c[rows, n] (+)= a[rows, k] @ b[k, n]: the p @ v micro-kernel when it applies
    # (float32, n a multiple of 16), else BLAS.
    cdef int r
    if real is float:
        if fa_tile_products_ok(n):
            if not accumulate:
                for r in range(rows):
                    row_fill(c + r * ldc, n, 0)
            fa_tile_pv_f32(rows, n, k, a, lda, b, ldb, c, ldc)
            return
    gemm_ab(rows, n, k, 1, a, lda, b, ldb, 1 if accumulate else 0, c, ldc)


# ---- features of a chunk of rows -----------------------------------------------------

cdef void elu_features(const real *x, Py_ssize_t ldx, int rows, int e, real *f) noexcept nogil:
    # f[rows, e] <- elu(x) + 1:  x + 1 where x > 0, else exp(x)  (NaN stays NaN)
    cdef int j
    cdef const real *xr
    cdef real *fr
    for j in range(rows):
        xr = x + j * ldx
        fr = f + j * e
        if real is float:
            fa_elu_pre_f32(xr, fr, e)
            row_exp_sum(fr, e, 0)
            fa_elu_post_f32(xr, fr, e)
        else:
            fa_elu_pre_f64(xr, fr, e)
            row_exp_sum(fr, e, 0)
            fa_elu_post_f64(xr, fr, e)


cdef void copy_rows(const real *x, Py_ssize_t ldx, int rows, int e, real *f) noexcept nogil:
    cdef int j
    for j in range(rows):
        memcpy(f + j * e, x + j * ldx, e * sizeof(real))


cdef void query_features(const LowRank *p, real root, const real *w, const real *x, int rows,
                         real *f, real *qsum) noexcept nogil:
    # f[rows, m] <- the query features; FAVOR without the m^{-1/2}, and:
    #   qsum NULL: without the EPS offset either (the caller adds its effect);
    #   else: u = exp(..) + EPS, and qsum[i] = sum_r u_ir.
    cdef int i
    cdef real mx, total
    cdef real *fr
    if p.kind == FEAT_ELU:
        elu_features(x, p.ldq, rows, p.e, f)
    elif p.kind == FEAT_GIVEN:
        copy_rows(x, p.ldq, rows, p.e, f)
    else:
        # f <- root * x @ w.T; the |x|^2 / 2 term is constant along a row, so with the
        # row's own max as stabiliser it cancels: exp(p - |x|^2/2 - (max p - |x|^2/2)).
        tile_scores(rows, p.m, p.e, root, x, p.ldq, w, p.e, f, p.ev)
        for i in range(rows):
            fr = f + i * p.m
            mx = row_max(fr, p.m)
            total = row_exp_sum(fr, p.m, mx)
            if qsum != NULL:
                row_add_const(fr, p.m, <real>FAVOR_EPS)
                qsum[i] = total + <real>FAVOR_EPS * p.m


cdef void key_features(const LowRank *p, real root, const real *w, const real *x, int rows,
                       real *st, real *f, real *h, real *zc, bint max_only) noexcept nogil:
    # The features of `rows` keys, relative to the state's running max, and their sum
    # zc[m] over the chunk. FAVOR: f is TRANSPOSED, (m, rows): one row per feature, so
    # the exp pass yields zc and the state update is f @ v; raising M rescales st's A, z.
    # Other maps: f is (rows, m). max_only (FAVOR): only update M.
    cdef Py_ssize_t mev = <Py_ssize_t>p.m * p.ev
    cdef int j, r
    cdef real half = -0.5 * root * root
    cdef real cmax = -INFINITY
    cdef real rmax, old, alpha
    cdef real *mref = st + state_size(p.m, p.ev) - 1
    if p.kind != FEAT_FAVOR:
        if p.kind == FEAT_ELU:
            elu_features(x, p.ldk, rows, p.e, f)
        else:
            copy_rows(x, p.ldk, rows, p.e, f)
        row_fill(zc, p.m, 0)
        for j in range(rows):
            row_axpy(zc, f + j * p.m, p.m, 1)
        return
    # f <- root * w @ x.T - root^2 |x_j|^2 / 2 (column j), and its max
    tile_scores(p.m, rows, p.e, root, w, p.e, x, p.ldk, f, p.ev)
    for j in range(rows):
        h[j] = half * row_dot(x + j * p.ldk, x + j * p.ldk, p.e)
    for r in range(p.m):
        rmax = row_add_max(f + r * rows, h, rows)
        if rmax > cmax or rmax != rmax:          # NaN propagates
            cmax = rmax
    old = mref[0]
    if cmax > old or cmax != cmax:
        mref[0] = cmax
        if max_only:
            return
        # A and z were summed relative to the old max (none yet when it is -inf)
        alpha = exp_nonpositive(old - cmax)
        row_scale(st, mev + p.m, alpha)
    if max_only:
        return
    for r in range(p.m):
        zc[r] = row_exp_sum(f + r * rows, rows, mref[0])


cdef void key_accumulate(const LowRank *p, const real *f, const real *vc, int rows,
                         real *st, const real *zc) noexcept nogil:
    # A += f^T v (f as key_features left it), z += zc, vs += sum of the value rows
    cdef Py_ssize_t mev = <Py_ssize_t>p.m * p.ev
    cdef int j
    if p.kind == FEAT_FAVOR:
        prod_ab(p.m, p.ev, rows, f, rows, vc, <int>p.ldv, st, p.ev, True)
        for j in range(rows):
            row_axpy(st + mev + p.m, vc + j * p.ldv, p.ev, 1)
    else:
        gemm_atb(p.m, p.ev, rows, 1, f, p.m, vc, <int>p.ldv, 1, st, p.ev)
    row_axpy(st + mev, zc, p.m, 1)


cdef void fold_keys(const LowRank *p, real root, const real *w, const real *k, const real *v,
                    Py_ssize_t k0, Py_ssize_t k1, real *st, real *f, real *h, real *zc,
                    bint max_only) noexcept nogil:
    # st <- st + keys k0 <= j < k1, chunk by chunk (k, v: one batch entry's matrices)
    cdef Py_ssize_t c0 = k0
    cdef int rows
    while c0 < k1:
        rows = <int>(k1 - c0 if k1 - c0 < p.chunk else p.chunk)
        key_features(p, root, w, k + c0 * p.ldk, rows, st, f, h, zc, max_only)
        if not max_only:
            key_accumulate(p, f, v + c0 * p.ldv, rows, st, zc)
        c0 += rows


# ---- non-causal ----------------------------------------------------------------------

cdef void query_chunk(const LowRank *p, real root, const real *w, const real *x, int rows,
                      const real *st, real eps, real *f, real *out) noexcept nogil:
    # out[rows, ev] <- attention of `rows` queries against a finished state
    cdef Py_ssize_t mev = <Py_ssize_t>p.m * p.ev
    cdef const real *z = st + mev
    cdef const real *colsum = z + p.m
    cdef real zsum = colsum[p.ev]
    cdef real den
    cdef int i
    cdef real *o
    query_features(p, root, w, x, rows, f, NULL)
    # out <- f @ St
    prod_ab(rows, p.ev, p.m, f, p.m, st, p.ev, out, p.ev, False)
    for i in range(rows):
        o = out + i * p.ev
        den = row_dot(f + i * p.m, z, p.m)
        if p.kind == FEAT_FAVOR:
            # u = f + EPS:  u @ St = f @ St + EPS colsum(St),  u . z = f . z + EPS sum(z)
            row_axpy(o, colsum, p.ev, <real>FAVOR_EPS)
            den += <real>FAVOR_EPS * zsum
            if fabs(den) <= GUARD:
                den += 2 * GUARD
        else:
            den += eps
        row_scale(o, p.ev, 1 / den)


cdef void key_split(const LowRank *p, Py_ssize_t item, real *scratch) noexcept nogil:
    # Key pass item (state s, split): parts[item] <- the keys of that split. Causal
    # (splits are segments): the last segment's state is never a prefix, so FAVOR only
    # needs its max. scratch (KEY_PASS): f, h, zc.
    cdef Py_ssize_t size = state_size(p.m, p.ev)
    cdef Py_ssize_t nkc = (p.S + p.chunk - 1) // p.chunk
    cdef Py_ssize_t per_split = (nkc + p.nsplit - 1) // p.nsplit
    cdef Py_ssize_t s = item // p.nsplit
    cdef Py_ssize_t split = item % p.nsplit
    cdef Py_ssize_t k0 = split * per_split * p.chunk
    cdef Py_ssize_t k1 = k0 + per_split * p.chunk
    cdef real *st = <real *>p.parts + item * size
    cdef char *cursor = <char *>scratch
    cdef real *f = <real *>scratch_take(&cursor, <Py_ssize_t>p.chunk * p.m * sizeof(real))
    cdef real *h = <real *>scratch_take(&cursor, p.chunk * sizeof(real))
    cdef real *zc = <real *>scratch_take(&cursor, p.m * sizeof(real))
    if k1 > p.S:
        k1 = p.S
    start_state(p, st)
    if k0 < k1:
        fold_keys(p, <real>p.root, <const real *>p.w, <const real *>p.k + p.k_off[s],
                  <const real *>p.v + p.v_off[s], k0, k1, st, f, h, zc,
                  p.causal and p.kind == FEAT_FAVOR and split == p.nsplit - 1)


cdef void merge_split(const LowRank *p, Py_ssize_t s, real *states) noexcept nogil:
    # Merge item (non-causal): state s <- its partials, merged and finished
    cdef Py_ssize_t size = state_size(p.m, p.ev)
    cdef real *st = states + s * size
    merge_states(p, <const real *>p.parts + s * p.nsplit * size, p.nsplit, st)
    finish_state(p, st, p.S)


cdef void query_item_rows(const LowRank *p, Py_ssize_t item, real *scratch) noexcept nogil:
    # Query pass item (non-causal): one (batch entry, query chunk). scratch: f.
    cdef Py_ssize_t size = state_size(p.m, p.ev)
    cdef Py_ssize_t nqc = (p.L + p.chunk - 1) // p.chunk
    cdef Py_ssize_t b = item // nqc
    cdef Py_ssize_t c0 = (item % nqc) * p.chunk
    cdef int rows = <int>(p.L - c0 if p.L - c0 < p.chunk else p.chunk)
    query_chunk(p, <real>p.root, <const real *>p.w, <const real *>p.q + p.q_off[b] + c0 * p.ldq,
                rows, <const real *>p.states + p.state_of[b] * size, <real>p.eps, scratch,
                <real *>p.out + (b * p.L + c0) * p.ev)


# ---- causal --------------------------------------------------------------------------

cdef void causal_scan(const LowRank *p, real root, real eps, const real *q, const real *k,
                      const real *v, const real *w, real *out, Py_ssize_t r0, Py_ssize_t r1,
                      real *st, real *fk, real *fq, real *t, real *h, real *zc, real *den,
                      real *qsum, real *rowinfo, real *chunk_max) noexcept nogil:
    # Rows r0 <= i < r1 of one batch entry, starting from the state st of rows < r0.
    # Linear maps: out is final. FAVOR: out_i holds a_i (relative to its chunk's M, in
    # chunk_max[c]) and rowinfo[2 i], rowinfo[2 i + 1] hold d_i, qsum_i (see the top).
    cdef Py_ssize_t mev = <Py_ssize_t>p.m * p.ev
    cdef Py_ssize_t c0 = r0
    cdef int rows, i, j
    cdef real acc
    cdef real *o
    cdef real *trow
    cdef bint favor = p.kind == FEAT_FAVOR
    while c0 < r1:
        rows = <int>(r1 - c0 if r1 - c0 < p.chunk else p.chunk)
        o = out + c0 * p.ev
        # this chunk's key features (M and st rescaled first), then its query features
        key_features(p, root, w, k + c0 * p.ldk, rows, st, fk, h, zc, False)
        query_features(p, root, w, q + c0 * p.ldq, rows, fq, qsum)
        # earlier chunks through the state:  o <- fq @ A,  den <- fq . z
        prod_ab(rows, p.ev, p.m, fq, p.m, st, p.ev, o, p.ev, False)
        for i in range(rows):
            den[i] = row_dot(fq + i * p.m, st + mev, p.m)
        # this chunk through its lower triangle:  t <- fq @ fk^T, t[i, j > i] = 0
        if favor:
            prod_ab(rows, rows, p.m, fq, p.m, fk, rows, t, rows, False)    # fk is (m, rows)
        else:
            tile_scores(rows, rows, p.m, 1, fq, p.m, fk, p.m, t, p.ev)
        for i in range(rows):
            trow = t + i * rows
            row_fill(trow + i + 1, rows - i - 1, 0)
            acc = 0
            for j in range(i + 1):
                acc = acc + trow[j]
            den[i] += acc
        # o += t @ v_chunk
        prod_ab(rows, p.ev, rows, t, rows, v + c0 * p.ldv, <int>p.ldv, o, p.ev, True)
        if favor:
            chunk_max[(c0 - r0) // p.chunk] = st[state_size(p.m, p.ev) - 1]
            for i in range(rows):
                rowinfo[2 * (c0 + i)] = den[i]
                rowinfo[2 * (c0 + i) + 1] = qsum[i]
        else:
            for i in range(rows):
                row_scale(o + i * p.ev, p.ev, 1 / (den[i] + eps))
        key_accumulate(p, fk, v + c0 * p.ldv, rows, st, zc)
        c0 += rows


cdef void favor_fixup(const LowRank *p, const real *v, real *out, Py_ssize_t r0, Py_ssize_t r1,
                      const real *rowinfo, const real *chunk_max, real m_final,
                      real *vprefix) noexcept nogil:
    # Rows r0 <= i < r1 of a FAVOR scan, now that the key max m_final is known; vprefix
    # enters as sum_{j < r0} v_j.
    #   num_i = (alpha_c a_i + EPS qsum_i sum_{j<=i} v_j) / m,  alpha_c = exp(M_c - M)
    #   den_i = (alpha_c d_i + EPS qsum_i (i + 1)) / m, pushed away from 0 like the rest
    cdef Py_ssize_t i
    cdef real alpha = 0
    cdef real inv_m = 1.0 / p.m
    cdef real d, qs
    cdef real *o
    for i in range(r0, r1):
        if (i - r0) % p.chunk == 0:
            alpha = exp_nonpositive(chunk_max[(i - r0) // p.chunk] - m_final)
        row_axpy(vprefix, v + i * p.ldv, p.ev, 1)
        d = rowinfo[2 * i]
        qs = rowinfo[2 * i + 1]
        o = out + i * p.ev
        row_scale(o, p.ev, alpha)
        row_axpy(o, vprefix, p.ev, <real>FAVOR_EPS * qs)
        d = (alpha * d + <real>FAVOR_EPS * qs * <real>(i + 1)) * inv_m
        if fabs(d) <= GUARD:
            d += 2 * GUARD
        row_scale(o, p.ev, inv_m / d)


cdef void scan_segment(const LowRank *p, Py_ssize_t item, real *scratch) noexcept nogil:
    # Scan item (causal): one (batch entry, segment), from the merge of the segments
    # before it. L == S == N; scratch (SCAN): st, fk, fq, t, h, zc, den, qsum, vp.
    cdef Py_ssize_t N = p.L
    cdef Py_ssize_t size = state_size(p.m, p.ev)
    cdef Py_ssize_t mev = <Py_ssize_t>p.m * p.ev
    cdef Py_ssize_t nchunks = (N + p.chunk - 1) // p.chunk
    cdef Py_ssize_t per_seg = (nchunks + p.nsplit - 1) // p.nsplit
    cdef Py_ssize_t cm_stride = nchunks + p.nsplit
    cdef Py_ssize_t b = item // p.nsplit
    cdef Py_ssize_t seg = item % p.nsplit
    cdef Py_ssize_t r0 = seg * per_seg * p.chunk
    cdef Py_ssize_t r1 = r0 + per_seg * p.chunk
    cdef Py_ssize_t i
    cdef Py_ssize_t fbytes = <Py_ssize_t>p.chunk * p.m * sizeof(real)
    cdef Py_ssize_t cbytes = p.chunk * sizeof(real)
    cdef const real *parts = <const real *>p.parts
    cdef const real *v = <const real *>p.v + p.v_off[b]
    cdef real *out = <real *>p.out + b * N * p.ev
    # FAVOR's per-row and per-chunk numbers (NULL for the other maps)
    cdef real *rowinfo = NULL
    cdef real *chunk_max = NULL
    cdef real m_final
    cdef char *cursor = <char *>scratch
    cdef real *st = <real *>scratch_take(&cursor, size * sizeof(real))
    cdef real *fk = <real *>scratch_take(&cursor, fbytes)
    cdef real *fq = <real *>scratch_take(&cursor, fbytes)
    cdef real *t = <real *>scratch_take(&cursor, <Py_ssize_t>p.chunk * p.chunk * sizeof(real))
    cdef real *h = <real *>scratch_take(&cursor, cbytes)
    cdef real *zc = <real *>scratch_take(&cursor, p.m * sizeof(real))
    cdef real *den = <real *>scratch_take(&cursor, cbytes)
    cdef real *qsum = <real *>scratch_take(&cursor, cbytes)
    cdef real *vp = <real *>scratch_take(&cursor, (p.ev + 1) * sizeof(real))
    if r1 > N:
        r1 = N
    if r0 >= r1:
        return
    if p.kind == FEAT_FAVOR:
        rowinfo = <real *>p.rowinfo + b * N * 2
        chunk_max = <real *>p.chunk_max + b * cm_stride + seg * per_seg
    merge_states(p, parts + b * p.nsplit * size, seg, st)
    # sum of the values before r0, for the FAVOR fix-up
    memcpy(vp, st + mev + p.m, p.ev * sizeof(real))
    causal_scan(p, <real>p.root, <real>p.eps, <const real *>p.q + p.q_off[b],
                <const real *>p.k + p.k_off[b], v, <const real *>p.w, out, r0, r1, st, fk, fq,
                t, h, zc, den, qsum, rowinfo, chunk_max)
    if p.kind == FEAT_FAVOR:
        m_final = st[size - 1]
        if p.nsplit > 1:
            # the max over every key of this batch entry
            m_final = -INFINITY
            for i in range(p.nsplit):
                if parts[(b * p.nsplit + i) * size + size - 1] > m_final:
                    m_final = parts[(b * p.nsplit + i) * size + size - 1]
        favor_fixup(p, v, out, r0, r1, rowinfo, chunk_max, m_final, vp)


# ---- the item hooks, and this family's one dtype dispatch per hook ---------------------

cdef void key_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const LowRank *p = <const LowRank *>run
    if p.dtype == DT_FLOAT32:
        key_split[float](p, item, <float *>scratch)
    else:
        key_split[double](p, item, <double *>scratch)


cdef void merge_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const LowRank *p = <const LowRank *>run
    if p.dtype == DT_FLOAT32:
        merge_split[float](p, item, <float *>p.states)
    else:
        merge_split[double](p, item, <double *>p.states)


cdef void query_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const LowRank *p = <const LowRank *>run
    if p.dtype == DT_FLOAT32:
        query_item_rows[float](p, item, <float *>scratch)
    else:
        query_item_rows[double](p, item, <double *>scratch)


cdef void scan_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef const LowRank *p = <const LowRank *>run
    if p.dtype == DT_FLOAT32:
        scan_segment[float](p, item, <float *>scratch)
    else:
        scan_segment[double](p, item, <double *>scratch)


# Passes, for lowrank_scratch.
cdef enum:
    KEY_PASS = 0        # key_item: f (chunk x m), h (chunk), zc (m)
    QUERY_PASS = 1      # query_item: f
    SCAN = 2            # scan_item: a state, fk, fq, t (chunk x chunk), h, zc, den, qsum,
                        # vp (ev + 1)
    CLAIMS_PER_THREAD = 8   # merge pass: claims of `grain` states each thread makes, about


cdef size_t lowrank_scratch(const LowRank *p, int phase, size_t itemsize) noexcept nogil:
    # One thread's scratch in a pass
    cdef size_t fbytes = scratch_room(<size_t>p.chunk * p.m * itemsize)
    cdef size_t cbytes = scratch_room(<size_t>p.chunk * itemsize)
    cdef size_t zbytes = scratch_room(<size_t>p.m * itemsize)
    if phase == KEY_PASS:
        return fbytes + cbytes + zbytes
    if phase == QUERY_PASS:
        return fbytes
    return (scratch_room(<size_t>state_size(p.m, p.ev) * itemsize) + 2 * fbytes
            + scratch_room(<size_t>p.chunk * p.chunk * itemsize) + 3 * cbytes + zbytes
            + scratch_room(<size_t>(p.ev + 1) * itemsize))


# ---- Python entry points (private: fastattn.lowrank validates everything) ----------------

cdef class LowRankPlan:
    """One linear-attention / Performer call, as `noncausal` and `causal` take it.

    Private: built by ``fastattn.lowrank`` from validated operands. q, k, v, out: base
    arrays of one dtype (float32 or float64); offsets = (q_off, k_off, v_off) intp
    element offsets, q_off per batch entry, k_off and v_off per state (non-causal, with
    state_of mapping each batch entry to its state) or per batch entry (causal);
    strides = (ldq, ldk, ldv); w (m, e) C-contiguous (FAVOR) or any array; out
    C-contiguous (nbatch, L, ev); parts (nstate * nsplit, state_length) scratch;
    non-causal: states (nstate, state_length); causal FAVOR: rowinfo (nbatch, L, 2) and
    chunk_max (nbatch, L // chunk + 1 + nsplit) (None otherwise). nsplit: key splits per
    state, or causal segments per batch entry; nthreads from
    fastattn._threads.call_threads.
    """
    cdef LowRank c
    cdef size_t itemsize
    cdef readonly object arrays     # everything the pointers in c point into

    def __init__(self, int kind, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v,
                 cnp.ndarray w, cnp.ndarray out, offsets, strides, Py_ssize_t L,
                 Py_ssize_t S, int e, int m, int ev, *, bint causal, double root,
                 double eps, int chunk, int nsplit, int nthreads, cnp.ndarray parts,
                 cnp.ndarray state_of=None, cnp.ndarray states=None,
                 cnp.ndarray rowinfo=None, cnp.ndarray chunk_max=None):
        q_off, k_off, v_off = offsets
        self.c.kind = kind
        self.c.dtype = dtype_code(q.dtype)
        self.c.causal = causal
        self.c.L = L
        self.c.S = S
        self.c.e = e
        self.c.m = m
        self.c.ev = ev
        self.c.chunk = chunk
        self.c.root = root
        self.c.eps = eps
        self.c.q = cnp.PyArray_DATA(q)
        self.c.k = cnp.PyArray_DATA(k)
        self.c.v = cnp.PyArray_DATA(v)
        self.c.w = cnp.PyArray_DATA(w)
        self.c.ldq, self.c.ldk, self.c.ldv = strides
        self.c.q_off = intp_data(q_off)
        self.c.k_off = intp_data(k_off)
        self.c.v_off = intp_data(v_off)
        self.c.nbatch = q_off.shape[0]
        self.c.nstate = k_off.shape[0]
        self.c.state_of = NULL if state_of is None else intp_data(state_of)
        self.c.out = cnp.PyArray_DATA(out)
        self.c.nsplit = nsplit
        self.c.parts = cnp.PyArray_DATA(parts)
        self.c.states = NULL if states is None else cnp.PyArray_DATA(states)
        self.c.rowinfo = NULL if rowinfo is None else cnp.PyArray_DATA(rowinfo)
        self.c.chunk_max = NULL if chunk_max is None else cnp.PyArray_DATA(chunk_max)
        self.c.nthreads = nthreads
        self.itemsize = q.itemsize
        self.arrays = (q, k, v, w, out, offsets, parts, state_of, states, rowinfo, chunk_max)


def state_length(int m, int ev):
    """Elements of one state (partial or final): A (m x ev), z (m), vs (ev), M."""
    return state_size(m, ev)


def noncausal(LowRankPlan plan):
    """Non-causal linear attention / Performer on a plan (see LowRankPlan)."""
    cdef const LowRank *p = &plan.c
    cdef Py_ssize_t nqc = (p.L + p.chunk - 1) // p.chunk
    cdef size_t keys = lowrank_scratch(p, KEY_PASS, plan.itemsize)
    cdef size_t queries = lowrank_scratch(p, QUERY_PASS, plan.itemsize)
    cdef Py_ssize_t grain = max(1, p.nstate // (CLAIMS_PER_THREAD * <Py_ssize_t>p.nthreads))
    with nogil:
        run_items(key_item, <void *>p, p.nstate * p.nsplit, 1, keys, p.nthreads,
                  "low-rank key chunk buffers")
        run_items(merge_item, <void *>p, p.nstate, grain, 0, p.nthreads, "")
        run_items(query_item, <void *>p, p.nbatch * nqc, 1, queries, p.nthreads,
                  "low-rank query chunk buffer")


def causal(LowRankPlan plan):
    """Causal (L == S) linear attention / Performer on a plan, by a chunked prefix scan."""
    cdef const LowRank *p = &plan.c
    cdef size_t keys = lowrank_scratch(p, KEY_PASS, plan.itemsize)
    cdef size_t scan = lowrank_scratch(p, SCAN, plan.itemsize)
    with nogil:
        if p.nsplit > 1:
            # every segment's own keys: parts[b * nsplit + seg]
            run_items(key_item, <void *>p, p.nbatch * p.nsplit, 1, keys, p.nthreads,
                      "low-rank key chunk buffers")
        run_items(scan_item, <void *>p, p.nbatch * p.nsplit, 1, scan, p.nthreads,
                  "low-rank scan buffers")
