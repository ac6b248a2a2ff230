import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("default")

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
