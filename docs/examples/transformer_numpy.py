"""
A Transformer forward pass in NumPy
===================================

The encoder-decoder model of "Attention Is All You Need" (post-norm, ReLU
feed-forward) with random weights, written with fastattn's building blocks: token
embeddings plus :func:`~fastattn.sinusoidal_positional_encoding`; encoder
self-attention under a :func:`~fastattn.padding_mask`; decoder self-attention under a
:func:`~fastattn.causal_mask` combined with the target padding
(:func:`~fastattn.combine_masks`); encoder-decoder cross-attention, all through
:class:`fastattn.MultiHeadAttention`; feed-forward blocks; and a
:func:`~fastattn.log_softmax` over the vocabulary.

See the :doc:`building-blocks guide </guide/building-blocks>`. Run:
``python docs/examples/transformer_numpy.py`` (a few seconds).
"""
import numpy as np

import fastattn


def layer_norm(x, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def linear(rng, n_out, n_in, dtype):
    """A torch.nn.Linear-style (weight, bias) pair."""
    bound = 1 / np.sqrt(n_in)
    return (rng.uniform(-bound, bound, (n_out, n_in)).astype(dtype),
            np.zeros(n_out, dtype=dtype))


class FeedForward:
    def __init__(self, rng, d_model, d_ff, dtype):
        self.w1, self.b1 = linear(rng, d_ff, d_model, dtype)
        self.w2, self.b2 = linear(rng, d_model, d_ff, dtype)

    def __call__(self, x):
        return np.maximum(x @ self.w1.T + self.b1, 0) @ self.w2.T + self.b2


class EncoderLayer:
    def __init__(self, rng, d_model, num_heads, d_ff, dtype):
        self.self_attn = fastattn.MultiHeadAttention(d_model, num_heads, rng=rng, dtype=dtype)
        self.ff = FeedForward(rng, d_model, d_ff, dtype)

    def __call__(self, x, src_keep):
        x = layer_norm(x + self.self_attn(x, key_padding_mask=src_keep))
        return layer_norm(x + self.ff(x))


class DecoderLayer:
    def __init__(self, rng, d_model, num_heads, d_ff, dtype):
        self.self_attn = fastattn.MultiHeadAttention(d_model, num_heads, rng=rng, dtype=dtype)
        self.cross_attn = fastattn.MultiHeadAttention(d_model, num_heads, rng=rng, dtype=dtype)
        self.ff = FeedForward(rng, d_model, d_ff, dtype)

    def __call__(self, y, memory, tgt_mask, src_keep):
        # masked self-attention: each target position sees itself and earlier ones
        y = layer_norm(y + self.self_attn(y, attn_mask=tgt_mask))
        # cross-attention: queries from the decoder, keys/values from the encoder
        y = layer_norm(y + self.cross_attn(y, memory, key_padding_mask=src_keep))
        return layer_norm(y + self.ff(y))


class Transformer:
    def __init__(self, vocab=1000, d_model=128, num_heads=8, d_ff=512, layers=2, seed=0,
                 dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.d_model, self.dtype = d_model, dtype
        self.embed = rng.normal(0, d_model ** -0.5, (vocab, d_model)).astype(dtype)
        self.encoder = [EncoderLayer(rng, d_model, num_heads, d_ff, dtype)
                        for _ in range(layers)]
        self.decoder = [DecoderLayer(rng, d_model, num_heads, d_ff, dtype)
                        for _ in range(layers)]

    def embed_tokens(self, tokens):
        pe = fastattn.sinusoidal_positional_encoding(tokens.shape[-1], self.d_model,
                                                     dtype=self.dtype)
        return self.embed[tokens] * np.sqrt(self.d_model).astype(self.dtype) + pe

    def __call__(self, src, src_lengths, tgt, tgt_lengths):
        """Log-probabilities of the next token, shape (B, T, vocab).

        src (B, S) and tgt (B, T) are token ids padded to a common length; the
        lengths say how many are real.
        """
        S, T = src.shape[-1], tgt.shape[-1]
        src_keep = fastattn.padding_mask(src_lengths, S)[:, 0, 0]        # (B, S)
        tgt_mask = fastattn.combine_masks(fastattn.causal_mask(T),
                                          fastattn.padding_mask(tgt_lengths, T))
        memory = self.embed_tokens(src)
        for layer in self.encoder:
            memory = layer(memory, src_keep)
        y = self.embed_tokens(tgt)
        for layer in self.decoder:
            y = layer(y, memory, tgt_mask, src_keep)
        logits = y @ self.embed.T                                        # tied embeddings
        return fastattn.log_softmax(logits)


def main():
    rng = np.random.default_rng(1)
    model = Transformer()
    B, S, T = 4, 32, 24
    src = rng.integers(0, 1000, (B, S))
    tgt = rng.integers(0, 1000, (B, T))
    logp = model(src, np.array([32, 20, 9, 1]), tgt, np.array([24, 24, 10, 3]))
    print(f"log-probabilities {logp.shape} {logp.dtype}; "
          f"each row sums to {np.exp(logp).sum(-1).mean():.4f}")
    return logp


if __name__ == "__main__":
    main()
