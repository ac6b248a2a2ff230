"""Multi-head attention: projections and the fused kernel in fastattn's threads, heads as views."""

import numpy as np

from fastattn import _linear, _threads
from fastattn._mha_plan import CHUNK_ROWS_PER_THREAD, batch_chunks
from fastattn._validation import (BFLOAT16, CPU_AND_NPU, as_array, check_device, check_dtype,
                                  check_int, check_rng, check_scale, result_dtypes)
from fastattn.attention import scaled_dot_product_attention
from fastattn.masks import combine_masks
from fastattn.softmax import softmax_rows

__all__ = ["split_heads", "merge_heads", "multi_head_attention", "MultiHeadAttention"]

# (input, weight, bias) names of the three input projections
_QKV = (("query", "q_weight", "q_bias"), ("key", "k_weight", "k_bias"),
        ("value", "v_weight", "v_bias"))


def split_heads(x, num_heads):
    """View ``(..., S, H·D)`` features as ``(..., H, S, D)`` heads (no copy when possible).

    Parameters
    ----------
    x : array_like, shape (..., S, H·D)
    num_heads : int
        ``H``; must divide the last dimension.

    Returns
    -------
    ndarray, shape (..., H, S, D)
        A strided view of ``x`` when ``x`` is C-contiguous.

    See Also
    --------
    merge_heads

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> x = np.arange(12).reshape(2, 6)       # S = 2 tokens, 3 heads of D = 2
    >>> h = fastattn.split_heads(x, 3)
    >>> h.shape
    (3, 2, 2)
    >>> h[1]                                  # head 1: features 2, 3 of each token
    array([[2, 3],
           [8, 9]])
    >>> bool((fastattn.merge_heads(h) == x).all())
    True
    """
    x = as_array("x", x)
    H = check_int("num_heads", num_heads)
    if x.ndim < 2 or x.shape[-1] % H:
        raise ValueError(f"x of shape {x.shape} cannot be split into num_heads={H} heads: "
                         f"need (..., S, H*D) with H={H} dividing the last dimension")
    return _split(x, H)


def merge_heads(x):
    """Inverse of :func:`split_heads`: ``(..., H, S, D)`` to ``(..., S, H·D)``.

    Parameters
    ----------
    x : array_like, shape (..., H, S, D)

    Returns
    -------
    ndarray, shape (..., S, H·D)

    See Also
    --------
    split_heads

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> fastattn.merge_heads(np.zeros((2, 4, 5, 8))).shape
    (2, 5, 32)
    """
    x = as_array("x", x)
    if x.ndim < 3:
        raise ValueError(f"x must have shape (..., H, S, D), got {x.shape}")
    t = x.swapaxes(-3, -2)
    return t.reshape(t.shape[:-2] + (t.shape[-2] * t.shape[-1],))


