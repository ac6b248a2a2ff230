"""Operands in the form the kernels take them.

A kernel sees each operand as one base array plus, for every entry of the
broadcast batch, the element offset of that entry's matrix from the base data
pointer. Broadcasting (stride 0) and grouped-query heads (several query heads
reading one key/value head) are therefore just offsets: nothing is copied or
expanded. The matrix itself must have unit column stride and a row stride BLAS
accepts; anything else is copied once to C order.

Every array a kernel reads or writes is aligned to its element size: a misaligned
view (e.g. of a byte buffer at an odd offset) is copied, contiguous or not
(``np.ascontiguousarray`` alone would keep it misaligned). Making every load of
every kernel unaligned-safe instead would touch each scalar access of the Cython
bodies; such operands are rare and a copy costs one pass (NumPy's ufuncs buffer
them the same way).
"""
import functools
import math

import numpy as np

from fastattn._kernels.plan import CONSTANTS as _TILE
from fastattn._validation import as_array, is_floating

BLOCK_SKIP, BLOCK_MASKED, BLOCK_FULL = (_TILE[n] for n in ("BLOCK_SKIP", "BLOCK_MASKED", "BLOCK_FULL"))
MASK_BOOL, MASK_FLOAT = _TILE["MASK_BOOL"], _TILE["MASK_FLOAT"]

_INT32_MAX = 2**31 - 1


def as_kernel_array(a, dtype=None):
    """``a`` (in ``dtype``) C-contiguous and aligned, copied only when it is not."""
    a = np.asarray(a, dtype=dtype)
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, order="C")          # a fresh (hence aligned) copy


def as_matrix_stack(a, dtype):
    """Return ``(array, row_stride)`` with ``a`` in ``dtype`` laid out for BLAS.

    The last axis must be unit-stride, the row stride must be at least the row
    length (no overlapping rows) and fit a 32-bit BLAS int, every stride must be
    a whole number of elements; otherwise the array is copied to C order.
    """
    a = np.asarray(a, dtype=dtype)
    item = a.dtype.itemsize
    rows, cols = a.shape[-2], a.shape[-1]
    if a.flags.c_contiguous and a.flags.aligned and cols <= _INT32_MAX:
        return a, max(cols, 1)          # the common case, without the checks below
    ok = a.flags.aligned and all(s % item == 0 for s in a.strides)
    if ok and cols > 1:
        ok = a.strides[-1] == item
    if ok and rows > 1:
        ld = a.strides[-2] // item
        ok = max(cols, 1) <= ld <= _INT32_MAX
    if not ok:
        a = np.array(a, order="C")          # a fresh copy: C order and aligned
    ld = a.strides[-2] // item if rows > 1 else max(cols, 1)
    return a, ld


def batch_offsets(a, batch_shape, group_axis=None, group=1):
    """Element offset of each matrix of ``a`` over the broadcast ``batch_shape``.

    ``a`` has shape ``(*lead, m, n)`` with ``lead`` broadcastable to
    ``batch_shape``; the result is a C-ordered ``intp`` vector with one entry per
    batch index. With ``group > 1``, batch index ``h`` along ``group_axis`` (an
    axis of ``batch_shape``) reads ``a``'s entry ``h // group``: grouped-query
    attention, where ``group`` query heads share one key/value head.

    The vector depends only on the shapes and strides, so for batches of up to
    ``CACHED_OFFSETS`` entries it is built once per layout and shared (read-only) by
    the calls with that layout.
    """
    return layout_offsets(a.shape[:-2], a.strides[:-2], a.dtype.itemsize, tuple(batch_shape),
                          group_axis, group)


# Offset vectors of at most this many entries (32 KB) are cached, 256 layouts at most.
CACHED_OFFSETS = 4096


def layout_offsets(lead, strides, item, batch_shape, group_axis=None, group=1):
    """:func:`batch_offsets` of an array given by its leading (batch) shape ``lead``,
    their strides in bytes and its itemsize (all hashable), read-only."""
    if math.prod(batch_shape) <= CACHED_OFFSETS:
        return _cached_offsets(lead, strides, item, batch_shape, group_axis, group)
    return _offsets(lead, strides, item, batch_shape, group_axis, group)


def _offsets(lead, strides, item, batch_shape, group_axis, group):
    nb = len(batch_shape)
    pad = nb - len(lead)               # batch axes a lacks (broadcast), in front
    off = None
    for axis in range(max(pad, 0), nb):
        n, stride = lead[axis - pad], strides[axis - pad] // item
        if n == 1 or stride == 0:
            continue
        size = batch_shape[axis]
        if axis == group_axis and group > 1:
            term = np.arange(size, dtype=np.intp) // group * stride
        else:
            term = np.arange(0, size * stride, stride, dtype=np.intp)
        term = term.reshape((size,) + (1,) * (nb - 1 - axis))
        off = term if off is None else off + term
    if off is None:
        off = np.zeros(math.prod(batch_shape), dtype=np.intp)
    elif off.shape != tuple(batch_shape):
        full = np.empty(batch_shape, dtype=np.intp)
        full[...] = off
        off = full
    off = np.ascontiguousarray(off.reshape(-1))
    off.flags.writeable = False
    return off


