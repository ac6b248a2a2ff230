"""A toy autoregressive decoder (random weights) generating with a paged KV cache.

All layers keep their keys and values in one `fastattn.PagedKVCache(num_layers=...)`:
one block table, one `extend` per step for every layer, then per layer a `write` of
its keys and values and an `attention` call. Prompts of different lengths are
prefilled one sequence at a time (T = prompt length); then every decoding step adds
one token per sequence and attends the whole batch at once (T = 1). `ToyDecoder.forward_full` runs the same model
over a whole text without a cache, with `fastattn.scaled_dot_product_attention`:
the two agree, which is what the tests check.

Run:  python docs/examples/toy_decoder.py
"""
import numpy as np

import fastattn


def rms_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class ToyDecoder:
    """Pre-norm transformer decoder: token + position embeddings, ``layers`` blocks of
    grouped-query self-attention and a ReLU MLP, then a linear map to the vocabulary."""

    def __init__(self, vocab=100, dim=64, heads=8, kv_heads=2, layers=2, max_len=512, seed=0):
        rng = np.random.default_rng(seed)

        def weight(*shape):
            return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = weight(vocab, dim) * np.sqrt(vocab).astype(np.float32)
        self.pos = weight(max_len, dim) * np.sqrt(max_len).astype(np.float32) * 0.1
        hd = self.head_dim
        self.layers = [dict(wq=weight(dim, heads * hd), wk=weight(dim, kv_heads * hd),
                            wv=weight(dim, kv_heads * hd), wo=weight(heads * hd, dim),
                            w1=weight(dim, 4 * dim), w2=weight(4 * dim, dim))
                       for _ in range(layers)]
        self.unembed = weight(dim, vocab) * 4

    def new_cache(self, num_blocks, block_size):
        """One paged cache for all the layers."""
        return fastattn.PagedKVCache(num_blocks, block_size, self.kv_heads, self.head_dim,
                                     num_layers=len(self.layers))

    def _qkv(self, layer, x):
        # x (B, T, dim) -> q (B, H, T, hd), k and v (B, H_kv, T, hd)
        B, T, _ = x.shape
        h = rms_norm(x)
        q = (h @ layer["wq"]).reshape(B, T, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = (h @ layer["wk"]).reshape(B, T, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = (h @ layer["wv"]).reshape(B, T, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return q, k, v

    def _finish_layer(self, layer, x, attn):
        # attn (B, H, T, hd): output projection, residual, MLP
        B, _, T, _ = attn.shape
        x = x + attn.transpose(0, 2, 1, 3).reshape(B, T, -1) @ layer["wo"]
        return x + np.maximum(rms_norm(x) @ layer["w1"], 0) @ layer["w2"]

    def forward(self, cache, seq_ids, tokens, positions):
        """Logits (B, T, vocab) of T new tokens per sequence, extending the cache.

        tokens, positions: int arrays (B, T).
        """
        x = self.embed[tokens] + self.pos[positions]
        slots = cache.extend(seq_ids, tokens.shape[1])   # room for T tokens, every layer
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x)
            cache.write(slots, k, v, layer=index)        # this layer's keys and values
            # causal, bottom-right: new token t sees the cache up to and including itself
            x = self._finish_layer(layer, x, cache.attention(q, slots, layer=index))
        return rms_norm(x) @ self.unembed

    def forward_full(self, tokens):
        """Logits (L, vocab) of a whole text, without a cache (for checking)."""
        x = (self.embed[tokens] + self.pos[np.arange(len(tokens))])[None]
        for layer in self.layers:
            q, k, v = self._qkv(layer, x)
            attn = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True)
            x = self._finish_layer(layer, x, attn)
        return (rms_norm(x) @ self.unembed)[0]


def generate(model, prompts, steps, block_size=16):
    """Greedy decoding of ``steps`` tokens for each prompt (lists of token ids).

    Returns the token lists (prompt + generated) and, per sequence, the logits that
    chose its last token.
    """
    blocks_per_seq = -(-(max(map(len, prompts)) + steps) // block_size)
    cache = model.new_cache(len(prompts) * blocks_per_seq, block_size)
    seq_ids = [cache.add_sequence() for _ in prompts]

    # prefill: one sequence at a time, since prompt lengths differ
    last_logits = []
    for seq, prompt in zip(seq_ids, prompts):
        logits = model.forward(cache, [seq], np.array([prompt]), np.arange(len(prompt))[None])
        last_logits.append(logits[0, -1])
    tokens = [list(p) + [int(np.argmax(lg))] for p, lg in zip(prompts, last_logits)]

    # decode: the whole batch, one new token per sequence per step
    for _ in range(steps - 1):
        new = np.array([[t[-1]] for t in tokens])
        positions = np.array([[len(t) - 1] for t in tokens])
        logits = model.forward(cache, seq_ids, new, positions)[:, -1]
        for t, lg in zip(tokens, logits):
            t.append(int(np.argmax(lg)))
        last_logits = list(logits)

    for seq in seq_ids:
        cache.free(seq)
    assert cache.num_free_blocks == len(prompts) * blocks_per_seq
    return tokens, last_logits


if __name__ == "__main__":
    model = ToyDecoder()
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34, 55, 89], [7], [42] * 20]
    tokens, _ = generate(model, prompts, steps=64)
    for p, t in zip(prompts, tokens):
        print(f"prompt {len(p):2d} tokens -> generated {t[len(p):len(p) + 10]} ...")
