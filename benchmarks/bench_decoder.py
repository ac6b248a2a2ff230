"""A 4-layer NumPy decoder over one whole-model PagedKVCache: Python overhead per step.

Target (issue 17): a decode step's Python overhead, everything but the kernels, is at
most 50 us per layer. The kernels are the paged attention kernel and the model's
matrix products; everything else counts as overhead: the cache's bookkeeping
(``extend`` once per step), each layer's ``write`` and ``attention`` wrappers, and the
model's own NumPy glue (RMS norms, reshapes, residual adds, ReLU, argmax), so the
number bounds what fastattn adds from above; ``fastattn`` is the cache's share alone.

Two methods (``measure``): the kernels stubbed out (the paged kernel does nothing,
each product returns a preallocated zero array), so a step takes exactly its
overhead; and the real kernels timed around each call, the overhead being what is
left of the step (this includes what the kernels do to the caches the Python code
then runs in, and the timing itself, measured separately as ``timer_cost``). Two
clocks: wall time, and the calling thread's CPU time (``time.thread_time``), which
leaves out the time the thread spends preempted: on a machine shared with other work
the wall-clock overhead mostly measures the other work.

Run directly for the report (repeats, best and spread):

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
    # x / sqrt(mean(x * x) + eps) over the last axis, in five ufunc calls (np.mean would
    # add a few microseconds of Python per call)
    ms = np.add.reduce(x * x, axis=-1, keepdims=True)
    ms *= 1.0 / x.shape[-1]
    ms += 1e-6
    return x / np.sqrt(ms, out=ms)


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


class _Kernels:
    """The decoder's kernels, real or stubbed out, timed by ``clock`` or not.

    The kernels are the paged attention kernel (the compiled entry point of
    ``fastattn._kernels.paged``) and every matrix product of the model. Stubbed, the
    paged kernel does nothing and a product returns a zero array of its result's
    shape (allocated once), so a step then takes exactly its overhead. Timed, each
    kernel call costs two clock reads and a Python call, which count as overhead:
    ``timer_cost`` measures that.
    """

    def __init__(self, stub=False, clock=None):
        self.stub, self.clock, self.seconds = stub, clock, 0.0
        self.results = {}

    def _timed(self, fn):
        if self.clock is None:
            return fn
        clock = self.clock

        def timed(*args):
            t0 = clock()
            result = fn(*args)
            self.seconds += clock() - t0
            return result
        return timed

    def _zeros(self, a, b):
        shape = a.shape[:-1] + b.shape[-1:]
        out = self.results.get(shape)
        if out is None:
            out = self.results[shape] = np.zeros(shape, np.result_type(a, b))
        return out

    @contextlib.contextmanager
    def installed(self, model=None):
        import fastattn.paged as paged
        real = paged._paged
        kernel = (lambda plan: None) if self.stub else real.paged_attention

        class Kernels:            # the kernel module as paged.py calls it
            PagedPlan = real.PagedPlan
            paged_attention = staticmethod(self._timed(kernel))
        paged._paged = Kernels
        if model is not None:
            model.matmul = self._timed(self._zeros if self.stub else np.matmul)
        try:
            yield self
        finally:
            paged._paged = real
            if model is not None:
                model.matmul = np.matmul


def _decode_run(steps, seed, clock, stub, timed):
    # (seconds, kernel seconds) of `steps` decode steps, after two warm-up steps
    model, cache, seq_ids, tokens = new_session(steps + 2, seed)
    kernels = _Kernels(stub, clock if timed else None)
    with kernels.installed(model):
        tokens = decode(model, cache, seq_ids, tokens, 2)
        kernels.seconds = 0.0
        t0 = clock()
        decode(model, cache, seq_ids, tokens, steps)
        return clock() - t0, kernels.seconds


def measure(steps=64, seed=0, clock=time.perf_counter):
    """Microseconds per layer and step, by ``clock``: a dict of

    - ``stubbed``: overhead with the kernels stubbed out (the step's time is all overhead);
    - ``timed``: step time minus the timed kernels' time, real kernels;
    - ``timer_cost``: what timing the kernels adds to ``timed`` (stubbed kernels, timed
      minus untimed);
    - ``kernels`` and ``total``: per step, real kernels;
    - ``fastattn``: the cache's share alone (``extend`` per step, ``write`` and
      ``attention`` per layer, the paged kernel stubbed out).
    """
    per_layer = 1e6 / steps / LAYERS
    stubbed, _ = _decode_run(steps, seed, clock, stub=True, timed=False)
    stub_timed, stub_kernels = _decode_run(steps, seed, clock, stub=True, timed=True)
    total, kernels = _decode_run(steps, seed, clock, stub=False, timed=True)
    return dict(stubbed=stubbed * per_layer,
                timed=(total - kernels) * per_layer,
                timer_cost=((stub_timed - stub_kernels) - stubbed) * per_layer,
                kernels=kernels * 1e6 / steps, total=total * 1e6 / steps,
                fastattn=_cache_share(steps, seed, clock) * per_layer)


def _cache_share(steps, seed, clock):
    # fastattn's part alone, on the decoder's shapes: seconds of `steps` steps
    _, cache, seq_ids, _ = new_session(steps, seed)
    rng = np.random.default_rng(seed)
    B, hd = len(seq_ids), DIM // HEADS
    q = rng.standard_normal((B, HEADS, 1, hd), dtype=np.float32)
    k = rng.standard_normal((B, KV_HEADS, 1, hd), dtype=np.float32)
    with _Kernels(stub=True).installed():
        t0 = clock()
        for _ in range(steps):
            slots = cache.extend(seq_ids)
            for layer in range(LAYERS):
                cache.write(slots, k, k, layer=layer)
                cache.attention(q, slots, layer=layer)
        return clock() - t0


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
        return measure(steps)["stubbed"]
    track_overhead_per_layer_us.unit = "us"

    def track_overhead_per_layer_cpu_us(self, steps):
        return measure(steps, clock=time.thread_time)["stubbed"]
    track_overhead_per_layer_cpu_us.unit = "us"

    def track_fastattn_overhead_per_layer_cpu_us(self, steps):
        return measure(steps, clock=time.thread_time)["fastattn"]
    track_fastattn_overhead_per_layer_cpu_us.unit = "us"


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        fastattn.set_num_threads(args.threads)
    print(f"{LAYERS}-layer decoder, dim {DIM}, {HEADS} heads / {KV_HEADS} kv-heads, batch "
          f"{len(PROMPTS)}, {args.steps} steps x {args.repeat} runs, "
          f"{fastattn.get_num_threads()} threads")
    names = dict(stubbed="overhead us/layer/step, kernels stubbed out",
                 timed="overhead us/layer/step, real kernels timed",
                 timer_cost="  of which timing the kernels",
                 fastattn="fastattn's own us/layer/step",
                 kernels="kernels us/step", total="total us/step")
    runs = {"wall": [], "thread CPU": []}
    for r in range(args.repeat):          # the two clocks interleaved: the same machine
        runs["wall"].append(measure(args.steps, seed=r))
        runs["thread CPU"].append(measure(args.steps, seed=r, clock=time.thread_time))
    for label, results in runs.items():
        print(f" {label} clock:")
        for key, name in names.items():
            values = sorted(r[key] for r in results)
            print(f"  {name:44s} best {values[0]:8.1f}  median {values[len(values) // 2]:8.1f}"
                  f"  worst {values[-1]:8.1f}")


if __name__ == "__main__":
    main()
