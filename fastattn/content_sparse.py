"""Content-based sparse attention: Reformer LSH, clustered and Sinkhorn attention.

Here the data chooses who attends to whom: queries that hash to the same bucket
(Reformer), fall in the same k-means cluster (clustered attention), or blocks that a
soft sort pairs up (Sinkhorn). Each costs far less than the ``(L, S)`` product:

- :func:`lsh_attention` sorts each hash round by bucket and lets chunks of
  ``bucket_size`` rows attend to themselves and ``chunks_before`` earlier chunks:
  ``O(N * bucket_size * (1 + chunks_before))`` per round.
- :func:`clustered_attention` attends with ``C`` centroids instead of ``L`` queries:
  ``O(iterations * N * C * E + C * S * E)``, plus ``O(N * topk * E)`` for the
  improved variant.
- :func:`sinkhorn_attention` lets each block of queries attend its own block and
  one soft-sorted block: ``O(N * block_size * E + N * (N / block_size) * E)``.

LSH and the improved clustered variant run the gathering kernel of
``fastattn/_kernels/gathered.pyx`` (query runs against gathered key runs, read
through row indices, so no sorted copy of the data is made); clustered and Sinkhorn
attention run the fused dense kernel on centroids and on blocks.
``fastattn.reference`` has each variant as a dense masked ``O(N^2)`` formula.
"""
import numpy as np
import scipy.sparse

from fastattn import _threads
from fastattn._kernels import clustering as _clustering, gathered as _gathering
from fastattn._layout import as_kernel_array
from fastattn._validation import (as_array, check_batch_shape, check_int, check_matrix_stacks,
                                  check_qkv, check_rng, check_scale, result_dtypes)
from fastattn.attention import scaled_dot_product_attention

__all__ = ["lsh_attention", "clustered_attention", "sinkhorn", "sinkhorn_attention"]

# Rows of one work item of the gathering kernel (longer query runs are split) and
# key rows per tile.
BLOCK_Q = 128
BLOCK_K = 256

# Subtracted from a query's score with its own key (HF Reformer sets that score to
# -1e5 in float32): finite, so a query with no other key still attends to itself.
SELF_PENALTY = 1e5

# Rows per work item of the k-means assignment and LSH hashing kernels (clustering.pyx).
_ROW_BLOCK = 256

# Extra float32 candidates per centroid, rescored in float64 before the top-k is kept.
TOPK_MARGIN = 8

# HF `_len_norm`: keys are the queries scaled by rsqrt(mean(x^2) + eps), then 1/sqrt(E).
_NORM_EPS = 1e-6


def _stacked(a, batch_shape, dtype):
    """``a`` broadcast over ``batch_shape`` as one C-contiguous ``(nbatch, rows, cols)``
    array of ``dtype`` (a view when ``a`` already is one)."""
    full = np.broadcast_to(a, batch_shape + a.shape[-2:])
    nbatch = int(np.prod(batch_shape, dtype=np.int64))
    return as_kernel_array(full, dtype).reshape((nbatch,) + a.shape[-2:])


def _rows_in_batch(index, n):
    """Row numbers in the flattened ``(nbatch * n, .)`` array of the rows ``index[b, ...]``
    of batch entry ``b``."""
    return index + (np.arange(index.shape[0]) * n).reshape((-1,) + (1,) * (index.ndim - 1))


def _rows_of(a, index):
    """``a[b, index[b, ...]]`` for ``a`` of shape (nbatch, n, cols): one row gather on the
    flattened array (cheaper than take_along_axis's broadcast index grids)."""
    nbatch, n = a.shape[:2]
    return a.reshape((nbatch * n,) + a.shape[2:])[_rows_in_batch(index, n)]


