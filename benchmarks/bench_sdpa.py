"""scaled_dot_product_attention on the CPU: dense, causal, bool/float masks, odd shapes.

Targets (issue 2, float32, E=64, 2 cores): dense L=S=2048 H=8 >= 85 % of the SGEMM
rate (``SdpaEfficiency.track_sgemm_fraction``); causal >= 1.8x faster than dense
and a bool mask <= 10 % slower than none (``Sdpa.time_sdpa`` ratios); L=S=16384
H=1 with < 64 MiB extra memory (``LongSequence.track_peak_rss_growth``).
"""
import functools

import fastattn

from . import common

KINDS = ["dense", "causal", "bool_mask", "float_mask"]


def _mask_arguments(kind, L, S):
    """Keyword arguments of ``scaled_dot_product_attention`` for one workload kind."""
    if kind == "dense":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    mask = common.random_bool_mask((L, S))             # (L, S), broadcast over heads
    if kind == "bool_mask":
        return {"attn_mask": mask}
    if kind == "float_mask":
        return {"attn_mask": common.float_mask(mask)}
    raise ValueError(f"unknown kind {kind!r}")


class Sdpa:
    """Self-attention, B=1 H=8 E=64 float32, by sequence length and mask kind."""
    params = [[512, 2048], KINDS]
    param_names = ["length", "kind"]

    def setup(self, length, kind):
        self.q, self.k, self.v = common.qkv(1, common.HEADS, length, length)
        self.kwargs = _mask_arguments(kind, length, length)
        self.flops = functools.partial(common.attention_flops, 1, common.HEADS, length, length, common.HEAD_DIM,
                                            common.HEAD_DIM, kind == "causal")

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v, **self.kwargs)

    def time_sdpa(self, length, kind):
        self._run()

    def track_gflops(self, length, kind):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class SdpaEfficiency:
    """The issue-2 target shape, L=S=2048 H=8 E=64, as a fraction of this machine's SGEMM rate."""
    params = [["dense", "causal", "bool_mask"]]
    param_names = ["kind"]
    length = 2048

    def setup(self, kind):
        Sdpa.setup(self, self.length, kind)

    _run = Sdpa._run

    def track_sgemm_fraction(self, kind):
        return common.gflops(self._run, self.flops) / common.sgemm_gflops()
    track_sgemm_fraction.unit = "fraction of SGEMM rate"


class SdpaShapes:
    """Shapes that must not be slow paths: BERT-like short sequences and one-token decode."""
    params = [["bert_B32_H12_L128_E32", "decode_H8_L1_S4096_E64", "cross_H8_L256_S2048_E64"]]
    param_names = ["shape"]
    shapes = {                      # (batch, heads, L, S, E)
        "bert_B32_H12_L128_E32": (32, 12, 128, 128, 32),
        "decode_H8_L1_S4096_E64": (1, 8, 1, 4096, 64),
        "cross_H8_L256_S2048_E64": (1, 8, 256, 2048, 64),
    }

    def setup(self, shape):
        batch, heads, L, S, E = self.shapes[shape]
        self.q, self.k, self.v = common.qkv(batch, heads, L, S, E)
        self.flops = functools.partial(common.attention_flops, batch, heads, L, S, E, E, False)

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v)

    def time_sdpa(self, shape):
        self._run()

    def track_gflops(self, shape):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class SdpaDtypes:
    """Dense and causal L=S=2048 H=8 E=64 by dtype: the half types are read natively and
    computed in float32 (issue: half precision)."""
    params = [["float32", "float16", "bfloat16"], ["dense", "causal"]]
    param_names = ["dtype", "kind"]
    length = 2048

    def setup(self, dtype, kind):
        dtype = common.dtype_named(dtype)
        self.q, self.k, self.v = common.qkv(1, common.HEADS, self.length, self.length,
                                            dtype=dtype)
        self.kwargs = _mask_arguments(kind, self.length, self.length)
        self.flops = functools.partial(common.attention_flops, 1, common.HEADS, self.length,
                                       self.length, common.HEAD_DIM, common.HEAD_DIM,
                                       kind == "causal")

    _run = Sdpa._run

    def time_sdpa(self, dtype, kind):
        self._run()

    def track_gflops(self, dtype, kind):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class SdpaThreads:
    """Thread scaling of the dense L=S=1024 H=8 case (1 thread vs the default)."""
    params = [[1, 0]]
    param_names = ["num_threads"]         # 0 = fastattn's default (all cores)

    def setup(self, num_threads):
        self.q, self.k, self.v = common.qkv(1, common.HEADS, 1024, 1024)
        self.num_threads = num_threads or None

    def time_sdpa(self, num_threads):
        fastattn.scaled_dot_product_attention(self.q, self.k, self.v,
                                              num_threads=self.num_threads)


class LongSequence:
    """L=S=16384, H=1 causal: memory must stay O(threads x tile) (NumPy needs 1 GiB)."""
    params = [[16384]]
    param_names = ["length"]

    def setup(self, length):
        self.q, self.k, self.v = common.qkv(1, 1, length, length)

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=True)

    def peakmem_sdpa(self, length):
        self._run()

    def track_peak_rss_growth(self, length):
        return common.peak_rss_growth_mib(self._run)
    track_peak_rss_growth.unit = "MiB"


class SdpaDropout:
    """Dropout on the probabilities inside the kernel, L=S=2048 H=8 E=64: its cost over
    no dropout (``dropout_p=0.0`` is the no-dropout kernel) for dense and causal."""
    params = [[0.0, 0.1], ["dense", "causal"]]
    param_names = ["dropout_p", "kind"]
    length = 2048

    def setup(self, dropout_p, kind):
        self.q, self.k, self.v = common.qkv(1, common.HEADS, self.length, self.length)
        self.causal = kind == "causal"
        import inspect
        if "dropout_p" not in inspect.signature(fastattn.scaled_dot_product_attention).parameters:
            raise NotImplementedError("scaled_dot_product_attention has no dropout_p")

    def time_sdpa_dropout(self, dropout_p, kind):
        fastattn.scaled_dot_product_attention(self.q, self.k, self.v, None, dropout_p,
                                              self.causal, rng=common.SEED)


class SdpaHeadDims:
    """Dense float32 L=S=2048 H=8 by head dimension, as a fraction of this machine's SGEMM
    rate (issue 20: >= 0.93 at E=64 and E=128; 80, 96 and 256 checked beside them)."""
    params = [[64, 80, 96, 128, 256]]
    param_names = ["head_dim"]
    length = 2048

    def setup(self, head_dim):
        self.q, self.k, self.v = common.qkv(1, common.HEADS, self.length, self.length, head_dim)
        self.flops = functools.partial(common.attention_flops, 1, common.HEADS, self.length,
                                       self.length, head_dim, head_dim, False)

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v)

    def time_sdpa(self, head_dim):
        self._run()

    def track_sgemm_fraction(self, head_dim):
        return common.gflops(self._run, self.flops) / common.sgemm_gflops()
    track_sgemm_fraction.unit = "fraction of SGEMM rate"
