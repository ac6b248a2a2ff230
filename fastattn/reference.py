"""Plain NumPy float64 definitions of what fastattn computes.

These are the unfused formulas, written for clarity rather than speed: they
materialise the full ``(..., L, S)`` score matrix. The tests and docs use them as
the definition of correct.
"""
import numpy as np

from fastattn._validation import check_dropout

__all__ = ["scaled_dot_product_attention", "causal_keep", "masked_softmax", "dropout_keep"]


def causal_keep(L, S, alignment="top_left"):
    """Bool ``(L, S)`` array, True where query ``i`` may see key ``j``.

    ``top_left``: ``j <= i``; ``bottom_right``: ``j <= i + S - L``.

    Examples
    --------
    >>> from fastattn.reference import causal_keep
    >>> causal_keep(2, 3, "bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    offset = 0 if alignment == "top_left" else S - L
    return np.arange(S)[None, :] <= np.arange(L)[:, None] + offset


def masked_softmax(scores, keep=None):
    """Softmax over the last axis where only ``keep`` entries take part.

    Returns ``(probabilities, lse)``; a row with nothing to keep (or only ``-inf``
    scores) gives zero probabilities and ``lse = -inf``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import masked_softmax
    >>> p, lse = masked_softmax(np.zeros((2, 3)), np.array([[True, True, False], [False] * 3]))
    >>> p
    array([[0.5, 0.5, 0. ],
           [0. , 0. , 0. ]])
    >>> lse.round(4)
    array([0.6931,   -inf])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True) if scores.shape[-1] else \
        np.full(scores.shape[:-1] + (1,), -np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(invalid="ignore"):
        e = np.exp(scores - safe_max)
    total = e.sum(axis=-1, keepdims=True)
    probs = e / np.where(total == 0, 1.0, total)
    with np.errstate(divide="ignore"):
        lse = np.where(total == 0, -np.inf, safe_max + np.log(total))[..., 0]
    return probs, lse


# The dropout hash (fastattn/_kernels/dropout.h): SplitMix64's finaliser over a Weyl
# sequence, one stream per (seed, batch, row).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_keep(shape, dropout_p, seed):
    """Bool array of ``shape`` ``(..., L, S)``: which attention probabilities the kernel's
    dropout keeps for ``dropout_p`` and a 64-bit ``seed``.

    Element ``(b, i, j)`` (``b`` the flat index over the leading dimensions) is kept
    when ``h(b, i, j) >= floor(dropout_p * 2**64)``, with

        key_b  = mix64(seed + G (b + 1))
        key_bi = mix64(key_b + G (i + 1))
        h      = mix64(key_bi + G (j + 1))

    mod ``2**64``, where ``G = 0x9E3779B97F4A7C15`` and ``mix64`` is SplitMix64's
    finaliser: each row is a SplitMix64 stream. The kernel computes the same bits.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import dropout_keep, softmax
    >>> keep = dropout_keep((4, 64, 64), 0.25, seed=1)
    >>> round(float(keep.mean()), 2)
    0.75
    >>> bool((keep == dropout_keep((4, 64, 64), 0.25, seed=1)).all())
    True
    """
    *batch, L, S = shape
    nb = int(np.prod(batch, dtype=np.int64))
    threshold = np.uint64(int(dropout_p * 2.0**64)) if dropout_p > 0 else np.uint64(0)
    with np.errstate(over="ignore"):
        b = np.arange(1, nb + 1, dtype=np.uint64)[:, None, None]
        i = np.arange(1, L + 1, dtype=np.uint64)[None, :, None]
        j = np.arange(1, S + 1, dtype=np.uint64)[None, None, :]
        key_b = _mix64(np.uint64(seed) + _GOLDEN * b)
        key_bi = _mix64(key_b + _GOLDEN * i)
        h = _mix64(key_bi + _GOLDEN * j)
    return (h >= threshold).reshape(tuple(shape))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, rng=None,
                                 causal_alignment="top_left", return_lse=False, window=None,
                                 alibi_slopes=None, softcap=None):
    """``softmax(query @ key.T * scale + mask) @ value`` in float64, unfused.

    Same arguments and conventions as :func:`fastattn.scaled_dot_product_attention`
    (bool mask True = attend, float mask added, fully masked rows give 0 and an lse
    of ``-inf``). With ``dropout_p > 0`` the probabilities are multiplied by
    :func:`dropout_keep`'s mask for the seed ``rng`` gives, divided by
    ``1 - dropout_p``: the same mask as the kernel's for the same ``rng``.
    The score modifiers follow flash-attn's order (its
    ``attention_ref``): scale, :func:`softcap_scores`, add :func:`alibi_bias`, then
    ``attn_mask``, the causal band and :func:`window_keep`; all three use the
    diagonal offset ``off`` of ``causal_alignment`` (0 or ``S - L``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import scaled_dot_product_attention
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[1.0], [0.0]])
    >>> out = scaled_dot_product_attention(q, k, v, scale=1.0)
    >>> round(float(out[0, 0]), 6) == round(float(np.e / (np.e + 1)), 6)
    True
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    if enable_gqa and k.ndim >= 3 and k.shape[-3] not in (1, q.shape[-3]):
        group = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    if softcap is not None:
        scores = softcap_scores(scores, softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, L, S, causal_alignment)
    keep = None
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == np.bool_:
            keep = attn_mask
        else:
            scores, keep = _scores_with_mask(scores, attn_mask)
    if is_causal:
        c = causal_keep(L, S, causal_alignment)
        keep = c if keep is None else np.logical_and(keep, c)
    if window is not None:
        w = window_keep(L, S, window, causal_alignment)
        keep = w if keep is None else np.logical_and(keep, w)
    probs, lse = masked_softmax(scores, keep)
    dropout_p, seed = check_dropout(dropout_p, rng)
    if seed is not None:
        probs = np.broadcast_to(probs, np.broadcast_shapes(probs.shape[:-2], v.shape[:-2])
                                + probs.shape[-2:])
        probs = probs * dropout_keep(probs.shape, dropout_p, seed) / (1.0 - dropout_p)
    out = probs @ v
    return (out, lse) if return_lse else out


# ---- score modifiers and packed variable-length batches (issue #19) -------------------
# flash-attn's documented conventions (flash_attn_interface.py docstrings, and
# attention_ref / construct_local_mask / attn_bias_from_alibi_slopes in its tests).
# Query i sits at key position i + off, off = 0 ("top_left") or S - L ("bottom_right",
# flash-attn's only alignment).

__all__ += ["diagonal_offset", "window_keep", "alibi_bias", "softcap_scores",
            "varlen_attention"]


def diagonal_offset(L, S, alignment="top_left"):
    """``off``: 0 for ``top_left``, ``S - L`` for ``bottom_right``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import diagonal_offset
    >>> diagonal_offset(2, 5, "bottom_right")
    3
    """
    return 0 if alignment == "top_left" else S - L


def window_keep(L, S, window, alignment="top_left"):
    """Bool ``(L, S)``, True where ``i + off - left <= j <= i + off + right``.

    flash-attn's ``window_size=(left, right)``: a side that is ``None`` or ``-1`` is
    unbounded; a window of ``(0, 0)`` keeps the diagonal only.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import window_keep
    >>> window_keep(3, 4, (1, 0), "bottom_right").astype(int)
    array([[1, 1, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 1, 1]])
    >>> window_keep(2, 3, (None, 0)).astype(int)   # = causal_keep(2, 3)
    array([[1, 0, 0],
           [1, 1, 0]])
    """
    left, right = (None if w is None or w == -1 else int(w) for w in window)
    d = np.arange(S)[None, :] - (np.arange(L)[:, None] + diagonal_offset(L, S, alignment))
    keep = np.ones((L, S), dtype=bool)
    if left is not None:
        keep &= d >= -left
    if right is not None:
        keep &= d <= right
    return keep


def alibi_bias(slopes, L, S, alignment="top_left"):
    """ALiBi bias ``-slope * |i + off - j|``, shape ``slopes.shape + (L, S)``.

    ``slopes`` of shape ``(H,)`` or ``(B, H)`` (flash-attn's ``alibi_slopes``), so the
    result broadcasts against ``(B, H, L, S)`` scores.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import alibi_bias
    >>> alibi_bias([0.5], 2, 3, "bottom_right")
    array([[[-0.5, -0. , -0.5],
            [-1. , -0.5, -0. ]]])
    """
    slopes = np.asarray(slopes, dtype=np.float64)
    d = np.arange(L)[:, None] + diagonal_offset(L, S, alignment) - np.arange(S)[None, :]
    return -slopes[..., None, None] * np.abs(d)


def softcap_scores(scores, softcap):
    """Soft-capped scores ``softcap * tanh(scores / softcap)`` (Gemma 2, flash-attn).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import softcap_scores
    >>> softcap_scores(np.array([0.0, 1.0, 100.0]), 5.0).round(4)
    array([0.    , 0.9869, 5.    ])
    """
    return softcap * np.tanh(np.asarray(scores, dtype=np.float64) / softcap)


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     causal_alignment="bottom_right", scale=None, window=None,
                     alibi_slopes=None, softcap=None, return_lse=False):
    """:func:`fastattn.varlen_attention` in float64: each packed sequence on its own.

    flash-attn's packed layout: ``query (total_q, Hq, E)``, ``key (total_k, Hkv, E)``,
    ``value (total_k, Hkv, Ev)``; sequence ``b`` is rows ``cu_seqlens_q[b] :
    cu_seqlens_q[b + 1]`` of the query and ``cu_seqlens_k[b] : cu_seqlens_k[b + 1]`` of
    key and value. Each is attended with :func:`scaled_dot_product_attention`
    (grouped-query heads, the modifiers with that sequence's own ``L`` and ``S``;
    ``alibi_slopes`` ``(Hq,)`` or ``(batch, Hq)``). Returns ``(total_q, Hq, Ev)`` and,
    with ``return_lse``, the lse ``(Hq, total_q)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import varlen_attention
    >>> q = np.ones((3, 1, 2)); k = np.ones((3, 1, 2)); v = np.arange(3.0).reshape(3, 1, 1)
    >>> varlen_attention(q, k, v, [0, 1, 3], [0, 1, 3], is_causal=True)[:, 0, 0]
    array([0. , 1. , 1.5])
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    cq, ck = (np.asarray(c, dtype=np.int64) for c in (cu_seqlens_q, cu_seqlens_k))
    total_q, H, _ = q.shape
    out = np.zeros((total_q, H, v.shape[2]))
    lse = np.full((H, total_q), -np.inf)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    for b in range(len(cq) - 1):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        s_b = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        o, l_b = scaled_dot_product_attention(
            q[rq].transpose(1, 0, 2), k[rk].transpose(1, 0, 2), v[rk].transpose(1, 0, 2),
            is_causal=is_causal, causal_alignment=causal_alignment, scale=scale,
            enable_gqa=True, return_lse=True, window=window, alibi_slopes=s_b,
            softcap=softcap)
        out[rq] = o.transpose(1, 0, 2)
        lse[:, rq] = l_b
    return (out, lse) if return_lse else out


# ---- gradients (issue #15) --------------------------------------------------------------

__all__ += ["unbroadcast", "scaled_dot_product_attention_backward", "masked_softmax_backward"]


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes NumPy broadcast an array of ``shape`` along.

    The gradient of an input that was broadcast is the sum over the broadcast
    dimensions: leading axes it lacked, and axes where it had size 1.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import unbroadcast, softmax
    >>> unbroadcast(np.ones((2, 3, 4)), (3, 1)).tolist()
    [[8.0], [8.0], [8.0]]
    """
    grad = np.asarray(grad)
    shape = tuple(shape)
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def scaled_dot_product_attention_backward(grad_out, query, key, value, attn_mask=None, *,
                                          is_causal=False, scale=None, enable_gqa=False,
                                          causal_alignment="top_left", mask_grad=False,
                                          dropout_p=0.0, rng=None):
    """Gradients of :func:`scaled_dot_product_attention` in float64, unfused.

    The definition of correct for :func:`fastattn.scaled_dot_product_attention_backward`,
    from the inputs alone (the forward's ``out`` and ``lse`` are recomputed, so they are
    not arguments). With ``Z = scale * Q K^T + mask`` (``-inf`` where a bool mask or the
    causal band drops a key), ``P = softmax(Z)`` (rows with no visible key are 0) and
    ``O = P V``::

        dV = P^T dO,  dP = dO V^T,  dZ = P * (dP - rowsum(dO * O)),
        dQ = scale * dZ K,  dK = scale * dZ^T Q,  dmask = dZ

    computed over the broadcast batch, then summed back to each input's own shape:
    over the query heads of a group (``enable_gqa``), over broadcast batch dimensions,
    and for the mask over every dimension it was broadcast along.

    With dropout (``dropout_p > 0`` and the forward's ``rng``) ``O = (P * M) V`` with
    ``M`` :func:`dropout_keep`'s mask over ``1 - dropout_p``, and ``P * M`` replaces
    ``P`` in ``dV``, ``dP * M`` replaces ``dP`` in ``dZ``.

    Returns ``(dq, dk, dv)``, float64, of the inputs' shapes, and with ``mask_grad=True``
    (a float ``attn_mask``) a fourth array of the mask's shape.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import scaled_dot_product_attention_backward, softmax
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[1.0], [0.0]])
    >>> dq, dk, dv = scaled_dot_product_attention_backward(np.ones((1, 1)), q, k, v, scale=1.0)
    >>> dv.ravel().round(4).tolist()      # dV = P^T dO, P = softmax([1, 0])
    [0.7311, 0.2689]
    """
    g, q, k, v = (np.asarray(a, dtype=np.float64) for a in (grad_out, query, key, value))
    shapes = q.shape, k.shape, v.shape
    group = 1
    if enable_gqa and k.ndim >= 3 and q.ndim >= 3 and k.shape[-3] not in (1, q.shape[-3]):
        group = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    keep = None
    mask = None if attn_mask is None else np.asarray(attn_mask)
    if mask is not None:
        if mask.dtype == np.bool_:
            keep = mask
        else:
            scores = scores + mask.astype(np.float64)
    if mask_grad and (mask is None or mask.dtype == np.bool_):
        raise ValueError("mask_grad=True needs a floating attn_mask")
    if is_causal:
        c = causal_keep(L, S, causal_alignment)
        keep = c if keep is None else np.logical_and(keep, c)
    p, _ = masked_softmax(scores, keep)
    drop = 1.0
    dropout_p, seed = check_dropout(dropout_p, rng)
    if seed is not None:
        p = np.broadcast_to(p, np.broadcast_shapes(p.shape[:-2], v.shape[:-2]) + p.shape[-2:])
        drop = dropout_keep(p.shape, dropout_p, seed) / (1.0 - dropout_p)
    out = (p * drop) @ v
    batch = p.shape[:-2]
    g = np.broadcast_to(g, batch + (L, v.shape[-1]))
    dv = np.swapaxes(p * drop, -1, -2) @ g
    dp = (g @ np.swapaxes(v, -1, -2)) * drop
    dz = p * (dp - (g * out).sum(axis=-1, keepdims=True))
    dq = scale * (dz @ k)
    dk = scale * (np.swapaxes(dz, -1, -2) @ np.broadcast_to(q, batch + q.shape[-2:]))
    if group > 1:
        # query head h read key/value head h // group: sum each group's gradients
        dk = dk.reshape(dk.shape[:-3] + (-1, group) + dk.shape[-2:]).sum(axis=-3)
        dv = dv.reshape(dv.shape[:-3] + (-1, group) + dv.shape[-2:]).sum(axis=-3)
    grads = tuple(unbroadcast(d, shape) for d, shape in zip((dq, dk, dv), shapes))
    if mask_grad:
        grads += (unbroadcast(dz, mask.shape),)
    return grads


def masked_softmax_backward(grad, y, axis=-1, *, scale=None):
    """Gradient of a softmax from its output: ``scale * y * (grad - sum(grad * y))``.

    ``y = softmax(scale * x + mask)`` along ``axis`` (:func:`softmax`); ``grad`` is the
    gradient of the loss with respect to ``y``. Returns the gradient with respect to
    ``x`` (that of a float mask is the same with ``scale=None``); entries a mask dropped
    (``y == 0``) get 0. float64.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import masked_softmax_backward, softmax
    >>> y = softmax(np.array([0.0, 0.0]))
    >>> masked_softmax_backward(np.array([1.0, 0.0]), y).tolist()
    [0.25, -0.25]
    """
    g, y = np.asarray(grad, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = y * (g - (g * y).sum(axis=axis, keepdims=True))
    return dx if scale is None else scale * dx


# ---- sparse patterns as dense bool masks (issue #4) ----------------------------------
# Query i sits at key position i + S - L (bottom-right alignment); M[i, j] True = attend.

__all__ += ["local_keep", "strided_keep", "global_keep", "local_attention",
            "strided_attention", "global_attention", "longformer_attention"]


def _relative_positions(L, S):
    i = np.arange(L)[:, None] + (S - L)
    j = np.arange(S)[None, :]
    return i, j


def local_keep(L, S, window, dilation=1):
    """Bool ``(L, S)``: ``-left <= j - i' <= right`` and ``(j - i') % dilation == 0``.

    Examples
    --------
    >>> from fastattn.reference import local_keep
    >>> local_keep(4, 4, (1, 2)).astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 1],
           [0, 1, 1, 1],
           [0, 0, 1, 1]])
    """
    left, right = (window, window) if np.ndim(window) == 0 else window
    i, j = _relative_positions(L, S)
    d = j - i
    return (d >= -left) & (d <= right) & (d % dilation == 0)


def strided_keep(L, S, stride, mode="strided", summary=None):
    """Bool ``(L, S)`` Sparse Transformer pattern (LRA ``_build_mask``), causal.

    strided: ``(i' - j) % stride == 0``; fixed: ``i' // stride == j // stride`` or
    ``j % stride == 0`` or ``j % stride >= stride - summary``.

    Examples
    --------
    >>> from fastattn.reference import strided_keep
    >>> strided_keep(4, 4, 2).astype(int)
    array([[1, 0, 0, 0],
           [0, 1, 0, 0],
           [1, 0, 1, 0],
           [0, 1, 0, 1]])
    """
    i, j = _relative_positions(L, S)
    if mode == "strided":
        keep = (i - j) % stride == 0
    else:
        summary = max(1, stride // 4) if summary is None else summary
        keep = (i // stride == j // stride) | (j % stride == 0) | (j % stride >= stride - summary)
    return keep & (j <= i)


def global_keep(L, S, global_tokens):
    """Bool ``(L, S)``: ``g[i'] or g[j]`` for global key positions ``global_tokens``.

    Examples
    --------
    >>> from fastattn.reference import global_keep
    >>> global_keep(3, 3, [0]).astype(int)
    array([[1, 1, 1],
           [1, 0, 0],
           [1, 0, 0]])
    """
    g = np.zeros(S, dtype=bool)
    g[np.asarray(global_tokens, dtype=np.intp)] = True
    i, j = _relative_positions(L, S)
    gi = np.zeros((L, 1), dtype=bool)
    inside = (i >= 0) & (i < S)
    gi[inside] = g[i[inside]]
    return gi | g[j]


def _masked(query, key, value, keep, scale, return_lse):
    return scaled_dot_product_attention(query, key, value, keep, scale=scale,
                                        return_lse=return_lse)


def local_attention(query, key, value, window, *, dilation=1, global_tokens=None, scale=None,
                    return_lse=False):
    """Full attention with the :func:`local_keep` (| :func:`global_keep`) mask.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import local_attention
    >>> q = k = v = np.eye(3)
    >>> local_attention(q, k, v, (0, 0))
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    """
    L, S = np.shape(query)[-2], np.shape(key)[-2]
    keep = local_keep(L, S, window, dilation)
    if global_tokens is not None:
        keep = keep | global_keep(L, S, global_tokens)
    return _masked(query, key, value, keep, scale, return_lse)


def strided_attention(query, key, value, stride, *, mode="strided", summary=None, scale=None,
                      return_lse=False):
    """Full attention with the :func:`strided_keep` mask.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import strided_attention
    >>> strided_attention(np.eye(2), np.eye(2), np.eye(2), 1)[0].tolist()
    [1.0, 0.0]
    """
    keep = strided_keep(np.shape(query)[-2], np.shape(key)[-2], stride, mode, summary)
    return _masked(query, key, value, keep, scale, return_lse)


def global_attention(query, key, value, global_tokens, *, window=(0, 0), scale=None,
                     return_lse=False):
    """Full attention with ``local_keep(window) | global_keep(global_tokens)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import global_attention
    >>> global_attention(np.eye(2), np.eye(2), np.eye(2), [0])[1].round(3).tolist()
    [0.33, 0.67]
    """
    return local_attention(query, key, value, window, global_tokens=global_tokens,
                           scale=scale, return_lse=return_lse)


def longformer_attention(query, key, value, window, global_tokens, *, dilation=1, scale=None,
                         return_lse=False):
    """Full attention with ``local_keep(window, dilation) | global_keep(global_tokens)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import longformer_attention
    >>> longformer_attention(np.eye(2), np.eye(2), np.eye(2), 0, [0])[1].round(3).tolist()
    [0.33, 0.67]
    """
    return local_attention(query, key, value, window, dilation=dilation,
                           global_tokens=global_tokens, scale=scale, return_lse=return_lse)


# ---- paged KV cache --------------------------------------------------------------------

__all__ += ["gather_blocks", "paged_attention"]


def gather_blocks(blocks, block_ids, length):
    """The first ``length`` entries of a sequence's blocks, as one contiguous array.

    ``blocks`` is a pool ``(num_blocks, H_kv, block_size, D)``; the result is
    ``(H_kv, length, D)``: blocks ``block_ids[0], block_ids[1], ...`` in order.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import gather_blocks
    >>> pool = np.arange(12.0).reshape(3, 1, 2, 2)    # 3 blocks of 2 entries
    >>> gather_blocks(pool, [2, 0], 3)[0]
    array([[ 8.,  9.],
           [10., 11.],
           [ 0.,  1.]])
    """
    blocks = np.asarray(blocks)
    nblk = -(-int(length) // blocks.shape[2])
    ids = np.asarray(block_ids[:nblk], dtype=np.intp)
    seq = blocks[ids].transpose(1, 0, 2, 3).reshape(blocks.shape[1], -1, blocks.shape[3])
    return seq[:, :length]


def paged_attention(query, key_blocks, value_blocks, block_table, seq_lens, *, scale=None,
                    causal=True, return_lse=False, window=None, alibi_slopes=None,
                    softcap=None):
    """:func:`fastattn.paged_attention` in float64: gather each sequence, then attend.

    Sequence ``b`` is attended with :func:`scaled_dot_product_attention` over its
    gathered keys and values (grouped-query heads, bottom-right alignment for the
    causal band, the window and ALiBi; ``alibi_slopes`` ``(H,)`` or ``(B, H)``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import paged_attention
    >>> kb = np.ones((2, 1, 2, 2)); vb = np.arange(8.0).reshape(2, 1, 2, 2)
    >>> paged_attention(np.ones((1, 1, 1, 2)), kb, vb, [[1, 0]], [3])[0, 0]
    array([[3.33333333, 4.33333333]])
    """
    q = np.asarray(query, dtype=np.float64)
    B, H, T, _ = q.shape
    Ev = np.shape(value_blocks)[3]
    out = np.zeros((B, H, T, Ev))
    lse = np.full((B, H, T), -np.inf)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    for b in range(B):
        k = gather_blocks(key_blocks, block_table[b], seq_lens[b])
        v = gather_blocks(value_blocks, block_table[b], seq_lens[b])
        out[b], lse[b] = scaled_dot_product_attention(
            q[b], k, v, is_causal=causal, causal_alignment="bottom_right", scale=scale,
            enable_gqa=True, return_lse=True, window=window,
            alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b]),
            softcap=softcap)
    return (out, lse) if return_lse else out


# ---- low-rank and kernelised attention (issue #4) ------------------------------------

__all__ += ["linear_attention", "performer_attention", "linformer_attention",
            "synthesizer_attention"]


def _normalised_products(phi_q, phi_k, v, causal, eps):
    a = phi_q @ np.swapaxes(phi_k, -1, -2)
    if causal:
        a = np.tril(a)
    return (a @ v) / (a.sum(axis=-1, keepdims=True) + eps)


def linear_attention(query, key, value, *, feature_map="elu", causal=False, eps=1e-6):
    """Naive ``O(L S)`` linear attention: ``A = phi(Q) phi(K)^T`` (``tril`` when causal),
    ``out = A V / (A 1 + eps)``, ``phi(x) = elu(x) + 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import linear_attention
    >>> linear_attention(np.zeros((1, 2)), np.zeros((2, 2)), np.array([[1.0], [3.0]]))
    array([[1.9999995]])
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    phi = (lambda x: np.where(x > 0, x + 1, np.exp(x))) if feature_map == "elu" else feature_map
    return _normalised_products(phi(q), phi(k), v, causal, eps)


def performer_attention(query, key, value, features, *, causal=False, scale=None):
    """FAVOR+ with explicit features ``W`` (m, E), naive ``O(L S)`` form.

    ``phi(x) = m^{-1/2} (exp(W x' - |x'|^2/2 - stab) + 1e-4)``, ``x' = x sqrt(scale)``,
    stab = row max for queries, global max for keys; ``A = phi(Q) phi(K)^T``
    (``tril`` when causal); ``out = A V / R`` with ``R = A 1`` pushed by ``2e-6``
    where ``|R| <= 1e-6``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import performer_attention
    >>> w = np.ones((1, 2))
    >>> performer_attention(np.zeros((1, 2)), np.zeros((2, 2)), np.array([[1.0], [3.0]]), w)
    array([[2.]])
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    w = np.asarray(features, dtype=np.float64)
    root = np.sqrt(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)

    def phi(x, axes):
        x = x * root
        proj = x @ w.T - 0.5 * (x * x).sum(axis=-1, keepdims=True)
        return (np.exp(proj - proj.max(axis=axes, keepdims=True)) + 1e-4) / np.sqrt(len(w))

    a = phi(q, -1) @ np.swapaxes(phi(k, (-2, -1)), -1, -2)
    if causal:
        a = np.tril(a)
    r = a.sum(axis=-1, keepdims=True)
    return (a @ v) / (r + 2e-6 * (np.abs(r) <= 1e-6))


def linformer_attention(query, key, value, e_proj, f_proj=None, *, scale=None):
    """``softmax(Q (E K)^T * scale) (F V)``; ``F = E`` when not given.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import linformer_attention, scaled_dot_product_attention
    >>> q = k = v = np.eye(2)
    >>> bool(np.allclose(linformer_attention(q, k, v, np.eye(2)),
    ...                  scaled_dot_product_attention(q, k, v)))
    True
    """
    e = np.asarray(e_proj, dtype=np.float64)
    f = e if f_proj is None else np.asarray(f_proj, dtype=np.float64)
    return scaled_dot_product_attention(query, e @ np.asarray(key, dtype=np.float64),
                                        f @ np.asarray(value, dtype=np.float64), scale=scale)


def synthesizer_attention(value, logits):
    """``softmax(logits) @ value`` for synthesised ``(..., S, S)`` logits.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import synthesizer_attention
    >>> synthesizer_attention(np.array([[1.0], [3.0]]), np.zeros((2, 2)))
    array([[2.],
           [2.]])
    """
    probs, _ = masked_softmax(logits)
    return probs @ np.asarray(value, dtype=np.float64)


# ---- building blocks (issue #3): direct float64 transcriptions of the formulas --------

__all__ += ["softmax", "log_softmax", "attention_weights", "multi_head_attention",
            "additive_attention", "concat_attention", "general_attention", "dot_attention",
            "sinusoidal_positional_encoding", "apply_rotary"]


def _scores_with_mask(scores, mask):
    # split a mask into (scores + float part, bool keep); a -inf of a float mask drops
    # the pair whatever its score (+inf or NaN too), as False does
    if mask is None:
        return scores, None
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return scores, mask
    mask = mask.astype(np.float64)
    drop = np.isneginf(mask)
    return scores + np.where(drop, 0.0, mask), ~drop


def softmax(x, mask=None, *, axis=-1, scale=None):
    """Softmax of ``scale * x + mask`` along ``axis`` (bool mask True = keep); 0 rows when
    nothing is kept.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import softmax
    >>> softmax(np.array([0.0, 0.0]), np.array([True, False]))
    array([1., 0.])
    """
    x = np.asarray(x, dtype=np.float64) * (1.0 if scale is None else scale)
    x, keep = _scores_with_mask(x, mask)
    if keep is not None:
        keep = np.broadcast_to(keep, x.shape)
    x = np.moveaxis(x, axis, -1)
    keep = None if keep is None else np.moveaxis(keep, axis, -1)
    return np.moveaxis(masked_softmax(x, keep)[0], -1, axis)


def log_softmax(x, mask=None, *, axis=-1, scale=None):
    """``log(softmax(...))``: ``-inf`` where the probability is 0.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import log_softmax
    >>> log_softmax(np.zeros(2)).round(4)
    array([-0.6931, -0.6931])
    """
    with np.errstate(divide="ignore"):
        return np.log(softmax(x, mask, axis=axis, scale=scale))


def attention_weights(query, key, attn_mask=None, *, is_causal=False, scale=None,
                      causal_alignment="top_left"):
    """``softmax(query @ key.T * scale + mask)``, shape (..., L, S).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import attention_weights
    >>> attention_weights(np.ones((1, 2)), np.ones((3, 2))).round(3)
    array([[0.333, 0.333, 0.333]])
    """
    q, k = np.asarray(query, dtype=np.float64), np.asarray(key, dtype=np.float64)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores, keep = _scores_with_mask((q @ np.swapaxes(k, -1, -2)) * scale, attn_mask)
    if is_causal:
        c = causal_keep(q.shape[-2], k.shape[-2], causal_alignment)
        keep = c if keep is None else np.logical_and(keep, c)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    return masked_softmax(scores)[0]


def multi_head_attention(query, key, value, num_heads, *, q_weight, k_weight, v_weight,
                         out_weight, q_bias=None, k_bias=None, v_bias=None, out_bias=None,
                         num_kv_heads=None, attn_mask=None, key_padding_mask=None,
                         is_causal=False, scale=None, need_weights=False):
    """Multi-head attention written head by head (torch.nn.Linear weight convention).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import multi_head_attention
    >>> x = np.ones((2, 4)); w = np.eye(4)
    >>> multi_head_attention(x, x, x, 2, q_weight=w, k_weight=w, v_weight=w,
    ...                      out_weight=w).round(3)
    array([[1., 1., 1., 1.],
           [1., 1., 1., 1.]])
    """
    f = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    lin = lambda x, w, b: f(x) @ f(w).T + (0.0 if b is None else f(b))   # noqa: E731
    q, k, v = lin(query, q_weight, q_bias), lin(key, k_weight, k_bias), lin(value, v_weight,
                                                                            v_bias)
    H = num_heads
    Hkv = H if num_kv_heads is None else num_kv_heads
    D, Dv = q.shape[-1] // H, v.shape[-1] // Hkv
    keep = None
    if key_padding_mask is not None:
        keep = np.asarray(key_padding_mask)[..., np.newaxis, :]          # (..., 1, S)
    heads, weights = [], []
    for h in range(H):
        g = h // (H // Hkv)
        mask = attn_mask
        if attn_mask is not None:
            m = np.asarray(attn_mask)
            mask = m[..., h if m.ndim >= 3 and m.shape[-3] == H else 0, :, :] \
                if m.ndim >= 3 else m
        w = attention_weights(q[..., h * D:(h + 1) * D], k[..., g * D:(g + 1) * D], mask,
                              is_causal=is_causal, scale=scale if scale is not None
                              else 1.0 / np.sqrt(D))
        if keep is not None:
            w = np.where(keep, w, 0.0)
            total = w.sum(axis=-1, keepdims=True)
            w = w / np.where(total == 0, 1.0, total)
        weights.append(w)
        heads.append(w @ v[..., g * Dv:(g + 1) * Dv])
    out = lin(np.concatenate(heads, axis=-1), out_weight, out_bias)
    return (out, np.mean(weights, axis=0)) if need_weights else out


def _softmax_apply(scores, mask, value):
    scores, keep = _scores_with_mask(scores, mask)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    w = masked_softmax(scores)[0]
    return w @ np.asarray(value, dtype=np.float64), w


def additive_attention(query, key, value, *, w_q, w_k, v, mask=None):
    """Bahdanau: ``score[i, j] = v · tanh(W_q q_i + W_k k_j)``, broadcast over (L, S, hidden).

    Returns ``(output, weights)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import additive_attention
    >>> out, w = additive_attention(np.ones((1, 2)), np.ones((3, 2)), np.eye(3),
    ...                             w_q=np.ones((4, 2)), w_k=np.ones((4, 2)), v=np.ones(4))
    >>> w.round(3)
    array([[0.333, 0.333, 0.333]])
    """
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    qp = f(query) @ f(w_q).T                                     # (..., L, h)
    kp = f(key) @ f(w_k).T                                       # (..., S, h)
    scores = np.tanh(qp[..., :, np.newaxis, :] + kp[..., np.newaxis, :, :]) @ f(v)
    return _softmax_apply(scores, mask, value)


def concat_attention(query, key, value, *, w, v, mask=None):
    """Luong concat: ``score[i, j] = v · tanh(W [q_i; k_j])``, with the concatenation
    formed explicitly. Returns ``(output, weights)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import concat_attention
    >>> out, a = concat_attention(np.ones((1, 2)), np.ones((2, 2)), np.eye(2),
    ...                           w=np.ones((3, 4)), v=np.ones(3))
    >>> a
    array([[0.5, 0.5]])
    """
    q, k = np.asarray(query, dtype=np.float64), np.asarray(key, dtype=np.float64)
    L, S = q.shape[-2], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    qq = np.broadcast_to(q[..., :, np.newaxis, :], lead + (L, S, q.shape[-1]))
    kk = np.broadcast_to(k[..., np.newaxis, :, :], lead + (L, S, k.shape[-1]))
    pairs = np.concatenate([qq, kk], axis=-1)                    # (..., L, S, Eq + Ek)
    scores = np.tanh(pairs @ np.asarray(w, dtype=np.float64).T) @ np.asarray(v, np.float64)
    return _softmax_apply(scores, mask, value)


def general_attention(query, key, value, *, w, mask=None):
    """Luong general: ``score[i, j] = q_i · (W k_j)``. Returns ``(output, weights)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import general_attention
    >>> out, a = general_attention(np.ones((1, 2)), np.eye(2), np.eye(2), w=np.eye(2))
    >>> a
    array([[0.5, 0.5]])
    """
    k = np.asarray(key, dtype=np.float64)
    wk = k @ np.asarray(w, dtype=np.float64).T                   # W k_j, (..., S, Eq)
    scores = np.asarray(query, dtype=np.float64) @ np.swapaxes(wk, -1, -2)
    return _softmax_apply(scores, mask, value)


def dot_attention(query, key, value, *, mask=None):
    """Luong dot: ``score[i, j] = q_i · k_j``. Returns ``(output, weights)``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import dot_attention
    >>> out, a = dot_attention(np.ones((1, 2)), np.eye(2), np.eye(2))
    >>> a
    array([[0.5, 0.5]])
    """
    q, k = np.asarray(query, dtype=np.float64), np.asarray(key, dtype=np.float64)
    return _softmax_apply(q @ np.swapaxes(k, -1, -2), mask, value)


def sinusoidal_positional_encoding(length, dim, *, base=10000.0):
    """``PE[p, 2i] = sin(p / base**(2i/dim))``, ``PE[p, 2i+1] = cos(...)``, element by element.

    Examples
    --------
    >>> from fastattn.reference import sinusoidal_positional_encoding
    >>> sinusoidal_positional_encoding(2, 2).round(4)
    array([[0.    , 1.    ],
           [0.8415, 0.5403]])
    """
    pe = np.zeros((length, dim))
    for p in range(length):
        for j in range(dim):
            i = j // 2
            angle = p / base ** (2 * i / dim)
            pe[p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    return pe


def apply_rotary(x, positions, *, base=10000.0, layout="interleaved"):
    """RoPE as a rotation matrix applied to each feature pair.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import apply_rotary
    >>> apply_rotary(np.array([[1.0, 0.0]]), np.array([np.pi / 2])).round(6)
    array([[0., 1.]])
    """
    x = np.asarray(x, dtype=np.float64)
    D = x.shape[-1]
    pos = np.broadcast_to(np.asarray(positions, dtype=np.float64), x.shape[:-1])
    out = np.empty_like(x)
    for i in range(D // 2):
        a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + D // 2)
        theta = pos * base ** (-2 * i / D)
        c, s = np.cos(theta), np.sin(theta)
        out[..., a] = c * x[..., a] - s * x[..., b]
        out[..., b] = s * x[..., a] + c * x[..., b]
    return out


# ---- content-based sparse attention (issue #4): dense masks given the hash/clusters/sort ----

__all__ += ["lsh_buckets", "lsh_keep", "lsh_attention", "kmeans", "clustered_attention",
            "sinkhorn", "sinkhorn_attention"]


def lsh_buckets(query, rotations):
    """Reformer hash ``h(x) = argmax([x R_r, -x R_r])`` of every row, for every round r.

    ``query`` (..., L, E), ``rotations`` (..., E, n_hashes, n_buckets // 2) with
    broadcasting leading axes; returns bucket ids (..., n_hashes, L).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import lsh_buckets
    >>> lsh_buckets(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.eye(2)[:, None, :1])
    array([[0, 1]])
    """
    x = np.asarray(query, dtype=np.float64)
    rot = np.einsum("...le,...ehr->...hlr", x, np.asarray(rotations, dtype=np.float64))
    return np.concatenate([rot, -rot], axis=-1).argmax(axis=-1)


def lsh_keep(buckets, bucket_size, chunks_before=1):
    """Bool (..., L, L) of one hash round: query i sees key j iff, in the order sorted by
    (bucket, position), j's chunk of ``bucket_size`` is i's chunk or one of the
    ``chunks_before`` chunks before it.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import lsh_keep
    >>> lsh_keep(np.array([1, 0, 1, 0]), 2, 0).astype(int)   # sorted: 1 3 | 0 2
    array([[1, 0, 1, 0],
           [0, 1, 0, 1],
           [1, 0, 1, 0],
           [0, 1, 0, 1]])
    """
    b = np.asarray(buckets)
    L = b.shape[-1]
    order = np.argsort(b * L + np.arange(L), axis=-1)
    chunk = np.argsort(order, axis=-1) // bucket_size           # chunk of each position
    d = chunk[..., :, None] - chunk[..., None, :]
    return (d >= 0) & (d <= chunks_before)


def lsh_attention(query, value, buckets, *, bucket_size=64, chunks_before=1, causal=False,
                  self_mask=True, return_lse=False):
    """Reformer LSH attention given the bucket ids (..., n_hashes, L), as dense masks.

    Keys ``k = q / sqrt(mean(q ** 2) + 1e-6) / sqrt(E)``, scores ``q . k``; per round
    the :func:`lsh_keep` mask (and ``j <= i`` when causal), the own-key score lowered
    by 1e5 when ``self_mask``; rounds merged as ``sum_r softmax_r(lse) out_r``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import lsh_attention
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [3.0]])
    >>> lsh_attention(x, v, np.zeros((1, 2), int), causal=True)    # row 0 sees only itself
    array([[1.],
           [1.]])
    """
    q = np.asarray(query, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    b = np.asarray(buckets)
    L, E = q.shape[-2:]
    keys = q / np.sqrt((q ** 2).mean(axis=-1, keepdims=True) + 1e-6) / np.sqrt(E)
    scores = q @ np.swapaxes(keys, -1, -2)
    if self_mask:
        scores = scores - 1e5 * np.eye(L)
    outs, lses = [], []
    for r in range(b.shape[-2]):
        keep = lsh_keep(b[..., r, :], bucket_size, chunks_before)
        if causal:
            keep = keep & causal_keep(L, L)
        probs, lse = masked_softmax(scores, keep)
        outs.append(probs @ v)
        lses.append(lse)
    lses = np.stack(lses)                                        # (rounds, ..., L)
    weights, total = masked_softmax(np.moveaxis(lses, 0, -1))
    out = sum(np.moveaxis(weights, -1, 0)[r][..., None] * outs[r] for r in range(len(outs)))
    return (out, total) if return_lse else out


def kmeans(x, start, iterations):
    """Lloyd's algorithm on the rows of ``x`` (..., L, E) from the centroids
    ``x[..., start, :]``: ``iterations`` times assign each row to the nearest centroid
    (squared Euclidean distance, first on ties), then move each centroid to the mean of
    its rows (an empty cluster keeps its centroid). Returns the last assignment (..., L).

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import kmeans
    >>> kmeans(np.array([[0.0], [0.1], [5.0], [5.2]]), np.array([0, 1]), 2)
    array([0, 0, 1, 1])
    """
    x = np.asarray(x, dtype=np.float64)
    start = np.asarray(start)
    c = np.take_along_axis(x, start[..., None], axis=-2)
    C = start.shape[-1]
    for _ in range(iterations):
        d = ((x[..., :, None, :] - c[..., None, :, :]) ** 2).sum(axis=-1)
        assign = d.argmin(axis=-1)
        onehot = (assign[..., None] == np.arange(C)).astype(np.float64)   # (..., L, C)
        counts = onehot.sum(axis=-2)[..., None]
        sums = np.swapaxes(onehot, -1, -2) @ x
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
    return assign


def clustered_attention(query, key, value, assignments, clusters, *, topk=None, scale=None):
    """Clustered attention given the cluster of each query (..., L).

    Centroid ``c`` = mean query of its members; ``p_c = softmax(c K^T * scale)``.
    Without ``topk``: member ``i`` of cluster ``c`` gets ``p_c V``. With ``topk``:
    ``T`` = the ``topk`` keys with the largest centroid scores (the lower index first on
    ties), ``m = sum_T p_c``,
    ``out_i = m * softmax_T(q_i K^T * scale) V + sum_{j not in T} p_c(j) v_j``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import clustered_attention
    >>> q = np.array([[1.0], [3.0]]); k = np.array([[0.0], [1.0]]); v = np.array([[0.0], [1.0]])
    >>> out = clustered_attention(q, k, v, np.array([0, 0]), 1, scale=1.0)
    >>> bool(np.allclose(out, np.exp(2) / (1 + np.exp(2))))            # centroid q = 2
    True
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    a = np.asarray(assignments)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    onehot = (a[..., None] == np.arange(clusters)).astype(np.float64)       # (..., L, C)
    counts = onehot.sum(axis=-2)[..., None]
    centroids = (np.swapaxes(onehot, -1, -2) @ q) / np.maximum(counts, 1)
    scores = centroids @ np.swapaxes(k, -1, -2) * scale                    # (..., C, S)
    p, _ = masked_softmax(scores)
    if topk is None:
        return onehot @ (p @ v)
    top_idx = np.argsort(-scores, axis=-1, kind="stable")[..., :topk]   # ties: lower index
    top = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(top, top_idx, True, axis=-1)
    mass = (p * top).sum(axis=-1, keepdims=True)                            # (..., C, 1)
    rest = (p * ~top) @ v                                                    # (..., C, Ev)
    member_top = (onehot @ top.astype(np.float64)) > 0                      # (..., L, S)
    exact, _ = masked_softmax(q @ np.swapaxes(k, -1, -2) * scale, member_top)
    return (onehot @ mass) * (exact @ v) + onehot @ rest


def sinkhorn(log_alpha, n_iters=7):
    """``n_iters`` times ``r -= logsumexp(r, -1)``, ``r -= logsumexp(r, -2)``; ``exp(r)``.
    A line that is all ``-inf`` is left as it is.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import sinkhorn
    >>> sinkhorn(np.zeros((2, 2)))
    array([[0.5, 0.5],
           [0.5, 0.5]])
    """
    r = np.array(log_alpha, dtype=np.float64)
    for _ in range(n_iters):
        for axis in (-1, -2):
            _, lse = masked_softmax(np.moveaxis(r, axis, -1))
            lse = np.expand_dims(np.where(np.isfinite(lse), lse, 0.0), axis)
            r = r - lse
    return np.exp(r)


def sinkhorn_attention(query, key, value, *, block_size, n_iters=7, temperature=0.75,
                       noise=None, scale=None):
    """Sinkhorn attention as one dense masked softmax over ``[K; sorted blocks]``.

    Blocks of ``block_size`` rows (the last one padded with zero rows); pooled means
    over real rows; ``P = sinkhorn((pq pk^T * scale + noise) / temperature)``; sorted
    block ``i`` row ``r`` = ``sum_j P[i, j] X[j * block_size + r]`` (0 past the end).
    Query ``i`` in block ``b`` keeps the real keys of block ``b`` and the rows
    ``r < N`` of sorted block ``b``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.reference import sinkhorn_attention, scaled_dot_product_attention
    >>> q = k = np.eye(2); v = np.array([[1.0], [3.0]])
    >>> bool(np.allclose(sinkhorn_attention(q, k, v, block_size=2),
    ...                  scaled_dot_product_attention(q, k, v)))
    True
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    N, E = q.shape[-2:]
    scale = 1.0 / np.sqrt(E) if scale is None else scale
    n = -(-N // block_size)
    blk = np.arange(N) // block_size
    onehot = (blk[:, None] == np.arange(n)).astype(np.float64)              # (N, n)
    pooled_q = (onehot.T @ q) / onehot.sum(axis=0)[:, None]
    pooled_k = (onehot.T @ k) / onehot.sum(axis=0)[:, None]
    logits = pooled_q @ np.swapaxes(pooled_k, -1, -2) * scale
    if noise is not None:
        logits = logits + np.asarray(noise, dtype=np.float64)
    P = sinkhorn(logits / temperature, n_iters)                             # (..., n, n)

    def sorted_blocks(x):
        padded = np.zeros(x.shape[:-2] + (n * block_size, x.shape[-1]))
        padded[..., :N, :] = x
        xb = padded.reshape(x.shape[:-2] + (n, block_size, x.shape[-1]))
        return np.einsum("...ij,...jrd->...ird", P, xb).reshape(
            P.shape[:-2] + (n * block_size, x.shape[-1]))

    k_all = np.concatenate([np.broadcast_to(k, P.shape[:-2] + k.shape[-2:]), sorted_blocks(k)],
                           axis=-2)
    v_all = np.concatenate([np.broadcast_to(v, P.shape[:-2] + v.shape[-2:]), sorted_blocks(v)],
                           axis=-2)
    sorted_blk = np.arange(n * block_size) // block_size
    sorted_row = np.arange(n * block_size) % block_size
    keep = np.concatenate([blk[:, None] == blk[None, :],
                           (blk[:, None] == sorted_blk[None, :]) & (sorted_row < N)[None, :]],
                          axis=-1)                                            # (N, N + n b)
    return scaled_dot_product_attention(q, k_all, v_all, keep, scale=scale)
