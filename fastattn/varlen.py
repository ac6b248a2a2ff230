"""Attention over packed variable-length batches (flash-attn's ``varlen`` layout).

A ragged batch is packed along one token axis, ``(total, H, E)``, and described by
cumulative lengths ``cu_seqlens``: sequence ``b`` is rows ``cu_seqlens[b] :
cu_seqlens[b + 1]``. Nothing is padded, so no padding is computed: the dense kernel's
per-query-block body runs on each (sequence, head, query block) with that sequence's
own lengths, and the items are handed to the threads heaviest first, so the threads are
balanced by work (tokens times the keys they see), not by sequences.
"""
import operator

import numpy as np

from fastattn import _npu, _threads
from fastattn._kernels import dense as _dense
from fastattn._kernels.plan import AttentionPlan
from fastattn._layout import RaggedBatch
from fastattn._validation import (
    CPU_AND_NPU, check_alibi_slopes, check_choice, check_device, check_matrix_stacks,
    check_out, check_scale, check_score_window, check_softcap, result_dtypes, storage_dtype,
)
from fastattn.attention import (_INT32_MAX, BLOCK_K, BLOCK_Q, CAUSAL_ALIGNMENTS, ScoreModifiers,
                                _deliver, _result_buffer, visible_keys)

__all__ = ["varlen_attention"]


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, is_causal=False, causal_alignment="bottom_right",
                     scale=None, window=None, alibi_slopes=None, softcap=None,
                     return_lse=False, out=None, num_threads=None, device="cpu"):
    r"""Attention over a packed batch of variable-length sequences (flash-attn's layout).

    Sequence ``b`` is rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of ``query`` and
    ``cu_seqlens_k[b] : cu_seqlens_k[b + 1]`` of ``key`` and ``value``; each sequence
    attends to its own keys only, exactly as
    :func:`fastattn.scaled_dot_product_attention` on that sequence alone would. No
    padding is computed.

    Parameters
    ----------
    query : array_like, shape (total_q, Hq, E)
    key : array_like, shape (total_k, Hkv, E)
    value : array_like, shape (total_k, Hkv, Ev)
        The packed sequences (``flash_attn_varlen_func``'s ``q``, ``k``, ``v``). ``Hkv``
        must divide ``Hq``: query head ``h`` reads key/value head ``h // (Hq // Hkv)``
        (grouped-query attention). Any strides with a contiguous last axis are read in
        place.
    cu_seqlens_q, cu_seqlens_k : array_like of int32 or int64, shape (batch + 1,)
        Cumulative lengths: start at 0, non-decreasing, end at ``total_q`` /
        ``total_k``. Lengths of 0 are allowed (a sequence with no keys gives zeros).
    max_seqlen_q, max_seqlen_k : int, optional
        The longest query / key sequence, as flash-attn takes them; checked (at least
        the longest sequence) and otherwise not needed.
    is_causal : bool, default=False
        Query ``i`` of a sequence sees keys ``j <= i + off`` (see ``causal_alignment``).
    causal_alignment : {"bottom_right", "top_left"}, default="bottom_right"
        The diagonal offset ``off`` of each sequence: ``S_b - L_b`` (flash-attn's
        bottom-right alignment) or 0; it places the causal band, the window and ALiBi.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(E)``.
    window : (int or None, int or None), optional
        flash-attn's ``window_size``: query ``i`` sees key ``j`` only if
        ``i + off - left <= j <= i + off + right``; ``None`` or ``-1``: unbounded side.
    alibi_slopes : array_like, shape (Hq,) or (batch, Hq), optional
        ALiBi: adds ``-slope * |i + off - j|`` to the scaled (and soft-capped) score.
    softcap : float, optional
        Soft-capping: the scaled score ``s`` becomes ``softcap * tanh(s / softcap)``.
    return_lse : bool, default=False
        Also return the log-sum-exp of each row's scores, shape ``(Hq, total_q)``
        (flash-attn's varlen ``softmax_lse`` layout); ``-inf`` for a row that sees no key.
    out : ndarray, optional
        Writable, of shape ``(total_q, Hq, Ev)`` and the result's dtype; filled and
        returned.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.
    device : {"cpu", "npu", "npu:N"}, default="cpu"
        ``"npu"`` runs ``aclnnFlashAttentionVarLenScore`` (layout ``TND``,
        ``actualSeqQLen``/``actualSeqKvLen``) through the ``ascend`` package: float16,
        bfloat16 or float32; causal, windows; no ALiBi or soft-capping
        (``NotImplementedError``). See ``docs/ascend.md``.

    Returns
    -------
    out : ndarray, shape (total_q, Hq, Ev)
        The dtype rules of :func:`fastattn.scaled_dot_product_attention`.
    lse : ndarray, shape (Hq, total_q)
        Only with ``return_lse=True``, in the compute dtype.

    Raises
    ------
    TypeError
        For non-real inputs.
    ValueError
        For shapes that do not match; ``cu_seqlens_*`` of a dtype other than int32 /
        int64, not starting at 0, decreasing, not ending at the packed length, or with
        different batch sizes (the message names the array and its first bad
        position); ``max_seqlen_*`` below the longest sequence; window sizes below -1,
        ``softcap <= 0`` or ``alibi_slopes`` of the wrong shape. Everything is checked
        before any kernel runs.
    NotImplementedError
        With ``device="npu"``: ``softcap``, ``alibi_slopes``, and what the TND operator
        cannot compute (see ``ascend.flash_attention_varlen``).

    Notes
    -----
    The work items are (sequence, head, query block of up to 256 rows), ordered by
    decreasing work and claimed dynamically by the threads, so a batch of one long and
    many short sequences keeps every thread busy. Keys are not split across threads.
    The GIL is released while the kernel runs.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> lens = [5, 0, 12, 3]                                  # a ragged batch, one empty
    >>> cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    >>> q = rng.standard_normal((20, 4, 16), dtype=np.float32)     # (total, Hq, E)
    >>> k = rng.standard_normal((20, 2, 16), dtype=np.float32)     # 2 kv-heads (GQA)
    >>> v = rng.standard_normal((20, 2, 16), dtype=np.float32)
    >>> out, lse = fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True,
    ...                                      return_lse=True)
    >>> out.shape, lse.shape
    ((20, 4, 16), (4, 20))

    The same as attending each sequence alone:

    >>> s = slice(5, 17)                                      # the third sequence
    >>> alone = fastattn.scaled_dot_product_attention(
    ...     q[s].transpose(1, 0, 2), k[s].transpose(1, 0, 2), v[s].transpose(1, 0, 2),
    ...     is_causal=True, enable_gqa=True)
    >>> bool(np.allclose(out[s], alone.transpose(1, 0, 2), atol=1e-6))
    True
    """
    kind = check_device(device, CPU_AND_NPU)
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    window = check_score_window(window)
    softcap = check_softcap(softcap)
    if kind == "npu" and softcap is not None:
        raise NotImplementedError("softcap with device='npu': aclnnFlashAttentionVarLenScore "
                                  "has no soft-capping")
    if kind == "npu" and alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes with device='npu': aclnnFlashAttentionVarLenScore "
                                  "takes ALiBi only as a compressed realShift (causal sequences "
                                  "with Sq == Skv > 1024), which is not mapped")
    q, k, v, cq, ck, compute, result = _check_operands(
        query, key, value, cu_seqlens_q, cu_seqlens_k,
        dtypes=_npu.result_dtypes if kind == "npu" else result_dtypes)
    total_q, Hq, E = q.shape
    total_k, Hkv, Ev = v.shape
    batch = cq.shape[0] - 1
    len_q, len_k = np.diff(cq), np.diff(ck)
    for name, given, lens in (("max_seqlen_q", max_seqlen_q, len_q),
                              ("max_seqlen_k", max_seqlen_k, len_k)):
        _check_max_seqlen(name, given, lens)
    scale = check_scale(scale, E)
    slopes = check_alibi_slopes(alibi_slopes, (batch, Hq), what="(batch, Hq)")
    out_shape = (total_q, Hq, Ev)
    if out is not None:
        check_out(out, out_shape, result, contiguous=False)
    if kind == "npu":
        q, k, v = (np.asarray(a, dtype=result) for a in (q, k, v))
        return _npu.varlen(q, k, v, cq, ck, is_causal=bool(is_causal),
                           causal_alignment=causal_alignment, scale=scale, window=window,
                           return_lse=return_lse, out=out, device=device)
    nthreads = _threads.resolve_num_threads(num_threads)

    storage = storage_dtype(compute, result, q, k, v)
    res = _result_buffer(out, out_shape, storage, _c_order, q, k, v)
    lse = np.empty((Hq, total_q), dtype=compute) if return_lse else None
    if total_q and Ev and total_k:
        _run(q, k, v, cq, ck, len_q, len_k, res, lse, storage, scale, is_causal,
             causal_alignment, window, slopes, softcap, nthreads)
    else:
        res.fill(0)
        if lse is not None:
            lse.fill(-np.inf)
    return _deliver(res, out, result, lse, return_lse)


