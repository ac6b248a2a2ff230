"""The paged key/value cache: block pools, per-sequence block tables, copy-on-write.

:class:`PagedKVCache` owns the pools and the bookkeeping that
:func:`fastattn.paged_attention` reads; it is re-exported from
:mod:`fastattn.paged` and :mod:`fastattn`.
"""
import numpy as np

from fastattn import _npu
from fastattn._validation import BFLOAT16, CPU_AND_NPU, check_device, check_int, promoted_dtype
from fastattn.paged import paged_attention

__all__ = ["PagedKVCache"]

# dtypes of the pools of a cache on the CPU
_HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16)


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
        float32 (the default), float64, float16 or bfloat16 (:data:`fastattn.bfloat16`
        or ``"bfloat16"``) on the CPU; float16 (the default) or bfloat16 on an NPU.
        Half pools take half the memory of float32 ones, and
        :func:`paged_attention` reads them as they are (widened to float32 block by
        block), so decoding over them reads half the bytes.
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
            if dtype not in _HOST_DTYPES:
                raise TypeError(f"dtype must be float32, float64, float16 or bfloat16 for a "
                                f"cache on the CPU, got {dtype}")
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
        """The key pool ``(num_blocks, num_kv_heads, block_size, head_dim)``, read-only."""
        return self._live_pools().key_view

    @property
    def value_blocks(self):
        """The value pool ``(num_blocks, num_kv_heads, block_size, value_dim)``, read-only."""
        return self._live_pools().value_view

    @property
    def num_free_blocks(self):
        """Blocks not used by any sequence."""
        return len(self._free)

    def close(self):
        """Give the pools' memory back (device memory at once); idempotent.

        Examples
        --------
        >>> from fastattn import PagedKVCache
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
        >>> from fastattn import PagedKVCache
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
        >>> from fastattn import PagedKVCache
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
            Host arrays of real numbers (float16/32/64, bfloat16 or integers),
            converted to the cache's dtype, which never changes: float64 keys are
            rounded (to nearest) into a float16 or bfloat16 cache, and values beyond
            float16's range (65504) become ``inf`` there. On an NPU each block the
            tokens fall into gets one host-to-device copy per pool.

        Raises
        ------
        MemoryError
            When the free blocks do not suffice; the cache is left unchanged.
        TypeError
            For keys or values that are not real numbers (complex, bool, ...).

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> cache.length(s), cache.num_free_blocks
        (3, 2)

        A float16 cache stores float64 keys rounded to float16:

        >>> half = PagedKVCache(4, 2, 1, 3, dtype=np.float16)
        >>> s = half.add_sequence()
        >>> half.append(s, np.full((1, 1, 3), 0.1), np.ones((1, 1, 3)))
        >>> half.key_blocks.dtype, float(half.key_blocks[0, 0, 0, 0])
        (dtype('float16'), 0.0999755859375)
        """
        blocks, length = self._seq(seq_id)
        pools = self._live_pools()
        N, Hkv, bs, E = self._key_shape
        Ev = self._value_dim
        key, value = np.asarray(key), np.asarray(value)
        # real numbers of any dtype, converted to the pools' (host or NPU) dtype on writing
        promoted_dtype(key, value, names=("key", "value"))
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
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
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
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
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
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
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
        ``.to_numpy()`` for that). A CPU cache does not run on the NPU either:
        ``device="npu"`` raises ``TypeError`` (float32/float64 pools are dtypes the
        NPU operator does not take, half pools would be uploaded whole on every
        call); create the cache with ``device="npu"``.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.arange(9.0).reshape(1, 3, 3))
        >>> cache.attention(np.ones((1, 1, 1, 3)), [s])   # equal scores: the mean value
        array([[[[3., 4., 5.]]]])
        """
        device = self.device if device is None else device
        if self.device == "cpu" and check_device(device, CPU_AND_NPU) == "npu":
            dtype = self.key_blocks.dtype
            why = ("would be uploaded whole on every call" if dtype in (np.float16, BFLOAT16)
                   else "are a dtype the NPU's paged attention does not take (float16 or "
                        "bfloat16 only)")
            raise TypeError(f"this PagedKVCache holds {dtype} pools on the CPU, which "
                            f"{why}; create the cache with device={device!r}")
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
