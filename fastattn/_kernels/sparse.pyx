# Block-sparse attention: the dense driver's sibling over the same tile core.
#
# The key blocks a query block visits come from a CSR layout (indptr, indices), one per
# layout head; only those tiles are computed. Work is one flat index over (batch, query
# block), handed out dynamically to OpenMP threads (rows with many blocks, e.g. global
# tokens, take longer). Inside a listed tile an optional element rule decides which
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
# Unmasked tiles of a query block of at least FA_PACK_MIN_ROWS float32 rows go the
# key-major way (tile.pxd's attend_tile_kmajor): the block is packed once, not every
# tile's keys, which pays with the layouts' small tiles.
# Extra memory is per thread: one score tile, one keep tile (bytes), m and l, and for
# float32 the packed query block and a key-major score tile.

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.stdint cimport uint8_t, int64_t
cimport numpy as cnp

from fastattn._kernels.tile cimport (
    intp_data, QkvLayout, qkv_layout, block_len, start_rows, Operands, operands,
    real, attend_tile, finish_row, MASK_NONE, MASK_BOOL, BAND_ALL,
    kmajor_ld, kmajor_scratch, attend_tile_kmajor,
)

cnp.import_array()

# What an element rule makes of one tile.
cdef enum:
    TILE_SKIP = 0    # no pair kept
    TILE_BAND = 1    # row r keeps tile columns band_lo + r .. band_hi + r
    TILE_MASK = 2    # keep tile holds the kept pairs


cdef struct Rule:
    bint active
    int64_t lo, hi, clip, dilation, segment, offset
    const uint8_t *gq       # (L,) or NULL
    const uint8_t *gk       # (S,) or NULL
    const uint8_t *mask     # element (i, j) at mask_off[b] + i * mask_rs + j * mask_cs
    const Py_ssize_t *mask_off
    Py_ssize_t mask_rs, mask_cs


cdef struct SparseProblem:
    QkvLayout qkv               # sizes, per-batch offsets and row strides (tile.pxd)
    # layout: batch b walks indptr[layout_off[b] + qb] .. indptr[layout_off[b] + qb + 1]
    const int64_t *indptr
    const int64_t *indices
    const Py_ssize_t *layout_off
    int block_q, block_k, nthreads
    Rule rule
    int alloc_failed


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


cdef void sparse_kernel(SparseProblem *p, const Operands *ops, real scale) noexcept nogil:
    cdef const real *q = <const real *>ops.q
    cdef const real *k = <const real *>ops.k
    cdef const real *v = <const real *>ops.v
    cdef real *out = <real *>ops.out
    cdef real *lse = <real *>ops.lse
    cdef Py_ssize_t nqb = (p.qkv.L + p.block_q - 1) // p.block_q
    cdef Py_ssize_t nitems = p.qkv.nbatch * nqb
    cdef Py_ssize_t item, b, qb, r, idx, row_start, row_end, kb
    cdef Py_ssize_t q0, k0, band_lo, band_hi
    cdef int rows, cols, kind
    cdef real *s
    cdef real *m
    cdef real *l
    cdef uint8_t *keep
    cdef real *acc
    cdef real *kscratch
    cdef int nt = p.nthreads
    # Row stride of the largest packed query block (0: no tile goes key-major), and this
    # item's packing state for attend_tile_kmajor.
    cdef Py_ssize_t ld_max = kmajor_ld(real is float, p.qkv.ev, p.block_q)
    cdef Py_ssize_t ldqt

    if nitems == 0:
        return
    with nogil, parallel(num_threads=nt):
        s = <real *>malloc(p.block_q * p.block_k * sizeof(real))
        m = <real *>malloc(p.block_q * sizeof(real))
        l = <real *>malloc(p.block_q * sizeof(real))
        keep = <uint8_t *>malloc(p.block_q * p.block_k)
        kscratch = <real *>kmajor_scratch(ld_max, p.qkv.e, p.block_k, sizeof(real))
        # Every thread must reach the prange; one without scratch only flags the failure.
        for item in prange(nitems, schedule='dynamic'):
            if s == NULL or m == NULL or l == NULL or keep == NULL:
                p.alloc_failed = 1
            else:
                qb = item % nqb
                b = item // nqb
                q0 = qb * p.block_q
                rows = block_len(p.qkv.L, q0, p.block_q)
                acc = out + (b * p.qkv.L + q0) * p.qkv.ev
                start_rows(rows, acc, p.qkv.ev, p.qkv.ev, m, l)

                row_start = p.indptr[p.layout_off[b] + qb]
                row_end = p.indptr[p.layout_off[b] + qb + 1]
                ldqt = -1 if kscratch != NULL else 0
                for idx in range(row_start, row_end):
                    kb = p.indices[idx]
                    k0 = kb * p.block_k
                    cols = block_len(p.qkv.S, k0, p.block_k)
                    kind = TILE_BAND
                    band_lo = -BAND_ALL
                    band_hi = BAND_ALL
                    if p.rule.active:
                        kind = tile_rule(&p.rule, b, q0, rows, k0, cols, keep,
                                         &band_lo, &band_hi)
                        if kind == TILE_SKIP:
                            continue
                    # every pair of the tile takes part: key-major
                    if (kind == TILE_BAND and band_lo <= 1 - rows and band_hi >= cols - 1
                            and attend_tile_kmajor(
                                rows, cols, p.qkv.e, p.qkv.ev, scale,
                                q + p.qkv.q_off[b] + q0 * p.qkv.ldq, p.qkv.ldq, kscratch,
                                &ldqt,
                                k + p.qkv.k_off[b] + k0 * p.qkv.ldk, p.qkv.ldk,
                                v + p.qkv.v_off[b] + k0 * p.qkv.ldv, p.qkv.ldv,
                                acc, p.qkv.ev, m, l)):
                        continue
                    attend_tile(q + p.qkv.q_off[b] + q0 * p.qkv.ldq, p.qkv.ldq, rows,
                                k + p.qkv.k_off[b] + k0 * p.qkv.ldk, p.qkv.ldk,
                                v + p.qkv.v_off[b] + k0 * p.qkv.ldv, p.qkv.ldv, cols,
                                p.qkv.e, p.qkv.ev, scale,
                                <const void *>keep, MASK_BOOL if kind == TILE_MASK else MASK_NONE,
                                cols, 1, band_lo, band_hi,
                                s, acc, p.qkv.ev, m, l)

                for r in range(rows):
                    finish_row(acc + r * p.qkv.ev, p.qkv.ev, m[r], l[r],
                               (lse + b * p.qkv.L + q0 + r) if lse != NULL else NULL)
        free(s)
        free(m)
        free(l)
        free(keep)
        free(kscratch)


