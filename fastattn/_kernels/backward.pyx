# The attention backward (FlashAttention-2's), and the softmax backward, over the tile core.
#
# sdpa_backward(plan, ...) takes the forward's AttentionPlan (q, k, v, the saved output
# `out` and `lse`, the mask and its block map, the causal band, the tiles) plus dO and
# the gradient buffers, and runs two parallel regions on the pool (parallel.pxd):
#
#   1. D = rowsum(dO * O), one item per (batch, block of rows);
#   2. the gradients, one item per (component, key split). A component is a set of
#      batch entries that share gradient memory: the query heads of a grouped-query
#      group, batch entries a broadcast key or value is shared by, and (mask_grad) batch
#      entries sharing a broadcast mask; every dK, dV and dmask element belongs to exactly
#      one component, so items of different components never write the same memory. An
#      item walks its split's key blocks (interleaved, kb = split, split + nsplit, ...:
#      with a causal band the work stays even); for each key block and each (key, value)
#      matrix of the component ("pair") it packs the key and value tiles once, then for
#      every batch entry of the pair and every query block that the causal band and the
#      block map leave:
#          S  = scale * Q K^T           P  = exp(S + mask - lse)    (recomputed)
#          dP = dO V^T                  dS = P * (dP - D)           (dmask += dS)
#          dV += P^T dO                 dK += scale * dS^T Q        dQ += scale * dS K
#      With dropout (plan.dropout_on) the forward's mask Z, regenerated from its seed
#      (dropout.h), scales dP and P by Z / (1 - p) before dS and dV: FlashAttention's
#      dropout backward (D = rowsum(dO * O) is already that of the dropped output).
#      dK and dV tiles are written by their item alone (directly into the gradient
#      buffers); dQ rows receive every key block's contribution, so each key split has
#      its own dQ buffer (one when the components alone keep every thread busy), summed
#      by the caller. No (L, S) buffer: a thread's scratch is two score tiles, the packed
#      key and value panels and, for half operands, float32 copies of the tiles.
#
# float32 products run on tilegemm.h's AVX-512 micro-kernels when the CPU has them and E
# and Ev are multiples of 16, else on BLAS (float64 always). Half operands (float16,
# bfloat16) are widened to float32 tile by tile (tilehalf.h) and accumulate in float32.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int64_t
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, scratch_room, DT_FLOAT32, DT_FLOAT64
from fastattn._kernels.plan cimport AttentionPlan, PlanData
from fastattn._kernels.sparse cimport (
    SparsePlan, SparseLayout, tile_rule, TILE_SKIP, TILE_BAND, TILE_MASK,
)
from fastattn._kernels.tile cimport (
    real, intp_data, row_fill, row_dot, row_scale, row_add_max, row_keep_max,
    gemm_abt, gemm_ab, gemm_atb, is_half, element, widen_rows, scratch_at, block_len,
    tile_products_native, bf16_dot_products, fa_pack_pairs, fa_pack_value_pairs,
    fa_pack_transposed, fa_scores_from_panel, fa_tile_pv_f32, fa_tile_pv_t_f32,
    fa_bf16_scores_from_panel, fa_bf16_pv, fa_bf16_pairs_rows, dropout_row, MASK_NONE, MASK_BOOL, BLOCK_SKIP, BLOCK_MASKED, BLOCK_FULL, BAND_ALL,
)

cnp.import_array()

cdef extern from "tilebwd.h" nogil:
    void fa_bwd_probs_f32(float *s, float *dp, Py_ssize_t n, float lse, float d, float a)
    void fa_bwd_probs_f64(double *s, double *dp, Py_ssize_t n, double lse, double d,
                          double a)
    void fa_bwd_row_pairs(int rows, int cols, const float *x, Py_ssize_t ldx, uint32_t *pt,
                          Py_ssize_t ldpt)


def native_products(bint is_float32, int e, int ev):
    """True when every tile product of the backward runs on the AVX-512 micro-kernels
    (float32 compute, the CPU has AVX-512, e and ev multiples of 16): no BLAS."""
    return tile_products_native(is_float32, e) and tile_products_native(is_float32, ev)


def bfloat16_products(int dtype, int e, int ev):
    """True when bfloat16 operands of these widths multiply as bfloat16 pairs
    (vdpbf16ps, tilehalf.h) rather than widen to float32."""
    return bf16_dot_products(dtype, e) and bf16_dot_products(dtype, ev)


cdef inline void probs_row(real *s, real *dp, Py_ssize_t n, real lse, real d,
                           real a) noexcept nogil:
    # s <- exp(s - lse), dp <- a * s * (dp - d)   (tilebwd.h)
    if real is float:
        fa_bwd_probs_f32(s, dp, n, lse, d, a)
    else:
        fa_bwd_probs_f64(s, dp, n, lse, d, a)


