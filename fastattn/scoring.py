"""Classic attention scoring rules: Bahdanau (additive) and Luong (dot, general, concat).

Each computes ``softmax(score(q_i, k_j) + mask) @ value`` with a fused kernel that
never materialises an ``(L, S, hidden)`` tensor. Weights follow the
``torch.nn.Linear`` convention, shape ``(out_features, in_features)``.
"""
import numpy as np

from fastattn import _linear, _threads
from fastattn._kernels import additive as _additive
from fastattn._layout import PreparedMask, as_kernel_array, as_mask, as_matrix_stack, batch_offsets
from fastattn._validation import as_array, result_dtypes
from fastattn.attention import scaled_dot_product_attention
from fastattn.softmax import attention_weights

__all__ = ["additive_attention", "concat_attention", "general_attention", "dot_attention"]

# Query rows per work item of the additive kernel (a rows x S score block per thread).
BLOCK_ROWS = 32
# Work of one (query, key, hidden unit) score term for the thread count
# (fastattn._threads.call_threads): a tanh and a multiply-add, about this many flops.
TANH_WORK = 20


def additive_attention(query, key, value, *, w_q, w_k, v, mask=None, return_weights=False,
                       num_threads=None):
    r"""Bahdanau (additive) attention: ``score(q, k) = v · tanh(W_q q + W_k k)``.

    Parameters
    ----------
    query : array_like, shape (..., L, E_q)
        E.g. decoder states.
    key : array_like, shape (..., S, E_k)
    value : array_like, shape (..., S, E_v)
        E.g. encoder states (often the same array as ``key``). Leading dimensions
        broadcast.
    w_q : array_like, shape (hidden, E_q)
    w_k : array_like, shape (hidden, E_k)
    v : array_like, shape (hidden,)
    mask : array_like, optional
        Broadcastable to ``(..., L, S)``: bool True = attend, float added to the
        scores.
    return_weights : bool, default=False
        Also return the attention weights ``(..., L, S)``.
    num_threads : int, optional
        Threads for the kernel and the projections (default: all cores).

    Returns
    -------
    out : ndarray, shape (..., L, E_v)
    weights : ndarray, shape (..., L, S)
        Only with ``return_weights=True``.

    Raises
    ------
    ValueError
        For weight shapes that do not match the inputs, or shapes that do not
        broadcast (the shapes are named).
    TypeError
        For non-real inputs or a mask of the wrong dtype.

    See Also
    --------
    concat_attention, general_attention

    Notes
    -----
    ``W_q q`` and ``W_k k`` are projected once per distinct query or key matrix
    (BLAS, inside the kernel's threads). The scores of a query are then computed
    for a vector of keys at a time, with a rational approximation of ``tanh``
    (error at most 6.3 ulp in float32, 1e-15 absolute in float64), then the fused
    masked softmax and a BLAS product with ``value`` per block of query rows. A
    bool mask's keys before the first and after the last kept one of a row are
    not scored. Extra memory is the two projections and a block of scores per
    thread, not the ``L·S·hidden`` tensor of the broadcasting formula. A query
    whose keys are all masked out gets zeros.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 8))                       # one decoder state
    >>> enc = rng.standard_normal((5, 6))                     # 5 encoder states
    >>> w_q, w_k, v = rng.standard_normal((4, 8)), rng.standard_normal((4, 6)), np.ones(4)
    >>> ctx, weights = fastattn.additive_attention(q, enc, enc, w_q=w_q, w_k=w_k, v=v,
    ...                                            return_weights=True)
    >>> ctx.shape, weights.shape
    ((1, 6), (1, 5))

    The same weights from the formula, written out with broadcasting:

    >>> scores = np.tanh((q @ w_q.T)[:, None, :] + (enc @ w_k.T)[None, :, :]) @ v
    >>> bool(np.allclose(weights, np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)))
    True
    """
    c = _Checked(query, key, value, mask, w_q=w_q, w_k=w_k, v=v)
    c.weight("w_q", (None, c.Eq))
    hidden = c.arr["w_q"].shape[0]
    c.weight("w_k", (hidden, c.Ek))
    c.weight("v", (hidden,))
    return c.finish(*_run_additive(c.arr["w_q"], c.arr["w_k"], c.arr["v"], c, return_weights,
                                   num_threads), return_weights)


