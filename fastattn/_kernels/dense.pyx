# Dense scaled dot-product attention: the FlashAttention-2 driver over the tile core.
#
# Work is one flat index over (batch, query block, key split): the items of the parallel
# skeleton (parallel.pxd), handed out dynamically to the pool's threads; a ragged batch
# (varlen attention) lists its items instead, each entry with its own lengths (plan.pxd's
# Ragged). Each item walks the key blocks of its band (the causal band and the window
# together) with `attend_tile`, skipping tiles that the band or the block map rules out;
# tiles that cross an edge of the band are taken in row slices, each over the columns its
# rows see. The score modifiers (soft-cap, ALiBi) ride along as a ScoreMods (tile.pxd).
# Then the item writes its output rows:
#   nsplit == 1: straight into `out` (and `lse`), normalised;
#   nsplit > 1 : into the partial buffers, merged afterwards by `merge_partial_row`
#                (used when batch x query blocks alone cannot keep every thread busy,
#                e.g. decoding one query against a long cache).
# Tiles with no mask and wholly inside the band go key-major (tile.pxd's
# attend_tile_kmajor) when the operands are float32 (or bfloat16 on AVX512_BF16) and the
# query block has at least 16 rows: the block is packed once for all its tiles instead of
# transposing every tile's keys.
# Extra memory is one scratch block per thread (dense_scratch): one rows x cols score
# tile plus m and l, and for float32 the packed query block and a key-major score tile.
# Dropout (plan.dropout_on): the item points its TileOperands at its own copy of the
# plan's DropoutTile and keeps that on the current tile; every tile then goes through
# tile_attend, which drops probabilities by their (batch, row, column) hash (dropout.h).

from libc.stdint cimport uint8_t
from libc.math cimport INFINITY
from libc.string cimport memcpy
cimport numpy as cnp

from fastattn._kernels.parallel cimport (
    ItemFn, run_items, scratch_room, DT_FLOAT32, DT_FLOAT64,
)
from fastattn._kernels.plan cimport AttentionPlan, PlanData

from fastattn._kernels.tile cimport (
    real, finish_row, merge_partial_row, row_fill, tile_products_native,
    TileBuffers, tile_buffers_init, TileOperands, DropoutTile, tile_begin_block, tile_attend,
    tile_attend_kmajor, tile_attend_kmajor_rows, KMAJOR_SLICE, gather_value_tile, is_half,
    element, narrow_rows,
    SplitMerge, merge_split_item, merge_split_scratch, ScoreMods, fa_mods_active,
    MASK_NONE, MASK_BOOL, BLOCK_SKIP, BLOCK_MASKED, BLOCK_FULL, BAND_ALL,
)

cnp.import_array()


def tile_products_run_natively(bint is_float32, int ev):
    """True when attend_tile computes its products without BLAS (tile.pxd)."""
    return tile_products_native(is_float32, ev)


cdef struct DenseRun:
    # One call: its plan, and the partial results of split items (nsplit > 1):
    # part_out (nbatch, L, nsplit, ev), part_lse (nbatch, L, nsplit).
    const PlanData *plan
    void *part_out
    void *part_lse
    # the key/value cache of each thread's scratch (kv_cache_bytes; 0: none), marked with
    # this call's number
    size_t kv_cache
    Py_ssize_t call


# Keys and values whose rows are spread out (a (total, H, E) packed varlen batch, a
# (B, L, H, E) array viewed as (B, H, L, E)) are copied, a whole batch entry at a time,
# into the thread's scratch, and the copy serves the thread's next items of that entry:
# items of one entry come one after the other, heaviest first. Read in place, those rows
# fall into few cache sets and every query block read them from memory again (a packed
# causal batch of 16 sequences ran 10% slower than the same data head-major). Entries
# larger than KV_CACHE_MAX bytes are copied tile by tile instead (gather_value_tile).
cdef enum:
    KV_CACHE_MAX = 4 << 20

cdef struct KvCacheHeader:
    Py_ssize_t call             # the DenseRun whose entry is cached (0: none yet)
    Py_ssize_t b

_calls = 0


cdef size_t kv_cache_bytes(const PlanData *p) noexcept nogil:
    # Bytes of one thread's key/value cache (header, then S x e keys and S x ev values in
    # the operands' own type), or 0 when the rows are next to each other or too large.
    cdef size_t n
    if p.qkv.ldk <= p.qkv.e and p.qkv.ldv <= p.qkv.ev:
        return 0
    n = (scratch_room(sizeof(KvCacheHeader))
         + scratch_room(p.qkv.S * p.qkv.e * p.itemsize)
         + scratch_room(p.qkv.S * p.qkv.ev * p.itemsize))
    return n if n <= KV_CACHE_MAX else 0


