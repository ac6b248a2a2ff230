# One call's plan, built once in Python by fastattn._layout (shapes, strides, per-batch
# offsets, the mask and its block map, the causal band, tiles and threads) and handed
# whole to a kernel family, which reads the C struct without any further conversion.
from fastattn._kernels.tile cimport QkvLayout, MaskView, Operands, DropoutTile


cdef struct PlanData:
    QkvLayout qkv               # sizes, per-batch offsets, row strides (tile.pxd)
    MaskView mask               # the mask and its block map; kind MASK_NONE without one
    Operands ops                # data pointers of q, k, v, out, lse
    const Py_ssize_t *out_off   # batch b's output matrix at out + out_off[b] ...
    Py_ssize_t ldo              # ... with this row stride (unit column stride)
    int dtype                   # parallel.DType of every operand
    Py_ssize_t itemsize         # bytes of one operand element
    double scale                # multiplies the scores
    # causal band: query i sees key j <= i + causal_offset
    bint causal
    Py_ssize_t causal_offset
    # tiling and threads: nsplit key splits per query block (flash-decoding merge)
    int block_q, block_k, nsplit, nthreads
    # dropout on the probabilities (dense only): its seed, threshold and scale; the
    # driver fills in the tile position of its own copy
    bint dropout_on
    DropoutTile dropout


cdef class AttentionPlan:
    cdef PlanData c
    cdef readonly object arrays     # everything the pointers in c point into
