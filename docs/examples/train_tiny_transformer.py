"""
Training a tiny transformer in NumPy
====================================

A two-layer decoder-only transformer learns to sort a sequence of digits, trained
from scratch in NumPy: token and position embeddings, pre-norm blocks of causal
multi-head self-attention (:class:`fastattn.MultiHeadAttention`, forward with
``return_cache=True`` and :meth:`~fastattn.MultiHeadAttention.backward`) and a ReLU
MLP, layer norms, a linear head, the cross-entropy loss through
:func:`fastattn.log_softmax`, and a plain Adam update. Every gradient is written out
by hand; the attention layers' come from fastattn's fused backward.

Each training sequence is ``digits, SEP, sorted digits``; the loss counts only the
predictions of the sorted part, so it starts near ``ln(10) = 2.3`` (guessing) and
falls to near 0 once the model sorts. Training stops when the loss, averaged over
the last steps, falls below ``--threshold`` (or after ``--time-limit`` seconds);
then the model sorts fresh sequences by greedy generation and the loss curve is
saved as a PNG (``--out``; default: the temporary directory).

See the :doc:`training guide </guide/training>`. Run:
``python train_tiny_transformer.py [--threads 2] [--out loss.png]`` (under a minute
on 2 cores; ``--help`` lists the sizes).
"""
import argparse
import os
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastattn

SEP = 10                # the separator token; digits are 0..9
VOCAB = 11


# %%
# The model and its gradients
# ---------------------------
# Every layer has a ``forward`` that returns what its ``backward`` needs, and a
# ``backward`` that returns the gradient of its input and fills ``grads`` (keyed like
# ``params``). The attention layer is fastattn's; the rest is a few lines of NumPy each.

def layer_norm(x, gain, bias, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * inv
    return xhat * gain + bias, (xhat, inv)


def layer_norm_backward(dy, gain, cache):
    xhat, inv = cache
    dxhat = dy * gain
    dx = inv * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axis=rows), dy.sum(axis=rows)


def weight_grad(dy, x):
    """``dY^T X`` summed over the batch: the gradient of ``W`` in ``y = x @ W.T + b``."""
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


