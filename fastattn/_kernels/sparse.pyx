# Block-sparse attention: the dense driver's sibling over the same tile core.
#
# The key blocks a query block visits come from a CSR layout (indptr, indices), one per
# layout head; only those tiles are computed. Work is one flat index over (batch, query
# block), the items of the parallel skeleton (parallel.pxd), handed out dynamically to the
# pool's threads (rows with many blocks, e.g. global tokens, take longer). Inside a listed tile an optional element rule decides which
# (query, key) pairs take part:
#
#   keep(i, j) = (local(i, j) or gq[i] or gk[j]) and j - i' <= clip and mask[i, j]
#   local(i, j) = lo <= j - i' <= hi  and  (j - i') % dilation == 0
#                 and (segment == 0 or i' // segment == j // segment)
#   i' = i + offset  (offset = S - L: query positions aligned bottom-right)
#
# Per tile the rule reduces to one of: nothing (tile skipped), everything (no mask), a
# column band per row (attend_tile's band), or an element mask built in per-thread
# scratch and handed to attend_tile as a bool mask.
# The call's attn_mask (the plan's MaskView, as the dense kernel reads it) comes on top:
# its block map skips tiles it rules out entirely; inside a tile it is handed to
# attend_tile beside the rule's band, or combined with the rule's element mask in scratch
# (a bool mask ANDed into the keep tile; a float mask as an additive tile, -inf where the
# rule drops a pair).
# Unmasked tiles of a query block of at least FA_PACK_MIN_ROWS float32 rows go the
# key-major way (tile.pxd's attend_tile_kmajor): the block is packed once, not every
# tile's keys, which pays with the layouts' small tiles.
# The call's plan is two objects built once in fastattn/sparse.py: the AttentionPlan of
# every kernel family (plan.pxd: operands, offsets, strides, tiles, threads) and a
# SparsePlan (the layout and the rule).
# Extra memory is one scratch block per thread (sparse_scratch): one score tile, one keep
# tile (bytes), m and l, and for float32 the packed query block and a key-major score tile.

from libc.string cimport memset
from libc.stdint cimport uint8_t, int64_t
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, scratch_room, scratch_take, DT_FLOAT64
from fastattn._kernels.plan cimport AttentionPlan, PlanData
from libc.math cimport INFINITY
from fastattn._kernels.tile cimport (
    intp_data, block_len, start_rows,
    real, finish_row, MASK_NONE, MASK_BOOL, MASK_FLOAT, BAND_ALL,
    BLOCK_SKIP, BLOCK_FULL,
    TileBuffers, tile_buffers_init, TileOperands, tile_begin_block, tile_attend,
    tile_attend_kmajor, is_half, element, narrow_rows,
)

cnp.import_array()

# The element rule (Rule), the layout (SparseLayout) and SparsePlan are declared in
# sparse.pxd, shared with the backward (backward.pyx).


cdef struct SparseRun:
    # One call: the plan every family shares, and the layout.
    const PlanData *plan
    const SparseLayout *layout


cdef inline int64_t floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t d = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        d -= 1
    return d


cdef inline int64_t clamp_band(int64_t x) noexcept nogil:
    if x > BAND_ALL:
        return BAND_ALL
    if x < -BAND_ALL:
        return -BAND_ALL
    return x


