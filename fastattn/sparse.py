"""Block-sparse attention: one kernel for every sparse attention pattern.

A :class:`BlockLayout` lists, for each block of query rows, the blocks of keys it
visits (CSR, per head or shared), plus an element rule that decides which pairs
take part inside those blocks. :func:`block_sparse_attention` computes only the
listed tiles, so its cost is proportional to their number. The patterns of
:mod:`fastattn.sparse_patterns` (local, strided, global, Longformer, BigBird) are
all layouts for this one kernel. :class:`BlockLayout` lives in
:mod:`fastattn.block_layout` and is re-exported here.
"""
import numpy as np

from fastattn import _threads
from fastattn._kernels import sparse as _sparse
from fastattn._kernels.plan import AttentionPlan
from fastattn._layout import PreparedMask, as_matrix_stack, batch_offsets
from fastattn._validation import check_batch_shape, check_choice, check_scale
from fastattn.attention import CAUSAL_ALIGNMENTS, _Operands
from fastattn.block_layout import _NO_LIMIT, BlockLayout

__all__ = ["BlockLayout", "block_sparse_attention"]


def block_sparse_attention(query, key, value, layout, attn_mask=None, *, is_causal=False,
                           causal_alignment="top_left", scale=None, enable_gqa=False,
                           return_lse=False, num_threads=None):
    """Attention over the tiles a :class:`BlockLayout` lists, and nothing else.

    Equal to :func:`fastattn.scaled_dot_product_attention` with the bool mask
    ``layout.to_mask()`` (combined with ``attn_mask``) and the same ``is_causal``,
    ``causal_alignment``, ``scale`` and ``enable_gqa``, but only the visited tiles
    are computed: time is proportional to ``layout.num_blocks`` and extra memory is
    a few tiles per thread.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
        Leading dimensions broadcast like ``np.matmul``; a per-head layout is
        matched with axis -3 (the query heads).
    layout : BlockLayout
        Built for ``(L, S)``.
    attn_mask : array_like, optional
        As for :func:`fastattn.scaled_dot_product_attention`, broadcastable to
        ``(..., L, S)``: bool True = attend, float added to the scaled scores. It
        applies on top of the layout: tiles it rules out entirely are skipped.
    is_causal : bool, default=False
        Also keep only keys ``j <= i`` (``top_left``) or ``j <= i + S - L``
        (``bottom_right``), as for :func:`fastattn.scaled_dot_product_attention`.
        (The layout's own ``is_causal`` rule is bottom-right aligned.)
    causal_alignment : {"top_left", "bottom_right"}, default="top_left"
        Where the diagonal of ``is_causal`` sits when ``L != S``.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(E)``.
    enable_gqa : bool, default=False
        Grouped-query attention: the head axis (-3) of ``key``/``value`` may divide
        that of ``query``; query head ``h`` reads key/value head
        ``h // (Hq // Hkv)``. K and V are not copied.
    return_lse : bool, default=False
        Also return each row's log-sum-exp over the pairs it attends, ``(..., L)``.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        For non-real inputs, a mask that is neither bool nor floating, or a
        ``layout`` that is not a :class:`BlockLayout`.
    ValueError
        For shapes that do not match each other or the layout (with
        ``enable_gqa``, key/value heads that do not divide the query heads), or
        an unknown ``causal_alignment``.

    Notes
    -----
    A query row that attends no key (an empty row of the pattern, or masked out)
    returns zeros and an lse of ``-inf``, like a fully masked row.

    Examples
    --------
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 256, 16)) for _ in range(3))
    >>> layout = fastattn.BlockLayout.from_rule((256, 256), 64, window=(32, 0))
    >>> out = fastattn.block_sparse_attention(q, k, v, layout)
    >>> ref = fastattn.scaled_dot_product_attention(q, k, v, layout.to_mask())
    >>> bool(np.allclose(out, ref)), layout.num_blocks, round(layout.density, 3)
    (True, 7, 0.438)

    Grouped-query heads, a padding mask and a causal diagonal on top of a layout:

    >>> q = rng.standard_normal((2, 8, 256, 16))                # 8 query heads
    >>> k, v = (rng.standard_normal((2, 2, 256, 16)) for _ in range(2))   # 2 kv-heads
    >>> pad = fastattn.padding_mask([256, 200], 256)            # (B, 1, 1, S)
    >>> wide = fastattn.BlockLayout.from_rule((256, 256), 64, window=(96, 96))
    >>> out = fastattn.block_sparse_attention(q, k, v, wide, pad, is_causal=True,
    ...                                       enable_gqa=True)
    >>> ref = fastattn.scaled_dot_product_attention(q, k, v, pad & wide.to_mask(),
    ...                                             is_causal=True, enable_gqa=True)
    >>> bool(np.allclose(out, ref))
    True
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a fastattn.BlockLayout, got {type(layout).__name__}")
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    ops = _Operands(query, key, value, attn_mask, enable_gqa)
    q, k, v, compute, result = ops.q, ops.k, ops.v, ops.compute, ops.result
    L, S, E, Ev = ops.L, ops.S, ops.E, ops.Ev
    if (L, S) != layout.shape:
        raise ValueError(f"layout is for (L, S) = {layout.shape}, the operands give "
                         f"(L, S) = {(L, S)}: query {q.shape}, key {k.shape}")
    scale = check_scale(scale, E)
    named = dict(query=q.shape, key=k.shape, value=v.shape, layout_heads=layout._leads())
    if ops.mask is not None:
        named["attn_mask"] = ops.mask.shape
    batch_shape = check_batch_shape([ops.batch_shape, layout._leads()], **named)
    nthreads = _threads.resolve_num_threads(num_threads)

    storage = ops.storage
    res = np.zeros(batch_shape + (L, Ev), dtype=storage)
    lse = np.full(batch_shape + (L,), -np.inf, dtype=compute) if return_lse else None
    if res.size and S and layout.num_blocks:
        q, ldq = as_matrix_stack(q, storage)
        k, ldk = as_matrix_stack(k, storage)
        v, ldv = as_matrix_stack(v, storage)
        # grouped-query heads: group query heads read one key/value head, by offsets
        group_axis = len(batch_shape) - 1 if ops.group > 1 else None
        q_off = batch_offsets(q, batch_shape)
        k_off = batch_offsets(k, batch_shape, group_axis, ops.group)
        v_off = batch_offsets(v, batch_shape, group_axis, ops.group)
        nbatch = q_off.shape[0]
        if layout.num_heads is not None:
            layout_off = batch_offsets(layout.indptr[:, None, :], batch_shape)
        else:
            layout_off = np.zeros(nbatch, dtype=np.intp)
        bq, bk = layout.block_size
        prepared = None
        if ops.mask is not None:
            prepared = PreparedMask(ops.mask, compute, L, S, batch_shape, bq, bk)
        # items: (batch, query block); work: the flops of the visited tiles
        tiles = nbatch * layout.num_blocks / layout.indptr.shape[0]
        flops = 2.0 * tiles * min(bq, L) * min(bk, S) * (E + Ev)
        nthreads = _threads.call_threads(nthreads, nbatch * -(-L // bq), flops)
        out_off = batch_offsets(res, batch_shape)
        plan = AttentionPlan(q, k, v, res, lse, (q_off, k_off, v_off, out_off),
                             (ldq, ldk, ldv, Ev), L, S, E, Ev, prepared, scale=scale,
                             causal=False, causal_offset=0, block_q=bq, block_k=bk, nsplit=1,
                             nthreads=nthreads)
        rule = layout._kernel_rule(batch_shape)
        if is_causal:
            # j <= i + offset, i.e. j - i' <= offset - (S - L) with the rule's i' = i + S - L
            offset = 0 if causal_alignment == "top_left" else S - L
            clip = offset - (S - L)
            if rule is None:
                rule = dict(lo=-_NO_LIMIT, hi=_NO_LIMIT, clip=clip, dilation=1, segment=0,
                            gq=None, gk=None, mask=None)
            else:
                rule["clip"] = min(rule["clip"], clip)
        sparse_plan = _sparse.SparsePlan(layout.indptr, layout.indices, layout_off, rule,
                                         offset=S - L)
        with _threads.tile_blas(storage, Ev):
            _sparse.block_sparse(plan, sparse_plan)
    if result != storage:
        res = res.astype(result)
    return (res, lse) if return_lse else res