def multi_head_attention(query, key, value, num_heads, *, q_weight, k_weight, v_weight,
                         out_weight, q_bias=None, k_bias=None, v_bias=None, out_bias=None,
                         num_kv_heads=None, attn_mask=None, key_padding_mask=None,
                         is_causal=False, scale=None, need_weights=False, num_threads=None,
                         device="cpu"):
    r"""Multi-head attention, ``concat(head_1, ..., head_H) @ out_weight.T + out_bias``.

    Each head is ``softmax(q_h @ k_h.T * scale + mask) @ v_h`` with
    ``q = query @ q_weight.T + q_bias`` (likewise ``k``, ``v``) split into heads.
    Weights follow the ``torch.nn.Linear`` convention, shape
    ``(out_features, in_features)``, so PyTorch / Hugging Face weights drop in.

    Parameters
    ----------
    query : array_like, shape (..., L, E_q)
    key : array_like, shape (..., S, E_k)
    value : array_like, shape (..., S, E_v)
        Self-attention passes the same array three times; cross-attention
        (encoder-decoder) passes decoder states as ``query`` and encoder states
        as ``key`` and ``value`` (``L != S`` is fine).
    num_heads : int
        Query heads ``H``; must divide ``q_weight.shape[0]`` (``E = H·D``).
    q_weight : array_like, shape (H·D, E_q)
    k_weight : array_like, shape (H_kv·D, E_k)
    v_weight : array_like, shape (H_kv·D_v, E_v)
    out_weight : array_like, shape (E_out, H·D_v)
    q_bias, k_bias, v_bias, out_bias : array_like, optional
        Shapes ``(H·D,)``, ``(H_kv·D,)``, ``(H_kv·D_v,)``, ``(E_out,)``.
    num_kv_heads : int, optional
        ``H_kv`` key/value heads (default ``H``): grouped-query attention, or
        multi-query attention with 1. Must divide ``H``; K/V are not copied.
    attn_mask : array_like, optional
        As in :func:`fastattn.scaled_dot_product_attention`, broadcast against
        the per-head scores ``(..., H, L, S)``: bool True = attend, float added.
    key_padding_mask : array_like of bool, shape (..., S), optional
        True marks a real token (keep), False padding. (PyTorch's
        ``nn.MultiheadAttention`` uses the opposite polarity: pass ``~mask``.)
    is_causal : bool, default=False
        Query ``i`` sees keys ``j <= i``.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    need_weights : bool, default=False
        Also return the attention weights averaged over heads, ``(..., L, S)``
        (this materialises the per-head weights, O(H·L·S) memory per sequence, for
        one chunk of the batch at a time).
    num_threads : int, optional
        Threads for the projections and the attention kernel; default
        :func:`fastattn.get_num_threads`.
    device : {"cpu", "npu", "npu:N"}, default="cpu"
        Where the attention runs (the projections run on the CPU).

    Returns
    -------
    out : ndarray, shape (..., L, E_out)
    weights : ndarray, shape (..., L, S)
        Only with ``need_weights=True``.

    Raises
    ------
    ValueError
        For weight or bias shapes that do not match the inputs or ``num_heads``,
        ``num_heads`` not dividing ``E``, ``num_kv_heads`` not dividing
        ``num_heads``, or masks that do not broadcast (the shapes are named).
    TypeError
        For non-real inputs or masks of the wrong dtype.

    See Also
    --------
    MultiHeadAttention, fastattn.scaled_dot_product_attention

    Notes
    -----
    The projections run in the attention kernel's threads, over blocks of the
    ``batch·seq`` rows, one single-threaded BLAS product per block; Q, K and V
    share one parallel region. (NumPy's matmul would run in NumPy's own BLAS
    threads, which keep spinning for a while after each product, on the cores
    the attention kernel then needs.) The heads are strided views of the
    projected arrays handed to the fused attention kernel, with no per-head
    Python loop, and the kernel writes each head straight into its columns of
    the merged ``(..., L, H·D_v)`` array that the output projection reads.

    When ``query``, ``key`` and ``value`` share their batch dimensions (no
    broadcasting between them) and ``device="cpu"``, the batch is taken a chunk
    of sequences at a time (about ``CHUNK_ROWS_PER_THREAD`` query rows per
    thread): projections, attention and output projection of a chunk run through
    one set of work buffers allocated once per call, and each chunk's output
    projection lands in its slice of the result. Peak extra memory is then
    O(chunk) rather than O(batch) on top of the output, and a chunk's
    intermediates stay in cache. Masks with a batch axis are sliced with the
    chunk; broadcast ones are shared.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> E, H = 16, 4
    >>> x = rng.standard_normal((2, 5, E), dtype=np.float32)     # (B, S, E)
    >>> w = {n: rng.standard_normal((E, E), dtype=np.float32) / 4
    ...      for n in ("q_weight", "k_weight", "v_weight", "out_weight")}
    >>> out = fastattn.multi_head_attention(x, x, x, H, **w, is_causal=True)
    >>> out.shape, out.dtype
    ((2, 5, 16), dtype('float32'))

    Padding: the second sequence has 3 real tokens; weights come back averaged
    over heads, and padded keys get none.

    >>> keep = fastattn.padding_mask([5, 3], 5)[:, 0, 0]              # (B, S)
    >>> out, weights = fastattn.multi_head_attention(
    ...     x, x, x, H, **w, key_padding_mask=keep, need_weights=True)
    >>> weights.shape, float(weights[1, :, 3:].max())
    ((2, 5, 5), 0.0)
    """
    kind = check_device(device, CPU_AND_NPU)
    H = check_int("num_heads", num_heads)
    Hkv = H if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
    if H % Hkv:
        raise ValueError(f"num_kv_heads={Hkv} must divide num_heads={H}")
    named = {"query": query, "key": key, "value": value, "q_weight": q_weight,
             "k_weight": k_weight, "v_weight": v_weight, "out_weight": out_weight,
             "q_bias": q_bias, "k_bias": k_bias, "v_bias": v_bias, "out_bias": out_bias}
    for n in ("query", "key", "value", "q_weight", "k_weight", "v_weight", "out_weight"):
        if named[n] is None:
            raise TypeError(f"{n} is required: an array, got None")
    arr = {n: as_array(n, a) for n, a in named.items() if a is not None}
    compute, result = result_dtypes(*arr.values(), names=list(arr))
    arr = {n: a.astype(compute, copy=False) for n, a in arr.items()}
    q, k, v = arr["query"], arr["key"], arr["value"]
    for name in ("query", "key", "value"):
        if arr[name].ndim < 2:
            raise ValueError(f"{name} must have shape (..., seq, features), got "
                             f"{arr[name].shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value must have the same length S: key {k.shape}, "
                         f"value {v.shape}")
    S = k.shape[-2]

    # weight shapes: (out_features, in_features)
    E = _weight_rows(arr, "q_weight", q, H, "num_heads")
    D = E // H
    _weight_rows(arr, "k_weight", k, Hkv, "num_kv_heads", rows=Hkv * D)
    Ev = _weight_rows(arr, "v_weight", v, Hkv, "num_kv_heads")
    w_out = arr["out_weight"]
    if w_out.ndim != 2 or w_out.shape[1] != H * (Ev // Hkv):
        raise ValueError(f"out_weight must have shape (E_out, {H * (Ev // Hkv)}) to take the "
                         f"{H} concatenated heads, got {w_out.shape}")
    for b, w in (("q_bias", "q_weight"), ("k_bias", "k_weight"), ("v_bias", "v_weight"),
                 ("out_bias", "out_weight")):
        if b in arr and arr[b].shape != (arr[w].shape[0],):
            raise ValueError(f"{b} must have shape ({arr[w].shape[0]},) to match {w} "
                             f"{arr[w].shape}, got {arr[b].shape}")
    try:
        np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"batch dimensions do not broadcast: query {q.shape}, key {k.shape}, "
                         f"value {v.shape}") from None

    mask = attn_mask
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask)
        if kpm.dtype != np.bool_:
            raise TypeError(f"key_padding_mask must be bool (True = real token), got dtype "
                            f"{kpm.dtype}")
        if kpm.ndim < 1 or kpm.shape[-1] != S:
            raise ValueError(f"key_padding_mask must have shape (..., S={S}), got {kpm.shape}")
        # (..., S) -> (..., 1 head, 1 query, S)
        mask = combine_masks(attn_mask, kpm[..., np.newaxis, np.newaxis, :])

    layer = _Layer(arr, H, Hkv, is_causal, scale, need_weights,
                   _threads.resolve_num_threads(num_threads), device)
    chunks = None
    if kind == "cpu":
        chunks = batch_chunks(q, k, v, mask, CHUNK_ROWS_PER_THREAD * layer.nthreads)
    # Every product below runs in fastattn's threads on single-threaded BLAS; the limit
    # is set once for all of them.
    with _threads.single_threaded_blas():
        if chunks is None:
            out, weights = layer.attend(q, k, v, mask)
        else:
            out, weights = layer.attend_chunked(*chunks)
    if result != compute:
        out = out.astype(result)
    if not need_weights:
        return out
    return out, weights.astype(result, copy=False)


