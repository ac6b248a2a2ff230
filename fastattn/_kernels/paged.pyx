# Paged attention: a few new query rows per sequence against a paged KV cache.
#
# The cache is two pools of fixed-size blocks, (num_blocks, H_kv, block_size, E) and
# (..., Ev); sequence b owns the blocks table[b, :ceil(len_b / block_size)] in order.
# Blocks are read where they are: nothing is gathered into a contiguous copy.
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
# Extra memory is per thread: one rows x chunk score tile plus m and l.

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels.tile cimport (
    intp_data,
    real, gemm_abt, gemm_ab,
    row_max, row_fill, online_softmax_row, finish_row, merge_partial_row,
)
from fastattn._kernels.smallgemm cimport gemm_abt_small, gemm_ab_acc_small, prefetch_rows

cnp.import_array()


cdef struct PagedProblem:
    # sizes: R = group * T query rows per (sequence, kv-head)
    Py_ssize_t nbatch, nkv, group, T, R
    int e, ev, block_size
    # pools: element strides per block, per head and per row (unit column stride)
    Py_ssize_t k_bs, k_hs, ldk, v_bs, v_hs, ldv
    # block table (nbatch rows of table_ld entries) and lengths, validated by the caller
    const Py_ssize_t *table
    Py_ssize_t table_ld
    const Py_ssize_t *lens
    # causal: row t of T sees keys j < len - T + 1 + t (bottom-right aligned)
    bint causal
    # tiling: a tile is tile_heads kv-heads x row_tile of each one's R rows (row_tile == R
    # when tile_heads > 1); chunk_blocks key blocks per online-softmax update
    int tile_heads, row_tile, chunk_blocks, nsplit, nthreads
    bint use_blas
    # software prefetch distance in pieces (one kv-head of one block; 0: none)
    int prefetch
    # set by a thread that could not allocate its scratch (its items are not computed)
    int alloc_failed


cdef inline Py_ssize_t visible_keys(const PagedProblem *p, Py_ssize_t length,
                                    Py_ssize_t r) noexcept nogil:
    # How many keys query row r (of the R rows of a group) sees.
    cdef Py_ssize_t n = length - p.T + 1 + r % p.T
    if not p.causal:
        return length
    return n if n > 0 else 0


