"""Score modifiers (window, ALiBi, soft-capping) and packed varlen batches (issue 19).

Targets (2 threads, float32, E=64; measured together by ``benchmarks/mods_targets.py``):
a causal window of 4096 keys over L=S=32768 H=8 costs <= 1.3x dense L=S=8192 per
visible (query, key) pair and beats the same band as a bool mask
(``SlidingWindow.track_ps_per_pair``, ``WindowAsMask``); ALiBi and soft-capping add
<= 10 % (``ScoreModifiers.time_sdpa`` against ``kind="none"``); a packed causal batch of
16 sequences of U(64, 2048) tokens is >= 1.5x faster than the batch padded to 2048 with
a padding mask and reaches >= 0.85 of a dense call's GFLOP/s (``Varlen``).
"""
import inspect

import numpy as np

import fastattn

from . import common

SLOPES = 2.0 ** (-8.0 * np.arange(1, common.HEADS + 1) / common.HEADS)   # BLOOM's, H = 8
SOFTCAP = 30.0
VARLEN_SEQUENCES, VARLEN_MIN, VARLEN_MAX = 16, 64, 2048


def _require_modifiers():
    """NotImplementedError (asv's skip) on a fastattn without the issue-19 keywords."""
    if "window" not in inspect.signature(fastattn.scaled_dot_product_attention).parameters:
        raise NotImplementedError("scaled_dot_product_attention has no window/alibi/softcap")


def visible_pairs(L, S, left, causal=True):
    """(query, key) pairs a causal window of ``left`` keys back leaves, per head."""
    i = np.arange(L, dtype=np.int64)
    hi = np.minimum(i, S - 1) if causal else np.full(L, S - 1)
    lo = np.maximum(i - left, 0)
    return int(np.maximum(hi - lo + 1, 0).sum())


def varlen_lengths(max_length=VARLEN_MAX):
    """The packed batch's sequence lengths, U(64, max_length), the same on every run."""
    rng = np.random.default_rng([common.SEED, 19])
    return rng.integers(VARLEN_MIN, max_length + 1, VARLEN_SEQUENCES)


class ScoreModifiers:
    """ALiBi and soft-capping against none, B=1 H=8 L=S=2048 E=64 float32."""
    params = [["none", "alibi", "softcap", "alibi+softcap"], [False, True]]
    param_names = ["kind", "causal"]

    def setup(self, kind, causal):
        _require_modifiers()
        self.q, self.k, self.v = common.qkv(1, common.HEADS, 2048, 2048)
        self.kwargs = {"is_causal": causal}
        if "alibi" in kind:
            self.kwargs["alibi_slopes"] = SLOPES
        if "softcap" in kind:
            self.kwargs["softcap"] = SOFTCAP

    def time_sdpa(self, kind, causal):
        fastattn.scaled_dot_product_attention(self.q, self.k, self.v, **self.kwargs)


class SlidingWindow:
    """A causal window of ``window`` keys over L=S=length, H=8 E=64: time per visible pair
    against dense attention at L=S=8192 (``length`` 8192, ``window`` None)."""
    params = [[(2048, None), (8192, None), (8192, 512), (16384, 4096), (32768, 4096)]]
    param_names = ["length_window"]
    timeout = 600

    def setup(self, length_window):
        _require_modifiers()
        length, window = length_window
        self.q, self.k, self.v = common.qkv(1, common.HEADS, length, length)
        if window is None:
            self.kwargs, self.pairs = {}, common.HEADS * length * length
        else:
            self.kwargs = {"is_causal": True, "window": (window - 1, 0)}
            self.pairs = common.HEADS * visible_pairs(length, length, window - 1)

    def _run(self):
        return fastattn.scaled_dot_product_attention(self.q, self.k, self.v, **self.kwargs)

    def time_sdpa(self, length_window):
        self._run()

    def track_ps_per_pair(self, length_window):
        return common.median_seconds(self._run) / self.pairs * 1e12
    track_ps_per_pair.unit = "ps"


class WindowAsMask:
    """The same causal window as a bool (L, S) mask (the only way before issue 19)."""
    params = [[(2048, 512), (16384, 4096)]]
    param_names = ["length_window"]
    timeout = 600

    def setup(self, length_window):
        _require_modifiers()
        length, window = length_window
        self.q, self.k, self.v = common.qkv(1, common.HEADS, length, length)
        i = np.arange(length)
        self.mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

    def time_sdpa(self, length_window):
        fastattn.scaled_dot_product_attention(self.q, self.k, self.v, self.mask)


class Varlen:
    """Packed causal batch of 16 sequences of U(64, max_length) tokens, H=8 E=64 float32
    (the target: max_length 2048): ``packed`` (varlen_attention), ``padded`` (padded to
    max_length, padding mask) and
    ``dense`` (one causal sequence with the same number of visible pairs)."""
    params = [[256, VARLEN_MAX], ["packed", "padded", "dense"]]
    param_names = ["max_length", "layout"]

    def setup(self, max_length, layout):
        lens = varlen_lengths(max_length)
        self.pairs = common.HEADS * int((lens * (lens + 1) // 2).sum())
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        total = int(cu[-1])
        H, E = common.HEADS, common.HEAD_DIM
        if layout == "packed":
            varlen = common.require("varlen_attention")
            q, k, v = (common.random_array((total, H, E), s) for s in (1, 2, 3))
            self.run = lambda: varlen(q, k, v, cu, cu, is_causal=True)
        elif layout == "padded":
            q, k, v = common.qkv(VARLEN_SEQUENCES, H, max_length, max_length)
            keep = (np.arange(max_length)[None, :] < lens[:, None])[:, None, None, :]
            self.run = lambda: fastattn.scaled_dot_product_attention(q, k, v, keep,
                                                                     is_causal=True)
        else:
            L = int(round((np.sqrt(1 + 8 * self.pairs / H) - 1) / 2))
            self.pairs = H * L * (L + 1) // 2
            q, k, v = common.qkv(1, H, L, L)
            self.run = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    def time_attention(self, max_length, layout):
        self.run()

    def track_gflops(self, max_length, layout):
        return 4.0 * self.pairs * common.HEAD_DIM / common.median_seconds(self.run) / 1e9
    track_gflops.unit = "GFLOP/s"