class TinyTransformer:
    """Decoder-only, pre-norm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``, per layer."""

    def __init__(self, seq_len, dim=64, heads=4, layers=2, seed=0):
        rng = np.random.default_rng(seed)
        f32 = np.float32

        def dense(n_out, n_in):
            return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(f32)

        self.params = {"tok_embed": (0.5 * rng.standard_normal((VOCAB, dim))).astype(f32),
                       "pos_embed": (0.5 * rng.standard_normal((seq_len, dim))).astype(f32)}
        self.attn = []
        for i in range(layers):
            mha = fastattn.MultiHeadAttention(dim, heads, rng=rng)
            self.attn.append(mha)
            # the layer's own arrays: Adam's in-place updates reach the layer
            for name, p in mha.state_dict().items():
                self.params[f"{i}.attn.{name}"] = p
            self.params.update({
                f"{i}.ln1.gain": np.ones(dim, f32), f"{i}.ln1.bias": np.zeros(dim, f32),
                f"{i}.ln2.gain": np.ones(dim, f32), f"{i}.ln2.bias": np.zeros(dim, f32),
                f"{i}.mlp.w1": dense(4 * dim, dim), f"{i}.mlp.b1": np.zeros(4 * dim, f32),
                f"{i}.mlp.w2": dense(dim, 4 * dim), f"{i}.mlp.b2": np.zeros(dim, f32)})
        self.params.update({"ln_f.gain": np.ones(dim, f32), "ln_f.bias": np.zeros(dim, f32),
                            "head.w": dense(VOCAB, dim), "head.b": np.zeros(VOCAB, f32)})

    def forward(self, tokens):
        """Logits ``(B, T, VOCAB)`` and the caches of every layer."""
        p = self.params
        T = tokens.shape[1]
        x = p["tok_embed"][tokens] + p["pos_embed"][:T]
        caches = []
        for i, mha in enumerate(self.attn):
            h, ln1 = layer_norm(x, p[f"{i}.ln1.gain"], p[f"{i}.ln1.bias"])
            a, attn_cache = mha(h, is_causal=True, return_cache=True)
            x = x + a
            h2, ln2 = layer_norm(x, p[f"{i}.ln2.gain"], p[f"{i}.ln2.bias"])
            u = h2 @ p[f"{i}.mlp.w1"].T + p[f"{i}.mlp.b1"]
            r = np.maximum(u, 0)
            x = x + r @ p[f"{i}.mlp.w2"].T + p[f"{i}.mlp.b2"]
            caches.append((ln1, attn_cache, ln2, h2, u, r))
        hf, ln_f = layer_norm(x, p["ln_f.gain"], p["ln_f.bias"])
        logits = hf @ p["head.w"].T + p["head.b"]
        return logits, (tokens, caches, ln_f, hf)

    def backward(self, dlogits, cache):
        """Gradients of every parameter (keyed like ``params``) from ``dL/dlogits``."""
        p = self.params
        tokens, caches, ln_f, hf = cache
        g = {}
        rows = (0, 1)
        g["head.w"] = weight_grad(dlogits, hf)
        g["head.b"] = dlogits.sum(axis=rows)
        dx, g["ln_f.gain"], g["ln_f.bias"] = layer_norm_backward(dlogits @ p["head.w"],
                                                                 p["ln_f.gain"], ln_f)
        for i in reversed(range(len(self.attn))):
            ln1, attn_cache, ln2, h2, u, r = caches[i]
            # x = x + relu(h2 @ w1.T + b1) @ w2.T + b2
            g[f"{i}.mlp.w2"] = weight_grad(dx, r)
            g[f"{i}.mlp.b2"] = dx.sum(axis=rows)
            du = (dx @ p[f"{i}.mlp.w2"]) * (u > 0)
            g[f"{i}.mlp.w1"] = weight_grad(du, h2)
            g[f"{i}.mlp.b1"] = du.sum(axis=rows)
            dh2, g[f"{i}.ln2.gain"], g[f"{i}.ln2.bias"] = layer_norm_backward(
                du @ p[f"{i}.mlp.w1"], p[f"{i}.ln2.gain"], ln2)
            dx = dx + dh2
            # x = x + attn(h, h, h): fastattn's fused backward; h was query, key and value
            dq, dk, dv, attn_grads = self.attn[i].backward(dx, attn_cache)
            for name, grad in attn_grads.items():
                g[f"{i}.attn.{name}"] = grad
            dh, g[f"{i}.ln1.gain"], g[f"{i}.ln1.bias"] = layer_norm_backward(
                dq + dk + dv, p[f"{i}.ln1.gain"], ln1)
            dx = dx + dh
        g["tok_embed"] = np.zeros_like(p["tok_embed"])
        np.add.at(g["tok_embed"], tokens, dx)
        g["pos_embed"] = np.zeros_like(p["pos_embed"])
        g["pos_embed"][:tokens.shape[1]] = dx.sum(axis=0)
        return g


# %%
# The task, the loss and Adam
# ---------------------------

def sorting_batch(rng, batch, n):
    """Inputs ``digits, SEP, sorted[:-1]`` and targets: the next token at each position;
    ``weight`` is 1 where the target is one of the sorted digits."""
    digits = rng.integers(0, 10, (batch, n))
    seq = np.concatenate([digits, np.full((batch, 1), SEP), np.sort(digits, axis=1)], axis=1)
    weight = np.zeros((batch, 2 * n), np.float32)
    weight[:, n:] = 1.0 / (batch * n)
    return seq[:, :-1], seq[:, 1:], weight


def cross_entropy(logits, targets, weight):
    """Mean cross-entropy over the weighted positions, and its gradient."""
    logp = fastattn.log_softmax(logits)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = -float((weight * picked).sum())
    dlogits = np.exp(logp)                      # softmax - one_hot(target), weighted
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1, axis=-1)
    return loss, dlogits * weight[..., None]