def concat_attention(query, key, value, *, w, v, mask=None, return_weights=False,
                     num_threads=None):
    r"""Luong "concat" attention: ``score(q, k) = v · tanh(W [q; k])``.

    ``W [q; k] = W[:, :E_q] q + W[:, E_q:] k``, so this is
    :func:`additive_attention` with ``w_q, w_k = W[:, :E_q], W[:, E_q:]`` and runs on
    the same fused kernel.

    Parameters
    ----------
    query : array_like, shape (..., L, E_q)
    key : array_like, shape (..., S, E_k)
    value : array_like, shape (..., S, E_v)
    w : array_like, shape (hidden, E_q + E_k)
    v : array_like, shape (hidden,)
    mask : array_like, optional
        Broadcastable to ``(..., L, S)``: bool True = attend, float added.
    return_weights : bool, default=False
    num_threads : int, optional

    Returns
    -------
    out : ndarray, shape (..., L, E_v)
    weights : ndarray, shape (..., L, S)
        Only with ``return_weights=True``.

    See Also
    --------
    additive_attention

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(1)
    >>> h_t, enc = rng.standard_normal((2, 4)), rng.standard_normal((3, 4))
    >>> w, v = rng.standard_normal((5, 8)), rng.standard_normal(5)
    >>> ctx, a = fastattn.concat_attention(h_t, enc, enc, w=w, v=v, return_weights=True)
    >>> pair = np.concatenate([h_t[0], enc[2]])               # [q; k] for q_0, k_2
    >>> score = v @ np.tanh(w @ pair)
    >>> scores = [v @ np.tanh(w @ np.concatenate([h_t[0], e])) for e in enc]
    >>> bool(np.isclose(a[0, 2], np.exp(score) / np.exp(scores).sum()))
    True
    """
    c = _Checked(query, key, value, mask, w=w, v=v)
    c.weight("w", (None, c.Eq + c.Ek))
    hidden = c.arr["w"].shape[0]
    c.weight("v", (hidden,))
    w = c.arr["w"]
    return c.finish(*_run_additive(w[:, :c.Eq], w[:, c.Eq:], c.arr["v"], c, return_weights,
                                   num_threads), return_weights)


def general_attention(query, key, value, *, w, mask=None, return_weights=False,
                      num_threads=None):
    r"""Luong "general" attention: ``score(q, k) = q · (W k)``, no scaling.

    ``q · W k = (q W) · k``: the queries are multiplied by ``W`` once (BLAS), then
    the fused scaled-dot-product kernel runs with ``scale=1``.

    Parameters
    ----------
    query : array_like, shape (..., L, E_q)
    key : array_like, shape (..., S, E_k)
    value : array_like, shape (..., S, E_v)
    w : array_like, shape (E_q, E_k)
        Maps a key into query space (``torch.nn.Linear(E_k, E_q)``'s weight).
    mask : array_like, optional
        Broadcastable to ``(..., L, S)``: bool True = attend, float added.
    return_weights : bool, default=False
    num_threads : int, optional

    Returns
    -------
    out : ndarray, shape (..., L, E_v)
    weights : ndarray, shape (..., L, S)
        Only with ``return_weights=True``.

    See Also
    --------
    dot_attention, additive_attention

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> q, k = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> w = np.array([[0.0, 2.0], [0.0, 0.0]])    # q . W k = 2 * q[0] * k[1]
    >>> out, a = fastattn.general_attention(q, k, k, w=w, return_weights=True)
    >>> a.round(3)                                # scores 0 and 2
    array([[0.119, 0.881]])
    """
    c = _Checked(query, key, value, mask, w=w)
    c.weight("w", (c.Eq, c.Ek))
    qw = c.q @ c.arr["w"]
    return _dot(qw, c, return_weights, num_threads)


def dot_attention(query, key, value, *, mask=None, return_weights=False, num_threads=None):
    r"""Luong "dot" attention: ``score(q, k) = q · k``, no scaling.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, E_v)
    mask : array_like, optional
        Broadcastable to ``(..., L, S)``: bool True = attend, float added.
    return_weights : bool, default=False
    num_threads : int, optional

    Returns
    -------
    out : ndarray, shape (..., L, E_v)
    weights : ndarray, shape (..., L, S)
        Only with ``return_weights=True``.

    See Also
    --------
    general_attention, fastattn.scaled_dot_product_attention

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> q, k = np.array([[1.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> out, a = fastattn.dot_attention(q, k, k, return_weights=True)
    >>> a.round(3)                                # scores 1 and 2
    array([[0.269, 0.731]])
    """
    c = _Checked(query, key, value, mask)
    if c.Eq != c.Ek:
        raise ValueError(f"query and key must have the same feature size: query "
                         f"{c.q.shape}, key {c.k.shape}")
    return _dot(c.q, c, return_weights, num_threads)


