"""Regression tests for the defects of the reliability audit (issue 14), one per defect.

Each test is named after the defect it pins down and failed before its fix:
1. float32 softmax sums whose error grew with the row length;
2. unaligned (but contiguous) operands reaching the kernels unaligned;
3. sparse patterns and BlockLayout constructors failing on empty sequences;
4. silent wrong results and weak validation;
5. documented behaviour that differed (to_mask's shape, +inf scores under -inf masks,
   negative strides).
"""
import numpy as np
import pytest

import fastattn
from fastattn import reference
from helpers import assert_close


# ---- 1. long float32 rows ----------------------------------------------------------

def long_row(n):
    # the audit's row: smooth scores in [-3, 3], so every element counts
    return (np.sin(np.arange(n) * 1e-3) * 3).astype(np.float32)


@pytest.mark.parametrize("n", [2**22, 2**24 + 17])
def test_long_row_softmax_sum_does_not_drift(n):
    x = long_row(n)
    p = fastattn.masked_softmax(x)
    # float64 of the same row: the error must not grow with n (it was 1.8e-3 at 2^24)
    want = np.exp(x.astype(np.float64) - x.max())
    want /= want.sum()
    assert abs(p.sum(dtype=np.float64) - 1) < 2e-6
    assert np.abs(p - want).max() <= 2e-6 * want.max()
    lg = fastattn.log_softmax(x)
    assert np.abs(lg - np.log(want)).max() < 2e-5          # |log p| ~ 16 here


def test_long_key_row_attention_weights():
    # attention_weights: one query against 2^22 keys goes through the same row softmax
    n = 2**22
    k = long_row(n)[:, None]
    q = np.ones((1, 1), np.float32)
    w = fastattn.attention_weights(q, k, scale=1.0)
    assert abs(w.sum(dtype=np.float64) - 1) < 2e-6