class Adam:
    """Plain Adam (Kingma & Ba), updating the parameter arrays in place."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.98), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {n: np.zeros_like(a) for n, a in params.items()}
        self.v = {n: np.zeros_like(a) for n, a in params.items()}
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= (lr * m / (np.sqrt(v) + self.eps)).astype(p.dtype)


def sort_accuracy(model, rng, n, count=256):
    """Share of fresh sequences that greedy generation sorts exactly."""
    digits = rng.integers(0, 10, (count, n))
    seq = np.concatenate([digits, np.full((count, 1), SEP)], axis=1)
    for _ in range(n - 1):
        logits, _ = model.forward(seq)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    logits, _ = model.forward(seq)
    out = np.concatenate([seq[:, n + 1:], logits[:, -1].argmax(-1)[:, None]], axis=1)
    return float((out == np.sort(digits, axis=1)).all(axis=1).mean())


# %%
# Training
# --------

def train(args):
    """Train until the smoothed loss is below ``args.threshold`` or time runs out.

    Returns ``(model, history)``: ``history`` has one ``(step, seconds, loss)`` per step.
    """
    if args.threads:
        fastattn.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = TinyTransformer(2 * args.digits, args.dim, args.heads, args.layers, args.seed)
    adam = Adam(model.params, lr=args.lr)
    history, recent = [], []
    # NumPy's own BLAS runs the MLP and head products, single-threaded: its threads would
    # keep spinning after each product on the cores that fastattn's threads need next
    # (on a busy 2-core machine a (256 x 768) @ (768 x 64) product took 29 ms with 2
    # BLAS threads, 2 ms with one).
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            tokens, targets, weight = sorting_batch(rng, args.batch, args.digits)
            logits, cache = model.forward(tokens)
            loss, dlogits = cross_entropy(logits, targets, weight)
            adam.step(model.backward(dlogits, cache))
            seconds = time.perf_counter() - start
            history.append((step, seconds, loss))
            recent = (recent + [loss])[-args.window:]
            smoothed = sum(recent) / len(recent)
            if step == 1 or step % args.log_every == 0:
                print(f"step {step:5d}  {seconds:6.1f} s  loss {loss:.4f}  "
                      f"(mean of the last {len(recent)}: {smoothed:.4f})")
            if len(recent) == args.window and smoothed < args.threshold:
                print(f"step {step:5d}  {seconds:6.1f} s  mean loss of the last "
                      f"{args.window} steps {smoothed:.4f} < {args.threshold}: done")
                break
            if seconds > args.time_limit:
                print(f"time limit of {args.time_limit} s reached at step {step}: mean loss "
                      f"of the last {len(recent)} steps {smoothed:.4f} (threshold "
                      f"{args.threshold})")
                break
    return model, history


def plot(history, threshold, path):
    """The loss curve as a PNG at ``path``; returns the figure."""
    import matplotlib.pyplot as plt

    steps, seconds, losses = (np.array(c) for c in zip(*history))
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss of each batch")
    w = min(25, len(losses))
    ax.plot(steps[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), lw=2,
            label=f"mean of {w} steps")
    ax.axhline(np.log(10), color="grey", ls=":", label="guessing, ln 10")
    ax.axhline(threshold, color="tab:red", ls="--", label=f"threshold {threshold}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy of the sorted digits (nats)")
    ax.set_title(f"Tiny transformer learning to sort: {seconds[-1]:.0f} s, "
                 f"{fastattn.get_num_threads()} threads")
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=100)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a tiny transformer to sort digits.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--digits", type=int, default=10, help="length of each sequence")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=10000, help="at most this many steps")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="stop when the mean loss of the last --window steps is below")
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds")
    parser.add_argument("--threads", type=int, default=0,
                        help="fastattn's threads (0: fastattn's default)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="threads of NumPy's BLAS (the MLP and head products)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(),
                                                      "fastattn_train_tiny_transformer.png"),
                        help="where to save the loss curve (PNG)")
    return parser.parse_args(argv)


def main(argv=None):
    """Train, report, plot. Returns ``(model, history, figure)``."""
    args = parse_args(argv)
    model, history = train(args)
    accuracy = sort_accuracy(model, np.random.default_rng(args.seed + 1), args.digits)
    print(f"greedy generation sorts {accuracy:.0%} of 256 new sequences of "
          f"{args.digits} digits")
    fig = plot(history, args.threshold, args.out)
    print(f"loss curve saved to {args.out}")
    return model, history, fig


if __name__ == "__main__":
    main()
