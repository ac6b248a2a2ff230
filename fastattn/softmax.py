"""Masked softmax, log-softmax and materialised attention weights, by a fused kernel."""
import operator

import numpy as np

from fastattn import _threads
from fastattn._kernels import softmax as _softmax
from fastattn._layout import PreparedMask, as_mask, as_matrix_stack, batch_offsets, overlaps
from fastattn._validation import (as_array, check_choice, check_matrix_stacks, check_out,
                                  check_scale, result_dtypes)
from fastattn.attention import CAUSAL_ALIGNMENTS

__all__ = ["masked_softmax", "log_softmax", "attention_weights"]

_AxisError = getattr(np, "exceptions", np).AxisError

# Rows per work item: small enough to share a few matrices between the threads.
BLOCK_ROWS = 64
# Work of one element for the thread count (fastattn._threads.call_threads): about
# this many flops (scale, mask, max, exp, sum, normalise; float32 runs at ~0.6 ns).
ELEMENT_WORK = 20


def masked_softmax(x, mask=None, *, axis=-1, scale=None, out=None, num_threads=None):
    r"""Softmax of ``scale * x + mask`` along ``axis``, in one fused pass per row.

    Parameters
    ----------
    x : array_like
        Scores, at least 1-D.
    mask : array_like, optional
        Broadcastable to ``x.shape`` (it may not enlarge ``x``). bool: True keeps
        the entry, False drops it (probability 0). Floating: added to the scaled
        scores; ``-inf`` drops the entry whatever its score (``+inf`` or NaN too),
        exactly as False does. A broadcast mask is never expanded in memory.
    axis : int, default=-1
        The axis to normalise over.
    scale : float, optional
        Multiplies ``x`` before the mask is applied; default 1.
    out : ndarray, optional
        C-contiguous, writable, of ``x``'s shape and the result dtype. May be ``x``
        itself (in place).
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    ndarray
        Same shape as ``x``; float32 or float64 like ``x`` (float16 is computed in
        float32 and returned as float16, integers give float64).

    Raises
    ------
    TypeError
        For a non-real ``x`` or a mask that is neither bool nor floating.
    ValueError
        For a mask that does not broadcast to ``x``.
    numpy.exceptions.AxisError
        For an ``axis`` out of range.

    See Also
    --------
    log_softmax, attention_weights

    Notes
    -----
    A row with every entry masked out gives zeros, not NaN. A NaN (or ``+inf``)
    score that is not masked out makes its row NaN. Each row is scaled, masked, reduced to its max, exponentiated and
    summed, and normalised while it stays in cache; rows run in parallel.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> x = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    >>> fastattn.masked_softmax(x).round(3)
    array([[0.09 , 0.245, 0.665],
           [0.333, 0.333, 0.333]])
    >>> keep = np.array([True, True, False])      # broadcast over the rows
    >>> fastattn.masked_softmax(x, keep).round(3)
    array([[0.269, 0.731, 0.   ],
           [0.5  , 0.5  , 0.   ]])
    >>> fastattn.masked_softmax(x, np.zeros(3, dtype=bool))    # nothing kept: zeros
    array([[0., 0., 0.],
           [0., 0., 0.]])
    """
    return _softmax_along(x, mask, axis, scale, out, num_threads, log_out=False)


def log_softmax(x, mask=None, *, axis=-1, scale=None, out=None, num_threads=None):
    r"""Logarithm of :func:`masked_softmax`, computed without forming the softmax.

    ``log_softmax(x) = x - logsumexp(x)`` along ``axis``, stable for any scores.

    Parameters
    ----------
    x : array_like
        Scores, at least 1-D.
    mask : array_like, optional
        As in :func:`masked_softmax`; dropped entries give ``-inf``.
    axis : int, default=-1
        The axis to normalise over.
    scale : float, optional
        Multiplies ``x`` before the mask is applied; default 1.
    out : ndarray, optional
        C-contiguous, writable, of ``x``'s shape and the result dtype.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    ndarray
        Same shape and dtype rules as :func:`masked_softmax`. A fully masked row
        is all ``-inf`` (the log of zero probabilities).

    See Also
    --------
    masked_softmax

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> x = np.array([1.0, 2.0, 3.0])
    >>> fastattn.log_softmax(x).round(4)
    array([-2.4076, -1.4076, -0.4076])
    >>> bool(np.allclose(np.exp(fastattn.log_softmax(x)), fastattn.masked_softmax(x)))
    True
    """
    return _softmax_along(x, mask, axis, scale, out, num_threads, log_out=True)