class MultiHeadAttention:
    """Multi-head attention weights plus :func:`multi_head_attention` as ``__call__``.

    Parameters
    ----------
    embed_dim : int
        ``E``, the query width and projected width (``H·D``).
    num_heads : int
        ``H``; must divide ``embed_dim``.
    kdim, vdim : int, optional
        Widths of the key and value inputs; default ``embed_dim``.
    num_kv_heads : int, optional
        Grouped-query attention (default ``num_heads``).
    bias : bool, default=True
        Whether the four projections have biases (initialised to 0).
    rng : numpy.random.Generator or int, optional
        Seeds the initial weights: Xavier-uniform input projections and
        ``U(-1/sqrt(E), 1/sqrt(E))`` output projection, like PyTorch's
        ``nn.MultiheadAttention``.
    dtype : dtype, default=np.float32

    Attributes
    ----------
    q_weight, k_weight, v_weight, out_weight : ndarray
        ``torch.nn.Linear``-style ``(out_features, in_features)``.
    q_bias, k_bias, v_bias, out_bias : ndarray or None
    num_heads, num_kv_heads : int

    See Also
    --------
    multi_head_attention

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> mha = fastattn.MultiHeadAttention(32, 4, rng=0)
    >>> x = np.ones((2, 7, 32), dtype=np.float32)
    >>> mha(x).shape                                 # self-attention
    (2, 7, 32)
    >>> memory = np.ones((2, 9, 32), dtype=np.float32)
    >>> mha(x, memory, is_causal=False).shape        # cross-attention
    (2, 7, 32)
    """

    def __init__(self, embed_dim, num_heads, *, kdim=None, vdim=None, num_kv_heads=None,
                 bias=True, rng=None, dtype=np.float32):
        E = check_int("embed_dim", embed_dim)
        H = check_int("num_heads", num_heads)
        Hkv = H if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
        if E % H:
            raise ValueError(f"num_heads={H} must divide embed_dim={E}")
        if H % Hkv:
            raise ValueError(f"num_kv_heads={Hkv} must divide num_heads={H}")
        dtype = check_dtype("dtype", dtype)
        if dtype not in (np.float16, np.float32, np.float64, BFLOAT16):
            raise TypeError(f"dtype must be a floating type (float16, bfloat16, float32 or "
                            f"float64), got {dtype}")
        kdim = E if kdim is None else check_int("kdim", kdim)
        vdim = E if vdim is None else check_int("vdim", vdim)
        rng = check_rng(rng)
        kv = Hkv * (E // H)
        if kdim == vdim == E and kv == E:
            # PyTorch packs q, k, v into one (3E, E) in_proj_weight and draws it at once
            w = _xavier_uniform(rng, (3 * E, E), dtype)
            self.q_weight, self.k_weight, self.v_weight = w[:E], w[E:2 * E], w[2 * E:]
        else:
            self.q_weight = _xavier_uniform(rng, (E, E), dtype)
            self.k_weight = _xavier_uniform(rng, (kv, kdim), dtype)
            self.v_weight = _xavier_uniform(rng, (kv, vdim), dtype)
        bound = 1 / np.sqrt(E)
        self.out_weight = rng.uniform(-bound, bound, (E, E)).astype(dtype)
        zeros = (lambda n: np.zeros(n, dtype=dtype)) if bias else (lambda n: None)
        self.q_bias, self.k_bias, self.v_bias, self.out_bias = zeros(E), zeros(kv), \
            zeros(kv), zeros(E)
        self.num_heads, self.num_kv_heads = H, Hkv

    def __call__(self, query, key=None, value=None, **kwargs):
        """Attend; ``key`` defaults to ``query`` and ``value`` to ``key``.

        Keyword arguments are those of :func:`multi_head_attention` (masks,
        ``is_causal``, ``scale``, ``need_weights``, ``num_threads``, ``device``).
        """
        key = query if key is None else key
        value = key if value is None else value
        return multi_head_attention(
            query, key, value, self.num_heads, num_kv_heads=self.num_kv_heads,
            q_weight=self.q_weight, k_weight=self.k_weight, v_weight=self.v_weight,
            out_weight=self.out_weight, q_bias=self.q_bias, k_bias=self.k_bias,
            v_bias=self.v_bias, out_bias=self.out_bias, **kwargs)

    @classmethod
    def from_torch_state_dict(cls, state_dict, num_heads, *, prefix=""):
        """Build from the ``state_dict`` of a ``torch.nn.MultiheadAttention``.

        Reads ``in_proj_weight``/``in_proj_bias`` (or ``q_proj_weight``,
        ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ) and
        ``out_proj.weight``/``out_proj.bias``, each name after ``prefix``. The
        values may be NumPy arrays or anything ``np.asarray`` accepts (CPU tensors
        after ``.detach()``); torch is not imported.

        Parameters
        ----------
        state_dict : mapping of str to array_like
        num_heads : int
        prefix : str, default=""
            E.g. ``"encoder.layers.0.self_attn."``.

        Returns
        -------
        MultiHeadAttention

        Raises
        ------
        KeyError
            When a required entry is missing.
        ValueError
            For ``bias_k``/``bias_v`` (``add_bias_kv=True`` is not supported) or
            shapes that do not fit ``num_heads``.

        Examples
        --------
        >>> import numpy as np
        >>> import fastattn
        >>> E = 8
        >>> sd = {"in_proj_weight": np.eye(3 * E, E), "in_proj_bias": np.zeros(3 * E),
        ...       "out_proj.weight": np.eye(E), "out_proj.bias": np.zeros(E)}
        >>> mha = fastattn.MultiHeadAttention.from_torch_state_dict(sd, num_heads=2)
        >>> mha.q_weight.shape, mha.num_heads
        ((8, 8), 2)
        """
        def get(name, required=True):
            full = prefix + name
            if full not in state_dict:
                if required:
                    raise KeyError(f"state_dict has no {full!r}")
                return None
            return np.asarray(state_dict[full])

        for extra in ("bias_k", "bias_v"):
            if prefix + extra in state_dict:
                raise ValueError(f"{prefix + extra!r} found: add_bias_kv=True is not supported")
        packed = get("in_proj_weight", required=False)
        if packed is not None:
            if packed.ndim != 2 or packed.shape[0] % 3:
                raise ValueError(f"in_proj_weight must have shape (3E, E), got {packed.shape}")
            wq, wk, wv = np.split(packed, 3)
        else:
            wq, wk, wv = (get(f"{n}_proj_weight") for n in "qkv")
        in_bias = get("in_proj_bias", required=False)
        bq, bk, bv = (None,) * 3 if in_bias is None else np.split(in_bias, [len(wq), len(wq) + len(wk)])
        self = cls.__new__(cls)
        self.q_weight, self.k_weight, self.v_weight = wq, wk, wv
        self.q_bias, self.k_bias, self.v_bias = bq, bk, bv
        self.out_weight = get("out_proj.weight")
        self.out_bias = get("out_proj.bias", required=False)
        self.num_heads = check_int("num_heads", num_heads)
        self.num_kv_heads = self.num_heads
        if wq.shape[0] % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the embedding size "
                             f"{wq.shape[0]} of in_proj_weight/q_proj_weight {wq.shape}")
        return self


