"""The same comparisons on a real Ascend NPU (Atlas A2).

Run on a machine with CANN and a device, in a process that has not loaded
the simulator::

    source /usr/local/Ascend/ascend-toolkit/set_env.sh
    python -m pytest -m npu tests/test_ascend_npu.py -p no:cacheprovider

Skipped when no device is visible or when the loaded runtime is the test double.
"""

import numpy as np
import pytest

import ascend

pytestmark = pytest.mark.npu


@pytest.fixture(scope="module", autouse=True)
def real_device():
    if ascend.device_count() == 0:
        pytest.skip("no Ascend NPU visible (ascend.device_count() == 0)")
    from ascend._runtime import get_runtime
    if hasattr(get_runtime().lib.acl, "ascendsim_mem_stats"):
        pytest.skip("the loaded runtime is the test double, not real hardware")


def reference(q, k, v, keep=None, scale=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    scores = (scale or 1 / np.sqrt(q.shape[-1])) * q @ k.swapaxes(-1, -2)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    empty = ~np.isfinite(top)
    weights = np.exp(scores - np.where(empty, 0, top))
    return np.where(empty, 0, weights @ v / np.where(empty, 1, weights.sum(-1, keepdims=True)))


def causal(length, key_length, bottom_right):
    offset = key_length - length if bottom_right else 0
    return np.arange(key_length)[None] <= np.arange(length)[:, None] + offset


TOLERANCE = {np.float32: 2e-3, np.float16: 1e-2}  # hardware accumulates in fp32


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("alignment", [None, "top_left", "bottom_right"])
def test_flash_attention_on_npu(dtype, alignment):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 8, 128, 64)).astype(dtype)
    k = rng.standard_normal((2, 2, 256, 64)).astype(dtype)
    v = rng.standard_normal((2, 2, 256, 64)).astype(dtype)
    out = ascend.flash_attention(q, k, v, is_causal=alignment is not None,
                                 causal_alignment=alignment or "top_left")
    keep = None if alignment is None else causal(128, 256, alignment == "bottom_right")
    np.testing.assert_allclose(out.astype(np.float64), reference(q, k, v, keep),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_bool_mask_polarity_on_npu():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4, 64, 64)).astype(np.float16) for _ in range(3))
    keep = rng.random((1, 1, 64, 64)) < 0.7
    keep[..., 0] = True
    out = ascend.flash_attention(q, k, v, keep)
    np.testing.assert_allclose(out.astype(np.float64), reference(q, k, v, keep), rtol=1e-2,
                               atol=1e-2)


def test_paged_decode_on_npu():
    rng = np.random.default_rng(2)
    block_size, max_blocks = 128, 4
    cache_k = rng.standard_normal((16, 2, block_size, 128)).astype(np.float16)
    cache_v = rng.standard_normal((16, 2, block_size, 128)).astype(np.float16)
    table = rng.permutation(16)[:8].reshape(2, max_blocks).astype(np.int32)
    lens = np.array([100, 400], np.int32)
    q = rng.standard_normal((2, 8, 1, 128)).astype(np.float16)
    out = ascend.paged_attention(q, cache_k, cache_v, table, lens)
    for b in range(2):
        pos = np.arange(lens[b])
        k = cache_k[table[b, pos // block_size], :, pos % block_size].transpose(1, 0, 2)[None]
        v = cache_v[table[b, pos // block_size], :, pos % block_size].transpose(1, 0, 2)[None]
        np.testing.assert_allclose(out[b:b + 1].astype(np.float64), reference(q[b:b + 1], k, v),
                                   rtol=1e-2, atol=1e-2)


def reference_backward(grad_out, q, k, v, keep=None):
    """(dq, dk, dv) in float64 (GQA: key/value gradients summed over each group)."""
    g, q, k, v = (np.asarray(x, np.float64) for x in (grad_out, q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    scale = 1 / np.sqrt(q.shape[-1])
    scores = scale * q @ k.swapaxes(-1, -2)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    empty = ~np.isfinite(top)
    weights = np.exp(scores - np.where(empty, 0, top))
    p = np.where(empty, 0, weights / np.where(empty, 1, weights.sum(-1, keepdims=True)))
    ds = p * (g @ v.swapaxes(-1, -2) - (g * (p @ v)).sum(-1, keepdims=True))
    fold = lambda x: x.reshape(x.shape[0], -1, group, *x.shape[2:]).sum(2)  # noqa: E731
    return scale * ds @ k, fold(scale * ds.swapaxes(-1, -2) @ q), fold(p.swapaxes(-1, -2) @ g)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("alignment", [None, "bottom_right"])
def test_flash_attention_backward_on_npu(dtype, alignment):
    """aclnnFlashAttentionScoreGrad with softmaxMax = lse, softmaxSum = 1 (docs/ascend.md)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 8, 256, 64)).astype(dtype)       # L > S: rows without keys
    k = rng.standard_normal((2, 2, 128, 64)).astype(dtype)
    v = rng.standard_normal((2, 2, 128, 64)).astype(dtype)
    options = dict(is_causal=alignment is not None, causal_alignment=alignment or "top_left")
    out, lse = ascend.flash_attention(q, k, v, return_lse=True, **options)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grads = ascend.flash_attention_backward(grad_out, q, k, v, out, lse, **options)
    keep = None if alignment is None else causal(256, 128, True)
    for got, want in zip(grads, reference_backward(grad_out, q, k, v, keep)):
        assert np.isfinite(got).all()
        bound = 2 * TOLERANCE[dtype] * max(np.abs(want).max(), 1.0)
        assert np.abs(got.astype(np.float64) - want).max() <= bound