def attention_weights(query, key, attn_mask=None, *, is_causal=False, scale=None,
                      causal_alignment="top_left", num_threads=None):
    r"""The attention probabilities ``softmax(query @ key.T * scale + mask)``.

    What attention heat-maps show: row ``i`` is how much query ``i`` reads each key.
    The arguments and conventions are those of
    :func:`fastattn.scaled_dot_product_attention`, whose output is
    ``attention_weights(...) @ value``.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
        Leading (batch) dimensions broadcast like ``np.matmul``.
    attn_mask : array_like, optional
        Broadcastable to ``(..., L, S)``; bool True = attend, float = added.
    is_causal : bool, default=False
        Query ``i`` sees keys ``j <= i`` (``top_left``) or ``j <= i + S - L``
        (``bottom_right``).
    scale : float, optional
        Default ``1 / sqrt(E)``.
    causal_alignment : {"top_left", "bottom_right"}, default="top_left"
    num_threads : int, optional
        Threads for the softmax; the score product uses BLAS's own threads.

    Returns
    -------
    ndarray, shape (..., L, S)
        Each row sums to 1, or is all 0 when every key of the row is masked out.

    Raises
    ------
    TypeError
        For non-real inputs or a mask that is neither bool nor floating.
    ValueError
        For shapes that do not match or broadcast.

    See Also
    --------
    masked_softmax, fastattn.scaled_dot_product_attention

    Notes
    -----
    This materialises the ``(..., L, S)`` weights, so it needs O(L·S) memory per
    batch entry by nature: one BLAS product for the scores, then the fused
    softmax kernel in place on them. To apply attention, use
    :func:`fastattn.scaled_dot_product_attention`, which never forms them.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> k = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    >>> w = fastattn.attention_weights(q, k, is_causal=True)
    >>> w.round(3)
    array([[1.  , 0.  , 0.  ],
           [0.33, 0.67, 0.  ]])
    """
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    (q, k), compute, result = check_matrix_stacks(("query", "key"), query, key)
    (L, E), S = q.shape[-2:], k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must have the same feature size E: query {q.shape}, "
                         f"key {k.shape}")
    scale = check_scale(scale, max(E, 1))
    mask = None if attn_mask is None else as_mask(attn_mask, "attn_mask")
    leads = [q.shape[:-2], k.shape[:-2]]
    if mask is not None:
        m_rows, m_cols = ((1, 1) + mask.shape)[-2:]
        if m_rows not in (1, L) or m_cols not in (1, S):
            raise ValueError(f"attn_mask of shape {mask.shape} does not broadcast to the "
                             f"scores (..., L={L}, S={S})")
        leads.append(mask.shape[:-2])
    try:
        batch_shape = np.broadcast_shapes(*leads)
    except ValueError:
        shapes = f"query {q.shape}, key {k.shape}"
        if mask is not None:
            shapes += f", attn_mask {mask.shape}"
        raise ValueError(f"batch dimensions do not broadcast: {shapes}") from None
    nthreads = _threads.resolve_num_threads(num_threads)

    # scores <- query @ key.T  (BLAS); the kernel then scales, masks and normalises
    scores = np.matmul(q.astype(compute, copy=False),
                       np.swapaxes(k.astype(compute, copy=False), -1, -2))
    shape = batch_shape + (L, S)
    in_place = scores.shape == shape
    if not in_place:
        # the mask adds batch dimensions: read the scores broadcast, write a new array
        scores = np.broadcast_to(scores, shape)
    elif not scores.flags.c_contiguous:
        # np.matmul keeps its operands' order in the batch axes (a Fortran-ordered query
        # gives Fortran-ordered scores); the kernel writes in place in C order
        scores = np.ascontiguousarray(scores)
    if mask is not None:
        mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
    causal_offset = None
    if is_causal:
        causal_offset = 0 if causal_alignment == "top_left" else S - L
    res = softmax_rows(scores, mask, scale, nthreads, causal_offset=causal_offset,
                       out=scores if in_place else None)
    return res if result == compute else res.astype(result)


