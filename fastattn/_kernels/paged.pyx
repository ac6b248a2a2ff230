# Paged attention: a few new query rows per sequence against a paged KV cache.
#
# The cache is two pools of fixed-size blocks, (num_blocks, H_kv, block_size, E) and
# (..., Ev); sequence b owns the blocks table[b, :ceil(len_b / block_size)] in order.
# Blocks are read where they are: nothing is gathered into a contiguous copy.
#
# The same split-KV core serves scaled_dot_product_attention's decode shapes (few query
# rows per kv-head, many keys) on keys and values that are not paged: without a table
# (table NULL), the rows of (sequence b, kv-head h) start at k_off[b * nkv + h] /
# v_off[...] and "block" kb is simply rows kb * block_size .. of them (block_at); such
# calls may also carry an attention mask (MaskView, applied per row with the tile core's
# mask_row_max) and a diagonal that is not bottom-right (diag_shift).
#
# One work item is (sequence, head group, row tile, key split). Its rows are, for each
# kv-head of the group, a tile of the G*T query rows that share that kv-head (G = H / H_kv
# query heads, T new tokens each), so every key/value block is read once for all of them.
# When a kv-head has few rows (decoding), a group holds several kv-heads: a block stores
# its heads next to each other, so the item then reads each block's keys (and values) as
# one contiguous run instead of one short piece per kv-head, which streams faster
# (measured in paged.py). Each product prefetches the piece `prefetch` pieces ahead in
# the item's read order (piece_at), spread over its loop.
# The item walks its key blocks in chunks:
#   s   <- scale * q @ k_chunk.T       (per block and kv-head: small-GEMM loops or BLAS)
#   online softmax of each row over its visible columns               (tile core)
#   acc <- acc + p @ v_chunk           (per block and kv-head)
# then writes its rows:
#   nsplit == 1: straight into `out` (and `lse`), normalised;
#   nsplit > 1 : into partial buffers merged by their log-sum-exp (flash-decoding), used
#                when the items alone cannot keep every thread busy.
# The items are those of the parallel skeleton (parallel.pxd), handed out dynamically to
# the pool's threads; the merge is a second run over the output rows. Extra memory is
# one scratch block per thread (paged_scratch): one rows x chunk score tile plus m and l.
#
# Half-precision pools (float16, bfloat16) are read as they are: each piece the products
# read is widened into the compute type in the thread's scratch (widen_rows) right before
# its product, so a call reads half the bytes of a float32 cache (decoding is bound by
# those reads) and never converts the pools. The query, scores, softmax, partial buffers
# and lse are in the compute type (float32 unless the query makes it float64); a half
# result is accumulated in float32 scratch and narrowed into `out` (narrow_rows).

from libc.math cimport INFINITY
from libc.stdint cimport uint8_t
cimport numpy as cnp

from fastattn._kernels.parallel cimport run_items, scratch_room, scratch_take, DT_FLOAT64
from fastattn._kernels.tile cimport (
    intp_data, MaskView, mask_view, MASK_NONE, MASK_BOOL,
    real, gemm_abt, gemm_ab, ScoreMods, fa_mods_active, row_mods, BAND_ALL,
    row_max, mask_row_max, row_fill, online_softmax_row, finish_row,
    is_half, element, widen_rows, narrow_rows, SplitMerge, merge_split_item, merge_split_scratch,
)
from fastattn._kernels.smallgemm cimport gemm_abt_small, gemm_ab_acc_small, fa_prefetch
from fastattn._kernels.parallel import dtype_code

cnp.import_array()


