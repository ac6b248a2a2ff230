"""Scaled dot-product attention on NumPy arrays, computed by the fused kernel."""
import math

import numpy as np

from fastattn import _npu, _threads
from fastattn._kernels import dense as _dense
from fastattn._kernels.plan import AttentionPlan
from fastattn._layout import PreparedMask, as_matrix_stack, batch_offsets
from fastattn._layout import overlaps as _overlaps
from fastattn._validation import (
    CPU_AND_NPU, as_array, check_alibi_slopes, check_batch_shape, check_choice, check_device,
    check_dropout, check_qkv, check_scale, check_score_window, check_softcap, is_floating,
    result_dtypes, storage_dtype,
)
from fastattn._validation import check_out as _check_out

__all__ = ["scaled_dot_product_attention"]

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")

# Tile sizes (rows of Q, rows of K/V per tile). Measured on a 2-core AVX-512 machine with
# the tilegemm.h micro-kernels (interleaved runs, L = S = 2048, E = 64, GFLOP/s dense /
# mask cost / causal speed-up): 256x256 172 / +4.8% / 1.87, 256x512 174 / +6.6% / 1.85,
# 128x256 169 / +5.6% / 1.87, 512x256 174 / +4.8% / 1.85, 192x384 172 / +4.2% / 1.88.
# The score tile stays in L2; causal tiles crossing the diagonal are taken in 64-row
# slices by the kernel, so they cost causal little.
BLOCK_Q = 256
BLOCK_K = 256

