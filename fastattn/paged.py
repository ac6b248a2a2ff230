"""Decoding with a paged KV cache: the attention over it (the cache is in ``kv_cache``).

The keys and values of every sequence live in two preallocated pools of fixed-size
blocks (vLLM's paged attention; Ascend's ``IncreFlashAttentionV4`` takes the same
layout). A sequence is a list of block ids, so it grows without copying and
sequences can share blocks (``fork``, copy-on-write). :class:`PagedKVCache` lives in
:mod:`fastattn.kv_cache` and is re-exported here.
"""

import functools
import math

import numpy as np

from fastattn import _npu, _threads
from fastattn._kernels import paged as _paged
from fastattn._layout import (CACHED_OFFSETS, MaskOperand, as_kernel_array, as_matrix_stack,
                              layout_offsets)
from fastattn._validation import (
    HALF, CPU_AND_NPU, as_array, check_alibi_slopes, check_device, check_scale,
    check_score_window, check_softcap, result_dtypes,
)
from fastattn.attention import ScoreModifiers

__all__ = ["PagedKVCache", "paged_attention"]

# Work per (sequence, tile): a tile is up to ROW_TILE query rows, the G*T rows of several
# kv-heads when each has few (decoding), else part of one kv-head's rows. A block stores
# its kv-heads next to each other, so a tile of several reads each block's keys and values
# as one run instead of one 8 KB piece per kv-head at scattered addresses, which streams
# more slowly. KEYS_PER_CHUNK keys per online-softmax update. Up to VECTOR_ROWS rows per
# kv-head the products are the small-GEMM loops of the tile core, above it BLAS. Measured
# on one thread of a 2-core AVX-512 (Zen 4) machine with OpenBLAS, B=8, H=32, H_kv=8,
# S=4096, E=128, float32 (thread CPU time, machine busy): 13.3 ms; 15.3 with one kv-head
# per tile; 26.5 with BLAS (as tiles of 4 rows x 16 keys cost more in the call than in
# arithmetic); 38.4 without software prefetch. The loops beat BLAS at every size tried,
# float32 and float64: 1.25x at 1 row, 2x at 4, 1.45x at 16, 1.04-1.2x at 64 to 256.
# Above 64 rows BLAS is kept for CPUs with two 512-bit FMA units, where its kernels have
# twice the peak of these 32-byte vector loops.
VECTOR_ROWS = 64
ROW_TILE = 64
KEYS_PER_CHUNK = 512
# Software prefetch distance in bytes (16 KB to 256 KB measured within 3% of each
# other): blocks sit at scattered addresses, where the hardware prefetchers start late.
# The small-GEMM loops spread a piece's prefetches over their iterations; BLAS calls get
# them in one burst before the call.
PREFETCH_BYTES = 32768


