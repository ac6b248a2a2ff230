# AttentionPlan (see plan.pxd) and the tile core's enums as compiled, for Python.
cimport numpy as cnp
from fastattn._kernels.tile cimport (
    intp_data, mask_view, qkv_layout, operands,
    MASK_NONE, MASK_BOOL, MASK_FLOAT, BLOCK_SKIP, BLOCK_MASKED, BLOCK_FULL, BAND_ALL,
)
from fastattn._kernels.parallel import dtype_code

cnp.import_array()

# The enums of tile.pxd, declared there once and mirrored here from the compiled values.
CONSTANTS = dict(MASK_NONE=MASK_NONE, MASK_BOOL=MASK_BOOL, MASK_FLOAT=MASK_FLOAT,
                 BLOCK_SKIP=BLOCK_SKIP, BLOCK_MASKED=BLOCK_MASKED, BLOCK_FULL=BLOCK_FULL)


cdef class AttentionPlan:
    """The plan of one attention call over (query, key, value) matrix stacks.

    Private: built by ``fastattn._layout.attention_plan`` from validated operands.
    ``q``, ``k``, ``v``, ``out`` (and ``lse``, C-contiguous ``(nbatch, L)`` or None)
    are the base arrays, one dtype; ``offsets`` maps each of them to its per-batch
    element offsets (intp vectors); ``strides`` their row strides; ``mask`` a
    ``fastattn._layout.PreparedMask`` or None; ``dropout`` None or ``(p, seed)`` with
    ``0 < p < 1`` and a 64-bit seed (see dropout.h).

    Score modifiers (all optional): ``window`` ``(left, right)``, None for an unbounded
    side, restricts row i to keys ``i + causal_offset - left .. i + causal_offset +
    right`` (with ``causal`` too: both bands); ``softcap`` > 0 soft-caps the scores;
    ``slopes`` a float64 vector of one ALiBi slope per batch entry. ``ragged``: a
    ``fastattn._layout.RaggedBatch`` (per-entry lengths and listed items) or None.
    """

    def __init__(self, q, k, v, out, lse, offsets, strides, Py_ssize_t L, Py_ssize_t S,
                 int e, int ev, mask, *, double scale, bint causal, Py_ssize_t causal_offset,
                 int block_q, int block_k, int nsplit, int nthreads, dropout=None,
                 window=None, double softcap=0.0, slopes=None, ragged=None):
        q_off, k_off, v_off, out_off = offsets
        left, right = (None, None) if window is None else window
        ldq, ldk, ldv, ldo = strides
        self.c.qkv = qkv_layout(q_off, k_off, v_off, ldq, ldk, ldv, L, S, e, ev)
        self.c.ops = operands(q, k, v, out, lse)
        self.c.mask = mask_view(mask)
        self.c.out_off = intp_data(out_off)
        self.c.ldo = ldo
        self.c.dtype = dtype_code(q.dtype)
        self.c.itemsize = q.dtype.itemsize
        self.c.scale = scale
        self.c.causal = causal
        self.c.causal_offset = causal_offset
        # the band: causal bounds the right side at 0, the window either side (|i + off - j|
        # < L + S, so a side of L + S or more bounds nothing)
        self.c.band_left = BAND_ALL if left is None or left >= L + S else left
        self.c.band_right = BAND_ALL if right is None or right >= L + S else right
        if causal:
            self.c.band_right = min(self.c.band_right, 0)
        self.c.banded = self.c.band_left < BAND_ALL or self.c.band_right < BAND_ALL
        self.c.softcap = softcap
        self.c.slopes = NULL
        if slopes is not None:
            self.c.slopes = <const double *>cnp.PyArray_DATA(slopes)
        self.c.ragged.items = NULL
        self.c.ragged.len_q = self.c.ragged.len_k = self.c.ragged.lse_off = NULL
        self.c.ragged.nitems = 0
        self.c.ragged.bottom_right = False
        if ragged is not None:
            self.c.ragged.len_q = intp_data(ragged.len_q)
            self.c.ragged.len_k = intp_data(ragged.len_k)
            self.c.ragged.lse_off = intp_data(ragged.lse_off)
            self.c.ragged.items = intp_data(ragged.items)
            self.c.ragged.nitems = ragged.items.shape[0]
            self.c.ragged.bottom_right = ragged.bottom_right
        self.c.block_q = block_q
        self.c.block_k = block_k
        self.c.nsplit = nsplit
        self.c.nthreads = nthreads
        self.c.dropout_on = dropout is not None
        self.c.dropout.seed = self.c.dropout.threshold = 0
        self.c.dropout.scale = 1
        self.c.dropout.batch = self.c.dropout.row0 = self.c.dropout.col0 = 0
        if dropout is not None:
            p, seed = dropout
            self.c.dropout.seed = seed
            self.c.dropout.threshold = int(p * 2.0**64)     # exact: p < 1 is a double
            self.c.dropout.scale = 1 / (1 - p)
        self.arrays = (q, k, v, out, lse, offsets, mask, slopes, ragged)

    @property
    def nbatch(self):
        return self.c.qkv.nbatch

    @property
    def nthreads(self):
        return self.c.nthreads