cdef int tile_rule(const Rule *rule, Py_ssize_t b, int64_t q0, int rows, int64_t k0, int cols,
                   uint8_t *keep, Py_ssize_t *band_lo, Py_ssize_t *band_hi) noexcept nogil:
    # Reduce the element rule to one tile (rows x cols at query q0, key k0).
    cdef int64_t r, c, i, ip, c_lo, c_hi, c_max, rem, seg0, kept = 0
    cdef int64_t dlo, dhi
    cdef uint8_t *krow
    cdef const uint8_t *mrow
    cdef bint plain = (rule.gq == NULL and rule.gk == NULL and rule.mask == NULL
                       and rule.dilation == 1 and rule.segment == 0)
    if plain:
        # The rule is a band in j - i': in tile coordinates c - r in [dlo, dhi].
        dhi = rule.hi if rule.hi < rule.clip else rule.clip
        dlo = rule.lo + q0 + rule.offset - k0
        dhi = dhi + q0 + rule.offset - k0
        if dhi < -(rows - 1) or dlo > cols - 1 or dhi < dlo:
            return TILE_SKIP
        band_lo[0] = clamp_band(dlo)
        band_hi[0] = clamp_band(dhi)
        return TILE_BAND

    for r in range(rows):
        krow = keep + r * cols
        memset(krow, 0, cols)
        i = q0 + r
        ip = i + rule.offset
        # clip: j - i' <= clip
        c_max = cols - 1
        if rule.clip < BAND_ALL and ip + rule.clip - k0 < c_max:
            c_max = ip + rule.clip - k0
        if c_max < 0:
            continue
        if rule.gq != NULL and rule.gq[i]:
            memset(krow, 1, c_max + 1)
        else:
            c_lo = 0 if rule.lo <= -BAND_ALL else ip + rule.lo - k0
            c_hi = c_max if rule.hi >= BAND_ALL else ip + rule.hi - k0
            if c_lo < 0:
                c_lo = 0
            if c_hi > c_max:
                c_hi = c_max
            if rule.segment > 0:
                seg0 = floordiv(ip, rule.segment) * rule.segment
                if seg0 - k0 > c_lo:
                    c_lo = seg0 - k0
                if seg0 + rule.segment - 1 - k0 < c_hi:
                    c_hi = seg0 + rule.segment - 1 - k0
            if c_lo <= c_hi:
                if rule.dilation == 1:
                    memset(krow + c_lo, 1, c_hi - c_lo + 1)
                else:
                    # first column with (k0 + c - i') % dilation == 0
                    rem = (k0 + c_lo - ip) % rule.dilation
                    if rem < 0:
                        rem += rule.dilation
                    if rem:
                        c_lo += rule.dilation - rem
                    c = c_lo
                    while c <= c_hi:
                        krow[c] = 1
                        c += rule.dilation
            if rule.gk != NULL:
                for c in range(c_max + 1):
                    krow[c] |= rule.gk[k0 + c]
        if rule.mask != NULL:
            mrow = rule.mask + rule.mask_off[b] + i * rule.mask_rs + k0 * rule.mask_cs
            for c in range(c_max + 1):
                krow[c] = krow[c] & (mrow[c * rule.mask_cs] != 0)
        for c in range(c_max + 1):
            kept += krow[c]
    if kept == 0:
        return TILE_SKIP
    if kept == <int64_t>rows * cols:
        band_lo[0] = -BAND_ALL
        band_hi[0] = BAND_ALL
        return TILE_BAND
    return TILE_MASK


