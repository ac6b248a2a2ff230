"""multi_head_attention (issue 3): projections + fused attention on a BERT-base layer.

Target: B=8, S=256, E=768, H=12 spends >= 90 % of its time in BLAS and the fused
kernel; ``track_sgemm_fraction`` counts the four projections and the attention.
"""
import numpy as np

from . import common

EMBED = 768
HEADS = 12


class MultiHeadAttention:
    """BERT-base layer shape, B=8 S=256 E=768 H=12 float32."""
    params = [["self", "cross", "gqa", "causal_padded"]]
    param_names = ["variant"]
    batch, length, source_length = 8, 256, 512

    def setup(self, variant):
        self.mha = common.require("multi_head_attention")
        B, L = self.batch, self.length
        S = self.source_length if variant == "cross" else L
        kv_heads = 4 if variant == "gqa" else HEADS
        kv_embed = EMBED * kv_heads // HEADS
        self.query = common.random_array((B, L, EMBED), seed=20)
        self.key = self.value = self.query if S == L else common.random_array((B, S, EMBED), 21)
        scale = EMBED ** -0.5            # keeps activations O(1)
        self.kwargs = {
            "q_weight": common.random_array((EMBED, EMBED), 22) * scale,
            "k_weight": common.random_array((kv_embed, EMBED), 23) * scale,
            "v_weight": common.random_array((kv_embed, EMBED), 24) * scale,
            "out_weight": common.random_array((EMBED, EMBED), 25) * scale,
            "q_bias": common.random_array((EMBED,), 26),
            "k_bias": common.random_array((kv_embed,), 27),
            "v_bias": common.random_array((kv_embed,), 28),
            "out_bias": common.random_array((EMBED,), 29),
        }
        if kv_heads != HEADS:
            self.kwargs["num_kv_heads"] = kv_heads
        if variant == "causal_padded":
            lengths = np.linspace(L // 2, L, B).astype(int)
            self.kwargs["is_causal"] = True
            self.kwargs["key_padding_mask"] = np.arange(S) < lengths[:, None]
        projection_flops = 2.0 * B * (2 * L * EMBED * EMBED + 2 * S * EMBED * kv_embed)
        self.flops = lambda: projection_flops + common.attention_flops(
            B, HEADS, L, S, EMBED // HEADS, EMBED // HEADS, variant == "causal_padded")

    def _run(self):
        return self.mha(self.query, self.key, self.value, HEADS, **self.kwargs)

    def time_multi_head_attention(self, variant):
        self._run()

    def track_sgemm_fraction(self, variant):
        return common.gflops(self._run, self.flops) / common.sgemm_gflops()
    track_sgemm_fraction.unit = "fraction of SGEMM rate"


class MultiHeadAttentionLayers:
    """Layer shapes whose time is mostly the projections (``fastattn._linear``), float32.

    ``self_512``: B=8 L=S=512 E=512 H=8; ``bert_base``: B=32 L=S=128 E=768 H=12;
    ``decoder_cross``: B=8, 128 decoder queries over 512 encoder states, E=512 H=8;
    ``self_512_weights``: ``self_512`` with ``need_weights=True``.
    """
    params = [["self_512", "bert_base", "decoder_cross", "self_512_weights"]]
    param_names = ["layer"]
    shapes = {"self_512": (8, 512, 512, 512, 8), "bert_base": (32, 128, 128, 768, 12),
              "decoder_cross": (8, 128, 512, 512, 8), "self_512_weights": (8, 512, 512, 512, 8)}

    def setup(self, layer):
        self.mha = common.require("multi_head_attention")
        B, L, S, E, H = self.shapes[layer]
        self.query = common.random_array((B, L, E), seed=30)
        self.memory = self.query if S == L else common.random_array((B, S, E), seed=31)
        scale = E ** -0.5
        self.kwargs = {name: common.random_array((E, E), seed) * scale for seed, name in
                       enumerate(("q_weight", "k_weight", "v_weight", "out_weight"), 32)}
        self.kwargs.update({name: common.random_array((E,), seed) for seed, name in
                            enumerate(("q_bias", "k_bias", "v_bias", "out_bias"), 36)})
        self.kwargs["need_weights"] = layer.endswith("_weights")
        self.heads = H

    def time_multi_head_attention(self, layer):
        self.mha(self.query, self.memory, self.memory, self.heads, **self.kwargs)


class MultiHeadAttentionBackward:
    """Training step of one layer: forward with ``return_cache=True`` then the backward
    (issue 15), B=8 L=S=256 E=768 H=12 float32 self-attention, dense or causal; against
    ``torch.nn.MultiheadAttention`` forward + ``.backward()`` at the same threads.

    ``track_sgemm_fraction`` counts the backward alone: the 8 projection products
    (dX and dW of Q, K, V and the output) and the attention core's 2.5x forward FLOPs.
    """
    params = [["self", "causal"]]
    param_names = ["variant"]
    batch, length = 8, 256

    def setup(self, variant):
        common.require("multi_head_attention_backward")
        import fastattn
        B, L = self.batch, self.length
        self.causal = variant == "causal"
        self.layer = fastattn.MultiHeadAttention(EMBED, HEADS, rng=40)
        self.x = common.random_array((B, L, EMBED), seed=41)
        self.grad = common.random_array((B, L, EMBED), seed=42)
        self.out, self.cache = self._forward()
        projection_flops = 2.0 * B * L * 4 * EMBED * EMBED
        self.flops = lambda: 2 * projection_flops + 2.5 * common.attention_flops(
            B, HEADS, L, L, EMBED // HEADS, EMBED // HEADS, self.causal)

    def _forward(self):
        return self.layer(self.x, is_causal=self.causal, return_cache=True)

    def _backward(self):
        return self.layer.backward(self.grad, self.cache)

    def _step(self):
        out, cache = self._forward()
        return self.layer.backward(self.grad, cache)

    def time_forward_backward(self, variant):
        self._step()

    def time_backward(self, variant):
        self._backward()

    def track_sgemm_fraction(self, variant):
        return common.gflops(self._backward, self.flops) / common.sgemm_gflops()
    track_sgemm_fraction.unit = "fraction of SGEMM rate"

    def track_speedup_over_torch(self, variant):
        try:
            import torch
        except ImportError:
            raise common.SkipNotImplemented("PyTorch is not installed") from None
        import fastattn
        threads = torch.get_num_threads()
        torch.set_num_threads(fastattn.get_num_threads())
        try:
            module = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
            x = torch.tensor(self.x, requires_grad=True)
            grad = torch.tensor(self.grad)
            L = self.length
            mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1) if self.causal else None

            def torch_step():
                module.zero_grad()
                x.grad = None
                out, _ = module(x, x, x, attn_mask=mask, is_causal=self.causal,
                                need_weights=False)
                out.backward(grad)
            return common.median_seconds(torch_step) / common.median_seconds(self._step)
        finally:
            torch.set_num_threads(threads)
    track_speedup_over_torch.unit = "x PyTorch"
