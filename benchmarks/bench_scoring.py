"""Classic scoring rules (issue 3): Bahdanau additive, Luong general and concat.

Target: ``additive_attention`` at L=S=512, hidden 256 >= 5x faster than the
broadcasting NumPy formula (``Scoring.track_speedup_over_numpy``) and without its
O(L·S·hidden) memory (``peakmem_scoring``).
"""
import numpy as np

from . import common

LENGTH, EMBED, HIDDEN = 512, 64, 256


def numpy_additive_attention(query, key, value, w_q, w_k, v):
    """Bahdanau by broadcasting: materialises the (L, S, hidden) tensor."""
    from scipy.special import softmax
    features = np.tanh((query @ w_q.T)[..., :, None, :] + (key @ w_k.T)[..., None, :, :])
    return softmax(features @ v, axis=-1) @ value


class Scoring:
    """One sequence pair, L=S=512, E=64, hidden 256, float32."""
    params = [["additive", "general", "concat"]]
    param_names = ["rule"]

    def setup(self, rule):
        self.attention = common.require(f"{rule}_attention")
        self.query = common.random_array((1, LENGTH, EMBED), seed=30)
        self.key = common.random_array((1, LENGTH, EMBED), seed=31)
        self.value = common.random_array((1, LENGTH, EMBED), seed=32)
        scale = np.float32(EMBED ** -0.5)
        if rule == "additive":
            self.weights = {"w_q": common.random_array((HIDDEN, EMBED), 33) * scale,
                            "w_k": common.random_array((HIDDEN, EMBED), 34) * scale,
                            "v": common.random_array((HIDDEN,), 35)}
        elif rule == "general":
            self.weights = {"w": common.random_array((EMBED, EMBED), 36) * scale}
        else:   # concat: score = v . tanh(W [q; k]); the signature is issue 3's to settle
            self.weights = {"w": common.random_array((HIDDEN, 2 * EMBED), 37) * scale,
                            "v": common.random_array((HIDDEN,), 35)}

    def _run(self):
        return self.attention(self.query, self.key, self.value, **self.weights)

    def time_scoring(self, rule):
        self._run()

    def peakmem_scoring(self, rule):
        self._run()

    def track_speedup_over_numpy(self, rule):
        if rule != "additive":
            raise common.SkipNotImplemented("NumPy baseline only for the additive rule")
        numpy_time = common.median_seconds(
            lambda: numpy_additive_attention(self.query, self.key, self.value, **self.weights))
        return numpy_time / common.median_seconds(self._run)
    track_speedup_over_numpy.unit = "x"