def softmax_rows(x, mask, scale, nthreads, *, causal_offset=None, log_out=False, out=None):
    """Run the kernel over the last axis of ``x`` (..., R, N), already validated.

    ``x`` has the compute dtype; ``mask`` is None or bool/float with ``x.ndim`` axes,
    each 1 or ``x``'s; ``causal_offset`` (or None) keeps columns ``j <= i + offset``.
    ``out`` is None, a C-contiguous array of ``x``'s shape and dtype that does not
    overlap ``x``, or ``x`` itself when ``x`` is C-contiguous (in place).
    """
    R, N = x.shape[-2:]
    batch_shape = x.shape[:-2]
    res = np.empty(x.shape, dtype=x.dtype) if out is None else out
    if res.size == 0:
        return res
    xs, ldx = as_matrix_stack(x, x.dtype)
    x_off = batch_offsets(xs, batch_shape)
    nbatch = x_off.shape[0]
    nthreads = _threads.call_threads(nthreads, nbatch * R, ELEMENT_WORK * nbatch * R * N)
    # enough row blocks for about four per thread, at most BLOCK_ROWS rows each
    block_r = int(max(1, min(BLOCK_ROWS, R, -(-R * nbatch // (4 * nthreads)))))
    prepared = None
    if mask is not None:
        prepared = PreparedMask(mask, x.dtype, R, N, batch_shape, block_r, N)
    _softmax.softmax(xs, res, x_off, ldx, R, N, scale, prepared, causal_offset is not None,
                     causal_offset or 0, log_out, block_r, nthreads)
    return res


def _softmax_along(x, mask, axis, scale, out, num_threads, log_out):
    x_in = x
    x = as_array("x", x)
    compute, result = result_dtypes(x, names=("x",))
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-d array")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    if not -x.ndim <= axis < x.ndim:
        raise _AxisError(axis, x.ndim)
    axis %= x.ndim
    scale = 1.0 if scale is None else check_scale(scale, 1)
    if mask is not None:
        mask = as_mask(mask, "mask")
        try:
            shape = np.broadcast_shapes(mask.shape, x.shape)
        except ValueError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to x of shape "
                             f"{x.shape}")
        mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
    if out is not None:
        check_out(out, x.shape, result)
    nthreads = _threads.resolve_num_threads(num_threads)

    # the kernel normalises the last axis of a stack of matrices
    xm = np.moveaxis(x, axis, -1).astype(compute, copy=False)
    mm = None if mask is None else np.moveaxis(mask, axis, -1)
    if xm.ndim == 1:
        xm = xm[np.newaxis]
        mm = None if mm is None else mm[np.newaxis]
    last = axis == x.ndim - 1
    # the kernel writes only aligned memory (fastattn._layout): else through a copy
    in_place = (out is x_in and last and compute == result and xm.flags.c_contiguous
                and xm.flags.aligned and (mask is None or not np.may_share_memory(out, mask)))
    direct = (out is not None and last and compute == result and not in_place
              and out.flags.aligned and not overlaps(out, x, mask))
    target = xm if in_place else out.reshape(xm.shape) if direct else None
    res = softmax_rows(xm, mm, scale, nthreads, log_out=log_out, out=target)
    res = np.moveaxis(res.reshape(np.moveaxis(x, axis, -1).shape), -1, axis)
    if out is not None:
        if not (in_place or direct):
            out[...] = res
        return out
    return res if result == compute else res.astype(result)
