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