def paged_attention(query, key_blocks, value_blocks, block_table, seq_lens, *, scale=None,
                    causal=True, return_lse=False, num_threads=None, device="cpu",
                    window=None, alibi_slopes=None, softcap=None):
    r"""Attention of new query tokens over a paged key/value cache.

    Sequence ``b`` consists of the first ``seq_lens[b]`` entries of its blocks
    ``block_table[b, 0], block_table[b, 1], ...`` (``block_size`` entries each).
    The result equals :func:`fastattn.scaled_dot_product_attention` on those keys
    and values gathered into contiguous arrays, but nothing is gathered: each
    block is read in place, once for all the query heads that share it.

    Parameters
    ----------
    query : array_like or ascend.DeviceArray, shape (B, H, T, E)
        ``T >= 1`` new tokens per sequence: 1 when decoding, more for chunked
        prefill or speculative decoding. A DeviceArray (``device="npu"`` only)
        gives a DeviceArray result.
    key_blocks : array_like or ascend.DeviceArray, shape (num_blocks, H_kv, block_size, E)
    value_blocks : array_like or ascend.DeviceArray, shape (num_blocks, H_kv, block_size, Ev)
        The block pools, e.g. :attr:`PagedKVCache.key_blocks`. ``H`` must be a
        multiple of ``H_kv``: query head ``h`` reads kv-head ``h // (H // H_kv)``
        (grouped-query / multi-query attention). DeviceArrays (the pools of
        ``PagedKVCache(..., device="npu")``) are used in place with ``device="npu"``;
        NumPy pools are uploaded on every NPU call.
    block_table : array_like of int, shape (B, max_blocks)
        Block ids of each sequence, in order. Only the first
        ``ceil(seq_lens[b] / block_size)`` entries of row ``b`` are read (and
        checked); the rest may hold anything.
    seq_lens : array_like of int, shape (B,)
        Cached length of each sequence, including the ``T`` new tokens when
        they were appended before the call. ``0 <= seq_lens[b] <= max_blocks *
        block_size``.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(E)``.
    causal : bool, default=True
        Bottom-right aligned: the last query row of a sequence sees all its
        ``seq_lens[b]`` keys, row ``t`` sees the first ``seq_lens[b] - T + 1 + t``.
        With False every row sees all keys.
    return_lse : bool, default=False
        Also return the log-sum-exp of each row's scaled scores, shape
        ``(B, H, T)``.
    num_threads : int, optional
        Threads for this call; default :func:`fastattn.get_num_threads`.
    device : {"cpu", "npu", "npu:N"}, default="cpu"
        Where to compute. ``"npu"`` runs ``aclnnIncreFlashAttentionV4`` through the
        ``ascend`` package: float16/bfloat16 only, ``Ev == E``, ``block_size`` a
        multiple of 16, no ``return_lse`` (see ``docs/ascend.md``).
    window : (int or None, int or None), optional
        Sliding window, as in :func:`fastattn.scaled_dot_product_attention`: row ``t``,
        at key position ``pos = seq_lens[b] - T + t``, sees keys
        ``pos - left <= j <= pos + right`` (``None`` or ``-1``: unbounded side). Key
        blocks wholly before every row's window are not read.
    alibi_slopes : array_like, shape (H,) or (B, H), optional
        ALiBi: adds ``-slope * |pos - j|`` to the scaled (and soft-capped) scores.
    softcap : float, optional
        Soft-capping: the scaled score ``s`` becomes ``softcap * tanh(s / softcap)``.

    Returns
    -------
    out : ndarray or ascend.DeviceArray, shape (B, H, T, Ev)
        NumPy (and ml_dtypes) dtype promotion of the inputs, as for
        :func:`fastattn.scaled_dot_product_attention`: float16 or bfloat16 when
        the query and both pools are, float32 for a float32 query over half
        pools; on the NPU the inputs' dtype, and a DeviceArray when the query is
        one.
    lse : ndarray, shape (B, H, T)
        Only with ``return_lse=True``, in the compute dtype (float32 for half
        results).

    Raises
    ------
    TypeError
        For non-real inputs, a block table or lengths that are not integers, or
        DeviceArray inputs with ``device="cpu"``.
    ValueError
        For shapes that do not match, ``T == 0``, block ids out of range, lengths
        beyond the table's capacity or negative, an unknown ``device``, window sizes
        below -1, ``softcap <= 0`` or ``alibi_slopes`` of the wrong shape.
    NotImplementedError
        For ``window``, ``alibi_slopes`` or ``softcap`` with ``device="npu"``.

    See Also
    --------
    PagedKVCache : owns the pools and the tables; ``PagedKVCache.attention`` calls this.

    Notes
    -----
    A row that sees no key (``seq_lens[b] == 0``, or a causal row before the
    first key) gives zeros and an lse of ``-inf``. float16 and bfloat16 pools are
    read as they are, whatever the query's dtype: each block is widened to the
    compute type (float32; float64 for a float64 query) as it is read, so a half
    cache halves the bytes a call reads. Other pools are read in place when they
    have the result's dtype; otherwise NumPy promotion converts the whole pools on
    every call (e.g. float32 pools with a float64 query).
    When there are too few sequences to keep every thread busy, each sequence's
    keys are split across threads and the partial results merged by their
    log-sum-exp (flash-decoding). The GIL is released while the kernel runs.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> rng = np.random.default_rng(0)
    >>> kb = rng.standard_normal((6, 2, 4, 8), dtype=np.float32)  # 6 blocks of 4, H_kv=2
    >>> vb = rng.standard_normal((6, 2, 4, 8), dtype=np.float32)
    >>> table = np.array([[5, 0, 2], [1, 3, 0]])     # sequence 1 only uses 2 blocks
    >>> lens = np.array([10, 7])
    >>> q = rng.standard_normal((2, 4, 1, 8), dtype=np.float32)   # H=4: 2 heads per kv-head
    >>> out = fastattn.paged_attention(q, kb, vb, table, lens)
    >>> out.shape
    (2, 4, 1, 8)

    The same as attention on the gathered keys and values:

    >>> k0 = kb[[5, 0, 2]].transpose(1, 0, 2, 3).reshape(2, 12, 8)[:, :10]
    >>> v0 = vb[[5, 0, 2]].transpose(1, 0, 2, 3).reshape(2, 12, 8)[:, :10]
    >>> dense = fastattn.scaled_dot_product_attention(q[0], k0, v0, enable_gqa=True)
    >>> bool(np.allclose(out[0], dense, atol=1e-5))
    True
    """
    kind = check_device(device, CPU_AND_NPU)
    window = check_score_window(window)
    softcap = check_softcap(softcap)
    names = ("query", "key_blocks", "value_blocks")
    if kind == "npu":
        # DeviceArrays (a resident cache or query) stay on the device; NumPy operands
        # are promoted to one dtype the operator takes (float16 or bfloat16)
        q, k, v = _npu.promote([a if _npu.is_device_array(a) else np.asarray(a)
                                for a in (query, key_blocks, value_blocks)], names,
                               supported=_npu.PAGED_DTYPES, what=" for paged attention")
    else:
        try:
            q, k, v = (as_array(n, a) for n, a in zip(names, (query, key_blocks, value_blocks)))
        except TypeError:   # a DeviceArray refuses conversion; say what to do instead
            _npu.reject_device_arrays(**dict(zip(names, (query, key_blocks, value_blocks))))
            raise
        compute, result = result_dtypes(q, k, v, names=names)
    B, H, T, E, Hkv, bs, Ev = _check_shapes(q, k, v)
    table, lens = _check_table(block_table, seq_lens, B, k.shape[0], bs)
    scale = check_scale(scale, E)
    slopes = check_alibi_slopes(alibi_slopes, (B, H), what="the query's (B, H)")
    if kind == "npu":
        if window is not None or slopes is not None or softcap is not None:
            raise NotImplementedError("window, alibi_slopes and softcap are not available "
                                      "for paged attention with device='npu'")
        return _npu.paged_attention(q, k, v, table, lens, scale=scale, causal=causal,
                                    return_lse=return_lse, device=device)
    nthreads = _threads.resolve_num_threads(num_threads)
    if lens.size:
        max_len, keys = int(lens.max()), int(lens.sum())
    else:
        max_len = keys = 0
    mods = None
    if window is not None or slopes is not None or softcap is not None:
        mods = ScoreModifiers(window, None if slopes is None else slopes.reshape(-1),
                              softcap).plan_kwargs()
    return _attend_cpu(q, k, v, table, lens, max_len, keys, scale, bool(causal), return_lse,
                       nthreads, compute, result, mods=mods)