_INT32_MAX = 2**31 - 1


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, rng=None,
                                 causal_alignment="top_left", return_lse=False, out=None,
                                 num_threads=None, device="cpu", window=None, alibi_slopes=None,
                                 softcap=None):
    r"""Scaled dot-product attention, ``softmax(query @ key.T * scale + mask) @ value``.

    Computed by a fused, tiled kernel (FlashAttention-2 style online softmax): the
    ``(L, S)`` score matrix is never materialised, so extra memory is a few tiles per
    thread whatever the sequence lengths.

    The first eight parameters are PyTorch's
    ``torch.nn.functional.scaled_dot_product_attention``, in its order, so a call
    ``(q, k, v, None, 0.0, True)`` ported from torch means the same here; fastattn's
    own options are keyword-only.

    Parameters
    ----------
    query : array_like, shape (..., L, E)
    key : array_like, shape (..., S, E)
    value : array_like, shape (..., S, Ev)
        The leading (batch) dimensions broadcast against each other like
        ``np.matmul``. Any strides are accepted (e.g. a ``(B, L, H, E)`` array
        viewed as ``(B, H, L, E)``, or batch axes reversed with ``[::-1]``) without
        copying when the last axis is contiguous and the row axis (-2) has a
        positive stride; otherwise (e.g. ``key[..., ::-1, :]``), and for a
        misaligned array, that operand is copied once to C order.
    attn_mask : array_like, optional
        Broadcastable to ``(..., L, S)``. bool: True means the key takes part in
        attention (the PyTorch convention). Float: added to the scaled scores
        (use ``-inf`` to exclude: a ``-inf`` drops the pair whatever its score,
        ``+inf`` or NaN too, exactly as False does). A broadcast mask is never
        expanded in memory.
    dropout_p : float, default=0.0
        Dropout on the attention probabilities, in ``[0, 1)``: each probability is
        dropped with probability ``dropout_p`` and the kept ones are scaled by
        ``1 / (1 - dropout_p)`` (the softmax denominator is that of all keys, as in
        PyTorch and FlashAttention). Done inside the kernel; the keep/drop decision of
        element ``(b, i, j)`` is a hash of ``(seed, b, i, j)`` (``b`` the flat batch
        index), so the mask is never stored and can be regenerated
        (:func:`fastattn.reference.dropout_keep`). ``0.0`` computes exactly what no
        dropout computes.
    is_causal : bool, default=False
        Query ``i`` sees only keys ``j <= i`` (``top_left``) or
        ``j <= i + S - L`` (``bottom_right``). May be combined with ``attn_mask``.
    scale : float, optional
        Multiplies the scores before masking; default ``1 / sqrt(E)``.
    enable_gqa : bool, default=False
        Grouped-query attention: the head axis (-3) of ``key``/``value`` may divide
        that of ``query``; query head ``h`` reads key/value head
        ``h // (Hq // Hkv)``. K and V are not copied.
    rng : None, int or numpy.random.Generator, optional
        The dropout mask's generator (unused when ``dropout_p == 0``). An int is the
        seed itself: the same mask on every call (what a backward pass needs to
        regenerate it). A ``Generator`` gives one 64-bit seed per call (advancing it),
        so successive calls differ and a seeded Generator replays them. None: a fresh
        seed from the operating system.
    causal_alignment : {"top_left", "bottom_right"}, default="top_left"
        Where the causal diagonal sits when ``L != S``: PyTorch's ``is_causal``
        is top-left; flash-attn and decoding with a KV cache use bottom-right.
        Query ``i`` sits at key position ``i + off``, ``off = 0`` (top-left) or
        ``S - L`` (bottom-right): the diagonal of ``window`` and ALiBi too.
    return_lse : bool, default=False
        Also return the log-sum-exp of each row's scaled, masked scores,
        shape ``(..., L)``: what is needed to merge results over key blocks.
    out : ndarray, optional
        Writable, of the exact result shape and dtype; filled and returned. Any
        strides are accepted: when the last axis is contiguous (e.g. a
        ``split_heads`` view ``(B, H, L, Ev)`` of a merged ``(B, L, H·Ev)`` array)
        the kernel writes into it directly, otherwise the result is copied in.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.
    device : {"cpu", "npu", "npu:N"}, default="cpu"
        Where to compute. ``"npu"`` runs ``aclnnFlashAttentionScore`` on a Huawei
        Ascend NPU through the ``ascend`` package (float16, :data:`fastattn.bfloat16`
        or float32 inputs, mixed ones promoted as NumPy promotes; raises
        ``ascend.AscendRuntimeNotFound`` without CANN). ``ascend.DeviceArray``
        inputs of shape (B, H, L, E) stay on the device and give a DeviceArray.
    window : (int or None, int or None), optional
        Sliding window (flash-attn's ``window_size``): query ``i`` sees key ``j``
        only if ``i + off - left <= j <= i + off + right``; ``None`` or ``-1`` leaves
        a side unbounded. Combines with ``is_causal`` and ``attn_mask`` (a key must
        pass all three). Tiles wholly outside the band are skipped, so the cost is
        proportional to the window's width.
    alibi_slopes : array_like, shape (H,) or (B, H), optional
        ALiBi: adds ``-slope * |i + off - j|`` to the scaled (and soft-capped) score,
        one slope per query head (axis -3 of ``query``, ``H``) and optionally per
        batch entry (axis -4, ``B``).
    softcap : float, optional
        Soft-capping (Gemma 2): the scaled score ``s`` becomes
        ``softcap * tanh(s / softcap)``. Must be positive.

    Returns
    -------
    out : ndarray, shape (..., L, Ev)
        float32 or float64 like the inputs (NumPy promotion); float16 inputs are
        computed in float32 and returned as float16; integers give float64. On the
        NPU: the promoted input dtype (float16, bfloat16 or float32).
    lse : ndarray, shape (..., L)
        Only with ``return_lse=True``: float32 or float64 (the compute dtype);
        float32 on the NPU.

    Raises
    ------
    TypeError
        For complex, bool, object or string inputs, or a mask that is neither
        bool nor floating.
    ValueError
        For shapes that do not match or broadcast, an unknown ``device`` or
        ``causal_alignment``, ``dropout_p`` outside ``[0, 1)`` (or above 0 with
        ``device="npu"``), window sizes below -1, ``softcap <= 0``, or
        ``alibi_slopes`` of the wrong shape.
    NotImplementedError
        For ``softcap`` with ``device="npu"`` (the operator has no soft-capping;
        ``window`` and ``alibi_slopes`` map onto its band modes and ``pse``, see
        ``docs/ascend.md``).

    Notes
    -----
    The score modifiers apply in flash-attn's order: scale, soft-cap, add the ALiBi
    bias, then ``attn_mask``, the causal band and the window
    (:func:`fastattn.reference.scaled_dot_product_attention` defines them). None of
    them builds an ``(L, S)`` array: the kernel applies them tile by tile.

    A query row whose keys are all masked out (by the mask, the causal band, the
    window, or ``S == 0``) returns zeros, not NaN, and its lse is ``-inf``. Tiles
    entirely outside the causal band or the window, and tiles a bool mask rules out
    entirely, are skipped rather than computed and masked.

    The GIL is released while the kernel runs.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 16, 8), dtype=np.float32)  # (B, H, L, E)
    >>> k = rng.standard_normal((2, 4, 16, 8), dtype=np.float32)
    >>> v = rng.standard_normal((2, 4, 16, 8), dtype=np.float32)
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 16, 8), dtype('float32'))

    The first query of a causal row sees only the first key:

    >>> bool(np.allclose(out[..., 0, :], v[..., 0, :]))
    True

    A fully masked row gives zeros and an lse of ``-inf``:

    >>> mask = np.ones((16, 16), dtype=bool)
    >>> mask[3] = False
    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    >>> float(abs(out[..., 3, :]).max()), float(lse[0, 0, 3])
    (0.0, -inf)

    Dropout with a seed is reproducible, and the reference regenerates its mask:

    >>> from fastattn import reference
    >>> a = fastattn.scaled_dot_product_attention(q, k, v, None, 0.25, rng=7)
    >>> b = reference.scaled_dot_product_attention(q, k, v, None, 0.25, rng=7)
    >>> bool(np.allclose(a, b, atol=1e-5))
    True

    A causal sliding window of 4 keys with ALiBi and soft-capping, checked against
    the reference:

    >>> slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, window=(3, 0),
    ...                                             alibi_slopes=slopes, softcap=30.0)
    >>> ref = fastattn.reference.scaled_dot_product_attention(
    ...     q, k, v, is_causal=True, window=(3, 0), alibi_slopes=slopes, softcap=30.0)
    >>> bool(np.allclose(out, ref, atol=1e-5))
    True
    """
    kind = check_device(device, CPU_AND_NPU)
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    dropout_p, seed = check_dropout(dropout_p, rng)
    if seed is not None and kind == "npu":
        raise ValueError(f"dropout_p > 0 is computed on the CPU only, got device={device!r}")
    window = check_score_window(window)
    softcap = check_softcap(softcap)
    if kind == "npu" and softcap is not None:
        raise NotImplementedError("softcap with device='npu': aclnnFlashAttentionScore has no "
                                  "soft-capping")
    if kind == "npu" and _npu.any_device_array(query, key, value):
        return _npu.sdpa_resident(query, key, value, attn_mask, is_causal=is_causal,
                                  causal_alignment=causal_alignment, scale=scale,
                                  enable_gqa=enable_gqa, return_lse=return_lse, out=out,
                                  device=device, window=window, alibi_slopes=alibi_slopes)
    ops = _Operands(query, key, value, attn_mask, enable_gqa, npu=kind == "npu")
    scale = check_scale(scale, ops.E)
    slopes = check_alibi_slopes(alibi_slopes, ops.batch_shape)
    if out is not None:
        _check_out(out, ops.out_shape, ops.result, contiguous=False)
    if kind == "npu":
        return _npu.sdpa(ops, is_causal=is_causal, causal_alignment=causal_alignment,
                         scale=scale, return_lse=return_lse, out=out, device=device,
                         window=window,
                         alibi_slopes=slopes[(0,) * (slopes.ndim - 1)]
                         if slopes is not None and np.ndim(alibi_slopes) == 1 else slopes)
    nthreads = _threads.resolve_num_threads(num_threads)

    res = _result_buffer(out, ops.out_shape, ops.storage, _kernel_writable, ops.q, ops.k, ops.v,
                         ops.mask)
    lse = np.empty(ops.batch_shape + (ops.L,), dtype=ops.compute) if return_lse else None
    if ops.nbatch and ops.L and ops.Ev:
        mods = ScoreModifiers(window, None if slopes is None else slopes.reshape(-1), softcap)
        _run_dense(ops, res, lse, scale, is_causal, causal_alignment, nthreads, mods,
                   dropout=(dropout_p, seed) if seed is not None else None)
    elif lse is not None:
        lse.fill(-np.inf)
    return _deliver(res, out, ops.result, lse, return_lse)


