"""Sparse attention patterns, each compiled to a :class:`~fastattn.BlockLayout`.

Every function here builds a layout (blocks to visit + element rule) and runs the
one block-sparse kernel, :func:`fastattn.block_sparse_attention`. Positions follow
the bottom-right convention when ``L != S``: query ``i`` sits at key position
``i + S - L``. ``fastattn.reference`` has the same patterns as dense bool masks.

Every pattern also takes the keywords of :func:`fastattn.block_sparse_attention`:
``attn_mask`` (bool True = attend, or float added; e.g. a padding mask),
``enable_gqa`` (grouped-query heads, K/V not repeated) and, except the always causal
:func:`strided_attention`, ``is_causal`` (keys at or before the query's position,
bottom-right aligned like the patterns' positions).
"""
import numpy as np

from fastattn.block_layout import BlockLayout
from fastattn.sparse import block_sparse_attention
from fastattn._validation import (check_choice, check_int, check_qkv, check_token_flags,
                                  check_window)

__all__ = ["local_attention", "strided_attention", "global_attention",
           "longformer_attention", "bigbird_attention", "bigbird_layout"]

# Tile sizes of the rule-based layouts: small enough that a band of a few hundred
# keys wastes little of its edge tiles, large enough for efficient BLAS tiles.
BLOCK_SIZE = (64, 64)


def _lengths(query, key, value):
    q, k, v, _, _ = check_qkv(query, key, value)
    return q, k, v, q.shape[-2], k.shape[-2]


def _global_flags(global_tokens, L, S):
    # key positions -> (query flags, key flags); query i sits at position i + S - L
    gk = check_token_flags("global_tokens", global_tokens, S)
    pos = np.arange(L) + (S - L)
    gq = np.zeros(L, dtype=bool)
    inside = (pos >= 0) & (pos < S)
    gq[inside] = gk[pos[inside]]
    return gq, gk


def local_attention(query, key, value, window, *, dilation=1, global_tokens=None,
                    scale=None, return_lse=False, num_threads=None, attn_mask=None,
                    is_causal=False, enable_gqa=False):
    """Sliding-window attention: query ``i`` sees key ``j`` iff ``-left <= j - i <= right``.

    Parameters
    ----------
    query, key, value : array_like
        ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)`` as for
        :func:`fastattn.scaled_dot_product_attention`.
    window : int or (int, int)
        ``(left, right)`` keys on each side (an int: the same on both sides).
        ``(w, 0)`` is causal sliding-window attention.
    dilation : int, default=1
        Also require ``(j - i) % dilation == 0``.
    global_tokens : array_like, optional
        Key positions (or bool flags of length S) that attend to all and that all
        attend to.
    attn_mask, is_causal, enable_gqa, scale, return_lse, num_threads
        As for :func:`fastattn.block_sparse_attention` (``is_causal`` bottom-right
        aligned).

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Raises
    ------
    ValueError
        For negative window sizes or ``dilation <= 0``.

    Notes
    -----
    For ``L != S`` positions are aligned bottom-right: query ``i`` sits at key
    position ``i + S - L``. Time is ``O(L * (left + right))``, not ``O(L * S)``.

    Examples
    --------
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1024, 32)) for _ in range(3))
    >>> out = fastattn.local_attention(q, k, v, window=(64, 0))
    >>> ref = fastattn.reference.local_attention(q, k, v, window=(64, 0))
    >>> bool(np.allclose(out, ref))
    True
    """
    q, k, v, L, S = _lengths(query, key, value)
    gq, gk = _global_flags(global_tokens, L, S) if global_tokens is not None else (None, None)
    layout = BlockLayout.from_rule((L, S), BLOCK_SIZE, window=check_window(window),
                                   dilation=dilation, global_query=gq, global_key=gk)
    return block_sparse_attention(q, k, v, layout, attn_mask, is_causal=is_causal,
                                  causal_alignment="bottom_right", enable_gqa=enable_gqa,
                                  scale=scale, return_lse=return_lse, num_threads=num_threads)


