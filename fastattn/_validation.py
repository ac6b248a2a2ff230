"""Input checks shared by the public functions: dtypes, devices, shapes.

Everything here raises before any kernel runs: ``TypeError`` for a wrong kind of
data, ``ValueError`` for wrong shapes or values, with the offending shapes named.
"""
import functools
import math
import numbers
import operator

import numpy as np
from ml_dtypes import bfloat16 as _bfloat16

__all__ = ["result_dtypes", "promoted_dtype", "check_device", "check_choice"]

# dtypes computed natively; the half types (float16, bfloat16) are computed in float32
# and returned in their own type.
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
BFLOAT16 = np.dtype(_bfloat16)    # ml_dtypes' bfloat16; NumPy gives it dtype kind "V"
HALF = (np.dtype(np.float16), BFLOAT16)
_TAKEN = frozenset(_NATIVE + HALF)  # dtypes promoted_dtype returns as they are
CPU_DEVICES = ("cpu",)
CPU_AND_NPU = ("cpu", "npu")      # functions that can also run on an Ascend NPU


def is_floating(dtype):
    """Whether ``dtype`` is a floating type fastattn takes (NumPy's, or bfloat16)."""
    return dtype.kind == "f" or dtype == BFLOAT16


def result_dtypes(*arrays, names=None):
    """Return ``(compute_dtype, result_dtype)`` for floating inputs, NumPy-style.

    float32 stays float32, float64 stays float64, mixed dtypes promote as NumPy and
    ml_dtypes promote them (float16 with float32 gives float32, float16 with bfloat16
    gives float32); float16 and bfloat16 are computed in float32 and returned in their
    own type; integers promote to float64 (the ``np.mean`` rule). bool, complex,
    object and string data raise ``TypeError``.
    """
    result = promoted_dtype(*arrays, names=names)
    if result in HALF:
        return np.dtype(np.float32), result
    if result not in _NATIVE:
        raise TypeError(f"unsupported dtype combination {[str(a.dtype) for a in arrays]}")
    return result, result


def storage_dtype(compute, result, *arrays):
    """The dtype a tile kernel reads its operands in: the result's half type when every
    one of ``arrays`` already has it (read as they are, computed in float32), else the
    compute dtype (the operands are converted to it first)."""
    if result in HALF and all(a.dtype == result for a in arrays):
        return result
    return compute


def promoted_dtype(*arrays, names=None, supported=None, where=""):
    """The dtype NumPy (with ml_dtypes) promotes the arrays' dtypes to; bfloat16 accepted.

    Unlike :func:`result_dtypes` this recognises bfloat16: bfloat16 stays bfloat16, with
    float32 it gives float32, with float16 float32 (the ml_dtypes rule); otherwise the
    :func:`result_dtypes` rules (integers alone promote to float64). Only the dtype is
    computed: where to compute (float32 for the half types on the CPU) is the caller's
    choice. ``arrays`` may be anything with a ``dtype`` (``ascend.DeviceArray`` too).

    ``supported``: names of the only dtypes accepted (each input's and the result's),
    e.g. ``("float16", "bfloat16", "float32")``; ``where`` ends the messages, e.g.
    ``" with device='npu'"``. bool, complex, object, string and unsupported dtypes
    raise ``TypeError`` naming the supported ones.

    Examples
    --------
    >>> from fastattn._validation import promoted_dtype
    >>> import numpy as np, ml_dtypes
    >>> bf = np.ones(2, ml_dtypes.bfloat16)
    >>> promoted_dtype(bf, bf), promoted_dtype(bf, np.ones(2, np.float16))
    (dtype(bfloat16), dtype('float32'))
    >>> promoted_dtype(bf, np.ones(2, complex), names=["query", "key"])
    Traceback (most recent call last):
        ...
    TypeError: key must hold real numbers (float16/32/64, bfloat16 or integers), got dtype complex128
    """
    if supported is None and arrays:
        first = arrays[0].dtype
        if first in _TAKEN and all(a.dtype == first for a in arrays):
            return first        # the common case: one dtype the kernels take
    names = names or [f"argument {i}" for i in range(len(arrays))]
    allowed = None if supported is None else _dtype_set(tuple(supported))
    dtypes = []
    for name, a in zip(names, arrays):
        dtype = np.dtype(a.dtype)
        if allowed is not None:
            if dtype not in allowed:
                hint = " (convert with .astype(np.float32))" if dtype == np.float64 else ""
                raise TypeError(f"{name} must be {_listing(supported)}{where}, got dtype "
                                f"{dtype}{hint}")
        elif dtype.kind not in "fiu" and dtype != BFLOAT16:
            raise TypeError(f"{name} must hold real numbers (float16/32/64, bfloat16 or "
                            f"integers){where}, got dtype {dtype}")
        elif dtype == np.longdouble and dtype not in _NATIVE:
            raise TypeError(f"{name} has dtype {dtype}, which is not supported{where}; "
                            f"convert it to float64")
        dtypes.append(dtype)
    first = dtypes[0] if dtypes else None
    if first is not None and (first.kind == "f" or first == BFLOAT16) \
            and all(d == first for d in dtypes):
        result = first          # the common case, without np.result_type's microseconds
    else:
        result = np.result_type(*dtypes, 1.0)
    if allowed is not None and result not in allowed:
        got = ", ".join(f"{name} {dtype}" for name, dtype in zip(names, dtypes))
        raise TypeError(f"{got} promote to {result}, which is not supported{where}: use "
                        f"{_listing(supported)}")
    return result