def _result_buffer(out, shape, storage, writable, *operands):
    """Where the kernel writes the result: ``out`` itself when it has the storage dtype,
    ``writable(out)`` holds and it overlaps none of ``operands``; else a new array."""
    if (out is not None and out.dtype == storage and writable(out)
            and not _overlaps(out, *operands)):
        return out
    return np.empty(shape, dtype=storage)


def _deliver(res, out, result, lse, return_lse):
    """What a call returns from the kernel's result ``res`` (see :func:`_result_buffer`):
    ``out``, filled unless the kernel wrote it, or else ``res`` in the result dtype."""
    if out is not None:
        if res is not out:
            out[...] = res
        res = out
    elif res.dtype != result:
        res = res.astype(result)
    return (res, lse) if return_lse else res


class _Operands:
    """Validated query/key/value/mask with their broadcast batch shape and dtypes.

    Shared by the CPU and NPU paths; raises ``TypeError``/``ValueError`` naming the
    shapes before anything is computed.
    """

    def __init__(self, query, key, value, attn_mask, enable_gqa, npu=False):
        # the NPU path takes float16/bfloat16/float32 (its own dtype rules, _npu.result_dtypes)
        dtypes = _npu.result_dtypes if npu else result_dtypes
        q, k, v, self.compute, self.result = check_qkv(query, key, value, dtypes=dtypes)
        L, E = q.shape[-2:]
        S, Ev = v.shape[-2:]

        mask = None
        if attn_mask is not None:
            mask = as_array("attn_mask", attn_mask)
            if mask.dtype != np.bool_ and not is_floating(mask.dtype):
                hint = (" (a 0/1 keep mask: pass attn_mask.astype(bool))"
                        if mask.dtype.kind in "iu" else "")
                raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to "
                                f"the scores), got dtype {mask.dtype}{hint}")
            m_rows, m_cols = ((1, 1) + mask.shape)[-2:]
            if m_rows not in (1, L) or m_cols not in (1, S):
                raise ValueError(f"attn_mask of shape {mask.shape} does not broadcast to the "
                                 f"scores (..., L={L}, S={S})")
            while mask.ndim < 2:
                mask = mask[np.newaxis]

        # Broadcast batch shape, with grouped-query heads matched up on axis -3.
        group = 1
        k_lead, v_lead = k.shape[:-2], v.shape[:-2]
        if enable_gqa and q.ndim >= 3 and k.ndim >= 3 and v.ndim >= 3:
            hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
            if hk != hv:
                raise ValueError(f"key and value must have the same number of heads (axis -3): "
                                 f"key {k.shape}, value {v.shape}")
            if hk != hq and hk != 1:
                if hk == 0 or hq % hk:
                    raise ValueError(f"with enable_gqa the key/value heads must divide the query "
                                     f"heads (axis -3): query {q.shape}, key {k.shape}")
                group = hq // hk
                k_lead = k_lead[:-1] + (hq,)
                v_lead = v_lead[:-1] + (hq,)
        leads = [q.shape[:-2], k_lead, v_lead]
        named = dict(query=q.shape, key=k.shape, value=v.shape)
        if mask is not None:
            leads.append(mask.shape[:-2])
            named["attn_mask"] = mask.shape
        try:
            batch_shape = check_batch_shape(leads, **named)
        except ValueError as error:
            if not enable_gqa and _grouped_heads(q, k):
                raise ValueError(f"{error}; query has {q.shape[-3]} heads and key/value "
                                 f"{k.shape[-3]}: for grouped-query attention pass "
                                 f"enable_gqa=True") from None
            raise

        self.q, self.k, self.v, self.mask = q, k, v, mask
        self.storage = storage_dtype(self.compute, self.result, q, k, v)
        self.L, self.S, self.E, self.Ev = L, S, E, Ev
        self.group = group
        self.batch_shape = batch_shape
        self.nbatch = math.prod(batch_shape)
        self.out_shape = batch_shape + (L, Ev)