cdef void kv_cache_entry(const PlanData *p, Py_ssize_t call, Py_ssize_t b, Py_ssize_t S,
                         char *cache, const void **kbase, const void **vbase) noexcept nogil:
    # Point kbase, vbase at batch entry b's keys and values (S rows) in the cache, copying
    # them there unless the thread's last item, of this call, had the same entry.
    cdef KvCacheHeader *hdr = <KvCacheHeader *>cache
    cdef Py_ssize_t isz = p.itemsize
    cdef Py_ssize_t r
    cdef char *keys = cache + scratch_room(sizeof(KvCacheHeader))
    cdef char *values = keys + scratch_room(p.qkv.S * p.qkv.e * isz)
    kbase[0] = keys
    vbase[0] = values
    if hdr.call == call and hdr.b == b:
        return
    for r in range(S):
        memcpy(keys + r * p.qkv.e * isz,
               element(p.ops.k, p.qkv.k_off[b] + r * p.qkv.ldk, isz), p.qkv.e * isz)
        memcpy(values + r * p.qkv.ev * isz,
               element(p.ops.v, p.qkv.v_off[b] + r * p.qkv.ldv, isz), p.qkv.ev * isz)
    hdr.call = call
    hdr.b = b


cdef inline void dense_slice(const PlanData *p, TileOperands *ops, Py_ssize_t b,
                             Py_ssize_t r0, Py_ssize_t rows, Py_ssize_t c_lo, Py_ssize_t c_hi,
                             const void *kt, Py_ssize_t ldk, const void *vt, Py_ssize_t ldv,
                             const void *mtile,
                             Py_ssize_t diag, Py_ssize_t band_lo, Py_ssize_t band_hi,
                             ScoreMods *mods, DropoutTile *drop, Py_ssize_t k0, real *s,
                             real *acc, Py_ssize_t ldacc, real *m, real *l) noexcept nogil:
    # Rows r0 .. r0 + rows of the current tile (its keys at kt, vt, its mask at mtile or
    # NULL, its band and diag relative to its element (0, 0)) against its columns
    # c_lo .. c_hi, the row way (tile_attend); nothing when c_hi <= c_lo. drop: the item's
    # dropout tile (NULL: none), k0 the tile's first key.
    cdef Py_ssize_t isz = p.itemsize
    cdef const void *mslice = NULL
    if c_hi <= c_lo:
        return
    if mtile != NULL and p.mask.kind == MASK_BOOL:
        mslice = <const void *>((<const uint8_t *>mtile) + r0 * p.mask.rs + c_lo * p.mask.cs)
    elif mtile != NULL:
        mslice = <const void *>((<const real *>mtile) + r0 * p.mask.rs + c_lo * p.mask.cs)
    if mods != NULL:
        mods.diag = diag + r0 - c_lo
    if drop != NULL:
        drop.col0 = k0 + c_lo       # dropout decides by absolute column
    tile_attend(ops, <int>r0, <int>rows, element(kt, c_lo * ldk, isz), ldk,
                element(vt, c_lo * ldv, isz), ldv, <int>(c_hi - c_lo),
                <real>p.scale, mslice, p.mask.kind if mtile != NULL else MASK_NONE,
                p.mask.rs, p.mask.cs, band_lo + r0 - c_lo, band_hi + r0 - c_lo, mods, s,
                acc + r0 * ldacc, ldacc, m + r0, l + r0)