cdef inline Py_ssize_t round16(Py_ssize_t n) noexcept nogil:
    return (n + 15) // 16 * 16


# ---- one thread's buffers ----------------------------------------------------------------

cdef struct BwdBuffers:
    void *s             # block_q x lds: scores, then probabilities P (compute type)
    void *dp            # block_q x lds: dO V^T, then dS
    Py_ssize_t lds
    float *kt           # e x ldp: the key tile, transposed (micro-kernel panels)
    float *vt           # ev x ldp: the value tile, transposed
    Py_ssize_t ldp
    float *q32          # half operands widened: block_q x e, block_q x ev (dO),
    float *do32         # block_k x e (keys), block_k x ev (values)
    float *k32
    float *v32
    # bfloat16 pairs (bf16 products): the key and value tiles as pair panels
    # ((e + 1) / 2 x ldp and (ev + 1) / 2 x ldp words) and the keys as pair rows
    # ((block_k + 1) / 2 x e); dO and Q as pair rows ((block_q + 1) / 2 x ev, x e);
    # P and dS as row pairs ((block_q + 1) / 2 x ldp) and dS as pairs of keys
    # (block_q x ldw)
    uint32_t *kpanel
    uint32_t *vpanel
    uint32_t *kpairs
    uint32_t *dopairs
    uint32_t *qpairs
    uint32_t *ppairs
    uint32_t *dspairs
    uint32_t *dsrows
    Py_ssize_t ldw