def _grouped_heads(q, k):
    # whether the head axes (-3) look like grouped-query attention: key heads divide
    # the query heads
    return (q.ndim >= 3 and k.ndim >= 3 and 1 < k.shape[-3] < q.shape[-3]
            and q.shape[-3] % k.shape[-3] == 0)


class ScoreModifiers:
    """The validated score modifiers of a call: ``window`` ``(left, right)`` with None
    for an unbounded side (or None), ``slopes`` a float64 vector of one ALiBi slope per
    batch entry (or None), ``softcap`` a positive float (or None)."""

    __slots__ = ("window", "slopes", "softcap")

    def __init__(self, window=None, slopes=None, softcap=None):
        self.window, self.slopes, self.softcap = window, slopes, softcap

    def plan_kwargs(self):
        """The AttentionPlan keywords."""
        return dict(window=self.window, softcap=self.softcap or 0.0, slopes=self.slopes)

    def band(self, causal):
        """``(left, right)`` of the keys a row sees around its position, the causal band
        folded into ``right`` (None: an unbounded side); None when both are unbounded."""
        left, right = self.window or (None, None)
        if causal:
            right = 0 if right is None else min(right, 0)
        return None if left is None and right is None else (left, right)

    def visible_pairs(self, L, S, offset, causal):
        """How many (query, key) pairs of an (L, S) problem the causal band and the window
        leave visible (diagonal offset ``offset``), and the most one row sees."""
        band = self.band(causal)
        if band is None:
            return L * S, S
        n = visible_keys(np.arange(L, dtype=np.int64) + offset, S, band)
        return int(n.sum()), int(n.max(initial=0))


