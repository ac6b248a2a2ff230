"""Sinusoidal positional encoding and rotary embeddings against fastattn.reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fastattn
from fastattn import reference
from helpers import assert_close


@pytest.mark.parametrize("length, dim", [(1, 1), (7, 4), (5, 9), (50, 64), (0, 3)])
def test_sinusoidal_matches_reference(length, dim):
    pe = fastattn.sinusoidal_positional_encoding(length, dim, dtype=np.float64)
    assert pe.shape == (length, dim)
    np.testing.assert_allclose(pe, reference.sinusoidal_positional_encoding(length, dim),
                               atol=1e-12)
    assert fastattn.sinusoidal_positional_encoding(length, dim).dtype == np.float32


def test_sinusoidal_base_and_bad_inputs():
    pe = fastattn.sinusoidal_positional_encoding(3, 4, base=100.0, dtype=np.float64)
    np.testing.assert_allclose(pe, reference.sinusoidal_positional_encoding(3, 4, base=100.0))
    with pytest.raises(ValueError):
        fastattn.sinusoidal_positional_encoding(-1, 4)
    with pytest.raises(ValueError, match="base"):
        fastattn.sinusoidal_positional_encoding(3, 4, base=0)
    with pytest.raises(TypeError):
        fastattn.sinusoidal_positional_encoding(3, 4, dtype=np.int32)


@given(S=st.integers(1, 20), D=st.sampled_from([2, 4, 16, 64]),
       layout=st.sampled_from(["interleaved", "half"]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_rotary_matches_reference(S, D, layout, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, S, D)).astype(dtype)
    pos = rng.integers(0, 1000, S)
    got = fastattn.apply_rotary(x, pos, layout=layout)
    assert got.dtype == dtype
    assert_close(got, reference.apply_rotary(x, pos, layout=layout), dtype)


def test_rotary_relative_positions_and_norm(rng):
    q, k = rng.standard_normal((2, 32))
    for layout in ("interleaved", "half"):
        rot = lambda x, p: fastattn.apply_rotary(x, p, layout=layout)  # noqa: E731
        assert np.isclose(rot(q, 10) @ rot(k, 4), rot(q, 106) @ rot(k, 100))
        assert np.isclose(np.linalg.norm(rot(q, 7)), np.linalg.norm(q))


def test_rotary_half_layout_is_rotate_half(rng):
    # Hugging Face Llama: x * cos + rotate_half(x) * sin with duplicated frequencies
    x = rng.standard_normal((5, 8))
    pos = np.arange(5)
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    ang = np.concatenate([np.outer(pos, inv)] * 2, axis=-1)
    rotate_half = np.concatenate([-x[:, 4:], x[:, :4]], axis=-1)
    np.testing.assert_allclose(fastattn.apply_rotary(x, pos, layout="half"),
                               x * np.cos(ang) + rotate_half * np.sin(ang), atol=1e-12)


def test_rotary_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        fastattn.apply_rotary(np.ones((3, 5)), np.arange(3))
    with pytest.raises(ValueError, match="broadcast"):
        fastattn.apply_rotary(np.ones((3, 4)), np.arange(4))
    with pytest.raises(ValueError, match="layout"):
        fastattn.apply_rotary(np.ones((3, 4)), np.arange(3), layout="pairs")
    with pytest.raises(TypeError):
        fastattn.apply_rotary(np.ones((3, 4), dtype=complex), np.arange(3))
