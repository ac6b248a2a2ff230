"""Mask builders: bool arrays where True means "this key takes part" (keep)."""

import numpy as np

from fastattn._validation import check_choice, check_int, is_floating
from fastattn.attention import CAUSAL_ALIGNMENTS

__all__ = ["causal_mask", "padding_mask", "combine_masks"]


def causal_mask(L, S=None, *, alignment="top_left"):
    """Look-ahead mask: bool ``(L, S)``, True where query ``i`` may see key ``j``.

    Parameters
    ----------
    L : int
        Number of queries.
    S : int, optional
        Number of keys; default ``L``.
    alignment : {"top_left", "bottom_right"}, default="top_left"
        ``top_left``: ``j <= i`` (PyTorch's ``is_causal``). ``bottom_right``:
        ``j <= i + S - L``, the last query sees every key (decoding with a cache).

    Returns
    -------
    ndarray of bool, shape (L, S)

    See Also
    --------
    padding_mask, combine_masks

    Examples
    --------
    >>> import fastattn
    >>> fastattn.causal_mask(3).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    >>> fastattn.causal_mask(2, 4, alignment="bottom_right").astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 1]])
    """
    check_choice("alignment", alignment, CAUSAL_ALIGNMENTS)
    L = check_int("L", L, 0)
    S = L if S is None else check_int("S", S, 0)
    offset = 0 if alignment == "top_left" else S - L
    return np.arange(S)[np.newaxis, :] <= np.arange(L)[:, np.newaxis] + offset


def padding_mask(lengths, S, *, side="right"):
    """Key-padding mask from sequence lengths: bool ``(B, 1, 1, S)``.

    Entry ``[b, 0, 0, j]`` is True when key ``j`` is a real token: ``j < lengths[b]``
    with the padding on the right, ``j >= S - lengths[b]`` with it on the left (as
    batched generation pads prompts, e.g. Hugging Face's ``padding_side="left"``).
    The two unit axes broadcast over heads and queries, so the mask can be passed
    straight to :func:`fastattn.scaled_dot_product_attention` with ``(B, H, L, S)``
    scores.

    Parameters
    ----------
    lengths : array_like of int, shape (B,)
        Number of real tokens in each sequence, each in ``[0, S]``.
    S : int
        Padded sequence length.
    side : {"right", "left"}, default="right"
        Where the padding is.

    Returns
    -------
    ndarray of bool, shape (B, 1, 1, S)

    Raises
    ------
    ValueError
        For lengths that are negative, above ``S`` or not 1-D.
    TypeError
        For lengths that are not integers.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.padding_mask([3, 1], 4)[:, 0, 0].astype(int)
    array([[1, 1, 1, 0],
           [1, 0, 0, 0]])
    >>> fastattn.padding_mask([3, 1], 4, side="left")[:, 0, 0].astype(int)
    array([[0, 1, 1, 1],
           [0, 0, 0, 1]])
    """
    check_choice("side", side, ("right", "left"))
    S = check_int("S", S, 0)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (one length per sequence), got shape "
                         f"{lengths.shape}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > S):
        raise ValueError(f"lengths must lie in [0, S={S}], got {lengths.tolist()}")
    if side == "right":
        keep = np.arange(S)[np.newaxis, :] < lengths[:, np.newaxis]
    else:
        keep = np.arange(S)[np.newaxis, :] >= S - lengths[:, np.newaxis]
    return keep[:, np.newaxis, np.newaxis, :]


def combine_masks(*masks):
    """Combine masks that must all allow a key: the broadcast AND of bool masks.

    ``None`` entries are ignored. If any mask is floating (additive), the result is
    additive too: bool masks become ``0`` (keep) / ``-inf`` (drop) and all are
    summed.

    Parameters
    ----------
    *masks : array_like or None
        Bool (True = keep) or floating masks whose shapes broadcast together.

    Returns
    -------
    ndarray or None
        The combined mask at the broadcast shape, or None when every mask is None.

    Raises
    ------
    ValueError
        When the shapes do not broadcast (the message lists them).
    TypeError
        For masks that are neither bool nor floating.

    Examples
    --------
    >>> import fastattn
    >>> m = fastattn.combine_masks(fastattn.causal_mask(3), fastattn.padding_mask([2], 3))
    >>> m.shape
    (1, 1, 3, 3)
    >>> m[0, 0].astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 0]])
    """
    arrays = [np.asarray(m) for m in masks if m is not None]
    if not arrays:
        return None
    for m in arrays:
        if m.dtype != np.bool_ and not is_floating(m.dtype):
            raise TypeError(f"masks must be bool (True = keep) or floating (additive), "
                            f"got dtype {m.dtype}")
    try:
        np.broadcast_shapes(*(m.shape for m in arrays))
    except ValueError:
        raise ValueError(f"masks do not broadcast together: shapes "
                         f"{[m.shape for m in arrays]}") from None
    if all(m.dtype == np.bool_ for m in arrays):
        out = arrays[0]
        for m in arrays[1:]:
            out = np.logical_and(out, m)
        return np.array(out, dtype=bool)
    dtype = np.result_type(*(m for m in arrays if m.dtype != np.bool_))
    out = None
    for m in arrays:
        add = np.where(m, dtype.type(0), dtype.type(-np.inf)) if m.dtype == np.bool_ else m
        out = add if out is None else out + add
    return np.asarray(out, dtype=dtype)


