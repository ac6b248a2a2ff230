# The block-sparse family's layout and element rule (sparse.pyx), declared here so that the
# backward (backward.pyx) walks the same layouts with the same rule.
from libc.stdint cimport uint8_t, int64_t

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


cdef struct SparseLayout:
    # batch b walks indptr[layout_off[b] + qb] .. indptr[layout_off[b] + qb + 1]
    const int64_t *indptr
    const int64_t *indices
    const Py_ssize_t *layout_off
    Rule rule


cdef int tile_rule(const Rule *rule, Py_ssize_t b, int64_t q0, int rows, int64_t k0, int cols,
                   uint8_t *keep, Py_ssize_t *band_lo, Py_ssize_t *band_hi) noexcept nogil


cdef class SparsePlan:
    cdef SparseLayout c
    cdef readonly object arrays     # everything the pointers in c point into
