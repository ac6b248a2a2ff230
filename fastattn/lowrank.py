"""Low-rank and kernelised attention: linear attention, Performer, Linformer, Synthesizer.

None of these forms the ``(L, S)`` softmax: linear attention and Performer replace
it by a feature map (``O(N)`` time and memory), Linformer projects keys and values
along the sequence to ``k`` rows, and Synthesizer's logits do not depend on the
query-key product. The exact-softmax pieces (Linformer, Synthesizer) run on the
fused dense kernel; linear attention and Performer on the chunked kernel of
``fastattn/_kernels/lowrank.pyx`` (no ``(N, m)`` feature matrix is formed).
"""

import numpy as np

from fastattn import _threads
from fastattn._kernels import lowrank as _kernel
from fastattn._layout import as_kernel_array, as_matrix_stack, batch_offsets
from fastattn._validation import (HALF, as_array, check_batch_shape, check_choice, check_int,
                                  check_qkv, check_real, check_rng, check_scale, is_floating,
                                  result_dtypes)
from fastattn.attention import scaled_dot_product_attention

__all__ = ["linear_attention", "performer_features", "performer_attention",
           "linformer_attention", "synthesizer_attention"]

# Rows per chunk of the non-causal key and query passes: a chunk's features
# (CHUNK x m, 256 KB at m = 256 in float32) stay in L2 between their computation,
# their exponentiation and their product.
CHUNK = 256
# Rows per step of the causal prefix scan: the state is updated once per chunk and
# the chunk's own (C x C) triangle is computed directly, so C trades the triangle's
# cost (C (m + Ev) per row) against smaller, less efficient products. 64 and 32 were
# 15% faster than 128 and 35% faster than 256 (Performer, N = 16K, m = 256, Ev = 64).
SCAN_CHUNK = 64