def _c_order(out):
    # the kernel writes the packed result (total_q, Hq, Ev) in C order only
    return out.flags.c_contiguous and out.flags.aligned


def _check_operands(query, key, value, cu_seqlens_q, cu_seqlens_k, dtypes=result_dtypes):
    """Validated packed operands and cumulative lengths (int64 vectors)."""
    (q, k, v), compute, result = check_matrix_stacks(("query", "key", "value"), query, key,
                                                     value, dtypes=dtypes)
    shapes = f"query {q.shape}, key {k.shape}, value {v.shape}"
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"expected packed query (total_q, Hq, E), key (total_k, Hkv, E) and "
                         f"value (total_k, Hkv, Ev); got {shapes}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"key and value must agree on (total_k, Hkv): {shapes}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"query and key must have the same head size E: {shapes}")
    if q.shape[2] == 0:
        raise ValueError(f"query and key need at least one feature, got E = 0 ({shapes})")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the key/value heads Hkv must divide the query heads Hq "
                         f"(grouped-query attention): {shapes}")
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "query", "total_q")
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "key", "total_k")
    if cq.shape != ck.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences: cu_seqlens_q has {cq.shape[0] - 1} (shape {cq.shape}), "
                         f"cu_seqlens_k {ck.shape[0] - 1} (shape {ck.shape})")
    return q, k, v, cq, ck, compute, result


