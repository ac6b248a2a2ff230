"""The backward pass: scaled_dot_product_attention_backward and masked_softmax_backward.

Targets (issue 15, float32, E=64, 2 cores): forward + backward at B=1 H=8 L=S=2048
>= 1.3x PyTorch's (``ForwardBackward.track_speedup_over_torch``); the backward alone
>= 0.6 of the SGEMM rate, counting 2.5x the forward's FLOPs
(``BackwardEfficiency.track_sgemm_fraction``); causal >= 1.8x faster than dense
(``Backward.time_backward`` ratios); L=S=16384 H=1 forward + backward with < 64 MiB
beyond inputs, outputs and gradients (``LongSequence.track_peak_rss_growth``);
bfloat16/float16 >= 1.5x the float32 backward (``BackwardDtypes``). The same targets
in one interleaved run, with spreads: ``python benchmarks/backward_targets.py``.
"""
import functools

import numpy as np

import fastattn

from . import common

KINDS = ["dense", "causal", "bool_mask", "float_mask"]


def _backward():
    return common.require("scaled_dot_product_attention_backward")


def _kwargs(kind, L, S):
    if kind == "dense":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    mask = common.random_bool_mask((L, S))
    return {"attn_mask": mask if kind == "bool_mask" else common.float_mask(mask)}


def _backward_flops(batch, heads, L, S, E, Ev, causal):
    """The flash-attention convention: the backward counts 2.5x the forward's FLOPs."""
    return 2.5 * common.attention_flops(batch, heads, L, S, E, Ev, causal)


class _Saved:
    """A forward's inputs and saved tensors, ready for the backward."""

    def prepare(self, batch, heads, L, S, kind="dense", dtype=common.DTYPE, kv_heads=None):
        self.bwd = _backward()
        self.q, self.k, self.v = common.qkv(batch, heads, L, S, kv_heads=kv_heads, dtype=dtype)
        self.kwargs = _kwargs(kind, L, S)
        if kv_heads is not None and kv_heads != heads:
            self.kwargs["enable_gqa"] = True
        mask = self.kwargs.get("attn_mask")
        options = {key: val for key, val in self.kwargs.items() if key != "attn_mask"}
        self.out, self.lse = fastattn.scaled_dot_product_attention(
            self.q, self.k, self.v, mask, return_lse=True, **options)
        self.grad = common.random_array(self.out.shape, 5, self.out.dtype)

    def _run(self):
        return self.bwd(self.grad, self.q, self.k, self.v, self.out, self.lse, **self.kwargs)


class Backward(_Saved):
    """The backward alone, B=1 H=8 E=64 float32, by sequence length and mask kind."""
    params = [[512, 2048], KINDS]
    param_names = ["length", "kind"]

    def setup(self, length, kind):
        self.prepare(1, common.HEADS, length, length, kind)
        self.flops = functools.partial(_backward_flops, 1, common.HEADS, length, length,
                                       common.HEAD_DIM, common.HEAD_DIM, kind == "causal")

    def time_backward(self, length, kind):
        self._run()

    def track_gflops(self, length, kind):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class BackwardEfficiency(_Saved):
    """The issue-15 shape, L=S=2048 H=8 E=64: the backward's FLOP rate (2.5x the forward's
    count) as a fraction of this machine's SGEMM rate."""
    params = [["dense", "causal"]]
    param_names = ["kind"]
    length = 2048

    def setup(self, kind):
        Backward.setup(self, self.length, kind)

    def track_sgemm_fraction(self, kind):
        return common.gflops(self._run, self.flops) / common.sgemm_gflops()
    track_sgemm_fraction.unit = "fraction of SGEMM rate"


class ForwardBackward:
    """Forward + backward (what a training step costs), L=S=2048 H=8 E=64 float32, against
    PyTorch's scaled_dot_product_attention then ``.backward()`` at the same threads."""
    params = [["dense", "causal"]]
    param_names = ["kind"]
    length = 2048

    def setup(self, kind):
        self.bwd = _backward()
        self.causal = kind == "causal"
        self.q, self.k, self.v = common.qkv(1, common.HEADS, self.length, self.length)
        self.grad = common.random_array(self.q.shape, 5)

    def _run(self):
        out, lse = fastattn.scaled_dot_product_attention(self.q, self.k, self.v,
                                                         is_causal=self.causal, return_lse=True)
        return self.bwd(self.grad, self.q, self.k, self.v, out, lse, is_causal=self.causal)

    def time_forward_backward(self, kind):
        self._run()

    def track_speedup_over_torch(self, kind):
        try:
            import torch
        except ImportError:
            raise common.SkipNotImplemented("PyTorch is not installed") from None
        threads = torch.get_num_threads()
        torch.set_num_threads(fastattn.get_num_threads())
        try:
            tensors = [torch.tensor(a, requires_grad=True) for a in (self.q, self.k, self.v)]
            grad = torch.tensor(self.grad)

            def torch_step():
                for t in tensors:
                    t.grad = None
                out = torch.nn.functional.scaled_dot_product_attention(
                    *tensors, is_causal=self.causal)
                out.backward(grad)
            return common.median_seconds(torch_step) / common.median_seconds(self._run)
        finally:
            torch.set_num_threads(threads)
    track_speedup_over_torch.unit = "x PyTorch"


