# One call's plan, built once in Python by fastattn._layout (shapes, strides, per-batch
# offsets, the mask and its block map, the band and the score modifiers, tiles and
# threads; per-entry lengths for a ragged batch) and handed whole to a kernel family,
# which reads the C struct without any further conversion.
from fastattn._kernels.tile cimport QkvLayout, MaskView, Operands, DropoutTile


cdef struct Ragged:
    # Batches whose entries have their own lengths (packed variable-length sequences):
    # batch b has len_q[b] query and len_k[b] key rows (at most qkv.L and qkv.S), its lse
    # row at lse + lse_off[b], and its diagonal offset len_k[b] - len_q[b] when
    # bottom_right (else the plan's causal_offset). The work items are listed: item i is
    # query block items[2 i + 1] of batch items[2 i], heaviest first; no key splits.
    const Py_ssize_t *len_q
    const Py_ssize_t *len_k
    const Py_ssize_t *lse_off
    const Py_ssize_t *items
    Py_ssize_t nitems
    bint bottom_right


cdef struct PlanData:
    QkvLayout qkv               # sizes, per-batch offsets, row strides (tile.pxd)
    MaskView mask               # the mask and its block map; kind MASK_NONE without one
    Operands ops                # data pointers of q, k, v, out, lse
    const Py_ssize_t *out_off   # batch b's output matrix at out + out_off[b] ...
    Py_ssize_t ldo              # ... with this row stride (unit column stride)
    int dtype                   # parallel.DType of every operand
    Py_ssize_t itemsize         # bytes of one operand element
    double scale                # multiplies the scores
    # causal band: query i sees key j <= i + causal_offset. causal_offset is the diagonal
    # of the band, the window and ALiBi: query i sits at key position i + causal_offset.
    bint causal
    Py_ssize_t causal_offset
    # the band every row is restricted to (the causal band and the window together):
    #   i + causal_offset - band_left <= j <= i + causal_offset + band_right,
    # a side BAND_ALL (tile.pxd) where unbounded; banded False when neither side is bounded
    bint banded
    Py_ssize_t band_left, band_right
    # score modifiers: softcap > 0 soft-caps the scaled scores; slopes (NULL: none) holds
    # batch b's ALiBi slope (tile.pxd's ScoreMods)
    double softcap
    const double *slopes
    # a ragged batch (varlen attention); ragged.items NULL for a uniform one
    Ragged ragged
    # tiling and threads: nsplit key splits per query block (flash-decoding merge)
    int block_q, block_k, nsplit, nthreads
    # dropout on the probabilities (dense only): its seed, threshold and scale; the
    # driver fills in the tile position of its own copy
    bint dropout_on
    DropoutTile dropout


cdef class AttentionPlan:
    cdef PlanData c
    cdef readonly object arrays     # everything the pointers in c point into