def strided_attention(query, key, value, stride, *, mode="strided", summary=None,
                      scale=None, return_lse=False, num_threads=None, attn_mask=None,
                      enable_gqa=False):
    """Sparse Transformer attention heads (causal), strided or fixed.

    ``mode="strided"``: query ``i`` sees key ``j`` iff ``j <= i`` and
    ``(i - j) % stride == 0``.
    ``mode="fixed"``: query ``i`` sees key ``j <= i`` iff both are in the same block
    of ``stride`` positions (``i // stride == j // stride``) or ``j`` is a summary
    key: ``j % stride == 0`` or ``j % stride >= stride - summary``.

    Parameters
    ----------
    query, key, value : array_like
        As for :func:`fastattn.scaled_dot_product_attention`.
    stride : int
        The stride (strided) or block length (fixed); LRA's default is 128.
    mode : {"strided", "fixed"}, default="strided"
    summary : int, optional
        Summary keys per block (fixed mode); default ``stride // 4`` (LRA: 32 of 128).
    attn_mask, enable_gqa, scale, return_lse, num_threads
        As for :func:`fastattn.block_sparse_attention`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Notes
    -----
    These are the heads of LRA's ``sparse_attention.py::_build_mask``; the fixed
    mode is the union of its two fixed heads. Both patterns touch every causal
    tile (each tile holds some strided or summary key), so they cost about as much
    as causal dense attention; the element rule keeps the exact pattern.

    Examples
    --------
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 100, 16)) for _ in range(3))
    >>> out = fastattn.strided_attention(q, k, v, 8, mode="fixed", summary=2)
    >>> ref = fastattn.reference.strided_attention(q, k, v, 8, mode="fixed", summary=2)
    >>> bool(np.allclose(out, ref))
    True
    """
    check_choice("mode", mode, ("strided", "fixed"))
    stride = check_int("stride", stride)
    q, k, v, L, S = _lengths(query, key, value)
    if mode == "strided":
        rule = dict(dilation=stride)
    else:
        summary = max(1, stride // 4) if summary is None else check_int("summary", summary)
        j = np.arange(S) % stride
        rule = dict(segment=stride, global_key=(j == 0) | (j >= stride - summary))
    layout = BlockLayout.from_rule((L, S), BLOCK_SIZE, is_causal=True, **rule)
    return block_sparse_attention(q, k, v, layout, attn_mask, enable_gqa=enable_gqa,
                                  scale=scale, return_lse=return_lse, num_threads=num_threads)


def global_attention(query, key, value, global_tokens, *, window=(0, 0), scale=None,
                     return_lse=False, num_threads=None, attn_mask=None, is_causal=False,
                     enable_gqa=False):
    """Global-token attention: a global token attends to all and all attend to it.

    Every other query also sees the keys of its local ``window`` (default
    ``(0, 0)``: itself), so ``M[i, j] = local(i, j) or g[i] or g[j]``.

    Parameters
    ----------
    query, key, value : array_like
        As for :func:`fastattn.scaled_dot_product_attention`.
    global_tokens : array_like
        Key positions, or bool flags of length S.
    window : int or (int, int), default=(0, 0)
        ``(left, right)`` local window, as in :func:`local_attention`.
    attn_mask, is_causal, enable_gqa, scale, return_lse, num_threads
        As for :func:`fastattn.block_sparse_attention` (``is_causal`` bottom-right
        aligned).

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Examples
    --------
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((300, 16)) for _ in range(3))
    >>> out = fastattn.global_attention(q, k, v, [0, 150])
    >>> ref = fastattn.reference.global_attention(q, k, v, [0, 150])
    >>> bool(np.allclose(out, ref))
    True
    """
    return local_attention(query, key, value, window, global_tokens=global_tokens,
                           scale=scale, return_lse=return_lse, num_threads=num_threads,
                           attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


def longformer_attention(query, key, value, window, global_tokens, *, dilation=1, scale=None,
                         return_lse=False, num_threads=None, attn_mask=None, is_causal=False,
                         enable_gqa=False):
    """Longformer attention: a (dilated) sliding window plus global tokens.

    Query ``i`` sees key ``j`` iff ``-left <= j - i <= right`` and
    ``(j - i) % dilation == 0``, or ``i`` or ``j`` is a global token.

    Parameters
    ----------
    query, key, value : array_like
        As for :func:`fastattn.scaled_dot_product_attention`.
    window : int or (int, int)
        ``(left, right)``; an int ``w`` means ``w`` keys on each side (allenai's
        ``attention_window``; HF's ``attention_window`` counts both sides: pass
        ``w // 2``).
    global_tokens : array_like
        Key positions, or bool flags of length S.
    dilation : int, default=1
    attn_mask, is_causal, enable_gqa, scale, return_lse, num_threads
        As for :func:`fastattn.block_sparse_attention` (``is_causal`` bottom-right
        aligned).

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Notes
    -----
    Global attention uses the same projections as local attention here; HF and
    allenai use separate global projections, which the caller can compute
    (``scaled_dot_product_attention`` on the global rows) and merge.

    Examples
    --------
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 500, 16)) for _ in range(3))
    >>> out = fastattn.longformer_attention(q, k, v, 32, [0], dilation=2)
    >>> ref = fastattn.reference.longformer_attention(q, k, v, 32, [0], dilation=2)
    >>> bool(np.allclose(out, ref))
    True
    """
    return local_attention(query, key, value, window, dilation=dilation,
                           global_tokens=global_tokens, scale=scale, return_lse=return_lse,
                           num_threads=num_threads, attn_mask=attn_mask, is_causal=is_causal,
                           enable_gqa=enable_gqa)


def bigbird_layout(length, *, num_heads=None, block_size=64, num_random_blocks=3,
                   num_window_blocks=3, num_global_blocks=1, rng=None):
    """The BigBird ITC block layout (global + window + random blocks) for ``L = S = length``.

    With ``n = ceil(length / block_size)`` blocks: the first and last
    ``num_global_blocks`` block rows attend to every block and every block row
    attends to them; every other block row ``i`` attends to the window blocks
    ``i - num_window_blocks // 2 .. i + num_window_blocks // 2`` and to
    ``num_random_blocks`` distinct blocks drawn uniformly from the remaining middle
    blocks (all of them when fewer remain).

    Parameters
    ----------
    length : int
    num_heads : int, optional
        Draw one layout per head (axis -3 of the operands); default one shared.
    block_size, num_random_blocks, num_window_blocks, num_global_blocks : int
        HF defaults (64, 3, 3, 1).
    rng : numpy.random.Generator or int, optional
        Source of the random blocks; the same seed gives the same layout.

    Returns
    -------
    BlockLayout

    Examples
    --------
    >>> import fastattn
    >>> layout = fastattn.bigbird_layout(1024, block_size=64, rng=0)
    >>> layout.block_mask().sum(axis=1)[:4].tolist()   # key blocks per query block
    [16, 7, 8, 8]
    >>> bool((fastattn.bigbird_layout(1024, rng=0).indices == layout.indices).all())
    True
    """
    length = int(length)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    block_size = check_int("block_size", block_size)
    for name, value in (("num_random_blocks", num_random_blocks),
                        ("num_window_blocks", num_window_blocks),
                        ("num_global_blocks", num_global_blocks)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    heads = 1 if num_heads is None else check_int("num_heads", num_heads)
    rng = np.random.default_rng(rng)
    n = -(-length // block_size)
    g, half = int(num_global_blocks), int(num_window_blocks) // 2
    blocks = np.zeros((heads, n, n), dtype=bool)
    is_global = np.zeros(n, dtype=bool)
    is_global[:g] = True
    is_global[max(n - g, 0):] = True
    blocks[:, is_global, :] = True
    blocks[:, :, is_global] = True
    idx = np.arange(n)
    window = np.abs(idx[:, None] - idx[None, :]) <= half
    blocks |= window
    for h in range(heads):
        for i in np.flatnonzero(~is_global):
            candidates = np.flatnonzero(~is_global & ~window[i])
            pick = rng.permutation(candidates)[:int(num_random_blocks)]
            blocks[h, i, pick] = True
    return BlockLayout.from_blocks(blocks if num_heads is not None else blocks[0],
                                   (length, length), block_size)


def bigbird_attention(query, key, value, *, block_size=64, num_random_blocks=3,
                      num_window_blocks=3, num_global_blocks=1, rng=None, scale=None,
                      return_lse=False, num_threads=None, attn_mask=None, is_causal=False,
                      enable_gqa=False):
    """BigBird (ITC) block-sparse self-attention: global, window and random blocks.

    The layout is :func:`bigbird_layout`, drawn once per head (axis -3) when the
    operands have a head axis, and shared over the batch.

    Parameters
    ----------
    query, key, value : array_like
        As for :func:`fastattn.scaled_dot_product_attention`, with ``L == S``.
    block_size, num_random_blocks, num_window_blocks, num_global_blocks : int
        See :func:`bigbird_layout`.
    rng : numpy.random.Generator or int, optional
        Source of the random blocks: the same seed gives bit-identical results.
    attn_mask, is_causal, enable_gqa, scale, return_lse, num_threads
        As for :func:`fastattn.block_sparse_attention` (``is_causal`` bottom-right
        aligned).

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Examples
    --------
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 640, 16)) for _ in range(3))
    >>> out = fastattn.bigbird_attention(q, k, v, rng=1)
    >>> layout = fastattn.bigbird_layout(640, num_heads=4, rng=1)
    >>> ref = fastattn.scaled_dot_product_attention(q, k, v, layout.to_mask())
    >>> bool(np.allclose(out, ref))
    True
    """
    q, k, v, L, S = _lengths(query, key, value)
    if L != S:
        raise ValueError(f"bigbird_attention is self-attention: L must equal S, got "
                         f"query {q.shape}, key {k.shape}")
    heads = q.shape[-3] if q.ndim >= 3 else None
    layout = bigbird_layout(L, num_heads=heads, block_size=block_size,
                            num_random_blocks=num_random_blocks,
                            num_window_blocks=num_window_blocks,
                            num_global_blocks=num_global_blocks, rng=rng)
    return block_sparse_attention(q, k, v, layout, attn_mask, is_causal=is_causal,
                                  causal_alignment="bottom_right", enable_gqa=enable_gqa,
                                  scale=scale, return_lse=return_lse, num_threads=num_threads)