class _Layer:
    """One multi-head attention call: its validated weights and options.

    `attend` computes a batch in one go; `attend_chunked` goes through it a chunk of
    sequences at a time, reusing one set of work buffers.
    """

    def __init__(self, arr, H, Hkv, is_causal, scale, need_weights, nthreads, device):
        self.arr, self.H, self.Hkv = arr, H, Hkv
        self.is_causal, self.scale, self.need_weights = is_causal, scale, need_weights
        self.nthreads, self.device = nthreads, device
        self.dtype = arr["query"].dtype
        self.width = arr["out_weight"].shape[1]            # H * Dv: the merged heads

    def attend(self, q, k, v, mask, work=None, out=None, weights=None):
        """Output (and head-averaged weights) of one batch.

        ``work`` holds the Q, K, V and merged-heads buffers of the batch's shapes (new
        arrays when None); ``out`` and ``weights`` receive the results (new arrays when
        None). Returns ``(out, weights or None)``.
        """
        arr, H, Hkv, nthreads = self.arr, self.H, self.Hkv, self.nthreads
        # a chunk is a few blocks of rows per thread: make them whole
        whole = work is not None
        # Q, K and V in one parallel region, blocks of (batch * seq) rows per BLAS call;
        # the heads are strided views of the projections
        jobs = [(x, arr[w], arr.get(b)) for x, (_, w, b) in zip((q, k, v), _QKV)]
        qp, kp, vp = _linear.linear(*jobs, nthreads=nthreads, whole_blocks=whole,
                                    out=None if work is None else work[:3])
        qh, kh, vh = _split(qp, H), _split(kp, Hkv), _split(vp, Hkv)
        # the kernel writes each head straight into its columns of the merged array
        if work is None:
            merged = np.empty(_merged_shape(qp, kp, vp, mask, self.width), dtype=self.dtype)
        else:
            merged = work[3]
        scaled_dot_product_attention(qh, kh, vh, mask, is_causal=self.is_causal,
                                     scale=self.scale, enable_gqa=Hkv != H,
                                     out=_split(merged, H), num_threads=nthreads,
                                     device=self.device)
        out, = _linear.linear((merged, arr["out_weight"], arr.get("out_bias")),
                              nthreads=nthreads, whole_blocks=whole,
                              out=None if out is None else [out])
        if self.need_weights:
            per_head = _head_weights(qh, kh, mask, self.is_causal, self.scale, H // Hkv,
                                     nthreads)
            weights = per_head.mean(axis=-3, out=weights)
        return out, weights

    def attend_chunked(self, q, k, v, mask, per_sequence_mask, batch_shape, chunk):
        """`attend` over a batch of sequences, ``chunk`` sequences at a time.

        ``q``, ``k``, ``v`` are ``(n, seq, features)`` (the batch flattened); ``mask``
        is the same flattened ``(n, ...)`` when ``per_sequence_mask``, else shared by
        every sequence. Results get ``batch_shape`` back.
        """
        arr, dtype = self.arr, self.dtype
        n, L, S = q.shape[0], q.shape[1], k.shape[1]
        # work buffers for one chunk, shared by every chunk: after the first chunk the
        # projections, heads and merged heads touch no fresh pages
        work = [np.empty((chunk, L, arr["q_weight"].shape[0]), dtype),
                np.empty((chunk, S, arr["k_weight"].shape[0]), dtype),
                np.empty((chunk, S, arr["v_weight"].shape[0]), dtype),
                np.empty((chunk, L, self.width), dtype)]
        out = np.empty((n, L, arr["out_weight"].shape[0]), dtype)
        weights = np.empty((n, L, S), dtype) if self.need_weights else None
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            self.attend(q[i:j], k[i:j], v[i:j], mask[i:j] if per_sequence_mask else mask,
                        [w[:j - i] for w in work], out[i:j],
                        None if weights is None else weights[i:j])
        out = out.reshape(batch_shape + out.shape[1:])
        if weights is not None:
            weights = weights.reshape(batch_shape + weights.shape[1:])
        return out, weights