class BackwardDtypes(_Saved):
    """The backward at L=S=2048 H=8 E=64 by dtype: the half types are read natively and
    accumulated in float32."""
    params = [["float32", "float16", "bfloat16"], ["dense", "causal"]]
    param_names = ["dtype", "kind"]
    length = 2048

    def setup(self, dtype, kind):
        self.prepare(1, common.HEADS, self.length, self.length, kind,
                     dtype=common.dtype_named(dtype))
        self.flops = functools.partial(_backward_flops, 1, common.HEADS, self.length,
                                       self.length, common.HEAD_DIM, common.HEAD_DIM,
                                       kind == "causal")

    def time_backward(self, dtype, kind):
        self._run()

    def track_gflops(self, dtype, kind):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class BackwardShapes(_Saved):
    """Shapes with few heads (key blocks split between threads, each split its own dQ),
    grouped-query heads, a learned bias with its gradient, and cross-attention."""
    params = [["H1_L4096", "gqa_H8_KV2_L2048", "bias_grad_H8_L1024", "cross_H8_L256_S2048"]]
    param_names = ["shape"]

    def setup(self, shape):
        if shape == "H1_L4096":
            self.prepare(1, 1, 4096, 4096)
        elif shape == "gqa_H8_KV2_L2048":
            self.prepare(1, common.HEADS, 2048, 2048, kv_heads=2)
        elif shape == "cross_H8_L256_S2048":
            self.prepare(1, common.HEADS, 256, 2048)
        else:
            self.bwd = _backward()
            L = 1024
            self.q, self.k, self.v = common.qkv(1, common.HEADS, L, L)
            bias = common.random_array((common.HEADS, L, L), 6)
            self.out, self.lse = fastattn.scaled_dot_product_attention(
                self.q, self.k, self.v, bias, return_lse=True)
            self.grad = common.random_array(self.out.shape, 5)
            self.kwargs = {"attn_mask": bias, "mask_grad": True}

    def time_backward(self, shape):
        self._run()


class DqStrategy(_Saved):
    """dQ without races when key blocks are split between threads (H=1, L=S=4096): one
    dQ per key split summed at the end ("splits", the default) or a second pass over
    query blocks ("two_pass", 7 tile products instead of 5)."""
    params = [["splits", "two_pass"], ["dense", "causal"]]
    param_names = ["strategy", "kind"]

    def setup(self, strategy, kind):
        from fastattn import backward
        self.prepare(1, 1, 4096, 4096, kind)
        self.module = backward
        self.previous = backward.DQ_STRATEGY
        backward.DQ_STRATEGY = strategy

    def teardown(self, strategy, kind):
        if hasattr(self, "module"):
            self.module.DQ_STRATEGY = self.previous

    def time_backward(self, strategy, kind):
        self._run()


class LongSequence:
    """L=S=16384, H=1 causal forward + backward: memory stays O(L) (scores: 1 GiB)."""
    params = [[16384]]
    param_names = ["length"]

    def setup(self, length):
        self.bwd = _backward()
        self.q, self.k, self.v = common.qkv(1, 1, length, length)
        self.grad = common.random_array(self.q.shape, 5)

    def _run(self):
        out, lse = fastattn.scaled_dot_product_attention(self.q, self.k, self.v,
                                                         is_causal=True, return_lse=True)
        return self.bwd(self.grad, self.q, self.k, self.v, out, lse, is_causal=True)

    def peakmem_forward_backward(self, length):
        self._run()

    def track_peak_rss_growth(self, length):
        # beyond the results: out, lse and the three gradients
        lse_bytes = self.q.nbytes // self.q.shape[-1]
        results = (4 * self.q.nbytes + lse_bytes) / 2 ** 20
        return common.peak_rss_growth_mib(self._run) - results
    track_peak_rss_growth.unit = "MiB"


class SoftmaxBackward:
    """masked_softmax_backward over (B, H, L, S) = (1, 8, L, L) float32 weights."""
    params = [[512, 2048]]
    param_names = ["length"]

    def setup(self, length):
        backward = common.require("masked_softmax_backward")
        x = common.random_array((1, common.HEADS, length, length), 7)
        self.y = fastattn.masked_softmax(x)
        self.grad = common.random_array(self.y.shape, 8)
        self.bwd = backward

    def time_softmax_backward(self, length):
        self.bwd(self.grad, self.y)


class BlockSparseBackward:
    """block_sparse_attention_backward on the engine's BigBird-like layout (local band +
    first block global, blocks of 64), N=4096 H=8 E=64 float32; ``track_time_over_visited_
    dense``: its time over (visited fraction x the dense backward's time)."""
    params = [[4096]]
    param_names = ["length"]
    block = 64

    def setup(self, length):
        self.bwd = common.require("block_sparse_attention_backward")
        layout_cls = common.require("BlockLayout")
        blocks = length // self.block
        visited = np.abs(np.subtract.outer(np.arange(blocks), np.arange(blocks))) <= 1
        visited[:, 0] = visited[0, :] = True
        self.visited_fraction = visited.mean()
        self.layout = layout_cls.from_blocks(visited, (length, length), self.block)
        self.q, self.k, self.v = common.qkv(1, common.HEADS, length, length)
        self.out, self.lse = fastattn.block_sparse_attention(self.q, self.k, self.v,
                                                             self.layout, return_lse=True)
        self.grad = common.random_array(self.out.shape, 5)

    def _run(self):
        return self.bwd(self.grad, self.q, self.k, self.v, self.out, self.lse, self.layout)

    def time_block_sparse_backward(self, length):
        self._run()

    def track_time_over_visited_dense(self, length):
        out, lse = fastattn.scaled_dot_product_attention(self.q, self.k, self.v,
                                                         return_lse=True)
        dense = common.median_seconds(lambda: _backward()(self.grad, self.q, self.k, self.v,
                                                          out, lse))
        return common.median_seconds(self._run) / (self.visited_fraction * dense)
    track_time_over_visited_dense.unit = "ratio"