def visible_keys(pos, S, band):
    """Keys of ``S`` that rows at key positions ``pos`` see in ``band`` (see
    :meth:`ScoreModifiers.band`, not None); ``pos`` broadcasts against ``S``."""
    left, right = band
    lo = 0 if left is None else np.maximum(pos - left, 0)
    hi = S - 1 if right is None else np.minimum(pos + right, S - 1)
    return np.maximum(hi - lo + 1, 0)


_NO_MODS = ScoreModifiers()


def _run_dense(ops, res, lse, scale, is_causal, causal_alignment, nthreads, mods=_NO_MODS,
               dropout=None):
    L, S, E, Ev = ops.L, ops.S, ops.E, ops.Ev
    batch_shape, group, compute, storage = ops.batch_shape, ops.group, ops.compute, ops.storage
    if S == 0:
        res.fill(0)
        if lse is not None:
            lse.fill(-np.inf)
        return
    nb = len(batch_shape)
    group_axis = nb - 1 if group > 1 else None
    q, ldq = as_matrix_stack(ops.q, storage)
    k, ldk = as_matrix_stack(ops.k, storage)
    v, ldv = as_matrix_stack(ops.v, storage)
    q_off = batch_offsets(q, batch_shape)
    k_off = batch_offsets(k, batch_shape, group_axis, group)
    v_off = batch_offsets(v, batch_shape, group_axis, group)
    # res is either fresh (C order) or an `out` that passed _kernel_writable; laid out
    # like the query (as multi-head attention's heads are), it has the query's offsets
    if res.strides[:-1] == q.strides[:-1] and res.shape[:-1] == q.shape[:-1]:
        out_off = q_off
    else:
        out_off = batch_offsets(res, batch_shape)
    ldo = res.strides[-2] // res.itemsize if L > 1 else max(Ev, 1)
    nbatch = q_off.shape[0]

    block_q = min(BLOCK_Q, L)
    block_k = min(BLOCK_K, S)
    nqb = -(-L // block_q)
    nkb = -(-S // block_k)
    causal_offset = 0 if causal_alignment == "top_left" else S - L
    if mods.window is None:
        flops = 2.0 * nbatch * L * S * (E + Ev) * (0.5 if is_causal else 1.0)
    else:
        # a window: only the band's tiles are computed
        pairs, widest = mods.visible_pairs(L, S, causal_offset, is_causal)
        flops = 2.0 * nbatch * pairs * (E + Ev)
        nkb = min(nkb, -(-(widest + block_q) // block_k) + 1)
    nthreads = _threads.call_threads(nthreads, nbatch * nqb * nkb, flops)
    nsplit, nthreads = _threads.split_keys(nbatch * nqb, nkb, nthreads)

    prepared = None
    if ops.mask is not None:
        prepared = PreparedMask(ops.mask, compute, L, S, batch_shape, block_q, block_k)
    plan = AttentionPlan(q, k, v, res, lse, (q_off, k_off, v_off, out_off), (ldq, ldk, ldv, ldo),
                         L, S, E, Ev, prepared, scale=scale, causal=bool(is_causal),
                         causal_offset=causal_offset, block_q=block_q, block_k=block_k,
                         nsplit=nsplit, nthreads=nthreads, dropout=dropout,
                         **mods.plan_kwargs())
    with _threads.tile_blas(storage, Ev):
        _dense.sdpa(plan)


def _kernel_writable(out):
    # Whether the dense kernel can write into `out` (..., L, Ev) in place: element-aligned
    # strides, unit-stride rows whose stride (at least Ev) fits a BLAS int, and no two
    # elements at one address (threads would race on it). Non-overlap is checked the
    # sufficient way: taken by increasing stride, each axis steps past everything the
    # smaller ones span.
    flags = out.flags
    if flags.c_contiguous or not flags.aligned:
        return flags.aligned
    item, shape, strides = out.itemsize, out.shape, out.strides
    if shape[-1] > 1 and strides[-1] != item:
        return False
    if shape[-2] > 1 and not max(shape[-1], 1) * item <= strides[-2] <= _INT32_MAX * item:
        return False
    span = item
    for s, n in sorted(zip(map(abs, strides), shape)):
        if n > 1:
            if s < span or s % item:
                return False
            span += (n - 1) * s
    return True
