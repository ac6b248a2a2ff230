# Dense scaled dot-product attention: the FlashAttention-2 driver over the tile core.
#
# Work is one flat index over (batch, query block, key split), handed out dynamically
# to OpenMP threads. Each item walks its key blocks with `attend_tile`, skipping tiles
# that the causal band or the block map rules out, then writes its output rows:
#   nsplit == 1: straight into `out` (and `lse`), normalised;
#   nsplit > 1 : into the partial buffers, merged afterwards by `merge_partial_row`
#                (used when batch x query blocks alone cannot keep every thread busy,
#                e.g. decoding one query against a long cache).
# Tiles with no mask and no diagonal go key-major (tile.pxd's attend_tile_kmajor) when
# the operands are float32 and the query block has at least 16 rows: the block is
# packed once for all its tiles instead of transposing every tile's keys.
# Extra memory is per thread: one rows x cols score tile plus m and l, and for float32
# the packed query block and a key-major score tile.

cimport cython
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels.tile cimport (
    intp_data, QkvLayout, qkv_layout,
    MaskView, mask_view,
    real, attend_tile, finish_row, merge_partial_row, row_fill, tile_products_native,
    kmajor_ld, kmajor_scratch, attend_tile_kmajor,
    Operands, operands,
    MASK_NONE, MASK_BOOL, MASK_FLOAT, BLOCK_SKIP, BLOCK_MASKED, BLOCK_FULL, BAND_ALL,
)

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fa_max_threads(void) { return omp_get_max_threads(); }
    static int fa_have_openmp(void) { return 1; }
    #else
    static int fa_max_threads(void) { return 1; }
    static int fa_have_openmp(void) { return 0; }
    #endif
    """
    int fa_max_threads() noexcept nogil
    int fa_have_openmp() noexcept nogil


# The tile core's enums as compiled, checked against tile_constants.py by the tests.
TILE_CONSTANTS = dict(MASK_NONE=MASK_NONE, MASK_BOOL=MASK_BOOL, MASK_FLOAT=MASK_FLOAT,
                      BLOCK_SKIP=BLOCK_SKIP, BLOCK_MASKED=BLOCK_MASKED, BLOCK_FULL=BLOCK_FULL)


def max_threads():
    """OpenMP's default thread count (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return fa_max_threads()


def have_openmp():
    return bool(fa_have_openmp())


def tile_products_run_natively(bint is_float32, int ev):
    """True when attend_tile computes its products without BLAS (tile.pxd)."""
    return tile_products_native(is_float32, ev)


cdef struct DenseProblem:
    QkvLayout qkv               # sizes, per-batch offsets and row strides (tile.pxd)
    MaskView mask               # the mask and its block map (tile.pxd)
    # causal band: query i sees key j <= i + causal_offset
    bint causal
    Py_ssize_t causal_offset
    # tiling and threads
    int block_q, block_k, nsplit, nthreads
    # set by a thread that could not allocate its scratch (its items are not computed)
    int alloc_failed
    # outputs: batch b's (L, ev) output matrix at element offset out_off[b] of out, row
    # stride ldo, unit column stride (a view such as split_heads of a merged (L, H*ev)
    # array is written in place); lse (nbatch, L) C-contiguous, or NULL
    const Py_ssize_t *out_off
    Py_ssize_t ldo
    # partials (nsplit > 1): part_out (nbatch, L, nsplit, ev), part_lse (nbatch, L, nsplit)



# Rows per slice when a causal tile crossing the diagonal is taken apart.
cdef enum:
    DIAGONAL_ROWS = 64


