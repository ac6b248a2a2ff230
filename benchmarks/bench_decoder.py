"""A 4-layer NumPy decoder over one whole-model PagedKVCache: Python overhead per step.

Target (issue 17): a decode step's Python overhead, everything but the kernels, is at
most 50 us per layer. The kernels are the paged attention kernel (timed around its
compiled entry point) and the model's matrix products (timed around each ``@``);
everything else counts as overhead: the cache's bookkeeping (``extend``), each
layer's ``write`` and ``attention`` wrappers, and the model's own NumPy glue (RMS
norms, reshapes, residual adds, ReLU), so the number is an upper bound on what
fastattn adds. ``track_fastattn_overhead_per_layer_us`` is the cache's share alone.

Run directly for the report (interleaved repeats, best and spread):

    python benchmarks/bench_decoder.py [--repeat 7] [--steps 64]
"""
import contextlib
import time

import numpy as np

import fastattn

try:
    from . import common
except ImportError:                     # run as a script
    common = None

LAYERS, DIM, HEADS, KV_HEADS, BLOCK = 4, 256, 8, 2, 16
PROMPTS = (17, 5, 40, 9)                # ragged prompt lengths of the batch


def _rms_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class Decoder:
    """Pre-norm decoder with grouped-query attention and a ReLU MLP, random weights.

    ``matmul`` is the product every projection goes through: ``np.matmul``, or a
    timing wrapper when measuring kernel time.
    """

    def __init__(self, vocab=512, seed=0):
        rng = np.random.default_rng(seed)

        def weight(*shape):
            return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

        self.hd = DIM // HEADS
        self.embed = weight(vocab, DIM) * 8
        self.layers = [dict(wq=weight(DIM, HEADS * self.hd), wk=weight(DIM, KV_HEADS * self.hd),
                            wv=weight(DIM, KV_HEADS * self.hd), wo=weight(HEADS * self.hd, DIM),
                            w1=weight(DIM, 4 * DIM), w2=weight(4 * DIM, DIM))
                       for _ in range(LAYERS)]
        self.unembed = weight(DIM, vocab)
        self.matmul = np.matmul

    def forward(self, cache, seq_ids, tokens, num_tokens):
        """Logits (B, T, vocab) of T new tokens per sequence (tokens (B, T)), extending
        the cache by T tokens in every layer: one ``extend``, then per layer one
        ``write`` and one ``attention``."""
        mm = self.matmul
        B, T = tokens.shape
        slots = cache.extend(seq_ids, num_tokens)
        x = self.embed[tokens]
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x)
            q = mm(h, layer["wq"]).reshape(B, T, HEADS, self.hd).transpose(0, 2, 1, 3)
            k = mm(h, layer["wk"]).reshape(B, T, KV_HEADS, self.hd).transpose(0, 2, 1, 3)
            v = mm(h, layer["wv"]).reshape(B, T, KV_HEADS, self.hd).transpose(0, 2, 1, 3)
            cache.write(slots, k, v, layer=index)
            a = cache.attention(q, slots, layer=index)
            x = x + mm(a.transpose(0, 2, 1, 3).reshape(B, T, DIM), layer["wo"])
            x = x + mm(np.maximum(mm(_rms_norm(x), layer["w1"]), 0), layer["w2"])
        return mm(_rms_norm(x), self.unembed)