def _chunked_terms(kind, q, k, v, w, root, eps, causal, num_threads, compute):
    """Run the chunked kernel (``fastattn/_kernels/lowrank.pyx``); see its header.

    ``kind`` is "elu", "given" (the rows of q and k are the features) or "favor" (with
    directions ``w``, ``(m, E)``, and ``root = sqrt(scale)``). Returns the output in
    ``compute`` dtype, shape ``batch + (L, Ev)``.
    """
    nthreads = _threads.resolve_num_threads(num_threads)
    batch_shape = check_batch_shape([q.shape[:-2], k.shape[:-2], v.shape[:-2]],
                                    query=q.shape, key=k.shape, value=v.shape)
    L, E = q.shape[-2:]
    S, Ev = v.shape[-2:]
    out = np.empty(batch_shape + (L, Ev), dtype=compute)
    if out.size == 0:
        return out
    if S == 0:
        out.fill(0)         # no key: zeros, as dense attention gives (not 0 / eps = NaN)
        return out
    favor = kind == "favor"
    m = w.shape[0] if favor else E
    qa, ldq = as_matrix_stack(q, compute)
    ka, ldk = as_matrix_stack(k, compute)
    va, ldv = as_matrix_stack(v, compute)
    q_off = batch_offsets(qa, batch_shape)
    k_off = batch_offsets(ka, batch_shape)
    v_off = batch_offsets(va, batch_shape)
    nbatch = q_off.shape[0]
    w = as_kernel_array(w if favor else np.zeros((1, 1)), compute)
    code = _kernel.FEATURE_MAPS[kind]
    size = _kernel.state_length(m, Ev)
    # Non-causal FAVOR in float32 runs on the tile micro-kernels alone; the rest calls
    # BLAS from our threads, which must then be single-threaded.
    blas = (_threads.tile_blas(compute, Ev) if favor and not causal
            else _threads.single_threaded_blas())
    # flops of one row's features (FAVOR: its projection on w and the exp; elu: the exp)
    features = m * (2 * E + 20) if favor else 20 * m
    plan = dict(causal=causal, root=root, eps=eps)

    if not causal:
        # one state per distinct (key, value) matrix pair: heads sharing keys and values
        # (broadcast batch dimensions) share it
        pairs, state_of = np.unique(np.stack([k_off, v_off], axis=1), axis=0,
                                    return_inverse=True)
        state_of = np.ascontiguousarray(state_of.reshape(-1), dtype=np.intp)
        nstate = pairs.shape[0]
        nkc, nqc = -(-S // CHUNK), -(-L // CHUNK)
        work = (nstate * S + nbatch * L) * (features + 2 * m * Ev)
        nthreads = _threads.call_threads(nthreads, max(nstate * nkc, nbatch * nqc), work)
        nsplit, _ = _threads.split_keys(nstate, nkc, nthreads)
        parts = np.empty((nstate * nsplit, size), dtype=compute)
        states = np.empty((nstate, size), dtype=compute)
        plan = _kernel.LowRankPlan(
            code, qa, ka, va, w, out,
            (q_off, np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])),
            (ldq, ldk, ldv), L, S, E, m, Ev, **plan, chunk=CHUNK, nsplit=nsplit,
            nthreads=nthreads, parts=parts, state_of=state_of, states=states)
        with blas:
            _kernel.noncausal(plan)
        return out

    # Causal: the scan is sequential along the sequence, so batch entries are the
    # parallel items; with fewer entries than threads each is cut into segments (at
    # the price of a second pass over the keys, see the kernel).
    nchunks = -(-L // SCAN_CHUNK)
    # per row: key and query features, the state's product and update, the chunk's
    # triangle (t = fq fk^T and t @ v)
    work = nbatch * L * (2 * features + 4 * m * Ev + 2 * SCAN_CHUNK * (m + Ev))
    nthreads = _threads.call_threads(nthreads, nbatch * nchunks, work)
    nseg = 1 if nbatch >= nthreads else min(nchunks, -(-nthreads // nbatch))
    parts = np.empty((nbatch * nseg, size), dtype=compute)
    rowinfo = np.empty((nbatch, L, 2), dtype=compute) if favor else None
    chunk_max = np.empty((nbatch, nchunks + nseg), dtype=compute) if favor else None
    plan = _kernel.LowRankPlan(code, qa, ka, va, w, out, (q_off, k_off, v_off), (ldq, ldk, ldv),
                               L, S, E, m, Ev, **plan, chunk=SCAN_CHUNK, nsplit=nseg,
                               nthreads=nthreads, parts=parts, rowinfo=rowinfo,
                               chunk_max=chunk_max)
    with blas:
        _kernel.causal(plan)
    return out


def _check_causal_lengths(causal, q, k):
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal linear attention needs L == S: query {q.shape}, key {k.shape}")


def linear_attention(query, key, value, *, feature_map="elu", causal=False, eps=1e-6,
                     num_threads=None):
    r"""Linear attention (Katharopoulos et al.): softmax replaced by a feature map.

    ``out_i = phi(q_i) @ sum_j phi(k_j) v_j^T / (phi(q_i) @ sum_j phi(k_j) + eps)``,
    over ``j <= i`` when causal. No ``1/sqrt(E)`` scaling (as in fast-transformers).

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
    feature_map : "elu" or callable, default="elu"
        ``phi(x) = elu(x) + 1``, or a function applied to query and key arrays
        (it must keep them non-negative for a meaningful normalisation).
    causal : bool, default=False
        Row ``i`` sees keys ``j <= i`` (needs ``L == S``): a chunked prefix scan,
        ``O(N E Ev)`` time, ``O(E Ev)`` state per batch entry.
    eps : float, default=1e-6
        Added to the denominator.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)

    Raises
    ------
    ValueError
        For mismatched shapes, ``causal`` with ``L != S``, or a ``feature_map``
        whose results do not have shapes ``(..., L, m)`` and ``(..., S, m)``.

    Notes
    -----
    Runs as a chunked reduction in a compiled kernel (``fastattn/_kernels/lowrank.pyx``):
    chunks of keys are mapped and folded into the ``(m, Ev)`` state
    ``sum_j phi(k_j) v_j^T`` and the normaliser ``sum_j phi(k_j)`` (``m = E`` for
    ``"elu"``, else the feature size of ``feature_map``), then chunks of
    queries are mapped and multiplied with them, in parallel over batch entries and
    chunks. Memory beyond the output: the states and a few chunk buffers per thread.
    A callable ``feature_map`` is applied to whole arrays in Python first.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 100, 8)) for _ in range(3))
    >>> out = fastattn.linear_attention(q, k, v, causal=True)
    >>> ref = fastattn.reference.linear_attention(q, k, v, causal=True)
    >>> bool(np.allclose(out, ref))
    True
    """
    q, k, v, compute, result = check_qkv(query, key, value)
    _check_causal_lengths(causal, q, k)
    L, S = q.shape[-2], k.shape[-2]
    eps = check_real("eps", eps, minimum=0)
    kind = "elu"
    if isinstance(feature_map, str):
        check_choice("feature_map", feature_map, ("elu",))
    elif callable(feature_map):
        kind = "given"
        q, k = (np.asarray(feature_map(a.astype(compute, copy=False)), dtype=compute)
                for a in (q, k))
        if q.ndim < 2 or k.ndim < 2 or q.shape[-2] != L or k.shape[-2] != S \
                or q.shape[-1] != k.shape[-1] or q.shape[-1] == 0:
            raise ValueError(f"feature_map must map query (..., L={L}, E) and key "
                             f"(..., S={S}, E) to (..., L, m) and (..., S, m) with m >= 1, "
                             f"got {q.shape} and {k.shape}")
    else:
        raise TypeError(f"feature_map must be 'elu' or a callable, got {feature_map!r}")
    out = _chunked_terms(kind, q, k, v, None, 1.0, eps, causal, num_threads, compute)
    return out.astype(result, copy=False)


def performer_features(dim, num_features=256, *, orthogonal=True, rng=None):
    """Random feature directions ``W`` of shape ``(num_features, dim)`` for FAVOR+.

    Orthogonal: blocks of ``dim`` orthonormal rows (``Q^T`` of the QR of a Gaussian
    matrix, with the sign fix ``diag(sign(diag R))``), stacked and truncated to
    ``num_features`` rows, each row scaled by the norm of an independent
    ``N(0, I_dim)`` vector, so rows are distributed like Gaussian rows. Otherwise
    i.i.d. ``N(0, 1)`` entries.

    Parameters
    ----------
    dim : int
        Feature size E of queries and keys.
    num_features : int, default=256
    orthogonal : bool, default=True
    rng : numpy.random.Generator or int, optional
        The same seed gives the same features.

    Returns
    -------
    ndarray, shape (num_features, dim), float64

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> w = fastattn.performer_features(4, 8, rng=0)
    >>> w.shape
    (8, 4)
    >>> unit = w[:4] / np.linalg.norm(w[:4], axis=1, keepdims=True)
    >>> bool(np.allclose(unit @ unit.T, np.eye(4)))
    True
    """
    dim = check_int("dim", dim)
    num_features = check_int("num_features", num_features)
    rng = check_rng(rng)
    if not orthogonal:
        return rng.standard_normal((num_features, dim))
    # the result first: a size that cannot be allocated raises MemoryError at once,
    # not after drawing num_features / dim blocks
    w = np.empty((num_features, dim))
    for start in range(0, num_features, dim):
        qm, rm = np.linalg.qr(rng.standard_normal((dim, dim)))
        w[start:start + dim] = (qm * np.sign(np.diag(rm))).T[:num_features - start]
    norms = np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1)
    w *= norms[:, None]
    return w




def performer_attention(query, key, value, *, num_features=None, causal=False, orthogonal=True,
                        rng=None, features=None, scale=None, num_threads=None):
    """Performer (FAVOR+): softmax attention approximated by positive random features.

    ``out = D^{-1} phi(Q) (phi(K)^T V)`` with ``D = phi(Q) phi(K)^T 1``, where
    ``phi(x) = m^{-1/2} exp(W x' - |x'|^2 / 2)`` and ``x' = x * scale ** 0.5``, so
    ``E[phi(q) . phi(k)] = exp(scale * q . k)``.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
    num_features : int, optional
        Number of random features m; default 256 (google-research).
    causal : bool, default=False
        Prefix-scan form (needs ``L == S``).
    orthogonal : bool, default=True
        Orthogonal random features (see :func:`performer_features`).
    rng : numpy.random.Generator or int, optional
        Source of the features when ``features`` is not given.
    features : array_like, shape (m, E), optional
        Reuse a draw of :func:`performer_features`.
    scale : float, optional
        Softmax scale being approximated; default ``1 / sqrt(E)``.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)

    Raises
    ------
    ValueError
        For ``num_features <= 0``, features of the wrong shape, or ``causal``
        with ``L != S``.

    Notes
    -----
    The features are google-research's
    ``phi(x) = m^{-1/2} (exp(W x' - |x'|^2 / 2 - stab) + 1e-4)``, with ``stab`` the
    row's own maximum for a query and one maximum over all keys and features (per
    batch entry) for the keys, also in the causal form; denominators with
    ``|D| <= 1e-6`` get ``2e-6`` added.

    The computation is a chunked reduction in a compiled kernel
    (``fastattn/_kernels/lowrank.pyx``): no ``(N, m)`` feature matrix is formed.
    Chunks of keys are projected, exponentiated and folded at once into the
    ``(m, Ev)`` state and the ``(m,)`` normaliser, in parallel over batch entries and
    chunks; then chunks of queries are projected and multiplied with the state. The
    key maximum is only known at the end, so the state is kept relative to a running
    maximum and rescaled when it rises (as the online softmax of FlashAttention), and
    the ``1e-4`` term is added once the maximum is final (causal rows produced before
    that are corrected in a last pass over the output). Memory beyond the output:
    ``O(threads x chunk x m)`` buffers, the ``(m, Ev)`` states, and for the causal
    form two numbers per row.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (0.3 * rng.standard_normal((2, 64, 16)) for _ in range(3))
    >>> approx = fastattn.performer_attention(q, k, v, num_features=2048, rng=0)
    >>> exact = fastattn.scaled_dot_product_attention(q, k, v)
    >>> bool(np.abs(approx - exact).max() < 0.05)
    True
    """
    q, k, v, compute, result = check_qkv(query, key, value)
    _check_causal_lengths(causal, q, k)
    E = q.shape[-1]
    if features is None:
        w = performer_features(E, 256 if num_features is None else num_features,
                               orthogonal=orthogonal, rng=rng)
    else:
        w = as_array("features", features)
        result_dtypes(w, names=("features",))
        w = w.astype(np.float64)
        if w.ndim != 2 or w.shape[1] != E or w.shape[0] == 0:
            raise ValueError(f"features must have shape (m, E={E}) with m >= 1, got {w.shape}")
        if num_features is not None and check_int("num_features", num_features) != w.shape[0]:
            raise ValueError(f"num_features={num_features} but features has {w.shape[0]} rows")
    # x' = x sqrt(scale) is folded into the kernel's projection: root x @ W^T
    root = float(np.sqrt(check_scale(scale, E)))
    out = _chunked_terms("favor", q, k, v, w, root, 0.0, causal, num_threads, compute)
    return out.astype(result, copy=False)


def linformer_attention(query, key, value, e_proj, f_proj=None, *, scale=None,
                        num_threads=None):
    """Linformer: ``softmax(Q (E K)^T * scale) (F V)``, keys and values projected along
    the sequence axis to ``k`` rows.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
    e_proj : array_like, shape (..., k, S)
        Projection of the keys (broadcast over the batch).
    f_proj : array_like, shape (..., k, S), optional
        Projection of the values; default ``e_proj`` (shared, as in LRA).
    scale : float, optional
        Default ``1 / sqrt(E)``.
    num_threads : int, optional
        Threads of the dense kernel.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)

    Raises
    ------
    ValueError
        When a projection's last axis is not S.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 128, 16)) for _ in range(3))
    >>> out = fastattn.linformer_attention(q, k, v, np.eye(128))   # E = F = I
    >>> bool(np.allclose(out, fastattn.scaled_dot_product_attention(q, k, v)))
    True
    """
    q, k, v, compute, result = check_qkv(query, key, value)
    S = k.shape[-2]
    projections = []
    for name, p in (("e_proj", e_proj), ("f_proj", e_proj if f_proj is None else f_proj)):
        p = as_array(name, p)
        result_dtypes(p, names=(name,))
        if p.ndim < 2 or p.shape[-1] != S or p.shape[-2] == 0:
            raise ValueError(f"{name} must have shape (..., k, S={S}) with k >= 1, got "
                             f"{p.shape} (key {k.shape})")
        projections.append(p.astype(compute, copy=False))
    e, f = projections
    if f.shape[-2] != e.shape[-2]:
        raise ValueError(f"e_proj and f_proj must project to the same k rows, got e_proj "
                         f"{e.shape} and f_proj {f.shape}")
    check_batch_shape([q.shape[:-2], k.shape[:-2], v.shape[:-2], e.shape[:-2], f.shape[:-2]],
                      query=q.shape, key=k.shape, value=v.shape, e_proj=e.shape,
                      f_proj=f.shape)
    k_proj = projections[0] @ k.astype(compute, copy=False)
    v_proj = projections[1] @ v.astype(compute, copy=False)
    out = scaled_dot_product_attention(q.astype(compute, copy=False), k_proj, v_proj,
                                       scale=scale, num_threads=num_threads)
    return out.astype(result, copy=False)


def synthesizer_attention(value, *, weights, mode="random", query=None, num_threads=None):
    """Synthesizer attention: ``softmax(logits) @ value`` with synthesised logits.

    The logits over the ``S`` positions of ``value`` (self-attention, ``L = S``)
    do not come from query-key products:

    - ``mode="random"``: ``weights = R`` of shape ``(..., N, N)`` with ``N >= S``;
      logits ``R[..., :S, :S]`` (LRA slices a ``max_len`` matrix the same way).
    - ``mode="factorized"``: ``weights = (R1, R2)``, ``(..., N, k)`` and
      ``(..., k, N)``; logits ``R1[..., :S, :] @ R2[..., :, :S]``.
    - ``mode="dense"``: ``weights = (W1, W2)`` or ``(W1, b1, W2, b2)`` with
      ``W1 (d, h)``, ``W2 (h, N)``; logits ``relu(X W1 + b1) W2[:, :S] + b2[:S]``
      for ``X = query`` of shape ``(..., S, d)``.

    Every mode runs the fused dense kernel: the logits are a float mask
    (random) or a query-key product with scale 1 (factorized, dense).

    Parameters
    ----------
    value : array_like, shape (..., S, Ev)
    weights : array_like or tuple of array_like
    mode : {"random", "factorized", "dense"}, default="random"
    query : array_like, shape (..., S, d), optional
        The input X of the dense mode.
    num_threads : int, optional

    Returns
    -------
    out : ndarray, shape (..., S, Ev)

    Raises
    ------
    ValueError
        For weights too short for S or of mismatched shapes.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((64, 8)) for _ in range(3))
    >>> logits = q @ k.T / np.sqrt(8)
    >>> out = fastattn.synthesizer_attention(v, weights=logits)
    >>> bool(np.allclose(out, fastattn.scaled_dot_product_attention(q, k, v)))
    True
    """
    check_choice("mode", mode, ("random", "factorized", "dense"))
    v = as_array("value", value)
    result_dtypes(v, names=("value",))
    if v.ndim < 2:
        raise ValueError(f"value must have at least 2 dimensions (..., S, Ev), got {v.shape}")
    S = v.shape[-2]

    def fits(name, a, axes):
        a = as_array(name, a)
        result_dtypes(a, names=(name,))
        if a.ndim < 2 or any(a.shape[ax] < S for ax in axes):
            raise ValueError(f"{name} of shape {a.shape} is too short for S={S} "
                             f"(value {v.shape})")
        return a

    if mode == "random":
        r = fits("weights", weights, (-2, -1))[..., :S, :S]
        zeros = np.zeros(r.shape[:-2] + (S, 1), dtype=np.result_type(r, v, 1.0))
        return scaled_dot_product_attention(zeros, zeros, v, r.astype(zeros.dtype),
                                            scale=1.0, num_threads=num_threads)
    if mode == "factorized":
        if isinstance(weights, np.ndarray) or len(weights) != 2:
            raise ValueError("mode='factorized' takes weights=(R1, R2), a pair of arrays")
        r1, r2 = weights
        r1 = fits("weights[0]", r1, (-2,))[..., :S, :]
        r2 = fits("weights[1]", r2, (-1,))[..., :, :S]
        if r1.shape[-1] != r2.shape[-2]:
            raise ValueError(f"factorized weights do not chain: {r1.shape} @ {r2.shape}")
        return scaled_dot_product_attention(r1, np.swapaxes(r2, -1, -2), v, scale=1.0,
                                            num_threads=num_threads)
    if query is None:
        raise ValueError("mode='dense' needs query (the input X, shape (..., S, d))")
    x = np.asarray(query)
    if len(weights) == 2:
        (w1, w2), b1, b2 = weights, None, None
    elif len(weights) == 4:
        w1, b1, w2, b2 = weights
    else:
        raise ValueError("dense weights must be (W1, W2) or (W1, b1, W2, b2)")
    w1 = np.asarray(w1)
    w2 = fits("W2", w2, (-1,))[..., :S]
    if x.ndim < 2 or x.shape[-2] != S or w1.ndim != 2 or w1.shape[0] != x.shape[-1] \
            or w2.shape[-2] != w1.shape[1]:
        raise ValueError(f"dense synthesizer shapes do not chain: X {x.shape} (needs S={S} "
                         f"rows), W1 {w1.shape}, W2 {np.shape(w2)}")
    # half types: the MLP runs in float32 (NumPy's bfloat16 matmul returns float32, its
    # float16 one is slow) and the result is returned in the half type
    operands = [x, w1, w2, v] + [np.asarray(b) for b in (b1, b2) if b is not None]
    half = None
    if all(is_floating(a.dtype) for a in operands) and np.result_type(*operands) in HALF:
        half = np.result_type(*operands)
        x, w1, w2 = (a.astype(np.float32) for a in (x, w1, w2))
    hidden = x @ w1
    if b1 is not None:
        hidden = hidden + np.asarray(b1)
    hidden = np.maximum(hidden, 0)
    bias = None if b2 is None else np.asarray(b2)[..., None, :S].astype(
        np.result_type(hidden, w2, v, 1.0))
    out = scaled_dot_product_attention(hidden, np.swapaxes(w2, -1, -2), v, bias, scale=1.0,
                                       num_threads=num_threads)
    return out if half is None else out.astype(half)