def _attend_cpu(q, k, v, table, lens, max_len, keys, scale, causal, return_lse, nthreads,
                compute, result, pools_ready=False, tilings=None, mods=None):
    # The CPU call on validated operands (see paged_attention): q (B, H, T, E), pools
    # (N, H_kv, bs, E | Ev), table and lens intp C-contiguous with every entry the kernel
    # reads checked, max_len and keys the largest and summed lengths. PagedKVCache calls
    # this directly with the table it built (and validated) once for all its layers,
    # with pools_ready when the pools are C-contiguous in a dtype the kernel reads as is,
    # and with a dict `tilings` kept with that table: the tiling of a call depends only
    # on the shapes, the table and the threads, so the layers of a step share it.
    # mods: the PagedPlan keywords of the score modifiers (window, softcap, slopes).
    B, H, T, E = q.shape
    Ev = v.shape[3]
    # half results are computed in float32 and narrowed by the kernel
    out = np.empty((B, H, T, Ev), dtype=result if result in HALF else compute)
    lse = np.empty((B, H, T), dtype=compute) if return_lse else None
    if out.size:
        q = as_kernel_array(q, compute)
        # blocks are read in place, half pools too (widened piece by piece in the kernel,
        # whatever the query's dtype); only another dtype or a layout BLAS cannot take
        # is converted
        if not pools_ready:
            (k, _), (v, _) = (as_matrix_stack(a, a.dtype if a.dtype in HALF else compute)
                              for a in (k, v))
        key = (q.shape, k.shape, v.shape, k.dtype, v.dtype, nthreads)
        tiling = None if tilings is None else tilings.get(key)
        if tiling is None:
            tiling = _tiling(B, H, T, E, k.shape[1], k.shape[2], Ev, k.itemsize, v.itemsize,
                             max_len, keys, nthreads)
            if tilings is not None:
                tilings[key] = tiling
        plan = _paged.PagedPlan(q, k, v, table, lens, out, lse, T=T, scale=scale,
                                causal=causal, **tiling, **(mods or {}))
        with _threads.kernel_blas(tiling["use_blas"]):
            _paged.paged_attention(plan)
    elif lse is not None:
        lse.fill(-np.inf)
    return (out, lse) if return_lse else out