cdef inline size_t bwd_buffers_init(BwdBuffers *b, int dtype, bint native, bint bf16, int e,
                                    int ev, int block_q, int block_k,
                                    char *scratch) noexcept nogil:
    # Carve b from scratch (NULL: only size it); returns the bytes it takes.
    cdef size_t realsize = 8 if dtype == DT_FLOAT64 else 4
    cdef size_t off = 0
    cdef Py_ssize_t hq = (block_q + 1) // 2
    b.lds = round16(block_k)
    b.ldp = (block_k + 31) // 32 * 32
    b.s = scratch_at(scratch, off)
    off += scratch_room(block_q * b.lds * realsize)
    b.dp = scratch_at(scratch, off)
    off += scratch_room(block_q * b.lds * realsize)
    b.kt = b.vt = b.q32 = b.do32 = b.k32 = b.v32 = NULL
    b.kpanel = b.vpanel = b.kpairs = b.dopairs = b.qpairs = b.ppairs = b.dspairs = NULL
    b.dsrows = NULL
    b.ldw = round16((block_k + 1) // 2)
    if bf16:
        b.kpanel = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room((e + 1) // 2 * b.ldp * 4)
        b.vpanel = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room((ev + 1) // 2 * b.ldp * 4)
        b.kpairs = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room((block_k + 1) // 2 * e * 4)
        b.dopairs = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room(hq * ev * 4)
        b.qpairs = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room(hq * e * 4)
        b.ppairs = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room(hq * b.ldp * 4)
        b.dspairs = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room(hq * b.ldp * 4)
        b.dsrows = <uint32_t *>scratch_at(scratch, off)
        off += scratch_room(block_q * b.ldw * 4)
        return off
    if native:
        b.kt = <float *>scratch_at(scratch, off)
        off += scratch_room(e * b.ldp * 4)
        b.vt = <float *>scratch_at(scratch, off)
        off += scratch_room(ev * b.ldp * 4)
    if is_half(dtype):
        b.q32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_q * e * 4)
        b.do32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_q * ev * 4)
        b.k32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_k * e * 4)
        b.v32 = <float *>scratch_at(scratch, off)
        off += scratch_room(block_k * ev * 4)
    return off


# ---- the call --------------------------------------------------------------------------

cdef struct BwdRun:
    const PlanData *plan        # q, k, v, out (= O), lse, mask, band, tiles, threads
    const void *dout            # dO: batch b's (L, ev) matrix at dout + do_off[b], row
    const Py_ssize_t *do_off    # stride lddo, in the operands' dtype
    Py_ssize_t lddo
    void *delta                 # D, (nbatch, L), compute type
    void *dq                    # (nsplit, nbatch, L, e) compute type, zeroed
    void *dk                    # (npairs, S, e) compute type, zeroed
    void *dv                    # (npairs, S, ev)
    # components: pairs comp_pairs[comp_start[c] : comp_start[c + 1]]; pair p's batch
    # entries pair_members[pair_start[p] : pair_start[p + 1]] (all read the same K, V)
    const Py_ssize_t *comp_start
    const Py_ssize_t *comp_pairs
    const Py_ssize_t *pair_start
    const Py_ssize_t *pair_members
    Py_ssize_t nsplit
    bint two_pass               # dQ by a second pass over query blocks (not per split)
    bint native                 # float32 products on the micro-kernels
    bint bf16                   # bfloat16 operands multiplied as pairs (vdpbf16ps)
    # mask gradient (NULL: none): batch b's element (i, j) at
    # dmask + dm_off[b] + i * dm_rs + j * dm_cs (+ the key block when dm_by_block)
    void *dmask
    const Py_ssize_t *dm_off
    Py_ssize_t dm_rs, dm_cs
    bint dm_by_block
    Py_ssize_t block_rows       # rows per item of the D pass
    # block-sparse (NULL: dense): the layout and its element rule (sparse.pxd), and its
    # transpose: batch b's key block kb is visited by the query blocks
    # qrows[colptr[csc_off[b] + kb] : colptr[csc_off[b] + kb + 1]]
    const SparseLayout *layout
    const int64_t *colptr
    const int64_t *qrows
    const Py_ssize_t *csc_off


cdef void delta_rows(const BwdRun *run, Py_ssize_t item, real *scratch) noexcept nogil:
    # D for one block of rows of one batch entry; scratch: two float32 rows (half).
    cdef const PlanData *p = run.plan
    cdef Py_ssize_t nrb = (p.qkv.L + run.block_rows - 1) // run.block_rows
    cdef Py_ssize_t b = item // nrb
    cdef Py_ssize_t r0 = (item % nrb) * run.block_rows
    cdef Py_ssize_t r1 = r0 + run.block_rows
    cdef Py_ssize_t i, ev = p.qkv.ev
    cdef real *delta = <real *>run.delta + b * p.qkv.L
    cdef const void *orow
    cdef const void *drow
    if r1 > p.qkv.L:
        r1 = p.qkv.L
    for i in range(r0, r1):
        orow = element(p.ops.out, p.out_off[b] + i * p.ldo, p.itemsize)
        drow = element(run.dout, run.do_off[b] + i * run.lddo, p.itemsize)
        if is_half(p.dtype):
            widen_rows(p.dtype, 1, ev, orow, ev, scratch, ev)
            widen_rows(p.dtype, 1, ev, drow, ev, scratch + ev, ev)
            delta[i] = row_dot(<const real *>scratch, <const real *>scratch + ev, ev)
        else:
            delta[i] = row_dot(<const real *>orow, <const real *>drow, ev)


cdef void delta_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef BwdRun *r = <BwdRun *>run
    if r.plan.dtype == DT_FLOAT64:
        delta_rows[double](r, item, <double *>scratch)
    else:
        delta_rows[float](r, item, <float *>scratch)


cdef inline void mask_scores_row(real *s, Py_ssize_t n, const void *mrow, int kind,
                                 Py_ssize_t cs) noexcept nogil:
    # s[:n] <- s + mask (float) or -inf where the mask drops (bool); mrow at element 0
    cdef Py_ssize_t j
    cdef const uint8_t *keep
    cdef const real *add
    if kind == MASK_BOOL:
        keep = <const uint8_t *>mrow
        if cs == 1:
            row_keep_max(s, keep, n)
        else:
            for j in range(n):
                if not keep[j * cs]:
                    s[j] = -INFINITY
    else:
        add = <const real *>mrow
        if cs == 1:
            row_add_max(s, add, n)
        else:
            for j in range(n):
                s[j] += add[j * cs]


cdef void grad_tile(const BwdRun *run, BwdBuffers *buf, Py_ssize_t b, Py_ssize_t qb,
                    Py_ssize_t kb, int cols, const real *kp, Py_ssize_t ldk, const real *vp,
                    Py_ssize_t ldv, real *dk, real *dv, real *dq, const uint8_t *keep,
                    Py_ssize_t band_lo, Py_ssize_t band_hi) noexcept nogil:
    # One tile: query block qb of batch entry b against key block kb (cols keys), the
    # key and value tiles at kp / vp (float32 for half operands; also packed in buf.kt /
    # buf.vt when run.native). Accumulates the tile's products into the key block's dK
    # and dV rows dk / dv (row strides e, ev; NULL: not wanted) and the query block's dQ
    # rows dq (row stride e; NULL: not wanted). Nothing when the tile is masked out.
    # Besides the plan's mask and causal band, row r sees only tile columns
    # r + band_lo .. r + band_hi, and with keep (rows x cols bytes) those it keeps.
    cdef const PlanData *p = run.plan
    cdef Py_ssize_t L = p.qkv.L
    cdef int e = p.qkv.e
    cdef int ev = p.qkv.ev
    cdef Py_ssize_t isz = p.itemsize
    cdef Py_ssize_t q0 = qb * p.block_q
    cdef Py_ssize_t k0 = kb * p.block_k
    cdef int rows = block_len(L, q0, p.block_q)
    cdef int ccols = cols
    cdef int state
    cdef Py_ssize_t r, c0, c1, j
    cdef real scale = <real>p.scale
    cdef bint mask_grad = run.dmask != NULL and dk != NULL     # (once: in the dK pass)
    cdef real a = 1 if mask_grad else scale     # dS is scaled as it is formed, or after
                                                # the mask's gradient took it unscaled
    cdef real *s = <real *>buf.s
    cdef real *dp = <real *>buf.dp
    cdef Py_ssize_t lds = buf.lds
    cdef real *srow
    cdef real *dprow
    cdef real *dmrow
    cdef const real *qp
    cdef const real *dop
    cdef Py_ssize_t ldq, lddo
    cdef const real *lse = <const real *>p.ops.lse + b * L + q0
    cdef const real *delta = <const real *>run.delta + b * L + q0
    cdef const void *mtile = NULL
    cdef const void *mrow

    state = BLOCK_FULL if p.mask.kind == MASK_NONE else BLOCK_MASKED
    if p.mask.bmap != NULL:
        state = p.mask.bmap[p.mask.bmap_off[b] + qb * p.mask.bmap_rs + kb * p.mask.bmap_cs]
        if state == BLOCK_SKIP:
            return
    if p.causal and q0 + p.causal_offset - k0 < band_hi:
        band_hi = q0 + p.causal_offset - k0
    if band_hi < BAND_ALL and rows + band_hi < ccols:
        ccols = <int>(rows + band_hi)       # columns past the last row's band: not computed
    if ccols <= 0:
        return
    if state != BLOCK_FULL:
        if p.mask.kind == MASK_BOOL:
            mtile = <const void *>((<const uint8_t *>p.mask.data) + p.mask.off[b]
                                   + q0 * p.mask.rs + k0 * p.mask.cs)
        else:
            mtile = <const void *>((<const real *>p.mask.data) + p.mask.off[b]
                                   + q0 * p.mask.rs + k0 * p.mask.cs)

    cdef const uint16_t *qh = NULL
    cdef const uint16_t *doh = NULL
    cdef int hrows = (rows + 1) // 2
    # the query block's Q and dO (float32 copies for half operands, unless bf16 pairs)
    if run.bf16:
        qh = <const uint16_t *>element(p.ops.q, p.qkv.q_off[b] + q0 * p.qkv.ldq, isz)
        doh = <const uint16_t *>element(run.dout, run.do_off[b] + q0 * run.lddo, isz)
        ldq = p.qkv.ldq
        lddo = run.lddo
        qp = dop = NULL
    elif is_half(p.dtype):
        widen_rows(p.dtype, rows, e, element(p.ops.q, p.qkv.q_off[b] + q0 * p.qkv.ldq, isz),
                   p.qkv.ldq, <real *>buf.q32, e)
        widen_rows(p.dtype, rows, ev, element(run.dout, run.do_off[b] + q0 * run.lddo, isz),
                   run.lddo, <real *>buf.do32, ev)
        qp = <const real *>buf.q32
        dop = <const real *>buf.do32
        ldq = e
        lddo = ev
    else:
        qp = <const real *>p.ops.q + p.qkv.q_off[b] + q0 * p.qkv.ldq
        dop = <const real *>run.dout + run.do_off[b] + q0 * run.lddo
        ldq = p.qkv.ldq
        lddo = run.lddo

    # S = scale * Q K^T and dP = dO V^T
    if real is float:
        if run.bf16:
            fa_bf16_scores_from_panel(rows, ccols, e, scale, qh, ldq, buf.kpanel, buf.ldp,
                                      s, lds)
            fa_bf16_scores_from_panel(rows, ccols, ev, 1, doh, lddo, buf.vpanel, buf.ldp,
                                      dp, lds)
        elif run.native:
            fa_scores_from_panel(rows, ccols, e, scale, qp, ldq, buf.kt, buf.ldp, s, lds)
            fa_scores_from_panel(rows, ccols, ev, 1, dop, lddo, buf.vt, buf.ldp, dp, lds)
    if not run.native and not run.bf16:
        gemm_abt(rows, ccols, e, scale, qp, <int>ldq, kp, <int>ldk, 0, s, <int>lds)
        gemm_abt(rows, ccols, ev, 1, dop, <int>lddo, vp, <int>ldv, 0, dp, <int>lds)

    # P = exp(S + mask - lse) within each row's band, dS = scale * P * (dP - D)
    for r in range(rows):
        srow = s + r * lds
        dprow = dp + r * lds
        c0 = r + band_lo if r + band_lo > 0 else 0
        c1 = r + band_hi + 1 if r + band_hi + 1 < ccols else ccols
        if c1 <= c0 or lse[r] == -INFINITY:
            row_fill(srow, ccols, 0)
            row_fill(dprow, ccols, 0)
            continue
        if mtile != NULL:
            if p.mask.kind == MASK_BOOL:
                mrow = <const void *>((<const uint8_t *>mtile) + r * p.mask.rs + c0 * p.mask.cs)
            else:
                mrow = <const void *>((<const real *>mtile) + r * p.mask.rs + c0 * p.mask.cs)
            mask_scores_row(srow + c0, c1 - c0, mrow, p.mask.kind, p.mask.cs)
        if keep != NULL:
            mask_scores_row(srow + c0, c1 - c0, keep + r * cols + c0, MASK_BOOL, 1)
        if p.dropout_on:
            # dropout (the forward's mask, regenerated): dP <- (dO V^T) * Z / (1 - p)
            dropout_row(&p.dropout, b, q0 + r, k0 + c0, dprow + c0, c1 - c0)
        probs_row(srow + c0, dprow + c0, c1 - c0, lse[r], delta[r], a)
        if p.dropout_on:
            # ... and dV takes the dropped probabilities: P <- P * Z / (1 - p)
            dropout_row(&p.dropout, b, q0 + r, k0 + c0, srow + c0, c1 - c0)
        if mask_grad:
            dmrow = (<real *>run.dmask + run.dm_off[b] + (q0 + r) * run.dm_rs
                     + (kb if run.dm_by_block else k0))
            if run.dm_cs:
                for j in range(c0, c1):
                    dmrow[j] += dprow[j]
            else:
                for j in range(c0, c1):
                    dmrow[0] += dprow[j]
            row_scale(dprow + c0, c1 - c0, scale)
        row_fill(srow, c0, 0)
        row_fill(dprow, c0, 0)
        row_fill(srow + c1, ccols - c1, 0)
        row_fill(dprow + c1, ccols - c1, 0)

    # dV += P^T dO, dK += dS^T Q, dQ += dS K
    if real is float:
        if run.bf16:
            if dv != NULL:
                fa_bwd_row_pairs(rows, ccols, s, lds, buf.ppairs, buf.ldp)
                fa_pack_value_pairs(rows, ev, doh, lddo, buf.dopairs, ev)
                fa_bf16_pv(ccols, ev, hrows, buf.ppairs, 1, buf.ldp, buf.dopairs, ev, dv, ev)
                fa_bwd_row_pairs(rows, ccols, dp, lds, buf.dspairs, buf.ldp)
                fa_pack_value_pairs(rows, e, qh, ldq, buf.qpairs, e)
                fa_bf16_pv(ccols, e, hrows, buf.dspairs, 1, buf.ldp, buf.qpairs, e, dk, e)
            if dq != NULL:
                fa_bf16_pairs_rows(rows, ccols, dp, lds, buf.dsrows, buf.ldw)
                fa_bf16_pv(rows, e, (ccols + 1) // 2, buf.dsrows, buf.ldw, 1, buf.kpairs, e,
                           dq, e)
            return
        if run.native:
            if dv != NULL:
                fa_tile_pv_t_f32(ccols, ev, rows, s, lds, dop, lddo, dv, ev)
                fa_tile_pv_t_f32(ccols, e, rows, dp, lds, qp, ldq, dk, e)
            if dq != NULL:
                fa_tile_pv_f32(rows, e, ccols, dp, lds, kp, ldk, dq, e)
            return
    if dv != NULL:
        gemm_atb(ccols, ev, rows, 1, s, <int>lds, dop, <int>lddo, 1, dv, ev)
        gemm_atb(ccols, e, rows, 1, dp, <int>lds, qp, <int>ldq, 1, dk, e)
    if dq != NULL:
        gemm_ab(rows, e, ccols, 1, dp, <int>lds, kp, <int>ldk, 1, dq, e)


cdef inline void load_kv(const BwdRun *run, BwdBuffers *buf, Py_ssize_t b, Py_ssize_t k0,
                         int cols, const real **kp, Py_ssize_t *ldk, const real **vp,
                         Py_ssize_t *ldv) noexcept nogil:
    # The key and value tiles of batch entry b at key k0 as the tile products read them:
    # in place, or widened to float32 (half operands); packed too when run.native.
    cdef const PlanData *p = run.plan
    cdef const void *kraw = element(p.ops.k, p.qkv.k_off[b] + k0 * p.qkv.ldk, p.itemsize)
    cdef const void *vraw = element(p.ops.v, p.qkv.v_off[b] + k0 * p.qkv.ldv, p.itemsize)
    cdef int e = p.qkv.e
    cdef int ev = p.qkv.ev
    if run.bf16:
        fa_pack_pairs(cols, e, <const uint16_t *>kraw, p.qkv.ldk, buf.kpanel, buf.ldp)
        fa_pack_pairs(cols, ev, <const uint16_t *>vraw, p.qkv.ldv, buf.vpanel, buf.ldp)
        fa_pack_value_pairs(cols, e, <const uint16_t *>kraw, p.qkv.ldk, buf.kpairs, e)
        kp[0] = vp[0] = NULL
        ldk[0] = ldv[0] = 0
        return
    if is_half(p.dtype):
        widen_rows(p.dtype, cols, e, kraw, p.qkv.ldk, <real *>buf.k32, e)
        widen_rows(p.dtype, cols, ev, vraw, p.qkv.ldv, <real *>buf.v32, ev)
        kp[0] = <const real *>buf.k32
        vp[0] = <const real *>buf.v32
        ldk[0] = e
        ldv[0] = ev
    else:
        kp[0] = <const real *>kraw
        vp[0] = <const real *>vraw
        ldk[0] = p.qkv.ldk
        ldv[0] = p.qkv.ldv
    if real is float:
        if run.native:
            fa_pack_transposed(cols, e, kp[0], ldk[0], buf.kt, buf.ldp)
            fa_pack_transposed(cols, ev, vp[0], ldv[0], buf.vt, buf.ldp)


cdef void sparse_tiles(const BwdRun *run, BwdBuffers *buf, uint8_t *keep, Py_ssize_t b,
                       Py_ssize_t split, Py_ssize_t kb, int cols, const real *kp,
                       Py_ssize_t ldk, const real *vp, Py_ssize_t ldv, real *dk,
                       real *dv) noexcept nogil:
    # Block-sparse: the query blocks of batch entry b whose layout row lists key block kb,
    # each tile reduced by the element rule to a band or a keep tile (sparse.pyx's
    # tile_rule, into keep: block_q x block_k bytes).
    cdef const PlanData *p = run.plan
    cdef Py_ssize_t idx, qb, q0, band_lo, band_hi
    cdef Py_ssize_t k0 = kb * p.block_k
    cdef Py_ssize_t start = run.colptr[run.csc_off[b] + kb]
    cdef Py_ssize_t end = run.colptr[run.csc_off[b] + kb + 1]
    cdef int rows, kind
    for idx in range(start, end):
        qb = run.qrows[idx]
        q0 = qb * p.block_q
        rows = block_len(p.qkv.L, q0, p.block_q)
        kind = TILE_BAND
        band_lo = -BAND_ALL
        band_hi = BAND_ALL
        if run.layout.rule.active:
            kind = tile_rule(&run.layout.rule, b, q0, rows, k0, cols, keep, &band_lo,
                             &band_hi)
            if kind == TILE_SKIP:
                continue
        grad_tile(run, buf, b, qb, kb, cols, kp, ldk, vp, ldv, dk, dv,
                  <real *>run.dq + ((split * p.qkv.nbatch + b) * p.qkv.L + q0) * p.qkv.e,
                  keep if kind == TILE_MASK else NULL, band_lo, band_hi)


cdef void grad_item_body(const BwdRun *run, Py_ssize_t item, real *scratch) noexcept nogil:
    # One item: the key blocks of one split, for every pair of one component: dK and dV,
    # and (unless run.two_pass) the split's dQ.
    cdef const PlanData *p = run.plan
    cdef Py_ssize_t comp = item // run.nsplit
    cdef Py_ssize_t split = item % run.nsplit
    cdef Py_ssize_t L = p.qkv.L
    cdef Py_ssize_t S = p.qkv.S
    cdef int e = p.qkv.e
    cdef int ev = p.qkv.ev
    cdef Py_ssize_t nkb = (S + p.block_k - 1) // p.block_k
    cdef Py_ssize_t nqb = (L + p.block_q - 1) // p.block_q
    cdef Py_ssize_t kb, k0, ci, pair, mi, b, qb, qb_lo, first
    cdef int cols
    cdef BwdBuffers buf
    cdef const real *kp
    cdef const real *vp
    cdef Py_ssize_t ldk, ldv
    cdef real *dq
    # the tile buffers, then (block-sparse) the keep tile of the element rule
    cdef uint8_t *keep = (<uint8_t *>scratch) + bwd_buffers_init(
        &buf, p.dtype, run.native, run.bf16, e, ev, p.block_q, p.block_k, <char *>scratch)
    kb = split
    while kb < nkb:
        k0 = kb * p.block_k
        cols = block_len(S, k0, p.block_k)
        qb_lo = 0
        if p.causal:
            # rows i see this key block only if i + offset >= k0
            first = k0 - p.causal_offset
            if first >= L:
                kb = kb + run.nsplit
                continue
            if first > 0:
                qb_lo = first // p.block_q
        for ci in range(run.comp_start[comp], run.comp_start[comp + 1]):
            pair = run.comp_pairs[ci]
            load_kv(run, &buf, run.pair_members[run.pair_start[pair]], k0, cols, &kp, &ldk,
                    &vp, &ldv)
            for mi in range(run.pair_start[pair], run.pair_start[pair + 1]):
                b = run.pair_members[mi]
                if run.layout != NULL:
                    sparse_tiles(run, &buf, keep, b, split, kb, cols, kp, ldk, vp, ldv,
                                 <real *>run.dk + (pair * S + k0) * e,
                                 <real *>run.dv + (pair * S + k0) * ev)
                    continue
                for qb in range(qb_lo, nqb):
                    dq = NULL
                    if not run.two_pass:
                        dq = <real *>run.dq + ((split * p.qkv.nbatch + b) * L
                                               + qb * p.block_q) * e
                    grad_tile(run, &buf, b, qb, kb, cols, kp, ldk, vp, ldv,
                              <real *>run.dk + (pair * S + k0) * e,
                              <real *>run.dv + (pair * S + k0) * ev, dq, NULL, -BAND_ALL,
                              BAND_ALL)
        kb = kb + run.nsplit


cdef void grad_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    # The item hook, and this family's one dtype dispatch (half operands: float32).
    cdef BwdRun *r = <BwdRun *>run
    if r.plan.dtype == DT_FLOAT64:
        grad_item_body[double](r, item, <double *>scratch)
    else:
        grad_item_body[float](r, item, <float *>scratch)


cdef void dq_item_body(const BwdRun *run, Py_ssize_t item, real *scratch) noexcept nogil:
    # The second pass of run.two_pass: dQ of one query block, over its key blocks.
    cdef const PlanData *p = run.plan
    cdef Py_ssize_t L = p.qkv.L
    cdef Py_ssize_t nqb = (L + p.block_q - 1) // p.block_q
    cdef Py_ssize_t b = item // nqb
    cdef Py_ssize_t qb = item % nqb
    cdef Py_ssize_t q0 = qb * p.block_q
    cdef Py_ssize_t nkb = (p.qkv.S + p.block_k - 1) // p.block_k
    cdef Py_ssize_t kb, k0, last_key
    cdef int cols
    cdef BwdBuffers buf
    cdef const real *kp
    cdef const real *vp
    cdef Py_ssize_t ldk, ldv
    bwd_buffers_init(&buf, p.dtype, run.native, run.bf16, p.qkv.e, p.qkv.ev, p.block_q,
                     p.block_k, <char *>scratch)
    if p.causal:
        last_key = q0 + block_len(L, q0, p.block_q) - 1 + p.causal_offset
        if last_key < 0:
            return
        if last_key // p.block_k + 1 < nkb:
            nkb = last_key // p.block_k + 1
    for kb in range(nkb):
        if p.mask.bmap != NULL and p.mask.bmap[p.mask.bmap_off[b] + qb * p.mask.bmap_rs
                                               + kb * p.mask.bmap_cs] == BLOCK_SKIP:
            continue
        k0 = kb * p.block_k
        cols = block_len(p.qkv.S, k0, p.block_k)
        load_kv(run, &buf, b, k0, cols, &kp, &ldk, &vp, &ldv)
        grad_tile(run, &buf, b, qb, kb, cols, kp, ldk, vp, ldv, NULL, NULL,
                  <real *>run.dq + (b * L + q0) * p.qkv.e, NULL, -BAND_ALL, BAND_ALL)


cdef void dq_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef BwdRun *r = <BwdRun *>run
    if r.plan.dtype == DT_FLOAT64:
        dq_item_body[double](r, item, <double *>scratch)
    else:
        dq_item_body[float](r, item, <float *>scratch)


cdef inline void *data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


def sdpa_backward(AttentionPlan plan, dout, do_off, Py_ssize_t lddo, delta, dq, dk, dv,
                  comp_start, comp_pairs, pair_start, pair_members, Py_ssize_t nsplit,
                  bint native, dmask, dm_off, Py_ssize_t dm_rs, Py_ssize_t dm_cs,
                  bint dm_by_block, bint two_pass=False, SparsePlan layout=None,
                  colptr=None, qrows=None, csc_off=None):
    """Run the backward on a forward plan (fastattn.backward builds both). Private:
    every argument is validated there.

    ``plan``: q, k, v, out (the forward's output) in one dtype, lse C-contiguous
    (nbatch, L) in the compute dtype; ``dout`` in the plan's dtype with per-batch offsets
    ``do_off`` and row stride ``lddo``; ``delta`` (nbatch, L), ``dq`` (nsplit, nbatch, L,
    e), ``dk`` (npairs, S, e), ``dv`` (npairs, S, ev), ``dmask`` or None: C-contiguous,
    compute dtype, the gradients zeroed. The index arrays are intp.

    Block-sparse (the plan without mask or causal band): ``layout`` the forward's
    SparsePlan, ``colptr`` (int64, one row of nkb + 1 per layout head, at ``csc_off[b]``
    for batch b) and ``qrows`` (int64) its transpose; ``two_pass`` must be False.
    """
    cdef BwdRun run
    cdef const PlanData *p = &plan.c
    cdef Py_ssize_t ncomp = len(comp_start) - 1
    cdef Py_ssize_t nrb
    cdef BwdBuffers sizing
    cdef size_t scratch
    cdef size_t realsize = 8 if p.dtype == DT_FLOAT64 else 4
    run.plan = p
    run.dout = cnp.PyArray_DATA(dout)
    run.do_off = intp_data(do_off)
    run.lddo = lddo
    run.delta = cnp.PyArray_DATA(delta)
    run.dq = cnp.PyArray_DATA(dq)
    run.dk = cnp.PyArray_DATA(dk)
    run.dv = cnp.PyArray_DATA(dv)
    run.comp_start = intp_data(comp_start)
    run.comp_pairs = intp_data(comp_pairs)
    run.pair_start = intp_data(pair_start)
    run.pair_members = intp_data(pair_members)
    run.nsplit = nsplit
    run.two_pass = two_pass
    run.native = native and not bfloat16_products(p.dtype, p.qkv.e, p.qkv.ev)
    run.dmask = data_or_null(dmask)
    run.dm_off = NULL if dm_off is None else intp_data(dm_off)
    run.dm_rs = dm_rs
    run.dm_cs = dm_cs
    run.dm_by_block = dm_by_block
    run.block_rows = 64
    run.layout = NULL
    run.colptr = run.qrows = NULL
    run.csc_off = NULL
    if layout is not None:
        run.layout = &layout.c
        run.colptr = <const int64_t *>cnp.PyArray_DATA(colptr)
        run.qrows = <const int64_t *>cnp.PyArray_DATA(qrows)
        run.csc_off = intp_data(csc_off)
    nrb = (p.qkv.L + run.block_rows - 1) // run.block_rows
    run.bf16 = bfloat16_products(p.dtype, p.qkv.e, p.qkv.ev)
    scratch = bwd_buffers_init(&sizing, p.dtype, native and not run.bf16, run.bf16, p.qkv.e,
                               p.qkv.ev, p.block_q, p.block_k, NULL)
    if layout is not None:
        scratch += scratch_room(p.block_q * p.block_k)
    with nogil:
        run_items(delta_item, &run, p.qkv.nbatch * nrb, 1,
                  2 * p.qkv.ev * realsize if is_half(p.dtype) else 0, p.nthreads,
                  "attention backward D rows")
        run_items(grad_item, &run, ncomp * nsplit, 1, scratch, p.nthreads,
                  "attention backward tile buffers")
        if two_pass:
            run_items(dq_item, &run, p.qkv.nbatch * ((p.qkv.L + p.block_q - 1) // p.block_q),
                      1, scratch, p.nthreads, "attention backward tile buffers")


# ---- the softmax backward --------------------------------------------------------------

cdef struct SoftmaxBwdRun:
    const void *grad            # (R, N) C-contiguous, compute type
    const void *y
    void *out
    Py_ssize_t R, N, block_r
    double scale
    int dtype


cdef void softmax_bwd_rows(const SoftmaxBwdRun *run, Py_ssize_t item,
                           real *out) noexcept nogil:
    # out: the result, (R, N) like run.grad and run.y
    cdef Py_ssize_t i, j, n = run.N
    cdef Py_ssize_t r0 = item * run.block_r
    cdef Py_ssize_t r1 = r0 + run.block_r
    cdef const real *g
    cdef const real *y
    cdef real *o
    cdef real dot
    cdef real a = <real>run.scale
    if r1 > run.R:
        r1 = run.R
    for i in range(r0, r1):
        g = <const real *>run.grad + i * n
        y = <const real *>run.y + i * n
        o = out + i * n
        dot = row_dot(g, y, n)
        for j in range(n):
            o[j] = a * (y[j] * (g[j] - dot))


cdef void softmax_bwd_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef SoftmaxBwdRun *r = <SoftmaxBwdRun *>run
    if r.dtype == DT_FLOAT64:
        softmax_bwd_rows[double](r, item, <double *>r.out)
    else:
        softmax_bwd_rows[float](r, item, <float *>r.out)


def softmax_backward(grad, y, out, double scale, Py_ssize_t block_r, int nthreads):
    """out <- scale * y * (grad - rowsum(grad * y)) over the rows of C-contiguous (R, N)
    float32 or float64 arrays of one dtype (fastattn.backward validates)."""
    cdef SoftmaxBwdRun run
    run.grad = cnp.PyArray_DATA(grad)
    run.y = cnp.PyArray_DATA(y)
    run.out = cnp.PyArray_DATA(out)
    run.R = grad.shape[0]
    run.N = grad.shape[1]
    run.block_r = block_r
    run.scale = scale
    run.dtype = DT_FLOAT64 if grad.dtype.itemsize == 8 else DT_FLOAT32
    with nogil:
        run_items(softmax_bwd_item, &run, (run.R + block_r - 1) // block_r, 1, 0, nthreads,
                  "softmax backward")