cdef void sparse_rows(const PlanData *p, const SparseLayout *lay, Py_ssize_t item,
                      real *scratch) noexcept nogil:
    # One item: the rows of one query block against the key blocks its layout row lists.
    # scratch is the thread's block (sparse_scratch): the score tile, m, l, the keep tile,
    # the key-major buffers, then the TileOperands buffers.
    cdef Py_ssize_t isz = p.itemsize
    cdef real *lse = <real *>p.ops.lse
    cdef real scale = <real>p.scale
    cdef Py_ssize_t nqb = (p.qkv.L + p.block_q - 1) // p.block_q
    cdef Py_ssize_t b, qb, r, idx, row_start, row_end, kb, ldacc
    cdef Py_ssize_t q0, k0, band_lo, band_hi, c
    cdef int rows, cols, kind, state, tmask_kind
    cdef char *cursor = <char *>scratch
    cdef real *s
    cdef real *m
    cdef real *l
    cdef uint8_t *keep
    cdef real *addtile               # the combined float mask tile (float attn_mask only)
    cdef const void *mtile           # this tile's attn_mask, or NULL where it keeps all
    cdef const void *tmask           # what attend_tile gets, with its kind and strides
    cdef Py_ssize_t tmask_rs, tmask_cs
    cdef const uint8_t *mb
    cdef const real *mf
    cdef real *acc
    cdef real *kscratch
    cdef const void *kt
    cdef const void *vt
    cdef TileBuffers buf
    cdef TileOperands *ops = &buf.ops
    cdef bint half = is_half(p.dtype)
    # this item's packing state for attend_tile_kmajor (tile.pxd)
    cdef Py_ssize_t ldqt

    # the tile core's buffers, then the keep tile of the element rule (sparse_scratch)
    cursor += tile_buffers_init(&buf, p.dtype, isz, p.qkv.e, p.qkv.ev, p.block_q, p.block_k,
                                cursor)
    s = <real *>buf.s
    m = <real *>buf.m
    l = <real *>buf.l
    kscratch = <real *>buf.kscratch
    keep = <uint8_t *>scratch_take(&cursor, p.block_q * p.block_k)
    addtile = <real *>cursor if p.mask.kind == MASK_FLOAT else NULL

    qb = item % nqb
    b = item // nqb
    q0 = qb * p.block_q
    rows = block_len(p.qkv.L, q0, p.block_q)
    tile_begin_block(ops, element(p.ops.q, p.qkv.q_off[b] + q0 * p.qkv.ldq, isz), p.qkv.ldq,
                     rows)
    if half:
        acc = <real *>ops.acc32         # float32 rows, narrowed into out at the end
        ldacc = p.qkv.ev
    else:
        acc = <real *>p.ops.out + p.out_off[b] + q0 * p.ldo
        ldacc = p.ldo
    start_rows(rows, acc, ldacc, p.qkv.ev, m, l)

    row_start = lay.indptr[lay.layout_off[b] + qb]
    row_end = lay.indptr[lay.layout_off[b] + qb + 1]
    ldqt = -1 if kscratch != NULL else 0
    for idx in range(row_start, row_end):
        kb = lay.indices[idx]
        # the attn_mask's view of the tile: skipped, untouched or masked element-wise
        state = BLOCK_FULL
        if p.mask.kind != MASK_NONE:
            state = p.mask.bmap[p.mask.bmap_off[b] + qb * p.mask.bmap_rs + kb * p.mask.bmap_cs]
            if state == BLOCK_SKIP:
                continue
        k0 = kb * p.block_k
        cols = block_len(p.qkv.S, k0, p.block_k)
        kind = TILE_BAND
        band_lo = -BAND_ALL
        band_hi = BAND_ALL
        if lay.rule.active:
            kind = tile_rule(&lay.rule, b, q0, rows, k0, cols, keep, &band_lo, &band_hi)
            if kind == TILE_SKIP:
                continue
        kt = element(p.ops.k, p.qkv.k_off[b] + k0 * p.qkv.ldk, isz)
        vt = element(p.ops.v, p.qkv.v_off[b] + k0 * p.qkv.ldv, isz)
        mtile = NULL
        if state != BLOCK_FULL:
            mtile = element(p.mask.data, p.mask.off[b] + q0 * p.mask.rs + k0 * p.mask.cs,
                            1 if p.mask.kind == MASK_BOOL else sizeof(real))
        # every pair of the tile takes part: key-major
        if (kind == TILE_BAND and mtile == NULL and band_lo <= 1 - rows
                and band_hi >= cols - 1
                and tile_attend_kmajor(ops, rows, kt, p.qkv.ldk, vt, p.qkv.ldv, cols, scale,
                                       kscratch, &ldqt, NULL, acc, ldacc, m, l)):
            continue
        # the mask attend_tile applies: the rule's keep tile, the attn_mask tile (beside
        # the rule's band), or both combined in scratch
        tmask, tmask_kind, tmask_rs, tmask_cs = NULL, MASK_NONE, cols, 1
        if kind == TILE_MASK:
            tmask, tmask_kind = <const void *>keep, MASK_BOOL
            if mtile != NULL and p.mask.kind == MASK_BOOL:
                # keep <- keep and mask
                for r in range(rows):
                    mb = <const uint8_t *>mtile + r * p.mask.rs
                    for c in range(cols):
                        keep[r * cols + c] &= mb[c * p.mask.cs] != 0
            elif mtile != NULL:
                # add <- mask where the rule keeps a pair, else -inf
                for r in range(rows):
                    mf = <const real *>mtile + r * p.mask.rs
                    for c in range(cols):
                        addtile[r * cols + c] = (mf[c * p.mask.cs] if keep[r * cols + c]
                                                 else -INFINITY)
                tmask, tmask_kind = <const void *>addtile, MASK_FLOAT
        elif mtile != NULL:
            tmask, tmask_kind = mtile, p.mask.kind
            tmask_rs, tmask_cs = p.mask.rs, p.mask.cs
        tile_attend(ops, 0, rows, kt, p.qkv.ldk, vt, p.qkv.ldv, cols, scale,
                    tmask, tmask_kind, tmask_rs, tmask_cs, band_lo, band_hi, NULL, s, acc,
                    ldacc, m, l)

    for r in range(rows):
        finish_row(acc + r * ldacc, p.qkv.ev, m[r], l[r],
                   (lse + b * p.qkv.L + q0 + r) if lse != NULL else NULL)
    if half:
        narrow_rows(p.dtype, rows, p.qkv.ev, <float *>acc, ldacc,
                    <void *>element(p.ops.out, p.out_off[b] + q0 * p.ldo, isz), p.ldo)