class _Checked:
    """Validated inputs of a scoring rule, all in the compute dtype."""

    def __init__(self, query, key, value, mask, **weights):
        named = {"query": query, "key": key, "value": value, **weights}
        arr = {n: as_array(n, a) for n, a in named.items()}
        self.compute, self.result = result_dtypes(*arr.values(), names=list(arr))
        self.arr = {n: a.astype(self.compute, copy=False) for n, a in arr.items()}
        self.q, self.k, self.v = self.arr["query"], self.arr["key"], self.arr["value"]
        for name in ("query", "key", "value"):
            if self.arr[name].ndim < 2:
                raise ValueError(f"{name} must have shape (..., seq, features), got "
                                 f"{self.arr[name].shape}")
        self.L, self.Eq = self.q.shape[-2:]
        self.S, self.Ek = self.k.shape[-2:]
        if self.v.shape[-2] != self.S:
            raise ValueError(f"key and value must have the same length S: key {self.k.shape}, "
                             f"value {self.v.shape}")
        leads = [self.q.shape[:-2], self.k.shape[:-2], self.v.shape[:-2]]
        self.mask = None
        if mask is not None:
            self.mask = as_mask(mask, "mask")
            m_rows, m_cols = ((1, 1) + self.mask.shape)[-2:]
            if m_rows not in (1, self.L) or m_cols not in (1, self.S):
                raise ValueError(f"mask of shape {self.mask.shape} does not broadcast to the "
                                 f"scores (..., L={self.L}, S={self.S})")
            leads.append(self.mask.shape[:-2])
        try:
            self.batch_shape = np.broadcast_shapes(*leads)
        except ValueError:
            shapes = f"query {self.q.shape}, key {self.k.shape}, value {self.v.shape}"
            if mask is not None:
                shapes += f", mask {self.mask.shape}"
            raise ValueError(f"batch dimensions do not broadcast: {shapes}") from None

    def weight(self, name, shape):
        # shape: expected dims, None where anything goes
        w = self.arr[name]
        if w.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, w.shape)):
            want = "(" + ", ".join("hidden" if s is None else str(s) for s in shape) + \
                   ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want} for query {self.q.shape} and "
                             f"key {self.k.shape}, got {w.shape}")

    def finish(self, out, weights, return_weights):
        if self.result != self.compute:
            out = out.astype(self.result)
            weights = None if weights is None else weights.astype(self.result)
        return (out, weights) if return_weights else out


def _dot(q, c, return_weights, num_threads):
    out = scaled_dot_product_attention(q, c.k, c.v, c.mask, scale=1.0, num_threads=num_threads)
    weights = None
    if return_weights:
        weights = attention_weights(q, c.k, c.mask, scale=1.0, num_threads=num_threads)
    return c.finish(out, weights, return_weights)


def _run_additive(w_q, w_k, w, c, return_weights, num_threads):
    # softmax(w . tanh(W_q q + W_k k) + mask) @ value, for the validated inputs in c
    L, S, hidden, Ev = c.L, c.S, w_q.shape[0], c.v.shape[-1]
    dtype = c.compute
    out = np.zeros(c.batch_shape + (L, Ev), dtype=dtype)
    weights = np.zeros(c.batch_shape + (L, S), dtype=dtype) if return_weights else None
    nthreads = _threads.resolve_num_threads(num_threads)
    if out.shape[:-1].count(0) or S == 0:
        return out, weights      # nothing to attend: zeros, like a fully masked row
    qs, ldq = as_matrix_stack(c.q, dtype)
    ks, ldk = as_matrix_stack(c.k, dtype)
    vs, ldv = as_matrix_stack(c.v, dtype)
    # Each distinct query / key matrix is projected once, however often it is broadcast.
    q_mats, q_of = np.unique(batch_offsets(qs, c.batch_shape), return_inverse=True)
    k_mats, k_of = np.unique(batch_offsets(ks, c.batch_shape), return_inverse=True)
    v_off = batch_offsets(vs, c.batch_shape)
    nbatch = v_off.shape[0]
    # Key projections as columns (kp.T), the key axis padded with zeros to whole vectors.
    s_pad = -(-S // _additive.KEY_PAD) * _additive.KEY_PAD
    qp = np.empty((len(q_mats), L, hidden), dtype=dtype)
    kpt = np.zeros((len(k_mats), hidden, s_pad), dtype=dtype)
    q_off = (q_of * (L * hidden)).astype(np.intp).reshape(-1)
    k_off = (k_of * (hidden * s_pad)).astype(np.intp).reshape(-1)
    # the additive kernel's threads: scores, their softmax and p @ value
    threads = _threads.call_threads(nthreads, nbatch * L,
                                    nbatch * L * S * (TANH_WORK * hidden + 2 * Ev + 20))
    block_r = int(max(1, min(BLOCK_ROWS, L, -(-L * nbatch // (4 * threads)))))
    prepared = None
    if c.mask is not None:
        prepared = PreparedMask(c.mask, dtype, L, S, c.batch_shape, block_r, S)
    with _threads.single_threaded_blas():
        _linear.run([_linear.stack_job(qs, q_mats, ldq, L, w_q, None, qp, nthreads),
                     _linear.stack_job(ks, k_mats, ldk, S, w_k, None, kpt, nthreads,
                                       transpose=True)], nthreads)
        _additive.additive(qp, kpt, as_kernel_array(w), vs, out, weights,
                           q_off, k_off, v_off, ldv, L, S, Ev, prepared, block_r, threads)
    return out, weights
