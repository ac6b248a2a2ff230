"""Plain NumPy float64 definitions of what fastattn computes.

These are the unfused formulas, written for clarity rather than speed: they
materialise the full ``(..., L, S)`` score matrix. The tests and docs use them as
the definition of correct.
"""
import numpy as np

__all__ = ["scaled_dot_product_attention", "causal_keep", "masked_softmax"]


def causal_keep(L, S, alignment="top_left"):
    """Bool ``(L, S)`` array, True where query ``i`` may see key ``j``.

    ``top_left``: ``j <= i``; ``bottom_right``: ``j <= i + S - L``.

    Examples
    --------
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


def scaled_dot_product_attention(query, key, value, attn_mask=None, *, is_causal=False,
                                 scale=None, enable_gqa=False, causal_alignment="top_left",
                                 return_lse=False):
    """``softmax(query @ key.T * scale + mask) @ value`` in float64, unfused.

    Same arguments and conventions as :func:`fastattn.scaled_dot_product_attention`
    (bool mask True = attend, float mask added, fully masked rows give 0 and an lse
    of ``-inf``).

    Examples
    --------
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
    keep = None
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == np.bool_:
            keep = attn_mask
        else:
            scores = scores + attn_mask.astype(np.float64)
    if is_causal:
        c = causal_keep(L, S, causal_alignment)
        keep = c if keep is None else np.logical_and(keep, c)
    probs, lse = masked_softmax(scores, keep)
    out = probs @ v
    return (out, lse) if return_lse else out
