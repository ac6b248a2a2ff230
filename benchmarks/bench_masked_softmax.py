"""masked_softmax, log_softmax and attention_weights (issue 3).

Target: ``masked_softmax`` on (8, 12, 512, 512) float32 with a bool mask >= 3x
faster than ``np.where`` + ``scipy.special.softmax``
(``MaskedSoftmax.track_speedup_over_numpy``).
"""
import numpy as np


from . import common


def numpy_masked_softmax(x, mask, scale):
    """The unfused NumPy expression the fused kernel is measured against."""
    from scipy.special import softmax
    return softmax(np.where(mask, x * scale, -np.inf), axis=-1)


class MaskedSoftmax:
    """Scores (batch, 12, 512, 512) float32 with a (512, 512) mask broadcast over heads."""
    params = [[8], ["none", "bool", "float"]]
    param_names = ["batch", "mask"]

    def setup(self, batch, mask):
        self.masked_softmax = common.require("masked_softmax")
        self.x = common.random_array((batch, 12, 512, 512), seed=10)
        self.bool_mask = common.random_bool_mask((512, 512))
        self.mask = {"none": None, "bool": self.bool_mask,
                     "float": common.float_mask(self.bool_mask)}[mask]
        self.scale = np.float32(0.125)

    def _run(self):
        return self.masked_softmax(self.x, self.mask, scale=self.scale)

    def time_masked_softmax(self, batch, mask):
        self._run()

    def peakmem_masked_softmax(self, batch, mask):
        self._run()

    def track_speedup_over_numpy(self, batch, mask):
        numpy_mask = self.bool_mask if mask != "none" else True
        numpy_time = common.median_seconds(
            lambda: numpy_masked_softmax(self.x, numpy_mask, self.scale))
        return numpy_time / common.median_seconds(self._run)
    track_speedup_over_numpy.unit = "x"


class LogSoftmax:
    """log_softmax over the last axis of (8, 12, 512, 512) float32."""

    def setup(self):
        self.log_softmax = common.require("log_softmax")
        self.x = common.random_array((8, 12, 512, 512), seed=10)

    def time_log_softmax(self):
        self.log_softmax(self.x)


class AttentionWeights:
    """The materialised probabilities, B=1 H=8 E=64, by length, causal or not."""
    params = [[1024], [False, True]]
    param_names = ["length", "is_causal"]

    def setup(self, length, is_causal):
        self.attention_weights = common.require("attention_weights")
        self.q, self.k, _ = common.qkv(1, common.HEADS, length, length)

    def time_attention_weights(self, length, is_causal):
        self.attention_weights(self.q, self.k, is_causal=is_causal)


class LongRow:
    """One long float32 row (2^24 elements): the blocked, compensated sum of the exp
    pass (issue 14, defect 1) must cost what the plain lane sum did."""

    def setup(self):
        self.masked_softmax = common.require("masked_softmax")
        self.x = common.random_array((2**24,), seed=11)
        self.out = np.empty_like(self.x)

    def time_masked_softmax_long_row(self):
        self.masked_softmax(self.x, out=self.out)
