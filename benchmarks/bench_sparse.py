"""Long-sequence variants (issue 4): each sparse pattern, hashing/clustering, low-rank,
kernel and learned variant, on B=1 H=8 E=64 float32.

``time_variant`` / ``peakmem_variant`` for every variant at N = 4096 (the
dense kernel's history is in ``bench_sdpa``). The LRA-style report (N up to 16K, speed-memory plot) belongs to issue 4's own tool.
Arguments follow issue 4's signatures; a variant whose function the measured commit
lacks is skipped in ``setup`` (the parameter lists do not change).
"""
import numpy as np

import fastattn

from . import common

LENGTHS = [4096]
WINDOW = (256, 256)
BLOCK = 64


def _rng():
    return np.random.default_rng(common.SEED)


def _global_tokens(n):
    return np.arange(0, n, n // 8)               # 8 global tokens, spread out


# name -> (fastattn function name, call(fn, q, k, v, n) -> result)
VARIANTS = {
    "local": ("local_attention", lambda f, q, k, v, n: f(q, k, v, WINDOW)),
    "local_causal": ("local_attention", lambda f, q, k, v, n: f(q, k, v, (WINDOW[0], 0))),
    "local_dilated": ("local_attention", lambda f, q, k, v, n: f(q, k, v, WINDOW, dilation=2)),
    "strided": ("strided_attention", lambda f, q, k, v, n: f(q, k, v, 128)),
    "strided_fixed": ("strided_attention", lambda f, q, k, v, n: f(q, k, v, 128, mode="fixed")),
    "global": ("global_attention",
               lambda f, q, k, v, n: f(q, k, v, _global_tokens(n), window=WINDOW)),
    "longformer": ("longformer_attention",
                   lambda f, q, k, v, n: f(q, k, v, WINDOW, _global_tokens(n))),
    "bigbird": ("bigbird_attention",
                lambda f, q, k, v, n: f(q, k, v, block_size=BLOCK, rng=_rng())),
    "lsh": ("lsh_attention", lambda f, q, k, v, n: f(q, v, bucket_size=BLOCK, rng=_rng())),
    "lsh_causal": ("lsh_attention",
                   lambda f, q, k, v, n: f(q, v, bucket_size=BLOCK, causal=True, rng=_rng())),
    "lsh_4hashes": ("lsh_attention",
                    lambda f, q, k, v, n: f(q, v, n_hashes=4, bucket_size=BLOCK, rng=_rng())),
    "clustered": ("clustered_attention",
                  lambda f, q, k, v, n: f(q, k, v, clusters=100, rng=_rng())),
    "clustered_topk": ("clustered_attention",
                       lambda f, q, k, v, n: f(q, k, v, clusters=100, topk=32, rng=_rng())),
    "sinkhorn": ("sinkhorn_attention",
                 lambda f, q, k, v, n: f(q, k, v, block_size=BLOCK, rng=_rng())),
    "linformer": ("linformer_attention",
                  lambda f, q, k, v, n: f(q, k, v, common.random_array((256, n), 40) / n)),
    "linear": ("linear_attention", lambda f, q, k, v, n: f(q, k, v)),
    "linear_causal": ("linear_attention", lambda f, q, k, v, n: f(q, k, v, causal=True)),
    "performer": ("performer_attention",
                  lambda f, q, k, v, n: f(q, k, v, num_features=256, rng=_rng())),
    "performer_causal": ("performer_attention",
                         lambda f, q, k, v, n: f(q, k, v, num_features=256, causal=True,
                                                 rng=_rng())),
    # one (N, N) logit matrix shared by all heads keeps setup memory small
    "synthesizer_random": ("synthesizer_attention",
                           lambda f, q, k, v, n: f(v, weights=common.random_array(
                               (1, n, n), 41), mode="random")),
    "synthesizer_factorized": ("synthesizer_attention",
                               lambda f, q, k, v, n: f(v, mode="factorized", weights=(
                                   common.random_array((1, n, 32), 42),
                                   common.random_array((1, 32, n), 43)))),
}


class SparseVariants:
    """Every variant by sequence length N (L = S = N)."""
    params = [list(VARIANTS), LENGTHS]
    param_names = ["variant", "length"]

    def setup(self, variant, length):
        function_name, self.call = VARIANTS[variant]
        self.function = common.require(function_name)
        self.q, self.k, self.v = common.qkv(1, common.HEADS, length, length)
        self.length = length

    def _run(self):
        return self.call(self.function, self.q, self.k, self.v, self.length)

    def time_variant(self, variant, length):
        self._run()

    def peakmem_variant(self, variant, length):
        self._run()


class BlockSparseEngine:
    """The engine on a BigBird-like layout: local band + first block global, N=4096."""
    params = [[4096]]
    param_names = ["length"]

    def setup(self, length):
        block_sparse_attention = common.require("block_sparse_attention")
        block_layout = common.require("BlockLayout")
        blocks = length // BLOCK
        visited = np.abs(np.subtract.outer(np.arange(blocks), np.arange(blocks))) <= 1
        visited[:, 0] = visited[0, :] = True
        self.layout = block_layout.from_blocks(visited, (length, length), BLOCK)
        self.q, self.k, self.v = common.qkv(1, common.HEADS, length, length)
        self.run = lambda: block_sparse_attention(self.q, self.k, self.v, self.layout)
        self.visited_fraction = visited.mean()

    def time_block_sparse(self, length):
        self.run()

    def track_time_over_visited_dense(self, length):
        """time / (visited fraction x dense time): issue 4 wants <= 1.3."""
        dense = common.median_seconds(
            lambda: fastattn.scaled_dot_product_attention(self.q, self.k, self.v))
        return common.median_seconds(self.run) / (self.visited_fraction * dense)
    track_time_over_visited_dense.unit = "ratio"


class BlockSparseDtypes:
    """The engine's BigBird-like layout at N=4096 by dtype (half types read natively)."""
    params = [["float32", "float16", "bfloat16"]]
    param_names = ["dtype"]
    length = 4096

    def setup(self, dtype):
        dtype = common.dtype_named(dtype)
        BlockSparseEngine.setup(self, self.length)
        self.q, self.k, self.v = common.qkv(1, common.HEADS, self.length, self.length,
                                            dtype=dtype)

    def time_block_sparse(self, dtype):
        self.run()