# The item hook, and this family's one dtype dispatch: the plan's element type picks the
# specialisation of the fused-type body above (half operands compute in float32).

cdef void sparse_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef SparseRun *r = <SparseRun *>run
    if r.plan.dtype == DT_FLOAT64:
        sparse_rows[double](r.plan, r.layout, item, <double *>scratch)
    else:
        sparse_rows[float](r.plan, r.layout, item, <float *>scratch)


cdef size_t sparse_scratch(const PlanData *p) noexcept nogil:
    # One thread's scratch: the tile core's buffers (tile_buffers_init), then the keep
    # tile of the element rule, then with a float attn_mask the combined additive tile
    # (in the compute type: float64 for float64 operands, else float32).
    cdef TileBuffers sizing
    cdef size_t add = 0
    if p.mask.kind == MASK_FLOAT:
        add = scratch_room(p.block_q * p.block_k * (8 if p.dtype == DT_FLOAT64 else 4))
    return (tile_buffers_init(&sizing, p.dtype, p.itemsize, p.qkv.e, p.qkv.ev, p.block_q,
                              p.block_k, NULL)
            + scratch_room(p.block_q * p.block_k) + add)


cdef class SparsePlan:
    """The block-sparse part of a call's plan: the layout and its element rule. Private:
    built by `fastattn.block_sparse_attention` from a validated BlockLayout.

    indptr/indices are int64 (indices within [0, ceil(S / block_k)), each row's
    indices distinct); layout_off (intp, one per batch) is the start of that batch's
    indptr row set. rule is None or a dict of the element rule's prepared fields
    (see `fastattn.sparse.BlockLayout._kernel_rule`); offset (S - L) aligns query
    positions bottom-right for it.
    """

    def __init__(self, cnp.ndarray indptr, cnp.ndarray indices, cnp.ndarray layout_off,
                 object rule, *, Py_ssize_t offset):
        self.c.indptr = <const int64_t *>cnp.PyArray_DATA(indptr)
        self.c.indices = <const int64_t *>cnp.PyArray_DATA(indices)
        self.c.layout_off = intp_data(layout_off)
        self.c.rule.active = rule is not None
        self.c.rule.gq = NULL
        self.c.rule.gk = NULL
        self.c.rule.mask = NULL
        self.c.rule.mask_off = NULL
        self.c.rule.mask_rs = self.c.rule.mask_cs = 0
        self.c.rule.lo = self.c.rule.hi = self.c.rule.clip = 0
        self.c.rule.dilation = 1
        self.c.rule.segment = 0
        self.c.rule.offset = offset
        if rule is not None:
            self.c.rule.lo = rule["lo"]
            self.c.rule.hi = rule["hi"]
            self.c.rule.clip = rule["clip"]
            self.c.rule.dilation = rule["dilation"]
            self.c.rule.segment = rule["segment"]
            if rule["gq"] is not None:
                self.c.rule.gq = <const uint8_t *>cnp.PyArray_DATA(rule["gq"])
            if rule["gk"] is not None:
                self.c.rule.gk = <const uint8_t *>cnp.PyArray_DATA(rule["gk"])
            if rule["mask"] is not None:
                self.c.rule.mask = <const uint8_t *>cnp.PyArray_DATA(rule["mask"])
                self.c.rule.mask_off = intp_data(rule["mask_off"])
                self.c.rule.mask_rs = rule["mask_rs"]
                self.c.rule.mask_cs = rule["mask_cs"]
        self.arrays = (indptr, indices, layout_off, rule)


def block_sparse(AttentionPlan plan, SparsePlan layout):
    """Run the block-sparse kernel on a plan (AttentionPlan: its mask, when it has one,
    prepared with the layout's block sizes; one key split) and a layout (SparsePlan).
    Private: `fastattn.block_sparse_attention` validates every argument.

    out's (L, ev) matrices have unit column stride and do not overlap; lse is
    C-contiguous (nbatch, L) or None.
    """
    cdef SparseRun run
    cdef const PlanData *p = &plan.c
    cdef Py_ssize_t nqb = (p.qkv.L + p.block_q - 1) // p.block_q
    cdef size_t scratch = sparse_scratch(p)
    run.plan = p
    run.layout = &layout.c
    with nogil:
        run_items(sparse_item, &run, p.qkv.nbatch * nqb, 1, scratch, p.nthreads,
                  "block-sparse attention tile buffers")
