"""Paged decode attention (issue 5), reported as a fraction of this machine's bandwidth.

Targets (float32, 2 cores): B=8, H=32, H_kv=8, S=4096, head_dim=128, T=1 reads K
and V at >= 70 % of the measured read bandwidth
(``PagedDecode.track_bandwidth_fraction``); one long sequence (B=1, S=32768) is
split across threads, >= 1.7x faster than one thread (``SplitKv``). Here B=4 keeps
the quick suite short; K+V are still 128 MiB, far beyond the caches.

The thread speed-up of a memory-bound kernel cannot exceed how much faster the
machine reads with all threads than with one (``memory_bandwidth_gbs(threads=1)``
vs all); on a 2-core VM that ratio was 1.2-1.9x. ``SplitKv.track_bandwidth_fraction``
is the same bandwidth fraction as for ``PagedDecode``, for the split path.
"""
import numpy as np

from . import common

BLOCK_SIZE = 16
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def build_cache(batch, seq_len, seed=50):
    """A PagedKVCache holding ``batch`` sequences of ``seq_len`` tokens, appended in
    uneven chunks so blocks of different sequences interleave in the pool."""
    paged_kv_cache = common.require("PagedKVCache")
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    # one spare block so time_append_one_token can start a new sequence
    cache = paged_kv_cache(batch * blocks_per_seq + 1, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    seq_ids = [cache.add_sequence() for _ in range(batch)]
    chunk = 1000                                      # not a multiple of the block size
    for start in range(0, seq_len, chunk):
        tokens = min(chunk, seq_len - start)
        for i, seq_id in enumerate(seq_ids):
            keys = common.random_array((KV_HEADS, tokens, HEAD_DIM), seed + 2 * i)
            values = common.random_array((KV_HEADS, tokens, HEAD_DIM), seed + 2 * i + 1)
            cache.append(seq_id, keys, values)
    return cache, seq_ids


class PagedDecode:
    """One new token (T=1) for B=4 sequences, H=32 over H_kv=8, head_dim 128."""
    params = [[512, 4096]]
    param_names = ["seq_len"]
    batch = 4

    def setup(self, seq_len):
        self.paged_attention = common.require("paged_attention")
        self.cache, seq_ids = build_cache(self.batch, seq_len)
        self.table, self.lengths = self.cache.block_table(seq_ids)
        self.query = common.random_array((self.batch, HEADS, 1, HEAD_DIM), seed=60)
        itemsize = np.dtype(common.DTYPE).itemsize
        self.kv_bytes = 2 * self.batch * KV_HEADS * seq_len * HEAD_DIM * itemsize

    def _run(self, num_threads=None):
        return self.paged_attention(self.query, self.cache.key_blocks, self.cache.value_blocks,
                                    self.table, self.lengths, num_threads=num_threads)

    def time_paged_decode(self, seq_len):
        self._run()

    def track_bandwidth_fraction(self, seq_len):
        achieved = self.kv_bytes / common.median_seconds(self._run) / 1e9
        return achieved / common.memory_bandwidth_gbs()
    track_bandwidth_fraction.unit = "fraction of read bandwidth"

    def time_append_one_token(self, seq_len):
        # O(1): a new sequence's first token, then freed, so the cache is unchanged
        seq_id = self.cache.add_sequence()
        self.cache.append(seq_id, self.query[0, :KV_HEADS], self.query[0, :KV_HEADS])
        self.cache.free(seq_id)


class SplitKv:
    """B=1, S=16384: the split-KV path, 1 thread vs all (``track_thread_speedup``)."""
    params = [[16384]]
    param_names = ["seq_len"]

    def setup(self, seq_len):
        self.paged_attention = common.require("paged_attention")
        self.cache, seq_ids = build_cache(1, seq_len)
        self.table, self.lengths = self.cache.block_table(seq_ids)
        self.query = common.random_array((1, HEADS, 1, HEAD_DIM), seed=61)

    _run = PagedDecode._run

    def time_split_kv(self, seq_len):
        self._run()

    def track_thread_speedup(self, seq_len):
        return (common.median_seconds(lambda: self._run(num_threads=1))
                / common.median_seconds(self._run))
    track_thread_speedup.unit = "x"

    def track_bandwidth_fraction(self, seq_len):
        kv_bytes = 2 * KV_HEADS * seq_len * HEAD_DIM * np.dtype(common.DTYPE).itemsize
        achieved = kv_bytes / common.median_seconds(self._run) / 1e9
        return achieved / common.memory_bandwidth_gbs()
    track_bandwidth_fraction.unit = "fraction of read bandwidth"