cdef void dense_rows(const PlanData *p, const DenseRun *run, Py_ssize_t item, real *s,
                     real *part_out, real *part_lse) noexcept nogil:
    # One item: the rows of one query block against one split of its key blocks.
    # s is the thread's scratch (dense_scratch): the score tile, then m, l, the
    # key-major buffers and the TileOperands buffers.
    cdef Py_ssize_t isz = p.itemsize
    cdef real *lse = <real *>p.ops.lse
    cdef Py_ssize_t L, S, off, nqb, nkb, per
    cdef Py_ssize_t t, b, qb, split, kb, kb_lo, kb_hi, r
    cdef Py_ssize_t r0, sub_rows, c_lo, c_hi
    cdef Py_ssize_t q0, k0, rows, cols, diag, band_lo, band_hi, ldacc, first, last, ldv, ldk
    cdef int state
    cdef real *m
    cdef real *l
    cdef real *acc
    cdef real *kscratch
    cdef real *lse_row
    cdef const void *mtile
    cdef const void *kt
    cdef const void *vt
    cdef TileBuffers buf
    cdef TileOperands *ops = &buf.ops
    cdef bint half = is_half(p.dtype)
    # the score modifiers of this item's tiles (NULL: none)
    cdef ScoreMods mods_buf
    cdef ScoreMods *mods = NULL
    # this item's packing state for attend_tile_kmajor (tile.pxd)
    cdef Py_ssize_t ldqt
    cdef DropoutTile drop
    cdef DropoutTile *dropping = NULL

    cdef size_t used = tile_buffers_init(&buf, p.dtype, isz, p.qkv.e, p.qkv.ev, p.block_q,
                                         p.block_k, <char *>s)
    # where this item reads its keys and values (the entry's cached copy, or in place)
    cdef const void *kbase
    cdef const void *vbase
    cdef Py_ssize_t ldk_b, ldv_b
    m = <real *>buf.m
    l = <real *>buf.l
    kscratch = <real *>buf.kscratch

    split = item % p.nsplit
    t = item // p.nsplit
    if p.ragged.items != NULL:
        # a listed item of a ragged batch: its entry's own lengths and diagonal
        b = p.ragged.items[2 * t]
        qb = p.ragged.items[2 * t + 1]
        L = p.ragged.len_q[b]
        S = p.ragged.len_k[b]
        off = S - L if p.ragged.bottom_right else p.causal_offset
    else:
        # heaviest query blocks first: with a causal band they have the most keys
        nqb = (p.qkv.L + p.block_q - 1) // p.block_q
        qb = nqb - 1 - (t % nqb)
        b = t // nqb
        L = p.qkv.L
        S = p.qkv.S
        off = p.causal_offset
    nkb = (S + p.block_k - 1) // p.block_k
    if run.kv_cache:
        kv_cache_entry(p, run.call, b, S, <char *>s + used, &kbase, &vbase)
        ldk_b = p.qkv.e
        ldv_b = p.qkv.ev
    else:
        kbase = element(p.ops.k, p.qkv.k_off[b], isz)
        vbase = element(p.ops.v, p.qkv.v_off[b], isz)
        ldk_b = p.qkv.ldk
        ldv_b = p.qkv.ldv
    q0 = qb * p.block_q
    rows = L - q0
    if rows > p.block_q:
        rows = p.block_q
    tile_begin_block(ops, element(p.ops.q, p.qkv.q_off[b] + q0 * p.qkv.ldq, isz), p.qkv.ldq,
                     <int>rows)
    if p.dropout_on:
        drop = p.dropout
        drop.batch = b
        drop.row0 = q0
        ops.dropout = &drop
        dropping = &drop

    # the key blocks some row of this block sees (the band: causal and window), then this
    # split's share of them
    kb_lo = 0
    kb_hi = nkb
    if p.banded:
        if p.band_right < BAND_ALL:
            last = q0 + rows - 1 + off + p.band_right     # the last row's last key
            if last < 0:
                kb_hi = 0
            elif last // p.block_k + 1 < kb_hi:
                kb_hi = last // p.block_k + 1
        if p.band_left < BAND_ALL:
            first = q0 + off - p.band_left                # the first row's first key
            if first > 0:
                kb_lo = first // p.block_k
    per = (kb_hi - kb_lo + p.nsplit - 1) // p.nsplit if kb_hi > kb_lo else 0
    kb_lo = kb_lo + split * per
    if kb_hi > kb_lo + per:
        kb_hi = kb_lo + per

    if p.softcap > 0 or p.slopes != NULL:
        mods_buf.softcap = p.softcap
        mods_buf.slope = p.slopes[b] if p.slopes != NULL else 0
        mods_buf.diag = 0
        if fa_mods_active(&mods_buf):
            mods = &mods_buf

    if p.nsplit > 1:
        acc = part_out + ((b * p.qkv.L + q0) * p.nsplit + split) * p.qkv.ev
        ldacc = p.nsplit * p.qkv.ev
    elif half:
        acc = <real *>ops.acc32     # float32 rows, narrowed into out at the end
        ldacc = p.qkv.ev
    else:
        acc = <real *>p.ops.out + p.out_off[b] + q0 * p.ldo
        ldacc = p.ldo
    for r in range(rows):
        row_fill(acc + r * ldacc, p.qkv.ev, 0)
        m[r] = -INFINITY
        l[r] = 0

    ldqt = -1 if kscratch != NULL else 0
    for kb in range(kb_lo, kb_hi):
        state = BLOCK_FULL if p.mask.kind == MASK_NONE else BLOCK_MASKED
        if p.mask.bmap != NULL:
            state = p.mask.bmap[p.mask.bmap_off[b] + qb * p.mask.bmap_rs + kb * p.mask.bmap_cs]
            if state == BLOCK_SKIP:
                continue
        k0 = kb * p.block_k
        cols = S - k0
        if cols > p.block_k:
            cols = p.block_k
        # row r of the tile sees its columns band_lo + r .. band_hi + r
        diag = q0 + off - k0
        band_lo = diag - p.band_left if p.band_left < BAND_ALL else -BAND_ALL
        band_hi = diag + p.band_right if p.band_right < BAND_ALL else BAND_ALL
        if cols > band_hi + rows:
            cols = band_hi + rows       # keys past the band's right edge: not computed
        kt = gather_value_tile(element(kbase, k0 * ldk_b, isz), ldk_b, <int>cols, p.qkv.e,
                               isz, buf.ktile)
        ldk = p.qkv.e if kt == buf.ktile else ldk_b
        vt = gather_value_tile(element(vbase, k0 * ldv_b, isz), ldv_b, <int>cols, p.qkv.ev,
                               isz, buf.vtile)
        ldv = p.qkv.ev if vt == buf.vtile else ldv_b
        mtile = NULL
        if state != BLOCK_FULL:
            if p.mask.kind == MASK_BOOL:
                mtile = <const void *>((<const uint8_t *>p.mask.data) + p.mask.off[b]
                                       + q0 * p.mask.rs + k0 * p.mask.cs)
            else:
                mtile = <const void *>((<const real *>p.mask.data) + p.mask.off[b]
                                       + q0 * p.mask.rs + k0 * p.mask.cs)
        if band_lo <= 1 - rows and band_hi >= cols - 1:
            # every row sees every column: no mask, key-major
            if mods != NULL:
                mods.diag = diag
            if mtile == NULL and tile_attend_kmajor(
                    ops, <int>rows, kt, ldk, vt, ldv, <int>cols,
                    <real>p.scale, kscratch, &ldqt, mods, acc, ldacc, m, l):
                continue
            if dropping != NULL:
                drop.col0 = k0
            tile_attend(ops, 0, <int>rows, kt, ldk, vt, ldv, <int>cols,
                        <real>p.scale, mtile, p.mask.kind if mtile != NULL else MASK_NONE,
                        p.mask.rs, p.mask.cs, band_lo, band_hi, mods, s, acc, ldacc, m, l)
            continue
        # The tile crosses an edge of the band (the causal diagonal, a window's edges):
        # take it in row slices (KMAJOR_SLICE rows), each over the columns its rows see,
        # so little outside the band is computed: key-major with the band applied in its
        # max pass, or (a mask, a slice too small, a score not finite) the row way.
        r0 = 0
        while r0 < rows:
            sub_rows = rows - r0
            if sub_rows > KMAJOR_SLICE:
                sub_rows = KMAJOR_SLICE
            c_lo = band_lo + r0
            if c_lo < 0:
                c_lo = 0
            c_hi = band_hi + r0 + sub_rows
            if c_hi > cols:
                c_hi = cols
            if c_hi > c_lo:
                if mods != NULL:
                    mods.diag = diag + r0 - c_lo
                if mtile == NULL and tile_attend_kmajor_rows(
                        ops, <int>rows, <int>r0, <int>sub_rows,
                        element(kt, c_lo * ldk, isz), ldk,
                        element(vt, c_lo * ldv, isz), ldv, <int>(c_hi - c_lo),
                        <real>p.scale, kscratch, &ldqt, mods, band_lo + r0 - c_lo,
                        band_hi + r0 - c_lo, acc + r0 * ldacc, ldacc, m + r0, l + r0):
                    r0 = r0 + KMAJOR_SLICE
                    continue
                dense_slice(p, ops, b, r0, sub_rows, c_lo, c_hi, kt, ldk, vt, ldv, mtile, diag,
                            band_lo, band_hi, mods, dropping, k0, s, acc, ldacc, m, l)
            r0 = r0 + KMAJOR_SLICE

    for r in range(rows):
        if p.nsplit > 1:
            lse_row = part_lse + (b * p.qkv.L + q0 + r) * p.nsplit + split
        elif lse == NULL:
            lse_row = NULL
        elif p.ragged.items != NULL:
            lse_row = lse + p.ragged.lse_off[b] + q0 + r
        else:
            lse_row = lse + b * p.qkv.L + q0 + r
        finish_row(acc + r * ldacc, p.qkv.ev, m[r], l[r], lse_row)
    if half and p.nsplit == 1:
        narrow_rows(p.dtype, <int>rows, p.qkv.ev, <float *>acc, ldacc,
                    <void *>element(p.ops.out, p.out_off[b] + q0 * p.ldo, isz), p.ldo)