def _split_runs(items):
    """Cut the query runs of ``items`` (rows ``q_lo, q_hi, k_lo, k_hi``) into pieces of
    at most ``BLOCK_Q`` rows with the same key run; empty runs are dropped."""
    length = items[:, 1] - items[:, 0]
    items, length = items[length > 0], length[length > 0]
    pieces = -(-length // BLOCK_Q)
    if (pieces == 1).all():
        return np.ascontiguousarray(items, dtype=np.intp)
    owner = np.repeat(np.arange(len(items)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    out = items[owner].copy()
    out[:, 0] += (np.arange(len(owner)) - first) * BLOCK_Q
    out[:, 1] = np.minimum(out[:, 0] + BLOCK_Q, items[owner, 1])
    return np.ascontiguousarray(out, dtype=np.intp)


def _gathered(q, k, v, q_rows, out_rows, k_rows, items, n_out, *, scale, causal=False,
              self_penalty=0.0, k_scale=None, want_lse, nthreads):
    """Run the gathering kernel; returns ``(out (n_out, Ev), lse (n_out,) or None)``.
    Output rows no item writes stay 0 (lse -inf)."""
    out = np.zeros((n_out, v.shape[1]), dtype=q.dtype)
    lse = np.full(n_out, -np.inf, dtype=q.dtype) if want_lse else None
    items = _split_runs(items)
    if len(items) and v.shape[1]:
        # flops: scores and weighted values over every (query, key) pair of the items
        pairs = int(((items[:, 1] - items[:, 0]) * (items[:, 3] - items[:, 2])).sum())
        nthreads = _threads.call_threads(nthreads, len(items),
                                         2.0 * pairs * (q.shape[1] + v.shape[1]))
        with _threads.tile_blas(q.dtype, v.shape[1]):
            _gathering.gathered_attention(
                q, k, v, out, lse, np.ascontiguousarray(q_rows, dtype=np.intp),
                np.ascontiguousarray(out_rows, dtype=np.intp),
                np.ascontiguousarray(k_rows, dtype=np.intp), items, scale=scale,
                causal=causal, self_penalty=self_penalty, block_q=BLOCK_Q, block_k=BLOCK_K,
                nthreads=nthreads, k_scale=k_scale)
    return out, lse


def _int_array(name, a):
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return a


# ---- Reformer LSH ------------------------------------------------------------------------

def _default_n_buckets(L, bucket_size):
    # HF `_set_num_buckets`: 2 ** floor(log2(2 * (L // chunk))), at least 2
    n = 2 * (L // bucket_size)
    return max(2, 1 << max(0, n.bit_length() - 1))


def _lsh_rotations(rng, batch_shape, E, n_hashes, n_buckets):
    # One (E, n_hashes, n_buckets // 2) draw, per head (batch axis -1) when there is one.
    heads = batch_shape[-1:]
    return check_rng(rng).standard_normal(heads + (E, n_hashes, n_buckets // 2))


def _lsh_hash(q, rotations, nthreads):
    # h(x) = argmax([x R, -x R]) for every round: (nbatch, L, E) -> (nbatch, n_hashes, L)
    nbatch, L, E = q.shape
    n_hashes, half = rotations.shape[-2:]
    rot = as_kernel_array(rotations.reshape(-1, E, n_hashes * half), q.dtype)
    # batch entry b uses the rotations of its head, b % H (one set without a head axis)
    rot_index = np.arange(nbatch, dtype=np.intp) % rot.shape[0]
    buckets = np.empty((nbatch, n_hashes, L), dtype=np.intp)
    nthreads = _threads.call_threads(nthreads, nbatch * -(-L // _ROW_BLOCK),
                                     2.0 * nbatch * L * E * n_hashes * half)
    with _threads.single_threaded_blas():
        _clustering.lsh_hash(q, rot, rot_index, buckets, n_hashes, nthreads)
    return buckets


def _lsh_buckets_arg(buckets, batch_shape, n_hashes, L, n_buckets):
    b = _int_array("buckets", buckets)
    if b.ndim < 2 or b.shape[-2:] != (n_hashes, L):
        raise ValueError(f"buckets must have shape (..., n_hashes={n_hashes}, L={L}), got "
                         f"{b.shape}")
    try:
        b = np.broadcast_to(b, batch_shape + (n_hashes, L))
    except ValueError:
        raise ValueError(f"buckets of shape {b.shape} do not broadcast to the batch "
                         f"{batch_shape}") from None
    if b.size and b.min() < 0:
        raise ValueError("buckets must be >= 0")
    if b.size and n_buckets is not None and b.max() >= n_buckets:
        raise ValueError(f"buckets must be < n_buckets={n_buckets}, got {b.max()}")
    return b.reshape((int(np.prod(batch_shape, dtype=np.int64)), n_hashes, L))  # L may be 0


def lsh_attention(query, value, *, n_hashes=1, bucket_size=64, chunks_before=1, rng=None,
                  causal=False, n_buckets=None, self_mask=True, buckets=None,
                  return_lse=False, num_threads=None):
    """Reformer LSH self-attention with shared query-key vectors.

    Keys are the queries normalised to (about) unit length, HF's convention
    ``k = q * rsqrt(mean(q ** 2) + 1e-6) / sqrt(E)``, and scores are ``q . k``
    with no ``1/sqrt(E)`` on the queries. In each of ``n_hashes`` rounds the
    positions are hashed, ``h(x) = argmax([x R, -x R])`` with a fresh random
    rotation ``R`` per round, stably sorted by (bucket, position) and cut into
    chunks of ``bucket_size``; each chunk attends to itself and the
    ``chunks_before`` chunks before it in that sorted order. The rounds are merged
    by their log-sum-exp, as one softmax over all the keys they saw.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
        The shared query-key vectors.
    value : array_like, shape (..., L, Ev)
        Leading dimensions broadcast against those of ``query``.
    n_hashes : int, default=1
        Hash rounds.
    bucket_size : int, default=64
        Rows per chunk (HF's ``lsh_attn_chunk_length``).
    chunks_before : int, default=1
        Earlier chunks each chunk also attends to (not circular: the first chunk
        of a round has none).
    rng : numpy.random.Generator or int, optional
        Source of the rotations: the same seed gives bit-identical results.
    causal : bool, default=False
        Query ``i`` sees only keys at original positions ``j <= i``.
    n_buckets : int, optional
        Even, at least 2. Default HF's ``2 ** floor(log2(2 * (L // bucket_size)))``
        (at least 2), so an average bucket fills half a chunk.
    self_mask : bool, default=True
        Lower a query's score with its own key by 1e5 (HF sets it to -1e5): it is
        attended only when nothing else is visible (e.g. the first causal position).
        ``False`` lets queries attend to themselves normally.
    buckets : array_like of int, shape (..., n_hashes, L), optional
        Precomputed bucket ids (>= 0) instead of hashing; broadcast over the batch.
    return_lse : bool, default=False
        Also return each row's log-sum-exp over the keys of all rounds.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        For complex or other non-real inputs, or non-integer ``buckets``.
    ValueError
        For mismatched shapes, ``bucket_size <= 0``, ``n_hashes <= 0``,
        ``chunks_before < 0``, an odd or too small ``n_buckets``, or bad ``buckets``.

    Notes
    -----
    The rotations are ``rng.standard_normal((E, n_hashes, n_buckets // 2))``, with a
    leading head axis ``H`` (batch axis -1) when there is one: one draw per head,
    shared over the rest of the batch (as HF). Rows ``[q R_r, -q R_r]`` are
    hashed in the compute dtype.

    Each round visits ``L * bucket_size * (1 + chunks_before)`` query-key pairs
    instead of ``L ** 2``; the kernel reads the rows through the sort permutation
    and normalises key rows as it gathers them (no sorted or key copies), and
    builds the causal and self masks per tile from the original positions. A key seen in several rounds counts once per round (as HF).
    Chunks look back within their round only (HF and lucidrains wrap around; the
    first chunk of a round has no look-back here). HF's cap on ``n_buckets``
    (factorised buckets for long sequences) is not reproduced.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> x, v = rng.standard_normal((2, 4, 256, 32)), rng.standard_normal((2, 4, 256, 32))
    >>> out = fastattn.lsh_attention(x, v, n_hashes=2, bucket_size=32, rng=0)
    >>> out.shape
    (2, 4, 256, 32)
    >>> bool((out == fastattn.lsh_attention(x, v, n_hashes=2, bucket_size=32, rng=0)).all())
    True

    With one chunk covering the sequence and no self mask, it is full attention
    with keys = normalised queries and scale 1:

    >>> one = fastattn.lsh_attention(x, v, bucket_size=256, self_mask=False)
    >>> keys = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) / np.sqrt(32)
    >>> full = fastattn.scaled_dot_product_attention(x, keys, v, scale=1.0)
    >>> bool(np.allclose(one, full))
    True
    """
    (q, v), compute, result = check_matrix_stacks(("query", "value"), query, value)
    if v.shape[-2] != q.shape[-2]:
        raise ValueError(f"value must have as many rows as query (self-attention): query "
                         f"{q.shape}, value {v.shape}")
    L, E = q.shape[-2:]
    Ev = v.shape[-1]
    if E == 0:
        raise ValueError(f"query needs at least one feature, got shape {q.shape}")
    n_hashes = check_int("n_hashes", n_hashes)
    bucket_size = check_int("bucket_size", bucket_size)
    chunks_before = check_int("chunks_before", chunks_before, minimum=0)
    if n_buckets is not None:
        n_buckets = check_int("n_buckets", n_buckets, minimum=2)
        if n_buckets % 2:
            raise ValueError(f"n_buckets must be even (buckets come in +/- pairs), got "
                             f"{n_buckets}")
    batch_shape = check_batch_shape([q.shape[:-2], v.shape[:-2]], query=q.shape,
                                    value=v.shape)
    if buckets is not None:
        buckets = _lsh_buckets_arg(buckets, batch_shape, n_hashes, L, n_buckets)
    nthreads = _threads.resolve_num_threads(num_threads)

    qs = _stacked(q, batch_shape, compute)
    vs = _stacked(v, batch_shape, compute)
    nbatch = qs.shape[0]
    if nbatch * L * Ev == 0:
        out = np.zeros(batch_shape + (L, Ev), dtype=result)
        return (out, np.full(batch_shape + (L,), -np.inf, dtype=compute)) if return_lse else out
    if buckets is None:
        n_buckets = _default_n_buckets(L, bucket_size) if n_buckets is None else n_buckets
        rotations = _lsh_rotations(rng, batch_shape, E, n_hashes, n_buckets)
        buckets = _lsh_hash(qs, rotations, nthreads)
    # keys = key_scale * queries, applied by the kernel as it gathers the key rows
    key_scale = 1 / np.sqrt(np.einsum("ble,ble->bl", qs, qs) / E + _NORM_EPS)
    key_scale *= 1 / np.sqrt(E)

    # Sorted order of each (batch, round) as rows of the (nbatch * L, .) operands.
    pos = np.arange(L, dtype=np.int64)
    order = np.argsort(buckets.astype(np.int64) * L + pos, axis=-1)  # (nbatch, rounds, L)
    rows = _rows_in_batch(order, L)
    # Output row of each slot: straight into the result for one round; else into a
    # (nbatch * L, n_hashes) buffer of per-round results merged below.
    out_rows = rows if n_hashes == 1 else rows * n_hashes + np.arange(n_hashes)[:, None]

    # One item per chunk: its query slots, and its key slots (chunks_before earlier ones).
    chunk0 = np.arange(0, L, bucket_size)
    base = (np.arange(nbatch * n_hashes) * L)[:, None]
    q_hi = base + np.minimum(chunk0 + bucket_size, L)
    items = np.stack(np.broadcast_arrays(
        base + chunk0, q_hi, base + np.maximum(chunk0 - chunks_before * bucket_size, 0), q_hi),
        axis=-1).reshape(-1, 4)
    want_lse = return_lse or n_hashes > 1
    parts, part_lse = _gathered(
        qs.reshape(-1, E), qs.reshape(-1, E), vs.reshape(-1, Ev), rows.reshape(-1),
        out_rows.reshape(-1), rows.reshape(-1), items, nbatch * L * n_hashes, scale=1.0,
        causal=causal, self_penalty=SELF_PENALTY if self_mask else 0.0,
        k_scale=key_scale.reshape(-1), want_lse=want_lse, nthreads=nthreads)
    if n_hashes == 1:
        out, lse = parts, part_lse
    else:
        out = np.empty((nbatch * L, Ev), dtype=compute)
        lse = np.empty(nbatch * L, dtype=compute) if return_lse else None
        # memory-bound: work is the bytes of partial results streamed
        _gathering.merge_parts(parts.reshape(nbatch * L, n_hashes, Ev),
                               part_lse.reshape(nbatch * L, n_hashes), out, lse,
                               _threads.call_threads(nthreads, nbatch * L, parts.nbytes))
    out = out.reshape(batch_shape + (L, Ev)).astype(result, copy=False)
    if return_lse:
        return out, lse.reshape(batch_shape + (L,))
    return out


# ---- clustered attention -----------------------------------------------------------------

def _cluster_means(qs, assign, clusters, nthreads, previous=None):
    """float64 member means ``(nbatch, C, E)`` and sizes ``(nbatch, C)``; an empty
    cluster keeps its ``previous`` centroid (0 without one)."""
    nbatch, _, E = qs.shape
    sums = np.zeros((nbatch, clusters, E))
    counts = np.zeros((nbatch, clusters), dtype=np.intp)
    # memory-bound: work is the bytes of queries streamed
    _clustering.cluster_sums(qs, assign, sums, counts,
                             _threads.call_threads(nthreads, nbatch, qs.nbytes))
    means = sums / np.maximum(counts, 1)[..., None]
    if previous is not None:
        means = np.where(counts[..., None] > 0, means, previous)
    return means, counts


def _kmeans(qs, clusters, iterations, rng, nthreads):
    """Lloyd's k-means on the rows of each ``qs[b]``: ``(assign, centroids, counts)``."""
    nbatch, L, E = qs.shape
    # Start: the `clusters` queries with the smallest uniform draws, in position order.
    draws = check_rng(rng).random((nbatch, L))
    start = np.sort(np.argpartition(draws, clusters - 1, axis=-1)[:, :clusters], axis=-1)
    centroids = _rows_of(qs, start).astype(np.float64)
    step_flops = 2.0 * nbatch * L * clusters * E       # one assignment step
    step_threads = _threads.call_threads(nthreads, nbatch * -(-L // _ROW_BLOCK), step_flops)
    if nbatch >= step_threads:
        # one batch entry per thread: no synchronisation between iterations, and each
        # entry's queries stay in its thread's cache
        assign = np.empty((nbatch, L), dtype=np.intp)
        counts = np.empty((nbatch, clusters), dtype=np.intp)
        with _threads.single_threaded_blas():
            _clustering.kmeans(qs, centroids, assign, counts, iterations,
                               _threads.call_threads(nthreads, nbatch, iterations * step_flops))
        return assign, centroids, counts
    # fewer entries than threads: each step splits the rows of every entry over threads
    assign, previous = np.empty((nbatch, L), dtype=np.intp), None
    with _threads.single_threaded_blas():
        for _ in range(iterations):
            _clustering.nearest_centroid(qs, centroids.astype(qs.dtype), assign, step_threads)
            if previous is not None and np.array_equal(assign, previous):
                break           # a fixed point: the centroids are already these means
            centroids, counts = _cluster_means(qs, assign, clusters, nthreads, centroids)
            previous, assign = assign, (np.empty_like(assign) if previous is None else previous)
    return previous, centroids, counts


def _centroid_topk(c_low, c64, ks, scale, topk, nthreads):
    """Each centroid's ``topk`` keys by float64 score, and those scores."""
    nbatch, C, _ = c_low.shape
    # candidates: the best by compute-dtype scores, with room for rounding to reorder
    cap = topk if c_low.dtype == np.float64 else min(ks.shape[1], topk + TOPK_MARGIN)
    top = np.empty((nbatch, C, topk), dtype=np.intp)
    top_scores = np.empty((nbatch, C, topk))
    nthreads = _threads.call_threads(nthreads, nbatch * -(-C // 32),
                                     2.0 * nbatch * C * ks.shape[1] * ks.shape[2])
    with _threads.single_threaded_blas():
        _clustering.centroid_topk(c_low, np.ascontiguousarray(c64), ks, scale, topk, cap,
                                  top, top_scores, nthreads)
    return top, top_scores


def _assignments_arg(assignments, batch_shape, L, clusters):
    a = _int_array("assignments", assignments)
    if a.ndim < 1 or a.shape[-1] != L:
        raise ValueError(f"assignments must have shape (..., L={L}), got {a.shape}")
    try:
        a = np.broadcast_to(a, batch_shape + (L,))
    except ValueError:
        raise ValueError(f"assignments of shape {a.shape} do not broadcast to the batch "
                         f"{batch_shape}") from None
    if a.size and (a.min() < 0 or a.max() >= clusters):
        raise ValueError(f"assignments must lie in [0, clusters={clusters})")
    return as_kernel_array(a.reshape((int(np.prod(batch_shape, dtype=np.int64)), L)), np.intp)


def clustered_attention(query, key, value, *, clusters, iterations=10, topk=None, rng=None,
                        assignments=None, scale=None, num_threads=None):
    """Clustered attention: queries grouped by k-means, centroids attend for them.

    The queries of each batch entry are clustered into ``clusters`` groups by
    Lloyd's k-means (Euclidean). Each centroid, the mean query of its cluster,
    attends over all keys (fused kernel), and its members take its output.

    With ``topk=k`` (improved clustered attention), each cluster's ``k`` keys with
    the highest centroid scores are attended exactly by every member, weighted by
    the centroid's probability mass ``m`` on them; the other keys contribute the
    centroid's attention over them::

        out_i = m_c * softmax(q_i K_T^T * scale) V_T + sum_{j not in T} p_c(j) v_j

    so ``topk = S`` is exact softmax attention.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
        Leading dimensions broadcast like ``np.matmul``.
    clusters : int
        Number of clusters C, ``1 <= C <= L``.
    iterations : int, default=10
        Lloyd steps (assign each query to its nearest centroid, then move each
        centroid to its members' mean), at least 1.
    topk : int, optional
        Keys per cluster recomputed exactly, ``1 <= topk <= S``.
    rng : numpy.random.Generator or int, optional
        Source of the starting centroids: the same seed gives bit-identical results.
    assignments : array_like of int, shape (..., L), optional
        Cluster of each query (in ``[0, clusters)``), instead of k-means; e.g. to
        reuse one clustering for several heads or layers.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(E)``.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)

    Raises
    ------
    TypeError
        For complex or other non-real inputs, or non-integer ``assignments``.
    ValueError
        For mismatched shapes, ``clusters`` outside ``[1, L]``, ``topk`` outside
        ``[1, S]``, ``iterations < 1`` or bad ``assignments``.

    Notes
    -----
    fast-transformers clusters in Hamming space (random-hyperplane hashes of the
    queries, popcount distances); here the k-means is Euclidean on the queries,
    with the distances ``|c|^2 - 2 x . c`` computed by BLAS (a fused
    assignment kernel) and float64 centroid sums. It starts from the ``clusters``
    queries with the smallest of ``rng.random((nbatch, L))`` (in position order;
    ``nbatch`` = the flattened batch); an empty cluster keeps its centroid, and the
    iterations stop early once the assignment no longer changes (the same result).

    The top-k keys are chosen by float64 centroid scores, so the choice does not
    depend on the input precision. Cost: ``O(iterations * L * C * E)`` for the
    clustering, ``O(C * S * (E + Ev))`` for the centroids, ``O(L * topk * (E + Ev))``
    for the exact part.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 300, 16)) for _ in range(3))
    >>> out = fastattn.clustered_attention(q, k, v, clusters=30, rng=0)
    >>> out.shape
    (2, 4, 300, 16)

    Members of a cluster share one output row; with ``topk = S`` the result is
    exact attention:

    >>> exact = fastattn.clustered_attention(q, k, v, clusters=30, topk=300, rng=0)
    >>> bool(np.allclose(exact, fastattn.scaled_dot_product_attention(q, k, v)))
    True
    """
    q, k, v, compute, result = check_qkv(query, key, value)
    L, E = q.shape[-2:]
    S, Ev = v.shape[-2:]
    clusters = check_int("clusters", clusters)
    if clusters > L > 0:
        raise ValueError(f"clusters must be <= L={L} (one query per cluster at least), "
                         f"got {clusters}")
    iterations = check_int("iterations", iterations)
    if topk is not None:
        topk = check_int("topk", topk)
        if topk > S:
            raise ValueError(f"topk must be <= S={S}, got {topk}")
    scale = check_scale(scale, E)
    batch_shape = check_batch_shape([q.shape[:-2], k.shape[:-2], v.shape[:-2]],
                                    query=q.shape, key=k.shape, value=v.shape)
    if assignments is not None:
        assignments = _assignments_arg(assignments, batch_shape, L, clusters)
    nthreads = _threads.resolve_num_threads(num_threads)
    if L == 0 or 0 in batch_shape:
        return np.zeros(batch_shape + (L, Ev), dtype=result)     # no query: nothing to cluster

    qs = _stacked(q, batch_shape, compute)
    nbatch = qs.shape[0]
    if assignments is None:
        assign, centroids, counts = _kmeans(qs, clusters, iterations, rng, nthreads)
    else:
        assign = assignments
        centroids, counts = _cluster_means(qs, assign, clusters, nthreads)
    ks = _stacked(k, batch_shape, compute)
    vs = _stacked(v, batch_shape, compute)
    c_low = centroids.astype(compute)

    if topk is None:
        out_c = scaled_dot_product_attention(c_low, ks, vs, scale=scale, num_threads=nthreads)
        out = _rows_of(out_c, assign)
        return out.reshape(batch_shape + (L, Ev)).astype(result, copy=False)

    # The centroid's attention o_c and log-sum-exp over all keys, its top-k keys T and
    # its probability mass m on them; the other keys contribute
    # sum_{j not in T} p_c(j) v_j = o_c - sum_{j in T} p_c(j) v_j.
    if topk < S:
        out_c, lse_c = scaled_dot_product_attention(c_low, ks, vs, scale=scale,
                                                    return_lse=True, num_threads=nthreads)
        top, top_scores = _centroid_topk(c_low, centroids, ks, scale, topk, nthreads)
        p_top = np.exp(np.minimum(top_scores - lse_c[..., None], 0))     # (nbatch, C, topk)
        mass = np.minimum(p_top.sum(axis=-1), 1.0)
        # sum_{j in T} p_c(j) v_j as one sparse (nbatch C, nbatch S) @ (nbatch S, Ev) product
        p_sparse = scipy.sparse.csr_matrix(
            (p_top.astype(compute).reshape(-1), _rows_in_batch(top, S).reshape(-1),
             np.arange(0, top.size + 1, topk)), shape=(nbatch * clusters, nbatch * S))
        rest = out_c - (p_sparse @ vs.reshape(-1, Ev)).reshape(out_c.shape)
    else:                                   # every key is exact: plain attention
        top, mass, rest = np.broadcast_to(np.arange(S), (nbatch, clusters, S)), None, None

    # Exact part: the members of cluster c (sorted by cluster) against its top-k keys.
    members = np.argsort(assign, axis=-1, kind="stable")
    q_rows = _rows_in_batch(members, L).reshape(-1)
    k_rows = _rows_in_batch(top, S).reshape(-1)
    first = np.cumsum(counts, axis=-1) - counts + (np.arange(nbatch) * L)[:, None]
    k_first = np.arange(nbatch * clusters).reshape(nbatch, clusters) * topk
    items = np.stack([first, first + counts, k_first, k_first + topk], axis=-1).reshape(-1, 4)
    exact, _ = _gathered(qs.reshape(-1, E), ks.reshape(-1, E), vs.reshape(-1, Ev), q_rows,
                         q_rows, k_rows, items, nbatch * L, scale=scale, want_lse=False,
                         nthreads=nthreads)
    out = exact.reshape(nbatch, L, Ev)
    if rest is not None:
        out *= _rows_of(mass[..., None], assign).astype(compute)
        out += _rows_of(rest, assign)
    return out.reshape(batch_shape + (L, Ev)).astype(result, copy=False)


# ---- Sinkhorn ----------------------------------------------------------------------------

def _logsumexp_keep(r, axis):
    # log(sum(exp(r))) along axis, kept as a size-1 axis; 0 (not -inf) where the whole
    # line is -inf, so that subtracting it leaves such a line at -inf instead of NaN.
    top = r.max(axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    total = np.exp(r - top).sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.where(total > 0, top + np.log(total), 0)


def sinkhorn(log_alpha, n_iters=7):
    """The Sinkhorn operator: a (near) doubly stochastic matrix from log-scores.

    Starting from ``r = log_alpha``, repeats ``n_iters`` times
    ``r -= logsumexp(r, axis=-1)`` (rows) then ``r -= logsumexp(r, axis=-2)``
    (columns), and returns ``exp(r)``, as lucidrains' ``sinkhorn_sorting_operator``.

    Parameters
    ----------
    log_alpha : array_like, shape (..., n, n)
        Real log-scores; ``-inf`` entries (forbidden pairs) give 0. A row or
        column that is all ``-inf`` stays 0.
    n_iters : int, default=7
        Normalisation rounds, ``>= 0`` (0 returns ``exp(log_alpha)``).

    Returns
    -------
    ndarray, shape (..., n, n)
        Non-negative; columns sum to 1 and rows tend to 1 as ``n_iters`` grows.
        float32 stays float32; integers give float64.

    Raises
    ------
    TypeError
        For complex or other non-real input.
    ValueError
        For fewer than 2 dimensions, ``n_iters < 0``, or NaN / ``+inf`` entries.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> p = fastattn.sinkhorn(np.array([[0.0, 1.0], [2.0, 0.0]]), n_iters=20)
    >>> p.sum(axis=0).round(6), p.sum(axis=1).round(6)
    (array([1., 1.]), array([1., 1.]))
    >>> p = fastattn.sinkhorn(np.array([[0.0, -np.inf], [0.0, 0.0]]))
    >>> float(p[0, 1]), bool(np.isfinite(p).all())
    (0.0, True)
    """
    a = as_array("log_alpha", log_alpha)
    compute, result = result_dtypes(a, names=("log_alpha",))
    if a.ndim < 2:
        raise ValueError(f"log_alpha must have at least 2 dimensions (..., n, n), got "
                         f"shape {a.shape}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"log_alpha must be square in its last two axes (..., n, n), got "
                         f"shape {a.shape}")
    n_iters = check_int("n_iters", n_iters, minimum=0)
    r = a.astype(compute)
    if np.isnan(r).any() or np.isposinf(r).any():
        raise ValueError("log_alpha must not contain NaN or +inf")
    return _sinkhorn(r, n_iters).astype(result, copy=False)


def _sinkhorn(r, n_iters):
    # the operator on a float array, updated in place (no checks: NaN propagates)
    if r.size:
        for _ in range(n_iters):
            r -= _logsumexp_keep(r, -1)
            r -= _logsumexp_keep(r, -2)
    return np.exp(r)


def _check_temperature(temperature):
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a real number, got "
                        f"{type(temperature).__name__}") from None
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def sinkhorn_attention(query, key, value, *, block_size, n_iters=7, temperature=0.75,
                       rng=None, scale=None, num_threads=None):
    """Sinkhorn attention: each query block attends its own block and a soft-sorted one.

    The sequence is cut into ``n = ceil(N / block_size)`` blocks. Block logits are
    ``pooled_q @ pooled_k.T * scale`` from the mean query and key of each block
    (no learned sort network here), plus Gumbel noise when ``rng`` is given;
    ``P = sinkhorn(logits / temperature, n_iters)`` is a soft permutation of the
    blocks. Query block ``i`` attends to the keys of its own block concatenated
    with the sorted block ``sum_j P[i, j] K_j``, with values ``sum_j P[i, j] V_j``
    (values from values: lucidrains' code takes them from the keys). One batched
    call of the fused kernel does all blocks.

    Parameters
    ----------
    query : array_like, shape (..., N, E)
    key : array_like, shape (..., N, E)
    value : array_like, shape (..., N, Ev)
        Self-attention: the same length N; leading dimensions broadcast.
    block_size : int
        Rows per block (lucidrains' ``bucket_size``).
    n_iters : int, default=7
        Sinkhorn iterations.
    temperature : float, default=0.75
        Divides the logits before the Sinkhorn operator; > 0.
    rng : numpy.random.Generator or int, optional
        Source of Gumbel noise on the logits, ``rng.gumbel(size=(..., n, n))``
        over the broadcast batch; None adds none (deterministic).
    scale : float, optional
        Multiplies the block logits and the attention scores; default ``1 / sqrt(E)``.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.

    Returns
    -------
    out : ndarray, shape (..., N, Ev)

    Raises
    ------
    TypeError
        For complex or other non-real inputs or temperature.
    ValueError
        For mismatched shapes (including ``L != S``), ``block_size <= 0``,
        ``n_iters < 0`` or ``temperature <= 0``.

    Notes
    -----
    When N is not a multiple of ``block_size`` the last block is padded with zero
    rows: its padded keys are masked out of its own block, the pooled means are
    over real rows only, and in a sorted block (a mixture of blocks) padded rows
    enter as zeros. Cost per block: ``2 * block_size`` keys per query plus the
    ``n x n`` mixing of blocks, ``O(N * (block_size + n) * E)`` in all. Causal
    Sinkhorn attention (cumulative block sorting) is not provided.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 500, 16)) for _ in range(3))
    >>> out = fastattn.sinkhorn_attention(q, k, v, block_size=64)
    >>> out.shape
    (2, 4, 500, 16)

    One block covering the sequence is full attention:

    >>> one = fastattn.sinkhorn_attention(q, k, v, block_size=500)
    >>> bool(np.allclose(one, fastattn.scaled_dot_product_attention(q, k, v)))
    True
    """
    q, k, v, compute, result = check_qkv(query, key, value)
    N, E = q.shape[-2:]
    Ev = v.shape[-1]
    if k.shape[-2] != N:
        raise ValueError(f"sinkhorn_attention is self-attention: query and key need the "
                         f"same length, got query {q.shape}, key {k.shape}")
    block_size = check_int("block_size", block_size)
    n_iters = check_int("n_iters", n_iters, minimum=0)
    temperature = _check_temperature(temperature)
    scale = check_scale(scale, E)
    batch_shape = check_batch_shape([q.shape[:-2], k.shape[:-2], v.shape[:-2]],
                                    query=q.shape, key=k.shape, value=v.shape)
    nthreads = _threads.resolve_num_threads(num_threads)
    n = -(-N // block_size)
    if N == 0:
        return np.zeros(batch_shape + (0, Ev), dtype=result)

    def blocks(a):
        # (nbatch, n, block_size, cols), zero rows after N
        s = _stacked(a, batch_shape, compute)
        if n * block_size != N:
            s = np.concatenate([s, np.zeros((s.shape[0], n * block_size - N, s.shape[2]),
                                            dtype=compute)], axis=1)
        return s.reshape(s.shape[0], n, block_size, s.shape[2])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    nbatch = qb.shape[0]
    rows = np.minimum(block_size, N - np.arange(n) * block_size)[:, None].astype(compute)
    pooled_q, pooled_k = qb.sum(axis=2) / rows, kb.sum(axis=2) / rows     # real rows only
    logits = pooled_q @ np.swapaxes(pooled_k, -1, -2) * compute.type(scale)
    if rng is not None:
        noise = check_rng(rng).gumbel(size=batch_shape + (n, n))
        logits = logits + noise.reshape(nbatch, n, n).astype(compute)
    P = _sinkhorn(logits / compute.type(temperature), n_iters)
    # P @ blocks for keys and values: items are (batch entry, column piece), <= 8 pieces
    mix_threads = _threads.call_threads(nthreads, 8 * nbatch,
                                        2.0 * nbatch * n * n * block_size * max(E, Ev))

    def own_and_sorted(xb):
        # (nbatch, n, 2 * block_size, cols): block i, then its sorted block sum_j P[i, j] X_j
        # (written in place by a BLAS kernel, not numpy's own threaded BLAS)
        cols = xb.shape[-1]
        both = np.empty((nbatch, n, 2 * block_size, cols), dtype=compute)
        both[:, :, :block_size] = xb
        _clustering.mix_blocks(P,
                               np.ascontiguousarray(xb).reshape(nbatch, n, block_size * cols),
                               both[:, :, block_size:].reshape(nbatch, n, block_size * cols),
                               mix_threads)
        return both

    with _threads.single_threaded_blas():
        keys, vals = own_and_sorted(kb), own_and_sorted(vb)
    keep = None
    if n * block_size != N:
        # padded keys of the last block; sorted-block row r is padding in every block
        # only when there is one block (r >= N)
        keep = np.ones((n, 1, 2 * block_size), dtype=bool)
        keep[-1, 0, N - (n - 1) * block_size:block_size] = False
        if n == 1:
            keep[0, 0, block_size + N:] = False
    out = scaled_dot_product_attention(qb, keys, vals, keep, scale=scale,
                                       num_threads=nthreads)
    out = out.reshape(nbatch, n * block_size, Ev)[:, :N]
    return out.reshape(batch_shape + (N, Ev)).astype(result, copy=False)