# scaled_dot_product_attention's decode path: this module's kernel, the keys and values
# read in place in blocks of CONTIGUOUS_BLOCK rows (no table), instead of the dense
# kernel's query-block tiles, when
#   - G > 1 query heads share each key/value head (GQA, MQA) and G * L <= SPLIT_KV_ROWS:
#     the keys and values are read once per kv-head instead of once per query head;
#     measured 1.3-2x faster than the dense kernel from G * L = 2 to 64, S = 4 to 4096,
#     and 3x at B=8, H=32, H_kv=8, L=1, S=4096, E=128 (float32, one thread, CPU time);
#   - or G == 1, L <= SPLIT_KV_MHA_ROWS and S >= SPLIT_KV_MHA_KEYS: 1.1-1.3x from L = 2
#     (at L = 32 the dense kernel is 1.15x faster; at S < 256 the two are level); at L = 1
#     only for operands that are not float32 (float64, float16, bfloat16: 1.4-1.8x), as
#     the dense kernel's float32 key tiles (AVX-512) are 1.2-1.4x faster than the
#     small-GEMM loops on one row.
SPLIT_KV_ROWS = 64
SPLIT_KV_MHA_ROWS = 16
SPLIT_KV_MHA_KEYS = 256
CONTIGUOUS_BLOCK = 32


def kv_group(ops):
    """Query heads (consecutive entries of the batch's last axis) that share one key and
    value matrix: the grouped-query group, or every head when the keys and values have a
    single head broadcast over the query's; 1 otherwise or without a head axis."""
    if ops.group > 1:
        return ops.group
    if not ops.batch_shape or ops.batch_shape[-1] == 1:
        return 1
    heads = [a.shape[-3] if a.ndim >= 3 else 1 for a in (ops.k, ops.v)]
    return ops.batch_shape[-1] if heads == [1, 1] else 1


def takes_split_kv(ops):
    """Whether scaled_dot_product_attention's validated call ``ops`` (without dropout)
    runs on the split-KV kernel: few query rows per kv-head against many keys."""
    group = kv_group(ops)
    if group > 1:
        return group * ops.L <= SPLIT_KV_ROWS
    if ops.L == 1 and ops.storage == np.float32:
        return False
    return ops.L <= SPLIT_KV_MHA_ROWS and ops.S >= SPLIT_KV_MHA_KEYS


