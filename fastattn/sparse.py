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
from fastattn._layout import as_matrix_stack, batch_offsets
from fastattn._validation import check_batch_shape, check_qkv, check_scale, storage_dtype
from fastattn.block_layout import BlockLayout

__all__ = ["BlockLayout", "block_sparse_attention"]


def block_sparse_attention(query, key, value, layout, *, scale=None, return_lse=False,
                           num_threads=None):
    """Attention over the tiles a :class:`BlockLayout` lists, and nothing else.

    Equal to :func:`fastattn.scaled_dot_product_attention` with the bool mask
    ``layout.to_mask()``, but only the visited tiles are computed: time is
    proportional to ``layout.num_blocks`` and extra memory is a few tiles per thread.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
        Leading dimensions broadcast like ``np.matmul``; a per-head layout is
        matched with axis -3 (the heads).
    layout : BlockLayout
        Built for ``(L, S)``.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(E)``.
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
        For non-real inputs or a ``layout`` that is not a :class:`BlockLayout`.
    ValueError
        For shapes that do not match each other or the layout.

    Notes
    -----
    A query row that attends no key (an empty row of the pattern) returns zeros and
    an lse of ``-inf``, like a fully masked row.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 256, 16)) for _ in range(3))
    >>> layout = fastattn.BlockLayout.from_rule((256, 256), 64, window=(32, 0))
    >>> out = fastattn.block_sparse_attention(q, k, v, layout)
    >>> ref = fastattn.scaled_dot_product_attention(q, k, v, layout.to_mask())
    >>> bool(np.allclose(out, ref)), layout.num_blocks, round(layout.density, 3)
    (True, 7, 0.438)
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a fastattn.BlockLayout, got {type(layout).__name__}")
    q, k, v, compute, result = check_qkv(query, key, value)
    L, E = q.shape[-2:]
    S, Ev = v.shape[-2:]
    if (L, S) != layout.shape:
        raise ValueError(f"layout is for (L, S) = {layout.shape}, the operands give "
                         f"(L, S) = {(L, S)}: query {q.shape}, key {k.shape}")
    scale = check_scale(scale, E)
    batch_shape = check_batch_shape(
        [q.shape[:-2], k.shape[:-2], v.shape[:-2], layout._leads()],
        query=q.shape, key=k.shape, value=v.shape, layout_heads=layout._leads())
    nthreads = _threads.resolve_num_threads(num_threads)

    storage = storage_dtype(compute, result, q, k, v)
    res = np.zeros(batch_shape + (L, Ev), dtype=storage)
    lse = np.full(batch_shape + (L,), -np.inf, dtype=compute) if return_lse else None
    if res.size and S and layout.num_blocks:
        q, ldq = as_matrix_stack(q, storage)
        k, ldk = as_matrix_stack(k, storage)
        v, ldv = as_matrix_stack(v, storage)
        q_off = batch_offsets(q, batch_shape)
        k_off = batch_offsets(k, batch_shape)
        v_off = batch_offsets(v, batch_shape)
        nbatch = q_off.shape[0]
        if layout.num_heads is not None:
            layout_off = batch_offsets(layout.indptr[:, None, :], batch_shape)
        else:
            layout_off = np.zeros(nbatch, dtype=np.intp)
        bq, bk = layout.block_size
        # items: (batch, query block); work: the flops of the visited tiles
        tiles = nbatch * layout.num_blocks / layout.indptr.shape[0]
        flops = 2.0 * tiles * min(bq, L) * min(bk, S) * (E + Ev)
        nthreads = _threads.call_threads(nthreads, nbatch * -(-L // bq), flops)
        out_off = batch_offsets(res, batch_shape)
        plan = AttentionPlan(q, k, v, res, lse, (q_off, k_off, v_off, out_off),
                             (ldq, ldk, ldv, Ev), L, S, E, Ev, None, scale=scale,
                             causal=False, causal_offset=0, block_q=bq, block_k=bk, nsplit=1,
                             nthreads=nthreads)
        sparse_plan = _sparse.SparsePlan(layout.indptr, layout.indices, layout_off,
                                         layout._kernel_rule(batch_shape), offset=S - L)
        with _threads.tile_blas(storage, Ev):
            _sparse.block_sparse(plan, sparse_plan)
    if result != storage:
        res = res.astype(result)
    return (res, lse) if return_lse else res
