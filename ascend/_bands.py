"""Sliding windows and ALiBi for aclnnFlashAttentionScore (fastattn's ``window`` and
``alibi_slopes``), in the operator's documented terms.

ops-transformer ``docs/context/sparse_mode_introduction.md`` and
``attention/flash_attention_score/docs/aclnnFlashAttentionScore.md``:

* **window** ``(left, right)`` (query ``i`` sees key ``j`` iff ``i + off - left <= j <=
  i + off + right``, ``off = S - L`` bottom-right, 0 top-left; ``None`` unbounded):
  sparse mode 4, "band, the parameter starting point is the lower-right corner", computes
  ``-preTokens <= j - (i + S - L) <= nextTokens`` with the 2048x2048 compressed mask:
  ``preTokens = left``, ``nextTokens = right`` (``min(right, 0)`` with ``is_causal``),
  2147483647 for an unbounded side. That is the bottom-right alignment, and the top-left
  one when ``L == S``. A top-left window with ``L != S``, and any window beside an
  ``attn_mask``, are folded into an explicit attenMask in sparse mode 0 (the band mode 0
  documents is top-left and must agree with its mask: the mask carries it). Rows whose
  band holds no key set ``innerPrecise = 2`` (zeros, the operator's invalid-row handling).
* **ALiBi** ``-slope * |i + off - j|``: the operator's ``pse`` input (``realShift``), added
  before scaling (``scale * (QK^T + pse)``), so ``pse = bias / scale``, of shape
  ``[1, N, L, S]`` for slopes ``(N,)`` and ``[B, N, L, S]`` for ``(B, N)``. The
  ``pseType`` 2/3 variants that generate ALiBi from slopes inside
  (aclnnFlashAttentionScoreV2) need ``Sq == Skv`` and document no formula for the
  generated bias, so they are not used.
* soft-capping has no counterpart in aclnnFlashAttentionScore: fastattn raises
  ``NotImplementedError`` before calling here.
"""

import numpy as np

from ._array import dtype_name, host_storage

__all__ = ["SPARSE_BAND", "check_window", "alibi_bias", "band_keep"]

SPARSE_BAND = 4


def check_window(window, is_causal):
    """``(left, right)`` with None for an unbounded side (``-1`` accepted too), the causal
    band folded into ``right``; None when nothing bounds either side."""
    if window is None:
        left = right = None
    else:
        if len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}")
        left, right = (None if w is None or int(w) == -1 else int(w) for w in window)
        for name, w in (("left", left), ("right", right)):
            if w is not None and w < 0:
                raise ValueError(f"window sizes must be >= 0 or -1/None, got {name} = {w}")
    if is_causal:
        right = 0 if right is None else min(right, 0)
    if left is None and right is None:
        return None
    return left, right


def band_keep(length, key_length, sides, alignment):
    """Boolean (L, S), True where ``i + off - left <= j <= i + off + right``.

    Examples
    --------
    >>> import numpy as np
    >>> from ascend._bands import band_keep
    >>> band_keep(2, 4, (1, 0), "bottom_right").astype(int)
    array([[0, 1, 1, 0],
           [0, 0, 1, 1]])
    """
    left, right = sides
    offset = 0 if alignment == "top_left" else key_length - length
    d = np.arange(key_length)[None, :] - (np.arange(length)[:, None] + offset)
    keep = np.ones((length, key_length), dtype=bool)
    if left is not None:
        keep &= d >= -left
    if right is not None:
        keep &= d <= right
    return keep


def alibi_bias(slopes, length, key_length, alignment):
    """``-slope * |i + off - j|`` in float64, shape ``[1, N, L, S]`` for slopes ``(N,)``
    or ``[B, N, L, S]`` for ``(B, N)``.

    Examples
    --------
    >>> import numpy as np
    >>> from ascend._bands import alibi_bias
    >>> alibi_bias(np.array([0.5]), 1, 3, "bottom_right")[0, 0]
    array([[-1. , -0.5, -0. ]])
    """
    slopes = np.asarray(slopes, dtype=np.float64)
    if slopes.ndim == 1:
        slopes = slopes[None]
    offset = 0 if alignment == "top_left" else key_length - length
    d = np.abs(np.arange(length)[:, None] + offset - np.arange(key_length)[None, :])
    return -slopes[:, :, None, None] * d


def check_slopes(alibi_slopes, batch, heads):
    """float64 slopes of shape ``(N,)`` or ``(B, N)``, finite; ValueError otherwise."""
    slopes = np.asarray(alibi_slopes.to_numpy() if hasattr(alibi_slopes, "to_numpy")
                        else alibi_slopes)
    if slopes.dtype.kind not in "iuf" and dtype_name(slopes.dtype) != "bfloat16":
        raise TypeError(f"alibi_slopes must be real numbers, got {slopes.dtype}")
    if slopes.shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (N,) = ({heads},) or (B, N) = "
                         f"({batch}, {heads}), got {slopes.shape}")
    slopes = slopes.astype(np.float64)
    if not np.isfinite(slopes).all():
        raise ValueError("alibi_slopes must be finite")
    return slopes


def plan_modifiers(plan_mask, attn_mask, is_causal, alignment, full_shape, scale,
                   storage_name, window, alibi_slopes, make_plan):
    """The :class:`ascend._ops._MaskPlan` of a call with a window and/or ALiBi.

    ``plan_mask`` is ``ascend._ops._plan_mask`` (mask and causal conversion),
    ``make_plan(**fields)`` builds a plan directly.
    """
    batch, heads, length, key_length = full_shape
    sides = check_window(window, False)
    slopes = None if alibi_slopes is None else check_slopes(alibi_slopes, batch, heads)
    bias = None if slopes is None else alibi_bias(slopes, length, key_length, alignment)
    if attn_mask is not None:
        # everything in one explicit mask (mode 0): the window as -inf entries, ALiBi added
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            combined = np.where(mask, 0.0, -np.inf)
        else:
            combined = np.asarray(mask, dtype=np.float64)
        if sides is not None:
            combined = np.where(band_keep(length, key_length, sides, alignment), combined,
                                -np.inf)
        if bias is not None:
            combined = combined + bias
        return plan_mask(combined, is_causal, alignment, full_shape, scale, storage_name)
    band = check_window(window, is_causal)
    if sides is None:
        plan = plan_mask(None, is_causal, alignment, full_shape, scale, storage_name)
    elif band == (None, 0):
        # the causal band itself: sparse mode 2 or 3
        plan = plan_mask(None, True, alignment, full_shape, scale, storage_name)
    elif alignment == "bottom_right" or length == key_length:
        left, right = band
        # rows i with i + S - L + right < 0 see no key (L > S): the invalid-row handling
        empty_rows = right is not None and length - key_length > right
        plan = make_plan(compressed=True, sparse_mode=SPARSE_BAND,
                         inner_precise=2 if empty_rows else 0)
        if left is not None:
            plan.pre_tokens = left
        if right is not None:
            plan.next_tokens = right
    else:
        # a top-left window with L != S: the band as an explicit mask (mode 0)
        plan = plan_mask(band_keep(length, key_length, band, alignment), False, alignment,
                         full_shape, scale, storage_name)
    if bias is not None:
        plan.pse = host_storage(np.ascontiguousarray(bias / scale), storage_name)
    return plan