def new_session(steps, seed=0):
    """A decoder, its cache with the ragged prompts prefilled (one call each), the
    sequence ids and the first decode tokens; room for ``steps`` decode steps."""
    model = Decoder(seed=seed)
    blocks = sum(-(-(n + steps) // BLOCK) for n in PROMPTS)
    cache = fastattn.PagedKVCache(blocks, BLOCK, KV_HEADS, model.hd, num_layers=LAYERS)
    seq_ids = [cache.add_sequence() for _ in PROMPTS]
    rng = np.random.default_rng(seed + 1)
    last = []
    for seq, n in zip(seq_ids, PROMPTS):
        logits = model.forward(cache, [seq], rng.integers(0, 512, (1, n)), n)
        last.append(int(np.argmax(logits[0, -1])))
    return model, cache, seq_ids, np.array(last)[:, None]


def decode(model, cache, seq_ids, tokens, steps):
    for _ in range(steps):
        logits = model.forward(cache, seq_ids, tokens, 1)
        tokens = np.argmax(logits[:, -1], axis=-1)[:, None]
    return tokens


class _KernelClock:
    """Seconds spent in kernels: the paged attention kernel's compiled entry point and
    every matrix product of the model. Costs two clock reads per kernel call, which
    count as overhead."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        clock = time.perf_counter

        def timed(*args):
            t0 = clock()
            result = fn(*args)
            self.seconds += clock() - t0
            return result
        return timed

    @contextlib.contextmanager
    def installed(self, model=None):
        import fastattn.paged as paged
        real = paged._paged

        class Kernels:            # the kernel module, with its entry point timed
            PagedPlan = real.PagedPlan
            paged_attention = staticmethod(self.wrap(real.paged_attention))
        paged._paged = Kernels
        if model is not None:
            model.matmul = self.wrap(np.matmul)
        try:
            yield self
        finally:
            paged._paged = real
            if model is not None:
                model.matmul = np.matmul


def measure(steps=64, seed=0):
    """(overhead us per layer and step, kernel us per step, total us per step,
    fastattn's own us per layer and step) over ``steps`` decode steps."""
    model, cache, seq_ids, tokens = new_session(steps, seed)
    decode(model, cache, seq_ids, tokens, 2)                       # warm up
    clock = _KernelClock()
    with clock.installed(model):
        t0 = time.perf_counter()
        decode(model, cache, seq_ids, tokens, steps)
        total = time.perf_counter() - t0
    overhead = (total - clock.seconds) / steps / LAYERS * 1e6
    return overhead, clock.seconds / steps * 1e6, total / steps * 1e6, _cache_share(steps, seed)


def _cache_share(steps, seed):
    # fastattn's part alone: one extend per step, a write and an attention call per layer
    # (kernel excluded), on the same shapes as the decoder's
    _, cache, seq_ids, _ = new_session(steps, seed)
    rng = np.random.default_rng(seed)
    B, hd = len(seq_ids), DIM // HEADS
    q = rng.standard_normal((B, HEADS, 1, hd), dtype=np.float32)
    k = rng.standard_normal((B, KV_HEADS, 1, hd), dtype=np.float32)
    clock = _KernelClock()
    with clock.installed():
        t0 = time.perf_counter()
        for _ in range(steps):
            slots = cache.extend(seq_ids)
            for layer in range(LAYERS):
                cache.write(slots, k, k, layer=layer)
                cache.attention(q, slots, layer=layer)
        total = time.perf_counter() - t0
    return (total - clock.seconds) / steps / LAYERS * 1e6


class DecodeStep:
    """One batched decode step of the 4-layer decoder (B=4 ragged sequences)."""
    params = [[32]]
    param_names = ["steps"]

    def setup(self, steps):
        if common is not None:
            common.require("PagedKVCache")
        self.model, self.cache, self.seq_ids, self.tokens = new_session(steps + 64)
        self.steps = steps

    def time_decode_step(self, steps):
        self.tokens = decode(self.model, self.cache, self.seq_ids, self.tokens, 1)

    def track_overhead_per_layer_us(self, steps):
        return measure(steps)[0]
    track_overhead_per_layer_us.unit = "us"

    def track_fastattn_overhead_per_layer_us(self, steps):
        return measure(steps)[3]
    track_fastattn_overhead_per_layer_us.unit = "us"


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        fastattn.set_num_threads(args.threads)
    runs = [measure(args.steps, seed=r) for r in range(args.repeat)]
    columns = list(zip(*runs))
    names = ("overhead us/layer/step (all but kernels)", "kernels us/step", "total us/step",
             "fastattn's own us/layer/step")
    print(f"{LAYERS}-layer decoder, dim {DIM}, {HEADS} heads / {KV_HEADS} kv-heads, batch "
          f"{len(PROMPTS)}, {args.steps} steps x {args.repeat} runs, "
          f"{fastattn.get_num_threads()} threads")
    for name, values in zip(names, columns):
        values = sorted(values)
        print(f"  {name:42s} best {values[0]:8.1f}  median {values[len(values) // 2]:8.1f}  "
              f"worst {values[-1]:8.1f}")


if __name__ == "__main__":
    main()