cdef inline const real *piece_at(const PagedProblem *p, const real *kpool, const real *vpool,
                                 Py_ssize_t b, Py_ssize_t h0, Py_ssize_t nh, Py_ssize_t piece,
                                 Py_ssize_t kb_lo, Py_ssize_t kb_hi,
                                 Py_ssize_t *nbytes) noexcept nogil:
    # Start and size of piece number `piece` of an item's reads, in the order it reads
    # them: chunk by chunk, the keys of the chunk's blocks (block by block, each block's
    # nh kv-heads in memory order), then their values. A piece is one kv-head of one
    # block. NULL past the item's last block.
    cdef Py_ssize_t per = 2 * p.chunk_blocks * nh
    cdef Py_ssize_t start = kb_lo + piece // per * p.chunk_blocks
    cdef Py_ssize_t within = piece % per
    cdef Py_ssize_t n = kb_hi - start
    if n > p.chunk_blocks:
        n = p.chunk_blocks
    if n <= 0 or within >= 2 * n * nh:
        return NULL
    if within < n * nh:
        nbytes[0] = ((p.block_size - 1) * p.ldk + p.e) * sizeof(real)
        return (kpool + p.table[b * p.table_ld + start + within // nh] * p.k_bs
                + (h0 + within % nh) * p.k_hs)
    within = within - n * nh
    nbytes[0] = ((p.block_size - 1) * p.ldv + p.ev) * sizeof(real)
    return (vpool + p.table[b * p.table_ld + start + within // nh] * p.v_bs
            + (h0 + within % nh) * p.v_hs)


cdef void paged_kernel(PagedProblem *p, real scale, const real *q, const real *kpool,
                       const real *vpool, real *out, real *lse,
                       real *part_out, real *part_lse) noexcept nogil:
    cdef Py_ssize_t ntiles = (p.R + p.row_tile - 1) // p.row_tile
    cdef Py_ssize_t ngroups = (p.nkv + p.tile_heads - 1) // p.tile_heads
    cdef Py_ssize_t nitems = p.nbatch * ngroups * ntiles * p.nsplit
    cdef Py_ssize_t chunk = <Py_ssize_t>p.chunk_blocks * p.block_size
    cdef Py_ssize_t bs = p.block_size
    cdef Py_ssize_t tile_rows = <Py_ssize_t>p.tile_heads * p.row_tile
    cdef Py_ssize_t nrows = p.nbatch * p.nkv * p.R
    cdef Py_ssize_t item, t, b, h0, nh, hh, tile, split, r, r0, rows, row0, ldacc, acc_step
    cdef Py_ssize_t length, hi, nblk, per, kb_lo, kb_hi, c_lo, c_hi, kb, k0, ncols, cols, vis
    cdef Py_ssize_t blk, off, piece, cn, cl, pf_bytes
    cdef bint any_row
    cdef real *s
    cdef real *m
    cdef real *l
    cdef real *acc
    cdef real *srow
    cdef real *lse_row
    cdef const real *qt
    cdef const real *kb_ptr
    cdef const real *vb_ptr
    cdef const real *pf
    cdef int nt = p.nthreads

    if nitems == 0:
        return
    with nogil, parallel(num_threads=nt):
        s = <real *>malloc(tile_rows * chunk * sizeof(real))
        m = <real *>malloc(tile_rows * sizeof(real))
        l = <real *>malloc(tile_rows * sizeof(real))
        # Every thread must reach the prange (a worksharing loop); one without scratch
        # only flags the failure.
        for item in prange(nitems, schedule='dynamic'):
            if s == NULL or m == NULL or l == NULL:
                p.alloc_failed = 1
            else:
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
                # each other: rows nsplit * ev apart would share cache sets)
                acc = out + row0 * p.ev
                if p.nsplit > 1:
                    acc = part_out + (split * nrows + row0) * p.ev
                ldacc = p.ev
                acc_step = p.R * ldacc          # from one kv-head's rows to the next's

                # keys any row of the tile sees: [0, hi); this split's blocks of them
                length = p.lens[b]
                hi = 0
                for r in range(r0, r0 + rows):
                    vis = visible_keys(p, length, r)
                    if vis > hi:
                        hi = vis
                nblk = (hi + bs - 1) // bs
                per = (nblk + p.nsplit - 1) // p.nsplit
                kb_lo = split * per
                kb_hi = kb_lo + per
                if kb_hi > nblk:
                    kb_hi = nblk

                for hh in range(nh):
                    for r in range(rows):
                        row_fill(acc + hh * acc_step + r * ldacc, p.ev, 0)
                        m[hh * rows + r] = -INFINITY
                        l[hh * rows + r] = 0
                # the first p.prefetch pieces; each product below prefetches the piece
                # that far ahead of its own
                for piece in range(p.prefetch):
                    pf = piece_at(p, kpool, vpool, b, h0, nh, piece, kb_lo, kb_hi, &pf_bytes)
                    if pf == NULL:
                        break
                    prefetch_rows(pf, 1, pf_bytes // sizeof(real))

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
                        blk = p.table[b * p.table_ld + kb]
                        off = (kb - c_lo) * bs
                        cols = ncols - off
                        if cols > bs:
                            cols = bs
                        for hh in range(nh):
                            kb_ptr = kpool + blk * p.k_bs + (h0 + hh) * p.k_hs
                            qt = q + (row0 + hh * p.R) * p.e
                            srow = s + hh * rows * chunk + off
                            pf = NULL
                            if p.prefetch:
                                pf = piece_at(p, kpool, vpool, b, h0, nh,
                                              cn + (kb - c_lo) * nh + hh + p.prefetch,
                                              kb_lo, kb_hi, &pf_bytes)
                            if p.use_blas:
                                if pf != NULL:
                                    prefetch_rows(pf, 1, pf_bytes // sizeof(real))
                                gemm_abt(<int>rows, <int>cols, p.e, scale, qt, p.e, kb_ptr,
                                         <int>p.ldk, 0, srow, <int>chunk)
                            else:
                                gemm_abt_small(rows, cols, p.e, scale, qt, p.e, kb_ptr, p.ldk,
                                               srow, chunk, pf, pf_bytes)

                    # fold each row's visible columns into its online softmax;
                    # s then holds the probabilities (0 where not visible)
                    any_row = False
                    for hh in range(nh):
                        for r in range(rows):
                            srow = s + (hh * rows + r) * chunk
                            vis = visible_keys(p, length, r0 + r) - k0
                            if vis > ncols:
                                vis = ncols
                            if vis <= 0:
                                row_fill(srow, ncols, 0)
                                continue
                            if online_softmax_row(srow, 0, vis, ncols, row_max(srow, vis),
                                                  m + hh * rows + r, l + hh * rows + r,
                                                  acc + hh * acc_step + r * ldacc, p.ev):
                                any_row = True

                    # acc_hh <- acc_hh + p_hh @ v_chunk, block by block
                    if any_row:
                        for kb in range(c_lo, c_hi):
                            blk = p.table[b * p.table_ld + kb]
                            off = (kb - c_lo) * bs
                            cols = ncols - off
                            if cols > bs:
                                cols = bs
                            for hh in range(nh):
                                vb_ptr = vpool + blk * p.v_bs + (h0 + hh) * p.v_hs
                                srow = s + hh * rows * chunk + off
                                pf = NULL
                                if p.prefetch:
                                    pf = piece_at(p, kpool, vpool, b, h0, nh,
                                                  cn + cl + (kb - c_lo) * nh + hh + p.prefetch,
                                                  kb_lo, kb_hi, &pf_bytes)
                                if p.use_blas:
                                    if pf != NULL:
                                        prefetch_rows(pf, 1, pf_bytes // sizeof(real))
                                    gemm_ab(<int>rows, p.ev, <int>cols, 1, srow, <int>chunk,
                                            vb_ptr, <int>p.ldv, 1, acc + hh * acc_step,
                                            <int>ldacc)
                                else:
                                    gemm_ab_acc_small(rows, p.ev, cols, srow, chunk, vb_ptr,
                                                      p.ldv, acc + hh * acc_step, ldacc,
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
        free(s)
        free(m)
        free(l)
    # end: with nogil, parallel

    if p.nsplit > 1 and not p.alloc_failed:
        for item in prange(p.nbatch * p.nkv * p.R, schedule='static', num_threads=nt):
            merge_partial_row(part_out + item * p.ev, part_lse + item * p.nsplit,
                              p.nsplit, nrows * p.ev, p.ev, out + item * p.ev,
                              (lse + item) if lse != NULL else NULL)


def paged_attention(cnp.ndarray q, cnp.ndarray key_blocks, cnp.ndarray value_blocks,
                    cnp.ndarray table, cnp.ndarray lens, cnp.ndarray out, object lse,
                    Py_ssize_t nkv, Py_ssize_t T, double scale, bint causal,
                    int tile_heads, int row_tile, int chunk_blocks, int nsplit, bint use_blas,
                    int prefetch, int nthreads):
    """Run the paged kernel. Private: `fastattn.paged_attention` validates every argument.

    q is C-contiguous (B, H, T, E); key_blocks / value_blocks are (N, H_kv, block_size,
    E / Ev) with unit last stride and element-multiple strides; all three share one dtype
    (float32 or float64). table is C-contiguous intp (B, max_blocks) whose entries below
    ceil(visible length / block_size) are valid block ids; lens is intp (B,). out is
    C-contiguous (B, H, T, Ev); lse is (B, H, T) or None. A tile is tile_heads kv-heads x
    row_tile rows of each (row_tile == G * T when tile_heads > 1).
    """
    cdef PagedProblem p
    cdef cnp.ndarray part_out = None, part_lse = None
    cdef Py_ssize_t item = key_blocks.itemsize
    cdef void *qd = cnp.PyArray_DATA(q)
    cdef void *kd = cnp.PyArray_DATA(key_blocks)
    cdef void *vd = cnp.PyArray_DATA(value_blocks)
    cdef void *od = cnp.PyArray_DATA(out)
    cdef void *ld = NULL
    cdef void *pod = NULL
    cdef void *pld = NULL
    cdef bint is_f32 = q.dtype.num == cnp.NPY_FLOAT32

    p.nbatch = q.shape[0]
    p.nkv = nkv
    p.group = q.shape[1] // nkv
    p.T = T
    p.R = p.group * T
    p.e = <int>q.shape[3]
    p.ev = <int>value_blocks.shape[3]
    p.block_size = <int>key_blocks.shape[2]
    p.k_bs = key_blocks.strides[0] // item
    p.k_hs = key_blocks.strides[1] // item
    p.ldk = key_blocks.strides[2] // item
    p.v_bs = value_blocks.strides[0] // item
    p.v_hs = value_blocks.strides[1] // item
    p.ldv = value_blocks.strides[2] // item
    p.table = intp_data(table)
    p.table_ld = table.shape[1]
    p.lens = intp_data(lens)
    p.causal = causal
    p.tile_heads = tile_heads
    p.row_tile = row_tile
    p.chunk_blocks = chunk_blocks
    p.nsplit = nsplit
    p.use_blas = use_blas
    p.prefetch = prefetch
    p.nthreads = nthreads
    p.alloc_failed = 0
    if lse is not None:
        ld = cnp.PyArray_DATA(lse)
    if nsplit > 1:
        part_out = cnp.PyArray_EMPTY(1, [out.size * nsplit], q.dtype.num, 0)
        part_lse = cnp.PyArray_EMPTY(1, [p.nbatch * nkv * p.R * nsplit], q.dtype.num, 0)
        pod = cnp.PyArray_DATA(part_out)
        pld = cnp.PyArray_DATA(part_lse)

    with nogil:
        if is_f32:
            paged_kernel[float](&p, <float>scale, <const float *>qd, <const float *>kd,
                                <const float *>vd, <float *>od, <float *>ld,
                                <float *>pod, <float *>pld)
        else:
            paged_kernel[double](&p, scale, <const double *>qd, <const double *>kd,
                                 <const double *>vd, <double *>od, <double *>ld,
                                 <double *>pod, <double *>pld)
    if p.alloc_failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its tile buffers")