cdef void dense_kernel(DenseProblem *p, const Operands *ops, real scale, real *part_out,
                       real *part_lse) noexcept nogil:
    cdef const real *q = <const real *>ops.q
    cdef const real *k = <const real *>ops.k
    cdef const real *v = <const real *>ops.v
    cdef real *out = <real *>ops.out
    cdef real *lse = <real *>ops.lse
    cdef Py_ssize_t nqb = (p.qkv.L + p.block_q - 1) // p.block_q
    cdef Py_ssize_t nkb = (p.qkv.S + p.block_k - 1) // p.block_k
    cdef Py_ssize_t kb_per_split = (nkb + p.nsplit - 1) // p.nsplit
    cdef Py_ssize_t nitems = p.qkv.nbatch * nqb * p.nsplit
    cdef Py_ssize_t item, t, b, qb, split, kb, kb_lo, kb_hi, last_key, r
    cdef Py_ssize_t r0, sub_rows, sub_cols
    cdef const void *mslice
    cdef Py_ssize_t q0, k0, rows, cols, band_hi, ldacc
    cdef int state
    cdef real *s
    cdef real *m
    cdef real *l
    cdef real *acc
    cdef real *lse_row
    cdef const void *mtile
    cdef int nt = p.nthreads
    cdef real *kscratch
    # Row stride of the largest packed query block for key-major tiles (tile.pxd; 0: no
    # tile goes key-major), and this item's packing state for attend_tile_kmajor.
    cdef Py_ssize_t ld_max = kmajor_ld(real is float, p.qkv.ev, p.block_q)
    cdef Py_ssize_t ldqt

    if nitems == 0:
        return
    with nogil, parallel(num_threads=nt):
        s = <real *>malloc(p.block_q * p.block_k * sizeof(real))
        m = <real *>malloc(p.block_q * sizeof(real))
        l = <real *>malloc(p.block_q * sizeof(real))
        kscratch = <real *>kmajor_scratch(ld_max, p.qkv.e, p.block_k, sizeof(real))
        # Every thread must reach the prange (a worksharing loop); one without scratch
        # only flags the failure.
        for item in prange(nitems, schedule='dynamic'):
            if s == NULL or m == NULL or l == NULL:
                p.alloc_failed = 1
            else:
                split = item % p.nsplit
                t = item // p.nsplit
                # heaviest query blocks first: with a causal band they have the most keys
                qb = nqb - 1 - (t % nqb)
                b = t // nqb
                q0 = qb * p.block_q
                rows = p.qkv.L - q0
                if rows > p.block_q:
                    rows = p.block_q

                kb_lo = split * kb_per_split
                kb_hi = kb_lo + kb_per_split
                if kb_hi > nkb:
                    kb_hi = nkb
                if p.causal:
                    # last key visible to the last row of this block
                    last_key = q0 + rows - 1 + p.causal_offset
                    if last_key < 0:
                        kb_hi = kb_lo
                    elif last_key // p.block_k + 1 < kb_hi:
                        kb_hi = last_key // p.block_k + 1

                if p.nsplit == 1:
                    acc = out + p.out_off[b] + q0 * p.ldo
                    ldacc = p.ldo
                else:
                    acc = part_out + ((b * p.qkv.L + q0) * p.nsplit + split) * p.qkv.ev
                    ldacc = p.nsplit * p.qkv.ev
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
                    cols = p.qkv.S - k0
                    if cols > p.block_k:
                        cols = p.block_k
                    if p.causal and cols > last_key - k0 + 1:
                        cols = last_key - k0 + 1    # keys past the diagonal: not computed
                    band_hi = (q0 + p.causal_offset - k0) if p.causal else BAND_ALL
                    mtile = NULL
                    if state != BLOCK_FULL:
                        if p.mask.kind == MASK_BOOL:
                            mtile = <const void *>((<const uint8_t *>p.mask.data) + p.mask.off[b]
                                                   + q0 * p.mask.rs + k0 * p.mask.cs)
                        else:
                            mtile = <const void *>((<const real *>p.mask.data) + p.mask.off[b]
                                                   + q0 * p.mask.rs + k0 * p.mask.cs)
                    if p.causal and band_hi < cols - 1 and rows > DIAGONAL_ROWS:
                        # The tile crosses the diagonal: take it in row slices, each cut at
                        # its own last visible key, so little above the diagonal is computed.
                        r0 = 0
                        while r0 < rows:
                            sub_rows = rows - r0
                            if sub_rows > DIAGONAL_ROWS:
                                sub_rows = DIAGONAL_ROWS
                            sub_cols = band_hi + r0 + sub_rows
                            if sub_cols > cols:
                                sub_cols = cols
                            if sub_cols <= 0:
                                r0 = r0 + DIAGONAL_ROWS
                                continue
                            mslice = NULL
                            if mtile != NULL and p.mask.kind == MASK_BOOL:
                                mslice = <const void *>((<const uint8_t *>mtile) + r0 * p.mask.rs)
                            elif mtile != NULL:
                                mslice = <const void *>((<const real *>mtile) + r0 * p.mask.rs)
                            attend_tile(q + p.qkv.q_off[b] + (q0 + r0) * p.qkv.ldq, p.qkv.ldq,
                                        <int>sub_rows,
                                        k + p.qkv.k_off[b] + k0 * p.qkv.ldk, p.qkv.ldk,
                                        v + p.qkv.v_off[b] + k0 * p.qkv.ldv, p.qkv.ldv,
                                        <int>sub_cols,
                                        p.qkv.e, p.qkv.ev, scale,
                                        mslice,
                                        p.mask.kind if mtile != NULL else MASK_NONE,
                                        p.mask.rs, p.mask.cs,
                                        -BAND_ALL, band_hi + r0,
                                        s, acc + r0 * ldacc, ldacc, m + r0, l + r0)
                            r0 = r0 + DIAGONAL_ROWS
                    else:
                        # no mask, no diagonal: key-major
                        if mtile == NULL and band_hi >= cols - 1 and attend_tile_kmajor(
                                <int>rows, <int>cols, p.qkv.e, p.qkv.ev, scale,
                                q + p.qkv.q_off[b] + q0 * p.qkv.ldq, p.qkv.ldq, kscratch,
                                &ldqt,
                                k + p.qkv.k_off[b] + k0 * p.qkv.ldk, p.qkv.ldk,
                                v + p.qkv.v_off[b] + k0 * p.qkv.ldv, p.qkv.ldv,
                                acc, ldacc, m, l):
                            continue
                        attend_tile(q + p.qkv.q_off[b] + q0 * p.qkv.ldq, p.qkv.ldq, <int>rows,
                                    k + p.qkv.k_off[b] + k0 * p.qkv.ldk, p.qkv.ldk,
                                    v + p.qkv.v_off[b] + k0 * p.qkv.ldv, p.qkv.ldv, <int>cols,
                                    p.qkv.e, p.qkv.ev, scale,
                                    mtile, p.mask.kind if mtile != NULL else MASK_NONE,
                                    p.mask.rs, p.mask.cs,
                                    -BAND_ALL, band_hi,
                                    s, acc, ldacc, m, l)

                for r in range(rows):
                    if p.nsplit == 1:
                        lse_row = (lse + b * p.qkv.L + q0 + r) if lse != NULL else NULL
                    else:
                        lse_row = part_lse + (b * p.qkv.L + q0 + r) * p.nsplit + split
                    finish_row(acc + r * ldacc, p.qkv.ev, m[r], l[r], lse_row)
        free(s)
        free(m)
        free(l)
        free(kscratch)

    if p.nsplit > 1 and not p.alloc_failed:
        # item = (batch, row) of the output
        for item in prange(p.qkv.nbatch * p.qkv.L, schedule='static', num_threads=nt):
            merge_partial_row(part_out + item * p.nsplit * p.qkv.ev, part_lse + item * p.nsplit,
                              p.nsplit, p.qkv.ev, p.qkv.ev,
                              out + p.out_off[item // p.qkv.L] + (item % p.qkv.L) * p.ldo,
                              (lse + item) if lse != NULL else NULL)


def sdpa(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, object lse,
         cnp.ndarray q_off, cnp.ndarray k_off, cnp.ndarray v_off, cnp.ndarray out_off,
         Py_ssize_t ldq, Py_ssize_t ldk, Py_ssize_t ldv, Py_ssize_t ldo,
         Py_ssize_t L, Py_ssize_t S, int e, int ev, double scale, object mask,
         bint causal, Py_ssize_t causal_offset,
         int block_q, int block_k, int nsplit, int nthreads):
    """Run the dense kernel. Private: `fastattn.attention` validates every argument.

    q, k, v, out, lse and mask are the base arrays (float32 or float64, one dtype);
    the *_off arrays (intp, one entry per batch) give each batch's element offset from
    the array's data pointer. out's (L, ev) matrices have row stride ldo >= ev and unit
    column stride and do not overlap; lse is C-contiguous (nbatch, L) or None. mask is a
    `fastattn._layout.PreparedMask` or None.
    """
    cdef DenseProblem p
    cdef Operands ops = operands(q, k, v, out, lse)
    cdef cnp.ndarray part_out = None, part_lse = None
    cdef void *pod = NULL
    cdef void *pld = NULL

    p.qkv = qkv_layout(q_off, k_off, v_off, ldq, ldk, ldv, L, S, e, ev)
    p.mask = mask_view(mask)
    p.out_off = intp_data(out_off)
    p.ldo = ldo
    p.alloc_failed = 0
    p.causal = causal
    p.causal_offset = causal_offset
    p.block_q = block_q
    p.block_k = block_k
    p.nsplit = nsplit
    p.nthreads = nthreads
    if nsplit > 1:
        part_out = cnp.PyArray_EMPTY(1, [p.qkv.nbatch * L * nsplit * ev], q.dtype.num, 0)
        part_lse = cnp.PyArray_EMPTY(1, [p.qkv.nbatch * L * nsplit], q.dtype.num, 0)
        pod = cnp.PyArray_DATA(part_out)
        pld = cnp.PyArray_DATA(part_lse)

    with nogil:
        if ops.is_f32:
            dense_kernel[float](&p, &ops, <float>scale, <float *>pod, <float *>pld)
        else:
            dense_kernel[double](&p, &ops, scale, <double *>pod, <double *>pld)
    if p.alloc_failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its tile buffers")
