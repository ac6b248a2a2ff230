"""Mask builders against hand-written matrices and reference.causal_keep."""
import numpy as np
import pytest

import fastattn
from fastattn import reference


def test_causal_mask_by_hand():
    np.testing.assert_array_equal(fastattn.causal_mask(3), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(fastattn.causal_mask(2, 3), [[1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(fastattn.causal_mask(2, 3, alignment="bottom_right"),
                                  [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(fastattn.causal_mask(3, 2, alignment="bottom_right"),
                                  [[0, 0], [1, 0], [1, 1]])
    assert fastattn.causal_mask(0).shape == (0, 0)
    assert fastattn.causal_mask(1).dtype == bool


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_causal_mask_is_the_kernel_band(rng, alignment):
    L, S = 7, 11
    np.testing.assert_array_equal(fastattn.causal_mask(L, S, alignment=alignment),
                                  reference.causal_keep(L, S, alignment))
    q, k, v = (rng.standard_normal((2, n, 8)) for n in (L, S, S))
    a = fastattn.scaled_dot_product_attention(q, k, v, fastattn.causal_mask(
        L, S, alignment=alignment))
    b = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              causal_alignment=alignment)
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_padding_mask():
    m = fastattn.padding_mask([2, 0, 4], 4)
    assert m.shape == (3, 1, 1, 4) and m.dtype == bool
    np.testing.assert_array_equal(m[:, 0, 0], [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])


def test_combine_masks():
    c = fastattn.causal_mask(3)
    p = fastattn.padding_mask([2], 3)
    m = fastattn.combine_masks(c, None, p)
    np.testing.assert_array_equal(m[0, 0], c & [True, True, False])
    assert fastattn.combine_masks(None, None) is None
    f = fastattn.combine_masks(np.full((3, 3), 0.5, np.float32), c)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, np.where(c, 0.5, -np.inf))
    single = fastattn.combine_masks(c)
    assert single is not c and (single == c).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="alignment"):
        fastattn.causal_mask(3, alignment="diagonal")
    with pytest.raises(ValueError, match=">= 0"):
        fastattn.causal_mask(-1)
    with pytest.raises(TypeError):
        fastattn.causal_mask(2.5)
    with pytest.raises(ValueError, match=r"\[0, S=3\]"):
        fastattn.padding_mask([4], 3)
    with pytest.raises(ValueError, match="1-D"):
        fastattn.padding_mask([[1]], 3)
    with pytest.raises(TypeError):
        fastattn.padding_mask([1.5], 3)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
        fastattn.combine_masks(np.ones((3, 3), bool), np.ones((2, 2), bool))
    with pytest.raises(TypeError):
        fastattn.combine_masks(np.ones(3, dtype=int))
