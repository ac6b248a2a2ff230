"""Assertions and strategies shared by the tests."""
import ml_dtypes
import numpy as np
from hypothesis import strategies as st

# Tolerances against the float64 reference, relative to max |reference output|.
RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10, np.dtype(np.float16): 2e-3,
        np.dtype(ml_dtypes.bfloat16): 1e-2}


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


def draw_block_rule(draw):
    """Inside a ``@st.composite`` strategy: a block-sparse problem's lengths ``L`` and
    ``S`` (1-120), block size, the element rule of ``BlockLayout.from_rule`` /
    ``from_blocks`` (window, dilation, segment, is_causal, global queries and keys, a
    mask) and the seed its random parts come from, as a dict."""
    L = draw(st.integers(1, 120))
    S = draw(st.integers(1, 120))
    block = (draw(st.sampled_from([1, 4, 16, 64])), draw(st.sampled_from([1, 5, 16, 64])))
    rule = {}
    if draw(st.booleans()):
        rule["window"] = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
    if draw(st.booleans()):
        rule["dilation"] = draw(st.integers(1, 5))
    if draw(st.integers(0, 3)) == 0:
        rule["segment"] = draw(st.integers(1, 20))
    rule["is_causal"] = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        rule["global_query"] = rng.random(L) < 0.05
    if draw(st.booleans()):
        rule["global_key"] = np.flatnonzero(rng.random(S) < 0.05)
    if draw(st.integers(0, 3)) == 0:
        rule["mask"] = rng.random(draw(st.sampled_from([(L, S), (1, S), (L, 1)]))) > 0.3
    return dict(L=L, S=S, block=block, rule=rule, seed=seed)


def load_ascend_harness():
    """The ascend simulator harness (tests/ascend_sim/harness.py), loaded once per session.

    It is loaded by path and cached under one module name so that every test module
    shares its session fixtures (one simulator build per run).
    """
    import importlib.util
    import sys
    from pathlib import Path

    name = "ascend_sim_harness"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent / "ascend_sim" / "harness.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def check_scratch_failure(call, nfail=1):
    """``call()`` raises MemoryError when the next ``nfail`` scratch allocations of the
    parallel skeleton fail, leaves no scratch block behind, and the call after it
    gives the same result as before."""
    import pytest

    from fastattn._kernels import parallel

    want = call()
    try:
        parallel.fail_next_allocations(nfail)
        with pytest.raises(MemoryError):
            call()
    finally:
        parallel.fail_next_allocations(0)
    assert parallel.live_scratch_blocks() == 0
    got = call()
    for a, b in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        np.testing.assert_array_equal(a, b)


def threads_spy(monkeypatch):
    """Record the thread counts `fastattn._threads.call_threads` picks (a list)."""
    from fastattn import _threads

    picked = []
    real = _threads.call_threads

    def spy(*args):
        picked.append(real(*args))
        return picked[-1]
    monkeypatch.setattr(_threads, "call_threads", spy)
    return picked