# The item hook, and this family's one dtype dispatch: the plan's element type picks
# the specialisation of the fused-type body above (half operands compute in float32).

cdef void dense_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef DenseRun *r = <DenseRun *>run
    if r.plan.dtype == DT_FLOAT64:
        dense_rows[double](r.plan, r, item, <double *>scratch, <double *>r.part_out,
                           <double *>r.part_lse)
    else:
        dense_rows[float](r.plan, r, item, <float *>scratch, <float *>r.part_out,
                          <float *>r.part_lse)


def sdpa(AttentionPlan plan):
    """Run the dense kernel on a plan (fastattn._layout.attention_plan). Private:
    `fastattn.attention` validates every argument.

    out's (L, ev) matrices have unit column stride and do not overlap; lse is
    C-contiguous (nbatch, L) or None.
    """
    cdef DenseRun run
    cdef const PlanData *p = &plan.c
    # compute type: float64 for float64 operands, float32 for the others
    cdef int compute = cnp.NPY_FLOAT64 if p.dtype == DT_FLOAT64 else cnp.NPY_FLOAT32
    cdef Py_ssize_t nqb = (p.qkv.L + p.block_q - 1) // p.block_q
    cdef Py_ssize_t nitems = (p.ragged.nitems if p.ragged.items != NULL
                              else p.qkv.nbatch * nqb * p.nsplit)
    cdef Py_ssize_t nrows = p.qkv.nbatch * p.qkv.L
    cdef cnp.ndarray part_out = None, part_lse = None
    cdef TileBuffers sizing
    cdef size_t scratch = tile_buffers_init(&sizing, p.dtype, p.itemsize, p.qkv.e, p.qkv.ev,
                                            p.block_q, p.block_k, NULL)
    cdef SplitMerge merge
    global _calls
    _calls += 1
    run.plan = p
    run.part_out = run.part_lse = NULL
    run.call = _calls
    # only when a thread's items revisit entries: several query blocks per entry, keys
    # not split (a decoding step reads each entry's keys once: a copy would double that)
    run.kv_cache = 0
    if p.nsplit == 1 and (p.ragged.items != NULL or p.qkv.L > p.block_q):
        run.kv_cache = kv_cache_bytes(p)
    scratch += run.kv_cache
    if p.nsplit > 1:
        part_out = cnp.PyArray_EMPTY(1, [nrows * p.nsplit * p.qkv.ev], compute, 0)
        part_lse = cnp.PyArray_EMPTY(1, [nrows * p.nsplit], compute, 0)
        run.part_out = cnp.PyArray_DATA(part_out)
        run.part_lse = cnp.PyArray_DATA(part_lse)
        # part_out is (nbatch * L, nsplit, ev): a row's parts next to each other
        merge.part_out = run.part_out
        merge.part_lse = run.part_lse
        merge.nsplit = p.nsplit
        merge.row_step = p.nsplit * p.qkv.ev
        merge.part_stride = p.qkv.ev
        merge.ev = p.qkv.ev
        merge.out = p.ops.out
        merge.out_off = p.out_off
        merge.rows_per_batch = p.qkv.L
        merge.ldo = p.ldo
        merge.lse = p.ops.lse
        merge.dtype = p.dtype
        merge.itemsize = p.itemsize
    with nogil:
        run_items(dense_item, &run, nitems, 1, scratch, p.nthreads,
                  "dense attention tile buffers")
        if p.nsplit > 1:
            run_items(merge_split_item, &merge, nrows, 64, merge_split_scratch(&merge),
                      p.nthreads, "dense attention merge row")
