import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles, chosen with FASTATTN_HYPOTHESIS_PROFILE (default "default"):
#   default / ci  bounded and derandomized: the same examples on every run (CI)
#   long          local soak run of the property tests: 700 examples per test, a new
#                 draw each run (tests/test_fuzz.py alone then runs >= 10,000 examples)
settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, max_examples=700, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("FASTATTN_HYPOTHESIS_PROFILE", "default"))


def pytest_terminal_summary(terminalreporter):
    # examples the property tests of tests/test_fuzz.py ran (their own count)
    import sys
    fuzz = sys.modules.get("fuzz_count")
    if fuzz is not None and fuzz.EXAMPLES:
        total = sum(fuzz.EXAMPLES.values())
        terminalreporter.write_line(f"fuzz: {total} examples over {len(fuzz.EXAMPLES)} "
                                    f"property tests (hypothesis profile "
                                    f"{os.environ.get('FASTATTN_HYPOTHESIS_PROFILE', 'default')})")

@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink the kernel tiles so small inputs exercise many tiles and ragged edges."""
    import fastattn.attention as attention

    def set_tiles(block_q, block_k):
        monkeypatch.setattr(attention, "BLOCK_Q", block_q)
        monkeypatch.setattr(attention, "BLOCK_K", block_k)
    return set_tiles