@functools.lru_cache(maxsize=16)
def _dtype_set(names):
    return frozenset(np.dtype(name) for name in names)


def _listing(names):
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


def check_device(device, available=CPU_DEVICES):
    """Return the device kind ("cpu" or "npu") or raise ``ValueError`` listing the choices.

    >>> from fastattn._validation import CPU_AND_NPU, check_device
    >>> check_device("cuda", CPU_AND_NPU)
    Traceback (most recent call last):
        ...
    ValueError: device must be one of ['cpu', 'npu', 'npu:N'], got 'cuda'
    """
    if isinstance(device, str):
        kind = device.split(":", 1)[0]
        if device in available or (kind == "npu" and "npu" in available):
            return kind
    choices = list(available) + (["npu:N"] if "npu" in available else [])
    raise ValueError(f"device must be one of {choices}, got {device!r}")


def check_dropout(dropout_p, rng):
    """``(p, seed)``: the dropout probability as a float in ``[0, 1)`` and the 64-bit seed
    of its mask, or ``(0.0, None)`` without dropout (``rng`` is then not touched).

    ``rng`` is None (a fresh seed from the operating system's entropy), a non-negative
    int below ``2**64`` (the seed itself: the same mask on every call), or a
    ``numpy.random.Generator`` (one 64-bit seed is drawn from it, advancing it).

    >>> from fastattn._validation import check_dropout
    >>> check_dropout(0.1, 7)
    (0.1, 7)
    >>> check_dropout(1.0, 7)
    Traceback (most recent call last):
        ...
    ValueError: dropout_p must lie in [0, 1), got 1.0
    """
    if rng is None and dropout_p.__class__ is float and dropout_p == 0.0:
        return dropout_p, None          # the common case, without the ABC check below
    if not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:         # NaN fails too
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p!r}")
    if isinstance(rng, np.random.Generator):
        seed = None if p == 0 else int(rng.integers(0, 2**64, dtype=np.uint64))
    elif rng is None:
        seed = None if p == 0 else int(np.random.default_rng().integers(0, 2**64,
                                                                          dtype=np.uint64))
    else:
        try:
            seed = operator.index(rng)
        except TypeError:
            raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, "
                            f"got {type(rng).__name__}") from None
        if not 0 <= seed < 2**64:
            raise ValueError(f"rng as a seed must lie in [0, 2**64), got {seed}")
        if p == 0:
            seed = None
    return p, seed