def block_sparse(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, object lse,
                 cnp.ndarray q_off, cnp.ndarray k_off, cnp.ndarray v_off,
                 Py_ssize_t ldq, Py_ssize_t ldk, Py_ssize_t ldv,
                 Py_ssize_t L, Py_ssize_t S, int e, int ev, double scale,
                 cnp.ndarray indptr, cnp.ndarray indices, cnp.ndarray layout_off,
                 int block_q, int block_k, object rule, int nthreads):
    """Run the block-sparse kernel. Private: `fastattn.sparse` validates every argument.

    indptr/indices are int64 (indices within [0, ceil(S / block_k)), each row's
    indices distinct); layout_off (intp, one per batch) is the start of that batch's
    indptr row set. rule is None or a dict of the element rule's prepared fields
    (see `fastattn.sparse._prepare_rule`).
    """
    cdef SparseProblem p
    cdef Operands ops = operands(q, k, v, out, lse)

    p.qkv = qkv_layout(q_off, k_off, v_off, ldq, ldk, ldv, L, S, e, ev)
    p.indptr = <const int64_t *>cnp.PyArray_DATA(indptr)
    p.indices = <const int64_t *>cnp.PyArray_DATA(indices)
    p.layout_off = intp_data(layout_off)
    p.block_q = block_q
    p.block_k = block_k
    p.nthreads = nthreads
    p.alloc_failed = 0
    p.rule.active = rule is not None
    p.rule.gq = NULL
    p.rule.gk = NULL
    p.rule.mask = NULL
    if rule is not None:
        p.rule.lo = rule["lo"]
        p.rule.hi = rule["hi"]
        p.rule.clip = rule["clip"]
        p.rule.dilation = rule["dilation"]
        p.rule.segment = rule["segment"]
        p.rule.offset = S - L
        if rule["gq"] is not None:
            p.rule.gq = <const uint8_t *>cnp.PyArray_DATA(rule["gq"])
        if rule["gk"] is not None:
            p.rule.gk = <const uint8_t *>cnp.PyArray_DATA(rule["gk"])
        if rule["mask"] is not None:
            p.rule.mask = <const uint8_t *>cnp.PyArray_DATA(rule["mask"])
            p.rule.mask_off = intp_data(rule["mask_off"])
            p.rule.mask_rs = rule["mask_rs"]
            p.rule.mask_cs = rule["mask_cs"]

    with nogil:
        if ops.is_f32:
            sparse_kernel[float](&p, &ops, <float>scale)
        else:
            sparse_kernel[double](&p, &ops, scale)
    if p.alloc_failed:
        raise MemoryError("fastattn: a kernel thread could not allocate its tile buffers")
