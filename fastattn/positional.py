"""Positional information: sinusoidal encodings and rotary embeddings (RoPE)."""
import numpy as np

from fastattn._validation import as_array, check_choice, check_dtype, check_real, result_dtypes
from fastattn._validation import check_int, is_floating

__all__ = ["sinusoidal_positional_encoding", "apply_rotary"]

ROTARY_LAYOUTS = ("interleaved", "half")


def sinusoidal_positional_encoding(length, dim, *, base=10000.0, dtype=np.float32):
    r"""The Transformer's fixed positional encoding, shape ``(length, dim)``.

    ``PE[pos, 2i] = sin(pos / base**(2i/dim))`` and
    ``PE[pos, 2i+1] = cos(pos / base**(2i/dim))`` (Vaswani et al., 2017, §3.5).
    For an odd ``dim`` the last column is a sine.

    Parameters
    ----------
    length : int
        Number of positions (0, 1, ..., length-1).
    dim : int
        Model width.
    base : float, default=10000.0
        Sets the longest wavelength, ``2π·base``.
    dtype : dtype, default=np.float32
        Computed in float64, returned in this floating dtype (bfloat16 included).

    Returns
    -------
    ndarray, shape (length, dim)

    Examples
    --------
    >>> import fastattn
    >>> pe = fastattn.sinusoidal_positional_encoding(3, 4)
    >>> pe.round(4)
    array([[ 0.    ,  1.    ,  0.    ,  1.    ],
           [ 0.8415,  0.5403,  0.01  ,  1.    ],
           [ 0.9093, -0.4161,  0.02  ,  0.9998]], dtype=float32)
    """
    length, dim = check_int("length", length, 0), check_int("dim", dim, 0)
    base = _positive("base", base)
    dtype = check_dtype("dtype", dtype)
    if not is_floating(dtype):
        raise TypeError(f"dtype must be a floating dtype (float16/32/64 or bfloat16), got "
                        f"{dtype}")
    pos = np.arange(length, dtype=np.float64)[:, np.newaxis]
    # column j uses frequency base**(-2i/dim) with i = j // 2
    freq = base ** (-(np.arange(dim) // 2 * 2) / max(dim, 1))
    angle = pos * freq
    pe = np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle))
    return pe.astype(dtype)


def apply_rotary(x, positions, *, base=10000.0, layout="interleaved"):
    r"""Rotary position embedding (RoPE): rotate feature pairs by position angles.

    Pair ``i`` of the ``D`` features of the vector at position ``p`` is rotated by
    the angle ``p * base**(-2i/D)``. Applied to queries and keys, it makes their
    dot product depend only on the relative position (Su et al., RoFormer).

    Parameters
    ----------
    x : array_like, shape (..., S, D)
        Vectors to rotate, ``D`` even; e.g. ``(B, H, S, D)`` per-head queries.
    positions : array_like
        Positions (integers or reals), broadcastable to ``x.shape[:-1]``; usually
        ``np.arange(S)`` (or ``offset + np.arange(S)`` when decoding).
    base : float, default=10000.0
    layout : {"interleaved", "half"}, default="interleaved"
        Which features form a pair. ``interleaved``: ``(x[2i], x[2i+1])`` (the
        RoFormer paper, GPT-J). ``half``: ``(x[i], x[i + D/2])`` (GPT-NeoX,
        Hugging Face Llama's ``rotate_half``).

    Returns
    -------
    ndarray
        Same shape as ``x``, float32/float64 following ``x``.

    Raises
    ------
    ValueError
        For an odd ``D``, positions that do not broadcast, or an unknown layout.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> x = np.array([[1.0, 0.0], [1.0, 0.0]])
    >>> fastattn.apply_rotary(x, np.arange(2)).round(4)       # 0 and 1 radian
    array([[1.    , 0.    ],
           [0.5403, 0.8415]])

    Dot products depend only on the distance between positions:

    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 8))
    >>> def score(i, j):
    ...     return fastattn.apply_rotary(q, i) @ fastattn.apply_rotary(k, j)
    >>> bool(np.isclose(score(3, 1), score(7, 5)))
    True
    """
    check_choice("layout", layout, ROTARY_LAYOUTS)
    base = _positive("base", base)
    x = as_array("x", x)
    compute, result = result_dtypes(x, names=("x",))
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"x needs an even number of features on its last axis, got shape "
                         f"{x.shape}")
    positions = np.asarray(positions)
    if positions.dtype.kind not in "iuf":
        raise TypeError(f"positions must be real numbers, got dtype {positions.dtype}")
    try:
        shape = np.broadcast_shapes(positions.shape, x.shape[:-1])
    except ValueError:
        shape = None
    if shape != x.shape[:-1]:
        raise ValueError(f"positions of shape {positions.shape} do not broadcast to x's "
                         f"positions {x.shape[:-1]} (x has shape {x.shape})")
    D = x.shape[-1]
    freq = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    angle = positions.astype(np.float64)[..., np.newaxis] * freq
    cos, sin = np.cos(angle).astype(compute), np.sin(angle).astype(compute)
    x = x.astype(compute, copy=False)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., :D // 2], x[..., D // 2:]
    out = np.empty(x.shape, dtype=compute)
    ra, rb = (out[..., 0::2], out[..., 1::2]) if layout == "interleaved" else \
        (out[..., :D // 2], out[..., D // 2:])
    # (a, b) -> (a cos - b sin, a sin + b cos)
    np.subtract(a * cos, b * sin, out=ra)
    np.add(a * sin, b * cos, out=rb)
    return out if result == compute else out.astype(result)


def _positive(name, value):
    value = check_real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value
