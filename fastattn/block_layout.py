"""The block layout of block-sparse attention: which tiles to visit, which pairs count.

:class:`BlockLayout` is what :func:`fastattn.block_sparse_attention` takes; it is
re-exported from :mod:`fastattn.sparse` and :mod:`fastattn`.
"""
import operator
import warnings

import numpy as np

from fastattn._layout import batch_offsets
from fastattn._validation import check_int, check_pair, check_token_flags, check_window

__all__ = ["BlockLayout"]

# BAND_ALL of tile.pxd: a band edge this far from the diagonal means "no limit".
_NO_LIMIT = 1 << 30


class BlockLayout:
    """Which key blocks each query block visits, and which pairs count inside them.

    The query rows ``0..L-1`` are cut into blocks of ``block_size[0]`` rows and the
    keys ``0..S-1`` into blocks of ``block_size[1]`` (the last ones may be shorter).
    Query block ``r`` of head ``h`` visits the key blocks
    ``indices[indptr[h, r]:indptr[h, r + 1]]`` (CSR). Inside a visited tile the
    element rule keeps query ``i`` and key ``j`` iff::

        (local(i, j) or global_query[i] or global_key[j])
        and (not is_causal or d <= 0) and mask[i, j]

        local(i, j) = -left <= d <= right and d % dilation == 0
                      and (segment is None or (i + S - L) // segment == j // segment)
        d = j - (i + S - L)      # queries aligned bottom-right when L != S

    Pairs outside the visited tiles never take part. Without any rule argument every
    pair of a visited tile takes part.

    Parameters
    ----------
    shape : (int, int)
        ``(L, S)``: query and key counts the layout is for.
    block_size : int or (int, int)
        Query and key block sizes.
    indptr : array_like of int, shape (nqb + 1,) or (H, nqb + 1)
        CSR row pointers into ``indices``, shared by all heads or one row per head
        (axis -3 of the operands). ``nqb = ceil(L / block_size[0])``.
    indices : array_like of int, shape (nnz,)
        Key block numbers, strictly increasing within each query block.
    window : int or (int, int), optional
        ``(left, right)`` band of the local part (an int: both sides). Default: no
        band, every pair is local.
    dilation : int, default=1
        Keep only every ``dilation``-th diagonal of the band.
    segment : int, optional
        The local part also requires query and key in the same segment of this
        many positions (Sparse Transformer "fixed" blocks).
    is_causal : bool, default=False
        Keep only keys at or before the (bottom-right aligned) query position.
        (``causal=`` is its deprecated alias.)
    global_query : array_like, optional
        Bool flags ``(L,)`` or positions of queries that see every key.
    global_key : array_like, optional
        Bool flags ``(S,)`` or positions of keys every query sees.
    mask : array_like of bool, optional
        Broadcastable to ``(L, S)``, or ``(H, L, S)`` per head; True = attend.

    Raises
    ------
    ValueError
        For block sizes <= 0, negative window sizes, pointers or block numbers out
        of range, repeated or unsorted block numbers, or mismatched shapes.

    See Also
    --------
    block_sparse_attention, fastattn.sparse_patterns

    Examples
    --------
    Query block 0 visits key block 0, query block 1 visits key blocks 0 and 1
    (a block-causal layout for L = S = 4 with blocks of 2):

    >>> import fastattn
    >>> layout = fastattn.BlockLayout((4, 4), 2, indptr=[0, 1, 3], indices=[0, 0, 1])
    >>> layout.to_mask().astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 1],
           [1, 1, 1, 1]])

    The same blocks with a causal element rule:

    >>> fastattn.BlockLayout((4, 4), 2, [0, 1, 3], [0, 0, 1], is_causal=True).to_mask().astype(int)
    array([[1, 0, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [1, 1, 1, 1]])
    """

    def __init__(self, shape, block_size, indptr, indices, *, window=None, dilation=1,
                 segment=None, is_causal=False, global_query=None, global_key=None, mask=None,
                 causal=None):
        is_causal = _deprecated_causal(is_causal, causal, stacklevel=3)
        L, S = (operator.index(x) for x in shape)
        if not (0 <= L < _NO_LIMIT and 0 <= S < _NO_LIMIT):
            raise ValueError(f"shape must be two lengths in [0, 2**30), got {shape!r}")
        bq, bk = check_pair("block_size", block_size)
        self.shape, self.block_size = (L, S), (bq, bk)
        nqb, nkb = -(-L // bq), -(-S // bk)

        indptr = np.asarray(indptr)
        indices = np.asarray(indices)
        for name, a in (("indptr", indptr), ("indices", indices)):
            if a.size and a.dtype.kind not in "iu":
                raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
        if indptr.ndim not in (1, 2) or indptr.shape[-1] != nqb + 1:
            raise ValueError(f"indptr must have shape ({nqb + 1},) or (H, {nqb + 1}) for "
                             f"{nqb} query blocks, got {indptr.shape}")
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
        self.num_heads = indptr.shape[0] if indptr.ndim == 2 else None
        indptr = np.ascontiguousarray(indptr.reshape(-1, nqb + 1), dtype=np.int64)
        indices = np.ascontiguousarray(indices, dtype=np.int64)
        if indptr.shape[0] == 0:
            raise ValueError("indptr needs at least one head")
        starts, ends = indptr[:, :-1].ravel(), indptr[:, 1:].ravel()
        if (indptr < 0).any() or (indptr > indices.size).any() or (ends < starts).any():
            raise ValueError(f"indptr must be non-decreasing pointers into indices (size "
                             f"{indices.size}), got {indptr.tolist()}")
        if indices.size and (indices.min() < 0 or indices.max() >= nkb):
            raise ValueError(f"indices must be key block numbers in [0, {nkb}) for S={S} "
                             f"and block size {bk}")
        # strictly increasing within each row: count non-increasing steps per row
        steps = np.concatenate([[0], np.cumsum(np.diff(indices) <= 0)])
        long_rows = ends - starts >= 2
        if (steps[ends[long_rows] - 1] - steps[starts[long_rows]]).any():
            raise ValueError("indices must be strictly increasing within each query block")
        self.indptr, self.indices = indptr, indices

        self.window = None if window is None else check_window(window)
        self.dilation = check_int("dilation", dilation)
        self.segment = None if segment is None else check_int("segment", segment)
        self.is_causal = bool(is_causal)
        self.global_query = check_token_flags("global_query", global_query, L)
        self.global_key = check_token_flags("global_key", global_key, S)
        self.mask = None
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_:
                raise TypeError(f"mask must be bool (True = attend), got dtype {mask.dtype}")
            if mask.ndim > 3 or mask.ndim and (
                    mask.shape[-1] not in (1, S) or (mask.ndim > 1 and mask.shape[-2] not in (1, L))
                    or (mask.ndim == 3 and self.indptr.shape[0] not in (1, mask.shape[0]))):
                raise ValueError(f"mask of shape {mask.shape} does not broadcast to (L={L}, "
                                 f"S={S}) or (H, L, S)")
            self.mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)

    # ---- construction from other descriptions -----------------------------------------

    @classmethod
    def from_blocks(cls, block_mask, shape, block_size, **rule):
        """A layout visiting the True blocks of ``block_mask`` ``(nqb, nkb)`` or ``(H, nqb, nkb)``.

        ``rule`` takes the element-rule keywords of :class:`BlockLayout`.

        Examples
        --------
        >>> import fastattn
        >>> layout = fastattn.BlockLayout.from_blocks(np.eye(2, dtype=bool), (4, 4), 2)
        >>> layout.indptr.tolist(), layout.indices.tolist()
        ([[0, 1, 2]], [0, 1])
        """
        _rule_keywords(rule)
        blocks = np.asarray(block_mask, dtype=bool)
        if blocks.ndim not in (2, 3):
            raise ValueError(f"block_mask must be (nqb, nkb) or (H, nqb, nkb), "
                             f"got shape {blocks.shape}")
        per_head = blocks.ndim == 3
        blocks = blocks.reshape((-1,) + blocks.shape[-2:])
        counts = blocks.sum(axis=-1).reshape(-1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        nqb = blocks.shape[1]
        # one pointer row per head; heads share the flat indices array
        rows = np.stack([indptr[h * nqb: (h + 1) * nqb + 1] for h in range(blocks.shape[0])])
        indices = np.nonzero(blocks)[-1]
        bq, bk = check_pair("block_size", block_size)
        L, S = shape
        if blocks.shape[1:] != (-(-L // bq), -(-S // bk)):
            raise ValueError(f"block_mask of shape {blocks.shape[1:]} does not fit shape "
                             f"{tuple(shape)} with block size {(bq, bk)}")
        return cls(shape, (bq, bk), rows if per_head else rows[0], indices, **rule)

    @classmethod
    def from_mask(cls, mask, block_size=64):
        """The layout of a dense bool mask ``(L, S)`` or ``(H, L, S)``: it visits the
        blocks holding a True and keeps exactly the True pairs.

        Examples
        --------
        >>> import fastattn
        >>> mask = np.tril(np.ones((6, 6), dtype=bool))
        >>> layout = fastattn.BlockLayout.from_mask(mask, block_size=3)
        >>> layout.num_blocks, bool((layout.to_mask() == mask).all())
        (3, True)
        """
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.ndim not in (2, 3):
            raise ValueError(f"mask must be a bool array (L, S) or (H, L, S), got "
                             f"{mask.dtype} {mask.shape}")
        bq, bk = check_pair("block_size", block_size)
        L, S = mask.shape[-2:]
        if L and S:
            blocks = np.logical_or.reduceat(mask, np.arange(0, S, bk), axis=-1)
            blocks = np.logical_or.reduceat(blocks, np.arange(0, L, bq), axis=-2)
        else:
            blocks = np.zeros(mask.shape[:-2] + (-(-L // bq), -(-S // bk)), dtype=bool)
        return cls.from_blocks(blocks, (L, S), (bq, bk), mask=mask)

    @classmethod
    def from_rule(cls, shape, block_size=64, **rule):
        """The smallest layout for an element rule: the blocks where the rule keeps a pair.

        ``rule`` takes the element-rule keywords of :class:`BlockLayout`. The block
        list is computed from the rule's ranges, in ``O(blocks)`` time, without
        materialising the ``(L, S)`` pattern (a per-head ``mask`` is the exception:
        its blocks are reduced from it).

        Examples
        --------
        >>> import fastattn
        >>> layout = fastattn.BlockLayout.from_rule((8, 8), 2, window=(1, 0))
        >>> layout.to_mask()[:4, :4].astype(int)
        array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [0, 1, 1, 0],
               [0, 0, 1, 1]])
        >>> layout.num_blocks       # of 16 blocks
        7
        """
        _rule_keywords(rule)
        probe = cls(shape, block_size, np.zeros(-(-shape[0] // check_pair(
                    "block_size", block_size)[0]) + 1, np.int64), [], **rule)
        blocks = probe._rule_blocks()
        return cls.from_blocks(blocks, probe.shape, probe.block_size, **rule)

    # ---- what the layout covers -------------------------------------------------------

    @property
    def num_blocks(self):
        """Number of visited tiles (summed over heads for a per-head layout)."""
        return int((self.indptr[:, -1] - self.indptr[:, 0]).sum())

    @property
    def density(self):
        """Visited tiles / all tiles (per head on average): the kernel's cost relative
        to dense attention."""
        nqb, nkb = self.indptr.shape[1] - 1, -(-self.shape[1] // self.block_size[1])
        total = self.indptr.shape[0] * nqb * nkb
        return self.num_blocks / total if total else 0.0

    def block_mask(self):
        """Bool ``(nqb, nkb)`` (or ``(H, nqb, nkb)``): True where a tile is visited.

        Examples
        --------
        >>> import fastattn
        >>> fastattn.BlockLayout((4, 4), 2, [0, 1, 3], [0, 0, 1]).block_mask().astype(int)
        array([[1, 0],
               [1, 1]])
        """
        H, nqb1 = self.indptr.shape
        nkb = -(-self.shape[1] // self.block_size[1])
        out = np.zeros((H, nqb1 - 1, nkb), dtype=bool)
        for h in range(H):
            for r in range(nqb1 - 1):
                out[h, r, self.indices[self.indptr[h, r]:self.indptr[h, r + 1]]] = True
        return out if self.num_heads is not None else out[0]

    def to_mask(self):
        """The pattern as a dense bool ``(L, S)`` (or ``(H, L, S)``) mask, True = attend.

        ``scaled_dot_product_attention`` with this mask computes what
        :func:`block_sparse_attention` computes with the layout (for tests and
        small inputs: it is ``L x S`` in memory).

        Examples
        --------
        >>> import fastattn
        >>> fastattn.BlockLayout.from_rule((4, 4), 4, window=(1, 1)).to_mask().astype(int)
        array([[1, 1, 0, 0],
               [1, 1, 1, 0],
               [0, 1, 1, 1],
               [0, 0, 1, 1]])
        """
        L, S = self.shape
        bq, bk = self.block_size
        blocks = self.block_mask()
        keep = np.repeat(np.repeat(blocks, bq, axis=-2), bk, axis=-1)[..., :L, :S]
        return keep & self._rule_mask()

    def _rule_mask(self):
        # The element rule on every (i, j): (H|1, L, S) bool.
        L, S = self.shape
        ip = np.arange(L)[:, None] + (S - L)
        j = np.arange(S)[None, :]
        d = j - ip
        keep = np.ones((L, S), dtype=bool)
        if self.window is not None:
            keep &= (d >= -self.window[0]) & (d <= self.window[1])
        if self.dilation > 1:
            keep &= d % self.dilation == 0
        if self.segment is not None:
            keep &= ip // self.segment == j // self.segment
        if self.global_query is not None:
            keep |= self.global_query[:, None]
        if self.global_key is not None:
            keep |= self.global_key[None, :]
        if self.is_causal:
            keep &= d <= 0
        if self.mask is not None:
            keep = keep & self.mask
        return keep

    def _rule_blocks(self):
        # The tiles where the rule keeps a pair (H|1, nqb, nkb), from index ranges:
        # over a tile, d = j - i' takes every integer in [d_min, d_max].
        L, S = self.shape
        bq, bk = self.block_size
        q0 = np.arange(0, L, bq, dtype=np.int64)
        q1 = np.minimum(q0 + bq, L) - 1
        k0 = np.arange(0, S, bk, dtype=np.int64)
        k1 = np.minimum(k0 + bk, S) - 1
        off = S - L
        d_min = k0[None, :] - (q1[:, None] + off)
        d_max = k1[None, :] - (q0[:, None] + off)
        lo, hi = (-_NO_LIMIT, _NO_LIMIT) if self.window is None else \
            (-self.window[0], self.window[1])
        if self.is_causal:
            hi = min(hi, 0)
        a, b = np.maximum(d_min, lo), np.minimum(d_max, hi)
        local = a <= b
        if self.dilation > 1:
            local &= (b // self.dilation) * self.dilation >= a
        if self.segment is not None:
            # a superset: the key block meets a segment of one of the block's queries
            g = self.segment
            seg_lo = ((q0 + off) // g) * g
            seg_hi = ((q1 + off) // g) * g + g - 1
            local &= (k0[None, :] <= seg_hi[:, None]) & (k1[None, :] >= seg_lo[:, None])
        visible = d_min <= (0 if self.is_causal else _NO_LIMIT)
        blocks = local
        if self.global_query is not None:
            rows = np.logical_or.reduceat(self.global_query, q0) if L else np.zeros(0, bool)
            blocks = blocks | (rows[:, None] & visible)
        if self.global_key is not None:
            cols = np.logical_or.reduceat(self.global_key, k0) if S else np.zeros(0, bool)
            blocks = blocks | (cols[None, :] & visible)
        if self.mask is not None and L and S:
            m = np.broadcast_to(self.mask, self.mask.shape[:-2] + (L, S))
            m = np.logical_or.reduceat(np.logical_or.reduceat(m, k0, axis=-1), q0, axis=-2)
            if m.shape[0] == 1:      # a mask shared by all heads keeps the layout shared
                m = m[0]
            blocks = blocks & m
        return blocks

    def _kernel_rule(self, batch_shape):
        # The element rule as sparse.pyx takes it, or None when every pair of a
        # visited tile counts.
        if (self.window is None and self.dilation == 1 and self.segment is None
                and not self.is_causal and self.global_query is None
                and self.global_key is None and self.mask is None):
            return None
        lo, hi = (-_NO_LIMIT, _NO_LIMIT) if self.window is None else \
            (-min(self.window[0], _NO_LIMIT), min(self.window[1], _NO_LIMIT))
        rule = dict(lo=lo, hi=hi, clip=0 if self.is_causal else _NO_LIMIT,
                    dilation=self.dilation, segment=self.segment or 0,
                    gq=None, gk=None, mask=None)
        if self.global_query is not None:
            rule["gq"] = np.ascontiguousarray(self.global_query).view(np.uint8)
        if self.global_key is not None:
            rule["gk"] = np.ascontiguousarray(self.global_key).view(np.uint8)
        if self.mask is not None:
            m = self.mask.view(np.uint8)
            rule["mask"] = m
            lead = m[:, :1, :1] if m.shape[0] > 1 else None
            rule["mask_off"] = (batch_offsets(lead, batch_shape) if lead is not None
                                else np.zeros(max(1, int(np.prod(batch_shape))), np.intp))
            rule["mask_rs"] = m.strides[1] if m.shape[1] > 1 else 0
            rule["mask_cs"] = m.strides[2] if m.shape[2] > 1 else 0
        return rule

    @property
    def causal(self):
        """Deprecated alias of :attr:`is_causal`."""
        warnings.warn("BlockLayout.causal is deprecated: use BlockLayout.is_causal",
                      DeprecationWarning, stacklevel=2)
        return self.is_causal

    def _leads(self):
        # leading shape the layout contributes to the batch broadcast
        H = self.indptr.shape[0]
        if self.mask is not None and self.mask.shape[0] > 1:
            H = max(H, self.mask.shape[0])
        return (H,) if (self.num_heads is not None or H > 1) else ()

    def __repr__(self):
        return (f"BlockLayout(shape={self.shape}, block_size={self.block_size}, "
                f"heads={self.num_heads}, blocks={self.num_blocks}, "
                f"density={self.density:.3g})")


def _deprecated_causal(is_causal, causal, stacklevel):
    # is_causal, from the deprecated causal= keyword when that is given
    if causal is None:
        return is_causal
    if is_causal and not causal:
        raise ValueError("is_causal=True and causal=False contradict each other; pass is_causal "
                         "only")
    warnings.warn("causal= is deprecated: use is_causal= (the name scaled_dot_product_attention "
                  "and PyTorch use)", DeprecationWarning, stacklevel=stacklevel)
    return bool(causal)


def _rule_keywords(rule):
    # the element-rule keywords of from_rule / from_blocks, causal= turned into is_causal=
    # (warned about once, at the caller of the classmethod)
    if "causal" in rule:
        rule["is_causal"] = _deprecated_causal(rule.get("is_causal", False), rule.pop("causal"),
                                               stacklevel=4)