def _check_cu_seqlens(name, cu, total, operand, total_name):
    """``cu`` as an int64 vector, or ``ValueError`` naming ``name`` and its first bad
    position: a dtype other than int32/int64, not 1-D, empty, not starting at 0,
    decreasing, or not ending at ``total`` (the packed length)."""
    a = np.asarray(cu)
    if a.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(f"{name} must be int32 or int64 (flash-attn's cumulative lengths), "
                         f"got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name} must have shape (batch + 1,), got {a.shape}")
    a = a.astype(np.int64)
    if a[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(a[0])}")
    drops = np.flatnonzero(a[1:] < a[:-1])
    if drops.size:
        i = int(drops[0]) + 1
        raise ValueError(f"{name} must be non-decreasing: {name}[{i}] = {int(a[i])} < "
                         f"{name}[{i - 1}] = {int(a[i - 1])}")
    if a[-1] != total:
        raise ValueError(f"{name}[{a.shape[0] - 1}] = {int(a[-1])} must equal the packed "
                         f"length of {operand}, {total_name} = {total}")
    return a


def _check_max_seqlen(name, given, lens):
    if given is None:
        return
    try:
        value = operator.index(given)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(given).__name__}") from None
    longest = int(lens.max(initial=0))
    if value < longest:
        raise ValueError(f"{name} = {value} is shorter than the longest sequence ({longest})")


def _packed(a, dtype):
    """``(array, row_stride, head_stride)`` of a packed (total, H, D) operand in ``dtype``,
    read in place when its last axis is contiguous and its strides are whole, positive
    element counts a BLAS row stride can take; else copied to C order."""
    a = np.asarray(a, dtype=dtype)
    item = a.dtype.itemsize
    total, H, D = a.shape
    st = a.strides
    ok = a.flags.aligned and all(s % item == 0 and s >= 0 for s in st)
    ok = ok and (D <= 1 or st[2] == item)
    ok = ok and (total <= 1 or max(D, 1) * item <= st[0] <= _INT32_MAX * item)
    if not ok:
        a = np.ascontiguousarray(a)
        st = a.strides
    ld = st[0] // item if total > 1 else max(D, 1) * max(H, 1)
    return a, ld, st[1] // item