def sdpa_split_kv(ops, res, lse, scale, causal, causal_offset, nthreads, mods):
    """scaled_dot_product_attention on the split-KV kernel (see ``takes_split_kv``):
    ``res`` (the result, ``ops.out_shape`` in ``ops.storage``) and ``lse`` (C order or
    None) are filled. ``ops`` has ``nbatch``, ``L``, ``S`` and ``Ev`` all positive;
    ``causal_offset`` is the diagonal's (0: top-left, ``S - L``: bottom-right); ``mods``
    the call's ScoreModifiers (slopes one per batch entry)."""
    L, S, E, Ev = ops.L, ops.S, ops.E, ops.Ev
    batch_shape, compute = ops.batch_shape, ops.compute
    q = ops.q
    if q.shape[:-2] != batch_shape:
        q = np.broadcast_to(q, batch_shape + (L, E))
    q = as_kernel_array(q, compute)
    # keys and values read in place: half ones as they are, others in the compute type
    (k, ldk), (v, ldv) = (as_matrix_stack(a, a.dtype if a.dtype in HALF else compute)
                          for a in (ops.k, ops.v))
    # kv-heads whose rows interleave (a (B, S, H_kv, E) array viewed as (B, H_kv, S, E)):
    # tiles of several kv-heads, as for a paged pool, read each run of rows once
    interleaved = k.ndim >= 3 and k.shape[-3] > 1 and abs(k.strides[-3]) < k.strides[-2]
    layout = _split_layout if ops.nbatch <= CACHED_OFFSETS else _split_layout.__wrapped__
    k_off, v_off, lens, tiling = layout(
        batch_shape, ops.group, kv_group(ops), L, S, E, Ev, k.shape[:-2], k.strides[:-2],
        k.itemsize, v.shape[:-2], v.strides[:-2], v.itemsize, nthreads, interleaved)
    nouter = lens.shape[0]
    out = res if res.flags.c_contiguous else np.empty(res.shape, res.dtype)
    mask = None if ops.mask is None else MaskOperand(ops.mask, compute, batch_shape)
    H = ops.nbatch // nouter
    plan = _paged.PagedPlan(q.reshape(nouter, H, L, E), k, v, None, lens,
                            out.reshape(nouter, H, L, Ev),
                            None if lse is None else lse.reshape(nouter, H, L),
                            T=L, scale=scale, causal=bool(causal), **mods.plan_kwargs(),
                            rows=(k_off, v_off, ldk, ldv, min(CONTIGUOUS_BLOCK, S)),
                            mask=mask, diag_shift=causal_offset - (S - L), **tiling)
    with _threads.kernel_blas(tiling["use_blas"]):
        _paged.paged_attention(plan)
    if out is not res:
        res[...] = out


@functools.lru_cache(maxsize=64)
def _split_layout(batch_shape, group, G, L, S, E, Ev, k_lead, k_strides, kitem, v_lead,
                  v_strides, vitem, nthreads, interleaved):
    # What sdpa_split_kv's kernel call depends on only through the shapes, strides and
    # threads (kept for the next call of the same layout, a decode step's layers, when
    # the batch is small enough): the offsets of each kv-head's keys and values, the
    # sequences' lengths, the tiling.
    H = batch_shape[-1] if batch_shape else 1
    nkv, nouter = H // G, math.prod(batch_shape) // H
    axis = len(batch_shape) - 1 if group > 1 else None
    offsets = []
    for lead, strides, item in ((k_lead, k_strides, kitem), (v_lead, v_strides, vitem)):
        # the offsets of each group's first query head: those of its kv-head
        off = np.ascontiguousarray(layout_offsets(lead, strides, item, batch_shape, axis, group)
                                   .reshape(nouter, H)[:, ::G].reshape(-1))
        off.flags.writeable = False
        offsets.append(off)
    lens = np.full(nouter, S, dtype=np.intp)
    lens.flags.writeable = False
    bs = min(CONTIGUOUS_BLOCK, S)
    return (*offsets, lens, _tiling(nouter, H, L, E, nkv, bs, Ev, kitem, vitem, S, nouter * S,
                                    nthreads, paged=interleaved))


