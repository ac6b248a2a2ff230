"""Assertions shared by the tests."""
import numpy as np

# Tolerances against the float64 reference, relative to max |reference output|.
RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10, np.dtype(np.float16): 2e-3}


def assert_close(actual, expected, dtype):
    """Compare with the reference: error <= tol * max|expected| (absolute when that is 0)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= RTOL[np.dtype(dtype)] * scale, f"max error {err:.3g} (scale {scale:.3g})"


def assert_lse_close(actual, expected, dtype):
    actual = np.asarray(actual, dtype=np.float64)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    fin = np.isfinite(expected)
    assert_close(actual[fin], expected[fin], dtype)