_cached_offsets = functools.lru_cache(maxsize=256)(_offsets)


def as_mask(mask, name):
    """``mask`` as an array: bool (True = keep) or floating (added), else ``TypeError``."""
    mask = as_array(name, mask)
    if mask.dtype != np.bool_ and not is_floating(mask.dtype):
        raise TypeError(f"{name} must be bool (True = keep) or floating (added to the "
                        f"scores), got dtype {mask.dtype}")
    return mask


def overlaps(out, *arrays):
    """Whether ``out`` may share memory with one of ``arrays`` (None ones skipped)."""
    return any(a is not None and np.may_share_memory(out, a) for a in arrays)


class MaskOperand:
    """A validated mask as the kernels read it (tile.pxd's ``mask_view``), at its own
    (broadcast) shape: ``array``, a bool mask as uint8 (``kind`` ``MASK_BOOL``, nonzero =
    keep) or a float one in ``dtype`` (``MASK_FLOAT``, added); ``offsets``, the element
    offset of each entry of ``batch_shape``; ``row_stride`` / ``col_stride`` in elements
    (0 where broadcast). No block map (``block_map`` None): the kernels that take it
    mask row by row."""

    __slots__ = ("array", "kind", "offsets", "row_stride", "col_stride", "block_map")

    def __init__(self, mask, dtype, batch_shape):
        if mask.dtype == np.bool_:
            arr, kind = mask.view(np.uint8), MASK_BOOL
        else:
            arr, kind = np.asarray(mask, dtype=dtype), MASK_FLOAT
        while arr.ndim < 2:
            arr = arr[np.newaxis]
        if not arr.flags.aligned or any(s % arr.dtype.itemsize for s in arr.strides):
            arr = np.array(arr, order="C")  # a fresh copy: C order and aligned
        item = arr.dtype.itemsize
        Lm, Sm = arr.shape[-2:]
        self.array, self.kind = arr, kind
        self.offsets = batch_offsets(arr, batch_shape)
        self.row_stride = arr.strides[-2] // item if Lm > 1 else 0
        self.col_stride = arr.strides[-1] // item if Sm > 1 else 0
        self.block_map = None


class PreparedMask(MaskOperand):
    """A mask as the kernels take it (:class:`MaskOperand`), plus its per-tile block map.

    The mask keeps its own (broadcast) shape: a mask shared by all heads is stored
    once. ``kind`` is ``MASK_BOOL`` (nonzero = keep) or ``MASK_FLOAT`` (added), the
    values of the tile core's enum in ``tile.pxd``.
    """

    __slots__ = ("block_offsets", "block_row_stride", "block_col_stride")

    def __init__(self, mask, dtype, L, S, batch_shape, block_q, block_k):
        super().__init__(mask, dtype, batch_shape)
        arr, kind = self.array, self.kind
        Lm, Sm = arr.shape[-2:]

        # Block map at the mask's own shape: one state per (query block, key block).
        if kind == MASK_BOOL:
            visible, untouched = arr.view(np.bool_), None
        else:
            visible, untouched = arr != -np.inf, arr == 0
        q_starts = np.arange(0, L, block_q) if Lm > 1 else np.zeros(1, np.intp)
        k_starts = np.arange(0, S, block_k) if Sm > 1 else np.zeros(1, np.intp)

        def blocks(reduce, x):
            x = reduce.reduceat(x, k_starts, axis=-1)
            return reduce.reduceat(x, q_starts, axis=-2)

        any_visible = blocks(np.logical_or, visible)
        all_plain = blocks(np.logical_and, visible if kind == MASK_BOOL else untouched)
        bmap = np.where(any_visible, np.where(all_plain, BLOCK_FULL, BLOCK_MASKED), BLOCK_SKIP)
        bmap = np.ascontiguousarray(bmap, dtype=np.uint8)
        self.block_map = bmap
        self.block_offsets = batch_offsets(bmap, batch_shape)
        self.block_row_stride = bmap.shape[-1] if Lm > 1 else 0
        self.block_col_stride = 1 if Sm > 1 else 0


class RaggedBatch:
    """A ragged batch as the dense kernel takes it (plan.pxd's ``Ragged``): per batch entry
    its query and key lengths (``len_q``, ``len_k``) and the offset of its lse row
    (``lse_off``), all intp vectors; the work items ``items``, an intp ``(n, 2)`` array of
    (batch entry, query block), heaviest first; ``bottom_right``: whether an entry's
    diagonal offset is ``len_k - len_q`` (else 0)."""

    __slots__ = ("len_q", "len_k", "lse_off", "items", "bottom_right")

    def __init__(self, len_q, len_k, lse_off, items, bottom_right):
        self.len_q = np.ascontiguousarray(len_q, dtype=np.intp)
        self.len_k = np.ascontiguousarray(len_k, dtype=np.intp)
        self.lse_off = np.ascontiguousarray(lse_off, dtype=np.intp)
        self.items = np.ascontiguousarray(items, dtype=np.intp).reshape(-1, 2)
        self.bottom_right = bool(bottom_right)
