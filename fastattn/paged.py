"""Decoding with a paged KV cache: the cache and the attention over it.

The keys and values of every sequence live in two preallocated pools of fixed-size
blocks (vLLM's paged attention; Ascend's ``IncreFlashAttentionV4`` takes the same
layout). A sequence is a list of block ids, so it grows without copying and
sequences can share blocks (``fork``, copy-on-write).
"""
import contextlib

import numpy as np

from fastattn import _npu, _threads
from fastattn._kernels import paged as _paged
from fastattn._layout import as_matrix_stack
from fastattn._validation import CPU_AND_NPU, check_device, check_int, check_scale, result_dtypes

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
                    causal=True, return_lse=False, num_threads=None, device="cpu"):
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

    Returns
    -------
    out : ndarray or ascend.DeviceArray, shape (B, H, T, Ev)
        NumPy dtype promotion of the inputs, as for
        :func:`fastattn.scaled_dot_product_attention`; on the NPU the inputs'
        dtype, and a DeviceArray when the query is one.
    lse : ndarray, shape (B, H, T)
        Only with ``return_lse=True``, in the compute dtype.

    Raises
    ------
    TypeError
        For non-real inputs, a block table or lengths that are not integers, or
        DeviceArray inputs with ``device="cpu"``.
    ValueError
        For shapes that do not match, ``T == 0``, block ids out of range, lengths
        beyond the table's capacity or negative, or an unknown ``device``.

    See Also
    --------
    PagedKVCache : owns the pools and the tables; ``PagedKVCache.attention`` calls this.

    Notes
    -----
    A row that sees no key (``seq_lens[b] == 0``, or a causal row before the
    first key) gives zeros and an lse of ``-inf``. Keep the pools in the query's
    dtype: otherwise NumPy promotion converts the whole pools on every call.
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
    names = ("query", "key_blocks", "value_blocks")
    if kind == "npu":
        # DeviceArrays (a resident cache or query) stay on the device; the operator
        # checks their dtypes
        q, k, v = (a if _npu.is_device_array(a) else np.asarray(a)
                   for a in (query, key_blocks, value_blocks))
        if not _npu.any_device_array(q, k, v):
            result_dtypes(q, k, v, names=names)
    else:
        try:
            q, k, v = (np.asarray(a) for a in (query, key_blocks, value_blocks))
        except TypeError:   # a DeviceArray refuses conversion; say what to do instead
            _npu.reject_device_arrays(**dict(zip(names, (query, key_blocks, value_blocks))))
            raise
        compute, result = result_dtypes(q, k, v, names=names)
    B, H, T, E, Hkv, bs, Ev = _check_shapes(q, k, v)
    table, lens = _check_table(block_table, seq_lens, B, k.shape[0], bs)
    scale = check_scale(scale, E)
    if kind == "npu":
        return _npu.paged_attention(q, k, v, table, lens, scale=scale, causal=causal,
                                    return_lse=return_lse, device=device)
    nthreads = _threads.resolve_num_threads(num_threads)

    out = np.empty((B, H, T, Ev), dtype=compute)
    lse = np.empty((B, H, T), dtype=compute) if return_lse else None
    if out.size:
        q = np.ascontiguousarray(q, dtype=compute)
        # blocks are read in place; only a layout BLAS cannot take is copied
        (k, _), (v, _) = as_matrix_stack(k, compute), as_matrix_stack(v, compute)
        rows = (H // Hkv) * T
        use_blas = rows > VECTOR_ROWS
        row_tile = min(rows, ROW_TILE)
        tile_heads = max(1, min(Hkv, ROW_TILE // rows))
        chunk_blocks = max(1, KEYS_PER_CHUNK // bs)
        # work items: (sequence, group of tile_heads kv-heads, row tile); keys may be split too
        items = B * -(-Hkv // tile_heads) * -(-rows // row_tile)
        max_blocks = -(-int(lens.max(initial=0)) // bs)
        # threads the work pays for: flops, or for memory-bound decoding the bytes of the
        # keys and values streamed, whichever is more
        keys = int(lens.sum())
        work = max(2.0 * H * T * keys * (E + Ev), float(Hkv * keys * (E + Ev) * q.itemsize))
        nthreads = _threads.call_threads(nthreads, items * max(max_blocks, 1), work)
        # a few items that do not spread evenly over the threads (B=5 on 2): smaller groups
        # (fewer than 2 per thread: split_keys splits the keys instead)
        while tile_heads > 1 and items % nthreads and 2 * nthreads <= items < 4 * nthreads:
            tile_heads = -(-tile_heads // 2)
            items = B * -(-Hkv // tile_heads) * -(-rows // row_tile)
        nsplit, nthreads = _threads.split_keys(items, max_blocks, nthreads)
        # in pieces: one kv-head of one block
        prefetch = -(-PREFETCH_BYTES // (bs * max(E, Ev) * q.itemsize))
        plan = _paged.PagedPlan(q, k, v, table, lens, out, lse, nkv=Hkv, T=T, scale=scale,
                                causal=bool(causal), tile_heads=tile_heads, row_tile=row_tile,
                                chunk_blocks=chunk_blocks, nsplit=nsplit, use_blas=use_blas,
                                prefetch=prefetch, nthreads=nthreads)
        with _threads.kernel_blas(use_blas):
            _paged.paged_attention(plan)
    elif lse is not None:
        lse.fill(-np.inf)
    if result != compute:
        out = out.astype(result)
    return (out, lse) if return_lse else out


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
    table = np.ascontiguousarray(table, dtype=np.intp)
    lens = np.ascontiguousarray(lens, dtype=np.intp)
    used = np.arange(table.shape[1]) < -(-lens[:, None] // bs)
    ids = table[used]
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        bad = ids[(ids < 0) | (ids >= num_blocks)][0]
        raise ValueError(f"block_table holds block id {bad} in a used entry; valid ids are "
                         f"0..{num_blocks - 1} (block_table {table.shape})")
    return table, lens


class PagedKVCache:
    """A paged key/value cache: block pools, per-sequence block tables, copy-on-write.

    Parameters
    ----------
    num_blocks : int
        Blocks in each pool; the cache holds ``num_blocks * block_size`` tokens in all.
    block_size : int
        Tokens per block.
    num_kv_heads : int
    head_dim : int
        Size E of a key.
    dtype : dtype or str, optional
        float32 (the default) or float64 on the CPU; float16 (the default) or
        ``"bfloat16"`` on an NPU.
    value_dim : int, optional
        Size Ev of a value; default ``head_dim`` (on an NPU it must equal ``head_dim``).
    device : {"cpu", "npu", "npu:N"}, default="cpu"
        Where the pools live. On an NPU they are allocated (zeroed) once as
        ``ascend.DeviceArray`` objects; ``append`` uploads only the new tokens,
        copy-on-write copies a block on the device, and :meth:`attention` runs
        there without moving the pools. ``block_size`` must be a multiple of 16
        in [16, 512] and ``head_dim`` at most 512 (the limits of Ascend's paged
        attention operator, checked before anything is allocated).

    Attributes
    ----------
    key_blocks : ndarray or ascend.DeviceArray, shape (num_blocks, num_kv_heads, block_size, head_dim)
    value_blocks : ndarray or ascend.DeviceArray, shape (num_blocks, num_kv_heads, block_size, value_dim)
        The pools, as read-only views. On an NPU they are read-only
        ``ascend.DeviceArray`` views, still in device memory: ``.to_numpy()``
        copies one to the host; freeing a view frees nothing.
    device : str
        ``"cpu"`` or ``"npu:N"``.
    num_free_blocks : int
        Blocks not used by any sequence.

    See Also
    --------
    paged_attention

    Notes
    -----
    ``fork`` shares all the blocks of a sequence. Full blocks are never written
    again; a shared, partly filled last block is copied when either sequence
    appends to it (copy-on-write). ``append`` of one token is O(1) and never
    reallocates. When the free blocks do not suffice, ``append`` raises
    ``MemoryError`` and leaves the cache unchanged (as it does when a device
    copy fails).

    The bookkeeping (block tables, lengths, free list, reference counts) is on
    the host for every device. The pools are allocated once: ``free`` only
    returns blocks to the cache. :meth:`close` (or leaving a ``with`` block, or
    garbage collection of the cache and its views) gives the memory back; after
    it ``append``, ``attention`` and the pools raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np
    >>> import fastattn
    >>> cache = fastattn.PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    >>> rng = np.random.default_rng(0)
    >>> seq = cache.add_sequence()
    >>> cache.append(seq, rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 6, 8)))
    >>> cache.length(seq), cache.num_free_blocks
    (6, 6)
    >>> beam = cache.fork(seq)                  # shares both blocks
    >>> cache.append(beam, np.ones((2, 1, 8)), np.ones((2, 1, 8)))  # copies the last one
    >>> cache.num_free_blocks
    5
    >>> table, lens = cache.block_table([seq, beam])
    >>> table.shape, lens.tolist()
    ((2, 2), [6, 7])
    >>> out = cache.attention(rng.standard_normal((2, 4, 1, 8), dtype=np.float32), [seq, beam])
    >>> out.shape
    (2, 4, 1, 8)

    With an Ascend NPU (``fastattn.devices()`` lists ``"npu:0"``), the same
    calls keep the pools in device memory:

    >>> if fastattn.devices()[1:]:
    ...     with fastattn.PagedKVCache(8, 16, 2, 8, device="npu") as npu_cache:
    ...         s = npu_cache.add_sequence()
    ...         npu_cache.append(s, np.ones((2, 3, 8)), np.ones((2, 3, 8)))
    ...         q = np.ones((1, 4, 1, 8), np.float16)
    ...         print(npu_cache.attention(q, [s]).shape, npu_cache.key_blocks.dtype)
    ... else:
    ...     print((1, 4, 1, 8), "float16")
    (1, 4, 1, 8) float16
    """

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, *, dtype=None,
                 value_dim=None, device="cpu"):
        num_blocks = check_int("num_blocks", num_blocks, 0)
        block_size = check_int("block_size", block_size, 1)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, 1)
        head_dim = check_int("head_dim", head_dim, 1)
        value_dim = head_dim if value_dim is None else check_int("value_dim", value_dim, 1)
        key_shape = (num_blocks, num_kv_heads, block_size, head_dim)
        value_shape = (num_blocks, num_kv_heads, block_size, value_dim)
        if check_device(device, CPU_AND_NPU) == "npu":
            name = dtype if dtype in (None, "bfloat16") else np.dtype(dtype).name
            if name not in (None, "float16", "bfloat16"):
                raise TypeError(f"dtype must be float16 or bfloat16 for a cache on the NPU (its "
                                f"paged attention operator takes no other), got {name}")
            if value_dim != head_dim:
                raise ValueError(f"value_dim must equal head_dim for a cache on the NPU (its "
                                 f"operator takes one shape for keys and values), got "
                                 f"value_dim={value_dim}, head_dim={head_dim}")
            self._pools = _npu.DevicePools(key_shape, value_shape, name or "float16", device)
        else:
            dtype = np.dtype(np.float32 if dtype is None else dtype)
            if dtype not in (np.float32, np.float64):
                raise TypeError(f"dtype must be float32 or float64, got {dtype}")
            self._pools = _HostPools(key_shape, value_shape, dtype)
        self.device = self._pools.device
        self.block_size = block_size
        self._key_shape, self._value_dim = key_shape, value_dim
        # blocks handed out from the end of the free list; refs[i] = sequences using block i
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._seqs = {}              # seq_id -> [block ids, length]
        self._next_id = 0

    @property
    def key_blocks(self):
        return self._live_pools().key_view

    @property
    def value_blocks(self):
        return self._live_pools().value_view

    @property
    def num_free_blocks(self):
        return len(self._free)

    def close(self):
        """Give the pools' memory back (device memory at once); idempotent.

        Examples
        --------
        >>> with PagedKVCache(4, 16, 1, 8) as cache:
        ...     s = cache.add_sequence()
        >>> cache.key_blocks
        Traceback (most recent call last):
            ...
        ValueError: this PagedKVCache has been closed
        """
        pools, self._pools = self._pools, None
        if pools is not None:
            pools.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def add_sequence(self):
        """Start an empty sequence and return its id (no block is taken yet).

        Examples
        --------
        >>> cache = PagedKVCache(4, 16, 1, 8)
        >>> cache.add_sequence(), cache.add_sequence()
        (0, 1)
        """
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = [[], 0]
        return seq_id

    def length(self, seq_id):
        """Number of tokens cached for a sequence.

        Examples
        --------
        >>> cache = PagedKVCache(4, 16, 1, 8)
        >>> cache.length(cache.add_sequence())
        0
        """
        return self._seq(seq_id)[1]

    def append(self, seq_id, key, value):
        """Append ``T >= 1`` tokens' keys and values to a sequence.

        Parameters
        ----------
        seq_id : int
        key : array_like, shape (num_kv_heads, T, head_dim)
        value : array_like, shape (num_kv_heads, T, value_dim)
            Host arrays, converted to the cache's dtype. On an NPU each block the
            tokens fall into gets one host-to-device copy per pool.

        Raises
        ------
        MemoryError
            When the free blocks do not suffice; the cache is left unchanged.

        Examples
        --------
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> cache.length(s), cache.num_free_blocks
        (3, 2)
        """
        blocks, length = self._seq(seq_id)
        pools = self._live_pools()
        N, Hkv, bs, E = self._key_shape
        Ev = self._value_dim
        key, value = np.asarray(key), np.asarray(value)
        result_dtypes(key, value, names=("key", "value"))
        if key.ndim != 3 or key.shape[0] != Hkv or key.shape[2] != E or key.shape[1] == 0 \
                or value.shape != (Hkv, key.shape[1], Ev):
            raise ValueError(f"expected key (num_kv_heads={Hkv}, T >= 1, head_dim={E}) and "
                             f"value ({Hkv}, T, value_dim={Ev}), got key {key.shape} and "
                             f"value {value.shape}")
        T = key.shape[1]

        # Count before touching anything, so a MemoryError leaves the cache as it was.
        copy_last = length % bs != 0 and self._refs[blocks[-1]] > 1
        needed = -(-(length + T) // bs) - len(blocks) + copy_last
        if needed > len(self._free):
            raise MemoryError(f"PagedKVCache: appending {T} tokens to sequence {seq_id} needs "
                              f"{needed} free blocks, {len(self._free)} of {N} are free")
        # The blocks _take() will hand out, in order. They are taken only once the data
        # is in place, so a failing device copy leaves the cache as it was, too.
        fresh = self._free[len(self._free) - needed:][::-1]
        grown = blocks[:len(blocks) - copy_last] + fresh
        if copy_last:
            # copy-on-write: the partly filled last block is shared with a fork
            pools.copy_block(fresh[0], blocks[-1])
        t = 0
        while t < T:
            pos = length + t
            blk, slot = grown[pos // bs], pos % bs
            n = min(bs - slot, T - t)
            pools.write(blk, slot, key[:, t:t + n], value[:, t:t + n])
            t += n
        for _ in fresh:
            self._take()
        if copy_last:
            self._refs[blocks[-1]] -= 1
        blocks[:] = grown
        self._seqs[seq_id][1] = length + T

    def fork(self, seq_id):
        """A new sequence sharing all of ``seq_id``'s tokens (copy-on-write).

        For beam search or a prompt shared by several continuations: no block is
        copied until one of the two appends to a shared, partly filled block.

        Examples
        --------
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> f = cache.fork(s)
        >>> cache.length(f), cache.num_free_blocks
        (3, 2)
        """
        blocks, length = self._seq(seq_id)
        for blk in blocks:
            self._refs[blk] += 1
        new_id = self.add_sequence()
        self._seqs[new_id] = [list(blocks), length]
        return new_id

    def free(self, seq_id):
        """Drop a sequence; blocks no other sequence uses become free.

        Examples
        --------
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> cache.free(s)
        >>> cache.num_free_blocks
        4
        """
        blocks, _ = self._seq(seq_id)
        del self._seqs[seq_id]
        for blk in reversed(blocks):
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)

    def block_table(self, seq_ids):
        """The block table and lengths of some sequences, for :func:`paged_attention`.

        Parameters
        ----------
        seq_ids : sequence of int

        Returns
        -------
        table : ndarray of int32, shape (B, max_blocks)
            Row ``b`` lists the blocks of ``seq_ids[b]``, padded with 0.
        lengths : ndarray of int32, shape (B,)

        Examples
        --------
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> a, b = cache.add_sequence(), cache.add_sequence()
        >>> cache.append(a, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> cache.block_table([a, b])
        (array([[0, 1],
               [0, 0]], dtype=int32), array([3, 0], dtype=int32))
        """
        seqs = [self._seq(s) for s in seq_ids]
        width = max((len(blocks) for blocks, _ in seqs), default=0)
        table = np.zeros((len(seqs), width), dtype=np.int32)
        for row, (blocks, _) in zip(table, seqs):
            row[:len(blocks)] = blocks
        lengths = np.array([length for _, length in seqs], dtype=np.int32)
        return table, lengths

    def attention(self, query, seq_ids, *, scale=None, causal=True, return_lse=False,
                  num_threads=None, device=None):
        """:func:`paged_attention` of ``query`` (B, H, T, E) over the sequences ``seq_ids``.

        Append the new tokens' keys and values first: with ``causal=True`` the
        last query row of each sequence then sees all its tokens, itself included.
        ``device`` defaults to the cache's. A cache on the NPU computes only there:
        ``device="cpu"`` raises ``TypeError`` (copy the pools to the host with
        ``.to_numpy()`` for that). A CPU cache cannot run on the NPU either: its
        float32/float64 pools are dtypes the NPU operator does not take, so
        ``device="npu"`` raises ``TypeError``; create the cache with ``device="npu"``.

        Examples
        --------
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.arange(9.0).reshape(1, 3, 3))
        >>> cache.attention(np.ones((1, 1, 1, 3)), [s])   # equal scores: the mean value
        array([[[[3., 4., 5.]]]])
        """
        device = self.device if device is None else device
        if self.device == "cpu" and check_device(device, CPU_AND_NPU) == "npu":
            raise TypeError(f"this PagedKVCache holds {self.key_blocks.dtype} pools on the "
                            f"CPU, which the NPU's paged attention does not take (float16 or "
                            f"bfloat16 only); create the cache with device={device!r}")
        key_blocks, value_blocks = self.key_blocks, self.value_blocks
        table, lengths = self.block_table(seq_ids)
        return paged_attention(query, key_blocks, value_blocks, table, lengths, scale=scale,
                               causal=causal, return_lse=return_lse, num_threads=num_threads,
                               device=device)

    def _live_pools(self):
        if self._pools is None:
            raise ValueError("this PagedKVCache has been closed")
        return self._pools

    def _seq(self, seq_id):
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown sequence id {seq_id!r}") from None

    def _take(self):
        blk = self._free.pop()
        self._refs[blk] = 1
        return blk


class _HostPools:
    """The key and value block pools of a CPU ``PagedKVCache`` (see ``_npu.DevicePools``)."""

    device = "cpu"

    def __init__(self, key_shape, value_shape, dtype):
        self._keys = np.zeros(key_shape, dtype)
        self._values = np.zeros(value_shape, dtype)
        self.key_view, self.value_view = self._keys.view(), self._values.view()
        self.key_view.flags.writeable = False
        self.value_view.flags.writeable = False

    def write(self, block, slot, key, value):
        """Tokens ``slot, slot + 1, ...`` of ``block`` = ``key``/``value`` (H_kv, n, E)."""
        n = key.shape[1]
        self._keys[block, :, slot:slot + n] = key
        self._values[block, :, slot:slot + n] = value

    def copy_block(self, destination, source):
        self._keys[destination] = self._keys[source]
        self._values[destination] = self._values[source]

    def close(self):
        # the arrays go with their last reference (views handed out included)
        self._keys = self._values = self.key_view = self.value_view = None