def _head_weights(qh, kh, mask, is_causal, scale, group, nthreads):
    # softmax(q_h @ k_h.T * scale + mask) of every head, (..., H, L, S): what
    # attention_weights computes, with the scores from the shared projection kernel rather
    # than NumPy's matmul (whose BLAS threads would then spin over ours) and the grouped
    # key heads read in place. The inputs were validated by the attention call.
    leads = [qh.shape[:-2], kh.shape[:-3] + qh.shape[-3:-2]]
    if mask is not None:
        mask = np.asarray(mask)
        leads.append(mask.shape[:-2])
    batch_shape = np.broadcast_shapes(*leads)
    scores = _linear.stacked_abt(qh, kh, batch_shape, nthreads,
                                 group_axis=len(batch_shape) - 1, group=group)
    if mask is not None:
        mask = mask.reshape((1,) * (scores.ndim - mask.ndim) + mask.shape)
    return softmax_rows(scores, mask, check_scale(scale, qh.shape[-1]), nthreads,
                        causal_offset=0 if is_causal else None, out=scores)


def _merged_shape(qp, kp, vp, mask, width):
    # (..., L, H*Dv): the attention result with its heads merged. The batch shape is the
    # attention call's, where the mask may add batch axes in front of its head axis (-3).
    # For shapes that do not broadcast any shape does: the attention call raises first.
    leads = [qp.shape[:-2], kp.shape[:-2], vp.shape[:-2]]
    if mask is not None:
        leads.append(np.shape(mask)[:-3])
    if leads.count(leads[0]) < len(leads):
        try:
            leads[0] = np.broadcast_shapes(*leads)
        except ValueError:
            pass
    return leads[0] + (qp.shape[-2], width)


def _split(x, num_heads):
    # (..., S, H*D) -> (..., H, S, D) as a strided view of the projection
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads)).swapaxes(-2, -3)


def _weight_rows(arr, name, x, heads, heads_name, rows=None):
    w = arr[name]
    if w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"{name} must have shape (out_features, {x.shape[-1]}) to project "
                         f"inputs of shape {x.shape}, got {w.shape}")
    if rows is not None and w.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows ({heads_name}={heads} heads of the "
                         f"query head size), got {w.shape}")
    if w.shape[0] == 0 or w.shape[0] % heads:
        raise ValueError(f"{heads_name}={heads} must divide {name}.shape[0]; {name} has "
                         f"shape {w.shape}")
    return w.shape[0]


def _xavier_uniform(rng, shape, dtype):
    bound = np.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, shape).astype(dtype)


