"""The paged key/value cache: block pools, per-sequence block tables, copy-on-write.

:class:`PagedKVCache` owns the pools and the bookkeeping that
:func:`fastattn.paged_attention` reads, for one attention layer or, with
``num_layers=``, for every layer of a model under one block table; it is
re-exported from :mod:`fastattn.paged` and :mod:`fastattn`.
"""
import operator

import numpy as np

from fastattn import _npu, _threads
from fastattn._validation import (BFLOAT16, CPU_AND_NPU, HALF, check_device, check_int,
                                  check_scale, promoted_dtype)
from fastattn.paged import _attend_cpu, paged_attention

__all__ = ["PagedKVCache", "KVSlots"]

# dtypes of the pools of a cache on the CPU
_HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16)
_FLOAT32 = np.dtype(np.float32)


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
    num_layers : int, optional
        A cache for a whole model: one pair of pools per layer, stacked as
        ``(num_layers, num_blocks, ...)``, under one block table. Sequences are
        added, forked, truncated and freed once for all layers, and a decoding
        step reserves its tokens once (:meth:`extend`) before each layer writes
        its keys and values (:meth:`write`) and attends (:meth:`attention` with
        ``layer=``). Default: one layer, with 4-D pools (CPU only for now:
        ``num_layers`` with ``device="npu"`` raises ``NotImplementedError``).
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
    key_blocks : ndarray or ascend.DeviceArray, shape ([num_layers,] num_blocks, num_kv_heads, block_size, head_dim)
    value_blocks : ndarray or ascend.DeviceArray, shape ([num_layers,] num_blocks, num_kv_heads, block_size, value_dim)
        The pools, as read-only views (``key_blocks[layer]`` is one layer's, the
        pool :func:`paged_attention` takes). On an NPU they are read-only
        ``ascend.DeviceArray`` views, still in device memory: ``.to_numpy()``
        copies one to the host; freeing a view frees nothing.
    num_layers : int or None
    block_size : int
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
    again while shared; a shared, partly filled last block is copied when either
    sequence appends to it (copy-on-write). ``truncate`` rolls a sequence back
    (rejected speculative tokens): blocks past the new length are released, and
    a kept block that is still shared is copied on the next append, so another
    sequence's tokens are never overwritten. ``append`` of one token is O(1) and
    never reallocates. When the free blocks do not suffice, ``append`` and
    ``extend`` raise ``MemoryError`` and leave the cache unchanged, for every
    sequence of the call (as ``append`` does when a device copy fails).

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
    >>> cache
    PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype=float32, device='cpu'; 2 sequences, 13 tokens, 5 of 8 blocks free)

    A cache for a 2-layer model: one block table, one decoding step reserved
    once and written layer by layer.

    >>> model = fastattn.PagedKVCache(8, 4, 2, 8, num_layers=2)
    >>> a, b = model.add_sequence(), model.add_sequence()
    >>> slots = model.extend([a, b], 1)             # one new token each, all layers
    >>> for layer in range(2):
    ...     k = v = rng.standard_normal((2, 2, 1, 8))  # (B, H_kv, T, E) of this layer
    ...     model.write(slots, k, v, layer=layer)
    ...     out = model.attention(np.ones((2, 4, 1, 8), np.float32), [a, b], layer=layer)
    >>> model.key_blocks.shape, out.shape
    ((2, 8, 2, 4, 8), (2, 4, 1, 8))

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

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, *, num_layers=None,
                 dtype=None, value_dim=None, device="cpu"):
        num_blocks = check_int("num_blocks", num_blocks, 0)
        block_size = check_int("block_size", block_size, 1)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, 1)
        head_dim = check_int("head_dim", head_dim, 1)
        value_dim = head_dim if value_dim is None else check_int("value_dim", value_dim, 1)
        layers = 1 if num_layers is None else check_int("num_layers", num_layers, 1)
        key_shape = (num_blocks, num_kv_heads, block_size, head_dim)
        value_shape = (num_blocks, num_kv_heads, block_size, value_dim)
        if check_device(device, CPU_AND_NPU) == "npu":
            if num_layers is not None:
                raise NotImplementedError(
                    "PagedKVCache(num_layers=...) keeps its pools on the CPU only: for an "
                    f"NPU create one cache per layer, PagedKVCache(..., device={device!r}), "
                    "and add, fork, truncate and free sequences in each")
            name = dtype if dtype in (None, "bfloat16") else np.dtype(dtype).name
            if name not in (None, "float16", "bfloat16"):
                raise TypeError(f"dtype must be float16 or bfloat16 for a cache on the NPU (its "
                                f"paged attention operator takes no other), got {name}")
            if value_dim != head_dim:
                raise ValueError(f"value_dim must equal head_dim for a cache on the NPU (its "
                                 f"operator takes one shape for keys and values), got "
                                 f"value_dim={value_dim}, head_dim={head_dim}")
            self._pools = _npu.DevicePools(key_shape, value_shape, name or "float16", device)
            self._dtype = BFLOAT16 if name == "bfloat16" else np.dtype(np.float16)
        else:
            dtype = np.dtype(np.float32 if dtype is None else dtype)
            if dtype not in _HOST_DTYPES:
                raise TypeError(f"dtype must be float32, float64, float16 or bfloat16 for a "
                                f"cache on the CPU, got {dtype}")
            self._pools = _HostPools(layers, key_shape, value_shape, dtype,
                                     layered=num_layers is not None)
            self._dtype = dtype
        self.device = self._pools.device
        self.block_size = block_size
        self.num_layers = num_layers
        self._key_shape, self._value_dim = key_shape, value_dim
        self._scale = check_scale(None, head_dim)
        # blocks handed out from the end of the free list; refs[i] = sequences using block i
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._seqs = {}              # seq_id -> [block ids, length]
        self._next_id = 0
        # bumped by every change of a table or a length: slots and cached tables of an
        # older version are stale
        self._version = 0
        self._table = None           # (version, seq_ids tuple, _Table) of the last call

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

    def __repr__(self):
        N, Hkv, bs, E = self._key_shape
        layers = "" if self.num_layers is None else f", num_layers={self.num_layers}"
        vdim = "" if self._value_dim == E else f", value_dim={self._value_dim}"
        head = (f"PagedKVCache(num_blocks={N}, block_size={bs}, num_kv_heads={Hkv}, "
                f"head_dim={E}{vdim}{layers}, dtype={self._dtype}, device={self.device!r}")
        if self._pools is None:
            return head + "; closed)"
        tokens = sum(length for _, length in self._seqs.values())
        n = len(self._seqs)
        return (f"{head}; {n} sequence{'' if n == 1 else 's'}, {tokens} tokens, "
                f"{len(self._free)} of {N} blocks free)")

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
        """Append tokens' keys and values to one sequence, or to several at once.

        Parameters
        ----------
        seq_id : int or sequence of int
            One sequence, or B distinct sequences (a ragged batch: each gets its
            own number of tokens, all in one call).
        key : array_like, shape ([num_layers,] num_kv_heads, T, head_dim), or a sequence of B of them
        value : array_like, shape ([num_layers,] num_kv_heads, T, value_dim), or a sequence of B of them
            ``T >= 1`` new tokens (``T >= 0`` per sequence in the batched form),
            for every layer of a ``num_layers`` cache (its leading axis). Host
            arrays of real numbers (float16/32/64, bfloat16 or integers),
            converted to the cache's dtype, which never changes: float64 keys are
            rounded (to nearest) into a float16 or bfloat16 cache, and values
            beyond float16's range (65504) become ``inf`` there. On an NPU each
            block the tokens fall into gets one host-to-device copy per pool.

        Raises
        ------
        MemoryError
            When the free blocks do not suffice for all the sequences of the call;
            nothing is appended to any of them.
        TypeError
            For keys or values that are not real numbers (complex, bool, ...).
        ValueError
            For unknown or repeated sequence ids, or shapes that do not match the
            cache (nothing is appended).

        See Also
        --------
        extend, write : a decoding step of a model, layer by layer.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> cache.length(s), cache.num_free_blocks
        (3, 2)

        A ragged batch, all or nothing:

        >>> t = cache.add_sequence()
        >>> cache.append([s, t], [np.ones((1, 1, 3)), np.ones((1, 5, 3))],
        ...              [np.ones((1, 1, 3)), np.ones((1, 5, 3))])
        Traceback (most recent call last):
            ...
        MemoryError: PagedKVCache: appending 1, 5 tokens to sequences 0, 1 needs 3 free blocks, 2 of 4 are free
        >>> cache.length(s), cache.length(t)
        (3, 0)

        A float16 cache stores float64 keys rounded to float16:

        >>> half = PagedKVCache(4, 2, 1, 3, dtype=np.float16)
        >>> s = half.add_sequence()
        >>> half.append(s, np.full((1, 1, 3), 0.1), np.ones((1, 1, 3)))
        >>> half.key_blocks.dtype, float(half.key_blocks[0, 0, 0, 0])
        (dtype('float16'), 0.0999755859375)
        """
        try:
            seq_ids, keys, values, single = [operator.index(seq_id)], [key], [value], True
        except TypeError:
            seq_ids, keys, values, single = list(seq_id), key, value, False
        for s in seq_ids:
            self._seq(s)
        pools = self._live_pools()
        if not single and (len(keys) != len(seq_ids) or len(values) != len(seq_ids)):
            raise ValueError(f"append to {len(seq_ids)} sequences takes {len(seq_ids)} keys and "
                             f"values (one array each), got {len(keys)} and {len(values)}")
        tokens = [self._tokens(k, v, single) for k, v in zip(keys, values)]
        growth = self._plan(seq_ids, [k.shape[-2] for k, _ in tokens])
        # The data goes in before the bookkeeping changes: a failing device copy leaves the
        # cache as it was, too (the blocks written are still free, the slots past lengths).
        self._copy_shared(pools, growth)
        for b, t, blk, slot, n in _block_runs(growth, self.block_size):
            k, v = tokens[b]
            pools.write(blk, slot, k[..., t:t + n, :], v[..., t:t + n, :])
        self._commit(growth)

    def extend(self, seq_ids, num_tokens=1):
        """Reserve room for new tokens of several sequences, in every layer at once.

        The first half of a decoding (or prefill) step of a model: the block
        table grows once, for all layers; then each layer stores its keys and
        values with :meth:`write` and attends with :meth:`attention`. The new
        tokens count in :meth:`length` at once; until a layer writes them, that
        layer holds whatever its slots held before.

        Parameters
        ----------
        seq_ids : sequence of int
            B distinct sequences.
        num_tokens : int or sequence of int, default=1
            New tokens per sequence (>= 0), the same for all or one each.

        Returns
        -------
        KVSlots
            Where the new tokens go; pass it to :meth:`write` (and to
            :meth:`attention` in place of ``seq_ids``). It is valid until the
            cache's tables next change (``extend``, ``append``, ``fork``,
            ``truncate``, ``free``).

        Raises
        ------
        MemoryError
            When the free blocks do not suffice; nothing is reserved for any
            sequence.
        ValueError
            For unknown or repeated sequence ids, or negative counts.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
        >>> cache = PagedKVCache(8, 4, 1, 2, num_layers=3)
        >>> a, b = cache.add_sequence(), cache.add_sequence()
        >>> slots = cache.extend([a, b], [5, 2])
        >>> slots
        KVSlots(seq_ids=(0, 1), num_tokens=(5, 2))
        >>> cache.length(a), cache.num_free_blocks
        (5, 5)
        >>> for layer in range(3):
        ...     cache.write(slots, [np.ones((1, 5, 2)), np.ones((1, 2, 2))],
        ...                 [np.ones((1, 5, 2)), np.ones((1, 2, 2))], layer=layer)
        """
        try:
            seq_ids = [operator.index(s) for s in seq_ids]
        except TypeError:
            raise TypeError(f"seq_ids must be a sequence of int sequence ids, got "
                            f"{seq_ids!r}") from None
        try:
            counts = [operator.index(num_tokens)] * len(seq_ids)
        except TypeError:
            counts = [operator.index(n) for n in num_tokens]
        if len(counts) != len(seq_ids) or any(n < 0 for n in counts):
            raise ValueError(f"num_tokens must be one count >= 0, or one per sequence "
                             f"({len(seq_ids)}), got {num_tokens!r}")
        pools = self._live_pools()
        growth = self._plan(seq_ids, counts)
        self._copy_shared(pools, growth)
        self._commit(growth)
        return KVSlots(self, growth)

    def write(self, slots, key, value, *, layer=None):
        """Store one layer's keys and values of the tokens :meth:`extend` reserved.

        Parameters
        ----------
        slots : KVSlots
            The result of :meth:`extend`, still current.
        key : array_like, shape (B, num_kv_heads, T, head_dim), or a sequence of B arrays (num_kv_heads, T_b, head_dim)
        value : array_like, shape (B, num_kv_heads, T, value_dim), or a sequence of B arrays (num_kv_heads, T_b, value_dim)
            The new tokens of the ``slots``' sequences, in their order; one array
            when every sequence got the same number of tokens. Converted to the
            cache's dtype as in :meth:`append`.
        layer : int, optional
            Which layer of a ``num_layers`` cache (required there); a one-layer
            cache takes None or 0.

        Raises
        ------
        ValueError
            For stale slots (the tables changed since :meth:`extend`), a layer out
            of range, or shapes that do not match the slots.
        TypeError
            For slots that are not this cache's, or keys that are not real numbers.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
        >>> cache = PagedKVCache(4, 4, 2, 8, num_layers=2)
        >>> s = cache.add_sequence()
        >>> slots = cache.extend([s], 3)
        >>> cache.write(slots, np.ones((1, 2, 3, 8)), np.ones((1, 2, 3, 8)), layer=1)
        >>> float(cache.key_blocks[1, 0, :, :3].sum()), float(cache.key_blocks[0].sum())
        (48.0, 0.0)
        """
        pools = self._live_pools()
        index = self._layer(layer)
        if not isinstance(slots, KVSlots) or slots._cache is not self:
            raise TypeError(f"slots must be the KVSlots that this cache's extend() returned, "
                            f"got {type(slots).__name__}")
        slots._check_current()
        k, v = slots._gather(key, value)
        if pools.device == "cpu":
            krows, vrows = pools.rows[index]
            rows = slots._rows()
            krows[rows] = k
            vrows[rows] = v
        else:
            # an NPU cache (one layer): one copy per block and pool, as append does
            for b, t, blk, slot, n in _block_runs(slots._growth, self.block_size):
                pools.write(blk, slot, k[b][:, t:t + n], v[b][:, t:t + n])

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
        self._version += 1
        return new_id

    def truncate(self, seq_id, length):
        """Roll a sequence back to its first ``length`` tokens (in every layer).

        For speculative decoding: append the draft tokens, score them, then
        truncate to the accepted ones. Blocks past the new length are released
        (freed once no other sequence uses them). A kept, partly filled block that
        a fork still shares is not written again: the next append copies it first
        (copy-on-write), so every ``0 <= length <= self.length(seq_id)`` is
        honoured without touching another sequence's tokens.

        Parameters
        ----------
        seq_id : int
        length : int
            ``0 <= length <= self.length(seq_id)``.

        Raises
        ------
        ValueError
            For an unknown sequence or a length outside that range; the cache is
            left unchanged.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 3)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((1, 3, 3)), np.ones((1, 3, 3)))
        >>> draft = np.full((1, 4, 3), 2.0)
        >>> cache.append(s, draft, draft)                 # 4 speculative tokens
        >>> cache.length(s), cache.num_free_blocks
        (7, 0)
        >>> cache.truncate(s, 4)                          # 1 of them accepted
        >>> cache.length(s), cache.num_free_blocks
        (4, 2)
        >>> cache.truncate(s, 5)
        Traceback (most recent call last):
            ...
        ValueError: cannot truncate sequence 0 to 5 tokens: it has 4 (truncate takes 0 <= length <= 4)
        """
        entry = self._seq(seq_id)
        blocks, current = entry
        try:
            length = operator.index(length)
        except TypeError:
            raise TypeError(f"length must be an int, got {type(length).__name__}") from None
        if not 0 <= length <= current:
            raise ValueError(f"cannot truncate sequence {seq_id} to {length} tokens: it has "
                             f"{current} (truncate takes 0 <= length <= {current})")
        keep = -(-length // self.block_size)
        for blk in reversed(blocks[keep:]):
            self._release(blk)
        del blocks[keep:]
        entry[1] = length
        self._version += 1

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
            self._release(blk)
        self._version += 1

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
        table = _Table([self._seq(s) for s in seq_ids])
        return table.table.astype(np.int32), table.lens.astype(np.int32)

    def attention(self, query, seq_ids, *, layer=None, scale=None, causal=True,
                  return_lse=False, num_threads=None, device=None):
        """:func:`paged_attention` of ``query`` (B, H, T, E) over the sequences ``seq_ids``.

        Append (or :meth:`write`) the new tokens' keys and values first: with
        ``causal=True`` the last query row of each sequence then sees all its
        tokens, itself included. ``seq_ids`` may be the ``KVSlots`` of the
        step. ``layer`` picks the layer of a ``num_layers`` cache (required
        there). The block table of ``seq_ids`` is built once and reused by every
        layer's call until the tables change.

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
        pools = self._live_pools()
        index = self._layer(layer)
        if isinstance(seq_ids, KVSlots):
            if seq_ids._cache is not self:
                raise TypeError("these KVSlots belong to another PagedKVCache")
            seq_ids._check_current()
            ids = seq_ids.seq_ids
        else:
            ids = tuple(seq_ids)
        if device is None:
            device = self.device
        elif self.device == "cpu" and check_device(device, CPU_AND_NPU) == "npu":
            dtype = self._dtype
            why = ("would be uploaded whole on every call" if dtype in (np.float16, BFLOAT16)
                   else "are a dtype the NPU's paged attention does not take (float16 or "
                        "bfloat16 only)")
            raise TypeError(f"this PagedKVCache holds {dtype} pools on the CPU, which "
                            f"{why}; create the cache with device={device!r}")
        table = self._table_of(ids)
        if self.device != "cpu":
            return paged_attention(query, pools.key_view, pools.value_view, table.table,
                                   table.lens, scale=scale, causal=causal,
                                   return_lse=return_lse, num_threads=num_threads,
                                   device=device)
        key_blocks, value_blocks = pools.layers[index]
        dtypes = self._query_dtypes(query, len(ids))
        if dtypes is None:
            # anything unusual (array-likes, other dtypes, wrong shapes): the public
            # function validates it and names the problem
            return paged_attention(query, key_blocks, value_blocks, table.table, table.lens,
                                   scale=scale, causal=causal, return_lse=return_lse,
                                   num_threads=num_threads)
        # the table is the cache's own (block ids and lengths valid by construction) and
        # the pools are C-contiguous in a dtype the kernel reads as they are
        return _attend_cpu(query, key_blocks, value_blocks, table.table, table.lens,
                           table.max_len, table.keys,
                           self._scale if scale is None else check_scale(scale, query.shape[3]),
                           bool(causal), return_lse, _threads.resolve_num_threads(num_threads),
                           *dtypes, pools_ready=True, tilings=table.tilings)

    # ---- internals ---------------------------------------------------------------------

    def _query_dtypes(self, q, B):
        # (compute, result) dtypes when q is an ndarray query (B, H, T, E) the kernel reads
        # with these pools without conversion, else None
        if type(q) is not np.ndarray or q.ndim != 4:
            return None
        _, Hkv, _, E = self._key_shape
        b, H, T, e = q.shape
        if b != B or e != E or T == 0 or H % Hkv:
            return None
        pool, dtype = self._dtype, q.dtype
        if dtype == pool:
            return (_FLOAT32, pool) if pool in HALF else (pool, pool)
        if dtype == _FLOAT32 and pool in HALF:
            return _FLOAT32, _FLOAT32
        return None

    def _layer(self, layer):
        # the index of `layer` in the pools
        if self.num_layers is None:
            if layer not in (None, 0):
                raise ValueError(f"this PagedKVCache has one layer (no num_layers): pass "
                                 f"layer=None or 0, got {layer!r}")
            return 0
        if layer is None:
            raise ValueError(f"this PagedKVCache holds {self.num_layers} layers: pass layer=0.."
                             f"{self.num_layers - 1}")
        try:
            index = operator.index(layer)
        except TypeError:
            raise TypeError(f"layer must be an int, got {type(layer).__name__}") from None
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer must lie in [0, {self.num_layers}), got {layer}")
        return index

    def _tokens(self, key, value, single):
        # key and value of one sequence's new tokens, checked against the cache
        key, value = np.asarray(key), np.asarray(value)
        # real numbers of any dtype, converted to the pools' (host or NPU) dtype on writing
        promoted_dtype(key, value, names=("key", "value"))
        _, Hkv, _, E = self._key_shape
        Ev = self._value_dim
        lead = () if self.num_layers is None else (self.num_layers,)
        T = key.shape[-2] if key.ndim >= 2 else 0
        if (key.shape != lead + (Hkv, T, E) or value.shape != lead + (Hkv, T, Ev)
                or (single and T == 0)):
            layers = "" if self.num_layers is None else f"num_layers={self.num_layers}, "
            least = "T >= 1" if single else "T >= 0"
            raise ValueError(f"expected key ({layers}num_kv_heads={Hkv}, {least}, head_dim={E}) "
                             f"and value ({layers}{Hkv}, T, value_dim={Ev}), got key "
                             f"{key.shape} and value {value.shape}")
        return key, value

    def _plan(self, seq_ids, counts):
        # How the sequences grow by counts[b] tokens each, changing nothing: _Growth.
        # Raises ValueError (repeated id) or MemoryError (too few free blocks) first.
        bs, refs, free = self.block_size, self._refs, self._free
        nfree = len(free)
        taken = 0
        drops = {}               # shared last blocks the growth stops using (copied)
        seqs = []
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"each sequence may appear once per call, got {seq_ids}")
        for seq, T in zip(seq_ids, counts):
            blocks, length = self._seq(seq)
            # copy-on-write: tokens go into a shared, partly filled last block
            shared = (T > 0 and length % bs != 0
                      and refs[blocks[-1]] - drops.get(blocks[-1], 0) > 1)
            n = -(-(length + T) // bs) - len(blocks) + shared
            grown = None
            if taken + n <= nfree:
                # the blocks _commit takes, in the order the free list hands them out
                fresh = free[nfree - taken - n:nfree - taken][::-1]
                grown = blocks[:len(blocks) - shared] + fresh
                if shared:
                    drops[blocks[-1]] = drops.get(blocks[-1], 0) + 1
                seqs.append((seq, grown, (fresh[0], blocks[-1]) if shared else None, length, T))
            taken += n
        if taken > nfree:
            what = ", ".join(map(str, counts))
            ids = ", ".join(map(str, seq_ids))
            plural = "s" if len(seq_ids) > 1 else ""
            raise MemoryError(f"PagedKVCache: appending {what} tokens to sequence{plural} {ids} "
                              f"needs {taken} free blocks, {nfree} of {len(refs)} are free")
        return _Growth(seq_ids, counts, seqs, taken, drops)

    def _copy_shared(self, pools, growth):
        # the copies of copy-on-write, every layer's, before anything is written
        for _, _, copy, _, _ in growth.seqs:
            if copy is not None:
                pools.copy_block(*copy)

    def _commit(self, growth):
        # the bookkeeping of a planned growth (after its data is in place)
        if growth.taken:
            fresh = self._free[len(self._free) - growth.taken:]
            del self._free[len(self._free) - growth.taken:]
            for blk in fresh:
                self._refs[blk] = 1
        for blk, n in growth.drops.items():
            self._refs[blk] -= n
        for seq, grown, _, start, T in growth.seqs:
            entry = self._seqs[seq]
            entry[0] = grown
            entry[1] = start + T
        self._version += 1

    def _release(self, blk):
        self._refs[blk] -= 1
        if self._refs[blk] == 0:
            self._free.append(blk)

    def _table_of(self, ids):
        # the _Table of a tuple of sequence ids, built once per version of the tables
        cached = self._table
        if cached is not None and cached[0] == self._version and cached[1] == ids:
            return cached[2]
        table = _Table([self._seq(s) for s in ids])
        self._table = (self._version, ids, table)
        return table

    def _live_pools(self):
        if self._pools is None:
            raise ValueError("this PagedKVCache has been closed")
        return self._pools

    def _seq(self, seq_id):
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown sequence id {seq_id!r}") from None


class KVSlots:
    """Where the tokens of one :meth:`PagedKVCache.extend` call go.

    Returned by ``extend``; pass it to :meth:`PagedKVCache.write` for each layer
    (and to :meth:`PagedKVCache.attention` in place of the sequence ids). It is
    valid until the cache's tables next change.

    Attributes
    ----------
    seq_ids : tuple of int
    num_tokens : tuple of int
        New tokens of each sequence.
    """

    def __init__(self, cache, growth):
        self._cache = cache
        self._version = cache._version
        self.seq_ids = growth.ids
        self.num_tokens = growth.counts
        self._growth = growth
        self._row_index = None

    def __repr__(self):
        return f"KVSlots(seq_ids={self.seq_ids}, num_tokens={self.num_tokens})"

    def _check_current(self):
        if self._version != self._cache._version:
            raise ValueError("these KVSlots are stale: the cache's tables changed since the "
                             "extend() that returned them (extend, append, fork, truncate or "
                             "free); write every layer before changing the cache, or extend "
                             "again")

    def _gather(self, key, value):
        # The new tokens' keys and values: for the host, (tokens, E) rows in the order of
        # _rows (sequence, kv-head, token); for an NPU, per-sequence (H_kv, T_b, E) arrays.
        cache = self._cache
        _, Hkv, _, E = cache._key_shape
        Ev = cache._value_dim
        B, counts = len(self.seq_ids), self.num_tokens
        if isinstance(key, np.ndarray) and isinstance(value, np.ndarray):
            # (with no sequence any T will do)
            T = counts[0] if counts else (key.shape[2] if key.ndim == 4 else 0)
            if (key.shape != (B, Hkv, T, E) or value.shape != (B, Hkv, T, Ev)
                    or counts.count(T) != B):
                raise ValueError(f"expected key (B={B}, num_kv_heads={Hkv}, T, head_dim={E}) and "
                                 f"value ({B}, {Hkv}, T, value_dim={Ev}) with T the tokens "
                                 f"extend() reserved for every sequence, {counts}, got key "
                                 f"{key.shape} and value {value.shape} (ragged counts take "
                                 f"one array per sequence)")
            pairs = None
        else:
            if len(key) != B or len(value) != B:
                raise ValueError(f"expected {B} keys and values (one per sequence), got "
                                 f"{len(key)} and {len(value)}")
            pairs = [(np.asarray(k), np.asarray(v)) for k, v in zip(key, value)]
            for (k, v), T in zip(pairs, counts):
                if k.shape != (Hkv, T, E) or v.shape != (Hkv, T, Ev):
                    raise ValueError(f"expected keys (num_kv_heads={Hkv}, T_b, head_dim={E}) "
                                     f"and values ({Hkv}, T_b, value_dim={Ev}) with T_b the "
                                     f"tokens reserved per sequence, {counts}, got key "
                                     f"{k.shape} and value {v.shape}")
            key = [k for k, _ in pairs]
            value = [v for _, v in pairs]
        for k, v in ([(key, value)] if pairs is None else pairs):
            if k.dtype != cache._dtype or v.dtype != cache._dtype:
                promoted_dtype(k, v, names=("key", "value"))
        if cache.device != "cpu":
            return (key, value) if pairs is not None else (list(key), list(value))
        if pairs is None:
            return key.reshape(-1, E), value.reshape(-1, Ev)
        return (np.concatenate([k.reshape(-1, E) for k in key]),
                np.concatenate([v.reshape(-1, Ev) for v in value]))

    def _rows(self):
        # Row of each new token in a layer's pools viewed as (num_blocks * H_kv *
        # block_size, E): (block * H_kv + h) * block_size + slot, in (sequence, kv-head,
        # token) order. Built once, for all layers.
        if self._row_index is None:
            cache = self._cache
            _, Hkv, bs, _ = cache._key_shape
            seqs = self._growth.seqs
            if sum(self.num_tokens) * Hkv <= 1024:
                # few tokens (decoding): a list is quicker than a dozen small array ops
                rows = np.array([(grown[p // bs] * Hkv + h) * bs + p % bs
                                 for _, grown, _, start, T in seqs for h in range(Hkv)
                                 for p in range(start, start + T)], dtype=np.intp)
            else:
                heads = np.arange(0, Hkv * bs, bs, dtype=np.intp)[:, None]
                parts = []
                for _, grown, _, start, T in seqs:
                    pos = np.arange(start, start + T, dtype=np.intp)
                    base = np.asarray(grown, dtype=np.intp)[pos // bs] * (Hkv * bs) + pos % bs
                    parts.append((heads + base).ravel())
                rows = np.concatenate(parts)
            self._row_index = rows
        return self._row_index


def _block_runs(growth, bs):
    # (sequence index, first token, block, slot, tokens) of each run of a growth's new
    # tokens within one block: where append and an NPU cache's write copy them
    for b, (_, grown, _, start, T) in enumerate(growth.seqs):
        t = 0
        while t < T:
            pos = start + t
            n = min(bs - pos % bs, T - t)
            yield b, t, grown[pos // bs], pos % bs, n
            t += n


class _Growth:
    """A planned growth of some sequences (PagedKVCache._plan): their ids and counts
    (tuples); per sequence (id, new block list, copy-on-write copy (dst, src) or None,
    old length, new tokens); the free blocks it takes; the shared blocks it stops
    using."""

    __slots__ = ("ids", "counts", "seqs", "taken", "drops")

    def __init__(self, ids, counts, seqs, taken, drops):
        self.ids, self.counts = tuple(ids), tuple(counts)
        self.seqs, self.taken, self.drops = seqs, taken, drops


class _Table:
    """The block table of some sequences as the kernel takes it: intp (B, max_blocks),
    padded with 0; intp lengths; their maximum and sum; the tilings of the calls made
    with it (paged._attend_cpu), shared by the layers."""

    __slots__ = ("table", "lens", "max_len", "keys", "tilings")

    def __init__(self, entries):
        lengths = [length for _, length in entries]
        width = max(map(len, (blocks for blocks, _ in entries)), default=0)
        flat = []
        for blocks, _ in entries:
            flat += blocks
            flat += [0] * (width - len(blocks))
        self.table = np.array(flat, dtype=np.intp).reshape(len(entries), width)
        self.lens = np.array(lengths, dtype=np.intp)
        self.max_len = max(lengths, default=0)
        self.keys = sum(lengths)
        self.tilings = {}


class _HostPools:
    """The key and value block pools of a CPU ``PagedKVCache`` (see ``_npu.DevicePools``),
    one pair per layer, stacked."""

    device = "cpu"

    def __init__(self, layers, key_shape, value_shape, dtype, layered):
        self._keys = np.zeros((layers,) + key_shape, dtype)
        self._values = np.zeros((layers,) + value_shape, dtype)
        keys, values = self._keys.view(), self._values.view()
        keys.flags.writeable = False
        values.flags.writeable = False
        # per layer: the read-only pools paged attention reads, and the writable rows
        # (num_blocks * H_kv * block_size, E) that write() indexes
        self.layers = [(keys[i], values[i]) for i in range(layers)]
        self.rows = [(self._keys[i].reshape(-1, key_shape[-1]),
                      self._values[i].reshape(-1, value_shape[-1])) for i in range(layers)]
        self.key_view, self.value_view = (keys, values) if layered else self.layers[0]

    def write(self, block, slot, key, value):
        """Tokens ``slot, slot + 1, ...`` of ``block`` in every layer = ``key``/``value``:
        (H_kv, n, E) for one layer, (layers, H_kv, n, E) for several."""
        n = key.shape[-2]
        self._keys[:, block, :, slot:slot + n] = key
        self._values[:, block, :, slot:slot + n] = value

    def copy_block(self, destination, source):
        self._keys[:, destination] = self._keys[:, source]
        self._values[:, destination] = self._values[:, source]

    def close(self):
        # the arrays go with their last reference (views handed out included)
        self._keys = self._values = self.key_view = self.value_view = None
        self.layers = self.rows = None