def _tiling(B, H, T, E, Hkv, bs, Ev, kitem, vitem, max_len, keys, nthreads, paged=True):
    # The PagedPlan keywords that cut one call into work items: tiles, key chunks and
    # splits, BLAS or not, prefetch distance and threads. Without `paged` (keys and
    # values in one run of rows per kv-head) a tile has one kv-head: there several would
    # read several runs at once instead of one (1.05-1.2x slower, B=8, H=32, H_kv=8,
    # S=4096, E=128, one thread); with `paged` (blocks, or rows of all kv-heads side by
    # side) one kv-head per tile would read each run in strided pieces (2.5x slower).
    rows = (H // Hkv) * T
    use_blas = rows > VECTOR_ROWS
    row_tile = min(rows, ROW_TILE)
    tile_heads = max(1, min(Hkv, ROW_TILE // rows)) if paged else 1
    chunk_blocks = max(1, KEYS_PER_CHUNK // bs)
    # work items: (sequence, group of tile_heads kv-heads, row tile); keys may be split too
    items = B * -(-Hkv // tile_heads) * -(-rows // row_tile)
    max_blocks = -(-max_len // bs)
    # threads the work pays for: flops, or for memory-bound decoding the bytes of the
    # keys and values streamed, whichever is more
    work = max(2.0 * H * T * keys * (E + Ev), float(Hkv * keys * (E * kitem + Ev * vitem)))
    nthreads = _threads.call_threads(nthreads, items * max(max_blocks, 1), work)
    # a few items that do not spread evenly over the threads (B=5 on 2): smaller groups
    # (fewer than 2 per thread: split_keys splits the keys instead)
    while tile_heads > 1 and items % nthreads and 2 * nthreads <= items < 4 * nthreads:
        tile_heads = -(-tile_heads // 2)
        items = B * -(-Hkv // tile_heads) * -(-rows // row_tile)
    nsplit, nthreads = _threads.split_keys(items, max_blocks, nthreads)
    # in pieces: one kv-head of one block (of the pools' dtype: twice as many half ones)
    prefetch = -(-PREFETCH_BYTES // (bs * max(E * kitem, Ev * vitem)))
    return dict(nkv=Hkv, tile_heads=tile_heads, row_tile=row_tile, chunk_blocks=chunk_blocks,
                nsplit=nsplit, use_blas=use_blas, prefetch=prefetch, nthreads=nthreads)


def _check_shapes(q, k, v):
    shapes = f"query {q.shape}, key_blocks {k.shape}, value_blocks {v.shape}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected query (B, H, T, E), key_blocks (num_blocks, H_kv, "
                         f"block_size, E) and value_blocks (num_blocks, H_kv, block_size, Ev); "
                         f"got {shapes}")
    B, H, T, E = q.shape
    N, Hkv, bs, Ek = k.shape
    if v.shape[:3] != (N, Hkv, bs):
        raise ValueError(f"key_blocks and value_blocks must agree on (num_blocks, H_kv, "
                         f"block_size): {shapes}")
    if Ek != E:
        raise ValueError(f"query and key_blocks must have the same head size E: {shapes}")
    if E == 0 or bs == 0 or Hkv == 0:
        raise ValueError(f"E, H_kv and block_size must be positive: {shapes}")
    if T == 0:
        raise ValueError(f"query needs T >= 1 new tokens per sequence: {shapes}")
    if H % Hkv:
        raise ValueError(f"the query heads H must be a multiple of the kv-heads H_kv: {shapes}")
    return B, H, T, E, Hkv, bs, v.shape[3]


def _check_table(block_table, seq_lens, B, num_blocks, bs):
    """The table and lengths as intp arrays, with every entry the kernel reads checked."""
    table, lens = np.asarray(block_table), np.asarray(seq_lens)
    for name, a in (("block_table", table), ("seq_lens", lens)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if table.ndim != 2 or table.shape[0] != B or lens.shape != (B,):
        raise ValueError(f"expected block_table (B={B}, max_blocks) and seq_lens ({B},), got "
                         f"block_table {table.shape} and seq_lens {lens.shape}")
    capacity = table.shape[1] * bs
    if lens.size and (lens.min() < 0 or lens.max() > capacity):
        raise ValueError(f"seq_lens must lie in [0, {capacity}] (block_table {table.shape} "
                         f"of blocks of {bs}), got min {lens.min()}, max {lens.max()}")
    table = as_kernel_array(table, np.intp)
    lens = as_kernel_array(lens, np.intp)
    used = np.arange(table.shape[1]) < -(-lens[:, None] // bs)
    ids = table[used]
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        bad = ids[(ids < 0) | (ids >= num_blocks)][0]
        raise ValueError(f"block_table holds block id {bad} in a used entry; valid ids are "
                         f"0..{num_blocks - 1} (block_table {table.shape})")
    return table, lens


# Re-exported; imported last because kv_cache imports paged_attention from here.
from fastattn.kv_cache import PagedKVCache  # noqa: E402