cdef struct PagedProblem:
    # operands: q (B, H, T, E) and out (B, H, T, Ev) C-contiguous, the two pools,
    # lse (B, H, T) or NULL
    const void *q
    const void *kpool
    const void *vpool
    void *out
    void *lse
    # element types (parallel.DType): dtype, the compute type (float32 or float64) of q,
    # lse and the partial buffers; each pool's, the compute type or a half type (widened
    # piece by piece); out's, the compute type or (with float32) a half type (narrowed)
    int dtype, kdtype, vdtype, odtype
    Py_ssize_t kisz, visz, oisz          # the pools' and out's itemsizes
    double scale
    # sizes: R = group * T query rows per (sequence, kv-head)
    Py_ssize_t nbatch, nkv, group, T, R
    int e, ev, block_size
    # pools: strides per block, per head and per row in their own elements (unit column
    # stride)
    Py_ssize_t k_bs, k_hs, ldk, v_bs, v_hs, ldv
    # block table (nbatch rows of table_ld entries) and lengths, validated by the caller;
    # table NULL: keys and values not paged, (sequence b, kv-head h)'s rows start at
    # k_off[b * nkv + h] / v_off[b * nkv + h] (block_at), blocks k_bs / v_bs elements apart
    const Py_ssize_t *table
    Py_ssize_t table_ld
    const Py_ssize_t *lens
    const Py_ssize_t *k_off
    const Py_ssize_t *v_off
    # causal: row t of T sees keys j < len - T + 1 + t + diag_shift (bottom-right aligned
    # when diag_shift == 0); the band (causal and window together): row t, at key position
    # pos = len - T + t + diag_shift, sees keys pos - band_left <= j <= pos + band_right
    # (BAND_ALL: unbounded side)
    bint causal
    Py_ssize_t diag_shift
    Py_ssize_t band_left, band_right
    # an attention mask (kind MASK_NONE: none; no block map): query batch entry
    # (b * nkv + h) * group + g, token t, key j reads off[entry] + t * rs + j * cs
    MaskView mask
    # score modifiers (tile.pxd's ScoreMods): softcap > 0 soft-caps; slopes (NULL: none)
    # the ALiBi slope of each (sequence, query head), nbatch * nkv * group of them
    double softcap
    const double *slopes
    # tiling: a tile is tile_heads kv-heads x row_tile of each one's R rows (row_tile == R
    # when tile_heads > 1); chunk_blocks key blocks per online-softmax update
    int tile_heads, row_tile, chunk_blocks, nsplit, nthreads
    bint use_blas
    # software prefetch distance in pieces (one kv-head of one block; 0: none)
    int prefetch


cdef struct PagedRun:
    # One call: its problem, and the partial results of split items (nsplit > 1):
    # part_out (nsplit, nrows, ev), part_lse (nrows, nsplit).
    const PagedProblem *p
    void *part_out
    void *part_lse


cdef inline Py_ssize_t visible_keys(const PagedProblem *p, Py_ssize_t length,
                                    Py_ssize_t r, Py_ssize_t *first) noexcept nogil:
    # The keys query row r (of the R rows of a group) sees: first[0] .. the returned end
    # (exclusive; empty when end <= first[0]).
    cdef Py_ssize_t pos = length - p.T + r % p.T + p.diag_shift
    cdef Py_ssize_t end = length
    first[0] = 0
    if p.band_right < BAND_ALL and pos + p.band_right + 1 < end:
        end = pos + p.band_right + 1
    if p.band_left < BAND_ALL and pos - p.band_left > 0:
        first[0] = pos - p.band_left
    return end if end > 0 else 0


cdef inline const void *block_at(const PagedProblem *p, bint values, Py_ssize_t b,
                                 Py_ssize_t h, Py_ssize_t kb) noexcept nogil:
    # Where kv-head h of sequence b's key block kb starts (its values' with `values`):
    # through the block table, or (table NULL) at a fixed stride from the sequence and
    # kv-head's first row.
    if values:
        if p.table != NULL:
            return element(p.vpool, p.table[b * p.table_ld + kb] * p.v_bs + h * p.v_hs,
                           p.visz)
        return element(p.vpool, p.v_off[b * p.nkv + h] + kb * p.v_bs, p.visz)
    if p.table != NULL:
        return element(p.kpool, p.table[b * p.table_ld + kb] * p.k_bs + h * p.k_hs, p.kisz)
    return element(p.kpool, p.k_off[b * p.nkv + h] + kb * p.k_bs, p.kisz)