def _run(q, k, v, cq, ck, seq_len_q, seq_len_k, res, lse, storage, scale, is_causal,
         causal_alignment, window, slopes, softcap, nthreads):
    # seq_len_q, seq_len_k: the sequences' lengths, np.diff(cq) and np.diff(ck)
    total_q, Hq, E = q.shape
    Hkv, Ev = k.shape[1], v.shape[2]
    group = Hq // Hkv
    batch = cq.shape[0] - 1
    q, ldq, hq = _packed(q, storage)
    k, ldk, hk = _packed(k, storage)
    v, ldv, hv = _packed(v, storage)
    ldo, ho = Hq * Ev, Ev                     # res: C-contiguous (total_q, Hq, Ev)

    # batch entry b = sequence s, query head h
    s_of = np.repeat(np.arange(batch), Hq)
    h_of = np.tile(np.arange(Hq), batch)
    len_q = seq_len_q[s_of]
    len_k = seq_len_k[s_of]
    q_off = cq[s_of] * ldq + h_of * hq
    k_off = ck[s_of] * ldk + (h_of // group) * hk
    v_off = ck[s_of] * ldv + (h_of // group) * hv
    out_off = cq[s_of] * ldo + h_of * ho
    lse_off = h_of * total_q + cq[s_of]

    Lmax, Smax = int(len_q.max(initial=0)), int(len_k.max(initial=0))
    block_q, block_k = min(BLOCK_Q, max(Lmax, 1)), min(BLOCK_K, max(Smax, 1))
    bottom_right = causal_alignment == "bottom_right"
    mods = ScoreModifiers(window, None if slopes is None else slopes.reshape(-1), softcap)

    # the items: every query block of every (sequence, head); work = the (query, key)
    # pairs the block's rows see. Threads claim them in order: the (sequence, head)
    # entries heaviest first, and within an entry its blocks heaviest first, so that a
    # thread's next block mostly reads the keys and values its last one did (taken
    # across entries, heaviest block first, the batch of 16 sequences of the benchmark ran
    # 11% slower) and the last items are the lightest.
    nqb = -(-seq_len_q // block_q)
    blk_seq = np.repeat(np.arange(batch), nqb)
    blk_q0 = (np.arange(int(nqb.sum())) - np.repeat(np.cumsum(nqb) - nqb, nqb)) * block_q
    work = _block_work(seq_len_q, seq_len_k, blk_seq, blk_q0, block_q, bottom_right,
                       mods.band(is_causal))
    seq_work = np.bincount(blk_seq, weights=work, minlength=batch)
    order = np.lexsort((-work, -seq_work[blk_seq]))
    blk_seq, blk_q0, work = blk_seq[order], blk_q0[order], work[order]
    # the blocks of each sequence for every head: entry (s, h) takes them in turn
    starts = np.flatnonzero(np.r_[True, blk_seq[1:] != blk_seq[:-1]])
    counts = np.diff(np.r_[starts, blk_seq.shape[0]])
    items = np.empty((blk_seq.shape[0] * Hq, 2), dtype=np.intp)
    pos = 0
    for start, n in zip(starts, counts):
        s = blk_seq[start]
        part = items[pos:pos + n * Hq].reshape(Hq, n, 2)
        part[..., 0] = s * Hq + np.arange(Hq)[:, None]
        part[..., 1] = blk_q0[start:start + n] // block_q
        pos += n * Hq
    ragged = RaggedBatch(len_q, len_k, lse_off, items, bottom_right)

    flops = 2.0 * Hq * float(work.sum()) * (E + Ev)
    nthreads = _threads.call_threads(nthreads, items.shape[0], flops)
    offsets = tuple(np.ascontiguousarray(o, dtype=np.intp) for o in (q_off, k_off, v_off,
                                                                     out_off))
    plan = AttentionPlan(q, k, v, res, lse, offsets, (ldq, ldk, ldv, ldo), Lmax, Smax, E, Ev,
                         None, scale=scale, causal=bool(is_causal), causal_offset=0,
                         block_q=block_q, block_k=block_k, nsplit=1, nthreads=nthreads,
                         ragged=ragged, **mods.plan_kwargs())
    with _threads.tile_blas(storage, Ev):
        _dense.sdpa(plan)


def _block_work(len_q, len_k, blk_seq, blk_q0, block_q, bottom_right, band):
    """(query, key) pairs each query block sees: per row, the keys of its ``band``
    (:meth:`ScoreModifiers.band`)."""
    L, S = len_q[blk_seq], len_k[blk_seq]
    rows = np.minimum(L - blk_q0, block_q)
    if band is None:
        return rows * S
    # row i = q0 + t (t < rows) at key position i + off sees [i + off - left, i + off + right]
    off = (S - L) if bottom_right else np.zeros_like(S)
    t = np.arange(block_q)
    pos = (blk_q0 + off)[:, None] + t[None, :]
    seen = visible_keys(pos, S[:, None], band) * (t[None, :] < rows[:, None])
    return seen.sum(axis=1)
