"""Grouped-query and multi-query attention: K/V heads shared by groups of query heads."""
import functools

import fastattn

from . import common


class Gqa:
    """Hq=8 query heads over 1 (MQA), 2 (GQA) or 8 (plain MHA) K/V heads, L=S=1024, causal."""
    params = [[1, 2, 8]]
    param_names = ["kv_heads"]
    length = 1024

    def setup(self, kv_heads):
        self.q, self.k, self.v = common.qkv(1, common.HEADS, self.length, self.length,
                                            kv_heads=kv_heads)
        self.flops = functools.partial(common.attention_flops, 1, common.HEADS, self.length, self.length,
                                            common.HEAD_DIM, common.HEAD_DIM, True)

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=True,
                                                     enable_gqa=True)

    def time_gqa(self, kv_heads):
        self._run()

    def track_gflops(self, kv_heads):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class GqaDecode:
    """One new token through ``scaled_dot_product_attention(enable_gqa=True)`` on contiguous
    K/V: B=8, Hq=32 over Hkv=8, S=4096, head_dim 128 (issue 20's decode row; the split-KV
    kernel, as ``paged_attention`` takes). K+V are 256 MiB in float32, 128 MiB in the half
    types (read as they are), far beyond the caches: ``track_bandwidth_fraction`` is the
    rate they are read at, as a fraction of this machine's read bandwidth."""
    params = [["float32", "float16", "bfloat16"]]
    param_names = ["dtype"]
    batch, heads, kv_heads, length, head_dim = 8, 32, 8, 4096, 128

    def setup(self, dtype):
        dtype = common.dtype_named(dtype)
        self.q, self.k, self.v = common.qkv(self.batch, self.heads, 1, self.length,
                                            self.head_dim, kv_heads=self.kv_heads, dtype=dtype)
        self.kv_bytes = self.k.nbytes + self.v.nbytes

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v, enable_gqa=True)

    def time_sdpa_decode(self, dtype):
        self._run()

    def track_bandwidth_fraction(self, dtype):
        achieved = self.kv_bytes / common.median_seconds(self._run) / 1e9
        return achieved / common.memory_bandwidth_gbs()
    track_bandwidth_fraction.unit = "fraction of read bandwidth"


class SmallCalls:
    """Per-call cost of tiny problems (B=1, H=2, L=S=4): validation, plan and threads, not
    arithmetic; head_dim 8 (products through BLAS, under the BLAS thread limit) and 16
    (the micro-kernels), and a one-token GQA step (Hq=8, Hkv=2, S=64) on the split-KV
    kernel."""
    params = [["e8", "e16", "gqa_step"]]
    param_names = ["call"]

    def setup(self, call):
        if call == "gqa_step":
            self.q, self.k, self.v = common.qkv(1, 8, 1, 64, 64, kv_heads=2)
        else:
            self.q, self.k, self.v = common.qkv(1, 2, 4, 4, int(call[1:]))

    def time_small_call(self, call):
        fastattn.scaled_dot_product_attention(self.q, self.k, self.v, enable_gqa=True)