cdef inline const void *piece_at(const PagedProblem *p, Py_ssize_t b, Py_ssize_t h0,
                                 Py_ssize_t nh, Py_ssize_t piece, Py_ssize_t kb_lo,
                                 Py_ssize_t kb_hi, Py_ssize_t *nbytes) noexcept nogil:
    # Start and size in bytes (the pools' own elements) of piece number `piece` of an
    # item's reads, in the order it reads them: chunk by chunk, the keys of the chunk's
    # blocks (block by block, each block's nh kv-heads in memory order), then their
    # values. A piece is one kv-head of one block. NULL past the item's last block.
    cdef Py_ssize_t per = 2 * p.chunk_blocks * nh
    cdef Py_ssize_t start = kb_lo + piece // per * p.chunk_blocks
    cdef Py_ssize_t within = piece % per
    cdef Py_ssize_t n = kb_hi - start
    if n > p.chunk_blocks:
        n = p.chunk_blocks
    if n <= 0 or within >= 2 * n * nh:
        return NULL
    if within < n * nh:
        nbytes[0] = ((p.block_size - 1) * p.ldk + p.e) * p.kisz
        return block_at(p, False, b, h0 + within % nh, start + within // nh)
    within = within - n * nh
    nbytes[0] = ((p.block_size - 1) * p.ldv + p.ev) * p.visz
    return block_at(p, True, b, h0 + within % nh, start + within // nh)


cdef void paged_rows(const PagedProblem *p, Py_ssize_t item, real *scratch, real *part_out,
                     real *part_lse) noexcept nogil:
    # One item: the rows of one tile against one split of its sequence's key blocks.
    # scratch is the thread's block (paged_scratch): the score tile, m and l, then a
    # piece widened from a half pool, then the float32 accumulator of a half result.
    cdef const real *q = <const real *>p.q
    cdef real *lse = <real *>p.lse
    cdef bint khalf = is_half(p.kdtype)
    cdef bint vhalf = is_half(p.vdtype)
    cdef bint ohalf = is_half(p.odtype)
    cdef real scale = <real>p.scale
    cdef Py_ssize_t ntiles = (p.R + p.row_tile - 1) // p.row_tile
    cdef Py_ssize_t ngroups = (p.nkv + p.tile_heads - 1) // p.tile_heads
    cdef Py_ssize_t chunk = <Py_ssize_t>p.chunk_blocks * p.block_size
    cdef Py_ssize_t bs = p.block_size
    cdef Py_ssize_t tile_rows = <Py_ssize_t>p.tile_heads * p.row_tile
    cdef Py_ssize_t nrows = p.nbatch * p.nkv * p.R
    cdef Py_ssize_t t, b, h0, nh, hh, tile, split, r, r0, rows, row0, ldacc, acc_step
    cdef Py_ssize_t length, hi, nblk, per, kb_lo, kb_hi, c_lo, c_hi, kb, k0, ncols, cols, vis
    cdef Py_ssize_t lo, first, blk_lo
    cdef Py_ssize_t off, piece, cn, cl, pf_bytes, ldk, ldv, entry, moff
    cdef real s_max
    cdef const void *mrow
    cdef bint any_row
    cdef char *cursor = <char *>scratch
    cdef real *s
    cdef real *m
    cdef real *l
    cdef real *wide = NULL
    cdef real *acc
    cdef real *srow
    cdef real *lse_row
    cdef const real *qt
    cdef const void *piece_ptr
    cdef const real *kb_ptr
    cdef const real *vb_ptr
    cdef const void *pf
    # the score modifiers of the current row (NULL: none)
    cdef ScoreMods mods_buf
    cdef ScoreMods *mods = NULL

    s = <real *>scratch_take(&cursor, tile_rows * chunk * sizeof(real))
    m = <real *>scratch_take(&cursor, tile_rows * sizeof(real))
    l = <real *>scratch_take(&cursor, tile_rows * sizeof(real))
    if khalf or vhalf:
        wide = <real *>scratch_take(&cursor, bs * (p.e if p.e > p.ev else p.ev) * sizeof(real))
    pf_bytes = 0

    split = item % p.nsplit
    t = item // p.nsplit
    tile = t % ntiles
    t = t // ntiles
    h0 = (t % ngroups) * p.tile_heads
    b = t // ngroups
    nh = p.nkv - h0
    if nh > p.tile_heads:
        nh = p.tile_heads
    r0 = tile * p.row_tile
    rows = p.R - r0
    if rows > p.row_tile:
        rows = p.row_tile
    # kv-head h0 + hh owns the rows (b * nkv + h0 + hh) * R + r0 + [0, rows) of
    # out's (B, H, T) order: query head (h0 + hh) * G + g, token t
    row0 = (b * p.nkv + h0) * p.R + r0
    # split s accumulates into its own copy of out, part_out[s] (rows next to
    # each other: rows nsplit * ev apart would share cache sets); a half out into
    # float32 scratch, narrowed at the end
    ldacc = p.ev
    acc_step = p.R * ldacc          # from one kv-head's rows to the next's
    if p.nsplit > 1:
        acc = part_out + (split * nrows + row0) * p.ev
    elif ohalf:
        acc = <real *>scratch_take(&cursor, tile_rows * p.ev * sizeof(real))
        acc_step = rows * ldacc
    else:
        acc = <real *>p.out + row0 * p.ev

    # keys any row of the tile sees: [lo, hi); this split's blocks of them
    length = p.lens[b]
    hi = 0
    lo = length
    for r in range(r0, r0 + rows):
        vis = visible_keys(p, length, r, &first)
        if vis > first:
            if vis > hi:
                hi = vis
            if first < lo:
                lo = first
    nblk = (hi + bs - 1) // bs
    blk_lo = lo // bs if lo < hi else nblk
    per = (nblk - blk_lo + p.nsplit - 1) // p.nsplit
    kb_lo = blk_lo + split * per
    kb_hi = kb_lo + per
    if kb_hi > nblk:
        kb_hi = nblk
    if p.softcap > 0 or p.slopes != NULL:
        mods_buf.softcap = p.softcap
        mods_buf.slope = 0
        mods = &mods_buf

    for hh in range(nh):
        for r in range(rows):
            row_fill(acc + hh * acc_step + r * ldacc, p.ev, 0)
            m[hh * rows + r] = -INFINITY
            l[hh * rows + r] = 0
    # the first p.prefetch pieces; each product below prefetches the piece
    # that far ahead of its own
    for piece in range(p.prefetch):
        pf = piece_at(p, b, h0, nh, piece, kb_lo, kb_hi, &pf_bytes)
        if pf == NULL:
            break
        fa_prefetch(pf, pf_bytes)

    c_lo = kb_lo
    while c_lo < kb_hi:
        c_hi = c_lo + p.chunk_blocks
        if c_hi > kb_hi:
            c_hi = kb_hi
        k0 = c_lo * bs
        ncols = c_hi * bs
        if ncols > hi:
            ncols = hi
        ncols = ncols - k0
        # pieces before this chunk's, and in its keys (see piece_at)
        cn = (c_lo - kb_lo) // p.chunk_blocks * 2 * p.chunk_blocks * nh
        cl = (c_hi - c_lo) * nh

        # s[hh, :, chunk] <- scale * q_hh @ k_chunk.T, block by block, each
        # block's kv-heads in memory order
        for kb in range(c_lo, c_hi):
            off = (kb - c_lo) * bs
            cols = ncols - off
            if cols > bs:
                cols = bs
            for hh in range(nh):
                piece_ptr = block_at(p, False, b, h0 + hh, kb)
                kb_ptr = <const real *>piece_ptr
                ldk = p.ldk
                if khalf:
                    widen_rows(p.kdtype, <int>cols, p.e, piece_ptr, p.ldk, wide, p.e)
                    kb_ptr = wide
                    ldk = p.e
                qt = q + (row0 + hh * p.R) * p.e
                srow = s + hh * rows * chunk + off
                pf = NULL
                if p.prefetch:
                    pf = piece_at(p, b, h0, nh, cn + (kb - c_lo) * nh + hh + p.prefetch,
                                  kb_lo, kb_hi, &pf_bytes)
                if p.use_blas:
                    if pf != NULL:
                        fa_prefetch(pf, pf_bytes)
                    gemm_abt(<int>rows, <int>cols, p.e, scale, qt, p.e, kb_ptr,
                             <int>ldk, 0, srow, <int>chunk)
                else:
                    gemm_abt_small(rows, cols, p.e, scale, qt, p.e, kb_ptr, ldk,
                                   srow, chunk, pf, pf_bytes)

        # fold each row's visible columns into its online softmax;
        # s then holds the probabilities (0 where not visible)
        any_row = False
        for hh in range(nh):
            for r in range(rows):
                srow = s + (hh * rows + r) * chunk
                vis = visible_keys(p, length, r0 + r, &first) - k0
                first = first - k0
                if first < 0:
                    first = 0
                if vis > ncols:
                    vis = ncols
                if vis <= first:
                    row_fill(srow, ncols, 0)
                    continue
                # query batch entry (b * nkv + h0 + hh) * G + (r0 + r) // T, token
                # (r0 + r) % T, at key position length - T + (r0 + r) % T + diag_shift
                entry = (b * p.nkv + h0 + hh) * p.group + (r0 + r) // p.T
                if mods != NULL:
                    # d of column first
                    if p.slopes != NULL:
                        mods.slope = p.slopes[entry]
                    mods.diag = (length - p.T + (r0 + r) % p.T + p.diag_shift
                                 - k0 - first)
                    if fa_mods_active(mods):
                        row_mods(mods, srow + first, vis - first, mods.diag)
                if p.mask.kind == MASK_NONE:
                    s_max = row_max(srow + first, vis - first)
                else:
                    moff = (p.mask.off[entry] + ((r0 + r) % p.T) * p.mask.rs
                            + (k0 + first) * p.mask.cs)
                    if p.mask.kind == MASK_BOOL:
                        mrow = <const void *>((<const uint8_t *>p.mask.data) + moff)
                    else:
                        mrow = <const void *>((<const real *>p.mask.data) + moff)
                    s_max = mask_row_max(srow + first, vis - first, mrow, p.mask.kind,
                                         p.mask.cs)
                if online_softmax_row(srow, first, vis, ncols, s_max,
                                      m + hh * rows + r, l + hh * rows + r,
                                      acc + hh * acc_step + r * ldacc, p.ev):
                    any_row = True

        # acc_hh <- acc_hh + p_hh @ v_chunk, block by block
        if any_row:
            for kb in range(c_lo, c_hi):
                off = (kb - c_lo) * bs
                cols = ncols - off
                if cols > bs:
                    cols = bs
                for hh in range(nh):
                    piece_ptr = block_at(p, True, b, h0 + hh, kb)
                    vb_ptr = <const real *>piece_ptr
                    ldv = p.ldv
                    if vhalf:
                        widen_rows(p.vdtype, <int>cols, p.ev, piece_ptr, p.ldv, wide, p.ev)
                        vb_ptr = wide
                        ldv = p.ev
                    srow = s + hh * rows * chunk + off
                    pf = NULL
                    if p.prefetch:
                        pf = piece_at(p, b, h0, nh,
                                      cn + cl + (kb - c_lo) * nh + hh + p.prefetch,
                                      kb_lo, kb_hi, &pf_bytes)
                    if p.use_blas:
                        if pf != NULL:
                            fa_prefetch(pf, pf_bytes)
                        gemm_ab(<int>rows, p.ev, <int>cols, 1, srow, <int>chunk,
                                vb_ptr, <int>ldv, 1, acc + hh * acc_step,
                                <int>ldacc)
                    else:
                        gemm_ab_acc_small(rows, p.ev, cols, srow, chunk, vb_ptr,
                                          ldv, acc + hh * acc_step, ldacc,
                                          pf, pf_bytes)
        c_lo = c_hi

    for hh in range(nh):
        for r in range(rows):
            if p.nsplit == 1:
                lse_row = (lse + row0 + hh * p.R + r) if lse != NULL else NULL
            else:
                lse_row = part_lse + (row0 + hh * p.R + r) * p.nsplit + split
            finish_row(acc + hh * acc_step + r * ldacc, p.ev, m[hh * rows + r],
                       l[hh * rows + r], lse_row)
    if real is float:
        if ohalf and p.nsplit == 1:
            for hh in range(nh):
                narrow_rows(p.odtype, <int>rows, p.ev, acc + hh * acc_step, ldacc,
                            <void *>element(p.out, (row0 + hh * p.R) * p.ev, p.oisz), p.ev)


# The item hook, and this family's one dtype dispatch: the compute type picks the
# specialisation of the fused-type body above (half pools and outputs: float).

cdef void paged_item(void *run, Py_ssize_t item, void *scratch) noexcept nogil:
    cdef PagedRun *r = <PagedRun *>run
    if r.p.dtype == DT_FLOAT64:
        paged_rows[double](r.p, item, <double *>scratch, <double *>r.part_out,
                           <double *>r.part_lse)
    else:
        paged_rows[float](r.p, item, <float *>scratch, <float *>r.part_out,
                          <float *>r.part_lse)


cdef size_t paged_scratch(const PagedProblem *p, size_t itemsize) noexcept nogil:
    # One thread's scratch (itemsize: the compute type's): the score tile of
    # tile_heads * row_tile rows x one chunk of keys, m and l, then one piece (a
    # kv-head of a block) widened from a half pool, then a half result's float32 rows.
    cdef size_t tile_rows = <size_t>p.tile_heads * p.row_tile
    cdef size_t n = (scratch_room(tile_rows * p.chunk_blocks * p.block_size * itemsize)
                     + 2 * scratch_room(tile_rows * itemsize))
    if is_half(p.kdtype) or is_half(p.vdtype):
        n += scratch_room(<size_t>p.block_size * (p.e if p.e > p.ev else p.ev) * itemsize)
    if is_half(p.odtype):
        n += scratch_room(tile_rows * p.ev * itemsize)
    return n


cdef class PagedPlan:
    """The plan of one paged_attention call. Private: built by `fastattn.paged_attention`
    from validated arguments.

    q is C-contiguous (B, H, T, E) in the compute type (float32 or float64);
    key_blocks / value_blocks are (N, H_kv, block_size, E / Ev) with unit last stride and
    element-multiple strides, each in the compute type or float16 / bfloat16. table is
    C-contiguous intp (B, max_blocks) whose entries below ceil(visible length /
    block_size) are valid block ids; lens is intp (B,). out is C-contiguous (B, H, T, Ev)
    in the compute type or, with float32, a half type; lse is (B, H, T) in the compute
    type or None. A tile is tile_heads kv-heads x row_tile rows of each (row_tile == G * T
    when tile_heads > 1).

    Keys and values that are not paged (scaled_dot_product_attention's decode path):
    ``rows=(k_off, v_off, ldk, ldv, block_size)``, table None; key_blocks / value_blocks
    are then the base arrays of the keys and values (unit last stride), kv-head h of
    sequence b having its rows at k_off[b * nkv + h] (intp, nbatch * nkv of them) with
    row stride ldk, cut into blocks of block_size rows (likewise the values); lens (B,)
    gives each sequence's length. ``mask``: None or a ``fastattn._layout.MaskOperand``
    (a float mask in the compute type; offsets one per query batch entry, B * H of
    them); ``diag_shift``: added to each row's key position (0: bottom-right aligned).
    """
    cdef PagedProblem c
    cdef readonly object arrays     # everything the pointers in c point into

    def __init__(self, cnp.ndarray q, cnp.ndarray key_blocks, cnp.ndarray value_blocks,
                 object table, cnp.ndarray lens, cnp.ndarray out, object lse, *,
                 Py_ssize_t nkv, Py_ssize_t T, double scale, bint causal, int tile_heads,
                 int row_tile, int chunk_blocks, int nsplit, bint use_blas, int prefetch,
                 int nthreads, window=None, double softcap=0.0, slopes=None, rows=None,
                 mask=None, Py_ssize_t diag_shift=0):
        cdef PagedProblem *p = &self.c
        cdef Py_ssize_t kitem = key_blocks.itemsize
        cdef Py_ssize_t vitem = value_blocks.itemsize
        p.q = cnp.PyArray_DATA(q)
        p.kpool = cnp.PyArray_DATA(key_blocks)
        p.vpool = cnp.PyArray_DATA(value_blocks)
        p.out = cnp.PyArray_DATA(out)
        p.lse = NULL if lse is None else cnp.PyArray_DATA(<cnp.ndarray>lse)
        p.dtype = dtype_code(q.dtype)
        p.kdtype = dtype_code(key_blocks.dtype)
        p.vdtype = dtype_code(value_blocks.dtype)
        p.odtype = dtype_code(out.dtype)
        p.kisz = kitem
        p.visz = vitem
        p.oisz = out.itemsize
        p.scale = scale
        p.nbatch = q.shape[0]
        p.nkv = nkv
        p.group = q.shape[1] // nkv
        p.T = T
        p.R = p.group * T
        p.e = <int>q.shape[3]
        p.ev = <int>value_blocks.shape[value_blocks.ndim - 1]
        p.lens = intp_data(lens)
        p.k_off = p.v_off = NULL
        if rows is None:
            p.block_size = <int>key_blocks.shape[2]
            p.k_bs = key_blocks.strides[0] // kitem
            p.k_hs = key_blocks.strides[1] // kitem
            p.ldk = key_blocks.strides[2] // kitem
            p.v_bs = value_blocks.strides[0] // vitem
            p.v_hs = value_blocks.strides[1] // vitem
            p.ldv = value_blocks.strides[2] // vitem
            p.table = intp_data(table)
            p.table_ld = table.shape[1]
        else:
            k_off, v_off, p.ldk, p.ldv, p.block_size = rows
            p.k_off = intp_data(k_off)
            p.v_off = intp_data(v_off)
            p.k_bs = p.block_size * p.ldk
            p.v_bs = p.block_size * p.ldv
            p.k_hs = p.v_hs = 0
            p.table = NULL
            p.table_ld = 0
        p.mask = mask_view(mask)
        p.diag_shift = diag_shift
        p.causal = causal
        left, right = (None, None) if window is None else window
        p.band_left = BAND_ALL if left is None or left >= BAND_ALL else left
        p.band_right = BAND_ALL if right is None or right >= BAND_ALL else right
        if causal:
            p.band_right = min(p.band_right, 0)
        p.softcap = softcap
        p.slopes = NULL if slopes is None else <const double *>cnp.PyArray_DATA(slopes)
        p.tile_heads = tile_heads
        p.row_tile = row_tile
        p.chunk_blocks = chunk_blocks
        p.nsplit = nsplit
        p.use_blas = use_blas
        p.prefetch = prefetch
        p.nthreads = nthreads
        self.arrays = (q, key_blocks, value_blocks, table, lens, out, lse, slopes, rows, mask)

    @property
    def nthreads(self):
        return self.c.nthreads

    @property
    def nsplit(self):
        return self.c.nsplit


def paged_attention(PagedPlan plan):
    """Run the paged kernel on a plan (PagedPlan). Private: `fastattn.paged_attention`
    validates every argument."""
    cdef PagedRun run
    cdef const PagedProblem *p = &plan.c
    cdef cnp.ndarray q = plan.arrays[0]
    cdef Py_ssize_t ntiles = (p.R + p.row_tile - 1) // p.row_tile
    cdef Py_ssize_t ngroups = (p.nkv + p.tile_heads - 1) // p.tile_heads
    cdef Py_ssize_t nitems = p.nbatch * ngroups * ntiles * p.nsplit
    cdef Py_ssize_t nrows = p.nbatch * p.nkv * p.R
    cdef cnp.ndarray part_out = None, part_lse = None
    cdef size_t scratch = paged_scratch(p, q.itemsize)
    cdef SplitMerge merge
    run.p = p
    run.part_out = run.part_lse = NULL
    if p.nsplit > 1:
        part_out = cnp.PyArray_EMPTY(1, [nrows * p.nsplit * p.ev], q.dtype.num, 0)
        part_lse = cnp.PyArray_EMPTY(1, [nrows * p.nsplit], q.dtype.num, 0)
        run.part_out = cnp.PyArray_DATA(part_out)
        run.part_lse = cnp.PyArray_DATA(part_lse)
        # part_out is (nsplit, nrows, ev): each split's rows together
        merge.part_out = run.part_out
        merge.part_lse = run.part_lse
        merge.nsplit = p.nsplit
        merge.row_step = p.ev
        merge.part_stride = nrows * p.ev
        merge.ev = p.ev
        merge.out = p.out
        merge.out_off = NULL
        merge.rows_per_batch = 1
        merge.ldo = p.ev
        merge.lse = p.lse
        merge.dtype = p.odtype
        merge.itemsize = p.oisz
    with nogil:
        run_items(paged_item, &run, nitems, 1, scratch, p.nthreads,
                  "paged attention tile buffers")
        if p.nsplit > 1:
            run_items(merge_split_item, &merge, nrows, 64, merge_split_scratch(&merge),
                      p.nthreads, "paged attention merge row")