def check_int(name, value, minimum=1):
    """``value`` as a Python int, at least ``minimum``: ``TypeError`` if it is not an
    integer (``operator.index`` fails), ``ValueError`` if it is too small."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_array(name, value):
    """``np.asarray(value)``, with NumPy's error for ragged nested sequences (or other
    values it cannot make an array of) naming the argument."""
    try:
        return np.asarray(value)
    except ValueError as e:
        raise ValueError(f"{name} must be an array (a nested sequence of equal lengths): "
                         f"{e}") from None


def check_rng(rng, name="rng"):
    """``np.random.default_rng(rng)``: a Generator, seed or None, else ``TypeError``."""
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a numpy.random.Generator, an int seed or None, got "
                        f"{type(rng).__name__} ({e})") from None


def check_dtype(name, dtype):
    """``np.dtype(dtype)``, with an unknown dtype's ``TypeError`` naming the argument."""
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


def check_real(name, value, minimum=None):
    """``value`` as a finite Python float (``TypeError`` if it is not a real number,
    ``ValueError`` if it is NaN, infinite or below ``minimum``)."""
    if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if isinstance(value, (complex, np.complexfloating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not np.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return x


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_scale(scale, e):
    """The softmax scale: ``1/sqrt(E)`` by default, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(e)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}") from None
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_matrix_stacks(names, *operands, dtypes=result_dtypes):
    """``(arrays, compute_dtype, result_dtype)`` for operands that are stacks of matrices
    ``(..., rows, features)``: real dtypes (``dtypes``, by default :func:`result_dtypes`)
    and at least 2 dimensions; ``names`` name them in the errors."""
    arrays = [as_array(name, a) for name, a in zip(names, operands)]
    compute, result = dtypes(*arrays, names=names)
    for name, a in zip(names, arrays):
        if a.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., rows, features), "
                             f"got shape {a.shape}")
    return arrays, compute, result


def check_qkv(query, key, value, dtypes=result_dtypes):
    """``(q, k, v, compute_dtype, result_dtype)`` for (..., L, E), (..., S, E), (..., S, Ev).

    The operand checks of :func:`fastattn.scaled_dot_product_attention`, shared by
    every variant: real dtypes (``dtypes(*arrays, names=...)`` gives the compute and
    result dtypes), at least 2 dimensions, matching E and S, E >= 1.
    """
    (q, k, v), compute, result = check_matrix_stacks(("query", "key", "value"),
                                                     query, key, value, dtypes=dtypes)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"query and key must have the same feature size E: query {q.shape}, "
                         f"key {k.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value must have the same number of rows S: key {k.shape}, "
                         f"value {v.shape}")
    if q.shape[-1] == 0:
        raise ValueError(f"query and key need at least one feature, got E = 0 "
                         f"(query {q.shape}, key {k.shape})")
    return q, k, v, compute, result


def check_batch_shape(leads, **named):
    """Broadcast the leading (batch) shapes ``leads``; the error names ``named`` shapes."""
    first = tuple(leads[0])
    if all(tuple(lead) == first for lead in leads):
        return first            # the common case, without np.broadcast_shapes' microseconds
    # NumPy's broadcasting rule, in Python: a few lengths cost less than np.broadcast_shapes
    out = [1] * max(len(lead) for lead in leads)
    for lead in leads:
        for axis, n in enumerate(lead, len(out) - len(lead)):
            if n != 1 and out[axis] != n:
                if out[axis] != 1:
                    desc = ", ".join(f"{name} {shape}" for name, shape in named.items())
                    raise ValueError(f"batch dimensions do not broadcast: {desc}")
                out[axis] = n
    return tuple(out)


def check_out(out, shape, dtype, contiguous=True):
    """Raise unless ``out`` is a writable ndarray of ``shape`` and ``dtype``.

    With ``contiguous`` it must be C-contiguous, too.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, the result has shape {shape}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, the result has dtype {dtype}")
    if contiguous and not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous and writable")
    if not out.flags.writeable:
        raise ValueError("out must be writable")


def check_pair(name, value, check=check_int):
    """``(a, b)`` from one value (both) or a pair, each checked by ``check(name, x)``."""
    if np.ndim(value) == 0:
        value = (value, value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(check(name, x) for x in value)


def check_window(window):
    """``(left, right)``, both ``>= 0``, from an int (both sides) or a pair."""
    def non_negative(name, x):
        try:
            x = operator.index(x)
        except TypeError:
            raise TypeError(f"{name} sizes must be ints, got {type(x).__name__}") from None
        if x < 0:
            raise ValueError(f"{name} sizes must be >= 0, got {window!r}")
        return x
    return check_pair("window", window, non_negative)


def check_token_flags(name, tokens, n):
    """A bool vector of length ``n`` from a bool mask or a sequence of positions."""
    if tokens is None:
        return None
    t = np.asarray(tokens)
    if t.dtype == np.bool_:
        if t.shape != (n,):
            raise ValueError(f"{name} as a bool mask must have shape ({n},), got {t.shape}")
        return t.copy()
    if t.size and t.dtype.kind not in "iu":
        raise TypeError(f"{name} must be bool flags or integer positions, got dtype {t.dtype}")
    t = t.reshape(-1).astype(np.intp)
    if t.size and (t.min() < -n or t.max() >= n):
        raise ValueError(f"{name} positions must lie in [-{n}, {n}), got {tokens!r}")
    flags = np.zeros(n, dtype=bool)
    flags[t] = True
    return flags


# ---- score modifiers (flash-attn's conventions; fastattn.reference) --------------------

def check_score_window(window):
    """``(left, right)`` of a ``window=`` argument, ``None`` for an unbounded side.

    flash-attn's ``window_size``: a pair of ints >= 0, ``-1`` (or ``None``) meaning
    unbounded; ``None`` for the whole window means no window. Other negative sizes
    raise ``ValueError``, non-integers ``TypeError``.
    """
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or np.ndim(window) != 1 or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right) of ints >= 0 or -1/None "
                         f"(unbounded), got {window!r}")
    sides = []
    for name, w in zip(("left", "right"), window):
        if w is None:
            sides.append(None)
            continue
        try:
            w = operator.index(w)
        except TypeError:
            raise TypeError(f"window sizes must be ints or None, got {name} "
                            f"{type(w).__name__}") from None
        if w < -1:
            raise ValueError(f"window sizes must be >= 0, or -1 for unbounded; got {name} "
                             f"= {w} in {window!r}")
        sides.append(None if w == -1 else w)
    if sides == [None, None]:
        return None
    return tuple(sides)


def check_softcap(softcap):
    """``softcap`` as a positive finite float, or None (off)."""
    if softcap is None:
        return None
    try:
        softcap = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a positive real number or None, got "
                        f"{type(softcap).__name__}") from None
    if not (np.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number (None: off), got {softcap}")
    return softcap


def check_alibi_slopes(alibi_slopes, heads_shape, what="the query's (batch, heads) axes"):
    """ALiBi slopes of shape ``(H,)`` or ``(B, H)`` matching the last one or two entries
    of ``heads_shape``, as a float64 array broadcast to ``heads_shape`` (C order); None
    stays None. Non-real or non-finite slopes raise ``TypeError`` / ``ValueError``."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    if slopes.dtype.kind not in "iuf" and slopes.dtype != BFLOAT16:
        raise TypeError(f"alibi_slopes must hold real numbers, got dtype {slopes.dtype}")
    n = slopes.ndim
    if n not in (1, 2) or len(heads_shape) < n or tuple(heads_shape[-n:]) != slopes.shape:
        want = " or ".join(str(tuple(heads_shape[-k:])) for k in (1, 2)
                           if len(heads_shape) >= k) or "(H,) with a head axis"
        raise ValueError(f"alibi_slopes must have shape (H,) or (B, H) matching {what} "
                         f"{tuple(heads_shape)}: {want}; got {slopes.shape}")
    slopes = slopes.astype(np.float64)
    if not np.all(np.isfinite(slopes)):
        raise ValueError("alibi_slopes must be finite")
    return np.ascontiguousarray(np.broadcast_to(slopes, tuple(heads_shape)))
